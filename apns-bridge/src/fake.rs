//! A faithful fake of APNs, for tests here, in the push-server and behind `apns-bridge serve
//! --fake-apns`. It sees each request as a2 would put it on the wire (the same [`a2_payload`]
//! conversion the real transport uses), checks it the way APNs does plus the VoIP contract
//! (push type, topic, priority, expiration not after the ring deadline, collapse id, payload size
//! and fields, sent while the call still rings), and answers what it was told to: any status and
//! reason, "unreachable", or never.
//!
//! A request that breaks a rule is recorded with its violations and answered as APNs would
//! (for example 413 `PayloadTooLarge`), so a bug shows up both as a failed call and as
//! [`FakeApns::violations`].

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
};

use tokio::sync::watch;

use crate::{
    apple::a2_payload,
    clock::{Clock, SystemClock},
    contract::{BundleId, MAX_COLLAPSE_ID, MAX_VOIP_PAYLOAD, VoipRequest},
    transport::{ApnsResponse, ApnsTransport, BoxFuture, TransportError},
};

/// What the fake answers to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FakeAnswer {
    /// An HTTP status and reason.
    Status {
        /// HTTP status.
        status: u16,
        /// APNs reason (`Unregistered`, `TooManyRequests`, ...).
        reason: Option<String>,
    },
    /// No connection (a site without internet).
    Unreachable,
    /// Accept the request and never answer.
    Hang,
}

impl FakeAnswer {
    /// 200.
    pub fn ok() -> Self {
        Self::Status {
            status: 200,
            reason: None,
        }
    }

    /// A status with a reason.
    pub fn status(status: u16, reason: &str) -> Self {
        Self::Status {
            status,
            reason: Some(reason.into()),
        }
    }

    /// Parse `200`, `410:Unregistered`, `unreachable` or `hang` (the `--fake-response` syntax).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "unreachable" => Some(Self::Unreachable),
            "hang" => Some(Self::Hang),
            _ => {
                let (status, reason) = match s.split_once(':') {
                    Some((st, r)) => (st, Some(r.to_string())),
                    None => (s, None),
                };
                Some(Self::Status {
                    status: status.parse().ok()?,
                    reason,
                })
            }
        }
    }
}

/// One request as the fake received it.
#[derive(Debug, Clone)]
pub struct Received {
    /// Token from the request path.
    pub device_token: String,
    /// `apns-*` headers as a2 would send them.
    pub headers: Vec<(&'static str, String)>,
    /// The JSON body.
    pub payload: String,
    /// `lpush.call_id` of the payload.
    pub call_id: String,
    /// `lpush.call_uuid` of the payload.
    pub call_uuid: String,
    /// When it arrived, Unix ms (the fake's clock).
    pub at_ms: i64,
    /// What the fake answered.
    pub answer: FakeAnswer,
    /// Rules it broke; empty for a good request.
    pub violations: Vec<String>,
}

impl Received {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

type Observer = Box<dyn Fn(&Received) + Send + Sync>;

struct State {
    default: FakeAnswer,
    scripted: HashMap<String, VecDeque<FakeAnswer>>,
    received: Vec<Received>,
    observer: Option<Observer>,
}

/// The fake APNs. Cheap to share (`Arc`); use it as the bridge's transport.
pub struct FakeApns {
    bundle: BundleId,
    clock: Arc<dyn Clock>,
    state: Mutex<State>,
    count: watch::Sender<usize>,
}

impl FakeApns {
    /// A fake for `bundle`'s VoIP topic that answers 200 unless told otherwise.
    pub fn new(bundle: BundleId) -> Arc<Self> {
        Self::with_clock(bundle, Arc::new(SystemClock))
    }

    /// Same, reading time from `clock`.
    pub fn with_clock(bundle: BundleId, clock: Arc<dyn Clock>) -> Arc<Self> {
        Arc::new(Self {
            bundle,
            clock,
            state: Mutex::new(State {
                default: FakeAnswer::ok(),
                scripted: HashMap::new(),
                received: Vec::new(),
                observer: None,
            }),
            count: watch::channel(0).0,
        })
    }

    /// Answer every request without a scripted answer with `answer`.
    pub fn set_default(&self, answer: FakeAnswer) {
        self.state.lock().expect("poisoned").default = answer;
    }

    /// Answer the next requests for `token` (hex, any case) with `answers`, in order; then the
    /// default.
    pub fn script(&self, token: &str, answers: impl IntoIterator<Item = FakeAnswer>) {
        self.state
            .lock()
            .expect("poisoned")
            .scripted
            .entry(token.to_ascii_lowercase())
            .or_default()
            .extend(answers);
    }

    /// Call `f` for every request, as it arrives (the binary prints them).
    pub fn observe(&self, f: impl Fn(&Received) + Send + Sync + 'static) {
        self.state.lock().expect("poisoned").observer = Some(Box::new(f));
    }

