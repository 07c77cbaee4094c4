//! The clinical call as a pure state machine: who rings, each escalation step, each callee's
//! outcome, and how the call ends. Decisions in (a placement, a phone's report, a cancel, the
//! time), [`CallFx`] out; the hub's driver carries the effects out on the callees' device cores.
//!
//! Every decision first catches up with the time (`catch_up`: steps due, then the ring deadline),
//! so an answer, a cancel, a step and the deadline falling on the same instant resolve to one
//! outcome, decided here: the deadline wins at `now >= deadline`, a step due at `now` starts
//! before a report at `now` is judged, and after the call ended every report gets the end's
//! answer. The call ends once: answered (first answer wins, every other callee is stopped with
//! `ANSWERED_ELSEWHERE`), declined (no callee left and no step left), missed (the deadline), or
//! cancelled (the caller). A callee noted after the end (an invite placed while a cancel raced
//! the placement) is stopped at once.

use std::collections::{BTreeMap, HashMap};

use prost::Message as _;
use push_proto::device::{CallInvite, CallOutcome, CallOutcomeResult, CancelReason, Push, push};

use super::device::Item;
use crate::store::{
    CallEnd, CallRecord, CallStepRecord, CalleeRecord, PushKind, Receipt, ReceiptState, StoredPush,
};

/// How long a finished call is remembered (status reads, a late report, the dashboard).
pub(super) const CALL_MEMORY_MS: i64 = 15 * 60_000;

/// Why a callee's ring stops when the call decides it (not the callee itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Stop {
    /// What the callee's phone is told, if the invite may have rung it.
    pub(super) reason: CancelReason,
    /// The receipt's reason.
    pub(super) detail: String,
}

/// What the driver must do after a call decision, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum CallFx {
    /// Queue the invite for `device_id`, rung by step `step`; report what became of it with
    /// [`CallCore::placed`].
    Ring { device_id: String, step: u32 },
    /// Stop `device_id` ringing: withdraw its invite, and send a cancel if it may have rung.
    /// A `Missed` stop reports MISSED for a phone that rang and EXPIRED for one never reached;
    /// the others report CANCELLED.
    Stop { device_id: String, stop: Stop },
    /// The callee decided (answered, declined, rang out): withdraw its invite quietly and
    /// report `state`.
    Settle {
        device_id: String,
        state: ReceiptState,
        detail: String,
    },
}

/// What a device core tells the call about one of its invites.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct CalleeNote {
    pub(super) call_id: String,
    pub(super) seq: u64,
    /// The device acknowledged the invite (it rang).
    pub(super) acked: bool,
    /// The invite left the outbox with this final state on the device's side (expired,
    /// undeliverable): the callee can no longer ring.
    pub(super) gone: Option<ReceiptState>,
}

/// A phone's report, decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Reply {
    pub(super) result: CallOutcomeResult,
    pub(super) detail: String,
}

/// One call.
#[derive(Debug, Clone)]
pub(super) struct CallCore {
    rec: CallRecord,
    invite: CallInvite,
}

impl CallCore {
    /// A call placed at `now`: step 0 rings `first` now, each later step at its time.
    pub(super) fn new(
        invite: CallInvite,
        now: i64,
        first: Vec<String>,
        later: Vec<(i64, bool, Vec<String>)>,
    ) -> Self {
        let mut steps = vec![CallStepRecord {
            due_ms: now,
            stop_earlier: false,
            device_ids: first.clone(),
            started_ms: now,
        }];
        steps.extend(
            later
                .into_iter()
                .map(|(due_ms, stop_earlier, device_ids)| CallStepRecord {
                    due_ms,
                    stop_earlier,
                    device_ids,
                    started_ms: 0,
                }),
        );
        let callees = first
            .into_iter()
            .map(|device_id| CalleeRecord {
                device_id,
                step: 0,
                seq: 0,
                placed: false,
                rang: false,
                outcome: None,
            })
            .collect();
        Self {
            rec: CallRecord {
                call_id: invite.call_id.clone(),
                invite: invite.encode_to_vec(),
                placed_at_ms: now,
                deadline_ms: invite.ring_deadline_ms,
                steps,
                callees,
                end: None,
                hung_up_at_ms: 0,
            },
            invite,
        }
    }

