//! Channel presence under the registry's lock: members are (user, device) pairs whose
//! membership belongs to the device session (so it survives a takeover and the grace period),
//! watchers receive events without joining, and each member carries its own state. Events go
//! to members and watchers, encoded once; above the announce threshold a channel batches them
//! into one INTERVAL event per tick so a large room costs linear, not quadratic, traffic. A
//! channel with no members holds no memory beyond its watcher list.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ops::Bound;
use std::time::Instant;

use super::{DeviceEntry, FanoutTally, Registry, RegistryError, ReplicaChange, State};
use crate::events::Transition;
use crate::model::{
    merge_state, ChannelEventKind, ChannelEventView, ChannelMember, IntervalBatch, OfflineReason,
};
use crate::outbound::Item;
use crate::privacy::book::PrivacyBook;
use crate::privacy::policy::Decision;
use crate::privacy::Viewer;

/// A channel with at least one member.
#[derive(Debug, Default)]
pub(super) struct Channel {
    /// Members by (user, device), ordered for stable paging.
    members: BTreeMap<(String, String), Member>,
    /// User → how many of their devices are members; its length is the occupancy.
    users: HashMap<String, u32>,
    /// Changes waiting for the next INTERVAL event (interval mode).
    pending: Option<IntervalBatch>,
}

#[derive(Debug)]
pub(super) struct Member {
    state: BTreeMap<String, String>,
    pub(super) joined_at_ms: u64,
}

impl Channel {
    fn occupancy(&self) -> u32 {
        self.users.len() as u32
    }

    /// The members hidden from `viewer`: users privacy hides, and invisible devices of
    /// others. Costs one lookup per member user when anyone has privacy settings, one per
    /// member once any device has been invisible, none otherwise.
    fn hidden_from<'a>(&'a self, state: &State, viewer: Viewer<'_>) -> Hidden<'a> {
        let mut hidden = Hidden::default();
        let book = &state.privacy;
        if book.is_empty() && !state.devices_hidden {
            return hidden;
        }
        for (user, n) in &self.users {
            if hides(book, viewer, user) {
                hidden.users.insert(user.as_str());
                hidden.devices += n;
            }
        }
        if state.devices_hidden {
            let mut shown_users: HashSet<&str> = HashSet::new();
            for (user, device) in self.members.keys() {
                if hidden.users.contains(user.as_str()) {
                    continue;
                }
                if invisible_to(state, viewer, user, device) {
                    hidden.members.insert((user.as_str(), device.as_str()));
                    hidden.devices += 1;
                } else {
                    shown_users.insert(user.as_str());
                }
            }
            for (user, device) in &hidden.members {
                let _ = device;
                if !shown_users.contains(user) {
                    hidden.users.insert(user);
                }
            }
        }
        hidden
    }

    /// Distinct users `viewer` is shown in the channel.
    fn occupancy_for(&self, state: &State, viewer: Viewer<'_>) -> u32 {
        self.occupancy() - self.hidden_from(state, viewer).users.len() as u32
    }

    /// The member (user, device), to change in place.
    pub(super) fn member_mut(&mut self, key: &(String, String)) -> Option<&mut Member> {
        self.members.get_mut(key)
    }

    fn view(&self, key: &(String, String), with_state: bool) -> ChannelMember {
        let member = self.members.get(key);
        ChannelMember {
            user_id: key.0.clone(),
            device_id: key.1.clone(),
            state: match (with_state, member) {
                (true, Some(m)) => m.state.clone(),
                _ => BTreeMap::new(),
            },
            joined_at_ms: member.map_or(0, |m| m.joined_at_ms),
        }
    }
}

/// Members of a channel hidden from one viewer.
#[derive(Debug, Default)]
struct Hidden<'a> {
    /// Users the viewer is shown no member device of.
    users: HashSet<&'a str>,
    /// Invisible member devices of users the viewer is otherwise shown.
    members: HashSet<(&'a str, &'a str)>,
    /// Member devices hidden in all.
    devices: u32,
}

impl Hidden<'_> {
    fn hides(&self, user: &str, device: &str) -> bool {
        self.users.contains(user) || self.members.contains(&(user, device))
    }
}

/// Result of join, leave, watch and unwatch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelOutcome {
    /// Distinct users in the channel now.
    pub occupancy: u32,
    /// False when nothing changed.
    pub changed: bool,
    /// The member's state (join).
    pub state: BTreeMap<String, String>,
}

/// One page of who-now.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WhoNowPage {
    /// Distinct users.
    pub occupancy: u32,
    /// Members (user, device).
    pub member_count: u32,
    /// This page.
    pub members: Vec<ChannelMember>,
    /// Where the next page starts, when there is one.
    pub next_after: Option<(String, String)>,
}

fn device_mut<'a>(
    state: &'a mut State,
    user_id: &str,
    device_id: &str,
    conn_id: u64,
) -> Result<&'a mut DeviceEntry, RegistryError> {
    let device = state
        .users
        .get_mut(user_id)
        .and_then(|e| e.devices.get_mut(device_id))
        .filter(|d| d.conn_id == conn_id)
        .ok_or(RegistryError::NotAttached)?;
    // A change here, by the holder: older ones arriving late no longer apply.
    device.membership_epoch = device.epoch;
    Ok(device)
}

/// True when privacy hides `user` from `viewer`: the viewer is shown a user who is offline,
/// so not in any channel.
pub(super) fn hides(book: &PrivacyBook, viewer: Viewer<'_>, user: &str) -> bool {
    book.restricted(user) && matches!(book.decide(viewer, user), Decision::Masked { .. })
}

/// True when (user, device) is an invisible device and `viewer` is neither the user nor the
/// backend.
pub(super) fn invisible_to(state: &State, viewer: Viewer<'_>, user: &str, device: &str) -> bool {
    let own = match viewer {
        Viewer::User(v) => v == user,
        Viewer::Backend => true,
        Viewer::Public => false,
    };
    !own && state
        .users
        .get(user)
        .and_then(|e| e.devices.get(device))
        .is_some_and(|d| d.invisible)
}

