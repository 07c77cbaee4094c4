//! Tests across real processes (`tests/`): the `push-server` and `apns-bridge` binaries run,
//! killed and restarted by [`testkit::launcher`] (build them first with
//! `cargo build -p push-server -p apns-bridge`), phones that are real SDK clients ([`phones`]),
//! and a balancer in front of a cluster ([`balancer`]).
//!
//! A test crate: it depends on the binaries' library crates and on `testkit`; nothing depends on
//! it.

pub mod balancer;
pub mod phones;

use bytes::BytesMut;
use push_proto::{device::ServerFrame, frame};
pub use push_server::{
    api_client::ApiClient,
    client::{ClientError, ClientOptions, DeviceClient},
};
pub use testkit::{
    SERVER_NAME,
    launcher::*,
    process::{LineReader, wait_exit},
};
use tokio::{io::AsyncReadExt, net::TcpStream};
use tokio_rustls::client::TlsStream;

/// Read one server frame from a raw TLS stream opened with [`DeviceClient::open`]; `Ok(None)` at
/// end of stream.
pub async fn read_raw_frame(
    tls: &mut TlsStream<TcpStream>,
    buf: &mut BytesMut,
) -> Result<Option<ServerFrame>, ClientError> {
    loop {
        if let Some(f) = frame::decode::<ServerFrame>(buf, frame::DEFAULT_MAX_FRAME)? {
            return Ok(Some(f));
        }
        buf.reserve(4096);
        if tls.read_buf(buf).await? == 0 {
            return Ok(None);
        }
    }
}
