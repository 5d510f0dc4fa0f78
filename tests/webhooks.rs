//! Signed webhooks end to end: a real broker feeds its event bus into webhook endpoints that
//! POST to a scripted loopback receiver (raw HTTP/1.1 on tokio, one request per connection, so
//! it can answer any status, delay or never answer, count requests in flight, and stop
//! accepting by dropping its listener). Retries keep their `webhook-id`, `Retry-After` is
//! honoured, 410 disables an endpoint, one request is in flight at a time, signatures verify
//! during a key rotation, a flap within the grace period sends nothing, a 30 s outage loses
//! nothing the queue can hold, an overflowing queue reports exactly what it lost with one
//! `sync.required`, a receiver that never answers does not slow presence fanout, and after a
//! SIGKILL the real binary's first webhook is a `server.started` with a new epoch.
//!
//! Every wait is a bounded poll; the only sleeps are a receiver's scripted answer delay, the
//! pacing of the churn during the simulated outage and the outage's length (30 s; the retry
//! backoff caps at 30 s, so deliveries resume at most 30 s after it ends).

mod common;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use presenced::client::{Client, ClientOptions};
use presenced::events::{Event, EventBus, EventType, RECENT_EVENTS};
use presenced::pb;
use presenced::webhooks::{verify, SignedHeaders, VerifyError, WebhookConfig, Webhooks};
use presenced::{Config, Server};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A Standard Webhooks secret (24 bytes once decoded).
const K1: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// A raw secret, used as its bytes.
const K2: &str = "the-next-secret-for-the-rotation";

// ---------------------------------------------------------------------------------------------
// The scripted receiver.

/// How the receiver answers one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reply {
    /// That status, empty body.
    Status(u16),
    /// That status with `Retry-After: <secs>`.
    RetryAfter(u16, u64),
    /// A 307 to another address (never to be followed).
    Redirect,
    /// That status after holding the request this long.
    Slow(u16, Duration),
    /// That status with a JSON body.
    Json(u16, &'static str),
    /// Reads the request, records it (status 0) and never answers; the connection stays open.
    Hang,
}

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
struct Seen {
    /// The request line's method and target, e.g. `POST /hook?x`.
    request: String,
    /// Header names lowercased.
    headers: HashMap<String, String>,
    body: Vec<u8>,
    arrived: Instant,
    /// When the answer was written (None while it is being delayed).
    answered: Option<Instant>,
    status: u16,
}

impl Seen {
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", String::as_str)
    }

    fn events(&self) -> Vec<Value> {
        let body: Value = serde_json::from_slice(&self.body).expect("a JSON body");
        body["events"].as_array().expect("an events array").clone()
    }

    fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

#[derive(Debug)]
struct ReceiverState {
    seen: Vec<Seen>,
    /// Answers for the next requests, in order; then `default`.
    script: VecDeque<Reply>,
    default: Reply,
    /// How long each answer is held back.
    delay: Duration,
    in_flight: usize,
    max_in_flight: usize,
}

/// A loopback webhook receiver; see the module doc.
struct Receiver {
    addr: SocketAddr,
    state: Arc<Mutex<ReceiverState>>,
    accepting: Option<(CancellationToken, JoinHandle<()>)>,
}

impl Receiver {
    async fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(ReceiverState {
            seen: Vec::new(),
            script: VecDeque::new(),
            default: Reply::Status(204),
            delay: Duration::ZERO,
            in_flight: 0,
            max_in_flight: 0,
        }));
        let mut receiver = Receiver {
            addr,
            state,
            accepting: None,
        };
        receiver.serve(listener);
        receiver
    }

    fn serve(&mut self, listener: TcpListener) {
        let stop = CancellationToken::new();
        let task = tokio::spawn(accept_loop(listener, self.state.clone(), stop.clone()));
        self.accepting = Some((stop, task));
    }

    fn url(&self) -> String {
        format!("http://{}/hook?token=not-in-labels", self.addr)
    }

    /// The endpoint's metric label.
    fn label(&self) -> String {
        format!("{}/hook", self.addr)
    }

    fn script(&self, replies: &[Reply]) {
        self.state.lock().unwrap().script.extend(replies);
    }

    fn set_default(&self, reply: Reply) {
        self.state.lock().unwrap().default = reply;
    }

    fn set_delay(&self, delay: Duration) {
        self.state.lock().unwrap().delay = delay;
    }

    /// Drops the listener: connections are refused until `resume`.
    async fn stop_accepting(&mut self) {
        if let Some((stop, task)) = self.accepting.take() {
            stop.cancel();
            task.await.unwrap();
        }
    }

    /// Listens again on the same address.
    async fn resume(&mut self) {
        let listener = TcpListener::bind(self.addr).await.expect("rebind");
        self.serve(listener);
    }

    fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    fn max_in_flight(&self) -> usize {
        self.state.lock().unwrap().max_in_flight
    }

    fn in_flight(&self) -> usize {
        self.state.lock().unwrap().in_flight
    }

    /// Asserts that nothing listens on the receiver's address: a connection is refused.
    async fn assert_refusing(&self) {
        match within(TcpStream::connect(self.addr)).await {
            Err(e) => assert_eq!(
                e.kind(),
                std::io::ErrorKind::ConnectionRefused,
                "connecting to {}: {e}",
                self.addr
            ),
            Ok(_) => panic!("{} accepted a connection during the outage", self.addr),
        }
    }

    /// Events of acknowledged (2xx) requests, in delivery order.
    fn delivered(&self) -> Vec<Value> {
        self.seen()
            .iter()
            .filter(|s| s.ok() && s.answered.is_some())
            .flat_map(Seen::events)
            .collect()
    }

    /// Polls (bounded by `limit`) until `f` finds something in what was seen.
    async fn until<T>(&self, what: &str, limit: Duration, f: impl Fn(&[Seen]) -> Option<T>) -> T {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(found) = f(&self.seen()) {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {limit:?} waiting for {what}; seen {} requests",
                self.seen().len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until an acknowledged request carried an event matching `f`.
    async fn until_delivered(&self, what: &str, limit: Duration, f: impl Fn(&Value) -> bool) {
        self.until(what, limit, |seen| {
            seen.iter()
                .filter(|s| s.ok() && s.answered.is_some())
                .any(|s| s.events().iter().any(&f))
                .then_some(())
        })
        .await
    }
}

async fn accept_loop(
    listener: TcpListener,
    state: Arc<Mutex<ReceiverState>>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => {
                let Ok((socket, _)) = accepted else { continue };
                tokio::spawn(answer(socket, state.clone()));
            }
        }
    }
}

