//! Per-address protections, where "an address" is [`address_key`]: an IPv4 address or an IPv6
//! /64, so rotating through one subscriber's IPv6 prefix buys nothing.
//!
//! Brute force on Connect: failed authentications within a window make later refusals slower,
//! and too many ban the address for a while (SPEC §8: 10 in a minute → 5 minutes). The guard is
//! synchronous, bounded and costs O(log n) per event under its mutex:
//! - At most `max_tracked` addresses are remembered. Two ordered indexes sit beside the map:
//!   addresses that are only being watched, by the end of their window (the first is the least
//!   recently failing), and banned addresses, by the end of their ban.
//! - Each event first removes up to [`SWEEP_PER_EVENT`] entries whose window and ban are both
//!   over, so stale entries leave without anyone scanning for them.
//! - When the table is full, a new failing address takes the place of the least recently
//!   failing address that is not banned (it loses at most `failures_before_ban - 1` recent
//!   failures; to exploit that an attacker needs more than `max_tracked` addresses in
//!   rotation). A ban is never evicted before it ends.
//! - When the table holds nothing but bans, it fails closed, not open: the new address is
//!   counted in one of [`OVERFLOW_BUCKETS`] shared records chosen by a keyed hash of the
//!   address, which is slowed and banned collectively like an address, and `check` consults
//!   that bucket for every address the table does not hold. The price is collateral: while a
//!   bucket is banned, about 1/[`OVERFLOW_BUCKETS`] of the addresses not in the table are
//!   refused too, for at most one ban. The hash is keyed per process, so an attacker cannot
//!   aim failures at a chosen victim's bucket. Reaching this state takes `max_tracked` banned
//!   addresses (100,000 by default, each with `failures_before_ban` delayed failures).
//!
//! Handshake slots: one address may hold only so many of the global TLS handshake slots, and
//! its further handshakes wait for one of its own, so a single source cannot starve everyone
//! else.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::address::address_key;

/// Shared records for failing addresses that find the table full of bans (see the module doc).
pub const OVERFLOW_BUCKETS: usize = 256;

/// Most entries whose window and ban are over that one event removes. Each event adds at most
/// one entry, so this keeps up, while no single event does unbounded work under the mutex.
pub const SWEEP_PER_EVENT: usize = 32;

/// Stands in for an end time that `Instant` cannot represent (a ban of centuries).
const FAR: Duration = Duration::from_secs(100 * 365 * 86_400);

/// Guard settings.
#[derive(Debug, Clone)]
pub struct AuthGuardConfig {
    /// Failures within `window` that trigger a ban.
    pub failures_before_ban: u32,
    /// Window over which failures count.
    pub window: Duration,
    /// How long a ban lasts.
    pub ban: Duration,
    /// Extra delay per recent failure before a refusal is sent.
    pub delay_per_failure: Duration,
    /// Longest refusal delay.
    pub max_delay: Duration,
    /// Addresses remembered at most.
    pub max_tracked: usize,
}

/// `t + d`, or far in the future when that is not representable.
fn after(t: Instant, d: Duration) -> Instant {
    t.checked_add(d).or_else(|| t.checked_add(FAR)).unwrap_or(t)
}

#[derive(Debug, Default)]
struct Record {
    /// Recent failure times, oldest first, at most `failures_before_ban`.
    failures: VecDeque<Instant>,
    /// Refuse every Connect until then.
    banned_until: Option<Instant>,
}

impl Record {
    fn prune(&mut self, now: Instant, window: Duration) {
        while self
            .failures
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) > window)
        {
            self.failures.pop_front();
        }
        if self.banned_until.is_some_and(|until| until <= now) {
            self.banned_until = None;
        }
    }

    /// When this record stops mattering: its ban and its window are both over strictly after
    /// this instant. `None` when it already does not matter.
    fn relevant_until(&self, window: Duration) -> Option<Instant> {
        let window_end = self.failures.back().map(|&t| after(t, window));
        window_end.max(self.banned_until)
    }

    /// Counts a failure at `now` and says what to do.
    fn fail(&mut self, now: Instant, config: &AuthGuardConfig) -> Refusal {
        self.prune(now, config.window);
        self.failures.push_back(now);
        while self.failures.len() > config.failures_before_ban as usize {
            self.failures.pop_front();
        }
        let recent = self.failures.len() as u32;
        let banned = recent >= config.failures_before_ban && self.banned_until.is_none();
        if banned {
            self.banned_until = Some(after(now, config.ban));
            self.failures.clear();
        }
        Refusal {
            delay: config
                .delay_per_failure
                .saturating_mul(recent)
                .min(config.max_delay),
            banned,
        }
    }

    /// `Err(remaining)` while banned.
    fn check(&self, now: Instant) -> Result<(), Duration> {
        match self.banned_until {
            Some(until) if until > now => Err(until - now),
            _ => Ok(()),
        }
    }
}

