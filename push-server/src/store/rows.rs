//! How records are stored: one versioned row type per table, private to the store.
//!
//! Postcard encodes fields in order, with no names, and enum variants by index, so any change to
//! a type that is written as is (a new field, a reordered field, a new or reordered variant)
//! makes the rows already stored undecodable or, worse, decodes them as something else. The
//! public records are therefore never written directly: each table stores a row enum whose
//! variants are frozen copies of the record as it was at that version, including the enums
//! inside it.
//!
//! To change a record: add the field to the public type, add a new struct and a variant
//! **appended** to the row enum, write the new variant, and convert every older variant when
//! reading. Never edit a struct or enum of an existing version; the `encoding_is_stable` test
//! pins their bytes. Conversions from a public enum are exhaustive `match`es, so a new public
//! variant does not compile until a row version can hold it.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{
    ApiKeyRecord, CallEnd, CallRecord, CallStepRecord, CalleeRecord, DeviceRecord, PushKind, Receipt,
    ReceiptState, RequestRecord, StoredPush,
};

/// A stored row: what is written for a public record and how a row of any version is read back.
pub(super) trait Row: Serialize + DeserializeOwned {
    /// The public record the row stores.
    type Record;
    /// The row of the newest version for `record`.
    fn from_record(record: &Self::Record) -> Self;
    /// The record a row of any version stands for.
    fn into_record(self) -> Self::Record;
}

/// Table `devices_v1` (keyed by device id).
#[derive(Debug, Serialize, Deserialize)]
pub(super) enum DeviceRow {
    V1(DeviceV1),
    V2(DeviceV2),
}

/// [`DeviceRecord`] as first stored; also the layout of the unversioned table `devices`.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct DeviceV1 {
    pub(super) device_id: String,
    pub(super) groups: Vec<String>,
    pub(super) created_at_ms: i64,
    pub(super) credential_generation: u64,
    pub(super) revoked: bool,
    pub(super) last_seen_ms: i64,
    pub(super) last_ssid: String,
    pub(super) last_disconnect_reason: String,
    pub(super) sdk_version: String,
    pub(super) voip_token: String,
    pub(super) voip_token_invalid: bool,
}

/// [`DeviceRecord`] with the CA generation of its enrollment: version 1 and `ca_generation`.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct DeviceV2 {
    pub(super) v1: DeviceV1,
    pub(super) ca_generation: u32,
}

impl Row for DeviceRow {
    type Record = DeviceRecord;

    fn from_record(d: &DeviceRecord) -> Self {
        let v1 = DeviceV1 {
            device_id: d.device_id.clone(),
            groups: d.groups.clone(),
            created_at_ms: d.created_at_ms,
            credential_generation: d.credential_generation,
            revoked: d.revoked,
            last_seen_ms: d.last_seen_ms,
            last_ssid: d.last_ssid.clone(),
            last_disconnect_reason: d.last_disconnect_reason.clone(),
            sdk_version: d.sdk_version.clone(),
            voip_token: d.voip_token.clone(),
            voip_token_invalid: d.voip_token_invalid,
        };
        DeviceRow::V2(DeviceV2 {
            v1,
            ca_generation: d.ca_generation,
        })
    }

    fn into_record(self) -> DeviceRecord {
        let (d, ca_generation) = match self {
            DeviceRow::V1(d) => (d, 0),
            DeviceRow::V2(DeviceV2 { v1, ca_generation }) => (v1, ca_generation),
        };
        DeviceRecord {
            device_id: d.device_id,
            groups: d.groups,
            created_at_ms: d.created_at_ms,
            credential_generation: d.credential_generation,
            revoked: d.revoked,
            last_seen_ms: d.last_seen_ms,
            last_ssid: d.last_ssid,
            last_disconnect_reason: d.last_disconnect_reason,
            sdk_version: d.sdk_version,
            voip_token: d.voip_token,
            voip_token_invalid: d.voip_token_invalid,
            ca_generation,
        }
    }
}

