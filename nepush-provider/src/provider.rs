//! [`Provider`]: one `NEAppPushProvider` instance's logic.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
};

use mobile_sdk::{
    Client, DriverStats, EventHandler, Registry, StartError,
    core::{CallOutcome, CancelReason, Event, InvalidReport, LastSeen, NetworkEvent, State},
};

use crate::{
    config::{ConfigurationError, ProviderConfiguration},
    host::{self, Caller, ProviderHost},
    outcomes::PendingCallOutcomes,
    stop_reason::NEProviderStopReason,
};

/// Invites remembered to name the caller of a missed call: a handful of calls ring a phone
/// within a ring deadline.
const CALLERS_KEPT: usize = 32;

/// Why a provider could not be created or started.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProviderError {
    /// `providerConfiguration` is unusable: re-enroll or fix the manager; retrying will not help.
    #[error(transparent)]
    Configuration(#[from] ConfigurationError),
    /// The configuration parsed, but the SDK cannot use it (bad PEM, bad pin, bad name).
    #[error("invalid configuration: {0}")]
    Sdk(#[from] mobile_sdk::ConfigError),
    /// A newer instance for the same device has started in this process; this one stays
    /// stopped (iOS created a new instance without stopping this one).
    #[error("superseded: a newer provider instance for device {0} has started")]
    Superseded(String),
    /// The SDK's runtime is shutting down (the process is exiting).
    #[error("the SDK runtime is shutting down")]
    ShuttingDown,
}

impl From<StartError> for ProviderError {
    fn from(e: StartError) -> Self {
        match e {
            StartError::Superseded(device) => ProviderError::Superseded(device),
            // Non-exhaustive upstream: anything else means the SDK cannot run.
            _ => ProviderError::ShuttingDown,
        }
    }
}

/// The logic of one `NEAppPushProvider` instance. The Swift subclass creates one in `init`
/// and forwards `start()`, `stop(with:completionHandler:)` and `handleTimerEvent()` to it.
///
/// - Sessions are one per device per process (the [`Registry`]): when iOS creates a new
///   instance without stopping the old one, the newest to start wins and the older one's
///   session is stopped and released before the new one connects.
/// - Nothing refers back to the provider: its session task holds only the host callbacks, so
///   dropping the provider at any moment (with or without `stop`) ends the session and
///   releases everything; the SDK's counters prove it in the tests.
pub struct Provider {
    client: Client,
    configuration: ProviderConfiguration,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("device_id", &self.configuration.device_id)
            .field("instance_id", &self.client.instance_id())
            .finish_non_exhaustive()
    }
}

/// Turns SDK events into host callbacks. Holds the host (and the latest callers) only.
struct Forward {
    host: Arc<dyn ProviderHost>,
    callers: Mutex<VecDeque<(String, Caller)>>,
}

impl Forward {
    fn new(host: Arc<dyn ProviderHost>) -> Self {
        Self {
            host,
            callers: Mutex::new(VecDeque::new()),
        }
    }

    fn remember(&self, call_id: &str, caller: Caller) {
        let mut callers = self.callers.lock().expect("poisoned");
        if callers.len() == CALLERS_KEPT {
            callers.pop_front();
        }
        callers.push_back((call_id.to_owned(), caller));
    }

    fn caller(&self, call_id: &str) -> Option<Caller> {
        let callers = self.callers.lock().expect("poisoned");
        callers
            .iter()
            .rev()
            .find(|(id, _)| id == call_id)
            .map(|(_, c)| c.clone())
    }
}

impl EventHandler for Forward {
    fn on_event(&self, event: Event) {
        let host = &self.host;
        match event {
            Event::Message(m) => host.show_notification(m.into()),
            Event::CallInvite(c) => {
                self.remember(
                    &c.call_id,
                    Caller {
                        name: c.caller_name.clone(),
                        handle: c.caller_handle.clone(),
                        created_at_ms: c.created_at_ms,
                    },
                );
                host.report_incoming_call(host::call_user_info(&c))
            }
            Event::CallCancel(c) => {
                // The app stops the ring (or learns of a call it never rang) either way.
                host.report_incoming_call(host::cancel_user_info(&c));
                if c.reason == CancelReason::Missed {
                    let caller = self.caller(&c.call_id);
                    host.show_notification(host::missed_call_notification(&c, caller.as_ref()));
                }
            }
            Event::LastSeenSeq(last_seen) => host.persist_last_seen(last_seen),
            Event::State(s) => host.state_changed(&s),
            Event::CallOutcomeReplied(reply) => {
                // The answer was refused: the app must end the call the user thinks they have.
                if let Some(end) = host::end_user_info(&reply) {
                    host.report_incoming_call(end);
                }
                host.call_outcome_replied(reply);
            }
        }
    }
}

