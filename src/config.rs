//! The broker's configuration: every limit and deadline of the spec as a default that an
//! operator can override from a TOML file or flags. `Config::default()` is the embedded
//! configuration `presenced` runs on with no arguments. This module only describes and checks
//! values; it never opens sockets or files other than the config file itself.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How the production example (`deploy/presenced.toml`) marks a secret to replace; a config
/// with one left is refused.
pub const PLACEHOLDER: &str = "REPLACE-ME";

/// What [`Config::redacted`] (and so `--print-config`) shows in place of a secret.
pub const REDACTED: &str = "<redacted>";

/// `scheme://user:password@host...` with the password replaced by [`REDACTED`] (a URL without
/// one is returned as is; a lone `user@` may be a token, so it is redacted too).
pub fn redact_url_password(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_string();
    };
    let userinfo = &rest[..at];
    let shown = match userinfo.split_once(':') {
        Some((user, _)) => format!("{user}:{REDACTED}"),
        None => REDACTED.to_string(),
    };
    format!("{}{shown}{}", &url[..scheme_end], &rest[at..])
}

/// The token secret used when the operator configures none. Public: for development only.
pub const DEV_SECRET: &str = "presenced-dev-secret-change-me";
/// The key id of [`DEV_SECRET`].
pub const DEV_KID: &str = "dev";

/// Why a configuration was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O failure.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("invalid config file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        source: Box<toml::de::Error>,
    },
    /// A value is out of range.
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// Everything the broker can be told. Field groups mirror the TOML sections.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// TLS listener address.
    pub listen: SocketAddr,
    /// Optional plain-TCP listener for trusted networks and benchmarks; off by default.
    pub plain_listen: Option<SocketAddr>,
    /// Folder for persistent data (subscriptions, last-seen).
    pub data_dir: PathBuf,
    /// Certificates.
    pub tls: TlsConfig,
    /// Prometheus endpoint.
    pub metrics: MetricsConfig,
    /// Token verification keys.
    pub auth: AuthConfig,
    /// Session deadlines and behaviour.
    pub session: SessionConfig,
    /// Request and resource limits.
    pub limits: LimitsConfig,
    /// Outbound queues and slow consumers.
    pub fanout: FanoutConfig,
    /// Channel presence.
    pub channels: ChannelsConfig,
    /// Cluster mode on NATS; absent: a single node that needs no NATS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterConfig>,
    /// The admin HTTP API for the application's backend; serves once a key is configured.
    pub admin: crate::admin::AdminConfig,
    /// Webhook endpoints (`[[webhooks]]`), each with its own queue and delivery task.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub webhooks: Vec<crate::webhooks::WebhookConfig>,
    /// WebSocket listeners for browsers; off until a listen address is set.
    pub websocket: crate::ws::WebSocketConfig,
    /// Privacy caps: block lists, approvals, pending requests.
    pub privacy: crate::privacy::PrivacyConfig,
    /// The MQTT bridge (`[mqtt_bridge]`): presence as retained MQTT messages; absent: off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mqtt_bridge: Option<crate::mqtt_bridge::MqttBridgeConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 7883)),
            plain_listen: None,
            data_dir: PathBuf::from("presenced-data"),
            tls: TlsConfig::default(),
            metrics: MetricsConfig::default(),
            auth: AuthConfig::default(),
            session: SessionConfig::default(),
            limits: LimitsConfig::default(),
            fanout: FanoutConfig::default(),
            channels: ChannelsConfig::default(),
            cluster: None,
            admin: crate::admin::AdminConfig::default(),
            webhooks: Vec::new(),
            websocket: crate::ws::WebSocketConfig::default(),
            privacy: crate::privacy::PrivacyConfig::default(),
            mqtt_bridge: None,
        }
    }
}

