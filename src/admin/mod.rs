//! The admin HTTP API for the application's backend: axum on its own listener, off until a
//! key is configured. This file owns the shell: its accept loop (at most `max_connections`
//! connections, headers within `request_timeout_ms` and `MAX_HEADER_BYTES`, shutdown bounded by
//! `SHUTDOWN_GRACE`), key checks on the headers before any body is read (constant time, scoped
//! read/write), the per-key rate limit and in-flight cap, the body cap and deadline, and the
//! JSON error shape (`{"error": {"code", "code_number", "reason"}}` with the wire protocol's
//! error codes). The operations themselves are in `routes`.

mod config;
mod routes;

pub use routes::{
    MAX_EVENTS_PAGE, MAX_EVENTS_PAGE_BYTES, MAX_OCCUPANCY_CHANNELS, MAX_ONLINE_USERS,
    MAX_QUERY_USERS,
};

pub use config::{AdminConfig, AdminKey, Scope, MIN_KEY_BYTES};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::command::{RequestError, TokenBucket};
use crate::connection::ConnectionContext;
use crate::events::EventBus;
use crate::pb;

/// Largest request body, in bytes.
pub const MAX_BODY_BYTES: usize = 256 * 1024;
/// Most bytes of headers buffered per connection (beyond: 431).
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// At shutdown, open requests get this long to finish before connections are dropped.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// An API error: an HTTP status, a wire-protocol error code and a reason naming the field.
#[derive(Debug, Clone)]
pub struct ApiError {
    status: StatusCode,
    code: pb::ErrorCode,
    reason: String,
    retry_after_secs: Option<u64>,
}

impl ApiError {
    /// An error with a status, code and reason.
    pub fn new(status: StatusCode, code: pb::ErrorCode, reason: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            reason: reason.into(),
            retry_after_secs: None,
        }
    }

    /// 400 BAD_REQUEST.
    pub fn bad(reason: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, pb::ErrorCode::BadRequest, reason)
    }
}

/// The code's name without the `ERROR_CODE_` prefix, e.g. `TOO_MANY_IDS`.
pub fn code_name(code: pb::ErrorCode) -> &'static str {
    let name = code.as_str_name();
    name.strip_prefix("ERROR_CODE_").unwrap_or(name)
}

impl From<RequestError> for ApiError {
    fn from(e: RequestError) -> ApiError {
        let status = match e.code {
            pb::ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            pb::ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            pb::ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            pb::ErrorCode::NotConnected | pb::ErrorCode::NotFound => StatusCode::NOT_FOUND,
            _ => StatusCode::BAD_REQUEST,
        };
        let retry = (e.retry_after_ms > 0).then(|| e.retry_after_ms.div_ceil(1000));
        ApiError {
            status,
            code: e.code,
            reason: e.reason,
            retry_after_secs: retry,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": {
                "code": code_name(self.code),
                "code_number": self.code as i32,
                "reason": self.reason,
            }
        });
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after_secs {
            if let Ok(v) = HeaderValue::from_str(&secs.max(1).to_string()) {
                response.headers_mut().insert("retry-after", v);
            }
        }
        response
    }
}

/// One configured key: its name, the SHA-256 of its secret, and its scope.
#[derive(Debug)]
struct Key {
    name: String,
    digest: [u8; 32],
    scope: Scope,
    /// Requests of this key being served (long-polls included).
    in_flight: Arc<Semaphore>,
}

/// What every handler shares.
#[derive(Debug)]
pub(crate) struct AdminState {
    pub(crate) ctx: Arc<ConnectionContext>,
    pub(crate) events: Arc<EventBus>,
    keys: Vec<Key>,
    buckets: Mutex<HashMap<String, TokenBucket>>,
    config: AdminConfig,
}

