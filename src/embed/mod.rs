//! Running presenced inside another Rust program: the [`ServerBuilder`] (from
//! [`Server::builder`](crate::Server::builder)) and what an embedder can plug into it, each with
//! the standalone broker's behaviour as its default:
//!
//! | plug-in | trait | default |
//! |---|---|---|
//! | who a Connect is | [`Authenticator`] | [`TokenAuthenticator`]: the `[auth]` HMAC tokens |
//! | seeing transitions in-process | [`PresenceHook`] | none |
//! | where subscriptions live | [`SubscriptionStore`] | [`SledStore`](crate::store::SledStore) in `data_dir` |
//!
//! The core stays synchronous: the connection task (the async shell) awaits the
//! authenticator under a timeout, then hands the verified [`Identity`] to the same Connect code
//! the tokens go through, so refusals carry the same error codes, close codes, failure metrics
//! and per-address delays. The hook is fed like a webhook endpoint, from a bounded queue that
//! fanout pushes to without waiting; a thread of its own calls it (module `hook`).

mod auth;
mod hook;

pub(crate) use auth::AuthPlugin;
pub use auth::{
    AuthFailure, AuthFailureKind, AuthFuture, AuthRequest, Authenticator, Identity,
    TokenAuthenticator, Transport,
};
pub(crate) use hook::HookHandle;
pub use hook::PresenceHook;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::server::{Server, ServerError};
use crate::store::SubscriptionStore;

/// How long an [`Authenticator`] may take by default before the Connect is refused.
pub const DEFAULT_AUTH_TIMEOUT: Duration = Duration::from_secs(5);

/// Events the hook's queue holds by default before new ones are dropped (and counted).
pub const DEFAULT_HOOK_QUEUE: usize = 10_000;

/// Builds a [`Server`] with an embedder's plug-ins. Obtained from
/// [`Server::builder`](crate::Server::builder); [`ServerBuilder::bind`] validates the
/// configuration, opens the store and binds the listeners like
/// [`Server::bind`](crate::Server::bind), then [`Server::run`](crate::Server::run) serves.
///
/// ```no_run
/// # async fn demo(config: presenced::Config) -> Result<(), presenced::server::ServerError> {
/// use presenced::embed::{AuthFailure, AuthRequest, AuthFuture, Authenticator, Identity};
///
/// struct Sessions;
/// impl Authenticator for Sessions {
///     fn authenticate<'a>(&'a self, request: AuthRequest<'a>) -> AuthFuture<'a> {
///         Box::pin(async move {
///             match request.token.strip_prefix("session:") {
///                 Some(user) => Ok(Identity::new(user)),
///                 None => Err(AuthFailure::unauthenticated("unknown session")),
///             }
///         })
///     }
/// }
///
/// let server = presenced::Server::builder(config)
///     .authenticator(Sessions)
///     .hook(|event: &presenced::events::Event| println!("{} {:?}", event.kind, event.user))
///     .bind()
///     .await?;
/// server.run(tokio_util::sync::CancellationToken::new()).await
/// # }
/// ```
pub struct ServerBuilder {
    config: Config,
    plugins: Plugins,
}

/// What [`ServerBuilder`] hands to the server; everything `None` is the default.
pub(crate) struct Plugins {
    /// Replaces token verification.
    pub(crate) authenticator: Option<Arc<dyn Authenticator>>,
    /// How long authentication may take.
    pub(crate) auth_timeout: Duration,
    /// Sees every event in-process.
    pub(crate) hook: Option<Arc<dyn PresenceHook>>,
    /// The hook's queue, events.
    pub(crate) hook_queue: usize,
    /// Replaces the sled store in `data_dir`.
    pub(crate) store: Option<Arc<dyn SubscriptionStore>>,
}

impl Default for Plugins {
    fn default() -> Plugins {
        Plugins {
            authenticator: None,
            auth_timeout: DEFAULT_AUTH_TIMEOUT,
            hook: None,
            hook_queue: DEFAULT_HOOK_QUEUE,
            store: None,
        }
    }
}

impl fmt::Debug for Plugins {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Plugins")
            .field(
                "authenticator",
                &self.authenticator.as_ref().map(|_| "custom"),
            )
            .field("auth_timeout", &self.auth_timeout)
            .field("hook", &self.hook.as_ref().map(|_| "custom"))
            .field("hook_queue", &self.hook_queue)
            .field("store", &self.store)
            .finish()
    }
}

impl fmt::Debug for ServerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerBuilder")
            .field("listen", &self.config.listen)
            .field("plugins", &self.plugins)
            .finish_non_exhaustive()
    }
}

impl ServerBuilder {
    /// A builder for `config` with every default: token authentication, no hook, the sled
    /// store in `config.data_dir`.
    pub fn new(config: Config) -> ServerBuilder {
        ServerBuilder {
            config,
            plugins: Plugins::default(),
        }
    }

    /// Replaces token verification: every Connect on every listener (TLS, plain, wss, ws) is
    /// decided by `authenticator`. Refusals are counted in `presence_auth_failures_total` and
    /// delayed (then banned) per address exactly like bad tokens; admin API keys are not
    /// affected.
    pub fn authenticator(mut self, authenticator: impl Authenticator) -> ServerBuilder {
        self.plugins.authenticator = Some(Arc::new(authenticator));
        self
    }

    /// [`ServerBuilder::authenticator`] for an authenticator already shared.
    pub fn shared_authenticator(mut self, authenticator: Arc<dyn Authenticator>) -> ServerBuilder {
        self.plugins.authenticator = Some(authenticator);
        self
    }

    /// How long the authenticator may take (default [`DEFAULT_AUTH_TIMEOUT`]); past it the
    /// Connect is refused as UNAUTHENTICATED, counted with reason `timeout`, and the address
    /// pays the failed-login delay. Other connections are never held up by a slow one.
    pub fn auth_timeout(mut self, timeout: Duration) -> ServerBuilder {
        self.plugins.auth_timeout = timeout;
        self
    }

    /// Calls `hook` with every backend event (the webhook catalogue: `user.online`,
    /// `device.connected`, `channel.member.joined`, ...) in order, on a thread of its own. See
    /// [`PresenceHook`] for the queue and what happens when the hook falls behind.
    pub fn hook(mut self, hook: impl PresenceHook) -> ServerBuilder {
        self.plugins.hook = Some(Arc::new(hook));
        self
    }

    /// Events the hook's queue holds (default [`DEFAULT_HOOK_QUEUE`], at least 1); when it is
    /// full new events are dropped, counted in `presence_hook_events_dropped_total`, and the
    /// hook is told with a `sync.required` event once it catches up.
    pub fn hook_queue_capacity(mut self, events: usize) -> ServerBuilder {
        self.plugins.hook_queue = events.max(1);
        self
    }

    /// Keeps subscriptions (and last-seen times, revocations, privacy records) in `store`
    /// instead of the sled store in `config.data_dir`, which is then not opened.
    pub fn store(mut self, store: Arc<dyn SubscriptionStore>) -> ServerBuilder {
        self.plugins.store = Some(store);
        self
    }

    /// Validates the configuration, opens the store, starts the hook's thread and binds every
    /// listener. Nothing is accepted until [`Server::run`].
    pub async fn bind(self) -> Result<Server, ServerError> {
        Server::bind_with(self.config, self.plugins).await
    }
}
