//! The cluster's [`Store`]: Redis holds devices, queues, sequence ceilings, receipts, requests and
//! API keys, plus what only a cluster needs: which node holds each device (a lease with a
//! fencing token), each device's inbox (commands from nodes that do not hold it), the nodes'
//! heartbeats, the sweep index of deadlines, and the pub/sub channels that carry hints,
//! receipts and presence between nodes.
//!
//! # Keys
//! Every per-device key shares the hash tag `{d:<id>}`, so one script touching a device touches
//! one Cluster slot:
//! - `lp:{d:ID}:rec` device record row; `lp:{d:ID}:q` hash seq -> push row; `lp:{d:ID}:ceil`
//!   sequence ceiling (only grows); `lp:{d:ID}:r:<push id>` receipt row (a key of its own so a
//!   final receipt can expire after the retention);
//! - `lp:{d:ID}:lease` `"<node>|<token>"`: the node holding the device; `lp:{d:ID}:fence` the
//!   counter tokens come from (it only grows, so a token is never reused);
//! - `lp:{d:ID}:inbox` list of opaque commands for whoever holds the device.
//!
//! Shared keys: `lp:epoch`, `lp:devices` (set of ids), `lp:g:<group>` (set of ids),
//! `lp:m:<push id>` (set of the devices a push went to, for `receipts(id)`), `lp:req:<id>`,
//! `lp:apikeys` (hash), `lp:node:<node>` (heartbeat, with a TTL), `lp:nodes` (set), `lp:due`
//! (sorted set: device -> earliest deadline of a device nobody holds).
//!
//! # Fencing
//! With fencing on, every batch of ops about a device runs as one Lua script that first checks
//! `lp:{d:ID}:lease == "<this node>|<token>"` for the token this store got when it claimed the
//! device; a node that lost the device (another node stole it, or Redis lost the lease) gets
//! [`StoreError::Fenced`] and nothing of the batch is applied. Without fencing (the conformance
//! suite, a single node) device ops apply unchecked.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::{
    ApiKeyRecord, DeviceRecord, Op, Receipt, RequestRecord, Snapshot, Store, StoreError, StoredPush,
};

/// A device as stored, loaded by the node that claims it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceState {
    pub record: DeviceRecord,
    /// Queued pushes, ordered by seq.
    pub pushes: Vec<StoredPush>,
    /// Sequence ceiling (1 when none is stored).
    pub ceiling: u64,
}

/// The answer to [`RedisStore::claim`].
#[derive(Debug)]
pub enum Claimed {
    /// No such device.
    Unknown,
    /// Another live node holds it (only when not stealing).
    Held {
        /// The node holding it.
        owner: String,
    },
    /// This node holds it now.
    Mine {
        /// The fencing token every later write about the device carries.
        token: u64,
        /// The node that held it before, if it was stolen from a node (told to let go).
        previous: Option<String>,
        /// The device's stored state.
        state: DeviceState,
        /// Commands waiting in its inbox, oldest first (trim them with `Op::TrimInbox` in the
        /// batch that applies their outcome).
        inbox: Vec<Vec<u8>>,
    },
}

/// The answer to [`RedisStore::forward`].
#[derive(Debug, PartialEq, Eq)]
pub enum Forwarded {
    /// In the device's inbox; `owner` is the node holding the device (hinted), if any.
    Queued { owner: Option<String> },
    /// No such device: nothing was written.
    Unknown,
    /// The device's queue and inbox hold `max_queued` items already: nothing was written.
    Full,
}

/// Something another node (or Redis) told this node, from pub/sub.
#[derive(Debug, Clone, PartialEq)]
pub enum Heard {
    /// A command was queued in the inbox of a device this node holds.
    Inbox(String),
    /// Another node took this device: let go of it (no write will succeed anyway).
    Kick(String),
    /// A receipt announced by any node (this one included).
    Receipt(Receipt),
    /// A presence event announced by any node, as encoded `lpush.sender.v1.PresenceEvent`.
    Presence(Vec<u8>),
    /// The subscription was re-established: hints may have been lost, re-check inboxes.
    Resubscribed,
}

/// One node's view of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub node: String,
    /// Its heartbeat has not expired.
    pub alive: bool,
}

/// The Redis store of one node.
pub struct RedisStore {}

impl RedisStore {
    /// Connect to `url` (`redis://host:port/db`) as node `node`; create the epoch if Redis has
    /// none. `fenced`: device ops need a claimed token (cluster mode).
    pub async fn connect(url: &str, node: &str, fenced: bool) -> Result<Arc<Self>, StoreError> {
        let _ = (url, node, fenced);
        todo!()
    }

    /// How long final receipts are kept.
    pub fn set_receipt_retention(&self, ms: u64) {
        let _ = ms;
        todo!()
    }

    /// This node's id.
    pub fn node(&self) -> &str {
        todo!()
    }

    /// The epoch this store was opened with. Redis may have been replaced since: see
    /// [`RedisStore::current_epoch`].
    pub fn epoch(&self) -> u64 {
        todo!()
    }

