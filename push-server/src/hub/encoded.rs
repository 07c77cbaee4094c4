//! Pushes encoded once: the id and body once per send, the sequence number once per recipient,
//! and the frame around it with no decoding when a session writes it.
//!
//! A fan-out to a group queues the same push for every member, differing only in `Push.seq`
//! (field 1). Protobuf encoders write fields in field-number order and leave out a zero `seq`,
//! so the encoding of a numbered push is the `seq` field followed by the encoding of the same
//! push without one; and a `ServerFrame` holding a push is the `push` field's key (field 2),
//! its length, and the push's encoding. Each is byte-identical to what prost writes for the
//! structs (the tests check it), so devices see no difference.

use std::sync::Arc;

use bytes::BufMut;
use prost::{
    Message as _,
    encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len},
};
use push_proto::{
    device::{Push, push},
    frame::FrameError,
};

use crate::store::StoredPush;

/// `Push.seq`.
const SEQ_FIELD: u32 = 1;
/// `ServerFrame.push`.
const PUSH_FIELD: u32 = 2;

/// The encoding of `Push { seq: 0, id, body }`: what every recipient of a send shares.
pub(super) fn unnumbered(id: &str, body: push::Body) -> Arc<[u8]> {
    Push {
        seq: 0,
        id: id.into(),
        body: Some(body),
    }
    .encode_to_vec()
    .into()
}

/// The encoding of the push `unnumbered` (see [`unnumbered`]) with sequence number `seq`.
pub(super) fn numbered(seq: u64, unnumbered: &[u8]) -> Vec<u8> {
    if seq == 0 {
        // proto3 leaves a zero out.
        return unnumbered.to_vec();
    }
    let mut out = Vec::with_capacity(key_len(SEQ_FIELD) + encoded_len_varint(seq) + unnumbered.len());
    encode_key(SEQ_FIELD, WireType::Varint, &mut out);
    encode_varint(seq, &mut out);
    out.extend_from_slice(unnumbered);
    out
}

/// A queued push as a session writes it: its stored encoding, shared with the outbox (no copy,
/// no decoding).
#[derive(Debug, Clone)]
pub struct EncodedPush(Arc<StoredPush>);

impl EncodedPush {
    pub(super) fn new(stored: Arc<StoredPush>) -> Self {
        Self(stored)
    }

    /// The push's sequence number.
    pub fn seq(&self) -> u64 {
        self.0.seq
    }

    /// Append the `ServerFrame { push }` frame holding this push to `out`, as
    /// [`push_proto::frame::encode`] would. Fails, writing nothing, over `max` bytes.
    pub fn write_frame(&self, out: &mut impl BufMut, max: usize) -> Result<(), FrameError> {
        let push = &self.0.encoded;
        let len = key_len(PUSH_FIELD) + encoded_len_varint(push.len() as u64) + push.len();
        if len > max {
            return Err(FrameError::TooLarge { len, max });
        }
        out.put_u32(len as u32);
        encode_key(PUSH_FIELD, WireType::LengthDelimited, out);
        encode_varint(push.len() as u64, out);
        out.put_slice(push);
        Ok(())
    }

    /// `push` as if queued for device `d0`: for what drives the session core without a hub
    /// (its tests, the fuzz target).
    pub fn of(push: &Push) -> Self {
        Self(Arc::new(StoredPush {
            device_id: "d0".into(),
            seq: push.seq,
            id: push.id.clone(),
            kind: crate::store::PushKind::Message,
            collapse_key: String::new(),
            expires_at_ms: 0,
            encoded: push.encode_to_vec(),
        }))
    }

    /// The push, decoded (tests look inside what a session wrote).
    #[cfg(test)]
    pub(crate) fn decode(&self) -> Push {
        Push::decode(&self.0.encoded[..]).expect("queued pushes decode")
    }
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use push_proto::{
        device::{CallCancel, CallInvite, Message, ServerFrame, server_frame},
        frame,
    };

