//! Raw bytes into the server's frame decoder, with the pre-auth and post-auth caps: it must
//! never panic, never buffer a frame beyond the cap, and never report a frame larger than it.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use presenced::codec::{CodecError, DelimitedCodec};
use presenced::pb;
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    for cap in [4096usize, 65536] {
        let mut codec = DelimitedCodec::<pb::ClientFrame, pb::ServerFrame>::new(cap);
        let mut buf = BytesMut::from(data);
        loop {
            let before = buf.len();
            match codec.decode(&mut buf) {
                Ok(Some(_)) => assert!(buf.len() < before, "a frame consumes bytes"),
                Ok(None) => break,
                Err(CodecError::FrameTooLarge { len, max }) => {
                    assert!(len > max as u64);
                    break;
                }
                Err(_) => break,
            }
        }
        // Vec growth may double, but never follows a hostile prefix past the cap.
        assert!(buf.capacity() <= 2 * data.len().max(cap + 16), "no reservation beyond the cap");
    }
});
