//! Token minting and verification: JWT with HS256 (HMAC-SHA256), `sub` and `exp` required,
//! `did` optional, and a `kid` header selecting one of several keys so keys can rotate. The
//! registered claims are checked as RFC 7519 says: a token is valid only while `now < exp` and
//! not before `nbf`, both widened by the configured leeway; when the configuration names an
//! issuer or an audience, `iss` must equal it and `aud` (a string or an array of strings) must
//! contain it. The user's identity comes from here and nowhere else. Pure functions over
//! strings: no I/O, no clock reads (the caller passes `now`).
//!
//! Refusal reasons go back to the client, so they never echo what the peer sent at length: an
//! unknown `kid` reads exactly like a bad signature (and costs the same HMAC), and the header's
//! values, which are read before the signature is checked, are cut to [`MAX_ECHO_CHARS`].

use std::collections::BTreeMap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::config::AuthConfig;

type HmacSha256 = Hmac<Sha256>;

/// Longest token accepted, bytes; longer is malformed without further parsing. It also bounds
/// everything parsed from a token (an `aud` array, claim strings).
pub const MAX_TOKEN_BYTES: usize = 2048;

/// Most characters of a peer-sent value (or of a parser message quoting one) put into a
/// refusal reason.
pub const MAX_ECHO_CHARS: usize = 48;

/// Why a token was refused. The message is sent to the client as the error reason, so it names
/// what is wrong without revealing key material or reflecting the peer's input at length.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Not three base64url parts of JSON, a wrong algorithm, or a missing claim.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// The signature does not verify, or the key id is unknown: the two read the same, so a
    /// peer cannot probe which key ids exist.
    #[error("bad signature: signature does not verify")]
    BadSignature,
    /// `now >= exp + leeway`.
    #[error("token expired at {exp} (now {now})")]
    Expired {
        /// The token's `exp`, seconds since epoch.
        exp: u64,
        /// The server's clock, seconds since epoch.
        now: u64,
    },
    /// `now + leeway < nbf`.
    #[error("token not valid before {nbf} (now {now})")]
    NotYetValid {
        /// The token's `nbf`, seconds since epoch.
        nbf: u64,
        /// The server's clock, seconds since epoch.
        now: u64,
    },
    /// An issuer is configured and `iss` is missing or different.
    #[error("token issuer (iss) is missing or not the accepted one")]
    BadIssuer,
    /// An audience is configured and `aud` is missing or does not contain it.
    #[error("token audience (aud) is missing or does not include this service")]
    BadAudience,
}

impl AuthError {
    /// Short label for the `presence_auth_failures_total{reason}` metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            AuthError::Malformed(_) => "malformed",
            AuthError::BadSignature => "bad_signature",
            AuthError::Expired { .. } => "expired",
            AuthError::NotYetValid { .. } => "not_yet_valid",
            AuthError::BadIssuer => "bad_issuer",
            AuthError::BadAudience => "bad_audience",
        }
    }
}

/// The claims presenced reads and returns. The optional restricting claims (`nbf`, `iss`,
/// `aud`) live in [`Validity`], so code that builds `Claims` literals keeps compiling.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// Expiry, seconds since the Unix epoch: valid only while now < exp.
    pub exp: u64,
    /// Optional device id; when present it overrides the one in Connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub did: Option<String>,
    /// Issued-at, informational.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
}

/// The optional claims that narrow when and where a token is valid. All absent by default;
/// mint them with [`mint_with`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Validity {
    /// Not before, seconds since the Unix epoch: refused while now + leeway < nbf.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Issuer; must equal `[auth] issuer` when that is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// Audience; must contain `[auth] audience` when that is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<Audience>,
}

/// An `aud` claim: one string or an array of strings (RFC 7519 §4.1.3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    /// `"aud": "presenced"`.
    One(String),
    /// `"aud": ["presenced", "other"]`; its length is bounded by [`MAX_TOKEN_BYTES`].
    Many(Vec<String>),
}

impl Audience {
    /// Whether `audience` is this audience or one of them.
    pub fn contains(&self, audience: &str) -> bool {
        match self {
            Audience::One(one) => one == audience,
            Audience::Many(many) => many.iter().any(|a| a == audience),
        }
    }
}

/// The claims part of a token as it is on the wire: [`Claims`] and [`Validity`] side by side.
#[derive(Debug, Serialize, Deserialize)]
struct ClaimsJson {
    sub: String,
    exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    did: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    aud: Option<Audience>,
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
    /// Allowed clock skew, seconds, on both `exp` and `nbf`.
    leeway_secs: u64,
    /// Required `iss`, when set.
    issuer: Option<String>,
    /// Audience `aud` must contain, when set.
    audience: Option<String>,
}

