//! The clinical call end to end over real TLS: phones report what their users did, the first
//! answer wins, declines and missed calls end the call, escalation steps ring at their time
//! (also across a restart), and a cancel racing the placement stops every ring.

use push_proto::{
    device::{CallOutcome, CallOutcomeResult, CancelReason, Push, push},
    sender::{
        CallState, CallStatus, CancelCallRequest, DeliveryState, EscalationStep, PlaceCallRequest,
        WatchCallRequest,
    },
};
use push_server::{api_client::ApiClient, client::DeviceClient, server::Server};
use testkit::harness::*;

fn call(call_id: &str, callees: &[&str], ring_secs: u32) -> PlaceCallRequest {
    PlaceCallRequest {
        call_id: call_id.into(),
        target: Some(to_devices(callees)),
        caller_name: "Bed 12".into(),
        caller_handle: "4711".into(),
        video: false,
        ring_timeout_seconds: ring_secs,
        escalation: Vec::new(),
    }
}

/// The next push, which must be the invite of `call_id`; acknowledged (the phone rings).
async fn rings(phone: &mut DeviceClient, call_id: &str) -> Push {
    let p = next(phone).await;
    assert!(
        matches!(&p.body, Some(push::Body::CallInvite(i)) if i.call_id == call_id),
        "expected the invite of {call_id}: {p:?}"
    );
    phone.ack(&[p.seq]).await.unwrap();
    p
}

/// The next push, which must be a cancel of `call_id`; returns its reason.
async fn told_to_stop(phone: &mut DeviceClient, call_id: &str) -> CancelReason {
    let p = next(phone).await;
    let Some(push::Body::CallCancel(c)) = &p.body else {
        panic!("expected a cancel of {call_id}: {p:?}")
    };
    assert_eq!(c.call_id, call_id);
    phone.ack(&[p.seq]).await.unwrap();
    c.reason()
}

