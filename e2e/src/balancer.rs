//! A TCP balancer in front of a cluster's device listeners, as a site's DNS or virtual IP would
//! be: each connection goes to the first backend that accepts it, so when a node dies its
//! phones' reconnects land on the next one. Outgoing connections come from distinct loopback
//! addresses (127.4.0.0/16), as phones would, so per-address limits see many phones, not one.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
};

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

/// A running balancer; stops when dropped.
pub struct Balancer {
    /// Where phones connect.
    pub addr: SocketAddr,
    stop: CancellationToken,
    /// Cancelled to cut every relayed connection at once (a network partition); replaced to
    /// let new ones through again.
    links: Arc<parking_lot::Mutex<CancellationToken>>,
    /// Where new connections go (a server restarted on another port takes over its name).
    backends: Arc<parking_lot::Mutex<Arc<Vec<SocketAddr>>>>,
}

impl Balancer {
    /// Listen on a free loopback port and relay to `backends`, in order of preference.
    pub async fn start(backends: Vec<SocketAddr>) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let links = Arc::new(parking_lot::Mutex::new(CancellationToken::new()));
        let backends = Arc::new(parking_lot::Mutex::new(Arc::new(backends)));
        let next_source = Arc::new(AtomicU32::new(1));
        let (token, cut, targets) = (stop.clone(), links.clone(), backends.clone());
        tokio::spawn(async move {
            loop {
                let (inbound, _) = tokio::select! {
                    _ = token.cancelled() => return,
                    r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
                };
                let n = next_source.fetch_add(1, Ordering::Relaxed);
                let source = IpAddr::V4(Ipv4Addr::new(127, 4, (n >> 8) as u8, n as u8));
                let link = cut.lock().clone();
                if link.is_cancelled() {
                    continue; // Partitioned: the connection is dropped at once.
                }
                let backends = targets.lock().clone();
                tokio::spawn(async move {
                    let Some(mut outbound) = connect_first(&backends, source).await else {
                        return;
                    };
                    let mut inbound = inbound;
                    tokio::select! {
                        _ = link.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                });
            }
        });
        Ok(Self {
            addr,
            stop,
            links,
            backends,
        })
    }

    /// Cut every relayed connection and refuse new ones, until [`Balancer::heal`].
    pub fn cut(&self) {
        self.links.lock().cancel();
    }

    /// Send new connections to `backends` from now on (relayed ones stay where they are).
    pub fn retarget(&self, backends: Vec<SocketAddr>) {
        *self.backends.lock() = Arc::new(backends);
    }

    /// Let connections through again.
    pub fn heal(&self) {
        *self.links.lock() = CancellationToken::new();
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn connect_first(backends: &[SocketAddr], source: IpAddr) -> Option<TcpStream> {
    for backend in backends {
        let Ok(socket) = TcpSocket::new_v4() else { continue };
        if socket.bind(SocketAddr::new(source, 0)).is_err() {
            continue;
        }
        if let Ok(stream) = socket.connect(*backend).await {
            return Some(stream);
        }
    }
    None
}
