//! Success-rate and failure-percentage outlier detection (Envoy's): once per `passive_health.interval`, the poller looks
//! at every endpoint's requests and errors over the interval, summed over all workers, and ejects the endpoints that
//! do worse than the others (success rate) or badly in absolute terms (failure percentage). Consecutive failures catch
//! an endpoint that fails everything; these catch one that fails a share of its requests.
//!
//! * Success rate: among the endpoints with at least `request_volume` requests, if there are `minimum_hosts` of them,
//!   one whose success rate is below `mean - stdev_factor x stdev` (population standard deviation) is an outlier.
//! * Failure percentage: among the same kind of endpoints (its own volume and host minimums), one failing `threshold`
//!   percent of its requests or more is an outlier.
//!
//! The ejections themselves go through [`crate::outlier::Ejections`] (its cap and growing times). Pure: counts in,
//! verdicts out.

use std::collections::BTreeMap;

use crate::config::PassiveHealthConfig;

/// Requests and errors of one endpoint over the current interval.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub requests: u64,
    pub errors: u64,
}

impl Counts {
    fn success_percent(self) -> f64 {
        if self.requests == 0 {
            return 100.0;
        }
        100.0 * self.requests.saturating_sub(self.errors) as f64 / self.requests as f64
    }
}

/// Why an endpoint is an outlier.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Reason {
    SuccessRate { percent: f64, threshold: f64 },
    FailurePercentage { percent: f64 },
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::SuccessRate { percent, threshold } => {
                write!(f, "success rate {percent:.1}% below the others' threshold of {threshold:.1}%")
            }
            Reason::FailurePercentage { percent } => write!(f, "{percent:.1}% of its requests failed"),
        }
    }
}

/// The counts of the current interval, by endpoint id.
#[derive(Debug, Clone, Default)]
pub struct Interval {
    since_ms: Option<u64>,
    counts: BTreeMap<String, Counts>,
}

impl Interval {
    /// Adds an endpoint's counts since the last call.
    pub fn add(&mut self, id: &str, requests: u64, errors: u64, now_ms: u64) {
        self.since_ms.get_or_insert(now_ms);
        let c = self.counts.entry(id.to_string()).or_default();
        c.requests = c.requests.saturating_add(requests);
        c.errors = c.errors.saturating_add(errors.min(requests));
    }

    /// At the end of an interval: the outliers among the endpoints still in `ids` (the table), and a new interval.
    pub fn close<'a>(
        &mut self,
        ids: impl Iterator<Item = &'a str>,
        cfg: &PassiveHealthConfig,
        now_ms: u64,
    ) -> Option<Vec<(String, Reason)>> {
        let since = self.since_ms?;
        if now_ms.saturating_sub(since) < cfg.interval.0 {
            return None;
        }
        let counts: Vec<(&str, Counts)> =
            ids.map(|id| (id, self.counts.get(id).copied().unwrap_or_default())).collect();
        let found = outliers(&counts, cfg);
        *self = Interval { since_ms: Some(now_ms), counts: BTreeMap::new() };
        Some(found)
    }
}

/// The endpoints with at least `volume` requests and their success percent, if there are `minimum_hosts` of them
/// (both detectors judge only then).
fn judged<'a>(counts: &[(&'a str, Counts)], volume: u64, minimum_hosts: u32) -> Option<Vec<(&'a str, f64)>> {
    let rated: Vec<(&str, f64)> =
        counts.iter().filter(|(_, c)| c.requests >= volume).map(|(id, c)| (*id, c.success_percent())).collect();
    (!rated.is_empty() && rated.len() >= minimum_hosts as usize).then_some(rated)
}

