//! The `SubscriptionStore` interface: "subscriber watches target until expiry" in both
//! directions, plus each user's last-seen time; `Edges`, the in-memory image every store serves
//! reads from; `MemoryStore` (nothing on disk) and `SledStore` (durable, in `sled`). The store
//! knows nothing of sessions, sockets or protobuf, and never calls into the registry (lock order:
//! registry, then store, then outbound queues). Every method is synchronous; the one async
//! piece, group commit, lives in `commit`.

mod commit;
mod sled_store;

pub use commit::Committer;
pub use sled_store::{SledStore, FORMAT_VERSION};

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Mutex;

/// Why the store could not do what was asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The backing storage failed; the change may not have been applied.
    #[error("storage failure: {0}")]
    Backend(String),
    /// The data folder cannot be opened or read.
    #[error("cannot open data folder {path}: {detail}")]
    Open {
        /// The folder.
        path: String,
        /// Why.
        detail: String,
    },
    /// The data folder was written by a newer presenced.
    #[error("data folder {path} has format {found}; this build reads format {supported} (upgrade presenced or use another folder)")]
    NewerFormat {
        /// The folder.
        path: String,
        /// Format on disk.
        found: u64,
        /// Format this build writes.
        supported: u64,
    },
    /// The data folder holds records this build cannot decode.
    #[error("data folder {path} is corrupt: {detail} (restore a backup or move the folder away; nothing was deleted)")]
    Corrupt {
        /// The folder.
        path: String,
        /// What is wrong.
        detail: String,
    },
}

/// What a subscribe did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SubscribeOutcome {
    /// Targets dropped to stay under the cap, shortest remaining time first.
    pub evicted: Vec<String>,
    /// Live subscriptions the subscriber holds now.
    pub count: usize,
}

/// One operation of cluster mode's replicated subscription log (`crate::cluster::sublog`).
/// Every node applies the same operations in the same order, each with the time and cap its
/// origin decided, so every node's store ends up the same.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoggedOp {
    /// [`SubscriptionStore::subscribe`].
    Subscribe {
        /// The watcher.
        subscriber: String,
        /// Watched users.
        targets: Vec<String>,
        /// When the subscriptions expire, ms.
        expires_at_ms: u64,
        /// The origin's clock, ms.
        now_ms: u64,
        /// The subscriber's cap.
        cap: usize,
    },
    /// [`SubscriptionStore::unsubscribe`].
    Unsubscribe {
        /// The watcher.
        subscriber: String,
        /// Users no longer watched.
        targets: Vec<String>,
        /// The origin's clock, ms.
        now_ms: u64,
    },
    /// The subscriber's whole list (a rollup that replaced the log entries before it).
    Snapshot {
        /// The watcher.
        subscriber: String,
        /// (target, expires_at_ms), every one.
        entries: Vec<(String, u64)>,
    },
    /// [`SubscriptionStore::revoke_tokens`] (the admin API's revoke, cluster-wide).
    Revoke {
        /// The user whose tokens are revoked.
        user: String,
        /// Tokens issued before this (ms) are refused.
        before_ms: u64,
        /// Kept until (ms).
        until_ms: u64,
    },
}

impl LoggedOp {
    /// The subscriber the operation is about.
    pub fn subscriber(&self) -> &str {
        match self {
            LoggedOp::Subscribe { subscriber, .. }
            | LoggedOp::Unsubscribe { subscriber, .. }
            | LoggedOp::Snapshot { subscriber, .. } => subscriber,
            LoggedOp::Revoke { user, .. } => user,
        }
    }
}

/// What applying a [`LoggedOp`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoggedOutcome {
    /// A subscribe's outcome.
    Subscribed(SubscribeOutcome),
    /// An unsubscribe's: removed, and live subscriptions left.
    Unsubscribed(usize, usize),
    /// A snapshot replaced the list.
    Replaced,
    /// A revocation; the cut-off now in force.
    Revoked(u64),
}

