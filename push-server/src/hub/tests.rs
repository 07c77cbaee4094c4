//! The hub's delivery invariants under any sequence of its public operations, including every
//! input a device controls (any floor, any epoch, acks for any numbers in any order). Any new
//! delivery core must pass the same checks.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use apns_bridge::{DeviceToken, VoipBridge, VoipCall, VoipOutcome};
use futures::future::BoxFuture;
use proptest::prelude::*;
use push_proto::device::{CancelReason, Hello, Push, push};

use super::{
    CallRequest, EncodedPush, Hub, MAX_FLOOR, MAX_SEQ, MessageRequest, clock::ManualClock, device::Effects,
    now_ms, timers::Timer,
};
use crate::{
    auth::DeviceClaims,
    config::Limits,
    store::{Receipt, ReceiptState, RedbStore, Store},
};

const DEVICES: [&str; 3] = ["d0", "d1", "d2"];

/// A hub over a real embedded store in a temporary directory.
struct Fixture {
    hub: Hub,
    clock: Arc<ManualClock>,
    rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

impl Fixture {
    fn new(voip: Option<Arc<dyn VoipBridge>>) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        // A worker of its own: the hub's background settles run while the test thread blocks.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let clock = Arc::new(ManualClock::new(now_ms()));
        let store: Arc<dyn Store> = Arc::new(RedbStore::open(&dir.path().join("store.redb")).expect("store"));
        let snapshot = store.load().expect("load");
        let hub = rt.block_on(async {
            let hub = Hub::new(store, Limits::default(), snapshot, voip, clock.clone());
            for d in DEVICES {
                hub.register_device(d, vec!["ward".into()])
                    .await
                    .expect("register");
            }
            hub
        });
        Self {
            hub,
            clock,
            rt,
            _dir: dir,
        }
    }

    /// The hub spawns from synchronous calls too: they need the runtime entered.
    fn enter(&self) -> tokio::runtime::EnterGuard<'_> {
        self.rt.enter()
    }

    fn claims(&self, device: &str) -> DeviceClaims {
        DeviceClaims {
            sub: device.into(),
            generation: self
                .hub
                .device(device)
                .map_or(0, |d| d.lock().core.record.credential_generation),
            iat: 0,
            exp: u64::MAX,
            aud: "lpush-device".into(),
        }
    }
}

/// A bridge that must never be called (the gate test forces the path without reaching it).
struct UnreachableBridge;

impl VoipBridge for UnreachableBridge {
    fn ring(&self, _call: VoipCall, _token: DeviceToken) -> BoxFuture<'_, VoipOutcome> {
        panic!("the gate must stop a non-call before the bridge")
    }
}

#[test]
fn a_panic_holding_a_device_lock_breaks_nothing_for_later_callers() {
    let f = Fixture::new(None);
    let _rt = f.enter();
    let device = f.hub.device("d0").expect("registered");
    let crashed = std::thread::spawn(move || {
        let _held = device.lock();
        panic!("a bug while deciding about d0");
    })
    .join();
    assert!(crashed.is_err());
    // Listing, sending to and logging in the device all still work.
    let listed = f.rt.block_on(f.hub.list_devices(Some("ward"), false));
    assert_eq!(listed.expect("listed").len(), 3);
    let sent =
        f.rt.block_on(f.hub.send_message(MessageRequest {
            device_ids: vec!["d0".into()],
            body: "after the crash".into(),
            ..Default::default()
        }))
        .expect("send");
    assert_eq!(sent.recipients[0].state, ReceiptState::Accepted);
    let login = f.hub.login(&f.claims("d0"), &Hello::default()).expect("login");
    f.hub.logout("d0", login.session_id, "test");
}

#[test]
fn a_non_call_at_the_voip_gate_is_stopped_and_counted() {
    let f = Fixture::new(Some(Arc::new(UnreachableBridge)));
    let _rt = f.enter();
    f.rt.block_on(
        f.hub
            .set_voip_token("d0", Some(DeviceToken::parse(&"ab".repeat(32)).unwrap())),
    )
    .expect("token");
    f.rt.block_on(f.hub.send_message(MessageRequest {
        device_ids: vec!["d0".into()],
        body: "not a call".into(),
        ..Default::default()
    }))
    .expect("send");
    let seq = *f
        .hub
        .device("d0")
        .unwrap()
        .lock()
        .core
        .outbox
        .keys()
        .next()
        .expect("queued");
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::with_local_recorder(&recorder, || {
        let device = f.hub.device("d0").unwrap();
        let mut fx = Effects::default();
        let cx = f.hub.ctx();
        device
            .lock()
            .core
            .start_voip(&mut fx, cx, seq, "forced by the test");
        assert!(fx.voip.is_empty(), "a message must never become a VoIP start");
    });
    let rendered = handle.render();
    assert!(
        rendered.contains("lpush_voip_non_call_pushes_total 1"),
        "{rendered}"
    );
    // The message is untouched: still queued for the local session.
    assert!(f.hub.device("d0").unwrap().lock().core.outbox.contains_key(&seq));
}

