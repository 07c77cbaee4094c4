//! The provider core: what the iOS `NEAppPushProvider` extension runs, in Rust, on top of
//! `mobile-sdk`. The Swift subclass is a thin shell that forwards to a [`Provider`] (through
//! the `PushProvider` object of the `mobile-sdk-ffi` bindings) and implements [`ProviderHost`].
//!
//! # What this crate owns
//! - Reading `providerConfiguration` ([`ProviderConfiguration`]): the plist keys the
//!   push-server's enrollment produces, with errors that name the key.
//! - iOS's stop reasons ([`NEProviderStopReason`], Apple's raw values) and what each means to
//!   the SDK.
//! - The host contract ([`ProviderHost`]): the `userInfo` dictionary of
//!   `reportIncomingCall(userInfo:)` for invites and cancellations ([`host::user_info`]), the
//!   local notification of a message, and persisting the floor (last seen sequence) and its
//!   epoch in the app group.
//! - The provider's lifecycle ([`Provider`]): `start`, `stop(reason)` that returns once
//!   everything is released (then iOS's completion handler is called), `handle_timer_event`,
//!   network changes, the PushKit token. One live session per device per process (the newest
//!   instance wins); any instance can be dropped at any moment without leaking.
//! - What the user did with calls ([`outcomes`]): the app group's pending file the app writes
//!   and the extension reads, handed to the SDK until the server replies; a refused answer
//!   ends the call (`kind` = `"end"`), a missed call is shown as a notification.
//!
//! It owns no I/O of its own: the session, its socket and its task belong to `mobile-sdk`.
//! The Linux lifecycle host that drives providers the way iOS does is the `nepush-host` crate
//! (`nepush-provider/host`), with its scenario files in `nepush-provider/scenarios/`.
//!
//! # Layout
//! - [`config`]: [`ProviderConfiguration`] and its keys.
//! - [`stop_reason`]: [`NEProviderStopReason`] and its meaning to the SDK.
//! - [`host`]: [`ProviderHost`], [`LocalNotification`], the call dictionaries.
//! - [`outcomes`]: [`PendingCallOutcomes`], the app group's pending call outcomes.
//! - [`provider`]: [`Provider`] and [`ProviderError`].
//!
//! # Dependencies
//! Depends on `mobile-sdk` and `push-proto` only; never on the bindings (`mobile-sdk-ffi`
//! depends on it) or on the server.
#![warn(missing_docs, unreachable_pub)]

pub mod config;
pub mod host;
pub mod outcomes;
pub mod provider;
pub mod stop_reason;

pub use config::{ConfigurationError, ProviderConfiguration};
pub use host::{LocalNotification, ProviderHost, user_info};
pub use mobile_sdk::{
    Registry,
    core::{
        CallOutcome, CallOutcomeResult, InvalidReport, LastSeen, NetworkEvent, OutcomeReply, OutcomeReport,
        State, StopCause,
    },
};
pub use outcomes::PendingCallOutcomes;
pub use provider::{Provider, ProviderError};
pub use stop_reason::NEProviderStopReason;
