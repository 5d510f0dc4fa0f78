//! What nodes say to each other over NATS, as protobuf messages defined here (internal to the
//! cluster, not part of the client contract in `proto/`): the replication envelope (a delta or
//! a heartbeat, stamped with the sender's node id, incarnation and sequence number), the state
//! transfer request and page, and the conversions to and from the registry's replica types.
//! Also the subject names, with node ids encoded so that `.`, `*`, `>` and spaces in an id can
//! never change what a subject matches.

use std::collections::BTreeMap;

use prost::Message;

use crate::model::{Availability, CloseKind, OfflineReason};
use crate::registry::{DeviceRecord, Origin, ReplicaChange, UserFields};
use crate::store::LoggedOp;

/// Why a message from another node could not be used.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// Not a valid protobuf message of the expected type.
    #[error("undecodable cluster message: {0}")]
    Decode(#[from] prost::DecodeError),
    /// Decoded, but a field is out of range.
    #[error("invalid cluster message: {0}")]
    Invalid(&'static str),
}

/// One message on the replication subject.
#[derive(Clone, PartialEq, Message)]
pub struct Envelope {
    /// The sender's node id.
    #[prost(string, tag = "1")]
    pub node: String,
    /// The sender's incarnation.
    #[prost(uint64, tag = "2")]
    pub incarnation: u64,
    /// Delta: its sequence number (1, 2, ... per incarnation). Heartbeat: the last delta's.
    #[prost(uint64, tag = "3")]
    pub seq: u64,
    /// The sender's wall clock when sent, ms (for the replication-lag metric).
    #[prost(uint64, tag = "4")]
    pub sent_ms: u64,
    /// A session started or changed.
    #[prost(message, optional, tag = "5")]
    pub upsert: Option<Record>,
    /// A session ended.
    #[prost(message, optional, tag = "6")]
    pub remove: Option<Removal>,
    /// A heartbeat.
    #[prost(message, optional, tag = "7")]
    pub heartbeat: Option<Heartbeat>,
    /// A channel membership change.
    #[prost(message, optional, tag = "8")]
    pub channel: Option<ChannelChange>,
    /// A directed presence for recipients on other nodes.
    #[prost(message, optional, tag = "9")]
    pub directed: Option<Directed>,
}

/// A directed presence: the client event frame, encoded once by the sender's node.
#[derive(Clone, PartialEq, Message)]
pub struct Directed {
    #[prost(string, tag = "1")]
    pub sender: String,
    #[prost(bytes = "bytes", tag = "2")]
    pub frame: bytes::Bytes,
    #[prost(string, repeated, tag = "3")]
    pub recipients: Vec<String>,
}

/// A session's channel membership changed.
#[derive(Clone, PartialEq, Message)]
pub struct ChannelChange {
    /// 1 join, 2 leave, 3 member state.
    #[prost(uint32, tag = "1")]
    pub kind: u32,
    #[prost(string, tag = "2")]
    pub user_id: String,
    #[prost(string, tag = "3")]
    pub device_id: String,
    #[prost(uint64, tag = "4")]
    pub epoch: u64,
    #[prost(string, tag = "5")]
    pub channel: String,
    #[prost(btree_map = "string, string", tag = "6")]
    pub state: BTreeMap<String, String>,
    #[prost(uint64, tag = "7")]
    pub joined_at_ms: u64,
}

/// One channel membership in a state transfer.
#[derive(Clone, PartialEq, Message)]
pub struct MembershipRecord {
    #[prost(string, tag = "1")]
    pub channel: String,
    #[prost(btree_map = "string, string", tag = "2")]
    pub state: BTreeMap<String, String>,
    #[prost(uint64, tag = "3")]
    pub joined_at_ms: u64,
}

/// A (user, device) session.
#[derive(Clone, PartialEq, Message)]
pub struct Record {
    #[prost(string, tag = "1")]
    pub user_id: String,
    #[prost(string, tag = "2")]
    pub device_id: String,
    #[prost(uint64, tag = "3")]
    pub epoch: u64,
    #[prost(uint64, tag = "4")]
    pub rev: u64,
    #[prost(string, tag = "5")]
    pub platform: String,
    #[prost(uint32, tag = "6")]
    pub availability: u32,
    #[prost(uint64, tag = "7")]
    pub connected_since_ms: u64,
    #[prost(uint32, tag = "8")]
    pub show: u32,
    #[prost(string, tag = "9")]
    pub status: String,
    #[prost(string, tag = "10")]
    pub description: String,
    #[prost(btree_map = "string, string", tag = "11")]
    pub state: BTreeMap<String, String>,
    #[prost(btree_map = "string, string", tag = "12")]
    pub user_data: BTreeMap<String, String>,
    #[prost(uint64, tag = "13")]
    pub version: u64,
    /// State transfer: the session's channel memberships (`has_channels` set).
    #[prost(message, repeated, tag = "14")]
    pub channels: Vec<MembershipRecord>,
    #[prost(bool, tag = "15")]
    pub has_channels: bool,
    /// The holder lost the connection; the device is in its grace period there.
    #[prost(bool, tag = "16")]
    pub lingering: bool,
    /// The device is invisible on its own (per-device invisibility).
    #[prost(bool, tag = "17")]
    pub invisible: bool,
}

/// A session's end.
#[derive(Clone, PartialEq, Message)]
pub struct Removal {
    #[prost(string, tag = "1")]
    pub user_id: String,
    #[prost(string, tag = "2")]
    pub device_id: String,
    #[prost(uint64, tag = "3")]
    pub epoch: u64,
    #[prost(uint32, tag = "4")]
    pub reason: u32,
    #[prost(uint64, tag = "5")]
    pub version: u64,
    #[prost(uint64, tag = "6")]
    pub last_seen_ms: u64,
    /// 0: none; else the close code the holding node sends (see `close_to_u32`).
    #[prost(uint32, tag = "7")]
    pub close: u32,
}

/// "I am alive", once per heartbeat period.
#[derive(Clone, PartialEq, Message)]
pub struct Heartbeat {
    /// XOR digest of the sender's sessions, matching `Envelope::seq`.
    #[prost(uint64, tag = "1")]
    pub digest: u64,
    /// How many sessions the sender holds.
    #[prost(uint64, tag = "2")]
    pub sessions: u64,
    /// The sender's hybrid logical clock.
    #[prost(uint64, tag = "3")]
    pub hlc: u64,
    /// Incarnations the sender declared dead in the last minute (node ids)...
    #[prost(string, repeated, tag = "4")]
    pub dead_nodes: Vec<String>,
    /// ...and their incarnations, in the same order.
    #[prost(uint64, repeated, tag = "5")]
    pub dead_incarnations: Vec<u64>,
    /// The last privacy-log sequence the sender has applied (0 from a node without the
    /// field: it never confirms, so a wait on it answers UNAVAILABLE). A heartbeat is sent
    /// early whenever it moves, so a node waiting for every peer to hold a change hears soon.
    #[prost(uint64, tag = "6")]
    pub privacy_applied: u64,
}

/// Asks a node for its sessions after a cursor.
#[derive(Clone, PartialEq, Message)]
pub struct SyncRequest {
    #[prost(string, tag = "1")]
    pub requester: String,
    #[prost(string, tag = "2")]
    pub after_user: String,
    #[prost(string, tag = "3")]
    pub after_device: String,
    #[prost(bool, tag = "4")]
    pub has_cursor: bool,
}

/// One page of a node's sessions.
#[derive(Clone, PartialEq, Message)]
pub struct SyncPage {
    #[prost(string, tag = "1")]
    pub node: String,
    #[prost(uint64, tag = "2")]
    pub incarnation: u64,
    #[prost(uint64, tag = "3")]
    pub seq: u64,
    #[prost(uint64, tag = "4")]
    pub hlc: u64,
    #[prost(message, repeated, tag = "5")]
    pub records: Vec<Record>,
    #[prost(bool, tag = "6")]
    pub more: bool,
    /// Set when the node is fenced and has nothing to give.
    #[prost(bool, tag = "7")]
    pub fenced: bool,
}

/// Asks a node for the last-seen records it holds from `since_ms` on (a node that restarts
/// missed the OFFLINE deltas sent while it was down), after a (time, user) cursor.
#[derive(Clone, PartialEq, Message)]
pub struct LastSeenRequest {
    #[prost(uint64, tag = "1")]
    pub since_ms: u64,
    #[prost(uint64, tag = "2")]
    pub after_at_ms: u64,
    #[prost(string, tag = "3")]
    pub after_user: String,
    #[prost(bool, tag = "4")]
    pub has_cursor: bool,
}

/// One user's last-seen record.
#[derive(Clone, PartialEq, Message)]
pub struct LastSeenEntry {
    #[prost(string, tag = "1")]
    pub user: String,
    #[prost(uint64, tag = "2")]
    pub at_ms: u64,
    #[prost(uint64, tag = "3")]
    pub version: u64,
}

/// One page of last-seen records, ordered by (time, user).
#[derive(Clone, PartialEq, Message)]
pub struct LastSeenPage {
    #[prost(message, repeated, tag = "1")]
    pub entries: Vec<LastSeenEntry>,
    #[prost(bool, tag = "2")]
    pub more: bool,
}

/// One entry of the replicated subscription log (JetStream).
#[derive(Clone, PartialEq, Message)]
pub struct LogEntry {
    /// 1 subscribe, 2 unsubscribe, 3 snapshot (a rollup).
    #[prost(uint32, tag = "1")]
    pub kind: u32,
    #[prost(string, tag = "2")]
    pub subscriber: String,
    #[prost(string, repeated, tag = "3")]
    pub targets: Vec<String>,
    #[prost(uint64, tag = "4")]
    pub expires_at_ms: u64,
    #[prost(uint64, tag = "5")]
    pub now_ms: u64,
    #[prost(uint64, tag = "6")]
    pub cap: u64,
    /// Snapshot: every target's expiry, in `targets` order.
    #[prost(uint64, repeated, tag = "7")]
    pub expiries: Vec<u64>,
    /// The node that appended it.
    #[prost(string, tag = "8")]
    pub node: String,
}

impl LogEntry {
    /// The wire form of a store operation appended by `node`.
    pub fn from_op(op: &LoggedOp, node: &str) -> LogEntry {
        let mut e = LogEntry {
            node: node.to_string(),
            subscriber: op.subscriber().to_string(),
            ..LogEntry::default()
        };
        match op {
            LoggedOp::Subscribe {
                targets,
                expires_at_ms,
                now_ms,
                cap,
                ..
            } => {
                e.kind = 1;
                e.targets = targets.clone();
                e.expires_at_ms = *expires_at_ms;
                e.now_ms = *now_ms;
                e.cap = *cap as u64;
            }
            LoggedOp::Unsubscribe {
                targets, now_ms, ..
            } => {
                e.kind = 2;
                e.targets = targets.clone();
                e.now_ms = *now_ms;
            }
            LoggedOp::Revoke {
                before_ms,
                until_ms,
                ..
            } => {
                e.kind = 4;
                e.now_ms = *before_ms;
                e.expires_at_ms = *until_ms;
            }
            LoggedOp::Snapshot { entries, .. } => {
                e.kind = 3;
                e.targets = entries.iter().map(|(t, _)| t.clone()).collect();
                e.expiries = entries.iter().map(|(_, x)| *x).collect();
            }
        }
        e
    }

    /// Back to the store's form.
    pub fn into_op(self) -> Result<LoggedOp, WireError> {
        if self.subscriber.is_empty() {
            return Err(WireError::Invalid("log entry without a subscriber"));
        }
        Ok(match self.kind {
            1 => LoggedOp::Subscribe {
                subscriber: self.subscriber,
                targets: self.targets,
                expires_at_ms: self.expires_at_ms,
                now_ms: self.now_ms,
                cap: usize::try_from(self.cap).unwrap_or(usize::MAX),
            },
            2 => LoggedOp::Unsubscribe {
                subscriber: self.subscriber,
                targets: self.targets,
                now_ms: self.now_ms,
            },
            4 => LoggedOp::Revoke {
                user: self.subscriber,
                before_ms: self.now_ms,
                until_ms: self.expires_at_ms,
            },
            3 if self.expiries.len() == self.targets.len() => LoggedOp::Snapshot {
                subscriber: self.subscriber,
                entries: self.targets.into_iter().zip(self.expiries).collect(),
            },
            _ => return Err(WireError::Invalid("log entry kind")),
        })
    }
}

/// Encodes a subject token so that any id is one literal token: ids made only of
/// `[A-Za-z0-9_-]` pass as they are (readable in `nats sub`), anything else is `~` and the
/// lowercase hex of its bytes (`~` itself is never a plain-id character, so the two forms
/// cannot collide).
pub fn subject_token(id: &str) -> String {
    if !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return id.to_string();
    }
    let mut out = String::with_capacity(1 + 2 * id.len());
    out.push('~');
    for b in id.bytes() {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// The subjects of one cluster.
#[derive(Debug, Clone)]
pub struct Subjects {
    /// Deltas and heartbeats of every node.
    pub replication: String,
    /// Every subscription-log subject (the stream's filter).
    pub log_all: String,
    prefix: String,
}

impl Subjects {
    /// Subjects under `prefix`.
    pub fn new(prefix: &str) -> Subjects {
        Subjects {
            replication: format!("{prefix}.repl"),
            log_all: format!("{prefix}.subs.>"),
            prefix: prefix.to_string(),
        }
    }

    /// The subscription-log subject of one subscriber (its rollups replace only its entries).
    pub fn log(&self, subscriber: &str) -> String {
        format!("{}.subs.{}", self.prefix, subject_token(subscriber))
    }

    /// The subject an operation is appended on: the subscriber's, except revocations, which
    /// get their own (a subscriber's rollup replaces only its subscription entries).
    pub fn log_for(&self, op: &LoggedOp) -> String {
        match op {
            LoggedOp::Revoke { user, .. } => {
                format!("{}.subs.{}.revoke", self.prefix, subject_token(user))
            }
            _ => self.log(op.subscriber()),
        }
    }

    /// The JetStream stream holding the subscription log.
    pub fn stream(&self) -> String {
        self.stream_named("SUBSCRIPTIONS")
    }

    /// A JetStream stream's name under this prefix: `<PREFIX>_<suffix>`.
    pub fn stream_named(&self, suffix: &str) -> String {
        let name: String = self
            .prefix
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_uppercase()
                } else {
                    '_'
                }
            })
            .collect();
        format!("{name}_{suffix}")
    }

    /// Where `node` answers state transfer requests.
    pub fn sync(&self, node: &str) -> String {
        format!("{}.sync.{}", self.prefix, subject_token(node))
    }

    /// Where `node` answers last-seen catch-up requests.
    pub fn last_seen(&self, node: &str) -> String {
        format!("{}.lastseen.{}", self.prefix, subject_token(node))
    }
}

