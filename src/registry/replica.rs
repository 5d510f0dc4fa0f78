//! The registry's side of cluster mode, still synchronous: what a local change tells the other
//! nodes (`ReplicationSink`, called under the registry lock so deltas leave in lock order), how
//! a remote node's delta or state transfer is merged into the table (epoch fencing, tombstones,
//! last-writer-wins user fields by hybrid-logical-clock version), a dead node's devices
//! expiring after the grace period, the per-origin state digests the nodes compare, and
//! fencing (this node cut off: every session closed, Connect refused). No NATS, no `.await`:
//! the async shell in `crate::cluster` carries the bytes.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{publish_online_gauge, DeviceEntry, DeviceMap, Registry, RemovedBy, State, UserEntry};
use crate::model::{
    Availability, CloseKind, EventKind, EventView, OfflineReason, PresenceSnapshot,
};
use crate::outbound::Item;

/// A node's boot: its id and the incarnation it drew when it (re)joined the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Origin {
    /// The node id (`[cluster] node_id`).
    pub node: String,
    /// Drawn at each (re)join; messages of an incarnation declared dead are ignored.
    pub incarnation: u64,
}

/// The user-level presence fields, as one node last knew them, with their version.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct UserFields {
    /// Application code.
    pub show: u16,
    /// Status text.
    pub status: String,
    /// Description.
    pub description: String,
    /// Custom state.
    pub state: BTreeMap<String, String>,
    /// Connect-time profile data.
    pub user_data: BTreeMap<String, String>,
    /// The user's version when these fields were current.
    pub version: u64,
}

/// One (user, device) session as the node holding it describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceRecord {
    /// The user.
    pub user_id: String,
    /// The device.
    pub device_id: String,
    /// The session's fencing epoch.
    pub epoch: u64,
    /// The user's version after the device's last change.
    pub rev: u64,
    /// Platform name.
    pub platform: String,
    /// The device's availability.
    pub availability: Availability,
    /// When the device connected, ms since the epoch.
    pub connected_since_ms: u64,
    /// The user's fields at the origin.
    pub user: UserFields,
    /// The session's channel memberships: listed in a state transfer (the receiver makes its
    /// replica match), `None` in a delta (memberships travel as their own changes).
    pub channels: Option<Vec<Membership>>,
    /// The holder lost the device's connection and keeps it for the grace period.
    pub lingering: bool,
    /// The device is invisible on its own (see `Registry::set_device_invisible`).
    pub invisible: bool,
}

/// One channel membership of a session: channel, member state, join time (ms).
pub type Membership = (String, BTreeMap<String, String>, u64);

/// A change to a session this node holds, for the other nodes.
#[derive(Debug, Clone, PartialEq)]
pub enum ReplicaChange {
    /// A directed presence for recipients with sessions on other nodes: the event frame,
    /// encoded once on the sender's node, for each node to hand to its recipients' devices.
    Directed {
        /// The sender.
        sender: String,
        /// The encoded, length-prefixed event frame.
        frame: bytes::Bytes,
        /// Recipients with a session elsewhere.
        recipients: Vec<String>,
    },
    /// The session joined a channel.
    ChannelJoin {
        /// The user.
        user_id: String,
        /// The device.
        device_id: String,
        /// The session's epoch.
        epoch: u64,
        /// The channel.
        channel: String,
        /// Initial member state.
        state: BTreeMap<String, String>,
        /// When it joined, ms.
        joined_at_ms: u64,
    },
    /// The session left a channel.
    ChannelLeave {
        /// The user.
        user_id: String,
        /// The device.
        device_id: String,
        /// The session's epoch.
        epoch: u64,
        /// The channel.
        channel: String,
    },
    /// The session's member state in a channel is now `state`.
    ChannelState {
        /// The user.
        user_id: String,
        /// The device.
        device_id: String,
        /// The session's epoch.
        epoch: u64,
        /// The channel.
        channel: String,
        /// The whole member state.
        state: BTreeMap<String, String>,
    },
    /// The session started, moved here, or changed.
    Upsert(DeviceRecord),
    /// The session ended (or, with `close`, this node closes a session another node holds:
    /// the device cap).
    Remove {
        /// The user.
        user_id: String,
        /// The device.
        device_id: String,
        /// The ended session's epoch (or a newer one, to end another node's session).
        epoch: u64,
        /// Why, as watchers see it.
        reason: OfflineReason,
        /// The user's version after the removal.
        version: u64,
        /// The last-seen time to record if this was the user's last device.
        last_seen_ms: u64,
        /// The close the holding node sends its connection, when another node ends it.
        close: Option<CloseKind>,
    },
}

