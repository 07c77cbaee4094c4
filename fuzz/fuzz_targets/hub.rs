//! The hub's device-facing inputs over a real `RedbStore`: a registered device with queued
//! messages logs in with a `Hello` of any field values (any `last_seen_seq` and `epoch`), acks
//! any sequence sets in any order, takes pushes above any sequence, reports deliveries and logs
//! out, while senders queue and cancel. Nothing a peer sends may panic the hub.
//!
//! One store and hub per process (in memory when /dev/shm exists) and a fresh device, with its
//! own call ids, per input: a crash depends on that device's state only, so it reproduces from
//! its input alone. (A store per input waits for a store open and its writer thread each time,
//! and ran at 16 inputs/s on the shared machine.) Beyond "never panics": `take_pushes` returns
//! at most `max` pushes, in increasing order, all above the sequence asked for.
#![no_main]

use std::sync::{
    Arc, OnceLock,
    atomic::{AtomicU64, Ordering},
};

use libfuzzer_sys::fuzz_target;
use lpush_fuzz::{Script, hub_in, hub_tag as tag, runtime, scratch_dir};
use push_proto::device::{CancelReason, Hello};
use push_server::{
    auth::DeviceClaims,
    config::Limits,
    hub::{CallRequest, Hub, MessageRequest},
    store::RedbStore,
};

struct World {
    rt: tokio::runtime::Runtime,
    hub: Hub,
    _store: Arc<RedbStore>,
    _dir: tempfile::TempDir,
    inputs: AtomicU64,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let dir = scratch_dir();
        let rt = runtime();
        let (hub, store) = {
            let _enter = rt.enter();
            hub_in(dir.path(), Limits::default())
        };
        World {
            rt,
            hub,
            _store: store,
            _dir: dir,
            inputs: AtomicU64::new(0),
        }
    })
}

/// Live sessions as (id, last sequence taken).
struct Sessions(Vec<(u64, u64)>);

impl Sessions {
    /// A session this input opened, or any id when there is none (a stale or foreign one).
    fn pick(&mut self, i: u8) -> &mut (u64, u64) {
        if self.0.is_empty() {
            self.0.push((u64::from(i), 0));
        }
        let n = self.0.len();
        &mut self.0[usize::from(i) % n]
    }
}

fn message(hub: &Hub, rt: &tokio::runtime::Runtime, device: &str, ttl_secs: u8) {
    let req = MessageRequest {
        device_ids: vec![device.into()],
        title: "Bed 12".into(),
        body: "Patient asks for you".into(),
        ttl_secs: u32::from(ttl_secs),
        ..Default::default()
    };
    rt.block_on(hub.send_message(req))
        .expect("a message to a registered device queues");
}

fn settle(hub: &Hub, rt: &tokio::runtime::Runtime) {
    rt.block_on(async {
        // The store commits batches in order: once this one is durable, so is every earlier one.
        hub.register_device("settle", Vec::new())
            .await
            .expect("store accepts");
        // Let the hub's spawned settle tasks, now ready, run.
        for _ in 0..8 {
            tokio::task::yield_now().await;
        }
    });
}

fuzz_target!(|data: &[u8]| {
    let mut s = Script::new(data);
    let w = world();
    let (rt, hub) = (&w.rt, &w.hub);
    let _enter = rt.enter();
    let n = w.inputs.fetch_add(1, Ordering::Relaxed);
    let device = format!("phone-{n}");
    let call_id = |k: u8| format!("call-{n}-{}", k % 4);
    let generation = rt
        .block_on(hub.register_device(&device, vec!["ward:4B".into()]))
        .expect("device registers");
    for _ in 0..s.u8() % 4 {
        message(hub, rt, &device, 0);
    }
    let mut sessions = Sessions(Vec::new());
    while !s.is_empty() {
        match s.u8() % tag::COUNT {
            tag::LOGIN => {
                let hello = Hello {
                    credential: String::new(),
                    sdk_version: "fuzz".into(),
                    last_seen_seq: s.u64(),
                    epoch: s.u64(),
                    ssid: s.string(),
                    instance_id: s.string(),
                    device_time_ms: 0,
                    previous_stop_reason: String::new(),
                };
                let stale = s.u8() % 2 == 1;
                let claims = DeviceClaims {
                    sub: device.clone(),
                    generation: if stale {
                        generation.saturating_sub(1)
                    } else {
                        generation
                    },
                    iat: 0,
                    exp: u64::MAX,
                    aud: "lpush-device".into(),
                };
                if let Ok(login) = hub.login(&claims, &hello) {
                    sessions.0.push((login.session_id, hello.last_seen_seq));
                }
            }
            tag::ACK => {
                let id = sessions.pick(s.u8()).0;
                let (up_to, seqs) = (s.u64(), s.seqs());
                hub.ack(&device, id, up_to, &seqs);
            }
            tag::TAKE => {
                let id = sessions.pick(s.u8()).0;
                let (after_seq, max) = (s.u64(), s.u8());
                take(hub, &device, id, after_seq, max);
            }
            tag::TAKE_NEXT => {
                let session = s.u8();
                let (id, last) = *sessions.pick(session);
                if let Some(seq) = take(hub, &device, id, last, s.u8()) {
                    sessions.pick(session).1 = seq;
                }
            }
            tag::MARK_DELIVERED => hub.mark_delivered(&device, &s.seqs()),
            tag::LOGOUT => {
                let id = sessions.pick(s.u8()).0;
                hub.logout(&device, id, "fuzz");
            }
            tag::SEND => message(hub, rt, &device, s.u8()),
            tag::CALL => {
                let req = CallRequest {
                    call_id: call_id(s.u8()),
                    device_ids: vec![device.clone()],
                    caller_name: "Dr. Okafor".into(),
                    ring_secs: u32::from(s.u8()),
                    ..Default::default()
                };
                // A reused call id may be refused; that is an answer, not a crash.
                let _ = rt.block_on(hub.place_call(req));
            }
            tag::CANCEL => {
                let id = call_id(s.u8());
                let _ = rt.block_on(hub.cancel_call(&id, CancelReason::CallerCancelled));
            }
            _ => settle(hub, rt),
        }
    }
    // The device's session ends with the input, as a connection does.
    for (id, _) in sessions.0 {
        hub.logout(&device, id, "input done");
    }
});

/// Take pushes and check them; the highest sequence taken, if any.
fn take(hub: &Hub, device: &str, session: u64, after_seq: u64, max: u8) -> Option<u64> {
    let pushes = hub.take_pushes(device, session, after_seq, usize::from(max));
    assert!(pushes.len() <= usize::from(max), "more pushes than asked for");
    let mut prev = after_seq;
    for p in &pushes {
        assert!(p.seq() > prev, "push {} after {prev}", p.seq());
        prev = p.seq();
    }
    pushes.last().map(|p| p.seq())
}
