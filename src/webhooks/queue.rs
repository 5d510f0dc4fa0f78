//! One endpoint's bounded event queue: the synchronous core of webhook delivery. It owns the
//! filter, the coalescing of `user.updated`, the full-queue policy (compact to each subject's
//! newest event, then drop the oldest), the accounting of lost events and the `sync.required`
//! event that reports them, and cutting batches. No clock of its own, no I/O, no `.await`:
//! [`EventQueue::push`] runs under the event bus lock and is O(1) amortized.
//!
//! Positions are absolute (`base` + index); removing an event from the middle leaves a
//! tombstone, and tombstones are swept once they outnumber the live events, so memory stays
//! within a constant factor of the capacity.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use crate::events::{Event, EventType};

/// Events lost since the last `sync.required` was cut into a batch.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Lost {
    /// How many.
    dropped: u64,
    /// The lowest `seq` lost and that event's id and node (the id prefixes the
    /// `sync.required` id, so it is unique across restarts).
    first: Option<(u64, String, Option<String>)>,
}

impl Lost {
    fn record(&mut self, event: &Event) {
        self.dropped += 1;
        if self
            .first
            .as_ref()
            .is_none_or(|(seq, _, _)| event.seq < *seq)
        {
            self.first = Some((event.seq, event.id.clone(), event.node.clone()));
        }
    }

    /// Folds an undelivered `sync.required` back in (its batch was given up).
    fn absorb(&mut self, sync: &Event) {
        self.dropped += sync.dropped.unwrap_or(0);
        if let Some(seq) = sync.first_lost_seq {
            if self.first.as_ref().is_none_or(|(s, _, _)| seq < *s) {
                // The id of a sync.required is `<first lost id>-sync-<n>`.
                let id = sync
                    .id
                    .rsplit_once("-sync-")
                    .map_or(sync.id.as_str(), |(id, _)| id);
                self.first = Some((seq, id.to_string(), sync.node.clone()));
            }
        }
    }
}

/// What a push did, for the caller's metrics and wake-ups.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pushed {
    /// The event was queued (false: filtered out, or the endpoint is disabled).
    pub(crate) queued: bool,
    /// Older pending events of the same subject removed to make room, plus the oldest
    /// events dropped when that was not enough.
    pub(crate) dropped: u64,
    /// A pending `user.updated` replaced by this one.
    pub(crate) coalesced: bool,
    /// Events pending after the push.
    pub(crate) depth: usize,
}

/// A batch cut from the queue, with the id it keeps on every retry.
#[derive(Debug, Clone)]
pub(crate) struct Cut {
    /// `msg_<first event id>_<last seq>`.
    pub(crate) id: String,
    /// `sync.required` first when events were lost, then queued events, oldest first.
    pub(crate) events: Vec<Arc<Event>>,
}

/// A bounded queue of events for one endpoint; see the module doc.
#[derive(Debug)]
pub(crate) struct EventQueue {
    /// Types this endpoint asked for (`server.started` and `sync.required` always pass).
    wanted: HashSet<EventType>,
    /// Most live events held.
    capacity: usize,
    /// Events in arrival order; `None` is a removed event (a tombstone).
    slots: VecDeque<Option<Arc<Event>>>,
    /// Absolute position of `slots[0]`.
    base: u64,
    /// Live (non-tombstone) events in `slots`.
    live: usize,
    /// Positions of the live events of each subject key, oldest first.
    by_key: HashMap<String, VecDeque<u64>>,
    /// Subject keys with more than one live event: what compaction would shrink.
    crowded: HashSet<String>,
    /// Position of the pending `user.updated` of each user (at most one each).
    updated: HashMap<String, u64>,
    /// Lost events not yet reported by a `sync.required`.
    lost: Lost,
    /// `sync.required` events cut so far (numbers their ids).
    syncs: u64,
    /// When the oldest pending work arrived (drives the linger).
    first_pending_at: Option<Instant>,
    /// No longer accepting (410 Gone, or an unusable URL).
    disabled: bool,
}