/// True when `viewer` is not shown (user, device) in channels: privacy hides the user, or the
/// device is invisible.
pub(super) fn hides_member(state: &State, viewer: Viewer<'_>, user: &str, device: &str) -> bool {
    hides(&state.privacy, viewer, user) || invisible_to(state, viewer, user, device)
}

/// Distinct users `viewer` is shown in `channel` (0 for an unknown channel).
pub(super) fn occupancy_for(state: &State, channel: &str, viewer: Viewer<'_>) -> u32 {
    state
        .channels
        .get(channel)
        .map_or(0, |c| c.occupancy_for(state, viewer))
}

/// How a member left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Departure {
    Leave,
    Timeout,
    /// Server shutdown: no events.
    Silent,
}

impl Registry {
    /// Joins (user, device) on `conn_id` to `channel` with `initial` member state.
    pub fn join_channel(
        &self,
        user_id: &str,
        device_id: &str,
        conn_id: u64,
        channel: &str,
        initial: BTreeMap<String, String>,
        received_at: Instant,
    ) -> Result<ChannelOutcome, RegistryError> {
        let mut guard = self.state();
        let state = &mut *guard;
        let max = self.shared.options.max_joined_channels;
        let device = device_mut(state, user_id, device_id, conn_id)?;
        let key = (user_id.to_string(), device_id.to_string());
        if device.joined.contains(channel) {
            let ch = state.channels.get(channel);
            return Ok(ChannelOutcome {
                occupancy: occupancy_for(state, channel, Viewer::User(user_id)),
                changed: false,
                state: ch.map(|c| c.view(&key, true).state).unwrap_or_default(),
            });
        }
        if device.joined.len() >= max {
            return Err(RegistryError::Limit(format!(
                "this session has joined {max} channels, the limit"
            )));
        }
        if initial.len() > self.shared.options.max_state_pairs {
            return Err(RegistryError::Limit(format!(
                "state has {} pairs; the limit is {}",
                initial.len(),
                self.shared.options.max_state_pairs
            )));
        }
        let epoch = device.epoch;
        let joined_at_ms = crate::now_ms();
        self.add_member(
            state,
            user_id,
            device_id,
            channel,
            initial.clone(),
            joined_at_ms,
            Some(conn_id),
            received_at,
        );
        let occupancy = occupancy_for(state, channel, Viewer::User(user_id));
        if let Some(sink) = self.shared.sink.get() {
            sink.emit(ReplicaChange::ChannelJoin {
                user_id: user_id.to_string(),
                device_id: device_id.to_string(),
                epoch,
                channel: channel.to_string(),
                state: initial.clone(),
                joined_at_ms,
            });
        }
        Ok(ChannelOutcome {
            occupancy,
            changed: true,
            state: initial,
        })
    }

