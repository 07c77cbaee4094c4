//! Cluster mode: several nodes share devices through Redis ([`RedisStore`]).
//!
//! A device is *held* by at most one node at a time, the one its session is on (or, briefly, a
//! node that sweeps its deadlines or re-issues its credential). The holder runs the device's
//! [`DeviceCore`] exactly as a single node does, and every batch it writes carries the fencing
//! token of its claim, so once another node took the device (a newer login there) nothing it
//! writes about the device lands. Redis is the source of truth: a node keeps only the devices
//! it holds, loaded when it claims them.
//!
//! A node that does not hold a device never decides about it: a message, call invite, cancel or
//! token change for it goes into the device's Redis inbox (durable, so a lost hint costs only
//! latency), and the holder is hinted through pub/sub. The holder applies inbox commands in
//! order and trims them in the same fenced batch as their outcome. A device nobody holds keeps
//! its inbox until a login claims it, or until its earliest deadline, when any node's sweep
//! claims it, expires what is due (receipts to the senders) and lets go again.
//!
//! Receipts and presence go to every node through Redis pub/sub, so a sender watching on node A
//! sees what the phone on node B did.

use std::{sync::Arc, time::Duration};

use futures::StreamExt as _;
use prost::Message as _;
use push_proto::{
    device::{GoodbyeReason, Push},
    sender::PresenceEvent,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{
    Hub, Slot,
    device::{DeviceCore, Effects, Item, StopState, VoipLeg},
};
use crate::store::{
    Announcement, Claimed, DeviceState, Forwarded, Heard, Inbox, PushKind, Receipt, ReceiptState, RedisStore,
    StoreError,
};

/// At most this many receipts and presence events go to Redis in one pipeline.
const ANNOUNCE_BATCH: usize = 256;
/// How often a node renews its heartbeat, and how long one lasts: a node silent for longer is
/// dead to the others, which may then take its devices without stealing.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
const HEARTBEAT_TTL_MS: u64 = 5_000;
/// How often a node looks for deadlines of devices nobody holds, and how many it takes at once.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
const SWEEP_BATCH: usize = 64;
/// How many devices a node claims at once (see `Link::claims`).
const CLAIMS_IN_FLIGHT: usize = 32;
/// How many inboxes a re-drain applies at once (each waits for Redis).
const REDRAIN_CONCURRENCY: usize = 16;

/// The hub's link to the cluster.
pub(super) struct Link {
    pub(super) redis: Arc<RedisStore>,
    /// Receipts and presence to publish, in announcement order (one publisher task).
    outbound: mpsc::UnboundedSender<Outbound>,
    outbound_rx: parking_lot::Mutex<Option<mpsc::UnboundedReceiver<Outbound>>>,
    /// Serialises this node's claims, releases and inbox drains of one device: a drain reads
    /// the inbox and trims what it applied, so two at once would apply a command twice.
    /// Different devices proceed concurrently.
    ownership: parking_lot::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// What the last heartbeat learned, for health checks and the dashboard.
    health: parking_lot::Mutex<ClusterHealth>,
    /// An inbox may hold commands nobody applied (a drain failed, or hints were lost while the
    /// subscription was down): the next sweep tick drains every device held here.
    redrain: std::sync::atomic::AtomicBool,
    /// Devices held here whose lease Redis no longer has: written back at the next heartbeat.
    lost: parking_lot::Mutex<std::collections::HashSet<String>>,
    /// Claims in flight at once. In a login storm the excess waits here rather than in Redis's
    /// queue, where each would run into its timeout and send its phone back to retry.
    claims: tokio::sync::Semaphore,
}

/// A device held for a session about to log in (see [`Hub::hold_for_session`]).
#[must_use = "the device may be let go once this is dropped: keep it until the login is recorded"]
pub struct SessionHold {
    _owner: Option<tokio::sync::OwnedMutexGuard<()>>,
}

/// Why an inbox drain failed: whether anything was applied in memory decides the recovery.
enum DrainFailed {
    /// The inbox could not be read: nothing changed here.
    Unread(StoreError),
    /// Applied in memory, but the batch with its outcome was not stored.
    Unstored(StoreError),
}

/// The cluster as this node last saw it.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ClusterHealth {
    /// This node's name.
    pub node: String,
    /// This node's last heartbeat reached Redis.
    pub redis_up: bool,
    /// Unix ms of the last heartbeat that reached Redis (0: none yet).
    pub redis_last_ok_ms: i64,
    /// The last Redis error, if the last heartbeat failed.
    pub redis_error: String,
    /// Every node that ever joined, with whether its heartbeat is current.
    pub nodes: Vec<(String, bool)>,
    /// Unix ms this node last found Redis empty or replaced (0: never): devices held nowhere,
    /// API keys and receipts from before then must be restored from a backup.
    pub redis_data_lost_ms: i64,
}

impl Link {
    pub(super) fn new(redis: Arc<RedisStore>) -> Self {
        let (outbound, rx) = mpsc::unbounded_channel();
        Self {
            outbound,
            outbound_rx: parking_lot::Mutex::new(Some(rx)),
            health: parking_lot::Mutex::new(ClusterHealth {
                node: redis.node().to_string(),
                ..ClusterHealth::default()
            }),
            ownership: parking_lot::Mutex::default(),
            redrain: std::sync::atomic::AtomicBool::new(false),
            lost: parking_lot::Mutex::default(),
            claims: tokio::sync::Semaphore::new(CLAIMS_IN_FLIGHT),
            redis,
        }
    }

    /// Hold `device_id`'s ownership lock.
    async fn lock_device(&self, device_id: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self
            .ownership
            .lock()
            .entry(device_id.to_string())
            .or_default()
            .clone();
        lock.lock_owned().await
    }

