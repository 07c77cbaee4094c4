//! Clocks, percentiles and what `/proc` says about a process and the machine.

use std::{
    sync::OnceLock,
    time::{Duration, Instant},
};

/// Nanoseconds since the first call in this process (never 0, so 0 can mean "not yet").
pub fn now_ns() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    let base = *BASE.get_or_init(Instant::now);
    base.elapsed().as_nanos() as u64 + 1
}

/// Latency figures of a set of samples, in milliseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Summary {
    pub count: usize,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl Summary {
    /// Summarise durations given in nanoseconds.
    pub fn of_ns(mut ns: Vec<u64>) -> Self {
        if ns.is_empty() {
            return Self::default();
        }
        ns.sort_unstable();
        let ms = |v: u64| v as f64 / 1e6;
        let at = |p: f64| {
            // Nearest rank: the smallest sample with at least p% of the samples at or below it.
            // (Less a hair, so that 99% of 1,000 is rank 990, not 991 by rounding.)
            let rank = ((p / 100.0) * ns.len() as f64 - 1e-9).ceil() as usize;
            ms(ns[rank.clamp(1, ns.len()) - 1])
        };
        Self {
            count: ns.len(),
            p50: at(50.0),
            p99: at(99.0),
            p999: at(99.9),
            max: ms(*ns.last().expect("not empty")),
            mean: ms(ns.iter().sum::<u64>()) / ns.len() as f64,
        }
    }

    /// `p50 / p99 / p99.9 / max` in ms.
    pub fn line(&self) -> String {
        format!(
            "p50 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3} ms (n={})",
            self.p50, self.p99, self.p999, self.max, self.count
        )
    }
}

/// The machine's load average over 1, 5 and 15 minutes, as `/proc/loadavg` gives it.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// CPU time of process `pid` by thread name (tokio workers, the store writer, ...), sorted by
/// name; see [`testkit::process::cpu_time`].
pub fn cpu_by_thread(pid: u32) -> Vec<(String, Duration)> {
    let mut by: std::collections::BTreeMap<String, u64> = Default::default();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let ns = std::fs::read_to_string(t.path().join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0);
        *by.entry(name.trim().to_string()).or_default() += ns;
    }
    by.into_iter()
        .map(|(n, ns)| (n, Duration::from_nanos(ns)))
        .collect()
}

/// CPU used per item between two [`cpu_by_thread`] readings, µs, as `total (thread a, thread b)`.
pub fn cpu_per_item(before: &[(String, Duration)], after: &[(String, Duration)], items: usize) -> String {
    let items = items.max(1) as f64;
    let mut parts = Vec::new();
    let mut total = 0.0;
    for (name, t) in after {
        let t0 = before
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| *t)
            .unwrap_or_default();
        let us = t.saturating_sub(t0).as_secs_f64() * 1e6 / items;
        total += us;
        if us >= 0.5 {
            parts.push(format!("{name} {us:.0}"));
        }
    }
    format!("{total:.0} µs ({})", parts.join(", "))
}

/// A deterministic pseudo-random sequence (xorshift64), so both systems get the same targets.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let s = Summary::of_ns((1..=1000).map(|v| v * 1_000_000).collect());
        assert_eq!(s.p50, 500.0);
        assert_eq!(s.p99, 990.0);
        assert_eq!(s.p999, 999.0);
        assert_eq!(s.max, 1000.0);
        assert_eq!(Summary::of_ns(vec![7_000_000]).p999, 7.0);
    }
}
