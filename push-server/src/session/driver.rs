//! Runs one [`Session`] over a TLS stream with tokio: one task, one timer, a fixed loop.
//!
//! Memory while idle is the point of the design: between bursts the task holds no read or write
//! buffer. It waits for socket readiness (not for bytes into a buffer), then decrypts what the
//! socket has in a buffer lent for the read ([`DeviceTls`]) and hands it to the [`Session`],
//! which keeps only a partial frame; what the session encodes is taken for one write.

use std::{
    io,
    sync::Arc,
    time::{Duration, Instant},
};

use push_proto::device::GoodbyeReason;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use super::{
    core::{Event, Session, Timing, Welcome},
    tls::DeviceTls,
};
use crate::{
    admission::KeyedRate,
    auth::{CredentialError, DeviceAuthority},
    hub::{Hub, SessionCtl, now_ms},
    metrics,
};

/// What a session needs from the server.
pub struct SessionEnv {
    /// The hub.
    pub hub: Hub,
    /// Verifies device credentials.
    pub auth: Arc<DeviceAuthority>,
    /// Protocol timing.
    pub timing: Timing,
    /// Per-burst write deadline.
    pub write_timeout: Duration,
    /// Frame size limit.
    pub max_frame: usize,
    /// Pushes in flight before waiting for acks.
    pub max_inflight: usize,
    /// Logins per device (`limits.device_logins_per_minute`, `device_login_burst`).
    pub logins: KeyedRate<String>,
}

impl SessionEnv {
    /// The login limiter of `limits`.
    pub fn login_rate(limits: &crate::config::Limits) -> KeyedRate<String> {
        KeyedRate::new(
            Duration::from_secs(60),
            limits.device_logins_per_minute,
            limits.device_login_burst,
        )
    }
}

/// Identity of an admitted session. Dropping it logs the session out of the hub, so even a task
/// that fails half-way (a bug, a panic) leaves no device marked online with a dead session.
struct Admitted {
    hub: Hub,
    device_id: String,
    session_id: u64,
    ctl: Arc<SessionCtl>,
    /// Unix ms the device was last heard (shown in the dashboard).
    heard: Arc<std::sync::atomic::AtomicI64>,
    /// Why the session ended, set by the driver's normal exit.
    end_reason: Option<String>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let reason = self
            .end_reason
            .take()
            .unwrap_or_else(|| "session task failed".into());
        self.hub.logout(&self.device_id, self.session_id, &reason);
    }
}

enum Wake {
    Readable,
    Hub,
    Timer,
    Shutdown,
}

