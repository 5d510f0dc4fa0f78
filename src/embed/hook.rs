//! The [`PresenceHook`] interface and what feeds it: an [`EventSink`] over a bounded queue that
//! the event bus pushes to without waiting (a full queue drops the event and counts it), and a
//! thread of its own that calls the hook, so a slow or stuck hook never slows fanout and never
//! takes a runtime worker.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::events::{Event, EventSink, EventType};
use crate::metrics as m;

/// Observes presence transitions in-process: the backend event catalogue the webhooks carry
/// (`user.online`, `user.updated`, `user.offline`, `device.connected`,
/// `device.disconnected`, `channel.occupied`, `channel.member.joined`, ...,
/// `server.started`, `sync.required`), as [`Event`] values, without HTTP.
///
/// * **Order**: events arrive in the bus's order (`seq`), one call at a time, on a thread the
///   server starts (`presence-hook`). The hook may block; only the hook's own queue waits.
/// * **Loss**: the queue is bounded
///   ([`ServerBuilder::hook_queue_capacity`](super::ServerBuilder::hook_queue_capacity)).
///   When it is full, new events are dropped and counted in
///   `presence_hook_events_dropped_total`, and a `sync.required` event whose `dropped` says
///   how many were lost takes their place: after the events queued before them, before any
///   later one, and told once the hook has caught up even if no later event comes. Re-read
///   the state you depend on.
/// * **Panics** are caught and counted in `presence_hook_panics_total`; the next event is
///   delivered as usual.
/// * **Shutdown**: [`Server::run`](crate::Server::run) lets the hook finish the queued events
///   (up to `session.shutdown_timeout_ms`) after the last session ended; a hook still busy
///   then is left running on its thread.
/// * **Cluster mode**: like a webhook endpoint, only the node that delivers webhooks calls its
///   hook, with every node's events (numbered by the cluster's event log). When delivery moves
///   to a node, its hook is first offered the events that node still keeps, some of which the
///   previous deliverer's hook may have seen: deduplicate by [`Event::id`].
///
/// Any `Fn(&Event) + Send + Sync + 'static` closure is a hook.
pub trait PresenceHook: Send + Sync + 'static {
    /// One event.
    fn on_event(&self, event: &Event);
}

impl<F> PresenceHook for F
where
    F: Fn(&Event) + Send + Sync + 'static,
{
    fn on_event(&self, event: &Event) {
        self(event)
    }
}

/// What the hook's queue holds.
#[derive(Debug)]
enum Item {
    Event(Arc<Event>),
    /// This many events were dropped here, in queue order.
    Lost(u64),
}

/// The bus's side of the hook: a non-blocking push into the bounded queue.
#[derive(Debug)]
struct HookSink {
    /// `None` once the server stopped feeding the hook.
    queue: Mutex<Option<SyncSender<Item>>>,
    /// Events dropped and not yet queued as a loss (nor told by the hook thread).
    dropped: Arc<AtomicU64>,
}

impl EventSink for HookSink {
    fn offer(&self, event: &Arc<Event>) {
        let queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let Some(queue) = queue.as_ref() else {
            return;
        };
        // Losses go into the queue ahead of the next event that gets in, so the hook hears of
        // them exactly where they happened.
        let lost = self.dropped.swap(0, Ordering::Relaxed);
        let sent = if lost > 0 {
            queue.try_send(Item::Lost(lost)).inspect_err(|_| {
                self.dropped.fetch_add(lost, Ordering::Relaxed);
            })
        } else {
            Ok(())
        };
        match sent.and_then(|()| queue.try_send(Item::Event(event.clone()))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(m::HOOK_DROPPED, "reason" => "queue_full").increment(1);
            }
            Err(TrySendError::Disconnected(_)) => {
                metrics::counter!(m::HOOK_DROPPED, "reason" => "stopped").increment(1);
            }
        }
    }
}

/// The server's handle on a running hook: its sink for the event bus, and how to stop it.
#[derive(Debug)]
pub(crate) struct HookHandle {
    sink: Arc<HookSink>,
    /// Closed when the hook's thread ends.
    done: tokio::sync::oneshot::Receiver<()>,
}

impl HookHandle {
    /// Starts the hook's thread behind a queue of `capacity` events.
    pub(crate) fn start(
        hook: Arc<dyn PresenceHook>,
        capacity: usize,
    ) -> std::io::Result<HookHandle> {
        let (queue, events) = sync_channel(capacity.max(1));
        let dropped = Arc::new(AtomicU64::new(0));
        let (finished, done) = tokio::sync::oneshot::channel::<()>();
        let lost = dropped.clone();
        std::thread::Builder::new()
            .name("presence-hook".into())
            .spawn(move || {
                deliver_all(&*hook, &events, &lost);
                drop(finished);
            })?;
        Ok(HookHandle {
            sink: Arc::new(HookSink {
                queue: Mutex::new(Some(queue)),
                dropped,
            }),
            done,
        })
    }

