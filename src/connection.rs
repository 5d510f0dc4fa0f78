//! One task per client: the TLS handshake under its deadline (and a permit bounding handshakes
//! in flight), then the session: the first-frame deadline, the reader loop with keepalive and
//! partial-frame deadlines, request dispatch through `command`, and the end of the session
//! (immediate offline, or a grace period for a lost connection). Writes happen only in the
//! writer, a future polled beside the reader in the same task, which drains the connection's
//! `Outbound` queue in batches under the slow-consumer deadline. Partial-read state lives in the
//! `FramedRead`, so every `select!` here is cancel-safe.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Verifier;
use crate::auth_guard::{AddressSlots, AuthGuard};
use crate::codec::{CodecError, DelimitedCodec};
use crate::command::{self, Command, RequestError, Session, TokenBucket};
use crate::config::Config;
use crate::metrics as m;
use crate::model::{CloseKind, OfflineReason};
use crate::outbound::{Item, Outbound};
use crate::pb;
use crate::pb::server_frame::Body as ServerBody;
use crate::registry::Registry;
use crate::store::Committer;
use crate::tls_stream::{read_client_hello, TlsStream};
use crate::wire;

/// The server codec: decodes client frames, encodes nothing (replies are pre-encoded).
type ServerCodec = DelimitedCodec<pb::ClientFrame, pb::ServerFrame>;

/// Most bytes the writer gathers into one write.
const WRITE_BATCH_BYTES: usize = 64 * 1024;
/// Read buffer between frames; it grows for a larger frame (a Connect with its token) and is
/// replaced by a small one once that frame is decoded.
const READ_BUFFER_BYTES: usize = 128;
/// A write buffer above this is given back after its batch, so idle connections stay small.
const IDLE_BUFFER_BYTES: usize = 1024;

/// What every connection task shares; one per server.
#[derive(Debug)]
pub struct ConnectionContext {
    /// Effective configuration.
    pub config: Arc<Config>,
    /// Live presence.
    pub registry: Registry,
    /// Token verification.
    pub verifier: Verifier,
    /// Bounds TLS handshakes in flight.
    pub handshake_permits: Arc<Semaphore>,
    /// Bounds TLS handshakes in flight per address.
    pub address_slots: AddressSlots,
    /// Cancelled at shutdown.
    pub shutdown: CancellationToken,
    /// Tracks writer tasks so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// Source of connection ids.
    pub next_conn_id: AtomicU64,
    /// Group commit for subscription changes.
    pub committer: Committer,
    /// Failed-Connect delays and bans per address.
    pub auth_guard: AuthGuard,
}

/// Decrements the connections gauge when the session ends, however it ends.
#[derive(Debug)]
struct ConnectionGauge;

impl ConnectionGauge {
    fn open() -> ConnectionGauge {
        metrics::gauge!(m::CONNECTIONS).increment(1.0);
        ConnectionGauge
    }
}

impl Drop for ConnectionGauge {
    fn drop(&mut self) {
        metrics::gauge!(m::CONNECTIONS).decrement(1.0);
    }
}

/// Runs a TLS connection from handshake to the end of its grace period. `permit` is the
/// connection-limit permit; it is released when the socket closes. The ClientHello is read
/// under the handshake deadline without a handshake slot, so sockets that stall before sending
/// one cost a small buffer and never keep legitimate clients waiting; a slot is taken only for
/// the cryptographic part of the handshake.
pub async fn run_tls(
    tcp: TcpStream,
    peer: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    ctx: Arc<ConnectionContext>,
    permit: OwnedSemaphorePermit,
) {
    // The handshake's futures are several KiB; boxed, they are freed once it is over instead of
    // sizing the task of every idle connection.
    let Some(stream) = Box::pin(handshake(tcp, peer, tls, &ctx)).await else {
        return;
    };
    run_session(stream, peer, ctx, permit).await;
}

