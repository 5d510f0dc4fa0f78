//! Invisibility per device: the *shown projection* of a user, what everyone but the user's own
//! devices and the backend is shown while one of the user's devices is invisible (the user
//! without that device: its availability, its channels and its departure never show), and the
//! device flips ([`Registry::set_device_invisible`]). While a device is invisible the user's
//! entry keeps what watchers were last told (`UserEntry::told`); each change is told to them as
//! the difference between that and the projection after the change (ONLINE, UPDATE, OFFLINE or
//! nothing at all), so the truth moving underneath never shows, not even as a version. The
//! channel side of a flip reuses the privacy transitions (`channels::channel_sights`).

use std::collections::BTreeSet;
use std::time::Instant;

use super::{Registry, RegistryError, State, UserEntry};
use crate::model::{Availability, EventKind, EventView, OfflineReason, PresenceSnapshot};

impl UserEntry {
    /// Whether any device of the user is invisible.
    pub(super) fn any_invisible(&self) -> bool {
        self.devices.values().any(|d| d.invisible)
    }

    /// The user as those who may see them are shown it, when that differs from the truth
    /// (`None`: no device is invisible and nothing is owed). Visible devices only, the
    /// availability from them; with no visible device the user is offline, last seen when the
    /// last visible one left (frozen: it does not move while an invisible device stays). When
    /// nothing watchers can see changed since they were told, exactly what they were told.
    pub(super) fn projection(&self) -> Option<PresenceSnapshot> {
        if self.told.is_none() && !self.any_invisible() {
            return None;
        }
        let truth = self.snapshot();
        let mut shown = truth.clone();
        shown.devices.retain(|d| {
            !self
                .devices
                .get(&d.device_id)
                .is_some_and(|entry| entry.invisible)
        });
        if shown.devices.is_empty() {
            let frozen = self.told.as_ref().filter(|t| t.devices.is_empty());
            // Versions are clock microseconds, so the version of the change that hid the last
            // visible device is when it happened, alike on every node of a cluster.
            shown = PresenceSnapshot::offline(
                &truth.user_id,
                frozen.map_or(truth.version / 1000, |t| t.last_seen_ms),
            );
            shown.version = frozen.map_or(truth.version, |t| t.version);
        } else {
            shown.availability = shown
                .devices
                .iter()
                .map(|d| d.availability)
                .max_by_key(|a| a.rank())
                .unwrap_or(Availability::Offline);
        }
        Some(match &self.told {
            Some(told) if same_view(told, &shown) => told.clone(),
            _ => shown,
        })
    }
}

/// The device an event from `before` to `now` names, as a real one would: the one that
/// arrived or left, `caused_by` when the viewer sees it, else one they see. Never a device
/// hidden from them (an invisible device is never named), and never none when they see one.
pub(super) fn shown_device(
    before: &PresenceSnapshot,
    now: &PresenceSnapshot,
    caused_by: &str,
) -> String {
    let in_ = |p: &PresenceSnapshot, d: &str| p.devices.iter().any(|x| x.device_id == d);
    if in_(before, caused_by) != in_(now, caused_by) {
        return caused_by.to_string();
    }
    let arrived = now.devices.iter().find(|d| !in_(before, &d.device_id));
    let left = before
        .devices
        .iter()
        .rev()
        .find(|d| !in_(now, &d.device_id));
    let seen = now.devices.iter().find(|d| d.device_id == caused_by);
    arrived
        .or(left)
        .or(seen)
        .or(now.devices.first())
        .or(before.devices.last())
        .map(|d| d.device_id.clone())
        .unwrap_or_default()
}

/// Equal but for the version.
fn same_view(a: &PresenceSnapshot, b: &PresenceSnapshot) -> bool {
    a.version == b.version || {
        let mut a = a.clone();
        a.version = b.version;
        a == *b
    }
}

/// What watchers are told of a change ([`Registry::shown_step`]).
pub(super) enum Step {
    /// No device is invisible: the truth, as ever.
    Truth,
    /// Nothing they can see changed.
    Nothing,
    /// This event about the shown projection.
    Tell(Told),
}

/// An event about the shown projection.
pub(super) struct Told {
    kind: EventKind,
    presence: PresenceSnapshot,
    reason: Option<OfflineReason>,
    device_id: String,
}

impl Told {
    pub(super) fn view(&self) -> EventView<'_> {
        EventView {
            kind: self.kind,
            presence: &self.presence,
            reason: self.reason,
            device_id: &self.device_id,
        }
    }
}

impl Registry {
    /// What watchers of `event`'s user are shown of it, and the projection they now hold.
    /// Called by every fanout, after the change.
    pub(super) fn shown_step(&self, state: &mut State, event: &EventView<'_>) -> Step {
        let user_id = event.presence.user_id.as_str();
        let Some(entry) = state.users.get_mut(user_id) else {
            return Step::Truth;
        };
        let Some(now) = entry.projection() else {
            return Step::Truth;
        };
        let before = entry.told.take().unwrap_or_else(|| event.presence.clone());
        // Online means with a device shown (a device may set its availability to OFFLINE and
        // still be there: an UPDATE, as for the truth).
        let was = !before.devices.is_empty();
        let is = !now.devices.is_empty();
        let kind = match (was, is) {
            (false, false) => None,
            (true, false) if !self.shared.options.offline_broadcast => None,
            (true, false) => Some(EventKind::Offline),
            (false, true) => Some(EventKind::Online),
            (true, true) if same_view(&before, &now) => None,
            (true, true) => Some(EventKind::Update),
        };
        // Kept while a device is invisible, and after the last one went while nothing
        // watchers see changed: they keep the version they were told until a change they see.
        entry.told = (entry.any_invisible() || kind.is_none()).then(|| now.clone());
        let Some(kind) = kind else {
            return Step::Nothing;
        };
        let device_id = shown_device(&before, &now, event.device_id);
        // A device leaving the view reads as a disconnect, as a real one does.
        let left = before
            .devices
            .iter()
            .any(|d| !now.devices.iter().any(|n| n.device_id == d.device_id));
        Step::Tell(Told {
            kind,
            presence: now,
            reason: (kind == EventKind::Offline || left)
                .then(|| event.reason.unwrap_or(OfflineReason::Disconnect)),
            device_id,
        })
    }

