//! A real Redis for tests (push-server's store and cluster, `e2e`, loadgen's cluster
//! benchmarks): a `redis-server` of its own on a free loopback port (plain or TLS, a replica, or
//! a Sentinel), in a directory of its own, stopped when dropped, and killed by the kernel if the
//! test process dies first; the certificates a TLS one needs.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::process::ChildProc;

/// A running `redis-server`.
pub struct RedisServer {
    /// `redis://127.0.0.1:<port>/0` (`rediss://` for TLS).
    pub url: String,
    /// Its port.
    pub port: u16,
    dir: PathBuf,
    /// Arguments after the common ones (TLS, replication), kept for `restart`.
    extra: Vec<String>,
    /// Runs as a Sentinel, from `sentinel.conf` in its directory.
    sentinel: bool,
    /// TLS: what a client needs to reach it (to know it is up).
    tls: Option<redis::TlsCertificates>,
    running: Option<ChildProc>,
}

impl RedisServer {
    /// Start one with no persistence.
    pub fn start() -> std::io::Result<Self> {
        Self::launch(false, |_| Vec::new())
    }

    /// Start one with an append-only file fsynced on every write, so a restart keeps what it
    /// acknowledged.
    pub fn start_durable() -> std::io::Result<Self> {
        Self::launch(true, |_| Vec::new())
    }

    /// Start one with an append-only file fsynced as `appendfsync` says (`always`, `everysec`,
    /// `no`), for benchmarks that weigh durability against latency.
    pub fn start_with_fsync(appendfsync: &str) -> std::io::Result<Self> {
        let policy = appendfsync.to_string();
        Self::launch(true, move |_| vec!["--appendfsync".into(), policy.clone()])
    }

    /// Start one that speaks only TLS, with `certs`' server certificate, and requires clients
    /// to present a certificate from `certs`' CA.
    pub fn start_tls(certs: &TestCerts) -> std::io::Result<Self> {
        let path = |p: &PathBuf| p.display().to_string();
        Self::launch_as(
            false,
            |port| {
                [
                    "--port",
                    "0",
                    "--tls-port",
                    &port.to_string(),
                    "--tls-cert-file",
                    &path(&certs.server_cert),
                    "--tls-key-file",
                    &path(&certs.server_key),
                    "--tls-ca-cert-file",
                    &path(&certs.ca),
                    "--tls-auth-clients",
                    "yes",
                ]
                .map(String::from)
                .to_vec()
            },
            Some(certs.client()),
            false,
        )
    }

    /// Start a replica of `master` (no persistence); it syncs in the background.
    pub fn start_replica_of(master: &RedisServer) -> std::io::Result<Self> {
        let port = master.port.to_string();
        Self::launch(false, |_| {
            ["--replicaof", "127.0.0.1", &port].map(String::from).to_vec()
        })
    }

    /// Start a Sentinel monitoring `master` as `mymaster`, with a quorum of one and timings
    /// short enough for a test: down after 500 ms, a failover in one or two seconds.
    /// `requirepass`: the password clients must give the Sentinel (then in `url`'s query).
    pub fn start_sentinel(master: &RedisServer, requirepass: Option<&str>) -> std::io::Result<Self> {
        let auth = requirepass.map_or(String::new(), |p| format!("requirepass {p}\n"));
        let mut server = Self::launch_as(
            false,
            |port| vec![format!("port {port}\n{auth}{}", sentinel_conf(master))],
            None,
            true,
        )?;
        let query = requirepass.map_or(String::new(), |p| format!("?sentinel_password={p}"));
        server.url = format!("redis+sentinel://127.0.0.1:{}/mymaster/0{query}", server.port);
        Ok(server)
    }

