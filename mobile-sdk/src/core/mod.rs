//! The sans-IO session core: everything the SDK decides, nothing it does.
//!
//! No sockets, no tasks, no clock: time is an input (`std::time::Instant`), bytes go in and
//! out as buffers, and the randomness of the backoff is seeded. The same inputs always give the
//! same outputs, so tests drive it with a fake clock and property tests over random
//! interleavings of inputs. Architecture invariant: nothing under `core/` names tokio, rustls,
//! `std::net` or a system clock (a test in this module checks the sources).
//!
//! - [`session`]: the state machine ([`Session`]) and its inputs and outputs.
//! - [`event`]: what the app is told.
//! - [`backoff`]: exponential backoff with full jitter and a cap.
//! - [`dedup`]: dropping pushes the app has already seen.
//! - [`ledger`]: what the app took, the acks owed, and the sequence the host persists.
//! - [`outcomes`]: what the user did with calls, kept until the server replied.

pub mod backoff;
pub mod dedup;
pub mod event;
pub mod ledger;
pub mod outcomes;
pub mod session;

pub use backoff::{Backoff, BackoffConfig};
pub use event::{
    CallCancelPush, CallInvitePush, Disconnect, Event, HostStop, LastSeen, MessagePush, OutcomeReply, State,
    StopCause, StopReason,
};
pub use outcomes::{InvalidReport, OutcomeReport, PendingOutcomes};
pub use session::{Config, NetworkEvent, Session, Timing, TransportCommand};

/// Protocol enums that appear in events.
pub use push_proto::device::{CallOutcome, CallOutcomeResult, CancelReason, Priority};

#[cfg(test)]
mod tests;
