//! Child processes that cannot outlive the test or benchmark that started them: killed on drop,
//! and killed by the kernel if this process dies first (`PR_SET_PDEATHSIG`), so a panic, an error
//! or a SIGKILL leaves nothing running; their output read line by line without ever blocking
//! them.

use std::{
    io::{BufRead, BufReader, Read, Seek, SeekFrom},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, mpsc},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Context;

/// A child process, killed when dropped.
pub struct ChildProc {
    name: String,
    child: Child,
    log: Option<PathBuf>,
    /// `PR_SET_PDEATHSIG` fires when the spawning *thread* exits (a test's `spawn_blocking`
    /// thread ends when idle): a thread of its own spawns it and lives as long as it.
    spawner: Option<(mpsc::Sender<()>, JoinHandle<()>)>,
}

impl ChildProc {
    /// Spawn `cmd`; its stderr goes to `log` (if given, else nowhere), stdin and stdout as the
    /// caller set them (default: none).
    pub fn spawn(name: &str, mut cmd: Command, log: Option<&Path>) -> anyhow::Result<Self> {
        let stderr = match log {
            Some(path) => Stdio::from(
                std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?,
            ),
            None => Stdio::null(),
        };
        cmd.stderr(stderr);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let program = cmd.get_program().to_owned();
        let (child_tx, child_rx) = mpsc::channel();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let spawned = cmd.spawn();
            let ok = spawned.is_ok();
            let _ = child_tx.send(spawned);
            if ok {
                let _ = stop_rx.recv();
            }
        });
        let child = child_rx
            .recv()
            .context("the spawning thread died")?
            .with_context(|| format!("cannot start {name} ({program:?})"))?;
        Ok(Self {
            name: name.into(),
            child,
            log: log.map(Path::to_path_buf),
            spawner: Some((stop_tx, thread)),
        })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process, to take its pipes or wait for it.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Resident memory, KiB.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        rss_kib(self.pid()).with_context(|| format!("{} is not running", self.name))
    }

    /// CPU time used so far.
    pub fn cpu_time(&self) -> Duration {
        cpu_time(self.pid())
    }

    /// Fail with the end of its log if it has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            anyhow::bail!("{} exited ({status}); {}", self.name, self.log_tail());
        }
        Ok(())
    }

    /// The last lines of its stderr log, for error messages.
    pub fn log_tail(&self) -> String {
        let Some(path) = &self.log else {
            return "no log".into();
        };
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(path) {
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = f.seek(SeekFrom::Start(len.saturating_sub(2000)));
            let _ = f.read_to_string(&mut text);
        }
        if text.trim().is_empty() {
            format!("its log {} is empty", path.display())
        } else {
            format!("end of its log {}:\n{}", path.display(), text.trim_end())
        }
    }

    /// Kill it (`SIGKILL`) and reap it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some((stop, thread)) = self.spawner.take() {
            drop(stop);
            let _ = thread.join();
        }
    }

    /// Send SIGTERM and wait up to `grace` for it to exit; kill it after that.
    pub fn terminate(&mut self, grace: Duration) {
        // SAFETY: plain syscall on our own child's pid.
        unsafe {
            libc::kill(self.pid() as i32, libc::SIGTERM);
        }
        wait_exit(&mut self.child, grace);
        self.kill();
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A free TCP port on 127.0.0.1 (bound, then released: good enough for a child to take it).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Resident memory of process `pid` (VmRSS), KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS for process {pid}"))
}

/// CPU time process `pid` has used so far: the sum over its threads of the scheduler's run time
/// (nanosecond precision). Threads that already ended are not counted, so measure deltas over
/// periods in which the process keeps its threads (tokio workers do).
pub fn cpu_time(pid: u32) -> Duration {
    let ns: u64 = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    Duration::from_nanos(ns)
}

/// Wait for a child to exit, polling; `None` if it is still running after `timeout`.
pub fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Lines of a child's stdout, read on a thread (so the pipe never fills) and handed over as they
/// arrive.
pub struct LineReader {
    rx: mpsc::Receiver<String>,
    seen: Arc<Mutex<Vec<String>>>,
}

impl LineReader {
    /// Start reading `source` line by line.
    pub fn spawn(source: impl std::io::Read + Send + 'static) -> Self {
        let (tx, rx) = mpsc::channel();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let all = seen.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(source).lines() {
                let Ok(line) = line else { break };
                all.lock().expect("poisoned").push(line.clone());
                // The receiver may be gone; keep draining so the child never blocks on the pipe.
                let _ = tx.send(line);
            }
        });
        Self { rx, seen }
    }

    /// The next line containing `needle`; `Err` with the reason on timeout or end of output.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return Ok(line),
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(format!("no line containing {needle:?} within {timeout:?}"));
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(format!("output ended without a line containing {needle:?}"));
                }
            }
        }
    }

    /// Every line read so far.
    pub fn lines(&self) -> Vec<String> {
        self.seen.lock().expect("poisoned").clone()
    }
}
