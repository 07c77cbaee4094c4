//! The [`Store`] contract (see the module documentation of `store`) as tests: one function per
//! clause, each run against every backend by [`conformance_suite!`].
//!
//! A clause gets a [`Factory`] that opens the store kept under a directory; called again with the
//! same directory once the first store is closed and dropped, it must open the same data (that
//! is how durability is checked). A backend runs the whole suite with one line:
//!
//! ```ignore
//! conformance_suite!(redis, |dir: &Path| -> Arc<dyn Store> { Arc::new(RedisStore::for_test(dir)) });
//! ```
//!
//! Failure atomicity (a batch that fails leaves nothing) needs a way to make a valid batch fail,
//! which only a backend has (a corrupt row): each backend tests it itself.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::oneshot;

use super::{
    ApiKeyRecord, DeviceRecord, Op, PushKind, Receipt, ReceiptState, RequestRecord, Snapshot, Store,
    StoreError, StoredPush, commit,
};

/// Opens the store kept under a directory (which exists and is empty the first time).
pub(crate) type Factory<'a> = &'a dyn Fn(&Path) -> Arc<dyn Store>;

/// One `#[tokio::test]` per clause, in a module named `$backend`, for the store `$factory`
/// (a `Fn(&Path) -> Arc<dyn Store>`) opens. A new clause is one more name in the list below.
macro_rules! conformance_suite {
    ($backend:ident, $factory:expr) => {
        $crate::store::conformance::conformance_suite!(
            @clauses $backend, $factory,
            fresh_store_is_empty,
            batches_are_atomic,
            batches_apply_in_submission_order,
            submitting_under_a_lock_stores_decision_order,
            empty_batch_is_a_barrier,
            answered_writes_are_visible_to_reads,
            receipts_are_per_id_and_ordered_by_device,
            requests_round_trip,
            prune_removes_only_old_final_receipts_and_expired_requests,
            api_keys_are_listed_by_hash,
            load_is_ordered,
            data_survives_reopen,
            close_commits_pending_batches_then_refuses,
            epoch_is_valid_and_stable,
            concurrent_submitters_all_land,
        );
    };
    (@clauses $backend:ident, $factory:expr, $($clause:ident),+ $(,)?) => {
        mod $backend {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $clause() {
                    let factory = $factory;
                    $crate::store::conformance::$clause(&factory).await;
                }
            )+
        }
    };
}
pub(crate) use conformance_suite;

