//! Per-endpoint traffic aggregates: what workers count, what the poller reports to the supervisor and turns into
//! metrics, so the autoscaler can scale on request rate and response time.
//!
//! Workers count locally (no host call per request) and merge into the shared aggregate on their tick; the poller
//! takes and resets the shared aggregates each period. Latency goes into a fixed histogram (milliseconds, roughly
//! 1-2-5 steps), enough for a p95 estimate that is exact to the bucket and interpolated inside it.

/// Upper bounds of the latency buckets in ms; the last bucket is everything above.
pub const BOUNDS_MS: [u64; 15] = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000, 30_000, 60_000];
const BUCKETS: usize = BOUNDS_MS.len() + 1;
const WORDS: usize = 3 + BUCKETS;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Aggregate {
    pub requests: u64,
    pub errors: u64,
    pub latency_sum_us: u64,
    pub histogram: [u64; BUCKETS],
}

impl Aggregate {
    /// A request whose outcome was read; it stands for `weight` requests of its kind (1 unless sampled, see
    /// [`crate::sampling`]), so errors, latency and the histogram count it that many times.
    pub fn record(&mut self, latency_us: u64, error: bool, weight: u32) {
        let weight = u64::from(weight.max(1));
        self.requests += 1;
        if error {
            self.errors = self.errors.saturating_add(weight);
        }
        self.latency_sum_us = self.latency_sum_us.saturating_add(latency_us.saturating_mul(weight));
        let ms = latency_us / 1000;
        let bucket = BOUNDS_MS.iter().position(|b| ms < *b).unwrap_or(BOUNDS_MS.len());
        if let Some(slot) = self.histogram.get_mut(bucket) {
            *slot = slot.saturating_add(weight);
        }
    }

    /// A request whose outcome was not read (sampling): counted, and represented by the ones that were read.
    pub fn count(&mut self) {
        self.requests += 1;
    }

    pub fn is_empty(&self) -> bool {
        self.requests == 0
    }

    pub fn merge(&mut self, other: &Aggregate) {
        self.requests = self.requests.saturating_add(other.requests);
        self.errors = self.errors.saturating_add(other.errors);
        self.latency_sum_us = self.latency_sum_us.saturating_add(other.latency_sum_us);
        for (a, b) in self.histogram.iter_mut().zip(other.histogram.iter()) {
            *a = a.saturating_add(*b);
        }
    }

    /// The latency below which `q` of the requests fall, in ms (linear inside the bucket).
    pub fn quantile_ms(&self, q: f64) -> f64 {
        let total: u64 = self.histogram.iter().sum();
        if total == 0 {
            return 0.0;
        }
        let rank = (q.clamp(0.0, 1.0) * total as f64).ceil().max(1.0);
        let mut seen = 0u64;
        for (i, count) in self.histogram.iter().enumerate() {
            if *count == 0 {
                continue;
            }
            if (seen + count) as f64 >= rank {
                let lo = if i == 0 { 0 } else { BOUNDS_MS.get(i - 1).copied().unwrap_or(0) };
                let hi = BOUNDS_MS.get(i).copied().unwrap_or(lo.saturating_mul(2));
                let within = (rank - seen as f64) / *count as f64;
                return lo as f64 + (hi - lo) as f64 * within;
            }
            seen += count;
        }
        BOUNDS_MS.last().copied().unwrap_or(0) as f64
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(WORDS * 8);
        for w in [self.requests, self.errors, self.latency_sum_us].iter().chain(self.histogram.iter()) {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Aggregate> {
        if bytes.len() != WORDS * 8 {
            return None;
        }
        let word = |i: usize| bytes.get(i * 8..i * 8 + 8).and_then(|s| s.try_into().ok()).map(u64::from_le_bytes);
        let mut a = Aggregate { requests: word(0)?, errors: word(1)?, latency_sum_us: word(2)?, ..Default::default() };
        for (i, slot) in a.histogram.iter_mut().enumerate() {
            *slot = word(3 + i)?;
        }
        Some(a)
    }
}

/// Process-wide counters that are not per endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GlobalStats {
    pub rate_limited: u64,
    pub rate_limit_evictions: u64,
    pub rate_limit_contended: u64,
    pub sticky_hits: u64,
    pub sticky_invalid: u64,
    pub ejections: u64,
    pub no_upstream: u64,
    /// Requests whose first listed endpoint was at its concurrency limit and that went to the next one.
    pub overflowed: u64,
    /// Requests answered 503 because every listed endpoint was at its concurrency limit.
    pub overloaded: u64,
}

impl GlobalStats {
    fn words(&self) -> [u64; 9] {
        [
            self.rate_limited,
            self.rate_limit_evictions,
            self.rate_limit_contended,
            self.sticky_hits,
            self.sticky_invalid,
            self.ejections,
            self.no_upstream,
            self.overflowed,
            self.overloaded,
        ]
    }

    pub fn is_empty(&self) -> bool {
        self.words().iter().all(|w| *w == 0)
    }

    pub fn merge(&mut self, o: &GlobalStats) {
        self.rate_limited += o.rate_limited;
        self.rate_limit_evictions += o.rate_limit_evictions;
        self.rate_limit_contended += o.rate_limit_contended;
        self.sticky_hits += o.sticky_hits;
        self.sticky_invalid += o.sticky_invalid;
        self.ejections += o.ejections;
        self.no_upstream += o.no_upstream;
        self.overflowed += o.overflowed;
        self.overloaded += o.overloaded;
    }

    pub fn encode(&self) -> Vec<u8> {
        self.words().iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    pub fn decode(bytes: &[u8]) -> GlobalStats {
        let word = |i: usize| bytes.get(i * 8..i * 8 + 8).and_then(|s| s.try_into().ok()).map_or(0, u64::from_le_bytes);
        GlobalStats {
            rate_limited: word(0),
            rate_limit_evictions: word(1),
            rate_limit_contended: word(2),
            sticky_hits: word(3),
            sticky_invalid: word(4),
            ejections: word(5),
            no_upstream: word(6),
            overflowed: word(7),
            overloaded: word(8),
        }
    }
}

/// The report's wire types (the contract crate: the supervisor reads the same ones).
pub use equilibrio_contract::report::{EndpointReport, Report};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p95_is_within_its_bucket() {
        let mut a = Aggregate::default();
        for i in 0..100 {
            // 95 fast (3 ms), 5 slow (700 ms)
            a.record(if i < 95 { 3_000 } else { 700_000 }, false, 1);
        }
        let p95 = a.quantile_ms(0.95);
        assert!((2.0..=5.0).contains(&p95), "{p95}");
        assert!(a.quantile_ms(0.99) >= 500.0);
        assert_eq!(Aggregate::default().quantile_ms(0.95), 0.0);
    }

    #[test]
    fn encode_merge_round_trip() {
        let mut a = Aggregate::default();
        a.record(1_500, true, 1);
        a.record(90_000_000, false, 1);
        let b = Aggregate::decode(&a.encode()).unwrap();
        assert_eq!(a, b);
        let mut c = a;
        c.merge(&b);
        assert_eq!(c.requests, 4);
        assert_eq!(c.errors, 2);
        assert_eq!(Aggregate::decode(b"short"), None);
        let g = GlobalStats { rate_limited: 3, ejections: 1, ..Default::default() };
        assert_eq!(GlobalStats::decode(&g.encode()), g);
        assert_eq!(GlobalStats::decode(b""), GlobalStats::default());
    }
}
