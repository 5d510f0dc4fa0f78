//! What the bridge writes on the broker: topic names and payloads. User presence as JSON
//! ([`UserPayload`]) or as the protocol's `Presence` message, channel occupancy as JSON, the
//! bridge status strings, and the parsing of a retained topic back into what it is about. Pure
//! functions: no clock (the caller passes `ts_ms`), no I/O.

use prost::Message;
use serde::{Deserialize, Serialize};

use super::config::PayloadFormat;
use crate::model::{Availability, PresenceSnapshot};

/// The bridge status payload while connected (retained).
pub const STATUS_ONLINE: &str = "online";
/// The bridge status payload of its Last Will and of a clean stop (retained).
pub const STATUS_OFFLINE: &str = "offline";

/// The JSON on `<prefix>/users/<user>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserPayload {
    /// User id.
    pub user: String,
    /// Whether the user is shown online.
    pub online: bool,
    /// `online`, `away`, `xa`, `dnd` or `offline`.
    pub availability: String,
    /// Application code.
    pub show: u16,
    /// Status text.
    pub status: String,
    /// Devices connected (live or in their grace period).
    pub devices: u32,
    /// Last online, ms since the epoch; 0 when online now or never seen.
    pub last_seen_ms: u64,
    /// The user's presence version (increases with every change).
    pub version: u64,
    /// When the bridge published this, ms since the epoch.
    pub ts_ms: u64,
}

/// The JSON on `<prefix>/channels/<channel>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelPayload {
    /// Channel name.
    pub channel: String,
    /// Distinct users in the channel.
    pub occupancy: u32,
    /// When the bridge published this, ms since the epoch.
    pub ts_ms: u64,
}

/// The topic names of one bridge.
#[derive(Debug, Clone)]
pub(crate) struct Topics {
    prefix: String,
    status: String,
}

/// What a topic under the prefix is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TopicSubject {
    /// `<prefix>/users/<user>`.
    User(String),
    /// `<prefix>/channels/<channel>`.
    Channel(String),
}

impl Topics {
    /// Topics under `prefix` for the bridge `client_id`.
    pub(crate) fn new(prefix: &str, client_id: &str) -> Topics {
        Topics {
            prefix: prefix.to_string(),
            status: format!("{prefix}/bridge/{client_id}"),
        }
    }

    /// `<prefix>/users/<user>`, or `None` when the id cannot be a topic level (it holds `/`,
    /// `+`, `#` or NUL, or is empty): such a user is not bridged.
    pub(crate) fn user(&self, user: &str) -> Option<String> {
        level_ok(user).then(|| format!("{}/users/{user}", self.prefix))
    }

    /// `<prefix>/channels/<channel>`, or `None` as for [`Topics::user`].
    pub(crate) fn channel(&self, channel: &str) -> Option<String> {
        level_ok(channel).then(|| format!("{}/channels/{channel}", self.prefix))
    }

    /// `<prefix>/bridge/<client_id>`.
    pub(crate) fn status(&self) -> &str {
        &self.status
    }

    /// The filters the retained scan subscribes to.
    pub(crate) fn scan_filters(&self) -> [String; 2] {
        [
            format!("{}/users/+", self.prefix),
            format!("{}/channels/+", self.prefix),
        ]
    }

    /// What `topic` is about, when it is a user or channel topic of this prefix.
    pub(crate) fn parse(&self, topic: &str) -> Option<TopicSubject> {
        let rest = topic.strip_prefix(&self.prefix)?.strip_prefix('/')?;
        if let Some(user) = rest.strip_prefix("users/") {
            return level_ok(user).then(|| TopicSubject::User(user.to_string()));
        }
        if let Some(channel) = rest.strip_prefix("channels/") {
            return level_ok(channel).then(|| TopicSubject::Channel(channel.to_string()));
        }
        None
    }
}

/// Whether `s` can be one topic level of a topic name.
fn level_ok(s: &str) -> bool {
    !s.is_empty() && s.len() <= 1024 && !s.contains(['/', '+', '#', '\0'])
}

/// The JSON view of `p` (whatever the payload format; also the fingerprint's input).
pub(crate) fn user_payload(p: &PresenceSnapshot, ts_ms: u64) -> UserPayload {
    UserPayload {
        user: p.user_id.clone(),
        online: p.availability != Availability::Offline,
        availability: p.availability.name().to_string(),
        show: p.show,
        status: p.status.clone(),
        devices: u32::try_from(p.devices.len()).unwrap_or(u32::MAX),
        last_seen_ms: p.last_seen_ms,
        version: p.version,
        ts_ms,
    }
}

