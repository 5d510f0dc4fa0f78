//! The Rust client: TLS connect, Connect/ConnAck, request/reply matched by request id, and a
//! bounded stream of pushed events. Used by the integration tests, `presencectl` and the
//! benchmarks. A background task owns the read half and routes each frame either to the waiting
//! request or to the event queue; when the event queue is full it stops reading, so a client that
//! does not consume events looks like a slow consumer to the server, as a real one would.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::codec::{CodecError, DelimitedCodec};
use crate::pb;
use crate::pb::client_frame::Body as ClientBody;
use crate::pb::server_frame::Body as ServerBody;
use crate::tls;

/// The client codec: decodes server frames, encodes client frames.
pub type ClientCodec = DelimitedCodec<pb::ServerFrame, pb::ClientFrame>;

/// A connection's byte stream: TLS, or a WebSocket seen through [`ws_connect`]'s pump.
pub trait Io:
    tokio::io::AsyncRead + tokio::io::AsyncWrite + std::fmt::Debug + Send + Unpin + 'static
{
}
impl<
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + std::fmt::Debug + Send + Unpin + 'static,
    > Io for T
{
}

/// Which listener a client connects to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// TLS TCP, delimited frames.
    #[default]
    Tls,
    /// wss: TLS, then a WebSocket upgrade at `/v1/ws`, one frame per binary message.
    Wss,
    /// ws: a WebSocket upgrade over plain TCP.
    Ws,
}

/// Largest server frame the client accepts: the proto's bound on what a server sends (a reply
/// naming 100 users at the largest presence each is about 1.6 MB; batches are split at
/// 256 KiB).
pub const MAX_SERVER_FRAME: usize = 4 * 1024 * 1024;

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Socket failure.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// Certificates or server name.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The server sent something unreadable.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The server answered the request with an error frame.
    #[error("server error {code:?} in {operation}: {reason}", code = pb::ErrorCode::try_from(.0.code).unwrap_or_default(), operation = .0.operation, reason = .0.reason)]
    Server(pb::Error),
    /// The connection closed; the close frame when one came.
    #[error("connection closed: {0:?}")]
    Closed(Option<pb::Close>),
    /// The reply was not of the expected kind.
    #[error("unexpected reply: {0}")]
    Unexpected(String),
}

/// How to connect.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Broker address.
    pub addr: SocketAddr,
    /// Name checked against the server certificate ("localhost" for the dev certificate).
    pub server_name: String,
    /// TLS configuration (trust roots, ALPN).
    pub tls: Arc<rustls::ClientConfig>,
    /// Signed token.
    pub token: String,
    /// Device id ("" = "default" or the token's `did`).
    pub device_id: String,
    /// Platform name.
    pub platform: String,
    /// Keepalive wish in seconds (0 = server default).
    pub keepalive_secs: u32,
    /// Presence to publish with Connect.
    pub initial_presence: Option<pb::SetPresence>,
    /// Profile data.
    pub user_data: std::collections::BTreeMap<String, String>,
    /// Events buffered before the client stops reading its socket.
    pub event_capacity: usize,
    /// Local address to connect from (any loopback address, for tests of per-address limits).
    pub local_addr: Option<SocketAddr>,
    /// The listener's transport.
    pub transport: Transport,
    /// Connect invisible (user-level invisibility turned on before the device is announced).
    pub invisible: bool,
    /// Connect with this device invisible on its own (`Connect.invisible_device`).
    pub invisible_device: bool,
}

impl ClientOptions {
    /// Options for `addr` with the dev CA and the given token.
    pub fn new(addr: SocketAddr, token: impl Into<String>) -> ClientOptions {
        ClientOptions {
            addr,
            server_name: "localhost".into(),
            tls: tls::dev_client_config(),
            token: token.into(),
            device_id: String::new(),
            platform: "rust".into(),
            keepalive_secs: 0,
            initial_presence: None,
            user_data: Default::default(),
            event_capacity: 1024,
            local_addr: None,
            transport: Transport::Tls,
            invisible: false,
            invisible_device: false,
        }
    }

    /// Connects through a WebSocket listener (`Transport::Wss` or `Transport::Ws`) at `addr`.
    pub fn websocket(mut self, transport: Transport) -> ClientOptions {
        self.transport = transport;
        self
    }

    /// Sets the device id.
    pub fn device(mut self, device_id: impl Into<String>) -> ClientOptions {
        self.device_id = device_id.into();
        self
    }
}

/// Opens a TLS connection (no protocol traffic yet).
pub async fn tls_connect(
    addr: SocketAddr,
    server_name: &str,
    config: Arc<rustls::ClientConfig>,
) -> Result<TlsStream<TcpStream>, ClientError> {
    tls_connect_from(None, addr, server_name, config).await
}

