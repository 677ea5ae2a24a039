//! Rate limiting: a token bucket per client key, shared by all workers, in bounded memory.
//!
//! Each key has a bucket of capacity `burst_size` that refills at `requests_per_minute / 60` tokens per second; a
//! request takes one token or is refused (429). Buckets live in shared data so every worker draws from the same one,
//! updated with compare-and-swap. Memory is bounded by a fixed number of slots: a key hashes to a home slot and may use
//! any of the next [`PROBES`]; a slot is reused when it is empty, when its bucket is full again (a full bucket is the
//! same as no bucket, so reusing it loses nothing), or, as a last resort, the least recently used one is evicted (its
//! client then starts with a fresh bucket, as with NGINX's LRU eviction). A flood of distinct keys therefore cannot grow
//! memory, and cannot evict an active client unless every probed slot is active.
//!
//! A busy key's tokens are taken ahead: a worker takes up to what the key earns in [`LEASE_MS`] (at most an eighth
//! of its burst) in one shared update and spends them locally for at most [`LEASE_MS`] ([`Leases`]), so a client
//! sending thousands of requests a second costs a shared read and write per batch instead of per request. Nothing is
//! admitted that was not taken from the bucket first, so from any start the admitted count never exceeds burst plus
//! refill; a worker's unspent tokens are dropped when their lease ends (the client may be refused a little early,
//! never let through late). A limit under 20 requests a second is taken one token at a time.
//!
//! Tokens are kept in millionths so refill is exact in integers. Time is an argument.

use std::collections::HashMap;

use crate::shared::{SharedStore, UpdateError, keys, update_from};

/// Slots examined per key.
pub const PROBES: u32 = 4;
const UNIT: u128 = 1_000_000;
/// How long a worker may spend tokens it took ahead, and how much of a key's rate it takes at once.
pub const LEASE_MS: u64 = 50;
/// Keys a worker holds tokens for; beyond this (a flood of busy keys) requests take one token at a time.
pub const MAX_LEASES: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub requests_per_minute: u64,
    pub burst_size: u64,
    pub slots: u32,
}

impl Limits {
    /// Tokens a worker takes at once: what a key earns in [`LEASE_MS`], at most an eighth of the burst, at least one.
    pub fn batch(&self) -> u64 {
        (self.requests_per_minute.saturating_mul(LEASE_MS) / 60_000).min(self.burst_size / 8).max(1)
    }
}

/// The tokens one worker took ahead, per key hash, each usable until its lease ends.
#[derive(Debug, Default)]
pub struct Leases {
    held: HashMap<u64, Lease>,
    /// When the first of the held leases ends: before then a full set has nothing to drop.
    first_end_ms: u64,
}

#[derive(Debug, Clone, Copy)]
struct Lease {
    tokens: u64,
    until_ms: u64,
}

impl Lease {
    fn is_on(&self, now_ms: u64) -> bool {
        self.tokens > 0 && now_ms < self.until_ms
    }
}

impl Leases {
    /// Spends a token held for `key`, if its lease is still on.
    fn spend(&mut self, key: u64, now_ms: u64) -> Option<u64> {
        let lease = self.held.get_mut(&key)?;
        if !lease.is_on(now_ms) {
            self.held.remove(&key);
            return None;
        }
        lease.tokens -= 1;
        let left = lease.tokens;
        if left == 0 {
            // spent: no room held for it (a full set then only waits for ends, see `has_room`)
            self.held.remove(&key);
        }
        Some(left)
    }

    /// Whether a new lease fits (ended ones are dropped first, at most once per lease ending while full).
    fn has_room(&mut self, now_ms: u64) -> bool {
        if self.held.len() >= MAX_LEASES && now_ms >= self.first_end_ms {
            self.held.retain(|_, l| l.is_on(now_ms));
            self.first_end_ms = self.held.values().map(|l| l.until_ms).min().unwrap_or(0);
        }
        self.held.len() < MAX_LEASES
    }

