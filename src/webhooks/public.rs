//! The public view of an endpoint (`show = "public"`): turns the truth the bus reports into
//! what a stranger is shown, for endpoints run by third parties. Synchronous and driven only
//! by what the registry noted under its lock when each event happened ([`Event::public`]), so
//! a batch cut later reads exactly as the moment it describes.
//!
//! - An event with no note passes as reported: privacy changed nothing a stranger sees.
//! - A user event with a note is replaced by what a stranger is shown (`user.online`,
//!   `user.updated`, `user.offline`, or nothing while they look offline); it keeps the
//!   event's id and `seq`.
//! - Device and channel events about a hidden user are left out; channel events carry the
//!   occupancy a stranger is shown, and `channel.occupied` / `channel.vacated` follow it.
//! - A `user.updated` that changes nothing a stranger is shown (a change an invisible device
//!   made, say) is left out.
//! - A privacy change (a marker queued by the registry's settings listener, with the note of
//!   what a stranger is shown now, the user's settings or a device's invisibility) tells what
//!   it changed: `channel.member.left` for each membership it hides, then the user event
//!   (`user.offline` with reason `disconnect`, or `user.updated`, or `user.online`), then
//!   `channel.member.joined` for each membership it reveals, exactly as a real departure or
//!   arrival reads. These have `seq` 0 and the id
//!   `public-<user>-<version>[-<channel>-<device>-left|joined]`.
//!
//! What it remembers is bounded by what the broker holds: the users it told online and what
//! it told of them (at most the online users, which `limits.max_connections` bounds), the
//! memberships it told (at most the broker's memberships) and the channels it told occupied
//! (at most the occupied channels).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use crate::events::{Event, EventType, PresenceJson, PublicNote};

/// What the endpoint has been told, and the rules that turn truth into the public view.
#[derive(Debug, Default)]
pub struct PublicView {
    /// Users the endpoint was last told are online, with what it was told (`None`: an event
    /// that passed as reported without a presence).
    online: HashMap<String, Option<PresenceJson>>,
    /// Memberships the endpoint was told of: (user, channel, device).
    members: BTreeSet<(String, String, String)>,
    /// Channels the endpoint was last told are occupied.
    occupied: HashSet<String>,
}

/// A queued marker: `user`'s privacy settings changed, and `public` is what a stranger is
/// shown of them now (never sent as is).
pub fn marker(user: &str, public: &PublicNote) -> Event {
    Event {
        ts_ms: crate::now_ms(),
        public: Some(Box::new(public.clone())),
        ..Event::bare(EventType::UserUpdated, Some(user.to_string()), 0)
    }
}

fn is_marker(e: &Event) -> bool {
    e.kind == EventType::UserUpdated && e.presence.is_none() && e.seq == 0
}

impl PublicView {
    /// The public view of `events`, in order; no event leaves it with a note.
    pub fn apply(&mut self, events: Vec<Arc<Event>>) -> Vec<Arc<Event>> {
        let mut out = Vec::with_capacity(events.len());
        for event in events {
            self.one(event, &mut out);
        }
        out.into_iter()
            .map(|e| match e.public {
                Some(_) => Arc::new(Event {
                    public: None,
                    ..(*e).clone()
                }),
                None => e,
            })
            .collect()
    }

