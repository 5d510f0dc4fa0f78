//! What a node reads back from the cluster's event log (JSON written by any node, hostile or
//! garbled), then through a public webhook's view: decoding never panics, and the view never
//! passes on what a stranger must not see. Each input is a run of entries split at `\n`; an
//! entry starting with `!` is a privacy marker carrying the decoded event's note.
//!
//! Checked after every batch: no event leaves the view with a note (`public`) attached; a
//! device or channel event noted hidden never leaves it; a user event noted with a
//! presence leaves it only as that presence; and the view never tells a user offline twice in a
//! row.
#![no_main]

use std::collections::HashMap;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use presenced::events::{Event, EventType};
use presenced::webhooks::public::{marker, PublicView};

fuzz_target!(|data: &[u8]| {
    let mut view = PublicView::default();
    let mut told_online: HashMap<String, bool> = HashMap::new();
    for (n, batch) in data.split(|b| *b == 0xff).take(16).enumerate() {
        let mut input = Vec::new();
        for (i, line) in batch.split(|b| *b == b'\n').take(64).enumerate() {
            let (is_marker, json) = match line.split_first() {
                Some((b'!', rest)) => (true, rest),
                _ => (false, line),
            };
            let Ok(mut event) = serde_json::from_slice::<Event>(json) else {
                continue;
            };
            if is_marker {
                let (Some(user), Some(note)) = (event.user.clone(), event.public.clone()) else {
                    continue;
                };
                input.push(Arc::new(marker(&user, &note)));
            } else {
                // The log numbers entries from 1.
                event.seq = (n * 64 + i + 1) as u64;
                input.push(Arc::new(event));
            }
        }
        let ids: HashMap<String, Arc<Event>> = input
            .iter()
            .filter(|e| e.seq != 0)
            .map(|e| (e.id.clone(), e.clone()))
            .collect();
        for out in view.apply(input) {
            assert!(out.public.is_none(), "a note left the view: {out:?}");
            let source = ids.get(&out.id).filter(|s| s.seq == out.seq);
            // What the view made (from a note or a marker), not an unnoted event passed on.
            let made = source.is_none_or(|s| s.public.is_some());
            if let (Some(user), true) = (&out.user, out.presence.is_some()) {
                let online = out.kind != EventType::UserOffline;
                assert!(
                    !made || online || told_online.get(user) != Some(&false),
                    "{user} told offline twice in a row: {out:?}"
                );
                told_online.insert(user.clone(), online);
            }
            let Some(source) = source else {
                continue;
            };
            let note = source.public.as_deref();
            let hidden = note.is_some_and(|n| n.hidden);
            match source.kind {
                EventType::DeviceConnected
                | EventType::DeviceDisconnected
                | EventType::MemberJoined
                | EventType::MemberLeft
                | EventType::ChannelOccupied => {
                    assert!(!hidden, "a hidden user's event passed: {out:?}");
                }
                EventType::UserOnline | EventType::UserUpdated | EventType::UserOffline => {
                    if let Some(shown) = note.and_then(|n| n.presence.as_ref()) {
                        assert_eq!(
                            out.presence.as_ref(),
                            Some(shown),
                            "not the stranger's view"
                        );
                    }
                }
                _ => {}
            }
        }
    }
});
