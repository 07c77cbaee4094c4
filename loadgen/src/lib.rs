//! Load generator and benchmarks for the push-server, side by side with Mosquitto.
//!
//! Simulated devices are real `mobile_sdk` clients (one [`mobile_sdk::Registry`] per process,
//! each client with its tokio-rustls driver and sans-IO core), each bound to its own source
//! address in 127.0.0.0/8; senders use the gRPC API ([`push_server::api_client::ApiClient`]).
//! The MQTT side uses rumqttc over rustls against Debian's Mosquitto. Everything is bounded
//! in count and time, and every child process dies with the load generator.
//!
//! It starts the push-server through `testkit`'s launcher, the one the e2e tests use; nothing
//! depends on it.

pub mod answer;
pub mod bench;
pub mod mqtt;
pub mod procs;
pub mod push;
pub mod recorder;
pub mod stats;
pub mod tls;
pub mod worker;
