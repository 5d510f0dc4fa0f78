//! Privacy in the registry: what each viewer is shown of a user ([`Registry::snapshots_for`],
//! the per-watcher branch of fanout) and privacy changes with their transitions
//! ([`Registry::privacy_op`]). Every decision comes from the book under the registry lock
//! (`crate::privacy::book::PrivacyBook::decide`); this file only turns a decision into a
//! snapshot or an event. A user with no privacy entry costs one hash lookup per fanout and is
//! fanned out exactly as before (one encoding for every watcher).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Instant;

use super::channels::{hides, hides_member, invisible_to, occupancy_for};
use super::{FanoutTally, Registry, RegistryError, State};
use crate::events::{PresenceJson, PublicMembership, PublicNote, Transition};
use crate::model::{Availability, EventKind, EventView, OfflineReason, PresenceSnapshot};
use crate::outbound::Item;
use crate::privacy::book::PrivacyBook;
use crate::privacy::policy::Decision;
use crate::privacy::{Approval, Audience, Mark, PrivacyError, PrivacyOp, PrivacyRecord, Viewer};

/// A user's privacy settings and list sizes, as the user is shown them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PrivacySummary {
    /// Who sees the presence.
    pub audience: Audience,
    /// Who sees the last-seen time.
    pub last_seen_audience: Audience,
    /// Invisible at the user level.
    pub invisible: bool,
    /// Users blocked.
    pub blocked: usize,
    /// Watchers approved.
    pub approved: usize,
    /// Requests waiting.
    pub pending: usize,
}

/// A privacy notice for one user's devices (an event frame of its own).
#[derive(Debug, Clone, Copy)]
pub enum PrivacyNotice<'a> {
    /// `requester` subscribed while the user's audience needs approval.
    Request {
        /// The would-be watcher.
        requester: &'a str,
        /// When.
        at_ms: u64,
    },
    /// `user` approved the recipient; `presence` is what the recipient is shown of them now.
    Accepted {
        /// Who approved.
        user: &'a str,
        /// The recipient's view of them.
        presence: &'a PresenceSnapshot,
    },
}

impl From<PrivacyError> for RegistryError {
    fn from(e: PrivacyError) -> RegistryError {
        match e {
            PrivacyError::Limit(reason) => RegistryError::Limit(reason),
            PrivacyError::Bad(reason) => RegistryError::BadRequest(reason),
        }
    }
}

/// `truth` as a viewer with `decision` is shown it.
pub(super) fn shown_as(
    book: &PrivacyBook,
    decision: Decision,
    truth: &PresenceSnapshot,
) -> PresenceSnapshot {
    match decision {
        Decision::Own => truth.clone(),
        Decision::Shown { last_seen } => {
            let mut shown = public(book, truth);
            shown.version = shown.version.max(book.version_floor(&truth.user_id));
            if !last_seen {
                shown.last_seen_ms = 0;
            }
            shown
        }
        Decision::Masked { mark, last_seen } => {
            let seen = if last_seen { mark.last_seen_ms } else { 0 };
            let mut shown = PresenceSnapshot::offline(&truth.user_id, seen);
            shown.version = mark.version;
            shown
        }
    }
}

/// The truth as anyone it is not hidden from sees it: an offline user who was invisible and
/// has had no session since shows the last-seen time of when they went invisible.
fn public(book: &PrivacyBook, truth: &PresenceSnapshot) -> PresenceSnapshot {
    let reappeared = book
        .get(&truth.user_id)
        .and_then(|p| p.settings.reappeared)
        .filter(|m| truth.availability == Availability::Offline && truth.version < m.version);
    match reappeared {
        Some(mark) => {
            let mut shown = PresenceSnapshot::offline(&truth.user_id, mark.last_seen_ms);
            shown.version = mark.version;
            shown
        }
        None => truth.clone(),
    }
}

impl Registry {
    /// What `viewer` is shown of each user, in order (GetPresence, Subscribe replies, Resume).
    pub fn snapshots_for(&self, viewer: Viewer<'_>, user_ids: &[String]) -> Vec<PresenceSnapshot> {
        let state = self.state();
        user_ids
            .iter()
            .map(|u| self.view_locked(&state, viewer, u))
            .collect()
    }

