//! The admin API in cluster mode: any node answers for the whole cluster. A disconnect asked
//! of one node closes a session another node holds (Close KICKED there, OFFLINE KICKED for
//! watchers everywhere, at once); the online check sees another node's grace period; a
//! revocation made on one node is refused by every node, also after a restart; subscriptions
//! made on a user's behalf on one node are listed by another; presence set on a user's behalf
//! through one node is applied by the node holding the session. Webhook events go out once
//! per cluster (by one node, another one after it dies) and any node replays them.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::Node;
use common::nats::NatsCluster;
use common::within;
use presenced::client::{Client, ClientError, ClientOptions};
use presenced::pb::{self, EventKind, OfflineReason};
use serde_json::{json, Value};

const KEY: &str = "cluster-admin-key-0123456789abcdef0123456789";

fn config_file() -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        file.path(),
        format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n[admin.keys.ops]\nkey = \"{KEY}\"\nscope = \"write\"\n"
        ),
    )
    .unwrap();
    file
}

async fn call(addr: SocketAddr, method: reqwest::Method, path: &str, body: Value) -> (u16, Value) {
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut req = http
        .request(method.clone(), format!("http://{addr}{path}"))
        .bearer_auth(KEY);
    if method == reqwest::Method::POST {
        req = req.json(&body);
    }
    let resp = within(req.send()).await.unwrap();
    let status = resp.status().as_u16();
    (status, within(resp.json::<Value>()).await.unwrap())
}

async fn post(addr: SocketAddr, path: &str, body: Value) -> (u16, Value) {
    call(addr, reqwest::Method::POST, path, body).await
}

/// Polls `check` (bounded, 10 s) until it returns true.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < Duration::from_secs(10), "never: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn refusal(addr: SocketAddr, token: String) -> Option<pb::Error> {
    match within(Client::connect(ClientOptions::new(addr, token))).await {
        Err(ClientError::Server(e)) => Some(e),
        Ok(_) => None,
        Err(e) => panic!("connect failed otherwise: {e}"),
    }
}

