//! Cluster mode's event log: backend events (webhooks, `GET /v1/events`) sent once by the
//! cluster. Each node reports only the transitions of sessions it holds and appends them to a
//! JetStream stream (`<PREFIX>_EVENTS`, one subject per node, message id = event id so a
//! retried append is folded). Every node follows the stream into its `EventBus`, so any node
//! answers `GET /v1/events` with the same cluster-wide numbering (the stream sequence). One
//! node delivers webhooks: the live node with the smallest id. It records each endpoint's
//! delivered position in a JetStream key-value bucket, and whoever delivers next starts from
//! there (a gap beyond what the bus keeps becomes a `sync.required`).

use std::future::IntoFuture;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, kv, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::wire::subject_token;
use crate::events::{Event, EventBus, RECENT_EVENTS};
use crate::metrics as m;
use crate::webhooks::Progress;

/// Events waiting to be appended (beyond it they are dropped and counted).
pub const OUTBOX_CAPACITY: usize = 65_536;
/// Appends in flight at once.
const PIPELINE: usize = 256;
/// How long one event is retried before it is dropped (no quorum).
const APPEND_GIVE_UP: Duration = Duration::from_secs(30);
/// How often the deliverer records its progress and leadership is re-decided.
const LEAD_EVERY: Duration = Duration::from_millis(200);

/// Settings of the event log.
#[derive(Debug, Clone)]
pub struct EventLogConfig {
    /// Stream replicas (1 on a lone NATS server).
    pub replicas: usize,
    /// How long events are kept.
    pub max_age: Duration,
    /// Most events kept.
    pub max_msgs: i64,
}

/// Whether this node should deliver webhooks now (the smallest live node id, link up, not
/// fenced); decided by the cluster link.
pub type Deliverer = Arc<dyn Fn() -> bool + Send + Sync>;

/// The stream's name for subject prefix `prefix`.
fn stream_name(prefix: &str) -> String {
    super::wire::Subjects::new(prefix).stream_named("EVENTS")
}

