//! The peer table, synchronous: which nodes are alive under which incarnation, the last delta
//! sequence number seen from each, whether a state transfer from it is due or running, and
//! which incarnations were declared dead (their late messages are ignored, so a stopped node
//! that wakes up cannot bring back sessions its peers already expired). Liveness is measured
//! on this node's monotonic clock, and only while this node's own NATS link is up.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::registry::Origin;

/// What to do with a message from a peer.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Apply it (false: from a dead or superseded incarnation, or our own).
    pub apply: bool,
    /// Start a state transfer from the sender (a gap, or a peer seen for the first time).
    pub sync: Option<&'static str>,
    /// An earlier incarnation of the sender that is now dead (the node restarted or
    /// rejoined): its sessions expire after the grace period.
    pub superseded: Option<Origin>,
}

#[derive(Debug)]
struct Peer {
    incarnation: u64,
    last_heard: Instant,
    last_seq: u64,
    /// The last privacy-log sequence its heartbeats said it applied.
    privacy_applied: u64,
    /// A transfer from it is running.
    syncing: bool,
}

/// Most dead incarnations remembered (oldest forgotten first).
const MAX_DEAD: usize = 4096;
/// How long a dead incarnation is remembered.
const DEAD_TTL: Duration = Duration::from_secs(3600);

/// Every peer this node has heard from.
#[derive(Debug)]
pub struct Peers {
    own: String,
    peers: HashMap<String, Peer>,
    dead: HashMap<Origin, Instant>,
    timeout: Duration,
}

impl Peers {
    /// An empty table for node `own`; a peer silent for `timeout` is dead.
    pub fn new(own: &str, timeout: Duration) -> Peers {
        Peers {
            own: own.to_string(),
            peers: HashMap::new(),
            dead: HashMap::new(),
            timeout,
        }
    }

    /// Live peers.
    pub fn up(&self) -> usize {
        self.peers.len()
    }

    /// The live peers' node ids.
    pub fn live_nodes(&self) -> Vec<String> {
        self.peers.keys().cloned().collect()
    }

    /// Dead incarnations remembered.
    pub fn dead(&self) -> usize {
        self.dead.len()
    }

    /// Whether `origin` is a live peer incarnation.
    pub fn is_live(&self, origin: &Origin) -> bool {
        self.peers
            .get(&origin.node)
            .is_some_and(|p| p.incarnation == origin.incarnation)
    }

    fn admit(&mut self, origin: &Origin, now: Instant) -> Option<Verdict> {
        if origin.node == self.own || self.dead.contains_key(origin) {
            return None;
        }
        let mut verdict = Verdict {
            apply: true,
            ..Verdict::default()
        };
        match self.peers.get_mut(&origin.node) {
            Some(p) if p.incarnation == origin.incarnation => p.last_heard = now,
            Some(p) if p.incarnation > origin.incarnation => return None,
            Some(p) => {
                // A newer incarnation: the old one is dead.
                verdict.superseded = Some(Origin {
                    node: origin.node.clone(),
                    incarnation: p.incarnation,
                });
                self.bury(verdict.superseded.clone().unwrap(), now);
                self.insert(origin, now);
                verdict.sync = Some("new_peer");
            }
            None => {
                self.insert(origin, now);
                verdict.sync = Some("new_peer");
            }
        }
        Some(verdict)
    }

    fn insert(&mut self, origin: &Origin, now: Instant) {
        self.peers.insert(
            origin.node.clone(),
            Peer {
                incarnation: origin.incarnation,
                last_heard: now,
                last_seq: 0,
                privacy_applied: 0,
                syncing: false,
            },
        );
    }

    fn bury(&mut self, origin: Origin, now: Instant) {
        self.dead.insert(origin, now);
        if self.dead.len() > MAX_DEAD {
            if let Some(oldest) = self
                .dead
                .iter()
                .min_by_key(|(_, t)| **t)
                .map(|(o, _)| o.clone())
            {
                self.dead.remove(&oldest);
            }
        }
    }