fn device(id: &str, generation: u64) -> DeviceRecord {
    DeviceRecord {
        device_id: id.into(),
        groups: vec!["ward:4B".into()],
        created_at_ms: 1,
        credential_generation: generation,
        revoked: false,
        last_seen_ms: 3,
        last_ssid: "hospital".into(),
        last_disconnect_reason: "idle".into(),
        sdk_version: "1.0".into(),
        voip_token: "ab".repeat(32),
        voip_token_invalid: false,
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
        encoded: seq.to_le_bytes().to_vec(),
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

fn request(kind: PushKind, expires_at_ms: i64) -> RequestRecord {
    RequestRecord {
        kind,
        digest: expires_at_ms.to_le_bytes().to_vec(),
        at_ms: 1,
        expires_at_ms,
    }
}

fn ceiling(device_id: &str, ceiling: u64) -> Op {
    Op::PutSeqCeiling {
        device_id: device_id.into(),
        ceiling,
    }
}

fn delete(device_id: &str, seq: u64) -> Op {
    Op::DeletePush {
        device_id: device_id.into(),
        seq,
    }
}

async fn ok(store: &dyn Store, ops: Vec<Op>) {
    commit(store, ops).await.expect("the batch commits");
}

/// Close `store` (the caller's only reference) and open the same data again.
fn reopen(factory: Factory<'_>, dir: &Path, store: Arc<dyn Store>) -> Arc<dyn Store> {
    store.close();
    assert_eq!(Arc::strong_count(&store), 1, "the test holds the only reference");
    drop(store);
    factory(dir)
}

fn all_states() -> [ReceiptState; 7] {
    use ReceiptState::*;
    [
        Accepted,
        Delivered,
        Acked,
        Expired,
        Undeliverable,
        Superseded,
        Cancelled,
    ]
}

/// A new store holds nothing, and reads of anything absent are empty, not errors.
pub(crate) async fn fresh_store_is_empty(factory: Factory<'_>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = factory(dir.path());
    let snapshot = store.load().expect("load");
    assert_eq!(
        snapshot,
        Snapshot {
            epoch: snapshot.epoch,
            ..Snapshot::default()
        }
    );
    assert!(store.receipts("m").expect("receipts").is_empty());
    assert_eq!(store.request("m").expect("request"), None);
    assert_eq!(store.api_key("h").expect("api key"), None);
    assert!(store.api_keys().expect("api keys").is_empty());
}

/// No read sees part of a batch, and the ops of a batch apply in their order.
pub(crate) async fn batches_are_atomic(factory: Factory<'_>) {
    const PER_BATCH: u64 = 20;
    const BATCHES: u64 = 50;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = factory(dir.path());

    // Each batch adds PER_BATCH pushes and raises the ceiling to match, so any snapshot taken
    // between two ops of a batch shows a count that is not a multiple, or a ceiling that lags.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (store, stop) = (Arc::clone(&store), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut reads = 0;
            while !stop.load(Ordering::Relaxed) {
                let snapshot = store.load().expect("load");
                let count = snapshot.pushes.len() as u64;
                let ceiling = snapshot.seq_ceilings.first().map_or(0, |(_, c)| *c);
                assert_eq!(count % PER_BATCH, 0, "a snapshot shows part of a batch");
                assert_eq!(ceiling, count, "a snapshot shows part of a batch");
                reads += 1;
            }
            reads
        })
    };
    let answers: Vec<_> = (0..BATCHES)
        .map(|batch| {
            let mut ops: Vec<Op> = (0..PER_BATCH)
                .map(|i| Op::PutPush(push("a", batch * PER_BATCH + i)))
                .collect();
            ops.push(ceiling("a", (batch + 1) * PER_BATCH));
            store.submit(ops)
        })
        .collect();
    for answer in answers {
        answer.await.expect("answered").expect("committed");
    }
    stop.store(true, Ordering::Relaxed);
    assert!(reader.join().expect("reader") > 0);
    assert_eq!(
        store.load().expect("load").pushes.len() as u64,
        BATCHES * PER_BATCH
    );

    // In order within one batch: put, delete, put again, replace.
    let mut replaced = push("b", 2);
    replaced.encoded = b"second".to_vec();
    ok(
        &*store,
        vec![
            Op::PutPush(push("b", 1)),
            delete("b", 1),
            Op::PutPush(push("b", 2)),
            Op::PutPush(replaced.clone()),
            ceiling("b", 5),
            ceiling("b", 3),
        ],
    )
    .await;
    let snapshot = store.load().expect("load");
    let b: Vec<_> = snapshot
        .pushes
        .into_iter()
        .filter(|p| p.device_id == "b")
        .collect();
    assert_eq!(b, [replaced]);
    assert!(snapshot.seq_ceilings.contains(&("b".into(), 3)));
}

/// Successive batches apply in submission order, awaited or not, even when their answers are
/// awaited in another order or dropped.
pub(crate) async fn batches_apply_in_submission_order(factory: Factory<'_>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = factory(dir.path());
    let mut second = push("b", 1);
    second.encoded = b"second".to_vec();
    let batches = vec![
        // Put then delete: nothing left.
        vec![Op::PutPush(push("a", 1))],
        vec![delete("a", 1)],
        // Put, delete, put: the last put.
        vec![Op::PutPush(push("b", 1))],
        vec![delete("b", 1)],
        vec![Op::PutPush(second.clone())],
        // A delete of what is absent is no error.
        vec![delete("c", 9)],
        // Receipts move forward only if applied in order.
        vec![Op::PutReceipt(receipt("m", "a", ReceiptState::Accepted, 1))],
        vec![Op::PutReceipt(receipt("m", "a", ReceiptState::Delivered, 2))],
        vec![Op::PutReceipt(receipt("m", "a", ReceiptState::Acked, 3))],
        vec![ceiling("a", 1)],
        vec![ceiling("a", 2)],
        vec![ceiling("a", 3)],
        // A prune removes what was put before it, not what is put after it.
        vec![Op::PutReceipt(receipt("p", "a", ReceiptState::Acked, 0))],
        vec![Op::PruneReceipts { before_ms: 1 }],
        vec![Op::PutReceipt(receipt("q", "a", ReceiptState::Acked, 0))],
        vec![Op::PutDevice(device("a", 1))],
        vec![Op::PutDevice(device("a", 2))],
    ];
    let mut answers: Vec<_> = batches.into_iter().map(|ops| store.submit(ops)).collect();
    // Some callers never wait (`Hub::persist`): dropping an answer must not cancel its batch.
    drop(answers.remove(answers.len() - 1));
    for answer in answers.into_iter().rev() {
        answer.await.expect("answered").expect("committed");
    }
    ok(&*store, vec![]).await;
    let snapshot = store.load().expect("load");
    assert_eq!(snapshot.pushes, [second]);
    assert_eq!(snapshot.seq_ceilings, [("a".into(), 3)]);
    assert_eq!(snapshot.devices, [device("a", 2)]);
    assert_eq!(
        store.receipts("m").expect("receipts"),
        [receipt("m", "a", ReceiptState::Acked, 3)]
    );
    assert!(store.receipts("p").expect("receipts").is_empty());
    assert_eq!(
        store.receipts("q").expect("receipts"),
        [receipt("q", "a", ReceiptState::Acked, 0)]
    );
}

