//! The TLS layer under hostile records: a client that completes a real handshake and then sends
//! hand-made records with its own keys (`tls_stream::forge`), through a real socket to the
//! in-process broker. Each test is a finding of the round-2 review of the network-facing code:
//! a half-sent handshake message, a handshake message fragmented over padded records, data
//! followed by a fatal alert in one segment, writes after an alert, and a failed handshake's
//! alert.

mod common;

use std::time::Duration;

use common::*;
use presenced::pb;
use presenced::pb::client_frame::Body as ClientBody;
use presenced::pb::server_frame::Body as ServerBody;
use presenced::tls_stream::forge::{content_type, ForgedClient, Received};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// TLS alert descriptions used below.
const ALERT_FATAL: u8 = 2;
const UNEXPECTED_MESSAGE: u8 = 10;
const NO_APPLICATION_PROTOCOL: u8 = 120;

/// A forged-record client on a socket.
struct Hostile {
    tcp: TcpStream,
    client: ForgedClient,
    /// Application bytes not yet decoded into frames.
    stream: Vec<u8>,
    alerts: Vec<(u8, u8)>,
}

impl Hostile {
    async fn handshake(broker: &Broker) -> Hostile {
        Hostile::handshake_as(broker, ForgedClient::new(&[b"presence/1"])).await
    }

    async fn handshake_as(broker: &Broker, client: ForgedClient) -> Hostile {
        let tcp = TcpStream::connect(broker.addr).await.unwrap();
        let mut h = Hostile {
            tcp,
            client,
            stream: Vec::new(),
            alerts: Vec::new(),
        };
        within(async {
            loop {
                let out = h.client.handshake_bytes();
                h.tcp.write_all(&out).await.unwrap();
                if h.client.is_open() {
                    break;
                }
                let mut buf = vec![0u8; 16 * 1024];
                let n = h.tcp.read(&mut buf).await.unwrap();
                assert!(n > 0, "server closed during the handshake");
                h.client.receive_handshake(&buf[..n]).unwrap();
            }
        })
        .await;
        h
    }

    async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.tcp.write_all(bytes).await
    }

    fn frame_bytes(&mut self, request_id: u64, body: ClientBody) -> Vec<u8> {
        let frame = pb::ClientFrame {
            request_id,
            body: Some(body),
        };
        self.client
            .app_data(&frame.encode_length_delimited_to_vec())
    }

    async fn connect(broker: &Broker, user: &str) -> Hostile {
        Hostile::connect_as(broker, user, ForgedClient::new(&[b"presence/1"])).await
    }

    async fn connect_as(broker: &Broker, user: &str, client: ForgedClient) -> Hostile {
        let mut h = Hostile::handshake_as(broker, client).await;
        let connect = h.frame_bytes(
            1,
            ClientBody::Connect(pb::Connect {
                token: token(user),
                device_id: "phone".into(),
                keepalive_seconds: 60,
                ..Default::default()
            }),
        );
        h.send(&connect).await.unwrap();
        match h.next_frame().await.and_then(|f| f.body) {
            Some(ServerBody::ConnAck(_)) => h,
            other => panic!("expected ConnAck, got {other:?}"),
        }
    }

    /// The next frame, or None at the end of the stream. Bounded by `within`.
    async fn next_frame(&mut self) -> Option<pb::ServerFrame> {
        within(async {
            loop {
                if let Some(frame) = self.decode() {
                    return Some(frame);
                }
                let mut buf = vec![0u8; 32 * 1024];
                let n = self.tcp.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    return None;
                }
                for received in self.client.read(&buf[..n]) {
                    match received {
                        Received::AppData(data) => self.stream.extend_from_slice(&data),
                        Received::Alert(level, description) => {
                            self.alerts.push((level, description))
                        }
                        Received::Handshake(_) => {}
                    }
                }
            }
        })
        .await
    }

    fn decode(&mut self) -> Option<pb::ServerFrame> {
        let mut slice = &self.stream[..];
        let before = slice.len();
        let frame = pb::ServerFrame::decode_length_delimited(&mut slice).ok()?;
        let used = before - slice.len();
        self.stream.drain(..used);
        Some(frame)
    }

    /// Every frame until the server closes the connection.
    async fn rest(&mut self) -> Vec<pb::ServerFrame> {
        let mut frames = Vec::new();
        while let Some(frame) = self.next_frame().await {
            frames.push(frame);
        }
        frames
    }
}

fn close_of(frames: &[pb::ServerFrame]) -> Option<pb::Close> {
    frames.iter().find_map(|f| match &f.body {
        Some(ServerBody::Close(c)) => Some(c.clone()),
        _ => None,
    })
}

