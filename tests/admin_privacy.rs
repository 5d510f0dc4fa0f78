//! Privacy through the admin HTTP API, over a real socket against a real broker: invisibility,
//! blocks, audiences and approvals set on a user's behalf have the same effect for wire clients
//! as the user's own SetInvisible / Block / SetPrivacy / SetApproval (OFFLINE then ONLINE for a
//! watcher, a frozen offline blocker in GetPresence, SubscriptionAccepted before the ONLINE an
//! approval brings), a wire Subscribe's request shows as pending to the backend, the block and
//! approval lists page, bad bodies and read keys are refused in the API's error shape, a 200
//! survives kill -9 (answered once durable), and cluster mode answers 503.

mod common;

use std::net::SocketAddr;

use common::cluster::Node;
use common::nats::NatsCluster;
use common::{
    availability, connect, connect_device, presence_event_of, reason, spawn_presenced, within,
};
use presenced::admin::{AdminKey, Scope};
use presenced::client::Client;
use presenced::pb::{self, EventKind};
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
}

/// A config file turning the admin API on with both keys (for spawned processes).
fn config_file(dir: &std::path::Path) -> String {
    let path = dir.join("admin.toml");
    std::fs::write(
        &path,
        format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n\
             [admin.keys.ops]\nkey = \"{WRITE_KEY}\"\nscope = \"write\"\n\
             [admin.keys.dash]\nkey = \"{READ_KEY}\"\nscope = \"read\"\n"
        ),
    )
    .unwrap();
    path.to_str().unwrap().to_string()
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

    /// A POST with a raw (possibly not JSON) body.
    async fn post_raw(&self, path: &str, raw: &str) -> (u16, Value) {
        let req = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(WRITE_KEY)
            .header("content-type", "application/json")
            .body(raw.to_string());
        let resp = within(req.send()).await.unwrap();
        let status = resp.status().as_u16();
        let text = within(resp.text()).await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let (s, _, v) = self
            .call(reqwest::Method::GET, path, Some(READ_KEY), None)
            .await;
        (s, v)
    }

    /// `GET /v1/users/{user}/privacy`, which must succeed.
    async fn privacy(&self, user: &str) -> Value {
        let (s, v) = self.get(&format!("/v1/users/{user}/privacy")).await;
        assert_eq!(s, 200, "{v}");
        v
    }

    /// Every page of `user`'s block list, `limit` at a time: the users in order, and the
    /// pages as answered.
    async fn all_blocked(&self, user: &str, limit: u32) -> (Vec<String>, Vec<Value>) {
        let mut users = Vec::new();
        let mut pages = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let path = match &after {
                None => format!("/v1/users/{user}/blocks?limit={limit}"),
                Some(a) => format!("/v1/users/{user}/blocks?limit={limit}&after={a}"),
            };
            let (s, v) = self.get(&path).await;
            assert_eq!(s, 200, "{v}");
            let page = v["blocked"].as_array().unwrap().clone();
            assert!(page.len() <= limit as usize, "{v}");
            for entry in &page {
                users.push(entry["user"].as_str().unwrap().to_string());
                assert!(entry["since_ms"].as_u64().unwrap() > 0, "{v}");
            }
            pages.push(v.clone());
            match &v["next_after"] {
                Value::Null => break,
                Value::String(a) => {
                    assert_eq!(Some(a.as_str()), users.last().map(String::as_str), "{v}");
                    after = Some(a.clone());
                }
                other => panic!("next_after is {other}"),
            }
            assert!(pages.len() < 100, "paging does not end");
        }
        (users, pages)
    }

    /// Every page of `user`'s approvals in `state` ("" for all), `limit` at a time: the
    /// `(user, state)` entries in order (each with a `since_ms`), and the pages as answered.
    async fn all_approvals(
        &self,
        user: &str,
        state: &str,
        limit: u32,
    ) -> (Vec<(String, String)>, Vec<Value>) {
        let mut entries: Vec<(String, String)> = Vec::new();
        let mut pages = Vec::new();
        let mut after = String::new();
        loop {
            let path =
                format!("/v1/users/{user}/approvals?state={state}&limit={limit}&after={after}");
            let (s, v) = self.get(&path).await;
            assert_eq!(s, 200, "{path}: {v}");
            assert_eq!(v["user"], json!(user), "{v}");
            let page = v["approvals"].as_array().unwrap().clone();
            assert!(page.len() <= limit as usize, "{v}");
            for entry in &page {
                assert_eq!(entry.as_object().unwrap().len(), 3, "{v}");
                assert!(entry["since_ms"].as_u64().unwrap() > 0, "{v}");
                let e_state = entry["state"].as_str().unwrap().to_string();
                if !state.is_empty() {
                    assert_eq!(e_state, state, "{v}");
                }
                entries.push((entry["user"].as_str().unwrap().to_string(), e_state));
            }
            pages.push(v.clone());
            match &v["next_after"] {
                Value::Null => break,
                Value::String(a) => {
                    assert_eq!(Some(a), entries.last().map(|(u, _)| u), "{v}");
                    after = a.clone();
                }
                other => panic!("next_after is {other}"),
            }
            assert!(pages.len() < 100, "paging does not end");
        }
        for page in &pages {
            assert_eq!(page["total"], json!(entries.len()), "{page}");
        }
        (entries, pages)
    }

    /// The users in `user`'s approvals in `state` (every page, 100 at a time).
    async fn approvals(&self, user: &str, state: &str) -> Vec<String> {
        self.all_approvals(user, state, 100)
            .await
            .0
            .into_iter()
            .map(|(u, _)| u)
            .collect()
    }
}

/// What `GET /v1/users/{user}/privacy` answers for a user with the default audiences and no
/// approvals or requests.
fn plain_privacy(user: &str, invisible: bool, blocked_total: u64) -> Value {
    json!({
        "user": user,
        "invisible": invisible,
        "invisible_devices": [],
        "audience": "everyone",
        "last_seen_audience": "everyone",
        "blocked_total": blocked_total,
        "approved": 0,
        "pending": 0,
    })
}

fn error_code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("<none>")
}

fn error_reason(v: &Value) -> &str {
    v["error"]["reason"].as_str().unwrap_or("<none>")
}

/// The API's error shape: `{"error": {"code", "code_number", "reason"}}` and nothing else.
fn assert_error_shape(v: &Value) {
    let error = v["error"].as_object().unwrap_or_else(|| panic!("{v}"));
    assert_eq!(v.as_object().unwrap().len(), 1, "{v}");
    assert!(error["code"].is_string(), "{v}");
    assert!(error["code_number"].is_u64(), "{v}");
    assert!(!error_reason(v).is_empty(), "{v}");
}

async fn get(client: &Client, user: &str) -> pb::Presence {
    within(client.get_presence(&[user]))
        .await
        .unwrap()
        .remove(0)
}