/// Opens a TLS connection from `local` (when given) to `addr`.
pub async fn tls_connect_from(
    local: Option<SocketAddr>,
    addr: SocketAddr,
    server_name: &str,
    config: Arc<rustls::ClientConfig>,
) -> Result<TlsStream<TcpStream>, ClientError> {
    let tcp = match local {
        Some(local) => {
            let socket = if local.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            socket.bind(local)?;
            socket.connect(addr).await?
        }
        None => TcpStream::connect(addr).await?,
    };
    tcp.set_nodelay(true)?;
    let name = tls::server_name(server_name)?;
    Ok(TlsConnector::from(config).connect(name, tcp).await?)
}

/// Reply waiters by request id, and whether the router has stopped (then no reply will come).
#[derive(Debug, Default)]
struct PendingReplies {
    waiters: HashMap<u64, oneshot::Sender<pb::ServerFrame>>,
    closed: bool,
}

type Pending = Arc<Mutex<PendingReplies>>;
type Writer = FramedWrite<WriteHalf<Box<dyn Io>>, ClientCodec>;

/// A connected, authenticated session.
#[derive(Debug)]
pub struct Client {
    writer: tokio::sync::Mutex<Writer>,
    pending: Pending,
    events: mpsc::Receiver<pb::ServerFrame>,
    /// Pushed frames taken out of `events` and put back (see `resume`), read first.
    stash: std::collections::VecDeque<pb::ServerFrame>,
    next_id: AtomicU64,
    /// The task reading the socket; aborted on drop so the socket closes with the client.
    router: tokio::task::JoinHandle<()>,
    /// The server's ConnAck.
    pub conn_ack: pb::ConnAck,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.router.abort();
    }
}

impl Client {
    /// Connects, authenticates and waits for ConnAck. A refused Connect is
    /// `ClientError::Server` with the server's error.
    pub async fn connect(options: ClientOptions) -> Result<Client, ClientError> {
        let stream: Box<dyn Io> = match options.transport {
            Transport::Tls => Box::new(
                tls_connect_from(
                    options.local_addr,
                    options.addr,
                    &options.server_name,
                    options.tls.clone(),
                )
                .await?,
            ),
            Transport::Wss | Transport::Ws => Box::new(ws_connect(&options).await?),
        };
        let (read_half, write_half) = tokio::io::split(stream);
        let mut writer = FramedWrite::new(write_half, ClientCodec::new(MAX_SERVER_FRAME));
        let mut reader = FramedRead::new(read_half, ClientCodec::new(MAX_SERVER_FRAME));
        writer
            .send(pb::ClientFrame {
                request_id: 1,
                body: Some(ClientBody::Connect(pb::Connect {
                    token: options.token.clone(),
                    device_id: options.device_id.clone(),
                    platform: options.platform.clone(),
                    keepalive_seconds: options.keepalive_secs,
                    initial_presence: options.initial_presence.clone(),
                    user_data: options.user_data.clone(),
                    invisible: options.invisible,
                    invisible_device: options.invisible_device,
                })),
            })
            .await?;
        let conn_ack = match reader.next().await {
            Some(Ok(pb::ServerFrame {
                body: Some(ServerBody::ConnAck(ack)),
                ..
            })) => ack,
            Some(Ok(pb::ServerFrame {
                body: Some(ServerBody::Error(e)),
                ..
            })) => return Err(ClientError::Server(e)),
            Some(Ok(other)) => return Err(ClientError::Unexpected(format!("{other:?}"))),
            Some(Err(e)) => return Err(e.into()),
            None => return Err(ClientError::Closed(None)),
        };
        let pending: Pending = Arc::default();
        let (events_tx, events) = mpsc::channel(options.event_capacity.max(1));
        let router = tokio::spawn(route_frames(reader, pending.clone(), events_tx));
        Ok(Client {
            router,
            writer: tokio::sync::Mutex::new(writer),
            pending,
            events,
            stash: Default::default(),
            next_id: AtomicU64::new(2),
            conn_ack,
        })
    }

