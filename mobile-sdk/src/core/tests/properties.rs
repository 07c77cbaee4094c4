//! Property tests: random interleavings of every input, checked against the session's promises.
//!
//! The harness plays a driver that obeys the transport commands and a server that sends
//! anything (pushes with colliding sequences and ids, stale calls, heartbeats, goodbyes, garbage,
//! frames split at random points), while time jumps around. After every step it checks:
//! - the app never sees a push twice (by sequence or id), and sees sequences in increasing order
//!   within one epoch;
//! - nothing is acknowledged that the app was handed and has not taken;
//! - `last_seen` never moves backwards and never passes a push the app has not taken, within an
//!   epoch; a `ServerHello` of another epoch moves it to that epoch at the floor the hello carried;
//! - every hello carries the current `last_seen` (floor and epoch), and is the first frame of its
//!   connection;
//! - bytes are written only to an open connection; `Connect` and `Close` alternate sensibly;
//! - heartbeats get replies with their nonce, and no reply is invented;
//! - after a stop or a final goodbye, no connection is opened until the next start;
//! - every timer wake-up produces output (no idle wake-ups, so no busy loop);
//! - every call-outcome report pending goes out on each established session, a reply is told
//!   to the host once and only for a report still pending, and nothing else is pending.

use std::collections::{BTreeSet, HashSet, VecDeque};
use std::time::Duration;

use proptest::prelude::*;
use push_proto::device::{CallOutcome, CallOutcomeReply, GoodbyeReason, Heartbeat, client_frame};

use super::*;
use crate::core::{NetworkEvent, OutcomeReport, StopReason};

#[derive(Debug, Clone)]
enum Op {
    Start,
    Stop,
    Advance(u32),
    Timeout,
    SystemTimer,
    Connected,
    Disconnected,
    ServerHello {
        server_time_offset_ms: i32,
        epoch: u64,
    },
    Push {
        seq: u64,
        id: u8,
        kind: u8,
        deadline_ms: i32,
    },
    Heartbeat(u64),
    Goodbye(i32),
    Garbage,
    /// The next frame arrives split into two reads at this fraction of its length.
    Split(u8),
    Take,
    TakeNewest,
    Network(u8),
    /// The host reports outcome `.1` (0 is unspecified) of call `.0`.
    Report(u8, i32),
    /// The server replies to a report of outcome `.1` of call `.0` (pending or not).
    Reply(u8, i32),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => Just(Op::Start),
        1 => Just(Op::Stop),
        4 => (0u32..90_000).prop_map(Op::Advance),
        6 => Just(Op::Timeout),
        1 => Just(Op::SystemTimer),
        5 => Just(Op::Connected),
        2 => Just(Op::Disconnected),
        5 => (-5_000i32..5_000, 1u64..3).prop_map(|(o, epoch)| Op::ServerHello {
            server_time_offset_ms: o,
            epoch
        }),
        12 => (1u64..40, 0u8..24, 0u8..4, -20_000i32..40_000)
            .prop_map(|(seq, id, kind, deadline_ms)| Op::Push { seq, id, kind, deadline_ms }),
        3 => (0u64..1000).prop_map(Op::Heartbeat),
        1 => (0i32..10).prop_map(Op::Goodbye),
        1 => Just(Op::Garbage),
        2 => (1u8..255).prop_map(Op::Split),
        6 => Just(Op::Take),
        1 => Just(Op::TakeNewest),
        3 => (0u8..6).prop_map(Op::Network),
        3 => (0u8..4, 0i32..5).prop_map(|(c, o)| Op::Report(c, o)),
        3 => (0u8..4, 0i32..5).prop_map(|(c, o)| Op::Reply(c, o)),
    ]
}

#[derive(Debug, PartialEq)]
enum Transport {
    None,
    Connecting,
    Open,
}

struct Checker {
    h: Harness,
    transport: Transport,
    /// Frames written on the current connection.
    frames_on_connection: usize,
    shown_seqs: Vec<u64>,
    shown_ids: HashSet<String>,
    /// Handed to the app and not taken, oldest first.
    with_app: VecDeque<u64>,
    taken: BTreeSet<u64>,
    heartbeats_seen: HashSet<u64>,
    last_seen: LastSeen,
    /// What the latest hello carried.
    hello: Option<LastSeen>,
    /// A stop or a final goodbye happened, and no start since.
    halted: bool,
    split: Option<u8>,
    server_time_ms: i64,
    /// Call-outcome reports the host made and the host was not told were replied.
    pending: BTreeSet<(String, i32)>,
    /// Reports written on the current connection.
    reports_on_connection: BTreeSet<(String, i32)>,
}