    /// Forget the locks nobody holds or waits for (their devices may come back: a new one is
    /// made then).
    fn prune_locks(&self) {
        self.ownership
            .lock()
            .retain(|_, lock| Arc::strong_count(lock) > 1);
    }

    pub(super) fn publish_receipt(&self, r: Receipt) {
        let _ = self.outbound.send(Outbound::Receipt(r));
    }

    pub(super) fn publish_presence(&self, e: PresenceEvent) {
        let _ = self.outbound.send(Outbound::Presence(e));
    }
}

enum Outbound {
    Receipt(Receipt),
    Presence(PresenceEvent),
}

/// Where a push for one recipient goes.
pub(super) enum Routed {
    /// This node holds the device (every device, in embedded mode): decide here.
    Here,
    /// Queued in the inbox of a device another node holds, or nobody does.
    Forwarded,
    /// Refused for this recipient, with the reason the sender gets.
    Refused(&'static str),
}

/// A command in a device's inbox, as stored (versioned: postcard is not self-describing).
#[derive(Serialize, Deserialize)]
enum CommandRow {
    V1(CommandV1),
}

#[derive(Serialize, Deserialize)]
enum CommandV1 {
    /// Queue a push: `push` is the encoded `lpush.device.v1.Push` (seq 0), `kind` 0 message,
    /// 1 call invite, 2 call cancel.
    Enqueue {
        kind: u8,
        collapse_key: String,
        expires: i64,
        push: Vec<u8>,
    },
    /// The call was cancelled: withdraw its invite, and queue the cancel where it may have rung.
    Withdraw {
        call_id: String,
        expires: i64,
        cancel: Vec<u8>,
    },
    /// Set (non-empty) or clear the PushKit token.
    SetToken(String),
    /// The call decided this callee's ring is over (`DeviceCore::stop_ringing`): `state` 0 is
    /// the ring deadline (MISSED or EXPIRED), else the state's [`stop_code`]; `cancel` the
    /// cancel's deadline and encoded push, for a phone that may have rung.
    StopRinging {
        call_id: String,
        state: u8,
        detail: String,
        cancel: Option<(i64, Vec<u8>)>,
    },
}

/// The code of a [`StopState`] in a `StopRinging` command.
fn stop_code(state: StopState) -> u8 {
    match state {
        StopState::RingOut => 0,
        StopState::Is(ReceiptState::Answered) => 2,
        StopState::Is(ReceiptState::Declined) => 3,
        StopState::Is(ReceiptState::Missed) => 4,
        StopState::Is(_) => 1,
    }
}

fn stop_state(code: u8) -> StopState {
    match code {
        0 => StopState::RingOut,
        2 => StopState::Is(ReceiptState::Answered),
        3 => StopState::Is(ReceiptState::Declined),
        4 => StopState::Is(ReceiptState::Missed),
        _ => StopState::Is(ReceiptState::Cancelled),
    }
}

fn kind_code(kind: PushKind) -> u8 {
    match kind {
        PushKind::Message => 0,
        PushKind::CallInvite => 1,
        PushKind::CallCancel => 2,
    }
}

fn decode_item(kind: PushKind, collapse_key: String, expires: i64, push: &[u8]) -> Result<Item, String> {
    let push = Push::decode(push).map_err(|e| e.to_string())?;
    let body = push.body.ok_or("push without a body")?;
    Ok(Item::new(push.id, kind, collapse_key, expires, body))
}

fn encode(command: CommandV1) -> Vec<u8> {
    postcard::to_allocvec(&CommandRow::V1(command)).expect("commands encode")
}

/// What a command asks of the holder.
enum Command {
    Enqueue(Item),
    Withdraw {
        call_id: String,
        cancel: Item,
    },
    SetToken(Option<apns_bridge::DeviceToken>),
    StopRinging {
        call_id: String,
        state: StopState,
        detail: String,
        cancel: Option<Item>,
    },
}

fn decode(raw: &[u8]) -> Result<Command, String> {
    let CommandRow::V1(c) = postcard::from_bytes(raw).map_err(|e| e.to_string())?;
    Ok(match c {
        CommandV1::Enqueue {
            kind,
            collapse_key,
            expires,
            push,
        } => {
            let kind = match kind {
                0 => PushKind::Message,
                1 => PushKind::CallInvite,
                2 => PushKind::CallCancel,
                k => return Err(format!("unknown push kind {k}")),
            };
            Command::Enqueue(decode_item(kind, collapse_key, expires, &push)?)
        }
        CommandV1::Withdraw {
            call_id,
            expires,
            cancel,
        } => Command::Withdraw {
            call_id,
            cancel: decode_item(PushKind::CallCancel, String::new(), expires, &cancel)?,
        },
        CommandV1::StopRinging {
            call_id,
            state,
            detail,
            cancel,
        } => Command::StopRinging {
            call_id,
            state: stop_state(state),
            detail,
            cancel: cancel
                .map(|(expires, push)| decode_item(PushKind::CallCancel, String::new(), expires, &push))
                .transpose()?,
        },
        CommandV1::SetToken(t) if t.is_empty() => Command::SetToken(None),
        CommandV1::SetToken(t) => Command::SetToken(Some(
            apns_bridge::DeviceToken::parse(&t).map_err(|e| e.to_string())?,
        )),
    })
}

impl Hub {
    fn link(&self) -> Option<&Link> {
        self.0.cluster.as_ref()
    }

    /// Cluster mode: the shared Redis store.
    pub(super) fn link_redis(&self) -> Option<&Arc<RedisStore>> {
        self.link().map(|l| &l.redis)
    }

    /// Cluster mode: the cluster as this node last saw it (`None` on a single node).
    pub fn cluster_health(&self) -> Option<ClusterHealth> {
        self.link().map(|l| l.health.lock().clone())
    }