    pub(super) fn view_locked(
        &self,
        state: &State,
        viewer: Viewer<'_>,
        user: &str,
    ) -> PresenceSnapshot {
        let decision = state.privacy.decide(viewer, user);
        let base = match decision {
            Decision::Own => self.snapshot_locked(state, user),
            // A device invisible on its own is left out of every other view.
            _ => self.projected(state, user),
        };
        shown_as(&state.privacy, decision, &base)
    }

    /// What those who may see `user` see when they are offline (`None`: online).
    fn shown_offline(&self, state: &State, user: &str) -> Option<Mark> {
        let truth = self.projected(state, user);
        if truth.availability != Availability::Offline {
            return None;
        }
        let shown = public(&state.privacy, &truth);
        Some(Mark {
            last_seen_ms: shown.last_seen_ms,
            version: shown.version,
        })
    }

    /// What a stranger ([`Viewer::Public`]) is shown of `truth`, a presence of
    /// `truth.user_id` that may be newer than this registry's own (an event from the cluster's
    /// log): `truth` itself, or the masked offline view when the user's privacy hides them.
    pub fn shown_to_public(&self, truth: &PresenceSnapshot) -> PresenceSnapshot {
        let state = self.state();
        let decision = state.privacy.decide(Viewer::Public, &truth.user_id);
        let projected = match state.users.get(&truth.user_id) {
            Some(entry) => entry.projection(),
            // Offline: the store holds what strangers were shown (a last-seen frozen while
            // only an invisible device was left).
            None if state.devices_hidden && truth.availability == Availability::Offline => {
                Some(self.snapshot_locked(&state, &truth.user_id))
            }
            None => None,
        };
        shown_as(
            &state.privacy,
            decision,
            projected.as_ref().unwrap_or(truth),
        )
    }

    /// Whether `user` is invisible at the user level.
    pub fn is_invisible(&self, user: &str) -> bool {
        self.state()
            .privacy
            .get(user)
            .is_some_and(|p| p.settings.invisible.is_some())
    }

    /// Up to `limit` users `user` blocked after `after`, with when; and how many in all.
    pub fn blocked_page(
        &self,
        user: &str,
        after: Option<&str>,
        limit: usize,
    ) -> (Vec<(String, u64)>, usize) {
        self.state().privacy.blocked_page(user, after, limit)
    }

    /// `user`'s settings and list sizes.
    pub fn privacy_summary(&self, user: &str) -> PrivacySummary {
        let state = self.state();
        let Some(p) = state.privacy.get(user) else {
            return PrivacySummary::default();
        };
        PrivacySummary {
            audience: p.settings.audience,
            last_seen_audience: p.settings.last_seen_audience,
            invisible: p.settings.invisible.is_some(),
            blocked: p.blocked.len(),
            approved: p
                .approvals
                .values()
                .filter(|a| matches!(a, Approval::Approved { .. }))
                .count(),
            pending: p.pending,
        }
    }

    /// Up to `limit` of `user`'s request and approval entries matching `filter` after `after`,
    /// and how many match in all.
    pub fn approvals_page(
        &self,
        user: &str,
        filter: &dyn Fn(&Approval) -> bool,
        after: Option<&str>,
        limit: usize,
    ) -> (Vec<(String, Approval)>, usize) {
        self.state()
            .privacy
            .approvals_page(user, filter, after, limit)
    }

    /// After `requester` subscribed to `targets`: a request to each target whose audience
    /// needs approval and who has not answered them yet (stored with the subscription, and
    /// told to the target's devices). Never fails the Subscribe: the requester must not be
    /// able to tell; a refusal (the store, a cap) is logged.
    pub fn privacy_requests(&self, requester: &str, targets: &[String], received_at: Instant) {
        if self.state().privacy.is_empty() {
            return;
        }
        for target in targets {
            let op = PrivacyOp::Request {
                target: target.clone(),
                requester: requester.to_string(),
            };
            if let Err(e) = self.privacy_op(&op, received_at) {
                tracing::debug!(requester, target = target.as_str(), "no request: {e}");
            }
        }
    }

