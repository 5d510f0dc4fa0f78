//! Token minting and verification: JWT with HS256 (HMAC-SHA256), `sub` and `exp` required, `did`
//! optional, and a `kid` header selecting one of several keys so keys can rotate. The user's
//! identity comes from here and nowhere else. Pure functions over strings: no I/O, no clock
//! reads (the caller passes `now`).

use std::collections::BTreeMap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::config::AuthConfig;

type HmacSha256 = Hmac<Sha256>;

/// Longest token accepted, bytes; longer is malformed without further parsing.
pub const MAX_TOKEN_BYTES: usize = 2048;

/// Why a token was refused. The message is sent to the client as the error reason, so it names
/// what is wrong without revealing key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Not three base64url parts of JSON, a wrong algorithm, or a missing claim.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// The signature does not verify, or the key id is unknown.
    #[error("bad signature: {0}")]
    BadSignature(String),
    /// `exp` is in the past.
    #[error("token expired at {exp} (now {now})")]
    Expired {
        /// The token's `exp`, seconds since epoch.
        exp: u64,
        /// The server's clock, seconds since epoch.
        now: u64,
    },
}

impl AuthError {
    /// Short label for the `presence_auth_failures_total{reason}` metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            AuthError::Malformed(_) => "malformed",
            AuthError::BadSignature(_) => "bad_signature",
            AuthError::Expired { .. } => "expired",
        }
    }
}

/// The claims presenced reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Optional device id; when present it overrides the one in Connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub did: Option<String>,
    /// Issued-at, informational.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    typ: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kid: Option<String>,
}

/// Verifies tokens against the configured keys. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Verifier {
    /// Key id → secret bytes.
    keys: BTreeMap<String, Vec<u8>>,
    /// Key for tokens without `kid`.
    default_kid: String,
    /// Allowed clock skew, seconds.
    leeway_secs: u64,
}

impl Verifier {
    /// Builds a verifier from the `[auth]` config section.
    pub fn new(config: &AuthConfig) -> Verifier {
        Verifier {
            keys: config
                .secrets
                .iter()
                .map(|(k, v)| (k.clone(), v.as_bytes().to_vec()))
                .collect(),
            default_kid: config.default_kid.clone(),
            leeway_secs: config.leeway_secs,
        }
    }

    /// Checks the token's form, signature and expiry at `now_secs`, returning its claims.
    pub fn verify(&self, token: &str, now_secs: u64) -> Result<Claims, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Malformed("token is empty".into()));
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::Malformed(format!(
                "token longer than {MAX_TOKEN_BYTES} bytes"
            )));
        }
        let mut parts = token.split('.');
        let (Some(header_b64), Some(claims_b64), Some(sig_b64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthError::Malformed(
                "expected three dot-separated parts".into(),
            ));
        };
        let header: Header = decode_json(header_b64, "header")?;
        if header.alg != "HS256" {
            return Err(AuthError::Malformed(format!(
                "algorithm {:?} is not HS256",
                header.alg
            )));
        }
        let kid = header.kid.as_deref().unwrap_or(&self.default_kid);
        let Some(key) = self.keys.get(kid) else {
            return Err(AuthError::BadSignature(format!("unknown key id {kid:?}")));
        };
        let signature = URL_SAFE_NO_PAD
            .decode(sig_b64)
            .map_err(|_| AuthError::Malformed("signature is not base64url".into()))?;
        let signed_len = header_b64.len() + 1 + claims_b64.len();
        let mut mac = new_mac(key);
        mac.update(&token.as_bytes()[..signed_len]);
        mac.verify_slice(&signature)
            .map_err(|_| AuthError::BadSignature("signature does not verify".into()))?;
        let claims: Claims = decode_json(claims_b64, "claims")?;
        if claims.exp.saturating_add(self.leeway_secs) < now_secs {
            return Err(AuthError::Expired {
                exp: claims.exp,
                now: now_secs,
            });
        }
        Ok(claims)
    }
}

fn new_mac(key: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length, so this cannot fail.
    HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length")
}

