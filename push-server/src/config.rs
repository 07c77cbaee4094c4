//! Configuration: defaults, then a TOML file, then environment variables and flags (those two
//! merged by clap into [`ConfigArgs`] and [`ServeArgs`], which lay them over the file). Every limit
//! lives in [`Limits`], so the hostile-input pass and operators tune one place.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use serde::Deserialize;

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// File path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema (the message names the line and key).
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// File path.
        path: PathBuf,
        /// Parser message.
        message: String,
    },
    /// Values that parse but cannot work together.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Server configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the store, keys and certificates live.
    pub data_dir: PathBuf,
    /// Address devices connect to (TLS, device protocol).
    pub device_listen: SocketAddr,
    /// Address of the gRPC sender/admin API (TLS).
    pub api_listen: SocketAddr,
    /// Address of the ops dashboard and the Prometheus `/metrics` endpoint (HTTPS, same
    /// certificate as the other listeners).
    pub http_listen: SocketAddr,
    /// This node's name in the dashboard and logs (default: the host name).
    pub node_name: String,
    /// Host names and IPs devices and senders use to reach this server; they go into the
    /// certificate's subjectAltName (localhost and loopback are always added).
    pub server_names: Vec<String>,
    /// How often the server sends a heartbeat.
    pub heartbeat_interval_ms: u64,
    /// How long a device has to answer a heartbeat before it is marked offline.
    pub heartbeat_timeout_ms: u64,
    /// Resource limits.
    pub limits: Limits,
    /// The APNs VoIP fallback for calls.
    pub apns: ApnsConfig,
    /// What enrolled phones are told: the site's SSIDs and how to reach this server.
    pub site: SiteConfig,
    /// Cluster mode: several nodes sharing state through Redis.
    pub cluster: ClusterConfig,
    /// Simulated time for the lifecycle host (`serve --test-clock-file`, hidden): the hub's
    /// clock runs this file's offset (ms) ahead of the wall clock, re-read on SIGUSR2. Not a
    /// configuration-file key, so no configuration can turn it on.
    #[serde(skip)]
    pub test_clock_file: Option<PathBuf>,
}

/// Where the configuration comes from, for `serve` and `doctor`: the file, then the flags given
/// (each with its environment variable; clap prefers the flag).
#[derive(Debug, clap::Args)]
pub struct ConfigArgs {
    /// TOML configuration file; flags and environment variables override it.
    #[arg(long, env = "PUSH_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory (store, keys, certificates).
    #[arg(long, env = "PUSH_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Device listener address.
    #[arg(long, env = "PUSH_DEVICE_LISTEN")]
    pub device_listen: Option<SocketAddr>,
    /// gRPC API listener address.
    #[arg(long, env = "PUSH_API_LISTEN")]
    pub api_listen: Option<SocketAddr>,
}

impl ConfigArgs {
    /// The file's configuration (the defaults without one) under the flags given, unchecked.
    pub fn read(&self) -> Result<Config, ConfigError> {
        let mut cfg = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        set(&mut cfg.data_dir, self.data_dir.clone());
        set(&mut cfg.device_listen, self.device_listen);
        set(&mut cfg.api_listen, self.api_listen);
        Ok(cfg)
    }
}

/// The flags of `push-server serve`: [`ConfigArgs`] and the ones only the server reads.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// The flags `doctor` reads too.
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Dashboard and /metrics listener address (HTTPS).
    #[arg(long, env = "PUSH_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// This node's name in the dashboard (default: the host name).
    #[arg(long, env = "PUSH_NODE_NAME")]
    pub node_name: Option<String>,
    /// Host name or IP devices use to reach the server (repeatable; goes into the certificate).
    #[arg(long = "server-name", env = "PUSH_SERVER_NAMES", value_delimiter = ',')]
    pub server_names: Vec<String>,
    /// Heartbeat interval in milliseconds.
    #[arg(long, env = "PUSH_HEARTBEAT_INTERVAL_MS")]
    pub heartbeat_interval_ms: Option<u64>,
    /// Heartbeat answer deadline in milliseconds.
    #[arg(long, env = "PUSH_HEARTBEAT_TIMEOUT_MS")]
    pub heartbeat_timeout_ms: Option<u64>,
    /// Simulated time, for the lifecycle host only: the hub's clock runs this file's offset
    /// (ms) ahead of the wall clock, re-read on SIGUSR2. Hidden: no deployment sets it.
    #[arg(long, hide = true)]
    pub test_clock_file: Option<PathBuf>,
    /// Cluster mode: the Redis every node shares (`redis://host:port/db`, `rediss://` for TLS,
    /// `redis+sentinel://host:port[,host:port...]/master_name[/db]` through Sentinel); each node
    /// needs its own --node-name.
    #[arg(long, env = "PUSH_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// PEM CA certificate to verify Redis with (`rediss`), instead of the system's.
    #[arg(long, env = "PUSH_REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,
    /// PEM client certificate for Redis (with --redis-client-key-file).
    #[arg(long, env = "PUSH_REDIS_CLIENT_CERT_FILE")]
    pub redis_client_cert_file: Option<PathBuf>,
    /// PEM private key of --redis-client-cert-file.
    #[arg(long, env = "PUSH_REDIS_CLIENT_KEY_FILE")]
    pub redis_client_key_file: Option<PathBuf>,
}

