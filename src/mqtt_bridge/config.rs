//! The `[mqtt_bridge]` settings: broker URL, client id, credentials, topic prefix, payload
//! format, what is shown of private users, reconnect backoff and queue caps, with defaults and
//! validation. Plain data: nothing here opens a connection or reads a clock (the password file
//! is read by the bridge when it starts).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// How user presence is encoded on `<prefix>/users/<user>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PayloadFormat {
    /// A small JSON object (see the README's MQTT bridge section).
    #[default]
    Json,
    /// The protocol's `presence.v1.Presence` message, as clients receive it.
    Protobuf,
}

/// What the bridge shows of users whose privacy settings hide them from strangers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShowPolicy {
    /// What a stranger is shown: invisible users and users whose audience is not `everyone`
    /// appear offline, and are left out of channel occupancy. The default: MQTT topics are
    /// usually readable by many clients.
    #[default]
    Public,
    /// The truth, as the backend sees it (webhooks, admin API). Only for a broker whose
    /// topics only trusted backends can read.
    Truth,
}

/// The `[mqtt_bridge]` section. Absent: no bridge.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MqttBridgeConfig {
    /// `mqtt://host:port` (default port 1883) or `mqtts://host:port` (default port 8883).
    pub url: String,
    /// The MQTT client id. In cluster mode every node uses the same one; only the node that
    /// delivers events connects.
    pub client_id: String,
    /// MQTT user name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// MQTT password (prefer `password_file`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// A file holding the MQTT password (surrounding whitespace trimmed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// mqtts:// only: PEM CA certificates to trust instead of the system's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Topics are `<prefix>/users/<user>`, `<prefix>/channels/<channel>` and
    /// `<prefix>/bridge/<client_id>`.
    #[serde(default = "default_topic_prefix")]
    pub topic_prefix: String,
    /// `json` (default) or `protobuf` for user topics (channel topics are always JSON).
    #[serde(default)]
    pub format: PayloadFormat,
    /// `public` (default) or `truth`; see [`ShowPolicy`].
    #[serde(default)]
    pub show: ShowPolicy,
    /// MQTT keep-alive, seconds: a dead link is noticed within about 1.5 times this.
    #[serde(default = "default_keep_alive_secs")]
    pub keep_alive_secs: u64,
    /// First reconnect delay; doubles per failed attempt up to `reconnect_max_ms` (with jitter).
    #[serde(default = "default_reconnect_min_ms")]
    pub reconnect_min_ms: u64,
    /// Longest reconnect delay.
    #[serde(default = "default_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
    /// Events waiting for the bridge task; beyond it events are dropped (counted) and the
    /// bridge re-reads the whole state from the registry instead.
    #[serde(default = "default_queue_capacity")]
    pub queue_capacity: usize,
    /// Users and channels the bridge tracks at once (online users, occupied channels, and
    /// changes not yet published). Beyond it changes are dropped (counted) and corrected by the
    /// next full pass.
    #[serde(default = "default_max_subjects")]
    pub max_subjects: usize,
    /// How long after each connect the bridge listens to the broker's retained user and channel
    /// topics to correct those it no longer holds (left behind by a crash or a restart).
    #[serde(default = "default_retained_scan_ms")]
    pub retained_scan_ms: u64,
    /// Full pass over the registry every this often, a safety net: anything missed is
    /// published within this period. 0: only after connects and losses.
    #[serde(default = "default_resync_interval_ms")]
    pub resync_interval_ms: u64,
}

fn default_topic_prefix() -> String {
    "presence".into()
}
fn default_keep_alive_secs() -> u64 {
    30
}
fn default_reconnect_min_ms() -> u64 {
    200
}
fn default_reconnect_max_ms() -> u64 {
    30_000
}
fn default_queue_capacity() -> usize {
    10_000
}
fn default_max_subjects() -> usize {
    1_000_000
}
fn default_retained_scan_ms() -> u64 {
    3_000
}
fn default_resync_interval_ms() -> u64 {
    10_000
}

