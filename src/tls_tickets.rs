//! Stateless TLS session tickets: the rustls `ProducesTickets` that lets a reconnecting client
//! resume (TLS 1.3 PSK with a fresh ECDHE, TLS 1.2 tickets) without a certificate signature,
//! while the server keeps nothing per connection. A ticket is the session state rustls hands
//! over, sealed with AES-256-GCM under the key of the current rotation period:
//!
//! ```text
//! version (1 byte) | key id (4) | nonce (12, random) | ciphertext | tag (16)
//! ```
//!
//! The version and key id are the AEAD's associated data. Time is cut into periods of
//! `[tls] ticket_rotation_secs`; tickets are sealed with the current period's key and opened
//! with the current or the previous one (give or take [`MAX_CLOCK_SKEW_SECS`] so that nodes whose
//! clocks differ a little agree), so a ticket lives one to two periods and the lifetime
//! announced to clients says exactly when it stops working. Keys older than that are dropped.
//!
//! Where each period's 32-byte secret comes from ([`KeySource`]): random, made here when the
//! period starts (a single node: tickets do not survive a restart); derived with HKDF-SHA256
//! from an operator's secret file and the period index (every node with the file agrees, across
//! restarts; the file itself is never rotated by us); or installed by the cluster link, which
//! shares one random secret per period through the cluster's JetStream key-value bucket
//! (`cluster::tickets`). The AES key and the key id are derived from the period secret with
//! HKDF-SHA256.
//!
//! Client-supplied tickets are parsed here, so this code never panics on any input (the
//! `tls_ticket` fuzz target), refuses anything outside [`MIN_TICKET_BYTES`]..=
//! [`MAX_TICKET_BYTES`] before decrypting, and answers every refusal with `None`: rustls then
//! runs a full handshake. How long a refusal takes depends only on the ticket's length and
//! whether its key id names a live key, both public, never on secret data. This module does no
//! I/O beyond reading the secret file once at start.

use std::fmt;
use std::ops::RangeInclusive;
use std::path::Path;
use std::sync::{Arc, RwLock};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};

use crate::config::TlsConfig;
use crate::metrics as m;

/// The format byte every ticket starts with.
pub const TICKET_VERSION: u8 = 1;
/// Bytes of the key id that names the period key a ticket was sealed with.
pub const KEY_ID_BYTES: usize = 4;
/// Version, key id and nonce.
pub const HEADER_BYTES: usize = 1 + KEY_ID_BYTES + NONCE_LEN;
/// The AES-GCM tag.
pub const TAG_BYTES: usize = 16;
/// The largest session state sealed into a ticket. rustls's state for this server (no client
/// certificates) is about 100 bytes plus the SNI name and ALPN id; larger state gets no ticket.
pub const MAX_STATE_BYTES: usize = 1024;
/// The shortest ticket that can open (an empty state).
pub const MIN_TICKET_BYTES: usize = HEADER_BYTES + TAG_BYTES;
/// The longest ticket looked at; anything longer is refused before decrypting.
pub const MAX_TICKET_BYTES: usize = HEADER_BYTES + MAX_STATE_BYTES + TAG_BYTES;
/// Bytes of a period secret.
pub const SECRET_BYTES: usize = 32;
/// Clock difference between nodes that tickets tolerate at a period boundary.
pub const MAX_CLOCK_SKEW_SECS: u64 = 60;
/// Shortest rotation period accepted by the configuration.
pub const MIN_ROTATION_SECS: u64 = 600;
/// Longest rotation period: two periods stay within TLS 1.3's 7-day ticket lifetime cap.
pub const MAX_ROTATION_SECS: u64 = 302_400;
/// The default rotation period (6 hours): a ticket lives 6 to 12 hours.
pub const DEFAULT_ROTATION_SECS: u64 = 21_600;
/// Fewest bytes of secret a secret file must hold (after trimming whitespace).
pub const MIN_SECRET_FILE_BYTES: usize = 32;
/// Most bytes read from a secret file.
pub const MAX_SECRET_FILE_BYTES: usize = 4096;
/// Most period keys held: previous, current and next, plus one while a boundary passes.
const MAX_LIVE_KEYS: usize = 4;
/// TLS 1.3's cap on an announced ticket lifetime (RFC 8446, 4.6.1).
const MAX_LIFETIME_SECS: u64 = 604_800;

