//! SDK benchmark: memory of connected sessions and per-message cost. Prints figures; asserts
//! nothing (timing goals are not tests). Run with `cargo bench -p mobile-sdk --bench sdk`.
//!
//! The server runs in a child process (this executable, re-run with an environment variable),
//! so this process's memory and CPU time are the SDK's (plus the runtime and this harness).
//!
//! Figures:
//! 1. memory per connected session: heap bytes (counting allocator) and resident memory
//!    (`VmRSS`) before and after connecting 1 session, then 100 sessions (100 devices);
//! 2. the core alone: time per push through the sans-IO session (decode, de-duplicate, event,
//!    ack), no I/O;
//! 3. end to end: pushes queued at the server while the device is away, then replayed to a
//!    starting client over TLS (acks flowing back, the server's window of 64 unacknowledged
//!    pushes in force): pushes per second and this process's CPU time per push.

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::BytesMut;
use common::{Recorder, SdkConfig};
use mobile_sdk::{
    EventHandler, Registry,
    core::{Config, Event, Session, State, StopReason},
};
use push_proto::{
    device::{Message, Push, ServerFrame, ServerHello, push, server_frame},
    frame,
};
use testkit::harness::{ChildServer, Heartbeat, ServerInfo};
use tokio::sync::mpsc;

/// Counts live heap bytes.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: delegates to the system allocator and only adds bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn heap() -> usize {
    LIVE.load(Ordering::Relaxed)
}

fn rss_kib() -> i64 {
    testkit::process::rss_kib(std::process::id()).unwrap() as i64
}

/// CPU time of this process, ns precision (`/proc/self/stat` counts in 10 ms ticks, too coarse
/// here).
fn cpu() -> Duration {
    testkit::process::cpu_time(std::process::id())
}

fn main() {
    if std::env::var_os(testkit::harness::SERVER_PROCESS_ENV).is_some() {
        return testkit::harness::run_server_process();
    }
    core_only();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(with_server());
}

/// Figure 2: the sans-IO core alone.
fn core_only() {
    const N: u64 = 200_000;
    let mut wire = BytesMut::new();
    for seq in 1..=N {
        let push = Push {
            seq,
            id: format!("message-{seq}"),
            body: Some(push::Body::Message(Message {
                title: "Bed 12: call button".into(),
                body: "Patient asks for assistance".into(),
                ..Default::default()
            })),
        };
        frame::encode(
            &ServerFrame {
                kind: Some(server_frame::Kind::Push(push)),
            },
            &mut wire,
            frame::DEFAULT_MAX_FRAME,
        )
        .unwrap();
    }
    let t0 = Instant::now();
    let mut s = Session::new(Config::new("cred"));
    s.handle_start(t0);
    s.handle_connected(t0, 0);
    let mut hello = BytesMut::new();
    frame::encode(
        &ServerFrame {
            kind: Some(server_frame::Kind::ServerHello(ServerHello {
                heartbeat_interval_ms: 30_000,
                heartbeat_timeout_ms: 10_000,
                ..Default::default()
            })),
        },
        &mut hello,
        frame::DEFAULT_MAX_FRAME,
    )
    .unwrap();
    s.handle_bytes(t0, &hello);
    while s.poll_event().is_some() {}
    let _ = s.poll_transmit();
    let (mut shown, mut ack_bytes) = (0u64, 0usize);
    let start = Instant::now();
    for chunk in wire.chunks(4096) {
        s.handle_bytes(t0, chunk);
        while let Some(e) = s.poll_event() {
            if let Some(seq) = e.push_seq() {
                s.handle_delivered(t0, seq);
                shown += 1;
            }
        }
        if let Some(out) = s.poll_transmit() {
            ack_bytes += out.len();
        }
    }
    let took = start.elapsed();
    assert_eq!(shown, N);
    println!(
        "core alone: {N} pushes in {took:?}: {:.0} ns per push ({:.2} M pushes/s), {ack_bytes} ack bytes",
        took.as_nanos() as f64 / N as f64,
        N as f64 / took.as_secs_f64() / 1e6
    );
}

