//! Channel presence through real TLS sockets (SPEC §4): join/leave with JOIN, LEAVE, TIMEOUT
//! and user-level ONLINE/OFFLINE events carrying the occupancy; watching without joining;
//! who-now in its three modes with stable paging under churn; where-now; member state with its
//! limits; interval mode; membership surviving a reconnect; no ghosts and no memory left for
//! empty channels; bad input.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;
use presenced::client::Client;
use presenced::pb::{self, ChannelEventKind as K, WhoNowMode};

fn quiet(c: &mut presenced::Config) {
    // Per-event mode for these tests; interval mode has its own test.
    c.channels.announce_threshold = 10_000;
}

async fn next(client: &mut Client) -> pb::ChannelEvent {
    within(client.next_channel_event()).await.unwrap()
}

fn who(e: &pb::ChannelEvent) -> (K, String, String, u32) {
    let m = e.member.clone().unwrap_or_default();
    (channel_kind(e), m.user_id, m.device_id, e.occupancy)
}

fn ev(kind: K, user: &str, device: &str, occupancy: u32) -> (K, String, String, u32) {
    (kind, user.into(), device.into(), occupancy)
}

#[tokio::test]
async fn join_and_leave_announce_members_and_users_with_occupancy() {
    let broker = start(quiet).await;
    let mut bob = connect(&broker, "bob").await;
    let r = within(bob.join("room", &[])).await.unwrap();
    assert_eq!((r.occupancy, r.changed), (1, true));
    let carol_phone = connect_device(&broker, "carol", "phone").await;
    let carol_web = connect_device(&broker, "carol", "web").await;

    let r = within(carol_phone.join("room", &[("seat", "3")]))
        .await
        .unwrap();
    assert_eq!(r.occupancy, 2);
    let join = next(&mut bob).await;
    assert_eq!(who(&join), ev(K::Join, "carol", "phone", 2));
    assert_eq!(
        join.member.as_ref().unwrap().state["seat"],
        "3",
        "initial state is announced"
    );
    assert!(join.member.unwrap().joined_at_ms > 0);
    assert_eq!(
        who(&next(&mut bob).await),
        ev(K::Online, "carol", "phone", 2)
    );

    // A second device of the same user: a member event, but the user was already here.
    within(carol_web.join("room", &[])).await.unwrap();
    assert_eq!(who(&next(&mut bob).await), ev(K::Join, "carol", "web", 2));
    let again = within(carol_web.join("room", &[])).await.unwrap();
    assert!(!again.changed, "joining twice changes nothing");

    within(carol_phone.leave("room")).await.unwrap();
    assert_eq!(
        who(&next(&mut bob).await),
        ev(K::Leave, "carol", "phone", 2)
    );
    let r = within(carol_web.leave("room")).await.unwrap();
    assert_eq!((r.occupancy, r.changed), (1, true));
    assert_eq!(who(&next(&mut bob).await), ev(K::Leave, "carol", "web", 1));
    assert_eq!(
        who(&next(&mut bob).await),
        ev(K::Offline, "carol", "web", 1)
    );
    let r = within(carol_web.leave("room")).await.unwrap();
    assert!(
        !r.changed,
        "leaving a channel you are not in is not an error"
    );
}

#[tokio::test]
async fn watchers_see_events_without_being_members() {
    let broker = start(quiet).await;
    let mut watcher = connect(&broker, "watcher").await;
    let r = within(watcher.watch_channel("room")).await.unwrap();
    assert_eq!(r.occupancy, 0);
    let alice = connect(&broker, "alice").await;
    within(alice.join("room", &[])).await.unwrap();
    assert_eq!(
        who(&next(&mut watcher).await),
        ev(K::Join, "alice", "phone", 1)
    );
    assert_eq!(
        who(&next(&mut watcher).await),
        ev(K::Online, "alice", "phone", 1)
    );
    let page = within(watcher.who_now("room", WhoNowMode::Ids, "", 0))
        .await
        .unwrap();
    assert_eq!(page.members.len(), 1, "watchers are not members");
    assert!(within(watcher.where_now("")).await.unwrap().is_empty());

    within(watcher.unwatch_channel("room")).await.unwrap();
    within(watcher.watch_channel("other")).await.unwrap();
    within(alice.leave("room")).await.unwrap();
    within(alice.join("other", &[])).await.unwrap();
    let e = next(&mut watcher).await;
    assert_eq!(
        e.channel, "other",
        "nothing from the unwatched channel came first"
    );
}

