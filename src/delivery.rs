//! A connection's delivery contract (background mode, `SetDelivery`): which presence events are
//! held instead of sent at once, how they are trimmed, and when the held ones go out as one
//! `PresenceBatch`. Synchronous; the outbound queue keeps a [`Held`] while a batched contract is
//! in force and asks it, on each push and each writer wake-up, what to do. Memory is bounded by
//! the users the connection watches: one held event and one hash per user.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

use prost::Message;

use crate::outbound::Item;
use crate::pb;

/// Which fields a held event keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fields {
    /// Every field.
    All,
    /// User id, availability, last seen, version (and the event's kind and reason).
    Availability,
    /// The same plus the status text.
    AvailabilityAndStatus,
}

impl Fields {
    /// The protobuf value.
    pub fn to_pb(self) -> pb::FieldSelection {
        match self {
            Fields::All => pb::FieldSelection::All,
            Fields::Availability => pb::FieldSelection::Availability,
            Fields::AvailabilityAndStatus => pb::FieldSelection::AvailabilityAndStatus,
        }
    }
}

/// A batched contract.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contract {
    /// At most one batch per this long.
    pub interval: Duration,
    /// What held events keep.
    pub fields: Fields,
    /// Users whose events stay live and complete.
    pub live: HashSet<String>,
}

/// What a batched contract holds.
#[derive(Debug)]
pub struct Held {
    contract: Contract,
    /// The latest untrimmed event per user since the last batch.
    held: HashMap<String, Item>,
    /// When the oldest held event arrived: the next batch is due an interval later.
    since: Option<Instant>,
    /// A hash of the trimmed form last sent per user: an equal one is not sent again.
    sent: HashMap<String, u64>,
    /// Users whose trimmed form went out: their full state is owed when the contract ends.
    trimmed: HashSet<String>,
}

/// Why an event could not be held.
#[derive(Debug, PartialEq, Eq)]
pub struct HeldFull;

impl Held {
    /// Starts holding under `contract`.
    pub fn new(contract: Contract) -> Held {
        Held {
            contract,
            held: HashMap::new(),
            since: None,
            sent: HashMap::new(),
            trimmed: HashSet::new(),
        }
    }

    /// The contract in force.
    pub fn contract(&self) -> &Contract {
        &self.contract
    }

    /// Whether an event about `key` is held: watched users' presence events, not a live user's,
    /// never a directed presence (its key starts with U+0001) or anything else.
    pub fn holds(&self, key: &str, item: &Item) -> bool {
        item.kind == "presence_event"
            && !key.starts_with('\u{1}')
            && !self.contract.live.contains(key)
    }

    /// Holds `item` as `key`'s latest event; `Ok(true)` when it is the first held event (a
    /// batch is now due, the writer should look), `Err` when `limit` users are held already.
    pub fn hold(
        &mut self,
        key: &str,
        item: Item,
        now: Instant,
        limit: usize,
    ) -> Result<bool, HeldFull> {
        if let Some(slot) = self.held.get_mut(key) {
            *slot = item;
            return Ok(false);
        }
        if self.held.len() >= limit.max(1) {
            return Err(HeldFull);
        }
        self.held.insert(key.to_string(), item);
        let first = self.since.is_none();
        self.since.get_or_insert(now);
        Ok(first)
    }

    /// When the next batch is due, if anything is held.
    pub fn due(&self) -> Option<Instant> {
        self.since.map(|t| t + self.contract.interval)
    }

    /// The batch of everything held (trimmed; users whose trimmed form did not change left
    /// out), in frames of bounded size; none when nothing is left to send.
    pub fn flush(&mut self) -> Vec<Item> {
        self.since = None;
        let fields = self.contract.fields;
        let mut events = Vec::with_capacity(self.held.len());
        for (user, item) in self.held.drain() {
            let Some(event) = decode_event(&item) else {
                continue;
            };
            if fields == Fields::All {
                events.push(event);
                continue;
            }
            let event = trim(event, fields);
            let hash = trimmed_hash(&event);
            if self.sent.get(&user) == Some(&hash) {
                continue;
            }
            self.sent.insert(user.clone(), hash);
            self.trimmed.insert(user);
            events.push(event);
        }
        if self.held.capacity() > 64 {
            self.held = HashMap::new();
        }
        batch_items(events, fields)
    }

