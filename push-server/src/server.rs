//! Wiring: data directory, certificates, store, hub, listeners, background tasks, and the
//! graceful shutdown that says goodbye to every device and flushes the store.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use apns_bridge::{
    Bridge, BridgeSettings, BundleId, VoipBridge,
    apple::{A2Transport, Environment},
    policy::RetryPolicy,
    remote::{RemoteBridge, RemoteOptions},
};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    api::{
        dashboard,
        enrollment::{Enroller, SiteProfile},
        grpc::{self, Api},
        keys::{Keys, NewKey},
    },
    auth::{DeviceAuthority, write_secret},
    config::{ApnsConfig, ApnsMode, ClusterConfig, Config},
    data_dir::{self, ADMIN_KEY_FILE, STORE_FILE, TLS_DIR},
    hub::{Clock, Hub, OffsetClock, SystemClock, now_ms, run_cluster, run_timers},
    listener::serve_devices,
    observe::run_ticks,
    pki::{self, Pki, PkiStatus},
    session::{core::Timing, driver::SessionEnv},
    store::{RedbStore, RedisStore, Store},
};

/// A running server.
pub struct Server {
    /// Where devices connect.
    pub device_addr: SocketAddr,
    /// Where the gRPC API listens.
    pub api_addr: SocketAddr,
    /// Where the dashboard and `/metrics` listen (HTTPS).
    pub http_addr: SocketAddr,
    /// Certificates in use.
    pub pki: Pki,
    /// What start-up did to the certificates.
    pub pki_status: PkiStatus,
    /// Path of the bootstrap admin key, if this start created it.
    pub created_admin_key: Option<PathBuf>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    store: Arc<dyn Store>,
    /// `limits.shutdown_drain_ms`: how long sessions get to say goodbye.
    drain: Duration,
}

/// The line `push-server serve` prints on stdout once it listens (and will shut down cleanly on
/// SIGTERM): launchers read the bound addresses from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ready {
    /// Where devices connect.
    pub devices: SocketAddr,
    /// Where the gRPC API listens.
    pub api: SocketAddr,
    /// Where the dashboard and `/metrics` listen (HTTPS).
    pub dashboard: SocketAddr,
}

impl Ready {
    /// How the line starts.
    pub const PREFIX: &str = "push-server ready: ";
}

impl std::fmt::Display for Ready {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Self {
            devices,
            api,
            dashboard,
        } = self;
        write!(
            f,
            "{}devices={devices} api={api} dashboard=https://{dashboard}/",
            Self::PREFIX
        )
    }
}

/// A line that is not a [`Ready`] line.
#[derive(Debug, thiserror::Error)]
#[error("not a push-server ready line: {0:?}")]
pub struct NotReady(String);

impl std::str::FromStr for Ready {
    type Err = NotReady;

    fn from_str(line: &str) -> Result<Self, NotReady> {
        let parse = || {
            let rest = line.strip_prefix(Self::PREFIX)?.strip_prefix("devices=")?;
            let (devices, rest) = rest.split_once(" api=")?;
            let (api, dashboard) = rest.split_once(" dashboard=https://")?;
            Some(Self {
                devices: devices.parse().ok()?,
                api: api.parse().ok()?,
                dashboard: dashboard.strip_suffix('/')?.parse().ok()?,
            })
        };
        parse().ok_or_else(|| NotReady(line.into()))
    }
}

impl Server {
    /// Prepare the data directory, open the store and start listening, with the APNs VoIP
    /// fallback the configuration's `[apns]` section asks for.
    pub async fn start(cfg: Config) -> anyhow::Result<Self> {
        cfg.validate()?;
        let voip = voip_bridge(&cfg.apns)?;
        Self::start_with_voip(cfg, voip).await
    }

