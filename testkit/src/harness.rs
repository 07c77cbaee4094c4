//! A real push-server in this process, with real TLS sockets, its API client and helpers to act
//! as devices and senders ([`Harness`]); or in a child process that can be SIGKILLed
//! ([`ChildServer`]).
//!
//! The child process is the test executable itself, re-run with only the ignored
//! `server_process_entry` test (see [`server_process_entry!`](crate::server_process_entry)) and
//! environment variables that make it start a server, print its addresses and serve until its
//! stdin closes. So a kill test needs no separately built binary, and the server dies with the
//! test if the test dies.

use std::{
    future::Future,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, atomic::AtomicU64, mpsc},
    time::Duration,
};

use push_proto::{
    device::{Hello, Push, push},
    sender::{
        CancelCallRequest, CreateApiKeyRequest, CreateApiKeyResponse, DeliveryState, DeliveryUpdate,
        GetMessageStatusRequest, IssueDeviceCredentialRequest, ListDevicesRequest, PlaceCallRequest,
        PlaceCallResponse, SendMessageRequest, SendMessageResponse, Target, target,
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

use crate::SERVER_NAME;

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
/// Bound of a wait through [`ServerInfo`] (the SDK tests' clients reconnect with backoff).
pub const STEP: Duration = Duration::from_secs(15);

/// Await `fut`, failing the test if it takes longer than [`WAIT`].
pub async fn within<T>(fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut).await.expect("timed out waiting")
}

/// One HTTPS request to a dashboard listener at `addr` (trusting `ca`, HTTP/1.1,
/// `Connection: close`); returns the status, the response head and the body.
pub async fn https(
    addr: SocketAddr,
    ca: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tls = push_server::pki::client_config(ca).unwrap();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let tcp = within(tokio::net::TcpStream::connect(addr)).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(SERVER_NAME).unwrap();
    let mut stream = within(connector.connect(name, tcp)).await.unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nhost: {SERVER_NAME}\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    within(stream.write_all(req.as_bytes())).await.unwrap();
    let mut raw = Vec::new();
    // The server may close without close_notify after the response: keep what was read.
    let _ = within(stream.read_to_end(&mut raw)).await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head.to_string(), body.to_string())
}

/// Heartbeat interval and timeout of a test server.
#[derive(Debug, Clone, Copy)]
pub struct Heartbeat {
    /// `heartbeat_interval_ms`.
    pub interval_ms: u64,
    /// `heartbeat_timeout_ms`.
    pub timeout_ms: u64,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Self {
            interval_ms: 30_000,
            timeout_ms: 10_000,
        }
    }
}

impl Heartbeat {
    /// Set `hb` and lift the login limits: the SDK tests squeeze thousands of lifecycles of one
    /// device from one address into seconds, which the server would rightly take for a crash
    /// loop.
    pub fn apply(self, cfg: &mut Config) {
        cfg.heartbeat_interval_ms = self.interval_ms;
        cfg.heartbeat_timeout_ms = self.timeout_ms;
        cfg.limits.device_logins_per_minute = 1_000_000;
        cfg.limits.device_login_burst = 100_000;
        cfg.limits.device_handshakes.per_sec_per_ip = 100_000;
        cfg.limits.device_handshakes.burst_per_ip = 100_000;
    }
}

/// A config on loopback with every listener on a free port (tests run in parallel).
fn test_config(data_dir: &Path) -> Config {
    Config {
        data_dir: data_dir.to_path_buf(),
        device_listen: "127.0.0.1:0".parse().unwrap(),
        api_listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        node_name: "test-node".into(),
        ..Config::default()
    }
}

/// Start with `voip` as the APNs VoIP fallback; `None` uses what the config asks for.
async fn start_server(cfg: Config, voip: Option<Arc<dyn apns_bridge::VoipBridge>>) -> Server {
    match voip {
        Some(v) => Server::start_with_voip(cfg, Some(v)).await,
        None => Server::start(cfg).await,
    }
    .expect("server starts")
}

/// A server in this process and an admin API client: graceful shutdown, and restart on the
/// same data directory and device port.
pub struct Harness {
    /// The server, until [`Self::shutdown`].
    pub server: Option<Server>,
    /// The config it was started with.
    pub cfg: Config,
    /// An API client with the admin key.
    pub api: ApiClient,
    /// The server's CA certificate (PEM).
    pub ca: String,
    /// Where it runs.
    pub info: ServerInfo,
    /// The store epoch of the last `ServerHello`, sent with the floor as an SDK does.
    pub epoch: AtomicU64,
    voip: Option<Arc<dyn apns_bridge::VoipBridge>>,
    _dir: TempDir,
}

