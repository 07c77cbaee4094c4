//! Runs one [`Session`] over TCP + TLS with tokio: one task, one timer, a fixed pipeline.
//!
//! Each turn of the loop: (1) write what the session wants written, (2) carry out its transport
//! commands, (3) hand its events to the host and report the pushes taken, then (4) wait for
//! exactly one input: stop, a host input, the connection attempt, bytes (only while the session
//! wants them: flow control), or the session's single deadline. Time is the registry's
//! [`crate::clock::Clock`]: tokio's clock (tests can pause and advance it), which the Linux
//! lifecycle host can also move forward (`test-clock`).

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use socket2::{SockRef, TcpKeepalive};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::TcpStream,
    sync::mpsc,
};
use tokio_rustls::{TlsConnector, client::TlsStream};
use tokio_util::sync::CancellationToken;

use crate::{
    clock::SessionClock,
    core::{
        Event, HostStop, LastSeen, NetworkEvent, OutcomeReport, PendingOutcomes, Session, State, StopReason,
        TransportCommand,
    },
    counters::{Counters, Guard, Resource},
};

/// Bytes read from the connection per read: bounds the read buffer of a session.
const READ_CHUNK: usize = 4096;
/// Time allowed for the goodbye and the TLS close once stopping.
const CLOSE_TIMEOUT: Duration = Duration::from_millis(500);

/// Receives what the session tells the app. Called on the session's task: return quickly
/// (show the notification, report the call) and do not block on the SDK from inside it.
/// A push counts as taken by the app when `on_event` returns, and is acknowledged then.
pub trait EventHandler: Send + Sync + 'static {
    /// One event.
    fn on_event(&self, event: Event);
}

/// Inputs from the host to a running session.
#[derive(Debug)]
pub(crate) enum Input {
    Network(NetworkEvent),
    VoipToken(String),
    CallOutcome(OutcomeReport),
    SystemTimer,
}

/// Where and how to connect.
#[derive(Debug)]
pub(crate) struct Transport {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) server_name: rustls::pki_types::ServerName<'static>,
    pub(crate) tls: Arc<rustls::ClientConfig>,
    pub(crate) write_timeout: Duration,
    pub(crate) keepalive: Duration,
    pub(crate) local_addr: Option<std::net::IpAddr>,
}

/// What the host can read while the session runs.
#[derive(Debug)]
pub struct Shared {
    state: Mutex<State>,
    /// One lock for both halves: a reader never sees a floor with another epoch.
    last_seen: Mutex<LastSeen>,
    /// The latest PushKit token the host gave, for the next start of the same client.
    voip_token: Mutex<Option<String>>,
    /// Call-outcome reports not replied to yet, for the next session of the same client (a
    /// restart) and as the source a new connection checks its session against.
    outcomes: Mutex<PendingOutcomes>,
    stats: [AtomicU64; 5],
}

/// Driver statistics (diagnostics, and the idle tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DriverStats {
    /// Times the session's deadline woke the task.
    pub timer_wakeups: u64,
    /// Connection attempts started.
    pub connect_attempts: u64,
    /// Turns of the driver loop (a busy loop shows up here).
    pub loop_turns: u64,
    /// Push events handed to the host.
    pub pushes: u64,
    /// Pushes received and never shown (duplicates, stale calls, expired messages).
    pub dropped_pushes: u64,
}

#[derive(Clone, Copy)]
enum Stat {
    TimerWakeups,
    ConnectAttempts,
    LoopTurns,
    Pushes,
    DroppedPushes,
}

impl Shared {
    pub(crate) fn new(last_seen: LastSeen, voip_token: Option<String>) -> Self {
        Self {
            state: Mutex::new(State::Idle),
            last_seen: Mutex::new(last_seen),
            voip_token: Mutex::new(voip_token),
            outcomes: Mutex::new(PendingOutcomes::default()),
            stats: Default::default(),
        }
    }

    /// Last reported state.
    pub fn state(&self) -> State {
        self.state.lock().expect("poisoned").clone()
    }

    /// The floor and its epoch.
    pub fn last_seen(&self) -> LastSeen {
        *self.last_seen.lock().expect("poisoned")
    }

    /// An older instance of the device ended at `older`: never resume below it. At an equal
    /// floor the older instance's epoch wins, being the later news (the floor only moves down
    /// on an epoch change, and then any whole pair is safe to send: a foreign epoch only makes
    /// the server renumber).
    pub(crate) fn raise_last_seen(&self, older: LastSeen) {
        let mut last_seen = self.last_seen.lock().expect("poisoned");
        if older.seq >= last_seen.seq {
            *last_seen = older;
        }
    }

