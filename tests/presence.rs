//! User presence through real TLS sockets (SPEC §3): publish with state merge and limits, rate
//! limit, subscribe (batch, self, cap eviction, current presence in the reply), unsubscribe,
//! list with paging, query, directed presence, events to watchers and own devices, per-user
//! version order, aggregate availability, and the offline-broadcast switch.

mod common;

use std::collections::BTreeMap;

use common::*;
use presenced::pb::{self, client_frame::Body as C};

fn status(text: &str) -> pb::SetPresence {
    pb::SetPresence {
        status: Some(text.into()),
        ..Default::default()
    }
}

fn state(pairs: &[(&str, &str)]) -> pb::SetPresence {
    pb::SetPresence {
        state: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

#[tokio::test]
async fn publish_reaches_watchers_and_own_other_devices_not_the_publisher() {
    let broker = start(|_| {}).await;
    let mut bob = connect(&broker, "bob").await;
    within(bob.subscribe(&["alice"])).await.unwrap();
    let mut alice_phone = connect_device(&broker, "alice", "phone").await;
    let mut alice_web = connect_device(&broker, "alice", "web").await;
    assert_eq!(
        kind(&within(bob.next_presence_event()).await.unwrap()),
        pb::EventKind::Online
    );
    let web_joined = within(bob.next_presence_event()).await.unwrap();
    assert_eq!(kind(&web_joined), pb::EventKind::Update);
    assert_eq!(web_joined.device_id, "web");
    assert_eq!(web_joined.presence.unwrap().devices.len(), 2);
    // The phone hears about the web device joining too.
    assert_eq!(
        within(alice_phone.next_presence_event())
            .await
            .unwrap()
            .device_id,
        "web"
    );

    let published = within(alice_phone.set_presence(pb::SetPresence {
        availability: pb::Availability::Dnd as i32,
        show: Some(40_000),
        status: Some("in a meeting 📅".into()),
        description: Some("back at 3".into()),
        state: BTreeMap::from([("mood".into(), "focused".into())]),
        replace_state: false,
    }))
    .await
    .unwrap();
    for receiver in [&mut bob, &mut alice_web] {
        let event = within(receiver.next_presence_event()).await.unwrap();
        assert_eq!(kind(&event), pb::EventKind::Update);
        assert_eq!(event.user_id, "alice");
        assert_eq!(event.device_id, "phone");
        let p = event.presence.unwrap();
        assert_eq!(
            p, published,
            "watchers see exactly what the publisher was told"
        );
        assert_eq!(
            availability(&p),
            pb::Availability::Online,
            "web is still ONLINE: most available wins"
        );
        assert_eq!(p.show, 40_000);
        assert_eq!(p.status, "in a meeting 📅");
        assert_eq!(p.description, "back at 3");
        assert_eq!(p.state["mood"], "focused");
        let phone = p.devices.iter().find(|d| d.device_id == "phone").unwrap();
        assert_eq!(phone.availability, pb::Availability::Dnd as i32);
        assert_eq!(event.version, p.version);
    }
    // The publisher itself gets no event: its next frame is the reply to this ping.
    within(alice_phone.ping()).await.unwrap();
    within(alice_phone.set_presence(status("x"))).await.unwrap();
    assert_eq!(
        within(bob.next_presence_event())
            .await
            .unwrap()
            .presence
            .unwrap()
            .status,
        "x"
    );
    drop(alice_web);
    let left = within(bob.next_presence_event()).await.unwrap();
    assert_eq!(kind(&left), pb::EventKind::Update);
    assert_eq!(
        availability(left.presence.as_ref().unwrap()),
        pb::Availability::Dnd
    );
}

#[tokio::test]
async fn versions_increase_and_order_is_kept_per_user() {
    let broker = start(|c| {
        c.limits.publish_rate_per_sec = 1000;
        c.limits.publish_burst = 1000;
    })
    .await;
    let mut bob = connect(&broker, "bob").await;
    within(bob.subscribe(&["alice"])).await.unwrap();
    let alice = connect(&broker, "alice").await;
    let online = within(bob.next_presence_event()).await.unwrap();
    let mut last = online.version;
    for i in 0..50 {
        within(alice.set_presence(status(&format!("s{i}"))))
            .await
            .unwrap();
    }
    for i in 0..50 {
        let e = within(bob.next_presence_event()).await.unwrap();
        assert!(e.version > last, "version must increase");
        last = e.version;
        assert_eq!(e.presence.unwrap().status, format!("s{i}"));
    }
}

#[tokio::test]
async fn state_merges_by_key_and_empty_values_remove() {
    let broker = start(|_| {}).await;
    let alice = connect(&broker, "alice").await;
    within(alice.set_presence(state(&[("a", "1"), ("b", "2")])))
        .await
        .unwrap();
    let p = within(alice.set_presence(state(&[("a", ""), ("c", "3")])))
        .await
        .unwrap();
    assert_eq!(
        p.state,
        BTreeMap::from([("b".into(), "2".into()), ("c".into(), "3".into())])
    );
    let p = within(alice.set_presence(pb::SetPresence {
        replace_state: true,
        state: BTreeMap::from([("z".into(), "9".into())]),
        ..Default::default()
    }))
    .await
    .unwrap();
    assert_eq!(p.state, BTreeMap::from([("z".into(), "9".into())]));
}

#[tokio::test]
async fn presence_over_its_limits_is_refused_and_changes_nothing() {
    let broker = start(|_| {}).await;
    let mut bob = connect(&broker, "bob").await;
    within(bob.subscribe(&["alice"])).await.unwrap();
    let alice = connect(&broker, "alice").await;
    within(bob.next_presence_event()).await.unwrap();
    let full: Vec<(String, String)> = (0..32).map(|i| (format!("k{i}"), "v".into())).collect();
    let too_many: Vec<(String, String)> = (0..33).map(|i| (format!("k{i}"), "v".into())).collect();
    let cases: Vec<(pb::SetPresence, &str)> = vec![
        (
            pb::SetPresence {
                state: too_many.into_iter().collect(),
                ..Default::default()
            },
            "33 pairs",
        ),
        (state(&[(&"k".repeat(65), "v")]), "65-byte key"),
        (state(&[("k", &"v".repeat(257))]), "257-byte value"),
        (status(&"s".repeat(257)), "257-byte status"),
        (
            pb::SetPresence {
                description: Some("d".repeat(257)),
                ..Default::default()
            },
            "257-byte description",
        ),
    ];
    for (change, what) in cases {
        let e = server_error(within(alice.set_presence(change)).await);
        assert_eq!(code(&e), pb::ErrorCode::LimitExceeded, "{what}");
        assert_eq!(e.operation, "set_presence");
        assert!(!e.reason.is_empty());
    }
    let e = server_error(
        within(alice.set_presence(pb::SetPresence {
            show: Some(70_000),
            ..Default::default()
        }))
        .await,
    );
    assert_eq!(code(&e), pb::ErrorCode::BadRequest);
    let e = server_error(
        within(alice.set_presence(pb::SetPresence {
            availability: 99,
            ..Default::default()
        }))
        .await,
    );
    assert_eq!(code(&e), pb::ErrorCode::BadRequest);
    // At the limit is fine; one more key through a merge is refused atomically.
    within(alice.set_presence(pb::SetPresence {
        state: full.into_iter().collect(),
        ..Default::default()
    }))
    .await
    .unwrap();
    let e = server_error(
        within(alice.set_presence(pb::SetPresence {
            status: Some("should not apply".into()),
            state: BTreeMap::from([("one-more".into(), "v".into())]),
            ..Default::default()
        }))
        .await,
    );
    assert_eq!(code(&e), pb::ErrorCode::LimitExceeded);
    let now = within(bob.get_presence(&["alice"])).await.unwrap();
    assert_eq!(now[0].state.len(), 32);
    assert_eq!(now[0].status, "");
    // Watchers saw exactly one update: the one at the limit.
    let e = within(bob.next_presence_event()).await.unwrap();
    assert_eq!(e.presence.unwrap().state.len(), 32);
    within(alice.set_presence(status("ok"))).await.unwrap();
    assert_eq!(
        within(bob.next_presence_event())
            .await
            .unwrap()
            .presence
            .unwrap()
            .status,
        "ok"
    );
}

#[tokio::test]
async fn publishing_is_rate_limited_with_a_retry_hint() {
    let broker = start(|_| {}).await;
    let alice = connect(&broker, "alice").await;
    let bystander = connect(&broker, "carol").await;
    let mut limited = None;
    for i in 0..25 {
        match within(alice.set_presence(status(&format!("{i}")))).await {
            Ok(_) => {}
            Err(e) => {
                limited = Some((i, server_error(Err::<(), _>(e))));
                break;
            }
        }
    }
    let (at, e) = limited.expect("the burst of 20 runs out");
    assert!(at >= 20, "burst of 20 allowed, refused at {at}");
    assert_eq!(code(&e), pb::ErrorCode::RateLimited);
    assert!(e.retry_after_ms > 0 && e.retry_after_ms <= 100);
    within(alice.ping()).await.unwrap();
    within(bystander.set_presence(status("unaffected")))
        .await
        .unwrap();
}

#[tokio::test]
async fn subscribe_returns_current_presence_and_validates_its_input() {
    let broker = start(|_| {}).await;
    let bob = connect(&broker, "bob").await;
    let alice = connect(&broker, "alice").await;
    within(alice.set_presence(status("hello"))).await.unwrap();
    let r = within(bob.subscribe(&["alice", "nobody", "alice"]))
        .await
        .unwrap();
    assert_eq!(r.presences.len(), 2, "duplicates folded");
    assert_eq!(r.presences[0].status, "hello");
    assert_eq!(availability(&r.presences[0]), pb::Availability::Online);
    assert_eq!(availability(&r.presences[1]), pb::Availability::Offline);
    assert_eq!(r.subscription_count, 2);
    let week = 7 * 24 * 3600 * 1000;
    assert!(r.expires_at_ms.abs_diff(presenced::now_ms() + week) < 60_000);

    let ids: Vec<String> = (0..101).map(|i| format!("u{i}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let e = server_error(within(bob.subscribe(&refs)).await);
    assert_eq!(code(&e), pb::ErrorCode::TooManyIds);
    assert_eq!(e.operation, "subscribe");
    within(bob.subscribe(&refs[..100])).await.unwrap();

    let e = server_error(within(bob.subscribe(&["bob"])).await);
    assert_eq!(code(&e), pb::ErrorCode::SelfSubscription);
    let e = server_error(within(bob.subscribe(&[""])).await);
    assert_eq!(code(&e), pb::ErrorCode::InvalidUserId);
    let e = server_error(within(bob.subscribe(&[&"x".repeat(129)])).await);
    assert_eq!(code(&e), pb::ErrorCode::InvalidUserId);
    let e = server_error(within(bob.subscribe_for(&["alice"], 31 * 24 * 3600)).await);
    assert_eq!(code(&e), pb::ErrorCode::LimitExceeded);
    let e = server_error(within(bob.subscribe(&[])).await);
    assert_eq!(code(&e), pb::ErrorCode::BadRequest);
    // None of the refused requests changed anything.
    assert_eq!(within(bob.all_subscriptions()).await.unwrap().len(), 102);
}

#[tokio::test]
async fn the_cap_evicts_the_shortest_lived_and_says_which() {
    let broker = start(|c| c.limits.max_subscriptions = 3).await;
    let bob = connect(&broker, "bob").await;
    within(bob.subscribe_for(&["long"], 3000)).await.unwrap();
    within(bob.subscribe_for(&["short"], 100)).await.unwrap();
    within(bob.subscribe_for(&["mid"], 2000)).await.unwrap();
    let r = within(bob.subscribe_for(&["new"], 1000)).await.unwrap();
    assert_eq!(r.evicted_user_ids, ["short"]);
    assert_eq!(r.subscription_count, 3);
    let subs = within(bob.all_subscriptions()).await.unwrap();
    let names: Vec<&str> = subs.iter().map(|s| s.user_id.as_str()).collect();
    assert_eq!(names, ["long", "mid", "new"]);
}

#[tokio::test]
async fn resubscribing_replaces_the_expiry() {
    let broker = start(|_| {}).await;
    let bob = connect(&broker, "bob").await;
    let first = within(bob.subscribe_for(&["alice"], 3600)).await.unwrap();
    let second = within(bob.subscribe_for(&["alice"], 60)).await.unwrap();
    assert!(second.expires_at_ms < first.expires_at_ms);
    let subs = within(bob.all_subscriptions()).await.unwrap();
    assert_eq!(subs.len(), 1);
    assert_eq!(subs[0].expires_at_ms, second.expires_at_ms);
}

#[tokio::test]
async fn unsubscribe_stops_events_and_ignores_unknown_ids() {
    let broker = start(|_| {}).await;
    let mut bob = connect(&broker, "bob").await;
    within(bob.subscribe(&["alice", "dave"])).await.unwrap();
    let alice = connect(&broker, "alice").await;
    let dave = connect(&broker, "dave").await;
    within(bob.next_presence_event()).await.unwrap();
    within(bob.next_presence_event()).await.unwrap();
    let r = within(bob.unsubscribe(&["alice", "never-subscribed"]))
        .await
        .unwrap();
    assert_eq!(r.removed, 1);
    assert_eq!(r.subscription_count, 1);
    within(alice.set_presence(status("unseen"))).await.unwrap();
    within(dave.set_presence(status("seen"))).await.unwrap();
    let e = within(bob.next_presence_event()).await.unwrap();
    assert_eq!(e.user_id, "dave", "alice's change was not delivered");
    let ids: Vec<String> = (0..101).map(|i| format!("u{i}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    assert_eq!(
        code(&server_error(within(bob.unsubscribe(&refs)).await)),
        pb::ErrorCode::TooManyIds
    );
}

#[tokio::test]
async fn subscriptions_page_with_an_opaque_cursor() {
    let broker = start(|_| {}).await;
    let bob = connect(&broker, "bob").await;
    let ids: Vec<String> = (0..250).map(|i| format!("user{i:03}")).collect();
    for chunk in ids.chunks(100) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        within(bob.subscribe(&refs)).await.unwrap();
    }
    let first = within(bob.list_subscriptions("", 0)).await.unwrap();
    assert_eq!(first.subscriptions.len(), 100);
    assert_eq!(first.total, 250);
    assert!(!first.next_cursor.is_empty());
    let mut seen: Vec<String> = Vec::new();
    let mut cursor = String::new();
    loop {
        let page = within(bob.list_subscriptions(&cursor, 70)).await.unwrap();
        assert!(page.subscriptions.len() <= 70);
        seen.extend(page.subscriptions.into_iter().map(|s| s.user_id));
        if page.next_cursor.is_empty() {
            break;
        }
        cursor = page.next_cursor;
    }
    assert_eq!(seen, ids);
    let e = server_error(within(bob.list_subscriptions("not-a-cursor!", 10)).await);
    assert_eq!(code(&e), pb::ErrorCode::BadCursor);
    let e = server_error(within(bob.list_subscriptions("", 101)).await);
    assert_eq!(code(&e), pb::ErrorCode::LimitExceeded);
    // Another user's list is their own.
    let carol = connect(&broker, "carol").await;
    assert!(within(carol.all_subscriptions()).await.unwrap().is_empty());
}

#[tokio::test]
async fn query_without_subscribing() {
    let broker = start(|_| {}).await;
    let bob = connect(&broker, "bob").await;
    let alice = connect(&broker, "alice").await;
    within(alice.set_presence(status("here"))).await.unwrap();
    let gone = connect(&broker, "gone").await;
    within(gone.disconnect()).await.unwrap();
    // Disconnect is processed before the close is sent, so last-seen is recorded by now.
    let r = within(bob.get_presence(&["alice", "gone", "never"]))
        .await
        .unwrap();
    assert_eq!(r.len(), 3);
    assert_eq!(r[0].status, "here");
    assert_eq!(availability(&r[1]), pb::Availability::Offline);
    assert!(r[1].last_seen_ms > 0);
    assert_eq!(availability(&r[2]), pb::Availability::Offline);
    assert_eq!(r[2].last_seen_ms, 0);
    assert!(within(bob.all_subscriptions()).await.unwrap().is_empty());
    let ids: Vec<String> = (0..101).map(|i| format!("u{i}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    assert_eq!(
        code(&server_error(within(bob.get_presence(&refs)).await)),
        pb::ErrorCode::TooManyIds
    );
}

#[tokio::test]
async fn directed_presence_reaches_only_online_recipients_and_is_not_stored() {
    let broker = start(|_| {}).await;
    let alice = connect(&broker, "alice").await;
    let mut bob = connect(&broker, "bob").await;
    let mut watcher = connect(&broker, "watcher").await;
    within(watcher.subscribe(&["alice"])).await.unwrap();
    let delivered = within(alice.direct(
        &["bob", "offline-user"],
        pb::SetPresence {
            availability: pb::Availability::Away as i32,
            status: Some("only for bob".into()),
            ..Default::default()
        },
    ))
    .await
    .unwrap();
    assert_eq!(delivered, ["bob"]);
    let e = within(bob.next_presence_event()).await.unwrap();
    assert_eq!(kind(&e), pb::EventKind::Directed);
    assert_eq!(e.user_id, "alice");
    let p = e.presence.unwrap();
    assert_eq!(p.status, "only for bob");
    assert_eq!(availability(&p), pb::Availability::Away);
    // Not stored, and watchers were not told.
    let stored = within(bob.get_presence(&["alice"])).await.unwrap();
    assert_eq!(stored[0].status, "");
    assert_eq!(availability(&stored[0]), pb::Availability::Online);
    within(alice.set_presence(status("public"))).await.unwrap();
    let seen = within(watcher.next_presence_event()).await.unwrap();
    assert_eq!(kind(&seen), pb::EventKind::Update);
    assert_eq!(seen.presence.unwrap().status, "public");
    let ids: Vec<String> = (0..101).map(|i| format!("u{i}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    assert_eq!(
        code(&server_error(
            within(alice.direct(&refs, pb::SetPresence::default())).await
        )),
        pb::ErrorCode::TooManyIds
    );
}

#[tokio::test]
async fn offline_broadcast_can_be_switched_off() {
    let broker = start(|c| c.session.offline_broadcast = false).await;
    let mut bob = connect(&broker, "bob").await;
    within(bob.subscribe(&["alice", "dave"])).await.unwrap();
    let alice = connect(&broker, "alice").await;
    within(bob.next_presence_event()).await.unwrap();
    within(alice.disconnect()).await.unwrap();
    let _dave = connect(&broker, "dave").await;
    let next = within(bob.next_presence_event()).await.unwrap();
    assert_eq!(next.user_id, "dave", "no OFFLINE for alice was sent");
    assert_eq!(kind(&next), pb::EventKind::Online);
    let r = within(bob.get_presence(&["alice"])).await.unwrap();
    assert_eq!(
        availability(&r[0]),
        pb::Availability::Offline,
        "queries still tell the truth"
    );
}

#[tokio::test]
async fn initial_presence_and_user_data_come_with_connect() {
    let broker = start(|_| {}).await;
    let mut bob = connect(&broker, "bob").await;
    within(bob.subscribe(&["alice"])).await.unwrap();
    let mut opts = options(&broker, "alice", "phone");
    opts.platform = "ios".into();
    opts.initial_presence = Some(pb::SetPresence {
        availability: pb::Availability::Away as i32,
        status: Some("commuting".into()),
        ..Default::default()
    });
    opts.user_data = BTreeMap::from([("name".into(), "Alice".into())]);
    let alice = within(presenced::client::Client::connect(opts))
        .await
        .unwrap();
    let online = within(bob.next_presence_event()).await.unwrap();
    assert_eq!(kind(&online), pb::EventKind::Online);
    let p = online.presence.unwrap();
    assert_eq!(availability(&p), pb::Availability::Away);
    assert_eq!(p.status, "commuting");
    assert_eq!(p.user_data["name"], "Alice");
    assert_eq!(p.devices[0].platform, "ios");
    assert_eq!(
        alice.conn_ack.presence.as_ref().unwrap().status,
        "commuting"
    );

    let mut opts = options(&broker, "mallory", "phone");
    opts.user_data = BTreeMap::from([("blob".into(), "x".repeat(2000))]);
    let e = server_error(within(presenced::client::Client::connect(opts)).await);
    assert_eq!(code(&e), pb::ErrorCode::LimitExceeded);
    assert_eq!(e.operation, "connect");
}

#[tokio::test]
async fn raw_request_ids_are_echoed() {
    let broker = start(|_| {}).await;
    let mut alice = connect(&broker, "alice").await;
    alice
        .send_raw(pb::ClientFrame {
            request_id: 0xdead_beef,
            body: Some(C::GetPresence(pb::GetPresence {
                user_ids: vec!["alice".into()],
            })),
        })
        .await
        .unwrap();
    let frame = within(alice.next_event()).await.unwrap();
    assert_eq!(frame.request_id, 0xdead_beef);
}

#[tokio::test]
async fn get_presence_folds_duplicate_ids() {
    let broker = start(|_| {}).await;
    let bob = connect(&broker, "bob").await;
    let ids: Vec<&str> = std::iter::repeat_n("bob", 100).chain(["carol"]).collect();
    let ids = &ids[..100];
    let presences = within(bob.get_presence(ids)).await.unwrap();
    assert_eq!(
        presences.len(),
        1,
        "one presence per distinct id, however often asked"
    );
    let mixed = within(bob.get_presence(&["carol", "bob", "carol"]))
        .await
        .unwrap();
    let order: Vec<&str> = mixed.iter().map(|p| p.user_id.as_str()).collect();
    assert_eq!(order, ["carol", "bob"]);
}