/// Tasks that decide and submit under one lock (as the hub does per device) get stored order =
/// decision order, although they await their answers outside the lock.
pub(crate) async fn submitting_under_a_lock_stores_decision_order(factory: Factory<'_>) {
    const TASKS: u64 = 8;
    const ROUNDS: u64 = 40;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = factory(dir.path());
    let decided = Arc::new(parking_lot::Mutex::new(0u64));
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let (store, decided) = (Arc::clone(&store), Arc::clone(&decided));
            tokio::spawn(async move {
                for _ in 0..ROUNDS {
                    let answer = {
                        let mut last = decided.lock();
                        *last += 1;
                        let n = *last;
                        store.submit(vec![
                            ceiling("a", n),
                            Op::PutReceipt(receipt("m", "a", ReceiptState::Delivered, n as i64)),
                        ])
                    };
                    answer.await.expect("answered").expect("committed");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("task");
    }
    let last = TASKS * ROUNDS;
    assert_eq!(store.load().expect("load").seq_ceilings, [("a".into(), last)]);
    assert_eq!(store.receipts("m").expect("receipts")[0].at_ms, last as i64);
}

/// An empty batch resolves only once every batch submitted before it has been answered, and
/// the reads that follow see them all.
pub(crate) async fn empty_batch_is_a_barrier(factory: Factory<'_>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = factory(dir.path());
    // On an idle store too.
    ok(&*store, vec![]).await;

    let mut kept: Vec<oneshot::Receiver<Result<(), StoreError>>> = Vec::new();
    for seq in 0..300 {
        let answer = store.submit(vec![
            Op::PutPush(push("a", seq)),
            Op::PutReceipt(receipt(&format!("m{seq}"), "a", ReceiptState::Accepted, 1)),
        ]);
        // Every third answer is dropped, as callers that do not wait do.
        if seq % 3 != 0 {
            kept.push(answer);
        }
    }
    ok(&*store, vec![]).await;
    for mut answer in kept {
        assert!(
            matches!(answer.try_recv(), Ok(Ok(()))),
            "a batch submitted before the barrier is unanswered when the barrier resolves"
        );
    }
    assert_eq!(store.load().expect("load").pushes.len(), 300);
    for seq in 0..300 {
        assert_eq!(store.receipts(&format!("m{seq}")).expect("receipts").len(), 1);
    }
}

/// Once its answer is `Ok`, every read sees a batch.
pub(crate) async fn answered_writes_are_visible_to_reads(factory: Factory<'_>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = factory(dir.path());
    for n in 0..30u64 {
        let id = format!("m{n}");
        let hash = format!("h{n}");
        ok(
            &*store,
            vec![
                Op::PutPush(push("a", n)),
                Op::PutReceipt(receipt(&id, "a", ReceiptState::Accepted, 1)),
                Op::PutRequest {
                    id: id.clone(),
                    record: request(PushKind::Message, n as i64),
                },
                Op::PutApiKey {
                    hash: hash.clone(),
                    record: ApiKeyRecord::new("k", vec![], 1),
                },
            ],
        )
        .await;
        assert_eq!(store.load().expect("load").pushes.len() as u64, n + 1);
        assert_eq!(store.receipts(&id).expect("receipts").len(), 1);
        assert!(store.request(&id).expect("request").is_some());
        assert!(store.api_key(&hash).expect("api key").is_some());
    }
}

/// `receipts(id)` returns exactly the receipts of that id, one per device, ordered by device id.
pub(crate) async fn receipts_are_per_id_and_ordered_by_device(factory: Factory<'_>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = factory(dir.path());
    let put = |id: &str, device: &str, state| Op::PutReceipt(receipt(id, device, state, 1));
    use ReceiptState::*;
    ok(
        &*store,
        vec![
            put("m", "c", Accepted),
            put("m", "a", Delivered),
            put("m1", "a", Accepted),
            put("ma", "a", Accepted),
            put("l", "z", Accepted),
            put("M", "a", Accepted),
        ],
    )
    .await;
    ok(
        &*store,
        vec![
            put("m", "b", Accepted),
            put("m", "B", Expired),
            put("m", "aa", Cancelled),
        ],
    )
    .await;
    // A later state replaces the device's receipt.
    ok(&*store, vec![put("m", "a", Acked)]).await;
    assert_eq!(
        store.receipts("m").expect("receipts"),
        [
            receipt("m", "B", Expired, 1),
            receipt("m", "a", Acked, 1),
            receipt("m", "aa", Cancelled, 1),
            receipt("m", "b", Accepted, 1),
            receipt("m", "c", Accepted, 1),
        ]
    );
    assert_eq!(
        store.receipts("m1").expect("receipts"),
        [receipt("m1", "a", Accepted, 1)]
    );
    assert!(store.receipts("").expect("receipts").is_empty());
    assert!(store.receipts("m0").expect("receipts").is_empty());
    // Every state round-trips.
    let ops = all_states()
        .into_iter()
        .enumerate()
        .map(|(i, state)| Op::PutReceipt(receipt("s", &format!("d{i}"), state, i as i64)))
        .collect();
    ok(&*store, ops).await;
    let states: Vec<_> = store
        .receipts("s")
        .expect("receipts")
        .into_iter()
        .map(|r| r.state)
        .collect();
    assert_eq!(states, all_states());
}

/// `request(id)` returns what was last recorded under exactly that id.
pub(crate) async fn requests_round_trip(factory: Factory<'_>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = factory(dir.path());
    let kinds = [PushKind::Message, PushKind::CallInvite, PushKind::CallCancel];
    let ops = kinds
        .iter()
        .enumerate()
        .map(|(i, kind)| Op::PutRequest {
            id: format!("m{i}"),
            record: request(*kind, 10 + i as i64),
        })
        .collect();
    ok(&*store, ops).await;
    for (i, kind) in kinds.iter().enumerate() {
        let found = store.request(&format!("m{i}")).expect("request");
        assert_eq!(found, Some(request(*kind, 10 + i as i64)));
    }
    assert_eq!(store.request("m").expect("request"), None);
    assert_eq!(store.request("m00").expect("request"), None);
    let replacement = request(PushKind::CallInvite, 77);
    ok(
        &*store,
        vec![Op::PutRequest {
            id: "m0".into(),
            record: replacement.clone(),
        }],
    )
    .await;
    assert_eq!(store.request("m0").expect("request"), Some(replacement));
}

/// A prune removes exactly the final receipts older than the bound and the requests that
/// expired before it, and nothing else; the ops after it in its batch still apply.
pub(crate) async fn prune_removes_only_old_final_receipts_and_expired_requests(factory: Factory<'_>) {
    const BOUND: i64 = 500;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = factory(dir.path());
    let mut ops = Vec::new();
    for state in all_states() {
        for at_ms in [0, BOUND - 1, BOUND, BOUND + 1] {
            ops.push(Op::PutReceipt(receipt(
                "m",
                &format!("{state:?}@{at_ms}"),
                state,
                at_ms,
            )));
        }
    }
    for expires_at_ms in [0, BOUND - 1, BOUND, BOUND + 1] {
        ops.push(Op::PutRequest {
            id: format!("r{expires_at_ms}"),
            record: request(PushKind::Message, expires_at_ms),
        });
    }
    let mut old_push = push("a", 1);
    old_push.expires_at_ms = 0;
    ops.extend([
        Op::PutDevice(device("a", 1)),
        Op::PutPush(old_push.clone()),
        ceiling("a", 2),
        Op::PutApiKey {
            hash: "h".into(),
            record: ApiKeyRecord {
                expires_at_ms: 1,
                revoked_at_ms: 1,
                ..ApiKeyRecord::new("old", vec![], 0)
            },
        },
    ]);
    ok(&*store, ops).await;
    let before = store.load().expect("load");
    let late = receipt("m", "late", ReceiptState::Acked, 0);
    ok(
        &*store,
        vec![
            Op::PruneReceipts { before_ms: BOUND },
            Op::PutReceipt(late.clone()),
        ],
    )
    .await;

    let mut expected: Vec<Receipt> = Vec::new();
    for state in all_states() {
        for at_ms in [0, BOUND - 1, BOUND, BOUND + 1] {
            if !state.is_final() || at_ms >= BOUND {
                expected.push(receipt("m", &format!("{state:?}@{at_ms}"), state, at_ms));
            }
        }
    }
    expected.push(late);
    expected.sort_by(|a, b| a.device_id.cmp(&b.device_id));
    assert_eq!(store.receipts("m").expect("receipts"), expected);
    for (expires_at_ms, kept) in [(0, false), (BOUND - 1, false), (BOUND, true), (BOUND + 1, true)] {
        let found = store.request(&format!("r{expires_at_ms}")).expect("request");
        assert_eq!(found.is_some(), kept, "request expiring at {expires_at_ms}");
    }
    assert_eq!(
        store.load().expect("load"),
        before,
        "a prune touches nothing else"
    );
    assert!(store.api_key("h").expect("api key").is_some());
}

/// `api_keys()` lists every key by hash order; `api_key` finds exactly one hash.
pub(crate) async fn api_keys_are_listed_by_hash(factory: Factory<'_>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = factory(dir.path());
    let key = |name: &str| ApiKeyRecord {
        expires_at_ms: 9,
        enroll_groups: vec!["ward:4B".into()],
        ..ApiKeyRecord::new(name, vec!["send".into(), "enroll".into()], 5)
    };
    let hashes = ["b", "a", "c", "ab", "B"];
    let ops = hashes
        .iter()
        .map(|hash| Op::PutApiKey {
            hash: (*hash).into(),
            record: key(hash),
        })
        .collect();
    ok(&*store, ops).await;
    let revoked = ApiKeyRecord {
        revoked_at_ms: 7,
        ..key("a")
    };
    ok(
        &*store,
        vec![Op::PutApiKey {
            hash: "a".into(),
            record: revoked.clone(),
        }],
    )
    .await;
    assert_eq!(
        store.api_keys().expect("api keys"),
        [
            ("B".into(), key("B")),
            ("a".into(), revoked.clone()),
            ("ab".into(), key("ab")),
            ("b".into(), key("b")),
            ("c".into(), key("c")),
        ]
    );
    assert_eq!(store.api_key("a").expect("api key"), Some(revoked));
    assert_eq!(store.api_key("abc").expect("api key"), None);
    assert_eq!(store.api_key("").expect("api key"), None);
}

/// `load` returns devices and ceilings by device id and pushes by `(device_id, seq)`, seq
/// compared as a number.
pub(crate) async fn load_is_ordered(factory: Factory<'_>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = factory(dir.path());
    ok(
        &*store,
        vec![
            Op::PutDevice(device("b", 1)),
            Op::PutDevice(device("a", 1)),
            Op::PutDevice(device("ab", 1)),
            Op::PutDevice(device("B", 1)),
            Op::PutPush(push("a", 10)),
            Op::PutPush(push("a", 2)),
            Op::PutPush(push("ab", 1)),
            Op::PutPush(push("a", 1 << 40)),
            Op::PutPush(push("b", 0)),
            Op::PutPush(push("B", 3)),
            ceiling("b", 1),
            ceiling("a", 2),
            ceiling("B", 3),
        ],
    )
    .await;
    let snapshot = store.load().expect("load");
    let devices: Vec<_> = snapshot.devices.iter().map(|d| d.device_id.as_str()).collect();
    assert_eq!(devices, ["B", "a", "ab", "b"]);
    assert_eq!(
        snapshot.pushes,
        [
            push("B", 3),
            push("a", 2),
            push("a", 10),
            push("a", 1 << 40),
            push("ab", 1),
            push("b", 0)
        ]
    );
    assert_eq!(
        snapshot.seq_ceilings,
        [("B".into(), 3), ("a".into(), 2), ("b".into(), 1)]
    );
}

/// Everything answered `Ok` is there after the store is closed and opened again.
pub(crate) async fn data_survives_reopen(factory: Factory<'_>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = factory(dir.path());
    let mut call = push("a", 2);
    call.kind = PushKind::CallInvite;
    call.collapse_key = "c".into();
    let key = ApiKeyRecord {
        revoked_at_ms: 3,
        ..ApiKeyRecord::new("k", vec!["admin".into()], 1)
    };
    let mut revoked = device("b", 7);
    revoked.revoked = true;
    ok(
        &*store,
        vec![
            Op::PutDevice(device("a", 1)),
            Op::PutDevice(revoked),
            Op::PutPush(push("a", 1)),
            Op::PutPush(call),
            ceiling("a", 3),
            Op::PutReceipt(receipt("m1", "a", ReceiptState::Delivered, 4)),
            Op::PutReceipt(receipt("m1", "b", ReceiptState::Undeliverable, 5)),
            Op::PutRequest {
                id: "m1".into(),
                record: request(PushKind::CallCancel, 6),
            },
            Op::PutApiKey {
                hash: "h".into(),
                record: key,
            },
        ],
    )
    .await;
    let snapshot = store.load().expect("load");
    let receipts = store.receipts("m1").expect("receipts");
    let keys = store.api_keys().expect("api keys");
    assert_eq!(snapshot.pushes.len(), 2);

    let store = reopen(factory, dir.path(), store);
    assert_eq!(store.load().expect("load"), snapshot);
    assert_eq!(store.receipts("m1").expect("receipts"), receipts);
    assert_eq!(
        store.request("m1").expect("request"),
        Some(request(PushKind::CallCancel, 6))
    );
    assert_eq!(store.api_keys().expect("api keys"), keys);
}

/// `close` commits what was submitted before it, answers it, then refuses every later batch
/// with `Closed`; it is idempotent.
pub(crate) async fn close_commits_pending_batches_then_refuses(factory: Factory<'_>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = factory(dir.path());
    let pending: Vec<_> = (0..50)
        .map(|seq| store.submit(vec![Op::PutPush(push("a", seq))]))
        .collect();
    store.close();
    for mut answer in pending {
        assert!(
            matches!(answer.try_recv(), Ok(Ok(()))),
            "close returned before a batch submitted earlier was committed"
        );
    }
    store.close();
    let refused = store.submit(vec![Op::PutDevice(device("z", 1))]).await;
    assert!(matches!(refused, Ok(Err(StoreError::Closed))), "{refused:?}");
    assert!(matches!(commit(&*store, vec![]).await, Err(StoreError::Closed)));

    let store = reopen(factory, dir.path(), store);
    let snapshot = store.load().expect("load");
    assert_eq!(snapshot.pushes.len(), 50);
    assert!(snapshot.devices.is_empty(), "a refused batch left nothing");
}

/// The epoch is non-zero, below 2^53, kept across writes and reopens, and drawn anew for a new
/// store.
pub(crate) async fn epoch_is_valid_and_stable(factory: Factory<'_>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = factory(dir.path());
    let epoch = store.load().expect("load").epoch;
    assert!((1..1 << 53).contains(&epoch), "epoch {epoch}");
    ok(&*store, vec![Op::PutDevice(device("a", 1))]).await;
    assert_eq!(store.load().expect("load").epoch, epoch);
    let store = reopen(factory, dir.path(), store);
    assert_eq!(store.load().expect("load").epoch, epoch, "reopened");

    let other_dir = tempfile::tempdir().expect("tempdir");
    let other = factory(other_dir.path()).load().expect("load").epoch;
    assert!((1..1 << 53).contains(&other), "epoch {other}");
    assert_ne!(other, epoch, "a new store draws its own epoch");
}

/// Many tasks submitting at once are all answered `Ok`, and every batch lands.
pub(crate) async fn concurrent_submitters_all_land(factory: Factory<'_>) {
    const TASKS: u64 = 32;
    const BATCHES: u64 = 20;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = factory(dir.path());
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let id = format!("d{task}");
                for seq in 0..BATCHES {
                    let ops = vec![
                        Op::PutPush(push(&id, seq)),
                        ceiling(&id, seq + 1),
                        Op::PutReceipt(receipt("m", &id, ReceiptState::Delivered, seq as i64)),
                    ];
                    commit(&*store, ops).await.expect("the batch commits");
                    if seq % 5 == 0 {
                        commit(&*store, vec![]).await.expect("the barrier resolves");
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("task");
    }
    let snapshot = store.load().expect("load");
    assert_eq!(snapshot.pushes.len() as u64, TASKS * BATCHES);
    assert_eq!(snapshot.seq_ceilings.len() as u64, TASKS);
    assert!(snapshot.seq_ceilings.iter().all(|(_, c)| *c == BATCHES));
    let receipts = store.receipts("m").expect("receipts");
    assert_eq!(receipts.len() as u64, TASKS);
    assert!(receipts.iter().all(|r| r.at_ms == BATCHES as i64 - 1));
}
