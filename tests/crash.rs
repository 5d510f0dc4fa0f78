//! Crash safety of acknowledged subscription changes (issue: "acknowledged means on disk").
//! Runs the real `presenced` binary, streams subscribe/unsubscribe batches from several clients,
//! kills the process with SIGKILL at a random moment, restarts it on the same data folder and
//! checks every subscriber's list: every acknowledged change is there, and the one request that
//! was in flight is either wholly applied or not at all. 200 cycles by default, which CI runs;
//! set `PRESENCE_CRASH_CYCLES=5000` to run it by hand for longer (and `PRESENCE_CRASH_SEED` to
//! replay a failure: the seed is printed with every result). One more subscriber's changes are
//! made by the app's backend through the admin API (`POST /v1/users/{u}/subscriptions`),
//! whose 200 promises the same durability. And one more user's block list changes through the
//! wire's Block/Unblock (privacy settings are stored like subscriptions: acknowledged means on
//! disk).

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use presenced::client::{Client, ClientOptions};

const SUBSCRIBERS: usize = 4;
/// The subscriber whose changes go through the admin API (after the wire clients').
const API_SUBSCRIBER: usize = SUBSCRIBERS;
/// The user whose block list changes (Block = "Subscribe", Unblock = "Unsubscribe" below).
const BLOCKER: usize = SUBSCRIBERS + 1;
const ADMIN_KEY: &str = "crash-admin-key-0123456789abcdef0123456789";
const TARGETS: u64 = 12;

#[derive(Debug, Clone)]
enum Op {
    Subscribe(Vec<String>),
    Unsubscribe(Vec<String>),
}

impl Op {
    fn applied_to(&self, set: &BTreeSet<String>) -> BTreeSet<String> {
        let mut out = set.clone();
        match self {
            Op::Subscribe(ids) => out.extend(ids.iter().cloned()),
            Op::Unsubscribe(ids) => ids.iter().for_each(|id| {
                out.remove(id);
            }),
        }
        out
    }
}

/// What the test knows of one subscriber's list.
#[derive(Debug, Default)]
struct Model {
    acked: BTreeSet<String>,
    /// Sent, not acknowledged when the broker died.
    pending: Option<Op>,
    acked_ops: usize,
}

impl Model {
    /// Records the answer to `op`: acknowledged, it is applied; not, it stays pending (the
    /// broker died). Returns whether to go on.
    fn settle(&mut self, op: &Op, acked: bool) -> bool {
        if acked {
            self.acked = op.applied_to(&self.acked);
            self.pending = None;
            self.acked_ops += 1;
        }
        acked
    }
}

fn user(i: usize) -> String {
    format!("s{i}")
}

async fn client(
    addr: SocketAddr,
    user: &str,
    device: &str,
) -> Result<Client, presenced::client::ClientError> {
    Client::connect(ClientOptions::new(addr, token(user)).device(device)).await
}

/// A random batch of 1-4 targets, subscribed (2 in 3) or unsubscribed.
fn random_op(rng: &mut Rng) -> Op {
    let batch: Vec<String> = (0..1 + rng.below(4))
        .map(|_| format!("t{}", rng.below(TARGETS)))
        .collect();
    if rng.below(3) == 0 {
        Op::Unsubscribe(batch)
    } else {
        Op::Subscribe(batch)
    }
}

/// Streams random batches until the connection dies or `limit` requests were acknowledged.
async fn stream(addr: SocketAddr, who: usize, mut model: Model, seed: u64) -> Model {
    let mut rng = Rng(seed | 1);
    let Ok(client) = client(addr, &user(who), "writer").await else {
        return model;
    };
    for _ in 0..10_000 {
        let op = random_op(&mut rng);
        let (Op::Subscribe(batch) | Op::Unsubscribe(batch)) = &op;
        let refs: Vec<&str> = batch.iter().map(String::as_str).collect();
        model.pending = Some(op.clone());
        let acked = match &op {
            Op::Subscribe(_) => client.subscribe(&refs).await.is_ok(),
            Op::Unsubscribe(_) => client.unsubscribe(&refs).await.is_ok(),
        };
        if !model.settle(&op, acked) {
            return model;
        }
    }
    model
}

/// The same with Block/Unblock: the model's set is the block list.
async fn stream_blocks(addr: SocketAddr, who: usize, mut model: Model, seed: u64) -> Model {
    let mut rng = Rng(seed | 1);
    let Ok(client) = client(addr, &user(who), "writer").await else {
        return model;
    };
    for _ in 0..10_000 {
        let op = random_op(&mut rng);
        let (Op::Subscribe(batch) | Op::Unsubscribe(batch)) = &op;
        let refs: Vec<&str> = batch.iter().map(String::as_str).collect();
        model.pending = Some(op.clone());
        let acked = match &op {
            Op::Subscribe(_) => client.block(&refs).await.is_ok(),
            Op::Unsubscribe(_) => client.unblock(&refs).await.is_ok(),
        };
        if !model.settle(&op, acked) {
            return model;
        }
    }
    model
}

