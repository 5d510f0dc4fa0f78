//! Abuse benchmark (not a test), against the real release `presenced` binary:
//! 1. a legitimate client's TLS + Connect time, alone and while 1,000 sockets from another
//!    address stall mid-handshake (half a ClientHello sent), and while 1,000 send a whole
//!    ClientHello and then stall (those take handshake slots, 32 per address at most);
//! 2. broker RSS with 10,000 TLS sockets each announcing a maximal pre-auth frame (4 KiB) and
//!    never finishing it (goal: at most 100 MiB in total);
//! 3. broker RSS over 60 s of a subscriber that never reads while its targets change 100 times
//!    a second (goal: flat, and disconnected within 10 s of its writes blocking).
//!
//! Run: `cargo bench --bench abuse` (`PRESENCE_ABUSE_SOCKETS`, `PRESENCE_ABUSE_SECONDS` scale it;
//! `PRESENCE_ABUSE_ONLY=23` runs scenarios 2 and 3 only).

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

mod common;

use common::env_usize;
use presenced::auth::dev_token;
use presenced::client::{tls_connect, Client, ClientOptions};
use presenced::pb;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Starts the broker with a config file: the bench's loopback limits plus `extra_toml`.
async fn start(dir: &Path, extra_toml: &str) -> common::Broker {
    std::fs::create_dir_all(dir).unwrap();
    let config = dir.join("presenced.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = {:?}\n[metrics]\nenabled = false\n[limits]\naccept_rate_per_sec = 1000000\naccept_burst = 1000000\nmax_connections = 100000\naccept_rate_per_address_per_sec = 1000000\naccept_burst_per_address = 1000000\nmax_connections_per_address = 100000\n{extra_toml}",
            dir.join("data")
        ),
    )
    .unwrap();
    common::start(&["--config".as_ref(), config.as_os_str()]).await
}

async fn legit_connect_ms(addr: SocketAddr, runs: usize) -> (f64, f64) {
    let mut times = Vec::new();
    for i in 0..runs {
        let started = Instant::now();
        let ok = tokio::time::timeout(
            Duration::from_secs(30),
            Client::connect(ClientOptions::new(
                addr,
                dev_token(&format!("legit{i}"), 3600),
            )),
        )
        .await;
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        if matches!(ok, Ok(Ok(_))) {
            times.push(ms);
        } else {
            times.push(f64::INFINITY);
        }
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (times[times.len() / 2], times[times.len() - 1])
}

fn client_hello() -> Vec<u8> {
    let name = presenced::tls::server_name("localhost").unwrap();
    let mut tls = rustls::ClientConnection::new(presenced::tls::dev_client_config(), name).unwrap();
    let mut hello = Vec::new();
    tls.write_tls(&mut hello).unwrap();
    hello
}

/// `n` sockets from the attacker's address 127.0.0.2 that send `bytes` and stall.
async fn stallers(addr: SocketAddr, n: usize, bytes: &[u8]) -> Vec<TcpStream> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut tcp = socket.connect(addr).await.unwrap();
        tcp.write_all(bytes).await.unwrap();
        out.push(tcp);
    }
    out
}

