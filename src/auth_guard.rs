//! Per-address protections. Brute force on Connect: failed authentications within a window make
//! later refusals slower, and too many ban the address for a while (SPEC §8: 10 in a minute → 5
//! minutes). The guard is synchronous and bounded: at most `max_tracked` addresses are
//! remembered; when full, entries that are neither banned nor recent are dropped first, and if
//! none can be, a new address is not tracked (the guard fails open rather than grow).
//! Handshake slots: one address may hold only so many of the global TLS handshake slots, and
//! its further handshakes wait for one of its own, so a single source cannot starve everyone
//! else.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

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

/// Bounds TLS handshakes in flight per address; share it behind an `Arc`. Beyond the bound, a
/// handshake waits for one of its own address's slots (under the caller's deadline), so one
/// address can never take every global slot, yet many clients behind one address (a carrier
/// NAT reconnecting after an outage) are served in turn rather than refused.
#[derive(Debug)]
pub struct AddressSlots {
    max_per_address: u32,
    /// Per address: its slots, and how many handshakes hold or wait for one. Only addresses
    /// with such a handshake are present, so the map is bounded by the connection limit.
    by_address: Mutex<HashMap<IpAddr, (Arc<Semaphore>, u32)>>,
}

/// A handshake's claim on its address: waiting for a slot, then holding it. Released on drop.
#[derive(Debug)]
pub struct AddressSlot<'a> {
    slots: &'a AddressSlots,
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

    /// Waits for a slot of `ip`. Cancel-safe: dropping the future gives up the claim.
    pub async fn take(&self, ip: IpAddr) -> AddressSlot<'_> {
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
}