/// What the caller should do after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// Wait this long before sending the refusal.
    pub delay: Duration,
    /// This failure got the address banned.
    pub banned: bool,
}

/// A position in one of the table's indexes: (relevant until, address).
type IndexKey = (Instant, IpAddr);

/// The failure table behind the guard's mutex. Invariant: every record in `records` has
/// exactly one entry in `watching` or `banned`: the key and set stored beside it.
#[derive(Debug)]
struct Table {
    /// Per address: its record and where it sits in the indexes (the key, and whether it is
    /// in `banned`). At most `max_tracked` entries.
    records: HashMap<IpAddr, (Record, IndexKey, bool)>,
    /// Records without a ban, by the end of their window: the first is the least recent.
    watching: BTreeSet<IndexKey>,
    /// Banned records, by when they stop mattering.
    banned: BTreeSet<IndexKey>,
    /// Shared records for addresses that found the table full of bans; [`OVERFLOW_BUCKETS`].
    overflow: Vec<Record>,
    /// Keyed per process, so bucket collisions cannot be chosen.
    hasher: RandomState,
}

impl Table {
    fn new() -> Table {
        Table {
            records: HashMap::new(),
            watching: BTreeSet::new(),
            banned: BTreeSet::new(),
            overflow: (0..OVERFLOW_BUCKETS).map(|_| Record::default()).collect(),
            hasher: RandomState::new(),
        }
    }

    fn index(&mut self, banned: bool) -> &mut BTreeSet<IndexKey> {
        if banned {
            &mut self.banned
        } else {
            &mut self.watching
        }
    }

    /// Removes `key`'s record from the map and its index.
    fn take(&mut self, key: IpAddr) -> Option<Record> {
        let (record, index_key, banned) = self.records.remove(&key)?;
        self.index(banned).remove(&index_key);
        Some(record)
    }

    /// Stores `record` under `key` (which must not be present), unless it no longer matters.
    fn put(&mut self, key: IpAddr, record: Record, window: Duration) {
        let Some(until) = record.relevant_until(window) else {
            return;
        };
        let banned = record.banned_until.is_some();
        self.index(banned).insert((until, key));
        self.records.insert(key, (record, (until, key), banned));
    }

    /// Removes up to [`SWEEP_PER_EVENT`] records that stopped mattering before `now`.
    fn sweep(&mut self, now: Instant) {
        for _ in 0..SWEEP_PER_EVENT {
            let first = |index: &BTreeSet<IndexKey>| index.first().copied().filter(|k| k.0 < now);
            let Some((_, key)) = first(&self.watching).or_else(|| first(&self.banned)) else {
                return;
            };
            self.take(key);
        }
    }

    /// Forgets the least recently failing address that is not banned; false when every
    /// remembered address is banned.
    fn evict_least_recent_unbanned(&mut self) -> bool {
        match self.watching.first().copied() {
            Some((_, key)) => {
                self.take(key);
                true
            }
            None => false,
        }
    }

    fn bucket(&mut self, key: IpAddr) -> &mut Record {
        let i = (self.hasher.hash_one(key) % OVERFLOW_BUCKETS as u64) as usize;
        &mut self.overflow[i]
    }
}

/// Per-address failure tracking; share it behind an `Arc`.
#[derive(Debug)]
pub struct AuthGuard {
    config: AuthGuardConfig,
    table: Mutex<Table>,
}

