//! The replicated subscription log: a JetStream stream (replicated by NATS, acknowledged by a
//! quorum) holds every Subscribe/Unsubscribe in one order, one subject per subscriber. Each
//! node applies the stream into its own sled store with the stream sequence in the same batch,
//! and replays from there at start before its listener opens. A client's request is
//! acknowledged only after the JetStream ack and this node's apply; without a quorum it gets a
//! retryable UNAVAILABLE error, never an ack. A client retry carrying the same idempotency key
//! is folded by message id (JetStream's duplicate window). The log stays bounded: entries
//! older than the longest subscription expiry age out (they can only describe expired
//! subscriptions), and a subscriber's entries are rolled up into one snapshot every
//! `ROLLUP_EVERY` operations (guarded by the expected last subject sequence, so a rollup never
//! swallows an operation it has not seen).

use std::collections::{BTreeMap, HashMap};
use std::future::IntoFuture;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use prost::Message;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::wire::{LogEntry, Subjects};
use crate::metrics as m;
use crate::store::{LoggedOp, LoggedOutcome, SubscribeOutcome, SubscriptionStore};

/// Why the log could not take or confirm an operation.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SubLogError {
    /// No quorum, no leader, NATS unreachable, or the local apply did not catch up in time.
    /// Nothing is acknowledged; the client retries.
    #[error("the subscription log is unavailable: {0}")]
    Unavailable(String),
}

