//! Domain values of presence, free of protobuf and sockets: availability, a user's presence
//! snapshot, a requested change, event kinds and the reasons sessions end. The registry works on
//! these; `wire` converts them to and from protobuf.

use std::collections::BTreeMap;

/// How available a user or device is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Availability {
    /// Present and reachable.
    Online,
    /// Away from the device.
    Away,
    /// Extended away.
    ExtendedAway,
    /// Do not disturb.
    DoNotDisturb,
    /// No device connected.
    Offline,
}

impl Availability {
    /// Rank for the aggregate: the most available device wins (ONLINE > DND > AWAY > XA).
    pub fn rank(self) -> u8 {
        match self {
            Availability::Online => 4,
            Availability::DoNotDisturb => 3,
            Availability::Away => 2,
            Availability::ExtendedAway => 1,
            Availability::Offline => 0,
        }
    }

    /// Lower-case name, as `presencectl` prints and parses it.
    pub fn name(self) -> &'static str {
        match self {
            Availability::Online => "online",
            Availability::Away => "away",
            Availability::ExtendedAway => "xa",
            Availability::DoNotDisturb => "dnd",
            Availability::Offline => "offline",
        }
    }

    /// Parses a [`Availability::name`].
    pub fn parse(name: &str) -> Option<Availability> {
        [
            Availability::Online,
            Availability::Away,
            Availability::ExtendedAway,
            Availability::DoNotDisturb,
            Availability::Offline,
        ]
        .into_iter()
        .find(|a| a.name().eq_ignore_ascii_case(name))
    }
}

/// One connected device as watchers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSnapshot {
    /// Device id.
    pub device_id: String,
    /// Platform name from Connect.
    pub platform: String,
    /// This device's availability.
    pub availability: Availability,
    /// Session start, ms since epoch.
    pub connected_since_ms: u64,
}

/// A user's presence at one version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceSnapshot {
    /// The user.
    pub user_id: String,
    /// Aggregate availability.
    pub availability: Availability,
    /// Application code.
    pub show: u16,
    /// Status text.
    pub status: String,
    /// Description.
    pub description: String,
    /// Custom state.
    pub state: BTreeMap<String, String>,
    /// Connected devices, by id.
    pub devices: Vec<DeviceSnapshot>,
    /// Last online, ms since epoch; 0 when never seen or online now.
    pub last_seen_ms: u64,
    /// Increases with every change.
    pub version: u64,
    /// Connect-time profile data.
    pub user_data: BTreeMap<String, String>,
}

impl PresenceSnapshot {
    /// The presence of a user with no device connected.
    pub fn offline(user_id: &str, last_seen_ms: u64) -> PresenceSnapshot {
        PresenceSnapshot {
            user_id: user_id.to_string(),
            availability: Availability::Offline,
            show: 0,
            status: String::new(),
            description: String::new(),
            state: BTreeMap::new(),
            devices: Vec::new(),
            last_seen_ms,
            version: 0,
            user_data: BTreeMap::new(),
        }
    }
}

/// A requested change of one's own presence; `None` fields stay as they are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PresenceChange {
    /// The publishing device's availability.
    pub availability: Option<Availability>,
    /// New application code.
    pub show: Option<u16>,
    /// New status text.
    pub status: Option<String>,
    /// New description.
    pub description: Option<String>,
    /// Merged by key; an empty value removes the key.
    pub state: BTreeMap<String, String>,
    /// Clear the state before merging.
    pub replace_state: bool,
}

impl PresenceChange {
    /// Applies the user-level fields to `target`, refusing (and changing nothing) when the merged
    /// state would exceed `max_state_pairs`.
    pub fn apply_to(
        &self,
        target: &mut PresenceSnapshot,
        max_state_pairs: usize,
    ) -> Result<(), String> {
        target.state = merge_state(
            &target.state,
            &self.state,
            self.replace_state,
            max_state_pairs,
        )?;
        if let Some(show) = self.show {
            target.show = show;
        }
        if let Some(status) = &self.status {
            target.status = status.clone();
        }
        if let Some(description) = &self.description {
            target.description = description.clone();
        }
        Ok(())
    }
}