/// Where the registry sends local changes in cluster mode. `emit` is called with the
/// registry lock held, in the order the changes happened, and must never block: the cluster
/// link queues the encoded delta (a full queue drops it and counts a gap, which the receivers
/// detect by sequence number and repair with a state transfer).
pub trait ReplicationSink: Send + Sync + std::fmt::Debug {
    /// One local change.
    fn emit(&self, change: ReplicaChange);
    /// The sequence number of the last change emitted (read under the registry lock, so it
    /// matches the digest read with it).
    fn last_seq(&self) -> u64;
}

/// A hybrid logical clock in microseconds: never behind the wall clock, strictly increasing
/// across `tick`s, and above every value `observe`d from other nodes.
#[derive(Debug, Default)]
pub(crate) struct Hlc(AtomicU64);

impl Hlc {
    /// A new value above every earlier one and at least the wall clock.
    pub(crate) fn tick(&self) -> u64 {
        let now = super::now_micros();
        let mut last = self.0.load(Ordering::Relaxed);
        loop {
            let next = last.saturating_add(1).max(now);
            match self
                .0
                .compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(seen) => last = seen,
            }
        }
    }

    /// Moves the clock past a value seen from another node.
    pub(crate) fn observe(&self, value: u64) {
        self.0.fetch_max(value, Ordering::Relaxed);
    }
}

/// How long a removed session's epoch is remembered, so that a late delta of that session
/// cannot bring it back. Deltas of one node arrive in order, and a dead or fenced node's
/// incarnation is ignored outright; this covers the race between two live nodes.
pub(crate) const TOMBSTONE_TTL: Duration = Duration::from_secs(120);
/// Most tombstones kept; beyond it the oldest go first (counted).
pub(crate) const MAX_TOMBSTONES: usize = 1 << 20;

/// Cluster bookkeeping kept under the registry lock.
#[derive(Debug, Default)]
pub(crate) struct ReplicaState {
    /// Why this node is fenced, while it is.
    pub(crate) fenced: Option<String>,
    /// Removed sessions' epochs by (user, device).
    tombstones: HashMap<(String, String), u64>,
    /// The same, in the order they were written, for expiry.
    tombstone_order: VecDeque<(Instant, String, String, u64)>,
    /// XOR of every local device's hash.
    local_digest: u64,
    /// XOR of every remote device's hash, per origin.
    digests: HashMap<Origin, u64>,
    /// Interned origins, so each remote device holds a pointer.
    origins: HashMap<Origin, Arc<Origin>>,
    /// Remote devices whose node died or shut down, with when they go offline.
    expiries: VecDeque<(Instant, String, String, u64, OfflineReason)>,
    /// How long a dead node's devices stay visible (the session grace period).
    grace: Duration,
    /// Cluster mode is on (a sink is set): a single node keeps no digests.
    enabled: bool,
}

/// How far ahead of this node's wall clock a remote epoch or version may be (clock skew
/// between nodes).
pub(crate) const MAX_CLOCK_SKEW: Duration = Duration::from_secs(60);

/// Whether the change's epochs and versions are within [`MAX_CLOCK_SKEW`] of this node's
/// clock.
fn clock_plausible(change: &ReplicaChange) -> bool {
    let limit = super::now_micros().saturating_add(MAX_CLOCK_SKEW.as_micros() as u64);
    let values: [u64; 2] = match change {
        ReplicaChange::Upsert(r) => [r.epoch.max(r.rev), r.user.version],
        ReplicaChange::Remove { epoch, version, .. } => [*epoch, *version],
        ReplicaChange::ChannelJoin { epoch, .. }
        | ReplicaChange::ChannelLeave { epoch, .. }
        | ReplicaChange::ChannelState { epoch, .. } => [*epoch, 0],
        ReplicaChange::Directed { .. } => [0, 0],
    };
    values.iter().all(|v| *v <= limit)
}

