//! Records and enums crossing the FFI, mirrored from `mobile-sdk` through `From`, and the
//! callback trait the host implements.

use std::{sync::Arc, time::Duration};

use mobile_sdk::core;

/// What the provider configuration (`NEAppPushManager.providerConfiguration`) and the app
/// group hold.
#[derive(Debug, Clone, uniffi::Record)]
pub struct ProviderConfig {
    /// Server host name or IP.
    pub host: String,
    /// Server port.
    pub port: u16,
    /// Name to verify in the certificate, if not `host`.
    pub server_name: Option<String>,
    /// Device id the credential was issued for.
    pub device_id: String,
    /// Device credential.
    pub credential: String,
    /// PEM of the CA(s) to trust.
    pub ca_pem: Option<String>,
    /// SPKI pins (`sha256/<base64>`).
    pub pins: Vec<String>,
    /// The floor and its epoch, as persisted together (zeros the first time).
    pub last_seen: LastSeen,
    /// SSID at start, if known.
    pub ssid: Option<String>,
    /// PushKit (VoIP) token, hex, as persisted; `None` if not registered.
    pub voip_token: Option<String>,
}

impl From<ProviderConfig> for mobile_sdk::ClientConfig {
    fn from(c: ProviderConfig) -> Self {
        let trust = mobile_sdk::Trust {
            ca_pem: c.ca_pem,
            pins: c.pins,
        };
        let mut config = mobile_sdk::ClientConfig::new(c.host, c.port, c.device_id, c.credential, trust);
        config.server_name = c.server_name.unwrap_or_default();
        config.last_seen = c.last_seen.into();
        config.ssid = c.ssid.unwrap_or_default();
        config.voip_token = c.voip_token;
        config
    }
}

/// The floor (highest push sequence the app took) and the epoch of the server store that
/// numbered it. Persist and restore it as one value (one app-group key): a floor under another
/// store's epoch would acknowledge pushes the app never saw. An app group holding only a floor
/// (from an SDK without epochs) means epoch 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Record)]
pub struct LastSeen {
    /// `ServerHello` epoch of the store; 0 if none yet.
    pub epoch: u64,
    /// Highest push sequence the app took; 0 if none.
    pub seq: u64,
}

impl From<LastSeen> for core::LastSeen {
    fn from(l: LastSeen) -> Self {
        Self {
            epoch: l.epoch,
            seq: l.seq,
        }
    }
}

impl From<core::LastSeen> for LastSeen {
    fn from(l: core::LastSeen) -> Self {
        Self {
            epoch: l.epoch,
            seq: l.seq,
        }
    }
}

/// Receives the SDK's events, on an SDK thread. Return quickly; a push counts as taken by the
/// app (and is acknowledged) when the call returns.
#[uniffi::export(with_foreign)]
pub trait PushListener: Send + Sync {
    /// One event.
    fn on_event(&self, event: PushEvent);
}

struct Listener(Arc<dyn PushListener>);

impl mobile_sdk::EventHandler for Listener {
    fn on_event(&self, event: core::Event) {
        self.0.on_event(event.into())
    }
}

pub(crate) fn listener(l: Arc<dyn PushListener>) -> Arc<dyn mobile_sdk::EventHandler> {
    Arc::new(Listener(l))
}

/// Something for the app.
#[derive(Debug, Clone, uniffi::Enum)]
pub enum PushEvent {
    /// The connection state changed.
    State {
        /// The new state.
        state: ConnectionState,
    },
    /// A message to show as a local notification.
    Message {
        /// The message.
        message: Message,
    },
    /// A call to report (`reportIncomingCall(userInfo:)`).
    CallInvite {
        /// The call.
        invite: CallInvite,
    },
    /// Stop ringing a call.
    CallCancel {
        /// The call.
        cancel: CallCancel,
    },
    /// Persist this floor and epoch in the app group, as one value; pass it back as
    /// `last_seen`.
    LastSeenSeq {
        /// The floor and its epoch.
        last_seen: LastSeen,
    },
    /// The server replied to a `report_call_outcome`: delete the report from the app group.
    CallOutcomeReplied {
        /// The reply.
        reply: CallOutcomeReply,
    },
}

