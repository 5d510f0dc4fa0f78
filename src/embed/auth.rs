//! The [`Authenticator`] interface: what a Connect asks ([`AuthRequest`]), who it turns out to
//! be ([`Identity`]) or why not ([`AuthFailure`]), and the default implementation,
//! [`TokenAuthenticator`], which is the `[auth]` HMAC token check the standalone broker does.
//! Revocations (the admin API's revoke) and the user id's shape are checked after any
//! authenticator, in the Connect code (`command::connect`).

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use crate::auth::{AuthError, Verifier};
use crate::command::RequestError;
use crate::config::AuthConfig;
use crate::pb;

/// The future an [`Authenticator`] returns.
pub type AuthFuture<'a> = Pin<Box<dyn Future<Output = Result<Identity, AuthFailure>> + Send + 'a>>;

/// The listener a connection came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Transport {
    /// TLS TCP (`listen`).
    Tls,
    /// Plain TCP for trusted networks (`plain_listen`).
    Plain,
    /// WebSocket over TLS (`[websocket] listen`).
    Wss,
    /// WebSocket over plain TCP (`[websocket] plain_listen`).
    Ws,
}

impl Transport {
    /// `tls`, `plain`, `wss` or `ws`.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Tls => "tls",
            Transport::Plain => "plain",
            Transport::Wss => "wss",
            Transport::Ws => "ws",
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a Connect frame presents. The strings are the client's, unchecked: treat them as
/// hostile (they are at most a frame's size, `limits.max_frame_bytes_pre_auth`).
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct AuthRequest<'a> {
    /// The Connect's `token` field (a host application's session id, a signed token...).
    pub token: &'a str,
    /// The device id the client claims (`""` when it sent none). The [`Identity`] may override
    /// it.
    pub device_id: &'a str,
    /// The client's address.
    pub peer: SocketAddr,
    /// The listener it came in on.
    pub transport: Transport,
}

impl<'a> AuthRequest<'a> {
    /// A request (for tests of an authenticator; the server builds its own).
    pub fn new(token: &'a str, device_id: &'a str, peer: SocketAddr, transport: Transport) -> Self {
        AuthRequest {
            token,
            device_id,
            peer,
            transport,
        }
    }
}

/// Who an accepted Connect is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user id (1-128 bytes, no control characters; anything else is refused with reason
    /// `bad_subject`).
    pub user_id: String,
    /// The device id, overriding the one the client claimed (a token's `did`); `None` keeps
    /// the client's (or `default`).
    pub device_id: Option<String>,
    /// When the credential expires, seconds since the Unix epoch: with
    /// `session.close_on_token_expiry` the session is closed (TOKEN_EXPIRED) then, plus
    /// `auth.leeway_secs`. `None`: never.
    pub expires_at_secs: Option<u64>,
    /// When the credential was issued, seconds since the Unix epoch. A revocation in force for
    /// the user (admin API `POST /v1/users/{u}/revoke`) refuses credentials issued before its
    /// cut-off; `None` counts as issued at 0, so any revocation in force refuses it.
    pub issued_at_secs: Option<u64>,
}

impl Identity {
    /// `user_id`, keeping the client's device id, never expiring, issue time unknown.
    pub fn new(user_id: impl Into<String>) -> Identity {
        Identity {
            user_id: user_id.into(),
            device_id: None,
            expires_at_secs: None,
            issued_at_secs: None,
        }
    }

    /// Sets [`Identity::device_id`].
    pub fn device(mut self, device_id: impl Into<String>) -> Identity {
        self.device_id = Some(device_id.into());
        self
    }

    /// Sets [`Identity::expires_at_secs`].
    pub fn expires_at(mut self, secs: u64) -> Identity {
        self.expires_at_secs = Some(secs);
        self
    }

    /// Sets [`Identity::issued_at_secs`].
    pub fn issued_at(mut self, secs: u64) -> Identity {
        self.issued_at_secs = Some(secs);
        self
    }
}

/// What kind of refusal an [`AuthFailure`] is: it picks the error code the client sees and
/// whether the address pays the failed-login delay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AuthFailureKind {
    /// UNAUTHENTICATED; the failed-login delay applies.
    Unauthenticated,
    /// BAD_SIGNATURE; the failed-login delay applies.
    BadSignature,
    /// TOKEN_EXPIRED; the failed-login delay applies.
    Expired,
    /// TOKEN_REVOKED; no delay (the credential was genuine).
    Revoked,
    /// UNAVAILABLE with a retry hint: the authenticator could not decide (its backend is
    /// down). No delay; the connection is closed NODE_UNAVAILABLE.
    Unavailable,
}

impl AuthFailureKind {
    fn default_metric_reason(self) -> &'static str {
        match self {
            AuthFailureKind::Unauthenticated => "rejected",
            AuthFailureKind::BadSignature => "bad_signature",
            AuthFailureKind::Expired => "expired",
            AuthFailureKind::Revoked => "revoked",
            AuthFailureKind::Unavailable => "unavailable",
        }
    }
}