    fn keep(&mut self, key: u64, tokens: u64, now_ms: u64) {
        if tokens > 0 {
            let until_ms = now_ms.saturating_add(LEASE_MS);
            if self.held.is_empty() || until_ms < self.first_end_ms {
                self.first_end_ms = until_ms;
            }
            self.held.insert(key, Lease { tokens, until_ms });
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.held.len()
    }
}

/// One bucket: owner key hash, tokens in millionths, last refill time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    pub key: u64,
    pub micro_tokens: u64,
    pub last_ms: u64,
}

impl Bucket {
    pub fn full(key: u64, limits: &Limits, now_ms: u64) -> Bucket {
        Bucket { key, micro_tokens: capacity(limits), last_ms: now_ms }
    }

    pub fn encode(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[..8].copy_from_slice(&self.key.to_le_bytes());
        b[8..16].copy_from_slice(&self.micro_tokens.to_le_bytes());
        b[16..].copy_from_slice(&self.last_ms.to_le_bytes());
        b
    }

    pub fn decode(bytes: &[u8]) -> Option<Bucket> {
        let word = |i: usize| bytes.get(i * 8..i * 8 + 8).and_then(|s| s.try_into().ok()).map(u64::from_le_bytes);
        Some(Bucket { key: word(0)?, micro_tokens: word(1)?, last_ms: word(2)? })
    }

    /// Adds the tokens earned since `last_ms`, up to capacity.
    pub fn refill(&mut self, limits: &Limits, now_ms: u64) {
        let elapsed = u128::from(now_ms.saturating_sub(self.last_ms));
        let earned = elapsed * u128::from(limits.requests_per_minute) * UNIT / 60_000;
        let cap = u128::from(capacity(limits));
        self.micro_tokens = (u128::from(self.micro_tokens) + earned).min(cap) as u64;
        if now_ms > self.last_ms {
            self.last_ms = now_ms;
        }
    }

    pub fn is_full(&self, limits: &Limits, now_ms: u64) -> bool {
        let mut b = *self;
        b.refill(limits, now_ms);
        b.micro_tokens >= capacity(limits)
    }

    /// Takes up to `want` tokens (at least one) if there is one; the decision and how many were taken.
    pub fn take(&mut self, limits: &Limits, now_ms: u64, want: u64) -> (Decision, u64) {
        self.refill(limits, now_ms);
        let whole = self.micro_tokens / UNIT as u64;
        if whole >= 1 {
            let taken = want.clamp(1, whole);
            self.micro_tokens -= taken * UNIT as u64;
            (Decision::Allowed { remaining: self.micro_tokens / UNIT as u64 }, taken)
        } else {
            let missing = UNIT - u128::from(self.micro_tokens);
            let per_minute = (u128::from(limits.requests_per_minute) * UNIT).max(1);
            let retry_after_ms = (missing * 60_000).div_ceil(per_minute);
            let retry_after_s = retry_after_ms.div_ceil(1000).max(1) as u64;
            (Decision::Limited { retry_after_s }, 0)
        }
    }
}

fn capacity(limits: &Limits) -> u64 {
    limits.burst_size.saturating_mul(UNIT as u64)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed { remaining: u64 },
    Limited { retry_after_s: u64 },
}

/// What happened besides the decision, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Outcome {
    /// An active bucket of another key was evicted to make room.
    pub evicted: bool,
    /// Lost the CAS race too often: the request was let through (fail open).
    pub contended: bool,
}

/// Takes a token for `key` (a hash of the client key): one this worker holds, or from the shared buckets (a busy
/// key's next batch, the rest kept in `leases`).
pub fn check<S: SharedStore + ?Sized>(
    store: &S,
    leases: &mut Leases,
    limits: &Limits,
    key: u64,
    now_ms: u64,
) -> (Decision, Outcome) {
    if let Some(remaining) = leases.spend(key, now_ms) {
        return (Decision::Allowed { remaining }, Outcome::default());
    }
    let batch = limits.batch();
    let want = if batch > 1 && leases.has_room(now_ms) { batch } else { 1 };
    let (decision, outcome, taken) = take_shared(store, limits, key, now_ms, want);
    leases.keep(key, taken.saturating_sub(1), now_ms);
    (decision, outcome)
}