    /// Adds (user, device), whose entry exists, to `channel` and tells members and watchers
    /// (JOIN, and ONLINE for the user's first device). Returns the occupancy.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn add_member(
        &self,
        state: &mut State,
        user_id: &str,
        device_id: &str,
        channel: &str,
        initial: BTreeMap<String, String>,
        joined_at_ms: u64,
        exclude_conn: Option<u64>,
        received_at: Instant,
    ) -> u32 {
        if let Some(device) = state
            .users
            .get_mut(user_id)
            .and_then(|e| e.devices.get_mut(device_id))
        {
            device.joined.insert(channel.to_string());
        }
        let key = (user_id.to_string(), device_id.to_string());
        let ch = state.channels.entry(channel.to_string()).or_default();
        ch.members.insert(
            key.clone(),
            Member {
                state: initial,
                joined_at_ms,
            },
        );
        let devices_in = ch.users.entry(user_id.to_string()).or_insert(0);
        *devices_in += 1;
        let first_device = *devices_in == 1;
        let member = ch.view(&key, true);
        let occupancy = ch.occupancy();
        let now_occupied = ch.members.len() == 1;
        if is_local(state, user_id, device_id) {
            if now_occupied {
                self.observe(state, || Transition::ChannelOccupied {
                    channel: channel.to_string(),
                    user: user_id.to_string(),
                });
            }
            self.observe(state, || Transition::MemberJoined {
                channel: channel.to_string(),
                user: user_id.to_string(),
                device: device_id.to_string(),
                occupancy,
            });
        }
        let user_event = first_device.then_some(ChannelEventKind::Online);
        self.emit_member_then_user(
            state,
            channel,
            (ChannelEventKind::Join, user_event),
            member,
            exclude_conn,
            received_at,
        );
        occupancy
    }

    /// Removes (user, device) from `channel` after another node said it left (LEAVE).
    pub(super) fn remote_leave(
        &self,
        state: &mut State,
        user_id: &str,
        device_id: &str,
        channel: &str,
        received_at: Instant,
    ) {
        let left = state
            .users
            .get_mut(user_id)
            .and_then(|e| e.devices.get_mut(device_id))
            .is_some_and(|d| d.joined.remove(channel));
        if left {
            self.remove_member(
                state,
                channel,
                user_id,
                device_id,
                Departure::Leave,
                None,
                received_at,
            );
        }
    }

    /// Replaces the member state of (user, device) in `channel` as another node set it, and
    /// tells members and watchers (STATE_CHANGED) when it changed.
    pub(super) fn remote_member_state(
        &self,
        state: &mut State,
        user_id: &str,
        device_id: &str,
        channel: &str,
        next: BTreeMap<String, String>,
        received_at: Instant,
    ) {
        let key = (user_id.to_string(), device_id.to_string());
        let Some(ch) = state.channels.get_mut(channel) else {
            return;
        };
        let Some(member) = ch.members.get_mut(&key) else {
            return;
        };
        if member.state == next {
            return;
        }
        member.state = next;
        let view = ch.view(&key, true);
        self.channel_emit(
            state,
            channel,
            ChannelEventKind::StateChanged,
            view,
            None,
            received_at,
        );
    }

    /// The channels (user, device) has joined, with its member state and join time.
    pub(super) fn memberships_of(
        &self,
        state: &State,
        user_id: &str,
        device_id: &str,
    ) -> Vec<(String, BTreeMap<String, String>, u64)> {
        let Some(device) = state
            .users
            .get(user_id)
            .and_then(|e| e.devices.get(device_id))
        else {
            return Vec::new();
        };
        let key = (user_id.to_string(), device_id.to_string());
        device
            .joined
            .iter()
            .filter_map(|c| {
                let m = state.channels.get(c)?.members.get(&key)?;
                Some((c.clone(), m.state.clone(), m.joined_at_ms))
            })
            .collect()
    }

    /// Removes (user, device) on `conn_id` from `channel`.
    pub fn leave_channel(
        &self,
        user_id: &str,
        device_id: &str,
        conn_id: u64,
        channel: &str,
        received_at: Instant,
    ) -> Result<ChannelOutcome, RegistryError> {
        let mut guard = self.state();
        let state = &mut *guard;
        let device = device_mut(state, user_id, device_id, conn_id)?;
        let epoch = device.epoch;
        let changed = device.joined.remove(channel);
        if changed {
            self.remove_member(
                state,
                channel,
                user_id,
                device_id,
                Departure::Leave,
                Some(conn_id),
                received_at,
            );
            if let Some(sink) = self.shared.sink.get() {
                sink.emit(ReplicaChange::ChannelLeave {
                    user_id: user_id.to_string(),
                    device_id: device_id.to_string(),
                    epoch,
                    channel: channel.to_string(),
                });
            }
        }
        Ok(ChannelOutcome {
            occupancy: occupancy_for(state, channel, Viewer::User(user_id)),
            changed,
            state: BTreeMap::new(),
        })
    }

    /// Lets (user, device) on `conn_id` receive `channel`'s events without joining.
    pub fn watch_channel(
        &self,
        user_id: &str,
        device_id: &str,
        conn_id: u64,
        channel: &str,
    ) -> Result<ChannelOutcome, RegistryError> {
        let mut guard = self.state();
        let state = &mut *guard;
        let max = self.shared.options.max_watched_channels;
        let device = device_mut(state, user_id, device_id, conn_id)?;
        let changed = if device.watching.contains(channel) {
            false
        } else if device.watching.len() >= max {
            return Err(RegistryError::Limit(format!(
                "this session watches {max} channels, the limit"
            )));
        } else {
            device.watching.insert(channel.to_string());
            state
                .channel_watchers
                .entry(channel.to_string())
                .or_default()
                .insert((user_id.to_string(), device_id.to_string()));
            true
        };
        Ok(ChannelOutcome {
            occupancy: occupancy_for(state, channel, Viewer::User(user_id)),
            changed,
            state: BTreeMap::new(),
        })
    }

    /// Stops watching.
    pub fn unwatch_channel(
        &self,
        user_id: &str,
        device_id: &str,
        conn_id: u64,
        channel: &str,
    ) -> Result<ChannelOutcome, RegistryError> {
        let mut guard = self.state();
        let state = &mut *guard;
        let device = device_mut(state, user_id, device_id, conn_id)?;
        let changed = device.watching.remove(channel);
        if changed {
            remove_watcher(state, channel, user_id, device_id);
        }
        Ok(ChannelOutcome {
            occupancy: occupancy_for(state, channel, Viewer::User(user_id)),
            changed,
            state: BTreeMap::new(),
        })
    }

    /// Up to `limit` members of `channel` after `after`, ordered by (user, device), as the
    /// app's backend sees them (everyone). An unknown channel is an empty page.
    pub fn who_now(
        &self,
        channel: &str,
        after: Option<(String, String)>,
        limit: usize,
        with_state: bool,
    ) -> WhoNowPage {
        self.who_now_for(Viewer::Backend, channel, after, limit, with_state)
    }

    /// Who-now as `viewer` is shown it: members privacy hides from the viewer are left out
    /// of the page and of both counts, exactly as if they were not in the channel.
    pub fn who_now_for(
        &self,
        viewer: Viewer<'_>,
        channel: &str,
        after: Option<(String, String)>,
        limit: usize,
        with_state: bool,
    ) -> WhoNowPage {
        let state = self.state();
        let Some(ch) = state.channels.get(channel) else {
            return WhoNowPage::default();
        };
        let hidden = ch.hidden_from(&state, viewer);
        let lower = match after {
            Some(key) => Bound::Excluded(key),
            None => Bound::Unbounded,
        };
        let mut range = ch
            .members
            .range((lower, Bound::Unbounded))
            .filter(|((user, device), _)| !hidden.hides(user, device));
        let members: Vec<ChannelMember> = range
            .by_ref()
            .take(limit)
            .map(|(key, _)| ch.view(key, with_state))
            .collect();
        let next_after = match (range.next(), members.last()) {
            (Some(_), Some(last)) => Some((last.user_id.clone(), last.device_id.clone())),
            _ => None,
        };
        WhoNowPage {
            occupancy: ch.occupancy() - hidden.users.len() as u32,
            member_count: ch.members.len() as u32 - hidden.devices,
            members,
            next_after,
        }
    }

    /// Up to `limit` channels with at least one member and their occupancy as `viewer` is
    /// shown it (channels whose members are all hidden from the viewer are left out), sorted.
    pub fn occupancies_for(&self, viewer: Viewer<'_>, limit: usize) -> Vec<(String, u32)> {
        let state = self.state();
        let mut all: Vec<(String, u32)> = state
            .channels
            .iter()
            .map(|(name, ch)| (name.clone(), ch.occupancy_for(&state, viewer)))
            .filter(|(_, n)| *n > 0)
            .collect();
        all.sort_unstable();
        all.truncate(limit);
        all
    }

    /// How many of `channel`'s members are hidden from `viewer` (0 for an unknown channel).
    pub fn hidden_members(&self, viewer: Viewer<'_>, channel: &str) -> u32 {
        let state = self.state();
        state
            .channels
            .get(channel)
            .map_or(0, |ch| ch.occupancy() - ch.occupancy_for(&state, viewer))
    }

    /// The channels any device of `user_id` has joined, sorted, as the backend sees them.
    pub fn where_now(&self, user_id: &str) -> Vec<String> {
        self.where_now_for(Viewer::Backend, user_id)
    }

    /// Where-now as `viewer` is shown it: no channel at all for a user privacy hides.
    pub fn where_now_for(&self, viewer: Viewer<'_>, user_id: &str) -> Vec<String> {
        let state = self.state();
        if hides(&state.privacy, viewer, user_id) {
            return Vec::new();
        }
        let Some(entry) = state.users.get(user_id) else {
            return Vec::new();
        };
        let all: BTreeSet<&String> = entry
            .devices
            .iter()
            .filter(|(device, _)| !invisible_to(&state, viewer, user_id, device))
            .flat_map(|(_, d)| d.joined.iter())
            .collect();
        all.into_iter().cloned().collect()
    }

    /// Merges `changes` into the member state of (user, device) in `channel` (`replace` clears
    /// it first; an empty value removes a key) and tells members and watchers if it changed.
    #[allow(clippy::too_many_arguments)]
    pub fn set_channel_state(
        &self,
        user_id: &str,
        device_id: &str,
        conn_id: u64,
        channel: &str,
        changes: &BTreeMap<String, String>,
        replace: bool,
        received_at: Instant,
    ) -> Result<ChannelMember, RegistryError> {
        let max = self.shared.options.max_state_pairs;
        self.update_member_state(
            user_id,
            device_id,
            conn_id,
            channel,
            received_at,
            |current| merge_state(current, changes, replace, max),
        )
    }

    /// Removes `keys` (all keys when empty) from the member state.
    pub fn remove_channel_state(
        &self,
        user_id: &str,
        device_id: &str,
        conn_id: u64,
        channel: &str,
        keys: &[String],
        received_at: Instant,
    ) -> Result<ChannelMember, RegistryError> {
        self.update_member_state(
            user_id,
            device_id,
            conn_id,
            channel,
            received_at,
            |current| {
                if keys.is_empty() {
                    return Ok(BTreeMap::new());
                }
                let mut next = current.clone();
                for key in keys {
                    next.remove(key);
                }
                Ok(next)
            },
        )
    }

    fn update_member_state(
        &self,
        user_id: &str,
        device_id: &str,
        conn_id: u64,
        channel: &str,
        received_at: Instant,
        update: impl FnOnce(&BTreeMap<String, String>) -> Result<BTreeMap<String, String>, String>,
    ) -> Result<ChannelMember, RegistryError> {
        let mut guard = self.state();
        let state = &mut *guard;
        let device = device_mut(state, user_id, device_id, conn_id)?;
        if !device.joined.contains(channel) {
            return Err(RegistryError::NotMember(channel.to_string()));
        }
        let epoch = device.epoch;
        let key = (user_id.to_string(), device_id.to_string());
        let ch = state
            .channels
            .get_mut(channel)
            .ok_or_else(|| RegistryError::NotMember(channel.to_string()))?;
        let member = ch
            .members
            .get_mut(&key)
            .ok_or_else(|| RegistryError::NotMember(channel.to_string()))?;
        let next = update(&member.state).map_err(RegistryError::Limit)?;
        let changed = next != member.state;
        member.state = next;
        let view = ch.view(&key, true);
        if changed {
            self.channel_emit(
                state,
                channel,
                ChannelEventKind::StateChanged,
                view.clone(),
                Some(conn_id),
                received_at,
            );
            if let Some(sink) = self.shared.sink.get() {
                sink.emit(ReplicaChange::ChannelState {
                    user_id: user_id.to_string(),
                    device_id: device_id.to_string(),
                    epoch,
                    channel: channel.to_string(),
                    state: view.state.clone(),
                });
            }
        }
        Ok(view)
    }

    /// The member state of every device of `user_id` in `channel`, as `viewer` is shown it
    /// (nothing for a user privacy hides, as for a user who is not a member).
    pub fn get_channel_state_for(
        &self,
        viewer: Viewer<'_>,
        channel: &str,
        user_id: &str,
    ) -> Vec<ChannelMember> {
        let state = self.state();
        let Some(ch) = state.channels.get(channel) else {
            return Vec::new();
        };
        if hides(&state.privacy, viewer, user_id) {
            return Vec::new();
        }
        ch.members
            .range((user_id.to_string(), String::new())..)
            .take_while(|((u, _), _)| u == user_id)
            .filter(|((u, d), _)| !invisible_to(&state, viewer, u, d))
            .map(|(key, _)| ch.view(key, true))
            .collect()
    }

    /// Sends one INTERVAL event for every channel with batched changes. Called by the server's
    /// interval ticker.
    pub fn flush_channel_intervals(&self, received_at: Instant) {
        let mut guard = self.state();
        let state = &mut *guard;
        let due: Vec<String> = state
            .channels
            .iter()
            .filter(|(_, c)| c.pending.is_some())
            .map(|(name, _)| name.clone())
            .collect();
        for channel in due {
            let batch = state
                .channels
                .get_mut(&channel)
                .and_then(|c| c.pending.take())
                .unwrap_or_default();
            self.deliver_interval(state, &channel, &batch, received_at);
        }
    }

    /// Removes every membership and watch of a departing device (called under the lock before
    /// the device entry goes away).
    pub(super) fn leave_all_channels(
        &self,
        state: &mut State,
        user_id: &str,
        device_id: &str,
        reason: OfflineReason,
        received_at: Instant,
    ) {
        let Some(device) = state
            .users
            .get_mut(user_id)
            .and_then(|e| e.devices.get_mut(device_id))
        else {
            return;
        };
        let joined = std::mem::take(&mut device.joined);
        let watching = std::mem::take(&mut device.watching);
        let departure = match reason {
            OfflineReason::Disconnect => Departure::Leave,
            OfflineReason::ServerShutdown => Departure::Silent,
            _ => Departure::Timeout,
        };
        for channel in &joined {
            self.remove_member(
                state,
                channel,
                user_id,
                device_id,
                departure,
                None,
                received_at,
            );
        }
        for channel in &watching {
            remove_watcher(state, channel, user_id, device_id);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn remove_member(
        &self,
        state: &mut State,
        channel: &str,
        user_id: &str,
        device_id: &str,
        departure: Departure,
        exclude_conn: Option<u64>,
        received_at: Instant,
    ) {
        let key = (user_id.to_string(), device_id.to_string());
        let (member, last_device, now_empty) = {
            let Some(ch) = state.channels.get_mut(channel) else {
                return;
            };
            let view = ch.view(&key, true);
            if ch.members.remove(&key).is_none() {
                return;
            }
            let last_device = match ch.users.get_mut(user_id) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    false
                }
                _ => {
                    ch.users.remove(user_id);
                    true
                }
            };
            (view, last_device, ch.members.is_empty())
        };
        // Reported by the node holding the session, or (a dead node's) by every survivor
        // under one key per channel.
        let expired_key = state
            .reporting_expired
            .as_ref()
            .map(|k| format!("{k}-{}", super::expiry_key(channel, "", 0)));
        if departure != Departure::Silent
            && (expired_key.is_some() || is_local(state, user_id, device_id))
        {
            let occupancy = state.channels.get(channel).map_or(0, |c| c.occupancy());
            self.observe_keyed(state, expired_key.as_deref(), || Transition::MemberLeft {
                channel: channel.to_string(),
                user: user_id.to_string(),
                device: device_id.to_string(),
                occupancy,
                timeout: departure == Departure::Timeout,
            });
            if now_empty {
                self.observe_keyed(state, expired_key.as_deref(), || {
                    Transition::ChannelVacated {
                        channel: channel.to_string(),
                        user: user_id.to_string(),
                    }
                });
            }
        }
        let kind = match departure {
            Departure::Leave => Some(ChannelEventKind::Leave),
            Departure::Timeout => Some(ChannelEventKind::Timeout),
            Departure::Silent => None,
        };
        if let Some(kind) = kind {
            let user_event = last_device.then_some(ChannelEventKind::Offline);
            self.emit_member_then_user(
                state,
                channel,
                (kind, user_event),
                member,
                exclude_conn,
                received_at,
            );
        }
        if now_empty {
            // No members left: watchers get what was batched, then the channel's memory goes.
            if let Some(batch) = state.channels.remove(channel).and_then(|c| c.pending) {
                if kind.is_some() {
                    self.deliver_interval(state, channel, &batch, received_at);
                }
            }
        }
    }

    /// Emits a member event and then, when the user's first device arrived or last one left,
    /// the user-level event (without member state).
    fn emit_member_then_user(
        &self,
        state: &mut State,
        channel: &str,
        (member_event, user_event): (ChannelEventKind, Option<ChannelEventKind>),
        member: ChannelMember,
        exclude_conn: Option<u64>,
        received_at: Instant,
    ) {
        self.channel_emit(
            state,
            channel,
            member_event,
            member.clone(),
            exclude_conn,
            received_at,
        );
        // A visible device that is the user's first (last) shown one but not their first
        // (last) at all, beside an invisible one: everyone else sees the user arrive (leave).
        let others_only = user_event.is_none()
            && matches!(
                member_event,
                ChannelEventKind::Join | ChannelEventKind::Leave | ChannelEventKind::Timeout
            )
            && state.devices_hidden
            && !invisible_to(state, Viewer::Public, &member.user_id, &member.device_id)
            && !shown_elsewhere(state, channel, &member.user_id, &member.device_id);
        let (user_event, others_of) = match (user_event, others_only) {
            (Some(kind), _) => (kind, None),
            (None, true) if member_event == ChannelEventKind::Join => {
                (ChannelEventKind::Online, Some(member.user_id.clone()))
            }
            (None, true) => (ChannelEventKind::Offline, Some(member.user_id.clone())),
            (None, false) => return,
        };
        let user_level = ChannelMember {
            state: BTreeMap::new(),
            ..member
        };
        self.channel_emit_to(
            state,
            channel,
            user_event,
            user_level,
            exclude_conn,
            others_of.as_deref(),
            received_at,
        );
    }

    /// Delivers one member event, or batches it in interval mode.
    fn channel_emit(
        &self,
        state: &mut State,
        channel: &str,
        kind: ChannelEventKind,
        member: ChannelMember,
        exclude_conn: Option<u64>,
        received_at: Instant,
    ) {
        self.channel_emit_to(
            state,
            channel,
            kind,
            member,
            exclude_conn,
            None,
            received_at,
        );
    }

    /// [`Self::channel_emit`], to everyone but `others_of`'s devices when set.
    #[allow(clippy::too_many_arguments)]
    fn channel_emit_to(
        &self,
        state: &mut State,
        channel: &str,
        kind: ChannelEventKind,
        member: ChannelMember,
        exclude_conn: Option<u64>,
        others_of: Option<&str>,
        received_at: Instant,
    ) {
        let threshold = self.shared.options.announce_threshold;
        // An invisible device's events are never batched: only its user's devices may see
        // them, and a batch is flushed later, when the device may be gone and no longer
        // known to be invisible. Delivered now, everyone else's view leaves them out.
        let unbatched = state.devices_hidden
            && invisible_to(state, Viewer::Public, &member.user_id, &member.device_id);
        // The switch to interval mode counts the members a stranger is shown, so hidden
        // ones do not move it (blocks, between two users, still may).
        let shown_members = state.channels.get(channel).map_or(0, |ch| {
            ch.members.len() - ch.hidden_from(state, Viewer::Public).devices as usize
        });
        let occupancy = match state.channels.get_mut(channel) {
            Some(ch) => {
                if !unbatched && (shown_members > threshold || ch.pending.is_some()) {
                    // Coalesced per member and capped (see IntervalBatch).
                    ch.pending
                        .get_or_insert_with(IntervalBatch::default)
                        .record(kind, member);
                    return;
                }
                ch.occupancy()
            }
            None => 0,
        };
        let key = match kind {
            ChannelEventKind::Online | ChannelEventKind::Offline => {
                format!("\u{2}{channel}\u{0}{}", member.user_id)
            }
            _ => format!(
                "\u{2}{channel}\u{0}{}\u{0}{}",
                member.user_id, member.device_id
            ),
        };
        let view = ChannelEventView {
            channel,
            kind,
            member: Some(&member),
            occupancy,
            interval: None,
        };
        self.channel_deliver(
            state,
            channel,
            &view,
            &key,
            exclude_conn,
            others_of,
            received_at,
        );
    }

    fn deliver_interval(
        &self,
        state: &mut State,
        channel: &str,
        batch: &IntervalBatch,
        received_at: Instant,
    ) {
        if batch.is_empty() {
            return;
        }
        state.interval_seq += 1;
        // Interval events are deltas: each gets its own parking key so none replaces another.
        let key = format!("\u{3}{channel}\u{0}{}", state.interval_seq);
        let view = ChannelEventView {
            channel,
            kind: ChannelEventKind::Interval,
            member: None,
            occupancy: state.channels.get(channel).map_or(0, Channel::occupancy),
            interval: Some(batch),
        };
        self.channel_deliver(state, channel, &view, &key, None, None, received_at);
    }

    /// Encodes once and offers the event to every member and watcher of `channel`. When
    /// privacy may hide a member from someone, each recipient gets the event as they are shown
    /// it (hidden members left out of the counts and the INTERVAL lists, an event about a
    /// hidden member not at all), encoded once per distinct set of hidden members.
    #[allow(clippy::too_many_arguments)]
    fn channel_deliver(
        &self,
        state: &State,
        channel: &str,
        view: &ChannelEventView<'_>,
        key: &str,
        exclude_conn: Option<u64>,
        others_of: Option<&str>,
        received_at: Instant,
    ) {
        let book = &state.privacy;
        let members = state.channels.get(channel);
        // The restricted users this event is about or counts: its member, the channel's
        // members, the INTERVAL lists. Usually none, and then one encoding serves everyone.
        let mut subjects: BTreeSet<&str> = BTreeSet::new();
        if !book.is_empty() {
            let batch = view.interval.into_iter().flat_map(IntervalBatch::members);
            let users = members
                .into_iter()
                .flat_map(|c| c.users.keys())
                .map(String::as_str)
                .chain(view.member.map(|m| m.user_id.as_str()))
                .chain(batch.map(|m| m.user_id.as_str()));
            subjects.extend(users.filter(|u| book.restricted(u)));
        }
        if state.devices_hidden {
            // Users with an invisible device this event is about or counts.
            let batch = view.interval.into_iter().flat_map(IntervalBatch::members);
            let keys = members
                .into_iter()
                .flat_map(|c| c.members.keys())
                .map(|(u, d)| (u.as_str(), d.as_str()))
                .chain(
                    view.member
                        .map(|m| (m.user_id.as_str(), m.device_id.as_str())),
                )
                .chain(batch.map(|m| (m.user_id.as_str(), m.device_id.as_str())));
            for (user, device) in keys {
                if invisible_to(state, Viewer::Public, user, device) {
                    subjects.insert(user);
                }
            }
        }
        let subjects: Vec<&str> = subjects.into_iter().collect();
        // Per subject, as one recipient is shown them: 0 all, 1 nothing (privacy hides the
        // user), 2 all but their invisible devices.
        let mut items: HashMap<Vec<u8>, Option<Item>> = HashMap::new();
        let mut withheld = 0u64;
        let mut tally = FanoutTally::default();
        let mut offer = |user: &str, device: &str| {
            let outbound = state
                .users
                .get(user)
                .and_then(|e| e.devices.get(device))
                .and_then(|d| d.outbound.as_ref());
            let Some(outbound) = outbound.filter(|o| Some(o.id()) != exclude_conn) else {
                return;
            };
            if others_of == Some(user) {
                return;
            }
            let hidden: Vec<u8> = subjects
                .iter()
                .map(|s| {
                    if hides(book, Viewer::User(user), s) {
                        1
                    } else if state.devices_hidden && *s != user {
                        2
                    } else {
                        0
                    }
                })
                .collect();
            let item = items.entry(hidden).or_insert_with_key(|hidden| {
                let pick = |level: u8| -> HashSet<&str> {
                    subjects
                        .iter()
                        .zip(hidden)
                        .filter(|(_, h)| **h == level)
                        .map(|(s, _)| *s)
                        .collect()
                };
                let (users, devices_of) = (pick(1), pick(2));
                let member_hidden = |u: &str, d: &str| {
                    users.contains(u)
                        || (devices_of.contains(u) && invisible_to(state, Viewer::Public, u, d))
                };
                let shown = if subjects.is_empty() {
                    ShownChannelEvent {
                        base: view,
                        occupancy: view.occupancy,
                        interval: view.interval.map(std::borrow::Cow::Borrowed),
                    }
                } else {
                    shown_channel_event(view, members, &member_hidden)?
                };
                Some(Item::event(
                    self.shared.encoder.channel_event(&shown.view()),
                    received_at,
                    "channel_event",
                ))
            });
            match item {
                Some(item) => tally.offer(outbound, key, item),
                None => withheld += 1,
            }
        };
        if let Some(ch) = members {
            for (user, device) in ch.members.keys() {
                offer(user, device);
            }
        }
        if let Some(watchers) = state.channel_watchers.get(channel) {
            for (user, device) in watchers {
                let is_member = members
                    .is_some_and(|c| c.members.contains_key(&(user.clone(), device.clone())));
                if !is_member {
                    offer(user, device);
                }
            }
        }
        if withheld > 0 {
            metrics::counter!(crate::metrics::PRIVACY_WITHHELD).increment(withheld);
        }
        self.finish_fanout(tally);
    }
}

