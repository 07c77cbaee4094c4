//! Shared by the benches: run the real server binary and connect devices to it.
#![allow(dead_code)] // each bench uses a subset

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
};

use futures::{StreamExt, stream};
use push_proto::{device::Hello, sender::IssueDeviceCredentialRequest};
use push_server::{
    api_client::ApiClient,
    client::{ClientOptions, DeviceClient},
};

/// The `push-server` binary, killed on drop.
pub struct ServerProcess {
    child: Child,
    pub device_addr: SocketAddr,
    pub api: ApiClient,
    pub ca: String,
    _dir: tempfile::TempDir,
}

impl ServerProcess {
    pub async fn start(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_push-server"))
            .args([
                "serve",
                "--device-listen",
                "127.0.0.1:0",
                "--api-listen",
                "127.0.0.1:0",
            ])
            .args(extra)
            .arg("--data-dir")
            .arg(dir.path())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("push-server binary");
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let ready = stdout
            .lines()
            .map(Result::unwrap)
            .find(|l| l.starts_with("push-server ready:"))
            .unwrap();
        let addr = |key: &str| -> SocketAddr {
            ready
                .split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .unwrap()
                .parse()
                .unwrap()
        };
        let ca = std::fs::read_to_string(dir.path().join("tls/ca.pem")).unwrap();
        let key = std::fs::read_to_string(dir.path().join("admin.key")).unwrap();
        let api = ApiClient::connect(addr("api="), "localhost", &ca, key.trim())
            .await
            .unwrap();
        Self {
            child,
            device_addr: addr("devices="),
            api,
            ca,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory of the server, KiB.
    pub fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("server is running");
        let line = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .expect("VmRSS line");
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// Register `n` devices named dev-00000.. and return their credentials.
    pub async fn register(&self, n: usize) -> Vec<String> {
        stream::iter(0..n)
            .map(|i| {
                let mut admin = self.api.admin();
                async move {
                    let req = IssueDeviceCredentialRequest {
                        device_id: device_id(i),
                        groups: vec!["all".into()],
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
            .await
    }

    /// Connect one device per credential, 256 handshakes in flight.
    pub async fn connect_all(&self, credentials: &[String]) -> Vec<DeviceClient> {
        stream::iter(credentials.iter().cloned())
            .map(|credential| {
                let opts = ClientOptions {
                    addr: self.device_addr,
                    server_name: "localhost".into(),
                    ca_pem: self.ca.clone(),
                    hello: Hello {
                        credential,
                        sdk_version: "bench".into(),
                        ..Default::default()
                    },
                };
                async move { DeviceClient::connect(opts).await.expect("session") }
            })
            .buffer_unordered(256)
            .collect()
            .await
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn device_id(i: usize) -> String {
    format!("dev-{i:05}")
}

/// p-th percentile (0..=100) of sorted samples.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx]
}