    /// Whether this hub is a cluster node.
    pub fn is_clustered(&self) -> bool {
        self.0.cluster.is_some()
    }

    /// Cluster mode: hold `device_id` on this node so a session can log in here, taking it from
    /// whichever node holds it (a newer login wins). A no-op when already held here or in
    /// embedded mode. An unknown device is left to `login` to refuse.
    ///
    /// Keep the returned guard until `login` returned: until then the device has no session,
    /// and a release (the previous session's logout, a sweep) would let it go under the new
    /// session, leaving a live phone that no node holds.
    pub async fn hold_for_session(&self, device_id: &str) -> Result<SessionHold, StoreError> {
        let Some(link) = self.link() else {
            return Ok(SessionHold { _owner: None });
        };
        let owner = link.lock_device(device_id).await;
        self.hold_locked(link, device_id, true).await?;
        Ok(SessionHold { _owner: Some(owner) })
    }

    /// Hold `device_id` here (`steal`: even from a live node). Returns whether it is held here.
    pub(super) async fn hold(&self, device_id: &str, steal: bool) -> Result<bool, StoreError> {
        let Some(link) = self.link() else {
            return Ok(true);
        };
        let _owner = link.lock_device(device_id).await;
        self.hold_locked(link, device_id, steal).await
    }

    /// `hold`, with the device's ownership lock held.
    async fn hold_locked(&self, link: &Link, device_id: &str, steal: bool) -> Result<bool, StoreError> {
        let drained = if self.device(device_id).is_none() {
            let _permit = link.claims.acquire().await.map_err(|_| StoreError::Closed)?;
            match timed("claim", link.redis.claim(device_id, steal)).await? {
                Claimed::Unknown | Claimed::Held { .. } => return Ok(false),
                Claimed::Mine {
                    previous,
                    state,
                    inbox,
                    ..
                } => {
                    if let Some(node) = previous {
                        tracing::info!(device = device_id, from = %node, "device taken over");
                    }
                    crate::metrics::cluster("claimed");
                    self.install(state);
                    // The claim read the inbox in the same script: no second round trip (a
                    // login storm pays one per phone).
                    self.apply_inbox(device_id, inbox).await
                }
            }
        } else {
            self.drain_locked(link, device_id).await
        };
        match drained {
            Ok(()) => Ok(true),
            Err(failed) => Err(self.drain_failed(link, device_id, failed)),
        }
    }

    /// Put a claimed device's stored state in place, with its timers.
    fn install(&self, state: DeviceState) {
        let now = self.now();
        let id = state.record.device_id.clone();
        let mut core = DeviceCore::new(state.record, state.ceiling);
        let timers: Vec<_> = state.pushes.into_iter().map(|p| core.restore(p, now)).collect();
        if self.0.timers.lock().apply(timers) {
            self.0.timers_changed.notify_one();
        }
        let slot = Slot::new(core);
        self.0
            .devices
            .write()
            .insert(id, Arc::new(parking_lot::Mutex::new(slot)));
    }

    /// Apply the device's inbox (call with the ownership lock held).
    async fn drain_locked(&self, link: &Link, device_id: &str) -> Result<(), DrainFailed> {
        let inbox = timed("inbox", link.redis.inbox(device_id))
            .await
            .map_err(DrainFailed::Unread)?;
        self.apply_inbox(device_id, inbox).await
    }

    /// Apply `inbox`, the head of the device's inbox up to command number `inbox.last`, and
    /// trim it in the same batch as its outcome (call with the ownership lock held). Each
    /// apply waits until that batch is durable, so under the lock the inbox's head is always
    /// the first command not applied: once this returns Ok, command `last + 1` may be applied
    /// straight from its hint.
    async fn apply_inbox(&self, device_id: &str, inbox: Inbox) -> Result<(), DrainFailed> {
        let Some(device) = self.device(device_id) else {
            return Ok(());
        };
        let Inbox { commands, last } = inbox;
        if commands.is_empty() {
            device.lock().inbox_next = Some(last + 1);
            return Ok(());
        }
        let (pending, invites) = {
            let cx = self.ctx();
            let slot = &mut *device.lock();
            // Unknown until this batch is durable: a failure leaves the next hint to read.
            slot.inbox_next = None;
            let mut fx = Effects::default();
            let mut invites = Vec::new();
            let mut enqueued = Vec::new();
            for raw in &commands {
                match decode(raw) {
                    Ok(Command::Enqueue(item)) => {
                        enqueued.push(item.id.clone());
                        if let Ok(seq) = slot.core.enqueue(&mut fx, cx, &item)
                            && item.kind == PushKind::CallInvite
                        {
                            invites.push(seq);
                        }
                    }
                    Ok(Command::Withdraw { call_id, cancel }) => {
                        if slot.core.withdraw_call(&mut fx, cx, &call_id) {
                            let _ = slot.core.enqueue(&mut fx, cx, &cancel);
                        }
                    }
                    Ok(Command::SetToken(token)) => {
                        slot.core.set_token(&mut fx, token);
                    }
                    Ok(Command::StopRinging {
                        call_id,
                        state,
                        detail,
                        cancel,
                    }) => {
                        slot.core
                            .stop_ringing(&mut fx, cx, &call_id, state, &detail, cancel.as_ref());
                    }
                    Err(e) => {
                        tracing::error!(device = device_id, error = %e, "undecodable inbox command skipped")
                    }
                }
            }
            // The forwarding node wrote and announced each enqueued item's ACCEPTED.
            let forwarded: std::collections::HashSet<&str> = enqueued.iter().map(String::as_str).collect();
            let announced =
                |r: &Receipt| r.state == ReceiptState::Accepted && forwarded.contains(r.id.as_str());
            fx.receipts.retain(|a| !announced(&a.receipt));
            fx.ops
                .retain(|op| !matches!(op, crate::store::Op::PutReceipt(r) if announced(r)));
            fx.ops.push(crate::store::Op::TrimInbox {
                device_id: device_id.into(),
                count: commands.len(),
            });
            (self.apply(slot, fx), invites)
        };
        self.settle(vec![pending]).await.map_err(DrainFailed::Unstored)?;
        crate::metrics::cluster("drained");
        // Invites are durable now: plan their VoIP legs as a single node does.
        let cx = self.ctx();
        let slot = &mut *device.lock();
        slot.inbox_next = Some(last + 1);
        let mut fx = Effects::default();
        for seq in invites {
            slot.core.plan_voip(&mut fx, cx, seq);
        }
        let pending = self.apply(slot, fx);
        self.release(pending);
        Ok(())
    }