    /// Every request so far.
    pub fn received(&self) -> Vec<Received> {
        self.state.lock().expect("poisoned").received.clone()
    }

    /// Requests for one token (hex, any case).
    pub fn received_for(&self, token: &str) -> Vec<Received> {
        let token = token.to_ascii_lowercase();
        self.received()
            .into_iter()
            .filter(|r| r.device_token == token)
            .collect()
    }

    /// Every rule broken by any request so far, as `"<call id>: <rule>"`.
    pub fn violations(&self) -> Vec<String> {
        self.received()
            .iter()
            .flat_map(|r| r.violations.iter().map(move |v| format!("{}: {v}", r.call_id)))
            .collect()
    }

    /// Wait until at least `n` requests arrived; returns them all. Wrap it in a timeout.
    pub async fn wait_for(&self, n: usize) -> Vec<Received> {
        let mut rx = self.count.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = rx.wait_for(|c| *c >= n).await;
        self.received()
    }

    fn check(&self, request: &VoipRequest, now_ms: i64) -> (Received, Option<ApnsResponse>) {
        let a2 = a2_payload(request);
        let headers = a2.headers();
        let get = |k: &str| headers.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone());
        let payload = request.payload().to_string();
        let json: serde_json::Value = serde_json::from_str(&payload).unwrap_or_default();
        let l = &json["lpush"];
        let call_id = l["call_id"].as_str().unwrap_or_default().to_string();
        let call_uuid = l["call_uuid"].as_str().unwrap_or_default().to_string();
        let deadline = l["ring_deadline_ms"].as_i64();
        let mut violations = Vec::new();
        // (rule broken, APNs' answer to it); the first answer wins.
        let mut answer: Option<(u16, &str)> = None;
        let mut fail = |v: String, status: u16, reason: &'static str| {
            violations.push(v);
            answer.get_or_insert((status, reason));
        };
        let token = request.device_token().as_str();
        if token.is_empty() || !token.len().is_multiple_of(2) || !token.bytes().all(|b| b.is_ascii_hexdigit())
        {
            fail(
                format!("device token {token:?} is not hex"),
                400,
                "BadDeviceToken",
            );
        }
        if get("apns-push-type").as_deref() != Some("voip") {
            fail(
                format!("apns-push-type {:?}, want voip", get("apns-push-type")),
                400,
                "InvalidPushType",
            );
        }
        let topic = self.bundle.voip_topic();
        if get("apns-topic").as_deref() != Some(topic.as_str()) {
            fail(
                format!("apns-topic {:?}, want {topic}", get("apns-topic")),
                400,
                "BadTopic",
            );
        }
        if get("apns-priority").as_deref() != Some("10") {
            fail(
                format!("apns-priority {:?}, want 10", get("apns-priority")),
                400,
                "BadPriority",
            );
        }
        match (
            get("apns-expiration").and_then(|e| e.parse::<i64>().ok()),
            deadline,
        ) {
            (Some(0), _) => {}
            (Some(e), Some(d)) if e * 1000 <= d => {}
            (e, d) => fail(
                format!("apns-expiration {e:?} s is missing or after the ring deadline {d:?} ms"),
                400,
                "BadExpirationDate",
            ),
        }
        match get("apns-collapse-id") {
            Some(c) if c.len() <= MAX_COLLAPSE_ID && c == call_uuid && !c.is_empty() => {}
            c => fail(
                format!("apns-collapse-id {c:?} is not the call UUID {call_uuid:?} (at most 64 bytes)"),
                400,
                "BadCollapseId",
            ),
        }
        if payload.len() > MAX_VOIP_PAYLOAD {
            fail(
                format!("payload is {} bytes, over {MAX_VOIP_PAYLOAD}", payload.len()),
                413,
                "PayloadTooLarge",
            );
        }
        let complete = l["call_id"].is_string()
            && l["call_uuid"].is_string()
            && l["caller_name"].is_string()
            && l["caller_handle"].is_string()
            && l["video"].is_boolean()
            && l["created_at_ms"].is_i64()
            && deadline.is_some()
            && l["kind"] == "call_invite";
        if !complete {
            fail(
                format!("payload lacks fields the app needs to report the call: {payload}"),
                400,
                "PayloadEmpty",
            );
        }
        if deadline.is_some_and(|d| now_ms >= d) {
            // APNs would take it; the contract forbids it (the app would have to report a dead call).
            violations.push(format!("sent at {now_ms}, after the ring deadline {deadline:?}"));
        }
        let response = answer.map(|(status, reason)| ApnsResponse {
            status,
            reason: Some(reason.into()),
            apns_id: None,
        });
        let received = Received {
            device_token: token.to_string(),
            headers,
            payload,
            call_id,
            call_uuid,
            at_ms: now_ms,
            answer: FakeAnswer::ok(),
            violations,
        };
        (received, response)
    }
}

