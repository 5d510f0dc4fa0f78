//! Mobile delivery benchmark (not a test), the figures of issue 14 point 6, counted in frames
//! and bytes (the wire size of each frame the client receives), so the machine's noise does not
//! matter:
//! - Resume: a client watching 500 users reconnects after 30 s in which 1% of them per minute
//!   changed (3 users); bytes and frames of the resume against the full snapshot (a resume from
//!   nothing, and the GetPresence re-fetch clients did before).
//! - Background: 50 watched users at 10% per second churn for a minute; a live watcher next to
//!   one under a 30 s batched contract (all fields, and availability only): frames and bytes per
//!   minute, and whether the final state is right once the last batch is in.
//!
//! Run: `cargo bench --bench mobile` (`PRESENCE_BENCH_SECONDS`, default 60: the churn time).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use presenced::auth::dev_token;
use presenced::client::{Client, ClientOptions};
use presenced::pb::{self, server_frame::Body as S};
use presenced::{Config, Server};
use prost::Message;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

fn wire_bytes(frame: &pb::ServerFrame) -> usize {
    let len = frame.encoded_len();
    len + prost::length_delimiter_len(len)
}

async fn broker() -> (std::net::SocketAddr, CancellationToken, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_path_buf(),
        ..Config::default()
    };
    config.metrics.enabled = false;
    config.limits.max_connections_per_address = 100_000;
    config.limits.accept_rate_per_address_per_sec = 1_000_000;
    config.limits.accept_burst_per_address = 1_000_000;
    config.limits.request_rate_per_sec = 100_000;
    config.limits.request_burst = 100_000;
    let server = Server::bind(config).await.unwrap();
    let addr = server.local_addr();
    let shutdown = CancellationToken::new();
    tokio::spawn(server.run(shutdown.clone()));
    (addr, shutdown, dir)
}

async fn connect(addr: std::net::SocketAddr, user: &str) -> Client {
    let mut options = ClientOptions::new(addr, dev_token(user, 3600));
    options.device_id = "phone".into();
    options.event_capacity = 100_000;
    Client::connect(options).await.expect("connects")
}

