//! The async shell of one webhook endpoint: the [`EventSink`] the event bus feeds (a
//! non-blocking push into the endpoint's [`EventQueue`]) and the single delivery task that
//! waits for a batch (size or linger), signs it, POSTs it with one request in flight, and
//! retries it under the same `webhook-id` until a 2xx, a 410 or the age limit. The queue lock
//! is a std `Mutex` held only for synchronous queue calls, never across an `.await`.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use reqwest::header::{CONTENT_TYPE, RETRY_AFTER};
use reqwest::StatusCode;
use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::config::WebhookShow;
use super::public::PublicView;
use super::queue::{Cut, EventQueue};
use super::signing::{headers, sign_all};
use super::{names, WebhookConfig};
use crate::events::{Event, EventSink, EventType, PublicNote};
use crate::metrics::RateLimitedLog;

/// First retry waits up to this long (full jitter: a uniform pick below the ceiling).
pub(crate) const BACKOFF_BASE: Duration = Duration::from_millis(500);
/// The ceiling of the backoff doubles per attempt up to this.
pub(crate) const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// Longest `Retry-After` honoured (a longer one is cut to this).
pub(crate) const RETRY_AFTER_CAP: Duration = Duration::from_secs(300);
/// At shutdown, what is queued gets this long to be delivered (one attempt per batch).
pub(crate) const FINAL_FLUSH: Duration = Duration::from_secs(1);
/// Response body bytes read at most (so the connection can be reused); the rest is dropped.
const MAX_RESPONSE_BYTES: usize = 4096;
/// At most one failure warning per endpoint this often.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Why one attempt failed. The text never contains the URL (its query may hold a token).
#[derive(Debug, thiserror::Error)]
pub(crate) enum AttemptError {
    /// Connection refused or reset, TLS failure, timeout, ... (the error and its causes).
    #[error("{0}")]
    Transport(String),
    /// A non-2xx answer (a redirect counts: none is followed).
    #[error("HTTP {0}")]
    Status(StatusCode, Option<Duration>),
    /// 410: the receiver asks never to be called again.
    #[error("HTTP 410 Gone")]
    Gone,
}

impl AttemptError {
    /// The wait the receiver asked for (429/503 with `Retry-After` seconds), capped.
    fn retry_after(&self) -> Option<Duration> {
        match self {
            AttemptError::Status(_, after) => *after,
            _ => None,
        }
    }
}

/// What became of a batch.
#[derive(Debug, PartialEq, Eq)]
enum Fate {
    /// A 2xx.
    Delivered,
    /// Too old to retry: counted as lost.
    GaveUp,
    /// 410 Gone: the endpoint is disabled.
    Gone,
    /// Shutdown came first; the batch is still to be delivered.
    Interrupted,
}

/// Handles to one endpoint's metrics (registered once, updated with atomics).
#[derive(Debug)]
struct EndpointMetrics {
    /// Events queued ([`names::QUEUE_DEPTH`]).
    depth: metrics::Gauge,
    /// Batches acknowledged ([`names::BATCHES`] `result=ok`).
    ok: metrics::Counter,
    /// Failed attempts to be retried (`result=retry`).
    retry: metrics::Counter,
    /// Batches given up for age (`result=failed`).
    failed: metrics::Counter,
    /// 410 answers (`result=gone`).
    gone: metrics::Counter,
    /// Events acknowledged ([`names::DELIVERED`]).
    delivered: metrics::Counter,
    /// Events lost ([`names::DROPPED`]).
    dropped: metrics::Counter,
    /// `user.updated` events replaced ([`names::COALESCED`]).
    coalesced: metrics::Counter,
    /// Event to acknowledgement ([`names::DELIVERY_SECONDS`]).
    latency: metrics::Histogram,
    /// 1 once disabled ([`names::DISABLED`]).
    disabled: metrics::Gauge,
}

impl EndpointMetrics {
    fn new(label: &str) -> EndpointMetrics {
        let batches = |result: &'static str| metrics::counter!(names::BATCHES, "endpoint" => label.to_string(), "result" => result);
        let l = || label.to_string();
        EndpointMetrics {
            depth: metrics::gauge!(names::QUEUE_DEPTH, "endpoint" => l()),
            ok: batches("ok"),
            retry: batches("retry"),
            failed: batches("failed"),
            gone: batches("gone"),
            delivered: metrics::counter!(names::DELIVERED, "endpoint" => l()),
            dropped: metrics::counter!(names::DROPPED, "endpoint" => l()),
            coalesced: metrics::counter!(names::COALESCED, "endpoint" => l()),
            latency: metrics::histogram!(names::DELIVERY_SECONDS, "endpoint" => l()),
            disabled: metrics::gauge!(names::DISABLED, "endpoint" => l()),
        }
    }
}

