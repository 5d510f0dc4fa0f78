//! Presence events for the application's backend: the catalogue (`user.online`, `channel.vacated`,
//! `server.started`, ...), the JSON shape every consumer sees, and the `EventBus` that numbers
//! each event, keeps the most recent ones for `GET /v1/events` long-polls and hands each to the
//! webhook queues. Synchronous: the registry reports a [`Transition`] under its own lock and the
//! bus only numbers it, appends it to a bounded ring and offers it to each sink with a
//! non-blocking push, so presence fanout never waits for an HTTP endpoint. Serialization to
//! JSON happens later, in the consumer (webhook batch, admin API reply).

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::model::{Availability, DeviceSnapshot, OfflineReason, PresenceSnapshot};

/// Events kept for `GET /v1/events` replays (the oldest go first).
pub const RECENT_EVENTS: usize = 20_000;

/// What happened. The names are the webhook `type` strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventType {
    /// A user's first device connected.
    UserOnline,
    /// A user's last device is gone (after its grace period: flaps inside it send nothing).
    UserOffline,
    /// A connected user's presence changed (availability, status, state, devices).
    UserUpdated,
    /// A new device session started (not a resume within the grace period).
    DeviceConnected,
    /// A device session ended (after its grace period).
    DeviceDisconnected,
    /// A channel got its first member.
    ChannelOccupied,
    /// A channel's last member left.
    ChannelVacated,
    /// A device joined a channel.
    MemberJoined,
    /// A device left a channel (reason `leave` or `timeout`).
    MemberLeft,
    /// The broker (re)started: state reported before this event is void.
    ServerStarted,
    /// Events were lost (a full queue): re-read the state you depend on.
    SyncRequired,
}

impl EventType {
    /// Every type, in catalogue order.
    pub const ALL: [EventType; 11] = [
        EventType::UserOnline,
        EventType::UserOffline,
        EventType::UserUpdated,
        EventType::DeviceConnected,
        EventType::DeviceDisconnected,
        EventType::ChannelOccupied,
        EventType::ChannelVacated,
        EventType::MemberJoined,
        EventType::MemberLeft,
        EventType::ServerStarted,
        EventType::SyncRequired,
    ];

    /// Sent when a webhook lists no `events`.
    pub const DEFAULT: [EventType; 6] = [
        EventType::UserOnline,
        EventType::UserOffline,
        EventType::ChannelOccupied,
        EventType::ChannelVacated,
        EventType::ServerStarted,
        EventType::SyncRequired,
    ];

    /// The wire name, e.g. `user.online`.
    pub fn name(self) -> &'static str {
        match self {
            EventType::UserOnline => "user.online",
            EventType::UserOffline => "user.offline",
            EventType::UserUpdated => "user.updated",
            EventType::DeviceConnected => "device.connected",
            EventType::DeviceDisconnected => "device.disconnected",
            EventType::ChannelOccupied => "channel.occupied",
            EventType::ChannelVacated => "channel.vacated",
            EventType::MemberJoined => "channel.member.joined",
            EventType::MemberLeft => "channel.member.left",
            EventType::ServerStarted => "server.started",
            EventType::SyncRequired => "sync.required",
        }
    }

    /// Parses a [`EventType::name`].
    pub fn parse(name: &str) -> Option<EventType> {
        EventType::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Events that are always delivered to every endpoint, whatever its filter: a consumer
    /// must learn that its view is void.
    pub fn always(self) -> bool {
        matches!(self, EventType::ServerStarted | EventType::SyncRequired)
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for EventType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for EventType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        EventType::parse(&name).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "unknown event type {name:?} (known: {})",
                EventType::ALL.map(|t| t.name()).join(", ")
            ))
        })
    }
}

/// One device as the JSON API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceJson {
    /// Device id.
    pub device: String,
    /// Platform name.
    pub platform: String,
    /// This device's availability.
    pub availability: String,
    /// When this session started, ms since the epoch.
    pub connected_since_ms: u64,
}

