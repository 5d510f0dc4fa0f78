//! Standard Webhooks signing and verification: secret decoding (`whsec_` + base64, or raw
//! bytes), the `v1,<base64 HMAC-SHA256>` signature of `"{id}.{timestamp}.{body}"`, one per
//! key id so a receiver can rotate keys, and [`verify`] for receivers (`presencectl
//! webhook-listen`, tests, an application's backend written in Rust). Pure functions: no
//! clock (the caller passes `now`), no I/O, nothing logged.

use std::collections::BTreeMap;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// How far `webhook-timestamp` may be from the receiver's clock, either way, before
/// [`verify`] refuses a request: 5 minutes, the Standard Webhooks recommendation. It bounds
/// how long a captured request can be replayed; a retry is signed again with a fresh
/// timestamp, so retries never go stale.
pub const DEFAULT_TOLERANCE_SECS: u64 = 300;

/// The prefix of a Standard Webhooks secret whose remainder is base64.
pub const SECRET_PREFIX: &str = "whsec_";

/// Header names sent with every batch.
pub mod headers {
    /// The batch's id, the same on every retry of it (the receiver's dedup key).
    pub const ID: &str = "webhook-id";
    /// Unix seconds when this attempt was signed.
    pub const TIMESTAMP: &str = "webhook-timestamp";
    /// Space-separated `v1,<base64>` signatures, one per configured key.
    pub const SIGNATURE: &str = "webhook-signature";
    /// Space-separated key ids, in the order of the signatures (not part of the standard; a
    /// hint for receivers that hold several keys).
    pub const KEY_IDS: &str = "webhook-key-ids";
}

/// A secret that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    /// `whsec_` followed by something that is not base64.
    #[error("a whsec_ secret must be base64 after the prefix")]
    NotBase64,
    /// Nothing to sign with.
    #[error("the secret is empty")]
    Empty,
}

/// Why a request did not verify. The text is safe to print: it names no secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// `webhook-id` is empty.
    #[error("missing webhook-id")]
    MissingId,
    /// `webhook-timestamp` is not unix seconds.
    #[error("webhook-timestamp is not a number of seconds: {0:?}")]
    BadTimestamp(String),
    /// The timestamp is older than the tolerance.
    #[error("webhook-timestamp is {0} s old (tolerance {1} s)")]
    TooOld(u64, u64),
    /// The timestamp is further in the future than the tolerance.
    #[error("webhook-timestamp is {0} s in the future (tolerance {1} s)")]
    TooNew(u64, u64),
    /// `webhook-signature` carries no `v1,` signature.
    #[error("webhook-signature has no v1 signature")]
    NoSignature,
    /// No configured secret could be used.
    #[error("no usable secret: {0}")]
    NoSecret(String),
    /// No signature matches any secret (wrong key, or the body or headers were changed).
    #[error("no signature matches")]
    Mismatch,
}

/// The headers [`verify`] checks, as received.
#[derive(Debug, Clone, Copy)]
pub struct SignedHeaders<'a> {
    /// `webhook-id`.
    pub id: &'a str,
    /// `webhook-timestamp`.
    pub timestamp: &'a str,
    /// `webhook-signature`.
    pub signature: &'a str,
}

/// The key bytes of a configured secret: a `whsec_` prefix is stripped and the rest
/// base64-decoded; any other value is used as its raw bytes.
pub fn decode_secret(secret: &str) -> Result<Vec<u8>, SecretError> {
    let key = match secret.strip_prefix(SECRET_PREFIX) {
        Some(b64) => B64.decode(b64.trim()).map_err(|_| SecretError::NotBase64)?,
        None => secret.as_bytes().to_vec(),
    };
    if key.is_empty() {
        return Err(SecretError::Empty);
    }
    Ok(key)
}

