//! The admin API in cluster mode: any node answers for the whole cluster. A disconnect asked
//! of one node closes a session another node holds (Close KICKED there, OFFLINE KICKED for
//! watchers everywhere, at once); the online check sees another node's grace period; a
//! revocation made on one node is refused by every node, also after a restart; subscriptions
//! made on a user's behalf on one node are listed by another; presence set on a user's behalf
//! through one node is applied by the node holding the session.

mod common;

use std::net::SocketAddr;
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
