//! Test harness: a real push-server (in this process, or in a child process that can be
//! SIGKILLed), its admin API, and an event recorder for the SDK.
//!
//! The child process is this very test executable, re-run with only the ignored
//! `server_process_entry` test (see [`server_process_entry!`]) and environment variables that
//! make it start a server, print its addresses and serve until its stdin closes. So a kill test
//! needs no separately built binary, and the server dies with the test if the test dies.
#![allow(dead_code, unreachable_pub)] // each test binary uses a different part of the harness

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, mpsc as std_mpsc},
    time::Duration,
};

use mobile_sdk::{ClientConfig, EventHandler, Trust, core::Event};
use push_proto::sender::{
    CancelCallRequest, DeliveryState, GetMessageStatusRequest, IssueDeviceCredentialRequest,
    ListDevicesRequest, PlaceCallRequest, PlaceCallResponse, SendMessageRequest, Target, target,
};
use push_server::{api_client::ApiClient, config::Config, server::Server};
use tokio::sync::mpsc;

/// Bound of every wait in the tests: a hang fails instead of blocking forever.
pub const STEP: Duration = Duration::from_secs(15);
pub const SERVER_NAME: &str = "localhost";

const ENV_DIR: &str = "SDK_TEST_SERVER_DIR";
const ENV_DEVICE_LISTEN: &str = "SDK_TEST_DEVICE_LISTEN";
const ENV_HB: &str = "SDK_TEST_HEARTBEAT_MS";
const READY: &str = "SDK-TEST-SERVER READY ";

/// Defines the (ignored) test that is the child server process's entry point.
#[macro_export]
macro_rules! server_process_entry {
    () => {
        #[test]
        #[ignore = "entry point of the server child process; the tests run it themselves"]
        fn server_process_entry() {
            common::run_server_process();
        }
    };
}

/// Heartbeat interval and timeout of a test server.
#[derive(Debug, Clone, Copy)]
pub struct Heartbeat {
    pub interval_ms: u64,
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

fn server_config(dir: &Path, device_listen: SocketAddr, hb: Heartbeat) -> Config {
    let mut cfg = Config {
        data_dir: dir.to_path_buf(),
        device_listen,
        api_listen: "127.0.0.1:0".parse().unwrap(),
        // Tests run in parallel: every listener on a free port.
        http_listen: "127.0.0.1:0".parse().unwrap(),
        heartbeat_interval_ms: hb.interval_ms,
        heartbeat_timeout_ms: hb.timeout_ms,
        ..Default::default()
    };
    // These tests squeeze thousands of lifecycles of one device from one address into seconds,
    // which the server would rightly take for a crash loop.
    cfg.limits.device_logins_per_minute = 1_000_000;
    cfg.limits.device_login_burst = 100_000;
    cfg.limits.device_handshakes.per_sec_per_ip = 100_000;
    cfg.limits.device_handshakes.burst_per_ip = 100_000;
    cfg
}

/// Where a running server is, and how to talk to its API.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    pub dir: PathBuf,
    pub device_addr: SocketAddr,
    pub api_addr: SocketAddr,
}

impl ServerInfo {
    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.dir.join("tls/ca.pem")).expect("ca.pem")
    }

    pub fn admin_key(&self) -> String {
        std::fs::read_to_string(self.dir.join("admin.key"))
            .expect("admin.key")
            .trim()
            .to_string()
    }

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
        self.api()
            .await
            .admin()
            .issue_device_credential(IssueDeviceCredentialRequest {
                device_id: device_id.into(),
                groups: vec![],
                valid_days: 0,
            })
            .await
            .expect("IssueDeviceCredential")
            .into_inner()
            .credential
    }

    /// SDK configuration for `device_id` trusting the server's CA.
    pub fn client_config(&self, device_id: &str, credential: &str) -> ClientConfig {
        let mut c = ClientConfig::new(
            "127.0.0.1",
            self.device_addr.port(),
            device_id,
            credential,
            Trust::ca(self.ca_pem()),
        );
        c.server_name = SERVER_NAME.into();
        c
    }

    /// Send a text message; returns once the server stored it durably.
    pub async fn send(api: &ApiClient, device_id: &str, message_id: &str) {
        api.sender()
            .send_message(SendMessageRequest {
                target: Some(device_target(device_id)),
                title: format!("title {message_id}"),
                body: format!("body {message_id}"),
                message_id: message_id.into(),
                ..Default::default()
            })
            .await
            .expect("SendMessage");
    }

    pub async fn place_call(api: &ApiClient, device_id: &str, call_id: &str) -> PlaceCallResponse {
        api.sender()
            .place_call(PlaceCallRequest {
                call_id: call_id.into(),
                target: Some(device_target(device_id)),
                caller_name: "Ward 4B".into(),
                caller_handle: "4711".into(),
                video: false,
                ring_timeout_seconds: 30,
                escalation: Vec::new(),
            })
            .await
            .expect("PlaceCall")
            .into_inner()
    }

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

    /// (online, sdk sessions) as the server sees the device.
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

fn device_target(device_id: &str) -> Target {
    Target {
        kind: Some(target::Kind::DeviceId(device_id.into())),
    }
}

