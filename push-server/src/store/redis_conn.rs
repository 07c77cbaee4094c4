//! Where a node's Redis is, and connections that follow it: a fixed address (`redis://`,
//! `rediss://`), or the master a set of Sentinels names (`redis+sentinel://`,
//! `rediss+sentinel://`), looked up again after a failover.
//!
//! The crate's `ConnectionManager` reconnects to the one address its `Client` was built with,
//! so after a Sentinel failover it would keep dialling the dead master. [`MasterConn`] wraps it:
//! a request that fails as if the master were gone asks the Sentinels where the master is now
//! ([`Master::follow`]); when the answer is a new address, every connection built from the
//! [`Master`] moves there on its next request.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use parking_lot::Mutex;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::sentinel::{SentinelClientBuilder, SentinelServerType};
use redis::{
    Client, Cmd, ConnectionAddr, IntoConnectionInfo, Pipeline, RedisConnectionInfo, RedisError, RedisFuture,
    RedisResult, TlsCertificates, TlsMode, Value,
};

const SENTINEL_SCHEME: &str = "redis+sentinel://";
const SENTINEL_TLS_SCHEME: &str = "rediss+sentinel://";
/// Sentinel's own default port, for an address that names none.
const SENTINEL_PORT: u16 = 26379;
/// A Sentinel lookup asks each Sentinel and checks the master's role: bounded, so a follower
/// never hangs on an unreachable host.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(3);
/// During an outage every failed request would ask again: at most one lookup this often.
const LOOKUP_INTERVAL: Duration = Duration::from_millis(200);

/// `redis+sentinel://[user[:password]@]host[:port][,host[:port]...]/master_name[/db]
/// [?sentinel_username=U&sentinel_password=P]`: the credentials before the hosts and the db are
/// the master's; the Sentinels' own (their `requirepass`, or an ACL user) go in the query,
/// percent-encoded.
struct SentinelSpec {
    sentinels: Vec<ConnectionAddr>,
    master_name: String,
    master: RedisConnectionInfo,
    sentinel_username: Option<String>,
    sentinel_password: Option<String>,
    tls: bool,
    certificates: Option<TlsCertificates>,
}

impl SentinelSpec {
    /// `None` when `url` is not a Sentinel URL. Error messages never quote the credentials.
    fn parse(url: &str, certificates: Option<TlsCertificates>) -> RedisResult<Option<Self>> {
        let (rest, tls) = match (
            url.strip_prefix(SENTINEL_SCHEME),
            url.strip_prefix(SENTINEL_TLS_SCHEME),
        ) {
            (Some(rest), _) => (rest, false),
            (_, Some(rest)) => (rest, true),
            _ => return Ok(None),
        };
        let invalid = |what: &str| {
            RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "invalid Sentinel URL",
                format!(
                    "{what}; expected {SENTINEL_SCHEME}host:port[,host:port...]/master_name[/db]\
                     [?sentinel_username=U&sentinel_password=P]"
                ),
            ))
        };
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (mut sentinel_username, mut sentinel_password) = (None, None);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_encoding::percent_decode_str(value)
                .decode_utf8()
                .map_err(|_| invalid(&format!("{key} is not UTF-8 once decoded")))?
                .into_owned();
            match key {
                "sentinel_username" => sentinel_username = Some(value),
                "sentinel_password" => sentinel_password = Some(value),
                _ => return Err(invalid(&format!("unknown parameter {key:?}"))),
            }
        }
        let (authority, path) = rest.split_once('/').ok_or_else(|| invalid("no master name"))?;
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => (format!("{userinfo}@"), hosts),
            None => (String::new(), authority),
        };
        let (master_name, db) = path.split_once('/').unwrap_or((path, "0"));
        if master_name.is_empty() {
            return Err(invalid("no master name"));
        }
        let scheme = if tls { "rediss" } else { "redis" };
        // The crate parses the master's credentials and db as in a plain URL (percent-decoding).
        let master = format!("{scheme}://{userinfo}sentinel-master/{db}")
            .into_connection_info()
            .map_err(|_| invalid("bad credentials or db"))?
            .redis_settings()
            .clone();
        let sentinels = hosts
            .split(',')
            .map(|host| {
                let has_port = host
                    .rsplit_once(':')
                    .is_some_and(|(_, port)| port.parse::<u16>().is_ok())
                    && !host.ends_with(']');
                let port = if has_port {
                    String::new()
                } else {
                    format!(":{SENTINEL_PORT}")
                };
                format!("{scheme}://{host}{port}")
                    .into_connection_info()
                    .map(|info| info.addr().clone())
                    .map_err(|_| invalid(&format!("bad Sentinel address {host:?}")))
            })
            .collect::<RedisResult<Vec<_>>>()?;
        if certificates.is_some() && !tls {
            return Err(invalid(
                "TLS certificates given for a plain (not rediss+sentinel) URL",
            ));
        }
        Ok(Some(Self {
            sentinels,
            master_name: master_name.to_string(),
            master,
            sentinel_username,
            sentinel_password,
            tls,
            certificates,
        }))
    }

    /// A client for the master the Sentinels name now (the crate checks that it says it is one).
    /// Boxed: the crate's lookup future is deep enough to overflow rustc's query depth limit
    /// once nested in the server's start-up future.
    fn lookup(&self) -> BoxFuture<'_, RedisResult<Client>> {
        Box::pin(self.lookup_unboxed())
    }

    async fn lookup_unboxed(&self) -> RedisResult<Client> {
        let mut builder = SentinelClientBuilder::new(
            self.sentinels.clone(),
            &self.master_name,
            SentinelServerType::Master,
        )?
        .set_client_to_redis_db(self.master.db());
        if let Some(username) = self.master.username() {
            builder = builder.set_client_to_redis_username(username);
        }
        if let Some(password) = self.master.password() {
            builder = builder.set_client_to_redis_password(password);
        }
        if let Some(username) = &self.sentinel_username {
            builder = builder.set_client_to_sentinel_username(username);
        }
        if let Some(password) = &self.sentinel_password {
            builder = builder.set_client_to_sentinel_password(password);
        }
        if self.tls {
            builder = builder.set_client_to_redis_tls_mode(TlsMode::Secure);
        }
        if let Some(certificates) = &self.certificates {
            builder = builder
                .set_client_to_redis_certificates(certificates.clone())
                .set_client_to_sentinel_certificates(certificates.clone());
        }
        let lookup = async { builder.build()?.async_get_client().await };
        tokio::time::timeout(LOOKUP_TIMEOUT, lookup)
            .await
            .unwrap_or_else(|_| {
                Err(RedisError::from((
                    redis::ErrorKind::Io,
                    "Sentinel lookup timed out",
                )))
            })
    }
}