/// Server certificate and key, and session resumption. When both files are unset the embedded
/// development certificate for `localhost`/`127.0.0.1` (the one in `certs-dev/`) is used, with
/// a warning.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain, server certificate first.
    pub cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, SEC1 or PKCS#1).
    pub key: Option<PathBuf>,
    /// Issue stateless session tickets (TLS 1.3 and 1.2), so a reconnecting client resumes
    /// without a certificate signature; the server keeps nothing per connection.
    pub tickets: bool,
    /// A file whose bytes (at least 32, surrounding whitespace trimmed) seed the ticket keys;
    /// nodes with the same file accept each other's tickets, also across restarts. Unset: a
    /// random key per period in this process, or in cluster mode one shared through NATS.
    pub ticket_secret_file: Option<PathBuf>,
    /// Seconds per ticket-key period: tickets are sealed with the current period's key and
    /// accepted during the next period too, so one lives 1 to 2 periods. Same on every node.
    pub ticket_rotation_secs: u64,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert: None,
            key: None,
            tickets: true,
            ticket_secret_file: None,
            ticket_rotation_secs: crate::tls_tickets::DEFAULT_ROTATION_SECS,
        }
    }
}

/// The Prometheus metrics endpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Serve `/metrics` at all.
    pub enabled: bool,
    /// Where to serve it.
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
        }
    }
}

/// HMAC keys for tokens, by key id (`kid`), so keys can rotate: add the new key, issue tokens
/// with its `kid`, remove the old one when its tokens have expired.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Key id → shared secret.
    pub secrets: BTreeMap<String, String>,
    /// Key used for tokens without a `kid` header.
    pub default_kid: String,
    /// Allowed clock skew when checking `exp` and `nbf`, in seconds.
    pub leeway_secs: u64,
    /// When set, tokens must carry this `iss`.
    pub issuer: Option<String>,
    /// When set, tokens must carry this `aud` (a string, or an array containing it).
    pub audience: Option<String>,
    /// Longest token lifetime accepted: a token whose `exp` is further ahead is refused. Also
    /// how long an admin revocation is kept (no token issued before it can outlive it).
    pub max_token_lifetime_secs: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            secrets: BTreeMap::from([(DEV_KID.to_string(), DEV_SECRET.to_string())]),
            default_kid: DEV_KID.to_string(),
            leeway_secs: 0,
            issuer: None,
            audience: None,
            max_token_lifetime_secs: 30 * 86_400,
        }
    }
}

impl AuthConfig {
    /// True when the public development secret is among the keys.
    pub fn uses_dev_secret(&self) -> bool {
        self.secrets.values().any(|s| s == DEV_SECRET)
    }
}

/// Session deadlines (SPEC §2).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SessionConfig {
    /// TLS handshake deadline.
    pub handshake_timeout_ms: u64,
    /// Deadline for the first frame (Connect) after the handshake.
    pub connect_timeout_ms: u64,
    /// Deadline to finish a frame once its first byte arrived.
    pub partial_frame_timeout_ms: u64,
    /// Keepalive used when the client asks for 0.
    pub keepalive_default_secs: u32,
    /// Lowest keepalive a client may get.
    pub keepalive_min_secs: u32,
    /// Highest keepalive a client may get.
    pub keepalive_max_secs: u32,
    /// How long a lost connection's device stays visible before watchers are told (0–300 s).
    pub grace_period_ms: u64,
    /// Broadcast OFFLINE events to watchers at all (tim's `presence.offline.block` = false).
    pub offline_broadcast: bool,
    /// How long shutdown waits for connections to drain.
    pub shutdown_timeout_ms: u64,
    /// Reconnect hint sent to clients at shutdown.
    pub shutdown_reconnect_hint_ms: u64,
    /// Close a session when its token's `exp` passes (Close code TOKEN_EXPIRED), so the client
    /// reconnects with a fresh token.
    pub close_on_token_expiry: bool,
    /// Test builds only: a connection task panics when it receives a SetPresence whose status
    /// is this text, so tests can show that a panicking task leaves nothing behind. Never read
    /// from a file or flag.
    #[doc(hidden)]
    #[serde(skip)]
    pub panic_on_status: Option<String>,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            handshake_timeout_ms: 10_000,
            connect_timeout_ms: 5_000,
            partial_frame_timeout_ms: 10_000,
            keepalive_default_secs: 60,
            keepalive_min_secs: 10,
            keepalive_max_secs: 300,
            grace_period_ms: 5_000,
            offline_broadcast: true,
            shutdown_timeout_ms: 5_000,
            shutdown_reconnect_hint_ms: 1_000,
            close_on_token_expiry: true,
            panic_on_status: None,
        }
    }
}

