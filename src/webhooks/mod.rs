//! Signed webhooks: each `[[webhooks]]` endpoint gets a bounded event queue (fed by the
//! `EventBus` without blocking) and one delivery task that batches, signs (Standard Webhooks)
//! and POSTs with one request in flight, retrying with jittered backoff. This module owns the
//! endpoint lifecycle and the metric names; it never touches the registry or a client socket.
//!
//! | file | owns |
//! |---|---|
//! | `config.rs` | `WebhookConfig`: settings, defaults, validation |
//! | `queue.rs` | the synchronous queue: filter, coalescing, full-queue policy, loss accounting, batches |
//! | `signing.rs` | Standard Webhooks `sign` / `verify` (public: receivers use it) |
//! | `delivery.rs` | the async shell: the `EventSink`, the delivery task, retries, shutdown flush |
//! | `public.rs` | the public view (`show = "public"`): what a stranger is shown, for third parties |
//!
//! # Delivery contract
//! - **Batches**: `POST <url>` with `{"events":[...]}` (the JSON of [`Event`]), at most
//!   `batch_size` events, sent when that many are queued or `linger_ms` after the oldest one
//!   arrived. One request in flight per endpoint, so each user's events arrive in version
//!   order; delivery is at-least-once: dedupe on `webhook-id` (per batch) or the event `id`.
//! - **Signing**: `webhook-id` (fixed when the batch is cut: `msg_<first event id>_<last
//!   seq>`, the same on every retry), `webhook-timestamp` (unix seconds of this attempt),
//!   `webhook-signature` (`v1,<base64>` per configured key, space-separated, so keys can
//!   rotate) and `webhook-key-ids` (the key ids in signature order). Receivers check with
//!   [`verify`]; its tolerance for clock skew and replays is [`DEFAULT_TOLERANCE_SECS`] (300 s).
//! - **Retries**: 2xx acknowledges. 429 and 503 wait `Retry-After` seconds (at most 5 min;
//!   an HTTP-date or a missing value falls back to the backoff);
//!   any other status (redirects are not followed), connection errors and timeouts retry the
//!   same batch after a full-jitter exponential backoff (0.5 s doubling to 30 s). After a
//!   failed attempt, a batch whose oldest event is older than `max_event_age_ms` is given up:
//!   its events count as dropped and a `sync.required` opens the next batch. 410 Gone disables
//!   the endpoint until restart (its queued events count as dropped).
//! - **Full queue** (`queue_capacity`, never blocking the bus): a pending `user.updated` is
//!   always replaced by a newer one of the same user (not a loss). When full, the queue keeps
//!   only the newest event of each subject (`Event::subject_key`: the user, or the channel for
//!   channel.occupied/vacated); if that is not enough, the oldest events go (a pending
//!   `server.started` is kept). Both count as dropped.
//! - **`sync.required`**: after any loss, the next batch starts with one `sync.required` with
//!   `dropped` (events lost since the previous `sync.required`) and `first_lost_seq` (the
//!   lowest `seq` lost). It is made by the endpoint's queue, not the bus, so it has **`seq`
//!   0** (it is not part of the bus's numbering, and a consumer tracking the highest `seq`
//!   must skip it) and the id `<id of the first lost event>-sync-<n>`, `n` counting this
//!   endpoint's `sync.required` events: unique, and tied to the boot through that event's id.
//!   `server.started` and `sync.required` pass every `events` filter.
//! - **Shutdown**: on cancel, what is queued (and a batch being retried) gets one attempt each
//!   within about 1 s; the rest is counted as dropped.

mod config;
mod delivery;
#[doc(hidden)]
pub mod public;
mod queue;
mod signing;

pub use config::{WebhookConfig, WebhookShow};
pub use signing::{
    decode_secret, headers, sign, sign_all, verify, SecretError, SignedHeaders, VerifyError,
    DEFAULT_TOLERANCE_SECS, SECRET_PREFIX,
};

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

#[cfg(doc)]
use crate::events::Event;
use crate::events::{EventSink, PublicNote};

/// Metric names (all labelled `endpoint` = the URL's `host:port/path`).
pub mod names {
    /// Events queued, per endpoint (gauge).
    pub const QUEUE_DEPTH: &str = "presence_webhook_queue_depth";
    /// Batches by `result`: `ok` (2xx), `retry` (a failed attempt), `failed` (given up),
    /// `gone` (410).
    pub const BATCHES: &str = "presence_webhook_batches_total";
    /// Events acknowledged by a 2xx (a `sync.required` made by the queue is not counted).
    pub const DELIVERED: &str = "presence_webhook_events_delivered_total";
    /// Events lost: compacted or dropped from a full queue, given up, or discarded by a 410.
    pub const DROPPED: &str = "presence_webhook_dropped_total";
    /// Pending `user.updated` events replaced by a newer one of the same user (not a loss).
    pub const COALESCED: &str = "presence_webhook_coalesced_total";
    /// From an event's `ts_ms` to the 2xx that acknowledged it.
    pub const DELIVERY_SECONDS: &str = "presence_webhook_delivery_seconds";
    /// 1 once the endpoint is disabled (410 Gone, or an unusable configuration), else 0.
    pub const DISABLED: &str = "presence_webhook_disabled";
}