/// One recipient's view of one member user in one channel, taken before a privacy change or
/// a device's flip: the user's member devices the recipient is shown.
pub(super) struct ChannelSight {
    channel: String,
    target: String,
    recipient: (String, String),
    shown: Vec<String>,
}

impl Registry {
    /// Before a privacy change about `targets`: every channel recipient (member or watcher
    /// device) of every channel a target is in, with the target's member devices shown to
    /// them. Channels with a batch waiting are flushed first, so visibility is constant
    /// within an INTERVAL event.
    pub(super) fn channel_sights(
        &self,
        state: &mut State,
        targets: &BTreeSet<&str>,
        received_at: Instant,
    ) -> Vec<ChannelSight> {
        let mut sights = Vec::new();
        for target in targets {
            let Some(entry) = state.users.get(*target) else {
                continue;
            };
            let channels: BTreeSet<String> = entry
                .devices
                .values()
                .flat_map(|d| d.joined.iter().cloned())
                .collect();
            for channel in channels {
                if let Some(batch) = state
                    .channels
                    .get_mut(&channel)
                    .and_then(|c| c.pending.take())
                {
                    self.deliver_interval(state, &channel, &batch, received_at);
                }
                let mut recipients: BTreeSet<(String, String)> = state
                    .channels
                    .get(&channel)
                    .map(|c| c.members.keys().cloned().collect())
                    .unwrap_or_default();
                if let Some(watchers) = state.channel_watchers.get(&channel) {
                    recipients.extend(watchers.iter().cloned());
                }
                for recipient in recipients {
                    if recipient.0 == *target {
                        continue;
                    }
                    let shown = shown_devices(state, &channel, &recipient.0, target);
                    sights.push(ChannelSight {
                        channel: channel.clone(),
                        target: target.to_string(),
                        recipient,
                        shown,
                    });
                }
            }
        }
        sights
    }

