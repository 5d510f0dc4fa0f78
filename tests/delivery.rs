//! Background mode (SPEC §12, `SetDelivery`) through real sockets: a batched contract holds
//! watched users' changes and sends each user's latest state, trimmed to the chosen fields, in
//! at most one `PresenceBatch` per interval; favourites, directed presence and replies stay
//! live; switching back to live sends what was held or trimmed, in full, before the reply; bad
//! contracts get an error naming the field. Also over a WebSocket, and in cluster mode the
//! contract is the connection's own, so it holds for changes made on other nodes (see
//! `tests/cluster.rs`).

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use presenced::client::Client;
use presenced::pb::{self, server_frame::Body as S};

fn unthrottled(c: &mut presenced::Config) {
    c.limits.publish_rate_per_sec = 1_000_000;
    c.limits.publish_burst = 1_000_000;
    c.limits.request_rate_per_sec = 1_000_000;
    c.limits.request_burst = 1_000_000;
}

fn batched(interval: u32, fields: pb::FieldSelection, live: &[&str]) -> pb::SetDelivery {
    pb::SetDelivery {
        mode: pb::DeliveryMode::Batched as i32,
        interval_seconds: interval,
        fields: fields as i32,
        live_user_ids: live.iter().map(|s| s.to_string()).collect(),
    }
}

fn change(availability: pb::Availability, status: &str) -> pb::SetPresence {
    pb::SetPresence {
        availability: availability as i32,
        status: Some(status.into()),
        state: [("blob".to_string(), "x".repeat(200))].into(),
        ..Default::default()
    }
}

/// Frames received within `window`, with their arrival times.
async fn frames_for(client: &mut Client, window: Duration) -> Vec<(Instant, pb::ServerFrame)> {
    let deadline = tokio::time::Instant::now() + window;
    let mut out = Vec::new();
    while let Ok(Some(frame)) = tokio::time::timeout_at(deadline, client.next_event()).await {
        out.push((Instant::now(), frame));
    }
    out
}

