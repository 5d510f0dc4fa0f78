//! `presencectl` against an in-process broker, as a developer uses it: the two-terminal
//! walkthrough of the README (`watch` in one, `set` in the other) and every other subcommand.

mod common;

use std::process::Stdio;

use common::*;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

fn ctl(broker: &Broker) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_presencectl"));
    cmd.arg("--server").arg(broker.addr.to_string());
    cmd.kill_on_drop(true);
    cmd
}

async fn run(broker: &Broker, args: &[&str]) -> Vec<Value> {
    let out = within(ctl(broker).args(args).output()).await.unwrap();
    assert!(
        out.status.success(),
        "presencectl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

type Lines = tokio::io::Lines<BufReader<tokio::process::ChildStdout>>;

/// `presencectl watch --user bob alice`, its output lines and its first line (the snapshot).
async fn watch_alice_as_bob(broker: &Broker) -> (tokio::process::Child, Lines, Value) {
    let mut watch = ctl(broker)
        .args(["watch", "--user", "bob", "alice"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    let snapshot: Value =
        serde_json::from_str(&within(lines.next_line()).await.unwrap().unwrap()).unwrap();
    assert_eq!(snapshot["event"], "snapshot");
    (watch, lines, snapshot)
}

#[tokio::test]
async fn watch_prints_a_change_made_with_set_in_another_terminal() {
    let broker = start(|_| {}).await;
    let (mut watch, mut lines, snapshot) = watch_alice_as_bob(&broker).await;
    assert_eq!(snapshot["presence"]["availability"], "offline");

    let set = run(
        &broker,
        &[
            "set",
            "--user",
            "alice",
            "--availability",
            "away",
            "--status",
            "lunch",
            "--state",
            "room=42",
        ],
    )
    .await;
    assert_eq!(set[0]["availability"], "away");

    let mut seen = Vec::new();
    loop {
        let line = within(lines.next_line())
            .await
            .unwrap()
            .expect("watch keeps running");
        let event: Value = serde_json::from_str(&line).unwrap();
        seen.push(event["event"].as_str().unwrap().to_string());
        if event["event"] == "update" {
            assert_eq!(event["presence"]["availability"], "away");
            assert_eq!(event["presence"]["status"], "lunch");
            assert_eq!(event["presence"]["state"]["room"], "42");
            break;
        }
    }
    assert_eq!(seen, ["online", "update"]);
    // `set` then disconnects: the watcher sees alice leave, with the reason.
    let line = within(lines.next_line()).await.unwrap().unwrap();
    let event: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(event["event"], "offline");
    assert_eq!(event["reason"], "disconnect");
    watch.kill().await.unwrap();
}

#[tokio::test]
async fn token_get_subscribe_subs_unsubscribe_and_direct() {
    let broker = start(|_| {}).await;
    let out = within(
        ctl(&broker)
            .args(["token", "--user", "zed", "--ttl", "60"])
            .output(),
    )
    .await
    .unwrap();
    let token = String::from_utf8(out.stdout).unwrap();
    let verifier = presenced::auth::Verifier::new(&presenced::config::AuthConfig::default());
    let claims = verifier.verify(token.trim(), now_secs()).unwrap();
    assert_eq!(claims.sub, "zed");
    assert!(claims.exp <= now_secs() + 61);

    let sub = run(&broker, &["subscribe", "--user", "bob", "alice", "carol"]).await;
    assert_eq!(sub[0]["subscription_count"], 2);
    let subs = run(&broker, &["subs", "--user", "bob"]).await;
    let names: Vec<&str> = subs.iter().map(|s| s["user"].as_str().unwrap()).collect();
    assert_eq!(names, ["alice", "carol"]);
    let un = run(&broker, &["unsubscribe", "--user", "bob", "alice"]).await;
    assert_eq!(un[0]["removed"], 1);
    assert_eq!(run(&broker, &["subs", "--user", "bob"]).await.len(), 1);

    let alice = connect(&broker, "alice").await;
    alice
        .set_presence(presenced::pb::SetPresence {
            status: Some("visible".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let got = run(&broker, &["get", "--user", "bob", "alice", "nobody"]).await;
    assert_eq!(got[0]["status"], "visible");
    assert_eq!(got[0]["availability"], "online");
    assert_eq!(got[1]["availability"], "offline");

    let direct = run(
        &broker,
        &[
            "direct", "--user", "bob", "--status", "psst", "alice", "nobody",
        ],
    )
    .await;
    assert_eq!(direct[0]["delivered"], serde_json::json!(["alice"]));

    let bad = within(
        ctl(&broker)
            .args(["set", "--user", "x", "--availability", "sleepy"])
            .output(),
    )
    .await
    .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown availability"));
}

#[tokio::test]
async fn channel_commands_join_who_where_watch_and_leave() {
    let broker = start(|_| {}).await;
    let mut watch = ctl(&broker)
        .args(["watch-channel", "--user", "bob", "room"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut watch_lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    let first: Value =
        serde_json::from_str(&within(watch_lines.next_line()).await.unwrap().unwrap()).unwrap();
    assert_eq!(first["watching"], "room");

    let mut join = ctl(&broker)
        .args([
            "--device", "desk", "join", "--user", "alice", "--state", "seat=7", "room",
        ])
        .stdout(Stdio::piped())
        // It ends with "taken over" when the leave below takes its session: expected.
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut join_lines = BufReader::new(join.stdout.take().unwrap()).lines();
    let joined: Value =
        serde_json::from_str(&within(join_lines.next_line()).await.unwrap().unwrap()).unwrap();
    assert_eq!(joined["joined"], "room");
    assert_eq!(joined["occupancy"], 1);
    let event: Value =
        serde_json::from_str(&within(watch_lines.next_line()).await.unwrap().unwrap()).unwrap();
    assert_eq!(event["event"], "join");
    assert_eq!(event["member"]["user"], "alice");
    assert_eq!(event["member"]["state"]["seat"], "7");

    let members = run(&broker, &["who", "--state", "room"]).await;
    assert_eq!(members.len(), 1);
    assert_eq!(members[0]["user"], "alice");
    assert_eq!(members[0]["state"]["seat"], "7");
    let count = run(&broker, &["who", "--count", "room"]).await;
    assert_eq!(count[0]["occupancy"], 1);
    let place = run(&broker, &["where", "alice"]).await;
    assert_eq!(place[0]["channels"], serde_json::json!(["room"]));

    // Acting on the same device takes the session over, membership included, and leaves.
    let left = run(
        &broker,
        &["--device", "desk", "leave", "--user", "alice", "room"],
    )
    .await;
    assert_eq!(left[0]["changed"], true);
    assert_eq!(left[0]["occupancy"], 0);
    join.kill().await.unwrap();
    watch.kill().await.unwrap();
}

#[tokio::test]
async fn a_watch_outlives_many_keepalives_because_it_pings() {
    // Keepalive clamped to 1 s: a silent watcher would be closed after 1.5 s.
    let broker = start(|c| {
        c.session.keepalive_min_secs = 1;
        c.session.keepalive_max_secs = 1;
        c.session.keepalive_default_secs = 1;
    })
    .await;
    let (_watch, mut lines, _) = watch_alice_as_bob(&broker).await;
    // Several keepalive periods of silence from the watcher's side.
    let alice = connect(&broker, "alice").await;
    for _ in 0..8 {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        within(alice.ping()).await.unwrap();
    }
    within(alice.set_presence(presenced::pb::SetPresence {
        status: Some("still there?".into()),
        ..Default::default()
    }))
    .await
    .unwrap();
    loop {
        let line = within(lines.next_line())
            .await
            .unwrap()
            .expect("the watch is still running after 4 s of a 1 s keepalive");
        let event: Value = serde_json::from_str(&line).unwrap();
        if event["event"] == "update" {
            assert_eq!(event["presence"]["status"], "still there?");
            break;
        }
    }
}

async fn next_json(lines: &mut Lines) -> Value {
    let line = within(lines.next_line())
        .await
        .unwrap()
        .expect("presencectl is still running");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line}: {e}"))
}

#[tokio::test]
async fn watch_resume_prints_what_changed_since_the_file_and_background_prints_batches() {
    let broker = start(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bob.resume");
    let file_arg = file.to_str().unwrap();
    let alice = connect(&broker, "alice").await;
    let _carol = connect(&broker, "carol").await;
    let spawn = |extra: &[&str]| {
        let mut args = vec!["watch", "--user", "bob"];
        args.extend_from_slice(extra);
        args.extend(["alice", "carol"]);
        let mut child = ctl(&broker)
            .args(&args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        (child, lines)
    };
    // First run: nothing to resume from.
    let (mut watch, mut lines) = spawn(&["--resume", file_arg]);
    let first = next_json(&mut lines).await;
    assert_eq!(first["event"], "full_snapshot", "{first}");
    assert_eq!(first["users"], 2);
    for _ in 0..2 {
        assert_eq!(next_json(&mut lines).await["event"], "snapshot");
    }
    // Events move the file's versions on.
    within(alice.set_presence(presenced::pb::SetPresence {
        status: Some("seen live".into()),
        ..Default::default()
    }))
    .await
    .unwrap();
    assert_eq!(next_json(&mut lines).await["event"], "update");
    watch.kill().await.unwrap();
    let _ = watch.wait().await;

    // While it is not running, alice changes; carol does not.
    within(alice.set_presence(presenced::pb::SetPresence {
        status: Some("missed".into()),
        ..Default::default()
    }))
    .await
    .unwrap();
    let (mut watch, mut lines) = spawn(&["--resume", file_arg, "--background", "1"]);
    let first = next_json(&mut lines).await;
    assert_eq!(first["event"], "resumed", "{first}");
    assert_eq!(
        (first["changed"].as_u64(), first["unchanged"].as_u64()),
        (Some(1), Some(1))
    );
    let snapshot = next_json(&mut lines).await;
    assert_eq!(snapshot["user"], "alice");
    assert_eq!(snapshot["presence"]["status"], "missed");
    // The contract is in force once the CLI says so; changes before that line arrive live.
    let background = next_json(&mut lines).await;
    assert_eq!(background["event"], "background", "{background}");
    assert_eq!(background["interval_seconds"], 1);
    // Background: three changes arrive as one batch with the latest.
    for status in ["b1", "b2", "b3"] {
        within(alice.set_presence(presenced::pb::SetPresence {
            status: Some(status.into()),
            ..Default::default()
        }))
        .await
        .unwrap();
    }
    let batched = next_json(&mut lines).await;
    assert_eq!(batched["batch"], true, "{batched}");
    assert_eq!(batched["presence"]["status"], "b3", "{batched}");
    watch.kill().await.unwrap();
}

/// Runs presencectl expecting it to fail; its stderr.
async fn run_failing(broker: &Broker, args: &[&str]) -> String {
    let out = within(ctl(broker).args(args).output()).await.unwrap();
    assert!(
        !out.status.success(),
        "presencectl {args:?} should have failed, printed {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Alice's availability as `presencectl get --user bob alice` shows it.
async fn bob_sees_alice(broker: &Broker) -> Value {
    run(broker, &["get", "--user", "bob", "alice"]).await[0]["availability"].clone()
}

#[tokio::test]
async fn block_blocked_and_unblock_change_what_the_blocked_user_sees() {
    let broker = start(|_| {}).await;
    let _alice = connect(&broker, "alice").await;
    assert_eq!(bob_sees_alice(&broker).await, "online");

    let before = presenced::now_ms();
    let blocked = run(&broker, &["block", "--user", "alice", "bob", "carol"]).await;
    assert_eq!(blocked, [serde_json::json!({"changed": 2, "total": 2})]);
    let again = run(&broker, &["block", "--user", "alice", "bob"]).await;
    assert_eq!(again, [serde_json::json!({"changed": 0, "total": 2})]);
    assert_eq!(bob_sees_alice(&broker).await, "offline", "bob is blocked");

    // One user per page: the command follows the cursor to the end; the default page size
    // lists the same.
    for extra in [&["--page-size", "1"][..], &[]] {
        let mut args = vec!["blocked", "--user", "alice"];
        args.extend_from_slice(extra);
        let list = run(&broker, &args).await;
        assert_eq!(list.len(), 3, "{list:?}");
        let users: Vec<&str> = list[..2]
            .iter()
            .map(|l| l["user"].as_str().unwrap())
            .collect();
        assert_eq!(users, ["bob", "carol"]);
        for line in &list[..2] {
            let since = line["since_ms"].as_u64().unwrap();
            assert!((before..=presenced::now_ms()).contains(&since), "{line}");
        }
        assert_eq!(list[2], serde_json::json!({"total": 2}));
    }

    let un = run(
        &broker,
        &["unblock", "--user", "alice", "bob", "carol", "dave"],
    )
    .await;
    assert_eq!(un, [serde_json::json!({"changed": 2, "total": 0})]);
    let list = run(&broker, &["blocked", "--user", "alice"]).await;
    assert_eq!(list, [serde_json::json!({"total": 0})]);
    assert_eq!(bob_sees_alice(&broker).await, "online", "bob is unblocked");

    // Failures say why and exit nonzero.
    let err = run_failing(&broker, &["block", "--user", "alice", "alice"]).await;
    assert!(err.contains("cannot block yourself"), "{err}");
    let err = run_failing(
        &broker,
        &["blocked", "--user", "alice", "--page-size", "100000"],
    )
    .await;
    assert!(err.contains("page_size 100000 exceeds"), "{err}");
    let err = run_failing(&broker, &["block", "--user", "alice"]).await;
    assert!(err.contains("required"), "{err}");
}

/// The watcher's next line that is not an `update` (a device of a user who stays online
/// coming or going), at most a few lines on.
async fn next_change(lines: &mut Lines) -> Value {
    for _ in 0..4 {
        let event = next_json(lines).await;
        if event["event"] != "update" {
            return event;
        }
    }
    panic!("only updates arrived");
}

#[tokio::test]
async fn invisible_on_looks_like_going_offline_to_a_watcher_and_off_like_coming_back() {
    let broker = start(|_| {}).await;
    let (mut watch, mut lines, snapshot) = watch_alice_as_bob(&broker).await;
    assert_eq!(snapshot["presence"]["availability"], "offline");
    let alice = connect(&broker, "alice").await;
    assert_eq!(next_json(&mut lines).await["event"], "online");
    within(alice.set_presence(presenced::pb::SetPresence {
        status: Some("here".into()),
        ..Default::default()
    }))
    .await
    .unwrap();
    assert_eq!(next_json(&mut lines).await["presence"]["status"], "here");

    let on = run(&broker, &["invisible", "on", "--user", "alice"]).await;
    assert_eq!(on.len(), 1, "{on:?}");
    assert_eq!(on[0]["invisible"], true);
    // Her own view is the truth: she is online.
    assert_eq!(on[0]["presence"]["user"], "alice");
    assert_eq!(on[0]["presence"]["availability"], "online");
    assert_eq!(on[0]["presence"]["status"], "here");
    // To bob it looks like going offline.
    let gone = next_change(&mut lines).await;
    assert_eq!(gone["event"], "offline", "{gone}");
    assert_eq!(gone["reason"], "disconnect");
    assert_eq!(gone["presence"]["availability"], "offline");

    let off = run(&broker, &["invisible", "off", "--user", "alice"]).await;
    assert_eq!(off.len(), 1, "{off:?}");
    assert_eq!(off[0]["invisible"], false);
    assert_eq!(off[0]["presence"]["availability"], "online");
    // Nothing reached bob while she was invisible (the CLI's sessions came and went): his
    // next line is her coming back online.
    let back = next_json(&mut lines).await;
    assert_eq!(back["event"], "online", "{back}");
    assert_eq!(back["presence"]["availability"], "online");
    assert_eq!(back["presence"]["status"], "here");
    assert!(
        back["version"].as_u64() > gone["version"].as_u64(),
        "{back}"
    );
    watch.kill().await.unwrap();
}

/// Starts presencectl with `args`, its output lines piped.
fn spawn(broker: &Broker, args: &[&str]) -> (tokio::process::Child, Lines) {
    let mut child = ctl(broker)
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    (child, lines)
}

#[tokio::test]
async fn audience_approved_files_requests_that_approve_deny_and_revoke_answer() {
    use presenced::pb;
    let broker = start(|_| {}).await;
    let mut alice = connect(&broker, "alice").await;
    within(alice.set_presence(pb::SetPresence {
        status: Some("hi".into()),
        ..Default::default()
    }))
    .await
    .unwrap();

    let set = run(
        &broker,
        &["audience", "--user", "alice", "presence", "approved"],
    )
    .await;
    assert_eq!(
        set,
        [serde_json::json!({
            "presence_audience": "approved",
            "last_seen_audience": "everyone",
            "invisible": false,
            "blocked": 0,
            "approved": 0,
            "pending": 0,
        })]
    );

    // Bob asks: he sees her offline, and she is told.
    let mut bob = connect(&broker, "bob").await;
    let before = presenced::now_ms();
    let reply = within(bob.subscribe(&["alice"])).await.unwrap();
    assert_eq!(availability(&reply.presences[0]), pb::Availability::Offline);
    let request = within(alice.next_subscription_request()).await.unwrap();
    assert_eq!(request.requester_id, "bob");
    let pending = run(&broker, &["requests", "--user", "alice"]).await;
    assert_eq!(pending.len(), 2, "{pending:?}");
    assert_eq!(pending[0]["user"], "bob");
    assert_eq!(pending[0]["state"], "pending");
    let since = pending[0]["since_ms"].as_u64().unwrap();
    assert!(
        (before..=presenced::now_ms()).contains(&since),
        "{pending:?}"
    );
    assert_eq!(pending[1], serde_json::json!({"total": 1}));

    // Approved: bob is told, and sees her online with her status.
    let approved = run(&broker, &["approve", "--user", "alice", "bob"]).await;
    assert_eq!(approved, [serde_json::json!({"changed": 1})]);
    let accepted = within(bob.next_subscription_accepted()).await.unwrap();
    assert_eq!(accepted.user_id, "alice");
    assert_eq!(
        availability(accepted.presence.as_ref().unwrap()),
        pb::Availability::Online
    );
    let online = presence_event_of(&mut bob, "alice", pb::EventKind::Online).await;
    assert_eq!(online.presence.unwrap().status, "hi");

    // Carol asks and is denied: listed under denied, no longer pending.
    let carol = connect(&broker, "carol").await;
    within(carol.subscribe(&["alice"])).await.unwrap();
    let request = within(alice.next_subscription_request()).await.unwrap();
    assert_eq!(request.requester_id, "carol");
    let denied = run(&broker, &["deny", "--user", "alice", "carol"]).await;
    assert_eq!(denied, [serde_json::json!({"changed": 1})]);
    let listed = run(
        &broker,
        &["requests", "--user", "alice", "--state", "denied"],
    )
    .await;
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(
        (&listed[0]["user"], &listed[0]["state"]),
        (&serde_json::json!("carol"), &serde_json::json!("denied"))
    );
    assert_eq!(listed[1], serde_json::json!({"total": 1}));
    let none = run(&broker, &["requests", "--user", "alice"]).await;
    assert_eq!(none, [serde_json::json!({"total": 0})]);
    // Every state, one entry per page: the command follows the cursor to the end.
    let all = run(
        &broker,
        &[
            "requests",
            "--user",
            "alice",
            "--state",
            "all",
            "--page-size",
            "1",
        ],
    )
    .await;
    let entries: Vec<(&str, &str)> = all[..all.len() - 1]
        .iter()
        .map(|l| (l["user"].as_str().unwrap(), l["state"].as_str().unwrap()))
        .collect();
    assert_eq!(entries, [("bob", "approved"), ("carol", "denied")]);
    assert_eq!(all[all.len() - 1], serde_json::json!({"total": 2}));

    // Last-seen has its own audience; without arguments `audience` only shows the settings.
    let last_seen = run(
        &broker,
        &["audience", "--user", "alice", "last-seen", "nobody"],
    )
    .await;
    assert_eq!(last_seen[0]["presence_audience"], "approved");
    assert_eq!(last_seen[0]["last_seen_audience"], "nobody");
    let shown = run(&broker, &["audience", "--user", "alice"]).await;
    assert_eq!(shown, last_seen);
    assert_eq!(
        (&shown[0]["approved"], &shown[0]["pending"]),
        (&1.into(), &0.into())
    );

    // Revoked: bob sees her leave.
    let revoked = run(&broker, &["revoke", "--user", "alice", "bob"]).await;
    assert_eq!(revoked, [serde_json::json!({"changed": 1})]);
    presence_event_of(&mut bob, "alice", pb::EventKind::Offline).await;
    let again = run(&broker, &["revoke", "--user", "alice", "bob"]).await;
    assert_eq!(again, [serde_json::json!({"changed": 0})]);

    // Failures say why and exit nonzero.
    let err = run_failing(&broker, &["approve", "--user", "alice", "alice"]).await;
    assert!(err.contains("yourself"), "{err}");
    let err = run_failing(
        &broker,
        &["audience", "--user", "alice", "presence", "friends"],
    )
    .await;
    assert!(err.contains("invalid value 'friends'"), "{err}");
    let err = run_failing(&broker, &["audience", "--user", "alice", "presence"]).await;
    assert!(err.contains("required"), "{err}");
    let err = run_failing(
        &broker,
        &["requests", "--user", "alice", "--state", "maybe"],
    )
    .await;
    assert!(err.contains("invalid value 'maybe'"), "{err}");
    let err = run_failing(&broker, &["deny", "--user", "alice"]).await;
    assert!(err.contains("required"), "{err}");
}

#[tokio::test]
async fn set_invisible_hold_is_never_seen_online_until_invisible_off() {
    let broker = start(|_| {}).await;
    let (mut watch, mut lines) = spawn(&broker, &["watch", "--user", "bob", "alice", "marker"]);
    for _ in 0..2 {
        let snapshot = next_json(&mut lines).await;
        assert_eq!(snapshot["event"], "snapshot", "{snapshot}");
        assert_eq!(
            snapshot["presence"]["availability"], "offline",
            "{snapshot}"
        );
    }

    let (mut set, mut set_lines) = spawn(
        &broker,
        &[
            "set",
            "--invisible",
            "--hold",
            "--user",
            "alice",
            "--status",
            "secret",
        ],
    );
    // Her own view is the truth, and says she is invisible.
    let own = next_json(&mut set_lines).await;
    assert_eq!(own["invisible"], true, "{own}");
    assert_eq!(own["availability"], "online", "{own}");
    assert_eq!(own["status"], "secret", "{own}");

    // The marker comes online after she connected and published: had she been announced, the
    // watcher would have printed her first.
    let _marker = connect(&broker, "marker").await;
    let next = next_json(&mut lines).await;
    assert_eq!(
        (&next["user"], &next["event"]),
        (&serde_json::json!("marker"), &serde_json::json!("online")),
        "{next}"
    );
    let got = run(&broker, &["get", "--user", "carol", "alice"]).await;
    assert_eq!(got[0]["availability"], "offline", "{got:?}");
    assert_eq!(got[0]["status"], "", "{got:?}");

    let off = run(&broker, &["invisible", "off", "--user", "alice"]).await;
    assert_eq!(off[0]["invisible"], false, "{off:?}");
    // The watcher's next line is her coming online, with what the held `set` published.
    let back = next_json(&mut lines).await;
    assert_eq!(back["user"], "alice", "{back}");
    assert_eq!(back["event"], "online", "{back}");
    assert_eq!(back["presence"]["status"], "secret", "{back}");
    // `--hold` kept her session: she stays online after the `invisible off` session ended.
    let got = run(&broker, &["get", "--user", "carol", "alice"]).await;
    assert_eq!(got[0]["availability"], "online", "{got:?}");
    set.kill().await.unwrap();
    watch.kill().await.unwrap();
}

#[tokio::test]
async fn set_invisible_device_hold_hides_only_that_device() {
    let broker = start(|_| {}).await;
    let phone = connect(&broker, "alice").await;
    let (mut watch, mut lines) = spawn(&broker, &["watch", "--user", "bob", "alice", "marker"]);
    for _ in 0..2 {
        let snapshot = next_json(&mut lines).await;
        assert_eq!(snapshot["event"], "snapshot", "{snapshot}");
    }
    let (mut set, mut set_lines) = spawn(
        &broker,
        &["set", "--invisible-device", "--hold", "--user", "alice"],
    );
    let own = next_json(&mut set_lines).await;
    assert_eq!(own["device_invisible"], true, "{own}");
    assert_eq!(own["invisible"], false, "{own}");
    assert_eq!(own["devices"].as_array().map(Vec::len), Some(2), "{own}");
    // Nothing about the hidden device reaches the watcher before the marker.
    let _marker = connect(&broker, "marker").await;
    let next = next_json(&mut lines).await;
    assert_eq!(
        (&next["user"], &next["event"]),
        (&serde_json::json!("marker"), &serde_json::json!("online")),
        "{next}"
    );
    let got = run(&broker, &["get", "--user", "carol", "alice"]).await;
    assert_eq!(
        got[0]["devices"].as_array().map(Vec::len),
        Some(1),
        "{got:?}"
    );
    // The visible phone leaves: alice goes offline for everyone else, though held.
    phone.disconnect().await.unwrap();
    let gone = next_json(&mut lines).await;
    assert_eq!(
        (&gone["user"], &gone["event"]),
        (&serde_json::json!("alice"), &serde_json::json!("offline")),
        "{gone}"
    );
    set.kill().await.unwrap();
    watch.kill().await.unwrap();
}

#[tokio::test]
async fn iss_and_aud_flags_mint_tokens_a_strict_broker_accepts() {
    let broker = start(|c| {
        c.auth.issuer = Some("https://auth.example".into());
        c.auth.audience = Some("presenced".into());
    })
    .await;
    let refused = run_failing(&broker, &["get", "--user", "bob", "alice"]).await;
    assert!(refused.contains("issuer"), "{refused}");
    let out = run(
        &broker,
        &[
            "--iss",
            "https://auth.example",
            "--aud",
            "presenced",
            "get",
            "--user",
            "bob",
            "alice",
        ],
    )
    .await;
    assert_eq!(out[0]["availability"], "offline", "{out:?}");
}