/// A user's presence as the JSON API shows it: the fields of the wire protocol's `Presence`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceJson {
    /// User id.
    pub user: String,
    /// `online`, `away`, `xa`, `dnd` or `offline`.
    pub availability: String,
    /// Application code.
    pub show: u16,
    /// Status text.
    pub status: String,
    /// Description.
    pub description: String,
    /// Custom state pairs.
    pub state: BTreeMap<String, String>,
    /// Connected devices (live or in their grace period).
    pub devices: Vec<DeviceJson>,
    /// Last online, ms since the epoch; 0 when online now or never seen.
    pub last_seen_ms: u64,
    /// Increases with every change of this user.
    pub version: u64,
    /// Connect-time profile data.
    pub user_data: BTreeMap<String, String>,
}

/// The way back, for a consumer holding only the JSON (the MQTT bridge reads events): names
/// it does not know fall back to offline (user) and online (device).
impl From<&PresenceJson> for PresenceSnapshot {
    fn from(p: &PresenceJson) -> PresenceSnapshot {
        PresenceSnapshot {
            user_id: p.user.clone(),
            availability: Availability::parse(&p.availability).unwrap_or(Availability::Offline),
            show: p.show,
            status: p.status.clone(),
            description: p.description.clone(),
            state: p.state.clone(),
            devices: p
                .devices
                .iter()
                .map(|d| DeviceSnapshot {
                    device_id: d.device.clone(),
                    platform: d.platform.clone(),
                    availability: Availability::parse(&d.availability)
                        .unwrap_or(Availability::Online),
                    connected_since_ms: d.connected_since_ms,
                })
                .collect(),
            last_seen_ms: p.last_seen_ms,
            version: p.version,
            user_data: p.user_data.clone(),
        }
    }
}

impl From<&PresenceSnapshot> for PresenceJson {
    fn from(p: &PresenceSnapshot) -> PresenceJson {
        PresenceJson {
            user: p.user_id.clone(),
            availability: p.availability.name().to_string(),
            show: p.show,
            status: p.status.clone(),
            description: p.description.clone(),
            state: p.state.clone(),
            devices: p
                .devices
                .iter()
                .map(|d| DeviceJson {
                    device: d.device_id.clone(),
                    platform: d.platform.clone(),
                    availability: d.availability.name().to_string(),
                    connected_since_ms: d.connected_since_ms,
                })
                .collect(),
            last_seen_ms: p.last_seen_ms,
            version: p.version,
            user_data: p.user_data.clone(),
        }
    }
}

/// What the registry reports, under its lock, when something a backend cares about happened
/// on this node. Built only when an observer is installed.
#[derive(Debug, Clone)]
pub enum Transition {
    /// The user's first device connected; its presence now.
    UserOnline(PresenceSnapshot),
    /// The user's last device is gone.
    UserOffline {
        /// The presence watchers are sent with OFFLINE (no devices, last-seen now; the
        /// user-level fields as they were).
        presence: PresenceSnapshot,
        /// Why the last device went.
        reason: OfflineReason,
    },
    /// A connected user's presence changed.
    UserUpdated(PresenceSnapshot),
    /// A new device session started.
    DeviceConnected {
        /// The user.
        user: String,
        /// The device.
        device: String,
        /// Its platform.
        platform: String,
        /// The user's version after the change.
        version: u64,
    },
    /// A device session ended.
    DeviceDisconnected {
        /// The user.
        user: String,
        /// The device.
        device: String,
        /// Why.
        reason: OfflineReason,
        /// The user's version after the change.
        version: u64,
    },
    /// A channel got its first member.
    ChannelOccupied {
        /// The channel.
        channel: String,
        /// The member who made it occupied.
        user: String,
    },
    /// A channel's last member left.
    ChannelVacated {
        /// The channel.
        channel: String,
        /// The member who left last.
        user: String,
    },
    /// A device joined a channel.
    MemberJoined {
        /// The channel.
        channel: String,
        /// The user.
        user: String,
        /// The device.
        device: String,
        /// Distinct users in the channel after the change.
        occupancy: u32,
    },
    /// A device left a channel.
    MemberLeft {
        /// The channel.
        channel: String,
        /// The user.
        user: String,
        /// The device.
        device: String,
        /// Distinct users in the channel after the change.
        occupancy: u32,
        /// True when its connection was lost (channel TIMEOUT), false for a clean leave.
        timeout: bool,
    },
}

