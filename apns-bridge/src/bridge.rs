//! The bridge: turns a ringing call into at most one APNs VoIP push per device token, retrying
//! only temporary failures and only while the call rings. It drives the pure pieces
//! ([`crate::contract`], [`crate::policy`]) with one transport and one clock.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::{
    clock::{Clock, SystemClock},
    contract::{BundleId, DeviceToken, VoipCall},
    policy::{Ledger, RetryPolicy, Verdict, classify},
    transport::{ApnsTransport, BoxFuture},
};

/// How the bridge sends.
#[derive(Debug, Clone)]
pub struct BridgeSettings {
    /// The app's bundle id; pushes go to topic `<bundle id>.voip`.
    pub bundle_id: BundleId,
    /// Longest wait for one APNs answer (also cut to the ring time left). On a site without
    /// internet this is what bounds "APNs unreachable" when the connection hangs instead of
    /// failing.
    pub send_timeout: Duration,
    /// Retries of 429 and 5xx.
    pub retry: RetryPolicy,
}

impl BridgeSettings {
    /// Defaults for `bundle_id`: 5 s per request, [`RetryPolicy::default`].
    pub fn new(bundle_id: BundleId) -> Self {
        Self {
            bundle_id,
            send_timeout: Duration::from_secs(5),
            retry: RetryPolicy::default(),
        }
    }
}

/// How ringing one device through APNs ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VoipOutcome {
    /// APNs accepted the push (200). It reaches the phone if the phone is online.
    Delivered {
        /// `apns-id` of APNs' answer.
        apns_id: Option<String>,
        /// Requests sent (more than 1 after retried 429/5xx).
        attempts: u32,
    },
    /// APNs refused the token for good: stop using it until the device registers a new one.
    TokenInvalid {
        /// HTTP status (410 or 400).
        status: u16,
        /// APNs' reason (`Unregistered`, `BadDeviceToken`, ...).
        reason: String,
    },
    /// Not delivered, and no retry will follow: APNs unreachable or silent, busy until the call
    /// stopped ringing, or refused for a reason that is not about the token.
    Undeliverable {
        /// HTTP status of APNs' last answer, if it answered.
        status: Option<u16>,
        /// What happened, for the sender and the logs.
        reason: String,
        /// Requests sent.
        attempts: u32,
    },
    /// Refused before sending: the call breaks the contract (too late, payload too large,
    /// malformed). Nothing was sent.
    Rejected {
        /// Why.
        reason: String,
    },
    /// This call already had its push to this token. Nothing was sent.
    Duplicate,
}

/// Rings a device through APNs: the one interface the push-server uses, whether the bridge runs
/// in its process ([`Bridge`]) or on another host ([`crate::remote::RemoteBridge`]).
pub trait VoipBridge: Send + Sync + 'static {
    /// Send `call` to `token` as one VoIP push, with retries bounded by the ring deadline.
    /// Resolves no later than the ring deadline plus one request timeout.
    fn ring(&self, call: VoipCall, token: DeviceToken) -> BoxFuture<'_, VoipOutcome>;
}

/// The bridge itself (embedded mode, and what the remote service runs).
pub struct Bridge {
    transport: Arc<dyn ApnsTransport>,
    settings: BridgeSettings,
    clock: Arc<dyn Clock>,
    ledger: Mutex<Ledger>,
}

impl Bridge {
    /// A bridge over `transport`, on the system clock.
    pub fn new(transport: Arc<dyn ApnsTransport>, settings: BridgeSettings) -> Self {
        Self::with_clock(transport, settings, Arc::new(SystemClock))
    }

