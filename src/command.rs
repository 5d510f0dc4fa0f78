//! A `ClientFrame` becomes a validated domain command here, and only here; the command is then
//! applied to the registry and store and answered with a reply body or a structured error
//! `{code, operation, reason}`. Every limit of SPEC §1/§3 is checked before anything changes, so
//! a refused request changes nothing. Synchronous: no sockets, no `.await`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

use crate::config::{Config, LimitsConfig};
use crate::embed::Identity;
use crate::model::{check_user_id, PresenceChange};
use crate::outbound::Outbound;
use crate::pb;
use crate::pb::client_frame::Body as ClientBody;
use crate::pb::server_frame::Body as ServerBody;
use crate::privacy::{PrivacyOp, Viewer};
use crate::registry::{Attach, Registry, RegistryError};
use crate::store::{LoggedOp, LoggedOutcome};
use crate::wire;

/// A refused request, as the client will see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestError {
    /// Machine-readable code.
    pub code: pb::ErrorCode,
    /// Human-readable detail naming the field or limit.
    pub reason: String,
    /// For RATE_LIMITED and BANNED.
    pub retry_after_ms: u64,
}

impl RequestError {
    /// An error with a code and a reason.
    pub fn new(code: pb::ErrorCode, reason: impl Into<String>) -> RequestError {
        RequestError {
            code,
            reason: reason.into(),
            retry_after_ms: 0,
        }
    }

    /// True for refusals of the token itself (counted towards bans).
    pub fn is_auth_failure(&self) -> bool {
        matches!(
            self.code,
            pb::ErrorCode::Unauthenticated
                | pb::ErrorCode::BadSignature
                | pb::ErrorCode::TokenExpired
        )
    }

    /// The error frame for `operation`.
    pub fn to_body(&self, operation: &str) -> ServerBody {
        ServerBody::Error(pb::Error {
            code: self.code as i32,
            operation: operation.to_string(),
            reason: self.reason.clone(),
            retry_after_ms: self.retry_after_ms,
        })
    }
}

/// What a client refused by a fenced node is told to wait before trying again.
pub const UNAVAILABLE_RETRY_MS: u64 = 1_000;

fn bad(reason: impl Into<String>) -> RequestError {
    RequestError::new(pb::ErrorCode::BadRequest, reason)
}

fn limit(reason: impl Into<String>) -> RequestError {
    RequestError::new(pb::ErrorCode::LimitExceeded, reason)
}

impl From<RegistryError> for RequestError {
    fn from(e: RegistryError) -> RequestError {
        match e {
            RegistryError::DeviceLimit(reason) => {
                RequestError::new(pb::ErrorCode::DeviceLimit, reason)
            }
            RegistryError::NotAttached => {
                RequestError::new(pb::ErrorCode::Internal, "session is no longer active")
            }
            RegistryError::Limit(reason) => limit(reason),
            RegistryError::Unavailable(reason) => RequestError {
                code: pb::ErrorCode::Unavailable,
                reason,
                retry_after_ms: UNAVAILABLE_RETRY_MS,
            },
            RegistryError::BadRequest(reason) => bad(reason),
            e @ RegistryError::Store(_) => {
                RequestError::new(pb::ErrorCode::Internal, e.to_string())
            }
            e @ RegistryError::NotMember(_) => {
                RequestError::new(pb::ErrorCode::NotMember, e.to_string())
            }
        }
    }
}

impl From<crate::store::StoreError> for RequestError {
    fn from(e: crate::store::StoreError) -> RequestError {
        RequestError::new(pb::ErrorCode::Internal, e.to_string())
    }
}

/// A token bucket: `rate` per second, up to `burst` at once.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate_per_sec: u32, burst: u32, now: Instant) -> TokenBucket {
        TokenBucket {
            rate: f64::from(rate_per_sec),
            burst: f64::from(burst),
            tokens: f64::from(burst),
            last: now,
        }
    }

    /// Takes one token, or says how long until one is available.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }
}

fn rate_limited(operation: &str, wait: Duration) -> RequestError {
    RequestError {
        code: pb::ErrorCode::RateLimited,
        reason: format!("{operation} rate limit reached"),
        retry_after_ms: (wait.as_millis() as u64).max(1),
    }
}

/// An authenticated session's identity and per-session limits.
#[derive(Debug)]
pub struct Session {
    /// From the token.
    pub user_id: String,
    /// From the token's `did` or Connect.
    pub device_id: String,
    /// The connection.
    pub conn_id: u64,
    /// Keepalive applied, seconds.
    pub keepalive_secs: u32,
    /// The credential's expiry (a token's `exp`), seconds since the Unix epoch: the session
    /// is closed then (see `session.close_on_token_expiry`). `None`: never.
    pub token_exp: Option<u64>,
    publish_bucket: TokenBucket,
}

/// A validated Connect.
#[derive(Debug)]
pub struct ConnectRequest {
    token: String,
    device_id: String,
    platform: String,
    keepalive_secs: u32,
    initial: Option<PresenceChange>,
    user_data: BTreeMap<String, String>,
    invisible: bool,
    invisible_device: bool,
}

impl ConnectRequest {
    /// The credential presented (the token field).
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The device id the client claims (`""` when none).
    pub fn device_id(&self) -> &str {
        &self.device_id
    }

    /// Whether the client asks to start invisible.
    pub fn invisible(&self) -> bool {
        self.invisible
    }

    /// The connection layer carried out the invisibility before [`connect`] (group commit, or
    /// the cluster's privacy log); `connect` refuses a request still asking for it.
    pub fn invisibility_done(&mut self) {
        self.invisible = false;
    }
}

