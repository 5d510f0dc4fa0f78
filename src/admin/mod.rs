//! The admin HTTP API for the application's backend: axum on its own listener, off until a
//! key is configured. This file owns the shell: the listener and shutdown, key checks
//! (constant time, scoped read/write), the per-key rate limit, the body cap and the JSON error
//! shape (`{"error": {"code", "code_number", "reason"}}` with the wire protocol's error codes).
//! The operations themselves are in `routes`.

mod config;
mod routes;

pub use routes::{MAX_EVENTS_PAGE, MAX_OCCUPANCY_CHANNELS, MAX_ONLINE_USERS, MAX_QUERY_USERS};

pub use config::{AdminConfig, AdminKey, Scope, MIN_KEY_BYTES};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::command::{RequestError, TokenBucket};
use crate::connection::ConnectionContext;
use crate::events::EventBus;
use crate::pb;

/// Largest request body, in bytes.
pub const MAX_BODY_BYTES: usize = 256 * 1024;

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
    /// Checks the bearer key (constant time, every key compared), its scope and its rate.
    /// Returns the key's name.
    pub(crate) fn authorize(&self, headers: &HeaderMap, needs: Scope) -> Result<String, ApiError> {
        let unauthorized = |reason: &str| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                pb::ErrorCode::Unauthenticated,
                reason,
            )
        };
        let presented = headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| unauthorized("missing Authorization: Bearer <admin key>"))?
            .as_bytes();
        let secret = presented
            .strip_prefix(b"Bearer ")
            .ok_or_else(|| unauthorized("Authorization must be Bearer <admin key>"))?;
        let digest: [u8; 32] = Sha256::digest(secret).into();
        // Every key is compared, whichever matches, so timing says nothing about which.
        let mut found: Option<&Key> = None;
        for key in &self.keys {
            if bool::from(key.digest.ct_eq(&digest)) {
                found = Some(key);
            }
        }
        let key = found.ok_or_else(|| {
            metrics::counter!(crate::metrics::ADMIN_AUTH_FAILURES).increment(1);
            unauthorized("unknown admin key")
        })?;
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
        Ok(key.name.clone())
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

    /// Serves until `shutdown` is cancelled.
    pub async fn serve(self, shutdown: CancellationToken) {
        let app = routes::router(self.state);
        tracing::info!(addr = ?self.listener.local_addr().ok(), "admin API listening");
        let result = axum::serve(self.listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = result {
            tracing::error!("admin API stopped: {e}");
        }
    }
}