/// A `user.updated` with its presence: a newer one of the same user replaces it. (A public
/// endpoint's privacy marker has none and is never replaced: it tells a flip.)
fn coalesces(event: &Event) -> bool {
    event.kind == EventType::UserUpdated && event.presence.is_some()
}

impl EventQueue {
    /// An empty queue holding at most `capacity` events (at least 1) of the `wanted` types.
    pub(crate) fn new(capacity: usize, wanted: &[EventType]) -> EventQueue {
        EventQueue {
            wanted: wanted.iter().copied().collect(),
            capacity: capacity.max(1),
            slots: VecDeque::new(),
            base: 0,
            live: 0,
            by_key: HashMap::new(),
            crowded: HashSet::new(),
            updated: HashMap::new(),
            lost: Lost::default(),
            syncs: 0,
            first_pending_at: None,
            disabled: false,
        }
    }

    /// Events pending (not counting a `sync.required` still to be cut).
    pub(crate) fn len(&self) -> usize {
        self.live
    }

    /// Events lost and not yet reported.
    #[cfg(test)]
    pub(crate) fn unreported_losses(&self) -> u64 {
        self.lost.dropped
    }

    /// When the oldest pending work (an event, or losses to report) arrived; `None` when
    /// there is nothing to send.
    pub(crate) fn pending_since(&self) -> Option<Instant> {
        self.first_pending_at
    }

    /// True once [`EventQueue::disable`] ran.
    #[cfg(test)]
    pub(crate) fn is_disabled(&self) -> bool {
        self.disabled
    }

    /// Whether this endpoint wants `kind`.
    pub(crate) fn wants(&self, kind: EventType) -> bool {
        kind.always() || self.wanted.contains(&kind)
    }

    /// Queues `event` (if wanted and enabled), coalescing a pending `user.updated` of the same
    /// user and making room when full. Never blocks; O(1) amortized.
    pub(crate) fn push(&mut self, event: &Arc<Event>, now: Instant) -> Pushed {
        let mut out = Pushed {
            depth: self.live,
            ..Pushed::default()
        };
        if self.disabled || !self.wants(event.kind) {
            return out;
        }
        if coalesces(event) {
            if let Some(pos) = event.user.as_deref().and_then(|u| self.updated.get(u)) {
                // The newer state supersedes the pending one; it goes at the end so the
                // user's events stay in version order.
                let pos = *pos;
                self.remove(pos);
                out.coalesced = true;
            }
        }
        self.append(event.clone());
        if self.first_pending_at.is_none() {
            self.first_pending_at = Some(now);
        }
        if self.live > self.capacity {
            out.dropped += self.compact();
        }
        while self.live > self.capacity {
            match self.drop_oldest() {
                Some(()) => out.dropped += 1,
                None => break,
            }
        }
        self.sweep_if_sparse();
        out.queued = true;
        out.depth = self.live;
        out
    }

    /// Cuts the next batch of at most `max` events (at least 1): a `sync.required` first when
    /// events were lost since the last one, then the oldest pending events. `None` when there
    /// is nothing to send. `now_ms` stamps the `sync.required`.
    pub(crate) fn cut(&mut self, max: usize, now: Instant, now_ms: u64) -> Option<Cut> {
        let max = max.max(1);
        let mut events = Vec::with_capacity(max.min(self.live + 1));
        if self.lost.dropped > 0 {
            events.push(Arc::new(self.sync_required(now_ms)));
        }
        while events.len() < max {
            let Some(event) = self.pop_front() else {
                break;
            };
            events.push(event);
        }
        self.first_pending_at = if self.live == 0 {
            None
        } else {
            // The rest has waited at least as long as the batch just cut: no new linger.
            self.first_pending_at.or(Some(now))
        };
        self.sweep_if_sparse();
        let first = events.first()?;
        let last_seq = events.iter().map(|e| e.seq).max().unwrap_or(0);
        Some(Cut {
            id: format!("msg_{}_{last_seq}", first.id),
            events,
        })
    }