impl ServeArgs {
    /// The configuration to serve: [`ConfigArgs::read`] under the other flags given, checked
    /// (naming the file, if any, in the error).
    pub fn load(self) -> anyhow::Result<Config> {
        let mut cfg = self.config.read()?;
        set(&mut cfg.http_listen, self.http_listen);
        set(&mut cfg.node_name, self.node_name);
        set(
            &mut cfg.server_names,
            Some(self.server_names).filter(|n| !n.is_empty()),
        );
        set(&mut cfg.heartbeat_interval_ms, self.heartbeat_interval_ms);
        set(&mut cfg.heartbeat_timeout_ms, self.heartbeat_timeout_ms);
        cfg.test_clock_file = self.test_clock_file;
        let cluster = &mut cfg.cluster;
        set(&mut cluster.redis_url, self.redis_url);
        set(&mut cluster.redis_ca_file, self.redis_ca_file.map(Some));
        set(
            &mut cluster.redis_client_cert_file,
            self.redis_client_cert_file.map(Some),
        );
        set(
            &mut cluster.redis_client_key_file,
            self.redis_client_key_file.map(Some),
        );
        if let Some(path) = &self.config.config {
            cfg.validate()
                .with_context(|| format!("in config file {}", path.display()))?;
        }
        Ok(cfg)
    }
}

/// A flag given overrides the configuration's value.
fn set<T>(slot: &mut T, flag: Option<T>) {
    if let Some(v) = flag {
        *slot = v;
    }
}

/// `[cluster]`: empty (the default) runs one node on the embedded store.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// `redis://host:port/db`: this node keeps devices, queues, receipts and keys in Redis and
    /// shares them with every node configured with the same URL. Each node needs its own
    /// `node_name`, and all of them the same CA and device-credential key in their data
    /// directories (see README, "Running a cluster"). `rediss://` for TLS;
    /// `redis+sentinel://[:password@]host:port[,host:port...]/master_name[/db]` (or
    /// `rediss+sentinel://`) to follow the master a set of Sentinels names; the Sentinels'
    /// own credentials, if they need any, in `?sentinel_username=U&sentinel_password=P`.
    pub redis_url: String,
    /// PEM CA certificate(s) Redis's certificate must chain to (a site's private CA), instead
    /// of the system's trust store. Needs a `rediss` URL.
    pub redis_ca_file: Option<PathBuf>,
    /// PEM client certificate (chain) for Redis servers that require one (`tls-auth-clients`),
    /// with `redis_client_key_file`.
    pub redis_client_cert_file: Option<PathBuf>,
    /// PEM private key of `redis_client_cert_file`.
    pub redis_client_key_file: Option<PathBuf>,
}

impl ClusterConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.into()));
        if self.redis_client_cert_file.is_some() != self.redis_client_key_file.is_some() {
            return bad("cluster.redis_client_cert_file and redis_client_key_file go together");
        }
        let files = self.redis_ca_file.is_some() || self.redis_client_cert_file.is_some();
        if files
            && !(self.redis_url.starts_with("rediss://") || self.redis_url.starts_with("rediss+sentinel://"))
        {
            return bad(
                "cluster.redis_ca_file and redis_client_*_file need a rediss:// or rediss+sentinel:// redis_url",
            );
        }
        Ok(())
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("data"),
            device_listen: "0.0.0.0:7443".parse().expect("valid literal"),
            api_listen: "127.0.0.1:7444".parse().expect("valid literal"),
            http_listen: "127.0.0.1:7445".parse().expect("valid literal"),
            node_name: host_name(),
            server_names: Vec::new(),
            heartbeat_interval_ms: 30_000,
            heartbeat_timeout_ms: 10_000,
            limits: Limits::default(),
            apns: ApnsConfig::default(),
            site: SiteConfig::default(),
            cluster: ClusterConfig::default(),
            test_clock_file: None,
        }
    }
}

/// Longest SSID: 32 octets (IEEE 802.11).
pub const MAX_SSID_BYTES: usize = 32;

