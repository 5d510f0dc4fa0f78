//! Embedding, through real sockets: a broker built with `Server::builder` and a custom
//! `Authenticator` (a host application's session table), a `PresenceHook` and an in-memory
//! `SubscriptionStore` written here. Refusals look like bad tokens (code, metric, delay); an
//! authenticator that never answers is refused at the timeout while other Connects go through;
//! the hook sees the transitions in order; a hook that never returns does not slow fanout and
//! its drops are counted; subscriptions land in the custom store.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{code, within};
use presenced::client::{Client, ClientOptions};
use presenced::embed::{AuthFailure, AuthFuture, AuthRequest, Authenticator, Identity, Transport};
use presenced::events::{Event, EventType};
use presenced::pb;
use presenced::store::{
    LastSeen, MemoryStore, StoreError, SubscribeOutcome, SubscriptionPage, SubscriptionStore,
};
use presenced::{Config, Server, ServerBuilder};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The host application's sessions: `session:<id>` → user. `session:hang` never answers.
#[derive(Default)]
struct Sessions {
    users: HashMap<String, String>,
    /// Every request seen: (token, transport).
    seen: Mutex<Vec<(String, Transport)>>,
}

impl Sessions {
    fn with(pairs: &[(&str, &str)]) -> Sessions {
        Sessions {
            users: pairs
                .iter()
                .map(|(s, u)| (format!("session:{s}"), u.to_string()))
                .collect(),
            seen: Mutex::new(Vec::new()),
        }
    }
}

impl Authenticator for Sessions {
    fn authenticate<'a>(&'a self, request: AuthRequest<'a>) -> AuthFuture<'a> {
        self.seen
            .lock()
            .unwrap()
            .push((request.token.to_string(), request.transport));
        Box::pin(async move {
            if request.token == "session:hang" {
                std::future::pending::<()>().await;
            }
            if request.token == "session:panic" {
                panic!("an authenticator bug on crafted input");
            }
            match self.users.get(request.token) {
                Some(user) => Ok(Identity::new(user.clone())),
                None => Err(AuthFailure::unauthenticated("unknown session")),
            }
        })
    }
}

/// An in-memory store that records every subscribe it receives.
#[derive(Debug, Default)]
struct RecordingStore {
    inner: MemoryStore,
    subscribed: Mutex<Vec<(String, Vec<String>)>>,
}

impl SubscriptionStore for RecordingStore {
    fn subscribe(
        &self,
        subscriber: &str,
        targets: &[String],
        expires_at_ms: u64,
        now_ms: u64,
        cap: usize,
    ) -> Result<SubscribeOutcome, StoreError> {
        self.subscribed
            .lock()
            .unwrap()
            .push((subscriber.to_string(), targets.to_vec()));
        self.inner
            .subscribe(subscriber, targets, expires_at_ms, now_ms, cap)
    }
    fn unsubscribe(
        &self,
        subscriber: &str,
        targets: &[String],
        now_ms: u64,
    ) -> Result<(usize, usize), StoreError> {
        self.inner.unsubscribe(subscriber, targets, now_ms)
    }
    fn list(
        &self,
        subscriber: &str,
        after: Option<&str>,
        limit: usize,
        now_ms: u64,
    ) -> Result<SubscriptionPage, StoreError> {
        self.inner.list(subscriber, after, limit, now_ms)
    }
    fn for_each_watcher(&self, target: &str, now_ms: u64, visit: &mut dyn FnMut(&str)) {
        self.inner.for_each_watcher(target, now_ms, visit)
    }
    fn total(&self) -> usize {
        self.inner.total()
    }
    fn sweep_expired(&self, now_ms: u64) -> Result<usize, StoreError> {
        self.inner.sweep_expired(now_ms)
    }
    fn record_last_seen(&self, user: &str, at_ms: u64, version: u64) -> Result<(), StoreError> {
        self.inner.record_last_seen(user, at_ms, version)
    }
    fn last_seen(&self, user: &str) -> Option<LastSeen> {
        self.inner.last_seen(user)
    }
    fn last_seen_since(
        &self,
        since_ms: u64,
        after: Option<(u64, &str)>,
        limit: usize,
    ) -> (Vec<(String, LastSeen)>, bool) {
        self.inner.last_seen_since(since_ms, after, limit)
    }
    fn latest_last_seen_ms(&self) -> u64 {
        self.inner.latest_last_seen_ms()
    }
    fn revoke_tokens(&self, user: &str, before_ms: u64, until_ms: u64) -> Result<u64, StoreError> {
        self.inner.revoke_tokens(user, before_ms, until_ms)
    }
    fn tokens_revoked_before(&self, user: &str, now_ms: u64) -> Option<u64> {
        self.inner.tokens_revoked_before(user, now_ms)
    }
    fn flush(&self) -> Result<(), StoreError> {
        self.inner.flush()
    }
    fn as_dyn(&self) -> &dyn SubscriptionStore {
        self
    }
}

