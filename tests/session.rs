//! Session behaviour through real TLS sockets: Connect/ConnAck, tokens, frame caps, deadlines,
//! keepalive, takeover, clean and lost disconnects with the grace period, shutdown. Every
//! bad-input test also checks that a bystander's session is unaffected.

mod common;

use std::sync::Arc;

use bytes::BytesMut;
use common::*;
use futures_util::StreamExt;
use presenced::auth::{mint, Claims};
use presenced::client::{tls_connect, Client, ClientCodec, ClientError, ClientOptions};
use presenced::codec::{encode_delimited, put_length_prefix};
use presenced::pb::{self, client_frame::Body as C, server_frame::Body as S};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::codec::FramedRead;

/// Writes `bytes` on a fresh TLS connection and collects every server frame until the server
/// closes the connection.
async fn exchange(broker: &Broker, bytes: &[u8]) -> Vec<pb::ServerFrame> {
    let stream = within(tls_connect(
        broker.addr,
        "localhost",
        presenced::tls::dev_client_config(),
    ))
    .await
    .unwrap();
    let (read, mut write) = tokio::io::split(stream);
    write.write_all(bytes).await.unwrap();
    let mut reader = FramedRead::new(read, ClientCodec::new(1 << 20));
    let mut frames = Vec::new();
    while let Some(Ok(frame)) = within(reader.next()).await {
        frames.push(frame);
    }
    frames
}

fn connect_frame(token: String) -> Vec<u8> {
    encode_delimited(&pb::ClientFrame {
        request_id: 1,
        body: Some(C::Connect(pb::Connect {
            token,
            device_id: "phone".into(),
            ..Default::default()
        })),
    })
    .to_vec()
}

fn expect_error_then_close(frames: &[pb::ServerFrame]) -> (pb::Error, pb::Close) {
    match frames {
        [pb::ServerFrame {
            body: Some(S::Error(e)),
            ..
        }, pb::ServerFrame {
            body: Some(S::Close(c)),
            ..
        }] => (e.clone(), c.clone()),
        other => panic!("expected Error then Close, got {other:?}"),
    }
}

fn expect_close_only(frames: &[pb::ServerFrame]) -> pb::Close {
    match frames {
        [pb::ServerFrame {
            body: Some(S::Close(c)),
            ..
        }] => c.clone(),
        other => panic!("expected a lone Close, got {other:?}"),
    }
}

async fn assert_alive(client: &Client) {
    within(client.ping())
        .await
        .expect("bystander session still works");
}

#[tokio::test]
async fn connack_reports_identity_keepalive_limits_and_alpn() {
    let broker = start(|_| {}).await;
    let mut opts = options(&broker, "alice", "tablet");
    opts.keepalive_secs = 1;
    let client = within(Client::connect(opts)).await.unwrap();
    let ack = &client.conn_ack;
    assert_eq!(ack.user_id, "alice");
    assert_eq!(ack.device_id, "tablet");
    assert_eq!(ack.keepalive_seconds, 10, "clamped up to the minimum");
    assert!(!ack.session_taken_over);
    let limits = ack.limits.as_ref().unwrap();
    assert_eq!(limits.max_frame_bytes, 65536);
    assert_eq!(limits.max_ids_per_request, 100);
    assert_eq!(limits.max_subscriptions, 3000);
    let presence = ack.presence.as_ref().unwrap();
    assert_eq!(availability(presence), pb::Availability::Online);
    assert_eq!(presence.devices.len(), 1);
    assert!(ack.server_time_ms.abs_diff(presenced::now_ms()) < 60_000);

    let mut opts = options(&broker, "bob", "p");
    opts.keepalive_secs = 100_000;
    let client = within(Client::connect(opts)).await.unwrap();
    assert_eq!(
        client.conn_ack.keepalive_seconds, 300,
        "clamped down to the maximum"
    );
    let client = connect(&broker, "carol").await;
    assert_eq!(client.conn_ack.keepalive_seconds, 60, "default");

    let stream = within(tls_connect(
        broker.addr,
        "localhost",
        presenced::tls::dev_client_config(),
    ))
    .await
    .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"presence/1"[..]));
}

#[tokio::test]
async fn tls12_clients_are_served() {
    let broker = start(|_| {}).await;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::pem::PemObject::pem_slice_iter(presenced::tls::DEV_CA_PEM) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS12])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"presence/1".to_vec()];
    let mut opts = options(&broker, "alice", "old-android");
    opts.tls = Arc::new(config);
    let client = within(Client::connect(opts)).await.unwrap();
    assert_alive(&client).await;
}

