//! The health state machine of one instance: consecutive results flip it, never a single one.
//!
//! An instance starts `unknown`; `rise` consecutive successes make it `healthy`, `retries` consecutive failures make it
//! `unhealthy` (HAProxy's rise/fall, Kubernetes' success/failure thresholds). A result that does not change the state
//! only moves the counters. Pure: results and time come in, a transition (an event) may come out.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Not checked enough yet: gets no traffic until it proves healthy.
    Unknown,
    Healthy,
    Unhealthy,
}

/// Thresholds of the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    /// Consecutive failures that mark unhealthy.
    pub retries: u32,
    /// Consecutive successes that mark healthy.
    pub rise: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthState {
    pub health: Health,
    pub successes: u32,
    pub failures: u32,
}

impl Default for HealthState {
    fn default() -> Self {
        HealthState { health: Health::Unknown, successes: 0, failures: 0 }
    }
}

impl HealthState {
    /// Records one check result; returns the new health when it changed.
    pub fn record(&mut self, ok: bool, t: Thresholds) -> Option<Health> {
        if ok {
            self.successes = self.successes.saturating_add(1);
            self.failures = 0;
            if self.health != Health::Healthy && self.successes >= t.rise.max(1) {
                self.health = Health::Healthy;
                return Some(Health::Healthy);
            }
        } else {
            self.failures = self.failures.saturating_add(1);
            self.successes = 0;
            // an unknown instance that fails once is not waited for: it is plainly not serving
            let threshold = if self.health == Health::Unknown { 1 } else { t.retries.max(1) };
            if self.health != Health::Unhealthy && self.failures >= threshold {
                self.health = Health::Unhealthy;
                return Some(Health::Unhealthy);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Thresholds = Thresholds { retries: 3, rise: 2 };

    #[test]
    fn rises_after_rise_successes() {
        let mut s = HealthState::default();
        assert_eq!(s.record(true, T), None);
        assert_eq!(s.record(true, T), Some(Health::Healthy));
        assert_eq!(s.record(true, T), None);
    }

    #[test]
    fn falls_after_retries_failures_and_a_success_resets() {
        let mut s = HealthState { health: Health::Healthy, successes: 5, failures: 0 };
        assert_eq!(s.record(false, T), None);
        assert_eq!(s.record(false, T), None);
        assert_eq!(s.record(true, T), None);
        assert_eq!(s.record(false, T), None);
        assert_eq!(s.record(false, T), None);
        assert_eq!(s.record(false, T), Some(Health::Unhealthy));
        assert_eq!(s.record(false, T), None);
        assert_eq!(s.record(true, T), None);
        assert_eq!(s.record(true, T), Some(Health::Healthy));
    }

    #[test]
    fn unknown_fails_fast() {
        let mut s = HealthState::default();
        assert_eq!(s.record(false, T), Some(Health::Unhealthy));
    }

    #[test]
    fn flapping_below_the_thresholds_changes_nothing() {
        let mut s = HealthState { health: Health::Healthy, successes: 0, failures: 0 };
        for i in 0..100 {
            assert_eq!(s.record(i % 3 != 0, T), None);
        }
    }
}
