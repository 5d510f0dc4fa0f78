//! The privacy book: every user's privacy entry in memory (only users who differ from the
//! defaults have one), the caps, and the two steps of every change. [`PrivacyBook::plan`] checks
//! an operation against the caps and turns it into [`PrivacyRecord`]s, taking the marks from
//! what each affected viewer sees at that moment; [`PrivacyBook::apply`] applies one record and
//! is the only mutation. The single node and the cluster run the same plan and apply (the store
//! and the cluster log persist the records in between), so a change means the same on every node
//! and after a restart.
//!
//! Versions: every change that alters what someone is shown carries a fresh tick and raises the
//! privacy version of each user whose view changes (for a block, both users), so a view only ever
//! moves to a higher version ([`PrivacyBook::version_floor`]).

use std::collections::HashMap;

use super::policy::{decide, Decision};
use super::{
    Answer, Approval, Audience, BlockEntry, Mark, PrivacyConfig, PrivacyError, PrivacyOp,
    PrivacyRecord, Settings, UserPrivacy, Viewer,
};

/// Most users one Block, Unblock or answer may name (like `limits.max_ids_per_request`).
pub const MAX_TARGETS_PER_OP: usize = 100;

/// Every user's privacy entry and the caps.
#[derive(Debug, Default)]
pub struct PrivacyBook {
    users: HashMap<String, UserPrivacy>,
    config: PrivacyConfig,
}

/// What `plan` needs to know of a user's shown presence (visible devices only, user-level
/// invisibility aside): `None` when shown online, else the shown offline view.
pub type ShownOffline<'a> = &'a dyn Fn(&str) -> Option<Mark>;

impl PrivacyBook {
    /// An empty book with these caps.
    pub fn new(config: PrivacyConfig) -> PrivacyBook {
        PrivacyBook {
            users: HashMap::new(),
            config,
        }
    }

    /// The caps.
    pub fn config(&self) -> &PrivacyConfig {
        &self.config
    }

    /// A user's entry, if they differ from the defaults.
    pub fn get(&self, user: &str) -> Option<&UserPrivacy> {
        self.users.get(user)
    }

    /// Users with an entry.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// True when no user has an entry.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// True when what others see of `user` may differ from the truth because of privacy (a
    /// setting, or a block either way): such a user's changes are fanned out viewer by viewer.
    pub fn restricted(&self, user: &str) -> bool {
        self.users.get(user).is_some_and(|p| {
            !p.settings.is_default() || !p.blocked.is_empty() || !p.blocked_by.is_empty()
        })
    }

    /// What `viewer` is shown of `target`.
    pub fn decide(&self, viewer: Viewer<'_>, target: &str) -> Decision {
        let viewer_privacy = match viewer {
            Viewer::User(v) if v != target => self.users.get(v),
            _ => None,
        };
        decide(viewer, target, self.users.get(target), viewer_privacy)
    }

    /// True when `a` blocked `b` or `b` blocked `a`.
    pub fn related(&self, a: &str, b: &str) -> bool {
        self.users
            .get(a)
            .is_some_and(|p| p.blocked.contains_key(b) || p.blocked_by.contains(b))
    }

    /// The lowest version any view of `user` shows (0 without an entry).
    pub fn version_floor(&self, user: &str) -> u64 {
        self.users.get(user).map_or(0, |p| p.settings.version)
    }

    /// What `viewer` holds of `target` now, made offline: the mark a mask starting now records.
    fn current(
        &self,
        viewer: Viewer<'_>,
        target: &str,
        shown: ShownOffline<'_>,
        tick: u64,
    ) -> Mark {
        match self.decide(viewer, target) {
            Decision::Masked { mark, .. } => mark,
            Decision::Own | Decision::Shown { .. } => self.shown_mark(target, shown, tick),
        }
    }