    /// Start a Sentinel, as `start_sentinel`, that speaks only TLS with `certs` (clients must
    /// present a certificate from its CA) and reaches `master` (started with `start_tls`) over
    /// TLS, with `certs`' client certificate.
    pub fn start_sentinel_tls(master: &RedisServer, certs: &TestCerts) -> std::io::Result<Self> {
        let path = |p: &PathBuf| p.display().to_string();
        let mut server = Self::launch_as(
            false,
            |port| {
                vec![format!(
                    "port 0\ntls-port {port}\ntls-cert-file {}\ntls-key-file {}\n\
                     tls-client-cert-file {}\ntls-client-key-file {}\ntls-ca-cert-file {}\n\
                     tls-auth-clients yes\ntls-replication yes\n{}",
                    path(&certs.server_cert),
                    path(&certs.server_key),
                    path(&certs.client_cert),
                    path(&certs.client_key),
                    path(&certs.ca),
                    sentinel_conf(master),
                )]
            },
            Some(certs.client()),
            true,
        )?;
        server.url = format!("rediss+sentinel://127.0.0.1:{}/mymaster/0", server.port);
        Ok(server)
    }

    fn launch(durable: bool, extra: impl Fn(u16) -> Vec<String>) -> std::io::Result<Self> {
        Self::launch_as(durable, extra, None, false)
    }

