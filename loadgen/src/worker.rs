//! More devices than one process may hold (20,000 open files per process on the reference
//! machine): worker processes of this same executable hold the rest.
//!
//! Line protocol on the worker's stdin/stdout: `connect FROM TO` connects devices FROM..TO and
//! answers `ok MILLISECONDS` (or `error TEXT`); end of stdin (the parent is gone or done) ends
//! the worker. It also dies with its parent (`PR_SET_PDEATHSIG`).

use std::{
    io::{BufRead, BufReader, Write},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{ChildStdin, ChildStdout, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use testkit::process::ChildProc;

use crate::{mqtt::MqttFleet, push::Fleet};

/// Devices one process holds by default (sockets count against its 20,000 open files).
pub const PER_PROCESS: usize = 10_000;
/// Sessions being set up at a time when connecting a fleet: below Mosquitto's listen backlog
/// (100, fixed in its source), whose overflow would cost a 1 s SYN retransmission.
pub const WINDOW: usize = 64;

/// Which system a worker's devices talk to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum System {
    Push,
    Mqtt,
}

/// A worker process, seen from the parent.
pub struct Worker {
    _proc: ChildProc,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Worker {
    /// Start `push-loadgen hold` for `system` at `addr`, trusting `ca_file`; push devices take
    /// their credentials from `creds_file` (line i: device i).
    pub fn spawn(
        system: System,
        addr: SocketAddr,
        ca_file: &Path,
        creds_file: Option<&Path>,
        log: &Path,
    ) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        let mut cmd = Command::new(exe);
        cmd.arg("hold")
            .arg(match system {
                System::Push => "push",
                System::Mqtt => "mqtt",
            })
            .arg("--addr")
            .arg(addr.to_string())
            .arg("--ca-file")
            .arg(ca_file);
        if let Some(f) = creds_file {
            cmd.arg("--creds-file").arg(f);
        }
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        let mut proc = ChildProc::spawn("load-generator worker", cmd, Some(log))?;
        let stdin = proc.child_mut().stdin.take().expect("piped");
        let stdout = BufReader::new(proc.child_mut().stdout.take().expect("piped"));
        Ok(Self {
            _proc: proc,
            stdin,
            stdout,
        })
    }

    /// Connect devices `from..to` in the worker; returns the time it took.
    pub fn connect(&mut self, from: usize, to: usize) -> anyhow::Result<Duration> {
        writeln!(self.stdin, "connect {from} {to}")?;
        self.stdin.flush()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        match line.trim().split_once(' ') {
            Some(("ok", ms)) => Ok(Duration::from_millis(ms.parse()?)),
            _ if line.is_empty() => bail!("worker exited; {}", self._proc.log_tail()),
            _ => bail!("worker: {}", line.trim()),
        }
    }
}

/// Arguments of the hidden `hold` command.
#[derive(Debug, clap::Args)]
pub struct HoldArgs {
    #[arg(value_enum)]
    system: System,
    #[arg(long)]
    addr: SocketAddr,
    #[arg(long)]
    ca_file: PathBuf,
    #[arg(long)]
    creds_file: Option<PathBuf>,
}

/// The worker's main loop.
pub async fn hold(args: HoldArgs) -> anyhow::Result<()> {
    let ca = std::fs::read_to_string(&args.ca_file)?;
    let creds: Vec<String> = match &args.creds_file {
        Some(f) => std::fs::read_to_string(f)?.lines().map(str::to_owned).collect(),
        None => Vec::new(),
    };
    let mut push = Fleet::new(args.addr, &ca);
    let mut mqtt = MqttFleet::new(args.addr, &ca, crate::bench::IDLE_KEEPALIVE)?;
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut out = tokio::io::stdout();
    while let Some(line) = lines.next_line().await? {
        let mut words = line.split_whitespace();
        let reply = match (words.next(), words.next(), words.next()) {
            (Some("connect"), Some(from), Some(to)) => {
                let (from, to): (usize, usize) = (from.parse()?, to.parse()?);
                let result = match args.system {
                    System::Push => {
                        let have = push.len();
                        let devices = (from..to).map(|i| {
                            let c = creds.get(i).cloned().context("no credential for device")?;
                            Ok((i, c))
                        });
                        match devices.collect::<anyhow::Result<Vec<_>>>() {
                            Ok(d) => match push.add(d) {
                                Ok(()) => {
                                    push.start_paced(have..push.len(), WINDOW, Duration::from_secs(120))
                                        .await
                                }
                                Err(e) => Err(e),
                            },
                            Err(e) => Err(e),
                        }
                    }
                    System::Mqtt => mqtt.start_paced(from..to, WINDOW, Duration::from_secs(120)).await,
                };
                match result {
                    Ok(took) => format!("ok {}\n", took.as_millis()),
                    Err(e) => format!("error {e:#}\n"),
                }
            }
            _ => format!("error unknown command {line:?}\n"),
        };
        out.write_all(reply.as_bytes()).await?;
        out.flush().await?;
    }
    Ok(())
}