/// Applies `op` through the plain trait methods (stores without a log position).
pub fn apply_op(store: &dyn SubscriptionStore, op: &LoggedOp) -> Result<LoggedOutcome, StoreError> {
    Ok(match op {
        LoggedOp::Revoke {
            user,
            before_ms,
            until_ms,
        } => LoggedOutcome::Revoked(store.revoke_tokens(user, *before_ms, *until_ms)?),
        LoggedOp::Subscribe {
            subscriber,
            targets,
            expires_at_ms,
            now_ms,
            cap,
        } => LoggedOutcome::Subscribed(store.subscribe(
            subscriber,
            targets,
            *expires_at_ms,
            *now_ms,
            *cap,
        )?),
        LoggedOp::Unsubscribe {
            subscriber,
            targets,
            now_ms,
        } => {
            let (removed, count) = store.unsubscribe(subscriber, targets, *now_ms)?;
            LoggedOutcome::Unsubscribed(removed, count)
        }
        LoggedOp::Snapshot {
            subscriber,
            entries,
        } => {
            let mut current = Vec::new();
            let mut after: Option<String> = None;
            loop {
                let page = store.list(subscriber, after.as_deref(), 1000, 0)?;
                current.extend(page.entries.iter().map(|(t, _)| t.clone()));
                after = page.entries.last().map(|(t, _)| t.clone());
                if !page.has_more {
                    break;
                }
            }
            let keep: std::collections::HashSet<&str> =
                entries.iter().map(|(t, _)| t.as_str()).collect();
            let gone: Vec<String> = current
                .into_iter()
                .filter(|t| !keep.contains(t.as_str()))
                .collect();
            store.unsubscribe(subscriber, &gone, 0)?;
            for (target, expires_at_ms) in entries {
                store.subscribe(
                    subscriber,
                    std::slice::from_ref(target),
                    *expires_at_ms,
                    0,
                    usize::MAX,
                )?;
            }
            LoggedOutcome::Replaced
        }
    })
}

/// One page of a subscriber's list, ordered by target id.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SubscriptionPage {
    /// (target, expires_at_ms).
    pub entries: Vec<(String, u64)>,
    /// True when targets after the last entry exist.
    pub has_more: bool,
    /// Live subscriptions in total.
    pub total: usize,
}

/// When a user was last online, and the version of the change that took them offline: an
/// offline user's presence carries that version, so a resuming client can tell whether it
/// already knows it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LastSeen {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The user's version when they went offline (0: not recorded).
    pub version: u64,
}

/// Persistent subscription records. Implementations are internally synchronised and cheap to
/// share behind an `Arc`.
pub trait SubscriptionStore: Send + Sync + fmt::Debug {
    /// Adds or renews `subscriber → target` for each target with the given expiry, then evicts
    /// the subscriptions with the shortest remaining time (never one of `targets`) until at most
    /// `cap` remain.
    fn subscribe(
        &self,
        subscriber: &str,
        targets: &[String],
        expires_at_ms: u64,
        now_ms: u64,
        cap: usize,
    ) -> Result<SubscribeOutcome, StoreError>;

    /// Removes `subscriber → target` for each target; unknown targets are ignored. Returns how
    /// many were removed and how many live subscriptions remain.
    fn unsubscribe(
        &self,
        subscriber: &str,
        targets: &[String],
        now_ms: u64,
    ) -> Result<(usize, usize), StoreError>;

    /// Up to `limit` live subscriptions of `subscriber` with target ids strictly after `after`.
    fn list(
        &self,
        subscriber: &str,
        after: Option<&str>,
        limit: usize,
        now_ms: u64,
    ) -> Result<SubscriptionPage, StoreError>;

    /// Calls `visit` with every live (unexpired) subscriber of `target`.
    fn for_each_watcher(&self, target: &str, now_ms: u64, visit: &mut dyn FnMut(&str));

