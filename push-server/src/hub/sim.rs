//! Deterministic simulations of whole call and delivery journeys, in the style of quinn's
//! `Pair`: the real hub and the real session core, a fake store that commits at once, a fake
//! APNs bridge, and virtual time moved by the test. Races that real-time tests reach only by
//! luck (an ack against a cancel, against the ring deadline, against the ack window) are played
//! here in a chosen order, every time.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use apns_bridge::{DeviceToken, VoipBridge, VoipCall, VoipOutcome};
use futures::{FutureExt as _, future::BoxFuture};
use parking_lot::Mutex;
use push_proto::{
    device::{Ack, CancelReason, ClientFrame, GoodbyeReason, Hello, Push, client_frame, push, server_frame},
    frame::DEFAULT_MAX_FRAME,
};
use tokio::sync::{broadcast, mpsc, oneshot};

use super::{CallRequest, Hub, Login, MessageRequest, SendError, clock::ManualClock, now_ms};
use crate::{
    auth::DeviceClaims,
    config::Limits,
    session::core::{Event, Session, Timing, Welcome},
    store::{
        ApiKeyRecord, Op, Receipt, ReceiptState, RequestRecord, Snapshot, Store, StoreError, StoredPush,
    },
};

/// A store that commits every batch at once, in memory (the sim's disk), unless its commits
/// are held: then batches wait, in order, until released (a slow disk, in a chosen order).
#[derive(Default)]
struct MemStore {
    pushes: Mutex<BTreeMap<(String, u64), StoredPush>>,
    receipts: Mutex<BTreeMap<(String, String), Receipt>>,
    held: Mutex<Option<Vec<Held>>>,
    /// The number of pushes each batch that stored any stored.
    push_batches: Mutex<Vec<usize>>,
    /// Batches to refuse, from the next one (applying nothing of them, as the contract says).
    fail_next: AtomicUsize,
}

type Held = (Vec<Op>, oneshot::Sender<Result<(), StoreError>>);

impl MemStore {
    /// Hold every commit from now on.
    fn hold(&self) {
        self.held.lock().get_or_insert_with(Vec::new);
    }

    /// Commit what was held, in order, and commit at once again.
    fn release(&self) {
        for (ops, answer) in self.held.lock().take().unwrap_or_default() {
            self.apply(ops);
            let _ = answer.send(Ok(()));
        }
    }

    fn apply(&self, ops: Vec<Op>) {
        for op in ops {
            match op {
                Op::PutPush(p) => {
                    self.pushes.lock().insert((p.device_id.clone(), p.seq), p);
                }
                Op::DeletePush { device_id, seq } => {
                    self.pushes.lock().remove(&(device_id, seq));
                }
                Op::PutReceipt(r) => {
                    self.receipts
                        .lock()
                        .insert((r.id.clone(), r.device_id.clone()), r);
                }
                // Devices, ceilings, requests and keys play no part in these journeys.
                _ => {}
            }
        }
    }
}

impl Store for MemStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        Ok(Snapshot {
            epoch: 7,
            ..Snapshot::default()
        })
    }

    fn submit(&self, ops: Vec<Op>) -> oneshot::Receiver<Result<(), StoreError>> {
        let (tx, rx) = oneshot::channel();
        let fail = |n: usize| n.checked_sub(1);
        if self
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, fail)
            .is_ok()
        {
            let _ = tx.send(Err(StoreError::Io("disk full".into())));
            return rx;
        }
        let stored = ops.iter().filter(|op| matches!(op, Op::PutPush(_))).count();
        if stored > 0 {
            self.push_batches.lock().push(stored);
        }
        if let Some(held) = &mut *self.held.lock() {
            held.push((ops, tx));
            return rx;
        }
        self.apply(ops);
        let _ = tx.send(Ok(()));
        rx
    }

    fn receipts(&self, id: &str) -> Result<Vec<Receipt>, StoreError> {
        let all = self.receipts.lock();
        Ok(all.values().filter(|r| r.id == id).cloned().collect())
    }

    fn request(&self, _id: &str) -> Result<Option<RequestRecord>, StoreError> {
        Ok(None)
    }

    fn api_key(&self, _hash: &str) -> Result<Option<ApiKeyRecord>, StoreError> {
        Ok(None)
    }

    fn api_keys(&self) -> Result<Vec<(String, ApiKeyRecord)>, StoreError> {
        Ok(Vec::new())
    }

    fn close(&self) {}
}

