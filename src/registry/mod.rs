//! Live presence: which devices of which users are connected, each user's presence, and the
//! fanout of every change to the user's watchers and other devices. Synchronous: one mutex over
//! the session table, held for microseconds and never across an `.await`; a change is encoded
//! once under that lock and offered to each recipient's outbound queue with a non-blocking push,
//! so per-user order is the order of the lock and the publisher never waits for a watcher.
//! Subscriptions come from the `SubscriptionStore`; bytes come from a `WireEncoder`; the registry
//! sees neither protobuf nor sockets. Channel presence (`channels`) lives under the same lock,
//! because channel membership belongs to device sessions. The per-user device cap is enforced
//! here too, under that lock, when a new device attaches: the user's oldest session is closed
//! to make room, or the new one is refused (`RegistryOptions::device_limit_policy`).

mod admin;
mod channels;
mod privacy;
pub use privacy::{PrivacyNotice, PrivacySummary};
mod replica;
mod shown;

pub use admin::{AdminError, OnlineStatus};
pub use channels::{ChannelOutcome, WhoNowPage};
pub use replica::{
    DeviceRecord, LocalPage, Membership, Origin, ReplicaChange, ReplicationSink, UserFields,
};

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use bytes::Bytes;

use crate::config::DeviceLimitPolicy;
use crate::events::{Transition, TransitionObserver};
use crate::model::{
    Availability, ChannelEventView, CloseKind, DeviceSnapshot, EventKind, EventView, OfflineReason,
    PresenceChange, PresenceSnapshot,
};
use crate::outbound::{Item, Outbound, Pushed};
use crate::store::SubscriptionStore;

/// Turns domain events into frames. Implemented by `wire`, so the registry stays free of
/// protobuf.
pub trait WireEncoder: Send + Sync + fmt::Debug {
    /// One presence event frame, with its length prefix.
    fn presence_event(&self, event: &EventView<'_>) -> Bytes;
    /// One close frame, with its length prefix.
    fn close(&self, kind: CloseKind, reason: &str, reconnect_after_ms: u64) -> Bytes;
    /// One channel event frame, with its length prefix.
    fn channel_event(&self, event: &ChannelEventView<'_>) -> Bytes;
    /// One privacy notice frame (a request, an acceptance), with its length prefix.
    fn privacy_notice(&self, notice: &PrivacyNotice<'_>) -> Bytes;
}

/// Why the registry refused a change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The session is no longer registered (taken over or closed meanwhile).
    #[error("session is no longer active")]
    NotAttached,
    /// The change exceeds a limit; nothing was applied.
    #[error("{0}")]
    Limit(String),
    /// This node cannot take sessions now (fenced from its cluster): connect elsewhere.
    #[error("{0}")]
    Unavailable(String),
    /// The request needs channel membership the session does not have.
    #[error("not a member of channel {0:?}")]
    NotMember(String),
    /// A new device would exceed the user's device cap, and the policy refuses it.
    #[error("{0}")]
    DeviceLimit(String),
    /// The request makes no sense (e.g. blocking yourself); nothing was applied.
    #[error("{0}")]
    BadRequest(String),
    /// The store could not write; nothing was applied.
    #[error("store: {0}")]
    Store(String),
}

/// Registry behaviour fixed at start.
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// Most custom state pairs per user.
    pub max_state_pairs: usize,
    /// Broadcast OFFLINE events to watchers.
    pub offline_broadcast: bool,
    /// Channels one device session may join.
    pub max_joined_channels: usize,
    /// Channels one device session may watch.
    pub max_watched_channels: usize,
    /// Members above which a channel switches to interval mode.
    pub announce_threshold: usize,
    /// Devices one user may have at once, live or in their grace period. Only a new device id
    /// counts: reconnecting or taking over a device the user already has never does.
    pub max_devices_per_user: usize,
    /// What a new device beyond `max_devices_per_user` does: close the user's oldest session
    /// (Close DEVICE_LIMIT) or be refused.
    pub device_limit_policy: DeviceLimitPolicy,
    /// Privacy caps (block lists, approvals, requests).
    pub privacy: crate::privacy::PrivacyConfig,
}

/// One device's session.
#[derive(Debug)]
struct DeviceEntry {
    /// The connection that owns it; a later connection of the same device replaces it.
    conn_id: u64,
    platform: String,
    availability: Availability,
    connected_since_ms: u64,
    /// When this device first attached, in registry order (kept across takeover and the grace
    /// period): the smallest of a user's devices is its oldest session, the one the device cap
    /// closes first. Unlike `connected_since_ms` it never ties.
    attached_seq: u64,
    /// `None` while lingering in the grace period after a lost connection.
    outbound: Option<Outbound>,
    /// Why it is lingering, reported if the grace period runs out.
    lingering: Option<OfflineReason>,
    /// Channels this device joined; kept across takeover and the grace period.
    joined: BTreeSet<String>,
    /// Channels this device watches.
    watching: BTreeSet<String>,
    /// The node holding the session, `None` for this one (cluster mode).
    origin: Option<Arc<Origin>>,
    /// Held by another node that lost its connection and keeps it for the grace period.
    remote_grace: bool,
    /// The session's fencing epoch: a hybrid-logical-clock value above any earlier session's
    /// of this (user, device); an older epoch never overwrites a newer one.
    epoch: u64,
    /// The user's version after the last change this device made (part of the state digest).
    rev: u64,
    /// Invisible on its own (`Connect.invisible_device`, `SetInvisible` with scope DEVICE):
    /// everyone but the user and the backend is shown the user without this device (`shown`).
    /// Session state: it ends with the session.
    invisible: bool,
    /// The epoch of the newest channel change applied to this session (a takeover keeps
    /// it): a change made under an older epoch by the session's previous holder, arriving
    /// after the takeover, still applies unless a newer one was applied (see
    /// `replica::accepts_channel_change`).
    membership_epoch: u64,
}

/// A user's devices, sorted by id. Users have a handful of devices, and a `BTreeMap` would
/// allocate a whole node (over a KiB) for the usual one; a sorted `Vec` holds exactly them.
#[derive(Debug, Default)]
struct DeviceMap(Vec<(String, DeviceEntry)>);

impl DeviceMap {
    fn position(&self, device_id: &str) -> Result<usize, usize> {
        self.0
            .binary_search_by(|(id, _)| id.as_str().cmp(device_id))
    }

