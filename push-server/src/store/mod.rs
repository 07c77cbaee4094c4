//! Durable state behind one trait, so the embedded store (redb) and the coming Redis cluster
//! store are interchangeable.
//!
//! The store is a write-behind mirror of the hub's in-memory state: the hub decides, the store
//! remembers. Writes are batches of [`Op`]s applied atomically and durably; concurrent batches may
//! be group-committed (one fsync for many callers), which keeps the per-message cost low. The
//! embedded store makes a group durable with one append to its journal (`journal`) rather than a
//! durable redb commit; `redb_store` says what is durable when.
//!
//! # The contract
//!
//! Every backend keeps these promises; the hub relies on each of them, and `conformance` (tests)
//! checks each one against every backend.
//!
//! - **Atomic batches.** The ops of one `submit` are applied in their order, all or none: no read
//!   ever sees part of a batch, and after a crash a batch is stored whole or not at all.
//! - **Submission order.** Batches are applied in the order their `submit` calls happened (one
//!   order across all threads), whether or not anyone awaits them; a dropped receiver does not
//!   cancel its batch. So a caller that submits while holding a device's lock (`Hub::submit`)
//!   gets stored order = decision order: a receipt never lands before the push it is about, and
//!   a put, delete, put of one key leaves the last put.
//! - **Durable acknowledgement.** A batch's receiver resolves `Ok(())` only once the batch is
//!   durable (it survives a crash of the process or the machine). Batches may share a commit;
//!   each is still all-or-nothing and answered on its own.
//! - **Barrier.** An empty batch resolves only once every batch submitted before it has been
//!   answered, and each answered `Ok` is durable. `commit(store, vec![])` followed by a read is
//!   how to read one's own unawaited writes (`Hub::receipts` does).
//! - **Reads** see committed state only, each a consistent snapshot. They may lag batches that
//!   were submitted but not yet answered; wait for the batch, or a barrier, when a read must
//!   include it. [`Store::load`] returns the epoch, every device ordered by device id, every
//!   queued push ordered by `(device_id, seq)` (seq numerically) and every sequence ceiling
//!   ordered by device id; strings order by their bytes (Rust's `str` order) everywhere.
//! - **Errors.** A batch answered with an error left nothing of itself, and does not fail the
//!   batches committed with it (they are retried without it). Only an [`StoreError::Io`] of the
//!   commit itself leaves the outcome unknown, as any failed fsync does. A dropped reply (the
//!   writer died) means the same as [`StoreError::Closed`]; [`commit`] maps it so.
//! - **Close.** [`Store::close`] makes every batch submitted before it durable, then refuses:
//!   a later `submit` resolves `Err(StoreError::Closed)` at once. It is idempotent, and a
//!   concurrent `close` also returns only after the final commit. Dropping a backend closes it.
//! - **Epoch.** Chosen at random when the store is created: non-zero, below 2^53 (it must survive
//!   a double, like sequence numbers), and the same for as long as the stored data lives,
//!   reopening included. A store that may have lost acknowledged writes (restored from a backup,
//!   failed over without them, replaced) must get a new one, so that devices do not trust
//!   sequence numbers it may hand out again. See `device.proto`, "Epochs and the floor".
//! - **Record versions.** Records are stored as versioned rows (`rows`), so the public record
//!   types can gain fields and variants without making any stored row unreadable; rows written
//!   by older releases are migrated when the store opens. The records' serde derives are not
//!   the stored format.

#[cfg(test)]
mod conformance;
mod journal;
mod redb_store;
mod redis_conn;
mod redis_store;
mod rows;

pub use redb_store::RedbStore;
pub use redis_store::{Announcement, Claimed, DeviceState, Forwarded, Heard, Inbox, NodeInfo, RedisStore};

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