#[tokio::test]
async fn bad_tokens_are_refused_with_a_reason_and_a_close() {
    let broker = start(|_| {}).await;
    let bystander = connect(&broker, "bystander").await;
    let cases = [
        (
            mint(
                b"not-the-configured-secret",
                None,
                &claims("alice", now_secs() + 60),
            ),
            pb::ErrorCode::BadSignature,
        ),
        (
            mint(
                presenced::config::DEV_SECRET.as_bytes(),
                None,
                &claims("alice", now_secs() - 10),
            ),
            pb::ErrorCode::TokenExpired,
        ),
        ("not-a-token".to_string(), pb::ErrorCode::Unauthenticated),
        (
            mint(
                b"whatever",
                Some("unknown-kid"),
                &claims("alice", now_secs() + 60),
            ),
            pb::ErrorCode::BadSignature,
        ),
        (
            mint(
                presenced::config::DEV_SECRET.as_bytes(),
                None,
                &claims("bad\u{7}user", now_secs() + 60),
            ),
            pb::ErrorCode::Unauthenticated,
        ),
    ];
    for (token, expected) in cases {
        let frames = exchange(&broker, &connect_frame(token)).await;
        let (error, close) = expect_error_then_close(&frames);
        assert_eq!(code(&error), expected, "{error:?}");
        assert_eq!(error.operation, "connect");
        assert!(!error.reason.is_empty());
        assert_eq!(frames[0].request_id, 1, "the error echoes the request id");
        assert_eq!(close_code(&close), pb::CloseCode::AuthFailed);
    }
    assert_alive(&bystander).await;
}

#[tokio::test]
async fn a_request_before_connect_is_a_protocol_violation() {
    let broker = start(|_| {}).await;
    let bystander = connect(&broker, "bystander").await;
    let frame = encode_delimited(&pb::ClientFrame {
        request_id: 7,
        body: Some(C::Subscribe(pb::Subscribe {
            user_ids: vec!["bystander".into()],
            expiry_seconds: 0,
            idempotency_key: String::new(),
        })),
    });
    let frames = exchange(&broker, &frame).await;
    let (error, close) = expect_error_then_close(&frames);
    assert_eq!(code(&error), pb::ErrorCode::NotConnected);
    assert_eq!(error.operation, "subscribe");
    assert_eq!(frames[0].request_id, 7);
    assert_eq!(close_code(&close), pb::CloseCode::ProtocolViolation);
    assert_alive(&bystander).await;
}

#[tokio::test]
async fn oversized_prefix_before_auth_closes_without_reading_the_body() {
    let broker = start(|_| {}).await;
    let bystander = connect(&broker, "bystander").await;
    for announced in [4097_u64, 1 << 20, u32::MAX as u64, u64::MAX] {
        let mut bytes = BytesMut::new();
        put_length_prefix(&mut bytes, announced);
        let close = expect_close_only(&exchange(&broker, &bytes).await);
        assert_eq!(
            close_code(&close),
            pb::CloseCode::FrameTooLarge,
            "{announced}"
        );
        assert!(close.reason.contains("4096"), "{}", close.reason);
    }
    assert_alive(&bystander).await;
}

#[tokio::test]
async fn garbage_bytes_close_the_connection_with_a_reason() {
    let broker = start(|_| {}).await;
    let bystander = connect(&broker, "bystander").await;
    for garbage in [
        &b"\x05\xff\xff\xff\xff\xff"[..],
        b"\x03\x0a\x80\x80",
        b"\x80\x00",
        b"\x02\x08\x80",
    ] {
        let close = expect_close_only(&exchange(&broker, garbage).await);
        assert_eq!(
            close_code(&close),
            pb::CloseCode::ProtocolViolation,
            "{garbage:?}"
        );
    }
    assert_alive(&bystander).await;
}

#[tokio::test]
async fn frame_cap_rises_to_64k_after_connect() {
    let broker = start(|_| {}).await;
    let client = connect(&broker, "alice").await;
    // 10 KiB is over the pre-auth cap but within the session cap: it is read and refused on its
    // merits (status too long), and the session goes on.
    let err = server_error(
        within(client.set_presence(pb::SetPresence {
            status: Some("x".repeat(10 * 1024)),
            ..Default::default()
        }))
        .await,
    );
    assert_eq!(code(&err), pb::ErrorCode::LimitExceeded);
    assert_alive(&client).await;
    // 64 KiB + 1 closes the connection.
    let mut client = client;
    let huge = pb::ClientFrame {
        request_id: 9,
        body: Some(C::SetPresence(pb::SetPresence {
            status: Some("x".repeat(64 * 1024)),
            ..Default::default()
        })),
    };
    client.send_raw(huge).await.unwrap();
    let close = within(client.closed()).await.expect("a close frame");
    assert_eq!(close_code(&close), pb::CloseCode::FrameTooLarge);
}

