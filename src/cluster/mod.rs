//! Cluster mode's async shell on NATS: the link (an `async-nats` client that fails over between
//! the configured servers), the publisher that carries the registry's deltas to the
//! replication subject, the receiver that applies other nodes' deltas and heartbeats through
//! the peer table, the state-transfer responder and requester, and the ticker that sends
//! heartbeats, declares silent peers dead, expires their sessions after the grace period and
//! fences this node when its NATS link has been down too long or its own loop was stalled;
//! `tickets` shares the TLS session-ticket secrets. Everything that decides lives in
//! synchronous code (`peers`, `registry::replica`, `tls_tickets`); this module only moves bytes
//! and time.

pub mod events;
pub mod forward;
pub mod peers;
pub mod privlog;
pub mod sublog;
pub mod tickets;
pub mod wire;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use prost::Message;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ClusterConfig;
use crate::metrics as m;
use crate::registry::{Origin, Registry, ReplicaChange, ReplicationSink};
use peers::Peers;
use sublog::{SubLog, SubLogConfig, SubLogError};
use wire::{Envelope, Heartbeat, Record, Subjects, SyncPage, SyncRequest};

/// Why cluster mode could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// No NATS server answered in time.
    #[error("cannot connect to NATS {urls:?} within {waited:?}: {reason}")]
    Connect {
        /// The configured servers.
        urls: Vec<String>,
        /// How long start-up tried.
        waited: Duration,
        /// The last failure.
        reason: String,
    },
    /// The subscription log could not be created or replayed.
    #[error(transparent)]
    SubscriptionLog(SubLogError),
    /// A subscription could not be made.
    #[error("NATS subscription failed: {0}")]
    Subscribe(String),
    /// The event log (backend events) could not start.
    #[error("{0}")]
    EventLog(String),
}

/// Sessions per state-transfer page (well under NATS's 1 MiB default payload even with full
/// user state on every record).
const SYNC_PAGE: usize = 256;
/// How long one state-transfer page may take.
const SYNC_PAGE_TIMEOUT: Duration = Duration::from_secs(2);
/// What fenced clients are told to wait before reconnecting (to another node, through the
/// load balancer).
pub const FENCE_RECONNECT_HINT_MS: u64 = 250;
/// The ticker's period: liveness, expiry and fencing are checked this often.
const TICK: Duration = Duration::from_millis(100);
/// Heartbeats sent early (a privacy change applied here) are at least this far apart; one
/// owed meanwhile goes at the next wake-up.
const EARLY_FLOOR: Duration = Duration::from_millis(10);
/// A stall of this node's own loop this long (it was stopped or starved) gives every peer a
/// fresh timeout: the silence was this node's.
const STALL_RESETS_PEERS: Duration = Duration::from_millis(500);
/// How long heartbeats keep listing an incarnation declared dead (so it learns and rejoins).
const DEAD_NOTICE: Duration = Duration::from_secs(60);

/// This node's identity and outgoing sequence, shared by the sink (under the registry lock)
/// and the shell.
#[derive(Debug)]
struct Outgoing {
    origin: Mutex<Origin>,
    seq: AtomicU64,
    /// Encoded envelopes, and whether each is a heartbeat (counted apart from deltas).
    tx: mpsc::Sender<(Bytes, bool)>,
}