impl AuthGuard {
    /// An empty guard.
    pub fn new(config: AuthGuardConfig) -> AuthGuard {
        AuthGuard {
            config,
            table: Mutex::new(Table::new()),
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `Err(remaining)` while `ip`'s address (or, when the table does not hold it, its overflow
    /// bucket) is banned.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let key = address_key(ip);
        let mut table = self.table();
        table.sweep(now);
        match table.records.get(&key) {
            Some((record, _, _)) => record.check(now),
            None => table.bucket(key).check(now),
        }
    }

    /// Records a failed authentication from `ip`.
    pub fn record_failure(&self, ip: IpAddr, now: Instant) -> Refusal {
        let key = address_key(ip);
        let mut table = self.table();
        table.sweep(now);
        let record = match table.take(key) {
            Some(record) => Some(record),
            None if table.records.len() < self.config.max_tracked
                || table.evict_least_recent_unbanned() =>
            {
                Some(Record::default())
            }
            None => None,
        };
        match record {
            Some(mut record) => {
                let refusal = record.fail(now, &self.config);
                table.put(key, record, self.config.window);
                refusal
            }
            // Every remembered address is banned: fail closed in the shared bucket.
            None => table.bucket(key).fail(now, &self.config),
        }
    }

    /// Addresses currently remembered (not counting overflow buckets).
    pub fn tracked(&self) -> usize {
        self.table().records.len()
    }
}

/// Bounds TLS handshakes in flight per address; share it behind an `Arc`. Beyond the bound, a
/// handshake waits for one of its own address's slots (under the caller's deadline), so one
/// address can never take every global slot, yet many clients behind one address (a carrier
/// NAT reconnecting after an outage) are served in turn rather than refused.
#[derive(Debug)]
pub struct AddressSlots {
    max_per_address: u32,
    /// Per address key: its slots, and how many handshakes hold or wait for one. Only addresses
    /// with such a handshake are present, so the map is bounded by the connection limit.
    by_address: Mutex<HashMap<IpAddr, (Arc<Semaphore>, u32)>>,
}

/// A handshake's claim on its address: waiting for a slot, then holding it. Released on drop.
#[derive(Debug)]
pub struct AddressSlot<'a> {
    slots: &'a AddressSlots,
    /// The address key the claim counts under.
    ip: IpAddr,
    permit: Option<OwnedSemaphorePermit>,
}

impl AddressSlots {
    /// At most `max_per_address` handshakes in flight per address.
    pub fn new(max_per_address: u32) -> AddressSlots {
        AddressSlots {
            max_per_address,
            by_address: Mutex::new(HashMap::new()),
        }
    }

