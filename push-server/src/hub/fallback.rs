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
//! - At most one attempt per queued invite (`VoipLeg` moves forward only, in the device's core); invites restored after a restart get none, since whether one went out is unknown.
//! - Outcomes are applied under the device's lock like every other decision: `Delivered` adds a
//!   receipt with path `apns`; a dead token is marked invalid in the device record; a failure
//!   is reported to the sender as a receipt that keeps the push's state, and never ends the
//!   local leg: the invite stays queued until it is acknowledged, cancelled or its ring deadline
//!   passes, whatever the bridge says.

use apns_bridge::{DeviceToken, VoipOutcome};

use super::{Hub, device::Effects, device::VoipStart};
use crate::metrics;

impl Hub {
    /// Hand an invite to the bridge; its answer is applied under the device's lock.
    pub(super) fn spawn_voip(&self, device_id: &str, start: VoipStart) {
        let Some(bridge) = self.0.bridge.clone() else {
            return;
        };
        let VoipStart {
            seq,
            call_id,
            call,
            token,
            why,
        } = start;
        tracing::info!(device = %device_id, call = %call_id, %token, reason = why, "ringing through APNs");
        let (hub, stop, device_id) = (self.clone(), self.0.voip_stop.clone(), device_id.to_string());
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
            hub.voip_result(&device_id, (seq, &call_id), &token, outcome);
        });
    }

    /// Apply the bridge's answer for invite `seq` of `call_id`.
    fn voip_result(&self, device_id: &str, invite: (u64, &str), token: &DeviceToken, outcome: VoipOutcome) {
        let Some(device) = self.device(device_id) else {
            return;
        };
        let cx = self.ctx();
        let slot = &mut *device.lock();
        let mut fx = Effects::default();
        slot.core.voip_result(&mut fx, cx, invite, token, outcome);
        let pending = self.apply(slot, fx);
        self.release(pending);
    }

    /// Shutting down: cancel bridge calls in flight.
    pub(super) fn stop_voip(&self) {
        self.0.voip_stop.cancel();
    }
}
