//! The ringing calls: which invite each callee holds, so a cancel reaches exactly the phones
//! that may be ringing. Pure: the hub's driver locks it (after the device's lock, never before).

use std::collections::HashMap;

use prost::Message as _;
use push_proto::device::{CallCancel, CancelReason, Push, push};

use super::device::{CalleeNote, Item};
use crate::store::{PushKind, StoredPush};

/// How long a finished call is remembered (a late cancel then gets NOT_FOUND).
const CALL_MEMORY_MS: i64 = 60_000;

/// A ringing call.
#[derive(Debug, Clone)]
pub(super) struct Call {
    pub(super) deadline_ms: i64,
    uuid: String,
    /// Callee -> (invite seq, acknowledged).
    pub(super) callees: HashMap<String, (u64, bool)>,
}

impl Call {
    /// The cancel every callee that may have rung gets.
    pub(super) fn cancel_item(&self, call_id: &str, reason: CancelReason) -> Item {
        cancel_item(call_id, &self.uuid, self.deadline_ms, reason)
    }
}

/// The cancel of call `call_id`, living until its ring deadline.
pub(super) fn cancel_item(call_id: &str, uuid: &str, deadline_ms: i64, reason: CancelReason) -> Item {
    Item {
        id: format!("{call_id}#cancel"),
        kind: PushKind::CallCancel,
        collapse_key: String::new(),
        expires: deadline_ms,
        body: push::Body::CallCancel(CallCancel {
            call_id: call_id.into(),
            call_uuid: uuid.into(),
            reason: reason as i32,
        }),
    }
}

/// Calls by id.
#[derive(Debug, Default)]
pub(super) struct Calls {
    calls: HashMap<String, Call>,
}

impl Calls {
    /// Open a call; false if one with this id is still remembered.
    pub(super) fn open(&mut self, call_id: &str, deadline_ms: i64, uuid: &str) -> bool {
        if self.calls.contains_key(call_id) {
            return false;
        }
        self.calls.insert(
            call_id.into(),
            Call {
                deadline_ms,
                uuid: uuid.into(),
                callees: HashMap::new(),
            },
        );
        true
    }

    /// The invites were placed: record each callee's number, unless an ack recorded it first.
    pub(super) fn placed(&mut self, call_id: &str, seqs: &[(String, u64)]) {
        if let Some(call) = self.calls.get_mut(call_id) {
            for (device_id, seq) in seqs {
                call.callees.entry(device_id.clone()).or_insert((*seq, false));
            }
        }
    }

    /// Apply a device core's note about one of its invites.
    pub(super) fn note(&mut self, device_id: &str, note: CalleeNote) {
        if let Some(call) = self.calls.get_mut(&note.call_id) {
            let entry = call.callees.entry(device_id.into()).or_insert((note.seq, false));
            entry.0 = note.seq;
            entry.1 |= note.acked;
        }
    }

    /// Remove a call (placement failed, or it is being cancelled).
    pub(super) fn close(&mut self, call_id: &str) -> Option<Call> {
        self.calls.remove(call_id)
    }

    /// Forget calls whose deadline passed more than [`CALL_MEMORY_MS`] before `now`.
    pub(super) fn forget_finished(&mut self, now: i64) {
        self.calls.retain(|_, c| c.deadline_ms + CALL_MEMORY_MS > now);
    }

    /// Rebuild a call from a queued invite at start-up.
    pub(super) fn restore(&mut self, stored: &StoredPush) {
        if stored.kind != PushKind::CallInvite {
            return;
        }
        if let Ok(Push {
            body: Some(push::Body::CallInvite(invite)),
            ..
        }) = Push::decode(&stored.encoded[..])
        {
            self.calls
                .entry(stored.id.clone())
                .or_insert_with(|| Call {
                    deadline_ms: invite.ring_deadline_ms,
                    uuid: invite.call_uuid,
                    callees: HashMap::new(),
                })
                .callees
                .insert(stored.device_id.clone(), (stored.seq, false));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(call: &str, seq: u64, acked: bool) -> CalleeNote {
        CalleeNote {
            call_id: call.into(),
            seq,
            acked,
        }
    }

    #[test]
    fn an_ack_noted_before_placement_returns_is_kept_and_renumbering_follows_the_invite() {
        let mut calls = Calls::default();
        assert!(calls.open("c", 1_000, "uuid"));
        assert!(!calls.open("c", 2_000, "uuid"), "an id still ringing is refused");
        calls.note("d0", note("c", 5, true));
        calls.placed("c", &[("d0".into(), 5), ("d1".into(), 7)]);
        calls.note("d1", note("c", 9, false));
        let call = calls.close("c").expect("open");
        assert_eq!(
            call.callees["d0"],
            (5, true),
            "placement must not erase an earlier ack"
        );
        assert_eq!(call.callees["d1"], (9, false));
        assert!(calls.close("c").is_none());
    }

    #[test]
    fn finished_calls_are_remembered_for_a_minute_then_forgotten() {
        let mut calls = Calls::default();
        calls.open("c", 1_000, "uuid");
        calls.forget_finished(1_000 + CALL_MEMORY_MS - 1);
        assert!(calls.close("c").is_some());
        calls.open("c", 1_000, "uuid");
        calls.forget_finished(1_000 + CALL_MEMORY_MS);
        assert!(calls.close("c").is_none());
    }
}
