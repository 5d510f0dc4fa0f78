//! Shared harness for the integration tests: an in-process broker on 127.0.0.1:0 with the dev
//! certificates and a temporary data folder, token minting, and bounded waits. Every wait is
//! bounded by `within` so a missing event fails the test instead of hanging it.
#![allow(dead_code, unreachable_pub)]

pub mod cluster;
pub mod nats;
pub mod proxy;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use presenced::client::{Client, ClientOptions};
use presenced::{Config, Server};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A running broker; shut down when dropped.
pub struct Broker {
    pub addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    pub plain_addr: Option<SocketAddr>,
    #[allow(dead_code)]
    pub admin_addr: Option<SocketAddr>,
    /// The wss listener, when `websocket.listen` is set.
    pub ws_addr: Option<SocketAddr>,
    /// The plain ws listener, when `websocket.plain_listen` is set.
    pub ws_plain_addr: Option<SocketAddr>,
    pub shutdown: CancellationToken,
    pub registry: presenced::registry::Registry,
    pub task: Option<JoinHandle<()>>,
    pub data_dir: tempfile::TempDir,
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Broker {
    /// Cancels and waits for a clean shutdown.
    pub async fn stop(self) {
        self.stop_keeping_data().await;
    }

    /// Cancels, waits for a clean shutdown and hands back the data folder for a restart.
    pub async fn stop_keeping_data(mut self) -> tempfile::TempDir {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            within(task).await.expect("server task panicked");
        }
        std::mem::replace(&mut self.data_dir, tempfile::tempdir().unwrap())
    }
}

/// The test configuration: loopback port 0, metrics off, a temp data folder.
pub fn test_config(data_dir: &std::path::Path) -> Config {
    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: data_dir.to_path_buf(),
        ..Config::default()
    };
    config.metrics.enabled = false;
    config
}

/// Starts a broker with the test configuration changed by `tweak`.
pub async fn start(tweak: impl FnOnce(&mut Config)) -> Broker {
    start_in(tempfile::tempdir().unwrap(), tweak).await
}

/// Starts a broker on an existing data folder.
pub async fn start_in(data_dir: tempfile::TempDir, tweak: impl FnOnce(&mut Config)) -> Broker {
    let mut config = test_config(data_dir.path());
    tweak(&mut config);
    let server = Server::bind(config).await.expect("broker starts");
    let addr = server.local_addr();
    let metrics_addr = server.metrics_addr();
    let plain_addr = server.plain_addr();
    let admin_addr = server.admin_addr();
    let ws_addr = server.ws_addr();
    let ws_plain_addr = server.ws_plain_addr();
    let registry = server.registry();
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let task = tokio::spawn(async move {
        server.run(token).await.expect("broker runs");
    });
    Broker {
        addr,
        metrics_addr,
        plain_addr,
        admin_addr,
        ws_addr,
        ws_plain_addr,
        shutdown,
        registry,
        task: Some(task),
        data_dir,
    }
}

pub fn now_secs() -> u64 {
    presenced::now_ms() / 1000
}

/// A valid dev token for `user`.
pub fn token(user: &str) -> String {
    presenced::auth::dev_token(user, 3600)
}

pub fn options(broker: &Broker, user: &str, device: &str) -> ClientOptions {
    ClientOptions::new(broker.addr, token(user)).device(device)
}

/// Connects `user` on device "phone".
pub async fn connect(broker: &Broker, user: &str) -> Client {
    connect_device(broker, user, "phone").await
}

pub async fn connect_device(broker: &Broker, user: &str, device: &str) -> Client {
    within(Client::connect(options(broker, user, device)))
        .await
        .unwrap_or_else(|e| panic!("{user}/{device} connects: {e}"))
}

/// Awaits `f` for at most 10 s; a test that waits longer has failed.
pub async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .expect("timed out after 10 s waiting for the broker")
}

/// The server error a client saw.
pub fn server_error(
    result: Result<impl std::fmt::Debug, presenced::client::ClientError>,
) -> presenced::pb::Error {
    match result {
        Err(presenced::client::ClientError::Server(e)) => e,
        other => panic!("expected a server error, got {other:?}"),
    }
}