/// What the backend's presence query shows of `user` (the truth).
async fn backend_availability(api: &Api, user: &str) -> String {
    let (s, v) = api
        .post("/v1/presence:query", json!({ "users": [user] }))
        .await;
    assert_eq!(s, 200, "{v}");
    v["presences"][0]["availability"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invisible_via_admin_makes_a_watcher_see_offline_then_online() {
    let broker = common::start(with_admin).await;
    let api = Api::new(broker.admin_addr.unwrap());
    let mut w = connect(&broker, "w").await;
    within(w.subscribe(&["alice"])).await.unwrap();
    let alice = connect_device(&broker, "alice", "phone").await;
    presence_event_of(&mut w, "alice", EventKind::Online).await;
    assert_eq!(api.privacy("alice").await, plain_privacy("alice", false, 0));
    // A device invisible on its own: the backend is told which.
    let mut hidden = common::options(&broker, "alice", "tablet");
    hidden.invisible_device = true;
    let tablet = within(Client::connect(hidden)).await.unwrap();
    assert_eq!(
        api.privacy("alice").await["invisible_devices"],
        json!(["tablet"])
    );
    tablet.disconnect().await.unwrap();
    assert_eq!(api.privacy("alice").await, plain_privacy("alice", false, 0));

    // Invisible on the user's behalf: the watcher sees her go offline, as for SetInvisible.
    let (s, v) = api
        .post("/v1/users/alice/invisible", json!({"invisible": true}))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["invisible"], json!(true), "{v}");
    let gone = presence_event_of(&mut w, "alice", EventKind::Offline).await;
    assert_eq!(reason(&gone), pb::OfflineReason::Disconnect);
    let shown = get(&w, "alice").await;
    assert_eq!(availability(&shown), pb::Availability::Offline);
    assert_eq!(shown.version, gone.version);
    assert!(shown.devices.is_empty(), "{shown:?}");
    // The backend, and the user's own devices, see the truth.
    assert_eq!(api.privacy("alice").await["invisible"], json!(true));
    assert_eq!(backend_availability(&api, "alice").await, "online");
    assert_eq!(
        availability(&get(&alice, "alice").await),
        pb::Availability::Online
    );
    // Setting it again changes nothing and is still answered.
    let (s, v) = api
        .post("/v1/users/alice/invisible", json!({"invisible": true}))
        .await;
    assert_eq!((s, &v["invisible"]), (200, &json!(true)), "{v}");

    // Visible again: ONLINE, at a higher version.
    let (s, v) = api
        .post("/v1/users/alice/invisible", json!({"invisible": false}))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["invisible"], json!(false), "{v}");
    let back = presence_event_of(&mut w, "alice", EventKind::Online).await;
    assert!(back.version > gone.version);
    assert_eq!(
        availability(back.presence.as_ref().unwrap()),
        pb::Availability::Online
    );
    assert_eq!(
        availability(&get(&w, "alice").await),
        pb::Availability::Online
    );
    assert_eq!(api.privacy("alice").await["invisible"], json!(false));

    // What the admin sets, the wire sees, and the other way round.
    within(alice.set_invisible(true)).await.unwrap();
    presence_event_of(&mut w, "alice", EventKind::Offline).await;
    assert_eq!(api.privacy("alice").await["invisible"], json!(true));
    let (s, _) = api
        .post("/v1/users/alice/invisible", json!({"invisible": false}))
        .await;
    assert_eq!(s, 200);
    presence_event_of(&mut w, "alice", EventKind::Online).await;
    let own = within(alice.set_invisible(false)).await.unwrap();
    assert!(!own.invisible);

    // A user with no session can be made invisible too (the setting waits for her).
    let (s, v) = api
        .post("/v1/users/nobody-yet/invisible", json!({"invisible": true}))
        .await;
    assert_eq!((s, &v["invisible"]), (200, &json!(true)), "{v}");
    assert_eq!(api.privacy("nobody-yet").await["invisible"], json!(true));
}