    /// Counts `events` (a batch given up or refused) as lost, to be reported by the next
    /// `sync.required`; a `sync.required` among them is folded back in. Returns how many
    /// events were newly lost (not counting those a folded `sync.required` reported).
    pub(crate) fn lose(&mut self, events: &[Arc<Event>], now: Instant) -> u64 {
        let mut newly = 0;
        for event in events {
            if event.kind == EventType::SyncRequired && event.seq == 0 {
                self.lost.absorb(event);
            } else {
                self.lost.record(event);
                newly += 1;
            }
        }
        if self.lost.dropped > 0 && self.first_pending_at.is_none() {
            self.first_pending_at = Some(now);
        }
        newly
    }

    /// Stops accepting events and empties the queue; returns how many events were pending.
    pub(crate) fn disable(&mut self) -> u64 {
        self.disabled = true;
        let pending = self.live as u64;
        self.slots.clear();
        self.by_key.clear();
        self.crowded.clear();
        self.updated.clear();
        self.live = 0;
        self.lost = Lost::default();
        self.first_pending_at = None;
        pending
    }

    fn sync_required(&mut self, now_ms: u64) -> Event {
        let lost = std::mem::take(&mut self.lost);
        self.syncs += 1;
        let (first_seq, first_id, node) = lost.first.unwrap_or((0, "lost".into(), None));
        Event {
            id: format!("{first_id}-sync-{}", self.syncs),
            ts_ms: now_ms,
            node,
            dropped: Some(lost.dropped),
            first_lost_seq: Some(first_seq),
            ..Event::bare(EventType::SyncRequired, None, 0)
        }
    }

    fn append(&mut self, event: Arc<Event>) {
        let pos = self.base + self.slots.len() as u64;
        if let Some(key) = event.subject_key() {
            let positions = self.by_key.entry(key.to_string()).or_default();
            positions.push_back(pos);
            if positions.len() == 2 {
                self.crowded.insert(key.to_string());
            }
        }
        if coalesces(&event) {
            if let Some(user) = &event.user {
                self.updated.insert(user.clone(), pos);
            }
        }
        self.slots.push_back(Some(event));
        self.live += 1;
    }

    /// Takes the event at `pos` out of every index and leaves a tombstone.
    fn remove(&mut self, pos: u64) -> Option<Arc<Event>> {
        let index = usize::try_from(pos.checked_sub(self.base)?).ok()?;
        let event = self.slots.get_mut(index)?.take()?;
        self.live -= 1;
        self.forget(&event, pos);
        self.trim_front();
        Some(event)
    }

    fn forget(&mut self, event: &Event, pos: u64) {
        if let Some(key) = event.subject_key() {
            if let Some(positions) = self.by_key.get_mut(key) {
                if positions.front() == Some(&pos) {
                    positions.pop_front();
                } else if let Some(i) = positions.iter().position(|&p| p == pos) {
                    positions.remove(i);
                }
                match positions.len() {
                    0 => {
                        self.by_key.remove(key);
                        self.crowded.remove(key);
                    }
                    1 => {
                        self.crowded.remove(key);
                    }
                    _ => {}
                }
            }
        }
        if event.kind == EventType::UserUpdated {
            if let Some(user) = event.user.as_deref() {
                if self.updated.get(user) == Some(&pos) {
                    self.updated.remove(user);
                }
            }
        }
    }

    fn trim_front(&mut self) {
        while let Some(None) = self.slots.front() {
            self.slots.pop_front();
            self.base += 1;
        }
    }

    fn pop_front(&mut self) -> Option<Arc<Event>> {
        self.trim_front();
        let pos = self.base;
        let event = self.slots.pop_front()??;
        self.base += 1;
        self.live -= 1;
        self.forget(&event, pos);
        self.trim_front();
        Some(event)
    }