const PERIOD_INFO: &[u8] = b"presenced tls ticket period v1";
const KEY_SALT: &[u8] = b"presenced tls ticket key v1";

/// Why ticket keys could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TicketError {
    /// The secret file could not be read.
    #[error("cannot read tls.ticket_secret_file {path}: {detail}")]
    SecretFile {
        /// The file.
        path: String,
        /// What went wrong.
        detail: String,
    },
    /// The system random generator failed.
    #[error("the system random generator failed")]
    Random,
}

/// Where period secrets come from.
pub enum KeySource {
    /// Random per period, made here when a period starts: tickets are this process's only.
    Random,
    /// Derived from an operator's secret (the pseudo-random key extracted from it).
    Derived(hkdf::Prk),
    /// Installed by the cluster link ([`TicketKeys::install`]); a period with none issues no
    /// tickets.
    Shared,
}

impl fmt::Debug for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeySource::Random => "Random",
            KeySource::Derived(_) => "Derived",
            KeySource::Shared => "Shared",
        })
    }
}

/// A period secret, wiped when dropped (best effort: ring's expanded AES key is not).
struct Secret([u8; SECRET_BYTES]);

impl Drop for Secret {
    fn drop(&mut self) {
        self.0.fill(0);
        // Keeps the stores above from being optimised away as dead (best effort, no unsafe).
        std::hint::black_box(&self.0);
    }
}

/// One period's key.
struct PeriodKey {
    period: u64,
    id: [u8; KEY_ID_BYTES],
    aead: LessSafeKey,
    /// Kept so the cluster link can publish it again if the bucket lost it.
    secret: Secret,
}

/// HKDF output of `n` bytes.
struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

impl PeriodKey {
    fn new(period: u64, secret: [u8; SECRET_BYTES]) -> PeriodKey {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, KEY_SALT).extract(&secret);
        let mut id = [0u8; KEY_ID_BYTES];
        // HKDF-Expand fails only when asked for more than 255 hash lengths; 4 and 32 bytes are
        // far below that.
        prk.expand(&[b"key id"], Len(KEY_ID_BYTES))
            .and_then(|okm| okm.fill(&mut id))
            .expect("HKDF output of 4 bytes");
        let unbound: UnboundKey = prk
            .expand(&[b"aes-256-gcm key"], &AES_256_GCM)
            .expect("HKDF output of 32 bytes")
            .into();
        PeriodKey {
            period,
            id,
            aead: LessSafeKey::new(unbound),
            secret: Secret(secret),
        }
    }
}

/// The ticket keys of one server: a cheap handle (`Arc`) shared by the rustls configuration
/// and, in cluster mode, the link that installs the shared secrets.
pub struct TicketKeys {
    rotation_secs: u64,
    source: KeySource,
    /// The live period keys, at most [`MAX_LIVE_KEYS`]; held for microseconds.
    live: RwLock<Vec<Arc<PeriodKey>>>,
    rng: SystemRandom,
}

