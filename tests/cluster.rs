//! Cluster mode end to end: three nats-server processes clustered with JetStream, presenced
//! nodes as real processes joined to them, clients over TLS. Covers cross-node fanout, a dead
//! node's devices going offline (or not, when they reconnect elsewhere), takeover across
//! nodes, a stopped node fencing itself, and a node cut off from NATS through a TCP proxy.
//! Every wait is bounded; signals go only to processes these tests started.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::cluster::{digests_agree, Node};
use common::nats::NatsCluster;
use common::proxy::TcpProxy;
use common::{close_code, kind, reason, within};
use presenced::client::{Client, ClientError};
use presenced::pb::{self, CloseCode, EventKind, OfflineReason};

/// Nodes notice a dead peer after about 3 s and wait the 5 s grace period.
const GRACE: &str = "5000";

async fn nodes(nats: &NatsCluster, n: usize) -> Vec<Node> {
    let urls = nats.urls();
    let mut out = Vec::new();
    for i in 0..n {
        // Each node prefers a different NATS server, as a real deployment would.
        let mut mine = urls.clone();
        mine.rotate_left(i % urls.len());
        out.push(
            Node::start(
                &format!("node{}", i + 1),
                &mine,
                &["--grace-period-ms", GRACE],
            )
            .await,
        );
    }
    out
}

fn set_status(status: &str) -> pb::SetPresence {
    pb::SetPresence {
        status: Some(status.to_string()),
        ..Default::default()
    }
}

/// Subscribes `client` to `users` in batches of 100.
async fn subscribe_all(client: &Client, users: &[String]) {
    for batch in users.chunks(100) {
        let ids: Vec<&str> = batch.iter().map(String::as_str).collect();
        within(client.subscribe(&ids)).await.unwrap();
    }
}

