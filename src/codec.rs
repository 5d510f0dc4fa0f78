//! Bytes ⇄ frames: protobuf's standard delimited format, each message preceded by its length as
//! a varint. This is the only place where raw bytes from a socket become a message. The length
//! prefix is checked against the frame cap as soon as enough of it has arrived to exceed the cap,
//! and no buffer is ever reserved for an announced body, so a hostile prefix costs nothing. A partial frame
//! is `Ok(None)`, never an error. No I/O happens here.

use std::marker::PhantomData;

use bytes::{Buf, Bytes, BytesMut};
use prost::Message;
use tokio_util::codec::{Decoder, Encoder};

/// Longest varint that can encode a `u64`.
const MAX_VARINT_BYTES: usize = 10;

/// Why a stream of bytes is not a valid frame stream. Every variant ends the connection.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The length prefix announces more than the cap in force.
    #[error("frame of {len} bytes exceeds the {max}-byte cap")]
    FrameTooLarge {
        /// What the prefix announced (a lower bound when the prefix was cut short).
        len: u64,
        /// The cap in force.
        max: usize,
    },
    /// The length prefix is not a valid varint.
    #[error("malformed length prefix")]
    BadLengthPrefix,
    /// The body is not a valid protobuf message of the expected type.
    #[error("malformed frame: {0}")]
    Decode(#[from] prost::DecodeError),
    /// The socket failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// Outcome of reading a length prefix from the front of a buffer.
#[derive(Debug, PartialEq, Eq)]
enum Prefix {
    /// Not all of it has arrived yet.
    Incomplete,
    /// The body length and how many bytes the prefix took.
    Complete { len: u64, prefix_bytes: usize },
}

/// Reads a varint length prefix, failing as soon as the value provably exceeds `max`.
fn read_prefix(src: &[u8], max: usize) -> Result<Prefix, CodecError> {
    let mut value: u64 = 0;
    for (i, &byte) in src.iter().take(MAX_VARINT_BYTES).enumerate() {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if value > max as u64 {
            return Err(CodecError::FrameTooLarge { len: value, max });
        }
        if byte & 0x80 == 0 {
            if i > 0 && byte == 0 {
                // A non-minimal encoding such as 0x80 0x00: legal for protobuf readers but never
                // produced by a real encoder; refusing it keeps one canonical form on the wire.
                return Err(CodecError::BadLengthPrefix);
            }
            return Ok(Prefix::Complete {
                len: value,
                prefix_bytes: i + 1,
            });
        }
    }
    if src.len() >= MAX_VARINT_BYTES {
        return Err(CodecError::BadLengthPrefix);
    }
    Ok(Prefix::Incomplete)
}

/// Delimited protobuf codec: decodes `In` messages, encodes `Out` messages, with a frame cap that
/// the connection raises once the session is authenticated.
#[derive(Debug)]
pub struct DelimitedCodec<In, Out> {
    /// Largest body accepted, in bytes.
    max_frame_bytes: usize,
    _types: PhantomData<fn(Out) -> In>,
}

impl<In, Out> DelimitedCodec<In, Out> {
    /// A codec that refuses frames longer than `max_frame_bytes`.
    pub fn new(max_frame_bytes: usize) -> Self {
        DelimitedCodec {
            max_frame_bytes,
            _types: PhantomData,
        }
    }

    /// Changes the cap (4 KiB before authentication, 64 KiB after, by default).
    pub fn set_max_frame_bytes(&mut self, max_frame_bytes: usize) {
        self.max_frame_bytes = max_frame_bytes;
    }

    /// The cap in force.
    pub fn max_frame_bytes(&self) -> usize {
        self.max_frame_bytes
    }
}

impl<In: Message + Default, Out> Decoder for DelimitedCodec<In, Out> {
    type Item = In;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, CodecError> {
        let (len, prefix_bytes) = match read_prefix(src, self.max_frame_bytes)? {
            Prefix::Incomplete => return Ok(None),
            Prefix::Complete { len, prefix_bytes } => (len as usize, prefix_bytes),
        };
        if src.len() < prefix_bytes + len {
            // No reservation for the announced body: a peer that announces a frame and stalls
            // costs only the bytes it actually sent.
            return Ok(None);
        }
        src.advance(prefix_bytes);
        let body = src.split_to(len).freeze();
        Ok(Some(In::decode(body)?))
    }
}

impl<In, Out: Message> Encoder<Out> for DelimitedCodec<In, Out> {
    type Error = CodecError;

    fn encode(&mut self, item: Out, dst: &mut BytesMut) -> Result<(), CodecError> {
        let len = item.encoded_len();
        dst.reserve(len + prost::length_delimiter_len(len));
        item.encode_length_delimited(dst)
            .map_err(|e| CodecError::Io(std::io::Error::other(e)))
    }
}

/// Encodes one message with its length prefix, ready to be written to any number of sockets.
pub fn encode_delimited<M: Message>(message: &M) -> Bytes {
    let len = message.encoded_len();
    let mut buf = BytesMut::with_capacity(len + prost::length_delimiter_len(len));
    prost::encoding::encode_varint(len as u64, &mut buf);
    // Encoding into a buffer reserved for `encoded_len` bytes cannot run out of space.
    message.encode_raw(&mut buf);
    buf.freeze()
}

/// Writes a raw length prefix (for tests and tools that build frames by hand).
pub fn put_length_prefix(dst: &mut BytesMut, len: u64) {
    dst.reserve(MAX_VARINT_BYTES);
    prost::encoding::encode_varint(len, dst);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb;

    type ServerSide = DelimitedCodec<pb::ClientFrame, pb::ServerFrame>;

    fn ping(id: u64) -> pb::ClientFrame {
        pb::ClientFrame {
            request_id: id,
            body: Some(pb::client_frame::Body::Ping(pb::Ping {})),
        }
    }

    #[test]
    fn decodes_frames_split_anywhere() {
        let mut wire = BytesMut::new();
        for id in 1..=3 {
            wire.extend_from_slice(&encode_delimited(&ping(id)));
        }
        for split in 0..wire.len() {
            let mut codec = ServerSide::new(4096);
            let mut buf = BytesMut::from(&wire[..split]);
            let mut got = Vec::new();
            while let Some(f) = codec.decode(&mut buf).unwrap() {
                got.push(f.request_id);
            }
            buf.extend_from_slice(&wire[split..]);
            while let Some(f) = codec.decode(&mut buf).unwrap() {
                got.push(f.request_id);
            }
            assert_eq!(got, vec![1, 2, 3], "split at {split}");
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn oversized_prefix_is_refused_before_reserving() {
        let mut codec = ServerSide::new(4096);
        let mut buf = BytesMut::new();
        put_length_prefix(&mut buf, 4097);
        let capacity_before = buf.capacity();
        let err = codec.decode(&mut buf).unwrap_err();
        assert!(matches!(
            err,
            CodecError::FrameTooLarge {
                len: 4097,
                max: 4096
            }
        ));
        assert_eq!(buf.capacity(), capacity_before);
    }

    #[test]
    fn an_announced_body_reserves_nothing_until_it_arrives() {
        let mut codec = ServerSide::new(4096);
        let mut buf = BytesMut::with_capacity(8);
        put_length_prefix(&mut buf, 4000);
        buf.extend_from_slice(&[0x08]);
        let capacity_before = buf.capacity();
        assert!(codec.decode(&mut buf).unwrap().is_none());
        assert_eq!(buf.capacity(), capacity_before);
    }

    #[test]
    fn oversized_prefix_is_refused_from_its_first_bytes() {
        // 0xff 0xff already means at least 16383: no need to wait for the rest.
        let mut codec = ServerSide::new(4096);
        let mut buf = BytesMut::from(&[0xff_u8, 0xff][..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(CodecError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn endless_varint_is_refused() {
        let mut codec = ServerSide::new(usize::MAX);
        let mut buf = BytesMut::from(&[0x80_u8; 11][..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(CodecError::BadLengthPrefix)
        ));
    }

    #[test]
    fn non_minimal_prefix_is_refused() {
        let mut codec = ServerSide::new(4096);
        let mut buf = BytesMut::from(&[0x80_u8, 0x00][..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(CodecError::BadLengthPrefix)
        ));
    }

    #[test]
    fn garbage_body_is_a_decode_error() {
        let mut codec = ServerSide::new(4096);
        let mut buf = BytesMut::from(&[3_u8, 0xff, 0xff, 0xff][..]);
        assert!(matches!(codec.decode(&mut buf), Err(CodecError::Decode(_))));
    }

    #[test]
    fn empty_frame_decodes_to_default() {
        let mut codec = ServerSide::new(4096);
        let mut buf = BytesMut::from(&[0_u8][..]);
        let frame = codec.decode(&mut buf).unwrap().unwrap();
        assert_eq!(frame, pb::ClientFrame::default());
    }

    #[test]
    fn encoder_matches_encode_delimited() {
        let mut codec = DelimitedCodec::<pb::ServerFrame, pb::ClientFrame>::new(4096);
        let mut buf = BytesMut::new();
        codec.encode(ping(9), &mut buf).unwrap();
        assert_eq!(&buf[..], &encode_delimited(&ping(9))[..]);
    }
}
