//! What to do with APNs' answers, when to retry, and what was already sent. Does no I/O and
//! reads no clock: every time is an argument (Unix ms).

use std::{
    collections::{BTreeSet, HashMap},
    time::Duration,
};

use crate::contract::DeviceToken;

/// What an APNs answer means for the push and for the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// 200: APNs accepted the push.
    Delivered,
    /// The token is dead for this app: stop using it (410, or 400 with `BadDeviceToken`,
    /// `DeviceTokenNotForTopic`, `TopicDisallowed`).
    TokenInvalid,
    /// Temporary (429, 5xx): retry with backoff while the call still rings.
    Retry,
    /// Permanent, and not about the token (bad request, provider-token or topic configuration):
    /// do not retry; the operator has to look at the logs.
    Failed,
}

/// Reasons for which APNs refuses a token for good (with status 400).
const TOKEN_REASONS: [&str; 3] = ["BadDeviceToken", "DeviceTokenNotForTopic", "TopicDisallowed"];

/// Classify APNs' answer. The status decides first (a2's reason enum lacks some reasons, and an
/// unknown reason must not change the class), the reason refines 400s.
pub fn classify(status: u16, reason: Option<&str>) -> Verdict {
    match status {
        200 => Verdict::Delivered,
        410 => Verdict::TokenInvalid,
        400 if reason.is_some_and(|r| TOKEN_REASONS.contains(&r)) => Verdict::TokenInvalid,
        429 | 500..=599 => Verdict::Retry,
        _ => Verdict::Failed,
    }
}

/// Retries of temporary failures, bounded by the ring deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Wait before the first retry; doubles after each.
    pub base: Duration,
    /// Longest wait between two attempts.
    pub max: Duration,
    /// Most requests for one push, the first included.
    pub max_attempts: u32,
    /// No request (first or retry) starts with less than this left before the ring deadline: a
    /// push that arrives after the call stopped ringing still has to be reported by the app.
    pub min_ring_left: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(250),
            max: Duration::from_secs(2),
            max_attempts: 5,
            min_ring_left: Duration::from_secs(1),
        }
    }
}

impl RetryPolicy {
    /// Wait after attempt number `attempts` (1-based) failed temporarily.
    pub fn backoff(&self, attempts: u32) -> Duration {
        let factor = 1u32 << attempts.saturating_sub(1).min(16);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// When to send attempt `attempts + 1`, or `None` to give up: out of attempts, or it would
    /// start with less than `min_ring_left` before `deadline_ms`.
    pub fn next_attempt_at(&self, attempts: u32, now_ms: i64, deadline_ms: i64) -> Option<i64> {
        if attempts >= self.max_attempts {
            return None;
        }
        let at = now_ms + self.backoff(attempts).as_millis() as i64;
        (at + self.min_ring_left.as_millis() as i64 <= deadline_ms).then_some(at)
    }

    /// How long one request may take: `send_timeout`, cut to the ring time left (a call never
    /// waits on APNs past its deadline). `None` when the deadline passed.
    pub fn request_budget(send_timeout: Duration, now_ms: i64, deadline_ms: i64) -> Option<Duration> {
        let left = deadline_ms - now_ms;
        (left > 0).then(|| send_timeout.min(Duration::from_millis(left as u64)))
    }
}

/// Which (call, token) pairs already had their one VoIP push, until their calls stop ringing.
/// At most one push per pair, ever: a second request is a duplicate however the first ended.
#[derive(Debug, Default)]
pub struct Ledger {
    sent: HashMap<(String, DeviceToken), i64>,
    by_deadline: BTreeSet<(i64, String, DeviceToken)>,
}

impl Ledger {
    /// Claim the pair's one push. False if it was claimed before (and is still remembered).
    /// Forgets pairs whose calls stopped ringing before `now_ms`.
    pub fn claim(&mut self, call_id: &str, token: &DeviceToken, deadline_ms: i64, now_ms: i64) -> bool {
        self.prune(now_ms);
        let key = (call_id.to_string(), token.clone());
        if self.sent.contains_key(&key) {
            return false;
        }
        self.sent.insert(key, deadline_ms);
        self.by_deadline
            .insert((deadline_ms, call_id.into(), token.clone()));
        true
    }

    /// Pairs remembered.
    pub fn len(&self) -> usize {
        self.sent.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.sent.is_empty()
    }