impl From<core::Event> for PushEvent {
    fn from(e: core::Event) -> Self {
        match e {
            core::Event::State(s) => PushEvent::State { state: s.into() },
            core::Event::Message(m) => PushEvent::Message { message: m.into() },
            core::Event::CallInvite(c) => PushEvent::CallInvite { invite: c.into() },
            core::Event::CallCancel(c) => PushEvent::CallCancel { cancel: c.into() },
            core::Event::LastSeenSeq(l) => PushEvent::LastSeenSeq { last_seen: l.into() },
            core::Event::CallOutcomeReplied(r) => PushEvent::CallOutcomeReplied { reply: r.into() },
        }
    }
}

/// Connection state.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Enum)]
pub enum ConnectionState {
    /// Not started.
    Idle,
    /// Connecting.
    Connecting {
        /// Attempt since the last established session.
        attempt: u32,
    },
    /// Connected; pushes flow.
    Connected {
        /// Server session id.
        session_id: String,
        /// Device id.
        device_id: String,
    },
    /// Disconnected; retrying after a delay.
    WaitingToRetry {
        /// Delay, milliseconds.
        retry_in_ms: u64,
        /// Why the last connection ended.
        reason: String,
    },
    /// No viable network; waiting for one.
    WaitingForNetwork,
    /// Stopped.
    Stopped {
        /// Why.
        cause: StopCause,
    },
}

impl From<core::State> for ConnectionState {
    fn from(s: core::State) -> Self {
        match s {
            core::State::Idle => ConnectionState::Idle,
            core::State::Connecting { attempt } => ConnectionState::Connecting { attempt },
            core::State::Connected {
                session_id,
                device_id,
            } => ConnectionState::Connected {
                session_id,
                device_id,
            },
            core::State::WaitingToRetry { retry_in, reason } => ConnectionState::WaitingToRetry {
                retry_in_ms: millis(retry_in),
                reason: format!("{reason:?}"),
            },
            core::State::WaitingForNetwork => ConnectionState::WaitingForNetwork,
            core::State::Stopped(cause) => ConnectionState::Stopped { cause: cause.into() },
        }
    }
}

/// Why the session stopped. The last three mean: do not restart until re-enrolled or told.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum StopCause {
    /// The host stopped it.
    Host {
        /// The reason the host gave.
        reason: StopReason,
    },
    /// A newer session of this device took over on the server.
    Replaced,
    /// The credential was revoked.
    CredentialRevoked,
    /// The credential was refused.
    AuthFailed,
}

impl From<core::StopCause> for StopCause {
    fn from(c: core::StopCause) -> Self {
        match c {
            core::StopCause::Host(reason) => StopCause::Host {
                reason: reason.into(),
            },
            core::StopCause::Replaced => StopCause::Replaced,
            core::StopCause::CredentialRevoked => StopCause::CredentialRevoked,
            core::StopCause::AuthFailed => StopCause::AuthFailed,
        }
    }
}

/// Why the host stops the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum StopReason {
    /// The host or user asked.
    HostRequested,
    /// No matching network.
    NoNetwork,
    /// A network change the session cannot survive.
    NetworkChange,
    /// A newer instance started.
    Superseded,
    /// Anything else.
    Other,
}

impl From<StopReason> for core::StopReason {
    fn from(r: StopReason) -> Self {
        match r {
            StopReason::HostRequested => core::StopReason::HostRequested,
            StopReason::NoNetwork => core::StopReason::NoNetwork,
            StopReason::NetworkChange => core::StopReason::NetworkChange,
            StopReason::Superseded => core::StopReason::Superseded,
            StopReason::Other => core::StopReason::Other,
        }
    }
}

impl From<core::StopReason> for StopReason {
    fn from(r: core::StopReason) -> Self {
        match r {
            core::StopReason::HostRequested => StopReason::HostRequested,
            core::StopReason::NoNetwork => StopReason::NoNetwork,
            core::StopReason::NetworkChange => StopReason::NetworkChange,
            core::StopReason::Superseded => StopReason::Superseded,
            core::StopReason::Other => StopReason::Other,
        }
    }
}

/// A network change.
#[derive(Debug, Clone, uniffi::Enum)]
pub enum NetworkChange {
    /// Joined a matching Wi-Fi network.
    Joined {
        /// Its SSID.
        ssid: String,
    },
    /// Left the matching network.
    Left,
    /// The path became viable.
    Viable,
    /// The path is no longer viable.
    NotViable,
}

