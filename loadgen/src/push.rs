//! The push-server side: the release binary in a temporary data directory, its gRPC API, and a
//! fleet of simulated devices, each a real `mobile_sdk::Client` (tokio-rustls driver, sans-IO
//! core, lifecycle registry) bound to its own source address in 127.0.0.0/8.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow, bail};
use futures::{StreamExt, stream};
use mobile_sdk::{
    Client, ClientConfig, EventHandler, Registry, Trust,
    core::{BackoffConfig, Event, State, StopReason},
};
use push_proto::sender::{IssueDeviceCredentialRequest, Target, target};
use push_server::api_client::ApiClient;

use testkit::{
    harness::https,
    launcher::{Launch, ServerProcess},
    process::ChildProc,
};

use crate::recorder::{CallSeen, Recorder, parse_tag};

/// Name in the server's certificate that clients verify.
pub const SERVER_NAME: &str = "localhost";
/// The group every registered device joins (fan-out target).
pub const GROUP: &str = "all";

/// How to reach a running push-server.
#[derive(Clone)]
pub struct PushTarget {
    pub device_addr: SocketAddr,
    pub api_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub api: ApiClient,
    pub ca: String,
    pub api_key: String,
}

/// The `push-server` binary, running in a temporary data directory; killed on drop.
pub struct PushServer {
    pub process: ServerProcess,
    pub target: PushTarget,
    _dir: tempfile::TempDir,
}

impl PushServer {
    /// Start `bin serve` on free loopback ports with `extra` arguments; returns once it is ready
    /// and its API answers.
    pub async fn start(bin: &Path, extra: &[String]) -> anyhow::Result<Self> {
        Self::start_from(bin, extra, None).await
    }

    /// Like [`PushServer::start`], in a data directory that starts as a copy of `template`
    /// (another cluster node's: the same CA and keys).
    pub async fn start_from(bin: &Path, extra: &[String], template: Option<&Path>) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("push-loadgen-server").tempdir()?;
        if let Some(from) = template {
            testkit::redis::copy_dir(from, dir.path())?;
        }
        // One API key sends every message of a run, and one machine's phones log in at once:
        // the per-key request rate and the per-device login rate, which guard a site against a
        // runaway client, are lifted so they do not cap what is measured.
        let config = dir.path().join("loadgen.toml");
        std::fs::write(
            &config,
            "[limits]\napi_requests_per_sec_per_key = 1000000\napi_request_burst_per_key = 1000000\n",
        )?;
        let launch = Launch {
            bin: Some(bin.to_path_buf()),
            args: [extra, &["--config".into(), config.display().to_string()]].concat(),
            env: vec![("RUST_LOG".into(), "warn".into())],
            test_heartbeats: false,
            ready_timeout: Duration::from_secs(30),
        };
        let proc = ServerProcess::launch(dir.path(), launch).map_err(anyhow::Error::msg)?;
        let ca = std::fs::read_to_string(dir.path().join("tls/ca.pem"))?;
        let api_key = std::fs::read_to_string(dir.path().join("admin.key"))?
            .trim()
            .to_string();
        let api = ApiClient::connect(proc.api_addr, SERVER_NAME, &ca, &api_key).await?;
        let target = PushTarget {
            device_addr: proc.device_addr,
            api_addr: proc.api_addr,
            http_addr: proc.http_addr,
            api,
            ca,
            api_key,
        };
        Ok(Self {
            process: proc,
            target,
            _dir: dir,
        })
    }

    /// Kill the server at once (`SIGKILL`: a crash or a pulled plug; no goodbye to anyone).
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Start the server again in its data directory on the same addresses (after [`Self::kill`]);
    /// returns when it reported ready, once its API answers.
    pub async fn restart(&mut self) -> anyhow::Result<Instant> {
        self.process.restart_in_place().map_err(anyhow::Error::msg)?;
        let ready = Instant::now();
        let t = &self.target;
        self.target.api = ApiClient::connect(t.api_addr, SERVER_NAME, &t.ca, &t.api_key).await?;
        Ok(ready)
    }

    /// The server process (its pid, CPU time, memory, log tail).
    pub fn proc(&self) -> &ChildProc {
        self.process.proc()
    }

    pub fn data_dir(&self) -> PathBuf {
        self._dir.path().to_path_buf()
    }
}

