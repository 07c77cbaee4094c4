//! Durable state behind one trait, so the embedded store (redb) and the coming Redis cluster
//! store are interchangeable.
//!
//! The store is a write-behind mirror of the hub's in-memory state: the hub decides, the store
//! remembers. Writes are batches of [`Op`]s applied atomically and durably; concurrent batches are
//! group-committed (one fsync for many callers), which keeps the per-message cost low.

mod redb_store;
mod rows;

pub use redb_store::RedbStore;

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

/// Why the store failed. Every variant is logged by the caller; none is retried blindly.
#[derive(Debug, thiserror::Error)]
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
}

impl ReceiptState {
    /// Whether no further change can follow.
    pub fn is_final(self) -> bool {
        !matches!(self, Self::Accepted | Self::Delivered)
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

/// One change. A batch of ops is applied atomically.
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
}

/// Everything needed to rebuild the hub at start-up.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The store's epoch: random, non-zero, below 2^53, chosen when the store was created (and
    /// anew whenever it is restored or loses writes). See `device.proto`, "Epochs and the floor".
    pub epoch: u64,
    /// Every device.
    pub devices: Vec<DeviceRecord>,
    /// Every queued push, ordered by `(device_id, seq)`.
    pub pushes: Vec<StoredPush>,
    /// Sequence ceilings by device.
    pub seq_ceilings: Vec<(String, u64)>,
}

/// Durable storage. Reads are synchronous (they hit a local page cache or an in-process map);
/// writes are submitted and acknowledged asynchronously so callers can batch.
pub trait Store: Send + Sync + 'static {
    /// Read everything needed to rebuild the hub.
    fn load(&self) -> Result<Snapshot, StoreError>;
    /// Apply `ops` atomically and durably. The returned receiver resolves once they are on disk.
    /// Batches submitted concurrently may be committed together; each is still all-or-nothing.
    fn submit(&self, ops: Vec<Op>) -> oneshot::Receiver<Result<(), StoreError>>;
    /// Every receipt of push `id`, ordered by device id.
    fn receipts(&self, id: &str) -> Result<Vec<Receipt>, StoreError>;
    /// The request recorded under caller-chosen `id`, if any.
    fn request(&self, id: &str) -> Result<Option<RequestRecord>, StoreError>;
    /// The API key record stored under `hash`.
    fn api_key(&self, hash: &str) -> Result<Option<ApiKeyRecord>, StoreError>;
    /// Every API key record with its hash, ordered by hash (for listings: callers show at most a
    /// short prefix of the hash).
    fn api_keys(&self) -> Result<Vec<(String, ApiKeyRecord)>, StoreError>;
    /// Commit everything submitted so far and stop accepting writes. Idempotent.
    fn close(&self);
}

/// Submit `ops` and wait until they are durable.
pub async fn commit(store: &dyn Store, ops: Vec<Op>) -> Result<(), StoreError> {
    store.submit(ops).await.unwrap_or(Err(StoreError::Closed))
}
