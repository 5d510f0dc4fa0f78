//! The bridge's async shell: waits until this node delivers events, drives the rumqttc event
//! loop in a task of its own (reconnecting with full-jitter exponential backoff), and on every
//! connect publishes the status, makes a full pass over the registry and scans the broker's
//! retained topics; between connects it feeds the core from the inbox and publishes what the
//! core says is dirty, with the privacy view applied. A clean stop publishes the final state
//! and the status `offline` and disconnects. No lock is held across an `.await`: the registry
//! and the inbox are read in short synchronous calls.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, ClientError, Event, LastWill, MqttOptions, Packet, QoS, Transport};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::config::{MqttBridgeConfig, ShowPolicy};
use super::core::{Applied, Core, Subject};
use super::payload::{self, Topics};
use super::{names, MqttBridge, MqttBridgeError};
use crate::events::EventBus;
use crate::model::{Availability, PresenceSnapshot};
use crate::privacy::Viewer;
use crate::registry::Registry;

/// Requests rumqttc's client may queue for its event loop.
const REQUEST_CAPACITY: usize = 1_024;
/// Link events the event-loop task may queue for the bridge task.
const LINK_EVENTS_CAPACITY: usize = 1_024;
/// How often a node that does not deliver checks whether it does now (cluster mode).
const DELIVERING_CHECK: Duration = Duration::from_millis(250);
/// After the client's request queue was full, publishing is retried this much later.
const RETRY_FULL: Duration = Duration::from_millis(20);
/// A link that held this long was healthy: the reconnect backoff starts over after it.
const STABLE_LINK: Duration = Duration::from_secs(10);
/// How long a clean stop may take.
const STOP_DEADLINE: Duration = Duration::from_secs(2);
/// Most subjects published per wake-up before the bridge task looks at its other inputs.
const PUMP_BATCH: usize = 256;

/// The rustls client configuration for mqtts:// (ring provider): the CA file's certificates,
/// or the system's roots.
pub(super) fn tls_config(
    ca_file: Option<&Path>,
) -> Result<Arc<rustls::ClientConfig>, MqttBridgeError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|source| MqttBridgeError::Read {
                what: "ca_file",
                path: path.to_path_buf(),
                source,
            })?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| MqttBridgeError::Tls(format!("ca_file: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| MqttBridgeError::Tls(format!("ca_file: {e}")))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
        }
    }
    if roots.is_empty() {
        return Err(MqttBridgeError::Tls(
            "no CA certificate to verify the broker with (set ca_file)".into(),
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| MqttBridgeError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// What the event-loop task reports.
#[derive(Debug)]
enum Link {
    /// Connected (CONNACK accepted).
    Up,
    /// The connection failed or was lost; the task reconnects after its backoff.
    Down,
    /// A retained message on a scanned topic, and its payload.
    Retained(String, bytes::Bytes),
}

/// Full-jitter exponential backoff.
#[derive(Debug)]
struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
    seed: u64,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let ceiling = self
            .min
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        // xorshift64*
        self.seed ^= self.seed >> 12;
        self.seed ^= self.seed << 25;
        self.seed ^= self.seed >> 27;
        let r = self.seed.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let span = ceiling.saturating_sub(self.min / 2).as_millis() as u64;
        self.min / 2 + Duration::from_millis(r % span.max(1))
    }
}

fn mqtt_options(bridge: &MqttBridge, topics: &Topics) -> MqttOptions {
    let config = &bridge.config;
    let broker = config.broker().unwrap_or_else(|_| super::BrokerAddress {
        tls: false,
        host: "127.0.0.1".into(),
        port: 1883,
    });
    let mut options = MqttOptions::new(config.client_id.clone(), broker.host, broker.port);
    options
        .set_keep_alive(Duration::from_secs(config.keep_alive_secs))
        .set_clean_session(true)
        .set_last_will(LastWill::new(
            topics.status(),
            payload::STATUS_OFFLINE,
            QoS::AtLeastOnce,
            true,
        ));
    if let Some(user) = &config.username {
        options.set_credentials(user.clone(), bridge.password.clone().unwrap_or_default());
    }
    if let Some(tls) = &bridge.tls {
        options.set_transport(Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls.clone()),
        ));
    }
    options
}