/// The TLS handshake under the handshake deadline; `None` when it failed (counted) or the
/// server is shutting down.
async fn handshake(
    tcp: TcpStream,
    peer: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    ctx: &ConnectionContext,
) -> Option<TlsStream> {
    let deadline = tokio::time::Instant::now() + ctx.config.handshake_timeout();
    let hello = tokio::select! {
        r = tokio::time::timeout_at(deadline, read_client_hello(tcp)) => r,
        _ = ctx.shutdown.cancelled() => return None,
    };
    let hello = match hello {
        Ok(Ok(hello)) => hello,
        Ok(Err(e)) => {
            metrics::counter!(m::TLS_HANDSHAKE_FAILURES, "reason" => "error").increment(1);
            tracing::debug!(%peer, "bad ClientHello: {e}");
            return None;
        }
        Err(_) => {
            metrics::counter!(m::TLS_HANDSHAKE_FAILURES, "reason" => "timeout").increment(1);
            return None;
        }
    };
    let address_slot = tokio::select! {
        slot = ctx.address_slots.take(peer.ip()) => slot,
        _ = tokio::time::sleep_until(deadline) => {
            metrics::counter!(m::TLS_HANDSHAKE_FAILURES, "reason" => "address_limit").increment(1);
            return None;
        }
        _ = ctx.shutdown.cancelled() => return None,
    };
    let handshake_permit = tokio::select! {
        p = ctx.handshake_permits.clone().acquire_owned() => p,
        _ = tokio::time::sleep_until(deadline) => {
            metrics::counter!(m::TLS_HANDSHAKE_FAILURES, "reason" => "queue_timeout").increment(1);
            return None;
        }
        _ = ctx.shutdown.cancelled() => return None,
    };
    let Ok(handshake_permit) = handshake_permit else {
        return None;
    };
    metrics::gauge!(m::TLS_HANDSHAKES_IN_FLIGHT).increment(1.0);
    let started = Instant::now();
    let result = tokio::select! {
        r = tokio::time::timeout_at(deadline, hello.handshake(tls)) => Some(r),
        _ = ctx.shutdown.cancelled() => None,
    };
    metrics::gauge!(m::TLS_HANDSHAKES_IN_FLIGHT).decrement(1.0);
    drop(handshake_permit);
    drop(address_slot);
    let stream = match result {
        Some(Ok(Ok(stream))) => stream,
        Some(Ok(Err(e))) => {
            metrics::counter!(m::TLS_HANDSHAKE_FAILURES, "reason" => "error").increment(1);
            tracing::debug!(%peer, "tls handshake failed: {e}");
            return None;
        }
        Some(Err(_)) => {
            metrics::counter!(m::TLS_HANDSHAKE_FAILURES, "reason" => "timeout").increment(1);
            tracing::debug!(%peer, "tls handshake deadline exceeded");
            return None;
        }
        None => return None,
    };
    metrics::histogram!(m::TLS_HANDSHAKE_SECONDS).record(started.elapsed().as_secs_f64());
    Some(stream)
}

/// Runs a session over an established stream (TLS or, for trusted networks, plain TCP).
/// The stream is split before the session's future exists, so the future holds two pointers
/// rather than a moved-from copy of the stream (over a KiB for TLS) for its whole life.
pub fn run_session<S>(
    stream: S,
    peer: SocketAddr,
    ctx: Arc<ConnectionContext>,
    permit: OwnedSemaphorePermit,
) -> impl std::future::Future<Output = ()> + Send
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (read_half, write_half) = tokio::io::split(stream);
    session(read_half, write_half, peer, ctx, permit)
}