    /// A delta numbered `seq` from `origin`.
    pub fn on_delta(&mut self, origin: &Origin, seq: u64, now: Instant) -> Verdict {
        let Some(mut verdict) = self.admit(origin, now) else {
            return Verdict::default();
        };
        let peer = self.peers.get_mut(&origin.node).expect("admitted");
        if verdict.sync.is_none() && seq > peer.last_seq + 1 && !peer.syncing {
            verdict.sync = Some("sequence");
        }
        peer.last_seq = peer.last_seq.max(seq);
        if verdict.sync.is_some() {
            if peer.syncing {
                verdict.sync = None;
            } else {
                peer.syncing = true;
            }
        }
        verdict
    }

    /// A heartbeat from `origin` saying its last delta was `seq`; `digest_matches` compares
    /// its digest with this node's replica of its sessions (only meaningful when every delta
    /// up to `seq` was applied here).
    pub fn on_heartbeat(
        &mut self,
        origin: &Origin,
        seq: u64,
        digest_matches: impl FnOnce() -> bool,
        now: Instant,
    ) -> Verdict {
        let Some(mut verdict) = self.admit(origin, now) else {
            return Verdict::default();
        };
        verdict.apply = false;
        let peer = self.peers.get_mut(&origin.node).expect("admitted");
        if verdict.sync.is_none() && !peer.syncing {
            if seq > peer.last_seq {
                verdict.sync = Some("sequence");
            } else if seq == peer.last_seq && !digest_matches() {
                verdict.sync = Some("digest");
            }
        }
        if verdict.sync.is_some() {
            if peer.syncing {
                verdict.sync = None;
            } else {
                peer.syncing = true;
            }
        }
        verdict
    }

    /// `origin`'s heartbeat said it applied the privacy log up to `applied`.
    pub fn on_privacy_applied(&mut self, origin: &Origin, applied: u64) {
        if let Some(peer) = self.peers.get_mut(&origin.node) {
            if peer.incarnation == origin.incarnation {
                peer.privacy_applied = peer.privacy_applied.max(applied);
            }
        }
    }

    /// Whether every live peer said it applied the privacy log up to `seq` (true with none).
    pub fn privacy_applied_everywhere(&self, seq: u64) -> bool {
        self.peers.values().all(|p| p.privacy_applied >= seq)
    }

    /// A state transfer from `origin` ended; on success every delta up to `seq` is reflected.
    pub fn sync_done(&mut self, origin: &Origin, seq: Option<u64>) {
        if let Some(peer) = self.peers.get_mut(&origin.node) {
            if peer.incarnation == origin.incarnation {
                peer.syncing = false;
                if let Some(seq) = seq {
                    peer.last_seq = peer.last_seq.max(seq);
                }
            }
        }
    }

    /// Peers silent for longer than the timeout, removed and remembered as dead. Nothing is
    /// declared dead while this node's own link is down (`link_up` false): then nobody can
    /// be heard, and the silence says nothing about them.
    pub fn check(&mut self, now: Instant, link_up: bool) -> Vec<Origin> {
        if !link_up {
            return Vec::new();
        }
        let timeout = self.timeout;
        let silent: Vec<Origin> = self
            .peers
            .iter()
            .filter(|(_, p)| now.saturating_duration_since(p.last_heard) > timeout)
            .map(|(node, p)| Origin {
                node: node.clone(),
                incarnation: p.incarnation,
            })
            .collect();
        for origin in &silent {
            self.peers.remove(&origin.node);
            self.bury(origin.clone(), now);
        }
        self.dead
            .retain(|_, t| now.saturating_duration_since(*t) < DEAD_TTL);
        silent
    }

    /// The link came back, or this node's own loop was stalled: every peer gets a full
    /// timeout from now before it can be declared dead (nothing could be heard meanwhile, so
    /// the silence says nothing about them).
    pub fn link_restored(&mut self, now: Instant) {
        for p in self.peers.values_mut() {
            p.last_heard = now;
        }
    }

    /// Forgets every live peer (this node rejoins under a new incarnation and will sync
    /// from each again); dead incarnations stay remembered.
    pub fn reset(&mut self) {
        self.peers.clear();
    }

    /// Incarnations declared dead within `window`: heartbeats carry them, so a node that was
    /// declared dead without noticing (a pause shorter than its own fencing threshold, a
    /// one-way partition) learns it and rejoins under a new incarnation.
    pub fn recently_dead(&self, now: Instant, window: Duration) -> Vec<Origin> {
        self.dead
            .iter()
            .filter(|(_, t)| now.saturating_duration_since(**t) < window)
            .map(|(o, _)| o.clone())
            .collect()
    }

