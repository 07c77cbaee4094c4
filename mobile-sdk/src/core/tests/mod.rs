//! Deterministic tests of the session core: a fake clock, a scripted server, no sockets.

mod outcomes;
mod properties;
mod scenarios;

use std::time::{Duration, Instant};

use bytes::BytesMut;
use push_proto::{
    device::{
        CallCancel, CallInvite, ClientFrame, Goodbye, GoodbyeReason, Heartbeat, Message, Push, ServerFrame,
        ServerHello, client_frame, push, server_frame,
    },
    frame,
};

use super::{BackoffConfig, Config, Event, LastSeen, Session, State, Timing, TransportCommand};

/// Test timing: round numbers so deadlines are easy to read.
const TIMING: Timing = Timing {
    connect_timeout: Duration::from_secs(10),
    viability_debounce: Duration::from_secs(5),
    stable_after: Duration::from_secs(10),
};
const BACKOFF: BackoffConfig = BackoffConfig {
    base: Duration::from_millis(250),
    cap: Duration::from_secs(30),
};
/// Heartbeat timing the scripted server announces (interval + timeout = 40 s).
const HB_INTERVAL_MS: u32 = 30_000;
const HB_TIMEOUT_MS: u32 = 10_000;
const SERVER_TIME_MS: i64 = 1_700_000_000_000;
/// The phone's wall clock at `t0`: a little ahead of the scripted server's.
const PHONE_TIME_MS: i64 = SERVER_TIME_MS + 2_500;
/// The scripted server's store epoch, and the one [`config`] resumes with.
const EPOCH: u64 = 1;

/// A session that resumes from `last_seen` of the scripted server's epoch.
fn config(last_seen: u64) -> Config {
    resume(LastSeen {
        epoch: EPOCH,
        seq: last_seen,
    })
}

fn resume(last_seen: LastSeen) -> Config {
    Config {
        last_seen,
        instance_id: "inst-1".into(),
        ssid: "ward-4b".into(),
        timing: TIMING,
        backoff: BACKOFF,
        jitter_seed: 0x5eed,
        ..Config::new("cred")
    }
}

/// `kind` framed as the server sends it.
fn server_wire(kind: server_frame::Kind) -> BytesMut {
    let mut buf = BytesMut::new();
    frame::encode(
        &ServerFrame { kind: Some(kind) },
        &mut buf,
        frame::DEFAULT_MAX_FRAME,
    )
    .unwrap();
    buf
}

/// A session, a fake clock, and everything it has output so far.
struct Harness {
    s: Session,
    t0: Instant,
    now: Instant,
    /// Frames the session wrote, decoded.
    sent: Vec<ClientFrame>,
    commands: Vec<TransportCommand>,
    events: Vec<Event>,
    /// `handle_timeout` calls made by [`Harness::sleep`]: the wake-ups a driver would have.
    wakeups: usize,
    /// Take every push as soon as it is polled, like the driver does.
    auto_take: bool,
}

impl Harness {
    fn new(cfg: Config) -> Self {
        let t0 = Instant::now();
        Self {
            s: Session::new(cfg),
            t0,
            now: t0,
            sent: Vec::new(),
            commands: Vec::new(),
            events: Vec::new(),
            wakeups: 0,
            auto_take: true,
        }
    }

    /// Drain every output in the documented order.
    fn drain(&mut self) {
        while let Some(bytes) = self.s.poll_transmit() {
            let mut buf = BytesMut::from(&bytes[..]);
            while let Some(f) = frame::decode::<ClientFrame>(&mut buf, frame::DEFAULT_MAX_FRAME).unwrap() {
                self.sent.push(f);
            }
            assert!(buf.is_empty(), "transmit holds whole frames only");
        }
        while let Some(c) = self.s.poll_transport() {
            self.commands.push(c);
        }
        while let Some(e) = self.s.poll_event() {
            let seq = e.push_seq();
            self.events.push(e);
            if let (true, Some(seq)) = (self.auto_take, seq) {
                assert!(self.s.handle_delivered(self.now, seq));
                // Taking may produce an event (last seen) and acks.
                self.drain();
            }
        }
    }

    fn take(&mut self, seq: u64) -> bool {
        let known = self.s.handle_delivered(self.now, seq);
        self.drain();
        known
    }

    fn elapsed(&self) -> Duration {
        self.now - self.t0
    }

    /// Let time pass by `d` without a wake-up in between (asserts none was due).
    fn advance(&mut self, d: Duration) {
        self.now += d;
    }

