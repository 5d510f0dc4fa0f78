//! Resume (SPEC §12) against an oracle: random churn (devices coming and going, presence
//! updates, subscriptions added and removed from the watcher's other device) while a watcher
//! disconnects and resumes many times, across broker restarts. After each resume, and after
//! each connected phase, the view the watcher rebuilt from what it received equals a fresh
//! GetPresence of every user it watches; events arrive in version order per user.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use common::*;
use presenced::client::Client;
use presenced::pb::{self, server_frame::Body as S};

const USERS: usize = 10;
const ROUNDS: usize = 24;

/// A small deterministic generator (the seed is printed, so a failure can be replayed).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn user(i: usize) -> String {
    format!("u{i}")
}

/// What the watcher shows for a user: every field a client renders.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Shown {
    availability: i32,
    status: String,
    state: BTreeMap<String, String>,
    devices: Vec<String>,
    last_seen_ms: u64,
    version: u64,
}

fn shown(p: &pb::Presence) -> Shown {
    let mut devices: Vec<String> = p.devices.iter().map(|d| d.device_id.clone()).collect();
    devices.sort();
    Shown {
        availability: p.availability,
        status: p.status.clone(),
        state: p.state.clone().into_iter().collect(),
        devices,
        last_seen_ms: p.last_seen_ms,
        version: p.version,
    }
}

/// The watcher's view, rebuilt from snapshots, events and resume batches.
#[derive(Default)]
struct View {
    users: HashMap<String, Shown>,
}

impl View {
    /// Applies an event; panics if it is older than what is held (out of version order).
    fn apply_event(&mut self, e: &pb::PresenceEvent, strict: bool) {
        if e.kind == pb::EventKind::Directed as i32 {
            return;
        }
        let Some(p) = &e.presence else { return };
        let next = shown(p);
        if let Some(held) = self.users.get(&e.user_id) {
            if strict {
                assert!(
                    next.version > held.version,
                    "{}: event version {} after {} (out of order)",
                    e.user_id,
                    next.version,
                    held.version
                );
            } else if next.version < held.version {
                return;
            }
        }
        self.users.insert(e.user_id.clone(), next);
    }

    fn known(&self) -> Vec<(String, u64)> {
        self.users
            .iter()
            .map(|(u, s)| (u.clone(), s.version))
            .collect()
    }
}

async fn watched(client: &Client) -> Vec<String> {
    let mut out: Vec<String> = within(client.all_subscriptions())
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.user_id)
        .collect();
    out.sort();
    out
}

/// Asserts the view equals the broker's answer for every watched user; while `connected`,
/// first takes the events still on their way (bounded: up to 10 s).
async fn check(view: &mut View, watcher: &mut Client, connected: bool, context: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let users = watched(watcher).await;
        let refs: Vec<&str> = users.iter().map(String::as_str).collect();
        let truth: HashMap<String, Shown> = if refs.is_empty() {
            HashMap::new()
        } else {
            within(watcher.get_presence(&refs))
                .await
                .unwrap()
                .iter()
                .map(|p| (p.user_id.clone(), shown(p)))
                .collect()
        };
        // While connected, a user the watcher's other device subscribed to is not pushed to
        // this one until it changes (a Resume fetches it): compare the users the view holds.
        let truth: HashMap<String, Shown> = if connected {
            truth
                .into_iter()
                .filter(|(u, _)| view.users.contains_key(u))
                .collect()
        } else {
            truth
        };
        let mine: HashMap<String, Shown> = view
            .users
            .iter()
            .filter(|(u, _)| truth.contains_key(*u))
            .map(|(u, s)| (u.clone(), s.clone()))
            .collect();
        if mine == truth {
            return;
        }
        if !connected || tokio::time::Instant::now() > deadline {
            let diff: Vec<_> = truth
                .iter()
                .filter(|(u, s)| mine.get(*u) != Some(s))
                .map(|(u, s)| format!("{u}: broker {s:?} / view {:?}", mine.get(u)))
                .collect();
            panic!(
                "{context}: the view differs from GetPresence:\n{}",
                diff.join("\n")
            );
        }
        // Events still on their way: take them, in order.
        match tokio::time::timeout_at(deadline, watcher.next_event()).await {
            Ok(Some(frame)) => apply_frame(view, &frame),
            Ok(None) => panic!("{context}: the watcher's connection closed"),
            Err(_) => {}
        }
    }
}