async fn session<S>(
    read_half: ReadHalf<S>,
    write_half: WriteHalf<S>,
    peer: SocketAddr,
    ctx: Arc<ConnectionContext>,
    permit: OwnedSemaphorePermit,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let gauge = ConnectionGauge::open();
    let config = ctx.config.clone();
    let conn_id = ctx.next_conn_id.fetch_add(1, Ordering::Relaxed);
    let parked_limit =
        config.limits.max_subscriptions as usize + config.limits.max_ids_per_request as usize;
    let outbound = Outbound::new(
        conn_id,
        config.fanout.queue_capacity as usize,
        parked_limit,
        config.limits.max_requests_in_flight as usize,
    );
    // The writer runs in this task beside the reader rather than in a task of its own: one
    // task per connection is half a KiB less for every idle client.
    let writer = write_loop(write_half, outbound.clone(), config.slow_consumer_timeout());
    tokio::pin!(writer);
    let mut writer_done = false;
    let mut reader = FramedRead::with_capacity(
        read_half,
        ServerCodec::new(config.limits.max_frame_bytes_pre_auth as usize),
        READ_BUFFER_BYTES,
    );
    let mut session = None;
    let end = {
        let reading = read_loop(&mut reader, &mut session, &outbound, &ctx, peer);
        tokio::pin!(reading);
        loop {
            tokio::select! {
                end = &mut reading => break end,
                // The writer ends early only when its socket failed or stalled; it has closed
                // the queue then, which ends the reader too.
                () = &mut writer, if !writer_done => writer_done = true,
            }
        }
    };
    drop(reader);

    let received_at = Instant::now();
    let mut linger = None;
    let close = match &end {
        End::Disconnect => Some((CloseKind::Normal, "goodbye".to_string(), 0)),
        End::Lost(_) => None,
        End::Close(kind, reason) => Some((*kind, reason.clone(), 0)),
        End::OutboundClosed => None,
        End::Shutdown => Some((
            CloseKind::ServerShutdown,
            "server is shutting down".to_string(),
            config.session.shutdown_reconnect_hint_ms,
        )),
    };
    if let Some((kind, reason, hint)) = &close {
        metrics::counter!(m::CLOSES, "code" => kind.metric_label()).increment(1);
        tracing::debug!(%peer, conn_id, "closing: {reason}");
        outbound.close(Some(Item::reply(
            wire::close_frame(*kind, reason, *hint),
            "close",
        )));
    } else {
        outbound.close(None);
    }
    if let Some(s) = &session {
        let registry = &ctx.registry;
        let offline =
            |reason| registry.detach(&s.user_id, &s.device_id, s.conn_id, reason, received_at);
        match &end {
            End::Disconnect => offline(OfflineReason::Disconnect),
            End::Shutdown => offline(OfflineReason::ServerShutdown),
            End::Close(CloseKind::KeepaliveTimeout, _) | End::Lost(OfflineReason::Timeout) => {
                if config.grace_period().is_zero() {
                    offline(OfflineReason::Timeout)
                } else if registry.linger(
                    &s.user_id,
                    &s.device_id,
                    s.conn_id,
                    OfflineReason::Timeout,
                ) {
                    linger = Some((s.user_id.clone(), s.device_id.clone(), s.conn_id));
                }
            }
            End::Lost(reason) => {
                if config.grace_period().is_zero() {
                    offline(*reason)
                } else if registry.linger(&s.user_id, &s.device_id, s.conn_id, *reason) {
                    linger = Some((s.user_id.clone(), s.device_id.clone(), s.conn_id));
                }
            }
            // Taken over (a no-op: the new connection owns the device) or slow consumer.
            End::OutboundClosed => offline(OfflineReason::Kicked),
            End::Close(_, _) => offline(OfflineReason::Kicked),
        }
    }
    // The writer ends after the close frame, or within the slow-consumer deadline when the
    // socket is stuck.
    let writer_deadline = config.slow_consumer_timeout() + Duration::from_secs(1);
    if !writer_done && tokio::time::timeout(writer_deadline, writer).await.is_err() {
        tracing::debug!(%peer, conn_id, "writer did not finish in time");
    }
    drop(gauge);
    drop(permit);

    if let Some((user_id, device_id, conn_id)) = linger {
        tokio::select! {
            _ = tokio::time::sleep(config.grace_period()) => {
                ctx.registry.expire_lingering(&user_id, &device_id, conn_id, Instant::now());
            }
            _ = ctx.shutdown.cancelled() => {
                ctx.registry.detach(&user_id, &device_id, conn_id, OfflineReason::ServerShutdown, Instant::now());
            }
        }
    }
}