#[tokio::test]
async fn bad_requests_get_errors_and_the_session_goes_on() {
    let broker = start(|_| {}).await;
    let mut client = connect(&broker, "alice").await;
    client
        .send_raw(pb::ClientFrame {
            request_id: 41,
            body: None,
        })
        .await
        .unwrap();
    let frame = within(client.next_event()).await.unwrap();
    assert_eq!(frame.request_id, 41);
    match frame.body {
        Some(S::Error(e)) => {
            assert_eq!(code(&e), pb::ErrorCode::BadRequest);
            assert_eq!(e.operation, "empty");
        }
        other => panic!("expected an error, got {other:?}"),
    }
    let again = server_error(
        within(client.request(C::Connect(pb::Connect {
            token: token("alice"),
            ..Default::default()
        })))
        .await,
    );
    assert_eq!(code(&again), pb::ErrorCode::AlreadyConnected);
    assert_alive(&client).await;
}

#[tokio::test]
async fn no_connect_within_the_deadline_closes_the_connection() {
    let broker = start(|c| c.session.connect_timeout_ms = 200).await;
    let bystander = connect(&broker, "bystander").await;
    let close = expect_close_only(&exchange(&broker, &[]).await);
    assert_eq!(close_code(&close), pb::CloseCode::DeadlineExceeded);
    assert_alive(&bystander).await;
}

#[tokio::test]
async fn a_stalled_tls_handshake_is_dropped_at_its_deadline() {
    let broker = start(|c| c.session.handshake_timeout_ms = 200).await;
    let mut tcp = tokio::net::TcpStream::connect(broker.addr).await.unwrap();
    let mut buf = [0u8; 16];
    // The server closes the socket: read returns 0 (or a reset).
    let n = within(tcp.read(&mut buf)).await.unwrap_or(0);
    assert_eq!(n, 0);
    let bystander = connect(&broker, "bystander").await;
    assert_alive(&bystander).await;
}

#[tokio::test]
async fn a_half_sent_frame_is_dropped_at_the_partial_frame_deadline() {
    let broker = start(|c| c.session.partial_frame_timeout_ms = 200).await;
    let mut token_frame = connect_frame(token("alice"));
    // Connect, then the first 2 bytes of a 10-byte frame.
    token_frame.extend_from_slice(&[10, 0x08]);
    let frames = exchange(&broker, &token_frame).await;
    assert!(matches!(frames[0].body, Some(S::ConnAck(_))));
    let close = expect_close_only(&frames[1..]);
    assert_eq!(close_code(&close), pb::CloseCode::DeadlineExceeded);
}

#[tokio::test]
async fn silence_past_one_and_a_half_keepalives_closes_and_pings_keep_alive() {
    let broker = start(|c| {
        c.session.keepalive_min_secs = 1;
        c.session.grace_period_ms = 0;
    })
    .await;
    let watcher = connect(&broker, "bob").await;
    let mut watcher = watcher;
    within(watcher.subscribe(&["alice"])).await.unwrap();

    let mut opts = options(&broker, "alice", "phone");
    opts.keepalive_secs = 1;
    let mut alice = within(Client::connect(opts)).await.unwrap();
    assert_eq!(alice.conn_ack.keepalive_seconds, 1);
    assert_eq!(
        kind(&within(watcher.next_presence_event()).await.unwrap()),
        pb::EventKind::Online
    );
    // Pings every 0.5 s for 2 s (longer than 1.5 x keepalive) keep the session.
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    for _ in 0..4 {
        tick.tick().await;
        within(alice.ping()).await.unwrap();
    }
    // Then silence.
    let close = within(alice.closed()).await.expect("close frame");
    assert_eq!(close_code(&close), pb::CloseCode::KeepaliveTimeout);
    let offline = within(watcher.next_presence_event()).await.unwrap();
    assert_eq!(kind(&offline), pb::EventKind::Offline);
    assert_eq!(reason(&offline), pb::OfflineReason::Timeout);
}

#[tokio::test]
async fn takeover_closes_the_old_connection_without_a_flicker() {
    let broker = start(|_| {}).await;
    let mut bob = connect(&broker, "bob").await;
    within(bob.subscribe(&["alice"])).await.unwrap();
    let mut first = connect(&broker, "alice").await;
    assert_eq!(
        kind(&within(bob.next_presence_event()).await.unwrap()),
        pb::EventKind::Online
    );

    let second = connect(&broker, "alice").await;
    assert!(second.conn_ack.session_taken_over);
    let close = within(first.closed())
        .await
        .expect("old connection is told");
    assert_eq!(close_code(&close), pb::CloseCode::TakenOver);

    within(second.set_presence(pb::SetPresence {
        status: Some("still here".into()),
        ..Default::default()
    }))
    .await
    .unwrap();
    // Per-user order: had an OFFLINE or ONLINE been sent for the takeover it would come first.
    let next = within(bob.next_presence_event()).await.unwrap();
    assert_eq!(kind(&next), pb::EventKind::Update);
    assert_eq!(next.presence.unwrap().status, "still here");
}

