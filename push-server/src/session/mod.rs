//! Device sessions: [`core`] is the protocol state machine, [`driver`] runs it over a TLS stream
//! ([`tls`]), [`fields`] bounds what a device may put in the fields the server keeps.

pub mod core;
pub mod driver;
pub mod fields;
pub mod tls;
