//! The app's side of the PushKit/CallKit contract for VoIP pushes from the APNs bridge.
//!
//! iOS terminates an app that receives a VoIP push and does not report a call to CallKit before
//! its PushKit handler returns, and after repeated failures stops delivering VoIP pushes to it.
//! From iOS 26.4, `PKVoIPPushMetadata.mustReport` says whether this push must be reported (it
//! is false when the app is in the foreground, already on a call, or the push arrived too late
//! to be useful); before 26.4 every push must be reported.
//!
//! [`decide`] is the whole decision, as a pure function the app's PushKit handler calls
//! synchronously with the parsed payload, `mustReport` (`None` before iOS 26.4, meaning true),
//! the time and what the app already knows about the call. It reads no clock and does no I/O.
//!
//! The payload's times are the server's clock; the phone's may be minutes off (set by hand, no
//! time sync on a hospital network without internet). The bridge sets `apns-expiration` no
//! later than the ring deadline, and APNs does not deliver a push past its expiration, so a push
//! that arrives was live when it left Apple. A phone whose clock puts the push outside the
//! call's own timeline (before the call was placed, or past its deadline) by more than
//! [`CLOCK_TOLERANCE_MS`] has the wrong time, not a stale call: it rings for the call's window
//! instead of ending every call at once (fast clock) or ringing calls already over (slow clock).
//!
//! The payload is the `lpush` dictionary of the push:
//! `{"aps":{},"lpush":{"v":1,"kind":"call_invite","call_id":…,"call_uuid":…,"caller_name":…,
//! "caller_handle":…,"video":…,"created_at_ms":…,"ring_deadline_ms":…}}`. The call UUID is the
//! same as on the local path, so a phone that hears of a call both ways rings once.

/// Version of the `lpush` dictionary this SDK understands.
pub const PAYLOAD_VERSION: u32 = 1;

/// How far the phone's clock may put a push outside its call's timeline before [`decide`]
/// takes the clock, not the call, to be wrong (delivery and launch take a few seconds).
pub const CLOCK_TOLERANCE_MS: i64 = 5_000;

/// The `lpush` dictionary of a VoIP push, as parsed by the app. Missing fields stay at their
/// defaults; [`decide`] treats an unusable payload as malformed (it must still be reported).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VoipPayload {
    /// `v`: payload version.
    pub version: u32,
    /// `call_id`: the sender's call id.
    pub call_id: String,
    /// `call_uuid`: the CallKit UUID (UUIDv5 of the call id), as text.
    pub call_uuid: String,
    /// `caller_name`: shown by CallKit.
    pub caller_name: String,
    /// `caller_handle`: the caller's extension or number (`CXHandle`).
    pub caller_handle: String,
    /// `video`: `CXCallUpdate.hasVideo`.
    pub video: bool,
    /// `created_at_ms`: when the call was placed, Unix ms.
    pub created_at_ms: i64,
    /// `ring_deadline_ms`: the call stops ringing at this time, Unix ms.
    pub ring_deadline_ms: i64,
}

/// What the app already knows about this call (from the local path or an earlier push).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KnownCall {
    /// The app already reported a call with this UUID to CallKit.
    pub reported: bool,
    /// The app already got the call's cancel (`CallCancel`) over the local path.
    pub cancelled: bool,
}

/// Why a call is reported and ended at once, or not reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// The payload lacks a usable call UUID or deadline, or has an unknown version. Report with
    /// a fresh UUID; end with `CXCallEndedReason.failed`.
    Malformed,
    /// The call was cancelled before the push arrived. End with `.remoteEnded`.
    Cancelled,
    /// The call is already reported (it came over the local path first). Report with the *same*
    /// UUID: CallKit refuses it with `callUUIDAlreadyExists`, which is the expected outcome and
    /// leaves the ringing call alone; only if the report succeeds (the earlier call ended in the
    /// meantime) end it at once with `.remoteEnded`.
    AlreadyReported,
    /// The ring deadline passed. End with `.unanswered`.
    Expired,
}

/// What the PushKit handler must do, before it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VoipAction {
    /// Report the call to CallKit with the payload's UUID, name, handle and video flag, and end
    /// it as unanswered if nobody answers within `ring_for_ms`.
    Report {
        /// Time left until the ring deadline, ms (positive).
        ring_for_ms: i64,
    },
    /// The push must be reported but the call must not ring: report it, then end it at once.
    ReportAndEnd {
        /// Why; also says which UUID to report and how to end it.
        reason: EndReason,
    },
    /// iOS does not require a report (`mustReport` is false): only call the completion handler.
    CompleteOnly {
        /// Why the call does not ring.
        reason: EndReason,
    },
}

