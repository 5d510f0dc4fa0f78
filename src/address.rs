//! What "one address" means for every per-address defense: an IPv4 address, or an IPv6 /64
//! (the prefix one subscriber line or phone gets, so rotating the low 64 bits buys nothing).
//! IPv4-mapped IPv6 addresses count as their IPv4 address.
//!
//! [`AddressLimits`] gives each address its share of the accept rate and of the connection
//! limit, so one source opening connections as fast as it can neither spends the global accept
//! budget nor holds every connection. It is synchronous and bounded: an address is remembered
//! only while it holds a connection or its bucket is refilling, and at most `max_tracked`
//! addresses at once. It never awaits and never sees a socket.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The key per-address limits count under: IPv4 as is, IPv6 truncated to its /64.
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// Each address's share of the accept rate and of the connection limit.
#[derive(Debug, Clone)]
pub struct AddressLimitsConfig {
    /// Connections one address may hold at once.
    pub max_connections: u32,
    /// New connections per second from one address, beyond its burst.
    pub accept_rate_per_sec: u32,
    /// New connections one address may open at once.
    pub accept_burst: u32,
    /// Addresses remembered at most. Addresses holding a connection number at most the global
    /// connection limit, so this should exceed it by room for addresses that only connected
    /// recently (see [`AddressLimitsConfig::tracked_bound`]).
    pub max_tracked: usize,
}

/// Addresses remembered beyond the global connection limit: those that hold no connection but
/// connected recently enough that their bucket is still refilling (two seconds at the defaults).
/// When the table is full, the longest-idle such address is forgotten first (it only regains a
/// full burst early), so this bounds memory, not who may connect.
pub const RECENT_ADDRESSES: usize = 65_536;

impl AddressLimitsConfig {
    /// The bound on remembered addresses for a broker holding at most `max_connections`.
    pub fn tracked_bound(max_connections: u32) -> usize {
        max_connections as usize + RECENT_ADDRESSES
    }
}

/// Why an address was refused a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressRefusal {
    /// It opens connections faster than its share of the accept rate.
    AcceptRate,
    /// It already holds its share of connections.
    ConnectionLimit,
    /// Every remembered address holds a connection and the table is at its bound (only when
    /// `max_tracked` is not above the global connection limit).
    TableFull,
}

impl AddressRefusal {
    /// The `reason` label of `presence_connections_refused_total`.
    pub fn metric_label(self) -> &'static str {
        match self {
            AddressRefusal::AcceptRate => "address_accept_rate",
            AddressRefusal::ConnectionLimit => "address_connection_limit",
            AddressRefusal::TableFull => "address_table_full",
        }
    }
}

/// One remembered address.
#[derive(Debug)]
struct AddressEntry {
    /// Connections it holds now.
    connections: u32,
    /// The token bucket as one instant (GCRA): the bucket is full at and after `full_at`, and
    /// each accepted connection moves it one emission interval later. A connect is within the
    /// rate while `full_at` is at most `burst - 1` intervals ahead of now.
    full_at: Instant,
    /// It has an entry in `Table::idle`, so it is not queued twice.
    queued: bool,
}

#[derive(Debug, Default)]
struct Table {
    /// Addresses holding a connection or refilling; at most `max_tracked`.
    by_address: HashMap<IpAddr, AddressEntry>,
    /// Addresses that held no connection when last seen, with when their bucket is full at the
    /// latest, oldest first; at most one entry per remembered address. Checked from the front
    /// on each call, so forgetting idle addresses costs O(1) amortised and never a scan.
    idle: VecDeque<(IpAddr, Instant)>,
}

#[derive(Debug)]
struct Shared {
    config: AddressLimitsConfig,
    /// Time between two tokens.
    interval: Duration,
    /// How far ahead of now `full_at` may be for a connect to be within the rate: a full
    /// bucket holds `burst` tokens.
    tolerance: Duration,
    /// `burst` intervals: an idle address's bucket is full again this long after its last
    /// accepted connect at the latest.
    refill: Duration,
    table: Mutex<Table>,
}

/// Per-address accept buckets and connection counts; a cheap clone of an `Arc`.
#[derive(Debug, Clone)]
pub struct AddressLimits {
    shared: Arc<Shared>,
}

/// One connection's share of its address's limit; released on drop, however the connection
/// ends (a panicking connection task drops it too).
#[derive(Debug)]
pub struct AddressPermit {
    shared: Arc<Shared>,
    key: IpAddr,
}

impl AddressLimits {
    /// No address remembered yet.
    pub fn new(config: AddressLimitsConfig) -> AddressLimits {
        let rate = config.accept_rate_per_sec.max(1);
        let burst = config.accept_burst.max(1);
        let interval = Duration::from_secs(1) / rate;
        AddressLimits {
            shared: Arc::new(Shared {
                interval,
                tolerance: interval * (burst - 1),
                refill: interval * burst,
                config,
                table: Mutex::new(Table::default()),
            }),
        }
    }

