//! Encode → decode round trip of arbitrary frames: any client or server frame that protobuf
//! accepts, once encoded with its length prefix, decodes through the codec to the same frame,
//! whole or split at any point.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use presenced::codec::{encode_delimited, DelimitedCodec};
use presenced::pb;
use prost::Message;
use tokio_util::codec::Decoder;

fn round_trip<M: Message + Default + PartialEq>(frame: M, split: usize) {
    let wire = encode_delimited(&frame);
    let mut codec = DelimitedCodec::<M, M>::new(1 << 20);
    let split = split % (wire.len() + 1);
    let mut buf = BytesMut::from(&wire[..split]);
    let early = codec.decode(&mut buf).expect("a prefix of a valid frame is not an error");
    let decoded = match early {
        Some(f) => f,
        None => {
            buf.extend_from_slice(&wire[split..]);
            codec.decode(&mut buf).expect("valid frame").expect("complete frame")
        }
    };
    assert!(buf.is_empty());
    assert!(decoded == frame, "round trip changed the frame");
}

fuzz_target!(|data: &[u8]| {
    let split = data.first().copied().unwrap_or(0) as usize;
    let body = data.get(1..).unwrap_or(&[]);
    if let Ok(frame) = pb::ClientFrame::decode(body) {
        round_trip(frame, split);
    }
    if let Ok(frame) = pb::ServerFrame::decode(body) {
        round_trip(frame, split);
    }
});
