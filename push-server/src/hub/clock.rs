//! The hub's one source of time. Production reads the wall clock; tests pass a [`ManualClock`]
//! and move it, so deadlines, ack windows and expiry are tested with time as an input.

use std::time::{SystemTime, UNIX_EPOCH};

/// Unix milliseconds now, from the wall clock.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Where the hub reads the time.
pub trait Clock: Send + Sync + 'static {
    /// Unix milliseconds now.
    fn now_ms(&self) -> i64;
}

/// The wall clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        now_ms()
    }
}

/// A clock that moves only when told to.
#[cfg(test)]
pub struct ManualClock(std::sync::atomic::AtomicI64);

#[cfg(test)]
impl ManualClock {
    /// A clock showing `at` (Unix ms).
    pub fn new(at: i64) -> Self {
        Self(std::sync::atomic::AtomicI64::new(at))
    }

    /// Move forward by `ms`.
    pub fn advance(&self, ms: i64) {
        self.0.fetch_add(ms, std::sync::atomic::Ordering::SeqCst);
    }
}

#[cfg(test)]
impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}
