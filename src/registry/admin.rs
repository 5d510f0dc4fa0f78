//! What the application's backend may do to live presence (the admin API's registry side):
//! read each user's connection status (connected, in the grace period, offline), end a
//! user's or one device's sessions at once (watchers see OFFLINE KICKED, no grace), and set
//! presence on a user's behalf. Synchronous, under the same lock as every other change, so
//! these interleave with client changes in one order.

use std::time::Instant;

use super::{Registry, RemovedBy};
use crate::model::{
    Availability, CloseKind, EventKind, EventView, OfflineReason, PresenceChange, PresenceSnapshot,
};
use crate::outbound::Item;
use crate::privacy::Viewer;

/// A user's connection status, as the backend sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnlineStatus {
    /// At least one device has a live connection (here or on another node).
    Connected,
    /// Every device lost its connection and is inside its grace period: the moment to send a
    /// push notification.
    Grace,
    /// No device.
    Offline,
}

impl OnlineStatus {
    /// `connected`, `grace` or `offline`.
    pub fn name(self) -> &'static str {
        match self {
            OnlineStatus::Connected => "connected",
            OnlineStatus::Grace => "grace",
            OnlineStatus::Offline => "offline",
        }
    }
}

/// Why the backend's change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    /// No live session to act on.
    #[error("{0}")]
    NotFound(String),
    /// The change exceeds a limit.
    #[error("{0}")]
    Limit(String),
}

impl Registry {
    /// Each user's connection status, in order. A device held by another node counts as
    /// connected unless that node reported it lingering.
    pub fn online_status(&self, user_ids: &[String]) -> Vec<OnlineStatus> {
        self.online_status_for(Viewer::Backend, user_ids)
    }

    /// Each user's connection status as `viewer` is shown it: `Offline` for a user privacy
    /// hides from the viewer (invisible, blocked either way, audience), the truth otherwise.
    pub fn online_status_for(&self, viewer: Viewer<'_>, user_ids: &[String]) -> Vec<OnlineStatus> {
        let state = self.state();
        user_ids
            .iter()
            .map(|u| match state.users.get(u) {
                None => OnlineStatus::Offline,
                Some(_) if super::channels::hides(&state.privacy, viewer, u) => {
                    OnlineStatus::Offline
                }
                Some(e)
                    if e.devices
                        .values()
                        .any(|d| d.lingering.is_none() && !d.remote_grace) =>
                {
                    OnlineStatus::Connected
                }
                Some(_) => OnlineStatus::Grace,
            })
            .collect()
    }

    /// Ends `user_id`'s sessions (all, or only `device`) at once: each live connection gets
    /// Close KICKED with `reason`, lingering devices go too, and watchers see OFFLINE (or
    /// UPDATE while other devices remain) with reason KICKED, without a grace period. A
    /// device another node holds is closed there. Returns the devices ended.
    pub fn kick(&self, user_id: &str, device: Option<&str>, reason: &str) -> Vec<String> {
        let received_at = Instant::now();
        let mut state = self.state();
        let devices: Vec<String> = match state.users.get(user_id) {
            Some(e) => e
                .devices
                .iter()
                .map(|(id, _)| id.clone())
                .filter(|id| device.is_none_or(|d| d == id))
                .collect(),
            None => Vec::new(),
        };
        let mut ended = Vec::new();
        for device_id in devices {
            let Some(entry) = self.drop_device(
                &mut state,
                user_id,
                &device_id,
                OfflineReason::Kicked,
                None,
                received_at,
                RemovedBy::Local {
                    close: Some(CloseKind::Kicked),
                },
                true,
            ) else {
                continue;
            };
            if let Some(outbound) = entry.outbound {
                let close = self.shared.encoder.close(CloseKind::Kicked, reason, 0);
                if outbound.close(Some(Item::reply(close, "close"))) {
                    metrics::counter!(crate::metrics::CLOSES, "code" => CloseKind::Kicked.metric_label())
                        .increment(1);
                }
            }
            ended.push(device_id);
        }
        ended
    }

    /// Up to `limit` users with at least one device (live, lingering, or held by another
    /// node), as the backend sees them, sorted by user id (the MQTT bridge's full pass).
    pub fn present_users(&self, limit: usize) -> Vec<PresenceSnapshot> {
        let state = self.state();
        let mut users: Vec<&String> = state.users.keys().collect();
        users.sort_unstable();
        users
            .into_iter()
            .take(limit)
            .filter_map(|u| state.users.get(u).map(|e| e.snapshot()))
            .collect()
    }

    /// Who holds `user_id`'s devices: whether this node holds any, and the other nodes that
    /// do (sorted, each once).
    pub fn holders(&self, user_id: &str) -> (bool, Vec<String>) {
        let state = self.state();
        let Some(entry) = state.users.get(user_id) else {
            return (false, Vec::new());
        };
        let local = entry.devices.values().any(|d| d.origin.is_none());
        let mut remote: Vec<String> = entry
            .devices
            .values()
            .filter_map(|d| d.origin.as_ref().map(|o| o.node.clone()))
            .collect();
        remote.sort();
        remote.dedup();
        (local, remote)
    }

    /// Applies `change` to `user_id`'s presence on the user's behalf, as if one of its devices
    /// had published it: user-level fields change, and an availability applies to every
    /// device this node holds. Watchers and the user's devices see UPDATE. Only for a user
    /// with a session held by this node (`NotFound` otherwise: offline, or held elsewhere —
    /// the caller says which).
    pub fn set_presence_for(
        &self,
        user_id: &str,
        change: &PresenceChange,
    ) -> Result<PresenceSnapshot, AdminError> {
        let received_at = Instant::now();
        let mut state = self.state();
        let entry = state
            .users
            .get_mut(user_id)
            .filter(|e| e.devices.values().any(|d| d.origin.is_none()))
            .ok_or_else(|| AdminError::NotFound(format!("user {user_id:?} has no live session")))?;
        change
            .apply_to(&mut entry.presence, self.shared.options.max_state_pairs)
            .map_err(AdminError::Limit)?;
        let mut touched = Vec::new();
        for (id, d) in entry.devices.iter_mut() {
            if d.origin.is_none() {
                if let Some(a) = change.availability.filter(|a| *a != Availability::Offline) {
                    d.availability = a;
                }
                touched.push((id.clone(), d.epoch, d.rev));
            }
        }
        entry.bump_version(self.shared.hlc.tick());
        let version = entry.presence.version;
        for (id, _, _) in &touched {
            if let Some(d) = entry.devices.get_mut(id) {
                d.rev = version;
            }
        }
        let snapshot = entry.snapshot();
        for (id, epoch, old_rev) in &touched {
            state
                .replica
                .toggle_digest(None, user_id, id, *epoch, *old_rev);
            state
                .replica
                .toggle_digest(None, user_id, id, *epoch, version);
            self.emit_upsert(&state, user_id, id);
        }
        let device_id = touched.first().map(|(id, _, _)| id.as_str()).unwrap_or("");
        let event = EventView {
            kind: EventKind::Update,
            presence: &snapshot,
            reason: None,
            device_id,
        };
        self.fanout(&mut state, &event, None, received_at);
        self.observe(&state, || {
            crate::events::Transition::UserUpdated(snapshot.clone())
        });
        Ok(snapshot)
    }
}
