//! `SledStore`: subscriptions and last-seen times in sled, with the whole set loaded into an
//! in-memory `Edges` image at open so reads and fanout never touch the disk. Each change is one
//! atomic sled batch carrying both directions (`f` subscriber→target and `r` target→subscriber
//! keys), written before the image is updated and under the same lock, so disk and memory apply
//! changes in the same order. Durability is `flush`, driven by the group `Committer`. A folder
//! that cannot be opened, is from a newer format or holds undecodable records is an error at
//! open; nothing is ever deleted to make it fit.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{
    publish_gauge, Edges, LastSeen, LoggedOp, LoggedOutcome, StoreError, SubscribeOutcome,
    SubscriptionPage, SubscriptionStore,
};

/// The newest on-disk format this build reads and writes. A store is marked 2 once it holds
/// privacy records (an older build would ignore them and show hidden users, so it must refuse
/// the store), and stays 1 until then, so an older build can still open it.
pub const FORMAT_VERSION: u64 = 2;

/// The format of a store without privacy records.
const FORMAT_WITHOUT_PRIVACY: u64 = 1;

const META_TREE: &str = "meta";
const EDGES_TREE: &str = "edges";
const LAST_SEEN_TREE: &str = "last_seen";
/// user → 16 bytes: tokens issued before (ms, big-endian), kept until (ms, big-endian).
const REVOKED_TREE: &str = "revoked";
/// Privacy records (`crate::privacy::PrivacyRecord`), JSON, under `PrivacyRecord::key`.
const PRIVACY_TREE: &str = "privacy";
const FORMAT_KEY: &[u8] = b"format";
/// The last boot's event epoch (µs, big-endian).
const BOOT_EPOCH_KEY: &[u8] = b"boot_epoch";
const FORWARD: u8 = b'f';
const REVERSE: u8 = b'r';
/// Cluster mode: the last subscription-log operation applied, in the edges tree (outside the
/// edge prefixes) so that it is written in the same batch as the operation's edges.
const APPLIED_SEQ_KEY: &[u8] = b"m:applied_seq";
/// Separates the two ids in an edge key; user ids never contain control characters.
const SEPARATOR: u8 = 0;

/// A durable `SubscriptionStore`.
#[derive(Debug)]
pub struct SledStore {
    db: sled::Db,
    edges_tree: sled::Tree,
    last_seen_tree: sled::Tree,
    revoked_tree: sled::Tree,
    privacy_tree: sled::Tree,
    /// Holds the format marker.
    meta: sled::Tree,
    /// Whether the marker says [`FORMAT_VERSION`] (privacy records may be stored).
    privacy_format: std::sync::atomic::AtomicBool,
    /// The in-memory image; its lock also orders writes to `edges_tree`.
    image: Mutex<Edges>,
    /// Cluster mode: the last log operation applied (see `APPLIED_SEQ_KEY`).
    applied_seq: std::sync::atomic::AtomicU64,
    /// For error messages.
    path: String,
}

/// Marks the store [`FORMAT_VERSION`]: it may hold privacy records.
fn mark_privacy_format(meta: &sled::Tree) -> sled::Result<()> {
    meta.insert(FORMAT_KEY, &FORMAT_VERSION.to_be_bytes())
        .map(|_| ())
}

fn edge_key(direction: u8, first: &str, second: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(2 + first.len() + second.len());
    key.push(direction);
    key.extend_from_slice(first.as_bytes());
    key.push(SEPARATOR);
    key.extend_from_slice(second.as_bytes());
    key
}

