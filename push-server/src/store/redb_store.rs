//! Embedded [`Store`]: one redb file and its journal, written by a single group-committing
//! thread.
//!
//! redb allows one write transaction at a time, so all writes go through one thread that folds
//! whatever batches are queued into one transaction: under load, many callers share one commit
//! instead of queueing for one each.
//!
//! # What is durable when
//!
//! A durable redb commit (copy-on-write pages with checksums, then `fsync`) cost most of a
//! message's store time, and even a non-durable one (tree inserts, pages rewritten and
//! checksummed) costs several times a journal record, so a group is made durable by the journal
//! (`journal`) and reaches redb later, in bulk:
//!
//! 1. the group's ops (less those a later op of the group overwrites) are appended to
//!    `<db>.journal` as one record and `fdatasync`ed: from here the group survives a crash of
//!    the process or the machine, and its callers are answered;
//! 2. answered groups are applied to redb in one transaction with [`Durability::None`] every
//!    100 ms or 8,192 ops, and by any read first (`Unapplied`), so reads see every answered
//!    batch; a group with a prune is applied before it is answered (it can fail on a stored row).
//!
//! A checkpoint (the bulk apply, an empty commit with [`Durability::Immediate`], which persists
//! every commit before it, then emptying the journal) runs when the journal is `CHECKPOINT_AGE` old or
//! `CHECKPOINT_BYTES` long, and when the store closes. Opening the store finds redb at its last
//! checkpoint and replays the journal's whole records over it, in order, in one durable
//! transaction, then empties the journal; only then does it serve. A torn last record (its group
//! was never answered) is dropped; a damaged record followed by a valid one fails the open.
//! If the journal cannot be written, the group is aborted and answered [`StoreError::Io`].

use std::collections::HashSet;
use std::fmt::Display;
use std::path::Path;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use std::thread::JoinHandle;

use redb::{
    Database, Durability, Key, ReadTransaction, ReadableDatabase, ReadableTable, Table, TableDefinition,
    TableHandle, WriteTransaction,
};
use serde::de::DeserializeOwned;
use tokio::sync::oneshot;

use super::journal::{self, AppendError, Checkpoints, Journal};
use super::rows::{ApiKeyRow, ApiKeyV1, CallRow, DeviceRow, PushRow, ReceiptRow, RequestRow, Row};
use super::{ApiKeyRecord, Op, Receipt, RequestRecord, Snapshot, Store, StoreError};

// Values are postcard-encoded rows (see `rows`: one versioned enum per table, so records can
// gain fields without making stored rows unreadable). Keys mirror the records' identities so
// that range scans come out in the order callers need: pushes by (device, seq), receipts by
// (id, device). Statics rather than consts so that `name()` is `&'static str`, as
// `StoreError::Corrupt` needs.
//
// The `_v1`/`_v2` suffix marks the table where versioned rows started (a new row version is a
// new variant in the same table, not a new table). The unsuffixed tables hold the unversioned
// rows of earlier releases; they are migrated and emptied when the store opens.
/// Devices by id, values a [`DeviceRow`].
static DEVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("devices_v1");
/// Queued pushes by `(device_id, seq)`, values a [`PushRow`].
static PUSHES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("pushes_v1");
static SEQ_CEILINGS: TableDefinition<&str, u64> = TableDefinition::new("seq_ceilings");
/// Receipts by `(id, device_id)`, values a [`ReceiptRow`].
static RECEIPTS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("receipts_v1");
/// Requests by caller-chosen id, values a [`RequestRow`].
static REQUESTS: TableDefinition<&str, &[u8]> = TableDefinition::new("requests_v1");
/// API keys by hash, values an [`ApiKeyRow`].
static API_KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("api_keys_v2");
/// Calls by id, values a [`CallRow`].
static CALLS: TableDefinition<&str, &[u8]> = TableDefinition::new("calls_v1");
static LEGACY_DEVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("devices");
static LEGACY_PUSHES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("pushes");
static LEGACY_RECEIPTS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("receipts");
static LEGACY_REQUESTS: TableDefinition<&str, &[u8]> = TableDefinition::new("requests");
static LEGACY_API_KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("api_keys");
/// Facts about the store itself: its epoch (see `device.proto`, "Epochs and the floor").
static META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const EPOCH_KEY: &str = "epoch";

/// Most batches folded into one transaction, so that a flood of writers cannot grow a
/// transaction (and the wait of its first caller) without bound.
const MAX_GROUP: usize = 1024;

type Reply = oneshot::Sender<Result<(), StoreError>>;
type Batch = (Vec<Op>, Reply);

/// The embedded store: a redb database file plus the thread that writes it.
pub struct RedbStore {
    /// Shared with the writer thread; reads use it directly (redb reads run beside a write).
    db: Arc<Database>,
    /// Answered groups not yet applied to `db`; a read applies them first (see [`Unapplied`]).
    unapplied: Arc<Unapplied>,
    /// Queue to the writer; `None` once closed, so that late batches are refused, not lost.
    queue: Mutex<Option<mpsc::Sender<Batch>>>,
    /// Joined by `close`, so that a closed store has everything submitted on disk.
    writer: Mutex<Option<JoinHandle<()>>>,
    /// Groups committed by the writer, to show that batches really are grouped.
    #[cfg(test)]
    commits: Arc<std::sync::atomic::AtomicUsize>,
    /// Bulk applies of answered groups by the writer.
    #[cfg(test)]
    applies: Arc<std::sync::atomic::AtomicUsize>,
}

impl RedbStore {
    /// Open the database at `path`, creating it if missing, replay its journal (`<path>.journal`:
    /// the group commits since the last checkpoint), and start its writer thread.
    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        Self::open_with(path, Checkpoints::new(CHECKPOINT_BYTES, CHECKPOINT_AGE), BULK)
    }

    fn open_with(path: &Path, checkpoints: Checkpoints, bulk: Bulk) -> Result<RedbStore, StoreError> {
        let open_error = |source: &dyn Display| StoreError::Open {
            path: path.display().to_string(),
            detail: source.to_string(),
        };
        let journal_path = journal::path_of(path);
        // A journal with records beside no database holds only the last writes of a store whose
        // file is gone: replaying them alone would bring back a fragment of it.
        if !path.exists() && std::fs::metadata(&journal_path).is_ok_and(|m| m.len() > 0) {
            return Err(StoreError::Open {
                path: journal_path.display().to_string(),
                detail: format!(
                    "the journal holds writes but {} does not exist: move the journal away to \
                     start an empty store",
                    path.display()
                ),
            });
        }
        let db = Arc::new(Database::create(path).map_err(|e| open_error(&e))?);
        create_tables(&db).map_err(|e| open_error(&e))?;
        let journal = recover(&db, &journal_path)?;
        let unapplied = Arc::new(Unapplied::default());

        let writer = Writer {
            db: Arc::clone(&db),
            unapplied: Arc::clone(&unapplied),
            bulk,
            unapplied_ops: 0,
            unapplied_since: None,
            journal,
            checkpoints,
            broken: None,
            #[cfg(test)]
            commits: Arc::default(),
            #[cfg(test)]
            applies: Arc::default(),
        };
        #[cfg(test)]
        let (commits, applies) = (Arc::clone(&writer.commits), Arc::clone(&writer.applies));
        let (queue, batches) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer.run(&batches))
            .map_err(|e| open_error(&e))?;
        Ok(RedbStore {
            db,
            unapplied,
            queue: Mutex::new(Some(queue)),
            writer: Mutex::new(Some(thread)),
            #[cfg(test)]
            commits,
            #[cfg(test)]
            applies,
        })
    }
}

/// Replay the journal at `path` into `db` and empty it: every whole record, in order, in one
/// durable transaction. The database came back at its last durable commit, which may already
/// hold some of the records (a crash between a checkpoint's commit and its emptying of the
/// journal); replaying them again changes nothing, see [`Writer::checkpoint`]. A torn last
/// record is dropped: its batches were never answered.
fn recover(db: &Database, path: &Path) -> Result<Journal, StoreError> {
    let open_error = |detail: String| StoreError::Open {
        path: path.display().to_string(),
        detail,
    };
    let (mut journal, bytes) = Journal::open(path).map_err(|e| open_error(e.to_string()))?;
    if bytes.is_empty() {
        return Ok(journal);
    }
    let contents = journal::decode(&bytes).map_err(open_error)?;
    let txn = db.begin_write().map_err(|e| open_error(e.to_string()))?;
    {
        let mut tables = Tables::open(&txn).map_err(|e| open_error(e.to_string()))?;
        for (index, ops) in contents.groups.iter().enumerate() {
            for op in ops {
                tables
                    .apply(op)
                    .map_err(|e| open_error(format!("replaying record {index}: {e}")))?;
            }
        }
    }
    txn.commit().map_err(|e| open_error(e.to_string()))?;
    journal.clear().map_err(|e| open_error(e.to_string()))?;
    tracing::info!(
        records = contents.groups.len(),
        torn_tail_at = contents.torn_at,
        journal = %path.display(),
        "store journal replayed"
    );
    Ok(journal)
}

impl RedbStore {
    /// A read transaction that sees every answered batch: groups the writer answered but has
    /// not applied yet are applied first.
    fn read(&self) -> Result<ReadTransaction, StoreError> {
        let mut unapplied = self.unapplied.groups.lock();
        if !unapplied.is_empty() {
            apply_unapplied(&self.db, &mut unapplied)?;
        }
        // Begun under the lock, so no later apply can come between.
        self.db.begin_read().map_err(io)
    }

    /// Whether another process (a running server) has the database at `path` open. redb locks
    /// the file while it is open, so this is what a second server would run into.
    pub fn in_use(path: &Path) -> bool {
        matches!(
            Database::open(path),
            Err(redb::DatabaseError::DatabaseAlreadyOpen)
        )
    }