impl fmt::Debug for TicketKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let periods: Vec<u64> = self.read().iter().map(|k| k.period).collect();
        f.debug_struct("TicketKeys")
            .field("rotation_secs", &self.rotation_secs)
            .field("source", &self.source)
            .field("live_periods", &periods)
            .finish()
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Reads an operator's ticket secret: the file's bytes with surrounding ASCII whitespace
/// trimmed (so a trailing newline does not make two nodes disagree), at least
/// [`MIN_SECRET_FILE_BYTES`], at most [`MAX_SECRET_FILE_BYTES`].
pub fn read_secret_file(path: &Path) -> Result<Vec<u8>, TicketError> {
    use std::io::Read;
    let err = |detail: String| TicketError::SecretFile {
        path: path.display().to_string(),
        detail,
    };
    let file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = file.metadata() {
            if meta.permissions().mode() & 0o044 != 0 {
                tracing::warn!(
                    path = %path.display(),
                    "tls.ticket_secret_file is readable by group or others; whoever reads it can \
                     decrypt TLS 1.2 sessions resumed with its tickets"
                );
            }
        }
    }
    let mut bytes = Vec::new();
    file.take(MAX_SECRET_FILE_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| err(e.to_string()))?;
    if bytes.len() > MAX_SECRET_FILE_BYTES {
        return Err(err(format!("larger than {MAX_SECRET_FILE_BYTES} bytes")));
    }
    let trimmed = bytes.trim_ascii();
    if trimmed.len() < MIN_SECRET_FILE_BYTES {
        return Err(err(format!(
            "holds {} bytes; at least {MIN_SECRET_FILE_BYTES} are needed (e.g. `openssl rand \
             -base64 48`)",
            trimmed.len()
        )));
    }
    Ok(trimmed.to_vec())
}

impl TicketKeys {
    /// Keys for `config`: `None` when `tickets = false`; derived from `ticket_secret_file` when
    /// set; else shared through the cluster when `clustered`, random per period otherwise.
    pub fn from_config(
        config: &TlsConfig,
        clustered: bool,
    ) -> Result<Option<Arc<TicketKeys>>, TicketError> {
        if !config.tickets {
            return Ok(None);
        }
        let source = match &config.ticket_secret_file {
            Some(path) => KeySource::Derived(derive_root(&read_secret_file(path)?)),
            None if clustered => KeySource::Shared,
            None => KeySource::Random,
        };
        Ok(Some(Arc::new(TicketKeys::new(
            source,
            config.ticket_rotation_secs,
        ))))
    }

    /// Keys from `source` rotating every `rotation_secs`, clamped to
    /// [`MIN_ROTATION_SECS`]..=[`MAX_ROTATION_SECS`] (so the accepted window never spans more
    /// than three periods).
    pub fn new(source: KeySource, rotation_secs: u64) -> TicketKeys {
        TicketKeys {
            rotation_secs: rotation_secs.clamp(MIN_ROTATION_SECS, MAX_ROTATION_SECS),
            source,
            live: RwLock::new(Vec::with_capacity(MAX_LIVE_KEYS)),
            rng: SystemRandom::new(),
        }
    }

    /// Keys derived from `secret` (any length; at least 32 random bytes for real use).
    pub fn derived(secret: &[u8], rotation_secs: u64) -> TicketKeys {
        TicketKeys::new(KeySource::Derived(derive_root(secret)), rotation_secs)
    }

    /// The rotation period in seconds.
    pub fn rotation_secs(&self) -> u64 {
        self.rotation_secs
    }

    /// True when the cluster link must install the period secrets.
    pub fn is_shared(&self) -> bool {
        matches!(self.source, KeySource::Shared)
    }

    /// The period `now` falls in.
    pub fn period(&self, now: u64) -> u64 {
        now / self.rotation_secs
    }

    /// The periods whose tickets are accepted at `now`: the current and the previous one,
    /// widened by [`MAX_CLOCK_SKEW_SECS`] on both sides.
    pub fn accepted_periods(&self, now: u64) -> RangeInclusive<u64> {
        let first = self
            .period(now.saturating_sub(MAX_CLOCK_SKEW_SECS))
            .saturating_sub(1);
        first..=self.period(now.saturating_add(MAX_CLOCK_SKEW_SECS))
    }

    /// Seconds a ticket sealed at `now` stays valid: until its period's successor ends.
    pub fn lifetime_at(&self, now: u64) -> u32 {
        let end = self
            .period(now)
            .saturating_add(2)
            .saturating_mul(self.rotation_secs);
        end.saturating_sub(now).clamp(1, MAX_LIFETIME_SECS) as u32
    }