#[tokio::test]
async fn a_withheld_key_update_body_before_connect_still_gets_a_clean_close() {
    let broker = start(|c| c.session.connect_timeout_ms = 300).await;
    let mut h = Hostile::handshake(&broker).await;
    // A KeyUpdate header with its one-byte body withheld; the server's next write (the Close
    // at the Connect deadline) used to panic the connection task.
    let partial = h.client.record(content_type::HANDSHAKE, &[24, 0, 0, 1], 0);
    h.send(&partial).await.unwrap();
    let frames = h.rest().await;
    let close = close_of(&frames).expect("a Close frame at the Connect deadline");
    assert_eq!(close_code(&close), pb::CloseCode::DeadlineExceeded);
    broker.stop().await;
}

/// A session with a half-sent handshake message held by the server: a write to it (a watched
/// user's change) must still work, and when its link drops it goes offline, no ghost.
async fn half_sent_handshake_message_then_a_write(client: ForgedClient, partial: &[u8]) {
    let broker = start(|c| c.session.grace_period_ms = 200).await;
    let mut watcher = connect(&broker, "watcher").await;
    watcher.subscribe(&["victim"]).await.unwrap();
    let mut h = Hostile::connect_as(&broker, "victim", client).await;
    let subscribe = h.frame_bytes(
        2,
        ClientBody::Subscribe(pb::Subscribe {
            user_ids: vec!["watcher".into()],
            ..Default::default()
        }),
    );
    h.send(&subscribe).await.unwrap();
    h.next_frame().await.expect("subscribe reply");
    // Drain the watcher's ONLINE for the victim.
    loop {
        let e = within(watcher.next_presence_event()).await.unwrap();
        if e.user_id == "victim" {
            break;
        }
    }
    let partial = h.client.record(content_type::HANDSHAKE, partial, 0);
    h.send(&partial).await.unwrap();
    // A server write to the victim: the watcher's change fans out to it.
    watcher
        .set_presence(pb::SetPresence {
            status: Some("hello".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let event = h.next_frame().await.expect("the event is still delivered");
    assert!(
        matches!(event.body, Some(ServerBody::PresenceEvent(_))),
        "{event:?}"
    );
    // The victim's link drops: after the grace period it is offline, not a ghost.
    drop(h);
    assert_eq!(
        offline_reason(&mut watcher, "victim").await,
        pb::OfflineReason::ConnectionLost
    );
    broker.stop().await;
}

#[tokio::test]
async fn a_withheld_key_update_body_after_connect_neither_panics_nor_leaves_a_ghost() {
    // A KeyUpdate header announcing one byte of body, which never comes.
    half_sent_handshake_message_then_a_write(ForgedClient::new(&[b"presence/1"]), &[24, 0, 0, 1])
        .await;
}

#[tokio::test]
async fn a_tls12_renegotiation_client_hello_cut_short_neither_panics_nor_leaves_a_ghost() {
    // The first 20 bytes of a 200-byte ClientHello on a TLS 1.2 session.
    let mut hello = vec![1, 0, 0, 200, 3, 3];
    hello.resize(20, 7);
    half_sent_handshake_message_then_a_write(ForgedClient::new_tls12(&[b"presence/1"]), &hello)
        .await;
}

#[tokio::test]
async fn a_tls12_renegotiation_client_hello_split_over_records_is_refused_cleanly() {
    let broker = start(|_| {}).await;
    let mut h = Hostile::connect_as(
        &broker,
        "renegotiator",
        ForgedClient::new_tls12(&[b"presence/1"]),
    )
    .await;
    let mut hello = vec![3, 3];
    hello.resize(60, 9);
    let records = h.client.handshake_message(1, &hello, 16, 0);
    h.send(&records).await.unwrap();
    // Either rustls declines the renegotiation (a warning) and the session goes on, or it closes
    // the connection with an alert; never a panic, and a bystander is unaffected.
    let ping = h.frame_bytes(9, ClientBody::Ping(pb::Ping::default()));
    let _ = h.send(&ping).await;
    let mut pong = false;
    while let Some(frame) = h.next_frame().await {
        if frame.request_id == 9 {
            pong = true;
            break;
        }
    }
    assert!(
        pong || !h.alerts.is_empty(),
        "neither a pong nor an alert before the close"
    );
    let bystander = connect(&broker, "bystander").await;
    bystander.ping().await.unwrap();
    broker.stop().await;
}

#[tokio::test]
async fn a_handshake_message_fragmented_over_padded_records_closes_the_connection() {
    let broker = start(|_| {}).await;
    let mut h = Hostile::connect(&broker, "mallory").await;
    // A KeyUpdate announced as 65,535 bytes, one byte per record, each padded to the maximum:
    // about 1 GB if the server kept every record. It must stop at about one record.
    let body = vec![0u8; 65_535];
    let records = h.client.handshake_message(24, &body, 1, 16_000);
    let mut refused = false;
    for chunk in records.chunks(16_406 * 8).take(64) {
        if h.send(chunk).await.is_err() {
            refused = true;
            break;
        }
    }
    let _ = h.rest().await;
    assert!(
        refused || h.alerts.iter().any(|&(level, _)| level == ALERT_FATAL),
        "the server neither refused the records nor sent a fatal alert: {:?}",
        h.alerts
    );
    // A bystander is unaffected.
    let bystander = connect(&broker, "bystander").await;
    bystander.ping().await.unwrap();
    broker.stop().await;
}

#[tokio::test]
async fn disconnect_followed_by_a_fatal_alert_in_one_segment_is_a_clean_disconnect() {
    // A long grace period: a session treated as lost would not go offline within the test.
    let broker = start(|c| c.session.grace_period_ms = 120_000).await;
    let mut watcher = connect(&broker, "watcher").await;
    watcher.subscribe(&["leaver"]).await.unwrap();
    let mut h = Hostile::connect(&broker, "leaver").await;
    loop {
        let e = within(watcher.next_presence_event()).await.unwrap();
        if e.user_id == "leaver" {
            break;
        }
    }
    let mut segment = h.frame_bytes(2, ClientBody::Disconnect(pb::Disconnect::default()));
    segment.extend(h.client.alert(ALERT_FATAL, UNEXPECTED_MESSAGE));
    h.send(&segment).await.unwrap();
    assert_eq!(
        offline_reason(&mut watcher, "leaver").await,
        pb::OfflineReason::Disconnect
    );
    broker.stop().await;
}

#[tokio::test]
async fn nothing_is_written_after_the_peer_s_fatal_alert() {
    let broker = start(|_| {}).await;
    let mut h = Hostile::connect(&broker, "pinger").await;
    // A Ping and a fatal alert in one segment: the Ping is read, but its Pong must not be
    // written on a connection the peer has declared dead.
    let mut segment = h.frame_bytes(2, ClientBody::Ping(pb::Ping::default()));
    segment.extend(h.client.alert(ALERT_FATAL, UNEXPECTED_MESSAGE));
    h.send(&segment).await.unwrap();
    let frames = h.rest().await;
    assert!(
        frames.is_empty(),
        "frames written after a fatal alert: {frames:?}"
    );
    // Not even a close_notify: after a fatal alert the connection is dead both ways.
    assert!(
        h.alerts.is_empty(),
        "alerts written after the peer's fatal alert: {:?}",
        h.alerts
    );
    broker.stop().await;
}

#[tokio::test]
async fn a_failed_handshake_sends_its_alert() {
    let broker = start(|_| {}).await;
    let mut tcp = TcpStream::connect(broker.addr).await.unwrap();
    let mut client = ForgedClient::new(&[b"h2"]);
    let failure = within(async {
        for _ in 0..8 {
            tcp.write_all(&client.handshake_bytes()).await.unwrap();
            let mut buf = vec![0u8; 16 * 1024];
            let n = tcp.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                return None;
            }
            if let Err(e) = client.receive_handshake(&buf[..n]) {
                return Some(e);
            }
        }
        None
    })
    .await;
    let failure = failure.expect("the server answered with an alert, not a bare close");
    assert!(
        format!("{failure:?}").contains("NoApplicationProtocol"),
        "expected no_application_protocol ({NO_APPLICATION_PROTOCOL}), got {failure:?}"
    );
    broker.stop().await;
}

#[tokio::test]
async fn key_updates_with_and_without_request_keep_the_session_working() {
    let broker = start(|_| {}).await;
    let mut h = Hostile::connect(&broker, "rotator").await;
    for (i, request) in [true, false, true].into_iter().enumerate() {
        let mut segment = h.client.key_update(request);
        segment.extend(h.frame_bytes(10 + i as u64, ClientBody::Ping(pb::Ping::default())));
        h.send(&segment).await.unwrap();
        let pong = h.next_frame().await.expect("pong after a key update");
        assert_eq!(pong.request_id, 10 + i as u64);
    }
    let _ = Duration::ZERO;
    broker.stop().await;
}
