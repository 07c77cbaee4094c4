//! The PushKit/CallKit contract as types. Does no I/O and reads no clock (time is an argument).
//!
//! iOS kills an app that receives a VoIP push and does not report a call to CallKit, and after
//! repeated failures stops delivering VoIP pushes to it at all. So:
//! - a [`VoipCall`] can only be built from a call invite ([`VoipCall::from_invite`]); there is no
//!   way to make one from a message or a cancel, and a [`VoipRequest`] only from a `VoipCall`;
//! - the payload carries everything the app needs to report the call synchronously;
//! - the request's headers are fixed by the type: push type `voip`, topic `<bundle>.voip`,
//!   priority 10, expiration no later than the ring deadline, collapse id = the call UUID.

use push_proto::device::CallInvite;

/// Largest VoIP payload APNs accepts, in bytes (other push types: 4096).
pub const MAX_VOIP_PAYLOAD: usize = 5120;
/// Largest `apns-collapse-id`, in bytes.
pub const MAX_COLLAPSE_ID: usize = 64;
/// `apns-priority` of every VoIP push: immediate delivery.
pub const VOIP_PRIORITY: u8 = 10;
/// `apns-push-type` of every request the bridge makes.
pub const VOIP_PUSH_TYPE: &str = "voip";
/// Version of the payload's `lpush` dictionary; the app's decision function checks it.
pub const PAYLOAD_VERSION: u32 = 1;

/// Why a VoIP push was not built. Nothing was sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ContractError {
    /// The invite lacks a field the app needs, or its fields contradict each other.
    #[error("malformed call invite: {0}")]
    MalformedInvite(String),
    /// The payload would exceed APNs' limit for VoIP pushes.
    #[error(
        "VoIP payload is {size} bytes; APNs accepts at most {MAX_VOIP_PAYLOAD} (shorten the caller name or handle)"
    )]
    PayloadTooLarge {
        /// Size of the JSON payload that was built.
        size: usize,
    },
    /// The call no longer rings (or rings too briefly for a push to be of use).
    #[error(
        "call {call_id} stops ringing at {deadline_ms} (Unix ms), {left_ms} ms from now: too late for a VoIP push"
    )]
    TooLate {
        /// Call id.
        call_id: String,
        /// Ring deadline, Unix ms.
        deadline_ms: i64,
        /// Time left until it, ms (negative when past).
        left_ms: i64,
    },
    /// The device token is not a PushKit token (hex of 8 to 100 bytes).
    #[error("invalid device token: {0}")]
    BadDeviceToken(String),
    /// The bundle id cannot form a VoIP topic.
    #[error(
        "invalid bundle id {0:?}: expected the app's bundle id (for example com.example.app) without the .voip suffix"
    )]
    BadBundleId(String),
}

/// A PushKit device token: lowercase hex, 8 to 100 bytes (Apple's are 32 today, but Apple says
/// not to rely on the length).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceToken(String);

impl DeviceToken {
    /// Validate and normalise (lowercase) a hex token.
    pub fn parse(hex: &str) -> Result<Self, ContractError> {
        let hex = hex.trim();
        let ok_len = (16..=200).contains(&hex.len()) && hex.len().is_multiple_of(2);
        if !ok_len || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ContractError::BadDeviceToken(format!(
                "expected 16-200 hex digits, got {} characters",
                hex.len()
            )));
        }
        Ok(Self(hex.to_ascii_lowercase()))
    }

    /// The token as sent in the request path.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for DeviceToken {
    /// Only a prefix: tokens are identifiers of a person's phone and stay out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}…", &self.0[..8])
    }
}

/// The app's bundle id; the VoIP topic is `<bundle id>.voip`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleId(String);

impl BundleId {
    /// Validate a bundle id (reverse-DNS, without the `.voip` suffix).
    pub fn parse(id: &str) -> Result<Self, ContractError> {
        let valid = !id.is_empty()
            && id.len() <= 155
            && !id.ends_with(".voip")
            && id
                .split('.')
                .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
        if !valid {
            return Err(ContractError::BadBundleId(id.into()));
        }
        Ok(Self(id.into()))
    }

