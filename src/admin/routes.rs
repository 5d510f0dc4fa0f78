//! The admin API's operations, versioned under `/v1`: presence query and online check,
//! channel members and occupancy, where-now, disconnect, token revocation, presence on a
//! user's behalf, subscriptions on a user's behalf, privacy on a user's behalf (invisibility,
//! blocks, audiences and approvals: the backend reads and sets the truth; the reads take an
//! optional `viewer` to answer as a user or a stranger is shown it), and the event replay
//! long-poll. Each
//! handler checks its key first, then parses the body strictly (unknown fields refused, the
//! reason names the field) and validates ids with the same rules and caps as the wire
//! protocol.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{AdminState, ApiError, Scope, MAX_BODY_BYTES};
use crate::cluster::forward::ForwardError;
use crate::command::{self, RequestError};
use crate::config::LimitsConfig;
use crate::events::PresenceJson;
use crate::model::check_user_id;
use crate::pb;
use crate::privacy::Viewer;
use crate::registry::AdminError;
use crate::store::LoggedOp;

/// Most users per presence query.
pub const MAX_QUERY_USERS: u32 = 500;
/// Most users per online check.
pub const MAX_ONLINE_USERS: u32 = 1_000;
/// Most channels per occupancy query.
pub const MAX_OCCUPANCY_CHANNELS: usize = 100;

type Shared = State<Arc<AdminState>>;
type Reply = Result<Json<Value>, ApiError>;

pub(super) fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/v1/presence:query", post(presence_query))
        .route("/v1/presence:online", post(presence_online))
        .route("/v1/channels:occupancy", post(channels_occupancy))
        .route("/v1/channels/{channel}/members", get(channel_members))
        .route("/v1/users/{user}/channels", get(where_now))
        .route("/v1/users/{user}/disconnect", post(disconnect))
        .route("/v1/users/{user}/revoke", post(revoke))
        .route("/v1/users/{user}/presence", post(set_presence))
        .route(
            "/v1/users/{user}/subscriptions",
            post(change_subscriptions).get(list_subscriptions),
        )
        .route(
            "/v1/users/{user}/privacy",
            get(get_privacy).post(set_privacy),
        )
        .route("/v1/users/{user}/invisible", post(set_invisible))
        .route(
            "/v1/users/{user}/blocks",
            post(change_blocks).get(list_blocks),
        )
        .route(
            "/v1/users/{user}/approvals",
            post(change_approvals).get(list_approvals),
        )
        .route("/v1/events", get(events))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard))
        .layer(axum::middleware::from_fn(count))
        .with_state(state)
}

/// The scope an operation needs: reads are GETs and the three POST queries.
fn scope_for(method: &axum::http::Method, path: &str) -> Scope {
    let query = matches!(
        path,
        "/v1/presence:query" | "/v1/presence:online" | "/v1/channels:occupancy"
    );
    if method == axum::http::Method::POST && !query {
        Scope::Write
    } else {
        Scope::Read
    }
}

/// Checks the key on the headers alone, before any body is read (an unauthenticated peer
/// never gets its body buffered), then reads the body within `BODY_TIMEOUT` and the size cap.
/// The key's in-flight permit is held until the answer is made.
async fn guard(
    State(state): Shared,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let needs = scope_for(request.method(), request.uri().path());
    let permit = match state.authorize(request.headers(), needs) {
        Ok((_, permit)) => permit,
        Err(e) => return e.into_response(),
    };
    let (parts, body) = request.into_parts();
    let body_timeout = Duration::from_millis(state.config().request_timeout_ms);
    let bytes = match tokio::time::timeout(body_timeout, axum::body::to_bytes(body, MAX_BODY_BYTES))
        .await
    {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(_)) => {
            return ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                pb::ErrorCode::LimitExceeded,
                format!("the body exceeds {MAX_BODY_BYTES} bytes, or could not be read"),
            )
            .into_response()
        }
        Err(_) => {
            return ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                pb::ErrorCode::BadRequest,
                format!("the body did not arrive within {body_timeout:?}"),
            )
            .into_response()
        }
    };
    let response = next
        .run(axum::extract::Request::from_parts(
            parts,
            axum::body::Body::from(bytes),
        ))
        .await;
    drop(permit);
    response
}

/// Counts every request by its answer's status, and gives every error the JSON shape: the
/// framework's own refusals (405, a path that does not decode, ...) come as plain text.
async fn count(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let response = next.run(request).await;
    let status = response.status();
    metrics::counter!(crate::metrics::ADMIN_REQUESTS, "status" => status.as_str().to_string())
        .increment(1);
    let is_json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if status.is_success() || is_json {
        return response;
    }
    let text = axum::body::to_bytes(response.into_body(), 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let reason = if text.is_empty() {
        status.canonical_reason().unwrap_or("refused").to_string()
    } else {
        text
    };
    let code = match status {
        StatusCode::TOO_MANY_REQUESTS => pb::ErrorCode::RateLimited,
        StatusCode::PAYLOAD_TOO_LARGE => pb::ErrorCode::LimitExceeded,
        s if s.is_server_error() => pb::ErrorCode::Internal,
        _ => pb::ErrorCode::BadRequest,
    };
    axum::response::IntoResponse::into_response(ApiError::new(status, code, reason))
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        pb::ErrorCode::BadRequest,
        "no such operation (see the README's admin API reference)",
    )
}

