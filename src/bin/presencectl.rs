//! `presencectl`: a developer's command line for presenced. Mints tokens from the configured
//! secret (the dev secret by default), connects as any user over TLS, publishes presence,
//! subscribes, queries, lists subscriptions, watches users, turns invisibility on and off,
//! blocks users, chooses audiences and answers subscription requests, printing JSON lines. With no flags it talks to a default local broker
//! (127.0.0.1:7883, the dev CA). `admin` calls the admin HTTP API with a key; `webhook-listen`
//! is a local webhook receiver that verifies each request's signature and prints its events.
//! `web` serves the browser example (see `web.rs`). It holds no state beyond one command.

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use presenced::auth::{mint_with, Audience, Claims, Validity};
use presenced::client::{Client, ClientOptions};
use presenced::config::DEV_SECRET;
use presenced::pb;
use serde_json::{json, Value};

#[path = "presencectl/web.rs"]
mod web;

/// Talk to a presenced broker from the shell.
#[derive(Debug, Parser)]
#[command(
    version,
    about = "The presenced developer CLI: mint tokens, watch and set presence, subscriptions, channels"
)]
struct Cli {
    /// The TLS client configuration, built once: its session store lets a reconnect (watch
    /// --resume) resume the TLS session with a ticket instead of a full handshake.
    #[arg(skip)]
    tls_config: std::sync::OnceLock<Arc<rustls::ClientConfig>>,
    /// Broker address (host:port).
    #[arg(long, global = true, default_value = "127.0.0.1:7883")]
    server: String,
    /// CA certificate (PEM) to trust; the embedded dev CA when the file does not exist.
    #[arg(long, global = true, default_value = "certs-dev/ca.pem")]
    ca: PathBuf,
    /// Name to check in the server certificate.
    #[arg(long, global = true, default_value = "localhost")]
    server_name: String,
    /// Token secret used to mint tokens.
    #[arg(long, global = true, env = "PRESENCE_SECRET", default_value = DEV_SECRET, hide_default_value = true)]
    secret: String,
    /// Key id written into minted tokens (omit for the broker's default key).
    #[arg(long, global = true)]
    kid: Option<String>,
    /// Issuer (`iss`) written into minted tokens: needed when the broker sets `[auth] issuer`.
    #[arg(long = "iss", global = true)]
    token_issuer: Option<String>,
    /// Audience (`aud`) written into minted tokens: needed when the broker sets
    /// `[auth] audience`.
    #[arg(long = "aud", global = true)]
    token_audience: Option<String>,
    /// Use this token instead of minting one.
    #[arg(long, global = true)]
    token: Option<String>,
    /// Device id for the session (default: cli-<pid>).
    #[arg(long, global = true)]
    device: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print a signed token.
    Token {
        #[arg(long)]
        user: String,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
    /// Subscribe to users, print their presence, then one JSON line per event until Ctrl-C.
    Watch {
        #[arg(long)]
        user: String,
        /// Keep the versions seen in FILE (JSON); on start and after each reconnect, resume
        /// from them: print `{"event":"resumed",...}` or `{"event":"full_snapshot",...}`, then
        /// only the users that changed. Reconnects by itself when the connection drops.
        #[arg(long, value_name = "FILE")]
        resume: Option<PathBuf>,
        /// Background mode: at most one batch of changes per SECONDS (1-3600); prints
        /// `{"event":"background",...}` once the broker has accepted it, then each batch's
        /// events (marked `"batch":true`) when it arrives.
        #[arg(long, value_name = "SECONDS")]
        background: Option<u32>,
        /// Users to watch.
        #[arg(required = true)]
        targets: Vec<String>,
    },
    /// Publish presence (the session then ends, unless --hold).
    Set {
        #[arg(long)]
        user: String,
        /// online, away, xa, dnd or offline.
        #[arg(long)]
        availability: Option<String>,
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        description: Option<String>,
        /// 16-bit application code.
        #[arg(long)]
        show: Option<u32>,
        /// key=value; an empty value removes the key. Repeatable.
        #[arg(long = "state")]
        state: Vec<String>,
        /// Stay connected (and online) until Ctrl-C.
        #[arg(long)]
        hold: bool,
        /// Connect invisible: user-level invisibility is turned on (and stored) before this
        /// device is announced, so no watcher ever sees it come online. It stays on, across
        /// sessions, until `invisible off`. The printed line says `"invisible":true`.
        #[arg(long)]
        invisible: bool,
        /// Connect with this device invisible on its own (Connect.invisible_device): nobody
        /// else sees the device, while the user's other devices show as usual; it lasts for
        /// this session only. A status or state set with it is the user's presence: shown
        /// while (or once) another device of theirs is visible. The printed line says
        /// `"device_invisible":true`.
        #[arg(long)]
        invisible_device: bool,
    },
    /// Query presence without subscribing.
    Get {
        #[arg(long)]
        user: String,
        #[arg(required = true)]
        targets: Vec<String>,
    },
    /// Subscribe to users.
    Subscribe {
        #[arg(long)]
        user: String,
        /// Expiry in seconds (default: the broker's, 7 days).
        #[arg(long, default_value_t = 0)]
        expiry: u64,
        #[arg(required = true)]
        targets: Vec<String>,
    },
    /// Unsubscribe from users.
    Unsubscribe {
        #[arg(long)]
        user: String,
        #[arg(required = true)]
        targets: Vec<String>,
    },
    /// List a user's subscriptions.
    Subs {
        #[arg(long)]
        user: String,
    },
    /// Join a channel and print its events until Ctrl-C (the membership lasts that long).
    Join {
        /// Who joins.
        #[arg(long, default_value = "cli")]
        user: String,
        /// key=value member state; repeatable.
        #[arg(long = "state")]
        state: Vec<String>,
        channel: String,
    },
    /// Leave a channel (use --device to act on another presencectl's membership).
    Leave {
        #[arg(long, default_value = "cli")]
        user: String,
        channel: String,
    },
    /// Who is in a channel: one JSON line per member.
    Who {
        #[arg(long, default_value = "cli")]
        user: String,
        /// Only the counts.
        #[arg(long)]
        count: bool,
        /// Include each member's state.
        #[arg(long)]
        state: bool,
        channel: String,
    },
    /// The channels a user has joined.
    Where {
        /// Who asks.
        #[arg(long, default_value = "cli")]
        user: String,
        /// The user to locate.
        target: String,
    },
    /// Print a channel's events without joining, until Ctrl-C.
    WatchChannel {
        #[arg(long, default_value = "cli")]
        user: String,
        channel: String,
    },
    /// Receive webhooks: verify each POST (any path) with the given secrets, answer 204 (401
    /// on a bad signature, the reason on stderr) and print each event as one JSON line.
    WebhookListen {
        /// Address to listen on (port 0 picks one; the address is printed on stderr).
        #[arg(long, default_value = "127.0.0.1:9466")]
        listen: SocketAddr,
        /// KEY_ID=SECRET as configured in `[[webhooks]]`; repeat during a key rotation.
        #[arg(
            long = "secret",
            id = "secret",
            value_name = "KEY_ID=SECRET",
            required = true
        )]
        webhook_secrets: Vec<String>,
        /// Largest accepted difference between `webhook-timestamp` and this clock, seconds.
        #[arg(long, default_value_t = presenced::webhooks::DEFAULT_TOLERANCE_SECS)]
        tolerance_secs: u64,
    },
    /// Serve the browser example (examples/web) and the schema at /presence.proto over HTTP on
    /// loopback, GET and HEAD only, until Ctrl-C. Prints `serving http://ADDR/` on stdout.
    Web {
        /// Address to listen on (port 0 picks one).
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// The page's folder, with its node_modules (`npm install --prefix examples/web`).
        #[arg(long, default_value = "examples/web")]
        dir: PathBuf,
        /// The schema served at /presence.proto.
        #[arg(long, default_value = "proto/presence/v1/presence.proto")]
        proto: PathBuf,
    },
    /// Call the admin HTTP API; prints the JSON reply, or the JSON error on stderr with exit
    /// code 1.
    Admin {
        /// Base URL of the admin API.
        #[arg(long, default_value = "http://127.0.0.1:9465")]
        url: String,
        /// Admin key (sent as `Authorization: Bearer`).
        #[arg(long, env = "PRESENCE_ADMIN_KEY", hide_env_values = true)]
        key: String,
        #[command(subcommand)]
        op: AdminOp,
    },
    /// Turn user-level invisibility on or off (stored: it lasts across sessions until turned
    /// off). To everyone else an invisible user looks offline; your own devices see the truth.
    /// Prints `{"invisible":..,"presence":{..}}` with your own (true) presence.
    Invisible {
        /// `on` or `off`.
        switch: Switch,
        #[arg(long)]
        user: String,
    },
    /// Block users: each of you sees the other offline. Prints `{"changed":N,"total":M}`.
    Block {
        #[arg(long)]
        user: String,
        #[arg(required = true)]
        targets: Vec<String>,
    },
    /// Lift blocks. Prints `{"changed":N,"total":M}`.
    Unblock {
        #[arg(long)]
        user: String,
        #[arg(required = true)]
        targets: Vec<String>,
    },
    /// List the users a user blocks: one JSON line each, then `{"total":N}`.
    Blocked {
        #[arg(long)]
        user: String,
        /// Users per request (0: the broker's default; at most its limits.max_page_size).
        #[arg(long, default_value_t = 0)]
        page_size: u32,
    },
    /// Choose who sees your presence or your last-seen time: `everyone` (the default),
    /// `approved` (watchers you approve; anyone else's subscription makes a request) or
    /// `nobody`. Without arguments, only prints the settings. Prints
    /// `{"presence_audience":..,"last_seen_audience":..,"invisible":..,"blocked":N,"approved":N,"pending":N}`.
    Audience {
        #[arg(long)]
        user: String,
        /// `presence` or `last-seen`.
        #[arg(requires = "audience")]
        what: Option<AudienceOf>,
        /// `everyone`, `approved` or `nobody`.
        audience: Option<AudienceName>,
    },
    /// List subscription requests and answers, following pages: one JSON line each
    /// (`{"user":..,"state":..,"since_ms":..}`), then `{"total":N}`.
    Requests {
        #[arg(long)]
        user: String,
        /// Which entries: pending requests (the default), approved or denied (denied or
        /// revoked) watchers, or all.
        #[arg(long, value_enum, default_value_t = RequestState::Pending)]
        state: RequestState,
        /// Entries per request (0: the broker's default; at most its limits.max_page_size).
        #[arg(long, default_value_t = 0)]
        page_size: u32,
    },
    /// Let users see your presence (with or without a request; they are told). Prints
    /// `{"changed":N}`.
    Approve {
        #[arg(long)]
        user: String,
        #[arg(required = true)]
        targets: Vec<String>,
    },
    /// Refuse requests (the requesters are never told). Prints `{"changed":N}`.
    Deny {
        #[arg(long)]
        user: String,
        #[arg(required = true)]
        targets: Vec<String>,
    },
    /// Take approvals back: those users see you offline from now. Prints `{"changed":N}`.
    Revoke {
        #[arg(long)]
        user: String,
        #[arg(required = true)]
        targets: Vec<String>,
    },
    /// Send a directed presence to some users.
    Direct {
        #[arg(long)]
        user: String,
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        availability: Option<String>,
        #[arg(required = true)]
        targets: Vec<String>,
    },
}