/// The Redis a node uses: fixed, or the master Sentinel names, with a generation that grows
/// each time the master moves.
pub(crate) struct Master {
    sentinel: Option<SentinelSpec>,
    current: Mutex<(u64, Client)>,
    /// When the last lookup started; held during one, so that lookups never overlap.
    lookup: tokio::sync::Mutex<Option<Instant>>,
}

impl Master {
    /// Parse `url` and, for Sentinel, find the master. `certificates`: a CA to verify Redis (and
    /// Sentinels) with instead of the system's, and/or a client certificate; needs a TLS scheme.
    pub(crate) async fn open(url: &str, certificates: Option<TlsCertificates>) -> RedisResult<Arc<Self>> {
        let sentinel = SentinelSpec::parse(url, certificates.clone())?;
        let client = match (&sentinel, certificates) {
            (Some(spec), _) => spec.lookup().await?,
            (None, Some(certificates)) => Client::build_with_tls(url, certificates)?,
            (None, None) => Client::open(url)?,
        };
        Ok(Arc::new(Self {
            sentinel,
            current: Mutex::new((0, client)),
            lookup: tokio::sync::Mutex::new(None),
        }))
    }

    /// The master's client now, and its generation.
    pub(crate) fn current(&self) -> (u64, Client) {
        self.current.lock().clone()
    }

    /// A connection of generation `seen` failed as if the master were gone: with Sentinel, ask
    /// where the master is now (unless a lookup runs, or ran very recently, or the master
    /// already moved past `seen`). Without Sentinel there is nowhere else to go. Answers whether
    /// the master is now at a later generation than `seen`.
    pub(crate) async fn follow(self: Arc<Self>, seen: u64) -> bool {
        let moved = || self.current.lock().0 != seen;
        let Some(spec) = &self.sentinel else { return false };
        let Ok(mut last) = self.lookup.try_lock() else {
            return moved();
        };
        if moved() || last.is_some_and(|at| at.elapsed() < LOOKUP_INTERVAL) {
            return moved();
        }
        *last = Some(Instant::now());
        match spec.lookup().await {
            Ok(client) => {
                let mut current = self.current.lock();
                let addr = client.get_connection_info().addr().to_string();
                if current.1.get_connection_info().addr().to_string() != addr {
                    *current = (current.0 + 1, client);
                    tracing::warn!(master = %addr, name = %spec.master_name, "redis master moved (Sentinel); reconnecting");
                }
            }
            Err(e) => tracing::debug!(error = %e, "Sentinel lookup failed"),
        }
        moved()
    }
}

/// Whether `e` may mean the master is gone or demoted: the connection broke or timed out, or
/// the server refuses writes as a replica.
fn master_lost(e: &RedisError) -> bool {
    e.is_io_error() || e.is_timeout() || e.is_unrecoverable_error() || e.code() == Some("READONLY")
}