/// The outliers among `counts` (one interval's), each once (success rate first).
pub fn outliers(counts: &[(&str, Counts)], cfg: &PassiveHealthConfig) -> Vec<(String, Reason)> {
    let mut out: Vec<(String, Reason)> = Vec::new();
    let sr = &cfg.success_rate;
    if sr.enabled
        && let Some(rated) = judged(counts, sr.request_volume, sr.minimum_hosts)
    {
        let n = rated.len() as f64;
        let mean = rated.iter().map(|(_, r)| r).sum::<f64>() / n;
        let variance = rated.iter().map(|(_, r)| (r - mean).powi(2)).sum::<f64>() / n;
        let threshold = mean - sr.stdev_factor * variance.sqrt();
        for (id, percent) in rated {
            if percent < threshold {
                out.push((id.to_string(), Reason::SuccessRate { percent, threshold }));
            }
        }
    }
    let fp = &cfg.failure_percentage;
    if fp.enabled
        && let Some(rated) = judged(counts, fp.request_volume, fp.minimum_hosts)
    {
        for (id, success) in rated {
            let percent = 100.0 - success;
            if percent >= f64::from(fp.threshold) && !out.iter().any(|(o, _)| o == id) {
                out.push((id.to_string(), Reason::FailurePercentage { percent }));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{FailurePercentageConfig, Millis};
    use proptest::prelude::*;

    fn c(requests: u64, errors: u64) -> Counts {
        Counts { requests, errors }
    }

    #[test]
    fn an_endpoint_failing_half_its_requests_is_a_success_rate_outlier_and_the_others_are_not() {
        let cfg = PassiveHealthConfig::default();
        let counts = [
            ("a", c(200, 0)),
            ("b", c(200, 1)),
            ("c", c(200, 0)),
            ("d", c(200, 2)),
            ("e", c(200, 0)),
            ("x", c(200, 100)),
        ];
        let found = outliers(&counts, &cfg);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].0, "x");
        assert!(matches!(found[0].1, Reason::SuccessRate { percent, .. } if (percent - 50.0).abs() < 1e-9));
    }

    #[test]
    fn too_few_hosts_or_requests_decide_nothing() {
        let cfg = PassiveHealthConfig::default();
        let four = [("a", c(200, 0)), ("b", c(200, 0)), ("c", c(200, 0)), ("x", c(200, 100))];
        assert!(outliers(&four, &cfg).is_empty(), "fewer than minimum_hosts (5)");
        let quiet = [
            ("a", c(200, 0)),
            ("b", c(200, 0)),
            ("c", c(200, 0)),
            ("d", c(200, 0)),
            ("e", c(200, 0)),
            ("x", c(99, 99)),
        ];
        assert!(outliers(&quiet, &cfg).is_empty(), "x has fewer than request_volume (100)");
    }

    #[test]
    fn failure_percentage_ejects_in_absolute_terms_when_enabled() {
        let on = PassiveHealthConfig {
            failure_percentage: FailurePercentageConfig { enabled: true, minimum_hosts: 2, ..Default::default() },
            success_rate: crate::config::SuccessRateConfig { enabled: false, ..Default::default() },
            ..PassiveHealthConfig::default()
        };
        let counts = [("a", c(100, 90)), ("b", c(100, 86)), ("c", c(100, 84)), ("d", c(40, 40))];
        let ids: Vec<String> = outliers(&counts, &on).into_iter().map(|(id, _)| id).collect();
        assert_eq!(ids, ["a", "b"], "85% or more, with the volume (d has 40 of 50)");
        assert!(outliers(&counts, &PassiveHealthConfig { failure_percentage: Default::default(), ..on }).is_empty());
    }

    #[test]
    fn an_interval_closes_after_its_time_and_starts_again() {
        let cfg = PassiveHealthConfig { interval: Millis(1000), ..PassiveHealthConfig::default() };
        let ids = ["a", "b", "c", "d", "e", "x"];
        let mut i = Interval::default();
        assert_eq!(i.close(ids.into_iter(), &cfg, 0), None, "nothing counted yet");
        for id in ids {
            i.add(id, 300, if id == "x" { 150 } else { 0 }, 0);
        }
        assert_eq!(i.close(ids.into_iter(), &cfg, 999), None);
        let found = i.close(ids.into_iter(), &cfg, 1000).unwrap();
        assert_eq!(found.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(), ["x"]);
        // the next interval starts empty
        assert_eq!(i.close(ids.into_iter(), &cfg, 2000), Some(vec![]));
    }

    proptest! {
        /// Endpoints that all do the same are never outliers, whatever the rate.
        #[test]
        fn equal_endpoints_are_never_outliers(n in 1usize..20, requests in 100u64..10_000, errors_share in 0u64..100) {
            let errors = requests * errors_share / 100;
            let ids: Vec<String> = (0..n).map(|i| format!("e{i}")).collect();
            let counts: Vec<(&str, Counts)> = ids.iter().map(|id| (id.as_str(), c(requests, errors))).collect();
            let found = outliers(&counts, &PassiveHealthConfig::default());
            prop_assert!(found.is_empty(), "{found:?}");
        }
    }
}
