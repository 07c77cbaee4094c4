//! The faces callers see, side by side: `grpc` (the sender and admin services, the only
//! module that knows tonic), `dashboard` (the ops dashboard's HTTPS API, page and `/metrics`),
//! [`enrollment`] (served by both), and [`keys`], the API keys and the one way a request's key
//! becomes a caller (bearer value parsed, key checked through a short cache, scope checked).
//!
//! Nothing below this module (hub, store, session, observe, metrics) depends on it; what a face
//! needs beyond the hub (the store, for a backup) is handed to it by `server`: the hub does not
//! lend its store.

pub(crate) mod dashboard;
pub mod enrollment;
pub(crate) mod grpc;
pub mod keys;
