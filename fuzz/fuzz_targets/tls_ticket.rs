//! What the session-ticket decryptor parses from the network: `TicketKeys::open_at` over
//! arbitrary bytes at arbitrary times, and over real tickets changed anywhere. Nothing panics;
//! bytes the server did not seal never open; a real ticket opens to exactly its state, and only
//! in the periods it is accepted in; any flipped bit, any truncation, and another secret's keys
//! refuse it; the announced lifetime stays within TLS 1.3's 7 days.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use presenced::tls_tickets::{TicketKeys, MAX_STATE_BYTES, MAX_TICKET_BYTES};

#[derive(Debug, Arbitrary)]
struct Input {
    /// Bytes a client sends as its ticket.
    forged: Vec<u8>,
    /// Session state to seal.
    state: Vec<u8>,
    /// When the ticket is sealed.
    sealed_at: u64,
    /// How much later it is opened (taken modulo three periods).
    opened_after: u32,
    /// Which byte and bit of the real ticket to flip.
    flip: u16,
    bit: u8,
    /// How many bytes to cut off the real ticket.
    cut: u16,
    /// The rotation period, in tens of seconds (clamped by `TicketKeys`).
    rotation: u16,
}

fuzz_target!(|input: Input| {
    let rotation = u64::from(input.rotation) * 10;
    let keys = TicketKeys::derived(b"fuzzing secret, at least 32 bytes long", rotation);
    let rotation = keys.rotation_secs();
    let now = input.sealed_at;
    let lifetime = keys.lifetime_at(now);
    assert!((1..=604_800).contains(&lifetime));

    // Bytes the server never sealed: refused (a forged tag has probability 2^-128).
    assert!(keys.open_at(&input.forged, now).is_none());

    let Some(ticket) = keys.seal_at(&input.state, now) else {
        assert!(
            input.state.len() > MAX_STATE_BYTES,
            "a state within the cap is sealed"
        );
        return;
    };
    assert!(ticket.len() <= MAX_TICKET_BYTES);
    assert_eq!(
        keys.open_at(&ticket, now).as_deref(),
        Some(&input.state[..])
    );

    let later = now.saturating_add(u64::from(input.opened_after) % (3 * rotation));
    let accepted = keys.accepted_periods(later).contains(&keys.period(now));
    assert!(keys.accepted_periods(later).count() <= 3);
    match keys.open_at(&ticket, later) {
        Some(state) => {
            assert!(accepted, "opened outside its window");
            assert_eq!(state, input.state);
        }
        None => assert!(!accepted, "refused inside its window"),
    }

    let mut flipped = ticket.clone();
    let i = usize::from(input.flip) % flipped.len();
    flipped[i] ^= 1 << (input.bit % 8);
    assert!(
        keys.open_at(&flipped, now).is_none(),
        "a flipped bit opened"
    );

    let cut = 1 + usize::from(input.cut) % ticket.len();
    assert!(keys.open_at(&ticket[..ticket.len() - cut], now).is_none());

    let other = TicketKeys::derived(b"another cluster's secret, 32 bytes+", rotation);
    assert!(
        other.open_at(&ticket, now).is_none(),
        "another secret opened it"
    );
});
