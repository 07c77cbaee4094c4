//! The server side of one device session as a state machine: no sockets, no clock, no hub.
//!
//! Call order, as in quinn-proto: feed inputs (`handle_bytes`, `handle_timeout`, and the
//! decisions `accept` / `reject` / `push` / `goodbye`), then drain outputs (`poll_transmit`,
//! `poll_event` until `None`), then sleep until `poll_timeout`. Time only moves forward. As in
//! the SDK's core, bytes go in and out, time (`std::time::Instant`) is passed in, and a test
//! checks that these sources name no I/O and no clock.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use push_proto::{
    device::{
        Ack, CallOutcome, CallOutcomeReply, CallOutcomeReport, ClientFrame, Goodbye, GoodbyeReason,
        Heartbeat, Hello, NetworkChange, ServerFrame, ServerHello, client_frame, server_frame,
    },
    frame,
};

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

/// What the hub decided for an accepted device: the `ServerHello` says it, with the session's
/// timing and frame limit.
#[derive(Debug, Clone, Default)]
pub struct Welcome {
    /// The session's id (unique per process).
    pub session_id: u64,
    /// The device the credential names.
    pub device_id: String,
    /// Pushes queued for replay.
    pub replay_count: u32,
    /// The store's epoch.
    pub epoch: u64,
    /// The server's wall clock, Unix ms.
    pub server_time_ms: i64,
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

/// One session's protocol state. Its buffers are empty, not merely cleared, while idle.
#[derive(Debug)]
pub struct Session {
    timing: Timing,
    /// The configured frame limit (before the hello is accepted, the protocol's default caps it).
    max_frame: usize,
    phase: Phase,
    /// Received bytes not yet a whole frame, and encoded frames not yet taken.
    rx: BytesMut,
    tx: BytesMut,
    events: VecDeque<Event>,
    nonce: u64,
    /// Highest sequence written in this session; the hub hands out pushes above it.
    last_sent_seq: u64,
    /// Sequences written and not yet acknowledged, in order (bounded by the in-flight window).
    inflight: VecDeque<u64>,
}

impl Session {
    /// A session whose TLS handshake completed at `now`; `max_frame` is the configured limit.
    pub fn new(now: Instant, timing: Timing, max_frame: usize) -> Self {
        Self {
            timing,
            max_frame,
            phase: Phase::AwaitingHello {
                deadline: now + timing.hello_timeout,
            },
            rx: BytesMut::new(),
            tx: BytesMut::new(),
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

    /// Bytes arrived from the device: whole frames are applied, until the session closes. Before
    /// the hello is accepted the protocol's default frame limit caps the configured one, so an
    /// unauthenticated peer can never make the server buffer more than that.
    pub fn handle_bytes(&mut self, now: Instant, data: &[u8]) {
        self.rx.extend_from_slice(data);
        while !self.is_closed() {
            let limit = match self.phase {
                Phase::Established { .. } => self.max_frame,
                _ => self.max_frame.min(frame::DEFAULT_MAX_FRAME),
            };
            match frame::decode::<ClientFrame>(&mut self.rx, limit) {
                Ok(Some(f)) => self.on_frame(now, f),
                Ok(None) => break,
                Err(e) => self.protocol_error(&e.to_string()),
            }
        }
        if self.rx.is_empty() || self.is_closed() {
            // An idle session holds no read buffer.
            self.rx = BytesMut::new();
        }
    }

    fn on_frame(&mut self, now: Instant, frame: ClientFrame) {
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

    /// The hub accepted the hello: the `ServerHello` goes out, and pushes above `last_seen_seq`
    /// may follow.
    pub fn accept(&mut self, now: Instant, welcome: Welcome, last_seen_seq: u64) {
        if !matches!(self.phase, Phase::Authenticating) {
            return;
        }
        self.last_sent_seq = last_seen_seq;
        self.phase = Phase::Established {
            next_heartbeat: now + self.timing.heartbeat_interval,
            outstanding: None,
        };
        self.send(server_frame::Kind::ServerHello(ServerHello {
            session_id: welcome.session_id.to_string(),
            device_id: welcome.device_id,
            heartbeat_interval_ms: self.timing.heartbeat_interval.as_millis() as u32,
            heartbeat_timeout_ms: self.timing.heartbeat_timeout.as_millis() as u32,
            max_frame_size: self.max_frame as u32,
            server_time_ms: welcome.server_time_ms,
            replay_count: welcome.replay_count,
            epoch: welcome.epoch,
        }));
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

    /// Write a push; whether it was. The caller keeps within the in-flight window and hands
    /// pushes in sequence order; a push at or below the last one written is skipped, so a replay
    /// race cannot deliver twice.
    pub fn push(&mut self, push: EncodedPush) -> bool {
        let seq = push.seq();
        if !self.is_established() || seq <= self.last_sent_seq {
            return false;
        }
        self.last_sent_seq = seq;
        if let Err(e) = push.write_frame(&mut self.tx, self.max_frame) {
            // The hub bounds message sizes well below the frame limit, so this is a bug, not input.
            tracing::error!(seq, error = %e, "push over the frame limit dropped");
            return false;
        }
        self.inflight.push_back(seq);
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

    /// Whether `poll_transmit` has bytes.
    pub fn wants_transmit(&self) -> bool {
        !self.tx.is_empty()
    }

    /// The frames queued so far, encoded, to write in one burst.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        self.wants_transmit()
            .then(|| std::mem::take(&mut self.tx).freeze())
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
        let frame = ServerFrame { kind: Some(kind) };
        if let Err(e) = frame::encode(&frame, &mut self.tx, self.max_frame) {
            // The session's own frames are small, so this is a bug, not input.
            tracing::error!(error = %e, "server frame over the limit dropped");
        }
    }
}

#[cfg(test)]
mod tests;