/// What a request asks for, validated.
#[derive(Debug)]
pub enum Command {
    /// Open the session.
    Connect(ConnectRequest),
    /// Keepalive probe.
    Ping,
    /// Clean goodbye.
    Disconnect,
    /// Publish own presence.
    SetPresence(PresenceChange),
    /// Watch users.
    Subscribe {
        /// Distinct targets.
        targets: Vec<String>,
        /// Seconds.
        expiry_secs: u64,
        /// Cluster mode: the client's key for a safe retry.
        idempotency_key: Option<String>,
    },
    /// Stop watching users.
    Unsubscribe {
        /// Distinct targets.
        targets: Vec<String>,
        /// Cluster mode: the client's key for a safe retry.
        idempotency_key: Option<String>,
    },
    /// Page through subscriptions.
    ListSubscriptions {
        /// Targets strictly after this id.
        after: Option<String>,
        /// Page size.
        page_size: usize,
    },
    /// Query presence.
    GetPresence {
        /// Distinct users, in request order.
        targets: Vec<String>,
    },
    /// Ephemeral presence to some users.
    DirectedPresence {
        /// Distinct recipients.
        targets: Vec<String>,
        /// The presence to show.
        change: PresenceChange,
    },
    /// Send what changed since the versions the client holds; handled by the connection.
    Resume {
        /// Version held per user, each inside the range.
        known: std::collections::HashMap<String, u64>,
        /// The page's range: user ids above `after` (exclusive; `None`: from the first)...
        after: Option<String>,
        /// ...up to `through` (inclusive; `None`: to the last).
        through: Option<String>,
    },
    /// Turn invisibility on or off.
    SetInvisible {
        /// On or off.
        on: bool,
        /// This device only, for the session (scope DEVICE); else the user (stored).
        device: bool,
    },
    /// Block users.
    Block {
        /// Distinct users.
        targets: Vec<String>,
    },
    /// Lift blocks.
    Unblock {
        /// Distinct users.
        targets: Vec<String>,
    },
    /// A page of the block list.
    ListBlocked {
        /// Users after this id.
        after: Option<String>,
        /// Page size.
        page_size: usize,
    },
    /// Change who sees the presence and the last-seen time (`None`: unchanged).
    SetPrivacy {
        /// Presence audience.
        presence: Option<crate::privacy::Audience>,
        /// Last-seen audience.
        last_seen: Option<crate::privacy::Audience>,
    },
    /// Read the privacy settings.
    GetPrivacy,
    /// Approve, deny or revoke watchers.
    SetApproval {
        /// Distinct users.
        others: Vec<String>,
        /// What to do.
        answer: crate::privacy::Answer,
    },
    /// A page of requests and approvals.
    ListApprovals {
        /// Which entries (`None`: all).
        state: Option<pb::ApprovalState>,
        /// Users after this id.
        after: Option<String>,
        /// Page size.
        page_size: usize,
    },
    /// Set this connection's delivery contract (`None`: live); handled by the connection,
    /// which owns the outbound queue.
    SetDelivery(Option<crate::delivery::Contract>),
    /// Join a channel with initial member state.
    JoinChannel {
        /// Channel id.
        channel: String,
        /// Initial member state.
        state: BTreeMap<String, String>,
    },
    /// Leave a channel.
    LeaveChannel {
        /// Channel id.
        channel: String,
    },
    /// Watch a channel without joining.
    WatchChannel {
        /// Channel id.
        channel: String,
    },
    /// Stop watching.
    UnwatchChannel {
        /// Channel id.
        channel: String,
    },
    /// Who is in a channel.
    WhoNow {
        /// Channel id.
        channel: String,
        /// Count only, ids, or ids with state.
        mode: pb::WhoNowMode,
        /// Members strictly after this (user, device).
        after: Option<(String, String)>,
        /// Page size.
        page_size: usize,
    },
    /// Where a user is.
    WhereNow {
        /// User id; `None` for the requester.
        user: Option<String>,
    },
    /// Set own member state.
    SetChannelState {
        /// Channel id.
        channel: String,
        /// Changes.
        state: BTreeMap<String, String>,
        /// Clear first.
        replace: bool,
    },
    /// Read a user's member state.
    GetChannelState {
        /// Channel id.
        channel: String,
        /// User; `None` for the requester.
        user: Option<String>,
    },
    /// Remove keys (or all) from own member state.
    RemoveChannelState {
        /// Channel id.
        channel: String,
        /// Keys; empty removes all.
        keys: Vec<String>,
    },
}