#[derive(Debug, Clone)]
enum Step {
    Send {
        to: Vec<usize>,
        ttl_secs: u32,
    },
    Call {
        to: Vec<usize>,
    },
    Cancel {
        call: usize,
    },
    /// `floor`: `None` for the device's true floor; `trusted`: send the store's epoch.
    Login {
        device: usize,
        floor: Option<u64>,
        trusted: bool,
    },
    Take {
        device: usize,
        max: usize,
    },
    Ack {
        device: usize,
        up_to: u64,
        seqs: Vec<u64>,
        of_written: bool,
    },
    Logout {
        device: usize,
    },
    Revoke {
        device: usize,
    },
    ExpireAll,
}

fn targets() -> impl Strategy<Value = Vec<usize>> {
    proptest::collection::vec(0..DEVICES.len(), 1..=3)
}

fn step() -> impl Strategy<Value = Step> {
    let floor = prop_oneof![
        Just(None),
        Just(Some(0)),
        (0u64..4096).prop_map(Some),
        Just(Some(MAX_FLOOR - 1)),
        Just(Some(MAX_SEQ - 1)),
        Just(Some(u64::MAX)),
        any::<u64>().prop_map(Some),
    ];
    prop_oneof![
        4 => (targets(), 1u32..5).prop_map(|(to, ttl_secs)| Step::Send { to, ttl_secs }),
        2 => targets().prop_map(|to| Step::Call { to }),
        1 => (0usize..4).prop_map(|call| Step::Cancel { call }),
        3 => (0..DEVICES.len(), floor, any::<bool>())
            .prop_map(|(device, floor, trusted)| Step::Login { device, floor, trusted }),
        4 => (0..DEVICES.len(), 1usize..4).prop_map(|(device, max)| Step::Take { device, max }),
        4 => (
            0..DEVICES.len(),
            prop_oneof![Just(0u64), 0u64..64, any::<u64>()],
            proptest::collection::vec(prop_oneof![0u64..64, any::<u64>()], 0..4),
            any::<bool>()
        )
            .prop_map(|(device, up_to, seqs, of_written)| Step::Ack { device, up_to, seqs, of_written }),
        1 => (0..DEVICES.len()).prop_map(|device| Step::Logout { device }),
        1 => (0..DEVICES.len()).prop_map(|device| Step::Revoke { device }),
        1 => Just(Step::ExpireAll),
    ]
}

/// What one device has seen, as its SDK would remember it.
#[derive(Default)]
struct Phone {
    session: Option<u64>,
    /// Highest sequence written to it in the current session.
    last_sent: u64,
    /// Its floor and the epoch that numbered it.
    floor: (u64, u64),
    /// Every push id written to this device, ever.
    written: HashSet<String>,
    /// Sequence -> id written in the current session (for acks of written pushes).
    current: BTreeMap<u64, String>,
}

struct Model {
    f: Fixture,
    phones: Vec<Phone>,
    calls: Vec<String>,
    receipts: tokio::sync::broadcast::Receiver<Receipt>,
    /// (id, device) accepted by the hub.
    accepted: HashSet<(String, String)>,
    /// (id, device) -> final receipts seen.
    finals: HashMap<(String, String), Vec<ReceiptState>>,
    next_call: usize,
}

impl Model {
    fn new() -> Self {
        let f = Fixture::new(None);
        let receipts = f.hub.subscribe_receipts();
        Self {
            f,
            phones: DEVICES.iter().map(|_| Phone::default()).collect(),
            calls: Vec::new(),
            receipts,
            accepted: HashSet::new(),
            finals: HashMap::new(),
            next_call: 0,
        }
    }

