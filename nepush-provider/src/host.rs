//! What the provider asks of its host (the Swift `NEAppPushProvider` subclass, or the Linux
//! lifecycle host): report calls, show notifications, persist the floor and its epoch, delete
//! the call outcomes the server replied to.

use mobile_sdk::core::{
    CallCancelPush, CallInvitePush, CallOutcomeResult, CancelReason, LastSeen, MessagePush, OutcomeReply,
    Priority, State,
};
use plist::{Dictionary, Value};

/// Callbacks into the host. Called on the SDK's thread, one at a time per instance: return
/// quickly and never call back into the provider from inside. A push counts as taken by the app
/// (and is acknowledged to the server) when the callback returns.
pub trait ProviderHost: Send + Sync + 'static {
    /// `NEAppPushProvider.reportIncomingCall(userInfo:)`, for call invites and for
    /// cancellations (see [`user_info`] for the keys; `kind` tells which). Every value is a
    /// property-list value.
    fn report_incoming_call(&self, user_info: Dictionary);

    /// Show a text message as a local notification (`UNUserNotificationCenter`).
    fn show_notification(&self, notification: LocalNotification);

    /// Persist the floor and its epoch in app-group storage, as one value (never one half
    /// without the other: a floor under another store's epoch would acknowledge pushes the app
    /// never saw), and pass it back as `persisted` when the next instance is created, so a
    /// relaunched extension does not show pushes again. Called right after the push it covers
    /// was handed over, and when the server's store has a new epoch.
    fn persist_last_seen(&self, last_seen: LastSeen);

    /// The server replied to a call-outcome report: delete it from the app group's pending
    /// file ([`crate::outcomes`]), so it is not handed over again. Ending a call answered
    /// elsewhere is not this callback's: the provider reports that with
    /// [`Self::report_incoming_call`] (`kind` = `"end"`).
    fn call_outcome_replied(&self, reply: OutcomeReply);

    /// The connection state changed (diagnostics, UI). Default: ignored.
    fn state_changed(&self, state: &State) {
        let _ = state;
    }
}

/// A text message to show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalNotification {
    /// Message id: use it as the `UNNotificationRequest` identifier, so a replay replaces
    /// rather than duplicates.
    pub id: String,
    /// Per-device sequence number.
    pub seq: u64,
    /// Title.
    pub title: String,
    /// Body.
    pub body: String,
    /// Sender's display name (subtitle).
    pub sender: String,
    /// `threadIdentifier`: the collapse key, else empty (iOS groups by app).
    pub thread_id: String,
    /// `categoryIdentifier`: always [`MESSAGE_CATEGORY`].
    pub category: String,
    /// High priority: `interruptionLevel = .timeSensitive`.
    pub time_sensitive: bool,
    /// When the sender submitted it, Unix ms.
    pub sent_at_ms: i64,
    /// Opaque application data from the sender.
    pub data: Vec<u8>,
}

/// The notification category of messages.
pub const MESSAGE_CATEGORY: &str = "lpush.message";
/// The notification category of missed calls (the app may localise by it).
pub const MISSED_CALL_CATEGORY: &str = "lpush.missedCall";

/// What the provider remembers of an invite, to name the caller of a missed call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Display name.
    pub name: String,
    /// Handle.
    pub handle: String,
    /// When the call was created, Unix ms (server clock).
    pub created_at_ms: i64,
}

/// The local notification of a call nobody answered (a cancel with reason `MISSED`). Its id
/// is derived from the call id, so a replayed cancel replaces it. `caller` is the invite's, if
/// this instance saw it (a phone that was away did not: the notification still says a call
/// was missed).
pub fn missed_call_notification(cancel: &CallCancelPush, caller: Option<&Caller>) -> LocalNotification {
    LocalNotification {
        id: format!("missed-call:{}", cancel.call_id),
        seq: cancel.seq,
        title: "Missed call".into(),
        body: caller.map(|c| c.name.clone()).unwrap_or_default(),
        sender: caller.map(|c| c.handle.clone()).unwrap_or_default(),
        thread_id: MISSED_CALL_CATEGORY.into(),
        category: MISSED_CALL_CATEGORY.into(),
        time_sensitive: false,
        sent_at_ms: caller.map_or(0, |c| c.created_at_ms),
        data: Vec::new(),
    }
}

