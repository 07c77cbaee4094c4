//! What the session tells the app: pushes, connection states, the floor to persist.

use std::time::Duration;

use push_proto::device::{CallOutcome, CallOutcomeResult, CancelReason, GoodbyeReason, Priority};

/// Something for the app.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The connection state changed.
    State(State),
    /// A text message to show.
    Message(MessagePush),
    /// A call to report to CallKit (its ring deadline has not passed).
    CallInvite(CallInvitePush),
    /// Stop ringing a call.
    CallCancel(CallCancelPush),
    /// The floor moved: the app took more, or the server's store has a new epoch. Persist both
    /// halves together (app-group storage) and pass them back at the next start, so a new
    /// provider instance does not show old pushes again.
    LastSeenSeq(LastSeen),
    /// The server answered a call-outcome report (`Session::handle_call_outcome`): the SDK
    /// forgot it, and the host may delete its durable copy. Acting on the result (ending a call
    /// answered elsewhere) is the host's.
    CallOutcomeReplied(OutcomeReply),
}

/// The server's answer to a report of what the user did with a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutcomeReply {
    /// The call id of the report.
    pub call_id: String,
    /// The outcome of the report.
    pub outcome: CallOutcome,
    /// What the server decided; `Unspecified` for a result this SDK does not know.
    pub result: CallOutcomeResult,
    /// Human-readable detail (for example who answered).
    pub detail: String,
}

/// The device's floor: the highest sequence with everything up to it taken by the app, and the
/// epoch of the server store that numbered it (`ServerHello.epoch`). The server counts the
/// floor as an acknowledgement only when the epoch is its own, so the two are persisted and
/// restored as one value: a floor with another store's epoch would acknowledge pushes the app
/// never saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LastSeen {
    /// The store's epoch; 0 if none yet (new install, or persisted by an SDK without epochs).
    pub epoch: u64,
    /// Highest sequence with everything up to it taken by the app; 0 if none.
    pub seq: u64,
}

impl Event {
    /// The sequence of a push event: report it with `handle_delivered` once the app took it.
    pub fn push_seq(&self) -> Option<u64> {
        match self {
            Event::Message(m) => Some(m.seq),
            Event::CallInvite(c) => Some(c.seq),
            Event::CallCancel(c) => Some(c.seq),
            Event::State(_) | Event::LastSeenSeq(_) | Event::CallOutcomeReplied(_) => None,
        }
    }
}

/// Connection state as the app sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Not started.
    Idle,
    /// Opening a connection (TCP, TLS, hello). `attempt` counts from 1 since the last success.
    Connecting {
        /// Attempts since the last established session.
        attempt: u32,
    },
    /// The server accepted the hello; pushes flow.
    Connected {
        /// The server's session id (diagnostics).
        session_id: String,
        /// The device id bound to the credential.
        device_id: String,
    },
    /// Disconnected; the next attempt is scheduled.
    WaitingToRetry {
        /// Delay before the next attempt.
        retry_in: Duration,
        /// Why the last connection or attempt ended.
        reason: Disconnect,
    },
    /// The network has not been viable for longer than the debounce: no attempts until it is
    /// viable again, a matching network is joined, or the host's timer fires.
    WaitingForNetwork,
    /// Stopped; no reconnection until started again.
    Stopped(StopCause),
}

/// Why a connection (or an attempt) ended. The session reconnects after each of these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disconnect {
    /// TCP or TLS could not be established.
    ConnectFailed(String),
    /// No `ServerHello` within the connect timeout.
    ConnectTimeout,
    /// The transport closed or failed.
    TransportClosed(String),
    /// Silence past the server's heartbeat interval plus timeout: the server is presumed dead.
    ServerSilent,
    /// The server said goodbye with a reason that allows reconnecting.
    ServerGoodbye(GoodbyeReason),
    /// The server broke the protocol.
    ProtocolError(String),
}

/// Why the session stopped for good (until started again).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopCause {
    /// The host stopped it.
    Host(StopReason),
    /// A newer session of this device took over on the server. Reconnecting would fight it.
    Replaced,
    /// The credential was revoked: the device must be enrolled again.
    CredentialRevoked,
    /// The credential was refused (invalid or expired): the device must be enrolled again.
    AuthFailed,
}

/// Why the host stops the session (mirrors the reasons iOS gives a provider, plus ours).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The host or the user asked for it.
    HostRequested,
    /// The system reports no matching network.
    NoNetwork,
    /// The system reports a network change the session cannot survive.
    NetworkChange,
    /// A newer instance for the same device started in this process.
    Superseded,
    /// Anything else.
    Other,
}

/// A stop as the host reports it: what the SDK makes of it, and the host's own name for it,
/// which the goodbye carries to the server (from an iOS provider: Apple's
/// `NEProviderStopReason` case name, such as `noNetworkAvailable`; empty from other hosts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostStop {
    /// What the SDK makes of it.
    pub reason: StopReason,
    /// The host's name for it (empty: none).
    pub provider_reason: &'static str,
}

impl From<StopReason> for HostStop {
    fn from(reason: StopReason) -> Self {
        Self {
            reason,
            provider_reason: "",
        }
    }
}

impl StopReason {
    /// Text for the goodbye's detail (logs on the server).
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::HostRequested => "host requested",
            StopReason::NoNetwork => "no network",
            StopReason::NetworkChange => "network change",
            StopReason::Superseded => "superseded by a newer instance",
            StopReason::Other => "stopped",
        }
    }
}

/// A text message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessagePush {
    /// Per-device sequence number.
    pub seq: u64,
    /// Message id (stable across replays).
    pub id: String,
    /// Title.
    pub title: String,
    /// Body.
    pub body: String,
    /// Opaque application data.
    pub data: Vec<u8>,
    /// Whether it may break through Focus.
    pub priority: Priority,
    /// Collapse key (empty if none).
    pub collapse_key: String,
    /// When the sender submitted it, Unix ms.
    pub sent_at_ms: i64,
    /// When it expires, Unix ms (0: never).
    pub expires_at_ms: i64,
    /// Display name of the sender.
    pub sender: String,
}

/// An incoming call that is still ringing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallInvitePush {
    /// Per-device sequence number.
    pub seq: u64,
    /// Push id.
    pub id: String,
    /// Call id.
    pub call_id: String,
    /// CallKit UUID (identical on the APNs path).
    pub call_uuid: String,
    /// Caller display name.
    pub caller_name: String,
    /// Caller handle.
    pub caller_handle: String,
    /// Video call.
    pub video: bool,
    /// Creation time, Unix ms (server clock).
    pub created_at_ms: i64,
    /// Ring deadline, Unix ms (server clock).
    pub ring_deadline_ms: i64,
    /// How long it may still ring, measured on the server's clock when the SDK handed it over;
    /// use this rather than comparing `ring_deadline_ms` with the device's own clock.
    pub ring_remaining: Duration,
}

/// A call to stop ringing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallCancelPush {
    /// Per-device sequence number.
    pub seq: u64,
    /// Push id.
    pub id: String,
    /// Call id.
    pub call_id: String,
    /// CallKit UUID.
    pub call_uuid: String,
    /// Why.
    pub reason: CancelReason,
}