/// [`PushKind`] as stored by version 1 rows (variant indices are the encoding).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(super) enum PushKindV1 {
    Message,
    CallInvite,
    CallCancel,
}

impl From<PushKind> for PushKindV1 {
    fn from(kind: PushKind) -> Self {
        match kind {
            PushKind::Message => Self::Message,
            PushKind::CallInvite => Self::CallInvite,
            PushKind::CallCancel => Self::CallCancel,
        }
    }
}

impl From<PushKindV1> for PushKind {
    fn from(kind: PushKindV1) -> Self {
        match kind {
            PushKindV1::Message => Self::Message,
            PushKindV1::CallInvite => Self::CallInvite,
            PushKindV1::CallCancel => Self::CallCancel,
        }
    }
}

/// Table `pushes_v1` (keyed by `(device_id, seq)`).
#[derive(Debug, Serialize, Deserialize)]
pub(super) enum PushRow {
    V1(PushV1),
}

/// [`StoredPush`] as first stored; also the layout of the unversioned table `pushes`.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct PushV1 {
    pub(super) device_id: String,
    pub(super) seq: u64,
    pub(super) id: String,
    pub(super) kind: PushKindV1,
    pub(super) collapse_key: String,
    pub(super) expires_at_ms: i64,
    pub(super) encoded: Vec<u8>,
}

impl Row for PushRow {
    type Record = StoredPush;

    fn from_record(p: &StoredPush) -> Self {
        PushRow::V1(PushV1 {
            device_id: p.device_id.clone(),
            seq: p.seq,
            id: p.id.clone(),
            kind: p.kind.into(),
            collapse_key: p.collapse_key.clone(),
            expires_at_ms: p.expires_at_ms,
            encoded: p.encoded.clone(),
        })
    }

    fn into_record(self) -> StoredPush {
        let PushRow::V1(p) = self;
        StoredPush {
            device_id: p.device_id,
            seq: p.seq,
            id: p.id,
            kind: p.kind.into(),
            collapse_key: p.collapse_key,
            expires_at_ms: p.expires_at_ms,
            encoded: p.encoded,
        }
    }
}

/// [`ReceiptState`] as stored by version 1 rows (variant indices are the encoding).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(super) enum ReceiptStateV1 {
    Accepted,
    Delivered,
    Acked,
    Expired,
    Undeliverable,
    Superseded,
    Cancelled,
}

impl TryFrom<ReceiptState> for ReceiptStateV1 {
    type Error = ();

    /// The states version 1 rows hold; a receipt in any other is written as a version 2 row.
    fn try_from(state: ReceiptState) -> Result<Self, ()> {
        Ok(match state {
            ReceiptState::Accepted => Self::Accepted,
            ReceiptState::Delivered => Self::Delivered,
            ReceiptState::Acked => Self::Acked,
            ReceiptState::Expired => Self::Expired,
            ReceiptState::Undeliverable => Self::Undeliverable,
            ReceiptState::Superseded => Self::Superseded,
            ReceiptState::Cancelled => Self::Cancelled,
            ReceiptState::Answered | ReceiptState::Declined | ReceiptState::Missed => return Err(()),
        })
    }
}

impl From<ReceiptStateV1> for ReceiptState {
    fn from(state: ReceiptStateV1) -> Self {
        match state {
            ReceiptStateV1::Accepted => Self::Accepted,
            ReceiptStateV1::Delivered => Self::Delivered,
            ReceiptStateV1::Acked => Self::Acked,
            ReceiptStateV1::Expired => Self::Expired,
            ReceiptStateV1::Undeliverable => Self::Undeliverable,
            ReceiptStateV1::Superseded => Self::Superseded,
            ReceiptStateV1::Cancelled => Self::Cancelled,
        }
    }
}

/// Table `receipts_v1` (keyed by `(id, device_id)`).
#[derive(Debug, Serialize, Deserialize)]
pub(super) enum ReceiptRow {
    V1(ReceiptV1),
    /// Written only for the states version 1 cannot hold (the call outcomes), so a receipt an
    /// older binary can read stays readable by it.
    V2(ReceiptV2),
}