/// Whether a channel change `origin` made to (user, device) under `epoch` applies here (and
/// if so, notes it): the session's holder's change, or a change its previous holder made
/// just before a takeover that arrived after it (deltas from different nodes are not
/// ordered), unless a newer change to the session's channels was applied since.
fn accepts_channel_change(
    state: &mut State,
    origin: &Origin,
    user_id: &str,
    device_id: &str,
    epoch: u64,
) -> bool {
    let Some(device) = state
        .users
        .get_mut(user_id)
        .and_then(|e| e.devices.get_mut(device_id))
    else {
        return false;
    };
    let held = device.origin.as_deref() == Some(origin) && device.epoch == epoch;
    let late = epoch < device.epoch && epoch >= device.membership_epoch;
    if held || late {
        device.membership_epoch = device.membership_epoch.max(epoch);
    }
    held || late
}

fn device_hash(user: &str, device: &str, epoch: u64, rev: u64) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    user.hash(&mut h);
    device.hash(&mut h);
    epoch.hash(&mut h);
    rev.hash(&mut h);
    // 52 bits: exact as a Prometheus gauge (f64).
    h.finish() & ((1 << 52) - 1)
}

impl ReplicaState {
    pub(crate) fn toggle_digest(
        &mut self,
        origin: Option<&Origin>,
        user: &str,
        device: &str,
        epoch: u64,
        rev: u64,
    ) {
        if !self.enabled {
            return;
        }
        let h = device_hash(user, device, epoch, rev);
        match origin {
            None => self.local_digest ^= h,
            Some(o) => {
                let d = self.digests.entry(o.clone()).or_default();
                *d ^= h;
                if *d == 0 {
                    self.digests.remove(o);
                }
            }
        }
    }

    pub(crate) fn tombstone(&mut self, user: &str, device: &str, epoch: u64, now: Instant) {
        let key = (user.to_string(), device.to_string());
        let slot = self.tombstones.entry(key).or_default();
        *slot = (*slot).max(epoch);
        self.tombstone_order
            .push_back((now, user.to_string(), device.to_string(), epoch));
        while self.tombstone_order.len() > MAX_TOMBSTONES {
            self.pop_tombstone();
        }
    }

    fn pop_tombstone(&mut self) {
        if let Some((_, user, device, epoch)) = self.tombstone_order.pop_front() {
            let key = (user, device);
            if self.tombstones.get(&key) == Some(&epoch) {
                self.tombstones.remove(&key);
            }
        }
    }

    fn tombstoned(&self, user: &str, device: &str, epoch: u64) -> bool {
        // Borrowed lookup without allocating: (String, String) keys need owned values, so
        // tombstones are checked only on the remote path, where a delta already allocated.
        self.tombstones
            .get(&(user.to_string(), device.to_string()))
            .is_some_and(|&t| t >= epoch)
    }

    fn intern(&mut self, origin: &Origin) -> Arc<Origin> {
        self.origins
            .entry(origin.clone())
            .or_insert_with(|| Arc::new(origin.clone()))
            .clone()
    }

    /// How many tombstones are held (for tests and metrics).
    pub(crate) fn tombstone_count(&self) -> usize {
        self.tombstones.len()
    }
}

/// What a state transfer page holds.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalPage {
    /// Local sessions after the cursor, in (user, device) order.
    pub records: Vec<DeviceRecord>,
    /// More follow.
    pub more: bool,
    /// The sequence number of the last delta emitted when the page was read.
    pub seq: u64,
    /// The clock when the page was read.
    pub hlc: u64,
}

impl Registry {
    /// Connects the registry to the cluster link. Set once, before any session exists.
    pub fn set_replication(&self, sink: Arc<dyn ReplicationSink>, grace: Duration) {
        {
            let mut state = self.state();
            state.replica.grace = grace;
            state.replica.enabled = true;
        }
        if self.shared.sink.set(sink).is_err() {
            tracing::warn!("replication sink already set");
        }
    }

