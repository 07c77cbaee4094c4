//! Exponential backoff with full jitter and a cap.
//!
//! Retry `n` (counting from 0) waits a uniformly random time in `[0, min(cap, base * 2^n)]`
//! ("full jitter"): devices that lost the server together (a restart, a Wi-Fi outage on a ward)
//! spread their reconnects over the whole window instead of arriving in waves. The randomness is
//! a seeded generator, so a test that knows the seed knows the schedule.
//!
//! The cap is what bounds recovery: whatever an outage's length, a waiting device tries again
//! within one cap of the server's return. The SDK runs only on a site's own network, where a
//! refused or timed-out attempt costs a few packets and the server takes thousands of logins a
//! second, so the default cap is short (3 s) rather than an internet client's minutes.

use std::time::Duration;

/// Shape of the backoff.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffConfig {
    /// Upper bound of the first retry's window.
    pub base: Duration,
    /// Upper bound of every window: the longest a device waits between attempts.
    pub cap: Duration,
}

impl Default for BackoffConfig {
    /// 250 ms doubling to 3 s: every phone is back within about 3 s of the server's return,
    /// however long it was gone, and a fleet's retries stay spread over those 3 s (10,000
    /// phones arrive at about 3,300 a second, which one node takes). A server gone for an hour
    /// costs a phone about 2,400 attempts (one every 1.5 s on average), each a refused or
    /// unanswered SYN on the local network.
    fn default() -> Self {
        Self {
            base: Duration::from_millis(250),
            cap: Duration::from_secs(3),
        }
    }
}

/// Backoff state: how many retries failed in a row, and the jitter source.
#[derive(Debug, Clone)]
pub struct Backoff {
    config: BackoffConfig,
    retries: u32,
    rng: SplitMix64,
}

impl Backoff {
    /// A backoff whose jitter sequence is fixed by `seed`.
    pub fn new(config: BackoffConfig, seed: u64) -> Self {
        Self {
            config,
            retries: 0,
            rng: SplitMix64(seed),
        }
    }

    /// Upper bound of the next retry's window.
    pub fn window(&self) -> Duration {
        // 2^31 * base overflows nothing that matters: it is capped long before.
        let factor = 1u32.checked_shl(self.retries.min(31)).unwrap_or(u32::MAX);
        self.config.base.saturating_mul(factor).min(self.config.cap)
    }

    /// Delay before the next attempt; widens the window for the one after.
    pub fn next_delay(&mut self) -> Duration {
        let window = self.window().as_nanos() as u64;
        self.retries = self.retries.saturating_add(1);
        Duration::from_nanos(self.rng.below_inclusive(window))
    }

    /// Retries failed in a row so far.
    pub fn retries(&self) -> u32 {
        self.retries
    }

    /// Start over from the base window (after a session proved stable, or a network change).
    pub fn reset(&mut self) {
        self.retries = 0;
    }
}

/// SplitMix64: tiny, fast, good enough for jitter, and reproducible from a seed.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, max]` (Lemire's multiply-shift; the bias is below 2^-64 * max).
    fn below_inclusive(&mut self, max: u64) -> u64 {
        let span = u128::from(max) + 1;
        ((u128::from(self.next()) * span) >> 64) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: BackoffConfig = BackoffConfig {
        base: Duration::from_millis(100),
        cap: Duration::from_secs(5),
    };

    #[test]
    fn windows_double_up_to_the_cap() {
        let mut b = Backoff::new(CFG, 1);
        let mut windows = Vec::new();
        for _ in 0..10 {
            windows.push(b.window().as_millis());
            b.next_delay();
        }
        assert_eq!(windows, [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000, 5000]);
        b.reset();
        assert_eq!(b.window(), CFG.base);
        assert_eq!(b.retries(), 0);
    }

    #[test]
    fn delays_stay_inside_their_window_and_are_jittered() {
        let mut b = Backoff::new(CFG, 42);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            let window = b.window();
            let d = b.next_delay();
            assert!(d <= window, "{d:?} > {window:?}");
            seen.insert(d);
        }
        assert!(
            seen.len() > 900,
            "jitter must spread delays, got {} distinct",
            seen.len()
        );
    }

    #[test]
    fn full_jitter_mean_is_half_the_window() {
        // At the cap the delay is uniform in [0, cap]: its mean is cap / 2 (within 5 %).
        let mut b = Backoff::new(CFG, 7);
        for _ in 0..10 {
            b.next_delay();
        }
        let n = 20_000u32;
        let total: Duration = (0..n).map(|_| b.next_delay()).sum();
        let mean = total / n;
        let half = CFG.cap / 2;
        assert!(mean > half.mul_f64(0.95) && mean < half.mul_f64(1.05), "{mean:?}");
    }

    #[test]
    fn same_seed_same_schedule() {
        let run = |seed| {
            let mut b = Backoff::new(CFG, seed);
            (0..20).map(|_| b.next_delay()).collect::<Vec<_>>()
        };
        assert_eq!(run(9), run(9));
        assert_ne!(run(9), run(10));
    }

    #[test]
    fn huge_retry_counts_do_not_overflow() {
        let mut b = Backoff::new(CFG, 3);
        b.retries = u32::MAX;
        assert_eq!(b.window(), CFG.cap);
        assert!(b.next_delay() <= CFG.cap);
        assert_eq!(b.retries(), u32::MAX);
    }
}
