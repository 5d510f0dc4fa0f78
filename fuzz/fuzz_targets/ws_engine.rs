//! The WebSocket engine (`presenced::ws::engine`) against arbitrary bytes, cut into arbitrary
//! reads: the upgrade parser either answers, refuses or asks for more, never past its request
//! cap; once upgraded (the input may start with a valid upgrade request so the fuzzer reaches
//! the framing), every message that comes out respects the frame cap in force (the pre-auth cap,
//! raised part-way as Connect would), errors end the connection, and answering (send, close)
//! never panics whatever state the client's bytes left the engine in. Each message is also
//! decoded as the connection decodes it (`presenced::ws::decode_message`): it never panics, and
//! what it accepts protobuf accepts too (it only refuses more, with a clearer reason).
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use presenced::ws::engine::{
    Engine, EngineError, Incoming, Upgrade, UpgradeStep, MAX_REQUEST_BYTES,
};
use presenced::pb;
use presenced::ws::{decode_message, WebSocketConfig};

const UPGRADE: &[u8] = b"GET /v1/ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: presence.v1\r\nOrigin: https://app.example\r\n\r\n";
const PRE_AUTH: usize = 256;
const POST_AUTH: usize = 4096;

#[derive(Debug, Arbitrary)]
struct Input {
    with_upgrade: bool,
    restrict_origin: bool,
    data: Vec<u8>,
    cuts: Vec<u8>,
    /// After this many messages the cap is raised.
    raise_after: u8,
}

/// `decode_message` on one message's bytes: no panic, a reason on refusal, and nothing
/// accepted that protobuf itself refuses.
fn check_decode(bytes: &[u8]) {
    let message = bytes::Bytes::copy_from_slice(bytes);
    match decode_message(message.clone()) {
        Ok(frame) => {
            let again = <pb::ClientFrame as prost::Message>::decode(message)
                .expect("decode_message accepted what protobuf refuses");
            assert_eq!(frame, again);
        }
        Err(reason) => assert!(!reason.is_empty()),
    }
}

/// Reads every message available; `false` once the connection is over.
fn drain(engine: &mut Engine, cap: &mut usize, seen: &mut usize, raise_after: usize) -> bool {
    loop {
        match engine.read_message() {
            Ok(Some(Incoming::Binary(bytes))) => {
                check_decode(&bytes);
                assert!(
                    bytes.len() <= *cap,
                    "{} bytes past the {cap}-byte cap",
                    bytes.len()
                );
                *seen += 1;
                if *seen == raise_after {
                    *cap = POST_AUTH;
                    engine.set_max_message(POST_AUTH);
                }
                let _ = engine.send(bytes);
            }
            Ok(Some(Incoming::Text)) => {
                engine.close(4003, "text");
                return false;
            }
            Ok(Some(Incoming::Control)) => {}
            Ok(Some(Incoming::Closed)) | Err(EngineError::Closed) => return false,
            Err(EngineError::TooLarge { max, .. }) => {
                assert_eq!(max, *cap);
                engine.close(4004, "too large");
                return false;
            }
            Err(EngineError::Protocol(_)) => {
                engine.close(4003, "protocol");
                return false;
            }
            Ok(None) => {
                assert!(
                    engine.wants_input(),
                    "the engine asks for bytes only with none left"
                );
                return true;
            }
        }
    }
}

fuzz_target!(|input: Input| {
    let config = WebSocketConfig {
        allowed_origins: if input.restrict_origin {
            vec!["https://app.example".into()]
        } else {
            Vec::new()
        },
        ..Default::default()
    };
    // The message decoder straight on the input too (most inputs never make a valid upgrade).
    check_decode(&input.data);
    let mut bytes = Vec::new();
    if input.with_upgrade {
        bytes.extend_from_slice(UPGRADE);
    }
    bytes.extend_from_slice(&input.data);
    let mut rest = &bytes[..];
    let mut cuts = input.cuts.iter();
    let mut next_chunk = |rest: &mut &[u8]| {
        let n = match cuts.next() {
            Some(&c) => usize::from(c).max(1),
            None => rest.len(),
        }
        .min(rest.len());
        let (chunk, tail) = rest.split_at(n);
        *rest = tail;
        chunk.to_vec()
    };

    let mut upgrade = Upgrade::default();
    let mut fed = 0usize;
    let mut engine = loop {
        if rest.is_empty() {
            return;
        }
        let chunk = next_chunk(&mut rest);
        fed += chunk.len();
        match upgrade.feed(&chunk, &config, PRE_AUTH) {
            UpgradeStep::NeedMore => assert!(fed <= MAX_REQUEST_BYTES),
            UpgradeStep::Refused(refusal) => {
                assert!((400..500).contains(&refusal.status));
                let _ = refusal.response();
                return;
            }
            UpgradeStep::Upgraded(engine) => break *engine,
        }
    };
    let mut out = Vec::new();
    engine.take_output(&mut out);
    assert!(out.starts_with(b"HTTP/1.1 101"));
    let mut cap = PRE_AUTH;
    let mut seen = 0usize;
    let raise_after = usize::from(input.raise_after).max(1);
    if !drain(&mut engine, &mut cap, &mut seen, raise_after) {
        engine.take_output(&mut out);
        return;
    }
    while !rest.is_empty() {
        let chunk = next_chunk(&mut rest);
        engine.feed(&chunk);
        let open = drain(&mut engine, &mut cap, &mut seen, raise_after);
        out.clear();
        engine.take_output(&mut out);
        if !open {
            break;
        }
    }
    engine.close(1000, "bye");
    engine.take_output(&mut out);
});