    /// A call read back from the store; `None` if its invite does not decode.
    pub(super) fn from_record(rec: CallRecord) -> Option<Self> {
        let invite = CallInvite::decode(&rec.invite[..]).ok()?;
        Some(Self { rec, invite })
    }

    /// What is stored.
    pub(super) fn record(&self) -> &CallRecord {
        &self.rec
    }

    /// The invite each callee is queued.
    pub(super) fn invite_item(&self) -> Item {
        Item::new(
            self.rec.call_id.clone(),
            PushKind::CallInvite,
            String::new(),
            self.rec.deadline_ms,
            push::Body::CallInvite(self.invite.clone()),
        )
    }

    /// The cancel a stopped callee's phone gets. A missed call's lives `missed_ttl_ms` past the
    /// deadline, so a phone that was away still shows the missed call when it is back.
    pub(super) fn cancel_item(&self, reason: CancelReason, missed_ttl_ms: i64) -> Item {
        let expires = match reason {
            CancelReason::Missed => self.rec.deadline_ms + missed_ttl_ms,
            _ => self.rec.deadline_ms,
        };
        super::device::cancel_item(&self.rec.call_id, &self.invite.call_uuid, expires, reason)
    }

    /// Whether it ended.
    pub(super) fn is_over(&self) -> bool {
        self.rec.end.is_some()
    }

    /// When [`CallCore::due`] must run next: the next step or the deadline; `None` once over.
    pub(super) fn next_due(&self) -> Option<i64> {
        if self.is_over() {
            return None;
        }
        let step = self.next_step().map(|k| self.rec.steps[k].due_ms);
        Some(step.map_or(self.rec.deadline_ms, |s| s.min(self.rec.deadline_ms)))
    }

    /// When a finished call may be forgotten.
    pub(super) fn forget_at(&self) -> Option<i64> {
        self.rec
            .end
            .as_ref()
            .map(|e| e.at_ms().max(self.rec.deadline_ms) + CALL_MEMORY_MS)
    }

    /// The time passed: start due steps, end the call at its deadline.
    pub(super) fn due(&mut self, now: i64) -> Vec<CallFx> {
        let mut fx = Vec::new();
        self.catch_up(&mut fx, now);
        fx
    }

    /// The placement of the invites of `device_ids` came back: each got `seq` (queued) or
    /// `None` (refused: the device's own receipt says why).
    pub(super) fn placed(&mut self, now: i64, placed: &[(String, Option<u64>)]) -> Vec<CallFx> {
        let mut fx = Vec::new();
        for (device_id, seq) in placed {
            let Some(callee) = self.callee_mut(device_id) else {
                continue;
            };
            callee.placed = true;
            match seq {
                Some(seq) => callee.seq = *seq,
                None if callee.outcome.is_none() => callee.outcome = Some((ReceiptState::Undeliverable, now)),
                None => {}
            }
        }
        self.stop_if_over(&mut fx);
        self.after_a_callee_finished(&mut fx, now);
        fx
    }

    /// A device core's note about its invite.
    pub(super) fn note(&mut self, device_id: &str, note: &CalleeNote, now: i64) -> Vec<CallFx> {
        let mut fx = Vec::new();
        let Some(callee) = self.callee_mut(device_id) else {
            return fx;
        };
        if callee.seq < note.seq {
            callee.seq = note.seq;
        }
        callee.placed = true;
        callee.rang |= note.acked;
        if let Some(state) = note.gone
            && callee.outcome.is_none()
        {
            callee.outcome = Some((state, now));
        }
        self.stop_if_over(&mut fx);
        self.after_a_callee_finished(&mut fx, now);
        fx
    }

    /// The caller cancels. Returns whether it was still ringing, and what to carry out either
    /// way (a deadline that passed unnoticed is applied first).
    pub(super) fn cancel(&mut self, now: i64, reason: CancelReason) -> (bool, Vec<CallFx>) {
        let mut fx = Vec::new();
        self.catch_up(&mut fx, now);
        if self.is_over() {
            return (false, fx);
        }
        self.rec.end = Some(CallEnd::Cancelled { at_ms: now });
        let detail = match reason {
            CancelReason::AnsweredElsewhere => "answered elsewhere (told by the caller)",
            CancelReason::DeclinedElsewhere => "declined elsewhere (told by the caller)",
            _ => "call cancelled",
        };
        self.stop_live(&mut fx, reason, detail);
        (true, fx)
    }