impl SessionConfig {
    /// The keepalive applied for a client's wish.
    pub fn clamp_keepalive(&self, wished_secs: u32) -> u32 {
        let wished = if wished_secs == 0 {
            self.keepalive_default_secs
        } else {
            wished_secs
        };
        wished.clamp(self.keepalive_min_secs, self.keepalive_max_secs)
    }
}

/// Request and resource limits (SPEC §1, §3, §8).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Frame cap before Connect succeeds, bytes.
    pub max_frame_bytes_pre_auth: u32,
    /// Frame cap after Connect, bytes.
    pub max_frame_bytes: u32,
    /// Ids per subscribe/unsubscribe/query/directed request.
    pub max_ids_per_request: u32,
    /// Subscriptions a user may hold; beyond it the shortest-lived is evicted.
    pub max_subscriptions: u32,
    /// Subscription expiry when the request gives none, seconds.
    pub default_expiry_secs: u64,
    /// Longest subscription expiry, seconds.
    pub max_expiry_secs: u64,
    /// Custom state pairs per user.
    pub max_state_pairs: u32,
    /// State key length, bytes.
    pub max_state_key_bytes: u32,
    /// State value length, bytes.
    pub max_state_value_bytes: u32,
    /// Status text length, bytes.
    pub max_status_bytes: u32,
    /// Description length, bytes.
    pub max_description_bytes: u32,
    /// Connect-time user data, total bytes of keys and values.
    pub max_user_data_bytes: u32,
    /// Page size for listings.
    pub max_page_size: u32,
    /// Presence publishes (and directed presences) per second per connection.
    pub publish_rate_per_sec: u32,
    /// Publish burst.
    pub publish_burst: u32,
    /// Requests of any kind per second per connection.
    pub request_rate_per_sec: u32,
    /// Request burst.
    pub request_burst: u32,
    /// Connections the broker holds at once.
    pub max_connections: u32,
    /// TLS handshakes in flight at once.
    pub max_handshakes_in_flight: u32,
    /// TLS handshakes in flight from one address; further ones from it wait for a slot.
    pub max_handshakes_per_address: u32,
    /// New connections accepted per second (beyond the burst).
    pub accept_rate_per_sec: u32,
    /// Accept burst.
    pub accept_burst: u32,
    /// Requests whose replies are not yet written, per connection, before the broker stops
    /// reading that connection.
    pub max_requests_in_flight: u32,
    /// Bytes of replies not yet written, per connection, before the broker stops reading that
    /// connection.
    pub max_reply_bytes_in_flight: u32,
    /// Failed Connects from one address within the window that ban it.
    pub auth_failures_before_ban: u32,
    /// The window for counting failed Connects, seconds.
    pub auth_failure_window_secs: u64,
    /// How long a ban lasts, seconds.
    pub auth_ban_secs: u64,
    /// Delay added to a refusal per recent failure from the same address, milliseconds.
    pub auth_failure_delay_ms: u64,
    /// Longest refusal delay, milliseconds.
    pub auth_failure_max_delay_ms: u64,
    /// Addresses the failure tracker remembers at most.
    pub auth_max_tracked_addresses: u32,
    /// Connections one address (an IPv6 /64 counts as one) may hold at once.
    pub max_connections_per_address: u32,
    /// New connections per second from one address (beyond its burst); its share of the
    /// global accept rate, so one source cannot spend everyone's.
    pub accept_rate_per_address_per_sec: u32,
    /// Accept burst of one address.
    pub accept_burst_per_address: u32,
    /// Devices one user may have connected (or in their grace period) at once.
    pub max_devices_per_user: u32,
    /// What a Connect beyond `max_devices_per_user` does: `"evict_oldest"` closes the user's
    /// oldest session (Close DEVICE_LIMIT), `"refuse"` refuses the new one (Error DEVICE_LIMIT).
    pub device_limit_policy: DeviceLimitPolicy,
}

