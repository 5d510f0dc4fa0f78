//! The `[admin]` settings: where the admin HTTP API listens, its keys and their scopes, and
//! the per-key rate limit.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// Shortest admin key accepted, in bytes.
pub const MIN_KEY_BYTES: usize = 32;

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Queries only (presence, online, members, occupancy, where-now, subscriptions, events).
    Read,
    /// Everything, including disconnect, revoke, set presence and subscription changes.
    Write,
}

/// One admin key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdminKey {
    /// The secret sent as `Authorization: Bearer <key>`; at least 32 bytes.
    pub key: String,
    /// `read` or `write`.
    pub scope: Scope,
}

/// The admin HTTP API. Off until at least one key is configured.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Listener address (keep it on a private network or loopback).
    pub listen: SocketAddr,
    /// Keys by name (the name appears in logs and metrics, never the secret).
    pub keys: BTreeMap<String, AdminKey>,
    /// Requests per second each key may make (token bucket).
    pub rate_per_sec: u32,
    /// Burst above the rate.
    pub burst: u32,
    /// Longest `wait_ms` a `GET /v1/events` long-poll may ask for.
    pub max_wait_ms: u64,
    /// Open connections to the API at once (more are closed at accept).
    pub max_connections: usize,
    /// Requests of one key being served at once, long-polls included (more get 429).
    pub max_in_flight_per_key: usize,
    /// A request's headers, and then its body, must each arrive within this.
    pub request_timeout_ms: u64,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9465)),
            keys: BTreeMap::new(),
            rate_per_sec: 100,
            burst: 200,
            max_wait_ms: 30_000,
            max_connections: 256,
            max_in_flight_per_key: 32,
            request_timeout_ms: 10_000,
        }
    }
}

impl AdminConfig {
    /// True when the API serves at all (a key is configured).
    pub fn enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Checks the section; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        for (name, k) in &self.keys {
            if k.key.len() < MIN_KEY_BYTES {
                return Err(format!(
                    "admin.keys.{name}.key must be at least {MIN_KEY_BYTES} bytes"
                ));
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for (name, k) in &self.keys {
            if !seen.insert(k.key.as_str()) {
                return Err(format!(
                    "admin.keys.{name}.key is the same as another key's"
                ));
            }
        }
        if self.rate_per_sec == 0 || self.burst == 0 {
            return Err("admin.rate_per_sec and admin.burst must be positive".into());
        }
        if self.max_connections == 0 || self.max_in_flight_per_key == 0 {
            return Err(
                "admin.max_connections and admin.max_in_flight_per_key must be positive".into(),
            );
        }
        if !(100..=120_000).contains(&self.request_timeout_ms) {
            return Err("admin.request_timeout_ms must be 100..=120000".into());
        }
        if self.max_wait_ms > 120_000 {
            return Err("admin.max_wait_ms must be at most 120000".into());
        }
        Ok(())
    }
}
