//! The benchmarks: each starts what it measures (the release push-server, Mosquitto) in a
//! temporary directory, runs bounded in count and time, prints its figures and a table row per
//! figure with the machine's load average, and kills what it started.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use push_proto::sender::{DeliveryState, PlaceCallRequest, SendMessageRequest, WatchCallRequest};
use testkit::process::ChildProc;

use crate::{
    mqtt::{Mosquitto, MqttFleet, MqttPublisher},
    push::{Fleet, PushServer, PushTarget, to_device, to_group},
    recorder::{Arrivals, Recorder},
    stats::{Rng, Summary, cpu_by_thread, cpu_per_item, loadavg, now_ns},
    worker::{System, WINDOW, Worker},
};

/// Heartbeat (push-server) and keep-alive (MQTT) while measuring idle memory: long, so the
/// figure is memory, not heartbeat traffic.
pub const IDLE_KEEPALIVE: Duration = Duration::from_secs(600);
/// The MQTT keep-alive in the other benchmarks: the push-server's default heartbeat interval.
const KEEPALIVE: Duration = Duration::from_secs(30);
/// Longest wait for a fleet to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(180);
/// Longest wait for the last message of a run after the last send.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// What every benchmark needs to know.
#[derive(Debug, Clone)]
pub struct Env {
    pub server_bin: PathBuf,
    pub mosquitto_bin: PathBuf,
    pub systems: Vec<System>,
    /// Devices one load-generator process holds; more go to worker processes.
    pub per_process: usize,
}

impl Env {
    pub(crate) fn runs(&self, s: System) -> bool {
        self.systems.contains(&s)
    }
}

/// Rows of the figures table printed at the end of a benchmark.
#[derive(Default)]
pub struct Table(Vec<[String; 4]>);

impl Table {
    pub(crate) fn row(&mut self, system: &str, what: impl Into<String>, figure: impl Into<String>) {
        let row = [system.into(), what.into(), figure.into(), loadavg()];
        println!("  {} | {} | {} | load {}", row[0], row[1], row[2], row[3]);
        self.0.push(row);
    }

    pub fn print(&self, title: &str) {
        println!("\n{title}\n\n| system | what | figure | loadavg (1/5/15 min) |\n|---|---|---|---|");
        for [s, w, f, l] in &self.0 {
            println!("| {s} | {w} | {f} | {l} |");
        }
    }
}

/// The stage measured before `stage` (0 for the first): sessions added in this stage.
fn previous_stage(counts: &[usize], stage: usize) -> usize {
    counts.iter().filter(|&&c| c < stage).max().copied().unwrap_or(0)
}

/// "N idle sessions", naming the client processes when one could not hold them all.
fn idle_label(stage: usize, per_process: usize) -> String {
    match stage.div_ceil(per_process) {
        1 => format!("{stage} idle sessions"),
        procs => format!("{stage} idle sessions ({procs} client processes)"),
    }
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "-".into()
    }
}

// ---------------------------------------------------------------------------------------------
// Idle sessions

/// Server resident memory per idle session, and logins per second, at growing session counts.
pub async fn idle(env: &Env, push_counts: &[usize], mqtt_counts: &[usize]) -> anyhow::Result<Table> {
    let mut table = Table::default();
    let (mut push_per, mut mqtt_per) = (Vec::new(), Vec::new());
    if env.runs(System::Push) && !push_counts.is_empty() {
        println!("== push-server: idle authenticated TLS 1.3 sessions (heartbeat every 600 s)");
        let total = *push_counts.iter().max().expect("not empty");
        let server = PushServer::start(
            &env.server_bin,
            &["--heartbeat-interval-ms".into(), "600000".into()],
        )
        .await?;
        let t = &server.target;
        let creds = t.register(total).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let base = server.proc().rss_kib()?;
        println!("  server RSS with {total} devices registered and no session: {base} KiB");
        let creds_file = server.data_dir().join("loadgen-creds.txt");
        std::fs::write(&creds_file, creds.join("\n"))?;
        let mut fleet = Fleet::new(t.device_addr, &t.ca);
        let run = IdleRun {
            system: System::Push,
            proc: server.proc(),
            addr: t.device_addr,
            dir: server.data_dir(),
            ca_file: server.data_dir().join("tls/ca.pem"),
            creds_file: Some(creds_file),
            base,
            words: ["push-server", "logins", "server", "login"],
        };
        push_per = run
            .stages(env, push_counts, &mut table, async |from, to| {
                let start = fleet.len();
                fleet.add((from..to).map(|i| (i, creds[i].clone())))?;
                fleet
                    .start_paced(start..fleet.len(), WINDOW, CONNECT_TIMEOUT)
                    .await
            })
            .await?;
    }
    if env.runs(System::Mqtt) && !mqtt_counts.is_empty() {
        println!(
            "== Mosquitto: idle TLS 1.3 MQTT sessions (clean_session=false, one QoS 1 subscription each, keep-alive 600 s)"
        );
        let broker = Mosquitto::start(&env.mosquitto_bin).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let base = broker.proc.rss_kib()?;
        println!("  broker RSS with no session: {base} KiB");
        let ca_file = broker.data_dir().join("loadgen-ca.pem");
        std::fs::write(&ca_file, &broker.ca)?;
        let mut fleet = MqttFleet::new(broker.addr, &broker.ca, IDLE_KEEPALIVE)?;
        let run = IdleRun {
            system: System::Mqtt,
            proc: &broker.proc,
            addr: broker.addr,
            dir: broker.data_dir(),
            ca_file,
            creds_file: None,
            base,
            words: ["mosquitto", "connects+subscribes", "broker", "session"],
        };
        mqtt_per = run
            .stages(env, mqtt_counts, &mut table, async |from, to| {
                fleet.start_paced(from..to, WINDOW, CONNECT_TIMEOUT).await
            })
            .await?;
    }
    for &(stage, push) in &push_per {
        if let Some(&(_, mqtt)) = mqtt_per.iter().find(|p| p.0 == stage) {
            table.row(
                "ratio",
                format!("{stage} sessions, push-server / Mosquitto KiB per session"),
                ratio(push, mqtt),
            );
        }
    }
    Ok(table)
}

