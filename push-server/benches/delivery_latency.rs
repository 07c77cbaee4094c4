//! Sender-to-device latency of the real server binary.
//!
//! Connects N devices (default 1,000), then sends messages at a fixed rate through the gRPC API,
//! each to a random connected device, and measures from just before `SendMessage` to the moment
//! the device's client has decoded the push. Messages carry no sender-chosen id (the common
//! case); the bench matches them by title. Prints p50/p99/p99.9 and the achieved rate.
//!
//! `cargo bench -p push-server --bench delivery_latency`
//! (LATENCY_DEVICES=1000 LATENCY_RATE=1000 LATENCY_MESSAGES=5000)

mod support;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use push_proto::sender::{SendMessageRequest, Target, target};
use support::{ServerProcess, device_id, percentile};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() {
    let (devices, rate, messages) = (
        env("LATENCY_DEVICES", 1000),
        env("LATENCY_RATE", 1000),
        env("LATENCY_MESSAGES", 5000),
    );
    let server = ServerProcess::start(&[]).await;
    let credentials = server.register(devices).await;
    let clients = server.connect_all(&credentials).await;
    let received: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    for mut client in clients {
        let (received, done_tx) = (received.clone(), done_tx.clone());
        tokio::spawn(async move {
            while let Ok(push) = client.next_push().await {
                let key = match &push.body {
                    Some(push_proto::device::push::Body::Message(m)) => m.title.clone(),
                    _ => continue,
                };
                received.lock().unwrap().insert(key, Instant::now());
                let _ = client.ack(&[push.seq]).await;
                let _ = done_tx.send(());
            }
        });
    }
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let start = Instant::now();
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..messages {
        tokio::time::sleep_until((start + interval * i as u32).into()).await;
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let (id, device) = (format!("lat-{i}"), device_id(seed as usize % devices));
        let (mut sender, sent) = (server.api.sender(), sent.clone());
        tokio::spawn(async move {
            let req = SendMessageRequest {
                target: Some(Target {
                    kind: Some(target::Kind::DeviceId(device)),
                }),
                title: id.clone(),
                body: "x".repeat(200),
                ..Default::default()
            };
            sent.lock().unwrap().insert(id, Instant::now());
            sender.send_message(req).await.expect("accepted");
        });
    }
    for _ in 0..messages {
        tokio::time::timeout(Duration::from_secs(30), done_rx.recv())
            .await
            .expect("all delivered");
    }
    let elapsed = start.elapsed().as_secs_f64();
    let (sent, received) = (sent.lock().unwrap(), received.lock().unwrap());
    let mut ms: Vec<f64> = sent
        .iter()
        .map(|(id, t)| (received[id] - *t).as_secs_f64() * 1000.0)
        .collect();
    ms.sort_by(f64::total_cmp);
    println!(
        "{devices} devices, {messages} messages of 200 B at {rate}/s (achieved {:.0}/s): p50 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms",
        messages as f64 / elapsed,
        percentile(&ms, 50.0),
        percentile(&ms, 99.0),
        percentile(&ms, 99.9),
        ms.last().unwrap()
    );
}
