//! The Mosquitto side: Debian's broker with TLS 1.3 (certificates made here, like the
//! push-server's), and simulated devices as rumqttc clients over rustls: MQTT 3.1.1, a
//! persistent session each (`clean_session = false`), one QoS 1 subscription to `d/<index>`.
//! Senders publish QoS 1 to a device's topic.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow, bail};
use rumqttc::{AsyncClient, Event, MqttOptions, NetworkOptions, Packet, QoS, TlsConfiguration, Transport};
use tokio::task::JoinHandle;

use testkit::process::{ChildProc, free_port};

use crate::{push::device_id, recorder::Recorder, tls};

/// Where Debian's package puts the broker.
pub const DEFAULT_MOSQUITTO: &str = "/usr/sbin/mosquitto";

/// Mosquitto, running on a free loopback port with its own configuration, certificates and
/// persistence file in a temporary directory; killed on drop.
pub struct Mosquitto {
    pub proc: ChildProc,
    pub addr: SocketAddr,
    pub ca: String,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    pub async fn start(bin: &Path) -> anyhow::Result<Self> {
        if !bin.exists() {
            bail!(
                "Mosquitto is not installed at {}: install Debian's broker with `apt-get install mosquitto` \
                 (or pass --mosquitto-bin PATH), or leave Mosquitto out with --systems push",
                bin.display()
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("push-loadgen-mosquitto")
            .tempdir()?;
        let certs = tls::broker_certs(dir.path())?;
        let port = free_port()?;
        let data = dir.path().join("data");
        std::fs::create_dir(&data)?;
        // SAFETY: plain syscall.
        let root = unsafe { libc::geteuid() } == 0;
        let conf = format!(
            "per_listener_settings false\n\
             allow_anonymous true\n\
             {user}\
             listener {port} 127.0.0.1\n\
             protocol mqtt\n\
             certfile {chain}\n\
             keyfile {key}\n\
             tls_version tlsv1.3\n\
             set_tcp_nodelay true\n\
             persistence true\n\
             persistence_location {data}/\n\
             autosave_interval 3600\n\
             max_keepalive 65535\n\
             max_queued_messages 1000\n\
             connection_messages false\n\
             log_dest stderr\n\
             log_type error\n\
             log_type warning\n",
            // As root it would switch to the `mosquitto` user, which cannot read our files.
            user = if root { "user root\n" } else { "" },
            chain = certs.chain_file.display(),
            key = certs.key_file.display(),
            data = data.display(),
        );
        let conf_file = dir.path().join("mosquitto.conf");
        std::fs::write(&conf_file, conf)?;
        let mut cmd = Command::new(bin);
        cmd.arg("-c")
            .arg(&conf_file)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let log = dir.path().join("mosquitto.log");
        let mut proc = ChildProc::spawn("mosquitto", cmd, Some(&log))?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            proc.check_alive()?;
            if Instant::now() > deadline {
                bail!(
                    "mosquitto does not listen on {addr} after 10 s; {}",
                    proc.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Self {
            proc,
            addr,
            ca: certs.ca_pem,
            _dir: dir,
        })
    }

    pub fn data_dir(&self) -> PathBuf {
        self._dir.path().to_path_buf()
    }
}

/// Topic of device `i`.
pub fn topic(i: usize) -> String {
    format!("d/{i:05}")
}

fn options(
    id: String,
    addr: SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
    keep_alive: Duration,
) -> MqttOptions {
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(keep_alive)
        .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls.clone())));
    o
}

fn network() -> NetworkOptions {
    let mut n = NetworkOptions::new();
    // Like the SDK and the push-server: no Nagle delay on small frames.
    n.set_tcp_nodelay(true);
    n.set_connection_timeout(10);
    n
}

struct MqttDevice {
    _client: AsyncClient,
    task: JoinHandle<()>,
}

/// Simulated MQTT devices of this process.
pub struct MqttFleet {
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    keep_alive: Duration,
    devices: Vec<MqttDevice>,
    pub rec: Arc<Recorder>,
}

