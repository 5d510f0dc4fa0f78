//! Per-address protections. Brute force on Connect: failed authentications within a window make
//! later refusals slower, and too many ban the address for a while (SPEC §8: 10 in a minute → 5
//! minutes). Handshake slots: one address may hold only so many of the global TLS handshake
//! slots, so a single source cannot starve everyone else. Synchronous and bounded: at most `max_tracked` addresses are remembered;
//! when full, entries that are neither banned nor recent are dropped first, and if none can be,
//! a new address is not tracked (the guard fails open rather than grow).

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

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

#[derive(Debug, Default)]
struct Record {
    /// Recent failure times, oldest first, at most `failures_before_ban`.
    failures: VecDeque<Instant>,
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

    fn idle(&self) -> bool {
        self.failures.is_empty() && self.banned_until.is_none()
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

/// Per-address failure tracking; share it behind an `Arc`.
#[derive(Debug)]
pub struct AuthGuard {
    config: AuthGuardConfig,
    records: Mutex<HashMap<IpAddr, Record>>,
}

impl AuthGuard {
    /// An empty guard.
    pub fn new(config: AuthGuardConfig) -> AuthGuard {
        AuthGuard {
            config,
            records: Mutex::new(HashMap::new()),
        }
    }

    fn records(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Record>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `Err(remaining)` while `ip` is banned.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let mut records = self.records();
        let Some(record) = records.get_mut(&ip) else {
            return Ok(());
        };
        record.prune(now, self.config.window);
        match record.banned_until {
            Some(until) => Err(until.saturating_duration_since(now)),
            None => Ok(()),
        }
    }

    /// Records a failed authentication from `ip`.
    pub fn record_failure(&self, ip: IpAddr, now: Instant) -> Refusal {
        let mut records = self.records();
        if !records.contains_key(&ip) && records.len() >= self.config.max_tracked {
            records.retain(|_, r| {
                r.prune(now, self.config.window);
                !r.idle()
            });
            if records.len() >= self.config.max_tracked {
                return Refusal {
                    delay: self.config.delay_per_failure,
                    banned: false,
                };
            }
        }
        let record = records.entry(ip).or_default();
        record.prune(now, self.config.window);
        record.failures.push_back(now);
        while record.failures.len() > self.config.failures_before_ban as usize {
            record.failures.pop_front();
        }
        let recent = record.failures.len() as u32;
        let banned = recent >= self.config.failures_before_ban && record.banned_until.is_none();
        if banned {
            record.banned_until = Some(now + self.config.ban);
            record.failures.clear();
        }
        Refusal {
            delay: (self.config.delay_per_failure * recent).min(self.config.max_delay),
            banned,
        }
    }

    /// Addresses currently remembered.
    pub fn tracked(&self) -> usize {
        self.records().len()
    }
}

/// Counts TLS handshakes in flight per address; share it behind an `Arc`.
#[derive(Debug)]
pub struct AddressSlots {
    max_per_address: u32,
    in_flight: Mutex<HashMap<IpAddr, u32>>,
}

/// One handshake slot of an address; released on drop.
#[derive(Debug)]
pub struct AddressSlot<'a> {
    slots: &'a AddressSlots,
    ip: IpAddr,
}

impl AddressSlots {
    /// At most `max_per_address` handshakes in flight per address.
    pub fn new(max_per_address: u32) -> AddressSlots {
        AddressSlots {
            max_per_address,
            in_flight: Mutex::new(HashMap::new()),
        }
    }

    fn in_flight(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, u32>> {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot for `ip`, or `None` when it already holds the maximum. The map holds only
    /// addresses with a handshake in flight, so it is bounded by the connection limit.
    pub fn try_take(&self, ip: IpAddr) -> Option<AddressSlot<'_>> {
        let mut in_flight = self.in_flight();
        let count = in_flight.entry(ip).or_insert(0);
        if *count >= self.max_per_address {
            return None;
        }
        *count += 1;
        Some(AddressSlot { slots: self, ip })
    }
}

impl Drop for AddressSlot<'_> {
    fn drop(&mut self) {
        let mut in_flight = self.slots.in_flight();
        if let Some(count) = in_flight.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                in_flight.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod slot_tests {
    use super::*;

    #[test]
    fn an_address_gets_at_most_its_share_and_slots_come_back() {
        let slots = AddressSlots::new(2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let first = slots.try_take(a).unwrap();
        let _second = slots.try_take(a).unwrap();
        assert!(slots.try_take(a).is_none());
        assert!(slots.try_take("10.0.0.2".parse().unwrap()).is_some());
        drop(first);
        assert!(slots.try_take(a).is_some());
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
}
