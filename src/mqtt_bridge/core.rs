//! The bridge's synchronous core: what the broker should hold. Per user the latest presence
//! (by version) and per channel the latest occupancy, each with a fingerprint of what was last
//! published for it on the current connection, and the ordered set of subjects whose topic
//! must be (re)published. It takes events, full passes over the registry and retained topics
//! seen on the broker, and answers "what next". No clock, no I/O, no `.await`; the async shell
//! (`shell.rs`) turns its answers into MQTT publications.
//!
//! Bounds: at most `max_subjects` users plus channels are tracked (online users, occupied
//! channels, and subjects whose final offline / vacated state is not yet published: those are
//! forgotten once published). The dirty queue only holds tracked subjects, each once.

use std::collections::{HashMap, HashSet, VecDeque};

use crate::events::{Event, EventType};
use crate::model::{Availability, PresenceSnapshot};

/// A topic's subject.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Subject {
    /// A user.
    User(String),
    /// A channel.
    Channel(String),
}

#[derive(Debug, Default)]
struct UserEntry {
    /// Latest known presence; `None`: not known here, read it from the registry.
    truth: Option<PresenceSnapshot>,
    /// Fingerprint of what this connection last published.
    published: Option<u64>,
}

#[derive(Debug, Default)]
struct ChannelEntry {
    /// Latest known occupancy; `None`: read it from the registry.
    occupancy: Option<u32>,
    /// Fingerprint of what this connection last published.
    published: Option<u64>,
}

/// What [`Core::apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Applied {
    /// A subject changed and is queued for publication.
    Queued,
    /// Nothing to publish (an older version, an event the bridge does not show).
    Ignored,
    /// A new subject did not fit (`max_subjects`): dropped; a full pass will correct it.
    Dropped,
    /// The event says events were lost before it: a full pass is due.
    ResyncNeeded,
}

/// See the module doc.
#[derive(Debug)]
pub(crate) struct Core {
    users: HashMap<String, UserEntry>,
    channels: HashMap<String, ChannelEntry>,
    dirty: VecDeque<Subject>,
    queued: HashSet<Subject>,
    max_subjects: usize,
}

impl Core {
    /// An empty core tracking at most `max_subjects` users plus channels.
    pub(crate) fn new(max_subjects: usize) -> Core {
        Core {
            users: HashMap::new(),
            channels: HashMap::new(),
            dirty: VecDeque::new(),
            queued: HashSet::new(),
            max_subjects: max_subjects.max(1),
        }
    }

    /// Users plus channels tracked.
    pub(crate) fn len(&self) -> usize {
        self.users.len() + self.channels.len()
    }

    /// Subjects waiting for publication.
    pub(crate) fn pending(&self) -> usize {
        self.dirty.len()
    }

    fn mark(&mut self, subject: Subject) {
        if self.queued.insert(subject.clone()) {
            self.dirty.push_back(subject);
        }
    }

    fn has_room(&self) -> bool {
        self.len() < self.max_subjects
    }

    /// Takes in one event of the bus.
    pub(crate) fn apply(&mut self, event: &Event) -> Applied {
        match event.kind {
            EventType::UserOnline | EventType::UserUpdated | EventType::UserOffline => {
                let Some(json) = &event.presence else {
                    return Applied::Ignored;
                };
                let mut presence = PresenceSnapshot::from(json);
                if event.kind == EventType::UserOffline {
                    presence.availability = Availability::Offline;
                    presence.devices.clear();
                } else if presence.availability == Availability::Offline {
                    // Online with every device offline cannot be; show the user online.
                    presence.availability = Availability::Online;
                }
                self.set_user(presence)
            }
            EventType::ChannelOccupied
            | EventType::ChannelVacated
            | EventType::MemberJoined
            | EventType::MemberLeft => {
                let (Some(channel), Some(occupancy)) = (&event.channel, event.occupancy) else {
                    return Applied::Ignored;
                };
                self.set_channel(channel, Some(occupancy))
            }
            EventType::SyncRequired => Applied::ResyncNeeded,
            EventType::DeviceConnected
            | EventType::DeviceDisconnected
            | EventType::ServerStarted => Applied::Ignored,
        }
    }

