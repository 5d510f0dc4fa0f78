//! The same bytes fed whole and in arbitrary chunks must decode to the same frames and the same
//! final outcome: the decoder's partial-frame state is independent of how the socket splits reads.
#![no_main]

use arbitrary::Arbitrary;
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use presenced::codec::DelimitedCodec;
use presenced::pb;
use tokio_util::codec::Decoder;

#[derive(Debug, Arbitrary)]
struct Input {
    data: Vec<u8>,
    cuts: Vec<u8>,
}

type Codec = DelimitedCodec<pb::ClientFrame, pb::ServerFrame>;

/// Decodes everything available; returns the frames and whether it ended in an error.
fn drain(codec: &mut Codec, buf: &mut BytesMut, out: &mut Vec<pb::ClientFrame>) -> bool {
    loop {
        match codec.decode(buf) {
            Ok(Some(f)) => out.push(f),
            Ok(None) => return false,
            Err(_) => return true,
        }
    }
}

fuzz_target!(|input: Input| {
    let mut whole = Vec::new();
    let whole_failed = drain(&mut Codec::new(4096), &mut BytesMut::from(&input.data[..]), &mut whole);

    let mut codec = Codec::new(4096);
    let mut buf = BytesMut::new();
    let mut chunked = Vec::new();
    let mut failed = false;
    let mut rest = &input.data[..];
    let mut cuts = input.cuts.iter();
    while !rest.is_empty() && !failed {
        let n = (cuts.next().copied().unwrap_or(255) as usize).clamp(1, rest.len());
        buf.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        failed = drain(&mut codec, &mut buf, &mut chunked);
    }
    assert_eq!(failed, whole_failed);
    if !failed {
        assert_eq!(chunked, whole);
    } else {
        // Chunking may stop earlier, never later, and agrees on what it decoded.
        assert_eq!(&whole[..chunked.len()], &chunked[..]);
    }
});
