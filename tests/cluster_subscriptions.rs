//! Durable subscriptions in cluster mode: the JetStream log (3 replicas on 3 nats-servers)
//! shared by every node. A subscription acknowledged on one node is listed and fanned out by
//! every node, survives a NATS server's death and a node's restart, reaches a node that joins
//! later, and without a quorum a Subscribe fails with UNAVAILABLE instead of a false ack.

mod common;

use std::time::{Duration, Instant};

use common::cluster::Node;
use common::nats::NatsCluster;
use common::{kind, within};
use presenced::client::{Client, ClientError};
use presenced::pb::{self, EventKind};

async fn node(nats: &NatsCluster, id: &str, prefer: usize) -> Node {
    let mut urls = nats.urls();
    let n = urls.len();
    urls.rotate_left(prefer % n);
    Node::start(id, &urls, &["--grace-period-ms", "2000"]).await
}

async fn listed(client: &Client) -> Vec<String> {
    within(client.all_subscriptions())
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.user_id)
        .collect()
}

/// Waits (bounded) until `user`'s subscription list on `node` equals `want`.
async fn wait_listed(node: &Node, user: &str, want: &[&str]) {
    let client = node.connect(user, "lister").await;
    let started = Instant::now();
    loop {
        let mut got = listed(&client).await;
        got.sort();
        if got == want {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "node {}: {user} lists {got:?}, want {want:?}",
            node.id
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_subscription_acknowledged_on_one_node_is_everywhere() {
    let nats = NatsCluster::start(3).await;
    let n1 = node(&nats, "node1", 0).await;
    let n2 = node(&nats, "node2", 1).await;
    let bob = n1.connect("bob", "phone").await;
    within(bob.subscribe(&["alice", "carol"])).await.unwrap();
    within(bob.unsubscribe(&["carol"])).await.unwrap();
    // Acknowledged on node 1 means applied on node 1 ...
    let mut here = listed(&bob).await;
    here.sort();
    assert_eq!(here, ["alice"]);
    // ... and node 2 has it within moments.
    wait_listed(&n2, "bob", &["alice"]).await;
    // Bob moves to node 2 and hears alice change on node 1 through node 2's fanout.
    drop(bob);
    let mut bob2 = n2.connect("bob", "phone").await;
    let alice = n1.connect("alice", "phone").await;
    let e = common::presence_event_of(&mut bob2, "alice", EventKind::Online).await;
    assert_eq!(kind(&e), EventKind::Online);
    drop(alice);
    // A node that joins later replays the log before it opens.
    let n3 = node(&nats, "node3", 2).await;
    let c = n3.connect("bob", "other").await;
    assert_eq!(listed(&c).await, ["alice"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retried_subscribe_is_folded_and_a_restarted_node_replays() {
    let nats = NatsCluster::start(3).await;
    let n1 = node(&nats, "node1", 0).await;
    let mut n2 = node(&nats, "node2", 1).await;
    let bob = n1.connect("bob", "phone").await;
    for i in 0..50 {
        within(bob.subscribe(&[format!("u{i}").as_str()]))
            .await
            .unwrap();
    }
    wait_listed(
        &n2,
        "bob",
        &{
            let mut v: Vec<String> = (0..50).map(|i| format!("u{i}")).collect();
            v.sort();
            v
        }
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>(),
    )
    .await;
    // A retry with the same idempotency key is applied once: after an unsubscribe, the
    // repeated request (say its first reply was lost) does not bring the subscription back.
    let keyed = pb::Subscribe {
        user_ids: vec!["retried".into()],
        idempotency_key: "bob-retry-1".into(),
        ..Default::default()
    };
    within(bob.subscribe_with(keyed.clone())).await.unwrap();
    within(bob.unsubscribe(&["retried"])).await.unwrap();
    within(bob.subscribe_with(keyed)).await.unwrap();
    assert!(
        !listed(&bob).await.contains(&"retried".to_string()),
        "the retry was applied twice"
    );
    // Without a key, the same request from a new connection (request ids start again at 1)
    // is a new request.
    let again = n1.connect("bob", "tablet").await;
    within(again.subscribe(&["u0"])).await.unwrap();
    within(again.unsubscribe(&["u0"])).await.unwrap();
    let fresh = n1.connect("bob", "tablet").await;
    within(fresh.subscribe(&["u0"])).await.unwrap();
    assert!(
        listed(&fresh).await.contains(&"u0".to_string()),
        "a new request was folded"
    );
    // Node 2 dies and misses changes; on restart it replays only what it lacks.
    n2.kill9().await;
    for i in 0..50 {
        within(bob.unsubscribe(&[format!("u{i}").as_str()]))
            .await
            .unwrap();
    }
    within(bob.subscribe(&["last"])).await.unwrap();
    let dir = std::mem::replace(&mut n2.data_dir, tempfile::tempdir().unwrap());
    let n2 = Node::start_in("node2", &nats.urls(), &["--grace-period-ms", "2000"], dir).await;
    let c = n2.connect("bob", "other").await;
    assert_eq!(
        listed(&c).await,
        ["last"],
        "replayed before the listener opened"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_nats_server_down_loses_nothing_two_down_is_an_error_not_an_ack() {
    let mut nats = NatsCluster::start(3).await;
    // Both nodes prefer server 2, which stays up.
    let n1 = node(&nats, "node1", 2).await;
    let n2 = node(&nats, "node2", 2).await;
    let bob = n1.connect("bob", "phone").await;
    within(bob.subscribe(&["before"])).await.unwrap();
    nats.kill(0).await;
    // With two of three replicas the log still takes (and acknowledges) changes.
    let mut acked = vec!["before".to_string()];
    let mut refusals = Vec::new();
    let started = Instant::now();
    for i in 0..20 {
        let target = format!("during{i}");
        match tokio::time::timeout(Duration::from_secs(15), bob.subscribe(&[target.as_str()])).await
        {
            Ok(Ok(_)) => acked.push(target),
            Ok(Err(ClientError::Server(e))) => {
                // A leader election may make a few wait; they must say so.
                assert_eq!(common::code(&e), pb::ErrorCode::Unavailable, "{e:?}");
                refusals.push(e.reason);
            }
            other => panic!("subscribe {i}: {other:?}"),
        }
    }
    assert!(
        acked.len() >= 15,
        "only {} of 20 acknowledged with one server down ({:?}): {:?}\n{}\n{}",
        acked.len() - 1,
        started.elapsed(),
        refusals.first(),
        (0..3)
            .map(|i| nats
                .log(i)
                .lines()
                .filter(|l| !l.contains("route"))
                .collect::<Vec<_>>()
                .join("\n"))
            .collect::<Vec<_>>()
            .join("\n----\n"),
        n1.log_text()
    );
    let refused: Vec<String> = (0..20)
        .map(|i| format!("during{i}"))
        .filter(|t| !acked.contains(t))
        .collect();
    wait_holds(&n1, "bob", &acked, &refused).await;
    wait_holds(&n2, "bob", &acked, &refused).await;
    // Two of three down: no quorum, so every Subscribe is refused, never acknowledged.
    nats.kill(1).await;
    for i in 0..3 {
        let target = format!("noquorum{i}");
        match tokio::time::timeout(Duration::from_secs(15), bob.subscribe(&[target.as_str()])).await
        {
            Ok(Err(ClientError::Server(e))) => {
                assert_eq!(common::code(&e), pb::ErrorCode::Unavailable, "{e:?}");
                assert!(e.retry_after_ms > 0);
            }
            other => panic!("subscribe without quorum: {other:?}"),
        }
    }
    // Quorum back: everything acknowledged is there. (A refused change's outcome is unknown:
    // the leader may commit it once the quorum returns, which the error says; a retry with
    // the same request id is folded into it.)
    nats.restart(1).await;
    let bob_again = n2.connect("bob", "again").await;
    let started = Instant::now();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), bob_again.subscribe(&["after"])).await {
            Ok(Ok(_)) => break,
            _ if started.elapsed() < Duration::from_secs(30) => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            other => panic!("no quorum 30 s after the restart: {other:?}"),
        }
    }
    acked.push("after".to_string());
    let mut unknown = refused;
    unknown.extend((0..3).map(|i| format!("noquorum{i}")));
    wait_holds(&n1, "bob", &acked, &unknown).await;
    wait_holds(&n2, "bob", &acked, &unknown).await;
}

/// Waits (bounded) until `user`'s list on `node` holds every acknowledged target and nothing
/// but those and the refused ones (a refusal's outcome is unknown: it may land later).
async fn wait_holds(node: &Node, user: &str, acked: &[String], refused: &[String]) {
    let c = node.connect(user, "checker").await;
    let started = Instant::now();
    loop {
        // Right after the log regains its quorum a read may be told to retry (UNAVAILABLE
        // with a retry hint) while this node catches up; anything else is a failure.
        let got = match within(c.all_subscriptions()).await {
            Ok(subs) => subs.into_iter().map(|s| s.user_id).collect::<Vec<_>>(),
            Err(ClientError::Server(e))
                if common::code(&e) == pb::ErrorCode::Unavailable
                    && started.elapsed() < Duration::from_secs(8) =>
            {
                assert!(e.retry_after_ms > 0, "{e:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(e) => panic!("node {}: listing failed: {e:?}", node.id),
        };
        let missing: Vec<&String> = acked.iter().filter(|a| !got.contains(a)).collect();
        if missing.is_empty() {
            let stray: Vec<&String> = got
                .iter()
                .filter(|g| !acked.contains(g) && !refused.contains(g))
                .collect();
            assert!(
                stray.is_empty(),
                "node {}: never requested: {stray:?}",
                node.id
            );
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "node {}: acknowledged but missing: {missing:?}",
            node.id
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lone_nats_server_gets_a_one_replica_log_and_works() {
    let nats = NatsCluster::start(1).await;
    let n = Node::start("solo", &nats.urls(), &[]).await;
    assert!(n.log_text().contains("not clustered"), "{}", n.log_text());
    let bob = n.connect("bob", "phone").await;
    within(bob.subscribe(&["alice"])).await.unwrap();
    assert_eq!(listed(&bob).await, ["alice"]);
}