impl Harness {
    /// Start one in a temporary directory.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Start one in a temporary directory, its config changed by `tweak`.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        Self::start_with_voip(tweak, None).await
    }

    /// Start with `voip` as the APNs VoIP fallback; `None` uses what the config asks for.
    pub async fn start_with_voip(
        tweak: impl FnOnce(&mut Config),
        voip: Option<Arc<dyn apns_bridge::VoipBridge>>,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = test_config(&dir.path().join("data"));
        tweak(&mut cfg);
        let server = start_server(cfg.clone(), voip.clone()).await;
        let info = ServerInfo {
            dir: cfg.data_dir.clone(),
            device_addr: server.device_addr,
            api_addr: server.api_addr,
        };
        Self {
            ca: server.pki.ca_cert_pem.clone(),
            api: info.api().await,
            server: Some(server),
            cfg,
            info,
            epoch: Default::default(),
            voip,
            _dir: dir,
        }
    }

    /// The admin API key the server created.
    pub fn admin_key(&self) -> String {
        self.info.admin_key()
    }

    /// Where the dashboard and /metrics listen.
    pub fn http_addr(&self) -> std::net::SocketAddr {
        self.server.as_ref().unwrap().http_addr
    }

    /// One HTTPS request to the dashboard listener, see [`https`].
    pub async fn https(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (u16, String, String) {
        https(self.http_addr(), &self.ca, method, path, headers, body).await
    }

    /// `GET path` on the dashboard listener with the admin key as a bearer token; the status and
    /// the body.
    pub async fn dashboard_get(&self, path: &str) -> (u16, String) {
        let bearer = format!("Bearer {}", self.admin_key());
        let (status, _, body) = self.https("GET", path, &[("authorization", &bearer)], "").await;
        (status, body)
    }

    /// The sender API.
    pub fn sender(&self) -> SenderClient {
        self.api.sender()
    }

    /// The admin API.
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
        ApiClient::connect(addr, SERVER_NAME, &self.ca, key)
            .await
            .unwrap()
    }

    /// The server's own credential authority (to forge expired credentials).
    pub fn authority(&self) -> DeviceAuthority {
        DeviceAuthority::load_or_create(&self.cfg.data_dir).unwrap()
    }

    /// Register `device_id` in `groups`; its credential.
    pub async fn issue(&self, device_id: &str, groups: &[&str]) -> String {
        issue(&self.api, device_id, groups).await
    }

    /// How a device with `credential` that has seen up to `last_seen_seq` connects.
    pub fn options(&self, credential: &str, last_seen_seq: u64) -> ClientOptions {
        ClientOptions {
            addr: self.server.as_ref().unwrap().device_addr,
            server_name: SERVER_NAME.into(),
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

    /// Send a text message to one device.
    pub async fn send(&self, device_id: &str, body: &str) -> SendMessageResponse {
        self.send_req(SendMessageRequest {
            target: Some(to(device_id)),
            body: body.into(),
            ..Default::default()
        })
        .await
    }

    /// Send `req`; the server's answer.
    pub async fn send_req(&self, req: SendMessageRequest) -> SendMessageResponse {
        self.try_send(req).await.unwrap()
    }

    /// Send `req`: the server's answer, or why it refused.
    pub async fn try_send(&self, req: SendMessageRequest) -> Result<SendMessageResponse, tonic::Status> {
        self.sender()
            .send_message(req)
            .await
            .map(tonic::Response::into_inner)
    }

    /// Place the call `req`: the server's answer, or why it refused.
    pub async fn place(&self, req: PlaceCallRequest) -> Result<PlaceCallResponse, tonic::Status> {
        self.sender()
            .place_call(req)
            .await
            .map(tonic::Response::into_inner)
    }

    /// Follow a message's (or call's) receipts until `device_id` reaches `state`; returns every
    /// update seen for that device on the way.
    pub async fn await_state(&self, id: &str, device_id: &str, state: DeliveryState) -> Vec<DeliveryUpdate> {
        self.await_update(id, device_id, |u| u.state() == state).await
    }

    /// Every device's presence changes from now on (online, offline with the reason).
    pub async fn presence(&self) -> tonic::Streaming<push_proto::sender::PresenceEvent> {
        self.sender()
            .watch_presence(push_proto::sender::WatchPresenceRequest {})
            .await
            .unwrap()
            .into_inner()
    }

    /// A push's receipts as they change (the stream starts with the current state).
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

    /// Graceful shutdown: goodbye SERVER_SHUTDOWN to every device, store flushed.
    pub async fn shutdown(&mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().await;
        }
    }

    /// Start again on the same data directory and device port (the API's port changes).
    pub async fn restart(&mut self) {
        self.shutdown().await;
        let mut cfg = self.cfg.clone();
        cfg.device_listen = self.info.device_addr;
        let server = start_server(cfg, self.voip.clone()).await;
        self.info.api_addr = server.api_addr;
        self.api = self.info.api().await;
        self.server = Some(server);
    }
}

