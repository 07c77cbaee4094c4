//! The hub: which devices exist, which session each has, and what is queued for each.
//!
//! It is the single place that decides; the store only remembers (write-behind, group-committed)
//! and sessions only carry out. One mutex per device guards that device's registry record,
//! outbox, sequence counter and session link, so every decision about a device is serialised
//! without a global lock on the hot path.
//!
//! Invariants:
//! - A device has at most one session; a newer login replaces the older one (the older session
//!   is told to say goodbye `REPLACED`).
//! - Sequence numbers per device strictly increase and are never reused, across restarts: a
//!   block of numbers is reserved durably (`seq ceiling`) before any of them reaches a device.
//! - A push leaves the outbox only when acknowledged, expired, superseded, cancelled or the
//!   device is revoked, and each of those reports a final receipt to the sender.
//!
//! The cluster seam: everything a session or the sender API needs goes through `Hub`'s methods,
//! so a later router can forward them to the node holding a device's session.

mod delivery;
mod expiry;
mod fallback;
#[cfg(test)]
mod tests;

pub use delivery::{CallRequest, MessageRequest, RecipientOutcome, SendError, Sent};
pub use expiry::run_expiry;
pub use fallback::run_fallback;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

// parking_lot's locks do not poison: one panicking task must not turn every later caller's
// lock into an error (one bug becoming a ward-wide outage).
use parking_lot::{Mutex, RwLock};

use apns_bridge::{DeviceToken, VoipBridge};
use push_proto::{
    device::{GoodbyeReason, Hello},
    sender::PresenceEvent,
};
use tokio::sync::{Notify, broadcast};

use crate::store::PushKind;
use crate::{
    auth::{CredentialError, DeviceClaims},
    config::Limits,
    observe::{Observer, metrics},
    store::{DeviceRecord, Op, Receipt, ReceiptState, Snapshot, Store, StoreError, StoredPush},
};

/// Sequence numbers reserved per durable ceiling write.
const SEQ_BLOCK: u64 = 1024;

/// Sequence numbers stay below 2^53, so they survive a double (Lua, JSON).
pub const MAX_SEQ: u64 = 1 << 53;
/// Floors (`Hello.last_seen_seq`) must be below 2^52, leaving numbering above any accepted
/// floor 2^52 numbers of room below [`MAX_SEQ`].
pub const MAX_FLOOR: u64 = 1 << 52;

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Cheap-to-clone handle to the shared hub.
#[derive(Clone)]
pub struct Hub(Arc<Inner>);

struct Inner {
    devices: RwLock<HashMap<String, Arc<Mutex<DeviceState>>>>,
    groups: RwLock<HashMap<String, BTreeSet<String>>>,
    store: Arc<dyn Store>,
    /// The store's epoch, sent in every `ServerHello` (see `device.proto`).
    epoch: u64,
    limits: Limits,
    presence: broadcast::Sender<PresenceEvent>,
    receipts: broadcast::Sender<Receipt>,
    /// `(expires_at_ms, device_id, seq)` of every queued push, for the expiry task.
    deadlines: Mutex<BTreeSet<(i64, String, u64)>>,
    deadlines_changed: Notify,
    calls: Mutex<HashMap<String, delivery::CallRecord>>,
    /// Caller-chosen ids of requests being placed (not yet committed).
    ids_in_flight: Mutex<HashSet<String>>,
    next_session: AtomicU64,
    /// The APNs VoIP fallback's state (routing lives in `fallback.rs`).
    fallback: fallback::Fallback,
    /// Session and delivery history for the dashboard, and the diagnoses.
    observer: Arc<Observer>,
}

struct DeviceState {
    record: DeviceRecord,
    outbox: BTreeMap<u64, Queued>,
    next_seq: u64,
    /// Sequence numbers below this may be handed out (reserved, maybe not yet durable).
    ceiling: u64,
    /// Sequence numbers below this are durably reserved; only those may reach the device.
    durable_ceiling: u64,
    session: Option<SessionLink>,
}

struct Queued {
    push: Arc<StoredPush>,
    state: ReceiptState,
    /// Where the APNs VoIP fallback stands for this push (call invites only).
    voip: fallback::VoipLeg,
    /// Unix ms it was queued (this process's start for pushes restored from the store), for
    /// latency metrics.
    queued_ms: i64,
    /// Loaded from the store at start-up: it may have been written to the device before the
    /// restart, so a trusted floor above it settles it.
    restored: bool,
    /// Handed to a session to write (set under the device's lock, before the write, so no
    /// failed or cut-short write can leave a push the device saw looking unseen).
    handed: bool,
}