    pub(crate) fn voip_token(&self) -> Option<String> {
        self.voip_token.lock().expect("poisoned").clone()
    }

    pub(crate) fn set_voip_token(&self, token: String) {
        *self.voip_token.lock().expect("poisoned") = Some(token);
    }

    /// Keep a checked report until the server replies to it.
    pub(crate) fn add_outcome(&self, report: OutcomeReport) {
        self.outcomes.lock().expect("poisoned").insert(report);
    }

    /// Call-outcome reports not replied to yet, oldest first.
    pub fn pending_outcomes(&self) -> Vec<OutcomeReport> {
        self.outcomes.lock().expect("poisoned").iter().cloned().collect()
    }

    /// Statistics so far.
    pub fn stats(&self) -> DriverStats {
        let get = |s: Stat| self.stats[s as usize].load(Ordering::Relaxed);
        DriverStats {
            timer_wakeups: get(Stat::TimerWakeups),
            connect_attempts: get(Stat::ConnectAttempts),
            loop_turns: get(Stat::LoopTurns),
            pushes: get(Stat::Pushes),
            dropped_pushes: get(Stat::DroppedPushes),
        }
    }

    fn bump(&self, s: Stat) {
        self.add(s, 1);
    }

    fn add(&self, s: Stat, n: u64) {
        self.stats[s as usize].fetch_add(n, Ordering::Relaxed);
    }
}

/// A connected TLS stream, boxed: rustls state is large and lives on the heap either way.
type Stream = Box<TlsStream<Counted<TcpStream>>>;
type Connecting = Pin<Box<dyn Future<Output = io::Result<Stream>> + Send>>;

enum Conn {
    None,
    Connecting(Connecting),
    Open {
        tls: Stream,
        buf: Box<[u8]>,
        /// Counts the connection as server-accepted while it lasts (set on `Connected`).
        accepted: Option<Guard>,
    },
}

enum Wake {
    Stop,
    Input(Option<Input>),
    Connect(io::Result<Stream>),
    Read(io::Result<usize>),
    Timer,
    /// The (simulated) clock moved; true if it jumped.
    ClockMoved(bool),
}

/// Everything one session task owns.
pub(crate) struct Driver {
    pub(crate) session: Session,
    pub(crate) transport: Arc<Transport>,
    pub(crate) handler: Arc<dyn EventHandler>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) inputs: mpsc::Receiver<Input>,
    pub(crate) cancel: CancellationToken,
    pub(crate) stop_reason: Arc<Mutex<Option<HostStop>>>,
    pub(crate) counters: Arc<Counters>,
    pub(crate) clock: SessionClock,
}