    /// Records `presence` unless an equal or newer version is known; queues it.
    pub(crate) fn set_user(&mut self, presence: PresenceSnapshot) -> Applied {
        let user = presence.user_id.clone();
        let room = self.has_room();
        match self.users.get_mut(&user) {
            Some(entry) => {
                if entry
                    .truth
                    .as_ref()
                    .is_some_and(|t| t.version > presence.version)
                {
                    return Applied::Ignored;
                }
                entry.truth = Some(presence);
            }
            None if room => {
                self.users.insert(
                    user.clone(),
                    UserEntry {
                        truth: Some(presence),
                        published: None,
                    },
                );
            }
            None => return Applied::Dropped,
        }
        self.mark(Subject::User(user));
        Applied::Queued
    }

    /// Records a channel's occupancy (`None`: read it from the registry); queues it.
    pub(crate) fn set_channel(&mut self, channel: &str, occupancy: Option<u32>) -> Applied {
        let room = self.has_room();
        match self.channels.get_mut(channel) {
            Some(entry) => entry.occupancy = occupancy,
            None if room => {
                self.channels.insert(
                    channel.to_string(),
                    ChannelEntry {
                        occupancy,
                        published: None,
                    },
                );
            }
            None => return Applied::Dropped,
        }
        self.mark(Subject::Channel(channel.to_string()));
        Applied::Queued
    }

    /// A full pass: `users` are every user with a device now and `channels` every occupied
    /// channel. Tracked users missing from it are offline now and tracked channels missing
    /// from it are empty: both are queued with their state to be read from the registry (the
    /// user's last-seen time) or set to 0. Returns how many subjects did not fit.
    pub(crate) fn load(
        &mut self,
        users: Vec<PresenceSnapshot>,
        channels: Vec<(String, u32)>,
    ) -> u64 {
        let mut dropped = 0;
        let present: HashSet<String> = users.iter().map(|u| u.user_id.clone()).collect();
        let gone: Vec<String> = self
            .users
            .iter()
            .filter(|(u, e)| {
                !present.contains(*u)
                    && e.truth
                        .as_ref()
                        .is_none_or(|t| t.availability != Availability::Offline)
            })
            .map(|(u, _)| u.clone())
            .collect();
        for user in gone {
            if let Some(entry) = self.users.get_mut(&user) {
                entry.truth = None;
            }
            self.mark(Subject::User(user));
        }
        for presence in users {
            // A full pass is newer than anything held: take it whatever its version.
            let user = presence.user_id.clone();
            if let Some(entry) = self.users.get_mut(&user) {
                entry.truth = Some(presence);
                self.mark(Subject::User(user));
            } else if self.set_user(presence) == Applied::Dropped {
                dropped += 1;
            }
        }
        let occupied: HashSet<&str> = channels.iter().map(|(c, _)| c.as_str()).collect();
        let vacated: Vec<String> = self
            .channels
            .keys()
            .filter(|c| !occupied.contains(c.as_str()))
            .cloned()
            .collect();
        for channel in vacated {
            self.set_channel(&channel, Some(0));
        }
        for (channel, occupancy) in &channels {
            if self.set_channel(channel, Some(*occupancy)) == Applied::Dropped {
                dropped += 1;
            }
        }
        dropped
    }

    /// A new connection to the broker: nothing is known to be published on it; every tracked
    /// subject is queued.
    pub(crate) fn connected(&mut self) {
        let mut all: Vec<Subject> = self
            .users
            .keys()
            .map(|u| Subject::User(u.clone()))
            .chain(self.channels.keys().map(|c| Subject::Channel(c.clone())))
            .collect();
        all.sort();
        for e in self.users.values_mut() {
            e.published = None;
        }
        for e in self.channels.values_mut() {
            e.published = None;
        }
        for s in all {
            self.mark(s);
        }
    }

    /// The broker holds a retained message on the topic of `subject` (seen by the retained
    /// scan after a connect). Queued when the core does not track it: it was left behind by
    /// a crash, or by a restart of presenced or of the broker, and must be corrected.
    pub(crate) fn retained(&mut self, subject: Subject) -> Applied {
        match subject {
            Subject::User(user) => {
                if self.users.contains_key(&user) {
                    return Applied::Ignored;
                }
                if !self.has_room() {
                    return Applied::Dropped;
                }
                self.users.insert(user.clone(), UserEntry::default());
                self.mark(Subject::User(user));
                Applied::Queued
            }
            Subject::Channel(channel) => {
                if self.channels.contains_key(&channel) {
                    return Applied::Ignored;
                }
                self.set_channel(&channel, None)
            }
        }
    }

