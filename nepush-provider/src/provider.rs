//! [`Provider`]: one `NEAppPushProvider` instance's logic.

use std::sync::Arc;

use mobile_sdk::{
    Client, DriverStats, EventHandler, Registry, StartError,
    core::{Event, LastSeen, NetworkEvent, State},
};

use crate::{
    config::{ConfigurationError, ProviderConfiguration},
    host::{self, ProviderHost},
    stop_reason::NEProviderStopReason,
};

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

/// Turns SDK events into host callbacks. Holds the host only.
struct Forward(Arc<dyn ProviderHost>);

impl EventHandler for Forward {
    fn on_event(&self, event: Event) {
        match event {
            Event::Message(m) => self.0.show_notification(m.into()),
            Event::CallInvite(c) => self.0.report_incoming_call(host::call_user_info(&c)),
            Event::CallCancel(c) => self.0.report_incoming_call(host::cancel_user_info(&c)),
            Event::LastSeenSeq(last_seen) => self.0.persist_last_seen(last_seen),
            Event::State(s) => self.0.state_changed(&s),
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
        let client = registry.client(client_config, Arc::new(Forward(host)))?;
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
        self.client.stop(reason.into()).await
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

    use mobile_sdk::core::{MessagePush, Priority};

    use super::*;
    use crate::host::LocalNotification;

    #[derive(Default)]
    struct Recorder {
        calls: Mutex<Vec<plist::Dictionary>>,
        notes: Mutex<Vec<LocalNotification>>,
        persisted: Mutex<Vec<LastSeen>>,
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
        let forward = Forward(rec.clone());
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