impl From<NetworkChange> for core::NetworkEvent {
    fn from(c: NetworkChange) -> Self {
        match c {
            NetworkChange::Joined { ssid } => core::NetworkEvent::Joined { ssid },
            NetworkChange::Left => core::NetworkEvent::Left,
            NetworkChange::Viable => core::NetworkEvent::Viable,
            NetworkChange::NotViable => core::NetworkEvent::NotViable,
        }
    }
}

/// A text message.
#[derive(Debug, Clone, uniffi::Record)]
pub struct Message {
    /// Sequence.
    pub seq: u64,
    /// Message id.
    pub id: String,
    /// Title.
    pub title: String,
    /// Body.
    pub body: String,
    /// Opaque application data.
    pub data: Vec<u8>,
    /// Time-sensitive (may break through Focus).
    pub high_priority: bool,
    /// Collapse key (empty if none).
    pub collapse_key: String,
    /// Sent at, Unix ms.
    pub sent_at_ms: i64,
    /// Expires at, Unix ms (0: never).
    pub expires_at_ms: i64,
    /// Sender display name.
    pub sender: String,
}

impl From<core::MessagePush> for Message {
    fn from(m: core::MessagePush) -> Self {
        Self {
            seq: m.seq,
            id: m.id,
            title: m.title,
            body: m.body,
            data: m.data,
            high_priority: m.priority == core::Priority::High,
            collapse_key: m.collapse_key,
            sent_at_ms: m.sent_at_ms,
            expires_at_ms: m.expires_at_ms,
            sender: m.sender,
        }
    }
}

/// An incoming call, still ringing.
#[derive(Debug, Clone, uniffi::Record)]
pub struct CallInvite {
    /// Sequence.
    pub seq: u64,
    /// Call id.
    pub call_id: String,
    /// CallKit UUID.
    pub call_uuid: String,
    /// Caller display name.
    pub caller_name: String,
    /// Caller handle.
    pub caller_handle: String,
    /// Video call.
    pub video: bool,
    /// Ring deadline, Unix ms (server clock).
    pub ring_deadline_ms: i64,
    /// Milliseconds it may still ring (server clock, when handed over).
    pub ring_remaining_ms: u64,
}

impl From<core::CallInvitePush> for CallInvite {
    fn from(c: core::CallInvitePush) -> Self {
        Self {
            seq: c.seq,
            call_id: c.call_id,
            call_uuid: c.call_uuid,
            caller_name: c.caller_name,
            caller_handle: c.caller_handle,
            video: c.video,
            ring_deadline_ms: c.ring_deadline_ms,
            ring_remaining_ms: millis(c.ring_remaining),
        }
    }
}

/// What the user did with a ringing call (CallKit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum CallOutcome {
    /// `CXAnswerCallAction`.
    Answered,
    /// `CXEndCallAction` before answering.
    Declined,
    /// The ring timed out on the phone.
    Missed,
    /// `CXEndCallAction` after answering: the answered call hung up.
    Ended,
}

impl From<CallOutcome> for core::CallOutcome {
    fn from(o: CallOutcome) -> Self {
        match o {
            CallOutcome::Answered => core::CallOutcome::Answered,
            CallOutcome::Declined => core::CallOutcome::Declined,
            CallOutcome::Missed => core::CallOutcome::Missed,
            CallOutcome::Ended => core::CallOutcome::Ended,
        }
    }
}

impl From<core::CallOutcome> for CallOutcome {
    /// Reports and replies the SDK keeps are never unspecified (it refuses such reports, and
    /// a reply must name a pending report): mapped to `Missed` only to stay total.
    fn from(o: core::CallOutcome) -> Self {
        match o {
            core::CallOutcome::Answered => CallOutcome::Answered,
            core::CallOutcome::Declined => CallOutcome::Declined,
            core::CallOutcome::Ended => CallOutcome::Ended,
            core::CallOutcome::Missed | core::CallOutcome::Unspecified => CallOutcome::Missed,
        }
    }
}