/// Why the store failed. Every variant is logged by the caller; none is retried blindly.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database file could not be opened (locked by another process, corrupt, wrong version).
    #[error("cannot open store at {path}: {detail}")]
    Open {
        /// Path of the database file.
        path: String,
        /// Underlying error, as text (the backends' error types differ).
        detail: String,
    },
    /// A read or write failed.
    #[error("store I/O failed: {0}")]
    Io(String),
    /// A stored record could not be decoded (written by an incompatible version, or corrupt).
    #[error("corrupt record in {table}: {detail}")]
    Corrupt {
        /// Table the record is in.
        table: &'static str,
        /// What failed.
        detail: String,
    },
    /// The store has been closed.
    #[error("store is closed")]
    Closed,
    /// Cluster mode: this node no longer holds the device (another node took it, or its lease
    /// was lost); nothing of the batch was applied.
    #[error("device {0} is held by another node")]
    Fenced(String),
    /// Cluster mode: this node's lease on the device (named) is gone: Redis lost its data
    /// (restarted empty, replaced), or a failover lost the claim. Nothing of the batch was
    /// applied; the node writes the device back from memory.
    #[error("redis lost the lease of device {0}")]
    Lost(String),
    /// Cluster mode: Redis cannot be reached or refused the request.
    #[error("redis: {0}")]
    Redis(String),
    /// The backend does not do this (named) at all.
    #[error("{0}")]
    Unsupported(&'static str),
}

/// A registered device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// Stable device id (the credential's subject).
    pub device_id: String,
    /// Groups the device belongs to ("ward:4B", "site:north").
    pub groups: Vec<String>,
    /// Unix ms when first registered.
    pub created_at_ms: i64,
    /// Credentials carry the generation current when issued; revoking bumps it, so every
    /// credential with a lower generation is rejected.
    pub credential_generation: u64,
    /// The device is revoked outright until a new credential is issued.
    pub revoked: bool,
    /// Unix ms of the last session activity (or of its end).
    pub last_seen_ms: i64,
    /// SSID reported by the last session.
    pub last_ssid: String,
    /// Why the last session ended.
    pub last_disconnect_reason: String,
    /// SDK version reported by the last session.
    pub sdk_version: String,
    /// PushKit token (lowercase hex) for the APNs VoIP fallback; empty when none is registered.
    pub voip_token: String,
    /// APNs refused `voip_token` for good (410 Unregistered, BadDeviceToken, ...); it is not used
    /// again until the device registers a new one.
    pub voip_token_invalid: bool,
    /// Generation of the server's CA when the device's last credential was issued (`pki`): its
    /// enrollment pinned that CA's key and the standby one, so it trusts the server only while
    /// the CA is at most one generation newer.
    pub ca_generation: u32,
}

/// What a queued push is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PushKind {
    /// A text message.
    Message,
    /// A call invite (lives only until its ring deadline).
    CallInvite,
    /// A call cancel.
    CallCancel,
}

impl PushKind {
    /// Its label in metrics, histories and listings.
    pub fn label(self) -> &'static str {
        match self {
            Self::Message => "message",
            Self::CallInvite => "call_invite",
            Self::CallCancel => "call_cancel",
        }
    }
}

/// A push waiting for one device, keyed by `(device_id, seq)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredPush {
    /// Recipient.
    pub device_id: String,
    /// Per-device sequence number.
    pub seq: u64,
    /// Message id or call id.
    pub id: String,
    /// Kind of the push.
    pub kind: PushKind,
    /// Collapse key of a message; empty for none.
    pub collapse_key: String,
    /// Unix ms after which the push is no longer delivered (TTL or ring deadline).
    pub expires_at_ms: i64,
    /// The `lpush.device.v1.Push` as encoded on the wire.
    pub encoded: Vec<u8>,
}

