//! Call routing with the APNs VoIP fallback, through the real push-server (real TLS sessions,
//! the real gRPC API) and the real bridge code over the fake APNs. Every scenario runs twice:
//! with the bridge embedded, and with the bridge as a gRPC service over TLS (the remote mode's
//! client and server, in this process; `e2e/tests/apns_bridge_process.rs` runs it as its own
//! process).
//!
//! "No VoIP push" is shown with a marker: a later call that does fall back. The fallback handles
//! ack windows in deadline order, so once the marker's push arrived, every earlier decision has
//! been made.

use std::{sync::Arc, time::Duration};

use apns_bridge::{
    Bridge, BridgeSettings, BundleId,
    fake::{FakeAnswer, FakeApns},
    policy::RetryPolicy,
    remote::{self, TlsIdentity},
};
use push_proto::{
    device::{CallOutcome, CallOutcomeResult, CancelReason, VoipToken, client_frame, push},
    sender::{
        CancelCallRequest, DeliveryState, DeliveryUpdate, GetMessageStatusRequest, PlaceCallRequest,
        PlaceCallResponse, SetVoipTokenRequest, VoipTokenState, WatchCallRequest,
    },
};
use push_server::config::ApnsMode;
use testkit::harness::*;
use tokio::sync::oneshot;

const BUNDLE: &str = "com.example.ward";

#[derive(Clone, Copy, Debug)]
enum Mode {
    Embedded,
    Remote,
}

/// Run a scenario in both modes.
macro_rules! both_modes {
    ($name:ident) => {
        mod $name {
            #[tokio::test]
            async fn embedded() {
                super::$name(super::Mode::Embedded).await
            }
            #[tokio::test]
            async fn remote() {
                super::$name(super::Mode::Remote).await
            }
        }
    };
}

fn token(n: u8) -> String {
    format!("{n:02x}").repeat(32)
}

struct Env {
    h: Harness,
    fake: Arc<FakeApns>,
    _stop_bridge: Option<oneshot::Sender<()>>,
    _bridge_dir: Option<tempfile::TempDir>,
}

fn bridge(fake: Arc<FakeApns>) -> Arc<Bridge> {
    let mut settings = BridgeSettings::new(BundleId::parse(BUNDLE).unwrap());
    settings.send_timeout = Duration::from_secs(2);
    settings.retry = RetryPolicy {
        base: Duration::from_millis(50),
        max: Duration::from_millis(200),
        ..RetryPolicy::default()
    };
    Arc::new(Bridge::new(fake, settings))
}

async fn start(mode: Mode, ack_window_ms: u64) -> Env {
    let fake = FakeApns::new(BundleId::parse(BUNDLE).unwrap());
    match mode {
        Mode::Embedded => {
            let h = Harness::start_with_voip(
                |c| c.limits.call_ack_window_ms = ack_window_ms,
                Some(bridge(fake.clone())),
            )
            .await;
            Env {
                h,
                fake,
                _stop_bridge: None,
                _bridge_dir: None,
            }
        }
        Mode::Remote => {
            // The bridge as the remote mode runs it: TLS with its own certificate, an API key.
            let dir = tempfile::tempdir().unwrap();
            let (pki, _) = push_server::pki::load_or_create(&dir.path().join("tls"), &[]).unwrap();
            let ca_file = dir.path().join("bridge-ca.pem");
            std::fs::write(&ca_file, &pki.ca_cert_pem).unwrap();
            let key_file = dir.path().join("bridge.key");
            std::fs::write(&key_file, "bridge-secret-0123456789\n").unwrap();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (stop, stopped) = oneshot::channel::<()>();
            let tls = TlsIdentity {
                cert_pem: pki.server_cert_pem.clone(),
                key_pem: pki.server_key_pem.clone(),
            };
            tokio::spawn(remote::serve(
                listener,
                bridge(fake.clone()),
                "bridge-secret-0123456789",
                Some(tls),
                async {
                    let _ = stopped.await;
                },
            ));
            let h = Harness::start_with(|c| {
                c.limits.call_ack_window_ms = ack_window_ms;
                c.apns.mode = ApnsMode::Remote;
                c.apns.endpoint = format!("https://{addr}");
                c.apns.server_name = Some("localhost".into());
                c.apns.ca_file = Some(ca_file.clone());
                c.apns.api_key_file = Some(key_file.clone());
            })
            .await;
            Env {
                h,
                fake,
                _stop_bridge: Some(stop),
                _bridge_dir: Some(dir),
            }
        }
    }
}