/// Receives registry transitions; called under the registry lock, so it must not block.
pub trait TransitionObserver: Send + Sync + fmt::Debug {
    /// One transition, in registry order.
    fn observe(&self, transition: Transition);

    /// A transition every node of a cluster sees and reports (a dead node's session expiring
    /// on each survivor): `key` is the same on every node, so the cluster keeps one.
    fn observe_keyed(&self, transition: Transition, key: &str) {
        let _ = key;
        self.observe(transition);
    }

    /// A transition with what a stranger was shown of it ([`Event::public`]), reported under
    /// `key` when every node reports it alike. The default drops the note.
    fn observe_noted(&self, transition: Transition, key: Option<&str>, public: Option<PublicNote>) {
        let _ = public;
        match key {
            Some(key) => self.observe_keyed(transition, key),
            None => self.observe(transition),
        }
    }
}

/// One numbered event, as webhooks and `GET /v1/events` carry it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Unique across restarts (`<boot epoch>-<seq>`); the dedup key.
    pub id: String,
    /// Increases by one per event within one boot (`server.started` is 1).
    pub seq: u64,
    /// The event type.
    #[serde(rename = "type")]
    pub kind: EventType,
    /// When it happened, ms since the epoch.
    pub ts_ms: u64,
    /// The user concerned (absent for server events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The user's version after the change (0 when not about a user's presence).
    pub version: u64,
    /// The device concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// The device's platform (`device.connected`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    /// The channel concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// Distinct users in the channel after the change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub occupancy: Option<u32>,
    /// Why (`disconnect`, `timeout`, `connection_lost`, `taken_over`, `kicked`; `leave` or
    /// `timeout` for a member).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The user's presence after the change (`user.online`, `user.updated`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence: Option<PresenceJson>,
    /// Last seen, ms since the epoch (`user.offline`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen_ms: Option<u64>,
    /// The boot epoch (`server.started`): a new value means earlier state is void.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    /// The node that reported the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Events lost before this one (`sync.required`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped: Option<u64>,
    /// The first lost event's `seq` (`sync.required`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_lost_seq: Option<u64>,
    /// What a stranger was shown of this event, when privacy made it differ from the truth
    /// (absent: the same), noted only while a public webhook (`show = "public"`) is
    /// configured: those endpoints are built from it; endpoints that show the truth never
    /// receive it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public: Option<Box<PublicNote>>,
}

/// What a stranger (no approval, no block) was shown of an event, taken under the registry's
/// lock when it happened.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicNote {
    /// The user is hidden from strangers: device and channel events about them are not shown.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hidden: bool,
    /// What a stranger is shown of the user (user events, and privacy changes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence: Option<PresenceJson>,
    /// The channel's occupancy as a stranger is shown it (channel events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub occupancy: Option<u32>,
    /// A privacy change: the user's memberships, each with the channel's occupancy as a
    /// stranger is shown it after the change.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub memberships: Vec<PublicMembership>,
}

/// One membership in a [`PublicNote`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicMembership {
    /// The channel.
    pub channel: String,
    /// The member device.
    pub device: String,
    /// Distinct users a stranger is shown in the channel.
    pub occupancy: u32,
    /// This membership is hidden from strangers (its user, or its device, is invisible).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hidden: bool,
}

impl Event {
    /// An event with only the common fields set.
    pub fn bare(kind: EventType, user: Option<String>, version: u64) -> Event {
        Event {
            id: String::new(),
            seq: 0,
            kind,
            ts_ms: 0,
            user,
            version,
            device: None,
            platform: None,
            channel: None,
            occupancy: None,
            reason: None,
            presence: None,
            last_seen_ms: None,
            epoch: None,
            node: None,
            dropped: None,
            first_lost_seq: None,
            public: None,
        }
    }