/// An APNs bridge that reports every ring and answers `Delivered`.
struct FakeBridge(mpsc::UnboundedSender<String>);

impl VoipBridge for FakeBridge {
    fn ring(&self, call: VoipCall, _token: DeviceToken) -> BoxFuture<'_, VoipOutcome> {
        let _ = self.0.send(call.call_id().to_string());
        Box::pin(async {
            VoipOutcome::Delivered {
                apns_id: None,
                attempts: 1,
            }
        })
    }
}

const TOKEN: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

/// The world: hub, store, bridge, clock, and every receipt announced.
struct Sim {
    hub: Hub,
    clock: Arc<ManualClock>,
    store: Arc<MemStore>,
    rung: mpsc::UnboundedReceiver<String>,
    receipts: broadcast::Receiver<Receipt>,
}

impl Sim {
    /// Devices `d0..dN` registered with a PushKit token, the APNs fallback on.
    async fn new(devices: usize) -> Self {
        let clock = Arc::new(ManualClock::new(now_ms()));
        let store = Arc::new(MemStore::default());
        let (tx, rung) = mpsc::unbounded_channel();
        let hub = Hub::new(
            store.clone(),
            Limits::default(),
            store.load().expect("load"),
            Some(Arc::new(FakeBridge(tx))),
            clock.clone(),
        );
        for i in 0..devices {
            let id = format!("d{i}");
            hub.register_device(&id, vec!["ward".into()])
                .await
                .expect("register");
            let token = DeviceToken::parse(TOKEN).expect("token");
            hub.set_voip_token(&id, Some(token)).await.expect("token");
        }
        let receipts = hub.subscribe_receipts();
        Self {
            hub,
            clock,
            store,
            rung,
            receipts,
        }
    }

    /// Move virtual time and fire what is due.
    fn advance(&self, ms: i64) {
        self.clock.advance(ms);
        self.hub.fire_due();
    }

    /// Every receipt announced since the last call, as `(id, device, state, path)`.
    fn announced(&mut self) -> Vec<(String, String, ReceiptState, String)> {
        let mut out = Vec::new();
        while let Ok(r) = self.receipts.try_recv() {
            out.push((r.id, r.device_id, r.state, r.path));
        }
        out
    }

    /// Wait for the next receipt (one produced by a spawned task, such as the bridge's answer).
    async fn next_receipt(&mut self) -> Receipt {
        tokio::time::timeout(Duration::from_secs(10), self.receipts.recv())
            .await
            .expect("a receipt in time")
            .expect("receipt stream")
    }

    async fn call(&self, id: &str, to: &[&str], ring_secs: u32) {
        self.hub
            .place_call(CallRequest {
                call_id: id.into(),
                device_ids: to.iter().map(|d| d.to_string()).collect(),
                caller_name: "Ward 4B".into(),
                ring_secs,
                ..Default::default()
            })
            .await
            .expect("call placed");
    }

    async fn message(&self, id: &str, to: &str) {
        self.hub
            .send_message(MessageRequest {
                id: id.into(),
                device_ids: vec![to.into()],
                body: "hello".into(),
                ..Default::default()
            })
            .await
            .expect("sent");
    }