    /// A bridge reading time from `clock`.
    pub fn with_clock(
        transport: Arc<dyn ApnsTransport>,
        settings: BridgeSettings,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            transport,
            settings,
            clock,
            ledger: Mutex::new(Ledger::default()),
        }
    }

    /// The settings in force.
    pub fn settings(&self) -> &BridgeSettings {
        &self.settings
    }

    /// Ring `token` for `call`: build the request (contract checks), claim the (call, token)
    /// pair, send, and retry 429/5xx with backoff while enough ring time is left.
    pub async fn ring_device(&self, call: &VoipCall, token: &DeviceToken) -> VoipOutcome {
        let policy = self.settings.retry;
        let now = self.clock.now_ms();
        let deadline = call.ring_deadline_ms();
        let request = match call.request(
            token,
            &self.settings.bundle_id,
            now,
            policy.min_ring_left.as_millis() as i64,
        ) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(call = call.call_id(), %token, error = %e, "VoIP push refused");
                return VoipOutcome::Rejected {
                    reason: e.to_string(),
                };
            }
        };
        if !self
            .ledger
            .lock()
            .expect("poisoned")
            .claim(call.call_id(), token, deadline, now)
        {
            tracing::info!(call = call.call_id(), %token, "VoIP push already sent for this call and token");
            return VoipOutcome::Duplicate;
        }
        let mut attempts = 0;
        loop {
            let now = self.clock.now_ms();
            let Some(budget) = RetryPolicy::request_budget(self.settings.send_timeout, now, deadline) else {
                return VoipOutcome::Undeliverable {
                    status: None,
                    reason: "the call stopped ringing before APNs accepted the push".into(),
                    attempts,
                };
            };
            attempts += 1;
            let answer = match tokio::time::timeout(budget, self.transport.send(&request)).await {
                Ok(Ok(answer)) => answer,
                Ok(Err(e)) => {
                    tracing::warn!(call = call.call_id(), %token, error = %e, "APNs not reached");
                    return VoipOutcome::Undeliverable {
                        status: None,
                        reason: e.to_string(),
                        attempts,
                    };
                }
                Err(_) => {
                    tracing::warn!(call = call.call_id(), %token, budget_ms = budget.as_millis() as u64, "APNs did not answer in time");
                    return VoipOutcome::Undeliverable {
                        status: None,
                        reason: format!("APNs did not answer within {} ms", budget.as_millis()),
                        attempts,
                    };
                }
            };
            let reason = answer.reason.clone().unwrap_or_default();
            match classify(answer.status, answer.reason.as_deref()) {
                Verdict::Delivered => {
                    tracing::info!(call = call.call_id(), %token, attempts, "VoIP push accepted by APNs");
                    return VoipOutcome::Delivered {
                        apns_id: answer.apns_id,
                        attempts,
                    };
                }
                Verdict::TokenInvalid => {
                    tracing::warn!(call = call.call_id(), %token, status = answer.status, %reason, "APNs refused the VoIP token");
                    return VoipOutcome::TokenInvalid {
                        status: answer.status,
                        reason,
                    };
                }
                Verdict::Failed => {
                    // Not about the token: the request, the key or the topic is wrong. An operator
                    // has to act (logged as an error), and retrying cannot help.
                    tracing::error!(call = call.call_id(), %token, status = answer.status, %reason, "APNs refused the VoIP push");
                    return VoipOutcome::Undeliverable {
                        status: Some(answer.status),
                        reason: format!("APNs refused the push: {} {reason}", answer.status),
                        attempts,
                    };
                }
                Verdict::Retry => {
                    let now = self.clock.now_ms();
                    let Some(at) = policy.next_attempt_at(attempts, now, deadline) else {
                        tracing::warn!(call = call.call_id(), %token, status = answer.status, %reason, attempts, "APNs busy; no retry left before the ring deadline");
                        return VoipOutcome::Undeliverable {
                            status: Some(answer.status),
                            reason: format!(
                                "APNs busy ({} {reason}) and no retry fits before the call stops ringing",
                                answer.status
                            ),
                            attempts,
                        };
                    };
                    tracing::info!(call = call.call_id(), %token, status = answer.status, %reason, attempts, "APNs busy; retrying");
                    tokio::time::sleep(Duration::from_millis((at - now).max(0) as u64)).await;
                }
            }
        }
    }
}

