//! Privacy in cluster mode: settings, blocks and approvals made on one node hold on every
//! node (the `<PREFIX>_PRIVACY` JetStream stream, 3 replicas on 3 nats-servers), watchers on
//! other nodes see the same transitions as on a single node, requests and acceptances cross
//! nodes, and a node that restarts or joins later replays the privacy log before it opens.

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