    /// Make the store file at `path` (a snapshot being restored) a store of its own: check that
    /// every row of every table decodes, then give it a new epoch, durably. A restored store has
    /// lost the writes made after its snapshot, so devices must not trust sequence numbers
    /// from the old epoch (`device.proto`, "Epochs and the floor"). Returns the new epoch.
    pub fn renew_epoch(path: &Path) -> Result<u64, StoreError> {
        let open_error = |source: &dyn Display| StoreError::Open {
            path: path.display().to_string(),
            detail: source.to_string(),
        };
        let db = Database::open(path).map_err(|e| open_error(&e))?;
        create_tables(&db).map_err(|e| open_error(&e))?;
        let txn = db.begin_read().map_err(io)?;
        read_all::<_, DeviceRow>(&txn, &DEVICES)?;
        read_all::<_, PushRow>(&txn, &PUSHES)?;
        read_all::<_, ReceiptRow>(&txn, &RECEIPTS)?;
        read_all::<_, RequestRow>(&txn, &REQUESTS)?;
        read_all::<_, ApiKeyRow>(&txn, &API_KEYS)?;
        read_all::<_, CallRow>(&txn, &CALLS)?;
        let old = txn
            .open_table(META)
            .map_err(io)?
            .get(EPOCH_KEY)
            .map_err(io)?
            .map(|v| v.value());
        drop(txn);
        let epoch = std::iter::repeat_with(new_epoch)
            .find(|e| Some(*e) != old)
            .unwrap_or(1);
        // A journal beside a snapshot is another store's: replayed over the snapshot, it would
        // bring back writes the restore is meant to roll back.
        let stale = journal::path_of(path);
        if stale.exists() {
            std::fs::remove_file(&stale).map_err(|e| open_error(&format!("{}: {e}", stale.display())))?;
        }
        let txn = db.begin_write().map_err(io)?;
        txn.open_table(META)
            .map_err(io)?
            .insert(EPOCH_KEY, epoch)
            .map_err(io)?;
        txn.commit().map_err(io)?;
        Ok(epoch)
    }
}

/// Copy every row of `table` from a read snapshot into a write transaction.
fn copy_table<K: Key + 'static, V: redb::Value + 'static>(
    from: &ReadTransaction,
    to: &WriteTransaction,
    table: TableDefinition<K, V>,
) -> Result<(), StoreError> {
    let source = from.open_table(table).map_err(io)?;
    let mut target = to.open_table(table).map_err(io)?;
    for entry in source.iter().map_err(io)? {
        let (key, value) = entry.map_err(io)?;
        target.insert(key.value(), value.value()).map_err(io)?;
    }
    Ok(())
}

/// Creates every table up front, so that reads of a fresh database find empty tables rather
/// than `TableDoesNotExist`, and migrates rows of earlier releases, all in one transaction (so
/// a crash during the migration leaves the old tables or the new ones, never half of each).
fn create_tables(db: &Database) -> Result<(), redb::Error> {
    let txn = db.begin_write()?;
    // Unversioned rows have exactly the layout of the first version of each row.
    migrate(&txn, LEGACY_DEVICES, DEVICES, DeviceRow::V1)?;
    migrate(&txn, LEGACY_PUSHES, PUSHES, PushRow::V1)?;
    migrate(&txn, LEGACY_RECEIPTS, RECEIPTS, ReceiptRow::V1)?;
    migrate(&txn, LEGACY_REQUESTS, REQUESTS, RequestRow::V1)?;
    migrate(
        &txn,
        LEGACY_API_KEYS,
        API_KEYS,
        <ApiKeyRow as From<ApiKeyV1>>::from,
    )?;
    txn.open_table(SEQ_CEILINGS)?;
    txn.open_table(CALLS)?;
    {
        let mut meta = txn.open_table(META)?;
        if meta.get(EPOCH_KEY)?.is_none() {
            meta.insert(EPOCH_KEY, new_epoch())?;
        }
    }
    txn.commit()?;
    Ok(())
}

/// Move the rows of `legacy` (each an unversioned `L`) into `current` as rows `R`, and empty
/// `legacy`. A row that cannot be decoded fails the open: silently dropping it would lose data,
/// and copying it would only postpone the error to a read.
fn migrate<K: Key + 'static, L: DeserializeOwned, R: Row>(
    txn: &WriteTransaction,
    legacy: TableDefinition<K, &[u8]>,
    current: TableDefinition<K, &[u8]>,
    upgrade: impl Fn(L) -> R,
) -> Result<(), redb::Error> {
    let mut rows = txn.open_table(current)?;
    let mut old = txn.open_table(legacy)?;
    let mut moved = 0usize;
    for entry in old.iter()? {
        let (key, value) = entry?;
        let row = postcard::from_bytes::<L>(value.value())
            .map(&upgrade)
            .map_err(|e| {
                redb::Error::Corrupted(format!("{}: a row cannot be decoded: {e}", legacy.name()))
            })?;
        let value = postcard::to_allocvec(&row)
            .map_err(|e| redb::Error::Corrupted(format!("{}: cannot encode: {e}", current.name())))?;
        rows.insert(key.value(), value.as_slice())?;
        moved += 1;
    }
    if moved > 0 {
        old.retain(|_, _| false)?;
        tracing::info!(
            rows = moved,
            from = legacy.name(),
            to = current.name(),
            "store rows migrated to the versioned format"
        );
    }
    Ok(())
}

/// A random non-zero epoch below 2^53 (it must survive a double, like sequence numbers).
pub(super) fn new_epoch() -> u64 {
    rand::random::<u64>() % ((1 << 53) - 1) + 1
}

impl Store for RedbStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        let txn = self.read()?;
        let seq_ceilings = txn.open_table(SEQ_CEILINGS).map_err(io)?;
        let epoch = txn
            .open_table(META)
            .map_err(io)?
            .get(EPOCH_KEY)
            .map_err(io)?
            .map(|v| v.value())
            .ok_or_else(|| StoreError::Corrupt {
                table: "meta",
                detail: "no epoch".into(),
            })?;
        Ok(Snapshot {
            epoch,
            devices: read_all::<_, DeviceRow>(&txn, &DEVICES)?,
            pushes: read_all::<_, PushRow>(&txn, &PUSHES)?,
            calls: read_all::<_, CallRow>(&txn, &CALLS)?,
            seq_ceilings: seq_ceilings
                .iter()
                .map_err(io)?
                .map(|entry| {
                    let (device, ceiling) = entry.map_err(io)?;
                    Ok((device.value().to_owned(), ceiling.value()))
                })
                .collect::<Result<_, StoreError>>()?,
        })
    }

    fn submit(&self, ops: Vec<Op>) -> oneshot::Receiver<Result<(), StoreError>> {
        let (reply, answer) = oneshot::channel();
        // Sent under the lock: the queue's order is the order of the `submit` calls, and the
        // writer applies and answers batches in queue order (the submission order and the
        // barrier of the `Store` contract).
        let refused = match self.queue.lock().as_ref() {
            // The send fails only if the writer thread died (it panicked).
            Some(queue) => queue
                .send((ops, reply))
                .err()
                .map(|mpsc::SendError((_, reply))| reply),
            None => Some(reply),
        };
        if let Some(reply) = refused {
            // The caller may have dropped its receiver already; nothing to tell then.
            let _ = reply.send(Err(StoreError::Closed));
        }
        answer
    }

    fn receipts(&self, id: &str) -> Result<Vec<Receipt>, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(RECEIPTS).map_err(io)?;
        let mut receipts = Vec::new();
        // ("id", "") is the smallest key of `id`; its keys are contiguous, so stop at the first
        // key of another id.
        for entry in table.range((id, "")..).map_err(io)? {
            let (key, value) = entry.map_err(io)?;
            if key.value().0 != id {
                break;
            }
            receipts.push(decode::<ReceiptRow>(&RECEIPTS, value.value())?);
        }
        Ok(receipts)
    }

    fn request(&self, id: &str) -> Result<Option<RequestRecord>, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(REQUESTS).map_err(io)?;
        let value = table.get(id).map_err(io)?;
        value
            .map(|value| decode::<RequestRow>(&REQUESTS, value.value()))
            .transpose()
    }

    fn api_key(&self, hash: &str) -> Result<Option<ApiKeyRecord>, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(API_KEYS).map_err(io)?;
        let value = table.get(hash).map_err(io)?;
        value
            .map(|value| decode::<ApiKeyRow>(&API_KEYS, value.value()))
            .transpose()
    }

    fn api_keys(&self) -> Result<Vec<(String, ApiKeyRecord)>, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(API_KEYS).map_err(io)?;
        let entries = table.iter().map_err(io)?;
        entries
            .map(|entry| {
                let (hash, value) = entry.map_err(io)?;
                Ok((
                    hash.value().to_owned(),
                    decode::<ApiKeyRow>(&API_KEYS, value.value())?,
                ))
            })
            .collect()
    }

    fn snapshot_to(&self, path: &Path) -> Result<(), StoreError> {
        let open_error = |source: &dyn Display| StoreError::Open {
            path: path.display().to_string(),
            detail: source.to_string(),
        };
        // One read transaction: every table as of one commit, however the writer goes on.
        let from = self.read()?;
        let copy = Database::create(path).map_err(|e| open_error(&e))?;
        create_tables(&copy).map_err(|e| open_error(&e))?;
        let to = copy.begin_write().map_err(io)?;
        copy_table(&from, &to, DEVICES)?;
        copy_table(&from, &to, PUSHES)?;
        copy_table(&from, &to, SEQ_CEILINGS)?;
        copy_table(&from, &to, RECEIPTS)?;
        copy_table(&from, &to, REQUESTS)?;
        copy_table(&from, &to, API_KEYS)?;
        copy_table(&from, &to, CALLS)?;
        copy_table(&from, &to, META)?;
        to.commit().map_err(io)
    }

    fn close(&self) {
        // Dropping the only sender ends the writer once it has drained the queue.
        drop(self.queue.lock().take());
        // Joining under the lock makes a concurrent `close` wait for the final commit too.
        let mut writer = self.writer.lock();
        if let Some(thread) = writer.take()
            && thread.join().is_err()
        {
            tracing::error!("store writer thread panicked; batches it held were answered `Closed`");
        }
    }
}

impl Drop for RedbStore {
    fn drop(&mut self) {
        self.close();
    }
}

/// Every record of a table whose values are postcard-encoded `R`s, in key order.
fn read_all<K: Key + 'static, R: Row>(
    txn: &ReadTransaction,
    definition: &'static TableDefinition<'static, K, &'static [u8]>,
) -> Result<Vec<R::Record>, StoreError> {
    let table = txn.open_table(*definition).map_err(io)?;
    let entries = table.iter().map_err(io)?;
    entries
        .map(|entry| {
            let (_, value) = entry.map_err(io)?;
            decode::<R>(definition, value.value())
        })
        .collect()
}