    /// The shown view of `target` made offline: its invisibility mark, its shown offline view at
    /// the version floor, or a fresh mark when it is shown online.
    fn shown_mark(&self, target: &str, shown: ShownOffline<'_>, tick: u64) -> Mark {
        let settings = self.users.get(target).map(|p| &p.settings);
        if let Some(mark) = settings.and_then(|s| s.invisible) {
            return mark;
        }
        match shown(target) {
            Some(mark) => Mark {
                last_seen_ms: mark.last_seen_ms,
                version: mark.version.max(self.version_floor(target)),
            },
            None => Mark::fresh(tick),
        }
    }

    fn settings(&self, user: &str) -> Settings {
        self.users
            .get(user)
            .map(|p| p.settings.clone())
            .unwrap_or_default()
    }

    /// The records that carry out `op` at `tick` (a fresh version) and `now_ms`, or why it is
    /// refused (nothing applies). An operation that changes nothing plans no records.
    pub fn plan(
        &self,
        op: &PrivacyOp,
        tick: u64,
        now_ms: u64,
        shown: ShownOffline<'_>,
    ) -> Result<Vec<PrivacyRecord>, PrivacyError> {
        let settings_record = |user: &str, settings: Settings| PrivacyRecord::Settings {
            user: user.to_string(),
            settings,
        };
        match op {
            PrivacyOp::SetInvisible { user, on } => {
                let mut s = self.settings(user);
                if s.invisible.is_some() == *on {
                    return Ok(Vec::new());
                }
                match s.invisible {
                    // Turning it off: the last-seen shown while invisible stays until the
                    // user's next session.
                    Some(mark) => {
                        s.reappeared = Some(Mark {
                            last_seen_ms: mark.last_seen_ms,
                            version: tick,
                        })
                    }
                    None => s.invisible = Some(self.shown_mark(user, shown, tick)),
                }
                if !on {
                    s.invisible = None;
                }
                s.version = tick;
                Ok(vec![settings_record(user, s)])
            }
            PrivacyOp::SetAudience {
                user,
                presence,
                last_seen,
            } => {
                let mut s = self.settings(user);
                let (old, new) = (s.audience, presence.unwrap_or(s.audience));
                let last_seen = last_seen.unwrap_or(s.last_seen_audience);
                if old == new && last_seen == s.last_seen_audience {
                    return Ok(Vec::new());
                }
                if old == Audience::Everyone && new != Audience::Everyone {
                    s.stranger_mark = Some(self.current(Viewer::Public, user, shown, tick));
                }
                if old != Audience::Nobody && new == Audience::Nobody {
                    // What approved watchers see now: the shown view (they are not masked).
                    s.approved_mark = Some(self.shown_mark(user, shown, tick));
                }
                if new == Audience::Everyone {
                    s.stranger_mark = None;
                }
                if new != Audience::Nobody {
                    s.approved_mark = None;
                }
                s.audience = new;
                s.last_seen_audience = last_seen;
                s.version = tick;
                Ok(vec![settings_record(user, s)])
            }
            PrivacyOp::Block { user, targets } => {
                check_count(targets)?;
                let held = self.users.get(user).map_or(0, |p| p.blocked.len());
                let mut records = Vec::new();
                let mut fresh: Vec<&String> = Vec::new();
                for target in targets {
                    if target == user {
                        return Err(PrivacyError::Bad("you cannot block yourself".into()));
                    }
                    let known = self
                        .users
                        .get(user)
                        .is_some_and(|p| p.blocked.contains_key(target));
                    if !known && !fresh.contains(&target) {
                        fresh.push(target);
                    }
                }
                if fresh.is_empty() {
                    return Ok(records);
                }
                if held + fresh.len() > self.config.max_blocked {
                    return Err(PrivacyError::Limit(format!(
                        "your block list holds {held} users and the limit is {} \
                         (privacy.max_blocked): unblock someone first",
                        self.config.max_blocked
                    )));
                }
                let mut s = self.settings(user);
                s.version = tick;
                records.push(settings_record(user, s));
                for target in fresh {
                    let entry = BlockEntry {
                        since_ms: now_ms,
                        blocker_mark: self.current(Viewer::User(target), user, shown, tick),
                        blocked_mark: self.current(Viewer::User(user), target, shown, tick),
                    };
                    let mut t = self.settings(target);
                    t.version = tick;
                    records.push(settings_record(target, t));
                    records.push(PrivacyRecord::Block {
                        user: user.clone(),
                        target: target.clone(),
                        entry: Some(entry),
                    });
                }
                Ok(records)
            }
            PrivacyOp::Unblock { user, targets } => {
                check_count(targets)?;
                let Some(p) = self.users.get(user) else {
                    return Ok(Vec::new());
                };
                let mut gone: Vec<&String> = targets
                    .iter()
                    .filter(|t| p.blocked.contains_key(*t))
                    .collect();
                gone.dedup();
                if gone.is_empty() {
                    return Ok(Vec::new());
                }
                let mut s = self.settings(user);
                s.version = tick;
                let mut records = vec![settings_record(user, s)];
                for target in gone {
                    let mut t = self.settings(target);
                    t.version = tick;
                    records.push(settings_record(target, t));
                    records.push(PrivacyRecord::Block {
                        user: user.clone(),
                        target: target.clone(),
                        entry: None,
                    });
                }
                Ok(records)
            }
            PrivacyOp::Request { target, requester } => {
                let Some(t) = self.users.get(target) else {
                    return Ok(Vec::new());
                };
                let needs_approval = t.settings.audience != Audience::Everyone
                    || t.settings.last_seen_audience == Audience::Approved;
                let related = t.blocked.contains_key(requester) || t.blocked_by.contains(requester);
                if !needs_approval
                    || related
                    || target == requester
                    || t.approvals.contains_key(requester)
                    || t.pending >= self.config.max_pending_requests
                {
                    return Ok(Vec::new());
                }
                Ok(vec![PrivacyRecord::Approval {
                    user: target.clone(),
                    other: requester.clone(),
                    state: Some(Approval::Pending { since_ms: now_ms }),
                }])
            }
            PrivacyOp::Answer {
                user,
                others,
                answer,
            } => {
                check_count(others)?;
                let p = self.users.get(user);
                let standing = |o: &str| p.and_then(|p| p.approvals.get(o)).copied();
                let mut records = Vec::new();
                let mut approved = p.map_or(0, |p| {
                    p.approvals
                        .values()
                        .filter(|a| matches!(a, Approval::Approved { .. }))
                        .count()
                });
                let mut seen: Vec<&String> = Vec::new();
                for other in others {
                    if other == user {
                        return Err(PrivacyError::Bad(
                            "you cannot approve, deny or revoke yourself".into(),
                        ));
                    }
                    if seen.contains(&other) {
                        continue;
                    }
                    seen.push(other);
                    let state = match (answer, standing(other)) {
                        (Answer::Approve, Some(Approval::Approved { .. })) => continue,
                        (Answer::Approve, _) => {
                            approved += 1;
                            if approved > self.config.max_approved {
                                return Err(PrivacyError::Limit(format!(
                                    "you have approved {} watchers, the limit \
                                     (privacy.max_approved): revoke someone first",
                                    self.config.max_approved
                                )));
                            }
                            Some(Approval::Approved { since_ms: now_ms })
                        }
                        (Answer::Deny, None | Some(Approval::Pending { .. })) => {
                            Some(Approval::Denied { since_ms: now_ms })
                        }
                        (Answer::Deny, _) => continue,
                        (Answer::Revoke, Some(Approval::Approved { .. })) => {
                            Some(Approval::Revoked {
                                since_ms: now_ms,
                                mark: self.current(Viewer::User(other), user, shown, tick),
                            })
                        }
                        (Answer::Revoke, _) => continue,
                    };
                    records.push(PrivacyRecord::Approval {
                        user: user.clone(),
                        other: other.clone(),
                        state,
                    });
                }
                if records.is_empty() {
                    return Ok(records);
                }
                // Denied and revoked entries beyond the cap: the oldest are forgotten.
                let kept_denied = p.map_or(0, |p| p.approvals.len() - p.pending) + records.len();
                if let Some(p) = p.filter(|_| kept_denied > self.config.max_denied) {
                    let mut old: Vec<(u64, &String)> = p
                        .approvals
                        .iter()
                        .filter(|(o, a)| {
                            matches!(a, Approval::Denied { .. } | Approval::Revoked { .. })
                                && !seen.contains(o)
                        })
                        .map(|(o, a)| (a.since_ms(), o))
                        .collect();
                    old.sort();
                    let excess = kept_denied - self.config.max_denied;
                    for (_, o) in old.into_iter().take(excess) {
                        records.push(PrivacyRecord::Approval {
                            user: user.clone(),
                            other: o.clone(),
                            state: None,
                        });
                    }
                }
                if *answer != Answer::Deny {
                    let mut s = self.settings(user);
                    s.version = tick;
                    records.insert(0, settings_record(user, s));
                }
                Ok(records)
            }
        }
    }