    /// Subscription edges stored, expired ones not yet swept included.
    fn total(&self) -> usize;

    /// Removes every subscription that expired at or before `now_ms`; returns how many.
    fn sweep_expired(&self, now_ms: u64) -> Result<usize, StoreError>;

    /// Remembers when `user` was last online and the version of the change that took them
    /// offline (neither ever moves backwards).
    fn record_last_seen(&self, user: &str, at_ms: u64, version: u64) -> Result<(), StoreError>;

    /// When `user` was last online and the version they went offline at, if ever recorded
    /// (the version is 0 when recorded before versions were kept).
    fn last_seen(&self, user: &str) -> Option<LastSeen>;

    /// Cluster mode's catch-up after a restart: see [`Edges::last_seen_since`].
    fn last_seen_since(
        &self,
        since_ms: u64,
        after: Option<(u64, &str)>,
        limit: usize,
    ) -> (Vec<(String, LastSeen)>, bool);

    /// See [`Edges::latest_last_seen_ms`].
    fn latest_last_seen_ms(&self) -> u64;

    /// Refuses `user`'s tokens issued before `before_ms` until `until_ms` (the longest token
    /// lifetime from now); durable once `flush` returns. Returns the cut-off now in force.
    fn revoke_tokens(&self, user: &str, before_ms: u64, until_ms: u64) -> Result<u64, StoreError>;

    /// The cut-off in force for `user` at `now_ms`: tokens with an earlier `iat` are refused.
    fn tokens_revoked_before(&self, user: &str, now_ms: u64) -> Option<u64>;

    /// This boot's epoch for backend events: `now_us`, or one more than the last boot's when
    /// the clock stepped back, so epochs (and event ids) never repeat across restarts. A
    /// durable store remembers it.
    fn next_boot_epoch(&self, now_us: u64) -> Result<u64, StoreError> {
        Ok(now_us)
    }

    /// Makes everything applied so far durable. Blocking: call it off the async threads (the
    /// `Committer` does).
    fn flush(&self) -> Result<(), StoreError>;

    /// True when `flush` does real work, so replies should wait for it.
    fn is_durable(&self) -> bool {
        false
    }

    /// Cluster mode: applies operation `seq` of the replicated subscription log. A durable
    /// store writes the operation and `seq` in one atomic batch, so that after a crash it
    /// replays from exactly the first operation it lacks.
    fn apply_logged(&self, op: &LoggedOp, seq: u64) -> Result<LoggedOutcome, StoreError> {
        let _ = seq;
        apply_op(self.as_dyn(), op)
    }

    /// The last log operation applied (0: none; a memory store starts empty every time).
    fn applied_seq(&self) -> u64 {
        0
    }

    /// Writes privacy records (an entry of `None` deletes its key), all or none; durable once
    /// `flush` returns. A memory store keeps nothing: the registry's book is the only copy.
    fn write_privacy(&self, records: &[crate::privacy::PrivacyRecord]) -> Result<(), StoreError> {
        let _ = records;
        Ok(())
    }

    /// Every privacy record held, for the registry to load its book at start (a durable store
    /// checked them all when it opened, and refused to open over a malformed one).
    fn privacy_records(&self) -> Vec<crate::privacy::PrivacyRecord> {
        Vec::new()
    }

    /// `self` as a trait object (for the default methods).
    fn as_dyn(&self) -> &dyn SubscriptionStore;
}

/// A `SubscriptionStore` in memory: correct and fast, gone at exit.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Edges>,
}

