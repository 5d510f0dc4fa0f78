//! The listener side: loads the subscription store, then binds the TLS (and optional plain)
//! listener and the metrics endpoint,
//! accepts connections under each address's share of the accept rate and of connections, then
//! under the global accept rate and connection limit, spawns one task per connection (the
//! TLS handshake runs in that task, never in the accept loop), sweeps expired subscriptions, and
//! shuts down in order: stop accepting, tell clients, wait for connections with a deadline,
//! flush the store.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::address::{AddressLimits, AddressLimitsConfig, AddressPermit};
use crate::admin::AdminApi;
use crate::cluster::Cluster;
use crate::command::TokenBucket;
use crate::config::{Config, ConfigError};
use crate::connection::{self, ConnectionContext};
use crate::events::EventBus;
use crate::metrics as m;
use crate::mqtt_bridge::{MqttBridge, MqttBridgeError};
use crate::registry::Registry;
use crate::store::{SledStore, StoreError, SubscriptionStore};
use crate::tls::{self, TlsError};
use crate::webhooks::Webhooks;

/// Why the server could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Certificates could not be loaded.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The subscription store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The MQTT bridge could not be set up.
    #[error(transparent)]
    MqttBridge(#[from] MqttBridgeError),
    /// Cluster mode could not start.
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    /// The presence hook's thread could not start.
    #[error("cannot start the presence hook's thread: {0}")]
    Hook(std::io::Error),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// A bound, not yet running broker.
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    plain_listener: Option<TcpListener>,
    /// The wss listener (`[websocket] listen`).
    ws_listener: Option<TcpListener>,
    /// The plain ws listener (`[websocket] plain_listen`).
    ws_plain_listener: Option<TcpListener>,
    metrics_listener: Option<TcpListener>,
    tls_config: Arc<rustls::ServerConfig>,
    ctx: Arc<ConnectionContext>,
    connection_permits: Arc<Semaphore>,
    /// Each address's share of the accept rate and of connections, shared by both listeners.
    address_limits: AddressLimits,
    /// The cluster link, in cluster mode.
    cluster: Option<Cluster>,
    /// Numbers backend events for webhooks and the admin API's replay.
    events: Arc<EventBus>,
    /// Webhook delivery, started by `run`.
    webhooks: Webhooks,
    /// The admin API, when a key is configured.
    admin: Option<AdminApi>,
    /// The embedder's presence hook, when one is plugged in.
    hook: Option<crate::embed::HookHandle>,
    /// The MQTT bridge, started by `run`.
    mqtt_bridge: Option<MqttBridge>,
}

/// Pending connections the kernel may queue before `accept` (capped by `net.core.somaxconn`).
/// Tokio's default of 1,024 overflows when thousands of clients reconnect at once, and every
/// dropped SYN costs its client a one-second retransmit.
const LISTEN_BACKLOG: u32 = 8192;

