//! Soak under churn (issue "Hostile networks, round 2", point 13). Runs the real `presenced`
//! binary with metrics on, holds 1,000 TLS clients for 60 s while they come and go: each connects,
//! publishes, subscribes to three others, republishes now and then, and leaves, two times in three
//! with a clean `Disconnect` and otherwise by dropping its socket mid-session, then reconnects,
//! sometimes as another device. The clients connect from 40 loopback addresses (25 each), so the
//! broker's default limits stay in force. At the end it checks what an operator would: no panic
//! in the broker's log; no ghost sessions (once everyone but ten held clients has gone and the
//! grace period has passed, `presence_connections` and `presence_online_users` read exactly ten,
//! the ten read the others as offline, and both gauges fall to zero when the ten leave); and the
//! broker's RSS grows at most 10 % between the 20 s and 60 s marks. Every Connect must be
//! answered by its ConnAck before anything else, and no client may see an error, a lost
//! connection or a Close it did not ask for. `PRESENCE_SOAK_SEED` replays a run's choices (the
//! seed is printed; thread timing still varies).

mod common;

use common::Rng;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use presenced::client::{Client, ClientError, ClientOptions};
use presenced::pb;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;

/// Clients held at any time (each one a slot that reconnects after leaving).
const CLIENTS: usize = 1000;
/// Loopback source addresses the clients are spread over (127.0.0.2 onwards).
const SOURCE_ADDRESSES: usize = 40;
/// Clients still connected at the end, to check the gauges against a non-zero figure.
const KEPT: usize = 10;
/// How long the churn lasts once every client has connected once.
const SOAK: Duration = Duration::from_secs(60);
/// When the first RSS sample is taken, counted from the start of the churn.
const RSS_FIRST_MARK: Duration = Duration::from_secs(20);
/// Grace period given to the broker, so abrupt drops go offline quickly.
const GRACE_MS: u64 = 1000;
/// Clients start this far apart during the ramp (1,000 × 4 ms = 4 s).
const RAMP_STEP: Duration = Duration::from_millis(4);
/// A session lasts between these many milliseconds (about 165 reconnects a second).
const HOLD_MS: (u64, u64) = (2_000, 10_000);
/// Any single request, connect or disconnect waits at most this long.
const STEP_DEADLINE: Duration = Duration::from_secs(15);
/// Every user watches this many others.
const WATCHES: usize = 3;

fn user(slot: usize) -> String {
    format!("soak{slot}")
}

fn source(slot: usize) -> SocketAddr {
    let host = 2 + (slot % SOURCE_ADDRESSES) as u8;
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, host)), 0)
}

/// What the clients saw, summed over every slot.
#[derive(Default)]
struct Tally {
    sessions: AtomicUsize,
    clean_disconnects: AtomicUsize,
    abrupt_drops: AtomicUsize,
    publishes: AtomicUsize,
    events: AtomicUsize,
    /// Clients connected right now, as the test counts them.
    connected: AtomicUsize,
    /// Slots that have connected at least once (the ramp is over at `CLIENTS`).
    ramped: AtomicUsize,
    /// Anything that should not happen: refused connects, failed requests, closes the client
    /// did not ask for. The first few are kept with their reason.
    failures: AtomicUsize,
    failure_samples: Mutex<Vec<String>>,
    /// Connects answered with an event before their ConnAck (a protocol-order defect), with
    /// the first few frames that came first.
    events_before_conn_ack: AtomicUsize,
    early_event_samples: Mutex<Vec<String>>,
}

impl Tally {
    fn early_event(&self, what: String) {
        self.events_before_conn_ack.fetch_add(1, Ordering::Relaxed);
        let mut samples = self.early_event_samples.lock().unwrap();
        if samples.len() < 5 {
            samples.push(what);
        }
    }

    fn fail(&self, what: String) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let mut samples = self.failure_samples.lock().unwrap();
        if samples.len() < 20 {
            samples.push(what);
        }
    }
}

async fn step<T>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, ClientError>>,
) -> Result<T, String> {
    match timeout(STEP_DEADLINE, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: no answer within {STEP_DEADLINE:?}")),
    }
}

