//! Profiling a child process (the push-server, Mosquitto) while a measurement runs; the
//! children themselves are [`testkit::process::ChildProc`]s.

use std::process::{Command, Stdio};

use testkit::process::ChildProc;

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
        match ChildProc::spawn("perf", cmd, None) {
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
