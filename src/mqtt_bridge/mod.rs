//! The MQTT bridge (`[mqtt_bridge]`): publishes each user's presence and each channel's
//! occupancy as retained messages on an MQTT broker, for devices and backends that already
//! speak MQTT. This module owns the bridge's lifecycle, its `EventSink` (a bounded inbox the
//! event bus pushes into without blocking) and its metric names; it reads the registry but
//! never changes it.
//!
//! | file | owns |
//! |---|---|
//! | `config.rs` | `MqttBridgeConfig`: settings, defaults, validation |
//! | `payload.rs` | topic names, JSON / protobuf payloads, fingerprints |
//! | `core.rs` | the synchronous core: what the broker should hold, what to publish next |
//! | `shell.rs` | the async shell: rumqttc event loop, reconnects with backoff, full passes, retained scan, clean stop |
//!
//! # Contract
//! - **Topics** (all retained, QoS 1): `<prefix>/users/<user>` (JSON or protobuf
//!   `Presence`), `<prefix>/channels/<channel>` (JSON `{"channel","occupancy","ts_ms"}`; a
//!   vacated channel's retained message is cleared with an empty payload) and
//!   `<prefix>/bridge/<client_id>`: `online` once connected, `offline` as the Last Will and
//!   on a clean stop. Users or channels whose id cannot be a topic level (`/`, `+`, `#`) are
//!   not bridged.
//! - **Privacy**: with `show = "public"` (default) a user is shown as a stranger sees them:
//!   invisible users and users whose audience is not `everyone` are offline (their masked
//!   last-seen and version) and not counted in channel occupancy.
//! - **Reconnects**: on every connect the bridge publishes its status, then every tracked and
//!   every present user and occupied channel (read afresh from the registry), so a user who
//!   went offline while the link was down ends `offline`. For
//!   `retained_scan_ms` it also subscribes to `<prefix>/users/+` and `<prefix>/channels/+`:
//!   a retained topic the bridge does not track (left by a crash or a restart of presenced or
//!   of the broker) that shows a user online (or cannot be read) or a channel occupied is
//!   corrected from the registry (the user offline with its last-seen time, the channel
//!   cleared). Nothing is stored locally.
//! - **Privacy changes** send no event: the registry tells the inbox (a `SettingsListener`)
//!   of each user whose invisibility or audience changed, and the bridge republishes that user
//!   and the rooms they are in (only what changed is published).
//! - **Losses**: a full inbox drops events (counted) and triggers a full pass; a periodic full
//!   pass (`resync_interval_ms`) publishes only what changed, as a safety net.
//! - **Cluster mode**: only the node that delivers events (`EventBus::is_delivering`) connects;
//!   it takes over with a full pass. All nodes use the same `client_id`.
//! - **Clean stop**: users the bridge shows online are published offline (single node: their
//!   sessions end with the process), channels cleared, then the status `offline`, then
//!   DISCONNECT. After `kill -9` the broker publishes the Last Will, and the next start
//!   corrects the user topics through the retained scan.

mod config;
mod core;
mod payload;
mod shell;

pub use config::{BrokerAddress, MqttBridgeConfig, PayloadFormat, ShowPolicy};
pub use payload::{ChannelPayload, UserPayload, STATUS_OFFLINE, STATUS_ONLINE};

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::events::{Event, EventBus, EventSink, EventType};
use crate::registry::Registry;

/// What the retained scan makes of one retained message from the MQTT broker: the subject to
/// correct, or `None` (not a topic of this prefix, or a user shown offline already: only
/// stale online payloads, and unreadable ones, are corrected). The topic and payload are the
/// broker's, so anything may arrive.
fn scanned_subject(topics: &payload::Topics, topic: &str, bytes: &[u8]) -> Option<core::Subject> {
    // Only ids the wire accepts can be presenced's (a cap on what a flood of made-up
    // topics can make the bridge track: `max_subjects` ids of at most 128 bytes).
    match topics.parse(topic)? {
        payload::TopicSubject::User(u) if crate::model::check_user_id(&u).is_err() => None,
        payload::TopicSubject::User(_) if payload::says_offline(bytes) => None,
        payload::TopicSubject::User(u) => Some(core::Subject::User(u)),
        payload::TopicSubject::Channel(c) => crate::command::channel_id(c)
            .ok()
            .map(core::Subject::Channel),
    }
}