impl Checker {
    fn new(last_seen: LastSeen) -> Self {
        let mut h = Harness::new(resume(last_seen));
        h.auto_take = false;
        Self {
            h,
            transport: Transport::None,
            frames_on_connection: 0,
            shown_seqs: Vec::new(),
            shown_ids: HashSet::new(),
            with_app: VecDeque::new(),
            taken: BTreeSet::new(),
            heartbeats_seen: HashSet::new(),
            last_seen,
            hello: None,
            halted: false,
            split: None,
            server_time_ms: SERVER_TIME_MS,
            pending: BTreeSet::new(),
            reports_on_connection: BTreeSet::new(),
        }
    }

    fn server_bytes(&mut self, kind: server_frame::Kind) {
        self.feed(&server_wire(kind));
    }

    fn feed(&mut self, bytes: &[u8]) {
        if self.transport != Transport::Open {
            return; // a real server cannot send on a connection that does not exist
        }
        match self.split.take() {
            Some(at) => {
                let cut = bytes.len() * usize::from(at) / 256;
                self.h.s.handle_bytes(self.h.now, &bytes[..cut]);
                self.h.s.handle_bytes(self.h.now, &bytes[cut..]);
            }
            None => self.h.s.handle_bytes(self.h.now, bytes),
        }
    }

    fn apply(&mut self, op: Op) -> Result<(), TestCaseError> {
        let now = self.h.now;
        let mut wake = false;
        match op {
            Op::Start => {
                self.h.s.handle_start(now);
                self.halted = false;
            }
            Op::Stop => {
                self.h.s.handle_stop(now, StopReason::HostRequested);
                self.halted = true;
            }
            Op::Advance(ms) => {
                // Time passes, but a driver never sleeps past a deadline.
                let target = now + Duration::from_millis(u64::from(ms));
                self.h.now = self.h.s.poll_timeout().map_or(target, |t| t.max(now).min(target));
            }
            Op::Timeout => {
                if let Some(at) = self.h.s.poll_timeout() {
                    self.h.now = at.max(now);
                    self.h.s.handle_timeout(self.h.now);
                    wake = true;
                }
            }
            Op::SystemTimer => {
                self.h.now = now + Duration::from_secs(60);
                if self.h.s.poll_timeout().is_some_and(|t| t < self.h.now) {
                    // A driver would have woken first.
                    self.h.now = now;
                }
                self.h.s.handle_system_timer(self.h.now);
            }
            Op::Connected => {
                if self.transport == Transport::Connecting {
                    self.transport = Transport::Open;
                    self.frames_on_connection = 0;
                    self.reports_on_connection.clear();
                    self.h.s.handle_connected(now, 0);
                }
            }
            Op::Disconnected => {
                if self.transport != Transport::None {
                    self.transport = Transport::None;
                    self.h.s.handle_disconnected(now, "reset");
                }
            }
            Op::ServerHello {
                server_time_offset_ms,
                epoch,
            } => {
                self.server_time_ms = SERVER_TIME_MS + i64::from(server_time_offset_ms);
                self.server_bytes(server_frame::Kind::ServerHello(ServerHello {
                    session_id: "s".into(),
                    device_id: "d".into(),
                    heartbeat_interval_ms: HB_INTERVAL_MS,
                    heartbeat_timeout_ms: HB_TIMEOUT_MS,
                    max_frame_size: 64 * 1024,
                    server_time_ms: self.server_time_ms,
                    replay_count: 0,
                    epoch,
                }))
            }
            Op::Push {
                seq,
                id,
                kind,
                deadline_ms,
            } => {
                let id = format!("p{id}");
                let deadline = self.server_time_ms + i64::from(deadline_ms);
                let push = match kind {
                    0 => call_invite(seq, &id, deadline),
                    1 => call_cancel(seq, &id),
                    _ => message(seq, &id),
                };
                self.server_bytes(server_frame::Kind::Push(push));
            }
            Op::Heartbeat(nonce) => {
                let connected = matches!(self.h.s.state(), State::Connected { .. });
                self.server_bytes(server_frame::Kind::Heartbeat(Heartbeat { nonce }));
                if connected && self.transport == Transport::Open {
                    self.heartbeats_seen.insert(nonce);
                    let before = self.h.sent.len();
                    self.drain()?;
                    let replied = self.h.sent[before..].iter().any(|f| {
                        matches!(&f.kind, Some(client_frame::Kind::HeartbeatReply(r)) if r.nonce == nonce)
                    });
                    prop_assert!(replied, "heartbeat {nonce} not answered");
                }
            }
            Op::Goodbye(reason) => {
                let terminal = matches!(
                    GoodbyeReason::try_from(reason),
                    Ok(GoodbyeReason::Replaced
                        | GoodbyeReason::CredentialRevoked
                        | GoodbyeReason::AuthFailed)
                );
                let was_stopped = self.h.s.is_stopped();
                self.server_bytes(server_frame::Kind::Goodbye(Goodbye {
                    reason,
                    detail: String::new(),
                    ..Default::default()
                }));
                if !was_stopped && self.h.s.is_stopped() {
                    prop_assert!(terminal, "goodbye {reason} stopped the session for good");
                    self.halted = true;
                }
            }
            Op::Garbage => self.feed(&[0, 0, 0, 3, 0xff, 0xff, 0xff]),
            Op::Split(at) => self.split = Some(at),
            Op::Take => {
                if let Some(seq) = self.with_app.pop_front() {
                    prop_assert!(self.h.s.handle_delivered(now, seq), "{seq} refused");
                    self.taken.insert(seq);
                }
            }
            Op::TakeNewest => {
                if let Some(seq) = self.with_app.pop_back() {
                    prop_assert!(self.h.s.handle_delivered(now, seq), "{seq} refused");
                    self.taken.insert(seq);
                }
            }
            Op::Network(n) => {
                let event = match n {
                    0 => NetworkEvent::Viable,
                    1 => NetworkEvent::NotViable,
                    2 => NetworkEvent::Left,
                    3 => NetworkEvent::Joined {
                        ssid: "ward-4b".into(),
                    },
                    _ => NetworkEvent::Joined {
                        ssid: format!("ward-{n}"),
                    },
                };
                self.h.s.handle_network(now, event);
            }
            Op::Report(call, outcome) => {
                let report = OutcomeReport {
                    call_id: format!("c{call}"),
                    outcome: CallOutcome::try_from(outcome).unwrap(),
                    at_ms: 0,
                };
                let accepted = self.h.s.handle_call_outcome(now, report).is_ok();
                prop_assert_eq!(accepted, outcome != 0, "outcome {}", outcome);
                if accepted {
                    self.pending.insert((format!("c{call}"), outcome));
                }
            }
            Op::Reply(call, outcome) => {
                self.server_bytes(server_frame::Kind::CallOutcomeReply(CallOutcomeReply {
                    call_id: format!("c{call}"),
                    outcome,
                    result: 1,
                    detail: String::new(),
                }))
            }
        }
        let produced = self.drain()?;
        if wake {
            prop_assert!(produced, "a timer wake-up produced nothing: a driver would spin");
        }
        Ok(())
    }

