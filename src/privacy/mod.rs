//! Privacy (SPEC §13): who may see a user's presence. This module owns the settings each user
//! chooses (invisible, who sees their presence, who sees their last-seen), the block lists and
//! the approvals (accepted, pending, denied, revoked watchers), the one rule that decides what a
//! viewer is shown of a target ([`policy::decide`]), and the book that holds all of it in memory
//! and plans and applies changes ([`book::PrivacyBook`]). It is synchronous and does no I/O: the
//! registry holds the book under its lock and every path that reveals presence asks it; the store
//! and the cluster log only persist the [`PrivacyRecord`]s it produces.
//!
//! The design, its corner cases and the build order are in `docs/privacy-design.md`.
//!
//! A viewer from whom a target is hidden sees a **frozen offline user**: the [`Mark`] taken when
//! the mask began (what that viewer saw then, made offline) is what every path shows, until the
//! mask ends. That is exactly what "a user who went offline then and never changed" looks like, so
//! no path reveals that a mask exists.

pub mod book;
pub mod policy;

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

/// Who may see something of a user: their presence, or their last-seen time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Audience {
    /// Anyone who asks (the default).
    #[default]
    Everyone,
    /// Only watchers the user approved.
    Approved,
    /// No one but the user's own devices and the app's backend.
    Nobody,
}

/// The frozen offline view a masked viewer is shown: the last-seen time and the version of the
/// moment the mask began (or of the offline view the viewer already had).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Mark {
    /// Last-seen time shown, in ms since the epoch (0: never seen).
    pub last_seen_ms: u64,
    /// Version shown.
    pub version: u64,
}

impl Mark {
    /// A user who looked online until `tick` (a hybrid-logical-clock version, in µs): offline
    /// since then. Every node derives the same mark from the same tick.
    pub fn fresh(tick: u64) -> Mark {
        Mark {
            last_seen_ms: tick / 1000,
            version: tick,
        }
    }
}

/// A user's own settings.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Settings {
    /// Who sees the user's presence.
    pub audience: Audience,
    /// Who sees the user's last-seen time (where they see the presence at all).
    pub last_seen_audience: Audience,
    /// Invisible at the user level (every device), since this mark.
    pub invisible: Option<Mark>,
    /// What strangers were shown when `audience` left `Everyone`.
    pub stranger_mark: Option<Mark>,
    /// What approved watchers were shown when `audience` became `Nobody`.
    pub approved_mark: Option<Mark>,
    /// Set when invisibility ends: the last-seen time shown while invisible, at the version of
    /// that change. An offline user whose truth is older than this shows it, so last-seen never
    /// moves while invisible; the user's next session makes the truth newer again.
    #[serde(default)]
    pub reappeared: Option<Mark>,
    /// The privacy version: the version of the user's last privacy change. Views of the user
    /// never show a version below it, so a view that changes because of privacy alone still
    /// moves forward.
    pub version: u64,
}

impl Settings {
    /// True when nothing differs from the defaults (no entry needs to be kept).
    pub fn is_default(&self) -> bool {
        self.audience == Audience::Everyone
            && self.last_seen_audience == Audience::Everyone
            && self.invisible.is_none()
    }
}

/// One user a user blocked. Blocking hides each from the other; each side's frozen view is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockEntry {
    /// When the block was made, ms since the epoch.
    pub since_ms: u64,
    /// What the blocked user is shown of the blocker from now on.
    pub blocker_mark: Mark,
    /// What the blocker is shown of the blocked user from now on.
    pub blocked_mark: Mark,
}

/// Where a would-be watcher stands with a user whose audience is `Approved` (or `Nobody`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Approval {
    /// Accepted: sees the user's presence under `Approved`.
    Approved {
        /// Since when.
        since_ms: u64,
    },
    /// Asked (by subscribing) and not answered yet.
    Pending {
        /// When the request was made.
        since_ms: u64,
    },
    /// Refused; never told. A new subscribe makes no new request.
    Denied {
        /// When.
        since_ms: u64,
    },
    /// Was approved, no longer is: frozen at the mark of the revocation.
    Revoked {
        /// When.
        since_ms: u64,
        /// What the watcher is shown from then on (while the audience needs approval).
        mark: Mark,
    },
}

impl Approval {
    /// When the entry was made.
    pub fn since_ms(&self) -> u64 {
        match *self {
            Approval::Approved { since_ms }
            | Approval::Pending { since_ms }
            | Approval::Denied { since_ms }
            | Approval::Revoked { since_ms, .. } => since_ms,
        }
    }
}

/// Everything privacy-related about one user that differs from the defaults.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UserPrivacy {
    /// The user's settings.
    pub settings: Settings,
    /// Users this user blocked.
    pub blocked: BTreeMap<String, BlockEntry>,
    /// Users who blocked this user (the entries live in theirs).
    pub blocked_by: HashSet<String>,
    /// Would-be watchers: approved, pending, denied or revoked.
    pub approvals: BTreeMap<String, Approval>,
    /// How many of `approvals` are pending (the per-user cap on requests).
    pub pending: usize,
}