/// A broker started from a builder; shut down when dropped.
struct Embedded {
    addr: std::net::SocketAddr,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
    _data: tempfile::TempDir,
}

impl Drop for Embedded {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Embedded {
    async fn start(
        tweak: impl FnOnce(&mut Config),
        build: impl FnOnce(ServerBuilder) -> ServerBuilder,
    ) -> Embedded {
        let data = tempfile::tempdir().unwrap();
        let mut config = common::test_config(data.path());
        tweak(&mut config);
        let server = build(Server::builder(config))
            .bind()
            .await
            .expect("broker starts");
        let addr = server.local_addr();
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let task = tokio::spawn(async move { server.run(token).await.expect("broker runs") });
        Embedded {
            addr,
            shutdown,
            task: Some(task),
            _data: data,
        }
    }

    async fn connect(
        &self,
        session: &str,
        device: &str,
    ) -> Result<Client, presenced::client::ClientError> {
        within(Client::connect(
            ClientOptions::new(self.addr, format!("session:{session}")).device(device),
        ))
        .await
    }

    async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            within(task).await.expect("server task panicked");
        }
    }
}

/// `name{reason="label"}` in this process's metrics (the recorder is process-wide, so tests
/// compare before and after).
fn counter(name: &str, label: &str) -> f64 {
    let text = presenced::metrics::install().render();
    let prefix = format!("{name}{{reason=\"{label}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

fn refusal(result: Result<Client, presenced::client::ClientError>) -> pb::Error {
    common::server_error(result)
}

#[tokio::test]
async fn sessions_are_accepted_and_bad_ones_refused_like_bad_tokens() {
    let sessions = Arc::new(Sessions::with(&[("s1", "alice")]));
    let broker = Embedded::start(
        |c| c.limits.auth_failure_delay_ms = 300,
        |b| b.shared_authenticator(sessions.clone()),
    )
    .await;
    let alice = broker
        .connect("s1", "phone")
        .await
        .expect("a good session connects");
    assert_eq!(alice.conn_ack.user_id, "alice");
    assert_eq!(
        sessions.seen.lock().unwrap()[0],
        ("session:s1".to_string(), Transport::Tls)
    );

    let before = counter("presence_auth_failures_total", "rejected");
    let started = Instant::now();
    let e = refusal(broker.connect("nope", "phone").await);
    assert_eq!(code(&e), pb::ErrorCode::Unauthenticated, "{}", e.reason);
    assert_eq!(e.reason, "unknown session");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "the failed-login delay applies: {:?}",
        started.elapsed()
    );
    assert!(counter("presence_auth_failures_total", "rejected") >= before + 1.0);

    // A token the default authenticator would accept means nothing here.
    let e = refusal(
        within(Client::connect(ClientOptions::new(
            broker.addr,
            presenced::auth::dev_token("alice", 60),
        )))
        .await,
    );
    assert_eq!(code(&e), pb::ErrorCode::Unauthenticated);
    broker.stop().await;

    // The same refusal a bad token gets from the standalone broker.
    let standalone = common::start(|_| {}).await;
    let e = refusal(
        within(Client::connect(ClientOptions::new(
            standalone.addr,
            "not-a-token",
        )))
        .await,
    );
    assert_eq!(code(&e), pb::ErrorCode::Unauthenticated);
    standalone.stop().await;
}

#[tokio::test]
async fn an_authenticator_that_panics_refuses_with_the_delay_and_the_count() {
    let broker = Embedded::start(
        |c| c.limits.auth_failure_delay_ms = 300,
        |b| b.authenticator(Sessions::with(&[("s1", "alice")])),
    )
    .await;
    let before = counter("presence_auth_failures_total", "panic");
    let started = Instant::now();
    let e = refusal(broker.connect("panic", "phone").await);
    assert_eq!(code(&e), pb::ErrorCode::Unauthenticated, "{}", e.reason);
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "the failed-login delay applies: {:?}",
        started.elapsed()
    );
    assert!(counter("presence_auth_failures_total", "panic") >= before + 1.0);
    // The broker still serves.
    let alice = broker.connect("s1", "phone").await.expect("a good session");
    assert_eq!(alice.conn_ack.user_id, "alice");
    broker.stop().await;
}