/// What the server decided about a call-outcome report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum CallOutcomeResult {
    /// Recorded. For an answer: this phone answered first and has the call.
    Recorded,
    /// Another phone answered first: end the call in CallKit (`.answeredElsewhere`).
    AnsweredElsewhere,
    /// The call had already ended: end it in CallKit (`.remoteEnded`).
    CallEnded,
    /// No such call rang this phone (or it ended long ago): nothing to do.
    UnknownCall,
    /// A result this SDK does not know (a newer server): leave the call as it is.
    Unspecified,
}

impl From<core::CallOutcomeResult> for CallOutcomeResult {
    fn from(r: core::CallOutcomeResult) -> Self {
        match r {
            core::CallOutcomeResult::Recorded => CallOutcomeResult::Recorded,
            core::CallOutcomeResult::AnsweredElsewhere => CallOutcomeResult::AnsweredElsewhere,
            core::CallOutcomeResult::CallEnded => CallOutcomeResult::CallEnded,
            core::CallOutcomeResult::UnknownCall => CallOutcomeResult::UnknownCall,
            core::CallOutcomeResult::Unspecified => CallOutcomeResult::Unspecified,
        }
    }
}

/// A report of what the user did with a call, as the app group's pending file holds it.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct CallOutcomeReport {
    /// The sender's call id (`callId` of the call dictionary).
    pub call_id: String,
    /// What the user did.
    pub outcome: CallOutcome,
    /// When, by the phone's clock, Unix ms.
    pub at_ms: i64,
}

impl From<CallOutcomeReport> for core::OutcomeReport {
    fn from(r: CallOutcomeReport) -> Self {
        Self {
            call_id: r.call_id,
            outcome: r.outcome.into(),
            at_ms: r.at_ms,
        }
    }
}

impl From<core::OutcomeReport> for CallOutcomeReport {
    fn from(r: core::OutcomeReport) -> Self {
        Self {
            call_id: r.call_id,
            outcome: r.outcome.into(),
            at_ms: r.at_ms,
        }
    }
}

/// The server's answer to a call-outcome report.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct CallOutcomeReply {
    /// The report's call id.
    pub call_id: String,
    /// The report's outcome.
    pub outcome: CallOutcome,
    /// What the server decided.
    pub result: CallOutcomeResult,
    /// For people (for example who answered).
    pub detail: String,
}

impl From<core::OutcomeReply> for CallOutcomeReply {
    fn from(r: core::OutcomeReply) -> Self {
        Self {
            call_id: r.call_id,
            outcome: r.outcome.into(),
            result: r.result.into(),
            detail: r.detail,
        }
    }
}

/// A call to stop ringing.
#[derive(Debug, Clone, uniffi::Record)]
pub struct CallCancel {
    /// Sequence.
    pub seq: u64,
    /// Call id.
    pub call_id: String,
    /// CallKit UUID.
    pub call_uuid: String,
    /// Why, as the protocol names it: `CANCEL_REASON_CALLER_CANCELLED`, `_ANSWERED_ELSEWHERE`,
    /// `_DECLINED_ELSEWHERE`, `_MISSED` (nobody answered: show a missed call), `_ESCALATED` (the
    /// call moved on: end it quietly) or `_UNSPECIFIED`.
    pub reason: String,
}

impl From<core::CallCancelPush> for CallCancel {
    fn from(c: core::CallCancelPush) -> Self {
        Self {
            seq: c.seq,
            call_id: c.call_id,
            call_uuid: c.call_uuid,
            reason: c.reason.as_str_name().to_owned(),
        }
    }
}

/// Live resources of the process.
#[derive(Debug, Clone, Copy, uniffi::Record)]
pub struct Counters {
    /// Client objects alive.
    pub instances: u64,
    /// Session state machines alive.
    pub sessions: u64,
    /// SDK tasks not finished.
    pub tasks: u64,
    /// TCP sockets open.
    pub sockets: u64,
    /// Sessions accepted by the server.
    pub connected: u64,
}

impl From<mobile_sdk::Snapshot> for Counters {
    fn from(s: mobile_sdk::Snapshot) -> Self {
        Self {
            instances: s.instances as u64,
            sessions: s.sessions as u64,
            tasks: s.tasks as u64,
            sockets: s.sockets as u64,
            connected: s.connected as u64,
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