#[tokio::test]
async fn a_batched_contract_sends_each_user_s_latest_trimmed_state_at_most_once_per_interval() {
    let broker = start(unthrottled).await;
    let mut phone = connect(&broker, "watcher").await;
    let users = ["u1", "u2", "u3"];
    within(phone.subscribe(&["u1", "u2", "u3", "fav"]))
        .await
        .unwrap();
    let mut publishers = Vec::new();
    for u in users.iter().chain(["fav"].iter()) {
        publishers.push(connect(&broker, u).await);
    }
    // Drain the ONLINE events of the connects.
    for _ in 0..4 {
        within(phone.next_presence_event()).await.unwrap();
    }
    let result = within(phone.set_delivery(batched(1, pb::FieldSelection::Availability, &["fav"])))
        .await
        .unwrap();
    assert_eq!(result.mode, pb::DeliveryMode::Batched as i32);
    assert_eq!((result.interval_seconds, result.live_users), (1, 1));

    // 3 s of churn: every user changes 30 times; fav's changes stay live.
    let started = Instant::now();
    let mut last: HashMap<String, pb::Availability> = HashMap::new();
    for round in 0..30 {
        for (i, p) in publishers.iter().enumerate() {
            let a = if (round + i) % 2 == 0 {
                pb::Availability::Away
            } else {
                pb::Availability::Dnd
            };
            within(p.set_presence(change(a, &format!("s{round}"))))
                .await
                .unwrap();
            let user = if i < 3 { users[i] } else { "fav" };
            last.insert(user.to_string(), a);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let frames = frames_for(&mut phone, Duration::from_millis(2500)).await;
    let mut batches = Vec::new();
    let mut fav_live = 0;
    for (at, frame) in &frames {
        match &frame.body {
            Some(S::PresenceBatch(b)) => batches.push((*at, b.clone())),
            Some(S::PresenceEvent(e)) => {
                assert_eq!(e.user_id, "fav", "only the favourite is live: {e:?}");
                assert!(
                    !e.presence.as_ref().unwrap().state.is_empty(),
                    "live is complete"
                );
                fav_live += 1;
            }
            other => panic!("unexpected frame {other:?}"),
        }
    }
    assert_eq!(fav_live, 30, "every change of the favourite, live");
    let elapsed = started.elapsed().as_secs_f64();
    assert!(
        (batches.len() as f64) <= elapsed.ceil() + 1.0,
        "{} batches in {elapsed:.1} s",
        batches.len()
    );
    for pair in batches.windows(2) {
        assert!(
            pair[1].0 - pair[0].0 >= Duration::from_millis(900),
            "batches at least an interval apart"
        );
    }
    // Each batch carries each user at most once, trimmed; the last one seen per user is the
    // final state.
    let mut seen: HashMap<String, (u64, i32)> = HashMap::new();
    for (_, b) in &batches {
        let mut in_batch = std::collections::HashSet::new();
        for e in &b.events {
            assert!(
                in_batch.insert(e.user_id.clone()),
                "one event per user per batch"
            );
            let p = e.presence.as_ref().unwrap();
            assert!(
                p.status.is_empty() && p.state.is_empty() && p.devices.is_empty(),
                "{p:?}"
            );
            let entry = seen.entry(e.user_id.clone()).or_insert((0, 0));
            assert!(e.version > entry.0, "versions only increase");
            *entry = (e.version, p.availability);
        }
    }
    for u in users {
        assert_eq!(
            seen.get(u).map(|s| s.1),
            Some(last[u] as i32),
            "{u}'s final state arrived"
        );
    }
}

#[tokio::test]
async fn directed_presence_and_replies_are_never_held_and_live_flushes_in_full_first() {
    let broker = start(unthrottled).await;
    let mut phone = connect(&broker, "watcher").await;
    within(phone.subscribe(&["alice", "bob"])).await.unwrap();
    let alice = connect(&broker, "alice").await;
    let bob = connect(&broker, "bob").await;
    for _ in 0..2 {
        within(phone.next_presence_event()).await.unwrap();
    }
    within(phone.set_delivery(batched(
        3600,
        pb::FieldSelection::AvailabilityAndStatus,
        &[],
    )))
    .await
    .unwrap();
    // A directed presence arrives at once, whatever the contract.
    within(alice.direct(&["watcher"], change(pb::Availability::Online, "psst")))
        .await
        .unwrap();
    let e = within(phone.next_presence_event()).await.unwrap();
    assert_eq!(e.kind, pb::EventKind::Directed as i32);
    // Changes are held (the interval is an hour)...
    within(alice.set_presence(change(pb::Availability::Away, "lunch")))
        .await
        .unwrap();
    within(bob.set_presence(change(pb::Availability::Dnd, "focus")))
        .await
        .unwrap();
    // ...while requests are answered at once.
    within(phone.ping()).await.unwrap();
    assert!(phone.try_next_event().is_none(), "nothing sent yet");
    // Back to live: one full batch first, then the reply.
    let reply = within(phone.set_delivery(pb::SetDelivery::default()))
        .await
        .unwrap();
    assert_eq!(reply.mode, pb::DeliveryMode::Live as i32);
    let frame = phone
        .try_next_event()
        .expect("the batch came before the reply");
    let Some(S::PresenceBatch(batch)) = frame.body else {
        panic!("{frame:?}")
    };
    assert_eq!(batch.fields, pb::FieldSelection::All as i32);
    let mut statuses: Vec<(String, String, usize)> = batch
        .events
        .iter()
        .map(|e| {
            let p = e.presence.as_ref().unwrap();
            (e.user_id.clone(), p.status.clone(), p.state.len())
        })
        .collect();
    statuses.sort();
    assert_eq!(
        statuses,
        [
            ("alice".to_string(), "lunch".to_string(), 1),
            ("bob".to_string(), "focus".to_string(), 1)
        ]
    );
    // Live again.
    within(alice.set_presence(change(pb::Availability::Online, "back")))
        .await
        .unwrap();
    let e = within(phone.next_presence_event()).await.unwrap();
    assert_eq!(e.presence.unwrap().status, "back");
}

#[tokio::test]
async fn trimmed_users_get_their_full_state_when_live_returns() {
    let broker = start(unthrottled).await;
    let mut phone = connect(&broker, "watcher").await;
    within(phone.subscribe(&["carol"])).await.unwrap();
    let carol = connect(&broker, "carol").await;
    within(phone.next_presence_event()).await.unwrap();
    within(phone.set_delivery(batched(1, pb::FieldSelection::Availability, &[])))
        .await
        .unwrap();
    within(carol.set_presence(change(pb::Availability::Away, "gym")))
        .await
        .unwrap();
    let batch = within(phone.next_presence_batch()).await.unwrap();
    assert_eq!(batch.events.len(), 1);
    assert!(batch.events[0].presence.as_ref().unwrap().status.is_empty());
    // A status-only change does not show under this contract: no batch for it.
    within(carol.set_presence(pb::SetPresence {
        status: Some("sauna".into()),
        ..Default::default()
    }))
    .await
    .unwrap();
    let quiet = frames_for(&mut phone, Duration::from_millis(1500)).await;
    assert!(quiet.is_empty(), "{quiet:?}");
    within(phone.set_delivery(pb::SetDelivery::default()))
        .await
        .unwrap();
    let frame = phone.try_next_event().expect("the owed full state");
    let Some(S::PresenceBatch(batch)) = frame.body else {
        panic!("{frame:?}")
    };
    assert_eq!(batch.events[0].presence.as_ref().unwrap().status, "sauna");
}

#[tokio::test]
async fn bad_contracts_are_refused_with_the_field_named() {
    let broker = start(|_| {}).await;
    let phone = connect(&broker, "watcher").await;
    for (request, needle) in [
        (batched(0, pb::FieldSelection::All, &[]), "interval_seconds"),
        (
            batched(3601, pb::FieldSelection::All, &[]),
            "interval_seconds",
        ),
        (
            pb::SetDelivery {
                fields: pb::FieldSelection::Availability as i32,
                ..Default::default()
            },
            "BATCHED",
        ),
        (
            pb::SetDelivery {
                mode: 7,
                ..Default::default()
            },
            "mode",
        ),
        (batched(5, pb::FieldSelection::All, &["bad\u{0}id"]), "id"),
    ] {
        let e = server_error(within(phone.set_delivery(request)).await);
        assert_eq!(e.operation, "set_delivery");
        assert!(e.reason.contains(needle), "{e:?} should name {needle}");
    }
    within(phone.ping()).await.unwrap();
}

#[tokio::test]
async fn a_browser_can_go_to_the_background_too() {
    let broker = start(|c| {
        unthrottled(c);
        c.websocket.listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let options = presenced::client::ClientOptions::new(broker.ws_addr.unwrap(), token("tab"))
        .device("browser")
        .websocket(presenced::client::Transport::Wss);
    let mut tab = within(Client::connect(options)).await.unwrap();
    within(tab.subscribe(&["dave"])).await.unwrap();
    let dave = connect(&broker, "dave").await;
    within(tab.next_presence_event()).await.unwrap();
    within(tab.set_delivery(batched(1, pb::FieldSelection::All, &[])))
        .await
        .unwrap();
    for i in 0..5 {
        within(dave.set_presence(change(pb::Availability::Away, &format!("{i}"))))
            .await
            .unwrap();
    }
    let batch = within(tab.next_presence_batch()).await.unwrap();
    assert_eq!(batch.events.len(), 1);
    assert_eq!(batch.events[0].presence.as_ref().unwrap().status, "4");
}
