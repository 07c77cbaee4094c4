//! Length-delimited framing: a 4-byte big-endian length, then one protobuf message.
//!
//! Decoding is a pure function over a buffer so it can be fuzzed and unit-tested without sockets.
//! "Not enough bytes yet" is `Ok(None)`, not an error.

use bytes::{Buf, BufMut, BytesMut};
use prost::Message;

/// Bytes of the length prefix.
pub const HEADER_LEN: usize = 4;

/// Maximum frame payload before the hello has negotiated one. Also the default limit.
pub const DEFAULT_MAX_FRAME: usize = 64 * 1024;

/// Why a frame could not be decoded. Every variant is fatal for the session.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    /// The length prefix announces more than the allowed maximum.
    #[error("frame of {len} bytes exceeds the {max} byte limit")]
    TooLarge {
        /// Announced payload length.
        len: usize,
        /// Limit in force.
        max: usize,
    },
    /// The payload is not a valid protobuf message of the expected type.
    #[error("malformed frame: {0}")]
    Malformed(#[from] prost::DecodeError),
}

/// Try to take one frame of type `M` off the front of `buf`.
///
/// Returns `Ok(None)` when `buf` does not yet hold a whole frame; bytes stay in `buf`. A header
/// announcing more than `max` bytes fails at once, before the payload arrives, so a peer cannot
/// make the receiver buffer it.
pub fn decode<M: Message + Default>(buf: &mut BytesMut, max: usize) -> Result<Option<M>, FrameError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    if buf.len() < HEADER_LEN + len {
        return Ok(None);
    }
    buf.advance(HEADER_LEN);
    let payload = buf.split_to(len);
    Ok(Some(M::decode(payload.freeze())?))
}

/// Append `msg` as one frame to `out`.
///
/// Fails if the encoded message exceeds `max`, so an oversized push is refused at the sender
/// rather than killing the receiving session.
pub fn encode<M: Message>(msg: &M, out: &mut impl BufMut, max: usize) -> Result<(), FrameError> {
    let len = msg.encoded_len();
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    out.put_u32(len as u32);
    msg.encode(out).expect("BufMut grows as needed");
    Ok(())
}

/// Size of `msg` once framed.
pub fn framed_len<M: Message>(msg: &M) -> usize {
    HEADER_LEN + msg.encoded_len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{ClientFrame, Heartbeat, ServerFrame, client_frame, server_frame};

    fn heartbeat(nonce: u64) -> ServerFrame {
        ServerFrame {
            kind: Some(server_frame::Kind::Heartbeat(Heartbeat { nonce })),
        }
    }

    #[test]
    fn round_trip_and_partial_input() {
        let mut wire = BytesMut::new();
        encode(&heartbeat(7), &mut wire, DEFAULT_MAX_FRAME).unwrap();
        encode(&heartbeat(8), &mut wire, DEFAULT_MAX_FRAME).unwrap();
        let whole = wire.clone();
        // Feed byte by byte: nothing decodes until a frame is complete.
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in whole.iter() {
            buf.put_u8(*b);
            while let Some(f) = decode::<ServerFrame>(&mut buf, DEFAULT_MAX_FRAME).unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, vec![heartbeat(7), heartbeat(8)]);
        assert!(buf.is_empty());
    }

    #[test]
    fn oversized_header_rejected_before_payload() {
        let mut buf = BytesMut::from(&(1_000_000u32).to_be_bytes()[..]);
        assert_eq!(
            decode::<ClientFrame>(&mut buf, 1024),
            Err(FrameError::TooLarge {
                len: 1_000_000,
                max: 1024
            })
        );
    }

    #[test]
    fn oversized_message_not_encoded() {
        let msg = ClientFrame {
            kind: Some(client_frame::Kind::NetworkChange(crate::device::NetworkChange {
                ssid: "x".repeat(100),
                path_lost: false,
            })),
        };
        let mut out = BytesMut::new();
        assert!(matches!(
            encode(&msg, &mut out, 10),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(out.is_empty());
    }

    #[test]
    fn garbage_payload_is_malformed() {
        let mut buf = BytesMut::new();
        buf.put_u32(3);
        buf.put_slice(&[0xff, 0xff, 0xff]);
        assert!(matches!(
            decode::<ClientFrame>(&mut buf, 1024),
            Err(FrameError::Malformed(_))
        ));
    }
}