/// Every read the backend makes, answered as `viewer` ("public", a user id, or None for the
/// truth) is shown `user` in `channel`: (presence availability, online status, occupancy,
/// member ids, where-now channels).
async fn seen_by(
    api: &Api,
    viewer: Option<&str>,
    user: &str,
    channel: &str,
) -> (String, String, u64, Vec<String>, Vec<String>) {
    let with = |mut body: Value| {
        if let Some(v) = viewer {
            body["viewer"] = json!(v);
        }
        body
    };
    let query = viewer.map_or(String::new(), |v| format!("?viewer={v}"));
    let (s, p) = api
        .post("/v1/presence:query", with(json!({ "users": [user] })))
        .await;
    assert_eq!(s, 200, "{p}");
    let (s, o) = api
        .post("/v1/presence:online", with(json!({ "users": [user] })))
        .await;
    assert_eq!(s, 200, "{o}");
    let (s, occ) = api
        .post(
            "/v1/channels:occupancy",
            with(json!({ "channels": [channel] })),
        )
        .await;
    assert_eq!(s, 200, "{occ}");
    let (s, m) = api
        .get(&format!("/v1/channels/{channel}/members{query}"))
        .await;
    assert_eq!(s, 200, "{m}");
    let (s, w) = api.get(&format!("/v1/users/{user}/channels{query}")).await;
    assert_eq!(s, 200, "{w}");
    assert_eq!(
        occ["channels"][channel]["occupancy"], m["occupancy"],
        "occupancy and members agree: {occ} {m}"
    );
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap().to_string())
            .collect()
    };
    (
        p["presences"][0]["availability"]
            .as_str()
            .unwrap()
            .to_string(),
        o["status"][user].as_str().unwrap().to_string(),
        occ["channels"][channel]["occupancy"].as_u64().unwrap(),
        m["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["user"].as_str().unwrap().to_string())
            .collect(),
        strings(&w["channels"]),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_with_a_viewer_answer_as_that_viewer_is_shown() {
    let broker = common::start(with_admin).await;
    let api = Api::new(broker.admin_addr.unwrap());
    let t = connect(&broker, "t").await;
    within(t.join("room", &[])).await.unwrap();
    let shown = |avail: &str, status: &str, occ: u64, members: &[&str], rooms: &[&str]| {
        (
            avail.to_string(),
            status.to_string(),
            occ,
            members.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            rooms.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        )
    };
    let visible = shown("online", "connected", 1, &["t"], &["room"]);
    let hidden = shown("offline", "offline", 0, &[], &[]);
    for viewer in [None, Some("public"), Some("v"), Some("w"), Some("t")] {
        assert_eq!(
            seen_by(&api, viewer, "t", "room").await,
            visible,
            "{viewer:?}"
        );
    }

    // t blocks v: v (only) is shown t offline and in no room; the truth is unchanged.
    let (s, v) = api
        .post("/v1/users/t/blocks", json!({"block": ["v"]}))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(seen_by(&api, Some("v"), "t", "room").await, hidden);
    for viewer in [None, Some("public"), Some("w"), Some("t")] {
        assert_eq!(
            seen_by(&api, viewer, "t", "room").await,
            visible,
            "{viewer:?}"
        );
    }

    // t goes invisible: everyone but t and the backend is shown t offline.
    let (s, v) = api
        .post("/v1/users/t/invisible", json!({"invisible": true}))
        .await;
    assert_eq!(s, 200, "{v}");
    for viewer in [Some("public"), Some("v"), Some("w")] {
        assert_eq!(
            seen_by(&api, viewer, "t", "room").await,
            hidden,
            "{viewer:?}"
        );
    }
    for viewer in [None, Some("t")] {
        assert_eq!(
            seen_by(&api, viewer, "t", "room").await,
            visible,
            "{viewer:?}"
        );
    }

    // A bad viewer is refused in the error shape, wherever it is given.
    for bad in ["", "a\u{7}b"] {
        let (s, v) = api
            .post("/v1/presence:query", json!({"users": ["t"], "viewer": bad}))
            .await;
        assert_eq!(s, 400, "{v}");
        assert_eq!(error_code(&v), "INVALID_USER_ID", "{v}");
        assert!(error_reason(&v).contains("viewer"), "{v}");
    }
    let (s, v) = api.get("/v1/users/t/channels?viewer=").await;
    assert_eq!((s, error_code(&v)), (400, "INVALID_USER_ID"), "{v}");
    let (s, v) = api.get("/v1/users/t/channels?viewr=v").await;
    assert_eq!(s, 400, "{v}");
    assert!(error_reason(&v).contains("viewr"), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_via_admin_hide_the_blocker_and_the_list_pages() {
    let broker = common::start(with_admin).await;
    let api = Api::new(broker.admin_addr.unwrap());
    let a = connect(&broker, "a").await;
    let mut b = connect(&broker, "b").await;
    within(b.subscribe(&["a"])).await.unwrap();
    within(a.set_presence(pb::SetPresence {
        status: Some("here".into()),
        ..Default::default()
    }))
    .await
    .unwrap();
    presence_event_of(&mut b, "a", EventKind::Update).await;
    assert_eq!(availability(&get(&b, "a").await), pb::Availability::Online);

    // a blocks b (and four others) on a's behalf: b sees a go offline and stay so.
    let (s, v) = api
        .post(
            "/v1/users/a/blocks",
            json!({"block": ["b", "c1", "c2", "c3", "c4", "c1"]}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v, json!({"user": "a", "changed": 5, "total": 5}));
    let gone = presence_event_of(&mut b, "a", EventKind::Offline).await;
    assert_eq!(reason(&gone), pb::OfflineReason::Disconnect);
    let shown = get(&b, "a").await;
    assert_eq!(availability(&shown), pb::Availability::Offline);
    assert!(
        shown.status.is_empty() && shown.devices.is_empty(),
        "{shown:?}"
    );
    // The blocker sees b offline too (blocking hides both ways); the backend sees the truth.
    assert_eq!(availability(&get(&a, "b").await), pb::Availability::Offline);
    assert_eq!(backend_availability(&api, "a").await, "online");
    assert_eq!(api.privacy("a").await, plain_privacy("a", false, 5));
    // The user's own list (the wire) holds what the backend blocked.
    let listed = within(a.list_blocked("", 0)).await.unwrap();
    assert_eq!(listed.total, 5);
    let wire_ids: Vec<&str> = listed.blocked.iter().map(|u| u.user_id.as_str()).collect();
    assert_eq!(wire_ids, ["b", "c1", "c2", "c3", "c4"]);

    // Paging: 2 at a time, in order, each page's total the whole list's.
    let (users, pages) = api.all_blocked("a", 2).await;
    assert_eq!(users, ["b", "c1", "c2", "c3", "c4"]);
    assert_eq!(pages.len(), 3, "{pages:?}");
    for page in &pages {
        assert_eq!(page["total"], json!(5), "{page}");
        assert_eq!(page["user"], json!("a"), "{page}");
    }
    // Exactly one page's worth: no next page.
    let (s, v) = api.get("/v1/users/a/blocks?limit=5").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["blocked"].as_array().unwrap().len(), 5);
    assert_eq!(v["next_after"], Value::Null, "{v}");
    // After the last one, and the default page size.
    let (s, v) = api.get("/v1/users/a/blocks?after=c4").await;
    assert_eq!((s, v["blocked"].as_array().unwrap().len()), (200, 0), "{v}");
    let (s, v) = api.get("/v1/users/a/blocks").await;
    assert_eq!((s, v["blocked"].as_array().unwrap().len()), (200, 5), "{v}");
    // Someone who blocked no one.
    let (s, v) = api.get("/v1/users/b/blocks").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v,
        json!({"user": "b", "blocked": [], "next_after": null, "total": 0})
    );

    // Blocking again changes nothing; unblocking b (and one never blocked) shows a again.
    let (s, v) = api
        .post("/v1/users/a/blocks", json!({"block": ["b"]}))
        .await;
    assert_eq!((s, &v["changed"], &v["total"]), (200, &json!(0), &json!(5)));
    let (s, v) = api
        .post("/v1/users/a/blocks", json!({"unblock": ["b", "never"]}))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!((&v["changed"], &v["total"]), (&json!(1), &json!(4)), "{v}");
    let back = presence_event_of(&mut b, "a", EventKind::Online).await;
    assert!(back.version > gone.version);
    let seen = get(&b, "a").await;
    assert_eq!(availability(&seen), pb::Availability::Online);
    assert_eq!(seen.status, "here");

    // Both lists in one request.
    let (s, v) = api
        .post(
            "/v1/users/a/blocks",
            json!({"block": ["d"], "unblock": ["c1", "c2"]}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!((&v["changed"], &v["total"]), (&json!(3), &json!(3)), "{v}");
    let (users, _) = api.all_blocked("a", 1).await;
    assert_eq!(users, ["c3", "c4", "d"]);
    assert_eq!(api.privacy("a").await["blocked_total"], json!(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_approves_ahead_and_revokes_under_an_approved_audience() {
    let broker = common::start(with_admin).await;
    let api = Api::new(broker.admin_addr.unwrap());
    let mut w = connect(&broker, "w").await;
    within(w.subscribe(&["alice"])).await.unwrap();
    let mut alice = connect_device(&broker, "alice", "phone").await;
    presence_event_of(&mut w, "alice", EventKind::Online).await;
    within(alice.set_presence(pb::SetPresence {
        status: Some("hi".into()),
        ..Default::default()
    }))
    .await
    .unwrap();
    presence_event_of(&mut w, "alice", EventKind::Update).await;

    // Only approved watchers, set on her behalf: w, never approved, sees her leave.
    let (s, v) = api
        .post("/v1/users/alice/privacy", json!({"audience": "approved"}))
        .await;
    assert_eq!(s, 200, "{v}");
    let approved_only = json!({
        "user": "alice",
        "invisible": false,
        "invisible_devices": [],
        "audience": "approved",
        "last_seen_audience": "everyone",
        "blocked_total": 0,
        "approved": 0,
        "pending": 0,
    });
    assert_eq!(v, approved_only);
    let gone = presence_event_of(&mut w, "alice", EventKind::Offline).await;
    assert_eq!(reason(&gone), pb::OfflineReason::Disconnect);
    let frozen = get(&w, "alice").await;
    assert_eq!(availability(&frozen), pb::Availability::Offline);
    assert!(
        frozen.status.is_empty() && frozen.devices.is_empty(),
        "{frozen:?}"
    );
    // Her own devices see the setting; the backend sees the truth.
    let own = within(alice.get_privacy()).await.unwrap();
    assert_eq!(own.presence_audience(), pb::Audience::Approved);
    assert_eq!(own.last_seen_audience(), pb::Audience::Everyone);
    assert_eq!(api.privacy("alice").await, approved_only);
    assert_eq!(backend_availability(&api, "alice").await, "online");

    // Approved ahead, with no request (the app's own friend graph): w is told first, then
    // sees her online with her status.
    let (s, v) = api
        .post("/v1/users/alice/approvals", json!({"approve": ["w"]}))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v, json!({"user": "alice", "changed": 1}));
    // (next_subscription_accepted drops what comes before it: an ONLINE sent ahead of the
    // acceptance would be lost and the wait below would time out.)
    let accepted = within(w.next_subscription_accepted()).await.unwrap();
    assert_eq!(accepted.user_id, "alice");
    let shown = accepted.presence.unwrap();
    assert_eq!(availability(&shown), pb::Availability::Online);
    assert_eq!(shown.status, "hi");
    let back = presence_event_of(&mut w, "alice", EventKind::Online).await;
    assert!(back.version > gone.version);
    assert_eq!(back.presence.as_ref().unwrap().status, "hi");
    assert_eq!(
        availability(&get(&w, "alice").await),
        pb::Availability::Online
    );
    // Listed as approved, for the backend and on her own devices; no request was made.
    let (s, v) = api.get("/v1/users/alice/approvals").await;
    assert_eq!(s, 200, "{v}");
    let since = v["approvals"][0]["since_ms"].as_u64().unwrap();
    assert!(since > 0, "{v}");
    assert_eq!(
        v,
        json!({
            "user": "alice",
            "approvals": [{"user": "w", "state": "approved", "since_ms": since}],
            "next_after": null,
            "total": 1,
        })
    );
    let wire = within(alice.list_approvals(pb::ApprovalState::Approved, "", 0))
        .await
        .unwrap();
    assert_eq!(wire.total, 1);
    assert_eq!(wire.approvals[0].user_id, "w");
    let summary = api.privacy("alice").await;
    assert_eq!(
        (&summary["approved"], &summary["pending"]),
        (&json!(1), &json!(0))
    );
    assert!(
        alice.try_next_event().is_none_or(|f| !matches!(
            f.body,
            Some(pb::server_frame::Body::SubscriptionRequest(_))
        )),
        "approving ahead prompts no one"
    );
    // Approving again changes nothing; her updates reach w.
    let (s, v) = api
        .post("/v1/users/alice/approvals", json!({"approve": ["w"]}))
        .await;
    assert_eq!((s, &v["changed"]), (200, &json!(0)), "{v}");
    within(alice.set_presence(pb::SetPresence {
        status: Some("later".into()),
        ..Default::default()
    }))
    .await
    .unwrap();
    let update = presence_event_of(&mut w, "alice", EventKind::Update).await;
    assert_eq!(update.presence.unwrap().status, "later");

    // Revoked on her behalf: w sees her leave, and she stays offline to w.
    let (s, v) = api
        .post("/v1/users/alice/approvals", json!({"revoke": ["w"]}))
        .await;
    assert_eq!((s, &v), (200, &json!({"user": "alice", "changed": 1})));
    let gone_again = presence_event_of(&mut w, "alice", EventKind::Offline).await;
    assert_eq!(reason(&gone_again), pb::OfflineReason::Disconnect);
    assert!(gone_again.version > update.version);
    let frozen = get(&w, "alice").await;
    assert_eq!(availability(&frozen), pb::Availability::Offline);
    assert_eq!(frozen.version, gone_again.version);
    // A revoked approval lists as denied (as on the wire); counts follow.
    assert_eq!(api.approvals("alice", "denied").await, ["w"]);
    assert!(api.approvals("alice", "approved").await.is_empty());
    assert_eq!(api.privacy("alice").await, approved_only);
    // Revoking again, or someone never approved, changes nothing.
    let (s, v) = api
        .post(
            "/v1/users/alice/approvals",
            json!({"revoke": ["w", "never"]}),
        )
        .await;
    assert_eq!((s, &v["changed"]), (200, &json!(0)), "{v}");

    // Everyone again (and last-seen for no one): the audience decides, so w sees her again.
    let (s, v) = api
        .post(
            "/v1/users/alice/privacy",
            json!({"audience": "everyone", "last_seen_audience": "nobody"}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (&v["audience"], &v["last_seen_audience"]),
        (&json!("everyone"), &json!("nobody")),
        "{v}"
    );
    let online = presence_event_of(&mut w, "alice", EventKind::Online).await;
    assert_eq!(online.presence.unwrap().status, "later");
    let own = within(alice.get_privacy()).await.unwrap();
    assert_eq!(own.presence_audience(), pb::Audience::Everyone);
    assert_eq!(own.last_seen_audience(), pb::Audience::Nobody);
    // One field alone leaves the other as it is.
    let (s, v) = api
        .post(
            "/v1/users/alice/privacy",
            json!({"last_seen_audience": "approved"}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (&v["audience"], &v["last_seen_audience"]),
        (&json!("everyone"), &json!("approved")),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strangers_request_shows_as_pending_and_the_backend_answers_it() {
    let broker = common::start(with_admin).await;
    let api = Api::new(broker.admin_addr.unwrap());
    let mut alice = connect(&broker, "alice").await;
    let (s, v) = api
        .post("/v1/users/alice/privacy", json!({"audience": "approved"}))
        .await;
    assert_eq!(s, 200, "{v}");
    assert!(api.approvals("alice", "").await.is_empty());

    // A stranger subscribes: offline to them, a prompt on her device, pending for the backend.
    let s1 = connect(&broker, "s1").await;
    let reply = within(s1.subscribe(&["alice"])).await.unwrap();
    assert_eq!(availability(&reply.presences[0]), pb::Availability::Offline);
    let request = within(alice.next_subscription_request()).await.unwrap();
    assert_eq!(request.requester_id, "s1");
    let (s, v) = api.get("/v1/users/alice/approvals?state=pending").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v,
        json!({
            "user": "alice",
            "approvals": [
                {"user": "s1", "state": "pending", "since_ms": request.requested_at_ms}
            ],
            "next_after": null,
            "total": 1,
        })
    );
    let summary = api.privacy("alice").await;
    assert_eq!(
        (&summary["approved"], &summary["pending"]),
        (&json!(0), &json!(1))
    );

    // Three more strangers; the pending list pages two at a time.
    let mut strangers = Vec::new();
    for id in ["s2", "s3", "s4"] {
        let c = connect(&broker, id).await;
        within(c.subscribe(&["alice"])).await.unwrap();
        strangers.push(c);
    }
    let (entries, pages) = api.all_approvals("alice", "pending", 2).await;
    let users: Vec<&str> = entries.iter().map(|(u, _)| u.as_str()).collect();
    assert_eq!(users, ["s1", "s2", "s3", "s4"]);
    assert_eq!(pages.len(), 2, "{pages:?}");
    assert_eq!(pages[0]["next_after"], json!("s2"));
    let (s, v) = api.get("/v1/users/alice/approvals?after=s4").await;
    assert_eq!(
        (s, &v["approvals"], &v["total"]),
        (200, &json!([]), &json!(4)),
        "{v}"
    );

    // Denied on her behalf: out of pending, listed as denied, counts follow.
    let (s, v) = api
        .post("/v1/users/alice/approvals", json!({"deny": ["s1", "s3"]}))
        .await;
    assert_eq!((s, &v), (200, &json!({"user": "alice", "changed": 2})));
    assert_eq!(api.approvals("alice", "pending").await, ["s2", "s4"]);
    assert_eq!(api.approvals("alice", "denied").await, ["s1", "s3"]);
    let summary = api.privacy("alice").await;
    assert_eq!(
        (&summary["approved"], &summary["pending"]),
        (&json!(0), &json!(2))
    );
    // The wire shows the same list.
    let wire = within(alice.list_approvals(pb::ApprovalState::Denied, "", 0))
        .await
        .unwrap();
    let wire_ids: Vec<&str> = wire.approvals.iter().map(|a| a.user_id.as_str()).collect();
    assert_eq!(wire_ids, ["s1", "s3"]);
    // The denied stranger still sees her offline, and asking again makes no new request.
    let again = within(s1.subscribe(&["alice"])).await.unwrap();
    assert_eq!(availability(&again.presences[0]), pb::Availability::Offline);
    assert_eq!(api.approvals("alice", "pending").await, ["s2", "s4"]);
    // Denying again changes nothing.
    let (s, v) = api
        .post("/v1/users/alice/approvals", json!({"deny": ["s1"]}))
        .await;
    assert_eq!((s, &v["changed"]), (200, &json!(0)), "{v}");

    // In one call: a pending request and a denied one approved, another pending one denied.
    let (s, v) = api
        .post(
            "/v1/users/alice/approvals",
            json!({"approve": ["s2", "s3"], "deny": ["s4"]}),
        )
        .await;
    assert_eq!((s, &v), (200, &json!({"user": "alice", "changed": 3})));
    let accepted = within(strangers[0].next_subscription_accepted())
        .await
        .unwrap();
    assert_eq!(accepted.user_id, "alice");
    let (entries, _) = api.all_approvals("alice", "", 1).await;
    let expected = [
        ("s1", "denied"),
        ("s2", "approved"),
        ("s3", "approved"),
        ("s4", "denied"),
    ];
    assert_eq!(
        entries,
        expected.map(|(u, s)| (u.to_string(), s.to_string()))
    );
    // The counts match the lists.
    let summary = api.privacy("alice").await;
    assert_eq!(
        summary["approved"],
        json!(api.approvals("alice", "approved").await.len())
    );
    assert_eq!(
        summary["pending"],
        json!(api.approvals("alice", "pending").await.len())
    );
    assert_eq!(
        (&summary["approved"], &summary["pending"]),
        (&json!(2), &json!(0))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bodies_and_queries_get_400_in_the_error_shape() {
    let broker = common::start(|c| {
        with_admin(c);
        c.privacy.max_blocked = 3;
    })
    .await;
    let api = Api::new(broker.admin_addr.unwrap());
    let long = "x".repeat(129);
    let long_path = format!("/v1/users/{long}/invisible");
    let cases: Vec<(&str, Value, &str, &str)> = vec![
        // (path, body, code, a word the reason must hold)
        (
            "/v1/users/u/invisible",
            json!({}),
            "BAD_REQUEST",
            "invisible",
        ),
        (
            "/v1/users/u/invisible",
            json!({"invisible": "yes"}),
            "BAD_REQUEST",
            "body",
        ),
        (
            "/v1/users/u/invisible",
            json!({"invisible": true, "visible": false}),
            "BAD_REQUEST",
            "visible",
        ),
        ("/v1/users/u/blocks", json!({}), "BAD_REQUEST", "empty"),
        (
            "/v1/users/u/blocks",
            json!({"block": [], "unblock": []}),
            "BAD_REQUEST",
            "empty",
        ),
        (
            "/v1/users/u/blocks",
            json!({"blokc": ["x"]}),
            "BAD_REQUEST",
            "blokc",
        ),
        (
            "/v1/users/u/blocks",
            json!({"block": "x"}),
            "BAD_REQUEST",
            "body",
        ),
        (
            "/v1/users/u/blocks",
            json!({"block": [""]}),
            "INVALID_USER_ID",
            "block",
        ),
        (
            "/v1/users/u/blocks",
            json!({"unblock": [long]}),
            "INVALID_USER_ID",
            "unblock",
        ),
        (
            "/v1/users/u/blocks",
            json!({"block": ["a\u{7}b"]}),
            "INVALID_USER_ID",
            "block",
        ),
        (
            "/v1/users/u/blocks",
            json!({"block": (0..101).map(|i| format!("t{i}")).collect::<Vec<_>>()}),
            "TOO_MANY_IDS",
            "block",
        ),
        (
            "/v1/users/u/blocks",
            json!({"unblock": (0..101).map(|i| format!("t{i}")).collect::<Vec<_>>()}),
            "TOO_MANY_IDS",
            "unblock",
        ),
        (
            "/v1/users/u/blocks",
            json!({"block": ["u"]}),
            "BAD_REQUEST",
            "itself",
        ),
        (
            "/v1/users/u/blocks",
            json!({"block": ["x"], "unblock": ["x"]}),
            "BAD_REQUEST",
            "both",
        ),
        (
            &long_path,
            json!({"invisible": true}),
            "INVALID_USER_ID",
            "path user",
        ),
    ];
    for (path, body, code, word) in cases {
        let (s, v) = api.post(path, body.clone()).await;
        assert_eq!((s, error_code(&v)), (400, code), "{path} {body}: {v}");
        assert_error_shape(&v);
        assert!(
            error_reason(&v).contains(word),
            "{path} {body}: the reason should name {word:?}: {v}"
        );
    }
    // Not JSON at all.
    for path in ["/v1/users/u/invisible", "/v1/users/u/blocks"] {
        let (s, v) = api.post_raw(path, "{not json").await;
        assert_eq!((s, error_code(&v)), (400, "BAD_REQUEST"), "{path}: {v}");
        assert_error_shape(&v);
    }
    // 100 ids is the cap, not over it.
    let hundred: Vec<String> = (0..100).map(|i| format!("t{i}")).collect();
    let (s, v) = api
        .post("/v1/users/u/blocks", json!({"unblock": hundred}))
        .await;
    assert_eq!((s, &v["changed"]), (200, &json!(0)), "{v}");

    // Over privacy.max_blocked: LIMIT_EXCEEDED, and nothing of the request is applied, the
    // unblock included.
    let (s, v) = api
        .post("/v1/users/u/blocks", json!({"block": ["p1", "p2"]}))
        .await;
    assert_eq!((s, &v["total"]), (200, &json!(2)), "{v}");
    let (s, v) = api
        .post(
            "/v1/users/u/blocks",
            json!({"block": ["p3", "p4"], "unblock": ["p1"]}),
        )
        .await;
    assert_eq!((s, error_code(&v)), (400, "LIMIT_EXCEEDED"), "{v}");
    assert_error_shape(&v);
    assert!(error_reason(&v).contains("max_blocked"), "{v}");
    let (users, _) = api.all_blocked("u", 10).await;
    assert_eq!(users, ["p1", "p2"]);
    // Up to the cap is fine.
    let (s, v) = api
        .post("/v1/users/u/blocks", json!({"block": ["p3"]}))
        .await;
    assert_eq!((s, &v["total"]), (200, &json!(3)), "{v}");

    // Query parameters of the list.
    let long_after = format!("/v1/users/u/blocks?after={long}");
    let long_blocks = format!("/v1/users/{long}/blocks");
    let long_privacy = format!("/v1/users/{long}/privacy");
    let queries = [
        ("/v1/users/u/blocks?limit=101", "LIMIT_EXCEEDED", "limit"),
        ("/v1/users/u/blocks?limit=abc", "BAD_REQUEST", "limit"),
        ("/v1/users/u/blocks?limit=-1", "BAD_REQUEST", "limit"),
        ("/v1/users/u/blocks?cursor=abc", "BAD_REQUEST", "cursor"),
        ("/v1/users/u/blocks?after=%07", "INVALID_USER_ID", "after"),
        (long_after.as_str(), "INVALID_USER_ID", "after"),
        (long_blocks.as_str(), "INVALID_USER_ID", "path user"),
        (long_privacy.as_str(), "INVALID_USER_ID", "path user"),
    ];
    for (path, code, word) in queries {
        let (s, v) = api.get(path).await;
        assert_eq!((s, error_code(&v)), (400, code), "{path}: {v}");
        assert_error_shape(&v);
        assert!(error_reason(&v).contains(word), "{path}: {v}");
    }
    // Nothing above changed u's visibility.
    assert_eq!(api.privacy("u").await, plain_privacy("u", false, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_audience_and_approval_requests_get_400_and_apply_nothing() {
    let broker = common::start(|c| {
        with_admin(c);
        c.privacy.max_approved = 2;
    })
    .await;
    let api = Api::new(broker.admin_addr.unwrap());
    let long = "x".repeat(129);
    let hundred_one: Vec<String> = (0..101).map(|i| format!("t{i}")).collect();
    let long_privacy = format!("/v1/users/{long}/privacy");
    let long_approvals = format!("/v1/users/{long}/approvals");
    let cases: Vec<(&str, Value, &str, &str)> = vec![
        // (path, body, code, a word the reason must hold)
        ("/v1/users/u/privacy", json!({}), "BAD_REQUEST", "audience"),
        (
            "/v1/users/u/privacy",
            json!({"audience": null}),
            "BAD_REQUEST",
            "audience",
        ),
        (
            "/v1/users/u/privacy",
            json!({"audience": "friends"}),
            "BAD_REQUEST",
            "audience",
        ),
        (
            "/v1/users/u/privacy",
            json!({"audience": "Everyone"}),
            "BAD_REQUEST",
            "audience",
        ),
        (
            "/v1/users/u/privacy",
            json!({"audience": "everyone", "last_seen_audience": "all"}),
            "BAD_REQUEST",
            "last_seen_audience",
        ),
        (
            "/v1/users/u/privacy",
            json!({"audience": 1}),
            "BAD_REQUEST",
            "body",
        ),
        (
            "/v1/users/u/privacy",
            json!({"audience": "nobody", "invisible": true}),
            "BAD_REQUEST",
            "invisible",
        ),
        (
            long_privacy.as_str(),
            json!({"audience": "nobody"}),
            "INVALID_USER_ID",
            "path user",
        ),
        ("/v1/users/u/approvals", json!({}), "BAD_REQUEST", "empty"),
        (
            "/v1/users/u/approvals",
            json!({"approve": [], "deny": [], "revoke": []}),
            "BAD_REQUEST",
            "empty",
        ),
        (
            "/v1/users/u/approvals",
            json!({"aprove": ["x"]}),
            "BAD_REQUEST",
            "aprove",
        ),
        (
            "/v1/users/u/approvals",
            json!({"approve": "x"}),
            "BAD_REQUEST",
            "body",
        ),
        (
            "/v1/users/u/approvals",
            json!({"approve": [""]}),
            "INVALID_USER_ID",
            "approve",
        ),
        (
            "/v1/users/u/approvals",
            json!({"deny": [long]}),
            "INVALID_USER_ID",
            "deny",
        ),
        (
            "/v1/users/u/approvals",
            json!({"revoke": ["a\u{7}b"]}),
            "INVALID_USER_ID",
            "revoke",
        ),
        (
            "/v1/users/u/approvals",
            json!({"approve": hundred_one}),
            "TOO_MANY_IDS",
            "approve",
        ),
        (
            "/v1/users/u/approvals",
            json!({"revoke": hundred_one}),
            "TOO_MANY_IDS",
            "revoke",
        ),
        (
            "/v1/users/u/approvals",
            json!({"approve": ["x"], "deny": ["u"]}),
            "BAD_REQUEST",
            "itself",
        ),
        (
            "/v1/users/u/approvals",
            json!({"revoke": ["u"]}),
            "BAD_REQUEST",
            "itself",
        ),
        (
            "/v1/users/u/approvals",
            json!({"approve": ["x", "y"], "revoke": ["y"]}),
            "BAD_REQUEST",
            "both",
        ),
        (
            "/v1/users/u/approvals",
            json!({"deny": ["x"], "revoke": ["x"]}),
            "BAD_REQUEST",
            "both",
        ),
        (
            long_approvals.as_str(),
            json!({"approve": ["x"]}),
            "INVALID_USER_ID",
            "path user",
        ),
    ];
    for (path, body, code, word) in cases {
        let (s, v) = api.post(path, body.clone()).await;
        assert_eq!((s, error_code(&v)), (400, code), "{path} {body}: {v}");
        assert_error_shape(&v);
        assert!(
            error_reason(&v).contains(word),
            "{path} {body}: the reason should name {word:?}: {v}"
        );
    }
    for path in ["/v1/users/u/privacy", "/v1/users/u/approvals"] {
        let (s, v) = api.post_raw(path, "{not json").await;
        assert_eq!((s, error_code(&v)), (400, "BAD_REQUEST"), "{path}: {v}");
        assert_error_shape(&v);
    }
    // None of it changed anything.
    assert_eq!(api.privacy("u").await, plain_privacy("u", false, 0));
    assert!(api.approvals("u", "").await.is_empty());

    // Over privacy.max_approved: LIMIT_EXCEEDED, and nothing of the request is applied (the
    // approve step comes first): neither the deny nor the revoke.
    let (s, v) = api
        .post("/v1/users/u/approvals", json!({"approve": ["p1", "p2"]}))
        .await;
    assert_eq!((s, &v["changed"]), (200, &json!(2)), "{v}");
    let (s, v) = api
        .post(
            "/v1/users/u/approvals",
            json!({"approve": ["p3"], "deny": ["q1"], "revoke": ["p1"]}),
        )
        .await;
    assert_eq!((s, error_code(&v)), (400, "LIMIT_EXCEEDED"), "{v}");
    assert_error_shape(&v);
    assert!(error_reason(&v).contains("max_approved"), "{v}");
    assert!(error_reason(&v).contains("nothing"), "{v}");
    assert_eq!(api.approvals("u", "").await, ["p1", "p2"]);
    assert_eq!(api.approvals("u", "approved").await, ["p1", "p2"]);
    // Revoking makes room (in a request of its own), then the approval fits.
    let (s, v) = api
        .post(
            "/v1/users/u/approvals",
            json!({"revoke": ["p1"], "deny": ["q1"]}),
        )
        .await;
    assert_eq!((s, &v["changed"]), (200, &json!(2)), "{v}");
    let (s, v) = api
        .post("/v1/users/u/approvals", json!({"approve": ["p3"]}))
        .await;
    assert_eq!((s, &v["changed"]), (200, &json!(1)), "{v}");
    assert_eq!(api.approvals("u", "approved").await, ["p2", "p3"]);
    assert_eq!(api.approvals("u", "denied").await, ["p1", "q1"]);
    // 100 ids is the cap, not over it (deny needs no room: nothing pending).
    let hundred: Vec<String> = (0..100).map(|i| format!("t{i}")).collect();
    let (s, v) = api
        .post("/v1/users/u/approvals", json!({"revoke": hundred}))
        .await;
    assert_eq!((s, &v["changed"]), (200, &json!(0)), "{v}");

    // Query parameters of the list.
    let long_after = format!("/v1/users/u/approvals?after={long}");
    let long_list = format!("/v1/users/{long}/approvals");
    let queries = [
        (
            "/v1/users/u/approvals?state=revoked",
            "BAD_REQUEST",
            "state",
        ),
        (
            "/v1/users/u/approvals?state=PENDING",
            "BAD_REQUEST",
            "state",
        ),
        ("/v1/users/u/approvals?limit=101", "LIMIT_EXCEEDED", "limit"),
        ("/v1/users/u/approvals?limit=abc", "BAD_REQUEST", "limit"),
        ("/v1/users/u/approvals?limit=-1", "BAD_REQUEST", "limit"),
        ("/v1/users/u/approvals?cursor=abc", "BAD_REQUEST", "cursor"),
        (
            "/v1/users/u/approvals?after=%07",
            "INVALID_USER_ID",
            "after",
        ),
        (long_after.as_str(), "INVALID_USER_ID", "after"),
        (long_list.as_str(), "INVALID_USER_ID", "path user"),
    ];
    for (path, code, word) in queries {
        let (s, v) = api.get(path).await;
        assert_eq!((s, error_code(&v)), (400, code), "{path}: {v}");
        assert_error_shape(&v);
        assert!(error_reason(&v).contains(word), "{path}: {v}");
    }
    // Someone with no entries at all.
    let (s, v) = api.get("/v1/users/nobody/approvals?state=pending").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v,
        json!({"user": "nobody", "approvals": [], "next_after": null, "total": 0})
    );
    // The settings were never touched; the counts are the lists'.
    assert_eq!(
        api.privacy("u").await,
        json!({
            "user": "u",
            "invisible": false,
            "invisible_devices": [],
            "audience": "everyone",
            "last_seen_audience": "everyone",
            "blocked_total": 0,
            "approved": 2,
            "pending": 0,
        })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_key_reads_privacy_and_cannot_write_it() {
    let broker = common::start(with_admin).await;
    let api = Api::new(broker.admin_addr.unwrap());
    let writes = [
        ("/v1/users/r/invisible", json!({"invisible": true})),
        ("/v1/users/r/blocks", json!({"block": ["x"]})),
        (
            "/v1/users/r/privacy",
            json!({"last_seen_audience": "nobody"}),
        ),
        ("/v1/users/r/approvals", json!({"approve": ["f"]})),
    ];
    for (path, body) in &writes {
        let (s, _, v) = api
            .call(
                reqwest::Method::POST,
                path,
                Some(READ_KEY),
                Some(body.clone()),
            )
            .await;
        assert_eq!((s, error_code(&v)), (403, "PERMISSION_DENIED"), "{v}");
        assert_error_shape(&v);
        let (s, _, v) = api
            .call(reqwest::Method::POST, path, None, Some(body.clone()))
            .await;
        assert_eq!((s, error_code(&v)), (401, "UNAUTHENTICATED"), "{v}");
    }
    // Reads need a key too.
    let (s, _, v) = api
        .call(reqwest::Method::GET, "/v1/users/r/privacy", None, None)
        .await;
    assert_eq!((s, error_code(&v)), (401, "UNAUTHENTICATED"), "{v}");
    // Nothing was written; the read key reads.
    assert_eq!(api.privacy("r").await, plain_privacy("r", false, 0));
    let (s, v) = api.get("/v1/users/r/blocks").await;
    assert_eq!((s, &v["total"]), (200, &json!(0)), "{v}");
    let (s, v) = api.get("/v1/users/r/approvals").await;
    assert_eq!((s, &v["total"]), (200, &json!(0)), "{v}");
    // The write key writes; the read key sees it.
    for (path, body) in &writes {
        let (s, v) = api.post(path, body.clone()).await;
        assert_eq!(s, 200, "{path}: {v}");
    }
    assert_eq!(
        api.privacy("r").await,
        json!({
            "user": "r",
            "invisible": true,
            "invisible_devices": [],
            "audience": "everyone",
            "last_seen_audience": "nobody",
            "blocked_total": 1,
            "approved": 1,
            "pending": 0,
        })
    );
    assert_eq!(api.approvals("r", "approved").await, ["f"]);
    // Only GET and POST where they belong.
    let (s, _, v) = api
        .call(
            reqwest::Method::GET,
            "/v1/users/r/invisible",
            Some(WRITE_KEY),
            None,
        )
        .await;
    assert_eq!(s, 405, "{v}");
    assert_error_shape(&v);
    let (s, _, v) = api
        .call(
            reqwest::Method::PUT,
            "/v1/users/r/approvals",
            Some(WRITE_KEY),
            Some(json!({"approve": ["g"]})),
        )
        .await;
    assert_eq!(s, 405, "{v}");
    assert_error_shape(&v);
}

/// A 200 is an acknowledgement: the real binary is killed (SIGKILL) the moment each answer
/// arrives, well inside sled's own 500 ms flush interval, and the restarted broker holds every
/// acknowledged change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_change_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path());
    let data = dir.path().join("data");
    let mut blocked: Vec<String> = Vec::new();
    let mut invisible = false;
    let audiences = ["approved", "nobody", "everyone"];
    let mut audience = "everyone";
    // (user, state) in user order.
    let mut approvals: Vec<(String, String)> = Vec::new();
    for cycle in 0..10 {
        let spawned = spawn_presenced(&data, &["--config", &config]).await;
        let api = Api::new(spawned.admin().expect("the admin API is on"));
        let mut child = spawned.child;
        // Everything acknowledged before the last kill is there.
        let (users, _) = api.all_blocked("k", 100).await;
        assert_eq!(
            users, blocked,
            "cycle {cycle}: the block list after kill -9"
        );
        let privacy = api.privacy("k").await;
        assert_eq!(
            privacy["invisible"],
            json!(invisible),
            "cycle {cycle}: invisibility after kill -9"
        );
        assert_eq!(
            privacy["audience"],
            json!(audience),
            "cycle {cycle}: the audience after kill -9"
        );
        assert_eq!(
            api.all_approvals("k", "", 100).await.0,
            approvals,
            "cycle {cycle}: the approvals after kill -9"
        );
        // One change, killed as soon as it is answered.
        let (s, v) = match cycle % 4 {
            0 => {
                let target = format!("t{cycle}");
                let answer = api
                    .post("/v1/users/k/blocks", json!({ "block": [target.clone()] }))
                    .await;
                blocked.push(target);
                answer
            }
            1 => {
                invisible = !invisible;
                api.post("/v1/users/k/invisible", json!({ "invisible": invisible }))
                    .await
            }
            2 => {
                audience = audiences[cycle / 4 % audiences.len()];
                api.post("/v1/users/k/privacy", json!({ "audience": audience }))
                    .await
            }
            _ => {
                // Approve a new watcher; from the second time on, revoke the previous one.
                let fresh = format!("f{cycle}");
                let mut body = json!({ "approve": [fresh.clone()] });
                if let Some((last, state)) = approvals.last_mut() {
                    body["revoke"] = json!([last.clone()]);
                    *state = "denied".into();
                }
                approvals.push((fresh, "approved".into()));
                api.post("/v1/users/k/approvals", body).await
            }
        };
        child.start_kill().unwrap();
        assert_eq!(s, 200, "{v}");
        within(child.wait()).await.unwrap();
    }
    let spawned = spawn_presenced(&data, &["--config", &config]).await;
    let api = Api::new(spawned.admin().unwrap());
    let (users, _) = api.all_blocked("k", 100).await;
    assert_eq!(users, blocked);
    let privacy = api.privacy("k").await;
    assert_eq!(privacy["invisible"], json!(invisible));
    assert_eq!(privacy["audience"], json!(audience));
    assert_eq!(api.all_approvals("k", "", 100).await.0, approvals);
    assert_eq!(privacy["approved"], json!(1));
}

/// Cluster mode does not replicate privacy yet: writes are refused with 503 UNAVAILABLE in the
/// usual shape (and without Retry-After: retrying does not help); reads still answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn privacy_writes_in_cluster_mode_hold_on_every_node() {
    let nats = NatsCluster::start(1).await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path());
    let n1 = Node::start("node1", &nats.urls(), &["--config", &config]).await;
    let n2 = Node::start("node2", &nats.urls(), &["--config", &config]).await;
    let api1 = Api::new(n1.admin.expect("admin on"));
    let api2 = Api::new(n2.admin.expect("admin on"));
    let writes = [
        ("/v1/users/z/invisible", json!({"invisible": true})),
        ("/v1/users/z/blocks", json!({"block": ["y", "w"]})),
        ("/v1/users/z/blocks", json!({"unblock": ["w"]})),
        ("/v1/users/z/privacy", json!({"audience": "approved"})),
        ("/v1/users/z/approvals", json!({"approve": ["y", "v"]})),
        ("/v1/users/z/approvals", json!({"revoke": ["v"]})),
    ];
    for (path, body) in writes {
        let (s, v) = api1.post(path, body).await;
        assert_eq!(s, 200, "{path}: {v}");
    }
    let want = json!({
        "user": "z",
        "invisible": true,
        "invisible_devices": [],
        "audience": "approved",
        "last_seen_audience": "everyone",
        "blocked_total": 1,
        "approved": 1,
        "pending": 0,
    });
    // Acknowledged on node 1 means applied there; node 2 follows the privacy log.
    let (s, v) = api1.get("/v1/users/z/privacy").await;
    assert_eq!((s, &v), (200, &want));
    let started = std::time::Instant::now();
    loop {
        let (s, v) = api2.get("/v1/users/z/privacy").await;
        if s == 200 && v == want {
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "node 2 shows {v}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Validation still comes first.
    let (s, v) = api1
        .post("/v1/users/z/blocks", json!({"block": [""]}))
        .await;
    assert_eq!((s, error_code(&v)), (400, "INVALID_USER_ID"), "{v}");
    let (s, v) = api1
        .post("/v1/users/z/privacy", json!({"audience": "some"}))
        .await;
    assert_eq!((s, error_code(&v)), (400, "BAD_REQUEST"), "{v}");
}
