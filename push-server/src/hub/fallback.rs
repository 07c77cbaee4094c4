//! Call routing between the local session and the APNs VoIP fallback.
//!
//! Policy: a live session gets the invite first. If the device has no live session when the call
//! is placed, or its session ends while the invite is unacknowledged, or it does not acknowledge
//! the invite within `limits.call_ack_window_ms`, the call also rings through the APNs bridge with
//! the ring time left, provided the device registered a PushKit token APNs has not refused. Both
//! paths carry the same invite (same call UUID), so a device that gets both rings once.
//!
//! Invariants:
//! - Only a queued, unacknowledged, unexpired call invite is ever handed to the bridge (the
//!   outbox is the truth: an acked, cancelled or expired invite is no longer there), and
//!   `apns_bridge::VoipCall` can only be built from an invite, so messages and cancels never
//!   become VoIP pushes.
//! - At most one attempt per queued invite (`VoipLeg` moves forward only, under the device's
//!   lock); invites restored after a restart get none, since whether one went out is unknown.
//! - Outcomes are applied under the device's lock like every other decision: `Delivered` adds a
//!   receipt with path `apns`; a dead token is marked invalid in the device record; a failure
//!   is reported to the sender as a receipt that keeps the push's state, and never ends the
//!   local leg: the invite stays queued until it is acknowledged, cancelled or its ring deadline
//!   passes, whatever the bridge says.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use parking_lot::Mutex;

use apns_bridge::{DeviceToken, VoipBridge, VoipCall, VoipOutcome};
use prost::Message as _;
use push_proto::device::{Push, push};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{DeviceState, Hub, now_ms};
use crate::{
    observe::metrics,
    store::{Op, PushKind, ReceiptState},
};

/// Where the fallback stands for one queued call invite. Moves only forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum VoipLeg {
    /// Not attempted.
    Idle,
    /// Restored from the store after a restart; never attempted (a push may have gone out).
    Unknown,
    /// Handed to the bridge, no answer yet.
    Sending,
    /// APNs accepted the push.
    Delivered,
    /// The fallback failed (reported to the sender).
    Failed,
}

impl VoipLeg {
    /// Whether a VoIP push may have reached the device (so a cancel must follow it).
    pub(super) fn may_have_rung(self) -> bool {
        matches!(self, Self::Sending | Self::Delivered)
    }
}

/// The fallback's shared state.
pub(super) struct Fallback {
    bridge: Option<Arc<dyn VoipBridge>>,
    /// `(due_ms, device_id, seq)`: invites whose ack window ends at `due_ms`.
    due: Mutex<BTreeSet<(i64, String, u64)>>,
    due_changed: Notify,
    /// Cancels bridge calls in flight at shutdown.
    stop: CancellationToken,
}

impl Fallback {
    pub(super) fn new(bridge: Option<Arc<dyn VoipBridge>>) -> Self {
        Self {
            bridge,
            due: Mutex::new(BTreeSet::new()),
            due_changed: Notify::new(),
            stop: CancellationToken::new(),
        }
    }
}