    /// Like [`Server::start`], with the given VoIP fallback instead of the configured one (tests
    /// pass a bridge over the fake APNs).
    pub async fn start_with_voip(cfg: Config, voip: Option<Arc<dyn VoipBridge>>) -> anyhow::Result<Self> {
        cfg.validate()?;
        // Before anything records a metric.
        crate::metrics::install();
        // Our own TLS configs name aws-lc-rs explicitly; the Redis client's (`rediss://`) take
        // the process default, pinned here so that another provider entering the dependency
        // tree cannot leave it ambiguous (rustls then panics). Err: already installed.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        data_dir::prepare(&cfg.data_dir)?;
        let (pki, pki_status) = pki::load_or_create(&cfg.data_dir.join(TLS_DIR), &cfg.server_names)?;
        let test_clock = cfg.test_clock_file.as_deref().map(open_test_clock).transpose()?;
        let (hub, store) = open_hub(&cfg, voip, test_clock.clone()).await?;
        hub.set_ca_generation(pki.ca_generation);
        let auth = Arc::new(
            DeviceAuthority::load_or_create(&cfg.data_dir)
                .context("cannot load the device credential key")?,
        );
        let keys = Arc::new(Keys::new(store.clone(), &cfg.limits));
        let created_admin_key = bootstrap_admin_key(&keys, &cfg.data_dir).await?;

        let device_listener = crate::listener::bind_devices(cfg.device_listen)
            .with_context(|| format!("cannot listen for devices on {}", cfg.device_listen))?;
        let api_listener = TcpListener::bind(cfg.api_listen)
            .await
            .with_context(|| format!("cannot listen for the API on {}", cfg.api_listen))?;
        let http_listener = TcpListener::bind(cfg.http_listen)
            .await
            .with_context(|| format!("cannot listen for the dashboard on {}", cfg.http_listen))?;
        let (device_addr, api_addr) = (device_listener.local_addr()?, api_listener.local_addr()?);
        let http_addr = http_listener.local_addr()?;

        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let env = Arc::new(SessionEnv {
            hub: hub.clone(),
            auth: auth.clone(),
            timing: Timing {
                hello_timeout: Duration::from_millis(cfg.limits.hello_timeout_ms),
                heartbeat_interval: cfg.heartbeat_interval(),
                heartbeat_timeout: cfg.heartbeat_timeout(),
            },
            write_timeout: Duration::from_millis(cfg.limits.write_timeout_ms),
            max_frame: cfg.limits.max_frame_bytes,
            max_inflight: cfg.limits.max_inflight_per_session,
            logins: SessionEnv::login_rate(&cfg.limits),
        });
        // One chain for the three listeners, replaced in place by a CA rotation.
        let certs = pki::CertSlot::new(&pki)?;
        let rotator = Arc::new(pki::Rotator::new(&pki.dir, &cfg.server_names, certs.clone()));
        let device_tls = Arc::new(pki::server_config_from(certs.clone())?);
        tasks.spawn(serve_devices(
            device_listener,
            device_tls,
            env,
            cfg.limits.clone(),
            shutdown.clone(),
            tasks.clone(),
        ));
        if let (Some(clock), Some(path)) = (test_clock, &cfg.test_clock_file) {
            tasks.spawn(watch_test_clock(
                clock,
                path.clone(),
                hub.clone(),
                shutdown.clone(),
            )?);
        }
        tasks.spawn(run_timers(hub.clone(), shutdown.clone()));
        tasks.spawn(run_cluster(hub.clone(), shutdown.clone()));
        let site = SiteProfile::new(&cfg, device_addr, &pki);
        for warning in site.warnings() {
            tracing::warn!("enrollment: {warning}");
        }
        let enroller = Enroller::new(hub.clone(), auth.clone(), site);
        let mut http_tls = pki::server_config_from(certs.clone())?;
        http_tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        tasks.spawn(run_ticks(hub.observer().clone(), now_ms, shutdown.clone()));
        tasks.spawn(dashboard::serve(
            http_listener,
            TlsAcceptor::from(Arc::new(http_tls)),
            hub.clone(),
            enroller.clone(),
            keys.clone(),
            cfg.node_name.clone(),
            shutdown.clone(),
        )?);
        let api = Api::new(
            hub,
            enroller,
            keys,
            store.clone(),
            cfg.data_dir.clone(),
            rotator,
            shutdown.clone(),
        );
        tasks.spawn(grpc::serve(
            api_listener,
            certs,
            cfg.limits.clone(),
            api,
            shutdown.clone(),
        )?);
        tracing::info!(%device_addr, %api_addr, %http_addr, node = %cfg.node_name, "push-server listening");
        Ok(Self {
            device_addr,
            api_addr,
            http_addr,
            pki,
            pki_status,
            created_admin_key,
            shutdown,
            tasks,
            store,
            drain: Duration::from_millis(cfg.limits.shutdown_drain_ms),
        })
    }

