//! The defenses of SPEC §8 not covered elsewhere, each black-box through real sockets: the
//! handshake concurrency limit, the connection limit, the accept rate, the request rate limit,
//! requests in flight, and delays then temporary bans after repeated failed logins. (Frame caps,
//! the handshake, first-frame and partial-frame deadlines are in `session.rs`; slow consumers in
//! `fanout.rs`.)

mod common;

use std::time::{Duration, Instant};

use common::*;
use presenced::auth::{mint, Claims};
use presenced::client::{Client, ClientOptions};
use presenced::pb::{self, client_frame::Body as C, server_frame::Body as S};
use tokio::net::TcpStream;

fn bad_token() -> String {
    mint(
        b"not-the-server-secret-at-all",
        None,
        &Claims {
            sub: "mallory".into(),
            exp: now_secs() + 60,
            did: None,
            iat: None,
        },
    )
}

/// Sends a complete ClientHello from `addr`'s loopback peer and goes silent.
async fn hello_only(addr: std::net::SocketAddr) -> TcpStream {
    use tokio::io::AsyncWriteExt;
    let name = presenced::tls::server_name("localhost").unwrap();
    let mut tls = rustls::ClientConnection::new(presenced::tls::dev_client_config(), name).unwrap();
    let mut hello = Vec::new();
    tls.write_tls(&mut hello).unwrap();
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(&hello).await.unwrap();
    tcp
}

/// Whether the server answers `tcp`'s ClientHello, which it does only once it holds a
/// handshake slot for it.
async fn answered(tcp: &mut TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut first = [0u8; 1];
    matches!(within(tcp.read(&mut first)).await, Ok(1))
}

/// Sends a complete ClientHello and goes silent. Returns the socket and whether the server
/// answered.
async fn send_hello(addr: std::net::SocketAddr) -> (TcpStream, bool) {
    let mut tcp = hello_only(addr).await;
    let answered = answered(&mut tcp).await;
    (tcp, answered)
}

/// A socket that sent a complete ClientHello and then went silent: it holds a handshake slot.
async fn hello_then_silence(addr: std::net::SocketAddr) -> TcpStream {
    let (tcp, answered) = send_hello(addr).await;
    assert!(answered, "the server took up the handshake");
    tcp
}

#[tokio::test]
async fn one_address_cannot_take_every_handshake_slot() {
    let broker = start(|c| {
        c.limits.max_handshakes_in_flight = 3;
        c.limits.max_handshakes_per_address = 2;
        c.session.handshake_timeout_ms = 8_000;
    })
    .await;
    let first = hello_then_silence(broker.addr).await;
    let _second = hello_then_silence(broker.addr).await;
    let mut third = hello_only(broker.addr).await;
    let early = tokio::time::timeout(Duration::from_millis(500), answered(&mut third)).await;
    assert!(
        early.is_err(),
        "a third handshake from the same address waits for one of that address's slots"
    );
    let mut opts = options(&broker, "alice", "phone");
    opts.local_addr = Some("127.0.0.2:0".parse().unwrap());
    let alice = within(Client::connect(opts))
        .await
        .expect("another address still gets a slot");
    within(alice.ping()).await.unwrap();
    drop(first);
    assert!(
        answered(&mut third).await,
        "the waiting handshake runs once its address has a free slot"
    );
}