/// Parses a JSON body strictly; an oversized body is 413.
fn body<T: DeserializeOwned>(raw: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let raw = raw.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                pb::ErrorCode::LimitExceeded,
                format!("the body exceeds {MAX_BODY_BYTES} bytes"),
            )
        } else {
            ApiError::bad(format!("cannot read the body: {e}"))
        }
    })?;
    let raw: &[u8] = if raw.is_empty() { b"{}" } else { &raw };
    serde_json::from_slice(raw).map_err(|e| ApiError::bad(format!("body: {e}")))
}

/// Query parameters, refusing names not in `allowed`.
fn params(
    query: Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>,
    allowed: &[&str],
) -> Result<HashMap<String, String>, ApiError> {
    let Query(map) = query.map_err(|e| ApiError::bad(format!("query string: {e}")))?;
    if let Some(unknown) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(ApiError::bad(format!(
            "unknown query parameter {unknown:?} (allowed: {})",
            allowed.join(", ")
        )));
    }
    Ok(map)
}

fn number<T: std::str::FromStr>(
    params: &HashMap<String, String>,
    name: &str,
) -> Result<Option<T>, ApiError> {
    params
        .get(name)
        .map(|v| {
            v.parse().map_err(|_| {
                ApiError::bad(format!(
                    "{name} must be a non-negative integer within range, not {v:?}"
                ))
            })
        })
        .transpose()
}

fn user_path(user: &str) -> Result<String, ApiError> {
    check_user_id(user).map_err(|r| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            pb::ErrorCode::InvalidUserId,
            format!("path user: {r}"),
        )
    })?;
    Ok(user.to_string())
}

/// The client limits with `cap` ids per request.
fn limits_with(state: &AdminState, cap: u32) -> LimitsConfig {
    LimitsConfig {
        max_ids_per_request: cap,
        ..state.ctx.config.limits.clone()
    }
}

/// A validation error of the body field `name`: the reason names it.
fn in_field(name: &str, e: RequestError) -> ApiError {
    ApiError::from(RequestError {
        reason: format!("{name}: {}", e.reason),
        ..e
    })
}

/// 503 UNAVAILABLE with the wire protocol's retry hint.
fn unavailable(reason: impl Into<String>) -> ApiError {
    ApiError::from(RequestError {
        retry_after_ms: command::UNAVAILABLE_RETRY_MS,
        ..RequestError::new(pb::ErrorCode::Unavailable, reason)
    })
}

fn users_field(state: &AdminState, users: Vec<String>, cap: u32) -> Result<Vec<String>, ApiError> {
    command::parse_ids(users, &limits_with(state, cap)).map_err(|e| in_field("users", e))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UsersBody {
    users: Vec<String>,
    /// Answer as this viewer is shown it (see [`viewer_field`]); absent: the truth.
    #[serde(default)]
    viewer: Option<String>,
}

/// Who a read answers for: absent, the backend (the truth); `"public"`, a stranger (neither
/// approved nor in a block relation: what a third party may be shown); otherwise a user id,
/// answered as that user's devices are shown it (invisibility, blocks both ways, audiences).
enum ViewerArg {
    Backend,
    Public,
    User(String),
}

impl ViewerArg {
    fn as_viewer(&self) -> Viewer<'_> {
        match self {
            ViewerArg::Backend => Viewer::Backend,
            ViewerArg::Public => Viewer::Public,
            ViewerArg::User(u) => Viewer::User(u),
        }
    }
}

/// Parses a `viewer` body field or query parameter (`name` says which, for the reason).
fn viewer_field(name: &str, viewer: Option<&str>) -> Result<ViewerArg, ApiError> {
    match viewer {
        None => Ok(ViewerArg::Backend),
        Some("public") => Ok(ViewerArg::Public),
        Some(u) => {
            check_user_id(u).map_err(|r| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    pb::ErrorCode::InvalidUserId,
                    format!("{name}: {r} (a user id, or \"public\")"),
                )
            })?;
            Ok(ViewerArg::User(u.to_string()))
        }
    }
}

async fn presence_query(State(state): Shared, raw: Result<Bytes, BytesRejection>) -> Reply {
    let b: UsersBody = body(raw)?;
    let users = users_field(&state, b.users, MAX_QUERY_USERS)?;
    let viewer = viewer_field("viewer", b.viewer.as_deref())?;
    let presences: Vec<PresenceJson> = state
        .ctx
        .registry
        .snapshots_for(viewer.as_viewer(), &users)
        .iter()
        .map(PresenceJson::from)
        .collect();
    Ok(Json(json!({ "presences": presences })))
}