    fn record_of(&self, state: &State, user_id: &str, device_id: &str) -> Option<DeviceRecord> {
        let entry = state.users.get(user_id)?;
        let device = entry.devices.get(device_id)?;
        Some(DeviceRecord {
            user_id: user_id.to_string(),
            device_id: device_id.to_string(),
            epoch: device.epoch,
            rev: device.rev,
            platform: device.platform.clone(),
            availability: device.availability,
            connected_since_ms: device.connected_since_ms,
            user: UserFields {
                show: entry.presence.show,
                status: entry.presence.status.clone(),
                description: entry.presence.description.clone(),
                state: entry.presence.state.clone(),
                user_data: entry.presence.user_data.clone(),
                version: entry.presence.version,
            },
            channels: None,
            lingering: device.lingering.is_some(),
            invisible: device.invisible,
        })
    }

    /// Tells the cluster about a local session's current state (no-op on a single node).
    pub(super) fn emit_upsert(&self, state: &State, user_id: &str, device_id: &str) {
        if let Some(sink) = self.shared.sink.get() {
            if let Some(record) = self.record_of(state, user_id, device_id) {
                sink.emit(ReplicaChange::Upsert(record));
            }
        }
    }

    /// Merges a change from the node `origin` into the table and tells local watchers and
    /// the user's local devices what they see change. Stale changes (an epoch below the one
    /// known for the device, or at or below its tombstone) are ignored; returns whether it was
    /// applied.
    pub fn apply_remote(
        &self,
        origin: &Origin,
        change: ReplicaChange,
        received_at: Instant,
    ) -> bool {
        if !clock_plausible(&change) {
            // A clock value far ahead of this node's would drag every later version and epoch
            // up with it (and an overflow would wrap them): refuse it.
            metrics::counter!(crate::metrics::CLUSTER_DELTAS, "direction" => "invalid")
                .increment(1);
            return false;
        }
        let mut state = self.state();
        if state.replica.fenced.is_some() {
            return false;
        }
        match change {
            ReplicaChange::Upsert(record) => {
                self.apply_upsert(&mut state, origin, record, received_at)
            }
            ReplicaChange::Directed {
                sender,
                frame,
                recipients,
            } => !self
                .deliver_directed(&state, &sender, &frame, &recipients, received_at)
                .is_empty(),
            ReplicaChange::ChannelJoin {
                user_id,
                device_id,
                epoch,
                channel,
                state: member_state,
                joined_at_ms,
            } => {
                if !accepts_channel_change(&mut state, origin, &user_id, &device_id, epoch) {
                    return false;
                }
                let already = state
                    .users
                    .get(&user_id)
                    .and_then(|e| e.devices.get(&device_id))
                    .is_some_and(|d| d.joined.contains(&channel));
                if already {
                    self.remote_member_state(
                        &mut state,
                        &user_id,
                        &device_id,
                        &channel,
                        member_state,
                        received_at,
                    );
                } else {
                    self.add_member(
                        &mut state,
                        &user_id,
                        &device_id,
                        &channel,
                        member_state,
                        joined_at_ms,
                        None,
                        received_at,
                    );
                }
                true
            }
            ReplicaChange::ChannelLeave {
                user_id,
                device_id,
                epoch,
                channel,
            } => {
                if !accepts_channel_change(&mut state, origin, &user_id, &device_id, epoch) {
                    return false;
                }
                self.remote_leave(&mut state, &user_id, &device_id, &channel, received_at);
                true
            }
            ReplicaChange::ChannelState {
                user_id,
                device_id,
                epoch,
                channel,
                state: member_state,
            } => {
                if !accepts_channel_change(&mut state, origin, &user_id, &device_id, epoch) {
                    return false;
                }
                self.remote_member_state(
                    &mut state,
                    &user_id,
                    &device_id,
                    &channel,
                    member_state,
                    received_at,
                );
                true
            }
            ReplicaChange::Remove {
                user_id,
                device_id,
                epoch,
                reason,
                version,
                last_seen_ms,
                close,
            } => {
                self.shared.hlc.observe(epoch);
                self.shared.hlc.observe(version);
                let known = state
                    .users
                    .get(&user_id)
                    .and_then(|e| e.devices.get(&device_id))
                    .map(|d| (d.origin.clone(), d.epoch, d.outbound.clone()));
                let Some((holder, held_epoch, outbound)) = known else {
                    state
                        .replica
                        .tombstone(&user_id, &device_id, epoch, received_at);
                    return false;
                };
                let applies = match &holder {
                    // Another node ends a session this node holds: only with a newer epoch.
                    None => epoch > held_epoch,
                    Some(h) => **h == *origin && epoch >= held_epoch || epoch > held_epoch,
                };
                if !applies {
                    return false;
                }
                if reason == OfflineReason::ServerShutdown && holder.is_some() {
                    // The node is restarting: its clients reconnect elsewhere within the grace
                    // period, so its devices linger instead of flickering offline.
                    let deadline = received_at + state.replica.grace;
                    state.replica.expiries.push_back((
                        deadline,
                        user_id,
                        device_id,
                        held_epoch,
                        OfflineReason::ConnectionLost,
                    ));
                    return true;
                }
                if holder.is_none() {
                    if let Some(outbound) = outbound {
                        let kind = close.unwrap_or(CloseKind::TakenOver);
                        let text = if kind == CloseKind::Kicked {
                            "the application's backend ended this session"
                        } else {
                            "the session was closed by another node of the cluster"
                        };
                        let close = self.shared.encoder.close(kind, text, 0);
                        if outbound.close(Some(Item::reply(close, "close"))) {
                            metrics::counter!(crate::metrics::CLOSES, "code" => kind.metric_label())
                                .increment(1);
                        }
                    }
                }
                self.drop_device(
                    &mut state,
                    &user_id,
                    &device_id,
                    reason,
                    None,
                    received_at,
                    RemovedBy::Remote {
                        version,
                        last_seen_ms,
                    },
                    true,
                );
                state
                    .replica
                    .tombstone(&user_id, &device_id, epoch, received_at);
                true
            }
        }
    }

