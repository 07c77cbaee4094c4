//! Remote mode: the bridge as a gRPC service (`lpush.apns.v1.ApnsBridge`) on the host that may
//! reach the internet, and [`RemoteBridge`], the push-server's client for it. The service hands
//! every request to the same [`Bridge`] the embedded mode uses; the client implements the same
//! [`VoipBridge`] trait, so the push-server cannot tell the two apart.
//!
//! The link is gRPC over TLS 1.3 only ([`crate::tls13`], like every listener of the project)
//! with the bridge's certificate, and a bearer API key: the
//! request carries caller names (patient-adjacent data) across the hospital's network, and the
//! bridge holds the key that makes any app's phones ring. Plain HTTP/2 is allowed only on a
//! loopback address (bridge and push-server on one host, and tests).

use std::{future::Future, sync::Arc, time::Duration};

use push_proto::apns::{
    RingVoipRequest, RingVoipResponse, VoipResult,
    apns_bridge_client::ApnsBridgeClient,
    apns_bridge_server::{self, ApnsBridgeServer},
};
use tokio::net::TcpListener;
use tonic::{
    Request, Response, Status,
    metadata::{Ascii, MetadataValue},
    service::interceptor::InterceptedService,
    transport::{Channel, Uri},
};

use crate::{
    bridge::{VoipBridge, VoipOutcome},
    clock::{Clock, SystemClock},
    contract::{DeviceToken, VoipCall},
    transport::BoxFuture,
};

/// Why the remote service or client could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RemoteError {
    /// Plain HTTP/2 on a non-loopback address.
    #[error("refusing plain HTTP/2 on {0}: give the bridge a TLS certificate, or listen on loopback only")]
    PlaintextNotLoopback(String),
    /// Bad endpoint, certificate or key.
    #[error("{0}")]
    Config(String),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// The bridge's TLS identity (PEM).
#[derive(Clone)]
pub struct TlsIdentity {
    /// Certificate chain, PEM.
    pub cert_pem: String,
    /// Private key, PEM.
    pub key_pem: String,
}

/// The gRPC service over a bridge.
pub struct BridgeService {
    bridge: Arc<dyn VoipBridge>,
    expected: String,
}

impl BridgeService {
    /// Serve `bridge` to callers presenting `api_key`.
    pub fn new(bridge: Arc<dyn VoipBridge>, api_key: &str) -> Self {
        Self {
            bridge,
            expected: format!("Bearer {api_key}"),
        }
    }

    fn authorize<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let given = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        // Constant-time comparison: the key is the only thing between the network and the
        // ability to ring phones.
        let same = given.len() == self.expected.len()
            && given
                .bytes()
                .zip(self.expected.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if same {
            Ok(())
        } else {
            Err(Status::unauthenticated("missing or wrong bridge API key"))
        }
    }
}

#[tonic::async_trait]
impl apns_bridge_server::ApnsBridge for BridgeService {
    async fn ring_voip(&self, req: Request<RingVoipRequest>) -> Result<Response<RingVoipResponse>, Status> {
        self.authorize(&req)?;
        let r = req.into_inner();
        let Some(invite) = r.invite else {
            return Err(Status::invalid_argument("invite is required"));
        };
        let outcome = match (VoipCall::from_invite(invite), DeviceToken::parse(&r.device_token)) {
            (Ok(call), Ok(token)) => self.bridge.ring(call, token).await,
            (Err(e), _) | (_, Err(e)) => VoipOutcome::Rejected {
                reason: e.to_string(),
            },
        };
        Ok(Response::new(to_proto(outcome)))
    }
}