    /// The coalescing key of a queue that keeps each user's latest event: the user (or the
    /// channel for channel-level events); `None` for events never coalesced.
    pub fn subject_key(&self) -> Option<&str> {
        match self.kind {
            EventType::ServerStarted | EventType::SyncRequired => None,
            EventType::ChannelOccupied | EventType::ChannelVacated => self.channel.as_deref(),
            _ => self.user.as_deref(),
        }
    }
}

/// The wire name of an offline reason.
pub fn reason_name(reason: OfflineReason) -> &'static str {
    match reason {
        OfflineReason::Disconnect => "disconnect",
        OfflineReason::Timeout => "timeout",
        OfflineReason::ConnectionLost => "connection_lost",
        OfflineReason::TakenOver => "taken_over",
        OfflineReason::Kicked => "kicked",
        OfflineReason::ServerShutdown => "server_shutdown",
    }
}

impl Transition {
    /// The event this transition is reported as (id, seq and time unset).
    pub fn into_event(self) -> Event {
        match self {
            Transition::UserOnline(p) => Event {
                presence: Some(PresenceJson::from(&p)),
                ..Event::bare(EventType::UserOnline, Some(p.user_id.clone()), p.version)
            },
            Transition::UserUpdated(p) => Event {
                presence: Some(PresenceJson::from(&p)),
                ..Event::bare(EventType::UserUpdated, Some(p.user_id.clone()), p.version)
            },
            Transition::UserOffline { presence, reason } => Event {
                reason: Some(reason_name(reason).to_string()),
                last_seen_ms: Some(presence.last_seen_ms),
                presence: Some(PresenceJson::from(&presence)),
                ..Event::bare(
                    EventType::UserOffline,
                    Some(presence.user_id.clone()),
                    presence.version,
                )
            },
            Transition::DeviceConnected {
                user,
                device,
                platform,
                version,
            } => Event {
                device: Some(device),
                platform: Some(platform),
                ..Event::bare(EventType::DeviceConnected, Some(user), version)
            },
            Transition::DeviceDisconnected {
                user,
                device,
                reason,
                version,
            } => Event {
                device: Some(device),
                reason: Some(reason_name(reason).to_string()),
                ..Event::bare(EventType::DeviceDisconnected, Some(user), version)
            },
            Transition::ChannelOccupied { channel, user } => Event {
                channel: Some(channel),
                occupancy: Some(1),
                ..Event::bare(EventType::ChannelOccupied, Some(user), 0)
            },
            Transition::ChannelVacated { channel, user } => Event {
                channel: Some(channel),
                occupancy: Some(0),
                ..Event::bare(EventType::ChannelVacated, Some(user), 0)
            },
            Transition::MemberJoined {
                channel,
                user,
                device,
                occupancy,
            } => Event {
                channel: Some(channel),
                device: Some(device),
                occupancy: Some(occupancy),
                ..Event::bare(EventType::MemberJoined, Some(user), 0)
            },
            Transition::MemberLeft {
                channel,
                user,
                device,
                occupancy,
                timeout,
            } => Event {
                channel: Some(channel),
                device: Some(device),
                occupancy: Some(occupancy),
                reason: Some(if timeout { "timeout" } else { "leave" }.to_string()),
                ..Event::bare(EventType::MemberLeft, Some(user), 0)
            },
        }
    }
}

/// Where numbered events go besides the replay ring (a webhook endpoint's queue). `offer`
/// is called under the bus lock and must not block.
pub trait EventSink: Send + Sync + fmt::Debug {
    /// One event, in sequence order.
    fn offer(&self, event: &Arc<Event>);
}

#[derive(Debug)]
struct BusState {
    next_seq: u64,
    recent: VecDeque<Arc<Event>>,
}