/// Merges `changes` into `current` (cleared first when `replace`); an empty value removes its
/// key. Refuses, returning why, when the result would hold more than `max_pairs` pairs.
pub fn merge_state(
    current: &BTreeMap<String, String>,
    changes: &BTreeMap<String, String>,
    replace: bool,
    max_pairs: usize,
) -> Result<BTreeMap<String, String>, String> {
    let mut state = if replace {
        BTreeMap::new()
    } else {
        current.clone()
    };
    for (k, v) in changes {
        if v.is_empty() {
            state.remove(k);
        } else {
            state.insert(k.clone(), v.clone());
        }
    }
    if state.len() > max_pairs {
        return Err(format!(
            "state would hold {} pairs; the limit is {max_pairs}",
            state.len()
        ));
    }
    Ok(state)
}

/// What happened to a user's presence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// The first device connected.
    Online,
    /// A change while online.
    Update,
    /// The last device went away.
    Offline,
    /// An ephemeral presence addressed to the recipient.
    Directed,
}

/// Why a device or session went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OfflineReason {
    /// The client said Disconnect.
    Disconnect,
    /// Keepalive silence.
    Timeout,
    /// The socket closed or failed.
    ConnectionLost,
    /// Another connection of the same device took over.
    TakenOver,
    /// Removed by the server (slow consumer, protocol violation).
    Kicked,
    /// The server is shutting down.
    ServerShutdown,
}

/// A presence event about to be encoded once and fanned out.
#[derive(Debug, Clone, Copy)]
pub struct EventView<'a> {
    /// What happened.
    pub kind: EventKind,
    /// The presence after it happened.
    pub presence: &'a PresenceSnapshot,
    /// Why, for departures.
    pub reason: Option<OfflineReason>,
    /// The device whose change caused it.
    pub device_id: &'a str,
}

/// Why the server closes a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseKind {
    /// Answer to Disconnect.
    Normal,
    /// Connect refused.
    AuthFailed,
    /// Protocol broken.
    ProtocolViolation,
    /// Length prefix over the cap.
    FrameTooLarge,
    /// First frame or partial frame too late.
    DeadlineExceeded,
    /// Keepalive silence.
    KeepaliveTimeout,
    /// Another connection took the session.
    TakenOver,
    /// Not reading events.
    SlowConsumer,
    /// Shutdown.
    ServerShutdown,
    /// Too many connections or requests.
    Overloaded,
    /// The session's token expired.
    TokenExpired,
    /// The oldest device closed to make room under the per-user device cap.
    DeviceLimit,
    /// Cluster mode: the node fenced itself; reconnect to another node.
    NodeUnavailable,
    /// The application's backend ended the session (admin disconnect, token revocation).
    Kicked,
}

impl CloseKind {
    /// Label for the closes metric.
    pub fn metric_label(self) -> &'static str {
        match self {
            CloseKind::Normal => "normal",
            CloseKind::AuthFailed => "auth_failed",
            CloseKind::ProtocolViolation => "protocol_violation",
            CloseKind::FrameTooLarge => "frame_too_large",
            CloseKind::DeadlineExceeded => "deadline_exceeded",
            CloseKind::KeepaliveTimeout => "keepalive_timeout",
            CloseKind::TakenOver => "taken_over",
            CloseKind::SlowConsumer => "slow_consumer",
            CloseKind::ServerShutdown => "server_shutdown",
            CloseKind::Overloaded => "overloaded",
            CloseKind::NodeUnavailable => "node_unavailable",
            CloseKind::TokenExpired => "token_expired",
            CloseKind::DeviceLimit => "device_limit",
            CloseKind::Kicked => "kicked",
        }
    }
}

