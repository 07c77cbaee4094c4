//! Caller-chosen ids: a reuse is the same request (answered as before, nothing sent again) or
//! refused with ALREADY_EXISTS, whatever kind used the id first. Each test fails on the code
//! before the fix.

use push_proto::sender::{CancelCallRequest, DeliveryState, PlaceCallRequest, SendMessageRequest};
use push_server::client::DeviceClient;
use testkit::harness::*;

fn call(call_id: &str, device: &str, caller: &str) -> PlaceCallRequest {
    PlaceCallRequest {
        call_id: call_id.into(),
        target: Some(to(device)),
        caller_name: caller.into(),
        caller_handle: "ext 4411".into(),
        video: false,
        ring_timeout_seconds: 60,
        escalation: Vec::new(),
    }
}

fn message(id: &str, device: &str, body: &str) -> SendMessageRequest {
    SendMessageRequest {
        message_id: id.into(),
        target: Some(to(device)),
        body: body.into(),
        ..Default::default()
    }
}

/// Ring phone-1 (`phone`) with `call_id` from Dr. A and ack the invite.
async fn acked_call(h: &Harness, phone: &mut DeviceClient, call_id: &str) {
    h.place(call(call_id, "phone-1", "Dr. A")).await.unwrap();
    let invite = next(phone).await;
    phone.ack(&[invite.seq]).await.unwrap();
    h.await_state(call_id, "phone-1", DeliveryState::Acked).await;
}

/// A call id that was answered and cancelled was accepted again and pushed with the old id: a
/// conforming phone drops it as a duplicate, and the sender saw ACKED.
#[tokio::test]
async fn a_finished_call_id_is_never_pushed_again() {
    let h = Harness::start().await;
    let mut phone = h.device("phone-1").await;
    acked_call(&h, &mut phone, "call-1").await;
    h.sender()
        .cancel_call(CancelCallRequest {
            call_id: "call-1".into(),
            reason: 0,
        })
        .await
        .unwrap();
    let cancel = next(&mut phone).await;
    phone.ack(&[cancel.seq]).await.unwrap();

    // Another call under the same id is refused; the same request again is answered as before.
    let other = h.place(call("call-1", "phone-1", "Dr. B")).await.unwrap_err();
    assert_eq!(other.code(), tonic::Code::AlreadyExists, "{other:?}");
    let same = h.place(call("call-1", "phone-1", "Dr. A")).await.unwrap();
    assert_eq!(same.recipients.len(), 1);
    // Nothing more reaches the phone: the next push is a marker message.
    let marker = h.send("phone-1", "marker").await.message_id;
    assert_eq!(next(&mut phone).await.id, marker);
}

/// A message whose id equals an earlier call's id was answered as an idempotent resend of the
/// call: never delivered, yet reported ACKED.
#[tokio::test]
async fn a_message_cannot_take_a_call_id_and_ids_keep_their_content() {
    let h = Harness::start().await;
    let mut phone = h.device("phone-1").await;
    acked_call(&h, &mut phone, "shared-id").await;

    let refused = h
        .try_send(message("shared-id", "phone-1", "hello"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::AlreadyExists);
    assert!(refused.message().contains("a call"), "{refused:?}");

    // Messages: the same request is idempotent, other content under the id is refused.
    let first = h.try_send(message("m-1", "phone-1", "hello")).await.unwrap();
    let p = next(&mut phone).await;
    assert_eq!(p.id, "m-1");
    let again = h.try_send(message("m-1", "phone-1", "hello")).await.unwrap();
    assert_eq!(again.message_id, first.message_id);
    let other = h
        .try_send(message("m-1", "phone-1", "changed"))
        .await
        .unwrap_err();
    assert_eq!(other.code(), tonic::Code::AlreadyExists);
    let refused = h.place(call("m-1", "phone-1", "Dr. A")).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::AlreadyExists);
    // The resend was not pushed again.
    phone.ack(&[p.seq]).await.unwrap();
    let marker = h.send("phone-1", "marker").await.message_id;
    assert_eq!(next(&mut phone).await.id, marker);
}