impl Provider {
    /// A provider for `configuration` in the process whose sessions `registry` keeps, resuming
    /// from `persisted` (the floor and epoch the host last persisted; zeros the first time).
    /// Not started.
    pub fn new(
        registry: &Registry,
        configuration: ProviderConfiguration,
        persisted: LastSeen,
        host: Arc<dyn ProviderHost>,
    ) -> Result<Self, ProviderError> {
        let client_config = configuration.client_config(persisted);
        Self::with_client_config(registry, configuration, client_config, host)
    }

    /// As [`Provider::new`], with SDK settings the host tuned (timeouts, backoff). The
    /// connection settings in `client_config` are used as given.
    pub fn with_client_config(
        registry: &Registry,
        configuration: ProviderConfiguration,
        client_config: mobile_sdk::ClientConfig,
        host: Arc<dyn ProviderHost>,
    ) -> Result<Self, ProviderError> {
        let client = registry.client(client_config, Arc::new(Forward::new(host)))?;
        Ok(Self {
            client,
            configuration,
        })
    }

    /// `NEAppPushProvider.start()`: connect and stay connected (the SDK reconnects on its
    /// own). Idempotent. Stops an older instance's session for the same device first.
    pub async fn start(&self) -> Result<(), ProviderError> {
        Ok(self.client.start().await?)
    }

    /// `stop(with:completionHandler:)`: say goodbye (if the connection still works), close,
    /// end the session task. Returns once all of it is released: then call the completion
    /// handler. Idempotent.
    pub async fn stop(&self, reason: NEProviderStopReason) {
        tracing::info!(device = %self.configuration.device_id, %reason, "provider stopped by the system");
        self.client.stop(reason).await
    }

    /// [`Provider::stop`] with Swift's `NEProviderStopReason.rawValue`; a value this build does
    /// not know (a newer iOS) stops all the same.
    pub async fn stop_raw(&self, raw_reason: i64) {
        match NEProviderStopReason::from_raw(raw_reason) {
            Some(reason) => self.stop(reason).await,
            None => {
                tracing::info!(device = %self.configuration.device_id, raw_reason, "provider stopped for an unknown reason");
                self.client.stop(mobile_sdk::core::StopReason::Other).await
            }
        }
    }

    /// `handleTimerEvent()` (about every 60 s): a backstop only; the SDK keeps its own
    /// schedule.
    pub fn handle_timer_event(&self) {
        self.client.timer_event()
    }

    /// A network change the extension observed (`NWPathMonitor`, SSID changes).
    pub fn network_changed(&self, event: NetworkEvent) {
        self.client.network_changed(event)
    }

    /// The PushKit (VoIP) token (hex), from the app through the app group; empty clears it.
    /// Sent to the server so calls ring through APNs when the phone is off-site.
    pub fn set_voip_token(&self, token: String) {
        self.client.set_voip_token(token)
    }

    /// What the user did with a call, as the app wrote it to the app group: sent to the server
    /// now if connected, and at the start of every later session of this instance until the
    /// server replies (then `call_outcome_replied`). A repeat of a pending report is not sent
    /// twice. Refused if the server would refuse it.
    pub fn report_call_outcome(
        &self,
        call_id: String,
        outcome: CallOutcome,
        at_ms: i64,
    ) -> Result<(), InvalidReport> {
        self.client.report_call_outcome(call_id, outcome, at_ms)
    }

    /// Every report in the app group's pending file (its bytes; see [`crate::outcomes`]): what
    /// the extension does at start and when the app posts its Darwin notification. Returns how
    /// many reports the file held.
    pub fn report_pending_call_outcomes(&self, file: &[u8]) -> usize {
        let pending = PendingCallOutcomes::parse(file);
        for r in pending.reports() {
            // `parse` keeps only reports the server takes.
            let _ = self.report_call_outcome(r.call_id.clone(), r.outcome, r.at_ms);
        }
        pending.len()
    }

    /// Call-outcome reports handed to this instance and not replied to yet.
    pub fn pending_call_outcomes(&self) -> Vec<mobile_sdk::core::OutcomeReport> {
        self.client.pending_call_outcomes()
    }

    /// Last reported connection state.
    pub fn state(&self) -> State {
        self.client.state()
    }

    /// The floor and its epoch (also passed to `persist_last_seen`).
    pub fn last_seen(&self) -> LastSeen {
        self.client.last_seen()
    }

    /// This instance's random id (sent in the hello; the server's churn diagnosis uses it).
    pub fn instance_id(&self) -> &str {
        self.client.instance_id()
    }