    /// The periods the cluster link keeps in the bucket at `now`: (period, create when absent).
    /// The previous period is only read (a node that starts late still accepts its tickets);
    /// the current one and the next (made a period ahead, so a NATS outage shorter than a
    /// period never leaves a boundary without a key) are created when missing.
    pub fn wanted_periods(&self, now: u64) -> [(u64, bool); 3] {
        let p = self.period(now);
        [
            (p.saturating_sub(1), false),
            (p, true),
            (p.saturating_add(1), true),
        ]
    }

    /// Installs the secret of `period` (cluster mode), replacing what was there. Periods no
    /// longer accepted, or further ahead than the next one, are ignored.
    pub fn install(&self, period: u64, secret: [u8; SECRET_BYTES], now: u64) {
        let accepted = self.accepted_periods(now);
        if period < *accepted.start() || period > self.period(now).saturating_add(1) {
            return;
        }
        if let Some(key) = self.find(period) {
            if key.secret.0 == secret {
                return;
            }
        }
        self.insert(PeriodKey::new(period, secret), now);
    }

    /// The secret held for `period`, if any (the cluster link republishes it when the bucket
    /// lost it).
    pub fn secret(&self, period: u64) -> Option<[u8; SECRET_BYTES]> {
        self.find(period).map(|k| k.secret.0)
    }

    /// A fresh random secret.
    pub fn random_secret(&self) -> Result<[u8; SECRET_BYTES], TicketError> {
        let mut secret = [0u8; SECRET_BYTES];
        self.rng
            .fill(&mut secret)
            .map_err(|_| TicketError::Random)?;
        Ok(secret)
    }

