//! The connection library inside the iOS push provider extension (`NEAppPushProvider`): it
//! holds the device's one TLS session to the push-server, answers heartbeats, acknowledges
//! pushes once the app took them, never shows a push twice, reconnects on its own with
//! backoff, and keeps at most one live session per device in the process.
//!
//! What the SDK asks the host to persist between instances: the floor (highest sequence the app
//! took) with the epoch of the server store that numbered it, a [`core::LastSeen`] reported by
//! [`core::Event::LastSeenSeq`]. The host stores the pair as one value and passes it back in
//! [`ClientConfig::last_seen`]: the server takes the floor as an acknowledgement only under its
//! own epoch, so a floor never travels without its epoch.
//!
//! # Layout
//! - [`core`]: the sans-IO session state machine, backoff, de-duplication and the ack ledger.
//!   No sockets, tasks or clocks; time is an input. Everything the SDK *decides* is here.
//! - [`driver`]: runs one core session over TCP + TLS with tokio: one task, one timer, flow
//!   control, bounded buffers. Hands events to the host's [`EventHandler`].
//! - [`lifecycle`]: [`Registry`] and [`Client`]: idempotent start/stop, one live session per
//!   device (the newest instance wins), release on stop.
//! - [`counters`]: live instances, sessions, tasks, sockets and connections, for tests and
//!   diagnostics.
//! - [`clock`]: where sessions read the time (tokio's clock; with the `test-clock` feature, one
//!   the Linux lifecycle host moves forward).
//! - [`config`]: the provider configuration ([`ClientConfig`], [`Trust`]).
//! - [`tls`]: rustls client configuration: TLS 1.3, ALPN `lpush/1`, private CA and SPKI pins.
//!
//! The Swift (and Python) bindings live in the `mobile-sdk-ffi` crate, a thin layer over
//! [`Client`] and [`Registry`].
//!
//! # Dependencies
//! Depends only on `push-proto` (without `grpc`) among the workspace's crates. It must never
//! depend on `push-server`, `nepush-provider` or the bindings: they build on it, and it runs
//! inside an iOS extension's 50 MB.
#![warn(missing_docs, unreachable_pub)]

pub mod clock;
pub mod config;
pub mod core;
pub mod counters;
pub mod driver;
pub mod lifecycle;
pub mod tls;
pub mod voip;

pub use clock::Clock;
pub use config::{ClientConfig, ConfigError, Trust};
pub use counters::Snapshot;
pub use driver::{DriverStats, EventHandler};
pub use lifecycle::{Client, Registry, StartError};