/// Groups the writer answered (durable in the journal) but has not applied to the database yet.
///
/// Applying a group to redb (tree inserts, then a commit that rewrites and checksums every page
/// it touched) costs several times writing its journal record, so answered groups are applied
/// in bulk: once enough have gathered or a while after the first ([`BULK`]), before a
/// checkpoint or a group that must be applied at once, and whenever a read comes (a read must
/// see every answered batch, so it applies them itself). In bulk, what a later group overwrites
/// is skipped ([`superseded`]): a push stored, delivered, acked and deleted between two bulk
/// applies never reaches the tree.
///
/// Every write transaction after the open is begun under this lock, the writer's and a
/// reader's alike: that orders them, and the lock order is lock, then transaction, everywhere.
#[derive(Default)]
struct Unapplied {
    groups: Mutex<Vec<Vec<Op>>>,
}

/// Apply `groups` (answered, in answer order) to `db` in one non-durable transaction and
/// forget them; on an error they stay, for the next try. Their durability is the journal's.
fn apply_unapplied(db: &Database, groups: &mut Vec<Vec<Op>>) -> Result<(), StoreError> {
    let mut txn = db.begin_write().map_err(io)?;
    txn.set_durability(Durability::None).map_err(io)?;
    let applied = (|| {
        let mut tables = Tables::open(&txn).map_err(io)?;
        let batches: Vec<&[Op]> = groups.iter().map(Vec::as_slice).collect();
        let skip = superseded(&batches);
        for (index, ops) in batches.iter().enumerate() {
            for (i, op) in ops.iter().enumerate() {
                if !skip.contains(&(index, i)) {
                    tables.apply(op)?;
                }
            }
        }
        Ok::<_, StoreError>(())
    })();
    if let Err(error) = applied {
        if let Err(abort) = txn.abort() {
            tracing::warn!(error = %abort, "aborting a failed store transaction failed");
        }
        return Err(error);
    }
    txn.commit().map_err(io)?;
    groups.clear();
    Ok(())
}

/// Ops that are applied to the database before their group is answered, not in bulk later:
/// a prune reads what it removes, and an undecodable row fails its batch (see `Tables::apply`),
/// which must be known before the batch is answered.
fn applied_at_once(op: &Op) -> bool {
    matches!(op, Op::PruneReceipts { .. })
}

/// When the writer applies answered groups to the database: once `ops` ops have gathered, or
/// `age` after the first of them.
#[derive(Debug, Clone, Copy)]
struct Bulk {
    ops: usize,
    age: Duration,
}

/// 100 ms bounds the work a read may find to do and how long the writer holds answered groups
/// in memory; 8,192 ops (about 2,700 messages' pushes and receipts) bound it under load.
const BULK: Bulk = Bulk {
    ops: 8192,
    age: Duration::from_millis(100),
};

/// The writer thread's state.
struct Writer {
    db: Arc<Database>,
    unapplied: Arc<Unapplied>,
    bulk: Bulk,
    /// Ops answered since the writer last applied them, and when the first was answered.
    unapplied_ops: usize,
    unapplied_since: Option<Instant>,
    journal: Journal,
    checkpoints: Checkpoints,
    /// Set when the writer can no longer tell what is durable (a commit failed after its record
    /// was journaled, or a failed append could not be cut off): every later batch is refused
    /// with this, until the store is reopened (which replays the journal).
    broken: Option<String>,
    #[cfg(test)]
    commits: Arc<std::sync::atomic::AtomicUsize>,
    #[cfg(test)]
    applies: Arc<std::sync::atomic::AtomicUsize>,
}

/// Why a group could not be committed.
enum Failure {
    /// Batch `.0` of the group failed (e.g. a corrupt record); the other batches may be fine.
    Batch(usize, StoreError),
    /// The transaction itself failed: the outcome of the group is unknown.
    Transaction(String),
}

impl Failure {
    fn transaction(error: impl Display) -> Self {
        Failure::Transaction(error.to_string())
    }
}

/// The writer's nice value. Pushes go out before their commit; a commit only gates the
/// sender's answer. When sessions and the writer want the same core, the sessions go first.
const WRITER_NICE: libc::c_int = 5;

/// A checkpoint falls due once the journal holds this much. It bounds the replay at open (a few
/// MiB decode and apply in well under a second) and redb's memory of the pages that its
/// non-durable commits freed (it can reuse them only after a durable commit).
const CHECKPOINT_BYTES: u64 = 4 << 20;
/// ... or once its oldest record is this old. A checkpoint costs one durable redb commit (about
/// what every group cost before the journal), so once a second is noise next to a thousand
/// groups a second, and an idle server's journal is empty a second after its last write.
const CHECKPOINT_AGE: Duration = Duration::from_secs(1);

/// Lower the calling thread's CPU priority (on Linux, `PRIO_PROCESS` with `who = 0` is the
/// calling thread). Failing to is harmless: the writer just competes as an equal.
fn lower_priority() {
    // SAFETY: setpriority reads no memory of ours; it only changes the thread's nice value.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, WRITER_NICE) } != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "store writer priority unchanged");
    }
}