#[tokio::test]
async fn an_identity_with_a_bad_user_id_is_refused() {
    let broker = Embedded::start(
        |c| c.limits.auth_failure_delay_ms = 1,
        |b| b.authenticator(Sessions::with(&[("empty", ""), ("ctl", "a\u{1}b")])),
    )
    .await;
    let before = counter("presence_auth_failures_total", "bad_subject");
    for session in ["empty", "ctl"] {
        let e = refusal(broker.connect(session, "phone").await);
        assert_eq!(code(&e), pb::ErrorCode::Unauthenticated, "{}", e.reason);
    }
    assert!(counter("presence_auth_failures_total", "bad_subject") >= before + 2.0);
    broker.stop().await;
}

#[tokio::test]
async fn an_authenticator_that_never_answers_is_refused_at_the_timeout_and_holds_up_no_one() {
    let timeout = Duration::from_secs(2);
    let broker = Arc::new(
        Embedded::start(
            |c| c.limits.auth_failure_delay_ms = 1,
            |b| {
                b.authenticator(Sessions::with(&[("s1", "alice")]))
                    .auth_timeout(timeout)
            },
        )
        .await,
    );
    let before = counter("presence_auth_failures_total", "timeout");
    let started = Instant::now();
    let hanging = {
        let broker = broker.clone();
        tokio::spawn(async move { broker.connect("hang", "phone").await })
    };
    // While that Connect waits for its authenticator, others go through.
    for device in ["a", "b", "c"] {
        broker.connect("s1", device).await.expect("connects");
    }
    assert!(
        !hanging.is_finished(),
        "connects went through while the hanging one waits ({:?} elapsed)",
        started.elapsed()
    );
    let e = refusal(within(hanging).await.unwrap());
    assert!(started.elapsed() >= timeout);
    assert_eq!(code(&e), pb::ErrorCode::Unauthenticated);
    assert!(
        e.reason.contains("did not finish within 2000 ms"),
        "{}",
        e.reason
    );
    assert!(counter("presence_auth_failures_total", "timeout") >= before + 1.0);
    match Arc::try_unwrap(broker) {
        Ok(broker) => broker.stop().await,
        Err(_) => panic!("the broker is still shared"),
    }
}

/// A hook that forwards every event to the test.
fn forwarding_hook() -> (
    impl Fn(&Event) + Send + Sync + 'static,
    tokio::sync::mpsc::UnboundedReceiver<Event>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    (move |e: &Event| drop(tx.send(e.clone())), rx)
}

