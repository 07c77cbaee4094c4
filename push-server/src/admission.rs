//! Admission before work: which connections get a TLS handshake, which device may log in now,
//! which API request may run. Rates are token buckets from `governor`; what a peer can name
//! (addresses, device ids, API keys) is kept only while it matters, so none of these can be
//! made to grow without bound.
//!
//! A TLS 1.3 handshake costs the server about 0.25 ms of CPU (BENCHMARKS.md) and a few KiB while
//! in progress. Without these caps one address looping on connects, or a crowd of silent TCP
//! connections, takes the handshake capacity the ward's phones need after an access point
//! reboot. A refused connection is closed before its handshake, so it costs an accept and a
//! close only.

use std::{
    collections::HashMap,
    hash::Hash,
    net::{IpAddr, Ipv6Addr},
    num::NonZeroU32,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::{config::HandshakeLimits, metrics};

/// Most keys a keyed limiter holds before it is swept at once; a key that is still limited
/// after the sweep stays, and new keys are refused until the sweep frees room. Keys are swept
/// away when their bucket is full again (they are then indistinguishable from a new key).
const MAX_KEYS: usize = 65_536;
/// How often keyed limiters are swept in passing.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// The listener a connection arrived on (the label of its metrics and log lines).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Listener {
    /// Phones (device protocol).
    Device,
    /// The sender/admin gRPC API.
    Api,
    /// The dashboard and `/metrics`.
    Dashboard,
}

impl Listener {
    /// Label for metrics and logs.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Device => "device",
            Self::Api => "api",
            Self::Dashboard => "dashboard",
        }
    }

    /// This listener's handshake limits.
    pub(crate) fn handshake_limits(self, limits: &crate::config::Limits) -> HandshakeLimits {
        match self {
            Self::Device => limits.device_handshakes,
            Self::Api => limits.api_handshakes,
            Self::Dashboard => limits.http_handshakes,
        }
    }
}

/// Why a connection was closed before its handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// `in_progress` handshakes are running.
    InProgress,
    /// `in_progress_per_ip` handshakes from this address are running.
    InProgressPerIp,
    /// Over `per_sec` / `burst`.
    Rate,
    /// Over `per_sec_per_ip` / `burst_per_ip` for this address.
    RatePerIp,
    /// So many addresses are being limited that no new one can be tracked.
    TooManySources,
}

impl Refusal {
    /// Label for metrics and logs.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::InProgress => "in_progress",
            Self::InProgressPerIp => "in_progress_per_ip",
            Self::Rate => "rate",
            Self::RatePerIp => "rate_per_ip",
            Self::TooManySources => "too_many_sources",
        }
    }
}

/// The address a limit applies to: an IPv4 address, or the /64 of an IPv6 address (one host
/// usually holds a whole /64, so counting single v6 addresses would limit nothing). IPv4-mapped
/// IPv6 addresses count as their IPv4 address.
pub(crate) fn source(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & !((1u128 << 64) - 1))),
        },
    }
}

fn nonzero(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN)
}

/// A quota of `per_period` cells per `period` with a bucket of `burst` cells.
fn quota(period: Duration, per_period: u32, burst: u32) -> Quota {
    let every = period / per_period.max(1);
    Quota::with_period(every.max(Duration::from_nanos(1)))
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
        .allow_burst(nonzero(burst))
}

/// A keyed token bucket whose key space stays bounded (see [`MAX_KEYS`]).
pub struct KeyedRate<K: Hash + Eq + Clone> {
    limiter: DefaultKeyedRateLimiter<K>,
    last_sweep: Mutex<Instant>,
}

impl<K: Hash + Eq + Clone> KeyedRate<K> {
    /// `per_period` per `period` for each key, with a bucket of `burst`.
    pub fn new(period: Duration, per_period: u32, burst: u32) -> Self {
        Self {
            limiter: RateLimiter::keyed(quota(period, per_period, burst)),
            last_sweep: Mutex::new(Instant::now()),
        }
    }