    /// Open a session for `device` through the session core, as the session driver does.
    fn connect(&self, device: &str) -> Phone {
        let timing = Timing {
            hello_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(30),
            heartbeat_timeout: Duration::from_secs(10),
        };
        let now = Instant::now();
        let mut session = Session::new(now, timing, DEFAULT_MAX_FRAME);
        let hello = Hello {
            instance_id: format!("{device}-instance"),
            ..Default::default()
        };
        session.handle_frame(
            now,
            ClientFrame {
                kind: Some(client_frame::Kind::Hello(hello)),
            },
        );
        let Some(Event::Hello(hello)) = session.poll_event() else {
            panic!("the session core must surface the hello");
        };
        let generation = self
            .hub
            .device(device)
            .expect("registered")
            .lock()
            .core
            .record
            .credential_generation;
        let claims = DeviceClaims {
            sub: device.into(),
            generation,
            iat: 0,
            exp: u64::MAX,
            aud: "lpush-device".into(),
        };
        let login = self.hub.login(&claims, &hello).expect("login");
        let welcome = Welcome {
            session_id: login.session_id,
            epoch: self.hub.epoch(),
            ..Default::default()
        };
        session.accept(now, welcome, hello.last_seen_seq);
        Phone {
            device: device.into(),
            session,
            login,
            app: Vec::new(),
        }
    }
}

/// One phone: the server's session core for it, and what its app was shown.
struct Phone {
    device: String,
    session: Session,
    login: Login,
    /// Push ids the app saw, in order, each once (the SDK de-duplicates by id).
    app: Vec<String>,
}

impl Phone {
    /// Write what the hub has for this session, as the driver does; returns the pushes written.
    fn pump(&mut self, hub: &Hub) -> Vec<Push> {
        let pushes = hub.take_pushes(
            &self.device,
            self.login.session_id,
            self.session.last_sent_seq(),
            64,
        );
        let mut written = Vec::new();
        for p in pushes {
            self.session.push(p);
        }
        for f in self.session.poll_frames() {
            if let server_frame::Kind::Push(p) = f {
                if !self.app.contains(&p.id) {
                    self.app.push(p.id.clone());
                }
                written.push(p);
            }
        }
        let seqs: Vec<u64> = written.iter().map(|p| p.seq).collect();
        hub.mark_delivered(&self.device, &seqs);
        written
    }

    /// The phone acknowledges `seqs`; the session core turns the frame into the hub's ack.
    fn ack(&mut self, hub: &Hub, seqs: &[u64]) {
        let ack = Ack {
            up_to_seq: 0,
            seqs: seqs.to_vec(),
        };
        self.session.handle_frame(
            Instant::now(),
            ClientFrame {
                kind: Some(client_frame::Kind::Ack(ack)),
            },
        );
        while let Some(event) = self.session.poll_event() {
            if let Event::Acked(a) = event {
                hub.ack(&self.device, self.login.session_id, a.up_to_seq, &a.seqs);
            }
        }
    }
}

fn states_of(announced: &[(String, String, ReceiptState, String)], id: &str) -> Vec<ReceiptState> {
    announced
        .iter()
        .filter(|(i, ..)| i == id)
        .map(|(_, _, s, _)| *s)
        .collect()
}

#[tokio::test]
async fn a_cancel_racing_a_late_ack_ends_the_call_once_and_the_phone_hears_the_cancel() {
    let mut sim = Sim::new(1).await;
    let mut phone = sim.connect("d0");
    sim.call("c1", &["d0"], 30).await;
    let invite = phone.pump(&sim.hub);
    assert_eq!(invite.len(), 1, "the invite is written");
    sim.hub
        .cancel_call("c1", CancelReason::CallerCancelled)
        .await
        .expect("cancel");
    // The phone's ack for the invite was already on the wire when the cancel was decided.
    phone.ack(&sim.hub, &[invite[0].seq]);
    let cancel = phone.pump(&sim.hub);
    assert!(
        matches!(&cancel[..], [p] if matches!(p.body, Some(push::Body::CallCancel(_)))),
        "a phone that was written the invite gets the cancel: {cancel:?}"
    );
    let announced = sim.announced();
    assert_eq!(
        states_of(&announced, "c1"),
        vec![
            ReceiptState::Accepted,
            ReceiptState::Delivered,
            ReceiptState::Cancelled
        ],
        "exactly one final outcome, and no ACKED after CANCELLED"
    );
    assert!(
        sim.rung.try_recv().is_err(),
        "a ringing local session needs no VoIP push"
    );
}