impl Command {
    /// Validates a frame's body. `operation` for error frames comes from
    /// [`wire::client_body_kind`].
    pub fn from_frame(
        body: Option<ClientBody>,
        limits: &LimitsConfig,
    ) -> Result<Command, RequestError> {
        let Some(body) = body else {
            return Err(bad("frame carries no request"));
        };
        Ok(match body {
            ClientBody::Connect(c) => Command::Connect(parse_connect(c, limits)?),
            ClientBody::Ping(_) => Command::Ping,
            ClientBody::Disconnect(_) => Command::Disconnect,
            ClientBody::SetPresence(p) => Command::SetPresence(parse_change(&p, limits)?),
            ClientBody::Subscribe(s) => {
                let targets = parse_ids(s.user_ids, limits)?;
                if targets.is_empty() {
                    return Err(bad("user_ids is empty"));
                }
                let expiry_secs = match s.expiry_seconds {
                    0 => limits.default_expiry_secs,
                    e if e > limits.max_expiry_secs => {
                        return Err(limit(format!(
                            "expiry_seconds {e} exceeds the limit of {}",
                            limits.max_expiry_secs
                        )))
                    }
                    e => e,
                };
                Command::Subscribe {
                    targets,
                    expiry_secs,
                    idempotency_key: idempotency_key(s.idempotency_key)?,
                }
            }
            ClientBody::Unsubscribe(u) => Command::Unsubscribe {
                targets: parse_ids(u.user_ids, limits)?,
                idempotency_key: idempotency_key(u.idempotency_key)?,
            },
            ClientBody::ListSubscriptions(l) => Command::ListSubscriptions {
                after: decode_cursor(&l.cursor)?,
                page_size: page_size(l.page_size, limits)?,
            },
            // Duplicates are folded: a reply never repeats a user's presence.
            ClientBody::GetPresence(g) => Command::GetPresence {
                targets: parse_ids(g.user_ids, limits)?,
            },
            ClientBody::DirectedPresence(d) => {
                let targets = parse_ids(d.user_ids, limits)?;
                if targets.is_empty() {
                    return Err(bad("user_ids is empty"));
                }
                let change = match &d.presence {
                    Some(p) => parse_change(p, limits)?,
                    None => PresenceChange::default(),
                };
                Command::DirectedPresence { targets, change }
            }
            ClientBody::JoinChannel(j) => {
                check_state(&j.state, limits)?;
                Command::JoinChannel {
                    channel: channel_id(j.channel)?,
                    state: j.state,
                }
            }
            ClientBody::LeaveChannel(l) => Command::LeaveChannel {
                channel: channel_id(l.channel)?,
            },
            ClientBody::WatchChannel(w) => Command::WatchChannel {
                channel: channel_id(w.channel)?,
            },
            ClientBody::UnwatchChannel(u) => Command::UnwatchChannel {
                channel: channel_id(u.channel)?,
            },
            ClientBody::WhoNow(w) => {
                let mode = pb::WhoNowMode::try_from(w.mode)
                    .map_err(|_| bad(format!("unknown who-now mode {}", w.mode)))?;
                Command::WhoNow {
                    channel: channel_id(w.channel)?,
                    mode,
                    after: decode_member_cursor(&w.cursor)?,
                    page_size: page_size(w.page_size, limits)?,
                }
            }
            ClientBody::WhereNow(w) => Command::WhereNow {
                user: optional_user(w.user_id)?,
            },
            ClientBody::SetChannelState(c) => {
                check_state(&c.state, limits)?;
                Command::SetChannelState {
                    channel: channel_id(c.channel)?,
                    state: c.state,
                    replace: c.replace,
                }
            }
            ClientBody::GetChannelState(g) => Command::GetChannelState {
                channel: channel_id(g.channel)?,
                user: optional_user(g.user_id)?,
            },
            ClientBody::SetDelivery(d) => Command::SetDelivery(parse_delivery(d, limits)?),
            ClientBody::SetInvisible(i) => Command::SetInvisible {
                on: i.invisible,
                device: match pb::InvisibleScope::try_from(i.scope) {
                    Ok(pb::InvisibleScope::User) => false,
                    Ok(pb::InvisibleScope::Device) => true,
                    Err(_) => return Err(bad("unknown invisibility scope")),
                },
            },
            ClientBody::Block(b) => Command::Block {
                targets: nonempty_ids(b.user_ids, limits)?,
            },
            ClientBody::Unblock(b) => Command::Unblock {
                targets: nonempty_ids(b.user_ids, limits)?,
            },
            ClientBody::ListBlocked(l) => Command::ListBlocked {
                after: decode_cursor(&l.cursor)?,
                page_size: page_size(l.page_size, limits)?,
            },
            ClientBody::SetPrivacy(p) => Command::SetPrivacy {
                presence: audience(p.presence_audience)?,
                last_seen: audience(p.last_seen_audience)?,
            },
            ClientBody::GetPrivacy(_) => Command::GetPrivacy,
            ClientBody::SetApproval(a) => Command::SetApproval {
                others: nonempty_ids(a.user_ids, limits)?,
                answer: match pb::ApprovalAction::try_from(a.action) {
                    Ok(pb::ApprovalAction::Approve) => crate::privacy::Answer::Approve,
                    Ok(pb::ApprovalAction::Deny) => crate::privacy::Answer::Deny,
                    Ok(pb::ApprovalAction::Revoke) => crate::privacy::Answer::Revoke,
                    _ => return Err(bad("action: approve, deny or revoke")),
                },
            },
            ClientBody::ListApprovals(l) => Command::ListApprovals {
                state: match pb::ApprovalState::try_from(l.state) {
                    Ok(pb::ApprovalState::Unspecified) => None,
                    Ok(state) => Some(state),
                    Err(_) => return Err(bad("state: unknown value")),
                },
                after: decode_cursor(&l.cursor)?,
                page_size: page_size(l.page_size, limits)?,
            },
            ClientBody::Resume(r) => {
                if r.known.len() > limits.max_subscriptions as usize {
                    return Err(limit(format!(
                        "known: {} entries; at most {} (limits.max_subscriptions)",
                        r.known.len(),
                        limits.max_subscriptions
                    )));
                }
                let after = optional_user(r.after_user_id)?;
                let through = optional_user(r.through_user_id)?;
                if let (Some(a), Some(t)) = (&after, &through) {
                    if a >= t {
                        return Err(bad(format!(
                            "after_user_id {a:?} must sort before through_user_id {t:?}"
                        )));
                    }
                }
                let mut known = std::collections::HashMap::with_capacity(r.known.len());
                for k in r.known {
                    check_user_id(&k.user_id).map_err(invalid_id)?;
                    if !in_range(&k.user_id, after.as_deref(), through.as_deref()) {
                        return Err(bad(format!(
                            "known user {:?} is outside this page's range (after_user_id \
                             {:?}, through_user_id {:?})",
                            k.user_id,
                            after.as_deref().unwrap_or(""),
                            through.as_deref().unwrap_or("")
                        )));
                    }
                    known.insert(k.user_id, k.version);
                }
                Command::Resume {
                    known,
                    after,
                    through,
                }
            }
            ClientBody::RemoveChannelState(r) => {
                if r.keys.len() > limits.max_state_pairs as usize {
                    return Err(limit(format!(
                        "{} keys; at most {} per request",
                        r.keys.len(),
                        limits.max_state_pairs
                    )));
                }
                for key in &r.keys {
                    check_len("state key", key, limits.max_state_key_bytes)?;
                }
                Command::RemoveChannelState {
                    channel: channel_id(r.channel)?,
                    keys: r.keys,
                }
            }
        })
    }
}

/// Longest batch interval of a delivery contract.
pub const MAX_DELIVERY_INTERVAL_SECS: u32 = 3600;

/// A SetDelivery → the contract (`None`: live).
fn parse_delivery(
    d: pb::SetDelivery,
    limits: &LimitsConfig,
) -> Result<Option<crate::delivery::Contract>, RequestError> {
    use crate::delivery::{Contract, Fields};
    let mode = pb::DeliveryMode::try_from(d.mode).map_err(|_| bad("mode: unknown value"))?;
    let fields = match pb::FieldSelection::try_from(d.fields) {
        Ok(pb::FieldSelection::All) => Fields::All,
        Ok(pb::FieldSelection::Availability) => Fields::Availability,
        Ok(pb::FieldSelection::AvailabilityAndStatus) => Fields::AvailabilityAndStatus,
        Err(_) => return Err(bad("fields: unknown value")),
    };
    match mode {
        pb::DeliveryMode::Live => {
            if d.interval_seconds != 0 || fields != Fields::All || !d.live_user_ids.is_empty() {
                return Err(bad(
                    "interval_seconds, fields and live_user_ids apply to BATCHED only",
                ));
            }
            Ok(None)
        }
        pb::DeliveryMode::Batched => {
            if d.interval_seconds == 0 || d.interval_seconds > MAX_DELIVERY_INTERVAL_SECS {
                return Err(bad(format!(
                    "interval_seconds must be 1..={MAX_DELIVERY_INTERVAL_SECS} for BATCHED"
                )));
            }
            let live = parse_ids(d.live_user_ids, limits)?;
            Ok(Some(Contract {
                interval: Duration::from_secs(u64::from(d.interval_seconds)),
                fields,
                live: live.into_iter().collect(),
            }))
        }
    }
}

/// Most bytes of an idempotency key.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 64;

fn idempotency_key(key: String) -> Result<Option<String>, RequestError> {
    if key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
        return Err(limit(format!(
            "idempotency_key is {} bytes; the limit is {MAX_IDEMPOTENCY_KEY_BYTES}",
            key.len()
        )));
    }
    Ok((!key.is_empty()).then_some(key))
}

