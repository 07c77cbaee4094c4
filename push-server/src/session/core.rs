//! The server side of one device session as a state machine: no sockets, no clock, no hub.
//!
//! Call order, as in quinn-proto: feed inputs (`handle_frame`, `handle_timeout`, and the
//! decisions `accept` / `reject` / `push` / `goodbye`), then drain outputs (`poll_transmit` until
//! `None`, `poll_event` until `None`), then sleep until `poll_timeout`. Time only moves forward.

use std::{collections::VecDeque, time::Duration};

use push_proto::device::{
    Ack, CallOutcome, CallOutcomeReply, CallOutcomeReport, ClientFrame, Goodbye, GoodbyeReason, Heartbeat,
    Hello, NetworkChange, ServerFrame, ServerHello, client_frame, server_frame,
};
use tokio::time::Instant;

use crate::hub::{EncodedPush, MAX_FLOOR};

/// Timing of a session.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Deadline for the hello after the TLS handshake.
    pub hello_timeout: Duration,
    /// Heartbeat cadence.
    pub heartbeat_interval: Duration,
    /// Time the device has to answer a heartbeat.
    pub heartbeat_timeout: Duration,
}

/// Something the driver must act on.
#[derive(Debug, PartialEq)]
pub enum Event {
    /// The device said hello: authenticate it, then call `accept` or `reject`.
    Hello(Hello),
    /// The device acknowledged pushes.
    Acked(Ack),
    /// The device reports a new SSID, or that its path to the server is failing or back.
    NetworkChanged(NetworkChange),
    /// The device registered (non-empty) or cleared (empty) its PushKit token.
    VoipToken(String),
    /// The user acted on a call (answered, declined, ...): decide it, then `reply_call_outcome`.
    CallOutcome(CallOutcomeReport),
    /// The session is over; send what `poll_transmit` still yields, then close the socket.
    Closed(CloseReason),
}

/// A frame to write: one the session made, or a push the hub encoded when it was queued
/// (written as is: see [`EncodedPush::write_frame`]).
#[derive(Debug)]
pub enum Transmit {
    /// A frame of the session's own.
    Frame(ServerFrame),
    /// `ServerFrame { push }`.
    Push(EncodedPush),
}

#[cfg(test)]
impl Transmit {
    /// The frame, decoded (tests look inside what a session wrote).
    pub(crate) fn frame(self) -> ServerFrame {
        match self {
            Self::Frame(f) => f,
            Self::Push(p) => ServerFrame {
                kind: Some(server_frame::Kind::Push(p.decode())),
            },
        }
    }
}

/// Why a session ended, for presence events and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// No hello within the hello timeout.
    HelloTimeout,
    /// No heartbeat answer within the heartbeat timeout.
    HeartbeatTimeout,
    /// The device broke the protocol.
    ProtocolError(String),
    /// Authentication failed.
    AuthFailed(String),
    /// The device said goodbye; from an iOS provider, with why iOS stopped it (a name of
    /// [`crate::observe::provider_stop::KNOWN`], `unknown`, or empty).
    ClientGoodbye(GoodbyeReason, &'static str),
    /// The server ended it (replaced, revoked, shutting down).
    ServerGoodbye(GoodbyeReason),
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::HelloTimeout => write!(f, "hello timeout"),
            Self::HeartbeatTimeout => write!(f, "heartbeat timeout"),
            Self::ProtocolError(d) => write!(f, "protocol error: {d}"),
            Self::AuthFailed(d) => write!(f, "authentication failed: {d}"),
            Self::ClientGoodbye(r, "") => write!(f, "device goodbye: {}", r.as_str_name()),
            Self::ClientGoodbye(r, ios) => write!(f, "device goodbye: {} (iOS: {ios})", r.as_str_name()),
            Self::ServerGoodbye(r) => write!(f, "server goodbye: {}", r.as_str_name()),
        }
    }
}

#[derive(Debug)]
enum Phase {
    AwaitingHello {
        deadline: Instant,
    },
    Authenticating,
    Established {
        next_heartbeat: Instant,
        outstanding: Option<(u64, Instant)>,
    },
    Closed,
}

