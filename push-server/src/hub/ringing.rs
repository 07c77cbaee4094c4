//! The driver of the call cores (`calls.rs`): it takes a decision under the call table's lock,
//! stores the call and queues its next deadline, then carries the effects out on the callees'
//! device cores (each under its own lock, never while holding the table's: device locks come
//! first) and feeds back what became of each new invite.

use std::collections::VecDeque;

use push_proto::device::{CallOutcome, CallOutcomeReply, CallOutcomeReport, CallOutcomeResult, CancelReason};

use super::{
    Hub, Pending,
    calls::{CallCore, CallFx, CalleeNote},
    device::{Ctx, Effects, StopState},
    timers::{Timer, TimerChange},
};
use crate::store::{CallRecord, Op, StoreError};

impl Hub {
    /// A phone reports what its user did with a call. The reply is sent once the decision is
    /// durable, so a phone that forgets its report on the reply never loses it.
    pub async fn call_outcome(&self, device_id: &str, report: CallOutcomeReport) -> CallOutcomeReply {
        let outcome = CallOutcome::try_from(report.outcome).unwrap_or(CallOutcome::Unspecified);
        let reply = |result: CallOutcomeResult, detail: String| CallOutcomeReply {
            call_id: report.call_id.clone(),
            outcome: report.outcome,
            result: result as i32,
            detail,
        };
        let cx = self.ctx();
        let decided = self.decide_call(&report.call_id, |call| call.report(device_id, outcome, cx.now));
        let Some((decision, pending)) = decided else {
            return reply(
                CallOutcomeResult::UnknownCall,
                "no such call is ringing or remembered here".into(),
            );
        };
        let pending = self.carry_out(&report.call_id, cx, pending);
        if let Err(e) = self.settle(pending).await {
            tracing::warn!(call = %report.call_id, device = %device_id, error = %e, "call outcome not stored");
            // Not durable: the phone keeps its report and sends it again on its next session.
            return reply(CallOutcomeResult::Unspecified, format!("not stored: {e}"));
        }
        tracing::info!(call = %report.call_id, device = %device_id, outcome = ?outcome, result = ?decision.result, "call outcome");
        reply(decision.result, decision.detail)
    }

    /// Take a decision on call `call_id` under the table's lock, store the call and re-plan its
    /// timer. Returns the decision's value and the effects to carry out; `None` if unknown.
    fn decide_call<T>(
        &self,
        call_id: &str,
        decide: impl FnOnce(&mut CallCore) -> (T, Vec<CallFx>),
    ) -> Option<(T, (Vec<CallFx>, Pending))> {
        let mut calls = self.0.calls.lock();
        let call = calls.get_mut(call_id)?;
        let before = call.next_due();
        let (value, fx) = decide(call);
        let stored = self.store_call(call.record(), before, call.next_due());
        Some((value, (fx, stored)))
    }

    /// Store a call after a decision and move its timer from `before` to `after`.
    fn store_call(&self, record: &CallRecord, before: Option<i64>, after: Option<i64>) -> Pending {
        if before != after {
            let id = &record.call_id;
            let mut changes = Vec::new();
            if let Some(at) = before {
                changes.push(TimerChange::Remove(at, Timer::Call, id.clone(), 0));
            }
            if let Some(at) = after {
                changes.push(TimerChange::Add(at, Timer::Call, id.clone(), 0));
            }
            if self.0.timers.lock().apply(changes) {
                self.0.timers_changed.notify_one();
            }
        }
        self.submit(vec![Op::PutCall(record.clone())])
    }

    /// Carry out a call decision's effects; returns the stores to wait for.
    fn carry_out(&self, call_id: &str, cx: Ctx, decided: (Vec<CallFx>, Pending)) -> Vec<Pending> {
        self.carry_out_counting(call_id, cx, decided).0
    }

