//! The APNs VoIP fallback: when a called phone has no live local session, or does not
//! acknowledge a call invite in time, ring it through one APNs VoIP push, honouring the
//! PushKit/CallKit contract (an app that receives a VoIP push and reports no call is killed by
//! iOS, and eventually gets no VoIP pushes at all).
//!
//! # Layout
//! - [`contract`]: the contract as types. A [`VoipCall`] is made only from a call invite, a
//!   [`VoipRequest`] only from a `VoipCall`: push type `voip`, topic `<bundle>.voip`, priority
//!   10, expiration not after the ring deadline, collapse id = call UUID, payload at most 5120
//!   bytes with everything the app needs to report the call. Does no I/O.
//! - [`policy`]: APNs answers classified ([`policy::classify`]), retries bounded by the ring
//!   deadline ([`policy::RetryPolicy`]), one push per (call, token) ([`policy::Ledger`]). Does
//!   no I/O; time is an argument.
//! - [`transport`]: the seam, [`ApnsTransport`]: send one built request, get status and reason.
//! - [`apple`]: the real transport over the `a2` crate (a thin wrapper; a2 only talks to Apple).
//! - [`fake`]: a faithful fake APNs for tests (and `apns-bridge serve --fake-apns`).
//! - [`bridge`]: [`Bridge`], which drives the above with one transport and one [`Clock`], and
//!   [`VoipBridge`], the one interface the push-server uses.
//! - [`remote`]: the bridge as a gRPC service (`lpush.apns.v1`) and [`remote::RemoteBridge`],
//!   the push-server's client for it; both modes run the same [`Bridge`].
//! - [`tls13`]: the TLS 1.3-only configurations and accept loop of the remote link.
//! - [`clock`]: wall-clock time as an input.
//! - [`daemon`]: logging and the shutdown signal of the daemons (this one and `push-server`).
//!
//! The binary (`src/main.rs`) is `apns-bridge serve`: the remote mode's server.
//!
//! # Dependencies
//! Depends only on `push-proto` among the workspace's crates; `push-server` depends on it
//! (through [`VoipBridge`]), never the other way.
#![warn(missing_docs, unreachable_pub)]

pub mod apple;
pub mod bridge;
pub mod clock;
pub mod contract;
pub mod daemon;
pub mod fake;
pub mod policy;
pub mod remote;
pub mod tls13;
pub mod transport;

pub use bridge::{Bridge, BridgeSettings, VoipBridge, VoipOutcome};
pub use clock::{Clock, SystemClock};
pub use contract::{BundleId, ContractError, DeviceToken, VoipCall, VoipRequest};
pub use transport::{ApnsResponse, ApnsTransport, TransportError};

/// A well-formed invite for unit tests.
#[cfg(test)]
pub(crate) fn test_invite(
    call_id: &str,
    created_ms: i64,
    deadline_ms: i64,
) -> push_proto::device::CallInvite {
    push_proto::device::CallInvite {
        call_id: call_id.into(),
        call_uuid: push_proto::call_uuid(call_id),
        caller_name: "Dr. Okafor".into(),
        caller_handle: "ext 4411".into(),
        video: true,
        created_at_ms: created_ms,
        ring_deadline_ms: deadline_ms,
    }
}