/// Describes the webhook metrics to the installed recorder (`metrics::install` calls it).
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(names::QUEUE_DEPTH, "Events queued for a webhook endpoint");
    describe_counter!(
        names::BATCHES,
        "Webhook batches by result (ok, retry, failed, gone)"
    );
    describe_counter!(
        names::DELIVERED,
        "Events acknowledged by a webhook endpoint"
    );
    describe_counter!(
        names::DROPPED,
        "Events a webhook endpoint lost (full queue, given up, gone)"
    );
    describe_counter!(
        names::COALESCED,
        "Pending user.updated events replaced by a newer one"
    );
    describe_histogram!(
        names::DELIVERY_SECONDS,
        Unit::Seconds,
        "From an event to the webhook 2xx that acknowledged it"
    );
    describe_gauge!(names::DISABLED, "1 when a webhook endpoint is disabled");
}

/// Each endpoint's delivery progress; a cheap clone.
#[derive(Debug, Clone)]
pub struct Progress {
    endpoints: Vec<Arc<delivery::Endpoint>>,
}

impl Progress {
    /// Per endpoint, in configuration order: its label and the highest event `seq` a 2xx
    /// acknowledged (0: none yet).
    pub fn delivered(&self) -> Vec<(String, u64)> {
        self.endpoints
            .iter()
            .map(|e| (e.label().to_string(), e.delivered_seq()))
            .collect()
    }
}

/// The endpoints that show the public view; a cheap clone.
#[derive(Debug, Clone)]
pub struct PublicEndpoints {
    endpoints: Vec<Arc<delivery::Endpoint>>,
}

impl PublicEndpoints {
    /// `user`'s invisibility or audiences changed, and `public` is what a stranger is shown
    /// of them now: each endpoint is told of a flip, in order with the events. Never blocks
    /// (a queue push); in cluster mode call it only on the delivering node.
    pub fn privacy_changed(&self, user: &str, public: &PublicNote) {
        for e in &self.endpoints {
            e.privacy_changed(user, public);
        }
    }
}

/// Every configured endpoint's queue and delivery task. Create it after the metrics recorder
/// is installed (`Server::bind` does so first): each endpoint registers its metric handles
/// once, in [`Webhooks::new`].
#[derive(Debug)]
pub struct Webhooks {
    endpoints: Vec<Arc<delivery::Endpoint>>,
}

impl Webhooks {
    /// Queues for `configs` (validated by `Config::validate`); the sinks go to the
    /// `EventBus`, [`Webhooks::run`] delivers. An endpoint whose URL or secret cannot be used
    /// is logged and created disabled.
    pub fn new(configs: &[WebhookConfig]) -> (Webhooks, Vec<Arc<dyn EventSink>>) {
        let endpoints: Vec<Arc<delivery::Endpoint>> = configs
            .iter()
            .map(|c| Arc::new(delivery::Endpoint::new(c)))
            .collect();
        let sinks = endpoints
            .iter()
            .map(|e| e.clone() as Arc<dyn EventSink>)
            .collect();
        (Webhooks { endpoints }, sinks)
    }

    /// A handle that reads each endpoint's delivery progress while [`Webhooks::run`] runs
    /// (cluster mode records it, so the next deliverer starts where this one stopped).
    pub fn progress(&self) -> Progress {
        Progress {
            endpoints: self.endpoints.clone(),
        }
    }

    /// The endpoints that show the public view (`show = "public"`); `None` when there are
    /// none. Tell it of every privacy settings change ([`PublicEndpoints::privacy_changed`]).
    pub fn public_endpoints(&self) -> Option<PublicEndpoints> {
        let endpoints: Vec<_> = self
            .endpoints
            .iter()
            .filter(|e| e.is_public())
            .cloned()
            .collect();
        (!endpoints.is_empty()).then_some(PublicEndpoints { endpoints })
    }

    /// The metric labels of the endpoints, in configuration order.
    pub fn endpoint_labels(&self) -> Vec<String> {
        self.endpoints
            .iter()
            .map(|e| e.label().to_string())
            .collect()
    }

    /// Delivers until `shutdown` is cancelled, then gives what is queued about 1 s and
    /// returns. Each endpoint's delivery runs in its own task, owned by this future: dropping
    /// it aborts them all at once (without the final flush).
    pub async fn run(self, shutdown: CancellationToken) {
        let mut tasks = tokio::task::JoinSet::new();
        for endpoint in self.endpoints {
            tasks.spawn(endpoint.run(shutdown.clone()));
        }
        while let Some(done) = tasks.join_next().await {
            if let Err(e) = done {
                // A panic in one endpoint's task must not take the others down.
                tracing::error!("a webhook delivery task failed: {e}");
            }
        }
        // Endpoints that were disabled return early; the contract is to run until shutdown.
        shutdown.cancelled().await;
    }
}