#[tokio::test]
async fn an_invite_unacknowledged_for_the_ack_window_rings_through_apns_once() {
    let mut sim = Sim::new(1).await;
    let mut phone = sim.connect("d0");
    sim.call("c1", &["d0"], 30).await;
    let invite = phone.pump(&sim.hub);
    let window = sim.hub.limits().call_ack_window_ms as i64;
    sim.advance(window - 1);
    assert!(sim.rung.try_recv().is_err(), "not before the window ends");
    sim.advance(1);
    assert_eq!(sim.rung.recv().await.as_deref(), Some("c1"));
    // The bridge's answer is applied by the task that rang: wait for its receipt.
    loop {
        let r = sim.next_receipt().await;
        if r.path == "apns" {
            assert_eq!((r.id.as_str(), r.state), ("c1", ReceiptState::Delivered));
            break;
        }
    }
    sim.advance(window * 3);
    assert!(sim.rung.try_recv().is_err(), "one VoIP push per invite, ever");
    phone.ack(&sim.hub, &[invite[0].seq]);
    let announced = sim.announced();
    assert_eq!(states_of(&announced, "c1"), vec![ReceiptState::Acked]);
    assert!(
        sim.store.pushes.lock().is_empty(),
        "the acked invite left the store"
    );
}

#[tokio::test]
async fn a_ring_deadline_that_passes_first_makes_a_late_ack_harmless() {
    let mut sim = Sim::new(1).await;
    let mut phone = sim.connect("d0");
    sim.call("c1", &["d0"], 10).await;
    let invite = phone.pump(&sim.hub);
    sim.rung.try_recv().ok();
    sim.advance(10_000);
    phone.ack(&sim.hub, &[invite[0].seq]);
    let states = states_of(&sim.announced(), "c1");
    // Written to the phone, it rang: nobody answered by the deadline.
    assert_eq!(states.last(), Some(&ReceiptState::Missed));
    assert!(!states.contains(&ReceiptState::Acked), "{states:?}");
    let stored = sim.store.receipts("c1").expect("receipts");
    assert_eq!(
        stored[0].state,
        ReceiptState::Missed,
        "the stored receipt is the announced one"
    );
    // The phone is told it missed the call; once it took that, no timer is left.
    let told = phone.pump(&sim.hub);
    let Some(push::Body::CallCancel(cancel)) = told.first().and_then(|p| p.body.clone()) else {
        panic!("expected the missed call's cancel: {told:?}")
    };
    assert_eq!(cancel.reason(), CancelReason::Missed);
    phone.ack(&sim.hub, &[told[0].seq]);
    assert_eq!(sim.hub.0.timers.lock().len(), 0, "no timer outlives its push");
}

#[tokio::test]
async fn a_replaced_session_can_neither_take_nor_ack_and_the_app_sees_each_push_once() {
    let mut sim = Sim::new(1).await;
    let mut old = sim.connect("d0");
    sim.message("m1", "d0").await;
    let written = old.pump(&sim.hub);
    let mut new = sim.connect("d0");
    assert_eq!(
        old.login.ctl.take_stop().map(|(r, _)| r),
        Some(GoodbyeReason::Replaced)
    );
    old.ack(&sim.hub, &[written[0].seq]);
    sim.message("m2", "d0").await;
    assert!(old.pump(&sim.hub).is_empty(), "the old session takes nothing");
    assert_eq!(
        states_of(&sim.announced(), "m1"),
        vec![ReceiptState::Accepted, ReceiptState::Delivered],
        "an ack on the replaced session is not the device's word"
    );
    let replay = new.pump(&sim.hub);
    new.ack(&sim.hub, &replay.iter().map(|p| p.seq).collect::<Vec<_>>());
    assert_eq!(new.app, vec!["m1".to_string(), "m2".to_string()]);
    let announced = sim.announced();
    assert_eq!(states_of(&announced, "m1").last(), Some(&ReceiptState::Acked));
    assert_eq!(states_of(&announced, "m2").last(), Some(&ReceiptState::Acked));
}