/// Serve the bridge API on `listener` until `shutdown` resolves: TLS with `tls`, or plain
/// HTTP/2 when `tls` is `None` and the listener is on loopback.
pub async fn serve(
    listener: TcpListener,
    bridge: Arc<dyn VoipBridge>,
    api_key: &str,
    tls: Option<TlsIdentity>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RemoteError> {
    let addr = listener
        .local_addr()
        .map_err(|e| RemoteError::Config(e.to_string()))?;
    let mut builder = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(30)));
    let router = builder.add_service(ApnsBridgeServer::new(BridgeService::new(bridge, api_key)));
    match tls {
        Some(id) => {
            let config =
                crate::tls13::server_config(&id.cert_pem, &id.key_pem).map_err(RemoteError::Config)?;
            let incoming =
                tokio_stream::wrappers::ReceiverStream::new(crate::tls13::incoming(listener, config));
            router.serve_with_incoming_shutdown(incoming, shutdown).await?;
        }
        None if addr.ip().is_loopback() => {
            let incoming = tonic::transport::server::TcpIncoming::from(listener);
            router.serve_with_incoming_shutdown(incoming, shutdown).await?;
        }
        None => return Err(RemoteError::PlaintextNotLoopback(addr.to_string())),
    }
    Ok(())
}

/// Adds `authorization: Bearer <key>` to each request.
#[derive(Clone)]
pub struct BearerKey(MetadataValue<Ascii>);

impl tonic::service::Interceptor for BearerKey {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

/// How to reach a remote bridge.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    /// `https://host:port` (TLS) or `http://127.0.0.1:port` (loopback only).
    pub endpoint: String,
    /// CA certificate (PEM) that issued the bridge's certificate; required for https.
    pub ca_pem: Option<String>,
    /// Name to verify in the bridge's certificate; defaults to the endpoint's host.
    pub server_name: Option<String>,
    /// The bridge's API key.
    pub api_key: String,
    /// Time allowed to open the connection: a bridge that is down is reported quickly.
    pub connect_timeout: Duration,
}

/// The push-server's client of a remote bridge.
pub struct RemoteBridge {
    client: ApnsBridgeClient<InterceptedService<Channel, BearerKey>>,
    clock: Arc<dyn Clock>,
}

/// Time added to the ring time left before the client gives up on the bridge's answer (the
/// bridge itself stops at the ring deadline; this covers the network in between).
const ANSWER_SLACK: Duration = Duration::from_secs(2);

impl RemoteBridge {
    /// A client that connects on first use (so the push-server starts while the bridge is down,
    /// and calls then fall back to "undeliverable" instead of failing start-up).
    pub fn connect_lazy(opts: &RemoteOptions) -> Result<Self, RemoteError> {
        let bad = |e: &dyn std::fmt::Display| {
            RemoteError::Config(format!("bridge endpoint {}: {e}", opts.endpoint))
        };
        let settings = |url: String| {
            Channel::from_shared(url).map_err(|e| bad(&e)).map(|e| {
                e.connect_timeout(opts.connect_timeout)
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(30))
                    .keep_alive_while_idle(true)
            })
        };
        let endpoint = settings(opts.endpoint.clone())?;
        let uri = endpoint.uri().clone();
        let channel = match uri.scheme_str() {
            Some("https") => {
                let ca = opts.ca_pem.as_ref().ok_or_else(|| {
                    bad(&"https needs the CA certificate that issued the bridge's certificate")
                })?;
                let host = uri.host().unwrap_or_default().to_string();
                let name = opts
                    .server_name
                    .clone()
                    .unwrap_or_else(|| host.trim_matches(['[', ']']).to_string());
                let name = rustls::pki_types::ServerName::try_from(name).map_err(|e| bad(&e))?;
                let config = Arc::new(crate::tls13::client_config(ca).map_err(|e| bad(&e))?);
                let port = uri.port_u16().unwrap_or(443);
                let timeout = opts.connect_timeout;
                // Our own TLS 1.3 handshake under tonic's HTTP/2 (tonic's TLS cannot pin the
                // version); every new connection dials the endpoint's host and port.
                let connector = tower::service_fn(move |_: Uri| {
                    let (host, name, config) = (host.clone(), name.clone(), config.clone());
                    async move {
                        crate::tls13::connect(host, port, name, config, timeout)
                            .await
                            .map(hyper_util::rt::TokioIo::new)
                    }
                });
                // tonic adds its own TLS to an https URL; the connector already did, so the
                // channel is told http (only HTTP/2's :scheme sees it).
                let authority = uri.authority().map(|a| a.to_string()).unwrap_or_default();
                settings(format!("http://{authority}"))?.connect_with_connector_lazy(connector)
            }
            Some("http") => {
                let loopback = uri
                    .host()
                    .and_then(|h| h.trim_matches(['[', ']']).parse::<std::net::IpAddr>().ok())
                    .is_some_and(|ip| ip.is_loopback())
                    || uri.host() == Some("localhost");
                if !loopback {
                    return Err(RemoteError::PlaintextNotLoopback(opts.endpoint.clone()));
                }
                endpoint.connect_lazy()
            }
            _ => return Err(bad(&"expected an http:// or https:// URL")),
        };
        let key = MetadataValue::try_from(format!("Bearer {}", opts.api_key.trim()))
            .map_err(|_| RemoteError::Config("the bridge API key is not valid header text".into()))?;
        Ok(Self {
            client: ApnsBridgeClient::with_interceptor(channel, BearerKey(key)),
            clock: Arc::new(SystemClock),
        })
    }
}