    /// A token that, when cancelled, starts the graceful shutdown.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Shut down gracefully: stop accepting, say goodbye to every device, wait for sessions
    /// (bounded), then flush and close the store.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.tasks.close();
        let drain = self.drain;
        if tokio::time::timeout(drain, self.tasks.wait()).await.is_err() {
            tracing::warn!(
                "some sessions did not finish within {drain:?} (limits.shutdown_drain_ms); closing anyway"
            );
        }
        let store = self.store.clone();
        let _ = tokio::task::spawn_blocking(move || store.close()).await;
        tracing::info!("push-server stopped");
    }

    /// Run until `signal` resolves, then shut down gracefully.
    pub async fn run_until(self, signal: impl Future<Output = ()>) {
        tokio::select! {
            _ = signal => {}
            _ = self.shutdown.cancelled() => {}
        }
        self.shutdown().await;
    }
}

/// The VoIP fallback `[apns]` asks for: none, an embedded bridge over a2, or a client of a
/// remote `apns-bridge`. Both kinds go through the same `VoipBridge` interface.
pub fn voip_bridge(cfg: &ApnsConfig) -> anyhow::Result<Option<Arc<dyn VoipBridge>>> {
    let ms = Duration::from_millis;
    match cfg.mode {
        ApnsMode::Disabled => Ok(None),
        ApnsMode::Embedded => {
            let p8 = cfg.p8_file.as_ref().context("apns.p8_file is required")?;
            let key = std::fs::File::open(p8)
                .with_context(|| format!("cannot open the APNs key {}", p8.display()))?;
            let env = if cfg.sandbox {
                Environment::Sandbox
            } else {
                Environment::Production
            };
            let send_timeout = ms(cfg.send_timeout_ms);
            let transport = A2Transport::new(key, &cfg.key_id, &cfg.team_id, env, send_timeout)
                .with_context(|| format!("cannot use the APNs key {}", p8.display()))?;
            let settings = BridgeSettings {
                bundle_id: BundleId::parse(&cfg.bundle_id)?,
                send_timeout,
                retry: RetryPolicy {
                    base: ms(cfg.retry_base_ms),
                    max: ms(cfg.retry_max_ms),
                    max_attempts: cfg.max_attempts,
                    min_ring_left: ms(cfg.min_ring_left_ms),
                },
            };
            tracing::info!(bundle = %cfg.bundle_id, sandbox = cfg.sandbox, "APNs VoIP fallback: embedded");
            Ok(Some(Arc::new(Bridge::new(Arc::new(transport), settings))))
        }
        ApnsMode::Remote => {
            let read =
                |p: &Path| std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()));
            let key_file = cfg
                .api_key_file
                .as_ref()
                .context("apns.api_key_file is required")?;
            let opts = RemoteOptions {
                endpoint: cfg.endpoint.clone(),
                ca_pem: cfg.ca_file.as_deref().map(read).transpose()?,
                server_name: cfg.server_name.clone(),
                api_key: read(key_file)?.trim().to_string(),
                connect_timeout: ms(cfg.connect_timeout_ms),
            };
            tracing::info!(endpoint = %cfg.endpoint, "APNs VoIP fallback: remote bridge");
            Ok(Some(Arc::new(RemoteBridge::connect_lazy(&opts)?)))
        }
    }
}

