//! The embedded store's journal: an append-only file next to the database (`<db>.journal`) that
//! makes a group commit durable with one small append and `fdatasync`, instead of redb's durable
//! commit (a copy-on-write of the touched B-tree pages with checksums, then `fsync`).
//!
//! The writer applies a group to redb without durability, appends one record holding the ops it
//! applied, syncs the file, and only then commits (which makes the group visible to reads) and
//! answers. A checkpoint (a durable redb commit, then an empty journal) bounds the file; opening
//! the store replays what the last checkpoint did not cover. See `redb_store` for the protocol.
//!
//! # Record format
//!
//! ```text
//! [0..4)   payload length, u32 little-endian (never 0)
//! [4..8)   CRC-32 of the payload, little-endian
//! [8..12)  CRC-32 of bytes [0..8), little-endian
//! [12..)   payload: postcard of a sequence of [`Entry`]
//! ```
//!
//! A crash can leave only the last record incomplete: each record is synced before the next is
//! written, and a failed append is cut off again. So the first bad record (short, or a checksum
//! that does not match) ends the journal when nothing valid follows it: it is a torn tail,
//! whose batches were never answered. A valid record after a bad one means the file was damaged
//! after it was written; that is refused, as dropping the records from the bad one on would lose
//! acknowledged writes. The header's own checksum lets the search for a valid record after a bad
//! one step byte by byte without trusting a damaged length.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::Op;
use super::rows::{ApiKeyRow, CallRow, DeviceRow, PushRow, ReceiptRow, RequestRow, Row};

/// Bytes before a record's payload.
const HEADER: usize = 12;

/// One [`Op`] as journaled, its records as versioned rows (`rows`), so that a journal left by
/// one release is replayed by the next. The variant indices are the encoding: append new
/// variants, never reorder or change one (`encoding_is_stable` pins them).
#[derive(Debug, Serialize, Deserialize)]
enum Entry {
    PutDevice(DeviceRow),
    PutPush(PushRow),
    DeletePush { device_id: String, seq: u64 },
    PutSeqCeiling { device_id: String, ceiling: u64 },
    PutReceipt(ReceiptRow),
    PruneReceipts { before_ms: i64 },
    PutRequest { id: String, record: RequestRow },
    PutApiKey { hash: String, record: ApiKeyRow },
    PutCall(CallRow),
    DeleteCall { call_id: String },
    TrimInbox { device_id: String, count: u64 },
}

impl From<&Op> for Entry {
    fn from(op: &Op) -> Self {
        match op {
            Op::PutDevice(d) => Entry::PutDevice(DeviceRow::from_record(d)),
            Op::PutPush(p) => Entry::PutPush(PushRow::from_record(p)),
            Op::DeletePush { device_id, seq } => Entry::DeletePush {
                device_id: device_id.clone(),
                seq: *seq,
            },
            Op::PutSeqCeiling { device_id, ceiling } => Entry::PutSeqCeiling {
                device_id: device_id.clone(),
                ceiling: *ceiling,
            },
            Op::PutReceipt(r) => Entry::PutReceipt(ReceiptRow::from_record(r)),
            Op::PruneReceipts { before_ms } => Entry::PruneReceipts {
                before_ms: *before_ms,
            },
            Op::PutRequest { id, record } => Entry::PutRequest {
                id: id.clone(),
                record: RequestRow::from_record(record),
            },
            Op::PutApiKey { hash, record } => Entry::PutApiKey {
                hash: hash.clone(),
                record: ApiKeyRow::from_record(record),
            },
            Op::PutCall(c) => Entry::PutCall(CallRow::from_record(c)),
            Op::DeleteCall { call_id } => Entry::DeleteCall {
                call_id: call_id.clone(),
            },
            Op::TrimInbox { device_id, count } => Entry::TrimInbox {
                device_id: device_id.clone(),
                count: *count as u64,
            },
        }
    }
}

impl Entry {
    fn into_op(self) -> Result<Op, String> {
        Ok(match self {
            Entry::PutDevice(row) => Op::PutDevice(row.into_record()),
            Entry::PutPush(row) => Op::PutPush(row.into_record()),
            Entry::DeletePush { device_id, seq } => Op::DeletePush { device_id, seq },
            Entry::PutSeqCeiling { device_id, ceiling } => Op::PutSeqCeiling { device_id, ceiling },
            Entry::PutReceipt(row) => Op::PutReceipt(row.into_record()),
            Entry::PruneReceipts { before_ms } => Op::PruneReceipts { before_ms },
            Entry::PutRequest { id, record } => Op::PutRequest {
                id,
                record: record.into_record(),
            },
            Entry::PutApiKey { hash, record } => Op::PutApiKey {
                hash,
                record: record.into_record(),
            },
            Entry::PutCall(row) => Op::PutCall(row.into_record()),
            Entry::DeleteCall { call_id } => Op::DeleteCall { call_id },
            Entry::TrimInbox { device_id, count } => Op::TrimInbox {
                device_id,
                count: usize::try_from(count).map_err(|_| format!("inbox trim of {count} commands"))?,
            },
        })
    }
}