async fn bind(addr: SocketAddr) -> Result<TcpListener, ServerError> {
    let listen = || {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    listen().map_err(|source| ServerError::Bind { addr, source })
}

impl Server {
    /// Validates `config`, loads certificates and the store, and binds every listener. Nothing
    /// is accepted until [`Server::run`]. The standalone broker's behaviour: see
    /// [`Server::builder`] to plug in an authenticator, a presence hook or a store.
    pub async fn bind(config: Config) -> Result<Server, ServerError> {
        Server::bind_with(config, crate::embed::Plugins::default()).await
    }

    /// A builder for embedding programs: `config` plus an [`Authenticator`], a
    /// [`PresenceHook`] and a [`SubscriptionStore`] of the embedder's (see [`crate::embed`]).
    ///
    /// [`Authenticator`]: crate::embed::Authenticator
    /// [`PresenceHook`]: crate::embed::PresenceHook
    pub fn builder(config: Config) -> crate::embed::ServerBuilder {
        crate::embed::ServerBuilder::new(config)
    }

    /// [`Server::bind`] with an embedder's plug-ins (the defaults where `None`).
    pub(crate) async fn bind_with(
        config: Config,
        plugins: crate::embed::Plugins,
    ) -> Result<Server, ServerError> {
        config.validate()?;
        // The recorder is installed even when the endpoint is off, before any connection
        // exists, so gauges never see a decrement without its increment.
        m::install();
        // Ticket keys are shared with the cluster link, which installs the cluster's secrets.
        let tickets =
            crate::tls_tickets::TicketKeys::from_config(&config.tls, config.cluster.is_some())
                .map_err(TlsError::from)?;
        let tls_config = tls::server_config_with_tickets(&config.tls, tickets.clone())?;
        // The store is loaded into memory before any listener exists, so no client can observe
        // a half-loaded subscription set.
        let store: Arc<dyn SubscriptionStore> = match plugins.store {
            Some(store) => store,
            None => {
                let data_dir = config.data_dir.clone();
                Arc::new(
                    tokio::task::spawn_blocking(move || SledStore::open(&data_dir))
                        .await
                        .map_err(|e| StoreError::Backend(format!("store loader failed: {e}")))??,
                )
            }
        };
        let listener = bind(config.listen).await?;
        let plain_listener = match config.plain_listen {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        let ws_listener = match config.websocket.listen {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        let ws_plain_listener = match config.websocket.plain_listen {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        let metrics_listener = if config.metrics.enabled {
            Some(bind(config.metrics.listen).await?)
        } else {
            None
        };
        let connection_permits = Arc::new(Semaphore::new(config.limits.max_connections as usize));
        let address_limits = AddressLimits::new(AddressLimitsConfig {
            max_connections: config.limits.max_connections_per_address,
            accept_rate_per_sec: config.limits.accept_rate_per_address_per_sec,
            accept_burst: config.limits.accept_burst_per_address,
            max_tracked: AddressLimitsConfig::tracked_bound(config.limits.max_connections),
        });
        let cluster_config = config.cluster.clone();
        let admin_config = config.admin.clone();
        let (webhooks, mut sinks) = Webhooks::new(&config.webhooks);
        // The hook and the MQTT bridge come after the webhooks' sinks: in cluster mode the
        // webhooks' delivery progress names the first sinks by position.
        let hook = match plugins.hook {
            Some(hook) => {
                let handle = crate::embed::HookHandle::start(hook, plugins.hook_queue)
                    .map_err(ServerError::Hook)?;
                sinks.push(handle.sink());
                Some(handle)
            }
            None => None,
        };
        let mqtt_bridge = match &config.mqtt_bridge {
            Some(c) => {
                let (bridge, sink) = MqttBridge::new(c)?;
                sinks.push(sink);
                Some(bridge)
            }
            None => None,
        };
        let grace = config.grace_period();
        // The log keeps entries as long as they can matter: subscriptions until they expire,
        // revocations until no token issued before them can be valid.
        let max_expiry = Duration::from_secs(
            config
                .limits
                .max_expiry_secs
                .max(config.auth.max_token_lifetime_secs),
        );
        let mut ctx = ConnectionContext::new(config, store);
        if let Some(authenticator) = plugins.authenticator {
            ctx.auth.authenticator = authenticator;
        }
        ctx.auth.timeout = plugins.auth_timeout;
        let ctx = Arc::new(ctx);
        // Cluster mode joins before the listener accepts anyone: the node then answers with
        // the cluster's presence from its first client on.
        let cluster = match cluster_config {
            Some(c) => {
                let node = c.node_id.clone().unwrap_or_else(|| {
                    let addr = listener.local_addr().unwrap_or(ctx.config.listen);
                    crate::config::ClusterConfig::default_node_id(addr)
                });
                let cluster =
                    Cluster::start(&c, node, ctx.registry.clone(), grace, max_expiry).await?;
                if let Some(keys) = tickets.filter(|k| k.is_shared()) {
                    cluster.start_ticket_keys(keys).await;
                }
                let _ = ctx.sub_log.set(cluster.sub_log().clone());
                let _ = ctx.priv_log.set(cluster.priv_log().clone());
                let _ = ctx.privacy_barrier.set(cluster.privacy_barrier());
                let _ = ctx.forwarder.set(cluster.forwarder().clone());
                Some(cluster)
            }
            None => None,
        };
        // A new epoch per boot (µs): `server.started` carries it, event ids start from it.
        let boot = ctx
            .registry
            .store()
            .next_boot_epoch(crate::now_ms() * 1000)?;
        let events = match &cluster {
            None => Arc::new(EventBus::new(boot, None, sinks)),
            Some(cluster) => {
                // Cluster mode: events go through the cluster's event log, numbered there,
                // and one node delivers the webhooks.
                let (outbox, pending) =
                    tokio::sync::mpsc::channel(crate::cluster::events::OUTBOX_CAPACITY);
                let node = cluster.origin().node.to_string();
                let bus = Arc::new(EventBus::clustered(boot, node, sinks, outbox));
                cluster
                    .start_events(bus.clone(), pending, webhooks.progress())
                    .await?;
                bus
            }
        };
        ctx.registry.set_observer(events.clone());
        if let Some(public) = webhooks.public_endpoints() {
            ctx.registry.note_public_views();
            ctx.registry.add_settings_listener(Arc::new(PublicMarkers {
                public,
                bus: events.clone(),
            }));
        }
        let admin = AdminApi::bind(&admin_config, ctx.clone(), events.clone())
            .await
            .map_err(|source| ServerError::Bind {
                addr: admin_config.listen,
                source,
            })?;
        Ok(Server {
            listener,
            plain_listener,
            ws_listener,
            ws_plain_listener,
            metrics_listener,
            tls_config,
            ctx,
            connection_permits,
            address_limits,
            cluster,
            events,
            webhooks,
            admin,
            hook,
            mqtt_bridge,
        })
    }

    /// The TLS listener's address (useful when binding port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| self.ctx.config.listen)
    }

    /// The plain listener's address, when enabled.
    pub fn plain_addr(&self) -> Option<SocketAddr> {
        self.plain_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// The wss listener's address, when enabled.
    pub fn ws_addr(&self) -> Option<SocketAddr> {
        self.ws_listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The plain ws listener's address, when enabled.
    pub fn ws_plain_addr(&self) -> Option<SocketAddr> {
        self.ws_plain_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// The metrics endpoint's address, when enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// The admin API's address, when it is on.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(AdminApi::local_addr)
    }

    /// The bus that numbers backend events (webhooks, `GET /v1/events`).
    pub fn events(&self) -> Arc<EventBus> {
        self.events.clone()
    }

    /// This node's id and incarnation in cluster mode (for tests).
    #[doc(hidden)]
    pub fn cluster_origin(&self) -> Option<crate::registry::Origin> {
        self.cluster.as_ref().map(Cluster::origin)
    }

    /// The live registry (for tests and tools; not a stable interface).
    #[doc(hidden)]
    pub fn registry(&self) -> Registry {
        self.ctx.registry.clone()
    }

    /// Serves until `shutdown` is cancelled, then closes every connection with a reconnect hint,
    /// waits for them up to the configured deadline and flushes the store.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ServerError> {
        let ctx = self.ctx.clone();
        let background = TaskTracker::new();
        if let Some(listener) = self.metrics_listener {
            background.spawn(m::serve(listener, m::install(), ctx.shutdown.clone()));
        }
        background.spawn(sweep_expired(ctx.clone()));
        if let Some(admin) = self.admin {
            background.spawn(admin.serve(ctx.shutdown.clone()));
        }
        background.spawn(self.webhooks.run(ctx.shutdown.clone()));
        if let Some(bridge) = self.mqtt_bridge {
            // Stops with the other background tasks, before sessions are drained: its clean
            // stop publishes the users it shows online as offline, then its status offline.
            background.spawn(bridge.run(
                ctx.registry.clone(),
                self.events.clone(),
                ctx.shutdown.clone(),
            ));
        }
        background.spawn(channel_intervals(ctx.clone()));
        let listeners = [
            (Some(self.listener), Transport::Tls(self.tls_config.clone())),
            (self.plain_listener, Transport::Plain),
            (
                self.ws_listener,
                Transport::Wss(crate::ws::wss_config(&self.tls_config)),
            ),
            (self.ws_plain_listener, Transport::Ws),
        ];
        for (listener, transport) in listeners {
            if let Some(listener) = listener {
                background.spawn(accept_loop(
                    listener,
                    transport,
                    ctx.clone(),
                    self.connection_permits.clone(),
                    self.address_limits.clone(),
                ));
            }
        }
        background.close();

        shutdown.cancelled().await;
        tracing::info!("shutting down: closing connections");
        ctx.shutdown.cancel();
        background.wait().await;
        ctx.tracker.close();
        let deadline = Duration::from_millis(ctx.config.session.shutdown_timeout_ms);
        if tokio::time::timeout(deadline, ctx.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("connections did not drain within {deadline:?}");
        }
        // After the sessions ended, so the other nodes hear that this node's clients are
        // moving (their devices linger there for the grace period instead of going offline).
        if let Some(cluster) = self.cluster {
            cluster.stop().await;
        }
        // After the last session's events: the hook finishes its queue (within the deadline).
        if let Some(hook) = self.hook {
            hook.stop(deadline).await;
        }
        ctx.registry.store().flush()?;
        tracing::info!("shutdown complete");
        Ok(())
    }
}

/// What a connection holds for its whole life, released when its task ends (however it ends):
/// its place under the global connection limit and under its address's.
#[derive(Debug)]
struct ConnectionPermits {
    /// A permit of the global connection limit.
    _global: OwnedSemaphorePermit,
    /// The connection's share of its address's connection limit.
    _address: AddressPermit,
}

/// What a listener speaks.
#[derive(Debug, Clone)]
enum Transport {
    /// TLS, then delimited frames.
    Tls(Arc<rustls::ServerConfig>),
    /// Delimited frames over plain TCP.
    Plain,
    /// TLS, then a WebSocket upgrade.
    Wss(Arc<rustls::ServerConfig>),
    /// A WebSocket upgrade over plain TCP.
    Ws,
}

/// Accepts until shutdown. Each connection passes its address's share first (accept rate, then
/// connections), then the global accept rate, then the global connection limit; a refused one is
/// counted by reason and its socket dropped before any TLS. The per-address check comes first so
/// that a flooding address is refused before it spends the global tokens everyone shares.
async fn accept_loop(
    listener: TcpListener,
    transport: Transport,
    ctx: Arc<ConnectionContext>,
    permits: Arc<Semaphore>,
    addresses: AddressLimits,
) {
    let limits = &ctx.config.limits;
    let mut accept_bucket = TokenBucket::new(
        limits.accept_rate_per_sec,
        limits.accept_burst,
        Instant::now(),
    );
    let mut accept_errors = m::RateLimitedLog::new(Duration::from_secs(1));
    loop {
        let accepted = tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (socket, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning, and say
                // so once a second rather than on every attempt.
                if let Some(held_back) = accept_errors.hit(Instant::now()) {
                    tracing::warn!("accept failed: {e} ({held_back} more since the last report)");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let now = Instant::now();
        let address = match addresses.admit(peer.ip(), now) {
            Ok(address) => address,
            Err(refusal) => {
                metrics::counter!(m::CONNECTIONS_REFUSED, "reason" => refusal.metric_label())
                    .increment(1);
                drop(socket);
                continue;
            }
        };
        if accept_bucket.take(now).is_err() {
            metrics::counter!(m::CONNECTIONS_REFUSED, "reason" => "accept_rate").increment(1);
            drop(socket);
            continue;
        }
        let Ok(global) = permits.clone().try_acquire_owned() else {
            metrics::counter!(m::CONNECTIONS_REFUSED, "reason" => "connection_limit").increment(1);
            drop(socket);
            continue;
        };
        let permit = ConnectionPermits {
            _global: global,
            _address: address,
        };
        let _ = socket.set_nodelay(true);
        spawn_connection(socket, peer, &transport, ctx.clone(), permit);
    }
}

fn spawn_connection(
    socket: TcpStream,
    peer: SocketAddr,
    transport: &Transport,
    ctx: Arc<ConnectionContext>,
    permit: ConnectionPermits,
) {
    let tracker = ctx.tracker.clone();
    match transport {
        Transport::Tls(tls) => {
            tracker.spawn(connection::run_tls(socket, peer, tls.clone(), ctx, permit));
        }
        Transport::Plain => {
            tracker.spawn(connection::run_session(
                socket,
                peer,
                crate::embed::Transport::Plain,
                ctx,
                permit,
            ));
        }
        Transport::Wss(tls) => {
            let tls = tls.clone();
            // TLS and the upgrade share one handshake deadline.
            let deadline = tokio::time::Instant::now() + ctx.config.handshake_timeout();
            tracker.spawn(async move {
                let Some(stream) = Box::pin(connection::handshake(socket, peer, tls, &ctx)).await
                else {
                    return;
                };
                crate::ws::run(
                    stream,
                    peer,
                    crate::embed::Transport::Wss,
                    ctx,
                    permit,
                    deadline,
                )
                .await;
            });
        }
        Transport::Ws => {
            let deadline = tokio::time::Instant::now() + ctx.config.handshake_timeout();
            tracker.spawn(crate::ws::run(
                socket,
                peer,
                crate::embed::Transport::Ws,
                ctx,
                permit,
                deadline,
            ));
        }
    }
}

/// Sends the INTERVAL events of large channels and publishes the channel gauge.
async fn channel_intervals(ctx: Arc<ConnectionContext>) {
    let mut tick = tokio::time::interval(Duration::from_millis(ctx.config.channels.interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        ctx.registry.flush_channel_intervals(Instant::now());
        let (channels, _) = ctx.registry.channel_counts();
        metrics::gauge!(m::CHANNELS).set(channels as f64);
    }
}

/// Removes expired subscriptions once a minute.
async fn sweep_expired(ctx: Arc<ConnectionContext>) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match ctx.registry.store().sweep_expired(crate::now_ms()) {
            Ok(0) => {}
            Ok(n) => metrics::counter!(m::SUBSCRIPTIONS_EXPIRED).increment(n as u64),
            Err(e) => tracing::warn!("expiry sweep failed: {e}"),
        }
    }
}

/// Tells public webhook endpoints of privacy settings changes, on the node that delivers
/// (every node applies the same changes; the others' endpoints are idle).
#[derive(Debug)]
struct PublicMarkers {
    public: crate::webhooks::PublicEndpoints,
    bus: Arc<EventBus>,
}

impl crate::registry::SettingsListener for PublicMarkers {
    fn settings_changed(&self, user: &str, public: &crate::events::PublicNote) {
        if self.bus.is_delivering() {
            self.public.privacy_changed(user, public);
        }
    }
}
