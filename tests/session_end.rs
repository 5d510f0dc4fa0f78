//! However a session ends, the registry is left true: a panicking connection task leaves no
//! ghost, a frame split across reads still meets the partial-frame deadline, and a session whose
//! token expires is told and closed. (A failed write being a lost connection is shown by
//! `connection`'s unit test, which can break writes while reads go on.)

mod common;

use std::time::Duration;

use common::*;
use presenced::pb;
use presenced::pb::client_frame::Body as ClientBody;
use presenced::pb::server_frame::Body as ServerBody;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn frame(request_id: u64, body: ClientBody) -> Vec<u8> {
    pb::ClientFrame {
        request_id,
        body: Some(body),
    }
    .encode_length_delimited_to_vec()
}

fn connect_frame(user: &str) -> Vec<u8> {
    frame(
        1,
        ClientBody::Connect(pb::Connect {
            token: token(user),
            device_id: "phone".into(),
            keepalive_seconds: 60,
            ..Default::default()
        }),
    )
}

/// Reads frames until the server closes; bounded by `within`.
async fn frames_until_closed(
    stream: &mut (impl AsyncReadExt + Unpin),
    buffered: &mut Vec<u8>,
) -> Vec<pb::ServerFrame> {
    let mut frames = Vec::new();
    within(async {
        loop {
            let mut slice = &buffered[..];
            let before = slice.len();
            if let Ok(f) = pb::ServerFrame::decode_length_delimited(&mut slice) {
                let used = before - slice.len();
                buffered.drain(..used);
                frames.push(f);
                continue;
            }
            let mut buf = [0u8; 4096];
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buffered.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    frames
}

#[tokio::test]
async fn a_panicking_connection_task_leaves_no_ghost_and_no_membership() {
    // A long grace period: only the guard's cleanup can take the device out in time.
    let broker = start(|c| {
        c.session.panic_on_status = Some("boom".into());
        c.session.grace_period_ms = 120_000;
    })
    .await;
    let mut watcher = connect(&broker, "watcher").await;
    watcher.subscribe(&["victim"]).await.unwrap();
    watcher.watch_channel("room").await.unwrap();
    let victim = connect(&broker, "victim").await;
    victim.join("room", Default::default()).await.unwrap();
    presence_event_of(&mut watcher, "victim", pb::EventKind::Online).await;
    // The victim's task panics on this request.
    let _ = victim
        .request(ClientBody::SetPresence(pb::SetPresence {
            status: Some("boom".into()),
            ..Default::default()
        }))
        .await;
    assert_eq!(
        offline_reason(&mut watcher, "victim").await,
        pb::OfflineReason::ConnectionLost
    );
    let presence = watcher.get_presence(&["victim"]).await.unwrap();
    assert_eq!(availability(&presence[0]), pb::Availability::Offline);
    let who = watcher
        .who_now("room", pb::WhoNowMode::Ids, "", 100)
        .await
        .unwrap();
    assert!(who.members.is_empty() && who.occupancy == 0, "{who:?}");
    // The user can come back and the broker still serves everyone.
    let again = connect(&broker, "victim").await;
    again.ping().await.unwrap();
    broker.stop().await;
}

#[tokio::test]
async fn a_frame_split_across_reads_is_dropped_at_the_partial_frame_deadline() {
    let broker = start(|c| c.session.partial_frame_timeout_ms = 300).await;
    let mut tls = presenced::client::tls_connect(
        broker.addr,
        "localhost",
        presenced::tls::dev_client_config(),
    )
    .await
    .unwrap();
    tls.write_all(&connect_frame("slowpoke")).await.unwrap();
    tls.flush().await.unwrap();
    let mut buffered = Vec::new();
    // Wait for the ConnAck alone, so the next bytes arrive in a read of their own.
    within(async {
        loop {
            let mut buf = [0u8; 4096];
            let n = tls.read(&mut buf).await.unwrap();
            buffered.extend_from_slice(&buf[..n]);
            let mut slice = &buffered[..];
            if pb::ServerFrame::decode_length_delimited(&mut slice).is_ok() {
                let used = buffered.len() - slice.len();
                buffered.drain(..used);
                return;
            }
        }
    })
    .await;
    // Two bytes of a ten-byte frame; keepalive (60 s) would take 90 s to notice.
    tls.write_all(&[10, 8]).await.unwrap();
    tls.flush().await.unwrap();
    let started = std::time::Instant::now();
    let frames = frames_until_closed(&mut tls, &mut buffered).await;
    let close = frames
        .iter()
        .find_map(|f| match &f.body {
            Some(ServerBody::Close(c)) => Some(c.clone()),
            _ => None,
        })
        .expect("a Close frame");
    assert_eq!(close_code(&close), pb::CloseCode::DeadlineExceeded);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "closed after {:?}",
        started.elapsed()
    );
    broker.stop().await;
}

/// Connects `user` with a dev token that expires in `secs` seconds.
async fn connect_expiring(broker: &Broker, user: &str, secs: u64) -> presenced::client::Client {
    let token = presenced::auth::mint(
        presenced::config::DEV_SECRET.as_bytes(),
        Some(presenced::config::DEV_KID),
        &claims(user, now_secs() + secs),
    );
    within(presenced::client::Client::connect(
        presenced::client::ClientOptions::new(broker.addr, token).device("phone"),
    ))
    .await
    .unwrap()
}

#[tokio::test]
async fn a_session_whose_token_expires_is_told_and_closed() {
    let broker = start(|_| {}).await;
    let mut client = connect_expiring(&broker, "shortlived", 2).await;
    let close = within(client.closed()).await.expect("a Close frame");
    assert_eq!(close_code(&close), pb::CloseCode::TokenExpired);
    broker.stop().await;
}

#[tokio::test]
async fn sessions_outlive_their_token_when_expiry_closing_is_off() {
    let broker = start(|c| c.session.close_on_token_expiry = false).await;
    let client = connect_expiring(&broker, "longlived", 1).await;
    // Past the token's expiry, the session still answers.
    let deadline = std::time::Instant::now() + Duration::from_millis(2500);
    while std::time::Instant::now() < deadline {
        client.ping().await.unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    client.ping().await.unwrap();
    broker.stop().await;
}