/// How the reader loop ended.
#[derive(Debug)]
enum End {
    /// The client said goodbye.
    Disconnect,
    /// The socket closed or failed, or keepalive silence: offline after the grace period.
    Lost(OfflineReason),
    /// The server closes the connection with this code and reason.
    Close(CloseKind, String),
    /// The outbound queue was closed elsewhere (taken over, slow consumer, write failure).
    OutboundClosed,
    /// Server shutdown.
    Shutdown,
}

fn push_reply(outbound: &Outbound, request_id: u64, body: ServerBody) {
    if let ServerBody::Error(e) = &body {
        let code = pb::ErrorCode::try_from(e.code)
            .map(|c| c.as_str_name())
            .unwrap_or("ERROR_CODE_UNSPECIFIED");
        metrics::counter!(m::ERRORS, "code" => code).increment(1);
    }
    let kind = wire::server_body_kind(&body);
    outbound.push_reply(Item::reply(wire::frame(request_id, body), kind));
}

fn push_error(outbound: &Outbound, request_id: u64, operation: &str, error: &RequestError) {
    push_reply(outbound, request_id, error.to_body(operation));
}

async fn read_loop<R>(
    reader: &mut FramedRead<R, ServerCodec>,
    session: &mut Option<Session>,
    outbound: &Outbound,
    ctx: &ConnectionContext,
    peer: SocketAddr,
) -> End
where
    R: AsyncRead + Unpin,
{
    let config = &ctx.config;
    let closed = outbound.closed();
    let started = tokio::time::Instant::now();
    let connect_deadline = started + config.connect_timeout();
    let mut last_frame = started;
    let mut partial_since: Option<tokio::time::Instant> = None;
    let mut request_bucket = TokenBucket::new(
        config.limits.request_rate_per_sec,
        config.limits.request_burst,
        Instant::now(),
    );
    loop {
        // Replies are never dropped, so a client that sends requests without reading replies
        // is made to wait here; its socket then stalls and the writer's deadline ends it.
        if outbound.is_backlogged() {
            tokio::select! {
                _ = outbound.wait_for_space() => {}
                _ = ctx.shutdown.cancelled() => return End::Shutdown,
            }
            if closed.is_cancelled() {
                return End::OutboundClosed;
            }
        }
        let (deadline, expiry) = match session {
            None => (connect_deadline, Expiry::Connect),
            Some(s) => (
                last_frame + Duration::from_millis(u64::from(s.keepalive_secs) * 1500),
                Expiry::Keepalive,
            ),
        };
        let (deadline, expiry) = match partial_since {
            Some(t) if t + config.partial_frame_timeout() < deadline => {
                (t + config.partial_frame_timeout(), Expiry::Partial)
            }
            _ => (deadline, expiry),
        };
        let next = tokio::select! {
            biased;
            _ = ctx.shutdown.cancelled() => return End::Shutdown,
            _ = closed.cancelled() => return End::OutboundClosed,
            _ = tokio::time::sleep_until(deadline) => return expiry.end(),
            next = reader.next() => next,
        };
        let frame = match next {
            None => return End::Lost(OfflineReason::ConnectionLost),
            Some(Err(CodecError::Io(_))) => return End::Lost(OfflineReason::ConnectionLost),
            Some(Err(e @ CodecError::FrameTooLarge { .. })) => {
                return End::Close(CloseKind::FrameTooLarge, e.to_string())
            }
            Some(Err(e)) => return End::Close(CloseKind::ProtocolViolation, e.to_string()),
            Some(Ok(frame)) => frame,
        };
        let now = tokio::time::Instant::now();
        last_frame = now;
        partial_since = if reader.read_buffer().is_empty() {
            if reader.read_buffer().capacity() > READ_BUFFER_BYTES {
                *reader.read_buffer_mut() = BytesMut::with_capacity(READ_BUFFER_BYTES);
            }
            None
        } else {
            Some(now)
        };
        match handle_frame(
            frame,
            reader,
            session,
            outbound,
            ctx,
            &mut request_bucket,
            peer,
        ) {
            Step::Continue => {}
            Step::End(end) => return end,
            Step::Refuse {
                delay,
                request_id,
                error,
            } => {
                // Slows down guessing: the refusal (and the connection) waits out the delay.
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = ctx.shutdown.cancelled() => return End::Shutdown,
                }
                push_error(outbound, request_id, "connect", &error);
                return End::Close(CloseKind::AuthFailed, error.reason);
            }
            Step::ReplyWhenDurable {
                request_id,
                operation,
                body,
            } => match Box::pin(ctx.committer.commit()).await {
                // Boxed: inline, this rare wait would enlarge every idle connection's task.
                Ok(()) => push_reply(outbound, request_id, *body),
                Err(e) => {
                    let error = RequestError::new(
                        pb::ErrorCode::Internal,
                        format!("the change may not be stored: {e}"),
                    );
                    push_error(outbound, request_id, operation, &error);
                }
            },
        }
    }
}