impl VoipBridge for RemoteBridge {
    fn ring(&self, call: VoipCall, token: DeviceToken) -> BoxFuture<'_, VoipOutcome> {
        Box::pin(async move {
            let left = call.ring_deadline_ms() - self.clock.now_ms();
            if left <= 0 {
                return VoipOutcome::Rejected {
                    reason: "the call stopped ringing before the bridge was asked".into(),
                };
            }
            let request = RingVoipRequest {
                invite: Some(call.invite().clone()),
                device_token: token.as_str().into(),
            };
            let wait = Duration::from_millis(left as u64) + ANSWER_SLACK;
            let mut client = self.client.clone();
            match tokio::time::timeout(wait, client.ring_voip(request)).await {
                Ok(Ok(r)) => from_proto(r.into_inner()),
                Ok(Err(status)) => {
                    tracing::warn!(call = call.call_id(), code = ?status.code(), message = status.message(), "APNs bridge call failed");
                    let what = match status.code() {
                        tonic::Code::Unauthenticated => "APNs bridge refused the push-server's API key",
                        tonic::Code::Unavailable => "APNs bridge unreachable",
                        _ => "APNs bridge failed",
                    };
                    VoipOutcome::Undeliverable {
                        status: None,
                        reason: format!("{what}: {}", status.message()),
                        attempts: 0,
                    }
                }
                Err(_) => VoipOutcome::Undeliverable {
                    status: None,
                    reason: format!("APNs bridge did not answer within {} ms", wait.as_millis()),
                    attempts: 0,
                },
            }
        })
    }
}

/// Outcome to wire.
pub fn to_proto(o: VoipOutcome) -> RingVoipResponse {
    let (result, apns_status, reason, apns_id, attempts) = match o {
        VoipOutcome::Delivered { apns_id, attempts } => (
            VoipResult::Delivered,
            200,
            String::new(),
            apns_id.unwrap_or_default(),
            attempts,
        ),
        VoipOutcome::TokenInvalid { status, reason } => (
            VoipResult::TokenInvalid,
            u32::from(status),
            reason,
            String::new(),
            1,
        ),
        VoipOutcome::Undeliverable {
            status,
            reason,
            attempts,
        } => (
            VoipResult::Undeliverable,
            status.map_or(0, u32::from),
            reason,
            String::new(),
            attempts,
        ),
        VoipOutcome::Rejected { reason } => (VoipResult::Rejected, 0, reason, String::new(), 0),
        VoipOutcome::Duplicate => (VoipResult::Duplicate, 0, String::new(), String::new(), 0),
    };
    RingVoipResponse {
        result: result as i32,
        apns_status,
        reason,
        apns_id,
        attempts,
    }
}

