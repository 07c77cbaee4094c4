//! The smoke benchmark CI runs: 2,000 simulated SDK devices (on spread source addresses)
//! against a real server in this process, 3,000 messages through the gRPC API at 1,000/s to
//! random devices, then one message to the group of all 2,000. It fails on a lost message or
//! one an app saw twice, never on timing: the figures are printed (`--nocapture`).

use std::time::Duration;

use push_loadgen::push::{PushTarget, SERVER_NAME};
use push_server::{api_client::ApiClient, config::Config, server::Server};

const DEVICES: usize = 2_000;
const MESSAGES: usize = 3_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_reaches_its_devices_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(Config {
        data_dir: dir.path().to_path_buf(),
        device_listen: "127.0.0.1:0".parse().unwrap(),
        api_listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    })
    .await
    .unwrap();
    let ca = std::fs::read_to_string(dir.path().join("tls/ca.pem")).unwrap();
    let api_key = std::fs::read_to_string(dir.path().join("admin.key"))
        .unwrap()
        .trim()
        .to_string();
    let target = PushTarget {
        device_addr: server.device_addr,
        api_addr: server.api_addr,
        http_addr: server.http_addr,
        api: ApiClient::connect(server.api_addr, SERVER_NAME, &ca, &api_key)
            .await
            .unwrap(),
        ca,
        api_key,
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