impl From<MessagePush> for LocalNotification {
    fn from(m: MessagePush) -> Self {
        Self {
            id: m.id,
            seq: m.seq,
            title: m.title,
            body: m.body,
            sender: m.sender,
            thread_id: m.collapse_key,
            category: MESSAGE_CATEGORY.into(),
            time_sensitive: m.priority == Priority::High,
            sent_at_ms: m.sent_at_ms,
            data: m.data,
        }
    }
}

/// The `userInfo` dictionary of `reportIncomingCall(userInfo:)`, which iOS hands unchanged to
/// the app's `appPushManager(_:didReceiveIncomingCallWithUserInfo:)`.
///
/// A call (`kind` = `"call"`): `callId`, `callUUID` (the CallKit UUID, identical on the APNs
/// path), `callerName`, `callerHandle`, `video` (bool), `ringDeadlineMs` (Unix ms, server clock),
/// `ringRemainingMs` (how long it may still ring, measured on the server's clock: use this
/// rather than the phone's clock), `seq`.
///
/// A cancellation (`kind` = `"cancel"`): `callId`, `callUUID`, `reason` (`callerCancelled`,
/// `answeredElsewhere`, `declinedElsewhere`, `missed` (nobody answered by the ring deadline:
/// the provider also shows a missed-call notification), `escalated` (the call moved to its
/// next escalation step: end it quietly) or `unspecified`), `seq`. The app ends the call;
/// if it never saw the invite it must still report and end it at once (iOS requires a report).
///
/// An end (`kind` = `"end"`): `callId`, `callUUID`, `reason` (`answeredElsewhere` or
/// `callEnded`), `detail`. The server refused this phone's answer: another phone answered
/// first, or the call had already ended. The app ends the CallKit call
/// (`.answeredElsewhere` / `.remoteEnded`).
pub mod user_info {
    /// `"call"` or `"cancel"`.
    pub const KIND: &str = "kind";
    /// Sender's call id.
    pub const CALL_ID: &str = "callId";
    /// CallKit UUID.
    pub const CALL_UUID: &str = "callUUID";
    /// Caller display name.
    pub const CALLER_NAME: &str = "callerName";
    /// Caller handle.
    pub const CALLER_HANDLE: &str = "callerHandle";
    /// Video call (bool).
    pub const VIDEO: &str = "video";
    /// Ring deadline, Unix ms, server clock (integer).
    pub const RING_DEADLINE_MS: &str = "ringDeadlineMs";
    /// Ring time left when handed over, ms (integer).
    pub const RING_REMAINING_MS: &str = "ringRemainingMs";
    /// Per-device sequence (integer).
    pub const SEQ: &str = "seq";
    /// Why a call was cancelled.
    pub const REASON: &str = "reason";
    /// [`KIND`] of an invite.
    pub const KIND_CALL: &str = "call";
    /// [`KIND`] of a cancellation.
    pub const KIND_CANCEL: &str = "cancel";
    /// [`KIND`] of an end: the server refused this phone's answer.
    pub const KIND_END: &str = "end";
    /// Why the server refused an answer, for people (an end's).
    pub const DETAIL: &str = "detail";
}

/// The `userInfo` of a call invite.
pub fn call_user_info(c: &CallInvitePush) -> Dictionary {
    let remaining = u64::try_from(c.ring_remaining.as_millis()).unwrap_or(u64::MAX);
    let mut d = Dictionary::new();
    d.insert(user_info::KIND.into(), Value::String(user_info::KIND_CALL.into()));
    d.insert(user_info::CALL_ID.into(), Value::String(c.call_id.clone()));
    d.insert(user_info::CALL_UUID.into(), Value::String(c.call_uuid.clone()));
    d.insert(
        user_info::CALLER_NAME.into(),
        Value::String(c.caller_name.clone()),
    );
    d.insert(
        user_info::CALLER_HANDLE.into(),
        Value::String(c.caller_handle.clone()),
    );
    d.insert(user_info::VIDEO.into(), Value::Boolean(c.video));
    d.insert(
        user_info::RING_DEADLINE_MS.into(),
        Value::Integer(c.ring_deadline_ms.into()),
    );
    d.insert(
        user_info::RING_REMAINING_MS.into(),
        Value::Integer(remaining.into()),
    );
    d.insert(user_info::SEQ.into(), Value::Integer(c.seq.into()));
    d
}