    /// A phone reports what its user did.
    pub(super) fn report(&mut self, device_id: &str, outcome: CallOutcome, now: i64) -> (Reply, Vec<CallFx>) {
        let mut fx = Vec::new();
        self.catch_up(&mut fx, now);
        let reply = self.decide(&mut fx, device_id, outcome, now);
        (reply, fx)
    }

    fn decide(&mut self, fx: &mut Vec<CallFx>, device_id: &str, outcome: CallOutcome, now: i64) -> Reply {
        let reply = |result, detail: &str| Reply {
            result,
            detail: detail.into(),
        };
        let Some(callee) = self.callee(device_id) else {
            return reply(
                CallOutcomeResult::UnknownCall,
                "this call did not ring this device",
            );
        };
        let own = callee.outcome.map(|(s, _)| s);
        let answered_by = match &self.rec.end {
            Some(CallEnd::Answered { device_id, .. }) => Some(device_id.clone()),
            _ => None,
        };
        // The same report again (its reply was lost): the same answer.
        match (outcome, own) {
            (CallOutcome::Answered, Some(ReceiptState::Answered))
            | (CallOutcome::Declined, Some(ReceiptState::Declined))
            | (CallOutcome::Missed, Some(ReceiptState::Missed)) => {
                return reply(CallOutcomeResult::Recorded, "already recorded");
            }
            (CallOutcome::Ended, Some(ReceiptState::Answered)) => {
                if self.rec.hung_up_at_ms == 0 {
                    self.rec.hung_up_at_ms = now;
                }
                return reply(CallOutcomeResult::Recorded, "call ended");
            }
            _ => {}
        }
        if let Some(winner) = answered_by {
            return reply(
                CallOutcomeResult::AnsweredElsewhere,
                &format!("answered on {winner}"),
            );
        }
        if self.is_over() || own.is_some() {
            return reply(
                CallOutcomeResult::CallEnded,
                "the call no longer rings this device",
            );
        }
        match outcome {
            CallOutcome::Answered => {
                self.rec.end = Some(CallEnd::Answered {
                    device_id: device_id.into(),
                    at_ms: now,
                });
                self.settle(fx, device_id, ReceiptState::Answered, "answered", now);
                self.stop_live(
                    fx,
                    CancelReason::AnsweredElsewhere,
                    &format!("answered on {device_id}"),
                );
                reply(CallOutcomeResult::Recorded, "answered: the call is yours")
            }
            CallOutcome::Declined | CallOutcome::Ended => {
                self.settle(fx, device_id, ReceiptState::Declined, "declined", now);
                self.after_a_callee_finished(fx, now);
                reply(CallOutcomeResult::Recorded, "declined")
            }
            CallOutcome::Missed | CallOutcome::Unspecified => {
                self.settle(fx, device_id, ReceiptState::Missed, "rang out on the phone", now);
                self.after_a_callee_finished(fx, now);
                reply(CallOutcomeResult::Recorded, "missed")
            }
        }
    }

    /// Start what is due by `now`, in time order, then end the call if its deadline passed.
    fn catch_up(&mut self, fx: &mut Vec<CallFx>, now: i64) {
        while !self.is_over() {
            match self.next_step() {
                // Past the deadline a step is never rung late: the call ends missed instead.
                Some(k) if self.rec.steps[k].due_ms <= now && now < self.rec.deadline_ms => {
                    self.start_step(fx, k, now)
                }
                _ => break,
            }
        }
        if !self.is_over() && now >= self.rec.deadline_ms {
            self.rec.end = Some(CallEnd::Missed {
                at_ms: self.rec.deadline_ms,
            });
            self.stop_live(fx, CancelReason::Missed, "nobody answered by the ring deadline");
        }
    }