pub(crate) fn availability_to_u32(a: Availability) -> u32 {
    crate::wire::availability_to_pb(a) as i32 as u32
}

pub(crate) fn availability_from_u32(v: u32) -> Result<Availability, WireError> {
    match crate::wire::availability_from_pb(v as i32) {
        Ok(Some(a)) => Ok(a),
        _ => Err(WireError::Invalid("availability")),
    }
}

pub(crate) fn reason_to_u32(r: OfflineReason) -> u32 {
    crate::wire::offline_reason_to_pb(r) as i32 as u32
}

pub(crate) fn reason_from_u32(v: u32) -> Result<OfflineReason, WireError> {
    use crate::pb::OfflineReason as P;
    Ok(match P::try_from(v as i32) {
        Ok(P::Disconnect) => OfflineReason::Disconnect,
        Ok(P::Timeout) => OfflineReason::Timeout,
        Ok(P::ConnectionLost) => OfflineReason::ConnectionLost,
        Ok(P::TakenOver) => OfflineReason::TakenOver,
        Ok(P::Kicked) => OfflineReason::Kicked,
        Ok(P::ServerShutdown) => OfflineReason::ServerShutdown,
        _ => return Err(WireError::Invalid("offline reason")),
    })
}

fn close_to_u32(c: Option<CloseKind>) -> u32 {
    c.map(|k| crate::wire::close_code_to_pb(k) as i32 as u32)
        .unwrap_or(0)
}

