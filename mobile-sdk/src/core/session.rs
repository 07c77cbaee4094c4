//! The device's session with the push-server, across connections, as a state machine.

use std::{collections::VecDeque, time::Duration, time::Instant};

use bytes::{Bytes, BytesMut};
use push_proto::{
    device::{
        Ack, CallOutcome, CallOutcomeReply, CallOutcomeReport, CallOutcomeResult, ClientFrame, Goodbye,
        GoodbyeReason, HeartbeatReply, Hello, NetworkChange, Push, ServerFrame, ServerHello, VoipToken,
        client_frame, push, server_frame,
    },
    frame,
};

use super::{
    backoff::{Backoff, BackoffConfig},
    dedup::Dedup,
    event::{
        CallCancelPush, CallInvitePush, Disconnect, Event, HostStop, LastSeen, MessagePush, OutcomeReply,
        State, StopCause,
    },
    ledger::Ledger,
    outcomes::{self, Inserted, InvalidReport, OutcomeReport, PendingOutcomes},
};

/// Silence allowed when the server announces no heartbeat timing (30 s + 10 s, the defaults).
const DEFAULT_SILENCE: Duration = Duration::from_secs(40);
/// Largest frame accepted whatever the server announces: the extension's memory is small.
const MAX_FRAME_CAP: usize = 1024 * 1024;
/// Smallest frame limit honoured (a server announcing less is misconfigured).
const MIN_FRAME: usize = 1024;
/// Sequence numbers per `Ack` frame.
const ACKS_PER_FRAME: usize = 1024;

/// Everything a session needs to know up front.
#[derive(Debug, Clone)]
pub struct Config {
    /// Device credential (JWT) for the hello.
    pub credential: String,
    /// Random id of this provider instance (diagnostics on the server).
    pub instance_id: String,
    /// SDK version for the hello.
    pub sdk_version: String,
    /// SSID at start, if known.
    pub ssid: String,
    /// The floor and its epoch, as persisted by the host.
    pub last_seen: LastSeen,
    /// The PushKit (VoIP) token, hex, if the app registered one (empty: clear it on the
    /// server), so calls can still ring the device through APNs when it is off-site.
    pub voip_token: Option<String>,
    /// Timeouts.
    pub timing: Timing,
    /// Reconnection backoff.
    pub backoff: BackoffConfig,
    /// Seed of the backoff jitter (random in production, fixed in tests).
    pub jitter_seed: u64,
    /// Push ids remembered for de-duplication.
    pub recent_ids: usize,
    /// Events queued for the app before the session stops asking for input ([`Session::wants_read`]).
    pub max_pending_events: usize,
    /// Call-outcome reports still waiting for the server's reply (from the host's durable copy,
    /// or an earlier session of the same client): sent after the first `ServerHello`.
    pub outcome_reports: Vec<OutcomeReport>,
    /// Call-outcome reports kept at most (the oldest is dropped beyond it).
    pub max_outcome_reports: usize,
    /// Why the host stopped the device's previous session (Apple's name, empty if none): told
    /// in the hellos until a `ServerHello` answers, as its goodbye may not have got through.
    pub previous_stop: &'static str,
}

impl Config {
    /// Defaults for everything but the credential.
    pub fn new(credential: impl Into<String>) -> Self {
        Self {
            credential: credential.into(),
            instance_id: String::new(),
            sdk_version: concat!("mobile-sdk/", env!("CARGO_PKG_VERSION")).into(),
            ssid: String::new(),
            last_seen: LastSeen::default(),
            voip_token: None,
            timing: Timing::default(),
            backoff: BackoffConfig::default(),
            jitter_seed: 0,
            recent_ids: 512,
            max_pending_events: 256,
            outcome_reports: Vec::new(),
            max_outcome_reports: outcomes::DEFAULT_CAP,
            previous_stop: "",
        }
    }
}

/// Timeouts of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// From the connect command to the `ServerHello` (TCP, TLS and hello; DNS included).
    pub connect_timeout: Duration,
    /// How long the path may be unviable before the session gives up on it: a shorter flap
    /// keeps the connection.
    pub viability_debounce: Duration,
    /// A session that lasted this long resets the backoff when it ends.
    pub stable_after: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            viability_debounce: Duration::from_secs(5),
            stable_after: Duration::from_secs(10),
        }
    }
}