/// The `[site]` section: what enrollment hands the container app for its push managers.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SiteConfig {
    /// The Wi-Fi networks (SSIDs) on which phones reach this server, exactly as broadcast:
    /// spaces and unicode are kept as written. iOS takes at most 10 per push manager; a site
    /// with more gets several managers.
    pub ssids: Vec<String>,
    /// Host name or IP phones dial (default: the first of `server_names`, else the device
    /// listener's address).
    pub device_host: String,
    /// Port phones dial, when a NAT or load balancer sits in front (default: the device
    /// listener's port).
    pub device_port: u16,
}

impl SiteConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        for (i, ssid) in self.ssids.iter().enumerate() {
            if ssid.is_empty() {
                return bad(format!("site.ssids[{i}] is empty"));
            }
            if ssid.len() > MAX_SSID_BYTES {
                return bad(format!(
                    "site.ssids[{i}] {ssid:?} is {} bytes; an SSID has at most {MAX_SSID_BYTES} (UTF-8 bytes)",
                    ssid.len()
                ));
            }
            if self.ssids[..i].contains(ssid) {
                return bad(format!("site.ssids lists {ssid:?} twice"));
            }
        }
        Ok(())
    }
}

/// Where the APNs VoIP fallback runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApnsMode {
    /// No fallback: calls ring only over local sessions.
    #[default]
    Disabled,
    /// The bridge runs inside this process (this host may reach api.push.apple.com).
    Embedded,
    /// The bridge runs as `apns-bridge serve` on another host (the usual set-up: only a DMZ
    /// host may reach the internet); this server calls it over gRPC.
    Remote,
}

/// The `[apns]` section: how calls reach phones without a live session.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApnsConfig {
    /// `disabled`, `embedded` or `remote`.
    pub mode: ApnsMode,
    /// Embedded: the app's bundle id (VoIP topic `<bundle_id>.voip`).
    pub bundle_id: String,
    /// Embedded: the APNs auth key (.p8).
    pub p8_file: Option<PathBuf>,
    /// Embedded: the key's id.
    pub key_id: String,
    /// Embedded: the Apple developer team id.
    pub team_id: String,
    /// Embedded: use APNs' sandbox (development builds of the app).
    pub sandbox: bool,
    /// Embedded: longest wait for one APNs answer (also cut to the ring time left).
    pub send_timeout_ms: u64,
    /// Embedded: first retry delay after 429/5xx (doubles per retry, up to `retry_max_ms`).
    pub retry_base_ms: u64,
    /// Embedded: longest retry delay.
    pub retry_max_ms: u64,
    /// Embedded: most requests per push, the first included.
    pub max_attempts: u32,
    /// Embedded: no request starts with less ring time than this left.
    pub min_ring_left_ms: u64,
    /// Remote: the bridge's URL, `https://host:port` (or `http://127.0.0.1:port` on one host).
    pub endpoint: String,
    /// Remote: CA certificate (PEM) that issued the bridge's TLS certificate.
    pub ca_file: Option<PathBuf>,
    /// Remote: name to verify in the bridge's certificate; defaults to the endpoint's host.
    pub server_name: Option<String>,
    /// Remote: file holding the bridge's API key.
    pub api_key_file: Option<PathBuf>,
    /// Remote: time allowed to connect to the bridge, so a bridge that is down is reported fast.
    pub connect_timeout_ms: u64,
}

impl Default for ApnsConfig {
    fn default() -> Self {
        Self {
            mode: ApnsMode::Disabled,
            bundle_id: String::new(),
            p8_file: None,
            key_id: String::new(),
            team_id: String::new(),
            sandbox: false,
            send_timeout_ms: 5_000,
            retry_base_ms: 250,
            retry_max_ms: 2_000,
            max_attempts: 5,
            min_ring_left_ms: 1_000,
            endpoint: String::new(),
            ca_file: None,
            server_name: None,
            api_key_file: None,
            connect_timeout_ms: 2_000,
        }
    }
}