impl AdminState {
    /// Checks the bearer key (constant time, every key compared), its scope, its rate and
    /// its requests in flight. Returns the key's name and its in-flight permit, held until
    /// the answer is made.
    pub(crate) fn authorize(
        &self,
        headers: &HeaderMap,
        needs: Scope,
    ) -> Result<(String, OwnedSemaphorePermit), ApiError> {
        let unauthorized = |reason: &str| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                pb::ErrorCode::Unauthenticated,
                reason,
            )
        };
        let failed = |reason: &str| {
            metrics::counter!(crate::metrics::ADMIN_AUTH_FAILURES).increment(1);
            unauthorized(reason)
        };
        let presented = headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| failed("missing Authorization: Bearer <admin key>"))?
            .as_bytes();
        let secret = presented
            .strip_prefix(b"Bearer ")
            .ok_or_else(|| failed("Authorization must be Bearer <admin key>"))?;
        let digest: [u8; 32] = Sha256::digest(secret).into();
        // Every key is compared, whichever matches, so timing says nothing about which.
        let mut found: Option<&Key> = None;
        for key in &self.keys {
            if bool::from(key.digest.ct_eq(&digest)) {
                found = Some(key);
            }
        }
        let key = found.ok_or_else(|| failed("unknown admin key"))?;
        if needs == Scope::Write && key.scope != Scope::Write {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                pb::ErrorCode::PermissionDenied,
                format!(
                    "key {:?} has scope read; this operation needs write",
                    key.name
                ),
            ));
        }
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let bucket = buckets
            .entry(key.name.clone())
            .or_insert_with(|| TokenBucket::new(self.config.rate_per_sec, self.config.burst, now));
        if let Err(wait) = bucket.take(now) {
            let mut e = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                pb::ErrorCode::RateLimited,
                format!(
                    "key {:?} exceeded {} requests/s (burst {})",
                    key.name, self.config.rate_per_sec, self.config.burst
                ),
            );
            e.retry_after_secs = Some(wait.as_millis().div_ceil(1000) as u64);
            return Err(e);
        }
        drop(buckets);
        let permit = key.in_flight.clone().try_acquire_owned().map_err(|_| {
            let mut e = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                pb::ErrorCode::RateLimited,
                format!(
                    "key {:?} has {} requests in flight (admin.max_in_flight_per_key)",
                    key.name, self.config.max_in_flight_per_key
                ),
            );
            e.retry_after_secs = Some(1);
            e
        })?;
        Ok((key.name.clone(), permit))
    }

    /// The configuration of the API.
    pub(crate) fn config(&self) -> &AdminConfig {
        &self.config
    }
}

/// A bound, not yet serving admin API.
#[derive(Debug)]
pub struct AdminApi {
    listener: TcpListener,
    state: Arc<AdminState>,
}

fn state(config: &AdminConfig, ctx: Arc<ConnectionContext>, events: Arc<EventBus>) -> AdminState {
    let keys = config
        .keys
        .iter()
        .map(|(name, k)| Key {
            name: name.clone(),
            digest: Sha256::digest(k.key.as_bytes()).into(),
            scope: k.scope,
            in_flight: Arc::new(Semaphore::new(config.max_in_flight_per_key)),
        })
        .collect();
    AdminState {
        ctx,
        events,
        keys,
        buckets: Mutex::new(HashMap::new()),
        config: config.clone(),
    }
}

/// The API's router without a listener, for the `admin_api` fuzz target.
#[doc(hidden)]
pub fn router_for_fuzzing(
    config: &AdminConfig,
    ctx: Arc<ConnectionContext>,
    events: Arc<EventBus>,
) -> axum::Router {
    routes::router(Arc::new(state(config, ctx, events)))
}

impl AdminApi {
    /// Binds `config.listen`. `None` when no key is configured (the API is off).
    pub async fn bind(
        config: &AdminConfig,
        ctx: Arc<ConnectionContext>,
        events: Arc<EventBus>,
    ) -> std::io::Result<Option<AdminApi>> {
        if !config.enabled() {
            return Ok(None);
        }
        let listener = TcpListener::bind(config.listen).await?;
        Ok(Some(AdminApi {
            listener,
            state: Arc::new(state(config, ctx, events)),
        }))
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves until `shutdown` is cancelled; then open requests get `SHUTDOWN_GRACE`.
    pub async fn serve(self, shutdown: CancellationToken) {
        let app = routes::router(self.state.clone());
        let connections = Arc::new(Semaphore::new(self.state.config.max_connections));
        let tasks = tokio_util::task::TaskTracker::new();
        tracing::info!(addr = ?self.listener.local_addr().ok(), "admin API listening");
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                a = self.listener.accept() => a,
            };
            let (stream, _peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: pause rather than spin.
                    tracing::warn!("admin API accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = connections.clone().try_acquire_owned() else {
                metrics::counter!(crate::metrics::ADMIN_REQUESTS, "status" => "refused_connection")
                    .increment(1);
                drop(stream);
                continue;
            };
            let service = hyper_util::service::TowerToHyperService::new(app.clone());
            let timeout = Duration::from_millis(self.state.config.request_timeout_ms);
            let shutdown = shutdown.clone();
            tasks.spawn(async move {
                let _permit = permit;
                let _ = stream.set_nodelay(true);
                let mut builder = hyper::server::conn::http1::Builder::new();
                builder
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(timeout)
                    .max_buf_size(MAX_HEADER_BYTES)
                    .keep_alive(true);
                let connection =
                    builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                tokio::pin!(connection);
                tokio::select! {
                    _ = connection.as_mut() => {}
                    _ = shutdown.cancelled() => {
                        connection.as_mut().graceful_shutdown();
                        let _ = tokio::time::timeout(SHUTDOWN_GRACE, connection).await;
                    }
                }
            });
        }
        tasks.close();
        let _ = tokio::time::timeout(SHUTDOWN_GRACE * 2, tasks.wait()).await;
    }
}