impl UserPrivacy {
    /// True when the entry holds nothing and can be dropped.
    pub fn is_empty(&self) -> bool {
        self.settings.is_default()
            && self.settings.version == 0
            && self.blocked.is_empty()
            && self.blocked_by.is_empty()
            && self.approvals.is_empty()
    }

    /// True when `viewer` is an approved watcher.
    pub fn approves(&self, viewer: &str) -> bool {
        matches!(self.approvals.get(viewer), Some(Approval::Approved { .. }))
    }
}

/// Who is looking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Viewer<'a> {
    /// A signed-in user (their devices, their webhooks are not this).
    User(&'a str),
    /// The app's backend (admin API, backend webhooks): sees the truth.
    Backend,
    /// A stranger: neither approved nor in a block relation (public webhooks).
    Public,
}

/// One durable privacy change, as the store and the cluster log keep it. Applying the records of
/// an operation, in order, is the only way the book changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PrivacyRecord {
    /// A user's settings, whole.
    Settings {
        /// The user.
        user: String,
        /// Their settings.
        settings: Settings,
    },
    /// `user` blocked `target` (`Some`) or lifted the block (`None`).
    Block {
        /// The blocker.
        user: String,
        /// The blocked user.
        target: String,
        /// The entry, or `None` once unblocked.
        entry: Option<BlockEntry>,
    },
    /// Where `other` stands with `user` (`None`: cleared).
    Approval {
        /// The watched user.
        user: String,
        /// The would-be watcher.
        other: String,
        /// The entry, or `None` once cleared.
        state: Option<Approval>,
    },
}

impl PrivacyRecord {
    /// The user whose book entry the record is kept under.
    pub fn owner(&self) -> &str {
        match self {
            PrivacyRecord::Settings { user, .. }
            | PrivacyRecord::Block { user, .. }
            | PrivacyRecord::Approval { user, .. } => user,
        }
    }

    /// The store key: unique per (owner, kind, other user).
    pub fn key(&self) -> String {
        match self {
            PrivacyRecord::Settings { user, .. } => format!("s\0{user}"),
            PrivacyRecord::Block { user, target, .. } => format!("b\0{user}\0{target}"),
            PrivacyRecord::Approval { user, other, .. } => format!("a\0{user}\0{other}"),
        }
    }
}

/// What an approval answer does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Approve (with or without a request: a backend with its own friend graph does this).
    Approve,
    /// Deny a request (never told to the requester).
    Deny,
    /// Take an approval back.
    Revoke,
}

/// A privacy change requested by a user (or by the backend on their behalf).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrivacyOp {
    /// Turn user-level invisibility on or off.
    SetInvisible {
        /// The user.
        user: String,
        /// On or off.
        on: bool,
    },
    /// Change who sees the presence and/or the last-seen time (`None`: unchanged).
    SetAudience {
        /// The user.
        user: String,
        /// Who sees the presence.
        presence: Option<Audience>,
        /// Who sees the last-seen time.
        last_seen: Option<Audience>,
    },
    /// Block users.
    Block {
        /// The blocker.
        user: String,
        /// Whom.
        targets: Vec<String>,
    },
    /// Lift blocks.
    Unblock {
        /// The blocker.
        user: String,
        /// Whom.
        targets: Vec<String>,
    },
    /// `requester` subscribed to `target`, whose audience needs approval.
    Request {
        /// The watched user.
        target: String,
        /// The would-be watcher.
        requester: String,
    },
    /// Approve, deny or revoke watchers.
    Answer {
        /// The watched user.
        user: String,
        /// The watchers.
        others: Vec<String>,
        /// What to do.
        answer: Answer,
    },
}

/// Why a privacy change was refused; nothing was applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrivacyError {
    /// A list would grow past its cap.
    #[error("{0}")]
    Limit(String),
    /// The request makes no sense (e.g. blocking yourself).
    #[error("{0}")]
    Bad(String),
}

/// Privacy limits (`[privacy]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrivacyConfig {
    /// Users one user may block.
    pub max_blocked: usize,
    /// Approved watchers one user may have.
    pub max_approved: usize,
    /// Denied and revoked entries kept per user; beyond it the oldest are forgotten (that
    /// user's next subscribe makes a new request).
    pub max_denied: usize,
    /// Pending requests per user; beyond it new requests are dropped (and counted), never
    /// told to the requester.
    pub max_pending_requests: usize,
}

impl Default for PrivacyConfig {
    fn default() -> Self {
        PrivacyConfig {
            max_blocked: 10_000,
            max_approved: 10_000,
            max_denied: 10_000,
            max_pending_requests: 1_000,
        }
    }
}

impl PrivacyConfig {
    /// Each cap in 1..=1,000,000.
    pub fn validate(&self) -> Result<(), String> {
        for (name, value) in [
            ("max_blocked", self.max_blocked),
            ("max_approved", self.max_approved),
            ("max_denied", self.max_denied),
            ("max_pending_requests", self.max_pending_requests),
        ] {
            if !(1..=1_000_000).contains(&value) {
                return Err(format!("privacy.{name} must be in 1..=1000000"));
            }
        }
        Ok(())
    }
}
