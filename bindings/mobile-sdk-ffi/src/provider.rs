//! The provider core (`nepush-provider`) for the Swift `NEAppPushProvider` subclass:
//! [`PushProvider`] and the [`ProviderHostCallbacks`] the subclass implements. Dictionaries
//! cross as property-list data, which Swift reads and writes with `PropertyListSerialization`.

use std::sync::Arc;

use nepush_provider as provider;

use crate::{
    SDK, SdkError,
    types::{CallOutcome, CallOutcomeReply, ConnectionState, LastSeen, NetworkChange},
};

/// What the provider asks of the Swift subclass. Called on an SDK thread, one call at a time
/// per provider: return quickly, do not call back into the provider from inside. A push counts
/// as taken (and is acknowledged) when the call returns.
#[uniffi::export(with_foreign)]
pub trait ProviderHostCallbacks: Send + Sync {
    /// Pass to `reportIncomingCall(userInfo:)`: an XML property list of the `userInfo`
    /// dictionary (`kind` is `"call"` or `"cancel"`; keys in the nepush-provider README).
    fn report_incoming_call(&self, user_info_plist: Vec<u8>);
    /// Show a text message as a local notification.
    fn show_notification(&self, notification: LocalNotification);
    /// Persist in the app group as one value; pass back as `persistedLastSeen` to the next
    /// instance.
    fn persist_last_seen(&self, last_seen: LastSeen);
    /// The connection state changed.
    fn state_changed(&self, state: ConnectionState);
    /// The server replied to a call-outcome report: delete it from the app group's pending
    /// file (`remove_pending_call_outcome`). A refused answer also comes as a
    /// `report_incoming_call` of `kind` `"end"`.
    fn call_outcome_replied(&self, reply: CallOutcomeReply);
}

/// A text message to show (`UNMutableNotificationContent`).
#[derive(Debug, Clone, uniffi::Record)]
pub struct LocalNotification {
    /// Use as the `UNNotificationRequest` identifier (a replay replaces, never duplicates).
    pub id: String,
    /// Per-device sequence.
    pub seq: u64,
    /// Title.
    pub title: String,
    /// Body.
    pub body: String,
    /// Sender display name (subtitle).
    pub sender: String,
    /// `threadIdentifier` (empty: none).
    pub thread_id: String,
    /// `categoryIdentifier`.
    pub category: String,
    /// `interruptionLevel = .timeSensitive`.
    pub time_sensitive: bool,
    /// Sent at, Unix ms.
    pub sent_at_ms: i64,
    /// Opaque application data.
    pub data: Vec<u8>,
}

impl From<provider::LocalNotification> for LocalNotification {
    fn from(n: provider::LocalNotification) -> Self {
        Self {
            id: n.id,
            seq: n.seq,
            title: n.title,
            body: n.body,
            sender: n.sender,
            thread_id: n.thread_id,
            category: n.category,
            time_sensitive: n.time_sensitive,
            sent_at_ms: n.sent_at_ms,
            data: n.data,
        }
    }
}

struct Host(Arc<dyn ProviderHostCallbacks>);

impl provider::ProviderHost for Host {
    fn report_incoming_call(&self, user_info: plist::Dictionary) {
        let mut xml = Vec::new();
        // Only plist values go in (strings, integers, bools): serialising cannot fail.
        if let Err(e) = plist::to_writer_xml(&mut xml, &user_info) {
            tracing::error!(error = %e, "call dictionary not serialisable; dropped");
            return;
        }
        self.0.report_incoming_call(xml)
    }

    fn show_notification(&self, notification: provider::LocalNotification) {
        self.0.show_notification(notification.into())
    }

    fn persist_last_seen(&self, last_seen: mobile_sdk::core::LastSeen) {
        self.0.persist_last_seen(last_seen.into())
    }

    fn state_changed(&self, state: &provider::State) {
        self.0.state_changed(state.clone().into())
    }