impl ApnsTransport for FakeApns {
    fn send<'a>(&'a self, request: &'a VoipRequest) -> BoxFuture<'a, Result<ApnsResponse, TransportError>> {
        let now = self.clock.now_ms();
        let (mut received, refused) = self.check(request, now);
        let answer = {
            let mut s = self.state.lock().expect("poisoned");
            let scripted = s
                .scripted
                .get_mut(&received.device_token)
                .and_then(VecDeque::pop_front);
            let answer = match refused {
                Some(r) => FakeAnswer::Status {
                    status: r.status,
                    reason: r.reason,
                },
                None => scripted.unwrap_or_else(|| s.default.clone()),
            };
            received.answer = answer.clone();
            if let Some(observer) = &s.observer {
                observer(&received);
            }
            s.received.push(received);
            let n = s.received.len();
            self.count.send_replace(n);
            answer
        };
        let n = self.count.borrow().to_string();
        Box::pin(async move {
            match answer {
                FakeAnswer::Status { status, reason } => Ok(ApnsResponse {
                    status,
                    reason,
                    apns_id: Some(format!("fake-{n}")),
                }),
                FakeAnswer::Unreachable => Err(TransportError::Unreachable(
                    "fake: no route to api.push.apple.com".into(),
                )),
                FakeAnswer::Hang => std::future::pending().await,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        clock::SystemClock,
        contract::{DeviceToken, VoipCall},
        test_invite,
    };

    fn request() -> VoipRequest {
        let now = SystemClock.now_ms();
        VoipCall::from_invite(test_invite("c1", now, now + 30_000))
            .unwrap()
            .request(
                &DeviceToken::parse(&"ab".repeat(32)).unwrap(),
                &BundleId::parse("com.example.ward").unwrap(),
                now,
                1000,
            )
            .unwrap()
    }

    async fn answer(fake: &FakeApns, r: &VoipRequest) -> (u16, Option<String>) {
        let a = fake.send(r).await.unwrap();
        (a.status, a.reason)
    }

    #[tokio::test]
    async fn the_fake_refuses_what_apns_or_the_contract_would() {
        let fake = FakeApns::new(BundleId::parse("com.example.ward").unwrap());
        let good = request();
        assert_eq!(answer(&fake, &good).await, (200, None));
        let cases: Vec<(VoipRequest, u16, &str)> = vec![
            (
                good.tampered(|f| *f.topic = "com.example.ward".into()),
                400,
                "BadTopic",
            ),
            (
                good.tampered(|f| *f.expiration = u64::MAX / 2000),
                400,
                "BadExpirationDate",
            ),
            (
                good.tampered(|f| *f.collapse_id = "x".repeat(65)),
                400,
                "BadCollapseId",
            ),
            (
                good.tampered(|f| f.payload.push_str(&" ".repeat(5120))),
                413,
                "PayloadTooLarge",
            ),
            (
                good.tampered(|f| *f.payload = "{\"aps\":{}}".into()),
                400,
                "BadExpirationDate",
            ),
        ];
        for (i, (r, status, reason)) in cases.iter().enumerate() {
            assert_eq!(
                answer(&fake, r).await,
                (*status, Some(reason.to_string())),
                "case {i}"
            );
        }
        assert_eq!(fake.received().len(), 6);
        assert_eq!(fake.received()[0].violations.len(), 0);
        assert!(fake.received()[1..].iter().all(|r| !r.violations.is_empty()));
        // Without the lpush fields the first check to fail is the expiration (no deadline to
        // compare with); the missing fields are recorded too.
        let last = fake.received().pop().unwrap();
        assert!(
            last.violations.iter().any(|v| v.contains("lacks fields")),
            "{:?}",
            last.violations
        );
    }

    #[tokio::test]
    async fn the_fake_answers_what_it_is_told() {
        let fake = FakeApns::new(BundleId::parse("com.example.ward").unwrap());
        let r = request();
        fake.script(&"AB".repeat(32), [FakeAnswer::parse("410:Unregistered").unwrap()]);
        assert_eq!(answer(&fake, &r).await, (410, Some("Unregistered".into())));
        assert_eq!(answer(&fake, &r).await, (200, None), "then the default");
        fake.set_default(FakeAnswer::parse("unreachable").unwrap());
        assert!(matches!(fake.send(&r).await, Err(TransportError::Unreachable(_))));
        assert_eq!(FakeAnswer::parse("hang"), Some(FakeAnswer::Hang));
        assert_eq!(
            FakeAnswer::parse("503"),
            Some(FakeAnswer::Status {
                status: 503,
                reason: None
            })
        );
        assert_eq!(FakeAnswer::parse("x"), None);
        assert_eq!(within_count(&fake).await, 3);
    }

    async fn within_count(fake: &FakeApns) -> usize {
        tokio::time::timeout(std::time::Duration::from_secs(5), fake.wait_for(3))
            .await
            .unwrap()
            .len()
    }
}