    fn apply_upsert(
        &self,
        state: &mut State,
        origin: &Origin,
        record: DeviceRecord,
        received_at: Instant,
    ) -> bool {
        self.shared.hlc.observe(record.epoch);
        self.shared.hlc.observe(record.user.version);
        let user_id = record.user_id.as_str();
        let device_id = record.device_id.as_str();
        let existing = state
            .users
            .get(user_id)
            .and_then(|e| e.devices.get(device_id))
            .map(|d| (d.origin.clone(), d.epoch, d.rev));
        match &existing {
            Some((_, epoch, _)) if *epoch > record.epoch => return false,
            Some((Some(o), epoch, rev))
                if **o == *origin && *epoch == record.epoch && *rev == record.rev =>
            {
                // Only the connection may have changed (lost: the grace period runs there).
                if let Some(d) = state
                    .users
                    .get_mut(user_id)
                    .and_then(|e| e.devices.get_mut(device_id))
                {
                    d.remote_grace = record.lingering;
                }
                // A repeat (state transfer of an applied delta): only the memberships may
                // differ (a lost channel delta).
                if let Some(channels) = &record.channels {
                    self.reconcile_memberships(state, user_id, device_id, channels, received_at);
                }
                return true;
            }
            None if state.replica.tombstoned(user_id, device_id, record.epoch) => return false,
            _ => {}
        }
        let flips = state
            .users
            .get(user_id)
            .and_then(|e| e.devices.get(device_id))
            .is_some_and(|d| d.invisible != record.invisible);
        let existing = if flips {
            // The device turned invisible (or visible) at its node: told here as there.
            self.flip_device(
                state,
                user_id,
                device_id,
                record.invisible,
                Some(record.user.version),
                received_at,
            );
            state
                .users
                .get(user_id)
                .and_then(|e| e.devices.get(device_id))
                .map(|d| (d.origin.clone(), d.epoch, d.rev))
        } else {
            existing
        };
        // What watchers were shown until now, should a new device arrive invisible.
        let baseline =
            (record.invisible && existing.is_none()).then(|| self.snapshot_locked(state, user_id));
        state.devices_hidden |= record.invisible;
        let origin = state.replica.intern(origin);
        if let Some((old_origin, old_epoch, old_rev)) = &existing {
            state.replica.toggle_digest(
                old_origin.as_deref(),
                user_id,
                device_id,
                *old_epoch,
                *old_rev,
            );
        }
        state
            .replica
            .toggle_digest(Some(&origin), user_id, device_id, record.epoch, record.rev);
        let mut entry = state.users.remove(user_id).unwrap_or_else(|| UserEntry {
            devices: DeviceMap::default(),
            presence: PresenceSnapshot::offline(user_id, 0),
            told: None,
        });
        if entry.told.is_none() {
            entry.told = baseline;
        }
        let first = entry.devices.is_empty();
        let fields_newer = record.user.version > entry.presence.version;
        let mut changed = false;
        if fields_newer {
            let p = &mut entry.presence;
            let u = &record.user;
            changed = p.show != u.show
                || p.status != u.status
                || p.description != u.description
                || p.state != u.state
                || p.user_data != u.user_data;
            p.show = u.show;
            p.status = u.status.clone();
            p.description = u.description.clone();
            p.state = u.state.clone();
            p.user_data = u.user_data.clone();
        }
        match entry.devices.get_mut(device_id) {
            Some(device) => {
                if device.origin.is_none() {
                    // This node held the session: another node took it over.
                    if let Some(old) = device.outbound.take() {
                        let close = self.shared.encoder.close(
                            CloseKind::TakenOver,
                            "another connection of this device took the session over",
                            0,
                        );
                        if old.close(Some(Item::reply(close, "close"))) {
                            metrics::counter!(
                                crate::metrics::CLOSES,
                                "code" => CloseKind::TakenOver.metric_label()
                            )
                            .increment(1);
                        }
                    }
                    device.lingering = None;
                    device.conn_id = 0;
                }
                changed |= device.availability != record.availability
                    || device.platform != record.platform;
                device.origin = Some(origin);
                device.remote_grace = record.lingering;
                device.epoch = record.epoch;
                device.rev = record.rev;
                device.platform = record.platform.clone();
                device.availability = record.availability;
                device.connected_since_ms = record.connected_since_ms;
            }
            None => {
                state.device_seq += 1;
                entry.devices.insert(
                    record.device_id.clone(),
                    DeviceEntry {
                        conn_id: 0,
                        platform: record.platform.clone(),
                        availability: record.availability,
                        connected_since_ms: record.connected_since_ms,
                        attached_seq: state.device_seq,
                        outbound: None,
                        lingering: None,
                        joined: Default::default(),
                        watching: Default::default(),
                        origin: Some(origin),
                        remote_grace: record.lingering,
                        epoch: record.epoch,
                        rev: record.rev,
                        invisible: record.invisible,
                        membership_epoch: record.epoch,
                    },
                );
                changed = true;
            }
        }
        let kind = if first {
            Some(EventKind::Online)
        } else if changed {
            Some(EventKind::Update)
        } else {
            None
        };
        if kind.is_some() || fields_newer {
            // The origin's version when it is ahead (the usual case: every node shows the same
            // version for the same change), else the next one here.
            let tick = if fields_newer {
                record.user.version
            } else {
                self.shared.hlc.tick()
            };
            entry.bump_version(tick);
        }
        let snapshot = entry.snapshot();
        state.users.insert(record.user_id.clone(), entry);
        if let Some(kind) = kind {
            let event = EventView {
                kind,
                presence: &snapshot,
                reason: None,
                device_id,
            };
            self.fanout(state, &event, None, received_at);
        }
        if let Some(channels) = &record.channels {
            self.reconcile_memberships(state, user_id, device_id, channels, received_at);
        }
        publish_online_gauge(state);
        true
    }