fn u64_value(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

impl SledStore {
    /// Opens (or creates) the store in `path` and loads it into memory. Records how long that
    /// took in `presence_store_recovery_duration_seconds`.
    pub fn open(path: &Path) -> Result<SledStore, StoreError> {
        let started = Instant::now();
        let shown = path.display().to_string();
        let open_err = |detail: String| StoreError::Open {
            path: shown.clone(),
            detail,
        };
        std::fs::create_dir_all(path).map_err(|e| open_err(e.to_string()))?;
        let config = sled::Config::new()
            .path(path)
            .flush_every_ms(Some(500))
            .cache_capacity(64 * 1024 * 1024);
        let db = open_with_lock_retry(&config, &shown)?;
        let tree = |name: &str| db.open_tree(name).map_err(|e| classify(&shown, e));
        let meta = tree(META_TREE)?;
        let edges_tree = tree(EDGES_TREE)?;
        let last_seen_tree = tree(LAST_SEEN_TREE)?;
        let revoked_tree = tree(REVOKED_TREE)?;
        let privacy_tree = tree(PRIVACY_TREE)?;
        let format = match meta.get(FORMAT_KEY).map_err(|e| classify(&shown, e))? {
            None if edges_tree.is_empty() && last_seen_tree.is_empty() => {
                meta.insert(FORMAT_KEY, &FORMAT_WITHOUT_PRIVACY.to_be_bytes())
                    .map_err(|e| classify(&shown, e))?;
                db.flush().map_err(|e| classify(&shown, e))?;
                FORMAT_WITHOUT_PRIVACY
            }
            None => {
                return Err(StoreError::Corrupt {
                    path: shown,
                    detail: "records without a format marker".into(),
                })
            }
            Some(raw) => match u64_value(&raw) {
                Some(found @ (FORMAT_WITHOUT_PRIVACY | FORMAT_VERSION)) => found,
                Some(found) if found > FORMAT_VERSION => {
                    return Err(StoreError::NewerFormat {
                        path: shown,
                        found,
                        supported: FORMAT_VERSION,
                    })
                }
                _ => {
                    return Err(StoreError::Corrupt {
                        path: shown,
                        detail: "unreadable format marker".into(),
                    })
                }
            },
        };
        let mut image = load(&shown, &edges_tree, &last_seen_tree)?;
        let privacy = read_privacy(&shown, &privacy_tree)?.len();
        let privacy_format = if format == FORMAT_WITHOUT_PRIVACY && privacy > 0 {
            // Written by a build that stored privacy records without marking the store.
            mark_privacy_format(&meta).map_err(|e| classify(&shown, e))?;
            db.flush().map_err(|e| classify(&shown, e))?;
            true
        } else {
            format == FORMAT_VERSION
        };
        for item in revoked_tree.iter() {
            let (key, value) = item.map_err(|e| classify(&shown, e))?;
            let (Ok(user), Ok(v)) = (std::str::from_utf8(&key), <[u8; 16]>::try_from(&value[..]))
            else {
                return Err(StoreError::Corrupt {
                    path: shown.clone(),
                    detail: "a revocation record is malformed".into(),
                });
            };
            let before = u64::from_be_bytes(v[..8].try_into().unwrap_or_default());
            let until = u64::from_be_bytes(v[8..].try_into().unwrap_or_default());
            image.set_revoked(user, before, until);
        }
        publish_gauge(&image);
        metrics::gauge!(crate::metrics::STORE_RECOVERY_SECONDS)
            .set(started.elapsed().as_secs_f64());
        tracing::info!(
            path = %shown,
            edges = image.len(),
            privacy_records = privacy,
            seconds = started.elapsed().as_secs_f64(),
            "subscription store loaded"
        );
        let applied_seq = edges_tree
            .get(APPLIED_SEQ_KEY)
            .map_err(|e| classify(&shown, e))?
            .and_then(|v| u64_value(&v))
            .unwrap_or(0);
        Ok(SledStore {
            db,
            edges_tree,
            last_seen_tree,
            revoked_tree,
            privacy_tree,
            meta,
            privacy_format: std::sync::atomic::AtomicBool::new(privacy_format),
            image: Mutex::new(image),
            applied_seq: std::sync::atomic::AtomicU64::new(applied_seq),
            path: shown,
        })
    }

    fn image(&self) -> MutexGuard<'_, Edges> {
        // Each critical section writes to sled first and then updates the image without any
        // step that can panic in between; recovering the guard keeps serving.
        self.image.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn backend(&self, e: sled::Error) -> StoreError {
        classify(&self.path, e)
    }

    /// Writes `inserts` and `removes` of `subscriber`'s edges as one atomic batch.
    fn write_edges(
        &self,
        subscriber: &str,
        inserts: &[String],
        expires_at_ms: u64,
        removes: &[String],
    ) -> Result<(), StoreError> {
        let inserts: Vec<(&str, u64)> = inserts
            .iter()
            .map(|t| (t.as_str(), expires_at_ms))
            .collect();
        self.write_batch(subscriber, &inserts, removes, None)
    }

    /// Writes edges of `subscriber` (each insert with its own expiry) and, in cluster mode,
    /// the log position they reach, as one atomic batch.
    fn write_batch(
        &self,
        subscriber: &str,
        inserts: &[(&str, u64)],
        removes: &[String],
        applied_seq: Option<u64>,
    ) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for (target, expires_at_ms) in inserts {
            let value = expires_at_ms.to_be_bytes();
            batch.insert(edge_key(FORWARD, subscriber, target), &value);
            batch.insert(edge_key(REVERSE, target, subscriber), &value);
        }
        if let Some(seq) = applied_seq {
            batch.insert(APPLIED_SEQ_KEY, &seq.to_be_bytes());
        }
        for target in removes {
            batch.remove(edge_key(FORWARD, subscriber, target));
            batch.remove(edge_key(REVERSE, target, subscriber));
        }
        self.edges_tree
            .apply_batch(batch)
            .map_err(|e| self.backend(e))
    }
}

