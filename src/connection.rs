//! One task per client: the TLS handshake under its deadline (and a permit bounding handshakes
//! in flight), then the session: the first-frame deadline, the reader loop with keepalive,
//! partial-frame and token-expiry deadlines, request dispatch through `command`, and the end of
//! the session (immediate offline, or a grace period for a lost connection), which a guard
//! completes when the task panics or is cancelled. Writes happen only in the writer, a future
//! polled beside the reader in the same task, which drains the connection's `Outbound` queue in
//! batches under the slow-consumer deadline. Partial-read state lives in the `FramedRead`, so
//! every `select!` here is cancel-safe.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth_guard::{AddressSlots, AuthGuard};
use crate::codec::{CodecError, DelimitedCodec};
use crate::command::{self, Command, RequestError, Session, TokenBucket};
use crate::config::Config;
use crate::embed::{AuthPlugin, AuthRequest, Identity, TokenAuthenticator, Transport};
use crate::metrics as m;
use crate::model::{CloseKind, OfflineReason};
use crate::outbound::{Item, Outbound};
use crate::pb;
use crate::pb::server_frame::Body as ServerBody;
use crate::registry::{Registry, RegistryOptions};
use crate::store::{Committer, SubscriptionStore};
use crate::tls_stream::{read_client_hello, TlsStream};
use crate::wire::{self, ProtoEncoder};

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
    /// Who a Connect is (the `[auth]` tokens unless an embedder plugged in another
    /// authenticator), and how long that may take.
    pub(crate) auth: AuthPlugin,
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
    /// Cluster mode: the replicated subscription log that Subscribe/Unsubscribe go through.
    pub sub_log: std::sync::OnceLock<crate::cluster::sublog::SubLog>,
    /// Cluster mode: the replicated privacy log that privacy changes go through.
    pub priv_log: std::sync::OnceLock<crate::cluster::privlog::PrivLog>,
    /// Cluster mode: waits for every peer to hold a privacy change (Connect.invisible).
    pub privacy_barrier: std::sync::OnceLock<crate::cluster::PrivacyBarrier>,
    /// Cluster mode: sends admin changes to the node holding a user's sessions.
    pub forwarder: std::sync::OnceLock<crate::cluster::forward::Forwarder>,
    /// Group commit for subscription changes.
    pub committer: Committer,
    /// Failed-Connect delays and bans per address.
    pub auth_guard: AuthGuard,
}

impl ConnectionContext {
    /// Carries out a privacy change: on a single node stored, applied and group-committed; in
    /// cluster mode appended to the privacy log (acknowledged by its quorum) and applied here.
    /// Returns the records (none: nothing changed). Acknowledged means durable either way.
    pub async fn carry_out_privacy(
        &self,
        op: &crate::privacy::PrivacyOp,
    ) -> Result<Vec<crate::privacy::PrivacyRecord>, RequestError> {
        let unavailable = |reason: String| RequestError {
            code: pb::ErrorCode::Unavailable,
            reason,
            retry_after_ms: command::UNAVAILABLE_RETRY_MS,
        };
        match self.priv_log.get() {
            None => {
                let records = self.registry.privacy_op(op, Instant::now())?;
                self.committer.commit().await.map_err(|e| {
                    RequestError::new(
                        pb::ErrorCode::Internal,
                        format!("the change may not be stored: {e}"),
                    )
                })?;
                Ok(records)
            }
            Some(log) => {
                let records = self.registry.plan_privacy(op)?;
                if !records.is_empty() {
                    log.submit(&records)
                        .await
                        .map_err(|e| unavailable(e.to_string()))?;
                }
                Ok(records)
            }
        }
    }

    /// A Connect with `invisible`: makes `user` invisible before the device is announced, and
    /// durable before the ConnAck says so. On a single node it is stored, applied and
    /// group-committed ([`ConnectionContext::carry_out_privacy`]). In cluster mode it goes
    /// through the privacy log, and this waits until every live peer holds it, so the
    /// device's arrival (replicated outside the log) reaches no peer that would still show it;
    /// UNAVAILABLE when the log or a peer does not answer in time (the invisibility may then
    /// be stored: a retry connects invisible).
    pub async fn start_invisible(&self, user: &str) -> Result<(), RequestError> {
        let op = crate::privacy::PrivacyOp::SetInvisible {
            user: user.to_string(),
            on: true,
        };
        let (Some(log), Some(barrier)) = (self.priv_log.get(), self.privacy_barrier.get()) else {
            self.carry_out_privacy(&op).await?;
            return Ok(());
        };
        let unavailable = |reason: String| RequestError {
            code: pb::ErrorCode::Unavailable,
            reason,
            retry_after_ms: command::UNAVAILABLE_RETRY_MS,
        };
        let records = self.registry.plan_privacy(&op)?;
        let seq = log
            .submit(&records)
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        let cluster = self
            .config
            .cluster
            .as_ref()
            .map_or(Duration::from_secs(3), |c| {
                Duration::from_millis(c.peer_timeout_ms)
            });
        if !barrier.wait(seq, cluster).await {
            return Err(unavailable(
                "not every node confirmed the invisibility in time; retry".into(),
            ));
        }
        Ok(())
    }

