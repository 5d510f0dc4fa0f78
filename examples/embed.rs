//! Runs presenced inside a host program: the host's own session table authenticates clients
//! (a Connect's token is `session:<id>`), a hook prints every presence transition, and
//! subscriptions live in memory. The example then connects a client the way an app would,
//! joins a channel, says goodbye and shuts the broker down.
//!
//! ```text
//! cargo run --example embed
//! ```
//!
//! Run it from the repository root: the broker serves TLS with the development certificate
//! in `certs-dev/`.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use presenced::client::{Client, ClientOptions};
use presenced::embed::{AuthFailure, AuthFuture, AuthRequest, Authenticator, Identity};
use presenced::events::Event;
use presenced::store::MemoryStore;
use presenced::{Config, Server};
use tokio_util::sync::CancellationToken;

/// The host application's login sessions: session id → user id.
#[derive(Debug, Default)]
struct HostSessions {
    sessions: RwLock<HashMap<String, String>>,
}

impl HostSessions {
    fn log_in(&self, session: &str, user: &str) {
        self.sessions
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(session.to_string(), user.to_string());
    }
}

/// Accepts `session:<id>` for a live host session; a real host would look it up in its
/// database here (the broker waits for at most its auth timeout, 5 s by default).
impl Authenticator for HostSessions {
    fn authenticate<'a>(&'a self, request: AuthRequest<'a>) -> AuthFuture<'a> {
        Box::pin(async move {
            let id = request
                .token
                .strip_prefix("session:")
                .ok_or_else(|| AuthFailure::unauthenticated("expected session:<id>"))?;
            let sessions = self.sessions.read().unwrap_or_else(|p| p.into_inner());
            match sessions.get(id) {
                Some(user) => Ok(Identity::new(user.clone())),
                None => Err(AuthFailure::unauthenticated("no such session")),
            }
        })
    }
}

/// Prints one transition.
fn print_transition(event: &Event) {
    let about = [
        event.user.as_deref().map(|u| format!("user={u}")),
        event.device.as_deref().map(|d| format!("device={d}")),
        event.channel.as_deref().map(|c| format!("channel={c}")),
        event.reason.as_deref().map(|r| format!("reason={r}")),
    ];
    let about: Vec<String> = about.into_iter().flatten().collect();
    println!("hook: #{} {} {}", event.seq, event.kind, about.join(" "));
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let sessions = Arc::new(HostSessions::default());
    sessions.log_in("abc123", "alice");

    let mut config = Config {
        listen: "127.0.0.1:0".parse()?,
        ..Config::default()
    };
    config.metrics.enabled = false;
    let server = Server::builder(config)
        .shared_authenticator(sessions.clone())
        .hook(print_transition)
        .store(Arc::new(MemoryStore::new()))
        .bind()
        .await?;
    let addr = server.local_addr();
    println!("broker listening on {addr} (TLS, dev certificate)");
    let shutdown = CancellationToken::new();
    let broker = tokio::spawn(server.run(shutdown.clone()));

    // What an app does with its session id.
    let alice =
        Client::connect(ClientOptions::new(addr, "session:abc123").device("laptop")).await?;
    println!("client: connected as {}", alice.conn_ack.user_id);
    alice.join("lobby", &[]).await?;
    alice.disconnect().await?;

    match Client::connect(ClientOptions::new(addr, "session:stolen")).await {
        Ok(_) => println!("client: an unknown session was accepted?"),
        Err(e) => println!("client: unknown session refused: {e}"),
    }

    // Shutdown lets the hook print what is still queued.
    shutdown.cancel();
    broker.await??;
    Ok(())
}