/// A network change reported by the host (`NEAppPushProvider` and `NWPathMonitor`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkEvent {
    /// Joined a matching Wi-Fi network.
    Joined {
        /// Its SSID.
        ssid: String,
    },
    /// Left the matching network.
    Left,
    /// The path became viable.
    Viable,
    /// The path is no longer viable.
    NotViable,
}

/// What the driver must do with the transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportCommand {
    /// Open a new connection (TCP, TLS); report with `handle_connected` or
    /// `handle_disconnected`.
    Connect,
    /// Close the current connection or abandon the attempt, after writing what
    /// `poll_transmit` returned before this command.
    Close,
}

#[derive(Debug)]
enum Phase {
    Idle,
    /// Stopped by the host or for good by the server; the cause is in `state`.
    Stopped,
    /// The driver is opening TCP + TLS.
    Connecting {
        deadline: Instant,
    },
    /// Hello sent, waiting for `ServerHello`.
    Handshaking {
        deadline: Instant,
        /// What the hello said: the server renumbers above this floor if the epoch is not its.
        sent: LastSeen,
    },
    Connected(Live),
    Waiting {
        retry_at: Instant,
    },
    /// The path has been unviable past the debounce; no timer at all.
    Offline,
}

#[derive(Debug)]
struct Live {
    since: Instant,
    silence: Duration,
    dead_at: Instant,
    /// When `ServerHello` arrived, and the server's clock then (Unix ms): the server's clock
    /// at any later instant, so call deadlines are judged on the server's clock, not ours.
    server_clock: (Instant, i64),
}

impl Live {
    fn server_now_ms(&self, now: Instant) -> i64 {
        let elapsed = now.saturating_duration_since(self.server_clock.0).as_millis();
        self.server_clock
            .1
            .saturating_add(i64::try_from(elapsed).unwrap_or(i64::MAX))
    }
}

#[derive(Debug)]
struct Network {
    viable: bool,
    /// End of the debounce while the path is unviable.
    lost_deadline: Option<Instant>,
    ssid: String,
}

/// One device's session with the push-server, across connections: handshake, heartbeats,
/// acknowledgements, de-duplication, the dead-server deadline, reconnection with backoff, and
/// network changes. It performs no I/O and reads no clock: time is an argument of every input.
///
/// Methods, in the order the driver uses them:
/// - getters (`&self`): [`Session::state`], [`Session::last_seen`], [`Session::wants_read`];
/// - inputs, each taking `now` (which must not move backwards; an earlier `now` counts as the
///   latest one seen): [`Session::handle_start`], [`Session::handle_stop`],
///   [`Session::handle_connected`], [`Session::handle_disconnected`], [`Session::handle_bytes`],
///   [`Session::handle_delivered`], [`Session::handle_network`], [`Session::handle_voip_token`],
///   [`Session::handle_call_outcome`], [`Session::handle_timeout`],
///   [`Session::handle_system_timer`], [`Session::handle_clock_jump`];
/// - outputs, drained after every input, in this order: [`Session::poll_transmit`] (bytes for
///   the current connection), then [`Session::poll_transport`] until `None` (a `Close` comes
///   after the bytes it must follow), then [`Session::poll_event`] until `None`, and finally
///   [`Session::poll_timeout`]: call `handle_timeout` at that instant unless another input comes
///   first. Reading from the connection is allowed only while [`Session::wants_read`] holds.
#[derive(Debug)]
pub struct Session {
    credential: String,
    instance_id: String,
    sdk_version: String,
    timing: Timing,
    max_pending_events: usize,
    phase: Phase,
    state: State,
    network: Network,
    backoff: Backoff,
    /// Attempts since the last established session.
    attempts: u32,
    dedup: Dedup,
    ledger: Ledger,
    /// The epoch of the store that numbered `ledger`'s sequences.
    epoch: u64,
    max_frame: usize,
    rx: BytesMut,
    tx: BytesMut,
    commands: VecDeque<TransportCommand>,
    events: VecDeque<Event>,
    now: Option<Instant>,
    /// Pushes received and never shown (duplicates, stale calls, expired messages).
    dropped: u64,
    voip_token: Option<String>,
    /// Call-outcome reports sent (or to send) on every session until the server replies.
    outcomes: PendingOutcomes,
    /// [`Config::previous_stop`], until a `ServerHello` answers a hello that carried it.
    previous_stop: &'static str,
}