    /// After a privacy change or a device's flip: tells each recipient whose view of a member
    /// changed, as a clean departure (LEAVE per device hidden now, then OFFLINE when none is
    /// left) when `departures`, else as an arrival (JOIN per device shown now with its state,
    /// then ONLINE when none was shown), with the occupancy the recipient is shown.
    pub(super) fn channel_transitions(
        &self,
        state: &State,
        sights: &[ChannelSight],
        departures: bool,
        received_at: Instant,
        tally: &mut FanoutTally,
    ) {
        for sight in sights {
            let (user, device) = &sight.recipient;
            let now = shown_devices(state, &sight.channel, user, &sight.target);
            let (changed, user_kind): (Vec<&String>, Option<ChannelEventKind>) = if departures {
                let gone: Vec<&String> = sight.shown.iter().filter(|d| !now.contains(d)).collect();
                let offline = !gone.is_empty() && now.is_empty();
                (gone, offline.then_some(ChannelEventKind::Offline))
            } else {
                let new: Vec<&String> = now.iter().filter(|d| !sight.shown.contains(d)).collect();
                let online = !new.is_empty() && sight.shown.is_empty();
                (new, online.then_some(ChannelEventKind::Online))
            };
            if changed.is_empty() {
                continue;
            }
            let (Some(ch), Some(outbound)) = (
                state.channels.get(&sight.channel),
                state
                    .users
                    .get(user)
                    .and_then(|e| e.devices.get(device))
                    .and_then(|d| d.outbound.as_ref()),
            ) else {
                continue;
            };
            let occupancy = ch.occupancy_for(state, Viewer::User(user));
            let member_kind = if departures {
                ChannelEventKind::Leave
            } else {
                ChannelEventKind::Join
            };
            let devices: Vec<ChannelMember> = changed
                .iter()
                .map(|d| ch.view(&(sight.target.clone(), (*d).clone()), true))
                .collect();
            let user_level = user_kind.map(|kind| {
                let first = &devices[0];
                (
                    kind,
                    ChannelMember {
                        state: BTreeMap::new(),
                        ..first.clone()
                    },
                )
            });
            let events = devices
                .iter()
                .map(|m| {
                    (
                        member_kind,
                        m,
                        format!(
                            "\u{2}{}\u{0}{}\u{0}{}",
                            sight.channel, m.user_id, m.device_id
                        ),
                    )
                })
                .chain(user_level.iter().map(|(kind, m)| {
                    (
                        *kind,
                        m,
                        format!("\u{2}{}\u{0}{}", sight.channel, sight.target),
                    )
                }));
            for (kind, member, key) in events {
                let view = ChannelEventView {
                    channel: &sight.channel,
                    kind,
                    member: Some(member),
                    occupancy,
                    interval: None,
                };
                let item = Item::event(
                    self.shared.encoder.channel_event(&view),
                    received_at,
                    "channel_event",
                );
                tally.offer(outbound, &key, &item);
            }
        }
    }
}

