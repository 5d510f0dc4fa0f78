//! The kill -9 crash test against a cluster: subscribers stream subscribe/unsubscribe batches
//! through different nodes while a random node is SIGKILLed at a random moment and restarted
//! on its data folder. After each cycle every node lists, for every subscriber, exactly the
//! acknowledged changes (plus, or not, the one in flight when the node died), within 2 s of
//! the restart; at the end the nodes' sled stores hold equal edge sets. 12 cycles by default
//! (`PRESENCE_CLUSTER_CRASH_CYCLES` for more; `PRESENCE_CLUSTER_CRASH_SEED` replays one).

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::Node;
use common::nats::NatsCluster;
use common::Rng;
use presenced::client::Client;
use presenced::store::{SledStore, SubscriptionStore};

const SUBSCRIBERS: usize = 4;
const TARGETS: u64 = 10;

#[derive(Debug, Default)]
struct Model {
    acked: BTreeSet<String>,
    /// The op in flight: (subscribe?, targets).
    pending: Option<(bool, Vec<String>)>,
    acked_ops: usize,
}

fn apply(set: &BTreeSet<String>, op: &(bool, Vec<String>)) -> BTreeSet<String> {
    let mut out = set.clone();
    for t in &op.1 {
        if op.0 {
            out.insert(t.clone());
        } else {
            out.remove(t);
        }
    }
    out
}

async fn list(client: &Client) -> BTreeSet<String> {
    common::within(client.all_subscriptions())
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.user_id)
        .collect()
}

/// Streams random batches from subscriber `i` through `client` until it fails.
async fn stream(client: Client, model: Arc<Mutex<Model>>, seed: u64) {
    let mut rng = Rng(seed | 1);
    loop {
        let n = 1 + rng.below(3) as usize;
        let targets: Vec<String> = (0..n).map(|_| format!("t{}", rng.below(TARGETS))).collect();
        let subscribe = rng.below(3) != 0;
        model.lock().unwrap().pending = Some((subscribe, targets.clone()));
        let ids: Vec<&str> = targets.iter().map(String::as_str).collect();
        let result = if subscribe {
            client.subscribe(&ids).await.map(|_| ())
        } else {
            client.unsubscribe(&ids).await.map(|_| ())
        };
        let mut m = model.lock().unwrap();
        match result {
            Ok(()) => {
                let op = m.pending.take().unwrap();
                m.acked = apply(&m.acked, &op);
                m.acked_ops += 1;
            }
            // UNAVAILABLE or a dead connection: the outcome is unknown; stop here.
            Err(_) => return,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_subscriptions_survive_node_crashes_on_every_node() {
    let cycles: usize = std::env::var("PRESENCE_CLUSTER_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    let seed: u64 = std::env::var("PRESENCE_CLUSTER_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(presenced::now_ms);
    println!("seed {seed}");
    let mut rng = Rng(seed | 1);
    let nats = NatsCluster::start(3).await;
    let start = |i: usize, dir: tempfile::TempDir| {
        let mut urls = nats.urls();
        urls.rotate_left(i);
        async move { Node::start_in(&format!("node{}", i + 1), &urls, &[], dir).await }
    };
    let mut nodes = Vec::new();
    for i in 0..3 {
        nodes.push(start(i, tempfile::tempdir().unwrap()).await);
    }
    let models: Vec<Arc<Mutex<Model>>> = (0..SUBSCRIBERS).map(|_| Arc::default()).collect();
    for cycle in 0..cycles {
        let mut tasks = Vec::new();
        for (i, model) in models.iter().enumerate() {
            let node = &nodes[(i + cycle) % 3];
            let client = node.connect(&format!("s{i}"), "phone").await;
            tasks.push(tokio::spawn(stream(client, model.clone(), rng.next())));
        }
        tokio::time::sleep(Duration::from_millis(100 + rng.below(500))).await;
        let victim = rng.below(3) as usize;
        nodes[victim].kill9().await;
        // Clients of the other nodes stop too (their in-flight op stays pending).
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
        let dir = std::mem::replace(&mut nodes[victim].data_dir, tempfile::tempdir().unwrap());
        nodes[victim] = start(victim, dir).await;
        let restarted = Instant::now();
        // Every node converges on the same list for every subscriber: the acknowledged
        // changes, with or without the one in flight.
        for (i, model) in models.iter().enumerate() {
            let user = format!("s{i}");
            let clients = [
                nodes[0].connect(&user, "check0").await,
                nodes[1].connect(&user, "check1").await,
                nodes[2].connect(&user, "check2").await,
            ];
            let (acked, pending) = {
                let m = model.lock().unwrap();
                (m.acked.clone(), m.pending.clone())
            };
            let with_pending = pending.as_ref().map(|op| apply(&acked, op));
            let agreed = loop {
                let lists = [
                    list(&clients[0]).await,
                    list(&clients[1]).await,
                    list(&clients[2]).await,
                ];
                let valid = |l: &BTreeSet<String>| *l == acked || Some(l) == with_pending.as_ref();
                if lists.iter().all(valid) && lists[0] == lists[1] && lists[1] == lists[2] {
                    break lists[0].clone();
                }
                assert!(
                    restarted.elapsed() < Duration::from_secs(2),
                    "cycle {cycle} (seed {seed}), {user}: nodes list {lists:?}; acknowledged {acked:?}, in flight {pending:?}"
                );
                tokio::time::sleep(Duration::from_millis(25)).await;
            };
            let mut m = model.lock().unwrap();
            m.acked = agreed;
            m.pending = None;
        }
    }
    let acked_ops: usize = models.iter().map(|m| m.lock().unwrap().acked_ops).sum();
    assert!(
        acked_ops >= cycles,
        "only {acked_ops} acknowledged operations in {cycles} cycles"
    );
    println!("{cycles} cycles, {acked_ops} acknowledged operations (seed {seed})");
    // The stores themselves: stop every node cleanly and compare their sled edge sets.
    let mut edge_sets = Vec::new();
    for mut node in nodes {
        node.signal("TERM");
        let _ = tokio::time::timeout(Duration::from_secs(10), node.child.wait()).await;
        let dir = node.data_dir.path().to_path_buf();
        let store = tokio::task::spawn_blocking(move || SledStore::open(&dir).unwrap())
            .await
            .unwrap();
        let mut edges = BTreeSet::new();
        for i in 0..SUBSCRIBERS {
            let subscriber = format!("s{i}");
            for (target, _) in store.list(&subscriber, None, 1000, 0).unwrap().entries {
                edges.insert((subscriber.clone(), target));
            }
        }
        edge_sets.push((edges, store.applied_seq()));
    }
    assert_eq!(
        edge_sets[0].0, edge_sets[1].0,
        "node1 and node2 stores differ"
    );
    assert_eq!(
        edge_sets[1].0, edge_sets[2].0,
        "node2 and node3 stores differ"
    );
    assert_eq!(
        edge_sets[0].1, edge_sets[1].1,
        "applied log positions differ"
    );
}