    /// The sink to hand to the event bus.
    pub(crate) fn sink(&self) -> Arc<dyn EventSink> {
        self.sink.clone()
    }

    /// Stops feeding the hook and waits up to `deadline` for it to finish what is queued.
    pub(crate) async fn stop(self, deadline: Duration) {
        self.sink
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if tokio::time::timeout(deadline, self.done).await.is_err() {
            tracing::warn!("the presence hook did not finish its queue within {deadline:?}");
        }
    }
}

/// The hook thread's loop: until every sender is gone, calls the hook with each event and a
/// `sync.required` for each loss, in queue order. A loss no later event followed is told
/// once the queue is empty (everything queued before it was delivered) and at the end.
fn deliver_all(hook: &dyn PresenceHook, events: &Receiver<Item>, dropped: &AtomicU64) {
    let mut syncs = 0u64;
    let mut node = None;
    let mut tell = |lost: u64, node: &Option<String>| {
        syncs += 1;
        let sync = Event {
            id: format!("hook-sync-{syncs}"),
            ts_ms: crate::now_ms(),
            dropped: Some(lost),
            node: node.clone(),
            ..Event::bare(EventType::SyncRequired, None, 0)
        };
        call(hook, &sync);
    };
    loop {
        let item = match events.try_recv() {
            Ok(item) => item,
            Err(TryRecvError::Empty) => {
                let lost = dropped.swap(0, Ordering::Relaxed);
                if lost > 0 {
                    tell(lost, &node);
                }
                match events.recv() {
                    Ok(item) => item,
                    Err(_) => break,
                }
            }
            Err(TryRecvError::Disconnected) => break,
        };
        match item {
            Item::Lost(lost) => tell(lost, &node),
            Item::Event(event) => {
                node.clone_from(&event.node);
                call(hook, &event);
            }
        }
    }
    let lost = dropped.swap(0, Ordering::Relaxed);
    if lost > 0 {
        tell(lost, &node);
    }
}

fn call(hook: &dyn PresenceHook, event: &Event) {
    if catch_unwind(AssertUnwindSafe(|| hook.on_event(event))).is_err() {
        metrics::counter!(m::HOOK_PANICS).increment(1);
    } else {
        metrics::counter!(m::HOOK_EVENTS).increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_queue_drops_and_the_hook_hears_of_it_then_stops() {
        let (gate_tx, gate_rx) = std::sync::mpsc::channel::<()>();
        let (entered_tx, entered_rx) = std::sync::mpsc::channel::<()>();
        let gate = Mutex::new((gate_rx, entered_tx));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let hook = move |e: &Event| {
            if e.seq == 1 {
                // Says it holds event 1, then waits until the test has overfilled the queue.
                let gate = gate.lock().unwrap();
                let _ = gate.1.send(());
                let _ = gate.0.recv();
            }
            log.lock()
                .unwrap()
                .push((e.kind, e.seq, e.dropped.unwrap_or(0)));
        };
        let handle = HookHandle::start(Arc::new(hook), 2).unwrap();
        let sink = handle.sink();
        let event = |seq| {
            Arc::new(Event {
                seq,
                ..Event::bare(EventType::UserOnline, Some("u".into()), seq)
            })
        };
        sink.offer(&event(1));
        entered_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the hook takes event 1");
        for seq in 2..=5 {
            sink.offer(&event(seq));
        }
        // The hook holds event 1 and the queue two more: 4 and 5 were dropped.
        assert_eq!(handle.sink.dropped.load(Ordering::Relaxed), 2);
        gate_tx.send(()).unwrap();
        // Once the hook has the events queued before the loss, a later event comes after the
        // loss, whether the hook has told it by then or not.
        let started = std::time::Instant::now();
        while seen.lock().unwrap().len() < 3 {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the hook is stuck"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        sink.offer(&event(6));
        handle.stop(Duration::from_secs(10)).await;
        let seen = seen.lock().unwrap().clone();
        // The loss is told where it happened (after 2 and 3, queued before it), and although
        // no event came after it.
        assert_eq!(
            seen,
            [
                (EventType::UserOnline, 1, 0),
                (EventType::UserOnline, 2, 0),
                (EventType::UserOnline, 3, 0),
                (EventType::SyncRequired, 0, 2),
                (EventType::UserOnline, 6, 0),
            ]
        );
        // Stopped: later offers go nowhere (and do not block).
        sink.offer(&event(7));
    }
}