struct Count(mpsc::UnboundedSender<()>);

impl EventHandler for Count {
    fn on_event(&self, event: Event) {
        if matches!(event, Event::Message(_)) {
            let _ = self.0.send(());
        }
    }
}

async fn with_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = ChildServer::start(dir.path(), Heartbeat::default());
    let info = server.info.clone();
    let registry = Registry::new(tokio::runtime::Handle::current());

    // Figure 1: memory per connected session.
    let devices = 100;
    let mut credentials = Vec::new();
    for i in 0..devices {
        credentials.push(info.issue(&format!("bench-{i}")).await);
    }
    // Warm up: one full session cycle, so lazily built statics are not counted.
    let (h, mut ev) = Recorder::new();
    let warm = registry
        .client(info.client_config("bench-0", &credentials[0]), h)
        .unwrap();
    warm.start().await.unwrap();
    ev.connected().await;
    warm.stop(StopReason::HostRequested).await;
    drop((warm, ev));

    let (heap0, rss0) = (heap(), rss_kib());
    let mut clients = Vec::new();
    let mut recorders = Vec::new();
    for (i, credential) in credentials.iter().enumerate() {
        let (h, mut ev) = Recorder::new();
        let client = registry
            .client(info.client_config(&format!("bench-{i}"), credential), h)
            .unwrap();
        if i == 0 {
            println!(
                "1 client created, not started (configuration, TLS configuration): heap +{} KiB",
                (heap() - heap0) / 1024
            );
        }
        client.start().await.unwrap();
        ev.connected().await;
        ev.seen.clear();
        clients.push(client);
        recorders.push(ev);
        if i == 0 {
            let (heap1, rss1) = (heap(), rss_kib());
            println!(
                "1 connected session: heap +{} KiB, RSS +{} KiB (RSS {rss0} -> {rss1} KiB)",
                (heap1 - heap0) / 1024,
                rss1 - rss0
            );
        }
    }
    let (heap_n, rss_n) = (heap(), rss_kib());
    println!(
        "{devices} connected sessions: heap +{} KiB ({:.1} KiB each), RSS +{} KiB ({:.1} KiB each)",
        (heap_n - heap0) / 1024,
        (heap_n - heap0) as f64 / 1024.0 / devices as f64,
        rss_n - rss0,
        (rss_n - rss0) as f64 / devices as f64
    );
    for client in &clients {
        assert!(matches!(client.state(), State::Connected { .. }));
        client.stop(StopReason::HostRequested).await;
    }
    drop((clients, recorders));

    // Figure 3: end-to-end replay throughput. The server queues at most 1,000 pushes per
    // device (`max_queued_per_device`), so each round queues 1,000 while the client is away.
    let (rounds, per_round) = (10, 1_000);
    let api = info.api().await;
    let credential = info.issue("bench-tp").await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut config = info.client_config("bench-tp", &credential);
    let (mut took, mut cpu_used) = (Duration::ZERO, Duration::ZERO);
    for round in 0..rounds {
        for i in 0..per_round {
            ServerInfo::send(&api, "bench-tp", &format!("tp-{round}-{i}")).await;
        }
        let client = registry
            .client(config.clone(), Arc::new(Count(tx.clone())))
            .unwrap();
        let (cpu0, t0) = (cpu(), Instant::now());
        client.start().await.unwrap();
        let all = async {
            for _ in 0..per_round {
                rx.recv().await.unwrap();
            }
        };
        tokio::time::timeout(Duration::from_secs(120), all)
            .await
            .expect("replay did not complete in 120 s");
        took += t0.elapsed();
        cpu_used += cpu() - cpu0;
        client.stop(StopReason::HostRequested).await;
        config.last_seen = client.last_seen();
    }
    let n = rounds * per_round;
    println!(
        "end to end: {n} queued pushes replayed over TLS in {took:?}: {:.0} pushes/s; \
         SDK process CPU {cpu_used:?} ({:.1} us per push)",
        n as f64 / took.as_secs_f64(),
        cpu_used.as_micros() as f64 / n as f64
    );
    drop(server);
}