impl Env {
    async fn set_token(&self, device_id: &str, token: &str) {
        self.h
            .admin()
            .set_voip_token(SetVoipTokenRequest {
                device_id: device_id.into(),
                token: token.into(),
            })
            .await
            .unwrap();
    }

    /// Register an offline device with a VoIP token.
    async fn offline_device(&self, device_id: &str, token: &str) -> String {
        let credential = self.h.issue(device_id, &[]).await;
        self.set_token(device_id, token).await;
        credential
    }

    async fn call(&self, call_id: &str, device_id: &str, ring_secs: u32) -> PlaceCallResponse {
        self.h
            .place(PlaceCallRequest {
                call_id: call_id.into(),
                target: Some(to(device_id)),
                caller_name: "Dr. Okafor".into(),
                caller_handle: "ext 4411".into(),
                video: true,
                ring_timeout_seconds: ring_secs,
                escalation: Vec::new(),
            })
            .await
            .unwrap()
    }

    async fn pushes(&self, n: usize) -> Vec<apns_bridge::fake::Received> {
        within(self.fake.wait_for(n)).await
    }

    fn assert_clean(&self) {
        assert!(self.fake.violations().is_empty(), "{:?}", self.fake.violations());
    }
}

fn rang_through_apns(u: &DeliveryUpdate) -> bool {
    u.state() == DeliveryState::Delivered && u.path == "apns"
}

async fn a_phone_rung_through_apns_answers_and_reports_it_on_site_later(mode: Mode) {
    let e = start(mode, 300).await;
    let credential = e.offline_device("phone-1", &token(1)).await;
    e.call("call-1", "phone-1", 30).await;
    e.h.await_update("call-1", "phone-1", rang_through_apns).await;
    // The user answered from the PushKit ring off-site; the report waits in the app group
    // until the phone is back on the ward's Wi-Fi and its provider connects.
    let mut phone = e.h.connect(&credential, 0).await.unwrap();
    let reply = within(phone.report_call("call-1", CallOutcome::Answered))
        .await
        .unwrap();
    assert_eq!(reply.result(), CallOutcomeResult::Recorded, "{reply:?}");
    let updates =
        e.h.await_state("call-1", "phone-1", DeliveryState::Answered)
            .await;
    assert_eq!(
        updates.last().unwrap().path,
        "apns",
        "the answer names the path that rang: {updates:?}"
    );
    // The invite replayed at the hello is the one PushKit rang (same call UUID: CallKit rings
    // once); after the answer nothing more comes for the call, no cancel to the answerer.
    let marker = e.h.send("phone-1", "marker").await;
    let mut before_marker = Vec::new();
    loop {
        let p = next(&mut phone).await;
        if p.id == marker.message_id {
            break;
        }
        before_marker.push(p);
    }
    assert!(
        before_marker.len() <= 1
            && before_marker
                .iter()
                .all(|p| matches!(&p.body, Some(push::Body::CallInvite(_)))),
        "{before_marker:?}"
    );
    assert_eq!(
        e.fake.received_for(&token(1)).len(),
        1,
        "one VoIP push for the call"
    );
    e.assert_clean();
}
both_modes!(a_phone_rung_through_apns_answers_and_reports_it_on_site_later);