/// The framed record holding `ops`, in order.
pub(super) fn encode<'a>(ops: impl IntoIterator<Item = &'a Op>) -> Result<Vec<u8>, String> {
    let entries: Vec<Entry> = ops.into_iter().map(Entry::from).collect();
    let mut record = postcard::to_extend(&entries, vec![0; HEADER])
        .map_err(|e| format!("cannot encode a journal record: {e}"))?;
    let len = u32::try_from(record.len() - HEADER)
        .map_err(|_| format!("a journal record of {} bytes is too large", record.len()))?;
    let payload_crc = crc32fast::hash(&record[HEADER..]);
    record[0..4].copy_from_slice(&len.to_le_bytes());
    record[4..8].copy_from_slice(&payload_crc.to_le_bytes());
    let header_crc = crc32fast::hash(&record[0..8]);
    record[8..12].copy_from_slice(&header_crc.to_le_bytes());
    Ok(record)
}

/// What a journal holds: the ops of every whole record, a group per record, in order.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Contents {
    /// The groups, oldest first.
    pub(super) groups: Vec<Vec<Op>>,
    /// Where a torn last record starts, if there is one (its batches were never answered).
    pub(super) torn_at: Option<usize>,
}

/// The payload of the valid record at `offset`, if there is one: a header whose checksum
/// matches, a non-empty payload within `bytes`, and a payload checksum that matches.
fn record_at(bytes: &[u8], offset: usize) -> Result<&[u8], Bad> {
    let header = bytes.get(offset..offset + HEADER).ok_or(Bad::Header)?;
    let word = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("4 bytes"));
    if crc32fast::hash(&header[0..8]) != word(8) {
        return Err(Bad::Header);
    }
    let len = word(0) as usize;
    let start = offset + HEADER;
    if len == 0 {
        return Err(Bad::Header);
    }
    let payload = bytes.get(start..start + len).ok_or(Bad::PastTheEnd)?;
    if crc32fast::hash(payload) != word(4) {
        return Err(Bad::Payload);
    }
    Ok(payload)
}

/// Why there is no valid record at an offset.
enum Bad {
    /// The header is short or damaged (its length cannot be trusted).
    Header,
    /// The header is sound, but the payload runs past the end of the file.
    PastTheEnd,
    /// The header is sound, but the payload's checksum does not match.
    Payload,
}

/// Read a journal's bytes. Fails, naming the offset, when a bad record is followed by a valid
/// one or a valid record does not decode: both mean damage to acknowledged writes.
pub(super) fn decode(bytes: &[u8]) -> Result<Contents, String> {
    let mut groups = Vec::new();
    let mut offset = 0;
    while offset < bytes.len() {
        match record_at(bytes, offset) {
            Ok(payload) => {
                groups.push(decode_payload(payload).map_err(|e| format!("record at byte {offset}: {e}"))?);
                offset += HEADER + payload.len();
            }
            // The last append, cut short by the crash: nothing can follow it.
            Err(Bad::PastTheEnd) => break,
            Err(Bad::Header | Bad::Payload) => {
                if let Some(next) = (offset + 1..bytes.len()).find(|&at| record_at(bytes, at).is_ok()) {
                    return Err(format!(
                        "the record at byte {offset} is damaged, and a valid record follows at byte {next}"
                    ));
                }
                break;
            }
        }
    }
    Ok(Contents {
        groups,
        torn_at: (offset < bytes.len()).then_some(offset),
    })
}

fn decode_payload(payload: &[u8]) -> Result<Vec<Op>, String> {
    let (entries, rest) = postcard::take_from_bytes::<Vec<Entry>>(payload).map_err(|e| e.to_string())?;
    if !rest.is_empty() {
        return Err(format!("{} bytes after the last entry", rest.len()));
    }
    entries.into_iter().map(Entry::into_op).collect()
}

/// The journal file of the database at `db`.
pub(super) fn path_of(db: &Path) -> PathBuf {
    let mut path = db.as_os_str().to_owned();
    path.push(".journal");
    PathBuf::from(path)
}