/// How long to wait for the folder's file lock: a store dropped in this process a moment ago
/// releases it from sled's background thread.
const LOCK_WAIT: Duration = Duration::from_secs(3);

/// Every record of the privacy tree, or why one cannot be read.
fn read_privacy(
    path: &str,
    tree: &sled::Tree,
) -> Result<Vec<crate::privacy::PrivacyRecord>, StoreError> {
    let mut records = Vec::new();
    for item in tree.iter() {
        let (_, value) = item.map_err(|e| classify(path, e))?;
        let record = serde_json::from_slice(&value).map_err(|e| StoreError::Corrupt {
            path: path.to_string(),
            detail: format!("a privacy record is malformed: {e}"),
        })?;
        records.push(record);
    }
    Ok(records)
}

fn is_lock_conflict(e: &sled::Error) -> bool {
    // sled 0.34 reports a held lock as a generic I/O error with this text.
    matches!(e, sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock
        || io.to_string().contains("could not acquire lock"))
}

fn open_with_lock_retry(config: &sled::Config, shown: &str) -> Result<sled::Db, StoreError> {
    let started = Instant::now();
    loop {
        // sled 0.34 can panic instead of returning an error on some damaged files; at open that
        // must become a clear error, not a crash loop.
        let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| config.open()))
            .map_err(|_| StoreError::Corrupt {
                path: shown.to_string(),
                detail: "the storage engine could not read its files".into(),
            })?;
        match opened {
            Ok(db) => return Ok(db),
            Err(e) if is_lock_conflict(&e) && started.elapsed() < LOCK_WAIT => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) if is_lock_conflict(&e) => {
                return Err(StoreError::Open {
                    path: shown.to_string(),
                    detail: "in use by another process (its lock is held)".into(),
                })
            }
            Err(e) => return Err(classify(shown, e)),
        }
    }
}

fn classify(path: &str, e: sled::Error) -> StoreError {
    match e {
        sled::Error::Io(io) => StoreError::Open {
            path: path.to_string(),
            detail: io.to_string(),
        },
        sled::Error::Corruption { .. } | sled::Error::Unsupported(_) => StoreError::Corrupt {
            path: path.to_string(),
            detail: e.to_string(),
        },
        other => StoreError::Backend(other.to_string()),
    }
}