    /// Makes the replica's memberships of (user, device) match `channels` (a state
    /// transfer), with the events members and watchers would have seen.
    fn reconcile_memberships(
        &self,
        state: &mut State,
        user_id: &str,
        device_id: &str,
        channels: &[Membership],
        received_at: Instant,
    ) {
        let current: Vec<String> = state
            .users
            .get(user_id)
            .and_then(|e| e.devices.get(device_id))
            .map(|d| d.joined.iter().cloned().collect())
            .unwrap_or_default();
        for channel in &current {
            if !channels.iter().any(|(c, _, _)| c == channel) {
                self.remote_leave(state, user_id, device_id, channel, received_at);
            }
        }
        for (channel, member_state, joined_at_ms) in channels {
            if current.contains(channel) {
                self.remote_member_state(
                    state,
                    user_id,
                    device_id,
                    channel,
                    member_state.clone(),
                    received_at,
                );
            } else {
                self.add_member(
                    state,
                    user_id,
                    device_id,
                    channel,
                    member_state.clone(),
                    *joined_at_ms,
                    None,
                    received_at,
                );
            }
        }
    }

    /// The node behind `origin` is dead (silent too long) or was replaced by a new
    /// incarnation: its devices go offline with CONNECTION_LOST after the grace period,
    /// unless they reconnect to another node first. Returns how many devices were scheduled.
    pub fn origin_down(&self, origin: &Origin, now: Instant) -> usize {
        let mut state = self.state();
        let deadline = now + state.replica.grace;
        let mut doomed = Vec::new();
        for (user_id, entry) in &state.users {
            for (device_id, device) in entry.devices.iter() {
                if device.origin.as_deref() == Some(origin) {
                    doomed.push((user_id.clone(), device_id.clone(), device.epoch));
                }
            }
        }
        let n = doomed.len();
        for (user, device, epoch) in doomed {
            state.replica.expiries.push_back((
                deadline,
                user,
                device,
                epoch,
                OfflineReason::ConnectionLost,
            ));
        }
        n
    }