/// The phone's wall clock, Unix ms (0 if it is before 1970).
impl Driver {
    /// Run until the session stops (by the host, or for good by the server).
    pub(crate) async fn run(mut self) {
        let _session = self.counters.guard(Resource::Session);
        let mut conn = Conn::None;
        let timer = tokio::time::sleep_until(tokio::time::Instant::now());
        tokio::pin!(timer);
        let mut stopping = false;
        let mut reported_dropped = 0;
        self.session.handle_start(self.clock.now());
        loop {
            self.shared.bump(Stat::LoopTurns);
            // (1) Bytes for the current connection.
            if let Some(bytes) = self.session.poll_transmit()
                && let Err(e) = self.write(&mut conn, bytes, stopping).await
            {
                conn = Conn::None;
                self.session
                    .handle_disconnected(self.clock.now(), &format!("write failed: {e}"));
            }
            // (2) Transport commands, in order.
            while let Some(command) = self.session.poll_transport() {
                match command {
                    TransportCommand::Connect => {
                        self.shared.bump(Stat::ConnectAttempts);
                        conn = Conn::Connecting(Box::pin(connect(
                            self.transport.clone(),
                            self.counters.clone(),
                        )));
                    }
                    TransportCommand::Close => close(std::mem::replace(&mut conn, Conn::None)).await,
                }
            }
            // (3) Events for the host; taking a push may queue acks, so go round again.
            let mut progressed = false;
            while let Some(event) = self.session.poll_event() {
                progressed = true;
                self.deliver(event, &mut conn);
            }
            let dropped = self.session.dropped_pushes();
            self.shared.add(Stat::DroppedPushes, dropped - reported_dropped);
            reported_dropped = dropped;
            if self.session.is_stopped() {
                // Stopped by the host or for good by the server: the goodbye is written and
                // the connection closed above; nothing is left to wait for.
                break;
            }
            if progressed {
                continue;
            }
            // (4) Wait for one input.
            let deadline = self.session.poll_timeout();
            if let Some(at) = deadline {
                timer.as_mut().reset(self.clock.tokio_instant(at));
            }
            let wants_read = self.session.wants_read();
            let connected = matches!(self.session.state(), State::Connected { .. });
            // Quiet: no attempt or handshake in flight, no input queued, nothing due.
            let quiet = match conn {
                Conn::Connecting(_) => false,
                Conn::Open { .. } => connected,
                Conn::None => true,
            } && self.inputs.is_empty()
                && deadline.is_none_or(|at| at > self.clock.now());
            self.clock.park(quiet, deadline, connected);
            // Biased, in this order: a stop wins, and a due deadline is never starved by a
            // connection that always has bytes.
            let wake = tokio::select! {
                biased;
                _ = self.cancel.cancelled(), if !stopping => Wake::Stop,
                input = self.inputs.recv() => Wake::Input(input),
                jumped = self.clock.moved() => Wake::ClockMoved(jumped),
                _ = &mut timer, if deadline.is_some() => Wake::Timer,
                io = next_io(&mut conn, wants_read) => io,
            };
            match wake {
                Wake::Stop => {
                    stopping = true;
                    let reason = self
                        .stop_reason
                        .lock()
                        .expect("poisoned")
                        .unwrap_or(StopReason::Other.into());
                    self.session.handle_stop(self.clock.now(), reason);
                }
                Wake::Input(Some(Input::Network(event))) => {
                    self.session.handle_network(self.clock.now(), event)
                }
                Wake::Input(Some(Input::VoipToken(token))) => {
                    self.session.handle_voip_token(self.clock.now(), token)
                }
                Wake::Input(Some(Input::CallOutcome(report))) => {
                    // Checked by the client before it was queued.
                    let _ = self.session.handle_call_outcome(self.clock.now(), report);
                }
                Wake::Input(Some(Input::SystemTimer)) => self.session.handle_system_timer(self.clock.now()),
                // Every client handle is gone: stop as if asked to.
                Wake::Input(None) => {
                    stopping = true;
                    self.session.handle_stop(self.clock.now(), StopReason::Other);
                }
                Wake::Connect(Ok(tls)) => {
                    conn = Conn::Open {
                        tls,
                        buf: vec![0; READ_CHUNK].into_boxed_slice(),
                        accepted: None,
                    };
                    self.session
                        .handle_connected(self.clock.now(), self.clock.wall_ms());
                }
                Wake::Connect(Err(e)) => {
                    conn = Conn::None;
                    self.session.handle_disconnected(self.clock.now(), &e.to_string());
                }
                Wake::Read(Ok(0)) => {
                    conn = Conn::None;
                    self.session
                        .handle_disconnected(self.clock.now(), "connection closed by the server");
                }
                Wake::Read(Ok(n)) => {
                    if let Conn::Open { buf, .. } = &conn {
                        self.session.handle_bytes(self.clock.now(), &buf[..n]);
                    }
                }
                Wake::Read(Err(e)) => {
                    conn = Conn::None;
                    self.session.handle_disconnected(self.clock.now(), &e.to_string());
                }
                Wake::ClockMoved(true) => self.session.handle_clock_jump(self.clock.now()),
                Wake::ClockMoved(false) => {}
                Wake::Timer => {
                    self.shared.bump(Stat::TimerWakeups);
                    self.session.handle_timeout(self.clock.now());
                }
            }
        }
        close(conn).await;
    }

    fn deliver(&mut self, event: Event, conn: &mut Conn) {
        match &event {
            Event::State(state) => {
                if let Conn::Open { accepted, .. } = conn {
                    let connected = matches!(state, State::Connected { .. });
                    *accepted = connected.then(|| self.counters.guard(Resource::Connected));
                }
                *self.shared.state.lock().expect("poisoned") = state.clone();
            }
            Event::LastSeenSeq(last_seen) => *self.shared.last_seen.lock().expect("poisoned") = *last_seen,
            Event::CallOutcomeReplied(reply) => {
                let mut outcomes = self.shared.outcomes.lock().expect("poisoned");
                outcomes.remove(&reply.call_id, reply.outcome);
            }
            _ => {}
        }
        if let Event::State(State::Connected { .. }) = &event {
            // A report whose input was dropped (a full queue) is in `shared` only: hand it to
            // the session now, which sends what it did not have. The rest are repeats it ignores.
            for report in self.shared.pending_outcomes() {
                let _ = self.session.handle_call_outcome(self.clock.now(), report);
            }
        }
        let seq = event.push_seq();
        self.handler.on_event(event);
        if let Some(seq) = seq {
            self.shared.bump(Stat::Pushes);
            self.session.handle_delivered(self.clock.now(), seq);
        }
    }