    /// Loads the privacy records the store holds (at start, before any session).
    pub(super) fn load_privacy(&self) {
        let records = self.shared.store.privacy_records();
        let mut state = self.state();
        for record in &records {
            if let PrivacyRecord::Settings { settings, .. } = record {
                self.shared.hlc.observe(settings.version);
            }
            state.privacy.apply(record);
        }
        if !records.is_empty() {
            tracing::info!(
                records = records.len(),
                users = state.privacy.len(),
                "privacy settings loaded"
            );
        }
    }

    /// Carries out a privacy change: plans it against the caps, stores its records (durable
    /// once the store flushes: callers reply after the group commit), applies them, and tells
    /// each watcher with a live device here whose view went from online to offline (OFFLINE,
    /// reason DISCONNECT) or back (ONLINE). Returns the records (none: nothing changed).
    pub fn privacy_op(
        &self,
        op: &PrivacyOp,
        received_at: Instant,
    ) -> Result<Vec<PrivacyRecord>, RegistryError> {
        if self.shared.sink.get().is_some() {
            return Err(RegistryError::Unavailable(
                "privacy changes go through the cluster's privacy log: this path cannot take \
                 them in cluster mode"
                    .into(),
            ));
        }
        let mut state = self.state();
        let records = self.plan_locked(&state, op)?;
        self.apply_records_locked(&mut state, &records, received_at, true)?;
        if !records.is_empty() {
            metrics::counter!(crate::metrics::PRIVACY_OPS, "op" => op_label(op)).increment(1);
        }
        Ok(records)
    }

    /// Cluster mode: the records that carry out `op` against this node's book, to be
    /// appended to the privacy log (every node applies them from there, this one included).
    pub fn plan_privacy(&self, op: &PrivacyOp) -> Result<Vec<PrivacyRecord>, RegistryError> {
        let state = self.state();
        let records = self.plan_locked(&state, op)?;
        if !records.is_empty() {
            metrics::counter!(crate::metrics::PRIVACY_OPS, "op" => op_label(op)).increment(1);
        }
        Ok(records)
    }

    /// Cluster mode: applies records from the privacy log (kept in memory; the log is their
    /// durable home), telling this node's watchers whose view flipped.
    pub fn apply_privacy_records(&self, records: &[PrivacyRecord], received_at: Instant) {
        for record in records {
            if let PrivacyRecord::Settings { settings, .. } = record {
                self.shared.hlc.observe(settings.version);
            }
        }
        let mut state = self.state();
        if let Err(e) = self.apply_records_locked(&mut state, records, received_at, false) {
            tracing::warn!("privacy records not applied: {e}");
        }
    }

    fn plan_locked(
        &self,
        state: &State,
        op: &PrivacyOp,
    ) -> Result<Vec<PrivacyRecord>, RegistryError> {
        let tick = self.shared.hlc.tick();
        Ok(state.privacy.plan(op, tick, crate::now_ms(), &|u: &str| {
            self.shown_offline(state, u)
        })?)
    }