async fn no_session_rings_through_one_voip_push(mode: Mode) {
    let e = start(mode, 300).await;
    e.offline_device("phone-1", &token(1)).await;
    let placed = e.call("call-1", "phone-1", 3).await;
    // It rang through APNs and nobody answered: missed, not merely expired.
    let updates =
        e.h.await_update("call-1", "phone-1", |u| u.state() == DeliveryState::Missed)
            .await;
    assert!(updates.iter().any(rang_through_apns), "{updates:?}");
    assert_eq!(
        updates.last().unwrap().path,
        "apns",
        "the final receipt names the path"
    );
    // Exactly one push for the call, carrying the contract.
    let sent = e.fake.received_for(&token(1));
    assert_eq!(sent.len(), 1, "{sent:?}");
    let r = &sent[0];
    assert_eq!(r.call_uuid, placed.call_uuid);
    assert_eq!(r.header("apns-push-type"), Some("voip"));
    assert_eq!(r.header("apns-topic"), Some("com.example.ward.voip"));
    assert_eq!(r.header("apns-priority"), Some("10"));
    assert_eq!(r.header("apns-collapse-id"), Some(placed.call_uuid.as_str()));
    let expiration: i64 = r.header("apns-expiration").unwrap().parse().unwrap();
    assert!(expiration * 1000 <= placed.ring_deadline_ms);
    let payload: serde_json::Value = serde_json::from_str(&r.payload).unwrap();
    assert_eq!(payload["lpush"]["caller_name"], "Dr. Okafor");
    assert_eq!(payload["lpush"]["ring_deadline_ms"], placed.ring_deadline_ms);
    e.assert_clean();
}
both_modes!(no_session_rings_through_one_voip_push);

async fn session_that_never_acks_gets_the_invite_then_one_voip_push(mode: Mode) {
    let window = Duration::from_millis(1000);
    let e = start(mode, window.as_millis() as u64).await;
    let mut phone = e.h.device("phone-1").await;
    // The device registers its token over its own session...
    phone
        .send(client_frame::Kind::VoipToken(VoipToken { token: token(2) }))
        .await
        .unwrap();
    // ...and a message acked after it proves the server has processed it (frames are handled
    // in order).
    let m = e.h.send("phone-1", "hello").await;
    let seq = next(&mut phone).await.seq;
    phone.ack(&[seq]).await.unwrap();
    e.h.await_state(&m.message_id, "phone-1", DeliveryState::Acked)
        .await;

    let placed_at = tokio::time::Instant::now();
    let placed = e.call("call-2", "phone-1", 20).await;
    // Watch from now on: the stream starts with the current state, then every change.
    let mut watch =
        e.h.sender()
            .watch_call(WatchCallRequest {
                call_id: "call-2".into(),
            })
            .await
            .unwrap()
            .into_inner();
    let p = next(&mut phone).await;
    let Some(push::Body::CallInvite(invite)) = p.body else {
        panic!("expected the invite locally first: {p:?}")
    };
    assert_eq!(invite.call_uuid, placed.call_uuid);
    // Not acked: after the window, the same call goes through APNs, once.
    let sent = e.pushes(1).await;
    assert!(placed_at.elapsed() >= window, "fell back before the window ended");
    assert_eq!(
        sent[0].call_uuid, invite.call_uuid,
        "both paths carry the same call UUID"
    );
    let mut updates = Vec::new();
    within(async {
        while let Some(u) = watch.message().await.unwrap() {
            let done = rang_through_apns(&u);
            updates.push(u);
            if done {
                break;
            }
        }
    })
    .await;
    assert!(updates.last().is_some_and(rang_through_apns), "{updates:?}");
    assert!(
        updates
            .iter()
            .any(|u| u.state() == DeliveryState::Delivered && u.path == "local"),
        "the local path rang it first: {updates:?}"
    );
    // A late ack still settles it; nothing more goes to APNs.
    phone.ack(&[p.seq]).await.unwrap();
    let updates = e.h.await_state("call-2", "phone-1", DeliveryState::Acked).await;
    assert_eq!(updates.last().unwrap().path, "local");
    assert_eq!(e.fake.received().len(), 1);
    e.assert_clean();
}
both_modes!(session_that_never_acks_gets_the_invite_then_one_voip_push);

async fn session_that_acks_gets_no_voip_push(mode: Mode) {
    let e = start(mode, 300).await;
    let mut phone1 = e.h.device("phone-1").await;
    e.set_token("phone-1", &token(3)).await;
    let mut phone2 = e.h.device("phone-2").await;
    e.set_token("phone-2", &token(4)).await;

    e.call("call-a", "phone-1", 20).await;
    let p = next(&mut phone1).await;
    phone1.ack(&[p.seq]).await.unwrap();
    e.h.await_state("call-a", "phone-1", DeliveryState::Acked).await;

    // Marker: a later call to a phone that does not ack falls back after its window.
    e.call("call-b", "phone-2", 20).await;
    let _unacked = next(&mut phone2).await;
    let sent = e.pushes(1).await;
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].call_id, "call-b");
    assert!(
        e.fake.received_for(&token(3)).is_empty(),
        "acked call went to APNs"
    );
    e.assert_clean();
}
both_modes!(session_that_acks_gets_no_voip_push);