    fn get(&self, device_id: &str) -> Option<&DeviceEntry> {
        self.position(device_id).ok().map(|i| &self.0[i].1)
    }

    fn get_mut(&mut self, device_id: &str) -> Option<&mut DeviceEntry> {
        self.position(device_id).ok().map(|i| &mut self.0[i].1)
    }

    fn insert(&mut self, device_id: String, device: DeviceEntry) {
        match self.position(&device_id) {
            Ok(i) => self.0[i].1 = device,
            Err(i) => {
                // Exactly as many slots as devices: most users have one.
                self.0.reserve_exact(1);
                self.0.insert(i, (device_id, device))
            }
        }
    }

    fn remove(&mut self, device_id: &str) -> Option<DeviceEntry> {
        let i = self.position(device_id).ok()?;
        let removed = self.0.remove(i).1;
        if self.0.is_empty() {
            self.0 = Vec::new();
        }
        Some(removed)
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn iter(&self) -> impl Iterator<Item = (&String, &DeviceEntry)> {
        self.0.iter().map(|(id, d)| (id, d))
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = (&String, &mut DeviceEntry)> {
        self.0.iter_mut().map(|(id, d)| (&*id, d))
    }

    fn values(&self) -> impl Iterator<Item = &DeviceEntry> {
        self.0.iter().map(|(_, d)| d)
    }
}

impl<'a> IntoIterator for &'a DeviceMap {
    type Item = (&'a String, &'a DeviceEntry);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (String, DeviceEntry)>,
        fn(&'a (String, DeviceEntry)) -> (&'a String, &'a DeviceEntry),
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(id, d)| (id, d))
    }
}

/// A user with at least one device (live or lingering).
#[derive(Debug)]
struct UserEntry {
    devices: DeviceMap,
    /// User-level fields; `availability` and `devices` are derived on snapshot.
    presence: PresenceSnapshot,
    /// What those who may see the user were last told, kept while a device is invisible (the
    /// shown projection, `shown`): the next change is told to them as the difference from it.
    told: Option<PresenceSnapshot>,
}

impl UserEntry {
    fn snapshot(&self) -> PresenceSnapshot {
        let mut p = self.presence.clone();
        p.devices = self
            .devices
            .iter()
            .map(|(id, d)| DeviceSnapshot {
                device_id: id.clone(),
                platform: d.platform.clone(),
                availability: d.availability,
                connected_since_ms: d.connected_since_ms,
            })
            .collect();
        p.availability = self
            .devices
            .values()
            .map(|d| d.availability)
            .max_by_key(|a| a.rank())
            .unwrap_or(Availability::Offline);
        p.last_seen_ms = 0;
        p
    }