fn apply_frame(view: &mut View, frame: &pb::ServerFrame) {
    match &frame.body {
        Some(S::PresenceEvent(e)) => view.apply_event(e, true),
        Some(S::PresenceBatch(b)) => b.events.iter().for_each(|e| view.apply_event(e, false)),
        _ => {}
    }
}

/// One random step of churn by the watched users (devices `a`/`b`) or the watcher's tablet.
/// Returns the user the tablet unsubscribed from, if it did.
async fn churn(
    rng: &mut Rng,
    broker: &Broker,
    devices: &mut HashMap<(usize, char), Client>,
    tablet: &Client,
) -> Option<String> {
    let u = rng.below(USERS);
    let d = if rng.below(2) == 0 { 'a' } else { 'b' };
    match rng.below(10) {
        0..=2 => {
            if let Some(c) = devices.remove(&(u, d)) {
                let _ = within(c.disconnect()).await;
            } else {
                let c = connect_device(broker, &user(u), &d.to_string()).await;
                devices.insert((u, d), c);
            }
        }
        3..=7 => {
            if let Some(c) = devices.get(&(u, d)) {
                let availability = [
                    pb::Availability::Online,
                    pb::Availability::Away,
                    pb::Availability::Dnd,
                    pb::Availability::Xa,
                ][rng.below(4)];
                within(c.set_presence(pb::SetPresence {
                    availability: availability as i32,
                    status: Some(format!("s{}", rng.below(1000))),
                    state: [("k".to_string(), format!("{}", rng.below(50)))].into(),
                    ..Default::default()
                }))
                .await
                .unwrap();
            }
        }
        8 => {
            within(tablet.subscribe(&[&user(u)])).await.unwrap();
        }
        _ => {
            within(tablet.unsubscribe(&[&user(u)])).await.unwrap();
            return Some(user(u));
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_view_always_equals_get_presence_across_reconnects_and_restarts() {
    let seed = presenced::now_ms();
    eprintln!("seed {seed}");
    let mut rng = Rng(seed);
    let tweak = |c: &mut presenced::Config| {
        c.session.grace_period_ms = 0;
        c.limits.publish_rate_per_sec = 100_000;
        c.limits.publish_burst = 100_000;
        c.limits.request_rate_per_sec = 100_000;
        c.limits.request_burst = 100_000;
    };
    let mut broker = start(tweak).await;
    let mut devices: HashMap<(usize, char), Client> = HashMap::new();
    let mut tablet = connect_device(&broker, "watcher", "tablet").await;
    let half: Vec<String> = (0..USERS / 2).map(user).collect();
    let refs: Vec<&str> = half.iter().map(String::as_str).collect();
    within(tablet.subscribe(&refs)).await.unwrap();

    let mut view = View::default();
    let mut totals = (0u32, 0u32);
    for round in 0..ROUNDS {
        // Connected phase: churn while the watcher receives events.
        let mut watcher = connect_device(&broker, "watcher", "phone").await;
        let (changed, result) = within(watcher.resume(&view.known())).await.unwrap();
        for e in &changed {
            view.apply_event(e, false);
        }
        for u in &result.unwatched_user_ids {
            view.users.remove(u);
        }
        totals.0 += result.changed;
        totals.1 += result.unchanged;
        check(
            &mut view,
            &mut watcher,
            false,
            &format!("round {round}: after resume"),
        )
        .await;
        for _ in 0..15 {
            // A user unsubscribed meanwhile sends this device nothing more, even after a new
            // subscription (whose reply went to the tablet): the app drops it from the view it
            // shows (the next Resume would report it), as this oracle does.
            if let Some(gone) = churn(&mut rng, &broker, &mut devices, &tablet).await {
                view.users.remove(&gone);
            }
            while let Some(frame) = watcher.try_next_event() {
                apply_frame(&mut view, &frame);
            }
        }
        check(
            &mut view,
            &mut watcher,
            true,
            &format!("round {round}: connected"),
        )
        .await;
        drop(watcher);

        // Disconnected phase: churn the watcher misses, sometimes across a restart.
        for _ in 0..15 {
            churn(&mut rng, &broker, &mut devices, &tablet).await;
        }
        if round % 6 == 5 {
            devices.clear();
            drop(tablet);
            let data = broker.stop_keeping_data().await;
            broker = start_in(data, tweak).await;
            tablet = connect_device(&broker, "watcher", "tablet").await;
        }
    }
    eprintln!(
        "resumes: {} users sent, {} unchanged (not sent)",
        totals.0, totals.1
    );
    assert!(totals.1 > 0, "some users were not sent again");
}

#[tokio::test]
async fn a_resume_sends_only_what_changed_and_names_what_is_no_longer_watched() {
    let broker = start(|_| {}).await;
    let mut watcher = connect(&broker, "w").await;
    within(watcher.subscribe(&["a", "b", "c"])).await.unwrap();
    let a = connect(&broker, "a").await;
    let (all, result) = within(watcher.resume(&[])).await.unwrap();
    assert_eq!((result.changed, result.unchanged), (3, 0));
    let mut versions: HashMap<String, u64> =
        all.iter().map(|e| (e.user_id.clone(), e.version)).collect();
    versions.insert("gone".into(), 5);
    drop(watcher);
    within(a.set_presence(pb::SetPresence {
        status: Some("new".into()),
        ..Default::default()
    }))
    .await
    .unwrap();
    let mut watcher = connect(&broker, "w").await;
    let known: Vec<(String, u64)> = versions.into_iter().collect();
    let (changed, result) = within(watcher.resume(&known)).await.unwrap();
    assert_eq!(changed.len(), 1, "{changed:?}");
    assert_eq!(changed[0].user_id, "a");
    assert_eq!(changed[0].presence.as_ref().unwrap().status, "new");
    assert_eq!((result.changed, result.unchanged), (1, 2));
    assert_eq!(result.unwatched_user_ids, ["gone"]);
    assert_eq!(result.state_lost, 0);
    // A version the broker never reached: state lost, sent in full, said so.
    let (changed, result) = within(watcher.resume(&[("b".into(), u64::MAX)]))
        .await
        .unwrap();
    assert_eq!(result.state_lost, 1);
    assert!(result.why.contains("lost state"), "{}", result.why);
    assert_eq!(changed.len(), 3, "b in full, a and c not listed: in full");
}

/// A watched list larger than one frame resumes in pages by user-id range: the client splits
/// it, each page is answered for its range alone, and the last page's reply says the view is
/// complete. Bad ranges are refused with a reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_too_large_for_one_frame_resumes_in_pages() {
    let broker = start(|c| {
        c.limits.request_rate_per_sec = 100_000;
        c.limits.request_burst = 100_000;
    })
    .await;
    let mut watcher = connect(&broker, "w").await;
    let max = watcher.conn_ack.limits.unwrap();
    let count = max.max_subscriptions as usize;
    // Long ids: the list is about three frames' worth.
    let users: Vec<String> = (0..count)
        .map(|i| format!("a-user-with-a-rather-long-identifier-{i:05}"))
        .collect();
    for chunk in users.chunks(max.max_ids_per_request as usize) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        within(watcher.subscribe(&refs)).await.unwrap();
    }
    let (all, first) = within(watcher.resume(&[])).await.unwrap();
    assert_eq!((first.changed as usize, all.len()), (count, count));
    assert!(first.complete);
    let known: Vec<(String, u64)> = all.iter().map(|e| (e.user_id.clone(), e.version)).collect();
    let bytes: usize = known.iter().map(|(u, _)| u.len() + 14).sum();
    assert!(
        bytes > 2 * max.max_frame_bytes as usize,
        "the list must need several frames"
    );
    drop(watcher);

    // Three users change while the watcher is away, one in each part of the list.
    let moved = [&users[5], &users[count / 2], &users[count - 1]];
    let mut online = Vec::new();
    for u in moved {
        online.push(connect(&broker, u).await);
    }
    let mut watcher = connect(&broker, "w").await;
    let (changed, result) = within(watcher.resume(&known)).await.unwrap();
    let mut ids: Vec<&str> = changed.iter().map(|e| e.user_id.as_str()).collect();
    ids.sort();
    assert_eq!(ids, moved.map(String::as_str));
    assert_eq!(
        (result.changed as usize, result.unchanged as usize),
        (3, count - 3)
    );
    assert!(result.complete && result.unwatched_user_ids.is_empty());

    // One middle page alone answers for its range only.
    let (lo, hi) = (count / 3, 2 * count / 3);
    let page = &known[lo + 1..=hi];
    let (changed, result) =
        within(watcher.resume_page(known[lo].0.clone(), known[hi].0.clone(), page))
            .await
            .unwrap();
    assert_eq!(
        changed.len(),
        1,
        "only the middle user changed in this range"
    );
    assert_eq!(changed[0].user_id, *moved[1]);
    assert_eq!(result.unchanged as usize, page.len() - 1);
    assert!(!result.complete);
    assert_eq!(
        (
            result.after_user_id.as_str(),
            result.through_user_id.as_str()
        ),
        (known[lo].0.as_str(), known[hi].0.as_str())
    );

    // A listed user outside the range, and an empty range, are refused.
    let outside = server_error(
        within(watcher.resume_page(known[lo].0.clone(), known[hi].0.clone(), &known[..1])).await,
    );
    assert_eq!(code(&outside), pb::ErrorCode::BadRequest);
    assert!(outside.reason.contains("outside"), "{}", outside.reason);
    let backwards = server_error(
        within(watcher.resume_page(known[hi].0.clone(), known[lo].0.clone(), &[])).await,
    );
    assert_eq!(code(&backwards), pb::ErrorCode::BadRequest);
    assert!(
        backwards.reason.contains("sort before"),
        "{}",
        backwards.reason
    );
    drop(online);
}

/// What one Resume answer sends stays within the reply budget: with many large presences the
/// broker answers a shorter range and says where it stopped; the client asks for the rest and
/// ends with every user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_larger_than_the_reply_budget_is_answered_in_parts() {
    let broker = start(|c| {
        c.limits.request_rate_per_sec = 100_000;
        c.limits.request_burst = 100_000;
        c.limits.accept_rate_per_address_per_sec = 100_000;
        c.limits.accept_burst_per_address = 100_000;
    })
    .await;
    let big: BTreeMap<String, String> = (0..32)
        .map(|i| (format!("key-{i:02}"), "v".repeat(256)))
        .collect();
    let count = 160; // about 10 KiB each: 1.6 MB in all, over the 1 MiB budget
    let mut users = Vec::new();
    let mut online = Vec::new();
    for i in 0..count {
        let id = format!("big{i:03}");
        let c = connect(&broker, &id).await;
        within(c.set_presence(pb::SetPresence {
            state: big.clone(),
            ..Default::default()
        }))
        .await
        .unwrap();
        online.push(c);
        users.push(id);
    }
    let mut watcher = connect(&broker, "w").await;
    for chunk in users.chunks(100) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        within(watcher.subscribe(&refs)).await.unwrap();
    }
    // One raw page: cut short, with the last user answered.
    let (part, result) = within(watcher.resume_page(String::new(), String::new(), &[]))
        .await
        .unwrap();
    assert!(!result.complete, "{result:?}");
    assert_eq!(part.len() as u32, result.changed);
    assert!(part.len() < count && !part.is_empty());
    assert_eq!(result.through_user_id, part.last().unwrap().user_id);
    // The client asks for the rest by itself.
    let (all, result) = within(watcher.resume(&[])).await.unwrap();
    assert!(result.complete);
    assert_eq!(all.len(), count);
    let mut ids: Vec<&str> = all.iter().map(|e| e.user_id.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), count, "each user once");
    assert!(all
        .iter()
        .all(|e| e.presence.as_ref().unwrap().state.len() == 32));
    drop(online);
}