/// One system of [`idle`]: the process measured and where its sessions' worker processes
/// connect.
struct IdleRun<'a> {
    system: System,
    proc: &'a ChildProc,
    addr: SocketAddr,
    /// Where the workers' logs go.
    dir: PathBuf,
    ca_file: PathBuf,
    creds_file: Option<PathBuf>,
    /// RSS before any session, KiB.
    base: u64,
    /// The row's system and words: `{rate} {1}/s, {2} CPU {µs} µs/{3}`.
    words: [&'static str; 4],
}

impl IdleRun<'_> {
    /// Grow to each of `counts` sessions, the first `env.per_process` with `connect(from, to)`
    /// in this process and the rest in workers, and add a row per stage; returns the KiB per
    /// session at each stage.
    async fn stages(
        &self,
        env: &Env,
        counts: &[usize],
        table: &mut Table,
        mut connect: impl AsyncFnMut(usize, usize) -> anyhow::Result<Duration>,
    ) -> anyhow::Result<Vec<(usize, f64)>> {
        let [system, what, who, each] = self.words;
        let mut workers = Vec::new();
        let mut have = 0;
        let mut per_session = Vec::new();
        for &stage in counts {
            let drops0 = listen_drops();
            let cpu0 = self.proc.cpu_time();
            let started = Instant::now();
            while have < stage {
                let (from, to) = (have, stage.min(have + env.per_process - have % env.per_process));
                if from < env.per_process {
                    connect(from, to).await?;
                } else {
                    if workers.len() < from / env.per_process {
                        let log = self.dir.join(format!("worker-{}.log", workers.len()));
                        let creds = self.creds_file.as_deref();
                        workers.push(Worker::spawn(self.system, self.addr, &self.ca_file, creds, &log)?);
                    }
                    workers.last_mut().expect("spawned").connect(from, to)?;
                }
                have = to;
            }
            let took = started.elapsed();
            let cpu = self.proc.cpu_time() - cpu0;
            tokio::time::sleep(Duration::from_secs(2)).await;
            let rss = self.proc.rss_kib()?;
            let per = (rss.saturating_sub(self.base)) as f64 / stage as f64;
            let added = stage - previous_stage(counts, stage);
            table.row(
                system,
                idle_label(stage, env.per_process),
                format!(
                    "RSS {:.1} MiB, {per:.2} KiB/session; {:.0} {what}/s, {who} CPU {:.0} µs/{each}{}",
                    rss as f64 / 1024.0,
                    added as f64 / took.as_secs_f64(),
                    cpu.as_secs_f64() * 1e6 / added as f64,
                    syn_drops(drops0),
                ),
            );
            per_session.push((stage, per));
        }
        Ok(per_session)
    }
}

// ---------------------------------------------------------------------------------------------
// Delivery latency

/// Sends one numbered message to one device.
#[derive(Clone)]
pub enum Sender {
    /// `SendMessage` through the gRPC API (TLS), returning once the message is durable.
    Push(Box<PushTarget>, Arc<str>),
    /// A QoS 1 `PUBLISH` to the device's topic.
    Mqtt(Arc<MqttPublisher>),
}

impl Sender {
    /// Warm-up: `n` messages in a second (connections, caches, allocator), checked, not measured.
    async fn warm_up(&self, rec: &Recorder, devices: usize, n: usize, what: &str) -> anyhow::Result<()> {
        let RateRun { sent, received, .. } = run_rate(self, rec, devices, n as f64, n, 7).await?;
        let lost = sent.saturating_sub(received);
        anyhow::ensure!(lost == 0, "{what} lost {lost} of {sent} messages");
        Ok(())
    }

    async fn send(&self, k: usize, device: usize) -> anyhow::Result<()> {
        match self {
            Sender::Push(t, body) => {
                t.api
                    .sender()
                    .send_message(SendMessageRequest {
                        target: to_device(device),
                        title: format!("m{k}"),
                        body: body.to_string(),
                        ..Default::default()
                    })
                    .await?;
                Ok(())
            }
            Sender::Mqtt(p) => p.publish(k, device).await,
        }
    }
}

/// Figures of one fixed-rate run.
pub struct RateRun {
    pub sent: usize,
    pub received: usize,
    pub failed: usize,
    /// Send call to the device's app callback (push) or the subscriber's PUBLISH (MQTT).
    pub latency: Summary,
    /// Send call to its return (push: durable; MQTT: handed to the client's queue).
    pub returned: Summary,
    /// Messages received per second, first send to last arrival.
    pub throughput: f64,
}

/// Send `n` messages at `rate` per second, each to a random one of `devices`, and measure.
/// Sends are scheduled on tokio's 1 ms timer: above 1,000/s they go in bursts each millisecond.
impl RateRun {
    /// The table's figure: latency percentiles, throughput, losses.
    fn figure(&self) -> String {
        format!(
            "p50 {:.3} / p99 {:.3} / p99.9 {:.3} / max {:.3} ms; {:.0} msg/s delivered; {} lost",
            self.latency.p50,
            self.latency.p99,
            self.latency.p999,
            self.latency.max,
            self.throughput,
            self.sent - self.received
        )
    }
}

pub async fn run_rate(
    sender: &Sender,
    rec: &Recorder,
    devices: usize,
    rate: f64,
    n: usize,
    seed: u64,
) -> anyhow::Result<RateRun> {
    run_rate_into(sender, &rec.arm(n, false), devices, rate, n, seed).await
}

