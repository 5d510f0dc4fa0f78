//! The replicated privacy log: a JetStream stream `<PREFIX>_PRIVACY` holds every privacy
//! record (settings, blocks, approvals) with one subject per key and at most one message per
//! subject, so the stream always is the current value of every key and never ages out. The node
//! a user's request reaches plans the records against its own book, appends them (acknowledged
//! by the stream's quorum), and replies once it has applied them itself; every node follows the
//! stream with an ordered consumer and applies each record to its registry, which tells its own
//! watchers whose view flipped. At start a node replays the whole stream before its listener
//! opens. Plans made at the same moment on two nodes are not serialised: each record is the
//! whole value of its key and the last one appended wins (caps may be exceeded by the number
//! of concurrent requests; see the README).

use std::future::IntoFuture;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::sublog::{SubLogConfig, SubLogError};
use super::wire::{subject_token, Subjects};
use crate::metrics as m;
use crate::privacy::PrivacyRecord;
use crate::registry::Registry;

/// Largest record payload accepted from the stream (a record holds two user ids and a few
/// numbers; NATS's own cap is 1 MiB).
pub const MAX_RECORD_BYTES: usize = 4096;

/// Why a payload is not a privacy record.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// Over [`MAX_RECORD_BYTES`].
    #[error("record of {0} bytes; at most {MAX_RECORD_BYTES}")]
    TooLarge(usize),
    /// Not a record.
    #[error("not a privacy record: {0}")]
    Malformed(String),
    /// A user id the wire would refuse.
    #[error("bad user id in a privacy record: {0}")]
    BadUser(String),
}

/// Decodes one stream message (JSON, as the single node's store keeps records).
pub fn decode(payload: &[u8]) -> Result<PrivacyRecord, RecordError> {
    if payload.len() > MAX_RECORD_BYTES {
        return Err(RecordError::TooLarge(payload.len()));
    }
    let record: PrivacyRecord =
        serde_json::from_slice(payload).map_err(|e| RecordError::Malformed(e.to_string()))?;
    let (a, b) = match &record {
        PrivacyRecord::Settings { user, .. } => (user, None),
        PrivacyRecord::Block { user, target, .. } => (user, Some(target)),
        PrivacyRecord::Approval { user, other, .. } => (user, Some(other)),
    };
    for id in std::iter::once(a).chain(b) {
        crate::model::check_user_id(id).map_err(RecordError::BadUser)?;
    }
    if b == Some(a) {
        return Err(RecordError::BadUser(format!("{a} with itself")));
    }
    Ok(record)
}

/// The subject a record's key lives on (the stream keeps its last message only).
fn subject_of(prefix: &str, record: &PrivacyRecord) -> String {
    match record {
        PrivacyRecord::Settings { user, .. } => {
            format!("{prefix}.privacy.s.{}", subject_token(user))
        }
        PrivacyRecord::Block { user, target, .. } => format!(
            "{prefix}.privacy.b.{}.{}",
            subject_token(user),
            subject_token(target)
        ),
        PrivacyRecord::Approval { user, other, .. } => format!(
            "{prefix}.privacy.a.{}.{}",
            subject_token(user),
            subject_token(other)
        ),
    }
}

/// Handle to the privacy log; a cheap clone.
#[derive(Debug, Clone)]
pub struct PrivLog {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    js: jetstream::Context,
    prefix: String,
    stream_name: String,
    registry: Registry,
    applied: watch::Sender<u64>,
    config: SubLogConfig,
    stop: CancellationToken,
    /// Asks the applier for a fresh consumer (a waiter found the current one silent).
    kick: tokio::sync::Notify,
    tasks: TaskTracker,
}