/// Both directions of every subscription and the last-seen times. Shared with durable stores,
/// which keep this as their in-memory image.
#[derive(Debug, Default)]
pub struct Edges {
    /// subscriber → target → expires_at_ms, ordered for paging.
    forward: HashMap<String, BTreeMap<String, u64>>,
    /// target → subscriber → expires_at_ms, for fanout.
    reverse: HashMap<String, HashMap<String, u64>>,
    /// user → last seen, ms.
    last_seen: HashMap<String, LastSeen>,
    /// user → (tokens issued before this are refused, ms; kept until, ms).
    revoked: HashMap<String, (u64, u64)>,
    /// Edges held.
    edges: usize,
    /// No edge expires before this: the minute sweep skips the scan (which holds the lock that
    /// fanout needs) until then. A lower bound; 0 until the first scan.
    earliest_expiry_ms: u64,
}

impl Edges {
    /// Sets one edge; returns true when it is new.
    pub fn insert(&mut self, subscriber: &str, target: &str, expires_at_ms: u64) -> bool {
        let fresh = self
            .forward
            .entry(subscriber.to_string())
            .or_default()
            .insert(target.to_string(), expires_at_ms)
            .is_none();
        self.reverse
            .entry(target.to_string())
            .or_default()
            .insert(subscriber.to_string(), expires_at_ms);
        if fresh {
            self.edges += 1;
        }
        self.earliest_expiry_ms = self.earliest_expiry_ms.min(expires_at_ms);
        fresh
    }

    /// Removes one edge; returns true when it existed.
    pub fn remove(&mut self, subscriber: &str, target: &str) -> bool {
        let Some(targets) = self.forward.get_mut(subscriber) else {
            return false;
        };
        if targets.remove(target).is_none() {
            return false;
        }
        if targets.is_empty() {
            self.forward.remove(subscriber);
        }
        if let Some(watchers) = self.reverse.get_mut(target) {
            watchers.remove(subscriber);
            if watchers.is_empty() {
                self.reverse.remove(target);
            }
        }
        self.edges -= 1;
        true
    }

    /// Live subscriptions of `subscriber` at `now_ms`.
    pub fn live_count(&self, subscriber: &str, now_ms: u64) -> usize {
        self.forward
            .get(subscriber)
            .map_or(0, |t| t.values().filter(|&&e| e > now_ms).count())
    }

    /// The targets to evict so that, once `adding` is subscribed, `subscriber` holds at most
    /// `cap`: never one of `adding`; expired ones first, then the shortest remaining time. Pure:
    /// stores plan the eviction, write it, then apply it to this image.
    pub fn plan_eviction(&self, subscriber: &str, adding: &[String], cap: usize) -> Vec<String> {
        let Some(targets) = self.forward.get(subscriber) else {
            return Vec::new();
        };
        let fresh = adding.iter().filter(|t| !targets.contains_key(*t)).count();
        let after = targets.len() + fresh;
        if after <= cap {
            return Vec::new();
        }
        let mut candidates: Vec<(u64, &String)> = targets
            .iter()
            .filter(|(t, _)| !adding.contains(t))
            .map(|(t, &e)| (e, t))
            .collect();
        candidates.sort();
        candidates
            .into_iter()
            .take(after - cap)
            .map(|(_, t)| t.clone())
            .collect()
    }

    /// True when `subscriber → target` is held (expired or not).
    pub fn contains(&self, subscriber: &str, target: &str) -> bool {
        self.forward
            .get(subscriber)
            .is_some_and(|t| t.contains_key(target))
    }