#[tokio::test]
async fn handshakes_beyond_the_limit_wait_for_a_free_slot() {
    let broker = start(|c| {
        c.limits.max_handshakes_in_flight = 1;
        c.session.handshake_timeout_ms = 8_000;
    })
    .await;
    // Silent sockets hold no slot: clients get through while they sit there.
    let _silent: Vec<TcpStream> = {
        let mut v = Vec::new();
        for _ in 0..20 {
            v.push(TcpStream::connect(broker.addr).await.unwrap());
        }
        v
    };
    within(connect(&broker, "early").await.ping())
        .await
        .unwrap();
    // A ClientHello followed by silence holds the only slot.
    let staller = hello_then_silence(broker.addr).await;
    let pending = tokio::spawn(Client::connect(options(&broker, "alice", "phone")));
    let early = tokio::time::timeout(Duration::from_millis(500), async {
        while !pending.is_finished() {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(
        early.is_err(),
        "a second handshake must not run while the slot is taken"
    );
    drop(staller);
    let alice = within(pending)
        .await
        .unwrap()
        .expect("connects once the slot is free");
    within(alice.ping()).await.unwrap();
}

#[tokio::test]
async fn the_connection_limit_refuses_extra_connections() {
    let broker = start(|c| c.limits.max_connections = 2).await;
    let a = connect(&broker, "a").await;
    let _b = connect(&broker, "b").await;
    assert!(within(Client::connect(options(&broker, "c", "phone")))
        .await
        .is_err());
    within(a.disconnect()).await.unwrap();
    // The slot comes back once a's connection is gone (bounded retries, no sleeps).
    let mut c = None;
    for _ in 0..1000 {
        if let Ok(client) = within(Client::connect(options(&broker, "c", "phone"))).await {
            c = Some(client);
            break;
        }
        tokio::task::yield_now().await;
    }
    within(c.expect("c connects after a left").ping())
        .await
        .unwrap();
}

#[tokio::test]
async fn the_accept_rate_limit_drops_bursts() {
    let broker = start(|c| {
        c.limits.accept_rate_per_sec = 1;
        c.limits.accept_burst = 2;
    })
    .await;
    let first = connect(&broker, "a").await;
    let _second = connect(&broker, "b").await;
    assert!(
        within(Client::connect(options(&broker, "c", "phone")))
            .await
            .is_err(),
        "the third connection in the same instant is over the burst"
    );
    within(first.ping()).await.unwrap();
}

#[tokio::test]
async fn requests_beyond_the_rate_limit_are_refused_not_dropped() {
    let broker = start(|c| {
        c.limits.request_rate_per_sec = 5;
        c.limits.request_burst = 5;
    })
    .await;
    let alice = connect(&broker, "alice").await;
    for _ in 0..5 {
        within(alice.ping()).await.unwrap();
    }
    let e = server_error(within(alice.ping()).await);
    assert_eq!(code(&e), pb::ErrorCode::RateLimited);
    assert_eq!(e.operation, "ping");
    assert!(e.retry_after_ms > 0);
}

#[tokio::test]
async fn pipelined_requests_are_all_answered_in_order() {
    let broker = start(|c| c.limits.max_requests_in_flight = 4).await;
    let mut alice = connect(&broker, "alice").await;
    for id in 1..=200u64 {
        alice
            .send_raw(pb::ClientFrame {
                request_id: 1000 + id,
                body: Some(C::Ping(pb::Ping {})),
            })
            .await
            .unwrap();
    }
    for id in 1..=200u64 {
        let frame = within(alice.next_event()).await.unwrap();
        assert_eq!(frame.request_id, 1000 + id);
        assert!(matches!(frame.body, Some(S::Pong(_))));
    }
}

#[tokio::test]
async fn repeated_failed_logins_are_slowed_then_banned_per_address() {
    let broker = start(|c| {
        c.limits.auth_failures_before_ban = 3;
        c.limits.auth_failure_delay_ms = 100;
        c.limits.auth_ban_secs = 300;
    })
    .await;
    let mut durations = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        let e = server_error(
            within(Client::connect(ClientOptions::new(
                broker.addr,
                bad_token(),
            )))
            .await,
        );
        durations.push(started.elapsed());
        assert_eq!(code(&e), pb::ErrorCode::BadSignature);
    }
    assert!(
        durations[1] >= Duration::from_millis(200),
        "second refusal waits 2 x 100 ms: {durations:?}"
    );
    // Banned now: even a valid token from this address is refused, with a retry hint.
    let e = server_error(within(Client::connect(options(&broker, "alice", "phone"))).await);
    assert_eq!(code(&e), pb::ErrorCode::Banned);
    assert!(
        e.retry_after_ms > 200_000 && e.retry_after_ms <= 300_000,
        "{}",
        e.retry_after_ms
    );
    // Another address is unaffected.
    let mut opts = options(&broker, "bob", "phone");
    opts.local_addr = Some("127.0.0.2:0".parse().unwrap());
    let bob = within(Client::connect(opts))
        .await
        .expect("127.0.0.2 is not banned");
    within(bob.ping()).await.unwrap();
}
