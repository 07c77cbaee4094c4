//! The SDK against the real push-server over TLS: delivery, acks, calls, heartbeats, resume
//! after a graceful restart and after a SIGKILL, one session per device, trust settings.

mod common;

use std::time::{Duration, Instant};

use common::{Recorder, SdkConfig, connect, phone, registry, sdk_server};
use mobile_sdk::{
    Registry, StartError, Trust,
    core::{
        CallOutcome, CallOutcomeResult, Disconnect, Event, HostStop, InvalidReport, LastSeen, OutcomeReply,
        State, StopCause, StopReason,
    },
};
use push_proto::{
    device::{CancelReason, GoodbyeReason},
    sender::{ListDevicesRequest, PresenceEvent, RevokeDeviceRequest, VoipTokenState, WatchPresenceRequest},
};
use rustls::pki_types::{CertificateDer, pem::PemObject};
use testkit::harness::{ChildServer, Harness, Heartbeat, STEP, ServerInfo, to_devices};

testkit::server_process_entry!();

/// Watch presence from now on; the future ends with the event saying `device` went offline.
async fn offline_presence(
    api: &push_server::api_client::ApiClient,
    device: &str,
) -> impl Future<Output = PresenceEvent> {
    let mut presence = api
        .sender()
        .watch_presence(WatchPresenceRequest {})
        .await
        .unwrap()
        .into_inner();
    let device = device.to_string();
    async move {
        let offline = async {
            loop {
                let e = presence.message().await.unwrap().expect("presence stream");
                if e.device_id == device && !e.online {
                    return e;
                }
            }
        };
        tokio::time::timeout(STEP, offline)
            .await
            .expect("offline presence")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receives_messages_in_order_and_acks_them_after_the_app_took_them() {
    let server = sdk_server(Heartbeat::default()).await;
    let info = &server.info;
    let api = info.api().await;
    let reg = registry();
    let (client, mut events) = phone(&reg, info, "dev-a").await;
    for i in 1..=3 {
        ServerInfo::send(&api, "dev-a", &format!("m{i}")).await;
    }
    for i in 1..=3 {
        let id = format!("m{i}");
        let m = events
            .wait_for(&id, |e| match e {
                Event::Message(m) => Some(m.clone()),
                _ => None,
            })
            .await;
        assert_eq!(m.id, id);
        assert_eq!(m.title, format!("title {id}"));
    }
    for i in 1..=3 {
        ServerInfo::wait_acked(&api, &format!("m{i}")).await;
    }
    let last = events
        .wait_for("last seen 3", |e| match e {
            Event::LastSeenSeq(s) if s.seq >= 3 => Some(*s),
            _ => None,
        })
        .await;
    assert_ne!(last.epoch, 0, "the floor comes with the store's epoch");
    assert_eq!(client.last_seen(), last);
    assert_eq!(events.message_ids(), ["m1", "m2", "m3"]);
    client.stop(StopReason::HostRequested).await;
    assert!(reg.counters().is_quiet(), "{:?}", reg.counters());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_invites_carry_what_callkit_needs_and_cancels_follow() {
    let server = sdk_server(Heartbeat::default()).await;
    let info = &server.info;
    let api = info.api().await;
    let reg = registry();
    let (client, mut events) = phone(&reg, info, "dev-c").await;
    let placed = ServerInfo::place_call(&api, "dev-c", "call-1").await;
    let invite = events
        .wait_for("call invite", |e| match e {
            Event::CallInvite(c) => Some(c.clone()),
            _ => None,
        })
        .await;
    assert_eq!(invite.call_id, "call-1");
    assert_eq!(invite.call_uuid, placed.call_uuid);
    assert_eq!(invite.call_uuid, push_proto::call_uuid("call-1"));
    assert_eq!(invite.caller_name, "Ward 4B");
    assert_eq!(invite.ring_deadline_ms, placed.ring_deadline_ms);
    // The SDK's estimate of the server clock trails it by the ServerHello's transit time (and
    // millisecond truncation), so the remaining ring time may exceed 30 s by that much.
    assert!(
        invite.ring_remaining > Duration::from_secs(20)
            && invite.ring_remaining <= Duration::from_millis(30_050),
        "{:?}",
        invite.ring_remaining
    );
    assert_eq!(ServerInfo::cancel_call(&api, "call-1").await, 1);
    let cancel = events
        .wait_for("call cancel", |e| match e {
            Event::CallCancel(c) => Some(c.clone()),
            _ => None,
        })
        .await;
    assert_eq!(cancel.call_uuid, placed.call_uuid);
    assert_eq!(cancel.reason, CancelReason::CallerCancelled);
    client.stop(StopReason::HostRequested).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_are_answered_so_the_session_survives_many_rounds() {
    // A heartbeat every 200 ms, 400 ms to answer: about 15 rounds in 3 s, any miss ends the
    // session (the margin is for a loaded CI machine, not for the SDK).
    let hb = Heartbeat {
        interval_ms: 200,
        timeout_ms: 400,
    };
    let server = sdk_server(hb).await;
    let info = &server.info;
    let api = info.api().await;
    let reg = registry();
    let (client, mut events) = phone(&reg, info, "dev-h").await;
    let during = events.quiet_for(Duration::from_secs(3)).await;
    assert!(during.is_empty(), "the session changed state: {during:?}");
    assert!(ServerInfo::online(&api, "dev-h").await);
    assert!(matches!(client.state(), State::Connected { .. }));
    client.stop(StopReason::HostRequested).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_on_its_own_within_seconds_after_a_graceful_server_restart() {
    let mut server = sdk_server(Heartbeat::default()).await;
    let reg = registry();
    let (client, mut events) = phone(&reg, &server.info, "dev-r").await;
    ServerInfo::send(&server.info.api().await, "dev-r", "before").await;
    events
        .until("message before", |e| matches!(e, Event::Message(_)))
        .await;

    server.shutdown().await;
    events
        .until("goodbye SERVER_SHUTDOWN", |e| {
            matches!(
                e,
                Event::State(State::WaitingToRetry {
                    reason: Disconnect::ServerGoodbye(GoodbyeReason::ServerShutdown),
                    ..
                })
            )
        })
        .await;
    server.restart().await;
    let back = Instant::now();
    // No timer_event() from the host: the SDK retries on its own schedule.
    events.connected().await;
    let took = back.elapsed();
    println!("reconnected {took:?} after the server came back");
    assert!(
        took < Duration::from_secs(10),
        "{took:?}: must not wait for the 60 s system timer"
    );

    ServerInfo::send(&server.info.api().await, "dev-r", "after").await;
    events.message("message after", "after").await;
    assert_eq!(events.message_ids(), ["before", "after"]);
    client.stop(StopReason::HostRequested).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_without_loss_or_duplicates_after_a_server_kill() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ChildServer::start(dir.path(), Heartbeat::default());
    let credential = server.info.issue("dev-k").await;
    let reg = registry();
    let (client, mut events) = connect(&reg, server.info.client_config("dev-k", &credential)).await;
    let api = server.info.api().await;
    let ids: Vec<String> = (1..=30).map(|i| format!("k{i:02}")).collect();
    for id in &ids[..10] {
        ServerInfo::send(&api, "dev-k", id).await;
    }
    // Taken by the app and acked, but the server persists acks lazily: kill it at once, so
    // some acks are lost and the restarted server replays pushes the app already has.
    let tenth = ids[9].clone();
    events.message("first ten", &tenth).await;
    // Queued durably, maybe in flight when the server dies.
    for id in &ids[10..20] {
        ServerInfo::send(&api, "dev-k", id).await;
    }
    server.kill();
    drop(api);
    events
        .until("disconnect", |e| {
            matches!(e, Event::State(State::WaitingToRetry { .. }))
        })
        .await;
    server.restart();
    events.connected().await;
    let api = server.info.api().await;
    for id in &ids[20..] {
        ServerInfo::send(&api, "dev-k", id).await;
    }
    let last = ids[29].clone();
    events.message("all thirty", &last).await;
    ServerInfo::wait_acked(&api, &last).await;
    // Late duplicates would arrive right after the replay; give them a chance to show up.
    events.quiet_for(Duration::from_millis(500)).await;
    assert_eq!(events.message_ids(), ids, "every message exactly once, in order");
    println!("after the kill: {:?}", client.stats());

    // A new provider instance (the extension relaunched) resumes from the persisted sequence.
    let persisted = client.last_seen();
    assert!(persisted.seq >= 30, "{persisted:?}");
    client.stop(StopReason::HostRequested).await;
    let mut config = server.info.client_config("dev-k", &credential);
    config.last_seen = persisted;
    let (again, mut relaunched) = connect(&reg, config).await;
    ServerInfo::send(&api, "dev-k", "k31").await;
    relaunched.message("k31", "k31").await;
    assert_eq!(relaunched.message_ids(), ["k31"], "nothing old shown again");
    again.stop(StopReason::HostRequested).await;
    assert!(reg.counters().is_quiet());
}

/// An app group written before epochs (or by another store) holds a floor the server cannot
/// vouch for: the server acknowledges nothing by it and renumbers what it has queued at or
/// below it, so the app still gets those pushes, and the pair persisted afterwards carries the
/// store's epoch. (Needs the server's floor rule from `device.proto`, "Epochs and the floor".)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_floor_under_another_epoch_acknowledges_nothing_and_the_queue_still_arrives() {
    let server = sdk_server(Heartbeat::default()).await;
    let info = &server.info;
    let api = info.api().await;
    let credential = info.issue("dev-e").await;
    // Queued while the device is away; numbered 1 and 2 by this store.
    for id in ["e1", "e2"] {
        ServerInfo::send(&api, "dev-e", id).await;
    }
    let mut config = info.client_config("dev-e", &credential);
    config.last_seen = LastSeen { epoch: 0, seq: 5 };
    let reg = registry();
    let (client, mut events) = connect(&reg, config).await;
    // Before the `Connected` state: the store's epoch, with the floor kept.
    let persisted: Vec<LastSeen> = events
        .seen
        .iter()
        .filter_map(|e| match e {
            Event::LastSeenSeq(l) => Some(*l),
            _ => None,
        })
        .collect();
    let &[LastSeen { epoch, seq: 5 }] = persisted.as_slice() else {
        panic!("{persisted:?}");
    };
    assert_ne!(epoch, 0);
    events.message("e2", "e2").await;
    assert_eq!(events.message_ids(), ["e1", "e2"]);
    for id in ["e1", "e2"] {
        ServerInfo::wait_acked(&api, id).await;
    }
    let last = client.last_seen();
    assert_eq!(last.epoch, epoch);
    assert!(last.seq > 5, "renumbered above the floor: {last:?}");
    client.stop(StopReason::HostRequested).await;
    assert!(reg.counters().is_quiet());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_for_the_device_supersedes_the_first_in_the_same_process() {
    let server = sdk_server(Heartbeat::default()).await;
    let info = &server.info;
    let api = info.api().await;
    let credential = info.issue("dev-2").await;
    let reg = registry();
    let (ha, mut a_events) = Recorder::new();
    let (hb, mut b_events) = Recorder::new();
    let a = reg.client(info.client_config("dev-2", &credential), ha).unwrap();
    // Created second: the newer instance.
    let b = reg.client(info.client_config("dev-2", &credential), hb).unwrap();
    a.start().await.unwrap();
    a_events.connected().await;
    b.start().await.unwrap();
    // By the time start returns, the older session is gone.
    assert_eq!(a.state(), State::Stopped(StopCause::Host(StopReason::Superseded)));
    b_events.connected().await;
    // Created from a new install's zeros, the newer one resumed from the pair the older one
    // handed over (the registry's): its hello carried the store's epoch, so nothing changed.
    assert_ne!(a.last_seen().epoch, 0);
    assert_eq!(b.last_seen(), a.last_seen());
    assert!(
        !b_events.seen.iter().any(|e| matches!(e, Event::LastSeenSeq(_))),
        "{:?}",
        b_events.seen
    );
    let snap = reg.counters();
    assert_eq!(
        (
            snap.instances,
            snap.sessions,
            snap.tasks,
            snap.sockets,
            snap.connected
        ),
        (2, 1, 1, 1, 1),
        "{snap:?}"
    );
    assert_eq!(
        a.start().await,
        Err(StartError::Superseded("dev-2".into())),
        "the older instance cannot take the device back"
    );
    assert!(ServerInfo::online(&api, "dev-2").await);
    ServerInfo::send(&api, "dev-2", "only-b").await;
    b_events
        .until("message", |e| matches!(e, Event::Message(_)))
        .await;
    assert!(a_events.message_ids().is_empty());
    drop(a);
    b.stop(StopReason::HostRequested).await;
    let snap = reg.counters();
    assert!(snap.is_quiet(), "{snap:?}");
    assert_eq!(snap.instances, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_for_one_device_end_with_one_server_session_and_no_fight() {
    let server = sdk_server(Heartbeat::default()).await;
    let info = &server.info;
    let credential = info.issue("dev-p").await;
    // Separate registries: as if two processes (or a host bypassing the registry).
    let (reg_a, reg_b) = (registry(), registry());
    let (_a, mut a_events) = connect(&reg_a, info.client_config("dev-p", &credential)).await;
    let (b, mut b_events) = connect(&reg_b, info.client_config("dev-p", &credential)).await;
    a_events
        .until("REPLACED", |e| {
            matches!(e, Event::State(State::Stopped(StopCause::Replaced)))
        })
        .await;
    // The replaced instance does not come back to fight over the device.
    let a_quiet = reg_a.wait_for_counters(STEP, |s| s.is_quiet()).await;
    assert!(a_quiet.is_ok(), "{a_quiet:?}");
    let later = a_events.quiet_for(Duration::from_secs(1)).await;
    assert!(later.is_empty(), "{later:?}");
    assert_eq!(b_events.quiet_for(Duration::from_millis(200)).await, []);
    assert_eq!(reg_b.counters().connected, 1);
    assert!(ServerInfo::online(&info.api().await, "dev-p").await);
    b.stop(StopReason::HostRequested).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_and_stop_are_idempotent_and_stop_says_goodbye() {
    let server = sdk_server(Heartbeat::default()).await;
    let info = &server.info;
    let api = info.api().await;
    let credential = info.issue("dev-i").await;
    let reg = registry();
    let (handler, mut events) = Recorder::new();
    let client = reg
        .client(info.client_config("dev-i", &credential), handler)
        .unwrap();
    client.stop(StopReason::HostRequested).await;
    client.start().await.unwrap();
    client.start().await.unwrap();
    events.connected().await;
    assert_eq!(reg.counters().tasks, 1);
    let offline = offline_presence(&api, "dev-i").await;
    client.stop(StopReason::HostRequested).await;
    assert!(reg.counters().is_quiet(), "{:?}", reg.counters());
    client.stop(StopReason::HostRequested).await;
    assert_eq!(
        client.state(),
        State::Stopped(StopCause::Host(StopReason::HostRequested))
    );
    let offline = offline.await;
    assert!(offline.reason.contains("CLIENT_STOPPING"), "{}", offline.reason);
    // And it starts again.
    client.start().await.unwrap();
    events.connected().await;
    client.stop(StopReason::HostRequested).await;
}

/// iOS stops the provider because the phone left the Wi-Fi: the goodbye carries Apple's name,
/// and the server shows it per session, per device and per site, counts it in its metrics, and
/// does not take the phone for one gone silent on the SSID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn why_ios_stopped_the_provider_reaches_the_dashboard_and_metrics() {
    let server = sdk_server(Heartbeat::default()).await;
    let info = &server.info;
    let api = info.api().await;
    let credential = info.issue("dev-ios").await;
    let reg = registry();
    let mut config = info.client_config("dev-ios", &credential);
    config.ssid = "Ward 4B".into();
    let (client, _events) = connect(&reg, config).await;
    let offline = offline_presence(&api, "dev-ios").await;
    client
        .stop(HostStop {
            reason: StopReason::NoNetwork,
            provider_reason: "noNetworkAvailable",
        })
        .await;
    let offline = offline.await;
    assert!(
        offline.reason.contains("(iOS: noNetworkAvailable)"),
        "{}",
        offline.reason
    );

    let (status, body) = server.dashboard_get("/api/devices/dev-ios").await;
    assert_eq!(status, 200, "{body}");
    let detail: serde_json::Value = serde_json::from_str(&body).unwrap();
    let (device, session) = (&detail["device"], &detail["sessions"][0]);
    assert_eq!(
        device["last_provider_stop_reason"], "noNetworkAvailable",
        "{detail}"
    );
    assert_eq!(
        (&device["left_wifi"], &device["flags"]),
        (&serde_json::json!(true), &serde_json::json!([]))
    );
    assert_eq!(session["provider_stop_reason"], "noNetworkAvailable", "{detail}");
    let (_, body) = server.dashboard_get("/api/overview").await;
    let overview: serde_json::Value = serde_json::from_str(&body).unwrap();
    let site = &overview["sites"][0];
    assert_eq!(
        (&site["ssid"], &site["left_wifi"], &site["provider_stops"]),
        (
            &serde_json::json!("Ward 4B"),
            &serde_json::json!(1),
            &serde_json::json!({"noNetworkAvailable": 1})
        ),
        "{overview}"
    );
    let (status, metrics) = server.dashboard_get("/metrics").await;
    assert_eq!(status, 200, "{metrics}");
    // Counted (at least once: the recorder is the process's, shared with the other tests).
    for name in [
        "lpush_provider_stops_total{reason=\"noNetworkAvailable\"}",
        "lpush_sessions_left_wifi_total",
    ] {
        let count = metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok());
        assert!(count >= Some(1), "no `{name}` in:\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_or_refused_credentials_stop_for_good() {
    let server = sdk_server(Heartbeat::default()).await;
    let info = &server.info;
    let api = info.api().await;
    let reg = registry();
    let (client, mut events) = phone(&reg, info, "dev-v").await;
    api.admin()
        .revoke_device(RevokeDeviceRequest {
            device_id: "dev-v".into(),
        })
        .await
        .unwrap();
    events
        .until("revoked", |e| {
            matches!(e, Event::State(State::Stopped(StopCause::CredentialRevoked)))
        })
        .await;
    // The task ends by itself: nothing left running, no retries.
    assert!(reg.wait_for_counters(STEP, |s| s.is_quiet()).await.is_ok());
    let attempts = client.stats().connect_attempts;

    let (handler, mut refused) = Recorder::new();
    let bogus = reg
        .client(info.client_config("dev-x", "not-a-jwt"), handler)
        .unwrap();
    bogus.start().await.unwrap();
    refused
        .until("auth failed", |e| {
            matches!(e, Event::State(State::Stopped(StopCause::AuthFailed)))
        })
        .await;
    assert!(reg.wait_for_counters(STEP, |s| s.is_quiet()).await.is_ok());
    assert_eq!(client.stats().connect_attempts, attempts);
}

fn server_pin(info: &ServerInfo) -> String {
    let pem = std::fs::read(info.dir.join("tls/server.pem")).unwrap();
    let cert = CertificateDer::from_pem_slice(&pem).unwrap();
    mobile_sdk::tls::spki_pin(&cert).unwrap()
}

fn ca_pin(info: &ServerInfo) -> String {
    let cert = CertificateDer::from_pem_slice(info.ca_pem().as_bytes()).unwrap();
    mobile_sdk::tls::spki_pin(&cert).unwrap()
}

/// Connect with `trust`; returns the first state after the attempt: connected or failed.
async fn first_outcome(info: &ServerInfo, credential: &str, trust: Trust) -> State {
    let reg = registry();
    let (handler, mut events) = Recorder::new();
    let mut config = info.client_config("dev-t", credential);
    config.trust = trust;
    let client = reg.client(config, handler).unwrap();
    client.start().await.unwrap();
    let state = events
        .wait_for("outcome", |e| match e {
            Event::State(s @ (State::Connected { .. } | State::WaitingToRetry { .. })) => Some(s.clone()),
            _ => None,
        })
        .await;
    client.stop(StopReason::HostRequested).await;
    state
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_by_ca_by_pins_and_rotation_lists() {
    let server = sdk_server(Heartbeat::default()).await;
    let info = &server.info;
    let credential = info.issue("dev-t").await;
    let other = format!("sha256/{}=", "A".repeat(43));
    let connected = |s: &State| matches!(s, State::Connected { .. });

    // The server's own key, alone or next to a key still to come (rotation).
    let s = first_outcome(info, &credential, Trust::pins([other.clone(), server_pin(info)])).await;
    assert!(connected(&s), "{s:?}");
    // The CA's key, with the CA certificate at hand.
    let trust = Trust {
        ca_pem: Some(info.ca_pem()),
        pins: vec![ca_pin(info)],
    };
    let s = first_outcome(info, &credential, trust).await;
    assert!(connected(&s), "{s:?}");
    // A wrong pin is refused, whatever CA is configured.
    let trust = Trust {
        ca_pem: Some(info.ca_pem()),
        pins: vec![other.clone()],
    };
    let s = first_outcome(info, &credential, trust).await;
    assert!(
        matches!(&s, State::WaitingToRetry { reason: Disconnect::ConnectFailed(e), .. } if e.contains("certificate")),
        "{s:?}"
    );
    // The CA's pin alone: the server presents its CA after the leaf, so the chain is validated
    // up to the pinned CA without shipping its certificate.
    let s = first_outcome(info, &credential, Trust::pins([ca_pin(info)])).await;
    assert!(connected(&s), "{s:?}");
    // Another CA is refused.
    let other_server = sdk_server(Heartbeat::default()).await;
    let s = first_outcome(info, &credential, Trust::ca(other_server.info.ca_pem())).await;
    assert!(!connected(&s), "{s:?}");
}

/// The server's record of the device's PushKit token.
async fn voip_state(api: &push_server::api_client::ApiClient, device_id: &str) -> i32 {
    let devices = api
        .sender()
        .list_devices(ListDevicesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .devices;
    devices
        .into_iter()
        .find(|d| d.device_id == device_id)
        .unwrap()
        .voip_token
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pushkit_token_reaches_the_server_and_can_be_cleared() {
    let server = sdk_server(Heartbeat::default()).await;
    let info = &server.info;
    let api = info.api().await;
    let credential = info.issue("dev-voip").await;
    let reg = registry();
    let mut config = info.client_config("dev-voip", &credential);
    // PushKit tokens are 32 bytes: 64 hex digits (the server ignores what is not a token).
    config.voip_token = Some("a1b2c3d4".repeat(8));
    let (client, _events) = connect(&reg, config).await;
    // Frames are handled in order: once the server has the ack of a later push, it has the
    // token frame sent before it.
    ServerInfo::send(&api, "dev-voip", "v1").await;
    ServerInfo::wait_acked(&api, "v1").await;
    assert_eq!(
        voip_state(&api, "dev-voip").await,
        VoipTokenState::Registered as i32
    );
    client.set_voip_token(String::new());
    ServerInfo::send(&api, "dev-voip", "v2").await;
    ServerInfo::wait_acked(&api, "v2").await;
    assert_eq!(voip_state(&api, "dev-voip").await, VoipTokenState::None as i32);
    client.stop(StopReason::HostRequested).await;
}

/// The next reply the host is told about for a report of `outcome` of `call_id`.
async fn replied(events: &mut Recorder, call_id: &str, outcome: CallOutcome) -> OutcomeReply {
    events
        .wait_for(&format!("reply to {call_id} {outcome:?}"), |e| match e {
            Event::CallOutcomeReplied(r) if r.call_id == call_id && r.outcome == outcome => Some(r.clone()),
            _ => None,
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_outcomes_reach_the_server_before_start_while_connected_and_across_a_server_restart() {
    let mut server = sdk_server(Heartbeat::default()).await;
    let credential = server.info.issue("dev-out").await;
    let reg = registry();
    let (handler, mut events) = Recorder::new();
    let client = reg
        .client(server.info.client_config("dev-out", &credential), handler)
        .unwrap();
    assert_eq!(
        client.report_call_outcome("c-1".into(), CallOutcome::Unspecified, 1),
        Err(InvalidReport::Outcome)
    );
    // Before start: kept by the client, sent after the first hello.
    client
        .report_call_outcome("c-1".into(), CallOutcome::Answered, 1)
        .unwrap();
    client.start().await.unwrap();
    let reply = replied(&mut events, "c-1", CallOutcome::Answered).await;
    // The server decides no outcome yet: it knows no such call. Any decided result will do.
    assert_ne!(reply.result, CallOutcomeResult::Unspecified, "{reply:?}");
    client
        .report_call_outcome("c-2".into(), CallOutcome::Declined, 2)
        .unwrap();
    replied(&mut events, "c-2", CallOutcome::Declined).await;
    assert!(client.pending_call_outcomes().is_empty());

    // Made while the server is down: kept through the reconnect, sent after the next hello.
    server.shutdown().await;
    events
        .until("disconnected", |e| {
            matches!(e, Event::State(State::WaitingToRetry { .. }))
        })
        .await;
    client
        .report_call_outcome("c-3".into(), CallOutcome::Missed, 3)
        .unwrap();
    assert_eq!(client.pending_call_outcomes().len(), 1);
    server.restart().await;
    replied(&mut events, "c-3", CallOutcome::Missed).await;
    assert!(client.pending_call_outcomes().is_empty());
    let replies = events
        .seen
        .iter()
        .filter(|e| matches!(e, Event::CallOutcomeReplied(_)))
        .count();
    assert_eq!(replies, 3, "each reply told to the host once");
    client.stop(StopReason::HostRequested).await;
    assert!(reg.counters().is_quiet(), "{:?}", reg.counters());
}

/// Send a signal to the child server (STOP freezes it with its sockets open: a half-dead peer).
fn signal(server: &ChildServer, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([sig, &server.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_server_is_detected_by_its_silence_and_left_for_a_new_connection() {
    let dir = tempfile::tempdir().unwrap();
    let hb = Heartbeat {
        interval_ms: 300,
        timeout_ms: 500,
    };
    let server = ChildServer::start(dir.path(), hb);
    let reg = registry();
    let (client, mut events) = phone(&reg, &server.info, "dev-f").await;
    // The TCP connection stays open, the server just says nothing any more.
    signal(&server, "-STOP");
    let frozen = Instant::now();
    events
        .until("silence detected", |e| {
            matches!(
                e,
                Event::State(State::WaitingToRetry {
                    reason: Disconnect::ServerSilent,
                    ..
                })
            )
        })
        .await;
    let detected = frozen.elapsed();
    println!("frozen server detected after {detected:?} (interval + timeout = 800 ms)");
    // The last heartbeat came at most one interval before the freeze: at least 500 ms of the
    // 800 ms of silence remain after it.
    assert!(detected >= Duration::from_millis(450), "{detected:?}");
    signal(&server, "-CONT");
    events.connected().await;
    client.stop(StopReason::HostRequested).await;
    assert!(reg.counters().is_quiet());
}

/// SDK phones for `ids`, each issued a credential on `server`, started and connected.
async fn connected_phones(
    server: &Harness,
    reg: &Registry,
    ids: &[&str],
) -> Vec<(mobile_sdk::Client, Recorder)> {
    let mut phones = Vec::new();
    for id in ids {
        phones.push(phone(reg, &server.info, id).await);
    }
    phones
}

/// A call `call_id` ringing `ids` for `ring_secs`.
fn ring(
    call_id: &str,
    ids: &[&str],
    caller_name: &str,
    ring_secs: u32,
) -> push_proto::sender::PlaceCallRequest {
    push_proto::sender::PlaceCallRequest {
        call_id: call_id.into(),
        target: Some(to_devices(ids)),
        caller_name: caller_name.into(),
        ring_timeout_seconds: ring_secs,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_on_one_of_three_sdk_phones_stops_the_other_two_and_a_late_answer_is_refused() {
    let server = sdk_server(Heartbeat::default()).await;
    let reg = registry();
    let mut phones = connected_phones(&server, &reg, &["ward-a", "ward-b", "ward-c"]).await;
    let api = server.info.api().await;
    api.sender()
        .place_call(ring("ring-ward", &["ward-a", "ward-b", "ward-c"], "Bed 12", 60))
        .await
        .expect("PlaceCall");
    for (_, events) in &mut phones {
        events
            .until(
                "the invite",
                |e| matches!(e, Event::CallInvite(c) if c.call_id == "ring-ward"),
            )
            .await;
    }
    // The nurse on phone B answers in CallKit; the app hands it to the SDK.
    let (b, b_events) = &mut phones[1];
    b.report_call_outcome("ring-ward".into(), CallOutcome::Answered, 1)
        .unwrap();
    let won = replied(b_events, "ring-ward", CallOutcome::Answered).await;
    assert_eq!(won.result, CallOutcomeResult::Recorded, "{won:?}");
    for k in [0, 2] {
        let reason = phones[k]
            .1
            .wait_for("the cancel", |e| match e {
                Event::CallCancel(c) if c.call_id == "ring-ward" => Some(c.reason),
                _ => None,
            })
            .await;
        assert_eq!(reason, CancelReason::AnsweredElsewhere);
    }
    // A second answer, late, is refused with who has the call.
    let (a, a_events) = &mut phones[0];
    a.report_call_outcome("ring-ward".into(), CallOutcome::Answered, 2)
        .unwrap();
    let late = replied(a_events, "ring-ward", CallOutcome::Answered).await;
    assert_eq!(late.result, CallOutcomeResult::AnsweredElsewhere, "{late:?}");
    assert!(late.detail.contains("ward-b"), "{late:?}");
    for (client, _) in phones {
        client.stop(StopReason::HostRequested).await;
    }
    assert!(reg.counters().is_quiet(), "{:?}", reg.counters());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_phones_declining_end_the_call_declined_and_an_unanswered_one_is_told_it_missed() {
    let server = sdk_server(Heartbeat::default()).await;
    let reg = registry();
    let mut phones = connected_phones(&server, &reg, &["icu-a", "icu-b"]).await;
    let api = server.info.api().await;
    let place = |call_id: &str, ring_secs: u32| ring(call_id, &["icu-a", "icu-b"], "Bed 3", ring_secs);
    let status = |call_id: &str| {
        let api = &api;
        let call_id = call_id.to_string();
        async move {
            api.sender()
                .get_call_status(push_proto::sender::WatchCallRequest { call_id })
                .await
                .expect("GetCallStatus")
                .into_inner()
        }
    };
    // Both decline: the call ends DECLINED.
    api.sender()
        .place_call(place("declined", 60))
        .await
        .expect("PlaceCall");
    for (client, events) in &mut phones {
        events
            .until(
                "the invite",
                |e| matches!(e, Event::CallInvite(c) if c.call_id == "declined"),
            )
            .await;
        client
            .report_call_outcome("declined".into(), CallOutcome::Declined, 1)
            .unwrap();
        let r = replied(events, "declined", CallOutcome::Declined).await;
        assert_eq!(r.result, CallOutcomeResult::Recorded, "{r:?}");
    }
    assert_eq!(
        status("declined").await.state(),
        push_proto::sender::CallState::Declined
    );
    // Nobody answers: at the deadline each phone is told it missed the call.
    api.sender()
        .place_call(place("missed", 1))
        .await
        .expect("PlaceCall");
    for (_, events) in &mut phones {
        let reason = events
            .wait_for("the missed call", |e| match e {
                Event::CallCancel(c) if c.call_id == "missed" => Some(c.reason),
                _ => None,
            })
            .await;
        assert_eq!(reason, CancelReason::Missed);
    }
    let s = status("missed").await;
    assert_eq!(s.state(), push_proto::sender::CallState::Missed);
    assert!(
        s.callees
            .iter()
            .all(|c| c.state() == push_proto::sender::DeliveryState::Missed),
        "{s:?}"
    );
    // The user taps a stale ring: refused, the app ends it in CallKit.
    let (a, a_events) = &mut phones[0];
    a.report_call_outcome("missed".into(), CallOutcome::Answered, 2)
        .unwrap();
    let late = replied(a_events, "missed", CallOutcome::Answered).await;
    assert_eq!(late.result, CallOutcomeResult::CallEnded, "{late:?}");
    for (client, _) in phones {
        client.stop(StopReason::HostRequested).await;
    }
    assert!(reg.counters().is_quiet(), "{:?}", reg.counters());
}
