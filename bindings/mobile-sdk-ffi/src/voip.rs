//! The PushKit decision (`mobile_sdk::voip::decide`) for the app's VoIP push handler.

use mobile_sdk::voip;

/// The `lpush` dictionary of a VoIP push payload.
#[derive(Debug, Clone, uniffi::Record)]
pub struct VoipPayload {
    /// Payload format version.
    pub version: u32,
    /// Sender's call id.
    pub call_id: String,
    /// CallKit UUID (same on the local and APNs paths).
    pub call_uuid: String,
    /// Caller display name.
    pub caller_name: String,
    /// Caller handle.
    pub caller_handle: String,
    /// Video call.
    pub video: bool,
    /// When the call was placed, Unix ms.
    pub created_at_ms: i64,
    /// When it stops ringing, Unix ms.
    pub ring_deadline_ms: i64,
}

/// What the app already knows about this call.
#[derive(Debug, Clone, Copy, uniffi::Record)]
pub struct KnownCall {
    /// Already reported to CallKit (for example through the local path).
    pub reported: bool,
    /// Already cancelled.
    pub cancelled: bool,
}

/// Why a call is ended at once or not reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum EndReason {
    /// The payload cannot be used.
    Malformed,
    /// The call was cancelled.
    Cancelled,
    /// The call was already reported.
    AlreadyReported,
    /// The ring deadline passed.
    Expired,
}

/// What the PushKit handler must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum VoipAction {
    /// Report the call and let it ring this long.
    Report {
        /// Ring time left, ms.
        ring_for_ms: i64,
    },
    /// Report the call (iOS requires it) and end it at once.
    ReportAndEnd {
        /// Why.
        reason: EndReason,
    },
    /// Only call the completion handler (iOS does not require a report).
    CompleteOnly {
        /// Why.
        reason: EndReason,
    },
}

/// Decide what to do with a VoIP push. `must_report` is `PKVoIPPushMetadata.mustReport`
/// (nil before iOS 26.4, meaning true).
#[uniffi::export]
pub fn decide_voip_push(
    payload: VoipPayload,
    must_report: Option<bool>,
    now_ms: i64,
    known: KnownCall,
) -> VoipAction {
    voip::decide(&payload.into(), must_report, now_ms, known.into()).into()
}

impl From<VoipPayload> for voip::VoipPayload {
    fn from(p: VoipPayload) -> Self {
        Self {
            version: p.version,
            call_id: p.call_id,
            call_uuid: p.call_uuid,
            caller_name: p.caller_name,
            caller_handle: p.caller_handle,
            video: p.video,
            created_at_ms: p.created_at_ms,
            ring_deadline_ms: p.ring_deadline_ms,
        }
    }
}

impl From<KnownCall> for voip::KnownCall {
    fn from(k: KnownCall) -> Self {
        Self {
            reported: k.reported,
            cancelled: k.cancelled,
        }
    }
}

impl From<voip::EndReason> for EndReason {
    fn from(r: voip::EndReason) -> Self {
        match r {
            voip::EndReason::Malformed => Self::Malformed,
            voip::EndReason::Cancelled => Self::Cancelled,
            voip::EndReason::AlreadyReported => Self::AlreadyReported,
            voip::EndReason::Expired => Self::Expired,
        }
    }
}

impl From<voip::VoipAction> for VoipAction {
    fn from(a: voip::VoipAction) -> Self {
        match a {
            voip::VoipAction::Report { ring_for_ms } => Self::Report { ring_for_ms },
            voip::VoipAction::ReportAndEnd { reason } => Self::ReportAndEnd {
                reason: reason.into(),
            },
            voip::VoipAction::CompleteOnly { reason } => Self::CompleteOnly {
                reason: reason.into(),
            },
        }
    }
}