    /// The next subject to publish.
    pub(crate) fn next_dirty(&mut self) -> Option<Subject> {
        let subject = self.dirty.pop_front()?;
        self.queued.remove(&subject);
        Some(subject)
    }

    /// Puts `subject` back at the front (its publication could not be queued).
    pub(crate) fn requeue(&mut self, subject: Subject) {
        if self.queued.insert(subject.clone()) {
            self.dirty.push_front(subject);
        }
    }

    /// The latest presence of a tracked user: `Some(None)` when it must be read from the
    /// registry, `None` when the user is not tracked.
    pub(crate) fn user(&self, user: &str) -> Option<Option<&PresenceSnapshot>> {
        self.users.get(user).map(|e| e.truth.as_ref())
    }

    /// A tracked channel's occupancy (`Some(None)`: read it from the registry).
    pub(crate) fn channel(&self, channel: &str) -> Option<Option<u32>> {
        self.channels.get(channel).map(|e| e.occupancy)
    }

    /// Whether `fingerprint` is what this connection last published for `subject`.
    pub(crate) fn is_published(&self, subject: &Subject, fingerprint: u64) -> bool {
        let published = match subject {
            Subject::User(u) => self.users.get(u).and_then(|e| e.published),
            Subject::Channel(c) => self.channels.get(c).and_then(|e| e.published),
        };
        published == Some(fingerprint)
    }

    /// `subject`'s topic now shows `shown` (its fingerprint `fingerprint`). A user whose final
    /// offline state (`truth_offline`) or a channel whose 0 was published is forgotten.
    pub(crate) fn published(&mut self, subject: &Subject, fingerprint: u64, truth_offline: bool) {
        match subject {
            Subject::User(u) => {
                if truth_offline {
                    self.users.remove(u);
                } else if let Some(e) = self.users.get_mut(u) {
                    e.published = Some(fingerprint);
                }
            }
            Subject::Channel(c) => {
                if truth_offline {
                    self.channels.remove(c);
                } else if let Some(e) = self.channels.get_mut(c) {
                    e.published = Some(fingerprint);
                }
            }
        }
    }

    /// Every tracked user whose latest presence is online (for a clean stop).
    pub(crate) fn online_users(&self) -> Vec<String> {
        let mut users: Vec<String> = self
            .users
            .iter()
            .filter(|(_, e)| {
                e.truth
                    .as_ref()
                    .is_some_and(|t| t.availability != Availability::Offline)
            })
            .map(|(u, _)| u.clone())
            .collect();
        users.sort();
        users
    }

