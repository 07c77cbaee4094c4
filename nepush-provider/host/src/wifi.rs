//! The site's Wi-Fi as the phone sees it: a TCP relay between the phone and the push-server.
//!
//! While the phone is on one of the site's SSIDs, connections are relayed both ways, closes
//! included. When it leaves, every relayed connection becomes a black hole: both ends stay
//! open, nothing gets through and neither side is told (as when a phone walks out of range:
//! its address is gone, TCP on each side just stops hearing). Each end closes on its own terms:
//! the server at its heartbeat deadline, the phone when its SDK gives up or the process dies.
//! New connections while off the site's network are refused at once. An outage (the server
//! crashed, or the site's link to it is cut) closes every relayed connection at both ends and
//! refuses new ones while the phone stays on the network.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, tcp::OwnedReadHalf, tcp::OwnedWriteHalf},
    sync::watch,
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

/// Relay statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WifiStats {
    /// Connections relayed to the server.
    pub relayed: u64,
    /// Connections refused because the phone was off the site's network.
    pub refused: u64,
    /// Relayed connections cut off by the phone leaving.
    pub blackholed: u64,
    /// Relayed connections with at least one end still open now.
    pub open: usize,
    /// Of those, black-holed ones.
    pub open_blackholed: usize,
}

/// The relay. Dropping it stops accepting and cuts every connection.
pub struct Wifi {
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
    /// Where the phone dials.
    pub addr: SocketAddr,
}

struct Shared {
    upstream: Mutex<Option<SocketAddr>>,
    on_site: Mutex<bool>,
    /// False during an outage.
    server_reachable: Mutex<bool>,
    /// Black-hole switch of every relayed connection not yet cut, by id.
    live: Mutex<HashMap<u64, CancellationToken>>,
    /// Closes every relayed connection (an outage); replaced when the outage ends.
    reset: Mutex<CancellationToken>,
    next_id: AtomicU64,
    relayed: AtomicU64,
    refused: AtomicU64,
    blackholed: AtomicU64,
    open: AtomicUsize,
    open_blackholed: AtomicUsize,
    /// Bumped whenever a relayed connection ends, to wait on.
    ended: watch::Sender<u64>,
    shutdown: CancellationToken,
}

