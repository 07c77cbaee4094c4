//! Idle-session cost and login rate of the real server binary.
//!
//! Starts `push-server serve` (release build under `cargo bench`), registers N devices, then
//! opens authenticated TLS 1.3 sessions in stages and reads the server's resident memory
//! (VmRSS) after each stage. Prints the RSS per idle session and the logins per second.
//!
//! `cargo bench -p push-server --bench idle_sessions` (IDLE_SESSIONS=1000,5000,10000 by default;
//! one process may open at most ~19k sockets on the reference machine).

mod support;

use std::time::{Duration, Instant};

use support::ServerProcess;

#[tokio::main]
async fn main() {
    let stages: Vec<usize> = std::env::var("IDLE_SESSIONS")
        .unwrap_or_else(|_| "1000,5000,10000".into())
        .split(',')
        .map(|s| s.trim().parse().expect("IDLE_SESSIONS is a list of counts"))
        .collect();
    let total = *stages.iter().max().unwrap();
    let server = ServerProcess::start(&["--heartbeat-interval-ms", "600000"]).await;
    let credentials = server.register(total).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let base = server.rss_kib();
    println!("server RSS with {total} devices registered, no sessions: {base} KiB");
    println!(
        "{:>8} {:>14} {:>16} {:>14}",
        "sessions", "server RSS KiB", "KiB per session", "logins/s"
    );
    let mut clients = Vec::with_capacity(total);
    for &stage in &stages {
        let start = Instant::now();
        let batch = server.connect_all(&credentials[clients.len()..stage]).await;
        let rate = batch.len() as f64 / start.elapsed().as_secs_f64();
        clients.extend(batch);
        // Let allocator and kernel settle before reading RSS.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss = server.rss_kib();
        let per = (rss - base) as f64 / clients.len() as f64;
        println!("{:>8} {:>14} {:>16.2} {:>14.0}", clients.len(), rss, per, rate);
    }
}
