//! Keeps `presence-bench` working: a tiny native fanout run against an in-process broker must
//! deliver every change to every watcher. Asserts behaviour only; figures come from
//! `bench/run.sh`, by hand.

mod common;

use common::*;
use serde_json::Value;

#[tokio::test]
async fn presence_bench_runs_and_delivers_everything() {
    let broker = start(|_| {}).await;
    let out = within(
        tokio::process::Command::new(env!("CARGO_BIN_EXE_presence-bench"))
            .args([
                "--addr",
                &broker.addr.to_string(),
                "fanout",
                "--watchers",
                "5",
                "--changes",
                "10",
                "--rate",
                "5",
            ])
            .output(),
    )
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["driver"], "native");
    assert_eq!(report["deliveries"], 50);
    assert_eq!(report["delivery_ratio"], 1.0);
    assert_eq!(report["final_state_ratio"], 1.0);
    assert!(report["p99_ms"].as_f64().unwrap() > 0.0);
}