#[tokio::test]
async fn a_session_lost_mid_ring_falls_back_at_once_and_the_cancel_waits_for_the_next_session() {
    let mut sim = Sim::new(2).await;
    let mut d0 = sim.connect("d0");
    sim.call("c1", &["d0", "d1"], 30).await;
    // d1 has no session: it rings through APNs as soon as the invites are durable.
    assert_eq!(sim.rung.recv().await.as_deref(), Some("c1"));
    d0.pump(&sim.hub);
    sim.hub.logout("d0", d0.login.session_id, "network lost");
    assert_eq!(
        sim.rung.recv().await.as_deref(),
        Some("c1"),
        "d0 rings through APNs too"
    );
    let sent = sim
        .hub
        .cancel_call("c1", CancelReason::CallerCancelled)
        .await
        .expect("cancel");
    assert_eq!(sent, 2, "both phones may be ringing: both get a cancel");
    let mut back = sim.connect("d0");
    let pushes = back.pump(&sim.hub);
    assert!(
        matches!(&pushes[..], [p] if matches!(p.body, Some(push::Body::CallCancel(_)))),
        "back on-site, the phone gets only the cancel: {pushes:?}"
    );
}

#[tokio::test]
async fn acked_and_expired_pushes_leave_no_timer_behind() {
    let sim = Sim::new(1).await;
    let mut phone = sim.connect("d0");
    for i in 0..100 {
        sim.message(&format!("m{i}"), "d0").await;
    }
    assert_eq!(sim.hub.0.timers.lock().len(), 100);
    let written = phone.pump(&sim.hub);
    phone.ack(&sim.hub, &written.iter().map(|p| p.seq).collect::<Vec<_>>());
    assert_eq!(sim.hub.0.timers.lock().len(), 100 - written.len());
    sim.advance(i64::from(sim.hub.limits().max_ttl_secs) * 1000);
    assert_eq!(sim.hub.0.timers.lock().len(), 0);
    assert!(sim.store.pushes.lock().is_empty());
}

#[tokio::test]
async fn a_watcher_of_a_live_call_reads_it_from_memory_but_only_what_the_store_holds() {
    let sim = Sim::new(2).await;
    let (mut d0, mut d1) = (sim.connect("d0"), sim.connect("d1"));
    sim.call("c1", &["d0"], 30).await;
    sim.call("c2", &["d1"], 30).await;
    let invite = d0.pump(&sim.hub);
    d0.ack(&sim.hub, &[invite[0].seq]);
    let ringing = d1.pump(&sim.hub);
    // A busy disk: nothing submitted from now on is durable until released.
    sim.store.hold();
    let c1 = sim.hub.call_receipts("c1").now_or_never();
    let states = |rs: Vec<Receipt>| rs.into_iter().map(|r| (r.device_id, r.state)).collect::<Vec<_>>();
    assert_eq!(
        c1.map(|r| states(r.expect("read"))),
        Some(vec![("d0".to_string(), ReceiptState::Acked)]),
        "a live call's stored state is answered at once, with no barrier behind the busy disk"
    );
    // d1 acks while the disk is busy: its ACKED is not reported before the store holds it.
    d1.ack(&sim.hub, &[ringing[0].seq]);
    let mut c2 = Box::pin(sim.hub.call_receipts("c2"));
    assert!(
        futures::poll!(c2.as_mut()).is_pending(),
        "ACKED is not stored yet"
    );
    sim.store.release();
    assert_eq!(
        states(c2.await.expect("read")),
        vec![("d1".to_string(), ReceiptState::Acked)]
    );
    assert_eq!(
        sim.store.receipts("c2").expect("stored")[0].state,
        ReceiptState::Acked,
        "what the watcher was told is what the store holds"
    );
}

