//! Calibration: from a load ramp against one instance, the request rate it sustains at the p95 target, and the
//! request-rate thresholds to set from it (`scripts/calibrate` runs the ramp: `equilibrio-calibrate`).
//!
//! The ramp offers a rising open-loop rate in steps (latency counted from when each request was due, so a stalled
//! server cannot hide its queue: no coordinated omission). A step holds when its p95 is within the target, under 1%
//! of its requests failed and the server kept up (it completed at least 95% of the offered rate). The sustainable
//! rate is the last step that held before the first that did not. Thresholds keep headroom for the time a scale-up
//! takes: scale up at 80% of it, scale down below 25%.

/// One step of the ramp, as measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Step {
    pub offered_per_second: f64,
    pub seconds: f64,
    pub sent: u64,
    pub completed: u64,
    pub errors: u64,
    pub p95_ms: f64,
}

/// Share of the sustainable rate at which to scale up.
pub const SCALE_UP_SHARE: f64 = 0.8;
/// Share of the sustainable rate below which to scale down.
pub const SCALE_DOWN_SHARE: f64 = 0.25;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Calibration {
    pub sustainable_per_second: f64,
    pub scale_up_per_second: f64,
    pub scale_down_per_second: f64,
}

impl Step {
    /// Whether the instance served this step within the target.
    pub fn holds(&self, p95_target_ms: f64) -> bool {
        let error_share = if self.sent == 0 { 1.0 } else { self.errors as f64 / self.sent as f64 };
        let kept_up = self.seconds > 0.0 && self.completed as f64 / self.seconds >= 0.95 * self.offered_per_second;
        self.sent > 0 && self.p95_ms <= p95_target_ms && error_share < 0.01 && kept_up
    }
}

/// The sustainable rate and the thresholds, or `None` when even the first step missed the target.
pub fn calibrate(steps: &[Step], p95_target_ms: f64) -> Option<Calibration> {
    let sustainable = steps.iter().take_while(|s| s.holds(p95_target_ms)).last().map(|s| s.offered_per_second)?;
    Some(Calibration {
        sustainable_per_second: sustainable,
        scale_up_per_second: sustainable * SCALE_UP_SHARE,
        scale_down_per_second: sustainable * SCALE_DOWN_SHARE,
    })
}

/// The ramp's next rate: `factor` times the last, at least one more request per second.
pub fn next_rate(rate: f64, factor: f64) -> f64 {
    (rate * factor).max(rate + 1.0)
}

/// The p-quantile (0..=1) of `values` (sorted in place), nearest rank.
pub fn quantile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((p.clamp(0.0, 1.0) * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(rate: f64, p95: f64, errors: u64, completed_share: f64) -> Step {
        let sent = (rate * 5.0) as u64;
        Step {
            offered_per_second: rate,
            seconds: 5.0,
            sent,
            completed: (sent as f64 * completed_share) as u64,
            errors,
            p95_ms: p95,
        }
    }

    #[test]
    fn the_last_step_before_the_first_miss_is_sustainable() {
        let steps = [
            step(10.0, 20.0, 0, 1.0),
            step(20.0, 40.0, 0, 1.0),
            step(40.0, 480.0, 0, 1.0),
            step(80.0, 900.0, 0, 1.0),
            // a lucky step after the knee does not count
            step(160.0, 100.0, 0, 1.0),
        ];
        let c = calibrate(&steps, 500.0).unwrap();
        assert_eq!(c.sustainable_per_second, 40.0);
        assert_eq!((c.scale_up_per_second, c.scale_down_per_second), (32.0, 10.0));
    }

    #[test]
    fn errors_and_falling_behind_miss_the_target_too() {
        assert!(!step(10.0, 20.0, 1, 1.0).holds(500.0), "2% errors");
        assert!(!step(10.0, 20.0, 0, 0.9).holds(500.0), "did not keep up");
        assert!(step(100.0, 20.0, 4, 1.0).holds(500.0), "under 1% errors");
        assert_eq!(calibrate(&[step(10.0, 600.0, 0, 1.0)], 500.0), None);
        assert_eq!(calibrate(&[], 500.0), None);
    }

    #[test]
    fn quantiles_and_rates() {
        let mut v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(quantile(&mut v, 0.95), 95.0);
        assert_eq!(quantile(&mut [], 0.95), 0.0);
        assert_eq!(next_rate(2.0, 1.25), 3.0);
        assert_eq!(next_rate(100.0, 1.25), 125.0);
    }
}