/// Numbers events, keeps the latest [`RECENT_EVENTS`] for replays and hands each to the sinks.
///
/// In cluster mode ([`EventBus::clustered`]) the bus numbers nothing itself: this node's
/// events go to the cluster's event log (a JetStream stream, `cluster::events`), and every
/// node's bus is fed back the whole cluster's events in log order ([`EventBus::append`]),
/// numbered by the log. Only the node chosen to deliver webhooks feeds its sinks
/// ([`EventBus::set_delivering`]), so each event is sent once by the cluster.
#[derive(Debug)]
pub struct EventBus {
    epoch: std::sync::atomic::AtomicU64,
    boot: u64,
    node: Option<String>,
    capacity: usize,
    state: Mutex<BusState>,
    sinks: Vec<Arc<dyn EventSink>>,
    /// The last sequence number published (long-polls wait on it).
    published: tokio::sync::watch::Sender<u64>,
    /// Cluster mode: where this node's events go (the event log's publisher).
    outbox: Option<tokio::sync::mpsc::Sender<Event>>,
    /// Cluster mode: ids of this node's events (`<node>-<boot>-<n>`).
    next_local: std::sync::atomic::AtomicU64,
    /// Cluster mode: whether this node feeds its sinks (delivers webhooks).
    delivering: std::sync::atomic::AtomicBool,
}

/// A page of `GET /v1/events`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventPage {
    /// Events with `seq > after`, oldest first (shared with the bus: a page copies no event).
    pub events: Vec<Arc<Event>>,
    /// Pass as `after` for the next page.
    pub next_after: u64,
    /// The oldest `seq` still held: when it is above `after + 1`, events were missed.
    pub oldest_seq: u64,
    /// This boot's epoch: a different one than before means the broker restarted and `seq`
    /// started again (re-read the state, then follow from `after=0`).
    pub epoch: u64,
}

impl EventBus {
    /// A bus for one boot (`epoch`, µs since the epoch), announcing itself with
    /// `server.started` as event 1.
    pub fn new(epoch: u64, node: Option<String>, sinks: Vec<Arc<dyn EventSink>>) -> EventBus {
        EventBus::with_capacity(epoch, node, sinks, RECENT_EVENTS)
    }

    /// [`EventBus::new`] keeping `capacity` events for replays.
    pub fn with_capacity(
        epoch: u64,
        node: Option<String>,
        sinks: Vec<Arc<dyn EventSink>>,
        capacity: usize,
    ) -> EventBus {
        let bus = EventBus::empty(epoch, node, sinks, capacity, None);
        bus.publish(Event {
            epoch: Some(epoch),
            ..Event::bare(EventType::ServerStarted, None, 0)
        });
        bus
    }