/// Stands in for the key of an unknown `kid`, so that refusal costs the same HMAC as a bad
/// signature. No token verifies against it: its verdict is ignored.
const NO_KEY: &[u8] = b"presenced: no key has this id";

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
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
        }
    }

    /// Checks the token's form, signature, time window (`exp`, `nbf`) at `now_secs` and, when
    /// configured, its issuer and audience, returning its claims.
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
                truncated(&header.alg)
            )));
        }
        let signature = URL_SAFE_NO_PAD
            .decode(sig_b64)
            .map_err(|_| AuthError::Malformed("signature is not base64url".into()))?;
        let kid = header.kid.as_deref().unwrap_or(&self.default_kid);
        let key = self.keys.get(kid);
        let signed_len = header_b64.len() + 1 + claims_b64.len();
        let mut mac = new_mac(key.map_or(NO_KEY, Vec::as_slice));
        mac.update(&token.as_bytes()[..signed_len]);
        let verifies = mac.verify_slice(&signature).is_ok();
        if key.is_none() || !verifies {
            return Err(AuthError::BadSignature);
        }
        let json: ClaimsJson = decode_json(claims_b64, "claims")?;
        if now_secs >= json.exp.saturating_add(self.leeway_secs) {
            return Err(AuthError::Expired {
                exp: json.exp,
                now: now_secs,
            });
        }
        if let Some(nbf) = json.nbf {
            if now_secs.saturating_add(self.leeway_secs) < nbf {
                return Err(AuthError::NotYetValid { nbf, now: now_secs });
            }
        }
        if let Some(issuer) = &self.issuer {
            if json.iss.as_deref() != Some(issuer.as_str()) {
                return Err(AuthError::BadIssuer);
            }
        }
        if let Some(audience) = &self.audience {
            if !json.aud.as_ref().is_some_and(|aud| aud.contains(audience)) {
                return Err(AuthError::BadAudience);
            }
        }
        Ok(Claims {
            sub: json.sub,
            exp: json.exp,
            did: json.did,
            iat: json.iat,
        })
    }
}

fn new_mac(key: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length, so this cannot fail.
    HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length")
}

/// At most [`MAX_ECHO_CHARS`] characters of `s`, marked when cut.
fn truncated(s: &str) -> String {
    match s.char_indices().nth(MAX_ECHO_CHARS) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s.to_string(),
    }
}

fn decode_json<T: serde::de::DeserializeOwned>(part: &str, what: &str) -> Result<T, AuthError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| AuthError::Malformed(format!("{what} is not base64url")))?;
    // The parser's message may quote the input: cut it.
    serde_json::from_slice(&bytes)
        .map_err(|e| AuthError::Malformed(format!("{what}: {}", truncated(&e.to_string()))))
}

/// Signs `claims` with `secret`, naming `kid` in the header when given.
pub fn mint(secret: &[u8], kid: Option<&str>, claims: &Claims) -> String {
    mint_with(secret, kid, claims, &Validity::default())
}