    /// Sleep until the session's next deadline, as a driver would, and handle it.
    fn sleep(&mut self) -> Option<Instant> {
        let at = self.s.poll_timeout()?;
        self.now = self.now.max(at);
        self.wakeups += 1;
        self.s.handle_timeout(self.now);
        self.drain();
        Some(at)
    }

    fn start(&mut self) {
        self.s.handle_start(self.now);
        self.drain();
    }

    fn connected(&mut self) {
        let wall = PHONE_TIME_MS + (self.now - self.t0).as_millis() as i64;
        self.s.handle_connected(self.now, wall);
        self.drain();
    }

    fn disconnected(&mut self, why: &str) {
        self.s.handle_disconnected(self.now, why);
        self.drain();
    }

    fn server(&mut self, kind: server_frame::Kind) {
        self.s.handle_bytes(self.now, &server_wire(kind));
        self.drain();
    }

    fn server_hello(&mut self) {
        self.server_hello_of(EPOCH);
    }

    /// A `ServerHello` from a store with `epoch`.
    fn server_hello_of(&mut self, epoch: u64) {
        self.server(server_frame::Kind::ServerHello(ServerHello {
            session_id: "s1".into(),
            device_id: "dev-1".into(),
            heartbeat_interval_ms: HB_INTERVAL_MS,
            heartbeat_timeout_ms: HB_TIMEOUT_MS,
            max_frame_size: 64 * 1024,
            server_time_ms: SERVER_TIME_MS,
            replay_count: 0,
            epoch,
        }));
    }

    /// Start, connect, exchange hellos.
    fn establish(&mut self) {
        self.start();
        self.connected();
        self.server_hello();
        assert!(
            matches!(self.s.state(), State::Connected { .. }),
            "{:?}",
            self.s.state()
        );
    }

    fn reconnect(&mut self) {
        self.connected();
        self.server_hello();
    }

    fn push_message(&mut self, seq: u64, id: &str) {
        self.server(server_frame::Kind::Push(message(seq, id)));
    }

    fn goodbye(&mut self, reason: GoodbyeReason) {
        self.server(server_frame::Kind::Goodbye(Goodbye {
            reason: reason as i32,
            detail: "bye".into(),
            ..Default::default()
        }));
    }

    fn heartbeat(&mut self, nonce: u64) {
        self.server(server_frame::Kind::Heartbeat(Heartbeat { nonce }));
    }

    /// Sequence numbers of the push events so far.
    fn shown(&self) -> Vec<u64> {
        self.events.iter().filter_map(Event::push_seq).collect()
    }

    /// Every sequence acknowledged so far, in order.
    fn acked(&self) -> Vec<u64> {
        self.sent
            .iter()
            .filter_map(|f| match &f.kind {
                Some(client_frame::Kind::Ack(a)) => Some(a.seqs.clone()),
                _ => None,
            })
            .flatten()
            .collect()
    }

    fn hellos(&self) -> Vec<&push_proto::device::Hello> {
        self.sent
            .iter()
            .filter_map(|f| match &f.kind {
                Some(client_frame::Kind::Hello(h)) => Some(h),
                _ => None,
            })
            .collect()
    }

    fn connects(&self) -> usize {
        self.commands
            .iter()
            .filter(|c| **c == TransportCommand::Connect)
            .count()
    }

    fn closes(&self) -> usize {
        self.commands
            .iter()
            .filter(|c| **c == TransportCommand::Close)
            .count()
    }
}

fn message(seq: u64, id: &str) -> Push {
    Push {
        seq,
        id: id.into(),
        body: Some(push::Body::Message(Message {
            title: format!("t{seq}"),
            body: "b".into(),
            ..Default::default()
        })),
    }
}

fn call_invite(seq: u64, call_id: &str, ring_deadline_ms: i64) -> Push {
    Push {
        seq,
        id: call_id.into(),
        body: Some(push::Body::CallInvite(CallInvite {
            call_id: call_id.into(),
            call_uuid: push_proto::call_uuid(call_id),
            caller_name: "Ward 4B".into(),
            ring_deadline_ms,
            ..Default::default()
        })),
    }
}

fn call_cancel(seq: u64, call_id: &str) -> Push {
    Push {
        seq,
        id: format!("{call_id}:cancel"),
        body: Some(push::Body::CallCancel(CallCancel {
            call_id: call_id.into(),
            call_uuid: push_proto::call_uuid(call_id),
            reason: 1,
        })),
    }
}

/// Architecture invariant: the core does no I/O and reads no clock.
#[test]
fn core_sources_name_no_io_and_no_clock() {
    let core = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/core");
    let checked = testkit::sans_io::assert_sans_io(&[core]);
    assert!(checked >= 7, "checked {checked} files");
}