/// Every bound the server enforces.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Concurrent device sessions; connections beyond it wait in the kernel's accept backlog.
    pub max_sessions: usize,
    /// Largest frame payload accepted or sent.
    pub max_frame_bytes: usize,
    /// Time allowed for the TLS handshake.
    pub tls_handshake_timeout_ms: u64,
    /// Time allowed between the TLS handshake and the device's hello.
    pub hello_timeout_ms: u64,
    /// Time allowed to write a burst of frames to a device before the session is dropped.
    pub write_timeout_ms: u64,
    /// TCP keepalive idle time.
    pub tcp_keepalive_secs: u64,
    /// Pushes written to a session and not yet acknowledged before the session waits for acks.
    pub max_inflight_per_session: usize,
    /// Pushes queued for one device; further sends to it are refused as undeliverable.
    pub max_queued_per_device: usize,
    /// Message TTL when the sender gives none.
    pub default_ttl_secs: u32,
    /// Largest message TTL accepted.
    pub max_ttl_secs: u32,
    /// Ring time when the caller gives none.
    pub default_ring_secs: u32,
    /// Longest ring time accepted (a call with an escalation plan: the whole call).
    pub max_ring_secs: u32,
    /// Most steps an escalation plan may have.
    pub max_escalation_steps: usize,
    /// Largest message (title + body + data + collapse key + sender) accepted from senders.
    pub max_message_bytes: usize,
    /// Most recipients one send may expand to.
    pub max_recipients: usize,
    /// How long final delivery receipts are kept for status queries.
    pub receipt_retention_secs: u64,
    /// `WatchMessage` / `WatchCall` streams open on one message or call at once; more are
    /// answered `RESOURCE_EXHAUSTED`.
    pub max_watchers_per_id: usize,
    /// `WatchMessage` / `WatchCall` streams open at once, all ids together; more are answered
    /// `RESOURCE_EXHAUSTED`.
    pub max_watchers: usize,
    /// Longest caller-chosen message or call id.
    pub max_id_bytes: usize,
    /// Longest caller name and handle of a call, together.
    pub max_caller_bytes: usize,
    /// Longest device id, group name or API key name.
    pub max_name_bytes: usize,
    /// Verified API keys remembered, so a busy sender costs no store read per request.
    pub key_cache_entries: usize,
    /// How long a remembered API key is trusted before the store is read again (a revocation
    /// on another node takes effect within it; on this node at once).
    pub key_cache_ttl_ms: u64,
    /// Receipts one `WatchMessage` / `WatchCall` stream may fall behind before it is told it
    /// lagged.
    pub watch_queue: usize,
    /// Presence events the presence and dashboard streams may fall behind.
    pub presence_backlog: usize,
    /// Receipts the dashboard's receipt stream may fall behind.
    pub receipt_backlog: usize,
    /// Diagnoses the dashboard's diagnosis stream may fall behind.
    pub diagnosis_backlog: usize,
    /// On shutdown, how long sessions get to say goodbye before the store is closed anyway.
    pub shutdown_drain_ms: u64,
    /// How long a device with a live session has to acknowledge a call invite before the call
    /// also rings through the APNs VoIP fallback (when enabled and the device registered a
    /// token). Devices without a session fall back at once.
    pub call_ack_window_ms: u64,
    /// Diagnostics: a device whose extension logs in with a new instance id more than this many
    /// times within `diag_window_secs` is flagged (the extension keeps being restarted).
    pub diag_instance_churn_max: u32,
    /// Diagnostics: the window for instance churn and heartbeat-miss flags.
    pub diag_window_secs: u64,
    /// Diagnostics: a site (SSID) is flagged when at least this share (percent) of its devices,
    /// and at least `diag_site_drop_min_devices`, drop within `diag_site_drop_window_secs`.
    pub diag_site_drop_percent: u32,
    /// Diagnostics: fewest drops that can flag a site.
    pub diag_site_drop_min_devices: u32,
    /// Diagnostics: the window for site-wide drops.
    pub diag_site_drop_window_secs: u64,
    /// Dashboard: sessions kept per device in the in-memory history.
    pub observe_sessions_per_device: usize,
    /// Dashboard: delivery events kept per device in the in-memory history.
    pub observe_deliveries_per_device: usize,
    /// Dashboard: devices with an in-memory history; beyond it the device heard from least
    /// recently (and offline) is forgotten. Registered devices beyond it still work, only their
    /// dashboard history is gone.
    pub observe_max_devices: usize,
    /// Dashboard: sites (SSIDs) tracked for site health; beyond it the site with no devices and
    /// the oldest activity is forgotten. Phones name SSIDs, so this bounds what they can make
    /// the server remember.
    pub observe_max_sites: usize,
    /// TLS handshakes on the device listener (`[limits.device_handshakes]`). Sized for a whole
    /// site reconnecting at once (10,000 phones in 2 s on two cores, see BENCHMARKS.md).
    #[serde(deserialize_with = "device_handshakes")]
    pub device_handshakes: HandshakeLimits,
    /// TLS handshakes on the gRPC API listener (`[limits.api_handshakes]`): senders keep their
    /// HTTP/2 connections, so few handshakes are needed.
    #[serde(deserialize_with = "service_handshakes")]
    pub api_handshakes: HandshakeLimits,
    /// TLS handshakes on the dashboard listener (`[limits.http_handshakes]`).
    #[serde(deserialize_with = "service_handshakes")]
    pub http_handshakes: HandshakeLimits,
    /// Logins one device may make per minute, sustained. An extension in a crash loop that logs
    /// in more often is answered `Goodbye{OVERLOADED}` (the SDK reconnects with backoff) without
    /// touching its session, queue or presence.
    pub device_logins_per_minute: u32,
    /// Logins one device may make in a burst above the sustained rate (reconnects after a
    /// network change, two connections racing).
    pub device_login_burst: u32,
    /// gRPC requests one API key may make per second, sustained; beyond it (and the burst) the
    /// request is answered `RESOURCE_EXHAUSTED`.
    pub api_requests_per_sec_per_key: u32,
    /// gRPC requests one API key may make in a burst above the sustained rate.
    pub api_request_burst_per_key: u32,
    /// Longest credential an `enroll` key can obtain, in days (admins may issue up to ten
    /// years). The enroll key ships to every phone, so whoever extracts it gets no more.
    pub max_enroll_credential_days: u32,
    /// Enrollments one `enroll` key may make per minute (also the burst); more are refused
    /// with RESOURCE_EXHAUSTED / HTTP 429, so a leaked key cannot flood the registry.
    pub enrollments_per_key_per_minute: u32,
}