    use super::*;
    use crate::store::PushKind;

    fn bodies() -> Vec<push::Body> {
        vec![
            push::Body::Message(Message {
                title: "Code blue".into(),
                body: "Ward 4B, bed 12 ".repeat(40),
                data: vec![0, 1, 2, 255],
                priority: 2,
                collapse_key: "ward-4b".into(),
                sent_at_ms: 1_764_000_000_000,
                expires_at_ms: 1_764_000_060_000,
                sender: "Nurse call".into(),
            }),
            push::Body::Message(Message::default()),
            push::Body::CallInvite(CallInvite {
                call_id: "c1".into(),
                call_uuid: "8c1c6d0e-0000-4000-8000-000000000000".into(),
                caller_name: "Dr. Chen".into(),
                caller_handle: "4411".into(),
                video: true,
                created_at_ms: 5,
                ring_deadline_ms: 30_005,
            }),
            push::Body::CallCancel(CallCancel {
                call_id: "c1".into(),
                call_uuid: "u".into(),
                reason: 3,
            }),
        ]
    }

    fn queued(seq: u64, id: &str, body: &push::Body) -> EncodedPush {
        EncodedPush::new(Arc::new(StoredPush {
            device_id: "d0".into(),
            seq,
            id: id.into(),
            kind: PushKind::Message,
            collapse_key: String::new(),
            expires_at_ms: 0,
            encoded: numbered(seq, &unnumbered(id, body.clone())),
        }))
    }

    #[test]
    fn a_numbered_push_is_what_prost_encodes_for_it() {
        for body in bodies() {
            for id in ["", "m-1", &"x".repeat(300)] {
                let shared = unnumbered(id, body.clone());
                for seq in [0, 1, 127, 128, 1 << 20, (1 << 53) - 1, u64::MAX] {
                    let push = Push {
                        seq,
                        id: id.into(),
                        body: Some(body.clone()),
                    };
                    assert_eq!(numbered(seq, &shared), push.encode_to_vec(), "seq {seq}");
                }
            }
        }
    }

    #[test]
    fn a_push_frame_is_byte_identical_to_the_encoded_server_frame_and_decodes_as_the_push() {
        for body in bodies() {
            for seq in [1, 300, 1 << 40] {
                let p = queued(seq, "m-1", &body);
                let mut ours = BytesMut::new();
                p.write_frame(&mut ours, frame::DEFAULT_MAX_FRAME).expect("fits");
                let push = Push {
                    seq,
                    id: "m-1".into(),
                    body: Some(body.clone()),
                };
                let expected = ServerFrame {
                    kind: Some(server_frame::Kind::Push(push.clone())),
                };
                let mut theirs = BytesMut::new();
                frame::encode(&expected, &mut theirs, frame::DEFAULT_MAX_FRAME).expect("fits");
                assert_eq!(ours, theirs);
                // What a phone reads back.
                let read = frame::decode::<ServerFrame>(&mut ours, frame::DEFAULT_MAX_FRAME);
                assert_eq!(read, Ok(Some(expected)));
                assert_eq!(p.decode(), push);
            }
        }
    }

    #[test]
    fn a_push_frame_over_the_limit_is_refused_and_writes_nothing() {
        let body = push::Body::Message(Message {
            body: "x".repeat(2_000),
            ..Default::default()
        });
        let p = queued(9, "m-1", &body);
        let mut whole = BytesMut::new();
        p.write_frame(&mut whole, usize::MAX).expect("no limit");
        let payload = whole.len() - frame::HEADER_LEN;
        let mut out = BytesMut::new();
        assert_eq!(
            p.write_frame(&mut out, payload - 1),
            Err(FrameError::TooLarge {
                len: payload,
                max: payload - 1
            })
        );
        assert!(out.is_empty());
        p.write_frame(&mut out, payload).expect("exactly at the limit");
        assert_eq!(out, whole);
    }
}