/// Which deadline fired.
#[derive(Debug, Clone, Copy)]
enum Expiry {
    Connect,
    Keepalive,
    Partial,
}

impl Expiry {
    fn end(self) -> End {
        match self {
            Expiry::Connect => End::Close(
                CloseKind::DeadlineExceeded,
                "no Connect frame within the connect deadline".into(),
            ),
            Expiry::Keepalive => End::Close(
                CloseKind::KeepaliveTimeout,
                "no frame within 1.5 x keepalive".into(),
            ),
            Expiry::Partial => End::Close(
                CloseKind::DeadlineExceeded,
                "frame left incomplete past the partial-frame deadline".into(),
            ),
        }
    }
}

/// What the reader loop does after a frame.
#[derive(Debug)]
enum Step {
    /// Read the next frame.
    Continue,
    /// End the session.
    End(End),
    /// Refuse a Connect after `delay`, then close.
    Refuse {
        delay: Duration,
        request_id: u64,
        error: RequestError,
    },
    /// Send `body` once the store has flushed: acknowledged means on disk.
    ReplyWhenDurable {
        request_id: u64,
        operation: &'static str,
        body: Box<ServerBody>,
    },
}

fn handle_frame<R>(
    frame: pb::ClientFrame,
    reader: &mut FramedRead<R, ServerCodec>,
    session: &mut Option<Session>,
    outbound: &Outbound,
    ctx: &ConnectionContext,
    request_bucket: &mut TokenBucket,
    peer: SocketAddr,
) -> Step {
    let received_at = Instant::now();
    let request_id = frame.request_id;
    let operation = wire::client_body_kind(frame.body.as_ref());
    metrics::counter!(m::FRAMES_IN, "kind" => operation).increment(1);
    let limits = &ctx.config.limits;
    let command = Command::from_frame(frame.body, limits);
    let Some(current) = session else {
        return match command {
            Ok(Command::Connect(request)) => {
                if let Err(remaining) = ctx.auth_guard.check(peer.ip(), received_at) {
                    metrics::counter!(m::AUTH_FAILURES, "reason" => "banned").increment(1);
                    return Step::Refuse {
                        delay: Duration::ZERO,
                        request_id,
                        error: RequestError {
                            code: pb::ErrorCode::Banned,
                            reason: "too many failed logins from this address".into(),
                            retry_after_ms: (remaining.as_millis() as u64).max(1),
                        },
                    };
                }
                match command::connect(
                    request,
                    &ctx.verifier,
                    &ctx.registry,
                    &ctx.config,
                    outbound,
                    received_at,
                ) {
                    Ok((new_session, ack)) => {
                        push_reply(outbound, request_id, ack);
                        reader
                            .decoder_mut()
                            .set_max_frame_bytes(limits.max_frame_bytes as usize);
                        *session = Some(new_session);
                        Step::Continue
                    }
                    Err(e) if e.is_auth_failure() => {
                        let refusal = ctx.auth_guard.record_failure(peer.ip(), received_at);
                        if refusal.banned {
                            tracing::warn!(%peer, "address banned after repeated failed logins");
                        }
                        Step::Refuse {
                            delay: refusal.delay,
                            request_id,
                            error: e,
                        }
                    }
                    Err(e) => {
                        push_error(outbound, request_id, "connect", &e);
                        Step::End(End::Close(CloseKind::AuthFailed, e.reason))
                    }
                }
            }
            Ok(_) => {
                let e = RequestError::new(
                    pb::ErrorCode::NotConnected,
                    "the first frame must be Connect",
                );
                push_error(outbound, request_id, operation, &e);
                Step::End(End::Close(CloseKind::ProtocolViolation, e.reason))
            }
            Err(e) => {
                push_error(outbound, request_id, operation, &e);
                Step::End(End::Close(CloseKind::ProtocolViolation, e.reason))
            }
        };
    };
    if let Err(wait) = request_bucket.take(received_at) {
        let e = RequestError {
            code: pb::ErrorCode::RateLimited,
            reason: "request rate limit reached".into(),
            retry_after_ms: (wait.as_millis() as u64).max(1),
        };
        push_error(outbound, request_id, operation, &e);
        return Step::Continue;
    }
    match command {
        Ok(Command::Disconnect) => Step::End(End::Disconnect),
        Ok(command) => {
            match command::execute(command, current, &ctx.registry, limits, received_at) {
                Ok(reply) if reply.needs_commit => {
                    return Step::ReplyWhenDurable {
                        request_id,
                        operation,
                        body: Box::new(reply.body),
                    }
                }
                Ok(reply) => push_reply(outbound, request_id, reply.body),
                Err(e) => push_error(outbound, request_id, operation, &e),
            }
            Step::Continue
        }
        Err(e) => {
            push_error(outbound, request_id, operation, &e);
            Step::Continue
        }
    }
}