/// Bounds on TLS handshakes of one listener. A connection over any of them is closed before
/// the handshake (it costs no TLS work), logged once and counted in
/// `lpush_handshakes_refused_total`. Per address means per IPv4 address or per IPv6 /64 (one
/// host can use a whole /64). Behind a NAT every phone shares one address: raise the per-address
/// values to the site's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandshakeLimits {
    /// Handshakes in progress at once, all addresses.
    pub in_progress: usize,
    /// Handshakes in progress at once from one address.
    pub in_progress_per_ip: usize,
    /// Handshakes started per second, all addresses (sustained).
    pub per_sec: u32,
    /// Handshakes that may start at once above `per_sec`, all addresses.
    pub burst: u32,
    /// Handshakes started per second from one address (sustained).
    pub per_sec_per_ip: u32,
    /// Handshakes that may start at once above `per_sec_per_ip` from one address.
    pub burst_per_ip: u32,
}

impl HandshakeLimits {
    /// The device listener's defaults: a site of 18,000 phones reconnecting together passes
    /// (the loadgen puts 200 phones on one address); one address looping on handshakes gets
    /// 50 per second.
    pub const DEVICE: Self = Self {
        in_progress: 16_384,
        in_progress_per_ip: 256,
        per_sec: 10_000,
        burst: 20_000,
        per_sec_per_ip: 50,
        burst_per_ip: 500,
    };
    /// The API and dashboard listeners' defaults: a few long-lived connections per client.
    pub const SERVICE: Self = Self {
        in_progress: 256,
        in_progress_per_ip: 32,
        per_sec: 200,
        burst: 400,
        per_sec_per_ip: 20,
        burst_per_ip: 50,
    };

    fn validate(&self, name: &str) -> Result<(), ConfigError> {
        let values = [
            self.in_progress as u64,
            self.in_progress_per_ip as u64,
            u64::from(self.per_sec),
            u64::from(self.burst),
            u64::from(self.per_sec_per_ip),
            u64::from(self.burst_per_ip),
        ];
        if values.contains(&0) {
            return Err(ConfigError::Invalid(format!(
                "every value of limits.{name} must be positive"
            )));
        }
        Ok(())
    }
}

/// A `[limits.*_handshakes]` table: the keys it names over `base`, so a file can change one
/// value and keep the listener's other defaults.
fn handshakes_over<'de, D: serde::Deserializer<'de>>(
    d: D,
    base: HandshakeLimits,
) -> Result<HandshakeLimits, D::Error> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Patch {
        in_progress: Option<usize>,
        in_progress_per_ip: Option<usize>,
        per_sec: Option<u32>,
        burst: Option<u32>,
        per_sec_per_ip: Option<u32>,
        burst_per_ip: Option<u32>,
    }
    let p = Patch::deserialize(d)?;
    Ok(HandshakeLimits {
        in_progress: p.in_progress.unwrap_or(base.in_progress),
        in_progress_per_ip: p.in_progress_per_ip.unwrap_or(base.in_progress_per_ip),
        per_sec: p.per_sec.unwrap_or(base.per_sec),
        burst: p.burst.unwrap_or(base.burst),
        per_sec_per_ip: p.per_sec_per_ip.unwrap_or(base.per_sec_per_ip),
        burst_per_ip: p.burst_per_ip.unwrap_or(base.burst_per_ip),
    })
}