    /// The configuration it was created with.
    pub fn configuration(&self) -> &ProviderConfiguration {
        &self.configuration
    }

    /// SDK driver statistics.
    pub fn stats(&self) -> DriverStats {
        self.client.stats()
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Mutex, time::Duration};

    use mobile_sdk::core::{
        CallCancelPush, CallInvitePush, CallOutcomeResult, MessagePush, OutcomeReply, Priority,
    };

    use super::*;
    use crate::host::LocalNotification;

    #[derive(Default)]
    struct Recorder {
        calls: Mutex<Vec<plist::Dictionary>>,
        notes: Mutex<Vec<LocalNotification>>,
        persisted: Mutex<Vec<LastSeen>>,
        replies: Mutex<Vec<OutcomeReply>>,
    }

    impl ProviderHost for Recorder {
        fn report_incoming_call(&self, user_info: plist::Dictionary) {
            self.calls.lock().unwrap().push(user_info);
        }
        fn show_notification(&self, n: LocalNotification) {
            self.notes.lock().unwrap().push(n);
        }
        fn persist_last_seen(&self, last_seen: LastSeen) {
            self.persisted.lock().unwrap().push(last_seen);
        }
        fn call_outcome_replied(&self, reply: OutcomeReply) {
            self.replies.lock().unwrap().push(reply);
        }
    }

