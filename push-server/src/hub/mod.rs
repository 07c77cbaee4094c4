//! The hub: which devices exist, which session each has, and what is queued for each.
//!
//! Built like a sans-IO protocol stack: the decisions live in pure cores that take the time as
//! an input and return effects ([`device::DeviceCore`] per device, [`calls::CallCore`] per
//! clinical call, [`timers::Timers`] for every deadline); this module is the thin driver around
//! them (`ringing` drives the call cores). It
//! holds one mutex per device (so every decision about a device is serialised without a global
//! lock on the hot path), reads the [`Clock`] once per operation, and applies a core's
//! [`device::Effects`] before releasing the device's lock: store ops submitted in decision order,
//! receipts announced, timers queued, the session woken, VoIP legs started.
//!
//! Faces, one module each:
//! - `senders`: what the sender API calls (messages, calls, cancels, receipts), with `ids`
//!   for caller-chosen ids;
//! - `ringing`: what phones report about calls (answered, declined, ...) and every call
//!   decision's effects, embedded or across a cluster;
//! - `registry`: what enrollment, the CLI and the dashboard call (devices, groups, tokens);
//! - `sessions`: what the session driver calls (login, pushes to write, acks, logout);
//! - `timers` and `fallback`: the background task, and the APNs VoIP leg.
//!
//! Invariants (the cores keep them; `tests.rs` checks them under any operation sequence):
//! - A device has at most one session; a newer login replaces the older one (the older session
//!   is told to say goodbye `REPLACED`).
//! - Sequence numbers per device strictly increase and are never reused, across restarts.
//! - A push leaves the outbox only when acknowledged, expired, superseded, cancelled or the
//!   device is revoked, and each of those reports a final receipt to the sender.
//! - A call ends once (answered, declined, missed or cancelled), and each callee gets exactly
//!   one outcome after its ring (see `calls.rs`).

mod bus;
mod calls;
mod clock;
mod cluster;
mod device;
mod durable;
mod encoded;
mod fallback;
mod ids;
mod registry;
mod ringing;
mod senders;
mod sessions;
mod timers;

#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;

pub use bus::{Heard, Watch, WatchRefused};
pub use clock::{Clock, OffsetClock, SystemClock, fmt_utc, now_ms};
pub use cluster::{ClusterHealth, SessionHold, run_cluster};
pub use device::{MAX_FLOOR, MAX_SEQ};
pub use encoded::EncodedPush;
pub use registry::DeviceView;
pub use senders::{CallRequest, EscalationStep, MessageRequest, RecipientOutcome, SendError, Sent};
pub use sessions::{Login, SessionCtl};
pub use timers::run_timers;

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::{Arc, atomic::AtomicU64},
};

// parking_lot's locks do not poison: one panicking task must not turn every later caller's
// lock into an error (one bug becoming a ward-wide outage).
use parking_lot::{Mutex, RwLock};

use apns_bridge::VoipBridge;
use push_proto::sender::PresenceEvent;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::{
    config::Limits,
    metrics,
    observe::Observer,
    store::{DeviceRecord, Op, PushKind, Receipt, ReceiptState, RedisStore, Snapshot, Store, StoreError},
};
use device::{Announce, Ctx, DeviceCore, Effects};

/// Cheap-to-clone handle to the shared hub.
#[derive(Clone)]
pub struct Hub(Arc<Inner>);

struct Inner {
    devices: RwLock<HashMap<String, Arc<Mutex<Slot>>>>,
    groups: RwLock<HashMap<String, BTreeSet<String>>>,
    store: Arc<dyn Store>,
    /// The store's epoch, sent in every `ServerHello` (see `device.proto`). Changes only in
    /// cluster mode, when Redis lost its data.
    epoch: std::sync::atomic::AtomicU64,
    /// The generation of the server's CA (`pki`), stamped on every device registered.
    ca_generation: std::sync::atomic::AtomicU32,
    limits: Limits,
    clock: Arc<dyn Clock>,
    presence: bus::Bus<PresenceEvent>,
    receipts: bus::Bus<Receipt>,
    timers: Mutex<timers::Timers>,
    timers_changed: Notify,
    calls: Mutex<calls::Calls>,
    /// Which of the call receipts kept in `calls` the store has answered.
    durable: durable::DurableMark,
    /// Caller-chosen ids of requests being placed (not yet committed).
    ids_in_flight: Mutex<HashSet<String>>,
    next_session: AtomicU64,
    /// The APNs VoIP fallback, if configured.
    bridge: Option<Arc<dyn VoipBridge>>,
    /// Cancels bridge calls in flight at shutdown.
    voip_stop: CancellationToken,
    /// Session and delivery history for the dashboard, and the diagnoses.
    observer: Arc<Observer>,
    /// Cluster mode: the link to the other nodes through Redis.
    cluster: Option<cluster::Link>,
}