    fn one(&mut self, e: Arc<Event>, out: &mut Vec<Arc<Event>>) {
        let user = e.user.clone().unwrap_or_default();
        let channel = e.channel.clone().unwrap_or_default();
        let note = e.public.as_deref();
        let hidden = note.is_some_and(|n| n.hidden);
        match e.kind {
            // A view starts with its process: there is nothing before a `server.started` of
            // its own to forget, and another node's (cluster mode) voids nothing here.
            EventType::ServerStarted | EventType::SyncRequired => out.push(e),
            EventType::UserUpdated if is_marker(&e) => {
                if let Some(note) = note {
                    self.privacy_changed(&user, note, e.ts_ms, out);
                }
            }
            EventType::UserOnline | EventType::UserUpdated | EventType::UserOffline => {
                let Some(shown) = note.and_then(|n| n.presence.as_ref()) else {
                    if e.kind == EventType::UserOffline {
                        self.online.remove(&user);
                    } else {
                        self.online.insert(user, e.presence.clone());
                    }
                    out.push(e);
                    return;
                };
                let reason = match e.kind {
                    EventType::UserOffline => e.reason.clone(),
                    _ => Some("disconnect".to_string()),
                };
                if let Some(mut told) = self.tell(shown, reason) {
                    told.id.clone_from(&e.id);
                    told.seq = e.seq;
                    told.ts_ms = e.ts_ms;
                    told.node.clone_from(&e.node);
                    out.push(Arc::new(told));
                }
            }
            EventType::DeviceConnected | EventType::DeviceDisconnected => {
                if !hidden {
                    out.push(e);
                }
            }
            EventType::ChannelOccupied => {
                if !hidden && self.occupied.insert(channel) {
                    out.push(Arc::new(Event {
                        occupancy: note.and_then(|n| n.occupancy).or(e.occupancy),
                        ..(*e).clone()
                    }));
                }
            }
            EventType::ChannelVacated => {
                if self.occupied.remove(&channel) || !hidden {
                    out.push(e);
                }
            }
            EventType::MemberJoined | EventType::MemberLeft => {
                if hidden {
                    return;
                }
                let joined = e.kind == EventType::MemberJoined;
                let key = (user, channel.clone(), e.device.clone().unwrap_or_default());
                if joined {
                    self.members.insert(key);
                } else {
                    self.members.remove(&key);
                }
                let Some(occupancy) = note.and_then(|n| n.occupancy) else {
                    if joined {
                        self.occupied.insert(channel);
                    }
                    out.push(e);
                    return;
                };
                // Hidden members differ the count. A join is when a stranger sees the channel
                // occupied if hidden members occupied it first (the truth's
                // `channel.occupied` was left out); a leave that leaves only hidden members
                // is when they see it vacated (the truth's `channel.vacated` comes later).
                if joined && self.occupied.insert(channel.clone()) {
                    out.push(Arc::new(Event {
                        id: format!("{}-occupied", e.id),
                        kind: EventType::ChannelOccupied,
                        occupancy: Some(occupancy.max(1)),
                        device: None,
                        reason: None,
                        ..(*e).clone()
                    }));
                }
                let vacated = !joined && occupancy == 0 && self.occupied.remove(&channel);
                out.push(Arc::new(Event {
                    occupancy: Some(occupancy),
                    ..(*e).clone()
                }));
                if vacated {
                    out.push(Arc::new(Event {
                        id: format!("{}-vacated", e.id),
                        kind: EventType::ChannelVacated,
                        occupancy: Some(0),
                        device: None,
                        reason: None,
                        ..(*e).clone()
                    }));
                }
            }
        }
    }

    /// The event that moves the endpoint's view of `shown.user` to `shown`, if any.
    fn tell(&mut self, shown: &PresenceJson, reason: Option<String>) -> Option<Event> {
        let user = &shown.user;
        let online = shown.availability != "offline";
        let kind = match (self.online.get(user), online) {
            (None, false) => return None,
            (Some(_), false) => EventType::UserOffline,
            (None, true) => EventType::UserOnline,
            (Some(Some(told)), true) if same_but_version(told, shown) => return None,
            (Some(_), true) => EventType::UserUpdated,
        };
        if online {
            self.online.insert(user.clone(), Some(shown.clone()));
        } else {
            self.online.remove(user);
        }
        let mut event = Event {
            presence: Some(shown.clone()),
            ..Event::bare(kind, Some(user.clone()), shown.version)
        };
        if !online {
            event.reason = reason;
            event.last_seen_ms = Some(shown.last_seen_ms);
        }
        Some(event)
    }

