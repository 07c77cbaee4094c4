//! What the simulated devices saw, and when: sessions up and down, and the arrival time of each
//! numbered message or call. Lock-free on the hot path (one atomic store per arrival).

use std::{
    collections::HashSet,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use push_proto::device::{CallOutcome, CallOutcomeResult, CancelReason};
use tokio::sync::mpsc;

use crate::stats::now_ns;

/// What a phone saw of a call (the `answer` benchmark).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallSeen {
    /// The invite reached the app (the SDK acknowledges it once the callback returns).
    Invite,
    /// A `CallCancel`, with its reason.
    Cancel(CancelReason),
    /// The server's `CallOutcomeReply` to this phone's report.
    Reply(CallOutcome, CallOutcomeResult),
}

/// One thing a phone saw of call number `k`, and when (`now_ns()`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallEvent {
    /// The device's index (`dev-00042` is 42).
    pub device: usize,
    pub seen: CallSeen,
    pub at: u64,
}

/// Arrival times of the messages of one run, indexed by message number.
pub struct Arrivals {
    /// `now_ns()` of the first arrival of message `k`, 0 until then.
    pub first: Vec<AtomicU64>,
    /// Arrivals counted, duplicates included.
    pub count: AtomicUsize,
    /// Every arrival time, when the run asked for them (fan-out: one message, many devices).
    pub all: Option<Mutex<Vec<u64>>>,
    /// Which device saw which message, when the run checks that none saw one twice (a lock
    /// per arrival: the smoke run, not the timed benchmarks).
    seen: Option<Mutex<HashSet<(usize, usize)>>>,
    /// Arrivals of a message at a device that had already seen it (counted only with `seen`).
    pub duplicates: AtomicUsize,
}

impl Arrivals {
    fn new(n: usize, keep_all: bool, exactly_once: bool) -> Self {
        Self {
            first: (0..n).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicUsize::new(0),
            all: keep_all.then(|| Mutex::new(Vec::with_capacity(16 * 1024))),
            seen: exactly_once.then(Mutex::default),
            duplicates: AtomicUsize::new(0),
        }
    }

    /// Record an arrival of message `k` at device `device` (ignored when out of range).
    pub fn arrive(&self, k: usize, device: usize) {
        let t = now_ns();
        let Some(slot) = self.first.get(k) else { return };
        let _ = slot.compare_exchange(0, t, Ordering::AcqRel, Ordering::Acquire);
        if let Some(all) = &self.all {
            all.lock().expect("poisoned").push(t);
        }
        if let Some(seen) = &self.seen
            && !seen.lock().expect("poisoned").insert((k, device))
        {
            self.duplicates.fetch_add(1, Ordering::AcqRel);
        }
        self.count.fetch_add(1, Ordering::AcqRel);
    }

    /// Messages that arrived at least once.
    pub fn arrived(&self) -> usize {
        self.first
            .iter()
            .filter(|t| t.load(Ordering::Acquire) != 0)
            .count()
    }
}

/// Shared by every simulated device of a process.
pub struct Recorder {
    /// Devices with a live, authenticated session (push: `Connected`; MQTT: subscribed).
    pub online: AtomicUsize,
    /// Sessions established since the start (reconnections included).
    pub logins: AtomicUsize,
    /// Runs armed from now on check that no device sees a message twice.
    pub exactly_once: AtomicBool,
    arrivals: RwLock<Arc<Arrivals>>,
    /// Where the phones' events of numbered calls go, call `k` to channel `k`, when armed.
    calls: RwLock<Arc<Vec<mpsc::UnboundedSender<CallEvent>>>>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self {
            online: AtomicUsize::new(0),
            logins: AtomicUsize::new(0),
            exactly_once: AtomicBool::new(false),
            arrivals: RwLock::new(Arc::new(Arrivals::new(0, false, false))),
            calls: RwLock::default(),
        }
    }
}

