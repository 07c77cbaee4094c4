//! In-process server with real TLS sockets, plus helpers to act as devices and senders.
#![allow(dead_code)] // each test binary uses a different subset

use std::{future::Future, time::Duration};

use push_proto::{
    device::{Hello, Push, push},
    sender::{
        CreateApiKeyRequest, CreateApiKeyResponse, DeliveryState, DeliveryUpdate, GetMessageStatusRequest,
        IssueDeviceCredentialRequest, SendMessageRequest, SendMessageResponse, Target, target,
    },
};
use push_server::{
    api_client::{AdminClient, ApiClient, SenderClient},
    auth::DeviceAuthority,
    client::{ClientError, ClientOptions, DeviceClient},
    config::Config,
    server::Server,
};
use tempfile::TempDir;

/// Handshake limits that never refuse (so a test configures only the one it exercises).
pub const OPEN_HANDSHAKES: push_server::config::HandshakeLimits = push_server::config::HandshakeLimits {
    in_progress: 10_000,
    in_progress_per_ip: 10_000,
    per_sec: 100_000,
    burst: 100_000,
    per_sec_per_ip: 100_000,
    burst_per_ip: 100_000,
};

/// Upper bound for any single wait in a test; a hang fails instead of blocking CI.
pub const WAIT: Duration = Duration::from_secs(10);

/// Await `fut`, failing the test if it takes longer than [`WAIT`].
pub async fn within<T>(fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut).await.expect("timed out waiting")
}

pub struct Harness {
    pub server: Option<Server>,
    pub dir: TempDir,
    pub cfg: Config,
    pub api: ApiClient,
    pub ca: String,
    /// The store epoch of the last `ServerHello`, sent with the floor as an SDK does.
    pub epoch: std::sync::atomic::AtomicU64,
}