/// What a Connect beyond the per-user device cap does.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum DeviceLimitPolicy {
    /// Close the user's oldest session to make room (the common choice of chat services).
    #[default]
    EvictOldest,
    /// Refuse the new Connect.
    Refuse,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_frame_bytes_pre_auth: 4 * 1024,
            max_frame_bytes: 64 * 1024,
            max_ids_per_request: 100,
            max_subscriptions: 3_000,
            default_expiry_secs: 7 * 24 * 3600,
            max_expiry_secs: 30 * 24 * 3600,
            max_state_pairs: 32,
            max_state_key_bytes: 64,
            max_state_value_bytes: 256,
            max_status_bytes: 256,
            max_description_bytes: 256,
            max_user_data_bytes: 1024,
            max_page_size: 100,
            publish_rate_per_sec: 10,
            publish_burst: 20,
            request_rate_per_sec: 100,
            request_burst: 200,
            max_connections: 100_000,
            max_handshakes_in_flight: 256,
            max_handshakes_per_address: 32,
            accept_rate_per_sec: 1_000,
            accept_burst: 2_000,
            max_requests_in_flight: 32,
            max_reply_bytes_in_flight: 1024 * 1024,
            auth_failures_before_ban: 10,
            auth_failure_window_secs: 60,
            auth_ban_secs: 300,
            auth_failure_delay_ms: 200,
            auth_failure_max_delay_ms: 2_000,
            auth_max_tracked_addresses: 100_000,
            max_connections_per_address: 10_000,
            accept_rate_per_address_per_sec: 250,
            accept_burst_per_address: 500,
            max_devices_per_user: 16,
            device_limit_policy: DeviceLimitPolicy::EvictOldest,
        }
    }
}

/// Outbound queues (SPEC §6).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FanoutConfig {
    /// Frames queued per connection before events are coalesced.
    pub queue_capacity: u32,
    /// A connection whose socket accepts nothing for this long is disconnected.
    pub slow_consumer_timeout_ms: u64,
}

impl Default for FanoutConfig {
    fn default() -> Self {
        FanoutConfig {
            queue_capacity: 256,
            slow_consumer_timeout_ms: 10_000,
        }
    }
}

/// Channel presence (SPEC §4).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ChannelsConfig {
    /// Channels one connection may join.
    pub max_joined_per_connection: u32,
    /// Channels one connection may watch without joining.
    pub max_watched_per_connection: u32,
    /// Above this many members a channel batches its events into INTERVAL events.
    pub announce_threshold: u32,
    /// How often INTERVAL events are sent, milliseconds.
    pub interval_ms: u64,
}

impl Default for ChannelsConfig {
    fn default() -> Self {
        ChannelsConfig {
            max_joined_per_connection: 128,
            max_watched_per_connection: 128,
            announce_threshold: 50,
            interval_ms: 5_000,
        }
    }
}

/// Cluster mode: several presenced nodes share one presence over NATS (core NATS for
/// presence deltas and heartbeats).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// NATS servers to connect to (`nats://host:port`); the client fails over between them.
    pub nats_urls: Vec<String>,
    /// This node's id, unique in the cluster. Default: host name and listen port.
    pub node_id: Option<String>,
    /// Subject prefix, so several clusters can share one NATS.
    pub subject_prefix: String,
    /// Heartbeat period, milliseconds.
    pub heartbeat_ms: u64,
    /// A peer silent this long (while this node's own NATS link is up) is dead, milliseconds.
    pub peer_timeout_ms: u64,
    /// This node fences itself after its NATS link has been down this long, or when its own
    /// heartbeat loop was stalled this long (the process was stopped), milliseconds.
    pub fence_after_ms: u64,
    /// How long start-up waits for NATS before giving up, milliseconds.
    pub connect_timeout_ms: u64,
    /// How long start-up listens for peers' heartbeats (and fetches their state) before the
    /// listener opens, milliseconds.
    pub join_wait_ms: u64,
    /// Deltas queued for NATS before new ones are dropped (the receivers then repair the gap
    /// by state transfer).
    pub delta_queue: usize,
    /// Replicas of the JetStream subscription log (3 for a 3-server NATS cluster; at most the
    /// number of JetStream servers).
    pub subscription_replicas: usize,
    /// How long a Subscribe/Unsubscribe waits for the log's quorum ack before the client gets
    /// UNAVAILABLE, milliseconds.
    pub log_ack_timeout_ms: u64,
    /// How long start-up may take to replay the subscription log, milliseconds.
    pub log_replay_timeout_ms: u64,
    /// Use only `nats_urls`, never the other servers a NATS cluster advertises (for a node
    /// that must reach NATS through one path, e.g. a proxy or a fixed set of routes).
    pub ignore_discovered_servers: bool,
    /// How long the cluster's event log keeps backend events (`GET /v1/events` on any node,
    /// and where a new webhook deliverer resumes).
    pub event_retention_secs: u64,
    /// Most events the cluster's event log keeps (the oldest go first).
    pub event_log_max_events: i64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            nats_urls: vec!["nats://127.0.0.1:4222".to_string()],
            node_id: None,
            subject_prefix: "presenced".to_string(),
            heartbeat_ms: 1_000,
            peer_timeout_ms: 3_000,
            fence_after_ms: 3_000,
            connect_timeout_ms: 10_000,
            join_wait_ms: 1_500,
            delta_queue: 65_536,
            ignore_discovered_servers: false,
            subscription_replicas: 3,
            log_ack_timeout_ms: 3_000,
            log_replay_timeout_ms: 120_000,
            event_retention_secs: 3_600,
            event_log_max_events: 1_000_000,
        }
    }
}