impl PrivLog {
    /// Makes sure the stream exists, replays it into `registry`, and keeps applying it.
    pub async fn start(
        client: async_nats::Client,
        subjects: &Subjects,
        prefix: &str,
        registry: Registry,
        config: SubLogConfig,
    ) -> Result<PrivLog, SubLogError> {
        let js = jetstream::ContextBuilder::new()
            .timeout(config.ack_timeout)
            .build(client);
        let stream_name = subjects.stream_named("PRIVACY");
        let deadline = Instant::now() + config.replay_timeout;
        let replicas = if js.client().server_info().cluster.is_none() {
            1
        } else {
            config.replicas
        };
        let last = loop {
            let attempt = async {
                let mut stream = js
                    .get_or_create_stream(stream::Config {
                        name: stream_name.clone(),
                        subjects: vec![format!("{prefix}.privacy.>")],
                        num_replicas: replicas,
                        max_messages_per_subject: 1,
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
                    tracing::warn!("privacy log not ready yet: {e}");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => return Err(SubLogError::Unavailable(e)),
            }
        };
        let (applied, _) = watch::channel(0);
        let log = PrivLog {
            shared: Arc::new(Shared {
                js,
                prefix: prefix.to_string(),
                stream_name,
                registry,
                applied,
                config,
                stop: CancellationToken::new(),
                kick: tokio::sync::Notify::new(),
                tasks: TaskTracker::new(),
            }),
        };
        log.shared.tasks.spawn(apply_loop(log.clone()));
        let mut rx = log.shared.applied.subscribe();
        let replayed = tokio::time::timeout_at(deadline.into(), rx.wait_for(|&a| a >= last))
            .await
            .is_ok_and(|r| r.is_ok());
        if !replayed {
            return Err(SubLogError::Unavailable(format!(
                "privacy log replay reached {} of {last} in time",
                *rx.borrow()
            )));
        }
        tracing::info!(applied = *rx.borrow(), "privacy log replayed");
        Ok(log)
    }

    /// Appends `records` in order, waits for the quorum's acks and for this node's apply.
    /// Returns the stream sequence of the last record (0 for none).
    pub async fn submit(&self, records: &[PrivacyRecord]) -> Result<u64, SubLogError> {
        let s = &self.shared;
        let unavailable = |e: String| {
            metrics::counter!(m::CLUSTER_LOG_OPS, "result" => "privacy_unavailable").increment(1);
            SubLogError::Unavailable(e)
        };
        let mut last_seq = 0;
        for record in records {
            let payload =
                Bytes::from(serde_json::to_vec(record).map_err(|e| unavailable(e.to_string()))?);
            let subject = subject_of(&s.prefix, record);
            let publish = async {
                loop {
                    let attempt = async {
                        let pending =
                            s.js.publish(subject.clone(), payload.clone())
                                .await
                                .map_err(|e| e.to_string())?;
                        pending.into_future().await.map_err(|e| e.to_string())
                    };
                    match attempt.await {
                        Ok(ack) => return ack,
                        Err(e) => {
                            tracing::debug!("privacy log publish failed, retrying: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            };
            let ack = tokio::time::timeout(s.config.ack_timeout, publish)
                .await
                .map_err(|_| {
                    unavailable(
                        "no quorum acknowledged the privacy change in time; retry".to_string(),
                    )
                })?;
            last_seq = ack.sequence;
        }
        let mut rx = s.applied.subscribe();
        let first = s.config.apply_timeout.min(Duration::from_millis(400));
        let waited = tokio::time::timeout(first, rx.wait_for(|&a| a >= last_seq))
            .await
            .map(|r| r.is_ok());
        let applied = match waited {
            Ok(applied) => applied,
            Err(_) => {
                // A silent ordered consumer: ask for a fresh one, then wait the rest.
                s.kick.notify_one();
                let mut rx = s.applied.subscribe();
                tokio::time::timeout(
                    s.config.apply_timeout.saturating_sub(first),
                    rx.wait_for(|&a| a >= last_seq),
                )
                .await
                .is_ok_and(|r| r.is_ok())
            }
        };
        if !applied {
            return Err(unavailable(format!(
                "privacy change stored as #{last_seq} but not yet applied here"
            )));
        }
        metrics::counter!(m::CLUSTER_LOG_OPS, "result" => "privacy_ok").increment(1);
        Ok(last_seq)
    }

    /// Follows the last sequence this node has applied (heartbeats carry it).
    pub fn applied(&self) -> watch::Receiver<u64> {
        self.shared.applied.subscribe()
    }

    /// Stops applying.
    pub async fn stop(&self) {
        self.shared.stop.cancel();
        self.shared.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.shared.tasks.wait()).await;
    }
}

/// Follows the stream from the last applied sequence with an ordered consumer (re-created
/// after an error, or when a waiter found it silent), applying each record in order.
async fn apply_loop(log: PrivLog) {
    let s = &log.shared;
    loop {
        let start = *s.applied.borrow() + 1;
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
                    tracing::debug!("privacy log consumer: {e}");
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
                    tracing::debug!("privacy log stream: {e}");
                    break;
                }
                None => break,
            };
            let Ok(info) = message.info() else {
                continue;
            };
            let seq = info.stream_sequence;
            if seq <= *s.applied.borrow() {
                continue;
            }
            match decode(&message.payload) {
                Ok(record) => s
                    .registry
                    .apply_privacy_records(std::slice::from_ref(&record), Instant::now()),
                Err(e) => {
                    // Skipped, but counted and logged: one bad entry must not stop the log.
                    metrics::counter!(m::CLUSTER_LOG_OPS, "result" => "privacy_invalid")
                        .increment(1);
                    tracing::warn!(seq, "skipping a privacy log entry: {e}");
                }
            }
            s.applied.send_replace(seq);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_bad_ones_are_refused() {
        let record = PrivacyRecord::Block {
            user: "a".into(),
            target: "b.c".into(),
            entry: None,
        };
        let bytes = serde_json::to_vec(&record).unwrap();
        assert_eq!(decode(&bytes).unwrap(), record);
        assert_eq!(
            subject_of("p", &record),
            format!("p.privacy.b.a.{}", subject_token("b.c"))
        );
        assert!(matches!(decode(b"{}"), Err(RecordError::Malformed(_))));
        assert!(matches!(
            decode(&vec![b' '; MAX_RECORD_BYTES + 1]),
            Err(RecordError::TooLarge(_))
        ));
        let me = serde_json::to_vec(&PrivacyRecord::Block {
            user: "a".into(),
            target: "a".into(),
            entry: None,
        })
        .unwrap();
        assert!(matches!(decode(&me), Err(RecordError::BadUser(_))));
        let empty = serde_json::to_vec(&PrivacyRecord::Approval {
            user: String::new(),
            other: "b".into(),
            state: None,
        })
        .unwrap();
        assert!(matches!(decode(&empty), Err(RecordError::BadUser(_))));
    }
}