/// Wire to outcome. An unknown result (a newer bridge) counts as undeliverable.
pub fn from_proto(r: RingVoipResponse) -> VoipOutcome {
    let status = (r.apns_status != 0).then_some(r.apns_status as u16);
    match VoipResult::try_from(r.result).unwrap_or(VoipResult::Unspecified) {
        VoipResult::Delivered => VoipOutcome::Delivered {
            apns_id: (!r.apns_id.is_empty()).then_some(r.apns_id),
            attempts: r.attempts,
        },
        VoipResult::TokenInvalid => VoipOutcome::TokenInvalid {
            status: status.unwrap_or(410),
            reason: r.reason,
        },
        VoipResult::Rejected => VoipOutcome::Rejected { reason: r.reason },
        VoipResult::Duplicate => VoipOutcome::Duplicate,
        VoipResult::Undeliverable | VoipResult::Unspecified => VoipOutcome::Undeliverable {
            status,
            reason: r.reason,
            attempts: r.attempts,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        bridge::{Bridge, BridgeSettings},
        contract::BundleId,
        fake::{FakeAnswer, FakeApns},
        test_invite,
    };

    #[test]
    fn outcomes_survive_the_wire() {
        for o in [
            VoipOutcome::Delivered {
                apns_id: Some("x".into()),
                attempts: 2,
            },
            VoipOutcome::TokenInvalid {
                status: 410,
                reason: "Unregistered".into(),
            },
            VoipOutcome::Undeliverable {
                status: Some(503),
                reason: "busy".into(),
                attempts: 3,
            },
            VoipOutcome::Undeliverable {
                status: None,
                reason: "unreachable".into(),
                attempts: 1,
            },
            VoipOutcome::Rejected {
                reason: "late".into(),
            },
            VoipOutcome::Duplicate,
        ] {
            assert_eq!(from_proto(to_proto(o.clone())), o);
        }
    }

    #[test]
    fn plaintext_only_on_loopback() {
        let opts = |endpoint: &str| RemoteOptions {
            endpoint: endpoint.into(),
            ca_pem: None,
            server_name: None,
            api_key: "k".into(),
            connect_timeout: Duration::from_secs(1),
        };
        assert!(matches!(
            RemoteBridge::connect_lazy(&opts("http://10.0.0.5:7450")),
            Err(RemoteError::PlaintextNotLoopback(_))
        ));
        assert!(matches!(
            RemoteBridge::connect_lazy(&opts("https://bridge.dmz:7450")),
            Err(RemoteError::Config(_))
        ));
    }

    #[tokio::test]
    async fn remote_calls_run_the_same_bridge_and_check_the_key() {
        let bundle = BundleId::parse("com.example.ward").unwrap();
        let fake = FakeApns::new(bundle.clone());
        fake.script(&"c".repeat(64), [FakeAnswer::status(410, "Unregistered")]);
        let bridge = Arc::new(Bridge::new(fake.clone(), BridgeSettings::new(bundle)));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, bridge, "secret", None, async {
            let _ = stopped.await;
        }));
        let client = |key: &str| {
            RemoteBridge::connect_lazy(&RemoteOptions {
                endpoint: format!("http://{addr}"),
                ca_pem: None,
                server_name: None,
                api_key: key.into(),
                connect_timeout: Duration::from_secs(2),
            })
            .unwrap()
        };
        let now = SystemClock.now_ms();
        let call = VoipCall::from_invite(test_invite("c1", now, now + 30_000)).unwrap();
        let a = DeviceToken::parse(&"a".repeat(64)).unwrap();
        let remote = client("secret");
        assert!(matches!(
            remote.ring(call.clone(), a.clone()).await,
            VoipOutcome::Delivered { .. }
        ));
        assert_eq!(remote.ring(call.clone(), a).await, VoipOutcome::Duplicate);
        let c = DeviceToken::parse(&"c".repeat(64)).unwrap();
        assert!(matches!(
            remote.ring(call.clone(), c).await,
            VoipOutcome::TokenInvalid { status: 410, .. }
        ));
        let wrong = client("guess");
        let b = DeviceToken::parse(&"b".repeat(64)).unwrap();
        assert!(matches!(
            wrong.ring(call, b).await,
            VoipOutcome::Undeliverable { reason, .. } if reason.contains("API key")
        ));
        assert_eq!(fake.received().len(), 2, "the unauthenticated call sent nothing");
        assert!(fake.violations().is_empty());
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }
}
