//! `presencectl` as an app's backend uses it, end to end against the real `presenced` binary:
//! `admin` (online, query, kick, revoke; the key from `--key` or `PRESENCE_ADMIN_KEY`; a wrong
//! key's JSON error and exit code) checked against what a TLS client sees, and
//! `webhook-listen` receiving the broker's signed webhooks and refusing a forged one.
//!
//! Every wait is bounded (`within`, or a deadline over a process's output lines); processes
//! are started with `kill_on_drop` and stopped by their handle.

mod common;

use std::net::SocketAddr;
use std::process::{Output, Stdio};
use std::time::Duration;

use common::*;
use presenced::client::{Client, ClientError, ClientOptions};
use presenced::pb;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{ChildStderr, ChildStdout, Command};

const ADMIN_KEY: &str = "cli-backend-admin-key-0123456789abcdef0123";
const WRONG_KEY: &str = "not-the-admin-key-0123456789abcdef01234567";
/// A Standard Webhooks secret.
const WEBHOOK_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// Writes `text` as the broker's config file in `dir` and returns its path.
fn config_file(dir: &tempfile::TempDir, text: &str) -> String {
    let path = dir.path().join("presenced.toml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

/// Runs `presencectl admin --url http://ADMIN [--key KEY] ARGS...` with `PRESENCE_ADMIN_KEY`
/// set to `env_key` (removed when `None`).
async fn admin(
    admin: SocketAddr,
    key: Option<&str>,
    env_key: Option<&str>,
    args: &[&str],
) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_presencectl"));
    cmd.args(["admin", "--url", &format!("http://{admin}")]);
    if let Some(key) = key {
        cmd.args(["--key", key]);
    }
    match env_key {
        Some(k) => cmd.env("PRESENCE_ADMIN_KEY", k),
        None => cmd.env_remove("PRESENCE_ADMIN_KEY"),
    };
    cmd.args(args).kill_on_drop(true);
    within(cmd.output()).await.unwrap()
}

/// The JSON a successful call printed on stdout.
fn printed(args: &str, out: &Output) -> Value {
    assert!(
        out.status.success(),
        "presencectl admin {args}: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{args}: {e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presencectl_admin_against_the_real_broker() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(
        &dir,
        &format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n[admin.keys.ops]\nkey = \"{ADMIN_KEY}\"\n\
             scope = \"write\"\n"
        ),
    );
    let data = dir.path().join("data");
    let broker = spawn_presenced(&data, &["--config", &config]).await;
    let api = broker.admin().expect("the admin API is on");

    let mut alice = within(Client::connect(
        ClientOptions::new(broker.addr, token("alice")).device("phone"),
    ))
    .await
    .unwrap();
    within(alice.set_presence(pb::SetPresence {
        status: Some("at the desk".into()),
        ..Default::default()
    }))
    .await
    .unwrap();

    // online: the key from --key.
    let out = admin(api, Some(ADMIN_KEY), None, &["online", "alice", "bob"]).await;
    let v = printed("online", &out);
    assert_eq!(v["status"]["alice"], "connected", "{v}");
    assert_eq!(v["status"]["bob"], "offline", "{v}");

    // query: the key from PRESENCE_ADMIN_KEY.
    let out = admin(api, None, Some(ADMIN_KEY), &["query", "alice"]).await;
    let v = printed("query", &out);
    let p = &v["presences"][0];
    assert_eq!(p["user"], "alice", "{v}");
    assert_eq!(p["availability"], "online", "{v}");
    assert_eq!(p["status"], "at the desk", "{v}");
    assert_eq!(p["devices"][0]["device"], "phone", "{v}");

    // --key wins over the environment.
    let out = admin(api, Some(ADMIN_KEY), Some(WRONG_KEY), &["online", "alice"]).await;
    assert_eq!(printed("online", &out)["status"]["alice"], "connected");

    // A wrong key: exit code 1, the API's JSON error on stderr, nothing on stdout.
    for (key, env_key) in [(Some(WRONG_KEY), None), (None, Some(WRONG_KEY))] {
        let out = admin(api, key, env_key, &["online", "alice"]).await;
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert!(out.stdout.is_empty(), "{out:?}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        let (json, last) = stderr.trim_end().rsplit_once('\n').unwrap();
        let error: Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {stderr}"));
        assert_eq!(error["error"]["code"], "UNAUTHENTICATED", "{stderr}");
        assert!(last.contains("401"), "{stderr}");
    }

    // kick: alice's session is closed with KICKED.
    let out = admin(api, Some(ADMIN_KEY), None, &["kick", "alice"]).await;
    let v = printed("kick", &out);
    assert_eq!(v["user"], "alice", "{v}");
    assert_eq!(v["disconnected"], serde_json::json!(["phone"]), "{v}");
    let close = within(alice.closed()).await.expect("a Close frame");
    assert_eq!(close_code(&close), pb::CloseCode::Kicked);
    let out = admin(api, Some(ADMIN_KEY), None, &["online", "alice"]).await;
    assert_eq!(printed("online", &out)["status"]["alice"], "offline");

    // revoke: alice's existing tokens are refused from now on.
    let out = admin(api, Some(ADMIN_KEY), None, &["revoke", "alice"]).await;
    let v = printed("revoke", &out);
    assert_eq!(v["user"], "alice", "{v}");
    assert!(v["revoked_before_ms"].as_u64().is_some(), "{v}");
    match within(Client::connect(ClientOptions::new(
        broker.addr,
        token("alice"),
    )))
    .await
    {
        Err(ClientError::Server(e)) => {
            assert_eq!(code(&e), pb::ErrorCode::TokenRevoked, "{e:?}")
        }
        Err(other) => panic!("expected TOKEN_REVOKED, got {other}"),
        Ok(_) => panic!("a revoked token connected"),
    }

    let Spawned { mut child, .. } = broker;
    child.start_kill().unwrap();
    within(child.wait()).await.unwrap();
}

/// The next line of `lines` before `deadline`.
async fn line_before<R: tokio::io::AsyncBufRead + Unpin>(
    lines: &mut Lines<R>,
    deadline: tokio::time::Instant,
    what: &str,
) -> String {
    tokio::time::timeout_at(deadline, lines.next_line())
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .unwrap()
        .unwrap_or_else(|| panic!("the output ended before {what}"))
}

/// Reads printed events until one of `kind` about `user`; returns everything read.
async fn events_until(
    stdout: &mut Lines<BufReader<ChildStdout>>,
    kind: &str,
    user: &str,
) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut printed = Vec::new();
    loop {
        let line = line_before(stdout, deadline, &format!("{kind} of {user}")).await;
        let e: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        let done = e["type"] == kind && e["user"] == user;
        printed.push(e);
        if done {
            return printed;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presencectl_webhook_listen_receives_the_brokers_webhooks() {
    // The listener picks its port and prints its address on stderr.
    let mut listen = Command::new(env!("CARGO_BIN_EXE_presencectl"))
        .args(["webhook-listen", "--listen", "127.0.0.1:0"])
        .args(["--secret", &format!("k1={WEBHOOK_SECRET}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stderr: Lines<BufReader<ChildStderr>> =
        BufReader::new(listen.stderr.take().unwrap()).lines();
    let mut stdout = BufReader::new(listen.stdout.take().unwrap()).lines();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let line = line_before(&mut stderr, deadline, "the listening address").await;
    let hooks: SocketAddr = line
        .rsplit("http://")
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{e}: {line}"));
    assert!(hooks.ip().is_loopback() && hooks.port() != 0, "{line}");

    let dir = tempfile::tempdir().unwrap();
    let config = config_file(
        &dir,
        &format!(
            "[[webhooks]]\nurl = \"http://{hooks}/presence-hooks\"\nlinger_ms = 20\n\
             [webhooks.secrets]\nk1 = \"{WEBHOOK_SECRET}\"\n"
        ),
    );
    let broker = spawn_presenced(&dir.path().join("data"), &["--config", &config]).await;
    let carol = within(Client::connect(
        ClientOptions::new(broker.addr, token("carol")).device("laptop"),
    ))
    .await
    .unwrap();
    let printed = events_until(&mut stdout, "user.online", "carol").await;
    assert_eq!(printed[0]["type"], "server.started", "{printed:?}");
    let online = printed.last().unwrap();
    assert_eq!(online["presence"]["availability"], "online", "{online}");
    assert!(online["id"].as_str().is_some_and(|id| !id.is_empty()));

    // A forged request (well-formed headers, a signature made with another key) gets 401,
    // its reason on stderr and nothing on stdout; the same request signed with the right key
    // gets 204 and is printed, so the forged one would have been printed before it.
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let post = |id: &str, user: &str, key: &[u8]| {
        let body = serde_json::json!({"events": [{
            "id": format!("{id}-1"), "seq": 1, "type": "user.online",
            "ts_ms": presenced::now_ms(), "user": user, "version": 1,
        }]})
        .to_string();
        let timestamp = now_secs();
        let signature = presenced::webhooks::sign(key, id, timestamp, body.as_bytes());
        let request = http
            .post(format!("http://{hooks}/presence-hooks"))
            .header("content-type", "application/json")
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body);
        async move { within(request.send()).await.unwrap().status().as_u16() }
    };
    let forged = post("msg_forged", "mallory", b"some-other-secret-entirely").await;
    assert_eq!(forged, 401);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let reason = line_before(&mut stderr, deadline, "the refusal").await;
    assert!(
        reason.contains("msg_forged") && reason.contains("no signature matches"),
        "{reason}"
    );
    let key = presenced::webhooks::decode_secret(WEBHOOK_SECRET).unwrap();
    assert_eq!(post("msg_genuine", "trent", &key).await, 204);
    let after = events_until(&mut stdout, "user.online", "trent").await;
    assert!(
        after.iter().all(|e| e["user"] != "mallory"),
        "the forged event was printed: {after:?}"
    );

    // A user the broker reports later still arrives (the listener kept serving).
    let dave = within(Client::connect(
        ClientOptions::new(broker.addr, token("dave")).device("phone"),
    ))
    .await
    .unwrap();
    let later = events_until(&mut stdout, "user.online", "dave").await;
    assert!(later.iter().all(|e| e["user"] != "mallory"), "{later:?}");

    drop((carol, dave));
    let Spawned { mut child, .. } = broker;
    child.start_kill().unwrap();
    within(child.wait()).await.unwrap();
    listen.start_kill().unwrap();
    within(listen.wait()).await.unwrap();
}