#[tokio::test]
async fn a_lost_connection_times_out_a_disconnect_leaves() {
    let broker = start(|c| {
        quiet(c);
        c.session.grace_period_ms = 200;
    })
    .await;
    let mut bob = connect(&broker, "bob").await;
    within(bob.watch_channel("room")).await.unwrap();
    let carol = connect(&broker, "carol").await;
    within(carol.join("room", &[])).await.unwrap();
    next(&mut bob).await;
    next(&mut bob).await;
    drop(carol);
    assert_eq!(
        who(&next(&mut bob).await),
        ev(K::Timeout, "carol", "phone", 0)
    );
    assert_eq!(
        who(&next(&mut bob).await),
        ev(K::Offline, "carol", "phone", 0)
    );

    let dave = connect(&broker, "dave").await;
    within(dave.join("room", &[])).await.unwrap();
    next(&mut bob).await;
    next(&mut bob).await;
    within(dave.disconnect()).await.unwrap();
    assert_eq!(who(&next(&mut bob).await), ev(K::Leave, "dave", "phone", 0));
    assert_eq!(
        broker.registry.channel_counts().0,
        0,
        "an empty channel holds no memory"
    );
}

#[tokio::test]
async fn membership_survives_a_reconnect_within_the_grace_period() {
    let broker = start(|c| {
        quiet(c);
        c.session.grace_period_ms = 60_000;
    })
    .await;
    let mut bob = connect(&broker, "bob").await;
    within(bob.watch_channel("room")).await.unwrap();
    let carol = connect(&broker, "carol").await;
    within(carol.join("room", &[("mood", "ok")])).await.unwrap();
    next(&mut bob).await;
    next(&mut bob).await;
    drop(carol);
    let carol = connect(&broker, "carol").await;
    assert_eq!(within(carol.where_now("")).await.unwrap(), ["room"]);
    let r = within(carol.set_channel_state("room", &[("mood", "great")], false))
        .await
        .unwrap();
    assert_eq!(r.members[0].state["mood"], "great");
    let e = next(&mut bob).await;
    assert_eq!(
        who(&e),
        ev(K::StateChanged, "carol", "phone", 1),
        "no TIMEOUT or JOIN in between"
    );
}

#[tokio::test]
async fn who_now_counts_lists_and_pages_stably_under_churn() {
    let broker = start(quiet).await;
    let observer = connect(&broker, "observer").await;
    let mut members = BTreeMap::new();
    for i in 0..120 {
        let id = format!("m{i:03}");
        let c = connect(&broker, &id).await;
        within(c.join("hall", &[("n", &i.to_string())]))
            .await
            .unwrap();
        members.insert(id, c);
    }
    let count = within(observer.who_now("hall", WhoNowMode::Count, "", 0))
        .await
        .unwrap();
    assert_eq!((count.occupancy, count.member_count), (120, 120));
    assert!(count.members.is_empty() && count.next_cursor.is_empty());

    let with_state = within(observer.who_now("hall", WhoNowMode::IdsAndState, "", 5))
        .await
        .unwrap();
    assert_eq!(with_state.members[0].user_id, "m000");
    assert_eq!(with_state.members[0].state["n"], "0");
    let ids = within(observer.who_now("hall", WhoNowMode::Ids, "", 5))
        .await
        .unwrap();
    assert!(ids.members[0].state.is_empty(), "ids mode carries no state");

    let first = within(observer.who_now("hall", WhoNowMode::Ids, "", 40))
        .await
        .unwrap();
    let mut seen: Vec<String> = first.members.iter().map(|m| m.user_id.clone()).collect();
    // Churn between pages: some seen and some unseen members leave, newcomers arrive.
    let leaving = ["m005", "m010", "m050", "m090", "m119"];
    for id in leaving {
        within(members[id].leave("hall")).await.unwrap();
    }
    for id in ["m000a", "m060a", "zzz"] {
        let c = connect(&broker, id).await;
        within(c.join("hall", &[])).await.unwrap();
        members.insert(id.to_string(), c);
    }
    let mut cursor = first.next_cursor.clone();
    while !cursor.is_empty() {
        let page = within(observer.who_now("hall", WhoNowMode::Ids, &cursor, 40))
            .await
            .unwrap();
        seen.extend(page.members.iter().map(|m| m.user_id.clone()));
        cursor = page.next_cursor;
    }
    let stayers: BTreeSet<String> = (0..120)
        .map(|i| format!("m{i:03}"))
        .filter(|id| !leaving.contains(&id.as_str()))
        .collect();
    for id in &stayers {
        assert_eq!(
            seen.iter().filter(|s| *s == id).count(),
            1,
            "{id} seen exactly once"
        );
    }
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(seen, sorted, "pages come in member order");
}

#[tokio::test]
async fn where_now_lists_every_channel_of_every_device() {
    let broker = start(quiet).await;
    let phone = connect_device(&broker, "alice", "phone").await;
    let web = connect_device(&broker, "alice", "web").await;
    within(phone.join("b-room", &[])).await.unwrap();
    within(web.join("a-room", &[])).await.unwrap();
    within(web.join("b-room", &[])).await.unwrap();
    let bob = connect(&broker, "bob").await;
    assert_eq!(
        within(bob.where_now("alice")).await.unwrap(),
        ["a-room", "b-room"]
    );
    assert!(within(bob.where_now("nobody")).await.unwrap().is_empty());
}