    /// Sends a request and waits for its reply body; an error frame becomes
    /// `ClientError::Server`.
    pub async fn request(&self, body: ClientBody) -> Result<ServerBody, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            if pending.closed {
                return Err(ClientError::Closed(None));
            }
            pending.waiters.insert(id, tx);
        }
        self.send_raw(pb::ClientFrame {
            request_id: id,
            body: Some(body),
        })
        .await?;
        match rx.await {
            Ok(pb::ServerFrame {
                body: Some(ServerBody::Error(e)),
                ..
            }) => Err(ClientError::Server(e)),
            Ok(pb::ServerFrame {
                body: Some(body), ..
            }) => Ok(body),
            Ok(other) => Err(ClientError::Unexpected(format!("{other:?}"))),
            Err(_) => Err(ClientError::Closed(None)),
        }
    }

    /// Sends a request and extracts the expected reply kind.
    async fn call<T>(
        &self,
        body: ClientBody,
        extract: fn(ServerBody) -> Option<T>,
    ) -> Result<T, ClientError> {
        let reply = self.request(body).await?;
        let shown = format!("{reply:?}");
        extract(reply).ok_or(ClientError::Unexpected(shown))
    }

    /// Sends a frame as is, without waiting for anything (for tests of odd requests).
    pub async fn send_raw(&self, frame: pb::ClientFrame) -> Result<(), ClientError> {
        self.writer.lock().await.send(frame).await?;
        Ok(())
    }

    /// The next pushed frame (an event, a reply nobody waited for, or the Close frame), or
    /// `None` once the connection has closed and everything was consumed.
    pub async fn next_event(&mut self) -> Option<pb::ServerFrame> {
        if let Some(frame) = self.stash.pop_front() {
            return Some(frame);
        }
        self.events.recv().await
    }

    /// A pushed frame that has already arrived, without waiting.
    pub fn try_next_event(&mut self) -> Option<pb::ServerFrame> {
        self.stash
            .pop_front()
            .or_else(|| self.events.try_recv().ok())
    }

    fn requeue(&mut self, frames: Vec<pb::ServerFrame>) {
        for frame in frames.into_iter().rev() {
            self.stash.push_front(frame);
        }
    }

    /// Skips pushed frames until `pick` accepts one; `Err` with the close frame (or `None`)
    /// when the connection closes first.
    async fn next_matching<T>(
        &mut self,
        pick: fn(ServerBody) -> Option<T>,
    ) -> Result<T, ClientError> {
        loop {
            let Some(frame) = self.next_event().await else {
                return Err(ClientError::Closed(None));
            };
            match frame.body {
                Some(ServerBody::Close(c)) => return Err(ClientError::Closed(Some(c))),
                Some(body) => {
                    if let Some(found) = pick(body) {
                        return Ok(found);
                    }
                }
                None => {}
            }
        }
    }

    /// The next presence event; `Err` with the close frame if the connection closes first.
    pub async fn next_presence_event(&mut self) -> Result<pb::PresenceEvent, ClientError> {
        self.next_matching(|b| match b {
            ServerBody::PresenceEvent(e) => Some(e),
            _ => None,
        })
        .await
    }

    /// Resumes from the versions held per user: returns the changed users' presence (from the
    /// batches sent before each reply) and one reply summing every page's (`complete` set).
    /// A list that does not fit one frame (the session's `max_frame_bytes` and
    /// `max_subscriptions`) goes out in pages by user-id range, one Resume each, as the proto
    /// describes. Events pushed meanwhile stay queued.
    pub async fn resume(
        &mut self,
        known: &[(String, u64)],
    ) -> Result<(Vec<pb::PresenceEvent>, pb::ResumeResult), ClientError> {
        let limits = self.conn_ack.limits.unwrap_or_default();
        let budget = (limits.max_frame_bytes as usize).saturating_sub(RESUME_FRAME_SLACK);
        let mut sorted = known.to_vec();
        sorted.sort();
        sorted.dedup_by(|a, b| a.0 == b.0);
        let pages = resume_pages(&sorted, budget, limits.max_subscriptions as usize);
        let mut total = pb::ResumeResult::default();
        let mut changed = Vec::new();
        let mut why = Vec::new();
        for (mut after, through, mut entries) in pages {
            loop {
                let (events, result) = self
                    .resume_page(after.clone(), through.clone(), entries)
                    .await?;
                changed.extend(events);
                total.changed += result.changed;
                total.unchanged += result.unchanged;
                total.state_lost += result.state_lost;
                total.unwatched_user_ids.extend(result.unwatched_user_ids);
                total.complete = result.complete;
                if !result.why.is_empty() {
                    why.push(result.why);
                }
                // The broker answered a shorter range (its reply budget): ask for the rest.
                if result.through_user_id == through || result.through_user_id.is_empty() {
                    break;
                }
                after = result.through_user_id;
                let rest = entries.partition_point(|(u, _)| *u <= after);
                entries = &entries[rest..];
            }
        }
        total.why = why.join("; ");
        Ok((changed, total))
    }

    /// One Resume page: the users in `after` < user <= `through` (`""`: open).
    pub async fn resume_page(
        &mut self,
        after: String,
        through: String,
        known: &[(String, u64)],
    ) -> Result<(Vec<pb::PresenceEvent>, pb::ResumeResult), ClientError> {
        let body = ClientBody::Resume(pb::Resume {
            known: known
                .iter()
                .map(|(user_id, version)| pb::KnownVersion {
                    user_id: user_id.clone(),
                    version: *version,
                })
                .collect(),
            after_user_id: after,
            through_user_id: through,
        });
        let result = self
            .call(body, |b| match b {
                ServerBody::ResumeResult(r) => Some(r),
                _ => None,
            })
            .await?;
        // The batches came before the reply, so they are all in the event queue now; other
        // pushed frames keep their place.
        let mut changed = Vec::new();
        let mut others = Vec::new();
        let mut queued: Vec<pb::ServerFrame> = self.stash.drain(..).collect();
        while let Ok(frame) = self.events.try_recv() {
            queued.push(frame);
        }
        for frame in queued {
            match frame.body {
                Some(ServerBody::PresenceBatch(b)) if changed.len() < result.changed as usize => {
                    changed.extend(b.events)
                }
                _ => others.push(frame),
            }
        }
        self.requeue(others);
        Ok((changed, result))
    }

    /// Sets this connection's delivery contract (background mode).
    pub async fn set_delivery(
        &self,
        request: pb::SetDelivery,
    ) -> Result<pb::DeliveryResult, ClientError> {
        self.call(ClientBody::SetDelivery(request), |b| match b {
            ServerBody::DeliveryResult(r) => Some(r),
            _ => None,
        })
        .await
    }

    /// The next batch of held presence events; `Err` with the close frame if the connection
    /// closes first.
    pub async fn next_presence_batch(&mut self) -> Result<pb::PresenceBatch, ClientError> {
        self.next_matching(|b| match b {
            ServerBody::PresenceBatch(batch) => Some(batch),
            _ => None,
        })
        .await
    }

    /// Waits for the server's Close frame, skipping events.
    pub async fn closed(&mut self) -> Option<pb::Close> {
        match self.next_matching(|_| None::<()>).await {
            Err(ClientError::Closed(close)) => close,
            _ => None,
        }
    }

    /// Publishes presence.
    pub async fn set_presence(&self, change: pb::SetPresence) -> Result<pb::Presence, ClientError> {
        self.call(ClientBody::SetPresence(change), |b| match b {
            ServerBody::SetPresenceResult(r) => Some(r.presence.unwrap_or_default()),
            _ => None,
        })
        .await
    }

    /// Subscribes with the default expiry.
    pub async fn subscribe(&self, user_ids: &[&str]) -> Result<pb::SubscribeResult, ClientError> {
        self.subscribe_for(user_ids, 0).await
    }

    /// Subscribes with an expiry in seconds (0 = default).
    pub async fn subscribe_for(
        &self,
        user_ids: &[&str],
        expiry_seconds: u64,
    ) -> Result<pb::SubscribeResult, ClientError> {
        self.subscribe_with(pb::Subscribe {
            user_ids: user_ids.iter().map(|s| s.to_string()).collect(),
            expiry_seconds,
            idempotency_key: String::new(),
        })
        .await
    }

    /// Sends a Subscribe as given (e.g. with an idempotency key for a safe retry).
    pub async fn subscribe_with(
        &self,
        request: pb::Subscribe,
    ) -> Result<pb::SubscribeResult, ClientError> {
        self.call(ClientBody::Subscribe(request), |b| match b {
            ServerBody::SubscribeResult(r) => Some(r),
            _ => None,
        })
        .await
    }

    /// Unsubscribes.
    pub async fn unsubscribe(
        &self,
        user_ids: &[&str],
    ) -> Result<pb::UnsubscribeResult, ClientError> {
        let body = ClientBody::Unsubscribe(pb::Unsubscribe {
            user_ids: user_ids.iter().map(|s| s.to_string()).collect(),
            idempotency_key: String::new(),
        });
        self.call(body, |b| match b {
            ServerBody::UnsubscribeResult(r) => Some(r),
            _ => None,
        })
        .await
    }

    /// One page of subscriptions.
    pub async fn list_subscriptions(
        &self,
        cursor: &str,
        page_size: u32,
    ) -> Result<pb::ListSubscriptionsResult, ClientError> {
        let body = ClientBody::ListSubscriptions(pb::ListSubscriptions {
            cursor: cursor.to_string(),
            page_size,
        });
        self.call(body, |b| match b {
            ServerBody::ListSubscriptionsResult(r) => Some(r),
            _ => None,
        })
        .await
    }

    /// Every subscription, following cursors.
    pub async fn all_subscriptions(&self) -> Result<Vec<pb::Subscription>, ClientError> {
        let mut out = Vec::new();
        let mut cursor = String::new();
        loop {
            let page = self.list_subscriptions(&cursor, 0).await?;
            out.extend(page.subscriptions);
            if page.next_cursor.is_empty() {
                return Ok(out);
            }
            cursor = page.next_cursor;
        }
    }

    /// Queries presence without subscribing.
    pub async fn get_presence(&self, user_ids: &[&str]) -> Result<Vec<pb::Presence>, ClientError> {
        let body = ClientBody::GetPresence(pb::GetPresence {
            user_ids: user_ids.iter().map(|s| s.to_string()).collect(),
        });
        self.call(body, |b| match b {
            ServerBody::GetPresenceResult(r) => Some(r.presences),
            _ => None,
        })
        .await
    }

    /// Turns user-level invisibility on or off.
    pub async fn set_invisible(&self, on: bool) -> Result<pb::SetInvisibleResult, ClientError> {
        let body = ClientBody::SetInvisible(pb::SetInvisible {
            invisible: on,
            scope: pb::InvisibleScope::User as i32,
        });
        self.call(body, |b| match b {
            ServerBody::SetInvisibleResult(r) => Some(r),
            _ => None,
        })
        .await
    }

    /// Turns this device's own invisibility on or off (for this session).
    pub async fn set_device_invisible(
        &self,
        on: bool,
    ) -> Result<pb::SetInvisibleResult, ClientError> {
        let body = ClientBody::SetInvisible(pb::SetInvisible {
            invisible: on,
            scope: pb::InvisibleScope::Device as i32,
        });
        self.call(body, |b| match b {
            ServerBody::SetInvisibleResult(r) => Some(r),
            _ => None,
        })
        .await
    }

    /// Blocks users.
    pub async fn block(&self, user_ids: &[&str]) -> Result<pb::BlockResult, ClientError> {
        let body = ClientBody::Block(pb::Block {
            user_ids: user_ids.iter().map(|s| s.to_string()).collect(),
        });
        self.call(body, |b| match b {
            ServerBody::BlockResult(r) => Some(r),
            _ => None,
        })
        .await
    }

    /// Lifts blocks.
    pub async fn unblock(&self, user_ids: &[&str]) -> Result<pb::BlockResult, ClientError> {
        let body = ClientBody::Unblock(pb::Unblock {
            user_ids: user_ids.iter().map(|s| s.to_string()).collect(),
        });
        self.call(body, |b| match b {
            ServerBody::BlockResult(r) => Some(r),
            _ => None,
        })
        .await
    }

    /// One page of the block list.
    pub async fn list_blocked(
        &self,
        cursor: &str,
        page_size: u32,
    ) -> Result<pb::ListBlockedResult, ClientError> {
        let body = ClientBody::ListBlocked(pb::ListBlocked {
            cursor: cursor.to_string(),
            page_size,
        });
        self.call(body, |b| match b {
            ServerBody::ListBlockedResult(r) => Some(r),
            _ => None,
        })
        .await
    }

    /// Sets who sees your presence and your last-seen time (`Unspecified`: unchanged);
    /// returns your settings.
    pub async fn set_privacy(
        &self,
        presence: pb::Audience,
        last_seen: pb::Audience,
    ) -> Result<pb::PrivacySettings, ClientError> {
        let body = ClientBody::SetPrivacy(pb::SetPrivacy {
            presence_audience: presence as i32,
            last_seen_audience: last_seen as i32,
        });
        self.call(body, |b| match b {
            ServerBody::PrivacySettings(r) => Some(r),
            _ => None,
        })
        .await
    }

    /// Your privacy settings.
    pub async fn get_privacy(&self) -> Result<pb::PrivacySettings, ClientError> {
        self.call(ClientBody::GetPrivacy(pb::GetPrivacy {}), |b| match b {
            ServerBody::PrivacySettings(r) => Some(r),
            _ => None,
        })
        .await
    }

    /// Approves, denies or revokes watchers; returns how many changed.
    pub async fn set_approval(
        &self,
        user_ids: &[&str],
        action: pb::ApprovalAction,
    ) -> Result<u32, ClientError> {
        let body = ClientBody::SetApproval(pb::SetApproval {
            user_ids: user_ids.iter().map(|s| s.to_string()).collect(),
            action: action as i32,
        });
        self.call(body, |b| match b {
            ServerBody::SetApprovalResult(r) => Some(r.changed),
            _ => None,
        })
        .await
    }

    /// One page of your requests and approvals (`Unspecified`: every state).
    pub async fn list_approvals(
        &self,
        state: pb::ApprovalState,
        cursor: &str,
        page_size: u32,
    ) -> Result<pb::ListApprovalsResult, ClientError> {
        let body = ClientBody::ListApprovals(pb::ListApprovals {
            state: state as i32,
            cursor: cursor.to_string(),
            page_size,
        });
        self.call(body, |b| match b {
            ServerBody::ListApprovalsResult(r) => Some(r),
            _ => None,
        })
        .await
    }

    /// The next subscription request (someone asked to see your presence); other events
    /// before it are dropped.
    pub async fn next_subscription_request(
        &mut self,
    ) -> Result<pb::SubscriptionRequest, ClientError> {
        self.next_matching(|b| match b {
            ServerBody::SubscriptionRequest(r) => Some(r),
            _ => None,
        })
        .await
    }

    /// The next acceptance (someone approved you); other events before it are dropped.
    pub async fn next_subscription_accepted(
        &mut self,
    ) -> Result<pb::SubscriptionAccepted, ClientError> {
        self.next_matching(|b| match b {
            ServerBody::SubscriptionAccepted(r) => Some(r),
            _ => None,
        })
        .await
    }

    /// Sends a directed presence; returns the recipients that were online.
    pub async fn direct(
        &self,
        user_ids: &[&str],
        presence: pb::SetPresence,
    ) -> Result<Vec<String>, ClientError> {
        let body = ClientBody::DirectedPresence(pb::DirectedPresence {
            user_ids: user_ids.iter().map(|s| s.to_string()).collect(),
            presence: Some(presence),
        });
        self.call(body, |b| match b {
            ServerBody::DirectedPresenceResult(r) => Some(r.delivered_user_ids),
            _ => None,
        })
        .await
    }

    /// Ping; returns the server time.
    pub async fn ping(&self) -> Result<u64, ClientError> {
        self.call(ClientBody::Ping(pb::Ping {}), |b| match b {
            ServerBody::Pong(p) => Some(p.server_time_ms),
            _ => None,
        })
        .await
    }

    fn channel_reply(body: ServerBody) -> Option<pb::ChannelResult> {
        match body {
            ServerBody::ChannelResult(r) => Some(r),
            _ => None,
        }
    }

    fn channel_state_reply(body: ServerBody) -> Option<pb::ChannelStateResult> {
        match body {
            ServerBody::ChannelStateResult(r) => Some(r),
            _ => None,
        }
    }

    /// Joins a channel with initial member state.
    pub async fn join(
        &self,
        channel: &str,
        state: &[(&str, &str)],
    ) -> Result<pb::ChannelResult, ClientError> {
        let body = ClientBody::JoinChannel(pb::JoinChannel {
            channel: channel.into(),
            state: pairs(state),
        });
        self.call(body, Self::channel_reply).await
    }

    /// Leaves a channel.
    pub async fn leave(&self, channel: &str) -> Result<pb::ChannelResult, ClientError> {
        let body = ClientBody::LeaveChannel(pb::LeaveChannel {
            channel: channel.into(),
        });
        self.call(body, Self::channel_reply).await
    }

    /// Watches a channel without joining.
    pub async fn watch_channel(&self, channel: &str) -> Result<pb::ChannelResult, ClientError> {
        let body = ClientBody::WatchChannel(pb::WatchChannel {
            channel: channel.into(),
        });
        self.call(body, Self::channel_reply).await
    }

    /// Stops watching a channel.
    pub async fn unwatch_channel(&self, channel: &str) -> Result<pb::ChannelResult, ClientError> {
        let body = ClientBody::UnwatchChannel(pb::UnwatchChannel {
            channel: channel.into(),
        });
        self.call(body, Self::channel_reply).await
    }

    /// One page of who-now.
    pub async fn who_now(
        &self,
        channel: &str,
        mode: pb::WhoNowMode,
        cursor: &str,
        page_size: u32,
    ) -> Result<pb::WhoNowResult, ClientError> {
        let body = ClientBody::WhoNow(pb::WhoNow {
            channel: channel.into(),
            mode: mode as i32,
            cursor: cursor.into(),
            page_size,
        });
        self.call(body, |b| match b {
            ServerBody::WhoNowResult(r) => Some(r),
            _ => None,
        })
        .await
    }

    /// The channels a user has joined ("" = yourself).
    pub async fn where_now(&self, user_id: &str) -> Result<Vec<String>, ClientError> {
        let body = ClientBody::WhereNow(pb::WhereNow {
            user_id: user_id.into(),
        });
        self.call(body, |b| match b {
            ServerBody::WhereNowResult(r) => Some(r.channels),
            _ => None,
        })
        .await
    }

    /// Merges into your member state in a channel.
    pub async fn set_channel_state(
        &self,
        channel: &str,
        state: &[(&str, &str)],
        replace: bool,
    ) -> Result<pb::ChannelStateResult, ClientError> {
        let body = ClientBody::SetChannelState(pb::SetChannelState {
            channel: channel.into(),
            state: pairs(state),
            replace,
        });
        self.call(body, Self::channel_state_reply).await
    }

    /// A user's member state in a channel ("" = yourself).
    pub async fn get_channel_state(
        &self,
        channel: &str,
        user_id: &str,
    ) -> Result<pb::ChannelStateResult, ClientError> {
        let body = ClientBody::GetChannelState(pb::GetChannelState {
            channel: channel.into(),
            user_id: user_id.into(),
        });
        self.call(body, Self::channel_state_reply).await
    }

    /// Removes keys (all when empty) from your member state.
    pub async fn remove_channel_state(
        &self,
        channel: &str,
        keys: &[&str],
    ) -> Result<pb::ChannelStateResult, ClientError> {
        let body = ClientBody::RemoveChannelState(pb::RemoveChannelState {
            channel: channel.into(),
            keys: keys.iter().map(|k| k.to_string()).collect(),
        });
        self.call(body, Self::channel_state_reply).await
    }

    /// The next channel event; `Err` with the close frame if the connection closes first.
    pub async fn next_channel_event(&mut self) -> Result<pb::ChannelEvent, ClientError> {
        self.next_matching(|b| match b {
            ServerBody::ChannelEvent(e) => Some(e),
            _ => None,
        })
        .await
    }

    /// Says goodbye and waits for the server's Close.
    pub async fn disconnect(mut self) -> Result<Option<pb::Close>, ClientError> {
        self.send_raw(pb::ClientFrame {
            request_id: 0,
            body: Some(ClientBody::Disconnect(pb::Disconnect::default())),
        })
        .await?;
        Ok(self.closed().await)
    }
}