impl Outgoing {
    fn origin(&self) -> Origin {
        self.origin
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl ReplicationSink for Outgoing {
    fn emit(&self, change: ReplicaChange) {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let origin = self.origin();
        let bytes = Bytes::from(Envelope::delta(&origin, seq, &change).encode_to_vec());
        // Never waits: a full queue loses this delta, and the receivers see the gap in the
        // sequence numbers and fetch this node's state instead.
        if self.tx.try_send((bytes, false)).is_err() {
            metrics::counter!(m::CLUSTER_DELTAS, "direction" => "dropped").increment(1);
        }
    }

    fn last_seq(&self) -> u64 {
        self.seq.load(Ordering::Relaxed)
    }
}

/// The NATS link's state as the client's event callback reports it.
#[derive(Debug)]
struct Link {
    up: AtomicBool,
    /// When it last went down (valid while `up` is false).
    down_since: Mutex<Instant>,
}

impl Link {
    fn set(&self, up: bool) {
        if !up && self.up.load(Ordering::Relaxed) {
            *self.down_since.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        }
        self.up.store(up, Ordering::Relaxed);
    }

    fn down_for(&self, now: Instant) -> Option<Duration> {
        if self.up.load(Ordering::Relaxed) {
            None
        } else {
            let since = *self.down_since.lock().unwrap_or_else(|p| p.into_inner());
            Some(now.saturating_duration_since(since))
        }
    }
}

#[derive(Debug)]
struct Shared {
    client: async_nats::Client,
    registry: Registry,
    subjects: Subjects,
    node: String,
    outgoing: Arc<Outgoing>,
    peers: Mutex<Peers>,
    link: Link,
    config: ClusterConfig,
    tasks: TaskTracker,
    stop: CancellationToken,
    /// Nodes whose digest gauge was set, so a vanished one is reset to 0.
    reported: Mutex<HashSet<String>>,
    /// A peer's heartbeat listed this node's incarnation as dead: fence and rejoin.
    buried: AtomicBool,
    /// The privacy log's applied sequence here (heartbeats carry it; a move sends one early).
    privacy_applied: tokio::sync::watch::Receiver<u64>,
    /// Woken after each peer heartbeat, for [`PrivacyBarrier::wait`].
    heard: tokio::sync::Notify,
}

impl Shared {
    fn peers(&self) -> std::sync::MutexGuard<'_, Peers> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running cluster link. Dropping it does not stop it; call [`Cluster::stop`].
#[derive(Debug)]
pub struct Cluster {
    shared: Arc<Shared>,
    sub_log: SubLog,
    priv_log: privlog::PrivLog,
    forwarder: forward::Forwarder,
}

impl Cluster {
    /// Connects to NATS, plugs the replication sink into `registry`, starts the link's tasks
    /// and waits (up to `join_wait_ms`, then for the state transfers it started) for the
    /// peers' sessions, so that the node answers queries with the cluster's presence as soon
    /// as its listener opens.
    pub async fn start(
        config: &ClusterConfig,
        node: String,
        registry: Registry,
        grace: Duration,
        max_expiry: Duration,
    ) -> Result<Cluster, ClusterError> {
        let link = Arc::new(Link {
            up: AtomicBool::new(false),
            down_since: Mutex::new(Instant::now()),
        });
        let client = connect(config, &node, link.clone()).await?;
        link.set(true);
        let subjects = Subjects::new(&config.subject_prefix);
        // Durable subscriptions first: the store is caught up with the cluster's log before
        // anything else reads it.
        let sub_log = SubLog::start(
            client.clone(),
            subjects.clone(),
            node.clone(),
            registry.store().clone(),
            SubLogConfig {
                replicas: config.subscription_replicas,
                max_age: max_expiry + Duration::from_secs(24 * 3600),
                ack_timeout: Duration::from_millis(config.log_ack_timeout_ms),
                apply_timeout: Duration::from_secs(5),
                replay_timeout: Duration::from_millis(config.log_replay_timeout_ms),
            },
        )
        .await
        .map_err(ClusterError::SubscriptionLog)?;
        // Privacy settings, blocks and approvals: replayed before the listener opens too.
        let priv_log = privlog::PrivLog::start(
            client.clone(),
            &subjects,
            &config.subject_prefix,
            registry.clone(),
            SubLogConfig {
                replicas: config.subscription_replicas,
                max_age: Duration::ZERO,
                ack_timeout: Duration::from_millis(config.log_ack_timeout_ms),
                apply_timeout: Duration::from_secs(5),
                replay_timeout: Duration::from_millis(config.log_replay_timeout_ms),
            },
        )
        .await
        .map_err(ClusterError::SubscriptionLog)?;
        let (tx, rx) = mpsc::channel(config.delta_queue);
        let outgoing = Arc::new(Outgoing {
            origin: Mutex::new(Origin {
                node: node.clone(),
                incarnation: registry.clock(),
            }),
            seq: AtomicU64::new(0),
            tx,
        });
        registry.set_replication(outgoing.clone(), grace);
        let replication = client
            .subscribe(subjects.replication.clone())
            .await
            .map_err(|e| ClusterError::Subscribe(e.to_string()))?;
        let sync_requests = client
            .subscribe(subjects.sync(&node))
            .await
            .map_err(|e| ClusterError::Subscribe(e.to_string()))?;
        let last_seen_requests = client
            .subscribe(subjects.last_seen(&node))
            .await
            .map_err(|e| ClusterError::Subscribe(e.to_string()))?;
        let shared = Arc::new(Shared {
            client,
            registry,
            subjects,
            peers: Mutex::new(Peers::new(
                &node,
                Duration::from_millis(config.peer_timeout_ms),
            )),
            node,
            outgoing,
            link: Link {
                up: AtomicBool::new(true),
                down_since: Mutex::new(Instant::now()),
            },
            config: config.clone(),
            tasks: TaskTracker::new(),
            stop: CancellationToken::new(),
            reported: Mutex::new(HashSet::new()),
            buried: AtomicBool::new(false),
            privacy_applied: priv_log.applied(),
            heard: tokio::sync::Notify::new(),
        });
        // The event callback holds its own `Link`; mirror it into the shared one.
        shared.tasks.spawn(mirror_link(shared.clone(), link));
        shared.tasks.spawn(publish(shared.clone(), rx));
        shared.tasks.spawn(receive(shared.clone(), replication));
        shared
            .tasks
            .spawn(answer_sync(shared.clone(), sync_requests));
        shared
            .tasks
            .spawn(answer_last_seen(shared.clone(), last_seen_requests));
        shared.tasks.spawn(tick(shared.clone()));
        shared.tasks.spawn(forward::answer(
            shared.client.clone(),
            config.subject_prefix.clone(),
            shared.node.clone(),
            shared.registry.clone(),
            shared.stop.clone(),
        ));
        let forwarder = forward::Forwarder::new(shared.client.clone(), &config.subject_prefix);
        metrics::gauge!(m::CLUSTER_FENCED).set(0.0);
        // Join: hear the peers, fetch their sessions, then open.
        tokio::time::sleep(Duration::from_millis(config.join_wait_ms)).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while shared.peers().syncing() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        catch_up_last_seen(
            &shared,
            deadline.max(Instant::now() + Duration::from_secs(5)),
        )
        .await;
        tracing::info!(
            node = %shared.node,
            peers = shared.peers().up(),
            nats = ?shared.client.server_info().server_name,
            "joined the cluster"
        );
        Ok(Cluster {
            shared,
            sub_log,
            priv_log,
            forwarder,
        })
    }

    /// The replicated subscription log.
    pub fn sub_log(&self) -> &SubLog {
        &self.sub_log
    }

    /// The replicated privacy log.
    pub fn priv_log(&self) -> &privlog::PrivLog {
        &self.priv_log
    }

    /// Waits for every live peer to hold a privacy change (see [`PrivacyBarrier`]).
    pub fn privacy_barrier(&self) -> PrivacyBarrier {
        PrivacyBarrier {
            shared: self.shared.clone(),
        }
    }

    /// Starts cluster mode's event log: `outbox` (this node's events, from a bus made with
    /// [`crate::events::EventBus::clustered`]) is appended to the cluster's stream, the
    /// stream is followed into `bus`, and the live node with the smallest id delivers the
    /// webhooks of `progress`.
    pub async fn start_events(
        &self,
        bus: Arc<crate::events::EventBus>,
        outbox: mpsc::Receiver<crate::events::Event>,
        progress: crate::webhooks::Progress,
    ) -> Result<(), ClusterError> {
        let shared = self.shared.clone();
        let deliverer: events::Deliverer = Arc::new(move || {
            shared.link.up.load(Ordering::Relaxed)
                && !shared.registry.is_fenced()
                && shared.peers().live_nodes().iter().all(|n| *n > shared.node)
        });
        let c = &self.shared.config;
        let replicas = if self.shared.client.server_info().cluster.is_none() {
            1
        } else {
            c.subscription_replicas
        };
        events::start(
            self.shared.client.clone(),
            &c.subject_prefix,
            &self.shared.node,
            bus,
            outbox,
            progress,
            deliverer,
            events::EventLogConfig {
                replicas,
                max_age: Duration::from_secs(c.event_retention_secs),
                max_msgs: c.event_log_max_events,
            },
            self.shared.stop.clone(),
            &self.shared.tasks,
            Instant::now() + Duration::from_millis(c.log_replay_timeout_ms),
        )
        .await
        .map_err(ClusterError::EventLog)
    }

    /// Shares TLS session-ticket secrets with the other nodes through NATS and installs them
    /// in `keys` (see [`tickets`]): fetched or created before this returns (waiting at most
    /// [`tickets::START_WAIT`]), then kept fresh until [`Cluster::stop`]. Without NATS the node
    /// issues no tickets until they arrive; nothing else depends on them.
    pub async fn start_ticket_keys(&self, keys: Arc<crate::tls_tickets::TicketKeys>) {
        let replicas = if self.shared.client.server_info().cluster.is_none() {
            1
        } else {
            self.shared.config.subscription_replicas
        };
        tickets::start(
            self.shared.client.clone(),
            &self.shared.config.subject_prefix,
            replicas,
            keys,
            self.shared.stop.clone(),
            &self.shared.tasks,
        )
        .await;
    }

    /// Sends admin changes to the nodes holding sessions.
    pub fn forwarder(&self) -> &forward::Forwarder {
        &self.forwarder
    }

    /// This node's current identity.
    pub fn origin(&self) -> Origin {
        self.shared.outgoing.origin()
    }

    /// Live peers.
    pub fn peers_up(&self) -> usize {
        self.shared.peers().up()
    }

    /// Stops the link after sending what is queued (the sessions' last deltas at shutdown),
    /// bounded by a few seconds.
    pub async fn stop(self) {
        self.sub_log.stop().await;
        self.priv_log.stop().await;
        self.shared.stop.cancel();
        self.shared.tasks.close();
        if tokio::time::timeout(Duration::from_secs(3), self.shared.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("cluster link did not stop in time");
        }
    }
}

async fn connect(
    config: &ClusterConfig,
    node: &str,
    link: Arc<Link>,
) -> Result<async_nats::Client, ClusterError> {
    let waited = Duration::from_millis(config.connect_timeout_ms);
    let deadline = Instant::now() + waited;
    loop {
        let events = link.clone();
        let mut options = async_nats::ConnectOptions::new();
        if config.ignore_discovered_servers {
            options = options.ignore_discovered_servers();
        }
        let options = options
            .name(format!("presenced {node}"))
            .connection_timeout(Duration::from_secs(2))
            .request_timeout(Some(SYNC_PAGE_TIMEOUT))
            .ping_interval(Duration::from_secs(1))
            .max_reconnects(None::<usize>)
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis((50 * attempts as u64).min(1_000))
            })
            .event_callback(move |event| {
                let events = events.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => events.set(true),
                        async_nats::Event::Disconnected => events.set(false),
                        async_nats::Event::SlowConsumer(_) => {
                            metrics::counter!(m::CLUSTER_GAPS, "how" => "slow_consumer")
                                .increment(1)
                        }
                        other => tracing::debug!("nats: {other}"),
                    }
                }
            });
        match options.connect(config.nats_urls.as_slice()).await {
            Ok(client) => return Ok(client),
            Err(e) if Instant::now() >= deadline => {
                return Err(ClusterError::Connect {
                    urls: config.nats_urls.clone(),
                    waited,
                    reason: e.to_string(),
                })
            }
            Err(e) => {
                tracing::warn!("NATS not reachable yet: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Copies the event callback's link state into the shared one, and tells the peer table
/// when the link comes back.
async fn mirror_link(shared: Arc<Shared>, events: Arc<Link>) {
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let mut was_up = true;
    loop {
        tokio::select! {
            _ = shared.stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let up = events.up.load(Ordering::Relaxed)
            && shared.client.connection_state() == async_nats::connection::State::Connected;
        if up != was_up {
            shared.link.set(up);
            if up {
                shared.peers().link_restored(Instant::now());
                tracing::info!("NATS link restored");
            } else {
                tracing::warn!("NATS link lost");
            }
            was_up = up;
        }
    }
}

async fn publish(shared: Arc<Shared>, mut rx: mpsc::Receiver<(Bytes, bool)>) {
    let subject = shared.subjects.replication.clone();
    loop {
        let (bytes, heartbeat) = tokio::select! {
            _ = shared.stop.cancelled() => break,
            b = rx.recv() => match b { Some(b) => b, None => return },
        };
        send(&shared, &subject, bytes, heartbeat).await;
    }
    // Stopping: what is queued still goes out (the sessions' ends at shutdown).
    while let Ok((bytes, heartbeat)) = rx.try_recv() {
        send(&shared, &subject, bytes, heartbeat).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), shared.client.flush()).await;
}

async fn send(shared: &Shared, subject: &str, bytes: Bytes, heartbeat: bool) {
    match shared.client.publish(subject.to_string(), bytes).await {
        Ok(()) if heartbeat => {}
        Ok(()) => metrics::counter!(m::CLUSTER_DELTAS, "direction" => "out").increment(1),
        Err(_) if heartbeat => {}
        Err(e) => {
            metrics::counter!(m::CLUSTER_DELTAS, "direction" => "dropped").increment(1);
            tracing::debug!("cannot publish a delta: {e}");
        }
    }
}

async fn receive(shared: Arc<Shared>, mut subscription: async_nats::Subscriber) {
    loop {
        let message = tokio::select! {
            _ = shared.stop.cancelled() => return,
            m = subscription.next() => match m { Some(m) => m, None => return },
        };
        let now = Instant::now();
        let envelope = match Envelope::decode_bytes(&message.payload) {
            Ok(e) => e,
            Err(e) => {
                metrics::counter!(m::CLUSTER_DELTAS, "direction" => "invalid").increment(1);
                tracing::debug!("{e}");
                continue;
            }
        };
        if envelope.node == shared.node {
            continue;
        }
        let origin = envelope.origin();
        if let Some(hb) = &envelope.heartbeat {
            let me = shared.outgoing.origin();
            let buried = hb
                .dead_nodes
                .iter()
                .zip(&hb.dead_incarnations)
                .any(|(node, inc)| *node == me.node && *inc == me.incarnation);
            if buried && !shared.buried.swap(true, Ordering::Relaxed) {
                tracing::warn!(peer = %origin.node, "a peer declared this node dead: rejoining");
            }
            let registry = &shared.registry;
            let verdict = shared.peers().on_heartbeat(
                &origin,
                envelope.seq,
                || registry.digest_of(&origin) == hb.digest,
                now,
            );
            shared
                .peers()
                .on_privacy_applied(&origin, hb.privacy_applied);
            shared.heard.notify_waiters();
            act(&shared, &origin, verdict.superseded, verdict.sync, now);
            continue;
        }
        let change = match envelope.change() {
            Ok(Some(c)) => c,
            Ok(None) => continue,
            Err(e) => {
                metrics::counter!(m::CLUSTER_DELTAS, "direction" => "invalid").increment(1);
                tracing::debug!("{e}");
                continue;
            }
        };
        let verdict = shared.peers().on_delta(&origin, envelope.seq, now);
        if verdict.apply {
            let applied = shared.registry.apply_remote(&origin, change, now);
            let direction = if applied { "in" } else { "stale" };
            metrics::counter!(m::CLUSTER_DELTAS, "direction" => direction).increment(1);
            let lag_ms = crate::now_ms().saturating_sub(envelope.sent_ms);
            metrics::histogram!(m::CLUSTER_REPLICATION_LAG_SECONDS).record(lag_ms as f64 / 1e3);
        } else {
            metrics::counter!(m::CLUSTER_DELTAS, "direction" => "stale").increment(1);
        }
        act(&shared, &origin, verdict.superseded, verdict.sync, now);
    }
}

/// Follows up a peer-table verdict: a superseded incarnation's sessions start their grace
/// period; a due state transfer starts.
fn act(
    shared: &Arc<Shared>,
    origin: &Origin,
    superseded: Option<Origin>,
    sync: Option<&'static str>,
    now: Instant,
) {
    if let Some(old) = superseded {
        let n = shared.registry.origin_down(&old, now);
        tracing::info!(node = %old.node, sessions = n, "peer restarted under a new incarnation");
    }
    if let Some(how) = sync {
        metrics::counter!(m::CLUSTER_GAPS, "how" => how).increment(1);
        shared
            .tasks
            .spawn(transfer_from(shared.clone(), origin.clone()));
    }
}

/// Fetches every session `origin` holds, page by page, merges them, and ends the sessions
/// this node still shows for it that it no longer holds.
async fn transfer_from(shared: Arc<Shared>, origin: Origin) {
    let subject = shared.subjects.sync(&origin.node);
    let mut request = SyncRequest {
        requester: shared.node.clone(),
        ..SyncRequest::default()
    };
    let mut listed = HashSet::new();
    let mut before_epoch = None;
    let mut last_seq = 0;
    let result: Result<(), String> = async {
        loop {
            let reply = tokio::select! {
                _ = shared.stop.cancelled() => return Err("stopping".to_string()),
                r = tokio::time::timeout(
                    SYNC_PAGE_TIMEOUT,
                    shared.client.request(subject.clone(), Bytes::from(request.encode_to_vec())),
                ) => r,
            };
            let reply = reply
                .map_err(|_| "timed out".to_string())?
                .map_err(|e| e.to_string())?;
            let page = SyncPage::decode(reply.payload.as_ref()).map_err(|e| e.to_string())?;
            if page.node != origin.node || page.incarnation != origin.incarnation || page.fenced {
                return Err("the peer changed incarnation".to_string());
            }
            before_epoch.get_or_insert(page.hlc);
            last_seq = page.seq;
            let now = Instant::now();
            for record in page.records {
                let Ok(record) = record.into_record() else {
                    continue;
                };
                listed.insert((record.user_id.clone(), record.device_id.clone()));
                request.after_user = record.user_id.clone();
                request.after_device = record.device_id.clone();
                request.has_cursor = true;
                shared
                    .registry
                    .apply_remote(&origin, ReplicaChange::Upsert(record), now);
            }
            if !page.more {
                return Ok(());
            }
        }
    }
    .await;
    match result {
        Ok(()) => {
            let gone = shared.registry.reconcile_origin(
                &origin,
                &listed,
                before_epoch.unwrap_or(0),
                Instant::now(),
            );
            shared.peers().sync_done(&origin, Some(last_seq));
            metrics::counter!(m::CLUSTER_STATE_TRANSFERS, "result" => "ok").increment(1);
            tracing::debug!(node = %origin.node, sessions = listed.len(), gone, "state transfer done");
        }
        Err(e) => {
            shared.peers().sync_done(&origin, None);
            metrics::counter!(m::CLUSTER_STATE_TRANSFERS, "result" => "failed").increment(1);
            tracing::debug!(node = %origin.node, "state transfer failed: {e}");
        }
    }
}

/// Answers other nodes' state-transfer requests with pages of this node's sessions.
async fn answer_sync(shared: Arc<Shared>, mut requests: async_nats::Subscriber) {
    loop {
        let message = tokio::select! {
            _ = shared.stop.cancelled() => return,
            m = requests.next() => match m { Some(m) => m, None => return },
        };
        let Some(reply) = message.reply else {
            continue;
        };
        let Ok(request) = SyncRequest::decode(message.payload.as_ref()) else {
            continue;
        };
        let after = request
            .has_cursor
            .then_some((request.after_user.as_str(), request.after_device.as_str()));
        let origin = shared.outgoing.origin();
        let page = if shared.registry.is_fenced() {
            SyncPage {
                node: origin.node,
                incarnation: origin.incarnation,
                fenced: true,
                ..SyncPage::default()
            }
        } else {
            let local = shared.registry.local_page(after, SYNC_PAGE);
            SyncPage {
                node: origin.node,
                incarnation: origin.incarnation,
                seq: local.seq,
                hlc: local.hlc,
                records: local.records.iter().map(Record::from_record).collect(),
                more: local.more,
                fenced: false,
            }
        };
        if let Err(e) = shared
            .client
            .publish(reply, Bytes::from(page.encode_to_vec()))
            .await
        {
            tracing::debug!("cannot answer a state transfer: {e}");
        }
    }
}

/// Last-seen records per catch-up page.
const LAST_SEEN_PAGE: usize = 1000;
/// How far before this node's latest last-seen record the catch-up starts (clock differences
/// between nodes, and transitions this node heard of late).
const LAST_SEEN_OVERLAP_MS: u64 = 5 * 60 * 1000;

/// Answers other nodes' last-seen catch-up requests from this node's store.
async fn answer_last_seen(shared: Arc<Shared>, mut requests: async_nats::Subscriber) {
    loop {
        let message = tokio::select! {
            _ = shared.stop.cancelled() => return,
            m = requests.next() => match m { Some(m) => m, None => return },
        };
        let Some(reply) = message.reply else {
            continue;
        };
        let Ok(request) = wire::LastSeenRequest::decode(message.payload.as_ref()) else {
            continue;
        };
        let after = request
            .has_cursor
            .then_some((request.after_at_ms, request.after_user.as_str()));
        let (entries, more) =
            shared
                .registry
                .store()
                .last_seen_since(request.since_ms, after, LAST_SEEN_PAGE);
        let page = wire::LastSeenPage {
            entries: entries
                .into_iter()
                .map(|(user, l)| wire::LastSeenEntry {
                    user,
                    at_ms: l.at_ms,
                    version: l.version,
                })
                .collect(),
            more,
        };
        if let Err(e) = shared
            .client
            .publish(reply, Bytes::from(page.encode_to_vec()))
            .await
        {
            tracing::debug!("cannot answer a last-seen catch-up: {e}");
        }
    }
}

/// After a restart, learns the last-seen times and offline versions recorded while this node
/// was down from a live peer (each node records every user's), so an offline user shows here
/// what every other node shows, and a Resume here compares against the right version. Stops at
/// `deadline`, or when no peer answers; what it misses stays as this node last knew it.
async fn catch_up_last_seen(shared: &Shared, deadline: Instant) {
    let since = shared
        .registry
        .store()
        .latest_last_seen_ms()
        .saturating_sub(LAST_SEEN_OVERLAP_MS);
    let peers = shared.peers().live_nodes();
    if peers.is_empty() {
        // The first node up: nobody to ask, and nothing was missed that a peer knows.
        return;
    }
    let mut learned = 0usize;
    'peers: for peer in peers {
        let mut cursor: Option<(u64, String)> = None;
        loop {
            let request = wire::LastSeenRequest {
                since_ms: since,
                after_at_ms: cursor.as_ref().map_or(0, |c| c.0),
                after_user: cursor.as_ref().map(|c| c.1.clone()).unwrap_or_default(),
                has_cursor: cursor.is_some(),
            };
            let left = deadline.saturating_duration_since(Instant::now());
            let answer = tokio::time::timeout(
                left,
                shared.client.request(
                    shared.subjects.last_seen(&peer),
                    Bytes::from(request.encode_to_vec()),
                ),
            )
            .await;
            let page = match answer {
                Ok(Ok(message)) => match wire::LastSeenPage::decode(message.payload.as_ref()) {
                    Ok(page) => page,
                    Err(_) => continue 'peers,
                },
                // This peer cannot answer (an older node, or gone): try the next one.
                Ok(Err(_)) => continue 'peers,
                Err(_) => break 'peers,
            };
            for entry in &page.entries {
                if let Err(e) = shared.registry.store().record_last_seen(
                    &entry.user,
                    entry.at_ms,
                    entry.version,
                ) {
                    tracing::warn!("cannot record a caught-up last-seen: {e}");
                }
            }
            learned += page.entries.len();
            cursor = page.entries.last().map(|e| (e.at_ms, e.user.clone()));
            if !page.more || cursor.is_none() {
                tracing::info!(peer = %peer, records = learned, since_ms = since, "last-seen caught up");
                return;
            }
        }
    }
    {
        tracing::warn!(
            records = learned,
            "last-seen catch-up incomplete: offline users may show an older last-seen here \
             until they next go offline"
        );
    }
}

/// Why this node fenced itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FenceCause {
    NatsLost,
    ClockJump,
    DeclaredDead,
}

impl FenceCause {
    fn label(self) -> &'static str {
        match self {
            FenceCause::NatsLost => "nats_lost",
            FenceCause::ClockJump => "clock_jump",
            FenceCause::DeclaredDead => "declared_dead",
        }
    }
}

/// Waits until every live peer has applied the privacy log up to a sequence: a change that
/// must hold everywhere before this node acts on it (a Connect that starts invisible: the
/// device's arrival, replicated outside the log, must not reach a peer that does not yet
/// know the user is invisible). Peers say what they applied in their heartbeats, sent early
/// when it moves, so the wait is about one round trip.
#[derive(Debug, Clone)]
pub struct PrivacyBarrier {
    shared: Arc<Shared>,
}

impl PrivacyBarrier {
    /// True once every live peer applied up to `seq`; false after `timeout` (a peer slow,
    /// partitioned, or too old to say).
    pub async fn wait(&self, seq: u64, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Registered before the check, so a heartbeat between the two is not missed.
            let heard = self.shared.heard.notified();
            tokio::pin!(heard);
            heard.as_mut().enable();
            if self.shared.peers().privacy_applied_everywhere(seq) {
                return true;
            }
            if tokio::time::timeout_at(deadline, heard).await.is_err() {
                return self.shared.peers().privacy_applied_everywhere(seq);
            }
        }
    }
}