/// What the delivery task needs besides the queue.
#[derive(Debug)]
struct Target {
    /// Where batches go (may carry userinfo or a query: never logged).
    url: reqwest::Url,
    /// Decoded keys by key id, in key id order (the signature order).
    keys: Vec<(String, Vec<u8>)>,
    /// This endpoint's client: its timeout, no redirects, no proxy from the environment.
    client: reqwest::Client,
}

/// One endpoint: its queue (shared with the bus) and its delivery settings.
#[derive(Debug)]
pub(crate) struct Endpoint {
    /// `host:port/path` of the URL: the metric label and log field (never a secret).
    label: String,
    /// The synchronous core; locked only for one queue call at a time, never across `.await`.
    queue: Mutex<EventQueue>,
    /// Woken when the queue becomes non-empty, reaches a batch, or lost events.
    wake: Notify,
    /// Most events per request.
    batch_size: usize,
    /// How long the oldest pending event waits for company.
    linger: Duration,
    /// A failing batch whose oldest event is older than this is given up.
    max_event_age_ms: u64,
    /// `None` when the endpoint could not be set up (then it is disabled from the start).
    target: Option<Target>,
    /// This endpoint's metric handles.
    metrics: EndpointMetrics,
    /// The highest event `seq` a 2xx acknowledged (cluster mode: where the next deliverer
    /// starts).
    delivered_seq: std::sync::atomic::AtomicU64,
    /// `show = "public"`: the view applied to each batch as it is cut, and the event types
    /// wanted after it (the queue then takes every type: the view may turn one into another).
    public: Option<Public>,
}

#[derive(Debug)]
struct Public {
    view: Mutex<PublicView>,
    wanted: Vec<EventType>,
}

/// `host:port/path` of `url`, without userinfo, query or fragment.
pub(crate) fn endpoint_label(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => format!(
            "{}:{}{}",
            u.host_str().unwrap_or(""),
            u.port_or_known_default().unwrap_or(0),
            u.path()
        ),
        Err(_) => "invalid-url".to_string(),
    }
}