/// Reads one request, records it, answers as scripted and closes.
async fn answer(mut socket: TcpStream, state: Arc<Mutex<ReceiverState>>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match socket.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        assert!(buf.len() < 64 * 1024, "request head too large");
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut headers = HashMap::new();
    for line in head.lines().skip(1) {
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let length: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + length {
        match socket.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let body = buf[head_end..head_end + length].to_vec();
    let (index, reply, delay) = {
        let mut s = state.lock().unwrap();
        let reply = s.script.pop_front().unwrap_or(s.default);
        let status = match reply {
            Reply::Status(c) | Reply::RetryAfter(c, _) | Reply::Slow(c, _) | Reply::Json(c, _) => c,
            Reply::Redirect => 307,
            Reply::Hang => 0,
        };
        s.in_flight += 1;
        s.max_in_flight = s.max_in_flight.max(s.in_flight);
        s.seen.push(Seen {
            request: head
                .lines()
                .next()
                .unwrap_or("")
                .rsplit_once(' ')
                .map_or("", |(r, _)| r)
                .to_string(),
            headers,
            body,
            arrived: Instant::now(),
            answered: None,
            status,
        });
        (s.seen.len() - 1, reply, s.delay)
    };
    let delay = match reply {
        Reply::Slow(_, slow) => delay + slow,
        // Holds the socket open, unanswered, until the test's runtime ends.
        Reply::Hang => std::future::pending().await,
        _ => delay,
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let (status, extra, body) = match reply {
        Reply::Status(c) | Reply::Slow(c, _) => (c, String::new(), ""),
        Reply::RetryAfter(c, secs) => (c, format!("Retry-After: {secs}\r\n"), ""),
        Reply::Redirect => (
            307,
            "Location: http://127.0.0.1:1/elsewhere\r\n".to_string(),
            "",
        ),
        Reply::Json(c, json) => (c, "Content-Type: application/json\r\n".to_string(), json),
        Reply::Hang => unreachable!("a hanging request is never answered"),
    };
    let response = format!(
        "HTTP/1.1 {status} Scripted\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n{body}",
        body.len()
    );
    // Counted as answered before the bytes leave, so the sender cannot start its next request
    // before this one is marked done.
    {
        let mut s = state.lock().unwrap();
        s.in_flight -= 1;
        s.seen[index].answered = Some(Instant::now());
    }
    let _ = socket.write_all(response.as_bytes()).await;
    let _ = socket.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Broker helpers.

/// A running broker with its event bus (the authoritative list of events); shut down when
/// dropped. (Its own struct, not `common::Broker`, so this file needs only `test_config`.)
struct Node {
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    bus: Arc<EventBus>,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
    _data_dir: tempfile::TempDir,
}

impl Drop for Node {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Node {
    async fn start(tweak: impl FnOnce(&mut Config)) -> Node {
        let data_dir = tempfile::tempdir().unwrap();
        let mut config = test_config(data_dir.path());
        tweak(&mut config);
        let server = Server::bind(config).await.expect("broker starts");
        let bus = server.events();
        let addr = server.local_addr();
        let metrics_addr = server.metrics_addr();
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let task = tokio::spawn(async move {
            server.run(token).await.expect("broker runs");
        });
        Node {
            addr,
            metrics_addr,
            bus,
            shutdown,
            task: Some(task),
            _data_dir: data_dir,
        }
    }

    async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            within(task).await.expect("server task panicked");
        }
    }

    fn options(&self, user: &str) -> ClientOptions {
        ClientOptions::new(self.addr, token(user)).device("phone")
    }

    /// Connects `user` on device "phone".
    async fn connect(&self, user: &str) -> Client {
        within(Client::connect(self.options(user)))
            .await
            .unwrap_or_else(|e| panic!("{user} connects: {e}"))
    }
}

/// Room for many quick connections and publishes from one address, and a metrics endpoint.
fn roomy(c: &mut Config) {
    c.limits.publish_rate_per_sec = 100_000;
    c.limits.publish_burst = 100_000;
    c.limits.request_rate_per_sec = 100_000;
    c.limits.request_burst = 100_000;
    c.limits.accept_rate_per_sec = 100_000;
    c.limits.accept_burst = 100_000;
    c.limits.accept_rate_per_address_per_sec = 100_000;
    c.limits.accept_burst_per_address = 100_000;
    c.limits.max_handshakes_per_address = 256;
    c.metrics.enabled = true;
    c.metrics.listen = "127.0.0.1:0".parse().unwrap();
}

fn hook(receiver: &Receiver, events: &[EventType]) -> WebhookConfig {
    let mut c = WebhookConfig::new(&receiver.url(), "k1", K1);
    c.events = events.to_vec();
    c.linger_ms = 20;
    c.timeout_ms = 2_000;
    c
}

const PRESENCE: [EventType; 3] = [
    EventType::UserOnline,
    EventType::UserOffline,
    EventType::UserUpdated,
];

fn status(text: &str) -> pb::SetPresence {
    pb::SetPresence {
        status: Some(text.into()),
        ..Default::default()
    }
}

/// Connects `users` (device "phone"), `parallel` at a time, in order.
async fn connect_all(broker: &Node, users: &[String], parallel: usize) -> Vec<Client> {
    let mut clients = Vec::with_capacity(users.len());
    for group in users.chunks(parallel) {
        let tasks: Vec<_> = group
            .iter()
            .map(|u| {
                let options = broker.options(u);
                tokio::spawn(async move { within(Client::connect(options)).await })
            })
            .collect();
        for (task, u) in tasks.into_iter().zip(group) {
            let client = task
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("{u} connects: {e}"));
            clients.push(client);
        }
    }
    clients
}

/// Runs `f` on every client, `parallel` at a time.
async fn for_each<F, Fut>(clients: Vec<Client>, parallel: usize, mut f: F) -> Vec<Client>
where
    F: FnMut(Client) -> Fut,
    Fut: std::future::Future<Output = Option<Client>> + Send + 'static,
{
    let mut kept = Vec::new();
    let mut clients = clients.into_iter().peekable();
    while clients.peek().is_some() {
        let tasks: Vec<_> = clients
            .by_ref()
            .take(parallel)
            .map(|c| tokio::spawn(f(c)))
            .collect();
        for task in tasks {
            kept.extend(task.await.unwrap());
        }
    }
    kept
}

/// A sample of `name` whose labels include every `label="value"` pair, from the broker's
/// Prometheus endpoint.
async fn metric(broker: &Node, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let addr = broker.metrics_addr.expect("metrics enabled");
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    within(tcp.read_to_string(&mut text)).await.unwrap();
    let wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| wanted.iter().all(|w| l.contains(w.as_str())))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn kind(e: &Value) -> &str {
    e["type"].as_str().unwrap_or("")
}

fn user(e: &Value) -> &str {
    e["user"].as_str().unwrap_or("")
}

fn is(e: &Value, k: &str, u: &str) -> bool {
    kind(e) == k && user(e) == u
}

/// Each user's versions never go down across `events`, in order (events of one change, such as
/// `user.online` and `device.connected`, share its version).
fn assert_versions_never_go_down(events: &[Value]) {
    let mut last: HashMap<String, u64> = HashMap::new();
    for e in events {
        let (Some(u), Some(v)) = (e["user"].as_str(), e["version"].as_u64()) else {
            continue;
        };
        if v == 0 {
            continue; // channel events carry no version
        }
        let before = last.insert(u.to_string(), v).unwrap_or(0);
        assert!(v >= before, "{u}: version {v} after {before}");
    }
}

const SECS_10: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// 1. Retries.

#[tokio::test]
async fn a_failing_batch_is_retried_under_the_same_webhook_id_until_acknowledged() {
    let receiver = Receiver::start().await;
    // A redirect is a failure like any other: it is not followed.
    receiver.script(&[Reply::Status(500), Reply::Redirect, Reply::Status(500)]);
    let hooks = vec![hook(&receiver, &PRESENCE)];
    let broker = Node::start(|c| c.webhooks = hooks).await;
    // server.started (seq 1) is the first batch: three failures, then a 204.
    let seen = receiver
        .until("4 attempts", SECS_10, |s| {
            (s.len() >= 4).then(|| s.to_vec())
        })
        .await;
    let id = seen[0].header("webhook-id").to_string();
    assert!(id.starts_with("msg_") && id.ends_with("-1_1"), "{id}");
    for (i, s) in seen.iter().take(4).enumerate() {
        assert_eq!(s.header("webhook-id"), id, "attempt {i}");
        assert_eq!(s.status, [500, 307, 500, 204][i]);
        assert_eq!(kind(&s.events()[0]), "server.started");
        // Each attempt is signed afresh and verifies.
        let secrets = BTreeMap::from([("k1".to_string(), K1.to_string())]);
        let signed = SignedHeaders {
            id: s.header("webhook-id"),
            timestamp: s.header("webhook-timestamp"),
            signature: s.header("webhook-signature"),
        };
        assert_eq!(verify(&secrets, signed, &s.body, now_secs(), 300), Ok(()));
        assert_eq!(s.header("content-type"), "application/json");
    }
    // The next batch has its own id.
    let _alice = broker.connect("alice").await;
    receiver
        .until_delivered("alice online", SECS_10, |e| is(e, "user.online", "alice"))
        .await;
    let last = receiver.seen().last().unwrap().clone();
    assert_ne!(last.header("webhook-id"), id);
    broker.stop().await;
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let receiver = Receiver::start().await;
    receiver.script(&[Reply::RetryAfter(429, 2), Reply::RetryAfter(503, 1)]);
    let hooks = vec![hook(&receiver, &PRESENCE)];
    let broker = Node::start(|c| c.webhooks = hooks).await;
    let seen = receiver
        .until("3 attempts", SECS_10, |s| {
            (s.len() >= 3).then(|| s.to_vec())
        })
        .await;
    let gap = |i: usize| seen[i].arrived - seen[i - 1].answered.unwrap();
    assert!(
        gap(1) >= Duration::from_secs(2),
        "429 + Retry-After 2: {:?}",
        gap(1)
    );
    assert!(
        gap(2) >= Duration::from_secs(1),
        "503 + Retry-After 1: {:?}",
        gap(2)
    );
    assert!(seen[2].ok());
    assert_eq!(seen[0].header("webhook-id"), seen[2].header("webhook-id"));
    broker.stop().await;
}

#[tokio::test]
async fn a_request_that_times_out_is_retried_under_the_same_id() {
    let receiver = Receiver::start().await;
    receiver.script(&[Reply::Slow(204, Duration::from_secs(3))]);
    let mut config = hook(&receiver, &PRESENCE);
    config.timeout_ms = 300;
    let broker = Node::start(|c| c.webhooks = vec![config]).await;
    let seen = receiver
        .until("a second attempt", SECS_10, |s| {
            (s.len() >= 2).then(|| s.to_vec())
        })
        .await;
    assert_eq!(seen[0].header("webhook-id"), seen[1].header("webhook-id"));
    assert!(
        seen[1].arrived - seen[0].arrived >= Duration::from_millis(300),
        "not before the timeout"
    );
    broker.stop().await;
}

#[tokio::test]
async fn a_batch_too_old_to_retry_is_given_up_and_reported_by_sync_required() {
    let receiver = Receiver::start().await;
    receiver.set_default(Reply::Status(500));
    let mut config = hook(&receiver, &PRESENCE);
    config.max_event_age_ms = 1_000;
    let broker = Node::start(|c| {
        roomy(c);
        c.webhooks = vec![config];
    })
    .await;
    // server.started fails until it is older than 1 s; then the next batch opens with a
    // sync.required.
    receiver
        .until("a sync.required", SECS_10, |s| {
            s.iter()
                .any(|r| r.events().iter().any(|e| kind(e) == "sync.required"))
                .then_some(())
        })
        .await;
    receiver.set_default(Reply::Status(204));
    receiver
        .until_delivered("the sync.required", SECS_10, |e| kind(e) == "sync.required")
        .await;
    let delivered = receiver.delivered();
    assert_eq!(kind(&delivered[0]), "sync.required");
    assert_eq!(delivered[0]["first_lost_seq"], 1);
    assert_eq!(delivered[0]["dropped"], 1);
    assert!(!delivered.iter().any(|e| kind(e) == "server.started"));
    let label = receiver.label();
    let l = [("endpoint", label.as_str()), ("result", "failed")];
    assert!(metric(&broker, "presence_webhook_batches_total", &l).await >= Some(1.0));
    broker.stop().await;
}

#[tokio::test]
async fn shutdown_flushes_what_is_queued_and_never_waits_long() {
    let receiver = Receiver::start().await;
    let mut config = hook(&receiver, &PRESENCE);
    // Nothing would go out for 10 s on its own.
    config.linger_ms = 10_000;
    let (webhooks, sinks) = Webhooks::new(&[config]);
    let bus = EventBus::new(0xfeed, None, sinks);
    for i in 0..5 {
        bus.publish(Event::bare(EventType::UserOnline, Some(format!("u{i}")), 1));
    }
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(webhooks.run(shutdown.clone()));
    assert!(receiver.seen().is_empty(), "still lingering");
    shutdown.cancel();
    let cancelled = Instant::now();
    within(run).await.unwrap();
    assert!(cancelled.elapsed() < Duration::from_secs(3));
    let ids: Vec<Value> = receiver
        .delivered()
        .iter()
        .map(|e| e["seq"].clone())
        .collect();
    assert_eq!(ids, [1, 2, 3, 4, 5, 6]);

    // A receiver that hangs does not hold shutdown for its timeout (2 s) or longer.
    let hanging = Receiver::start().await;
    hanging.set_default(Reply::Slow(204, Duration::from_secs(30)));
    let (webhooks, sinks) = Webhooks::new(&[hook(&hanging, &PRESENCE)]);
    let _bus = EventBus::new(0xbeef, None, sinks);
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(webhooks.run(shutdown.clone()));
    hanging
        .until("a request in flight", SECS_10, |s| s.first().map(|_| ()))
        .await;
    shutdown.cancel();
    let cancelled = Instant::now();
    within(run).await.unwrap();
    let took = cancelled.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}: about the 1 s final flush"
    );
}