/// Delivery state of one push for one device, as reported to senders.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReceiptState {
    /// Stored, waiting for the device.
    Accepted,
    /// Written to the device's live session.
    Delivered,
    /// The device acknowledged it.
    Acked,
    /// TTL or ring deadline passed first.
    Expired,
    /// Will never be delivered.
    Undeliverable,
    /// Replaced by a newer message with the same collapse key.
    Superseded,
    /// The call was cancelled first.
    Cancelled,
    /// Calls: this callee answered first.
    Answered,
    /// Calls: the user declined on this callee.
    Declined,
    /// Calls: it rang, and nobody answered on it by the ring deadline.
    Missed,
}

impl ReceiptState {
    /// Its label in metrics, histories and listings.
    pub fn label(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Delivered => "delivered",
            Self::Acked => "acked",
            Self::Expired => "expired",
            Self::Undeliverable => "undeliverable",
            Self::Superseded => "superseded",
            Self::Cancelled => "cancelled",
            Self::Answered => "answered",
            Self::Declined => "declined",
            Self::Missed => "missed",
        }
    }

    /// Whether the push is settled: no further delivery change can follow. For a call invite,
    /// `Acked` (it rang) can still be followed by the callee's outcome: see [`Self::ends`].
    pub fn is_final(self) -> bool {
        !matches!(self, Self::Accepted | Self::Delivered)
    }

    /// Whether nothing can follow for a push of `kind`: for calls, `Acked` is not the end.
    pub fn ends(self, kind: PushKind) -> bool {
        self.is_final() && !(kind == PushKind::CallInvite && self == Self::Acked)
    }
}

/// Latest delivery state of push `id` for `device_id`, keyed by `(id, device_id)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// Message id or call id.
    pub id: String,
    /// Recipient.
    pub device_id: String,
    /// Current state.
    pub state: ReceiptState,
    /// Why, for the final states other than `Acked`.
    pub reason: String,
    /// Unix ms when this state was reached.
    pub at_ms: i64,
    /// Path that reached the device ("local"); empty when none did.
    pub path: String,
}

/// A sender API key, stored by the SHA-256 of the key (hex); the key itself is never stored.
///
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeyRecord {
    /// Human name ("nurse-call", "ops-dashboard").
    pub name: String,
    /// Granted scopes ("send", "call", "read", "enroll", "admin").
    pub scopes: Vec<String>,
    /// Unix ms of creation.
    pub created_at_ms: i64,
    /// Unix ms from which the key is refused; 0: it never expires.
    pub expires_at_ms: i64,
    /// Unix ms it was revoked; 0: not revoked. Revoked keys are kept so listings show them.
    pub revoked_at_ms: i64,
    /// For a key with the `enroll` scope: the only groups it may enroll devices into (fixed
    /// when the key is created, so the phone that carries the key cannot choose its groups).
    pub enroll_groups: Vec<String>,
}

impl ApiKeyRecord {
    /// A key that never expires and may enroll into no group.
    pub fn new(name: &str, scopes: Vec<String>, created_at_ms: i64) -> Self {
        Self {
            name: name.into(),
            scopes,
            created_at_ms,
            expires_at_ms: 0,
            revoked_at_ms: 0,
            enroll_groups: Vec::new(),
        }
    }
}

/// What a sender asked for under a caller-chosen id, so that a reuse of the id is recognised as
/// the same request (answered idempotently) or refused, whatever kind used the id first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// What the id names.
    pub kind: PushKind,
    /// SHA-256 of the request's content (recipients and payload), in the hub's canonical form.
    pub digest: Vec<u8>,
    /// Unix ms of the request.
    pub at_ms: i64,
    /// Unix ms after which none of its pushes can still be delivered (TTL or ring deadline).
    pub expires_at_ms: i64,
}

