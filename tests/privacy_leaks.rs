//! The leak test (issue 15 point 7): an observer must learn nothing that tells "invisible",
//! "blocked" or "not approved" from "went offline and never changed". The same script runs in
//! five worlds; they differ only in how the target leaves the observer's view (a real
//! disconnect, or invisibility of the user or of its only device, a block, an approval-only
//! audience) and in what the hidden target keeps doing afterwards. Everything the observer can see is recorded and normalised
//! (times and versions differ between runs; their presence, order and direction do not): every
//! event frame it receives, GetPresence, a Subscribe reply, ListSubscriptions, a Resume from the
//! versions it held (twice), who-now and its counts, where-now, channel state, and the
//! delivered list of a directed presence. The four records must be equal.

mod common;

use common::*;
use presenced::client::Client;
use presenced::pb::{self, server_frame::Body};

#[derive(Debug, Clone, Copy, PartialEq)]
enum World {
    Offline,
    Invisible,
    DeviceInvisible,
    Blocked,
    NotApproved,
}

fn status(s: &str) -> pb::SetPresence {
    pb::SetPresence {
        status: Some(s.into()),
        ..Default::default()
    }
}

/// A presence with times and versions reduced to "set or not".
fn norm(p: &pb::Presence) -> String {
    format!(
        "{:?} status={:?} devices={} state={} user_data={} last_seen={}",
        availability(p),
        p.status,
        p.devices.len(),
        p.state.len(),
        p.user_data.len(),
        p.last_seen_ms > 0
    )
}

fn norm_event(frame: &pb::ServerFrame) -> Option<String> {
    match frame.body.as_ref()? {
        Body::PresenceEvent(e) => Some(format!(
            "presence {} {:?} {:?} device={:?} [{}]",
            e.user_id,
            kind(e),
            reason(e),
            e.device_id,
            e.presence.as_ref().map(norm).unwrap_or_default()
        )),
        Body::ChannelEvent(e) => Some(format!(
            "channel {} {:?} {}/{} occupancy={} state={:?}",
            e.channel,
            channel_kind(e),
            e.member.as_ref().map_or("", |m| m.user_id.as_str()),
            e.member.as_ref().map_or("", |m| m.device_id.as_str()),
            e.occupancy,
            e.member
                .as_ref()
                .map(|m| m.state.clone())
                .unwrap_or_default()
        )),
        other => Some(format!("other {other:?}")),
    }
}

async fn who(o: &Client, channel: &str) -> String {
    let page = within(o.who_now(channel, pb::WhoNowMode::IdsAndState, "", 100))
        .await
        .unwrap();
    let ids: Vec<String> = page
        .members
        .iter()
        .map(|m| format!("{}:{:?}", m.user_id, m.state))
        .collect();
    format!(
        "{channel}: {ids:?} occupancy={} members={}",
        page.occupancy, page.member_count
    )
}

