//! Retries, bounded and spaced: a retry budget across all workers (Envoy's `retry_budget`: retries in flight may be
//! at most a share of the requests in flight, and always at least a floor), and a fully jittered exponential backoff
//! between attempts (Envoy's: the n-th retry waits a random time below `min(max, base x 2^(n-1))`).
//!
//! A failing upstream multiplies the load on the others by the retries it causes; the budget stops that from turning an
//! outage of one host into an overload of all, and the jitter keeps the retries of many clients from arriving in step.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::config::RetryConfig;

/// The counts behind the budget, shared by every worker.
#[derive(Debug, Default)]
pub struct RetryBudget {
    requests: AtomicU64,
    retries: AtomicU64,
}

/// Holds one count until dropped.
pub struct Held<'a>(&'a AtomicU64);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl RetryBudget {
    /// Counts a request on its way upstream (until the guard drops).
    pub fn request(&self) -> Held<'_> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        Held(&self.requests)
    }

    /// A retry if the budget has room: at most `percent` of the requests in flight, and at least `min_concurrency`.
    pub fn retry(&self, cfg: &RetryConfig) -> Option<Held<'_>> {
        let requests = self.requests.load(Ordering::Relaxed);
        let allowed = allowed(requests, cfg);
        let before = self.retries.fetch_add(1, Ordering::Relaxed);
        if before >= allowed {
            self.retries.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(Held(&self.retries))
    }
}

/// Retries allowed in flight with `requests` in flight.
pub fn allowed(requests: u64, cfg: &RetryConfig) -> u64 {
    ((requests as f64 * cfg.budget_percent / 100.0) as u64).max(u64::from(cfg.min_concurrency))
}

/// The wait before retry `n` (1 for the first), from a uniform `random` in `[0, 1)`.
pub fn backoff(n: u32, random: f64, cfg: &RetryConfig) -> Duration {
    let base = cfg.backoff_base.0 as f64;
    let ceiling = (base * 2f64.powi(n.saturating_sub(1).min(30) as i32)).min(cfg.backoff_max.0 as f64);
    Duration::from_micros((ceiling * 1000.0 * random.clamp(0.0, 1.0)) as u64)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use equilibrio_contract::keyed::Millis;
    use proptest::prelude::*;

    fn cfg() -> RetryConfig {
        RetryConfig { budget_percent: 20.0, min_concurrency: 3, backoff_base: Millis(25), backoff_max: Millis(250) }
    }

    #[test]
    fn retries_are_a_share_of_requests_with_a_floor() {
        let budget = RetryBudget::default();
        let c = cfg();
        let requests: Vec<Held> = (0..100).map(|_| budget.request()).collect();
        let retries: Vec<Held> = (0..30).filter_map(|_| budget.retry(&c)).collect();
        assert_eq!(retries.len(), 20, "20% of 100");
        drop(retries);
        drop(requests);
        let few: Vec<Held> = (0..10).filter_map(|_| budget.retry(&c)).collect();
        assert_eq!(few.len(), 3, "the floor with nothing in flight");
        drop(few);
        assert!(budget.retry(&c).is_some(), "guards give their places back");
    }

    #[test]
    fn backoff_doubles_to_its_cap() {
        let c = cfg();
        assert_eq!(backoff(1, 0.999_999, &c), Duration::from_micros(24_999));
        assert_eq!(backoff(2, 0.5, &c), Duration::from_millis(25));
        assert_eq!(backoff(5, 0.999_999, &c), Duration::from_micros(249_999), "capped at max");
        assert_eq!(backoff(1, 0.0, &c), Duration::ZERO);
    }

    proptest! {
        #[test]
        fn backoff_stays_below_its_ceiling(n in 1u32..100, r in 0.0f64..1.0) {
            let c = cfg();
            let ceiling = (25.0 * 2f64.powi((n - 1).min(30) as i32)).min(250.0);
            prop_assert!(backoff(n, r, &c) <= Duration::from_micros((ceiling * 1000.0) as u64));
        }
    }
}