/// Where a running server is, and how to talk to its API.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    /// Its data directory.
    pub dir: PathBuf,
    /// Where devices connect.
    pub device_addr: SocketAddr,
    /// Where the gRPC API listens.
    pub api_addr: SocketAddr,
}

impl ServerInfo {
    /// Its CA certificate (PEM).
    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.dir.join("tls/ca.pem")).expect("ca.pem")
    }

    /// The admin API key it created.
    pub fn admin_key(&self) -> String {
        std::fs::read_to_string(self.dir.join("admin.key"))
            .expect("admin.key")
            .trim()
            .to_string()
    }

    /// An API client with the admin key.
    pub async fn api(&self) -> ApiClient {
        tokio::time::timeout(
            STEP,
            ApiClient::connect(self.api_addr, SERVER_NAME, &self.ca_pem(), &self.admin_key()),
        )
        .await
        .expect("API connect timed out")
        .expect("API connect")
    }

    /// Register a device and return its credential.
    pub async fn issue(&self, device_id: &str) -> String {
        issue(&self.api().await, device_id, &[]).await
    }

    /// Send a text message; returns once the server stored it durably.
    pub async fn send(api: &ApiClient, device_id: &str, message_id: &str) {
        api.sender()
            .send_message(SendMessageRequest {
                target: Some(to(device_id)),
                title: format!("title {message_id}"),
                body: format!("body {message_id}"),
                message_id: message_id.into(),
                ..Default::default()
            })
            .await
            .expect("SendMessage");
    }

    /// Place a call to `device_id`.
    pub async fn place_call(api: &ApiClient, device_id: &str, call_id: &str) -> PlaceCallResponse {
        api.sender()
            .place_call(PlaceCallRequest {
                caller_handle: "4711".into(),
                ..call_to(call_id, device_id, "Ward 4B")
            })
            .await
            .expect("PlaceCall")
            .into_inner()
    }

    /// Cancel `call_id`; how many cancels were sent.
    pub async fn cancel_call(api: &ApiClient, call_id: &str) -> u32 {
        api.sender()
            .cancel_call(CancelCallRequest {
                call_id: call_id.into(),
                reason: 1,
            })
            .await
            .expect("CancelCall")
            .into_inner()
            .cancels_sent
    }

    /// Wait until the server reports the message ACKED by `device_id` (event-driven: the
    /// server's watch stream).
    pub async fn wait_acked(api: &ApiClient, message_id: &str) {
        let mut stream = api
            .sender()
            .watch_message(GetMessageStatusRequest {
                message_id: message_id.into(),
            })
            .await
            .expect("WatchMessage")
            .into_inner();
        let acked = async {
            while let Some(update) = stream.message().await.expect("watch stream") {
                if update.state == DeliveryState::Acked as i32 {
                    return;
                }
            }
            panic!("watch ended before {message_id} was acked");
        };
        tokio::time::timeout(STEP, acked)
            .await
            .unwrap_or_else(|_| panic!("{message_id} not acked in time"));
    }

    /// Whether the server sees the device online.
    pub async fn online(api: &ApiClient, device_id: &str) -> bool {
        api.sender()
            .list_devices(ListDevicesRequest {
                group: String::new(),
                online_only: false,
            })
            .await
            .expect("ListDevices")
            .into_inner()
            .devices
            .into_iter()
            .find(|d| d.device_id == device_id)
            .is_some_and(|d| d.online)
    }
}

/// Register `device_id` in `groups` through `api`; its credential.
async fn issue(api: &ApiClient, device_id: &str, groups: &[&str]) -> String {
    api.admin()
        .issue_device_credential(IssueDeviceCredentialRequest {
            device_id: device_id.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            valid_days: 0,
        })
        .await
        .expect("IssueDeviceCredential")
        .into_inner()
        .credential
}

/// Every device `api`'s key may list, or why the server refused.
pub async fn list_devices_as(api: &ApiClient) -> Result<Vec<push_proto::sender::DeviceInfo>, tonic::Status> {
    let req = ListDevicesRequest::default();
    Ok(api.sender().list_devices(req).await?.into_inner().devices)
}

/// `caller_name` calling `device_id` as `call_id`, ringing 30 s.
pub fn call_to(call_id: &str, device_id: &str, caller_name: &str) -> PlaceCallRequest {
    PlaceCallRequest {
        call_id: call_id.into(),
        target: Some(to(device_id)),
        caller_name: caller_name.into(),
        ring_timeout_seconds: 30,
        ..Default::default()
    }
}