impl Session {
    /// A session that has not started.
    pub fn new(config: Config) -> Self {
        let mut outcomes = PendingOutcomes::new(config.max_outcome_reports);
        for report in config.outcome_reports {
            if report.check().is_ok() {
                outcomes.insert(report);
            }
        }
        Self {
            outcomes,
            network: Network {
                viable: true,
                lost_deadline: None,
                ssid: config.ssid,
            },
            backoff: Backoff::new(config.backoff, config.jitter_seed),
            dedup: Dedup::new(config.last_seen.seq, config.recent_ids),
            ledger: Ledger::new(config.last_seen.seq),
            epoch: config.last_seen.epoch,
            credential: config.credential,
            instance_id: config.instance_id,
            sdk_version: config.sdk_version,
            timing: config.timing,
            max_pending_events: config.max_pending_events.max(1),
            phase: Phase::Idle,
            state: State::Idle,
            attempts: 0,
            max_frame: frame::DEFAULT_MAX_FRAME,
            rx: BytesMut::new(),
            tx: BytesMut::new(),
            commands: VecDeque::new(),
            events: VecDeque::new(),
            now: None,
            dropped: 0,
            voip_token: config.voip_token,
            previous_stop: config.previous_stop,
        }
    }

    // ----- getters -----

    /// The state last reported through [`Event::State`].
    pub fn state(&self) -> &State {
        &self.state
    }

    /// The floor and its epoch (what the host persists).
    pub fn last_seen(&self) -> LastSeen {
        LastSeen {
            epoch: self.epoch,
            seq: self.ledger.last_seen(),
        }
    }

    /// Whether the driver may read from the connection: false while the app lags behind, so an
    /// app that stops taking events stops the reads instead of growing a queue.
    pub fn wants_read(&self) -> bool {
        self.events.len() < self.max_pending_events && self.reads_expected()
    }

    /// Pushes received and never shown: duplicates, calls past their deadline, expired
    /// messages (diagnostics: a high number after a reconnect means the server replayed).
    pub fn dropped_pushes(&self) -> u64 {
        self.dropped
    }

    /// Call-outcome reports not replied to yet, oldest first.
    pub fn pending_outcomes(&self) -> impl Iterator<Item = &OutcomeReport> {
        self.outcomes.iter()
    }

    /// Call-outcome reports dropped unreplied because too many were pending.
    pub fn dropped_outcome_reports(&self) -> u64 {
        self.outcomes.dropped()
    }

    /// Whether the session is stopped (by the host or for good by the server).
    pub fn is_stopped(&self) -> bool {
        matches!(self.phase, Phase::Stopped)
    }

    // ----- inputs -----

    /// Start (or restart after a stop): connect at once. Does nothing while running.
    pub fn handle_start(&mut self, now: Instant) {
        let now = self.clock(now);
        if matches!(self.phase, Phase::Idle | Phase::Stopped) {
            self.backoff.reset();
            self.attempts = 0;
            self.connect(now);
        }
    }

    /// Stop: say goodbye if connected, close, and stay stopped until started again.
    pub fn handle_stop(&mut self, now: Instant, stop: impl Into<HostStop>) {
        let HostStop {
            reason,
            provider_reason,
        } = stop.into();
        self.clock(now);
        match self.phase {
            Phase::Idle | Phase::Stopped => return,
            Phase::Connected(_) => {
                // Acks first: the app took those pushes, the server must not replay them.
                self.flush_acks();
                self.encode(client_frame::Kind::Goodbye(Goodbye {
                    reason: GoodbyeReason::ClientStopping as i32,
                    detail: reason.as_str().into(),
                    provider_stop_reason: provider_reason.into(),
                }));
                self.commands.push_back(TransportCommand::Close);
            }
            Phase::Connecting { .. } | Phase::Handshaking { .. } => self.close_transport(None),
            Phase::Waiting { .. } | Phase::Offline => {}
        }
        self.rx = BytesMut::new();
        self.phase = Phase::Stopped;
        self.set_state(State::Stopped(StopCause::Host(reason)));
    }