fn presence(status: String) -> pb::SetPresence {
    pb::SetPresence {
        availability: pb::Availability::Online as i32,
        status: Some(status),
        ..Default::default()
    }
}

/// Why a session could not be opened.
enum OpenError {
    /// The first frame after Connect was a presence event, not the ConnAck.
    EventBeforeConnAck(String),
    Other(String),
}

impl From<String> for OpenError {
    fn from(e: String) -> OpenError {
        OpenError::Other(e)
    }
}

/// One session: connect, publish, subscribe.
async fn open(addr: SocketAddr, slot: usize, device: &str, n: u64) -> Result<Client, OpenError> {
    let mut options =
        ClientOptions::new(addr, presenced::auth::dev_token(&user(slot), 3600)).device(device);
    options.local_addr = Some(source(slot));
    let client = match timeout(STEP_DEADLINE, Client::connect(options)).await {
        Ok(Ok(client)) => client,
        Ok(Err(ClientError::Unexpected(frame))) if frame.contains("PresenceEvent") => {
            return Err(OpenError::EventBeforeConnAck(frame))
        }
        Ok(Err(e)) => return Err(format!("connect: {e}").into()),
        Err(_) => return Err(format!("connect: no answer within {STEP_DEADLINE:?}").into()),
    };
    step(
        "publish",
        client.set_presence(presence(format!("hello {n}"))),
    )
    .await?;
    let targets: Vec<String> = (1..=WATCHES)
        .map(|k| user((slot + k * 37) % CLIENTS))
        .collect();
    let refs: Vec<&str> = targets.iter().map(String::as_str).collect();
    step("subscribe", client.subscribe(&refs)).await?;
    Ok(client)
}

/// One slot: sessions back to back until `stop`; the first `KEPT` slots hand their last session
/// back still connected.
async fn slot(
    addr: SocketAddr,
    slot: usize,
    seed: u64,
    tally: Arc<Tally>,
    stop: CancellationToken,
) -> Option<Client> {
    let mut rng = Rng(seed | 1);
    let devices = ["phone", "tablet", "laptop"];
    let kept = slot < KEPT;
    let mut first = true;
    for n in 0u64.. {
        if stop.is_cancelled() && !kept {
            return None;
        }
        let device = devices[rng.below(devices.len() as u64) as usize];
        let mut client = match open(addr, slot, device, n).await {
            Ok(c) => c,
            Err(OpenError::EventBeforeConnAck(frame)) => {
                tally.early_event(format!("{} (session {n}): {frame}", user(slot)));
                continue;
            }
            Err(OpenError::Other(e)) => {
                tally.fail(format!("{} (session {n}): {e}", user(slot)));
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        tally.sessions.fetch_add(1, Ordering::Relaxed);
        if first {
            tally.ramped.fetch_add(1, Ordering::Relaxed);
            first = false;
        }
        tally.connected.fetch_add(1, Ordering::Relaxed);
        let hold_end =
            Instant::now() + Duration::from_millis(HOLD_MS.0 + rng.below(HOLD_MS.1 - HOLD_MS.0));
        let mut next_publish = Instant::now() + Duration::from_millis(1000 + rng.below(2000));
        let mut alive = true;
        while alive && Instant::now() < hold_end && !stop.is_cancelled() {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep_until(next_publish.min(hold_end)) => {
                    if Instant::now() >= next_publish {
                        let status = format!("update {n}.{}", rng.below(1000));
                        match step("republish", client.set_presence(presence(status))).await {
                            Ok(_) => {
                                tally.publishes.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => tally.fail(format!("{}: {e}", user(slot))),
                        }
                        next_publish =
                            Instant::now() + Duration::from_millis(1000 + rng.below(2000));
                    }
                }
                frame = client.next_event() => match frame.and_then(|f| f.body) {
                    Some(pb::server_frame::Body::Close(c)) => {
                        tally.fail(format!("{}: server closed the session: {c:?}", user(slot)));
                        alive = false;
                    }
                    Some(_) => {
                        tally.events.fetch_add(1, Ordering::Relaxed);
                    }
                    None => {
                        tally.fail(format!("{}: connection lost", user(slot)));
                        alive = false;
                    }
                },
            }
        }
        tally.connected.fetch_sub(1, Ordering::Relaxed);
        if !alive {
            continue;
        }
        if kept && stop.is_cancelled() {
            // Kept clients stay connected and are handed back; what already arrived is dropped.
            while client.try_next_event().is_some() {}
            return Some(client);
        }
        if rng.below(3) == 0 {
            tally.abrupt_drops.fetch_add(1, Ordering::Relaxed);
            drop(client);
        } else {
            match step("disconnect", client.disconnect()).await {
                Ok(Some(_)) => {
                    tally.clean_disconnects.fetch_add(1, Ordering::Relaxed);
                }
                Ok(None) => tally.fail(format!("{}: disconnect without a Close", user(slot))),
                Err(e) => tally.fail(format!("{}: {e}", user(slot))),
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.below(100))).await;
    }
    None
}

/// The broker process and what it printed.
struct Broker {
    child: tokio::process::Child,
    pid: u32,
    addr: SocketAddr,
    metrics: SocketAddr,
    log: Arc<LogWatch>,
}

/// The broker's output: line count, and every line that says a thread panicked (the first
/// few, with the error lines next to them, are kept).
#[derive(Default)]
struct LogWatch {
    lines: AtomicUsize,
    panics: AtomicUsize,
    kept: Mutex<Vec<String>>,
}

impl LogWatch {
    fn see(&self, line: String) {
        self.lines.fetch_add(1, Ordering::Relaxed);
        let panicked = line.contains("panicked");
        if panicked {
            self.panics.fetch_add(1, Ordering::Relaxed);
        }
        if panicked || line.contains("ERROR") {
            let mut kept = self.kept.lock().unwrap();
            if kept.len() < 50 {
                kept.push(line);
            }
        }
    }
}

fn drain(
    log: Arc<LogWatch>,
    reader: impl tokio::io::AsyncRead + Unpin + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut lines = BufReader::new(reader).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            log.see(line);
        }
    })
}