/// [`ReceiptState`] as stored by version 2 rows (variant indices are the encoding).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(super) enum ReceiptStateV2 {
    Accepted,
    Delivered,
    Acked,
    Expired,
    Undeliverable,
    Superseded,
    Cancelled,
    Answered,
    Declined,
    Missed,
}

impl From<ReceiptState> for ReceiptStateV2 {
    fn from(state: ReceiptState) -> Self {
        match state {
            ReceiptState::Accepted => Self::Accepted,
            ReceiptState::Delivered => Self::Delivered,
            ReceiptState::Acked => Self::Acked,
            ReceiptState::Expired => Self::Expired,
            ReceiptState::Undeliverable => Self::Undeliverable,
            ReceiptState::Superseded => Self::Superseded,
            ReceiptState::Cancelled => Self::Cancelled,
            ReceiptState::Answered => Self::Answered,
            ReceiptState::Declined => Self::Declined,
            ReceiptState::Missed => Self::Missed,
        }
    }
}

impl From<ReceiptStateV2> for ReceiptState {
    fn from(state: ReceiptStateV2) -> Self {
        match state {
            ReceiptStateV2::Accepted => Self::Accepted,
            ReceiptStateV2::Delivered => Self::Delivered,
            ReceiptStateV2::Acked => Self::Acked,
            ReceiptStateV2::Expired => Self::Expired,
            ReceiptStateV2::Undeliverable => Self::Undeliverable,
            ReceiptStateV2::Superseded => Self::Superseded,
            ReceiptStateV2::Cancelled => Self::Cancelled,
            ReceiptStateV2::Answered => Self::Answered,
            ReceiptStateV2::Declined => Self::Declined,
            ReceiptStateV2::Missed => Self::Missed,
        }
    }
}

/// [`Receipt`] with a call outcome.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct ReceiptV2 {
    pub(super) id: String,
    pub(super) device_id: String,
    pub(super) state: ReceiptStateV2,
    pub(super) reason: String,
    pub(super) at_ms: i64,
    pub(super) path: String,
}

/// [`Receipt`] as first stored; also the layout of the unversioned table `receipts`.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct ReceiptV1 {
    pub(super) id: String,
    pub(super) device_id: String,
    pub(super) state: ReceiptStateV1,
    pub(super) reason: String,
    pub(super) at_ms: i64,
    pub(super) path: String,
}

impl Row for ReceiptRow {
    type Record = Receipt;

    fn from_record(r: &Receipt) -> Self {
        match ReceiptStateV1::try_from(r.state) {
            Ok(state) => ReceiptRow::V1(ReceiptV1 {
                id: r.id.clone(),
                device_id: r.device_id.clone(),
                state,
                reason: r.reason.clone(),
                at_ms: r.at_ms,
                path: r.path.clone(),
            }),
            Err(()) => ReceiptRow::V2(ReceiptV2 {
                id: r.id.clone(),
                device_id: r.device_id.clone(),
                state: r.state.into(),
                reason: r.reason.clone(),
                at_ms: r.at_ms,
                path: r.path.clone(),
            }),
        }
    }

    fn into_record(self) -> Receipt {
        match self {
            ReceiptRow::V1(r) => Receipt {
                id: r.id,
                device_id: r.device_id,
                state: r.state.into(),
                reason: r.reason,
                at_ms: r.at_ms,
                path: r.path,
            },
            ReceiptRow::V2(r) => Receipt {
                id: r.id,
                device_id: r.device_id,
                state: r.state.into(),
                reason: r.reason,
                at_ms: r.at_ms,
                path: r.path,
            },
        }
    }
}

/// Table `requests_v1` (keyed by the caller-chosen id).
#[derive(Debug, Serialize, Deserialize)]
pub(super) enum RequestRow {
    V1(RequestV1),
}

/// [`RequestRecord`] as first stored; also the layout of the unversioned table `requests`.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct RequestV1 {
    pub(super) kind: PushKindV1,
    pub(super) digest: Vec<u8>,
    pub(super) at_ms: i64,
    pub(super) expires_at_ms: i64,
}