    /// The periods of the keys held now, oldest first.
    pub fn live_periods(&self) -> Vec<u64> {
        let mut periods: Vec<u64> = self.read().iter().map(|k| k.period).collect();
        periods.sort_unstable();
        periods
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<PeriodKey>>> {
        self.live.read().unwrap_or_else(|p| p.into_inner())
    }

    fn find(&self, period: u64) -> Option<Arc<PeriodKey>> {
        self.read().iter().find(|k| k.period == period).cloned()
    }

    /// Adds `key`, drops keys no longer accepted at `now` and keeps at most
    /// [`MAX_LIVE_KEYS`] (the oldest go first).
    fn insert(&self, key: PeriodKey, now: u64) -> Arc<PeriodKey> {
        let key = Arc::new(key);
        let oldest = *self.accepted_periods(now).start();
        let mut live = self.live.write().unwrap_or_else(|p| p.into_inner());
        live.retain(|k| k.period != key.period && k.period >= oldest);
        live.push(key.clone());
        live.sort_unstable_by_key(|k| k.period);
        while live.len() > MAX_LIVE_KEYS {
            live.remove(0);
        }
        key
    }

    /// The key of `period`, made when the source can make it.
    fn key_for(&self, period: u64, now: u64) -> Option<Arc<PeriodKey>> {
        if let Some(key) = self.find(period) {
            return Some(key);
        }
        let secret = match &self.source {
            KeySource::Shared => return None,
            // Only the current period's key is ever made at random: a ticket naming another
            // period cannot have been sealed by this process.
            KeySource::Random if period != self.period(now) => return None,
            KeySource::Random => self.random_secret().ok()?,
            KeySource::Derived(root) => derive_period(root, self.rotation_secs, period),
        };
        Some(self.insert(PeriodKey::new(period, secret), now))
    }

    /// Seals `state` into a ticket with the key of the period `now` falls in; `None` when the
    /// state is too large or there is no key (cluster mode before the secret arrives).
    pub fn seal_at(&self, state: &[u8], now: u64) -> Option<Vec<u8>> {
        let sealed = self.seal_inner(state, now);
        let result = if sealed.is_some() {
            "issued"
        } else {
            "not_issued"
        };
        metrics::counter!(m::TLS_TICKETS, "result" => result).increment(1);
        sealed
    }

    fn seal_inner(&self, state: &[u8], now: u64) -> Option<Vec<u8>> {
        if state.len() > MAX_STATE_BYTES {
            return None;
        }
        let key = self.key_for(self.period(now), now)?;
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let mut ticket = Vec::with_capacity(HEADER_BYTES + state.len() + TAG_BYTES);
        ticket.push(TICKET_VERSION);
        ticket.extend_from_slice(&key.id);
        ticket.extend_from_slice(&nonce);
        ticket.extend_from_slice(state);
        let (header, body) = ticket.split_at_mut(HEADER_BYTES);
        let tag = key
            .aead
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&header[..1 + KEY_ID_BYTES]),
                body,
            )
            .ok()?;
        ticket.extend_from_slice(tag.as_ref());
        Some(ticket)
    }

    /// Opens `ticket` at `now`: the session state, or `None` for anything that is not a ticket
    /// sealed by a key accepted now.
    pub fn open_at(&self, ticket: &[u8], now: u64) -> Option<Vec<u8>> {
        let (opened, result) = self.open_inner(ticket, now);
        metrics::counter!(m::TLS_TICKETS, "result" => result).increment(1);
        opened
    }

    fn open_inner(&self, ticket: &[u8], now: u64) -> (Option<Vec<u8>>, &'static str) {
        if !(MIN_TICKET_BYTES..=MAX_TICKET_BYTES).contains(&ticket.len())
            || ticket[0] != TICKET_VERSION
        {
            return (None, "invalid");
        }
        let (header, body) = ticket.split_at(HEADER_BYTES);
        let id = &header[1..1 + KEY_ID_BYTES];
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&header[1 + KEY_ID_BYTES..]);
        let mut candidates: Vec<Arc<PeriodKey>> = Vec::with_capacity(MAX_LIVE_KEYS);
        for period in self.accepted_periods(now) {
            // Derived keys are made on demand (a restarted node accepts the tickets of the
            // previous period); random and shared ones exist or do not.
            let key = match self.source {
                KeySource::Derived(_) => self.key_for(period, now),
                _ => self.find(period),
            };
            if let Some(key) = key {
                if key.id == id {
                    candidates.push(key);
                }
            }
        }
        if candidates.is_empty() {
            return (None, "unknown_key");
        }
        // Two live keys share an id with probability 2^-32; both are tried then.
        for key in candidates {
            let mut buf = body.to_vec();
            if let Ok(plain) = key.aead.open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&header[..1 + KEY_ID_BYTES]),
                &mut buf,
            ) {
                let n = plain.len();
                buf.truncate(n);
                return (Some(buf), "decrypted");
            }
        }
        (None, "invalid")
    }
}

impl rustls::server::ProducesTickets for TicketKeys {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        self.lifetime_at(unix_now())
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.seal_at(plain, unix_now())
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.open_at(cipher, unix_now())
    }
}

/// HKDF-Extract of an operator's secret.
fn derive_root(secret: &[u8]) -> hkdf::Prk {
    hkdf::Salt::new(hkdf::HKDF_SHA256, PERIOD_INFO).extract(secret)
}

/// The secret of `period` derived from `root`; the rotation is part of the input so nodes
/// configured with different periods never mistake each other's keys for their own.
fn derive_period(root: &hkdf::Prk, rotation_secs: u64, period: u64) -> [u8; SECRET_BYTES] {
    let mut secret = [0u8; SECRET_BYTES];
    let (rotation, period) = (rotation_secs.to_be_bytes(), period.to_be_bytes());
    root.expand(&[b"period", &rotation, &period], Len(SECRET_BYTES))
        .and_then(|okm| okm.fill(&mut secret))
        .expect("HKDF output of 32 bytes");
    secret
}

#[cfg(test)]
mod tests {
    use super::*;

    const R: u64 = 3600;
    /// The start of period 1000.
    const T0: u64 = 1000 * R;

