//! Structure-aware sequences of session operations (connect, take over, publish, subscribe,
//! join, watch, set channel state, disconnect, lose the connection, time out, kick, drain)
//! driven against the real registry, with its invariants checked after every step: exactly one
//! live session per (user, device), no ghost members or watchers, channel counts that match;
//! and privacy: an invisible user, or either side of a block, is shown offline to the other,
//! and a device invisible on its own never shows to anyone else (presence, who-now).
#![no_main]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use arbitrary::Arbitrary;
use futures_util::FutureExt;
use libfuzzer_sys::fuzz_target;
use presenced::model::{Availability, OfflineReason, PresenceChange};
use presenced::outbound::Outbound;
use presenced::privacy::{Answer, Audience, PrivacyOp, Viewer};
use presenced::config::DeviceLimitPolicy;
use presenced::registry::{Attach, Registry, RegistryOptions};
use presenced::store::MemoryStore;
use presenced::wire::ProtoEncoder;

#[derive(Debug, Arbitrary)]
enum Op {
    Connect { user: u8, device: u8, away: bool, hide: bool },
    DeviceInvisible { conn: u8, on: bool },
    Publish { conn: u8, status: u8, key: u8, value: u8 },
    Subscribe { conn: u8, target: u8 },
    Unsubscribe { conn: u8, target: u8 },
    Join { conn: u8, channel: u8, key: u8 },
    Leave { conn: u8, channel: u8 },
    Watch { conn: u8, channel: u8 },
    Unwatch { conn: u8, channel: u8 },
    SetChannelState { conn: u8, channel: u8, key: u8, value: u8 },
    Directed { conn: u8, target: u8 },
    Disconnect { conn: u8 },
    Lose { conn: u8 },
    Expire { conn: u8 },
    Kick { conn: u8 },
    FlushIntervals,
    Drain { conn: u8 },
    Invisible { user: u8, on: bool },
    Block { user: u8, target: u8 },
    Unblock { user: u8, target: u8 },
    Audience { user: u8, audience: u8 },
    Approve { user: u8, other: u8, revoke: bool },
}

struct Conn {
    user: String,
    device: String,
    outbound: Outbound,
    lingering: bool,
    removed: bool,
}

fn kv(key: u8, value: u8) -> BTreeMap<String, String> {
    let value = if value % 4 == 0 { String::new() } else { format!("v{value}") };
    BTreeMap::from([(format!("k{}", key % 6), value)])
}