impl Row for RequestRow {
    type Record = RequestRecord;

    fn from_record(r: &RequestRecord) -> Self {
        RequestRow::V1(RequestV1 {
            kind: r.kind.into(),
            digest: r.digest.clone(),
            at_ms: r.at_ms,
            expires_at_ms: r.expires_at_ms,
        })
    }

    fn into_record(self) -> RequestRecord {
        let RequestRow::V1(r) = self;
        RequestRecord {
            kind: r.kind.into(),
            digest: r.digest,
            at_ms: r.at_ms,
            expires_at_ms: r.expires_at_ms,
        }
    }
}

/// Table `api_keys_v2` (keyed by the key's hex SHA-256). Its first variant is named `V2`
/// because the unversioned table `api_keys` ([`ApiKeyV1`]) came first; variant index 0 is
/// `V2`, so a next version is `V3`, appended.
#[derive(Debug, Serialize, Deserialize)]
pub(super) enum ApiKeyRow {
    V2(ApiKeyV2),
}

/// [`ApiKeyRecord`] as stored by `V2` rows.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct ApiKeyV2 {
    pub(super) name: String,
    pub(super) scopes: Vec<String>,
    pub(super) created_at_ms: i64,
    pub(super) expires_at_ms: i64,
    pub(super) revoked_at_ms: i64,
    pub(super) enroll_groups: Vec<String>,
}

/// An API key as written before versioning, in the unversioned table `api_keys`.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct ApiKeyV1 {
    pub(super) name: String,
    pub(super) scopes: Vec<String>,
    pub(super) created_at_ms: i64,
}

impl From<ApiKeyV1> for ApiKeyRow {
    fn from(old: ApiKeyV1) -> Self {
        ApiKeyRow::from_record(&ApiKeyRecord::new(&old.name, old.scopes, old.created_at_ms))
    }
}

impl Row for ApiKeyRow {
    type Record = ApiKeyRecord;

    fn from_record(k: &ApiKeyRecord) -> Self {
        ApiKeyRow::V2(ApiKeyV2 {
            name: k.name.clone(),
            scopes: k.scopes.clone(),
            created_at_ms: k.created_at_ms,
            expires_at_ms: k.expires_at_ms,
            revoked_at_ms: k.revoked_at_ms,
            enroll_groups: k.enroll_groups.clone(),
        })
    }

    fn into_record(self) -> ApiKeyRecord {
        let ApiKeyRow::V2(k) = self;
        ApiKeyRecord {
            name: k.name,
            scopes: k.scopes,
            created_at_ms: k.created_at_ms,
            expires_at_ms: k.expires_at_ms,
            revoked_at_ms: k.revoked_at_ms,
            enroll_groups: k.enroll_groups,
        }
    }
}

/// Table `calls_v1` (keyed by call id).
#[derive(Debug, Serialize, Deserialize)]
pub(super) enum CallRow {
    V1(CallV1),
}

/// [`CallRecord`] as first stored.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct CallV1 {
    pub(super) call_id: String,
    pub(super) invite: Vec<u8>,
    pub(super) placed_at_ms: i64,
    pub(super) deadline_ms: i64,
    pub(super) steps: Vec<CallStepV1>,
    pub(super) callees: Vec<CalleeV1>,
    pub(super) end: Option<CallEndV1>,
    pub(super) hung_up_at_ms: i64,
}

/// [`CallStepRecord`] as first stored.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct CallStepV1 {
    pub(super) due_ms: i64,
    pub(super) stop_earlier: bool,
    pub(super) device_ids: Vec<String>,
    pub(super) started_ms: i64,
}

/// [`CalleeRecord`] as first stored.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct CalleeV1 {
    pub(super) device_id: String,
    pub(super) step: u32,
    pub(super) seq: u64,
    pub(super) placed: bool,
    pub(super) rang: bool,
    pub(super) outcome: Option<(ReceiptStateV2, i64)>,
}