/// `invisible on|off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Switch {
    On,
    Off,
}

/// `audience presence|last-seen ...`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum AudienceOf {
    Presence,
    LastSeen,
}

/// `audience ... everyone|approved|nobody`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum AudienceName {
    Everyone,
    Approved,
    Nobody,
}

impl AudienceName {
    fn to_pb(self) -> pb::Audience {
        match self {
            AudienceName::Everyone => pb::Audience::Everyone,
            AudienceName::Approved => pb::Audience::Approved,
            AudienceName::Nobody => pb::Audience::Nobody,
        }
    }
}

/// `requests --state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum RequestState {
    Pending,
    Approved,
    Denied,
    All,
}

impl RequestState {
    fn to_pb(self) -> pb::ApprovalState {
        match self {
            RequestState::Pending => pb::ApprovalState::Pending,
            RequestState::Approved => pb::ApprovalState::Approved,
            RequestState::Denied => pb::ApprovalState::Denied,
            RequestState::All => pb::ApprovalState::Unspecified,
        }
    }
}

/// An audience as `audience` prints it: `everyone`, `approved`, `nobody`.
fn audience_name(value: i32) -> &'static str {
    match pb::Audience::try_from(value) {
        Ok(pb::Audience::Everyone) => "everyone",
        Ok(pb::Audience::Approved) => "approved",
        Ok(pb::Audience::Nobody) => "nobody",
        _ => "unspecified",
    }
}