    /// Write one burst under the write deadline; a stop cuts a blocked write short (except
    /// the goodbye after the stop, which gets a short deadline of its own).
    async fn write(&self, conn: &mut Conn, bytes: Bytes, stopping: bool) -> io::Result<()> {
        let Conn::Open { tls, .. } = conn else {
            return Ok(());
        };
        let limit = if stopping {
            CLOSE_TIMEOUT
        } else {
            self.transport.write_timeout
        };
        let write = async {
            tls.write_all(&bytes).await?;
            tls.flush().await
        };
        let write = async {
            tokio::time::timeout(limit, write)
                .await
                .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "write timed out")))
        };
        if stopping {
            return write.await;
        }
        tokio::select! {
            r = write => r,
            _ = self.cancel.cancelled() => Err(io::Error::other("stopping")),
        }
    }
}

/// The next I/O event of the connection, if it has one to give. Cancel-safe: the connection
/// attempt lives in `conn`, and a TLS read loses nothing when dropped.
async fn next_io(conn: &mut Conn, wants_read: bool) -> Wake {
    match conn {
        Conn::Connecting(attempt) => Wake::Connect(attempt.await),
        Conn::Open { tls, buf, .. } if wants_read => Wake::Read(tls.read(buf).await),
        _ => std::future::pending().await,
    }
}

/// Close politely (TLS close_notify) but briefly; dropping the stream closes the socket.
async fn close(conn: Conn) {
    if let Conn::Open { mut tls, .. } = conn {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, tls.shutdown()).await;
    }
}

/// Resolve, connect, tune and handshake. The session's connect deadline bounds all of it.
async fn connect(t: Arc<Transport>, counters: Arc<Counters>) -> io::Result<Stream> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((t.host.as_str(), t.port))
        .await?
        .collect();
    let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{} resolves to nothing", t.host));
    let mut tcp = None;
    for addr in addrs {
        match connect_tcp(addr, t.local_addr).await {
            Ok(s) => {
                tcp = Some(s);
                break;
            }
            Err(e) => last = e,
        }
    }
    let tcp = tcp.ok_or(last)?;
    tune(&tcp, &t);
    let tcp = Counted {
        inner: tcp,
        _guard: counters.guard(Resource::Socket),
    };
    let tls = TlsConnector::from(t.tls.clone())
        .connect(t.server_name.clone(), tcp)
        .await
        .map_err(crate::tls::explain)?;
    if tls.get_ref().1.alpn_protocol() != Some(push_proto::ALPN) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the server does not speak lpush/1 (ALPN)",
        ));
    }
    Ok(Box::new(tls))
}

/// Connect to `addr`, from `local` when it is set and of the same family.
async fn connect_tcp(addr: SocketAddr, local: Option<std::net::IpAddr>) -> io::Result<TcpStream> {
    let Some(local) = local.filter(|l| l.is_ipv4() == addr.is_ipv4()) else {
        return TcpStream::connect(addr).await;
    };
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.bind(SocketAddr::new(local, 0))?;
    socket.connect(addr).await
}

/// The OS defaults suit the internet, not a ward: find dead peers and stuck writes in seconds.
fn tune(tcp: &TcpStream, t: &Transport) {
    let sock = SockRef::from(tcp);
    let keepalive = TcpKeepalive::new()
        .with_time(t.keepalive)
        .with_interval(t.keepalive / 3)
        .with_retries(3);
    let mut results = vec![tcp.set_nodelay(true), sock.set_tcp_keepalive(&keepalive)];
    // Where the OS has it, a write the peer never acknowledges fails after the write timeout.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    results.push(sock.set_tcp_user_timeout(Some(t.write_timeout)));
    for r in results {
        if let Err(e) = r {
            tracing::debug!(error = %e, "socket option not applied");
        }
    }
}

/// A TCP stream counted in [`Resource::Socket`] until it is dropped (closed).
pub(crate) struct Counted<S> {
    inner: S,
    _guard: Guard,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connects_from_the_configured_local_address() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let local: std::net::IpAddr = "127.0.0.3".parse().unwrap();
        let (client, accepted) = tokio::join!(connect_tcp(addr, Some(local)), listener.accept());
        assert_eq!(client.unwrap().local_addr().unwrap().ip(), local);
        assert_eq!(accepted.unwrap().1.ip(), local);
        // Unset, or of the other family: the OS chooses.
        let v6: std::net::IpAddr = "::1".parse().unwrap();
        let (client, _) = tokio::join!(connect_tcp(addr, Some(v6)), listener.accept());
        assert_eq!(
            client.unwrap().local_addr().unwrap().ip().to_string(),
            "127.0.0.1"
        );
    }
}