fn close_from_u32(v: u32) -> Option<CloseKind> {
    use crate::pb::CloseCode as P;
    match P::try_from(v as i32).ok()? {
        P::DeviceLimit => Some(CloseKind::DeviceLimit),
        P::Kicked => Some(CloseKind::Kicked),
        P::TakenOver => Some(CloseKind::TakenOver),
        P::TokenExpired => Some(CloseKind::TokenExpired),
        _ => Some(CloseKind::TakenOver),
    }
}

impl Record {
    /// The wire form of a registry record.
    pub fn from_record(r: &DeviceRecord) -> Record {
        Record {
            user_id: r.user_id.clone(),
            device_id: r.device_id.clone(),
            epoch: r.epoch,
            rev: r.rev,
            platform: r.platform.clone(),
            availability: availability_to_u32(r.availability),
            connected_since_ms: r.connected_since_ms,
            show: u32::from(r.user.show),
            status: r.user.status.clone(),
            description: r.user.description.clone(),
            state: r.user.state.clone(),
            user_data: r.user.user_data.clone(),
            version: r.user.version,
            has_channels: r.channels.is_some(),
            lingering: r.lingering,
            invisible: r.invisible,
            channels: r
                .channels
                .iter()
                .flatten()
                .map(|(channel, state, joined_at_ms)| MembershipRecord {
                    channel: channel.clone(),
                    state: state.clone(),
                    joined_at_ms: *joined_at_ms,
                })
                .collect(),
        }
    }