#[tokio::test]
async fn member_state_set_get_remove_and_vanish_on_leave() {
    let broker = start(quiet).await;
    let mut bob = connect(&broker, "bob").await;
    within(bob.join("room", &[])).await.unwrap();
    let mut watcher = connect(&broker, "watcher").await;
    within(watcher.watch_channel("room")).await.unwrap();
    let alice = connect(&broker, "alice").await;
    within(alice.join("room", &[("a", "1")])).await.unwrap();
    for c in [&mut bob, &mut watcher] {
        next(c).await;
        next(c).await;
    }
    let r = within(alice.set_channel_state("room", &[("b", "2"), ("a", "")], false))
        .await
        .unwrap();
    assert_eq!(
        r.members[0].state,
        BTreeMap::from([("b".to_string(), "2".to_string())])
    );
    for c in [&mut bob, &mut watcher] {
        let e = next(c).await;
        assert_eq!(channel_kind(&e), K::StateChanged);
        assert_eq!(e.member.unwrap().state["b"], "2");
    }
    let got = within(bob.get_channel_state("room", "alice"))
        .await
        .unwrap();
    assert_eq!(got.members.len(), 1);
    assert_eq!(got.members[0].state["b"], "2");
    within(alice.set_channel_state("room", &[("c", "3")], false))
        .await
        .unwrap();
    let r = within(alice.remove_channel_state("room", &["b"]))
        .await
        .unwrap();
    assert_eq!(r.members[0].state.keys().collect::<Vec<_>>(), ["c"]);
    let r = within(alice.remove_channel_state("room", &[]))
        .await
        .unwrap();
    assert!(r.members[0].state.is_empty());

    let too_many: Vec<(String, String)> = (0..33).map(|i| (format!("k{i}"), "v".into())).collect();
    let refs: Vec<(&str, &str)> = too_many
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    for (state, what) in [
        (refs.clone(), "33 pairs"),
        (vec![("k", &*"v".repeat(257))], "long value"),
        (vec![(&*"k".repeat(65), "v")], "long key"),
    ] {
        let e = server_error(within(alice.set_channel_state("room", &state, false)).await);
        assert_eq!(code(&e), pb::ErrorCode::LimitExceeded, "{what}");
        assert_eq!(e.operation, "set_channel_state");
    }
    let e = server_error(within(alice.join("hall", &refs)).await);
    assert_eq!(code(&e), pb::ErrorCode::LimitExceeded);
    let e = server_error(within(alice.set_channel_state("elsewhere", &[("a", "1")], false)).await);
    assert_eq!(code(&e), pb::ErrorCode::NotMember);

    within(alice.leave("room")).await.unwrap();
    let r = within(alice.join("room", &[])).await.unwrap();
    assert!(r.state.is_empty(), "state vanished with the membership");
    assert!(within(bob.get_channel_state("room", "alice"))
        .await
        .unwrap()
        .members[0]
        .state
        .is_empty());
}

#[tokio::test]
async fn channel_limits_and_bad_input() {
    let broker = start(|c| {
        quiet(c);
        c.channels.max_joined_per_connection = 3;
        c.channels.max_watched_per_connection = 2;
    })
    .await;
    let alice = connect(&broker, "alice").await;
    for ch in ["a", "b", "c"] {
        within(alice.join(ch, &[])).await.unwrap();
    }
    let e = server_error(within(alice.join("d", &[])).await);
    assert_eq!(code(&e), pb::ErrorCode::LimitExceeded);
    assert_eq!(e.operation, "join_channel");
    within(alice.watch_channel("x")).await.unwrap();
    within(alice.watch_channel("y")).await.unwrap();
    let e = server_error(within(alice.watch_channel("z")).await);
    assert_eq!(code(&e), pb::ErrorCode::LimitExceeded);

    let empty = within(alice.who_now("no-such-channel", WhoNowMode::IdsAndState, "", 0))
        .await
        .unwrap();
    assert_eq!(
        (empty.occupancy, empty.members.len()),
        (0, 0),
        "unknown channel: empty, not an error"
    );
    let e = server_error(within(alice.who_now("a", WhoNowMode::Ids, "garbage!", 0)).await);
    assert_eq!(code(&e), pb::ErrorCode::BadCursor);
    let subscription_cursor = {
        let bob = connect(&broker, "bob").await;
        for chunk in [["u1", "u2"], ["u3", "u4"]] {
            within(bob.subscribe(&chunk)).await.unwrap();
        }
        within(bob.list_subscriptions("", 1))
            .await
            .unwrap()
            .next_cursor
    };
    let e =
        server_error(within(alice.who_now("a", WhoNowMode::Ids, &subscription_cursor, 0)).await);
    assert_eq!(
        code(&e),
        pb::ErrorCode::BadCursor,
        "a cursor of another kind is refused"
    );
    let e = server_error(within(alice.who_now("a", WhoNowMode::Ids, "", 101)).await);
    assert_eq!(code(&e), pb::ErrorCode::LimitExceeded);
    for bad in ["", "bad\u{1}id", &"c".repeat(129)] {
        let e = server_error(within(alice.join(bad, &[])).await);
        assert_eq!(code(&e), pb::ErrorCode::BadRequest, "{bad:?}");
    }
    within(alice.ping()).await.unwrap();
}