    /// Removes the remote devices whose grace period ran out (their node died or shut down)
    /// and that did not reconnect anywhere meanwhile. Returns how many went offline.
    pub fn expire_remote_due(&self, now: Instant) -> usize {
        let mut state = self.state();
        let mut expired = 0;
        while state.replica.expiries.front().is_some_and(|e| e.0 <= now) {
            let Some((_, user, device, epoch, reason)) = state.replica.expiries.pop_front() else {
                break;
            };
            let still = state
                .users
                .get(&user)
                .and_then(|e| e.devices.get(&device))
                .is_some_and(|d| d.origin.is_some() && d.epoch == epoch);
            if still {
                self.drop_device(
                    &mut state,
                    &user,
                    &device,
                    reason,
                    None,
                    now,
                    RemovedBy::Expired,
                    true,
                );
                state.replica.tombstone(&user, &device, epoch, now);
                expired += 1;
            }
        }
        while state
            .replica
            .tombstone_order
            .front()
            .is_some_and(|t| now.saturating_duration_since(t.0) > TOMBSTONE_TTL)
        {
            state.replica.pop_tombstone();
        }
        expired
    }

    /// After a full state transfer from `origin`: its devices that the transfer did not
    /// list and that are older than the transfer (`before_epoch`) ended while deltas were
    /// lost; they go offline now. Returns how many.
    pub fn reconcile_origin(
        &self,
        origin: &Origin,
        listed: &HashSet<(String, String)>,
        before_epoch: u64,
        now: Instant,
    ) -> usize {
        let mut state = self.state();
        let mut gone = Vec::new();
        for (user_id, entry) in &state.users {
            for (device_id, device) in entry.devices.iter() {
                if device.origin.as_deref() == Some(origin)
                    && device.epoch < before_epoch
                    && !listed.contains(&(user_id.clone(), device_id.clone()))
                {
                    gone.push((user_id.clone(), device_id.clone(), device.epoch));
                }
            }
        }
        for (user, device, epoch) in &gone {
            self.drop_device(
                &mut state,
                user,
                device,
                OfflineReason::ConnectionLost,
                None,
                now,
                RemovedBy::Silent,
                true,
            );
            state.replica.tombstone(user, device, *epoch, now);
        }
        gone.len()
    }

    /// Up to `limit` local sessions after `(user, device)`, for a state transfer.
    pub fn local_page(&self, after: Option<(&str, &str)>, limit: usize) -> LocalPage {
        let state = self.state();
        let mut keys: Vec<(&String, &String)> = state
            .users
            .iter()
            .flat_map(|(u, e)| {
                e.devices
                    .iter()
                    .filter(|(_, d)| d.origin.is_none())
                    .map(move |(d, _)| (u, d))
            })
            .filter(|(u, d)| after.is_none_or(|(au, ad)| (u.as_str(), d.as_str()) > (au, ad)))
            .collect();
        keys.sort_unstable();
        let more = keys.len() > limit;
        keys.truncate(limit);
        let records = keys
            .into_iter()
            .filter_map(|(u, d)| {
                let mut r = self.record_of(&state, u, d)?;
                r.channels = Some(self.memberships_of(&state, u, d));
                Some(r)
            })
            .collect();
        LocalPage {
            records,
            more,
            seq: self.shared.sink.get().map(|s| s.last_seq()).unwrap_or(0),
            hlc: self.shared.hlc.tick(),
        }
    }