    /// Drain outputs and check them; returns whether anything came out.
    fn drain(&mut self) -> Result<bool, TestCaseError> {
        let mut produced = false;
        let mut acked = Vec::new();
        while let Some(bytes) = self.h.s.poll_transmit() {
            produced = true;
            prop_assert_eq!(&self.transport, &Transport::Open, "bytes without a connection");
            let mut buf = BytesMut::from(&bytes[..]);
            while let Some(f) = frame::decode::<ClientFrame>(&mut buf, frame::DEFAULT_MAX_FRAME).unwrap() {
                self.check_frame(&f)?;
                if let Some(client_frame::Kind::Ack(ack)) = &f.kind {
                    acked.extend_from_slice(&ack.seqs);
                }
                self.frames_on_connection += 1;
                self.h.sent.push(f);
            }
        }
        while let Some(c) = self.h.s.poll_transport() {
            produced = true;
            match c {
                TransportCommand::Connect => {
                    prop_assert!(!self.halted, "connect after a stop or a final goodbye");
                    prop_assert_eq!(&self.transport, &Transport::None, "connect over a live transport");
                    self.transport = Transport::Connecting;
                }
                TransportCommand::Close => self.transport = Transport::None,
            }
            self.h.commands.push(c);
        }
        while let Some(e) = self.h.s.poll_event() {
            produced = true;
            match &e {
                Event::Message(_) | Event::CallInvite(_) | Event::CallCancel(_) => {
                    let seq = e.push_seq().unwrap();
                    let id = match &e {
                        Event::Message(m) => m.id.clone(),
                        Event::CallInvite(c) => c.id.clone(),
                        Event::CallCancel(c) => c.id.clone(),
                        _ => unreachable!(),
                    };
                    prop_assert!(
                        self.shown_seqs.last().is_none_or(|last| seq > *last),
                        "seq {seq} after {:?}",
                        self.shown_seqs.last()
                    );
                    prop_assert!(seq > self.last_seen.seq, "seq {seq} at or below last seen");
                    prop_assert!(self.shown_ids.insert(id.clone()), "id {id} shown twice");
                    if let Event::CallInvite(c) = &e {
                        prop_assert!(c.ring_remaining > Duration::ZERO);
                    }
                    self.shown_seqs.push(seq);
                    self.with_app.push_back(seq);
                }
                Event::LastSeenSeq(last_seen) => {
                    if last_seen.epoch == self.last_seen.epoch {
                        prop_assert!(
                            last_seen.seq > self.last_seen.seq,
                            "last seen went from {:?} to {last_seen:?}",
                            self.last_seen
                        );
                    } else {
                        // Another store: it renumbers above the floor the hello carried, so
                        // sequences of the old numbering mean nothing from here on.
                        prop_assert_eq!(Some(last_seen.seq), self.hello.map(|h| h.seq));
                        self.shown_seqs.clear();
                        self.with_app.clear();
                        self.taken.clear();
                    }
                    prop_assert!(
                        self.with_app.iter().all(|s| *s > last_seen.seq),
                        "last seen {last_seen:?} passed a push the app has not taken: {:?}",
                        self.with_app
                    );
                    self.last_seen = *last_seen;
                }
                Event::State(State::Connected { .. }) => {
                    prop_assert!(
                        self.pending.is_subset(&self.reports_on_connection),
                        "established without sending every pending report: {:?} sent of {:?}",
                        self.reports_on_connection,
                        self.pending
                    );
                }
                Event::State(_) => {}
                Event::CallOutcomeReplied(r) => {
                    let key = (r.call_id.clone(), r.outcome as i32);
                    prop_assert!(self.pending.remove(&key), "reply to {key:?} told, not pending");
                    // Settled: the user may report it again, and it is then sent again.
                    self.reports_on_connection.remove(&key);
                }
            }
            self.h.events.push(e);
        }
        prop_assert_eq!(self.h.s.last_seen(), self.last_seen);
        let pending: BTreeSet<(String, i32)> = self
            .h
            .s
            .pending_outcomes()
            .map(|r| (r.call_id.clone(), r.outcome as i32))
            .collect();
        prop_assert_eq!(&pending, &self.pending);
        // Checked once this drain's events are known: an ack written in the same batch as the
        // push it acknowledges is just as wrong.
        for seq in acked {
            prop_assert!(
                !self.with_app.contains(&seq),
                "acked {seq} while the app still has it"
            );
            prop_assert!(
                self.taken.contains(&seq) || !self.shown_seqs.contains(&seq),
                "acked {seq}, shown but never taken"
            );
        }
        Ok(produced)
    }

