//! Privacy (SPEC §13) through real sockets: invisible mode and blocking, on every path a
//! watcher has (events, GetPresence, Subscribe replies, Resume, directed presence), durable
//! across a restart. A hidden user must look exactly like a user who went offline and never
//! changed. "Receives nothing" is shown with a marker: a visible user changes after the hidden
//! one, and the watcher's next event is the marker's.

mod common;

use common::*;
use presenced::client::Client;
use presenced::pb::{self, EventKind};

fn status(s: &str) -> pb::SetPresence {
    pb::SetPresence {
        status: Some(s.into()),
        ..Default::default()
    }
}

/// The watcher's next presence event must be `marker`'s: nothing else arrived before it.
async fn next_is_marker(watcher: &mut Client, marker: &Client, text: &str) {
    within(marker.set_presence(status(text))).await.unwrap();
    let e = within(watcher.next_presence_event()).await.unwrap();
    assert_eq!(
        (
            e.user_id.as_str(),
            e.presence.as_ref().unwrap().status.as_str()
        ),
        ("marker", text),
        "something arrived before the marker: {e:?}"
    );
}

async fn get(client: &Client, user: &str) -> pb::Presence {
    within(client.get_presence(&[user]))
        .await
        .unwrap()
        .remove(0)
}

fn is_frozen_offline(p: &pb::Presence) -> bool {
    availability(p) == pb::Availability::Offline
        && p.status.is_empty()
        && p.state.is_empty()
        && p.devices.is_empty()
        && p.user_data.is_empty()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invisible_user_looks_offline_to_everyone_else_and_comes_back_online() {
    let broker = start(|_| {}).await;
    let alice = connect_device(&broker, "alice", "phone").await;
    let mut tablet = connect_device(&broker, "alice", "tablet").await;
    let marker = connect(&broker, "marker").await;
    let mut w = connect(&broker, "w").await;
    within(w.subscribe(&["alice", "marker"])).await.unwrap();
    within(alice.set_presence(status("here"))).await.unwrap();
    presence_event_of(&mut w, "alice", EventKind::Update).await;
    let _ = presence_event_of(&mut tablet, "alice", EventKind::Update).await;

    let result = within(alice.set_invisible(true)).await.unwrap();
    assert!(result.invisible);
    assert_eq!(
        availability(result.presence.as_ref().unwrap()),
        pb::Availability::Online,
        "the user's own view is the truth"
    );
    let gone = presence_event_of(&mut w, "alice", EventKind::Offline).await;
    assert_eq!(reason(&gone), pb::OfflineReason::Disconnect);
    let shown = get(&w, "alice").await;
    assert!(is_frozen_offline(&shown), "{shown:?}");
    assert!(shown.last_seen_ms > 0);
    assert_eq!(shown.version, gone.version);

    // Changes while invisible reach the user's own devices, never the watcher.
    within(alice.set_presence(status("secret"))).await.unwrap();
    let own = presence_event_of(&mut tablet, "alice", EventKind::Update).await;
    assert_eq!(own.presence.unwrap().status, "secret");
    next_is_marker(&mut w, &marker, "m1").await;
    assert_eq!(get(&w, "alice").await, shown, "nothing moved");
    // A new watcher's Subscribe reply shows the same frozen offline user.
    let late = connect(&broker, "late").await;
    let reply = within(late.subscribe(&["alice"])).await.unwrap();
    assert_eq!(reply.presences[0], shown);

    // Going offline and coming back while invisible: nothing for watchers, and last-seen
    // does not move.
    drop(tablet);
    alice.disconnect().await.unwrap();
    let alice = connect_device(&broker, "alice", "phone").await;
    alice.disconnect().await.unwrap();
    next_is_marker(&mut w, &marker, "m2").await;
    assert_eq!(get(&w, "alice").await, shown);

    // Visible again while offline: still the last-seen of when she went invisible, at a
    // higher version; visible and online: ONLINE.
    let alice = connect_device(&broker, "alice", "phone").await;
    within(alice.set_invisible(true)).await.unwrap();
    alice.disconnect().await.unwrap();
    let alice2 = connect_device(&broker, "alice", "laptop").await;
    within(alice2.set_invisible(false)).await.unwrap();
    let back = presence_event_of(&mut w, "alice", EventKind::Online).await;
    assert!(back.version > shown.version);
    assert_eq!(
        availability(back.presence.as_ref().unwrap()),
        pb::Availability::Online
    );
    alice2.disconnect().await.unwrap();
    let offline = presence_event_of(&mut w, "alice", EventKind::Offline).await;
    assert!(offline.presence.unwrap().last_seen_ms >= shown.last_seen_ms);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_seen_stays_where_invisibility_began() {
    let broker = start(|_| {}).await;
    let mut w = connect(&broker, "w").await;
    within(w.subscribe(&["alice"])).await.unwrap();
    let alice = connect_device(&broker, "alice", "phone").await;
    presence_event_of(&mut w, "alice", EventKind::Online).await;
    within(alice.set_invisible(true)).await.unwrap();
    let hidden = presence_event_of(&mut w, "alice", EventKind::Offline).await;
    let seen = hidden.presence.unwrap().last_seen_ms;
    alice.disconnect().await.unwrap();
    // Another session comes and goes while invisible: the truth's last-seen moves, the shown
    // one does not.
    let other = connect_device(&broker, "alice", "tablet").await;
    other.disconnect().await.unwrap();
    // Still invisible: the watcher saw nothing and the last-seen is where it was.
    let now = get(&w, "alice").await;
    assert_eq!(now.last_seen_ms, seen);
    assert_eq!(now.version, hidden.version);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_user_sees_the_blocker_frozen_offline_on_every_path() {
    let broker = start(|_| {}).await;
    let a = connect(&broker, "a").await;
    let marker = connect(&broker, "marker").await;
    let mut b = connect(&broker, "b").await;
    let mut a_watch = connect_device(&broker, "a", "watcher").await;
    within(b.subscribe(&["a", "marker"])).await.unwrap();
    within(a_watch.subscribe(&["b", "marker"])).await.unwrap();
    within(a.set_presence(status("hello"))).await.unwrap();
    presence_event_of(&mut b, "a", EventKind::Update).await;

    let result = within(a.block(&["b"])).await.unwrap();
    assert_eq!((result.changed, result.total), (1, 1));
    let gone = presence_event_of(&mut b, "a", EventKind::Offline).await;
    assert_eq!(reason(&gone), pb::OfflineReason::Disconnect);
    // Blocking hides both ways: the blocker's watcher device sees b go offline too.
    presence_event_of(&mut a_watch, "b", EventKind::Offline).await;
    let frozen = get(&b, "a").await;
    assert!(is_frozen_offline(&frozen), "{frozen:?}");

    // a's changes never reach b; a new subscription answers the frozen view.
    within(a.set_presence(status("private"))).await.unwrap();
    next_is_marker(&mut b, &marker, "m1").await;
    let again = within(b.subscribe(&["a"])).await.unwrap();
    assert_eq!(again.presences[0], frozen);
    // b still lists the subscription: nothing says "blocked".
    let subs = within(b.list_subscriptions("", 0)).await.unwrap();
    assert!(subs.subscriptions.iter().any(|s| s.user_id == "a"));
    // A resume shows the frozen view too.
    let (changed, _) = within(b.resume(&[("a".into(), 1), ("marker".into(), 1)]))
        .await
        .unwrap();
    let resumed = changed.iter().find(|e| e.user_id == "a").unwrap();
    assert_eq!(resumed.presence.as_ref().unwrap(), &frozen);

    // Directed presence passes neither way, and the replies do not list the other side.
    let delivered = within(b.direct(&["a", "marker"], status("psst")))
        .await
        .unwrap();
    assert_eq!(delivered, ["marker"]);
    let delivered = within(a.direct(&["b"], status("psst"))).await.unwrap();
    assert!(delivered.is_empty());
    next_is_marker(&mut b, &marker, "m2").await;

    // Unblocked: b sees a online again, at a version above the frozen one.
    within(a.unblock(&["b"])).await.unwrap();
    let back = presence_event_of(&mut b, "a", EventKind::Online).await;
    assert!(back.version > frozen.version);
    assert_eq!(back.presence.unwrap().status, "private");
}

#[tokio::test]
async fn block_lists_are_paged_capped_and_checked() {
    let broker = start(|c| c.privacy.max_blocked = 5).await;
    let a = connect(&broker, "a").await;
    within(a.block(&["u1", "u2", "u3"])).await.unwrap();
    let repeat = within(a.block(&["u1", "u4"])).await.unwrap();
    assert_eq!((repeat.changed, repeat.total), (1, 4));
    let page = within(a.list_blocked("", 3)).await.unwrap();
    let ids: Vec<&str> = page.blocked.iter().map(|b| b.user_id.as_str()).collect();
    assert_eq!((ids, page.total), (vec!["u1", "u2", "u3"], 4));
    assert!(page.blocked[0].since_ms > 0);
    let rest = within(a.list_blocked(&page.next_cursor, 3)).await.unwrap();
    assert_eq!(rest.blocked.len(), 1);
    assert!(rest.next_cursor.is_empty());

    let over = server_error(within(a.block(&["u5", "u6"])).await);
    assert_eq!(code(&over), pb::ErrorCode::LimitExceeded);
    assert!(over.reason.contains("max_blocked"), "{}", over.reason);
    assert_eq!(
        within(a.list_blocked("", 10)).await.unwrap().total,
        4,
        "nothing applied"
    );
    let me = server_error(within(a.block(&["a"])).await);
    assert_eq!(code(&me), pb::ErrorCode::BadRequest);
    let none = server_error(within(a.block(&[])).await);
    assert_eq!(code(&none), pb::ErrorCode::BadRequest);
    let unblocked = within(a.unblock(&["u1", "nobody"])).await.unwrap();
    assert_eq!((unblocked.changed, unblocked.total), (1, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_and_invisibility_survive_a_restart() {
    let broker = start(|_| {}).await;
    let a = connect(&broker, "a").await;
    within(a.block(&["b"])).await.unwrap();
    within(a.set_invisible(true)).await.unwrap();
    drop(a);
    let data = broker.stop_keeping_data().await;
    let broker = start_in(data, |_| {}).await;
    let a = connect(&broker, "a").await;
    let blocked = within(a.list_blocked("", 0)).await.unwrap();
    assert_eq!(blocked.total, 1);
    let w = connect(&broker, "w").await;
    let shown = get(&w, "a").await;
    assert_eq!(
        availability(&shown),
        pb::Availability::Offline,
        "still invisible"
    );
    let b = connect(&broker, "b").await;
    assert!(within(b.direct(&["a"], status("hi")))
        .await
        .unwrap()
        .is_empty());
    let visible = within(a.set_invisible(false)).await.unwrap();
    assert!(!visible.invisible);
    assert_eq!(availability(&get(&w, "a").await), pb::Availability::Online);
    assert_eq!(
        availability(&get(&b, "a").await),
        pb::Availability::Offline,
        "still blocked"
    );
}

/// The next channel event `client` receives, as (channel, kind, user, occupancy).
async fn next_channel(client: &mut Client) -> (String, pb::ChannelEventKind, String, u32) {
    let e = within(client.next_channel_event()).await.unwrap();
    let user = e
        .member
        .as_ref()
        .map_or(String::new(), |m| m.user_id.clone());
    (e.channel.clone(), channel_kind(&e), user, e.occupancy)
}

/// `client`'s next channel event must be the marker's state change in `channel`.
async fn next_channel_is_marker(client: &mut Client, marker: &Client, channel: &str, text: &str) {
    within(marker.set_channel_state(channel, &[("mark", text)], false))
        .await
        .unwrap();
    let e = within(client.next_channel_event()).await.unwrap();
    let m = e.member.as_ref().expect("a member event");
    assert_eq!(
        (e.channel.as_str(), m.user_id.as_str(), m.state.get("mark")),
        (channel, "marker", Some(&text.to_string())),
        "something arrived before the marker: {e:?}"
    );
}

fn member_ids(page: &pb::WhoNowResult) -> Vec<&str> {
    page.members.iter().map(|m| m.user_id.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invisible_member_leaves_every_room_for_everyone_else() {
    let broker = start(|c| c.channels.announce_threshold = 10_000).await;
    let mut w = connect(&broker, "w").await;
    within(w.join("room", &[])).await.unwrap();
    within(w.join("hall", &[])).await.unwrap();
    let marker = connect(&broker, "marker").await;
    within(marker.join("room", &[])).await.unwrap();
    within(marker.join("hall", &[])).await.unwrap();
    let alice = connect(&broker, "alice").await;
    within(alice.join("room", &[("mood", "ok")])).await.unwrap();
    // w: marker JOIN, ONLINE (room), JOIN, ONLINE (hall), alice JOIN, ONLINE (room).
    for _ in 0..6 {
        next_channel(&mut w).await;
    }

    within(alice.set_invisible(true)).await.unwrap();
    assert_eq!(
        next_channel(&mut w).await,
        (
            "room".into(),
            pb::ChannelEventKind::Leave,
            "alice".into(),
            2
        )
    );
    assert_eq!(
        next_channel(&mut w).await,
        (
            "room".into(),
            pb::ChannelEventKind::Offline,
            "alice".into(),
            2
        )
    );

    // Every query w has shows a room without her.
    let page = within(w.who_now("room", pb::WhoNowMode::IdsAndState, "", 10))
        .await
        .unwrap();
    assert_eq!(
        (member_ids(&page), page.occupancy, page.member_count),
        (vec!["marker", "w"], 2, 2)
    );
    assert!(within(w.where_now("alice")).await.unwrap().is_empty());
    let state = within(w.get_channel_state("room", "alice")).await.unwrap();
    assert!(state.members.is_empty(), "{state:?}");
    // She sees herself.
    let own = within(alice.who_now("room", pb::WhoNowMode::Ids, "", 10))
        .await
        .unwrap();
    assert_eq!(
        (member_ids(&own), own.occupancy),
        (vec!["alice", "marker", "w"], 3)
    );
    assert_eq!(within(alice.where_now("alice")).await.unwrap(), ["room"]);
    // Joining, changing state and leaving while invisible: nothing reaches w; a join reply's
    // occupancy counts only who w would be shown.
    within(alice.join("hall", &[("mood", "hidden")]))
        .await
        .unwrap();
    within(alice.set_channel_state("room", &[("mood", "busy")], false))
        .await
        .unwrap();
    next_channel_is_marker(&mut w, &marker, "room", "m1").await;
    within(w.leave("hall")).await.unwrap();
    let rejoined = within(w.join("hall", &[])).await.unwrap();
    assert_eq!(rejoined.occupancy, 2, "{rejoined:?}");
    next_channel_is_marker(&mut w, &marker, "hall", "m2").await;

    // Visible again: she arrives in both rooms with her current state.
    within(alice.set_invisible(false)).await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..4 {
        let e = within(w.next_channel_event()).await.unwrap();
        let m = e.member.clone().unwrap();
        assert_eq!(m.user_id, "alice");
        assert_eq!(e.occupancy, 3);
        seen.push((
            e.channel.clone(),
            channel_kind(&e),
            m.state.get("mood").cloned(),
        ));
    }
    seen.sort();
    assert_eq!(
        seen,
        vec![
            (
                "hall".into(),
                pb::ChannelEventKind::Join,
                Some("hidden".into())
            ),
            ("hall".into(), pb::ChannelEventKind::Online, None),
            (
                "room".into(),
                pb::ChannelEventKind::Join,
                Some("busy".into())
            ),
            ("room".into(), pb::ChannelEventKind::Online, None),
        ]
    );
    let page = within(w.who_now("room", pb::WhoNowMode::Ids, "", 10))
        .await
        .unwrap();
    assert_eq!(member_ids(&page), ["alice", "marker", "w"]);
    assert_eq!(
        within(w.where_now("alice")).await.unwrap(),
        ["hall", "room"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_members_do_not_see_each_other_in_a_room() {
    let broker = start(|c| c.channels.announce_threshold = 10_000).await;
    let marker = connect(&broker, "marker").await;
    within(marker.join("room", &[])).await.unwrap();
    let a = connect(&broker, "a").await;
    within(a.join("room", &[])).await.unwrap();
    let mut b = connect(&broker, "b").await;
    within(b.join("room", &[])).await.unwrap();
    within(a.block(&["b"])).await.unwrap();
    // b sees a leave; a's own sessions see b leave (blocking hides both ways).
    assert_eq!(
        next_channel(&mut b).await,
        ("room".into(), pb::ChannelEventKind::Leave, "a".into(), 2)
    );
    assert_eq!(
        next_channel(&mut b).await,
        ("room".into(), pb::ChannelEventKind::Offline, "a".into(), 2)
    );
    for (viewer, other) in [(&b, "a"), (&a, "b")] {
        let page = within(viewer.who_now("room", pb::WhoNowMode::Ids, "", 1))
            .await
            .unwrap();
        // Paging skips the hidden member: two pages of one, then the end.
        let rest = within(viewer.who_now("room", pb::WhoNowMode::Ids, &page.next_cursor, 1))
            .await
            .unwrap();
        let mut ids = member_ids(&page);
        ids.extend(member_ids(&rest));
        assert!(!ids.contains(&other), "{ids:?}");
        assert_eq!((ids.len(), page.occupancy), (2, 2));
        assert!(rest.next_cursor.is_empty());
    }
    within(a.set_channel_state("room", &[("k", "v")], false))
        .await
        .unwrap();
    within(a.leave("room")).await.unwrap();
    next_channel_is_marker(&mut b, &marker, "room", "m1").await;
    within(a.join("room", &[])).await.unwrap();
    next_channel_is_marker(&mut b, &marker, "room", "m2").await;
    within(a.unblock(&["b"])).await.unwrap();
    assert_eq!(
        next_channel(&mut b).await,
        ("room".into(), pb::ChannelEventKind::Join, "a".into(), 3)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interval_batches_leave_hidden_members_out() {
    // Above the threshold with the two members everyone sees (hidden ones do not count).
    let broker = start(|c| {
        c.channels.announce_threshold = 1;
        c.channels.interval_ms = 50;
    })
    .await;
    let mut w = connect(&broker, "w").await;
    within(w.join("room", &[])).await.unwrap();
    let x = connect(&broker, "x").await;
    within(x.join("room", &[])).await.unwrap();
    let alice = connect(&broker, "alice").await;
    within(alice.join("room", &[])).await.unwrap();
    within(alice.set_invisible(true)).await.unwrap();
    // Whatever was batched before is flushed first; then she leaves, event by event.
    loop {
        let e = within(w.next_channel_event()).await.unwrap();
        if channel_kind(&e) == pb::ChannelEventKind::Offline {
            assert_eq!(e.member.unwrap().user_id, "alice");
            break;
        }
    }
    let mut rounds = 0;
    let mut x_seen = false;
    while !x_seen {
        rounds += 1;
        assert!(rounds <= 200, "x's change never arrived in an interval");
        within(alice.set_channel_state("room", &[("n", &rounds.to_string())], false))
            .await
            .unwrap();
        within(x.set_channel_state("room", &[("n", &rounds.to_string())], false))
            .await
            .unwrap();
        let e = within(w.next_channel_event()).await.unwrap();
        let batch = e.interval.as_ref().expect("an INTERVAL event");
        let listed: Vec<&str> = batch
            .joins
            .iter()
            .chain(&batch.leaves)
            .chain(&batch.timeouts)
            .chain(&batch.state_changes)
            .map(|m| m.user_id.as_str())
            .collect();
        assert!(!listed.contains(&"alice"), "{e:?}");
        assert_eq!(e.occupancy, 2, "{e:?}");
        x_seen = listed.contains(&"x");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approved_audience_asks_before_anyone_watches() {
    let broker = start(|_| {}).await;
    let mut alice = connect(&broker, "alice").await;
    within(alice.set_presence(status("hi"))).await.unwrap();
    let marker = connect(&broker, "marker").await;
    let mut w = connect(&broker, "w").await;
    within(w.subscribe(&["alice", "marker"])).await.unwrap();

    let settings = within(alice.set_privacy(pb::Audience::Approved, pb::Audience::Unspecified))
        .await
        .unwrap();
    assert_eq!(settings.presence_audience(), pb::Audience::Approved);
    assert_eq!(settings.last_seen_audience(), pb::Audience::Everyone);
    // A watcher she never approved sees her leave.
    let gone = presence_event_of(&mut w, "alice", EventKind::Offline).await;
    assert_eq!(reason(&gone), pb::OfflineReason::Disconnect);
    let frozen = get(&w, "alice").await;
    assert!(is_frozen_offline(&frozen), "{frozen:?}");

    // Subscribing asks her; the reply is the same frozen offline user.
    let reply = within(w.subscribe(&["alice"])).await.unwrap();
    assert_eq!(reply.presences[0], frozen);
    let request = within(alice.next_subscription_request()).await.unwrap();
    assert_eq!(request.requester_id, "w");
    assert!(request.requested_at_ms > 0);
    let pending = within(alice.list_approvals(pb::ApprovalState::Pending, "", 0))
        .await
        .unwrap();
    assert_eq!(pending.total, 1);
    assert_eq!(pending.approvals[0].user_id, "w");
    assert_eq!(pending.approvals[0].state(), pb::ApprovalState::Pending);

    // Approved: w is told, and sees her online with her status.
    let changed = within(alice.set_approval(&["w"], pb::ApprovalAction::Approve))
        .await
        .unwrap();
    assert_eq!(changed, 1);
    let accepted = within(w.next_subscription_accepted()).await.unwrap();
    assert_eq!(accepted.user_id, "alice");
    assert_eq!(
        availability(accepted.presence.as_ref().unwrap()),
        pb::Availability::Online
    );
    let back = presence_event_of(&mut w, "alice", EventKind::Online).await;
    assert!(back.version > frozen.version);
    assert_eq!(back.presence.unwrap().status, "hi");
    within(alice.set_presence(status("later"))).await.unwrap();
    let update = presence_event_of(&mut w, "alice", EventKind::Update).await;
    assert_eq!(update.presence.unwrap().status, "later");

    // A stranger asks and is denied: never told, still offline, and asking again makes no
    // new request.
    let mut s = connect(&broker, "s").await;
    within(s.subscribe(&["alice", "marker"])).await.unwrap();
    assert_eq!(
        within(alice.next_subscription_request())
            .await
            .unwrap()
            .requester_id,
        "s"
    );
    let denied = within(alice.set_approval(&["s"], pb::ApprovalAction::Deny))
        .await
        .unwrap();
    assert_eq!(denied, 1);
    next_is_marker(&mut s, &marker, "m1").await;
    let again = within(s.subscribe(&["alice"])).await.unwrap();
    assert!(is_frozen_offline(&again.presences[0]));
    let summary = within(alice.get_privacy()).await.unwrap();
    assert_eq!((summary.approved, summary.pending), (1, 0));
    let listed = within(alice.list_approvals(pb::ApprovalState::Denied, "", 0))
        .await
        .unwrap();
    assert_eq!(listed.approvals[0].user_id, "s");

    // Revoked: w sees her leave.
    within(alice.set_approval(&["w"], pb::ApprovalAction::Revoke))
        .await
        .unwrap();
    presence_event_of(&mut w, "alice", EventKind::Offline).await;
    assert!(is_frozen_offline(&get(&w, "alice").await));

    // Bad answers are refused with a reason.
    let me =
        server_error(within(alice.set_approval(&["alice"], pb::ApprovalAction::Approve)).await);
    assert_eq!(code(&me), pb::ErrorCode::BadRequest);
    let what =
        server_error(within(alice.set_approval(&["w"], pb::ApprovalAction::Unspecified)).await);
    assert_eq!(code(&what), pb::ErrorCode::BadRequest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nobody_hides_from_approved_watchers_and_last_seen_has_its_own_audience() {
    let broker = start(|_| {}).await;
    let alice = connect(&broker, "alice").await;
    let mut friend = connect(&broker, "friend").await;
    let stranger = connect(&broker, "stranger").await;
    within(friend.subscribe(&["alice"])).await.unwrap();
    // The app's friend graph: approved ahead, no request.
    within(alice.set_approval(&["friend"], pb::ApprovalAction::Approve))
        .await
        .unwrap();
    within(alice.set_privacy(pb::Audience::Nobody, pb::Audience::Approved))
        .await
        .unwrap();
    presence_event_of(&mut friend, "alice", EventKind::Offline).await;
    within(alice.set_privacy(pb::Audience::Approved, pb::Audience::Unspecified))
        .await
        .unwrap();
    presence_event_of(&mut friend, "alice", EventKind::Online).await;
    assert_eq!(
        availability(&get(&stranger, "alice").await),
        pb::Availability::Offline
    );

    // Everyone sees her presence; only approved watchers see when she was last seen.
    within(alice.set_privacy(pb::Audience::Everyone, pb::Audience::Unspecified))
        .await
        .unwrap();
    alice.disconnect().await.unwrap();
    let offline = presence_event_of(&mut friend, "alice", EventKind::Offline).await;
    assert!(offline.presence.unwrap().last_seen_ms > 0);
    let to_stranger = get(&stranger, "alice").await;
    assert_eq!(availability(&to_stranger), pb::Availability::Offline);
    assert_eq!(to_stranger.last_seen_ms, 0, "{to_stranger:?}");
    assert!(get(&friend, "alice").await.last_seen_ms > 0);

    // Settings and approvals are durable.
    drop((friend, stranger));
    let data = broker.stop_keeping_data().await;
    let broker = start_in(data, |_| {}).await;
    let alice = connect(&broker, "alice").await;
    let settings = within(alice.get_privacy()).await.unwrap();
    assert_eq!(
        (
            settings.presence_audience(),
            settings.last_seen_audience(),
            settings.approved
        ),
        (pb::Audience::Everyone, pb::Audience::Approved, 1)
    );
    let stranger = connect(&broker, "stranger").await;
    alice.disconnect().await.unwrap();
    assert_eq!(get(&stranger, "alice").await.last_seen_ms, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_invisible_is_never_announced() {
    let broker = start(|_| {}).await;
    let marker = connect(&broker, "marker").await;
    let mut w = connect(&broker, "w").await;
    within(w.subscribe(&["alice", "marker"])).await.unwrap();
    let before = get(&w, "alice").await;

    let mut opts = options(&broker, "alice", "phone");
    opts.invisible = true;
    opts.initial_presence = Some(status("secret"));
    let alice = within(Client::connect(opts)).await.unwrap();
    assert!(alice.conn_ack.invisible);
    let own = alice.conn_ack.presence.clone().unwrap();
    assert_eq!(availability(&own), pb::Availability::Online);
    assert_eq!(own.status, "secret");
    next_is_marker(&mut w, &marker, "m1").await;
    let shown = get(&w, "alice").await;
    assert!(is_frozen_offline(&shown), "{shown:?}");
    assert_eq!(shown.last_seen_ms, before.last_seen_ms);

    // It stays on for her next connection, until she turns it off.
    alice.disconnect().await.unwrap();
    let again = connect_device(&broker, "alice", "laptop").await;
    assert!(again.conn_ack.invisible);
    next_is_marker(&mut w, &marker, "m2").await;
    within(again.set_invisible(false)).await.unwrap();
    presence_event_of(&mut w, "alice", EventKind::Online).await;
}

/// What `watcher` receives up to `marker`'s change to `text`, each frame in short.
async fn until_marker(watcher: &mut Client, marker: &Client, text: &str) -> Vec<String> {
    within(marker.set_presence(status(text))).await.unwrap();
    let mut seen = Vec::new();
    loop {
        let frame = within(watcher.next_event()).await.expect("connection open");
        match frame.body {
            Some(pb::server_frame::Body::PresenceEvent(e)) => {
                let p = e.presence.clone().unwrap_or_default();
                if e.user_id == "marker" && p.status == text {
                    return seen;
                }
                let mut devices: Vec<String> =
                    p.devices.iter().map(|d| d.device_id.clone()).collect();
                devices.sort();
                seen.push(format!(
                    "{} {:?} {:?} device={:?} status={:?} devices={devices:?}",
                    e.user_id,
                    kind(&e),
                    availability(&p),
                    e.device_id,
                    p.status
                ));
            }
            Some(pb::server_frame::Body::ChannelEvent(e)) => {
                let m = e.member.clone().unwrap_or_default();
                seen.push(format!(
                    "{} {:?} {}/{} occupancy={}",
                    e.channel,
                    channel_kind(&e),
                    m.user_id,
                    m.device_id,
                    e.occupancy
                ));
            }
            other => seen.push(format!("{other:?}")),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_invisible_on_its_own_is_left_out_of_everything_others_see() {
    let broker = start(|c| c.channels.announce_threshold = 10_000).await;
    let marker = connect(&broker, "marker").await;
    let mut w = connect(&broker, "w").await;
    within(w.subscribe(&["alice", "marker"])).await.unwrap();
    within(w.join("room", &[])).await.unwrap();
    let phone = connect_device(&broker, "alice", "phone").await;
    within(phone.join("room", &[])).await.unwrap();
    assert_eq!(
        until_marker(&mut w, &marker, "m1").await,
        vec![
            "alice Online Online device=\"phone\" status=\"\" devices=[\"phone\"]",
            "room Join alice/phone occupancy=2",
            "room Online alice/phone occupancy=2",
        ]
    );

    // The tablet connects invisible: nobody else ever sees it, its own devices do.
    let mut options = options(&broker, "alice", "tablet");
    options.invisible_device = true;
    let mut tablet = within(Client::connect(options)).await.unwrap();
    assert!(tablet.conn_ack.device_invisible && !tablet.conn_ack.invisible);
    within(tablet.join("room", &[("seat", "3")])).await.unwrap();
    assert_eq!(
        until_marker(&mut w, &marker, "m2").await,
        Vec::<String>::new()
    );
    let seen = get(&w, "alice").await;
    assert_eq!(seen.devices.len(), 1, "{seen:?}");
    assert_eq!(seen.devices[0].device_id, "phone");
    let page = within(w.who_now("room", pb::WhoNowMode::IdsAndState, "", 10))
        .await
        .unwrap();
    let members: Vec<(&str, &str)> = page
        .members
        .iter()
        .map(|m| (m.user_id.as_str(), m.device_id.as_str()))
        .collect();
    assert_eq!(members, vec![("alice", "phone"), ("w", "phone")]);
    assert_eq!((page.occupancy, page.member_count), (2, 2));
    assert_eq!(within(w.where_now("alice")).await.unwrap(), vec!["room"]);
    // Alice's own devices see the truth.
    let own = get(&phone, "alice").await;
    assert_eq!(own.devices.len(), 2, "{own:?}");
    let own_page = within(phone.who_now("room", pb::WhoNowMode::Ids, "", 10))
        .await
        .unwrap();
    assert_eq!(own_page.member_count, 3);
    let settings = within(phone.get_privacy()).await.unwrap();
    assert_eq!(settings.invisible_devices, ["tablet"], "{settings:?}");

    // A change made from the invisible device is the user's presence: shown, named after a
    // device the watcher sees (never the invisible one, never none).
    within(tablet.set_presence(pb::SetPresence {
        status: Some("busy".into()),
        availability: pb::Availability::Dnd as i32,
        ..Default::default()
    }))
    .await
    .unwrap();
    assert_eq!(
        until_marker(&mut w, &marker, "m3").await,
        vec!["alice Update Online device=\"phone\" status=\"busy\" devices=[\"phone\"]"]
    );
    // Its availability alone changes nothing anyone else sees.
    within(tablet.set_presence(pb::SetPresence {
        availability: pb::Availability::Away as i32,
        ..Default::default()
    }))
    .await
    .unwrap();
    assert_eq!(
        until_marker(&mut w, &marker, "m4").await,
        Vec::<String>::new()
    );

    // Visible again: it arrives (presence, then its room); invisible again: it leaves.
    let reply = within(tablet.set_device_invisible(false)).await.unwrap();
    assert!(!reply.device_invisible);
    assert_eq!(
        until_marker(&mut w, &marker, "m5").await,
        vec![
            "alice Update Online device=\"tablet\" status=\"busy\" devices=[\"phone\", \"tablet\"]",
            "room Join alice/tablet occupancy=2",
        ]
    );
    within(tablet.set_device_invisible(true)).await.unwrap();
    assert_eq!(
        until_marker(&mut w, &marker, "m6").await,
        vec![
            "room Leave alice/tablet occupancy=2",
            "alice Update Online device=\"tablet\" status=\"busy\" devices=[\"phone\"]",
        ]
    );

    // The visible device leaves: alice leaves the room and goes offline, for everyone else.
    phone.disconnect().await.unwrap();
    assert_eq!(
        until_marker(&mut w, &marker, "m7").await,
        vec![
            "room Leave alice/phone occupancy=1",
            "room Offline alice/phone occupancy=1",
            "alice Offline Offline device=\"phone\" status=\"\" devices=[]",
        ]
    );
    let gone = get(&w, "alice").await;
    assert!(
        is_frozen_offline(&gone) && gone.last_seen_ms > 0,
        "{gone:?}"
    );
    let page = within(w.who_now("room", pb::WhoNowMode::Ids, "", 10))
        .await
        .unwrap();
    assert_eq!((page.occupancy, page.member_count), (1, 1));
    assert!(within(w.where_now("alice")).await.unwrap().is_empty());
    let own = presence_event_of(&mut tablet, "alice", EventKind::Update).await;
    assert_eq!(
        own.presence.unwrap().devices.len(),
        1,
        "the tablet sees itself"
    );

    // What the invisible device does from now on, its departure included, shows nowhere,
    // and the last-seen time stays when alice was last visible (restart-proof: stored).
    within(tablet.set_presence(status("secret"))).await.unwrap();
    within(tablet.leave("room")).await.unwrap();
    tablet.disconnect().await.unwrap();
    assert_eq!(
        until_marker(&mut w, &marker, "m8").await,
        Vec::<String>::new()
    );
    let after = get(&w, "alice").await;
    assert_eq!(after, gone, "nothing moved for the watcher");
    assert_eq!(
        broker.registry.snapshot("alice").last_seen_ms,
        gone.last_seen_ms,
        "the stored last-seen is when alice was last visible"
    );

    // A new visible session: online again.
    let _phone = connect_device(&broker, "alice", "phone").await;
    let back = until_marker(&mut w, &marker, "m9").await;
    assert_eq!(
        back,
        vec!["alice Online Online device=\"phone\" status=\"\" devices=[\"phone\"]"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_cap_eviction_beside_an_invisible_device_reads_as_a_departure_and_arrival() {
    // One device per user: a new device closes the old one, which watchers are not told of
    // (the new one's attach tells them). Beside invisibility that must still read right.
    let broker = start(|c| c.limits.max_devices_per_user = 1).await;
    let marker = connect(&broker, "marker").await;
    let mut w = connect(&broker, "w").await;
    within(w.subscribe(&["alice", "marker"])).await.unwrap();
    let _phone = connect_device(&broker, "alice", "phone").await;
    assert_eq!(
        until_marker(&mut w, &marker, "m1").await,
        vec!["alice Online Online device=\"phone\" status=\"\" devices=[\"phone\"]"]
    );
    // An invisible tablet replaces the phone: to everyone else alice went offline.
    let mut options = options(&broker, "alice", "tablet");
    options.invisible_device = true;
    let _tablet = within(Client::connect(options)).await.unwrap();
    assert_eq!(
        until_marker(&mut w, &marker, "m2").await,
        vec!["alice Offline Offline device=\"phone\" status=\"\" devices=[]"]
    );
    assert!(is_frozen_offline(&get(&w, "alice").await));
    // A visible laptop replaces the tablet: she comes online (not an UPDATE of an offline
    // user, which would say a hidden device was there).
    let _laptop = connect_device(&broker, "alice", "laptop").await;
    assert_eq!(
        until_marker(&mut w, &marker, "m3").await,
        vec!["alice Online Online device=\"laptop\" status=\"\" devices=[\"laptop\"]"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invisible_device_never_shows_in_a_large_room_s_intervals() {
    // Above the announce threshold a room batches its events into INTERVAL ones, flushed
    // after the invisible device may be gone: its join, state and departure must not be in
    // them for anyone else.
    let broker = start(|c| {
        c.channels.announce_threshold = 2;
        c.channels.interval_ms = 50;
    })
    .await;
    let mut w = connect(&broker, "w").await;
    within(w.watch_channel("hall")).await.unwrap();
    let mut crowd = Vec::new();
    for i in 0..3 {
        let c = connect(&broker, &format!("p{i}")).await;
        within(c.join("hall", &[])).await.unwrap();
        crowd.push(c);
    }
    let mut options = options(&broker, "alice", "tablet");
    options.invisible_device = true;
    let mut tablet = Some(within(Client::connect(options)).await.unwrap());
    let t = tablet.as_ref().unwrap();
    within(t.join("hall", &[("seat", "1")])).await.unwrap();
    within(t.set_channel_state("hall", &[("seat", "2")], false))
        .await
        .unwrap();
    // A flushed batch after the join (p1's state is in it or in an earlier one), so the
    // departure lands in a later batch, flushed once the device is gone.
    within(crowd[1].set_channel_state("hall", &[("mid", "1")], false))
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut marker = ("p1", "mid");
    'wait: loop {
        let frame = within(w.next_event()).await.expect("connection open");
        let Some(pb::server_frame::Body::ChannelEvent(e)) = frame.body else {
            continue;
        };
        let mut members: Vec<pb::ChannelMember> = e.member.into_iter().collect();
        if let Some(batch) = e.interval {
            members.extend(batch.joins);
            members.extend(batch.leaves);
            members.extend(batch.timeouts);
            members.extend(batch.state_changes);
        }
        for m in members {
            let reached = m.user_id == marker.0 && m.state.contains_key(marker.1);
            seen.push(m.user_id);
            if reached && marker.0 == "p0" {
                break 'wait;
            }
            if reached {
                tablet.take().unwrap().disconnect().await.unwrap();
                within(crowd[0].set_channel_state("hall", &[("end", "1")], false))
                    .await
                    .unwrap();
                marker = ("p0", "end");
                break;
            }
        }
    }
    assert!(
        !seen.iter().any(|u| u == "alice"),
        "the invisible device showed in the room: {seen:?}"
    );
    let page = within(w.who_now("hall", pb::WhoNowMode::Ids, "", 10))
        .await
        .unwrap();
    assert_eq!((page.occupancy, page.member_count), (3, 3));
}
