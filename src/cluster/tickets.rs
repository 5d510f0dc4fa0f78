//! Cluster mode's share of TLS session tickets: every node must open every node's tickets, so a
//! phone that moves node still resumes. The cluster keeps one random 32-byte secret per
//! rotation period in a JetStream key-value bucket (`<PREFIX>_TLS_TICKETS`, key
//! `r<rotation_secs>.p<period>`). Whichever node first needs a period's secret creates it
//! (create-if-absent, so racing nodes end up with the same one); the others read it. Each node
//! holds the previous, current and next period's secret in `tls_tickets::TicketKeys`; the next
//! one is fetched a whole period ahead, so a NATS outage shorter than a period never leaves a
//! boundary without a key. The bucket lives in the NATS servers' memory (secrets never reach
//! their disks or backups) and expires entries after four periods: old keys are erased
//! cluster-wide, which is what bounds the damage of a leak (a leaked key opens only the
//! tickets of its own two periods). If the bucket lost a secret a node still holds, that node
//! writes it back. This module only moves bytes; the rules are in `tls_tickets`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv, stream};
use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics as m;
use crate::tls_tickets::{unix_now, TicketKeys, SECRET_BYTES};

/// How often the secrets are fetched again (and the next period's made) when all is well.
pub const REFRESH: Duration = Duration::from_secs(60);
/// How soon a failed fetch is retried.
pub const RETRY: Duration = Duration::from_secs(5);
/// Longest a start-up waits for the first fetch before the node opens without tickets (the
/// refresher keeps trying; clients then pay full handshakes meanwhile, nothing else changes).
pub const START_WAIT: Duration = Duration::from_secs(10);
/// Bound on one round of fetches.
const ROUND_TIMEOUT: Duration = Duration::from_secs(10);
/// Entries expire after this many rotation periods (a period's secret is made at most one
/// period before it starts and opens tickets until the period after it ends: three periods).
const KEPT_PERIODS: u32 = 4;

/// The bucket's name for subject prefix `prefix`.
pub fn bucket_name(prefix: &str) -> String {
    super::wire::Subjects::new(prefix).stream_named("TLS_TICKETS")
}

/// The key of `period`'s secret. The rotation is part of it: nodes configured with different
/// periods do not share keys (they would disagree on which period a time falls in).
pub fn key_name(rotation_secs: u64, period: u64) -> String {
    format!("r{rotation_secs}.p{period}")
}

/// Fetches (or creates) the current secrets, waiting up to [`START_WAIT`], then keeps them
/// fresh in a task on `tasks` until `stop`. Never fails: without NATS the node issues no
/// tickets until the secrets arrive.
pub async fn start(
    client: async_nats::Client,
    prefix: &str,
    replicas: usize,
    keys: Arc<TicketKeys>,
    stop: CancellationToken,
    tasks: &TaskTracker,
) {
    let js = jetstream::new(client);
    let name = bucket_name(prefix);
    let deadline = Instant::now() + START_WAIT;
    let mut store = None;
    loop {
        match round(&js, &name, replicas, &keys, &mut store).await {
            Ok(()) => break,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("TLS ticket secrets not available yet: {e}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => {
                tracing::warn!(
                    "TLS ticket secrets not available ({e}); no tickets until they are, \
                     retrying every {RETRY:?}"
                );
                break;
            }
        }
    }
    tasks.spawn(refresh(js, name, replicas, keys, store, stop));
}

async fn refresh(
    js: jetstream::Context,
    name: String,
    replicas: usize,
    keys: Arc<TicketKeys>,
    mut store: Option<kv::Store>,
    stop: CancellationToken,
) {
    let mut ok = !keys.live_periods().is_empty();
    loop {
        let wait = if ok { REFRESH } else { RETRY };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        ok = match round(&js, &name, replicas, &keys, &mut store).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("cannot refresh the TLS ticket secrets: {e}");
                false
            }
        };
    }
}