/// The `userInfo` of a call cancellation.
pub fn cancel_user_info(c: &CallCancelPush) -> Dictionary {
    let mut d = Dictionary::new();
    d.insert(
        user_info::KIND.into(),
        Value::String(user_info::KIND_CANCEL.into()),
    );
    d.insert(user_info::CALL_ID.into(), Value::String(c.call_id.clone()));
    d.insert(user_info::CALL_UUID.into(), Value::String(c.call_uuid.clone()));
    d.insert(
        user_info::REASON.into(),
        Value::String(cancel_reason_name(c.reason).into()),
    );
    d.insert(user_info::SEQ.into(), Value::Integer(c.seq.into()));
    d
}

/// The `userInfo` of an end, if the reply means the user's answered call must end: the server
/// refused the answer because another phone answered first or the call had already ended.
/// Other replies leave CallKit as it is (a decline, a miss or a hang-up already ended the call
/// on the phone; a recorded answer keeps it).
pub fn end_user_info(reply: &OutcomeReply) -> Option<Dictionary> {
    use mobile_sdk::core::CallOutcome;
    let reason = match (reply.outcome, reply.result) {
        (CallOutcome::Answered, CallOutcomeResult::AnsweredElsewhere) => "answeredElsewhere",
        (CallOutcome::Answered, CallOutcomeResult::CallEnded) => "callEnded",
        _ => return None,
    };
    let mut d = Dictionary::new();
    d.insert(user_info::KIND.into(), Value::String(user_info::KIND_END.into()));
    d.insert(user_info::CALL_ID.into(), Value::String(reply.call_id.clone()));
    d.insert(
        user_info::CALL_UUID.into(),
        Value::String(push_proto::call_uuid(&reply.call_id)),
    );
    d.insert(user_info::REASON.into(), Value::String(reason.into()));
    d.insert(user_info::DETAIL.into(), Value::String(reply.detail.clone()));
    Some(d)
}