fn decode_json<T: serde::de::DeserializeOwned>(part: &str, what: &str) -> Result<T, AuthError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| AuthError::Malformed(format!("{what} is not base64url")))?;
    serde_json::from_slice(&bytes).map_err(|e| AuthError::Malformed(format!("{what}: {e}")))
}

/// Signs `claims` with `secret`, naming `kid` in the header when given.
pub fn mint(secret: &[u8], kid: Option<&str>, claims: &Claims) -> String {
    let header = Header {
        alg: "HS256".into(),
        typ: Some("JWT".into()),
        kid: kid.map(str::to_string),
    };
    // Serialising these plain structs to JSON cannot fail.
    let header = serde_json::to_vec(&header).expect("header serialises");
    let claims = serde_json::to_vec(claims).expect("claims serialise");
    let mut token = URL_SAFE_NO_PAD.encode(header);
    token.push('.');
    token.push_str(&URL_SAFE_NO_PAD.encode(claims));
    let mut mac = new_mac(secret);
    mac.update(token.as_bytes());
    let signature = mac.finalize().into_bytes();
    token.push('.');
    token.push_str(&URL_SAFE_NO_PAD.encode(signature));
    token
}

/// A token for `user` signed with the public development secret, valid for `ttl_secs`: for
/// `presencectl`, benchmarks and tests against a broker on its default keys.
pub fn dev_token(user: &str, ttl_secs: u64) -> String {
    let now = crate::now_ms() / 1000;
    mint(
        crate::config::DEV_SECRET.as_bytes(),
        None,
        &Claims {
            sub: user.to_string(),
            exp: now + ttl_secs,
            did: None,
            iat: Some(now),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verifier() -> Verifier {
        let mut config = AuthConfig::default();
        config
            .secrets
            .insert("k2".into(), "second-secret-0123456789".into());
        Verifier::new(&config)
    }

    fn claims(exp: u64) -> Claims {
        Claims {
            sub: "alice".into(),
            exp,
            did: Some("phone".into()),
            iat: None,
        }
    }

    #[test]
    fn round_trip_with_default_and_named_keys() {
        let v = verifier();
        let t = mint(crate::config::DEV_SECRET.as_bytes(), None, &claims(100));
        assert_eq!(v.verify(&t, 50).unwrap(), claims(100));
        let t = mint(b"second-secret-0123456789", Some("k2"), &claims(100));
        assert_eq!(v.verify(&t, 50).unwrap().sub, "alice");
    }

    #[test]
    fn wrong_key_unknown_kid_and_tampering_fail() {
        let v = verifier();
        let t = mint(b"another-secret-entirely", None, &claims(100));
        assert!(matches!(v.verify(&t, 50), Err(AuthError::BadSignature(_))));
        let t = mint(b"x", Some("nope"), &claims(100));
        assert!(matches!(v.verify(&t, 50), Err(AuthError::BadSignature(_))));
        let good = mint(crate::config::DEV_SECRET.as_bytes(), None, &claims(100));
        let forged_claims = URL_SAFE_NO_PAD.encode(br#"{"sub":"mallory","exp":100}"#);
        let parts: Vec<&str> = good.split('.').collect();
        let forged = format!("{}.{}.{}", parts[0], forged_claims, parts[2]);
        assert!(matches!(
            v.verify(&forged, 50),
            Err(AuthError::BadSignature(_))
        ));
    }

    #[test]
    fn expired_and_malformed() {
        let v = verifier();
        let t = mint(crate::config::DEV_SECRET.as_bytes(), None, &claims(100));
        assert_eq!(
            v.verify(&t, 101),
            Err(AuthError::Expired { exp: 100, now: 101 })
        );
        for bad in ["", "a.b", "a.b.c.d", "!!!.###.$$$", &"x".repeat(5000)] {
            assert!(
                matches!(v.verify(bad, 0), Err(AuthError::Malformed(_))),
                "{bad}"
            );
        }
        let none_alg = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#),
            URL_SAFE_NO_PAD.encode(br#"{"sub":"a","exp":100}"#)
        );
        assert!(matches!(
            v.verify(&none_alg, 0),
            Err(AuthError::Malformed(_))
        ));
    }
}