/// Starts `presenced` on loopback port 0 with metrics on port 0 and a short grace period, and
/// reads both addresses from its start line. Killed when dropped.
async fn spawn_broker(data_dir: &std::path::Path) -> Broker {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_presenced"))
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .args(["--grace-period-ms", &GRACE_MS.to_string(), "--data-dir"])
        .arg(data_dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("presenced starts");
    let pid = child.id().expect("a pid");
    let log = Arc::new(LogWatch::default());
    drain(log.clone(), child.stdout.take().unwrap());
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut early = Vec::new();
    let (addr, metrics) = loop {
        let line = timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("presenced prints its start line within 30 s")
            .unwrap()
            .unwrap_or_else(|| panic!("presenced exited early:\n{}", early.join("\n")));
        let field = |key: &str| -> Option<SocketAddr> {
            let rest = line.split(key).nth(1)?;
            let end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == ':'))?;
            rest[..end].parse().ok()
        };
        let found = (field("listen="), field("http://"));
        early.push(line.clone());
        log.see(line);
        if let (Some(addr), Some(metrics)) = found {
            break (addr, metrics);
        }
    };
    let stderr = lines.into_inner().into_inner();
    drain(log.clone(), stderr);
    Broker {
        child,
        pid,
        addr,
        metrics,
        log,
    }
}

/// Unlabelled gauges from one scrape of `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Gauges {
    connections: f64,
    online_users: f64,
}

async fn scrape(metrics: SocketAddr) -> Result<Gauges, String> {
    let body = timeout(Duration::from_secs(10), async {
        let mut socket = tokio::net::TcpStream::connect(metrics).await?;
        socket
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await?;
        let mut body = String::new();
        socket.read_to_string(&mut body).await?;
        Ok::<_, std::io::Error>(body)
    })
    .await
    .map_err(|_| "metrics endpoint silent for 10 s".to_string())?
    .map_err(|e| format!("metrics scrape: {e}"))?;
    let gauge = |name: &str| {
        body.lines()
            .filter_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .find_map(|v| v.trim().parse::<f64>().ok())
            // A gauge nobody has touched yet is not printed: it is zero.
            .unwrap_or(0.0)
    };
    Ok(Gauges {
        connections: gauge("presence_connections"),
        online_users: gauge("presence_online_users"),
    })
}