fn mac(key: &[u8], id: &str, timestamp: &str, body: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length; the error type exists for fixed-size MACs only.
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts any key length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// One signature, `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, with the decoded
/// `key` (see [`decode_secret`]).
pub fn sign(key: &[u8], id: &str, timestamp: u64, body: &[u8]) -> String {
    let tag = mac(key, id, &timestamp.to_string(), body)
        .finalize()
        .into_bytes();
    format!("v1,{}", B64.encode(tag))
}

/// The `webhook-signature` value (one signature per key, space-separated) and the
/// `webhook-key-ids` value (the key ids in the same order) for decoded `keys`.
pub fn sign_all(
    keys: &[(String, Vec<u8>)],
    id: &str,
    timestamp: u64,
    body: &[u8],
) -> (String, String) {
    let signatures: Vec<String> = keys
        .iter()
        .map(|(_, key)| sign(key, id, timestamp, body))
        .collect();
    let ids: Vec<&str> = keys.iter().map(|(kid, _)| kid.as_str()).collect();
    (signatures.join(" "), ids.join(" "))
}

/// Checks a received request: the timestamp is within `tolerance_secs` of `now_secs` (use
/// [`DEFAULT_TOLERANCE_SECS`]), and at least one `v1` signature of `webhook-signature`
/// matches one of `secrets` (key id → secret as configured). Comparisons run in constant time.
/// Secrets that cannot be decoded are skipped; when none is usable the error says so.
pub fn verify(
    secrets: &BTreeMap<String, String>,
    headers: SignedHeaders<'_>,
    body: &[u8],
    now_secs: u64,
    tolerance_secs: u64,
) -> Result<(), VerifyError> {
    if headers.id.is_empty() {
        return Err(VerifyError::MissingId);
    }
    let timestamp = headers.timestamp.trim();
    let ts: u64 = timestamp
        .parse()
        .map_err(|_| VerifyError::BadTimestamp(headers.timestamp.to_string()))?;
    // Differences, never sums: any u64 the sender puts in the header is compared safely.
    if ts < now_secs && now_secs - ts > tolerance_secs {
        return Err(VerifyError::TooOld(now_secs - ts, tolerance_secs));
    }
    if ts > now_secs && ts - now_secs > tolerance_secs {
        return Err(VerifyError::TooNew(ts - now_secs, tolerance_secs));
    }
    let signatures: Vec<Vec<u8>> = headers
        .signature
        .split_ascii_whitespace()
        .filter_map(|s| s.strip_prefix("v1,"))
        .filter_map(|b64| B64.decode(b64).ok())
        .collect();
    if signatures.is_empty() {
        return Err(VerifyError::NoSignature);
    }
    let mut keys = Vec::with_capacity(secrets.len());
    let mut unusable = Vec::new();
    for (kid, secret) in secrets {
        match decode_secret(secret) {
            Ok(key) => keys.push(key),
            Err(e) => unusable.push(format!("{kid}: {e}")),
        }
    }
    if keys.is_empty() {
        return Err(VerifyError::NoSecret(unusable.join("; ")));
    }
    let mut matched = false;
    for key in &keys {
        let mac = mac(key, headers.id, timestamp, body);
        for signature in &signatures {
            // `verify_slice` compares in constant time; every pair is checked so the time
            // does not depend on which key matched.
            matched |= mac.clone().verify_slice(signature).is_ok();
        }
    }
    if matched {
        Ok(())
    } else {
        Err(VerifyError::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const NEW: &str = "a-raw-secret-of-at-least-16-bytes";

    fn secrets(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn extreme_timestamps_and_tolerances_are_refused_not_overflowed() {
        // Found by the webhook_verify fuzz target: `ts + tolerance` overflowed (a panic in
        // debug builds, a wrapped comparison in release).
        let s = secrets(&[("k1", NEW)]);
        let key = decode_secret(NEW).unwrap();
        for (ts, now, tolerance) in [
            (u64::MAX, 1_700_000_000, 300),
            (1_700_000_000, u64::MAX, 300),
            (u64::MAX, u64::MAX - 1, u64::MAX),
            (0, 1_700_000_000, u64::MAX),
        ] {
            let signature = sign(&key, "msg_1", ts, b"{}");
            let stamp = ts.to_string();
            let headers = SignedHeaders {
                id: "msg_1",
                timestamp: &stamp,
                signature: &signature,
            };
            let within = ts.abs_diff(now) <= tolerance;
            assert_eq!(
                verify(&s, headers, b"{}", now, tolerance).is_ok(),
                within,
                "ts {ts} now {now} tolerance {tolerance}"
            );
        }
    }

    fn keys(pairs: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), decode_secret(v).unwrap()))
            .collect()
    }

    fn headers<'a>(id: &'a str, ts: &'a str, sig: &'a str) -> SignedHeaders<'a> {
        SignedHeaders {
            id,
            timestamp: ts,
            signature: sig,
        }
    }

    #[test]
    fn the_standard_webhooks_test_vector_verifies() {
        // The example of the Standard Webhooks specification (and the svix libraries).
        let body = br#"{"test": 2432232314}"#;
        let key = decode_secret(OLD).unwrap();
        let sig = sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn secrets_decode_whsec_as_base64_and_others_as_raw_bytes() {
        assert_eq!(decode_secret("whsec_AAEC").unwrap(), vec![0, 1, 2]);
        assert_eq!(decode_secret("plain").unwrap(), b"plain".to_vec());
        assert_eq!(decode_secret("whsec_!!"), Err(SecretError::NotBase64));
        assert_eq!(decode_secret("whsec_"), Err(SecretError::Empty));
    }

    #[test]
    fn both_keys_verify_during_a_rotation() {
        let body = br#"{"events":[]}"#;
        let (sig, ids) = sign_all(&keys(&[("k1", OLD), ("k2", NEW)]), "msg_1", 1000, body);
        assert_eq!(ids, "k1 k2");
        assert_eq!(sig.split(' ').count(), 2);
        let h = headers("msg_1", "1000", &sig);
        // A receiver that still has only the old key, one that has only the new key, and one
        // that has both: all accept.
        for held in [
            secrets(&[("k1", OLD)]),
            secrets(&[("k2", NEW)]),
            secrets(&[("k1", OLD), ("k2", NEW)]),
        ] {
            assert_eq!(verify(&held, h, body, 1010, 300), Ok(()), "{held:?}");
        }
        // Once the sender dropped the old key, a receiver with only the old key refuses.
        let (sig, _) = sign_all(&keys(&[("k2", NEW)]), "msg_1", 1000, body);
        assert_eq!(
            verify(
                &secrets(&[("k1", OLD)]),
                headers("msg_1", "1000", &sig),
                body,
                1000,
                300
            ),
            Err(VerifyError::Mismatch)
        );
    }

    #[test]
    fn a_changed_body_id_or_timestamp_fails() {
        let s = secrets(&[("k1", OLD)]);
        let body = br#"{"events":[{"type":"user.online"}]}"#;
        let (sig, _) = sign_all(&keys(&[("k1", OLD)]), "msg_1", 1000, body);
        assert_eq!(
            verify(&s, headers("msg_1", "1000", &sig), body, 1000, 300),
            Ok(())
        );
        let tampered = br#"{"events":[{"type":"user.offline"}]}"#;
        assert_eq!(
            verify(&s, headers("msg_1", "1000", &sig), tampered, 1000, 300),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(
            verify(&s, headers("msg_2", "1000", &sig), body, 1000, 300),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(
            verify(&s, headers("msg_1", "1001", &sig), body, 1000, 300),
            Err(VerifyError::Mismatch)
        );
    }

    #[test]
    fn stale_and_future_timestamps_fail_and_bad_headers_are_named() {
        let s = secrets(&[("k1", OLD)]);
        let body = b"{}";
        let (sig, _) = sign_all(&keys(&[("k1", OLD)]), "m", 1000, body);
        assert_eq!(
            verify(&s, headers("m", "1000", &sig), body, 1300, 300),
            Ok(())
        );
        assert_eq!(
            verify(&s, headers("m", "1000", &sig), body, 1301, 300),
            Err(VerifyError::TooOld(301, 300))
        );
        assert_eq!(
            verify(&s, headers("m", "1000", &sig), body, 699, 300),
            Err(VerifyError::TooNew(301, 300))
        );
        assert!(matches!(
            verify(&s, headers("m", "soon", &sig), body, 1000, 300),
            Err(VerifyError::BadTimestamp(_))
        ));
        assert_eq!(
            verify(&s, headers("", "1000", &sig), body, 1000, 300),
            Err(VerifyError::MissingId)
        );
        assert_eq!(
            verify(&s, headers("m", "1000", "v2,abc"), body, 1000, 300),
            Err(VerifyError::NoSignature)
        );
        // A garbage signature next to a good one does not hide the good one.
        let both = format!("v1,!!notbase64 v1,AAAA {sig}");
        assert_eq!(
            verify(&s, headers("m", "1000", &both), body, 1000, 300),
            Ok(())
        );
    }
}