struct SessionLink {
    id: u64,
    ctl: Arc<SessionCtl>,
    started_ms: i64,
}

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

/// Presence and registry facts about one device, for listings.
#[derive(Debug, Clone)]
pub struct DeviceView {
    /// The registry record.
    pub record: DeviceRecord,
    /// Whether a session is live.
    pub online: bool,
    /// Unix ms the live session started.
    pub session_started_ms: Option<i64>,
    /// Pushes queued.
    pub queued: usize,
}

impl Hub {
    /// Rebuild the hub from the store's snapshot. `voip` is the APNs VoIP fallback, if enabled.
    pub fn new(
        store: Arc<dyn Store>,
        limits: Limits,
        snapshot: Snapshot,
        voip: Option<Arc<dyn VoipBridge>>,
    ) -> Self {
        let ceilings: HashMap<String, u64> = snapshot.seq_ceilings.into_iter().collect();
        let mut devices = HashMap::new();
        let mut groups: HashMap<String, BTreeSet<String>> = HashMap::new();
        for record in snapshot.devices {
            for g in &record.groups {
                groups
                    .entry(g.clone())
                    .or_default()
                    .insert(record.device_id.clone());
            }
            let ceiling = ceilings.get(&record.device_id).copied().unwrap_or(1).max(1);
            let state = DeviceState {
                record,
                outbox: BTreeMap::new(),
                next_seq: ceiling,
                ceiling,
                durable_ceiling: ceiling,
                session: None,
            };
            devices.insert(state.record.device_id.clone(), Arc::new(Mutex::new(state)));
        }
        let mut deadlines = BTreeSet::new();
        let mut calls = HashMap::new();
        for push in snapshot.pushes {
            let Some(device) = devices.get(&push.device_id) else {
                tracing::warn!(device = %push.device_id, seq = push.seq, "dropping queued push of unknown device");
                continue;
            };
            let mut d = device.lock();
            // Never hand out a number at or below one already queued, even if the ceiling lags.
            if push.seq >= d.next_seq {
                d.next_seq = push.seq + 1;
                d.ceiling = d.next_seq;
                d.durable_ceiling = d.next_seq;
            }
            deadlines.insert((push.expires_at_ms, push.device_id.clone(), push.seq));
            delivery::remember_call(&mut calls, &push);
            d.outbox.insert(
                push.seq,
                Queued {
                    push: Arc::new(push),
                    state: ReceiptState::Accepted,
                    // Whether a VoIP push went out before the restart is unknown: send none.
                    voip: fallback::VoipLeg::Unknown,
                    queued_ms: now_ms(),
                    restored: true,
                    handed: false,
                },
            );
        }
        Self(Arc::new(Inner {
            devices: RwLock::new(devices),
            groups: RwLock::new(groups),
            store,
            epoch: snapshot.epoch,
            presence: broadcast::channel(4096).0,
            receipts: broadcast::channel(16 * 1024).0,
            deadlines: Mutex::new(deadlines),
            deadlines_changed: Notify::new(),
            calls: Mutex::new(calls),
            ids_in_flight: Mutex::default(),
            next_session: AtomicU64::new(1),
            fallback: fallback::Fallback::new(voip),
            observer: Arc::new(Observer::new(&limits)),
            limits,
        }))
    }

    /// The store's epoch, for `ServerHello.epoch`.
    pub fn epoch(&self) -> u64 {
        self.0.epoch
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.0.limits
    }

    /// The dashboard's history and the diagnoses.
    pub fn observer(&self) -> &Arc<Observer> {
        &self.0.observer
    }

    /// Facts about one device, or `None` if unknown.
    pub fn device_view(&self, device_id: &str) -> Option<DeviceView> {
        let device = self.device(device_id)?;
        let d = device.lock();
        Some(DeviceView {
            record: d.record.clone(),
            online: d.session.is_some(),
            session_started_ms: d.session.as_ref().map(|s| s.started_ms),
            queued: d.outbox.len(),
        })
    }