/// [`run_rate`] recording into `arrivals`, armed by the caller for at least `n` messages.
async fn run_rate_into(
    sender: &Sender,
    arrivals: &Arrivals,
    devices: usize,
    rate: f64,
    n: usize,
    seed: u64,
) -> anyhow::Result<RateRun> {
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let returned: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let failed = Arc::new(AtomicUsize::new(0));
    let mut rng = Rng::new(seed);
    let start = Instant::now();
    for k in 0..n {
        let at = start + Duration::from_secs_f64(k as f64 / rate);
        if at > Instant::now() {
            tokio::time::sleep_until(at.into()).await;
        }
        let device = rng.below(devices);
        let (sender, sent, returned, failed) =
            (sender.clone(), sent.clone(), returned.clone(), failed.clone());
        tokio::spawn(async move {
            sent[k].store(now_ns(), Ordering::Release);
            match sender.send(k, device).await {
                Ok(()) => returned[k].store(now_ns(), Ordering::Release),
                Err(e) => {
                    if failed.fetch_add(1, Ordering::AcqRel) == 0 {
                        eprintln!("  send failed: {e:#}");
                    }
                }
            }
        });
    }
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    while arrivals.count.load(Ordering::Acquire) + failed.load(Ordering::Acquire) < n
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Sends still in flight are not counted; give them a moment to report.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut latencies = Vec::with_capacity(n);
    let mut returns = Vec::with_capacity(n);
    let (mut first_sent, mut last_arrival) = (u64::MAX, 0);
    for k in 0..n {
        let (s, r, a) = (
            sent[k].load(Ordering::Acquire),
            returned[k].load(Ordering::Acquire),
            arrivals.first[k].load(Ordering::Acquire),
        );
        if s == 0 {
            continue;
        }
        first_sent = first_sent.min(s);
        if r != 0 {
            returns.push(r - s);
        }
        if a != 0 {
            latencies.push(a.saturating_sub(s));
            last_arrival = last_arrival.max(a);
        }
    }
    let received = latencies.len();
    Ok(RateRun {
        sent: n,
        received,
        failed: failed.load(Ordering::Acquire),
        latency: Summary::of_ns(latencies),
        returned: Summary::of_ns(returns),
        throughput: received as f64 / ((last_arrival.saturating_sub(first_sent)) as f64 / 1e9).max(1e-9),
    })
}

/// Sender-to-device latency at fixed rates, each message to a random connected device.
pub async fn latency(
    env: &Env,
    devices: usize,
    rates: &[f64],
    seconds: f64,
    payload: usize,
) -> anyhow::Result<Table> {
    let mut table = Table::default();
    let mut p99s: Vec<(System, f64, f64)> = Vec::new();
    let body: Arc<str> = "x".repeat(payload).into();
    for system in [System::Push, System::Mqtt] {
        if !env.runs(system) {
            continue;
        }
        // Both systems run here, one after the other; each keeps its devices connected through its rates.
        let (sender, rec, name, _server, _broker, _push_fleet, _mqtt_fleet) = match system {
            System::Push => {
                println!(
                    "== push-server: SendMessage (gRPC, TLS) -> app callback in the SDK, {devices} devices, {payload} B body"
                );
                let server = PushServer::start(&env.server_bin, &[]).await?;
                let t = server.target.clone();
                let creds = t.register(devices).await?;
                let mut fleet = Fleet::new(t.device_addr, &t.ca);
                fleet.add(creds.into_iter().enumerate())?;
                let took = fleet.start_paced(0..devices, WINDOW, CONNECT_TIMEOUT).await?;
                println!("  {devices} sessions in {:.1} s", took.as_secs_f64());
                let rec = fleet.rec.clone();
                (
                    Sender::Push(Box::new(t), body.clone()),
                    rec,
                    "push-server",
                    Some(server),
                    None,
                    Some(fleet),
                    None,
                )
            }
            System::Mqtt => {
                println!(
                    "== Mosquitto: PUBLISH QoS 1 -> subscriber receives it, {devices} persistent sessions, {payload} B payload"
                );
                let broker = Mosquitto::start(&env.mosquitto_bin).await?;
                let mut fleet = MqttFleet::new(broker.addr, &broker.ca, KEEPALIVE)?;
                let took = fleet.start_paced(0..devices, WINDOW, CONNECT_TIMEOUT).await?;
                println!("  {devices} sessions in {:.1} s", took.as_secs_f64());
                let publisher = MqttPublisher::connect(broker.addr, &broker.ca, payload).await?;
                let rec = fleet.rec.clone();
                (
                    Sender::Mqtt(Arc::new(publisher)),
                    rec,
                    "mosquitto",
                    None,
                    Some(broker),
                    None,
                    Some(fleet),
                )
            }
        };
        sender
            .warm_up(&rec, devices, 1000, &format!("{name}: warm-up"))
            .await?;
        for &rate in rates {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let n = (rate * seconds).round() as usize;
            let server_pid = match (&_server, &_broker) {
                (Some(s), _) => s.proc().pid(),
                (_, Some(b)) => b.proc.pid(),
                _ => unreachable!("one of them runs"),
            };
            let (server0, self0) = (cpu_by_thread(server_pid), cpu_by_thread(std::process::id()));
            let commits = async {
                match &_server {
                    Some(s) => s
                        .target
                        .metric("lpush_store_commits_total", "")
                        .await
                        .unwrap_or(0.0),
                    None => 0.0,
                }
            };
            let commits0 = commits.await;
            let profiler = crate::procs::Profiler::start(server_pid, &format!("{name}-latency-{rate:.0}"));
            let run = run_rate(&sender, &rec, devices, rate, n, 42).await?;
            drop(profiler);
            if let Some(s) = &_server {
                let commits = s
                    .target
                    .metric("lpush_store_commits_total", "")
                    .await
                    .unwrap_or(0.0)
                    - commits0;
                println!(
                    "  store commits: {commits:.0} ({:.1} messages per commit)",
                    run.received as f64 / commits.max(1.0)
                );
            }
            println!(
                "  CPU per message: {name} {}; load generator {}",
                cpu_per_item(&server0, &cpu_by_thread(server_pid), run.received),
                cpu_per_item(&self0, &cpu_by_thread(std::process::id()), run.received)
            );
            println!(
                "  {rate:.0}/s: {} sent, {} received, {} failed; delivery {}; send call returned {}",
                run.sent,
                run.received,
                run.failed,
                run.latency.line(),
                run.returned.line()
            );
            table.row(
                name,
                format!(
                    "{rate:.0} msg/s to random devices of {devices}, {} messages",
                    run.sent
                ),
                run.figure(),
            );
            if system == System::Push {
                table.row(
                    name,
                    format!("{rate:.0} msg/s: SendMessage returned (durable)"),
                    format!(
                        "p50 {:.3} / p99 {:.3} / p99.9 {:.3} ms",
                        run.returned.p50, run.returned.p99, run.returned.p999
                    ),
                );
            }
            p99s.push((system, rate, run.latency.p99));
        }
    }
    for &(_, rate, push) in p99s.iter().filter(|p| p.0 == System::Push) {
        if let Some(&(_, _, mqtt)) = p99s.iter().find(|p| p.0 == System::Mqtt && p.1 == rate) {
            table.row(
                "ratio",
                format!("{rate:.0} msg/s, p99 push-server / Mosquitto"),
                ratio(push, mqtt),
            );
        }
    }
    Ok(table)
}