fn device_handshakes<'de, D: serde::Deserializer<'de>>(d: D) -> Result<HandshakeLimits, D::Error> {
    handshakes_over(d, HandshakeLimits::DEVICE)
}

fn service_handshakes<'de, D: serde::Deserializer<'de>>(d: D) -> Result<HandshakeLimits, D::Error> {
    handshakes_over(d, HandshakeLimits::SERVICE)
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_sessions: 18_000,
            max_frame_bytes: push_proto::frame::DEFAULT_MAX_FRAME,
            tls_handshake_timeout_ms: 10_000,
            hello_timeout_ms: 10_000,
            write_timeout_ms: 10_000,
            tcp_keepalive_secs: 30,
            max_inflight_per_session: 64,
            max_queued_per_device: 1_000,
            default_ttl_secs: 24 * 3600,
            max_ttl_secs: 7 * 24 * 3600,
            default_ring_secs: 30,
            max_ring_secs: 180,
            max_escalation_steps: 8,
            max_message_bytes: 4 * 1024,
            max_recipients: 20_000,
            receipt_retention_secs: 7 * 24 * 3600,
            max_watchers_per_id: 64,
            max_watchers: 20_000,
            max_id_bytes: 128,
            max_caller_bytes: 1024,
            max_name_bytes: 128,
            key_cache_entries: 256,
            key_cache_ttl_ms: 1_000,
            watch_queue: 256,
            presence_backlog: 4096,
            receipt_backlog: 16 * 1024,
            diagnosis_backlog: 256,
            shutdown_drain_ms: 10_000,
            call_ack_window_ms: 3_000,
            diag_instance_churn_max: 3,
            diag_window_secs: 600,
            diag_site_drop_percent: 60,
            diag_site_drop_min_devices: 3,
            diag_site_drop_window_secs: 30,
            observe_sessions_per_device: 20,
            observe_deliveries_per_device: 50,
            observe_max_devices: 50_000,
            observe_max_sites: 1_000,
            device_handshakes: HandshakeLimits::DEVICE,
            api_handshakes: HandshakeLimits::SERVICE,
            http_handshakes: HandshakeLimits::SERVICE,
            device_logins_per_minute: 12,
            device_login_burst: 10,
            api_requests_per_sec_per_key: 5_000,
            api_request_burst_per_key: 10_000,
            max_enroll_credential_days: 365,
            enrollments_per_key_per_minute: 60,
        }
    }
}

