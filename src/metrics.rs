//! Metric names, their descriptions, the Prometheus recorder and the tiny HTTP endpoint that
//! serves `/metrics`. Every metric is prefixed `presence_`, carries its unit in its name and
//! never has a user or connection id as a label. The rest of the crate records through the
//! `metrics` macros with the names below; this module owns nothing else, except that it
//! registers every series at zero at install (so a fresh broker lists every name the
//! operator kit in `deploy/` queries) and refreshes the process gauges (memory, descriptors)
//! at each scrape.
//!
//! The endpoint is for scrapers, not a general web server, and is bounded like the client port
//! ([`ScrapeLimits`]): a few connections at once (more are closed at once), a deadline and a
//! byte cap on the request, a deadline on the response, and a pause after a failed accept (out
//! of file descriptors) instead of a busy loop, with its warning rate-limited.

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Open client connections (after the TLS handshake).
pub const CONNECTIONS: &str = "presence_connections";
/// Users with at least one connected device.
pub const ONLINE_USERS: &str = "presence_online_users";
/// Stored subscription edges.
pub const SUBSCRIPTIONS: &str = "presence_subscriptions";
/// Channels with at least one member.
pub const CHANNELS: &str = "presence_channels";
/// Frames received, by `kind`.
pub const FRAMES_IN: &str = "presence_frames_in_total";
/// Frames sent, by `kind`.
pub const FRAMES_OUT: &str = "presence_frames_out_total";
/// Error replies, by `code`.
pub const ERRORS: &str = "presence_errors_total";
/// Refused Connects, by `reason`.
pub const AUTH_FAILURES: &str = "presence_auth_failures_total";
/// Connections closed by the server, by `code`.
pub const CLOSES: &str = "presence_closes_total";
/// Connections refused before the handshake, by `reason`.
pub const CONNECTIONS_REFUSED: &str = "presence_connections_refused_total";
/// TLS handshake duration.
pub const TLS_HANDSHAKE_SECONDS: &str = "presence_tls_handshake_duration_seconds";
/// TLS handshakes in progress.
pub const TLS_HANDSHAKES_IN_FLIGHT: &str = "presence_tls_handshakes_in_flight";
/// Failed TLS handshakes, by `reason`.
pub const TLS_HANDSHAKE_FAILURES: &str = "presence_tls_handshake_failures_total";
/// Completed TLS handshakes, by `kind`: `full` (certificate signature; a HelloRetryRequest
/// counts as full) or `resumed` (a session ticket).
pub const TLS_HANDSHAKES: &str = "presence_tls_handshakes_total";
/// Session tickets, by `result`: `issued`, `not_issued` (no key yet, or state too large),
/// `decrypted` (opened with a live key: the handshake may still fail, e.g. on a bad binder; resumptions are `presence_tls_handshakes_total{kind="resumed"}`), `unknown_key` (expired, or another server's), `invalid` (malformed or forged).
pub const TLS_TICKETS: &str = "presence_tls_tickets_total";
/// Cluster mode: rounds of fetching the shared ticket-key secrets from NATS, by `result`
/// (`ok`, `failed`).
pub const TLS_TICKET_KEY_SYNCS: &str = "presence_tls_ticket_key_syncs_total";
/// WebSocket upgrade requests by result (`ok`, `timeout`, `closed`, `bad_request`, `path`,
/// `origin`, `too_large`, `subprotocol`).
pub const WS_UPGRADES: &str = "presence_ws_upgrades_total";
/// Privacy changes applied, by `op` (`set_invisible`, `block`, `unblock`, ...).
pub const PRIVACY_OPS: &str = "presence_privacy_ops_total";
/// Presence events the privacy rule withheld from a watcher.
pub const PRIVACY_WITHHELD: &str = "presence_privacy_withheld_total";
/// From receiving a change to writing it into a watcher's socket.
pub const FANOUT_LATENCY_SECONDS: &str = "presence_fanout_latency_seconds";
/// Events handed to watchers' outbound queues (including coalesced ones).
pub const DELIVERIES: &str = "presence_deliveries_total";
/// Events folded into a later state because a watcher's queue was full.
pub const COALESCED: &str = "presence_coalesced_events_total";
/// Watchers disconnected for not reading.
pub const SLOW_CONSUMER_DISCONNECTS: &str = "presence_slow_consumer_disconnects_total";
/// Bytes written to client sockets.
pub const BYTES_OUT: &str = "presence_bytes_out_total";
/// Time of one durable flush of the subscription store.
pub const STORE_COMMIT_SECONDS: &str = "presence_store_commit_duration_seconds";
/// Time to open and load the subscription store at start.
pub const STORE_RECOVERY_SECONDS: &str = "presence_store_recovery_duration_seconds";
/// Expired subscriptions removed by the sweeper.
pub const SUBSCRIPTIONS_EXPIRED: &str = "presence_subscriptions_expired_total";
/// Cluster mode: peer nodes by state (`up`; `dead` counts incarnations declared dead).
pub const CLUSTER_PEERS: &str = "presence_cluster_peers";
/// Cluster mode: 1 while this node is fenced (cut off, refusing Connect), else 0.
pub const CLUSTER_FENCED: &str = "presence_cluster_fenced";
/// Cluster mode: times this node fenced itself, by reason (`nats_lost`, `clock_jump`).
pub const CLUSTER_FENCES: &str = "presence_cluster_fences_total";
/// Cluster mode: deltas by direction (`out` published, `in` applied, `stale` ignored,
/// `dropped` when the outgoing queue was full, `invalid` undecodable).
pub const CLUSTER_DELTAS: &str = "presence_cluster_deltas_total";
/// Cluster mode: from a delta's send (origin clock) to its apply here.
pub const CLUSTER_REPLICATION_LAG_SECONDS: &str = "presence_cluster_replication_lag_seconds";
/// Cluster mode: gaps detected, by how (`sequence`, `digest`, `new_peer`).
pub const CLUSTER_GAPS: &str = "presence_cluster_gaps_total";
/// Cluster mode: state transfers from peers, by result (`ok`, `failed`).
pub const CLUSTER_STATE_TRANSFERS: &str = "presence_cluster_state_transfers_total";
/// Cluster mode: sessions held by other nodes that this node replicates.
pub const CLUSTER_REMOTE_SESSIONS: &str = "presence_cluster_remote_sessions";
/// Cluster mode: this node's digest of its own sessions (52 bits; equal on every node's
/// `presence_cluster_peer_digest{node=...}` for this node when replicas agree).
pub const CLUSTER_DIGEST: &str = "presence_cluster_digest";
/// Cluster mode: this node's digest of each peer's sessions, by node.
pub const CLUSTER_PEER_DIGEST: &str = "presence_cluster_peer_digest";
/// Cluster mode: subscription-log operations, by result (`ok`, `duplicate`, `unavailable`,
/// `rollup`, `invalid`).
pub const CLUSTER_LOG_OPS: &str = "presence_cluster_log_operations_total";
/// Admin API requests, by HTTP status.
pub const ADMIN_REQUESTS: &str = "presence_admin_requests_total";
/// Admin API requests refused for an unknown or missing key.
pub const ADMIN_AUTH_FAILURES: &str = "presence_admin_auth_failures_total";
/// Backend events lost before the event log (cluster mode), by reason.
pub const EVENTS_DROPPED: &str = "presence_events_dropped_total";
/// Backend events numbered by the event bus, by type.
pub const EVENTS: &str = "presence_events_total";
/// Cluster mode: the last subscription-log sequence applied into this node's store.
pub const CLUSTER_LOG_APPLIED: &str = "presence_cluster_log_applied_sequence";

