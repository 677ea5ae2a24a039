//! Which requests' outcomes a worker reads from the proxy.
//!
//! Reading an outcome (the status, the host that answered, the end time) costs Envoy three host calls and two entries
//! into the VM, more than everything else the filter does for a request. Up to `observation.max_per_second` requests
//! per second per worker, every outcome is read. Above that rate a random share of about that many per second is read,
//! and each one read stands for the `k` requests of its share: errors, latency and the latency histogram are counted
//! `k` times, so the per-endpoint aggregates stay unbiased estimates while request counts stay exact. Passive health
//! sees the outcomes read, which under such a load still means hundreds per second.
//!
//! The share is random, not every k-th request: round robin would otherwise make "every k-th" land on the same
//! endpoint each time.

/// A worker's observation sampler. Pure: the time and the randomness come in as arguments.
#[derive(Debug, Clone, Default)]
pub struct Sampler {
    window_start_ms: u64,
    seen: u64,
    /// One request in `period` is observed (1: all).
    period: u32,
}

impl Sampler {
    /// Counts a request arriving at `now_ms` and decides whether its outcome is read: the weight of its observation
    /// (the number of requests it stands for), or 0 if it is not read. `max_per_second` 0 reads every request.
    pub fn sample(&mut self, now_ms: u64, max_per_second: u32, rng: &mut fastrand::Rng) -> u32 {
        if max_per_second == 0 {
            return 1;
        }
        if self.seen == 0 && self.window_start_ms == 0 {
            self.window_start_ms = now_ms;
        }
        self.seen += 1;
        let elapsed = now_ms.saturating_sub(self.window_start_ms);
        if elapsed >= 1000 {
            // the rate over the last window sets the period for the next one
            let rate = self.seen.saturating_mul(1000) / elapsed;
            self.period = u32::try_from(rate / u64::from(max_per_second)).unwrap_or(u32::MAX).max(1);
            self.window_start_ms = now_ms;
            self.seen = 0;
        }
        let k = self.period.max(1);
        if k == 1 || rng.u32(..k) == 0 { k } else { 0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Observations (count, total weight) of `rate` requests per second spread evenly over `seconds`.
    fn run(rate: u64, seconds: u64, max: u32) -> (u64, u64) {
        let (mut s, mut rng) = (Sampler::default(), fastrand::Rng::with_seed(7));
        let (mut observed, mut weight) = (0, 0);
        for i in 0..rate * seconds {
            let w = s.sample(1_000_000 + i * 1000 / rate, max, &mut rng);
            observed += u64::from(w > 0);
            weight += u64::from(w);
        }
        (observed, weight)
    }

    #[test]
    fn below_the_maximum_every_request_is_read() {
        assert_eq!(run(800, 5, 1000), (4000, 4000));
    }

    #[test]
    fn zero_reads_every_request() {
        assert_eq!(run(20_000, 2, 0), (40_000, 40_000));
    }

    #[test]
    fn above_the_maximum_about_the_maximum_is_read_and_the_weights_add_up() {
        // the first second is read in full, then about 1,000 per second
        let (observed, weight) = run(20_000, 10, 1000);
        let sampled_part = observed - 20_000;
        assert!((8_000..=10_500).contains(&sampled_part), "{sampled_part} read over 9 s");
        let total = 200_000.0;
        assert!((weight as f64 - total).abs() / total < 0.03, "weights stand for {weight} of 200000 requests");
    }

    #[test]
    fn a_rate_that_drops_goes_back_to_reading_everything() {
        let (mut s, mut rng) = (Sampler::default(), fastrand::Rng::with_seed(1));
        for i in 0..30_000 {
            s.sample(1_000_000 + i / 10, 1000, &mut rng);
        }
        // now one request every 10 ms: after a window at the new rate, every one is read
        let weights: Vec<u32> = (0..300).map(|i| s.sample(1_003_000 + i * 10, 1000, &mut rng)).collect();
        assert!(weights[150..].iter().all(|w| *w == 1), "{:?}", &weights[150..160]);
    }
}