    /// Cluster mode: after `subscriber` subscribed to `targets`, a request to each target whose
    /// audience needs approval (on a single node the Subscribe itself does this). Filed in the
    /// background, so the Subscribe's reply takes the same time whether a request was made or
    /// not; failures are logged, never told (the requester must not be able to tell).
    fn cluster_privacy_requests(&self, subscriber: &str, targets: &[String]) {
        let Some(log) = self.priv_log.get() else {
            return;
        };
        let mut planned = Vec::new();
        for target in targets {
            let op = crate::privacy::PrivacyOp::Request {
                target: target.clone(),
                requester: subscriber.to_string(),
            };
            match self.registry.plan_privacy(&op) {
                Ok(records) => planned.extend(records),
                Err(e) => tracing::debug!(subscriber, target = target.as_str(), "no request: {e}"),
            }
        }
        if planned.is_empty() {
            return;
        }
        let log = log.clone();
        self.tracker.spawn(async move {
            if let Err(e) = log.submit(&planned).await {
                tracing::debug!("subscription requests not filed: {e}");
            }
        });
    }

    /// Everything connections share, for `config` over `store`: the registry, token
    /// verification, handshake limits, the group committer and the auth guard. Starts the
    /// committer, so it runs inside a Tokio runtime.
    pub fn new(config: Config, store: Arc<dyn SubscriptionStore>) -> ConnectionContext {
        let committer = Committer::start(store.clone());
        let registry = Registry::new(
            store,
            Arc::new(ProtoEncoder),
            RegistryOptions {
                max_state_pairs: config.limits.max_state_pairs as usize,
                offline_broadcast: config.session.offline_broadcast,
                max_joined_channels: config.channels.max_joined_per_connection as usize,
                max_watched_channels: config.channels.max_watched_per_connection as usize,
                announce_threshold: config.channels.announce_threshold as usize,
                max_devices_per_user: config.limits.max_devices_per_user as usize,
                device_limit_policy: config.limits.device_limit_policy,
                privacy: config.privacy.clone(),
            },
        );
        ConnectionContext {
            auth: AuthPlugin {
                authenticator: Arc::new(TokenAuthenticator::new(&config.auth)),
                timeout: crate::embed::DEFAULT_AUTH_TIMEOUT,
            },
            address_slots: AddressSlots::new(config.limits.max_handshakes_per_address),
            handshake_permits: Arc::new(Semaphore::new(
                config.limits.max_handshakes_in_flight as usize,
            )),
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            next_conn_id: AtomicU64::new(1),
            sub_log: std::sync::OnceLock::new(),
            priv_log: std::sync::OnceLock::new(),
            privacy_barrier: std::sync::OnceLock::new(),
            forwarder: std::sync::OnceLock::new(),
            committer,
            auth_guard: AuthGuard::new(config.auth_guard()),
            registry,
            config: Arc::new(config),
        }
    }
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

/// Where a session stands, for [`SessionGuard`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Connected (or not yet authenticated): on drop, the device leaves at once.
    Live,
    /// In its grace period: on drop, the grace period ends now.
    Lingering,
    /// The session's end was handled.
    Done,
}

/// Makes sure a session leaves the registry however its task ends: normally the session code
/// detaches or lingers and marks the guard done; when the task panics or is cancelled instead,
/// dropping the guard closes the outbound queue and takes the device out of the registry (with
/// its channel memberships), reason CONNECTION_LOST, or SERVER_SHUTDOWN during shutdown. No
/// ghost device, no queue that fanout keeps filling.
#[derive(Debug)]
struct SessionGuard {
    ctx: Arc<ConnectionContext>,
    outbound: Outbound,
    /// Filled by the reader when Connect succeeds.
    session: Option<Session>,
    stage: Stage,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        if self.stage == Stage::Done {
            return;
        }
        self.outbound.close(None);
        let Some(s) = &self.session else {
            return;
        };
        let reason = if self.ctx.shutdown.is_cancelled() {
            OfflineReason::ServerShutdown
        } else {
            OfflineReason::ConnectionLost
        };
        if std::thread::panicking() {
            tracing::error!(
                conn_id = s.conn_id,
                "connection task panicked; its device leaves the registry"
            );
        }
        let registry = &self.ctx.registry;
        match self.stage {
            Stage::Live => {
                registry.detach(&s.user_id, &s.device_id, s.conn_id, reason, Instant::now())
            }
            Stage::Lingering => {
                registry.expire_lingering(&s.user_id, &s.device_id, s.conn_id, Instant::now())
            }
            Stage::Done => {}
        }
    }
}

/// Runs a TLS connection from handshake to the end of its grace period. `permit` holds the
/// connection's share of the connection limits; it is dropped when the socket closes. The
/// ClientHello is read under the handshake deadline without a handshake slot, so sockets that
/// stall before sending one cost a small buffer and never keep legitimate clients waiting; a
/// slot is taken only for the cryptographic part of the handshake.
pub async fn run_tls<P: Send + 'static>(
    tcp: TcpStream,
    peer: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    ctx: Arc<ConnectionContext>,
    permit: P,
) {
    // The handshake's futures are several KiB; boxed, they are freed once it is over instead of
    // sizing the task of every idle connection.
    let Some(stream) = Box::pin(handshake(tcp, peer, tls, &ctx)).await else {
        return;
    };
    run_session(stream, peer, Transport::Tls, ctx, permit).await;
}