// ---- Embedding (`crate::embed`): the in-process presence hook ----

/// Events handed to the embedder's presence hook.
pub const HOOK_EVENTS: &str = "presence_hook_events_total";
/// Events the presence hook never saw, by reason (`queue_full`, `stopped`).
pub const HOOK_DROPPED: &str = "presence_hook_events_dropped_total";
/// Calls of the presence hook that panicked.
pub const HOOK_PANICS: &str = "presence_hook_panics_total";

fn describe_embedding() {
    use metrics::describe_counter;
    describe_counter!(HOOK_EVENTS, "Events handed to the embedder's presence hook");
    describe_counter!(
        HOOK_DROPPED,
        "Events dropped before the presence hook, by reason (its queue was full)"
    );
    describe_counter!(HOOK_PANICS, "Presence hook calls that panicked");
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Latency buckets from 50 µs to 10 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

/// Installs the Prometheus recorder as the process-wide recorder (once; later calls return the
/// same handle) and describes every metric.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .expect("bucket list is non-empty")
                .build_recorder();
            let handle = recorder.handle();
            // Fails only when another recorder was installed first (an embedding program's);
            // then that one receives our metrics and this handle renders nothing.
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
            }
            describe();
            register_at_zero();
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(
        CONNECTIONS,
        "Open client connections after the TLS handshake"
    );
    describe_gauge!(ONLINE_USERS, "Users with at least one connected device");
    describe_gauge!(SUBSCRIPTIONS, "Stored subscription edges");
    describe_gauge!(CHANNELS, "Channels with at least one member");
    describe_counter!(FRAMES_IN, "Frames received, by kind");
    describe_counter!(FRAMES_OUT, "Frames sent, by kind");
    describe_counter!(ERRORS, "Error replies sent, by code");
    describe_counter!(AUTH_FAILURES, "Refused Connect attempts, by reason");
    describe_counter!(CLOSES, "Connections closed by the server, by close code");
    describe_counter!(
        CONNECTIONS_REFUSED,
        "Connections refused before the handshake"
    );
    describe_histogram!(
        TLS_HANDSHAKE_SECONDS,
        Unit::Seconds,
        "TLS handshake duration"
    );
    describe_gauge!(TLS_HANDSHAKES_IN_FLIGHT, "TLS handshakes in progress");
    describe_counter!(TLS_HANDSHAKE_FAILURES, "Failed TLS handshakes, by reason");
    describe_counter!(
        TLS_HANDSHAKES,
        "Completed TLS handshakes, by kind (full, resumed)"
    );
    describe_counter!(TLS_TICKETS, "TLS session tickets, by result");
    describe_counter!(PRIVACY_OPS, "Privacy changes applied, by op");
    describe_counter!(
        PRIVACY_WITHHELD,
        "Presence events the privacy rule withheld from a watcher"
    );
    describe_counter!(
        TLS_TICKET_KEY_SYNCS,
        "Cluster mode: fetches of the shared ticket-key secrets, by result"
    );
    describe_counter!(
        WS_UPGRADES,
        "WebSocket upgrade requests by result: ok, or why they were refused"
    );
    describe_histogram!(
        FANOUT_LATENCY_SECONDS,
        Unit::Seconds,
        "From receiving a presence change to writing it into a watcher's socket"
    );
    describe_counter!(DELIVERIES, "Events handed to watchers' outbound queues");
    describe_counter!(
        COALESCED,
        "Events folded into a later state for a slow watcher"
    );
    describe_counter!(
        SLOW_CONSUMER_DISCONNECTS,
        "Watchers disconnected for not reading"
    );
    describe_counter!(BYTES_OUT, Unit::Bytes, "Bytes written to client sockets");
    describe_counter!(SUBSCRIPTIONS_EXPIRED, "Expired subscriptions swept");
    describe_gauge!(CLUSTER_PEERS, "Cluster peer nodes, by state");
    describe_gauge!(
        CLUSTER_FENCED,
        "1 while this node is fenced from its cluster"
    );
    describe_counter!(CLUSTER_FENCES, "Times this node fenced itself, by reason");
    describe_counter!(CLUSTER_DELTAS, "Presence deltas, by direction");
    describe_histogram!(
        CLUSTER_REPLICATION_LAG_SECONDS,
        Unit::Seconds,
        "From a delta's send on its origin node to its apply on this one"
    );
    describe_counter!(CLUSTER_GAPS, "Replication gaps detected, by how");
    describe_counter!(
        CLUSTER_STATE_TRANSFERS,
        "State transfers from peers, by result"
    );
    describe_gauge!(
        CLUSTER_REMOTE_SESSIONS,
        "Sessions held by other nodes, replicated here"
    );
    describe_counter!(CLUSTER_LOG_OPS, "Subscription-log operations, by result");
    describe_counter!(EVENTS, "Backend events (webhooks, GET /v1/events), by type");
    crate::webhooks::describe();
    crate::mqtt_bridge::describe();
    describe_counter!(
        EVENTS_DROPPED,
        "Cluster mode: backend events lost before the event log, by reason"
    );
    describe_counter!(ADMIN_REQUESTS, "Admin API requests, by HTTP status");
    describe_counter!(
        ADMIN_AUTH_FAILURES,
        "Admin API requests with a missing or unknown key"
    );
    describe_gauge!(
        CLUSTER_LOG_APPLIED,
        "Last subscription-log sequence applied here"
    );
    describe_gauge!(CLUSTER_DIGEST, "Digest of this node's own sessions");
    describe_gauge!(
        CLUSTER_PEER_DIGEST,
        "This node's digest of each peer's sessions"
    );
    describe_histogram!(
        STORE_COMMIT_SECONDS,
        Unit::Seconds,
        "Duration of one durable (group) flush of the subscription store"
    );
    describe_gauge!(
        STORE_RECOVERY_SECONDS,
        Unit::Seconds,
        "Time taken to open and load the subscription store at start"
    );
    describe_gauge!(
        PROCESS_RESIDENT_MEMORY_BYTES,
        Unit::Bytes,
        "Resident memory of the broker process"
    );
    describe_gauge!(
        PROCESS_OPEN_FDS,
        "Open file descriptors of the broker process"
    );
    describe_gauge!(
        PROCESS_MAX_FDS,
        "Soft open-file limit of the broker process"
    );
    describe_embedding();
}