async fn users(addr: std::net::SocketAddr, n: usize) -> Vec<Client> {
    let gate = Arc::new(Semaphore::new(100));
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let gate = gate.clone();
            tokio::spawn(async move {
                let _permit = gate.acquire_owned().await.unwrap();
                connect(addr, &format!("user{i}")).await
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

fn change(i: u64) -> pb::SetPresence {
    pb::SetPresence {
        availability: [pb::Availability::Online, pb::Availability::Away][(i % 2) as usize] as i32,
        status: Some(format!("status {i}")),
        state: [("mood".to_string(), format!("{i}"))].into(),
        ..Default::default()
    }
}

/// Frames and bytes of everything pushed to `client` so far (drained).
fn drain(client: &mut Client, into: &mut (usize, usize)) -> Vec<pb::ServerFrame> {
    let mut frames = Vec::new();
    while let Some(frame) = client.try_next_event() {
        into.0 += 1;
        into.1 += wire_bytes(&frame);
        frames.push(frame);
    }
    frames
}

async fn resume_figures() {
    let (addr, shutdown, _dir) = broker().await;
    let publishers = users(addr, 500).await;
    let ids: Vec<String> = (0..500).map(|i| format!("user{i}")).collect();
    let mut watcher = connect(addr, "watcher").await;
    for chunk in ids.chunks(100) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        watcher.subscribe(&refs).await.unwrap();
    }
    // The full snapshot, two ways.
    let mut get_bytes = 0;
    for chunk in ids.chunks(100) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let presences = watcher.get_presence(&refs).await.unwrap();
        let frame = pb::ServerFrame {
            request_id: 1,
            body: Some(S::GetPresenceResult(pb::GetPresenceResult { presences })),
        };
        get_bytes += wire_bytes(&frame);
    }
    drain(&mut watcher, &mut (0, 0));
    let (all, result) = watcher.resume(&[]).await.unwrap();
    let full_frames = all.len().div_ceil(100) + 1;
    let full_bytes: usize = all
        .chunks(100)
        .map(|c| {
            wire_bytes(&pb::ServerFrame {
                request_id: 0,
                body: Some(S::PresenceBatch(pb::PresenceBatch {
                    events: c.to_vec(),
                    fields: 0,
                })),
            })
        })
        .sum::<usize>()
        + wire_bytes(&pb::ServerFrame {
            request_id: 2,
            body: Some(S::ResumeResult(result.clone())),
        });
    let known: Vec<(String, u64)> = all.iter().map(|e| (e.user_id.clone(), e.version)).collect();
    drop(watcher);
    // 30 s at 1% per minute of 500 users: 2.5 changes; 3 users change.
    for i in [7usize, 123, 404] {
        publishers[i].set_presence(change(i as u64)).await.unwrap();
    }
    let mut watcher = connect(addr, "watcher").await;
    let (changed, result) = watcher.resume(&known).await.unwrap();
    let resume_bytes = wire_bytes(&pb::ServerFrame {
        request_id: 0,
        body: Some(S::PresenceBatch(pb::PresenceBatch {
            events: changed.clone(),
            fields: 0,
        })),
    }) + wire_bytes(&pb::ServerFrame {
        request_id: 2,
        body: Some(S::ResumeResult(result.clone())),
    });
    let request_bytes = pb::ClientFrame {
        request_id: 2,
        body: Some(pb::client_frame::Body::Resume(pb::Resume {
            known: known
                .iter()
                .map(|(u, v)| pb::KnownVersion {
                    user_id: u.clone(),
                    version: *v,
                })
                .collect(),
            ..Default::default()
        })),
    }
    .encoded_len();
    println!("### Resume: 500 watched users, 3 changed while away (1%/min for 30 s)\n");
    println!("| what the client receives | frames | bytes | vs full snapshot |");
    println!("|---|---|---|---|");
    println!(
        "| GetPresence of all 500 (5 requests of 100) | 5 | {get_bytes} | {:.0}% |",
        100.0 * get_bytes as f64 / full_bytes as f64
    );
    println!("| resume from nothing (full snapshot) | {full_frames} | {full_bytes} | 100% |");
    println!(
        "| resume with the versions held ({} changed, {} unchanged) | 2 | {resume_bytes} | {:.1}% |",
        result.changed,
        result.unchanged,
        100.0 * resume_bytes as f64 / full_bytes as f64
    );
    println!("\n(The client's Resume request carries the 500 versions it holds: {request_bytes} bytes up.)\n");
    shutdown.cancel();
}

async fn background_figures(seconds: u64) {
    let (addr, shutdown, _dir) = broker().await;
    let publishers = users(addr, 50).await;
    let ids: Vec<String> = (0..50).map(|i| format!("user{i}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let mut watchers = Vec::new();
    for (name, fields) in [
        ("live", None),
        ("batched 30 s, all fields", Some(pb::FieldSelection::All)),
        (
            "batched 30 s, availability only",
            Some(pb::FieldSelection::Availability),
        ),
    ] {
        let mut w = connect(addr, &format!("watcher-{}", watchers.len())).await;
        w.subscribe(&refs).await.unwrap();
        if let Some(fields) = fields {
            w.set_delivery(pb::SetDelivery {
                mode: pb::DeliveryMode::Batched as i32,
                interval_seconds: 30,
                fields: fields as i32,
                live_user_ids: Vec::new(),
            })
            .await
            .unwrap();
        }
        drain(&mut w, &mut (0, 0));
        watchers.push((name, w, (0usize, 0usize), HashMap::<String, i32>::new()));
    }
    // 10% of 50 users per second: 5 changes a second, at random users.
    let started = Instant::now();
    let mut rng = 0x2545F4914F6CDD1Du64;
    let mut i = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    while started.elapsed() < Duration::from_secs(seconds) {
        tick.tick().await;
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let u = (rng % 50) as usize;
        i += 1;
        publishers[u].set_presence(change(i)).await.unwrap();
        for (_, w, counts, view) in watchers.iter_mut() {
            record(drain(w, counts), view);
        }
        if i.is_multiple_of(50) {
            // Keepalive (60 s by default): a ping's reply is not an event, so it is not counted.
            for (_, w, _, _) in watchers.iter() {
                w.ping().await.unwrap();
            }
        }
    }
    let churn_secs = started.elapsed().as_secs_f64();
    // The last batch is due within 30 s of the last change: wait for it, then compare.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(7_800)).await;
        for (_, w, _, _) in watchers.iter() {
            w.ping().await.unwrap();
        }
    }
    let truth: HashMap<String, i32> = watchers[0]
        .1
        .get_presence(&refs)
        .await
        .unwrap()
        .into_iter()
        .map(|p| (p.user_id, p.availability))
        .collect();
    println!(
        "### Background: 50 watched users, 10%/s churn for {churn_secs:.0} s, 30 s contract\n"
    );
    println!("| watcher | frames/min | bytes/min | vs live (bytes) | final availability right |");
    println!("|---|---|---|---|---|");
    let per_min = 60.0 / churn_secs;
    let mut live_bytes = 0.0;
    for (name, w, counts, view) in watchers.iter_mut() {
        // Frames that arrived after the churn (the last batch) count too.
        record(drain(w, counts), view);
        let bytes = counts.1 as f64 * per_min;
        if live_bytes == 0.0 {
            live_bytes = bytes;
        }
        let right = ids.iter().all(|u| view.get(u) == truth.get(u));
        println!(
            "| {name} | {:.1} | {:.0} | {:.1}% | {} |",
            counts.0 as f64 * per_min,
            bytes,
            100.0 * bytes / live_bytes,
            if right { "yes" } else { "NO" }
        );
    }
    println!();
    shutdown.cancel();
}

/// Applies events and batches to a view of availabilities.
fn record(frames: Vec<pb::ServerFrame>, view: &mut HashMap<String, i32>) {
    for frame in frames {
        let events = match frame.body {
            Some(S::PresenceEvent(e)) => vec![e],
            Some(S::PresenceBatch(b)) => b.events,
            _ => Vec::new(),
        };
        for e in events {
            if let Some(p) = e.presence {
                view.insert(e.user_id, p.availability);
            }
        }
    }
}

fn main() {
    let seconds = std::env::var("PRESENCE_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        resume_figures().await;
        background_figures(seconds).await;
    });
}