/// One device: its core, and the handle of its live session (the core knows the session by id).
struct Slot {
    core: DeviceCore,
    ctl: Option<Arc<SessionCtl>>,
    /// Cluster mode: the number of the inbox command this node applies next, when every
    /// earlier one is applied and trimmed (`None`: unknown, so a hint reads the inbox).
    inbox_next: Option<u64>,
}

impl Slot {
    fn new(core: DeviceCore) -> Self {
        Self {
            core,
            ctl: None,
            inbox_next: None,
        }
    }
}

impl Hub {
    /// Rebuild the hub from the store's snapshot. `voip` is the APNs VoIP fallback, if enabled;
    /// `clock` is where every decision reads the time.
    pub fn new(
        store: Arc<dyn Store>,
        limits: Limits,
        snapshot: Snapshot,
        voip: Option<Arc<dyn VoipBridge>>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self::build(store, limits, snapshot, voip, clock, None)
    }

    /// A cluster node over `redis`: it holds no device until a session, a sweep or the
    /// registry claims one (see `cluster.rs`).
    pub fn new_cluster(
        redis: Arc<RedisStore>,
        limits: Limits,
        voip: Option<Arc<dyn VoipBridge>>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let snapshot = Snapshot {
            epoch: redis.epoch(),
            ..Snapshot::default()
        };
        let link = cluster::Link::new(redis.clone());
        Self::build(redis, limits, snapshot, voip, clock, Some(link))
    }