impl Wifi {
    /// Listen on loopback; the server's address is set later with [`Wifi::set_upstream`].
    pub async fn bind() -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream: Mutex::new(None),
            on_site: Mutex::new(false),
            server_reachable: Mutex::new(true),
            live: Mutex::new(HashMap::new()),
            reset: Mutex::new(CancellationToken::new()),
            next_id: AtomicU64::new(0),
            relayed: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            blackholed: AtomicU64::new(0),
            open: AtomicUsize::new(0),
            open_blackholed: AtomicUsize::new(0),
            ended: watch::channel(0).0,
            shutdown: CancellationToken::new(),
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(Self { shared, accept, addr })
    }

    /// The push-server's device listener.
    pub fn set_upstream(&self, addr: SocketAddr) {
        *self.shared.upstream.lock().expect("poisoned") = Some(addr);
    }

    /// The phone is on the site's network (true) or not: leaving black-holes every relayed
    /// connection.
    pub fn set_on_site(&self, on_site: bool) {
        *self.shared.on_site.lock().expect("poisoned") = on_site;
        if !on_site {
            let cut: Vec<CancellationToken> = self
                .shared
                .live
                .lock()
                .expect("poisoned")
                .drain()
                .map(|(_, t)| t)
                .collect();
            for t in cut {
                self.shared.blackholed.fetch_add(1, Ordering::Relaxed);
                self.shared.open_blackholed.fetch_add(1, Ordering::SeqCst);
                t.cancel();
            }
        }
    }

    /// An outage (`false`: the server crashed, or the site's link to it is cut) closes every
    /// relayed connection at both ends and refuses new ones until the server is back (`true`).
    /// The phone stays on the network: its path stays viable.
    pub fn set_server_reachable(&self, reachable: bool) {
        *self.shared.server_reachable.lock().expect("poisoned") = reachable;
        let mut reset = self.shared.reset.lock().expect("poisoned");
        if reachable {
            *reset = CancellationToken::new();
        } else {
            reset.cancel();
        }
    }

    /// Wait until no black-holed connection is open any more (each end closed on its own
    /// terms), at most `timeout`. Returns whether that happened.
    pub async fn blackholes_closed(&self, timeout: std::time::Duration) -> bool {
        let mut ended = self.shared.ended.subscribe();
        let wait = async {
            while self.shared.open_blackholed.load(Ordering::SeqCst) != 0 {
                if ended.changed().await.is_err() {
                    return;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }

    /// Current statistics.
    pub fn stats(&self) -> WifiStats {
        let s = &self.shared;
        WifiStats {
            relayed: s.relayed.load(Ordering::Relaxed),
            refused: s.refused.load(Ordering::Relaxed),
            blackholed: s.blackholed.load(Ordering::Relaxed),
            open: s.open.load(Ordering::SeqCst),
            open_blackholed: s.open_blackholed.load(Ordering::SeqCst),
        }
    }
}

impl Drop for Wifi {
    fn drop(&mut self) {
        self.accept.abort();
        self.shared.shutdown.cancel();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((phone, _)) = listener.accept().await else {
            continue;
        };
        let on_site = *shared.on_site.lock().expect("poisoned");
        let reachable = *shared.server_reachable.lock().expect("poisoned");
        let upstream = *shared.upstream.lock().expect("poisoned");
        match upstream.filter(|_| on_site && reachable) {
            None => {
                // No route: the phone's connect fails at once.
                shared.refused.fetch_add(1, Ordering::Relaxed);
                drop(phone);
            }
            Some(server) => {
                let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
                let cut = CancellationToken::new();
                shared.live.lock().expect("poisoned").insert(id, cut.clone());
                shared.relayed.fetch_add(1, Ordering::Relaxed);
                shared.open.fetch_add(1, Ordering::SeqCst);
                let reset = shared.reset.lock().expect("poisoned").clone();
                tokio::spawn(relay(phone, server, id, cut, reset, shared.clone()));
            }
        }
    }
}

async fn relay(
    phone: TcpStream,
    server: SocketAddr,
    id: u64,
    cut: CancellationToken,
    reset: CancellationToken,
    shared: Arc<Shared>,
) {
    if let Ok(upstream) = TcpStream::connect(server).await {
        let _ = phone.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        let (pr, mut pw) = phone.into_split();
        let (sr, mut sw) = upstream.into_split();
        // The write halves live until both directions ended: dropping one sends a FIN, which
        // a black hole must not.
        let a = pump(pr, &mut sw, cut.clone(), shared.shutdown.clone());
        let b = pump(sr, &mut pw, cut.clone(), shared.shutdown.clone());
        // An outage ends both directions; dropping the halves closes both ends.
        tokio::select! {
            _ = async { tokio::join!(a, b) } => {}
            _ = reset.cancelled() => {}
        }
    }
    if cut.is_cancelled() {
        shared.open_blackholed.fetch_sub(1, Ordering::SeqCst);
    }
    shared.live.lock().expect("poisoned").remove(&id);
    shared.open.fetch_sub(1, Ordering::SeqCst);
    shared.ended.send_modify(|n| *n += 1);
}

/// Copy `from` to `to` until `from` ends (then pass the end on) or the connection is cut
/// (then keep reading and dropping what arrives, until `from` ends, telling `to` nothing).
async fn pump(
    mut from: OwnedReadHalf,
    to: &mut OwnedWriteHalf,
    cut: CancellationToken,
    shutdown: CancellationToken,
) {
    let mut buf = vec![0u8; 4096];
    let mut blackholed = false;
    loop {
        let n = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = cut.cancelled(), if !blackholed => {
                blackholed = true;
                continue;
            }
            // An error ends this direction like an end of stream.
            r = from.read(&mut buf) => r.unwrap_or(0),
        };
        if n == 0 {
            if !blackholed {
                let _ = to.shutdown().await;
            }
            // A black-holed end is dropped without a word when its own side closes.
            return;
        }
        if !blackholed && to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
