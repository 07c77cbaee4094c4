//! The push-server: persistent TLS sessions to every device's push provider extension, durable
//! delivery with acknowledgements, and the sender API.
//!
//! # Layout
//! - [`config`]: configuration and every limit, in one place.
//! - [`pki`]: the private CA and the iOS-compliant server certificate, TLS configurations.
//! - [`auth`]: device credentials (JWT) and sender API key hashing.
//! - [`data_dir`]: the data directory's layout, created owner-only.
//! - [`backup`]: backups of an embedded server (a store snapshot and the keys) and restores.
//! - [`store`]: durable state behind the [`store::Store`] trait; [`store::RedbStore`] embeds it.
//! - [`hub`]: the decisions: registry, one session per device, outboxes, sequence numbers,
//!   receipts, expiry, and call routing to the APNs VoIP fallback (`apns-bridge`). The seam a
//!   cluster router will sit behind.
//! - [`session`]: the sans-IO session state machine ([`session::core`]) and its tokio driver.
//! - `admission`: rate and concurrency limits checked before work (handshakes per listener,
//!   logins per device, requests per API key), with bounded memory.
//! - `listener`: accept loops, TCP tuning, handshake deadlines, the session limit.
//! - [`api`]: the faces callers see: the gRPC services, the ops dashboard's HTTPS API (and
//!   `/metrics`), enrollment, and the API keys both authenticate through.
//! - `observe`: the recorder below the hub: session and delivery history, diagnoses.
//! - `metrics`: every Prometheus metric; a leaf any layer may call.
//! - [`server`]: wiring and graceful shutdown.
//! - [`api_client`]: a gRPC client for the API (CLI, tests).
//! - [`client`]: a minimal device client for the CLI and tests (the real one is `mobile-sdk`).
//! - [`doctor`]: the site pre-flight (`push-server doctor`): certificate, DNS, reachability,
//!   SSIDs, clocks, the data directory, and the Wi-Fi pitfalls to check on the access points.
//!
//! The `push-server` binary (`src/bin/push-server/`) is a thin shell over this library.
//!
//! # Dependencies
//! Layers, each depending only on those before it: the leaves `config`, `auth`, `pki` and
//! `metrics`; `store` and `data_dir`; `observe` (the recorder, fed by the hub); `hub`;
//! `session` (driven by the hub's decisions); `admission` and `listener`; `backup`; `api`;
//! `server`, which wires them. `doctor`, `client` and `api_client` sit beside, for the CLI. No
//! module depends on one that depends back on it, and nothing below `api` knows tonic, axum or
//! an API key. Among the workspace's crates it depends on `push-proto` and `apns-bridge` only:
//! never on the SDK, the provider or `testkit` (tests only).

#![warn(missing_docs, unreachable_pub)]

pub(crate) mod admission;
pub mod api;
pub mod api_client;
pub mod auth;
pub mod backup;
pub mod client;
pub mod config;
pub mod data_dir;
pub mod doctor;
pub mod hub;
pub(crate) mod listener;
pub(crate) mod metrics;
pub(crate) mod observe;
pub mod pki;
pub mod server;
pub mod session;
pub mod store;
