//! The admin HTTP API through a real socket: keys and scopes, caps and error shapes, and
//! every operation checked against what a client of the wire protocol sees (GetPresence,
//! Close KICKED, OFFLINE KICKED, a revoked token refused across a restart, subscriptions
//! made on a user's behalf fanning out and surviving a restart, the event replay).

mod common;

use std::net::SocketAddr;

use common::{connect, connect_device, within};
use presenced::admin::{AdminKey, Scope};
use presenced::pb::{self, EventKind, OfflineReason};
use presenced::Config;
use serde_json::{json, Value};

const WRITE_KEY: &str = "write-key-0123456789abcdef0123456789abcdef";
const READ_KEY: &str = "read-key-0123456789abcdef0123456789abcdef00";

fn with_admin(c: &mut Config) {
    c.admin.listen = "127.0.0.1:0".parse().unwrap();
    c.admin.keys.insert(
        "ops".into(),
        AdminKey {
            key: WRITE_KEY.into(),
            scope: Scope::Write,
        },
    );
    c.admin.keys.insert(
        "dash".into(),
        AdminKey {
            key: READ_KEY.into(),
            scope: Scope::Read,
        },
    );
    c.session.grace_period_ms = 60_000;
}

struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    fn new(addr: SocketAddr) -> Api {
        Api {
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
            base: format!("http://{addr}"),
        }
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = within(req.send()).await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = within(resp.text()).await.unwrap();
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, headers, value)
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let (s, _, v) = self
            .call(reqwest::Method::POST, path, Some(WRITE_KEY), Some(body))
            .await;
        (s, v)
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let (s, _, v) = self
            .call(reqwest::Method::GET, path, Some(READ_KEY), None)
            .await;
        (s, v)
    }
}

fn error_code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("<none>")
}

#[tokio::test]
async fn the_api_is_off_without_a_key() {
    let broker = common::start(|c| c.admin.listen = "127.0.0.1:0".parse().unwrap()).await;
    assert!(broker.admin_addr.is_none());
}

#[tokio::test]
async fn keys_scopes_caps_and_errors() {
    let broker = common::start(with_admin).await;
    let api = Api::new(broker.admin_addr.unwrap());
    let body = json!({"users": ["alice"]});
    // No key, a wrong key, a malformed header.
    let (s, _, v) = api
        .call(
            reqwest::Method::POST,
            "/v1/presence:query",
            None,
            Some(body.clone()),
        )
        .await;
    assert_eq!((s, error_code(&v)), (401, "UNAUTHENTICATED"), "{v}");
    let (s, _, v) = api
        .call(
            reqwest::Method::POST,
            "/v1/presence:query",
            Some("not-the-key-0123456789abcdef0123456789abcdef"),
            Some(body.clone()),
        )
        .await;
    assert_eq!((s, error_code(&v)), (401, "UNAUTHENTICATED"), "{v}");
    // A read key reads, and is refused on a write route.
    let (s, _, _) = api
        .call(
            reqwest::Method::POST,
            "/v1/presence:query",
            Some(READ_KEY),
            Some(body),
        )
        .await;
    assert_eq!(s, 200);
    let (s, _, v) = api
        .call(
            reqwest::Method::POST,
            "/v1/users/alice/disconnect",
            Some(READ_KEY),
            Some(json!({})),
        )
        .await;
    assert_eq!((s, error_code(&v)), (403, "PERMISSION_DENIED"), "{v}");
    // 500 ids pass, 501 do not.
    let users: Vec<String> = (0..501).map(|i| format!("u{i}")).collect();
    let (s, v) = api
        .post("/v1/presence:query", json!({"users": users[..500]}))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["presences"].as_array().unwrap().len(), 500);
    let (s, v) = api
        .post("/v1/presence:query", json!({"users": users}))
        .await;
    assert_eq!((s, error_code(&v)), (400, "TOO_MANY_IDS"), "{v}");
    assert!(
        v["error"]["reason"].as_str().unwrap().contains("users"),
        "{v}"
    );
    // Unknown fields are refused, naming the field; a bad id names the field too.
    let (s, v) = api
        .post("/v1/presence:online", json!({"users": ["a"], "usres": []}))
        .await;
    assert_eq!((s, error_code(&v)), (400, "BAD_REQUEST"), "{v}");
    assert!(
        v["error"]["reason"].as_str().unwrap().contains("usres"),
        "{v}"
    );
    let (s, v) = api
        .post("/v1/presence:online", json!({"users": [""]}))
        .await;
    assert_eq!((s, error_code(&v)), (400, "INVALID_USER_ID"), "{v}");
    // Bodies over 256 KiB: 413.
    let big = "x".repeat(300 * 1024);
    let (s, v) = api
        .post("/v1/presence:query", json!({"users": [big]}))
        .await;
    assert_eq!(s, 413, "{v}");
    // Unknown query parameters and routes.
    let (s, v) = api.get("/v1/events?afterr=1").await;
    assert_eq!((s, error_code(&v)), (400, "BAD_REQUEST"), "{v}");
    assert!(v["error"]["reason"].as_str().unwrap().contains("afterr"));
    let (s, _) = api.get("/v2/nothing").await;
    assert_eq!(s, 404);
}

