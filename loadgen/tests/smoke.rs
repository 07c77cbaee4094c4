//! The load generator end to end, small: 20 simulated SDK devices (each on its own source
//! address) against a real server in this process, 200 messages through the gRPC API at
//! 500/s; every one must reach its device's app callback.

use std::time::Duration;

use push_loadgen::push::{PushTarget, SERVER_NAME};
use push_server::{api_client::ApiClient, config::Config, server::Server};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_reaches_its_device() {
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
        Duration::from_secs(60),
        push_loadgen::bench::smoke(&target, 20, 200),
    )
    .await
    .expect("smoke run timed out")
    .unwrap();
    assert_eq!(run.received, 200);
    // The metrics endpoint answers the load generator (it reads handshake counters from it).
    assert!(
        target
            .metric("lpush_tls_handshakes_total", "result=\"ok\"")
            .await
            .unwrap()
            >= 20.0
    );
    server.shutdown().await;
}
