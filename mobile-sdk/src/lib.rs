//! tmp
pub mod core;
