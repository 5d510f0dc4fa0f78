//! The WebSocket listener (SPEC §11) through real sockets: the same sessions as TCP across
//! transports, and every rule where the transport differs: the upgrade (path, subprotocol,
//! Origin allow-list, request cap, deadline), text messages, message and fragment caps before
//! and after Connect, the partial-frame and keepalive deadlines, WebSocket pings, close codes
//! and reasons, a client's Close frame (grace period), and accept limits shared with TCP.
//! Hand-made frames go over the plain ws listener; the wss listener is driven by the client.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use presenced::client::{Client, Transport};
use presenced::pb::{self, client_frame::Body as C, server_frame::Body as S};
use prost::Message as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

async fn ws_broker(tweak: impl FnOnce(&mut presenced::Config)) -> Broker {
    start(|c| {
        c.websocket.listen = Some("127.0.0.1:0".parse().unwrap());
        c.websocket.plain_listen = Some("127.0.0.1:0".parse().unwrap());
        tweak(c);
    })
    .await
}

async fn ws_client(broker: &Broker, user: &str, device: &str) -> Client {
    let options = presenced::client::ClientOptions::new(broker.ws_addr.unwrap(), token(user))
        .device(device)
        .websocket(Transport::Wss);
    within(Client::connect(options))
        .await
        .unwrap_or_else(|e| panic!("{user}/{device} connects over wss: {e}"))
}

type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

/// A tungstenite client on the plain ws listener, asking for `subprotocol` when given.
async fn raw_client(addr: SocketAddr, subprotocol: Option<&str>) -> Ws {
    let mut request = format!("ws://127.0.0.1:{}/v1/ws", addr.port())
        .into_client_request()
        .unwrap();
    if let Some(p) = subprotocol {
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", HeaderValue::from_str(p).unwrap());
    }
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (ws, response) = within(tokio_tungstenite::client_async(request, tcp))
        .await
        .expect("upgraded");
    if subprotocol == Some("presence.v1") {
        assert_eq!(
            response.headers().get("Sec-WebSocket-Protocol").unwrap(),
            "presence.v1"
        );
    }
    ws
}

fn binary(request_id: u64, body: C) -> Message {
    Message::Binary(
        pb::ClientFrame {
            request_id,
            body: Some(body),
        }
        .encode_to_vec()
        .into(),
    )
}

fn connect_frame(user: &str, keepalive: u32) -> Message {
    binary(
        1,
        C::Connect(pb::Connect {
            token: token(user),
            device_id: "web".into(),
            keepalive_seconds: keepalive,
            ..Default::default()
        }),
    )
}

/// Reads until the server's WebSocket Close frame; returns the protobuf frames seen before it
/// and the Close frame's code and reason (`None` when the socket ended without one).
async fn until_close(ws: &mut Ws) -> (Vec<pb::ServerFrame>, Option<(u16, String)>) {
    let mut frames = Vec::new();
    loop {
        match within(ws.next()).await {
            Some(Ok(Message::Binary(b))) => frames.push(pb::ServerFrame::decode(b).unwrap()),
            Some(Ok(Message::Close(c))) => {
                return (frames, c.map(|c| (u16::from(c.code), c.reason.to_string())))
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return (frames, None),
        }
    }
}

fn last_close(frames: &[pb::ServerFrame]) -> pb::Close {
    match frames.last().and_then(|f| f.body.clone()) {
        Some(S::Close(c)) => c,
        other => panic!("the last frame is a Close: {other:?} in {frames:?}"),
    }
}

async fn conn_ack(ws: &mut Ws) -> pb::ConnAck {
    match within(ws.next()).await {
        Some(Ok(Message::Binary(b))) => match pb::ServerFrame::decode(b).unwrap().body {
            Some(S::ConnAck(a)) => a,
            other => panic!("ConnAck expected: {other:?}"),
        },
        other => panic!("ConnAck expected: {other:?}"),
    }
}

/// Sends a hand-made upgrade request on a raw socket; returns the socket and the response
/// head (up to the blank line).
async fn raw_upgrade(addr: SocketAddr, extra_headers: &str, path: &str) -> (TcpStream, String) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra_headers}\r\n"
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = within(tcp.read(&mut byte)).await.unwrap();
        assert_eq!(
            n,
            1,
            "response head cut short: {}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    (tcp, String::from_utf8(head).unwrap())
}