/// A server in this process: graceful shutdown and restart on the same directory and port.
pub struct InProcServer {
    pub info: ServerInfo,
    server: Option<Server>,
    hb: Heartbeat,
}

impl InProcServer {
    pub async fn start(dir: &Path, hb: Heartbeat) -> Self {
        let server = Server::start(server_config(dir, "127.0.0.1:0".parse().unwrap(), hb))
            .await
            .expect("server start");
        Self {
            info: ServerInfo {
                dir: dir.to_path_buf(),
                device_addr: server.device_addr,
                api_addr: server.api_addr,
            },
            server: Some(server),
            hb,
        }
    }

    /// `GET path` on the dashboard listener with the admin key as a bearer token (HTTP/1.1 over
    /// TLS, trusting the server's CA); the status and the body.
    pub async fn dashboard_get(&self, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.server.as_ref().expect("running").http_addr;
        let mut tls = push_server::pki::client_config(&self.info.ca_pem()).expect("CA");
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .expect("dashboard listener");
        let name = rustls::pki_types::ServerName::try_from(SERVER_NAME).unwrap();
        let mut stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(name, tcp)
            .await
            .expect("TLS");
        let request = format!(
            "GET {path} HTTP/1.1\r\nhost: {SERVER_NAME}\r\nauthorization: Bearer {}\r\nconnection: close\r\n\r\n",
            self.info.admin_key()
        );
        stream.write_all(request.as_bytes()).await.expect("request");
        let mut raw = Vec::new();
        // The server may close without close_notify: keep what was read.
        let _ = tokio::time::timeout(STEP, stream.read_to_end(&mut raw)).await;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
        (
            head.split_whitespace().nth(1).unwrap().parse().unwrap(),
            body.to_string(),
        )
    }

    /// Graceful shutdown: goodbye SERVER_SHUTDOWN to every device, store flushed.
    pub async fn shutdown(&mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().await;
        }
    }

    /// Start again on the same data directory and device port.
    pub async fn restart(&mut self) {
        self.shutdown().await;
        let server = Server::start(server_config(&self.info.dir, self.info.device_addr, self.hb))
            .await
            .expect("server restart");
        self.info.api_addr = server.api_addr;
        self.server = Some(server);
    }
}

/// A server in a child process (this test executable, see the module docs).
pub struct ChildServer {
    pub info: ServerInfo,
    child: Option<Child>,
    hb: Heartbeat,
}

impl ChildServer {
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
        .env(ENV_DIR, dir)
        .env(ENV_DEVICE_LISTEN, listen.to_string())
        .env(ENV_HB, format!("{},{}", hb.interval_ms, hb.timeout_ms))
        .env("RUST_LOG", "off")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn server child");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std_mpsc::channel();
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
    let dir = std::env::var(ENV_DIR).expect("only the tests run this");
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
        let server = Server::start(server_config(Path::new(&dir), listen, hb))
            .await
            .expect("server start");
        println!("{READY}{} {}", server.device_addr, server.api_addr);
        let stdin_closed = tokio::task::spawn_blocking(|| {
            let mut sink = String::new();
            while std::io::stdin().read_line(&mut sink).is_ok_and(|n| n > 0) {}
        });
        let _ = stdin_closed.await;
        server.shutdown().await;
    });
}

/// Records the SDK's events and lets a test wait for them.
pub struct Recorder {
    rx: mpsc::UnboundedReceiver<Event>,
    /// Every event seen so far, in order.
    pub seen: Vec<Event>,
}

struct Forward(mpsc::UnboundedSender<Event>);

impl EventHandler for Forward {
    fn on_event(&self, event: Event) {
        let _ = self.0.send(event);
    }
}

impl Recorder {
    pub fn new() -> (Arc<dyn EventHandler>, Self) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Arc::new(Forward(tx)), Self { rx, seen: Vec::new() })
    }

    /// Wait (at most `STEP`) for an event `f` picks, recording everything on the way.
    pub async fn wait_for<T>(&mut self, what: &str, mut f: impl FnMut(&Event) -> Option<T>) -> T {
        let wait = async {
            loop {
                let event = self.rx.recv().await.expect("handler dropped");
                let picked = f(&event);
                self.seen.push(event);
                if let Some(t) = picked {
                    return t;
                }
            }
        };
        match tokio::time::timeout(STEP, wait).await {
            Ok(t) => t,
            Err(_) => panic!("no {what} within {STEP:?}; seen: {:#?}", self.seen),
        }
    }

    pub async fn connected(&mut self) {
        self.wait_for("Connected", |e| {
            matches!(e, Event::State(mobile_sdk::core::State::Connected { .. })).then_some(())
        })
        .await
    }

    /// Events that arrive within `d` (for asserting that something does NOT happen).
    pub async fn quiet_for(&mut self, d: Duration) -> Vec<Event> {
        let mut got = Vec::new();
        let _ = tokio::time::timeout(d, async {
            while let Some(e) = self.rx.recv().await {
                got.push(e.clone());
                self.seen.push(e);
            }
        })
        .await;
        got
    }

    /// Ids of the messages seen so far, in order.
    pub fn message_ids(&self) -> Vec<String> {
        self.seen
            .iter()
            .filter_map(|e| match e {
                Event::Message(m) => Some(m.id.clone()),
                _ => None,
            })
            .collect()
    }
}
