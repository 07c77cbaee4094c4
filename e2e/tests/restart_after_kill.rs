//! SIGKILL at any point loses no accepted message, replays nothing acknowledged, and never reuses
//! a sequence number.

use e2e::{DeviceClient, ServerProcess, within};
use push_proto::device::{Push, push};

const DEVICE: &str = "ward4b-phone-07";

async fn next_push(client: &mut DeviceClient, what: &str) -> Push {
    within(what, client.next_push())
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// SIGKILL the server, start it again on its data and connect the device, which has seen up to
/// `last_seen_seq`.
async fn crash_and_connect(
    server: &mut ServerProcess,
    credential: &str,
    last_seen_seq: u64,
    crash: &str,
) -> DeviceClient {
    server.kill();
    server.restart();
    (server.connect(credential, last_seen_seq).await)
        .unwrap_or_else(|e| panic!("connect after {crash}: {e:?}"))
}

fn body_of(push: &Push) -> &str {
    match &push.body {
        Some(push::Body::Message(m)) => &m.body,
        other => panic!("push {} is not a message: {other:?}", push.seq),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_nothing_repeats_nothing_and_never_reuses_sequence_numbers() {
    let tmp = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start(&tmp.path().join("data"), &[]);
    let credential = server.issue(DEVICE).await;

    // Device offline: five messages, each durably accepted once SendMessage returns.
    let ids: Vec<String> = (1..=5).map(|i| format!("msg-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        server.send_text(DEVICE, id, &format!("body {}", i + 1)).await;
    }

    // Crash 1, then the device connects from scratch: exactly those five, in order.
    let mut device = crash_and_connect(&mut server, &credential, 0, "crash 1").await;
    assert_eq!(device.server_hello.device_id, DEVICE);
    assert_eq!(device.server_hello.replay_count, 5, "replay count after crash 1");
    let mut first = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let p = next_push(&mut device, "replay after crash 1").await;
        assert_eq!(&p.id, id, "replay order after crash 1");
        assert_eq!(body_of(&p), format!("body {}", i + 1));
        if let Some(prev) = first.last() {
            assert!(p.seq > *prev, "sequence not increasing: {} after {prev}", p.seq);
        }
        first.push(p.seq);
    }
    // Nothing else is in the replay: the next push is a fresh message sent now.
    server.send_text(DEVICE, "sentinel-1", "sentinel").await;
    let sentinel = next_push(&mut device, "sentinel after replay").await;
    assert_eq!(
        sentinel.id, "sentinel-1",
        "an unexpected push came before the sentinel"
    );
    assert!(
        sentinel.seq > first[4],
        "sentinel seq {} <= {}",
        sentinel.seq,
        first[4]
    );

    // Acknowledge the first two and the sentinel (explicit seqs), wait until that is on disk.
    within("ack", device.ack(&[first[0], first[1], sentinel.seq]))
        .await
        .unwrap();
    server.wait_durably_acked("msg-2").await;
    server.wait_durably_acked("sentinel-1").await;
    within("close", device.close()).await.unwrap();

    // Crash 2: resuming after the second message yields exactly the remaining three, with the
    // sequence numbers they had before; the acknowledged sentinel is not replayed.
    let mut device = crash_and_connect(&mut server, &credential, first[1], "crash 2").await;
    assert_eq!(device.server_hello.replay_count, 3, "replay count after crash 2");
    for (i, id) in ids.iter().enumerate().skip(2) {
        let p = next_push(&mut device, "replay after crash 2").await;
        assert_eq!(&p.id, id, "replay order after crash 2");
        assert_eq!(
            p.seq, first[i],
            "{id} changed its sequence number across the crash"
        );
    }
    server.send_text(DEVICE, "msg-6", "body 6").await;
    let sixth = next_push(&mut device, "new message after crash 2").await;
    assert_eq!(
        sixth.id, "msg-6",
        "an unexpected push (replay?) came before msg-6"
    );
    let highest_before = first.iter().copied().chain([sentinel.seq]).max().unwrap();
    assert!(
        sixth.seq > highest_before,
        "sequence number reused after a crash: {} <= {highest_before}",
        sixth.seq
    );

    // Acknowledge everything and make sure it is durable.
    within("ack all", device.ack(&[first[2], first[3], first[4], sixth.seq]))
        .await
        .unwrap();
    for id in ["msg-3", "msg-4", "msg-5", "msg-6"] {
        server.wait_durably_acked(id).await;
    }
    within("close", device.close()).await.unwrap();

    // Crash 3: what was delivered and acknowledged is not replayed, even to a device that
    // claims to have seen nothing, and numbering still moves forward.
    let mut device = crash_and_connect(&mut server, &credential, 0, "crash 3").await;
    assert_eq!(
        device.server_hello.replay_count, 0,
        "acknowledged messages queued again after a crash"
    );
    server.send_text(DEVICE, "msg-7", "body 7").await;
    let seventh = next_push(&mut device, "new message after crash 3").await;
    assert_eq!(
        seventh.id, "msg-7",
        "an acknowledged message was replayed after a crash"
    );
    assert!(
        seventh.seq > sixth.seq,
        "sequence number reused: {} <= {}",
        seventh.seq,
        sixth.seq
    );
    within("close", device.close()).await.unwrap();
}