    /// [`Hub::carry_out`], also counting the cancels sent to phones that may have rung.
    fn carry_out_counting(
        &self,
        call_id: &str,
        cx: Ctx,
        (fx, stored): (Vec<CallFx>, Pending),
    ) -> (Vec<Pending>, u32) {
        let mut cancels = 0;
        let mut pending = vec![stored];
        let mut queue: VecDeque<CallFx> = fx.into();
        let mut rung = Vec::new();
        while let Some(effect) = queue.pop_front() {
            match effect {
                CallFx::Ring { device_id, .. } => {
                    let Some(item) = self.0.calls.lock().get(call_id).map(CallCore::invite_item) else {
                        continue;
                    };
                    let seq = self.enqueue_here(&device_id, &item, cx, &mut pending).ok();
                    rung.extend(seq.map(|seq| (device_id.clone(), seq)));
                    let placed = [(device_id, seq)];
                    if let Some(((), (more, stored))) =
                        self.decide_call(call_id, |call| ((), call.placed(cx.now, &placed)))
                    {
                        pending.push(stored);
                        queue.extend(more);
                    }
                }
                CallFx::Stop { device_id, stop } => {
                    let cancel = self.0.calls.lock().get(call_id).map(|c| {
                        let ttl = i64::from(self.limits().default_ttl_secs) * 1000;
                        c.cancel_item(stop.reason, ttl)
                    });
                    let state = match stop.reason {
                        CancelReason::Missed => StopState::RingOut,
                        _ => StopState::Is(crate::store::ReceiptState::Cancelled),
                    };
                    pending.extend(self.on_callee(&device_id, |core, fx| {
                        cancels += u32::from(core.stop_ringing(
                            fx,
                            cx,
                            call_id,
                            state,
                            &stop.detail,
                            cancel.as_ref(),
                        ));
                    }));
                }
                CallFx::Settle {
                    device_id,
                    state,
                    detail,
                } => {
                    pending.extend(self.on_callee(&device_id, |core, fx| {
                        core.stop_ringing(fx, cx, call_id, StopState::Is(state), &detail, None);
                    }));
                }
            }
        }
        self.plan_voip(&rung);
        (pending, cancels)
    }

    /// Run `f` on a callee's core held here, and apply its effects.
    fn on_callee(
        &self,
        device_id: &str,
        f: impl FnOnce(&mut super::device::DeviceCore, &mut Effects),
    ) -> Option<Pending> {
        let device = self.device(device_id)?;
        let slot = &mut *device.lock();
        let mut fx = Effects::default();
        f(&mut slot.core, &mut fx);
        Some(self.apply(slot, fx))
    }

    /// The first step's invites were placed (`None`: refused); returns the stores to wait for.
    pub(super) fn call_placed(
        &self,
        call_id: &str,
        cx: Ctx,
        placed: &[(String, Option<u64>)],
    ) -> Vec<Pending> {
        match self.decide_call(call_id, |call| ((), call.placed(cx.now, placed))) {
            Some(((), decided)) => self.carry_out(call_id, cx, decided),
            None => Vec::new(),
        }
    }

    /// A device core's notes about its invites (under that device's lock: the table's lock is
    /// taken after it). What the notes decide is carried out in a task of its own, which takes
    /// the device locks afresh.
    pub(super) fn note_callees(&self, device_id: &str, notes: Vec<CalleeNote>) {
        let now = self.now();
        for note in notes {
            let Some(decided) =
                self.decide_call(&note.call_id, |call| ((), call.note(device_id, &note, now)))
            else {
                continue;
            };
            let ((), (fx, stored)) = decided;
            if fx.is_empty() {
                self.release(stored);
                continue;
            }
            let (hub, call_id) = (self.clone(), note.call_id.clone());
            tokio::spawn(async move {
                let pending = hub.carry_out(&call_id, hub.ctx(), (fx, stored));
                if let Err(e) = hub.settle(pending).await {
                    tracing::warn!(call = %call_id, error = %e, "call effects not stored");
                }
            });
        }
    }

    /// A call's timer fired: start its due steps, or end it at its deadline.
    pub(super) fn call_due(&self, call_id: &str, cx: Ctx) {
        let Some(((), decided)) = self.decide_call(call_id, |call| ((), call.due(cx.now))) else {
            return;
        };
        for p in self.carry_out(call_id, cx, decided) {
            self.release(p);
        }
    }

    /// The caller cancels call `call_id` (decided by this node): `None` if it is unknown here
    /// or no longer ringing; else how many phones that may have rung are told to stop.
    pub(super) async fn cancel_decided_call(
        &self,
        call_id: &str,
        reason: CancelReason,
    ) -> Option<Result<u32, StoreError>> {
        let cx = self.ctx();
        let (ringing, (fx, stored)) = self.decide_call(call_id, |call| call.cancel(cx.now, reason))?;
        let (pending, cancels) = self.carry_out_counting(call_id, cx, (fx, stored));
        let stored = self.settle(pending).await;
        ringing.then_some(stored.map(|()| cancels))
    }

    /// The stored picture of call `call_id`, if this node decides it.
    pub fn call_record(&self, call_id: &str) -> Option<CallRecord> {
        self.0.calls.lock().get(call_id).map(|c| c.record().clone())
    }

    /// The calls this node remembers, most recent first.
    pub fn recent_calls(&self, max: usize) -> Vec<CallRecord> {
        self.0.calls.lock().recent(max)
    }

    /// Forget finished calls past their memory, here and in the store.
    pub(super) fn forget_calls(&self, now: i64) {
        let gone = self.0.calls.lock().forget_finished(now);
        if !gone.is_empty() {
            self.persist(
                gone.into_iter()
                    .map(|call_id| Op::DeleteCall { call_id })
                    .collect(),
            );
        }
    }
}