    fn keys() -> TicketKeys {
        TicketKeys::derived(b"0123456789abcdef0123456789abcdef", R)
    }

    #[test]
    fn a_ticket_opens_to_what_was_sealed() {
        let keys = keys();
        let state = b"session state".to_vec();
        let ticket = keys.seal_at(&state, T0 + 5).unwrap();
        assert_eq!(ticket.len(), HEADER_BYTES + state.len() + TAG_BYTES);
        assert_eq!(ticket[0], TICKET_VERSION);
        assert_eq!(keys.open_at(&ticket, T0 + 6), Some(state.clone()));
        // Random nonces: the same state never gives the same ticket.
        assert_ne!(keys.seal_at(&state, T0 + 5).unwrap(), ticket);
        // An empty state is a valid (shortest) ticket.
        let empty = keys.seal_at(b"", T0).unwrap();
        assert_eq!(empty.len(), MIN_TICKET_BYTES);
        assert_eq!(keys.open_at(&empty, T0), Some(Vec::new()));
    }

    #[test]
    fn tickets_open_in_their_period_and_the_next_and_never_after() {
        let keys = keys();
        let ticket = keys.seal_at(b"s", T0 + R - 1).unwrap();
        assert!(keys.open_at(&ticket, T0).is_some(), "current period");
        assert!(
            keys.open_at(&ticket, T0 + 2 * R - 1).is_some(),
            "next period"
        );
        assert!(
            keys.open_at(&ticket, T0 + 2 * R + MAX_CLOCK_SKEW_SECS - 1)
                .is_some(),
            "a node whose clock is a little ahead"
        );
        assert!(
            keys.open_at(&ticket, T0 + 2 * R + MAX_CLOCK_SKEW_SECS)
                .is_none(),
            "two periods later"
        );
        assert!(keys.open_at(&ticket, T0 + 10 * R).is_none());
        // A node whose clock is a little behind accepts a ticket from the next period...
        let early = keys.seal_at(b"s", T0 + R).unwrap();
        assert!(keys.open_at(&early, T0 + R - MAX_CLOCK_SKEW_SECS).is_some());
        // ...but not one from further ahead.
        assert!(keys
            .open_at(&early, T0 + R - MAX_CLOCK_SKEW_SECS - 1)
            .is_none());
        assert!(keys.live_periods().len() <= MAX_LIVE_KEYS);
    }

    #[test]
    fn the_lifetime_announced_is_when_the_ticket_stops_opening() {
        let keys = keys();
        assert_eq!(keys.lifetime_at(T0), 2 * R as u32);
        assert_eq!(keys.lifetime_at(T0 + R - 1), R as u32 + 1);
        let long = TicketKeys::derived(b"x", MAX_ROTATION_SECS);
        assert!(u64::from(long.lifetime_at(0)) <= MAX_LIFETIME_SECS);
    }

    #[test]
    fn tampered_short_oversized_and_foreign_tickets_are_refused() {
        let keys = keys();
        let ticket = keys.seal_at(b"session state", T0).unwrap();
        for i in 0..ticket.len() {
            let mut bad = ticket.clone();
            bad[i] ^= 0x01;
            assert_eq!(keys.open_at(&bad, T0), None, "byte {i} flipped");
        }
        assert_eq!(keys.open_at(&ticket[..ticket.len() - 1], T0), None);
        assert_eq!(keys.open_at(&[], T0), None);
        assert_eq!(keys.open_at(&ticket[..MIN_TICKET_BYTES - 1], T0), None);
        let mut long = ticket.clone();
        long.resize(MAX_TICKET_BYTES + 1, 0);
        assert_eq!(keys.open_at(&long, T0), None);
        assert!(keys.seal_at(&vec![0; MAX_STATE_BYTES + 1], T0).is_none());
        let max = keys.seal_at(&vec![7; MAX_STATE_BYTES], T0).unwrap();
        assert_eq!(max.len(), MAX_TICKET_BYTES);
        assert!(keys.open_at(&max, T0).is_some());
        let other = TicketKeys::derived(b"another secret, another cluster!", R);
        assert_eq!(other.open_at(&ticket, T0), None);
        let random = TicketKeys::new(KeySource::Random, R);
        assert_eq!(random.open_at(&ticket, T0), None);
    }