pub(crate) fn channel_id(id: String) -> Result<String, RequestError> {
    check_user_id(&id)
        .map_err(|reason| bad(format!("channel id: {}", reason.replace("user id", "id"))))?;
    Ok(id)
}

/// Whether `user` is in the page range `after` < user <= `through` (a missing bound is open).
pub(crate) fn in_range(user: &str, after: Option<&str>, through: Option<&str>) -> bool {
    after.is_none_or(|a| user > a) && through.is_none_or(|t| user <= t)
}

/// Distinct, valid ids, at least one.
/// An audience from the wire (`None`: unchanged).
fn audience(value: i32) -> Result<Option<crate::privacy::Audience>, RequestError> {
    use crate::privacy::Audience;
    match pb::Audience::try_from(value) {
        Ok(pb::Audience::Unspecified) => Ok(None),
        Ok(pb::Audience::Everyone) => Ok(Some(Audience::Everyone)),
        Ok(pb::Audience::Approved) => Ok(Some(Audience::Approved)),
        Ok(pb::Audience::Nobody) => Ok(Some(Audience::Nobody)),
        Err(_) => Err(bad("audience: everyone, approved or nobody")),
    }
}

/// An audience for the wire.
pub(crate) fn audience_to_pb(a: crate::privacy::Audience) -> pb::Audience {
    match a {
        crate::privacy::Audience::Everyone => pb::Audience::Everyone,
        crate::privacy::Audience::Approved => pb::Audience::Approved,
        crate::privacy::Audience::Nobody => pb::Audience::Nobody,
    }
}

/// An approval entry's state for the wire.
pub(crate) fn approval_state(a: &crate::privacy::Approval) -> pb::ApprovalState {
    match a {
        crate::privacy::Approval::Pending { .. } => pb::ApprovalState::Pending,
        crate::privacy::Approval::Approved { .. } => pb::ApprovalState::Approved,
        crate::privacy::Approval::Denied { .. } | crate::privacy::Approval::Revoked { .. } => {
            pb::ApprovalState::Denied
        }
    }
}

/// `user`'s privacy settings as the wire shows them to the user.
pub(crate) fn privacy_settings(registry: &Registry, user: &str) -> pb::PrivacySettings {
    let summary = registry.privacy_summary(user);
    pb::PrivacySettings {
        presence_audience: audience_to_pb(summary.audience) as i32,
        last_seen_audience: audience_to_pb(summary.last_seen_audience) as i32,
        invisible: summary.invisible,
        blocked: summary.blocked as u32,
        approved: summary.approved as u32,
        pending: summary.pending as u32,
        invisible_devices: registry.invisible_devices(user),
    }
}

fn nonempty_ids(ids: Vec<String>, limits: &LimitsConfig) -> Result<Vec<String>, RequestError> {
    let ids = parse_ids(ids, limits)?;
    if ids.is_empty() {
        return Err(bad("user_ids is empty"));
    }
    Ok(ids)
}

fn optional_user(id: String) -> Result<Option<String>, RequestError> {
    if id.is_empty() {
        return Ok(None);
    }
    check_user_id(&id).map_err(invalid_id)?;
    Ok(Some(id))
}

pub(crate) fn page_size(requested: u32, limits: &LimitsConfig) -> Result<usize, RequestError> {
    Ok(match requested {
        0 => limits.max_page_size,
        n if n > limits.max_page_size => {
            return Err(limit(format!(
                "page_size {n} exceeds the limit of {}",
                limits.max_page_size
            )))
        }
        n => n,
    } as usize)
}

/// Checks a key/value state map against the per-key, per-value and pair-count limits.
fn check_state(
    state: &BTreeMap<String, String>,
    limits: &LimitsConfig,
) -> Result<(), RequestError> {
    if state.len() > limits.max_state_pairs as usize {
        return Err(limit(format!(
            "state has {} pairs; the limit is {}",
            state.len(),
            limits.max_state_pairs
        )));
    }
    for (k, v) in state {
        if k.is_empty() {
            return Err(bad("state key is empty"));
        }
        check_len("state key", k, limits.max_state_key_bytes)?;
        check_len(
            &format!("state value of {k:?}"),
            v,
            limits.max_state_value_bytes,
        )?;
    }
    Ok(())
}

fn invalid_id(reason: String) -> RequestError {
    RequestError::new(pb::ErrorCode::InvalidUserId, reason)
}

pub(crate) fn check_id_count(n: usize, limits: &LimitsConfig) -> Result<(), RequestError> {
    if n > limits.max_ids_per_request as usize {
        return Err(RequestError::new(
            pb::ErrorCode::TooManyIds,
            format!(
                "{n} user ids; at most {} per request",
                limits.max_ids_per_request
            ),
        ));
    }
    Ok(())
}

/// Checks count and form, and folds duplicates keeping first occurrences.
pub(crate) fn parse_ids(
    ids: Vec<String>,
    limits: &LimitsConfig,
) -> Result<Vec<String>, RequestError> {
    check_id_count(ids.len(), limits)?;
    let mut out: Vec<String> = Vec::with_capacity(ids.len());
    for id in ids {
        check_user_id(&id).map_err(invalid_id)?;
        if !out.contains(&id) {
            out.push(id);
        }
    }
    Ok(out)
}

fn check_len(what: &str, value: &str, max: u32) -> Result<(), RequestError> {
    if value.len() > max as usize {
        return Err(limit(format!(
            "{what} is {} bytes; the limit is {max}",
            value.len()
        )));
    }
    Ok(())
}

pub(crate) fn parse_change(
    p: &pb::SetPresence,
    limits: &LimitsConfig,
) -> Result<PresenceChange, RequestError> {
    let availability = wire::availability_from_pb(p.availability)
        .map_err(|v| bad(format!("unknown availability {v}")))?;
    let show = match p.show {
        Some(s) if s > u32::from(u16::MAX) => {
            return Err(bad(format!("show {s} does not fit in 16 bits")))
        }
        Some(s) => Some(s as u16),
        None => None,
    };
    if let Some(status) = &p.status {
        check_len("status", status, limits.max_status_bytes)?;
    }
    if let Some(description) = &p.description {
        check_len("description", description, limits.max_description_bytes)?;
    }
    if p.state.len() > limits.max_state_pairs as usize {
        return Err(limit(format!(
            "state has {} pairs; the limit is {}",
            p.state.len(),
            limits.max_state_pairs
        )));
    }
    for (k, v) in &p.state {
        if k.is_empty() {
            return Err(bad("state key is empty"));
        }
        check_len("state key", k, limits.max_state_key_bytes)?;
        check_len(
            &format!("state value of {k:?}"),
            v,
            limits.max_state_value_bytes,
        )?;
    }
    Ok(PresenceChange {
        availability,
        show,
        status: p.status.clone(),
        description: p.description.clone(),
        state: p.state.clone(),
        replace_state: p.replace_state,
    })
}

