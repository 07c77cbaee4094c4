//! The frame decoder (`push_proto::frame::decode`) on arbitrary bytes, as both ends use it.
//!
//! Properties, beyond "never panics":
//! - feeding the bytes in arbitrary chunks decodes the same frames as feeding them at once (a
//!   TCP read boundary changes nothing);
//! - `Ok(None)` consumes nothing and a decoded frame consumes exactly its header and payload;
//! - every decoded frame re-encodes, and decoding that gives the same frame (round trip).
#![no_main]

use bytes::{BufMut, BytesMut};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use push_proto::{
    device::{ClientFrame, ServerFrame},
    frame::{self, DEFAULT_MAX_FRAME, FrameError, HEADER_LEN},
};

/// What decoding a buffer to its end gave: the frames, then how it stopped.
#[derive(Debug, PartialEq)]
struct Outcome<M> {
    frames: Vec<M>,
    error: Option<FrameError>,
}

fn decode_whole<M: Message + Default + PartialEq + std::fmt::Debug>(data: &[u8], max: usize) -> Outcome<M> {
    let mut buf = BytesMut::from(data);
    let mut frames = Vec::new();
    loop {
        let before = buf.len();
        match frame::decode::<M>(&mut buf, max) {
            Ok(Some(f)) => {
                let announced =
                    u32::from_be_bytes(data[data.len() - before..][..HEADER_LEN].try_into().unwrap());
                assert_eq!(before - buf.len(), HEADER_LEN + announced as usize);
                round_trip(&f);
                frames.push(f);
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "an incomplete frame consumed bytes");
                return Outcome { frames, error: None };
            }
            Err(e) => {
                return Outcome {
                    frames,
                    error: Some(e),
                };
            }
        }
    }
}

fn decode_chunked<M: Message + Default>(data: &[u8], cuts: &[u8], max: usize) -> Outcome<M> {
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut rest = data;
    let mut cuts = cuts.iter().cycle();
    while !rest.is_empty() {
        let n = (*cuts.next().unwrap_or(&1) as usize).clamp(1, rest.len());
        buf.put_slice(&rest[..n]);
        rest = &rest[n..];
        loop {
            match frame::decode::<M>(&mut buf, max) {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(e) => {
                    return Outcome {
                        frames,
                        error: Some(e),
                    };
                }
            }
        }
    }
    Outcome { frames, error: None }
}

fn round_trip<M: Message + Default + PartialEq + std::fmt::Debug>(f: &M) {
    let mut wire = BytesMut::new();
    // No limit: a re-encoding need not have the length of the bytes it came from (defaults
    // dropped, repeated fields packed), and the limit was the decoder's business.
    frame::encode(f, &mut wire, usize::MAX).expect("no limit");
    let again = frame::decode::<M>(&mut wire, usize::MAX)
        .expect("a re-encoded frame decodes")
        .expect("a re-encoded frame is whole");
    assert_eq!(&again, f, "round trip changed the frame");
    assert!(wire.is_empty());
}

fuzz_target!(|input: &[u8]| {
    // First byte: frame limit (small limits reach TooLarge often); second: chunking seed length.
    let Some((&limit, rest)) = input.split_first() else {
        return;
    };
    let max = if limit & 0x80 == 0 {
        DEFAULT_MAX_FRAME
    } else {
        usize::from(limit & 0x7f) * 8
    };
    let cut_len = rest.first().map_or(0, |b| usize::from(b & 0x0f));
    let (cuts, data) = rest.split_at(cut_len.min(rest.len()));

    let whole = decode_whole::<ClientFrame>(data, max);
    assert_eq!(
        whole,
        decode_chunked::<ClientFrame>(data, cuts, max),
        "chunking changed ClientFrames"
    );
    let whole = decode_whole::<ServerFrame>(data, max);
    assert_eq!(
        whole,
        decode_chunked::<ServerFrame>(data, cuts, max),
        "chunking changed ServerFrames"
    );
});
