//! The one rule: what a viewer is shown of a target. Pure (no state of its own, no I/O); every
//! path that reveals presence reaches it through the book ([`super::book::PrivacyBook::decide`]).
//!
//! 1. The target itself and the app's backend see the truth ([`Decision::Own`]).
//! 2. Every mask that applies contributes its [`Mark`]: the target is invisible; the target
//!    blocked the viewer, or the viewer blocked the target (blocking hides both ways); the
//!    target's audience is `Nobody` (approved watchers see the mark of that change, strangers
//!    theirs), or `Approved` and the viewer is not approved (a revoked watcher sees the mark of
//!    the revocation, a stranger the mark of the audience change).
//! 3. No mask: [`Decision::Shown`]. Masks: [`Decision::Masked`] with the mark of the lowest
//!    version. The earliest mask froze the viewer's view; every later mask recorded that frozen
//!    view (or an even later one), so the minimum is always what the viewer holds.
//! 4. The last-seen time is shown when the target's last-seen audience is `Everyone`, or
//!    `Approved` and the viewer is approved and in no block relation with the target.

use super::{Approval, Audience, Mark, UserPrivacy, Viewer};

/// What a viewer is shown of a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The truth: the target's own devices, the backend.
    Own,
    /// The target's shown presence (its visible devices), with or without the last-seen time.
    Shown {
        /// Whether `last_seen_ms` is shown (else it reads 0, as for a user never seen).
        last_seen: bool,
    },
    /// A frozen offline user.
    Masked {
        /// What is shown: last-seen time and version.
        mark: Mark,
        /// Whether `mark.last_seen_ms` is shown (else 0).
        last_seen: bool,
    },
}