    /// Versions increase per change and stay above any earlier session's (they start from the
    /// clock in microseconds), so clients can drop stale events across reconnects.
    fn bump_version(&mut self, tick: u64) {
        self.presence.version = (self.presence.version + 1).max(tick);
    }
}

fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[derive(Debug, Default)]
struct State {
    users: HashMap<String, UserEntry>,
    /// Channels with at least one member.
    channels: HashMap<String, channels::Channel>,
    /// Channel → watching (user, device) pairs, for channels with at least one watcher.
    channel_watchers: HashMap<String, BTreeSet<(String, String)>>,
    /// Makes each INTERVAL event's coalescing key unique.
    interval_seq: u64,
    /// Source of `DeviceEntry::attached_seq`.
    device_seq: u64,
    /// The online-user count last added to the process-wide gauge, so several registries in
    /// one process (embedding, tests) add up instead of overwriting each other.
    online_reported: usize,
    /// Cluster-mode replica bookkeeping (tombstones, digests, remote expiries, fencing).
    replica: replica::ReplicaState,
    /// While a dead node's device is being removed: the key its transitions are reported
    /// under (every survivor reports them alike; see `RemovedBy::Expired`).
    reporting_expired: Option<String>,
    /// Privacy settings, blocks and approvals: what each viewer may see (`privacy`).
    privacy: crate::privacy::book::PrivacyBook,
    /// Set once any device has been invisible: channel views then look member by member
    /// (until then they skip that pass, as for a registry nobody restricts).
    devices_hidden: bool,
    /// While a removed device's end is reported: it was invisible (its report is hidden
    /// from strangers, `public_note`).
    departing_invisible: bool,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    store: Arc<dyn SubscriptionStore>,
    encoder: Arc<dyn WireEncoder>,
    options: RegistryOptions,
    /// Where local changes go in cluster mode; unset on a single node.
    sink: std::sync::OnceLock<Arc<dyn ReplicationSink>>,
    /// The hybrid logical clock behind versions and epochs, in microseconds.
    hlc: replica::Hlc,
    /// Told of every transition a backend cares about (webhooks, `GET /v1/events`), under
    /// the state lock so they arrive in registry order.
    observer: std::sync::OnceLock<Arc<dyn TransitionObserver>>,
    /// Told, under the state lock, of each user whose privacy settings (invisibility,
    /// audiences) changed: what a stranger is shown of them may have changed without an
    /// event (the MQTT bridge's public view). Must not block.
    /// Told of privacy settings changes (the MQTT bridge, public webhooks); a handful at most.
    settings_listeners: std::sync::RwLock<Vec<Arc<dyn SettingsListener>>>,
    /// Whether events carry what a stranger was shown (on only with public webhooks).
    public_notes: std::sync::atomic::AtomicBool,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // A registry that goes away takes its users out of the process-wide gauge.
        let state = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        metrics::gauge!(crate::metrics::ONLINE_USERS).decrement(state.online_reported as f64);
    }
}

/// Told of each user whose privacy settings changed ([`Registry::add_settings_listener`]).
pub trait SettingsListener: Send + Sync + fmt::Debug {
    /// `user`'s invisibility or audiences changed; `public` is what a stranger is shown of
    /// them now. Called under the registry lock, so it must not block.
    fn settings_changed(&self, user: &str, public: &crate::events::PublicNote);
}

/// Handle to the live presence table; a cheap clone of an `Arc`.
#[derive(Debug, Clone)]
pub struct Registry {
    shared: Arc<Shared>,
}

/// A new session to register.
#[derive(Debug)]
pub struct Attach {
    /// Authenticated user.
    pub user_id: String,
    /// Device id.
    pub device_id: String,
    /// Platform name.
    pub platform: String,
    /// The connection's queue.
    pub outbound: Outbound,
    /// Presence to apply before watchers are told.
    pub initial: Option<PresenceChange>,
    /// Profile data; replaces the user's when non-empty.
    pub user_data: BTreeMap<String, String>,
    /// When the Connect arrived.
    pub received_at: Instant,
    /// The device starts invisible on its own (`Connect.invisible_device`): nobody but the
    /// user's devices and the backend ever sees it (see [`Registry::set_device_invisible`]).
    pub invisible: bool,
}

/// Result of registering a session.
#[derive(Debug)]
pub struct Attached {
    /// A live session of the same device was closed in favour of this one.
    pub taken_over: bool,
    /// The user's presence now.
    pub presence: PresenceSnapshot,
}

/// Who removed a device, for what the cluster is told.
#[derive(Debug, Clone, Copy)]
enum RemovedBy {
    /// This node: the other nodes get a delta; a device another node holds is closed there
    /// with `close`.
    Local { close: Option<CloseKind> },
    /// A delta from the node holding it, with that node's version and last-seen time.
    Remote { version: u64, last_seen_ms: u64 },
    /// This node's own bookkeeping (fencing, a state transfer's correction): no delta.
    Silent,
    /// A dead node's device whose grace period ran out, removed by every surviving node: no
    /// delta, and its events are reported under a key every node computes alike.
    Expired,
}

/// Per-fanout counts, recorded once per fanout rather than per delivery.
#[derive(Debug, Default)]
struct FanoutTally {
    delivered: u64,
    coalesced: u64,
    overflowed: Vec<Outbound>,
}

impl FanoutTally {
    fn offer(&mut self, outbound: &Outbound, key: &str, item: &Item) {
        match outbound.push_event(key, item.clone()) {
            Pushed::Queued => self.delivered += 1,
            Pushed::Coalesced => {
                self.delivered += 1;
                self.coalesced += 1;
            }
            Pushed::Closed => {}
            Pushed::Overflow => self.overflowed.push(outbound.clone()),
        }
    }
}

impl Registry {
    /// An empty registry over `store`.
    pub fn new(
        store: Arc<dyn SubscriptionStore>,
        encoder: Arc<dyn WireEncoder>,
        options: RegistryOptions,
    ) -> Registry {
        let state = State {
            privacy: crate::privacy::book::PrivacyBook::new(options.privacy.clone()),
            ..State::default()
        };
        let registry = Registry {
            shared: Arc::new(Shared {
                state: Mutex::new(state),
                store,
                encoder,
                options,
                sink: std::sync::OnceLock::new(),
                hlc: replica::Hlc::default(),
                observer: std::sync::OnceLock::new(),
                settings_listeners: std::sync::RwLock::new(Vec::new()),
                public_notes: std::sync::atomic::AtomicBool::new(false),
            }),
        };
        registry.load_privacy();
        registry
    }

    /// Installs the observer of transitions (once; later calls are ignored with a warning).
    /// Only transitions made on this node are reported: in cluster mode each one is reported
    /// by the node that made it, so the cluster reports it once.
    pub fn set_observer(&self, observer: Arc<dyn TransitionObserver>) {
        if self.shared.observer.set(observer).is_err() {
            tracing::warn!("transition observer already set");
        }
    }