/// Checks a user id: 1–128 bytes of UTF-8 without control characters.
pub fn check_user_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("user id is empty".into());
    }
    if id.len() > 128 {
        return Err(format!("user id is {} bytes; the limit is 128", id.len()));
    }
    if id.chars().any(char::is_control) {
        return Err("user id contains a control character".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(user: &str, device: &str, state_bytes: usize) -> ChannelMember {
        ChannelMember {
            user_id: user.into(),
            device_id: device.into(),
            state: if state_bytes == 0 {
                BTreeMap::new()
            } else {
                BTreeMap::from([("k".to_string(), "v".repeat(state_bytes))])
            },
            joined_at_ms: 1,
        }
    }

    #[test]
    fn an_interval_batch_coalesces_per_member() {
        let mut b = IntervalBatch::default();
        b.record(ChannelEventKind::Join, member("u", "d", 10));
        b.record(ChannelEventKind::Leave, member("u", "d", 10));
        assert!(
            b.is_empty(),
            "joined and left within the interval: nothing to say"
        );
        b.record(ChannelEventKind::Leave, member("v", "d", 10));
        b.record(ChannelEventKind::Join, member("v", "d", 20));
        assert!(b.leaves.is_empty() && b.joins.is_empty());
        assert_eq!(
            b.state_changes.len(),
            1,
            "left and came back: a state change"
        );
        b.record(ChannelEventKind::Timeout, member("w", "d", 10));
        assert!(b.timeouts[0].state.is_empty(), "departures carry no state");
        b.record(ChannelEventKind::Join, member("x", "d", 1));
        b.record(ChannelEventKind::StateChanged, member("x", "d", 5));
        assert_eq!(b.joins.len(), 1);
        assert_eq!(
            b.joins[0].state["k"].len(),
            5,
            "a joiner's state is its latest"
        );
    }

    #[test]
    fn an_interval_batch_beyond_its_caps_asks_for_a_refresh() {
        let mut b = IntervalBatch::default();
        for i in 0..=MAX_INTERVAL_MEMBERS {
            b.record(ChannelEventKind::Join, member(&format!("u{i}"), "d", 0));
        }
        assert!(b.refresh && b.joins.is_empty() && !b.is_empty());
        let mut b = IntervalBatch::default();
        for i in 0..10 {
            b.record(
                ChannelEventKind::Join,
                member(&format!("u{i}"), "d", 4 * 1024),
            );
        }
        assert!(b.refresh, "more than 32 KiB of state");
    }

    #[test]
    fn state_merge_removes_on_empty_and_enforces_the_cap_atomically() {
        let mut p = PresenceSnapshot::offline("u", 0);
        let change = PresenceChange {
            state: BTreeMap::from([("a".into(), "1".into()), ("b".into(), "2".into())]),
            ..Default::default()
        };
        change.apply_to(&mut p, 2).unwrap();
        let change = PresenceChange {
            status: Some("busy".into()),
            state: BTreeMap::from([("c".into(), "3".into())]),
            ..Default::default()
        };
        assert!(change.apply_to(&mut p, 2).is_err());
        assert_eq!(p.status, "", "a refused change applies nothing");
        let change = PresenceChange {
            state: BTreeMap::from([("a".into(), "".into()), ("c".into(), "3".into())]),
            ..Default::default()
        };
        change.apply_to(&mut p, 2).unwrap();
        assert_eq!(p.state.keys().collect::<Vec<_>>(), ["b", "c"]);
    }

    #[test]
    fn user_ids() {
        assert!(check_user_id("alice").is_ok());
        assert!(check_user_id("😀").is_ok());
        assert!(check_user_id("").is_err());
        assert!(check_user_id("a\nb").is_err());
        assert!(check_user_id(&"x".repeat(129)).is_err());
    }

    #[test]
    fn availability_names_round_trip() {
        for a in ["online", "away", "xa", "dnd", "offline"] {
            assert_eq!(Availability::parse(a).unwrap().name(), a);
        }
        assert!(Availability::parse("busy").is_none());
    }
}

/// What happened in a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelEventKind {
    /// A member (user, device) joined.
    Join,
    /// A member left cleanly.
    Leave,
    /// A member was removed after its connection was lost.
    Timeout,
    /// A member's state changed.
    StateChanged,
    /// A user's first device joined.
    Online,
    /// A user's last device left.
    Offline,
    /// Batched changes (interval mode).
    Interval,
}

/// One member of a channel as others see it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChannelMember {
    /// User.
    pub user_id: String,
    /// Device.
    pub device_id: String,
    /// Member state (empty when not asked for).
    pub state: BTreeMap<String, String>,
    /// Join time, ms since epoch.
    pub joined_at_ms: u64,
}

/// Most members one INTERVAL event lists; beyond it the event only says "refresh".
pub const MAX_INTERVAL_MEMBERS: usize = 256;
/// Most bytes of member state one INTERVAL event carries; beyond it the event only says
/// "refresh".
pub const MAX_INTERVAL_STATE_BYTES: usize = 32 * 1024;