/// The TLS handshake under the handshake deadline; `None` when it failed (counted) or the
/// server is shutting down.
pub(crate) async fn handshake(
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
pub fn run_session<S, P>(
    stream: S,
    peer: SocketAddr,
    transport: Transport,
    ctx: Arc<ConnectionContext>,
    permit: P,
) -> impl std::future::Future<Output = ()> + Send
where
    S: AsyncRead + AsyncWrite + Send + 'static,
    P: Send + 'static,
{
    let (read_half, write_half) = tokio::io::split(stream);
    let source = CodecSource {
        reader: FramedRead::with_capacity(
            read_half,
            ServerCodec::new(ctx.config.limits.max_frame_bytes_pre_auth as usize),
            READ_BUFFER_BYTES,
        ),
    };
    let sink = StreamSink {
        socket: write_half,
        buf: BytesMut::new(),
    };
    session(source, sink, peer, transport, ctx, permit)
}

/// Where a session's frames come from: the delimited codec over a byte stream (TCP, TLS), or
/// WebSocket messages (`crate::ws`). Everything above it (deadlines, caps, rate limits, the
/// session's end) is the same code for every transport.
pub(crate) trait FrameSource: Unpin + Send {
    /// The next frame or the end of the session; when `watch_partial`, also `PartialStarted` as
    /// soon as bytes of an incomplete frame are buffered. Cancel-safe: partial state stays in
    /// the source.
    fn poll_frame(
        &mut self,
        cx: &mut std::task::Context<'_>,
        watch_partial: bool,
    ) -> std::task::Poll<Read>;
    /// Raises the frame cap once the session is authenticated.
    fn set_max_frame_bytes(&mut self, max: usize);
    /// Called after each frame: whether bytes of a further frame are already buffered (then
    /// the partial-frame deadline keeps running). Gives back buffer memory after a large frame.
    fn settle(&mut self) -> bool;
}

/// Where a session's outbound frames go. Items are pre-encoded delimited frames; a transport
/// with its own message boundaries strips the length prefix. An empty item carries nothing
/// and only asks the sink to write what its transport has pending (a WebSocket pong).
pub(crate) trait FrameSink: Unpin + Send {
    /// Writes `items` and flushes; the bytes put on the socket.
    fn write_batch<'a>(
        &'a mut self,
        items: &'a [Item],
    ) -> impl std::future::Future<Output = std::io::Result<usize>> + Send + 'a;
    /// Ends the transport after the last batch (TLS close_notify, a WebSocket Close frame).
    fn finish(&mut self) -> impl std::future::Future<Output = ()> + Send + '_;
}

/// The TCP/TLS source: the delimited codec over the read half.
struct CodecSource<R> {
    reader: FramedRead<R, ServerCodec>,
}

impl<R: AsyncRead + Unpin + Send> FrameSource for CodecSource<R> {
    fn poll_frame(
        &mut self,
        cx: &mut std::task::Context<'_>,
        watch_partial: bool,
    ) -> std::task::Poll<Read> {
        match self.reader.poll_next_unpin(cx) {
            std::task::Poll::Ready(next) => std::task::Poll::Ready(match next {
                None | Some(Err(CodecError::Io(_))) => {
                    Read::End(End::Lost(OfflineReason::ConnectionLost))
                }
                Some(Err(e @ CodecError::FrameTooLarge { .. })) => {
                    Read::End(End::Close(CloseKind::FrameTooLarge, e.to_string()))
                }
                Some(Err(e)) => Read::End(End::Close(CloseKind::ProtocolViolation, e.to_string())),
                Some(Ok(frame)) => Read::Frame(frame),
            }),
            std::task::Poll::Pending if watch_partial && !self.reader.read_buffer().is_empty() => {
                std::task::Poll::Ready(Read::PartialStarted)
            }
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }

    fn set_max_frame_bytes(&mut self, max: usize) {
        self.reader.decoder_mut().set_max_frame_bytes(max);
    }

    fn settle(&mut self) -> bool {
        if self.reader.read_buffer().is_empty() {
            if self.reader.read_buffer().capacity() > READ_BUFFER_BYTES {
                *self.reader.read_buffer_mut() = BytesMut::with_capacity(READ_BUFFER_BYTES);
            }
            false
        } else {
            true
        }
    }
}

/// The TCP/TLS sink: a batch gathered into one buffer, one write.
struct StreamSink<W> {
    socket: W,
    buf: BytesMut,
}

impl<W: AsyncWrite + Unpin + Send> FrameSink for StreamSink<W> {
    async fn write_batch(&mut self, items: &[Item]) -> std::io::Result<usize> {
        self.buf.clear();
        for item in items {
            self.buf.extend_from_slice(&item.bytes);
        }
        self.socket.write_all(&self.buf).await?;
        self.socket.flush().await?;
        let n = self.buf.len();
        // Give back memory after a burst so idle connections stay small.
        if self.buf.capacity() > IDLE_BUFFER_BYTES {
            self.buf = BytesMut::new();
        }
        Ok(n)
    }

    async fn finish(&mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.socket.shutdown()).await;
    }
}