    /// The connection asked for by `Connect` is up (TCP and TLS): the hello goes out, with
    /// `wall_ms`, the phone's wall clock now (Unix ms), so the server can see a skewed clock.
    pub fn handle_connected(&mut self, now: Instant, wall_ms: i64) {
        self.clock(now);
        if let Phase::Connecting { deadline } = self.phase {
            let sent = self.last_seen();
            self.phase = Phase::Handshaking { deadline, sent };
            let hello = Hello {
                credential: self.credential.clone(),
                sdk_version: self.sdk_version.clone(),
                last_seen_seq: sent.seq,
                ssid: self.network.ssid.clone(),
                instance_id: self.instance_id.clone(),
                epoch: sent.epoch,
                device_time_ms: wall_ms,
                previous_stop_reason: self.previous_stop.into(),
            };
            self.encode(client_frame::Kind::Hello(hello));
        }
    }

    /// The connection attempt failed, or the connection closed or failed.
    pub fn handle_disconnected(&mut self, now: Instant, error: &str) {
        let now = self.clock(now);
        let reason = match self.phase {
            Phase::Connecting { .. } => Disconnect::ConnectFailed(error.into()),
            Phase::Handshaking { .. } | Phase::Connected(_) => Disconnect::TransportClosed(error.into()),
            _ => return,
        };
        self.disconnect(now, reason, None);
    }

    /// Bytes arrived on the connection.
    pub fn handle_bytes(&mut self, now: Instant, data: &[u8]) {
        let now = self.clock(now);
        if !self.reads_expected() {
            return;
        }
        if let Phase::Connected(live) = &mut self.phase {
            live.dead_at = now + live.silence;
        }
        self.rx.extend_from_slice(data);
        while self.reads_expected() {
            match frame::decode::<ServerFrame>(&mut self.rx, self.max_frame) {
                Ok(Some(f)) => self.on_frame(now, f),
                Ok(None) => break,
                Err(e) => self.protocol_error(now, e.to_string()),
            }
        }
        if self.rx.is_empty() {
            // An idle session holds no read buffer.
            self.rx = BytesMut::new();
        }
    }

    /// The clock jumped forward (simulated time: the Linux lifecycle host's `test-clock`) while
    /// the connection stayed open. The server's heartbeats would have kept it alive through the
    /// span, so it counts as heard from now rather than silent throughout; every other deadline
    /// falls due as it would have. A connection that is in fact dead is found out by the silence
    /// deadline after the jump.
    pub fn handle_clock_jump(&mut self, now: Instant) {
        let now = self.clock(now);
        if let Phase::Connected(live) = &mut self.phase {
            live.dead_at = now + live.silence;
        }
    }

    /// The app took the push with sequence `seq`: it may be acknowledged. Returns false if no
    /// push with that sequence was waiting for the app.
    pub fn handle_delivered(&mut self, now: Instant, seq: u64) -> bool {
        self.clock(now);
        let before = self.ledger.last_seen();
        let known = self.ledger.taken(seq);
        self.report_last_seen(before);
        known
    }

    /// The host reports a network change.
    pub fn handle_network(&mut self, now: Instant, event: NetworkEvent) {
        let now = self.clock(now);
        match event {
            NetworkEvent::NotViable | NetworkEvent::Left => {
                if self.network.viable {
                    // Best effort, while the connection may still carry it: the server then
                    // reads the silence that follows as leaving the Wi-Fi, not a phone silent
                    // on the SSID.
                    self.report_path(true);
                }
                if event == NetworkEvent::Left {
                    self.network.ssid.clear();
                }
                if self.network.viable {
                    self.network.viable = false;
                    self.network.lost_deadline = Some(now + self.timing.viability_debounce);
                }
            }
            NetworkEvent::Viable => {
                if !self.network.viable {
                    self.network.viable = true;
                    self.network.lost_deadline = None;
                    self.report_path(false);
                    if matches!(self.phase, Phase::Offline) {
                        self.backoff.reset();
                        self.connect(now);
                    }
                }
            }
            NetworkEvent::Joined { ssid } => {
                let changed = ssid != self.network.ssid;
                let was_viable = self.network.viable;
                self.network = Network {
                    viable: true,
                    lost_deadline: None,
                    ssid,
                };
                match self.phase {
                    Phase::Offline => {
                        self.backoff.reset();
                        self.connect(now);
                    }
                    // A different (or regained) matching network: the server is likely
                    // reachable now, so do not sit out the backoff, nor an attempt whose SYNs
                    // went out on the old path and may wait seconds for a retransmission.
                    Phase::Waiting { .. } | Phase::Connecting { .. } if changed || !was_viable => {
                        if matches!(self.phase, Phase::Connecting { .. }) {
                            self.close_transport(None);
                        }
                        self.backoff.reset();
                        self.connect(now);
                    }
                    // Roamed to another SSID, or back on the path after losing it.
                    Phase::Connected(_) if changed || !was_viable => self.report_path(false),
                    _ => {}
                }
            }
        }
    }