    /// From now on, each reported event carries what a stranger was shown of it
    /// (`Event::public`), for public webhooks. Off by default: the note costs a lookup per
    /// event and a pass over a channel's members per channel event.
    pub fn note_public_views(&self) {
        self.shared
            .public_notes
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Adds a listener told of each user whose privacy settings changed. Called under the
    /// registry lock: it must not block.
    pub fn add_settings_listener(&self, listener: Arc<dyn SettingsListener>) {
        self.shared
            .settings_listeners
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(listener);
    }

    /// Reports a transition when an observer is installed (built only then).
    fn observe(&self, state: &State, build: impl FnOnce() -> Transition) {
        self.observe_keyed(state, None, build);
    }

    /// Reports a transition every node reports alike, under `key` (see
    /// [`TransitionObserver::observe_keyed`]), with what a stranger was shown of it.
    fn observe_keyed(&self, state: &State, key: Option<&str>, build: impl FnOnce() -> Transition) {
        if let Some(observer) = self.shared.observer.get() {
            let transition = build();
            let public = if self
                .shared
                .public_notes
                .load(std::sync::atomic::Ordering::Relaxed)
            {
                self.public_note(state, &transition)
            } else {
                None
            };
            observer.observe_noted(transition, key, public);
        }
    }

    /// The subscription store behind this registry.
    pub fn store(&self) -> &Arc<dyn SubscriptionStore> {
        &self.shared.store
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the table consistent before anything that could panic;
        // recover the guard rather than take the whole broker down with a poisoned lock.
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a session. A live session of the same (user, device) is closed with
    /// TAKEN_OVER; a lingering one is resumed. A new device beyond the user's device cap first
    /// closes the user's oldest session with DEVICE_LIMIT, or is refused, per the policy.
    /// Watchers see ONLINE for the first device, UPDATE for another device (one UPDATE when it
    /// replaced the oldest: never an OFFLINE) or when `initial` changes something, and nothing
    /// for a resumed or taken-over device.
    pub fn attach(&self, attach: Attach) -> Result<Attached, RegistryError> {
        let now_ms = crate::now_ms();
        let mut state = self.state();
        if let Some(reason) = &state.replica.fenced {
            return Err(RegistryError::Unavailable(reason.clone()));
        }
        // Everything that can refuse the Connect is checked before anything changes.
        let (mut presence, new_device, devices_before) = match state.users.get(&attach.user_id) {
            Some(e) => (
                e.presence.clone(),
                e.devices.get(&attach.device_id).is_none(),
                e.devices.len(),
            ),
            None => {
                // A user coming online continues from the version they went offline at (it may
                // come from another node whose clock is ahead), so the ONLINE is never older.
                let mut offline = PresenceSnapshot::offline(&attach.user_id, 0);
                offline.version = self
                    .shared
                    .store
                    .last_seen(&attach.user_id)
                    .map_or(0, |l| l.version);
                (offline, true, 0)
            }
        };
        if let Some(initial) = &attach.initial {
            initial
                .apply_to(&mut presence, self.shared.options.max_state_pairs)
                .map_err(RegistryError::Limit)?;
        }
        // A new connection of an existing device that changes its invisibility: everyone else
        // is told as for SetInvisible (its rooms, then presence), before the takeover.
        let flips = state
            .users
            .get(&attach.user_id)
            .and_then(|e| e.devices.get(&attach.device_id))
            .is_some_and(|d| d.invisible != attach.invisible);
        if flips {
            if !attach.invisible {
                // Shown from now on as a device that connects now: its availability and
                // platform are this connection's, never what it set while hidden.
                if let Some(device) = state
                    .users
                    .get_mut(&attach.user_id)
                    .and_then(|e| e.devices.get_mut(&attach.device_id))
                {
                    device.availability = attach
                        .initial
                        .as_ref()
                        .and_then(|c| c.availability)
                        .unwrap_or(Availability::Online);
                    device.platform.clone_from(&attach.platform);
                }
            }
            self.flip_device(
                &mut state,
                &attach.user_id,
                &attach.device_id,
                attach.invisible,
                None,
                attach.received_at,
            );
            // The flip moved the version; the fields compared below did not change.
            if let Some(e) = state.users.get(&attach.user_id) {
                presence.version = e.presence.version;
            }
        }
        // What watchers were shown until now, when it may differ from what this attach leaves
        // (a device invisible on its own, see `shown`): taken before an eviction, which
        // watchers are not told of (this attach tells them).
        let baseline = match state.users.get(&attach.user_id) {
            Some(e) if e.told.is_some() => e.told.clone(),
            _ => attach
                .invisible
                .then(|| self.snapshot_locked(&state, &attach.user_id)),
        };
        let max_devices = self.shared.options.max_devices_per_user;
        if new_device && devices_before >= max_devices {
            match self.shared.options.device_limit_policy {
                DeviceLimitPolicy::Refuse => {
                    return Err(RegistryError::DeviceLimit(format!(
                        "device limit ({max_devices}) reached: disconnect another device first"
                    )))
                }
                DeviceLimitPolicy::EvictOldest => self.evict_oldest(
                    &mut state,
                    &attach.user_id,
                    max_devices.saturating_sub(1),
                    attach.received_at,
                ),
            }
        }
        state.devices_hidden |= attach.invisible;
        let mut entry = state
            .users
            .remove(&attach.user_id)
            .unwrap_or_else(|| UserEntry {
                devices: DeviceMap::default(),
                presence: PresenceSnapshot::offline(&attach.user_id, 0),
                told: None,
            });
        if entry.told.is_none() {
            entry.told = baseline;
        }
        let changed_fields = presence != entry.presence;
        entry.presence = presence;
        // An invisible device's profile data would show it: it keeps the user's.
        if !attach.user_data.is_empty() && !attach.invisible {
            entry.presence.user_data = attach.user_data.clone();
        }
        let availability = attach
            .initial
            .as_ref()
            .and_then(|c| c.availability)
            .unwrap_or(Availability::Online);
        let mut taken_over = false;
        // A fresh epoch for this session, above any this node has seen for the device.
        let epoch = self.shared.hlc.tick();
        let mut digest_out = None;
        let kind = match entry.devices.get_mut(&attach.device_id) {
            Some(existing) => {
                digest_out = Some((existing.origin.take(), existing.epoch, existing.rev));
                if digest_out.as_ref().is_some_and(|(o, _, _)| o.is_some()) {
                    // Held by another node until now: a takeover across nodes. That node
                    // closes its connection when it sees this session's newer epoch.
                    taken_over = true;
                }
                existing.epoch = epoch;
                if let Some(old) = existing.outbound.take() {
                    taken_over = true;
                    let close = self.shared.encoder.close(
                        CloseKind::TakenOver,
                        "another connection of this device took the session over",
                        0,
                    );
                    old.close(Some(Item::reply(close, "close")));
                }
                let availability_changed = attach
                    .initial
                    .as_ref()
                    .and_then(|c| c.availability)
                    .is_some_and(|a| a != existing.availability);
                existing.conn_id = attach.outbound.id();
                existing.platform = attach.platform.clone();
                if availability_changed {
                    existing.availability = availability;
                }
                existing.outbound = Some(attach.outbound.clone());
                existing.lingering = None;
                (changed_fields || availability_changed).then_some(EventKind::Update)
            }
            None => {
                // Counted before any eviction, so a device that replaced the oldest is an
                // UPDATE, never a fresh ONLINE.
                let first = devices_before == 0;
                state.device_seq += 1;
                entry.devices.insert(
                    attach.device_id.clone(),
                    DeviceEntry {
                        conn_id: attach.outbound.id(),
                        platform: attach.platform.clone(),
                        availability,
                        connected_since_ms: now_ms,
                        attached_seq: state.device_seq,
                        outbound: Some(attach.outbound.clone()),
                        lingering: None,
                        joined: BTreeSet::new(),
                        watching: BTreeSet::new(),
                        origin: None,
                        remote_grace: false,
                        epoch,
                        rev: 0,
                        invisible: attach.invisible,
                        membership_epoch: epoch,
                    },
                );
                Some(if first {
                    EventKind::Online
                } else {
                    EventKind::Update
                })
            }
        };
        if kind.is_some() {
            entry.bump_version(self.shared.hlc.tick());
        }
        let version = entry.presence.version;
        let rev = match entry.devices.get_mut(&attach.device_id) {
            Some(device) => {
                device.rev = version;
                version
            }
            None => version,
        };
        let snapshot = entry.snapshot();
        state.users.insert(attach.user_id.clone(), entry);
        if let Some((origin, old_epoch, old_rev)) = digest_out {
            state.replica.toggle_digest(
                origin.as_deref(),
                &attach.user_id,
                &attach.device_id,
                old_epoch,
                old_rev,
            );
        }
        state
            .replica
            .toggle_digest(None, &attach.user_id, &attach.device_id, epoch, rev);
        self.emit_upsert(&state, &attach.user_id, &attach.device_id);
        if let Some(kind) = kind {
            let event = EventView {
                kind,
                presence: &snapshot,
                reason: None,
                device_id: &attach.device_id,
            };
            self.fanout(
                &mut state,
                &event,
                Some(attach.outbound.id()),
                attach.received_at,
            );
            self.observe(&state, || match kind {
                EventKind::Online => Transition::UserOnline(snapshot.clone()),
                _ => Transition::UserUpdated(snapshot.clone()),
            });
        }
        if new_device {
            self.observe(&state, || Transition::DeviceConnected {
                user: attach.user_id.clone(),
                device: attach.device_id.clone(),
                platform: attach.platform.clone(),
                version: snapshot.version,
            });
        }
        publish_online_gauge(&mut state);
        Ok(Attached {
            taken_over,
            presence: snapshot,
        })
    }

    /// Closes `user_id`'s oldest sessions (live or lingering) until at most `keep` devices are
    /// left, to make room for a new one: each leaves its channels, and a live one is sent Close
    /// DEVICE_LIMIT. Watchers are not told here: the attach that follows sends one UPDATE with
    /// the new device list, so the user never flickers offline. Scans only the user's devices,
    /// which the cap bounds.
    fn evict_oldest(&self, state: &mut State, user_id: &str, keep: usize, received_at: Instant) {
        let max_devices = self.shared.options.max_devices_per_user;
        loop {
            let Some(oldest) = state
                .users
                .get(user_id)
                .filter(|e| e.devices.len() > keep)
                .and_then(|e| e.devices.iter().min_by_key(|(_, d)| d.attached_seq))
                .map(|(id, _)| id.clone())
            else {
                return;
            };
            let Some(device) = self.drop_device(
                state,
                user_id,
                &oldest,
                OfflineReason::Kicked,
                None,
                received_at,
                RemovedBy::Local {
                    close: Some(CloseKind::DeviceLimit),
                },
                false,
            ) else {
                return;
            };
            // A lingering device has no connection to tell; its grace-period timer finds it
            // gone and does nothing, as does a live one's connection when it sees the close.
            if let Some(outbound) = device.outbound {
                let close = self.shared.encoder.close(
                    CloseKind::DeviceLimit,
                    &format!("device limit ({max_devices}) reached: a newer device connected"),
                    0,
                );
                if outbound.close(Some(Item::reply(close, "close"))) {
                    metrics::counter!(
                        crate::metrics::CLOSES,
                        "code" => CloseKind::DeviceLimit.metric_label()
                    )
                    .increment(1);
                }
            }
        }
    }

    /// Applies a change published by (user, device) on connection `conn_id` and fans it out to
    /// watchers and the user's other devices. Returns the new presence.
    pub fn publish(
        &self,
        user_id: &str,
        device_id: &str,
        conn_id: u64,
        change: &PresenceChange,
        received_at: Instant,
    ) -> Result<PresenceSnapshot, RegistryError> {
        let mut state = self.state();
        let entry = state
            .users
            .get_mut(user_id)
            .ok_or(RegistryError::NotAttached)?;
        let device = entry
            .devices
            .get_mut(device_id)
            .filter(|d| d.conn_id == conn_id)
            .ok_or(RegistryError::NotAttached)?;
        change
            .apply_to(&mut entry.presence, self.shared.options.max_state_pairs)
            .map_err(RegistryError::Limit)?;
        if let Some(a) = change.availability {
            device.availability = a;
        }
        let (epoch, old_rev) = (device.epoch, device.rev);
        entry.bump_version(self.shared.hlc.tick());
        let version = entry.presence.version;
        if let Some(device) = entry.devices.get_mut(device_id) {
            device.rev = version;
        }
        let snapshot = entry.snapshot();
        state
            .replica
            .toggle_digest(None, user_id, device_id, epoch, old_rev);
        state
            .replica
            .toggle_digest(None, user_id, device_id, epoch, version);
        self.emit_upsert(&state, user_id, device_id);
        let event = EventView {
            kind: EventKind::Update,
            presence: &snapshot,
            reason: None,
            device_id,
        };
        self.fanout(&mut state, &event, Some(conn_id), received_at);
        self.observe(&state, || Transition::UserUpdated(snapshot.clone()));
        Ok(snapshot)
    }

    /// Removes (user, device) owned by `conn_id` at once and tells watchers why. A no-op when
    /// another connection owns the device now.
    pub fn detach(
        &self,
        user_id: &str,
        device_id: &str,
        conn_id: u64,
        reason: OfflineReason,
        received_at: Instant,
    ) {
        let mut state = self.state();
        self.remove_device(
            &mut state,
            user_id,
            device_id,
            conn_id,
            reason,
            received_at,
            false,
        );
    }

    /// Marks (user, device) owned by `conn_id` as lingering after its connection was lost: it
    /// stays visible until [`Registry::expire_lingering`], unless the device reconnects first.
    /// Returns false when another connection owns the device now (nothing to expire).
    pub fn linger(
        &self,
        user_id: &str,
        device_id: &str,
        conn_id: u64,
        reason: OfflineReason,
    ) -> bool {
        let mut state = self.state();
        let Some(device) = state
            .users
            .get_mut(user_id)
            .and_then(|e| e.devices.get_mut(device_id))
            .filter(|d| d.conn_id == conn_id)
        else {
            return false;
        };
        device.outbound = None;
        device.lingering = Some(reason);
        // The other nodes learn it is in its grace period (the backend's online check).
        self.emit_upsert(&state, user_id, device_id);
        true
    }

    /// Ends the grace period of a lingering device: removes it and tells watchers, unless the
    /// device reconnected meanwhile.
    pub fn expire_lingering(
        &self,
        user_id: &str,
        device_id: &str,
        conn_id: u64,
        received_at: Instant,
    ) {
        let mut state = self.state();
        let reason = state
            .users
            .get(user_id)
            .and_then(|e| e.devices.get(device_id))
            .filter(|d| d.conn_id == conn_id)
            .and_then(|d| d.lingering);
        if let Some(reason) = reason {
            self.remove_device(
                &mut state,
                user_id,
                device_id,
                conn_id,
                reason,
                received_at,
                true,
            );
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn remove_device(
        &self,
        state: &mut State,
        user_id: &str,
        device_id: &str,
        conn_id: u64,
        reason: OfflineReason,
        received_at: Instant,
        only_lingering: bool,
    ) {
        let Some(entry) = state.users.get_mut(user_id) else {
            return;
        };
        match entry.devices.get(device_id) {
            Some(d) if d.conn_id == conn_id && (!only_lingering || d.lingering.is_some()) => {}
            _ => return,
        }
        self.drop_device(
            state,
            user_id,
            device_id,
            reason,
            Some(conn_id),
            received_at,
            RemovedBy::Local { close: None },
            true,
        );
    }

    /// Removes (user, device) from the table, whoever holds it: leaves its channels, keeps the
    /// cluster bookkeeping (digest, tombstone, a delta for the other nodes when this node made
    /// the change) and, when `broadcast`, tells watchers UPDATE or OFFLINE with `reason`
    /// (never for a shutdown, and OFFLINE only when offline broadcasts are on). Returns the
    /// removed entry.
    #[allow(clippy::too_many_arguments)]
    fn drop_device(
        &self,
        state: &mut State,
        user_id: &str,
        device_id: &str,
        reason: OfflineReason,
        exclude_conn: Option<u64>,
        received_at: Instant,
        by: RemovedBy,
        broadcast: bool,
    ) -> Option<DeviceEntry> {
        let key = match by {
            RemovedBy::Expired => state
                .users
                .get(user_id)
                .and_then(|e| e.devices.get(device_id))
                .map(|d| expiry_key(user_id, device_id, d.epoch)),
            _ => None,
        };
        state.reporting_expired.clone_from(&key);
        self.leave_all_channels(state, user_id, device_id, reason, received_at);
        state.reporting_expired = None;
        let entry = state.users.get_mut(user_id)?;
        let device = entry.devices.remove(device_id)?;
        let (tick, last_seen_ms) = match by {
            RemovedBy::Remote {
                version,
                last_seen_ms,
            } => {
                self.shared.hlc.observe(version);
                (version, last_seen_ms)
            }
            RemovedBy::Local { .. } | RemovedBy::Silent | RemovedBy::Expired => {
                (self.shared.hlc.tick(), crate::now_ms())
            }
        };
        entry.bump_version(tick);
        let version = entry.presence.version;
        let mut snapshot = entry.snapshot();
        let last_device = entry.devices.is_empty();
        // The last device was invisible and watchers already see the user offline: they keep
        // the last-seen they were shown (it is what the store keeps, the backend included).
        let frozen = if last_device {
            entry.told.take().filter(|t| t.devices.is_empty())
        } else {
            None
        };
        if last_device {
            // Exactly what GetPresence shows from now on (an offline user keeps no status or
            // state), so a client's view built from events equals a fresh query.
            snapshot = PresenceSnapshot::offline(user_id, last_seen_ms);
            snapshot.version = version;
            let (seen_ms, seen_version) = frozen
                .as_ref()
                .map_or((last_seen_ms, version), |t| (t.last_seen_ms, t.version));
            // The backend is told the last-seen that is stored (at the truth's version, which
            // is newer: a newest-version-wins consumer keeps this one, of the same content).
            snapshot.last_seen_ms = seen_ms;
            if let Err(e) = self
                .shared
                .store
                .record_last_seen(user_id, seen_ms, seen_version)
            {
                tracing::warn!(user = user_id, "cannot record last-seen: {e}");
            }
            state.users.remove(user_id);
        }
        state.replica.toggle_digest(
            device.origin.as_deref(),
            user_id,
            device_id,
            device.epoch,
            device.rev,
        );
        if let Some(sink) = self.shared.sink.get() {
            let epoch = match (&by, &device.origin) {
                // Another node holds it: a newer epoch makes that node close the session.
                (RemovedBy::Local { .. }, Some(_)) => self.shared.hlc.tick(),
                _ => device.epoch,
            };
            // Fencing and a dead node's expiry are bookkeeping, not the session's end
            // everywhere: only an end told by the holder (or decided here) is a tombstone.
            if !matches!(by, RemovedBy::Silent | RemovedBy::Expired) {
                state
                    .replica
                    .tombstone(user_id, device_id, epoch, received_at);
            }
            if let RemovedBy::Local { close } = by {
                sink.emit(ReplicaChange::Remove {
                    user_id: user_id.to_string(),
                    device_id: device_id.to_string(),
                    epoch,
                    reason,
                    version,
                    last_seen_ms,
                    close: if device.origin.is_some() { close } else { None },
                });
            }
        }
        let kind = if last_device {
            EventKind::Offline
        } else {
            EventKind::Update
        };
        // Reported by the node that ended the session (a shutdown voids everything at once:
        // the next boot's `server.started` says so); a dead node's session by every survivor
        // under one key, so the cluster keeps one report.
        let reported = matches!(by, RemovedBy::Local { .. } | RemovedBy::Expired);
        if reported && reason != OfflineReason::ServerShutdown {
            state.departing_invisible = device.invisible;
            self.observe_keyed(state, key.as_deref(), || Transition::DeviceDisconnected {
                user: user_id.to_string(),
                device: device_id.to_string(),
                reason,
                version,
            });
            state.departing_invisible = false;
            self.observe_keyed(state, key.as_deref(), || {
                if last_device {
                    Transition::UserOffline {
                        presence: snapshot.clone(),
                        reason,
                    }
                } else {
                    Transition::UserUpdated(snapshot.clone())
                }
            });
        }
        let broadcast = broadcast
            && frozen.is_none()
            && reason != OfflineReason::ServerShutdown
            && (kind != EventKind::Offline || self.shared.options.offline_broadcast);
        if broadcast {
            let event = EventView {
                kind,
                presence: &snapshot,
                reason: Some(reason),
                device_id,
            };
            self.fanout(state, &event, exclude_conn, received_at);
        }
        publish_online_gauge(state);
        Some(device)
    }

    /// The current presence of `user_id`; an offline user carries its last-seen time.
    pub fn snapshot(&self, user_id: &str) -> PresenceSnapshot {
        let state = self.state();
        self.snapshot_locked(&state, user_id)
    }

    fn snapshot_locked(&self, state: &State, user_id: &str) -> PresenceSnapshot {
        match state.users.get(user_id) {
            Some(entry) => entry.snapshot(),
            None => {
                let seen = self.shared.store.last_seen(user_id).unwrap_or_default();
                let mut snapshot = PresenceSnapshot::offline(user_id, seen.at_ms);
                snapshot.version = seen.version;
                snapshot
            }
        }
    }

    /// Current presence of each user, in order.
    pub fn snapshots(&self, user_ids: &[String]) -> Vec<PresenceSnapshot> {
        let state = self.state();
        user_ids
            .iter()
            .map(|u| self.snapshot_locked(&state, u))
            .collect()
    }

    /// Sends an ephemeral presence of `sender` (its current presence with `change` applied) to
    /// every live device of each recipient. Nothing is stored. Returns the recipients that had
    /// at least one live device.
    pub fn direct(
        &self,
        sender: &str,
        device_id: &str,
        recipients: &[String],
        change: &PresenceChange,
        received_at: Instant,
    ) -> Result<Vec<String>, RegistryError> {
        let state = self.state();
        let mut presence = self.snapshot_locked(&state, sender);
        change
            .apply_to(&mut presence, self.shared.options.max_state_pairs)
            .map_err(RegistryError::Limit)?;
        if let Some(a) = change.availability {
            presence.availability = a;
        }
        // A directed presence reveals the user on purpose, never a device invisible on its
        // own: it is left out of the list, and not named as the sender.
        let hidden_device = |d: &str| {
            state
                .users
                .get(sender)
                .and_then(|e| e.devices.get(d))
                .is_some_and(|d| d.invisible)
        };
        let shown_version = state
            .users
            .get(sender)
            .is_some_and(|e| e.told.is_some())
            .then(|| self.projected(&state, sender).version);
        if let Some(version) = shown_version {
            // The version watchers hold, not the truth's moving underneath.
            presence.version = version;
        }
        if presence.devices.iter().any(|d| hidden_device(&d.device_id)) {
            presence.devices.retain(|d| !hidden_device(&d.device_id));
            if change.availability.is_none() && !presence.devices.is_empty() {
                presence.availability = presence
                    .devices
                    .iter()
                    .map(|d| d.availability)
                    .max_by_key(|a| a.rank())
                    .unwrap_or(Availability::Offline);
            }
        }
        let device_id = if hidden_device(device_id) {
            ""
        } else {
            device_id
        };
        let event = EventView {
            kind: EventKind::Directed,
            presence: &presence,
            reason: None,
            device_id,
        };
        let frame = self.shared.encoder.presence_event(&event);
        // Nothing passes between users in a block relation, either way.
        let recipients: Vec<String> = recipients
            .iter()
            .filter(|r| !state.privacy.related(sender, r))
            .cloned()
            .collect();
        let recipients = &recipients[..];
        let mut delivered = self.deliver_directed(&state, sender, &frame, recipients, received_at);
        // The reply lists only recipients the sender sees online: a hidden recipient is reached
        // but never revealed.
        delivered.retain(|r| {
            self.view_locked(&state, crate::privacy::Viewer::User(sender), r)
                .availability
                != Availability::Offline
        });
        // Recipients with a session on another node get the same frame through that node.
        let mut remote = Vec::new();
        for recipient in recipients {
            let elsewhere = state
                .users
                .get(recipient)
                .is_some_and(|e| e.devices.values().any(|d| d.origin.is_some()));
            if elsewhere {
                remote.push(recipient.clone());
            }
        }
        if let (Some(sink), false) = (self.shared.sink.get(), remote.is_empty()) {
            for r in &remote {
                if !delivered.contains(r) {
                    delivered.push(r.clone());
                }
            }
            sink.emit(ReplicaChange::Directed {
                sender: sender.to_string(),
                frame,
                recipients: remote,
            });
        }
        Ok(delivered)
    }

    /// Offers an encoded directed-presence frame to every live device of each recipient held
    /// here. Returns the recipients reached.
    fn deliver_directed(
        &self,
        state: &State,
        sender: &str,
        frame: &Bytes,
        recipients: &[String],
        received_at: Instant,
    ) -> Vec<String> {
        let item = Item::event(frame.clone(), received_at, "presence_event");
        // Directed events park under their own key so they never replace the sender's stored
        // presence in a slow recipient's queue.
        let key = format!("\u{1}directed:{sender}");
        let mut tally = FanoutTally::default();
        let mut delivered = Vec::new();
        for recipient in recipients {
            let Some(entry) = state.users.get(recipient) else {
                continue;
            };
            let mut reached = false;
            for device in entry.devices.values() {
                if let Some(outbound) = &device.outbound {
                    tally.offer(outbound, &key, &item);
                    // Reached, as far as the sender may tell, only through a device they
                    // may see (an invisible one is reached all the same).
                    reached |= !device.invisible;
                }
            }
            if reached {
                delivered.push(recipient.clone());
            }
        }
        self.finish_fanout(tally);
        delivered
    }

    /// Users with at least one device, live or lingering.
    pub fn online_users(&self) -> usize {
        self.state().users.len()
    }

    /// Encodes `event` once and offers it to the user's other devices and to every live device
    /// of every watcher. Called with the state lock held so that per-user order is lock order.
    fn fanout(
        &self,
        state: &mut State,
        event: &EventView<'_>,
        exclude_conn: Option<u64>,
        received_at: Instant,
    ) {
        let user_id = event.presence.user_id.as_str();
        // While a device of the user is invisible, watchers are told the change of the shown
        // projection instead (maybe nothing); the user's own devices get the truth.
        match self.shown_step(state, event) {
            shown::Step::Truth => {}
            shown::Step::Nothing => {
                self.tell_own_devices(state, event, exclude_conn, received_at);
                return;
            }
            shown::Step::Tell(told) => {
                self.tell_own_devices(state, event, exclude_conn, received_at);
                let shown = told.view();
                self.offer_watchers(state, &shown, true, received_at);
                return;
            }
        }
        let item = self.presence_item(event, received_at);
        let mut tally = FanoutTally::default();
        self.offer_own_devices(state, user_id, &item, exclude_conn, &mut tally);
        self.offer_watchers_encoded(state, event, &item, false, received_at, &mut tally);
        self.finish_fanout(tally);
    }

    /// The truth `event` to the user's own devices (but `exclude_conn`).
    fn tell_own_devices(
        &self,
        state: &State,
        event: &EventView<'_>,
        exclude_conn: Option<u64>,
        received_at: Instant,
    ) {
        let item = self.presence_item(event, received_at);
        let mut tally = FanoutTally::default();
        let user_id = event.presence.user_id.as_str();
        self.offer_own_devices(state, user_id, &item, exclude_conn, &mut tally);
        self.finish_fanout(tally);
    }

    /// `event` encoded once, as a queued item.
    fn presence_item(&self, event: &EventView<'_>, received_at: Instant) -> Item {
        Item::event(
            self.shared.encoder.presence_event(event),
            received_at,
            "presence_event",
        )
    }

    fn offer_own_devices(
        &self,
        state: &State,
        user_id: &str,
        item: &Item,
        exclude_conn: Option<u64>,
        tally: &mut FanoutTally,
    ) {
        if let Some(entry) = state.users.get(user_id) {
            for device in entry.devices.values() {
                if Some(device.conn_id) == exclude_conn {
                    continue;
                }
                if let Some(outbound) = &device.outbound {
                    tally.offer(outbound, user_id, item);
                }
            }
        }
    }

    /// `event` to every live device of every watcher of its user, each as they are shown it
    /// (watcher by watcher when `restricted` or privacy restricts the user).
    fn offer_watchers(
        &self,
        state: &State,
        event: &EventView<'_>,
        restricted: bool,
        received_at: Instant,
    ) {
        let item = self.presence_item(event, received_at);
        let mut tally = FanoutTally::default();
        self.offer_watchers_encoded(state, event, &item, restricted, received_at, &mut tally);
        self.finish_fanout(tally);
    }

    fn offer_watchers_encoded(
        &self,
        state: &State,
        event: &EventView<'_>,
        item: &Item,
        restricted: bool,
        received_at: Instant,
        tally: &mut FanoutTally,
    ) {
        let user_id = event.presence.user_id.as_str();
        // A user privacy restricts is shown watcher by watcher; everyone else, as encoded.
        let restricted = restricted || state.privacy.restricted(user_id);
        let mut variants: [Option<Item>; 2] = [None, None];
        self.shared
            .store
            .for_each_watcher(user_id, crate::now_ms(), &mut |watcher| {
                if watcher == user_id {
                    return;
                }
                if restricted {
                    self.offer_restricted(state, watcher, event, received_at, &mut variants, tally);
                    return;
                }
                if let Some(entry) = state.users.get(watcher) {
                    for outbound in entry.devices.values().filter_map(|d| d.outbound.as_ref()) {
                        tally.offer(outbound, user_id, item);
                    }
                }
            });
    }

    fn finish_fanout(&self, tally: FanoutTally) {
        if tally.delivered > 0 {
            metrics::counter!(crate::metrics::DELIVERIES).increment(tally.delivered);
        }
        if tally.coalesced > 0 {
            metrics::counter!(crate::metrics::COALESCED).increment(tally.coalesced);
        }
        for outbound in tally.overflowed {
            let close = self.shared.encoder.close(
                CloseKind::SlowConsumer,
                "too many undelivered events: read your socket",
                0,
            );
            if outbound.close(Some(Item::reply(close, "close"))) {
                metrics::counter!(crate::metrics::SLOW_CONSUMER_DISCONNECTS).increment(1);
            }
        }
    }
}

/// The report key of a dead node's device expiring (the same on every survivor).
fn expiry_key(user_id: &str, device_id: &str, epoch: u64) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(user_id.as_bytes());
    h.update([0]);
    h.update(device_id.as_bytes());
    h.update([0]);
    h.update(epoch.to_be_bytes());
    h.finalize()[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn publish_online_gauge(state: &mut State) {
    let now = state.users.len();
    let gauge = metrics::gauge!(crate::metrics::ONLINE_USERS);
    if now > state.online_reported {
        gauge.increment((now - state.online_reported) as f64);
    } else if now < state.online_reported {
        gauge.decrement((state.online_reported - now) as f64);
    }
    state.online_reported = now;
}