/// Drives rumqttc's event loop until `stop`, reporting links to the bridge task.
async fn drive(
    mut eventloop: rumqttc::EventLoop,
    config: MqttBridgeConfig,
    tx: mpsc::Sender<Link>,
    stop: CancellationToken,
) {
    let mut backoff = Backoff {
        min: Duration::from_millis(config.reconnect_min_ms),
        max: Duration::from_millis(config.reconnect_max_ms),
        attempt: 0,
        seed: crate::now_ms() | 1,
    };
    let mut warned_at: Option<Instant> = None;
    // When the current link came up: the backoff starts over only after a link that held
    // for [`STABLE_LINK`], so a broker that accepts and drops at once gets ever longer waits
    // (each connect costs a full pass), not a reconnect storm.
    let mut up_since: Option<Instant> = None;
    loop {
        let polled = tokio::select! {
            _ = stop.cancelled() => return,
            polled = eventloop.poll() => polled,
        };
        let link = match polled {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                up_since = Some(Instant::now());
                metrics::gauge!(names::CONNECTED).set(1.0);
                tracing::info!("mqtt bridge connected to {}", redacted(&config.url));
                Link::Up
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if !p.retain || p.payload.is_empty() {
                    continue;
                }
                Link::Retained(p.topic, p.payload)
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
            Ok(_) => continue,
            Err(e) => {
                metrics::gauge!(names::CONNECTED).set(0.0);
                metrics::counter!(names::RECONNECTS).increment(1);
                let now = Instant::now();
                if warned_at.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10)) {
                    warned_at = Some(now);
                    tracing::warn!("mqtt bridge: {e} (reconnecting with backoff)");
                }
                if up_since
                    .take()
                    .is_some_and(|t| now.duration_since(t) >= STABLE_LINK)
                {
                    backoff.attempt = 0;
                }
                let wait = backoff.next();
                if tx.send(Link::Down).await.is_err() {
                    return;
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                continue;
            }
        };
        if tx.send(link).await.is_err() {
            return;
        }
    }
}

/// The URL without anything that might be a secret (it has none after validation; belt and
/// braces for logs).
fn redacted(url: &str) -> &str {
    url.split('@').next_back().unwrap_or(url)
}

/// One connection's worth of bridge state around the core.
struct Bridge<'a> {
    config: &'a MqttBridgeConfig,
    topics: Topics,
    registry: &'a Registry,
    core: Core,
    connected: bool,
    /// Users whose topic the MQTT broker shows online, as far as this bridge knows (it
    /// published them online, or the retained scan read them so): the only users an offline
    /// view is published for. A user privacy hides (never shown online) therefore produces
    /// nothing on MQTT, exactly like an offline user who never changes.
    shown_online: HashSet<String>,
    /// Channels whose topic the broker shows occupied: the only ones a clear is published for.
    shown_occupied: HashSet<String>,
}