    fn build(
        store: Arc<dyn Store>,
        limits: Limits,
        snapshot: Snapshot,
        voip: Option<Arc<dyn VoipBridge>>,
        clock: Arc<dyn Clock>,
        cluster: Option<cluster::Link>,
    ) -> Self {
        let now = clock.now_ms();
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
            let ceiling = ceilings.get(&record.device_id).copied().unwrap_or(1);
            devices.insert(record.device_id.clone(), DeviceCore::new(record, ceiling));
        }
        let mut timers = timers::Timers::default();
        let mut calls = calls::Calls::default();
        for record in snapshot.calls {
            let id = record.call_id.clone();
            let Some(call) = calls::CallCore::from_record(record) else {
                tracing::error!(call = %id, "stored call with an undecodable invite dropped");
                continue;
            };
            // A step or deadline that passed while the server was down fires at once.
            if let Some(at) = call.next_due() {
                timers.apply(vec![timers::TimerChange::Add(at, timers::Timer::Call, id, 0)]);
            }
            calls.open(call);
        }
        for push in snapshot.pushes {
            let Some(core) = devices.get_mut(&push.device_id) else {
                tracing::warn!(device = %push.device_id, seq = push.seq, "dropping queued push of unknown device");
                continue;
            };
            calls.restore_invite(&push);
            timers.apply(vec![core.restore(push, now)]);
        }
        let devices = devices
            .into_iter()
            .map(|(id, core)| (id, Arc::new(Mutex::new(Slot::new(core)))))
            .collect();
        let watchers = bus::WatchLimits {
            per_key: limits.max_watchers_per_id,
            total: limits.max_watchers,
            queue: limits.watch_queue,
        };
        Self(Arc::new(Inner {
            devices: RwLock::new(devices),
            groups: RwLock::new(groups),
            store,
            epoch: snapshot.epoch.into(),
            ca_generation: Default::default(),
            presence: bus::Bus::new(limits.presence_backlog, watchers),
            receipts: bus::Bus::new(limits.receipt_backlog, watchers),
            timers: Mutex::new(timers),
            timers_changed: Notify::new(),
            calls: Mutex::new(calls),
            durable: durable::DurableMark::new(),
            ids_in_flight: Mutex::default(),
            next_session: AtomicU64::new(1),
            bridge: voip,
            voip_stop: CancellationToken::new(),
            observer: Arc::new(Observer::new(&limits)),
            limits,
            clock,
            cluster,
        }))
    }

    /// The store's epoch, for `ServerHello.epoch`.
    pub fn epoch(&self) -> u64 {
        self.0.epoch.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The generation of the server's CA, as last set.
    pub fn ca_generation(&self) -> u32 {
        self.0.ca_generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The server's CA is at `generation` (at start, and after each rotation): devices
    /// registered from now on are stamped with it.
    pub fn set_ca_generation(&self, generation: u32) {
        self.0
            .ca_generation
            .store(generation, std::sync::atomic::Ordering::Release);
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.0.limits
    }

    /// The dashboard's history and the diagnoses.
    pub fn observer(&self) -> &Arc<Observer> {
        &self.0.observer
    }

    /// Unix ms now, by the hub's clock.
    pub fn now(&self) -> i64 {
        self.0.clock.now_ms()
    }

    /// The clock jumped forward (the lifecycle host's simulated time): wake the deadline task,
    /// which fires everything now due (ring deadlines, expiry, ack windows).
    pub fn clock_moved(&self) {
        self.0.timers_changed.notify_one();
    }

    /// The time and hub-wide facts a core decision needs.
    fn ctx(&self) -> Ctx {
        Ctx {
            now: self.now(),
            epoch: self.epoch(),
            ca_generation: self.ca_generation(),
            voip: self.0.bridge.is_some(),
            max_queued: self.0.limits.max_queued_per_device,
            ack_window_ms: self.0.limits.call_ack_window_ms as i64,
        }
    }

    fn device(&self, device_id: &str) -> Option<Arc<Mutex<Slot>>> {
        self.0.devices.read().get(device_id).cloned()
    }

    /// Carry out a device core's effects. **Call while holding that device's lock**: the store
    /// applies batches in submission order, so the stored order is the order the core decided
    /// (a delivery receipt can never land before the push it is about).
    fn apply(&self, slot: &mut Slot, mut fx: Effects) -> Pending {
        let pending = self.submit(std::mem::take(&mut fx.ops));
        self.apply_timers(std::mem::take(&mut fx.timers));
        self.apply_submitted(slot, fx);
        pending
    }

    /// Carry out a device core's effects after its store ops and timers (see [`Hub::apply`];
    /// still under the device's lock).
    fn apply_submitted(&self, slot: &Slot, fx: Effects) {
        // First, so the session's task runs while the rest is done (it takes the pushes under
        // this device's lock, so it sees them only once they are all applied).
        if fx.wake
            && let Some(ctl) = &slot.ctl
        {
            ctl.wake();
        }
        for a in fx.receipts {
            self.announce(a);
        }
        if !fx.callees.is_empty() {
            self.note_callees(&slot.core.record.device_id, fx.callees);
        }
        for start in fx.voip {
            self.spawn_voip(&slot.core.record.device_id, start);
        }
    }

    /// Queue timer changes (one lock for any number of devices' changes).
    fn apply_timers(&self, changes: Vec<timers::TimerChange>) {
        if !changes.is_empty() && self.0.timers.lock().apply(changes) {
            self.0.timers_changed.notify_one();
        }
    }

    /// Announce a receipt: metrics, dashboard history, the receipt broadcast.
    fn announce(&self, a: Announce) {
        let (k, r) = (a.kind.label(), a.receipt);
        match r.state {
            ReceiptState::Accepted if r.reason.is_empty() => metrics::accepted(k),
            s if s.is_final() => metrics::finished(k, s.label()),
            _ => {}
        }
        match (r.state, a.latency_ms) {
            (ReceiptState::Delivered, Some(ms)) => {
                metrics::delivered(k, if r.path == "apns" { "apns" } else { "local" }, ms)
            }
            (ReceiptState::Acked, Some(ms)) => metrics::acked(k, ms),
            _ => {}
        }
        self.0.observer.receipt(
            &r.device_id,
            &r.id,
            a.kind,
            r.state,
            &r.path,
            &r.reason,
            r.at_ms,
            a.latency_ms,
        );
        match &self.0.cluster {
            // Every node's watchers hear it from Redis, this node's included.
            Some(link) => link.publish_receipt(r),
            None => {
                // Kept for the call's watchers before it is published (`Hub::call_receipts`):
                // its batch was submitted by `apply` before this announcement.
                if a.kind == PushKind::CallInvite {
                    let n = self.0.durable.number(&*self.0.store);
                    self.0.calls.lock().heard(&r, n);
                }
                self.0.receipts.publish(r, |r| &r.id);
            }
        }
    }

    fn presence_offline(&self, record: &DeviceRecord, session_id: u64, reason: &str, now: i64) {
        self.0
            .observer
            .session_ended(&record.device_id, session_id, reason, now);
        self.publish_presence(PresenceEvent {
            device_id: record.device_id.clone(),
            online: false,
            at_ms: now,
            ssid: record.last_ssid.clone(),
            session_id: session_id.to_string(),
            reason: reason.into(),
        });
    }

    /// Announce a presence change to this node's watchers (in a cluster, every node's).
    fn publish_presence(&self, event: PresenceEvent) {
        match &self.0.cluster {
            Some(link) => link.publish_presence(event),
            None => {
                self.0.presence.publish(event, |e| &e.device_id);
            }
        }
    }

    /// Submit ops about one device (under its lock, see [`Hub::apply`]).
    fn submit(&self, ops: Vec<Op>) -> Pending {
        if ops.is_empty() {
            return Pending {
                rx: None,
                reserved: Vec::new(),
            };
        }
        let reserved = ops
            .iter()
            .filter_map(|op| match op {
                Op::PutSeqCeiling { device_id, ceiling } => Some((device_id.clone(), *ceiling)),
                _ => None,
            })
            .collect();
        Pending {
            rx: Some(self.0.store.submit(ops)),
            reserved,
        }
    }

    /// Submit without waiting for durability (session-side changes: the device already has what
    /// it needs, and a lost write only means a replay the device de-duplicates).
    fn persist(&self, ops: Vec<Op>) {
        self.release(self.submit(ops));
    }

    /// Let a submitted batch complete in the background (failures are logged by the store);
    /// sequence blocks it reserves are released once durable.
    fn release(&self, pending: Pending) {
        if !pending.reserved.is_empty() {
            let hub = self.clone();
            tokio::spawn(async move { hub.settle(vec![pending]).await });
        }
    }

    /// Wait until submitted batches are durable, then release the sequence blocks they reserved
    /// and wake the sessions waiting for them.
    async fn settle(&self, pending: Vec<Pending>) -> Result<(), StoreError> {
        let mut result = Ok(());
        for p in pending {
            let Some(rx) = p.rx else { continue };
            match rx.await.unwrap_or(Err(StoreError::Closed)) {
                Ok(()) => {
                    for (device_id, ceiling) in p.reserved {
                        let Some(device) = self.device(&device_id) else {
                            continue;
                        };
                        let slot = &mut *device.lock();
                        if slot.core.reserved_durably(ceiling)
                            && let Some(ctl) = &slot.ctl
                        {
                            ctl.wake();
                        }
                    }
                }
                Err(StoreError::Fenced(device)) => {
                    metrics::cluster("fenced");
                    let why = "the device is held by another node";
                    self.let_go(&device, push_proto::device::GoodbyeReason::Replaced, why);
                    result = Err(StoreError::Fenced(device));
                }
                Err(e) => {
                    for (device_id, ceiling) in p.reserved {
                        if let Some(device) = self.device(&device_id) {
                            device.lock().core.reservation_failed(ceiling);
                        }
                    }
                    if let StoreError::Lost(device) = &e {
                        self.lease_lost(device);
                    }
                    result = Err(e);
                }
            }
        }
        result
    }

    /// Fire every timer due by the clock: expire pushes, end ack windows, forget finished calls.
    pub(crate) fn fire_due(&self) {
        let cx = self.ctx();
        let due = self.0.timers.lock().pop_due(cx.now);
        for (_, timer, device_id, seq) in due {
            if timer == timers::Timer::Call {
                self.call_due(&device_id, cx.now);
                continue;
            }
            let Some(device) = self.device(&device_id) else {
                continue;
            };
            let slot = &mut *device.lock();
            let mut fx = Effects::default();
            match timer {
                timers::Timer::Expire => slot.core.expire(&mut fx, cx, seq),
                timers::Timer::AckWindow => slot.core.ack_window_ended(&mut fx, cx, seq),
                timers::Timer::Call => unreachable!("handled above"),
            }
            let pending = self.apply(slot, fx);
            self.release(pending);
        }
        self.forget_calls(cx.now);
    }

    /// The earliest queued deadline, Unix ms.
    fn next_deadline(&self) -> Option<i64> {
        self.0.timers.lock().next_at()
    }

    /// Resolves when an earlier deadline was queued.
    async fn timers_changed(&self) {
        self.0.timers_changed.notified().await
    }
}

/// A submitted batch: its durability acknowledgement (none for an empty batch) and the sequence
/// blocks it reserves.
struct Pending {
    rx: Option<tokio::sync::oneshot::Receiver<Result<(), StoreError>>>,
    reserved: Vec<(String, u64)>,
}