    /// `extra`: more arguments for the port chosen, or for a Sentinel its config file's text.
    fn launch_as(
        durable: bool,
        extra: impl Fn(u16) -> Vec<String>,
        tls: Option<redis::TlsCertificates>,
        sentinel: bool,
    ) -> std::io::Result<Self> {
        let mut last = None;
        // A port found free can be taken before redis-server binds it: try a few.
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            let dir = std::env::temp_dir().join(format!("lpush-redis-{}-{port}", std::process::id()));
            std::fs::create_dir_all(&dir)?;
            let extra = extra(port);
            if sentinel {
                std::fs::write(dir.join("sentinel.conf"), extra.concat())?;
            }
            let mut server = Self {
                url: format!(
                    "{}://127.0.0.1:{port}/0",
                    if tls.is_some() { "rediss" } else { "redis" }
                ),
                port,
                dir,
                extra: if sentinel { Vec::new() } else { extra },
                sentinel,
                tls: tls.clone(),
                running: None,
            };
            match server.run(durable) {
                Ok(()) => return Ok(server),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("redis-server did not start")))
    }

    fn run(&mut self, durable: bool) -> std::io::Result<()> {
        let mut command = Command::new("redis-server");
        if self.sentinel {
            // Sentinel rewrites its config file: one of its own, in its directory.
            command.arg(self.dir.join("sentinel.conf")).arg("--sentinel");
        } else {
            command
                .args([
                    "--port",
                    &self.port.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                ])
                .args(["--appendonly", if durable { "yes" } else { "no" }])
                .args(["--appendfsync", "always"])
                // Bound to loopback anyway; protected mode would refuse clients from 127.x.y.z
                // other than 127.0.0.1 (the fault tests relay through such addresses).
                .args(["--protected-mode", "no"])
                .arg("--dir")
                .arg(&self.dir)
                .args(&self.extra);
        }
        command.stdin(Stdio::null()).stdout(Stdio::null());
        let child = ChildProc::spawn("redis-server", command, None).map_err(std::io::Error::other)?;
        self.running = Some(child);
        self.wait_ready()
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.running.as_ref().map(ChildProc::pid)
    }

    /// Kill it at once (SIGKILL): what it had not written to its append-only file is lost.
    pub fn kill(&mut self) {
        // Dropping it kills and reaps it.
        self.running = None;
    }

    /// Start it again on the same port, with its data (`durable`) or empty.
    pub fn restart(&mut self, durable: bool) -> std::io::Result<()> {
        self.kill();
        if !durable {
            let _ = std::fs::remove_dir_all(&self.dir);
            std::fs::create_dir_all(&self.dir)?;
        }
        self.run(durable)
    }

    /// Poll until it answers PING (it takes a few milliseconds to open its port).
    fn wait_ready(&mut self) -> std::io::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(r) = &mut self.running
                && let Ok(Some(status)) = r.child_mut().try_wait()
            {
                return Err(std::io::Error::other(format!("redis-server exited: {status}")));
            }
            let up = match &self.tls {
                Some(certs) => ping_tls(&self.url, certs),
                None => ping(self.port),
            };
            if up {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::other("redis-server did not answer in 10 s"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A Sentinel's config after its port: `master` as `mymaster`, a quorum of one, short timings.
fn sentinel_conf(master: &RedisServer) -> String {
    format!(
        "bind 127.0.0.1\nprotected-mode no\n\
         sentinel monitor mymaster 127.0.0.1 {} 1\n\
         sentinel down-after-milliseconds mymaster 500\n\
         sentinel failover-timeout mymaster 2000\n\
         sentinel parallel-syncs mymaster 1\n",
        master.port
    )
}

/// Whether a server on `port` answers `PING` (a password-protected one answers `NOAUTH`).
fn ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut reply = [0u8; 7];
    stream.write_all(b"PING\r\n").is_ok()
        && stream.read_exact(&mut reply).is_ok()
        && (&reply == b"+PONG\r\n" || &reply == b"-NOAUTH")
}

/// Whether the TLS server at `url` answers `PING`.
fn ping_tls(url: &str, certs: &redis::TlsCertificates) -> bool {
    redis::Client::build_with_tls(url, certs.clone())
        .and_then(|client| client.get_connection_with_timeout(Duration::from_millis(500)))
        .and_then(|mut conn| redis::cmd("PING").query::<String>(&mut conn))
        .is_ok()
}

/// A CA of its own, a certificate for a TLS `redis-server` on 127.0.0.1 (and `localhost`), and
/// a client certificate, written as PEM files in a directory removed on drop.
pub struct TestCerts {
    /// The CA certificate.
    pub ca: PathBuf,
    /// The server's certificate and key.
    pub server_cert: PathBuf,
    /// See [`Self::server_cert`].
    pub server_key: PathBuf,
    /// The client's certificate and key.
    pub client_cert: PathBuf,
    /// See [`Self::client_cert`].
    pub client_key: PathBuf,
    dir: PathBuf,
}

impl TestCerts {
    /// Generate them under a directory named after `name` (unique within this process).
    pub fn generate(name: &str) -> std::io::Result<Self> {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
            SanType,
        };
        let rcgen = std::io::Error::other;
        let dir = std::env::temp_dir().join(format!("lpush-certs-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let ca_key = KeyPair::generate().map_err(rcgen)?;
        let mut params = CertificateParams::new(Vec::new()).map_err(rcgen)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // Subjects differ from the CA's: OpenSSL takes a certificate named like its issuer for a
        // self-signed one.
        params
            .distinguished_name
            .push(DnType::CommonName, "lpush test CA");
        let ca_pem = params.self_signed(&ca_key).map_err(rcgen)?.pem();
        let issuer = Issuer::new(params, ca_key);
        let issue = |usage: ExtendedKeyUsagePurpose| -> Result<(String, String), rcgen::Error> {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(vec!["localhost".to_string()])?;
            params
                .subject_alt_names
                .push(SanType::IpAddress([127, 0, 0, 1].into()));
            params.distinguished_name.push(DnType::CommonName, "lpush test");
            params.extended_key_usages = vec![usage];
            Ok((params.signed_by(&key, &issuer)?.pem(), key.serialize_pem()))
        };
        let (server_cert, server_key) = issue(ExtendedKeyUsagePurpose::ServerAuth).map_err(rcgen)?;
        let (client_cert, client_key) = issue(ExtendedKeyUsagePurpose::ClientAuth).map_err(rcgen)?;
        let certs = Self {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
            dir,
        };
        for (path, pem) in [
            (&certs.ca, ca_pem),
            (&certs.server_cert, server_cert),
            (&certs.server_key, server_key),
            (&certs.client_cert, client_cert),
            (&certs.client_key, client_key),
        ] {
            std::fs::write(path, pem)?;
        }
        Ok(certs)
    }

    /// What a client of the server needs: the CA and the client certificate.
    pub fn client(&self) -> redis::TlsCertificates {
        let read = |p: &PathBuf| std::fs::read(p).expect("test certificate written");
        redis::TlsCertificates {
            client_tls: Some(redis::ClientTlsConfig {
                client_cert: read(&self.client_cert),
                client_key: read(&self.client_key),
            }),
            root_cert: Some(read(&self.ca)),
        }
    }
}

impl Drop for TestCerts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Copy a directory tree (a cluster node's data directory, to start another node with the same
/// CA and keys).
pub fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}
