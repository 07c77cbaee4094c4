//! APNs VoIP fallback for ringing calls (see issue "apns-bridge"). Not built yet: this crate
//! reserves its place in the workspace.