#[tokio::test]
async fn disconnect_is_offline_at_once_with_its_reason_and_last_seen() {
    let broker = start(|c| c.session.grace_period_ms = 60_000).await;
    let mut bob = connect(&broker, "bob").await;
    within(bob.subscribe(&["alice"])).await.unwrap();
    let alice = connect(&broker, "alice").await;
    within(bob.next_presence_event()).await.unwrap();
    let close = within(alice.disconnect())
        .await
        .unwrap()
        .expect("close frame");
    assert_eq!(close_code(&close), pb::CloseCode::Normal);
    let offline = within(bob.next_presence_event()).await.unwrap();
    assert_eq!(kind(&offline), pb::EventKind::Offline);
    assert_eq!(reason(&offline), pb::OfflineReason::Disconnect);
    let presence = offline.presence.unwrap();
    assert_eq!(availability(&presence), pb::Availability::Offline);
    assert!(presence.devices.is_empty());
    assert!(presence.last_seen_ms.abs_diff(presenced::now_ms()) < 60_000);
    let queried = within(bob.get_presence(&["alice"])).await.unwrap();
    assert_eq!(queried[0].last_seen_ms, presence.last_seen_ms);
}

#[tokio::test]
async fn a_lost_connection_goes_offline_after_the_grace_period() {
    let broker = start(|c| c.session.grace_period_ms = 200).await;
    let mut bob = connect(&broker, "bob").await;
    within(bob.subscribe(&["alice"])).await.unwrap();
    let alice = connect(&broker, "alice").await;
    within(bob.next_presence_event()).await.unwrap();
    let lost_at = std::time::Instant::now();
    drop(alice);
    let offline = within(bob.next_presence_event()).await.unwrap();
    assert!(lost_at.elapsed() >= std::time::Duration::from_millis(200));
    assert_eq!(kind(&offline), pb::EventKind::Offline);
    assert_eq!(reason(&offline), pb::OfflineReason::ConnectionLost);
}

#[tokio::test]
async fn reconnecting_within_the_grace_period_sends_nothing() {
    let broker = start(|c| c.session.grace_period_ms = 60_000).await;
    let mut bob = connect(&broker, "bob").await;
    within(bob.subscribe(&["alice"])).await.unwrap();
    let alice = connect(&broker, "alice").await;
    within(bob.next_presence_event()).await.unwrap();
    drop(alice);
    // While lingering, alice still shows online with her device.
    let during = within(bob.get_presence(&["alice"])).await.unwrap();
    assert_eq!(availability(&during[0]), pb::Availability::Online);
    let back = connect(&broker, "alice").await;
    assert!(!back.conn_ack.session_taken_over);
    within(back.set_presence(pb::SetPresence {
        status: Some("back".into()),
        ..Default::default()
    }))
    .await
    .unwrap();
    let next = within(bob.next_presence_event()).await.unwrap();
    assert_eq!(
        kind(&next),
        pb::EventKind::Update,
        "no OFFLINE/ONLINE flap before it"
    );
    assert_eq!(next.presence.unwrap().status, "back");
}

#[tokio::test]
async fn token_device_id_overrides_the_connect_field() {
    let broker = start(|_| {}).await;
    let token = mint(
        presenced::config::DEV_SECRET.as_bytes(),
        None,
        &Claims {
            sub: "alice".into(),
            exp: now_secs() + 60,
            did: Some("from-token".into()),
            iat: None,
        },
    );
    let client = within(Client::connect(
        ClientOptions::new(broker.addr, token).device("from-connect"),
    ))
    .await
    .unwrap();
    assert_eq!(client.conn_ack.device_id, "from-token");
}

#[tokio::test]
async fn shutdown_tells_clients_to_reconnect() {
    let broker = start(|c| c.session.shutdown_reconnect_hint_ms = 1234).await;
    let mut alice = connect(&broker, "alice").await;
    broker.stop().await;
    let close = within(alice.closed()).await.expect("close frame");
    assert_eq!(close_code(&close), pb::CloseCode::ServerShutdown);
    assert_eq!(close.reconnect_after_ms, 1234);
    assert!(matches!(
        within(alice.ping()).await,
        Err(ClientError::Closed(_) | ClientError::Io(_) | ClientError::Codec(_))
    ));
}