    fn empty(
        epoch: u64,
        node: Option<String>,
        sinks: Vec<Arc<dyn EventSink>>,
        capacity: usize,
        outbox: Option<tokio::sync::mpsc::Sender<Event>>,
    ) -> EventBus {
        EventBus {
            epoch: std::sync::atomic::AtomicU64::new(epoch),
            boot: epoch,
            node,
            capacity: capacity.max(1),
            state: Mutex::new(BusState {
                next_seq: 1,
                recent: VecDeque::new(),
            }),
            sinks,
            published: tokio::sync::watch::channel(0).0,
            delivering: std::sync::atomic::AtomicBool::new(outbox.is_none()),
            outbox,
            next_local: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Cluster mode: a bus that sends this node's events to `outbox` (the cluster's event
    /// log) and is fed the cluster's events back through [`EventBus::append`]. Its
    /// `server.started` (with this boot's `epoch` and the node) goes to the log first. It
    /// feeds its sinks only after [`EventBus::set_delivering`].
    pub fn clustered(
        boot: u64,
        node: String,
        sinks: Vec<Arc<dyn EventSink>>,
        outbox: tokio::sync::mpsc::Sender<Event>,
    ) -> EventBus {
        let bus = EventBus::empty(boot, Some(node), sinks, RECENT_EVENTS, Some(outbox));
        bus.publish(Event {
            epoch: Some(boot),
            ..Event::bare(EventType::ServerStarted, None, 0)
        });
        bus
    }

    /// The epoch of the numbering: this boot's on a single node; in cluster mode the event
    /// log's creation time (a new one when the log was recreated and numbers start over).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Cluster mode: the event log's epoch (its creation time).
    pub fn set_epoch(&self, epoch: u64) {
        self.epoch
            .store(epoch, std::sync::atomic::Ordering::Relaxed);
    }

    /// Numbers `event`, keeps it for replays and offers it to every sink. In cluster mode it
    /// goes to the event log instead (and comes back through [`EventBus::append`]); when the
    /// log's queue is full it is dropped and counted.
    pub fn publish(&self, mut event: Event) {
        if let Some(outbox) = &self.outbox {
            if event.id.is_empty() {
                let n = self
                    .next_local
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                    + 1;
                event.id = format!("{}-{:x}-{n}", self.node.as_deref().unwrap_or(""), self.boot);
            }
            if event.ts_ms == 0 {
                event.ts_ms = crate::now_ms();
            }
            event.node.clone_from(&self.node);
            let kind = event.kind;
            if outbox.try_send(event).is_err() {
                metrics::counter!(crate::metrics::EVENTS_DROPPED, "reason" => "log_queue_full")
                    .increment(1);
            } else {
                metrics::counter!(crate::metrics::EVENTS, "type" => kind.name()).increment(1);
            }
            return;
        }
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let seq = state.next_seq;
        state.next_seq += 1;
        event.seq = seq;
        event.id = format!("{:x}-{seq}", self.boot);
        if event.ts_ms == 0 {
            event.ts_ms = crate::now_ms();
        }
        if event.node.is_none() {
            event.node.clone_from(&self.node);
        }
        let event = Arc::new(event);
        if state.recent.len() >= self.capacity {
            state.recent.pop_front();
        }
        state.recent.push_back(event.clone());
        for sink in &self.sinks {
            sink.offer(&event);
        }
        metrics::counter!(crate::metrics::EVENTS, "type" => event.kind.name()).increment(1);
        drop(state);
        self.published.send_replace(seq);
    }

    /// Cluster mode: one event of the cluster's log, numbered by it (`event.seq`), in log
    /// order. Kept for replays, and offered to the sinks when this node delivers webhooks.
    /// An event at or below the last one kept (a consumer restarted) is skipped.
    pub fn append(&self, event: Event) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state
            .recent
            .back()
            .is_some_and(|last| last.seq >= event.seq)
        {
            return;
        }
        let seq = event.seq;
        state.next_seq = seq + 1;
        let event = Arc::new(event);
        if state.recent.len() >= self.capacity {
            state.recent.pop_front();
        }
        state.recent.push_back(event.clone());
        if self.delivering.load(std::sync::atomic::Ordering::Relaxed) {
            for sink in &self.sinks {
                sink.offer(&event);
            }
        }
        drop(state);
        self.published.send_replace(seq);
    }

    /// Cluster mode: starts or stops feeding the sinks. On start, sink `i` is first offered
    /// the kept events after `from[i]` (where the previous deliverer stopped); when those are
    /// no longer kept, a `sync.required` says how many were lost.
    pub fn set_delivering(&self, on: bool, from: &[u64]) {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let was = self
            .delivering
            .swap(on, std::sync::atomic::Ordering::Relaxed);
        if !on || was {
            return;
        }
        let oldest = state.recent.front().map_or(state.next_seq, |e| e.seq);
        for (i, sink) in self.sinks.iter().enumerate() {
            let after = from.get(i).copied().unwrap_or(0);
            if after > 0 && after + 1 < oldest {
                let lost = oldest - after - 1;
                sink.offer(&Arc::new(Event {
                    id: format!(
                        "{}-{:x}-sync-{after}",
                        self.node.as_deref().unwrap_or(""),
                        self.boot
                    ),
                    dropped: Some(lost),
                    first_lost_seq: Some(after + 1),
                    ts_ms: crate::now_ms(),
                    node: self.node.clone(),
                    ..Event::bare(EventType::SyncRequired, None, 0)
                }));
            }
            let start = state.recent.partition_point(|e| e.seq <= after);
            for event in state.recent.range(start..) {
                sink.offer(event);
            }
        }
    }

    /// The highest `seq` kept (0 when none).
    pub fn last_seq(&self) -> u64 {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.recent.back().map_or(0, |e| e.seq)
    }

    /// Whether this bus runs in cluster mode ([`EventBus::clustered`]): it may then stop and
    /// start feeding its sinks.
    pub fn is_clustered(&self) -> bool {
        self.outbox.is_some()
    }

    /// Cluster mode: whether this node feeds its sinks.
    pub fn is_delivering(&self) -> bool {
        self.delivering.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Events with `seq > after`, at most `limit`.
    pub fn page(&self, after: u64, limit: usize) -> EventPage {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let oldest_seq = state.recent.front().map_or(state.next_seq, |e| e.seq);
        let skip = state.recent.partition_point(|e| e.seq <= after);
        let events: Vec<Arc<Event>> = state
            .recent
            .iter()
            .skip(skip)
            .take(limit)
            .cloned()
            .collect();
        let next_after = events.last().map_or(after, |e| e.seq);
        EventPage {
            events,
            next_after,
            oldest_seq,
            epoch: self.epoch(),
        }
    }

    /// [`EventBus::page`], waiting up to `wait` for an event after `after` when there is none.
    pub async fn wait_page(
        &self,
        after: u64,
        limit: usize,
        wait: std::time::Duration,
    ) -> EventPage {
        let mut rx = self.published.subscribe();
        let _ = tokio::time::timeout(wait, rx.wait_for(|&last| last > after)).await;
        self.page(after, limit)
    }
}

impl TransitionObserver for EventBus {
    fn observe(&self, transition: Transition) {
        self.observe_noted(transition, None, None);
    }

    fn observe_keyed(&self, transition: Transition, key: &str) {
        self.observe_noted(transition, Some(key), None);
    }

    fn observe_noted(&self, transition: Transition, key: Option<&str>, public: Option<PublicNote>) {
        let mut event = transition.into_event();
        event.public = public.map(Box::new);
        if let (Some(key), true) = (key, self.outbox.is_some()) {
            // The same id on every node: the event log keeps the first (message id).
            event.id = format!("x-{key}-{}", event.kind.name());
        }
        self.publish(event);
    }
}

/// Availability name helper for JSON bodies that take one.
pub fn parse_availability(name: &str) -> Option<Availability> {
    Availability::parse(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default)]
    struct Collect(Mutex<Vec<u64>>);
    impl EventSink for Collect {
        fn offer(&self, event: &Arc<Event>) {
            self.0.lock().unwrap().push(event.seq);
        }
    }

    #[test]
    fn the_first_event_is_server_started_and_seqs_count_up() {
        let sink = Arc::new(Collect::default());
        let bus = EventBus::with_capacity(0xabc, None, vec![sink.clone()], 3);
        for i in 0..4 {
            bus.observe(Transition::ChannelOccupied {
                channel: format!("c{i}"),
                user: "u".into(),
            });
        }
        assert_eq!(*sink.0.lock().unwrap(), vec![1, 2, 3, 4, 5]);
        let page = bus.page(0, 10);
        // Capacity 3: 1 and 2 are gone.
        assert_eq!(page.oldest_seq, 3);
        assert_eq!(
            page.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        assert_eq!(page.events[0].id, "abc-3");
        let page = bus.page(4, 10);
        assert_eq!(page.events.len(), 1);
        assert_eq!(page.next_after, 5);
        let page = bus.page(5, 10);
        assert!(page.events.is_empty());
        assert_eq!(page.next_after, 5);
    }

    #[test]
    fn event_json_has_the_documented_shape() {
        let bus = EventBus::new(7, None, vec![]);
        let page = bus.page(0, 1);
        let json = serde_json::to_value(&page.events[0]).unwrap();
        assert_eq!(json["type"], "server.started");
        assert_eq!(json["seq"], 1);
        assert_eq!(json["epoch"], 7);
        assert!(json.get("user").is_none());
        let back: Event = serde_json::from_value(json).unwrap();
        assert_eq!(back, *page.events[0]);
        assert!(serde_json::from_str::<EventType>("\"user.nope\"").is_err());
    }
}