/// [`CallEnd`] as first stored.
#[derive(Debug, Serialize, Deserialize)]
pub(super) enum CallEndV1 {
    Answered { device_id: String, at_ms: i64 },
    Declined { at_ms: i64 },
    Missed { at_ms: i64 },
    Cancelled { at_ms: i64 },
}

impl Row for CallRow {
    type Record = CallRecord;

    fn from_record(c: &CallRecord) -> Self {
        CallRow::V1(CallV1 {
            call_id: c.call_id.clone(),
            invite: c.invite.clone(),
            placed_at_ms: c.placed_at_ms,
            deadline_ms: c.deadline_ms,
            steps: c
                .steps
                .iter()
                .map(|s| CallStepV1 {
                    due_ms: s.due_ms,
                    stop_earlier: s.stop_earlier,
                    device_ids: s.device_ids.clone(),
                    started_ms: s.started_ms,
                })
                .collect(),
            callees: c
                .callees
                .iter()
                .map(|e| CalleeV1 {
                    device_id: e.device_id.clone(),
                    step: e.step,
                    seq: e.seq,
                    placed: e.placed,
                    rang: e.rang,
                    outcome: e.outcome.map(|(s, at)| (s.into(), at)),
                })
                .collect(),
            end: c.end.as_ref().map(|e| match e {
                CallEnd::Answered { device_id, at_ms } => CallEndV1::Answered {
                    device_id: device_id.clone(),
                    at_ms: *at_ms,
                },
                CallEnd::Declined { at_ms } => CallEndV1::Declined { at_ms: *at_ms },
                CallEnd::Missed { at_ms } => CallEndV1::Missed { at_ms: *at_ms },
                CallEnd::Cancelled { at_ms } => CallEndV1::Cancelled { at_ms: *at_ms },
            }),
            hung_up_at_ms: c.hung_up_at_ms,
        })
    }