/// Reads every forward edge and last-seen record into a fresh image.
fn load(
    path: &str,
    edges_tree: &sled::Tree,
    last_seen_tree: &sled::Tree,
) -> Result<Edges, StoreError> {
    let corrupt = |detail: String| StoreError::Corrupt {
        path: path.to_string(),
        detail,
    };
    let mut image = Edges::default();
    for item in edges_tree.scan_prefix([FORWARD]) {
        let (key, value) = item.map_err(|e| classify(path, e))?;
        let body = &key[1..];
        let split = body
            .iter()
            .position(|&b| b == SEPARATOR)
            .ok_or_else(|| corrupt("edge key without separator".into()))?;
        let (subscriber, target) = (
            std::str::from_utf8(&body[..split]),
            std::str::from_utf8(&body[split + 1..]),
        );
        let (Ok(subscriber), Ok(target)) = (subscriber, target) else {
            return Err(corrupt("edge key is not UTF-8".into()));
        };
        let expires =
            u64_value(&value).ok_or_else(|| corrupt("edge value is not 8 bytes".into()))?;
        image.insert(subscriber, target, expires);
    }
    for item in last_seen_tree.iter() {
        let (key, value) = item.map_err(|e| classify(path, e))?;
        let user =
            std::str::from_utf8(&key).map_err(|_| corrupt("last-seen key is not UTF-8".into()))?;
        // 8 bytes (time only, before versions were kept) or 16 (time, then version).
        let (at, version) = match value.len() {
            8 => (u64_value(&value), Some(0)),
            16 => (u64_value(&value[..8]), u64_value(&value[8..])),
            _ => (None, None),
        };
        let (Some(at), Some(version)) = (at, version) else {
            return Err(corrupt("last-seen value is not 8 or 16 bytes".into()));
        };
        image.set_last_seen(user, at, version);
    }
    Ok(image)
}

impl SubscriptionStore for SledStore {
    fn subscribe(
        &self,
        subscriber: &str,
        targets: &[String],
        expires_at_ms: u64,
        now_ms: u64,
        cap: usize,
    ) -> Result<SubscribeOutcome, StoreError> {
        let mut image = self.image();
        let evicted = image.plan_eviction(subscriber, targets, cap);
        self.write_edges(subscriber, targets, expires_at_ms, &evicted)?;
        for target in targets {
            image.insert(subscriber, target, expires_at_ms);
        }
        for target in &evicted {
            image.remove(subscriber, target);
        }
        publish_gauge(&image);
        Ok(SubscribeOutcome {
            evicted,
            count: image.live_count(subscriber, now_ms),
        })
    }

    fn unsubscribe(
        &self,
        subscriber: &str,
        targets: &[String],
        now_ms: u64,
    ) -> Result<(usize, usize), StoreError> {
        let mut image = self.image();
        let present: Vec<String> = targets
            .iter()
            .filter(|t| image.contains(subscriber, t))
            .cloned()
            .collect();
        if !present.is_empty() {
            self.write_edges(subscriber, &[], 0, &present)?;
            for target in &present {
                image.remove(subscriber, target);
            }
            publish_gauge(&image);
        }
        Ok((present.len(), image.live_count(subscriber, now_ms)))
    }

    fn list(
        &self,
        subscriber: &str,
        after: Option<&str>,
        limit: usize,
        now_ms: u64,
    ) -> Result<SubscriptionPage, StoreError> {
        Ok(self.image().page(subscriber, after, limit, now_ms))
    }

    fn for_each_watcher(&self, target: &str, now_ms: u64, visit: &mut dyn FnMut(&str)) {
        self.image().for_each_watcher(target, now_ms, visit)
    }

    fn total(&self) -> usize {
        self.image().len()
    }

    fn sweep_expired(&self, now_ms: u64) -> Result<usize, StoreError> {
        let mut image = self.image();
        for user in image.sweep_revoked(now_ms) {
            self.revoked_tree
                .remove(user.as_bytes())
                .map_err(|e| self.backend(e))?;
        }
        let expired = image.expired(now_ms);
        if expired.is_empty() {
            return Ok(0);
        }
        let mut batch = sled::Batch::default();
        for (s, t) in &expired {
            batch.remove(edge_key(FORWARD, s, t));
            batch.remove(edge_key(REVERSE, t, s));
        }
        self.edges_tree
            .apply_batch(batch)
            .map_err(|e| self.backend(e))?;
        for (s, t) in &expired {
            image.remove(s, t);
        }
        publish_gauge(&image);
        Ok(expired.len())
    }

    fn record_last_seen(&self, user: &str, at_ms: u64, version: u64) -> Result<(), StoreError> {
        let mut image = self.image();
        if image
            .last_seen(user)
            .is_some_and(|known| known.at_ms >= at_ms && known.version >= version)
        {
            return Ok(());
        }
        let held = image.set_last_seen(user, at_ms, version);
        let mut value = [0u8; 16];
        value[..8].copy_from_slice(&held.at_ms.to_be_bytes());
        value[8..].copy_from_slice(&held.version.to_be_bytes());
        self.last_seen_tree
            .insert(user.as_bytes(), &value)
            .map_err(|e| self.backend(e))?;
        Ok(())
    }