/// Takes up to `want` tokens for `key` from the shared buckets: the decision, what else happened, how many were
/// taken.
fn take_shared<S: SharedStore + ?Sized>(
    store: &S,
    limits: &Limits,
    key: u64,
    now_ms: u64,
    want: u64,
) -> (Decision, Outcome, u64) {
    let slots = limits.slots.max(1);
    let home = (key % u64::from(slots)) as u32;
    let mut mine = None;
    // (rank, age): empty < full again < least recently used
    let mut victim: Option<(u32, (u8, u64))> = None;
    let mut read = None;
    for k in 0..PROBES.min(slots) {
        let slot = (home + k) % slots;
        let current = store.get(&keys::bucket(slot));
        let rank = match current.as_ref().and_then(|(v, _)| Bucket::decode(v)) {
            Some(b) if b.key == key => {
                mine = Some(slot);
                read = Some(current);
                break;
            }
            None => (0, 0),
            Some(b) if b.is_full(limits, now_ms) => (1, 0),
            Some(b) => (2, b.last_ms),
        };
        if victim.is_none_or(|(_, r)| rank < r) {
            victim = Some((slot, rank));
        }
    }
    let (slot, evicted) = match (mine, victim) {
        (Some(slot), _) => (slot, false),
        (None, Some((slot, (rank, _)))) => (slot, rank == 2),
        (None, None) => {
            return (Decision::Allowed { remaining: 0 }, Outcome { evicted: false, contended: true }, 0);
        }
    };
    // the common case (the key sits in a probed slot) reuses the read above: one read and one write per request
    let result = update_from(store, &keys::bucket(slot), read, |current| {
        let mut bucket = match current.and_then(Bucket::decode) {
            Some(b) if b.key == key => b,
            _ => Bucket::full(key, limits, now_ms),
        };
        let taken = bucket.take(limits, now_ms, want);
        (Some(bucket.encode().to_vec()), taken)
    });
    match result {
        Ok((d, taken)) => (d, Outcome { evicted, contended: false }, taken),
        Err(UpdateError::Contended | UpdateError::Host | UpdateError::Absent) => {
            (Decision::Allowed { remaining: 0 }, Outcome { evicted, contended: true }, 0)
        }
    }
}