/// A `ConnectionManager` to the current master, replaced by one to the new master when the
/// master moves. Clones share it; build one per runtime (the manager's tasks run on the runtime
/// that first uses it).
#[derive(Clone)]
pub(crate) struct MasterConn {
    master: Arc<Master>,
    config: ConnectionManagerConfig,
    manager: Arc<Mutex<(u64, ConnectionManager)>>,
}

impl MasterConn {
    /// Connect now, so that a node that cannot reach Redis fails at start.
    pub(crate) async fn connect(master: Arc<Master>, config: ConnectionManagerConfig) -> RedisResult<Self> {
        let (generation, client) = master.current();
        let manager = ConnectionManager::new_with_config(client, config.clone()).await?;
        Ok(Self {
            master,
            config,
            manager: Arc::new(Mutex::new((generation, manager))),
        })
    }

    /// The manager for the current master (built, lazily connecting, after a move).
    fn manager(&self) -> RedisResult<(u64, ConnectionManager)> {
        let mut manager = self.manager.lock();
        let (generation, client) = self.master.current();
        if manager.0 != generation {
            *manager = (
                generation,
                ConnectionManager::new_lazy_with_config(client, self.config.clone())?,
            );
        }
        Ok(manager.clone())
    }

    /// Pass the answer on; a failure that may mean the master is gone starts a lookup in the
    /// background (the caller's retry, or the next request, uses the new master).
    fn check<T>(&self, generation: u64, result: RedisResult<T>) -> RedisResult<T> {
        if let Err(e) = &result
            && master_lost(e)
        {
            tokio::spawn(self.master.clone().follow(generation));
        }
        result
    }
}

impl ConnectionLike for MasterConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let (generation, mut manager) = self.manager()?;
            let result = manager.req_packed_command(cmd).await;
            self.check(generation, result)
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let (generation, mut manager) = self.manager()?;
            let result = manager.req_packed_commands(pipeline, offset, count).await;
            self.check(generation, result)
        })
    }

    fn get_db(&self) -> i64 {
        self.manager.lock().1.get_db()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> SentinelSpec {
        SentinelSpec::parse(url, None)
            .expect("parses")
            .expect("a Sentinel URL")
    }

    #[test]
    fn sentinel_urls_name_the_sentinels_the_master_and_its_credentials() {
        let spec = parse("redis+sentinel://:s%40cret@s1:26380,10.0.0.2,[::1]:26381/mymaster/2");
        let addrs: Vec<String> = spec.sentinels.iter().map(ToString::to_string).collect();
        assert_eq!(addrs, ["s1:26380", "10.0.0.2:26379", "::1:26381"]);
        assert_eq!(spec.master_name, "mymaster");
        assert_eq!(spec.master.password(), Some("s@cret"));
        assert_eq!(spec.master.db(), 2);
        assert!(!spec.tls);
        let spec = parse("rediss+sentinel://s1/mymaster");
        assert!(spec.tls);
        assert_eq!(spec.master.db(), 0);
        assert!(matches!(spec.sentinels[0], ConnectionAddr::TcpTls { .. }));
        assert!(SentinelSpec::parse("redis://h:6379/0", None).unwrap().is_none());
        assert_eq!((spec.sentinel_username, spec.sentinel_password), (None, None));
        let spec =
            parse("redis+sentinel://:m@s1/mymaster/1?sentinel_username=ops&sentinel_password=a%26b%3Dc");
        assert_eq!(spec.master.password(), Some("m"));
        assert_eq!(spec.master.db(), 1);
        assert_eq!(spec.sentinel_username.as_deref(), Some("ops"));
        assert_eq!(spec.sentinel_password.as_deref(), Some("a&b=c"));
    }

    #[test]
    fn a_bad_sentinel_url_is_refused_without_quoting_its_password() {
        for url in [
            "redis+sentinel://:hunter2@s1:26379",
            "redis+sentinel://:hunter2@s1:26379/",
            "redis+sentinel://:hunter2@s1:26379/m/notadb",
            "redis+sentinel://s1:26379/m?sentinel_pasword=hunter2",
            "redis+sentinel://s1:26379/m?sentinel_password=%ff%fehunter2",
        ] {
            let Err(e) = SentinelSpec::parse(url, None) else {
                panic!("{url} must be refused")
            };
            assert!(!e.to_string().contains("hunter2"), "{e}");
        }
        let certificates = TlsCertificates {
            client_tls: None,
            root_cert: Some(Vec::new()),
        };
        assert!(SentinelSpec::parse("redis+sentinel://s1/m", Some(certificates)).is_err());
    }
}