impl PushTarget {
    /// Register devices `dev-00000..` (in group [`GROUP`]) and return their credentials.
    pub async fn register(&self, n: usize) -> anyhow::Result<Vec<String>> {
        stream::iter(0..n)
            .map(|i| {
                let mut admin = self.api.admin();
                async move {
                    let req = IssueDeviceCredentialRequest {
                        device_id: device_id(i),
                        groups: vec![GROUP.into()],
                        valid_days: 0,
                    };
                    Ok(admin.issue_device_credential(req).await?.into_inner().credential)
                }
            })
            .buffered(64)
            .collect::<Vec<anyhow::Result<String>>>()
            .await
            .into_iter()
            .collect()
    }

    /// Sum of the samples of Prometheus metric `name` whose labels contain `label` ("" for any).
    pub async fn metric(&self, name: &str, label: &str) -> anyhow::Result<f64> {
        let bearer = format!("Bearer {}", self.api_key);
        let (status, head, text) = https(
            self.http_addr,
            &self.ca,
            "GET",
            "/metrics",
            &[("authorization", &bearer)],
            "",
        )
        .await;
        if status != 200 {
            bail!("GET /metrics: {}", head.lines().next().unwrap_or("no response"));
        }
        Ok(text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.split([' ', '{']).next() == Some(name) && (label.is_empty() || l.contains(label)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }
}

/// `dev-00042`.
pub fn device_id(i: usize) -> String {
    format!("dev-{i:05}")
}

/// A target naming one device.
pub fn to_device(i: usize) -> Option<Target> {
    Some(Target {
        kind: Some(target::Kind::DeviceId(device_id(i))),
    })
}

/// A target naming the group of every registered device.
pub fn to_group() -> Option<Target> {
    Some(Target {
        kind: Some(target::Kind::Group(GROUP.into())),
    })
}

/// Source address of device `i`: 200 devices per address in 127.2.0.0/16, so no address runs
/// out of ephemeral ports, whatever the reconnect storm leaves in TIME_WAIT.
pub fn source_addr(i: usize) -> IpAddr {
    let block = i / 200;
    IpAddr::V4(Ipv4Addr::new(
        127,
        2,
        (block / 250) as u8,
        (block % 250 + 1) as u8,
    ))
}

/// One simulated device's view: forwards what the app would see to the recorder.
struct Probe {
    /// The device's index (`dev-00042` is 42).
    index: usize,
    online: AtomicBool,
    rec: Arc<Recorder>,
}

impl EventHandler for Probe {
    fn on_event(&self, event: Event) {
        match event {
            Event::State(State::Connected { .. }) => {
                if !self.online.swap(true, Ordering::AcqRel) {
                    self.rec.up();
                }
            }
            Event::State(_) => {
                if self.online.swap(false, Ordering::AcqRel) {
                    self.rec.down();
                }
            }
            Event::Message(m) => {
                if let Some(k) = parse_tag(&m.title, 'm') {
                    self.rec.arrive(k, self.index);
                }
            }
            Event::CallInvite(c) => {
                if let Some(k) = parse_tag(&c.call_id, 'c') {
                    self.rec.arrive(k, self.index);
                    self.rec.call_event(k, self.index, CallSeen::Invite);
                }
            }
            Event::CallCancel(c) => {
                if let Some(k) = parse_tag(&c.call_id, 'c') {
                    self.rec.call_event(k, self.index, CallSeen::Cancel(c.reason));
                }
            }
            Event::CallOutcomeReplied(r) => {
                if let Some(k) = parse_tag(&r.call_id, 'c') {
                    self.rec
                        .call_event(k, self.index, CallSeen::Reply(r.outcome, r.result));
                }
            }
            Event::LastSeenSeq(_) => {}
        }
    }
}

struct Device {
    index: usize,
    credential: String,
    client: Client,
}

/// Simulated devices of this process, all on one SDK registry (as one process would be).
pub struct Fleet {
    registry: Registry,
    /// The SDK's reconnection backoff for clients made from now on (the SDK's default unless set).
    pub backoff: BackoffConfig,
    devices: Vec<Device>,
    device_addr: SocketAddr,
    ca: String,
    pub rec: Arc<Recorder>,
}

impl Fleet {
    pub fn new(device_addr: SocketAddr, ca: &str) -> Self {
        Self {
            registry: Registry::new(tokio::runtime::Handle::current()),
            backoff: BackoffConfig::default(),
            devices: Vec::new(),
            device_addr,
            ca: ca.into(),
            rec: Arc::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    fn client(&self, index: usize, credential: &str) -> anyhow::Result<Client> {
        let mut config = ClientConfig::new(
            self.device_addr.ip().to_string(),
            self.device_addr.port(),
            device_id(index),
            credential,
            Trust::ca(self.ca.clone()),
        );
        config.server_name = SERVER_NAME.into();
        config.local_addr = Some(source_addr(index));
        config.jitter_seed = Some(index as u64);
        config.backoff = self.backoff;
        let probe = Arc::new(Probe {
            index,
            online: AtomicBool::new(false),
            rec: self.rec.clone(),
        });
        Ok(self.registry.client(config, probe)?)
    }

    /// Add devices (not started) with these indices and credentials.
    pub fn add(&mut self, devices: impl IntoIterator<Item = (usize, String)>) -> anyhow::Result<()> {
        for (index, credential) in devices {
            let client = self.client(index, &credential)?;
            self.devices.push(Device {
                index,
                credential,
                client,
            });
        }
        Ok(())
    }

    /// Start the devices in `range` (positions in this fleet) with at most `window` sessions
    /// being established at a time; returns once all are online.
    pub async fn start_paced(
        &self,
        range: std::ops::Range<usize>,
        window: usize,
        timeout: Duration,
    ) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let target = self.rec.online() + range.len();
        let deadline = started + timeout;
        for (launched, d) in (self.rec.online()..).zip(&self.devices[range]) {
            while launched.saturating_sub(self.rec.online()) >= window {
                if Instant::now() > deadline {
                    bail!("{} of {target} sessions after {timeout:?}", self.rec.online());
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            d.client.start().await?;
        }
        self.wait_online(target, deadline.saturating_duration_since(Instant::now()))
            .await?;
        Ok(started.elapsed())
    }

    /// Start every device at once (a reconnect storm); returns once all are online.
    pub async fn start_all_at_once(&self, timeout: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let starts = self.devices.iter().map(|d| {
            let client = d.client.clone();
            tokio::spawn(async move { client.start().await })
        });
        for r in futures::future::join_all(starts.collect::<Vec<_>>()).await {
            r??;
        }
        self.wait_online(self.devices.len(), timeout).await?;
        Ok(started.elapsed())
    }

    /// Stop every device (goodbye, close), concurrently; returns once all are released.
    pub async fn stop_all(&self) {
        let stops = self.devices.iter().map(|d| {
            let client = d.client.clone();
            tokio::spawn(async move { client.stop(StopReason::NetworkChange).await })
        });
        futures::future::join_all(stops.collect::<Vec<_>>()).await;
    }

    /// Replace every client by a new one (a new provider process: no TLS session tickets).
    pub fn renew_clients(&mut self) -> anyhow::Result<()> {
        let renewed = self
            .devices
            .iter()
            .map(|d| self.client(d.index, &d.credential))
            .collect::<anyhow::Result<Vec<_>>>()?;
        for (d, client) in self.devices.iter_mut().zip(renewed) {
            d.client = client;
        }
        Ok(())
    }

    /// Device at `position` in this fleet reports what the user did with a call (the app
    /// hands it to the extension; the SDK sends it on the live session).
    pub fn report_call_outcome(
        &self,
        position: usize,
        call_id: &str,
        outcome: mobile_sdk::core::CallOutcome,
        at_ms: i64,
    ) -> anyhow::Result<()> {
        let d = self.devices.get(position).context("no device at that position")?;
        Ok(d.client.report_call_outcome(call_id.into(), outcome, at_ms)?)
    }

    /// Wait until no device is online.
    pub async fn wait_all_offline(&self, timeout: Duration) -> anyhow::Result<()> {
        (self.rec.wait_online(timeout, |online| online == 0).await)
            .map_err(|online| anyhow!("{online} devices still online after {timeout:?}"))
    }

    /// Wait until `n` devices are online.
    pub async fn wait_online(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        (self.rec.wait_online(timeout, |online| online >= n).await)
            .map_err(|online| anyhow!("only {online} of {n} devices online after {timeout:?}"))
    }
}