    /// Applies one record (idempotent: applying it again changes nothing).
    pub fn apply(&mut self, record: &PrivacyRecord) {
        match record {
            PrivacyRecord::Settings { user, settings } => {
                self.users.entry(user.clone()).or_default().settings = settings.clone();
                self.drop_if_empty(user);
            }
            PrivacyRecord::Block {
                user,
                target,
                entry,
            } => {
                match entry {
                    Some(entry) => {
                        self.users
                            .entry(user.clone())
                            .or_default()
                            .blocked
                            .insert(target.clone(), *entry);
                        self.users
                            .entry(target.clone())
                            .or_default()
                            .blocked_by
                            .insert(user.clone());
                    }
                    None => {
                        if let Some(p) = self.users.get_mut(user) {
                            p.blocked.remove(target);
                        }
                        if let Some(p) = self.users.get_mut(target) {
                            p.blocked_by.remove(user);
                        }
                        self.drop_if_empty(target);
                    }
                }
                self.drop_if_empty(user);
            }
            PrivacyRecord::Approval { user, other, state } => {
                let p = self.users.entry(user.clone()).or_default();
                let old = match state {
                    Some(state) => p.approvals.insert(other.clone(), *state),
                    None => p.approvals.remove(other),
                };
                if matches!(old, Some(Approval::Pending { .. })) {
                    p.pending -= 1;
                }
                if matches!(state, Some(Approval::Pending { .. })) {
                    p.pending += 1;
                }
                self.drop_if_empty(user);
            }
        }
    }

