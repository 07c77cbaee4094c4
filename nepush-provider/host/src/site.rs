//! The server side of a scenario: the real `push-server` binary in a temporary data directory
//! (through the `e2e` crate's [`ServerProcess`]), optionally the real `apns-bridge` binary with
//! its fake APNs, the sender/admin API, and a watch on the server's presence events.
//!
//! The presence stream (`WatchPresence`) is how the host sees server sessions: every login of
//! the device is an `online` event with the server's session id, every end of the device's
//! current session an `offline` event with the reason. A login while the device is already
//! online means the server replaced a session: allowed only when the phone had already given
//! that session up (its process was killed, or its network vanished under it); if the phone
//! still held it, two sessions of one device were alive at once, which is a failure.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use e2e::{ApiClient, BridgeProcess, ServerProcess};
use push_proto::sender::{EnrollDeviceRequest, PresenceEvent, WatchPresenceRequest};
use tokio::{sync::watch, task::JoinHandle};

use crate::scenario::ServerSettings;

/// Offline events kept in the log.
pub const RECENT: usize = 64;

/// The server sessions the phone holds right now: per provider instance, the session id of
/// its `Connected` state, until the instance reports another state or its process dies.
#[derive(Debug, Default)]
pub struct HeldSessions(Mutex<HashMap<u32, String>>);

impl HeldSessions {
    /// Instance `instance` now holds `session` (`None`: nothing).
    pub fn set(&self, instance: u32, session: Option<String>) {
        let mut m = self.0.lock().expect("poisoned");
        match session {
            Some(s) => m.insert(instance, s),
            None => m.remove(&instance),
        };
    }

    /// Whether any instance holds `session`.
    pub fn holds(&self, session: &str) -> bool {
        self.0.lock().expect("poisoned").values().any(|s| s == session)
    }

    /// How many sessions the phone holds.
    pub fn count(&self) -> usize {
        self.0.lock().expect("poisoned").len()
    }
}

/// Server sessions of the device as seen through presence events.
#[derive(Debug, Default)]
pub struct PresenceLog {
    /// The device's current server session (id), if online.
    pub online: HashMap<String, String>,
    /// `online` events.
    pub logins: u64,
    /// `offline` events.
    pub offline_count: u64,
    /// The latest `offline` events (at most [`RECENT`]), in order: (device, session id, reason,
    /// when received). Bounded, so a long run's memory figures measure the phone, not the log.
    pub offline: std::collections::VecDeque<(String, String, String, Instant)>,
    /// Logins that replaced a session the phone had already given up.
    pub replaced_dead: u64,
    /// Logins that replaced a session the phone still held: two live sessions at once.
    pub replaced_live: Vec<String>,
    /// Most server sessions of one device alive at once, as the events tell.
    pub max_sessions: usize,
    /// Set when the stream failed (lagged, ended): the log is incomplete from then on.
    pub broken: Option<String>,
}

/// The presence log and a version number that moves on every event (to wait on).
pub struct Presence {
    log: Mutex<PresenceLog>,
    version: watch::Sender<u64>,
}

impl Presence {
    /// Read the log.
    pub fn with<T>(&self, f: impl FnOnce(&PresenceLog) -> T) -> T {
        f(&self.log.lock().expect("poisoned"))
    }