/// An approval state as `requests` prints it: `pending`, `approved`, `denied`.
fn approval_state_name(value: i32) -> &'static str {
    match pb::ApprovalState::try_from(value) {
        Ok(pb::ApprovalState::Pending) => "pending",
        Ok(pb::ApprovalState::Approved) => "approved",
        Ok(pb::ApprovalState::Denied) => "denied",
        _ => "unspecified",
    }
}

fn privacy_json(s: &pb::PrivacySettings) -> Value {
    json!({
        "presence_audience": audience_name(s.presence_audience),
        "last_seen_audience": audience_name(s.last_seen_audience),
        "invisible": s.invisible,
        "blocked": s.blocked,
        "approved": s.approved,
        "pending": s.pending,
    })
}

/// Most pages `blocked` asks for: a block list holds at most 10,000 users by default, so even
/// one user per page ends well within this; a broker that keeps answering "more" past it is
/// broken, and the command fails rather than loop forever.
const MAX_BLOCKED_PAGES: usize = 100_000;

/// Prints every user `client` blocks, one JSON line each, following cursors, then
/// `{"total":N}` (the broker's count, from the last page).
async fn list_blocked(client: &Client, page_size: u32) -> anyhow::Result<()> {
    let mut cursor = String::new();
    for _ in 0..MAX_BLOCKED_PAGES {
        let page = client.list_blocked(&cursor, page_size).await?;
        for b in &page.blocked {
            print(json!({"user": b.user_id, "since_ms": b.since_ms}));
        }
        if page.next_cursor.is_empty() {
            print(json!({"total": page.total}));
            return Ok(());
        }
        if page.blocked.is_empty() || page.next_cursor == cursor {
            bail!("the broker's block list pages do not advance (cursor {cursor:?})");
        }
        cursor = page.next_cursor;
    }
    bail!("the block list did not end within {MAX_BLOCKED_PAGES} pages")
}

/// Most pages `requests` asks for: requests and approvals are bounded per user (by
/// `[privacy]` caps far below this), so a broker still answering "more" past it is broken.
const MAX_APPROVAL_PAGES: usize = 100_000;

/// Prints every request or approval of `client` in `state`, one JSON line each, following
/// cursors, then `{"total":N}` (the broker's count, from the last page).
async fn list_requests(client: &Client, state: RequestState, page_size: u32) -> anyhow::Result<()> {
    let mut cursor = String::new();
    for _ in 0..MAX_APPROVAL_PAGES {
        let page = client
            .list_approvals(state.to_pb(), &cursor, page_size)
            .await?;
        for a in &page.approvals {
            print(json!({
                "user": a.user_id,
                "state": approval_state_name(a.state),
                "since_ms": a.since_ms,
            }));
        }
        if page.next_cursor.is_empty() {
            print(json!({"total": page.total}));
            return Ok(());
        }
        if page.approvals.is_empty() || page.next_cursor == cursor {
            bail!("the broker's request list pages do not advance (cursor {cursor:?})");
        }
        cursor = page.next_cursor;
    }
    bail!("the request list did not end within {MAX_APPROVAL_PAGES} pages")
}