/// Run until `shutdown`, starting the fallback for invites whose ack window ended. Returns at
/// once when the fallback is disabled.
pub async fn run_fallback(hub: Hub, shutdown: CancellationToken) {
    let f = &hub.0.fallback;
    if f.bridge.is_none() {
        return;
    }
    loop {
        hub.voip_due(now_ms());
        let earliest = f.due.lock().first().map(|(t, ..)| *t);
        let wait = earliest.map_or(Duration::from_secs(3600), |t| {
            Duration::from_millis((t - now_ms()).clamp(0, 3_600_000) as u64)
        });
        tokio::select! {
            _ = shutdown.cancelled() => {
                f.stop.cancel();
                return;
            }
            _ = f.due_changed.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// The device's usable PushKit token, if any.
fn voip_token(d: &DeviceState) -> Option<DeviceToken> {
    let r = &d.record;
    if r.revoked || r.voip_token_invalid || r.voip_token.is_empty() {
        return None;
    }
    DeviceToken::parse(&r.voip_token).ok()
}

impl Hub {
    /// A call's invites are durable: devices without a session ring through APNs now, the others
    /// once their ack window ends unacknowledged.
    pub(super) fn plan_voip(&self, seqs: &[(String, u64)], now: i64) {
        if self.0.fallback.bridge.is_none() {
            return;
        }
        let due_at = now + self.limits().call_ack_window_ms as i64;
        let mut scheduled = false;
        for (device_id, seq) in seqs {
            let Some(device) = self.device(device_id) else {
                continue;
            };
            let mut d = device.lock();
            if d.session.is_none() {
                self.start_voip_locked(&mut d, *seq, now, "no live session");
            } else if voip_token(&d).is_some() {
                self.0
                    .fallback
                    .due
                    .lock()
                    .insert((due_at, device_id.clone(), *seq));
                scheduled = true;
            }
        }
        if scheduled {
            self.0.fallback.due_changed.notify_one();
        }
    }

    /// Queued invite `old` of `device_id` was renumbered to `new`: its ack window follows it.
    pub(super) fn renumber_voip_due(&self, device_id: &str, old: u64, new: u64) {
        let mut due = self.0.fallback.due.lock();
        if let Some(entry) = due.iter().find(|(_, d, s)| d == device_id && *s == old).cloned() {
            due.remove(&entry);
            due.insert((entry.0, entry.1, new));
        }
    }

    /// Ack windows that ended by `now` (Unix ms): invites still unacknowledged go to APNs.
    pub(crate) fn voip_due(&self, now: i64) {
        let due: Vec<(i64, String, u64)> = {
            let mut due = self.0.fallback.due.lock();
            let later = due.split_off(&(now + 1, String::new(), 0));
            std::mem::replace(&mut *due, later).into_iter().collect()
        };
        for (_, device_id, seq) in due {
            if let Some(device) = self.device(&device_id) {
                let mut d = device.lock();
                self.start_voip_locked(&mut d, seq, now, "invite not acknowledged within the ack window");
            }
        }
    }

    /// The device's session ended (called under its lock): its unacknowledged invites go to APNs
    /// now instead of at the end of their windows.
    pub(super) fn voip_on_logout(&self, d: &mut DeviceState, now: i64) {
        if self.0.fallback.bridge.is_none() {
            return;
        }
        let invites: Vec<u64> = d
            .outbox
            .iter()
            .filter(|(_, q)| q.push.kind == PushKind::CallInvite && q.voip == VoipLeg::Idle)
            .map(|(seq, _)| *seq)
            .collect();
        for seq in invites {
            self.start_voip_locked(d, seq, now, "session ended");
        }
    }

    /// Hand the queued invite `seq` to the bridge, if it still rings, has not been tried, and the
    /// device has a usable token. Call under the device's lock.
    pub(super) fn start_voip_locked(&self, d: &mut DeviceState, seq: u64, now: i64, why: &'static str) {
        let Some(bridge) = self.0.fallback.bridge.clone() else {
            return;
        };
        let Some(token) = voip_token(d) else {
            return;
        };
        let device_id = d.record.device_id.clone();
        // Acked, cancelled or expired invites are gone from the outbox: nothing to ring.
        let Some(q) = d.outbox.get_mut(&seq) else {
            return;
        };
        if q.push.kind != PushKind::CallInvite {
            // The one place a non-call could reach the bridge: stop it, and make it visible.
            tracing::error!(device = %device_id, seq, kind = ?q.push.kind, "non-call push stopped at the VoIP gate");
            metrics::voip_non_call();
            return;
        }
        if q.voip != VoipLeg::Idle || q.push.expires_at_ms <= now {
            return;
        }
        let invite = match Push::decode(&q.push.encoded[..]) {
            Ok(Push {
                body: Some(push::Body::CallInvite(invite)),
                ..
            }) => invite,
            _ => {
                tracing::error!(device = %device_id, seq, "queued call invite does not decode; no VoIP fallback");
                q.voip = VoipLeg::Failed;
                return;
            }
        };
        let call = match VoipCall::from_invite(invite) {
            Ok(call) => call,
            Err(e) => {
                tracing::error!(device = %device_id, seq, error = %e, "call invite breaks the VoIP contract; no VoIP fallback");
                q.voip = VoipLeg::Failed;
                return;
            }
        };
        q.voip = VoipLeg::Sending;
        let call_id = q.push.id.clone();
        tracing::info!(device = %device_id, call = %call_id, %token, reason = why, "ringing through APNs");
        let (hub, stop) = (self.clone(), self.0.fallback.stop.clone());
        tokio::spawn(async move {
            let outcome = tokio::select! {
                o = bridge.ring(call, token.clone()) => o,
                _ = stop.cancelled() => return,
            };
            let label = match &outcome {
                VoipOutcome::Delivered { .. } => "delivered",
                VoipOutcome::TokenInvalid { .. } => "token_invalid",
                VoipOutcome::Undeliverable { .. } => "undeliverable",
                VoipOutcome::Rejected { .. } => "rejected",
                VoipOutcome::Duplicate => "duplicate",
            };
            metrics::voip(label);
            hub.voip_result(&device_id, seq, &call_id, &token, outcome);
        });
    }

    /// Apply the bridge's answer for invite `seq` of `device_id`.
    fn voip_result(
        &self,
        device_id: &str,
        seq: u64,
        call_id: &str,
        token: &DeviceToken,
        outcome: VoipOutcome,
    ) {
        let Some(device) = self.device(device_id) else {
            return;
        };
        let now = now_ms();
        let mut ops = Vec::new();
        let mut d = device.lock();
        let failure = match outcome {
            VoipOutcome::Delivered { .. } => {
                if let Some(q) = d.outbox.get_mut(&seq).filter(|q| q.push.id == call_id) {
                    q.voip = VoipLeg::Delivered;
                    let (push, latency) = (q.push.clone(), now - q.queued_ms);
                    metrics::delivered(crate::observe::kind_str(push.kind), "apns", latency);
                    let r = super::receipt(
                        &push.id,
                        &push.device_id,
                        ReceiptState::Delivered,
                        "",
                        "apns",
                        now,
                    );
                    self.announce(&mut ops, push.kind, r, Some(latency));
                }
                None
            }
            VoipOutcome::TokenInvalid { status, reason } => {
                if d.record.voip_token == token.as_str() && !d.record.voip_token_invalid {
                    d.record.voip_token_invalid = true;
                    ops.push(Op::PutDevice(d.record.clone()));
                    tracing::warn!(device = device_id, %token, status, %reason, "VoIP token invalidated");
                }
                Some(format!(
                    "APNs refused the device's VoIP token ({status} {reason}); token invalidated"
                ))
            }
            VoipOutcome::Undeliverable { reason, .. } => Some(format!("APNs fallback failed: {reason}")),
            VoipOutcome::Rejected { reason } => Some(format!("APNs fallback refused: {reason}")),
            VoipOutcome::Duplicate => None,
        };
        if let Some(reason) = failure
            && let Some(q) = d.outbox.get_mut(&seq).filter(|q| q.push.id == call_id)
        {
            q.voip = VoipLeg::Failed;
            let (push, state) = (q.push.clone(), q.state);
            // Report the failed leg and keep the invite queued: a phone that comes back on-site
            // before the ring deadline still rings (with no internet on site, APNs always fails).
            let path = if state == ReceiptState::Delivered {
                "local"
            } else {
                ""
            };
            self.receipt_via(&mut ops, &push, state, &reason, path, now);
        }
        self.persist(ops);
    }
}
