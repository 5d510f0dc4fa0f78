//! `presencectl`: a developer's command line for presenced. Mints tokens from the configured
//! secret (the dev secret by default), connects as any user over TLS, publishes presence,
//! subscribes, queries, lists subscriptions and watches users, printing JSON lines. With no
//! flags it talks to a default local broker (127.0.0.1:7883, the dev CA).

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use presenced::auth::{mint, Claims};
use presenced::client::{Client, ClientOptions};
use presenced::config::DEV_SECRET;
use presenced::pb;
use serde_json::{json, Value};

/// Talk to a presenced broker from the shell.
#[derive(Debug, Parser)]
#[command(
    version,
    about = "The presenced developer CLI: mint tokens, watch and set presence, subscriptions, channels"
)]
struct Cli {
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
        mint(
            self.secret.as_bytes(),
            self.kid.as_deref(),
            &Claims {
                sub: user.to_string(),
                exp: presenced::now_ms() / 1000 + ttl,
                did: None,
                iat: Some(presenced::now_ms() / 1000),
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
        if self.ca.exists() {
            Ok(presenced::tls::client_config_from_file(&self.ca)?)
        } else {
            Ok(presenced::tls::dev_client_config())
        }
    }

    async fn connect(&self, user: &str) -> anyhow::Result<Client> {
        let mut options = ClientOptions::new(self.addr()?, self.token_for(user, 3600));
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
        Command::Token { user, ttl } => println!("{}", cli.token_for(user, *ttl)),
        Command::Watch { user, targets } => {
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
            let client = cli.connect(user).await?;
            let presence = client.set_presence(change).await?;
            print(presence_json(&presence));
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