/// One admin API call.
#[derive(Debug, Subcommand)]
enum AdminOp {
    /// Presence of users (`POST /v1/presence:query`).
    Query {
        #[arg(required = true)]
        users: Vec<String>,
    },
    /// Which of these users are online (`POST /v1/presence:online`).
    Online {
        #[arg(required = true)]
        users: Vec<String>,
    },
    /// Disconnect a user's sessions, or one device (`POST /v1/users/{user}/disconnect`).
    Kick {
        user: String,
        /// Only this device.
        #[arg(long = "device", id = "device")]
        kick_device: Option<String>,
        /// Reason given to the client.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Refuse the user's tokens issued before a time (`POST /v1/users/{user}/revoke`).
    Revoke {
        user: String,
        /// Milliseconds since the epoch; default: now (decided by the broker).
        #[arg(long)]
        before_ms: Option<u64>,
    },
}

/// `value` percent-encoded as one URL path segment: everything but the unreserved characters
/// (`A-Z a-z 0-9 - . _ ~`) is escaped, so `/`, `?`, `#`, `%` and spaces in a user id cannot
/// change the path. `.` and `..` are refused: URL parsers resolve them even when escaped.
fn path_segment(value: &str) -> anyhow::Result<String> {
    if value.is_empty() || value == "." || value == ".." {
        bail!("{value:?} cannot be used as a URL path segment");
    }
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    Ok(out)
}

/// The path and JSON body of an admin call.
fn admin_request(op: &AdminOp) -> anyhow::Result<(String, Value)> {
    Ok(match op {
        AdminOp::Query { users } => ("/v1/presence:query".into(), json!({ "users": users })),
        AdminOp::Online { users } => ("/v1/presence:online".into(), json!({ "users": users })),
        AdminOp::Kick {
            user,
            kick_device,
            reason,
        } => {
            let mut body = serde_json::Map::new();
            if let Some(d) = kick_device {
                body.insert("device".into(), json!(d));
            }
            if let Some(r) = reason {
                body.insert("reason".into(), json!(r));
            }
            (
                format!("/v1/users/{}/disconnect", path_segment(user)?),
                Value::Object(body),
            )
        }
        AdminOp::Revoke { user, before_ms } => {
            let mut body = serde_json::Map::new();
            if let Some(ms) = before_ms {
                body.insert("before_ms".into(), json!(ms));
            }
            (
                format!("/v1/users/{}/revoke", path_segment(user)?),
                Value::Object(body),
            )
        }
    })
}

/// Runs one admin call; a non-2xx reply prints its body on stderr and exits with code 1.
async fn admin(url: &str, key: &str, op: &AdminOp) -> anyhow::Result<()> {
    let (path, body) = admin_request(op)?;
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(std::time::Duration::from_secs(60))
        .build()?;
    let target = format!("{}{path}", url.trim_end_matches('/'));
    let response = client
        .post(&target)
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .with_context(|| format!("cannot reach the admin API at {url}"))?;
    let status = response.status();
    let text = response.text().await?;
    let shown = match serde_json::from_str::<Value>(&text) {
        Ok(value) => serde_json::to_string_pretty(&value)?,
        Err(_) => text,
    };
    if status.is_success() {
        if !shown.is_empty() {
            println!("{shown}");
        }
        Ok(())
    } else {
        eprintln!("{shown}");
        eprintln!("presencectl: admin API answered {status}");
        std::process::exit(1);
    }
}

/// Parses `KEY_ID=SECRET` pairs.
fn parse_secrets(pairs: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    pairs
        .iter()
        .map(|pair| {
            pair.split_once('=')
                .filter(|(k, v)| !k.is_empty() && !v.is_empty())
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .context("--secret takes KEY_ID=SECRET")
        })
        .collect()
}

/// What `webhook-listen` checks requests with.
#[derive(Debug)]
struct Listener {
    secrets: BTreeMap<String, String>,
    tolerance_secs: u64,
}

/// Verifies one webhook request and prints its events; the status to answer.
fn receive_webhook(
    listener: &Listener,
    method: &axum::http::Method,
    headers: &axum::http::HeaderMap,
    body: &[u8],
) -> axum::http::StatusCode {
    use axum::http::StatusCode;
    use presenced::webhooks::{headers as h, verify, SignedHeaders};
    if method != axum::http::Method::POST {
        return StatusCode::METHOD_NOT_ALLOWED;
    }
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    let signed = SignedHeaders {
        id: header(h::ID),
        timestamp: header(h::TIMESTAMP),
        signature: header(h::SIGNATURE),
    };
    let now = presenced::now_ms() / 1000;
    if let Err(e) = verify(
        &listener.secrets,
        signed,
        body,
        now,
        listener.tolerance_secs,
    ) {
        eprintln!("presencectl: refused webhook {:?}: {e}", signed.id);
        return StatusCode::UNAUTHORIZED;
    }
    let events = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(mut o)) => match o.remove("events") {
            Some(Value::Array(events)) => events,
            _ => Vec::new(),
        },
        _ => {
            eprintln!(
                "presencectl: webhook {:?} is not {{\"events\": [...]}}",
                signed.id
            );
            return StatusCode::BAD_REQUEST;
        }
    };
    // Each event as received, one per line (keys come out in alphabetical order: a
    // `serde_json::Value` does not keep the sender's order).
    let mut out = std::io::stdout().lock();
    for event in events {
        use std::io::Write;
        let _ = writeln!(out, "{event}");
    }
    StatusCode::NO_CONTENT
}

