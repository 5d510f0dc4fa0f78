//! Keeps `presence-bench` working: tiny native runs of every workload against an in-process
//! broker (TLS, and plaintext for fanout) must deliver every change to every watcher and
//! restore every client after a reconnect storm. Asserts behaviour only; figures come from
//! `bench/run.sh`, by hand.

mod common;

use common::*;
use serde_json::Value;

async fn bench(args: &[&str]) -> Value {
    let out = within(
        tokio::process::Command::new(env!("CARGO_BIN_EXE_presence-bench"))
            .args(args)
            .output(),
    )
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn started_with_plaintext(config: &mut presenced::config::Config) {
    config.plain_listen = Some("127.0.0.1:0".parse().unwrap());
}

#[tokio::test]
async fn fanout_delivers_everything_over_tls_and_plaintext() {
    let broker = start(started_with_plaintext).await;
    let tls = broker.addr.to_string();
    let plain = broker.plain_addr.unwrap().to_string();
    for (transport, args) in [
        ("tls", vec!["--addr", &tls]),
        ("plain", vec!["--plain", "--addr", &plain]),
    ] {
        let mut args = args.clone();
        args.extend([
            "--per-task",
            "2",
            "fanout",
            "--watchers",
            "5",
            "--changes",
            "10",
            "--rate",
            "5",
        ]);
        let report = bench(&args).await;
        assert_eq!(report["driver"], "native");
        assert_eq!(report["transport"], transport);
        assert_eq!(report["deliveries"], 50, "{report}");
        assert_eq!(report["delivery_ratio"], 1.0);
        assert_eq!(report["final_state_ratio"], 1.0);
        assert!(report["p99_ms"].as_f64().unwrap() > 0.0);
    }
}

#[tokio::test]
async fn mix_delivers_every_change_to_each_of_its_watchers() {
    let broker = start(|_| {}).await;
    let addr = broker.addr.to_string();
    let report = bench(&[
        "--addr",
        &addr,
        "--per-task",
        "4",
        "mix",
        "--users",
        "12",
        "--watch",
        "3",
        "--percent-per-sec",
        "50",
        "--seconds",
        "2",
    ])
    .await;
    assert_eq!(report["workload"], "mix");
    // 12 users × 50% per second × 2 s = 12 changes, each seen by 3 watchers.
    assert_eq!(report["changes"], 12, "{report}");
    assert_eq!(report["deliveries"], 36, "{report}");
    assert_eq!(report["delivery_ratio"], 1.0);
}

#[tokio::test]
async fn storm_restores_every_client_snapshot() {
    let broker = start(|_| {}).await;
    let addr = broker.addr.to_string();
    let report = bench(&[
        "--addr",
        &addr,
        "--per-task",
        "8",
        "storm",
        "--clients",
        "20",
    ])
    .await;
    assert_eq!(report["workload"], "storm");
    assert_eq!(report["restored"], 20, "{report}");
    assert!(report["all_restored_secs"].as_f64().unwrap() > 0.0);
}

fn started_with_websockets(config: &mut presenced::config::Config) {
    config.websocket.listen = Some("127.0.0.1:0".parse().unwrap());
    config.websocket.plain_listen = Some("127.0.0.1:0".parse().unwrap());
}

#[tokio::test]
async fn fanout_and_idle_work_over_wss_and_ws() {
    let broker = start(started_with_websockets).await;
    let wss = broker.ws_addr.unwrap().to_string();
    let ws = broker.ws_plain_addr.unwrap().to_string();
    for (transport, addr) in [("wss", wss.as_str()), ("ws", ws.as_str())] {
        let report = bench(&[
            "--transport",
            transport,
            "--addr",
            addr,
            "--per-task",
            "2",
            "fanout",
            "--watchers",
            "5",
            "--changes",
            "10",
            "--rate",
            "5",
        ])
        .await;
        assert_eq!(report["transport"], transport);
        assert_eq!(report["deliveries"], 50, "{report}");
        assert_eq!(report["delivery_ratio"], 1.0);
        assert_eq!(report["final_state_ratio"], 1.0);
    }
    // The broker runs inside this test process, so its RSS is ours.
    let pid = std::process::id().to_string();
    let report = bench(&[
        "--transport",
        "wss",
        "--addr",
        &wss,
        "--pid",
        &pid,
        "idle",
        "--connections",
        "10",
    ])
    .await;
    assert_eq!(report["transport"], "wss");
    assert_eq!(report["connections"], 10);
}