async fn session_that_drops_falls_back_at_once(mode: Mode) {
    // A long window: only the session's end can explain a prompt fallback.
    let window = Duration::from_secs(8);
    let e = start(mode, window.as_millis() as u64).await;
    let phone = e.h.device("phone-1").await;
    e.set_token("phone-1", &token(9)).await;
    let placed_at = tokio::time::Instant::now();
    e.call("call-d", "phone-1", 20).await;
    phone.close().await.unwrap();
    let sent = e.pushes(1).await;
    assert!(placed_at.elapsed() < window);
    assert_eq!(sent[0].call_id, "call-d");
    e.assert_clean();
}
both_modes!(session_that_drops_falls_back_at_once);

async fn messages_and_cancels_never_become_voip_pushes(mode: Mode) {
    let e = start(mode, 300).await;
    let credential = e.offline_device("phone-1", &token(5)).await;
    e.offline_device("phone-2", &token(6)).await;
    let m = e.h.send("phone-1", "bed 12").await;
    e.call("call-c", "phone-1", 20).await;
    e.pushes(1).await;
    let cancelled =
        e.h.sender()
            .cancel_call(CancelCallRequest {
                call_id: "call-c".into(),
                reason: CancelReason::CallerCancelled as i32,
            })
            .await
            .unwrap()
            .into_inner();
    assert_eq!(
        cancelled.cancels_sent, 1,
        "queued locally, for when the phone comes on-site"
    );
    // Marker.
    e.call("call-m", "phone-2", 20).await;
    let sent = e.pushes(2).await;
    let calls: Vec<(&str, &str)> = sent
        .iter()
        .map(|r| (r.device_token.as_str(), r.call_id.as_str()))
        .collect();
    assert_eq!(
        calls,
        [(token(5).as_str(), "call-c"), (token(6).as_str(), "call-m")]
    );
    e.assert_clean();
    // The phone comes on-site: the message and the cancel arrive locally, the invite does not.
    let mut phone = e.h.connect(&credential, 0).await.unwrap();
    assert_eq!(next(&mut phone).await.id, m.message_id);
    let p = next(&mut phone).await;
    let Some(push::Body::CallCancel(c)) = p.body else {
        panic!("expected the cancel: {p:?}")
    };
    assert_eq!(c.call_uuid, push_proto::call_uuid("call-c"));
    assert_eq!(e.fake.received().len(), 2);
}
both_modes!(messages_and_cancels_never_become_voip_pushes);

async fn unregistered_token_is_invalidated_and_reported(mode: Mode) {
    let e = start(mode, 300).await;
    e.fake
        .script(&token(7), [FakeAnswer::status(410, "Unregistered")]);
    e.offline_device("phone-1", &token(7)).await;
    e.offline_device("phone-2", &token(8)).await;
    let placed = e.call("call-x", "phone-1", 20).await;
    let updates =
        e.h.await_update("call-x", "phone-1", |u| !u.reason.is_empty())
            .await;
    let last = updates.last().unwrap();
    assert!(
        last.reason.contains("Unregistered") && last.reason.contains("invalidated"),
        "{last:?}"
    );
    // The failed leg is reported; the call still rings locally until its deadline.
    assert_eq!(last.state(), DeliveryState::Accepted, "{last:?}");
    assert!(last.at_ms < placed.ring_deadline_ms);
    let devices = e.h.list_devices("", false).await;
    let phone1 = devices.iter().find(|d| d.device_id == "phone-1").unwrap();
    assert_eq!(phone1.voip_token(), VoipTokenState::Invalid);
    // The dead token is not used again: the next call waits for the local path only.
    e.call("call-y", "phone-1", 20).await;
    e.call("call-z", "phone-2", 20).await;
    let sent = e.pushes(2).await;
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert_eq!(sent[1].call_id, "call-z");
    let status =
        e.h.sender()
            .get_message_status(GetMessageStatusRequest {
                message_id: "call-y".into(),
            })
            .await
            .unwrap()
            .into_inner();
    assert_eq!(status.recipients[0].state(), DeliveryState::Accepted);
    // A new registration makes the device reachable again.
    e.set_token("phone-1", &token(7)).await;
    let devices = e.h.list_devices("", false).await;
    let phone1 = devices.iter().find(|d| d.device_id == "phone-1").unwrap();
    assert_eq!(phone1.voip_token(), VoipTokenState::Registered);
}
both_modes!(unregistered_token_is_invalidated_and_reported);

