//! Idle-session cost and login rate of the real server binary.
//!
//! Starts `push-server serve` (release build under `cargo bench`), registers N devices, then
//! opens authenticated TLS 1.3 sessions in stages and reads the server's resident memory
//! (VmRSS) after each stage. Prints the RSS per idle session and the logins per second.
//!
//! `cargo bench -p push-server --bench idle_sessions` (IDLE_SESSIONS=1000,5000,10000 by default;
//! one process may open at most ~19k sockets on the reference machine).

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use futures::{StreamExt, stream};
use push_proto::{device::Hello, sender::IssueDeviceCredentialRequest};
use push_server::{
    api_client::ApiClient,
    client::{ClientOptions, DeviceClient},
};

struct ServerProcess(Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("server is running");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS line");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::main]
async fn main() {
    let stages: Vec<usize> = std::env::var("IDLE_SESSIONS")
        .unwrap_or_else(|_| "1000,5000,10000".into())
        .split(',')
        .map(|s| s.trim().parse().expect("IDLE_SESSIONS is a list of counts"))
        .collect();
    let total = *stages.iter().max().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_push-server"))
        .args([
            "serve",
            "--device-listen",
            "127.0.0.1:0",
            "--api-listen",
            "127.0.0.1:0",
        ])
        .args(["--heartbeat-interval-ms", "600000"])
        .arg("--data-dir")
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("push-server binary");
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let server = ServerProcess(child);
    let pid = server.0.id();
    let ready = stdout
        .lines()
        .map(Result::unwrap)
        .find(|l| l.starts_with("push-server ready:"))
        .unwrap();
    let addr = |key: &str| -> std::net::SocketAddr {
        ready
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .unwrap()
            .parse()
            .unwrap()
    };
    let (device_addr, api_addr) = (addr("devices="), addr("api="));
    let ca = std::fs::read_to_string(dir.path().join("tls/ca.pem")).unwrap();
    let key = std::fs::read_to_string(dir.path().join("admin.key")).unwrap();
    let api = ApiClient::connect(api_addr, "localhost", &ca, key.trim())
        .await
        .unwrap();

    let credentials: Vec<String> = stream::iter(0..total)
        .map(|i| {
            let mut admin = api.admin();
            async move {
                let req = IssueDeviceCredentialRequest {
                    device_id: format!("dev-{i:05}"),
                    groups: vec![],
                    valid_days: 0,
                };
                admin
                    .issue_device_credential(req)
                    .await
                    .unwrap()
                    .into_inner()
                    .credential
            }
        })
        .buffered(128)
        .collect()
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let base = rss_kib(pid);
    println!("server RSS with {total} devices registered, no sessions: {base} KiB");
    println!(
        "{:>8} {:>14} {:>16} {:>14}",
        "sessions", "server RSS KiB", "KiB per session", "logins/s"
    );

    let mut clients: Vec<DeviceClient> = Vec::with_capacity(total);
    for &stage in &stages {
        let start = Instant::now();
        let batch: Vec<DeviceClient> = stream::iter(credentials[clients.len()..stage].iter().cloned())
            .map(|credential| {
                let ca = ca.clone();
                async move {
                    let hello = Hello {
                        credential,
                        sdk_version: "bench".into(),
                        ..Default::default()
                    };
                    let opts = ClientOptions {
                        addr: device_addr,
                        server_name: "localhost".into(),
                        ca_pem: ca,
                        hello,
                    };
                    DeviceClient::connect(opts).await.expect("session")
                }
            })
            .buffer_unordered(256)
            .collect()
            .await;
        let rate = batch.len() as f64 / start.elapsed().as_secs_f64();
        clients.extend(batch);
        // Let allocator and kernel settle before reading RSS.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss = rss_kib(pid);
        let per = (rss - base) as f64 / clients.len() as f64;
        println!("{:>8} {:>14} {:>16.2} {:>14.0}", clients.len(), rss, per, rate);
    }
}