fn parse_connect(c: pb::Connect, limits: &LimitsConfig) -> Result<ConnectRequest, RequestError> {
    if c.platform.len() > 32 {
        return Err(limit(format!(
            "platform is {} bytes; the limit is 32",
            c.platform.len()
        )));
    }
    let user_data_bytes: usize = c.user_data.iter().map(|(k, v)| k.len() + v.len()).sum();
    if user_data_bytes > limits.max_user_data_bytes as usize {
        return Err(limit(format!(
            "user_data is {user_data_bytes} bytes; the limit is {}",
            limits.max_user_data_bytes
        )));
    }
    let initial = c
        .initial_presence
        .as_ref()
        .map(|p| parse_change(p, limits))
        .transpose()?;
    Ok(ConnectRequest {
        token: c.token,
        device_id: c.device_id,
        platform: c.platform,
        keepalive_secs: c.keepalive_seconds,
        initial,
        user_data: c.user_data,
        invisible: c.invisible,
        invisible_device: c.invisible_device,
    })
}

const CURSOR_PREFIX: &str = "s1:";
const MEMBER_CURSOR_PREFIX: &str = "w1:";

fn bad_cursor() -> RequestError {
    RequestError::new(
        pb::ErrorCode::BadCursor,
        "cursor was not issued by this server",
    )
}

pub(crate) fn encode_cursor(after: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{CURSOR_PREFIX}{after}"))
}

/// The text behind an opaque cursor, without its kind prefix.
fn open_cursor(cursor: &str, prefix: &str) -> Result<String, RequestError> {
    let raw = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| bad_cursor())?;
    let text = String::from_utf8(raw).map_err(|_| bad_cursor())?;
    text.strip_prefix(prefix)
        .map(str::to_string)
        .ok_or_else(bad_cursor)
}

pub(crate) fn decode_cursor(cursor: &str) -> Result<Option<String>, RequestError> {
    if cursor.is_empty() {
        return Ok(None);
    }
    let after = open_cursor(cursor, CURSOR_PREFIX)?;
    check_user_id(&after).map_err(|_| bad_cursor())?;
    Ok(Some(after))
}

pub(crate) fn encode_member_cursor(user: &str, device: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{MEMBER_CURSOR_PREFIX}{user}\0{device}"))
}

pub(crate) fn decode_member_cursor(cursor: &str) -> Result<Option<(String, String)>, RequestError> {
    if cursor.is_empty() {
        return Ok(None);
    }
    let text = open_cursor(cursor, MEMBER_CURSOR_PREFIX)?;
    let (user, device) = text.split_once('\0').ok_or_else(bad_cursor)?;
    check_user_id(user).map_err(|_| bad_cursor())?;
    Ok(Some((user.to_string(), device.to_string())))
}

/// The device a Connect opens: the identity's, else the one the client names, else
/// `default`; refused unless 1-128 bytes without control characters.
pub fn connect_device_id(
    request: &ConnectRequest,
    identity: &Identity,
) -> Result<String, RequestError> {
    let device_id = match &identity.device_id {
        Some(did) => did.clone(),
        None if request.device_id.is_empty() => "default".to_string(),
        None => request.device_id.clone(),
    };
    if device_id.is_empty() || device_id.len() > 128 || device_id.chars().any(char::is_control) {
        return Err(bad(
            "device id must be 1-128 bytes without control characters",
        ));
    }
    Ok(device_id)
}

/// Why an authenticated identity may still not connect (its auth-failure metric reason and
/// the error), or `None`: a user id the wire would refuse (the default authenticator checked
/// it already; another one may return anything), or a token issued before the user's tokens
/// were revoked. No side effects: [`connect`] counts the failure.
pub fn identity_refusal(
    identity: &Identity,
    registry: &Registry,
) -> Option<(&'static str, RequestError)> {
    if let Err(r) = check_user_id(&identity.user_id) {
        return Some((
            "bad_subject",
            RequestError::new(
                pb::ErrorCode::Unauthenticated,
                format!("authenticated user id: {r}"),
            ),
        ));
    }
    let before_ms = registry
        .store()
        .tokens_revoked_before(&identity.user_id, crate::now_ms())?;
    let issued_ms = identity.issued_at_secs.unwrap_or(0).saturating_mul(1000);
    (issued_ms < before_ms).then(|| {
        (
            "revoked",
            RequestError::new(
                pb::ErrorCode::TokenRevoked,
                format!(
                    "tokens of this user issued before {before_ms} ms were revoked (this one: {}); get a fresh token",
                    identity
                        .issued_at_secs
                        .map_or("no iat".to_string(), |i| format!("iat {i} s"))
                ),
            ),
        )
    })
}

/// Registers the session of a Connect its authenticator accepted as `identity` (after the
/// checks every authenticator gets: the user id's shape and the user's revocation). On success
/// returns the session and the ConnAck body; on failure the error to send before closing.
pub fn connect(
    request: ConnectRequest,
    identity: Identity,
    registry: &Registry,
    config: &Config,
    outbound: &Outbound,
    received_at: Instant,
) -> Result<(Session, ServerBody), RequestError> {
    if let Some((reason, error)) = identity_refusal(&identity, registry) {
        metrics::counter!(crate::metrics::AUTH_FAILURES, "reason" => reason).increment(1);
        return Err(error);
    }
    let claims = identity;
    let device_id = connect_device_id(&request, &claims)?;
    let keepalive_secs = config.session.clamp_keepalive(request.keepalive_secs);
    if request.invisible {
        // The shell makes the user invisible (awaiting the store) and clears the flag; this
        // synchronous core never waits on a disk.
        return Err(RequestError::new(
            pb::ErrorCode::Internal,
            "starting invisible was not carried out before the connect",
        ));
    }
    let attached = registry.attach(Attach {
        user_id: claims.user_id.clone(),
        device_id: device_id.clone(),
        platform: request.platform,
        outbound: outbound.clone(),
        initial: request.initial,
        user_data: request.user_data,
        received_at,
        invisible: request.invisible_device,
    })?;
    let l = &config.limits;
    let ack = pb::ConnAck {
        user_id: claims.user_id.clone(),
        device_id: device_id.clone(),
        keepalive_seconds: keepalive_secs,
        server_time_ms: crate::now_ms(),
        limits: Some(pb::Limits {
            max_frame_bytes: l.max_frame_bytes,
            max_ids_per_request: l.max_ids_per_request,
            max_subscriptions: l.max_subscriptions,
            max_subscription_expiry_seconds: l.max_expiry_secs,
            max_state_pairs: l.max_state_pairs,
            max_state_key_bytes: l.max_state_key_bytes,
            max_state_value_bytes: l.max_state_value_bytes,
            max_status_bytes: l.max_status_bytes,
            max_page_size: l.max_page_size,
            publish_rate_per_second: l.publish_rate_per_sec,
            publish_burst: l.publish_burst,
        }),
        session_taken_over: attached.taken_over,
        presence: Some(wire::presence_to_pb(&attached.presence)),
        invisible: registry.is_invisible(&claims.user_id),
        device_invisible: registry.is_device_invisible(&claims.user_id, &device_id),
    };
    let session = Session {
        user_id: claims.user_id,
        device_id,
        conn_id: outbound.id(),
        keepalive_secs,
        token_exp: claims.expires_at_secs,
        publish_bucket: TokenBucket::new(l.publish_rate_per_sec, l.publish_burst, received_at),
    };
    Ok((session, ServerBody::ConnAck(ack)))
}