    /// A marker: `user`'s settings or a device's invisibility changed. Tells what a stranger
    /// is shown change: the memberships it hides, the user, the memberships it reveals, in
    /// the order a real departure or arrival reads.
    fn privacy_changed(
        &mut self,
        user: &str,
        note: &PublicNote,
        ts_ms: u64,
        out: &mut Vec<Arc<Event>>,
    ) {
        let Some(shown) = &note.presence else {
            return;
        };
        let online = shown.availability != "offline";
        let id = format!("public-{user}-{}", shown.version);
        let target: BTreeSet<(String, String)> = if note.hidden || !online {
            BTreeSet::new()
        } else {
            note.memberships
                .iter()
                .filter(|m| !m.hidden)
                .map(|m| (m.channel.clone(), m.device.clone()))
                .collect()
        };
        let current: BTreeSet<(String, String)> = self
            .members
            .range((user.to_string(), String::new(), String::new())..)
            .take_while(|(u, _, _)| u == user)
            .map(|(_, c, d)| (c.clone(), d.clone()))
            .collect();
        let base = |kind: EventType, id: String, channel: &str, occupancy: u32| Event {
            id,
            ts_ms,
            channel: Some(channel.to_string()),
            occupancy: Some(occupancy),
            ..Event::bare(kind, Some(user.to_string()), 0)
        };
        let mut departures = Vec::new();
        for (channel, device) in current.difference(&target) {
            self.members
                .remove(&(user.to_string(), channel.clone(), device.clone()));
            let occupancy = self.occupancy(note, channel);
            departures.push(Event {
                device: Some(device.clone()),
                reason: Some("leave".to_string()),
                ..base(
                    EventType::MemberLeft,
                    format!("{id}-{channel}-{device}-left"),
                    channel,
                    occupancy,
                )
            });
            if occupancy == 0 && self.occupied.remove(channel) {
                departures.push(base(
                    EventType::ChannelVacated,
                    format!("{id}-{channel}-vacated"),
                    channel,
                    0,
                ));
            }
        }
        let mut arrivals = Vec::new();
        for (channel, device) in target.difference(&current) {
            self.members
                .insert((user.to_string(), channel.clone(), device.clone()));
            let occupancy = self.occupancy(note, channel);
            if self.occupied.insert(channel.clone()) {
                arrivals.push(base(
                    EventType::ChannelOccupied,
                    format!("{id}-{channel}-occupied"),
                    channel,
                    occupancy.max(1),
                ));
            }
            arrivals.push(Event {
                device: Some(device.clone()),
                ..base(
                    EventType::MemberJoined,
                    format!("{id}-{channel}-{device}-joined"),
                    channel,
                    occupancy,
                )
            });
        }
        out.extend(departures.into_iter().map(Arc::new));
        if let Some(mut told) = self.tell(shown, Some("disconnect".to_string())) {
            told.id = id;
            told.ts_ms = ts_ms;
            out.push(Arc::new(told));
        }
        out.extend(arrivals.into_iter().map(Arc::new));
    }

    /// `channel`'s occupancy as a stranger is shown it: the marker's, else the distinct users
    /// the endpoint was told are in it.
    fn occupancy(&self, note: &PublicNote, channel: &str) -> u32 {
        note.memberships
            .iter()
            .find(|m| m.channel == channel)
            .map(|m| m.occupancy)
            .unwrap_or_else(|| {
                self.members
                    .iter()
                    .filter(|(_, c, _)| c == channel)
                    .map(|(u, _, _)| u)
                    .collect::<HashSet<_>>()
                    .len() as u32
            })
    }
}