    /// Every (subscriber, target, expires_at_ms), for tests and tools.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str, u64)> {
        self.forward.iter().flat_map(|(s, targets)| {
            targets
                .iter()
                .map(move |(t, &e)| (s.as_str(), t.as_str(), e))
        })
    }

    /// See [`SubscriptionStore::list`].
    pub fn page(
        &self,
        subscriber: &str,
        after: Option<&str>,
        limit: usize,
        now_ms: u64,
    ) -> SubscriptionPage {
        let Some(targets) = self.forward.get(subscriber) else {
            return SubscriptionPage::default();
        };
        let range = match after {
            Some(after) => targets
                .range::<str, _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded)),
            None => targets.range::<str, _>(..),
        };
        let mut live = range.filter(|(_, &e)| e > now_ms);
        let entries: Vec<(String, u64)> = live
            .by_ref()
            .take(limit)
            .map(|(t, &e)| (t.clone(), e))
            .collect();
        let has_more = live.next().is_some();
        SubscriptionPage {
            entries,
            has_more,
            total: self.live_count(subscriber, now_ms),
        }
    }

    /// See [`SubscriptionStore::for_each_watcher`].
    pub fn for_each_watcher(&self, target: &str, now_ms: u64, visit: &mut dyn FnMut(&str)) {
        if let Some(watchers) = self.reverse.get(target) {
            for (w, &e) in watchers {
                if e > now_ms {
                    visit(w);
                }
            }
        }
    }

    /// Every (subscriber, target) whose expiry is at or before `now_ms`. Scans every edge only
    /// when one may have expired, and remembers the earliest expiry of the rest.
    pub fn expired(&mut self, now_ms: u64) -> Vec<(String, String)> {
        if now_ms < self.earliest_expiry_ms {
            return Vec::new();
        }
        let mut expired = Vec::new();
        let mut earliest = u64::MAX;
        for (s, targets) in &self.forward {
            for (t, &e) in targets {
                if e <= now_ms {
                    expired.push((s.clone(), t.clone()));
                } else {
                    earliest = earliest.min(e);
                }
            }
        }
        self.earliest_expiry_ms = earliest;
        expired
    }

    /// Edges held.
    pub fn len(&self) -> usize {
        self.edges
    }

    /// True when no edge is held.
    pub fn is_empty(&self) -> bool {
        self.edges == 0
    }

    /// Sets a last-seen time and offline version (neither moving backwards); returns what is
    /// now held.
    pub fn set_last_seen(&mut self, user: &str, at_ms: u64, version: u64) -> LastSeen {
        let slot = self.last_seen.entry(user.to_string()).or_default();
        slot.at_ms = slot.at_ms.max(at_ms);
        slot.version = slot.version.max(version);
        *slot
    }

    /// A last-seen time and offline version.
    pub fn last_seen(&self, user: &str) -> Option<LastSeen> {
        self.last_seen.get(user).copied()
    }

    /// Up to `limit` last-seen records at or after `since_ms`, ordered by (time, user), after
    /// the cursor `after`; and whether more follow. A scan of every record: for a node that
    /// catches up once after a restart, never per request.
    pub fn last_seen_since(
        &self,
        since_ms: u64,
        after: Option<(u64, &str)>,
        limit: usize,
    ) -> (Vec<(String, LastSeen)>, bool) {
        let mut found: Vec<(u64, &String, LastSeen)> = self
            .last_seen
            .iter()
            .filter(|(u, l)| {
                l.at_ms >= since_ms
                    && after.is_none_or(|(at, user)| (l.at_ms, u.as_str()) > (at, user))
            })
            .map(|(u, l)| (l.at_ms, u, *l))
            .collect();
        found.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        let more = found.len() > limit;
        let page = found
            .into_iter()
            .take(limit)
            .map(|(_, u, l)| (u.clone(), l))
            .collect();
        (page, more)
    }

    /// The latest last-seen time recorded (0: none): about when this store last heard of an
    /// offline transition.
    pub fn latest_last_seen_ms(&self) -> u64 {
        self.last_seen.values().map(|l| l.at_ms).max().unwrap_or(0)
    }

    /// Records a revocation; a later one never lowers an earlier cut-off. Returns what is
    /// kept: (cut-off, kept until).
    pub fn set_revoked(&mut self, user: &str, before_ms: u64, until_ms: u64) -> (u64, u64) {
        let slot = self.revoked.entry(user.to_string()).or_insert((0, 0));
        *slot = (slot.0.max(before_ms), slot.1.max(until_ms));
        *slot
    }

    /// The revocation cut-off of `user`, unless it has lapsed at `now_ms`.
    pub fn revoked_before(&self, user: &str, now_ms: u64) -> Option<u64> {
        self.revoked
            .get(user)
            .filter(|(_, until)| *until > now_ms)
            .map(|(before, _)| *before)
    }

    /// Forgets lapsed revocations; returns the users forgotten.
    pub fn sweep_revoked(&mut self, now_ms: u64) -> Vec<String> {
        let lapsed: Vec<String> = self
            .revoked
            .iter()
            .filter(|(_, (_, until))| *until <= now_ms)
            .map(|(u, _)| u.clone())
            .collect();
        for u in &lapsed {
            self.revoked.remove(u);
        }
        lapsed
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    fn edges(&self) -> std::sync::MutexGuard<'_, Edges> {
        // A panic while holding this lock would be a bug in this file; the data stays consistent
        // per edge, so carrying on beats poisoning every later request.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn publish_gauge(edges: &Edges) {
    // Called under the store's lock so the gauge never goes back to an older count.
    metrics::gauge!(crate::metrics::SUBSCRIPTIONS).set(edges.len() as f64);
}

