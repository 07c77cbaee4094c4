//! The server's session state machine (`push_server::session::core`) driven by a device that
//! sends anything (raw bytes through the frame decoder, or well-formed frames with any field
//! values), a hub that accepts, rejects, pushes and ends it, and synthetic time.
//!
//! Properties, beyond "never panics":
//! - what goes out is whole frames within the default limit;
//! - pushes go out in strictly increasing sequence order, and only while established;
//! - the in-flight count never exceeds the pushes written;
//! - once the `Closed` event is out and the queues drained, nothing more is ever sent or
//!   reported, whatever comes in;
//! - right after the timer fired, the next deadline is in the future (the driver never spins).
#![no_main]

use std::time::{Duration, Instant};

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use lpush_fuzz::{Script, session_tag as tag};
use push_proto::{
    device::{
        Ack, ClientFrame, Goodbye, GoodbyeReason, HeartbeatReply, Hello, NetworkChange, Push, ServerFrame,
        VoipToken, client_frame, server_frame,
    },
    frame::{self, DEFAULT_MAX_FRAME},
};
use push_server::{
    hub::EncodedPush,
    session::core::{Event, Session, Timing, Welcome},
};

struct Checker {
    session: Session,
    now: Instant,
    last_push_seq: u64,
    pushes_written: usize,
    closed_seen: bool,
}

impl Checker {
    /// A well-formed frame of any size (the session applies the limit).
    fn frame(&mut self, kind: client_frame::Kind) {
        let mut wire = BytesMut::new();
        frame::encode(&ClientFrame { kind: Some(kind) }, &mut wire, usize::MAX).expect("any size");
        self.session.handle_bytes(self.now, &wire);
    }

    fn push(&mut self, seq: u64) {
        let established = self.session.is_established();
        let written = self.session.push(EncodedPush::of(&Push {
            seq,
            id: format!("m-{seq}"),
            body: None,
        }));
        if written {
            assert!(established, "a push was written outside an established session");
            self.pushes_written += 1;
        }
    }

    /// The timer fired: the next deadline is in the future, or the driver would spin.
    fn timeout(&mut self) {
        self.session.handle_timeout(self.now);
        if let Some(t) = self.session.poll_timeout() {
            assert!(t > self.now, "timer due again right after it fired");
        }
    }

    /// Drain outputs as the driver does and check them.
    fn drain(&mut self) {
        let mut wire = BytesMut::from(&self.session.poll_transmit().unwrap_or_default()[..]);
        while let Some(f) = frame::decode::<ServerFrame>(&mut wire, DEFAULT_MAX_FRAME).expect("frames") {
            if let Some(server_frame::Kind::Push(p)) = f.kind {
                let (seq, last) = (p.seq, self.last_push_seq);
                assert!(seq > last, "push {seq} after {last}");
                self.last_push_seq = seq;
            }
        }
        assert!(wire.is_empty(), "half a frame out");
        while let Some(e) = self.session.poll_event() {
            if matches!(e, Event::Closed(_)) {
                assert!(!self.closed_seen, "closed twice");
                assert!(self.session.is_closed());
                self.closed_seen = true;
                continue;
            }
            assert!(!self.closed_seen, "event {e:?} after the session closed");
        }
        assert!(self.session.inflight() <= self.pushes_written);
    }
}

fuzz_target!(|data: &[u8]| {
    let mut s = Script::new(data);
    let base = Instant::now();
    let mut ms = || Duration::from_millis(u64::from(s.u16()) + 1);
    let timing = Timing {
        hello_timeout: ms(),
        heartbeat_interval: ms(),
        heartbeat_timeout: ms(),
    };
    let mut c = Checker {
        session: Session::new(base, timing, DEFAULT_MAX_FRAME),
        now: base,
        last_push_seq: 0,
        pushes_written: 0,
        closed_seen: false,
    };
    while !s.is_empty() {
        let closed_before = c.closed_seen;
        match s.u8() % tag::COUNT {
            tag::BYTES => c.session.handle_bytes(c.now, s.bytes()),
            tag::HELLO => {
                let (last_seen_seq, epoch, ssid) = (s.u64(), s.u64(), s.string());
                c.frame(client_frame::Kind::Hello(Hello {
                    credential: "x".into(),
                    sdk_version: "fuzz".into(),
                    last_seen_seq,
                    ssid,
                    instance_id: String::new(),
                    epoch,
                    device_time_ms: 0,
                    previous_stop_reason: String::new(),
                }))
            }
            tag::ACK => {
                let (up_to_seq, seqs) = (s.u64(), s.seqs());
                c.frame(client_frame::Kind::Ack(Ack { up_to_seq, seqs }))
            }
            tag::HEARTBEAT_REPLY => c.frame(client_frame::Kind::HeartbeatReply(HeartbeatReply {
                nonce: s.u64(),
            })),
            tag::NETWORK_CHANGE => c.frame(client_frame::Kind::NetworkChange(NetworkChange {
                ssid: s.string(),
                path_lost: s.u32() % 2 == 1,
            })),
            tag::VOIP_TOKEN => c.frame(client_frame::Kind::VoipToken(VoipToken { token: s.string() })),
            tag::CLIENT_GOODBYE => c.frame(client_frame::Kind::Goodbye(Goodbye {
                reason: s.u32() as i32,
                detail: String::new(),
                provider_stop_reason: ["", "noNetworkAvailable", "junk"][s.u32() as usize % 3].into(),
            })),
            // A frame of length 0: a `ClientFrame` without content.
            tag::EMPTY_FRAME => c.session.handle_bytes(c.now, &[0; 4]),
            tag::ACCEPT => c.session.accept(
                c.now,
                Welcome {
                    session_id: 1,
                    device_id: "d".into(),
                    ..Default::default()
                },
                s.u64(),
            ),
            tag::REJECT => c.session.reject(GoodbyeReason::AuthFailed, "credential refused"),
            tag::PUSH => c.push(s.u64()),
            tag::PUSH_NEXT => {
                for _ in 0..s.u8() {
                    let Some(next) = c.session.last_sent_seq().checked_add(1) else {
                        break;
                    };
                    c.push(next);
                }
            }
            tag::SERVER_GOODBYE => c.session.goodbye(GoodbyeReason::ServerShutdown, "shutting down"),
            tag::ADVANCE => {
                c.now += Duration::from_millis(u64::from(s.u16()));
                c.timeout();
            }
            _ => {
                if let Some(t) = c.session.poll_timeout() {
                    c.now = c.now.max(t);
                    c.timeout();
                }
            }
        }
        if closed_before {
            assert!(
                c.session.poll_transmit().is_none(),
                "a frame queued after the close"
            );
            assert!(c.session.poll_event().is_none(), "an event after the close");
        }
        c.drain();
    }
});
