//! What a webhook receiver parses from the network: `verify` over arbitrary `webhook-id`,
//! `webhook-timestamp` and `webhook-signature` header values and bodies, with raw and
//! `whsec_` secrets. Nothing panics; a forged input never verifies; and the input signed
//! properly (with either key of a rotation) always does, while any change to the body does
//! not.
#![no_main]

use std::collections::BTreeMap;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use presenced::webhooks::{decode_secret, sign, verify, SignedHeaders};

#[derive(Debug, Arbitrary)]
struct Input {
    id: String,
    timestamp: String,
    signature: String,
    body: Vec<u8>,
    now: u64,
    tolerance: u16,
    flip: usize,
}

const RAW: &str = "a-raw-secret-of-some-length";
const WHSEC: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fuzz_target!(|input: Input| {
    let secrets = BTreeMap::from([
        ("k1".to_string(), RAW.to_string()),
        ("k2".to_string(), WHSEC.to_string()),
    ]);
    let tolerance = u64::from(input.tolerance);
    // Arbitrary headers: must not panic, and must not verify unless they happen to carry a
    // true signature (impossible to guess).
    let forged = verify(
        &secrets,
        SignedHeaders {
            id: &input.id,
            timestamp: &input.timestamp,
            signature: &input.signature,
        },
        &input.body,
        input.now,
        tolerance,
    );
    if forged.is_ok() {
        let ts: u64 = input.timestamp.trim().parse().unwrap();
        let genuine = [RAW, WHSEC].iter().any(|s| {
            let key = decode_secret(s).unwrap();
            input
                .signature
                .split(' ')
                .any(|sig| sig == sign(&key, &input.id, ts, &input.body))
        });
        assert!(genuine, "a forged signature verified: {input:?}");
    }
    if input.id.is_empty() || input.id.contains(['\r', '\n']) {
        return;
    }
    // The genuine signature with each key verifies at its own time...
    let now = input.now % 4_000_000_000;
    for secret in [RAW, WHSEC] {
        let key = decode_secret(secret).unwrap();
        let signature = sign(&key, &input.id, now, &input.body);
        let ts = now.to_string();
        let headers = SignedHeaders {
            id: &input.id,
            timestamp: &ts,
            signature: &signature,
        };
        assert!(
            verify(&secrets, headers, &input.body, now, tolerance).is_ok(),
            "a genuine signature failed: {input:?}"
        );
        // ...and not once the body changes, or beyond the tolerance.
        let mut body = input.body.clone();
        if body.is_empty() {
            body.push(0);
        } else {
            let i = input.flip % body.len();
            body[i] ^= 1;
        }
        assert!(verify(&secrets, headers, &body, now, tolerance).is_err());
        let late = now + tolerance + 1;
        assert!(verify(&secrets, headers, &input.body, late, tolerance).is_err());
    }
});