/// Decides what `viewer` is shown of `target`, from the target's privacy entry and the viewer's
/// (`None`: all defaults).
pub fn decide(
    viewer: Viewer<'_>,
    target: &str,
    target_privacy: Option<&UserPrivacy>,
    viewer_privacy: Option<&UserPrivacy>,
) -> Decision {
    let viewer_id = match viewer {
        Viewer::Backend => return Decision::Own,
        Viewer::User(id) if id == target => return Decision::Own,
        Viewer::User(id) => Some(id),
        Viewer::Public => None,
    };
    let mut mask: Option<Mark> = None;
    let mut add = |mark: Mark| {
        mask = Some(match mask {
            Some(held) if held.version <= mark.version => held,
            _ => mark,
        });
    };
    let mut related = false;
    let mut approved = false;
    let mut last_seen_audience = Audience::Everyone;
    if let Some(t) = target_privacy {
        let settings = &t.settings;
        last_seen_audience = settings.last_seen_audience;
        if let Some(mark) = settings.invisible {
            add(mark);
        }
        let standing = viewer_id.and_then(|v| t.approvals.get(v));
        approved = matches!(standing, Some(Approval::Approved { .. }));
        if let Some(entry) = viewer_id.and_then(|v| t.blocked.get(v)) {
            add(entry.blocker_mark);
            related = true;
        }
        let stranger = settings.stranger_mark.unwrap_or_default();
        match (settings.audience, standing) {
            (Audience::Everyone, _) => {}
            (Audience::Approved, Some(Approval::Approved { .. })) => {}
            (Audience::Nobody, Some(Approval::Approved { .. })) => {
                add(settings.approved_mark.unwrap_or(stranger));
            }
            (_, Some(Approval::Revoked { mark, .. })) => add(*mark),
            (_, _) => add(stranger),
        }
    }
    if let (Some(_), Some(v)) = (viewer_id, viewer_privacy) {
        if let Some(entry) = v.blocked.get(target) {
            add(entry.blocked_mark);
            related = true;
        }
    }
    let last_seen = match last_seen_audience {
        Audience::Everyone => true,
        Audience::Approved => approved && !related,
        Audience::Nobody => false,
    };
    match mask {
        None => Decision::Shown { last_seen },
        Some(mark) => Decision::Masked { mark, last_seen },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::privacy::{BlockEntry, Settings};

    fn mark(v: u64) -> Mark {
        Mark {
            last_seen_ms: v / 1000,
            version: v,
        }
    }

    fn with(settings: Settings) -> UserPrivacy {
        UserPrivacy {
            settings,
            ..UserPrivacy::default()
        }
    }

    const SHOWN: Decision = Decision::Shown { last_seen: true };

    #[test]
    fn no_entry_shows_everything_and_own_and_backend_always_see_the_truth() {
        assert_eq!(decide(Viewer::User("v"), "t", None, None), SHOWN);
        assert_eq!(decide(Viewer::Public, "t", None, None), SHOWN);
        let hidden = with(Settings {
            invisible: Some(mark(5_000)),
            audience: Audience::Nobody,
            ..Settings::default()
        });
        assert_eq!(
            decide(Viewer::User("t"), "t", Some(&hidden), None),
            Decision::Own
        );
        assert_eq!(
            decide(Viewer::Backend, "t", Some(&hidden), None),
            Decision::Own
        );
    }

    #[test]
    fn invisible_masks_everyone_else_with_its_mark() {
        let t = with(Settings {
            invisible: Some(mark(7_000)),
            ..Settings::default()
        });
        for viewer in [Viewer::User("v"), Viewer::Public] {
            assert_eq!(
                decide(viewer, "t", Some(&t), None),
                Decision::Masked {
                    mark: mark(7_000),
                    last_seen: true
                }
            );
        }
    }

    #[test]
    fn blocking_hides_both_ways_and_hides_last_seen_under_approved() {
        let entry = BlockEntry {
            since_ms: 1,
            blocker_mark: mark(3_000),
            blocked_mark: mark(4_000),
        };
        let mut a = with(Settings {
            last_seen_audience: Audience::Approved,
            ..Settings::default()
        });
        a.blocked.insert("b".into(), entry);
        a.approvals
            .insert("b".into(), Approval::Approved { since_ms: 1 });
        let mut b = UserPrivacy::default();
        b.blocked_by.insert("a".into());
        // b sees a frozen at the blocker mark, without last-seen (approved, but blocked).
        assert_eq!(
            decide(Viewer::User("b"), "a", Some(&a), Some(&b)),
            Decision::Masked {
                mark: mark(3_000),
                last_seen: false
            }
        );
        // a sees b frozen at the blocked mark.
        assert_eq!(
            decide(Viewer::User("a"), "b", Some(&b), Some(&a)),
            Decision::Masked {
                mark: mark(4_000),
                last_seen: true
            }
        );
        // A third user is not affected.
        assert_eq!(
            decide(Viewer::User("c"), "a", Some(&a), None),
            Decision::Shown { last_seen: false }
        );
    }

    #[test]
    fn audiences_mask_strangers_revoked_and_under_nobody_approved_watchers() {
        let mut t = with(Settings {
            audience: Audience::Approved,
            stranger_mark: Some(mark(2_000)),
            ..Settings::default()
        });
        t.approvals
            .insert("friend".into(), Approval::Approved { since_ms: 1 });
        t.approvals.insert(
            "ex".into(),
            Approval::Revoked {
                since_ms: 2,
                mark: mark(6_000),
            },
        );
        t.approvals
            .insert("asker".into(), Approval::Pending { since_ms: 3 });
        assert_eq!(decide(Viewer::User("friend"), "t", Some(&t), None), SHOWN);
        let masked = |m| Decision::Masked {
            mark: mark(m),
            last_seen: true,
        };
        assert_eq!(
            decide(Viewer::User("ex"), "t", Some(&t), None),
            masked(6_000)
        );
        assert_eq!(
            decide(Viewer::User("asker"), "t", Some(&t), None),
            masked(2_000)
        );
        assert_eq!(decide(Viewer::Public, "t", Some(&t), None), masked(2_000));
        t.settings.audience = Audience::Nobody;
        t.settings.approved_mark = Some(mark(8_000));
        assert_eq!(
            decide(Viewer::User("friend"), "t", Some(&t), None),
            masked(8_000)
        );
        assert_eq!(
            decide(Viewer::User("asker"), "t", Some(&t), None),
            masked(2_000)
        );
        // Back to everyone: approvals no longer matter.
        t.settings.audience = Audience::Everyone;
        assert_eq!(decide(Viewer::User("ex"), "t", Some(&t), None), SHOWN);
    }

    #[test]
    fn overlapping_masks_show_the_earliest_mark() {
        let mut a = with(Settings {
            invisible: Some(mark(9_000)),
            ..Settings::default()
        });
        a.blocked.insert(
            "b".into(),
            BlockEntry {
                since_ms: 1,
                blocker_mark: mark(5_000),
                blocked_mark: mark(5_000),
            },
        );
        assert_eq!(
            decide(Viewer::User("b"), "a", Some(&a), None),
            Decision::Masked {
                mark: mark(5_000),
                last_seen: true
            }
        );
        assert_eq!(
            decide(Viewer::User("c"), "a", Some(&a), None),
            Decision::Masked {
                mark: mark(9_000),
                last_seen: true
            }
        );
    }

    #[test]
    fn last_seen_audiences() {
        let mut t = with(Settings {
            last_seen_audience: Audience::Approved,
            ..Settings::default()
        });
        t.approvals
            .insert("friend".into(), Approval::Approved { since_ms: 1 });
        assert_eq!(decide(Viewer::User("friend"), "t", Some(&t), None), SHOWN);
        assert_eq!(
            decide(Viewer::User("other"), "t", Some(&t), None),
            Decision::Shown { last_seen: false }
        );
        t.settings.last_seen_audience = Audience::Nobody;
        assert_eq!(
            decide(Viewer::User("friend"), "t", Some(&t), None),
            Decision::Shown { last_seen: false }
        );
    }
}