async fn route_frames(
    mut reader: FramedRead<ReadHalf<Box<dyn Io>>, ClientCodec>,
    pending: Pending,
    events: mpsc::Sender<pb::ServerFrame>,
) {
    while let Some(Ok(frame)) = reader.next().await {
        let waiter = if frame.request_id != 0 {
            pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .waiters
                .remove(&frame.request_id)
        } else {
            None
        };
        match waiter {
            Some(tx) => {
                let _ = tx.send(frame);
            }
            None => {
                if events.send(frame).await.is_err() {
                    break;
                }
            }
        }
    }
    let mut pending = pending.lock().unwrap_or_else(|p| p.into_inner());
    pending.closed = true;
    pending.waiters.clear();
}

/// Opens a WebSocket to `options.addr` (wss or ws, as `options.transport` says) with the
/// `presence.v1` subprotocol, and returns a byte stream of delimited frames: a pump task turns
/// each frame written into one binary message and each binary message into a delimited frame,
/// so the rest of the client is the same for every transport. The pump ends, closing the
/// WebSocket, when the stream is dropped, and ends the stream when the WebSocket closes.
pub async fn ws_connect(options: &ClientOptions) -> Result<tokio::io::DuplexStream, ClientError> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let tcp = TcpStream::connect(options.addr).await?;
    tcp.set_nodelay(true)?;
    let (scheme, stream): (&str, Box<dyn Io>) = match options.transport {
        Transport::Ws => ("ws", Box::new(tcp)),
        _ => {
            let name = tls::server_name(&options.server_name)?;
            let tls = TlsConnector::from(options.tls.clone())
                .connect(name, tcp)
                .await?;
            ("wss", Box::new(tls))
        }
    };
    let url = format!(
        "{scheme}://{}:{}{}",
        options.server_name,
        options.addr.port(),
        crate::ws::config::PATH
    );
    let mut request = url
        .into_client_request()
        .map_err(|e| ClientError::Unexpected(e.to_string()))?;
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        tokio_tungstenite::tungstenite::http::HeaderValue::from_static(
            crate::ws::config::SUBPROTOCOL,
        ),
    );
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(MAX_SERVER_FRAME))
        .write_buffer_size(0);
    let (ws, _) = tokio_tungstenite::client_async_with_config(request, stream, Some(config))
        .await
        .map_err(|e| ClientError::Unexpected(format!("WebSocket upgrade failed: {e}")))?;
    let (app, pump_end) = tokio::io::duplex(64 * 1024);
    tokio::spawn(ws_pump(ws, pump_end));
    Ok(app)
}