impl Config {
    /// Read a TOML file over the defaults.
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            message: e.to_string(),
        })
    }

    /// Reject combinations that cannot work, with a message an operator can act on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        let bad = |m: &str| Err(ConfigError::Invalid(m.into()));
        if self.heartbeat_interval_ms == 0 || self.heartbeat_timeout_ms == 0 {
            return bad("heartbeat_interval_ms and heartbeat_timeout_ms must be positive");
        }
        if l.max_frame_bytes < 1024 || l.max_frame_bytes > 16 * 1024 * 1024 {
            return bad("limits.max_frame_bytes must be between 1 KiB and 16 MiB");
        }
        if l.max_message_bytes + 1024 > l.max_frame_bytes {
            return bad("limits.max_message_bytes must leave 1 KiB of headroom below limits.max_frame_bytes");
        }
        if l.max_sessions == 0 || l.max_inflight_per_session == 0 || l.max_queued_per_device == 0 {
            return bad(
                "limits.max_sessions, max_inflight_per_session and max_queued_per_device must be positive",
            );
        }
        if l.default_ttl_secs == 0 || l.default_ttl_secs > l.max_ttl_secs {
            return bad("limits.default_ttl_secs must be positive and at most limits.max_ttl_secs");
        }
        if l.default_ring_secs == 0 || l.default_ring_secs > l.max_ring_secs {
            return bad("limits.default_ring_secs must be positive and at most limits.max_ring_secs");
        }
        if l.max_enroll_credential_days == 0 || l.max_enroll_credential_days > 3650 {
            return bad("limits.max_enroll_credential_days must be between 1 and 3650");
        }
        if l.enrollments_per_key_per_minute == 0 {
            return bad("limits.enrollments_per_key_per_minute must be positive");
        }
        if l.call_ack_window_ms == 0 {
            return bad("limits.call_ack_window_ms must be positive");
        }
        if l.diag_window_secs == 0 || l.diag_site_drop_window_secs == 0 || l.diag_site_drop_percent > 100 {
            return bad(
                "limits.diag_window_secs and diag_site_drop_window_secs must be positive, diag_site_drop_percent at most 100",
            );
        }
        if l.max_watchers_per_id == 0 || l.max_watchers == 0 {
            return bad("limits.max_watchers_per_id and max_watchers must be positive");
        }
        if [
            l.max_id_bytes,
            l.max_caller_bytes,
            l.max_name_bytes,
            l.key_cache_entries,
        ]
        .into_iter()
        .chain([
            l.watch_queue,
            l.presence_backlog,
            l.receipt_backlog,
            l.diagnosis_backlog,
        ])
        .any(|n| n == 0)
        {
            return bad(
                "limits.max_id_bytes, max_caller_bytes, max_name_bytes, key_cache_entries, watch_queue and the *_backlog limits must be positive",
            );
        }
        if l.observe_max_devices == 0 || l.observe_max_sites == 0 {
            return bad("limits.observe_max_devices and observe_max_sites must be positive");
        }
        self.cluster.validate()?;
        l.device_handshakes.validate("device_handshakes")?;
        l.api_handshakes.validate("api_handshakes")?;
        l.http_handshakes.validate("http_handshakes")?;
        if l.device_logins_per_minute == 0
            || l.device_login_burst == 0
            || l.api_requests_per_sec_per_key == 0
            || l.api_request_burst_per_key == 0
        {
            return bad(
                "limits.device_logins_per_minute, device_login_burst, api_requests_per_sec_per_key and api_request_burst_per_key must be positive",
            );
        }
        self.site.validate()?;
        let a = &self.apns;
        match a.mode {
            ApnsMode::Disabled => {}
            ApnsMode::Embedded => {
                if a.bundle_id.is_empty()
                    || a.p8_file.is_none()
                    || a.key_id.is_empty()
                    || a.team_id.is_empty()
                {
                    return bad(
                        "apns.mode = \"embedded\" needs apns.bundle_id, apns.p8_file, apns.key_id and apns.team_id",
                    );
                }
                if a.send_timeout_ms == 0 || a.max_attempts == 0 {
                    return bad("apns.send_timeout_ms and apns.max_attempts must be positive");
                }
            }
            ApnsMode::Remote => {
                if a.endpoint.is_empty() || a.api_key_file.is_none() {
                    return bad("apns.mode = \"remote\" needs apns.endpoint and apns.api_key_file");
                }
                if a.endpoint.starts_with("https://") && a.ca_file.is_none() {
                    return bad(
                        "apns.endpoint is https: apns.ca_file must name the CA that issued the bridge's certificate",
                    );
                }
            }
        }
        Ok(())
    }

    /// Heartbeat interval as a duration.
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms)
    }

    /// Heartbeat answer deadline as a duration.
    pub fn heartbeat_timeout(&self) -> Duration {
        Duration::from_millis(self.heartbeat_timeout_ms)
    }
}