    /// This node's digest of its own sessions and the sequence number it matches.
    pub fn local_checkpoint(&self) -> (u64, u64, usize) {
        let state = self.state();
        let seq = self.shared.sink.get().map(|s| s.last_seq()).unwrap_or(0);
        let local = state
            .users
            .values()
            .map(|e| e.devices.values().filter(|d| d.origin.is_none()).count())
            .sum();
        (state.replica.local_digest, seq, local)
    }

    /// This node's digest of the sessions it believes `origin` holds.
    pub fn digest_of(&self, origin: &Origin) -> u64 {
        self.state()
            .replica
            .digests
            .get(origin)
            .copied()
            .unwrap_or(0)
    }

    /// Every origin's digest as this node sees it, its own under the given id.
    pub fn digests(&self, own: &Origin) -> BTreeMap<String, u64> {
        let state = self.state();
        // Incarnations of one node fold together: while an old one's sessions linger here,
        // this node's view of that node differs from the node's own digest, as it should.
        let mut out: BTreeMap<String, u64> = BTreeMap::new();
        for (o, d) in &state.replica.digests {
            *out.entry(o.node.clone()).or_default() ^= *d;
        }
        out.insert(own.node.clone(), state.replica.local_digest);
        out
    }

    /// Fences this node: closes every local session with `close` (a reconnect hint for
    /// clients to move to a healthy node), forgets every session (local and remote) without
    /// telling anyone (this node cannot reach the cluster, and its local watchers are being
    /// closed), and refuses Connect until [`Registry::unfence`]. Returns the sessions closed.
    pub fn fence(&self, reason: &str, reconnect_after_ms: u64) -> usize {
        let mut state = self.state();
        state.replica.fenced = Some(reason.to_string());
        let now = Instant::now();
        let all: Vec<(String, String, bool)> = state
            .users
            .iter()
            .flat_map(|(u, e)| {
                e.devices
                    .iter()
                    .map(move |(d, dev)| (u.clone(), d.clone(), dev.origin.is_none()))
            })
            .collect();
        let mut closed = 0;
        for (user, device, _) in &all {
            if let Some(dropped) = self.drop_device(
                &mut state,
                user,
                device,
                OfflineReason::ServerShutdown,
                None,
                now,
                RemovedBy::Silent,
                false,
            ) {
                if let Some(outbound) = dropped.outbound {
                    let close = self.shared.encoder.close(
                        CloseKind::NodeUnavailable,
                        reason,
                        reconnect_after_ms,
                    );
                    if outbound.close(Some(Item::reply(close, "close"))) {
                        closed += 1;
                        metrics::counter!(
                            crate::metrics::CLOSES,
                            "code" => CloseKind::NodeUnavailable.metric_label()
                        )
                        .increment(1);
                    }
                }
            }
        }
        state.replica.expiries.clear();
        state.replica.digests.clear();
        state.replica.origins.clear();
        state.replica.local_digest = 0;
        publish_online_gauge(&mut state);
        closed
    }

    /// Ends fencing: the node has rejoined under a new incarnation with an empty table.
    pub fn unfence(&self) {
        self.state().replica.fenced = None;
    }

    /// A fresh value of the hybrid logical clock (incarnations are drawn from it).
    pub fn clock(&self) -> u64 {
        self.shared.hlc.tick()
    }

    /// Sessions held by other nodes, replicated here.
    pub fn remote_sessions(&self) -> usize {
        self.state()
            .users
            .values()
            .map(|e| e.devices.values().filter(|d| d.origin.is_some()).count())
            .sum()
    }

    /// Whether the node is fenced.
    pub fn is_fenced(&self) -> bool {
        self.state().replica.fenced.is_some()
    }

    /// Tombstones held (for tests).
    #[doc(hidden)]
    pub fn tombstone_count(&self) -> usize {
        self.state().replica.tombstone_count()
    }
}