    fn start_step(&mut self, fx: &mut Vec<CallFx>, k: usize, now: i64) {
        self.rec.steps[k].started_ms = now;
        if self.rec.steps[k].stop_earlier {
            self.stop_live(fx, CancelReason::Escalated, &format!("escalated to step {k}"));
        }
        for device_id in self.rec.steps[k].device_ids.clone() {
            if self.callee(&device_id).is_some() {
                continue;
            }
            self.rec.callees.push(CalleeRecord {
                device_id: device_id.clone(),
                step: k as u32,
                seq: 0,
                placed: false,
                rang: false,
                outcome: None,
            });
            fx.push(CallFx::Ring {
                device_id,
                step: k as u32,
            });
        }
    }

    /// Nobody is left ringing: the next step starts now, or the call ends.
    fn after_a_callee_finished(&mut self, fx: &mut Vec<CallFx>, now: i64) {
        while !self.is_over() && self.rec.callees.iter().all(|c| c.outcome.is_some()) {
            match self.next_step() {
                Some(k) if now < self.rec.deadline_ms => self.start_step(fx, k, now),
                _ => {
                    let declined = self
                        .rec
                        .callees
                        .iter()
                        .any(|c| matches!(c.outcome, Some((ReceiptState::Declined, _))));
                    self.rec.end = Some(if declined {
                        CallEnd::Declined { at_ms: now }
                    } else {
                        CallEnd::Missed { at_ms: now }
                    });
                }
            }
        }
    }

    /// After the end, a callee still live (noted or placed late) stops at once.
    fn stop_if_over(&mut self, fx: &mut Vec<CallFx>) {
        let stop = match &self.rec.end {
            None => return,
            Some(CallEnd::Answered { device_id, .. }) => (
                CancelReason::AnsweredElsewhere,
                format!("answered on {device_id}"),
            ),
            Some(CallEnd::Missed { .. }) => (
                CancelReason::Missed,
                "nobody answered by the ring deadline".into(),
            ),
            Some(CallEnd::Declined { .. }) => (CancelReason::DeclinedElsewhere, "declined".into()),
            Some(CallEnd::Cancelled { .. }) => (CancelReason::CallerCancelled, "call cancelled".into()),
        };
        self.stop_live(fx, stop.0, &stop.1);
    }

    /// Stop every callee that may still ring. One whose placement has not come back yet is
    /// stopped when it does (`placed` then finds the call over): a stop now could reach its
    /// phone before the invite it stops.
    fn stop_live(&mut self, fx: &mut Vec<CallFx>, reason: CancelReason, detail: &str) {
        let at = self.rec.end.as_ref().map_or(0, CallEnd::at_ms);
        for callee in self
            .rec
            .callees
            .iter_mut()
            .filter(|c| c.outcome.is_none() && c.placed)
        {
            // The state is the device core's to report (MISSED or EXPIRED for a deadline).
            let state = match reason {
                CancelReason::Missed if callee.rang => ReceiptState::Missed,
                CancelReason::Missed => ReceiptState::Expired,
                _ => ReceiptState::Cancelled,
            };
            callee.outcome = Some((state, at));
            fx.push(CallFx::Stop {
                device_id: callee.device_id.clone(),
                stop: Stop {
                    reason,
                    detail: detail.into(),
                },
            });
        }
    }

    fn settle(&mut self, fx: &mut Vec<CallFx>, device_id: &str, state: ReceiptState, detail: &str, now: i64) {
        if let Some(callee) = self.callee_mut(device_id) {
            callee.outcome = Some((state, now));
        }
        fx.push(CallFx::Settle {
            device_id: device_id.into(),
            state,
            detail: detail.into(),
        });
    }

    fn next_step(&self) -> Option<usize> {
        self.rec.steps.iter().position(|s| s.started_ms == 0)
    }

    fn callee(&self, device_id: &str) -> Option<&CalleeRecord> {
        self.rec.callees.iter().find(|c| c.device_id == device_id)
    }

    fn callee_mut(&mut self, device_id: &str) -> Option<&mut CalleeRecord> {
        self.rec.callees.iter_mut().find(|c| c.device_id == device_id)
    }
}