/// A parsed `url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddress {
    /// mqtts://
    pub tls: bool,
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
}

impl MqttBridgeConfig {
    /// A bridge to `url` as `client_id` with every other default.
    pub fn new(url: &str, client_id: &str) -> MqttBridgeConfig {
        MqttBridgeConfig {
            url: url.to_string(),
            client_id: client_id.to_string(),
            username: None,
            password: None,
            password_file: None,
            ca_file: None,
            topic_prefix: default_topic_prefix(),
            format: PayloadFormat::default(),
            show: ShowPolicy::default(),
            keep_alive_secs: default_keep_alive_secs(),
            reconnect_min_ms: default_reconnect_min_ms(),
            reconnect_max_ms: default_reconnect_max_ms(),
            queue_capacity: default_queue_capacity(),
            max_subjects: default_max_subjects(),
            retained_scan_ms: default_retained_scan_ms(),
            resync_interval_ms: default_resync_interval_ms(),
        }
    }

    /// Parses `url`: `mqtt://host[:port]` or `mqtts://host[:port]`, nothing after the port
    /// but an optional `/`. The error never echoes the URL (it may hold credentials).
    pub fn broker(&self) -> Result<BrokerAddress, String> {
        let (tls, rest) = if let Some(rest) = self.url.strip_prefix("mqtt://") {
            (false, rest)
        } else if let Some(rest) = self.url.strip_prefix("mqtts://") {
            (true, rest)
        } else {
            return Err("mqtt_bridge.url must start with mqtt:// or mqtts://".into());
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let bad = || {
            "mqtt_bridge.url must be mqtt(s)://host[:port] (credentials go in username/password)"
                .to_string()
        };
        if rest.is_empty() || rest.contains(['/', '@', '?', '#', ' ']) {
            return Err(bad());
        }
        let default_port = if tls { 8883 } else { 1883 };
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(bad)?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse::<u16>().map_err(|_| bad())?,
                None if after.is_empty() => default_port,
                None => return Err(bad()),
            };
            (host.to_string(), port)
        } else {
            match rest.rsplit_once(':') {
                Some((host, p)) => (host.to_string(), p.parse::<u16>().map_err(|_| bad())?),
                None => (rest.to_string(), default_port),
            }
        };
        if host.is_empty() || port == 0 {
            return Err(bad());
        }
        Ok(BrokerAddress { tls, host, port })
    }

    /// Checks the section; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        let broker = self.broker()?;
        if self.client_id.is_empty()
            || self.client_id.len() > 128
            || self.client_id.contains(['+', '#', '/'])
            || self.client_id.chars().any(char::is_control)
        {
            return Err(
                "mqtt_bridge.client_id must be 1-128 bytes without control characters, '/', '+' or '#'"
                    .into(),
            );
        }
        if !topic_prefix_ok(&self.topic_prefix) {
            return Err(
                "mqtt_bridge.topic_prefix must be non-empty topic levels without '+', '#', \
                 control characters or empty levels"
                    .into(),
            );
        }
        if self.password.is_some() && self.password_file.is_some() {
            return Err("mqtt_bridge: set password or password_file, not both".into());
        }
        if (self.password.is_some() || self.password_file.is_some()) && self.username.is_none() {
            return Err("mqtt_bridge: a password needs a username".into());
        }
        if self.ca_file.is_some() && !broker.tls {
            return Err("mqtt_bridge.ca_file needs an mqtts:// url".into());
        }
        if !(5..=3_600).contains(&self.keep_alive_secs) {
            return Err("mqtt_bridge.keep_alive_secs must be 5..=3600".into());
        }
        if self.reconnect_min_ms == 0 || self.reconnect_min_ms > self.reconnect_max_ms {
            return Err("mqtt_bridge.reconnect_min_ms must be in 1..=reconnect_max_ms".into());
        }
        if self.reconnect_max_ms > 600_000 {
            return Err("mqtt_bridge.reconnect_max_ms must be at most 600000".into());
        }
        if !(16..=1_000_000).contains(&self.queue_capacity) {
            return Err("mqtt_bridge.queue_capacity must be 16..=1000000".into());
        }
        if !(16..=10_000_000).contains(&self.max_subjects) {
            return Err("mqtt_bridge.max_subjects must be 16..=10000000".into());
        }
        if self.retained_scan_ms > 60_000 {
            return Err("mqtt_bridge.retained_scan_ms must be at most 60000".into());
        }
        if self.resync_interval_ms != 0 && !(1_000..=86_400_000).contains(&self.resync_interval_ms)
        {
            return Err("mqtt_bridge.resync_interval_ms must be 0 or 1000..=86400000".into());
        }
        Ok(())
    }
}