async fn observe(world: World) -> Vec<String> {
    let broker = start(|c| c.channels.announce_threshold = 10_000).await;
    let mut seen = Vec::new();
    let mut o = connect(&broker, "o").await;
    let m = connect(&broker, "m").await;
    within(o.subscribe(&["t", "m"])).await.unwrap();
    within(o.join("room", &[])).await.unwrap();
    within(o.join("hall", &[])).await.unwrap();
    within(m.join("room", &[])).await.unwrap();
    let mut target = Some(connect(&broker, "t").await);
    let t = target.as_ref().unwrap();
    within(t.set_presence(status("hello"))).await.unwrap();
    within(t.join("room", &[("k", "v")])).await.unwrap();
    // Let everything so far reach o: the marker's change comes after it.
    within(m.set_presence(status("ready"))).await.unwrap();
    loop {
        let e = within(o.next_presence_event()).await.unwrap();
        if e.user_id == "m" && e.presence.as_ref().unwrap().status == "ready" {
            break;
        }
    }
    let held: Vec<(String, u64)> = within(o.get_presence(&["t", "m"]))
        .await
        .unwrap()
        .into_iter()
        .map(|p| (p.user_id.clone(), p.version))
        .collect();

    // The target leaves o's view.
    match world {
        World::Offline => {
            target.take().unwrap().disconnect().await.unwrap();
        }
        World::Invisible => {
            within(t.set_invisible(true)).await.unwrap();
        }
        World::DeviceInvisible => {
            let reply = within(t.set_device_invisible(true)).await.unwrap();
            assert!(reply.device_invisible && !reply.invisible, "{reply:?}");
        }
        World::Blocked => {
            within(t.block(&["o"])).await.unwrap();
        }
        World::NotApproved => {
            within(t.set_privacy(pb::Audience::Approved, pb::Audience::Unspecified))
                .await
                .unwrap();
        }
    }
    // A hidden target keeps living: changes, rooms, state (and, blocked, a directed presence).
    if let Some(t) = &target {
        within(t.set_presence(status("secret"))).await.unwrap();
        within(t.join("hall", &[("x", "y")])).await.unwrap();
        within(t.set_channel_state("room", &[("k", "w")], false))
            .await
            .unwrap();
        if world == World::Blocked {
            // A directed presence is a deliberate reveal: an invisible user or one whose
            // audience needs approval may send one (it reaches o); a block stops it.
            within(t.direct(&["o"], status("psst"))).await.unwrap();
        }
        within(t.leave("hall")).await.unwrap();
    }
    // Everything o received, in order, up to the marker's last change.
    within(m.set_presence(status("end"))).await.unwrap();
    within(m.set_channel_state("room", &[("end", "1")], false))
        .await
        .unwrap();
    loop {
        let frame = within(o.next_event()).await.expect("connection open");
        let done = matches!(&frame.body, Some(Body::ChannelEvent(e))
            if e.member.as_ref().is_some_and(|m| m.user_id == "m" && m.state.contains_key("end")));
        seen.extend(norm_event(&frame));
        if done {
            break;
        }
    }

    // Every query o has.
    let got = within(o.get_presence(&["t"])).await.unwrap();
    seen.push(format!("get {}", norm(&got[0])));
    let reply = within(o.subscribe(&["t"])).await.unwrap();
    seen.push(format!("subscribe {}", norm(&reply.presences[0])));
    let subs = within(o.list_subscriptions("", 0)).await.unwrap();
    let ids: Vec<&str> = subs
        .subscriptions
        .iter()
        .map(|s| s.user_id.as_str())
        .collect();
    seen.push(format!("subscriptions {ids:?}"));
    let (changed, result) = within(o.resume(&held)).await.unwrap();
    for e in &changed {
        seen.push(format!(
            "resume {} {:?} [{}]",
            e.user_id,
            kind(e),
            e.presence.as_ref().map(norm).unwrap_or_default()
        ));
    }
    seen.push(format!(
        "resume changed={} unchanged={}",
        result.changed, result.unchanged
    ));
    // A second resume from what the first gave: nothing moved since.
    let now: Vec<(String, u64)> = within(o.get_presence(&["t", "m"]))
        .await
        .unwrap()
        .into_iter()
        .map(|p| (p.user_id.clone(), p.version))
        .collect();
    let (_, again) = within(o.resume(&now)).await.unwrap();
    seen.push(format!(
        "resume again changed={} unchanged={}",
        again.changed, again.unchanged
    ));
    seen.push(who(&o, "room").await);
    seen.push(who(&o, "hall").await);
    seen.push(format!(
        "where {:?}",
        within(o.where_now("t")).await.unwrap()
    ));
    seen.push(format!(
        "state {:?}",
        within(o.get_channel_state("room", "t"))
            .await
            .unwrap()
            .members
    ));
    seen.push(format!(
        "directed {:?}",
        within(o.direct(&["t", "m"], status("hi"))).await.unwrap()
    ));
    drop(target);
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hidden_looks_exactly_like_offline_on_every_path() {
    let offline = observe(World::Offline).await;
    assert!(
        offline.iter().any(|l| l.contains("presence t Offline")),
        "the offline world saw t leave: {offline:#?}"
    );
    for world in [
        World::Invisible,
        World::DeviceInvisible,
        World::Blocked,
        World::NotApproved,
    ] {
        let hidden = observe(world).await;
        assert_eq!(
            hidden, offline,
            "{world:?}: the observer can tell (left: hidden, right: offline)"
        );
    }
}