    fn last_seen(&self, user: &str) -> Option<LastSeen> {
        self.image().last_seen(user)
    }

    fn last_seen_since(
        &self,
        since_ms: u64,
        after: Option<(u64, &str)>,
        limit: usize,
    ) -> (Vec<(String, LastSeen)>, bool) {
        self.image().last_seen_since(since_ms, after, limit)
    }

    fn latest_last_seen_ms(&self) -> u64 {
        self.image().latest_last_seen_ms()
    }

    fn next_boot_epoch(&self, now_us: u64) -> Result<u64, StoreError> {
        let meta = self.db.open_tree(META_TREE).map_err(|e| self.backend(e))?;
        let last = meta
            .get(BOOT_EPOCH_KEY)
            .map_err(|e| self.backend(e))?
            .and_then(|v| <[u8; 8]>::try_from(&v[..]).ok())
            .map_or(0, u64::from_be_bytes);
        let epoch = now_us.max(last + 1);
        meta.insert(BOOT_EPOCH_KEY, &epoch.to_be_bytes())
            .map_err(|e| self.backend(e))?;
        self.db.flush().map_err(|e| self.backend(e))?;
        Ok(epoch)
    }

    fn revoke_tokens(&self, user: &str, before_ms: u64, until_ms: u64) -> Result<u64, StoreError> {
        let mut image = self.image();
        let (before, until) = image.set_revoked(user, before_ms, until_ms);
        let mut value = [0u8; 16];
        value[..8].copy_from_slice(&before.to_be_bytes());
        value[8..].copy_from_slice(&until.to_be_bytes());
        self.revoked_tree
            .insert(user.as_bytes(), &value)
            .map_err(|e| self.backend(e))?;
        Ok(before)
    }

    fn tokens_revoked_before(&self, user: &str, now_ms: u64) -> Option<u64> {
        self.image().revoked_before(user, now_ms)
    }

    fn flush(&self) -> Result<(), StoreError> {
        let started = Instant::now();
        let result = self.db.flush().map(|_| ()).map_err(|e| self.backend(e));
        metrics::histogram!(crate::metrics::STORE_COMMIT_SECONDS)
            .record(started.elapsed().as_secs_f64());
        result
    }

    fn is_durable(&self) -> bool {
        true
    }

    fn write_privacy(&self, records: &[crate::privacy::PrivacyRecord]) -> Result<(), StoreError> {
        use crate::privacy::PrivacyRecord;
        // The marker goes first: sled recovers writes in order, so no privacy record is ever
        // on disk under a marker an older build would accept.
        if !self
            .privacy_format
            .load(std::sync::atomic::Ordering::Acquire)
        {
            mark_privacy_format(&self.meta).map_err(|e| self.backend(e))?;
            self.privacy_format
                .store(true, std::sync::atomic::Ordering::Release);
        }
        let mut batch = sled::Batch::default();
        for record in records {
            let removed = matches!(
                record,
                PrivacyRecord::Block { entry: None, .. }
                    | PrivacyRecord::Approval { state: None, .. }
            );
            if removed {
                batch.remove(record.key().as_bytes());
            } else {
                let value = serde_json::to_vec(record).map_err(|e| StoreError::Corrupt {
                    path: self.path.clone(),
                    detail: format!("cannot encode a privacy record: {e}"),
                })?;
                batch.insert(record.key().as_bytes(), value);
            }
        }
        self.privacy_tree
            .apply_batch(batch)
            .map_err(|e| self.backend(e))
    }

    fn privacy_records(&self) -> Vec<crate::privacy::PrivacyRecord> {
        match read_privacy(&self.path, &self.privacy_tree) {
            Ok(records) => records,
            Err(e) => {
                // Checked at open; only a disk failure since then gets here.
                tracing::error!("cannot read privacy records: {e}");
                Vec::new()
            }
        }
    }

