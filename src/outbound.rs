//! Each connection's outbound queue: a bounded FIFO of encoded frames plus a coalescing map.
//! Producers (the registry fanning out, the connection replying) never wait: when the FIFO is
//! full, an event is parked in the map under the user it is about, replacing any older one, so a
//! slow watcher receives every user's latest state once its socket drains and memory stays
//! bounded by the number of users it watches. Once an event for a user is parked, later events
//! for that user replace it rather than overtake it, so per-user order holds. The writer task is
//! the only consumer. Synchronous apart from the two waits the async shell uses.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// One encoded frame on its way to a socket.
#[derive(Debug, Clone)]
pub struct Item {
    /// The frame with its length prefix, shared by every recipient.
    pub bytes: Bytes,
    /// When the change it carries was received, for the fanout-latency histogram; `None` for
    /// replies.
    pub received_at: Option<Instant>,
    /// Frame kind for the frames-out metric.
    pub kind: &'static str,
}

impl Item {
    /// A reply or control frame.
    pub fn reply(bytes: Bytes, kind: &'static str) -> Item {
        Item {
            bytes,
            received_at: None,
            kind,
        }
    }

    /// An event carrying a change received at `received_at`.
    pub fn event(bytes: Bytes, received_at: Instant, kind: &'static str) -> Item {
        Item {
            bytes,
            received_at: Some(received_at),
            kind,
        }
    }
}

/// What became of a pushed event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// In the FIFO.
    Queued,
    /// Parked in the coalescing map (possibly replacing an older event for the same key).
    Coalesced,
    /// The connection is closing; dropped.
    Closed,
    /// Both the FIFO and the coalescing map are full: the consumer must be disconnected.
    Overflow,
}

/// A batch for the writer.
#[derive(Debug, Default)]
pub struct Batch {
    /// Frames to write, in order.
    pub items: Vec<Item>,
    /// True when the last item is the close frame: nothing follows.
    pub closing: bool,
}

#[derive(Debug, Default)]
struct QueueState {
    /// Frames in order.
    fifo: VecDeque<Item>,
    /// Latest parked event per key, while the FIFO is full.
    parked: HashMap<String, Item>,
    /// The close frame, once closing started.
    close: Option<Item>,
    /// Closing started: no more pushes.
    closing: bool,
    /// The close frame was handed to the writer.
    finished: bool,
    /// Replies queued but not yet handed to the writer.
    replies_pending: usize,
    /// Their bytes.
    reply_bytes_pending: usize,
    /// A batched delivery contract, while one is in force (background mode); boxed, so
    /// connections without one (most) pay a pointer.
    delivery: Option<Box<crate::delivery::Held>>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<QueueState>,
    /// Wakes the writer.
    ready: Notify,
    /// Wakes a connection waiting for room to send replies.
    space: Notify,
    /// Cancelled when closing starts, so the reader stops too.
    closed: CancellationToken,
    /// FIFO length beyond which events are parked.
    capacity: usize,
    /// Most keys that may be parked at once.
    parked_limit: usize,
    /// Unwritten replies beyond which the connection stops reading requests.
    max_replies: usize,
    /// Unwritten reply bytes beyond which the connection stops reading requests.
    max_reply_bytes: usize,
    /// Connection id, unique in this process.
    id: u64,
}

/// Handle to one connection's outbound queue; a cheap clone of an `Arc`.
#[derive(Debug, Clone)]
pub struct Outbound {
    shared: Arc<Shared>,
}

impl Outbound {
    /// A queue of `capacity` frames that parks at most `parked_limit` keys; the connection
    /// waits once `max_replies` replies are unwritten.
    pub fn new(id: u64, capacity: usize, parked_limit: usize, max_replies: usize) -> Outbound {
        Outbound::with_reply_budget(id, capacity, parked_limit, max_replies, usize::MAX)
    }

    /// [`Outbound::new`], and the connection also waits once `max_reply_bytes` of replies are
    /// unwritten, so a client that asks for large replies without reading them holds at most
    /// that much (plus the batch being written).
    pub fn with_reply_budget(
        id: u64,
        capacity: usize,
        parked_limit: usize,
        max_replies: usize,
        max_reply_bytes: usize,
    ) -> Outbound {
        Outbound {
            shared: Arc::new(Shared {
                state: Mutex::new(QueueState::default()),
                ready: Notify::new(),
                space: Notify::new(),
                closed: CancellationToken::new(),
                capacity: capacity.max(1),
                parked_limit,
                max_replies: max_replies.max(1),
                max_reply_bytes: max_reply_bytes.max(1),
                id,
            }),
        }
    }