/// Cluster mode: phones on node B; messages sent on node A (each crosses nodes through Redis),
/// then on node B (the phone's own node, still writing through Redis).
pub async fn cluster(
    env: &Env,
    devices: usize,
    rates: &[f64],
    seconds: f64,
    payload: usize,
    appendfsync: &str,
) -> anyhow::Result<Table> {
    let mut table = Table::default();
    let body: Arc<str> = "x".repeat(payload).into();
    let redis = testkit::redis::RedisServer::start_with_fsync(appendfsync)?;
    let args = |node: &str| -> Vec<String> {
        vec![
            "--redis-url".into(),
            redis.url.clone(),
            "--node-name".into(),
            node.into(),
        ]
    };
    println!(
        "== push-server cluster: two nodes, one redis-server (appendfsync {appendfsync}), {devices} devices on node B"
    );
    let a = PushServer::start(&env.server_bin, &args("node-a")).await?;
    let b = PushServer::start_from(&env.server_bin, &args("node-b"), Some(&a.data_dir())).await?;
    let creds = a.target.register(devices).await?;
    let mut fleet = Fleet::new(b.target.device_addr, &b.target.ca);
    fleet.add(creds.into_iter().enumerate())?;
    let took = fleet.start_paced(0..devices, WINDOW, CONNECT_TIMEOUT).await?;
    println!("  {devices} sessions on node B in {:.1} s", took.as_secs_f64());
    let rec = fleet.rec.clone();
    for (label, node) in [
        ("sender on node A, phone on node B", &a),
        ("sender and phone on node B", &b),
    ] {
        let sender = Sender::Push(Box::new(node.target.clone()), body.clone());
        sender.warm_up(&rec, devices, 500, "cluster warm-up").await?;
        for &rate in rates {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let n = (rate * seconds).round() as usize;
            let run = run_rate(&sender, &rec, devices, rate, n, 42).await?;
            println!(
                "  {label}, {rate:.0}/s: {} sent, {} received, {} failed; delivery {}",
                run.sent,
                run.received,
                run.failed,
                run.latency.line()
            );
            table.row(
                "push-server cluster",
                format!("{label}: {rate:.0} msg/s to random devices of {devices}, appendfsync {appendfsync}"),
                run.figure(),
            );
        }
    }
    Ok(table)
}

