//! Support for tests that need a real Redis (this crate's, `e2e`'s): a `redis-server` of its
//! own on a free loopback port, in a directory of its own, stopped when dropped. Not used by
//! the server itself.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// A running `redis-server`.
pub struct RedisServer {
    /// `redis://127.0.0.1:<port>/0`.
    pub url: String,
    /// Its port.
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl RedisServer {
    /// Start one with no persistence (tests that restart Redis use [`RedisServer::start_durable`]).
    pub fn start() -> std::io::Result<Self> {
        Self::launch(false)
    }

    /// Start one with an append-only file fsynced on every write, so a restart keeps what it
    /// acknowledged.
    pub fn start_durable() -> std::io::Result<Self> {
        Self::launch(true)
    }

    fn launch(durable: bool) -> std::io::Result<Self> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let dir = std::env::temp_dir().join(format!("lpush-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let mut server = Self {
            url: format!("redis://127.0.0.1:{port}/0"),
            port,
            dir,
            child: None,
        };
        server.run(durable)?;
        Ok(server)
    }

    fn run(&mut self, durable: bool) -> std::io::Result<()> {
        let aof = if durable { "yes" } else { "no" };
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", aof, "--appendfsync", "always"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        self.child = Some(child);
        self.wait_ready()
    }

    /// Kill it at once (SIGKILL): what it had not written to its append-only file is lost.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
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
    fn wait_ready(&self) -> std::io::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) {
                let mut buf = [0u8; 7];
                if s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
                {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::other("redis-server did not answer in 10 s"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