#[tokio::test]
async fn large_channels_batch_events_into_intervals() {
    let broker = start(|c| {
        c.channels.announce_threshold = 3;
        c.channels.interval_ms = 100;
    })
    .await;
    let mut watcher = connect(&broker, "watcher").await;
    within(watcher.watch_channel("lobby")).await.unwrap();
    let mut clients = Vec::new();
    for i in 0..6 {
        let c = connect(&broker, &format!("p{i}")).await;
        within(c.join("lobby", &[])).await.unwrap();
        clients.push(c);
    }
    within(clients[0].set_channel_state("lobby", &[("ready", "yes")], false))
        .await
        .unwrap();
    let mut joined = BTreeSet::new();
    let mut intervals = 0;
    let mut state_changes = Vec::new();
    while joined.len() < 6 || state_changes.is_empty() {
        let e = next(&mut watcher).await;
        match channel_kind(&e) {
            K::Join => {
                joined.insert(e.member.unwrap().user_id);
            }
            K::Interval => {
                intervals += 1;
                let batch = e.interval.unwrap();
                joined.extend(batch.joins.into_iter().map(|m| m.user_id));
                state_changes.extend(batch.state_changes);
                assert_eq!(e.occupancy, 6);
            }
            K::Online => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(intervals >= 1, "events above the threshold were batched");
    assert_eq!(state_changes[0].state["ready"], "yes");
    // Departures are batched too, and the last one empties the channel and its memory.
    for c in clients.drain(..) {
        within(c.disconnect()).await.unwrap();
    }
    let mut left = BTreeSet::new();
    while left.len() < 6 {
        let e = next(&mut watcher).await;
        match channel_kind(&e) {
            K::Leave => {
                left.insert(e.member.unwrap().user_id);
            }
            K::Interval => left.extend(e.interval.unwrap().leaves.into_iter().map(|m| m.user_id)),
            _ => {}
        }
    }
    assert_eq!(broker.registry.channel_counts().0, 0);
}

#[tokio::test]
async fn a_member_toggling_join_and_leave_is_coalesced_per_interval() {
    let broker = start(|c| {
        c.channels.announce_threshold = 3;
        c.channels.interval_ms = 200;
        c.limits.request_rate_per_sec = 100_000;
        c.limits.request_burst = 100_000;
    })
    .await;
    let mut watcher = connect(&broker, "watcher").await;
    within(watcher.watch_channel("lobby")).await.unwrap();
    let mut members = Vec::new();
    for i in 0..4 {
        let c = connect(&broker, &format!("m{i}")).await;
        within(c.join("lobby", &[])).await.unwrap();
        members.push(c);
    }
    // Two devices of one user join and leave over and over, with the largest state allowed.
    let state: Vec<(String, String)> = (0..32)
        .map(|i| (format!("{i:0>64}"), "v".repeat(256)))
        .collect();
    let state: Vec<(&str, &str)> = state
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let a = connect_device(&broker, "toggler", "a").await;
    let b = connect_device(&broker, "toggler", "b").await;
    for _ in 0..100 {
        for c in [&a, &b] {
            within(c.join("lobby", &state)).await.unwrap();
            within(c.leave("lobby")).await.unwrap();
        }
    }
    within(a.join("lobby", &state)).await.unwrap();
    // Every INTERVAL lists each toggling device at most once, leaves carry no state, and the
    // final one shows device a joined.
    let mut a_joined = false;
    while !a_joined {
        let e = next(&mut watcher).await;
        if channel_kind(&e) != K::Interval {
            continue;
        }
        let batch = e.interval.unwrap();
        assert!(!batch.here_now_refresh);
        let entries = batch.joins.len()
            + batch.leaves.len()
            + batch.timeouts.len()
            + batch.state_changes.len();
        assert!(entries <= 2, "{entries} entries for two devices");
        assert!(batch.leaves.iter().all(|m| m.state.is_empty()));
        a_joined = batch
            .joins
            .iter()
            .chain(&batch.state_changes)
            .any(|m| m.user_id == "toggler" && m.device_id == "a");
    }
}