/// Operations of one subscriber between rollups.
pub const ROLLUP_EVERY: u32 = 64;
/// How long a read waits for this node to catch up with the log.
pub const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a waiter lets the consumer deliver before it asks for a fresh consumer (an
/// ordered consumer can sit silent for many seconds after the log lost and regained its
/// quorum; a fresh one starts at this node's position at once).
const KICK_AFTER: Duration = Duration::from_millis(400);
/// Outcomes kept for operations applied here (a waiting request reads its own).
const OUTCOMES_KEPT: usize = 16_384;

/// Settings of the log.
#[derive(Debug, Clone)]
pub struct SubLogConfig {
    /// Stream replicas (3 in production and in the cluster tests; at most the NATS servers).
    pub replicas: usize,
    /// How long entries live: the longest subscription expiry, plus a day.
    pub max_age: Duration,
    /// How long a publish waits for the quorum's ack.
    pub ack_timeout: Duration,
    /// How long a request waits for this node's apply after the ack.
    pub apply_timeout: Duration,
    /// How long start-up waits to replay the log.
    pub replay_timeout: Duration,
}

#[derive(Debug)]
struct Shared {
    js: jetstream::Context,
    subjects: Subjects,
    stream_name: String,
    node: String,
    store: Arc<dyn SubscriptionStore>,
    applied: watch::Sender<u64>,
    outcomes: Mutex<BTreeMap<u64, LoggedOutcome>>,
    since_rollup: Mutex<HashMap<String, u32>>,
    config: SubLogConfig,
    stop: CancellationToken,
    /// Asks the applier to drop its consumer and create a fresh one from the store's position.
    kick: tokio::sync::Notify,
    /// When the last kick was asked for (ms since the epoch).
    last_kick_ms: std::sync::atomic::AtomicU64,
    tasks: TaskTracker,
    /// This process's start (µs), so message ids of different boots never collide.
    boot: u64,
    /// Source of per-call message ids.
    next_id: std::sync::atomic::AtomicU64,
}

/// Handle to the log; a cheap clone.
#[derive(Debug, Clone)]
pub struct SubLog {
    shared: Arc<Shared>,
}

impl SubLog {
    /// Makes sure the stream exists, replays it into `store` from the store's applied
    /// position, and keeps applying it in the background.
    pub async fn start(
        client: async_nats::Client,
        subjects: Subjects,
        node: String,
        store: Arc<dyn SubscriptionStore>,
        config: SubLogConfig,
    ) -> Result<SubLog, SubLogError> {
        let js = jetstream::ContextBuilder::new()
            .timeout(config.ack_timeout)
            .build(client);
        let stream_name = subjects.stream();
        let deadline = Instant::now() + config.replay_timeout;
        // A lone NATS server (no cluster) cannot hold more than one replica.
        let replicas = if js.client().server_info().cluster.is_none() && config.replicas > 1 {
            tracing::warn!(
                configured = config.replicas,
                "the NATS server is not clustered: the subscription log gets 1 replica (use a \
                 3-server NATS cluster in production)"
            );
            1
        } else {
            config.replicas
        };
        // Several nodes may create the stream at once on a fresh NATS cluster: creating it and
        // reading its position are retried together until the deadline.
        let last = loop {
            let attempt = async {
                let mut stream = js
                    .get_or_create_stream(stream::Config {
                        name: stream_name.clone(),
                        subjects: vec![subjects.log_all.clone()],
                        num_replicas: replicas,
                        max_age: config.max_age,
                        duplicate_window: Duration::from_secs(120),
                        allow_rollup: true,
                        storage: stream::StorageType::File,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                let info = stream.info().await.map_err(|e| e.to_string())?;
                Ok::<u64, String>(info.state.last_sequence)
            };
            match attempt.await {
                Ok(last) => break last,
                Err(e) if Instant::now() < deadline => {
                    tracing::warn!("subscription log not ready yet: {e}");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => return Err(SubLogError::Unavailable(e)),
            }
        };
        let (applied, _) = watch::channel(store.applied_seq());
        let log = SubLog {
            shared: Arc::new(Shared {
                js,
                subjects,
                stream_name,
                node,
                store,
                applied,
                outcomes: Mutex::new(BTreeMap::new()),
                since_rollup: Mutex::new(HashMap::new()),
                config,
                stop: CancellationToken::new(),
                kick: tokio::sync::Notify::new(),
                last_kick_ms: std::sync::atomic::AtomicU64::new(0),
                tasks: TaskTracker::new(),
                boot: crate::now_ms() * 1000 + u64::from(std::process::id() % 1000),
                next_id: std::sync::atomic::AtomicU64::new(0),
            }),
        };
        log.shared.tasks.spawn(apply_loop(log.clone()));
        let started = Instant::now();
        let mut rx = log.shared.applied.subscribe();
        let caught_up = tokio::time::timeout_at(deadline.into(), rx.wait_for(|&a| a >= last))
            .await
            .is_ok_and(|r| r.is_ok());
        if !caught_up {
            return Err(SubLogError::Unavailable(format!(
                "replay reached {} of {last} within {:?}",
                *rx.borrow(),
                log.shared.config.replay_timeout
            )));
        }
        tracing::info!(
            applied = *rx.borrow(),
            seconds = started.elapsed().as_secs_f64(),
            "subscription log replayed"
        );
        Ok(log)
    }

    /// The last operation applied here.
    pub fn applied(&self) -> u64 {
        *self.shared.applied.borrow()
    }

    /// Appends `op`, waits for the quorum's ack and this node's apply, and returns what it
    /// did here. With the client's `retry_key` a repeat within JetStream's duplicate window is
    /// folded into the first append; without one, only this call's own publish retries are
    /// (a fresh message id per call).
    pub async fn submit(
        &self,
        op: &LoggedOp,
        retry_key: Option<&str>,
    ) -> Result<LoggedOutcome, SubLogError> {
        let s = &self.shared;
        let msg_id = match retry_key {
            Some(key) => key.to_string(),
            None => format!(
                "n-{}-{}-{}",
                s.node,
                s.boot,
                s.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ),
        };
        let msg_id = msg_id.as_str();
        let payload = Bytes::from(LogEntry::from_op(op, &s.node).encode_to_vec());
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, msg_id);
        let unavailable = |e: String| {
            metrics::counter!(m::CLUSTER_LOG_OPS, "result" => "unavailable").increment(1);
            SubLogError::Unavailable(e)
        };
        // Retried with the same message id until the deadline: while a stream leader is
        // being elected the publish fails fast ("no responders"), and a duplicate of an entry
        // that did land is folded by JetStream.
        let subject = s.subjects.log_for(op);
        let last_error = Mutex::new(String::from("no answer"));
        let ack = async {
            loop {
                let attempt = async {
                    let pending = s
                        .js
                        .publish_with_headers(subject.clone(), headers.clone(), payload.clone())
                        .await
                        .map_err(|e| e.to_string())?;
                    pending.into_future().await.map_err(|e| e.to_string())
                };
                match attempt.await {
                    Ok(ack) => return Ok::<_, String>(ack),
                    Err(e) => {
                        tracing::debug!("subscription log publish failed, retrying: {e}");
                        *last_error.lock().unwrap_or_else(|p| p.into_inner()) = e;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        };
        let ack = tokio::time::timeout(s.config.ack_timeout, ack)
            .await
            .map_err(|_| {
                let last = last_error.lock().unwrap_or_else(|p| p.into_inner()).clone();
                unavailable(format!(
                    "no quorum acknowledged in time ({last}); the change may still be applied \
                     once the log recovers: retry with the same idempotency_key (retries are folded)"
                ))
            })?
            .map_err(unavailable)?;
        let seq = ack.sequence;
        self.wait_applied(seq, s.config.apply_timeout)
            .await
            .map_err(|e| match e {
                WaitError::Timeout => {
                    unavailable(format!("stored as #{seq} but not yet applied here"))
                }
                WaitError::Stopped => unavailable("the log applier stopped".to_string()),
            })?;
        metrics::counter!(m::CLUSTER_LOG_OPS, "result" => if ack.duplicate { "duplicate" } else { "ok" })
            .increment(1);
        let outcome = s
            .outcomes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&seq)
            .cloned();
        Ok(outcome.unwrap_or_else(|| fallback_outcome(op, s.store.as_ref())))
    }

    /// Waits (at most `CATCH_UP_TIMEOUT`) until this node has applied every entry the log
    /// holds now: a read after it sees every change acknowledged anywhere before it.
    pub async fn catch_up(&self) -> Result<(), SubLogError> {
        let s = &self.shared;
        let wait = async {
            let mut stream =
                s.js.get_stream(&s.stream_name)
                    .await
                    .map_err(|e| e.to_string())?;
            let last = stream
                .info()
                .await
                .map_err(|e| e.to_string())?
                .state
                .last_sequence;
            match self.wait_applied(last, CATCH_UP_TIMEOUT).await {
                Ok(()) => Ok(()),
                Err(WaitError::Stopped) => Err("the log applier stopped".to_string()),
                Err(WaitError::Timeout) => Err(format!(
                    "this node has not caught up with the subscription log within {CATCH_UP_TIMEOUT:?}"
                )),
            }
        };
        match tokio::time::timeout(CATCH_UP_TIMEOUT, wait).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(SubLogError::Unavailable(e)),
            Err(_) => Err(SubLogError::Unavailable(format!(
                "this node has not caught up with the subscription log within {CATCH_UP_TIMEOUT:?}"
            ))),
        }
    }

    /// Waits until this node has applied `seq`. A consumer that has not delivered within
    /// `KICK_AFTER` is replaced (once per wait), so a stalled consumer costs a waiter well
    /// under a second instead of the consumer's own heartbeat-miss detection.
    async fn wait_applied(&self, seq: u64, timeout: Duration) -> Result<(), WaitError> {
        let s = &self.shared;
        let mut rx = s.applied.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        let first = deadline.min(tokio::time::Instant::now() + KICK_AFTER);
        match tokio::time::timeout_at(first, rx.wait_for(|&a| a >= seq)).await {
            Ok(r) => return r.map(|_| ()).map_err(|_| WaitError::Stopped),
            Err(_) if first >= deadline => return Err(WaitError::Timeout),
            Err(_) => {}
        }
        // At most one replacement per `KICK_AFTER`, however many requests wait.
        let now = crate::now_ms();
        let last = s.last_kick_ms.load(std::sync::atomic::Ordering::Relaxed);
        if now.saturating_sub(last) >= KICK_AFTER.as_millis() as u64
            && s.last_kick_ms
                .compare_exchange(
                    last,
                    now,
                    std::sync::atomic::Ordering::Relaxed,
                    std::sync::atomic::Ordering::Relaxed,
                )
                .is_ok()
        {
            metrics::counter!(m::CLUSTER_LOG_OPS, "result" => "consumer_replaced").increment(1);
            tracing::debug!(
                seq,
                applied = *rx.borrow(),
                "subscription log consumer silent: replacing it"
            );
            s.kick.notify_one();
        }
        let result = match tokio::time::timeout_at(deadline, rx.wait_for(|&a| a >= seq)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(WaitError::Stopped),
            Err(_) => Err(WaitError::Timeout),
        };
        result
    }

    /// Stops applying.
    pub async fn stop(&self) {
        self.shared.stop.cancel();
        self.shared.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.shared.tasks.wait()).await;
    }
}

/// Why `wait_applied` gave up.
enum WaitError {
    Timeout,
    Stopped,
}

/// The outcome of an operation whose own was forgotten (a retry long after): the state now.
fn fallback_outcome(op: &LoggedOp, store: &dyn SubscriptionStore) -> LoggedOutcome {
    let count = store
        .list(op.subscriber(), None, 0, crate::now_ms())
        .map(|p| p.total)
        .unwrap_or(0);
    match op {
        LoggedOp::Subscribe { .. } => LoggedOutcome::Subscribed(SubscribeOutcome {
            evicted: Vec::new(),
            count,
        }),
        LoggedOp::Unsubscribe { .. } => LoggedOutcome::Unsubscribed(0, count),
        LoggedOp::Snapshot { .. } => LoggedOutcome::Replaced,
        LoggedOp::Revoke { user, .. } => {
            LoggedOutcome::Revoked(store.tokens_revoked_before(user, 0).unwrap_or(0))
        }
    }
}

/// Follows the stream from the store's position with an ordered consumer (re-created after
/// an error, or when a waiter finds it silent), applying each entry in order.
async fn apply_loop(log: SubLog) {
    let s = &log.shared;
    loop {
        let start = s.store.applied_seq() + 1;
        let messages = async {
            let stream =
                s.js.get_stream(&s.stream_name)
                    .await
                    .map_err(|e| e.to_string())?;
            let consumer = stream
                .create_consumer(consumer::push::OrderedConfig {
                    deliver_subject: s.js.client().new_inbox(),
                    deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                        start_sequence: start,
                    },
                    ..Default::default()
                })
                .await
                .map_err(|e| e.to_string())?;
            consumer.messages().await.map_err(|e| e.to_string())
        };
        let mut messages = tokio::select! {
            _ = s.stop.cancelled() => return,
            m = messages => match m {
                Ok(m) => m,
                Err(e) => {
                    tracing::debug!("subscription log consumer: {e}");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    continue;
                }
            },
        };
        loop {
            let next = tokio::select! {
                _ = s.stop.cancelled() => return,
                _ = s.kick.notified() => break,
                n = messages.next() => n,
            };
            let message = match next {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    tracing::debug!("subscription log stream: {e}");
                    break;
                }
                None => break,
            };
            let Ok(info) = message.info() else {
                continue;
            };
            let seq = info.stream_sequence;
            if seq <= s.store.applied_seq() {
                continue;
            }
            apply_one(&log, seq, &message.payload);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn apply_one(log: &SubLog, seq: u64, payload: &[u8]) {
    let s = &log.shared;
    let entry = match LogEntry::decode(payload)
        .map_err(|e| e.to_string())
        .and_then(|e| {
            let node = e.node.clone();
            e.into_op().map(|op| (op, node)).map_err(|e| e.to_string())
        }) {
        Ok(entry) => entry,
        Err(e) => {
            // Skipped, but counted and logged: a malformed entry must not stop the log.
            metrics::counter!(m::CLUSTER_LOG_OPS, "result" => "invalid").increment(1);
            tracing::warn!(seq, "skipping an undecodable subscription log entry: {e}");
            s.applied.send_replace(seq);
            return;
        }
    };
    let (op, origin) = entry;
    let counts_for_rollup = !matches!(op, LoggedOp::Revoke { .. });
    match s.store.apply_logged(&op, seq) {
        Ok(outcome) => {
            let mut outcomes = s.outcomes.lock().unwrap_or_else(|p| p.into_inner());
            outcomes.insert(seq, outcome);
            while outcomes.len() > OUTCOMES_KEPT {
                outcomes.pop_first();
            }
        }
        Err(e) => {
            // The store refused (disk full, corruption): the position does not move, so the
            // entry is retried when the consumer is re-created.
            tracing::error!(seq, "cannot apply a subscription log entry: {e}");
            return;
        }
    }
    s.applied.send_replace(seq);
    metrics::gauge!(m::CLUSTER_LOG_APPLIED).set(seq as f64);
    if !counts_for_rollup {
        return;
    }
    let subscriber = op.subscriber().to_string();
    let due = {
        let mut counts = s.since_rollup.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(subscriber.clone()).or_default();
        *n += 1;
        // A snapshot restarts the count; so does a rollup this node starts now.
        let due = *n >= ROLLUP_EVERY && origin == s.node;
        if due || matches!(op, LoggedOp::Snapshot { .. }) {
            counts.remove(&subscriber);
        }
        due && !matches!(op, LoggedOp::Snapshot { .. })
    };
    if due {
        s.tasks.spawn(rollup(log.clone(), subscriber, seq));
    }
}

/// Replaces `subscriber`'s log entries with one snapshot of its list as of `seq`, only if no
/// entry for it was appended after `seq`.
async fn rollup(log: SubLog, subscriber: String, seq: u64) {
    let s = &log.shared;
    let mut entries = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let Ok(page) = s.store.list(&subscriber, after.as_deref(), 1000, 0) else {
            return;
        };
        entries.extend(page.entries.iter().cloned());
        after = page.entries.last().map(|(t, _)| t.clone());
        if !page.has_more {
            break;
        }
    }
    let op = LoggedOp::Snapshot {
        subscriber: subscriber.clone(),
        entries,
    };
    let payload = Bytes::from(LogEntry::from_op(&op, &s.node).encode_to_vec());
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(async_nats::header::NATS_ROLLUP, "sub");
    headers.insert(
        async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
        seq.to_string().as_str(),
    );
    let result = async {
        s.js.publish_with_headers(s.subjects.log(&subscriber), headers, payload)
            .await
            .map_err(|e| e.to_string())?
            .into_future()
            .await
            .map_err(|e| e.to_string())
    }
    .await;
    match result {
        Ok(_) => metrics::counter!(m::CLUSTER_LOG_OPS, "result" => "rollup").increment(1),
        // Another entry came first (or no quorum): the next operations trigger another try.
        Err(e) => tracing::debug!(subscriber, "rollup skipped: {e}"),
    }
}