    fn drop_if_empty(&mut self, user: &str) {
        if self.users.get(user).is_some_and(UserPrivacy::is_empty) {
            self.users.remove(user);
        }
    }

    /// Up to `limit` users `user` blocked, after `after` in user-id order, with when; and the
    /// total.
    pub fn blocked_page(
        &self,
        user: &str,
        after: Option<&str>,
        limit: usize,
    ) -> (Vec<(String, u64)>, usize) {
        let Some(p) = self.users.get(user) else {
            return (Vec::new(), 0);
        };
        let range = match after {
            Some(a) => p
                .blocked
                .range::<str, _>((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded)),
            None => p.blocked.range::<str, _>(..),
        };
        let page = range
            .take(limit)
            .map(|(t, e)| (t.clone(), e.since_ms))
            .collect();
        (page, p.blocked.len())
    }

    /// Up to `limit` of `user`'s approval entries matching `filter`, after `after` in user-id
    /// order; and how many match in all.
    pub fn approvals_page(
        &self,
        user: &str,
        filter: &dyn Fn(&Approval) -> bool,
        after: Option<&str>,
        limit: usize,
    ) -> (Vec<(String, Approval)>, usize) {
        let Some(p) = self.users.get(user) else {
            return (Vec::new(), 0);
        };
        let total = p.approvals.values().filter(|a| filter(a)).count();
        let range = match after {
            Some(a) => p
                .approvals
                .range::<str, _>((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded)),
            None => p.approvals.range::<str, _>(..),
        };
        let page = range
            .filter(|(_, a)| filter(a))
            .take(limit)
            .map(|(o, a)| (o.clone(), *a))
            .collect();
        (page, total)
    }
}

