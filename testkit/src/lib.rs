//! Test servers for the workspace's tests: an in-process push-server with its API client
//! ([`harness`]), the `push-server` and `apns-bridge` binaries as child processes
//! ([`launcher`], on [`process`]), and `redis-server` fixtures with their test certificates
//! ([`redis`]), and the source scan of the sans-IO cores ([`sans_io`]).
//!
//! Only tests, `e2e` and `loadgen` depend on it; a shipped library never does (it starts
//! servers with lifted limits and writes keys to temporary directories).
#![warn(missing_docs, unreachable_pub)]

pub mod harness;
pub mod launcher;
pub mod process;
pub mod redis;
pub mod sans_io;

/// Name in the test server's certificate that clients verify.
pub const SERVER_NAME: &str = "localhost";