    /// Apply the inbox of a device held here (after a lost hint or a failed drain).
    async fn drain(&self, device_id: &str) {
        self.take_hinted(device_id, None).await;
    }

    /// Apply command `number` of the inbox of a device held here, from its hint: without
    /// reading the inbox when it is the next one this node expects (one Redis round trip
    /// less for every cross-node push), else the whole inbox as read now.
    async fn take_hinted(&self, device_id: &str, hinted: Option<(u64, Vec<u8>)>) {
        let Some(link) = self.link() else { return };
        let _owner = link.lock_device(device_id).await;
        let Some(device) = self.device(device_id) else {
            return;
        };
        let expected = device.lock().inbox_next;
        let drained = match hinted {
            Some((number, command)) if Some(number) == expected => {
                crate::metrics::cluster("hint_applied");
                let inbox = Inbox {
                    commands: vec![command],
                    last: number,
                };
                self.apply_inbox(device_id, inbox).await
            }
            _ => self.drain_locked(link, device_id).await,
        };
        if let Err(failed) = drained {
            self.drain_failed(link, device_id, failed);
        }
    }

    /// Recover from a failed drain; returns its error.
    fn drain_failed(&self, link: &Link, device_id: &str, failed: DrainFailed) -> StoreError {
        link.redrain.store(true, std::sync::atomic::Ordering::Release);
        match failed {
            // Nothing changed here: keep the device (this node's copy may be the only one, if
            // Redis is coming back empty) and read the inbox again at the next sweep.
            DrainFailed::Unread(e) => {
                tracing::warn!(device = device_id, error = %e, "inbox not read; retried at the next sweep");
                e
            }
            // This node's state is now the only copy: the next heartbeat writes it back.
            DrainFailed::Unstored(e @ StoreError::Lost(_)) => {
                tracing::warn!(device = device_id, error = %e, "inbox not applied; re-seeding at the next heartbeat");
                self.lease_lost(device_id);
                e
            }
            // What the drain applied in memory is not stored: drop the device here so its next
            // holder (the phone reconnects) loads the truth and applies the inbox again.
            DrainFailed::Unstored(e) => {
                tracing::warn!(device = device_id, error = %e, "inbox not applied; the device is reloaded");
                self.let_go(
                    device_id,
                    GoodbyeReason::Reconnect,
                    "the cluster store failed; reconnect",
                );
                e
            }
        }
    }

    /// Another node took the device, or a write about it was fenced: drop it here and end its
    /// session (the phone is, or will be, on the other node).
    pub(super) fn let_go(&self, device_id: &str, reason: GoodbyeReason, why: &str) {
        let Some(link) = self.link() else { return };
        link.redis.forget(device_id);
        let Some(device) = self.0.devices.write().remove(device_id) else {
            return;
        };
        let slot = &mut *device.lock();
        let timers: Vec<_> = slot.core.timers().collect();
        self.0.timers.lock().remove_all(timers);
        if let (Some(ctl), Some(s)) = (slot.ctl.take(), slot.core.session) {
            ctl.stop(reason, why);
            self.presence_offline(&slot.core.record, s.id, why, self.now());
        }
        tracing::info!(device = device_id, reason = why, "device let go");
    }

    /// Let go of a device held here without a session, once nothing is in flight for it, so
    /// the next login or sweep on any node claims it fresh.
    pub(super) async fn release_if_idle(&self, device_id: &str) {
        let Some(link) = self.link() else { return };
        let _owner = link.lock_device(device_id).await;
        let Some(device) = self.device(device_id) else {
            return;
        };
        let idle = || {
            let core = &device.lock().core;
            let busy = core.session.is_some() || core.outbox.values().any(|q| q.voip == VoipLeg::Sending);
            (!busy).then(|| core.outbox.values().map(|q| q.push.expires_at_ms).min())
        };
        if idle().is_none() {
            return;
        }
        // Wait for what was submitted about it, so its successor loads the latest state.
        if crate::store::commit(&*self.0.store, Vec::new()).await.is_err() {
            return;
        }
        // A VoIP leg may have started meanwhile (a login cannot: it holds the ownership lock).
        let Some(earliest) = idle() else {
            return;
        };
        if let Some(device) = self.0.devices.write().remove(device_id) {
            let slot = device.lock();
            let timers: Vec<_> = slot.core.timers().collect();
            self.0.timers.lock().remove_all(timers);
        }
        if let Err(e) = timed("release", link.redis.release(device_id, earliest)).await {
            crate::metrics::cluster("release_failed");
            tracing::warn!(device = device_id, error = %e, "release failed; the lease will be taken over");
        }
    }

