//! Store benchmark (not a test): fills a data folder with 1M subscription edges, then measures
//! (1) the real `presenced` binary's time from process start to a completed TLS Connect on that
//! folder, and (2) the latency of acknowledged (flushed, group-committed) subscribe requests from
//! 1,000 concurrent clients. Prints a markdown table. Run: `cargo bench --bench store`
//! (`PRESENCE_BENCH_EDGES` and `PRESENCE_BENCH_CLIENTS` change the sizes).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use common::env_usize;
use hdrhistogram::Histogram;
use presenced::auth::dev_token;
use presenced::client::{Client, ClientOptions};
use presenced::store::{SledStore, SubscriptionStore};

fn fill(dir: &Path, edges: usize) -> Duration {
    let started = Instant::now();
    let store = SledStore::open(dir).expect("store opens");
    let per_subscriber = 100;
    let expires = presenced::now_ms() + 7 * 24 * 3600 * 1000;
    let targets_pool = 50_000;
    for s in 0..edges / per_subscriber {
        let targets: Vec<String> = (0..per_subscriber)
            .map(|k| format!("user{}", (s * 7919 + k * 104_729) % targets_pool))
            .collect();
        store
            .subscribe(&format!("sub{s}"), &targets, expires, 0, 3000)
            .expect("subscribe");
    }
    store.flush().expect("flush");
    started.elapsed()
}

struct Started {
    broker: common::Broker,
    ready_after: Duration,
}

/// Starts the broker on `dir` and measures until a first client has its ConnAck.
async fn start_broker(dir: &Path) -> Started {
    // The concurrent clients all come from 127.0.0.1: lift the per-address shares.
    let config = dir.with_extension("bench.toml");
    std::fs::write(
        &config,
        "[limits]\naccept_rate_per_address_per_sec = 1000000\naccept_burst_per_address = 1000000\n\
         max_connections_per_address = 100000\n",
    )
    .unwrap();
    let started = Instant::now();
    let broker = common::start(&[
        "--config".as_ref(),
        config.as_os_str(),
        "--listen".as_ref(),
        "127.0.0.1:0".as_ref(),
        "--metrics-listen".as_ref(),
        "127.0.0.1:0".as_ref(),
        "--data-dir".as_ref(),
        dir.as_os_str(),
    ])
    .await;
    let _ = std::fs::remove_file(&config);
    let client = Client::connect(ClientOptions::new(broker.addr, dev_token("probe", 3600)))
        .await
        .expect("first client connects");
    let ready_after = started.elapsed();
    drop(client);
    Started {
        broker,
        ready_after,
    }
}

/// Sum and count of a histogram in the broker's /metrics text.
async fn scrape_histogram(addr: std::net::SocketAddr, name: &str) -> (f64, f64) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    tcp.read_to_string(&mut text).await.unwrap();
    let value = |suffix: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{name}{suffix} ")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    (value("_sum"), value("_count"))
}

fn quantile_ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

#[tokio::main]
async fn main() {
    let edges = env_usize("PRESENCE_BENCH_EDGES", 1_000_000);
    let clients = env_usize("PRESENCE_BENCH_CLIENTS", 1_000);
    let requests_per_client = 5;
    let dir = tempfile::tempdir().unwrap();

    let fill_time = tokio::task::spawn_blocking({
        let path = dir.path().to_path_buf();
        move || fill(&path, edges)
    })
    .await
    .unwrap();
    eprintln!("filled {edges} edges in {fill_time:?}");

    let Started {
        mut broker,
        ready_after,
    } = start_broker(dir.path()).await;
    if let Some(loaded) = broker
        .log
        .iter()
        .find(|l| l.contains("subscription store loaded"))
    {
        eprintln!("{loaded}");
    }

    let mut conns = Vec::with_capacity(clients);
    for i in 0..clients {
        let opts = ClientOptions::new(broker.addr, dev_token(&format!("bench{i}"), 3600));
        conns.push(Arc::new(
            Client::connect(opts).await.expect("client connects"),
        ));
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, c) in conns.iter().enumerate() {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new(3).unwrap();
            for r in 0..requests_per_client {
                let target = format!("user{}", (i * 31 + r) % 50_000);
                let t = Instant::now();
                c.subscribe(&[target.as_str()])
                    .await
                    .expect("subscribe acknowledged");
                h.record(t.elapsed().as_micros() as u64).unwrap();
            }
            h
        }));
    }
    let mut all = Histogram::<u64>::new(3).unwrap();
    for t in tasks {
        all.add(t.await.unwrap()).unwrap();
    }
    let elapsed = started.elapsed();
    let total = clients * requests_per_client;
    let (flush_sum, flushes) = scrape_histogram(
        broker.metrics.expect("metrics address in the log"),
        "presence_store_commit_duration_seconds",
    )
    .await;
    broker.child.start_kill().ok();

    println!("| measure | value |");
    println!("|---|---|");
    println!("| edges in the store | {edges} |");
    println!(
        "| fill time (direct store API, 100-edge batches) | {:.2} s |",
        fill_time.as_secs_f64()
    );
    println!(
        "| process start → first TLS ConnAck | {:.2} s (goal ≤ 5 s) |",
        ready_after.as_secs_f64()
    );
    println!("| concurrent subscribers | {clients} |");
    println!(
        "| acknowledged subscribes | {total} in {:.2} s ({:.0}/s) |",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64()
    );
    println!("| commit latency p50 | {:.2} ms |", quantile_ms(&all, 0.50));
    println!("| commit latency p99 | {:.2} ms |", quantile_ms(&all, 0.99));
    println!(
        "| commit latency p999 | {:.2} ms |",
        quantile_ms(&all, 0.999)
    );
    println!(
        "| commit latency max | {:.2} ms |",
        all.max() as f64 / 1000.0
    );
    println!(
        "| server flushes (group commits) | {flushes:.0}, {:.1} requests each |",
        total as f64 / flushes.max(1.0)
    );
    println!(
        "| server flush time, mean | {:.2} ms |",
        1000.0 * flush_sum / flushes.max(1.0)
    );
}