// Operator kit (deploy/): every series the Grafana dashboard and the alert rules read exists
// from the start, and the process gauges they use for memory and descriptors.

/// Resident memory of the broker process (Linux: `VmRSS`), refreshed at each scrape.
pub const PROCESS_RESIDENT_MEMORY_BYTES: &str = "presence_process_resident_memory_bytes";
/// Open file descriptors of the broker process (one per client connection, plus listeners,
/// the store and logs), refreshed at each scrape.
pub const PROCESS_OPEN_FDS: &str = "presence_process_open_fds";
/// The process's soft open-file limit (after the broker raised it at start).
pub const PROCESS_MAX_FDS: &str = "presence_process_max_fds";

/// Registers every metric at zero, so a fresh broker's `/metrics` already lists every name (a
/// dashboard shows 0 instead of "no data", `rate()` sees the first increment, and an alert on
/// a series that has never moved can still evaluate). Labelled counters get the label values
/// that dashboards and alerts select on. Cluster series read 0 on a single node (no peers, not
/// fenced). Webhook series are registered per endpoint by `crate::webhooks` when it starts.
/// Gauges are incremented by 0, never set: this cannot undo a change made before it.
fn register_at_zero() {
    use metrics::{counter, gauge, histogram};
    for name in [
        CONNECTIONS,
        ONLINE_USERS,
        SUBSCRIPTIONS,
        CHANNELS,
        TLS_HANDSHAKES_IN_FLIGHT,
        STORE_RECOVERY_SECONDS,
        CLUSTER_FENCED,
        CLUSTER_REMOTE_SESSIONS,
        CLUSTER_LOG_APPLIED,
        PROCESS_RESIDENT_MEMORY_BYTES,
        PROCESS_OPEN_FDS,
        PROCESS_MAX_FDS,
    ] {
        gauge!(name).increment(0.0);
    }
    for state in ["up", "dead"] {
        gauge!(CLUSTER_PEERS, "state" => state).increment(0.0);
    }
    for name in [
        DELIVERIES,
        COALESCED,
        SLOW_CONSUMER_DISCONNECTS,
        BYTES_OUT,
        SUBSCRIPTIONS_EXPIRED,
        PRIVACY_WITHHELD,
        ADMIN_AUTH_FAILURES,
    ] {
        counter!(name).increment(0);
    }
    for name in [
        TLS_HANDSHAKE_SECONDS,
        FANOUT_LATENCY_SECONDS,
        STORE_COMMIT_SECONDS,
        CLUSTER_REPLICATION_LAG_SECONDS,
    ] {
        // Registering is enough: the exporter renders its buckets, sum and count at 0.
        let _ = histogram!(name);
    }
    let labelled: &[(&'static str, &'static str, &[&'static str])] = &[
        (
            AUTH_FAILURES,
            "reason",
            &[
                "malformed",
                "bad_signature",
                "expired",
                "not_yet_valid",
                "bad_issuer",
                "bad_audience",
                "bad_subject",
                "lifetime",
                "revoked",
                "banned",
                "timeout",
                "panic",
            ],
        ),
        (
            CONNECTIONS_REFUSED,
            "reason",
            &[
                "address_accept_rate",
                "address_connection_limit",
                "address_table_full",
                "accept_rate",
                "connection_limit",
            ],
        ),
        (
            TLS_HANDSHAKE_FAILURES,
            "reason",
            &["error", "timeout", "queue_timeout", "address_limit"],
        ),
        (TLS_HANDSHAKES, "kind", &["full", "resumed"]),
        (
            TLS_TICKETS,
            "result",
            &[
                "issued",
                "not_issued",
                "decrypted",
                "unknown_key",
                "invalid",
            ],
        ),
        (TLS_TICKET_KEY_SYNCS, "result", &["ok", "failed"]),
        (
            WS_UPGRADES,
            "result",
            &[
                "ok",
                "timeout",
                "closed",
                "bad_request",
                "path",
                "origin",
                "too_large",
                "subprotocol",
            ],
        ),
        (
            PRIVACY_OPS,
            "op",
            &[
                "set_invisible",
                "set_audience",
                "block",
                "unblock",
                "request",
                "answer",
            ],
        ),
        (CLOSES, "code", &["slow_consumer", "server_shutdown"]),
        (FRAMES_IN, "kind", &["connect"]),
        (FRAMES_OUT, "kind", &["conn_ack"]),
        (
            CLUSTER_FENCES,
            "reason",
            &["nats_lost", "clock_jump", "declared_dead"],
        ),
        (
            CLUSTER_DELTAS,
            "direction",
            &["out", "in", "stale", "dropped", "invalid"],
        ),
        (
            CLUSTER_GAPS,
            "how",
            &["sequence", "digest", "new_peer", "slow_consumer"],
        ),
        (CLUSTER_STATE_TRANSFERS, "result", &["ok", "failed"]),
        (
            CLUSTER_LOG_OPS,
            "result",
            &["ok", "duplicate", "unavailable", "rollup", "invalid"],
        ),
        (
            EVENTS_DROPPED,
            "reason",
            &["log_queue_full", "log_unavailable", "undecodable"],
        ),
        (ADMIN_REQUESTS, "status", &["200"]),
    ];
    for (name, label, values) in labelled {
        for value in *values {
            counter!(*name, *label => *value).increment(0);
        }
    }
    for code in (0..=i32::from(u8::MAX)).filter_map(|c| crate::pb::ErrorCode::try_from(c).ok()) {
        if code != crate::pb::ErrorCode::Unspecified {
            counter!(ERRORS, "code" => code.as_str_name()).increment(0);
        }
    }
    for kind in crate::events::EventType::ALL {
        counter!(EVENTS, "type" => kind.name()).increment(0);
    }
    record_process_metrics();
}

/// Refreshes the process gauges from `/proc/self` (Linux; elsewhere they stay at 0).
fn record_process_metrics() {
    use metrics::gauge;
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        let rss_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok());
        if let Some(kib) = rss_kib {
            gauge!(PROCESS_RESIDENT_MEMORY_BYTES).set(kib * 1024.0);
        }
    }
    if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
        // The directory handle itself is one of the entries.
        let open = entries.count().saturating_sub(1);
        gauge!(PROCESS_OPEN_FDS).set(open as f64);
    }
    if let Ok(limits) = std::fs::read_to_string("/proc/self/limits") {
        // "Max open files            1024                 524288               files"
        let soft = limits
            .lines()
            .find_map(|l| l.strip_prefix("Max open files"))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok());
        if let Some(soft) = soft {
            gauge!(PROCESS_MAX_FDS).set(soft);
        }
    }
}