    /// Back to the registry's form, checking what the registry relies on.
    pub fn into_record(self) -> Result<DeviceRecord, WireError> {
        if self.user_id.is_empty() || self.device_id.is_empty() {
            return Err(WireError::Invalid("empty user or device id"));
        }
        Ok(DeviceRecord {
            availability: availability_from_u32(self.availability)?,
            user_id: self.user_id,
            device_id: self.device_id,
            epoch: self.epoch,
            rev: self.rev,
            platform: self.platform,
            connected_since_ms: self.connected_since_ms,
            user: UserFields {
                show: u16::try_from(self.show).map_err(|_| WireError::Invalid("show"))?,
                status: self.status,
                description: self.description,
                state: self.state,
                user_data: self.user_data,
                version: self.version,
            },
            channels: if self.has_channels {
                let mut out = Vec::with_capacity(self.channels.len());
                for m in self.channels {
                    if m.channel.is_empty() {
                        return Err(WireError::Invalid("empty channel"));
                    }
                    out.push((m.channel, m.state, m.joined_at_ms));
                }
                Some(out)
            } else {
                None
            },
            lingering: self.lingering,
            invisible: self.invisible,
        })
    }
}

impl Envelope {
    /// A delta envelope.
    pub fn delta(origin: &Origin, seq: u64, change: &ReplicaChange) -> Envelope {
        let mut env = Envelope {
            node: origin.node.clone(),
            incarnation: origin.incarnation,
            seq,
            sent_ms: crate::now_ms(),
            ..Default::default()
        };
        match change {
            ReplicaChange::Upsert(r) => env.upsert = Some(Record::from_record(r)),
            ReplicaChange::Remove {
                user_id,
                device_id,
                epoch,
                reason,
                version,
                last_seen_ms,
                close,
            } => {
                env.remove = Some(Removal {
                    user_id: user_id.clone(),
                    device_id: device_id.clone(),
                    epoch: *epoch,
                    reason: reason_to_u32(*reason),
                    version: *version,
                    last_seen_ms: *last_seen_ms,
                    close: close_to_u32(*close),
                })
            }
            ReplicaChange::Directed {
                sender,
                frame,
                recipients,
            } => {
                env.directed = Some(Directed {
                    sender: sender.clone(),
                    frame: frame.clone(),
                    recipients: recipients.clone(),
                })
            }
            ReplicaChange::ChannelJoin {
                user_id,
                device_id,
                epoch,
                channel,
                state,
                joined_at_ms,
            } => {
                env.channel = Some(ChannelChange {
                    kind: 1,
                    user_id: user_id.clone(),
                    device_id: device_id.clone(),
                    epoch: *epoch,
                    channel: channel.clone(),
                    state: state.clone(),
                    joined_at_ms: *joined_at_ms,
                })
            }
            ReplicaChange::ChannelLeave {
                user_id,
                device_id,
                epoch,
                channel,
            } => {
                env.channel = Some(ChannelChange {
                    kind: 2,
                    user_id: user_id.clone(),
                    device_id: device_id.clone(),
                    epoch: *epoch,
                    channel: channel.clone(),
                    ..Default::default()
                })
            }
            ReplicaChange::ChannelState {
                user_id,
                device_id,
                epoch,
                channel,
                state,
            } => {
                env.channel = Some(ChannelChange {
                    kind: 3,
                    user_id: user_id.clone(),
                    device_id: device_id.clone(),
                    epoch: *epoch,
                    channel: channel.clone(),
                    state: state.clone(),
                    ..Default::default()
                })
            }
        }
        env
    }