/// `target`'s member devices in `channel` that `viewer` is shown.
fn shown_devices(state: &State, channel: &str, viewer: &str, target: &str) -> Vec<String> {
    let Some(ch) = state.channels.get(channel) else {
        return Vec::new();
    };
    ch.members
        .range((target.to_string(), String::new())..)
        .take_while(|((u, _), _)| u == target)
        .filter(|((u, d), _)| !hides_member(state, Viewer::User(viewer), u, d))
        .map(|((_, d), _)| d.clone())
        .collect()
}

/// A channel event as one recipient is shown it.
struct ShownChannelEvent<'a> {
    base: &'a ChannelEventView<'a>,
    occupancy: u32,
    interval: Option<std::borrow::Cow<'a, IntervalBatch>>,
}

impl ShownChannelEvent<'_> {
    fn view(&self) -> ChannelEventView<'_> {
        ChannelEventView {
            occupancy: self.occupancy,
            interval: self.interval.as_deref(),
            ..*self.base
        }
    }
}

/// `view` with the members `hidden` says are hidden (user, device) taken out; `None` when
/// nothing is left to tell (the event is about a hidden member, or an INTERVAL lists only
/// hidden members).
fn shown_channel_event<'a>(
    view: &'a ChannelEventView<'a>,
    members: Option<&Channel>,
    hidden: &dyn Fn(&str, &str) -> bool,
) -> Option<ShownChannelEvent<'a>> {
    if view
        .member
        .is_some_and(|m| hidden(&m.user_id, &m.device_id))
    {
        return None;
    }
    // Users in the channel with no member device shown.
    let mut shown_users: HashSet<&str> = HashSet::new();
    let mut any_hidden = false;
    if let Some(c) = members {
        for (u, d) in c.members.keys() {
            if hidden(u, d) {
                any_hidden = true;
            } else {
                shown_users.insert(u);
            }
        }
    }
    let in_channel = members.map_or(0, |c| c.users.len() - shown_users.len()) as u32;
    let occupancy = view.occupancy.saturating_sub(in_channel);
    let interval = match view.interval {
        None => None,
        Some(batch)
            if !any_hidden && !batch.members().any(|m| hidden(&m.user_id, &m.device_id)) =>
        {
            Some(std::borrow::Cow::Borrowed(batch))
        }
        Some(batch) => {
            let keep = |list: &[ChannelMember]| -> Vec<ChannelMember> {
                list.iter()
                    .filter(|m| !hidden(&m.user_id, &m.device_id))
                    .cloned()
                    .collect()
            };
            let shown = IntervalBatch {
                joins: keep(&batch.joins),
                leaves: keep(&batch.leaves),
                timeouts: keep(&batch.timeouts),
                state_changes: keep(&batch.state_changes),
                refresh: batch.refresh,
            };
            if shown.is_empty() {
                return None;
            }
            Some(std::borrow::Cow::Owned(shown))
        }
    };
    Some(ShownChannelEvent {
        base: view,
        occupancy,
        interval,
    })
}