/// Why an [`Authenticator`] refused a Connect. The message goes back to the client as the
/// error's reason: never put secrets or long echoes of the client's input in it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct AuthFailure {
    kind: AuthFailureKind,
    metric_reason: &'static str,
    message: String,
    retry_after_ms: u64,
}

impl AuthFailure {
    /// A refusal of `kind`; counted under the kind's reason (`rejected`, `bad_signature`,
    /// `expired`, `revoked`, `unavailable`).
    pub fn new(kind: AuthFailureKind, message: impl Into<String>) -> AuthFailure {
        AuthFailure {
            kind,
            metric_reason: kind.default_metric_reason(),
            message: message.into(),
            retry_after_ms: 0,
        }
    }

    /// An UNAUTHENTICATED refusal (reason `rejected`).
    pub fn unauthenticated(message: impl Into<String>) -> AuthFailure {
        AuthFailure::new(AuthFailureKind::Unauthenticated, message)
    }

    /// An UNAVAILABLE refusal: the client should retry after `retry_after_ms`.
    pub fn unavailable(message: impl Into<String>, retry_after_ms: u64) -> AuthFailure {
        AuthFailure {
            retry_after_ms,
            ..AuthFailure::new(AuthFailureKind::Unavailable, message)
        }
    }

    /// Counts the refusal under `reason` in `presence_auth_failures_total{reason}` (a fixed
    /// label: a few distinct values, never per user).
    pub fn with_metric_reason(mut self, reason: &'static str) -> AuthFailure {
        self.metric_reason = reason;
        self
    }

    /// The kind.
    pub fn kind(&self) -> AuthFailureKind {
        self.kind
    }

    /// The `reason` label it is counted under.
    pub fn metric_reason(&self) -> &'static str {
        self.metric_reason
    }

    /// The message the client sees.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The authenticator did not answer within `limit`.
    pub(crate) fn timeout(limit: Duration) -> AuthFailure {
        AuthFailure::unauthenticated(format!(
            "authentication did not finish within {} ms",
            limit.as_millis()
        ))
        .with_metric_reason("timeout")
    }

    /// The authenticator panicked: a refusal like any other (counted, delayed, banned).
    pub(crate) fn panicked() -> AuthFailure {
        AuthFailure::unauthenticated("authentication failed").with_metric_reason("panic")
    }

    /// The error reply the client gets.
    pub(crate) fn into_request_error(self) -> RequestError {
        let code = match self.kind {
            AuthFailureKind::Unauthenticated => pb::ErrorCode::Unauthenticated,
            AuthFailureKind::BadSignature => pb::ErrorCode::BadSignature,
            AuthFailureKind::Expired => pb::ErrorCode::TokenExpired,
            AuthFailureKind::Revoked => pb::ErrorCode::TokenRevoked,
            AuthFailureKind::Unavailable => pb::ErrorCode::Unavailable,
        };
        RequestError {
            code,
            reason: self.message,
            retry_after_ms: self.retry_after_ms,
        }
    }
}

/// Decides who a Connect is. Called once per Connect from the connection's own task, under
/// the builder's timeout ([`ServerBuilder::auth_timeout`](super::ServerBuilder::auth_timeout)):
/// a slow answer holds up that connection only. Failures are counted in
/// `presence_auth_failures_total{reason}` ([`AuthFailure::metric_reason`]) and, for the
/// kinds that say so, delay the reply and count toward the address's ban like a bad token.
///
/// Implement it with an `async` block boxed into an [`AuthFuture`]:
///
/// ```
/// use presenced::embed::{AuthFailure, AuthFuture, AuthRequest, Authenticator, Identity};
///
/// struct Sessions(std::collections::HashMap<String, String>);
///
/// impl Authenticator for Sessions {
///     fn authenticate<'a>(&'a self, request: AuthRequest<'a>) -> AuthFuture<'a> {
///         Box::pin(async move {
///             self.0
///                 .get(request.token)
///                 .map(|user| Identity::new(user.clone()))
///                 .ok_or_else(|| AuthFailure::unauthenticated("unknown session"))
///         })
///     }
/// }
/// ```
pub trait Authenticator: Send + Sync + 'static {
    /// Accepts (with the identity) or refuses one Connect.
    fn authenticate<'a>(&'a self, request: AuthRequest<'a>) -> AuthFuture<'a>;
}

/// The default [`Authenticator`]: HS256 tokens signed with one of `[auth] secrets` (see
/// [`crate::auth`]), their subject a valid user id, their lifetime at most
/// `auth.max_token_lifetime_secs`. Answers at once (no I/O).
#[derive(Debug)]
pub struct TokenAuthenticator {
    verifier: Verifier,
    max_lifetime_secs: u64,
}