    fn apply_logged(&self, op: &LoggedOp, seq: u64) -> Result<LoggedOutcome, StoreError> {
        let mut image = self.image();
        let outcome = match op {
            LoggedOp::Subscribe {
                subscriber,
                targets,
                expires_at_ms,
                now_ms,
                cap,
            } => {
                let evicted = image.plan_eviction(subscriber, targets, *cap);
                let inserts: Vec<(&str, u64)> = targets
                    .iter()
                    .map(|t| (t.as_str(), *expires_at_ms))
                    .collect();
                self.write_batch(subscriber, &inserts, &evicted, Some(seq))?;
                for target in targets {
                    image.insert(subscriber, target, *expires_at_ms);
                }
                for target in &evicted {
                    image.remove(subscriber, target);
                }
                LoggedOutcome::Subscribed(SubscribeOutcome {
                    evicted,
                    count: image.live_count(subscriber, *now_ms),
                })
            }
            LoggedOp::Unsubscribe {
                subscriber,
                targets,
                now_ms,
            } => {
                let present: Vec<String> = targets
                    .iter()
                    .filter(|t| image.contains(subscriber, t))
                    .cloned()
                    .collect();
                self.write_batch(subscriber, &[], &present, Some(seq))?;
                for target in &present {
                    image.remove(subscriber, target);
                }
                LoggedOutcome::Unsubscribed(present.len(), image.live_count(subscriber, *now_ms))
            }
            LoggedOp::Snapshot {
                subscriber,
                entries,
            } => {
                let keep: std::collections::HashSet<&str> =
                    entries.iter().map(|(t, _)| t.as_str()).collect();
                let gone: Vec<String> = image
                    .page(subscriber, None, usize::MAX, 0)
                    .entries
                    .into_iter()
                    .map(|(t, _)| t)
                    .filter(|t| !keep.contains(t.as_str()))
                    .collect();
                let inserts: Vec<(&str, u64)> =
                    entries.iter().map(|(t, e)| (t.as_str(), *e)).collect();
                self.write_batch(subscriber, &inserts, &gone, Some(seq))?;
                for target in &gone {
                    image.remove(subscriber, target);
                }
                for (target, expires_at_ms) in entries {
                    image.insert(subscriber, target, *expires_at_ms);
                }
                LoggedOutcome::Replaced
            }
            LoggedOp::Revoke {
                user,
                before_ms,
                until_ms,
            } => {
                drop(image);
                // Idempotent (the later cut-off wins), so a replay after a crash between the
                // two writes only repeats it.
                let cut = self.revoke_tokens(user, *before_ms, *until_ms)?;
                image = self.image();
                self.write_batch(user, &[], &[], Some(seq))?;
                LoggedOutcome::Revoked(cut)
            }
        };
        self.applied_seq
            .store(seq, std::sync::atomic::Ordering::Relaxed);
        publish_gauge(&image);
        Ok(outcome)
    }

    fn applied_seq(&self) -> u64 {
        self.applied_seq.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn as_dyn(&self) -> &dyn SubscriptionStore {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn reopening_restores_both_directions_expiry_and_last_seen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(dir.path()).unwrap();
            store.subscribe("a", &ids(&["x", "y"]), 100, 0, 10).unwrap();
            store.subscribe("b", &ids(&["x"]), 200, 0, 10).unwrap();
            store.unsubscribe("a", &ids(&["y"]), 0).unwrap();
            store.record_last_seen("x", 42, 9).unwrap();
            store.flush().unwrap();
        }
        let store = SledStore::open(dir.path()).unwrap();
        let mut watchers = Vec::new();
        store.for_each_watcher("x", 0, &mut |w| watchers.push(w.to_string()));
        watchers.sort();
        assert_eq!(watchers, ["a", "b"]);
        let page = store.list("b", None, 10, 0).unwrap();
        assert_eq!(page.entries, vec![("x".to_string(), 200)]);
        assert_eq!(
            store.last_seen("x"),
            Some(LastSeen {
                at_ms: 42,
                version: 9
            })
        );
        assert_eq!(store.total(), 2);
    }

