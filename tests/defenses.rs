//! The defenses of SPEC §8 not covered elsewhere, each black-box through real sockets: the
//! handshake concurrency limit, the connection limit and each address's share of it, the accept
//! rate and each address's share of it, the per-user device cap, the request rate limit,
//! requests in flight, and delays then temporary bans after repeated failed logins. (Frame caps,
//! the handshake, first-frame and partial-frame deadlines are in `session.rs`; slow consumers in
//! `fanout.rs`.)

mod common;

use std::time::{Duration, Instant};

use common::*;
use presenced::auth::{mint, Claims};
use presenced::client::{Client, ClientOptions};
use presenced::config::DeviceLimitPolicy;
use presenced::pb::{self, client_frame::Body as C, server_frame::Body as S};
use tokio::net::{TcpSocket, TcpStream};

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

/// A plain TCP connection from `local` (a loopback address) that never starts its handshake.
async fn idle_from(local: &str, addr: std::net::SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{local}:0").parse().unwrap()).unwrap();
    within(socket.connect(addr)).await.unwrap()
}

/// Whether the broker has closed `tcp` (refused it): the FIN or reset has arrived.
fn closed_by_broker(tcp: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    match tcp.try_read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

fn from(broker: &Broker, local: &str, user: &str, device: &str) -> ClientOptions {
    let mut opts = options(broker, user, device);
    opts.local_addr = Some(format!("{local}:0").parse().unwrap());
    opts
}

#[tokio::test]
async fn a_connect_flood_from_one_address_does_not_lock_out_another() {
    let broker = start(|c| {
        // The global bucket (burst 2,000) barely refills here: had the flood spent it, every
        // later connect would be refused. Only the per-address share (defaults: burst 500,
        // 250/s) keeps it from doing so.
        c.limits.accept_rate_per_sec = 1;
    })
    .await;
    let started = Instant::now();
    let mut flood = Vec::with_capacity(2_500);
    for _ in 0..2_500 {
        flood.push(idle_from("127.0.0.2", broker.addr).await);
    }
    let elapsed = started.elapsed();
    // The broker accepts in arrival order, so it has taken up (or refused) every flood socket
    // before this client's.
    let alice = within(Client::connect(from(
        &broker,
        "127.0.0.1",
        "alice",
        "phone",
    )))
    .await
    .expect("a client from another address still gets in");
    assert_eq!(alice.conn_ack.user_id, "alice");
    within(alice.ping()).await.unwrap();
    let held = flood.iter().filter(|tcp| !closed_by_broker(tcp)).count();
    let share = 500 + 250 * (elapsed.as_secs_f64().ceil() as usize + 1);
    assert!(
        (500..=share).contains(&held),
        "the flooding address holds its burst and no more than its rate: {held} held of 2,500 \
         in {elapsed:?}"
    );
}

#[tokio::test]
async fn one_address_holds_at_most_its_share_of_connections() {
    let broker = start(|c| c.limits.max_connections_per_address = 2).await;
    let a = within(Client::connect(from(&broker, "127.0.0.1", "a", "phone")))
        .await
        .unwrap();
    let _b = within(Client::connect(from(&broker, "127.0.0.1", "b", "phone")))
        .await
        .unwrap();
    assert!(
        within(Client::connect(from(&broker, "127.0.0.1", "c", "phone")))
            .await
            .is_err(),
        "a third connection from 127.0.0.1 is over its share"
    );
    let d = within(Client::connect(from(&broker, "127.0.0.2", "d", "phone")))
        .await
        .expect("another address has its own share");
    within(d.ping()).await.unwrap();
    within(a.disconnect()).await.unwrap();
    // The address's slot comes back once a's connection is gone (bounded retries, no sleeps).
    let mut c = None;
    for _ in 0..1000 {
        if let Ok(client) = within(Client::connect(from(&broker, "127.0.0.1", "c", "phone"))).await
        {
            c = Some(client);
            break;
        }
        tokio::task::yield_now().await;
    }
    within(c.expect("c connects after a left").ping())
        .await
        .unwrap();
}

fn device_ids(p: &pb::Presence) -> Vec<&str> {
    p.devices.iter().map(|d| d.device_id.as_str()).collect()
}

#[tokio::test]
async fn a_device_beyond_the_cap_closes_the_oldest_without_a_flicker() {
    let broker = start(|c| c.limits.max_devices_per_user = 3).await;
    let mut bob = connect(&broker, "bob").await;
    within(bob.subscribe(&["alice"])).await.unwrap();
    let mut oldest = connect_device(&broker, "alice", "d1").await;
    within(oldest.join("room", &[])).await.unwrap();
    let d2 = connect_device(&broker, "alice", "d2").await;
    let _d3 = connect_device(&broker, "alice", "d3").await;
    for expected in [
        pb::EventKind::Online,
        pb::EventKind::Update,
        pb::EventKind::Update,
    ] {
        assert_eq!(
            kind(&within(bob.next_presence_event()).await.unwrap()),
            expected
        );
    }

    let newest = connect_device(&broker, "alice", "d4").await;
    let close = within(oldest.closed())
        .await
        .expect("the oldest device is told why");
    assert_eq!(close_code(&close), pb::CloseCode::DeviceLimit);
    assert!(
        close.reason.contains("device limit (3)"),
        "{}",
        close.reason
    );

    // Watchers see one UPDATE that swaps the devices, never an OFFLINE.
    let swapped = within(bob.next_presence_event()).await.unwrap();
    assert_eq!(kind(&swapped), pb::EventKind::Update);
    let presence = swapped.presence.unwrap();
    assert_eq!(device_ids(&presence), ["d2", "d3", "d4"]);
    within(newest.set_presence(pb::SetPresence {
        status: Some("after".into()),
        ..Default::default()
    }))
    .await
    .unwrap();
    // Per-user order: an OFFLINE for the evicted device would arrive before this.
    let next = within(bob.next_presence_event()).await.unwrap();
    assert_eq!(kind(&next), pb::EventKind::Update);
    assert_eq!(next.presence.unwrap().status, "after");
    // The evicted device's channel memberships ended with it.
    assert!(within(newest.where_now("")).await.unwrap().is_empty());
    // Reconnecting a device that is already there is never a new device.
    let again = connect_device(&broker, "alice", "d4").await;
    assert!(again.conn_ack.session_taken_over);
    within(d2.ping()).await.unwrap();
}

#[tokio::test]
async fn a_cap_of_one_device_swaps_a_lost_device_for_the_new_one_without_a_flicker() {
    let broker = start(|c| {
        c.limits.max_devices_per_user = 1;
        c.session.grace_period_ms = 60_000;
    })
    .await;
    let mut bob = connect(&broker, "bob").await;
    within(bob.subscribe(&["alice"])).await.unwrap();
    let laptop = connect_device(&broker, "alice", "laptop").await;
    let online = within(bob.next_presence_event()).await.unwrap();
    assert_eq!(kind(&online), pb::EventKind::Online);
    // Lost (live or already in its grace period, both count): the phone takes its place.
    drop(laptop);
    let phone = connect_device(&broker, "alice", "phone").await;
    let swapped = within(bob.next_presence_event()).await.unwrap();
    assert_eq!(
        kind(&swapped),
        pb::EventKind::Update,
        "alice was online throughout: no OFFLINE, no second ONLINE"
    );
    assert_eq!(device_ids(&swapped.presence.unwrap()), ["phone"]);
    within(phone.set_presence(pb::SetPresence {
        status: Some("on the phone".into()),
        ..Default::default()
    }))
    .await
    .unwrap();
    let next = within(bob.next_presence_event()).await.unwrap();
    assert_eq!(kind(&next), pb::EventKind::Update);
    assert_eq!(next.presence.unwrap().status, "on the phone");
}

#[tokio::test]
async fn a_device_beyond_the_cap_is_refused_when_so_configured() {
    let broker = start(|c| {
        c.limits.max_devices_per_user = 3;
        c.limits.device_limit_policy = DeviceLimitPolicy::Refuse;
        c.session.grace_period_ms = 60_000;
    })
    .await;
    let d1 = connect_device(&broker, "alice", "d1").await;
    let _d2 = connect_device(&broker, "alice", "d2").await;
    let d3 = connect_device(&broker, "alice", "d3").await;
    // A lost device in its grace period still counts (live or lingering, it is one of three).
    drop(d3);
    let e = server_error(within(Client::connect(options(&broker, "alice", "d4"))).await);
    assert_eq!(code(&e), pb::ErrorCode::DeviceLimit);
    assert_eq!(e.operation, "connect");
    assert!(e.reason.contains("device limit (3)"), "{}", e.reason);
    // The existing devices are untouched, and taking over one of them is not a new device.
    within(d1.ping()).await.unwrap();
    let again = connect_device(&broker, "alice", "d1").await;
    assert!(again.conn_ack.session_taken_over);
    let back = connect_device(&broker, "alice", "d3").await;
    within(back.ping()).await.unwrap();
    // Other users are not affected by alice's cap.
    within(connect_device(&broker, "bob", "d4").await.ping())
        .await
        .unwrap();
}