    /// The connection id.
    pub fn id(&self) -> u64 {
        self.shared.id
    }

    fn state(&self) -> MutexGuard<'_, QueueState> {
        // The critical sections below cannot panic midway; recover rather than poison.
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Offers an event about `key` (a user id). Never waits.
    pub fn push_event(&self, key: &str, item: Item) -> Pushed {
        let mut state = self.state();
        if state.closing {
            return Pushed::Closed;
        }
        if let Some(held) = state.delivery.as_mut().filter(|h| h.holds(key, &item)) {
            return match held.hold(key, item, Instant::now(), self.shared.parked_limit) {
                Ok(first) => {
                    drop(state);
                    if first {
                        // A batch is now due: the writer sets its timer.
                        self.shared.ready.notify_one();
                    }
                    Pushed::Coalesced
                }
                Err(_) => Pushed::Overflow,
            };
        }
        if let Some(slot) = state.parked.get_mut(key) {
            *slot = item;
            return Pushed::Coalesced;
        }
        if state.fifo.len() < self.shared.capacity {
            state.fifo.push_back(item);
            drop(state);
            self.shared.ready.notify_one();
            return Pushed::Queued;
        }
        if state.parked.len() < self.shared.parked_limit {
            state.parked.insert(key.to_string(), item);
            return Pushed::Coalesced;
        }
        Pushed::Overflow
    }

    /// Queues a reply to this connection's own request. Replies are never coalesced or dropped;
    /// the connection bounds them by waiting in [`Outbound::wait_for_space`] before reading the
    /// next request. Returns false when closing.
    pub fn push_reply(&self, item: Item) -> bool {
        self.queue_reply(item, false)
    }

    /// Queues a reply ahead of everything already queued. For the ConnAck: the session is
    /// registered (so fanout may push events here) a moment before its ConnAck is queued, and
    /// nothing has been written yet then (the writer runs in the same task as the reader), so
    /// putting it first makes the ConnAck the first frame a client sees. Returns false when
    /// closing.
    pub fn push_reply_first(&self, item: Item) -> bool {
        self.queue_reply(item, true)
    }

    fn queue_reply(&self, item: Item, first: bool) -> bool {
        let len = item.bytes.len();
        let mut state = self.state();
        if state.closing {
            return false;
        }
        if first {
            state.fifo.push_front(item);
        } else {
            state.fifo.push_back(item);
        }
        state.replies_pending += 1;
        state.reply_bytes_pending += len;
        drop(state);
        self.shared.ready.notify_one();
        true
    }

    /// True while the FIFO holds at least its capacity or too many replies are unwritten: the
    /// connection should not read another request yet.
    pub fn is_backlogged(&self) -> bool {
        let state = self.state();
        state.fifo.len() >= self.shared.capacity
            || state.replies_pending >= self.shared.max_replies
            || state.reply_bytes_pending >= self.shared.max_reply_bytes
    }

    /// Waits until the FIFO is below capacity or closing started. Cancel-safe.
    pub async fn wait_for_space(&self) {
        loop {
            let space = self.shared.space.notified();
            if !self.is_backlogged() || self.shared.closed.is_cancelled() {
                return;
            }
            tokio::select! {
                _ = space => {}
                _ = self.shared.closed.cancelled() => return,
            }
        }
    }

    /// Starts closing: nothing more is accepted; frames already queued are written, then `last`
    /// (the close frame), then the writer ends. Parked events are dropped. Returns false when
    /// closing had already started (the first reason wins).
    pub fn close(&self, last: Option<Item>) -> bool {
        let mut state = self.state();
        if state.closing {
            return false;
        }
        state.closing = true;
        state.close = last;
        state.parked.clear();
        state.delivery = None;
        drop(state);
        self.shared.closed.cancel();
        self.shared.ready.notify_one();
        true
    }

    /// True once closing started.
    pub fn is_closing(&self) -> bool {
        self.shared.closed.is_cancelled()
    }

    /// A token cancelled when closing starts.
    pub fn closed(&self) -> CancellationToken {
        self.shared.closed.clone()
    }

