//! A sender naming device ids that do not exist gets them reported undeliverable in the answer,
//! and the server keeps nothing per unknown id: 100,000 distinct junk names leave its memory and
//! its store flat (they grew it from 19 MB to 266 MB of RSS and the store by 86 MB for 180,000).

use e2e::{ApiClient, ServerProcess, within};
use push_proto::sender::{DeliveryState, DeviceList, SendMessageRequest, Target, target};

const BATCHES: usize = 100;
const PER_BATCH: usize = 1000;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

fn store_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .expect("data dir")
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "redb"))
        .map(|e| e.metadata().map_or(0, |m| m.len()))
        .sum()
}

async fn send_junk(api: &ApiClient, batch: usize) {
    // One connection for every batch, as a sender keeps it (new handshakes are rate-limited).
    let mut sender = api.sender();
    let recipients: Vec<String> = (0..PER_BATCH).map(|i| format!("junk-{batch}-{i}")).collect();
    // One request per name would take minutes; a list of names per request is the same load on
    // what the server keeps per name.
    let req = SendMessageRequest {
        target: Some(Target {
            kind: Some(target::Kind::Devices(DeviceList {
                device_ids: recipients,
            })),
        }),
        body: "to nobody".into(),
        ..Default::default()
    };
    let answer = within("SendMessage to junk", sender.send_message(req))
        .await
        .expect("a send to unknown ids is answered")
        .into_inner();
    assert_eq!(answer.recipients.len(), PER_BATCH);
    assert!(
        answer
            .recipients
            .iter()
            .all(|r| r.state() == DeliveryState::Undeliverable && r.reason == "unknown device"),
        "{:?}",
        &answer.recipients[..3]
    );
}

#[tokio::test]
async fn unknown_recipients_leave_memory_and_store_flat() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]);
    // Warm up the allocator and the API path before the baseline.
    let api = server.api().await;
    for b in 0..5 {
        send_junk(&api, b).await;
    }
    let (rss0, store0) = (rss_kib(server.pid()), store_bytes(server.data_dir()));
    for b in 5..5 + BATCHES {
        send_junk(&api, b).await;
    }
    let (rss1, store1) = (rss_kib(server.pid()), store_bytes(server.data_dir()));
    println!(
        "{} junk recipients: RSS {rss0} -> {rss1} KiB, store {store0} -> {store1} bytes",
        BATCHES * PER_BATCH
    );
    assert!(rss1 < rss0 + 8 * 1024, "RSS grew from {rss0} to {rss1} KiB");
    assert!(
        store1 <= store0 + 64 * 1024,
        "store grew from {store0} to {store1} bytes"
    );
}