/// Collects presence events arriving at `client` for `window`.
async fn events_for(client: &mut Client, window: Duration) -> Vec<pb::PresenceEvent> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + window;
    loop {
        match tokio::time::timeout_at(deadline, client.next_event()).await {
            Err(_) => return out,
            Ok(None) => return out,
            Ok(Some(frame)) => {
                if let Some(pb::server_frame::Body::PresenceEvent(e)) = frame.body {
                    out.push(e);
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_change_on_one_node_reaches_a_thousand_watchers_on_the_others() {
    let nats = NatsCluster::start(3).await;
    let nodes = nodes(&nats, 3).await;
    let mut watchers = Vec::new();
    for i in 0..1000 {
        let node = &nodes[1 + i % 2];
        let w = node.connect(&format!("w{i}"), "phone").await;
        within(w.subscribe(&["target"])).await.unwrap();
        watchers.push(w);
    }
    let target = nodes[0].connect("target", "phone").await;
    for i in 0..5 {
        within(target.set_presence(set_status(&format!("s{i}"))))
            .await
            .unwrap();
    }
    // ONLINE and five UPDATEs, in version order, at every watcher.
    for (i, w) in watchers.iter_mut().enumerate() {
        let mut last = 0;
        let mut statuses = Vec::new();
        while statuses.len() < 6 {
            let e = within(w.next_presence_event())
                .await
                .unwrap_or_else(|e| panic!("watcher {i}: {e}"));
            assert_eq!(e.user_id, "target");
            assert!(
                e.version > last,
                "watcher {i}: version went {last} → {}",
                e.version
            );
            last = e.version;
            statuses.push(e.presence.unwrap().status);
        }
        assert_eq!(statuses, ["", "s0", "s1", "s2", "s3", "s4"], "watcher {i}");
    }
    // Any node answers a query with the same presence.
    for node in &nodes {
        let q = node.connect("asker", "q").await;
        let p = within(q.get_presence(&["target"])).await.unwrap();
        assert_eq!(p[0].status, "s4", "node {}", node.id);
        assert_eq!(p[0].devices.len(), 1);
    }
    // Directed presence reaches recipients on other nodes; offline ones are not listed.
    let delivered = within(target.direct(&["w0", "w1", "nobody"], set_status("psst")))
        .await
        .unwrap();
    assert_eq!(delivered, ["w0", "w1"]);
    for w in &mut watchers[..2] {
        let e = within(w.next_presence_event()).await.unwrap();
        assert_eq!(kind(&e), EventKind::Directed);
        assert_eq!(e.presence.unwrap().status, "psst");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_node_s_devices_go_offline_everywhere_between_3_and_10_s() {
    let nats = NatsCluster::start(3).await;
    let mut nodes = nodes(&nats, 3).await;
    let users: Vec<String> = (0..500).map(|i| format!("u{i}")).collect();
    let mut devices = Vec::new();
    for u in &users {
        devices.push(nodes[0].connect(u, "phone").await);
    }
    let mut watchers = vec![
        nodes[1].connect("watcher2", "w").await,
        nodes[2].connect("watcher3", "w").await,
    ];
    for w in &watchers {
        subscribe_all(w, &users).await;
    }
    let killed = Instant::now();
    nodes[0].kill9().await;
    drop(devices);
    for (n, w) in watchers.iter_mut().enumerate() {
        let mut offline = HashMap::new();
        while offline.len() < users.len() {
            let e = tokio::time::timeout(Duration::from_secs(15), w.next_presence_event())
                .await
                .expect("OFFLINE within 15 s")
                .unwrap();
            if kind(&e) == EventKind::Offline {
                assert_eq!(reason(&e), OfflineReason::ConnectionLost);
                offline.insert(e.user_id.clone(), killed.elapsed());
            }
        }
        let first = offline.values().min().unwrap();
        let last = offline.values().max().unwrap();
        assert!(
            *first >= Duration::from_secs(3) && *last <= Duration::from_secs(10),
            "watcher on node {}: OFFLINE between {first:?} and {last:?} after the kill",
            n + 2
        );
    }
    for node in &nodes[1..] {
        let q = node.connect("asker", "q").await;
        let p = within(q.get_presence(&["u0", "u499"])).await.unwrap();
        assert!(p.iter().all(|p| p.devices.is_empty() && p.last_seen_ms > 0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn devices_that_reconnect_elsewhere_after_a_kill_show_watchers_nothing() {
    let nats = NatsCluster::start(3).await;
    let mut nodes = nodes(&nats, 3).await;
    let users: Vec<String> = (0..500).map(|i| format!("r{i}")).collect();
    let mut devices = Vec::new();
    for u in &users {
        devices.push(nodes[0].connect(u, "phone").await);
    }
    let mut watcher = nodes[1].connect("watcher", "w").await;
    subscribe_all(&watcher, &users).await;
    nodes[0].kill9().await;
    let killed = Instant::now();
    drop(devices);
    // Every device is back within 2 s, on node 2 or 3 (reconnecting at once, as phones do).
    let mut reconnects = Vec::new();
    for (i, u) in users.iter().enumerate() {
        let options = nodes[1 + i % 2].options(u, "phone");
        reconnects.push(tokio::spawn(async move { Client::connect(options).await }));
    }
    let mut back = Vec::new();
    for r in reconnects {
        back.push(within(r).await.unwrap().expect("reconnects"));
    }
    assert!(
        killed.elapsed() < Duration::from_secs(2),
        "reconnects took {:?}",
        killed.elapsed()
    );
    // Past the dead node's detection and grace period: nothing but silence.
    let events = events_for(&mut watcher, Duration::from_secs(10)).await;
    let flicker: Vec<_> = events
        .iter()
        .filter(|e| matches!(kind(e), EventKind::Offline | EventKind::Online))
        .collect();
    assert!(
        flicker.is_empty(),
        "{} OFFLINE/ONLINE events: {:?}",
        flicker.len(),
        flicker.first()
    );
    let p = within(watcher.get_presence(&["r0", "r1", "r499"]))
        .await
        .unwrap();
    assert!(p.iter().all(|p| p.devices.len() == 1), "{p:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn takeover_across_nodes_200_times_never_shows_offline() {
    let nats = NatsCluster::start(3).await;
    let nodes = nodes(&nats, 3).await;
    let mut watcher = nodes[2].connect("watcher", "w").await;
    within(watcher.subscribe(&["mover"])).await.unwrap();
    let mut current = nodes[0].connect("mover", "phone").await;
    // The membership belongs to the session and moves with it.
    within(current.join("room", &[("seat", "1")]))
        .await
        .unwrap();
    for i in 1..=200 {
        let next_node = &nodes[i % 2];
        let started = Instant::now();
        let next = next_node.connect("mover", "phone").await;
        let close = tokio::time::timeout(Duration::from_millis(500), current.closed())
            .await
            .unwrap_or_else(|_| panic!("takeover {i}: no TAKEN_OVER within 500 ms"))
            .expect("a close frame");
        assert_eq!(close_code(&close), CloseCode::TakenOver, "takeover {i}");
        assert!(started.elapsed() < Duration::from_millis(500));
        current = next;
    }
    let events = events_for(&mut watcher, Duration::from_secs(15)).await;
    let bad: Vec<_> = events
        .iter()
        .filter(|e| kind(e) == EventKind::Offline)
        .collect();
    assert!(bad.is_empty(), "OFFLINE during takeovers: {bad:?}");
    for node in &nodes {
        let q = node.connect("asker", "q").await;
        let p = within(q.get_presence(&["mover"])).await.unwrap();
        assert_eq!(p[0].devices.len(), 1, "node {}: {:?}", node.id, p[0]);
        assert_eq!(
            within(q.where_now("mover")).await.unwrap(),
            ["room"],
            "node {}",
            node.id
        );
        let who = within(q.who_now("room", pb::WhoNowMode::IdsAndState, "", 10))
            .await
            .unwrap();
        assert_eq!(who.occupancy, 1, "node {}", node.id);
        assert_eq!(
            who.members[0].state.get("seat").map(String::as_str),
            Some("1")
        );
    }
    // The last connection still works, and can leave the room it joined 200 sessions ago.
    assert!(within(current.leave("room")).await.unwrap().occupancy == 0);
    within(current.ping()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopped_node_is_declared_dead_then_fences_and_never_resurrects_sessions() {
    let nats = NatsCluster::start(3).await;
    let nodes = nodes(&nats, 3).await;
    let mut sleeper = nodes[0].connect("sleepy", "phone").await;
    let mut watcher = nodes[1].connect("watcher", "w").await;
    within(watcher.subscribe(&["sleepy"])).await.unwrap();
    digests_agree(&[&nodes[0], &nodes[1], &nodes[2]], Duration::from_secs(5)).await;
    nodes[0].signal("STOP");
    let stopped = Instant::now();
    let e = common::presence_event_of(&mut watcher, "sleepy", EventKind::Offline).await;
    assert_eq!(reason(&e), OfflineReason::ConnectionLost);
    assert!(
        stopped.elapsed() < Duration::from_secs(10),
        "{:?}",
        stopped.elapsed()
    );
    while stopped.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    nodes[0].signal("CONT");
    // It fences: its client is told to go elsewhere.
    let close = within(sleeper.closed()).await.expect("a close frame");
    assert_eq!(close_code(&close), CloseCode::NodeUnavailable);
    assert!(close.reconnect_after_ms > 0);
    // The stale session never comes back anywhere, and the replicas agree.
    let took = digests_agree(&[&nodes[0], &nodes[1], &nodes[2]], Duration::from_secs(5)).await;
    assert!(
        took < Duration::from_secs(3),
        "digests agreed after {took:?}"
    );
    let events = events_for(&mut watcher, Duration::from_secs(2)).await;
    assert!(
        events.iter().all(|e| kind(e) != EventKind::Online),
        "{events:?}"
    );
    for node in &nodes {
        let q = node.connect("asker", "q").await;
        let p = within(q.get_presence(&["sleepy"])).await.unwrap();
        assert!(p[0].devices.is_empty(), "node {}: {:?}", node.id, p[0]);
    }
    // The node serves again under a new incarnation.
    let again = nodes[0].connect("sleepy", "phone").await;
    let e = common::presence_event_of(&mut watcher, "sleepy", EventKind::Online).await;
    assert_eq!(e.presence.unwrap().devices.len(), 1);
    drop(again);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_cut_off_from_nats_fences_and_rejoins() {
    let nats = NatsCluster::start(3).await;
    let proxy = TcpProxy::start(nats.addr(0)).await;
    let cut_url = format!("nats://{}", proxy.addr());
    // Only through the proxy: NATS would otherwise hand the node the other servers' addresses.
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        config.path(),
        "[cluster]\nignore_discovered_servers = true\n",
    )
    .unwrap();
    let isolated = Node::start(
        "isolated",
        &[cut_url],
        &[
            "--grace-period-ms",
            GRACE,
            "--config",
            config.path().to_str().unwrap(),
        ],
    )
    .await;
    let others = nodes(&nats, 2).await;
    let mut client = isolated.connect("island", "phone").await;
    let mut watcher = others[0].connect("watcher", "w").await;
    within(watcher.subscribe(&["island"])).await.unwrap();
    digests_agree(&[&isolated, &others[0], &others[1]], Duration::from_secs(5)).await;

    proxy.cut().await;
    let cut = Instant::now();
    let close = within(client.closed()).await.expect("a close frame");
    let fenced_after = cut.elapsed();
    assert_eq!(close_code(&close), CloseCode::NodeUnavailable);
    assert!(
        fenced_after >= Duration::from_millis(2_500) && fenced_after < Duration::from_secs(5),
        "fenced after {fenced_after:?}"
    );
    // While fenced it refuses Connect with a retryable error.
    match Client::connect(isolated.options("someone", "x")).await {
        Err(ClientError::Server(e)) => {
            assert_eq!(common::code(&e), pb::ErrorCode::Unavailable);
            assert!(e.retry_after_ms > 0);
        }
        other => panic!("expected UNAVAILABLE, got {other:?}"),
    }
    // The others see the island's user go offline.
    let e = common::presence_event_of(&mut watcher, "island", EventKind::Offline).await;
    assert_eq!(reason(&e), OfflineReason::ConnectionLost);
    while cut.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    proxy.restore();
    let restored = Instant::now();
    // Back in the cluster: it accepts clients, and every replica agrees within 2 s.
    let back = loop {
        match Client::connect(isolated.options("island", "phone")).await {
            Ok(c) => break c,
            Err(_) if restored.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("no rejoin within 10 s: {e}\n{}", isolated.log_text()),
        }
    };
    let e = common::presence_event_of(&mut watcher, "island", EventKind::Online).await;
    assert_eq!(e.presence.unwrap().devices.len(), 1);
    let took = digests_agree(&[&isolated, &others[0], &others[1]], Duration::from_secs(5)).await;
    assert!(
        took < Duration::from_secs(2) + Duration::from_millis(1_500),
        "{took:?}"
    );
    drop(back);
}

/// Every member of `channel` as `node` lists it (paged), with state.
async fn who_now_all(client: &Client, channel: &str) -> (u32, Vec<(String, String, String)>) {
    let mut out = Vec::new();
    let mut cursor = String::new();
    loop {
        let page = within(client.who_now(channel, pb::WhoNowMode::IdsAndState, &cursor, 100))
            .await
            .unwrap();
        out.extend(page.members.iter().map(|m| {
            (
                m.user_id.clone(),
                m.device_id.clone(),
                m.state.get("seat").cloned().unwrap_or_default(),
            )
        }));
        if page.next_cursor.is_empty() {
            return (page.occupancy, out);
        }
        cursor = page.next_cursor;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_channel_spread_over_three_nodes_agrees_and_loses_a_dead_node_s_members() {
    let nats = NatsCluster::start(3).await;
    let mut nodes = nodes(&nats, 3).await;
    let mut members = Vec::new();
    for i in 0..300 {
        let c = nodes[i % 3].connect(&format!("m{i}"), "phone").await;
        within(c.join("hall", &[("seat", &i.to_string())]))
            .await
            .unwrap();
        members.push(c);
    }
    // A watcher on node 2 for the events, one query client per node.
    let mut watcher = nodes[1].connect("usher", "w").await;
    within(watcher.watch_channel("hall")).await.unwrap();
    let askers = [
        nodes[0].connect("asker", "q0").await,
        nodes[1].connect("asker", "q1").await,
        nodes[2].connect("asker", "q2").await,
    ];
    // who-now (paged, with state) agrees on every node within 1 s of the last join.
    let started = Instant::now();
    loop {
        let views = [
            who_now_all(&askers[0], "hall").await,
            who_now_all(&askers[1], "hall").await,
            who_now_all(&askers[2], "hall").await,
        ];
        if views.iter().all(|v| v.0 == 300 && v.1.len() == 300)
            && views[0] == views[1]
            && views[1] == views[2]
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "who-now differs after 1 s: {:?}",
            views.iter().map(|v| (v.0, v.1.len())).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A member state change on node 3 shows on node 1; where-now answers anywhere.
    within(members[2].set_channel_state("hall", &[("seat", "moved")], false))
        .await
        .unwrap();
    let started = Instant::now();
    loop {
        let s = within(askers[0].get_channel_state("hall", "m2"))
            .await
            .unwrap();
        if s.members
            .first()
            .and_then(|m| m.state.get("seat"))
            .map(String::as_str)
            == Some("moved")
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "state not replicated: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(within(askers[1].where_now("m0")).await.unwrap(), ["hall"]);
    // Node 1 (members m0, m3, ...: 100 of them) dies: 100 TIMEOUTs, occupancy 200 everywhere.
    nodes[0].kill9().await;
    let killed = Instant::now();
    let mut timed_out = std::collections::HashSet::new();
    while timed_out.len() < 100 {
        let e = tokio::time::timeout(Duration::from_secs(15), watcher.next_channel_event())
            .await
            .expect("channel events within 15 s")
            .unwrap();
        match pb::ChannelEventKind::try_from(e.kind).unwrap() {
            pb::ChannelEventKind::Timeout => {
                timed_out.insert(e.member.unwrap().user_id);
            }
            pb::ChannelEventKind::Interval => {
                let batch = e.interval.unwrap();
                assert!(
                    batch.leaves.is_empty(),
                    "LEAVE instead of TIMEOUT: {:?}",
                    batch.leaves
                );
                timed_out.extend(batch.timeouts.into_iter().map(|m| m.user_id));
            }
            _ => {}
        }
    }
    assert!(timed_out
        .iter()
        .all(|u| u[1..].parse::<usize>().unwrap() % 3 == 0));
    assert!(killed.elapsed() < Duration::from_secs(15));
    for asker in &askers[1..] {
        let started = Instant::now();
        loop {
            let (occupancy, list) = who_now_all(asker, "hall").await;
            if occupancy == 200 && list.len() == 200 {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "occupancy {occupancy}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_nats_server_dying_under_a_node_loses_no_presence_change() {
    let mut nats = NatsCluster::start(3).await;
    // Node 1 talks to NATS server 0 first; node 2 avoids it.
    let node1 = Node::start(
        "node1",
        &[nats.url(0), nats.url(1)],
        &["--grace-period-ms", GRACE],
    )
    .await;
    let node2 = Node::start(
        "node2",
        &[nats.url(1), nats.url(2)],
        &["--grace-period-ms", GRACE],
    )
    .await;
    let mut watcher = node2.connect("watcher", "w").await;
    within(watcher.subscribe(&["talker"])).await.unwrap();
    let talker = node1.connect("talker", "phone").await;
    let e = common::presence_event_of(&mut watcher, "talker", EventKind::Online).await;
    let mut last_version = e.version;
    // 30 changes at 10/s (the publish rate limit), NATS server 0 killed a third of the way.
    for i in 0..30 {
        if i == 10 {
            nats.kill(0).await;
        }
        within(talker.set_presence(set_status(&format!("s{i}"))))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(105)).await;
    }
    // The watcher ends on the last change (a change lost in flight is repaired by a state
    // transfer), and versions never go back.
    let started = Instant::now();
    let mut seen = Vec::new();
    loop {
        let e = tokio::time::timeout(Duration::from_secs(10), watcher.next_presence_event())
            .await
            .unwrap_or_else(|_| panic!("no s29 within 10 s\n{}", node1.log_text()))
            .unwrap();
        assert!(
            e.version > last_version,
            "version went back: {} → {}",
            last_version,
            e.version
        );
        last_version = e.version;
        let status = e.presence.unwrap().status;
        seen.push(status.clone());
        if status == "s29" {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(15));
    }
    // The NATS client replays what it buffered while it reconnected: every change arrives.
    let want: Vec<String> = (0..30).map(|i| format!("s{i}")).collect();
    assert_eq!(seen, want);
    let p = within(watcher.get_presence(&["talker"])).await.unwrap();
    assert_eq!(p[0].status, "s29");
    assert_eq!(p[0].devices.len(), 1);
}

/// Pauses just under the self-fencing threshold: the others may declare the node dead while
/// it never notices its own stall (and, woken, it may think them dead). Their heartbeats tell
/// it, it rejoins, and the cluster agrees again; before the fix this split the cluster for
/// good. Pause lengths vary because whether a pause is "long enough" depends on where the
/// heartbeats fell.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pause_just_under_the_fencing_threshold_never_splits_the_cluster() {
    let nats = NatsCluster::start(3).await;
    let nodes = nodes(&nats, 3).await;
    let mut held_here = Some(nodes[0].connect("paused", "phone").await);
    let held_there = nodes[2].connect("elsewhere", "phone").await;
    digests_agree(&[&nodes[0], &nodes[1], &nodes[2]], Duration::from_secs(5)).await;
    for pause_ms in [2_500, 2_750, 2_950, 2_850] {
        nodes[0].signal("STOP");
        tokio::time::sleep(Duration::from_millis(pause_ms)).await;
        nodes[0].signal("CONT");
        // Whatever happened (nothing, or node 1 was declared dead and rejoined), node 1's
        // client reconnects when told to, and every node ends with the same view.
        let started = Instant::now();
        loop {
            if let Some(c) = &held_here {
                if c.ping().await.is_err() {
                    held_here = None;
                }
            }
            if held_here.is_none() {
                held_here = Client::connect(nodes[0].options("paused", "phone"))
                    .await
                    .ok();
            }
            let mut views = Vec::new();
            for node in &nodes {
                let q = node.connect("asker", &format!("q-{}", node.id)).await;
                let p = within(q.get_presence(&["paused", "elsewhere"]))
                    .await
                    .unwrap();
                views.push(p.iter().map(|p| p.devices.len()).collect::<Vec<_>>());
            }
            if held_here.is_some() && views.iter().all(|v| v == &[1, 1]) {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "after a {pause_ms} ms pause the nodes still disagree 20 s later: {views:?}\n{}",
                nodes[0].log_text()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        digests_agree(&[&nodes[0], &nodes[1], &nodes[2]], Duration::from_secs(5)).await;
    }
    drop(held_there);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_browser_on_one_node_and_a_phone_on_another_see_each_other_and_take_over() {
    let nats = NatsCluster::start(3).await;
    let urls = nats.urls();
    let web_node = Node::start(
        "node1",
        &urls,
        &["--grace-period-ms", GRACE, "--ws-listen", "127.0.0.1:0"],
    )
    .await;
    let phone_node = Node::start("node2", &urls, &["--grace-period-ms", GRACE]).await;
    let ws_addr = web_node.ws.expect("the node prints its wss address");
    let web_options = |user: &str| {
        presenced::client::ClientOptions::new(ws_addr, common::token(user))
            .device("browser")
            .websocket(presenced::client::Transport::Wss)
    };
    let mut web = within(Client::connect(web_options("alice"))).await.unwrap();
    let mut phone = phone_node.connect("bob", "phone").await;
    within(web.subscribe(&["bob"])).await.unwrap();
    within(phone.subscribe(&["alice"])).await.unwrap();
    // bob's change on node2 reaches the browser on node1, and the other way round.
    within(phone.set_presence(set_status("on the train")))
        .await
        .unwrap();
    let e = loop {
        let e = within(web.next_presence_event()).await.unwrap();
        if e.user_id == "bob" && kind(&e) == EventKind::Update {
            break e;
        }
    };
    assert_eq!(e.presence.unwrap().status, "on the train");
    within(web.set_presence(set_status("typing")))
        .await
        .unwrap();
    loop {
        let e = within(phone.next_presence_event()).await.unwrap();
        if e.user_id == "alice" && kind(&e) == EventKind::Update {
            assert_eq!(e.presence.unwrap().status, "typing");
            break;
        }
    }
    // The browser's device reconnecting over TCP on node2 takes the session over: the
    // WebSocket gets TAKEN_OVER, and bob sees no OFFLINE.
    let _moved = phone_node.connect("alice", "browser").await;
    let close = within(web.closed()).await.expect("a close frame");
    assert_eq!(close_code(&close), CloseCode::TakenOver);
    let events = events_for(&mut phone, Duration::from_secs(1)).await;
    assert!(
        events.iter().all(|e| kind(e) != EventKind::Offline),
        "{events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watcher_resumes_and_batches_on_another_node() {
    let nats = NatsCluster::start(3).await;
    let nodes = nodes(&nats, 3).await;
    let a = nodes[1].connect("ra", "phone").await;
    let b = nodes[1].connect("rb", "phone").await;
    let mut watcher = nodes[0].connect("rw", "phone").await;
    within(watcher.subscribe(&["ra", "rb", "rc"]))
        .await
        .unwrap();
    let (all, first) = within(watcher.resume(&[])).await.unwrap();
    assert_eq!(first.changed, 3, "{all:?}");
    let known: Vec<(String, u64)> = all.iter().map(|e| (e.user_id.clone(), e.version)).collect();
    drop(watcher);

    within(a.set_presence(set_status("moved on")))
        .await
        .unwrap();
    // node3 has the change once its replica does: wait for it there (bounded).
    let asker = nodes[2].connect("asker", "q").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while within(asker.get_presence(&["ra"])).await.unwrap()[0].status != "moved on" {
        assert!(Instant::now() < deadline, "node3 never saw the change");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut watcher = nodes[2].connect("rw", "phone").await;
    let (changed, result) = within(watcher.resume(&known)).await.unwrap();
    assert_eq!(changed.len(), 1, "{changed:?}");
    assert_eq!(changed[0].user_id, "ra");
    assert_eq!((result.changed, result.unchanged), (1, 2));

    // Background mode on node3 for changes made on node2.
    within(watcher.set_delivery(pb::SetDelivery {
        mode: pb::DeliveryMode::Batched as i32,
        interval_seconds: 1,
        ..Default::default()
    }))
    .await
    .unwrap();
    for i in 0..3 {
        within(b.set_presence(set_status(&format!("b{i}"))))
            .await
            .unwrap();
    }
    // Each batch holds rb once, coalesced; the last one carries the final state.
    loop {
        let batch = within(watcher.next_presence_batch()).await.unwrap();
        let rb: Vec<_> = batch.events.iter().filter(|e| e.user_id == "rb").collect();
        assert!(rb.len() <= 1, "{batch:?}");
        if rb
            .first()
            .map(|e| e.presence.as_ref().unwrap().status.as_str())
            == Some("b2")
        {
            break;
        }
    }
}

/// What every node answers for `user`, polled until it equals `want` (bounded).
async fn wait_presence(client: &Client, user: &str, want: &pb::Presence, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = within(client.get_presence(&[user]))
            .await
            .unwrap()
            .remove(0);
        if (now.version, now.last_seen_ms) == (want.version, want.last_seen_ms) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {now:?} != {want:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A node that was down while a user went offline learns the new last-seen and version from a
/// peer when it restarts, so queries and resumes there match every other node.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_node_catches_up_on_who_went_offline_while_it_was_down() {
    let nats = NatsCluster::start(3).await;
    let mut nodes = nodes(&nats, 2).await;
    let alice = nodes[0].connect("la", "phone").await;
    alice.disconnect().await.unwrap();
    let on1 = nodes[0].connect("q1", "q").await;
    let first = within(on1.get_presence(&["la"])).await.unwrap().remove(0);
    assert!(first.last_seen_ms > 0);
    let on2 = nodes[1].connect("q2", "q").await;
    wait_presence(&on2, "la", &first, "node2 before the kill").await;
    let mut watcher = nodes[1].connect("lw", "phone").await;
    within(watcher.subscribe(&["la"])).await.unwrap();
    let (seen, _) = within(watcher.resume(&[])).await.unwrap();
    let known: Vec<(String, u64)> = seen
        .iter()
        .map(|e| (e.user_id.clone(), e.version))
        .collect();
    drop((on2, watcher));

    // node2 goes down; alice comes and goes on node1 meanwhile.
    nodes[1].kill9().await;
    let data = std::mem::replace(&mut nodes[1].data_dir, tempfile::tempdir().unwrap());
    let alice = nodes[0].connect("la", "phone").await;
    alice.disconnect().await.unwrap();
    let second = within(on1.get_presence(&["la"])).await.unwrap().remove(0);
    assert!(second.version > first.version);

    let urls = nats.urls();
    let node2 = Node::start_in("node2", &urls, &["--grace-period-ms", GRACE], data).await;
    let on2 = node2.connect("q2", "q").await;
    let now = within(on2.get_presence(&["la"])).await.unwrap().remove(0);
    assert_eq!(
        (now.version, now.last_seen_ms),
        (second.version, second.last_seen_ms),
        "node2 answers what node1 does as soon as it accepts clients"
    );
    let mut watcher = node2.connect("lw", "phone").await;
    let (changed, result) = within(watcher.resume(&known)).await.unwrap();
    assert_eq!((result.changed, result.unchanged), (1, 0), "{changed:?}");
    assert_eq!(changed[0].version, second.version);
}
