//! The Linux lifecycle host: drives `nepush-provider` instances the way iOS drives an
//! `NEAppPushProvider`, from scenario files, against the real push-server, and checks after
//! every step what the server and the phone observe.
//!
//! # Model
//! - The **site**: the real `push-server` binary (and, for the VoIP fallback, the real
//!   `apns-bridge` binary with its fake APNs) in a temporary directory; the phone is enrolled
//!   through `EnrollDevice` and its provider reads the enrollment's `providerConfiguration`.
//! - The **Wi-Fi** ([`wifi`]): a relay between phone and server. Leaving black-holes the open
//!   connections (nothing passes, nobody is told), as walking out of range does.
//! - The **extension process** ([`phone`]): its own tokio runtime and `mobile_sdk::Registry`;
//!   a kill shuts the runtime down in the background (sockets close without a goodbye), a
//!   relaunch builds new ones and reads the app group's last seen sequence and epoch.
//! - **Time** ([`time`]): `advance` moves the server's clock (`--test-clock-file`) and the
//!   SDK's ([`mobile_sdk::Clock`], feature `test-clock`) forward together; the phone's clock
//!   stops at each SDK deadline and 60 s timer event in the span, so retries and backoff play
//!   out against the real network; a connected phone leaps. Network I/O, TLS and the server's
//!   heartbeats run at real speed.
//!
//! # Invariants checked after every step
//! - At most one server session per device: no login replaced a session the phone still held
//!   (presence events), no instance was told `REPLACED`, and the phone never had more than one
//!   session, socket or accepted connection at once (SDK counters, every change).
//! - Nothing leaks: settled SDK counters are the instances iOS holds and at most one session,
//!   task and socket; `stop` returns with everything released; a killed process frees all;
//!   across a `repeat`, open fds, threads, counters and resident memory do not grow (after the
//!   warm-up, within `[checks]` tolerances); after teardown the host's fds are back to the start.
//! - The app never sees a push twice, call dictionaries are property lists, and the persisted
//!   last seen sequence never goes back within an epoch, carries the server's (non-zero) epoch,
//!   and a new epoch never comes with a higher floor.
//!
//! # Layout
//! - [`scenario`]: the file format. [`runner`]: steps, checks, [`Report`].
//! - [`site`], [`wifi`], [`phone`], [`resources`]: the model; [`time`]: how simulated time
//!   passes.
//!
//! # Dependencies
//! A test tool: it depends on `nepush-provider`, `mobile-sdk`, `push-proto` and (for its
//! site) `push-server`'s library; nothing shipped depends on it.
#![warn(missing_docs, unreachable_pub)]

pub mod phone;
pub mod resources;
pub mod runner;
pub mod scenario;
pub mod site;
pub mod time;
pub mod wifi;

pub use runner::{Report, RunOptions, run};
pub use scenario::Scenario;