/// A call as the hub's call core keeps it (see `hub/calls.rs`): what rings, each escalation
/// step, each callee's outcome, and how the call ended. Stored after every decision, so a restart
/// mid-call resumes it (a step due meanwhile starts at once, a passed deadline ends it MISSED).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallRecord {
    /// The caller-chosen call id.
    pub call_id: String,
    /// The `lpush.device.v1.CallInvite` every callee gets, encoded.
    pub invite: Vec<u8>,
    /// Unix ms it was placed.
    pub placed_at_ms: i64,
    /// Unix ms it stops ringing, whatever happens.
    pub deadline_ms: i64,
    /// Step 0 is the call's own target, then the escalation plan, in order.
    pub steps: Vec<CallStepRecord>,
    /// Every device rung so far, by device id.
    pub callees: Vec<CalleeRecord>,
    /// How it ended; `None` while ringing.
    pub end: Option<CallEnd>,
    /// Unix ms the answered call hung up (the phone reported ENDED); 0 if not.
    pub hung_up_at_ms: i64,
}

/// One step of a call's escalation plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallStepRecord {
    /// Unix ms it rings, while nobody answered.
    pub due_ms: i64,
    /// Whether earlier steps stop ringing when it starts.
    pub stop_earlier: bool,
    /// Who it rings.
    pub device_ids: Vec<String>,
    /// Unix ms it rang; 0: not (yet).
    pub started_ms: i64,
}

/// One callee of a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CalleeRecord {
    /// The device.
    pub device_id: String,
    /// The step that rang it.
    pub step: u32,
    /// Its invite's sequence number; 0 until known (or held by another node).
    pub seq: u64,
    /// Its invite was queued (here or in its holder's inbox): until then a stop waits for the
    /// placement to come back, so it is never overtaken by the invite it stops.
    pub placed: bool,
    /// Its invite may have rung it (acknowledged, written to its session, or sent through APNs).
    pub rang: bool,
    /// Its final state for this call, with the time; `None` while it may still ring.
    pub outcome: Option<(ReceiptState, i64)>,
}

/// How a call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallEnd {
    /// `device_id` answered first, at `at_ms`.
    Answered {
        /// Who answered.
        device_id: String,
        /// When, Unix ms.
        at_ms: i64,
    },
    /// Every callee declined (or could not be rung), and no step was left.
    Declined {
        /// When, Unix ms.
        at_ms: i64,
    },
    /// Nobody answered by the ring deadline.
    Missed {
        /// When, Unix ms.
        at_ms: i64,
    },
    /// The caller cancelled it.
    Cancelled {
        /// When, Unix ms.
        at_ms: i64,
    },
}

impl CallEnd {
    /// When the call ended, Unix ms.
    pub fn at_ms(&self) -> i64 {
        match self {
            Self::Answered { at_ms, .. }
            | Self::Declined { at_ms }
            | Self::Missed { at_ms }
            | Self::Cancelled { at_ms } => *at_ms,
        }
    }
}

/// One change. A batch of ops is applied atomically, in order (a later op on a key wins).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Insert or replace a device.
    PutDevice(DeviceRecord),
    /// Insert or replace a queued push.
    PutPush(StoredPush),
    /// Remove a queued push (acked, expired, superseded, cancelled); absent is not an error.
    DeletePush {
        /// Recipient.
        device_id: String,
        /// Its sequence number.
        seq: u64,
    },
    /// Record that sequence numbers below `ceiling` may have been handed out for `device_id`.
    /// After a restart the device's next sequence starts at the ceiling, so a number is never
    /// reused even if the latest pushes were not yet stored when the process died.
    PutSeqCeiling {
        /// Device.
        device_id: String,
        /// Exclusive upper bound of sequence numbers handed out.
        ceiling: u64,
    },
    /// Insert or replace a receipt.
    PutReceipt(Receipt),
    /// Remove every receipt whose `at_ms` is below the bound and whose state is final, and every
    /// request that expired before it.
    PruneReceipts {
        /// Unix ms bound.
        before_ms: i64,
    },
    /// Record the request made under a caller-chosen id. Pruned by `PruneReceipts` once it
    /// expired before the bound.
    PutRequest {
        /// The caller-chosen id.
        id: String,
        /// What was asked.
        record: RequestRecord,
    },
    /// Insert or replace an API key by the hex SHA-256 of the key.
    PutApiKey {
        /// Hex SHA-256 of the key.
        hash: String,
        /// The key's record.
        record: ApiKeyRecord,
    },
    /// Insert or replace a call.
    PutCall(CallRecord),
    /// Remove a call; absent is not an error.
    DeleteCall {
        /// The call id.
        call_id: String,
    },
    /// Cluster mode: the first `count` commands of the device's inbox were applied (their
    /// outcome is in the same batch). The embedded store has no inbox and ignores it.
    TrimInbox {
        /// Device.
        device_id: String,
        /// Commands applied, from the oldest.
        count: usize,
    },
}