/// True when another member device of `user` in `channel` than `device` is visible.
fn shown_elsewhere(state: &State, channel: &str, user: &str, device: &str) -> bool {
    state.channels.get(channel).is_some_and(|c| {
        c.members
            .range((user.to_string(), String::new())..)
            .take_while(|((u, _), _)| u == user)
            .any(|((u, d), _)| d != device && !invisible_to(state, Viewer::Public, u, d))
    })
}

/// True when (user, device) is a session this node holds (its transitions are reported here).
fn is_local(state: &State, user_id: &str, device_id: &str) -> bool {
    state
        .users
        .get(user_id)
        .and_then(|e| e.devices.get(device_id))
        .is_some_and(|d| d.origin.is_none())
}

fn remove_watcher(state: &mut State, channel: &str, user_id: &str, device_id: &str) {
    if let Some(watchers) = state.channel_watchers.get_mut(channel) {
        watchers.remove(&(user_id.to_string(), device_id.to_string()));
        if watchers.is_empty() {
            state.channel_watchers.remove(channel);
        }
    }
}

impl Registry {
    /// Channels with at least one member, and channels with at least one watcher (for tests,
    /// fuzzing and metrics).
    pub fn channel_counts(&self) -> (usize, usize) {
        let state = self.state();
        (state.channels.len(), state.channel_watchers.len())
    }
}