    /// The epoch Redis holds now (`None`: Redis lost it, so it came back empty).
    pub async fn current_epoch(&self) -> Result<Option<u64>, StoreError> {
        todo!()
    }

    /// Announce this node alive for `ttl_ms`.
    pub async fn heartbeat(&self, ttl_ms: u64) -> Result<(), StoreError> {
        let _ = ttl_ms;
        todo!()
    }

    /// Every node that ever sent a heartbeat, with whether it is alive.
    pub async fn nodes(&self) -> Result<Vec<NodeInfo>, StoreError> {
        todo!()
    }

    /// Hold `device_id` on this node. Without `steal`, fails with `Held` if a live node holds it.
    pub async fn claim(&self, device_id: &str, steal: bool) -> Result<Claimed, StoreError> {
        let _ = (device_id, steal);
        todo!()
    }

    /// Let go of `device_id` (if still held by this node). `earliest_deadline_ms`: the earliest
    /// deadline of its queue, so a sweeping node picks it up then (`None`: nothing queued).
    pub async fn release(
        &self,
        device_id: &str,
        earliest_deadline_ms: Option<i64>,
    ) -> Result<(), StoreError> {
        let _ = (device_id, earliest_deadline_ms);
        todo!()
    }

    /// Whether this store still holds a token for `device_id`.
    pub fn holds(&self, device_id: &str) -> bool {
        let _ = device_id;
        todo!()
    }

    /// Forget the token of `device_id` (the hub let go of it after a kick or a fenced write).
    pub fn forget(&self, device_id: &str) {
        let _ = device_id;
        todo!()
    }

    /// Put `command` in the inbox of a device this node does not hold, with the accepted
    /// receipt (`accepted`, written in the same script) and the item's deadline (`due_ms`, for
    /// the sweep); hint the holder. Refuses when the device's queue plus inbox hold
    /// `max_queued` items.
    pub async fn forward(
        &self,
        device_id: &str,
        command: Vec<u8>,
        accepted: Option<Receipt>,
        due_ms: i64,
        max_queued: usize,
    ) -> Result<Forwarded, StoreError> {
        let _ = (device_id, command, accepted, due_ms, max_queued);
        todo!()
    }

    /// The inbox of a device this node holds, oldest first.
    pub async fn inbox(&self, device_id: &str) -> Result<Vec<Vec<u8>>, StoreError> {
        let _ = device_id;
        todo!()
    }

    /// Up to `limit` devices nobody holds whose earliest deadline is at or before `now_ms`.
    pub async fn due(&self, now_ms: i64, limit: usize) -> Result<Vec<String>, StoreError> {
        let _ = (now_ms, limit);
        todo!()
    }

    /// The node holding each device (`None`: nobody), in order.
    pub async fn holders(&self, device_ids: &[String]) -> Result<Vec<Option<String>>, StoreError> {
        let _ = device_ids;
        todo!()
    }

    /// Every device record, ordered by id, with the number of queued pushes plus inbox items.
    pub async fn devices(&self) -> Result<Vec<(DeviceRecord, usize)>, StoreError> {
        todo!()
    }

    /// One device record, with its queued count.
    pub async fn device(&self, device_id: &str) -> Result<Option<(DeviceRecord, usize)>, StoreError> {
        let _ = device_id;
        todo!()
    }

    /// Register a new device (record written only if absent); false if it exists.
    pub async fn create_device(&self, record: &DeviceRecord) -> Result<bool, StoreError> {
        let _ = record;
        todo!()
    }

    /// Ids of the devices in `group`.
    pub async fn group_members(&self, group: &str) -> Result<Vec<String>, StoreError> {
        let _ = group;
        todo!()
    }

    /// Announce a receipt to every node (`Heard::Receipt`).
    pub async fn publish_receipt(&self, receipt: &Receipt) -> Result<(), StoreError> {
        let _ = receipt;
        todo!()
    }

    /// Announce an encoded presence event to every node (`Heard::Presence`).
    pub async fn publish_presence(&self, event: Vec<u8>) -> Result<(), StoreError> {
        let _ = event;
        todo!()
    }

    /// Start listening: hints for this node, receipts and presence of all nodes. Reconnects on
    /// its own (then sends `Resubscribed`). One call per store.
    pub fn subscribe(self: &Arc<Self>) -> mpsc::Receiver<Heard> {
        todo!()
    }
}

impl Store for RedisStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        todo!()
    }

    fn submit(&self, ops: Vec<Op>) -> oneshot::Receiver<Result<(), StoreError>> {
        let _ = ops;
        todo!()
    }

    fn receipts(&self, id: &str) -> Result<Vec<Receipt>, StoreError> {
        let _ = id;
        todo!()
    }

    fn request(&self, id: &str) -> Result<Option<RequestRecord>, StoreError> {
        let _ = id;
        todo!()
    }

    fn api_key(&self, hash: &str) -> Result<Option<ApiKeyRecord>, StoreError> {
        let _ = hash;
        todo!()
    }

    fn api_keys(&self) -> Result<Vec<(String, ApiKeyRecord)>, StoreError> {
        todo!()
    }

    fn close(&self) {
        todo!()
    }
}