    fn configuration() -> ProviderConfiguration {
        ProviderConfiguration {
            host: "127.0.0.1".into(),
            // Nothing listens there: a refused connection, then backoff.
            port: 9,
            server_name: "localhost".into(),
            device_id: "phone-1".into(),
            credential: "jwt".into(),
            ca_certificate: None,
            pins: vec!["sha256/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into()],
            match_ssids: vec!["Ward 4B".into()],
        }
    }

    #[test]
    fn events_become_host_callbacks() {
        let rec = Arc::new(Recorder::default());
        let forward = Forward::new(rec.clone());
        forward.on_event(Event::Message(MessagePush {
            seq: 1,
            id: "m1".into(),
            title: "t".into(),
            body: "b".into(),
            data: Vec::new(),
            priority: Priority::Normal,
            collapse_key: String::new(),
            sent_at_ms: 0,
            expires_at_ms: 0,
            sender: String::new(),
        }));
        let last_seen = LastSeen { epoch: 7, seq: 1 };
        forward.on_event(Event::LastSeenSeq(last_seen));
        assert_eq!(rec.notes.lock().unwrap()[0].id, "m1");
        assert_eq!(*rec.persisted.lock().unwrap(), [last_seen]);
        assert!(rec.calls.lock().unwrap().is_empty());
    }

    fn cancel(call_id: &str, reason: CancelReason) -> Event {
        Event::CallCancel(CallCancelPush {
            seq: 2,
            id: format!("{call_id}:cancel"),
            call_id: call_id.into(),
            call_uuid: String::new(),
            reason,
        })
    }

    #[test]
    fn a_missed_call_is_ended_and_shown_naming_its_caller_and_an_escalated_one_quietly() {
        let rec = Arc::new(Recorder::default());
        let forward = Forward::new(rec.clone());
        forward.on_event(Event::CallInvite(CallInvitePush {
            seq: 1,
            id: "c1".into(),
            call_id: "c1".into(),
            call_uuid: String::new(),
            caller_name: "Dr. Okafor".into(),
            caller_handle: "ext 4411".into(),
            video: false,
            created_at_ms: 0,
            ring_deadline_ms: 30_000,
            ring_remaining: Duration::from_secs(30),
        }));
        forward.on_event(cancel("c1", CancelReason::Missed));
        forward.on_event(cancel("c2", CancelReason::Escalated));
        // A phone that was away never saw the invite, and still learns it missed the call.
        forward.on_event(cancel("c3", CancelReason::Missed));
        let kinds: Vec<(String, String)> = rec
            .calls
            .lock()
            .unwrap()
            .iter()
            .map(|d| {
                let s = |k: &str| d[k].as_string().unwrap().to_owned();
                (s("kind"), s("callId"))
            })
            .collect();
        let cancelled = |id: &str| ("cancel".to_owned(), id.to_owned());
        assert_eq!(kinds[1..], [cancelled("c1"), cancelled("c2"), cancelled("c3")]);
        let notes = rec.notes.lock().unwrap();
        let shown: Vec<(&str, &str)> = notes.iter().map(|n| (n.id.as_str(), n.body.as_str())).collect();
        assert_eq!(
            shown,
            [("missed-call:c1", "Dr. Okafor"), ("missed-call:c3", "")],
            "escalated: no notification"
        );
    }

    #[test]
    fn a_reply_reaches_the_host_and_a_refused_answer_ends_the_call() {
        let rec = Arc::new(Recorder::default());
        let forward = Forward::new(rec.clone());
        let reply = |outcome, result| OutcomeReply {
            call_id: "c1".into(),
            outcome,
            result,
            detail: String::new(),
        };
        forward.on_event(Event::CallOutcomeReplied(reply(
            CallOutcome::Declined,
            CallOutcomeResult::Recorded,
        )));
        assert!(
            rec.calls.lock().unwrap().is_empty(),
            "a recorded decline changes nothing"
        );
        forward.on_event(Event::CallOutcomeReplied(reply(
            CallOutcome::Answered,
            CallOutcomeResult::AnsweredElsewhere,
        )));
        let calls = rec.calls.lock().unwrap();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0]["kind"].as_string(), Some("end"));
        assert_eq!(
            rec.replies.lock().unwrap().len(),
            2,
            "every reply reaches the host"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn pending_reports_from_the_app_group_are_kept_by_an_unstarted_provider() {
        let registry = Registry::new(tokio::runtime::Handle::current());
        let p = Provider::new(
            &registry,
            configuration(),
            LastSeen::default(),
            Arc::new(Recorder::default()),
        )
        .unwrap();
        let mut file = PendingCallOutcomes::default();
        file.add(mobile_sdk::core::OutcomeReport {
            call_id: "c1".into(),
            outcome: CallOutcome::Answered,
            at_ms: 7,
        })
        .unwrap();
        file.add(mobile_sdk::core::OutcomeReport {
            call_id: "c2".into(),
            outcome: CallOutcome::Missed,
            at_ms: 8,
        })
        .unwrap();
        assert_eq!(p.report_pending_call_outcomes(&file.to_bytes()), 2);
        // The Darwin notification again, with the same file: nothing doubles.
        assert_eq!(p.report_pending_call_outcomes(&file.to_bytes()), 2);
        let pending: Vec<_> = p.pending_call_outcomes().into_iter().map(|r| r.call_id).collect();
        assert_eq!(pending, ["c1", "c2"]);
        assert_eq!(
            p.report_call_outcome(String::new(), CallOutcome::Answered, 0),
            Err(InvalidReport::CallId("is empty"))
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn dropped_at_any_moment_releases_everything() {
        let registry = Registry::new(tokio::runtime::Handle::current());
        let host = Arc::new(Recorder::default());
        for stop_first in [false, true] {
            let p = Provider::new(&registry, configuration(), LastSeen::default(), host.clone()).unwrap();
            p.start().await.unwrap();
            p.start().await.unwrap();
            assert_eq!(registry.counters().sessions, 1);
            if stop_first {
                p.stop(NEProviderStopReason::NoNetworkAvailable).await;
                assert!(registry.counters().is_quiet(), "{:?}", registry.counters());
            }
            drop(p);
            let quiet = registry
                .wait_for_counters(Duration::from_secs(5), |s| s.is_quiet() && s.instances == 0)
                .await;
            assert!(quiet.is_ok(), "{quiet:?}");
        }
        // Only the host's own Arc is left: no task kept a callback alive.
        assert_eq!(Arc::strong_count(&host), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn newest_instance_wins_and_older_start_is_refused() {
        let registry = Registry::new(tokio::runtime::Handle::current());
        let host = Arc::new(Recorder::default());
        let older = Provider::new(&registry, configuration(), LastSeen::default(), host.clone()).unwrap();
        let newer = Provider::new(&registry, configuration(), LastSeen::default(), host.clone()).unwrap();
        older.start().await.unwrap();
        newer.start().await.unwrap();
        assert_eq!(
            older.state(),
            State::Stopped(mobile_sdk::core::StopCause::Host(
                mobile_sdk::core::StopReason::Superseded
            ))
        );
        assert_eq!(
            older.start().await,
            Err(ProviderError::Superseded("phone-1".into()))
        );
        let c = registry.counters();
        assert_eq!((c.instances, c.sessions), (2, 1));
        newer.stop_raw(99).await;
        assert!(registry.counters().is_quiet());
    }

    #[test]
    fn bad_trust_is_refused_at_creation() {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let registry = Registry::new(rt.handle().clone());
        let mut c = configuration();
        c.pins = vec!["sha256/not base64".into()];
        let err =
            Provider::new(&registry, c, LastSeen::default(), Arc::new(Recorder::default())).unwrap_err();
        assert!(matches!(err, ProviderError::Sdk(_)), "{err}");
    }
}