impl Bridge<'_> {
    /// Feeds the inbox's events to the core; a loss triggers a full pass.
    fn absorb(&mut self, inbox: &super::Inbox) {
        let (events, settings, lost) = inbox.drain();
        let mut resync = lost > 0;
        // A privacy change: republish the user (and the rooms they are in, whose public
        // occupancy may change) if shown; the publication skips what did not change.
        for user in &settings {
            if self.core.user(user).is_some() {
                self.core.requeue(Subject::User(user.clone()));
            }
            for channel in self.registry.where_now(user) {
                if self.core.channel(&channel).is_some() {
                    self.core.requeue(Subject::Channel(channel));
                }
            }
        }
        for event in &events {
            match self.core.apply(event) {
                Applied::Dropped => {
                    metrics::counter!(names::DROPPED, "reason" => "subject_cap").increment(1);
                    resync = true;
                }
                Applied::ResyncNeeded => resync = true,
                Applied::Queued | Applied::Ignored => {}
            }
        }
        if resync {
            self.full_pass("loss");
        }
    }

    /// Reads every present user and occupied channel from the registry into the core.
    fn full_pass(&mut self, reason: &'static str) {
        metrics::counter!(names::RESYNCS, "reason" => reason).increment(1);
        let cap = self.config.max_subjects;
        let users = self.registry.present_users(cap);
        let channels = self.registry.occupancies_for(Viewer::Backend, cap);
        let dropped = self.core.load(users, channels);
        if dropped > 0 {
            metrics::counter!(names::DROPPED, "reason" => "subject_cap").increment(dropped);
        }
    }

    /// What the topic of `user` shows now, and whether that is the user's final offline state.
    fn user_view(&self, user: &str) -> Option<(PresenceSnapshot, bool)> {
        let truth = match self.core.user(user)? {
            Some(t) => t.clone(),
            None => self.registry.snapshot(user),
        };
        let offline = truth.availability == Availability::Offline;
        let shown = match self.config.show {
            ShowPolicy::Truth => truth,
            ShowPolicy::Public => self.registry.shown_to_public(&truth),
        };
        Some((shown, offline))
    }

    /// The occupancy the topic of `channel` shows now.
    fn channel_view(&self, channel: &str) -> Option<u32> {
        let truth = match self.core.channel(channel)? {
            Some(n) => n,
            None => self
                .registry
                .occupancies_for(Viewer::Backend, usize::MAX)
                .into_iter()
                .find(|(c, _)| c == channel)
                .map_or(0, |(_, n)| n),
        };
        Some(match self.config.show {
            ShowPolicy::Truth => truth,
            ShowPolicy::Public => {
                truth.saturating_sub(self.registry.hidden_members(Viewer::Public, channel))
            }
        })
    }

    /// Publishes dirty subjects (at most [`PUMP_BATCH`]). Returns false when the client's
    /// queue is full (try again shortly).
    fn pump(&mut self, client: &AsyncClient) -> bool {
        for _ in 0..PUMP_BATCH {
            let Some(subject) = self.core.next_dirty() else {
                return true;
            };
            let (topic, bytes, fingerprint, last, kind) = match &subject {
                Subject::User(user) => {
                    let (Some(topic), Some((shown, offline))) =
                        (self.topics.user(user), self.user_view(user))
                    else {
                        // Not bridgeable: forget it.
                        self.core.published(&subject, 0, true);
                        continue;
                    };
                    let fp = payload::user_fingerprint(&shown);
                    let bytes = payload::encode_user(&shown, self.config.format, crate::now_ms());
                    (topic, bytes, fp, offline, "user")
                }
                Subject::Channel(channel) => {
                    let (Some(topic), Some(n)) =
                        (self.topics.channel(channel), self.channel_view(channel))
                    else {
                        self.core.published(&subject, 0, true);
                        continue;
                    };
                    let bytes = payload::encode_channel(channel, n, crate::now_ms());
                    let truth_empty = self.core.channel(channel).flatten().is_none_or(|t| t == 0);
                    (
                        topic,
                        bytes,
                        payload::channel_fingerprint(n),
                        truth_empty,
                        "channel",
                    )
                }
            };
            if self.core.is_published(&subject, fingerprint) && !last {
                continue;
            }
            // Shown online (occupied) now, or shown so on the broker: publish. Otherwise the
            // topic is offline (empty) or absent already: publishing would only say that
            // something happened to a user privacy hides.
            let (shown_now, shown_set) = match &subject {
                Subject::User(u) => (
                    !payload::says_offline(&bytes) && !bytes.is_empty(),
                    self.shown_online.contains(u),
                ),
                Subject::Channel(c) => (!bytes.is_empty(), self.shown_occupied.contains(c)),
            };
            if !shown_now && !shown_set {
                self.core.published(&subject, fingerprint, last);
                continue;
            }
            match client.try_publish(topic, QoS::AtLeastOnce, true, bytes) {
                Ok(()) => {
                    metrics::counter!(names::PUBLISHED, "topic" => kind).increment(1);
                    self.core.published(&subject, fingerprint, last);
                    match (&subject, shown_now) {
                        (Subject::User(u), true) => self.shown_online.insert(u.clone()),
                        (Subject::User(u), false) => self.shown_online.remove(u),
                        (Subject::Channel(c), true) => self.shown_occupied.insert(c.clone()),
                        (Subject::Channel(c), false) => self.shown_occupied.remove(c),
                    };
                }
                Err(ClientError::TryRequest(_)) | Err(ClientError::Request(_)) => {
                    self.core.requeue(subject);
                    return false;
                }
            }
        }
        true
    }

    /// The state a clean stop leaves: users shown online published offline (single node:
    /// their sessions end with the process), occupied channels cleared.
    fn final_state(&self, clustered: bool) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        if clustered {
            return out;
        }
        let now = crate::now_ms();
        for user in self.core.online_users() {
            if !self.shown_online.contains(&user) {
                continue;
            }
            let Some(topic) = self.topics.user(&user) else {
                continue;
            };
            let Some((shown, _)) = self.user_view(&user) else {
                continue;
            };
            if shown.availability == Availability::Offline {
                continue;
            }
            let mut gone = PresenceSnapshot::offline(&user, now);
            gone.version = shown.version + 1;
            out.push((topic, payload::encode_user(&gone, self.config.format, now)));
        }
        for channel in self.core.channels() {
            if !self.shown_occupied.contains(&channel) {
                continue;
            }
            if let Some(topic) = self.topics.channel(&channel) {
                out.push((topic, Vec::new()));
            }
        }
        out
    }
}