fuzz_target!(|ops: Vec<Op>| {
    let registry = Registry::new(
        Arc::new(MemoryStore::new()),
        Arc::new(ProtoEncoder),
        RegistryOptions {
            max_state_pairs: 4,
            offline_broadcast: true,
            max_joined_channels: 2,
            max_watched_channels: 2,
            announce_threshold: 2,
            // Three device ids per user: a cap of two makes attaches evict the oldest.
            max_devices_per_user: 2,
            device_limit_policy: DeviceLimitPolicy::EvictOldest,
            privacy: Default::default(),
        },
    );
    let store = registry.store().clone();
    let mut conns: Vec<Conn> = Vec::new();
    // (user, device) → index of the connection attached last.
    let mut latest: HashMap<(String, String), usize> = HashMap::new();
    // The privacy the ops set: invisible users, (blocker, blocked) pairs.
    let mut invisible: HashSet<String> = HashSet::new();
    let mut blocked: HashSet<(String, String)> = HashSet::new();
    // Presence audiences, and (user, approved watcher) pairs.
    let mut audiences: HashMap<String, Audience> = HashMap::new();
    let mut approved: HashSet<(String, String)> = HashSet::new();
    for op in ops.into_iter().take(300) {
        let now = Instant::now();
        let pick = |conn: u8, conns: &[Conn]| -> Option<usize> {
            (!conns.is_empty()).then(|| conn as usize % conns.len())
        };
        let channel = |c: u8| format!("c{}", c % 3);
        match op {
            Op::Connect { user, device, away, hide } => {
                let (user, device) = (format!("u{}", user % 4), format!("d{}", device % 3));
                let id = conns.len() as u64 + 1;
                let outbound = Outbound::new(id, 3, 6, 4);
                let initial = away.then(|| PresenceChange {
                    availability: Some(Availability::Away),
                    ..Default::default()
                });
                registry
                    .attach(Attach {
                        user_id: user.clone(),
                        device_id: device.clone(),
                        platform: "fuzz".into(),
                        outbound: outbound.clone(),
                        initial,
                        user_data: BTreeMap::new(),
                        received_at: now,
                        invisible: hide,
                    })
                    .expect("attach with valid initial presence");
                // The device cap evicted the user's oldest device (live or lingering), if any:
                // that device is gone from the registry.
                for c in conns.iter_mut().filter(|c| c.user == user && !c.removed) {
                    if registry.owner_of(&c.user, &c.device).is_none() {
                        c.removed = true;
                    }
                }
                latest.insert((user.clone(), device.clone()), conns.len());
                conns.push(Conn { user, device, outbound, lingering: false, removed: false });
            }
            Op::Publish { conn, status, key, value } => {
                if let Some(i) = pick(conn, &conns) {
                    let c = &conns[i];
                    let change = PresenceChange {
                        status: Some(format!("s{status}")),
                        state: kv(key, value),
                        ..Default::default()
                    };
                    let _ = registry.publish(&c.user, &c.device, c.outbound.id(), &change, now);
                }
            }
            Op::Subscribe { conn, target } | Op::Unsubscribe { conn, target } if conns.is_empty() => {
                let _ = (conn, target);
            }
            Op::Subscribe { conn, target } => {
                let c = &conns[conn as usize % conns.len()];
                let target = format!("u{}", target % 4);
                if target != c.user {
                    store.subscribe(&c.user, &[target], u64::MAX, 0, 3).expect("memory store");
                }
            }
            Op::Unsubscribe { conn, target } => {
                let c = &conns[conn as usize % conns.len()];
                store.unsubscribe(&c.user, &[format!("u{}", target % 4)], 0).expect("memory store");
            }
            Op::Join { conn, channel: ch, key } => {
                if let Some(i) = pick(conn, &conns) {
                    let c = &conns[i];
                    let _ = registry.join_channel(&c.user, &c.device, c.outbound.id(), &channel(ch), kv(key, 1), now);
                }
            }
            Op::Leave { conn, channel: ch } => {
                if let Some(i) = pick(conn, &conns) {
                    let c = &conns[i];
                    let _ = registry.leave_channel(&c.user, &c.device, c.outbound.id(), &channel(ch), now);
                }
            }
            Op::Watch { conn, channel: ch } => {
                if let Some(i) = pick(conn, &conns) {
                    let c = &conns[i];
                    let _ = registry.watch_channel(&c.user, &c.device, c.outbound.id(), &channel(ch));
                }
            }
            Op::Unwatch { conn, channel: ch } => {
                if let Some(i) = pick(conn, &conns) {
                    let c = &conns[i];
                    let _ = registry.unwatch_channel(&c.user, &c.device, c.outbound.id(), &channel(ch));
                }
            }
            Op::SetChannelState { conn, channel: ch, key, value } => {
                if let Some(i) = pick(conn, &conns) {
                    let c = &conns[i];
                    let _ = registry.set_channel_state(&c.user, &c.device, c.outbound.id(), &channel(ch), &kv(key, value), false, now);
                }
            }
            Op::Directed { conn, target } => {
                if let Some(i) = pick(conn, &conns) {
                    let c = &conns[i];
                    let _ = registry.direct(&c.user, &c.device, &[format!("u{}", target % 4)], &PresenceChange::default(), now);
                }
            }
            Op::Disconnect { conn } | Op::Kick { conn } if conns.is_empty() => {
                let _ = conn;
            }
            Op::Disconnect { conn } => {
                let i = conn as usize % conns.len();
                let owner = registry.owner_of(&conns[i].user, &conns[i].device) == Some(conns[i].outbound.id());
                let c = &mut conns[i];
                registry.detach(&c.user, &c.device, c.outbound.id(), OfflineReason::Disconnect, now);
                c.removed |= owner;
            }
            Op::Kick { conn } => {
                let i = conn as usize % conns.len();
                let owner = registry.owner_of(&conns[i].user, &conns[i].device) == Some(conns[i].outbound.id());
                let c = &mut conns[i];
                registry.detach(&c.user, &c.device, c.outbound.id(), OfflineReason::Kicked, now);
                c.removed |= owner;
            }
            Op::Lose { conn } => {
                if let Some(i) = pick(conn, &conns) {
                    let c = &mut conns[i];
                    if registry.linger(&c.user, &c.device, c.outbound.id(), OfflineReason::ConnectionLost) {
                        c.lingering = true;
                    }
                }
            }
            Op::Expire { conn } => {
                if let Some(i) = pick(conn, &conns) {
                    let owner = registry.owner_of(&conns[i].user, &conns[i].device) == Some(conns[i].outbound.id());
                    let c = &mut conns[i];
                    registry.expire_lingering(&c.user, &c.device, c.outbound.id(), now);
                    c.removed |= owner && c.lingering;
                }
            }
            Op::FlushIntervals => registry.flush_channel_intervals(now),
            Op::Drain { conn } => {
                if let Some(i) = pick(conn, &conns) {
                    while let Some(Some(batch)) = conns[i].outbound.next_batch(1 << 16).now_or_never() {
                        if batch.closing {
                            break;
                        }
                    }
                }
            }
            Op::DeviceInvisible { conn, on } => {
                if let Some(i) = pick(conn, &conns) {
                    let c = &conns[i];
                    let _ = registry.set_device_invisible(&c.user, &c.device, c.outbound.id(), on, now);
                }
            }
            Op::Invisible { user, on } => {
                let user = format!("u{}", user % 4);
                let op = PrivacyOp::SetInvisible { user: user.clone(), on };
                registry.privacy_op(&op, now).expect("memory store");
                if on {
                    invisible.insert(user);
                } else {
                    invisible.remove(&user);
                }
            }
            Op::Audience { user, audience } => {
                let user = format!("u{}", user % 4);
                let audience = [Audience::Everyone, Audience::Approved, Audience::Nobody]
                    [audience as usize % 3];
                let op = PrivacyOp::SetAudience {
                    user: user.clone(),
                    presence: Some(audience),
                    last_seen: None,
                };
                registry.privacy_op(&op, now).expect("memory store");
                audiences.insert(user, audience);
            }
            Op::Approve { user, other, .. } if user % 4 == other % 4 => {}
            Op::Approve { user, other, revoke } => {
                let (user, other) = (format!("u{}", user % 4), format!("u{}", other % 4));
                let answer = if revoke { Answer::Revoke } else { Answer::Approve };
                let op = PrivacyOp::Answer { user: user.clone(), others: vec![other.clone()], answer };
                registry.privacy_op(&op, now).expect("within the cap");
                if revoke {
                    approved.remove(&(user, other));
                } else {
                    approved.insert((user, other));
                }
            }
            Op::Block { user, target } | Op::Unblock { user, target } if user % 4 == target % 4 => {}
            Op::Block { user, target } => {
                let (user, target) = (format!("u{}", user % 4), format!("u{}", target % 4));
                let op = PrivacyOp::Block { user: user.clone(), targets: vec![target.clone()] };
                registry.privacy_op(&op, now).expect("within the cap");
                blocked.insert((user, target));
            }
            Op::Unblock { user, target } => {
                let (user, target) = (format!("u{}", user % 4), format!("u{}", target % 4));
                let op = PrivacyOp::Unblock { user: user.clone(), targets: vec![target.clone()] };
                registry.privacy_op(&op, now).expect("memory store");
                blocked.remove(&(user, target));
            }
        }
        for a in 0..4 {
            for b in 0..4 {
                let (a, b) = (format!("u{a}"), format!("u{b}"));
                if a == b {
                    continue;
                }
                let audience_hides = match audiences.get(&b).copied().unwrap_or_default() {
                    Audience::Everyone => false,
                    Audience::Approved => !approved.contains(&(b.clone(), a.clone())),
                    Audience::Nobody => true,
                };
                let hidden = invisible.contains(&b)
                    || audience_hides
                    || blocked.contains(&(a.clone(), b.clone()))
                    || blocked.contains(&(b.clone(), a.clone()));
                // Channels show the same: no trace of a hidden user, counts that add up.
                if hidden {
                    assert!(registry.where_now_for(Viewer::User(&a), &b).is_empty());
                }
                for c in 0..3 {
                    let c = format!("c{c}");
                    let page = registry.who_now_for(Viewer::User(&a), &c, None, 1000, false);
                    let users: HashSet<&str> =
                        page.members.iter().map(|m| m.user_id.as_str()).collect();
                    assert!(!hidden || !users.contains(b.as_str()), "{b} hidden from {a} in {c}");
                    assert!(
                        !page.members.iter().any(|m| m.user_id == b
                            && registry.is_device_invisible(&b, &m.device_id)),
                        "{b}'s invisible device shown to {a} in {c}"
                    );
                    assert_eq!(page.occupancy as usize, users.len(), "{a}'s occupancy of {c}");
                    assert_eq!(page.member_count as usize, page.members.len());
                }
                let shown = registry.snapshots_for(Viewer::User(&a), std::slice::from_ref(&b));
                let truth = registry.snapshot(&b);
                if hidden {
                    assert!(
                        shown[0].availability == Availability::Offline
                            && shown[0].devices.is_empty()
                            && shown[0].status.is_empty(),
                        "{b} is hidden from {a} but shown {:?}",
                        shown[0]
                    );
                } else {
                    // Visible devices only, the availability from them.
                    let visible: Vec<_> = truth
                        .devices
                        .iter()
                        .filter(|d| !registry.is_device_invisible(&b, &d.device_id))
                        .collect();
                    let availability = visible
                        .iter()
                        .map(|d| d.availability)
                        .max_by_key(|a| a.rank())
                        .unwrap_or(Availability::Offline);
                    assert_eq!(shown[0].availability, availability, "{a} sees {b}");
                    assert_eq!(shown[0].devices.len(), visible.len(), "{a} sees {b}'s devices");
                    if visible.len() == truth.devices.len()
                        && truth.availability != Availability::Offline
                    {
                        // Nothing hidden: the truth, at the version the viewer was told
                        // (it stays put while only a hidden device changed things).
                        let mut same = shown[0].clone();
                        same.version = truth.version;
                        assert_eq!(same, truth, "{a} sees {b}");
                    }
                }
            }
        }
        if let Err(broken) = registry.check_invariants() {
            panic!("invariant broken: {broken}");
        }
        for ((user, device), &i) in &latest {
            let expected = (!conns[i].removed).then(|| conns[i].outbound.id());
            assert_eq!(
                registry.owner_of(user, device),
                expected,
                "{user}/{device} must be owned by its latest live connection"
            );
        }
    }
});