/// Per-batch frame counts by kind, so the metric is touched once per kind per batch.
#[derive(Debug, Default)]
struct KindCounts(Vec<(&'static str, u64)>);

impl KindCounts {
    fn add(&mut self, kind: &'static str) {
        match self.0.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, n)) => *n += 1,
            None => self.0.push((kind, 1)),
        }
    }

    fn flush(&mut self) {
        for (kind, n) in self.0.drain(..) {
            metrics::counter!(m::FRAMES_OUT, "kind" => kind).increment(n);
        }
    }
}

/// Drains `outbound` into the socket, a batch per write, until the close frame has been written
/// or the socket fails or stays blocked past `slow_consumer_timeout`.
async fn write_loop<W>(mut socket: W, outbound: Outbound, slow_consumer_timeout: Duration)
where
    W: AsyncWrite + Unpin,
{
    let latency = metrics::histogram!(m::FANOUT_LATENCY_SECONDS);
    let bytes_out = metrics::counter!(m::BYTES_OUT);
    let mut buf = BytesMut::new();
    let mut kinds = KindCounts::default();
    while let Some(batch) = outbound.next_batch(WRITE_BATCH_BYTES).await {
        buf.clear();
        for item in &batch.items {
            buf.extend_from_slice(&item.bytes);
        }
        let written = tokio::time::timeout(slow_consumer_timeout, async {
            socket.write_all(&buf).await?;
            socket.flush().await
        })
        .await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                outbound.close(None);
                return;
            }
            Err(_) => {
                if outbound.close(None) {
                    metrics::counter!(m::SLOW_CONSUMER_DISCONNECTS).increment(1);
                }
                return;
            }
        }
        let now = Instant::now();
        for item in &batch.items {
            if let Some(at) = item.received_at {
                latency.record(now.saturating_duration_since(at).as_secs_f64());
            }
            kinds.add(item.kind);
        }
        kinds.flush();
        bytes_out.increment(buf.len() as u64);
        if batch.closing {
            break;
        }
        // Give back memory after a burst so idle connections stay small.
        if buf.capacity() > IDLE_BUFFER_BYTES {
            buf = BytesMut::new();
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), socket.shutdown()).await;
}