/// Changes collected in interval mode, coalesced per member (user, device): a member appears in
/// at most one list, leaves carry no state, and a member that joined and left within the
/// interval is not reported at all. Bounded: past [`MAX_INTERVAL_MEMBERS`] members or
/// [`MAX_INTERVAL_STATE_BYTES`] of state, the lists are dropped and `refresh` tells clients to
/// ask who-now instead (PubNub's `here_now_refresh`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IntervalBatch {
    /// Members that joined (with their latest state).
    pub joins: Vec<ChannelMember>,
    /// Members that left.
    pub leaves: Vec<ChannelMember>,
    /// Members that timed out.
    pub timeouts: Vec<ChannelMember>,
    /// Members present before the interval whose state changed, latest state, one entry each.
    pub state_changes: Vec<ChannelMember>,
    /// Too many changes to list: the lists are empty and clients should refresh with who-now.
    pub refresh: bool,
}

fn state_bytes(member: &ChannelMember) -> usize {
    member.state.iter().map(|(k, v)| k.len() + v.len()).sum()
}

fn take_member(list: &mut Vec<ChannelMember>, user: &str, device: &str) -> Option<ChannelMember> {
    let i = list
        .iter()
        .position(|m| m.user_id == user && m.device_id == device)?;
    Some(list.remove(i))
}

impl IntervalBatch {
    /// True when nothing was collected.
    pub fn is_empty(&self) -> bool {
        !self.refresh
            && self.joins.is_empty()
            && self.leaves.is_empty()
            && self.timeouts.is_empty()
            && self.state_changes.is_empty()
    }

    /// Every member the batch lists: joins, leaves, timeouts, state changes.
    pub fn members(&self) -> impl Iterator<Item = &ChannelMember> {
        self.joins
            .iter()
            .chain(&self.leaves)
            .chain(&self.timeouts)
            .chain(&self.state_changes)
    }

    /// Adds one member event (JOIN, LEAVE, TIMEOUT or STATE_CHANGED; others are implied).
    pub fn record(&mut self, kind: ChannelEventKind, mut member: ChannelMember) {
        if self.refresh {
            return;
        }
        let (user, device) = (member.user_id.clone(), member.device_id.clone());
        match kind {
            ChannelEventKind::Join => {
                let was_here = take_member(&mut self.leaves, &user, &device)
                    .or_else(|| take_member(&mut self.timeouts, &user, &device))
                    .is_some();
                take_member(&mut self.joins, &user, &device);
                take_member(&mut self.state_changes, &user, &device);
                if was_here {
                    // Left and came back within the interval: still a member, maybe new state.
                    self.state_changes.push(member);
                } else {
                    self.joins.push(member);
                }
            }
            ChannelEventKind::Leave | ChannelEventKind::Timeout => {
                take_member(&mut self.state_changes, &user, &device);
                if take_member(&mut self.joins, &user, &device).is_some() {
                    // Joined and left within the interval: nobody saw it.
                    return;
                }
                member.state.clear();
                take_member(&mut self.leaves, &user, &device);
                take_member(&mut self.timeouts, &user, &device);
                if kind == ChannelEventKind::Leave {
                    self.leaves.push(member);
                } else {
                    self.timeouts.push(member);
                }
            }
            ChannelEventKind::StateChanged => {
                if let Some(joined) = self
                    .joins
                    .iter_mut()
                    .find(|m| m.user_id == user && m.device_id == device)
                {
                    joined.state = member.state;
                } else {
                    take_member(&mut self.state_changes, &user, &device);
                    self.state_changes.push(member);
                }
            }
            ChannelEventKind::Online | ChannelEventKind::Offline | ChannelEventKind::Interval => {}
        }
        let members =
            self.joins.len() + self.leaves.len() + self.timeouts.len() + self.state_changes.len();
        let bytes: usize = self
            .joins
            .iter()
            .chain(&self.state_changes)
            .map(state_bytes)
            .sum();
        if members > MAX_INTERVAL_MEMBERS || bytes > MAX_INTERVAL_STATE_BYTES {
            *self = IntervalBatch {
                refresh: true,
                ..IntervalBatch::default()
            };
        }
    }
}

/// A channel event about to be encoded once and fanned out.
#[derive(Debug, Clone, Copy)]
pub struct ChannelEventView<'a> {
    /// Channel id.
    pub channel: &'a str,
    /// What happened.
    pub kind: ChannelEventKind,
    /// The member concerned (not for INTERVAL).
    pub member: Option<&'a ChannelMember>,
    /// Distinct users in the channel after the event.
    pub occupancy: u32,
    /// For INTERVAL.
    pub interval: Option<&'a IntervalBatch>,
}