    fn apply(&mut self, step: Step) {
        let hub = self.f.hub.clone();
        let rt = self.f.rt.handle().clone();
        let _rt = rt.enter();
        match step {
            Step::Send { to, ttl_secs } => {
                let req = MessageRequest {
                    device_ids: to.iter().map(|i| DEVICES[*i].to_string()).collect(),
                    body: "m".into(),
                    ttl_secs,
                    ..Default::default()
                };
                if let Ok(sent) = self.f.rt.block_on(hub.send_message(req)) {
                    self.note_accepted(&sent.id, &sent.recipients);
                }
            }
            Step::Call { to } => {
                let call_id = format!("call-{}", self.next_call);
                self.next_call += 1;
                let req = CallRequest {
                    call_id: call_id.clone(),
                    device_ids: to.iter().map(|i| DEVICES[*i].to_string()).collect(),
                    caller_name: "Dr. A".into(),
                    ring_secs: 5,
                    ..Default::default()
                };
                if let Ok((sent, _)) = self.f.rt.block_on(hub.place_call(req)) {
                    self.note_accepted(&sent.id, &sent.recipients);
                    self.calls.push(call_id);
                }
            }
            Step::Cancel { call } => {
                if let Some(id) = self.calls.get(call).cloned() {
                    let cancel = format!("{id}#cancel");
                    if let Ok(n) = self
                        .f
                        .rt
                        .block_on(hub.cancel_call(&id, CancelReason::CallerCancelled))
                    {
                        // Cancels are pushes too: they must end in exactly one final receipt.
                        if n > 0 {
                            for d in DEVICES {
                                if self.device_has(&cancel, d) {
                                    self.accepted.insert((cancel.clone(), d.to_string()));
                                }
                            }
                        }
                    }
                }
            }
            Step::Login {
                device,
                floor,
                trusted,
            } => {
                let phone = &mut self.phones[device];
                let (true_floor, true_epoch) = phone.floor;
                let hello = Hello {
                    last_seen_seq: floor.unwrap_or(true_floor),
                    epoch: if trusted { true_epoch } else { hub.epoch() ^ 1 },
                    ..Default::default()
                };
                // Floors of 2^52 and above are refused by the session core before the hub; the
                // hub must still not break when one gets through.
                let claims = self.f.claims(DEVICES[device]);
                if let Ok(login) = hub.login(&claims, &hello) {
                    phone.session = Some(login.session_id);
                    phone.last_sent = hello.last_seen_seq.min(MAX_FLOOR - 1);
                    phone.current.clear();
                }
            }
            Step::Take { device, max } => {
                let phone = &mut self.phones[device];
                let Some(session) = phone.session else { return };
                let pushes = hub.take_pushes(DEVICES[device], session, phone.last_sent, max);
                let now = now_ms();
                let mut seqs = Vec::new();
                for p in pushes.iter().map(EncodedPush::decode) {
                    assert!(p.seq > phone.last_sent, "pushes come in order above the floor");
                    if let Some(push::Body::CallInvite(invite)) = &p.body {
                        assert!(invite.ring_deadline_ms > now, "no invite after its deadline");
                    }
                    phone.last_sent = p.seq;
                    phone.written.insert(p.id.clone());
                    phone.current.insert(p.seq, p.id.clone());
                    // The app saw it: the SDK's floor moves with it.
                    phone.floor = (p.seq, hub.epoch());
                    seqs.push(p.seq);
                }
                hub.mark_delivered(DEVICES[device], &seqs);
            }
            Step::Ack {
                device,
                up_to,
                seqs,
                of_written,
            } => {
                let phone = &self.phones[device];
                let Some(session) = phone.session else { return };
                let seqs: Vec<u64> = if of_written {
                    phone.current.keys().copied().collect()
                } else {
                    seqs
                };
                hub.ack(DEVICES[device], session, up_to, &seqs);
            }
            Step::Logout { device } => {
                if let Some(session) = self.phones[device].session.take() {
                    hub.logout(DEVICES[device], session, "test");
                }
            }
            Step::Revoke { device } => {
                self.f
                    .rt
                    .block_on(hub.revoke_device(DEVICES[device]))
                    .expect("revoke");
                self.phones[device].session = None;
                // A revoked device comes back only with a new credential.
                self.f
                    .rt
                    .block_on(hub.register_device(DEVICES[device], vec!["ward".into()]))
                    .expect("re-register");
            }
            Step::ExpireAll => {
                self.f.clock.advance(3_600_000);
                hub.fire_due();
            }
        }
        self.check();
    }

    fn device_has(&self, id: &str, device: &str) -> bool {
        self.f
            .hub
            .device(device)
            .is_some_and(|d| d.lock().core.outbox.values().any(|q| q.push.id == id))
    }

    fn note_accepted(&mut self, id: &str, recipients: &[super::RecipientOutcome]) {
        for r in recipients {
            if r.state == ReceiptState::Accepted {
                self.accepted.insert((id.to_string(), r.device_id.clone()));
            }
        }
    }