/// Bounds of the metrics endpoint. The broker uses the defaults; tests shrink them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScrapeLimits {
    /// Scrape connections served at once; a connection beyond this is closed at once.
    pub max_connections: usize,
    /// Deadline for the request head (up to its blank line) from accept.
    pub read_timeout: Duration,
    /// Deadline for writing the whole response.
    pub write_timeout: Duration,
    /// Request head bytes read at most; a longer head is closed without a reply.
    pub max_request_bytes: usize,
    /// Pause after a failed accept (EMFILE and the like) before accepting again.
    pub accept_error_backoff: Duration,
}

/// Default [`ScrapeLimits::max_connections`].
pub const MAX_SCRAPE_CONNECTIONS: usize = 16;
/// Default [`ScrapeLimits::read_timeout`] and [`ScrapeLimits::write_timeout`].
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);
/// Default [`ScrapeLimits::max_request_bytes`].
pub const MAX_SCRAPE_REQUEST_BYTES: usize = 8192;
/// Default [`ScrapeLimits::accept_error_backoff`].
pub const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);
/// At most one warning this often for failed accepts, and one for refused scrapes.
const WARN_EVERY: Duration = Duration::from_secs(10);

impl Default for ScrapeLimits {
    fn default() -> Self {
        ScrapeLimits {
            max_connections: MAX_SCRAPE_CONNECTIONS,
            read_timeout: SCRAPE_TIMEOUT,
            write_timeout: SCRAPE_TIMEOUT,
            max_request_bytes: MAX_SCRAPE_REQUEST_BYTES,
            accept_error_backoff: ACCEPT_ERROR_BACKOFF,
        }
    }
}