/// Fuzzing: the retained scan's reading of messages from the MQTT broker, into a core capped
/// at `max_subjects` (the fuzz target `mqtt_retained` drives it with arbitrary topics and
/// payloads).
#[doc(hidden)]
#[derive(Debug)]
pub struct RetainedScan {
    topics: payload::Topics,
    core: core::Core,
    max_subjects: usize,
}

#[doc(hidden)]
impl RetainedScan {
    /// A scan for `prefix`, tracking at most `max_subjects`.
    pub fn new(prefix: &str, client_id: &str, max_subjects: usize) -> RetainedScan {
        RetainedScan {
            topics: payload::Topics::new(prefix, client_id),
            core: core::Core::new(max_subjects),
            // The core tracks at least one subject (config allows 16 and up).
            max_subjects: max_subjects.max(1),
        }
    }

    /// One retained message; the topic it queues for correction, if any. Panics when a
    /// bound or the topic round trip breaks (that is what the fuzz target looks for).
    pub fn feed(&mut self, topic: &str, bytes: &[u8]) -> Option<String> {
        let subject = scanned_subject(&self.topics, topic, bytes)?;
        let queued = self.core.retained(subject.clone()) == core::Applied::Queued;
        assert!(self.core.len() <= self.max_subjects, "past max_subjects");
        let back = match &subject {
            core::Subject::User(u) => self.topics.user(u),
            core::Subject::Channel(c) => self.topics.channel(c),
        };
        assert_eq!(
            back.as_deref(),
            Some(topic),
            "the subject names its own topic"
        );
        queued.then(|| topic.to_string())
    }
}

/// Metric names.
pub mod names {
    /// 1 while connected to the MQTT broker, else 0.
    pub const CONNECTED: &str = "presence_mqtt_bridge_connected";
    /// Messages queued for the broker, by `topic` (`user`, `channel`, `status`).
    pub const PUBLISHED: &str = "presence_mqtt_bridge_published_total";
    /// Changes lost, by `reason` (`queue_full`, `subject_cap`); a full pass corrects them.
    pub const DROPPED: &str = "presence_mqtt_bridge_dropped_total";
    /// Failed connections and lost links (each is followed by a reconnect after a backoff).
    pub const RECONNECTS: &str = "presence_mqtt_bridge_reconnects_total";
    /// Full passes over the registry, by `reason` (`connect`, `loss`, `interval`).
    pub const RESYNCS: &str = "presence_mqtt_bridge_resyncs_total";
    /// Events waiting in the bridge's inbox.
    pub const QUEUE_DEPTH: &str = "presence_mqtt_bridge_queue_depth";
}

/// Describes the bridge metrics to the installed recorder (`metrics::install` calls it).
pub fn describe() {
    use metrics::{describe_counter, describe_gauge};
    describe_gauge!(names::CONNECTED, "1 while the MQTT bridge is connected");
    describe_counter!(
        names::PUBLISHED,
        "Messages the MQTT bridge queued for the broker, by topic kind"
    );
    describe_counter!(
        names::DROPPED,
        "Changes the MQTT bridge lost (a full pass corrects them), by reason"
    );
    describe_counter!(
        names::RECONNECTS,
        "MQTT bridge connection failures and lost links"
    );
    describe_counter!(
        names::RESYNCS,
        "Full passes of the MQTT bridge over the registry, by reason"
    );
    describe_gauge!(
        names::QUEUE_DEPTH,
        "Events waiting in the MQTT bridge inbox"
    );
}

/// Why the bridge cannot start.
#[derive(Debug, thiserror::Error)]
pub enum MqttBridgeError {
    /// The section is invalid.
    #[error("{0}")]
    Config(String),
    /// A file it names cannot be read.
    #[error("mqtt_bridge: cannot read {what} {path}: {source}")]
    Read {
        /// `password_file` or `ca_file`.
        what: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The CA file holds no usable certificate, or TLS cannot be set up.
    #[error("mqtt_bridge: {0}")]
    Tls(String),
}

/// The events the bus hands over, for the bridge task.
#[derive(Debug)]
pub(crate) struct Inbox {
    queue: Mutex<InboxState>,
    notify: Notify,
    capacity: usize,
}

#[derive(Debug, Default)]
struct InboxState {
    events: VecDeque<Arc<Event>>,
    /// Events dropped since the bridge last drained (it then makes a full pass).
    lost: u64,
    /// Users whose privacy settings changed since the last drain (at most `capacity`; past
    /// that, `lost` counts them and a full pass covers them): what a stranger is shown of
    /// them may have changed without an event.
    settings: std::collections::BTreeSet<String>,
}

impl Inbox {
    /// Takes every waiting event, the users whose privacy settings changed, and how many
    /// were lost since the last call.
    pub(crate) fn drain(&self) -> (Vec<Arc<Event>>, Vec<String>, u64) {
        let mut state = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let lost = std::mem::take(&mut state.lost);
        let events = state.events.drain(..).collect();
        let settings = std::mem::take(&mut state.settings).into_iter().collect();
        metrics::gauge!(names::QUEUE_DEPTH).set(0.0);
        (events, settings, lost)
    }