fn old_token(user: &str) -> String {
    presenced::auth::mint(
        presenced::config::DEV_SECRET.as_bytes(),
        Some(presenced::config::DEV_KID),
        &presenced::auth::Claims {
            iat: Some(common::now_secs() - 60),
            ..common::claims(user, common::now_secs() + 3600)
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn any_node_answers_for_the_cluster() {
    let nats = NatsCluster::start(1).await;
    let config = config_file();
    let config_path = config.path().to_str().unwrap().to_string();
    let args = [
        "--config",
        config_path.as_str(),
        "--grace-period-ms",
        "30000",
    ];
    let n1 = Node::start("node1", &nats.urls(), &args).await;
    let mut n2 = Node::start("node2", &nats.urls(), &args).await;
    let (a1, a2) = (n1.admin.expect("admin on"), n2.admin.expect("admin on"));

    // A watcher on node 2, mallory on node 1; the backend asks node 2 to disconnect her.
    let mut watcher = n2.connect("watcher", "phone").await;
    within(watcher.subscribe(&["mallory"])).await.unwrap();
    let mut mallory = n1.connect("mallory", "phone").await;
    common::presence_event_of(&mut watcher, "mallory", EventKind::Online).await;
    let (s, v) = post(a2, "/v1/users/mallory/disconnect", json!({})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["disconnected"], json!(["phone"]));
    let close = within(mallory.closed()).await.expect("a Close on node 1");
    assert_eq!(common::close_code(&close), pb::CloseCode::Kicked);
    let e = common::presence_event_of(&mut watcher, "mallory", EventKind::Offline).await;
    assert_eq!(common::reason(&e), OfflineReason::Kicked);

    // carol loses her connection on node 1: node 2 says "grace" (time for a push).
    let carol = n1.connect("carol", "phone").await;
    eventually("node 2 sees carol connected", || async {
        post(a2, "/v1/presence:online", json!({"users": ["carol"]}))
            .await
            .1["status"]["carol"]
            == "connected"
    })
    .await;
    drop(carol);
    eventually("node 2 sees carol in her grace period", || async {
        post(a2, "/v1/presence:online", json!({"users": ["carol"]}))
            .await
            .1["status"]["carol"]
            == "grace"
    })
    .await;

    // A revocation asked of node 1 holds on node 2, also after node 2 restarts.
    let mut eve = n2.connect("eve", "phone").await;
    let (s, v) = post(a1, "/v1/users/eve/revoke", json!({})).await;
    assert_eq!(s, 200, "{v}");
    let close = within(eve.closed())
        .await
        .expect("eve's session on node 2 is closed");
    assert_eq!(common::close_code(&close), pb::CloseCode::Kicked);
    eventually("node 2 refuses eve's old token", || async {
        refusal(n2.addr, old_token("eve"))
            .await
            .is_some_and(|e| common::code(&e) == pb::ErrorCode::TokenRevoked)
    })
    .await;
    n2.kill9().await;
    let data = std::mem::replace(&mut n2.data_dir, tempfile::tempdir().unwrap());
    let n2 = Node::start_in("node2", &nats.urls(), &args, data).await;
    let a2 = n2.admin.unwrap();
    let e = refusal(n2.addr, old_token("eve")).await.expect("refused");
    assert_eq!(common::code(&e), pb::ErrorCode::TokenRevoked);

    // Subscriptions on bob's behalf through node 1 are listed by node 2.
    let (s, v) = post(
        a1,
        "/v1/users/bob/subscriptions",
        json!({"add": ["alice", "dave"]}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = call(
        a2,
        reqwest::Method::GET,
        "/v1/users/bob/subscriptions",
        Value::Null,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["total"], 2, "{v}");

    // Presence on frank's behalf asked of node 2, while node 1 holds his session: node 1
    // applies it, frank's own device and his watchers hear it, node 2 answers with it.
    let mut frank = n1.connect("frank", "phone").await;
    let mut fan = n2.connect("fan", "phone").await;
    within(fan.subscribe(&["frank"])).await.unwrap();
    let (s, v) = post(
        a2,
        "/v1/users/frank/presence",
        json!({"availability": "away", "status": "on a plane"}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["presence"]["status"], "on a plane");
    assert_eq!(v["presence"]["availability"], "away");
    let e = common::presence_event_of(&mut fan, "frank", EventKind::Update).await;
    assert_eq!(e.presence.unwrap().status, "on a plane");
    let e = common::presence_event_of(&mut frank, "frank", EventKind::Update).await;
    assert_eq!(e.presence.unwrap().status, "on a plane");
    let (s, v) = post(a2, "/v1/users/nobody/presence", json!({"status": "x"})).await;
    assert_eq!(s, 404, "{v}");
    drop(n1);
}

/// A webhook receiver on loopback that records every event it is sent.
async fn receiver() -> (SocketAddr, Arc<Mutex<Vec<Value>>>) {
    let seen: Arc<Mutex<Vec<Value>>> = Arc::default();
    let sink = seen.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: axum::body::Bytes| {
            let sink = sink.clone();
            async move {
                let v: Value = serde_json::from_slice(&body).unwrap();
                sink.lock()
                    .unwrap()
                    .extend(v["events"].as_array().unwrap().iter().cloned());
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, seen)
}

fn events_of(seen: &Mutex<Vec<Value>>, kind: &str, user: &str) -> Vec<Value> {
    seen.lock()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == kind && e["user"] == user)
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cluster_sends_each_event_once_and_any_node_replays_them() {
    let nats = NatsCluster::start(1).await;
    let (hook, seen) = receiver().await;
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        file.path(),
        format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n[admin.keys.ops]\nkey = \"{KEY}\"\nscope = \"write\"\n\
             [[webhooks]]\nurl = \"http://{hook}/hook\"\nlinger_ms = 20\n\
             [webhooks.secrets]\nk1 = \"a-raw-secret-of-at-least-16-bytes\"\n"
        ),
    )
    .unwrap();
    let path = file.path().to_str().unwrap().to_string();
    let args = ["--config", path.as_str(), "--grace-period-ms", "1000"];
    let mut n1 = Node::start("node1", &nats.urls(), &args).await;
    let n2 = Node::start("node2", &nats.urls(), &args).await;
    let (a1, a2) = (n1.admin.unwrap(), n2.admin.unwrap());
    let alice = n1.connect("alice", "phone").await;
    within(alice.join("lobby", &[])).await.unwrap();
    let _bob = n2.connect("bob", "phone").await;
    eventually("both user.online events delivered", || async {
        !events_of(&seen, "user.online", "alice").is_empty()
            && !events_of(&seen, "user.online", "bob").is_empty()
    })
    .await;
    // Both nodes have the webhook configured; only one delivers. Any node replays the
    // cluster's events with the same numbering.
    let page = |addr: SocketAddr| async move {
        call(
            addr,
            reqwest::Method::GET,
            "/v1/events?after=0&limit=1000",
            Value::Null,
        )
        .await
        .1
    };
    let ids_seqs = |v: &Value| -> Vec<(String, u64)> {
        v["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["id"].as_str().unwrap().to_string(),
                    e["seq"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let mut p1 = page(a1).await;
    let mut p2 = page(a2).await;
    let started = Instant::now();
    while ids_seqs(&p1) != ids_seqs(&p2) {
        assert!(started.elapsed() < Duration::from_secs(10), "{p1}\n{p2}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        p1 = page(a1).await;
        p2 = page(a2).await;
    }
    let online: Vec<&Value> = p2["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "user.online")
        .collect();
    assert_eq!(online.len(), 2, "{p2}");
    let alice_online = online.iter().find(|e| e["user"] == "alice").unwrap();
    assert_eq!(alice_online["node"], "node1");
    assert_eq!(p1["epoch"], p2["epoch"]);
    // node1 (the smallest id, the deliverer) dies: node2 takes over delivery, and alice
    // going offline after her grace period is reported once, by the survivor.
    n1.kill9().await;
    let _carol = n2.connect("carol", "phone").await;
    let started = Instant::now();
    while events_of(&seen, "user.online", "carol").is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "carol's user.online never delivered by node2:\n{}\n{}\n{:?}",
            n2.log_text(),
            page(a2).await,
            seen.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eventually("alice's user.offline delivered", || async {
        !events_of(&seen, "user.offline", "alice").is_empty()
    })
    .await;
    // At-least-once: the successor may repeat what node1 delivered after it last recorded
    // its progress (never more than once more), and nothing after the failover repeats.
    let all = seen.lock().unwrap().clone();
    let mut count: std::collections::BTreeMap<&str, usize> = Default::default();
    for e in &all {
        *count.entry(e["id"].as_str().unwrap()).or_default() += 1;
    }
    assert!(count.values().all(|&n| n <= 2), "{all:?}");
    assert_eq!(events_of(&seen, "user.online", "carol").len(), 1, "{all:?}");
    assert_eq!(
        events_of(&seen, "user.offline", "alice").len(),
        1,
        "{all:?}"
    );
    // Her channel emptied when her node died: reported once too.
    let vacated = || {
        seen.lock()
            .unwrap()
            .iter()
            .filter(|e| e["type"] == "channel.vacated" && e["channel"] == "lobby")
            .count()
    };
    eventually("lobby's channel.vacated delivered", || async {
        vacated() > 0
    })
    .await;
    assert_eq!(vacated(), 1, "{:?}", seen.lock().unwrap());
}

/// Issue 15 point 4 in cluster mode: a third party's endpoint (`show = "public"`) sees what a
/// stranger is shown, whichever node holds the session and whichever delivers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_public_webhook_sees_a_stranger_s_view_across_nodes() {
    let nats = NatsCluster::start(1).await;
    let (hook, seen) = receiver().await;
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        file.path(),
        format!(
            "[[webhooks]]\nurl = \"http://{hook}/hook\"\nlinger_ms = 20\nshow = \"public\"\n\
             events = [\"user.online\", \"user.offline\", \"user.updated\", \
             \"channel.member.joined\", \"channel.member.left\"]\n\
             [webhooks.secrets]\nk1 = \"a-raw-secret-of-at-least-16-bytes\"\n"
        ),
    )
    .unwrap();
    let path = file.path().to_str().unwrap().to_string();
    let args = ["--config", path.as_str()];
    let n1 = Node::start("node1", &nats.urls(), &args).await;
    let n2 = Node::start("node2", &nats.urls(), &args).await;
    // ghost's session is on node2; node1 (the smallest id) delivers.
    let ghost = n2.connect("ghost", "phone").await;
    within(ghost.join("lobby", &[])).await.unwrap();
    eventually("ghost's join delivered", || async {
        !events_of(&seen, "channel.member.joined", "ghost").is_empty()
    })
    .await;
    within(ghost.set_invisible(true)).await.unwrap();
    eventually("ghost reads as offline", || async {
        !events_of(&seen, "user.offline", "ghost").is_empty()
    })
    .await;
    within(ghost.set_presence(pb::SetPresence {
        status: Some("secret".into()),
        ..Default::default()
    }))
    .await
    .unwrap();
    within(ghost.leave("lobby")).await.unwrap();
    // A later event from the same node: once it is in, anything about ghost would be too.
    let _tick = n2.connect("tick", "phone").await;
    eventually("tick online", || async {
        !events_of(&seen, "user.online", "tick").is_empty()
    })
    .await;
    let about_ghost = |seen: &Mutex<Vec<Value>>| -> Vec<String> {
        seen.lock()
            .unwrap()
            .iter()
            .filter(|e| e["user"] == "ghost")
            .map(|e| e["type"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        about_ghost(&seen),
        [
            "user.online",
            "channel.member.joined",
            "channel.member.left",
            "user.offline"
        ],
        "{:?}",
        seen.lock().unwrap()
    );
    assert!(!seen
        .lock()
        .unwrap()
        .iter()
        .any(|e| e.to_string().contains("secret")));
    let left = events_of(&seen, "channel.member.left", "ghost");
    assert_eq!(left[0]["occupancy"], 0);
    let offline = events_of(&seen, "user.offline", "ghost");
    assert_eq!(offline[0]["reason"], "disconnect");
    // Visible again: online, with the status set meanwhile.
    within(ghost.set_invisible(false)).await.unwrap();
    eventually("ghost back online", || async {
        events_of(&seen, "user.online", "ghost").len() == 2
    })
    .await;
    let online = events_of(&seen, "user.online", "ghost");
    assert_eq!(online[1]["presence"]["status"], "secret");
    drop((n1, n2));
}