    /// Keeps only the newest pending event of each subject key; returns how many went.
    /// Costs the number of events removed (the crowded keys are tracked).
    fn compact(&mut self) -> u64 {
        let mut removed = 0;
        for key in std::mem::take(&mut self.crowded) {
            let Some(positions) = self.by_key.get_mut(&key) else {
                continue;
            };
            let newest = positions.pop_back();
            let older: Vec<u64> = positions.drain(..).collect();
            positions.extend(newest);
            for pos in older {
                let Some(index) = usize::try_from(pos - self.base).ok() else {
                    continue;
                };
                if let Some(event) = self.slots.get_mut(index).and_then(Option::take) {
                    self.live -= 1;
                    removed += 1;
                    if event.kind == EventType::UserUpdated {
                        if let Some(user) = event.user.as_deref() {
                            if self.updated.get(user) == Some(&pos) {
                                self.updated.remove(user);
                            }
                        }
                    }
                    self.lost.record(&event);
                }
            }
        }
        self.trim_front();
        removed
    }

    /// Drops the oldest pending event that has a subject (a pending `server.started` is
    /// kept); the oldest of all when none has. `None` when the queue is empty.
    fn drop_oldest(&mut self) -> Option<()> {
        self.trim_front();
        let index = self
            .slots
            .iter()
            .position(|s| s.as_ref().is_some_and(|e| e.subject_key().is_some()))
            .or_else(|| self.slots.iter().position(Option::is_some))?;
        let pos = self.base + index as u64;
        let event = self.remove(pos)?;
        self.lost.record(&event);
        Some(())
    }