async fn presence_online(State(state): Shared, raw: Result<Bytes, BytesRejection>) -> Reply {
    let b: UsersBody = body(raw)?;
    let users = users_field(&state, b.users, MAX_ONLINE_USERS)?;
    let viewer = viewer_field("viewer", b.viewer.as_deref())?;
    let status: BTreeMap<String, &str> = users
        .iter()
        .cloned()
        .zip(
            state
                .ctx
                .registry
                .online_status_for(viewer.as_viewer(), &users)
                .into_iter()
                .map(|s| s.name()),
        )
        .collect();
    Ok(Json(json!({ "status": status })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChannelsBody {
    channels: Vec<String>,
    /// Count as this viewer is shown the members; absent: the truth.
    #[serde(default)]
    viewer: Option<String>,
}

fn channel_field(name: &str, channel: String) -> Result<String, ApiError> {
    command::channel_id(channel).map_err(|e| in_field(name, e))
}

async fn channels_occupancy(State(state): Shared, raw: Result<Bytes, BytesRejection>) -> Reply {
    let b: ChannelsBody = body(raw)?;
    if b.channels.len() > MAX_OCCUPANCY_CHANNELS {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            pb::ErrorCode::TooManyIds,
            format!(
                "channels: {} ids; at most {MAX_OCCUPANCY_CHANNELS} per request",
                b.channels.len()
            ),
        ));
    }
    let viewer = viewer_field("viewer", b.viewer.as_deref())?;
    let mut occupancy = BTreeMap::new();
    for channel in b.channels {
        let channel = channel_field("channels", channel)?;
        let page = state
            .ctx
            .registry
            .who_now_for(viewer.as_viewer(), &channel, None, 0, false);
        occupancy.insert(
            channel,
            json!({ "occupancy": page.occupancy, "member_count": page.member_count }),
        );
    }
    Ok(Json(json!({ "channels": occupancy })))
}

#[derive(Serialize)]
struct MemberJson {
    user: String,
    device: String,
    joined_at_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    state: Option<BTreeMap<String, String>>,
}

async fn channel_members(
    State(state): Shared,
    Path(channel): Path<String>,
    query: Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>,
) -> Reply {
    let q = params(query, &["cursor", "limit", "state", "viewer"])?;
    let channel = channel_field("path channel", channel)?;
    let viewer = viewer_field("query viewer", q.get("viewer").map(String::as_str))?;
    let limit = number::<u32>(&q, "limit")?.unwrap_or(0);
    let limit = command::page_size(limit, &state.ctx.config.limits).map_err(ApiError::from)?;
    let with_state = match q.get("state").map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => return Err(ApiError::bad("state must be true or false")),
    };
    let after = command::decode_member_cursor(q.get("cursor").map_or("", String::as_str))
        .map_err(ApiError::from)?;
    let page =
        state
            .ctx
            .registry
            .who_now_for(viewer.as_viewer(), &channel, after, limit, with_state);
    let members: Vec<MemberJson> = page
        .members
        .into_iter()
        .map(|m| MemberJson {
            user: m.user_id,
            device: m.device_id,
            joined_at_ms: m.joined_at_ms,
            state: with_state.then_some(m.state),
        })
        .collect();
    let next_cursor = page
        .next_after
        .map(|(u, d)| command::encode_member_cursor(&u, &d))
        .unwrap_or_default();
    Ok(Json(json!({
        "channel": channel,
        "occupancy": page.occupancy,
        "member_count": page.member_count,
        "members": members,
        "next_cursor": next_cursor,
    })))
}

