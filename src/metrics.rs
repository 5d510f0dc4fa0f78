//! Metric names, their descriptions, the Prometheus recorder and the tiny HTTP endpoint that
//! serves `/metrics`. Every metric is prefixed `presence_`, carries its unit in its name and
//! never has a user or connection id as a label. The rest of the crate records through the
//! `metrics` macros with the names below; this module owns nothing else.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
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
}

/// Serves `GET /metrics` on `listener` until `shutdown` is cancelled. Any other path is a 404.
/// Each request is read with a deadline and a size cap; the endpoint is for scrapers, not a
/// general web server.
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
    loop {
        let (mut socket, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!("metrics accept failed: {e}");
                    continue;
                }
            },
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let mut request = Vec::with_capacity(512);
            let mut chunk = [0u8; 512];
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
                    let n = socket.read(&mut chunk).await?;
                    if n == 0 {
                        break;
                    }
                    request.extend_from_slice(&chunk[..n]);
                }
                Ok::<_, std::io::Error>(())
            })
            .await;
            if !matches!(read, Ok(Ok(()))) {
                return;
            }
            let response = if request.starts_with(b"GET /metrics ") {
                let body = handle.render();
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                    body.len(),
                    body
                )
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into()
            };
            let _ = socket.write_all(response.as_bytes()).await;
            let _ = socket.shutdown().await;
        });
    }
}