/// Serves `webhook-listen` until Ctrl-C.
async fn webhook_listen(addr: SocketAddr, listener: Listener) -> anyhow::Result<()> {
    let listener = Arc::new(listener);
    let app = axum::Router::new().fallback(
        move |method: axum::http::Method,
              headers: axum::http::HeaderMap,
              body: axum::body::Bytes| {
            let listener = listener.clone();
            async move { receive_webhook(&listener, &method, &headers, &body) }
        },
    );
    let socket = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    eprintln!(
        "presencectl: listening for webhooks on http://{}",
        socket.local_addr()?
    );
    axum::serve(socket, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

fn availability_name(value: i32) -> &'static str {
    match pb::Availability::try_from(value) {
        Ok(pb::Availability::Online) => "online",
        Ok(pb::Availability::Away) => "away",
        Ok(pb::Availability::Xa) => "xa",
        Ok(pb::Availability::Dnd) => "dnd",
        Ok(pb::Availability::Offline) => "offline",
        _ => "unspecified",
    }
}

fn parse_availability(name: &str) -> anyhow::Result<i32> {
    let a = presenced::model::Availability::parse(name).with_context(|| {
        format!("unknown availability {name:?} (online, away, xa, dnd, offline)")
    })?;
    Ok(presenced::wire::availability_to_pb(a) as i32)
}

fn presence_json(p: &pb::Presence) -> Value {
    json!({
        "user": p.user_id,
        "availability": availability_name(p.availability),
        "show": p.show,
        "status": p.status,
        "description": p.description,
        "state": p.state,
        "devices": p.devices.iter().map(|d| json!({
            "device": d.device_id,
            "platform": d.platform,
            "availability": availability_name(d.availability),
            "connected_since_ms": d.connected_since_ms,
        })).collect::<Vec<_>>(),
        "last_seen_ms": p.last_seen_ms,
        "version": p.version,
        "user_data": p.user_data,
    })
}

fn member_json(m: &pb::ChannelMember) -> Value {
    json!({
        "user": m.user_id,
        "device": m.device_id,
        "state": m.state,
        "joined_at_ms": m.joined_at_ms,
    })
}

fn channel_event_json(e: &pb::ChannelEvent) -> Value {
    let kind = pb::ChannelEventKind::try_from(e.kind)
        .map(|k| {
            k.as_str_name()
                .trim_start_matches("CHANNEL_EVENT_KIND_")
                .to_lowercase()
        })
        .unwrap_or_else(|_| "unspecified".into());
    let members = |list: &[pb::ChannelMember]| list.iter().map(member_json).collect::<Vec<_>>();
    json!({
        "channel": e.channel,
        "event": kind,
        "member": e.member.as_ref().map(member_json),
        "occupancy": e.occupancy,
        "interval": e.interval.as_ref().map(|i| json!({
            "joins": members(&i.joins),
            "leaves": members(&i.leaves),
            "timeouts": members(&i.timeouts),
            "state_changes": members(&i.state_changes),
        })),
    })
}

fn parse_state(pairs: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    pairs
        .iter()
        .map(|pair| {
            pair.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("--state takes key=value, got {pair:?}"))
        })
        .collect()
}

/// Which events a long-running command prints.
#[derive(Debug, Clone, Copy)]
enum Events {
    Presence,
    Channel,
    None,
}

/// The next event of `kind` as a JSON line (never resolves for `Events::None`).
async fn next_event_json(client: &mut Client, kind: Events) -> anyhow::Result<Value> {
    Ok(match kind {
        Events::Presence => event_json(&client.next_presence_event().await?),
        Events::Channel => channel_event_json(&client.next_channel_event().await?),
        Events::None => std::future::pending().await,
    })
}

/// Prints events of `kind` until Ctrl-C, then disconnects. Pings at half the keepalive the
/// broker applied, so a session that only listens is not closed for silence.
async fn hold_until_ctrl_c(mut client: Client, kind: Events) -> anyhow::Result<()> {
    let every =
        std::time::Duration::from_secs(u64::from(client.conn_ack.keepalive_seconds.max(2)) / 2);
    let mut ping_at = tokio::time::Instant::now() + every;
    loop {
        let next = tokio::select! {
            e = tokio::time::timeout_at(ping_at, next_event_json(&mut client, kind)) => Some(e),
            _ = tokio::signal::ctrl_c() => None,
        };
        match next {
            None => break,
            Some(Ok(Ok(line))) => print(line),
            Some(Ok(Err(e))) => bail!("{e}"),
            Some(Err(_)) => {}
        }
        if tokio::time::Instant::now() >= ping_at {
            client.ping().await?;
            ping_at = tokio::time::Instant::now() + every;
        }
    }
    client.disconnect().await?;
    Ok(())
}

/// The versions `watch --resume` keeps: user → version.
fn load_versions(path: &std::path::Path) -> anyhow::Result<BTreeMap<String, u64>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|v| v.get("versions").cloned())
            .and_then(|v| serde_json::from_value(v).ok())
            .with_context(|| format!("{} is not a presencectl resume file", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Writes the versions atomically (a temporary file renamed over the old one).
fn save_versions(path: &std::path::Path, versions: &BTreeMap<String, u64>) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, json!({ "versions": versions }).to_string())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

/// `watch` with `--resume` and/or `--background`: subscribes, resumes from the file's versions
/// (or prints full snapshots), optionally sets a batched contract, then prints events and
/// batches; with `--resume`, reconnects with a backoff when the connection drops and resumes
/// again. Pings at half the keepalive.
async fn watch(
    cli: &Cli,
    user: &str,
    targets: &[String],
    resume: Option<&std::path::Path>,
    background: Option<u32>,
) -> anyhow::Result<()> {
    if let Some(seconds) = background {
        if !(1..=3600).contains(&seconds) {
            bail!("--background takes 1 to 3600 seconds, not {seconds}");
        }
    }
    let mut versions = match resume {
        Some(path) => load_versions(path)?,
        None => BTreeMap::new(),
    };
    let mut backoff = std::time::Duration::from_millis(250);
    loop {
        let mut client = match cli.connect(user).await {
            Ok(client) => client,
            Err(e) if resume.is_some() => {
                eprintln!("{e:#}; retrying in {backoff:?}");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                }
                backoff = (backoff * 2).min(std::time::Duration::from_secs(30));
                continue;
            }
            Err(e) => return Err(e),
        };
        backoff = std::time::Duration::from_millis(250);
        client.subscribe(&refs(targets)).await?;
        let known: Vec<(String, u64)> = versions.iter().map(|(u, v)| (u.clone(), *v)).collect();
        let (changed, result) = client.resume(&known).await?;
        if known.is_empty() || result.state_lost > 0 {
            let why = if known.is_empty() {
                "no resume state yet".to_string()
            } else {
                result.why.clone()
            };
            print(json!({"event": "full_snapshot", "why": why, "users": changed.len()}));
        } else {
            print(json!({
                "event": "resumed",
                "changed": result.changed,
                "unchanged": result.unchanged,
                "unwatched": result.unwatched_user_ids,
            }));
        }
        for u in &result.unwatched_user_ids {
            versions.remove(u);
        }
        for e in &changed {
            print(
                json!({"event": "snapshot", "user": e.user_id, "version": e.version,
                "presence": e.presence.as_ref().map(presence_json)}),
            );
            versions.insert(e.user_id.clone(), e.version);
        }
        if let Some(path) = resume {
            save_versions(path, &versions)?;
        }
        if let Some(seconds) = background {
            client
                .set_delivery(pb::SetDelivery {
                    mode: pb::DeliveryMode::Batched as i32,
                    interval_seconds: seconds,
                    ..Default::default()
                })
                .await?;
            // Say when batching is in force: what changes after this line arrives in batches.
            print(json!({"event": "background", "interval_seconds": seconds}));
        }
        let every =
            std::time::Duration::from_secs(u64::from(client.conn_ack.keepalive_seconds.max(2)) / 2);
        let mut ping_at = tokio::time::Instant::now() + every;
        let lost = loop {
            let frame = tokio::select! {
                f = tokio::time::timeout_at(ping_at, client.next_event()) => f,
                _ = tokio::signal::ctrl_c() => {
                    client.disconnect().await?;
                    return Ok(());
                }
            };
            let events = match frame {
                Err(_) => Vec::new(),
                Ok(None) => break "connection closed".to_string(),
                Ok(Some(frame)) => match frame.body {
                    Some(pb::server_frame::Body::PresenceEvent(e)) => vec![(e, false)],
                    Some(pb::server_frame::Body::PresenceBatch(b)) => {
                        b.events.into_iter().map(|e| (e, true)).collect()
                    }
                    Some(pb::server_frame::Body::Close(c)) => break c.reason,
                    _ => Vec::new(),
                },
            };
            let changed = !events.is_empty();
            for (e, batched) in events {
                let mut line = event_json(&e);
                if batched {
                    line["batch"] = json!(true);
                }
                print(line);
                // Your own devices' changes are not watched users: the file holds only those.
                if e.kind != pb::EventKind::Directed as i32 && e.user_id != user {
                    versions.insert(e.user_id.clone(), e.version);
                }
            }
            if let (Some(path), true) = (resume, changed) {
                save_versions(path, &versions)?;
            }
            if tokio::time::Instant::now() >= ping_at {
                if client.ping().await.is_err() {
                    break "ping failed".to_string();
                }
                ping_at = tokio::time::Instant::now() + every;
            }
        };
        if resume.is_none() {
            bail!("connection lost: {lost}");
        }
        eprintln!("connection lost ({lost}); reconnecting and resuming");
    }
}