/// Drive one session until it ends. Never panics on peer input; every way out is logged once.
/// `permit` is the session's slot under `limits.max_sessions`, released when the session ends.
pub async fn run(
    mut tls: DeviceTls,
    env: Arc<SessionEnv>,
    peer: String,
    shutdown: CancellationToken,
    permit: OwnedSemaphorePermit,
) {
    let mut session = Session::new(Instant::now(), env.timing, env.max_frame);
    let mut admitted: Option<Admitted> = None;
    // The handshake may already have read the hello, and then the socket never turns readable
    // for it: read once before the first wait.
    let mut unread = true;
    // Set when the stream ended or failed: what was read before it is still applied (an ack
    // followed at once by the close must not be lost), then the loop ends.
    let mut ended: Option<String> = None;
    let reason = loop {
        // 1. What the device said, first: its acks settle the pushes they name before the window
        // they opened lets more out (an ack is applied to what was written when it was sent).
        let mut closed = None;
        let mut progressed = false;
        while let Some(event) = session.poll_event() {
            progressed = true;
            match event {
                Event::Hello(hello) => admitted = authenticate(&env, &mut session, hello, &peer).await,
                Event::Acked(ack) => {
                    if let Some(a) = &admitted {
                        env.hub.ack(&a.device_id, a.session_id, ack.up_to_seq, &ack.seqs);
                    }
                }
                Event::NetworkChanged(change) => {
                    if let Some(a) = &admitted {
                        env.hub
                            .network_changed(&a.device_id, a.session_id, &change.ssid, change.path_lost);
                    }
                }
                Event::VoipToken(token) => {
                    if let Some(a) = &admitted {
                        if token.is_empty() {
                            env.hub.session_voip_token(&a.device_id, a.session_id, None);
                        } else {
                            match apns_bridge::DeviceToken::parse(&token) {
                                Ok(t) => env.hub.session_voip_token(&a.device_id, a.session_id, Some(t)),
                                Err(e) => {
                                    tracing::warn!(%peer, device = %a.device_id, error = %e, "VoIP token ignored")
                                }
                            }
                        }
                    }
                }
                Event::CallOutcome(report) => {
                    if let Some(a) = &admitted {
                        let reply = env.hub.call_outcome(&a.device_id, report).await;
                        session.reply_call_outcome(reply);
                    }
                }
                Event::Closed(reason) => closed = Some(reason),
            }
        }
        if let Some(reason) = ended.take() {
            break reason;
        }
        if let Some(reason) = closed {
            // Frames queued with the close (goodbye) go out before the socket closes.
            if let Err(e) = Box::pin(flush(&mut tls, &mut session, &env)).await {
                tracing::debug!(%peer, error = %e, "final flush failed");
            }
            break reason.to_string();
        }
        // 2. Inputs decided by others: stop requests, then pushes the window allows.
        let mut written = Vec::new();
        if let (Some(a), None) = (&admitted, &ended) {
            if let Some((reason, detail)) = a.ctl.take_stop() {
                session.goodbye(reason, &detail);
            }
            let room = env.max_inflight.saturating_sub(session.inflight());
            if session.is_established() && room > 0 {
                for push in env
                    .hub
                    .take_pushes(&a.device_id, a.session_id, session.last_sent_seq(), room)
                {
                    let seq = push.seq();
                    if session.push(push) {
                        written.push(seq);
                    }
                }
            }
        }
        // 3. Outputs. Only a push written is reported delivered.
        // Boxed: the write burst's state exists only while writing, not in every idle task.
        if session.wants_transmit()
            && ended.is_none()
            && let Err(e) = Box::pin(flush(&mut tls, &mut session, &env)).await
        {
            break format!("write failed: {e}");
        }
        if let (Some(a), false) = (&admitted, written.is_empty()) {
            env.hub.mark_delivered(&a.device_id, &written);
        }
        if progressed || session.is_closed() {
            // A goodbye asked for above closes the session: its close event is handled next.
            continue;
        }
        // 4. Wait for the next input; borrows of `tls` end with the select.
        let timer = session.poll_timeout();
        let wake = if std::mem::take(&mut unread) {
            Wake::Readable
        } else {
            tokio::select! {
            biased;
            _ = shutdown.cancelled() => Wake::Shutdown,
            r = tls.readable() => match r { Ok(()) => Wake::Readable, Err(e) => break format!("socket error: {e}") },
            _ = async { match &admitted { Some(a) => a.ctl.woken().await, None => std::future::pending().await } } => Wake::Hub,
            _ = async { match timer { Some(t) => tokio::time::sleep_until(t.into()).await, None => std::future::pending().await } } => Wake::Timer,
            }
        };
        match wake {
            Wake::Shutdown => {
                // Take acks that already arrived, so they are not replayed after the restart.
                let _ = read(&mut tls, &mut session);
                session.goodbye(GoodbyeReason::ServerShutdown, "server shutting down");
            }
            Wake::Timer => session.handle_timeout(Instant::now()),
            Wake::Hub => {}
            Wake::Readable => {
                match read(&mut tls, &mut session).inspect(|_| {
                    if let Some(a) = &admitted {
                        a.heard.store(now_ms(), std::sync::atomic::Ordering::Relaxed);
                    }
                }) {
                    // A goodbye read just before the end of stream still gets its own reason.
                    Ok(false) if !session.is_closed() => ended = Some("connection closed by device".into()),
                    Ok(_) => {}
                    Err(e) if !session.is_closed() => ended = Some(format!("read failed: {e}")),
                    Err(_) => {}
                }
            }
        }
    };
    if let Some(mut a) = admitted {
        tracing::info!(%peer, device = %a.device_id, session = a.session_id, %reason, "session ended");
        a.end_reason = Some(reason);
    } else {
        tracing::info!(%peer, %reason, "connection ended before login");
    }
    let _ = Box::pin(tokio::time::timeout(Duration::from_secs(1), tls.shutdown())).await;
    drop(permit);
}