/// The `reason` value of a cancellation.
pub fn cancel_reason_name(r: CancelReason) -> &'static str {
    match r {
        CancelReason::CallerCancelled => "callerCancelled",
        CancelReason::AnsweredElsewhere => "answeredElsewhere",
        CancelReason::DeclinedElsewhere => "declinedElsewhere",
        CancelReason::Missed => "missed",
        CancelReason::Escalated => "escalated",
        CancelReason::Unspecified => "unspecified",
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use mobile_sdk::core::CallOutcome;

    use super::*;

    fn invite() -> CallInvitePush {
        CallInvitePush {
            seq: 9,
            id: "p-9".into(),
            call_id: "call-1".into(),
            call_uuid: "5b1f0c1e-6a53-4c5e-9d0f-6c6f63616c70".into(),
            caller_name: "Dr. Okafor – Station Ünfall 🚑".into(),
            caller_handle: "ext 4411".into(),
            video: true,
            created_at_ms: 1_700_000_000_000,
            ring_deadline_ms: 1_700_000_030_000,
            ring_remaining: Duration::from_millis(29_500),
        }
    }

    fn xml_round_trip(d: &Dictionary) -> Dictionary {
        let mut xml = Vec::new();
        plist::to_writer_xml(&mut xml, d).unwrap();
        plist::Value::from_reader_xml(&xml[..])
            .unwrap()
            .into_dictionary()
            .unwrap()
    }

    #[test]
    fn call_dictionary_has_the_documented_keys_and_survives_plist_xml() {
        let d = call_user_info(&invite());
        let mut keys: Vec<&str> = d.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "callId",
                "callUUID",
                "callerHandle",
                "callerName",
                "kind",
                "ringDeadlineMs",
                "ringRemainingMs",
                "seq",
                "video"
            ]
        );
        let back = xml_round_trip(&d);
        assert_eq!(back, d);
        assert_eq!(back["kind"].as_string(), Some("call"));
        assert_eq!(
            back["callerName"].as_string(),
            Some("Dr. Okafor – Station Ünfall 🚑")
        );
        assert_eq!(back["video"].as_boolean(), Some(true));
        assert_eq!(
            back["ringDeadlineMs"].as_signed_integer(),
            Some(1_700_000_030_000)
        );
        assert_eq!(back["ringRemainingMs"].as_signed_integer(), Some(29_500));
        assert_eq!(back["seq"].as_signed_integer(), Some(9));
    }

    #[test]
    fn cancel_dictionary_survives_plist_xml() {
        let c = CallCancelPush {
            seq: 10,
            id: "p-10".into(),
            call_id: "call-1".into(),
            call_uuid: invite().call_uuid,
            reason: CancelReason::AnsweredElsewhere,
        };
        let d = cancel_user_info(&c);
        let back = xml_round_trip(&d);
        assert_eq!(back, d);
        assert_eq!(back["kind"].as_string(), Some("cancel"));
        assert_eq!(back["reason"].as_string(), Some("answeredElsewhere"));
        assert_eq!(back["callUUID"].as_string(), Some(c.call_uuid.as_str()));
    }

    fn reply(outcome: CallOutcome, result: CallOutcomeResult) -> OutcomeReply {
        OutcomeReply {
            call_id: "call-1".into(),
            outcome,
            result,
            detail: "answered by nurse-4b-02".into(),
        }
    }

    #[test]
    fn only_a_refused_answer_ends_the_call() {
        let d = end_user_info(&reply(
            CallOutcome::Answered,
            CallOutcomeResult::AnsweredElsewhere,
        ))
        .unwrap();
        let back = xml_round_trip(&d);
        assert_eq!(back, d);
        assert_eq!(back["kind"].as_string(), Some("end"));
        assert_eq!(back["reason"].as_string(), Some("answeredElsewhere"));
        assert_eq!(back["detail"].as_string(), Some("answered by nurse-4b-02"));
        assert_eq!(
            back["callUUID"].as_string(),
            Some(push_proto::call_uuid("call-1").as_str()),
            "the UUID CallKit knows the call by"
        );
        let ended = end_user_info(&reply(CallOutcome::Answered, CallOutcomeResult::CallEnded)).unwrap();
        assert_eq!(ended["reason"].as_string(), Some("callEnded"));
        for (outcome, result) in [
            (CallOutcome::Answered, CallOutcomeResult::Recorded),
            (CallOutcome::Answered, CallOutcomeResult::UnknownCall),
            (CallOutcome::Answered, CallOutcomeResult::Unspecified),
            (CallOutcome::Declined, CallOutcomeResult::CallEnded),
            (CallOutcome::Missed, CallOutcomeResult::AnsweredElsewhere),
            (CallOutcome::Ended, CallOutcomeResult::CallEnded),
        ] {
            assert_eq!(
                end_user_info(&reply(outcome, result)),
                None,
                "{outcome:?} {result:?}"
            );
        }
    }

    #[test]
    fn a_missed_call_names_its_caller_when_the_invite_was_seen() {
        let cancel = CallCancelPush {
            seq: 11,
            id: "p-11".into(),
            call_id: "call-1".into(),
            call_uuid: invite().call_uuid,
            reason: CancelReason::Missed,
        };
        let caller = Caller {
            name: "Dr. Okafor".into(),
            handle: "ext 4411".into(),
            created_at_ms: 5,
        };
        let n = missed_call_notification(&cancel, Some(&caller));
        assert_eq!(
            (
                n.id.as_str(),
                n.title.as_str(),
                n.body.as_str(),
                n.sender.as_str()
            ),
            ("missed-call:call-1", "Missed call", "Dr. Okafor", "ext 4411")
        );
        assert_eq!(
            (n.category.as_str(), n.seq, n.sent_at_ms),
            (MISSED_CALL_CATEGORY, 11, 5)
        );
        let unseen = missed_call_notification(&cancel, None);
        assert_eq!((unseen.id, unseen.body), (n.id, String::new()));
    }

    #[test]
    fn notification_from_message() {
        let n = LocalNotification::from(MessagePush {
            seq: 3,
            id: "m-3".into(),
            title: "Bed 12".into(),
            body: "SpO2 88 %".into(),
            data: vec![1, 2],
            priority: Priority::High,
            collapse_key: "bed-12".into(),
            sent_at_ms: 5,
            expires_at_ms: 0,
            sender: "Monitor".into(),
        });
        assert!(n.time_sensitive);
        assert_eq!(
            (n.id.as_str(), n.thread_id.as_str(), n.category.as_str()),
            ("m-3", "bed-12", MESSAGE_CATEGORY)
        );
    }
}