    /// Rebuilds the slots without tombstones once those outnumber the live events.
    fn sweep_if_sparse(&mut self) {
        let tombstones = self.slots.len() - self.live;
        if tombstones <= self.live.max(64) {
            return;
        }
        let events: Vec<Arc<Event>> = self.slots.drain(..).flatten().collect();
        self.base += (tombstones + self.live) as u64;
        self.by_key.clear();
        self.crowded.clear();
        self.updated.clear();
        self.live = 0;
        for event in events {
            self.append(event);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    const ALL: [EventType; 11] = EventType::ALL;

    /// Numbers events like the bus does (epoch `e`).
    struct Bus(u64);

    impl Bus {
        fn ev(&mut self, kind: EventType, user: &str, version: u64) -> Arc<Event> {
            self.0 += 1;
            let presence = (kind == EventType::UserUpdated).then(|| {
                crate::events::PresenceJson::from(&crate::model::PresenceSnapshot::offline(user, 0))
            });
            let user = (!user.is_empty()).then(|| user.to_string());
            Arc::new(Event {
                id: format!("e-{}", self.0),
                seq: self.0,
                ts_ms: 1000 + self.0,
                presence,
                ..Event::bare(kind, user, version)
            })
        }
    }

    fn kinds(cut: &Cut) -> Vec<(EventType, Option<String>, u64)> {
        cut.events
            .iter()
            .map(|e| (e.kind, e.user.clone(), e.version))
            .collect()
    }

    fn drain(q: &mut EventQueue) -> Vec<Arc<Event>> {
        let mut all = Vec::new();
        while let Some(cut) = q.cut(7, Instant::now(), 5) {
            all.extend(cut.events);
        }
        all
    }

    #[test]
    fn filters_keep_wanted_types_and_always_pass_server_events() {
        let mut bus = Bus(0);
        let mut q = EventQueue::new(100, &[EventType::UserOnline]);
        let now = Instant::now();
        assert!(q.push(&bus.ev(EventType::ServerStarted, "", 0), now).queued);
        assert!(q.push(&bus.ev(EventType::UserOnline, "a", 1), now).queued);
        assert!(!q.push(&bus.ev(EventType::UserUpdated, "a", 2), now).queued);
        assert!(
            !q.push(&bus.ev(EventType::ChannelOccupied, "a", 0), now)
                .queued
        );
        assert_eq!(q.len(), 2);
        let cut = q.cut(10, now, 0).unwrap();
        assert_eq!(cut.id, "msg_e-1_2");
        assert_eq!(cut.events.len(), 2);
        assert!(q.cut(10, now, 0).is_none());
        assert_eq!(q.pending_since(), None);
    }

    #[test]
    fn a_privacy_marker_is_never_replaced_nor_replaces() {
        let mut q = EventQueue::new(100, &ALL);
        let mut bus = Bus(0);
        let now = Instant::now();
        let marker = Arc::new(crate::webhooks::public::marker(
            "a",
            &crate::events::PublicNote::default(),
        ));
        q.push(&bus.ev(EventType::UserUpdated, "a", 1), now);
        assert!(!q.push(&marker, now).coalesced);
        // The newer update replaces the older one, never the marker.
        assert!(
            q.push(&bus.ev(EventType::UserUpdated, "a", 2), now)
                .coalesced
        );
        let cut = q.cut(10, now, 0).unwrap();
        assert_eq!(cut.events.len(), 2);
        assert!(cut.events[0].presence.is_none(), "the marker stays");
        assert_eq!(cut.events[1].version, 2);
    }

    #[test]
    fn a_pending_user_updated_is_replaced_by_the_newer_one_at_the_end() {
        let mut bus = Bus(0);
        let mut q = EventQueue::new(100, &ALL);
        let now = Instant::now();
        q.push(&bus.ev(EventType::UserUpdated, "a", 1), now);
        q.push(&bus.ev(EventType::DeviceConnected, "a", 2), now);
        q.push(&bus.ev(EventType::UserUpdated, "b", 1), now);
        let p = q.push(&bus.ev(EventType::UserUpdated, "a", 3), now);
        assert!(p.coalesced && p.dropped == 0);
        assert_eq!(q.len(), 3);
        let cut = q.cut(10, now, 0).unwrap();
        assert_eq!(
            kinds(&cut),
            vec![
                (EventType::DeviceConnected, Some("a".into()), 2),
                (EventType::UserUpdated, Some("b".into()), 1),
                (EventType::UserUpdated, Some("a".into()), 3),
            ]
        );
        // Once cut (in flight), a new update is queued, not coalesced into the batch.
        let p = q.push(&bus.ev(EventType::UserUpdated, "a", 4), now);
        assert!(!p.coalesced);
        assert_eq!(q.unreported_losses(), 0, "coalescing loses nothing");
    }

    #[test]
    fn a_full_queue_compacts_to_each_subjects_newest_then_drops_the_oldest() {
        let mut bus = Bus(0);
        let mut q = EventQueue::new(4, &ALL);
        let now = Instant::now();
        q.push(&bus.ev(EventType::ServerStarted, "", 0), now); // 1
        q.push(&bus.ev(EventType::UserOnline, "a", 1), now); // 2
        q.push(&bus.ev(EventType::UserOnline, "b", 1), now); // 3
        q.push(&bus.ev(EventType::UserOffline, "a", 2), now); // 4
                                                              // Full: b's second event makes a's online and b's online redundant.
        let p = q.push(&bus.ev(EventType::UserOffline, "b", 2), now); // 5
        assert_eq!((p.dropped, p.depth), (2, 3));
        q.push(&bus.ev(EventType::UserOnline, "c", 1), now); // 6
                                                             // Full with distinct subjects: the oldest with a subject goes, server.started stays.
        let p = q.push(&bus.ev(EventType::UserOnline, "d", 1), now); // 7
        assert_eq!((p.dropped, p.depth), (1, 4));
        assert_eq!(q.unreported_losses(), 3);
        let cut = q.cut(10, now, 99).unwrap();
        let sync = &cut.events[0];
        assert_eq!(sync.kind, EventType::SyncRequired);
        assert_eq!(sync.dropped, Some(3));
        assert_eq!(sync.first_lost_seq, Some(2));
        assert_eq!(sync.id, "e-2-sync-1");
        assert_eq!((sync.seq, sync.ts_ms), (0, 99));
        assert_eq!(cut.id, "msg_e-2-sync-1_7");
        assert_eq!(
            cut.events[1..].iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![1, 5, 6, 7]
        );
        assert_eq!(q.unreported_losses(), 0);
        // The next batch has no sync.required.
        q.push(&bus.ev(EventType::UserOnline, "e", 1), now);
        let cut = q.cut(10, now, 0).unwrap();
        assert_eq!(cut.events[0].kind, EventType::UserOnline);
    }

    #[test]
    fn a_batch_given_up_is_reported_by_the_next_sync_required() {
        let mut bus = Bus(0);
        let mut q = EventQueue::new(10, &ALL);
        let now = Instant::now();
        for u in ["a", "b", "c"] {
            q.push(&bus.ev(EventType::UserOnline, u, 1), now);
        }
        let first = q.cut(2, now, 0).unwrap();
        assert_eq!(first.id, "msg_e-1_2");
        assert_eq!(q.lose(&first.events, now), 2);
        let second = q.cut(2, now, 50).unwrap();
        assert_eq!(second.events[0].dropped, Some(2));
        assert_eq!(second.events[0].first_lost_seq, Some(1));
        assert_eq!(second.events[1].seq, 3);
        // Given up too: the sync.required folds back in, nothing is counted twice.
        assert_eq!(q.lose(&second.events, now), 1);
        let third = q.cut(2, now, 60).unwrap();
        assert_eq!(third.events.len(), 1);
        assert_eq!(third.events[0].dropped, Some(3));
        assert_eq!(third.events[0].first_lost_seq, Some(1));
        assert_eq!(third.events[0].id, "e-1-sync-2");
        assert!(q.cut(2, now, 0).is_none());
    }

    #[test]
    fn a_disabled_queue_accepts_nothing_and_reports_what_it_held() {
        let mut bus = Bus(0);
        let mut q = EventQueue::new(10, &ALL);
        let now = Instant::now();
        q.push(&bus.ev(EventType::UserOnline, "a", 1), now);
        q.push(&bus.ev(EventType::UserOnline, "b", 1), now);
        assert_eq!(q.disable(), 2);
        assert!(!q.push(&bus.ev(EventType::UserOnline, "c", 1), now).queued);
        assert!(q.cut(10, now, 0).is_none());
        assert!(q.is_disabled());
    }

    #[test]
    fn tombstones_are_swept_and_a_busy_user_does_not_grow_the_queue() {
        let mut bus = Bus(0);
        let mut q = EventQueue::new(10, &ALL);
        let now = Instant::now();
        for v in 1..=10_000 {
            q.push(&bus.ev(EventType::UserUpdated, "a", v), now);
            q.push(&bus.ev(EventType::UserUpdated, "b", v), now);
        }
        assert_eq!(q.len(), 2);
        assert!(q.slots.len() <= 2 * 64 + 2, "{}", q.slots.len());
        let all = drain(&mut q);
        assert_eq!(
            all.iter()
                .map(|e| (e.user.clone().unwrap(), e.version))
                .collect::<Vec<_>>(),
            vec![("a".into(), 10_000), ("b".into(), 10_000)]
        );
    }

    /// A plain model of the policy, for the randomized comparison below.
    #[derive(Default)]
    struct Model {
        pending: Vec<Arc<Event>>,
        dropped: u64,
        first_lost: Option<u64>,
    }

    impl Model {
        fn push(&mut self, e: &Arc<Event>, cap: usize) {
            if e.kind == EventType::UserUpdated {
                self.pending
                    .retain(|p| !(p.kind == EventType::UserUpdated && p.user == e.user));
            }
            self.pending.push(e.clone());
            if self.pending.len() > cap {
                let mut newest: BTreeMap<&str, u64> = BTreeMap::new();
                for p in &self.pending {
                    if let Some(k) = p.subject_key() {
                        newest.insert(k, p.seq);
                    }
                }
                let (keep, lose): (Vec<_>, Vec<_>) = self
                    .pending
                    .iter()
                    .cloned()
                    .partition(|p| p.subject_key().is_none_or(|k| newest[k] == p.seq));
                for l in &lose {
                    self.lose(l.seq);
                }
                self.pending = keep;
            }
            while self.pending.len() > cap {
                let i = self
                    .pending
                    .iter()
                    .position(|p| p.subject_key().is_some())
                    .unwrap_or(0);
                let l = self.pending.remove(i);
                self.lose(l.seq);
            }
        }

        fn lose(&mut self, seq: u64) {
            self.dropped += 1;
            self.first_lost = Some(self.first_lost.map_or(seq, |f| f.min(seq)));
        }
    }

    #[test]
    fn random_operation_sequences_match_the_model_and_keep_invariants() {
        let kinds = [
            EventType::UserOnline,
            EventType::UserOffline,
            EventType::UserUpdated,
            EventType::UserUpdated,
            EventType::DeviceConnected,
            EventType::ChannelOccupied,
            EventType::ServerStarted,
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for round in 0..200 {
            let cap = 1 + next(12) as usize;
            let users = 1 + next(8);
            let mut bus = Bus(0);
            let mut q = EventQueue::new(cap, &ALL);
            let mut model = Model::default();
            let now = Instant::now();
            let mut delivered: Vec<Arc<Event>> = Vec::new();
            let mut reported = 0;
            for _ in 0..300 {
                if next(5) == 0 {
                    let max = 1 + next(4) as usize;
                    let had_losses = model.dropped;
                    let first_lost = model.first_lost;
                    let cut = q.cut(max, now, 0);
                    let mut expect = Vec::new();
                    if had_losses > 0 {
                        model.dropped = 0;
                        model.first_lost = None;
                    }
                    let take = (max - usize::from(had_losses > 0)).min(model.pending.len());
                    expect.extend(model.pending.drain(..take));
                    match cut {
                        None => assert!(expect.is_empty() && had_losses == 0, "round {round}"),
                        Some(cut) => {
                            let mut events = cut.events.as_slice();
                            if had_losses > 0 {
                                assert_eq!(events[0].dropped, Some(had_losses));
                                assert_eq!(events[0].first_lost_seq, first_lost);
                                reported += had_losses;
                                events = &events[1..];
                            }
                            assert_eq!(
                                events.iter().map(|e| e.seq).collect::<Vec<_>>(),
                                expect.iter().map(|e| e.seq).collect::<Vec<_>>(),
                                "round {round}"
                            );
                            delivered.extend(events.iter().cloned());
                        }
                    }
                    continue;
                }
                let kind = kinds[next(kinds.len() as u64) as usize];
                let user = format!("u{}", next(users));
                let e = if kind == EventType::ChannelOccupied {
                    let mut e = (*bus.ev(kind, &user, 0)).clone();
                    e.channel = Some(format!("c{}", next(3)));
                    Arc::new(e)
                } else if kind == EventType::ServerStarted {
                    bus.ev(kind, "", 0)
                } else {
                    let v = bus.0 + 1;
                    bus.ev(kind, &user, v)
                };
                q.push(&e, now);
                model.push(&e, cap);
                // Invariants: bounded, indexes agree with the slots.
                assert!(q.len() <= cap);
                assert_eq!(q.len(), model.pending.len(), "round {round}");
                assert_eq!(q.slots.iter().flatten().count(), q.live);
                assert_eq!(q.unreported_losses(), model.dropped);
                let indexed: usize = q.by_key.values().map(VecDeque::len).sum();
                let keyed = q
                    .slots
                    .iter()
                    .flatten()
                    .filter(|e| e.subject_key().is_some());
                assert_eq!(indexed, keyed.count());
            }
            // Each user's delivered versions only increase.
            let mut last: HashMap<String, u64> = HashMap::new();
            for e in delivered.iter().filter(|e| e.version > 0) {
                let user = e.user.clone().unwrap();
                assert!(
                    last.get(&user).is_none_or(|&v| v < e.version),
                    "round {round}"
                );
                last.insert(user, e.version);
            }
            let _ = reported;
        }
    }
}
