//! Invisibility per device, the cases an outside review found (issue 15, review of the
//! per-device change): a takeover that changes a device's invisibility, the device cap
//! evicting beside an invisible device, a version moving underneath, the switch to interval
//! mode, and a directed presence sent beside an invisible device. Each compares what a watcher
//! is told with what a real disconnect or connect would tell.

mod common;

use common::*;
use presenced::client::Client;
use presenced::pb;

fn status(s: &str) -> pb::SetPresence {
    pb::SetPresence {
        status: Some(s.into()),
        ..Default::default()
    }
}

/// What `watcher` receives (other than the marker's own events) up to `marker`'s status
/// `text`, each frame in short.
async fn until_marker(watcher: &mut Client, marker: &Client, text: &str) -> Vec<String> {
    within(marker.set_presence(status(text))).await.unwrap();
    let mut seen = Vec::new();
    loop {
        let frame = within(watcher.next_event()).await.expect("connection open");
        match frame.body {
            Some(pb::server_frame::Body::PresenceEvent(e)) => {
                let p = e.presence.clone().unwrap_or_default();
                if e.user_id == "marker" {
                    if p.status == text {
                        return seen;
                    }
                    continue;
                }
                let devices: Vec<String> = p.devices.iter().map(|d| d.device_id.clone()).collect();
                seen.push(format!(
                    "{} {:?} device={} {devices:?}",
                    e.user_id,
                    kind(&e),
                    e.device_id
                ));
            }
            Some(pb::server_frame::Body::ChannelEvent(e)) => {
                let m = e.member.clone().unwrap_or_default();
                seen.push(format!(
                    "{} {:?} {}/{}",
                    e.channel,
                    channel_kind(&e),
                    m.user_id,
                    m.device_id
                ));
            }
            other => seen.push(format!("{other:?}")),
        }
    }
}

async fn invisible_device(broker: &Broker, user: &str, device: &str) -> Client {
    let mut options = options(broker, user, device);
    options.invisible_device = true;
    within(Client::connect(options)).await.unwrap()
}