    /// Tell a connected server the path is failing (`lost`) or back, on the current SSID.
    fn report_path(&mut self, lost: bool) {
        if matches!(self.phase, Phase::Connected(_)) {
            let ssid = self.network.ssid.clone();
            self.encode(client_frame::Kind::NetworkChange(NetworkChange {
                ssid,
                path_lost: lost,
            }));
        }
    }

    /// PushKit reported a (new) token, or the app cleared it (empty). Sent at once when
    /// connected, and after every `ServerHello` (the server keeps the latest; sending it again
    /// costs a few bytes and survives a server that lost it).
    pub fn handle_voip_token(&mut self, now: Instant, token: String) {
        self.clock(now);
        if self.voip_token.as_ref() == Some(&token) {
            return;
        }
        self.voip_token = Some(token.clone());
        if matches!(self.phase, Phase::Connected(_)) {
            self.encode(client_frame::Kind::VoipToken(VoipToken { token }));
        }
    }

    /// The user acted on a call (CallKit): report it to the server now if connected, and after
    /// every later `ServerHello` until a `CallOutcomeReply` names it (then
    /// [`Event::CallOutcomeReplied`]). A report already pending (same call id and outcome) is not
    /// sent again. Refused if the server would refuse it.
    pub fn handle_call_outcome(&mut self, now: Instant, report: OutcomeReport) -> Result<(), InvalidReport> {
        self.clock(now);
        report.check()?;
        let frame = CallOutcomeReport {
            call_id: report.call_id.clone(),
            outcome: report.outcome as i32,
            at_ms: report.at_ms,
        };
        match self.outcomes.insert(report) {
            Inserted::Duplicate => return Ok(()),
            Inserted::Added => {}
            Inserted::AddedDropping(old) => tracing::warn!(
                call_id = %old.call_id,
                outcome = old.outcome.as_str_name(),
                dropped = self.outcomes.dropped(),
                "too many call-outcome reports pending; the oldest was dropped unreplied"
            ),
        }
        if matches!(self.phase, Phase::Connected(_)) {
            self.encode(client_frame::Kind::CallOutcome(frame));
        }
        Ok(())
    }

    /// The instant from `poll_timeout` arrived (or any later one).
    pub fn handle_timeout(&mut self, now: Instant) {
        let now = self.clock(now);
        if self.is_active()
            && let Some(deadline) = self.network.lost_deadline
            && now >= deadline
        {
            self.go_offline();
            return;
        }
        match &self.phase {
            Phase::Connecting { deadline } | Phase::Handshaking { deadline, .. } if now >= *deadline => {
                self.disconnect(now, Disconnect::ConnectTimeout, None)
            }
            Phase::Connected(live) if now >= live.dead_at => {
                self.disconnect(now, Disconnect::ServerSilent, None)
            }
            Phase::Waiting { retry_at } if now >= *retry_at => self.connect(now),
            _ => {}
        }
    }

    /// The host's periodic timer (`handleTimerEvent`, about every 60 s). A backstop and a retry
    /// opportunity: a path reported unviable may be wrong, a suspended process may have missed
    /// its own timer, and a device waiting out its backoff tries at once (iOS spreads these
    /// timers over its devices, so this is no stampede).
    pub fn handle_system_timer(&mut self, now: Instant) {
        let now = self.clock(now);
        if matches!(self.phase, Phase::Offline | Phase::Waiting { .. }) {
            self.connect(now);
        } else {
            self.handle_timeout(now);
        }
    }