async fn tick(shared: Arc<Shared>) {
    let heartbeat = Duration::from_millis(shared.config.heartbeat_ms);
    let fence_after = Duration::from_millis(shared.config.fence_after_ms);
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_tick = Instant::now();
    let mut last_heartbeat: Option<Instant> = None;
    let mut fenced: Option<FenceCause> = None;
    let mut privacy_applied = shared.privacy_applied.clone();
    // Off once the privacy log is gone (its watch would then answer at once, forever).
    let mut privacy_open = true;
    // A heartbeat owed to peers waiting on a privacy change (sent at most every EARLY_FLOOR).
    let mut owed = false;
    loop {
        // A privacy change applied here is told at once (a peer may be waiting on it).
        let mut early = false;
        tokio::select! {
            _ = shared.stop.cancelled() => return,
            _ = ticker.tick() => {}
            changed = privacy_applied.changed(), if privacy_open => {
                early = changed.is_ok();
                privacy_open = early;
            }
        }
        let now = Instant::now();
        let stalled = now.saturating_duration_since(last_tick);
        last_tick = now;
        let down_for = shared.link.down_for(now);
        if stalled >= STALL_RESETS_PEERS {
            // This node was not running: the peers' silence meanwhile says nothing about them.
            shared.peers().link_restored(now);
        }
        if fenced.is_none() {
            let cause = if stalled >= fence_after {
                Some(FenceCause::ClockJump)
            } else if down_for.is_some_and(|d| d >= fence_after) {
                Some(FenceCause::NatsLost)
            } else if shared.buried.load(Ordering::Relaxed) {
                Some(FenceCause::DeclaredDead)
            } else {
                None
            };
            if let Some(cause) = cause {
                let reason = match cause {
                    FenceCause::ClockJump => format!(
                        "this node was stalled for {:.1} s: reconnect to another node",
                        stalled.as_secs_f64()
                    ),
                    FenceCause::NatsLost => {
                        "this node lost its cluster link: reconnect to another node".to_string()
                    }
                    FenceCause::DeclaredDead => {
                        "the cluster declared this node dead: reconnect to another node".to_string()
                    }
                };
                let closed = shared.registry.fence(&reason, FENCE_RECONNECT_HINT_MS);
                tracing::warn!(cause = cause.label(), closed, "fenced: {reason}");
                metrics::counter!(m::CLUSTER_FENCES, "reason" => cause.label()).increment(1);
                metrics::gauge!(m::CLUSTER_FENCED).set(1.0);
                fenced = Some(cause);
            }
        }
        if fenced.is_some() && down_for.is_none() {
            // Rejoin under a new incarnation with an empty table; the peers' heartbeats bring
            // their sessions back through state transfers.
            let origin = Origin {
                node: shared.node.clone(),
                incarnation: shared.registry.clock(),
            };
            *shared
                .outgoing
                .origin
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = origin.clone();
            shared.outgoing.seq.store(0, Ordering::Relaxed);
            shared.peers().reset();
            shared.buried.store(false, Ordering::Relaxed);
            shared.registry.unfence();
            metrics::gauge!(m::CLUSTER_FENCED).set(0.0);
            tracing::info!(incarnation = origin.incarnation, "rejoined the cluster");
            fenced = None;
            last_heartbeat = None;
        }
        if fenced.is_some() {
            continue;
        }
        owed |= early;
        let since = last_heartbeat.map(|t| now.saturating_duration_since(t));
        if since.is_none_or(|d| d >= heartbeat || (owed && d >= EARLY_FLOOR)) {
            owed = false;
            last_heartbeat = Some(now);
            send_heartbeat(&shared).await;
        }
        let dead = shared.peers().check(now, down_for.is_none());
        for origin in dead {
            let n = shared.registry.origin_down(&origin, now);
            tracing::warn!(node = %origin.node, sessions = n, "peer is silent: declared dead");
        }
        shared.registry.expire_remote_due(now);
        let (up, dead) = {
            let p = shared.peers();
            (p.up(), p.dead())
        };
        metrics::gauge!(m::CLUSTER_PEERS, "state" => "up").set(up as f64);
        metrics::gauge!(m::CLUSTER_PEERS, "state" => "dead").set(dead as f64);
    }
}

