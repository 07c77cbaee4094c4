//! The push-server: persistent TLS sessions to every device's push provider extension, durable
//! delivery with acknowledgements, and the sender API.
//!
//! # Layout
//! - [`config`]: configuration and every limit, in one place.
//! - [`pki`]: the private CA and the iOS-compliant server certificate, TLS configurations.
//! - [`auth`]: device credentials (JWT) and sender API key hashing.
//! - [`keys`]: sender API keys: authentication, expiry, listing, revocation.
//! - [`backup`]: backups of an embedded server (a store snapshot and the keys) and restores.
//! - [`store`]: durable state behind the [`store::Store`] trait; [`store::RedbStore`] embeds it.
//! - [`hub`]: the decisions: registry, one session per device, outboxes, sequence numbers,
//!   receipts, expiry, and call routing to the APNs VoIP fallback (`apns-bridge`). The seam a
//!   cluster router will sit behind.
//! - [`session`]: the sans-IO session state machine ([`session::core`]) and its tokio driver.
//! - [`admission`]: rate and concurrency limits checked before work (handshakes per listener,
//!   logins per device, requests per API key), with bounded memory.
//! - [`listener`]: accept loops, TCP tuning, handshake deadlines, the session limit.
//! - [`grpc`]: the sender and admin API (the only module that knows tonic).
//! - [`observe`]: Prometheus metrics, the ops dashboard (HTTPS, `/metrics`), session and
//!   delivery history, diagnoses.
//! - [`server`]: wiring and graceful shutdown.
//! - [`api_client`]: a gRPC client for the API (CLI, tests).
//! - [`client`]: a minimal device client for the CLI and tests (the real one is `mobile-sdk`).
//! - [`doctor`]: the site pre-flight (`push-server doctor`): certificate, DNS, reachability,
//!   SSIDs, clocks, the data directory, and the Wi-Fi pitfalls to check on the access points.

pub mod admission;
pub mod api_client;
pub mod auth;
pub mod backup;
pub mod client;
pub mod config;
pub mod doctor;
pub mod enrollment;
pub mod grpc;
pub mod hub;
pub mod keys;
pub mod listener;
pub mod observe;
pub mod pki;
pub mod server;
pub mod session;
pub mod store;
