//! The provider scenarios (`nepush-provider/scenarios/*.toml`), each run by the lifecycle host
//! (`nepush-host`) against the real `push-server` binary (and, for the VoIP fallback, the real
//! `apns-bridge` binary): build both first, `cargo build -p push-server -p apns-bridge`.
//!
//! The host checks its invariants after every step and fails the report on any break; the
//! tests here also assert figures that show each scenario did what it is about. The tests take
//! turns (one lock): open file descriptors and resident memory are per process, so a scenario's
//! figures must not include another's.

use std::{
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use e2e::{ServerProcess, within};
use nepush_host::{Report, RunOptions, Scenario};
use nepush_provider::{
    LastSeen, LocalNotification, Provider, ProviderConfiguration, ProviderHost, Registry, State,
};
use tokio::sync::watch;

static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn run(file: &str) -> Report {
    let _turn = TURN.lock().await;
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../nepush-provider/scenarios")
        .join(file);
    let scenario = Scenario::from_file(&path).unwrap_or_else(|e| panic!("{e:#}"));
    let report = nepush_host::run(&scenario, RunOptions { verbose: false }).await;
    println!("{report}");
    assert!(report.passed(), "{file} failed:\n{report}");
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn normal_day_messages_once_calls_with_their_dictionary() {
    let r = run("normal_day.toml").await;
    assert_eq!(
        r.notifications, 4,
        "each message shown once, and the missed-call notification of the call left ringing"
    );
    assert_eq!(
        r.call_reports, 4,
        "two invites and their cancels (missed, answered elsewhere)"
    );
    assert_eq!(r.max_server_sessions, 1);
    assert_eq!(r.max_counters.connected, 1);
    assert_eq!(r.replaced_dead, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_outcomes_reach_the_server_running_stopped_or_killed() {
    let r = run("call_outcomes_reach_the_server.toml").await;
    assert_eq!(r.outcome_replies, 4, "each report replied once, none lost");
    assert_eq!(r.call_reports, 1, "the invite only: no outcome ended a call");
    assert_eq!(r.max_server_sessions, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answered_declined_and_missed_are_decided_across_provider_restarts() {
    let r = run("call_answered_declined_missed.toml").await;
    assert_eq!(r.outcome_replies, 3, "each report replied once, none lost");
    assert_eq!(r.notifications, 1, "the missed call, once");
    assert_eq!(r.max_server_sessions, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hospital_new_instance_every_few_hours_never_two_sessions() {
    let r = run("hospital_8h.toml").await;
    assert_eq!(r.instances, 17);
    assert_eq!(
        r.server_logins, 18,
        "one login per instance, and one after the night's outage: none repeated"
    );
    assert!(
        r.clock_stops >= 10,
        "the outage's retries, stop by stop: {}",
        r.clock_stops
    );
    assert_eq!(r.max_server_sessions, 1);
    // The field bug is reproduced: iOS kept 8 old instances alive besides the current one...
    assert!(r.max_counters.instances >= 9, "{:?}", r.max_counters);
    let kept = &r.repeats[0];
    assert_eq!(kept.end.counters.instances, 9);
    // ...and they hold nothing: one session, task and socket in the process, all along.
    assert_eq!(
        (
            kept.end.counters.sessions,
            kept.end.counters.tasks,
            kept.end.counters.sockets
        ),
        (1, 1, 1)
    );
    assert_eq!((r.max_counters.sessions, r.max_counters.sockets), (1, 1));
    assert!(r.simulated >= Duration::from_secs(48 * 3600));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaving_without_stop_goes_offline_by_heartbeat_and_calls_fall_back_to_apns() {
    let r = run("leave_without_stop.toml").await;
    assert_eq!(r.offline.len(), 1);
    let (what, took, _) = &r.offline[0];
    assert!(what.contains("heartbeat"), "{what}");
    // Nothing told the server: it can only have noticed an unanswered heartbeat, which takes
    // at least the answer timeout (500 ms).
    assert!(
        *took >= Duration::from_millis(500),
        "offline after {took:?}: not by heartbeat?"
    );
    assert_eq!(
        r.wifi_blackholed, 2,
        "the session left behind, then the one at the final leave"
    );
    assert!(r.simulated >= Duration::from_secs(30 * 60), "{:?}", r.simulated);
    assert_eq!(
        r.call_reports, 1,
        "the missed call's cancel only: the invite, over for 29 minutes, never rang"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_two_minute_outage_the_phone_is_back_within_seconds() {
    // Needs the SDK's capped-at-a-few-seconds backoff (issue #14, item 2): with the 30 s cap
    // the phone is usually still waiting when the bound passes.
    let r = run("server_outage.toml").await;
    assert_eq!(r.back_after.len(), 1);
    let (took, limit) = r.back_after[0];
    assert!(took <= limit, "{took:?}");
    assert!(
        r.clock_stops >= 8,
        "the backoff played out attempt by attempt: {} stops",
        r.clock_stops
    );
    assert_eq!(r.notifications, 2, "nothing lost, nothing twice");
    assert_eq!(r.call_reports, 1, "the call placed right after the return rang");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_phone_clock_five_minutes_fast_still_rings_its_calls() {
    let r = run("wrong_phone_clock.toml").await;
    assert_eq!(r.outcome_replies, 1);
    assert_eq!(
        r.call_reports, 2,
        "the on-site call, and the off-site one's missed cancel"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_while_on_the_ssid_is_noticed_at_once_and_restart_works() {
    let r = run("stop_on_the_ssid.toml").await;
    assert_eq!(r.offline.len(), 2);
    for (what, took, _) in &r.offline {
        assert!(what.contains("goodbye"), "{what}");
        assert!(*took < Duration::from_secs(1), "{took:?}");
    }
    assert_eq!(r.server_logins, 3);
    assert_eq!(r.notifications, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stop_reason_says_goodbye_and_releases_everything() {
    let r = run("every_stop_reason.toml").await;
    assert_eq!(r.offline.len(), 18);
    assert_eq!(r.server_logins, 18);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_racing_start_leaks_nothing_and_never_doubles_a_session() {
    let r = run("stop_racing_start.toml").await;
    assert_eq!(r.repeats[0].iterations, 25);
    assert!(r.server_logins >= 50, "{}", r.server_logins);
    assert_eq!(r.max_server_sessions, 1);
    assert_eq!((r.max_counters.sessions, r.max_counters.sockets), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_and_relaunch_delivers_queued_messages_exactly_once() {
    let r = run("kill_and_relaunch.toml").await;
    assert_eq!(
        r.notifications, 25,
        "every message within its TTL once: none lost, none repeated"
    );
    assert_eq!(
        r.call_reports, 0,
        "the 60 s call was over long before the relaunch"
    );
    assert!(
        r.kills >= 12 && r.processes >= 13,
        "{} kills, {} processes",
        r.kills,
        r.processes
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simulated_week_of_churn_grows_nothing() {
    let r = run("week_of_churn.toml").await;
    let w = &r.repeats[0];
    assert_eq!(w.iterations, 1008);
    assert!(
        w.simulated >= Duration::from_secs(7 * 86_400),
        "{:?}",
        w.simulated
    );
    assert!(w.lifecycle_events >= 12_000, "{}", w.lifecycle_events);
    assert_eq!(
        r.notifications, 2016,
        "two of three messages per slot: the third expired"
    );
    assert!(w.server_sessions >= 5_000, "{}", w.server_sessions);
    assert_eq!(r.max_server_sessions, 1);
    assert_eq!(
        (
            r.max_counters.sessions,
            r.max_counters.sockets,
            r.max_counters.connected
        ),
        (1, 1, 1)
    );
    assert!(
        w.end.fds <= w.baseline.fds + 4 && w.end.threads <= w.baseline.threads,
        "{w:?}"
    );
    assert!(w.end.rss_kib <= w.baseline.rss_kib + 4096, "{w:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_cancelled_right_after_it_rang_stops_ringing() {
    // The invite is acked before PlaceCall's commit returns; the cancel must still follow.
    run("cancel_right_after_ring.toml").await;
}

/// A host whose app-group write has not happened yet when iOS creates the next instance.
struct Forgetful {
    shown: Mutex<Vec<LocalNotification>>,
    shown_count: watch::Sender<usize>,
    state: watch::Sender<State>,
}

impl ProviderHost for Forgetful {
    fn report_incoming_call(&self, _: plist::Dictionary) {}
    fn show_notification(&self, n: LocalNotification) {
        self.shown.lock().unwrap().push(n);
        self.shown_count.send_modify(|c| *c += 1);
    }
    fn persist_last_seen(&self, _: LastSeen) {}
    fn call_outcome_replied(&self, _: nepush_provider::OutcomeReply) {}
    fn state_changed(&self, state: &State) {
        self.state.send_replace(state.clone());
    }
}

impl Forgetful {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            shown: Mutex::new(Vec::new()),
            shown_count: watch::channel(0).0,
            state: watch::channel(State::Idle).0,
        })
    }

    async fn connected(&self) {
        let mut rx = self.state.subscribe();
        within("connected", rx.wait_for(|s| matches!(s, State::Connected { .. })))
            .await
            .unwrap();
    }

    async fn shown(&self, id: &str) -> LocalNotification {
        let mut count = self.shown_count.subscribe();
        within("notification", async {
            loop {
                if let Some(n) = self.shown.lock().unwrap().iter().find(|n| n.id == id) {
                    return n.clone();
                }
                count.changed().await.unwrap();
            }
        })
        .await
    }
}

/// Found by the churn scenario: iOS created the next instance from an app-group value not yet
/// updated, and a message the older instance had shown came back. The newer instance now
/// resumes from what older instances of the device handed to the app in this process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_instance_from_a_stale_app_group_value_shows_nothing_again() {
    let _turn = TURN.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = tokio::task::spawn_blocking(move || ServerProcess::start(&data, &[]))
        .await
        .unwrap();
    let credential = server.issue("stale-1").await;
    let configuration = ProviderConfiguration {
        host: "127.0.0.1".into(),
        port: server.device_addr.port(),
        server_name: e2e::SERVER_NAME.into(),
        device_id: "stale-1".into(),
        credential,
        ca_certificate: Some(server.ca_pem()),
        pins: Vec::new(),
        match_ssids: vec!["Ward 4B".into()],
    };
    let registry = Registry::new(tokio::runtime::Handle::current());
    let (a_host, b_host) = (Forgetful::new(), Forgetful::new());
    let a = Provider::new(
        &registry,
        configuration.clone(),
        LastSeen::default(),
        a_host.clone(),
    )
    .unwrap();
    a.start().await.unwrap();
    a_host.connected().await;
    server.send_text("stale-1", "m1", "first").await;
    let m1 = a_host.shown("m1").await;
    // Created from the stale value 0 while the older instance still runs.
    let b = Provider::new(&registry, configuration, LastSeen::default(), b_host.clone()).unwrap();
    b.start().await.unwrap();
    assert!(b.last_seen().seq >= m1.seq, "{:?} < {}", b.last_seen(), m1.seq);
    b_host.connected().await;
    server.send_text("stale-1", "m2", "second").await;
    b_host.shown("m2").await;
    let ids: Vec<String> = b_host
        .shown
        .lock()
        .unwrap()
        .iter()
        .map(|n| n.id.clone())
        .collect();
    assert_eq!(ids, ["m2"]);
    b.stop(nepush_provider::NEProviderStopReason::UserInitiated).await;
    drop((a, b));
    registry
        .wait_for_counters(Duration::from_secs(5), |s| s.is_quiet() && s.instances == 0)
        .await
        .unwrap();
}