    /// Take one cell for `key`; false when its bucket is empty, or when the limiter is full of
    /// limited keys and `key` is a new one.
    pub fn check(&self, key: &K) -> bool {
        self.sweep(false);
        if self.limiter.len() >= MAX_KEYS {
            self.sweep(true);
            if self.limiter.len() >= MAX_KEYS {
                return false;
            }
        }
        self.limiter.check_key(key).is_ok()
    }

    /// Whether the limiter holds as many keys as it may (so a new key is refused).
    fn is_full(&self) -> bool {
        self.limiter.len() >= MAX_KEYS
    }

    /// Forget keys whose bucket is full again: every [`SWEEP_EVERY`], or now when `force`.
    fn sweep(&self, force: bool) {
        let mut last = self.last_sweep.lock().unwrap_or_else(|p| p.into_inner());
        if force || last.elapsed() >= SWEEP_EVERY {
            *last = Instant::now();
            self.limiter.retain_recent();
            self.limiter.shrink_to_fit();
        }
    }

    /// Keys held now (for tests and metrics).
    pub fn keys(&self) -> usize {
        self.limiter.len()
    }
}

/// Handshakes in progress on one listener.
#[derive(Default)]
struct Running {
    total: usize,
    /// Only addresses with a handshake running, so bounded by `in_progress`.
    per_ip: HashMap<IpAddr, usize>,
}

/// The handshake gate of one listener.
pub(crate) struct Handshakes {
    listener: Listener,
    limits: HandshakeLimits,
    rate: DefaultDirectRateLimiter,
    rate_per_ip: KeyedRate<IpAddr>,
    running: Mutex<Running>,
    /// Refusals not logged yet (one line a second at most, so a flood cannot flood the log).
    unlogged: AtomicU64,
    last_log: Mutex<Option<Instant>>,
}

/// A handshake slot; dropping it ends the handshake's claim.
pub(crate) struct Ticket {
    gate: Arc<Handshakes>,
    ip: IpAddr,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut running = self.gate.running.lock().unwrap_or_else(|p| p.into_inner());
        running.total = running.total.saturating_sub(1);
        if let Some(n) = running.per_ip.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                running.per_ip.remove(&self.ip);
            }
        }
    }
}

impl Handshakes {
    /// The gate of `listener` with `limits`.
    pub(crate) fn new(listener: Listener, limits: HandshakeLimits) -> Arc<Self> {
        Arc::new(Self {
            listener,
            limits,
            rate: RateLimiter::direct(quota(Duration::from_secs(1), limits.per_sec, limits.burst)),
            rate_per_ip: KeyedRate::new(Duration::from_secs(1), limits.per_sec_per_ip, limits.burst_per_ip),
            running: Mutex::new(Running::default()),
            unlogged: AtomicU64::new(0),
            last_log: Mutex::new(None),
        })
    }

    /// Admit a connection from `peer` to its handshake, or refuse it (counted and logged; the
    /// caller closes the connection). The ticket must live until the handshake has ended.
    pub(crate) fn admit(self: &Arc<Self>, peer: std::net::SocketAddr) -> Result<Ticket, Refusal> {
        let ip = source(peer.ip());
        let result = self.try_admit(ip);
        if let Err(why) = result {
            metrics::handshake_refused(self.listener.label(), why.label());
            self.log_refusal(peer, why);
        }
        result
    }

    fn try_admit(self: &Arc<Self>, ip: IpAddr) -> Result<Ticket, Refusal> {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        // Cheapest and most specific first; a refused connection takes no cell from the shared
        // bucket, so one abusive address cannot use up everyone's rate.
        if running.per_ip.get(&ip).copied().unwrap_or(0) >= self.limits.in_progress_per_ip {
            return Err(Refusal::InProgressPerIp);
        }
        if running.total >= self.limits.in_progress {
            return Err(Refusal::InProgress);
        }
        if !self.rate_per_ip.check(&ip) {
            return Err(if self.rate_per_ip.is_full() {
                Refusal::TooManySources
            } else {
                Refusal::RatePerIp
            });
        }
        if self.rate.check().is_err() {
            return Err(Refusal::Rate);
        }
        running.total += 1;
        *running.per_ip.entry(ip).or_default() += 1;
        Ok(Ticket {
            gate: self.clone(),
            ip,
        })
    }