impl TokenAuthenticator {
    /// Verifies tokens as `config` says.
    pub fn new(config: &AuthConfig) -> TokenAuthenticator {
        TokenAuthenticator {
            verifier: Verifier::new(config),
            max_lifetime_secs: config.max_token_lifetime_secs,
        }
    }

    /// The synchronous check behind [`Authenticator::authenticate`], at `now_secs`.
    pub fn verify(&self, token: &str, now_secs: u64) -> Result<Identity, AuthFailure> {
        let claims = self.verifier.verify(token, now_secs).map_err(|e| {
            let kind = match e {
                AuthError::Malformed(_)
                | AuthError::NotYetValid { .. }
                | AuthError::BadIssuer
                | AuthError::BadAudience => AuthFailureKind::Unauthenticated,
                AuthError::BadSignature => AuthFailureKind::BadSignature,
                AuthError::Expired { .. } => AuthFailureKind::Expired,
            };
            AuthFailure::new(kind, e.to_string()).with_metric_reason(e.metric_label())
        })?;
        crate::model::check_user_id(&claims.sub).map_err(|r| {
            AuthFailure::unauthenticated(format!("token subject: {r}"))
                .with_metric_reason("bad_subject")
        })?;
        let max_life = self.max_lifetime_secs;
        // Measured from iat when there is one: a token may never outlive a revocation, which
        // is kept max_life from its cut-off.
        let issued = claims.iat.unwrap_or(now_secs).min(now_secs);
        if claims.exp > issued.saturating_add(max_life)
            || claims.exp > now_secs.saturating_add(max_life)
        {
            return Err(AuthFailure::unauthenticated(format!(
                "token lifetime too long: exp {} is more than auth.max_token_lifetime_secs ({max_life}) after its iat or now",
                claims.exp
            ))
            .with_metric_reason("lifetime"));
        }
        Ok(Identity {
            user_id: claims.sub,
            device_id: claims.did,
            expires_at_secs: Some(claims.exp),
            issued_at_secs: claims.iat,
        })
    }
}

impl Authenticator for TokenAuthenticator {
    fn authenticate<'a>(&'a self, request: AuthRequest<'a>) -> AuthFuture<'a> {
        Box::pin(std::future::ready(
            self.verify(request.token, crate::now_ms() / 1000),
        ))
    }
}

/// The authenticator a server uses and how long it may take (kept by the connection context).
#[derive(Clone)]
pub(crate) struct AuthPlugin {
    /// Decides who a Connect is.
    pub(crate) authenticator: std::sync::Arc<dyn Authenticator>,
    /// Past this, the Connect is refused (reason `timeout`).
    pub(crate) timeout: Duration,
}

impl fmt::Debug for AuthPlugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthPlugin")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl AuthPlugin {
    /// Runs the authenticator under the timeout. A panic in it (building the future or
    /// polling it) is a refusal like any other, so an authenticator that panics on crafted
    /// input gives an attacker no way around the failure delays and bans.
    pub(crate) async fn authenticate(
        &self,
        request: AuthRequest<'_>,
    ) -> Result<Identity, AuthFailure> {
        use futures_util::FutureExt;
        use std::panic::AssertUnwindSafe;
        let authenticator = &self.authenticator;
        let Ok(future) =
            std::panic::catch_unwind(AssertUnwindSafe(|| authenticator.authenticate(request)))
        else {
            tracing::warn!("the authenticator panicked: Connect refused");
            return Err(AuthFailure::panicked());
        };
        match tokio::time::timeout(self.timeout, AssertUnwindSafe(future).catch_unwind()).await {
            Ok(Ok(verdict)) => verdict,
            Ok(Err(_)) => {
                tracing::warn!("the authenticator panicked: Connect refused");
                Err(AuthFailure::panicked())
            }
            Err(_) => Err(AuthFailure::timeout(self.timeout)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_map_to_the_codes_and_reasons_of_the_standalone_broker() {
        let auth = TokenAuthenticator::new(&AuthConfig::default());
        let now = crate::now_ms() / 1000;
        let ok = auth
            .verify(&crate::auth::dev_token("alice", 60), now)
            .unwrap();
        assert_eq!(ok.user_id, "alice");
        assert!(ok.expires_at_secs.is_some_and(|e| e >= now + 59));
        let bad = auth.verify("a.b.c", now).unwrap_err();
        assert_eq!(bad.kind(), AuthFailureKind::Unauthenticated);
        assert_eq!(bad.metric_reason(), "malformed");
        let expired = auth
            .verify(&crate::auth::dev_token("alice", 60), now + 3600)
            .unwrap_err();
        assert_eq!(expired.kind(), AuthFailureKind::Expired);
        assert_eq!(
            expired.into_request_error().code,
            pb::ErrorCode::TokenExpired
        );
        let timeout = AuthFailure::timeout(Duration::from_millis(250));
        assert_eq!(timeout.metric_reason(), "timeout");
        assert!(timeout.into_request_error().is_auth_failure());
    }
}