    /// The next frames to write, at most about `max_bytes` (always at least one frame), or
    /// `None` once the close frame has been handed out. Cancel-safe: nothing is taken until the
    /// future completes.
    pub async fn next_batch(&self, max_bytes: usize) -> Option<Batch> {
        loop {
            let ready = self.shared.ready.notified();
            if let Some(batch) = self.take_batch(max_bytes) {
                self.shared.space.notify_one();
                return batch;
            }
            let due = self.state().delivery.as_ref().and_then(|h| h.due());
            match due {
                Some(at) => {
                    tokio::select! {
                        _ = ready => {}
                        _ = tokio::time::sleep_until(tokio::time::Instant::from_std(at)) => {}
                    }
                }
                None => ready.await,
            }
        }
    }

    /// Sets the delivery contract: `Some` holds and batches watched users' events, `None` is
    /// live delivery. When a batched contract ends (or is replaced), returns what it owes the
    /// client in full: the events it held and the users whose trimmed form went out (the
    /// caller sends their current presence). Held events go out only that way, so the client's
    /// view is complete once it has them.
    pub fn set_delivery(
        &self,
        contract: Option<crate::delivery::Contract>,
    ) -> Option<(Vec<crate::pb::PresenceEvent>, Vec<String>)> {
        let mut state = self.state();
        if state.closing {
            return None;
        }
        let owed = state.delivery.take().map(|held| held.finish());
        state.delivery = contract.map(|c| Box::new(crate::delivery::Held::new(c)));
        owed
    }

    /// The batched contract in force, if any.
    pub fn delivery(&self) -> Option<crate::delivery::Contract> {
        self.state().delivery.as_ref().map(|h| h.contract().clone())
    }