    #[test]
    fn the_same_secret_file_gives_every_node_the_same_keys_but_not_across_rotations() {
        let a = keys();
        let b = keys();
        let ticket = a.seal_at(b"s", T0).unwrap();
        assert!(b.open_at(&ticket, T0 + 1).is_some());
        // A restarted node accepts the tickets of the period before it started.
        let restarted = keys();
        assert!(restarted.open_at(&ticket, T0 + R + 1).is_some());
        let other_rotation = TicketKeys::derived(b"0123456789abcdef0123456789abcdef", R / 2);
        assert!(other_rotation.open_at(&ticket, T0).is_none());
    }

    #[test]
    fn random_keys_rotate_and_forget() {
        let keys = TicketKeys::new(KeySource::Random, R);
        let first = keys.seal_at(b"s", T0).unwrap();
        let second = keys.seal_at(b"s", T0 + R).unwrap();
        assert_ne!(first[1..5], second[1..5], "a new key id each period");
        assert!(keys.open_at(&first, T0 + R).is_some());
        let third = keys
            .seal_at(b"s", T0 + 2 * R + MAX_CLOCK_SKEW_SECS)
            .unwrap();
        assert!(keys
            .open_at(&first, T0 + 2 * R + MAX_CLOCK_SKEW_SECS)
            .is_none());
        assert!(keys.open_at(&second, T0 + 2 * R).is_some());
        assert!(keys
            .open_at(&third, T0 + 2 * R + MAX_CLOCK_SKEW_SECS)
            .is_some());
        assert_eq!(
            keys.live_periods(),
            vec![1001, 1002],
            "period 1000 is erased"
        );
    }

    #[test]
    fn shared_keys_issue_nothing_until_installed_and_agree_once_installed() {
        let now = T0 + R / 2;
        let a = TicketKeys::new(KeySource::Shared, R);
        let b = TicketKeys::new(KeySource::Shared, R);
        assert!(a.seal_at(b"s", now).is_none(), "no secret yet: no ticket");
        let secret = a.random_secret().unwrap();
        a.install(1000, secret, now);
        b.install(1000, secret, now);
        let ticket = a.seal_at(b"s", now).unwrap();
        assert_eq!(b.open_at(&ticket, now), Some(b"s".to_vec()));
        assert_eq!(a.secret(1000), Some(secret));
        // Out-of-window periods are not installed; the previous and the next one are.
        a.install(998, secret, now);
        a.install(1002, secret, now);
        a.install(999, a.random_secret().unwrap(), now);
        a.install(1001, a.random_secret().unwrap(), now);
        assert_eq!(a.live_periods(), vec![999, 1000, 1001]);
        // A replaced secret replaces the key.
        a.install(1000, a.random_secret().unwrap(), now);
        assert!(a.open_at(&ticket, now).is_none());
        assert_eq!(
            a.wanted_periods(now),
            [(999, false), (1000, true), (1001, true)]
        );
    }

    #[test]
    fn secret_files_are_trimmed_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ticket.key");
        std::fs::write(&path, "  0123456789abcdef0123456789abcdef\n").unwrap();
        assert_eq!(
            read_secret_file(&path).unwrap(),
            b"0123456789abcdef0123456789abcdef"
        );
        std::fs::write(&path, "short\n").unwrap();
        let err = read_secret_file(&path).unwrap_err().to_string();
        assert!(err.contains("at least 32"), "{err}");
        std::fs::write(&path, vec![b'a'; MAX_SECRET_FILE_BYTES + 1]).unwrap();
        assert!(read_secret_file(&path).is_err());
        assert!(read_secret_file(&dir.path().join("missing")).is_err());
    }
}