/// A target of one device.
pub fn to(device_id: &str) -> Target {
    Target {
        kind: Some(target::Kind::DeviceId(device_id.into())),
    }
}

/// A target of the devices `ids`.
pub fn to_devices(ids: &[&str]) -> Target {
    Target {
        kind: Some(target::Kind::Devices(push_proto::sender::DeviceList {
            device_ids: ids.iter().map(|d| d.to_string()).collect(),
        })),
    }
}

/// The text of a message push.
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

/// Set in a [`ChildServer`]'s process (to its data directory): a bench without libtest's
/// harness checks it and calls [`run_server_process`].
pub const SERVER_PROCESS_ENV: &str = "TESTKIT_SERVER_DIR";
const ENV_DEVICE_LISTEN: &str = "TESTKIT_DEVICE_LISTEN";
const ENV_HB: &str = "TESTKIT_HEARTBEAT_MS";
const READY: &str = "TESTKIT-SERVER READY ";

/// Defines the (ignored) test that is the entry point of a [`ChildServer`]'s process.
#[macro_export]
macro_rules! server_process_entry {
    () => {
        #[test]
        #[ignore = "entry point of the server child process; the tests run it themselves"]
        fn server_process_entry() {
            ::testkit::harness::run_server_process();
        }
    };
}

/// A server in a child process (this test executable, see the module docs).
pub struct ChildServer {
    /// Where it runs.
    pub info: ServerInfo,
    child: Option<Child>,
    hb: Heartbeat,
}

impl ChildServer {
    /// Start one with its data in `dir`, with `hb` (see [`Heartbeat::apply`]).
    pub fn start(dir: &Path, hb: Heartbeat) -> Self {
        let (child, device_addr, api_addr) = spawn_child(dir, None, hb);
        Self {
            info: ServerInfo {
                dir: dir.to_path_buf(),
                device_addr,
                api_addr,
            },
            child: Some(child),
            hb,
        }
    }

    /// SIGKILL: no goodbye, no flush. Returns once the process is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start a new process on the same data directory and device port.
    pub fn restart(&mut self) {
        self.kill();
        let (child, device_addr, api_addr) =
            spawn_child(&self.info.dir, Some(self.info.device_addr), self.hb);
        assert_eq!(device_addr, self.info.device_addr);
        self.info.api_addr = api_addr;
        self.child = Some(child);
    }

    /// The server process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn_child(
    dir: &Path,
    device_listen: Option<SocketAddr>,
    hb: Heartbeat,
) -> (Child, SocketAddr, SocketAddr) {
    let listen = device_listen.unwrap_or_else(|| "127.0.0.1:0".parse().unwrap());
    let mut child = Command::new(std::env::current_exe().expect("test executable"))
        .args([
            "server_process_entry",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(SERVER_PROCESS_ENV, dir)
        .env(ENV_DEVICE_LISTEN, listen.to_string())
        .env(ENV_HB, format!("{},{}", hb.interval_ms, hb.timeout_ms))
        .env("RUST_LOG", "off")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn server child");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    // Keeps draining stdout for the child's whole life, so it never blocks on a full pipe.
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // libtest may have printed the test name on the same line already.
            if let Some(at) = line.find(READY) {
                let _ = tx.send(line[at + READY.len()..].trim().to_string());
            }
        }
    });
    let addrs = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("server child did not report ready");
    let mut parts = addrs
        .split(' ')
        .map(|a| a.parse::<SocketAddr>().expect("address"));
    (child, parts.next().unwrap(), parts.next().unwrap())
}

/// Body of the child process: serve until stdin closes (the parent ends or kills us).
pub fn run_server_process() {
    let dir = std::env::var(SERVER_PROCESS_ENV).expect("only the tests run this");
    let listen: SocketAddr = std::env::var(ENV_DEVICE_LISTEN).unwrap().parse().unwrap();
    let hb = std::env::var(ENV_HB).unwrap();
    let (interval, timeout) = hb.split_once(',').unwrap();
    let hb = Heartbeat {
        interval_ms: interval.parse().unwrap(),
        timeout_ms: timeout.parse().unwrap(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut cfg = test_config(Path::new(&dir));
        cfg.device_listen = listen;
        hb.apply(&mut cfg);
        let server = Server::start(cfg).await.expect("server start");
        println!("{READY}{} {}", server.device_addr, server.api_addr);
        let stdin_closed = tokio::task::spawn_blocking(|| {
            let mut sink = String::new();
            while std::io::stdin().read_line(&mut sink).is_ok_and(|n| n > 0) {}
        });
        let _ = stdin_closed.await;
        server.shutdown().await;
    });
}
