//! The smoke benchmark CI runs: 2,000 simulated SDK devices (on spread source addresses)
//! against a real server in this process, 3,000 messages through the gRPC API at 1,000/s to
//! random devices, then one message to the group of all 2,000. It fails on a lost message or
//! one an app saw twice, never on timing: the figures are printed (`--nocapture`).

use std::time::Duration;

use push_loadgen::push::PushTarget;
use testkit::harness::Harness;

const DEVICES: usize = 2_000;
const MESSAGES: usize = 3_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_reaches_its_devices_once() {
    let mut server = Harness::start().await;
    let target = PushTarget {
        device_addr: server.info.device_addr,
        api_addr: server.info.api_addr,
        http_addr: server.http_addr(),
        api: server.api.clone(),
        ca: server.ca.clone(),
        api_key: server.admin_key(),
    };
    let run = tokio::time::timeout(
        Duration::from_secs(240),
        push_loadgen::bench::smoke(&target, DEVICES, MESSAGES, 1_000.0),
    )
    .await
    .expect("smoke run timed out")
    .unwrap();
    println!("{}", run.line(DEVICES, MESSAGES));
    assert_eq!(run.unicast.received, MESSAGES);
    // The metrics endpoint answers the load generator (it reads handshake counters from it).
    assert!(
        target
            .metric("lpush_tls_handshakes_total", "result=\"ok\"")
            .await
            .unwrap()
            >= DEVICES as f64
    );
    server.shutdown().await;
}