/// The open journal file, appended to by the store's writer thread only.
pub(super) struct Journal {
    file: File,
    /// Its length: every byte of it is a whole, synced record.
    len: u64,
}

impl Journal {
    /// Open (or create, owner-only) the journal at `path` and read it.
    pub(super) fn open(path: &Path) -> io::Result<(Journal, Vec<u8>)> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)?;
        // The file's name must survive a crash as surely as the records synced into it.
        if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let len = bytes.len() as u64;
        Ok((Journal { file, len }, bytes))
    }

    /// Bytes in the journal.
    pub(super) fn len(&self) -> u64 {
        self.len
    }

    /// Append `record` and sync it. On failure the journal is cut back to what it was, so that
    /// a record that may be partly written is never followed by another; `Err(Broken)` when
    /// even that failed and no record may be appended any more.
    pub(super) fn append(&mut self, record: &[u8]) -> Result<(), AppendError> {
        let written = self.file.write_all(record).and_then(|()| self.file.sync_data());
        match written {
            Ok(()) => {
                self.len += record.len() as u64;
                Ok(())
            }
            Err(error) => match self.file.set_len(self.len).and_then(|()| self.file.sync_all()) {
                Ok(()) => Err(AppendError::Failed(error)),
                Err(cut) => Err(AppendError::Broken(format!(
                    "{error}; cutting it back failed: {cut}"
                ))),
            },
        }
    }

    /// Empty the journal, durably (after a checkpoint made its records durable elsewhere).
    pub(super) fn clear(&mut self) -> io::Result<()> {
        self.file.set_len(0)?;
        self.len = 0;
        self.file.sync_all()
    }
}

/// Why [`Journal::append`] failed.
pub(super) enum AppendError {
    /// Nothing of the record is in the journal; later appends may succeed.
    Failed(io::Error),
    /// The journal may end in a partial record: nothing may be appended after it.
    Broken(String),
}

/// When the writer checkpoints: once the journal holds `max_bytes`, or its oldest record is
/// `max_age` old. Time is an input, so the policy is tested without waiting.
#[derive(Debug)]
pub(super) struct Checkpoints {
    max_bytes: u64,
    max_age: Duration,
    /// When the first record after the last checkpoint was appended.
    since: Option<Instant>,
}

impl Checkpoints {
    pub(super) fn new(max_bytes: u64, max_age: Duration) -> Self {
        Self {
            max_bytes,
            max_age,
            since: None,
        }
    }

    /// A record was appended at `now`.
    pub(super) fn appended(&mut self, now: Instant) {
        self.since.get_or_insert(now);
    }

    /// When a checkpoint falls due if nothing else is appended; `None` with nothing to cover.
    pub(super) fn deadline(&self) -> Option<Instant> {
        self.since.map(|since| since + self.max_age)
    }

    /// Whether a journal of `len` bytes is due for a checkpoint at `now`.
    pub(super) fn due(&self, len: u64, now: Instant) -> bool {
        len >= self.max_bytes || self.deadline().is_some_and(|deadline| now >= deadline)
    }