    /// Invariants after every step.
    fn check(&mut self) {
        // The rendezvous of the broadcast and the model: drain what was announced.
        while let Ok(r) = self.receipts.try_recv() {
            if r.state == ReceiptState::Acked {
                let phone = &self.phones[DEVICES.iter().position(|d| *d == r.device_id).expect("known")];
                assert!(
                    phone.written.contains(&r.id),
                    "{} reported ACKED for {} that never reached it",
                    r.id,
                    r.device_id
                );
            }
            if r.state.is_final() {
                self.finals.entry((r.id, r.device_id)).or_default().push(r.state);
            }
        }
        for (i, d) in DEVICES.iter().enumerate() {
            let view = self.f.rt.block_on(self.f.hub.device_view(d)).expect("registered");
            assert_eq!(
                view.online,
                self.phones[i].session.is_some() && !view.record.revoked
            );
            let dev = self.f.hub.device(d).expect("registered");
            let state = dev.lock();
            let core = &state.core;
            assert!(core.next_seq < MAX_SEQ, "numbers stay below 2^53");
            assert!(core.outbox.keys().all(|s| *s < core.next_seq));
        }
    }

    /// After everything expired: every accepted push ended in exactly one final receipt (a
    /// call: one outcome, after at most one ACKED, its ring).
    fn finish(mut self) {
        let rt = self.f.rt.handle().clone();
        let _rt = rt.enter();
        self.f.clock.advance(3_600_000);
        self.f.hub.fire_due();
        self.check();
        let ends = |(id, _): &(String, String), finals: &[ReceiptState]| {
            let call = id.starts_with("call-") && !id.contains('#');
            let rang = finals
                .iter()
                .filter(|s| call && **s == ReceiptState::Acked)
                .count();
            assert!(
                rang <= 1 && (rang == 0 || finals[0] == ReceiptState::Acked),
                "{id}: {finals:?}"
            );
            finals.len() - rang
        };
        for key in &self.accepted {
            let finals = self.finals.get(key).map_or(&[][..], Vec::as_slice);
            assert_eq!(ends(key, finals), 1, "{key:?} ended with {finals:?}");
        }
        for (key, finals) in &self.finals {
            assert_eq!(ends(key, finals), 1, "{key:?} ended with {finals:?}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn delivery_invariants_hold_for_any_operations(steps in proptest::collection::vec(step(), 1..40)) {
        let mut model = Model::new();
        for step in steps {
            model.apply(step);
        }
        model.finish();
    }
}

#[test]
fn renumbered_pushes_keep_their_content_and_deadline() {
    let f = Fixture::new(None);
    let _rt = f.enter();
    let sent =
        f.rt.block_on(f.hub.send_message(MessageRequest {
            device_ids: vec!["d0".into()],
            body: "queued".into(),
            ..Default::default()
        }))
        .expect("send");
    let hello = Hello {
        last_seen_seq: 5000,
        ..Default::default()
    };
    let login = f.hub.login(&f.claims("d0"), &hello).expect("login");
    // Durable a commit later: wait for the reservation, then take.
    f.rt.block_on(async {
        for _ in 0..200 {
            if f.hub.device("d0").unwrap().lock().core.durable_ceiling > 5001 {
                break;
            }
            login.ctl.woken().await;
        }
    });
    let pushes = f.hub.take_pushes("d0", login.session_id, 5000, 10);
    assert_eq!(pushes.len(), 1);
    let p: &Push = &pushes[0].decode();
    assert_eq!((p.id.as_str(), p.seq), (sent.id.as_str(), 5001));
    assert!(matches!(&p.body, Some(push::Body::Message(m)) if m.body == "queued"));
    let timers = f.hub.0.timers.lock();
    let expiry = |seq| (sent.expires_at_ms, Timer::Expire, "d0".to_string(), seq);
    assert!(
        timers.contains(&expiry(5001)),
        "the expiry follows the new number"
    );
    assert_eq!(timers.len(), 1, "and the old number's expiry is gone");
}

#[test]
fn a_phone_reports_its_clock_at_hello_and_a_wild_one_cannot_overflow() {
    use super::clock::Clock as _;
    let f = Fixture::new(None);
    let _rt = f.enter();
    let now = f.clock.now_ms();
    let offset = |device: &str| {
        f.rt.block_on(f.hub.list_devices(None, true))
            .expect("list")
            .into_iter()
            .find(|v| v.record.device_id == device)
            .map(|v| v.clock_offset_ms)
    };
    for (device, device_time_ms, expected) in [
        ("d0", now - 42_000, Some(-42_000)),
        ("d1", 0, None),
        ("d2", i64::MIN, Some(i64::MIN)),
        // A new session replaces the old one's report.
        ("d0", i64::MAX, Some(i64::MAX - now)),
    ] {
        let hello = Hello {
            device_time_ms,
            ..Default::default()
        };
        f.hub.login(&f.claims(device), &hello).expect("login");
        assert_eq!(offset(device), Some(expected), "{device}");
    }
}