#[tokio::test]
async fn the_hook_sees_a_users_transitions_in_order() {
    let (hook, mut events) = forwarding_hook();
    let broker = Embedded::start(
        |_| {},
        |b| {
            b.authenticator(Sessions::with(&[("s1", "alice")]))
                .hook(hook)
        },
    )
    .await;
    let first = within(events.recv()).await.unwrap();
    assert_eq!(first.kind, EventType::ServerStarted);

    let alice = broker.connect("s1", "phone").await.unwrap();
    within(alice.join("room", &[])).await.unwrap();
    within(alice.disconnect()).await.unwrap();

    let mut seen = Vec::new();
    while !seen.contains(&EventType::UserOffline) {
        let e = within(events.recv()).await.unwrap();
        let about_alice =
            e.user.as_deref() == Some("alice") || e.channel.as_deref() == Some("room");
        assert!(about_alice, "only alice and her room: {e:?}");
        seen.push(e.kind);
    }
    let position = |kind| {
        seen.iter()
            .position(|k| *k == kind)
            .unwrap_or_else(|| panic!("{kind} seen in {seen:?}"))
    };
    let order = [
        position(EventType::UserOnline),
        position(EventType::DeviceConnected),
        position(EventType::MemberJoined),
        position(EventType::UserOffline),
    ];
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    broker.stop().await;
}

#[tokio::test]
async fn a_hook_that_never_returns_does_not_slow_fanout_and_its_drops_are_counted() {
    // The hook blocks on its first event until the test ends.
    let (release, gate) = std::sync::mpsc::channel::<()>();
    let gate = Mutex::new(gate);
    let hook = move |_: &Event| {
        let _ = gate.lock().unwrap().recv();
    };
    let broker = Embedded::start(
        |_| {},
        |b| {
            b.authenticator(Sessions::with(&[("w", "watcher"), ("a", "alice")]))
                .hook(hook)
                .hook_queue_capacity(2)
        },
    )
    .await;
    let before = counter("presence_hook_events_dropped_total", "queue_full");
    let mut watcher = broker.connect("w", "phone").await.unwrap();
    within(watcher.subscribe(&["alice"])).await.unwrap();
    let alice = broker.connect("a", "phone").await.unwrap();
    let online = within(watcher.next_presence_event()).await.unwrap();
    assert_eq!(online.user_id, "alice");
    for i in 0..20 {
        let status = format!("status {i}");
        within(alice.set_presence(pb::SetPresence {
            status: Some(status.clone()),
            ..Default::default()
        }))
        .await
        .unwrap();
        let event = within(watcher.next_presence_event()).await.unwrap();
        let presence = event.presence.expect("the event carries the presence");
        assert_eq!(presence.status, status);
    }
    assert!(
        counter("presence_hook_events_dropped_total", "queue_full") >= before + 1.0,
        "a queue of 2 behind a stuck hook drops"
    );
    drop(release);
    broker.stop().await;
}

#[tokio::test]
async fn subscriptions_go_to_the_embedders_store() {
    let store = Arc::new(RecordingStore::default());
    let data = tempfile::tempdir().unwrap();
    let unused = data.path().join("never-opened");
    let broker = Embedded::start(
        |c| c.data_dir = unused.clone(),
        |b| {
            b.authenticator(Sessions::with(&[("w", "watcher")]))
                .store(store.clone())
        },
    )
    .await;
    let watcher = broker.connect("w", "phone").await.unwrap();
    within(watcher.subscribe(&["alice", "bob"])).await.unwrap();
    assert_eq!(
        store.subscribed.lock().unwrap().as_slice(),
        [(
            "watcher".to_string(),
            vec!["alice".to_string(), "bob".to_string()]
        )]
    );
    let listed = within(watcher.list_subscriptions("", 10)).await.unwrap();
    let targets: Vec<&str> = listed
        .subscriptions
        .iter()
        .map(|s| s.user_id.as_str())
        .collect();
    assert_eq!(targets, ["alice", "bob"]);
    assert_eq!(store.total(), 2);
    broker.stop().await;
    assert!(!unused.exists(), "the sled store was not opened");
}