impl ClusterConfig {
    /// The default node id: this host's name and the listen port.
    pub fn default_node_id(listen: SocketAddr) -> String {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".to_string());
        format!("{host}-{}", listen.port())
    }
}

impl Config {
    /// Reads a TOML file; fields it leaves out keep their defaults.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_toml(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source: Box::new(source),
        })
    }

    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Config, toml::de::Error> {
        toml::from_str(text)
    }

    /// The effective configuration as TOML (for `--print-config`).
    pub fn to_toml(&self) -> String {
        let redacted = self.redacted();
        let mut out = toml::to_string_pretty(&redacted)
            .unwrap_or_else(|e| format!("# cannot render config: {e}\n"));
        if self.cluster.is_none() {
            out.push_str(
                "\n# [cluster] is off: a single node, no NATS. Turn it on with\n\
                 # [cluster]\n# nats_urls = [\"nats://127.0.0.1:4222\"]\n\
                 # node_id = \"<host name>-<listen port>\"   (default)\n\
                 # or the flags --cluster-nats URL (repeatable) and --node-id ID.\n",
            );
        }
        out
    }

    /// Where a secret still holds the production example's placeholder (it starts with
    /// [`PLACEHOLDER`]): a broker started on the unedited example would sign and accept with
    /// secrets anyone can read, so it refuses to start.
    fn placeholder_secret(&self) -> Option<String> {
        let is = |s: &str| s.starts_with(PLACEHOLDER);
        if let Some((kid, _)) = self.auth.secrets.iter().find(|(_, s)| is(s)) {
            return Some(format!("auth.secrets.{kid}"));
        }
        if let Some((id, _)) = self.admin.keys.iter().find(|(_, k)| is(&k.key)) {
            return Some(format!("admin.keys.{id}.key"));
        }
        if let Some(bridge) = &self.mqtt_bridge {
            if bridge.password.as_deref().is_some_and(is) {
                return Some("mqtt_bridge.password".into());
            }
        }
        self.webhooks.iter().enumerate().find_map(|(i, hook)| {
            hook.secrets
                .iter()
                .find(|(_, s)| is(s))
                .map(|(kid, _)| format!("webhooks[{i}].secrets.{kid}"))
        })
    }

    /// This config with every secret replaced by [`REDACTED`], for printing: token secrets
    /// (except the public development one), admin keys, webhook signing secrets, the password
    /// in a NATS or MQTT URL and the MQTT bridge's password. Key ids, users and everything else are kept.
    pub fn redacted(&self) -> Config {
        let mut c = self.clone();
        for secret in c.auth.secrets.values_mut() {
            if secret != DEV_SECRET {
                *secret = REDACTED.to_string();
            }
        }
        for key in c.admin.keys.values_mut() {
            key.key = REDACTED.to_string();
        }
        for hook in &mut c.webhooks {
            hook.url = redact_url_password(&hook.url);
            for secret in hook.secrets.values_mut() {
                *secret = REDACTED.to_string();
            }
        }
        if let Some(cluster) = &mut c.cluster {
            for url in &mut cluster.nats_urls {
                *url = redact_url_password(url);
            }
        }
        if let Some(bridge) = &mut c.mqtt_bridge {
            bridge.url = redact_url_password(&bridge.url);
            if let Some(password) = &mut bridge.password {
                *password = REDACTED.to_string();
            }
        }
        c
    }

    /// Checks every value; the broker refuses to start on an error.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |msg: String| Err(ConfigError::Invalid(msg));
        self.privacy.validate().map_err(ConfigError::Invalid)?;
        if let Some(place) = self.placeholder_secret() {
            return bad(format!(
                "{place} is still the example's placeholder ({PLACEHOLDER}...): put fresh \
                 random bytes there (e.g. `openssl rand -base64 32`)"
            ));
        }
        if let Some(c) = &self.cluster {
            if c.nats_urls.is_empty() {
                return bad("cluster.nats_urls must name at least one NATS server".into());
            }
            if let Some(id) = &c.node_id {
                if id.is_empty() || id.len() > 128 || id.chars().any(char::is_control) {
                    return bad(
                        "cluster.node_id must be 1-128 bytes without control characters".into(),
                    );
                }
            }
            if c.subject_prefix.is_empty()
                || !c.subject_prefix.split('.').all(|t| {
                    !t.is_empty()
                        && t.chars()
                            .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-')
                })
            {
                return bad(
                    "cluster.subject_prefix must be dot-separated tokens of [A-Za-z0-9_-]".into(),
                );
            }
            if c.heartbeat_ms == 0 || c.peer_timeout_ms < 2 * c.heartbeat_ms {
                return bad(
                    "cluster.peer_timeout_ms must be at least twice cluster.heartbeat_ms (> 0)"
                        .into(),
                );
            }
            if c.fence_after_ms < 2 * c.heartbeat_ms {
                return bad(
                    "cluster.fence_after_ms must be at least twice cluster.heartbeat_ms".into(),
                );
            }
            if !(1..=5).contains(&c.subscription_replicas) {
                return bad("cluster.subscription_replicas must be 1 to 5".into());
            }
            if c.event_retention_secs == 0 || c.event_log_max_events < 1_000 {
                return bad(
                    "cluster.event_retention_secs must be positive and cluster.event_log_max_events at least 1000"
                        .into(),
                );
            }
            if c.delta_queue == 0 {
                return bad("cluster.delta_queue must be at least 1".into());
            }
        }
        self.admin.validate().map_err(ConfigError::Invalid)?;
        self.websocket.validate().map_err(ConfigError::Invalid)?;
        for (i, w) in self.webhooks.iter().enumerate() {
            w.validate(i).map_err(ConfigError::Invalid)?;
        }
        if let Some(bridge) = &self.mqtt_bridge {
            bridge.validate().map_err(ConfigError::Invalid)?;
        }
        let s = &self.session;
        let l = &self.limits;
        if self.auth.max_token_lifetime_secs == 0 {
            return bad("auth.max_token_lifetime_secs must be positive".into());
        }
        if self.auth.secrets.is_empty() {
            return bad("auth.secrets must hold at least one key".into());
        }
        if let Some((kid, _)) = self.auth.secrets.iter().find(|(_, v)| v.len() < 16) {
            return bad(format!("auth.secrets.{kid} must be at least 16 bytes"));
        }
        if !self.auth.secrets.contains_key(&self.auth.default_kid) {
            return bad(format!(
                "auth.default_kid {:?} is not among auth.secrets",
                self.auth.default_kid
            ));
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return bad("tls.cert and tls.key must be set together".into());
        }
        {
            use crate::tls_tickets::{MAX_ROTATION_SECS, MIN_ROTATION_SECS};
            let rotation = self.tls.ticket_rotation_secs;
            if !(MIN_ROTATION_SECS..=MAX_ROTATION_SECS).contains(&rotation) {
                return bad(format!(
                    "tls.ticket_rotation_secs must be in {MIN_ROTATION_SECS}..={MAX_ROTATION_SECS}"
                ));
            }
        }
        if s.keepalive_min_secs == 0 || s.keepalive_min_secs > s.keepalive_max_secs {
            return bad("session.keepalive_min_secs must be in 1..=keepalive_max_secs".into());
        }
        if s.grace_period_ms > 300_000 {
            return bad("session.grace_period_ms must be at most 300000".into());
        }
        for (name, v) in [
            ("session.handshake_timeout_ms", s.handshake_timeout_ms),
            ("session.connect_timeout_ms", s.connect_timeout_ms),
            (
                "session.partial_frame_timeout_ms",
                s.partial_frame_timeout_ms,
            ),
            (
                "fanout.slow_consumer_timeout_ms",
                self.fanout.slow_consumer_timeout_ms,
            ),
            ("channels.interval_ms", self.channels.interval_ms),
        ] {
            if v == 0 {
                return bad(format!("{name} must be positive"));
            }
        }
        if l.max_frame_bytes_pre_auth < 64 || l.max_frame_bytes < l.max_frame_bytes_pre_auth {
            return bad(
                "limits.max_frame_bytes_pre_auth must be >= 64 and <= max_frame_bytes".into(),
            );
        }
        if l.max_frame_bytes > 16 * 1024 * 1024 {
            return bad("limits.max_frame_bytes must be at most 16 MiB".into());
        }
        for (name, v) in [
            ("limits.max_ids_per_request", l.max_ids_per_request),
            ("limits.max_subscriptions", l.max_subscriptions),
            ("limits.max_page_size", l.max_page_size),
            ("limits.publish_rate_per_sec", l.publish_rate_per_sec),
            ("limits.publish_burst", l.publish_burst),
            ("limits.request_rate_per_sec", l.request_rate_per_sec),
            ("limits.request_burst", l.request_burst),
            ("limits.max_connections", l.max_connections),
            (
                "limits.max_connections_per_address",
                l.max_connections_per_address,
            ),
            (
                "limits.accept_rate_per_address_per_sec",
                l.accept_rate_per_address_per_sec,
            ),
            (
                "limits.accept_burst_per_address",
                l.accept_burst_per_address,
            ),
            ("limits.max_devices_per_user", l.max_devices_per_user),
            (
                "limits.max_reply_bytes_in_flight",
                l.max_reply_bytes_in_flight,
            ),
            (
                "limits.max_handshakes_in_flight",
                l.max_handshakes_in_flight,
            ),
            ("limits.accept_rate_per_sec", l.accept_rate_per_sec),
            (
                "limits.max_handshakes_per_address",
                l.max_handshakes_per_address,
            ),
            ("limits.accept_burst", l.accept_burst),
            ("limits.max_requests_in_flight", l.max_requests_in_flight),
            (
                "limits.auth_failures_before_ban",
                l.auth_failures_before_ban,
            ),
            (
                "limits.auth_max_tracked_addresses",
                l.auth_max_tracked_addresses,
            ),
            ("fanout.queue_capacity", self.fanout.queue_capacity),
            (
                "channels.max_joined_per_connection",
                self.channels.max_joined_per_connection,
            ),
            (
                "channels.max_watched_per_connection",
                self.channels.max_watched_per_connection,
            ),
        ] {
            if v == 0 {
                return bad(format!("{name} must be positive"));
            }
        }
        if l.default_expiry_secs == 0 || l.default_expiry_secs > l.max_expiry_secs {
            return bad("limits.default_expiry_secs must be in 1..=max_expiry_secs".into());
        }
        Ok(())
    }

    /// Deadline helpers.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.session.handshake_timeout_ms)
    }
    /// See [`SessionConfig::connect_timeout_ms`].
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.session.connect_timeout_ms)
    }
    /// See [`SessionConfig::partial_frame_timeout_ms`].
    pub fn partial_frame_timeout(&self) -> Duration {
        Duration::from_millis(self.session.partial_frame_timeout_ms)
    }
    /// See [`SessionConfig::grace_period_ms`].
    pub fn grace_period(&self) -> Duration {
        Duration::from_millis(self.session.grace_period_ms)
    }
    /// The auth-failure guard's settings.
    pub fn auth_guard(&self) -> crate::auth_guard::AuthGuardConfig {
        let l = &self.limits;
        crate::auth_guard::AuthGuardConfig {
            failures_before_ban: l.auth_failures_before_ban,
            window: Duration::from_secs(l.auth_failure_window_secs),
            ban: Duration::from_secs(l.auth_ban_secs),
            delay_per_failure: Duration::from_millis(l.auth_failure_delay_ms),
            max_delay: Duration::from_millis(l.auth_failure_max_delay_ms),
            max_tracked: l.auth_max_tracked_addresses as usize,
        }
    }

    /// See [`FanoutConfig::slow_consumer_timeout_ms`].
    pub fn slow_consumer_timeout(&self) -> Duration {
        Duration::from_millis(self.fanout.slow_consumer_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholder_secrets_are_refused_wherever_they_are() {
        let mut c = Config::default();
        c.validate().unwrap();
        let mut bridge = crate::mqtt_bridge::MqttBridgeConfig::new("mqtt://127.0.0.1:1883", "p1");
        bridge.password = Some("REPLACE-ME-mqtt".into());
        c.mqtt_bridge = Some(bridge);
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("mqtt_bridge.password"), "{err}");
        c.mqtt_bridge = None;
        c.auth
            .secrets
            .insert("k9".into(), "REPLACE-ME-token".into());
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("auth.secrets.k9"), "{err}");
    }

    #[test]
    fn urls_lose_their_password_and_nothing_else() {
        for (url, shown) in [
            ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
            ("nats://u:p@h:4222", "nats://u:<redacted>@h:4222"),
            ("nats://tok@h", "nats://<redacted>@h"),
            ("tls://u:p:q@h/x@y", "tls://u:<redacted>@h/x@y"),
            ("nats://h/path?a=b@c", "nats://h/path?a=b@c"),
            ("no-scheme:p@h", "no-scheme:p@h"),
            ("", ""),
        ] {
            assert_eq!(redact_url_password(url), shown, "{url}");
        }
    }

    #[test]
    fn defaults_validate_and_round_trip_through_toml() {
        let config = Config::default();
        config.validate().unwrap();
        let again = Config::from_toml(&config.to_toml()).unwrap();
        assert_eq!(config, again);
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = Config::from_toml("[session]\nkeepalive = 3\n").unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn partial_file_keeps_defaults() {
        let config = Config::from_toml("[session]\ngrace_period_ms = 0\n").unwrap();
        assert_eq!(config.session.grace_period_ms, 0);
        assert_eq!(config.session.keepalive_default_secs, 60);
    }

    #[test]
    fn keepalive_is_clamped() {
        let s = SessionConfig::default();
        assert_eq!(s.clamp_keepalive(0), 60);
        assert_eq!(s.clamp_keepalive(1), 10);
        assert_eq!(s.clamp_keepalive(100_000), 300);
        assert_eq!(s.clamp_keepalive(45), 45);
    }

    #[test]
    fn out_of_range_values_are_errors_not_panics() {
        let mut c = Config::default();
        c.session.grace_period_ms = 301_000;
        assert!(c.validate().is_err());
        let mut c = Config::default();
        c.auth.default_kid = "nope".into();
        assert!(c.validate().is_err());
        let mut c = Config::default();
        c.limits.max_frame_bytes = 10;
        assert!(c.validate().is_err());
        // A zero period would panic the channel interval task after start.
        let mut c = Config::default();
        c.channels.interval_ms = 0;
        assert!(c.validate().is_err());
    }

    #[test]
    fn tls_tickets_are_on_by_default_and_their_rotation_is_bounded() {
        let c = Config::default();
        assert!(c.tls.tickets);
        assert_eq!(c.tls.ticket_rotation_secs, 21_600);
        let c = Config::from_toml(
            "[tls]\ntickets = false\nticket_secret_file = \"/etc/presenced/ticket.key\"\nticket_rotation_secs = 3600\n",
        )
        .unwrap();
        assert!(!c.tls.tickets);
        assert_eq!(c.tls.ticket_rotation_secs, 3600);
        c.validate().unwrap();
        for bad in [0, 599, 302_401] {
            let mut c = Config::default();
            c.tls.ticket_rotation_secs = bad;
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains("tls.ticket_rotation_secs"), "{err}");
        }
    }
}