    /// Decodes one message.
    pub fn decode_bytes(bytes: &[u8]) -> Result<Envelope, WireError> {
        let env = Envelope::decode(bytes)?;
        if env.node.is_empty() {
            return Err(WireError::Invalid("no node id"));
        }
        Ok(env)
    }

    /// The sender.
    pub fn origin(&self) -> Origin {
        Origin {
            node: self.node.clone(),
            incarnation: self.incarnation,
        }
    }

    /// The delta this envelope carries, if it is one.
    pub fn change(&self) -> Result<Option<ReplicaChange>, WireError> {
        if let Some(r) = &self.upsert {
            return Ok(Some(ReplicaChange::Upsert(r.clone().into_record()?)));
        }
        if let Some(r) = &self.remove {
            if r.user_id.is_empty() || r.device_id.is_empty() {
                return Err(WireError::Invalid("empty user or device id"));
            }
            return Ok(Some(ReplicaChange::Remove {
                user_id: r.user_id.clone(),
                device_id: r.device_id.clone(),
                epoch: r.epoch,
                reason: reason_from_u32(r.reason)?,
                version: r.version,
                last_seen_ms: r.last_seen_ms,
                close: if r.close == 0 {
                    None
                } else {
                    close_from_u32(r.close)
                },
            }));
        }
        if let Some(d) = &self.directed {
            if d.sender.is_empty() || d.frame.is_empty() {
                return Err(WireError::Invalid("empty directed presence"));
            }
            return Ok(Some(ReplicaChange::Directed {
                sender: d.sender.clone(),
                frame: d.frame.clone(),
                recipients: d.recipients.clone(),
            }));
        }
        if let Some(c) = &self.channel {
            if c.user_id.is_empty() || c.device_id.is_empty() || c.channel.is_empty() {
                return Err(WireError::Invalid("empty user, device or channel"));
            }
            let (user_id, device_id, epoch, channel) = (
                c.user_id.clone(),
                c.device_id.clone(),
                c.epoch,
                c.channel.clone(),
            );
            return Ok(Some(match c.kind {
                1 => ReplicaChange::ChannelJoin {
                    user_id,
                    device_id,
                    epoch,
                    channel,
                    state: c.state.clone(),
                    joined_at_ms: c.joined_at_ms,
                },
                2 => ReplicaChange::ChannelLeave {
                    user_id,
                    device_id,
                    epoch,
                    channel,
                },
                3 => ReplicaChange::ChannelState {
                    user_id,
                    device_id,
                    epoch,
                    channel,
                    state: c.state.clone(),
                },
                _ => return Err(WireError::Invalid("channel change kind")),
            }));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_tokens_are_literal() {
        assert_eq!(subject_token("node-1_a"), "node-1_a");
        for hostile in ["a.b", "*", ">", "a b", "", "~41", "ü"] {
            let t = subject_token(hostile);
            assert!(t.starts_with('~'), "{hostile:?} → {t}");
            assert!(t.bytes().all(|b| b == b'~' || b.is_ascii_hexdigit()));
        }
        assert_ne!(subject_token("~41"), subject_token("A"));
    }

    #[test]
    fn deltas_round_trip() {
        let origin = Origin {
            node: "n1".into(),
            incarnation: 7,
        };
        let record = DeviceRecord {
            user_id: "alice".into(),
            device_id: "phone".into(),
            epoch: 10,
            rev: 11,
            platform: "ios".into(),
            availability: Availability::Away,
            connected_since_ms: 5,
            user: UserFields {
                show: 3,
                status: "lunch".into(),
                description: String::new(),
                state: BTreeMap::from([("room".into(), "42".into())]),
                user_data: BTreeMap::new(),
                version: 11,
            },
            channels: Some(vec![("lobby".into(), BTreeMap::new(), 3)]),
            lingering: true,
            invisible: true,
        };
        for change in [
            ReplicaChange::Upsert(record),
            ReplicaChange::ChannelJoin {
                user_id: "alice".into(),
                device_id: "phone".into(),
                epoch: 10,
                channel: "lobby".into(),
                state: BTreeMap::from([("seat".into(), "7".into())]),
                joined_at_ms: 4,
            },
            ReplicaChange::ChannelLeave {
                user_id: "alice".into(),
                device_id: "phone".into(),
                epoch: 10,
                channel: "lobby".into(),
            },
            ReplicaChange::ChannelState {
                user_id: "alice".into(),
                device_id: "phone".into(),
                epoch: 10,
                channel: "lobby".into(),
                state: BTreeMap::new(),
            },
            ReplicaChange::Remove {
                user_id: "alice".into(),
                device_id: "phone".into(),
                epoch: 10,
                reason: OfflineReason::Timeout,
                version: 12,
                last_seen_ms: 99,
                close: Some(CloseKind::DeviceLimit),
            },
        ] {
            let env = Envelope::delta(&origin, 3, &change);
            let back = Envelope::decode_bytes(&env.encode_to_vec()).unwrap();
            assert_eq!(back.origin(), origin);
            assert_eq!(back.seq, 3);
            assert_eq!(back.change().unwrap(), Some(change));
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(Envelope::decode_bytes(b"\xff\xff\xff").is_err());
        assert!(Envelope::decode_bytes(b"").is_err());
        let bad = Envelope {
            node: "n".into(),
            upsert: Some(Record {
                availability: 999,
                user_id: "u".into(),
                device_id: "d".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(bad.change().is_err());
    }
}