    fn prune(&mut self, now_ms: i64) {
        // Past the deadline no push is ever built for the call, so the pair can be forgotten.
        while let Some((deadline, ..)) = self.by_deadline.first()
            && *deadline < now_ms
        {
            let (_, call, token) = self.by_deadline.pop_first().expect("first exists");
            self.sent.remove(&(call, token));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apns_answers_are_classified_by_status_then_reason() {
        assert_eq!(classify(200, None), Verdict::Delivered);
        assert_eq!(classify(410, Some("Unregistered")), Verdict::TokenInvalid);
        assert_eq!(classify(410, None), Verdict::TokenInvalid, "status first");
        for r in ["BadDeviceToken", "DeviceTokenNotForTopic", "TopicDisallowed"] {
            assert_eq!(classify(400, Some(r)), Verdict::TokenInvalid, "{r}");
        }
        for r in [
            "BadCollapseId",
            "BadExpirationDate",
            "BadTopic",
            "PayloadEmpty",
            "SomethingNew",
        ] {
            assert_eq!(classify(400, Some(r)), Verdict::Failed, "{r}");
        }
        assert_eq!(classify(400, None), Verdict::Failed);
        assert_eq!(classify(403, Some("ExpiredProviderToken")), Verdict::Failed);
        assert_eq!(classify(413, Some("PayloadTooLarge")), Verdict::Failed);
        assert_eq!(classify(429, Some("TooManyRequests")), Verdict::Retry);
        assert_eq!(classify(429, Some("TooManyProviderTokenUpdates")), Verdict::Retry);
        assert_eq!(classify(500, Some("InternalServerError")), Verdict::Retry);
        assert_eq!(classify(503, Some("ServiceUnavailable")), Verdict::Retry);
        assert_eq!(classify(503, Some("Shutdown")), Verdict::Retry);
    }

    #[test]
    fn retries_back_off_and_stop_before_the_deadline() {
        let p = RetryPolicy {
            base: Duration::from_millis(200),
            max: Duration::from_millis(1000),
            max_attempts: 10,
            min_ring_left: Duration::from_millis(500),
        };
        assert_eq!(p.backoff(1), Duration::from_millis(200));
        assert_eq!(p.backoff(2), Duration::from_millis(400));
        assert_eq!(p.backoff(3), Duration::from_millis(800));
        assert_eq!(p.backoff(4), Duration::from_millis(1000), "capped");
        assert_eq!(p.backoff(40), Duration::from_millis(1000), "no overflow");
        assert_eq!(p.next_attempt_at(1, 0, 10_000), Some(200));
        // 9_000 + 400 + 500 > 9_800: the retry would leave too little ring time.
        assert_eq!(p.next_attempt_at(2, 9_000, 9_800), None);
        assert_eq!(p.next_attempt_at(2, 9_000, 9_900), Some(9_400));
        assert_eq!(p.next_attempt_at(10, 0, 1_000_000), None, "out of attempts");
        // Walk a whole schedule: no attempt ever starts within min_ring_left of the deadline.
        let (mut now, deadline, mut attempts) = (0, 5_000, 1);
        while let Some(at) = p.next_attempt_at(attempts, now, deadline) {
            assert!(at + 500 <= deadline);
            now = at + 50;
            attempts += 1;
        }
        assert!(
            attempts < 10,
            "the deadline ended the retries, not the attempt cap"
        );
    }

    #[test]
    fn request_budget_is_cut_to_the_ring_time_left() {
        let t = Duration::from_secs(5);
        assert_eq!(RetryPolicy::request_budget(t, 0, 60_000), Some(t));
        assert_eq!(
            RetryPolicy::request_budget(t, 58_000, 60_000),
            Some(Duration::from_secs(2))
        );
        assert_eq!(RetryPolicy::request_budget(t, 60_000, 60_000), None);
    }

    #[test]
    fn ledger_allows_one_push_per_call_and_token() {
        let a = DeviceToken::parse(&"a".repeat(64)).unwrap();
        let b = DeviceToken::parse(&"b".repeat(64)).unwrap();
        let mut l = Ledger::default();
        assert!(l.claim("c1", &a, 10_000, 0));
        assert!(!l.claim("c1", &a, 10_000, 5_000), "same call, same token");
        assert!(l.claim("c1", &b, 10_000, 5_000), "another device");
        assert!(l.claim("c2", &a, 20_000, 5_000), "another call");
        assert_eq!(l.len(), 3);
        // Once c1 stopped ringing it is forgotten (no push is built for it any more anyway).
        assert!(l.claim("c3", &a, 30_000, 10_001));
        assert_eq!(l.len(), 2);
    }
}