/// A masked client frame.
fn masked(first_byte: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![first_byte];
    let mask = [9u8, 8, 7, 6];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n < 65536 => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

async fn read_to_end(tcp: &mut TcpStream) -> Vec<u8> {
    let mut rest = Vec::new();
    let _ = within(tcp.read_to_end(&mut rest)).await;
    rest
}

#[tokio::test]
async fn browsers_and_phones_see_each_other_across_transports() {
    let broker = ws_broker(|_| {}).await;
    let mut web = ws_client(&broker, "alice", "browser").await;
    assert!(web.conn_ack.keepalive_seconds > 0);
    let phone = connect(&broker, "bob").await;
    // The browser watches the phone user, and the other way round.
    let watched = web.subscribe(&["bob"]).await.unwrap();
    assert_eq!(watched.presences.len(), 1);
    let mut phone = phone;
    phone.subscribe(&["alice"]).await.unwrap();
    phone
        .set_presence(pb::SetPresence {
            availability: pb::Availability::Away as i32,
            status: Some("on the bus".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let e = presence_event_of(&mut web, "bob", pb::EventKind::Update).await;
    assert_eq!(e.presence.unwrap().status, "on the bus");
    web.set_presence(pb::SetPresence {
        availability: pb::Availability::Dnd as i32,
        ..Default::default()
    })
    .await
    .unwrap();
    let e = presence_event_of(&mut phone, "alice", pb::EventKind::Update).await;
    assert_eq!(availability(&e.presence.unwrap()), pb::Availability::Dnd);
    // Channels over WebSocket too.
    web.join("lobby", &[]).await.unwrap();
    let members = phone
        .who_now("lobby", pb::WhoNowMode::Ids, "", 100)
        .await
        .unwrap();
    assert!(
        members.members.iter().any(|m| m.user_id == "alice"),
        "{members:?}"
    );
    // A goodbye over WebSocket is offline at once, with the reason.
    let close = web.disconnect().await.unwrap().expect("a Close frame");
    assert_eq!(close_code(&close), pb::CloseCode::Normal);
    assert_eq!(
        offline_reason(&mut phone, "alice").await,
        pb::OfflineReason::Disconnect
    );
}

#[tokio::test]
async fn the_plain_listener_serves_the_same_protocol_and_close_codes_follow_the_session() {
    let broker = ws_broker(|_| {}).await;
    let mut ws = raw_client(broker.ws_plain_addr.unwrap(), Some("presence.v1")).await;
    ws.send(connect_frame("carol", 30)).await.unwrap();
    let ack = conn_ack(&mut ws).await;
    assert_eq!(ack.user_id, "carol");
    // One frame per message: a ping request, answered in one binary message.
    ws.send(binary(7, C::Ping(pb::Ping::default())))
        .await
        .unwrap();
    match within(ws.next()).await {
        Some(Ok(Message::Binary(b))) => {
            let frame = pb::ServerFrame::decode(b).unwrap();
            assert_eq!(frame.request_id, 7);
            assert!(matches!(frame.body, Some(S::Pong(_))), "{frame:?}");
        }
        other => panic!("{other:?}"),
    }
    ws.send(binary(8, C::Disconnect(pb::Disconnect::default())))
        .await
        .unwrap();
    let (frames, close) = until_close(&mut ws).await;
    assert_eq!(close_code(&last_close(&frames)), pb::CloseCode::Normal);
    assert_eq!(close.unwrap().0, 1000);
}

#[tokio::test]
async fn a_text_message_closes_with_a_reason() {
    let broker = ws_broker(|_| {}).await;
    let mut ws = raw_client(broker.ws_plain_addr.unwrap(), Some("presence.v1")).await;
    ws.send(Message::Text("{\"connect\":{}}".into()))
        .await
        .unwrap();
    let (frames, close) = until_close(&mut ws).await;
    let c = last_close(&frames);
    assert_eq!(close_code(&c), pb::CloseCode::ProtocolViolation);
    assert!(c.reason.contains("binary"), "{c:?}");
    let (code, reason) = close.expect("a WebSocket Close frame");
    assert_eq!(code, 4000 + pb::CloseCode::ProtocolViolation as u16);
    assert!(reason.contains("binary"), "{reason}");
}

#[tokio::test]
async fn messages_over_the_cap_are_refused_before_and_after_connect() {
    let broker = ws_broker(|_| {}).await;
    let addr = broker.ws_plain_addr.unwrap();
    // Before Connect the cap is the pre-auth one (4 KiB): 5 KiB is refused.
    let mut ws = raw_client(addr, Some("presence.v1")).await;
    ws.send(Message::Binary(vec![0u8; 5 * 1024].into()))
        .await
        .unwrap();
    let (frames, close) = until_close(&mut ws).await;
    assert_eq!(
        close_code(&last_close(&frames)),
        pb::CloseCode::FrameTooLarge
    );
    assert_eq!(close.unwrap().0, 4000 + pb::CloseCode::FrameTooLarge as u16);

    // After Connect it is 64 KiB: a 5 KiB status is served, 65 KiB is refused.
    let mut ws = raw_client(addr, Some("presence.v1")).await;
    ws.send(connect_frame("dave", 30)).await.unwrap();
    conn_ack(&mut ws).await;
    let big_status = pb::SetPresence {
        state: [("note".to_string(), "x".repeat(200))].into(),
        ..Default::default()
    };
    ws.send(binary(2, C::SetPresence(big_status)))
        .await
        .unwrap();
    let reply = within(ws.next()).await.unwrap().unwrap();
    let Message::Binary(b) = reply else {
        panic!("{reply:?}")
    };
    assert_eq!(pb::ServerFrame::decode(b).unwrap().request_id, 2);
    ws.send(Message::Binary(vec![0u8; 65 * 1024 + 1].into()))
        .await
        .unwrap();
    let (frames, close) = until_close(&mut ws).await;
    assert_eq!(
        close_code(&last_close(&frames)),
        pb::CloseCode::FrameTooLarge
    );
    assert_eq!(close.unwrap().0, 4004);
}

#[tokio::test]
async fn a_huge_frame_header_and_fragments_beyond_the_cap_close_at_once() {
    let broker = ws_broker(|_| {}).await;
    let addr = broker.ws_plain_addr.unwrap();
    // A header announcing 1 GiB, then nothing: refused on the header, not after a timeout.
    let (mut tcp, head) =
        raw_upgrade(addr, "Sec-WebSocket-Protocol: presence.v1\r\n", "/v1/ws").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let mut frame = vec![0x82, 0x80 | 127];
    frame.extend_from_slice(&(1u64 << 30).to_be_bytes());
    frame.extend_from_slice(&[1, 2, 3, 4]);
    tcp.write_all(&frame).await.unwrap();
    let rest = read_to_end(&mut tcp).await;
    let text = String::from_utf8_lossy(&rest);
    assert!(
        text.contains("exceeds"),
        "a close with the reason: {text:?}"
    );

    // Fragments of 3 KiB each: the second takes the message past the pre-auth cap.
    let (mut tcp, _) = raw_upgrade(addr, "Sec-WebSocket-Protocol: presence.v1\r\n", "/v1/ws").await;
    let part = vec![0u8; 3 * 1024];
    tcp.write_all(&masked(0x02, &part)).await.unwrap(); // binary, not final
    tcp.write_all(&masked(0x00, &part)).await.unwrap(); // continuation, not final
    let rest = read_to_end(&mut tcp).await;
    let text = String::from_utf8_lossy(&rest);
    assert!(text.contains("exceeds"), "{text:?}");
}

#[tokio::test]
async fn a_missing_or_unknown_subprotocol_is_closed_with_a_reason() {
    let broker = ws_broker(|_| {}).await;
    let addr = broker.ws_plain_addr.unwrap();
    // No subprotocol: upgraded, then closed with the reason.
    let mut ws = raw_client(addr, None).await;
    let (frames, close) = until_close(&mut ws).await;
    assert!(frames.is_empty());
    let (code, reason) = close.expect("a Close frame");
    assert_eq!(code, 1002);
    assert!(reason.contains("presence.v1"), "{reason}");
    // Another subprotocol: the 101 names none (a browser then fails the connection itself),
    // and the Close frame behind it says why for clients that go on.
    let (mut tcp, head) = raw_upgrade(addr, "Sec-WebSocket-Protocol: mqtt\r\n", "/v1/ws").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        !head.to_ascii_lowercase().contains("sec-websocket-protocol"),
        "{head}"
    );
    let close = read_to_end(&mut tcp).await;
    assert_eq!(close[0], 0x88, "a Close frame: {close:?}");
    assert_eq!(u16::from_be_bytes([close[2], close[3]]), 1002);
    assert!(String::from_utf8_lossy(&close[4..]).contains("presence.v1"));
}

#[tokio::test]
async fn wrong_paths_bad_requests_and_foreign_origins_are_refused_with_a_reason() {
    let broker = ws_broker(|c| {
        c.websocket.allowed_origins = vec!["https://app.example".into()];
    })
    .await;
    let addr = broker.ws_plain_addr.unwrap();
    let protocol = "Sec-WebSocket-Protocol: presence.v1\r\n";
    let (mut tcp, head) = raw_upgrade(addr, protocol, "/ws").await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    let body = String::from_utf8(read_to_end(&mut tcp).await).unwrap();
    assert!(body.contains("/v1/ws"), "{body}");

    let (mut tcp, head) = raw_upgrade(addr, protocol, "/v1/ws").await;
    assert!(head.starts_with("HTTP/1.1 403"), "no Origin: {head}");
    let body = String::from_utf8(read_to_end(&mut tcp).await).unwrap();
    assert!(body.contains("allowed_origins"), "{body}");

    let evil = format!("{protocol}Origin: https://evil.example\r\n");
    let (_, head) = raw_upgrade(addr, &evil, "/v1/ws").await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");

    let good = format!("{protocol}Origin: https://app.example\r\n");
    let (_, head) = raw_upgrade(addr, &good, "/v1/ws").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");

    // Not an upgrade at all.
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /v1/ws HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let response = String::from_utf8(read_to_end(&mut tcp).await).unwrap();
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");

    // Headers past 16 KiB.
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let mut request = b"GET /v1/ws HTTP/1.1\r\nCookie: ".to_vec();
    // Just past the cap, so the broker has read every byte when it refuses (no reset).
    request.extend(std::iter::repeat_n(b'a', 16 * 1024 + 100 - request.len()));
    let _ = tcp.write_all(&request).await;
    let response = String::from_utf8_lossy(&read_to_end(&mut tcp).await).to_string();
    assert!(response.starts_with("HTTP/1.1 431"), "{response}");
}

#[tokio::test]
async fn a_silent_upgrade_and_a_silent_session_meet_their_deadlines() {
    let broker = ws_broker(|c| {
        c.session.handshake_timeout_ms = 300;
        c.session.connect_timeout_ms = 1000;
        c.session.partial_frame_timeout_ms = 200;
    })
    .await;
    let addr = broker.ws_plain_addr.unwrap();
    // No upgrade request at all: the socket is closed at the handshake deadline.
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    assert!(read_to_end(&mut tcp).await.is_empty());

    // Upgraded but no Connect.
    let mut ws = raw_client(addr, Some("presence.v1")).await;
    let (frames, close) = until_close(&mut ws).await;
    assert_eq!(
        close_code(&last_close(&frames)),
        pb::CloseCode::DeadlineExceeded
    );
    assert_eq!(close.unwrap().0, 4005);

    // Half a frame, then silence: the partial-frame deadline.
    let (mut tcp, _) = raw_upgrade(addr, "Sec-WebSocket-Protocol: presence.v1\r\n", "/v1/ws").await;
    let Message::Binary(connect) = connect_frame("erin", 30) else {
        unreachable!()
    };
    let frame = masked(0x82, &connect);
    tcp.write_all(&frame[..frame.len() / 2]).await.unwrap();
    let rest = String::from_utf8_lossy(&read_to_end(&mut tcp).await).to_string();
    assert!(rest.contains("incomplete"), "{rest:?}");
}

#[tokio::test]
async fn keepalive_counts_protocol_frames_and_websocket_pings_are_answered() {
    let broker = ws_broker(|c| {
        c.session.keepalive_min_secs = 1;
    })
    .await;
    let mut ws = raw_client(broker.ws_plain_addr.unwrap(), Some("presence.v1")).await;
    ws.send(connect_frame("frank", 1)).await.unwrap();
    assert_eq!(conn_ack(&mut ws).await.keepalive_seconds, 1);
    // A WebSocket ping is answered with a pong...
    ws.send(Message::Ping(b"hi".to_vec().into())).await.unwrap();
    match within(ws.next()).await {
        Some(Ok(Message::Pong(p))) => assert_eq!(&p[..], b"hi"),
        other => panic!("a pong: {other:?}"),
    }
    // ...but only protocol frames count as keepalive: silence past 1.5 s closes the session.
    let started = std::time::Instant::now();
    let (frames, close) = until_close(&mut ws).await;
    eprintln!("closed after {:?}", started.elapsed());
    assert_eq!(
        close_code(&last_close(&frames)),
        pb::CloseCode::KeepaliveTimeout
    );
    assert_eq!(close.unwrap().0, 4006);
    assert!(started.elapsed() >= Duration::from_millis(1000));
}

#[tokio::test]
async fn a_browser_close_is_a_lost_connection_with_its_grace_period() {
    let broker = ws_broker(|c| c.session.grace_period_ms = 300).await;
    let mut watcher = connect(&broker, "watcher").await;
    watcher.subscribe(&["gina"]).await.unwrap();
    let mut ws = raw_client(broker.ws_plain_addr.unwrap(), Some("presence.v1")).await;
    ws.send(connect_frame("gina", 30)).await.unwrap();
    conn_ack(&mut ws).await;
    presence_event_of(&mut watcher, "gina", pb::EventKind::Online).await;
    // A tab closing sends Close 1001: the server answers it, and the device lingers.
    ws.close(Some(CloseFrame {
        code: CloseCode::Away,
        reason: "tab closed".into(),
    }))
    .await
    .unwrap();
    let (_, close) = until_close(&mut ws).await;
    assert!(close.is_some(), "the server answers the Close frame");
    assert_eq!(
        offline_reason(&mut watcher, "gina").await,
        pb::OfflineReason::ConnectionLost
    );
}

#[tokio::test]
async fn accept_limits_are_shared_with_the_tcp_listener() {
    let broker = ws_broker(|c| c.limits.max_connections_per_address = 2).await;
    let _phone = connect(&broker, "hank").await;
    let _web = ws_client(&broker, "hank", "web").await;
    // The third connection from 127.0.0.1 is refused before any TLS, whatever its listener.
    let options = presenced::client::ClientOptions::new(broker.ws_addr.unwrap(), token("hank"))
        .device("web2")
        .websocket(Transport::Wss);
    assert!(within(Client::connect(options)).await.is_err());
    let mut tcp = TcpStream::connect(broker.ws_plain_addr.unwrap())
        .await
        .unwrap();
    assert!(read_to_end(&mut tcp).await.is_empty(), "refused at accept");
}

#[tokio::test]
async fn an_overflowing_browser_is_a_slow_consumer_like_any_client() {
    let broker = ws_broker(|c| {
        c.fanout.queue_capacity = 8;
        c.fanout.slow_consumer_timeout_ms = 300;
        c.session.grace_period_ms = 0;
        c.limits.publish_rate_per_sec = 1_000_000;
        c.limits.publish_burst = 1_000_000;
        c.limits.request_rate_per_sec = 1_000_000;
        c.limits.request_burst = 1_000_000;
    })
    .await;
    // A raw client that never reads after ConnAck.
    let mut ws = raw_client(broker.ws_plain_addr.unwrap(), Some("presence.v1")).await;
    ws.send(connect_frame("ivan", 30)).await.unwrap();
    conn_ack(&mut ws).await;
    ws.send(binary(
        2,
        C::Subscribe(pb::Subscribe {
            user_ids: vec!["judy".into()],
            ..Default::default()
        }),
    ))
    .await
    .unwrap();
    let judy = connect(&broker, "judy").await;
    // Updates big enough to fill the socket buffers while ivan reads nothing; the broker
    // closes him as a slow consumer, and the publisher is never held up.
    let mut closed = false;
    for i in 0..20_000 {
        let sent = judy
            .set_presence(pb::SetPresence {
                status: Some(format!("s{i}")),
                state: (0..32)
                    .map(|k| (format!("key{k}"), format!("{i:0>250}")))
                    .collect(),
                ..Default::default()
            })
            .await;
        assert!(sent.is_ok(), "the publisher is served: {sent:?}");
        if i % 50 == 0
            && broker
                .registry
                .online_status(&["ivan".to_string()])
                .first()
                .is_some_and(|s| *s == presenced::registry::OnlineStatus::Offline)
        {
            closed = true;
            break;
        }
    }
    assert!(closed, "ivan was closed as a slow consumer");
}

#[tokio::test]
async fn a_client_that_offers_only_http_1_1_like_a_browser_is_served_over_wss() {
    let broker = ws_broker(|_| {}).await;
    let mut tls = (*presenced::tls::dev_client_config()).clone();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let mut options = presenced::client::ClientOptions::new(broker.ws_addr.unwrap(), token("zoe"))
        .device("chrome")
        .websocket(Transport::Wss);
    options.tls = std::sync::Arc::new(tls);
    let client = within(Client::connect(options))
        .await
        .expect("a browser's ALPN offer is accepted");
    within(client.ping()).await.unwrap();
}

#[tokio::test]
async fn a_websocket_ping_is_answered_and_never_starts_the_partial_frame_deadline() {
    let broker = ws_broker(|c| {
        c.session.partial_frame_timeout_ms = 300;
    })
    .await;
    let addr = broker.ws_plain_addr.unwrap();
    // A ping after Connect, then silence: the session lives on past the partial-frame deadline.
    let mut ws = raw_client(addr, Some("presence.v1")).await;
    ws.send(connect_frame("pinger", 30)).await.unwrap();
    conn_ack(&mut ws).await;
    ws.send(Message::Ping(b"hb".to_vec().into())).await.unwrap();
    assert!(matches!(
        within(ws.next()).await,
        Some(Ok(Message::Pong(_)))
    ));
    let quiet = tokio::time::timeout(Duration::from_millis(900), ws.next()).await;
    assert!(quiet.is_err(), "nothing arrives, no close: {quiet:?}");
    ws.send(binary(2, C::Ping(pb::Ping::default())))
        .await
        .unwrap();
    assert!(matches!(
        within(ws.next()).await,
        Some(Ok(Message::Binary(_)))
    ));
}
