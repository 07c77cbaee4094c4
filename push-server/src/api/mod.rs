//! The faces callers see, side by side over one authentication path:
//! - [`grpc`]: the sender and admin gRPC services (the only module that knows tonic);
//! - [`dashboard`]: the ops dashboard's HTTPS API, its page and `/metrics`;
//! - [`enrollment`]: what a container app needs to enroll a device, served by both;
//! - [`keys`]: the API keys and the one way a request's key becomes a caller: the bearer value
//!   parsed, the key checked through a short cache, its scopes checked.
//!
//! This module translates requests into hub calls and answers. Nothing below it (hub, store,
//! session, observe, metrics) depends on it; what a face needs beyond the hub (the store for a
//! backup, the observer) is handed to it at wiring time (`server`).

pub mod dashboard;
pub mod enrollment;
pub mod grpc;
pub mod keys;