/// Decide what the PushKit handler does with `payload`.
///
/// `must_report` is `PKVoIPPushMetadata.mustReport` where iOS provides it (26.4 and later), `None`
/// before (then every push must be reported). `now_ms` is the phone's Unix time in ms; if it
/// puts the push outside the call's timeline, the phone's clock is wrong (see the module).
pub fn decide(payload: &VoipPayload, must_report: Option<bool>, now_ms: i64, known: KnownCall) -> VoipAction {
    let must = must_report.unwrap_or(true);
    let usable = payload.version == PAYLOAD_VERSION
        && is_uuid(&payload.call_uuid)
        && payload.ring_deadline_ms > payload.created_at_ms;
    let window = payload.ring_deadline_ms.saturating_sub(payload.created_at_ms);
    let clock_wrong = now_ms < payload.created_at_ms.saturating_sub(CLOCK_TOLERANCE_MS)
        || now_ms > payload.ring_deadline_ms.saturating_add(CLOCK_TOLERANCE_MS);
    let end = if !usable {
        Some(EndReason::Malformed)
    } else if known.cancelled {
        Some(EndReason::Cancelled)
    } else if known.reported {
        Some(EndReason::AlreadyReported)
    } else if !clock_wrong && now_ms >= payload.ring_deadline_ms {
        Some(EndReason::Expired)
    } else {
        None
    };
    match end {
        // A live call rings whether or not iOS insists (in the foreground it is still a call),
        // never longer than its window.
        None if clock_wrong => VoipAction::Report { ring_for_ms: window },
        None => VoipAction::Report {
            ring_for_ms: (payload.ring_deadline_ms - now_ms).min(window),
        },
        Some(reason) if must => VoipAction::ReportAndEnd { reason },
        Some(reason) => VoipAction::CompleteOnly { reason },
    }
}

/// Whether `s` is a UUID in its textual form (8-4-4-4-12 hex digits).
fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000;

    fn payload() -> VoipPayload {
        VoipPayload {
            version: 1,
            call_id: "c1".into(),
            call_uuid: push_proto::call_uuid("c1"),
            caller_name: "Dr. Okafor".into(),
            caller_handle: "ext 4411".into(),
            video: false,
            created_at_ms: NOW - 2_000,
            ring_deadline_ms: NOW + 28_000,
        }
    }

    const FRESH: KnownCall = KnownCall {
        reported: false,
        cancelled: false,
    };

    #[test]
    fn a_ringing_call_is_reported_with_the_time_left() {
        for must in [None, Some(true), Some(false)] {
            assert_eq!(
                decide(&payload(), must, NOW, FRESH),
                VoipAction::Report { ring_for_ms: 28_000 },
                "mustReport {must:?}"
            );
        }
    }

    #[test]
    fn before_ios_26_4_everything_must_be_reported() {
        let late = decide(&payload(), None, NOW + 28_000, FRESH);
        assert_eq!(
            late,
            VoipAction::ReportAndEnd {
                reason: EndReason::Expired
            }
        );
    }

    #[test]
    fn stale_cancelled_or_known_calls_are_reported_and_ended_when_ios_insists() {
        let cases = [
            (NOW + 30_000, FRESH, EndReason::Expired),
            (
                NOW,
                KnownCall {
                    cancelled: true,
                    reported: false,
                },
                EndReason::Cancelled,
            ),
            (
                NOW,
                KnownCall {
                    cancelled: false,
                    reported: true,
                },
                EndReason::AlreadyReported,
            ),
            (
                NOW,
                KnownCall {
                    cancelled: true,
                    reported: true,
                },
                EndReason::Cancelled,
            ),
        ];
        for (now, known, reason) in cases {
            assert_eq!(
                decide(&payload(), Some(true), now, known),
                VoipAction::ReportAndEnd { reason }
            );
            assert_eq!(
                decide(&payload(), None, now, known),
                VoipAction::ReportAndEnd { reason },
                "absent mustReport means true"
            );
            assert_eq!(
                decide(&payload(), Some(false), now, known),
                VoipAction::CompleteOnly { reason }
            );
        }
    }

    #[test]
    fn malformed_payloads_are_still_reported_when_required() {
        let mut bad_uuid = payload();
        bad_uuid.call_uuid = "not-a-uuid".into();
        let mut bad_version = payload();
        bad_version.version = 2;
        let mut bad_deadline = payload();
        bad_deadline.ring_deadline_ms = bad_deadline.created_at_ms;
        for p in [bad_uuid, bad_version, bad_deadline, VoipPayload::default()] {
            assert_eq!(
                decide(&p, None, NOW, FRESH),
                VoipAction::ReportAndEnd {
                    reason: EndReason::Malformed
                },
                "{p:?}"
            );
            assert_eq!(
                decide(&p, Some(false), NOW, FRESH),
                VoipAction::CompleteOnly {
                    reason: EndReason::Malformed
                }
            );
        }
    }

    #[test]
    fn a_phone_clock_minutes_off_still_rings_the_call_for_its_window() {
        // Issue #14: the deadline is the server's clock. A phone 5 minutes fast ended every
        // VoIP call at once as expired; one 5 minutes slow rang 5 minutes too long.
        let window = 30_000;
        for skew in [300_000, -300_000, 3_600_000, -86_400_000] {
            assert_eq!(
                decide(&payload(), None, NOW + skew, FRESH),
                VoipAction::Report { ring_for_ms: window },
                "clock off by {skew} ms"
            );
        }
        // Within the tolerance the clock is trusted: late by transit, the call is over.
        assert_eq!(
            decide(&payload(), None, NOW + 28_000 + CLOCK_TOLERANCE_MS, FRESH),
            VoipAction::ReportAndEnd {
                reason: EndReason::Expired
            }
        );
        // A clock a little slow never rings past the window.
        assert_eq!(
            decide(&payload(), None, NOW - 4_000, FRESH),
            VoipAction::Report { ring_for_ms: window }
        );
    }

    #[test]
    fn uuid_shape_is_checked() {
        assert!(is_uuid(&push_proto::call_uuid("x")));
        assert!(is_uuid("5B1F0C1E-6A53-4C5E-9D0F-6C6F63616C70"));
        assert!(!is_uuid("5b1f0c1e6a534c5e9d0f6c6f63616c70"));
        assert!(!is_uuid("5b1f0c1e-6a53-4c5e-9d0f-6c6f63616c7g"));
    }
}