impl SubscriptionStore for MemoryStore {
    fn subscribe(
        &self,
        subscriber: &str,
        targets: &[String],
        expires_at_ms: u64,
        now_ms: u64,
        cap: usize,
    ) -> Result<SubscribeOutcome, StoreError> {
        let mut edges = self.edges();
        let evicted = edges.plan_eviction(subscriber, targets, cap);
        for target in targets {
            edges.insert(subscriber, target, expires_at_ms);
        }
        for target in &evicted {
            edges.remove(subscriber, target);
        }
        publish_gauge(&edges);
        Ok(SubscribeOutcome {
            evicted,
            count: edges.live_count(subscriber, now_ms),
        })
    }

    fn unsubscribe(
        &self,
        subscriber: &str,
        targets: &[String],
        now_ms: u64,
    ) -> Result<(usize, usize), StoreError> {
        let mut edges = self.edges();
        let removed = targets
            .iter()
            .filter(|t| edges.remove(subscriber, t))
            .count();
        publish_gauge(&edges);
        Ok((removed, edges.live_count(subscriber, now_ms)))
    }

    fn list(
        &self,
        subscriber: &str,
        after: Option<&str>,
        limit: usize,
        now_ms: u64,
    ) -> Result<SubscriptionPage, StoreError> {
        Ok(self.edges().page(subscriber, after, limit, now_ms))
    }

    fn for_each_watcher(&self, target: &str, now_ms: u64, visit: &mut dyn FnMut(&str)) {
        self.edges().for_each_watcher(target, now_ms, visit)
    }

    fn total(&self) -> usize {
        self.edges().len()
    }

    fn sweep_expired(&self, now_ms: u64) -> Result<usize, StoreError> {
        let mut edges = self.edges();
        edges.sweep_revoked(now_ms);
        let expired = edges.expired(now_ms);
        for (s, t) in &expired {
            edges.remove(s, t);
        }
        publish_gauge(&edges);
        Ok(expired.len())
    }

    fn record_last_seen(&self, user: &str, at_ms: u64, version: u64) -> Result<(), StoreError> {
        self.edges().set_last_seen(user, at_ms, version);
        Ok(())
    }

    fn last_seen(&self, user: &str) -> Option<LastSeen> {
        self.edges().last_seen(user)
    }

    fn last_seen_since(
        &self,
        since_ms: u64,
        after: Option<(u64, &str)>,
        limit: usize,
    ) -> (Vec<(String, LastSeen)>, bool) {
        self.edges().last_seen_since(since_ms, after, limit)
    }

    fn latest_last_seen_ms(&self) -> u64 {
        self.edges().latest_last_seen_ms()
    }

    fn revoke_tokens(&self, user: &str, before_ms: u64, until_ms: u64) -> Result<u64, StoreError> {
        Ok(self.edges().set_revoked(user, before_ms, until_ms).0)
    }