impl Writer {
    /// Commits groups until `close` drops the queue's sender, checkpointing when one is due.
    /// `recv` reports the end only once the queue is empty, so every batch submitted before
    /// `close` is committed; a last checkpoint then leaves the journal empty.
    fn run(mut self, batches: &mpsc::Receiver<Batch>) {
        lower_priority();
        loop {
            let apply_at = self.unapplied_since.map(|since| since + self.bulk.age);
            let first = match self.checkpoints.deadline().into_iter().chain(apply_at).min() {
                None => batches.recv().ok(),
                Some(deadline) => {
                    match batches.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                        Ok(batch) => Some(batch),
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            let now = Instant::now();
                            if self.checkpoints.due(self.journal.len(), now) {
                                self.checkpoint();
                            } else {
                                self.apply();
                            }
                            continue;
                        }
                        Err(mpsc::RecvTimeoutError::Disconnected) => None,
                    }
                }
            };
            let Some(first) = first else { break };
            let mut group = vec![first];
            group.extend(batches.try_iter().take(MAX_GROUP - 1));
            self.commit_group(group);
            if self.checkpoints.due(self.journal.len(), Instant::now()) {
                self.checkpoint();
            } else if self.unapplied_ops >= self.bulk.ops {
                self.apply();
            }
        }
        if self.checkpoints.deadline().is_some() {
            self.checkpoint();
        }
    }

    /// Make every commit since the last checkpoint durable in redb, then empty the journal.
    ///
    /// An empty durable commit persists every non-durable one before it. A crash between that
    /// commit and the journal's emptying leaves records that the database already holds, and
    /// the next open replays them over it; that gives the same state as replaying them over the
    /// state before them, because every op is a blind write of one key (a put or delete: its
    /// last write in the journal decides the key, whatever was there), or a prune, which only
    /// drops final receipts and requests older than the bound it carries (never the clock):
    /// applying the same prunes again drops nothing more, and a key that a later put wrote is
    /// decided by that put and the prunes after it, as the first time.
    ///
    /// A broken writer does not checkpoint (its redb state may lack a journaled group, which
    /// the next open replays); it only puts the next try off.
    fn checkpoint(&mut self) {
        self.apply();
        if self.broken.is_some() {
            self.checkpoints.finished(false, Instant::now());
            return;
        }
        // `Immediate` is a write transaction's default durability.
        let durable = |db: &Database| -> Result<(), redb::Error> { Ok(db.begin_write()?.commit()?) };
        let made = durable(&self.db).map_err(|e| e.to_string()).and_then(|()| {
            self.journal
                .clear()
                .map_err(|e| format!("emptying the journal: {e}"))
        });
        if let Err(error) = &made {
            tracing::error!(%error, "store checkpoint failed; the journal keeps the commits");
        }
        self.checkpoints.finished(made.is_ok(), Instant::now());
    }

    /// Commits `group` in one transaction and answers every caller. A batch that fails is
    /// answered with its error and the transaction is redone without it: a bad batch costs the
    /// others a retry, never their data. Every batch of the group is answered before the next
    /// group is taken, and only after its journal record was synced, so an empty batch is
    /// answered only once all earlier ones are durable: that is the barrier.
    fn commit_group(&mut self, mut group: Vec<Batch>) {
        while !group.is_empty() {
            // Receivers may have been dropped; their callers no longer want the answer.
            let started = Instant::now();
            let result = self.write(&mut group);
            crate::metrics::store_commit(
                !matches!(result, Err(Failure::Transaction(_))),
                started.elapsed().as_secs_f64(),
            );
            match result {
                Ok(()) => {
                    for (_, reply) in group.drain(..) {
                        let _ = reply.send(Ok(()));
                    }
                }
                // Logged here because callers that do not wait (session-side writes) drop the reply.
                Err(Failure::Batch(index, error)) => {
                    tracing::error!(error = %error, "store batch rejected");
                    let (_, reply) = group.remove(index);
                    let _ = reply.send(Err(error));
                }
                Err(Failure::Transaction(detail)) => {
                    tracing::error!(error = %detail, batches = group.len(), "store commit failed");
                    for (_, reply) in group.drain(..) {
                        let _ = reply.send(Err(StoreError::Io(detail.clone())));
                    }
                }
            }
        }
    }

    /// Applies every batch of `group` in one transaction, or none of them: the ops are applied
    /// to redb without durability, journaled and synced, and only then committed (which shows
    /// them to reads). A crash before the sync loses the group, unanswered; after it, the next
    /// open replays it.
    fn write(&mut self, group: &mut [Batch]) -> Result<(), Failure> {
        if let Some(detail) = &self.broken {
            return Err(Failure::Transaction(detail.clone()));
        }
        if group.iter().any(|(ops, _)| ops.iter().any(applied_at_once)) {
            return self.write_at_once(group);
        }
        let skip = {
            let batches: Vec<&[Op]> = group.iter().map(|(ops, _)| ops.as_slice()).collect();
            superseded(&batches)
        };
        // Moved out, not copied: past this point the group is either answered `Ok` or failed
        // whole (a journal error), never retried without a batch.
        let ops: Vec<Op> = group
            .iter_mut()
            .enumerate()
            .flat_map(|(index, (ops, _))| {
                std::mem::take(ops)
                    .into_iter()
                    .enumerate()
                    .map(move |(i, op)| ((index, i), op))
            })
            .filter(|(at, _)| !skip.contains(at))
            .map(|(_, op)| op)
            .collect();
        // A group of barriers: answered now, after every group before it.
        if ops.is_empty() {
            return Ok(());
        }
        let record = journal::encode(&ops).map_err(Failure::Transaction)?;
        self.append(&record)?;
        self.unapplied_ops += ops.len();
        self.unapplied_since.get_or_insert_with(Instant::now);
        self.unapplied.groups.lock().push(ops);
        #[cfg(test)]
        self.commits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Append `record` to the journal and sync it; on failure the record is cut off again (or
    /// the writer is broken, when it cannot be).
    fn append(&mut self, record: &[u8]) -> Result<(), Failure> {
        match self.journal.append(record) {
            Ok(()) => {
                self.checkpoints.appended(Instant::now());
                Ok(())
            }
            Err(AppendError::Failed(error)) => Err(Failure::Transaction(format!("journal: {error}"))),
            Err(AppendError::Broken(detail)) => Err(self.break_down(format!("journal: {detail}"))),
        }
    }

    /// Apply the answered groups to the database now (see [`Unapplied`]).
    fn apply(&mut self) {
        self.unapplied_ops = 0;
        self.unapplied_since = None;
        let unapplied = Arc::clone(&self.unapplied);
        let mut groups = unapplied.groups.lock();
        if groups.is_empty() || self.broken.is_some() {
            return;
        }
        match apply_unapplied(&self.db, &mut groups) {
            #[cfg(test)]
            Ok(()) => {
                self.applies.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            #[cfg(not(test))]
            Ok(()) => {}
            Err(error) => {
                drop(groups);
                tracing::error!(%error, "applying answered store groups failed; the journal keeps them");
                self.break_down(format!("applying answered groups: {error}"));
            }
        }
    }

    /// [`Writer::write`] for a group with an op of [`applied_at_once`]: after the answered
    /// groups, applied to redb without durability, journaled and synced, and only then
    /// committed (which shows it to reads). A batch that fails is reported before anything of
    /// the group is journaled.
    fn write_at_once(&mut self, group: &[Batch]) -> Result<(), Failure> {
        self.apply();
        if let Some(detail) = &self.broken {
            return Err(Failure::Transaction(detail.clone()));
        }
        let unapplied = Arc::clone(&self.unapplied);
        // Held until the commit: no reader's apply can come between (none is pending anyway).
        let _order = unapplied.groups.lock();
        let mut txn = self.db.begin_write().map_err(Failure::transaction)?;
        txn.set_durability(Durability::None)
            .map_err(Failure::transaction)?;
        let record = match apply_group(&txn, group) {
            Ok(applied) => applied,
            Err(failure) => {
                if let Err(error) = txn.abort() {
                    tracing::warn!(%error, "aborting a failed store transaction failed");
                }
                return Err(failure);
            }
        };
        if let Some(record) = record
            && let Err(failure) = self.append(&record)
        {
            if let Err(error) = txn.abort() {
                tracing::warn!(%error, "aborting a store transaction failed");
            }
            return Err(failure);
        }
        // The group is durable in the journal: failing to show it now would make reads disagree
        // with what the next open replays.
        txn.commit()
            .map_err(|error| self.break_down(format!("commit after journaling: {error}")))?;
        #[cfg(test)]
        self.commits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    fn break_down(&mut self, detail: String) -> Failure {
        let detail = format!("{detail}; the store refuses writes until it is reopened");
        self.broken = Some(detail.clone());
        Failure::Transaction(detail)
    }
}

/// Applies the ops of `group` that a later op of the group does not supersede, and returns the
/// journal record of those ops (`None` when there are none: a group of barriers).
fn apply_group(txn: &WriteTransaction, group: &[Batch]) -> Result<Option<Vec<u8>>, Failure> {
    let mut tables = Tables::open(txn).map_err(Failure::transaction)?;
    let batches: Vec<&[Op]> = group.iter().map(|(ops, _)| ops.as_slice()).collect();
    let skip = superseded(&batches);
    let mut applied = Vec::new();
    for (index, (ops, _)) in group.iter().enumerate() {
        for (i, op) in ops.iter().enumerate() {
            if skip.contains(&(index, i)) {
                continue;
            }
            tables.apply(op).map_err(|error| Failure::Batch(index, error))?;
            applied.push(op);
        }
    }
    if applied.is_empty() {
        return Ok(None);
    }
    journal::encode(applied).map(Some).map_err(Failure::Transaction)
}

/// The key an op writes, for [`superseded`]; `None` for ops that are not a write of one key.
#[derive(PartialEq, Eq, Hash)]
enum OpKey<'a> {
    Device(&'a str),
    Push(&'a str, u64),
    Ceiling(&'a str),
    Receipt(&'a str, &'a str),
    ApiKey(&'a str),
    Request(&'a str),
    Call(&'a str),
}

fn op_key(op: &Op) -> Option<OpKey<'_>> {
    Some(match op {
        Op::PutDevice(d) => OpKey::Device(&d.device_id),
        Op::PutPush(p) => OpKey::Push(&p.device_id, p.seq),
        Op::DeletePush { device_id, seq } => OpKey::Push(device_id, *seq),
        Op::PutSeqCeiling { device_id, .. } => OpKey::Ceiling(device_id),
        Op::PutReceipt(r) => OpKey::Receipt(&r.id, &r.device_id),
        Op::PutApiKey { hash, .. } => OpKey::ApiKey(hash),
        Op::PutRequest { id, .. } => OpKey::Request(id),
        Op::PutCall(c) => OpKey::Call(&c.call_id),
        Op::DeleteCall { call_id } => OpKey::Call(call_id),
        Op::PruneReceipts { .. } | Op::TrimInbox { .. } => return None,
    })
}

/// Ops (batch index, op index) that a later put or delete of the same key in the same group
/// overwrites. The group is one transaction, so skipping them leaves exactly the state that
/// applying everything in order would: under load a push's whole life (stored, receipts
/// accepted, delivered and acked, deleted) often falls into one group commit and costs one
/// receipt write and one delete instead of five writes. A prune only removes keys, so a later
/// write of a key still decides its state. If a batch fails, the group is retried without it
/// and this is computed afresh.
fn superseded(group: &[&[Op]]) -> HashSet<(usize, usize)> {
    let mut later = HashSet::new();
    let mut skip = HashSet::new();
    for (index, ops) in group.iter().enumerate().rev() {
        for (i, op) in ops.iter().enumerate().rev() {
            if let Some(key) = op_key(op)
                && !later.insert(key)
            {
                skip.insert((index, i));
            }
        }
    }
    skip
}

/// The tables of one write transaction, opened once per group rather than once per op.
struct Tables<'txn> {
    devices: Table<'txn, &'static str, &'static [u8]>,
    pushes: Table<'txn, (&'static str, u64), &'static [u8]>,
    seq_ceilings: Table<'txn, &'static str, u64>,
    receipts: Table<'txn, (&'static str, &'static str), &'static [u8]>,
    api_keys: Table<'txn, &'static str, &'static [u8]>,
    requests: Table<'txn, &'static str, &'static [u8]>,
    calls: Table<'txn, &'static str, &'static [u8]>,
}

impl<'txn> Tables<'txn> {
    fn open(txn: &'txn WriteTransaction) -> Result<Self, redb::TableError> {
        Ok(Tables {
            devices: txn.open_table(DEVICES)?,
            pushes: txn.open_table(PUSHES)?,
            seq_ceilings: txn.open_table(SEQ_CEILINGS)?,
            receipts: txn.open_table(RECEIPTS)?,
            api_keys: txn.open_table(API_KEYS)?,
            requests: txn.open_table(REQUESTS)?,
            calls: txn.open_table(CALLS)?,
        })
    }

    fn apply(&mut self, op: &Op) -> Result<(), StoreError> {
        match op {
            Op::PutDevice(device) => {
                let value = encode::<DeviceRow>(&DEVICES, device)?;
                self.devices
                    .insert(device.device_id.as_str(), value.as_slice())
                    .map_err(io)?;
            }
            Op::PutPush(push) => {
                let value = encode::<PushRow>(&PUSHES, push)?;
                self.pushes
                    .insert((push.device_id.as_str(), push.seq), value.as_slice())
                    .map_err(io)?;
            }
            Op::DeletePush { device_id, seq } => {
                self.pushes.remove((device_id.as_str(), *seq)).map_err(io)?;
            }
            Op::PutSeqCeiling { device_id, ceiling } => {
                self.seq_ceilings
                    .insert(device_id.as_str(), *ceiling)
                    .map_err(io)?;
            }
            Op::PutReceipt(receipt) => {
                let value = encode::<ReceiptRow>(&RECEIPTS, receipt)?;
                let key = (receipt.id.as_str(), receipt.device_id.as_str());
                self.receipts.insert(key, value.as_slice()).map_err(io)?;
            }
            Op::PruneReceipts { before_ms } => {
                // A full scan: receipts are keyed by id, not time. An undecodable receipt is
                // kept (its age is unknown) and fails the batch, so that it gets noticed.
                let mut corrupt = None;
                self.receipts
                    .retain(|_, value| match decode::<ReceiptRow>(&RECEIPTS, value) {
                        Ok(receipt) => receipt.at_ms >= *before_ms || !receipt.state.is_final(),
                        Err(error) => {
                            corrupt.get_or_insert(error);
                            true
                        }
                    })
                    .map_err(io)?;
                if let Some(error) = corrupt {
                    return Err(error);
                }
                // A request is forgotten once every push it made is past the bound (its receipts
                // are final by then, and pruned with it); an undecodable one is kept, as above.
                let mut corrupt = None;
                self.requests
                    .retain(|_, value| match decode::<RequestRow>(&REQUESTS, value) {
                        Ok(request) => request.expires_at_ms >= *before_ms,
                        Err(error) => {
                            corrupt.get_or_insert(error);
                            true
                        }
                    })
                    .map_err(io)?;
                if let Some(error) = corrupt {
                    return Err(error);
                }
            }
            Op::PutApiKey { hash, record } => {
                let value = encode::<ApiKeyRow>(&API_KEYS, record)?;
                self.api_keys
                    .insert(hash.as_str(), value.as_slice())
                    .map_err(io)?;
            }
            Op::PutRequest { id, record } => {
                let value = encode::<RequestRow>(&REQUESTS, record)?;
                self.requests.insert(id.as_str(), value.as_slice()).map_err(io)?;
            }
            Op::PutCall(call) => {
                let value = encode::<CallRow>(&CALLS, call)?;
                self.calls
                    .insert(call.call_id.as_str(), value.as_slice())
                    .map_err(io)?;
            }
            Op::DeleteCall { call_id } => {
                self.calls.remove(call_id.as_str()).map_err(io)?;
            }
            // No inbox here: only cluster nodes forward commands.
            Op::TrimInbox { .. } => {}
        }
        Ok(())
    }
}

/// The newest row for `record`, encoded.
fn encode<R: Row>(table: &'static impl TableHandle, record: &R::Record) -> Result<Vec<u8>, StoreError> {
    postcard::to_allocvec(&R::from_record(record))
        .map_err(|error| StoreError::Io(format!("cannot encode a record for {}: {error}", table.name())))
}

/// The record of a row of any version.
fn decode<R: Row>(table: &'static impl TableHandle, bytes: &[u8]) -> Result<R::Record, StoreError> {
    postcard::from_bytes::<R>(bytes)
        .map(Row::into_record)
        .map_err(|error| StoreError::Corrupt {
            table: table.name(),
            detail: error.to_string(),
        })
}

fn io(error: impl Display) -> StoreError {
    StoreError::Io(error.to_string())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use redb::ReadableTableMetadata;

    use super::*;
    use crate::store::{DeviceRecord, PushKind, ReceiptState, StoredPush, commit};

    fn device(id: &str) -> DeviceRecord {
        DeviceRecord {
            device_id: id.into(),
            groups: vec!["ward:4B".into()],
            created_at_ms: 1,
            credential_generation: 2,
            revoked: false,
            last_seen_ms: 3,
            last_ssid: "hospital".into(),
            last_disconnect_reason: "idle".into(),
            sdk_version: "1.0".into(),
            voip_token: "ab".repeat(32),
            voip_token_invalid: true,
            ca_generation: 0,
        }
    }

    fn push(device_id: &str, seq: u64) -> StoredPush {
        StoredPush {
            device_id: device_id.into(),
            seq,
            id: format!("m{seq}"),
            kind: PushKind::Message,
            collapse_key: String::new(),
            expires_at_ms: 99,
            encoded: vec![1, 2, seq as u8],
        }
    }

    fn receipt(id: &str, device_id: &str, state: ReceiptState, at_ms: i64) -> Receipt {
        Receipt {
            id: id.into(),
            device_id: device_id.into(),
            state,
            reason: String::new(),
            at_ms,
            path: "local".into(),
        }
    }

    fn submit_and_wait(store: &RedbStore, ops: Vec<Op>) -> Result<(), StoreError> {
        store
            .submit(ops)
            .blocking_recv()
            .expect("the writer answers every batch")
    }

    fn temp_db() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store.redb");
        (dir, path)
    }

    // Every clause of the `Store` contract, against redb.
    crate::store::conformance::conformance_suite!(conformance, |dir: &Path| -> Arc<dyn Store> {
        Arc::new(RedbStore::open(&dir.join("store.redb")).expect("open"))
    });

    #[tokio::test]
    async fn every_op_round_trips() {
        let (_dir, path) = temp_db();
        let store = RedbStore::open(&path).expect("open");
        let empty = store.load().expect("load");
        assert!((1..1 << 53).contains(&empty.epoch), "epoch {}", empty.epoch);
        assert_eq!(
            empty,
            Snapshot {
                epoch: empty.epoch,
                ..Snapshot::default()
            }
        );
        assert_eq!(store.receipts("m1").expect("receipts"), vec![]);
        assert_eq!(store.request("m1").expect("request"), None);
        assert_eq!(store.api_key("nope").expect("api key"), None);

        let mut revoked = device("a");
        revoked.revoked = true;
        let key = ApiKeyRecord {
            expires_at_ms: 9,
            revoked_at_ms: 7,
            enroll_groups: vec!["ward:4B".into()],
            ..ApiKeyRecord::new("nurse-call", vec!["send".into()], 5)
        };
        let request = RequestRecord {
            kind: PushKind::Message,
            digest: vec![1, 2, 3],
            at_ms: 1,
            expires_at_ms: 9,
        };
        let ops = vec![
            Op::PutDevice(device("b")),
            Op::PutDevice(device("a")),
            Op::PutDevice(revoked.clone()),
            Op::PutPush(push("b", 1)),
            Op::PutPush(push("a", 10)),
            Op::PutPush(push("a", 2)),
            Op::PutPush(push("a", 3)),
            Op::DeletePush {
                device_id: "a".into(),
                seq: 3,
            },
            Op::DeletePush {
                device_id: "a".into(),
                seq: 77,
            },
            Op::PutSeqCeiling {
                device_id: "a".into(),
                ceiling: 11,
            },
            Op::PutSeqCeiling {
                device_id: "b".into(),
                ceiling: 2,
            },
            Op::PutReceipt(receipt("m1", "b", ReceiptState::Accepted, 1)),
            Op::PutReceipt(receipt("m1", "a", ReceiptState::Accepted, 1)),
            Op::PutReceipt(receipt("m1", "a", ReceiptState::Acked, 2)),
            Op::PutReceipt(receipt("m10", "a", ReceiptState::Delivered, 1)),
            Op::PutReceipt(receipt("m", "a", ReceiptState::Delivered, 1)),
            Op::PutApiKey {
                hash: "abc".into(),
                record: key.clone(),
            },
            Op::PutRequest {
                id: "m1".into(),
                record: request.clone(),
            },
        ];
        commit(&store, ops).await.expect("commit");
        assert_eq!(store.request("m1").expect("request"), Some(request));
        assert_eq!(
            store.load().expect("load").epoch,
            empty.epoch,
            "the epoch is kept"
        );

        let snapshot = store.load().expect("load");
        assert_eq!(snapshot.devices, vec![revoked, device("b")]);
        assert_eq!(snapshot.pushes, vec![push("a", 2), push("a", 10), push("b", 1)]);
        assert_eq!(snapshot.seq_ceilings, vec![("a".into(), 11), ("b".into(), 2)]);
        assert_eq!(
            store.receipts("m1").expect("receipts"),
            vec![
                receipt("m1", "a", ReceiptState::Acked, 2),
                receipt("m1", "b", ReceiptState::Accepted, 1)
            ]
        );
        assert_eq!(store.receipts("m10").expect("receipts").len(), 1);
        assert_eq!(store.api_key("abc").expect("api key"), Some(key.clone()));
        assert_eq!(store.api_key("ab").expect("api key"), None);
        assert_eq!(store.api_keys().expect("api keys"), vec![("abc".into(), key)]);
    }

    #[test]
    fn keys_written_before_versioning_are_migrated_and_still_read() {
        let (_dir, path) = temp_db();
        {
            // The layout and encoding the previous release wrote: table "api_keys", postcard of
            // (name, scopes, created_at_ms).
            let db = Database::create(&path).expect("create");
            let txn = db.begin_write().expect("write");
            {
                let mut t = txn.open_table(LEGACY_API_KEYS).expect("table");
                let old = ApiKeyV1 {
                    name: "admin".into(),
                    scopes: vec!["admin".into()],
                    created_at_ms: 42,
                };
                let bytes = postcard::to_allocvec(&old).expect("encode");
                t.insert("h1", bytes.as_slice()).expect("insert");
            }
            txn.commit().expect("commit");
        }
        let expected = ApiKeyRecord::new("admin", vec!["admin".into()], 42);
        let store = RedbStore::open(&path).expect("an old store opens");
        assert_eq!(store.api_key("h1").expect("read"), Some(expected.clone()));
        assert_eq!(
            store.api_keys().expect("list"),
            vec![("h1".into(), expected.clone())]
        );
        drop(store);
        // Migrated once: reopening finds the key in the new table and nothing left to move.
        let store = RedbStore::open(&path).expect("reopen");
        assert_eq!(store.api_key("h1").expect("read"), Some(expected));
        let legacy_left = store
            .db
            .begin_read()
            .unwrap()
            .open_table(LEGACY_API_KEYS)
            .unwrap()
            .iter()
            .unwrap()
            .count();
        assert_eq!(legacy_left, 0);
    }

    /// A database as the release before versioned rows left it: unversioned postcard rows in
    /// tables `devices`, `pushes`, `receipts` and `requests`.
    #[test]
    fn rows_written_before_versioning_are_migrated_and_still_read() {
        use crate::store::rows::tests as pinned;

        // Postcard of an unversioned record: its version 1 row without the variant index (0).
        // Valid while version 1 is the newest; `encoding_is_stable` pins that the two agree.
        fn legacy<R: Row>(record: &R::Record) -> Vec<u8> {
            let row = postcard::to_allocvec(&R::from_record(record)).expect("encode");
            assert_eq!(row[0], 0, "a version 1 row");
            row[1..].to_vec()
        }
        // Devices have a version 2 since: the unversioned layout is version 1's struct.
        fn legacy_device(record: &DeviceRecord) -> Vec<u8> {
            match DeviceRow::from_record(record) {
                DeviceRow::V2(v2) => postcard::to_allocvec(&v2.v1).expect("encode"),
                DeviceRow::V1(_) => unreachable!("devices are written as version 2"),
            }
        }
        let (_dir, path) = temp_db();
        let mut revoked = device("b");
        revoked.revoked = true;
        let devices = [device("a"), revoked];
        let mut call = push("a", 10);
        call.kind = PushKind::CallInvite;
        let mut cancel = push("b", 1);
        cancel.kind = PushKind::CallCancel;
        let pushes = [push("a", 2), call, cancel];
        let receipts = [
            receipt("m1", "b", ReceiptState::Accepted, 1),
            receipt("m1", "a", ReceiptState::Acked, 2),
            receipt("m2", "a", ReceiptState::Cancelled, 3),
        ];
        let request = |kind, expires_at_ms| RequestRecord {
            kind,
            digest: vec![9; 32],
            at_ms: 1,
            expires_at_ms,
        };
        let requests = [
            ("m1", request(PushKind::Message, 5)),
            ("m2", request(PushKind::CallInvite, 6)),
        ];
        const EPOCH: u64 = 123_456;
        {
            let db = Database::create(&path).expect("create");
            let txn = db.begin_write().expect("write");
            {
                let mut t = txn.open_table(LEGACY_DEVICES).expect("table");
                for d in &devices {
                    t.insert(d.device_id.as_str(), legacy_device(d).as_slice())
                        .expect("insert");
                }
                // Bytes written by the previous release itself, not re-derived from our types.
                t.insert("d1", pinned::LEGACY_DEVICE).expect("insert");
                let mut t = txn.open_table(LEGACY_PUSHES).expect("table");
                for p in &pushes {
                    let key = (p.device_id.as_str(), p.seq);
                    t.insert(key, legacy::<PushRow>(p).as_slice()).expect("insert");
                }
                t.insert(("d1", 7), pinned::LEGACY_PUSH).expect("insert");
                let mut t = txn.open_table(LEGACY_RECEIPTS).expect("table");
                for r in &receipts {
                    let key = (r.id.as_str(), r.device_id.as_str());
                    t.insert(key, legacy::<ReceiptRow>(r).as_slice()).expect("insert");
                }
                t.insert(("m1", "d1"), pinned::LEGACY_RECEIPT).expect("insert");
                let mut t = txn.open_table(LEGACY_REQUESTS).expect("table");
                for (id, r) in &requests {
                    t.insert(*id, legacy::<RequestRow>(r).as_slice()).expect("insert");
                }
                t.insert("r1", pinned::LEGACY_REQUEST).expect("insert");
                let mut t = txn.open_table(SEQ_CEILINGS).expect("table");
                t.insert("a", 11).expect("insert");
                let mut t = txn.open_table(META).expect("table");
                t.insert(EPOCH_KEY, EPOCH).expect("insert");
            }
            txn.commit().expect("commit");
        }

        let check = |store: &RedbStore| {
            let snapshot = store.load().expect("load");
            assert_eq!(
                snapshot,
                Snapshot {
                    epoch: EPOCH,
                    devices: vec![devices[0].clone(), devices[1].clone(), pinned::device()],
                    pushes: vec![
                        pushes[0].clone(),
                        pushes[1].clone(),
                        pushes[2].clone(),
                        pinned::push()
                    ],
                    seq_ceilings: vec![("a".into(), 11)],
                    calls: Vec::new(),
                }
            );
            assert_eq!(
                store.receipts("m1").expect("receipts"),
                vec![receipts[1].clone(), receipts[0].clone(), pinned::receipt()]
            );
            assert_eq!(store.receipts("m2").expect("receipts"), vec![receipts[2].clone()]);
            assert_eq!(store.request("m1").expect("request"), Some(requests[0].1.clone()));
            assert_eq!(store.request("m2").expect("request"), Some(requests[1].1.clone()));
            assert_eq!(store.request("r1").expect("request"), Some(pinned::request()));
            let txn = store.db.begin_read().expect("read");
            assert_eq!(txn.open_table(LEGACY_DEVICES).unwrap().len().unwrap(), 0);
            assert_eq!(txn.open_table(LEGACY_PUSHES).unwrap().len().unwrap(), 0);
            assert_eq!(txn.open_table(LEGACY_RECEIPTS).unwrap().len().unwrap(), 0);
            assert_eq!(txn.open_table(LEGACY_REQUESTS).unwrap().len().unwrap(), 0);
        };
        let store = RedbStore::open(&path).expect("an old store opens");
        check(&store);
        // Migrated once: a reopen finds the same, from the new tables.
        drop(store);
        check(&RedbStore::open(&path).expect("reopen"));
    }

    #[test]
    fn an_undecodable_legacy_row_fails_the_open() {
        let (_dir, path) = temp_db();
        {
            let db = Database::create(&path).expect("create");
            let txn = db.begin_write().expect("write");
            txn.open_table(LEGACY_RECEIPTS)
                .expect("table")
                .insert(("m", "a"), [0xff_u8; 3].as_slice())
                .expect("insert");
            txn.commit().expect("commit");
        }
        let opened = RedbStore::open(&path);
        assert!(
            matches!(&opened, Err(StoreError::Open { detail, .. }) if detail.contains("receipts")),
            "{:?}",
            opened.err()
        );
        // Nothing was moved or lost: the row is still in the old table.
        let db = Database::create(&path).expect("create");
        let txn = db.begin_read().expect("read");
        assert_eq!(txn.open_table(LEGACY_RECEIPTS).unwrap().len().unwrap(), 1);
    }

    #[test]
    fn data_survives_close_and_reopen() {
        let (_dir, path) = temp_db();
        let store = RedbStore::open(&path).expect("open");
        submit_and_wait(
            &store,
            vec![Op::PutDevice(device("a")), Op::PutPush(push("a", 1))],
        )
        .expect("commit");
        // Submitted but not awaited: `close` must still commit it.
        let pending = store.submit(vec![Op::PutSeqCeiling {
            device_id: "a".into(),
            ceiling: 2,
        }]);
        let before = store.load().expect("load");
        drop(store);
        assert!(matches!(pending.blocking_recv(), Ok(Ok(()))));

        let store = RedbStore::open(&path).expect("reopen");
        let after = store.load().expect("load");
        assert_eq!(after.devices, before.devices);
        assert_eq!(after.pushes, before.pushes);
        assert_eq!(after.seq_ceilings, vec![("a".into(), 2)]);
    }

    #[test]
    fn failed_batch_is_atomic_and_spares_the_others() {
        let (_dir, path) = temp_db();
        let store = RedbStore::open(&path).expect("open");
        // Holding a write transaction stalls the writer, so the batches below queue up and are
        // (at least partly) applied in one transaction with the bad one.
        let blocker = store.db.begin_write().expect("begin write");
        blocker
            .open_table(RECEIPTS)
            .expect("table")
            .insert(("bad", "a"), [0xff_u8; 3].as_slice())
            .expect("insert");
        let good = store.submit(vec![Op::PutDevice(device("a"))]);
        let bad = store.submit(vec![
            Op::PutDevice(device("b")),
            Op::PruneReceipts { before_ms: 10 },
        ]);
        let later = store.submit(vec![Op::PutDevice(device("c"))]);
        blocker.commit().expect("commit");

        assert!(matches!(good.blocking_recv(), Ok(Ok(()))));
        assert!(matches!(
            bad.blocking_recv(),
            Ok(Err(StoreError::Corrupt {
                table: "receipts_v1",
                ..
            }))
        ));
        assert!(matches!(later.blocking_recv(), Ok(Ok(()))));
        let ids: Vec<_> = store
            .load()
            .expect("load")
            .devices
            .into_iter()
            .map(|d| d.device_id)
            .collect();
        assert_eq!(ids, ["a", "c"]);
        assert!(matches!(
            store.receipts("bad"),
            Err(StoreError::Corrupt {
                table: "receipts_v1",
                ..
            })
        ));
    }

    #[test]
    fn concurrent_submits_all_succeed() {
        let (_dir, path) = temp_db();
        let store = RedbStore::open(&path).expect("open");
        std::thread::scope(|scope| {
            for thread in 0..8 {
                let store = &store;
                scope.spawn(move || {
                    let id = format!("d{thread}");
                    for seq in 0..25 {
                        let ops = vec![
                            Op::PutPush(push(&id, seq)),
                            Op::PutSeqCeiling {
                                device_id: id.clone(),
                                ceiling: seq + 1,
                            },
                        ];
                        submit_and_wait(store, ops).expect("commit");
                    }
                });
            }
        });
        let snapshot = store.load().expect("load");
        assert_eq!(snapshot.pushes.len(), 200);
        assert!(snapshot.seq_ceilings.iter().all(|(_, ceiling)| *ceiling == 25));
        assert_eq!(snapshot.seq_ceilings.len(), 8);
    }

    #[test]
    fn a_group_keeps_only_the_last_write_of_each_key() {
        let (_dir, path) = temp_db();
        let store = RedbStore::open(&path).expect("open");
        let receipt = |id: &str, state| {
            Op::PutReceipt(Receipt {
                id: id.into(),
                device_id: "a".into(),
                state,
                reason: String::new(),
                at_ms: 5,
                path: "local".into(),
            })
        };
        submit_and_wait(&store, vec![Op::PutPush(push("a", 0))]).expect("commit");
        // Queued behind a held write transaction, so they are committed as one group.
        let blocker = store.db.begin_write().expect("begin write");
        let answers = [
            vec![Op::PutPush(push("a", 1)), receipt("m1", ReceiptState::Accepted)],
            vec![receipt("m1", ReceiptState::Delivered)],
            vec![
                receipt("m1", ReceiptState::Acked),
                Op::DeletePush {
                    device_id: "a".into(),
                    seq: 1,
                },
                Op::DeletePush {
                    device_id: "a".into(),
                    seq: 0,
                },
            ],
            vec![Op::PutPush(push("a", 2)), receipt("m2", ReceiptState::Accepted)],
        ]
        .map(|ops| store.submit(ops));
        drop(blocker);
        for answer in answers {
            assert!(matches!(answer.blocking_recv(), Ok(Ok(()))));
        }
        let seqs: Vec<u64> = store.load().expect("load").pushes.iter().map(|p| p.seq).collect();
        assert_eq!(seqs, [2]);
        let states = |id| -> Vec<ReceiptState> {
            store
                .receipts(id)
                .expect("receipts")
                .into_iter()
                .map(|r| r.state)
                .collect()
        };
        assert_eq!(states("m1"), [ReceiptState::Acked]);
        assert_eq!(states("m2"), [ReceiptState::Accepted]);
    }

    fn pushes_in_the_file(store: &RedbStore) -> u64 {
        let txn = store.db.begin_read().expect("read");
        txn.open_table(PUSHES).expect("table").len().expect("len")
    }

    #[test]
    fn answered_groups_reach_the_database_in_bulk_and_a_read_applies_them_first() {
        let (_dir, path) = temp_db();
        let day = Duration::from_secs(24 * 3600);
        let never = Bulk {
            ops: usize::MAX,
            age: day,
        };
        let store = RedbStore::open_with(&path, Checkpoints::new(u64::MAX, day), never).expect("open");
        for seq in 0..50 {
            submit_and_wait(&store, vec![Op::PutPush(push("d", seq))]).expect("commit");
        }
        // Answered (journaled) but not applied: the database file's tree has none of them.
        assert_eq!(store.commits.load(Ordering::Relaxed), 50);
        assert_eq!(store.applies.load(Ordering::Relaxed), 0);
        assert_eq!(pushes_in_the_file(&store), 0);
        // A read applies them first, so it sees every answered batch.
        assert_eq!(store.load().expect("load").pushes.len(), 50);
        assert_eq!(pushes_in_the_file(&store), 50);
        // A prune goes at once, after the answered groups, in their order: the receipt put
        // before it is old and final, so the prune removes it.
        submit_and_wait(
            &store,
            vec![Op::PutReceipt(receipt("m1", "d", ReceiptState::Acked, 10))],
        )
        .expect("commit");
        submit_and_wait(&store, vec![Op::PruneReceipts { before_ms: 20 }]).expect("prune");
        assert!(store.receipts("m1").expect("read").is_empty());
        // Closing applies and checkpoints what is left: all of it is in the file.
        submit_and_wait(
            &store,
            vec![Op::DeletePush {
                device_id: "d".into(),
                seq: 0,
            }],
        )
        .expect("commit");
        store.close();
        // The writer applied twice: the receipt ahead of the prune, the delete at close.
        assert_eq!(store.applies.load(Ordering::Relaxed), 2);
        assert_eq!(pushes_in_the_file(&store), 49);
    }

    #[test]
    fn the_writer_applies_answered_groups_once_enough_have_gathered() {
        let (_dir, path) = temp_db();
        let day = Duration::from_secs(24 * 3600);
        let bulk = Bulk { ops: 10, age: day };
        let store = RedbStore::open_with(&path, Checkpoints::new(u64::MAX, day), bulk).expect("open");
        for seq in 0..25 {
            submit_and_wait(&store, vec![Op::PutPush(push("d", seq))]).expect("commit");
        }
        // Applied after the 10th and the 20th op; the last 5 wait for more, or a read.
        assert_eq!(store.applies.load(Ordering::Relaxed), 2);
        assert_eq!(pushes_in_the_file(&store), 20);
    }

    #[test]
    fn queued_batches_share_one_commit() {
        let (_dir, path) = temp_db();
        let store = RedbStore::open(&path).expect("open");
        // The writer hands every group it journaled to the bulk apply under this lock.
        let blocker = store.unapplied.groups.lock();
        let answers: Vec<_> = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..4)
                .map(|thread| {
                    let store = &store;
                    scope.spawn(move || {
                        (0..50)
                            .map(|seq| store.submit(vec![Op::PutPush(push(&format!("d{thread}"), seq))]))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            threads
                .into_iter()
                .flat_map(|t| t.join().expect("submitter"))
                .collect()
        });
        drop(blocker);
        for answer in answers {
            assert!(matches!(answer.blocking_recv(), Ok(Ok(()))));
        }
        // All 200 batches were queued before the writer could commit: at most the batches it
        // had already taken go first, the rest (< MAX_GROUP) go in one more commit.
        assert!(store.commits.load(Ordering::Relaxed) <= 2);
        assert_eq!(store.load().expect("load").pushes.len(), 200);
    }

    #[test]
    fn submit_after_close_is_refused() {
        let (_dir, path) = temp_db();
        let store = RedbStore::open(&path).expect("open");
        store.close();
        store.close();
        let answer = store.submit(vec![Op::PutDevice(device("a"))]).blocking_recv();
        assert!(matches!(answer, Ok(Err(StoreError::Closed))));
        assert_eq!(store.load().expect("reads still work").devices, vec![]);
    }

    #[test]
    fn second_open_of_the_same_file_fails() {
        let (_dir, path) = temp_db();
        let first = RedbStore::open(&path).expect("open");
        let second = RedbStore::open(&path);
        assert!(
            matches!(second, Err(StoreError::Open { .. })),
            "{:?}",
            second.err()
        );
        drop(first);
        assert!(RedbStore::open(&path).is_ok());
    }

    #[test]
    fn garbage_file_fails_to_open() {
        let (_dir, path) = temp_db();
        std::fs::write(&path, b"this is not a redb database, just some text".repeat(200)).expect("write");
        let opened = RedbStore::open(&path);
        match opened {
            Err(StoreError::Open { path: reported, .. }) => assert_eq!(reported, path.display().to_string()),
            other => panic!("expected StoreError::Open, got {:?}", other.err()),
        }
    }

    #[test]
    fn prune_removes_only_old_final_receipts() {
        let (_dir, path) = temp_db();
        let store = RedbStore::open(&path).expect("open");
        let ops = vec![
            Op::PutReceipt(receipt("m", "old-acked", ReceiptState::Acked, 100)),
            Op::PutReceipt(receipt("m", "old-expired", ReceiptState::Expired, 499)),
            Op::PutReceipt(receipt("m", "old-accepted", ReceiptState::Accepted, 100)),
            Op::PutReceipt(receipt("m", "old-delivered", ReceiptState::Delivered, 100)),
            Op::PutReceipt(receipt("m", "new-acked", ReceiptState::Acked, 500)),
        ];
        submit_and_wait(&store, ops).expect("commit");
        submit_and_wait(&store, vec![Op::PruneReceipts { before_ms: 500 }]).expect("prune");
        let kept: Vec<_> = store
            .receipts("m")
            .expect("receipts")
            .into_iter()
            .map(|r| r.device_id)
            .collect();
        assert_eq!(kept, ["new-acked", "old-accepted", "old-delivered"]);
    }

    #[test]
    fn a_snapshot_holds_every_table_and_row_and_a_renewed_epoch_keeps_them() {
        let (dir, path) = temp_db();
        let store = RedbStore::open(&path).expect("open");
        submit_and_wait(
            &store,
            vec![
                Op::PutDevice(device("a")),
                Op::PutPush(push("a", 7)),
                Op::PutSeqCeiling {
                    device_id: "a".into(),
                    ceiling: 1031,
                },
                Op::PutReceipt(receipt("m-1", "a", ReceiptState::Delivered, 5)),
            ],
        )
        .expect("commit");
        let copy = dir.path().join("copy.redb");
        store.snapshot_to(&copy).expect("snapshot of an open store");
        let before = store.load().unwrap();

        // Every table of the store is in the copy (a table added later must be copied too).
        let tables = |db: &Database| -> Vec<String> {
            let txn = db.begin_read().unwrap();
            let mut names: Vec<String> = txn.list_tables().unwrap().map(|t| t.name().to_string()).collect();
            names.sort();
            names
        };
        assert!(RedbStore::in_use(&path), "the store is open here");
        assert!(!RedbStore::in_use(&copy));
        let copied = Database::open(&copy).unwrap();
        assert_eq!(tables(&copied), tables(&store.db));
        drop(copied);

        let epoch = RedbStore::renew_epoch(&copy).expect("renew");
        assert_ne!(epoch, before.epoch);
        let restored = RedbStore::open(&copy).expect("open the copy");
        let after = restored.load().unwrap();
        assert_eq!(after.epoch, epoch);
        assert_eq!(after.devices, before.devices);
        assert_eq!(after.pushes, before.pushes);
        assert_eq!(after.seq_ceilings, vec![("a".into(), 1031)]);
        assert_eq!(restored.receipts("m-1").unwrap(), store.receipts("m-1").unwrap());
    }

    fn stored_epoch(db: &Database) -> u64 {
        let txn = db.begin_read().unwrap();
        let meta = txn.open_table(META).unwrap();
        meta.get(EPOCH_KEY).unwrap().unwrap().value()
    }

    #[test]
    fn renew_epoch_refuses_an_undecodable_row() {
        let (dir, path) = temp_db();
        drop(RedbStore::open(&path).expect("open"));
        let db = Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(DEVICES)
            .unwrap()
            .insert("a", &[0xff, 0xff][..])
            .unwrap();
        txn.commit().unwrap();
        let before = stored_epoch(&db);
        drop(db);
        let err = RedbStore::renew_epoch(&path).unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::Corrupt {
                    table: "devices_v1",
                    ..
                }
            ),
            "{err:?}"
        );
        let db = Database::open(&path).unwrap();
        let after = stored_epoch(&db);
        assert_eq!(after, before, "nothing changed");
        drop(dir);
    }

    /// A store that never checkpoints while open: what it answered lives in the journal only.
    fn never_checkpointing(path: &Path) -> RedbStore {
        let never = Checkpoints::new(u64::MAX, Duration::from_secs(24 * 3600));
        RedbStore::open_with(path, never, BULK).expect("open")
    }

    fn journal_len(path: &Path) -> u64 {
        std::fs::metadata(journal::path_of(path)).expect("journal").len()
    }

    fn write_journal(path: &Path, groups: &[Vec<Op>]) {
        let bytes: Vec<u8> = groups
            .iter()
            .flat_map(|ops| journal::encode(ops).expect("encode"))
            .collect();
        std::fs::write(journal::path_of(path), bytes).expect("write journal");
    }

    /// Pushes in the database file as its last durable commit left it, without the journal:
    /// what a copy of the file as it is now (the file as a killed process leaves it) opens at.
    fn durable_pushes(path: &Path) -> u64 {
        let copy = path.with_extension("copy");
        std::fs::copy(path, &copy).expect("copy");
        let db = Database::create(&copy).expect("open the copy alone");
        let txn = db.begin_read().expect("read");
        txn.open_table(PUSHES).expect("table").len().expect("len")
    }

    /// Everything the ops of [`history`] touch, to compare two stores.
    #[derive(Debug, PartialEq)]
    struct State {
        snapshot: Snapshot,
        receipts: Vec<Receipt>,
        request: Option<RequestRecord>,
        api_keys: Vec<(String, ApiKeyRecord)>,
    }

    fn state(store: &RedbStore) -> State {
        State {
            snapshot: store.load().expect("load"),
            receipts: ["m1", "m2"]
                .iter()
                .flat_map(|id| store.receipts(id).expect("receipts"))
                .collect(),
            request: store.request("m1").expect("request"),
            api_keys: store.api_keys().expect("keys"),
        }
    }

    /// Groups of puts, deletes, re-puts after a delete or a prune, and prunes.
    fn history() -> Vec<Vec<Op>> {
        let call = crate::store::CallRecord {
            call_id: "c1".into(),
            invite: vec![1],
            placed_at_ms: 1,
            deadline_ms: 2,
            steps: Vec::new(),
            callees: Vec::new(),
            end: None,
            hung_up_at_ms: 0,
        };
        let request = RequestRecord {
            kind: PushKind::Message,
            digest: vec![1],
            at_ms: 1,
            expires_at_ms: 100,
        };
        let ceiling = |ceiling| Op::PutSeqCeiling {
            device_id: "a".into(),
            ceiling,
        };
        let delete = |seq| Op::DeletePush {
            device_id: "a".into(),
            seq,
        };
        vec![
            vec![
                Op::PutDevice(device("a")),
                Op::PutPush(push("a", 1)),
                Op::PutPush(push("a", 2)),
                ceiling(3),
                Op::PutReceipt(receipt("m1", "a", ReceiptState::Accepted, 100)),
                Op::PutRequest {
                    id: "m1".into(),
                    record: request,
                },
                Op::PutCall(call),
            ],
            vec![
                delete(1),
                Op::PutReceipt(receipt("m1", "a", ReceiptState::Acked, 110)),
                Op::PutReceipt(receipt("m2", "a", ReceiptState::Acked, 50)),
                Op::PutReceipt(receipt("m2", "b", ReceiptState::Delivered, 50)),
            ],
            vec![Op::PruneReceipts { before_ms: 120 }],
            vec![Op::PutReceipt(receipt("m1", "a", ReceiptState::Acked, 105))],
            vec![
                Op::PutPush(push("a", 1)),
                Op::DeleteCall { call_id: "c1".into() },
                ceiling(5),
                Op::PutApiKey {
                    hash: "k".into(),
                    record: ApiKeyRecord::new("n", vec!["send".into()], 1),
                },
                delete(2),
            ],
            vec![
                Op::PutReceipt(receipt("m2", "c", ReceiptState::Expired, 106)),
                Op::PruneReceipts { before_ms: 106 },
            ],
        ]
    }

    #[test]
    fn a_journal_is_replayed_at_open_and_emptied_and_replaying_it_again_changes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let empty = dir.path().join("empty.redb");
        drop(RedbStore::open(&empty).expect("create"));
        let copy = |name: &str| {
            let path = dir.path().join(name);
            std::fs::copy(&empty, &path).expect("copy");
            path
        };
        // The reference: the same groups committed by the writer.
        let live = copy("live.redb");
        let expected = {
            let store = RedbStore::open(&live).expect("open");
            for ops in history() {
                submit_and_wait(&store, ops).expect("commit");
            }
            state(&store)
        };
        assert_eq!(
            expected.snapshot.pushes,
            vec![push("a", 1)],
            "the history is not trivial"
        );
        // m1 was put again after the first prune, then pruned by the second.
        assert_eq!(
            expected.receipts,
            vec![
                receipt("m2", "b", ReceiptState::Delivered, 50),
                receipt("m2", "c", ReceiptState::Expired, 106)
            ]
        );

        // Over the state before it, and over every state a crash after a checkpoint of the
        // first `k` groups can leave (the checkpoint's commit done, the journal not yet emptied).
        let groups = history();
        for k in 0..=groups.len() {
            let path = copy(&format!("replayed-{k}.redb"));
            write_journal(&path, &groups[..k]);
            drop(RedbStore::open(&path).expect("replay the first groups"));
            assert_eq!(journal_len(&path), 0, "emptied once replayed");
            write_journal(&path, &groups);
            let store = RedbStore::open(&path).expect("replay the whole journal");
            assert_eq!(state(&store), expected, "replayed over the first {k} groups");
            assert_eq!(journal_len(&path), 0);
        }
    }

    #[test]
    fn a_torn_last_record_is_dropped_and_the_store_opens() {
        let (_dir, path) = temp_db();
        drop(RedbStore::open(&path).expect("create"));
        let groups = history();
        write_journal(&path, &groups[..2]);
        let torn = journal::encode(&groups[2]).expect("encode");
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(journal::path_of(&path))
            .expect("journal");
        std::io::Write::write_all(&mut file, &torn[..torn.len() - 1]).expect("append");
        drop(file);

        let store = RedbStore::open(&path).expect("a torn tail never fails the open");
        let receipts = store.receipts("m2").expect("receipts");
        assert_eq!(
            receipts.len(),
            2,
            "the second group is there, the prune after it is not"
        );
        assert_eq!(journal_len(&path), 0);
    }

    #[test]
    fn a_damaged_record_in_the_middle_fails_the_open_and_changes_nothing() {
        let (_dir, path) = temp_db();
        drop(RedbStore::open(&path).expect("create"));
        write_journal(&path, &history());
        let journal_path = journal::path_of(&path);
        let mut bytes = std::fs::read(&journal_path).expect("read");
        let second = journal::encode(&history()[0]).expect("encode").len();
        bytes[second + 20] ^= 1;
        std::fs::write(&journal_path, &bytes).expect("write");

        let opened = RedbStore::open(&path);
        match opened {
            Err(StoreError::Open { path: named, detail }) => {
                assert_eq!(named, journal_path.display().to_string());
                assert!(detail.contains(&format!("byte {second}")), "{detail}");
            }
            other => panic!("expected StoreError::Open, got {:?}", other.err()),
        }
        assert_eq!(
            std::fs::read(&journal_path).expect("read"),
            bytes,
            "the journal is kept"
        );
        assert_eq!(durable_pushes(&path), 0, "nothing was replayed");
    }

    #[test]
    fn a_journal_without_its_database_fails_the_open() {
        let (_dir, path) = temp_db();
        write_journal(&path, &history());
        let opened = RedbStore::open(&path);
        assert!(
            matches!(&opened, Err(StoreError::Open { detail, .. }) if detail.contains("does not exist")),
            "{:?}",
            opened.err()
        );
        assert!(journal_len(&path) > 0, "the journal is kept");
        assert!(
            !path.exists(),
            "no database was created: a second open fails the same way"
        );
    }

    #[test]
    fn a_checkpoint_makes_the_commits_durable_in_the_database_and_empties_the_journal() {
        let (_dir, path) = temp_db();
        let store = never_checkpointing(&path);
        submit_and_wait(&store, vec![Op::PutPush(push("a", 1))]).expect("commit");
        assert!(journal_len(&path) > 0, "answered once journaled");
        assert_eq!(durable_pushes(&path), 0, "and not yet durable in the database");
        // Close checkpoints: the database holds the push without its journal.
        drop(store);
        assert_eq!(journal_len(&path), 0);
        assert_eq!(durable_pushes(&path), 1);

        // By size: a journal past the bound is checkpointed before the next group is taken.
        let store = RedbStore::open_with(&path, Checkpoints::new(1, Duration::from_secs(24 * 3600)), BULK)
            .expect("open");
        submit_and_wait(&store, vec![Op::PutPush(push("a", 2))]).expect("commit");
        submit_and_wait(&store, vec![]).expect("barrier");
        assert_eq!(journal_len(&path), 0);
        assert_eq!(durable_pushes(&path), 2, "durable while the store is still open");
        drop(store);
    }

    #[test]
    fn a_snapshot_holds_what_is_only_journaled_and_a_restore_drops_a_stale_journal() {
        let (dir, path) = temp_db();
        let store = never_checkpointing(&path);
        submit_and_wait(&store, vec![Op::PutPush(push("a", 1))]).expect("commit");
        let copy = dir.path().join("copy.redb");
        store.snapshot_to(&copy).expect("snapshot");
        // A journal that is not the snapshot's: renewing the epoch removes it.
        write_journal(&copy, &[vec![Op::PutPush(push("z", 9))]]);
        RedbStore::renew_epoch(&copy).expect("renew");
        assert!(!journal::path_of(&copy).exists());
        let restored = RedbStore::open(&copy).expect("open the copy");
        assert_eq!(restored.load().expect("load").pushes, vec![push("a", 1)]);
    }

    /// Environment variable naming the database of [`crash_child`].
    const CRASH_CHILD_DB: &str = "LPUSH_STORE_CRASH_CHILD_DB";

    /// Not a test on its own: the process [`acknowledged_batches_survive_sigkill`] starts (this
    /// test binary again) and kills. Commits message-like batches one at a time, printing each
    /// answer, until it is killed.
    #[test]
    #[ignore = "run by acknowledged_batches_survive_sigkill"]
    fn crash_child() {
        let Some(path) = std::env::var_os(CRASH_CHILD_DB) else {
            return;
        };
        let store = never_checkpointing(Path::new(&path));
        for seq in 0..100_000 {
            let ops = vec![
                Op::PutPush(push("a", seq)),
                Op::PutReceipt(receipt(&format!("m{seq}"), "a", ReceiptState::Accepted, 1)),
            ];
            submit_and_wait(&store, ops).expect("commit");
            println!("acked {seq}");
        }
    }

    /// A crash right after answers: the process is killed with SIGKILL (no destructor, no
    /// close), with every answered batch in the journal only. Reopening replays them all.
    #[test]
    fn acknowledged_batches_survive_sigkill() {
        use std::io::BufRead;
        let (_dir, path) = temp_db();
        let mut child = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--exact",
                "store::redb_store::tests::crash_child",
                "--ignored",
                "--nocapture",
            ])
            .env(CRASH_CHILD_DB, &path)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn");
        let mut lines = std::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut acked = None;
        for line in lines.by_ref() {
            if let Some(seq) = line.expect("line").strip_prefix("acked ") {
                acked = Some(seq.parse::<u64>().expect("seq"));
                if acked == Some(49) {
                    break;
                }
            }
        }
        assert_eq!(acked, Some(49), "the child answered 50 batches");
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
        // Answers printed before the kill landed still count.
        for line in lines {
            if let Some(seq) = line.expect("line").strip_prefix("acked ") {
                acked = Some(seq.parse().expect("seq"));
            }
        }
        let acked = acked.expect("acked");

        assert_eq!(durable_pushes(&path), 0, "the database alone has none of them");
        assert!(journal_len(&path) > 0);
        let store = RedbStore::open(&path).expect("reopen after the crash");
        let seqs: Vec<u64> = store.load().expect("load").pushes.iter().map(|p| p.seq).collect();
        // Every answered batch, whole, in order; at most the one in flight besides.
        assert!(
            seqs.len() as u64 == acked + 1 || seqs.len() as u64 == acked + 2,
            "{} pushes for {} answers",
            seqs.len(),
            acked + 1
        );
        assert!(seqs.iter().copied().eq(0..seqs.len() as u64));
        for seq in &seqs {
            assert_eq!(
                store.receipts(&format!("m{seq}")).expect("receipts").len(),
                1,
                "m{seq}"
            );
        }
    }
}
