//! Expiry: pushes whose TTL or ring deadline passed leave the outbox with an `Expired` receipt,
//! finished calls are forgotten, and old final receipts are pruned.

use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Hub, now_ms};
use crate::store::{Op, PushKind, ReceiptState};

/// How often old receipts are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// How long a finished call is remembered (a late cancel then gets NOT_FOUND).
const CALL_MEMORY_MS: i64 = 60_000;

/// Run until `shutdown`, waking at the earliest deadline (or when an earlier one is queued).
pub async fn run_expiry(hub: Hub, shutdown: CancellationToken) {
    let mut next_prune = Instant::now();
    loop {
        let now = now_ms();
        hub.expire_due(now);
        if Instant::now() >= next_prune {
            let retention = hub.limits().receipt_retention_secs as i64 * 1000;
            hub.persist(vec![Op::PruneReceipts {
                before_ms: now - retention,
            }]);
            next_prune = Instant::now() + PRUNE_EVERY;
        }
        let earliest = hub.0.deadlines.lock().first().map(|(t, ..)| *t);
        let wait = earliest.map_or(PRUNE_EVERY, |t| {
            Duration::from_millis((t - now_ms()).clamp(0, 3_600_000) as u64)
        });
        let until = (Instant::now() + wait).min(next_prune);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = hub.0.deadlines_changed.notified() => {}
            _ = tokio::time::sleep_until(until) => {}
        }
    }
}

impl Hub {
    /// Expire everything due at `now` (Unix ms).
    pub(crate) fn expire_due(&self, now: i64) {
        let due: Vec<(i64, String, u64)> = {
            let mut deadlines = self.0.deadlines.lock();
            let later = deadlines.split_off(&(now + 1, String::new(), 0));
            std::mem::replace(&mut *deadlines, later).into_iter().collect()
        };
        for (_, device_id, seq) in due {
            let Some(device) = self.device(&device_id) else {
                continue;
            };
            let mut d = device.lock();
            let Some(q) = d.outbox.remove(&seq) else { continue };
            let reason = match q.push.kind {
                PushKind::Message => "ttl elapsed before the device acknowledged it",
                PushKind::CallInvite => "ring deadline passed before the device acknowledged the call",
                PushKind::CallCancel => "call over",
            };
            let mut ops = Vec::new();
            self.finish_queued(&mut ops, &q, ReceiptState::Expired, reason, now);
            self.persist(ops);
        }
        self.0
            .calls
            .lock()
            .retain(|_, c| c.deadline_ms + CALL_MEMORY_MS > now);
    }
}
