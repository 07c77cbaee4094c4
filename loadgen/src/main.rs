//! `push-loadgen`: one command per benchmark; see BENCHMARKS.md.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};
use push_loadgen::{
    bench::{self, Env},
    mqtt::DEFAULT_MOSQUITTO,
    stats::loadavg,
    worker::{self, System},
};

/// Benchmarks of the push-server (release binary, started here) with simulated devices running
/// the real mobile-sdk, side by side with Mosquitto. Loopback only; bounded in count and time.
#[derive(Parser)]
#[command(name = "push-loadgen")]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct Common {
    /// The push-server binary [default: target/release/push-server, rebuilt first under `cargo run`].
    #[arg(long, global = true)]
    server_bin: Option<PathBuf>,
    /// Do not run `cargo build --release -p push-server` first under `cargo run`.
    #[arg(long, global = true)]
    no_build: bool,
    /// The Mosquitto binary (Debian: `apt-get install mosquitto`).
    #[arg(long, global = true, default_value = DEFAULT_MOSQUITTO)]
    mosquitto_bin: PathBuf,
    /// Systems to measure, where the benchmark has both.
    #[arg(
        long,
        global = true,
        value_enum,
        value_delimiter = ',',
        default_value = "push,mqtt"
    )]
    systems: Vec<System>,
    /// Devices one load-generator process holds; worker processes hold the rest.
    #[arg(long, global = true, default_value_t = worker::PER_PROCESS)]
    per_process: usize,
    /// Give up (and kill everything started) after this many seconds.
    #[arg(long, global = true, default_value_t = 600)]
    max_seconds: u64,
}