    fn tokens_revoked_before(&self, user: &str, now_ms: u64) -> Option<u64> {
        self.edges().revoked_before(user, now_ms)
    }

    fn as_dyn(&self) -> &dyn SubscriptionStore {
        self
    }

    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn watchers(store: &MemoryStore, target: &str, now: u64) -> Vec<String> {
        let mut out = Vec::new();
        store.for_each_watcher(target, now, &mut |w| out.push(w.to_string()));
        out.sort();
        out
    }

    #[test]
    fn both_directions_and_expiry() {
        let s = MemoryStore::new();
        s.subscribe("a", &ids(&["x", "y"]), 100, 0, 10).unwrap();
        s.subscribe("b", &ids(&["x"]), 50, 0, 10).unwrap();
        assert_eq!(watchers(&s, "x", 10), ids(&["a", "b"]));
        assert_eq!(watchers(&s, "x", 60), ids(&["a"]));
        assert_eq!(s.sweep_expired(60).unwrap(), 1);
        assert_eq!(s.total(), 2);
        assert_eq!(s.unsubscribe("a", &ids(&["x", "zz"]), 0).unwrap(), (1, 1));
        assert_eq!(watchers(&s, "x", 0), Vec::<String>::new());
    }

    #[test]
    fn the_sweep_skips_until_the_earliest_expiry_and_sees_later_inserts() {
        let mut edges = Edges::default();
        edges.insert("a", "x", 100);
        edges.insert("a", "y", 200);
        assert!(edges.expired(50).is_empty());
        assert_eq!(
            edges.earliest_expiry_ms, 100,
            "the scan remembers the earliest"
        );
        assert!(edges.expired(99).is_empty());
        edges.insert("b", "x", 60);
        assert_eq!(edges.expired(70), vec![("b".to_string(), "x".to_string())]);
        edges.remove("b", "x");
        assert_eq!(edges.expired(150), vec![("a".to_string(), "x".to_string())]);
        edges.remove("a", "x");
        assert_eq!(edges.earliest_expiry_ms, 200);
    }

    #[test]
    fn cap_evicts_shortest_remaining_but_never_the_new_ones() {
        let s = MemoryStore::new();
        s.subscribe("a", &ids(&["long"]), 1000, 0, 3).unwrap();
        s.subscribe("a", &ids(&["short"]), 10, 0, 3).unwrap();
        s.subscribe("a", &ids(&["mid"]), 500, 0, 3).unwrap();
        let out = s.subscribe("a", &ids(&["new1", "new2"]), 5, 0, 3).unwrap();
        assert_eq!(out.evicted, ids(&["short", "mid"]));
        assert_eq!(out.count, 3);
        let page = s.list("a", None, 10, 0).unwrap();
        let names: Vec<_> = page.entries.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(names, ["long", "new1", "new2"]);
    }

    #[test]
    fn paging_is_ordered_and_complete() {
        let s = MemoryStore::new();
        let targets: Vec<String> = (0..25).map(|i| format!("u{i:02}")).collect();
        s.subscribe("a", &targets, 100, 0, 100).unwrap();
        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = s.list("a", after.as_deref(), 10, 0).unwrap();
            assert_eq!(page.total, 25);
            seen.extend(page.entries.iter().map(|(t, _)| t.clone()));
            if !page.has_more {
                break;
            }
            after = page.entries.last().map(|(t, _)| t.clone());
        }
        assert_eq!(seen, targets);
    }

    #[test]
    fn last_seen_never_moves_back() {
        let s = MemoryStore::new();
        s.record_last_seen("a", 10, 7).unwrap();
        s.record_last_seen("a", 5, 3).unwrap();
        assert_eq!(
            s.last_seen("a"),
            Some(LastSeen {
                at_ms: 10,
                version: 7
            })
        );
        assert_eq!(s.last_seen("b"), None);
    }
}