/// A successful request's reply.
#[derive(Debug)]
pub struct Reply {
    /// What to send.
    pub body: ServerBody,
    /// The request changed stored subscriptions: send the reply only once they are durable.
    pub needs_commit: bool,
}

/// Cluster mode: a Subscribe or Unsubscribe, checked and turned into the operation every
/// node applies from the replicated log, with the client's retry key when it gave one (hashed
/// with the user and the request's content, so one user's key never folds another request).
/// `None` for any other command.
pub fn logged_op(
    command: &Command,
    session: &Session,
    limits: &LimitsConfig,
) -> Option<Result<(LoggedOp, Option<String>), RequestError>> {
    use sha2::{Digest, Sha256};
    let now_ms = crate::now_ms();
    let (op, client_key) = match command {
        Command::Subscribe {
            targets,
            expiry_secs,
            idempotency_key,
        } => {
            if targets.contains(&session.user_id) {
                return Some(Err(RequestError::new(
                    pb::ErrorCode::SelfSubscription,
                    "you cannot subscribe to yourself",
                )));
            }
            let op = LoggedOp::Subscribe {
                subscriber: session.user_id.clone(),
                targets: targets.clone(),
                expires_at_ms: now_ms.saturating_add(expiry_secs.saturating_mul(1000)),
                now_ms,
                cap: limits.max_subscriptions as usize,
            };
            (
                op,
                idempotency_key.as_ref().map(|k| (k, b"sub", *expiry_secs)),
            )
        }
        Command::Unsubscribe {
            targets,
            idempotency_key,
        } => {
            let op = LoggedOp::Unsubscribe {
                subscriber: session.user_id.clone(),
                targets: targets.clone(),
                now_ms,
            };
            (op, idempotency_key.as_ref().map(|k| (k, b"uns", 0)))
        }
        _ => return None,
    };
    let msg_id = client_key.map(|(key, kind, expiry)| {
        let mut h = Sha256::new();
        h.update(session.user_id.as_bytes());
        h.update([0]);
        h.update(key.as_bytes());
        h.update([0]);
        h.update(kind);
        h.update(expiry.to_be_bytes());
        if let LoggedOp::Subscribe { targets, .. } | LoggedOp::Unsubscribe { targets, .. } = &op {
            for t in targets {
                h.update(t.as_bytes());
                h.update([0]);
            }
        }
        let digest = h.finalize();
        let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        format!("k-{hex}")
    });
    Some(Ok((op, msg_id)))
}

/// The reply to a logged Subscribe or Unsubscribe once it is applied here.
pub fn logged_reply(op: &LoggedOp, outcome: LoggedOutcome, registry: &Registry) -> ServerBody {
    match (op, outcome) {
        (
            LoggedOp::Subscribe {
                subscriber,
                targets,
                expires_at_ms,
                ..
            },
            LoggedOutcome::Subscribed(outcome),
        ) => {
            let presences = registry.snapshots_for(Viewer::User(subscriber), targets);
            ServerBody::SubscribeResult(pb::SubscribeResult {
                presences: presences.iter().map(wire::presence_to_pb).collect(),
                expires_at_ms: *expires_at_ms,
                evicted_user_ids: outcome.evicted,
                subscription_count: outcome.count as u32,
            })
        }
        (LoggedOp::Unsubscribe { .. }, LoggedOutcome::Unsubscribed(removed, count)) => {
            ServerBody::UnsubscribeResult(pb::UnsubscribeResult {
                removed: removed as u32,
                subscription_count: count as u32,
            })
        }
        (op, outcome) => RequestError::new(
            pb::ErrorCode::Internal,
            format!("unexpected outcome {outcome:?} for {op:?}"),
        )
        .to_body("subscribe"),
    }
}

/// Applies a session-level command (anything but Connect and Disconnect, which the connection
/// handles) and returns the reply.
pub fn execute(
    command: Command,
    session: &mut Session,
    registry: &Registry,
    limits: &LimitsConfig,
    received_at: Instant,
) -> Result<Reply, RequestError> {
    execute_body(command, session, registry, limits, received_at).map(|body| {
        let needs_commit = matches!(
            body,
            ServerBody::SubscribeResult(_)
                | ServerBody::UnsubscribeResult(_)
                | ServerBody::SetInvisibleResult(_)
                | ServerBody::BlockResult(_)
                | ServerBody::PrivacySettings(_)
                | ServerBody::SetApprovalResult(_)
        );
        Reply { body, needs_commit }
    })
}

/// The privacy change a command asks for, on behalf of `user` (`None`: not one).
pub fn privacy_op_of(command: &Command, user: &str) -> Option<PrivacyOp> {
    let user = user.to_string();
    Some(match command {
        Command::SetInvisible { on, device: false } => PrivacyOp::SetInvisible { user, on: *on },
        Command::Block { targets } => PrivacyOp::Block {
            user,
            targets: targets.clone(),
        },
        Command::Unblock { targets } => PrivacyOp::Unblock {
            user,
            targets: targets.clone(),
        },
        Command::SetPrivacy {
            presence,
            last_seen,
        } => PrivacyOp::SetAudience {
            user,
            presence: *presence,
            last_seen: *last_seen,
        },
        Command::SetApproval { others, answer } => PrivacyOp::Answer {
            user,
            others: others.clone(),
            answer: *answer,
        },
        _ => return None,
    })
}

