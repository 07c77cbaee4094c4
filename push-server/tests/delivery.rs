//! Delivery over real TLS sessions: acks, receipts, ordered replay, expiry, collapse, calls.

use push_proto::{
    device::{CancelReason, push},
    sender::{
        CancelCallRequest, DeliveryState, GetMessageStatusRequest, PlaceCallRequest, SendMessageRequest,
        Target, target,
    },
};
use testkit::harness::*;

#[tokio::test]
async fn message_is_delivered_acked_and_reported_in_order() {
    let h = Harness::start().await;
    let credential = h.issue("phone-1", &[]).await;
    let sent = h.send("phone-1", "bed 12").await;
    assert_eq!(
        sent.recipients[0].state(),
        DeliveryState::Accepted,
        "queued for an offline device"
    );
    // Subscribe before the phone connects, so the stream starts from Accepted.
    let mut stream = h
        .sender()
        .watch_message(GetMessageStatusRequest {
            message_id: sent.message_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().expect("current state");
    let watcher = tokio::spawn(async move {
        let mut states = vec![first.state()];
        while let Some(u) = stream.message().await.unwrap() {
            states.push(u.state());
        }
        states
    });
    let mut phone = h.connect(&credential, 0).await.unwrap();
    assert_eq!(phone.server_hello.replay_count, 1);
    let p = next(&mut phone).await;
    assert_eq!(
        (p.seq, p.id.as_str(), body(&p).as_str()),
        (1, sent.message_id.as_str(), "bed 12")
    );
    phone.ack(&[p.seq]).await.unwrap();
    let states = within(watcher).await.unwrap();
    assert_eq!(states.first(), Some(&DeliveryState::Accepted));
    assert_eq!(states.last(), Some(&DeliveryState::Acked), "{states:?}");
    assert!(
        states.windows(2).all(|w| (w[0] as i32) < (w[1] as i32)),
        "states only move forward: {states:?}"
    );
    let status = h
        .sender()
        .get_message_status(GetMessageStatusRequest {
            message_id: sent.message_id,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.recipients[0].state(), DeliveryState::Acked);
    assert_eq!(status.recipients[0].path, "local");
}

#[tokio::test]
async fn replay_after_disconnect_is_ordered_and_never_repeats() {
    let h = Harness::start().await;
    let credential = h.issue("phone-1", &[]).await;
    let mut phone = h.connect(&credential, 0).await.unwrap();
    h.send("phone-1", "m1").await;
    let first = next(&mut phone).await;
    phone.ack(&[first.seq]).await.unwrap();
    phone.close().await.unwrap();

    let mut ids = Vec::new();
    for body in ["m2", "m3", "m4"] {
        ids.push(h.send("phone-1", body).await.message_id);
    }
    // The device saw m1 only; everything after it comes back, in order.
    let mut phone = h.connect(&credential, first.seq).await.unwrap();
    assert_eq!(phone.server_hello.replay_count, 3);
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(next(&mut phone).await);
    }
    assert_eq!(got.iter().map(|p| p.id.clone()).collect::<Vec<_>>(), ids);
    assert!(got.windows(2).all(|w| w[0].seq < w[1].seq) && got[0].seq > first.seq);
    // Dropped without acks after handing m2 to the app: only m3 and m4 come back.
    drop(phone);
    let mut phone = h.connect(&credential, got[0].seq).await.unwrap();
    assert_eq!(next(&mut phone).await.id, ids[1]);
    assert_eq!(next(&mut phone).await.id, ids[2]);
    // m2 counts as acknowledged because the device's hello said it saw it.
    h.await_state(&ids[0], "phone-1", DeliveryState::Acked).await;
    // Nothing else is pending: the next push is a new message.
    phone.ack(&[got[1].seq, got[2].seq]).await.unwrap();
    let marker = h.send("phone-1", "marker").await;
    assert_eq!(next(&mut phone).await.id, marker.message_id);
}

#[tokio::test]
async fn group_fanout_reaches_online_and_queues_for_offline() {
    let h = Harness::start().await;
    let mut a = h.connect(&h.issue("a", &["ward:4B"]).await, 0).await.unwrap();
    let mut b = h
        .connect(&h.issue("b", &["ward:4B", "site:north"]).await, 0)
        .await
        .unwrap();
    let c_credential = h.issue("c", &["ward:4B"]).await;
    h.issue("d", &["ward:5A"]).await;
    let sent = h
        .send_req(SendMessageRequest {
            target: Some(Target {
                kind: Some(target::Kind::Group("ward:4B".into())),
            }),
            body: "code blue".into(),
            ..Default::default()
        })
        .await;
    let mut recipients: Vec<_> = sent.recipients.iter().map(|r| r.device_id.as_str()).collect();
    recipients.sort();
    assert_eq!(recipients, ["a", "b", "c"]);
    assert_eq!(body(&next(&mut a).await), "code blue");
    assert_eq!(body(&next(&mut b).await), "code blue");
    let mut c = h.connect(&c_credential, 0).await.unwrap();
    assert_eq!(next(&mut c).await.id, sent.message_id);
}

#[tokio::test]
async fn unknown_devices_full_queues_and_oversized_messages_are_refused_clearly() {
    let h = Harness::start_with(|c| c.limits.max_queued_per_device = 2).await;
    h.issue("phone-1", &[]).await;
    let sent = h
        .send_req(SendMessageRequest {
            target: Some(to_devices(&["phone-1", "ghost"])),
            body: "x".into(),
            ..Default::default()
        })
        .await;
    let ghost = sent.recipients.iter().find(|r| r.device_id == "ghost").unwrap();
    assert_eq!(
        (ghost.state(), ghost.reason.as_str()),
        (DeliveryState::Undeliverable, "unknown device")
    );
    h.send("phone-1", "2").await;
    let third = h.send("phone-1", "3").await;
    assert_eq!(third.recipients[0].state(), DeliveryState::Undeliverable);
    assert_eq!(third.recipients[0].reason, "device queue full");

    let err = h
        .try_send(SendMessageRequest {
            target: Some(to("phone-1")),
            body: "x".repeat(10_000),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("limit"), "{}", err.message());
}

#[tokio::test]
async fn collapse_key_replaces_an_undelivered_message() {
    let h = Harness::start().await;
    let credential = h.issue("phone-1", &[]).await;
    let req = |body: &str| SendMessageRequest {
        target: Some(to("phone-1")),
        body: body.into(),
        collapse_key: "bed-12-vitals".into(),
        ..Default::default()
    };
    let old = h.send_req(req("old")).await;
    let new = h.send_req(req("new")).await;
    let updates = h
        .await_state(&old.message_id, "phone-1", DeliveryState::Superseded)
        .await;
    assert!(updates.last().unwrap().reason.contains("collapse key"));
    let mut phone = h.connect(&credential, 0).await.unwrap();
    let p = next(&mut phone).await;
    assert_eq!((body(&p), p.id), ("new".to_string(), new.message_id));
}

#[tokio::test]
async fn idempotent_message_id_is_queued_once() {
    let h = Harness::start().await;
    let credential = h.issue("phone-1", &[]).await;
    let req = SendMessageRequest {
        target: Some(to("phone-1")),
        body: "once".into(),
        message_id: "order-778".into(),
        ..Default::default()
    };
    h.send_req(req.clone()).await;
    let again = h.send_req(req).await;
    assert_eq!(again.message_id, "order-778");
    let mut phone = h.connect(&credential, 0).await.unwrap();
    assert_eq!(phone.server_hello.replay_count, 1);
    assert_eq!(next(&mut phone).await.id, "order-778");
}

#[tokio::test]
async fn ttl_expiry_is_reported_and_the_message_never_arrives() {
    let h = Harness::start().await;
    let credential = h.issue("phone-1", &[]).await;
    let sent = h
        .send_req(SendMessageRequest {
            target: Some(to("phone-1")),
            body: "stale".into(),
            ttl_seconds: 1,
            ..Default::default()
        })
        .await;
    let updates = h
        .await_state(&sent.message_id, "phone-1", DeliveryState::Expired)
        .await;
    assert!(updates.last().unwrap().reason.contains("ttl"));
    let mut phone = h.connect(&credential, 0).await.unwrap();
    assert_eq!(phone.server_hello.replay_count, 0);
    let marker = h.send("phone-1", "marker").await;
    assert_eq!(
        next(&mut phone).await.id,
        marker.message_id,
        "the expired message must not be delivered"
    );
}

fn call(call_id: &str, device: &str, ring_secs: u32) -> PlaceCallRequest {
    PlaceCallRequest {
        call_id: call_id.into(),
        target: Some(to(device)),
        caller_name: "Dr. Okafor".into(),
        caller_handle: "ext 4411".into(),
        video: false,
        ring_timeout_seconds: ring_secs,
        escalation: Vec::new(),
    }
}

#[tokio::test]
async fn call_is_never_delivered_after_its_deadline() {
    let h = Harness::start().await;
    let credential = h.issue("phone-1", &[]).await;
    h.place(call("call-1", "phone-1", 1)).await.unwrap();
    let updates = h.await_state("call-1", "phone-1", DeliveryState::Expired).await;
    assert!(updates.last().unwrap().reason.contains("ring deadline"));
    let mut phone = h.connect(&credential, 0).await.unwrap();
    let marker = h.send("phone-1", "marker").await;
    assert_eq!(
        next(&mut phone).await.id,
        marker.message_id,
        "a late call invite must never be delivered"
    );
}

#[tokio::test]
async fn call_rings_a_live_session_then_cancel_follows() {
    let h = Harness::start().await;
    let mut phone = h.device("phone-1").await;
    let placed = h.place(call("call-2", "phone-1", 30)).await.unwrap();
    assert_eq!(placed.call_uuid, push_proto::call_uuid("call-2"));
    let p = next(&mut phone).await;
    let Some(push::Body::CallInvite(invite)) = p.body else {
        panic!("expected an invite: {p:?}")
    };
    assert_eq!(
        (invite.call_uuid.as_str(), invite.caller_name.as_str()),
        (placed.call_uuid.as_str(), "Dr. Okafor")
    );
    assert_eq!(invite.ring_deadline_ms, placed.ring_deadline_ms);
    phone.ack(&[p.seq]).await.unwrap();
    h.await_state("call-2", "phone-1", DeliveryState::Acked).await;

    let cancel = CancelCallRequest {
        call_id: "call-2".into(),
        reason: CancelReason::AnsweredElsewhere as i32,
    };
    assert_eq!(
        h.sender()
            .cancel_call(cancel.clone())
            .await
            .unwrap()
            .into_inner()
            .cancels_sent,
        1
    );
    let p = next(&mut phone).await;
    let Some(push::Body::CallCancel(c)) = p.body else {
        panic!("expected a cancel: {p:?}")
    };
    assert_eq!(
        (c.reason(), c.call_uuid),
        (CancelReason::AnsweredElsewhere, placed.call_uuid)
    );
    let again = h.sender().cancel_call(cancel).await.unwrap_err();
    assert_eq!(again.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn cancel_before_delivery_withdraws_the_invite() {
    let h = Harness::start().await;
    let credential = h.issue("phone-1", &[]).await;
    h.place(call("call-3", "phone-1", 60)).await.unwrap();
    // The same request again is answered as before; the same id with other content is refused.
    let again = h.place(call("call-3", "phone-1", 60)).await.unwrap();
    assert_eq!(again.call_id, "call-3");
    let dup = h.place(call("call-3", "phone-1", 30)).await.unwrap_err();
    assert_eq!(dup.code(), tonic::Code::AlreadyExists);
    let cancel = CancelCallRequest {
        call_id: "call-3".into(),
        reason: 0,
    };
    assert_eq!(
        h.sender()
            .cancel_call(cancel)
            .await
            .unwrap()
            .into_inner()
            .cancels_sent,
        0
    );
    h.await_state("call-3", "phone-1", DeliveryState::Cancelled).await;
    let mut phone = h.connect(&credential, 0).await.unwrap();
    assert_eq!(phone.server_hello.replay_count, 0);
    let marker = h.send("phone-1", "marker").await;
    assert_eq!(next(&mut phone).await.id, marker.message_id);
}

#[tokio::test]
async fn in_flight_window_bounds_unacked_pushes() {
    let h = Harness::start_with(|c| c.limits.max_inflight_per_session = 2).await;
    let mut phone = h.device("phone-1").await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(h.send("phone-1", &format!("m{i}")).await.message_id);
    }
    let a = next(&mut phone).await;
    let b = next(&mut phone).await;
    // Two unacked pushes fill the window: the third stays queued on the server.
    let third = h
        .sender()
        .get_message_status(GetMessageStatusRequest {
            message_id: ids[2].clone(),
        })
        .await
        .unwrap();
    assert_eq!(third.into_inner().recipients[0].state(), DeliveryState::Accepted);
    phone.ack(&[a.seq, b.seq]).await.unwrap();
    let rest: Vec<String> = [next(&mut phone).await, next(&mut phone).await]
        .into_iter()
        .map(|p| p.id)
        .collect();
    assert_eq!(rest, ids[2..4]);
}