    /// Admits a new connection from `ip` if its address is within its share of the accept rate
    /// and of connections, spending one of its tokens. The permit holds the connection's share
    /// until dropped. A refusal spends nothing.
    pub fn admit(&self, ip: IpAddr, now: Instant) -> Result<AddressPermit, AddressRefusal> {
        let shared = &self.shared;
        let key = address_key(ip);
        let mut table = shared.table();
        table.forget_idle(now, shared.refill);
        if !table.by_address.contains_key(&key)
            && table.by_address.len() >= shared.config.max_tracked
            && !table.forget_oldest_idle()
        {
            return Err(AddressRefusal::TableFull);
        }
        let Table { by_address, idle } = &mut *table;
        let entry = by_address.entry(key).or_insert(AddressEntry {
            connections: 0,
            full_at: now,
            queued: false,
        });
        let full_at = entry.full_at.max(now);
        let refusal = if full_at - now > shared.tolerance {
            Some(AddressRefusal::AcceptRate)
        } else if entry.connections >= shared.config.max_connections {
            Some(AddressRefusal::ConnectionLimit)
        } else {
            None
        };
        if let Some(refusal) = refusal {
            if entry.connections == 0 && !entry.queued {
                entry.queued = true;
                idle.push_back((key, now + shared.refill));
            }
            return Err(refusal);
        }
        entry.full_at = full_at + shared.interval;
        entry.connections += 1;
        Ok(AddressPermit {
            shared: shared.clone(),
            key,
        })
    }

    /// Addresses remembered now.
    pub fn tracked(&self) -> usize {
        self.shared.table().by_address.len()
    }

    /// Connections `ip`'s address holds now.
    pub fn connections(&self, ip: IpAddr) -> u32 {
        self.shared
            .table()
            .by_address
            .get(&address_key(ip))
            .map_or(0, |e| e.connections)
    }
}

impl Shared {
    fn table(&self) -> MutexGuard<'_, Table> {
        // Every critical section leaves the table consistent; a poisoned lock is recovered
        // rather than turned into a panic in a connection's drop.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Table {
    /// Forgets the queued addresses whose wait is over and that are idle and full again; those
    /// that connected meanwhile go back to the end of the queue.
    fn forget_idle(&mut self, now: Instant, refill: Duration) {
        while let Some(&(key, due)) = self.idle.front() {
            if due > now {
                return;
            }
            self.idle.pop_front();
            let Entry::Occupied(mut slot) = self.by_address.entry(key) else {
                continue;
            };
            let entry = slot.get_mut();
            entry.queued = false;
            if entry.connections > 0 {
                // Queued again when its last connection ends.
                continue;
            }
            if entry.full_at <= now {
                slot.remove();
            } else {
                entry.queued = true;
                self.idle.push_back((key, now + refill));
            }
        }
    }

    /// Makes room by forgetting the longest-queued address that holds no connection, even if
    /// its bucket is still refilling. False when no address can be forgotten.
    fn forget_oldest_idle(&mut self) -> bool {
        while let Some((key, _)) = self.idle.pop_front() {
            let Entry::Occupied(mut slot) = self.by_address.entry(key) else {
                continue;
            };
            if slot.get().connections == 0 {
                slot.remove();
                return true;
            }
            slot.get_mut().queued = false;
        }
        false
    }
}

impl Drop for AddressPermit {
    fn drop(&mut self) {
        let shared = &self.shared;
        let now = Instant::now();
        let mut table = shared.table();
        let Table { by_address, idle } = &mut *table;
        let Entry::Occupied(mut slot) = by_address.entry(self.key) else {
            return;
        };
        let entry = slot.get_mut();
        entry.connections = entry.connections.saturating_sub(1);
        if entry.connections > 0 {
            return;
        }
        if entry.full_at <= now && !entry.queued {
            slot.remove();
        } else if !entry.queued {
            entry.queued = true;
            idle.push_back((self.key, now + shared.refill));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv6_slash_64_is_one_address_and_mapped_ipv4_is_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa:bbbb:cccc:dddd".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(address_key(a), address_key(b));
        assert_ne!(address_key(a), address_key(c));
        let mapped: IpAddr = "::ffff:10.0.0.7".parse().unwrap();
        assert_eq!(address_key(mapped), "10.0.0.7".parse::<IpAddr>().unwrap());
        let v4: IpAddr = "127.0.0.2".parse().unwrap();
        assert_eq!(address_key(v4), v4);
    }
}

#[cfg(test)]
mod limit_tests {
    use super::*;