#[tokio::test]
async fn gone_disables_the_endpoint() {
    let gone = Receiver::start().await;
    gone.script(&[Reply::Status(410)]);
    let control = Receiver::start().await;
    let hooks = vec![hook(&gone, &PRESENCE), hook(&control, &PRESENCE)];
    let broker = Node::start(|c| {
        roomy(c);
        c.webhooks = hooks;
    })
    .await;
    gone.until("the 410", SECS_10, |s| s.first().map(|_| ()))
        .await;
    let _bob = broker.connect("bob").await;
    // Once the control endpoint has bob's event, the other one would have had it too.
    control
        .until_delivered("bob online", SECS_10, |e| is(e, "user.online", "bob"))
        .await;
    assert_eq!(gone.seen().len(), 1, "nothing after the 410");
    let label = gone.label();
    let l = [("endpoint", label.as_str())];
    let deadline = Instant::now() + SECS_10;
    while metric(&broker, "presence_webhook_disabled", &l).await != Some(1.0) {
        assert!(
            Instant::now() < deadline,
            "the endpoint is never reported disabled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        metric(
            &broker,
            "presence_webhook_batches_total",
            &[("endpoint", &label), ("result", "gone")]
        )
        .await,
        Some(1.0)
    );
    let control_label = control.label();
    assert_eq!(
        metric(
            &broker,
            "presence_webhook_disabled",
            &[("endpoint", &control_label)]
        )
        .await,
        Some(0.0)
    );
    broker.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 2. One request in flight; versions only increase.

#[tokio::test]
async fn one_request_is_in_flight_at_a_time_and_versions_only_increase() {
    let receiver = Receiver::start().await;
    receiver.set_delay(Duration::from_millis(60));
    let mut config = hook(&receiver, &PRESENCE);
    config.batch_size = 3;
    config.linger_ms = 0;
    let hooks = vec![config];
    let broker = Node::start(|c| {
        roomy(c);
        c.webhooks = hooks;
    })
    .await;
    let users: Vec<String> = (0..4).map(|i| format!("writer{i}")).collect();
    let clients = connect_all(&broker, &users, 4).await;
    let mut tasks = Vec::new();
    for client in clients {
        tasks.push(tokio::spawn(async move {
            let mut version = 0;
            for i in 0..15 {
                let p = within(client.set_presence(status(&format!("s{i}"))))
                    .await
                    .unwrap();
                assert!(p.version > version);
                version = p.version;
                // Load shape, not synchronisation: spread the changes over several batches.
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            (client, version)
        }));
    }
    // Meanwhile a crowd arrives: user.online events are never coalesced, so many batches.
    let crowd: Vec<String> = (0..30).map(|i| format!("crowd{i}")).collect();
    let crowd = connect_all(&broker, &crowd, 4).await;
    let mut finals = Vec::new();
    for (task, u) in tasks.into_iter().zip(&users) {
        let (client, version) = task.await.unwrap();
        finals.push((u.clone(), version, client));
    }
    for (u, version, _) in &finals {
        receiver
            .until_delivered(&format!("{u} v{version}"), Duration::from_secs(30), |e| {
                user(e) == u && e["version"].as_u64() == Some(*version)
            })
            .await;
    }
    let delivered = receiver.delivered();
    // Strictly increasing per user here: only user.* events, one per change.
    let mut last: HashMap<&str, u64> = HashMap::new();
    for e in &delivered {
        let v = e["version"].as_u64().unwrap();
        if let Some(before) = last.insert(user(e), v) {
            assert!(v > before, "{}: {v} after {before}", user(e));
        }
    }
    receiver
        .until_delivered("the crowd", Duration::from_secs(30), |e| {
            is(e, "user.online", "crowd29")
        })
        .await;
    let seen = receiver.seen();
    assert!(seen.len() > 10, "several batches: {}", seen.len());
    assert_eq!(receiver.max_in_flight(), 1);
    for pair in seen.windows(2) {
        assert!(
            pair[1].arrived >= pair[0].answered.unwrap(),
            "a request started before the previous one was answered"
        );
    }
    drop(crowd);
    for (_, _, client) in finals {
        let _ = client.disconnect().await;
    }
    broker.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 3. Signatures during a key rotation.

#[tokio::test]
async fn signatures_verify_under_both_keys_during_a_rotation() {
    let receiver = Receiver::start().await;
    let mut config = hook(&receiver, &PRESENCE);
    config.secrets = BTreeMap::from([
        ("k1".to_string(), K1.to_string()),
        ("k2".to_string(), K2.to_string()),
    ]);
    let hooks = vec![config];
    let broker = Node::start(|c| c.webhooks = hooks).await;
    let s = receiver
        .until("a request", SECS_10, |s| s.first().cloned())
        .await;
    assert_eq!(s.header("webhook-key-ids"), "k1 k2");
    assert_eq!(s.header("webhook-signature").split(' ').count(), 2);
    let signed = SignedHeaders {
        id: s.header("webhook-id"),
        timestamp: s.header("webhook-timestamp"),
        signature: s.header("webhook-signature"),
    };
    let now = now_secs();
    let only = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
    // A receiver holding the old key, the new key, or both.
    for secrets in [
        only("k1", K1),
        only("k2", K2),
        BTreeMap::from([
            ("k1".to_string(), K1.to_string()),
            ("k2".to_string(), K2.to_string()),
        ]),
    ] {
        assert_eq!(verify(&secrets, signed, &s.body, now, 300), Ok(()));
    }
    assert_eq!(
        verify(
            &only("k3", "some-other-secret-entirely"),
            signed,
            &s.body,
            now,
            300
        ),
        Err(VerifyError::Mismatch)
    );
    let mut tampered = s.body.clone();
    let at = tampered.len() / 2;
    tampered[at] ^= 1;
    assert_eq!(
        verify(&only("k1", K1), signed, &tampered, now, 300),
        Err(VerifyError::Mismatch)
    );
    let sent: u64 = signed.timestamp.parse().unwrap();
    assert!(matches!(
        verify(&only("k1", K1), signed, &s.body, sent + 301, 300),
        Err(VerifyError::TooOld(301, 300))
    ));
    broker.stop().await;
}

#[tokio::test]
async fn presencectl_webhook_listen_verifies_and_prints_events() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut listen = tokio::process::Command::new(env!("CARGO_BIN_EXE_presencectl"))
        .args(["webhook-listen", "--listen", "127.0.0.1:0"])
        .args([
            "--secret",
            &format!("k1={K1}"),
            "--secret",
            &format!("k2={K2}"),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(listen.stderr.take().unwrap()).lines();
    let line = within(stderr.next_line()).await.unwrap().unwrap();
    let addr = line.rsplit("http://").next().unwrap().trim().to_string();
    // The broker already signs with the new key only; the receiver still holds both.
    let mut config = WebhookConfig::new(&format!("http://{addr}/any/path"), "k2", K2);
    config.linger_ms = 20;
    let broker = Node::start(|c| c.webhooks = vec![config]).await;
    let _carol = broker.connect("carol").await;
    let mut stdout = BufReader::new(listen.stdout.take().unwrap()).lines();
    let mut printed = Vec::new();
    within(async {
        while let Some(line) = stdout.next_line().await.unwrap() {
            let e: Value = serde_json::from_str(&line).unwrap();
            let done = is(&e, "user.online", "carol");
            printed.push(e);
            if done {
                break;
            }
        }
    })
    .await;
    assert_eq!(kind(&printed[0]), "server.started");
    // A request signed with a key it does not hold is refused.
    let response = reqwest::Client::new()
        .post(format!("http://{addr}/x"))
        .header("webhook-id", "msg_forged")
        .header("webhook-timestamp", now_secs().to_string())
        .header(
            "webhook-signature",
            "v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        )
        .body(r#"{"events":[]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let reason = within(stderr.next_line()).await.unwrap().unwrap();
    assert!(
        reason.contains("msg_forged") && reason.contains("no signature matches"),
        "{reason}"
    );
    broker.stop().await;
}

#[tokio::test]
async fn presencectl_admin_calls_the_api_with_escaped_paths_and_reports_errors() {
    // A stand-in for the admin API: it records what the CLI sends.
    let api = Receiver::start().await;
    api.script(&[
        Reply::Json(200, r#"{"users":[{"user":"a/b c?#%","online":true}]}"#),
        Reply::Status(204),
        Reply::Json(
            403,
            r#"{"error":{"code":"PERMISSION_DENIED","reason":"read-only key"}}"#,
        ),
    ]);
    let ctl = |args: &[&str]| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_presencectl"));
        cmd.args(["admin", "--url", &format!("http://{}/", api.addr)])
            .args(args)
            .env("PRESENCE_ADMIN_KEY", "key-from-the-environment-0123456789")
            .kill_on_drop(true);
        cmd
    };
    let out = within(ctl(&["online", "a/b c?#%", "bob"]).output())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed["users"][0]["online"], true);
    let out = within(ctl(&["kick", "a/b c?#%", "--device", "d 1"]).output())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = within(ctl(&["revoke", "bob", "--before-ms", "1234"]).output())
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("PERMISSION_DENIED"), "{stderr}");

    let seen = api.seen();
    let body = |i: usize| serde_json::from_slice::<Value>(&seen[i].body).unwrap();
    assert_eq!(seen[0].request, "POST /v1/presence:online");
    assert_eq!(body(0), serde_json::json!({"users": ["a/b c?#%", "bob"]}));
    assert_eq!(
        seen[1].request,
        "POST /v1/users/a%2Fb%20c%3F%23%25/disconnect"
    );
    assert_eq!(body(1), serde_json::json!({"device": "d 1"}));
    assert_eq!(seen[2].request, "POST /v1/users/bob/revoke");
    assert_eq!(body(2), serde_json::json!({"before_ms": 1234}));
    for s in &seen {
        assert_eq!(
            s.header("authorization"),
            "Bearer key-from-the-environment-0123456789"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 4. A flap within the grace period.

#[tokio::test]
async fn a_flap_within_the_grace_period_sends_nothing() {
    let receiver = Receiver::start().await;
    let hooks = vec![hook(
        &receiver,
        &[EventType::UserOnline, EventType::UserOffline],
    )];
    let broker = Node::start(|c| {
        c.session.grace_period_ms = 60_000;
        c.webhooks = hooks;
    })
    .await;
    let alice = broker.connect("alice").await;
    receiver
        .until_delivered("alice online", SECS_10, |e| is(e, "user.online", "alice"))
        .await;
    // Abruptly: the client's socket closes with no Disconnect (connection lost), and the same
    // device is back within the grace period.
    drop(alice);
    let alice = broker.connect("alice").await;
    within(alice.ping()).await.unwrap();
    // Events are delivered in order: once a later user's event is in, anything about the
    // flap would be too.
    let _marker = broker.connect("marker").await;
    receiver
        .until_delivered("marker online", SECS_10, |e| is(e, "user.online", "marker"))
        .await;
    let about_alice: Vec<String> = receiver
        .delivered()
        .iter()
        .filter(|e| user(e) == "alice")
        .map(|e| kind(e).to_string())
        .collect();
    assert_eq!(about_alice, ["user.online"]);
    // A clean Disconnect is reported at once, exactly once.
    within(alice.disconnect()).await.unwrap();
    receiver
        .until_delivered("alice offline", SECS_10, |e| is(e, "user.offline", "alice"))
        .await;
    let about_alice: Vec<String> = receiver
        .delivered()
        .iter()
        .filter(|e| user(e) == "alice")
        .map(|e| kind(e).to_string())
        .collect();
    assert_eq!(about_alice, ["user.online", "user.offline"]);
    broker.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 5. An outage the queue can hold loses nothing.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_outage_the_queue_can_hold_loses_nothing() {
    // Every type but user.updated (which is coalesced, by design), so every event the bus
    // numbered must arrive.
    let types: Vec<EventType> = EventType::ALL
        .into_iter()
        .filter(|t| *t != EventType::UserUpdated)
        .collect();
    let mut receiver = Receiver::start().await;
    // Every request gets a 503 until the receiver goes down.
    receiver.set_default(Reply::Status(503));
    let hooks = vec![hook(&receiver, &types)];
    let broker = Node::start(|c| {
        roomy(c);
        c.webhooks = hooks;
    })
    .await;
    // The first batch (server.started) gets a 503, then the receiver's listener is dropped:
    // connections are refused (not accepted and left hanging) for the whole outage.
    receiver
        .until("the 503", SECS_10, |s| s.first().map(|_| ()))
        .await;
    receiver.stop_accepting().await;
    receiver.set_default(Reply::Status(204));
    let down_at = Instant::now();
    receiver.assert_refusing().await;
    let seen_before = receiver.seen().len();
    assert!(
        receiver.seen().iter().all(|s| s.status == 503),
        "nothing was acknowledged before the outage"
    );

    // 500 users churn through the outage: ten waves of 50, about 2.7 s apart; in each wave
    // all connect and every other one leaves. (The pacing spreads the load over the outage;
    // nothing waits on it.)
    const OUTAGE: Duration = Duration::from_secs(30);
    let users: Vec<String> = (0..500).map(|i| format!("churn{i:03}")).collect();
    let mut staying = Vec::new();
    for (wave, group) in users.chunks(50).enumerate() {
        tokio::time::sleep_until((down_at + OUTAGE * wave as u32 * 9 / 100).into()).await;
        let clients = connect_all(&broker, group, 25).await;
        let mut i: usize = 0;
        staying.extend(
            for_each(clients, 25, move |c| {
                i += 1;
                let leave = i.is_multiple_of(2);
                async move {
                    if leave {
                        within(c.disconnect()).await.unwrap();
                        None
                    } else {
                        Some(c)
                    }
                }
            })
            .await,
        );
    }
    assert_eq!(staying.len(), 250);
    assert!(
        down_at.elapsed() < OUTAGE,
        "the churn took {:?}, longer than the outage",
        down_at.elapsed()
    );
    tokio::time::sleep_until((down_at + OUTAGE).into()).await;
    // Still refusing at the end, nothing got through, and the broker kept trying (the 503 and
    // at least one refused connection count as retries).
    receiver.assert_refusing().await;
    assert_eq!(
        receiver.seen().len(),
        seen_before,
        "a request during the outage"
    );
    let label = receiver.label();
    let l = [("endpoint", label.as_str())];
    let retries = metric(
        &broker,
        "presence_webhook_batches_total",
        &[("endpoint", &label), ("result", "retry")],
    )
    .await;
    assert!(
        retries >= Some(2.0),
        "retries during the outage: {retries:?}"
    );
    let depth = metric(&broker, "presence_webhook_queue_depth", &l).await;
    assert!(depth >= Some(1000.0), "queued during the outage: {depth:?}");
    receiver.resume().await;
    let up_at = Instant::now();

    let page = broker.bus.page(0, RECENT_EVENTS);
    let expected: Vec<&Event> = page
        .events
        .iter()
        .map(|e| &**e)
        .filter(|e| types.contains(&e.kind))
        .collect();
    assert!(expected.len() > 1000, "{} events", expected.len());
    let last_id = expected.last().unwrap().id.clone();
    // The backoff may be anywhere up to its 30 s cap when the receiver comes back.
    receiver
        .until_delivered("the last event", Duration::from_secs(75), |e| {
            e["id"] == last_id.as_str()
        })
        .await;
    eprintln!(
        "outage {:?}; {} events delivered {:?} after the receiver came back; {retries:?} retries",
        up_at - down_at,
        expected.len(),
        up_at.elapsed()
    );
    let delivered = receiver.delivered();
    let mut ids = HashSet::new();
    for e in &delivered {
        assert!(
            ids.insert(e["id"].as_str().unwrap().to_string()),
            "delivered twice: {e}"
        );
        assert_ne!(kind(e), "sync.required");
    }
    for e in &expected {
        assert!(ids.contains(&e.id), "never delivered: {e:?}");
    }
    assert_eq!(ids.len(), expected.len());
    assert_versions_never_go_down(&delivered);
    assert_eq!(
        metric(&broker, "presence_webhook_dropped_total", &l).await,
        Some(0.0)
    );
    assert_eq!(
        metric(&broker, "presence_webhook_events_delivered_total", &l).await,
        Some(expected.len() as f64)
    );
    drop(staying);
    broker.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 6. An overflowing queue reports its losses once and keeps final states.

#[tokio::test]
async fn an_overflowing_queue_keeps_final_states_and_reports_its_losses_once() {
    let receiver = Receiver::start().await;
    let mut config = hook(&receiver, &PRESENCE);
    config.queue_capacity = 1000;
    let hooks = vec![config];
    let broker = Node::start(|c| {
        roomy(c);
        c.webhooks = hooks;
    })
    .await;
    receiver
        .until_delivered("server.started", SECS_10, |e| kind(e) == "server.started")
        .await;
    // Down: every request gets a 503 (so the batch in flight is seen). The marker's event is
    // that batch; everything after waits in the queue.
    receiver.set_default(Reply::Status(503));
    let marker = broker.connect("marker").await;
    receiver
        .until("the marker's batch", SECS_10, |s| {
            s.iter()
                .any(|r| !r.ok() && r.events().iter().any(|e| user(e) == "marker"))
                .then_some(())
        })
        .await;

    // About 5000 events over 1200 users.
    let users: Vec<String> = (0..1200).map(|i| format!("u{i:04}")).collect();
    let clients = connect_all(&broker, &users, 32).await; // 1200 online
    let clients = for_each(clients, 32, |c| async move {
        within(c.set_presence(status("a"))).await.unwrap(); // 1200 updated
        within(c.set_presence(status("b"))).await.unwrap(); // 1200 updated
        Some(c)
    })
    .await;
    // Odd users stay (status b); even ones leave (600 offline); every 4th comes back with
    // status c (300 online, 300 updated) and every 8th leaves again (150 offline).
    let mut connected: HashMap<String, Client> = HashMap::new();
    let mut leaving = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        if !i.is_multiple_of(2) {
            connected.insert(users[i].clone(), c);
        } else {
            leaving.push(c);
        }
    }
    for_each(leaving, 32, |c| async move {
        within(c.disconnect()).await.unwrap();
        None
    })
    .await;
    let back: Vec<String> = (0..1200)
        .step_by(4)
        .map(|i: usize| users[i].clone())
        .collect();
    let back_clients = connect_all(&broker, &back, 32).await;
    let mut final_status: HashMap<String, &str> =
        connected.keys().map(|u| (u.clone(), "b")).collect();
    let mut leaving = Vec::new();
    for (u, c) in back.iter().zip(back_clients) {
        within(c.set_presence(status("c"))).await.unwrap();
        let i: usize = u[1..].parse().unwrap();
        if i.is_multiple_of(8) {
            leaving.push(c);
        } else {
            final_status.insert(u.clone(), "c");
            connected.insert(u.clone(), c);
        }
    }
    for_each(leaving, 32, |c| async move {
        within(c.disconnect()).await.unwrap();
        None
    })
    .await;
    final_status.insert("marker".into(), "");

    let page = broker.bus.page(0, RECENT_EVENTS);
    let published: Vec<_> = page
        .events
        .iter()
        .filter(|e| PRESENCE.contains(&e.kind))
        .collect();
    assert!(published.len() > 4900, "{} events", published.len());
    let last_id = published.last().unwrap().id.clone();
    receiver.set_default(Reply::Status(204));
    receiver
        .until_delivered("the last event", Duration::from_secs(45), |e| {
            e["id"] == last_id.as_str()
        })
        .await;

    let delivered = receiver.delivered();
    let syncs: Vec<&Value> = delivered
        .iter()
        .filter(|e| kind(e) == "sync.required")
        .collect();
    assert_eq!(syncs.len(), 1, "exactly one sync.required");
    let sync = syncs[0];
    let dropped = sync["dropped"].as_u64().unwrap();
    assert!(dropped > 0);
    assert_eq!(sync["seq"], 0);
    assert!(sync["first_lost_seq"].as_u64().unwrap() > 1);
    // It opens its batch.
    let opening = receiver
        .seen()
        .iter()
        .filter(|s| s.ok())
        .any(|s| s.events()[0]["id"] == sync["id"]);
    assert!(opening, "sync.required is first in its batch");
    let label = receiver.label();
    assert_eq!(
        metric(
            &broker,
            "presence_webhook_dropped_total",
            &[("endpoint", &label)]
        )
        .await,
        Some(dropped as f64)
    );

    // Final states: each user's last delivered event matches where it ended up.
    let mut last: HashMap<&str, &Value> = HashMap::new();
    for e in &delivered {
        if !user(e).is_empty() {
            last.insert(user(e), e);
        }
    }
    let mut unreported = 0;
    for u in users.iter().map(String::as_str).chain(["marker"]) {
        let Some(e) = last.get(u) else {
            // Every event of this user was lost: the sync.required tells the backend to
            // re-read.
            unreported += 1;
            continue;
        };
        let online = u == "marker" || connected.contains_key(u);
        match kind(e) {
            "user.offline" => assert!(!online, "{u}: offline delivered last, but online"),
            "user.online" | "user.updated" => {
                assert!(online, "{u}: {} delivered last, but offline", kind(e));
                if u != "marker" {
                    assert_eq!(
                        e["presence"]["status"], final_status[u],
                        "{u}: the latest status"
                    );
                }
            }
            other => panic!("{u}: unexpected {other}"),
        }
    }
    assert!(
        unreported as u64 <= dropped,
        "{unreported} users without events, {dropped} dropped"
    );
    assert_versions_never_go_down(&delivered);
    drop(marker);
    drop(connected);
    broker.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 7. A receiver that never answers does not slow presence fanout.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hanging_receiver_does_not_slow_fanout() {
    const WATCHERS: usize = 20;
    const CHANGES: usize = 500;
    let receiver = Receiver::start().await;
    receiver.set_default(Reply::Hang);
    let mut config = hook(&receiver, &PRESENCE);
    config.timeout_ms = 60_000;
    let broker = Node::start(|c| {
        // The publisher's 500 changes are within its publish rate limit.
        roomy(c);
        c.webhooks = vec![config];
    })
    .await;
    // The first batch (server.started) is accepted and never answered: every later event
    // waits behind it for up to a minute.
    receiver
        .until("the hanging request", SECS_10, |s| s.first().map(|_| ()))
        .await;

    let publisher = broker.connect("publisher").await;
    let names: Vec<String> = (0..WATCHERS).map(|i| format!("watcher{i:02}")).collect();
    let watchers = connect_all(&broker, &names, WATCHERS).await;
    for w in &watchers {
        within(w.subscribe(&["publisher"])).await.unwrap();
    }
    // Each watcher reads the publisher's updates until the last status, keeping the versions.
    let last_status = format!("s{}", CHANGES - 1);
    let readers: Vec<_> = watchers
        .into_iter()
        .map(|mut w| {
            let last_status = last_status.clone();
            tokio::spawn(async move {
                let mut versions = Vec::new();
                loop {
                    let e = w
                        .next_presence_event()
                        .await
                        .expect("the watcher stays connected");
                    if e.user_id != "publisher" {
                        continue;
                    }
                    versions.push(e.version);
                    if e.presence.is_some_and(|p| p.status == last_status) {
                        return (w, versions);
                    }
                }
            })
        })
        .collect();

    let started = Instant::now();
    let deadline = started + Duration::from_secs(30);
    let mut final_version = 0;
    for i in 0..CHANGES {
        let p = tokio::time::timeout_at(
            deadline.into(),
            publisher.set_presence(status(&format!("s{i}"))),
        )
        .await
        .expect("the publisher's changes are answered within 30 s")
        .unwrap();
        assert!(p.version > final_version);
        final_version = p.version;
    }
    let published_in = started.elapsed();
    let mut received = Vec::new();
    let mut kept = Vec::new();
    for (reader, name) in readers.into_iter().zip(&names) {
        let (w, versions) = tokio::time::timeout_at(deadline.into(), reader)
            .await
            .unwrap_or_else(|_| panic!("{name} has the last update within 30 s"))
            .unwrap();
        assert_eq!(versions.last(), Some(&final_version), "{name}");
        assert!(
            versions.windows(2).all(|p| p[0] < p[1]),
            "{name}: versions go up"
        );
        received.push(versions.len());
        kept.push(w);
    }
    eprintln!(
        "{CHANGES} changes published in {published_in:?}, fanned out to {WATCHERS} watchers in \
         {:?} ({}..={} updates each; fewer means coalesced)",
        started.elapsed(),
        received.iter().min().unwrap(),
        received.iter().max().unwrap()
    );

    // All the while, the one request stayed in flight, unanswered, and the events queued.
    let seen = receiver.seen();
    assert_eq!(seen.len(), 1, "one request, still waiting for its answer");
    assert!(seen[0].answered.is_none());
    assert_eq!(kind(&seen[0].events()[0]), "server.started");
    assert_eq!(receiver.in_flight(), 1);
    let label = receiver.label();
    let l = [("endpoint", label.as_str())];
    let depth = metric(&broker, "presence_webhook_queue_depth", &l)
        .await
        .unwrap_or(0.0);
    // At least the user.online of the publisher and each watcher (never coalesced).
    assert!(depth >= (WATCHERS + 1) as f64, "queue depth {depth}");
    assert_eq!(
        metric(&broker, "presence_webhook_dropped_total", &l).await,
        Some(0.0)
    );
    drop(kept);
    drop(publisher);
    broker.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 8. After a SIGKILL, the real binary's first webhook is server.started with a new epoch.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_sigkill_and_restart_the_first_webhook_is_server_started_with_a_new_epoch() {
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("webhooks.toml");
    std::fs::write(
        &config,
        format!(
            "[[webhooks]]\nurl = \"{}\"\nevents = [\"user.online\", \"user.offline\"]\n\
             linger_ms = 20\ntimeout_ms = 2000\n[webhooks.secrets]\nk1 = \"{K1}\"\n",
            receiver.url()
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap().to_string();
    let data = dir.path().join("data");
    let secrets = BTreeMap::from([("k1".to_string(), K1.to_string())]);
    let verifies = |s: &Seen| {
        let signed = SignedHeaders {
            id: s.header("webhook-id"),
            timestamp: s.header("webhook-timestamp"),
            signature: s.header("webhook-signature"),
        };
        verify(&secrets, signed, &s.body, now_secs(), 300)
    };

    let first = spawn_presenced(&data, &["--config", &config]).await;
    let started = receiver
        .until("the first server.started", SECS_10, |s| {
            s.iter()
                .filter(|r| r.ok())
                .flat_map(Seen::events)
                .find(|e| kind(e) == "server.started")
        })
        .await;
    let epoch = started["epoch"]
        .as_u64()
        .expect("server.started has an epoch");
    let alice = within(Client::connect(
        ClientOptions::new(first.addr, token("alice")).device("phone"),
    ))
    .await
    .unwrap();
    receiver
        .until_delivered("alice online", SECS_10, |e| is(e, "user.online", "alice"))
        .await;
    let Spawned { mut child, .. } = first;
    child.start_kill().unwrap(); // SIGKILL
    let exit = within(child.wait()).await.unwrap();
    assert!(!exit.success(), "killed: {exit:?}");
    drop(alice);
    let before = receiver.seen().len();

    let second = spawn_presenced(&data, &["--config", &config]).await;
    let s = receiver
        .until("the first request after the restart", SECS_10, |s| {
            s.get(before).cloned()
        })
        .await;
    let events = s.events();
    assert_eq!(kind(&events[0]), "server.started", "{events:?}");
    let new_epoch = events[0]["epoch"].as_u64().expect("an epoch");
    assert!(new_epoch > epoch, "epoch {new_epoch} after {epoch}");
    assert_ne!(events[0]["id"], started["id"]);
    assert_eq!(events[0]["seq"], 1);
    assert_eq!(verifies(&s), Ok(()));
    // The new boot goes on delivering.
    let _bob = within(Client::connect(
        ClientOptions::new(second.addr, token("bob")).device("phone"),
    ))
    .await
    .unwrap();
    receiver
        .until_delivered("bob online", SECS_10, |e| is(e, "user.online", "bob"))
        .await;
    let Spawned { mut child, .. } = second;
    child.start_kill().unwrap();
    within(child.wait()).await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// The public view (`show = "public"`, issue 15 point 4): a third party's endpoint sees what a
// stranger is shown; the backend's endpoint keeps seeing the truth.

/// `(type, user, channel occupancy)` of each delivered event about `users` (server events
/// and `sync.required` left out).
fn script_of(receiver: &Receiver, users: &[&str]) -> Vec<(String, String, Option<u64>)> {
    receiver
        .delivered()
        .iter()
        .filter(|e| users.contains(&user(e)))
        .map(|e| {
            (
                kind(e).to_string(),
                user(e).to_string(),
                e["occupancy"].as_u64(),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_public_endpoint_never_sees_a_device_invisible_on_its_own() {
    let truth = Receiver::start().await;
    let public = Receiver::start().await;
    let every = EventType::ALL;
    let mut public_hook = hook(&public, &every);
    public_hook.show = presenced::webhooks::WebhookShow::Public;
    let hooks = vec![hook(&truth, &every), public_hook];
    let broker = Node::start(|c| {
        roomy(c);
        c.webhooks = hooks;
    })
    .await;
    let phone = broker.connect("dual").await;
    phone.join("room", &[]).await.unwrap();
    // The tablet arrives invisible, joins, changes its availability: nothing a stranger sees.
    let mut options = broker.options("dual").device("tablet");
    options.invisible_device = true;
    let tablet = within(Client::connect(options)).await.unwrap();
    tablet.join("room", &[]).await.unwrap();
    within(tablet.set_presence(pb::SetPresence {
        availability: pb::Availability::Away as i32,
        ..Default::default()
    }))
    .await
    .unwrap();
    // Visible, then invisible again: it arrives and leaves like a device that connects and
    // disconnects.
    within(tablet.set_device_invisible(false)).await.unwrap();
    within(tablet.set_device_invisible(true)).await.unwrap();
    // The visible device leaves: the user leaves; the invisible one's end tells nothing.
    within(phone.disconnect()).await.unwrap();
    within(tablet.disconnect()).await.unwrap();
    let end = broker.connect("end").await;
    for receiver in [&truth, &public] {
        receiver
            .until_delivered("end online", SECS_10, |e| is(e, "user.online", "end"))
            .await;
    }
    let public_script = script_of(&public, &["dual"]);
    let s = |k: &str, o: Option<u64>| (k.to_string(), "dual".to_string(), o);
    assert_eq!(
        public_script,
        vec![
            s("user.online", None),
            s("device.connected", None),
            s("channel.occupied", Some(1)),
            s("channel.member.joined", Some(1)),
            // Visible: the device list grows, the tablet joins the room.
            s("user.updated", None),
            s("channel.member.joined", Some(1)),
            // Invisible again: it leaves the room, the device list shrinks.
            s("channel.member.left", Some(1)),
            s("user.updated", None),
            // The phone leaves: for a stranger the room empties and the user goes offline.
            s("channel.member.left", Some(0)),
            s("channel.vacated", Some(0)),
            s("device.disconnected", None),
            s("user.offline", None),
        ],
        "the public endpoint's events: {public_script:#?}"
    );
    let public_events = public.delivered();
    let devices: Vec<String> = public_events
        .iter()
        .filter(|e| user(e) == "dual")
        .filter_map(|e| e["device"].as_str().map(str::to_string))
        .collect();
    assert!(
        devices.iter().filter(|d| *d == "tablet").count() == 2,
        "the tablet shows only while visible: {devices:?}"
    );
    // The truth endpoint saw the tablet throughout.
    let truth_events = truth.delivered();
    assert!(truth_events
        .iter()
        .any(|e| is(e, "device.connected", "dual") && e["device"] == "tablet"));
    assert!(truth_events
        .iter()
        .any(|e| is(e, "device.disconnected", "dual") && e["device"] == "tablet"));
    drop(end);
    broker.stop().await;
}

#[tokio::test]
async fn a_public_endpoint_sees_what_a_stranger_sees_and_the_backend_the_truth() {
    let truth = Receiver::start().await;
    let public = Receiver::start().await;
    let every = EventType::ALL;
    let mut public_hook = hook(&public, &every);
    public_hook.show = presenced::webhooks::WebhookShow::Public;
    let hooks = vec![hook(&truth, &every), public_hook];
    let broker = Node::start(|c| {
        roomy(c);
        c.webhooks = hooks;
    })
    .await;
    let seen = broker.connect("seen").await;
    seen.join("room", &[]).await.unwrap();
    // `ghost` comes online, then goes invisible: to a stranger that reads as leaving the room
    // and disconnecting.
    let ghost = broker.connect("ghost").await;
    ghost.join("room", &[]).await.unwrap();
    within(ghost.set_invisible(true)).await.unwrap();
    // What it does while invisible never reaches the public endpoint.
    within(ghost.set_presence(status("secret"))).await.unwrap();
    ghost.leave("room").await.unwrap();
    ghost.join("attic", &[]).await.unwrap();
    // `shy` turns to approved watchers only: a stranger sees it go offline, and never sees
    // its next session at all.
    let shy = broker.connect("shy").await;
    within(shy.set_privacy(pb::Audience::Approved, pb::Audience::Everyone))
        .await
        .unwrap();
    within(shy.disconnect()).await.unwrap();
    let shy = broker.connect("shy").await;
    shy.join("room", &[]).await.unwrap();
    within(shy.set_presence(status("hidden"))).await.unwrap();
    // Back to visible: coming online and joining the attic, in that order.
    within(ghost.set_invisible(false)).await.unwrap();
    within(ghost.disconnect()).await.unwrap();
    let end = broker.connect("end").await;
    for receiver in [&truth, &public] {
        receiver
            .until_delivered("end online", SECS_10, |e| is(e, "user.online", "end"))
            .await;
    }
    let public_script = script_of(&public, &["seen", "ghost", "shy"]);
    let s = |k: &str, u: &str, o: Option<u64>| (k.to_string(), u.to_string(), o);
    assert_eq!(
        public_script,
        vec![
            s("user.online", "seen", None),
            s("device.connected", "seen", None),
            s("channel.occupied", "seen", Some(1)),
            s("channel.member.joined", "seen", Some(1)),
            s("user.online", "ghost", None),
            s("device.connected", "ghost", None),
            s("channel.member.joined", "ghost", Some(2)),
            // SetInvisible: a clean departure.
            s("channel.member.left", "ghost", Some(1)),
            s("user.offline", "ghost", None),
            s("user.online", "shy", None),
            s("device.connected", "shy", None),
            s("user.offline", "shy", None),
            // SetInvisible(false): a clean arrival, in the attic it joined meanwhile.
            s("user.online", "ghost", None),
            s("channel.occupied", "ghost", Some(1)),
            s("channel.member.joined", "ghost", Some(1)),
            // The real disconnect.
            s("channel.member.left", "ghost", Some(0)),
            s("channel.vacated", "ghost", Some(0)),
            s("device.disconnected", "ghost", None),
            s("user.offline", "ghost", None),
        ],
        "the public endpoint's events: {public_script:#?}"
    );
    let public_events = public.delivered();
    let offline: Vec<&Value> = public_events
        .iter()
        .filter(|e| is(e, "user.offline", "ghost"))
        .collect();
    assert_eq!(
        offline[0]["reason"], "disconnect",
        "invisible reads as a disconnect"
    );
    // The status set while invisible is first shown when ghost comes back, as clients see it.
    let secret: Vec<&str> = public_events
        .iter()
        .filter(|e| e.to_string().contains("secret"))
        .map(kind)
        .collect();
    assert_eq!(
        secret,
        ["user.online"],
        "nothing said while invisible leaks earlier"
    );
    // The truth endpoint saw everything, the invisible status and the shy user included.
    let truth_events = truth.delivered();
    assert!(truth_events
        .iter()
        .any(|e| is(e, "user.updated", "ghost") && e.to_string().contains("secret")));
    assert!(truth_events.iter().any(|e| is(e, "user.online", "shy")));
    assert!(truth_events
        .iter()
        .any(|e| is(e, "channel.member.joined", "shy") && e["occupancy"] == 2));
    drop((seen, shy, end));
    broker.stop().await;
}