    /// Every tracked channel (for a clean stop).
    pub(crate) fn channels(&self) -> Vec<String> {
        let mut channels: Vec<String> = self.channels.keys().cloned().collect();
        channels.sort();
        channels
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Transition;
    use crate::model::{DeviceSnapshot, OfflineReason};

    fn online(user: &str, version: u64) -> PresenceSnapshot {
        let mut p = PresenceSnapshot::offline(user, 0);
        p.availability = Availability::Online;
        p.version = version;
        p.devices.push(DeviceSnapshot {
            device_id: "d".into(),
            platform: "test".into(),
            availability: Availability::Online,
            connected_since_ms: 1,
        });
        p
    }

    fn drain(core: &mut Core) -> Vec<Subject> {
        std::iter::from_fn(|| core.next_dirty()).collect()
    }

    fn user(u: &str) -> Subject {
        Subject::User(u.into())
    }

    #[test]
    fn events_queue_each_subject_once_and_older_versions_lose() {
        let mut core = Core::new(100);
        let on = Transition::UserOnline(online("alice", 5)).into_event();
        assert_eq!(core.apply(&on), Applied::Queued);
        let mut newer = online("alice", 6);
        newer.status = "busy".into();
        assert_eq!(
            core.apply(&Transition::UserUpdated(newer).into_event()),
            Applied::Queued
        );
        assert_eq!(core.apply(&on), Applied::Ignored, "version 5 after 6");
        assert_eq!(drain(&mut core), vec![user("alice")]);
        assert_eq!(core.user("alice").unwrap().unwrap().status, "busy");
        let joined = Transition::MemberJoined {
            channel: "room".into(),
            user: "alice".into(),
            device: "d".into(),
            occupancy: 2,
        }
        .into_event();
        assert_eq!(core.apply(&joined), Applied::Queued);
        assert_eq!(core.channel("room"), Some(Some(2)));
        assert_eq!(
            core.apply(&Event::bare(EventType::SyncRequired, None, 0)),
            Applied::ResyncNeeded
        );
    }

    #[test]
    fn offline_is_published_then_forgotten_and_connect_requeues_everything() {
        let mut core = Core::new(100);
        core.set_user(online("alice", 1));
        core.set_user(online("bob", 1));
        for s in drain(&mut core) {
            core.published(&s, 11, false);
        }
        assert!(core.is_published(&user("alice"), 11));
        let mut gone = online("bob", 2);
        gone.devices.clear();
        let off = Transition::UserOffline {
            presence: gone,
            reason: OfflineReason::Disconnect,
        }
        .into_event();
        core.apply(&off);
        let bob = core.user("bob").unwrap().unwrap();
        assert_eq!(bob.availability, Availability::Offline);
        // The link drops before bob's offline is published: a reconnect queues both again.
        core.connected();
        assert!(!core.is_published(&user("alice"), 11));
        let mut queued = drain(&mut core);
        queued.sort();
        assert_eq!(queued, vec![user("alice"), user("bob")]);
        core.published(&user("bob"), 12, true);
        assert_eq!(core.user("bob"), None, "forgotten once its offline is out");
        assert_eq!(core.online_users(), vec!["alice".to_string()]);
    }

    #[test]
    fn a_full_pass_turns_missing_users_offline_and_missing_channels_empty() {
        let mut core = Core::new(100);
        core.set_user(online("alice", 1));
        core.set_user(online("bob", 1));
        core.set_channel("room", Some(2));
        drain(&mut core);
        let dropped = core.load(vec![online("alice", 1)], vec![("hall".into(), 1)]);
        assert_eq!(dropped, 0);
        let mut queued = drain(&mut core);
        queued.sort();
        assert_eq!(
            queued,
            vec![
                user("alice"),
                user("bob"),
                Subject::Channel("hall".into()),
                Subject::Channel("room".into())
            ]
        );
        assert_eq!(core.user("bob"), Some(None), "read from the registry");
        assert_eq!(core.channel("room"), Some(Some(0)));
    }

    #[test]
    fn retained_topics_of_unknown_subjects_are_corrected_and_known_ones_left_alone() {
        let mut core = Core::new(100);
        core.set_user(online("alice", 1));
        drain(&mut core);
        assert_eq!(core.retained(user("alice")), Applied::Ignored);
        assert_eq!(core.retained(user("ghost")), Applied::Queued);
        assert_eq!(core.retained(user("ghost")), Applied::Ignored);
        assert_eq!(
            core.retained(Subject::Channel("old".into())),
            Applied::Queued
        );
        assert_eq!(core.user("ghost"), Some(None));
        assert_eq!(core.channel("old"), Some(None));
        assert_eq!(core.pending(), 2);
    }

    #[test]
    fn the_subject_cap_holds() {
        let mut core = Core::new(2);
        assert_eq!(core.set_user(online("a", 1)), Applied::Queued);
        assert_eq!(core.set_channel("c", Some(1)), Applied::Queued);
        assert_eq!(core.set_user(online("b", 1)), Applied::Dropped);
        assert_eq!(core.retained(user("x")), Applied::Dropped);
        // Known subjects still update.
        assert_eq!(core.set_user(online("a", 2)), Applied::Queued);
        assert_eq!(core.len(), 2);
        assert_eq!(core.load(vec![online("z", 1)], vec![]), 1);
    }

    #[test]
    fn requeue_puts_a_subject_first() {
        let mut core = Core::new(10);
        core.set_user(online("a", 1));
        core.set_user(online("b", 1));
        let first = core.next_dirty().unwrap();
        core.requeue(first.clone());
        assert_eq!(core.next_dirty(), Some(first));
    }
}