impl Recorder {
    /// Start recording a run of `n` numbered messages; returns its arrivals.
    pub fn arm(&self, n: usize, keep_all: bool) -> Arc<Arrivals> {
        let exactly_once = self.exactly_once.load(Ordering::Acquire);
        let a = Arc::new(Arrivals::new(n, keep_all, exactly_once));
        *self.arrivals.write().expect("poisoned") = a.clone();
        a
    }

    /// Message number `k` arrived at device `device`.
    pub fn arrive(&self, k: usize, device: usize) {
        let a = self.arrivals.read().expect("poisoned").clone();
        a.arrive(k, device);
    }

    /// Start recording what the phones see of calls `0..n` (invites, cancels, outcome
    /// replies): receiver `k` gets call `k`'s events, in the order each phone saw them.
    pub fn arm_calls(&self, n: usize) -> Vec<mpsc::UnboundedReceiver<CallEvent>> {
        let (txs, rxs) = (0..n).map(|_| mpsc::unbounded_channel()).unzip();
        *self.calls.write().expect("poisoned") = Arc::new(txs);
        rxs
    }

    /// Device `device` saw `seen` of call number `k` (ignored unless armed for it).
    pub fn call_event(&self, k: usize, device: usize, seen: CallSeen) {
        let at = now_ns();
        let calls = self.calls.read().expect("poisoned").clone();
        if let Some(tx) = calls.get(k) {
            let _ = tx.send(CallEvent { device, seen, at });
        }
    }

    pub fn up(&self) {
        self.online.fetch_add(1, Ordering::AcqRel);
        self.logins.fetch_add(1, Ordering::AcqRel);
    }

    pub fn down(&self) {
        self.online.fetch_sub(1, Ordering::AcqRel);
    }

    pub fn online(&self) -> usize {
        self.online.load(Ordering::Acquire)
    }

    /// Wait until `done(online)` holds, checking every millisecond for at most `timeout`;
    /// `Err` carries how many were online then.
    pub async fn wait_online(&self, timeout: Duration, done: impl Fn(usize) -> bool) -> Result<(), usize> {
        let deadline = Instant::now() + timeout;
        while !done(self.online()) {
            if Instant::now() > deadline {
                return Err(self.online());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(())
    }

    pub fn logins(&self) -> usize {
        self.logins.load(Ordering::Acquire)
    }
}

/// Message number from a tag such as `m42` or `c42-run2` (push title, call id): the digits
/// after the given prefix.
pub fn parse_tag(tag: &str, prefix: char) -> Option<usize> {
    let rest = tag.strip_prefix(prefix)?;
    let end = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
    rest[..end].parse().ok()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    #[test]
    fn a_message_seen_twice_by_one_device_is_a_duplicate_when_checked() {
        let rec = super::Recorder::default();
        let unchecked = rec.arm(2, false);
        unchecked.arrive(1, 7);
        unchecked.arrive(1, 7);
        assert_eq!(unchecked.duplicates.load(Ordering::Acquire), 0);
        rec.exactly_once.store(true, Ordering::Release);
        let checked = rec.arm(2, false);
        rec.arrive(1, 7);
        rec.arrive(1, 8);
        rec.arrive(0, 7);
        assert_eq!(checked.duplicates.load(Ordering::Acquire), 0);
        rec.arrive(1, 7);
        assert_eq!(checked.duplicates.load(Ordering::Acquire), 1);
        assert_eq!(checked.count.load(Ordering::Acquire), 4);
        assert_eq!(checked.arrived(), 2);
    }

    #[test]
    fn tags() {
        assert_eq!(super::parse_tag("m42", 'm'), Some(42));
        assert_eq!(super::parse_tag("c7-measured", 'c'), Some(7));
        assert_eq!(super::parse_tag("x7", 'c'), None);
        assert_eq!(super::parse_tag("c", 'c'), None);
    }
}