    fn into_record(self) -> CallRecord {
        let CallRow::V1(c) = self;
        CallRecord {
            call_id: c.call_id,
            invite: c.invite,
            placed_at_ms: c.placed_at_ms,
            deadline_ms: c.deadline_ms,
            steps: c
                .steps
                .into_iter()
                .map(|s| CallStepRecord {
                    due_ms: s.due_ms,
                    stop_earlier: s.stop_earlier,
                    device_ids: s.device_ids,
                    started_ms: s.started_ms,
                })
                .collect(),
            callees: c
                .callees
                .into_iter()
                .map(|e| CalleeRecord {
                    device_id: e.device_id,
                    step: e.step,
                    seq: e.seq,
                    placed: e.placed,
                    rang: e.rang,
                    outcome: e.outcome.map(|(s, at)| (s.into(), at)),
                })
                .collect(),
            end: c.end.map(|e| match e {
                CallEndV1::Answered { device_id, at_ms } => CallEnd::Answered { device_id, at_ms },
                CallEndV1::Declined { at_ms } => CallEnd::Declined { at_ms },
                CallEndV1::Missed { at_ms } => CallEnd::Missed { at_ms },
                CallEndV1::Cancelled { at_ms } => CallEnd::Cancelled { at_ms },
            }),
            hung_up_at_ms: c.hung_up_at_ms,
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    // Fixed records with a distinct value in every field, so that swapping two fields of the
    // same type changes the bytes.

    pub(in crate::store) fn device() -> DeviceRecord {
        DeviceRecord {
            device_id: "d1".into(),
            groups: vec!["g1".into(), "g2".into()],
            created_at_ms: 1,
            credential_generation: 2,
            revoked: false,
            last_seen_ms: 3,
            last_ssid: "ssid".into(),
            last_disconnect_reason: "idle".into(),
            sdk_version: "1.0".into(),
            voip_token: "ab".into(),
            voip_token_invalid: true,
            ca_generation: 0,
        }
    }

    pub(in crate::store) fn push() -> StoredPush {
        StoredPush {
            device_id: "d1".into(),
            seq: 7,
            id: "m1".into(),
            kind: PushKind::CallInvite,
            collapse_key: "ck".into(),
            expires_at_ms: 9,
            encoded: vec![1, 2, 3],
        }
    }

    pub(in crate::store) fn receipt() -> Receipt {
        Receipt {
            id: "m1".into(),
            device_id: "d1".into(),
            state: ReceiptState::Superseded,
            reason: "newer".into(),
            at_ms: 11,
            path: "local".into(),
        }
    }

    pub(in crate::store) fn request() -> RequestRecord {
        RequestRecord {
            kind: PushKind::CallCancel,
            digest: vec![4, 5],
            at_ms: 12,
            expires_at_ms: 13,
        }
    }

    fn api_key() -> ApiKeyRecord {
        ApiKeyRecord {
            expires_at_ms: 14,
            revoked_at_ms: 15,
            enroll_groups: vec!["g3".into()],
            ..ApiKeyRecord::new("nurse", vec!["send".into(), "enroll".into()], 16)
        }
    }

    fn encode<R: Row>(record: &R::Record) -> Vec<u8> {
        postcard::to_allocvec(&R::from_record(record)).expect("encode")
    }

    fn decode<R: Row>(bytes: &[u8]) -> R::Record {
        postcard::from_bytes::<R>(bytes).expect("decode").into_record()
    }

    // Bytes of the unversioned rows, as written by the release before rows were versioned
    // (postcard of the public records then). A version 1 row is its variant index, 0, followed
    // by exactly these bytes, which is what lets the open-time migration reuse `*V1`.
    pub(in crate::store) const LEGACY_DEVICE: &[u8] = &[
        2, 100, 49, 2, 2, 103, 49, 2, 103, 50, 2, 2, 0, 6, 4, 115, 115, 105, 100, 4, 105, 100, 108, 101, 3,
        49, 46, 48, 2, 97, 98, 1,
    ];
    pub(in crate::store) const LEGACY_PUSH: &[u8] =
        &[2, 100, 49, 7, 2, 109, 49, 1, 2, 99, 107, 18, 3, 1, 2, 3];
    pub(in crate::store) const LEGACY_RECEIPT: &[u8] = &[
        2, 109, 49, 2, 100, 49, 5, 5, 110, 101, 119, 101, 114, 22, 5, 108, 111, 99, 97, 108,
    ];
    pub(in crate::store) const LEGACY_REQUEST: &[u8] = &[2, 2, 4, 5, 24, 26];

    fn versioned(variant: u8, legacy: &[u8]) -> Vec<u8> {
        [&[variant][..], legacy].concat()
    }

    /// Every row type's encoding of a fixed record, pinned: a reordered, added or retyped field
    /// of a stored version fails here instead of corrupting databases in the field.
    #[test]
    fn encoding_is_stable() {
        // Version 2: version 1's fields, then the CA generation.
        let v2 = [&[1][..], LEGACY_DEVICE, &[0]].concat();
        assert_eq!(encode::<DeviceRow>(&device()), v2);
        assert_eq!(encode::<PushRow>(&push()), versioned(0, LEGACY_PUSH));
        assert_eq!(encode::<ReceiptRow>(&receipt()), versioned(0, LEGACY_RECEIPT));
        assert_eq!(encode::<RequestRow>(&request()), versioned(0, LEGACY_REQUEST));
        assert_eq!(
            encode::<ApiKeyRow>(&api_key()),
            [
                0, 5, 110, 117, 114, 115, 101, 2, 4, 115, 101, 110, 100, 6, 101, 110, 114, 111, 108, 108, 32,
                28, 30, 1, 2, 103, 51
            ]
        );
        // Variant indices of the stored enums, one by one (a swap of two variants of the same
        // shape would not show in the records above).
        let kinds = [
            PushKindV1::Message,
            PushKindV1::CallInvite,
            PushKindV1::CallCancel,
        ];
        for (index, kind) in kinds.into_iter().enumerate() {
            assert_eq!(
                postcard::to_allocvec(&kind).expect("encode"),
                [index as u8],
                "{kind:?}"
            );
        }
        use ReceiptStateV1::*;
        let states = [
            Accepted,
            Delivered,
            Acked,
            Expired,
            Undeliverable,
            Superseded,
            Cancelled,
        ];
        for (index, state) in states.into_iter().enumerate() {
            assert_eq!(
                postcard::to_allocvec(&state).expect("encode"),
                [index as u8],
                "{state:?}"
            );
        }
        let states_v2 = [
            ReceiptStateV2::Accepted,
            ReceiptStateV2::Delivered,
            ReceiptStateV2::Acked,
            ReceiptStateV2::Expired,
            ReceiptStateV2::Undeliverable,
            ReceiptStateV2::Superseded,
            ReceiptStateV2::Cancelled,
            ReceiptStateV2::Answered,
            ReceiptStateV2::Declined,
            ReceiptStateV2::Missed,
        ];
        for (index, state) in states_v2.into_iter().enumerate() {
            assert_eq!(
                postcard::to_allocvec(&state).expect("encode"),
                [index as u8],
                "{state:?}"
            );
        }
    }

    #[test]
    fn a_call_outcome_receipt_is_a_version_2_row_and_the_others_stay_version_1() {
        let mut r = receipt();
        assert_eq!(
            encode::<ReceiptRow>(&r)[0],
            0,
            "version 1 rows stay readable by older binaries"
        );
        r.state = ReceiptState::Answered;
        let row = encode::<ReceiptRow>(&r);
        assert_eq!(row[0], 1);
        assert_eq!(
            postcard::from_bytes::<ReceiptRow>(&row)
                .expect("decode")
                .into_record(),
            r
        );
    }

    #[test]
    fn a_call_reads_back_as_written() {
        let call = CallRecord {
            call_id: "c1".into(),
            invite: vec![1, 2, 3],
            placed_at_ms: 10,
            deadline_ms: 30_010,
            steps: vec![CallStepRecord {
                due_ms: 10,
                stop_earlier: true,
                device_ids: vec!["a".into()],
                started_ms: 10,
            }],
            callees: vec![CalleeRecord {
                device_id: "a".into(),
                step: 0,
                seq: 7,
                placed: true,
                rang: true,
                outcome: Some((ReceiptState::Declined, 20)),
            }],
            end: Some(CallEnd::Answered {
                device_id: "a".into(),
                at_ms: 25,
            }),
            hung_up_at_ms: 99,
        };
        let row = postcard::to_allocvec(&CallRow::from_record(&call)).expect("encode");
        assert_eq!(
            postcard::from_bytes::<CallRow>(&row)
                .expect("decode")
                .into_record(),
            call
        );
    }

    #[test]
    fn rows_round_trip() {
        assert_eq!(decode::<DeviceRow>(&versioned(0, LEGACY_DEVICE)), device());
        assert_eq!(decode::<PushRow>(&versioned(0, LEGACY_PUSH)), push());
        assert_eq!(decode::<ReceiptRow>(&versioned(0, LEGACY_RECEIPT)), receipt());
        assert_eq!(decode::<RequestRow>(&versioned(0, LEGACY_REQUEST)), request());
        assert_eq!(decode::<ApiKeyRow>(&encode::<ApiKeyRow>(&api_key())), api_key());
    }

    /// The public and stored enums map variant to same-named variant, both ways.
    #[test]
    fn enums_map_by_name() {
        for kind in [PushKind::Message, PushKind::CallInvite, PushKind::CallCancel] {
            let stored = PushKindV1::from(kind);
            assert_eq!(format!("{kind:?}"), format!("{stored:?}"));
            assert_eq!(PushKind::from(stored), kind);
        }
        use ReceiptState::*;
        for state in [
            Accepted,
            Delivered,
            Acked,
            Expired,
            Undeliverable,
            Superseded,
            Cancelled,
        ] {
            let stored = ReceiptStateV1::try_from(state).expect("a version 1 state");
            assert_eq!(format!("{state:?}"), format!("{stored:?}"));
            assert_eq!(ReceiptState::from(stored), state);
        }
    }
}
