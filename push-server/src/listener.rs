//! Accept loops: TCP tuning, the session limit, the handshake limits of each listener
//! ([`crate::admission::Handshakes`]: a connection over them is closed before its handshake),
//! and TLS handshakes with a deadline, so a client that opens TCP and never finishes the
//! handshake costs a permit for a bounded time only.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use socket2::{SockRef, TcpKeepalive};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Semaphore, mpsc},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    admission::{Handshakes, Listener},
    config::Limits,
    metrics,
    session::{driver::SessionEnv, tls::DeviceTls},
};

/// Accept queue of the device listener; the kernel caps it at `net.core.somaxconn` (4096 on
/// current Linux). Tokio's default of 1,024 overflows when a whole site reconnects at once
/// (an AP reboot, a server restart), and every SYN the kernel drops costs its device a 1 s
/// retransmission timeout.
const DEVICE_BACKLOG: u32 = 8192;

/// Listen for devices on `addr` with the accept queue above.
pub(crate) fn bind_devices(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(DEVICE_BACKLOG)
}

/// How often the accept thread looks at the shutdown token while no device connects.
const ACCEPT_POLL: Duration = Duration::from_millis(50);

/// Accept device connections until `shutdown`; each session runs on `tracker`. Returns once
/// the listener is closed.
///
/// Accepting runs on a thread of its own: when a whole site reconnects at once, thousands of
/// handshake tasks fill tokio's run queues, and an accept task queued behind them would leave
/// the kernel's accept queue to overflow (each dropped SYN costs a device a 1 s
/// retransmission). The thread drains the queue as fast as the kernel fills it; connections
/// then wait in tokio, established, for their handshake (within the handshake deadline).
pub(crate) async fn serve_devices(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    env: Arc<SessionEnv>,
    limits: Limits,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let listener = match listener.into_std() {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "device listener unusable; no device can connect");
            return;
        }
    };
    let handle = tokio::runtime::Handle::current();
    let (done, finished) = tokio::sync::oneshot::channel::<()>();
    let spawned = std::thread::Builder::new()
        .name("device-accept".into())
        .spawn(move || {
            accept_devices(listener, &handle, tls, env, limits, shutdown, tracker);
            let _ = done.send(());
        });
    match spawned {
        Ok(_) => {
            let _ = finished.await;
        }
        Err(e) => tracing::error!(error = %e, "cannot start the device accept thread; no device can connect"),
    }
}