/// The machine's host name, for `node_name`.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "push-server".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_tls_files_need_a_rediss_url_and_a_client_key_its_certificate() {
        let cluster = |text: &str| toml::from_str::<Config>(text).unwrap().validate();
        cluster("[cluster]\nredis_url = \"rediss://r:6379\"\nredis_ca_file = \"ca.pem\"\n").unwrap();
        cluster("[cluster]\nredis_url = \"rediss+sentinel://s:26379/m\"\nredis_ca_file = \"ca.pem\"\n")
            .unwrap();
        let err =
            cluster("[cluster]\nredis_url = \"redis://r:6379\"\nredis_ca_file = \"ca.pem\"\n").unwrap_err();
        assert!(err.to_string().contains("rediss://"), "{err}");
        let err = cluster("[cluster]\nredis_url = \"rediss://r:6379\"\nredis_client_cert_file = \"c.pem\"\n")
            .unwrap_err();
        assert!(err.to_string().contains("redis_client_key_file"), "{err}");
    }

    #[test]
    fn partial_file_keeps_defaults() {
        let cfg: Config =
            toml::from_str("heartbeat_interval_ms = 5000\n[limits]\nmax_sessions = 10\n").unwrap();
        assert_eq!(cfg.heartbeat_interval_ms, 5000);
        assert_eq!(cfg.limits.max_sessions, 10);
        assert_eq!(cfg.limits.max_frame_bytes, Limits::default().max_frame_bytes);
        cfg.validate().unwrap();
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let err = toml::from_str::<Config>("heartbeat_intervall_ms = 5")
            .unwrap_err()
            .to_string();
        assert!(err.contains("heartbeat_intervall_ms"), "{err}");
    }

    #[test]
    fn inconsistent_limits_rejected() {
        let mut cfg = Config::default();
        cfg.limits.max_message_bytes = cfg.limits.max_frame_bytes;
        assert!(matches!(cfg.validate(), Err(ConfigError::Invalid(_))));
    }

    #[test]
    fn apns_section_is_checked_per_mode() {
        let cfg: Config = toml::from_str("[apns]\nmode = \"remote\"\n").unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("apns.endpoint"), "{err}");
        let cfg: Config = toml::from_str(
            "[apns]\nmode = \"remote\"\nendpoint = \"https://bridge.dmz:7450\"\napi_key_file = \"k\"\nca_file = \"ca.pem\"\n",
        )
        .unwrap();
        cfg.validate().unwrap();
        let cfg: Config = toml::from_str("[apns]\nmode = \"embedded\"\nbundle_id = \"com.x\"\n").unwrap();
        assert!(cfg.validate().unwrap_err().to_string().contains("p8_file"));
        assert!(toml::from_str::<Config>("[apns]\nmode = \"sometimes\"\n").is_err());
        assert_eq!(Config::default().apns.mode, ApnsMode::Disabled);
    }

    #[test]
    fn site_ssids_keep_spaces_and_unicode_and_reject_empty_or_long() {
        let cfg: Config = toml::from_str("[site]\nssids = [\" Ward 4B \", \"Station Ünfall 🚑\"]\n").unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.site.ssids, [" Ward 4B ", "Station Ünfall 🚑"]);
        for (ssids, needle) in [
            (r#"["ok", ""]"#, "site.ssids[1] is empty"),
            (r#"["ÄÄÄÄÄÄÄÄÄÄÄÄÄÄÄÄX"]"#, "33 bytes"),
            (r#"["a", "a"]"#, "twice"),
        ] {
            let cfg: Config = toml::from_str(&format!("[site]\nssids = {ssids}\n")).unwrap();
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains(needle), "{ssids}: {err}");
        }
        // 32 bytes of multi-byte characters is the limit, not 32 characters.
        let cfg: Config = toml::from_str(r#"site.ssids = ["ÄÄÄÄÄÄÄÄÄÄÄÄÄÄÄÄ"]"#).unwrap();
        cfg.validate().unwrap();
    }

    #[test]
    fn handshake_tables_keep_each_listeners_other_defaults() {
        let cfg: Config = toml::from_str(
            "[limits]\ndevice_logins_per_minute = 3\n[limits.api_handshakes]\nper_sec_per_ip = 2\n[limits.device_handshakes]\nburst_per_ip = 7\n",
        )
        .unwrap();
        cfg.validate().unwrap();
        let l = &cfg.limits;
        assert_eq!(l.device_logins_per_minute, 3);
        assert_eq!(
            l.api_handshakes,
            HandshakeLimits {
                per_sec_per_ip: 2,
                ..HandshakeLimits::SERVICE
            }
        );
        assert_eq!(
            l.device_handshakes,
            HandshakeLimits {
                burst_per_ip: 7,
                ..HandshakeLimits::DEVICE
            }
        );
        assert_eq!(l.http_handshakes, HandshakeLimits::SERVICE);
        let err = toml::from_str::<Config>("[limits.http_handshakes]\nper_second = 2\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("per_second"), "{err}");
        let cfg: Config = toml::from_str("[limits.http_handshakes]\nburst = 0\n").unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("limits.http_handshakes"), "{err}");
    }

    #[test]
    fn a_flag_given_overrides_the_file_and_the_file_the_defaults() {
        #[derive(clap::Parser)]
        struct Serve {
            #[command(flatten)]
            args: ServeArgs,
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "data_dir = \"file\"\nnode_name = \"n1\"\n[cluster]\nredis_url = \"redis://f\"\n",
        )
        .unwrap();
        let config = path.to_str().unwrap();
        let flags = [
            "serve",
            "--config",
            config,
            "--data-dir",
            "flag",
            "--server-name",
            "a,b",
        ];
        let cfg = <Serve as clap::Parser>::parse_from(flags).args.load().unwrap();
        assert_eq!(cfg.data_dir, PathBuf::from("flag"));
        assert_eq!(cfg.server_names, ["a", "b"]);
        assert_eq!(
            (cfg.node_name.as_str(), cfg.cluster.redis_url.as_str()),
            ("n1", "redis://f")
        );
        assert_eq!(cfg.api_listen, Config::default().api_listen);
        let flags = ["serve", "--config", config, "--heartbeat-timeout-ms", "0"];
        let err = <Serve as clap::Parser>::parse_from(flags)
            .args
            .load()
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("c.toml: invalid configuration: heartbeat"),
            "{err:#}"
        );
    }

    #[test]
    fn broken_file_reports_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "device_listen = [").unwrap();
        let err = Config::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("c.toml"), "{err}");
    }
}