fn check_count(targets: &[String]) -> Result<(), PrivacyError> {
    if targets.is_empty() {
        return Err(PrivacyError::Bad("name at least one user".into()));
    }
    if targets.len() > MAX_TARGETS_PER_OP {
        return Err(PrivacyError::Limit(format!(
            "{} users; at most {MAX_TARGETS_PER_OP} per request",
            targets.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Everyone shown online, except users listed as offline with their mark.
    fn online(_: &str) -> Option<Mark> {
        None
    }

    fn run(book: &mut PrivacyBook, op: PrivacyOp, tick: u64) -> Vec<PrivacyRecord> {
        let records = book.plan(&op, tick, tick / 1000, &online).unwrap();
        for r in &records {
            book.apply(r);
        }
        records
    }

    fn masked(book: &PrivacyBook, viewer: &str, target: &str) -> Option<Mark> {
        match book.decide(Viewer::User(viewer), target) {
            Decision::Masked { mark, .. } => Some(mark),
            _ => None,
        }
    }

    #[test]
    fn invisible_on_then_off_and_versions_only_grow() {
        let mut book = PrivacyBook::default();
        let op = |on| PrivacyOp::SetInvisible {
            user: "a".into(),
            on,
        };
        run(&mut book, op(true), 10_000);
        assert_eq!(masked(&book, "b", "a"), Some(Mark::fresh(10_000)));
        assert!(book.restricted("a"));
        assert!(run(&mut book, op(true), 11_000).is_empty(), "no change");
        run(&mut book, op(false), 12_000);
        assert_eq!(masked(&book, "b", "a"), None);
        assert!(!book.restricted("a"));
        assert_eq!(
            book.version_floor("a"),
            12_000,
            "the view moves past the mark"
        );
    }

    #[test]
    fn an_offline_user_going_invisible_keeps_the_offline_view_watchers_hold() {
        let mut book = PrivacyBook::default();
        let offline = |_: &str| {
            Some(Mark {
                last_seen_ms: 3,
                version: 3_000,
            })
        };
        let op = PrivacyOp::SetInvisible {
            user: "a".into(),
            on: true,
        };
        for r in book.plan(&op, 9_000, 9, &offline).unwrap() {
            book.apply(&r);
        }
        assert_eq!(
            masked(&book, "b", "a"),
            Some(Mark {
                last_seen_ms: 3,
                version: 3_000
            })
        );
    }

    #[test]
    fn blocks_are_capped_deduplicated_and_undone() {
        let mut book = PrivacyBook::new(PrivacyConfig {
            max_blocked: 2,
            ..PrivacyConfig::default()
        });
        let block = |targets: &[&str]| PrivacyOp::Block {
            user: "a".into(),
            targets: targets.iter().map(|t| t.to_string()).collect(),
        };
        run(&mut book, block(&["b", "b"]), 1_000);
        assert_eq!(book.blocked_page("a", None, 10).1, 1);
        assert_eq!(masked(&book, "b", "a"), Some(Mark::fresh(1_000)));
        assert_eq!(masked(&book, "a", "b"), Some(Mark::fresh(1_000)));
        assert!(book.restricted("b"), "the blocked side is restricted too");
        let err = book
            .plan(&block(&["c", "d"]), 2_000, 2, &online)
            .unwrap_err();
        assert!(matches!(err, PrivacyError::Limit(ref m) if m.contains("max_blocked")));
        assert!(matches!(
            book.plan(&block(&["a"]), 2_000, 2, &online),
            Err(PrivacyError::Bad(_))
        ));
        run(
            &mut book,
            PrivacyOp::Unblock {
                user: "a".into(),
                targets: vec!["b".into()],
            },
            3_000,
        );
        assert_eq!(masked(&book, "b", "a"), None);
        assert_eq!(masked(&book, "a", "b"), None);
        assert!(book.version_floor("a") > 1_000 && book.version_floor("b") > 1_000);
        assert!(!book.restricted("b"));
    }

    #[test]
    fn requests_approvals_denials_and_revocations() {
        let mut book = PrivacyBook::new(PrivacyConfig {
            max_pending_requests: 2,
            ..PrivacyConfig::default()
        });
        let request = |r: &str| PrivacyOp::Request {
            target: "t".into(),
            requester: r.into(),
        };
        assert!(
            run(&mut book, request("x"), 500).is_empty(),
            "no request while everyone sees t"
        );
        run(
            &mut book,
            PrivacyOp::SetAudience {
                user: "t".into(),
                presence: Some(Audience::Approved),
                last_seen: None,
            },
            1_000,
        );
        assert_eq!(masked(&book, "x", "t"), Some(Mark::fresh(1_000)));
        for r in ["x", "y", "z"] {
            run(&mut book, request(r), 2_000);
        }
        assert_eq!(book.get("t").unwrap().pending, 2, "the third is dropped");
        let answer = |o: &str, answer| PrivacyOp::Answer {
            user: "t".into(),
            others: vec![o.into()],
            answer,
        };
        run(&mut book, answer("x", Answer::Approve), 3_000);
        assert_eq!(masked(&book, "x", "t"), None);
        assert_eq!(book.version_floor("t"), 3_000);
        run(&mut book, answer("y", Answer::Deny), 4_000);
        assert!(
            run(&mut book, request("y"), 5_000).is_empty(),
            "a denied user makes no new request"
        );
        assert_eq!(book.get("t").unwrap().pending, 0);
        run(&mut book, answer("x", Answer::Revoke), 6_000);
        assert_eq!(masked(&book, "x", "t"), Some(Mark::fresh(6_000)));
        let (page, total) =
            book.approvals_page("t", &|a| matches!(a, Approval::Denied { .. }), None, 10);
        assert_eq!((page.len(), total), (1, 1));
        // Audience back to everyone: nobody is masked, the entries stay.
        run(
            &mut book,
            PrivacyOp::SetAudience {
                user: "t".into(),
                presence: Some(Audience::Everyone),
                last_seen: None,
            },
            7_000,
        );
        assert_eq!(masked(&book, "x", "t"), None);
        assert_eq!(masked(&book, "z", "t"), None);
    }

    #[test]
    fn nobody_masks_approved_watchers_at_the_change() {
        let mut book = PrivacyBook::default();
        run(
            &mut book,
            PrivacyOp::Answer {
                user: "t".into(),
                others: vec!["f".into()],
                answer: Answer::Approve,
            },
            1_000,
        );
        run(
            &mut book,
            PrivacyOp::SetAudience {
                user: "t".into(),
                presence: Some(Audience::Approved),
                last_seen: None,
            },
            2_000,
        );
        run(
            &mut book,
            PrivacyOp::SetAudience {
                user: "t".into(),
                presence: Some(Audience::Nobody),
                last_seen: None,
            },
            3_000,
        );
        assert_eq!(masked(&book, "f", "t"), Some(Mark::fresh(3_000)));
        assert_eq!(
            masked(&book, "s", "t"),
            Some(Mark::fresh(2_000)),
            "a stranger keeps the mark of the first change"
        );
    }

    #[test]
    fn applying_a_record_twice_changes_nothing() {
        let mut book = PrivacyBook::default();
        let records = run(
            &mut book,
            PrivacyOp::Block {
                user: "a".into(),
                targets: vec!["b".into()],
            },
            1_000,
        );
        for r in &records {
            book.apply(r);
        }
        assert_eq!(book.blocked_page("a", None, 10).1, 1);
        assert_eq!(book.get("b").unwrap().blocked_by.len(), 1);
    }
}