    /// The bundle id.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The `apns-topic` of VoIP pushes to this app.
    pub fn voip_topic(&self) -> String {
        format!("{}.voip", self.0)
    }
}

/// A call that may ring through APNs. The only way to get one is from a call invite, so no other
/// kind of push can ever become a VoIP push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VoipCall {
    invite: CallInvite,
}

impl VoipCall {
    /// Accept an invite that carries everything the app needs: a call id, the UUID derived from
    /// it (the same on every path, so a device that hears of a call twice rings once), a caller
    /// name, and a ring deadline after its creation.
    pub fn from_invite(invite: CallInvite) -> Result<Self, ContractError> {
        let bad = |m: &str| Err(ContractError::MalformedInvite(m.into()));
        if invite.call_id.is_empty() {
            return bad("call_id is empty");
        }
        if invite.call_uuid != push_proto::call_uuid(&invite.call_id) {
            return bad("call_uuid is not the UUIDv5 of call_id");
        }
        if invite.ring_deadline_ms <= invite.created_at_ms || invite.created_at_ms <= 0 {
            return bad("ring_deadline_ms must be after created_at_ms (both Unix ms)");
        }
        Ok(Self { invite })
    }

    /// The invite it was built from (what the remote bridge API carries).
    pub fn invite(&self) -> &CallInvite {
        &self.invite
    }

    /// Call id.
    pub fn call_id(&self) -> &str {
        &self.invite.call_id
    }

    /// CallKit UUID.
    pub fn call_uuid(&self) -> &str {
        &self.invite.call_uuid
    }

    /// Ring deadline, Unix ms.
    pub fn ring_deadline_ms(&self) -> i64 {
        self.invite.ring_deadline_ms
    }

    /// The JSON payload: an empty `aps` and an `lpush` dictionary with everything the app needs
    /// to report the call synchronously.
    pub fn payload_json(&self) -> String {
        let i = &self.invite;
        serde_json::json!({
            "aps": {},
            "lpush": {
                "v": PAYLOAD_VERSION,
                "kind": "call_invite",
                "call_id": i.call_id,
                "call_uuid": i.call_uuid,
                "caller_name": i.caller_name,
                "caller_handle": i.caller_handle,
                "video": i.video,
                "created_at_ms": i.created_at_ms,
                "ring_deadline_ms": i.ring_deadline_ms,
            }
        })
        .to_string()
    }

    /// Build the request for `token`, at `now_ms` (Unix ms). Refused when fewer than
    /// `min_ring_left_ms` remain before the ring deadline or the payload is over the limit.
    pub fn request(
        &self,
        token: &DeviceToken,
        bundle: &BundleId,
        now_ms: i64,
        min_ring_left_ms: i64,
    ) -> Result<VoipRequest, ContractError> {
        let deadline = self.ring_deadline_ms();
        let left_ms = deadline - now_ms;
        if left_ms <= 0 || left_ms < min_ring_left_ms {
            return Err(ContractError::TooLate {
                call_id: self.call_id().into(),
                deadline_ms: deadline,
                left_ms,
            });
        }
        let payload = self.payload_json();
        if payload.len() > MAX_VOIP_PAYLOAD {
            return Err(ContractError::PayloadTooLarge { size: payload.len() });
        }
        Ok(VoipRequest {
            device_token: token.clone(),
            topic: bundle.voip_topic(),
            expiration: expiration_secs(deadline, now_ms),
            collapse_id: self.call_uuid().into(),
            payload,
            call_id: self.call_id().into(),
            ring_deadline_ms: deadline,
        })
    }
}

/// `apns-expiration` for a call ringing until `deadline_ms`: the deadline rounded *down* to whole
/// seconds (APNs' unit), so APNs never holds the push past it. When that second has already
/// begun, 0: "deliver now or never, do not store".
pub fn expiration_secs(deadline_ms: i64, now_ms: i64) -> u64 {
    let secs = deadline_ms.div_euclid(1000);
    if secs * 1000 <= now_ms { 0 } else { secs as u64 }
}

