//! The metrics endpoint under hostile clients, through real sockets: a normal scrape works; a
//! client that never sends its request, or never reads the response, is dropped at its
//! deadline; an oversized request is closed at its cap; connections beyond the cap are closed at
//! once, and scrapes work again once the idle ones are gone. The limits are made small with
//! `serve_with`; the broker itself serves with `ScrapeLimits::default()`.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use presenced::metrics::{serve_with, ScrapeLimits};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const GET: &[u8] = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n";

/// An endpoint on 127.0.0.1:0 serving `body` under `limits`; stopped when the token drops.
struct Endpoint {
    addr: SocketAddr,
    shutdown: CancellationToken,
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn endpoint(body: Arc<String>, limits: ScrapeLimits) -> Endpoint {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(serve_with(
        listener,
        move || body.as_str().to_owned(),
        shutdown.clone(),
        limits,
    ));
    Endpoint { addr, shutdown }
}

fn small_body() -> Arc<String> {
    Arc::new("presence_test_total 1\n".to_string())
}

/// Everything the server sends until it closes; a reset counts as the end.
async fn read_all(tcp: &mut TcpStream) -> Vec<u8> {
    let mut received = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        match within(tcp.read(&mut chunk)).await {
            Ok(0) | Err(_) => return received,
            Ok(n) => received.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Sends `request` on a new connection and returns the whole response.
async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    // The server may have closed already (a refused connection): then the write can fail.
    let _ = tcp.write_all(request).await;
    String::from_utf8_lossy(&read_all(&mut tcp).await).into_owned()
}

#[tokio::test]
async fn a_normal_scrape_returns_the_metrics_and_other_paths_are_404() {
    let broker = start(|c| {
        c.metrics.enabled = true;
        c.metrics.listen = "127.0.0.1:0".parse().unwrap();
    })
    .await;
    let alice = connect(&broker, "alice").await;
    within(alice.ping()).await.unwrap();
    let addr = broker.metrics_addr.expect("metrics enabled");
    let response = exchange(addr, GET).await;
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    assert!(response.contains("presence_frames_in_total"), "{response}");
    let response = exchange(addr, b"GET /admin HTTP/1.1\r\n\r\n").await;
    assert!(response.starts_with("HTTP/1.1 404 "), "{response}");
}

#[tokio::test]
async fn a_client_that_never_sends_its_request_is_dropped_at_the_read_deadline() {
    let limits = ScrapeLimits {
        read_timeout: Duration::from_millis(300),
        ..ScrapeLimits::default()
    };
    let endpoint = endpoint(small_body(), limits).await;
    let started = Instant::now();
    let mut silent = TcpStream::connect(endpoint.addr).await.unwrap();
    silent.write_all(b"GET /metr").await.unwrap();
    assert!(read_all(&mut silent).await.is_empty(), "no reply");
    assert!(started.elapsed() >= Duration::from_millis(300));
    let response = exchange(endpoint.addr, GET).await;
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
}

#[tokio::test]
async fn an_oversized_request_is_closed_at_its_cap_not_at_the_deadline() {
    let limits = ScrapeLimits {
        read_timeout: Duration::from_secs(60),
        max_request_bytes: 1024,
        ..ScrapeLimits::default()
    };
    let endpoint = endpoint(small_body(), limits).await;
    let mut request = b"GET /metrics HTTP/1.1\r\n".to_vec();
    request.extend(std::iter::repeat_n(b'a', 4096));
    // `within` bounds this at 10 s, far below the 60 s read deadline.
    let response = exchange(endpoint.addr, &request).await;
    assert!(!response.contains("200 OK"), "{response}");
}

#[tokio::test]
async fn connections_beyond_the_cap_are_closed_at_once_and_scrapes_resume_after_idle_ones_drop() {
    let limits = ScrapeLimits {
        max_connections: 2,
        read_timeout: Duration::from_millis(500),
        ..ScrapeLimits::default()
    };
    let endpoint = endpoint(small_body(), limits).await;
    let mut idle: Vec<TcpStream> = Vec::new();
    for _ in 0..2 {
        idle.push(TcpStream::connect(endpoint.addr).await.unwrap());
    }
    // Served or queued, it would get a 200 (at the latest when the idle ones are dropped).
    let refused = exchange(endpoint.addr, GET).await;
    assert!(
        refused.is_empty(),
        "a third connection is closed: {refused}"
    );
    for tcp in &mut idle {
        assert!(read_all(tcp).await.is_empty(), "dropped at the deadline");
    }
    let response = exchange(endpoint.addr, GET).await;
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
}

#[tokio::test]
async fn a_client_that_never_reads_is_dropped_at_the_write_deadline() {
    // Larger than any socket buffers on loopback (4 MiB send + the reader's small receive
    // buffer), so the response cannot be written while the client does not read.
    let body = Arc::new("presence_filler_padding 0\n".repeat(400_000));
    let limits = ScrapeLimits {
        max_connections: 1,
        write_timeout: Duration::from_millis(200),
        ..ScrapeLimits::default()
    };
    let endpoint = endpoint(body.clone(), limits).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket.connect(endpoint.addr).await.unwrap();
    stalled.write_all(GET).await.unwrap();
    let started = Instant::now();
    // The stalled client holds the only scrape slot until the server gives up on it; probe
    // (bounded, each probe an exchange with the server) until a scrape is served again.
    let mut served = None;
    within(async {
        for _ in 0..100_000 {
            let response = exchange(endpoint.addr, GET).await;
            if !response.is_empty() {
                served = Some(response);
                break;
            }
        }
    })
    .await;
    let served = served.expect("a scrape is served once the stalled client is dropped");
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert!(served.ends_with(body.as_str()), "the full body");
    let partial = read_all(&mut stalled).await;
    assert!(partial.starts_with(b"HTTP/1.1 200 OK\r\n"));
    assert!(
        partial.len() < body.len(),
        "the stalled client got {} of {} bytes: cut off at the deadline",
        partial.len(),
        body.len()
    );
}
