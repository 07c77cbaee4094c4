//! Device sessions: [`core`] is the protocol state machine, [`driver`] runs it over a TLS stream.

pub mod core;
pub mod driver;