/// The hub over the embedded store, or, with `[cluster] redis_url`, a cluster node over Redis.
async fn open_hub(
    cfg: &Config,
    voip: Option<Arc<dyn VoipBridge>>,
    test_clock: Option<Arc<OffsetClock>>,
) -> anyhow::Result<(Hub, Arc<dyn Store>)> {
    let clock: Arc<dyn Clock> = match test_clock {
        Some(c) => c,
        None => Arc::new(SystemClock),
    };
    if !cfg.cluster.redis_url.is_empty() {
        let certificates = redis_certificates(&cfg.cluster)?;
        let redis = RedisStore::connect_with(&cfg.cluster.redis_url, certificates, &cfg.node_name, true)
            .await
            .with_context(|| {
                let url = redact_userinfo(&cfg.cluster.redis_url);
                format!("cannot reach the cluster's Redis at {url}")
            })?;
        redis.set_receipt_retention(cfg.limits.receipt_retention_secs * 1000);
        tracing::info!(node = %cfg.node_name, epoch = redis.epoch(), "cluster node: state in Redis");
        let hub = Hub::new_cluster(redis.clone(), cfg.limits.clone(), voip, clock);
        return Ok((hub, redis));
    }
    let store = Arc::new(RedbStore::open(&cfg.data_dir.join(STORE_FILE))?);
    let snapshot = store.load()?;
    tracing::info!(
        devices = snapshot.devices.len(),
        queued = snapshot.pushes.len(),
        "store loaded"
    );
    let hub = Hub::new(store.clone(), cfg.limits.clone(), snapshot, voip, clock);
    Ok((hub, store))
}

/// The lifecycle host's clock (`serve --test-clock-file`): the file's offset from the start, so
/// a restarted server keeps the simulated time it had.
fn open_test_clock(path: &Path) -> anyhow::Result<Arc<OffsetClock>> {
    let clock = Arc::new(OffsetClock::default());
    if path.exists() {
        clock.move_to_file(path).map_err(anyhow::Error::msg)?;
    }
    tracing::warn!(file = %path.display(), offset_ms = clock.offset_ms(), "simulated time: the hub's clock runs ahead of the wall clock (tests only)");
    Ok(clock)
}

/// On SIGUSR2, move the test clock to the file's offset, wake the deadline task, and print
/// `push-server clock: offset_ms=N` on stdout once the hub reads the new time (the host waits
/// for that line). A bad file is logged and changes nothing.
fn watch_test_clock(
    clock: Arc<OffsetClock>,
    path: PathBuf,
    hub: Hub,
    shutdown: CancellationToken,
) -> anyhow::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut usr2 = signal(SignalKind::user_defined2()).context("cannot install the SIGUSR2 handler")?;
    Ok(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = usr2.recv() => {}
            }
            match clock.move_to_file(&path) {
                Ok(offset) => {
                    hub.clock_moved();
                    println!("push-server clock: offset_ms={offset}");
                }
                Err(e) => tracing::error!(error = %e, "test clock not moved"),
            }
        }
    })
}

/// The CA and client certificate `[cluster]` names for Redis, read and checked now: the
/// crate's parser takes a file with no certificate in it for an empty trust store, which would
/// only fail later, at the handshake, as an unknown issuer.
fn redis_certificates(cfg: &ClusterConfig) -> anyhow::Result<Option<redis::TlsCertificates>> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let read = |path: &Path| std::fs::read(path).with_context(|| format!("cannot read {}", path.display()));
    let certificates = |path: &Path| -> anyhow::Result<Vec<u8>> {
        let pem = read(path)?;
        let parsed = CertificateDer::pem_slice_iter(&pem).collect::<Result<Vec<_>, _>>();
        match parsed {
            Ok(certs) if !certs.is_empty() => Ok(pem),
            Ok(_) => anyhow::bail!("{} holds no PEM certificate", path.display()),
            Err(e) => anyhow::bail!("{} is not valid PEM: {e}", path.display()),
        }
    };
    let root_cert = cfg.redis_ca_file.as_deref().map(certificates).transpose()?;
    let client_tls = match (&cfg.redis_client_cert_file, &cfg.redis_client_key_file) {
        (Some(cert), Some(key)) => {
            let client_key = read(key)?;
            PrivateKeyDer::from_pem_slice(&client_key)
                .with_context(|| format!("{} holds no PEM private key", key.display()))?;
            Some(redis::ClientTlsConfig {
                client_cert: certificates(cert)?,
                client_key,
            })
        }
        _ => None,
    };
    Ok(
        (root_cert.is_some() || client_tls.is_some()).then_some(redis::TlsCertificates {
            client_tls,
            root_cert,
        }),
    )
}