async fn status(h: &Harness, call_id: &str) -> CallStatus {
    h.sender()
        .get_call_status(WatchCallRequest {
            call_id: call_id.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

fn callee_state(s: &CallStatus, device: &str) -> DeliveryState {
    s.callees
        .iter()
        .find(|c| c.device_id == device)
        .unwrap_or_else(|| panic!("{device} is no callee: {s:?}"))
        .state()
}

/// Follow WatchCall to its end; returns every update.
async fn watch_to_end(h: &Harness, call_id: &str) -> Vec<push_proto::sender::DeliveryUpdate> {
    let mut stream = h
        .sender()
        .watch_call(WatchCallRequest {
            call_id: call_id.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    within(async {
        while let Some(u) = stream.message().await.unwrap() {
            seen.push(u);
        }
    })
    .await;
    seen
}

#[tokio::test]
async fn an_answer_on_one_of_three_phones_stops_the_other_two_and_a_late_answer_is_refused() {
    let h = Harness::start().await;
    let mut a = h.device("a").await;
    let mut b = h.device("b").await;
    let mut c = h.device("c").await;
    h.place(call("ward", &["a", "b", "c"], 60)).await.unwrap();
    for phone in [&mut a, &mut b, &mut c] {
        rings(phone, "ward").await;
    }
    h.await_state("ward", "c", DeliveryState::Acked).await;

    let reply = within(b.report_call("ward", CallOutcome::Answered))
        .await
        .unwrap();
    assert_eq!(reply.result(), CallOutcomeResult::Recorded, "{reply:?}");
    assert_eq!(
        told_to_stop(&mut a, "ward").await,
        CancelReason::AnsweredElsewhere
    );
    assert_eq!(
        told_to_stop(&mut c, "ward").await,
        CancelReason::AnsweredElsewhere
    );

    let late = within(a.report_call("ward", CallOutcome::Answered))
        .await
        .unwrap();
    assert_eq!(late.result(), CallOutcomeResult::AnsweredElsewhere);
    assert!(
        late.detail.contains('b'),
        "the refusal names who answered: {late:?}"
    );

    let s = status(&h, "ward").await;
    assert_eq!((s.state(), s.answered_by.as_str()), (CallState::Answered, "b"));
    assert_eq!(callee_state(&s, "b"), DeliveryState::Answered);
    assert_eq!(callee_state(&s, "a"), DeliveryState::Cancelled);
    assert_eq!(callee_state(&s, "c"), DeliveryState::Cancelled);
    let updates = watch_to_end(&h, "ward").await;
    let b_states: Vec<_> = updates
        .iter()
        .filter(|u| u.device_id == "b")
        .map(|u| u.state())
        .collect();
    assert_eq!(b_states.last(), Some(&DeliveryState::Answered), "{updates:?}");

    // The user hangs up: recorded on the call, idempotently.
    let ended = within(b.report_call("ward", CallOutcome::Ended)).await.unwrap();
    assert_eq!(ended.result(), CallOutcomeResult::Recorded);
    assert!(status(&h, "ward").await.hung_up_at_ms > 0);
}

#[tokio::test]
async fn declined_on_every_phone_the_call_ends_declined() {
    let h = Harness::start().await;
    let mut a = h.device("a").await;
    let mut b = h.device("b").await;
    h.place(call("c1", &["a", "b"], 60)).await.unwrap();
    rings(&mut a, "c1").await;
    rings(&mut b, "c1").await;
    let r = within(a.report_call("c1", CallOutcome::Declined)).await.unwrap();
    assert_eq!(r.result(), CallOutcomeResult::Recorded);
    assert_eq!(
        status(&h, "c1").await.state(),
        CallState::Ringing,
        "b still rings"
    );
    let r = within(b.report_call("c1", CallOutcome::Declined)).await.unwrap();
    assert_eq!(r.result(), CallOutcomeResult::Recorded);
    let s = status(&h, "c1").await;
    assert_eq!(s.state(), CallState::Declined);
    assert!(s.ended_at_ms > 0);
    assert_eq!(callee_state(&s, "a"), DeliveryState::Declined);
    assert_eq!(callee_state(&s, "b"), DeliveryState::Declined);
    // The same report again (its reply lost) gets the same answer.
    let again = within(b.report_call("c1", CallOutcome::Declined)).await.unwrap();
    assert_eq!(again.result(), CallOutcomeResult::Recorded);
    let unknown = within(b.report_call("never-placed", CallOutcome::Answered))
        .await
        .unwrap();
    assert_eq!(unknown.result(), CallOutcomeResult::UnknownCall);
}

#[tokio::test]
async fn nobody_answering_the_next_step_rings_at_its_time_and_the_call_ends_missed() {
    let h = Harness::start().await;
    let mut nurse = h.device("nurse").await;
    let mut charge = h.device("charge").await;
    let mut req = call("esc", &["nurse"], 3);
    req.escalation = vec![EscalationStep {
        target: Some(to("charge")),
        after_seconds: 1,
        stop_earlier: false,
    }];
    let placed = h.place(req).await.unwrap();
    rings(&mut nurse, "esc").await;
    rings(&mut charge, "esc").await;
    let s = status(&h, "esc").await;
    let step = &s.steps[1];
    assert!(
        step.started_at_ms >= step.due_at_ms && step.due_at_ms == s.placed_at_ms + 1_000,
        "step 1 rang at its time, not before: {s:?}"
    );
    // Nobody answers: at the deadline both missed it, and each phone is told so.
    assert_eq!(told_to_stop(&mut nurse, "esc").await, CancelReason::Missed);
    assert_eq!(told_to_stop(&mut charge, "esc").await, CancelReason::Missed);
    let s = status(&h, "esc").await;
    assert_eq!(s.state(), CallState::Missed);
    assert_eq!(s.ended_at_ms, placed.ring_deadline_ms);
    assert_eq!(callee_state(&s, "nurse"), DeliveryState::Missed);
    assert_eq!(callee_state(&s, "charge"), DeliveryState::Missed);
    let updates = watch_to_end(&h, "esc").await;
    let charge_step = updates.iter().find(|u| u.device_id == "charge").map(|u| u.step);
    assert_eq!(
        charge_step,
        Some(1),
        "the stream shows which step rang it: {updates:?}"
    );
    let late = within(nurse.report_call("esc", CallOutcome::Answered))
        .await
        .unwrap();
    assert_eq!(late.result(), CallOutcomeResult::CallEnded);
}

#[tokio::test]
async fn a_cancel_racing_the_placement_leaves_no_phone_ringing() {
    let h = Harness::start().await;
    let mut phone = h.device("a").await;
    let mut cancelled = 0;
    for i in 0..20 {
        let id = format!("race-{i}");
        let (sender, canceller) = (h.sender(), h.sender());
        let place = tokio::spawn({
            let mut sender = sender;
            let id = id.clone();
            async move { sender.place_call(call(&id, &["a"], 60)).await }
        });
        let cancel = tokio::spawn({
            let mut canceller = canceller;
            let id = id.clone();
            async move {
                // Cancel as soon as the call exists (NOT_FOUND until it is opened).
                loop {
                    let req = CancelCallRequest {
                        call_id: id.clone(),
                        reason: CancelReason::CallerCancelled as i32,
                    };
                    match canceller.cancel_call(req).await {
                        Err(s) if s.code() == tonic::Code::NotFound => tokio::task::yield_now().await,
                        other => return other,
                    }
                }
            }
        });
        within(place).await.unwrap().expect("placed");
        within(cancel).await.unwrap().expect("cancelled");
        cancelled += 1;
        let s = status(&h, &id).await;
        assert_eq!(s.state(), CallState::Cancelled, "{s:?}");
        // Whatever the phone was handed of this call is followed by its cancel, before a
        // marker sent now.
        let marker = h.send("a", "marker").await;
        let (mut rang, mut stopped) = (false, false);
        loop {
            let p = next(&mut phone).await;
            phone.ack(&[p.seq]).await.unwrap();
            match p.body {
                Some(push::Body::CallInvite(_)) => rang = true,
                Some(push::Body::CallCancel(c)) if c.call_id == id => stopped = true,
                _ if p.id == marker.message_id => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(
            !rang || stopped,
            "{id}: the phone rang and was never told to stop"
        );
    }
    assert_eq!(cancelled, 20);
}

#[tokio::test]
async fn a_step_due_while_the_server_was_down_rings_at_once_after_the_restart() {
    let mut h = Harness::start().await;
    let nurse_credential = h.issue("nurse", &[]).await;
    let charge_credential = h.issue("charge", &[]).await;
    let mut req = call("restart", &["nurse"], 60);
    req.escalation = vec![EscalationStep {
        target: Some(to("charge")),
        after_seconds: 1,
        stop_earlier: true,
    }];
    h.place(req).await.unwrap();
    let due = status(&h, "restart").await.steps[1].due_at_ms;
    h.shutdown().await;
    // The step falls due while no server runs.
    while push_server::hub::now_ms() <= due {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let server = Server::start(h.cfg.clone()).await.unwrap();
    let restarted_at = push_server::hub::now_ms();
    h.api = ApiClient::connect(server.api_addr, "localhost", &h.ca, &h.admin_key())
        .await
        .unwrap();
    h.server = Some(server);
    let mut charge = h.connect(&charge_credential, 0).await.unwrap();
    rings(&mut charge, "restart").await;
    let s = status(&h, "restart").await;
    assert!(
        s.steps[1].started_at_ms >= restarted_at,
        "started after the restart: {s:?}"
    );
    assert_eq!(s.state(), CallState::Ringing);
    // The nurse's ring was stopped by the step (stop_earlier): she never rings.
    let mut nurse = h.connect(&nurse_credential, 0).await.unwrap();
    let marker = h.send("nurse", "marker").await;
    assert_eq!(
        next(&mut nurse).await.id,
        marker.message_id,
        "the stopped invite is withdrawn"
    );
    let r = within(charge.report_call("restart", CallOutcome::Answered))
        .await
        .unwrap();
    assert_eq!(r.result(), CallOutcomeResult::Recorded);
    assert_eq!(status(&h, "restart").await.state(), CallState::Answered);
}