    // ----- outputs -----

    /// Bytes to write to the current connection, if any.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        if matches!(self.phase, Phase::Connected(_)) {
            self.flush_acks();
        }
        (!self.tx.is_empty()).then(|| std::mem::take(&mut self.tx).freeze())
    }

    /// Next transport command.
    pub fn poll_transport(&mut self) -> Option<TransportCommand> {
        self.commands.pop_front()
    }

    /// Next event for the app.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When `handle_timeout` must be called next; `None` when nothing is scheduled (idle,
    /// stopped, or waiting for the network).
    pub fn poll_timeout(&self) -> Option<Instant> {
        let phase = match &self.phase {
            Phase::Connecting { deadline } | Phase::Handshaking { deadline, .. } => Some(*deadline),
            Phase::Connected(live) => Some(live.dead_at),
            Phase::Waiting { retry_at } => Some(*retry_at),
            Phase::Idle | Phase::Stopped | Phase::Offline => None,
        };
        let debounce = self.network.lost_deadline.filter(|_| self.is_active());
        match (phase, debounce) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    // ----- internals -----

    fn clock(&mut self, now: Instant) -> Instant {
        let now = self.now.map_or(now, |seen| seen.max(now));
        self.now = Some(now);
        now
    }

    /// Running and not waiting for the network: the phases the debounce applies to.
    fn is_active(&self) -> bool {
        !matches!(self.phase, Phase::Idle | Phase::Stopped | Phase::Offline)
    }

    fn reads_expected(&self) -> bool {
        matches!(self.phase, Phase::Handshaking { .. } | Phase::Connected(_))
    }

    fn set_state(&mut self, state: State) {
        if self.state != state {
            self.state = state.clone();
            self.events.push_back(Event::State(state));
        }
    }

    fn connect(&mut self, now: Instant) {
        self.attempts = self.attempts.saturating_add(1);
        self.phase = Phase::Connecting {
            deadline: now + self.timing.connect_timeout,
        };
        self.commands.push_back(TransportCommand::Connect);
        self.set_state(State::Connecting {
            attempt: self.attempts,
        });
    }

    /// Drop the connection (optionally with a goodbye) and forget what belonged to it.
    fn close_transport(&mut self, goodbye: Option<(GoodbyeReason, String)>) {
        self.tx = BytesMut::new();
        self.rx = BytesMut::new();
        // Unsent acks are covered by the next hello's `last_seen_seq`, or re-sent when the
        // server replays what they acknowledged.
        self.ledger.take_acks();
        if let Some((reason, detail)) = goodbye {
            self.encode(client_frame::Kind::Goodbye(Goodbye {
                reason: reason as i32,
                detail,
                ..Default::default()
            }));
        }
        self.commands.push_back(TransportCommand::Close);
        self.max_frame = frame::DEFAULT_MAX_FRAME;
    }

    /// The connection or attempt ended for a reason that allows reconnecting.
    fn disconnect(&mut self, now: Instant, reason: Disconnect, goodbye: Option<(GoodbyeReason, String)>) {
        let stable = matches!(&self.phase, Phase::Connected(live)
            if now.saturating_duration_since(live.since) >= self.timing.stable_after);
        self.close_transport(goodbye);
        if stable {
            self.backoff.reset();
        }
        if !self.network.viable && self.network.lost_deadline.is_none() {
            // Unviable past the debounce already (a backstop attempt failed): wait for it.
            self.phase = Phase::Offline;
            self.set_state(State::WaitingForNetwork);
            return;
        }
        let retry_in = self.backoff.next_delay();
        self.phase = Phase::Waiting {
            retry_at: now + retry_in,
        };
        self.set_state(State::WaitingToRetry { retry_in, reason });
    }

    fn go_offline(&mut self) {
        if matches!(
            self.phase,
            Phase::Connecting { .. } | Phase::Handshaking { .. } | Phase::Connected(_)
        ) {
            self.close_transport(None);
        }
        self.network.lost_deadline = None;
        self.phase = Phase::Offline;
        self.set_state(State::WaitingForNetwork);
    }

    /// The server ended the session for a reason that forbids reconnecting.
    fn terminate(&mut self, cause: StopCause) {
        self.close_transport(None);
        self.phase = Phase::Stopped;
        self.set_state(State::Stopped(cause));
    }

    fn protocol_error(&mut self, now: Instant, detail: String) {
        let goodbye = (GoodbyeReason::ProtocolError, detail.clone());
        self.disconnect(now, Disconnect::ProtocolError(detail), Some(goodbye));
    }

    fn on_frame(&mut self, now: Instant, frame: ServerFrame) {
        use server_frame::Kind;
        let Some(kind) = frame.kind else {
            return self.protocol_error(now, "frame without content".into());
        };
        match (&self.phase, kind) {
            (&Phase::Handshaking { sent, .. }, Kind::ServerHello(hello)) => {
                self.previous_stop = "";
                self.established(now, sent, hello)
            }
            (_, Kind::Goodbye(bye)) => self.on_goodbye(now, bye),
            (Phase::Connected(_), Kind::Push(push)) => self.on_push(now, push),
            (Phase::Connected(_), Kind::Heartbeat(hb)) => {
                self.encode(client_frame::Kind::HeartbeatReply(HeartbeatReply {
                    nonce: hb.nonce,
                }))
            }
            (Phase::Connected(_), Kind::CallOutcomeReply(reply)) => self.on_outcome_reply(reply),
            (Phase::Connected(_), Kind::ServerHello(_)) => {
                self.protocol_error(now, "second ServerHello".into())
            }
            (_, _) => self.protocol_error(now, "expected ServerHello first".into()),
        }
    }

    fn established(&mut self, now: Instant, sent: LastSeen, hello: ServerHello) {
        let announced = u64::from(hello.heartbeat_interval_ms) + u64::from(hello.heartbeat_timeout_ms);
        let silence = match announced {
            0 => DEFAULT_SILENCE,
            ms => Duration::from_millis(ms),
        };
        self.max_frame = match hello.max_frame_size as usize {
            0 => frame::DEFAULT_MAX_FRAME,
            n => n.clamp(MIN_FRAME, MAX_FRAME_CAP),
        };
        self.phase = Phase::Connected(Live {
            since: now,
            silence,
            dead_at: now + silence,
            server_clock: (now, hello.server_time_ms),
        });
        self.attempts = 0;
        if hello.epoch != sent.epoch {
            self.new_epoch(sent.seq, hello.epoch);
        }
        if let Some(token) = self.voip_token.clone() {
            self.encode(client_frame::Kind::VoipToken(VoipToken { token }));
        }
        // Unreplied reports again: the last session may have ended before the reply (or the
        // report) crossed; the server answers a repeat as it answered the first.
        let reports: Vec<CallOutcomeReport> = self
            .outcomes
            .iter()
            .map(|r| CallOutcomeReport {
                call_id: r.call_id.clone(),
                outcome: r.outcome as i32,
                at_ms: r.at_ms,
            })
            .collect();
        for report in reports {
            self.encode(client_frame::Kind::CallOutcome(report));
        }
        self.set_state(State::Connected {
            session_id: hello.session_id,
            device_id: hello.device_id,
        });
    }

    fn on_goodbye(&mut self, now: Instant, bye: Goodbye) {
        let reason = GoodbyeReason::try_from(bye.reason).unwrap_or(GoodbyeReason::Unspecified);
        match reason {
            GoodbyeReason::Replaced => self.terminate(StopCause::Replaced),
            GoodbyeReason::CredentialRevoked => self.terminate(StopCause::CredentialRevoked),
            GoodbyeReason::AuthFailed => self.terminate(StopCause::AuthFailed),
            _ => self.disconnect(now, Disconnect::ServerGoodbye(reason), None),
        }
    }

    /// A reply for a report not pending (a repeat answered twice, or dropped) changes nothing.
    fn on_outcome_reply(&mut self, reply: CallOutcomeReply) {
        let outcome = CallOutcome::try_from(reply.outcome).unwrap_or(CallOutcome::Unspecified);
        if self.outcomes.remove(&reply.call_id, outcome).is_none() {
            tracing::debug!(call_id = %reply.call_id, outcome = reply.outcome, "reply to no pending call-outcome report");
            return;
        }
        self.events.push_back(Event::CallOutcomeReplied(OutcomeReply {
            result: CallOutcomeResult::try_from(reply.result).unwrap_or(CallOutcomeResult::Unspecified),
            call_id: reply.call_id,
            outcome,
            detail: reply.detail,
        }));
    }

    fn on_push(&mut self, now: Instant, push: Push) {
        let Phase::Connected(live) = &self.phase else {
            return;
        };
        let server_now = live.server_now_ms(now);
        let before = self.ledger.last_seen();
        let duplicate = self.dedup.check(push.seq, &push.id);
        // Recorded even when it is a duplicate by id: its sequence is settled below, and the
        // floor must never lag behind `last_seen`, or an older sequence would pass as new.
        self.dedup.record(push.seq, &push.id);
        if duplicate.is_some() {
            self.dropped += 1;
            self.ledger.dropped(push.seq);
            return self.report_last_seen(before);
        }
        let (seq, id) = (push.seq, push.id);
        let event = match push.body {
            Some(push::Body::Message(m)) if m.expires_at_ms == 0 || server_now < m.expires_at_ms => {
                Some(Event::Message(MessagePush {
                    seq,
                    id,
                    priority: m.priority(),
                    title: m.title,
                    body: m.body,
                    data: m.data,
                    collapse_key: m.collapse_key,
                    sent_at_ms: m.sent_at_ms,
                    expires_at_ms: m.expires_at_ms,
                    sender: m.sender,
                }))
            }
            // A call past its deadline is never shown, however late it arrived.
            Some(push::Body::CallInvite(c)) if server_now < c.ring_deadline_ms => {
                // Saturating: a server clock far in the past (any `server_time_ms` is accepted) must not
                // overflow; the deadline is still in the future.
                let remaining = u64::try_from(c.ring_deadline_ms.saturating_sub(server_now)).unwrap_or(0);
                Some(Event::CallInvite(CallInvitePush {
                    seq,
                    id,
                    call_id: c.call_id,
                    call_uuid: c.call_uuid,
                    caller_name: c.caller_name,
                    caller_handle: c.caller_handle,
                    video: c.video,
                    created_at_ms: c.created_at_ms,
                    ring_deadline_ms: c.ring_deadline_ms,
                    ring_remaining: Duration::from_millis(remaining),
                }))
            }
            Some(push::Body::CallCancel(c)) => Some(Event::CallCancel(CallCancelPush {
                seq,
                id,
                reason: c.reason(),
                call_id: c.call_id,
                call_uuid: c.call_uuid,
            })),
            // Expired, past its ring deadline, or a body this SDK does not know.
            _ => None,
        };
        match event {
            Some(event) => {
                self.ledger.handed(seq);
                self.events.push_back(event);
            }
            None => {
                self.dropped += 1;
                self.ledger.dropped(seq);
            }
        }
        self.report_last_seen(before);
    }

    /// The server's store is not the one that numbered our floor: it acknowledged nothing and
    /// renumbers its queued pushes above the floor the hello carried. Anything numbered since
    /// in the old epoch (pushes still with the app, their acks, the dedup floor) would name
    /// other pushes now, so it is forgotten; the ids stay, so a renumbered push the app already
    /// has is still dropped.
    fn new_epoch(&mut self, floor: u64, epoch: u64) {
        self.epoch = epoch;
        self.ledger = Ledger::new(floor);
        self.dedup.rebase(floor);
        self.events.push_back(Event::LastSeenSeq(self.last_seen()));
    }

    fn report_last_seen(&mut self, before: u64) {
        if self.ledger.last_seen() != before {
            self.events.push_back(Event::LastSeenSeq(self.last_seen()));
        }
    }

    fn flush_acks(&mut self) {
        let acks = self.ledger.take_acks();
        for chunk in acks.chunks(ACKS_PER_FRAME) {
            self.encode(client_frame::Kind::Ack(Ack {
                up_to_seq: 0,
                seqs: chunk.to_vec(),
            }));
        }
    }

    fn encode(&mut self, kind: client_frame::Kind) {
        let frame = ClientFrame { kind: Some(kind) };
        // Only an oversized credential can exceed the limit; the server would refuse it anyway,
        // and an empty hello times out into the backoff instead of looping.
        if let Err(e) = frame::encode(&frame, &mut self.tx, self.max_frame) {
            tracing::error!(error = %e, "client frame over the limit not sent");
        }
    }
}