/// Cluster mode at scale: `sessions` idle sessions spread over `nodes` push-server processes
/// sharing one redis-server (a node holds at most ~19k sessions: the open-files limit), held by
/// worker processes of `per_process` phones each. Reports each node's sessions (counted from
/// Redis's leases, so each is a claim the cluster agrees on) and memory per session.
pub async fn cluster_scale(env: &Env, nodes: usize, sessions: usize) -> anyhow::Result<Table> {
    let mut table = Table::default();
    let redis = testkit::redis::RedisServer::start_durable()?;
    let args = |k: usize| -> Vec<String> {
        vec![
            "--redis-url".into(),
            redis.url.clone(),
            "--node-name".into(),
            format!("node-{k}"),
            "--heartbeat-interval-ms".into(),
            "600000".into(),
        ]
    };
    println!(
        "== push-server cluster at scale: {sessions} idle sessions on {nodes} nodes, one redis-server (appendfsync always)"
    );
    let mut servers = vec![PushServer::start(&env.server_bin, &args(0)).await?];
    for k in 1..nodes {
        let template = servers[0].data_dir();
        servers.push(PushServer::start_from(&env.server_bin, &args(k), Some(&template)).await?);
    }
    let started = Instant::now();
    let creds = servers[0].target.register(sessions).await?;
    println!(
        "  {sessions} devices registered in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let dir = servers[0].data_dir();
    let (ca_file, creds_file) = (dir.join("tls/ca.pem"), dir.join("loadgen-creds.txt"));
    std::fs::write(&creds_file, creds.join("\n"))?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let base: Vec<u64> = servers
        .iter()
        .map(|s| s.proc().rss_kib())
        .collect::<anyhow::Result<_>>()?;
    let cpu0: Vec<Duration> = servers.iter().map(|s| s.proc().cpu_time()).collect();
    // Node k holds devices [k * per_node, (k + 1) * per_node).
    let per_node = sessions.div_ceil(nodes);
    let mut workers = Vec::new();
    let started = Instant::now();
    for (k, server) in servers.iter().enumerate() {
        let (mut from, to) = (k * per_node, ((k + 1) * per_node).min(sessions));
        while from < to {
            let upto = (from + env.per_process).min(to);
            let log = dir.join(format!("worker-{}.log", workers.len()));
            let mut worker = Worker::spawn(
                System::Push,
                server.target.device_addr,
                &ca_file,
                Some(&creds_file),
                &log,
            )?;
            worker.connect(from, upto)?;
            workers.push(worker);
            from = upto;
        }
    }
    let took = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let store = push_server::store::RedisStore::connect(&redis.url, "loadgen", false)
        .await
        .context("cannot reach the cluster's redis")?;
    let ids: Vec<String> = (0..sessions).map(crate::push::device_id).collect();
    // Phones a node turned away while it was busy come back after their backoff: count again
    // until every device is held, for up to a minute.
    let settle = Instant::now();
    let holders = loop {
        let mut holders = Vec::with_capacity(sessions);
        for chunk in ids.chunks(10_000) {
            holders.extend(store.holders(chunk).await?);
        }
        let held = holders.iter().filter(|h| h.is_some()).count();
        if held == sessions || settle.elapsed() > Duration::from_secs(60) {
            println!(
                "  {held} of {sessions} devices held {:.1} s after the last worker reported",
                settle.elapsed().as_secs_f64()
            );
            if held < sessions {
                for server in &servers {
                    println!("  {}", server.proc().log_tail());
                }
            }
            break holders;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let mut total_rss = 0;
    for (k, server) in servers.iter().enumerate() {
        let node = format!("node-{k}");
        let expected = ((k + 1) * per_node).min(sessions).saturating_sub(k * per_node);
        let held = holders
            .iter()
            .filter(|h| h.as_deref() == Some(node.as_str()))
            .count();
        let rss = server.proc().rss_kib()?;
        total_rss += rss;
        let cpu = server.proc().cpu_time() - cpu0[k];
        table.row(
            "push-server cluster",
            format!("{node}: {expected} idle sessions"),
            format!(
                "{held} held (Redis leases); RSS {:.1} MiB, {:.2} KiB/session; server CPU {:.0} µs/login",
                rss as f64 / 1024.0,
                rss.saturating_sub(base[k]) as f64 / expected.max(1) as f64,
                cpu.as_secs_f64() * 1e6 / expected.max(1) as f64,
            ),
        );
    }
    let held = holders.iter().filter(|h| h.is_some()).count();
    table.row(
        "push-server cluster",
        format!(
            "{sessions} idle sessions on {nodes} nodes ({} client processes)",
            workers.len()
        ),
        format!(
            "{held} held; connected in {:.1} s ({:.0} logins/s); nodes' RSS {:.1} MiB in all, redis-server {:.1} MiB",
            took.as_secs_f64(),
            sessions as f64 / took.as_secs_f64(),
            total_rss as f64 / 1024.0,
            testkit::process::rss_kib(redis.pid().context("redis-server stopped")?)? as f64 / 1024.0,
        ),
    );
    Ok(table)
}

// ---------------------------------------------------------------------------------------------
// Push-server only: calls, reconnect storms, fan-out

/// `; N SYNs dropped` when the accept queue overflowed since `before`.
fn syn_drops(before: u64) -> String {
    match listen_drops().saturating_sub(before) {
        0 => String::new(),
        n => format!("; {n} SYNs dropped (accept queue full)"),
    }
}

/// SYNs the kernel dropped because a listener's accept queue was full (`ListenOverflows`),
/// machine-wide: a dropped SYN costs the client a 1 s retransmission timeout.
fn listen_drops() -> u64 {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut lines = text.lines();
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        if !names.starts_with("TcpExt:") {
            continue;
        }
        let pos = names.split_whitespace().position(|n| n == "ListenOverflows");
        return pos
            .and_then(|p| values.split_whitespace().nth(p)?.parse().ok())
            .unwrap_or(0);
    }
    0
}

/// A started server with `devices` registered and connected through the SDK.
pub(crate) async fn connected(
    env: &Env,
    devices: usize,
    extra: &[String],
) -> anyhow::Result<(PushServer, Fleet)> {
    let server = PushServer::start(&env.server_bin, extra).await?;
    let t = &server.target;
    let creds = t.register(devices).await?;
    let mut fleet = Fleet::new(t.device_addr, &t.ca);
    fleet.add(creds.into_iter().enumerate())?;
    let took = fleet.start_paced(0..devices, WINDOW, CONNECT_TIMEOUT).await?;
    println!(
        "  {devices} devices connected in {:.1} s ({:.0} logins/s, {WINDOW} in flight)",
        took.as_secs_f64(),
        devices as f64 / took.as_secs_f64()
    );
    Ok((server, fleet))
}

/// `PlaceCall` to one random device at `rate` per second: latency to the invite callback, to
/// `PlaceCall` returning, and to the sender seeing `ACKED` on `WatchCall`.
pub async fn call(env: &Env, devices: usize, rate: f64, seconds: f64) -> anyhow::Result<Table> {
    let mut table = Table::default();
    if !env.runs(System::Push) {
        return Ok(table);
    }
    println!(
        "== push-server: PlaceCall -> CallInvite callback, and -> ACKED seen by the caller, {devices} devices"
    );
    let (server, fleet) = connected(env, devices, &[]).await?;
    let t = server.target.clone();
    let mut rows = Vec::new();
    // A warm-up round, then the measured one.
    for (round, n) in [
        ("warm-up", 200usize),
        ("measured", (rate * seconds).round() as usize),
    ] {
        let arrivals = fleet.rec.arm(n, false);
        let times: Arc<Vec<[AtomicU64; 3]>> = Arc::new((0..n).map(|_| Default::default()).collect());
        let failed = Arc::new(AtomicUsize::new(0));
        let mut rng = Rng::new(99);
        let start = Instant::now();
        let mut tasks = Vec::with_capacity(n);
        for k in 0..n {
            let at = start + Duration::from_secs_f64(k as f64 / rate);
            if at > Instant::now() {
                tokio::time::sleep_until(at.into()).await;
            }
            let device = rng.below(devices);
            let (t, times, failed) = (t.clone(), times.clone(), failed.clone());
            let call_id = format!("c{k}-{round}");
            tasks.push(tokio::spawn(async move {
                let mut api = t.api.sender();
                times[k][0].store(now_ns(), Ordering::Release);
                let placed = api
                    .place_call(PlaceCallRequest {
                        call_id: call_id.clone(),
                        target: to_device(device),
                        caller_name: "Bed 12".into(),
                        caller_handle: "4711".into(),
                        ..Default::default()
                    })
                    .await;
                if placed.is_err() {
                    failed.fetch_add(1, Ordering::AcqRel);
                    return;
                }
                times[k][1].store(now_ns(), Ordering::Release);
                let watch = async {
                    let mut updates = api.watch_call(WatchCallRequest { call_id }).await?.into_inner();
                    while let Some(u) = updates.message().await? {
                        if u.state == DeliveryState::Acked as i32 {
                            times[k][2].store(now_ns(), Ordering::Release);
                            break;
                        }
                    }
                    anyhow::Ok(())
                };
                if tokio::time::timeout(DRAIN_TIMEOUT, watch).await.is_err() {
                    failed.fetch_add(1, Ordering::AcqRel);
                }
            }));
        }
        for task in tasks {
            task.await?;
        }
        let (mut invite, mut placed, mut acked) = (Vec::new(), Vec::new(), Vec::new());
        for (k, [s, p, a]) in times.iter().enumerate() {
            let s = s.load(Ordering::Acquire);
            let inv = arrivals.first[k].load(Ordering::Acquire);
            if inv != 0 {
                invite.push(inv - s);
            }
            match p.load(Ordering::Acquire) {
                0 => {}
                p => placed.push(p - s),
            }
            match a.load(Ordering::Acquire) {
                0 => {}
                a => acked.push(a - s),
            }
        }
        if round == "measured" {
            rows.push((
                n,
                failed.load(Ordering::Acquire),
                Summary::of_ns(invite),
                Summary::of_ns(placed),
                Summary::of_ns(acked),
            ));
        }
    }
    let (n, failed, invite, placed, acked) = rows.pop().context("no measured round")?;
    let what = format!("{n} calls at {rate:.0}/s to random devices of {devices}");
    println!("  {what}: {failed} failed");
    let f = |s: &Summary| {
        format!(
            "p50 {:.3} / p99 {:.3} / p99.9 {:.3} / max {:.3} ms (n={})",
            s.p50, s.p99, s.p999, s.max, s.count
        )
    };
    table.row(
        "push-server",
        format!("{what}: PlaceCall -> invite callback"),
        f(&invite),
    );
    table.row(
        "push-server",
        format!("{what}: PlaceCall returned (durable)"),
        f(&placed),
    );
    table.row(
        "push-server",
        format!("{what}: PlaceCall -> ACKED on WatchCall"),
        f(&acked),
    );
    Ok(table)
}

/// Every device reconnects at the same moment: with TLS session resumption (the same SDK
/// clients, which keep their tickets) and without (new clients, as after an extension restart).
pub async fn storm(env: &Env, devices: usize) -> anyhow::Result<Table> {
    let mut table = Table::default();
    if !env.runs(System::Push) {
        return Ok(table);
    }
    println!("== push-server: reconnect storm, {devices} devices reconnect at once");
    let (server, mut fleet) = connected(env, devices, &[]).await?;
    // Tickets arrive after the handshake; let every client have them.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for resumption in [true, false] {
        fleet.stop_all().await;
        fleet.wait_online(0, Duration::ZERO).await.ok();
        if fleet.rec.online() != 0 {
            bail!("{} devices still online after stopping all", fleet.rec.online());
        }
        if !resumption {
            fleet.renew_clients()?;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let resumed0 = server.target.metric("lpush_tls_resumed_total", "").await?;
        let ok0 = server
            .target
            .metric("lpush_tls_handshakes_total", "result=\"ok\"")
            .await?;
        let cpu0 = cpu_by_thread(server.proc().pid());
        let self0 = cpu_by_thread(std::process::id());
        let net0 = listen_drops();
        let profiler =
            crate::procs::Profiler::start(server.proc().pid(), &format!("storm-resumption-{resumption}"));
        let took = fleet.start_all_at_once(CONNECT_TIMEOUT).await?;
        drop(profiler);
        let drops = listen_drops().saturating_sub(net0);
        let cpu_line = cpu_per_item(&cpu0, &cpu_by_thread(server.proc().pid()), devices);
        let cpu = cpu_by_thread(server.proc().pid())
            .iter()
            .map(|(_, t)| *t)
            .sum::<Duration>()
            .saturating_sub(cpu0.iter().map(|(_, t)| *t).sum());
        println!(
            "  CPU per session: server {cpu_line}; load generator (SDK clients) {}; SYNs dropped by the full accept queue: {drops}",
            cpu_per_item(&self0, &cpu_by_thread(std::process::id()), devices)
        );
        let resumed = server.target.metric("lpush_tls_resumed_total", "").await? - resumed0;
        let handshakes = server
            .target
            .metric("lpush_tls_handshakes_total", "result=\"ok\"")
            .await?
            - ok0;
        table.row(
            "push-server",
            format!(
                "{devices} devices reconnect at once, {}",
                if resumption { "TLS resumption (clients keep their tickets)" } else { "no resumption (new clients)" }
            ),
            format!(
                "all back in {:.2} s: {:.0} sessions/s; {handshakes:.0} handshakes, {resumed:.0} resumed; server CPU {:.0} µs/session; {drops} SYNs dropped (accept queue full)",
                took.as_secs_f64(),
                devices as f64 / took.as_secs_f64(),
                cpu.as_secs_f64() * 1e6 / devices as f64
            ),
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    Ok(table)
}

/// The server crashes (`SIGKILL`) with every phone connected, stays down for `down`, and comes
/// back on the same data: how long after it is ready until every phone is online again, for
/// each SDK backoff cap in `caps` (the SDK's default, and others to compare).
pub async fn outage(env: &Env, devices: usize, down: Duration, caps: &[Duration]) -> anyhow::Result<Table> {
    let mut table = Table::default();
    if !env.runs(System::Push) {
        return Ok(table);
    }
    for &cap in caps {
        println!(
            "== push-server: {devices} phones, the server killed and down {} s, SDK backoff capped at {:.1} s",
            down.as_secs(),
            cap.as_secs_f64()
        );
        let mut server = PushServer::start(&env.server_bin, &[]).await?;
        let creds = server.target.register(devices).await?;
        let mut fleet = Fleet::new(server.target.device_addr, &server.target.ca);
        fleet.backoff.cap = cap;
        fleet.add(creds.into_iter().enumerate())?;
        fleet.start_paced(0..devices, WINDOW, CONNECT_TIMEOUT).await?;
        server.kill();
        fleet.wait_all_offline(Duration::from_secs(60)).await?;
        tokio::time::sleep(down).await;
        let (logins0, drops0) = (fleet.rec.logins(), listen_drops());
        let ready = server.restart().await?;
        // (time since ready, logins since ready), every 10 ms until all are back.
        let mut samples = vec![(Duration::ZERO, 0usize)];
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        while fleet.rec.online() < devices {
            if Instant::now() > deadline {
                bail!(
                    "only {} of {devices} phones back after {CONNECT_TIMEOUT:?}",
                    fleet.rec.online()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            samples.push((ready.elapsed(), fleet.rec.logins() - logins0));
        }
        let back_at = |share: f64| {
            let n = (devices as f64 * share).ceil() as usize;
            samples
                .iter()
                .find(|(_, l)| *l >= n)
                .map_or(Duration::ZERO, |(t, _)| *t)
        };
        // Busiest 100 ms of arrivals: a stampede shows as most of the fleet in one window.
        let busiest = samples
            .iter()
            .map(|(t, l)| {
                let before = samples
                    .iter()
                    .rev()
                    .find(|(u, _)| *u + Duration::from_millis(100) <= *t)
                    .map_or(0, |(_, l)| *l);
                l - before
            })
            .max()
            .unwrap_or(0);
        let drops = listen_drops().saturating_sub(drops0);
        let refused = server
            .target
            .metric("lpush_handshakes_refused_total", "listener=\"device\"")
            .await?;
        let cpu = server.proc().cpu_time();
        // Logins by the end of each second after the server was ready: the shape of the return.
        let per_second: Vec<String> = (1..=back_at(1.0).as_secs() + 1)
            .map(|k| {
                let by = samples
                    .iter()
                    .take_while(|(t, _)| *t <= Duration::from_secs(k))
                    .last()
                    .map_or(0, |(_, l)| *l);
                format!("{k} s: {by}")
            })
            .collect();
        println!("  back by {}", per_second.join(", "));
        table.row(
            "push-server",
            format!(
                "{devices} phones, server killed and down {} s, SDK backoff cap {:.1} s",
                down.as_secs(),
                cap.as_secs_f64()
            ),
            format!(
                "all back {:.2} s after the server was ready (half {:.2} s, 99 % {:.2} s); busiest 100 ms: {busiest} logins; server CPU since the restart {:.0} µs per phone; {refused} handshakes refused, {drops} SYNs dropped",
                back_at(1.0).as_secs_f64(),
                back_at(0.5).as_secs_f64(),
                back_at(0.99).as_secs_f64(),
                cpu.as_secs_f64() * 1e6 / devices as f64
            ),
        );
    }
    Ok(table)
}

/// One message to the group of every device: `SendMessage` to the first, median and last app
/// callback.
pub async fn fanout(env: &Env, devices: usize, repeats: usize) -> anyhow::Result<Table> {
    let mut table = Table::default();
    if !env.runs(System::Push) {
        return Ok(table);
    }
    println!("== push-server: fan-out of one message to a group of {devices} devices");
    let (server, fleet) = connected(env, devices, &[]).await?;
    let mut api = server.target.api.sender();
    let mut lasts = Vec::new();
    let (mut server0, mut self0) = (Vec::new(), Vec::new());
    for r in 0..=repeats {
        if r == 1 {
            (server0, self0) = (
                cpu_by_thread(server.proc().pid()),
                cpu_by_thread(std::process::id()),
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let arrivals = fleet.rec.arm(1, true);
        let profiler = crate::procs::Profiler::start(server.proc().pid(), &format!("fanout-{r}"));
        let t0 = now_ns();
        api.send_message(SendMessageRequest {
            target: to_group(),
            title: "m0".into(),
            body: "Code blue, ward 4B".into(),
            ..Default::default()
        })
        .await?;
        let returned = now_ns() - t0;
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while arrivals.count.load(Ordering::Acquire) < devices {
            if Instant::now() > deadline {
                bail!(
                    "fan-out reached {} of {devices} devices",
                    arrivals.count.load(Ordering::Acquire)
                );
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        drop(profiler);
        let all = arrivals
            .all
            .as_ref()
            .expect("kept")
            .lock()
            .expect("poisoned")
            .clone();
        let s = Summary::of_ns(all.iter().map(|a| a.saturating_sub(t0)).collect());
        let first = all.iter().min().map(|a| a - t0).unwrap_or(0) as f64 / 1e6;
        if r == 0 {
            println!("  warm-up: last device after {:.1} ms", s.max);
            continue;
        }
        println!(
            "  round {r}: first {first:.1} ms, median {:.1} ms, p99 {:.1} ms, last {:.1} ms; SendMessage returned after {:.1} ms",
            s.p50,
            s.p99,
            s.max,
            returned as f64 / 1e6
        );
        lasts.push((s.max, first, s.p50, returned as f64 / 1e6));
    }
    println!(
        "  CPU per recipient (rounds, pauses between them included): server {}; load generator {}",
        cpu_per_item(&server0, &cpu_by_thread(server.proc().pid()), devices * repeats),
        cpu_per_item(&self0, &cpu_by_thread(std::process::id()), devices * repeats)
    );
    lasts.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (last, first, median, returned) = lasts[lasts.len() / 2];
    table.row(
        "push-server",
        format!("1 message to a group of {devices} (median of {repeats} rounds)"),
        format!(
            "last device {last:.1} ms (first {first:.1}, median {median:.1}); SendMessage returned {returned:.1} ms; rounds' last: {}",
            lasts.iter().map(|l| format!("{:.0}", l.0)).collect::<Vec<_>>().join(", ")
        ),
    );
    Ok(table)
}

/// What the smoke run saw.
pub struct SmokeRun {
    /// The messages to one device each.
    pub unicast: RateRun,
    /// The message to the group of every device: time from the send to the last device, ms.
    pub fanout_last_ms: f64,
}

impl SmokeRun {
    /// One line for the log: nothing lost or seen twice (else `smoke` failed), then the figures.
    pub fn line(&self, devices: usize, messages: usize) -> String {
        format!(
            "smoke: {devices} devices; {messages} messages at random devices and 1 to all, every one seen once; \
             unicast {}; group message at every device within {:.0} ms",
            self.unicast.latency.line(),
            self.fanout_last_ms
        )
    }
}

/// The smoke benchmark, run by CI: `devices` devices, `messages` messages at `rate`/s each to a
/// random device, then one message to the group of all of them. Fails when a message is lost
/// or a device's app sees one twice (counted after every session stopped, so late repeats
/// count too); never on timing: its figures are printed, not judged.
pub async fn smoke(
    target: &PushTarget,
    devices: usize,
    messages: usize,
    rate: f64,
) -> anyhow::Result<SmokeRun> {
    let creds = target.register(devices).await?;
    let mut fleet = Fleet::new(target.device_addr, &target.ca);
    fleet.rec.exactly_once.store(true, Ordering::Release);
    fleet.add(creds.into_iter().enumerate())?;
    fleet.start_paced(0..devices, WINDOW, CONNECT_TIMEOUT).await?;
    // One numbering for both phases: the group message is number `messages`.
    let arrivals = fleet.rec.arm(messages + 1, false);
    let sender = Sender::Push(Box::new(target.clone()), "x".repeat(200).into());
    let unicast = run_rate_into(&sender, &arrivals, devices, rate, messages, 1).await?;
    let t0 = now_ns();
    target
        .api
        .sender()
        .send_message(SendMessageRequest {
            target: to_group(),
            title: format!("m{messages}"),
            body: "Code blue, ward 4B".into(),
            ..Default::default()
        })
        .await?;
    let expected = messages + devices;
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    while arrivals.count.load(Ordering::Acquire) - arrivals.duplicates.load(Ordering::Acquire) < expected
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let fanout_last_ms = (now_ns() - t0) as f64 / 1e6;
    fleet.stop_all().await;
    let duplicates = arrivals.duplicates.load(Ordering::Acquire);
    let delivered = arrivals.count.load(Ordering::Acquire) - duplicates;
    if delivered != expected || duplicates != 0 || unicast.failed != 0 {
        bail!(
            "{delivered} of {expected} deliveries ({messages} messages to one device, 1 to {devices}), \
             {duplicates} seen twice, {} sends failed",
            unicast.failed
        );
    }
    Ok(SmokeRun {
        unicast,
        fanout_last_ms,
    })
}

/// Resolve the release push-server binary: `explicit`, else next to this executable's profile
/// directory under `release/`, built first when running under cargo (`cargo run`).
pub fn server_bin(explicit: Option<PathBuf>, build: bool) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p);
    }
    let exe = std::env::current_exe()?;
    let profile_dir = exe.parent().context("executable has no directory")?;
    let target_dir = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("release" | "debug") => profile_dir.parent().context("no target directory")?,
        _ => profile_dir,
    };
    let bin = target_dir.join("release").join("push-server");
    if build && let Some(cargo) = std::env::var_os("CARGO") {
        println!("building the release push-server (cargo build --release -p push-server)");
        let status = std::process::Command::new(cargo)
            .args([
                "build",
                "--release",
                "-q",
                "-p",
                "push-server",
                "--bin",
                "push-server",
            ])
            .status()?;
        if !status.success() {
            bail!("cargo build --release -p push-server failed");
        }
    }
    if !bin.exists() {
        bail!(
            "no release push-server at {}: build it with `cargo build --release -p push-server` or pass --server-bin",
            bin.display()
        );
    }
    Ok(bin)
}

/// The Mosquitto binary, checked only when a benchmark needs it.
pub fn mosquitto_bin(path: &Path) -> PathBuf {
    path.to_path_buf()
}