/// See [`MqttBridge::run`].
pub(super) async fn run(
    bridge: MqttBridge,
    registry: Registry,
    events: Arc<EventBus>,
    shutdown: CancellationToken,
) {
    metrics::gauge!(names::CONNECTED).set(0.0);
    let config = bridge.config.clone();
    let topics = Topics::new(&config.topic_prefix, &config.client_id);
    let clustered = events.is_clustered();
    let mut state = Bridge {
        config: &config,
        topics: topics.clone(),
        registry: &registry,
        core: Core::new(config.max_subjects),
        connected: false,
        shown_online: HashSet::new(),
        shown_occupied: HashSet::new(),
    };
    loop {
        // Cluster mode: only the delivering node bridges.
        while !events.is_delivering() {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(DELIVERING_CHECK) => {}
            }
        }
        let (client, eventloop) =
            AsyncClient::new(mqtt_options(&bridge, &topics), REQUEST_CAPACITY);
        let (tx, mut links) = mpsc::channel(LINK_EVENTS_CAPACITY);
        let stop = CancellationToken::new();
        let mut driver = tokio::spawn(drive(eventloop, config.clone(), tx, stop.clone()));
        let resync_every = (config.resync_interval_ms > 0)
            .then(|| Duration::from_millis(config.resync_interval_ms));
        let mut next_resync: Option<Instant> = None;
        let mut scan_end: Option<Instant> = None;
        let mut retry_at: Option<Instant> = None;
        let mut check = tokio::time::interval(DELIVERING_CHECK);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let demoted = loop {
            if state.connected && retry_at.is_none() && !state.pump(&client) {
                retry_at = Some(Instant::now() + RETRY_FULL);
            }
            let more = state.connected && retry_at.is_none() && state.core.pending() > 0;
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break false,
                link = links.recv() => match link {
                    Some(Link::Up) => {
                        state.connected = true;
                        let _ = client.try_publish(topics.status(), QoS::AtLeastOnce, true, payload::STATUS_ONLINE);
                        metrics::counter!(names::PUBLISHED, "topic" => "status").increment(1);
                        if config.retained_scan_ms > 0 {
                            for filter in topics.scan_filters() {
                                let _ = client.try_subscribe(filter, QoS::AtLeastOnce);
                            }
                            scan_end = Some(Instant::now() + Duration::from_millis(config.retained_scan_ms));
                        }
                        state.absorb(&bridge.inbox);
                        state.full_pass("connect");
                        state.core.connected();
                        next_resync = resync_every.map(|d| Instant::now() + d);
                    }
                    Some(Link::Down) => {
                        state.connected = false;
                        scan_end = None;
                        next_resync = None;
                    }
                    Some(Link::Retained(topic, bytes)) => {
                        if scan_end.is_some() {
                            if let Some(subject) = super::scanned_subject(&topics, &topic, &bytes) {
                                // The broker shows it online (or occupied): it must be
                                // corrected if that is not so now.
                                match &subject {
                                    Subject::User(u) => state.shown_online.insert(u.clone()),
                                    Subject::Channel(c) => state.shown_occupied.insert(c.clone()),
                                };
                                match state.core.retained(subject.clone()) {
                                    Applied::Dropped => {
                                        metrics::counter!(names::DROPPED, "reason" => "subject_cap").increment(1);
                                    }
                                    // Tracked: published again if it is not so now.
                                    Applied::Ignored => state.core.requeue(subject),
                                    Applied::Queued | Applied::ResyncNeeded => {}
                                }
                            }
                        }
                    }
                    None => break false,
                },
                _ = bridge.inbox.notified() => state.absorb(&bridge.inbox),
                _ = sleep_until(retry_at), if retry_at.is_some() => retry_at = None,
                _ = sleep_until(scan_end), if scan_end.is_some() => {
                    scan_end = None;
                    for filter in topics.scan_filters() {
                        let _ = client.try_unsubscribe(filter);
                    }
                }
                _ = sleep_until(next_resync), if next_resync.is_some() && state.connected => {
                    state.full_pass("interval");
                    next_resync = resync_every.map(|d| Instant::now() + d);
                }
                _ = check.tick() => {
                    if clustered && !events.is_delivering() {
                        break true;
                    }
                }
                _ = std::future::ready(()), if more => {}
            }
        };
        if demoted {
            // Another node bridges now: leave without the Last Will (its status is "online").
            tracing::info!("mqtt bridge: this node no longer delivers events; disconnecting");
            let _ = client.try_disconnect();
            if tokio::time::timeout(STOP_DEADLINE, &mut driver)
                .await
                .is_err()
            {
                stop.cancel();
                let _ = driver.await;
            }
            state.connected = false;
            metrics::gauge!(names::CONNECTED).set(0.0);
            continue;
        }
        // A clean stop.
        let mut finished = false;
        if state.connected {
            let deadline = Instant::now() + STOP_DEADLINE;
            state.absorb(&bridge.inbox);
            let mut finals = state.final_state(clustered);
            finals.push((
                topics.status().to_string(),
                payload::STATUS_OFFLINE.as_bytes().to_vec(),
            ));
            for (topic, bytes) in finals {
                let sent = tokio::time::timeout_at(
                    deadline,
                    client.publish(topic, QoS::AtLeastOnce, true, bytes),
                )
                .await;
                if !matches!(sent, Ok(Ok(()))) {
                    break;
                }
            }
            let _ = tokio::time::timeout_at(deadline, client.disconnect()).await;
            finished = tokio::time::timeout_at(deadline, &mut driver).await.is_ok();
            if !finished {
                tracing::warn!(
                    "mqtt bridge: the final state was not sent within {STOP_DEADLINE:?}"
                );
            }
        }
        stop.cancel();
        if !finished {
            let _ = driver.await;
        }
        metrics::gauge!(names::CONNECTED).set(0.0);
        return;
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