/// The reply to a privacy command whose change (`records`, none when nothing changed) has been
/// carried out for `user`.
pub fn privacy_reply(
    command: &Command,
    user: &str,
    device: &str,
    registry: &Registry,
    records: &[crate::privacy::PrivacyRecord],
) -> ServerBody {
    use crate::privacy::PrivacyRecord;
    match command {
        Command::SetInvisible { .. } => {
            let presence = registry.snapshot(user);
            ServerBody::SetInvisibleResult(pb::SetInvisibleResult {
                invisible: registry.is_invisible(user),
                presence: Some(wire::presence_to_pb(&presence)),
                device_invisible: registry.is_device_invisible(user, device),
            })
        }
        Command::Block { .. } | Command::Unblock { .. } => {
            let changed = records
                .iter()
                .filter(|r| matches!(r, PrivacyRecord::Block { .. }))
                .count();
            let (_, total) = registry.blocked_page(user, None, 0);
            ServerBody::BlockResult(pb::BlockResult {
                changed: changed as u32,
                total: total as u32,
            })
        }
        Command::SetApproval { others, .. } => {
            let changed = records
                .iter()
                .filter(
                    |r| matches!(r, PrivacyRecord::Approval { other, .. } if others.contains(other)),
                )
                .count();
            ServerBody::SetApprovalResult(pb::SetApprovalResult {
                changed: changed as u32,
            })
        }
        _ => ServerBody::PrivacySettings(privacy_settings(registry, user)),
    }
}

fn execute_body(
    command: Command,
    session: &mut Session,
    registry: &Registry,
    limits: &LimitsConfig,
    received_at: Instant,
) -> Result<ServerBody, RequestError> {
    let now_ms = crate::now_ms();
    match command {
        Command::Connect(_) => Err(RequestError::new(
            pb::ErrorCode::AlreadyConnected,
            "this connection is already authenticated",
        )),
        Command::Ping => Ok(ServerBody::Pong(pb::Pong {
            server_time_ms: now_ms,
        })),
        Command::Disconnect => Err(bad("disconnect is handled by the connection")),
        Command::SetDelivery(_) => Err(bad("set_delivery is handled by the connection")),
        Command::Resume { .. } => Err(bad("resume is handled by the connection")),
        Command::SetPresence(change) => {
            session
                .publish_bucket
                .take(received_at)
                .map_err(|wait| rate_limited("set_presence", wait))?;
            let presence = registry.publish(
                &session.user_id,
                &session.device_id,
                session.conn_id,
                &change,
                received_at,
            )?;
            Ok(ServerBody::SetPresenceResult(pb::SetPresenceResult {
                presence: Some(wire::presence_to_pb(&presence)),
            }))
        }
        Command::Subscribe {
            targets,
            expiry_secs,
            ..
        } => {
            if targets.contains(&session.user_id) {
                return Err(RequestError::new(
                    pb::ErrorCode::SelfSubscription,
                    "you cannot subscribe to yourself",
                ));
            }
            let expires_at_ms = now_ms.saturating_add(expiry_secs.saturating_mul(1000));
            let outcome = registry.store().subscribe(
                &session.user_id,
                &targets,
                expires_at_ms,
                now_ms,
                limits.max_subscriptions as usize,
            )?;
            // A target whose audience needs approval gets a request (stored in the same
            // commit as the subscription); the reply is the same either way.
            registry.privacy_requests(&session.user_id, &targets, received_at);
            let presences = registry.snapshots_for(Viewer::User(&session.user_id), &targets);
            Ok(ServerBody::SubscribeResult(pb::SubscribeResult {
                presences: presences.iter().map(wire::presence_to_pb).collect(),
                expires_at_ms,
                evicted_user_ids: outcome.evicted,
                subscription_count: outcome.count as u32,
            }))
        }
        Command::Unsubscribe { targets, .. } => {
            let (removed, count) =
                registry
                    .store()
                    .unsubscribe(&session.user_id, &targets, now_ms)?;
            Ok(ServerBody::UnsubscribeResult(pb::UnsubscribeResult {
                removed: removed as u32,
                subscription_count: count as u32,
            }))
        }
        Command::ListSubscriptions { after, page_size } => {
            let page =
                registry
                    .store()
                    .list(&session.user_id, after.as_deref(), page_size, now_ms)?;
            let next_cursor = match (page.has_more, page.entries.last()) {
                (true, Some((last, _))) => encode_cursor(last),
                _ => String::new(),
            };
            Ok(ServerBody::ListSubscriptionsResult(
                pb::ListSubscriptionsResult {
                    subscriptions: page
                        .entries
                        .into_iter()
                        .map(|(user_id, expires_at_ms)| pb::Subscription {
                            user_id,
                            expires_at_ms,
                        })
                        .collect(),
                    next_cursor,
                    total: page.total as u32,
                },
            ))
        }
        Command::SetInvisible { on, device: true } => {
            let presence = registry.set_device_invisible(
                &session.user_id,
                &session.device_id,
                session.conn_id,
                on,
                received_at,
            )?;
            Ok(ServerBody::SetInvisibleResult(pb::SetInvisibleResult {
                invisible: registry.is_invisible(&session.user_id),
                presence: Some(wire::presence_to_pb(&presence)),
                device_invisible: on,
            }))
        }
        c @ (Command::SetInvisible { .. }
        | Command::Block { .. }
        | Command::Unblock { .. }
        | Command::SetPrivacy { .. }
        | Command::SetApproval { .. }) => {
            let Some(op) = privacy_op_of(&c, &session.user_id) else {
                return Err(bad("not a privacy change"));
            };
            let records = registry.privacy_op(&op, received_at)?;
            Ok(privacy_reply(
                &c,
                &session.user_id,
                &session.device_id,
                registry,
                &records,
            ))
        }
        Command::GetPrivacy => Ok(ServerBody::PrivacySettings(privacy_settings(
            registry,
            &session.user_id,
        ))),
        Command::ListApprovals {
            state,
            after,
            page_size,
        } => {
            let filter =
                |a: &crate::privacy::Approval| state.is_none_or(|s| approval_state(a) == s);
            let (page, total) =
                registry.approvals_page(&session.user_id, &filter, after.as_deref(), page_size + 1);
            let has_more = page.len() > page_size;
            let page = &page[..page.len().min(page_size)];
            let next_cursor = match (has_more, page.last()) {
                (true, Some((last, _))) => encode_cursor(last),
                _ => String::new(),
            };
            Ok(ServerBody::ListApprovalsResult(pb::ListApprovalsResult {
                approvals: page
                    .iter()
                    .map(|(user_id, a)| pb::Approval {
                        user_id: user_id.clone(),
                        state: approval_state(a) as i32,
                        since_ms: a.since_ms(),
                    })
                    .collect(),
                next_cursor,
                total: total as u32,
            }))
        }
        Command::ListBlocked { after, page_size } => {
            let (page, total) =
                registry.blocked_page(&session.user_id, after.as_deref(), page_size + 1);
            let has_more = page.len() > page_size;
            let page = &page[..page.len().min(page_size)];
            let next_cursor = match (has_more, page.last()) {
                (true, Some((last, _))) => encode_cursor(last),
                _ => String::new(),
            };
            Ok(ServerBody::ListBlockedResult(pb::ListBlockedResult {
                blocked: page
                    .iter()
                    .map(|(user_id, since_ms)| pb::BlockedUser {
                        user_id: user_id.clone(),
                        since_ms: *since_ms,
                    })
                    .collect(),
                next_cursor,
                total: total as u32,
            }))
        }
        Command::GetPresence { targets } => {
            let presences = registry.snapshots_for(Viewer::User(&session.user_id), &targets);
            Ok(ServerBody::GetPresenceResult(pb::GetPresenceResult {
                presences: presences.iter().map(wire::presence_to_pb).collect(),
            }))
        }
        Command::DirectedPresence { targets, change } => {
            session
                .publish_bucket
                .take(received_at)
                .map_err(|wait| rate_limited("directed_presence", wait))?;
            let delivered = registry.direct(
                &session.user_id,
                &session.device_id,
                &targets,
                &change,
                received_at,
            )?;
            Ok(ServerBody::DirectedPresenceResult(
                pb::DirectedPresenceResult {
                    delivered_user_ids: delivered,
                },
            ))
        }
        Command::JoinChannel { channel, state } => {
            let outcome = registry.join_channel(
                &session.user_id,
                &session.device_id,
                session.conn_id,
                &channel,
                state,
                received_at,
            )?;
            Ok(channel_result(channel, outcome))
        }
        Command::LeaveChannel { channel } => {
            let outcome = registry.leave_channel(
                &session.user_id,
                &session.device_id,
                session.conn_id,
                &channel,
                received_at,
            )?;
            Ok(channel_result(channel, outcome))
        }
        Command::WatchChannel { channel } => {
            let outcome = registry.watch_channel(
                &session.user_id,
                &session.device_id,
                session.conn_id,
                &channel,
            )?;
            Ok(channel_result(channel, outcome))
        }
        Command::UnwatchChannel { channel } => {
            let outcome = registry.unwatch_channel(
                &session.user_id,
                &session.device_id,
                session.conn_id,
                &channel,
            )?;
            Ok(channel_result(channel, outcome))
        }
        Command::WhoNow {
            channel,
            mode,
            after,
            page_size,
        } => {
            let (limit, with_state) = match mode {
                pb::WhoNowMode::Count => (0, false),
                pb::WhoNowMode::Ids => (page_size, false),
                pb::WhoNowMode::IdsAndState => (page_size, true),
            };
            let page = registry.who_now_for(
                Viewer::User(&session.user_id),
                &channel,
                after,
                limit,
                with_state,
            );
            Ok(ServerBody::WhoNowResult(pb::WhoNowResult {
                channel,
                occupancy: page.occupancy,
                member_count: page.member_count,
                members: page
                    .members
                    .iter()
                    .map(wire::channel_member_to_pb)
                    .collect(),
                next_cursor: page
                    .next_after
                    .filter(|_| mode != pb::WhoNowMode::Count)
                    .map(|(u, d)| encode_member_cursor(&u, &d))
                    .unwrap_or_default(),
            }))
        }
        Command::WhereNow { user } => {
            let user_id = user.unwrap_or_else(|| session.user_id.clone());
            let channels = registry.where_now_for(Viewer::User(&session.user_id), &user_id);
            Ok(ServerBody::WhereNowResult(pb::WhereNowResult {
                user_id,
                channels,
            }))
        }
        Command::SetChannelState {
            channel,
            state,
            replace,
        } => {
            let member = registry.set_channel_state(
                &session.user_id,
                &session.device_id,
                session.conn_id,
                &channel,
                &state,
                replace,
                received_at,
            )?;
            Ok(channel_state_result(channel, vec![member]))
        }
        Command::GetChannelState { channel, user } => {
            let user_id = user.unwrap_or_else(|| session.user_id.clone());
            let members =
                registry.get_channel_state_for(Viewer::User(&session.user_id), &channel, &user_id);
            Ok(channel_state_result(channel, members))
        }
        Command::RemoveChannelState { channel, keys } => {
            let member = registry.remove_channel_state(
                &session.user_id,
                &session.device_id,
                session.conn_id,
                &channel,
                &keys,
                received_at,
            )?;
            Ok(channel_state_result(channel, vec![member]))
        }
    }
}