    fn limits(max_connections: u32, rate: u32, burst: u32, max_tracked: usize) -> AddressLimits {
        AddressLimits::new(AddressLimitsConfig {
            max_connections,
            accept_rate_per_sec: rate,
            accept_burst: burst,
            max_tracked,
        })
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_ipv6_slash_64_shares_one_connection_limit() {
        let l = limits(2, 1000, 1000, 100);
        let t0 = Instant::now();
        let _a = l.admit(ip("2001:db8:1:2::1"), t0).unwrap();
        let _b = l.admit(ip("2001:db8:1:2:ffff:eeee:dddd:cccc"), t0).unwrap();
        assert_eq!(
            l.admit(ip("2001:db8:1:2::3"), t0).unwrap_err(),
            AddressRefusal::ConnectionLimit,
            "a third host of the same /64 is the same address"
        );
        let _c = l
            .admit(ip("2001:db8:1:3::1"), t0)
            .expect("the next /64 is another address");
        assert_eq!(l.connections(ip("2001:db8:1:2::42")), 2);
        assert_eq!(l.tracked(), 2);
    }

    #[test]
    fn an_ipv6_slash_64_shares_one_accept_bucket() {
        let l = limits(100, 1, 2, 100);
        let t0 = Instant::now();
        let _a = l.admit(ip("2001:db8::1"), t0).unwrap();
        let _b = l.admit(ip("2001:db8::2"), t0).unwrap();
        assert_eq!(
            l.admit(ip("2001:db8::3"), t0).unwrap_err(),
            AddressRefusal::AcceptRate
        );
        let _other = l
            .admit(ip("2001:db8:0:1::1"), t0)
            .expect("another /64 has its own bucket");
        let _mapped = l
            .admit(ip("::ffff:192.0.2.1"), t0)
            .expect("first from 192.0.2.1");
        let _v4 = l.admit(ip("192.0.2.1"), t0).expect("second: burst 2");
        assert_eq!(
            l.admit(ip("192.0.2.1"), t0).unwrap_err(),
            AddressRefusal::AcceptRate,
            "mapped IPv4 and IPv4 are one address"
        );
    }

    #[test]
    fn the_bucket_refills_at_its_rate_and_refusals_spend_nothing() {
        let l = limits(100, 10, 3, 100);
        let a = ip("10.0.0.1");
        let t0 = Instant::now();
        let held: Vec<_> = (0..3).map(|_| l.admit(a, t0).unwrap()).collect();
        for _ in 0..5 {
            assert_eq!(l.admit(a, t0).unwrap_err(), AddressRefusal::AcceptRate);
        }
        let t1 = t0 + Duration::from_millis(100);
        let fourth = l.admit(a, t1).expect("one token after 100 ms at 10/s");
        assert_eq!(l.admit(a, t1).unwrap_err(), AddressRefusal::AcceptRate);
        assert_eq!(l.connections(a), 4);
        drop(held);
        drop(fourth);
        assert_eq!(l.connections(a), 0);
    }

    #[test]
    fn a_connection_limit_refusal_leaves_the_bucket_alone() {
        let l = limits(1, 1, 2, 100);
        let a = ip("10.0.0.1");
        let t0 = Instant::now();
        let first = l.admit(a, t0).unwrap();
        for _ in 0..10 {
            assert_eq!(l.admit(a, t0).unwrap_err(), AddressRefusal::ConnectionLimit);
        }
        drop(first);
        let _second = l
            .admit(a, t0)
            .expect("the slot is back and the refusals spent no tokens");
    }

    #[test]
    fn idle_addresses_are_forgotten_once_their_bucket_is_full() {
        let l = limits(10, 100, 10, 100);
        let t0 = Instant::now();
        for i in 0..50u8 {
            drop(l.admit(IpAddr::from([10, 0, 1, i]), t0).unwrap());
        }
        assert!(l.tracked() <= 50);
        // 10 tokens at 100/s: full again 100 ms later at the latest.
        let later = t0 + Duration::from_millis(200);
        let _other = l.admit(ip("10.0.2.1"), later).unwrap();
        assert_eq!(
            l.tracked(),
            1,
            "only the address holding a connection is left"
        );
    }

    #[test]
    fn the_table_is_bounded_and_forgets_idle_addresses_first() {
        let l = limits(10, 1, 10, 4);
        let t0 = Instant::now();
        let held: Vec<_> = (0..3u8)
            .map(|i| l.admit(IpAddr::from([10, 0, 0, i]), t0).unwrap())
            .collect();
        for i in 0..100u8 {
            // Idle but refilling (one token a second): forgotten only to make room.
            drop(l.admit(IpAddr::from([10, 0, 1, i]), t0).unwrap());
            assert!(l.tracked() <= 4);
        }
        let fourth = l.admit(ip("10.0.2.1"), t0).unwrap();
        assert_eq!(l.tracked(), 4);
        assert_eq!(
            l.admit(ip("10.0.2.2"), t0).unwrap_err(),
            AddressRefusal::TableFull,
            "every remembered address holds a connection"
        );
        assert_eq!(l.connections(ip("10.0.0.0")), 1);
        drop(held);
        drop(fourth);
        let _next = l
            .admit(ip("10.0.2.2"), t0)
            .expect("room once an address is idle");
    }
}