/// Equal but for the version.
fn same_but_version(a: &PresenceJson, b: &PresenceJson) -> bool {
    PresenceJson {
        version: b.version,
        ..a.clone()
    } == *b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::PublicMembership;
    use crate::model::{Availability, PresenceSnapshot};

    fn json(user: &str, online: bool, version: u64) -> PresenceJson {
        let mut p = PresenceSnapshot::offline(user, if online { 0 } else { 5 });
        if online {
            p.availability = Availability::Online;
        }
        p.version = version;
        PresenceJson::from(&p)
    }

    fn user_event(kind: EventType, user: &str, seq: u64, note: Option<PublicNote>) -> Arc<Event> {
        let truth = json(user, kind != EventType::UserOffline, seq);
        Arc::new(Event {
            id: format!("e-{seq}"),
            seq,
            presence: Some(truth),
            public: note.map(Box::new),
            ..Event::bare(kind, Some(user.into()), seq)
        })
    }

    fn shown(user: &str, online: bool, version: u64) -> Option<PublicNote> {
        Some(PublicNote {
            hidden: !online,
            presence: Some(json(user, online, version)),
            ..PublicNote::default()
        })
    }

    fn member(
        kind: EventType,
        user: &str,
        occupancy: u32,
        seq: u64,
        note: Option<PublicNote>,
    ) -> Arc<Event> {
        Arc::new(Event {
            id: format!("e-{seq}"),
            seq,
            channel: Some("room".into()),
            device: Some("d".into()),
            occupancy: Some(occupancy),
            public: note.map(Box::new),
            ..Event::bare(kind, Some(user.into()), 0)
        })
    }

    fn counted(hidden: bool, occupancy: u32) -> Option<PublicNote> {
        Some(PublicNote {
            hidden,
            occupancy: Some(occupancy),
            ..PublicNote::default()
        })
    }

    fn kinds(events: &[Arc<Event>]) -> Vec<(EventType, String, Option<u32>)> {
        events
            .iter()
            .map(|e| (e.kind, e.user.clone().unwrap_or_default(), e.occupancy))
            .collect()
    }

    #[test]
    fn events_without_a_note_pass_untouched_and_hidden_users_look_offline() {
        let mut view = PublicView::default();
        let input = vec![
            user_event(EventType::UserOnline, "a", 1, None),
            user_event(EventType::UserOnline, "h", 2, shown("h", false, 1)),
            user_event(EventType::UserUpdated, "h", 3, shown("h", false, 1)),
            member(EventType::MemberJoined, "h", 1, 4, counted(true, 0)),
            user_event(EventType::UserOffline, "h", 5, shown("h", false, 1)),
        ];
        let out = view.apply(input.clone());
        assert_eq!(out.len(), 1, "{out:?}");
        assert!(
            Arc::ptr_eq(&out[0], &input[0]),
            "an unnoted event is passed as is"
        );
    }

    #[test]
    fn no_event_leaves_the_view_with_a_note() {
        // Found by the event_log fuzz target: a note that changes nothing (as a garbled or
        // foreign log entry may carry) rode along on a passed-through event.
        let mut view = PublicView::default();
        let idle = || {
            Some(PublicNote {
                hidden: false,
                ..PublicNote::default()
            })
        };
        let out = view.apply(vec![
            member(EventType::MemberJoined, "a", 1, 1, idle()),
            Arc::new(Event {
                id: "e-2".into(),
                seq: 2,
                device: Some("d".into()),
                public: idle().map(Box::new),
                ..Event::bare(EventType::DeviceConnected, Some("a".into()), 1)
            }),
        ]);
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|e| e.public.is_none()), "{out:?}");
    }

    #[test]
    fn going_invisible_reads_as_leaving_and_disconnecting_and_back() {
        let mut view = PublicView::default();
        let out = view.apply(vec![
            user_event(EventType::UserOnline, "u", 1, None),
            member(EventType::MemberJoined, "u", 1, 2, None),
        ]);
        assert_eq!(out.len(), 2);
        let away = PublicNote {
            hidden: true,
            presence: Some(json("u", false, 7)),
            memberships: vec![PublicMembership {
                channel: "room".into(),
                device: "d".into(),
                occupancy: 0,
                hidden: true,
            }],
            ..PublicNote::default()
        };
        let out = view.apply(vec![Arc::new(marker("u", &away))]);
        assert_eq!(
            kinds(&out),
            vec![
                (EventType::MemberLeft, "u".into(), Some(0)),
                (EventType::ChannelVacated, "u".into(), Some(0)),
                (EventType::UserOffline, "u".into(), None),
            ]
        );
        assert_eq!(out[2].reason.as_deref(), Some("disconnect"));
        assert_eq!(out[2].last_seen_ms, Some(5));
        assert_eq!((out[2].seq, out[2].id.as_str()), (0, "public-u-7"));
        assert!(out.iter().all(|e| e.public.is_none()));
        // The same marker again, or the hidden user's own changes, tell nothing.
        let out = view.apply(vec![
            Arc::new(marker("u", &away)),
            user_event(EventType::UserUpdated, "u", 4, shown("u", false, 7)),
            member(EventType::MemberLeft, "u", 0, 5, counted(true, 0)),
        ]);
        assert!(out.is_empty(), "{out:?}");
        let back = PublicNote {
            hidden: false,
            presence: Some(json("u", true, 9)),
            memberships: vec![PublicMembership {
                channel: "attic".into(),
                device: "d".into(),
                occupancy: 1,
                hidden: false,
            }],
            ..PublicNote::default()
        };
        let out = view.apply(vec![Arc::new(marker("u", &back))]);
        assert_eq!(
            kinds(&out),
            vec![
                (EventType::UserOnline, "u".into(), None),
                (EventType::ChannelOccupied, "u".into(), Some(1)),
                (EventType::MemberJoined, "u".into(), Some(1)),
            ]
        );
        assert_eq!(out[0].presence.as_ref().map(|p| p.version), Some(9));
    }

    #[test]
    fn an_update_a_stranger_cannot_see_is_left_out() {
        // What an invisible device changes (its availability, say) leaves the shown
        // projection as it was: a stranger is told nothing, not even a new version.
        let mut view = PublicView::default();
        let out = view.apply(vec![user_event(EventType::UserOnline, "u", 1, None)]);
        assert_eq!(out.len(), 1);
        let same = Some(PublicNote {
            presence: Some(json("u", true, 1)),
            ..PublicNote::default()
        });
        let out = view.apply(vec![
            user_event(EventType::UserUpdated, "u", 2, same.clone()),
            user_event(EventType::UserUpdated, "u", 3, same),
        ]);
        assert!(out.is_empty(), "{out:?}");
        // A device flip that shows a membership: the join is told, the user once.
        let flip = PublicNote {
            presence: Some(json("u", true, 4)),
            memberships: vec![PublicMembership {
                channel: "room".into(),
                device: "t".into(),
                occupancy: 1,
                hidden: false,
            }],
            ..PublicNote::default()
        };
        let out = view.apply(vec![
            Arc::new(marker("u", &flip)),
            user_event(EventType::UserUpdated, "u", 5, shown("u", true, 4)),
        ]);
        assert_eq!(
            kinds(&out),
            vec![
                (EventType::ChannelOccupied, "u".into(), Some(1)),
                (EventType::MemberJoined, "u".into(), Some(1)),
            ]
        );
        // Hidden again: it leaves.
        let hide = PublicNote {
            memberships: vec![PublicMembership {
                hidden: true,
                occupancy: 0,
                ..flip.memberships[0].clone()
            }],
            ..flip
        };
        let out = view.apply(vec![Arc::new(marker("u", &hide))]);
        assert_eq!(
            kinds(&out),
            vec![
                (EventType::MemberLeft, "u".into(), Some(0)),
                (EventType::ChannelVacated, "u".into(), Some(0)),
            ]
        );
    }

    #[test]
    fn occupancy_leaves_hidden_members_out() {
        let mut view = PublicView::default();
        // h occupies the room while hidden: nothing.
        let occupied = |user: &str, seq: u64, note: Option<PublicNote>| {
            Arc::new(Event {
                id: format!("e-{seq}"),
                seq,
                channel: Some("room".into()),
                occupancy: Some(1),
                public: note.map(Box::new),
                ..Event::bare(EventType::ChannelOccupied, Some(user.into()), 0)
            })
        };
        let out = view.apply(vec![
            occupied("h", 1, counted(true, 0)),
            member(EventType::MemberJoined, "h", 1, 2, counted(true, 0)),
        ]);
        assert!(out.is_empty());
        // a joins: the room is occupied for a stranger, with one user in it.
        let out = view.apply(vec![member(
            EventType::MemberJoined,
            "a",
            2,
            3,
            counted(false, 1),
        )]);
        assert_eq!(
            kinds(&out),
            vec![
                (EventType::ChannelOccupied, "a".into(), Some(1)),
                (EventType::MemberJoined, "a".into(), Some(1))
            ]
        );
        // a leaves while h stays: left with occupancy 0, then vacated; h's vacate later: nothing.
        let out = view.apply(vec![member(
            EventType::MemberLeft,
            "a",
            1,
            4,
            counted(false, 0),
        )]);
        assert_eq!(
            kinds(&out),
            vec![
                (EventType::MemberLeft, "a".into(), Some(0)),
                (EventType::ChannelVacated, "a".into(), Some(0))
            ]
        );
        let vacated = Arc::new(Event {
            id: "e-5".into(),
            seq: 5,
            channel: Some("room".into()),
            public: counted(true, 0).map(Box::new),
            ..Event::bare(EventType::ChannelVacated, Some("h".into()), 0)
        });
        assert!(view.apply(vec![vacated]).is_empty());
    }
}
