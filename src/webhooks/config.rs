//! The `[[webhooks]]` settings of one endpoint, with their defaults and validation. Plain
//! data: nothing here opens a connection or reads a clock.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::events::EventType;

/// One webhook endpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Where batches are POSTed (`https://`, or `http://` for loopback and trusted networks).
    pub url: String,
    /// Signing secrets by key id; every batch carries one signature per key, so a receiver
    /// can rotate keys. A `whsec_` prefix is stripped and the rest base64-decoded (Standard
    /// Webhooks); any other value is used as raw bytes. At least one, each ≥ 16 bytes.
    pub secrets: BTreeMap<String, String>,
    /// Event types to send (`user.online`, ...); default: user.online, user.offline,
    /// channel.occupied, channel.vacated. `server.started` and `sync.required` are always sent.
    #[serde(default = "default_events")]
    pub events: Vec<EventType>,
    /// Most events per request.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// How long the first event of a batch waits for more before the batch is sent.
    #[serde(default = "default_linger_ms")]
    pub linger_ms: u64,
    /// Per-request timeout.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Events the queue holds; beyond it each user keeps only its latest, then the oldest go.
    #[serde(default = "default_queue_capacity")]
    pub queue_capacity: usize,
    /// A batch whose oldest event is older than this is given up (counted as dropped).
    #[serde(default = "default_max_event_age_ms")]
    pub max_event_age_ms: u64,
    /// `truth` (default): what the app's backend sees. `public`: what a stranger is shown,
    /// for an endpoint run by a third party (invisible users and users whose audience is not
    /// `everyone` look offline and are left out of channel events and counts).
    #[serde(default)]
    pub show: WebhookShow,
}

/// What an endpoint is shown of users whose privacy settings hide them from strangers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WebhookShow {
    /// The truth, as the backend sees it (admin API, `GET /v1/events`). The default: an
    /// endpoint is usually the app's own backend.
    #[default]
    Truth,
    /// What a stranger (no approval, no block) is shown, as on the client protocol: for an
    /// endpoint run by a third party (analytics, a partner).
    Public,
}

fn default_events() -> Vec<EventType> {
    EventType::DEFAULT
        .into_iter()
        .filter(|t| !t.always())
        .collect()
}
fn default_batch_size() -> usize {
    100
}
fn default_linger_ms() -> u64 {
    250
}
fn default_timeout_ms() -> u64 {
    5_000
}
fn default_queue_capacity() -> usize {
    10_000
}
fn default_max_event_age_ms() -> u64 {
    300_000
}

impl WebhookConfig {
    /// An endpoint with every default and one secret.
    pub fn new(url: &str, key_id: &str, secret: &str) -> WebhookConfig {
        WebhookConfig {
            url: url.to_string(),
            secrets: BTreeMap::from([(key_id.to_string(), secret.to_string())]),
            events: default_events(),
            batch_size: default_batch_size(),
            linger_ms: default_linger_ms(),
            timeout_ms: default_timeout_ms(),
            queue_capacity: default_queue_capacity(),
            max_event_age_ms: default_max_event_age_ms(),
            show: WebhookShow::Truth,
        }
    }

    /// Checks one endpoint; the error names the field.
    pub fn validate(&self, index: usize) -> Result<(), String> {
        let at = format!("webhooks[{index}]");
        if !(self.url.starts_with("https://") || self.url.starts_with("http://")) {
            return Err(format!("{at}.url must start with https:// or http://"));
        }
        match reqwest::Url::parse(&self.url) {
            Ok(url) if url.host_str().is_some_and(|h| !h.is_empty()) => {}
            // The URL itself is not echoed: its query or userinfo may hold a secret.
            _ => return Err(format!("{at}.url is not a valid http(s) URL with a host")),
        }
        if self.secrets.is_empty() {
            return Err(format!("{at}.secrets needs at least one key id = secret"));
        }
        for (id, secret) in &self.secrets {
            // Key ids travel in the `webhook-key-ids` header, space-separated.
            if id.is_empty() || !id.bytes().all(|b| b.is_ascii_graphic() && b != b',') {
                return Err(format!(
                    "{at}.secrets: key id {id:?} must be printable ASCII without spaces or commas"
                ));
            }
            let key_len = super::signing::decode_secret(secret).map(|k| k.len());
            if secret.len() < 16 || !matches!(key_len, Ok(n) if n >= 16) {
                return Err(format!(
                    "{at}.secrets.{id} must be at least 16 bytes, a whsec_ secret at least 16 \
                     bytes once base64-decoded (use 32 random bytes)"
                ));
            }
        }
        if !(1..=100).contains(&self.batch_size) {
            return Err(format!("{at}.batch_size must be 1..=100"));
        }
        if self.linger_ms > 10_000 {
            return Err(format!("{at}.linger_ms must be at most 10000"));
        }
        if !(100..=60_000).contains(&self.timeout_ms) {
            return Err(format!("{at}.timeout_ms must be 100..=60000"));
        }
        if !(10..=1_000_000).contains(&self.queue_capacity) {
            return Err(format!("{at}.queue_capacity must be 10..=1000000"));
        }
        if !(1_000..=86_400_000).contains(&self.max_event_age_ms) {
            return Err(format!("{at}.max_event_age_ms must be 1000..=86400000"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_field_and_never_echoes_a_secret() {
        let ok = WebhookConfig::new("https://hooks.example.com/in", "k1", "0123456789abcdef");
        assert_eq!(ok.validate(0), Ok(()));
        let bad = |f: &dyn Fn(&mut WebhookConfig)| {
            let mut c = ok.clone();
            f(&mut c);
            c.validate(3).unwrap_err()
        };
        assert!(bad(&|c| c.url = "ftp://x".into()).contains("webhooks[3].url"));
        let e = bad(&|c| c.url = "http://:pw-s3cret@/x".into());
        assert!(
            e.contains("webhooks[3].url") && !e.contains("s3cret"),
            "{e}"
        );
        assert!(bad(&|c| c.secrets = BTreeMap::new()).contains("secrets"));
        let e = bad(&|c| {
            c.secrets = BTreeMap::from([("k 1".into(), "0123456789abcdef".into())]);
        });
        assert!(e.contains("key id"), "{e}");
        let e = bad(&|c| {
            c.secrets = BTreeMap::from([("k1".into(), "whsec_c2hvcnQ=+++++++++".into())]);
        });
        assert!(e.contains("secrets.k1") && !e.contains("c2hv"), "{e}");
        let e = bad(&|c| {
            c.secrets = BTreeMap::from([("k1".into(), "whsec_c2hvcnRzaG9ydA==".into())]);
        });
        assert!(e.contains("16 bytes"), "{e}");
        assert!(bad(&|c| c.batch_size = 0).contains("batch_size"));
    }

    #[test]
    fn a_toml_endpoint_gets_the_defaults() {
        let c: WebhookConfig = toml::from_str(
            "url = \"https://h/x\"\nsecrets = { k1 = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\" }\n",
        )
        .unwrap();
        assert_eq!(c.batch_size, 100);
        assert_eq!(c.queue_capacity, 10_000);
        assert!(
            !c.events.contains(&EventType::ServerStarted),
            "always sent anyway"
        );
        assert_eq!(c.validate(0), Ok(()));
        assert!(
            toml::from_str::<WebhookConfig>("url = \"https://h\"\nsecrets = {}\nbogus = 1\n")
                .is_err()
        );
    }
}
