//! Privacy in cluster mode: settings, blocks and approvals made on one node hold on every
//! node (the `<PREFIX>_PRIVACY` JetStream stream, 3 replicas on 3 nats-servers), watchers on
//! other nodes see the same transitions as on a single node, requests and acceptances cross
//! nodes, a node that restarts or joins later replays the privacy log before it opens, and a
//! Connect that starts invisible is never announced on any node.

mod common;

use common::cluster::Node;
use common::nats::NatsCluster;
use common::{availability, presence_event_of, within};
use presenced::client::Client;
use presenced::pb::{self, EventKind};

async fn node(nats: &NatsCluster, id: &str, prefer: usize) -> Node {
    let mut urls = nats.urls();
    let n = urls.len();
    urls.rotate_left(prefer % n);
    Node::start(id, &urls, &["--grace-period-ms", "2000"]).await
}

async fn shown(client: &Client, user: &str) -> pb::Presence {
    within(client.get_presence(&[user]))
        .await
        .unwrap()
        .remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn privacy_set_on_one_node_holds_on_every_node() {
    let nats = NatsCluster::start(3).await;
    let n1 = node(&nats, "node1", 0).await;
    let n2 = node(&nats, "node2", 1).await;
    let alice = n1.connect("alice", "phone").await;
    let mut w = n2.connect("w", "phone").await;
    within(w.subscribe(&["alice"])).await.unwrap();
    if availability(&shown(&w, "alice").await) == pb::Availability::Offline {
        presence_event_of(&mut w, "alice", EventKind::Online).await;
    }

    // Invisible on node 1: the watcher on node 2 sees her leave, and back.
    let result = within(alice.set_invisible(true)).await.unwrap();
    assert!(result.invisible);
    presence_event_of(&mut w, "alice", EventKind::Offline).await;
    assert_eq!(
        availability(&shown(&w, "alice").await),
        pb::Availability::Offline
    );
    within(alice.set_invisible(false)).await.unwrap();
    presence_event_of(&mut w, "alice", EventKind::Online).await;

    // A block made on node 2 hides each from the other on both nodes.
    let blocked = within(w.block(&["alice"])).await.unwrap();
    assert_eq!((blocked.changed, blocked.total), (1, 1));
    presence_event_of(&mut w, "alice", EventKind::Offline).await;
    let other = n1.connect("w", "tablet").await;
    assert_eq!(
        availability(&shown(&other, "alice").await),
        pb::Availability::Offline,
        "node 1 applies the block too"
    );
    assert_eq!(within(other.list_blocked("", 0)).await.unwrap().total, 1);

    // An approval audience set on node 2; a stranger on node 1 asks, is approved, is told.
    let mut carol = n2.connect("carol", "phone").await;
    within(carol.set_privacy(pb::Audience::Approved, pb::Audience::Unspecified))
        .await
        .unwrap();
    let mut s = n1.connect("s", "phone").await;
    let reply = within(s.subscribe(&["carol"])).await.unwrap();
    assert_eq!(availability(&reply.presences[0]), pb::Availability::Offline);
    let request = within(carol.next_subscription_request()).await.unwrap();
    assert_eq!(request.requester_id, "s");
    within(carol.set_approval(&["s"], pb::ApprovalAction::Approve))
        .await
        .unwrap();
    let accepted = within(s.next_subscription_accepted()).await.unwrap();
    assert_eq!(accepted.user_id, "carol");
    presence_event_of(&mut s, "carol", EventKind::Online).await;

    // A node that joins later replays the privacy log before it opens.
    let n3 = node(&nats, "node3", 2).await;
    let w3 = n3.connect("w", "laptop").await;
    assert_eq!(within(w3.list_blocked("", 0)).await.unwrap().total, 1);
    assert_eq!(
        availability(&shown(&w3, "alice").await),
        pb::Availability::Offline
    );
    let carol3 = n3.connect("carol", "laptop").await;
    let settings = within(carol3.get_privacy()).await.unwrap();
    assert_eq!(
        (settings.presence_audience(), settings.approved),
        (pb::Audience::Approved, 1)
    );
    // ... and so does a restarted one.
    drop((w, other, s, carol, w3, carol3));
    let mut n2 = n2;
    n2.kill9().await;
    let dir = std::mem::replace(&mut n2.data_dir, tempfile::tempdir().unwrap());
    let n2 = Node::start_in("node2", &nats.urls(), &["--grace-period-ms", "2000"], dir).await;
    let w2 = n2.connect("w", "phone").await;
    assert_eq!(within(w2.list_blocked("", 0)).await.unwrap().total, 1);
    drop(alice);
}

/// Reads `watcher`'s presence events until `marker`'s ONLINE, failing on any event about
/// `hidden` before it.
async fn nothing_about_before_marker(watcher: &mut Client, hidden: &str, marker: &str) {
    loop {
        let e = within(watcher.next_presence_event()).await.unwrap();
        assert_ne!(
            e.user_id, hidden,
            "an event about {hidden} reached a watcher: {e:?}"
        );
        if e.user_id == marker && e.kind() == EventKind::Online {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connecting_invisible_is_never_announced_on_any_node() {
    let nats = NatsCluster::start(3).await;
    let n1 = node(&nats, "node1", 0).await;
    let n2 = node(&nats, "node2", 1).await;
    let n3 = node(&nats, "node3", 2).await;
    let users: Vec<String> = (0..30).map(|i| format!("inv{i}")).collect();
    let markers: Vec<String> = (0..users.len()).map(|i| format!("mk{i}")).collect();
    let watched: Vec<&str> = users.iter().chain(&markers).map(String::as_str).collect();
    let mut watchers = Vec::new();
    for (n, id) in [(&n1, "w1"), (&n2, "w2"), (&n3, "w3")] {
        let w = n.connect(id, "phone").await;
        within(w.subscribe(&watched)).await.unwrap();
        watchers.push(w);
    }

    // A Connect that is refused (a device id over 128 bytes) changes nothing.
    let mut refused = n1.options("refused", &"d".repeat(200));
    refused.invisible = true;
    assert!(within(Client::connect(refused)).await.is_err());
    let later = n1.connect("refused", "phone").await;
    assert!(
        !later.conn_ack.invisible,
        "a refused Connect made the user invisible"
    );

    let mut hidden = Vec::new();
    let mut took = Vec::new();
    for (i, user) in users.iter().enumerate() {
        let mut opts = n1.options(user, "phone");
        opts.invisible = true;
        let started = std::time::Instant::now();
        let c = within(Client::connect(opts)).await.unwrap();
        took.push(started.elapsed());
        assert!(c.conn_ack.invisible, "{user}");
        // Node 1's changes reach each node in order: once a watcher sees a marker user come
        // online on node 1 after the ConnAck, it has seen all the invisible connect sent.
        let marker = n1.connect(&markers[i], "phone").await;
        for w in &mut watchers {
            nothing_about_before_marker(w, user, &markers[i]).await;
            let p = shown(w, user).await;
            assert_eq!(availability(&p), pb::Availability::Offline, "{p:?}");
            assert!(p.devices.is_empty(), "{p:?}");
        }
        hidden.push((c, marker));
    }

    took.sort();
    eprintln!(
        "invisible connects in a 3-node cluster: median {:?}, max {:?}",
        took[took.len() / 2],
        took[took.len() - 1]
    );

    // The watchers do watch: turning visible on node 1 shows the user on every node.
    within(hidden[0].0.set_invisible(false)).await.unwrap();
    for w in &mut watchers {
        presence_event_of(w, &users[0], EventKind::Online).await;
    }
}

/// `watcher`'s presence and channel events about `user`, in short, until `marker` comes
/// online.
async fn about_until(watcher: &mut Client, user: &str, marker: &str) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        let frame = within(watcher.next_event()).await.expect("connection open");
        match frame.body {
            Some(pb::server_frame::Body::PresenceEvent(e)) => {
                if e.user_id == marker && e.kind() == EventKind::Online {
                    return seen;
                }
                if e.user_id == user {
                    let p = e.presence.clone().unwrap_or_default();
                    let devices: Vec<String> =
                        p.devices.iter().map(|d| d.device_id.clone()).collect();
                    seen.push(format!("{:?} {:?} {devices:?}", e.kind(), availability(&p)));
                }
            }
            Some(pb::server_frame::Body::ChannelEvent(e)) => {
                let m = e.member.clone().unwrap_or_default();
                if m.user_id == user {
                    seen.push(format!(
                        "{} {:?} {} occupancy={}",
                        e.channel,
                        e.kind(),
                        m.device_id,
                        e.occupancy
                    ));
                }
            }
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_device_invisible_on_one_node_is_hidden_on_every_node() {
    let nats = NatsCluster::start(3).await;
    let n1 = node(&nats, "node1", 0).await;
    let n2 = node(&nats, "node2", 1).await;
    let mut w = n2.connect("w", "phone").await;
    within(w.subscribe(&["alice", "mk1", "mk2", "mk3", "mk4", "mk5"]))
        .await
        .unwrap();
    within(w.join("room", &[])).await.unwrap();
    let phone = n1.connect("alice", "phone").await;
    within(phone.join("room", &[])).await.unwrap();
    let _mk1 = n1.connect("mk1", "phone").await;
    assert_eq!(
        about_until(&mut w, "alice", "mk1").await,
        vec![
            "Online Online [\"phone\"]",
            "room Join phone occupancy=2",
            "room Online phone occupancy=2"
        ]
    );

    // Invisible from its Connect on node 1: node 2 never shows it.
    let mut opts = n1.options("alice", "tablet");
    opts.invisible_device = true;
    let tablet = within(Client::connect(opts)).await.unwrap();
    assert!(tablet.conn_ack.device_invisible);
    within(tablet.join("room", &[])).await.unwrap();
    let _mk2 = n1.connect("mk2", "phone").await;
    assert_eq!(
        about_until(&mut w, "alice", "mk2").await,
        Vec::<String>::new()
    );
    let p = shown(&w, "alice").await;
    assert_eq!(p.devices.len(), 1, "{p:?}");
    let page = within(w.who_now("room", pb::WhoNowMode::Ids, "", 10))
        .await
        .unwrap();
    assert_eq!((page.occupancy, page.member_count), (2, 2), "{page:?}");

    // Visible, then invisible again, on node 1: node 2 sees it arrive and leave.
    within(tablet.set_device_invisible(false)).await.unwrap();
    within(tablet.set_device_invisible(true)).await.unwrap();
    let _mk3 = n1.connect("mk3", "phone").await;
    assert_eq!(
        about_until(&mut w, "alice", "mk3").await,
        vec![
            "Update Online [\"phone\", \"tablet\"]",
            "room Join tablet occupancy=2",
            "room Leave tablet occupancy=2",
            "Update Online [\"phone\"]",
        ]
    );

    // The visible device leaves: offline everywhere, and the invisible one's end moves
    // nothing.
    phone.disconnect().await.unwrap();
    let _mk4 = n1.connect("mk4", "phone").await;
    assert_eq!(
        about_until(&mut w, "alice", "mk4").await,
        vec![
            "room Leave phone occupancy=1",
            "room Offline phone occupancy=1",
            "Offline Offline []",
        ]
    );
    let gone = shown(&w, "alice").await;
    assert!(gone.last_seen_ms > 0, "{gone:?}");
    tablet.disconnect().await.unwrap();
    let _mk5 = n1.connect("mk5", "phone").await;
    assert_eq!(
        about_until(&mut w, "alice", "mk5").await,
        Vec::<String>::new()
    );
    assert_eq!(shown(&w, "alice").await, gone, "nothing moved on node 2");
}