/// `url` without its user and password (`redis://:secret@host` -> `redis://***@host`) and
/// without its query (a Sentinel URL's credentials), for logs.
fn redact_userinfo(url: &str) -> String {
    let (url, query) = match url.split_once('?') {
        Some((url, _)) => (url, "?***"),
        None => (url, ""),
    };
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}***{}{query}", &url[..scheme + 3], &url[at..]),
        _ => format!("{url}{query}"),
    }
}

/// On first start, create an admin API key and write it to the data directory.
async fn bootstrap_admin_key(keys: &Keys, dir: &Path) -> anyhow::Result<Option<PathBuf>> {
    let path = dir.join(ADMIN_KEY_FILE);
    if path.exists() {
        return Ok(None);
    }
    let new = NewKey {
        name: "admin".into(),
        scopes: vec!["admin".into()],
        ..NewKey::default()
    };
    let (key, _) = keys.create(new).await?;
    write_secret(&path, &key).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(Some(path))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_redis_password_never_reaches_the_log() {
        assert_eq!(
            super::redact_userinfo("redis://:s3cret@redis.ward.local:6379/0"),
            "redis://***@redis.ward.local:6379/0"
        );
        assert_eq!(
            super::redact_userinfo("redis://127.0.0.1:6379/0"),
            "redis://127.0.0.1:6379/0"
        );
        assert_eq!(
            super::redact_userinfo("rediss+sentinel://push:p@ss@s1:26379,s2:26379/mymaster/0"),
            "rediss+sentinel://***@s1:26379,s2:26379/mymaster/0"
        );
        assert_eq!(
            super::redact_userinfo("redis+sentinel://s1/mymaster/0?sentinel_password=s3cret@x"),
            "redis+sentinel://s1/mymaster/0?***"
        );
    }

    use super::*;

    #[test]
    fn the_ready_line_reads_back_what_it_says() {
        let ready = Ready {
            devices: "0.0.0.0:7443".parse().unwrap(),
            api: "127.0.0.1:7444".parse().unwrap(),
            dashboard: "[::1]:7445".parse().unwrap(),
        };
        let line = ready.to_string();
        assert_eq!(
            line,
            "push-server ready: devices=0.0.0.0:7443 api=127.0.0.1:7444 dashboard=https://[::1]:7445/"
        );
        assert_eq!(line.parse::<Ready>().unwrap(), ready);
    }

    #[test]
    fn anything_else_is_not_a_ready_line() {
        for bad in [
            "",
            "apns-bridge ready: listen=0.0.0.0:7450 transport=tls",
            "push-server ready: devices=127.0.0.1:1 api=127.0.0.1:2",
            "push-server ready: devices=x api=127.0.0.1:2 dashboard=https://127.0.0.1:3/",
            "push-server ready: devices=127.0.0.1:1 api=127.0.0.1:2 dashboard=http://127.0.0.1:3/",
            "push-server ready: devices=127.0.0.1:1 api=127.0.0.1:2 dashboard=https://127.0.0.1:3/ more",
        ] {
            let err = bad.parse::<Ready>().unwrap_err().to_string();
            assert!(err.contains("not a push-server ready line"), "{bad}: {err}");
        }
    }
}