    #[test]
    fn boot_epochs_only_grow_even_when_the_clock_steps_back() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(dir.path()).unwrap();
            assert_eq!(store.next_boot_epoch(1_000).unwrap(), 1_000);
        }
        let store = SledStore::open(dir.path()).unwrap();
        // The clock went back: the next epoch is still above the last one.
        assert_eq!(store.next_boot_epoch(500).unwrap(), 1_001);
        assert_eq!(store.next_boot_epoch(5_000).unwrap(), 5_000);
    }

    #[test]
    fn eviction_and_sweep_reach_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(dir.path()).unwrap();
            store.subscribe("a", &ids(&["old"]), 10, 0, 2).unwrap();
            store.subscribe("a", &ids(&["keep"]), 1000, 0, 2).unwrap();
            let out = store.subscribe("a", &ids(&["new"]), 500, 0, 2).unwrap();
            assert_eq!(out.evicted, ids(&["old"]));
            store.subscribe("b", &ids(&["gone"]), 50, 0, 10).unwrap();
            assert_eq!(store.sweep_expired(60).unwrap(), 1);
            store.flush().unwrap();
        }
        let store = SledStore::open(dir.path()).unwrap();
        let all: Vec<(String, String)> = store
            .image()
            .iter()
            .map(|(s, t, _)| (s.to_string(), t.to_string()))
            .collect();
        let mut all = all;
        all.sort();
        assert_eq!(
            all,
            [
                ("a".to_string(), "keep".to_string()),
                ("a".into(), "new".into())
            ]
        );
    }

    fn format_marker(dir: &Path) -> Option<u64> {
        let db = sled::open(dir).unwrap();
        let raw = db.open_tree(META_TREE).unwrap().get(FORMAT_KEY).unwrap()?;
        u64_value(&raw)
    }

    #[test]
    fn privacy_records_mark_the_store_so_an_older_build_refuses_it() {
        let dir = tempfile::tempdir().unwrap();
        let record = crate::privacy::PrivacyRecord::Settings {
            user: "a".into(),
            settings: crate::privacy::Settings::default(),
        };
        {
            let store = SledStore::open(dir.path()).unwrap();
            store.subscribe("w", &["a".to_string()], 0, 10, 0).unwrap();
            store.flush().unwrap();
        }
        // Subscriptions alone: the format every older build reads.
        assert_eq!(format_marker(dir.path()), Some(FORMAT_WITHOUT_PRIVACY));
        {
            let store = SledStore::open(dir.path()).unwrap();
            store.write_privacy(std::slice::from_ref(&record)).unwrap();
            store.flush().unwrap();
        }
        // Format 1 builds refuse a newer marker (`a_newer_format_is_refused_and_left_alone`).
        assert_eq!(format_marker(dir.path()), Some(FORMAT_VERSION));
        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(store.privacy_records(), vec![record.clone()]);
        drop(store);
        // A store an earlier build filled with privacy records under marker 1 is marked at open.
        {
            let db = sled::open(dir.path()).unwrap();
            db.open_tree(META_TREE)
                .unwrap()
                .insert(FORMAT_KEY, &FORMAT_WITHOUT_PRIVACY.to_be_bytes())
                .unwrap();
            db.flush().unwrap();
        }
        drop(SledStore::open(dir.path()).unwrap());
        assert_eq!(format_marker(dir.path()), Some(FORMAT_VERSION));
    }

    #[test]
    fn a_newer_format_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            db.open_tree(META_TREE)
                .unwrap()
                .insert(FORMAT_KEY, &99u64.to_be_bytes())
                .unwrap();
            db.flush().unwrap();
        }
        let err = SledStore::open(dir.path()).unwrap_err();
        assert!(
            matches!(err, StoreError::NewerFormat { found: 99, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("format 99"));
        let err = SledStore::open(dir.path()).unwrap_err();
        assert!(
            matches!(err, StoreError::NewerFormat { .. }),
            "still there: {err}"
        );
    }

    #[test]
    fn undecodable_records_are_a_corruption_error() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(dir.path()).unwrap();
            store
                .edges_tree
                .insert(b"fno-separator", &[1u8; 8])
                .unwrap();
            store.flush().unwrap();
        }
        let err = SledStore::open(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn a_folder_held_by_a_live_store_is_reported_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let _held = SledStore::open(dir.path()).unwrap();
        let err = SledStore::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("in use"), "{err}");
    }

    #[test]
    fn an_unusable_path_is_an_open_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"not a folder").unwrap();
        let err = SledStore::open(&file).unwrap_err();
        assert!(matches!(err, StoreError::Open { .. }), "{err}");
    }
}