/// The bytes published on a user's topic.
pub(crate) fn encode_user(p: &PresenceSnapshot, format: PayloadFormat, ts_ms: u64) -> Vec<u8> {
    match format {
        PayloadFormat::Json => serde_json::to_vec(&user_payload(p, ts_ms)).unwrap_or_default(),
        PayloadFormat::Protobuf => crate::wire::presence_to_pb(p).encode_to_vec(),
    }
}

/// The bytes published on a channel's topic; empty (clears the retained message) at 0.
pub(crate) fn encode_channel(channel: &str, occupancy: u32, ts_ms: u64) -> Vec<u8> {
    if occupancy == 0 {
        return Vec::new();
    }
    serde_json::to_vec(&ChannelPayload {
        channel: channel.to_string(),
        occupancy,
        ts_ms,
    })
    .unwrap_or_default()
}

/// Whether a retained user payload (JSON or protobuf, whatever the format configured now) shows
/// the user offline. Garbage does not: it is corrected like a stale online payload.
pub(crate) fn says_offline(bytes: &[u8]) -> bool {
    if let Ok(json) = serde_json::from_slice::<UserPayload>(bytes) {
        return !json.online;
    }
    match crate::pb::Presence::decode(bytes) {
        Ok(p) => !p.user_id.is_empty() && p.availability == crate::pb::Availability::Offline as i32,
        Err(_) => false,
    }
}

/// A digest of what a user's topic shows, publication time left out: equal digests need no
/// new publication (the periodic pass only publishes changes).
pub(crate) fn user_fingerprint(p: &PresenceSnapshot) -> u64 {
    let payload = user_payload(p, 0);
    let bytes = serde_json::to_vec(&payload).unwrap_or_default();
    fnv1a(&bytes)
}

/// A channel's digest ([`user_fingerprint`]'s counterpart).
pub(crate) fn channel_fingerprint(occupancy: u32) -> u64 {
    fnv1a(&occupancy.to_be_bytes())
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_round_trip_and_refuse_wildcards() {
        let t = Topics::new("acme/presence", "p1");
        assert_eq!(t.user("alice").unwrap(), "acme/presence/users/alice");
        assert_eq!(t.status(), "acme/presence/bridge/p1");
        assert_eq!(
            t.parse("acme/presence/users/alice"),
            Some(TopicSubject::User("alice".into()))
        );
        assert_eq!(
            t.parse("acme/presence/channels/room"),
            Some(TopicSubject::Channel("room".into()))
        );
        assert_eq!(t.parse("acme/presence/bridge/p1"), None);
        assert_eq!(t.parse("acme/presenceX/users/a"), None);
        assert_eq!(t.parse("acme/presence/users/a/b"), None);
        assert!(t.user("a/b").is_none() && t.user("a+").is_none() && t.user("").is_none());
    }

    #[test]
    fn payloads_decode() {
        let mut p = PresenceSnapshot::offline("alice", 42);
        p.version = 7;
        let json: UserPayload =
            serde_json::from_slice(&encode_user(&p, PayloadFormat::Json, 9)).unwrap();
        assert!(!json.online);
        assert_eq!((json.last_seen_ms, json.version, json.ts_ms), (42, 7, 9));
        assert_eq!(json.availability, "offline");
        let pb =
            crate::pb::Presence::decode(&encode_user(&p, PayloadFormat::Protobuf, 9)[..]).unwrap();
        assert_eq!(pb.user_id, "alice");
        assert_eq!(pb.version, 7);
        assert!(encode_channel("c", 0, 1).is_empty());
        assert!(says_offline(&encode_user(&p, PayloadFormat::Json, 9)));
        assert!(says_offline(&encode_user(&p, PayloadFormat::Protobuf, 9)));
        assert!(!says_offline(b"\xff garbage"));
        let c: ChannelPayload = serde_json::from_slice(&encode_channel("c", 3, 1)).unwrap();
        assert_eq!(c.occupancy, 3);
        // The fingerprint ignores the publication time but not the presence.
        let fp = user_fingerprint(&p);
        p.availability = Availability::Online;
        assert!(!says_offline(&encode_user(&p, PayloadFormat::Json, 9)));
        assert!(!says_offline(&encode_user(&p, PayloadFormat::Protobuf, 9)));
        p.status = "x".into();
        assert_ne!(fp, user_fingerprint(&p));
    }
}
