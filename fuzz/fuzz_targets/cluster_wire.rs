//! What other nodes send over NATS, hostile or garbled, against a real registry in cluster
//! mode: raw bytes into the envelope, state-transfer page, subscription-log and forwarded
//! admin-change decoders, and structure-aware deltas (upserts, removals with and without a close, channel joins, leaves
//! and member state, directed presence) from several nodes and incarnations, interleaved with
//! local sessions, dead-node expiry, reconciliation and fencing. After every step the
//! registry's invariants hold and nothing panics.
#![no_main]

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use presenced::cluster::forward::ForwardPresence;
use presenced::cluster::wire::{Envelope, LastSeenPage, LastSeenRequest, LogEntry, SyncPage};
use presenced::config::DeviceLimitPolicy;
use presenced::model::{Availability, CloseKind, OfflineReason, PresenceChange};
use presenced::outbound::Outbound;
use presenced::registry::{
    Attach, DeviceRecord, Origin, Registry, RegistryOptions, ReplicaChange, ReplicationSink,
    UserFields,
};
use presenced::store::{MemoryStore, SubscriptionStore};
use presenced::wire::ProtoEncoder;
use prost::Message;

#[derive(Debug)]
struct CountingSink(AtomicU64);

impl ReplicationSink for CountingSink {
    fn emit(&self, change: ReplicaChange) {
        // What this node would send must encode and decode back to itself.
        let origin = Origin { node: "me".into(), incarnation: 1 };
        let env = Envelope::delta(&origin, 1, &change);
        let back = Envelope::decode_bytes(&env.encode_to_vec()).expect("own delta decodes");
        assert_eq!(back.change().expect("own delta is valid"), Some(change));
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    fn last_seq(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Arbitrary)]
enum Step {
    Raw(Vec<u8>),
    RawPage(Vec<u8>),
    RawLog(Vec<u8>),
    RawLastSeen(Vec<u8>),
    /// An admin change forwarded by another node (`<prefix>.admin.<node>`), applied here.
    RawForward(Vec<u8>),
    /// A privacy-log message (`<prefix>.privacy.>`), raw.
    RawPrivacy(Vec<u8>),
    /// A well-formed privacy record from another node: a block (or its end), or settings.
    Privacy { user: u8, other: u8, block: Option<bool>, invisible: bool, version: u8 },
    Upsert { node: u8, inc: u8, user: u8, device: u8, epoch: u8, rev: u8, away: bool, status: u8, channels: Option<Vec<u8>> },
    Remove { node: u8, inc: u8, user: u8, device: u8, epoch: u8, reason: u8, close: bool },
    Join { node: u8, inc: u8, user: u8, device: u8, epoch: u8, channel: u8, value: u8 },
    Leave { node: u8, inc: u8, user: u8, device: u8, epoch: u8, channel: u8 },
    MemberState { node: u8, inc: u8, user: u8, device: u8, epoch: u8, channel: u8, value: u8 },
    Directed { node: u8, inc: u8, user: u8 },
    Down { node: u8, inc: u8 },
    Expire { secs: u8 },
    Reconcile { node: u8, inc: u8, keep: u8 },
    Fence,
    Unfence,
    LocalConnect { user: u8, device: u8 },
    LocalJoin { conn: u8, channel: u8 },
    LocalPublish { conn: u8, status: u8 },
    LocalDisconnect { conn: u8 },
}

fn origin(node: u8, inc: u8) -> Origin {
    Origin { node: format!("n{}", node % 3), incarnation: u64::from(inc % 3) + 1 }
}

fn ids(user: u8, device: u8) -> (String, String) {
    (format!("u{}", user % 4), format!("d{}", device % 3))
}

fn epoch(e: u8) -> u64 {
    // Around the registry's own clock (wall-clock microseconds), so local and remote epochs
    // interleave.
    presenced::now_ms() * 1000 + u64::from(e) * 1000 - 128_000
}

fn apply(registry: &Registry, o: &Origin, change: ReplicaChange, now: Instant) {
    let env = Envelope::delta(o, 1, &change);
    let back = Envelope::decode_bytes(&env.encode_to_vec()).expect("delta decodes");
    if let Ok(Some(change)) = back.change() {
        registry.apply_remote(o, change, now);
    }
}

fuzz_target!(|steps: Vec<Step>| {
    let registry = Registry::new(
        Arc::new(MemoryStore::new()),
        Arc::new(ProtoEncoder),
        RegistryOptions {
            max_state_pairs: 4,
            offline_broadcast: true,
            max_joined_channels: 2,
            max_watched_channels: 2,
            announce_threshold: 2,
            max_devices_per_user: 2,
            device_limit_policy: DeviceLimitPolicy::EvictOldest,
            privacy: Default::default(),
        },
    );
    registry.set_replication(Arc::new(CountingSink(AtomicU64::new(0))), Duration::from_secs(1));
    let log_store = MemoryStore::new();
    let mut conns: Vec<(String, String, Outbound)> = Vec::new();
    let mut clock = Instant::now();
    for step in steps.into_iter().take(200) {
        let now = clock;
        match step {
            Step::Raw(bytes) => {
                if let Ok(env) = Envelope::decode_bytes(&bytes) {
                    if let Ok(Some(change)) = env.change() {
                        registry.apply_remote(&env.origin(), change, now);
                    }
                }
            }
            Step::RawPage(bytes) => {
                if let Ok(page) = SyncPage::decode(bytes.as_slice()) {
                    let o = Origin { node: page.node.clone(), incarnation: page.incarnation };
                    for r in page.records {
                        if let Ok(r) = r.into_record() {
                            registry.apply_remote(&o, ReplicaChange::Upsert(r), now);
                        }
                    }
                }
            }
            Step::RawForward(bytes) => {
                if let Ok((user, change)) = ForwardPresence::decode(bytes.as_slice())
                    .map_err(|_| ())
                    .and_then(|f| f.into_change().map_err(|_| ()))
                {
                    let _ = registry.set_presence_for(&user, &change);
                }
            }
            Step::RawLastSeen(bytes) => {
                // A peer's catch-up page is recorded; a request is answered from the store.
                if let Ok(page) = LastSeenPage::decode(bytes.as_slice()) {
                    for e in page.entries.iter().take(1000) {
                        let _ = log_store.record_last_seen(&e.user, e.at_ms, e.version);
                    }
                }
                if let Ok(r) = LastSeenRequest::decode(bytes.as_slice()) {
                    let after = r.has_cursor.then_some((r.after_at_ms, r.after_user.as_str()));
                    let (page, _) = log_store.last_seen_since(r.since_ms, after, 1000);
                    assert!(page.len() <= 1000);
                    assert!(page.iter().all(|(_, l)| l.at_ms >= r.since_ms));
                }
            }
            Step::RawPrivacy(bytes) => {
                if let Ok(record) = presenced::cluster::privlog::decode(&bytes) {
                    registry.apply_privacy_records(&[record], now);
                }
            }
            Step::Privacy { user, other, block, invisible, version } => {
                use presenced::privacy::{BlockEntry, Mark, PrivacyRecord, Settings};
                let (user, _) = ids(user, 0);
                let (other, _) = ids(other, 0);
                let mark = Mark { last_seen_ms: 1, version: epoch(version) };
                let record = match block {
                    Some(on) => PrivacyRecord::Block {
                        user,
                        target: other,
                        entry: on.then_some(BlockEntry { since_ms: 1, blocker_mark: mark, blocked_mark: mark }),
                    },
                    None => PrivacyRecord::Settings {
                        user,
                        settings: Settings {
                            invisible: invisible.then_some(mark),
                            version: epoch(version),
                            ..Default::default()
                        },
                    },
                };
                let bytes = serde_json::to_vec(&record).expect("records encode");
                match presenced::cluster::privlog::decode(&bytes) {
                    Ok(back) => {
                        assert_eq!(back, record);
                        registry.apply_privacy_records(&[back], now);
                    }
                    // Only a record naming one user twice is refused.
                    Err(_) => assert!(matches!(&record, PrivacyRecord::Block { user, target, .. } if user == target)),
                }
            }
            Step::RawLog(bytes) => {
                if let Ok(op) = LogEntry::decode(bytes.as_slice()).map_err(|_| ()).and_then(|e| e.into_op().map_err(|_| ())) {
                    let _ = log_store.apply_logged(&op, 1);
                }
            }
            Step::Upsert { node, inc, user, device, epoch: e, rev, away, status, channels } => {
                let (user_id, device_id) = ids(user, device);
                let record = DeviceRecord {
                    user_id,
                    device_id,
                    epoch: epoch(e),
                    rev: epoch(rev),
                    platform: "fuzz".into(),
                    availability: if away { Availability::Away } else { Availability::Online },
                    connected_since_ms: 1,
                    user: UserFields {
                        status: format!("s{status}"),
                        version: epoch(rev),
                        ..Default::default()
                    },
                    channels: channels.map(|cs| {
                        let names: std::collections::BTreeSet<String> =
                            cs.iter().take(3).map(|c| format!("c{}", c % 3)).collect();
                        names.into_iter().map(|c| (c, BTreeMap::new(), 1)).collect()
                    }),
                    // The holder's grace period: every other status (a lost connection there).
                    lingering: status % 2 == 1,
                    // Invisible on its own: every third status (flips as statuses change).
                    invisible: status % 3 == 0,
                };
                apply(&registry, &origin(node, inc), ReplicaChange::Upsert(record), now);
            }
            Step::Remove { node, inc, user, device, epoch: e, reason, close } => {
                let (user_id, device_id) = ids(user, device);
                let reason = [
                    OfflineReason::Disconnect,
                    OfflineReason::Timeout,
                    OfflineReason::ConnectionLost,
                    OfflineReason::Kicked,
                    OfflineReason::ServerShutdown,
                ][reason as usize % 5];
                let change = ReplicaChange::Remove {
                    user_id,
                    device_id,
                    epoch: epoch(e),
                    reason,
                    version: epoch(e),
                    last_seen_ms: 5,
                    close: close.then_some(CloseKind::DeviceLimit),
                };
                apply(&registry, &origin(node, inc), change, now);
            }
            Step::Join { node, inc, user, device, epoch: e, channel, value } => {
                let (user_id, device_id) = ids(user, device);
                let change = ReplicaChange::ChannelJoin {
                    user_id,
                    device_id,
                    epoch: epoch(e),
                    channel: format!("c{}", channel % 3),
                    state: BTreeMap::from([("k".to_string(), format!("v{value}"))]),
                    joined_at_ms: 1,
                };
                apply(&registry, &origin(node, inc), change, now);
            }
            Step::Leave { node, inc, user, device, epoch: e, channel } => {
                let (user_id, device_id) = ids(user, device);
                let change = ReplicaChange::ChannelLeave {
                    user_id,
                    device_id,
                    epoch: epoch(e),
                    channel: format!("c{}", channel % 3),
                };
                apply(&registry, &origin(node, inc), change, now);
            }
            Step::MemberState { node, inc, user, device, epoch: e, channel, value } => {
                let (user_id, device_id) = ids(user, device);
                let change = ReplicaChange::ChannelState {
                    user_id,
                    device_id,
                    epoch: epoch(e),
                    channel: format!("c{}", channel % 3),
                    state: BTreeMap::from([("k".to_string(), format!("v{value}"))]),
                };
                apply(&registry, &origin(node, inc), change, now);
            }
            Step::Directed { node, inc, user } => {
                let change = ReplicaChange::Directed {
                    sender: "x".into(),
                    frame: bytes::Bytes::from_static(b"\x02\x08\x01"),
                    recipients: vec![format!("u{}", user % 4)],
                };
                apply(&registry, &origin(node, inc), change, now);
            }
            Step::Down { node, inc } => {
                registry.origin_down(&origin(node, inc), now);
            }
            Step::Expire { secs } => {
                clock += Duration::from_millis(u64::from(secs) * 20);
                registry.expire_remote_due(clock);
            }
            Step::Reconcile { node, inc, keep } => {
                let listed: HashSet<(String, String)> =
                    (0..keep % 4).map(|u| ids(u, u)).collect();
                registry.reconcile_origin(&origin(node, inc), &listed, epoch(128), now);
            }
            Step::Fence => {
                registry.fence("fuzz", 1);
            }
            Step::Unfence => registry.unfence(),
            Step::LocalConnect { user, device } => {
                let (user_id, device_id) = ids(user, device);
                let outbound = Outbound::new(conns.len() as u64 + 1, 3, 6, 4);
                let attached = registry.attach(Attach {
                    user_id: user_id.clone(),
                    device_id: device_id.clone(),
                    platform: "fuzz".into(),
                    outbound: outbound.clone(),
                    initial: None,
                    user_data: BTreeMap::new(),
                    received_at: now,
                invisible: false,
                });
                if attached.is_ok() {
                    conns.push((user_id, device_id, outbound));
                }
            }
            Step::LocalJoin { conn, channel } => {
                if let Some((u, d, o)) = conns.get(conn as usize % conns.len().max(1)) {
                    let _ = registry.join_channel(u, d, o.id(), &format!("c{}", channel % 3), BTreeMap::new(), now);
                }
            }
            Step::LocalPublish { conn, status } => {
                if let Some((u, d, o)) = conns.get(conn as usize % conns.len().max(1)) {
                    let change = PresenceChange { status: Some(format!("l{status}")), ..Default::default() };
                    let _ = registry.publish(u, d, o.id(), &change, now);
                }
            }
            Step::LocalDisconnect { conn } => {
                if let Some((u, d, o)) = conns.get(conn as usize % conns.len().max(1)) {
                    registry.detach(u, d, o.id(), OfflineReason::Disconnect, now);
                }
            }
        }
        if let Err(e) = registry.check_invariants() {
            panic!("invariant broken: {e}");
        }
    }
});