/// With no internet on site APNs always fails: the failure is reported, and a phone that comes
/// back on-site before the ring deadline still rings (the invite was deleted and the call
/// reported UNDELIVERABLE within milliseconds).
async fn apns_down_is_reported_and_the_local_call_keeps_ringing(mode: Mode) {
    let e = start(mode, 300).await;
    e.fake.set_default(FakeAnswer::Unreachable);
    let credential = e.offline_device("phone-1", &token(10)).await;
    let placed = e.call("call-u", "phone-1", 30).await;
    let updates =
        e.h.await_update("call-u", "phone-1", |u| !u.reason.is_empty())
            .await;
    let last = updates.last().unwrap();
    assert_eq!(last.state(), DeliveryState::Accepted, "{updates:?}");
    assert!(last.reason.contains("unreachable"), "{last:?}");
    assert!(
        last.at_ms < placed.ring_deadline_ms,
        "reported before the deadline"
    );
    assert_eq!(e.fake.received().len(), 1, "no retry when APNs cannot be reached");
    // The phone comes back on-site: the call rings there, and its ack is the outcome.
    let mut phone = e.h.connect(&credential, 0).await.unwrap();
    let invite = next(&mut phone).await;
    assert_eq!(invite.id, "call-u");
    phone.ack(&[invite.seq]).await.unwrap();
    let updates = e.h.await_update("call-u", "phone-1", settled).await;
    assert_eq!(
        updates.last().unwrap().state(),
        DeliveryState::Acked,
        "{updates:?}"
    );
}
both_modes!(apns_down_is_reported_and_the_local_call_keeps_ringing);

/// Whether the update is a final state.
fn settled(u: &DeliveryUpdate) -> bool {
    !matches!(
        u.state(),
        DeliveryState::Unspecified | DeliveryState::Accepted | DeliveryState::Delivered
    )
}

#[tokio::test]
async fn bridge_down_is_reported_quickly_and_the_local_call_keeps_ringing() {
    // Remote mode with nothing listening where the bridge should be.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("bridge.key");
    std::fs::write(&key_file, "bridge-secret-0123456789").unwrap();
    let h = Harness::start_with(|c| {
        c.apns.mode = ApnsMode::Remote;
        c.apns.endpoint = format!("http://127.0.0.1:{port}");
        c.apns.api_key_file = Some(key_file.clone());
    })
    .await;
    let credential = h.issue("phone-1", &[]).await;
    h.admin()
        .set_voip_token(SetVoipTokenRequest {
            device_id: "phone-1".into(),
            token: token(11),
        })
        .await
        .unwrap();
    let placed = h.place(call_to("call-v", "phone-1", "Dr. Okafor")).await.unwrap();
    let updates = h
        .await_update("call-v", "phone-1", |u| !u.reason.is_empty())
        .await;
    let last = updates.last().unwrap();
    assert_eq!(last.state(), DeliveryState::Accepted);
    assert!(last.reason.contains("bridge unreachable"), "{last:?}");
    assert!(last.at_ms < placed.ring_deadline_ms);
    let mut phone = h.connect(&credential, 0).await.unwrap();
    assert_eq!(next(&mut phone).await.id, "call-v");
}

#[tokio::test]
async fn voip_tokens_are_validated() {
    let h = Harness::start().await;
    h.issue("phone-1", &[]).await;
    let err = h
        .admin()
        .set_voip_token(SetVoipTokenRequest {
            device_id: "phone-1".into(),
            token: "not-hex".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = h
        .admin()
        .set_voip_token(SetVoipTokenRequest {
            device_id: "ghost".into(),
            token: token(1),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
}