    /// Applies planned `records` (stored first when `persist`) with their transitions.
    fn apply_records_locked(
        &self,
        state: &mut State,
        records: &[PrivacyRecord],
        received_at: Instant,
        persist: bool,
    ) -> Result<(), RegistryError> {
        if records.is_empty() {
            return Ok(());
        }
        let now_ms = crate::now_ms();
        let targets: BTreeSet<&str> = records
            .iter()
            .flat_map(|r| match r {
                PrivacyRecord::Settings { user, .. } | PrivacyRecord::Approval { user, .. } => {
                    vec![user.as_str()]
                }
                PrivacyRecord::Block { user, target, .. } => vec![user.as_str(), target.as_str()],
            })
            .collect();
        let sights = self.channel_sights(state, &targets, received_at);
        let pairs = self.affected_pairs(state, records, now_ms);
        let before: Vec<PresenceSnapshot> = pairs
            .iter()
            .map(|(v, t)| self.view_locked(state, Viewer::User(v), t))
            .collect();
        if persist {
            self.shared
                .store
                .write_privacy(records)
                .map_err(|e| RegistryError::Store(e.to_string()))?;
        }
        let was_invisible: Vec<&str> = records
            .iter()
            .filter_map(|r| match r {
                PrivacyRecord::Settings { user, .. } => Some(user.as_str()),
                _ => None,
            })
            .filter(|u| {
                state
                    .privacy
                    .get(u)
                    .is_some_and(|p| p.settings.invisible.is_some())
            })
            .collect();
        for record in records {
            state.privacy.apply(record);
        }
        for user in was_invisible {
            let visible_now = state
                .privacy
                .get(user)
                .is_none_or(|p| p.settings.invisible.is_none());
            if visible_now {
                reappear_now(state, user);
            }
        }
        for record in records {
            if let PrivacyRecord::Settings { user, .. } = record {
                self.tell_settings_listeners(state, user);
            }
        }
        let mut tally = FanoutTally::default();
        // Notices first: an acceptance arrives before the ONLINE it brings.
        self.privacy_notices(state, records, received_at, &mut tally);
        // In the order a real departure (channels, then presence) or arrival (presence, then
        // the rooms it joins) tells them.
        self.channel_transitions(state, &sights, true, received_at, &mut tally);
        for ((viewer, target), before) in pairs.iter().zip(before) {
            let after = self.view_locked(state, Viewer::User(viewer), target);
            // Online means with a device shown (whatever availability it set).
            let was = !before.devices.is_empty();
            let is = !after.devices.is_empty();
            let kind = match (was, is) {
                (true, false) if self.shared.options.offline_broadcast => EventKind::Offline,
                (false, true) => EventKind::Online,
                _ => continue,
            };
            // Named like a real arrival or departure: a device the viewer sees come or go.
            let device_id = super::shown::shown_device(&before, &after, "");
            let event = EventView {
                kind,
                presence: &after,
                reason: (kind == EventKind::Offline).then_some(OfflineReason::Disconnect),
                device_id: &device_id,
            };
            let item = Item::event(
                self.shared.encoder.presence_event(&event),
                received_at,
                "presence_event",
            );
            if let Some(entry) = state.users.get(viewer) {
                for outbound in entry.devices.values().filter_map(|d| d.outbound.as_ref()) {
                    tally.offer(outbound, target, &item);
                }
            }
        }
        self.channel_transitions(state, &sights, false, received_at, &mut tally);
        self.finish_fanout(tally);
        Ok(())
    }

    /// Tells the settings listeners (the MQTT bridge, public webhooks) what a stranger is
    /// shown of `user` now, after a change of their settings or a device's invisibility.
    pub(super) fn tell_settings_listeners(&self, state: &State, user: &str) {
        let listeners = self
            .shared
            .settings_listeners
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if listeners.is_empty() {
            return;
        }
        let public = self.public_now(state, user);
        for listener in &listeners {
            listener.settings_changed(user, &public);
        }
    }

    /// Requests to the watched user's devices, acceptances to the watcher's.
    fn privacy_notices(
        &self,
        state: &State,
        records: &[PrivacyRecord],
        received_at: Instant,
        tally: &mut FanoutTally,
    ) {
        for record in records {
            let PrivacyRecord::Approval {
                user,
                other,
                state: Some(standing),
            } = record
            else {
                continue;
            };
            let (to, key, frame) = match standing {
                Approval::Pending { since_ms } => (
                    user,
                    format!("\u{4}{other}"),
                    self.shared.encoder.privacy_notice(&PrivacyNotice::Request {
                        requester: other,
                        at_ms: *since_ms,
                    }),
                ),
                Approval::Approved { .. } => {
                    let presence = self.view_locked(state, Viewer::User(other), user);
                    (
                        other,
                        format!("\u{5}{user}"),
                        self.shared
                            .encoder
                            .privacy_notice(&PrivacyNotice::Accepted {
                                user,
                                presence: &presence,
                            }),
                    )
                }
                Approval::Denied { .. } | Approval::Revoked { .. } => continue,
            };
            let item = Item::event(frame, received_at, "privacy_notice");
            if let Some(entry) = state.users.get(to) {
                for outbound in entry.devices.values().filter_map(|d| d.outbound.as_ref()) {
                    tally.offer(outbound, &key, &item);
                }
            }
        }
    }