impl MqttFleet {
    pub fn new(addr: SocketAddr, ca: &str, keep_alive: Duration) -> anyhow::Result<Self> {
        Ok(Self {
            addr,
            tls: Arc::new(tls::client_config(ca, &[])?),
            keep_alive,
            devices: Vec::new(),
            rec: Arc::default(),
        })
    }

    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    fn spawn(&self, index: usize) -> MqttDevice {
        let mut opts = options(device_id(index), self.addr, &self.tls, self.keep_alive);
        opts.set_clean_session(false);
        let (client, mut eventloop) = AsyncClient::new(opts, 8);
        eventloop.set_network_options(network());
        let (sub, rec) = (client.clone(), self.rec.clone());
        let task = tokio::spawn(async move {
            let online = AtomicBool::new(false);
            let topic = topic(index);
            loop {
                match eventloop.poll().await {
                    // A session the broker kept has the subscription already.
                    Ok(Event::Incoming(Packet::ConnAck(ack))) if ack.session_present => {
                        if !online.swap(true, Ordering::AcqRel) {
                            rec.up();
                        }
                    }
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = sub.try_subscribe(topic.clone(), QoS::AtLeastOnce);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if !online.swap(true, Ordering::AcqRel) {
                            rec.up();
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if let Some(k) = p.payload.get(..8) {
                            rec.arrive(u64::from_le_bytes(k.try_into().expect("8 bytes")) as usize, index);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if online.swap(false, Ordering::AcqRel) {
                            rec.down();
                        }
                        tracing::debug!(device = index, error = %e, "MQTT connection failed");
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                }
            }
        });
        MqttDevice {
            _client: client,
            task,
        }
    }

    /// Connect and subscribe devices `indices`, at most `window` being set up at a time;
    /// returns once all are subscribed.
    pub async fn start_paced(
        &mut self,
        indices: std::ops::Range<usize>,
        window: usize,
        timeout: Duration,
    ) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let deadline = started + timeout;
        let target = self.rec.online() + indices.len();
        for (launched, i) in (self.rec.online()..).zip(indices) {
            while launched.saturating_sub(self.rec.online()) >= window {
                if Instant::now() > deadline {
                    bail!(
                        "{} of {target} MQTT sessions after {timeout:?}",
                        self.rec.online()
                    );
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let device = self.spawn(i);
            self.devices.push(device);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        (self.rec.wait_online(left, |online| online >= target).await)
            .map_err(|online| anyhow!("{online} of {target} MQTT sessions after {timeout:?}"))?;
        Ok(started.elapsed())
    }
}

impl Drop for MqttFleet {
    fn drop(&mut self) {
        for d in &self.devices {
            d.task.abort();
        }
    }
}

/// One publishing connection (QoS 1), like one sender on the push-server's API.
pub struct MqttPublisher {
    client: AsyncClient,
    task: JoinHandle<()>,
    payload_pad: Vec<u8>,
}

impl MqttPublisher {
    pub async fn connect(addr: SocketAddr, ca: &str, payload: usize) -> anyhow::Result<Self> {
        let tls = Arc::new(tls::client_config(ca, &[])?);
        let mut opts = options("loadgen-publisher".into(), addr, &tls, Duration::from_secs(30));
        opts.set_clean_session(true).set_inflight(1000);
        let (client, mut eventloop) = AsyncClient::new(opts, 16 * 1024);
        eventloop.set_network_options(network());
        let (ready_tx, ready) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut ready_tx = Some(ready_tx);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if let Some(tx) = ready_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "MQTT publisher connection failed");
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready)
            .await
            .context("MQTT publisher did not connect within 10 s")??;
        Ok(Self {
            client,
            task,
            payload_pad: vec![b'x'; payload.saturating_sub(8)],
        })
    }

    /// Publish message number `k` to device `device` (QoS 1).
    pub async fn publish(&self, k: usize, device: usize) -> anyhow::Result<()> {
        let mut payload = Vec::with_capacity(8 + self.payload_pad.len());
        payload.extend_from_slice(&(k as u64).to_le_bytes());
        payload.extend_from_slice(&self.payload_pad);
        self.client
            .publish(topic(device), QoS::AtLeastOnce, false, payload)
            .await?;
        Ok(())
    }
}

impl Drop for MqttPublisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}