impl Registry {
    /// Checks the registry's internal consistency: every user has a device, each connection
    /// owns at most one device, memberships and watches agree in both directions, channel user
    /// counts match their members, and no empty channel or watcher list is kept. For fuzzing
    /// and tests; takes the lock once.
    pub fn check_invariants(&self) -> Result<(), String> {
        let state = self.state();
        let mut conns = HashSet::new();
        for (user, entry) in &state.users {
            if entry.devices.is_empty() {
                return Err(format!("user {user} kept with no device"));
            }
            for (device, d) in &entry.devices {
                if d.origin.is_some() {
                    // Held by another node: no connection here, nothing lingering here.
                    if d.conn_id != 0 || d.outbound.is_some() || d.lingering.is_some() {
                        return Err(format!(
                            "{user}/{device} is held by another node but has a local session"
                        ));
                    }
                } else {
                    if !conns.insert(d.conn_id) {
                        return Err(format!("connection {} owns two devices", d.conn_id));
                    }
                    if d.outbound.is_some() == d.lingering.is_some() {
                        return Err(format!(
                            "{user}/{device} is both live and lingering, or neither"
                        ));
                    }
                }
                for channel in &d.joined {
                    let member = state
                        .channels
                        .get(channel)
                        .is_some_and(|c| c.members.contains_key(&(user.clone(), device.clone())));
                    if !member {
                        return Err(format!("{user}/{device} joined {channel} but is no member"));
                    }
                }
                for channel in &d.watching {
                    let watching = state
                        .channel_watchers
                        .get(channel)
                        .is_some_and(|w| w.contains(&(user.clone(), device.clone())));
                    if !watching {
                        return Err(format!(
                            "{user}/{device} watches {channel} but is not listed"
                        ));
                    }
                }
            }
        }
        for (name, ch) in &state.channels {
            if ch.members.is_empty() {
                return Err(format!("channel {name} kept with no member"));
            }
            let mut per_user: HashMap<&str, u32> = HashMap::new();
            for (user, device) in ch.members.keys() {
                let joined = state
                    .users
                    .get(user)
                    .and_then(|e| e.devices.get(device))
                    .is_some_and(|d| d.joined.contains(name));
                if !joined {
                    return Err(format!("ghost member {user}/{device} in {name}"));
                }
                *per_user.entry(user).or_default() += 1;
            }
            let counted: HashMap<&str, u32> =
                ch.users.iter().map(|(u, n)| (u.as_str(), *n)).collect();
            if counted != per_user {
                return Err(format!(
                    "channel {name} user counts {counted:?} != members {per_user:?}"
                ));
            }
        }
        for (name, watchers) in &state.channel_watchers {
            if watchers.is_empty() {
                return Err(format!("empty watcher list kept for {name}"));
            }
            for (user, device) in watchers {
                let watching = state
                    .users
                    .get(user)
                    .and_then(|e| e.devices.get(device))
                    .is_some_and(|d| d.watching.contains(name));
                if !watching {
                    return Err(format!("ghost watcher {user}/{device} of {name}"));
                }
            }
        }
        Ok(())
    }

    /// The connection that owns (user, device), if any (for fuzzing and tests).
    pub fn owner_of(&self, user_id: &str, device_id: &str) -> Option<u64> {
        self.state()
            .users
            .get(user_id)
            .and_then(|e| e.devices.get(device_id))
            .map(|d| d.conn_id)
    }
}