    fn check_frame(&mut self, f: &ClientFrame) -> Result<(), TestCaseError> {
        let is_hello = matches!(&f.kind, Some(client_frame::Kind::Hello(_)));
        prop_assert_eq!(
            is_hello,
            self.frames_on_connection == 0,
            "hello first, and only first"
        );
        match &f.kind {
            Some(client_frame::Kind::Hello(hello)) => {
                let sent = LastSeen {
                    epoch: hello.epoch,
                    seq: hello.last_seen_seq,
                };
                prop_assert_eq!(sent, self.h.s.last_seen());
                self.hello = Some(sent);
            }
            Some(client_frame::Kind::CallOutcome(r)) => {
                let key = (r.call_id.clone(), r.outcome);
                prop_assert!(
                    self.pending.contains(&key),
                    "sent {key:?}, never reported or replied"
                );
                prop_assert!(
                    self.reports_on_connection.insert(key.clone()),
                    "{key:?} sent twice on one connection"
                );
            }
            Some(client_frame::Kind::HeartbeatReply(r)) => {
                prop_assert!(
                    self.heartbeats_seen.contains(&r.nonce),
                    "invented reply {}",
                    r.nonce
                );
            }
            _ => {}
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_interleavings_keep_every_promise(
        last_seen in 0u64..5,
        epoch in 0u64..3,
        ops in prop::collection::vec(op(), 1..300),
    ) {
        let mut c = Checker::new(LastSeen { epoch, seq: last_seen });
        for op in ops {
            c.apply(op)?;
        }
    }

    /// A well-behaved server replaying from `last_seen` on every reconnect, with random drops:
    /// every push it sends is shown exactly once, in order.
    #[test]
    fn replay_after_random_drops_shows_everything_exactly_once(
        drops in prop::collection::vec(1usize..12, 0..8),
    ) {
        let total = 40u64;
        let mut h = Harness::new(config(0));
        h.start();
        let mut drops = drops.into_iter();
        let mut next_drop = drops.next();
        let mut reconnects = 0;
        loop {
            h.connected();
            h.server_hello();
            // The server resumes right after what the hello says was seen.
            let from = h.hellos().last().unwrap().last_seen_seq + 1;
            let mut sent = 0;
            let mut dropped = false;
            for seq in from..=total {
                h.push_message(seq, &format!("m{seq}"));
                sent += 1;
                if Some(sent) == next_drop {
                    next_drop = drops.next();
                    h.disconnected("dropped");
                    dropped = true;
                    break;
                }
            }
            if !dropped {
                break;
            }
            reconnects += 1;
            prop_assert!(reconnects < 20);
            h.sleep();
        }
        prop_assert_eq!(h.shown(), (1..=total).collect::<Vec<_>>());
        prop_assert_eq!(h.s.last_seen().seq, total);
    }
}