    /// The store behind the hub.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.0.store
    }

    fn device(&self, device_id: &str) -> Option<Arc<Mutex<DeviceState>>> {
        self.0.devices.read().get(device_id).cloned()
    }

    /// Register a device or update its groups; returns the credential generation to issue at.
    /// For a device already registered the generation goes up, so every credential issued
    /// before stops working (a re-issued phone must not be pushed out by the old credential),
    /// and a session opened with one of them ends (`CREDENTIAL_REVOKED`). A revoked device
    /// becomes usable again with the new credential.
    pub async fn register_device(&self, device_id: &str, groups: Vec<String>) -> Result<u64, StoreError> {
        let (device, created) = self.registry_entry(device_id);
        self.finish_registration(device_id, &device, groups, created)
            .await
    }

    /// Register `device_id` only if it is not registered yet; `None` if it is. The check and the
    /// creation happen under the registry's write lock, so of two concurrent calls for one new
    /// id exactly one registers it (an `enroll` key must never take over an existing phone).
    pub async fn register_new_device(
        &self,
        device_id: &str,
        groups: Vec<String>,
    ) -> Result<Option<u64>, StoreError> {
        let (device, created) = self.registry_entry(device_id);
        if !created {
            return Ok(None);
        }
        self.finish_registration(device_id, &device, groups, true)
            .await
            .map(Some)
    }

    /// The device's state, created (no groups, generation 0) when unknown; the bool says
    /// whether this call created it.
    fn registry_entry(&self, device_id: &str) -> (Arc<Mutex<DeviceState>>, bool) {
        use std::collections::hash_map::Entry;
        let mut devices = self.0.devices.write();
        match devices.entry(device_id.to_string()) {
            Entry::Occupied(e) => (e.get().clone(), false),
            Entry::Vacant(e) => {
                let state = DeviceState {
                    record: DeviceRecord {
                        device_id: device_id.into(),
                        groups: Vec::new(),
                        created_at_ms: now_ms(),
                        credential_generation: 0,
                        revoked: false,
                        last_seen_ms: 0,
                        last_ssid: String::new(),
                        last_disconnect_reason: String::new(),
                        sdk_version: String::new(),
                        voip_token: String::new(),
                        voip_token_invalid: false,
                    },
                    outbox: BTreeMap::new(),
                    next_seq: 1,
                    ceiling: 1,
                    durable_ceiling: 1,
                    session: None,
                };
                (e.insert(Arc::new(Mutex::new(state))).clone(), true)
            }
        }
    }

    /// Set the groups and, for a device that existed, move to a new credential generation
    /// (see [`Hub::register_device`]); returns the generation to issue at.
    async fn finish_registration(
        &self,
        device_id: &str,
        device: &Mutex<DeviceState>,
        groups: Vec<String>,
        created: bool,
    ) -> Result<u64, StoreError> {
        let (record, old_groups, pending) = {
            let mut d = device.lock();
            let old = std::mem::replace(&mut d.record.groups, groups);
            if !created {
                d.record.revoked = false;
                d.record.credential_generation += 1;
                if let Some(link) = d.session.take() {
                    let now = now_ms();
                    let why = "credential re-issued";
                    link.ctl.stop(GoodbyeReason::CredentialRevoked, why);
                    d.record.last_disconnect_reason = why.into();
                    self.presence_offline(&d.record, link.id, why, now);
                    // Calls it was ringing now need the other path.
                    self.voip_on_logout(&mut d, now);
                }
            }
            let mut ops = vec![Op::PutDevice(d.record.clone())];
            // Numbers for the first pushes, durable before the device can even log in.
            delivery::reserve_seq(&mut d, &mut ops);
            let pending = self.submit(ops);
            (d.record.clone(), old, pending)
        };
        {
            let mut idx = self.0.groups.write();
            for g in &old_groups {
                if let Some(members) = idx.get_mut(g) {
                    members.remove(device_id);
                }
            }
            for g in &record.groups {
                idx.entry(g.clone()).or_default().insert(device_id.into());
            }
        }
        self.settle(vec![pending]).await?;
        Ok(record.credential_generation)
    }

    /// Revoke every credential of the device, close its session and report its queue as
    /// undeliverable. Returns whether a session was closed, or `None` for an unknown device.
    pub async fn revoke_device(&self, device_id: &str) -> Result<Option<bool>, StoreError> {
        let Some(device) = self.device(device_id) else {
            return Ok(None);
        };
        let mut ops = Vec::new();
        let (closed, pending) = {
            let mut d = device.lock();
            d.record.revoked = true;
            d.record.credential_generation += 1;
            let now = now_ms();
            for (_, q) in std::mem::take(&mut d.outbox) {
                self.finish(
                    &mut ops,
                    &q.push,
                    ReceiptState::Undeliverable,
                    "device revoked",
                    now,
                );
            }
            let closed = match d.session.take() {
                Some(link) => {
                    link.ctl
                        .stop(GoodbyeReason::CredentialRevoked, "credential revoked");
                    d.record.last_disconnect_reason = "credential revoked".into();
                    self.presence_offline(&d.record, link.id, "credential revoked", now);
                    true
                }
                None => false,
            };
            ops.push(Op::PutDevice(d.record.clone()));
            (closed, self.submit(ops))
        };
        self.settle(vec![pending]).await?;
        Ok(Some(closed))
    }

    /// Admit a session whose credential verified. Replaces any older session of the device,
    /// applies the device's floor (`hello.last_seen_seq`, see [`Hub::apply_floor`]) and records
    /// presence.
    pub fn login(&self, claims: &DeviceClaims, hello: &Hello) -> Result<Login, CredentialError> {
        let device = self.device(&claims.sub).ok_or(CredentialError::UnknownDevice)?;
        let now = now_ms();
        let mut ops = Vec::new();
        let login = {
            let mut d = device.lock();
            if d.record.revoked || claims.generation < d.record.credential_generation {
                return Err(CredentialError::Revoked);
            }
            let session_id = self.0.next_session.fetch_add(1, Ordering::Relaxed);
            let ctl = Arc::new(SessionCtl::default());
            if let Some(old) = d.session.replace(SessionLink {
                id: session_id,
                ctl: ctl.clone(),
                started_ms: now,
            }) {
                old.ctl
                    .stop(GoodbyeReason::Replaced, "replaced by a newer session");
                tracing::info!(device = %claims.sub, old_session = old.id, new_session = session_id, "session replaced");
            }
            self.apply_floor(&mut d, &mut ops, hello.last_seen_seq, hello.epoch, now);
            // A block ahead (after a restart the counter sits at the ceiling): durable a commit
            // after the login, so the session's first pushes do not wait for one.
            delivery::reserve_seq(&mut d, &mut ops);
            d.record.last_seen_ms = now;
            d.record.last_ssid = hello.ssid.clone();
            d.record.sdk_version = hello.sdk_version.clone();
            ops.push(Op::PutDevice(d.record.clone()));
            let replay_count = d.outbox.values().filter(|q| q.push.expires_at_ms > now).count() as u32;
            let heard = self.0.observer.session_started(
                &claims.sub,
                session_id,
                &hello.ssid,
                &hello.instance_id,
                &hello.sdk_version,
                now,
            );
            let _ = self.0.presence.send(PresenceEvent {
                device_id: claims.sub.clone(),
                online: true,
                at_ms: now,
                ssid: hello.ssid.clone(),
                session_id: session_id.to_string(),
                reason: String::new(),
            });
            self.persist(ops);
            Login {
                session_id,
                ctl,
                replay_count,
                heard,
            }
        };
        Ok(login)
    }

    /// A session ended. Clears presence only if it is still the device's current session.
    pub fn logout(&self, device_id: &str, session_id: u64, reason: &str) {
        let Some(device) = self.device(device_id) else {
            return;
        };
        let mut d = device.lock();
        if d.session.as_ref().is_none_or(|s| s.id != session_id) {
            return;
        }
        d.session = None;
        let now = now_ms();
        d.record.last_seen_ms = now;
        d.record.last_disconnect_reason = reason.into();
        self.presence_offline(&d.record, session_id, reason, now);
        self.persist(vec![Op::PutDevice(d.record.clone())]);
        // Calls it was ringing now need the other path.
        self.voip_on_logout(&mut d, now);
    }

    /// Register (`Some`) or clear (`None`) a device's PushKit token from the admin API; returns
    /// once durable, `None` for an unknown device.
    pub async fn set_voip_token(
        &self,
        device_id: &str,
        token: Option<DeviceToken>,
    ) -> Result<Option<()>, StoreError> {
        let Some(device) = self.device(device_id) else {
            return Ok(None);
        };
        let pending = {
            let mut d = device.lock();
            let ops = set_token(&mut d.record, token).into_iter().collect();
            self.submit(ops)
        };
        self.settle(vec![pending]).await?;
        Ok(Some(()))
    }

    /// The device sent its PushKit token (`None`: cleared it) in this session.
    pub fn session_voip_token(&self, device_id: &str, session_id: u64, token: Option<DeviceToken>) {
        let Some(device) = self.device(device_id) else {
            return;
        };
        let mut d = device.lock();
        if d.session.as_ref().is_some_and(|s| s.id == session_id)
            && let Some(op) = set_token(&mut d.record, token)
        {
            tracing::info!(
                device = device_id,
                registered = !d.record.voip_token.is_empty(),
                "VoIP token updated"
            );
            self.persist(vec![op]);
        }
    }

    /// The device reports a new SSID mid-session.
    pub fn network_changed(&self, device_id: &str, session_id: u64, ssid: &str) {
        let Some(device) = self.device(device_id) else {
            return;
        };
        let mut d = device.lock();
        if d.session.as_ref().is_some_and(|s| s.id == session_id) {
            d.record.last_ssid = ssid.into();
            d.record.last_seen_ms = now_ms();
            self.persist(vec![Op::PutDevice(d.record.clone())]);
        }
    }

    /// Every device (optionally one group's, optionally only online ones), ordered by id.
    pub fn list_devices(&self, group: Option<&str>, online_only: bool) -> Vec<DeviceView> {
        let ids: Vec<String> = match group {
            Some(g) => self.group_members(g),
            None => self.0.devices.read().keys().cloned().collect(),
        };
        let mut views: Vec<DeviceView> = ids
            .iter()
            .filter_map(|id| self.device(id))
            .map(|device| {
                let d = device.lock();
                DeviceView {
                    record: d.record.clone(),
                    online: d.session.is_some(),
                    session_started_ms: d.session.as_ref().map(|s| s.started_ms),
                    queued: d.outbox.len(),
                }
            })
            .filter(|v| !online_only || v.online)
            .collect();
        views.sort_by(|a, b| a.record.device_id.cmp(&b.record.device_id));
        views
    }

    /// Ids of the devices in group `g`.
    fn group_members(&self, g: &str) -> Vec<String> {
        self.0
            .groups
            .read()
            .get(g)
            .into_iter()
            .flatten()
            .cloned()
            .collect()
    }

    /// Presence changes as they happen.
    pub fn subscribe_presence(&self) -> broadcast::Receiver<PresenceEvent> {
        self.0.presence.subscribe()
    }

    /// Receipt changes as they happen (all pushes; filter by id).
    pub fn subscribe_receipts(&self) -> broadcast::Receiver<Receipt> {
        self.0.receipts.subscribe()
    }

    /// Stored receipts of push `id`, after everything submitted so far is durable (so a status
    /// read never misses a change that was already announced).
    pub async fn receipts(&self, id: &str) -> Result<Vec<Receipt>, StoreError> {
        crate::store::commit(&*self.0.store, Vec::new()).await?;
        self.0.store.receipts(id)
    }

    fn presence_offline(&self, record: &DeviceRecord, session_id: u64, reason: &str, now: i64) {
        self.0
            .observer
            .session_ended(&record.device_id, session_id, reason, now);
        let _ = self.0.presence.send(PresenceEvent {
            device_id: record.device_id.clone(),
            online: false,
            at_ms: now,
            ssid: record.last_ssid.clone(),
            session_id: session_id.to_string(),
            reason: reason.into(),
        });
    }

    /// Record a receipt change: announce it now, persist it with the batch.
    fn receipt(&self, ops: &mut Vec<Op>, push: &StoredPush, state: ReceiptState, reason: &str, now: i64) {
        let path = match state {
            ReceiptState::Delivered | ReceiptState::Acked => "local",
            _ => "",
        };
        self.announce(
            ops,
            push.kind,
            receipt(&push.id, &push.device_id, state, reason, path, now),
            None,
        );
    }

    /// A receipt naming the path that reached the device.
    fn receipt_via(
        &self,
        ops: &mut Vec<Op>,
        push: &StoredPush,
        state: ReceiptState,
        reason: &str,
        path: &str,
        now: i64,
    ) {
        self.announce(
            ops,
            push.kind,
            receipt(&push.id, &push.device_id, state, reason, path, now),
            None,
        );
    }

    /// Announce a receipt (broadcast, dashboard history, metrics) and persist it with the batch.
    /// `latency_ms`: time since the push was queued, for delivered and acked receipts.
    fn announce(&self, ops: &mut Vec<Op>, kind: PushKind, r: Receipt, latency_ms: Option<i64>) {
        let k = crate::observe::kind_str(kind);
        match r.state {
            ReceiptState::Accepted if r.reason.is_empty() => metrics::accepted(k),
            s if s.is_final() => metrics::finished(k, crate::observe::state_str(s)),
            _ => {}
        }
        self.0.observer.receipt(
            &r.device_id,
            &r.id,
            kind,
            r.state,
            &r.path,
            &r.reason,
            r.at_ms,
            latency_ms,
        );
        let _ = self.0.receipts.send(r.clone());
        ops.push(Op::PutReceipt(r));
    }

    /// A push leaves the outbox for good with a final receipt.
    fn finish(&self, ops: &mut Vec<Op>, push: &StoredPush, state: ReceiptState, reason: &str, now: i64) {
        debug_assert!(state.is_final());
        self.receipt(ops, push, state, reason, now);
        self.forget(ops, push);
    }

    /// Like [`Hub::finish`], for a queued push: a call that rang through APNs says so in its
    /// final receipt (unless the local session acknowledged it).
    fn finish_queued(&self, ops: &mut Vec<Op>, q: &Queued, state: ReceiptState, reason: &str, now: i64) {
        debug_assert!(state.is_final());
        if state != ReceiptState::Acked && q.voip == fallback::VoipLeg::Delivered {
            self.receipt_via(ops, &q.push, state, reason, "apns", now);
            self.forget(ops, &q.push);
        } else {
            self.finish(ops, &q.push, state, reason, now);
        }
    }

    /// Drop a finished push from the store and the deadline index.
    fn forget(&self, ops: &mut Vec<Op>, push: &StoredPush) {
        ops.push(Op::DeletePush {
            device_id: push.device_id.clone(),
            seq: push.seq,
        });
        self.0
            .deadlines
            .lock()
            .remove(&(push.expires_at_ms, push.device_id.clone(), push.seq));
    }

    /// Submit ops about one device. **Call while holding that device's lock**: the store applies
    /// batches in submission order, so submitting under the lock makes the stored order the order
    /// in which the hub decided (a delivery receipt can never land before the push it is about).
    pub(crate) fn submit(&self, ops: Vec<Op>) -> Pending {
        let reserved = ops
            .iter()
            .filter_map(|op| match op {
                Op::PutSeqCeiling { device_id, ceiling } => Some((device_id.clone(), *ceiling)),
                _ => None,
            })
            .collect();
        Pending {
            rx: self.0.store.submit(ops),
            reserved,
        }
    }

    /// Submit without waiting for durability (session-side changes: the device already has what
    /// it needs, and a lost write only means a replay the device de-duplicates). Same locking
    /// rule as [`Hub::submit`]. Failures are logged by the store.
    pub(crate) fn persist(&self, ops: Vec<Op>) {
        if ops.is_empty() {
            return;
        }
        let pending = self.submit(ops);
        if !pending.reserved.is_empty() {
            let hub = self.clone();
            tokio::spawn(async move { hub.settle(vec![pending]).await });
        }
    }

    /// Wait until submitted batches are durable, then release the sequence blocks they reserved
    /// and wake the sessions waiting for them.
    pub(crate) async fn settle(&self, pending: Vec<Pending>) -> Result<(), StoreError> {
        let mut result = Ok(());
        for p in pending {
            match p.rx.await.unwrap_or(Err(StoreError::Closed)) {
                Ok(()) => {
                    for (device_id, ceiling) in p.reserved {
                        let Some(device) = self.device(&device_id) else {
                            continue;
                        };
                        let mut d = device.lock();
                        if d.durable_ceiling < ceiling {
                            d.durable_ceiling = ceiling;
                            if let Some(s) = &d.session {
                                s.ctl.wake();
                            }
                        }
                    }
                }
                Err(e) => result = Err(e),
            }
        }
        result
    }
}

/// Set or clear the token; returns the op to persist, or `None` when nothing changed. A new
/// token is valid until APNs says otherwise.
fn set_token(record: &mut DeviceRecord, token: Option<DeviceToken>) -> Option<Op> {
    let token = token.map(|t| t.as_str().to_string()).unwrap_or_default();
    if record.voip_token == token && !record.voip_token_invalid {
        return None;
    }
    record.voip_token = token;
    record.voip_token_invalid = false;
    Some(Op::PutDevice(record.clone()))
}

/// A receipt.
fn receipt(id: &str, device_id: &str, state: ReceiptState, reason: &str, path: &str, now: i64) -> Receipt {
    Receipt {
        id: id.into(),
        device_id: device_id.into(),
        state,
        reason: reason.into(),
        at_ms: now,
        path: path.into(),
    }
}

/// A submitted batch: its durability acknowledgement and the sequence blocks it reserves.
pub(crate) struct Pending {
    rx: tokio::sync::oneshot::Receiver<Result<(), StoreError>>,
    reserved: Vec<(String, u64)>,
}