#[tokio::test]
async fn a_receipt_of_another_call_does_not_wake_a_call_watcher() {
    let sim = Sim::new(2).await;
    let mut watcher = sim.hub.watch_receipts("c1").expect("watch");
    sim.call("c2", &["d1"], 30).await;
    assert!(
        watcher.recv().now_or_never().is_none(),
        "c2's receipts are not c1's watcher's business"
    );
    sim.call("c1", &["d0"], 30).await;
    let heard = watcher.recv().now_or_never();
    assert!(
        matches!(&heard, Some(super::Heard::Item(r)) if r.id == "c1" && r.state == ReceiptState::Accepted),
        "{heard:?}"
    );
}

#[tokio::test]
async fn a_group_send_is_one_store_batch_per_256_recipients_and_every_phone_reads_the_message() {
    let mut sim = Sim::new(300).await;
    let mut phones: Vec<Phone> = (0..300).map(|i| sim.connect(&format!("d{i}"))).collect();
    sim.store.push_batches.lock().clear();
    let sent = sim
        .hub
        .send_message(MessageRequest {
            group: Some("ward".into()),
            title: "Code blue".into(),
            body: "Ward 4B, bed 12".into(),
            data: vec![7, 0, 255],
            priority: 2,
            sender: "Nurse call".into(),
            ..Default::default()
        })
        .await
        .expect("sent");
    assert!(sent.recipients.iter().all(|r| r.state == ReceiptState::Accepted));
    assert_eq!(
        *sim.store.push_batches.lock(),
        vec![256, 44],
        "one batch per 256 recipients"
    );
    for phone in &mut phones {
        let written = phone.pump(&sim.hub);
        let [push] = &written[..] else {
            panic!("{} was written {written:?}", phone.device);
        };
        assert_eq!(push.id, sent.id);
        let Some(push::Body::Message(m)) = &push.body else {
            panic!("not a message: {push:?}");
        };
        assert_eq!(
            (
                m.title.as_str(),
                m.body.as_str(),
                &m.data[..],
                m.priority,
                m.sender.as_str()
            ),
            ("Code blue", "Ward 4B, bed 12", &[7, 0, 255][..], 2, "Nurse call")
        );
        assert_eq!(m.expires_at_ms, sent.expires_at_ms);
    }
    let delivered = sim
        .announced()
        .into_iter()
        .filter(|(id, _, state, _)| *id == sent.id && *state == ReceiptState::Delivered)
        .count();
    assert_eq!(delivered, 300);
}

#[tokio::test]
async fn a_group_send_whose_batch_fails_leaves_nothing_queued_or_stored() {
    let mut sim = Sim::new(3).await;
    let mut phones: Vec<Phone> = (0..3).map(|i| sim.connect(&format!("d{i}"))).collect();
    sim.announced();
    sim.store.fail_next.store(1, Ordering::SeqCst);
    let sent = sim
        .hub
        .send_message(MessageRequest {
            group: Some("ward".into()),
            body: "lost".into(),
            ..Default::default()
        })
        .await;
    assert!(matches!(sent, Err(SendError::Store(_))), "{sent:?}");
    assert_eq!(
        sim.store.fail_next.load(Ordering::SeqCst),
        0,
        "one batch for the group"
    );
    for phone in &mut phones {
        assert!(
            phone.pump(&sim.hub).is_empty(),
            "{} is sent nothing",
            phone.device
        );
        let device = sim.hub.device(&phone.device).expect("registered");
        assert!(
            device.lock().core.outbox.is_empty(),
            "{} has nothing queued",
            phone.device
        );
    }
    assert!(sim.store.pushes.lock().is_empty(), "nothing stored");
    let finals: Vec<ReceiptState> = sim
        .announced()
        .into_iter()
        .map(|(_, _, state, _)| state)
        .filter(|s| s.is_final())
        .collect();
    assert_eq!(
        finals,
        vec![ReceiptState::Undeliverable; 3],
        "each recipient is told"
    );
}