    /// A checkpoint finished at `now`: `Ok` covered everything, a failed one is retried a full
    /// period later (not at once, in a loop).
    pub(super) fn finished(&mut self, ok: bool, now: Instant) {
        self.since = (!ok).then_some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::rows::tests as pinned;
    use crate::store::{
        ApiKeyRecord, CallEnd, CallRecord, CallStepRecord, CalleeRecord, PushKind, ReceiptState,
        RequestRecord,
    };

    /// One op of every kind (a new `Op` variant must be added here: the match below fails to
    /// compile without it).
    pub(in crate::store) fn every_op() -> Vec<Op> {
        let ops = vec![
            Op::PutDevice(pinned::device()),
            Op::PutPush(pinned::push()),
            Op::DeletePush {
                device_id: "d1".into(),
                seq: u64::MAX,
            },
            Op::PutSeqCeiling {
                device_id: "d1".into(),
                ceiling: 1 << 53,
            },
            Op::PutReceipt(pinned::receipt()),
            Op::PutReceipt(crate::store::Receipt {
                state: ReceiptState::Answered,
                ..pinned::receipt()
            }),
            Op::PruneReceipts { before_ms: -5 },
            Op::PutRequest {
                id: "r1".into(),
                record: RequestRecord {
                    kind: PushKind::Message,
                    ..pinned::request()
                },
            },
            Op::PutApiKey {
                hash: "ab12".into(),
                record: ApiKeyRecord::new("nurse", vec!["send".into()], 7),
            },
            Op::PutCall(CallRecord {
                call_id: "c1".into(),
                invite: vec![9, 8],
                placed_at_ms: 1,
                deadline_ms: 2,
                steps: vec![CallStepRecord {
                    due_ms: 1,
                    stop_earlier: true,
                    device_ids: vec!["d1".into()],
                    started_ms: 1,
                }],
                callees: vec![CalleeRecord {
                    device_id: "d1".into(),
                    step: 0,
                    seq: 7,
                    placed: true,
                    rang: false,
                    outcome: Some((ReceiptState::Declined, 3)),
                }],
                end: Some(CallEnd::Declined { at_ms: 3 }),
                hung_up_at_ms: 0,
            }),
            Op::DeleteCall { call_id: "c1".into() },
            Op::TrimInbox {
                device_id: "d1".into(),
                count: 3,
            },
        ];
        for op in &ops {
            match op {
                Op::PutDevice(_)
                | Op::PutPush(_)
                | Op::DeletePush { .. }
                | Op::PutSeqCeiling { .. }
                | Op::PutReceipt(_)
                | Op::PruneReceipts { .. }
                | Op::PutRequest { .. }
                | Op::PutApiKey { .. }
                | Op::PutCall(_)
                | Op::DeleteCall { .. }
                | Op::TrimInbox { .. } => {}
            }
        }
        ops
    }

    fn journal_of(groups: &[Vec<Op>]) -> Vec<u8> {
        groups
            .iter()
            .flat_map(|ops| encode(ops).expect("encode"))
            .collect()
    }

    #[test]
    fn every_op_round_trips() {
        let ops = every_op();
        let contents = decode(&encode(&ops).expect("encode")).expect("decode");
        assert_eq!(
            contents,
            Contents {
                groups: vec![ops],
                torn_at: None
            }
        );
        // And one op per record, each on its own.
        let groups: Vec<Vec<Op>> = every_op().into_iter().map(|op| vec![op]).collect();
        assert_eq!(decode(&journal_of(&groups)).expect("decode").groups, groups);
        assert_eq!(
            decode(&[]).expect("empty"),
            Contents {
                groups: vec![],
                torn_at: None
            }
        );
    }

    /// The bytes of a record, pinned: the journal a release leaves is replayed by the next one.
    #[test]
    fn encoding_is_stable() {
        let record = encode(&[
            Op::PutPush(pinned::push()),
            Op::DeletePush {
                device_id: "d1".into(),
                seq: 7,
            },
            Op::PruneReceipts { before_ms: 3 },
            Op::TrimInbox {
                device_id: "d".into(),
                count: 1,
            },
        ])
        .expect("encode");
        let payload = [
            &[4, 1, 0][..],
            pinned::LEGACY_PUSH,
            &[2, 2, 100, 49, 7],
            &[5, 6],
            &[10, 1, 100, 1],
        ]
        .concat();
        assert_eq!(&record[HEADER..], payload.as_slice());
        assert_eq!(record[0..4], (payload.len() as u32).to_le_bytes());
        assert_eq!(record[4..8], crc32fast::hash(&payload).to_le_bytes());
        assert_eq!(record[8..12], crc32fast::hash(&record[0..8]).to_le_bytes());
        // Variant indices, one by one.
        let indices: Vec<u8> = every_op()
            .iter()
            .map(|op| encode([op]).expect("encode")[HEADER + 1])
            .collect();
        assert_eq!(indices, [0, 1, 2, 3, 4, 4, 5, 6, 7, 8, 9, 10]);
    }

    #[test]
    fn a_torn_last_record_ends_the_journal() {
        let groups = vec![every_op(), vec![Op::PruneReceipts { before_ms: 1 }]];
        let whole = journal_of(&groups);
        let first = encode(&groups[0]).expect("encode").len();
        let last = encode(&every_op()).expect("encode");
        // Every cut of a third record, and zeros or garbage where its bytes should be.
        for cut in 0..last.len() {
            let torn = [&whole[..], &last[..cut]].concat();
            let contents = decode(&torn).expect("a torn tail is not an error");
            assert_eq!(contents.groups, groups, "cut at {cut}");
            assert_eq!(contents.torn_at, (cut > 0).then_some(whole.len()));
        }
        for filler in [0x00, 0xff] {
            let torn = [&whole[..], &[filler; 100]].concat();
            assert_eq!(decode(&torn).expect("torn").groups, groups);
        }
        // The same record with its payload zeroed, as a crash can leave it.
        let mut zeroed = last.clone();
        zeroed[HEADER..].fill(0);
        let torn = [&whole[..], &zeroed].concat();
        assert_eq!(decode(&torn).expect("torn").torn_at, Some(whole.len()));
        // A record cut inside the second: only the first is whole.
        let contents = decode(&whole[..whole.len() - 1]).expect("torn");
        assert_eq!(contents.groups, groups[..1]);
        assert_eq!(contents.torn_at, Some(first));
    }

    #[test]
    fn a_damaged_record_followed_by_a_valid_one_is_refused() {
        let groups = vec![every_op(), every_op(), vec![Op::PruneReceipts { before_ms: 1 }]];
        let whole = journal_of(&groups);
        let first = encode(&groups[0]).expect("encode").len();
        // A flipped bit anywhere in the second record: in its length, its checksums or payload.
        for at in [first, first + 5, first + 9, first + HEADER + 3, first * 2 - 1] {
            let mut damaged = whole.clone();
            damaged[at] ^= 0x10;
            let error = decode(&damaged).expect_err("damage in the middle");
            assert!(
                error.contains(&format!("byte {first}")) && error.contains("valid record follows"),
                "{error}"
            );
        }
    }

    #[test]
    fn a_valid_record_that_does_not_decode_is_refused() {
        // A checksum that matches over bytes that are no entries (a future release's variant).
        let payload = [1u8, 200];
        let mut record = (payload.len() as u32).to_le_bytes().to_vec();
        record.extend(crc32fast::hash(&payload).to_le_bytes());
        record.extend(crc32fast::hash(&record).to_le_bytes());
        record.extend(payload);
        let error = decode(&record).expect_err("undecodable");
        assert!(error.contains("record at byte 0"), "{error}");
    }

    proptest::proptest! {
        /// Whatever a damaged file holds, reading it answers (it never panics), and damage to
        /// one byte of a journal never yields groups that were not written.
        #[test]
        fn reading_any_bytes_answers_and_damage_never_invents_groups(
            garbage in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
            at in 0usize..10_000,
            flip in 1u8..=255,
        ) {
            let _ = decode(&garbage);
            let groups = vec![every_op(), vec![Op::PruneReceipts { before_ms: 1 }], every_op()];
            let mut bytes = journal_of(&groups);
            let at = at % bytes.len();
            bytes[at] ^= flip;
            if let Ok(contents) = decode(&bytes) {
                proptest::prop_assert!(groups.starts_with(&contents.groups));
            }
        }
    }

    #[test]
    fn checkpoints_fall_due_by_size_or_by_age() {
        let start = Instant::now();
        let second = Duration::from_secs(1);
        let mut checkpoints = Checkpoints::new(1000, second);
        assert_eq!(checkpoints.deadline(), None);
        assert!(!checkpoints.due(0, start + 10 * second), "nothing to cover");
        assert!(checkpoints.due(1000, start), "full");
        checkpoints.appended(start);
        checkpoints.appended(start + second / 2);
        assert_eq!(
            checkpoints.deadline(),
            Some(start + second),
            "from the oldest record"
        );
        assert!(!checkpoints.due(999, start + second / 2));
        assert!(checkpoints.due(999, start + second));
        checkpoints.finished(true, start + second);
        assert_eq!(checkpoints.deadline(), None);
        checkpoints.appended(start + 2 * second);
        checkpoints.finished(false, start + 3 * second);
        assert_eq!(
            checkpoints.deadline(),
            Some(start + 4 * second),
            "a failed checkpoint is retried a period later"
        );
    }

    #[test]
    fn appends_are_read_back_and_clear_empties_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = path_of(&dir.path().join("store.redb"));
        assert_eq!(path, dir.path().join("store.redb.journal"));
        let (mut journal, bytes) = Journal::open(&path).expect("open");
        assert!(bytes.is_empty());
        let record = encode(&every_op()).expect("encode");
        assert!(journal.append(&record).is_ok());
        assert!(journal.append(&record).is_ok());
        assert_eq!(journal.len(), 2 * record.len() as u64);
        drop(journal);
        let (mut journal, bytes) = Journal::open(&path).expect("reopen");
        assert_eq!(
            decode(&bytes).expect("decode").groups,
            vec![every_op(), every_op()]
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "owner-only: it holds message payloads");
        journal.clear().expect("clear");
        assert!(journal.append(&record).is_ok());
        drop(journal);
        let (_, bytes) = Journal::open(&path).expect("reopen");
        assert_eq!(bytes, record, "appends go after a clear to the start");
    }
}
