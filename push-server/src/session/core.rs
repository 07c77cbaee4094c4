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
mod tests;