/// Runs a session over a frame source and sink (any transport) to the end of its grace period.
pub(crate) async fn session<F, K, P>(
    source: F,
    sink: K,
    peer: SocketAddr,
    transport: Transport,
    ctx: Arc<ConnectionContext>,
    permit: P,
) where
    F: FrameSource,
    K: FrameSink,
    P: Send + 'static,
{
    let gauge = ConnectionGauge::open();
    let config = ctx.config.clone();
    let conn_id = ctx.next_conn_id.fetch_add(1, Ordering::Relaxed);
    let parked_limit =
        config.limits.max_subscriptions as usize + config.limits.max_ids_per_request as usize;
    let outbound = Outbound::with_reply_budget(
        conn_id,
        config.fanout.queue_capacity as usize,
        parked_limit,
        config.limits.max_requests_in_flight as usize,
        config.limits.max_reply_bytes_in_flight as usize,
    );
    // The writer runs in this task beside the reader rather than in a task of its own: one
    // task per connection is half a KiB less for every idle client.
    let writer = write_loop(sink, outbound.clone(), config.slow_consumer_timeout());
    tokio::pin!(writer);
    let mut reader = source;
    // The guard owns the context and the queue for the rest of the session: one copy each.
    let mut guard = SessionGuard {
        ctx,
        outbound,
        session: None,
        stage: Stage::Live,
    };
    let mut writer_end = None;
    let end = {
        let reading = read_loop(
            &mut reader,
            &mut guard.session,
            &guard.outbound,
            &guard.ctx,
            peer,
            transport,
        );
        tokio::pin!(reading);
        loop {
            tokio::select! {
                end = &mut reading => break end,
                // The writer ends early only when its socket failed or stalled; it has closed
                // the queue then, which ends the reader too.
                w = &mut writer, if writer_end.is_none() => writer_end = Some(w),
            }
        }
    };
    drop(reader);
    // A socket that failed under the writer is a lost connection (grace period), like one that
    // failed under the reader; only a stalled socket (slow consumer) is removed at once.
    let end = match (end, writer_end) {
        (End::OutboundClosed, Some(WriterEnd::Failed)) => End::Lost(OfflineReason::ConnectionLost),
        (end, _) => end,
    };

    let received_at = Instant::now();
    let mut linger = false;
    let close = match &end {
        End::Disconnect => Some((CloseKind::Normal, "goodbye".to_string(), 0)),
        End::Lost(_) => None,
        End::Close(kind, reason) => {
            let hint = match kind {
                CloseKind::NodeUnavailable => command::UNAVAILABLE_RETRY_MS,
                _ => 0,
            };
            Some((*kind, reason.clone(), hint))
        }
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
        guard.outbound.close(Some(Item::reply(
            wire::close_frame(*kind, reason, *hint),
            "close",
        )));
    } else {
        guard.outbound.close(None);
    }
    if let Some(s) = &guard.session {
        let registry = &guard.ctx.registry;
        let offline =
            |reason| registry.detach(&s.user_id, &s.device_id, s.conn_id, reason, received_at);
        let lost = |reason| {
            if config.grace_period().is_zero() {
                offline(reason);
                false
            } else {
                registry.linger(&s.user_id, &s.device_id, s.conn_id, reason)
            }
        };
        linger = match &end {
            End::Disconnect => {
                offline(OfflineReason::Disconnect);
                false
            }
            End::Shutdown => {
                offline(OfflineReason::ServerShutdown);
                false
            }
            End::Close(CloseKind::KeepaliveTimeout, _) | End::Lost(OfflineReason::Timeout) => {
                lost(OfflineReason::Timeout)
            }
            // The client comes back with a fresh token; within the grace period watchers see
            // nothing.
            End::Close(CloseKind::TokenExpired, _) => lost(OfflineReason::Kicked),
            End::Lost(reason) => lost(*reason),
            // Taken over (a no-op: the new connection owns the device) or slow consumer.
            End::OutboundClosed | End::Close(_, _) => {
                offline(OfflineReason::Kicked);
                false
            }
        };
    }
    guard.stage = if linger {
        Stage::Lingering
    } else {
        Stage::Done
    };
    // The writer ends after the close frame, or within the slow-consumer deadline when the
    // socket is stuck.
    let writer_deadline = config.slow_consumer_timeout() + Duration::from_secs(1);
    if writer_end.is_none() && tokio::time::timeout(writer_deadline, writer).await.is_err() {
        tracing::debug!(%peer, conn_id, "writer did not finish in time");
    }
    drop(gauge);
    drop(permit);

    if let (Stage::Lingering, Some(sess)) = (guard.stage, &guard.session) {
        tokio::select! {
            _ = tokio::time::sleep(config.grace_period()) => {
                guard.ctx.registry.expire_lingering(&sess.user_id, &sess.device_id, sess.conn_id, Instant::now());
            }
            _ = guard.ctx.shutdown.cancelled() => {
                guard.ctx.registry.detach(&sess.user_id, &sess.device_id, sess.conn_id, OfflineReason::ServerShutdown, Instant::now());
            }
        }
        guard.stage = Stage::Done;
    }
}