/// One VoIP push, ready for a transport. Built only by [`VoipCall::request`]; the push type
/// (`voip`) and priority (10) are constants of the type, not fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VoipRequest {
    device_token: DeviceToken,
    topic: String,
    expiration: u64,
    collapse_id: String,
    payload: String,
    call_id: String,
    ring_deadline_ms: i64,
}

impl VoipRequest {
    /// The device token (request path `/3/device/<token>`).
    pub fn device_token(&self) -> &DeviceToken {
        &self.device_token
    }

    /// `apns-topic`: `<bundle id>.voip`.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// `apns-push-type`: always `voip`.
    pub fn push_type(&self) -> &'static str {
        VOIP_PUSH_TYPE
    }

    /// `apns-priority`: always 10.
    pub fn priority(&self) -> u8 {
        VOIP_PRIORITY
    }

    /// `apns-expiration`, Unix seconds (0: deliver now or never).
    pub fn expiration(&self) -> u64 {
        self.expiration
    }

    /// `apns-collapse-id`: the call UUID (36 bytes), so APNs coalesces copies of one call.
    pub fn collapse_id(&self) -> &str {
        &self.collapse_id
    }

    /// The JSON body, at most [`MAX_VOIP_PAYLOAD`] bytes.
    pub fn payload(&self) -> &str {
        &self.payload
    }

    /// The call this push rings.
    pub fn call_id(&self) -> &str {
        &self.call_id
    }

    /// Ring deadline of the call, Unix ms.
    pub fn ring_deadline_ms(&self) -> i64 {
        self.ring_deadline_ms
    }
}

#[cfg(test)]
impl VoipRequest {
    /// A copy with fields the contract would never produce, to test the fake's checks.
    pub(crate) fn tampered(&self, f: impl FnOnce(&mut TamperedFields<'_>)) -> Self {
        let mut r = self.clone();
        f(&mut TamperedFields {
            topic: &mut r.topic,
            expiration: &mut r.expiration,
            collapse_id: &mut r.collapse_id,
            payload: &mut r.payload,
        });
        r
    }
}

/// Mutable access to a request's fields, for tests only.
#[cfg(test)]
pub(crate) struct TamperedFields<'a> {
    pub(crate) topic: &'a mut String,
    pub(crate) expiration: &'a mut u64,
    pub(crate) collapse_id: &'a mut String,
    pub(crate) payload: &'a mut String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_invite as invite;

    fn token() -> DeviceToken {
        DeviceToken::parse(&"AB".repeat(32)).unwrap()
    }

    fn bundle() -> BundleId {
        BundleId::parse("com.example.ward").unwrap()
    }

    #[test]
    fn payload_carries_everything_the_app_needs_to_report_the_call() {
        let call = VoipCall::from_invite(invite("c1", 1_000_000, 1_030_500)).unwrap();
        let req = call.request(&token(), &bundle(), 1_000_100, 1000).unwrap();
        let v: serde_json::Value = serde_json::from_str(req.payload()).unwrap();
        let l = &v["lpush"];
        assert_eq!(l["v"], 1);
        assert_eq!(l["kind"], "call_invite");
        assert_eq!(l["call_id"], "c1");
        assert_eq!(l["call_uuid"], push_proto::call_uuid("c1").as_str());
        assert_eq!(l["caller_name"], "Dr. Okafor");
        assert_eq!(l["caller_handle"], "ext 4411");
        assert_eq!(l["video"], true);
        assert_eq!(l["created_at_ms"], 1_000_000);
        assert_eq!(l["ring_deadline_ms"], 1_030_500);
        assert!(v["aps"].as_object().unwrap().is_empty());
    }

