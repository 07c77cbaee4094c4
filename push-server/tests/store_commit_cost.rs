//! What one durable group commit of the embedded store costs (issue #15): 2,000 message-like
//! batches (a queued push and its ACCEPTED receipt), committed one at a time, each awaited, so
//! that every batch is a group of its own. Prints the process CPU (user + system, from
//! `getrusage`) and wall time per commit. A benchmark, not a timing assertion:
//!
//! ```text
//! cargo test --release -p push-server --test store_commit_cost -- --ignored --nocapture
//! ```
//!
//! The database is under the target directory (`CARGO_TARGET_TMPDIR`): `/tmp` may be a tmpfs,
//! where an fsync costs nothing.

use std::time::{Duration, Instant};

use push_server::store::{Op, PushKind, Receipt, ReceiptState, RedbStore, Store, StoredPush};

const COMMITS: u64 = 2_000;

/// User + system CPU time of the whole process so far.
fn process_cpu() -> Duration {
    // SAFETY: getrusage writes only into the zeroed struct we pass.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        assert_eq!(libc::getrusage(libc::RUSAGE_SELF, &mut usage), 0);
        usage
    };
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    time(usage.ru_utime) + time(usage.ru_stime)
}

fn message(seq: u64) -> Vec<Op> {
    let id = format!("msg-{seq}");
    vec![
        Op::PutPush(StoredPush {
            device_id: "ward4b-phone-07".into(),
            seq,
            id: id.clone(),
            kind: PushKind::Message,
            collapse_key: String::new(),
            expires_at_ms: 1_900_000_000_000,
            encoded: vec![0x5a; 200],
        }),
        Op::PutReceipt(Receipt {
            id,
            device_id: "ward4b-phone-07".into(),
            state: ReceiptState::Accepted,
            reason: String::new(),
            at_ms: 1_800_000_000_000,
            path: String::new(),
        }),
    ]
}

#[test]
#[ignore = "a benchmark: run it on its own, in release mode"]
fn one_message_per_group_commit() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let store = RedbStore::open(&dir.path().join("push.redb")).expect("open");
    // Warm up: the tables' first pages, the writer thread.
    for seq in 0..100 {
        store
            .submit(message(seq))
            .blocking_recv()
            .unwrap()
            .expect("commit");
    }
    let (cpu, wall) = (process_cpu(), Instant::now());
    for seq in 100..100 + COMMITS {
        store
            .submit(message(seq))
            .blocking_recv()
            .unwrap()
            .expect("commit");
    }
    let (cpu, wall) = (process_cpu() - cpu, wall.elapsed());
    assert_eq!(store.load().expect("load").pushes.len() as u64, 100 + COMMITS);
    let per = |d: Duration| d.as_secs_f64() * 1e6 / COMMITS as f64;
    println!(
        "{COMMITS} single-message group commits: {:.1} µs process CPU and {:.1} µs wall per commit",
        per(cpu),
        per(wall)
    );
}
