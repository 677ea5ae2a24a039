//! Peak-EWMA latency (Finagle, linkerd, tower's `load::PeakEwma`).
//!
//! A moving average of response times that jumps up at once on a slow response (the "peak") and decays back with time
//! constant `tau`, so a degrading endpoint loses traffic immediately and regains it gradually. Its load is
//! `cost x (in_flight + 1)`, used by the response-time balancer's power of two choices. Time is an argument.

/// Decay time constant (linkerd's default).
pub const TAU_MS: f64 = 10_000.0;
/// The assumed latency of an endpoint that has answered nothing yet: optimistic, so new endpoints get tried.
pub const DEFAULT_RTT_MS: f64 = 1.0;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PeakEwma {
    cost_ms: f64,
    stamp_ms: u64,
}

impl Default for PeakEwma {
    fn default() -> Self {
        PeakEwma { cost_ms: DEFAULT_RTT_MS, stamp_ms: 0 }
    }
}

impl PeakEwma {
    /// Records a response time.
    pub fn observe(&mut self, rtt_ms: f64, now_ms: u64) {
        let rtt = if rtt_ms.is_finite() {
            rtt_ms.max(0.0)
        } else {
            return;
        };
        if rtt > self.cost_ms {
            self.cost_ms = rtt;
        } else {
            let w = self.weight(now_ms);
            self.cost_ms = self.cost_ms * w + rtt * (1.0 - w);
        }
        self.stamp_ms = self.stamp_ms.max(now_ms);
    }

    fn weight(&self, now_ms: u64) -> f64 {
        let dt = now_ms.saturating_sub(self.stamp_ms) as f64;
        (-dt / TAU_MS).exp()
    }

    /// The current estimate: without news it decays back toward the default.
    pub fn cost(&self, now_ms: u64) -> f64 {
        let w = self.weight(now_ms);
        DEFAULT_RTT_MS + (self.cost_ms - DEFAULT_RTT_MS) * w
    }

    /// The load used for balancing.
    pub fn load(&self, now_ms: u64, in_flight: i64) -> f64 {
        self.cost(now_ms) * (in_flight.max(0) as f64 + 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jumps_to_a_peak_and_decays() {
        let mut e = PeakEwma::default();
        e.observe(100.0, 1000);
        assert_eq!(e.cost(1000), 100.0);
        // a fast answer right after barely moves it
        e.observe(1.0, 1001);
        assert!(e.cost(1001) > 99.0);
        // with time it decays toward the default
        assert!(e.cost(1001 + 60_000) < 2.0);
    }

    #[test]
    fn load_grows_with_in_flight() {
        let e = PeakEwma::default();
        assert!(e.load(0, 4) > e.load(0, 0));
        assert_eq!(e.load(0, -3), e.load(0, 0));
    }

    #[test]
    fn ignores_nonsense() {
        let mut e = PeakEwma::default();
        e.observe(f64::NAN, 5);
        assert_eq!(e.cost(0), DEFAULT_RTT_MS);
    }
}
