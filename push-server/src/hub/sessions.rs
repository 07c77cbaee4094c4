//! The session driver's face of the hub: admit a session, hand it pushes, take its acks and
//! reports, end it.

use std::sync::{
    Arc,
    atomic::{AtomicI64, Ordering},
};

use apns_bridge::DeviceToken;
use parking_lot::Mutex;
use push_proto::{
    device::{GoodbyeReason, Hello},
    sender::PresenceEvent,
};
use tokio::sync::Notify;

use super::{EncodedPush, Hub, Slot, device::Effects};
use crate::auth::{CredentialError, DeviceClaims};

/// How the hub reaches a live session: wake it to pull pushes, or tell it to say goodbye.
#[derive(Default)]
pub struct SessionCtl {
    wake: Notify,
    stop: Mutex<Option<(GoodbyeReason, String)>>,
}

impl SessionCtl {
    /// Ask the session to pull pushes (coalesces: one stored wake-up at most).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Ask the session to say goodbye and close.
    pub fn stop(&self, reason: GoodbyeReason, detail: &str) {
        self.stop.lock().get_or_insert((reason, detail.into()));
        self.wake.notify_one();
    }

    /// The pending stop request, if any.
    pub fn take_stop(&self) -> Option<(GoodbyeReason, String)> {
        self.stop.lock().take()
    }

    /// Wait for `wake` or `stop`.
    pub async fn woken(&self) {
        self.wake.notified().await
    }
}

/// A session the hub accepted.
pub struct Login {
    /// Session id (unique per process).
    pub session_id: u64,
    /// The session's control handle.
    pub ctl: Arc<SessionCtl>,
    /// Pushes waiting for replay.
    pub replay_count: u32,
    /// Unix ms the device was last heard; the session driver updates it on every read.
    pub heard: Arc<AtomicI64>,
}

impl Hub {
    /// Admit a session whose credential verified. Replaces any older session of the device,
    /// applies the device's floor (`hello.last_seen_seq`, see `DeviceCore::apply_floor`) and
    /// records presence.
    pub fn login(&self, claims: &DeviceClaims, hello: &Hello) -> Result<Login, CredentialError> {
        let device = self.device(&claims.sub).ok_or(CredentialError::UnknownDevice)?;
        let cx = self.ctx();
        let slot = &mut *device.lock();
        let record = &slot.core.record;
        if record.revoked || claims.generation < record.credential_generation {
            return Err(CredentialError::Revoked);
        }
        let session_id = self.0.next_session.fetch_add(1, Ordering::Relaxed);
        let mut fx = Effects::default();
        let (old, replay_count) = slot.core.login(&mut fx, cx, session_id, hello);
        let ctl = Arc::new(SessionCtl::default());
        if let Some(old_ctl) = slot.ctl.replace(ctl.clone()) {
            old_ctl.stop(GoodbyeReason::Replaced, "replaced by a newer session");
            tracing::info!(device = %claims.sub, old_session = old.map(|s| s.id), new_session = session_id, "session replaced");
        }
        let pending = self.apply(slot, fx);
        self.release(pending);
        self.0
            .observer
            .previous_stop(&claims.sub, &hello.previous_stop_reason);
        let heard = self.0.observer.session_started(
            &claims.sub,
            session_id,
            &hello.ssid,
            &hello.instance_id,
            &hello.sdk_version,
            cx.now,
        );
        let event = PresenceEvent {
            device_id: claims.sub.clone(),
            online: true,
            at_ms: cx.now,
            ssid: hello.ssid.clone(),
            session_id: session_id.to_string(),
            reason: String::new(),
        };
        self.publish_presence(event);
        Ok(Login {
            session_id,
            ctl,
            replay_count,
            heard,
        })
    }

    /// A session ended. Clears presence only if it is still the device's current session.
    pub fn logout(&self, device_id: &str, session_id: u64, reason: &str) {
        let Some(device) = self.device(device_id) else {
            return;
        };
        let cx = self.ctx();
        let slot = &mut *device.lock();
        let mut fx = Effects::default();
        if !slot.core.logout(&mut fx, cx, session_id, reason) {
            return;
        }
        slot.ctl = None;
        self.presence_offline(&slot.core.record, session_id, reason, cx.now);
        let pending = self.apply(slot, fx);
        self.release(pending);
        if self.is_clustered() {
            let (hub, device_id) = (self.clone(), device_id.to_string());
            tokio::spawn(async move { hub.release_if_idle(&device_id).await });
        }
    }

    /// A session ended by the hub (credential re-issued or revoked): tell it, record presence.
    pub(super) fn close_session(
        &self,
        slot: &mut Slot,
        session_id: u64,
        reason: GoodbyeReason,
        detail: &str,
        now: i64,
    ) {
        if let Some(ctl) = slot.ctl.take() {
            ctl.stop(reason, detail);
        }
        self.presence_offline(&slot.core.record, session_id, detail, now);
    }

    /// Pushes for the session to write: above `after_seq`, unexpired, durably numbered, at most
    /// `max`. Empty if `session_id` is no longer the device's session.
    pub fn take_pushes(
        &self,
        device_id: &str,
        session_id: u64,
        after_seq: u64,
        max: usize,
    ) -> Vec<EncodedPush> {
        let Some(device) = self.device(device_id) else {
            return Vec::new();
        };
        let now = self.now();
        device.lock().core.take(session_id, after_seq, max, now)
    }

    /// The session wrote and flushed these pushes.
    pub fn mark_delivered(&self, device_id: &str, seqs: &[u64]) {
        self.with_device(device_id, None, |core, fx, cx| core.mark_delivered(fx, cx, seqs));
    }

    /// The device acknowledged pushes in this session.
    pub fn ack(&self, device_id: &str, session_id: u64, up_to: u64, seqs: &[u64]) {
        self.with_device(device_id, Some(session_id), |core, fx, cx| {
            core.ack(fx, cx, (up_to, seqs), true)
        });
    }

    /// The device sent its PushKit token (`None`: cleared it) in this session.
    pub fn session_voip_token(&self, device_id: &str, session_id: u64, token: Option<DeviceToken>) {
        self.with_device(device_id, Some(session_id), |core, fx, _| {
            if core.set_token(fx, token) {
                let registered = !core.record.voip_token.is_empty();
                tracing::info!(device = device_id, registered, "VoIP token updated");
            }
        });
    }

    /// The device reports a new SSID mid-session.
    pub fn network_changed(&self, device_id: &str, session_id: u64, ssid: &str, path_lost: bool) {
        self.with_device(device_id, Some(session_id), |core, fx, cx| {
            if path_lost {
                self.0.observer.path_lost(device_id, true);
            } else if ssid == core.record.last_ssid {
                // The same SSID: the path came back within the SDK's debounce.
                self.0.observer.path_lost(device_id, false);
            } else {
                core.network_changed(fx, cx, ssid);
                self.0.observer.network_changed(device_id);
            }
        });
    }

    /// Run a session-side decision on a device (only while `session` is its live session, when
    /// given) and persist its effects without waiting.
    fn with_device(
        &self,
        device_id: &str,
        session: Option<u64>,
        decide: impl FnOnce(&mut super::device::DeviceCore, &mut Effects, super::device::Ctx),
    ) {
        let Some(device) = self.device(device_id) else {
            return;
        };
        let cx = self.ctx();
        let slot = &mut *device.lock();
        if session.is_some_and(|id| !slot.core.is_session(id)) {
            return;
        }
        let mut fx = Effects::default();
        decide(&mut slot.core, &mut fx, cx);
        let pending = self.apply(slot, fx);
        self.release(pending);
    }
}
