//! Receipts and presence to whoever watches them. A watcher of one key (a message or call id)
//! gets only that key's items, through a bounded queue of its own, so a thousand senders each
//! watching their own message do not each wake for every receipt of the site. Watchers of
//! everything (the dashboard, presence streams) share one broadcast.
//!
//! A watcher that falls behind is told so ([`Heard::Lagged`]) instead of silently missing
//! items: it re-reads the stored state, which is complete. Keyed watchers are bounded, per key
//! and in all ([`WatchLimits`]), so senders opening streams cannot grow the server without end.
//! In cluster mode the same interface is fed from Redis pub/sub.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use parking_lot::Mutex;
use tokio::sync::{broadcast, mpsc};

/// What a watcher hears next.
#[derive(Debug, PartialEq, Eq)]
pub enum Heard<T> {
    /// The next item of its key.
    Item(T),
    /// Items were dropped because the watcher fell behind: re-read the stored state.
    Lagged,
}

/// Why a keyed watch was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WatchRefused {
    /// The key has `limits.max_watchers_per_id` watchers already.
    #[error("this id has {0} watchers already (limits.max_watchers_per_id)")]
    KeyFull(usize),
    /// The bus has `limits.max_watchers` keyed watchers already.
    #[error("the server has {0} watchers already (limits.max_watchers)")]
    Full(usize),
}

/// Most keyed watchers, of one key and in all, and how far each may fall behind.
#[derive(Debug, Clone, Copy)]
pub(super) struct WatchLimits {
    /// Watchers of one key.
    pub per_key: usize,
    /// Watchers of all keys together.
    pub total: usize,
    /// Items one watcher may fall behind before it is told it lagged.
    pub queue: usize,
}

/// A publish/subscribe point for one kind of item.
pub(super) struct Bus<T> {
    everything: broadcast::Sender<T>,
    keyed: Arc<Keyed<T>>,
}

struct Keyed<T> {
    taps: Mutex<Taps<T>>,
    next_id: AtomicU64,
    limits: WatchLimits,
}

struct Taps<T> {
    by_key: HashMap<String, Vec<Tap<T>>>,
    /// Taps in `by_key`, all keys together.
    count: usize,
}

struct Tap<T> {
    id: u64,
    tx: mpsc::Sender<T>,
    lagged: Arc<AtomicBool>,
}

impl<T: Clone> Bus<T> {
    /// A bus whose watch-everything subscribers may fall `capacity` items behind, with at most
    /// `limits` keyed watchers.
    pub(super) fn new(capacity: usize, limits: WatchLimits) -> Self {
        Self {
            everything: broadcast::channel(capacity).0,
            keyed: Arc::new(Keyed {
                taps: Mutex::new(Taps {
                    by_key: HashMap::new(),
                    count: 0,
                }),
                next_id: AtomicU64::new(0),
                limits,
            }),
        }
    }

    /// Deliver `item` to the watchers of its key (`key` reads it from the item) and of
    /// everything. Never blocks.
    pub(super) fn publish(&self, item: T, key: impl Fn(&T) -> &str) {
        if let Some(taps) = self.keyed.taps.lock().by_key.get(key(&item)) {
            for tap in taps {
                if tap.tx.try_send(item.clone()).is_err() {
                    tap.lagged.store(true, Ordering::Release);
                }
            }
        }
        let _ = self.everything.send(item);
    }

    /// Watch the items of `key` from now on (subscribe before reading the stored state, so
    /// nothing falls between the read and the first item); refused over the limits.
    pub(super) fn watch(&self, key: &str) -> Result<Watch<T>, WatchRefused> {
        let limits = self.keyed.limits;
        let mut taps = self.keyed.taps.lock();
        if taps.count >= limits.total {
            return Err(WatchRefused::Full(taps.count));
        }
        let of_key = taps.by_key.get(key).map_or(0, Vec::len);
        if of_key >= limits.per_key {
            return Err(WatchRefused::KeyFull(of_key));
        }
        let (tx, rx) = mpsc::channel(limits.queue);
        let lagged = Arc::new(AtomicBool::new(false));
        let id = self.keyed.next_id.fetch_add(1, Ordering::Relaxed);
        taps.by_key.entry(key.to_string()).or_default().push(Tap {
            id,
            tx,
            lagged: lagged.clone(),
        });
        taps.count += 1;
        drop(taps);
        Ok(Watch {
            rx,
            lagged,
            keyed: self.keyed.clone(),
            key: key.to_string(),
            id,
        })
    }