async fn send_heartbeat(shared: &Shared) {
    let (digest, seq, sessions) = shared.registry.local_checkpoint();
    let origin = shared.outgoing.origin();
    let envelope = Envelope {
        node: origin.node.clone(),
        incarnation: origin.incarnation,
        seq,
        sent_ms: crate::now_ms(),
        heartbeat: Some({
            let dead = shared.peers().recently_dead(Instant::now(), DEAD_NOTICE);
            Heartbeat {
                digest,
                sessions: sessions as u64,
                hlc: shared.registry.clock(),
                dead_nodes: dead.iter().map(|o| o.node.clone()).collect(),
                dead_incarnations: dead.iter().map(|o| o.incarnation).collect(),
                privacy_applied: *shared.privacy_applied.borrow(),
            }
        }),
        ..Envelope::default()
    };
    metrics::gauge!(m::CLUSTER_DIGEST).set(digest as f64);
    publish_digests(shared, &origin);
    metrics::gauge!(m::CLUSTER_REMOTE_SESSIONS).set(shared.registry.remote_sessions() as f64);
    // Heartbeats take the deltas' queue, behind every delta up to `seq`, so a receiver that
    // has applied those can compare digests. A queue full for this long is a stalled link.
    let bytes = Bytes::from(envelope.encode_to_vec());
    let _ = tokio::time::timeout(
        Duration::from_millis(500),
        shared.outgoing.tx.send((bytes, true)),
    )
    .await;
}

/// Sets the digest gauges: this node's view of each peer's sessions (0 for a peer gone).
fn publish_digests(shared: &Shared, origin: &Origin) {
    let mut digests = shared.registry.digests(origin);
    // A live peer with no sessions has digest 0: shown too, so agreement can be checked.
    for node in shared.peers().live_nodes() {
        digests.entry(node).or_insert(0);
    }
    let mut reported = shared.reported.lock().unwrap_or_else(|p| p.into_inner());
    for node in reported.iter().filter(|n| !digests.contains_key(*n)) {
        metrics::gauge!(m::CLUSTER_PEER_DIGEST, "node" => node.clone()).set(0.0);
    }
    reported.clear();
    for (node, d) in digests {
        if node != origin.node {
            metrics::gauge!(m::CLUSTER_PEER_DIGEST, "node" => node.clone()).set(d as f64);
            reported.insert(node);
        }
    }
}