/// Response headers for a refused request: `Retry-After` (RFC 9110) and the IETF draft's `RateLimit-Policy` and
/// `RateLimit` (draft-ietf-httpapi-ratelimit-headers).
pub fn limited_headers(limits: &Limits, retry_after_s: u64) -> Vec<(String, String)> {
    vec![
        ("retry-after".into(), retry_after_s.to_string()),
        ("ratelimit-policy".into(), format!("\"default\";q={};w=60", limits.requests_per_minute)),
        ("ratelimit".into(), format!("\"default\";r=0;t={retry_after_s}")),
        ("content-type".into(), "application/json".into()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared::MemoryStore;
    use proptest::prelude::*;

    const L: Limits = Limits { requests_per_minute: 60, burst_size: 5, slots: 64 };

    /// One token from the shared buckets, as a worker without leases takes it.
    fn check<S: SharedStore + ?Sized>(store: &S, limits: &Limits, key: u64, now_ms: u64) -> (Decision, Outcome) {
        super::check(store, &mut Leases::default(), limits, key, now_ms)
    }

    #[test]
    fn burst_then_refuse_then_refill() {
        let s = MemoryStore::new();
        for i in 0..5 {
            assert_eq!(check(&s, &L, 42, 1000).0, Decision::Allowed { remaining: 4 - i });
        }
        assert_eq!(check(&s, &L, 42, 1000).0, Decision::Limited { retry_after_s: 1 });
        // one token per second at 60 per minute
        assert_eq!(check(&s, &L, 42, 1999).0, Decision::Limited { retry_after_s: 1 });
        assert!(matches!(check(&s, &L, 42, 2000).0, Decision::Allowed { .. }));
        // other keys have their own bucket
        assert!(matches!(check(&s, &L, 7, 2000).0, Decision::Allowed { remaining: 4 }));
    }

    #[test]
    fn retry_after_follows_the_refill_rate() {
        let slow = Limits { requests_per_minute: 2, burst_size: 1, slots: 16 };
        let s = MemoryStore::new();
        assert!(matches!(check(&s, &slow, 1, 0).0, Decision::Allowed { .. }));
        assert_eq!(check(&s, &slow, 1, 0).0, Decision::Limited { retry_after_s: 30 });
        // 10 s to go; the integer refill may round up by a second, never down
        assert!(matches!(check(&s, &slow, 1, 20_000).0, Decision::Limited { retry_after_s: 10 | 11 }));
    }

    #[test]
    fn a_flood_of_keys_stays_within_the_slots() {
        let s = MemoryStore::new();
        for key in 0..100_000u64 {
            check(&s, &L, key.wrapping_mul(0x9E37_79B9_7F4A_7C15), key / 100);
        }
        assert!(s.keys_with_prefix("equilibrio/rl/") <= L.slots as usize);
    }

    #[test]
    fn an_active_client_survives_a_flood_when_idle_slots_exist() {
        let s = MemoryStore::new();
        let limits = Limits { requests_per_minute: 60, burst_size: 5, slots: 4096 };
        for _ in 0..5 {
            check(&s, &limits, 99, 0);
        }
        // many one-off clients, each a single request, spread over time so their buckets refill
        for (i, key) in (1000..3000u64).enumerate() {
            check(&s, &limits, key.wrapping_mul(0x9E37_79B9_7F4A_7C15), i as u64);
        }
        // the active client is still out of tokens at t=0.9 s: its bucket was not evicted
        assert!(matches!(check(&s, &limits, 99, 900).0, Decision::Limited { .. }));
    }

    #[test]
    fn full_buckets_are_reused_before_evicting() {
        let s = MemoryStore::new();
        let limits = Limits { requests_per_minute: 60, burst_size: 1, slots: 16 };
        // fill all 16 slots with active (empty) buckets
        let mut evictions = 0;
        for key in 0..16u64 {
            if check(&s, &limits, key, 0).1.evicted {
                evictions += 1;
            }
        }
        assert_eq!(evictions, 0);
        // a minute later all are full again: a new key reuses one without an eviction
        assert!(!check(&s, &limits, 1_000, 60_000).1.evicted);
    }

    #[test]
    fn headers_name_the_policy() {
        let h = limited_headers(&L, 3);
        assert!(h.contains(&("retry-after".into(), "3".into())));
        assert!(h.contains(&("ratelimit-policy".into(), "\"default\";q=60;w=60".into())));
        assert!(h.contains(&("ratelimit".into(), "\"default\";r=0;t=3".into())));
    }

    /// 100,000 a second, burst 100,000: a worker takes 5,000 tokens (50 ms of the rate) at once.
    const BUSY: Limits = Limits { requests_per_minute: 6_000_000, burst_size: 100_000, slots: 64 };

    #[test]
    fn a_busy_key_takes_its_tokens_ahead() {
        assert_eq!(BUSY.batch(), 5_000);
        let s = MemoryStore::new();
        let mut leases = Leases::default();
        super::check(&s, &mut leases, &BUSY, 9, 0);
        let first = s.reads();
        for _ in 1..10_000 {
            assert!(matches!(super::check(&s, &mut leases, &BUSY, 9, 0).0, Decision::Allowed { .. }));
        }
        // one more batch: one shared read (and write) for the next 9,999 requests
        assert_eq!(s.reads() - first, 1);
        // the shared bucket shows exactly what was taken
        let (read_back, _, _) = take_shared(&s, &BUSY, 9, 0, 1);
        assert_eq!(read_back, Decision::Allowed { remaining: 100_000 - 10_000 - 1 });
    }

    #[test]
    fn tokens_taken_ahead_end_with_their_lease() {
        let s = MemoryStore::new();
        let mut leases = Leases::default();
        super::check(&s, &mut leases, &BUSY, 9, 0);
        let first = s.reads();
        super::check(&s, &mut leases, &BUSY, 9, LEASE_MS - 1);
        assert_eq!(s.reads(), first);
        super::check(&s, &mut leases, &BUSY, 9, LEASE_MS);
        assert_eq!(s.reads(), first + 1, "the first lease ended: a new batch");
    }

    #[test]
    fn a_slow_limit_is_taken_one_token_at_a_time() {
        assert_eq!(L.batch(), 1);
        let s = MemoryStore::new();
        let mut leases = Leases::default();
        super::check(&s, &mut leases, &L, 42, 1000);
        let first = s.reads();
        for _ in 0..4 {
            super::check(&s, &mut leases, &L, 42, 1000);
        }
        assert_eq!(s.reads() - first, 4, "a shared read per request");
        assert_eq!(leases.len(), 0);
    }

    #[test]
    fn beyond_the_leases_busy_keys_take_one_token_each() {
        let s = MemoryStore::new();
        let limits = Limits { slots: 4096, ..BUSY };
        let mut leases = Leases::default();
        for key in 0..MAX_LEASES as u64 + 10 {
            super::check(&s, &mut leases, &limits, key, 0);
        }
        assert_eq!(leases.len(), MAX_LEASES);
        // a key without a lease takes one token, wasting none of its bucket
        super::check(&s, &mut leases, &limits, 1_000_000, 0);
        let (read_back, _, _) = take_shared(&s, &limits, 1_000_000, 0, 1);
        assert_eq!(read_back, Decision::Allowed { remaining: 100_000 - 2 });
        // once the leases end, a busy key takes its batch again
        super::check(&s, &mut leases, &limits, 2_000_000, LEASE_MS);
        assert_eq!(leases.len(), 1);
        let (read_back, _, _) = take_shared(&s, &limits, 2_000_000, LEASE_MS, 1);
        assert_eq!(read_back, Decision::Allowed { remaining: 100_000 - 5_000 - 1 });
    }

    proptest! {
        /// Over any request pattern, allowed requests never exceed burst + refill over the elapsed time.
        #[test]
        fn never_allows_more_than_the_bucket(steps in prop::collection::vec(0u64..500, 1..300), rpm in 1u64..600, burst in 1u64..20) {
            let limits = Limits { requests_per_minute: rpm, burst_size: burst, slots: 16 };
            let s = MemoryStore::new();
            let mut now = 0;
            let mut allowed = 0u64;
            for step in steps {
                now += step;
                if let Decision::Allowed { .. } = check(&s, &limits, 5, now).0 {
                    allowed += 1;
                }
            }
            let bound = burst + now * rpm / 60_000 + 1;
            prop_assert!(allowed <= bound, "allowed {} > {}", allowed, bound);
        }

        /// Several workers taking busy keys' tokens ahead never admit more than the bucket gave out.
        #[test]
        fn workers_with_leases_never_allow_more_than_the_bucket(
            steps in prop::collection::vec((0usize..3, prop_oneof![9 => Just(0u64), 1 => Just(1u64)]), 1..3000),
            rpm in 60_000u64..600_000,
            burst in 8u64..2_000,
        ) {
            let limits = Limits { requests_per_minute: rpm, burst_size: burst, slots: 16 };
            let s = MemoryStore::new();
            let mut workers: Vec<Leases> = (0..3).map(|_| Leases::default()).collect();
            let mut now = 0;
            let mut allowed = 0u64;
            for (worker, step) in steps {
                now += step;
                if let Decision::Allowed { .. } = super::check(&s, &mut workers[worker], &limits, 5, now).0 {
                    allowed += 1;
                }
            }
            let bound = burst + now * rpm / 60_000 + 1;
            prop_assert!(allowed <= bound, "allowed {} > {}", allowed, bound);
        }
    }
}