    /// Ends the contract: the held events (untrimmed, to send in full) and the users whose
    /// trimmed form went out and who are not among them (their full state is owed).
    pub fn finish(self) -> (Vec<pb::PresenceEvent>, Vec<String>) {
        let events: Vec<pb::PresenceEvent> = self.held.values().filter_map(decode_event).collect();
        let owed = self
            .trimmed
            .into_iter()
            .filter(|u| !self.held.contains_key(u))
            .collect();
        (events, owed)
    }
}

fn decode_event(item: &Item) -> Option<pb::PresenceEvent> {
    match pb::ServerFrame::decode_length_delimited(&item.bytes[..])
        .ok()?
        .body
    {
        Some(pb::server_frame::Body::PresenceEvent(e)) => Some(e),
        _ => None,
    }
}

/// `event` with only the fields of `fields`.
pub fn trim(event: pb::PresenceEvent, fields: Fields) -> pb::PresenceEvent {
    if fields == Fields::All {
        return event;
    }
    // The user id and version are the event's: not repeated in a trimmed presence.
    let presence = event.presence.map(|p| pb::Presence {
        availability: p.availability,
        status: if fields == Fields::AvailabilityAndStatus {
            p.status
        } else {
            String::new()
        },
        last_seen_ms: p.last_seen_ms,
        ..Default::default()
    });
    pb::PresenceEvent {
        user_id: event.user_id,
        kind: event.kind,
        presence,
        reason: event.reason,
        version: event.version,
        device_id: String::new(),
    }
}

/// A hash of what a trimmed event shows, leaving out the version and the kind.
fn trimmed_hash(event: &pb::PresenceEvent) -> u64 {
    let mut hasher = DefaultHasher::new();
    if let Some(p) = &event.presence {
        p.availability.hash(&mut hasher);
        p.status.hash(&mut hasher);
        p.last_seen_ms.hash(&mut hasher);
    }
    hasher.finish()
}

/// The most bytes of events one `PresenceBatch` frame carries: a larger batch is split into
/// several frames, so no frame comes near a client's frame cap.
pub const MAX_BATCH_FRAME_BYTES: usize = 256 * 1024;

/// `events` as `PresenceBatch` frames of at most [`MAX_BATCH_FRAME_BYTES`] of events each
/// (a single larger event gets a frame of its own); none for no events.
pub fn batch_items(events: Vec<pb::PresenceEvent>, fields: Fields) -> Vec<Item> {
    let mut items = Vec::new();
    let mut frame: Vec<pb::PresenceEvent> = Vec::new();
    let mut bytes = 0usize;
    for event in events {
        let size = event.encoded_len();
        if !frame.is_empty() && bytes + size > MAX_BATCH_FRAME_BYTES {
            items.push(batch_item(std::mem::take(&mut frame), fields));
            bytes = 0;
        }
        bytes += size;
        frame.push(event);
    }
    if !frame.is_empty() {
        items.push(batch_item(frame, fields));
    }
    items
}

