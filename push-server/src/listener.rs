//! Accept loops: TCP tuning, the session limit, and TLS handshakes with a deadline, so a client
//! that opens TCP and never finishes the handshake costs a permit for a bounded time only.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use socket2::{SockRef, TcpKeepalive};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Semaphore, mpsc},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{config::Limits, observe::metrics, session::driver::SessionEnv};

/// Accept queue of the device listener; the kernel caps it at `net.core.somaxconn` (4096 on
/// current Linux). Tokio's default of 1,024 overflows when a whole site reconnects at once
/// (an AP reboot, a server restart), and every SYN the kernel drops costs its device a 1 s
/// retransmission timeout.
const DEVICE_BACKLOG: u32 = 8192;

/// Listen for devices on `addr` with the accept queue above.
pub fn bind_devices(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(DEVICE_BACKLOG)
}

/// Accept device connections until `shutdown`; each session runs on `tracker`.
///
/// The loop runs outside tokio's cooperative budget: it drains the accept queue whenever it is
/// woken (accepting is cheap; the handshakes run in their own tasks) instead of yielding after
/// a few accepts behind thousands of handshake tasks while the kernel's queue overflows.
pub async fn serve_devices(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    env: Arc<SessionEnv>,
    limits: Limits,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    tokio::task::unconstrained(accept_devices(listener, acceptor, env, limits, shutdown, tracker)).await
}

async fn accept_devices(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    env: Arc<SessionEnv>,
    limits: Limits,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let permits = Arc::new(Semaphore::new(limits.max_sessions));
    let handshake_timeout = Duration::from_millis(limits.tls_handshake_timeout_ms);
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("semaphore is never closed"),
            _ = shutdown.cancelled() => break,
        };
        let (tcp, peer) = tokio::select! {
            r = accept(&listener) => r,
            _ = shutdown.cancelled() => break,
        };
        tune(&tcp, &limits);
        let (acceptor, env, shutdown, sessions) =
            (acceptor.clone(), env.clone(), shutdown.clone(), tracker.clone());
        // The handshake runs in its own task and the session in a new one: a task's allocation is
        // sized for its largest state, and the handshake's is more than twice the session's, so
        // one task for both would cost every idle session ~4.5 KiB for nothing.
        tracker.spawn(async move {
            let peer = peer.to_string();
            let handshake = tokio::time::timeout(handshake_timeout, acceptor.accept(tcp));
            let tls = tokio::select! {
                r = handshake => r,
                _ = shutdown.cancelled() => return,
            };
            match tls {
                Ok(Ok(tls)) => {
                    metrics::handshake("ok");
                    if tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                        metrics::handshake_resumed();
                    }
                    sessions.spawn(crate::session::driver::run(tls, env, peer, shutdown, permit));
                }
                Ok(Err(e)) => {
                    metrics::handshake("failed");
                    tracing::warn!(%peer, error = %e, "TLS handshake failed")
                }
                Err(_) => {
                    metrics::handshake("timeout");
                    tracing::warn!(%peer, timeout_ms = handshake_timeout.as_millis() as u64, "TLS handshake timed out")
                }
            }
        });
    }
}

/// Accept TLS connections for the HTTP servers (the gRPC API, the dashboard) until `shutdown`.
/// Each handshake runs in its own task under the handshake deadline, so a stalled client never
/// holds up the others; established streams come out of the returned channel.
pub fn tls_incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    limits: Limits,
    shutdown: CancellationToken,
    what: &'static str,
) -> mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let timeout = Duration::from_millis(limits.tls_handshake_timeout_ms);
        loop {
            let (tcp, peer) = tokio::select! {
                r = accept(&listener) => r,
                _ = shutdown.cancelled() => return,
            };
            tune(&tcp, &limits);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send((tls, peer)).await;
                    }
                    Ok(Err(e)) => tracing::warn!(%peer, error = %e, "{what} TLS handshake failed"),
                    Err(_) => tracing::warn!(%peer, "{what} TLS handshake timed out"),
                }
            });
        }
    });
    rx
}

/// Accept, backing off on errors (out of file descriptors, for example) instead of spinning.
async fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    let mut backoff = Duration::from_millis(5);
    loop {
        match listener.accept().await {
            Ok(conn) => return conn,
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Internet-tuned TCP defaults do not suit a ward: detect dead peers and stuck writes.
pub fn tune(tcp: &TcpStream, limits: &Limits) {
    let sock = SockRef::from(tcp);
    let idle = Duration::from_secs(limits.tcp_keepalive_secs);
    let keepalive = TcpKeepalive::new()
        .with_time(idle)
        .with_interval(idle / 3)
        .with_retries(3);
    let results = [
        tcp.set_nodelay(true),
        sock.set_tcp_keepalive(&keepalive),
        sock.set_tcp_user_timeout(Some(Duration::from_millis(limits.write_timeout_ms))),
    ];
    for r in results {
        if let Err(e) = r {
            tracing::debug!(error = %e, "socket option not applied");
        }
    }
}