#[tokio::main]
async fn main() {
    let sockets = env_usize("PRESENCE_ABUSE_SOCKETS", 10_000);
    let seconds = env_usize("PRESENCE_ABUSE_SECONDS", 60);
    let dir = tempfile::tempdir().unwrap();
    println!("| scenario | measure | value |");
    println!("|---|---|---|");

    let only = std::env::var("PRESENCE_ABUSE_ONLY").unwrap_or_default();
    let run = |n: &str| only.is_empty() || only.contains(n);

    // 1. Handshake stalls.
    if run("1") {
        let broker = start(dir.path(), "[session]\nhandshake_timeout_ms = 10000\n").await;
        let (alone, _) = legit_connect_ms(broker.addr, 20).await;
        let hello = client_hello();
        let half = stallers(broker.addr, 1000, &hello[..hello.len() / 2]).await;
        let (during_half, worst_half) = legit_connect_ms(broker.addr, 20).await;
        drop(half);
        let whole = stallers(broker.addr, 1000, &hello).await;
        let (during_whole, worst_whole) = legit_connect_ms(broker.addr, 5).await;
        drop(whole);
        println!("| handshake stalls | legit TLS+Connect, alone (median of 20) | {alone:.1} ms |");
        println!("| handshake stalls | with 1,000 sockets stalled mid-ClientHello (median / worst) | {during_half:.1} / {worst_half:.1} ms |");
        println!("| handshake stalls | with 1,000 sockets stalled after a whole ClientHello (median / worst of 5) | {during_whole:.1} / {worst_whole:.1} ms |");
    }

    // 2. Maximal pre-auth length prefixes.
    if run("2") {
        let broker = start(
            &dir.path().join("2"),
            "[session]\nconnect_timeout_ms = 600000\npartial_frame_timeout_ms = 600000\nhandshake_timeout_ms = 600000\n",
        )
        .await;
        let before = broker.rss_mib();
        let mut held = Vec::with_capacity(sockets);
        let mut prefix = bytes::BytesMut::new();
        presenced::codec::put_length_prefix(&mut prefix, 4096);
        prefix.extend_from_slice(&[0x08]);
        for _ in 0..sockets {
            let mut tls = tls_connect(
                broker.addr,
                "localhost",
                presenced::tls::dev_client_config(),
            )
            .await
            .unwrap();
            tls.write_all(&prefix).await.unwrap();
            tls.flush().await.unwrap();
            held.push(tls);
        }
        // Let the broker read every prefix before measuring.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = broker.rss_mib();
        println!("| {sockets} sockets x 4 KiB prefix | broker RSS before / after | {before:.1} / {after:.1} MiB |");
        println!(
            "| {sockets} sockets x 4 KiB prefix | per socket | {:.1} KiB (goal: {:.0} MiB in total) |",
            (after - before) * 1024.0 / sockets as f64,
            100.0
        );
        drop(held);
    }

    // 3. A subscriber that never reads.
    if run("3") {
        let broker = start(
            &dir.path().join("3"),
            "publish_rate_per_sec = 1000\npublish_burst = 1000\nrequest_rate_per_sec = 1000\nrequest_burst = 1000\n",
        )
        .await;
        let mut opts = ClientOptions::new(broker.addr, dev_token("sloth", 3600));
        opts.event_capacity = 1;
        let sloth = Client::connect(opts).await.unwrap();
        let targets: Vec<String> = (0..10).map(|i| format!("busy{i}")).collect();
        let refs: Vec<&str> = targets.iter().map(String::as_str).collect();
        sloth.subscribe(&refs).await.unwrap();
        let mut publishers = Vec::new();
        for t in &targets {
            publishers.push(
                Client::connect(ClientOptions::new(broker.addr, dev_token(t, 3600)))
                    .await
                    .unwrap(),
            );
        }
        let state: std::collections::BTreeMap<String, String> =
            (0..8).map(|k| (format!("k{k}"), "x".repeat(250))).collect();
        let started = Instant::now();
        let mut samples = Vec::new();
        let mut disconnected_at = None;
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let mut n = 0u64;
        while started.elapsed() < Duration::from_secs(seconds as u64) {
            tick.tick().await;
            // 10 publishers x 10 ticks/s = 100 changes a second.
            for p in &publishers {
                n += 1;
                let _ = p
                    .set_presence(pb::SetPresence {
                        status: Some(format!("{n}")),
                        state: state.clone(),
                        ..Default::default()
                    })
                    .await;
            }
            if n.is_multiple_of(500) {
                samples.push((started.elapsed().as_secs_f64(), broker.rss_mib()));
            }
            if disconnected_at.is_none() && n.is_multiple_of(100) {
                let probe = publishers[0].get_presence(&["sloth"]).await.unwrap();
                if probe[0].availability == pb::Availability::Offline as i32 {
                    disconnected_at = Some(started.elapsed().as_secs_f64());
                }
            }
        }
        let rss: Vec<String> = samples
            .iter()
            .step_by(2)
            .map(|(t, r)| format!("{t:.0}s:{r:.1}"))
            .collect();
        println!(
            "| never-reading subscriber, 100 changes/s | broker RSS over time (MiB) | {} |",
            rss.join(" ")
        );
        println!(
            "| never-reading subscriber, 100 changes/s | disconnected after | {} |",
            disconnected_at.map_or("not within the run".into(), |t| format!(
                "{t:.1} s (slow-consumer deadline 10 s after the socket blocks)"
            ))
        );
        drop(sloth);
    }
}