    /// Every item from now on.
    pub(super) fn watch_all(&self) -> broadcast::Receiver<T> {
        self.everything.subscribe()
    }

    /// Keys with at least one watcher (for tests: watchers must not outlive their streams).
    #[cfg(test)]
    pub(super) fn watched_keys(&self) -> usize {
        self.keyed.taps.lock().by_key.len()
    }
}

/// One watcher of one key; stops watching when dropped.
pub struct Watch<T> {
    rx: mpsc::Receiver<T>,
    lagged: Arc<AtomicBool>,
    keyed: Arc<Keyed<T>>,
    key: String,
    id: u64,
}

impl<T> Watch<T> {
    /// The next item, or `Lagged` once after items were dropped.
    pub async fn recv(&mut self) -> Heard<T> {
        if self.lagged.swap(false, Ordering::AcqRel) {
            // What is still queued predates the loss; the re-read covers it.
            while self.rx.try_recv().is_ok() {}
            return Heard::Lagged;
        }
        match self.rx.recv().await {
            Some(item) => Heard::Item(item),
            // The bus holds the sender while this watch exists: unreachable, but harmless.
            None => Heard::Lagged,
        }
    }
}

impl<T> Drop for Watch<T> {
    fn drop(&mut self) {
        let taps = &mut *self.keyed.taps.lock();
        if let Some(list) = taps.by_key.get_mut(&self.key) {
            let before = list.len();
            list.retain(|t| t.id != self.id);
            taps.count -= before - list.len();
            if list.is_empty() {
                taps.by_key.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::FutureExt as _;

    use super::*;

    const ROOMY: WatchLimits = WatchLimits {
        per_key: 8,
        total: 8,
        queue: 256,
    };

    #[tokio::test]
    async fn a_watcher_hears_only_its_key_and_stops_watching_when_dropped() {
        let bus = Bus::new(16, ROOMY);
        let mut a = bus.watch("a").expect("watch");
        let mut all = bus.watch_all();
        bus.publish(("b", 1), |i| i.0);
        bus.publish(("a", 2), |i| i.0);
        assert_eq!(a.recv().await, Heard::Item(("a", 2)));
        assert_eq!(all.recv().await.ok(), Some(("b", 1)));
        assert_eq!(all.recv().await.ok(), Some(("a", 2)));
        assert_eq!(bus.watched_keys(), 1);
        drop(a);
        assert_eq!(bus.watched_keys(), 0, "no entry outlives its watcher");
    }

    #[tokio::test]
    async fn a_watcher_that_falls_behind_is_told_once_then_hears_new_items() {
        let bus = Bus::new(16, ROOMY);
        let mut a = bus.watch("a").expect("watch");
        for i in 0..ROOMY.queue + 1 {
            bus.publish(("a", i), |i| i.0);
        }
        assert_eq!(a.recv().await, Heard::Lagged);
        bus.publish(("a", 7), |i| i.0);
        assert_eq!(a.recv().await, Heard::Item(("a", 7)));
    }

    #[test]
    fn another_keys_items_do_not_wake_a_watcher() {
        let bus = Bus::new(16, ROOMY);
        let mut a = bus.watch("a").expect("watch");
        for i in 0..ROOMY.queue + 1 {
            bus.publish(("b", i), |i| i.0);
        }
        assert_eq!(
            a.recv().now_or_never(),
            None,
            "nothing queued for `a`, not even a lag"
        );
    }

    #[test]
    fn watchers_are_bounded_per_key_and_in_all_and_a_dropped_one_frees_its_place() {
        let bus: Bus<(&str, usize)> = Bus::new(
            16,
            WatchLimits {
                per_key: 2,
                total: 3,
                queue: 256,
            },
        );
        let a1 = bus.watch("a").expect("first of a");
        let _a2 = bus.watch("a").expect("second of a");
        assert_eq!(bus.watch("a").err(), Some(WatchRefused::KeyFull(2)));
        let _b1 = bus.watch("b").expect("first of b");
        assert_eq!(bus.watch("c").err(), Some(WatchRefused::Full(3)));
        drop(a1);
        assert!(bus.watch("c").is_ok(), "a dropped watcher's place is free again");
    }
}
