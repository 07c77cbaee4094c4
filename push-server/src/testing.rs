//! Support for tests that need a real Redis (this crate's, `e2e`'s): a `redis-server` of its
//! own on a free loopback port, in a directory of its own, stopped when dropped, and killed by
//! the kernel if the test process dies first. Not used by the server itself.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// A running `redis-server`.
pub struct RedisServer {
    /// `redis://127.0.0.1:<port>/0`.
    pub url: String,
    /// Its port.
    pub port: u16,
    dir: PathBuf,
    running: Option<Running>,
}

/// The process, and the thread that spawned it: `PR_SET_PDEATHSIG` fires when the spawning
/// *thread* exits, so that thread lives as long as the server.
struct Running {
    child: Child,
    spawner: (mpsc::Sender<()>, JoinHandle<()>),
}

impl RedisServer {
    /// Start one with no persistence.
    pub fn start() -> std::io::Result<Self> {
        Self::launch(false)
    }

    /// Start one with an append-only file fsynced on every write, so a restart keeps what it
    /// acknowledged.
    pub fn start_durable() -> std::io::Result<Self> {
        Self::launch(true)
    }

    fn launch(durable: bool) -> std::io::Result<Self> {
        let mut last = None;
        // A port found free can be taken before redis-server binds it: try a few.
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            let dir = std::env::temp_dir().join(format!("lpush-redis-{}-{port}", std::process::id()));
            std::fs::create_dir_all(&dir)?;
            let mut server = Self {
                url: format!("redis://127.0.0.1:{port}/0"),
                port,
                dir,
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
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let (child_tx, child_rx) = mpsc::channel();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let spawned = command.spawn();
            let ok = spawned.is_ok();
            let _ = child_tx.send(spawned);
            if ok {
                let _ = stop_rx.recv();
            }
        });
        let child = child_rx
            .recv()
            .map_err(|e| std::io::Error::other(e.to_string()))??;
        self.running = Some(Running {
            child,
            spawner: (stop_tx, thread),
        });
        self.wait_ready()
    }

    /// Kill it at once (SIGKILL): what it had not written to its append-only file is lost.
    pub fn kill(&mut self) {
        if let Some(mut r) = self.running.take() {
            let _ = r.child.kill();
            let _ = r.child.wait();
            let (stop, thread) = r.spawner;
            drop(stop);
            let _ = thread.join();
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
    fn wait_ready(&mut self) -> std::io::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(r) = &mut self.running
                && let Ok(Some(status)) = r.child.try_wait()
            {
                return Err(std::io::Error::other(format!("redis-server exited: {status}")));
            }
            if ping(self.port) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::other("redis-server did not answer in 10 s"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Whether a server on `port` answers `PING`.
fn ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut reply = [0u8; 7];
    stream.write_all(b"PING\r\n").is_ok() && stream.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
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
