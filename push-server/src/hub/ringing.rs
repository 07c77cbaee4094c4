//! The driver of the call cores (`calls.rs`). A decision is taken on the call's one copy:
//! embedded, the node's call table, under its lock (the call is then stored through the
//! store's ordered writer); in a cluster, the record in Redis, read, decided and written back
//! only if unchanged meanwhile (compare and set: two nodes deciding one call at once, say two
//! answers, cannot both win; the loser decides again on the winner's record). The effects are
//! then carried out on the callees' device cores, each under its own lock and never while
//! holding the table's (device locks come first), or, for a callee another node holds,
//! through its inbox; what became of each new invite is fed back as a new decision.

use push_proto::device::{CallOutcome, CallOutcomeReply, CallOutcomeReport, CallOutcomeResult, CancelReason};

use super::{
    Hub, Pending,
    calls::{CallCore, CallFx, CalleeNote},
    cluster::Routed,
    device::{Ctx, DeviceCore, Effects, StopState},
    timers::{Timer, TimerChange},
};
use crate::store::{CallRecord, Op, Receipt, ReceiptState, StoreError};

/// Most times a cluster decision is taken again after losing a race to another node.
const MAX_SWAPS: usize = 32;
/// Most calls one sweep decides.
const SWEEP_CALLS: usize = 64;