/// One session's protocol state.
#[derive(Debug)]
pub struct Session {
    timing: Timing,
    phase: Phase,
    transmit: VecDeque<Transmit>,
    events: VecDeque<Event>,
    nonce: u64,
    /// Highest sequence written in this session; the hub hands out pushes above it.
    last_sent_seq: u64,
    /// Sequences written and not yet acknowledged, in order (bounded by the in-flight window).
    inflight: VecDeque<u64>,
}

impl Session {
    /// A session whose TLS handshake completed at `now`.
    pub fn new(now: Instant, timing: Timing) -> Self {
        Self {
            timing,
            phase: Phase::AwaitingHello {
                deadline: now + timing.hello_timeout,
            },
            transmit: VecDeque::new(),
            events: VecDeque::new(),
            nonce: 0,
            last_sent_seq: 0,
            inflight: VecDeque::new(),
        }
    }

    /// Whether the hub accepted the device and pushes may flow.
    pub fn is_established(&self) -> bool {
        matches!(self.phase, Phase::Established { .. })
    }

    /// Whether the session is over.
    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closed)
    }

    /// Highest sequence written so far in this session.
    pub fn last_sent_seq(&self) -> u64 {
        self.last_sent_seq
    }

    /// Pushes written and not yet acknowledged.
    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    /// A frame arrived from the device.
    pub fn handle_frame(&mut self, now: Instant, frame: ClientFrame) {
        use client_frame::Kind;
        let Some(kind) = frame.kind else {
            return self.protocol_error("frame without content");
        };
        match (&mut self.phase, kind) {
            (Phase::Closed, _) => {}
            (Phase::AwaitingHello { .. }, Kind::Hello(hello)) if hello.last_seen_seq >= MAX_FLOOR => {
                self.protocol_error("last_seen_seq must be below 2^52")
            }
            (Phase::AwaitingHello { .. }, Kind::Hello(hello)) => {
                if let Err(why) = super::fields::check_hello(&hello) {
                    return self.protocol_error(&why);
                }
                self.phase = Phase::Authenticating;
                self.events.push_back(Event::Hello(hello));
            }
            (Phase::AwaitingHello { .. } | Phase::Authenticating, _) => {
                self.protocol_error("expected hello as the first frame")
            }
            (Phase::Established { .. }, Kind::Hello(_)) => self.protocol_error("second hello"),
            (Phase::Established { .. }, Kind::Ack(ack)) => {
                self.inflight
                    .retain(|s| *s > ack.up_to_seq && !ack.seqs.contains(s));
                self.events.push_back(Event::Acked(ack));
            }
            (
                Phase::Established {
                    outstanding,
                    next_heartbeat,
                },
                Kind::HeartbeatReply(reply),
            ) => {
                // A reply to the outstanding heartbeat (or a later one) clears the deadline; a stale
                // reply is harmless and ignored.
                if outstanding.is_some_and(|(nonce, _)| reply.nonce >= nonce) {
                    *outstanding = None;
                    *next_heartbeat = (*next_heartbeat).max(now);
                }
            }
            (Phase::Established { .. }, Kind::NetworkChange(change)) => {
                match super::fields::check_ssid(&change.ssid) {
                    Ok(()) => self.events.push_back(Event::NetworkChanged(change)),
                    Err(why) => self.protocol_error(&why),
                }
            }
            (Phase::Established { .. }, Kind::VoipToken(t)) => {
                self.events.push_back(Event::VoipToken(t.token))
            }
            (Phase::Established { .. }, Kind::CallOutcome(report)) => {
                match super::fields::check_call_id(&report.call_id) {
                    Err(why) => self.protocol_error(&why),
                    Ok(())
                        if !matches!(
                            CallOutcome::try_from(report.outcome),
                            Ok(o) if o != CallOutcome::Unspecified
                        ) =>
                    {
                        self.protocol_error("unknown call outcome")
                    }
                    Ok(()) => self.events.push_back(Event::CallOutcome(report)),
                }
            }
            (_, Kind::Goodbye(bye)) => {
                let reason = GoodbyeReason::try_from(bye.reason).unwrap_or(GoodbyeReason::Unspecified);
                let ios = crate::observe::provider_stop::parse(&bye.provider_stop_reason);
                self.close(CloseReason::ClientGoodbye(reason, ios));
            }
        }
    }

    /// Bytes could not be decoded as a frame.
    pub fn handle_decode_error(&mut self, detail: String) {
        self.protocol_error(&detail);
    }

    /// The timer set by `poll_timeout` fired (or any time passed).
    pub fn handle_timeout(&mut self, now: Instant) {
        match &mut self.phase {
            Phase::AwaitingHello { deadline } if now >= *deadline => {
                self.say_goodbye(GoodbyeReason::ProtocolError, "no hello in time");
                self.close(CloseReason::HelloTimeout);
            }
            Phase::Established {
                outstanding: Some((_, deadline)),
                ..
            } if now >= *deadline => {
                self.say_goodbye(GoodbyeReason::HeartbeatTimeout, "heartbeat not answered in time");
                self.close(CloseReason::HeartbeatTimeout);
            }
            Phase::Established {
                next_heartbeat,
                outstanding,
            } if outstanding.is_none() && now >= *next_heartbeat => {
                self.nonce += 1;
                *outstanding = Some((self.nonce, now + self.timing.heartbeat_timeout));
                *next_heartbeat = now + self.timing.heartbeat_interval;
                let nonce = self.nonce;
                self.send(server_frame::Kind::Heartbeat(Heartbeat { nonce }));
            }
            _ => {}
        }
    }

    /// The hub accepted the hello. `hello` is sent as is; pushes may follow.
    pub fn accept(&mut self, now: Instant, hello: ServerHello, last_seen_seq: u64) {
        if !matches!(self.phase, Phase::Authenticating) {
            return;
        }
        self.last_sent_seq = last_seen_seq;
        self.phase = Phase::Established {
            next_heartbeat: now + self.timing.heartbeat_interval,
            outstanding: None,
        };
        self.send(server_frame::Kind::ServerHello(hello));
    }

    /// The hub refused the hello. Nothing more is sent if the session already closed (the
    /// device broke the protocol right after its hello, in the same read): its goodbye is out.
    pub fn reject(&mut self, reason: GoodbyeReason, detail: &str) {
        if self.is_closed() {
            return;
        }
        self.say_goodbye(reason, detail);
        self.close(CloseReason::AuthFailed(detail.into()));
    }

    /// Write a push. The caller keeps within the in-flight window and hands pushes in sequence
    /// order; a push at or below the last one written is skipped, so a replay race cannot
    /// deliver twice.
    pub fn push(&mut self, push: EncodedPush) -> bool {
        let seq = push.seq();
        if !self.is_established() || seq <= self.last_sent_seq {
            return false;
        }
        self.last_sent_seq = seq;
        self.inflight.push_back(seq);
        self.transmit.push_back(Transmit::Push(push));
        true
    }

    /// The hub decided a `CallOutcomeReport`: tell the device, which may then forget it.
    pub fn reply_call_outcome(&mut self, reply: CallOutcomeReply) {
        if self.is_established() {
            self.send(server_frame::Kind::CallOutcomeReply(reply));
        }
    }

    /// The server ends the session (replaced, revoked, shutting down).
    pub fn goodbye(&mut self, reason: GoodbyeReason, detail: &str) {
        if self.is_closed() {
            return;
        }
        self.say_goodbye(reason, detail);
        self.close(CloseReason::ServerGoodbye(reason));
    }

    /// Whether `poll_transmit` has frames.
    pub fn wants_transmit(&self) -> bool {
        !self.transmit.is_empty()
    }

    /// Next frame to write.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmit.pop_front()
    }

    /// Next event for the driver.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When `handle_timeout` must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.phase {
            Phase::AwaitingHello { deadline } => Some(*deadline),
            Phase::Established {
                outstanding: Some((_, deadline)),
                ..
            } => Some(*deadline),
            Phase::Established { next_heartbeat, .. } => Some(*next_heartbeat),
            Phase::Authenticating | Phase::Closed => None,
        }
    }

    fn protocol_error(&mut self, detail: &str) {
        if self.is_closed() {
            return;
        }
        self.say_goodbye(GoodbyeReason::ProtocolError, detail);
        self.close(CloseReason::ProtocolError(detail.into()));
    }

    fn say_goodbye(&mut self, reason: GoodbyeReason, detail: &str) {
        self.send(server_frame::Kind::Goodbye(Goodbye {
            reason: reason as i32,
            detail: detail.into(),
            ..Default::default()
        }));
    }

    fn close(&mut self, reason: CloseReason) {
        if !self.is_closed() {
            self.phase = Phase::Closed;
            self.events.push_back(Event::Closed(reason));
        }
    }

    fn send(&mut self, kind: server_frame::Kind) {
        self.transmit
            .push_back(Transmit::Frame(ServerFrame { kind: Some(kind) }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use push_proto::device::{HeartbeatReply, Push, push};

    const T: Timing = Timing {
        hello_timeout: Duration::from_secs(5),
        heartbeat_interval: Duration::from_secs(30),
        heartbeat_timeout: Duration::from_secs(10),
    };

    fn frame(kind: client_frame::Kind) -> ClientFrame {
        ClientFrame { kind: Some(kind) }
    }

    #[test]
    fn a_floor_at_or_above_2_pow_52_is_a_protocol_error() {
        let now = Instant::now();
        for floor in [MAX_FLOOR, 1 << 53, u64::MAX] {
            let mut s = Session::new(now, T);
            s.handle_frame(
                now,
                frame(client_frame::Kind::Hello(Hello {
                    last_seen_seq: floor,
                    ..Default::default()
                })),
            );
            assert!(
                matches!(s.poll_transmit().and_then(|f| f.frame().kind), Some(server_frame::Kind::Goodbye(g)) if g.reason == GoodbyeReason::ProtocolError as i32),
                "floor {floor}"
            );
            assert!(!matches!(s.poll_event(), Some(Event::Hello(_))));
        }
    }

    fn established(now: Instant) -> Session {
        let mut s = Session::new(now, T);
        s.handle_frame(
            now,
            frame(client_frame::Kind::Hello(Hello {
                last_seen_seq: 4,
                ..Default::default()
            })),
        );
        assert!(matches!(s.poll_event(), Some(Event::Hello(h)) if h.last_seen_seq == 4));
        s.accept(now, ServerHello::default(), 4);
        assert!(matches!(
            s.poll_transmit().unwrap().frame().kind,
            Some(server_frame::Kind::ServerHello(_))
        ));
        s
    }

    fn push_frame(seq: u64) -> EncodedPush {
        EncodedPush::of(&Push {
            seq,
            id: format!("m{seq}"),
            body: Some(push::Body::Message(Default::default())),
        })
    }

    fn goodbye_reason(s: &mut Session) -> Option<GoodbyeReason> {
        std::iter::from_fn(|| s.poll_transmit()).find_map(|f| match f.frame().kind {
            Some(server_frame::Kind::Goodbye(g)) => GoodbyeReason::try_from(g.reason).ok(),
            _ => None,
        })
    }

    #[test]
    fn a_goodbye_keeps_why_ios_stopped_the_provider() {
        let t0 = Instant::now();
        for (sent, kept) in [
            (
                "unrecoverableNetworkChange",
                "device goodbye: GOODBYE_REASON_CLIENT_STOPPING (iOS: unrecoverableNetworkChange)",
            ),
            (
                "notAnAppleReason",
                "device goodbye: GOODBYE_REASON_CLIENT_STOPPING (iOS: unknown)",
            ),
            ("", "device goodbye: GOODBYE_REASON_CLIENT_STOPPING"),
        ] {
            let mut s = established(t0);
            s.handle_frame(
                t0,
                frame(client_frame::Kind::Goodbye(Goodbye {
                    reason: GoodbyeReason::ClientStopping as i32,
                    provider_stop_reason: sent.into(),
                    ..Default::default()
                })),
            );
            let closed = std::iter::from_fn(|| s.poll_event()).find_map(|e| match e {
                Event::Closed(reason) => Some(reason.to_string()),
                _ => None,
            });
            assert_eq!(closed.as_deref(), Some(kept), "{sent}");
        }
    }

    #[test]
    fn hello_timeout_closes_with_goodbye() {
        let t0 = Instant::now();
        let mut s = Session::new(t0, T);
        assert_eq!(s.poll_timeout(), Some(t0 + T.hello_timeout));
        s.handle_timeout(t0 + T.hello_timeout - Duration::from_millis(1));
        assert!(!s.is_closed());
        s.handle_timeout(t0 + T.hello_timeout);
        assert_eq!(goodbye_reason(&mut s), Some(GoodbyeReason::ProtocolError));
        assert_eq!(s.poll_event(), Some(Event::Closed(CloseReason::HelloTimeout)));
    }

    #[test]
    fn first_frame_must_be_hello() {
        let t0 = Instant::now();
        let mut s = Session::new(t0, T);
        s.handle_frame(t0, frame(client_frame::Kind::Ack(Ack::default())));
        assert_eq!(goodbye_reason(&mut s), Some(GoodbyeReason::ProtocolError));
        assert!(matches!(
            s.poll_event(),
            Some(Event::Closed(CloseReason::ProtocolError(_)))
        ));
        assert!(s.poll_timeout().is_none(), "a closed session wants no timer");
    }

    #[test]
    fn empty_frame_is_protocol_error() {
        let t0 = Instant::now();
        let mut s = established(t0);
        s.handle_frame(t0, ClientFrame { kind: None });
        assert!(s.is_closed());
    }

    #[test]
    fn heartbeat_cycle_and_deadline() {
        let t0 = Instant::now();
        let mut s = established(t0);
        let due = t0 + T.heartbeat_interval;
        assert_eq!(s.poll_timeout(), Some(due));
        s.handle_timeout(due);
        let Some(server_frame::Kind::Heartbeat(hb)) = s.poll_transmit().unwrap().frame().kind else {
            panic!()
        };
        assert_eq!(s.poll_timeout(), Some(due + T.heartbeat_timeout));
        // Answered in time: the deadline goes away and the next heartbeat is scheduled.
        s.handle_frame(
            due + Duration::from_secs(1),
            frame(client_frame::Kind::HeartbeatReply(HeartbeatReply {
                nonce: hb.nonce,
            })),
        );
        assert_eq!(s.poll_timeout(), Some(due + T.heartbeat_interval));
        // Not answered: closed exactly at the deadline.
        let due2 = due + T.heartbeat_interval;
        s.handle_timeout(due2);
        assert!(s.poll_transmit().is_some());
        s.handle_timeout(due2 + T.heartbeat_timeout - Duration::from_millis(1));
        assert!(!s.is_closed());
        s.handle_timeout(due2 + T.heartbeat_timeout);
        assert_eq!(goodbye_reason(&mut s), Some(GoodbyeReason::HeartbeatTimeout));
        assert_eq!(s.poll_event(), Some(Event::Closed(CloseReason::HeartbeatTimeout)));
    }

    #[test]
    fn stale_heartbeat_reply_does_not_clear_deadline() {
        let t0 = Instant::now();
        let mut s = established(t0);
        s.handle_timeout(t0 + T.heartbeat_interval);
        let _ = s.poll_transmit();
        s.handle_frame(
            t0,
            frame(client_frame::Kind::HeartbeatReply(HeartbeatReply { nonce: 0 })),
        );
        s.handle_timeout(t0 + T.heartbeat_interval + T.heartbeat_timeout);
        assert!(s.is_closed());
    }

    #[test]
    fn pushes_are_written_once_in_order_and_acks_free_the_window() {
        let t0 = Instant::now();
        let mut s = established(t0);
        assert!(!s.push(push_frame(4)), "at or below last_seen is never written");
        assert!(s.push(push_frame(5)));
        assert!(s.push(push_frame(7)));
        assert!(!s.push(push_frame(6)), "out of order would break resume");
        assert!(!s.push(push_frame(7)), "a duplicate is never written");
        assert_eq!(s.inflight(), 2);
        assert_eq!(std::iter::from_fn(|| s.poll_transmit()).count(), 2);
        s.handle_frame(
            t0,
            frame(client_frame::Kind::Ack(Ack {
                up_to_seq: 5,
                seqs: vec![7],
            })),
        );
        assert_eq!(s.inflight(), 0);
        assert!(matches!(s.poll_event(), Some(Event::Acked(a)) if a.up_to_seq == 5));
    }

    #[test]
    fn no_push_before_accept_and_second_hello_is_error() {
        let t0 = Instant::now();
        let mut s = Session::new(t0, T);
        assert!(!s.push(push_frame(1)));
        let mut s = established(t0);
        s.handle_frame(t0, frame(client_frame::Kind::Hello(Hello::default())));
        assert!(s.is_closed());
    }

    #[test]
    fn voip_token_is_an_event_only_after_hello() {
        let t0 = Instant::now();
        let token = |t: &str| {
            frame(client_frame::Kind::VoipToken(push_proto::device::VoipToken {
                token: t.into(),
            }))
        };
        let mut s = established(t0);
        s.handle_frame(t0, token("abcd"));
        assert_eq!(s.poll_event(), Some(Event::VoipToken("abcd".into())));
        let mut s = Session::new(t0, T);
        s.handle_frame(t0, token("abcd"));
        assert!(s.is_closed(), "hello must come first");
    }

    #[test]
    fn oversized_hello_or_network_change_fields_end_the_session_before_any_event() {
        let now = Instant::now();
        let mut s = Session::new(now, T);
        s.handle_frame(
            now,
            frame(client_frame::Kind::Hello(Hello {
                credential: "c".into(),
                ssid: "s".repeat(3000),
                ..Hello::default()
            })),
        );
        assert_eq!(goodbye_reason(&mut s), Some(GoodbyeReason::ProtocolError));
        assert!(
            matches!(s.poll_event(), Some(Event::Closed(CloseReason::ProtocolError(d))) if d.contains("ssid"))
        );
        let mut s = established(now);
        s.handle_frame(
            now,
            frame(client_frame::Kind::NetworkChange(
                push_proto::device::NetworkChange {
                    ssid: "s".repeat(33),
                    path_lost: false,
                },
            )),
        );
        assert_eq!(goodbye_reason(&mut s), Some(GoodbyeReason::ProtocolError));
        assert!(s.is_closed());
        while let Some(e) = s.poll_event() {
            assert!(!matches!(e, Event::NetworkChanged(_)), "{e:?}");
        }
    }

    #[test]
    fn goodbye_is_sent_once() {
        let t0 = Instant::now();
        let mut s = established(t0);
        s.goodbye(GoodbyeReason::Replaced, "newer session");
        s.goodbye(GoodbyeReason::ServerShutdown, "again");
        assert_eq!(std::iter::from_fn(|| s.poll_transmit()).count(), 1);
        assert_eq!(
            s.poll_event(),
            Some(Event::Closed(CloseReason::ServerGoodbye(GoodbyeReason::Replaced)))
        );
        assert_eq!(s.poll_event(), None);
    }

    /// Nothing is queued after the close (a property of the `session_core` fuzz target): a hello
    /// and a second frame in one read close the session (protocol error, goodbye sent) before the
    /// driver authenticates the hello, and a refused credential then queued a second goodbye.
    #[test]
    fn reject_after_close_sends_nothing() {
        let t0 = Instant::now();
        let mut s = Session::new(t0, T);
        s.handle_frame(t0, frame(client_frame::Kind::Hello(Hello::default())));
        s.handle_frame(t0, frame(client_frame::Kind::Ack(Ack::default())));
        assert!(s.is_closed());
        s.reject(GoodbyeReason::AuthFailed, "credential refused");
        assert_eq!(std::iter::from_fn(|| s.poll_transmit()).count(), 1);
        assert!(matches!(s.poll_event(), Some(Event::Hello(_))));
        assert!(matches!(
            s.poll_event(),
            Some(Event::Closed(CloseReason::ProtocolError(_)))
        ));
        assert_eq!(s.poll_event(), None);
    }
}