    fn log_refusal(&self, peer: std::net::SocketAddr, why: Refusal) {
        let unlogged = self.unlogged.fetch_add(1, Ordering::Relaxed) + 1;
        let mut last = self.last_log.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            *last = Some(Instant::now());
            self.unlogged.store(0, Ordering::Relaxed);
            tracing::warn!(
                listener = self.listener.label(), %peer, reason = why.label(), refused = unlogged,
                "connection refused before the TLS handshake (refused counts those since the last such line)"
            );
        }
    }

    /// Handshakes admitted and not finished.
    #[cfg(test)]
    fn in_progress(&self) -> usize {
        self.running.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(in_progress: usize, per_ip: usize, burst: u32, burst_per_ip: u32) -> HandshakeLimits {
        // A rate of one per hour: no cell comes back during a test, so outcomes do not depend
        // on timing.
        HandshakeLimits {
            in_progress,
            in_progress_per_ip: per_ip,
            per_sec: 1,
            burst,
            per_sec_per_ip: 1,
            burst_per_ip,
        }
    }

    fn addr(s: &str) -> std::net::SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v6_addresses_count_per_64_and_mapped_v4_as_v4() {
        assert_eq!(
            source("2001:db8:1:2:aaaa::1".parse().unwrap()),
            "2001:db8:1:2::".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            source("::ffff:10.0.0.7".parse().unwrap()),
            "10.0.0.7".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn in_progress_is_capped_per_address_and_in_total_and_released_on_drop() {
        let gate = Handshakes::new(Listener::Api, limits(3, 2, 100, 100));
        let a1 = gate.admit(addr("10.0.0.1:1")).unwrap();
        let _a2 = gate.admit(addr("10.0.0.1:2")).unwrap();
        assert_eq!(
            gate.admit(addr("10.0.0.1:3")).err(),
            Some(Refusal::InProgressPerIp)
        );
        let _b1 = gate.admit(addr("10.0.0.2:1")).unwrap();
        assert_eq!(gate.admit(addr("10.0.0.3:1")).err(), Some(Refusal::InProgress));
        drop(a1);
        assert_eq!(gate.in_progress(), 2);
        gate.admit(addr("10.0.0.3:1")).unwrap();
        assert!(gate.running.lock().unwrap().per_ip.len() <= 3);
    }

    #[test]
    fn one_address_over_its_rate_does_not_use_up_the_shared_rate() {
        let gate = Handshakes::new(Listener::Device, limits(100, 100, 5, 2));
        let mut admitted = 0;
        for port in 0..50 {
            if gate.admit(addr(&format!("10.0.0.1:{port}"))).is_ok() {
                admitted += 1;
            }
        }
        // The bucket of 2, and at most one cell back if the test stalled for a second.
        assert!((2..=3).contains(&admitted), "{admitted}");
        // Others still get the rest of the shared bucket of 5.
        for i in 2..5 {
            gate.admit(addr(&format!("10.0.0.{i}:1"))).unwrap();
        }
    }

    #[test]
    fn the_shared_rate_applies_to_all_addresses() {
        let gate = Handshakes::new(Listener::Dashboard, limits(100, 100, 3, 100));
        let refused = (0..20)
            .filter(|i| gate.admit(addr(&format!("10.0.1.{i}:1"))).err() == Some(Refusal::Rate))
            .count();
        assert!(refused >= 16, "{refused}");
    }

    #[test]
    fn keyed_rates_forget_keys_whose_bucket_refilled() {
        // A bucket of 1 refilled every nanosecond is full again at once: swept away.
        let rate = KeyedRate::<u32>::new(Duration::from_secs(1), 1_000_000_000, 1);
        for k in 0..1000 {
            rate.check(&k);
        }
        rate.sweep(true);
        assert_eq!(rate.keys(), 0);
    }
}
