//! The SDK's sans-IO session (`mobile_sdk::core::Session`) driven by a host and a server that do
//! anything: raw bytes, well-formed server frames with any field values, app deliveries, network
//! changes, transport events and synthetic time.
//!
//! Properties, beyond "never panics":
//! - every chunk the SDK hands to the transport is whole, decodable client frames;
//! - `LastSeenSeq` only moves up within an epoch;
//! - the SDK acknowledges only sequence numbers the server pushed (checked while the server
//!   sends only well-formed frames; raw bytes may carry pushes the target cannot see);
//! - right after the timer fired, the next deadline is in the future (the driver never spins).
#![no_main]

use std::{collections::HashSet, time::Duration, time::Instant};

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use lpush_fuzz::{Script, sdk_tag as tag};
use mobile_sdk::core::event::Event;
use mobile_sdk::core::{Config, LastSeen, NetworkEvent, Session, StopReason};
use push_proto::{
    device::{
        CallCancel, CallInvite, ClientFrame, Goodbye, Heartbeat, Message, Push, ServerFrame, ServerHello,
        client_frame, push, server_frame,
    },
    frame,
};

struct Checker {
    s: Session,
    now: Instant,
    /// Server clock at `now` (Unix ms), for bodies with deadlines.
    server_ms: i64,
    handed: Vec<u64>,
    pushed: HashSet<u64>,
    raw: bool,
    last_seen: LastSeen,
    highest_pushed: u64,
}

impl Checker {
    fn server(&mut self, kind: server_frame::Kind) {
        if let server_frame::Kind::Push(p) = &kind {
            self.pushed.insert(p.seq);
            self.highest_pushed = self.highest_pushed.max(p.seq);
        }
        let mut wire = BytesMut::new();
        // Over-limit frames are the server's refusal to make, not the SDK's input.
        if frame::encode(&ServerFrame { kind: Some(kind) }, &mut wire, usize::MAX).is_ok() {
            self.s.handle_bytes(self.now, &wire);
        }
    }

    /// A push whose body the script describes (see `sdk_tag::BODY_*`).
    fn push(&mut self, seq: u64, s: &mut Script) {
        let id = format!("p{}", s.u8() % 8);
        let call = |n: u8| format!("call-{}", n % 4);
        let body = match s.u8() % tag::BODY_COUNT {
            tag::BODY_MESSAGE => {
                let (expires_in_ms, priority, title) = (s.u32() as i32, s.u8(), s.string());
                Some(push::Body::Message(Message {
                    title,
                    body: "b".into(),
                    data: Vec::new(),
                    priority: i32::from(priority),
                    collapse_key: String::new(),
                    sent_at_ms: self.server_ms,
                    expires_at_ms: self.server_ms.saturating_add(i64::from(expires_in_ms)),
                    sender: String::new(),
                }))
            }
            tag::BODY_CALL_INVITE => {
                let (call_id, ring_in_ms) = (call(s.u8()), s.u32() as i32);
                Some(push::Body::CallInvite(CallInvite {
                    call_uuid: push_proto::call_uuid(&call_id),
                    call_id,
                    caller_name: "c".into(),
                    caller_handle: String::new(),
                    video: false,
                    created_at_ms: self.server_ms,
                    ring_deadline_ms: self.server_ms.saturating_add(i64::from(ring_in_ms)),
                }))
            }
            tag::BODY_CALL_CANCEL => {
                let (call_id, reason) = (call(s.u8()), i32::from(s.u8()));
                Some(push::Body::CallCancel(CallCancel {
                    call_uuid: push_proto::call_uuid(&call_id),
                    call_id,
                    reason,
                }))
            }
            _ => None,
        };
        self.server(server_frame::Kind::Push(Push { seq, id, body }));
    }

    fn timeout(&mut self) {
        self.s.handle_timeout(self.now);
        self.drain();
        if let Some(t) = self.s.poll_timeout() {
            assert!(t > self.now, "timer due again right after it fired");
        }
    }