fn target(config: &WebhookConfig) -> Result<Target, String> {
    let url = reqwest::Url::parse(&config.url).map_err(|e| format!("bad url: {e}"))?;
    let keys = config
        .secrets
        .iter()
        .map(|(kid, secret)| {
            super::signing::decode_secret(secret)
                .map(|key| (kid.clone(), key))
                .map_err(|e| format!("secret {kid}: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let timeout = Duration::from_millis(config.timeout_ms);
    let client = reqwest::Client::builder()
        .use_rustls_tls()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(timeout)
        .connect_timeout(timeout)
        .pool_max_idle_per_host(1)
        .user_agent(concat!("presenced/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("http client: {e}"))?;
    Ok(Target { url, keys, client })
}

fn lock(queue: &Mutex<EventQueue>) -> std::sync::MutexGuard<'_, EventQueue> {
    // Only queue methods run under this lock and none of them panics on purpose; if one ever
    // did, the bus (whose lock is held around `offer`) must not panic in turn, so the queue is
    // used as it is.
    queue.lock().unwrap_or_else(PoisonError::into_inner)
}

fn now_ms() -> u64 {
    crate::now_ms()
}

impl Endpoint {
    /// An endpoint for `config`; when the URL, a secret or the HTTP client is unusable it is
    /// created disabled (logged) so the broker still starts.
    pub(crate) fn new(config: &WebhookConfig) -> Endpoint {
        let label = endpoint_label(&config.url);
        let metrics = EndpointMetrics::new(&label);
        let public = (config.show == WebhookShow::Public).then(|| Public {
            view: Mutex::new(PublicView::default()),
            wanted: config.events.clone(),
        });
        let wanted = match public {
            Some(_) => EventType::ALL.to_vec(),
            None => config.events.clone(),
        };
        let mut queue = EventQueue::new(config.queue_capacity, &wanted);
        let target = match target(config) {
            Ok(t) => Some(t),
            Err(why) => {
                tracing::error!(endpoint = %label, "webhook endpoint disabled: {why}");
                queue.disable();
                None
            }
        };
        metrics
            .disabled
            .set(if target.is_some() { 0.0 } else { 1.0 });
        metrics.depth.set(0.0);
        Endpoint {
            label,
            queue: Mutex::new(queue),
            wake: Notify::new(),
            batch_size: config.batch_size.max(1),
            linger: Duration::from_millis(config.linger_ms),
            max_event_age_ms: config.max_event_age_ms,
            target,
            metrics,
            delivered_seq: std::sync::atomic::AtomicU64::new(0),
            public,
        }
    }

    /// Whether this endpoint shows the public view.
    pub(crate) fn is_public(&self) -> bool {
        self.public.is_some()
    }

    /// Public view: `user`'s privacy settings changed (queued in order with the events).
    pub(crate) fn privacy_changed(&self, user: &str, public: &PublicNote) {
        if self.public.is_some() {
            self.push(&Arc::new(super::public::marker(user, public)));
        }
    }

    /// `cut` as this endpoint shows it: unchanged for the truth; for the public view, turned
    /// into what a stranger is shown and filtered by the wanted types (`None`: nothing left,
    /// its events counted as handled).
    fn shown(&self, cut: Cut) -> Option<Cut> {
        let Some(public) = &self.public else {
            return Some(cut);
        };
        let top = cut.events.iter().map(|e| e.seq).max().unwrap_or(0);
        let events = public
            .view
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .apply(cut.events);
        let events: Vec<Arc<Event>> = events
            .into_iter()
            .filter(|e| e.kind.always() || public.wanted.contains(&e.kind))
            .collect();
        let Some(first) = events.first() else {
            // Nothing a stranger may see: handled, as far as progress goes.
            self.delivered_seq
                .fetch_max(top, std::sync::atomic::Ordering::Relaxed);
            return None;
        };
        let last_seq = events.iter().map(|e| e.seq).max().unwrap_or(0).max(top);
        Some(Cut {
            id: format!("msg_{}_{last_seq}", first.id),
            events,
        })
    }

    /// The metric label of this endpoint.
    pub(crate) fn label(&self) -> &str {
        &self.label
    }

    /// Delivers until `shutdown`, then tries what is queued once within [`FINAL_FLUSH`].
    /// Returns early when the endpoint is (or becomes) disabled.
    pub(crate) async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let Some(target) = &self.target else {
            return;
        };
        let mut jitter = Jitter::seeded(self.label.len() as u64 ^ (Arc::as_ptr(&self) as u64));
        let mut warnings = RateLimitedLog::new(WARN_EVERY);
        let mut unfinished = None;
        while let Some(cut) = self.next_cut(&shutdown).await {
            let body = encode(&cut.events);
            match self
                .deliver(target, &cut, &body, &shutdown, &mut jitter, &mut warnings)
                .await
            {
                Fate::Delivered | Fate::GaveUp => {}
                Fate::Gone => {
                    self.disable(&cut.events);
                    return;
                }
                Fate::Interrupted => {
                    unfinished = Some((cut, body));
                    break;
                }
            }
        }
        self.final_flush(target, unfinished).await;
    }

    /// Waits until a batch is due (`batch_size` events, or `linger` after the oldest pending
    /// work) and cuts it; `None` at shutdown.
    async fn next_cut(&self, shutdown: &CancellationToken) -> Option<Cut> {
        loop {
            let due = {
                let mut queue = lock(&self.queue);
                let now = Instant::now();
                match queue.pending_since() {
                    None => None,
                    Some(since) => {
                        let due = since + self.linger;
                        if queue.len() >= self.batch_size || now >= due {
                            let cut = queue.cut(self.batch_size, now, now_ms());
                            self.metrics.depth.set(queue.len() as f64);
                            drop(queue);
                            if let Some(cut) = cut.and_then(|c| self.shown(c)) {
                                return Some(cut);
                            }
                            continue;
                        }
                        Some(due)
                    }
                }
            };
            let linger = async {
                match due {
                    Some(due) => tokio::time::sleep_until(due.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = self.wake.notified() => {}
                _ = linger => {}
            }
        }
    }

    /// Sends `cut` until it is acknowledged, refused for good, too old, or shutdown comes.
    async fn deliver(
        &self,
        target: &Target,
        cut: &Cut,
        body: &Bytes,
        shutdown: &CancellationToken,
        jitter: &mut Jitter,
        warnings: &mut RateLimitedLog,
    ) -> Fate {
        let oldest_ms = cut
            .events
            .iter()
            .filter(|e| !synthetic(e))
            .map(|e| e.ts_ms)
            .min()
            .unwrap_or_else(now_ms);
        let mut attempt: u32 = 0;
        loop {
            let result = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Fate::Interrupted,
                r = self.post(target, &cut.id, body) => r,
            };
            let error = match result {
                Ok(()) => {
                    self.acknowledged(&cut.events);
                    if attempt > 0 {
                        tracing::info!(endpoint = %self.label, id = %cut.id, attempts = attempt + 1, "webhook batch delivered after retries");
                    }
                    return Fate::Delivered;
                }
                Err(AttemptError::Gone) => return Fate::Gone,
                Err(e) => e,
            };
            let age_ms = now_ms().saturating_sub(oldest_ms);
            if age_ms > self.max_event_age_ms {
                self.metrics.failed.increment(1);
                let lost = lock(&self.queue).lose(&cut.events, Instant::now());
                self.metrics.dropped.increment(lost);
                self.wake.notify_one();
                tracing::warn!(
                    endpoint = %self.label,
                    id = %cut.id,
                    events = cut.events.len(),
                    age_ms,
                    "webhook batch given up after {} attempts ({error}); a sync.required follows",
                    attempt + 1
                );
                return Fate::GaveUp;
            }
            self.metrics.retry.increment(1);
            let wait = error
                .retry_after()
                .unwrap_or_else(|| backoff(attempt, jitter));
            attempt = attempt.saturating_add(1);
            if let Some(held_back) = warnings.hit(Instant::now()) {
                tracing::warn!(
                    endpoint = %self.label,
                    id = %cut.id,
                    attempt,
                    held_back,
                    "webhook delivery failed: {error}; retrying in {wait:?}"
                );
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Fate::Interrupted,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One signed POST. Cancel-safe: dropping it abandons the request (the batch is kept by
    /// the caller and sent again with the same id).
    async fn post(&self, target: &Target, id: &str, body: &Bytes) -> Result<(), AttemptError> {
        let timestamp = now_ms() / 1000;
        let (signature, key_ids) = sign_all(&target.keys, id, timestamp, body);
        let mut response = target
            .client
            .post(target.url.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(headers::ID, id)
            .header(headers::TIMESTAMP, timestamp.to_string())
            .header(headers::SIGNATURE, signature)
            .header(headers::KEY_IDS, key_ids)
            .body(body.clone())
            .send()
            .await
            .map_err(|e| AttemptError::Transport(transport_error(e)))?;
        let status = response.status();
        let retry_after = match status {
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                // 0 would retry at once, without end: the jittered backoff decides then.
                .filter(|secs| *secs > 0)
                .map(|secs| Duration::from_secs(secs).min(RETRY_AFTER_CAP)),
            _ => None,
        };
        // Read a little of the body so the connection can be reused; drop the rest.
        let mut read = 0;
        while read <= MAX_RESPONSE_BYTES {
            match response.chunk().await {
                Ok(Some(chunk)) => read += chunk.len(),
                _ => break,
            }
        }
        drop(response);
        if status.is_success() {
            Ok(())
        } else if status == StatusCode::GONE {
            Err(AttemptError::Gone)
        } else {
            Err(AttemptError::Status(status, retry_after))
        }
    }

    /// The highest event `seq` a 2xx acknowledged.
    pub(crate) fn delivered_seq(&self) -> u64 {
        self.delivered_seq
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn acknowledged(&self, events: &[Arc<Event>]) {
        if let Some(top) = events.iter().map(|e| e.seq).max() {
            self.delivered_seq
                .fetch_max(top, std::sync::atomic::Ordering::Relaxed);
        }
        self.metrics.ok.increment(1);
        let now = now_ms();
        let mut delivered = 0;
        for event in events.iter().filter(|e| !synthetic(e)) {
            delivered += 1;
            self.metrics
                .latency
                .record(now.saturating_sub(event.ts_ms) as f64 / 1000.0);
        }
        self.metrics.delivered.increment(delivered);
    }

    /// 410 Gone: stop accepting; the batch and everything queued are lost.
    fn disable(&self, batch: &[Arc<Event>]) {
        let queued = lock(&self.queue).disable();
        let lost = batch.iter().filter(|e| !synthetic(e)).count() as u64 + queued;
        self.metrics.gone.increment(1);
        self.metrics.dropped.increment(lost);
        self.metrics.disabled.set(1.0);
        self.metrics.depth.set(0.0);
        tracing::error!(
            endpoint = %self.label,
            lost,
            "webhook endpoint answered 410 Gone: disabled until the broker restarts"
        );
    }

    /// At shutdown: the interrupted batch, then what is queued, one attempt each, all within
    /// [`FINAL_FLUSH`]. What is left is counted as lost.
    async fn final_flush(&self, target: &Target, mut unfinished: Option<(Cut, Bytes)>) {
        let deadline = tokio::time::Instant::now() + FINAL_FLUSH;
        loop {
            let (cut, body) = match unfinished.take() {
                Some(pending) => pending,
                None => {
                    let cut = lock(&self.queue).cut(self.batch_size, Instant::now(), now_ms());
                    let Some(cut) = cut else {
                        break;
                    };
                    match self.shown(cut) {
                        Some(cut) => {
                            let body = encode(&cut.events);
                            (cut, body)
                        }
                        // Nothing a stranger may see in it; more may be queued.
                        None => continue,
                    }
                }
            };
            match tokio::time::timeout_at(deadline, self.post(target, &cut.id, &body)).await {
                Ok(Ok(())) => self.acknowledged(&cut.events),
                Ok(Err(AttemptError::Gone)) => {
                    self.disable(&cut.events);
                    return;
                }
                outcome => {
                    let mut queue = lock(&self.queue);
                    let lost = cut.events.iter().filter(|e| !synthetic(e)).count() as u64
                        + queue.disable();
                    drop(queue);
                    self.metrics.dropped.increment(lost);
                    self.metrics.depth.set(0.0);
                    let why = match outcome {
                        Ok(Err(e)) => e.to_string(),
                        _ => "out of time".to_string(),
                    };
                    tracing::warn!(endpoint = %self.label, lost, "webhook events not delivered at shutdown: {why}");
                    return;
                }
            }
        }
        self.metrics.depth.set(0.0);
    }
}

impl EventSink for Endpoint {
    fn offer(&self, event: &Arc<Event>) {
        match &event.public {
            // What a stranger was shown is for the public view only.
            Some(_) if self.public.is_none() => self.push(&Arc::new(Event {
                public: None,
                ..(**event).clone()
            })),
            _ => self.push(event),
        }
    }
}

impl Endpoint {
    fn push(&self, event: &Arc<Event>) {
        let pushed = lock(&self.queue).push(event, Instant::now());
        if !pushed.queued {
            return;
        }
        self.metrics.depth.set(pushed.depth as f64);
        if pushed.dropped > 0 {
            self.metrics.dropped.increment(pushed.dropped);
        }
        if pushed.coalesced {
            self.metrics.coalesced.increment(1);
        }
        // The task needs waking only when work appears or a batch is full; in between it
        // sleeps until its linger deadline.
        if pushed.depth == 1 || pushed.depth >= self.batch_size || pushed.dropped > 0 {
            self.wake.notify_one();
        }
    }
}

/// `e` and its causes on one line, without the URL (its query may hold a token).
fn transport_error(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut text = if e.is_timeout() {
        "timed out".to_string()
    } else {
        e.to_string()
    };
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A `sync.required` made by the queue (not numbered by the bus).
fn synthetic(event: &Event) -> bool {
    event.kind == EventType::SyncRequired && event.seq == 0
}

/// `{"events":[...]}`.
pub(crate) fn encode(events: &[Arc<Event>]) -> Bytes {
    struct Events<'a>(&'a [Arc<Event>]);
    impl Serialize for Events<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.collect_seq(self.0.iter().map(|e| &**e))
        }
    }
    #[derive(Serialize)]
    struct Body<'a> {
        events: Events<'a>,
    }
    // An `Event` is strings, numbers and string maps: serializing it cannot fail.
    let json = serde_json::to_vec(&Body {
        events: Events(events),
    })
    .expect("events serialize to JSON");
    Bytes::from(json)
}

/// The wait before retry number `attempt + 1`: uniform in `[0, min(cap, base · 2^attempt)]`.
pub(crate) fn backoff(attempt: u32, jitter: &mut Jitter) -> Duration {
    let base = BACKOFF_BASE.as_millis() as u64;
    let cap = BACKOFF_CAP.as_millis() as u64;
    let ceiling = base.saturating_mul(1u64 << attempt.min(20)).min(cap);
    Duration::from_millis(jitter.below(ceiling + 1))
}

/// xorshift64*: jitter for retries, seeded from the clock (no `rand` dependency).
#[derive(Debug)]
pub(crate) struct Jitter(u64);

impl Jitter {
    /// Seeded from the time and `salt` (never zero).
    pub(crate) fn seeded(salt: u64) -> Jitter {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Jitter((nanos ^ salt.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform-ish in `[0, n)`; 0 when `n` is 0.
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::EventBus;

    #[test]
    fn labels_keep_host_port_and_path_only() {
        assert_eq!(
            endpoint_label("https://user:pw@hooks.example.com/in/presence?token=s3cret#x"),
            "hooks.example.com:443/in/presence"
        );
        assert_eq!(endpoint_label("http://127.0.0.1:8080"), "127.0.0.1:8080/");
        assert_eq!(endpoint_label("http://[::1]:9/h"), "[::1]:9/h");
        assert_eq!(endpoint_label("nonsense"), "invalid-url");
    }

    #[test]
    fn backoff_stays_under_the_doubling_ceiling_and_the_cap() {
        let mut j = Jitter::seeded(7);
        for attempt in 0..40 {
            let ceiling = (500u64 << attempt.min(20)).min(30_000);
            for _ in 0..50 {
                let d = backoff(attempt, &mut j).as_millis() as u64;
                assert!(d <= ceiling, "attempt {attempt}: {d} > {ceiling}");
            }
        }
        // Jitter spreads: not every pick is the same.
        let picks: std::collections::BTreeSet<u64> = (0..20)
            .map(|_| backoff(5, &mut j).as_millis() as u64)
            .collect();
        assert!(picks.len() > 10);
    }

    #[test]
    fn the_bus_feeds_the_queue_through_the_sink() {
        let mut config = WebhookConfig::new("http://127.0.0.1:1/h", "k1", "0123456789abcdef");
        config.queue_capacity = 10;
        let endpoint = Arc::new(Endpoint::new(&config));
        let bus = EventBus::new(0xabc, None, vec![endpoint.clone()]);
        bus.publish(Event::bare(EventType::UserOnline, Some("a".into()), 1));
        bus.publish(Event::bare(EventType::UserUpdated, Some("a".into()), 2));
        let cut = lock(&endpoint.queue).cut(10, Instant::now(), 0).unwrap();
        let kinds: Vec<_> = cut.events.iter().map(|e| e.kind).collect();
        // user.updated is not in the default filter.
        assert_eq!(kinds, vec![EventType::ServerStarted, EventType::UserOnline]);
        assert_eq!(cut.id, "msg_abc-1_2");
        let body: serde_json::Value = serde_json::from_slice(&encode(&cut.events)).unwrap();
        assert_eq!(body["events"][0]["type"], "server.started");
        assert_eq!(body["events"][1]["user"], "a");
    }

    #[tokio::test]
    async fn a_failed_attempt_is_described_without_the_url() {
        // Port 1 on loopback: nothing listens, the connection is refused.
        let config = WebhookConfig::new(
            "http://user:pw@127.0.0.1:1/h?token=s3cret",
            "k1",
            "0123456789abcdef",
        );
        let endpoint = Endpoint::new(&config);
        let target = endpoint.target.as_ref().unwrap();
        let error = endpoint
            .post(target, "msg_x", &Bytes::from_static(b"{}"))
            .await
            .unwrap_err();
        let text = error.to_string();
        assert!(matches!(error, AttemptError::Transport(_)), "{text}");
        assert!(!text.contains("s3cret") && !text.contains("pw"), "{text}");
        assert!(text.to_lowercase().contains("refused"), "{text}");
    }

    #[test]
    fn an_unusable_endpoint_starts_disabled() {
        let config = WebhookConfig::new("http://127.0.0.1:1/h", "k1", "whsec_!!!!!!!!!!!!!!!!");
        let endpoint = Endpoint::new(&config);
        assert!(endpoint.target.is_none());
        endpoint.offer(&Arc::new(Event::bare(EventType::ServerStarted, None, 0)));
        assert_eq!(lock(&endpoint.queue).len(), 0);
    }
}