/// Signs `claims` together with the restricting claims in `validity` (`nbf`, `iss`, `aud`).
pub fn mint_with(secret: &[u8], kid: Option<&str>, claims: &Claims, validity: &Validity) -> String {
    let header = Header {
        alg: "HS256".into(),
        typ: Some("JWT".into()),
        kid: kid.map(str::to_string),
    };
    let json = ClaimsJson {
        sub: claims.sub.clone(),
        exp: claims.exp,
        did: claims.did.clone(),
        iat: claims.iat,
        nbf: validity.nbf,
        iss: validity.iss.clone(),
        aud: validity.aud.clone(),
    };
    // Serialising these plain structs to JSON cannot fail.
    let header = serde_json::to_vec(&header).expect("header serialises");
    let json = serde_json::to_vec(&json).expect("claims serialise");
    let mut token = URL_SAFE_NO_PAD.encode(header);
    token.push('.');
    token.push_str(&URL_SAFE_NO_PAD.encode(json));
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
        assert!(matches!(v.verify(&t, 50), Err(AuthError::BadSignature)));
        let t = mint(b"x", Some("nope"), &claims(100));
        assert!(matches!(v.verify(&t, 50), Err(AuthError::BadSignature)));
        let good = mint(crate::config::DEV_SECRET.as_bytes(), None, &claims(100));
        let forged_claims = URL_SAFE_NO_PAD.encode(br#"{"sub":"mallory","exp":100}"#);
        let parts: Vec<&str> = good.split('.').collect();
        let forged = format!("{}.{}.{}", parts[0], forged_claims, parts[2]);
        assert!(matches!(
            v.verify(&forged, 50),
            Err(AuthError::BadSignature)
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
        assert_eq!(
            v.verify(&t, 100),
            Err(AuthError::Expired { exp: 100, now: 100 }),
            "valid only while now < exp"
        );
        assert!(v.verify(&t, 99).is_ok());
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

    fn with(config: impl FnOnce(&mut AuthConfig)) -> Verifier {
        let mut c = AuthConfig::default();
        config(&mut c);
        Verifier::new(&c)
    }

    fn minted(validity: Validity) -> String {
        mint_with(
            crate::config::DEV_SECRET.as_bytes(),
            None,
            &claims(100),
            &validity,
        )
    }

    #[test]
    fn leeway_widens_exp_and_nbf_alike() {
        let v = with(|c| c.leeway_secs = 5);
        let t = mint(crate::config::DEV_SECRET.as_bytes(), None, &claims(100));
        assert!(v.verify(&t, 104).is_ok());
        assert!(matches!(v.verify(&t, 105), Err(AuthError::Expired { .. })));
        let t = minted(Validity {
            nbf: Some(50),
            ..Validity::default()
        });
        assert!(v.verify(&t, 45).is_ok(), "45 + 5 is not before 50");
        assert_eq!(
            v.verify(&t, 44),
            Err(AuthError::NotYetValid { nbf: 50, now: 44 })
        );
    }

    #[test]
    fn nbf_is_inclusive_and_named_in_the_reason() {
        let v = verifier();
        let t = minted(Validity {
            nbf: Some(50),
            ..Validity::default()
        });
        assert!(v.verify(&t, 50).is_ok());
        let e = v.verify(&t, 49).unwrap_err();
        assert_eq!(e.to_string(), "token not valid before 50 (now 49)");
        assert_eq!(e.metric_label(), "not_yet_valid");
    }

    #[test]
    fn a_configured_issuer_must_match_exactly() {
        let v = with(|c| c.issuer = Some("https://auth.example".into()));
        let iss = |iss: Option<&str>| {
            minted(Validity {
                iss: iss.map(str::to_string),
                ..Validity::default()
            })
        };
        assert!(v.verify(&iss(Some("https://auth.example")), 50).is_ok());
        for bad in [None, Some("https://auth.example/"), Some("")] {
            assert_eq!(
                v.verify(&iss(bad), 50),
                Err(AuthError::BadIssuer),
                "{bad:?}"
            );
        }
        assert_eq!(AuthError::BadIssuer.metric_label(), "bad_issuer");
        assert!(
            verifier().verify(&iss(Some("anyone")), 50).is_ok(),
            "no issuer configured: any or none"
        );
    }

    #[test]
    fn a_configured_audience_may_be_a_string_or_in_an_array() {
        let v = with(|c| c.audience = Some("presenced".into()));
        let aud = |aud: Option<Audience>| {
            minted(Validity {
                aud,
                ..Validity::default()
            })
        };
        let one = |s: &str| Some(Audience::One(s.into()));
        let many = |v: &[&str]| Some(Audience::Many(v.iter().map(|s| s.to_string()).collect()));
        assert!(v.verify(&aud(one("presenced")), 50).is_ok());
        assert!(v.verify(&aud(many(&["web", "presenced"])), 50).is_ok());
        for bad in [None, one("web"), many(&[]), many(&["web", "Presenced"])] {
            assert_eq!(
                v.verify(&aud(bad.clone()), 50),
                Err(AuthError::BadAudience),
                "{bad:?}"
            );
        }
        assert_eq!(AuthError::BadAudience.metric_label(), "bad_audience");
        // A number or an object is not an audience at all.
        let raw = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256"}"#),
            URL_SAFE_NO_PAD.encode(br#"{"sub":"a","exp":100,"aud":7}"#)
        );
        let mut mac = new_mac(crate::config::DEV_SECRET.as_bytes());
        mac.update(raw.as_bytes());
        let t = format!(
            "{raw}.{}",
            URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
        );
        assert!(matches!(v.verify(&t, 50), Err(AuthError::Malformed(_))));
    }

    #[test]
    fn an_unknown_kid_reads_exactly_like_a_bad_signature() {
        let v = verifier();
        let kid = "k".repeat(1000);
        let by_kid = v
            .verify(&mint(b"x", Some(&kid), &claims(100)), 50)
            .unwrap_err();
        let by_key = v
            .verify(&mint(b"wrong-secret-0123456789", None, &claims(100)), 50)
            .unwrap_err();
        assert_eq!(by_kid, AuthError::BadSignature);
        assert_eq!(by_kid.to_string(), by_key.to_string());
        assert!(!by_kid.to_string().contains("kkk"));
    }

    #[test]
    fn header_values_are_not_echoed_at_length() {
        let v = verifier();
        let long = "A".repeat(1500);
        for header in [
            format!(r#"{{"alg":"{long}"}}"#),
            // serde_json quotes a string of the wrong type in its message.
            format!(r#""{long}""#),
            format!(r#"{{"alg":["{long}"]}}"#),
        ] {
            let t = format!(
                "{}.{}.",
                URL_SAFE_NO_PAD.encode(header.as_bytes()),
                URL_SAFE_NO_PAD.encode(br#"{"sub":"a","exp":100}"#)
            );
            let reason = v.verify(&t, 0).unwrap_err().to_string();
            assert!(
                !reason.contains(&"A".repeat(MAX_ECHO_CHARS + 1)),
                "{reason}"
            );
            assert!(reason.len() < 200, "{reason}");
        }
    }

    #[test]
    fn mint_leaves_out_absent_claims() {
        let t = mint(crate::config::DEV_SECRET.as_bytes(), None, &claims(100));
        let body = t.split('.').nth(1).unwrap();
        let json = String::from_utf8(URL_SAFE_NO_PAD.decode(body).unwrap()).unwrap();
        assert_eq!(json, r#"{"sub":"alice","exp":100,"did":"phone"}"#);
    }
}