/// Whether `prefix` can start a topic name: levels separated by `/`, none empty, no wildcard,
/// no control character, at most 256 bytes.
fn topic_prefix_ok(prefix: &str) -> bool {
    !prefix.is_empty()
        && prefix.len() <= 256
        && !prefix.starts_with('$')
        && prefix.split('/').all(|level| {
            !level.is_empty() && !level.contains(['+', '#']) && !level.chars().any(char::is_control)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_default_ports_and_bad_ones_are_refused_without_echo() {
        let c = |url: &str| MqttBridgeConfig::new(url, "presenced");
        assert_eq!(
            c("mqtt://127.0.0.1:1884").broker().unwrap(),
            BrokerAddress {
                tls: false,
                host: "127.0.0.1".into(),
                port: 1884
            }
        );
        assert_eq!(c("mqtts://broker.example").broker().unwrap().port, 8883);
        assert_eq!(c("mqtt://broker.example/").broker().unwrap().port, 1883);
        assert_eq!(c("mqtt://[::1]:2000").broker().unwrap().host, "::1");
        for bad in [
            "http://x",
            "mqtt://",
            "mqtt://u:s3cret@host",
            "mqtt://host:0",
            "mqtt://host:99999",
            "mqtt://host/path",
        ] {
            let e = c(bad).validate().unwrap_err();
            assert!(
                e.contains("mqtt_bridge.url") && !e.contains("s3cret"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn validation_names_the_field() {
        let ok = MqttBridgeConfig::new("mqtt://127.0.0.1:1883", "presenced");
        assert_eq!(ok.validate(), Ok(()));
        let bad = |f: &dyn Fn(&mut MqttBridgeConfig)| {
            let mut c = ok.clone();
            f(&mut c);
            c.validate().unwrap_err()
        };
        assert!(bad(&|c| c.client_id.clear()).contains("client_id"));
        assert!(bad(&|c| c.topic_prefix = "a/+/b".into()).contains("topic_prefix"));
        assert!(bad(&|c| c.topic_prefix = "a//b".into()).contains("topic_prefix"));
        assert!(bad(&|c| c.topic_prefix = "#".into()).contains("topic_prefix"));
        assert!(bad(&|c| c.password = Some("pw".into())).contains("username"));
        assert!(bad(&|c| c.ca_file = Some("/ca.pem".into())).contains("ca_file"));
        assert!(bad(&|c| c.reconnect_min_ms = 0).contains("reconnect_min_ms"));
        assert!(bad(&|c| c.queue_capacity = 1).contains("queue_capacity"));
        assert!(bad(&|c| c.resync_interval_ms = 5).contains("resync_interval_ms"));
    }

    #[test]
    fn toml_keys_are_the_documented_ones() {
        let c: MqttBridgeConfig = toml::from_str(
            "url = \"mqtts://m.example:8883\"\nclient_id = \"p1\"\ntopic_prefix = \"acme/presence\"\n\
             format = \"protobuf\"\nshow = \"truth\"\nusername = \"u\"\npassword_file = \"/pw\"\n",
        )
        .unwrap();
        assert_eq!(c.format, PayloadFormat::Protobuf);
        assert_eq!(c.show, ShowPolicy::Truth);
        c.validate().unwrap();
        assert!(toml::from_str::<MqttBridgeConfig>(
            "url = \"mqtt://h\"\nclient_id = \"p\"\nnope = 1\n"
        )
        .is_err());
    }
}