    /// The (viewer, target) pairs whose view `records` may change: watchers of the target
    /// with a live device here.
    fn affected_pairs(
        &self,
        state: &State,
        records: &[PrivacyRecord],
        now_ms: u64,
    ) -> Vec<(String, String)> {
        let live = |user: &str| {
            state
                .users
                .get(user)
                .is_some_and(|e| e.devices.values().any(|d| d.outbound.is_some()))
        };
        let mut watchers: HashMap<String, HashSet<String>> = HashMap::new();
        let mut watchers_of = |target: &str| -> HashSet<String> {
            watchers
                .entry(target.to_string())
                .or_insert_with(|| {
                    let mut set = HashSet::new();
                    self.shared
                        .store
                        .for_each_watcher(target, now_ms, &mut |w| {
                            if live(w) {
                                set.insert(w.to_string());
                            }
                        });
                    set
                })
                .clone()
        };
        let mut pairs = BTreeSet::new();
        for record in records {
            match record {
                PrivacyRecord::Settings { user, .. } => {
                    for w in watchers_of(user) {
                        pairs.insert((w, user.clone()));
                    }
                }
                PrivacyRecord::Block { user, target, .. } => {
                    if watchers_of(user).contains(target) {
                        pairs.insert((target.clone(), user.clone()));
                    }
                    if watchers_of(target).contains(user) {
                        pairs.insert((user.clone(), target.clone()));
                    }
                }
                PrivacyRecord::Approval { user, other, .. } => {
                    if watchers_of(user).contains(other) {
                        pairs.insert((other.clone(), user.clone()));
                    }
                }
            }
        }
        pairs.into_iter().collect()
    }

    /// Offers `event` (about a restricted user) to `watcher`'s live devices as the watcher is
    /// shown it: nothing when the user is hidden from them, else the shown presence, encoded
    /// once per variant (`variants[last_seen]`).
    pub(super) fn offer_restricted(
        &self,
        state: &State,
        watcher: &str,
        event: &EventView<'_>,
        received_at: Instant,
        variants: &mut [Option<Item>; 2],
        tally: &mut FanoutTally,
    ) {
        let user_id = event.presence.user_id.as_str();
        let Some(entry) = state.users.get(watcher) else {
            return;
        };
        let last_seen = match state.privacy.decide(Viewer::User(watcher), user_id) {
            Decision::Masked { .. } => {
                metrics::counter!(crate::metrics::PRIVACY_WITHHELD).increment(1);
                return;
            }
            Decision::Own => true,
            Decision::Shown { last_seen } => last_seen,
        };
        let item = variants[usize::from(last_seen)].get_or_insert_with(|| {
            let presence = shown_as(
                &state.privacy,
                Decision::Shown { last_seen },
                event.presence,
            );
            let shown = EventView {
                presence: &presence,
                ..*event
            };
            Item::event(
                self.shared.encoder.presence_event(&shown),
                received_at,
                "presence_event",
            )
        });
        for outbound in entry.devices.values().filter_map(|d| d.outbound.as_ref()) {
            tally.offer(outbound, user_id, item);
        }
    }
}