    /// Waits until an event arrives (or one arrived since the last wait).
    pub(crate) async fn notified(&self) {
        self.notify.notified().await;
    }
}

/// Privacy changes send no event: the registry tells the inbox of each user whose settings
/// changed (under its lock: a bounded, non-blocking insert), and the bridge republishes them.
impl crate::registry::SettingsListener for Inbox {
    fn settings_changed(&self, user: &str, _public: &crate::events::PublicNote) {
        let mut state = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if state.settings.len() >= self.capacity && !state.settings.contains(user) {
            state.lost += 1;
            drop(state);
            metrics::counter!(names::DROPPED, "reason" => "queue_full").increment(1);
        } else {
            state.settings.insert(user.to_string());
        }
        self.notify.notify_one();
    }
}

/// The `EventSink` the bus feeds: a bounded, non-blocking push.
#[derive(Debug)]
struct Sink(Arc<Inbox>);

impl EventSink for Sink {
    fn offer(&self, event: &Arc<Event>) {
        let wanted = matches!(
            event.kind,
            EventType::UserOnline
                | EventType::UserUpdated
                | EventType::UserOffline
                | EventType::ChannelOccupied
                | EventType::ChannelVacated
                | EventType::MemberJoined
                | EventType::MemberLeft
                | EventType::SyncRequired
        );
        if !wanted {
            return;
        }
        let inbox = &self.0;
        let mut state = inbox.queue.lock().unwrap_or_else(|p| p.into_inner());
        if state.events.len() >= inbox.capacity {
            state.lost += 1;
            drop(state);
            metrics::counter!(names::DROPPED, "reason" => "queue_full").increment(1);
        } else {
            state.events.push_back(event.clone());
            let depth = state.events.len();
            drop(state);
            metrics::gauge!(names::QUEUE_DEPTH).set(depth as f64);
        }
        inbox.notify.notify_one();
    }
}

/// A configured bridge, not yet running.
#[derive(Debug)]
pub struct MqttBridge {
    config: MqttBridgeConfig,
    inbox: Arc<Inbox>,
    password: Option<String>,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl MqttBridge {
    /// Checks `config`, reads its password and CA files, and returns the bridge and the sink
    /// for the `EventBus`; [`MqttBridge::run`] connects.
    pub fn new(
        config: &MqttBridgeConfig,
    ) -> Result<(MqttBridge, Arc<dyn EventSink>), MqttBridgeError> {
        config.validate().map_err(MqttBridgeError::Config)?;
        let broker = config.broker().map_err(MqttBridgeError::Config)?;
        let password = match (&config.password, &config.password_file) {
            (Some(p), _) => Some(p.clone()),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .map_err(|source| MqttBridgeError::Read {
                        what: "password_file",
                        path: path.clone(),
                        source,
                    })?
                    .trim()
                    .to_string(),
            ),
            (None, None) => None,
        };
        let tls = if broker.tls {
            Some(shell::tls_config(config.ca_file.as_deref())?)
        } else {
            None
        };
        let inbox = Arc::new(Inbox {
            queue: Mutex::new(InboxState::default()),
            notify: Notify::new(),
            capacity: config.queue_capacity,
        });
        let sink: Arc<dyn EventSink> = Arc::new(Sink(inbox.clone()));
        Ok((
            MqttBridge {
                config: config.clone(),
                inbox,
                password,
                tls,
            },
            sink,
        ))
    }

    /// Bridges until `shutdown` is cancelled, then stops cleanly (see the module doc) within
    /// about 2 s. `events` says whether this node delivers (cluster mode; a single node always
    /// does).
    pub async fn run(self, registry: Registry, events: Arc<EventBus>, shutdown: CancellationToken) {
        registry.add_settings_listener(self.inbox.clone());
        shell::run(self, registry, events, shutdown).await;
    }
}