/// The calls this node decides, by id.
#[derive(Debug, Default)]
pub(super) struct Calls {
    calls: HashMap<String, CallCore>,
    /// The latest receipt of each callee, with its number (`durable.rs`), of the calls placed
    /// by this process: their watchers are answered from here. A call restored from the store
    /// has none (its earlier receipts are only in the store).
    heard: HashMap<String, BTreeMap<String, (Receipt, u64)>>,
}

impl Calls {
    /// Keep call `call_id`'s receipts from now on (it was just placed: none came before).
    pub(super) fn hear(&mut self, call_id: &str) {
        if self.calls.contains_key(call_id) {
            self.heard.insert(call_id.into(), BTreeMap::new());
        }
    }

    /// A receipt of a call was announced as number `n`.
    pub(super) fn heard(&mut self, r: &Receipt, n: u64) {
        if let Some(callees) = self.heard.get_mut(&r.id) {
            callees.insert(r.device_id.clone(), (r.clone(), n));
        }
    }

    /// The latest receipt of each callee of call `call_id`, by device id, and the highest number
    /// among them; `None` if its receipts are not kept here.
    pub(super) fn receipts(&self, call_id: &str) -> Option<(Vec<Receipt>, u64)> {
        let callees = self.heard.get(call_id)?;
        let last = callees.values().map(|(_, n)| *n).max().unwrap_or(0);
        Some((callees.values().map(|(r, _)| r.clone()).collect(), last))
    }

    /// Open a call; false if one with this id is still remembered.
    pub(super) fn open(&mut self, call: CallCore) -> bool {
        if self.calls.contains_key(&call.rec.call_id) {
            return false;
        }
        self.calls.insert(call.rec.call_id.clone(), call);
        true
    }

    /// The call `call_id`.
    pub(super) fn get(&self, call_id: &str) -> Option<&CallCore> {
        self.calls.get(call_id)
    }

    /// The call `call_id`, to decide.
    pub(super) fn get_mut(&mut self, call_id: &str) -> Option<&mut CallCore> {
        self.calls.get_mut(call_id)
    }

    /// Remove a call (its placement failed).
    pub(super) fn close(&mut self, call_id: &str) -> Option<CallCore> {
        self.heard.remove(call_id);
        self.calls.remove(call_id)
    }

    /// Forget finished calls past their memory; returns their ids (to delete them from the store).
    pub(super) fn forget_finished(&mut self, now: i64) -> Vec<String> {
        let gone: Vec<String> = self
            .calls
            .iter()
            .filter(|(_, c)| c.forget_at().is_some_and(|at| at <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for id in &gone {
            self.calls.remove(id);
            self.heard.remove(id);
        }
        gone
    }

    /// A queued invite loaded at start-up: its callee was placed with that number (`PlaceCall`
    /// returns before the record saying so is durable: the invite is what proves it). One from
    /// a store written before calls were stored: its call rings on with that callee, until its
    /// deadline.
    pub(super) fn restore_invite(&mut self, stored: &StoredPush) {
        if stored.kind != PushKind::CallInvite {
            return;
        }
        let Ok(Push {
            body: Some(push::Body::CallInvite(invite)),
            ..
        }) = Push::decode(&stored.encoded[..])
        else {
            return;
        };
        let call = self
            .calls
            .entry(stored.id.clone())
            .or_insert_with(|| CallCore::new(invite.clone(), invite.created_at_ms, Vec::new(), Vec::new()));
        if let Some(callee) = call.callee_mut(&stored.device_id) {
            if !callee.placed {
                callee.placed = true;
                callee.seq = stored.seq;
            }
        } else {
            call.rec.callees.push(CalleeRecord {
                device_id: stored.device_id.clone(),
                step: 0,
                seq: stored.seq,
                placed: true,
                rang: false,
                outcome: None,
            });
        }
    }

    /// Every call, most recent first (the dashboard).
    pub(super) fn recent(&self, max: usize) -> Vec<CallRecord> {
        let mut all: Vec<&CallCore> = self.calls.values().collect();
        all.sort_by_key(|c| std::cmp::Reverse(c.rec.placed_at_ms));
        all.into_iter().take(max).map(|c| c.rec.clone()).collect()
    }
}

#[cfg(test)]
mod tests;
