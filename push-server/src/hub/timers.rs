//! One deadline queue for everything the hub must do at a time: a call's escalation step or
//! ring deadline, expire a push (TTL or ring deadline) and end a call invite's ack window (then
//! it rings through APNs). The cores emit
//! [`TimerChange`]s; one task ([`run_timers`]) fires what is due, with the time as input, so
//! tests fire timers with virtual time instead of sleeping.

use std::{collections::BTreeSet, time::Duration};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Hub;
use crate::store::Op;

/// How often old receipts and expired request ids are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// Longest sleep without a deadline (the task re-checks then).
const IDLE: Duration = Duration::from_secs(3600);

/// What a timer does when it fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Timer {
    /// A call's next step or ring deadline (the deadline's `String` is the call id, the `u64`
    /// 0). First, so at one instant the call decides before its invites expire one by one.
    Call,
    /// The push's TTL or ring deadline passed.
    Expire,
    /// The call invite's ack window ended.
    AckWindow,
}

/// `(at_ms, what, device_id, seq)`; `(at_ms, Call, call_id, 0)` for a call.
pub(super) type Deadline = (i64, Timer, String, u64);

/// A change the driver applies to the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum TimerChange {
    Add(i64, Timer, String, u64),
    Remove(i64, Timer, String, u64),
}

/// The deadline queue, ordered by time.
#[derive(Debug, Default)]
pub(super) struct Timers {
    due: BTreeSet<Deadline>,
}

impl Timers {
    /// Apply changes; true when the earliest deadline moved earlier (the task must re-plan).
    pub(super) fn apply(&mut self, changes: Vec<TimerChange>) -> bool {
        let before = self.next_at();
        for change in changes {
            match change {
                TimerChange::Add(at, t, d, s) => self.due.insert((at, t, d, s)),
                TimerChange::Remove(at, t, d, s) => self.due.remove(&(at, t, d, s)),
            };
        }
        match (before, self.next_at()) {
            (Some(b), Some(a)) => a < b,
            (None, Some(_)) => true,
            _ => false,
        }
    }

    /// Remove these deadlines (a device this node no longer holds).
    pub(super) fn remove_all(&mut self, deadlines: impl IntoIterator<Item = Deadline>) {
        for d in deadlines {
            self.due.remove(&d);
        }
    }

    /// Remove and return every deadline at or before `now`, earliest first.
    pub(super) fn pop_due(&mut self, now: i64) -> Vec<Deadline> {
        let later = self
            .due
            .split_off(&(now.saturating_add(1), Timer::Call, String::new(), 0));
        std::mem::replace(&mut self.due, later).into_iter().collect()
    }

    /// The earliest deadline.
    pub(super) fn next_at(&self) -> Option<i64> {
        self.due.first().map(|(at, ..)| *at)
    }

    /// How many deadlines are queued.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.due.len()
    }

    /// Whether this exact deadline is queued.
    #[cfg(test)]
    pub(super) fn contains(&self, d: &Deadline) -> bool {
        self.due.contains(d)
    }
}

/// Run until `shutdown`: fire due timers, prune old receipts hourly, and sleep until the earliest
/// deadline (or until an earlier one is queued).
pub async fn run_timers(hub: Hub, shutdown: CancellationToken) {
    let mut next_prune = Instant::now();
    loop {
        hub.fire_due();
        if Instant::now() >= next_prune {
            let retention = hub.limits().receipt_retention_secs as i64 * 1000;
            let before_ms = hub.now() - retention;
            hub.persist(vec![Op::PruneReceipts { before_ms }]);
            next_prune = Instant::now() + PRUNE_EVERY;
        }
        let wait = hub.next_deadline().map_or(IDLE, |t| {
            Duration::from_millis((t - hub.now()).clamp(0, IDLE.as_millis() as i64) as u64)
        });
        let until = (Instant::now() + wait).min(next_prune);
        tokio::select! {
            _ = shutdown.cancelled() => {
                hub.stop_voip();
                return;
            }
            _ = hub.timers_changed() => {}
            _ = tokio::time::sleep_until(until) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_deadlines_come_out_in_time_order_and_later_ones_stay() {
        let mut t = Timers::default();
        assert!(t.apply(vec![TimerChange::Add(30, Timer::Expire, "a".into(), 1)]));
        assert!(t.apply(vec![TimerChange::Add(10, Timer::AckWindow, "b".into(), 2)]));
        assert!(!t.apply(vec![TimerChange::Add(20, Timer::Expire, "c".into(), 3)]));
        let due = t.pop_due(20);
        assert_eq!(
            due,
            vec![
                (10, Timer::AckWindow, "b".into(), 2),
                (20, Timer::Expire, "c".into(), 3)
            ]
        );
        assert_eq!(t.next_at(), Some(30));
        assert!(!t.apply(vec![TimerChange::Remove(30, Timer::Expire, "a".into(), 1)]));
        assert_eq!(t.len(), 0);
        assert!(t.pop_due(i64::MAX).is_empty());
    }
}