/// Creates (or finds) the stream and the progress bucket, then appends `outbox`, follows the
/// stream into `bus` and decides delivery, in tasks on `tasks` until `stop`.
#[allow(clippy::too_many_arguments)]
pub async fn start(
    client: async_nats::Client,
    prefix: &str,
    node: &str,
    bus: Arc<EventBus>,
    outbox: mpsc::Receiver<Event>,
    progress: Progress,
    deliverer: Deliverer,
    config: EventLogConfig,
    stop: CancellationToken,
    tasks: &TaskTracker,
    deadline: Instant,
) -> Result<(), String> {
    let js = jetstream::new(client);
    let name = stream_name(prefix);
    let (last, created) = loop {
        let attempt = async {
            let mut stream = js
                .get_or_create_stream(stream::Config {
                    name: name.clone(),
                    subjects: vec![format!("{prefix}.events.>")],
                    num_replicas: config.replicas,
                    max_age: config.max_age,
                    max_messages: config.max_msgs,
                    discard: stream::DiscardPolicy::Old,
                    duplicate_window: Duration::from_secs(120),
                    storage: stream::StorageType::File,
                    ..Default::default()
                })
                .await
                .map_err(|e| e.to_string())?;
            let info = stream.info().await.map_err(|e| e.to_string())?;
            Ok::<_, String>((
                info.state.last_sequence,
                info.created.unix_timestamp_nanos() / 1000,
            ))
        };
        match attempt.await {
            Ok(v) => break v,
            Err(e) if Instant::now() < deadline => {
                tracing::warn!("event log not ready yet: {e}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => return Err(format!("event log: {e}")),
        }
    };
    bus.set_epoch(u64::try_from(created).unwrap_or(0));
    let bucket = loop {
        let attempt = js
            .create_or_update_key_value(kv::Config {
                bucket: format!("{name}_WEBHOOKS"),
                history: 1,
                num_replicas: config.replicas,
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await;
        match attempt {
            Ok(b) => break b,
            Err(e) if Instant::now() < deadline => {
                tracing::warn!("webhook progress bucket not ready yet: {e}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => return Err(format!("webhook progress bucket: {e}")),
        }
    };
    // The bus keeps the most recent events: start following that far back.
    let start = last.saturating_sub(RECENT_EVENTS as u64 - 1).max(1);
    tasks.spawn(append(
        js.clone(),
        format!("{prefix}.events.{}", subject_token(node)),
        outbox,
        stop.clone(),
    ));
    tasks.spawn(follow(js.clone(), name, start, bus.clone(), stop.clone()));
    tasks.spawn(lead(bucket, bus, progress, deliverer, stop));
    Ok(())
}

/// Appends this node's events in order, several in flight; a failed append is retried with
/// the same message id (folded by JetStream if it had landed) until `APPEND_GIVE_UP`.
async fn append(
    js: jetstream::Context,
    subject: String,
    mut outbox: mpsc::Receiver<Event>,
    stop: CancellationToken,
) {
    let mut batch: Vec<(String, Bytes, Instant)> = Vec::with_capacity(PIPELINE);
    loop {
        if batch.is_empty() {
            let first = tokio::select! {
                _ = stop.cancelled() => return,
                e = outbox.recv() => match e { Some(e) => e, None => return },
            };
            batch.push(encode(first));
            while batch.len() < PIPELINE {
                match outbox.try_recv() {
                    Ok(e) => batch.push(encode(e)),
                    Err(_) => break,
                }
            }
        }
        let mut pending = Vec::with_capacity(batch.len());
        for (id, payload, _) in &batch {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
            pending.push(
                js.publish_with_headers(subject.clone(), headers, payload.clone())
                    .await,
            );
        }
        let mut failed = Vec::new();
        for (item, publish) in batch.drain(..).zip(pending) {
            let acked = match publish {
                Ok(ack) => ack.into_future().await.is_ok(),
                Err(_) => false,
            };
            if !acked {
                failed.push(item);
            }
        }
        let before = failed.len();
        failed.retain(|(_, _, since)| since.elapsed() < APPEND_GIVE_UP);
        let given_up = before - failed.len();
        if given_up > 0 {
            metrics::counter!(m::EVENTS_DROPPED, "reason" => "log_unavailable")
                .increment(given_up as u64);
            tracing::warn!(given_up, "events not appended to the event log in time");
        }
        if !failed.is_empty() {
            batch = failed;
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }
}

fn encode(event: Event) -> (String, Bytes, Instant) {
    let payload = serde_json::to_vec(&event).unwrap_or_default();
    (event.id, Bytes::from(payload), Instant::now())
}

/// Follows the stream from `start` into the bus, numbering each event by its sequence;
/// re-created after an error from the last event kept.
async fn follow(
    js: jetstream::Context,
    name: String,
    start: u64,
    bus: Arc<EventBus>,
    stop: CancellationToken,
) {
    let mut next = start;
    loop {
        let messages = async {
            let stream = js.get_stream(&name).await.map_err(|e| e.to_string())?;
            let consumer = stream
                .create_consumer(consumer::push::OrderedConfig {
                    deliver_subject: js.client().new_inbox(),
                    deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                        start_sequence: next,
                    },
                    ..Default::default()
                })
                .await
                .map_err(|e| e.to_string())?;
            consumer.messages().await.map_err(|e| e.to_string())
        };
        let mut messages = tokio::select! {
            _ = stop.cancelled() => return,
            m = messages => match m {
                Ok(m) => m,
                Err(e) => {
                    tracing::debug!("event log consumer: {e}");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    continue;
                }
            },
        };
        loop {
            let message = tokio::select! {
                _ = stop.cancelled() => return,
                m = messages.next() => match m {
                    Some(Ok(m)) => m,
                    Some(Err(e)) => {
                        tracing::debug!("event log stream: {e}");
                        break;
                    }
                    None => break,
                },
            };
            let Ok(info) = message.info() else {
                continue;
            };
            let seq = info.stream_sequence;
            next = seq + 1;
            match serde_json::from_slice::<Event>(&message.payload) {
                Ok(mut event) => {
                    event.seq = seq;
                    bus.append(event);
                }
                Err(e) => {
                    metrics::counter!(m::EVENTS_DROPPED, "reason" => "undecodable").increment(1);
                    tracing::warn!(seq, "skipping an undecodable event log entry: {e}");
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The progress key of an endpoint (its label hashed: labels hold `:` and `/`).
fn progress_key(label: &str) -> String {
    let digest = Sha256::digest(label.as_bytes());
    digest[..12].iter().map(|b| format!("{b:02x}")).collect()
}

/// Decides, every `LEAD_EVERY`, whether this node delivers; while it does, records each
/// endpoint's delivered position; when it starts, resumes from the recorded positions.
async fn lead(
    bucket: kv::Store,
    bus: Arc<EventBus>,
    progress: Progress,
    deliverer: Deliverer,
    stop: CancellationToken,
) {
    let mut recorded: Vec<u64> = Vec::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(LEAD_EVERY) => {}
        }
        let mine = deliverer();
        if mine && !bus.is_delivering() {
            // Resume where the last deliverer's acknowledged position says (it is recorded
            // as soon as a deliverer starts, then after its acknowledgements: a successor
            // may repeat what was acknowledged since, never skip). With none recorded, no
            // deliverer ever ran: everything kept is delivered.
            let mut from = Vec::new();
            for (label, _) in progress.delivered() {
                let key = progress_key(&label);
                let at = match bucket.get(key.as_str()).await {
                    Ok(Some(v)) => std::str::from_utf8(&v)
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0),
                    Ok(None) => 0,
                    Err(e) => {
                        // Unknown: better a repeat than a loss.
                        tracing::warn!("cannot read webhook progress: {e}");
                        0
                    }
                };
                if let Err(e) = bucket.put(key, Bytes::from(at.to_string())).await {
                    tracing::debug!("cannot record webhook progress: {e}");
                }
                from.push(at);
            }
            tracing::info!(?from, "this node delivers webhooks now");
            recorded = from.clone();
            bus.set_delivering(true, &from);
        } else if !mine && bus.is_delivering() {
            tracing::info!("another node delivers webhooks now");
            bus.set_delivering(false, &[]);
        }
        if bus.is_delivering() {
            let delivered = progress.delivered();
            recorded.resize(delivered.len(), 0);
            for (i, (label, seq)) in delivered.iter().enumerate() {
                if *seq > recorded[i] {
                    match bucket
                        .put(progress_key(label), Bytes::from(seq.to_string()))
                        .await
                    {
                        Ok(_) => recorded[i] = *seq,
                        Err(e) => tracing::debug!("cannot record webhook progress: {e}"),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_stable() {
        assert_eq!(stream_name("presenced"), "PRESENCED_EVENTS");
        assert_eq!(stream_name("a.b-c"), "A_B_C_EVENTS");
        assert_eq!(progress_key("h:80/p"), progress_key("h:80/p"));
        assert_ne!(progress_key("h:80/p"), progress_key("h:80/q"));
        assert_eq!(progress_key("x").len(), 24);
    }
}