/// A decision's value, its effects, the call as decided (for the invite and cancel items) and
/// the stores to wait for.
type Decided<T> = (T, Vec<CallFx>, CallCore, Vec<Pending>);

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
        let decided = self
            .decide(&report.call_id, |call| call.report(device_id, outcome, cx.now))
            .await;
        let stored = match decided {
            Ok(None) => {
                return reply(
                    CallOutcomeResult::UnknownCall,
                    "no such call is ringing or remembered".into(),
                );
            }
            Ok(Some((decision, fx, call, pending))) => {
                let (more, _) = self.carry_out(&call, cx, fx).await;
                self.settle(pending.into_iter().chain(more).collect())
                    .await
                    .map(|()| decision)
            }
            Err(e) => Err(e),
        };
        match stored {
            Ok(decision) => {
                tracing::info!(call = %report.call_id, device = %device_id, outcome = ?outcome, result = ?decision.result, "call outcome");
                reply(decision.result, decision.detail)
            }
            Err(e) => {
                tracing::warn!(call = %report.call_id, device = %device_id, error = %e, "call outcome not stored");
                // Not durable: the phone keeps its report and sends it again on its next session.
                reply(CallOutcomeResult::Unspecified, format!("not stored: {e}"))
            }
        }
    }

    /// Open a new call: embedded in the table, in a cluster also in Redis (once per id).
    /// False if a call with this id exists.
    pub(super) async fn open_call(&self, call: CallCore) -> Result<bool, StoreError> {
        if let Some(redis) = self.link_redis() {
            if !redis.swap_call(None, call.record()).await? {
                return Ok(false);
            }
            // Without its plan the call is still decided on time by this node's timer.
            if let Err(e) = redis.plan_call(&call.record().call_id, call.next_due()).await {
                tracing::warn!(call = %call.record().call_id, error = %e, "call plan not stored");
            }
        }
        let (id, due) = (call.record().call_id.clone(), call.next_due());
        let mut calls = self.0.calls.lock();
        if !calls.open(call) {
            return Ok(false);
        }
        // Embedded, every receipt of the call is announced here: its watchers are answered
        // from memory. In a cluster other nodes announce some, through Redis.
        if !self.is_clustered() {
            calls.hear(&id);
        }
        drop(calls);
        self.replan(&id, None, due);
        Ok(true)
    }

    /// A call whose invites could not be stored ends here, unplaced: forgotten, in the store too
    /// (a retry of the sender may use its id again, after a restart as well).
    pub(super) fn drop_unplaced_call(&self, call_id: &str) {
        self.0.calls.lock().close(call_id);
        if !self.is_clustered() {
            self.persist(vec![Op::DeleteCall {
                call_id: call_id.into(),
            }]);
        }
    }

    /// Take a decision on call `call_id`; `None` if it is unknown.
    async fn decide<T>(
        &self,
        call_id: &str,
        decide: impl Fn(&mut CallCore) -> (T, Vec<CallFx>),
    ) -> Result<Option<Decided<T>>, StoreError> {
        let Some(redis) = self.link_redis() else {
            return Ok(self.decide_here(call_id, decide));
        };
        for _ in 0..MAX_SWAPS {
            let Some((record, raw)) = redis.call(call_id).await? else {
                return Ok(None);
            };
            let Some(mut call) = CallCore::from_record(record.clone()) else {
                return Ok(None);
            };
            let before = call.next_due();
            let (value, fx) = decide(&mut call);
            if *call.record() == record || redis.swap_call(Some(&raw), call.record()).await? {
                // The decision stands whatever happens to the plan: a stale entry is put right
                // by the sweep that finds it due.
                if call.next_due() != before
                    && let Err(e) = redis.plan_call(call_id, call.next_due()).await
                {
                    tracing::warn!(call = %call_id, error = %e, "call plan not updated");
                }
                // The node that placed the call keeps its timer; the others hold no copy.
                let mut calls = self.0.calls.lock();
                if let Some(mine) = calls.get_mut(call_id) {
                    let before = mine.next_due();
                    *mine = call.clone();
                    drop(calls);
                    self.replan(call_id, before, call.next_due());
                }
                return Ok(Some((value, fx, call, Vec::new())));
            }
        }
        Err(StoreError::Redis(format!(
            "call {call_id}: {MAX_SWAPS} concurrent decisions in a row"
        )))
    }

    /// Embedded: decide under the table's lock, submit the call to the store, re-plan its timer.
    fn decide_here<T>(
        &self,
        call_id: &str,
        decide: impl FnOnce(&mut CallCore) -> (T, Vec<CallFx>),
    ) -> Option<Decided<T>> {
        let mut calls = self.0.calls.lock();
        let call = calls.get_mut(call_id)?;
        let before = call.next_due();
        let (value, fx) = decide(call);
        let (after, call) = (call.next_due(), call.clone());
        let stored = self.submit(vec![Op::PutCall(call.record().clone())]);
        drop(calls);
        self.replan(call_id, before, after);
        Some((value, fx, call, vec![stored]))
    }

    /// Move call `call_id`'s timer from `before` to `after`.
    fn replan(&self, call_id: &str, before: Option<i64>, after: Option<i64>) {
        if before == after {
            return;
        }
        let mut changes = Vec::new();
        if let Some(at) = before {
            changes.push(TimerChange::Remove(at, Timer::Call, call_id.into(), 0));
        }
        if let Some(at) = after {
            changes.push(TimerChange::Add(at, Timer::Call, call_id.into(), 0));
        }
        if self.0.timers.lock().apply(changes) {
            self.0.timers_changed.notify_one();
        }
    }

    /// Carry out a call decision's effects, and the decisions their outcomes lead to. Returns
    /// the stores to wait for and how many cancels went to phones that may have rung.
    async fn carry_out(&self, call: &CallCore, cx: Ctx, mut fx: Vec<CallFx>) -> (Vec<Pending>, u32) {
        let call_id = call.record().call_id.clone();
        let (mut pending, mut cancels) = (Vec::new(), 0);
        let mut call = call.clone();
        while !fx.is_empty() {
            let mut placed = Vec::new();
            for effect in std::mem::take(&mut fx) {
                match effect {
                    CallFx::Ring { device_id, .. } => {
                        let seq = self.ring(&call, &device_id, cx, &mut pending).await;
                        placed.push((device_id, seq));
                    }
                    CallFx::Stop { device_id, stop } => {
                        let ttl = i64::from(self.limits().default_ttl_secs) * 1000;
                        let cancel = call.cancel_item(stop.reason, ttl);
                        let state = match stop.reason {
                            CancelReason::Missed => StopState::RingOut,
                            _ => StopState::Is(ReceiptState::Cancelled),
                        };
                        let sent = self
                            .stop_callee(
                                &call_id,
                                &device_id,
                                cx,
                                state,
                                &stop.detail,
                                Some(&cancel),
                                &mut pending,
                            )
                            .await;
                        cancels += u32::from(sent);
                    }
                    CallFx::Settle {
                        device_id,
                        state,
                        detail,
                    } => {
                        self.stop_callee(
                            &call_id,
                            &device_id,
                            cx,
                            StopState::Is(state),
                            &detail,
                            None,
                            &mut pending,
                        )
                        .await;
                    }
                }
            }
            if placed.is_empty() {
                break;
            }
            let rung: Vec<(String, u64)> = placed
                .iter()
                .filter_map(|(d, seq)| seq.filter(|s| *s > 0).map(|s| (d.clone(), s)))
                .collect();
            self.plan_voip(&rung);
            match self.decide(&call_id, |c| ((), c.placed(cx.now, &placed))).await {
                Ok(Some(((), more, decided, stored))) => {
                    (fx, call) = (more, decided);
                    pending.extend(stored);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(call = %call_id, error = %e, "placed invites not recorded on the call")
                }
            }
        }
        (pending, cancels)
    }

    /// Queue the call's invite for one callee of an escalation step: `Some(seq)` if queued here,
    /// `Some(0)` if forwarded to its holder, `None` if refused.
    async fn ring(
        &self,
        call: &CallCore,
        device_id: &str,
        cx: Ctx,
        pending: &mut Vec<Pending>,
    ) -> Option<u64> {
        let item = call.invite_item();
        match self.route_item(device_id, &item, cx.now).await {
            Ok(Routed::Here) => self.enqueue_here(device_id, &item, cx, pending).ok(),
            Ok(Routed::Forwarded) => Some(0),
            Ok(Routed::Refused(_)) => None,
            Err(e) => {
                tracing::warn!(call = %item.id, device = %device_id, error = %e, "escalation step could not ring a callee");
                None
            }
        }
    }

    /// Stop one callee ringing, here or through its holder's inbox; true if a cancel went to a
    /// phone that may have rung (always true when forwarded: the holder decides).
    #[allow(clippy::too_many_arguments)]
    async fn stop_callee(
        &self,
        call_id: &str,
        device_id: &str,
        cx: Ctx,
        state: StopState,
        detail: &str,
        cancel: Option<&super::device::Item>,
        pending: &mut Vec<Pending>,
    ) -> bool {
        let mut sent = false;
        if let Some(p) = self.on_callee(device_id, |core, fx| {
            sent = core.stop_ringing(fx, cx, call_id, state, detail, cancel);
        }) {
            pending.push(p);
            return sent;
        }
        self.is_clustered()
            && self.forward_stop(device_id, call_id, state, detail, cancel).await
            && cancel.is_some()
    }

    /// Run `f` on a callee's core held here, and apply its effects.
    fn on_callee(&self, device_id: &str, f: impl FnOnce(&mut DeviceCore, &mut Effects)) -> Option<Pending> {
        let device = self.device(device_id)?;
        let slot = &mut *device.lock();
        let mut fx = Effects::default();
        f(&mut slot.core, &mut fx);
        Some(self.apply(slot, fx))
    }

    /// The first step's invites were placed (`None`: refused); returns the stores to wait for.
    pub(super) async fn call_placed(
        &self,
        call_id: &str,
        cx: Ctx,
        placed: &[(String, Option<u64>)],
    ) -> Vec<Pending> {
        match self
            .decide(call_id, |call| ((), call.placed(cx.now, placed)))
            .await
        {
            Ok(Some(((), fx, call, mut pending))) => {
                pending.extend(self.carry_out(&call, cx, fx).await.0);
                pending
            }
            Ok(None) => Vec::new(),
            Err(e) => {
                tracing::warn!(call = %call_id, error = %e, "placed invites not recorded on the call");
                Vec::new()
            }
        }
    }

    /// A device core's notes about its invites. Taken under that device's lock, so decided in
    /// a task of its own: what they decide may lock other devices (an escalation step).
    pub(super) fn note_callees(&self, device_id: &str, notes: Vec<CalleeNote>) {
        let (hub, device_id) = (self.clone(), device_id.to_string());
        tokio::spawn(async move {
            let now = hub.now();
            for note in notes {
                hub.run_decision(&note.call_id, |call| ((), call.note(&device_id, &note, now)))
                    .await;
            }
        });
    }

    /// A call's timer fired: start its due steps, or end it at its deadline.
    pub(super) fn call_due(&self, call_id: &str, now: i64) {
        let (hub, call_id) = (self.clone(), call_id.to_string());
        run_soon(async move { hub.run_decision(&call_id, |call| ((), call.due(now))).await });
    }

    /// Cluster mode: decide every call due by now, whichever node placed it (one that died
    /// included). Deciding one twice is harmless: the second finds nothing due.
    pub(super) async fn sweep_calls(&self) {
        let Some(redis) = self.link_redis() else { return };
        let now = self.now();
        let due = match redis.calls_due(now, SWEEP_CALLS).await {
            Ok(due) => due,
            Err(e) => return tracing::warn!(error = %e, "call sweep skipped"),
        };
        for call_id in due {
            self.run_decision(&call_id, |call| ((), call.due(now))).await;
            // An entry a node could not update (it died between its write and the plan) is put
            // right here: the call's real next time, or none.
            let next = match redis.call(&call_id).await {
                Ok(call) => call
                    .and_then(|(r, _)| CallCore::from_record(r))
                    .and_then(|c| c.next_due()),
                Err(_) => continue,
            };
            if next.is_none_or(|at| at > now)
                && let Err(e) = redis.plan_call(&call_id, next).await
            {
                tracing::warn!(call = %call_id, error = %e, "call plan not updated");
            }
        }
    }

    /// Decide and carry out; the stores complete in the background (failures are logged).
    async fn run_decision(&self, call_id: &str, decide: impl Fn(&mut CallCore) -> ((), Vec<CallFx>)) {
        let cx = self.ctx();
        match self.decide(call_id, decide).await {
            Ok(Some(((), fx, call, pending))) => {
                let (more, _) = self.carry_out(&call, cx, fx).await;
                for p in pending.into_iter().chain(more) {
                    self.release(p);
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(call = %call_id, error = %e, "call decision failed"),
        }
    }

    /// The caller cancels call `call_id`: `None` if it is unknown or no longer ringing; else
    /// how many phones that may have rung are told to stop.
    pub(super) async fn cancel_decided_call(
        &self,
        call_id: &str,
        reason: CancelReason,
    ) -> Option<Result<u32, StoreError>> {
        let cx = self.ctx();
        let (ringing, fx, call, mut pending) =
            match self.decide(call_id, |call| call.cancel(cx.now, reason)).await {
                Ok(decided) => decided?,
                Err(e) => return Some(Err(e)),
            };
        let (more, cancels) = self.carry_out(&call, cx, fx).await;
        pending.extend(more);
        let stored = self.settle(pending).await;
        ringing.then_some(stored.map(|()| cancels))
    }

    /// Call `call_id` as this node remembers it (embedded: every call; in a cluster: the calls
    /// it placed).
    pub fn call_record(&self, call_id: &str) -> Option<CallRecord> {
        self.0.calls.lock().get(call_id).map(|c| c.record().clone())
    }

    /// Call `call_id` wherever it was placed (in a cluster, read from Redis).
    pub async fn find_call(&self, call_id: &str) -> Result<Option<CallRecord>, StoreError> {
        match self.link_redis() {
            Some(redis) => Ok(redis.call(call_id).await?.map(|(record, _)| record)),
            None => Ok(self.call_record(call_id)),
        }
    }

    /// The receipts of call `call_id`, as stored: those of a call placed by this process
    /// straight from memory, once the store has answered their writes (usually at once: see
    /// `durable.rs`); of any other (in a cluster, restored, a message id) behind a store barrier.
    pub async fn call_receipts(&self, call_id: &str) -> Result<Vec<Receipt>, StoreError> {
        let kept = self.0.calls.lock().receipts(call_id);
        match kept {
            Some((receipts, last)) => {
                self.0.durable.answered(&*self.0.store, last).await?;
                Ok(receipts)
            }
            None => self.receipts(call_id).await,
        }
    }

    /// The calls this node remembers, most recent first.
    pub fn recent_calls(&self, max: usize) -> Vec<CallRecord> {
        self.0.calls.lock().recent(max)
    }

    /// Forget finished calls past their memory, here and (embedded) in the store; Redis
    /// expires them on its own.
    pub(super) fn forget_calls(&self, now: i64) {
        let gone = self.0.calls.lock().forget_finished(now);
        if !gone.is_empty() && !self.is_clustered() {
            self.persist(
                gone.into_iter()
                    .map(|call_id| Op::DeleteCall { call_id })
                    .collect(),
            );
        }
    }
}

/// Run `work` as far as it goes now, and the rest in a task. Embedded, a call decision never
/// waits (no Redis), so it is carried out before the caller returns: timers fired with virtual
/// time have their effects at once. In a cluster it waits for Redis, in the task.
fn run_soon(work: impl std::future::Future<Output = ()> + Send + 'static) {
    let mut work = Box::pin(work);
    let mut cx = std::task::Context::from_waker(futures::task::noop_waker_ref());
    if work.as_mut().poll(&mut cx).is_pending() {
        tokio::spawn(work);
    }
}