/// Lets one log line through per interval and counts the ones held back in between.
#[derive(Debug)]
pub(crate) struct RateLimitedLog {
    every: Duration,
    last: Option<Instant>,
    held_back: u64,
}

impl RateLimitedLog {
    pub(crate) fn new(every: Duration) -> RateLimitedLog {
        RateLimitedLog {
            every,
            last: None,
            held_back: 0,
        }
    }

    /// `Some(held back since the last line)` when a line may be logged at `now`.
    pub(crate) fn hit(&mut self, now: Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|last| now.saturating_duration_since(last) < self.every)
        {
            self.held_back += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.held_back))
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown` is cancelled, with the default
/// [`ScrapeLimits`]. Any other path is a 404. Also runs the recorder's periodic upkeep.
pub async fn serve(listener: TcpListener, handle: PrometheusHandle, shutdown: CancellationToken) {
    let upkeep_handle = handle.clone();
    let upkeep_shutdown = shutdown.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = upkeep_shutdown.cancelled() => break,
                _ = tick.tick() => upkeep_handle.run_upkeep(),
            }
        }
    });
    serve_with(
        listener,
        move || {
            record_process_metrics();
            handle.render()
        },
        shutdown,
        ScrapeLimits::default(),
    )
    .await;
}

/// Serves `GET /metrics` on `listener`, answered with `render()`, under `limits`, until
/// `shutdown` is cancelled. Cancel-safe: dropping it stops accepting; scrapes in progress end
/// at their deadlines or at `shutdown`.
pub async fn serve_with<F>(
    listener: TcpListener,
    render: F,
    shutdown: CancellationToken,
    limits: ScrapeLimits,
) where
    F: Fn() -> String + Send + Sync + 'static,
{
    let listener = &listener;
    let accept = move || async move { listener.accept().await.map(|(socket, _)| socket) };
    accept_loop(accept, Arc::new(render), shutdown, limits).await;
}

/// The endpoint's accept loop over any source of connections (a listener, or a test's fake).
async fn accept_loop<S, A, Fut, F>(
    mut accept: A,
    render: Arc<F>,
    shutdown: CancellationToken,
    limits: ScrapeLimits,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    A: FnMut() -> Fut,
    Fut: Future<Output = std::io::Result<S>>,
    F: Fn() -> String + Send + Sync + 'static,
{
    let limits = Arc::new(limits);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut accept_warnings = RateLimitedLog::new(WARN_EVERY);
    let mut refusal_warnings = RateLimitedLog::new(WARN_EVERY);
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = accept() => accepted,
        };
        let socket = match accepted {
            Ok(socket) => socket,
            Err(e) => {
                if let Some(held_back) = accept_warnings.hit(Instant::now()) {
                    tracing::warn!(
                        held_back,
                        "metrics accept failed: {e}; pausing {:?}",
                        limits.accept_error_backoff
                    );
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(limits.accept_error_backoff) => continue,
                }
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if let Some(held_back) = refusal_warnings.hit(Instant::now()) {
                tracing::warn!(
                    held_back,
                    max = limits.max_connections,
                    "metrics endpoint at its connection cap; closing a new connection"
                );
            }
            drop(socket);
            continue;
        };
        let render = render.clone();
        let limits = limits.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut socket = socket;
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = scrape(&mut socket, &*render, &limits) => {}
            }
            // The slot is free before the peer sees the close, so a scraper that saw one
            // connection end can always open the next.
            drop(slot);
            drop(socket);
        });
    }
}

/// Reads one request head and answers it, each under its deadline. Errors only end the
/// connection, so they are not reported.
async fn scrape<S>(socket: &mut S, render: &(dyn Fn() -> String + Sync), limits: &ScrapeLimits)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // The request head, capped at `max_request_bytes`.
    let mut head = vec![0u8; limits.max_request_bytes];
    let mut len = 0;
    let read = tokio::time::timeout(limits.read_timeout, async {
        loop {
            if len == head.len() {
                return false;
            }
            let n = match socket.read(&mut head[len..]).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => n,
            };
            let from = len.saturating_sub(3);
            len += n;
            if head[from..len].windows(4).any(|w| w == b"\r\n\r\n") {
                return true;
            }
        }
    })
    .await;
    if read != Ok(true) {
        return;
    }
    let (status, body) = if head.starts_with(b"GET /metrics ") {
        ("200 OK", render())
    } else {
        ("404 Not Found", String::new())
    };
    let response_head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = tokio::time::timeout(limits.write_timeout, async {
        socket.write_all(response_head.as_bytes()).await?;
        socket.write_all(body.as_bytes()).await?;
        socket.shutdown().await
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_storm_of_accept_errors_logs_one_line_per_interval() {
        let mut log = RateLimitedLog::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(log.hit(t0), Some(0));
        for ms in 1..=1000 {
            assert_eq!(log.hit(t0 + Duration::from_millis(ms)), None);
        }
        assert_eq!(log.hit(t0 + Duration::from_secs(10)), Some(1000));
        assert_eq!(log.hit(t0 + Duration::from_secs(11)), None);
    }

    #[tokio::test]
    async fn failed_accepts_pause_instead_of_spinning() {
        // An acceptor out of file descriptors 20 times, then shut down. Without the pause the
        // loop would run through all 20 at once.
        const ERRORS: u32 = 20;
        let limits = ScrapeLimits {
            accept_error_backoff: Duration::from_millis(5),
            ..ScrapeLimits::default()
        };
        let pause = limits.accept_error_backoff;
        let shutdown = CancellationToken::new();
        let mut calls = 0u32;
        let stop = shutdown.clone();
        let accept = || {
            calls += 1;
            if calls > ERRORS {
                stop.cancel();
            }
            let emfile = std::io::Error::from_raw_os_error(24);
            async move { Err::<tokio::io::DuplexStream, _>(emfile) }
        };
        let started = Instant::now();
        accept_loop(accept, Arc::new(String::new), shutdown.clone(), limits).await;
        assert!(
            started.elapsed() >= pause * ERRORS,
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn a_scrape_is_answered_and_others_are_404() {
        let limits = ScrapeLimits::default();
        for (request, status) in [
            (&b"GET /metrics HTTP/1.1\r\n\r\n"[..], "HTTP/1.1 200 OK"),
            (&b"GET / HTTP/1.1\r\n\r\n"[..], "HTTP/1.1 404 Not Found"),
        ] {
            let (mut client, mut server) = tokio::io::duplex(1 << 16);
            client.write_all(request).await.unwrap();
            scrape(&mut server, &|| "m 1\n".to_string(), &limits).await;
            drop(server);
            let mut response = String::new();
            client.read_to_string(&mut response).await.unwrap();
            assert!(response.starts_with(status), "{response}");
        }
    }
}