impl Registry {
    /// What a stranger was shown of `transition`, when privacy makes it differ from the
    /// truth (public webhooks). One lookup when nobody has privacy settings.
    pub(super) fn public_note(&self, state: &State, transition: &Transition) -> Option<PublicNote> {
        let book = &state.privacy;
        if book.is_empty() && !state.devices_hidden {
            return None;
        }
        match transition {
            Transition::UserOnline(p)
            | Transition::UserUpdated(p)
            | Transition::UserOffline { presence: p, .. } => {
                let projected = state
                    .users
                    .get(&p.user_id)
                    .and_then(super::UserEntry::projection);
                // The last device gone: the store holds what strangers were shown.
                let frozen = (p.availability == Availability::Offline && state.devices_hidden)
                    .then(|| self.snapshot_locked(state, &p.user_id))
                    .filter(|stored| stored.version != p.version);
                let base = projected.or(frozen);
                if !book.restricted(&p.user_id) && base.is_none() {
                    return None;
                }
                let base = base.as_ref().unwrap_or(p);
                let shown = shown_as(book, book.decide(Viewer::Public, &p.user_id), base);
                Some(PublicNote {
                    hidden: hides(book, Viewer::Public, &p.user_id),
                    presence: Some(PresenceJson::from(&shown)),
                    ..PublicNote::default()
                })
            }
            Transition::DeviceConnected { user, device, .. } => (hides(book, Viewer::Public, user)
                || invisible_to(state, Viewer::Public, user, device))
            .then(|| PublicNote {
                hidden: true,
                ..PublicNote::default()
            }),
            Transition::DeviceDisconnected { user, .. } => (hides(book, Viewer::Public, user)
                || state.departing_invisible)
                .then(|| PublicNote {
                    hidden: true,
                    ..PublicNote::default()
                }),
            Transition::ChannelOccupied { channel, user }
            | Transition::ChannelVacated { channel, user }
            | Transition::MemberJoined { channel, user, .. }
            | Transition::MemberLeft { channel, user, .. } => {
                let truth = match transition {
                    Transition::ChannelOccupied { .. } => 1,
                    Transition::MemberJoined { occupancy, .. }
                    | Transition::MemberLeft { occupancy, .. } => *occupancy,
                    _ => 0,
                };
                let shown = occupancy_for(state, channel, Viewer::Public);
                let hidden = hides(book, Viewer::Public, user)
                    || match transition {
                        Transition::MemberJoined { device, .. }
                        | Transition::MemberLeft { device, .. } => {
                            invisible_to(state, Viewer::Public, user, device)
                        }
                        // Occupied by an invisible device alone; vacated: the view tells it
                        // when it told the channel occupied.
                        Transition::ChannelOccupied { .. } => shown == 0,
                        _ => state.devices_hidden,
                    };
                (hidden || shown != truth).then(|| PublicNote {
                    hidden,
                    occupancy: Some(shown),
                    ..PublicNote::default()
                })
            }
        }
    }

    /// After a change of `user`'s settings: what a stranger is shown of them now, with their
    /// memberships and each channel's occupancy as a stranger is shown it.
    fn public_now(&self, state: &State, user: &str) -> PublicNote {
        let presence = self.view_locked(state, Viewer::Public, user);
        let memberships = state.users.get(user).map_or_else(Vec::new, |entry| {
            entry
                .devices
                .iter()
                .flat_map(|(device, d)| {
                    d.joined.iter().map(move |channel| PublicMembership {
                        channel: channel.clone(),
                        device: device.clone(),
                        occupancy: occupancy_for(state, channel, Viewer::Public),
                        hidden: hides_member(state, Viewer::Public, user, device),
                    })
                })
                .collect()
        });
        PublicNote {
            hidden: hides(&state.privacy, Viewer::Public, user),
            presence: Some(PresenceJson::from(&presence)),
            occupancy: None,
            memberships,
        }
    }
}

/// `user` becomes visible: their devices and memberships are shown from now on, as sessions
/// that connect and join now (no time from while they were hidden shows).
fn reappear_now(state: &mut State, user: &str) {
    let now_ms = crate::now_ms();
    let Some(entry) = state.users.get_mut(user) else {
        return;
    };
    let mut memberships = Vec::new();
    for (device, d) in entry.devices.iter_mut() {
        d.connected_since_ms = now_ms;
        memberships.extend(d.joined.iter().map(|c| (c.clone(), device.clone())));
    }
    // What watchers of a user with an invisible device were told moves alike, so the next
    // change of that device alone still tells nothing.
    if let Some(told) = entry.told.as_mut() {
        for d in &mut told.devices {
            d.connected_since_ms = now_ms;
        }
    }
    for (channel, device) in memberships {
        if let Some(member) = state
            .channels
            .get_mut(&channel)
            .and_then(|c| c.member_mut(&(user.to_string(), device)))
        {
            member.joined_at_ms = now_ms;
        }
    }
}

fn op_label(op: &PrivacyOp) -> &'static str {
    match op {
        PrivacyOp::SetInvisible { .. } => "set_invisible",
        PrivacyOp::SetAudience { .. } => "set_audience",
        PrivacyOp::Block { .. } => "block",
        PrivacyOp::Unblock { .. } => "unblock",
        PrivacyOp::Request { .. } => "request",
        PrivacyOp::Answer { .. } => "answer",
    }
}
