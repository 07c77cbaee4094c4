//! Which announcements the store has answered, without a barrier per reader. A call's
//! receipts are kept in memory for its watchers (`calls.rs`), and a watcher must only be told a
//! state the store already holds, as the stored read behind a barrier it replaces told it: a
//! crash may never take back what a caller saw.
//!
//! Each such announcement is numbered after the batch holding its receipt was submitted, and a
//! barrier is submitted right behind that batch, from the same thread: it rides in the same
//! group commit, so it costs the store no commit of its own. Its answer marks every number
//! taken before it as answered. A reader waits for the mark to pass the numbers it reports:
//! usually it already has, since the phone's ack is committed while `PlaceCall` returns.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::watch;

use crate::store::{self, Store, StoreError};

/// Numbers announcements and tracks which ones the store answered.
pub(super) struct DurableMark {
    /// Announcements numbered so far, each after its batch was submitted.
    numbered: AtomicU64,
    /// The highest number the store has answered.
    answered: watch::Sender<u64>,
}

impl DurableMark {
    pub(super) fn new() -> Self {
        Self {
            numbered: AtomicU64::new(0),
            answered: watch::channel(0).0,
        }
    }

    /// Number an announcement whose batch was just submitted to `store`, and submit the barrier
    /// that will answer it.
    pub(super) fn number(&self, store: &dyn Store) -> u64 {
        let n = self.numbered.fetch_add(1, Ordering::AcqRel) + 1;
        // Every batch numbered up to `n` was submitted before this barrier.
        let mut barrier = store.submit(Vec::new());
        match barrier.try_recv() {
            Ok(answer) => mark(&self.answered, n, answer),
            Err(_) => {
                let answered = self.answered.clone();
                tokio::spawn(async move {
                    mark(&answered, n, barrier.await.unwrap_or(Err(StoreError::Closed)));
                });
            }
        }
        n
    }

    /// Once the store has answered every batch numbered up to `n`: at once if it has already,
    /// else whichever comes first of the background barrier and one of the caller's own.
    pub(super) async fn answered(&self, store: &dyn Store, n: u64) -> Result<(), StoreError> {
        let mut mark = self.answered.subscribe();
        if *mark.borrow_and_update() >= n {
            return Ok(());
        }
        tokio::select! {
            Ok(_) = mark.wait_for(|a| *a >= n) => Ok(()),
            own = store::commit(store, Vec::new()) => own,
        }
    }
}

/// The barrier behind number `n` was answered.
fn mark(answered: &watch::Sender<u64>, n: u64, answer: Result<(), StoreError>) {
    match answer {
        Ok(()) => {
            answered.send_if_modified(|a| {
                let moved = *a < n;
                *a = (*a).max(n);
                moved
            });
        }
        // A reader still waiting falls back to a barrier of its own, which reports it.
        Err(e) => tracing::debug!(error = %e, "store barrier for call watchers failed"),
    }
}