fn accept_devices(
    listener: std::net::TcpListener,
    handle: &tokio::runtime::Handle,
    tls: Arc<rustls::ServerConfig>,
    env: Arc<SessionEnv>,
    limits: Limits,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    // Blocking accepts that give up every ACCEPT_POLL (SO_RCVTIMEO) to look at `shutdown`.
    let setup = listener
        .set_nonblocking(false)
        .and_then(|()| SockRef::from(&listener).set_read_timeout(Some(ACCEPT_POLL)));
    if let Err(e) = setup {
        tracing::error!(error = %e, "cannot set up the device listener");
        return;
    }
    let _runtime = handle.enter();
    let permits = Arc::new(Semaphore::new(limits.max_sessions));
    let gate = Handshakes::new(Listener::Device, limits.device_handshakes);
    let handshake_timeout = Duration::from_millis(limits.tls_handshake_timeout_ms);
    let mut backoff = Duration::from_millis(5);
    while !shutdown.is_cancelled() {
        // Beyond the session limit connections wait in the kernel's backlog.
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            std::thread::sleep(ACCEPT_POLL / 5);
            continue;
        };
        let (tcp, peer) = match listener.accept() {
            Ok(conn) => {
                backoff = Duration::from_millis(5);
                conn
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            // Out of file descriptors, for example: back off instead of spinning.
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "accept failed");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let tcp = match tcp.set_nonblocking(true).and_then(|()| TcpStream::from_std(tcp)) {
            Ok(tcp) => tcp,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "accepted connection unusable");
                continue;
            }
        };
        // Closed (dropped) before any TLS work; the permit goes back at once.
        let Ok(ticket) = gate.admit(peer) else {
            continue;
        };
        tune(&tcp, &limits);
        let (tls, env, shutdown, sessions) = (tls.clone(), env.clone(), shutdown.clone(), tracker.clone());
        // The handshake runs in its own task and the session in a new one: a task's allocation is
        // sized for its largest state, and the handshake's is more than twice the session's, so
        // one task for both would cost every idle session ~4.5 KiB for nothing.
        tracker.spawn(async move {
            let peer = peer.to_string();
            let handshake = tokio::time::timeout(handshake_timeout, DeviceTls::accept(tls, tcp));
            let tls = tokio::select! {
                r = handshake => r,
                _ = shutdown.cancelled() => return,
            };
            drop(ticket);
            match tls {
                Ok(Ok(tls)) => {
                    metrics::handshake("ok");
                    if tls.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                        metrics::handshake_resumed();
                    }
                    sessions.spawn(crate::session::driver::run(tls, env, peer, shutdown, permit));
                }
                Ok(Err(e)) => match refused_certificate(&e) {
                    // The device cannot be told anything over TLS it refused: say it here.
                    Some(alert) => {
                        metrics::handshake("certificate_refused");
                        tracing::warn!(
                            %peer, ?alert,
                            "the device refused the server's certificate: a phone enrolled before the \
                             previous CA rotation pins neither CA key and must be enrolled again"
                        )
                    }
                    None => {
                        metrics::handshake("failed");
                        tracing::warn!(%peer, error = %e, "TLS handshake failed")
                    }
                },
                Err(_) => {
                    metrics::handshake("timeout");
                    tracing::warn!(%peer, timeout_ms = handshake_timeout.as_millis() as u64, "TLS handshake timed out")
                }
            }
        });
    }
}

/// The alert with which a client refused the server's certificate chain, if that is how its
/// handshake failed (a pin or trust mismatch on the device's side).
fn refused_certificate(e: &std::io::Error) -> Option<rustls::AlertDescription> {
    use rustls::AlertDescription::{AccessDenied, BadCertificate, CertificateUnknown, UnknownCA};
    match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(
            alert @ (UnknownCA | BadCertificate | CertificateUnknown | AccessDenied),
        ) => Some(*alert),
        _ => None,
    }
}

/// Accept TLS connections for the HTTP servers (the gRPC API, the dashboard) until `shutdown`.
/// Each handshake runs in its own task under the handshake deadline, so a stalled client never
/// holds up the others; established streams come out of the returned channel.
pub(crate) fn tls_incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    limits: Limits,
    shutdown: CancellationToken,
    listener_kind: Listener,
) -> mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)> {
    let (tx, rx) = mpsc::channel(64);
    let what = listener_kind.label();
    let gate = Handshakes::new(listener_kind, listener_kind.handshake_limits(&limits));
    tokio::spawn(async move {
        let timeout = Duration::from_millis(limits.tls_handshake_timeout_ms);
        loop {
            let (tcp, peer) = tokio::select! {
                r = accept(&listener) => r,
                _ = shutdown.cancelled() => return,
            };
            // Closed (dropped) before any TLS work.
            let Ok(ticket) = gate.admit(peer) else {
                continue;
            };
            tune(&tcp, &limits);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let tls = tokio::time::timeout(timeout, acceptor.accept(tcp)).await;
                drop(ticket);
                match tls {
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
pub(crate) fn tune(tcp: &TcpStream, limits: &Limits) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_refusing_the_certificate_is_told_apart_from_other_failures() {
        let io = |e: rustls::Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        let alert = |a| io(rustls::Error::AlertReceived(a));
        use rustls::AlertDescription as A;
        for refused in [
            A::UnknownCA,
            A::BadCertificate,
            A::CertificateUnknown,
            A::AccessDenied,
        ] {
            assert_eq!(refused_certificate(&alert(refused)), Some(refused));
        }
        assert_eq!(refused_certificate(&alert(A::HandshakeFailure)), None);
        assert_eq!(refused_certificate(&io(rustls::Error::DecryptError)), None);
        let eof = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "tls handshake eof");
        assert_eq!(refused_certificate(&eof), None);
    }
}