/// One round: the bucket (found or created once), then each wanted period's secret.
async fn round(
    js: &jetstream::Context,
    name: &str,
    replicas: usize,
    keys: &TicketKeys,
    store: &mut Option<kv::Store>,
) -> Result<(), String> {
    let result = tokio::time::timeout(ROUND_TIMEOUT, async {
        if store.is_none() {
            *store = Some(bucket(js, name, replicas, keys.rotation_secs()).await?);
        }
        let Some(store) = store.as_ref() else {
            return Err("no bucket".to_string());
        };
        sync(store, keys).await
    })
    .await
    .unwrap_or_else(|_| Err(format!("no answer within {ROUND_TIMEOUT:?}")));
    let label = if result.is_ok() { "ok" } else { "failed" };
    metrics::counter!(m::TLS_TICKET_KEY_SYNCS, "result" => label).increment(1);
    result
}

async fn bucket(
    js: &jetstream::Context,
    name: &str,
    replicas: usize,
    rotation_secs: u64,
) -> Result<kv::Store, String> {
    if let Ok(store) = js.get_key_value(name).await {
        return Ok(store);
    }
    let created = js
        .create_key_value(kv::Config {
            bucket: name.to_string(),
            description: "presenced: TLS session-ticket secrets, one per rotation period".into(),
            history: 1,
            max_age: Duration::from_secs(rotation_secs) * KEPT_PERIODS,
            // No `max_value_size`: with one, nats-server (2.15) refused the bucket's reads
            // ("message size exceeds maximum allowed"). `parse` takes exactly 32 bytes, and
            // NATS's max_payload bounds what a read can bring.
            storage: stream::StorageType::Memory,
            num_replicas: replicas,
            ..Default::default()
        })
        .await;
    match created {
        Ok(store) => Ok(store),
        // Another node created it first.
        Err(e) => js
            .get_key_value(name)
            .await
            .map_err(|_| format!("ticket bucket {name}: {e}")),
    }
}

fn parse(value: Option<Bytes>) -> Result<Option<[u8; SECRET_BYTES]>, String> {
    match value {
        None => Ok(None),
        Some(v) => <[u8; SECRET_BYTES]>::try_from(v.as_ref())
            .map(Some)
            .map_err(|_| format!("a ticket secret of {} bytes, not {SECRET_BYTES}", v.len())),
    }
}

/// Installs the wanted periods' secrets, creating the current and next when absent (with the
/// one this node holds, if any, so a bucket that lost it gets it back).
async fn sync(store: &kv::Store, keys: &TicketKeys) -> Result<(), String> {
    let now = unix_now();
    let rotation = keys.rotation_secs();
    for (period, create) in keys.wanted_periods(now) {
        let key = key_name(rotation, period);
        let found = parse(store.get(key.as_str()).await.map_err(|e| e.to_string())?)?;
        let secret = match found {
            Some(secret) => secret,
            None if !create => continue,
            None => {
                let mine = match keys.secret(period) {
                    Some(secret) => secret,
                    None => keys.random_secret().map_err(|e| e.to_string())?,
                };
                match store
                    .create(key.as_str(), Bytes::copy_from_slice(&mine))
                    .await
                {
                    Ok(_) => mine,
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                        parse(store.get(key.as_str()).await.map_err(|e| e.to_string())?)?
                            .ok_or_else(|| format!("{key} vanished while being created"))?
                    }
                    Err(e) => return Err(e.to_string()),
                }
            }
        };
        keys.install(period, secret, now);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_prefix_and_the_rotation() {
        assert_eq!(bucket_name("presenced"), "PRESENCED_TLS_TICKETS");
        assert_eq!(bucket_name("acme.eu-1"), "ACME_EU_1_TLS_TICKETS");
        assert_eq!(key_name(21_600, 81_234), "r21600.p81234");
    }

    #[test]
    fn only_secrets_of_the_right_size_are_taken() {
        assert_eq!(parse(None).unwrap(), None);
        assert!(parse(Some(Bytes::from_static(b"short"))).is_err());
        let v = [7u8; SECRET_BYTES];
        assert_eq!(parse(Some(Bytes::copy_from_slice(&v))).unwrap(), Some(v));
    }
}