    /// `user` as those who may see them are shown it (before audiences and blocks): the shown
    /// projection while a device is invisible, else the truth.
    pub(super) fn projected(&self, state: &State, user: &str) -> PresenceSnapshot {
        state
            .users
            .get(user)
            .and_then(UserEntry::projection)
            .unwrap_or_else(|| self.snapshot_locked(state, user))
    }

    /// Makes the session (user, device) on `conn_id` invisible on its own, or visible again.
    /// Everyone else sees the user as if the device were gone (an UPDATE without it, or
    /// OFFLINE when it was the only visible one; its channels as LEAVE then OFFLINE), and
    /// back (ONLINE or UPDATE, JOIN then ONLINE). Session state: not stored, it ends with the
    /// session. Returns the user's presence (the truth).
    pub fn set_device_invisible(
        &self,
        user_id: &str,
        device_id: &str,
        conn_id: u64,
        on: bool,
        received_at: Instant,
    ) -> Result<PresenceSnapshot, RegistryError> {
        let mut guard = self.state();
        let state = &mut *guard;
        let device = state
            .users
            .get(user_id)
            .and_then(|e| e.devices.get(device_id))
            .filter(|d| d.conn_id == conn_id && d.origin.is_none())
            .ok_or(RegistryError::NotAttached)?;
        if device.invisible != on {
            self.flip_device(state, user_id, device_id, on, None, received_at);
            self.emit_upsert(state, user_id, device_id);
        }
        Ok(self.snapshot_locked(state, user_id))
    }

    /// The devices of `user` invisible on its own, sorted (any node's, in cluster mode).
    pub fn invisible_devices(&self, user_id: &str) -> Vec<String> {
        self.state().users.get(user_id).map_or_else(Vec::new, |e| {
            e.devices
                .iter()
                .filter(|(_, d)| d.invisible)
                .map(|(id, _)| id.clone())
                .collect()
        })
    }

    /// Whether the session (user, device) is invisible on its own.
    pub fn is_device_invisible(&self, user_id: &str, device_id: &str) -> bool {
        self.state()
            .users
            .get(user_id)
            .and_then(|e| e.devices.get(device_id))
            .is_some_and(|d| d.invisible)
    }

    /// Turns (user, device)'s invisibility to `on` and tells everyone what they see change,
    /// in the order a real departure (channels, then presence) or arrival (presence, then
    /// channels) tells it. `version`: the origin's version (a cluster peer's flip), else a
    /// new one here. The device's `rev` follows, so peers see a change.
    pub(super) fn flip_device(
        &self,
        state: &mut State,
        user_id: &str,
        device_id: &str,
        on: bool,
        version: Option<u64>,
        received_at: Instant,
    ) {
        state.devices_hidden |= on;
        let targets: BTreeSet<&str> = std::iter::once(user_id).collect();
        let sights = self.channel_sights(state, &targets, received_at);
        let tick = version.unwrap_or_else(|| self.shared.hlc.tick());
        let Some(entry) = state.users.get_mut(user_id) else {
            return;
        };
        if entry.told.is_none() {
            entry.told = Some(entry.snapshot());
        }
        let Some(device) = entry.devices.get_mut(device_id) else {
            return;
        };
        let (origin, epoch, old_rev) = (device.origin.clone(), device.epoch, device.rev);
        device.invisible = on;
        let now_ms = crate::now_ms();
        let joined: Vec<String> = if on {
            Vec::new()
        } else {
            // Shown from now on, as a device that connects and joins now: no time from
            // while it was hidden shows.
            device.connected_since_ms = now_ms;
            device.joined.iter().cloned().collect()
        };
        entry.bump_version(tick);
        let version = entry.presence.version;
        if let Some(device) = entry.devices.get_mut(device_id) {
            device.rev = version;
        }
        let truth = entry.snapshot();
        let key = (user_id.to_string(), device_id.to_string());
        for channel in &joined {
            if let Some(member) = state
                .channels
                .get_mut(channel)
                .and_then(|c| c.member_mut(&key))
            {
                member.joined_at_ms = now_ms;
            }
        }
        state
            .replica
            .toggle_digest(origin.as_deref(), user_id, device_id, epoch, old_rev);
        state
            .replica
            .toggle_digest(origin.as_deref(), user_id, device_id, epoch, version);
        let mut tally = super::FanoutTally::default();
        self.channel_transitions(state, &sights, true, received_at, &mut tally);
        self.finish_fanout(tally);
        let event = EventView {
            kind: EventKind::Update,
            presence: &truth,
            reason: None,
            device_id,
        };
        if let Step::Tell(told) = self.shown_step(state, &event) {
            self.offer_watchers(state, &told.view(), true, received_at);
        }
        let mut tally = super::FanoutTally::default();
        self.channel_transitions(state, &sights, false, received_at, &mut tally);
        self.finish_fanout(tally);
        // The marker first: a public endpoint's view tells the departure (or arrival) in the
        // order clients see it, and the truth's UPDATE after it then changes nothing there.
        self.tell_settings_listeners(state, user_id);
        if origin.is_none() {
            self.observe(state, || {
                crate::events::Transition::UserUpdated(truth.clone())
            });
        }
    }
}