/// Everything needed to rebuild the hub at start-up, as [`Store::load`] returns it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The store's epoch: random, non-zero, below 2^53, chosen when the store was created (and
    /// anew whenever it is restored or loses writes). See `device.proto`, "Epochs and the floor".
    pub epoch: u64,
    /// Every device, ordered by device id.
    pub devices: Vec<DeviceRecord>,
    /// Every queued push, ordered by `(device_id, seq)`.
    pub pushes: Vec<StoredPush>,
    /// Sequence ceilings by device, ordered by device id.
    pub seq_ceilings: Vec<(String, u64)>,
    /// Every stored call, ordered by call id.
    pub calls: Vec<CallRecord>,
}

/// Durable storage, keeping the contract in the module documentation. Reads are synchronous
/// (they hit a local page cache or an in-process map) and see committed state only; writes are
/// submitted and acknowledged asynchronously so callers can batch.
pub trait Store: Send + Sync + 'static {
    /// Read everything needed to rebuild the hub: the epoch, devices and sequence ceilings
    /// ordered by device id, queued pushes ordered by `(device_id, seq)`. One consistent
    /// snapshot of committed state.
    fn load(&self) -> Result<Snapshot, StoreError>;
    /// Apply `ops` atomically and durably, after every batch submitted before (in any thread).
    /// The receiver resolves `Ok(())` once they are durable, or with the error that left none of
    /// them applied; `Err(Closed)` at once after [`Store::close`]. Dropping the receiver does not
    /// cancel the batch. An empty batch is a barrier: it resolves once every earlier batch has
    /// been answered. Batches may be committed together; each is still all-or-nothing.
    fn submit(&self, ops: Vec<Op>) -> oneshot::Receiver<Result<(), StoreError>>;
    /// Every committed receipt of push `id` (that exact id), ordered by device id.
    fn receipts(&self, id: &str) -> Result<Vec<Receipt>, StoreError>;
    /// The committed request recorded under caller-chosen `id`, if any.
    fn request(&self, id: &str) -> Result<Option<RequestRecord>, StoreError>;
    /// The committed API key record stored under `hash` (that exact hash).
    fn api_key(&self, hash: &str) -> Result<Option<ApiKeyRecord>, StoreError>;
    /// Every committed API key record with its hash, ordered by hash (for listings: callers show
    /// at most a short prefix of the hash).
    fn api_keys(&self) -> Result<Vec<(String, ApiKeyRecord)>, StoreError>;
    /// Write one consistent snapshot of the committed state (one read transaction) to a new
    /// embedded store file at `path`, for a backup. Writers go on meanwhile. Only the embedded
    /// store does it: a cluster's state is backed up with Redis's own tools (RDB, AOF).
    fn snapshot_to(&self, path: &std::path::Path) -> Result<(), StoreError> {
        let _ = path;
        Err(StoreError::Unsupported(
            "this store cannot write a snapshot: back up a cluster's Redis with its own tools (RDB, AOF)",
        ))
    }
    /// Make every batch submitted so far durable, then refuse further batches (`Closed`).
    /// Returns once that final commit is done, also when called concurrently. Idempotent.
    fn close(&self);
}

/// Submit `ops` and wait until they are durable.
pub async fn commit(store: &dyn Store, ops: Vec<Op>) -> Result<(), StoreError> {
    store.submit(ops).await.unwrap_or(Err(StoreError::Closed))
}