#[derive(Subcommand)]
enum Command {
    /// Idle sessions: server resident memory per session and logins/s at each count.
    Idle {
        /// Session counts for the push-server (above 10,000 a second client process holds the rest).
        #[arg(long, value_delimiter = ',', default_value = "1000,5000,10000,18000")]
        counts: Vec<usize>,
        /// Session counts for Mosquitto.
        #[arg(long, value_delimiter = ',', default_value = "1000,5000,10000,18000")]
        mqtt_counts: Vec<usize>,
    },
    /// Delivery latency (send call -> app callback) at fixed rates to random connected devices.
    Latency {
        #[arg(long, default_value_t = 10_000)]
        devices: usize,
        /// Messages per second.
        #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
        rates: Vec<f64>,
        /// Seconds per rate.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Message body (push) and payload (MQTT) size, bytes.
        #[arg(long, default_value_t = 200)]
        payload: usize,
    },
    /// Cluster mode: delivery latency from a sender on node A to phones on node B, and on one
    /// node, two push-server nodes sharing a redis-server (AOF, fsync always).
    Cluster {
        #[arg(long, default_value_t = 2_000)]
        devices: usize,
        /// Messages per second.
        #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
        rates: Vec<f64>,
        /// Seconds per rate.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        #[arg(long, default_value_t = 200)]
        payload: usize,
        /// Redis's `appendfsync`: `always` (every acknowledged write survives a crash of its
        /// host), `everysec` or `no`.
        #[arg(long, default_value = "always")]
        appendfsync: String,
    },
    /// Cluster mode at scale: idle sessions spread over several nodes (each process may hold
    /// at most ~19k sessions), memory per session on each node.
    ClusterScale {
        #[arg(long, default_value_t = 6)]
        nodes: usize,
        #[arg(long, default_value_t = 100_000)]
        sessions: usize,
    },
    /// Call alert latency: PlaceCall -> invite callback, and -> ACKED seen by the caller.
    Call {
        #[arg(long, default_value_t = 10_000)]
        devices: usize,
        /// Calls per second.
        #[arg(long, default_value_t = 200.0)]
        rate: f64,
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
    },
    /// The clinical call loop: calls ringing a team of phones, one answers (round-robin); time
    /// from its ANSWERED report to ANSWERED on the caller's WatchCall, to each other phone's
    /// CallCancel{ANSWERED_ELSEWHERE}, and to its CallOutcomeReply. Every call is checked; a
    /// violation fails the run.
    Answer {
        /// Measured calls (after a warm-up of 5 per slot).
        #[arg(long, default_value_t = 1_000)]
        calls: usize,
        /// Phones each call rings (a team per slot: callees x in-flight phones in all).
        #[arg(long, default_value_t = 3)]
        callees: usize,
        /// Calls under way at once, each slot placing its calls one after the other.
        #[arg(long, default_value_t = 8)]
        in_flight: usize,
    },
    /// Reconnect storm: every device reconnects at once, with and without TLS resumption.
    Storm {
        #[arg(long, default_value_t = 10_000)]
        devices: usize,
    },
    /// Recovery after an outage: the server killed with every phone connected, down for a
    /// while, restarted; time until every phone is back, per SDK backoff cap.
    Outage {
        #[arg(long, default_value_t = 10_000)]
        devices: usize,
        /// Seconds the server stays down.
        #[arg(long, default_value_t = 300)]
        down_secs: u64,
        /// SDK backoff caps to compare, seconds (3 is the SDK's default, 30 the cap before it).
        #[arg(long, value_delimiter = ',', default_value = "3,30")]
        caps: Vec<f64>,
    },
    /// Fan-out: one message to a group of every device.
    Fanout {
        #[arg(long, default_value_t = 10_000)]
        devices: usize,
        /// Measured rounds (after one warm-up round).
        #[arg(long, default_value_t = 5)]
        repeats: usize,
    },
    /// The smoke benchmark (CI runs it in-process): messages to random devices, then one to
    /// the group of all of them; fails on a lost or duplicated message, never on timing.
    Smoke {
        #[arg(long, default_value_t = 2_000)]
        devices: usize,
        #[arg(long, default_value_t = 3_000)]
        messages: usize,
        /// Messages per second.
        #[arg(long, default_value_t = 1_000.0)]
        rate: f64,
    },
    /// (internal) Hold devices for a parent load generator.
    #[command(hide = true)]
    Hold(worker::HoldArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    apns_bridge::daemon::init_tracing_at("warn", false);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Command::Hold(args) = cli.command {
        return match runtime.block_on(worker::hold(args)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("worker: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let limit = cli.common.max_seconds;
    // The watchdog: past the limit the process exits, and its children die with it.
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(limit));
        eprintln!("push-loadgen: gave up after {limit} s (--max-seconds)");
        std::process::exit(3);
    });
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("push-loadgen: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let c = cli.common;
    let env = Env {
        server_bin: bench::server_bin(c.server_bin, !c.no_build)?,
        mosquitto_bin: c.mosquitto_bin,
        systems: c.systems,
        per_process: c.per_process.max(1),
    };
    println!("load average at start: {}", loadavg());
    let (title, table) = match cli.command {
        Command::Idle { counts, mqtt_counts } => {
            ("Idle sessions", bench::idle(&env, &counts, &mqtt_counts).await?)
        }
        Command::Latency {
            devices,
            rates,
            seconds,
            payload,
        } => (
            "Delivery latency",
            bench::latency(&env, devices, &rates, seconds, payload).await?,
        ),
        Command::Cluster {
            devices,
            rates,
            seconds,
            payload,
            appendfsync,
        } => (
            "Cluster delivery latency",
            bench::cluster(&env, devices, &rates, seconds, payload, &appendfsync).await?,
        ),
        Command::ClusterScale { nodes, sessions } => (
            "Cluster at scale",
            bench::cluster_scale(&env, nodes.max(1), sessions).await?,
        ),
        Command::Call {
            devices,
            rate,
            seconds,
        } => (
            "Call alert latency",
            bench::call(&env, devices, rate, seconds).await?,
        ),
        Command::Answer {
            calls,
            callees,
            in_flight,
        } => {
            let (table, violations) = push_loadgen::answer::answer(&env, calls, callees, in_flight).await?;
            table.print("The clinical call loop: answer to ANSWERED and to the others' cancel");
            println!("\nload average at end: {}", loadavg());
            if violations > 0 {
                anyhow::bail!("{violations} calls broke a rule (see VIOLATION above)");
            }
            return Ok(());
        }
        Command::Storm { devices } => ("Reconnect storm", bench::storm(&env, devices).await?),
        Command::Outage {
            devices,
            down_secs,
            caps,
        } => {
            let caps = caps
                .iter()
                .map(|s| {
                    Duration::try_from_secs_f64(*s)
                        .map_err(|_| anyhow::anyhow!("--caps: {s} is not a duration"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            (
                "Recovery after an outage",
                bench::outage(&env, devices, Duration::from_secs(down_secs), &caps).await?,
            )
        }
        Command::Fanout { devices, repeats } => ("Fan-out", bench::fanout(&env, devices, repeats).await?),
        Command::Smoke {
            devices,
            messages,
            rate,
        } => {
            let mut server = push_loadgen::push::PushServer::start(&env.server_bin, &[]).await?;
            let run = bench::smoke(&server.target, devices, messages, rate).await;
            // A graceful stop, so a server run under a profiler (`--server-bin` a wrapper that
            // execs `valgrind --tool=callgrind`) writes its counts.
            server.process.terminate_within(Duration::from_secs(120));
            println!("{}", run?.line(devices, messages));
            return Ok(());
        }
        Command::Hold(_) => unreachable!("handled in main"),
    };
    table.print(title);
    println!("\nload average at end: {}", loadavg());
    Ok(())
}
