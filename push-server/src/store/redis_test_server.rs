//! A throwaway `redis-server` for tests: its own port and directory, no persistence, killed on
//! drop (and, through `PR_SET_PDEATHSIG`, when the test process dies). Depends on std, libc and
//! tempfile only, so integration tests can include it with `#[path = ...] mod`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// The server binary (Debian's package puts it here).
const BINARY: &str = "/usr/bin/redis-server";

/// A running `redis-server` on 127.0.0.1.
pub struct RedisServer {
    /// `redis://127.0.0.1:<port>/`.
    pub url: String,
    child: Child,
    /// The thread that spawned the server, parked until drop: the parent-death signal fires when
    /// the spawning *thread* ends, and test threads (tokio's among them) may end early.
    spawner: Option<(std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>)>,
    _dir: TempDir,
}

impl RedisServer {
    /// Start a server on a free port and wait until it answers `PING`. Panics if it cannot.
    pub fn start() -> Self {
        let mut last_error = String::new();
        // A port found free may be taken before the server binds it: try a few.
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            match Self::start_on(port) {
                Ok(server) => return server,
                Err(e) => last_error = e,
            }
        }
        panic!("redis-server did not start: {last_error}");
    }

    fn start_on(port: u16) -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mut command = Command::new(BINARY);
        command
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: prctl is async-signal-safe; the closure allocates nothing.
        unsafe {
            command.pre_exec(|| {
                // If the test process dies without dropping us, the server dies with it.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let (child_tx, child_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let spawner = std::thread::spawn(move || {
            let spawned = command.spawn().map_err(|e| format!("spawn {BINARY}: {e}"));
            let ok = spawned.is_ok();
            let _ = child_tx.send(spawned);
            if ok {
                let _ = stop_rx.recv();
            }
        });
        let child = child_rx.recv().map_err(|e| e.to_string())??;
        let mut server = Self {
            url: format!("redis://127.0.0.1:{port}/"),
            child,
            spawner: Some((stop_tx, spawner)),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(format!("exited with {status}"));
            }
            if ping(port) {
                return Ok(server);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err("no PONG within 5 s".into())
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
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some((stop, thread)) = self.spawner.take() {
            drop(stop);
            let _ = thread.join();
        }
    }
}