/// Polls until both gauges read `expected` (bounded); returns the last reading either way.
async fn settle(metrics: SocketAddr, expected: f64, within: Duration) -> (Gauges, Duration) {
    let start = Instant::now();
    loop {
        let g = scrape(metrics).await.unwrap();
        if (g.connections == expected && g.online_users == expected) || start.elapsed() >= within {
            return (g, start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Resident set of `pid` in KiB, from /proc.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("broker alive");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// Open files this process may hold (1,000 clients need more than the common 1,024 default).
fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_churning_clients_leave_no_ghosts_leaks_or_panics() {
    if let Some(limit) = open_file_limit() {
        assert!(
            limit as usize >= CLIENTS + 200,
            "the soak holds {CLIENTS} sockets; raise the open-file limit (ulimit -n, now {limit})"
        );
    }
    let seed: u64 = std::env::var("PRESENCE_SOAK_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(presenced::now_ms);
    let mut rng = Rng(seed | 1);
    let dir = tempfile::tempdir().unwrap();
    let broker = spawn_broker(dir.path()).await;
    let started = Instant::now();
    let tally = Arc::new(Tally::default());
    let stop = CancellationToken::new();

    // Ramp: every slot connects once, 4 ms apart.
    let mut slots = Vec::with_capacity(CLIENTS);
    for i in 0..CLIENTS {
        slots.push(tokio::spawn(slot(
            broker.addr,
            i,
            rng.next(),
            tally.clone(),
            stop.clone(),
        )));
        tokio::time::sleep(RAMP_STEP).await;
    }
    let ramp_deadline = Instant::now() + Duration::from_secs(60);
    while tally.ramped.load(Ordering::Relaxed) < CLIENTS {
        assert!(
            Instant::now() < ramp_deadline,
            "only {} of {CLIENTS} clients connected within 60 s of the ramp; failures: {:?}",
            tally.ramped.load(Ordering::Relaxed),
            tally.failure_samples.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ramp = started.elapsed();

    // Churn for 60 s, sampling the gauges every second and RSS at the marks.
    let churn = Instant::now();
    let rss_start = rss_kib(broker.pid);
    let mut rss_first = None;
    let mut low = (f64::MAX, usize::MAX);
    let mut high = (0f64, 0usize);
    let (mut sum, mut samples) = (0.0, 0);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while churn.elapsed() < SOAK {
        tick.tick().await;
        let g = scrape(broker.metrics).await.unwrap();
        let ours = tally.connected.load(Ordering::Relaxed);
        low = (low.0.min(g.connections), low.1.min(ours));
        sum += g.connections;
        samples += 1;
        high = (high.0.max(g.connections), high.1.max(ours));
        if rss_first.is_none() && churn.elapsed() >= RSS_FIRST_MARK {
            rss_first = Some((churn.elapsed(), rss_kib(broker.pid)));
        }
    }
    let rss_last = (churn.elapsed(), rss_kib(broker.pid));
    let mean = sum / samples as f64;
    let (first_at, rss_first) = rss_first.unwrap();
    stop.cancel();

    let mut kept = Vec::new();
    for s in slots {
        if let Some(client) = timeout(Duration::from_secs(60), s)
            .await
            .expect("every client leaves within 60 s of the stop")
            .unwrap()
        {
            kept.push(client);
        }
    }
    assert_eq!(kept.len(), KEPT, "the kept clients are connected");

    assert_eq!(
        broker.log.panics.load(Ordering::Relaxed),
        0,
        "the broker panicked during the churn:\n{}",
        broker.log.kept.lock().unwrap().join("\n")
    );

    // No ghosts: with only the kept clients left, both gauges read exactly that once the grace
    // period has passed, and stay there.
    let (after_leave, took) = settle(broker.metrics, KEPT as f64, Duration::from_secs(30)).await;
    let expected = Gauges {
        connections: KEPT as f64,
        online_users: KEPT as f64,
    };
    assert_eq!(
        after_leave, expected,
        "gauges {took:?} after everyone but {KEPT} left (grace {GRACE_MS} ms)"
    );
    tokio::time::sleep(Duration::from_millis(3 * GRACE_MS)).await;
    let later = scrape(broker.metrics).await.unwrap();
    assert_eq!(later, expected, "gauges three grace periods later");
    // And the clients agree: the kept users are online, every other user is offline.
    let everyone: Vec<String> = (0..CLIENTS).map(user).collect();
    for chunk in everyone.chunks(100) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let presences = step("get_presence", kept[0].get_presence(&refs))
            .await
            .unwrap();
        assert_eq!(presences.len(), refs.len());
        for p in presences {
            let slot: usize = p.user_id.trim_start_matches("soak").parse().unwrap();
            let online = p.availability != pb::Availability::Offline as i32;
            assert_eq!(
                online,
                slot < KEPT,
                "{} reads {:?} after the churn",
                p.user_id,
                pb::Availability::try_from(p.availability)
            );
        }
    }
    for client in kept {
        step("final disconnect", client.disconnect()).await.unwrap();
    }
    let (empty, took_empty) = settle(broker.metrics, 0.0, Duration::from_secs(30)).await;
    assert_eq!(
        empty,
        Gauges {
            connections: 0.0,
            online_users: 0.0
        },
        "gauges {took_empty:?} after the last clients left"
    );

    // A clean stop, then the log.
    let Broker {
        mut child,
        pid,
        log,
        ..
    } = broker;
    let term = tokio::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await
        .unwrap();
    assert!(term.success());
    let exit = timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("presenced exits within 30 s of SIGTERM")
        .unwrap();
    // The log readers finish at EOF; give them a moment to read the last lines.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let failures = tally.failures.load(Ordering::Relaxed);
    let early_events = tally.events_before_conn_ack.load(Ordering::Relaxed);
    let growth = rss_last.1 as f64 / rss_first as f64 - 1.0;
    eprintln!(
        "soak (seed {seed}): ramp {ramp:.1?}; churn {SOAK:?}: {} sessions, {} clean disconnects, \
         {} abrupt drops, {} republishes, {} events received, {failures} failures, \
         {early_events} events before a ConnAck; \
         presence_connections {}..{} (mean {mean:.0}), clients connected {}..{}; broker RSS {} KiB at the start \
         of the churn, {} KiB at {first_at:.1?}, {} KiB at {:.1?} ({:+.1} %); gauges at {KEPT} \
         {took:.1?} and at 0 {took_empty:.1?} after leaving; {} log lines; total {:.1?}",
        tally.sessions.load(Ordering::Relaxed),
        tally.clean_disconnects.load(Ordering::Relaxed),
        tally.abrupt_drops.load(Ordering::Relaxed),
        tally.publishes.load(Ordering::Relaxed),
        tally.events.load(Ordering::Relaxed),
        low.0,
        high.0,
        low.1,
        high.1,
        rss_start,
        rss_first,
        rss_last.1,
        rss_last.0,
        growth * 100.0,
        log.lines.load(Ordering::Relaxed),
        started.elapsed(),
    );
    assert_eq!(
        log.panics.load(Ordering::Relaxed),
        0,
        "the broker panicked:\n{}",
        log.kept.lock().unwrap().join("\n")
    );
    assert!(exit.success(), "clean exit after SIGTERM: {exit:?}");
    assert_eq!(
        failures,
        0,
        "clients saw failures: {:#?}",
        tally.failure_samples.lock().unwrap()
    );
    assert!(
        low.0 >= (CLIENTS * 8 / 10) as f64 && mean >= (CLIENTS * 9 / 10) as f64,
        "the churn kept about {CLIENTS} connected: presence_connections averaged {mean:.0} \
         (at least 90 %) and never fell below {} (at least 80 %)",
        low.0
    );
    assert!(
        growth <= 0.10,
        "broker RSS grew {:.1} % between {first_at:?} and {:?} ({rss_first} → {} KiB)",
        growth * 100.0,
        rss_last.0,
        rss_last.1
    );
    // Last, so a run that fails here has passed every other check.
    assert_eq!(
        early_events,
        0,
        "Connect must be answered by its ConnAck first; these sessions got a watched user's \
         event before it (the session joins the registry, and so receives fanout, before the \
         ConnAck is queued): {:#?}",
        tally.early_event_samples.lock().unwrap()
    );
}