fn event_json(e: &pb::PresenceEvent) -> Value {
    let kind = match pb::EventKind::try_from(e.kind) {
        Ok(pb::EventKind::Online) => "online",
        Ok(pb::EventKind::Update) => "update",
        Ok(pb::EventKind::Offline) => "offline",
        Ok(pb::EventKind::Directed) => "directed",
        _ => "unspecified",
    };
    let reason = pb::OfflineReason::try_from(e.reason)
        .ok()
        .filter(|r| *r != pb::OfflineReason::Unspecified)
        .map(|r| {
            r.as_str_name()
                .trim_start_matches("OFFLINE_REASON_")
                .to_lowercase()
        });
    json!({
        "event": kind,
        "user": e.user_id,
        "device": e.device_id,
        "reason": reason,
        "version": e.version,
        "presence": e.presence.as_ref().map(presence_json),
    })
}

impl Cli {
    fn token_for(&self, user: &str, ttl: u64) -> String {
        if let Some(token) = &self.token {
            return token.clone();
        }
        mint_with(
            self.secret.as_bytes(),
            self.kid.as_deref(),
            &Claims {
                sub: user.to_string(),
                exp: presenced::now_ms() / 1000 + ttl,
                did: None,
                iat: Some(presenced::now_ms() / 1000),
            },
            &Validity {
                nbf: None,
                iss: self.token_issuer.clone(),
                aud: self.token_audience.clone().map(Audience::One),
            },
        )
    }

    fn addr(&self) -> anyhow::Result<SocketAddr> {
        self.server
            .to_socket_addrs()
            .with_context(|| format!("cannot resolve {}", self.server))?
            .next()
            .with_context(|| format!("{} resolves to nothing", self.server))
    }

    fn tls(&self) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        if let Some(config) = self.tls_config.get() {
            return Ok(config.clone());
        }
        let config = if self.ca.exists() {
            presenced::tls::client_config_from_file(&self.ca)?
        } else {
            presenced::tls::dev_client_config()
        };
        Ok(self.tls_config.get_or_init(|| config).clone())
    }

    async fn connect(&self, user: &str) -> anyhow::Result<Client> {
        self.connect_with(user, false, false).await
    }

    /// Connects as `user`; `invisible`: start invisible (Connect.invisible); `device`: with
    /// this device invisible on its own (Connect.invisible_device).
    async fn connect_with(
        &self,
        user: &str,
        invisible: bool,
        device: bool,
    ) -> anyhow::Result<Client> {
        let mut options = ClientOptions::new(self.addr()?, self.token_for(user, 3600));
        options.invisible = invisible;
        options.invisible_device = device;
        options.server_name = self.server_name.clone();
        options.tls = self.tls()?;
        options.device_id = self
            .device
            .clone()
            .unwrap_or_else(|| format!("cli-{}", std::process::id()));
        options.platform = "presencectl".into();
        Client::connect(options)
            .await
            .with_context(|| format!("cannot connect to {} as {user}", self.server))
    }
}

fn print(value: Value) {
    println!("{value}");
}