    /// Cluster mode: queue `item` for a device this node does not hold, through its inbox.
    pub(super) async fn route_item(
        &self,
        device_id: &str,
        item: &Item,
        now: i64,
    ) -> Result<Routed, StoreError> {
        let Some(link) = self.link() else {
            return Ok(Routed::Here);
        };
        if self.device(device_id).is_some() {
            return Ok(Routed::Here);
        }
        let command = encode(CommandV1::Enqueue {
            kind: kind_code(item.kind),
            collapse_key: item.collapse_key.clone(),
            expires: item.expires,
            push: item.unnumbered.to_vec(),
        });
        let accepted = super::device::receipt(
            &item.id,
            device_id,
            crate::store::ReceiptState::Accepted,
            "",
            "",
            now,
        );
        let max = self.0.limits.max_queued_per_device;
        let forward = link
            .redis
            .forward(device_id, command, Some(accepted), item.expires, max);
        match timed("forward", forward).await {
            // The forward script announced the ACCEPTED receipt to every node.
            Ok(Forwarded::Queued { .. }) => {
                crate::metrics::accepted(item.kind.label());
                crate::metrics::cluster("forwarded");
                Ok(Routed::Forwarded)
            }
            Ok(Forwarded::Unknown) => Ok(Routed::Refused("unknown device")),
            Ok(Forwarded::Full) => Ok(Routed::Refused("device queue full")),
            Err(e) => {
                tracing::warn!(device = device_id, error = %e, "forward failed");
                Err(e)
            }
        }
    }

    /// Cluster mode: tell the holder of `device_id` (or its next holder) that call `call_id`
    /// was cancelled. Returns false when it could not be queued.
    pub(super) async fn forward_withdraw(&self, device_id: &str, call_id: &str, cancel: &Item) -> bool {
        let Some(link) = self.link() else { return false };
        let command = encode(CommandV1::Withdraw {
            call_id: call_id.into(),
            expires: cancel.expires,
            cancel: cancel.unnumbered.to_vec(),
        });
        // A cancel is never refused for a full queue: it only ends a ring.
        matches!(
            link.redis
                .forward(device_id, command, None, cancel.expires, usize::MAX)
                .await,
            Ok(Forwarded::Queued { .. })
        )
    }

    /// Cluster mode: tell the holder of `device_id` (or its next holder) that a call stopped
    /// ringing it (see `DeviceCore::stop_ringing`). Returns false when it could not be queued.
    pub(super) async fn forward_stop(
        &self,
        device_id: &str,
        call_id: &str,
        state: StopState,
        detail: &str,
        cancel: Option<&Item>,
    ) -> bool {
        let Some(link) = self.link() else { return false };
        let command = encode(CommandV1::StopRinging {
            call_id: call_id.into(),
            state: stop_code(state),
            detail: detail.into(),
            cancel: cancel.map(|c| (c.expires, c.unnumbered.to_vec())),
        });
        // Kept until the cancel (or, without one, the ring) can no longer matter.
        let due = cancel.map_or(self.now() + 60_000, |c| c.expires);
        matches!(
            link.redis
                .forward(device_id, command, None, due, usize::MAX)
                .await,
            Ok(Forwarded::Queued { .. })
        )
    }

    /// Cluster mode: set or clear the PushKit token of a device this node does not hold.
    /// `Ok(None)`: unknown device.
    pub(super) async fn forward_token(
        &self,
        device_id: &str,
        token: Option<&apns_bridge::DeviceToken>,
    ) -> Result<Option<()>, StoreError> {
        let Some(link) = self.link() else {
            return Ok(None);
        };
        let command = encode(CommandV1::SetToken(
            token.map(|t| t.as_str().to_string()).unwrap_or_default(),
        ));
        let never = i64::MAX / 2;
        match link
            .redis
            .forward(device_id, command, None, never, usize::MAX)
            .await?
        {
            Forwarded::Unknown => Ok(None),
            _ => Ok(Some(())),
        }
    }