    fn drain(&mut self) {
        while let Some(chunk) = self.s.poll_transmit() {
            let mut buf = BytesMut::from(&chunk[..]);
            while !buf.is_empty() {
                let f = frame::decode::<ClientFrame>(&mut buf, usize::MAX)
                    .expect("the SDK writes valid frames")
                    .expect("the SDK writes whole frames");
                if let Some(client_frame::Kind::Ack(ack)) = &f.kind {
                    if !self.raw {
                        for seq in &ack.seqs {
                            assert!(self.pushed.contains(seq), "acked {seq}, never pushed");
                        }
                    }
                }
            }
        }
        while self.s.poll_transport().is_some() {}
        while let Some(e) = self.s.poll_event() {
            if let Some(seq) = e.push_seq() {
                self.handed.push(seq);
            }
            if let Event::LastSeenSeq(ls) = e {
                assert!(
                    ls.epoch != self.last_seen.epoch || ls.seq > self.last_seen.seq,
                    "last seen went from {:?} to {ls:?}",
                    self.last_seen
                );
                self.last_seen = ls;
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut s = Script::new(data);
    let mut config = Config::new("credential");
    config.last_seen = LastSeen {
        epoch: u64::from(s.u8()),
        seq: u64::from(s.u16()),
    };
    config.max_pending_events = usize::from(s.u8());
    config.recent_ids = 16;
    let start = Instant::now();
    let mut c = Checker {
        s: Session::new(config.clone()),
        now: start,
        server_ms: 1_700_000_000_000,
        handed: Vec::new(),
        pushed: HashSet::new(),
        raw: false,
        last_seen: config.last_seen,
        highest_pushed: config.last_seen.seq,
    };
    while !s.is_empty() {
        match s.u8() % tag::COUNT {
            tag::START => c.s.handle_start(c.now),
            tag::STOP => {
                let reason = [
                    StopReason::HostRequested,
                    StopReason::NoNetwork,
                    StopReason::NetworkChange,
                    StopReason::Superseded,
                    StopReason::Other,
                ][usize::from(s.u8() % 5)];
                c.s.handle_stop(c.now, reason)
            }
            tag::CONNECTED => c.s.handle_connected(c.now, 0),
            tag::DISCONNECTED => c.s.handle_disconnected(c.now, "reset"),
            tag::BYTES => {
                c.raw = true;
                c.s.handle_bytes(c.now, s.bytes())
            }
            tag::SERVER_HELLO => {
                let hello = ServerHello {
                    session_id: "s".into(),
                    device_id: "d".into(),
                    heartbeat_interval_ms: s.u32(),
                    heartbeat_timeout_ms: s.u32(),
                    max_frame_size: s.u32(),
                    server_time_ms: s.i64(),
                    replay_count: 0,
                    epoch: 0,
                };
                c.server(server_frame::Kind::ServerHello(hello))
            }
            tag::PUSH => {
                let seq = s.u64();
                c.push(seq, &mut s)
            }
            tag::PUSH_NEXT => {
                let seq = c.highest_pushed.saturating_add(1);
                c.push(seq, &mut s)
            }
            tag::HEARTBEAT => c.server(server_frame::Kind::Heartbeat(Heartbeat { nonce: s.u64() })),
            tag::GOODBYE => c.server(server_frame::Kind::Goodbye(Goodbye {
                reason: s.u32() as i32,
                detail: "bye".into(),
                ..Default::default()
            })),
            tag::EMPTY_FRAME => c.s.handle_bytes(c.now, &[0, 0, 0, 0]),
            tag::DELIVERED => {
                let i = usize::from(s.u8());
                if !c.handed.is_empty() {
                    let seq = c.handed[i % c.handed.len()];
                    c.s.handle_delivered(c.now, seq);
                }
            }
            tag::DELIVERED_ANY => {
                c.s.handle_delivered(c.now, s.u64());
            }
            tag::JOINED => {
                c.s.handle_network(c.now, NetworkEvent::Joined { ssid: s.string() })
            }
            tag::LEFT => c.s.handle_network(c.now, NetworkEvent::Left),
            tag::VIABLE => c.s.handle_network(c.now, NetworkEvent::Viable),
            tag::NOT_VIABLE => c.s.handle_network(c.now, NetworkEvent::NotViable),
            tag::VOIP_TOKEN => c.s.handle_voip_token(c.now, s.string()),
            tag::ADVANCE => {
                let d = Duration::from_millis(u64::from(s.u16()));
                c.now += d;
                c.server_ms += d.as_millis() as i64;
                c.timeout();
            }
            tag::FIRE_TIMER => {
                if let Some(t) = c.s.poll_timeout() {
                    let d = t.saturating_duration_since(c.now);
                    c.now += d;
                    c.server_ms = c.server_ms.saturating_add(d.as_millis() as i64);
                    c.timeout();
                }
            }
            _ => c.s.handle_system_timer(c.now),
        }
        c.drain();
    }
});