fn refs(targets: &[String]) -> Vec<&str> {
    targets.iter().map(String::as_str).collect()
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match &cli.command {
        Command::WebhookListen {
            listen,
            webhook_secrets,
            tolerance_secs,
        } => {
            let listener = Listener {
                secrets: parse_secrets(webhook_secrets)?,
                tolerance_secs: *tolerance_secs,
            };
            webhook_listen(*listen, listener).await?;
        }
        Command::Admin { url, key, op } => admin(url, key, op).await?,
        Command::Web { listen, dir, proto } => {
            web::serve(*listen, web::Site::open(dir, proto)?).await?;
        }
        Command::Token { user, ttl } => println!("{}", cli.token_for(user, *ttl)),
        Command::Watch {
            user,
            resume,
            background,
            targets,
        } if resume.is_some() || background.is_some() => {
            watch(&cli, user, targets, resume.as_deref(), *background).await?;
        }
        Command::Watch { user, targets, .. } => {
            let client = cli.connect(user).await?;
            let result = client.subscribe(&refs(targets)).await?;
            for p in &result.presences {
                print(
                    json!({"event": "snapshot", "user": p.user_id, "presence": presence_json(p)}),
                );
            }
            hold_until_ctrl_c(client, Events::Presence).await?;
        }
        Command::Set {
            user,
            availability,
            status,
            description,
            show,
            state,
            hold,
            invisible,
            invisible_device,
        } => {
            let mut change = pb::SetPresence {
                status: status.clone(),
                description: description.clone(),
                show: *show,
                ..Default::default()
            };
            if let Some(a) = availability {
                change.availability = parse_availability(a)?;
            }
            change.state.extend(parse_state(state)?);
            let client = cli
                .connect_with(user, *invisible, *invisible_device)
                .await?;
            if *invisible && !client.conn_ack.invisible {
                bail!("the broker did not start the session invisible");
            }
            if *invisible_device && !client.conn_ack.device_invisible {
                bail!("the broker did not start the device invisible");
            }
            let presence = client.set_presence(change).await?;
            // Your own (true) presence, and whether everyone else sees you offline.
            let mut line = presence_json(&presence);
            line["invisible"] = json!(client.conn_ack.invisible);
            if *invisible_device {
                line["device_invisible"] = json!(true);
            }
            print(line);
            if *hold {
                hold_until_ctrl_c(client, Events::None).await?;
            } else {
                client.disconnect().await?;
            }
        }
        Command::Get { user, targets } => {
            let client = cli.connect(user).await?;
            for p in client.get_presence(&refs(targets)).await? {
                print(presence_json(&p));
            }
            client.disconnect().await?;
        }
        Command::Subscribe {
            user,
            expiry,
            targets,
        } => {
            let client = cli.connect(user).await?;
            let r = client.subscribe_for(&refs(targets), *expiry).await?;
            print(json!({
                "subscribed": targets,
                "expires_at_ms": r.expires_at_ms,
                "evicted": r.evicted_user_ids,
                "subscription_count": r.subscription_count,
                "presences": r.presences.iter().map(presence_json).collect::<Vec<_>>(),
            }));
            client.disconnect().await?;
        }
        Command::Unsubscribe { user, targets } => {
            let client = cli.connect(user).await?;
            let r = client.unsubscribe(&refs(targets)).await?;
            print(json!({"removed": r.removed, "subscription_count": r.subscription_count}));
            client.disconnect().await?;
        }
        Command::Subs { user } => {
            let client = cli.connect(user).await?;
            for s in client.all_subscriptions().await? {
                print(json!({"user": s.user_id, "expires_at_ms": s.expires_at_ms}));
            }
            client.disconnect().await?;
        }
        Command::Join {
            user,
            state,
            channel,
        } => {
            let pairs = parse_state(state)?;
            let refs: Vec<(&str, &str)> = pairs
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let client = cli.connect(user).await?;
            let r = client.join(channel, &refs).await?;
            print(json!({"joined": r.channel, "occupancy": r.occupancy, "state": r.state}));
            hold_until_ctrl_c(client, Events::Channel).await?;
        }
        Command::Leave { user, channel } => {
            let client = cli.connect(user).await?;
            let r = client.leave(channel).await?;
            print(json!({"left": r.channel, "changed": r.changed, "occupancy": r.occupancy}));
            client.disconnect().await?;
        }
        Command::Who {
            user,
            count,
            state,
            channel,
        } => {
            let client = cli.connect(user).await?;
            let mode = match (count, state) {
                (true, _) => pb::WhoNowMode::Count,
                (false, true) => pb::WhoNowMode::IdsAndState,
                (false, false) => pb::WhoNowMode::Ids,
            };
            let mut cursor = String::new();
            loop {
                let page = client.who_now(channel, mode, &cursor, 0).await?;
                if *count {
                    print(
                        json!({"channel": page.channel, "occupancy": page.occupancy, "members": page.member_count}),
                    );
                    break;
                }
                for m in &page.members {
                    print(member_json(m));
                }
                if page.next_cursor.is_empty() {
                    break;
                }
                cursor = page.next_cursor;
            }
            client.disconnect().await?;
        }
        Command::Where { user, target } => {
            let client = cli.connect(user).await?;
            let channels = client.where_now(target).await?;
            print(json!({"user": target, "channels": channels}));
            client.disconnect().await?;
        }
        Command::WatchChannel { user, channel } => {
            let client = cli.connect(user).await?;
            let r = client.watch_channel(channel).await?;
            print(json!({"watching": r.channel, "occupancy": r.occupancy}));
            hold_until_ctrl_c(client, Events::Channel).await?;
        }
        Command::Invisible { switch, user } => {
            let client = cli.connect(user).await?;
            let r = client.set_invisible(*switch == Switch::On).await?;
            print(json!({
                "invisible": r.invisible,
                "presence": r.presence.as_ref().map(presence_json),
            }));
            client.disconnect().await?;
        }
        Command::Block { user, targets } => {
            let client = cli.connect(user).await?;
            let r = client.block(&refs(targets)).await?;
            print(json!({"changed": r.changed, "total": r.total}));
            client.disconnect().await?;
        }
        Command::Unblock { user, targets } => {
            let client = cli.connect(user).await?;
            let r = client.unblock(&refs(targets)).await?;
            print(json!({"changed": r.changed, "total": r.total}));
            client.disconnect().await?;
        }
        Command::Blocked { user, page_size } => {
            let client = cli.connect(user).await?;
            list_blocked(&client, *page_size).await?;
            client.disconnect().await?;
        }
        Command::Audience {
            user,
            what,
            audience,
        } => {
            let client = cli.connect(user).await?;
            let settings = match (what, audience) {
                (Some(what), Some(audience)) => {
                    let (presence, last_seen) = match what {
                        AudienceOf::Presence => (audience.to_pb(), pb::Audience::Unspecified),
                        AudienceOf::LastSeen => (pb::Audience::Unspecified, audience.to_pb()),
                    };
                    client.set_privacy(presence, last_seen).await?
                }
                (None, None) => client.get_privacy().await?,
                _ => bail!("audience takes presence|last-seen then everyone|approved|nobody"),
            };
            print(privacy_json(&settings));
            client.disconnect().await?;
        }
        Command::Requests {
            user,
            state,
            page_size,
        } => {
            let client = cli.connect(user).await?;
            list_requests(&client, *state, *page_size).await?;
            client.disconnect().await?;
        }
        Command::Approve { user, targets }
        | Command::Deny { user, targets }
        | Command::Revoke { user, targets } => {
            let action = match &cli.command {
                Command::Approve { .. } => pb::ApprovalAction::Approve,
                Command::Deny { .. } => pb::ApprovalAction::Deny,
                _ => pb::ApprovalAction::Revoke,
            };
            let client = cli.connect(user).await?;
            let changed = client.set_approval(&refs(targets), action).await?;
            print(json!({ "changed": changed }));
            client.disconnect().await?;
        }
        Command::Direct {
            user,
            status,
            availability,
            targets,
        } => {
            let mut change = pb::SetPresence {
                status: status.clone(),
                ..Default::default()
            };
            if let Some(a) = availability {
                change.availability = parse_availability(a)?;
            }
            let client = cli.connect(user).await?;
            let delivered = client.direct(&refs(targets), change).await?;
            print(json!({"delivered": delivered}));
            client.disconnect().await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "presencectl",
            "webhook-listen",
            "--secret",
            "k1=whsec_abc",
            "--secret",
            "k2=raw",
        ])
        .unwrap();
        match cli.command {
            Command::WebhookListen {
                webhook_secrets, ..
            } => {
                let s = parse_secrets(&webhook_secrets).unwrap();
                assert_eq!(s["k1"], "whsec_abc");
                assert_eq!(s["k2"], "raw");
            }
            other => panic!("{other:?}"),
        }
        let cli = Cli::try_parse_from([
            "presencectl",
            "admin",
            "--key",
            "k",
            "kick",
            "al/ice",
            "--device",
            "d1",
        ])
        .unwrap();
        match cli.command {
            Command::Admin { op, .. } => {
                let (path, body) = admin_request(&op).unwrap();
                assert_eq!(path, "/v1/users/al%2Fice/disconnect");
                assert_eq!(body, json!({"device": "d1"}));
            }
            other => panic!("{other:?}"),
        }
        assert!(parse_secrets(&["nokey".into()]).is_err());
        for (word, expected) in [("on", Switch::On), ("off", Switch::Off)] {
            let cli =
                Cli::try_parse_from(["presencectl", "invisible", word, "--user", "a"]).unwrap();
            match cli.command {
                Command::Invisible { switch, user } => {
                    assert_eq!((switch, user.as_str()), (expected, "a"));
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(Cli::try_parse_from(["presencectl", "invisible", "maybe", "--user", "a"]).is_err());
        assert!(Cli::try_parse_from(["presencectl", "block", "--user", "a"]).is_err());
        let cli = Cli::try_parse_from([
            "presencectl",
            "audience",
            "--user",
            "a",
            "last-seen",
            "nobody",
        ])
        .unwrap();
        match cli.command {
            Command::Audience { what, audience, .. } => assert_eq!(
                (what, audience),
                (Some(AudienceOf::LastSeen), Some(AudienceName::Nobody))
            ),
            other => panic!("{other:?}"),
        }
        // Both or neither.
        assert!(
            Cli::try_parse_from(["presencectl", "audience", "--user", "a", "presence"]).is_err()
        );
        assert!(Cli::try_parse_from(["presencectl", "audience", "--user", "a"]).is_ok());
        let cli = Cli::try_parse_from(["presencectl", "requests", "--user", "a"]).unwrap();
        match cli.command {
            Command::Requests { state, .. } => assert_eq!(state, RequestState::Pending),
            other => panic!("{other:?}"),
        }
        for verb in ["approve", "deny", "revoke"] {
            assert!(Cli::try_parse_from(["presencectl", verb, "--user", "a"]).is_err());
        }
    }

    #[test]
    fn path_segments_escape_everything_but_unreserved_characters() {
        assert_eq!(path_segment("alice-1.x_~").unwrap(), "alice-1.x_~");
        assert_eq!(
            path_segment("a/b?c#d%e f").unwrap(),
            "a%2Fb%3Fc%23d%25e%20f"
        );
        assert_eq!(path_segment("é").unwrap(), "%C3%A9");
        for bad in ["", ".", ".."] {
            assert!(path_segment(bad).is_err(), "{bad:?}");
        }
        let (path, body) = admin_request(&AdminOp::Revoke {
            user: "..x".into(),
            before_ms: None,
        })
        .unwrap();
        assert_eq!((path.as_str(), body), ("/v1/users/..x/revoke", json!({})));
    }
}
