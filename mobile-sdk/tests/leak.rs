//! Leak test: 1,000 start/stop cycles and 1,000 supersede cycles against a real server (in a
//! child process, so this process holds only the SDK) end with no live task, session or
//! socket, the file descriptors of the start, and the resident memory of the start.

mod common;

use common::{Recorder, SdkConfig, connect};
use mobile_sdk::{Registry, core::StopReason};
use testkit::harness::{ChildServer, Heartbeat, STEP};

testkit::server_process_entry!();

const CYCLES: usize = 1_000;
/// Cycles before the baseline: allocator pools, lazy statics, the runtime's threads.
const WARM_UP: usize = 50;
/// Resident memory allowed above the baseline after the cycles. A leak of a single session
/// (task, TLS state, buffers: tens of KiB) per 100 cycles would exceed it.
const RSS_SLACK_KIB: i64 = 512;

fn rss_kib() -> i64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_start_stop_and_supersede_cycles_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let server = ChildServer::start(dir.path(), Heartbeat::default());
    let info = server.info.clone();
    let credential = info.issue("dev-leak").await;
    let registry = Registry::new(tokio::runtime::Handle::current());
    let config = info.client_config("dev-leak", &credential);

    // One start/stop cycle; every tenth stops mid-connect instead of after the ServerHello.
    let start_stop = |i: usize| {
        let (registry, config) = (registry.clone(), config.clone());
        async move {
            let (handler, mut events) = Recorder::new();
            let client = registry.client(config, handler).unwrap();
            client.start().await.unwrap();
            if !i.is_multiple_of(10) {
                events.connected().await;
            }
            client.stop(StopReason::HostRequested).await;
        }
    };
    for i in 0..WARM_UP {
        start_stop(i).await;
    }
    let quiet = |s: &mobile_sdk::Snapshot| s.is_quiet() && s.instances == 0;
    registry.wait_for_counters(STEP, quiet).await.unwrap();
    let (rss0, fds0) = (rss_kib(), open_fds());

    for i in 0..CYCLES {
        start_stop(i).await;
    }
    let snap = registry.wait_for_counters(STEP, quiet).await;
    assert!(snap.is_ok(), "after start/stop cycles: {snap:?}");
    let (rss1, fds1) = (rss_kib(), open_fds());
    println!("{CYCLES} start/stop cycles: RSS {rss0} -> {rss1} KiB, fds {fds0} -> {fds1}");

    // Supersede cycles: each new instance starts while the previous one is connected, then
    // the host drops the previous one (as iOS should, and sometimes does not).
    let mut previous = None;
    for _ in 0..CYCLES {
        let (client, _events) = connect(&registry, config.clone()).await;
        let snap = registry.counters();
        assert_eq!(
            (snap.sessions, snap.sockets, snap.connected),
            (1, 1, 1),
            "{snap:?}"
        );
        previous = Some(client);
    }
    previous.unwrap().stop(StopReason::HostRequested).await;
    let snap = registry.wait_for_counters(STEP, quiet).await;
    assert!(snap.is_ok(), "after supersede cycles: {snap:?}");
    let (rss2, fds2) = (rss_kib(), open_fds());
    println!("{CYCLES} supersede cycles: RSS {rss1} -> {rss2} KiB, fds {fds1} -> {fds2}");

    assert_eq!(fds1, fds0, "file descriptors after start/stop cycles");
    assert_eq!(fds2, fds0, "file descriptors after supersede cycles");
    assert!(
        rss1 - rss0 < RSS_SLACK_KIB,
        "RSS grew {} KiB over start/stop cycles",
        rss1 - rss0
    );
    assert!(
        rss2 - rss0 < RSS_SLACK_KIB,
        "RSS grew {} KiB over supersede cycles",
        rss2 - rss0
    );
    drop(server);
}