async fn watcher(broker: &Broker) -> (Client, Client) {
    let marker = connect(broker, "marker").await;
    let w = connect(broker, "w").await;
    within(w.subscribe(&["alice", "marker"])).await.unwrap();
    within(w.join("room", &[])).await.unwrap();
    (w, marker)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_that_changes_invisibility_reads_as_leaving_and_arriving() {
    let broker = start(|c| c.channels.announce_threshold = 10_000).await;
    let (mut w, marker) = watcher(&broker).await;
    let phone = connect_device(&broker, "alice", "phone").await;
    within(phone.join("room", &[])).await.unwrap();
    until_marker(&mut w, &marker, "m1").await;
    // The same device connects again, invisible: it leaves the room and goes offline.
    let hidden = invisible_device(&broker, "alice", "phone").await;
    assert_eq!(
        until_marker(&mut w, &marker, "m2").await,
        vec![
            "room Leave alice/phone",
            "room Offline alice/phone",
            "alice Offline device=phone []",
        ]
    );
    drop(phone);
    // And again, visible: it comes back, into its room.
    let _visible = connect_device(&broker, "alice", "phone").await;
    assert_eq!(
        until_marker(&mut w, &marker, "m3").await,
        vec![
            "alice Online device=phone [\"phone\"]",
            "room Join alice/phone",
            "room Online alice/phone",
        ]
    );
    drop(hidden);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invisible_device_evicting_one_of_two_shows_the_one_left() {
    let broker = start(|c| c.limits.max_devices_per_user = 2).await;
    let (mut w, marker) = watcher(&broker).await;
    let _a = connect_device(&broker, "alice", "a").await;
    let _b = connect_device(&broker, "alice", "b").await;
    until_marker(&mut w, &marker, "m1").await;
    let _c = invisible_device(&broker, "alice", "c").await;
    assert_eq!(
        until_marker(&mut w, &marker, "m2").await,
        vec!["alice Update device=a [\"b\"]"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invisible_device_coming_and_going_moves_no_version() {
    let broker = start(|_| {}).await;
    let (mut w, marker) = watcher(&broker).await;
    let _phone = connect_device(&broker, "alice", "phone").await;
    until_marker(&mut w, &marker, "m1").await;
    let before = within(w.get_presence(&["alice"])).await.unwrap().remove(0);
    let tablet = invisible_device(&broker, "alice", "tablet").await;
    within(tablet.set_presence(pb::SetPresence {
        availability: pb::Availability::Away as i32,
        ..Default::default()
    }))
    .await
    .unwrap();
    tablet.disconnect().await.unwrap();
    assert_eq!(
        until_marker(&mut w, &marker, "m2").await,
        Vec::<String>::new()
    );
    let after = within(w.get_presence(&["alice"])).await.unwrap().remove(0);
    assert_eq!(after, before, "the watcher's view moved without an event");
    let (changed, result) = within(w.resume(&[("alice".to_string(), before.version)]))
        .await
        .unwrap();
    assert!(
        !changed.iter().any(|e| e.user_id == "alice"),
        "a resume from the version held says alice changed: {changed:?} {result:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hidden_members_do_not_switch_a_room_to_interval_mode() {
    let broker = start(|c| {
        c.channels.announce_threshold = 3;
        c.channels.interval_ms = 50;
    })
    .await;
    let (mut w, marker) = watcher(&broker).await;
    let x = connect(&broker, "x").await;
    within(x.join("room", &[])).await.unwrap();
    let tablet = invisible_device(&broker, "alice", "tablet").await;
    within(tablet.join("room", &[])).await.unwrap();
    until_marker(&mut w, &marker, "m1").await;
    // Three members a stranger sees: not above the threshold, so y's join comes at once.
    let y = connect(&broker, "y").await;
    within(y.join("room", &[])).await.unwrap();
    assert_eq!(
        until_marker(&mut w, &marker, "m2").await,
        vec!["room Join y/phone", "room Online y/phone"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directed_presence_beside_an_invisible_device_shows_the_visible_ones() {
    let broker = start(|_| {}).await;
    let mut o = connect(&broker, "o").await;
    let mut away = options(&broker, "alice", "phone");
    away.initial_presence = Some(pb::SetPresence {
        availability: pb::Availability::Away as i32,
        ..Default::default()
    });
    let phone = within(Client::connect(away)).await.unwrap();
    let _tablet = invisible_device(&broker, "alice", "tablet").await;
    let shown = within(o.get_presence(&["alice"])).await.unwrap().remove(0);
    within(phone.direct(&["o"], status("hi"))).await.unwrap();
    let e = within(o.next_presence_event()).await.unwrap();
    let p = e.presence.unwrap();
    assert_eq!(availability(&p), pb::Availability::Away);
    assert_eq!(p.devices.len(), 1);
    assert_eq!(p.version, shown.version, "the version o holds");
}

fn availability_change(a: pb::Availability) -> pb::SetPresence {
    pb::SetPresence {
        availability: a as i32,
        ..Default::default()
    }
}

/// What a watcher is told when a visible phone sets availability OFFLINE, then disconnects,
/// then (`tablet`) an invisible tablet leaves too; and GetPresence at the end.
async fn offline_availability(tablet: bool) -> (Vec<Vec<String>>, bool) {
    let broker = start(|_| {}).await;
    let (mut w, marker) = watcher(&broker).await;
    let phone = connect_device(&broker, "alice", "phone").await;
    let hidden = if tablet {
        Some(invisible_device(&broker, "alice", "tablet").await)
    } else {
        None
    };
    let mut told = vec![until_marker(&mut w, &marker, "m1").await];
    within(phone.set_presence(availability_change(pb::Availability::Offline)))
        .await
        .unwrap();
    told.push(until_marker(&mut w, &marker, "m2").await);
    phone.disconnect().await.unwrap();
    told.push(until_marker(&mut w, &marker, "m3").await);
    if let Some(t) = hidden {
        t.disconnect().await.unwrap();
    }
    told.push(until_marker(&mut w, &marker, "m4").await);
    let last = within(w.get_presence(&["alice"])).await.unwrap().remove(0);
    (told, last.last_seen_ms > 0 && last.devices.is_empty())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_visible_device_set_offline_beside_an_invisible_one_reads_as_without_it() {
    let control = offline_availability(false).await;
    let hidden = offline_availability(true).await;
    assert_eq!(
        hidden, control,
        "left: beside an invisible tablet, right: alone"
    );
    assert!(control.1, "offline with a last-seen time at the end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invisible_device_s_changes_stay_hidden_after_user_level_invisibility_ends() {
    let broker = start(|_| {}).await;
    let (mut w, marker) = watcher(&broker).await;
    let phone = connect_device(&broker, "alice", "phone").await;
    let tablet = invisible_device(&broker, "alice", "tablet").await;
    until_marker(&mut w, &marker, "m1").await;
    within(phone.set_invisible(true)).await.unwrap();
    within(phone.set_invisible(false)).await.unwrap();
    until_marker(&mut w, &marker, "m2").await;
    let shown = within(w.get_presence(&["alice"])).await.unwrap().remove(0);
    within(tablet.set_presence(availability_change(pb::Availability::Away)))
        .await
        .unwrap();
    assert_eq!(
        until_marker(&mut w, &marker, "m3").await,
        Vec::<String>::new()
    );
    let after = within(w.get_presence(&["alice"])).await.unwrap().remove(0);
    assert_eq!(after, shown);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invisible_device_s_profile_data_and_past_do_not_show() {
    let broker = start(|_| {}).await;
    let (mut w, marker) = watcher(&broker).await;
    let mut phone = options(&broker, "alice", "phone");
    phone.user_data = [("app".to_string(), "phone-app".to_string())].into();
    let _phone = within(Client::connect(phone)).await.unwrap();
    until_marker(&mut w, &marker, "m1").await;
    let mut tablet = options(&broker, "alice", "tablet");
    tablet.invisible_device = true;
    tablet.user_data = [("app".to_string(), "tablet-app".to_string())].into();
    let hidden = within(Client::connect(tablet)).await.unwrap();
    within(hidden.set_presence(availability_change(pb::Availability::Dnd)))
        .await
        .unwrap();
    assert_eq!(
        until_marker(&mut w, &marker, "m2").await,
        Vec::<String>::new()
    );
    let shown = within(w.get_presence(&["alice"])).await.unwrap().remove(0);
    assert_eq!(shown.user_data["app"], "phone-app");
    // The tablet's next connection, visible, shows as a fresh one: its own availability.
    let mut again = options(&broker, "alice", "tablet");
    again.initial_presence = Some(availability_change(pb::Availability::Away));
    let _visible = within(Client::connect(again)).await.unwrap();
    let told = until_marker(&mut w, &marker, "m3").await;
    assert_eq!(
        told,
        vec!["alice Update device=tablet [\"phone\", \"tablet\"]"]
    );
    let shown = within(w.get_presence(&["alice"])).await.unwrap().remove(0);
    let tablet = shown
        .devices
        .iter()
        .find(|d| d.device_id == "tablet")
        .unwrap();
    assert_eq!(
        tablet.availability,
        pb::Availability::Away as i32,
        "{shown:?}"
    );
    drop(hidden);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directed_presence_after_an_invisible_device_left_keeps_the_version_held() {
    let broker = start(|_| {}).await;
    let mut o = connect(&broker, "o").await;
    let phone = connect_device(&broker, "alice", "phone").await;
    let tablet = invisible_device(&broker, "alice", "tablet").await;
    tablet.disconnect().await.unwrap();
    let held = within(o.get_presence(&["alice"])).await.unwrap().remove(0);
    within(phone.direct(&["o"], status("hi"))).await.unwrap();
    let e = within(o.next_presence_event()).await.unwrap();
    assert_eq!(e.presence.unwrap().version, held.version);
}