    #[test]
    fn headers_are_fixed_by_the_contract() {
        let call = VoipCall::from_invite(invite("c1", 1_000_000, 1_030_500)).unwrap();
        let req = call.request(&token(), &bundle(), 1_000_100, 1000).unwrap();
        assert_eq!(req.push_type(), "voip");
        assert_eq!(req.priority(), 10);
        assert_eq!(req.topic(), "com.example.ward.voip");
        assert_eq!(req.collapse_id(), push_proto::call_uuid("c1"));
        assert!(req.collapse_id().len() <= MAX_COLLAPSE_ID);
        assert_eq!(
            req.device_token().as_str(),
            "ab".repeat(32),
            "normalised to lowercase"
        );
        // 1_030_500 ms -> 1030 s: never later than the ring deadline.
        assert_eq!(req.expiration(), 1030);
        assert!(req.expiration() as i64 * 1000 <= req.ring_deadline_ms());
    }

    #[test]
    fn expiration_never_exceeds_the_deadline() {
        assert_eq!(expiration_secs(10_999, 0), 10);
        assert_eq!(expiration_secs(11_000, 0), 11);
        // The last second already started: deliver now or never.
        assert_eq!(expiration_secs(10_999, 10_000), 0);
        assert_eq!(expiration_secs(10_999, 10_500), 0);
        for deadline in [1_001, 5_432, 999_999] {
            for now in [0, 500, 1_000] {
                let e = expiration_secs(deadline, now);
                assert!(e == 0 || (e as i64) * 1000 <= deadline, "{deadline} {now} -> {e}");
            }
        }
    }

    #[test]
    fn oversized_payload_is_refused_with_a_clear_error() {
        let mut i = invite("c1", 1_000, 60_000);
        i.caller_name = "x".repeat(MAX_VOIP_PAYLOAD);
        let call = VoipCall::from_invite(i).unwrap();
        let err = call.request(&token(), &bundle(), 2_000, 1000).unwrap_err();
        let ContractError::PayloadTooLarge { size } = err else {
            panic!("{err:?}")
        };
        assert!(size > MAX_VOIP_PAYLOAD);
        assert!(err.to_string().contains("at most 5120"), "{err}");
        // Just under the limit is fine.
        let mut i = invite("c1", 1_000, 60_000);
        let base = VoipCall::from_invite(i.clone()).unwrap().payload_json().len();
        i.caller_name.push_str(&"y".repeat(MAX_VOIP_PAYLOAD - base));
        let call = VoipCall::from_invite(i).unwrap();
        let req = call.request(&token(), &bundle(), 2_000, 1000).unwrap();
        assert_eq!(req.payload().len(), MAX_VOIP_PAYLOAD);
    }

    #[test]
    fn no_request_for_a_call_that_stopped_ringing() {
        let call = VoipCall::from_invite(invite("c1", 1_000, 10_000)).unwrap();
        assert!(matches!(
            call.request(&token(), &bundle(), 10_000, 0),
            Err(ContractError::TooLate { left_ms: 0, .. })
        ));
        assert!(matches!(
            call.request(&token(), &bundle(), 9_500, 1000),
            Err(ContractError::TooLate { left_ms: 500, .. })
        ));
        assert!(call.request(&token(), &bundle(), 9_000, 1000).is_ok());
    }

    #[test]
    fn invites_must_be_well_formed() {
        let mut i = invite("c1", 1_000, 10_000);
        i.call_uuid = push_proto::call_uuid("other");
        assert!(matches!(
            VoipCall::from_invite(i),
            Err(ContractError::MalformedInvite(_))
        ));
        assert!(VoipCall::from_invite(invite("", 1_000, 10_000)).is_err());
        assert!(VoipCall::from_invite(invite("c1", 10_000, 10_000)).is_err());
    }

    #[test]
    fn tokens_and_bundle_ids_are_validated() {
        assert!(DeviceToken::parse("abc").is_err());
        assert!(DeviceToken::parse(&"zz".repeat(32)).is_err());
        assert!(DeviceToken::parse(&"a".repeat(63)).is_err());
        assert_eq!(token().to_string(), "abababab…", "logs show a prefix only");
        assert!(BundleId::parse("com.example.app.voip").is_err());
        assert!(BundleId::parse("com..app").is_err());
        assert!(BundleId::parse("com.example.app").is_ok());
    }
}