async fn where_now(
    State(state): Shared,
    Path(user): Path<String>,
    query: Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>,
) -> Reply {
    let q = params(query, &["viewer"])?;
    let user = user_path(&user)?;
    let viewer = viewer_field("query viewer", q.get("viewer").map(String::as_str))?;
    let channels = state.ctx.registry.where_now_for(viewer.as_viewer(), &user);
    Ok(Json(json!({ "user": user, "channels": channels })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct DisconnectBody {
    device: Option<String>,
    reason: Option<String>,
}

/// Longest reason text passed on to the client's Close.
const MAX_REASON_BYTES: usize = 256;

async fn disconnect(
    State(state): Shared,
    Path(user): Path<String>,
    raw: Result<Bytes, BytesRejection>,
) -> Reply {
    let user = user_path(&user)?;
    let b: DisconnectBody = body(raw)?;
    if let Some(d) = &b.device {
        if d.is_empty() || d.len() > 128 || d.chars().any(char::is_control) {
            return Err(ApiError::bad(
                "device must be 1-128 bytes without control characters",
            ));
        }
    }
    let reason = b
        .reason
        .unwrap_or_else(|| "disconnected by the application's backend".to_string());
    if reason.len() > MAX_REASON_BYTES {
        return Err(ApiError::bad(format!(
            "reason must be at most {MAX_REASON_BYTES} bytes"
        )));
    }
    let ended = state.ctx.registry.kick(&user, b.device.as_deref(), &reason);
    Ok(Json(json!({ "user": user, "disconnected": ended })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RevokeBody {
    before_ms: Option<u64>,
    reason: Option<String>,
}

async fn revoke(
    State(state): Shared,
    Path(user): Path<String>,
    raw: Result<Bytes, BytesRejection>,
) -> Reply {
    let user = user_path(&user)?;
    let b: RevokeBody = body(raw)?;
    let now = crate::now_ms();
    let before_ms = b.before_ms.unwrap_or(now);
    let max_life_ms = state.ctx.config.auth.max_token_lifetime_secs * 1000;
    if before_ms.saturating_add(max_life_ms) <= now {
        return Err(ApiError::bad(format!(
            "before_ms {before_ms} is more than auth.max_token_lifetime_secs ago: every token \
             issued before it has expired already"
        )));
    }
    if before_ms > now + 60_000 {
        return Err(ApiError::bad(
            "before_ms is more than a minute in the future",
        ));
    }
    // Kept as long as any token issued before the cut-off can still be valid.
    let until_ms = before_ms.saturating_add(max_life_ms);
    let reason = b
        .reason
        .unwrap_or_else(|| "this user's tokens were revoked".to_string());
    if reason.len() > MAX_REASON_BYTES {
        return Err(ApiError::bad(format!(
            "reason must be at most {MAX_REASON_BYTES} bytes"
        )));
    }
    // Durable before the answer: the replicated log in cluster mode (every node applies it),
    // else this node's store and a commit.
    let op = LoggedOp::Revoke {
        user: user.clone(),
        before_ms,
        until_ms,
    };
    let stored = match apply_subscription_op(&state, op).await? {
        crate::store::LoggedOutcome::Revoked(cut) => cut,
        other => {
            return Err(ApiError::from(RequestError::new(
                pb::ErrorCode::Internal,
                format!("unexpected outcome {other:?}"),
            )))
        }
    };
    let ended = state.ctx.registry.kick(&user, None, &reason);
    Ok(Json(json!({
        "user": user,
        "revoked_before_ms": stored,
        "expires_at_ms": until_ms,
        "disconnected": ended,
    })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct PresenceBody {
    availability: Option<String>,
    show: Option<u32>,
    status: Option<String>,
    description: Option<String>,
    state: BTreeMap<String, String>,
    replace_state: bool,
}

async fn set_presence(
    State(state): Shared,
    Path(user): Path<String>,
    raw: Result<Bytes, BytesRejection>,
) -> Reply {
    let user = user_path(&user)?;
    let b: PresenceBody = body(raw)?;
    let availability = match b.availability.as_deref() {
        None => pb::Availability::Unspecified,
        Some(name) => match crate::model::Availability::parse(name) {
            Some(a) if a != crate::model::Availability::Offline => {
                crate::wire::availability_to_pb(a)
            }
            _ => {
                return Err(ApiError::bad(
                    "availability must be online, away, xa or dnd",
                ))
            }
        },
    };
    let change = command::parse_change(
        &pb::SetPresence {
            availability: availability as i32,
            show: b.show,
            status: b.status,
            description: b.description,
            state: b.state.into_iter().collect(),
            replace_state: b.replace_state,
        },
        &state.ctx.config.limits,
    )
    .map_err(ApiError::from)?;
    let refused = |e: AdminError| match e {
        AdminError::NotFound(reason) => {
            ApiError::new(StatusCode::NOT_FOUND, pb::ErrorCode::NotConnected, reason)
        }
        AdminError::Limit(reason) => ApiError::new(
            StatusCode::BAD_REQUEST,
            pb::ErrorCode::LimitExceeded,
            reason,
        ),
    };
    let registry = &state.ctx.registry;
    // Each device has one writer, the node holding it: the change is applied here for the
    // devices held here and sent to every other node holding one.
    let (local, remote) = registry.holders(&user);
    let forwarder = state.ctx.forwarder.get();
    if !local && (remote.is_empty() || forwarder.is_none()) {
        return Err(refused(AdminError::NotFound(format!(
            "user {user:?} has no live session"
        ))));
    }
    let mut version = 0;
    let mut applied = false;
    if local {
        match registry.set_presence_for(&user, &change) {
            Ok(p) => {
                version = p.version;
                applied = true;
            }
            // Gone meanwhile: the other holders may still take it.
            Err(AdminError::NotFound(_)) if !remote.is_empty() => {}
            Err(e) => return Err(refused(e)),
        }
    }
    if let Some(forwarder) = forwarder {
        for node in &remote {
            match forwarder.set_presence(node, &user, &change).await {
                Ok(v) => {
                    version = version.max(v);
                    applied = true;
                }
                Err(ForwardError::Refused(AdminError::NotFound(_))) => {}
                Err(ForwardError::Refused(e)) => return Err(refused(e)),
                Err(e @ ForwardError::Unavailable { .. }) => {
                    return Err(unavailable(e.to_string()))
                }
            }
        }
    }
    if !applied {
        return Err(refused(AdminError::NotFound(format!(
            "user {user:?} has no live session"
        ))));
    }
    // Answer with this node's view once it shows the holders' change (bounded).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut presence = registry.snapshot(&user);
    while presence.version < version && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
        presence = registry.snapshot(&user);
    }
    Ok(Json(json!({ "presence": PresenceJson::from(&presence) })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct SubscriptionsBody {
    add: Vec<String>,
    remove: Vec<String>,
    expiry_secs: Option<u64>,
}

/// Applies `op` the way a client's request is applied: through the replicated log in cluster
/// mode, else in the store followed by a group commit. Acknowledged means durable. (Also
/// revocations, which travel the same log.)
async fn apply_subscription_op(
    state: &AdminState,
    op: LoggedOp,
) -> Result<crate::store::LoggedOutcome, ApiError> {
    if let Some(log) = state.ctx.sub_log.get() {
        return log.submit(&op, None).await.map_err(|_| {
            // The log's own reason speaks of the wire protocol's idempotency key; every admin
            // change is idempotent as it stands (add, remove, revoke), so a plain retry folds.
            unavailable(
                "the replicated log has no quorum: nothing is acknowledged; the change may \
                 still land once it recovers. Retry the same request after Retry-After \
                 (it is idempotent)",
            )
        });
    }
    let outcome = crate::store::apply_op(state.ctx.registry.store().as_dyn(), &op)
        .map_err(|e| ApiError::from(RequestError::from(e)))?;
    state
        .ctx
        .committer
        .commit()
        .await
        .map_err(|e| ApiError::from(RequestError::from(e)))?;
    Ok(outcome)
}

async fn change_subscriptions(
    State(state): Shared,
    Path(user): Path<String>,
    raw: Result<Bytes, BytesRejection>,
) -> Reply {
    let user = user_path(&user)?;
    let b: SubscriptionsBody = body(raw)?;
    let limits = &state.ctx.config.limits;
    let field = |name: &str, ids: Vec<String>| {
        command::parse_ids(ids, limits).map_err(|e| in_field(name, e))
    };
    let add = field("add", b.add)?;
    let remove = field("remove", b.remove)?;
    if add.is_empty() && remove.is_empty() {
        return Err(ApiError::bad("add and remove are both empty"));
    }
    if add.contains(&user) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            pb::ErrorCode::SelfSubscription,
            "add: a user cannot subscribe to itself",
        ));
    }
    let expiry_secs = match b.expiry_secs {
        None | Some(0) => limits.default_expiry_secs,
        Some(e) if e > limits.max_expiry_secs => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                pb::ErrorCode::LimitExceeded,
                format!(
                    "expiry_secs {e} exceeds the limit of {}",
                    limits.max_expiry_secs
                ),
            ))
        }
        Some(e) => e,
    };
    let now_ms = crate::now_ms();
    // Every key is always there: what was not asked for is empty (expires_at_ms 0).
    let mut reply = json!({
        "user": user,
        "added": [],
        "removed": 0,
        "evicted": [],
        "expires_at_ms": 0,
        "subscription_count": 0,
    });
    if !remove.is_empty() {
        let outcome = apply_subscription_op(
            &state,
            LoggedOp::Unsubscribe {
                subscriber: user.clone(),
                targets: remove,
                now_ms,
            },
        )
        .await?;
        if let crate::store::LoggedOutcome::Unsubscribed(removed, count) = outcome {
            reply["removed"] = json!(removed);
            reply["subscription_count"] = json!(count);
        }
    }
    if !add.is_empty() {
        let expires_at_ms = now_ms.saturating_add(expiry_secs.saturating_mul(1000));
        let outcome = apply_subscription_op(
            &state,
            LoggedOp::Subscribe {
                subscriber: user.clone(),
                targets: add.clone(),
                expires_at_ms,
                now_ms,
                cap: limits.max_subscriptions as usize,
            },
        )
        .await?;
        if let crate::store::LoggedOutcome::Subscribed(o) = outcome {
            reply["added"] = json!(add);
            reply["expires_at_ms"] = json!(expires_at_ms);
            reply["evicted"] = json!(o.evicted);
            reply["subscription_count"] = json!(o.count);
        }
    }
    Ok(Json(reply))
}

async fn list_subscriptions(
    State(state): Shared,
    Path(user): Path<String>,
    query: Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>,
) -> Reply {
    let user = user_path(&user)?;
    let q = params(query, &["cursor", "limit"])?;
    let limit = number::<u32>(&q, "limit")?.unwrap_or(0);
    let limit = command::page_size(limit, &state.ctx.config.limits).map_err(ApiError::from)?;
    let after = command::decode_cursor(q.get("cursor").map_or("", String::as_str))
        .map_err(ApiError::from)?;
    if let Some(log) = state.ctx.sub_log.get() {
        log.catch_up()
            .await
            .map_err(|e| unavailable(e.to_string()))?;
    }
    let page = state
        .ctx
        .registry
        .store()
        .list(&user, after.as_deref(), limit, crate::now_ms())
        .map_err(|e| ApiError::from(RequestError::from(e)))?;
    let next_cursor = match (page.has_more, page.entries.last()) {
        (true, Some((last, _))) => command::encode_cursor(last),
        _ => String::new(),
    };
    let subscriptions: Vec<Value> = page
        .entries
        .into_iter()
        .map(|(u, exp)| json!({ "user": u, "expires_at_ms": exp }))
        .collect();
    Ok(Json(json!({
        "user": user,
        "subscriptions": subscriptions,
        "next_cursor": next_cursor,
        "total": page.total,
    })))
}

/// Applies a privacy change on `user`'s behalf the way a client's request is applied
/// (`ConnectionContext::carry_out_privacy`: the same records, the same transitions for
/// watchers; on a single node stored and group-committed, in cluster mode appended to the
/// privacy log and applied here), so acknowledged means durable. Returns the records.
///
/// On a single node the commit is awaited even when nothing changed, as the wire does: a
/// request that finds its change already made by another one in flight must not be answered
/// before that one is on disk.
async fn apply_privacy_op(
    state: &AdminState,
    op: &crate::privacy::PrivacyOp,
) -> Result<Vec<crate::privacy::PrivacyRecord>, ApiError> {
    state
        .ctx
        .carry_out_privacy(op)
        .await
        .map_err(ApiError::from)
}

/// `user`'s privacy as the backend sees it (the truth): settings and list sizes.
fn privacy_json(state: &AdminState, user: &str) -> Value {
    let summary = state.ctx.registry.privacy_summary(user);
    json!({
        "user": user,
        "invisible": summary.invisible,
        "invisible_devices": state.ctx.registry.invisible_devices(user),
        "audience": summary.audience,
        "last_seen_audience": summary.last_seen_audience,
        "blocked_total": summary.blocked,
        "approved": summary.approved,
        "pending": summary.pending,
    })
}

async fn get_privacy(State(state): Shared, Path(user): Path<String>) -> Reply {
    let user = user_path(&user)?;
    Ok(Json(privacy_json(&state, &user)))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct PrivacyBody {
    audience: Option<String>,
    last_seen_audience: Option<String>,
}

/// An audience named in the body field `name` (absent: unchanged).
fn audience_field(
    name: &str,
    value: Option<String>,
) -> Result<Option<crate::privacy::Audience>, ApiError> {
    use crate::privacy::Audience;
    value
        .map(|v| match v.as_str() {
            "everyone" => Ok(Audience::Everyone),
            "approved" => Ok(Audience::Approved),
            "nobody" => Ok(Audience::Nobody),
            _ => Err(ApiError::bad(format!(
                "{name} must be everyone, approved or nobody, not {v:?}"
            ))),
        })
        .transpose()
}

/// Who sees the user's presence and last-seen time, as the user's own SetPrivacy: watchers
/// whose view flips see OFFLINE (reason `disconnect`) or ONLINE.
async fn set_privacy(
    State(state): Shared,
    Path(user): Path<String>,
    raw: Result<Bytes, BytesRejection>,
) -> Reply {
    let user = user_path(&user)?;
    let b: PrivacyBody = body(raw)?;
    let presence = audience_field("audience", b.audience)?;
    let last_seen = audience_field("last_seen_audience", b.last_seen_audience)?;
    if presence.is_none() && last_seen.is_none() {
        return Err(ApiError::bad(
            "name audience or last_seen_audience (or both)",
        ));
    }
    let op = crate::privacy::PrivacyOp::SetAudience {
        user: user.clone(),
        presence,
        last_seen,
    };
    apply_privacy_op(&state, &op).await?;
    Ok(Json(privacy_json(&state, &user)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InvisibleBody {
    invisible: bool,
}

async fn set_invisible(
    State(state): Shared,
    Path(user): Path<String>,
    raw: Result<Bytes, BytesRejection>,
) -> Reply {
    let user = user_path(&user)?;
    let b: InvisibleBody = body(raw)?;
    let op = crate::privacy::PrivacyOp::SetInvisible {
        user: user.clone(),
        on: b.invisible,
    };
    apply_privacy_op(&state, &op).await?;
    Ok(Json(json!({
        "user": user,
        "invisible": state.ctx.registry.is_invisible(&user),
    })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct BlocksBody {
    block: Vec<String>,
    unblock: Vec<String>,
}

/// Blocks, then unblocks. A refused block (the cap, blocking oneself) changes nothing at all:
/// the unblocks are not applied either. Unblocking to make room under the cap takes a request
/// of its own first.
async fn change_blocks(
    State(state): Shared,
    Path(user): Path<String>,
    raw: Result<Bytes, BytesRejection>,
) -> Reply {
    use crate::privacy::{PrivacyOp, PrivacyRecord};
    let user = user_path(&user)?;
    let b: BlocksBody = body(raw)?;
    // The wire's cap and id rules (Block/Unblock), bounded by what one operation takes.
    let cap = state
        .ctx
        .config
        .limits
        .max_ids_per_request
        .min(crate::privacy::book::MAX_TARGETS_PER_OP as u32);
    let limits = limits_with(&state, cap);
    let field = |name: &str, ids: Vec<String>| {
        command::parse_ids(ids, &limits).map_err(|e| in_field(name, e))
    };
    let block = field("block", b.block)?;
    let unblock = field("unblock", b.unblock)?;
    if block.is_empty() && unblock.is_empty() {
        return Err(ApiError::bad("block and unblock are both empty"));
    }
    if block.contains(&user) {
        return Err(ApiError::bad("block: a user cannot block itself"));
    }
    if let Some(both) = block.iter().find(|u| unblock.contains(u)) {
        return Err(ApiError::bad(format!(
            "user {both:?} is in both block and unblock"
        )));
    }
    let blocks = |records: &[PrivacyRecord]| {
        records
            .iter()
            .filter(|r| matches!(r, PrivacyRecord::Block { .. }))
            .count()
    };
    let mut changed = 0;
    if !block.is_empty() {
        let op = PrivacyOp::Block {
            user: user.clone(),
            targets: block,
        };
        let records = apply_privacy_op(&state, &op).await.map_err(|e| ApiError {
            reason: format!("block: {}", e.reason),
            ..e
        })?;
        changed += blocks(&records);
    }
    if !unblock.is_empty() {
        let op = PrivacyOp::Unblock {
            user: user.clone(),
            targets: unblock,
        };
        let records = apply_privacy_op(&state, &op).await.map_err(|e| ApiError {
            reason: format!("unblock: {}", e.reason),
            ..e
        })?;
        changed += blocks(&records);
    }
    let (_, total) = state.ctx.registry.blocked_page(&user, None, 0);
    Ok(Json(
        json!({ "user": user, "changed": changed, "total": total }),
    ))
}

/// The `after` query parameter of a page keyed by user id (absent or empty: from the start).
fn after_param(q: &HashMap<String, String>) -> Result<Option<&str>, ApiError> {
    match q.get("after").map(String::as_str) {
        None | Some("") => Ok(None),
        Some(a) => {
            check_user_id(a).map_err(|r| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    pb::ErrorCode::InvalidUserId,
                    format!("after: {r}"),
                )
            })?;
            Ok(Some(a))
        }
    }
}

async fn list_blocks(
    State(state): Shared,
    Path(user): Path<String>,
    query: Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>,
) -> Reply {
    let user = user_path(&user)?;
    let q = params(query, &["after", "limit"])?;
    let limit = number::<u32>(&q, "limit")?.unwrap_or(0);
    let limit = command::page_size(limit, &state.ctx.config.limits).map_err(ApiError::from)?;
    let after = after_param(&q)?;
    let (mut page, total) = state.ctx.registry.blocked_page(&user, after, limit + 1);
    let has_more = page.len() > limit;
    page.truncate(limit);
    let next_after = match (has_more, page.last()) {
        (true, Some((last, _))) => Value::String(last.clone()),
        _ => Value::Null,
    };
    let blocked: Vec<Value> = page
        .into_iter()
        .map(|(u, since_ms)| json!({ "user": u, "since_ms": since_ms }))
        .collect();
    Ok(Json(json!({
        "user": user,
        "blocked": blocked,
        "next_after": next_after,
        "total": total,
    })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct ApprovalsBody {
    approve: Vec<String>,
    deny: Vec<String>,
    revoke: Vec<String>,
}

/// Approves, then denies, then revokes on `user`'s behalf, as the user's own SetApproval
/// (approving needs no request: a backend with its own friend graph approves ahead). Every
/// check that can be made up front is (ids, the user itself, an id in two lists), and the only
/// cap, `privacy.max_approved`, is checked by the approve step, which comes first: a refusal
/// then applies nothing. A later step failing (the store) leaves the earlier ones applied and
/// durable; the reason names the failed step and those applied.
async fn change_approvals(
    State(state): Shared,
    Path(user): Path<String>,
    raw: Result<Bytes, BytesRejection>,
) -> Reply {
    use crate::privacy::{Answer, PrivacyOp, PrivacyRecord};
    let user = user_path(&user)?;
    let b: ApprovalsBody = body(raw)?;
    // The wire's id rules (SetApproval), bounded by what one operation takes.
    let cap = state
        .ctx
        .config
        .limits
        .max_ids_per_request
        .min(crate::privacy::book::MAX_TARGETS_PER_OP as u32);
    let limits = limits_with(&state, cap);
    let field = |name: &'static str, ids: Vec<String>| {
        command::parse_ids(ids, &limits)
            .map(|ids| (name, ids))
            .map_err(|e| in_field(name, e))
    };
    let steps = [
        (field("approve", b.approve)?, Answer::Approve),
        (field("deny", b.deny)?, Answer::Deny),
        (field("revoke", b.revoke)?, Answer::Revoke),
    ];
    if steps.iter().all(|((_, ids), _)| ids.is_empty()) {
        return Err(ApiError::bad("approve, deny and revoke are all empty"));
    }
    for (i, ((name, ids), _)) in steps.iter().enumerate() {
        if ids.contains(&user) {
            return Err(ApiError::bad(format!(
                "{name}: a user cannot approve, deny or revoke itself"
            )));
        }
        for ((other, others), _) in &steps[i + 1..] {
            if let Some(both) = ids.iter().find(|u| others.contains(u)) {
                return Err(ApiError::bad(format!(
                    "user {both:?} is in both {name} and {other}"
                )));
            }
        }
    }
    let mut changed = 0;
    let mut applied: Vec<&str> = Vec::new();
    for ((name, others), answer) in steps {
        if others.is_empty() {
            continue;
        }
        let op = PrivacyOp::Answer {
            user: user.clone(),
            others: others.clone(),
            answer,
        };
        let records = apply_privacy_op(&state, &op).await.map_err(|e| {
            // A refusal (a cap, cluster mode) applies nothing of its step; a failed commit
            // may have (its reason says so).
            let refused = e.status != StatusCode::INTERNAL_SERVER_ERROR;
            let done = match (applied.is_empty(), refused) {
                (true, true) => " (nothing of the request was applied)".to_string(),
                (true, false) => String::new(),
                (false, true) => format!(
                    " ({} was applied; {name} and what follows were not)",
                    applied.join(" and ")
                ),
                (false, false) => format!(" ({} was applied)", applied.join(" and ")),
            };
            ApiError {
                reason: format!("{name}: {}{done}", e.reason),
                ..e
            }
        })?;
        // The entries of the named users (not those the denied cap forgot meanwhile).
        changed += records
            .iter()
            .filter(
                |r| matches!(r, PrivacyRecord::Approval { other, .. } if others.contains(other)),
            )
            .count();
        applied.push(name);
    }
    Ok(Json(json!({ "user": user, "changed": changed })))
}

/// An approval entry's state as the API names it (a revoked approval shows as `denied`, as on
/// the wire).
fn approval_state_name(a: &crate::privacy::Approval) -> &'static str {
    match command::approval_state(a) {
        pb::ApprovalState::Pending => "pending",
        pb::ApprovalState::Approved => "approved",
        _ => "denied",
    }
}

async fn list_approvals(
    State(state): Shared,
    Path(user): Path<String>,
    query: Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>,
) -> Reply {
    let user = user_path(&user)?;
    let q = params(query, &["state", "after", "limit"])?;
    let wanted = match q.get("state").map(String::as_str) {
        None | Some("") => None,
        Some(s @ ("pending" | "approved" | "denied")) => Some(s),
        Some(s) => {
            return Err(ApiError::bad(format!(
                "state must be pending, approved or denied, not {s:?}"
            )))
        }
    };
    let limit = number::<u32>(&q, "limit")?.unwrap_or(0);
    let limit = command::page_size(limit, &state.ctx.config.limits).map_err(ApiError::from)?;
    let after = after_param(&q)?;
    let filter = |a: &crate::privacy::Approval| wanted.is_none_or(|w| approval_state_name(a) == w);
    let (mut page, total) = state
        .ctx
        .registry
        .approvals_page(&user, &filter, after, limit + 1);
    let has_more = page.len() > limit;
    page.truncate(limit);
    let next_after = match (has_more, page.last()) {
        (true, Some((last, _))) => Value::String(last.clone()),
        _ => Value::Null,
    };
    let approvals: Vec<Value> = page
        .into_iter()
        .map(|(u, a)| {
            json!({ "user": u, "state": approval_state_name(&a), "since_ms": a.since_ms() })
        })
        .collect();
    Ok(Json(json!({
        "user": user,
        "approvals": approvals,
        "next_after": next_after,
        "total": total,
    })))
}

/// Most bytes of events per `GET /v1/events` page (at least one event is always sent).
pub const MAX_EVENTS_PAGE_BYTES: usize = 1024 * 1024;
/// Most events per `GET /v1/events` page.
pub const MAX_EVENTS_PAGE: usize = 1_000;

async fn events(
    State(state): Shared,
    query: Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>,
) -> Reply {
    let q = params(query, &["after", "limit", "wait_ms"])?;
    let after = number::<u64>(&q, "after")?.unwrap_or(0);
    let limit = number::<usize>(&q, "limit")?.unwrap_or(100);
    if !(1..=MAX_EVENTS_PAGE).contains(&limit) {
        return Err(ApiError::bad(format!(
            "limit must be 1..={MAX_EVENTS_PAGE}"
        )));
    }
    let wait_ms = number::<u64>(&q, "wait_ms")?.unwrap_or(0);
    if wait_ms > state.config().max_wait_ms {
        return Err(ApiError::bad(format!(
            "wait_ms must be at most {}",
            state.config().max_wait_ms
        )));
    }
    let mut page = tokio::select! {
        page = state.events.wait_page(after, limit, Duration::from_millis(wait_ms)) => page,
        _ = state.ctx.shutdown.cancelled() => state.events.page(after, limit),
    };
    // A page stops at MAX_EVENTS_PAGE_BYTES of events (at least one): events can be large.
    let mut bytes = 0;
    let mut keep = 0;
    for event in &page.events {
        bytes += serde_json::to_vec(&**event).map_or(0, |v| v.len());
        if keep > 0 && bytes > MAX_EVENTS_PAGE_BYTES {
            break;
        }
        keep += 1;
    }
    page.events.truncate(keep);
    page.next_after = page.events.last().map_or(after, |e| e.seq);
    Ok(Json(serde_json::to_value(page).unwrap_or(Value::Null)))
}