    /// Live peers, for a join that waits for their state.
    pub fn syncing(&self) -> usize {
        self.peers.values().filter(|p| p.syncing).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(node: &str, inc: u64) -> Origin {
        Origin {
            node: node.into(),
            incarnation: inc,
        }
    }

    #[test]
    fn first_contact_syncs_then_sequence_gaps_sync_once() {
        let t = Instant::now();
        let mut p = Peers::new("me", Duration::from_secs(3));
        let v = p.on_delta(&o("a", 1), 5, t);
        assert!(v.apply);
        assert_eq!(v.sync, Some("new_peer"));
        // While that transfer runs, a gap does not start another.
        assert_eq!(p.on_delta(&o("a", 1), 9, t).sync, None);
        p.sync_done(&o("a", 1), Some(9));
        assert_eq!(p.on_delta(&o("a", 1), 10, t).sync, None);
        assert_eq!(p.on_delta(&o("a", 1), 12, t).sync, Some("sequence"));
        p.sync_done(&o("a", 1), Some(12));
        // A heartbeat ahead of the last delta: the tail was lost.
        assert_eq!(
            p.on_heartbeat(&o("a", 1), 13, || true, t).sync,
            Some("sequence")
        );
        p.sync_done(&o("a", 1), Some(13));
        assert_eq!(p.on_heartbeat(&o("a", 1), 13, || true, t).sync, None);
        assert_eq!(
            p.on_heartbeat(&o("a", 1), 13, || false, t).sync,
            Some("digest")
        );
    }

    #[test]
    fn a_privacy_change_is_everywhere_once_every_live_peer_said_so() {
        let t = Instant::now();
        let mut p = Peers::new("me", Duration::from_secs(3));
        assert!(
            p.privacy_applied_everywhere(7),
            "no peer: nothing to wait for"
        );
        p.on_heartbeat(&o("a", 1), 0, || true, t);
        p.on_heartbeat(&o("b", 1), 0, || true, t);
        assert!(
            !p.privacy_applied_everywhere(7),
            "a new peer has said nothing yet"
        );
        p.on_privacy_applied(&o("a", 1), 9);
        p.on_privacy_applied(&o("b", 1), 6);
        assert!(!p.privacy_applied_everywhere(7));
        // A stale incarnation's word does not count, and nothing goes backwards.
        p.on_privacy_applied(&o("b", 0), 8);
        assert!(!p.privacy_applied_everywhere(7));
        p.on_privacy_applied(&o("b", 1), 7);
        p.on_privacy_applied(&o("a", 1), 3);
        assert!(p.privacy_applied_everywhere(7));
        // A rejoined incarnation starts again from nothing.
        p.on_heartbeat(&o("b", 2), 0, || true, t);
        assert!(!p.privacy_applied_everywhere(7));
    }

    #[test]
    fn own_and_dead_incarnations_are_ignored_and_new_ones_supersede() {
        let t = Instant::now();
        let mut p = Peers::new("me", Duration::from_secs(3));
        assert!(!p.on_delta(&o("me", 1), 1, t).apply);
        p.on_delta(&o("a", 1), 1, t);
        let v = p.on_heartbeat(&o("a", 2), 0, || true, t);
        assert_eq!(v.superseded, Some(o("a", 1)));
        assert!(!p.on_delta(&o("a", 1), 2, t).apply, "dead incarnation");
        assert!(p.on_delta(&o("a", 2), 1, t).apply);
    }

    #[test]
    fn silence_kills_only_while_the_link_is_up() {
        let t = Instant::now();
        let mut p = Peers::new("me", Duration::from_secs(3));
        p.on_delta(&o("a", 1), 1, t);
        let later = t + Duration::from_secs(4);
        assert!(p.check(later, false).is_empty());
        p.link_restored(later);
        assert!(p.check(later + Duration::from_secs(2), true).is_empty());
        assert_eq!(
            p.check(later + Duration::from_secs(4), true),
            vec![o("a", 1)]
        );
        assert!(!p.on_delta(&o("a", 1), 2, later).apply);
        assert_eq!(p.up(), 0);
    }
}
