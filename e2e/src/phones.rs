//! Phones that are real `mobile_sdk` clients, what their apps were shown, and the sender's side
//! of a journey (group messages, retried as a real sender retries), shared by the journeys that
//! count lost and repeated messages.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use mobile_sdk::{
    ClientConfig, EventHandler, Registry, Trust,
    core::{Event, State},
};
use parking_lot::Mutex;
use push_proto::sender::{IssueDeviceCredentialRequest, SendMessageRequest, Target, target};

use crate::ServerProcess;

/// Register `n` phones (`phone-0000`, ...) in `group` on `node`; their ids and credentials.
pub async fn issue_group(node: &ServerProcess, n: usize, group: &str) -> Vec<(String, String)> {
    let mut admin = node.api().await.admin();
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("phone-{i:04}");
        let credential = admin
            .issue_device_credential(IssueDeviceCredentialRequest {
                device_id: id.clone(),
                groups: vec![group.into()],
                valid_days: 0,
            })
            .await
            .unwrap()
            .into_inner()
            .credential;
        out.push((id, credential));
    }
    out
}

/// What the apps saw, all phones together.
#[derive(Default)]
pub struct Apps {
    /// Message id -> phone -> times the app was shown it.
    pub shown: Mutex<HashMap<String, HashMap<String, u32>>>,
    /// Phones online now.
    pub online: AtomicUsize,
    /// Why each phone's last connection or attempt ended.
    pub last_disconnect: Mutex<HashMap<String, String>>,
    /// When each phone last came online.
    pub connected_at: Mutex<HashMap<String, Instant>>,
}

/// One phone's app: counts what it was shown into the shared [`Apps`].
struct Phone {
    id: String,
    apps: Arc<Apps>,
    online: std::sync::atomic::AtomicBool,
}

impl EventHandler for Phone {
    fn on_event(&self, event: Event) {
        match event {
            Event::State(state) => {
                if let State::WaitingToRetry { reason, .. } = &state {
                    let reason = format!("{reason:?}");
                    self.apps.last_disconnect.lock().insert(self.id.clone(), reason);
                }
                let online = matches!(state, State::Connected { .. });
                if self.online.swap(online, Ordering::AcqRel) == online {
                    return;
                }
                if online {
                    self.apps.online.fetch_add(1, Ordering::AcqRel);
                    self.apps
                        .connected_at
                        .lock()
                        .insert(self.id.clone(), Instant::now());
                } else {
                    self.apps.online.fetch_sub(1, Ordering::AcqRel);
                }
            }
            Event::Message(m) => {
                *self
                    .apps
                    .shown
                    .lock()
                    .entry(m.id)
                    .or_default()
                    .entry(self.id.clone())
                    .or_default() += 1;
            }
            _ => {}
        }
    }
}

/// Start one SDK client per credential against `addr`, trusting the CA `ca`; returns once all
/// are online.
pub async fn phones(
    registry: &Registry,
    apps: &Arc<Apps>,
    creds: &[(String, String)],
    addr: std::net::SocketAddr,
    ca: &str,
) -> Vec<mobile_sdk::Client> {
    let mut clients = Vec::new();
    for (i, (id, credential)) in creds.iter().enumerate() {
        let trust = Trust::ca(ca.to_string());
        clients.push(phone(registry, apps, (id, credential), trust, addr, i as u64).await);
    }
    until("every phone online", Duration::from_secs(60), || {
        apps.online.load(Ordering::Acquire) >= creds.len()
    })
    .await;
    clients
}

/// Start the SDK client of one phone (`id`, `credential`) trusting `trust`, its app counting
/// into `apps`; `seed` fixes its backoff jitter.
pub async fn phone(
    registry: &Registry,
    apps: &Arc<Apps>,
    (id, credential): (&str, &str),
    trust: Trust,
    addr: std::net::SocketAddr,
    seed: u64,
) -> mobile_sdk::Client {
    let mut config = ClientConfig::new(
        addr.ip().to_string(),
        addr.port(),
        id.to_string(),
        credential.to_string(),
        trust,
    );
    config.server_name = crate::SERVER_NAME.into();
    config.jitter_seed = Some(seed);
    let phone = Arc::new(Phone {
        id: id.to_string(),
        apps: apps.clone(),
        online: Default::default(),
    });
    let client = registry.client(config, phone).expect("client");
    client.start().await.expect("start");
    client
}

/// Poll `done` until it holds (the phones and nodes are other tasks and processes).
pub async fn until(what: &str, limit: Duration, done: impl Fn() -> bool) -> Duration {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

/// Send one message to the group `all`, retrying while no node can route it (a real sender
/// retries an UNAVAILABLE with the same id, which the server answers idempotently).
pub async fn broadcast(node: &ServerProcess, id: &str) {
    broadcast_on(&mut node.api().await.sender(), id).await;
}

/// [`broadcast`] over an open API connection (a sender sending many).
pub async fn broadcast_on(sender: &mut push_server::api_client::SenderClient, id: &str) {
    let started = Instant::now();
    loop {
        let r = sender
            .send_message(SendMessageRequest {
                target: Some(Target {
                    kind: Some(target::Kind::Group("all".into())),
                }),
                body: id.into(),
                message_id: id.into(),
                ..Default::default()
            })
            .await;
        match r {
            Ok(_) => return,
            Err(e) if e.code() == tonic::Code::Unavailable && started.elapsed() < Duration::from_secs(30) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("send {id}: {e}"),
        }
    }
}

/// Lost: (message, phone) pairs never shown; duplicated: shown more than once.
pub fn tally(apps: &Apps, ids: &[String], phones: &[(String, String)]) -> (usize, usize) {
    let shown = apps.shown.lock();
    let (mut lost, mut duplicated) = (0, 0);
    for id in ids {
        for (phone, _) in phones {
            match shown.get(id).and_then(|m| m.get(phone)) {
                None => lost += 1,
                Some(n) if *n > 1 => duplicated += 1,
                Some(_) => {}
            }
        }
    }
    (lost, duplicated)
}

pub fn delivered_all(apps: &Apps, ids: &[String], phones: &[(String, String)]) -> bool {
    tally(apps, ids, phones).0 == 0
}