    fn by_address(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, (Arc<Semaphore>, u32)>> {
        self.by_address.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for a slot of `ip`'s address (its [`address_key`]). Cancel-safe: dropping the
    /// future gives up the claim.
    pub async fn take(&self, ip: IpAddr) -> AddressSlot<'_> {
        let ip = address_key(ip);
        let semaphore = {
            let mut by_address = self.by_address();
            let (semaphore, claims) = by_address.entry(ip).or_insert_with(|| {
                (
                    Arc::new(Semaphore::new(self.max_per_address.max(1) as usize)),
                    0,
                )
            });
            *claims += 1;
            semaphore.clone()
        };
        // Created before waiting, so a cancelled wait still releases the claim.
        let mut slot = AddressSlot {
            slots: self,
            ip,
            permit: None,
        };
        slot.permit = semaphore.acquire_owned().await.ok();
        slot
    }

    /// Addresses with a handshake holding or waiting for a slot.
    pub fn addresses(&self) -> usize {
        self.by_address().len()
    }
}

impl Drop for AddressSlot<'_> {
    fn drop(&mut self) {
        drop(self.permit.take());
        let mut by_address = self.slots.by_address();
        if let Some((_, claims)) = by_address.get_mut(&self.ip) {
            *claims -= 1;
            if *claims == 0 {
                by_address.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod slot_tests {
    use super::*;

    #[tokio::test]
    async fn an_address_waits_beyond_its_share_and_slots_come_back() {
        let slots = AddressSlots::new(2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let first = slots.take(a).await;
        let _second = slots.take(a).await;
        let third = slots.take(a);
        tokio::pin!(third);
        assert!(
            futures_util::poll!(third.as_mut()).is_pending(),
            "a third handshake from the same address waits"
        );
        let _other = slots.take("10.0.0.2".parse().unwrap()).await;
        drop(first);
        let _third = third.await;
        assert_eq!(slots.addresses(), 2);
    }

    #[tokio::test]
    async fn an_ipv6_slash_64_shares_one_address_s_slots() {
        let slots = AddressSlots::new(1);
        let held = slots.take("2001:db8:1:2::1".parse().unwrap()).await;
        let same_64 = slots.take("2001:db8:1:2:ffff::9".parse().unwrap());
        tokio::pin!(same_64);
        assert!(
            futures_util::poll!(same_64.as_mut()).is_pending(),
            "another address in the same /64 waits for the /64's slot"
        );
        let _other_64 = slots.take("2001:db8:1:3::1".parse().unwrap()).await;
        assert_eq!(slots.addresses(), 2);
        drop(held);
        let _second = same_64.await;
    }

    #[tokio::test]
    async fn a_cancelled_wait_leaves_nothing_behind() {
        let slots = AddressSlots::new(1);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let held = slots.take(a).await;
        {
            let waiting = slots.take(a);
            tokio::pin!(waiting);
            assert!(futures_util::poll!(waiting.as_mut()).is_pending());
        }
        drop(held);
        assert_eq!(slots.addresses(), 0, "no entry outlives its claims");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(max_tracked: usize) -> AuthGuard {
        AuthGuard::new(AuthGuardConfig {
            failures_before_ban: 3,
            window: Duration::from_secs(60),
            ban: Duration::from_secs(300),
            delay_per_failure: Duration::from_millis(100),
            max_delay: Duration::from_millis(250),
            max_tracked,
        })
    }

    #[test]
    fn failures_slow_down_then_ban_for_a_while() {
        let g = guard(10);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let t0 = Instant::now();
        assert_eq!(g.record_failure(ip, t0).delay, Duration::from_millis(100));
        assert_eq!(g.record_failure(ip, t0).delay, Duration::from_millis(200));
        let third = g.record_failure(ip, t0);
        assert!(third.banned);
        assert_eq!(third.delay, Duration::from_millis(250), "capped");
        assert_eq!(g.check(ip, t0), Err(Duration::from_secs(300)));
        assert!(
            g.check("10.0.0.2".parse().unwrap(), t0).is_ok(),
            "others unaffected"
        );
        assert!(
            g.check(ip, t0 + Duration::from_secs(301)).is_ok(),
            "the ban ends"
        );
    }

    #[test]
    fn old_failures_fall_out_of_the_window() {
        let g = guard(10);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let t0 = Instant::now();
        g.record_failure(ip, t0);
        g.record_failure(ip, t0);
        let later = t0 + Duration::from_secs(61);
        assert!(!g.record_failure(ip, later).banned);
        assert!(g.check(ip, later).is_ok());
    }

    #[test]
    fn tracking_is_bounded() {
        let g = guard(2);
        let t0 = Instant::now();
        for i in 0..100u8 {
            g.record_failure(IpAddr::from([10, 0, 0, i]), t0);
        }
        assert!(g.tracked() <= 2);
    }

    fn ip(i: u32) -> IpAddr {
        IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i))
    }

    /// Bans `ip` at `now` (three failures with the test settings).
    fn ban(g: &AuthGuard, ip: IpAddr, now: Instant) {
        for _ in 0..3 {
            g.record_failure(ip, now);
        }
        assert!(g.check(ip, now).is_err());
    }

    #[test]
    fn an_ipv6_slash_64_counts_as_one_address() {
        let g = guard(10);
        let t0 = Instant::now();
        for host in ["2001:db8:1:2::1", "2001:db8:1:2::2", "2001:db8:1:2:ffff::3"] {
            g.record_failure(host.parse().unwrap(), t0);
        }
        assert!(
            g.check("2001:db8:1:2:abcd::1".parse().unwrap(), t0)
                .is_err(),
            "three hosts of one /64 are one address: banned"
        );
        assert!(g.check("2001:db8:1:3::1".parse().unwrap(), t0).is_ok());
        assert_eq!(g.tracked(), 1);
    }

    #[test]
    fn a_table_full_of_bans_still_bans_a_new_failing_address() {
        let g = guard(4);
        let t0 = Instant::now();
        for i in 0..4 {
            ban(&g, ip(i), t0);
        }
        let newcomer = ip(100);
        let delays: Vec<Duration> = (0..3)
            .map(|_| g.record_failure(newcomer, t0).delay)
            .collect();
        assert!(
            delays[1] > delays[0],
            "failures beyond the table are still slowed more each time: {delays:?}"
        );
        assert!(
            g.check(newcomer, t0).is_err(),
            "and refused once they reach the ban threshold (fail closed)"
        );
        for i in 0..4 {
            assert!(g.check(ip(i), t0).is_err(), "no ban was evicted");
        }
        assert!(g.tracked() <= 4);
        // The collateral: addresses sharing the newcomer's bucket, about 1 in OVERFLOW_BUCKETS.
        let refused = (1000..1000 + 100 * OVERFLOW_BUCKETS as u32)
            .filter(|&i| g.check(ip(i), t0).is_err())
            .count();
        assert!(
            (1..=300).contains(&refused),
            "{refused} of {} bystanders refused",
            100 * OVERFLOW_BUCKETS
        );
        assert!(
            g.check(newcomer, t0 + Duration::from_secs(301)).is_ok(),
            "the bucket's ban ends like an address's"
        );
    }

    #[test]
    fn when_full_the_least_recent_unbanned_address_makes_room() {
        let g = guard(3);
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        ban(&g, ip(0), t0);
        g.record_failure(ip(1), t0 + s);
        g.record_failure(ip(2), t0 + 2 * s);
        // ip(3) is new: ip(1), the oldest address that is not banned, is forgotten.
        ban(&g, ip(3), t0 + 3 * s);
        assert_eq!(g.tracked(), 3);
        assert!(g.check(ip(0), t0 + 3 * s).is_err(), "the ban stays");
        g.record_failure(ip(2), t0 + 3 * s);
        let third = g.record_failure(ip(2), t0 + 3 * s);
        assert!(third.banned, "ip(2)'s earlier failure was kept");
    }

    #[test]
    fn entries_leave_the_table_when_their_window_or_ban_ends() {
        let g = guard(100);
        let t0 = Instant::now();
        for i in 0..10 {
            g.record_failure(ip(i), t0);
        }
        ban(&g, ip(50), t0);
        assert_eq!(g.tracked(), 11);
        let after_window = t0 + Duration::from_secs(61);
        assert!(g.check(ip(99), after_window).is_ok());
        assert_eq!(g.tracked(), 1, "only the ban is still relevant");
        assert!(g.check(ip(50), after_window).is_err());
        assert!(g.check(ip(99), t0 + Duration::from_secs(301)).is_ok());
        assert_eq!(g.tracked(), 0);
    }

    #[test]
    fn the_cost_of_an_event_does_not_grow_with_the_table() {
        // 100,000 banned addresses fill the table, then 100,000 more fail. With an O(n) scan
        // per new address this is ~10^10 steps; bounded work per event finishes in well under
        // a second even unoptimised. Bounded: the loop gives up at the budget.
        const N: u32 = 100_000;
        let g = AuthGuard::new(AuthGuardConfig {
            failures_before_ban: 1,
            window: Duration::from_secs(60),
            ban: Duration::from_secs(300),
            delay_per_failure: Duration::from_millis(100),
            max_delay: Duration::from_millis(250),
            max_tracked: N as usize,
        });
        let t0 = Instant::now();
        let budget = Duration::from_secs(20);
        let started = Instant::now();
        let mut done = 0;
        for i in 0..2 * N {
            if i % 1024 == 0 && started.elapsed() > budget {
                break;
            }
            g.record_failure(ip(i), t0);
            done += 1;
        }
        assert_eq!(done, 2 * N, "{done} events within {budget:?}");
        assert_eq!(g.tracked(), N as usize);
        assert!(g.check(ip(0), t0).is_err());
        assert!(
            g.check(ip(2 * N - 1), t0).is_err(),
            "overflow is banned too"
        );
    }
}