/// The same through the admin API: a 200 is an acknowledgement.
async fn stream_api(admin: SocketAddr, who: usize, mut model: Model, seed: u64) -> Model {
    let mut rng = Rng(seed | 1);
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let url = format!("http://{admin}/v1/users/{}/subscriptions", user(who));
    for _ in 0..10_000 {
        let op = random_op(&mut rng);
        let body = match &op {
            Op::Unsubscribe(batch) => serde_json::json!({ "remove": batch }),
            Op::Subscribe(batch) => serde_json::json!({ "add": batch }),
        };
        model.pending = Some(op.clone());
        let acked = match http
            .post(&url)
            .bearer_auth(ADMIN_KEY)
            .json(&body)
            .send()
            .await
        {
            Ok(r) => r.status().is_success(),
            Err(_) => false,
        };
        if !model.settle(&op, acked) {
            return model;
        }
    }
    model
}

async fn verify(addr: SocketAddr, models: &mut [Model], cycle: usize, seed: u64) {
    for (i, model) in models.iter_mut().enumerate() {
        let c = within(client(addr, &user(i), "verifier"))
            .await
            .unwrap_or_else(|e| panic!("cycle {cycle}: verifier connects: {e}"));
        let actual: BTreeSet<String> = if i == BLOCKER {
            within(c.list_blocked("", 100))
                .await
                .unwrap()
                .blocked
                .into_iter()
                .map(|b| b.user_id)
                .collect()
        } else {
            within(c.all_subscriptions())
                .await
                .unwrap()
                .into_iter()
                .map(|s| s.user_id)
                .collect()
        };
        let expected_if_applied = model.pending.as_ref().map(|op| op.applied_to(&model.acked));
        assert!(
            actual == model.acked || Some(&actual) == expected_if_applied.as_ref(),
            "cycle {cycle} (seed {seed}): {} has {actual:?}; acknowledged {:?}; in flight {:?}",
            user(i),
            model.acked,
            model.pending
        );
        model.acked = actual;
        model.pending = None;
        within(c.disconnect()).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_changes_survive_sigkill() {
    let cycles: usize = std::env::var("PRESENCE_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let seed: u64 = std::env::var("PRESENCE_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(presenced::now_ms);
    let mut rng = Rng(seed | 1);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("admin.toml");
    std::fs::write(
        &config,
        format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n[admin.keys.crash]\nkey = \"{ADMIN_KEY}\"\nscope = \"write\"\n"
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap().to_string();
    let data = dir.path().join("data");
    let mut models: Vec<Model> = (0..=BLOCKER).map(|_| Model::default()).collect();
    let mut acked_total = 0;
    let mut api_acked = 0;
    let mut blocks_acked = 0;
    for cycle in 0..cycles {
        let spawned = spawn_presenced(&data, &["--config", &config]).await;
        let admin = spawned.admin().expect("the admin API is on");
        let Spawned {
            mut child, addr, ..
        } = spawned;
        verify(addr, &mut models, cycle, seed).await;
        let workers: Vec<_> = models
            .drain(..)
            .enumerate()
            .map(|(i, m)| {
                if i == API_SUBSCRIBER {
                    tokio::spawn(stream_api(admin, i, m, rng.next()))
                } else if i == BLOCKER {
                    tokio::spawn(stream_blocks(addr, i, m, rng.next()))
                } else {
                    tokio::spawn(stream(addr, i, m, rng.next()))
                }
            })
            .collect();
        // A random moment: sometimes before any request completes, sometimes well into them.
        tokio::time::sleep(Duration::from_millis(rng.below(60))).await;
        child.start_kill().unwrap();
        within(child.wait()).await.unwrap();
        for (i, w) in workers.into_iter().enumerate() {
            let m = within(w).await.unwrap();
            acked_total += m.acked_ops;
            if i == API_SUBSCRIBER {
                api_acked += m.acked_ops;
            }
            if i == BLOCKER {
                blocks_acked += m.acked_ops;
            }
            models.push(Model { acked_ops: 0, ..m });
        }
    }
    let last = spawn_presenced(&data, &["--config", &config]).await;
    verify(last.addr, &mut models, cycles, seed).await;
    assert!(
        acked_total > cycles,
        "only {acked_total} acknowledged changes in {cycles} cycles: the test exercised nothing"
    );
    assert!(
        api_acked > cycles / 4,
        "only {api_acked} changes acknowledged through the admin API in {cycles} cycles"
    );
    assert!(
        blocks_acked > cycles / 4,
        "only {blocks_acked} block changes acknowledged in {cycles} cycles"
    );
    eprintln!(
        "{cycles} SIGKILL cycles, {acked_total} acknowledged changes verified, {api_acked} of them made through the admin API, {blocks_acked} block-list changes (seed {seed})"
    );
}
