//! Durable subscriptions (SPEC §5): a restart on the same data folder restores subscriptions in
//! both directions with their expiries, and last-seen times; expired subscriptions are gone and
//! never delivered to; a data folder that cannot be used is a clear error at start.

mod common;

use common::*;
use presenced::pb;
use presenced::store::{SledStore, StoreError, SubscriptionStore};
use tokio::process::Command;

#[tokio::test]
async fn a_restart_restores_subscriptions_expiries_and_last_seen() {
    let broker = start(|_| {}).await;
    let bob = connect(&broker, "bob").await;
    let r = within(bob.subscribe_for(&["alice", "dave"], 3600))
        .await
        .unwrap();
    let carol = connect(&broker, "carol").await;
    within(carol.subscribe(&["alice"])).await.unwrap();
    let gone = connect(&broker, "gone").await;
    within(gone.disconnect()).await.unwrap();
    let seen = within(bob.get_presence(&["gone"])).await.unwrap()[0].last_seen_ms;
    assert!(seen > 0);
    drop((bob, carol));
    let dir = broker.stop_keeping_data().await;

    // An edge that expired while the broker was down, written straight into the folder.
    {
        let store = SledStore::open(dir.path()).unwrap();
        store
            .subscribe("ghost", &["alice".to_string()], 1, 0, 3000)
            .unwrap();
        store.flush().unwrap();
    }

    let broker = start_in(dir, |_| {}).await;
    let mut bob = connect(&broker, "bob").await;
    let subs = within(bob.all_subscriptions()).await.unwrap();
    let names: Vec<&str> = subs.iter().map(|s| s.user_id.as_str()).collect();
    assert_eq!(names, ["alice", "dave"]);
    assert!(subs.iter().all(|s| s.expires_at_ms == r.expires_at_ms));
    let mut ghost = connect(&broker, "ghost").await;
    assert!(
        within(ghost.all_subscriptions()).await.unwrap().is_empty(),
        "expired edge is not listed"
    );
    assert_eq!(
        within(bob.get_presence(&["gone"])).await.unwrap()[0].last_seen_ms,
        seen
    );

    // The reverse direction works: alice's change reaches bob (and carol), not the ghost.
    let alice = connect(&broker, "alice").await;
    let e = within(bob.next_presence_event()).await.unwrap();
    assert_eq!(
        (e.user_id.as_str(), kind(&e)),
        ("alice", pb::EventKind::Online)
    );
    within(alice.set_presence(pb::SetPresence {
        status: Some("x".into()),
        ..Default::default()
    }))
    .await
    .unwrap();
    within(bob.next_presence_event()).await.unwrap();
    // The ghost got nothing: its next frame is the reply to this ping, not an event.
    within(ghost.ping()).await.unwrap();
    assert!(ghost.try_next_event().is_none());

    // presencectl shows the restored list.
    let out = within(
        Command::new(env!("CARGO_BIN_EXE_presencectl"))
            .args([
                "--server",
                &broker.addr.to_string(),
                "subs",
                "--user",
                "bob",
            ])
            .output(),
    )
    .await
    .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("\"user\":\"alice\"") && text.contains("\"user\":\"dave\""),
        "{text}"
    );
}

#[tokio::test]
async fn unusable_data_folders_fail_at_start_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-folder");
    std::fs::write(&file, b"x").unwrap();
    let mut config = test_config(&file);
    config.metrics.enabled = false;
    let err = presenced::Server::bind(config).await.unwrap_err();
    assert!(err.to_string().contains("not-a-folder"), "{err}");

    let newer = tempfile::tempdir().unwrap();
    {
        let db = sled::open(newer.path()).unwrap();
        db.open_tree("meta")
            .unwrap()
            .insert("format", &7u64.to_be_bytes())
            .unwrap();
        db.flush().unwrap();
    }
    let err = presenced::Server::bind(test_config(newer.path()))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            presenced::server::ServerError::Store(StoreError::NewerFormat { found: 7, .. })
        ),
        "{err}"
    );

    // Garbage where sled keeps its files: an error, never a panic or a silent wipe.
    let garbage = tempfile::tempdir().unwrap();
    std::fs::write(garbage.path().join("conf"), b"\xff\xfe garbage").unwrap();
    std::fs::write(garbage.path().join("db"), vec![0xa5u8; 4096]).unwrap();
    let out = within(
        Command::new(env!("CARGO_BIN_EXE_presenced"))
            .args(["--listen", "127.0.0.1:0", "--no-metrics", "--data-dir"])
            .arg(garbage.path())
            .output(),
    )
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("data folder"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        std::fs::read(garbage.path().join("conf")).unwrap(),
        b"\xff\xfe garbage",
        "left alone"
    );
}