#[tokio::test]
async fn a_key_over_its_rate_gets_429_with_retry_after() {
    let broker = common::start(|c| {
        with_admin(c);
        c.admin.rate_per_sec = 1;
        c.admin.burst = 2;
    })
    .await;
    let api = Api::new(broker.admin_addr.unwrap());
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..4 {
        let (s, h, _) = api
            .call(
                reqwest::Method::POST,
                "/v1/presence:online",
                Some(READ_KEY),
                Some(json!({"users": ["a"]})),
            )
            .await;
        statuses.push(s);
        if s == 429 {
            retry_after = h
                .get("retry-after")
                .map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
        }
    }
    assert_eq!(&statuses[..2], &[200, 200]);
    assert!(statuses[2..].contains(&429), "{statuses:?}");
    assert!(retry_after.is_some_and(|s| s >= 1), "{retry_after:?}");
    // Another key has its own bucket.
    let (s, _) = api
        .post("/v1/presence:online", json!({"users": ["a"]}))
        .await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn query_and_online_match_what_clients_see() {
    let broker = common::start(with_admin).await;
    let api = Api::new(broker.admin_addr.unwrap());
    let alice = connect(&broker, "alice").await;
    alice
        .set_presence(pb::SetPresence {
            availability: pb::Availability::Away as i32,
            status: Some("lunch".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let bob = connect(&broker, "bob").await;
    let carol = connect(&broker, "carol").await;
    let wire = within(bob.get_presence(&["alice", "nobody"]))
        .await
        .unwrap();
    let (s, v) = api
        .post("/v1/presence:query", json!({"users": ["alice", "nobody"]}))
        .await;
    assert_eq!(s, 200, "{v}");
    let got = &v["presences"];
    assert_eq!(got[0]["user"], "alice");
    assert_eq!(got[0]["availability"], "away");
    assert_eq!(got[0]["status"], wire[0].status);
    assert_eq!(got[0]["version"], wire[0].version);
    assert_eq!(got[0]["devices"][0]["device"], "phone");
    assert_eq!(got[1]["availability"], "offline");
    assert_eq!(got[1]["version"], wire[1].version);
    // carol loses her connection: in her grace period she is "grace".
    drop(carol);
    let started = std::time::Instant::now();
    loop {
        let (_, v) = api
            .post(
                "/v1/presence:online",
                json!({"users": ["alice", "carol", "nobody"]}),
            )
            .await;
        if v["status"]["carol"] == "grace" {
            assert_eq!(v["status"]["alice"], "connected");
            assert_eq!(v["status"]["nobody"], "offline");
            break;
        }
        assert!(started.elapsed().as_secs() < 5, "{v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(alice);
}

#[tokio::test]
async fn disconnect_closes_the_client_and_watchers_see_offline_kicked_at_once() {
    let broker = common::start(with_admin).await;
    let api = Api::new(broker.admin_addr.unwrap());
    let mut watcher = connect(&broker, "watcher").await;
    within(watcher.subscribe(&["mallory"])).await.unwrap();
    let mut phone = connect_device(&broker, "mallory", "phone").await;
    let mut laptop = connect_device(&broker, "mallory", "laptop").await;
    common::presence_event_of(&mut watcher, "mallory", EventKind::Online).await;
    // One device: the other stays, watchers see UPDATE.
    let (s, v) = api
        .post(
            "/v1/users/mallory/disconnect",
            json!({"device": "laptop", "reason": "session reset"}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["disconnected"], json!(["laptop"]));
    let close = within(laptop.closed()).await.expect("a Close");
    assert_eq!(common::close_code(&close), pb::CloseCode::Kicked);
    assert_eq!(close.reason, "session reset");
    // The whole user: OFFLINE KICKED at once, although the grace period is a minute.
    let (s, v) = api.post("/v1/users/mallory/disconnect", json!({})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["disconnected"], json!(["phone"]));
    let close = within(phone.closed()).await.expect("a Close");
    assert_eq!(common::close_code(&close), pb::CloseCode::Kicked);
    let e = common::presence_event_of(&mut watcher, "mallory", EventKind::Offline).await;
    assert_eq!(common::reason(&e), OfflineReason::Kicked);
    let (_, v) = api
        .post("/v1/presence:online", json!({"users": ["mallory"]}))
        .await;
    assert_eq!(v["status"]["mallory"], "offline");
}

#[tokio::test]
async fn a_revoked_token_is_refused_after_a_restart_too_and_a_fresh_one_works() {
    let broker = common::start(with_admin).await;
    let api = Api::new(broker.admin_addr.unwrap());
    let mut live = connect(&broker, "eve").await;
    // Tokens issued before this second are revoked.
    let cut = common::now_secs() * 1000;
    let old = presenced::auth::mint(
        presenced::config::DEV_SECRET.as_bytes(),
        Some(presenced::config::DEV_KID),
        &presenced::auth::Claims {
            iat: Some(common::now_secs() - 60),
            ..common::claims("eve", common::now_secs() + 3600)
        },
    );
    let (s, v) = api
        .post("/v1/users/eve/revoke", json!({"before_ms": cut}))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["revoked_before_ms"], cut);
    assert_eq!(v["disconnected"], json!(["phone"]));
    let close = within(live.closed()).await.expect("a Close");
    assert_eq!(common::close_code(&close), pb::CloseCode::Kicked);
    let refused = |broker: &common::Broker, token: String| {
        let options = presenced::client::ClientOptions::new(broker.addr, token);
        async move {
            match within(presenced::client::Client::connect(options)).await {
                Err(presenced::client::ClientError::Server(e)) => e,
                other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
            }
        }
    };
    let e = refused(&broker, old.clone()).await;
    assert_eq!(common::code(&e), pb::ErrorCode::TokenRevoked, "{e:?}");
    // A token without iat cannot prove it is fresh.
    let no_iat = presenced::auth::mint(
        presenced::config::DEV_SECRET.as_bytes(),
        Some(presenced::config::DEV_KID),
        &common::claims("eve", common::now_secs() + 3600),
    );
    assert_eq!(
        common::code(&refused(&broker, no_iat).await),
        pb::ErrorCode::TokenRevoked
    );
    // Across a restart.
    let data = broker.stop_keeping_data().await;
    let broker = common::start_in(data, with_admin).await;
    let e = refused(&broker, old).await;
    assert_eq!(common::code(&e), pb::ErrorCode::TokenRevoked, "{e:?}");
    // Other users are untouched, and a fresh token of eve works.
    connect(&broker, "frank").await;
    connect(&broker, "eve").await;
}

#[tokio::test]
async fn subscriptions_on_a_users_behalf_fan_out_and_are_durable() {
    let broker = common::start(with_admin).await;
    let api = Api::new(broker.admin_addr.unwrap());
    let mut bob = connect(&broker, "bob").await;
    let (s, v) = api
        .post(
            "/v1/users/bob/subscriptions",
            json!({"add": ["alice", "carol"], "expiry_secs": 3600}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["subscription_count"], 2);
    // bob's client sees alice through the subscription the backend made.
    let _alice = connect(&broker, "alice").await;
    common::presence_event_of(&mut bob, "alice", EventKind::Online).await;
    let listed = within(bob.all_subscriptions()).await.unwrap();
    assert_eq!(listed.len(), 2);
    let (s, v) = api
        .post("/v1/users/bob/subscriptions", json!({"remove": ["carol"]}))
        .await;
    assert_eq!((s, &v["removed"]), (200, &json!(1)), "{v}");
    let (s, v) = api
        .post("/v1/users/bob/subscriptions", json!({"add": ["bob"]}))
        .await;
    assert_eq!((s, error_code(&v)), (400, "SELF_SUBSCRIPTION"), "{v}");
    // Paged listing, and it survives a restart.
    let data = broker.stop_keeping_data().await;
    let broker = common::start_in(data, with_admin).await;
    let api = Api::new(broker.admin_addr.unwrap());
    let (s, v) = api.get("/v1/users/bob/subscriptions?limit=10").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["total"], 1);
    assert_eq!(v["subscriptions"][0]["user"], "alice");
    assert_eq!(v["next_cursor"], "");
}

#[tokio::test]
async fn presence_on_a_users_behalf_and_channels() {
    let broker = common::start(with_admin).await;
    let api = Api::new(broker.admin_addr.unwrap());
    let (s, v) = api
        .post("/v1/users/ghost/presence", json!({"status": "hi"}))
        .await;
    assert_eq!((s, error_code(&v)), (404, "NOT_CONNECTED"), "{v}");
    let mut alice = connect(&broker, "alice").await;
    let mut bob = connect(&broker, "bob").await;
    within(bob.subscribe(&["alice"])).await.unwrap();
    let (s, v) = api
        .post(
            "/v1/users/alice/presence",
            json!({"availability": "dnd", "status": "in a meeting"}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["presence"]["availability"], "dnd");
    let e = common::presence_event_of(&mut bob, "alice", EventKind::Update).await;
    assert_eq!(e.presence.unwrap().status, "in a meeting");
    // alice's own device hears it too.
    let e = common::presence_event_of(&mut alice, "alice", EventKind::Update).await;
    assert_eq!(e.presence.unwrap().status, "in a meeting");
    // Channels: members (paged), occupancy, where-now.
    let carol = connect(&broker, "carol").await;
    within(alice.join("room/42", Default::default()))
        .await
        .unwrap();
    within(carol.join("room/42", Default::default()))
        .await
        .unwrap();
    let (s, v) = api.get("/v1/channels/room%2F42/members?limit=1").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["occupancy"], 2);
    assert_eq!(v["members"][0]["user"], "alice");
    let cursor = v["next_cursor"].as_str().unwrap().to_string();
    assert!(!cursor.is_empty());
    let (_, v) = api
        .get(&format!(
            "/v1/channels/room%2F42/members?limit=1&cursor={cursor}"
        ))
        .await;
    assert_eq!(v["members"][0]["user"], "carol");
    assert_eq!(v["next_cursor"], "");
    let (s, v) = api
        .post(
            "/v1/channels:occupancy",
            json!({"channels": ["room/42", "empty"]}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["channels"]["room/42"]["occupancy"], 2);
    assert_eq!(v["channels"]["empty"]["occupancy"], 0);
    let (_, v) = api.get("/v1/users/alice/channels").await;
    assert_eq!(v["channels"], json!(["room/42"]));
}

#[tokio::test]
async fn the_event_replay_starts_with_server_started_and_long_polls() {
    let broker = common::start(with_admin).await;
    let api = Api::new(broker.admin_addr.unwrap());
    let (s, v) = api.get("/v1/events?after=0&limit=10").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["events"][0]["type"], "server.started");
    assert_eq!(v["events"][0]["seq"], 1);
    let epoch = v["epoch"].clone();
    assert_eq!(v["events"][0]["epoch"], epoch);
    let after = v["next_after"].as_u64().unwrap();
    // A long-poll returns as soon as something happens.
    let poll = {
        let http = api.http.clone();
        let url = format!("{}/v1/events?after={after}&wait_ms=10000", api.base);
        tokio::spawn(async move {
            http.get(url)
                .bearer_auth(READ_KEY)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        })
    };
    let client = connect(&broker, "zoe").await;
    let v = within(poll).await.unwrap();
    let types: Vec<&str> = v["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(types.first(), Some(&"user.online"), "{v}");
    assert_eq!(v["events"][0]["user"], "zoe");
    assert_eq!(v["events"][0]["presence"]["availability"], "online");
    // A clean Disconnect: user.offline at once, reason disconnect.
    let after = v["next_after"].as_u64().unwrap();
    within(client.disconnect()).await.unwrap();
    let (_, v) = api
        .get(&format!("/v1/events?after={after}&wait_ms=5000"))
        .await;
    let offline = v["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "user.offline")
        .unwrap_or_else(|| panic!("{v}"));
    assert_eq!(offline["reason"], "disconnect");
    assert!(offline["version"].as_u64().unwrap() > 0);
}

/// Reads what the server sends on `stream` until it closes or `limit` passes; `None` when it
/// neither answered nor closed in time.
async fn read_until_close(stream: &mut tokio::net::TcpStream, limit: Duration) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(String::from_utf8_lossy(&got).into_owned()),
            Ok(Ok(n)) => {
                got.extend_from_slice(&buf[..n]);
                if got.windows(4).any(|w| w == b"\r\n\r\n") && !got.is_empty() {
                    return Some(String::from_utf8_lossy(&got).into_owned());
                }
            }
            Err(_) => return None,
        }
    }
}

use std::time::Duration;
use tokio::io::AsyncWriteExt;

#[tokio::test]
async fn no_body_is_read_before_the_key_is_checked() {
    // Found by review: every handler read (up to 256 KiB of) the body before checking the
    // key, so unauthenticated peers could make the broker hold hundreds of MB.
    let broker = common::start(tight).await;
    let addr = broker.admin_addr.unwrap();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"POST /v1/presence:query HTTP/1.1\r\nHost: x\r\nContent-Length: 262144\r\n\
          Content-Type: application/json\r\n\r\n",
    )
    .await
    .unwrap();
    let answer = read_until_close(&mut s, Duration::from_secs(3))
        .await
        .expect("answered without waiting for the body");
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    // With the key, the body is awaited (and a missing one runs into the deadline).
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!(
            "POST /v1/presence:query HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {WRITE_KEY}\r\n\
             Content-Length: 100\r\n\r\n{{\"users\""
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let answer = read_until_close(&mut s, Duration::from_secs(5))
        .await
        .expect("the body deadline (1 s here) answers");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
}

fn tight(c: &mut Config) {
    with_admin(c);
    c.admin.request_timeout_ms = 1_000;
    c.admin.max_connections = 3;
}

#[tokio::test]
async fn slow_headers_are_cut_off_and_connections_are_capped() {
    let broker = common::start(tight).await;
    let addr = broker.admin_addr.unwrap();
    // Headers that never finish: closed at the deadline.
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /v1/events HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    read_until_close(&mut slow, Duration::from_secs(5))
        .await
        .expect("closed at the header deadline");
    assert!(started.elapsed() < Duration::from_secs(4));
    // Three idle connections fill the cap; a fourth is closed at once, unanswered.
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    let mut fourth = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = fourth
        .write_all(b"GET /v1/events HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let answer = read_until_close(&mut fourth, Duration::from_secs(3))
        .await
        .expect("closed");
    assert_eq!(answer, "", "the fourth connection is not served");
    // The idle ones time out too, and the API serves again.
    drop(idle);
    let api = Api::new(addr);
    let started = std::time::Instant::now();
    loop {
        let (s, _) = api.get("/v1/events?after=0&limit=1").await;
        if s == 200 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A connection stuck in its headers does not hold up shutdown.
    let mut stuck = tokio::net::TcpStream::connect(addr).await.unwrap();
    stuck
        .write_all(b"POST /v1/presence:query HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    within(broker.stop()).await;
}

#[tokio::test]
async fn a_token_may_not_outlive_a_revocation() {
    // Found by review: the lifetime cap was measured from now, so a token with exp - iat
    // beyond it was refused at first, then accepted, also after its revocation lapsed.
    let broker = common::start(|c| {
        with_admin(c);
        c.auth.max_token_lifetime_secs = 20;
    })
    .await;
    let now = common::now_secs();
    let long = presenced::auth::mint(
        presenced::config::DEV_SECRET.as_bytes(),
        Some(presenced::config::DEV_KID),
        &presenced::auth::Claims {
            iat: Some(now - 10),
            ..common::claims("ivy", now + 15)
        },
    );
    let options = presenced::client::ClientOptions::new(broker.addr, long);
    match within(presenced::client::Client::connect(options)).await {
        Err(presenced::client::ClientError::Server(e)) => {
            assert_eq!(common::code(&e), pb::ErrorCode::Unauthenticated, "{e:?}");
            assert!(e.reason.contains("lifetime"), "{e:?}");
        }
        other => panic!("a 25 s token under a 20 s cap: {:?}", other.map(|_| ())),
    }
    // A revocation older than any live token is refused as pointless.
    let api = Api::new(broker.admin_addr.unwrap());
    let (s, v) = api
        .post("/v1/users/ivy/revoke", json!({"before_ms": 1000}))
        .await;
    assert_eq!((s, error_code(&v)), (400, "BAD_REQUEST"), "{v}");
}