/// `events` as one encoded `PresenceBatch` frame (see [`batch_items`] for frames of bounded size).
pub fn batch_item(events: Vec<pb::PresenceEvent>, fields: Fields) -> Item {
    let frame = pb::ServerFrame {
        request_id: 0,
        body: Some(pb::server_frame::Body::PresenceBatch(pb::PresenceBatch {
            events,
            fields: fields.to_pb() as i32,
        })),
    };
    Item::reply(
        frame.encode_length_delimited_to_vec().into(),
        "presence_batch",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(user: &str, availability: pb::Availability, status: &str, version: u64) -> Item {
        let frame = pb::ServerFrame {
            request_id: 0,
            body: Some(pb::server_frame::Body::PresenceEvent(pb::PresenceEvent {
                user_id: user.into(),
                kind: pb::EventKind::Update as i32,
                presence: Some(pb::Presence {
                    user_id: user.into(),
                    availability: availability as i32,
                    status: status.into(),
                    version,
                    state: [("k".to_string(), "v".to_string())].into(),
                    ..Default::default()
                }),
                version,
                device_id: "phone".into(),
                ..Default::default()
            })),
        };
        Item::event(
            frame.encode_length_delimited_to_vec().into(),
            Instant::now(),
            "presence_event",
        )
    }

    fn batch(item: Item) -> pb::PresenceBatch {
        match pb::ServerFrame::decode_length_delimited(&item.bytes[..])
            .unwrap()
            .body
        {
            Some(pb::server_frame::Body::PresenceBatch(b)) => b,
            other => panic!("{other:?}"),
        }
    }

    fn contract(fields: Fields) -> Contract {
        Contract {
            interval: Duration::from_secs(30),
            fields,
            live: ["fav".to_string()].into(),
        }
    }

    #[test]
    fn holds_coalesces_and_trims_to_the_latest_state() {
        let mut held = Held::new(contract(Fields::Availability));
        let now = Instant::now();
        let e = event("a", pb::Availability::Away, "x", 1);
        assert!(held.holds("a", &e));
        assert!(!held.holds("fav", &e), "live users are not held");
        assert!(
            !held.holds("\u{1}directed:a", &e),
            "directed presence is never held"
        );
        assert_eq!(held.hold("a", e, now, 10), Ok(true));
        assert_eq!(
            held.hold("a", event("a", pb::Availability::Online, "y", 2), now, 10),
            Ok(false)
        );
        assert_eq!(held.due(), Some(now + Duration::from_secs(30)));
        let b = batch(held.flush().remove(0));
        assert_eq!(b.events.len(), 1);
        let p = b.events[0].presence.as_ref().unwrap();
        assert_eq!(
            (p.availability, b.events[0].version),
            (pb::Availability::Online as i32, 2)
        );
        assert!(p.status.is_empty() && p.state.is_empty() && b.events[0].device_id.is_empty());
        assert!(
            p.user_id.is_empty() && p.version == 0,
            "the event carries the user id and version, once"
        );
        assert_eq!(held.due(), None);
    }

    #[test]
    fn an_unchanged_trimmed_form_is_not_sent_again_but_is_owed_in_full() {
        let mut held = Held::new(contract(Fields::AvailabilityAndStatus));
        let now = Instant::now();
        held.hold("a", event("a", pb::Availability::Away, "lunch", 1), now, 10)
            .unwrap();
        assert!(!held.flush().is_empty());
        // Only the state changed: nothing to send under this contract.
        held.hold("a", event("a", pb::Availability::Away, "lunch", 2), now, 10)
            .unwrap();
        assert!(held.flush().is_empty());
        held.hold("b", event("b", pb::Availability::Online, "", 3), now, 10)
            .unwrap();
        let (events, owed) = held.finish();
        assert_eq!(events.len(), 1, "b's held event goes out in full");
        assert_eq!(events[0].presence.as_ref().unwrap().state.len(), 1);
        assert_eq!(owed, ["a"], "a's full state is owed");
    }

    #[test]
    fn holding_is_bounded() {
        let mut held = Held::new(contract(Fields::All));
        let now = Instant::now();
        held.hold("a", event("a", pb::Availability::Away, "", 1), now, 1)
            .unwrap();
        assert_eq!(
            held.hold("b", event("b", pb::Availability::Away, "", 1), now, 1),
            Err(HeldFull)
        );
    }

    #[test]
    fn large_batches_are_split_into_frames_of_bounded_size() {
        let events: Vec<pb::PresenceEvent> = (0..100)
            .map(|i| pb::PresenceEvent {
                user_id: format!("u{i}"),
                presence: Some(pb::Presence {
                    description: "d".repeat(10_000),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .collect();
        let items = batch_items(events, Fields::All);
        assert!(items.len() >= 4, "1 MB of events needs several frames");
        let mut seen = 0;
        for item in &items {
            assert!(item.bytes.len() <= MAX_BATCH_FRAME_BYTES + 64);
            seen += batch(item.clone()).events.len();
        }
        assert_eq!(seen, 100);
        assert!(batch_items(Vec::new(), Fields::All).is_empty());
    }
}