impl Harness {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        Self::start_with_voip(tweak, None).await
    }

    /// Start with `voip` as the APNs VoIP fallback; `None` uses what the config asks for.
    pub async fn start_with_voip(
        tweak: impl FnOnce(&mut Config),
        voip: Option<std::sync::Arc<dyn apns_bridge::VoipBridge>>,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config {
            data_dir: dir.path().join("data"),
            device_listen: "127.0.0.1:0".parse().unwrap(),
            api_listen: "127.0.0.1:0".parse().unwrap(),
            http_listen: "127.0.0.1:0".parse().unwrap(),
            node_name: "test-node".into(),
            ..Config::default()
        };
        tweak(&mut cfg);
        let server = match voip {
            Some(v) => Server::start_with_voip(cfg.clone(), Some(v)).await,
            None => Server::start(cfg.clone()).await,
        }
        .expect("server starts");
        let ca = server.pki.ca_cert_pem.clone();
        let key = std::fs::read_to_string(cfg.data_dir.join("admin.key")).unwrap();
        let api = ApiClient::connect(server.api_addr, "localhost", &ca, key.trim())
            .await
            .unwrap();
        Self {
            server: Some(server),
            dir,
            cfg,
            api,
            ca,
            epoch: Default::default(),
        }
    }

    /// The admin API key the server created.
    pub fn admin_key(&self) -> String {
        std::fs::read_to_string(self.cfg.data_dir.join("admin.key"))
            .unwrap()
            .trim()
            .to_string()
    }

    /// Where the dashboard and /metrics listen.
    pub fn http_addr(&self) -> std::net::SocketAddr {
        self.server.as_ref().unwrap().http_addr
    }

    /// One HTTPS request to the dashboard listener (trusting the server's CA, HTTP/1.1,
    /// `Connection: close`); returns the status, the response head and the body.
    pub async fn https(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (u16, String, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tls = push_server::pki::client_config(&self.ca).unwrap();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls));
        let tcp = tokio::net::TcpStream::connect(self.http_addr()).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut stream = within(connector.connect(name, tcp)).await.unwrap();
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\ncontent-length: {}\r\n",
            body.len()
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        req.push_str(body);
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        // The server may close without close_notify after the response: keep what was read.
        let _ = within(stream.read_to_end(&mut raw)).await;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
        let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        (status, head.to_string(), body.to_string())
    }

    pub fn sender(&self) -> SenderClient {
        self.api.sender()
    }

    pub fn admin(&self) -> AdminClient {
        self.api.admin()
    }

    /// A new API key named `name` with `scopes` (and, for an enroll key, the `groups` it enrolls
    /// devices into).
    pub async fn create_key(&self, name: &str, scopes: &[&str], groups: &[&str]) -> CreateApiKeyResponse {
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        let request = CreateApiKeyRequest {
            name: name.into(),
            scopes: strings(scopes),
            enroll_groups: strings(groups),
            ..Default::default()
        };
        self.admin().create_api_key(request).await.unwrap().into_inner()
    }

    /// An API client presenting `key`.
    pub async fn client(&self, key: &str) -> ApiClient {
        let addr = self.server.as_ref().unwrap().api_addr;
        ApiClient::connect(addr, "localhost", &self.ca, key)
            .await
            .unwrap()
    }

    /// The server's own credential authority (to forge expired credentials).
    pub fn authority(&self) -> DeviceAuthority {
        DeviceAuthority::load_or_create(&self.cfg.data_dir).unwrap()
    }

    pub async fn issue(&self, device_id: &str, groups: &[&str]) -> String {
        self.admin()
            .issue_device_credential(IssueDeviceCredentialRequest {
                device_id: device_id.into(),
                groups: groups.iter().map(|g| g.to_string()).collect(),
                valid_days: 0,
            })
            .await
            .unwrap()
            .into_inner()
            .credential
    }

    pub fn options(&self, credential: &str, last_seen_seq: u64) -> ClientOptions {
        ClientOptions {
            addr: self.server.as_ref().unwrap().device_addr,
            server_name: "localhost".into(),
            ca_pem: self.ca.clone(),
            hello: Hello {
                credential: credential.into(),
                sdk_version: "test/1".into(),
                last_seen_seq,
                ssid: "Ward 4B".into(),
                instance_id: "test-instance".into(),
                epoch: self.epoch.load(std::sync::atomic::Ordering::SeqCst),
                device_time_ms: 0,
                previous_stop_reason: String::new(),
            },
        }
    }

    /// Connect with the floor and the epoch of the last server hello, as an SDK does.
    pub async fn connect(&self, credential: &str, last_seen_seq: u64) -> Result<DeviceClient, ClientError> {
        let client = within(DeviceClient::connect(self.options(credential, last_seen_seq))).await?;
        self.epoch
            .store(client.server_hello.epoch, std::sync::atomic::Ordering::SeqCst);
        Ok(client)
    }

    /// Register a device and connect it.
    pub async fn device(&self, device_id: &str) -> DeviceClient {
        let credential = self.issue(device_id, &[]).await;
        self.connect(&credential, 0).await.expect("device connects")
    }

    pub async fn send(&self, device_id: &str, body: &str) -> SendMessageResponse {
        self.send_req(SendMessageRequest {
            target: Some(to(device_id)),
            body: body.into(),
            ..Default::default()
        })
        .await
    }

    pub async fn send_req(&self, req: SendMessageRequest) -> SendMessageResponse {
        self.sender().send_message(req).await.unwrap().into_inner()
    }

    /// Follow a message's (or call's) receipts until `device_id` reaches `state`; returns every
    /// update seen for that device on the way.
    pub async fn await_state(&self, id: &str, device_id: &str, state: DeliveryState) -> Vec<DeliveryUpdate> {
        self.await_update(id, device_id, |u| u.state() == state).await
    }

    /// A push's receipts as they change (the stream starts with the current state).
    /// Every device's presence changes from now on (online, offline with the reason).
    pub async fn presence(&self) -> tonic::Streaming<push_proto::sender::PresenceEvent> {
        self.sender()
            .watch_presence(push_proto::sender::WatchPresenceRequest {})
            .await
            .unwrap()
            .into_inner()
    }

    pub async fn watch(&self, id: &str) -> tonic::Streaming<DeliveryUpdate> {
        let req = GetMessageStatusRequest {
            message_id: id.into(),
        };
        self.sender().watch_message(req).await.unwrap().into_inner()
    }

    /// Follow a push's receipts until an update for `device_id` satisfies `done`; returns every
    /// update seen for that device on the way (the stream starts with the current state).
    pub async fn await_update(
        &self,
        id: &str,
        device_id: &str,
        done: impl Fn(&DeliveryUpdate) -> bool,
    ) -> Vec<DeliveryUpdate> {
        let mut stream = self.watch(id).await;
        let mut seen = Vec::new();
        within(async {
            while let Some(u) = stream.message().await.unwrap() {
                if u.device_id != device_id {
                    continue;
                }
                let finished = done(&u);
                seen.push(u);
                if finished {
                    return;
                }
            }
            panic!("stream ended before the awaited update for {device_id}: {seen:?}");
        })
        .await;
        seen
    }

    /// Devices as the sender API lists them.
    pub async fn list_devices(&self, group: &str, online_only: bool) -> Vec<push_proto::sender::DeviceInfo> {
        let req = push_proto::sender::ListDevicesRequest {
            group: group.into(),
            online_only,
        };
        self.sender()
            .list_devices(req)
            .await
            .unwrap()
            .into_inner()
            .devices
    }

    pub async fn shutdown(&mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().await;
        }
    }
}

pub fn to(device_id: &str) -> Target {
    Target {
        kind: Some(target::Kind::DeviceId(device_id.into())),
    }
}

pub fn body(p: &Push) -> String {
    match &p.body {
        Some(push::Body::Message(m)) => m.body.clone(),
        other => panic!("expected a message, got {other:?}"),
    }
}

/// Next push, within the test deadline.
pub async fn next(client: &mut DeviceClient) -> Push {
    within(client.next_push()).await.expect("push arrives")
}
