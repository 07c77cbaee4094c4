//! Child processes (the push-server, Mosquitto, load-generator workers) that cannot outlive us:
//! killed on drop, and killed by the kernel if this process dies first (`PR_SET_PDEATHSIG`), so
//! a panic, an error or a SIGKILL of the load generator leaves nothing running.

use std::{
    io::{Read, Seek, SeekFrom},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use anyhow::Context;

use crate::stats;

/// A child process, killed when dropped.
pub struct ChildProc {
    name: String,
    child: Child,
    log: Option<PathBuf>,
}

impl ChildProc {
    /// Spawn `cmd`; its stderr goes to `log` (if given, else nowhere), stdin and stdout as the
    /// caller set them (default: none).
    pub fn spawn(name: &str, cmd: &mut Command, log: Option<&Path>) -> anyhow::Result<Self> {
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
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name} ({:?})", cmd.get_program()))?;
        Ok(Self {
            name: name.into(),
            child,
            log: log.map(Path::to_path_buf),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Resident memory, KiB.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        stats::rss_kib(self.pid()).with_context(|| format!("{} is not running", self.name))
    }

    /// CPU time used so far.
    pub fn cpu_time(&self) -> std::time::Duration {
        stats::cpu_time(self.pid())
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
    }

    /// Send SIGTERM and wait up to `grace` for it to exit; kill it after that.
    pub fn terminate(&mut self, grace: std::time::Duration) {
        // SAFETY: plain syscall on our own child's pid.
        unsafe {
            libc::kill(self.pid() as i32, libc::SIGTERM);
        }
        let deadline = std::time::Instant::now() + grace;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
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

/// `perf record` of process `pid` while a measurement runs, when `LOADGEN_PROFILE` names a
/// directory (`LOADGEN_PROFILE=/tmp/prof push-loadgen latency ...`): call graphs from DWARF,
/// written to `<dir>/<label>.data`. Stopped (SIGINT, so perf writes its file) on drop.
pub struct Profiler(Option<ChildProc>);

impl Profiler {
    pub fn start(pid: u32, label: &str) -> Self {
        let Some(dir) = std::env::var_os("LOADGEN_PROFILE") else {
            return Self(None);
        };
        let out = std::path::Path::new(&dir).join(format!("{label}.data"));
        let mut cmd = Command::new("perf");
        cmd.args([
            "record",
            "-q",
            "-e",
            "cpu-clock",
            "-F",
            "499",
            "--call-graph",
            "dwarf,16384",
            "-p",
        ])
        .arg(pid.to_string())
        .arg("-o")
        .arg(&out)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
        match ChildProc::spawn("perf", &mut cmd, None) {
            Ok(p) => {
                println!("  profiling process {pid} into {}", out.display());
                Self(Some(p))
            }
            Err(e) => {
                eprintln!("  cannot profile: {e:#}");
                Self(None)
            }
        }
    }
}

impl Drop for Profiler {
    fn drop(&mut self) {
        if let Some(p) = &mut self.0 {
            // SAFETY: plain syscall on our own child's pid.
            unsafe {
                libc::kill(p.pid() as i32, libc::SIGINT);
            }
            let _ = p.child_mut().wait();
        }
    }
}
