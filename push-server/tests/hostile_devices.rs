//! What a device (or whoever holds its credential) sends can never panic the server, break the
//! ward for others, or turn into a receipt that did not happen. Each test reproduces a defect of
//! the hardening issue over real TLS and fails on the code before its fix.

use push_proto::device::{GoodbyeReason, client_frame};
use push_proto::sender::{DeliveryState, SendMessageRequest, Target, target};
use push_server::client::ClientError;
use testkit::harness::*;

fn group(name: &str) -> Target {
    Target {
        kind: Some(target::Kind::Group(name.into())),
    }
}

/// Defect 1: a floor above what the server handed out (5000 with one message queued) made
/// `take_pushes` call `BTreeMap::range` with start > end: the session task panicked holding the
/// device's lock, and every later listing and group send failed.
#[tokio::test]
async fn a_floor_ahead_of_the_server_neither_panics_nor_acks() {
    let h = Harness::start().await;
    let credential = h.issue("phone-1", &["ward:4B"]).await;
    let queued = h.send("phone-1", "while offline").await.message_id;

    let mut phone = h
        .connect(&credential, 5000)
        .await
        .expect("login with a foreign floor");
    let push = next(&mut phone).await;
    assert_eq!(push.id, queued, "the queued message still reaches the app");
    assert!(
        push.seq > 5000,
        "renumbered above the device's floor, got {}",
        push.seq
    );
    let updates = h.await_state(&queued, "phone-1", DeliveryState::Delivered).await;
    assert!(
        updates.iter().all(|u| u.state() != DeliveryState::Acked),
        "no ack from the device yet: {updates:?}"
    );
    phone.ack(&[push.seq]).await.unwrap();
    h.await_state(&queued, "phone-1", DeliveryState::Acked).await;

    // The ward still works: listings and group sends that include the device.
    assert_eq!(h.list_devices("ward:4B", false).await.len(), 1);
    let ward = h
        .send_req(SendMessageRequest {
            target: Some(group("ward:4B")),
            body: "ward-wide".into(),
            ..Default::default()
        })
        .await;
    let p = next(&mut phone).await;
    assert_eq!(p.id, ward.message_id);
    assert!(p.seq > push.seq);
}

/// Defect 2: a hello with `last_seen_seq = u64::MAX` was accepted, the next message was reported
/// ACKED without ever being delivered, and the device's counter wrapped to 1.
#[tokio::test]
async fn a_floor_of_u64_max_is_refused_and_nothing_is_acked_or_wrapped() {
    let h = Harness::start().await;
    let credential = h.issue("phone-1", &[]).await;
    let mut phone = h.connect(&credential, 0).await.unwrap();
    let first_id = h.send("phone-1", "first").await.message_id;
    let first = next(&mut phone).await;
    assert_eq!(first.id, first_id);
    phone.ack(&[first.seq]).await.unwrap();
    h.await_state(&first_id, "phone-1", DeliveryState::Acked).await;
    drop(phone);

    match h.connect(&credential, u64::MAX).await {
        Err(ClientError::Goodbye { reason, .. }) => assert_eq!(reason, GoodbyeReason::ProtocolError),
        other => panic!(
            "expected a protocol error, got {:?}",
            other.map(|c| c.server_hello)
        ),
    }
    let msg = h.send("phone-1", "after the bad hello").await.message_id;
    let mut phone = h.connect(&credential, first.seq).await.unwrap();
    let p = next(&mut phone).await;
    assert_eq!(p.id, msg, "delivered, not reported acked");
    assert!(
        p.seq > first.seq,
        "numbers strictly increase: {} after {}",
        p.seq,
        first.seq
    );
}

/// The floor acknowledges only within the store's epoch: a device that saw a push (same epoch)
/// settles it by its hello; the same floor from another epoch settles nothing, and the push is
/// delivered again above the floor.
#[tokio::test]
async fn the_floor_acknowledges_only_within_the_store_epoch() {
    let h = Harness::start().await;
    let credential = h.issue("phone-1", &[]).await;

    // Seen by the device, ack lost with the connection.
    let mut phone = h.connect(&credential, 0).await.unwrap();
    let epoch = phone.server_hello.epoch;
    assert_ne!(epoch, 0, "a store always has an epoch");
    let seen = h.send("phone-1", "seen").await.message_id;
    let p = next(&mut phone).await;
    drop(phone);
    h.await_state(&seen, "phone-1", DeliveryState::Delivered).await;

    // Another epoch (a restored or replaced store, or an older SDK): not an acknowledgement.
    h.epoch.store(epoch ^ 1, std::sync::atomic::Ordering::SeqCst);
    let mut phone = h.connect(&credential, p.seq).await.unwrap();
    let again = next(&mut phone).await;
    assert_eq!(again.id, seen);
    assert!(again.seq > p.seq);
    let status = h
        .sender()
        .get_message_status(status_req(&seen))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(status.recipients[0].state(), DeliveryState::Acked);
    drop(phone);

    // The store's epoch: the floor is the device's cumulative acknowledgement.
    h.epoch.store(epoch, std::sync::atomic::Ordering::SeqCst);
    let _phone = h.connect(&credential, again.seq).await.unwrap();
    h.await_state(&seen, "phone-1", DeliveryState::Acked).await;
}

/// An ack followed at once by the end of the stream (an extension killed right after acking:
/// the ack and the FIN share a segment) was lost, and the receipt stayed DELIVERED.
#[tokio::test]
async fn an_ack_sharing_a_segment_with_the_close_is_applied() {
    let h = Harness::start().await;
    let credential = h.issue("phone-1", &[]).await;
    for round in 0..3 {
        let mut phone = h.connect(&credential, 0).await.unwrap();
        let id = h.send("phone-1", &format!("m{round}")).await.message_id;
        let p = next(&mut phone).await;
        h.await_state(&id, "phone-1", DeliveryState::Delivered).await;
        phone.ack_then_close(&[p.seq]).await.unwrap();
        h.await_state(&id, "phone-1", DeliveryState::Acked).await;
    }
}

/// An `Ack` can only settle what was written to the device: naming the number of a push still
/// waiting behind the in-flight window does not make it ACKED (it was reported ACKED and never
/// delivered).
#[tokio::test]
async fn an_ack_cannot_settle_a_push_never_written() {
    let h = Harness::start_with(|c| c.limits.max_inflight_per_session = 1).await;
    let credential = h.issue("phone-1", &[]).await;
    let mut phone = h.connect(&credential, 0).await.unwrap();
    h.send("phone-1", "m1").await;
    let m2 = h.send("phone-1", "m2").await.message_id;
    let p1 = next(&mut phone).await;
    // m2 waits behind the window; acknowledge it by its number (the next one) before it came.
    phone
        .send(client_frame::Kind::Ack(push_proto::device::Ack {
            up_to_seq: 0,
            seqs: vec![p1.seq + 1],
        }))
        .await
        .unwrap();
    phone.ack(&[p1.seq]).await.unwrap();
    let p2 = next(&mut phone).await;
    assert_eq!(p2.id, m2, "still delivered");
    let status = h
        .sender()
        .get_message_status(status_req(&m2))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(
        status.recipients[0].state(),
        DeliveryState::Acked,
        "{p1:?} {p2:?} {status:?}"
    );
    phone.ack(&[p2.seq]).await.unwrap();
    h.await_state(&m2, "phone-1", DeliveryState::Acked).await;
}

fn status_req(id: &str) -> push_proto::sender::GetMessageStatusRequest {
    push_proto::sender::GetMessageStatusRequest {
        message_id: id.into(),
    }
}