pub fn code(e: &presenced::pb::Error) -> presenced::pb::ErrorCode {
    presenced::pb::ErrorCode::try_from(e.code).unwrap()
}

pub fn close_code(c: &presenced::pb::Close) -> presenced::pb::CloseCode {
    presenced::pb::CloseCode::try_from(c.code).unwrap()
}

pub fn kind(e: &presenced::pb::PresenceEvent) -> presenced::pb::EventKind {
    presenced::pb::EventKind::try_from(e.kind).unwrap()
}

pub fn availability(p: &presenced::pb::Presence) -> presenced::pb::Availability {
    presenced::pb::Availability::try_from(p.availability).unwrap()
}

pub fn reason(e: &presenced::pb::PresenceEvent) -> presenced::pb::OfflineReason {
    presenced::pb::OfflineReason::try_from(e.reason).unwrap()
}

/// A `presenced` process started by a test.
pub struct Spawned {
    pub child: tokio::process::Child,
    pub addr: SocketAddr,
    /// Log lines printed up to the "accepting clients" line.
    pub early_log: Vec<String>,
}

/// Runs the real `presenced` binary on 127.0.0.1:0 with `data_dir`, waits until it accepts
/// clients and returns its address. The rest of its log is drained in the background.
pub async fn spawn_presenced(data_dir: &std::path::Path, extra: &[&str]) -> Spawned {
    let data_dir = data_dir.to_str().expect("a UTF-8 data folder");
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--no-metrics",
        "--data-dir",
        data_dir,
    ];
    args.extend_from_slice(extra);
    spawn_presenced_args(&args).await
}

/// Runs the real `presenced` binary with exactly `args` (a config file alone, say), waits
/// until it accepts clients and returns its address. The rest of its log is drained.
pub async fn spawn_presenced_args(args: &[&str]) -> Spawned {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_presenced"))
        .args(args)
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("presenced starts");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut early_log = Vec::new();
    let addr = loop {
        let line = within(lines.next_line())
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("presenced exited early:\n{}", early_log.join("\n")));
        let addr = line
            .split("listen=")
            .nth(1)
            .map(|rest| rest.split_whitespace().next().unwrap().parse().unwrap());
        early_log.push(line);
        if let Some(addr) = addr {
            break addr;
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Spawned {
        child,
        addr,
        early_log,
    }
}

impl Spawned {
    /// The metrics listener's address, when the process has one.
    #[allow(dead_code)]
    pub fn metrics(&self) -> Option<SocketAddr> {
        let line = self.early_log.last()?;
        let rest = line.split("metrics=Some(\"http://").nth(1)?;
        rest.split('/').next()?.parse().ok()
    }

    /// The admin API's address, when the process's config turned it on.
    #[allow(dead_code)]
    pub fn admin(&self) -> Option<SocketAddr> {
        let line = self.early_log.last()?;
        let rest = line.split("admin://").nth(1)?;
        rest.split(|c: char| c == '"' || c.is_whitespace() || c == ')')
            .next()?
            .parse()
            .ok()
    }
}

pub fn channel_kind(e: &presenced::pb::ChannelEvent) -> presenced::pb::ChannelEventKind {
    presenced::pb::ChannelEventKind::try_from(e.kind).unwrap()
}

/// xorshift64*: small, seedable, good enough to pick batches, moments and hold times.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Claims for `user` expiring at `exp` (seconds), nothing else.
pub fn claims(user: &str, exp: u64) -> presenced::auth::Claims {
    presenced::auth::Claims {
        sub: user.into(),
        exp,
        did: None,
        iat: None,
    }
}

/// Waits for `user`'s event of `kind` at `watcher` and returns it, skipping others.
pub async fn presence_event_of(
    watcher: &mut Client,
    user: &str,
    kind_wanted: presenced::pb::EventKind,
) -> presenced::pb::PresenceEvent {
    loop {
        let e = within(watcher.next_presence_event()).await.unwrap();
        if e.user_id == user && kind(&e) == kind_wanted {
            return e;
        }
    }
}

/// Waits for `user`'s OFFLINE event at `watcher` and returns its reason.
pub async fn offline_reason(watcher: &mut Client, user: &str) -> presenced::pb::OfflineReason {
    reason(&presence_event_of(watcher, user, presenced::pb::EventKind::Offline).await)
}