fn channel_result(channel: String, outcome: crate::registry::ChannelOutcome) -> ServerBody {
    ServerBody::ChannelResult(pb::ChannelResult {
        channel,
        occupancy: outcome.occupancy,
        changed: outcome.changed,
        state: outcome.state,
    })
}

fn channel_state_result(channel: String, members: Vec<crate::model::ChannelMember>) -> ServerBody {
    ServerBody::ChannelStateResult(pb::ChannelStateResult {
        channel,
        members: members.iter().map(wire::channel_member_to_pb).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_bucket_allows_burst_then_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 20, t0);
        for _ in 0..20 {
            b.take(t0).unwrap();
        }
        let wait = b.take(t0).unwrap_err();
        assert!(wait <= Duration::from_millis(100) && wait > Duration::ZERO);
        b.take(t0 + Duration::from_millis(100)).unwrap();
    }

    #[test]
    fn cursor_round_trip_and_rejects_foreign() {
        let c = encode_cursor("bob");
        assert_eq!(decode_cursor(&c).unwrap().as_deref(), Some("bob"));
        assert_eq!(decode_cursor("").unwrap(), None);
        for bad in ["???", "Ym9i", &URL_SAFE_NO_PAD.encode("s1:")] {
            assert_eq!(
                decode_cursor(bad).unwrap_err().code,
                pb::ErrorCode::BadCursor
            );
        }
    }

    #[test]
    fn ids_are_counted_checked_and_deduplicated() {
        let limits = LimitsConfig::default();
        let ids = vec!["a".to_string(), "b".into(), "a".into()];
        assert_eq!(parse_ids(ids, &limits).unwrap(), ["a", "b"]);
        let many: Vec<String> = (0..101).map(|i| format!("u{i}")).collect();
        assert_eq!(
            parse_ids(many, &limits).unwrap_err().code,
            pb::ErrorCode::TooManyIds
        );
        assert_eq!(
            parse_ids(vec!["".into()], &limits).unwrap_err().code,
            pb::ErrorCode::InvalidUserId
        );
    }
}