/// Verify the credential and admit the device, or queue a goodbye.
async fn authenticate(
    env: &SessionEnv,
    session: &mut Session,
    hello: push_proto::device::Hello,
    peer: &str,
) -> Option<Admitted> {
    let claims = match env.auth.verify(&hello.credential) {
        Ok(claims) => claims,
        Err(e) => return refuse(session, e, peer),
    };
    // An extension in a crash loop logs in every few milliseconds; each login replaces the
    // previous session and writes the registry. Over its rate it is turned away before the hub
    // does anything, and the SDK reconnects with backoff.
    if !env.logins.check(&claims.sub) {
        metrics::login("rate_limited");
        tracing::warn!(%peer, device = %claims.sub, "login refused: over limits.device_logins_per_minute");
        session.goodbye(GoodbyeReason::Overloaded, "too many logins; retry later");
        return None;
    }
    // Cluster mode: the device's state moves to this node first (a newer login wins).
    let hold = match env.hub.hold_for_session(&claims.sub).await {
        Ok(hold) => hold,
        Err(e) => {
            metrics::login("unavailable");
            tracing::warn!(%peer, device = %claims.sub, error = %e, "login deferred: the cluster store is unavailable");
            session.goodbye(GoodbyeReason::Overloaded, "server unavailable; retry later");
            return None;
        }
    };
    let login = env.hub.login(&claims, &hello);
    drop(hold);
    let login = match login {
        Ok(login) => login,
        Err(e) => return refuse(session, e, peer),
    };
    metrics::login("ok");
    // Peer-chosen text is logged escaped (`?`), so it cannot forge log lines.
    tracing::info!(
        %peer, device = %claims.sub, session = login.session_id, sdk = ?hello.sdk_version,
        ssid = ?hello.ssid, instance = ?hello.instance_id, last_seen_seq = hello.last_seen_seq, replay = login.replay_count, "session started"
    );
    let welcome = Welcome {
        session_id: login.session_id,
        device_id: claims.sub.clone(),
        replay_count: login.replay_count,
        epoch: env.hub.epoch(),
        server_time_ms: env.hub.now(),
    };
    session.accept(Instant::now(), welcome, hello.last_seen_seq);
    Some(Admitted {
        hub: env.hub.clone(),
        device_id: claims.sub,
        session_id: login.session_id,
        ctl: login.ctl,
        heard: login.heard,
        end_reason: None,
    })
}

/// Turn away a hello whose credential failed. The peer learns only that it was refused,
/// expired or revoked (what its owner must act on); the verifier's own text, which names
/// accepted algorithms and JSON positions, stays in the log.
fn refuse(session: &mut Session, e: CredentialError, peer: &str) -> Option<Admitted> {
    let (reason, result, detail) = match e {
        CredentialError::Revoked => (GoodbyeReason::CredentialRevoked, "revoked", "credential revoked"),
        CredentialError::Expired => (GoodbyeReason::AuthFailed, "auth_failed", "credential expired"),
        _ => (GoodbyeReason::AuthFailed, "auth_failed", "credential refused"),
    };
    metrics::login(result);
    tracing::warn!(%peer, error = %e, "device rejected");
    session.reject(reason, detail);
    None
}

/// Write what the session queued in one burst under the write deadline.
async fn flush(tls: &mut DeviceTls, session: &mut Session, env: &SessionEnv) -> io::Result<()> {
    let Some(out) = session.poll_transmit() else {
        return Ok(());
    };
    match tokio::time::timeout(env.write_timeout, tls.write_all(&out)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "write timed out (device not reading)",
        )),
    }
}

/// Hand the session everything readable without blocking, until it closes. Returns `Ok(false)`
/// on a clean end of stream.
fn read(tls: &mut DeviceTls, session: &mut Session) -> io::Result<bool> {
    let now = Instant::now();
    tls.read_available(|data| {
        session.handle_bytes(now, data);
        !session.is_closed()
    })
}
