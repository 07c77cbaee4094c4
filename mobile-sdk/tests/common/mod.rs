//! The SDK's side of the tests against a real push-server (started by `testkit::harness`): its
//! configuration for a test server, and an event recorder.
#![allow(dead_code)] // each test binary uses a different part

use std::{sync::Arc, time::Duration};

use mobile_sdk::{Client, ClientConfig, EventHandler, Registry, Trust, core::Event};
use testkit::{
    SERVER_NAME,
    harness::{Harness, Heartbeat, STEP, ServerInfo},
};
use tokio::sync::mpsc;

/// How the SDK reaches a test server.
pub trait SdkConfig {
    /// SDK configuration for `device_id` trusting the server's CA.
    fn client_config(&self, device_id: &str, credential: &str) -> ClientConfig;
}

impl SdkConfig for ServerInfo {
    fn client_config(&self, device_id: &str, credential: &str) -> ClientConfig {
        let mut c = ClientConfig::new(
            "127.0.0.1",
            self.device_addr.port(),
            device_id,
            credential,
            Trust::ca(self.ca_pem()),
        );
        c.server_name = SERVER_NAME.into();
        c
    }
}

/// A registry on the test's runtime.
pub fn registry() -> Registry {
    Registry::new(tokio::runtime::Handle::current())
}

/// A server in this process for SDK tests, with `hb`, in its own temporary directory.
pub async fn sdk_server(hb: Heartbeat) -> Harness {
    Harness::start_with(|cfg| hb.apply(cfg)).await
}

/// A client in `reg` for `config`, started, once connected, and its recorder.
pub async fn connect(reg: &Registry, config: ClientConfig) -> (Client, Recorder) {
    let (handler, mut events) = Recorder::new();
    let client = reg.client(config, handler).unwrap();
    client.start().await.unwrap();
    events.connected().await;
    (client, events)
}

/// A device `device_id` issued a credential on `info`, its client in `reg` started and connected.
pub async fn phone(reg: &Registry, info: &ServerInfo, device_id: &str) -> (Client, Recorder) {
    let credential = info.issue(device_id).await;
    connect(reg, info.client_config(device_id, &credential)).await
}

/// Records the SDK's events and lets a test wait for them.
pub struct Recorder {
    rx: mpsc::UnboundedReceiver<Event>,
    /// Every event seen so far, in order.
    pub seen: Vec<Event>,
}

struct Forward(mpsc::UnboundedSender<Event>);

impl EventHandler for Forward {
    fn on_event(&self, event: Event) {
        let _ = self.0.send(event);
    }
}

impl Recorder {
    pub fn new() -> (Arc<dyn EventHandler>, Self) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Arc::new(Forward(tx)), Self { rx, seen: Vec::new() })
    }

    /// Wait (at most `STEP`) for an event `f` picks, recording everything on the way.
    pub async fn wait_for<T>(&mut self, what: &str, mut f: impl FnMut(&Event) -> Option<T>) -> T {
        let wait = async {
            loop {
                let event = self.rx.recv().await.expect("handler dropped");
                let picked = f(&event);
                self.seen.push(event);
                if let Some(t) = picked {
                    return t;
                }
            }
        };
        match tokio::time::timeout(STEP, wait).await {
            Ok(t) => t,
            Err(_) => panic!("no {what} within {STEP:?}; seen: {:#?}", self.seen),
        }
    }

    /// Wait (at most `STEP`) for an event `f` accepts.
    pub async fn until(&mut self, what: &str, f: impl Fn(&Event) -> bool) {
        self.wait_for(what, |e| f(e).then_some(())).await
    }

    /// Wait (at most `STEP`) for the message `id`.
    pub async fn message(&mut self, what: &str, id: &str) {
        self.until(what, |e| matches!(e, Event::Message(m) if m.id == id))
            .await
    }

    pub async fn connected(&mut self) {
        self.wait_for("Connected", |e| {
            matches!(e, Event::State(mobile_sdk::core::State::Connected { .. })).then_some(())
        })
        .await
    }

    /// Events that arrive within `d` (for asserting that something does NOT happen).
    pub async fn quiet_for(&mut self, d: Duration) -> Vec<Event> {
        let mut got = Vec::new();
        let _ = tokio::time::timeout(d, async {
            while let Some(e) = self.rx.recv().await {
                got.push(e.clone());
                self.seen.push(e);
            }
        })
        .await;
        got
    }

    /// Ids of the messages seen so far, in order.
    pub fn message_ids(&self) -> Vec<String> {
        self.seen
            .iter()
            .filter_map(|e| match e {
                Event::Message(m) => Some(m.id.clone()),
                _ => None,
            })
            .collect()
    }
}