    /// Wait until `pred` holds on the log, at most `timeout`. Returns whether it did.
    pub async fn wait(&self, timeout: Duration, pred: impl Fn(&PresenceLog) -> bool) -> bool {
        let mut rx = self.version.subscribe();
        let wait = async {
            loop {
                if self.with(&pred) {
                    return;
                }
                if rx.changed().await.is_err() {
                    return std::future::pending().await;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }

    fn record(&self, e: PresenceEvent, held: &HeldSessions) {
        let now = Instant::now();
        {
            let mut log = self.log.lock().expect("poisoned");
            if e.online {
                log.logins += 1;
                if let Some(old) = log.online.insert(e.device_id.clone(), e.session_id.clone()) {
                    // The server replaced `old` (it announces no offline for a replaced one).
                    if held.holds(&old) {
                        log.replaced_live.push(format!(
                            "server session {} of {} was replaced by {} while the phone still held it",
                            old, e.device_id, e.session_id
                        ));
                        log.max_sessions = log.max_sessions.max(2);
                    } else {
                        log.replaced_dead += 1;
                    }
                }
                log.max_sessions = log.max_sessions.max(1);
            } else {
                if log.online.get(&e.device_id) == Some(&e.session_id) {
                    log.online.remove(&e.device_id);
                }
                log.offline_count += 1;
                if log.offline.len() == RECENT {
                    log.offline.pop_front();
                }
                log.offline.push_back((e.device_id, e.session_id, e.reason, now));
            }
        }
        self.version.send_modify(|v| *v += 1);
    }

    fn broken(&self, why: String) {
        self.log.lock().expect("poisoned").broken.get_or_insert(why);
        self.version.send_modify(|v| *v += 1);
    }
}

/// The push-server and what the host needs around it.
pub struct Site {
    /// The server process.
    pub server: ServerProcess,
    /// The fake APNs behind `apns-bridge serve --fake-apns`, when the scenario asks for it.
    bridge: Option<BridgeProcess>,
    /// The sender/admin API (admin key).
    pub api: ApiClient,
    /// Server sessions seen through presence events.
    pub presence: Arc<Presence>,
    watcher: JoinHandle<()>,
    /// The settings it was started with.
    pub settings: ServerSettings,
    /// The server's simulated time (`--test-clock-file`): how far its clock runs ahead.
    clock_file: std::path::PathBuf,
    clock_offset: Duration,
    _dir: tempfile::TempDir,
}

impl Drop for Site {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

impl Site {
    /// Start the bridge (if asked) and the server, with the site's SSIDs and the address
    /// phones dial (`device_host:device_port`, the Wi-Fi relay) in its `[site]` section, and
    /// watch presence. `held` is the set of server session ids the phone currently holds.
    pub async fn start(
        settings: &ServerSettings,
        site_ssids: &[String],
        dial: SocketAddr,
        held: Arc<HeldSessions>,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let bridge = if settings.apns_fallback {
            Some(BridgeProcess::start(dir.path(), &[]).map_err(anyhow::Error::msg)?)
        } else {
            None
        };
        let config = dir.path().join("push-server.toml");
        let quoted: Vec<String> = site_ssids.iter().map(|s| toml_string(s)).collect();
        // The scenarios compress hours of iOS lifecycle into seconds, so one simulated phone logs
        // in (through one relay address) far faster than a real one may: lift the per-device
        // login rate and the per-address handshake rate, which would otherwise take the
        // simulation for a crash loop.
        let mut text = format!(
            "[limits]\ncall_ack_window_ms = {}\ndevice_logins_per_minute = 1000000\ndevice_login_burst = 1000000\n\n[limits.device_handshakes]\nper_sec_per_ip = 1000000\nburst_per_ip = 1000000\n\n[site]\nssids = [{}]\ndevice_host = \"{}\"\ndevice_port = {}\n",
            settings.call_ack_window_ms,
            quoted.join(", "),
            dial.ip(),
            dial.port()
        );
        if let Some(b) = &bridge {
            text.push('\n');
            text.push_str(&b.apns_config());
        }
        std::fs::write(&config, text)?;
        let config = config.display().to_string();
        let interval = format!("--heartbeat-interval-ms={}", settings.heartbeat_interval_ms);
        let timeout = format!("--heartbeat-timeout-ms={}", settings.heartbeat_timeout_ms);
        let data = dir.path().join("data");
        let clock_file = dir.path().join("clock");
        let clock_arg = clock_file.display().to_string();
        // ServerProcess::start blocks while the server boots.
        let server = tokio::task::spawn_blocking(move || {
            ServerProcess::start(
                &data,
                &[
                    "--config",
                    &config,
                    &interval,
                    &timeout,
                    "--test-clock-file",
                    &clock_arg,
                ],
            )
        })
        .await
        .context("push-server did not start")?;
        let api = ApiClient::connect(
            server.api_addr,
            e2e::SERVER_NAME,
            &server.ca_pem(),
            &server.admin_key(),
        )
        .await
        .context("API")?;
        let presence = Arc::new(Presence {
            log: Mutex::new(PresenceLog::default()),
            version: watch::channel(0).0,
        });
        // Subscribed once this returns: no login of the phone can be missed.
        let mut stream = api
            .sender()
            .watch_presence(WatchPresenceRequest {})
            .await
            .context("WatchPresence")?
            .into_inner();
        let p = presence.clone();
        let watcher = tokio::spawn(async move {
            loop {
                match stream.message().await {
                    Ok(Some(e)) => p.record(e, &held),
                    Ok(None) => return p.broken("presence stream ended".into()),
                    Err(status) => return p.broken(format!("presence stream failed: {status}")),
                }
            }
        });
        Ok(Self {
            server,
            bridge,
            api,
            presence,
            watcher,
            settings: settings.clone(),
            clock_file,
            clock_offset: Duration::ZERO,
            _dir: dir,
        })
    }

    /// Simulated time passes on the server: its clock jumps `d` ahead, and everything then due
    /// (ring deadlines, expiry, ack windows) fires. Returns once its hub reads the new time.
    pub async fn advance_clock(&mut self, d: Duration) -> Result<(), String> {
        if d.is_zero() {
            return Ok(());
        }
        self.clock_offset += d;
        let offset = i64::try_from(self.clock_offset.as_millis()).unwrap_or(i64::MAX);
        tokio::task::block_in_place(|| {
            self.server
                .set_clock_offset(&self.clock_file, offset, crate::phone::STEP_TIMEOUT)
        })
    }

    /// Enroll the device as a container app does: the answer's `plist` (XML), as
    /// `PropertyListSerialization` would read it.
    pub async fn enroll(&self, device_id: &str) -> anyhow::Result<plist::Dictionary> {
        let enrollment = self
            .api
            .admin()
            .enroll_device(EnrollDeviceRequest {
                device_id: device_id.into(),
                ..Default::default()
            })
            .await
            .context("EnrollDevice")?
            .into_inner();
        let root = plist::Value::from_reader_xml(enrollment.plist.as_bytes())
            .context("the enrollment plist does not parse")?;
        root.into_dictionary()
            .context("the enrollment plist is not a dictionary")
    }

    /// Wait for the fake APNs to receive a request containing `needle`.
    pub async fn wait_apns_request(&self, needle: &str, timeout: Duration) -> Result<String, String> {
        let Some(bridge) = &self.bridge else {
            return Err("the scenario runs no APNs bridge ([server] apns_fallback = true)".into());
        };
        let needle = format!("call={needle} ");
        tokio::task::block_in_place(|| {
            let deadline = Instant::now() + timeout;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                let line = bridge.next_request(left)?;
                if line.contains(&needle) {
                    return Ok(line);
                }
            }
        })
    }
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}