    fn call_outcome_replied(&self, reply: mobile_sdk::core::OutcomeReply) {
        self.0.call_outcome_replied(reply.into())
    }
}

/// One `NEAppPushProvider` instance's logic. Create it in the subclass's `init`, forward the
/// system's calls, and drop it whenever iOS releases the subclass (stopped or not).
#[derive(uniffi::Object)]
pub struct PushProvider {
    inner: provider::Provider,
}

#[uniffi::export]
impl PushProvider {
    /// From `providerConfiguration` as property-list data
    /// (`PropertyListSerialization.data(fromPropertyList:format:options:)`, XML or binary) and
    /// the floor and epoch persisted in the app group (zeros the first time). Not started.
    #[uniffi::constructor]
    pub fn new(
        provider_configuration: Vec<u8>,
        persisted_last_seen: LastSeen,
        host: Arc<dyn ProviderHostCallbacks>,
    ) -> Result<Self, SdkError> {
        let configuration = provider::ProviderConfiguration::from_plist_bytes(&provider_configuration)?;
        let host = Arc::new(Host(host));
        Ok(Self {
            inner: provider::Provider::new(&SDK.registry, configuration, persisted_last_seen.into(), host)?,
        })
    }

    /// `start()`: connect and stay connected. Idempotent.
    pub async fn start(&self) -> Result<(), SdkError> {
        Ok(self.inner.start().await?)
    }

    /// `stop(with: reason)`: pass `reason.rawValue`. Returns once everything is released; then
    /// call the completion handler. Idempotent.
    pub async fn stop(&self, reason: i64) {
        self.inner.stop_raw(reason).await
    }

    /// `handleTimerEvent()`.
    pub fn handle_timer_event(&self) {
        self.inner.handle_timer_event()
    }

    /// A path or SSID change (`NWPathMonitor`).
    pub fn network_changed(&self, change: NetworkChange) {
        self.inner.network_changed(change.into())
    }

    /// The PushKit token (hex) from the app group; empty clears it.
    pub fn set_voip_token(&self, token: String) {
        self.inner.set_voip_token(token)
    }

    /// What the user did with a call: sent now if connected, and at the start of every later
    /// session of this instance until the server replies (`call_outcome_replied`).
    pub fn report_call_outcome(
        &self,
        call_id: String,
        outcome: CallOutcome,
        at_ms: i64,
    ) -> Result<(), SdkError> {
        Ok(self.inner.report_call_outcome(call_id, outcome.into(), at_ms)?)
    }

    /// Every report in the app group's pending-outcomes file (its bytes; empty if there is no
    /// file): at start, and whenever the app posts its Darwin notification. Returns how many
    /// the file held.
    pub fn report_pending_call_outcomes(&self, file: Vec<u8>) -> u32 {
        u32::try_from(self.inner.report_pending_call_outcomes(&file)).unwrap_or(u32::MAX)
    }

    /// Current connection state.
    pub fn state(&self) -> ConnectionState {
        self.inner.state().into()
    }

    /// The floor and its epoch.
    pub fn last_seen(&self) -> LastSeen {
        self.inner.last_seen().into()
    }

    /// This instance's random id (diagnostics).
    pub fn instance_id(&self) -> String {
        self.inner.instance_id().to_owned()
    }
}

impl From<provider::ConfigurationError> for SdkError {
    fn from(e: provider::ConfigurationError) -> Self {
        SdkError::InvalidConfig {
            detail: e.to_string(),
        }
    }
}

impl From<provider::ProviderError> for SdkError {
    fn from(e: provider::ProviderError) -> Self {
        match e {
            provider::ProviderError::Superseded(device) => SdkError::Superseded { detail: device },
            provider::ProviderError::ShuttingDown => SdkError::ShuttingDown,
            // Configuration, SDK configuration, and anything added later: unusable settings.
            other => SdkError::InvalidConfig {
                detail: other.to_string(),
            },
        }
    }
}