    /// `Some(None)` when finished, `Some(Some(batch))` when there is work, `None` when idle.
    fn take_batch(&self, max_bytes: usize) -> Option<Option<Batch>> {
        let mut state = self.state();
        if state.finished {
            return Some(None);
        }
        let mut batch = Batch::default();
        let mut bytes = 0;
        if let Some(held) = state.delivery.as_mut() {
            if held.due().is_some_and(|at| at <= Instant::now()) {
                for item in held.flush() {
                    bytes += item.bytes.len();
                    batch.items.push(item);
                }
            }
        }
        while let Some(item) = state.fifo.front() {
            if !batch.items.is_empty() && bytes + item.bytes.len() > max_bytes {
                break;
            }
            bytes += item.bytes.len();
            let item = state.fifo.pop_front()?;
            if item.received_at.is_none() {
                state.replies_pending = state.replies_pending.saturating_sub(1);
                state.reply_bytes_pending =
                    state.reply_bytes_pending.saturating_sub(item.bytes.len());
            }
            batch.items.push(item);
        }
        // Parked events go out only once the FIFO has drained, after everything queued before.
        if state.fifo.is_empty() && !state.parked.is_empty() && bytes < max_bytes {
            let keys: Vec<String> = state
                .parked
                .iter()
                .scan(bytes, |total, (k, item)| {
                    *total += item.bytes.len();
                    (*total <= max_bytes || *total == item.bytes.len()).then(|| k.clone())
                })
                .collect();
            for key in keys {
                if let Some(item) = state.parked.remove(&key) {
                    batch.items.push(item);
                }
            }
        }
        // A drained queue gives its memory back: most connections are idle most of the time.
        if state.fifo.is_empty() && state.fifo.capacity() > 0 {
            state.fifo = VecDeque::new();
        }
        if state.parked.is_empty() && state.parked.capacity() > 0 {
            state.parked = HashMap::new();
        }
        if state.closing && state.fifo.is_empty() {
            if let Some(close) = state.close.take() {
                batch.items.push(close);
            }
            state.finished = true;
            batch.closing = true;
        }
        if batch.items.is_empty() && !batch.closing {
            return None;
        }
        Some(Some(batch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(tag: &'static str) -> Item {
        Item::reply(Bytes::from_static(tag.as_bytes()), "event")
    }

    fn tags(batch: &Batch) -> Vec<&[u8]> {
        batch.items.iter().map(|i| &i.bytes[..]).collect()
    }

    #[tokio::test]
    async fn full_queue_parks_latest_per_key_and_keeps_per_key_order() {
        let q = Outbound::new(1, 2, 10, 32);
        assert_eq!(q.push_event("a", ev("a1")), Pushed::Queued);
        assert_eq!(q.push_event("b", ev("b1")), Pushed::Queued);
        assert_eq!(q.push_event("a", ev("a2")), Pushed::Coalesced);
        assert_eq!(q.push_event("a", ev("a3")), Pushed::Coalesced);
        let first = q.next_batch(1 << 20).await.unwrap();
        assert_eq!(tags(&first), [&b"a1"[..], b"b1", b"a3"]);
        // After the drain, a new event for "a" goes straight into the FIFO again.
        assert_eq!(q.push_event("a", ev("a4")), Pushed::Queued);
        assert_eq!(tags(&q.next_batch(1 << 20).await.unwrap()), [&b"a4"[..]]);
    }

    #[tokio::test]
    async fn a_key_that_is_parked_is_never_overtaken() {
        let q = Outbound::new(1, 1, 10, 32);
        q.push_event("x", ev("x1"));
        q.push_event("a", ev("a1")); // parked: fifo full
        let batch = q.next_batch(2).await.unwrap(); // only x1 fits
        assert_eq!(tags(&batch), [&b"x1"[..]]);
        // fifo has room now, but "a" is parked: replace, do not queue ahead of it.
        assert_eq!(q.push_event("a", ev("a2")), Pushed::Coalesced);
        assert_eq!(tags(&q.next_batch(1 << 20).await.unwrap()), [&b"a2"[..]]);
    }

    #[tokio::test]
    async fn overflow_when_parking_is_full() {
        let q = Outbound::new(1, 1, 1, 32);
        q.push_event("a", ev("a"));
        q.push_event("b", ev("b"));
        assert_eq!(q.push_event("c", ev("c")), Pushed::Overflow);
    }

    #[tokio::test]
    async fn close_writes_queued_then_close_frame_then_ends() {
        let q = Outbound::new(1, 4, 4, 32);
        q.push_reply(ev("r1"));
        assert!(q.close(Some(ev("bye"))));
        assert!(!q.close(Some(ev("again"))));
        assert!(!q.push_reply(ev("late")));
        assert_eq!(q.push_event("a", ev("a")), Pushed::Closed);
        let batch = q.next_batch(1 << 20).await.unwrap();
        assert!(batch.closing);
        assert_eq!(tags(&batch), [&b"r1"[..], b"bye"]);
        assert!(q.next_batch(1 << 20).await.is_none());
    }

    #[tokio::test]
    async fn wait_for_space_returns_after_drain() {
        let q = Outbound::new(1, 1, 1, 32);
        q.push_reply(ev("r1"));
        assert!(q.is_backlogged());
        let waiter = {
            let q = q.clone();
            tokio::spawn(async move { q.wait_for_space().await })
        };
        q.next_batch(1 << 20).await.unwrap();
        waiter.await.unwrap();
    }
}

#[cfg(test)]
mod in_flight_tests {
    use super::*;

    #[tokio::test]
    async fn unwritten_replies_hold_the_reader_back() {
        let q = Outbound::new(1, 100, 1, 2);
        q.push_reply(Item::reply(Bytes::from_static(b"a"), "pong"));
        assert!(!q.is_backlogged());
        q.push_reply(Item::reply(Bytes::from_static(b"b"), "pong"));
        assert!(q.is_backlogged(), "two replies unwritten: the limit");
        q.next_batch(1 << 20).await.unwrap();
        assert!(!q.is_backlogged());
    }

    #[tokio::test]
    async fn unwritten_reply_bytes_hold_the_reader_back() {
        let q = Outbound::with_reply_budget(1, 100, 1, 100, 1000);
        q.push_reply(Item::reply(Bytes::from(vec![0u8; 600]), "big"));
        assert!(!q.is_backlogged());
        q.push_reply(Item::reply(Bytes::from(vec![0u8; 600]), "big"));
        assert!(q.is_backlogged(), "1,200 unwritten bytes: over the budget");
        q.next_batch(1 << 20).await.unwrap();
        assert!(!q.is_backlogged());
    }

    #[tokio::test]
    async fn a_reply_pushed_first_overtakes_events_queued_before_it() {
        let q = Outbound::new(1, 8, 8, 8);
        q.push_event("a", Item::reply(Bytes::from_static(b"event"), "event"));
        assert!(q.push_reply_first(Item::reply(Bytes::from_static(b"connack"), "conn_ack")));
        let batch = q.next_batch(1 << 16).await.unwrap();
        let order: Vec<&[u8]> = batch.items.iter().map(|i| &i.bytes[..]).collect();
        assert_eq!(order, [&b"connack"[..], &b"event"[..]]);
    }
}
