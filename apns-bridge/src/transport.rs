//! The seam between the bridge and APNs: send one already-built request, get APNs' status and
//! reason back. [`crate::apple::A2Transport`] is the real one (a2 over HTTP/2 to Apple);
//! [`crate::fake::FakeApns`] is the faithful fake every test uses, since a2 cannot be pointed
//! at a local server.

use std::{future::Future, pin::Pin};

use crate::contract::VoipRequest;

/// A boxed future, so transports can be trait objects.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// APNs answered (any HTTP status).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApnsResponse {
    /// HTTP status: 200 on success.
    pub status: u16,
    /// APNs' `reason` (for example `Unregistered`); `None` on success or when the body was not
    /// understood. Read `status` first.
    pub reason: Option<String>,
    /// The `apns-id` header of the answer.
    pub apns_id: Option<String>,
}

/// APNs did not answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// No connection (DNS, TCP, TLS failed or was cut): the normal case on a site without
    /// internet. The request may not have reached APNs.
    #[error("APNs unreachable: {0}")]
    Unreachable(String),
    /// No answer within the time allowed.
    #[error("APNs did not answer within {0} ms")]
    Timeout(u64),
    /// The request could not be built or signed (a configuration problem, such as a bad key).
    #[error("request not sent: {0}")]
    Local(String),
}

/// Sends one request to APNs. Implementations reuse one HTTP/2 connection and one provider
/// token for as long as Apple allows (opening a connection per push looks like abuse to Apple).
pub trait ApnsTransport: Send + Sync + 'static {
    /// Send `request` and return APNs' answer. Does not retry; the bridge decides that.
    fn send<'a>(&'a self, request: &'a VoipRequest) -> BoxFuture<'a, Result<ApnsResponse, TransportError>>;
}