impl VoipBridge for Bridge {
    fn ring(&self, call: VoipCall, token: DeviceToken) -> BoxFuture<'_, VoipOutcome> {
        Box::pin(async move { self.ring_device(&call, &token).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        clock::TokioClock,
        fake::{FakeAnswer, FakeApns},
        test_invite,
    };

    struct Setup {
        fake: Arc<FakeApns>,
        bridge: Bridge,
        clock: TokioClock,
    }

    fn setup() -> Setup {
        let clock = TokioClock::new();
        let bundle = BundleId::parse("com.example.ward").unwrap();
        let fake = FakeApns::with_clock(bundle.clone(), Arc::new(clock));
        let mut settings = BridgeSettings::new(bundle);
        settings.send_timeout = Duration::from_secs(2);
        settings.retry = RetryPolicy {
            base: Duration::from_millis(500),
            max: Duration::from_secs(4),
            max_attempts: 10,
            min_ring_left: Duration::from_secs(1),
        };
        let bridge = Bridge::with_clock(fake.clone(), settings, Arc::new(clock));
        Setup { fake, bridge, clock }
    }

    fn call(s: &Setup, id: &str, ring_ms: i64) -> VoipCall {
        let now = s.clock.now_ms();
        VoipCall::from_invite(test_invite(id, now, now + ring_ms)).unwrap()
    }

    fn token(c: char) -> DeviceToken {
        DeviceToken::parse(&c.to_string().repeat(64)).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn one_push_per_call_and_token() {
        let s = setup();
        let c = call(&s, "c1", 30_000);
        let out = s.bridge.ring_device(&c, &token('a')).await;
        assert!(
            matches!(out, VoipOutcome::Delivered { attempts: 1, .. }),
            "{out:?}"
        );
        assert_eq!(
            s.bridge.ring_device(&c, &token('a')).await,
            VoipOutcome::Duplicate
        );
        assert!(matches!(
            s.bridge.ring_device(&c, &token('b')).await,
            VoipOutcome::Delivered { .. }
        ));
        assert_eq!(s.fake.received().len(), 2);
        assert!(s.fake.violations().is_empty(), "{:?}", s.fake.violations());
        let r = &s.fake.received_for(token('a').as_str())[0];
        assert_eq!(r.call_uuid, c.call_uuid());
        assert_eq!(r.header("apns-collapse-id"), Some(c.call_uuid()));
    }

    #[tokio::test(start_paused = true)]
    async fn temporary_failures_are_retried_with_backoff_while_ringing() {
        let s = setup();
        s.fake.script(
            token('a').as_str(),
            [
                FakeAnswer::status(503, "ServiceUnavailable"),
                FakeAnswer::status(429, "TooManyRequests"),
            ],
        );
        let c = call(&s, "c1", 30_000);
        let t0 = s.clock.now_ms();
        let out = s.bridge.ring_device(&c, &token('a')).await;
        assert!(
            matches!(out, VoipOutcome::Delivered { attempts: 3, .. }),
            "{out:?}"
        );
        let at: Vec<i64> = s.fake.received().iter().map(|r| r.at_ms - t0).collect();
        assert_eq!(at, [0, 500, 1500], "500 ms, then 1 s of backoff");
    }

    #[tokio::test(start_paused = true)]
    async fn no_retry_after_the_ring_deadline() {
        let s = setup();
        s.fake.set_default(FakeAnswer::status(503, "ServiceUnavailable"));
        let c = call(&s, "c1", 6_000);
        let out = s.bridge.ring_device(&c, &token('a')).await;
        let VoipOutcome::Undeliverable {
            status: Some(503),
            attempts,
            reason,
        } = out
        else {
            panic!("{out:?}")
        };
        assert!(reason.contains("busy"), "{reason}");
        let received = s.fake.received();
        assert_eq!(received.len() as u32, attempts);
        // 0, 0.5, 1.5, 3.5 s; the next (7.5 s) would be past the deadline.
        assert_eq!(attempts, 4);
        for r in &received {
            assert!(
                r.at_ms + 1_000 <= c.ring_deadline_ms(),
                "an attempt started too late"
            );
        }
        assert!(s.fake.violations().is_empty(), "{:?}", s.fake.violations());
    }

    #[tokio::test(start_paused = true)]
    async fn dead_tokens_are_reported_not_retried() {
        for (answer, status) in [
            (FakeAnswer::status(410, "Unregistered"), 410),
            (FakeAnswer::status(400, "BadDeviceToken"), 400),
            (FakeAnswer::status(400, "DeviceTokenNotForTopic"), 400),
            (FakeAnswer::status(400, "TopicDisallowed"), 400),
        ] {
            let s = setup();
            s.fake.set_default(answer.clone());
            let out = s.bridge.ring_device(&call(&s, "c1", 30_000), &token('a')).await;
            assert!(
                matches!(&out, VoipOutcome::TokenInvalid { status: st, .. } if *st == status),
                "{answer:?} -> {out:?}"
            );
            assert_eq!(s.fake.received().len(), 1, "{answer:?} is not retried");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn other_refusals_fail_at_once() {
        let s = setup();
        s.fake
            .set_default(FakeAnswer::status(403, "ExpiredProviderToken"));
        let out = s.bridge.ring_device(&call(&s, "c1", 30_000), &token('a')).await;
        assert!(
            matches!(&out, VoipOutcome::Undeliverable { status: Some(403), attempts: 1, reason } if reason.contains("ExpiredProviderToken")),
            "{out:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn unreachable_apns_is_reported_at_once() {
        let s = setup();
        s.fake.set_default(FakeAnswer::Unreachable);
        let t0 = s.clock.now_ms();
        let out = s.bridge.ring_device(&call(&s, "c1", 30_000), &token('a')).await;
        assert!(
            matches!(&out, VoipOutcome::Undeliverable { status: None, attempts: 1, reason } if reason.contains("unreachable")),
            "{out:?}"
        );
        assert_eq!(s.clock.now_ms(), t0, "no waiting, no retry");
    }

    #[tokio::test(start_paused = true)]
    async fn silent_apns_never_holds_a_call_past_the_send_timeout() {
        let s = setup();
        s.fake.set_default(FakeAnswer::Hang);
        let t0 = s.clock.now_ms();
        let out = s.bridge.ring_device(&call(&s, "c1", 30_000), &token('a')).await;
        assert!(
            matches!(out, VoipOutcome::Undeliverable { status: None, .. }),
            "{out:?}"
        );
        assert_eq!(s.clock.now_ms() - t0, 2_000, "the send timeout");
        // With less ring time left than the send timeout, the ring time bounds it.
        let c = call(&s, "c2", 1_500);
        let t1 = s.clock.now_ms();
        s.bridge.ring_device(&c, &token('a')).await;
        assert_eq!(s.clock.now_ms() - t1, 1_500, "the ring deadline");
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_too_close_to_its_deadline_is_not_sent() {
        let s = setup();
        let out = s.bridge.ring_device(&call(&s, "c1", 900), &token('a')).await;
        assert!(matches!(out, VoipOutcome::Rejected { .. }), "{out:?}");
        assert!(s.fake.received().is_empty());
    }
}