/// How the reader loop ended.
#[derive(Debug)]
pub(crate) enum End {
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

async fn read_loop<F: FrameSource>(
    reader: &mut F,
    session: &mut Option<Session>,
    outbound: &Outbound,
    ctx: &ConnectionContext,
    peer: SocketAddr,
    transport: Transport,
) -> End {
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
            // Before Connect the connect deadline still runs: a client that never reads
            // cannot buy time by filling its queue (WebSocket pongs can do it before auth).
            let unauthenticated = session.is_none();
            tokio::select! {
                _ = outbound.wait_for_space() => {}
                _ = ctx.shutdown.cancelled() => return End::Shutdown,
                _ = tokio::time::sleep_until(connect_deadline), if unauthenticated => {
                    return Expiry::Connect.end();
                }
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
        // When the session's token expires (with the configured leeway), if sessions close
        // then; worked out from the token each time rather than kept in every idle session.
        let (deadline, expiry) = match session.as_ref().and_then(|s| s.token_exp) {
            Some(token_exp) if config.session.close_on_token_expiry => {
                let expires_ms = token_exp
                    .saturating_add(config.auth.leeway_secs)
                    .saturating_mul(1000);
                let left = Duration::from_millis(expires_ms.saturating_sub(crate::now_ms()));
                let token_deadline = tokio::time::Instant::now() + left;
                if token_deadline < deadline {
                    (token_deadline, Expiry::Token)
                } else {
                    (deadline, expiry)
                }
            }
            _ => (deadline, expiry),
        };
        let next = tokio::select! {
            biased;
            _ = ctx.shutdown.cancelled() => return End::Shutdown,
            _ = closed.cancelled() => return End::OutboundClosed,
            _ = tokio::time::sleep_until(deadline) => return expiry.end(),
            next = next_or_partial(reader, partial_since.is_none()) => next,
        };
        let frame = match next {
            Read::Frame(frame) => frame,
            Read::End(end) => return end,
            Read::PartialStarted => {
                // Bytes of a frame arrived without completing it: its deadline starts now,
                // however the bytes were split.
                partial_since = Some(tokio::time::Instant::now());
                continue;
            }
            Read::WakeWriter => {
                // The transport has bytes of its own to send (a WebSocket pong): an empty
                // item makes the writer write them.
                outbound.push_reply(Item::reply(bytes::Bytes::new(), "transport"));
                continue;
            }
        };
        let now = tokio::time::Instant::now();
        last_frame = now;
        partial_since = if reader.settle() { Some(now) } else { None };
        let mut step = handle_frame(frame, session, outbound, ctx, &mut request_bucket, peer);
        if let Step::Authenticate {
            request_id,
            request,
        } = step
        {
            let asked = AuthRequest::new(request.token(), request.device_id(), peer, transport);
            // Boxed: the authenticator's future is the embedder's, of any size; it lives only
            // for this wait. Other connections never wait for it (one task each).
            let verdict = tokio::select! {
                biased;
                _ = ctx.shutdown.cancelled() => return End::Shutdown,
                verdict = Box::pin(ctx.auth.authenticate(asked)) => verdict,
            };
            let mut request = *request;
            // Starting invisible is stored (and in cluster mode held by every node) before the
            // device is announced.
            if let Ok(identity) = &verdict {
                // Only a Connect that will be accepted may change anything.
                if request.invisible()
                    && command::identity_refusal(identity, &ctx.registry).is_none()
                    && command::connect_device_id(&request, identity).is_ok()
                {
                    let started = tokio::select! {
                        biased;
                        _ = ctx.shutdown.cancelled() => return End::Shutdown,
                        started = Box::pin(ctx.start_invisible(&identity.user_id)) => started,
                    };
                    match started {
                        Ok(()) => request.invisibility_done(),
                        Err(e) => {
                            push_error(outbound, request_id, "connect", &e);
                            return End::Close(CloseKind::NodeUnavailable, e.reason);
                        }
                    }
                }
            }
            step = finish_connect(
                verdict, request, request_id, reader, session, outbound, ctx, peer,
            );
        }
        match step {
            Step::Continue => {}
            // `finish_connect` never asks for a second authentication; nothing to do.
            Step::Authenticate { .. } => {}
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
            Step::AfterCatchUp {
                request_id,
                operation,
                command,
            } => {
                let caught_up = match ctx.sub_log.get() {
                    Some(log) => Box::pin(log.catch_up()).await,
                    None => Ok(()),
                };
                match (caught_up, session.as_mut()) {
                    (Ok(()), Some(current)) if matches!(*command, Command::Resume { .. }) => {
                        match resume(*command, current, outbound, &ctx.registry, &config.limits) {
                            Ok(reply) => push_reply(outbound, request_id, reply),
                            Err(e) => push_error(outbound, request_id, operation, &e),
                        }
                    }
                    (Ok(()), Some(current)) => match command::execute(
                        *command,
                        current,
                        &ctx.registry,
                        &config.limits,
                        Instant::now(),
                    ) {
                        Ok(reply) => push_reply(outbound, request_id, reply.body),
                        Err(e) => push_error(outbound, request_id, operation, &e),
                    },
                    (Ok(()), None) => {}
                    (Err(e), _) => {
                        let error = RequestError {
                            code: pb::ErrorCode::Unavailable,
                            reason: e.to_string(),
                            retry_after_ms: command::UNAVAILABLE_RETRY_MS,
                        };
                        push_error(outbound, request_id, operation, &error);
                    }
                }
            }
            Step::ReplyWhenPrivacyApplied {
                request_id,
                operation,
                command,
            } => {
                let Some((user, device)) = session
                    .as_ref()
                    .map(|s| (s.user_id.clone(), s.device_id.clone()))
                else {
                    continue;
                };
                let Some(op) = command::privacy_op_of(&command, &user) else {
                    continue;
                };
                // Boxed like the commit wait: rare, and large inline.
                match Box::pin(ctx.carry_out_privacy(&op)).await {
                    Ok(records) => push_reply(
                        outbound,
                        request_id,
                        command::privacy_reply(&command, &user, &device, &ctx.registry, &records),
                    ),
                    Err(e) => push_error(outbound, request_id, operation, &e),
                }
            }
            Step::ReplyWhenLogged {
                request_id,
                operation,
                op,
                msg_id,
            } => {
                let Some(log) = ctx.sub_log.get() else {
                    continue;
                };
                // Boxed like the commit wait: rare, and large inline.
                let submitted = Box::pin(log.submit(&op, msg_id.as_deref())).await;
                if let (
                    Ok(_),
                    crate::store::LoggedOp::Subscribe {
                        subscriber,
                        targets,
                        ..
                    },
                ) = (&submitted, op.as_ref())
                {
                    ctx.cluster_privacy_requests(subscriber, targets);
                }
                match submitted {
                    Ok(outcome) => push_reply(
                        outbound,
                        request_id,
                        command::logged_reply(&op, outcome, &ctx.registry),
                    ),
                    Err(e) => {
                        let error = RequestError {
                            code: pb::ErrorCode::Unavailable,
                            reason: e.to_string(),
                            retry_after_ms: command::UNAVAILABLE_RETRY_MS,
                        };
                        push_error(outbound, request_id, operation, &error);
                    }
                }
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

/// What a frame source produced.
#[derive(Debug)]
pub(crate) enum Read {
    /// A complete frame.
    Frame(pb::ClientFrame),
    /// The session ends (socket closed, bad bytes, oversized frame).
    End(End),
    /// The first bytes of a frame are buffered (armed only when asked for).
    PartialStarted,
    /// The transport queued bytes of its own (a WebSocket pong) for the writer.
    WakeWriter,
}

/// The next frame; when `watch_partial`, also reports the moment bytes of an incomplete frame
/// sit in the source, so the partial-frame deadline is armed however they arrived.
async fn next_or_partial<F: FrameSource>(reader: &mut F, watch_partial: bool) -> Read {
    std::future::poll_fn(|cx| reader.poll_frame(cx, watch_partial)).await
}

/// Which deadline fired.
#[derive(Debug, Clone, Copy)]
enum Expiry {
    Connect,
    Keepalive,
    Partial,
    Token,
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
            Expiry::Token => End::Close(
                CloseKind::TokenExpired,
                "the session's token expired; connect again with a fresh token".into(),
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
    /// Ask the authenticator who this Connect is (awaited in the reader loop, under its
    /// timeout), then finish it with [`finish_connect`].
    Authenticate {
        request_id: u64,
        request: Box<command::ConnectRequest>,
    },
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
    /// Cluster mode: run `command` (ListSubscriptions) once this node has applied the whole
    /// subscription log as it stands now, so a client that moved here finds what it
    /// subscribed elsewhere.
    AfterCatchUp {
        request_id: u64,
        operation: &'static str,
        command: Box<Command>,
    },
    /// A privacy change: carried out (single node: stored and committed; cluster: through the
    /// privacy log), then answered.
    ReplyWhenPrivacyApplied {
        request_id: u64,
        operation: &'static str,
        command: Box<Command>,
    },
    /// Cluster mode: append `op` to the replicated subscription log, reply once the quorum
    /// acknowledged it and this node applied it (or with UNAVAILABLE).
    ReplyWhenLogged {
        request_id: u64,
        operation: &'static str,
        op: Box<crate::store::LoggedOp>,
        msg_id: Option<String>,
    },
}

fn handle_frame(
    frame: pb::ClientFrame,
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
                Step::Authenticate {
                    request_id,
                    request: Box::new(request),
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
            if let (Some(trigger), Command::SetPresence(change)) =
                (&ctx.config.session.panic_on_status, &command)
            {
                // Test builds set this (it is never read from a file) to show that a panicking
                // task leaves nothing behind.
                assert!(
                    change.status.as_ref() != Some(trigger),
                    "injected panic (session.panic_on_status)"
                );
            }
            if matches!(command, Command::Resume { .. }) {
                // Cluster mode: the subscriptions made elsewhere are applied here first.
                if ctx.sub_log.get().is_some() {
                    return Step::AfterCatchUp {
                        request_id,
                        operation,
                        command: Box::new(command),
                    };
                }
                match resume(command, current, outbound, &ctx.registry, limits) {
                    Ok(reply) => push_reply(outbound, request_id, reply),
                    Err(e) => push_error(outbound, request_id, operation, &e),
                }
                return Step::Continue;
            }
            if let Command::SetDelivery(contract) = command {
                let reply = set_delivery(contract, &current.user_id, outbound, &ctx.registry);
                push_reply(outbound, request_id, reply);
                return Step::Continue;
            }
            if command::privacy_op_of(&command, &current.user_id).is_some() {
                return Step::ReplyWhenPrivacyApplied {
                    request_id,
                    operation,
                    command: Box::new(command),
                };
            }
            if ctx.sub_log.get().is_some() && matches!(command, Command::ListSubscriptions { .. }) {
                return Step::AfterCatchUp {
                    request_id,
                    operation,
                    command: Box::new(command),
                };
            }
            if let Some(planned) = ctx
                .sub_log
                .get()
                .and_then(|_| command::logged_op(&command, current, limits))
            {
                match planned {
                    Ok((op, msg_id)) => {
                        return Step::ReplyWhenLogged {
                            request_id,
                            operation,
                            op: Box::new(op),
                            msg_id,
                        }
                    }
                    Err(e) => push_error(outbound, request_id, operation, &e),
                }
                return Step::Continue;
            }
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

/// Finishes a Connect once its authenticator answered: registers the session and queues the
/// ConnAck, or refuses. Every refusal is counted in the auth-failure metric by reason; the
/// kinds that are failed logins (UNAUTHENTICATED, BAD_SIGNATURE, TOKEN_EXPIRED) cost the
/// address its failed-login delay (and count toward its ban) whichever authenticator refused.
#[allow(clippy::too_many_arguments)]
fn finish_connect<F: FrameSource>(
    verdict: Result<Identity, crate::embed::AuthFailure>,
    request: command::ConnectRequest,
    request_id: u64,
    reader: &mut F,
    session: &mut Option<Session>,
    outbound: &Outbound,
    ctx: &ConnectionContext,
    peer: SocketAddr,
) -> Step {
    let received_at = Instant::now();
    let limits = &ctx.config.limits;
    let connected = verdict
        .map_err(|failure| {
            metrics::counter!(m::AUTH_FAILURES, "reason" => failure.metric_reason()).increment(1);
            failure.into_request_error()
        })
        .and_then(|identity| {
            command::connect(
                request,
                identity,
                &ctx.registry,
                &ctx.config,
                outbound,
                received_at,
            )
        });
    match connected {
        Ok((new_session, ack)) => {
            // First: events fanned out since the session was registered wait.
            let kind = wire::server_body_kind(&ack);
            outbound.push_reply_first(Item::reply(wire::frame(request_id, ack), kind));
            reader.set_max_frame_bytes(limits.max_frame_bytes as usize);
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
            let kind = match e.code {
                pb::ErrorCode::DeviceLimit => CloseKind::DeviceLimit,
                pb::ErrorCode::Unavailable => CloseKind::NodeUnavailable,
                _ => CloseKind::AuthFailed,
            };
            Step::End(End::Close(kind, e.reason))
        }
    }
}

/// Answers a Resume: every user the session's user watches whose version differs from the one
/// the client holds goes out in full, in `PresenceBatch` frames of at most a page each, queued
/// before the returned `ResumeResult`, which tells the client its view is complete.
fn resume(
    command: Command,
    session: &Session,
    outbound: &Outbound,
    registry: &Registry,
    limits: &crate::config::LimitsConfig,
) -> Result<ServerBody, RequestError> {
    let Command::Resume {
        known,
        after: range_after,
        through: range_through,
    } = command
    else {
        return Err(RequestError::new(pb::ErrorCode::BadRequest, "not a resume"));
    };
    let now_ms = crate::now_ms();
    let store = registry.store();
    // The watched users in this page's range (the store lists them in user-id order).
    let mut watched: Vec<String> = Vec::new();
    let mut after = range_after.clone();
    'pages: loop {
        let page = store
            .list(&session.user_id, after.as_deref(), 1000, now_ms)
            .map_err(|e| RequestError::new(pb::ErrorCode::Internal, e.to_string()))?;
        after = page.entries.last().map(|(t, _)| t.clone());
        for (target, _) in page.entries {
            if range_through
                .as_deref()
                .is_some_and(|t| target.as_str() > t)
            {
                break 'pages;
            }
            watched.push(target);
        }
        if !page.has_more || after.is_none() {
            break;
        }
    }
    // What this answer sends stays within the reply budget: past it, the answer stops at a
    // user boundary and says so (`through_user_id`), and the client asks for the rest.
    let budget = limits.max_reply_bytes_in_flight as usize;
    let mut changed: Vec<pb::PresenceEvent> = Vec::new();
    let (mut bytes, mut unchanged, mut state_lost) = (0usize, 0u32, 0u32);
    let mut stopped_at: Option<String> = None;
    let viewer = crate::privacy::Viewer::User(&session.user_id);
    let mut last_answered: Option<&str> = None;
    let snapshots = registry.snapshots_for(viewer, &watched);
    for snapshot in &snapshots {
        let held = known.get(&snapshot.user_id).copied();
        if held == Some(snapshot.version) {
            unchanged += 1;
        } else {
            let kind = if snapshot.availability == crate::model::Availability::Offline {
                pb::EventKind::Offline
            } else {
                pb::EventKind::Online
            };
            let event = wire::snapshot_event(snapshot, kind);
            let size = prost::Message::encoded_len(&event);
            if bytes + size > budget && !changed.is_empty() {
                stopped_at = last_answered.map(str::to_string);
                break;
            }
            bytes += size;
            if held.is_some_and(|h| h > snapshot.version) {
                state_lost += 1;
            }
            changed.push(event);
        }
        last_answered = Some(&snapshot.user_id);
    }
    // The range answered: all of it, or up to the last user answered.
    let through = stopped_at.clone().or(range_through.clone());
    let watched: std::collections::HashSet<&str> = watched.iter().map(String::as_str).collect();
    let mut unwatched: Vec<String> = known
        .into_keys()
        .filter(|u| !watched.contains(u.as_str()))
        .filter(|u| through.as_deref().is_none_or(|t| u.as_str() <= t))
        .collect();
    unwatched.sort();
    let count = changed.len() as u32;
    for item in crate::delivery::batch_items(changed, crate::delivery::Fields::All) {
        outbound.push_reply(item);
    }
    let why = if state_lost > 0 {
        format!(
            "{state_lost} users had a lower version here than yours: the broker lost state \
             (restarted without its data, or crashed before the change was stored); their \
             presence was sent in full"
        )
    } else {
        String::new()
    };
    Ok(ServerBody::ResumeResult(pb::ResumeResult {
        changed: count,
        unchanged,
        unwatched_user_ids: unwatched,
        state_lost,
        why,
        complete: through.is_none(),
        after_user_id: range_after.unwrap_or_default(),
        through_user_id: through.unwrap_or_default(),
    }))
}

/// Puts a delivery contract in force. What an ending batched contract owes goes out first, in
/// one full-field `PresenceBatch`: the events it held, and the current presence of users whose
/// trimmed form went out (offline users are left out: their trimmed form is complete). The
/// reply follows it, so a client that has the reply has a complete view.
fn set_delivery(
    contract: Option<crate::delivery::Contract>,
    user_id: &str,
    outbound: &Outbound,
    registry: &Registry,
) -> ServerBody {
    use crate::delivery::Fields;
    let result = match &contract {
        None => pb::DeliveryResult::default(),
        Some(c) => pb::DeliveryResult {
            mode: pb::DeliveryMode::Batched as i32,
            interval_seconds: c.interval.as_secs() as u32,
            fields: c.fields.to_pb() as i32,
            live_users: c.live.len() as u32,
        },
    };
    if let Some((mut events, owed)) = outbound.set_delivery(contract) {
        let viewer = crate::privacy::Viewer::User(user_id);
        for snapshot in registry.snapshots_for(viewer, &owed) {
            if snapshot.availability == crate::model::Availability::Offline {
                continue;
            }
            events.push(wire::snapshot_event(&snapshot, pb::EventKind::Update));
        }
        for item in crate::delivery::batch_items(events, Fields::All) {
            outbound.push_reply(item);
        }
    }
    ServerBody::DeliveryResult(result)
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

/// How the writer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriterEnd {
    /// The queue closed and everything in it was written.
    Drained,
    /// A write failed (reset, broken pipe, TLS failure): the connection is lost.
    Failed,
    /// The socket stayed blocked past the slow-consumer deadline.
    Stalled,
}

/// Drains `outbound` into the sink, a batch per write, until the close frame has been written
/// or the socket fails or stays blocked past `slow_consumer_timeout`.
async fn write_loop<K: FrameSink>(
    mut sink: K,
    outbound: Outbound,
    slow_consumer_timeout: Duration,
) -> WriterEnd {
    let latency = metrics::histogram!(m::FANOUT_LATENCY_SECONDS);
    let bytes_out = metrics::counter!(m::BYTES_OUT);
    let mut kinds = KindCounts::default();
    while let Some(batch) = outbound.next_batch(WRITE_BATCH_BYTES).await {
        let written =
            tokio::time::timeout(slow_consumer_timeout, sink.write_batch(&batch.items)).await;
        let written = match written {
            Ok(Ok(n)) => n,
            Ok(Err(_)) => {
                outbound.close(None);
                return WriterEnd::Failed;
            }
            Err(_) => {
                if outbound.close(None) {
                    metrics::counter!(m::SLOW_CONSUMER_DISCONNECTS).increment(1);
                }
                return WriterEnd::Stalled;
            }
        };
        let now = Instant::now();
        for item in batch.items.iter().filter(|i| !i.bytes.is_empty()) {
            if let Some(at) = item.received_at {
                latency.record(now.saturating_duration_since(at).as_secs_f64());
            }
            kinds.add(item.kind);
        }
        kinds.flush();
        bytes_out.increment(written as u64);
        if batch.closing {
            break;
        }
    }
    sink.finish().await;
    WriterEnd::Drained
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::io;
    use std::pin::Pin;
    use std::sync::atomic::AtomicBool;
    use std::task::{Context, Poll};

    use prost::Message;
    use tokio::io::{AsyncReadExt, DuplexStream, ReadBuf};

    use crate::registry::Attach;
    use crate::store::MemoryStore;

    /// A stream whose writes fail once `broken` is set while its reads keep waiting: a link
    /// reset under the writer that the reader has not seen yet.
    struct BreakableWrites {
        inner: DuplexStream,
        broken: Arc<AtomicBool>,
    }

    impl AsyncRead for BreakableWrites {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for BreakableWrites {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            if self.broken.load(Ordering::SeqCst) {
                return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
            }
            Pin::new(&mut self.inner).poll_write(cx, data)
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    fn frame(request_id: u64, body: pb::client_frame::Body) -> Vec<u8> {
        pb::ClientFrame {
            request_id,
            body: Some(body),
        }
        .encode_length_delimited_to_vec()
    }

    /// The next presence event in `outbound`, decoded.
    async fn next_event(outbound: &Outbound) -> pb::PresenceEvent {
        loop {
            let batch = tokio::time::timeout(Duration::from_secs(10), outbound.next_batch(1 << 16))
                .await
                .expect("an event within 10 s")
                .expect("queue open");
            for item in batch.items {
                let frame = pb::ServerFrame::decode_length_delimited(&item.bytes[..]).unwrap();
                if let Some(ServerBody::PresenceEvent(e)) = frame.body {
                    return e;
                }
            }
        }
    }

    #[tokio::test]
    async fn a_failed_write_is_a_lost_connection_after_the_grace_period() {
        let mut config = Config::default();
        config.session.grace_period_ms = 200;
        let ctx = Arc::new(ConnectionContext::new(config, Arc::new(MemoryStore::new())));
        // A watcher of the victim, attached straight to the registry.
        let watcher = Outbound::new(u64::MAX, 64, 64, 64);
        ctx.registry
            .attach(Attach {
                user_id: "watcher".into(),
                device_id: "d".into(),
                platform: String::new(),
                outbound: watcher.clone(),
                initial: None,
                user_data: BTreeMap::new(),
                received_at: Instant::now(),
                invisible: false,
            })
            .unwrap();
        ctx.registry
            .store()
            .subscribe("watcher", &["victim".to_string()], u64::MAX, 0, 10)
            .unwrap();

        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let broken = Arc::new(AtomicBool::new(false));
        let stream = BreakableWrites {
            inner: server,
            broken: broken.clone(),
        };
        let task = tokio::spawn(run_session(
            stream,
            "127.0.0.1:1".parse().unwrap(),
            Transport::Plain,
            ctx.clone(),
            (),
        ));
        let connect = frame(
            1,
            pb::client_frame::Body::Connect(pb::Connect {
                token: crate::auth::dev_token("victim", 3600),
                device_id: "phone".into(),
                keepalive_seconds: 60,
                ..Default::default()
            }),
        );
        client.write_all(&connect).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = client.read(&mut buf).await.unwrap();
        let ack = pb::ServerFrame::decode_length_delimited(&buf[..n]).unwrap();
        assert!(matches!(ack.body, Some(ServerBody::ConnAck(_))), "{ack:?}");
        assert_eq!(
            next_event(&watcher).await.kind,
            pb::EventKind::Online as i32
        );

        // The link breaks under the writer: the next reply cannot be written.
        broken.store(true, Ordering::SeqCst);
        let ping = frame(2, pb::client_frame::Body::Ping(pb::Ping::default()));
        client.write_all(&ping).await.unwrap();
        let offline = next_event(&watcher).await;
        assert_eq!(offline.kind, pb::EventKind::Offline as i32);
        assert_eq!(
            offline.reason,
            pb::OfflineReason::ConnectionLost as i32,
            "a failed write is a lost connection, not a kick"
        );
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap()
            .unwrap();
    }
}