/// Moves frames between the duplex stream and the WebSocket until either side ends.
async fn ws_pump(
    ws: tokio_tungstenite::WebSocketStream<Box<dyn Io>>,
    end: tokio::io::DuplexStream,
) {
    use tokio::io::AsyncWriteExt;
    use tokio_tungstenite::tungstenite::Message;
    let (mut ws_tx, mut ws_rx) = ws.split();
    let (read_half, mut write_half) = tokio::io::split(end);
    let mut frames = FramedRead::new(read_half, RawFrames);
    loop {
        tokio::select! {
            frame = frames.next() => match frame {
                Some(Ok(payload)) => {
                    if ws_tx.send(Message::Binary(payload)).await.is_err() {
                        break;
                    }
                }
                _ => {
                    let _ = ws_tx.close().await;
                    break;
                }
            },
            message = ws_rx.next() => match message {
                Some(Ok(Message::Binary(payload))) => {
                    let mut prefix = Vec::with_capacity(10 + payload.len());
                    prost::encoding::encode_varint(payload.len() as u64, &mut prefix);
                    prefix.extend_from_slice(&payload);
                    if write_half.write_all(&prefix).await.is_err() {
                        break;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            },
        }
    }
    let _ = write_half.shutdown().await;
}

/// Splits delimited frames into their payloads, for the WebSocket pump.
struct RawFrames;

impl tokio_util::codec::Decoder for RawFrames {
    type Item = bytes::Bytes;
    type Error = std::io::Error;

    fn decode(
        &mut self,
        src: &mut bytes::BytesMut,
    ) -> Result<Option<bytes::Bytes>, std::io::Error> {
        use bytes::Buf;
        let mut peek = &src[..];
        let Ok(len) = prost::encoding::decode_varint(&mut peek) else {
            // Too short to hold the whole prefix yet (or garbage: the client wrote it).
            return Ok(None);
        };
        let prefix = src.len() - peek.len();
        if peek.len() < len as usize {
            return Ok(None);
        }
        src.advance(prefix);
        Ok(Some(src.split_to(len as usize).freeze()))
    }
}

fn pairs(state: &[(&str, &str)]) -> std::collections::BTreeMap<String, String> {
    state
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Bytes of a Resume frame kept free for everything but the entries: the frame's length
/// prefix, request id and envelope, and both range bounds (user ids are at most 256 bytes).
const RESUME_FRAME_SLACK: usize = 1024;

/// One Resume page: (after, through, the entries in that range).
pub type ResumePage<'a> = (String, String, &'a [(String, u64)]);

/// Splits `sorted` (by user id, no duplicates) into Resume pages of at most `budget` encoded
/// bytes of entries and `max_entries` entries: (after, through, entries), the first page from
/// the start (`after` empty), each next one after the previous one's last user, the last one to
/// the end (`through` empty). An empty list is one page covering everything.
pub fn resume_pages(
    sorted: &[(String, u64)],
    budget: usize,
    max_entries: usize,
) -> Vec<ResumePage<'_>> {
    use prost::Message;
    let (budget, max_entries) = (budget.max(1), max_entries.max(1));
    let mut pages = Vec::new();
    let (mut start, mut bytes) = (0usize, 0usize);
    let mut after = String::new();
    for (i, (user_id, version)) in sorted.iter().enumerate() {
        let entry = pb::KnownVersion {
            user_id: user_id.clone(),
            version: *version,
        }
        .encoded_len();
        // The entry's tag and length prefix.
        let entry = entry + 1 + prost::length_delimiter_len(entry);
        if i > start && (bytes + entry > budget || i - start >= max_entries) {
            let through = sorted[i - 1].0.clone();
            pages.push((after, through.clone(), &sorted[start..i]));
            after = through;
            (start, bytes) = (i, 0);
        }
        bytes += entry;
    }
    pages.push((after, String::new(), &sorted[start..]));
    pages
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_pages_cover_every_user_once_in_ranges_that_fit() {
        let known: Vec<(String, u64)> = (0..5000)
            .map(|i| (format!("user{i:05}"), u64::MAX - i))
            .collect();
        let pages = resume_pages(&known, 64 * 1024 - RESUME_FRAME_SLACK, 10_000);
        assert!(pages.len() > 1, "5,000 entries do not fit one frame");
        assert_eq!(pages.first().unwrap().0, "");
        assert_eq!(pages.last().unwrap().1, "");
        let mut seen = 0;
        for (i, (after, through, entries)) in pages.iter().enumerate() {
            let frame = pb::Resume {
                known: entries
                    .iter()
                    .map(|(u, v)| pb::KnownVersion {
                        user_id: u.clone(),
                        version: *v,
                    })
                    .collect(),
                after_user_id: after.clone(),
                through_user_id: through.clone(),
            };
            let frame = pb::ClientFrame {
                request_id: u64::MAX,
                body: Some(ClientBody::Resume(frame)),
            };
            assert!(
                prost::Message::encoded_len(&frame) + 10 <= 64 * 1024,
                "fits a frame"
            );
            for (u, _) in entries.iter() {
                assert!(crate::command::in_range(
                    u,
                    Some(after.as_str()).filter(|a| !a.is_empty()),
                    Some(through.as_str()).filter(|t| !t.is_empty()),
                ));
            }
            if i + 1 < pages.len() {
                assert_eq!(&pages[i + 1].0, through, "ranges are contiguous");
            }
            seen += entries.len();
        }
        assert_eq!(seen, known.len());
        // The entry cap applies too, and an empty list is one open page.
        assert_eq!(resume_pages(&known[..10], usize::MAX, 3).len(), 4);
        let none = resume_pages(&[], 1000, 10);
        assert_eq!(none.len(), 1);
        assert!(none[0].0.is_empty() && none[0].1.is_empty() && none[0].2.is_empty());
    }
}
