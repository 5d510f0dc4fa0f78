//! Channel join-storm benchmark (not a test): N clients join one channel at once over TLS, and
//! the broker's own `presence_frames_out_total{kind="channel_event"}` counter tells how many
//! channel frames it sent, with interval mode off (every member hears every join: quadratic)
//! and on (default threshold 50: linear). Prints a markdown table.
//! Run: `cargo bench --bench channels` (`PRESENCE_BENCH_MEMBERS`, default 2000).

use std::sync::Arc;
use std::time::{Duration, Instant};

use presenced::auth::dev_token;
use presenced::client::{Client, ClientOptions};
use presenced::{Config, Server};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

fn channel_frames(handle: &metrics_exporter_prometheus::PrometheusHandle) -> f64 {
    handle
        .render()
        .lines()
        .find(|l| l.starts_with("presence_frames_out_total{kind=\"channel_event\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

struct Run {
    frames: f64,
    seconds: f64,
}

async fn storm(
    members: usize,
    threshold: u32,
    handle: &metrics_exporter_prometheus::PrometheusHandle,
) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_path_buf(),
        ..Config::default()
    };
    config.metrics.enabled = false;
    config.channels.announce_threshold = threshold;
    config.limits.max_connections = 100_000;
    // Every member connects from 127.0.0.1 at once: lift the per-address shares.
    config.limits.accept_rate_per_address_per_sec = 1_000_000;
    config.limits.accept_burst_per_address = 1_000_000;
    config.limits.max_connections_per_address = 100_000;
    let server = Server::bind(config.clone()).await.unwrap();
    let addr = server.local_addr();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(server.run(shutdown.clone()));

    let before = channel_frames(handle);
    let started = Instant::now();
    let connecting = Arc::new(Semaphore::new(200));
    let mut tasks = Vec::new();
    for i in 0..members {
        let connecting = connecting.clone();
        tasks.push(tokio::spawn(async move {
            let permit = connecting.acquire_owned().await.unwrap();
            let mut opts = ClientOptions::new(addr, dev_token(&format!("member{i}"), 3600));
            opts.event_capacity = 64;
            let mut client = Client::connect(opts).await.expect("connects");
            client.join("storm", &[]).await.expect("joins");
            drop(permit);
            // Drain events so the broker never has to coalesce: we count what it sends.
            while client.next_event().await.is_some() {}
        }));
    }
    // Wait until every frame is out: the counter stops moving for longer than one interval.
    let mut last = -1.0;
    loop {
        tokio::time::sleep(Duration::from_millis(config.channels.interval_ms + 500)).await;
        let now = channel_frames(handle);
        if now == last {
            break;
        }
        last = now;
    }
    let seconds = started.elapsed().as_secs_f64();
    shutdown.cancel();
    let _ = task.await;
    for t in tasks {
        t.abort();
    }
    Run {
        frames: last - before,
        seconds,
    }
}

#[tokio::main]
async fn main() {
    let members: usize = std::env::var("PRESENCE_BENCH_MEMBERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let handle = presenced::metrics::install();
    let per_event = storm(members, u32::MAX, &handle).await;
    let interval = storm(members, 50, &handle).await;
    let n = members as f64;
    println!(
        "| {members}-member join storm | channel frames sent | frames per member | wall time |"
    );
    println!("|---|---|---|---|");
    println!(
        "| interval mode off (every join to every member) | {:.0} | {:.1} | {:.1} s |",
        per_event.frames,
        per_event.frames / n,
        per_event.seconds
    );
    println!(
        "| interval mode on (threshold 50, 5 s interval) | {:.0} | {:.1} | {:.1} s |",
        interval.frames,
        interval.frames / n,
        interval.seconds
    );
    println!(
        "| ratio | {:.0}x fewer frames | | |",
        per_event.frames / interval.frames.max(1.0)
    );
}
