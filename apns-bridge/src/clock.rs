//! Wall-clock time as an input, so the bridge can be driven with `tokio::time::pause` in tests.

use std::time::{SystemTime, UNIX_EPOCH};

/// The time source of the bridge: Unix milliseconds (ring deadlines are Unix ms).
pub trait Clock: Send + Sync + 'static {
    /// Unix milliseconds now.
    fn now_ms(&self) -> i64;
}

/// The system clock. Ring deadlines come from the push-server's clock, so in remote mode both
/// hosts must keep time (NTP), as they must for `apns-expiration` anyway.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    }
}

/// Unix time that moves with tokio's clock: the system time when created plus tokio's elapsed
/// time, so `tokio::time::pause` / `advance` move it too. For tests.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    base_ms: i64,
    base: tokio::time::Instant,
}

impl TokioClock {
    /// Anchor at the system time now.
    pub fn new() -> Self {
        Self {
            base_ms: SystemClock.now_ms(),
            base: tokio::time::Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    fn now_ms(&self) -> i64 {
        self.base_ms + self.base.elapsed().as_millis() as i64
    }
}