    /// Drain every held device's inbox, if one may hold commands nobody applied.
    async fn redrain(&self) {
        let Some(link) = self.link() else { return };
        if !link.redrain.swap(false, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        let held: Vec<String> = self.0.devices.read().keys().cloned().collect();
        let waiting = match timed("with_inbox", link.redis.with_inbox(&held)).await {
            Ok(waiting) => waiting,
            Err(e) => {
                tracing::warn!(error = %e, "inboxes not checked; retried at the next sweep");
                link.redrain.store(true, std::sync::atomic::Ordering::Release);
                return;
            }
        };
        tracing::debug!(
            held = held.len(),
            waiting = waiting.len(),
            "re-draining the inboxes held here"
        );
        futures::stream::iter(waiting)
            .for_each_concurrent(REDRAIN_CONCURRENCY, |device| async move {
                self.drain(&device).await;
            })
            .await;
    }

    /// Claim, apply and let go of the devices whose deadlines passed while nobody held them.
    async fn sweep(&self) {
        let Some(link) = self.link() else { return };
        link.prune_locks();
        self.redrain().await;
        let due = match timed("due", link.redis.due(self.now(), SWEEP_BATCH)).await {
            Ok(due) => due,
            Err(e) => {
                tracing::warn!(error = %e, "sweep skipped");
                return;
            }
        };
        for device_id in due {
            match self.hold(&device_id, false).await {
                Ok(true) => {
                    crate::metrics::cluster("swept");
                    self.fire_due();
                    self.release_if_idle(&device_id).await;
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(device = %device_id, error = %e, "sweep claim failed"),
            }
        }
        self.sweep_calls().await;
    }

    /// Renew this node's heartbeat and note what it learned.
    async fn beat(&self, link: &Link) {
        let result = match timed("heartbeat", link.redis.heartbeat(HEARTBEAT_TTL_MS)).await {
            Ok(()) => timed("nodes", link.redis.nodes()).await,
            Err(e) => Err(e),
        };
        if result.is_ok() {
            match timed("epoch", link.redis.current_epoch()).await {
                Ok(Some(epoch)) if epoch == self.epoch() => {
                    // Same data, yet leases gone: a failover lost the claims.
                    let lost: Vec<String> = link.lost.lock().drain().collect();
                    for device_id in lost {
                        tracing::warn!(device = %device_id, "lease lost (a failover?): writing the device back");
                        crate::metrics::cluster("lease_lost");
                        self.reseed_device(link, &device_id).await;
                    }
                }
                Ok(_) => self.reseed(link).await,
                Err(e) => tracing::warn!(error = %e, "epoch check failed"),
            }
        }
        let mut health = link.health.lock();
        match result {
            Ok(nodes) => {
                if !health.redis_up && health.redis_last_ok_ms != 0 {
                    tracing::info!("redis reachable again");
                }
                health.redis_up = true;
                health.redis_last_ok_ms = self.now();
                health.redis_error.clear();
                health.nodes = nodes.into_iter().map(|n| (n.node, n.alive)).collect();
            }
            Err(e) => {
                if health.redis_up || health.redis_last_ok_ms == 0 {
                    tracing::error!(error = %e, "redis unreachable: sessions held here go on; sends and logins that need Redis are refused");
                }
                health.redis_up = false;
                health.redis_error = e.to_string();
            }
        }
        let alive = health.nodes.iter().filter(|(_, a)| *a).count();
        crate::metrics::redis_health(health.redis_up, alive);
    }

    /// Redis came back empty (or was replaced): adopt its new epoch and write back what this
    /// node holds, so none of its devices' queued pushes is lost. Each device's session is then
    /// told to reconnect: with the new epoch its floor is untrusted, so whatever it may not have
    /// seen is numbered above it and delivered (the SDK drops what it already showed, by id).
    async fn reseed(&self, link: &Link) {
        let epoch = match link.redis.adopt_new_epoch().await {
            Ok(e) => e,
            Err(e) => return tracing::warn!(error = %e, "cannot adopt a new epoch"),
        };
        let old = self.0.epoch.swap(epoch, std::sync::atomic::Ordering::AcqRel);
        tracing::error!(
            old_epoch = old,
            new_epoch = epoch,
            "redis lost its data (restarted empty or replaced): re-seeding the devices held here; \
             devices held by no node, API keys and receipts must be restored from a backup"
        );
        crate::metrics::cluster("redis_data_lost");
        link.health.lock().redis_data_lost_ms = self.now();
        link.lost.lock().clear();
        let held: Vec<String> = self.0.devices.read().keys().cloned().collect();
        for device_id in held {
            self.reseed_device(link, &device_id).await;
        }
    }

    /// Write back a device held here whose lease Redis lost (record, ceiling, queue), then let
    /// it go: its phone reconnects and claims it afresh; its floor is trusted only in the
    /// current epoch.
    async fn reseed_device(&self, link: &Link, device_id: &str) {
        let _owner = link.lock_device(device_id).await;
        let Some(device) = self.device(device_id) else {
            return;
        };
        let (record, mut ops, earliest) = {
            let slot = device.lock();
            let core = &slot.core;
            let mut ops = vec![
                crate::store::Op::PutDevice(core.record.clone()),
                crate::store::Op::PutSeqCeiling {
                    device_id: device_id.to_string(),
                    ceiling: core.next_seq,
                },
            ];
            ops.extend(
                core.outbox
                    .values()
                    .map(|q| crate::store::Op::PutPush((*q.push).clone())),
            );
            let earliest = core.outbox.values().map(|q| q.push.expires_at_ms).min();
            (core.record.clone(), ops, earliest)
        };
        let restored = async {
            link.redis.create_device(&record).await?;
            match link.redis.claim(device_id, true).await? {
                Claimed::Mine { .. } => {}
                _ => return Err(StoreError::Redis("the device could not be claimed".into())),
            }
            crate::store::commit(&*self.0.store, std::mem::take(&mut ops)).await?;
            link.redis.release(device_id, earliest).await
        };
        if let Err(e) = restored.await {
            tracing::error!(device = %device_id, error = %e, "device not re-seeded");
        }
        let why = "the cluster store lost this device's state; reconnect to resync";
        self.let_go(device_id, GoodbyeReason::Reconnect, why);
    }

    /// Note that Redis no longer has this node's lease on `device_id` (see `beat`).
    pub(super) fn lease_lost(&self, device_id: &str) {
        if let Some(link) = self.link() {
            link.lost.lock().insert(device_id.to_string());
        }
    }

    /// What Redis pub/sub told this node.
    async fn heard(&self, heard: Heard) {
        match heard {
            // Drains of different devices overlap (each waits for Redis).
            Heard::Inbox {
                device,
                number,
                command,
            } => {
                let hub = self.clone();
                tokio::spawn(async move { hub.take_hinted(&device, Some((number, command))).await });
            }
            Heard::Kick(device) => {
                crate::metrics::cluster("kicked");
                self.let_go(
                    &device,
                    GoodbyeReason::Replaced,
                    "the device logged in on another node",
                );
            }
            Heard::Receipt(r) => {
                self.0.receipts.publish(r, |r| &r.id);
            }
            Heard::Presence(bytes) => match PresenceEvent::decode(&bytes[..]) {
                Ok(e) => {
                    self.0.presence.publish(e, |e| &e.device_id);
                }
                Err(e) => tracing::warn!(error = %e, "undecodable presence event"),
            },
            Heard::Resubscribed => {
                // Hints sent while the subscription was down are lost: look at every inbox,
                // without holding up what is heard meanwhile.
                if let Some(link) = self.link() {
                    link.redrain.store(true, std::sync::atomic::Ordering::Release);
                }
                let hub = self.clone();
                tokio::spawn(async move { hub.redrain().await });
            }
        }
    }
}

/// Time a Redis request for `lpush_redis_request_seconds` and count its failures.
async fn timed<T>(
    op: &'static str,
    request: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let started = std::time::Instant::now();
    let result = request.await;
    let ok = !matches!(result, Err(StoreError::Redis(_) | StoreError::Io(_)));
    crate::metrics::redis_request(op, ok, started.elapsed().as_secs_f64());
    result
}

/// Run the cluster's background work until `shutdown`: heartbeats, the sweep, publishing this
/// node's receipts and presence, and acting on what other nodes say. Returns at once in
/// embedded mode.
pub async fn run_cluster(hub: Hub, shutdown: CancellationToken) {
    let Some(link) = hub.link() else { return };
    let Some(mut outbound) = link.outbound_rx.lock().take() else {
        return;
    };
    let mut heard = link.redis.subscribe();
    let publisher = {
        let redis = link.redis.clone();
        tokio::spawn(async move {
            // What queued while the previous announcements were on their way goes in one
            // pipeline: one round trip, not one per receipt.
            let mut batch = Vec::new();
            while outbound.recv_many(&mut batch, ANNOUNCE_BATCH).await > 0 {
                let all: Vec<Announcement> = batch
                    .drain(..)
                    .map(|item| match item {
                        Outbound::Receipt(r) => Announcement::Receipt(r),
                        Outbound::Presence(e) => Announcement::Presence(e.encode_to_vec()),
                    })
                    .collect();
                if let Err(e) = redis.announce(&all).await {
                    tracing::warn!(error = %e, count = all.len(), "announcements not published to the cluster");
                }
            }
        })
    };
    // What other nodes say is acted on apart from the heartbeat and the sweep, which wait for
    // Redis: a hint waiting behind them would be dropped once the listener's queue is full.
    let listener = {
        let hub = hub.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    Some(h) = heard.recv() => hub.heard(h).await,
                    else => break,
                }
            }
        })
    };
    let mut beat = tokio::time::interval(HEARTBEAT_EVERY);
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = beat.tick() => hub.beat(link).await,
            _ = sweep.tick() => hub.sweep().await,
        }
    }
    publisher.abort();
    let _ = listener.await;
    // Let the devices go so other nodes take them at once rather than after the heartbeat TTL.
    let held: Vec<String> = hub.0.devices.read().keys().cloned().collect();
    for device in held {
        hub.release_if_idle(&device).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::Limits, hub::clock::SystemClock, store::DeviceRecord};
    use testkit::redis::RedisServer;

    fn record(id: &str) -> DeviceRecord {
        DeviceRecord {
            device_id: id.into(),
            groups: Vec::new(),
            created_at_ms: 1,
            credential_generation: 1,
            revoked: false,
            last_seen_ms: 1,
            last_ssid: String::new(),
            last_disconnect_reason: String::new(),
            sdk_version: String::new(),
            voip_token: String::new(),
            voip_token_invalid: false,
            ca_generation: 0,
        }
    }

    /// A plain connection to `server`, for what the test does behind the nodes' backs.
    fn raw(server: &RedisServer) -> ::redis::Connection {
        ::redis::Client::open(server.url.as_str())
            .expect("client")
            .get_connection()
            .expect("connection")
    }

    /// A live node's store.
    async fn node(server: &RedisServer, name: &str) -> Arc<RedisStore> {
        let redis = RedisStore::connect(&server.url, name, true)
            .await
            .expect("connect");
        redis.heartbeat(60_000).await.expect("heartbeat");
        redis
    }

    /// A hub on node A holding device `d1`.
    async fn holding_d1(server: &RedisServer) -> Hub {
        let redis = node(server, "A").await;
        let hub = Hub::new_cluster(redis.clone(), Limits::default(), None, Arc::new(SystemClock));
        assert!(redis.create_device(&record("d1")).await.expect("create"));
        assert!(hub.hold("d1", true).await.expect("held"));
        hub
    }

    /// A cross-node push is applied from its hint, without reading the inbox, when it is the
    /// next command the holder expects; a hint after a lost one, or a stale one, reads the
    /// inbox instead, so every command is applied once and in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_next_hinted_command_is_applied_without_reading_the_inbox() {
        use crate::hub::MessageRequest;
        let server = RedisServer::start().expect("redis-server starts");
        let a = holding_d1(&server).await;
        let b = Hub::new_cluster(
            node(&server, "B").await,
            Limits::default(),
            None,
            Arc::new(SystemClock),
        );
        let redis_a = a.link().expect("cluster mode").redis.clone();
        let mut raw = raw(&server);
        let mut lranges = || {
            let info: String = ::redis::cmd("INFO")
                .arg("commandstats")
                .query(&mut raw)
                .expect("info");
            info.lines()
                .find_map(|l| l.strip_prefix("cmdstat_lrange:calls="))
                .and_then(|l| l.split(',').next())
                .map_or(0, |n| n.parse::<u64>().expect("a count"))
        };
        let send = |id: &'static str| {
            b.send_message(MessageRequest {
                id: id.into(),
                device_ids: vec!["d1".into()],
                body: id.into(),
                ..Default::default()
            })
        };
        let queued = || -> Vec<String> {
            let device = a.device("d1").expect("held");
            let slot = device.lock();
            slot.core.outbox.values().map(|q| q.push.id.clone()).collect()
        };
        let command = |inbox: &Inbox, number: u64| {
            let first = inbox.last + 1 - inbox.commands.len() as u64;
            Some((number, inbox.commands[(number - first) as usize].clone()))
        };

        send("m1").await.expect("forwarded");
        let inbox = redis_a.inbox("d1").await.expect("inbox");
        assert_eq!(inbox.last, 1);
        let reads = lranges();
        a.take_hinted("d1", command(&inbox, 1)).await;
        assert_eq!(queued(), ["m1"]);
        assert_eq!(lranges(), reads, "applied from the hint: the inbox was not read");
        assert_eq!(
            redis_a.inbox("d1").await.expect("inbox").commands.len(),
            0,
            "trimmed"
        );

        // The hint for m2 is lost: m3's names a command after the one expected.
        send("m2").await.expect("forwarded");
        send("m3").await.expect("forwarded");
        let inbox = redis_a.inbox("d1").await.expect("inbox");
        let reads = lranges();
        a.take_hinted("d1", command(&inbox, 3)).await;
        assert_eq!(queued(), ["m1", "m2", "m3"], "both, in order");
        assert_eq!(lranges(), reads + 1, "the inbox was read");

        // m2's hint comes late: nothing is applied twice.
        a.take_hinted("d1", command(&inbox, 2)).await;
        assert_eq!(queued(), ["m1", "m2", "m3"]);
        assert_eq!(a.device("d1").expect("held").lock().inbox_next, Some(4));
    }

    /// Regression (a CI failure): while Redis restarted empty, a drain whose inbox read failed
    /// dropped the device, so the node's copy, by then the only one, was never written back and
    /// the phone's credential was refused ever after.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_inbox_unreadable_while_redis_restarts_empty_keeps_the_only_copy_of_the_device() {
        let mut server = RedisServer::start().expect("redis-server starts");
        let hub = holding_d1(&server).await;
        let link = hub.link().expect("cluster mode");

        server.kill();
        hub.drain("d1").await;
        assert!(
            hub.device("d1").is_some(),
            "an unread inbox changed nothing: the device stays"
        );
        assert!(
            link.redrain.load(std::sync::atomic::Ordering::Acquire),
            "read again later"
        );

        server.restart(false).expect("redis-server restarts empty");
        // The first requests after the restart may fail while the connection is re-made.
        for _ in 0..50 {
            hub.beat(link).await;
            if link.health.lock().redis_data_lost_ms != 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_ne!(link.health.lock().redis_data_lost_ms, 0, "the loss is noticed");
        let other = node(&server, "B").await;
        match other.claim("d1", true).await.expect("claim") {
            Claimed::Mine { state, .. } => assert_eq!(state.record.device_id, "d1"),
            _ => panic!("the device was written back to Redis"),
        }
    }

    /// Regression (found with Sentinel): a failover can lose a claim while the data and its
    /// epoch survive. Every write about the device then failed `LOST` and waited for a re-seed
    /// that only a new epoch starts, so the device stayed unreachable until its phone
    /// reconnected. Now the next heartbeat writes it back and lets it go.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lease_lost_while_the_data_survived_is_written_back_at_the_next_heartbeat() {
        use crate::hub::MessageRequest;
        let server = RedisServer::start().expect("redis-server starts");
        let hub = holding_d1(&server).await;
        let link = hub.link().expect("cluster mode");
        let send = |id: &str| {
            hub.send_message(MessageRequest {
                id: id.into(),
                device_ids: vec!["d1".into()],
                body: "hello".into(),
                ..Default::default()
            })
        };
        send("m1").await.expect("stored");

        let mut raw = raw(&server);
        let _: () = ::redis::cmd("DEL")
            .arg("lp:{d:d1}:lease")
            .query(&mut raw)
            .expect("lease deleted");
        assert!(send("m2").await.is_err(), "not stored without the lease");

        hub.beat(link).await;
        assert!(hub.device("d1").is_none(), "written back and let go");
        send("m3").await.expect("routed through the inbox once let go");
        let other = node(&server, "B").await;
        match other.claim("d1", true).await.expect("claim") {
            Claimed::Mine { state, inbox, .. } => {
                let queued: Vec<&str> = state.pushes.iter().map(|p| p.id.as_str()).collect();
                assert_eq!(queued, ["m1"], "the queue written back");
                assert_eq!(inbox.commands.len(), 1, "m3 waits in the inbox");
            }
            _ => panic!("the device is free to claim"),
        }
    }

    /// Regression (found at 100,000 sessions on 6 nodes): a release that began while a new
    /// session was between its claim and its login (the previous session's logout, a sweep)
    /// let the device go under that session: a live phone no node held, whose pushes waited in
    /// its inbox until they expired.
    #[tokio::test]
    async fn a_release_racing_a_login_never_lets_go_of_the_new_session() {
        use crate::hub::MessageRequest;
        let server = RedisServer::start().expect("redis-server starts");
        let hub = holding_d1(&server).await;
        let link = hub.link().expect("cluster mode");
        assert!(link.redis.create_device(&record("d2")).await.expect("create"));
        assert!(hub.hold("d2", true).await.expect("held"));

        let hold = hub.hold_for_session("d1").await.expect("held for the session");
        // Redis holds writes for a moment, so the release waits in its barrier.
        let mut raw = raw(&server);
        let _: () = ::redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(400)
            .arg("WRITE")
            .query(&mut raw)
            .expect("paused");
        let stalled = tokio::spawn({
            let hub = hub.clone();
            async move {
                hub.send_message(MessageRequest {
                    id: "m1".into(),
                    device_ids: vec!["d2".into()],
                    body: "hello".into(),
                    ..Default::default()
                })
                .await
            }
        });
        let release = tokio::spawn({
            let hub = hub.clone();
            async move { hub.release_if_idle("d1").await }
        });
        // One thread: each spawned task runs until it waits (for Redis, or for the lock).
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        let claims = crate::auth::DeviceClaims {
            sub: "d1".into(),
            generation: 1,
            iat: 0,
            exp: u64::MAX,
            aud: "lpush-device".into(),
        };
        let _login = hub
            .login(&claims, &push_proto::device::Hello::default())
            .expect("logged in");
        drop(hold);
        release.await.expect("release ran");
        stalled.await.expect("send ran").expect("sent");
        assert!(
            hub.device("d1").is_some(),
            "the device of a live session stays held"
        );
        let holders = link.redis.holders(&["d1".into()]).await.expect("holders");
        assert_eq!(holders, [Some("A".to_string())]);
    }
}
