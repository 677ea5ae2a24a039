//! Traffic per instance from the proxies' reports (`POST /v1/reports`), kept in a time window.
//!
//! Each proxy reports per-endpoint aggregates every poll period. Request and error rates are summed over all proxies
//! across the window; in flight is the sum of each proxy's latest value; p95 is the largest recent p95 of any proxy
//! (a conservative merge: quantiles do not add). Pure: reports and time come in.

use std::collections::{BTreeMap, VecDeque};

use serde::Serialize;

pub use equilibrio_contract::report::{EndpointReport, Report};

#[derive(Debug, Clone)]
struct Sample {
    at_ms: u64,
    proxy: String,
    requests: u64,
    errors: u64,
    latency_sum_ms: f64,
    p95_ms: f64,
    in_flight: i64,
}

/// What the API and the metrics show per instance.
#[derive(Debug, Clone, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Traffic {
    pub requests_per_second: f64,
    pub error_rate: f64,
    pub in_flight: i64,
    pub latency_p95_ms: f64,
    pub latency_mean_ms: f64,
    pub requests_total: u64,
}

/// The most proxies remembered (by service, proxy id and zone), whatever reports claim: the oldest are forgotten.
const MAX_PROXIES: usize = 10_000;

pub struct Reports {
    window_ms: u64,
    samples: BTreeMap<(String, String), VecDeque<Sample>>,
    totals: BTreeMap<(String, String), u64>,
    /// When each proxy in a zone last reported, by (service, zone, proxy id).
    proxies: BTreeMap<(String, String, String), u64>,
}

impl Reports {
    pub fn new(window_ms: u64) -> Reports {
        Reports { window_ms, samples: BTreeMap::new(), totals: BTreeMap::new(), proxies: BTreeMap::new() }
    }

    /// How many proxies of `service` reported from each zone within the window (zone-aware locality's traffic
    /// shares; proxies without a zone are not counted).
    pub fn proxy_zones(&self, service: &str, now_ms: u64) -> BTreeMap<String, u32> {
        let horizon = now_ms.saturating_sub(self.window_ms);
        let mut out: BTreeMap<String, u32> = BTreeMap::new();
        for ((s, zone, _), at) in &self.proxies {
            if s == service && *at >= horizon {
                *out.entry(zone.clone()).or_default() += 1;
            }
        }
        out
    }

    pub fn record(&mut self, r: &Report, now_ms: u64) {
        if let Some(zone) = &r.zone {
            self.proxies.insert((r.service.clone(), zone.clone(), r.proxy.clone()), now_ms);
            let horizon = now_ms.saturating_sub(self.window_ms);
            self.proxies.retain(|_, at| *at >= horizon);
            while self.proxies.len() > MAX_PROXIES {
                let oldest = self.proxies.iter().min_by_key(|(_, at)| **at).map(|(k, _)| k.clone());
                match oldest {
                    Some(k) => self.proxies.remove(&k),
                    None => break,
                };
            }
        }
        for e in &r.endpoints {
            let key = (r.service.clone(), e.id.clone());
            let total = self.totals.entry(key.clone()).or_default();
            *total = total.saturating_add(e.requests);
            let q = self.samples.entry(key).or_default();
            q.push_back(Sample {
                at_ms: now_ms,
                proxy: r.proxy.clone(),
                requests: e.requests,
                errors: e.errors,
                latency_sum_ms: e.latency_sum_ms,
                p95_ms: e.latency_p95_ms,
                in_flight: e.in_flight,
            });
        }
        self.expire(now_ms);
    }

    /// Forgets what was kept for instances that are gone (`keep` says which still exist).
    pub fn retain(&mut self, keep: impl Fn(&str, &str) -> bool) {
        self.totals.retain(|(s, id), _| keep(s, id));
        self.samples.retain(|(s, id), _| keep(s, id));
    }

    fn expire(&mut self, now_ms: u64) {
        let horizon = now_ms.saturating_sub(self.window_ms);
        for q in self.samples.values_mut() {
            while q.front().is_some_and(|s| s.at_ms < horizon) {
                q.pop_front();
            }
        }
        self.samples.retain(|_, q| !q.is_empty());
    }

    pub fn traffic(&self, service: &str, id: &str, now_ms: u64) -> Traffic {
        self.traffic_over(service, id, now_ms, self.window_ms)
    }

    /// Traffic over the last `window_ms` only (the autoscaler samples a few seconds and averages over its own
    /// measurement windows).
    pub fn traffic_over(&self, service: &str, id: &str, now_ms: u64, window_ms: u64) -> Traffic {
        let key = (service.to_string(), id.to_string());
        let total = self.totals.get(&key).copied().unwrap_or(0);
        let Some(q) = self.samples.get(&key) else { return Traffic { requests_total: total, ..Traffic::default() } };
        let window_ms = window_ms.min(self.window_ms);
        let horizon = now_ms.saturating_sub(window_ms);
        let recent: Vec<&Sample> = q.iter().filter(|s| s.at_ms >= horizon).collect();
        let requests: u64 = recent.iter().fold(0u64, |a, s| a.saturating_add(s.requests));
        let errors: u64 = recent.iter().fold(0u64, |a, s| a.saturating_add(s.errors));
        let latency: f64 = recent.iter().map(|s| s.latency_sum_ms).sum();
        let span_ms = recent.first().map_or(window_ms, |s| now_ms.saturating_sub(s.at_ms)).max(1000);
        let mut latest: BTreeMap<&str, i64> = BTreeMap::new();
        for s in &recent {
            latest.insert(&s.proxy, s.in_flight);
        }
        Traffic {
            requests_per_second: requests as f64 * 1000.0 / span_ms as f64,
            error_rate: if requests == 0 { 0.0 } else { errors as f64 / requests as f64 },
            in_flight: latest.values().sum(),
            latency_p95_ms: recent.iter().filter(|s| s.requests > 0).map(|s| s.p95_ms).fold(0.0, f64::max),
            latency_mean_ms: if requests == 0 { 0.0 } else { latency / requests as f64 },
            requests_total: total,
        }
    }

    /// In flight on an instance as the proxies last reported (`None` if no proxy reported it in the window).
    pub fn in_flight(&self, service: &str, id: &str, now_ms: u64) -> Option<i64> {
        let q = self.samples.get(&(service.to_string(), id.to_string()))?;
        let horizon = now_ms.saturating_sub(self.window_ms);
        let mut latest: BTreeMap<&str, i64> = BTreeMap::new();
        for s in q.iter().filter(|s| s.at_ms >= horizon) {
            latest.insert(&s.proxy, s.in_flight);
        }
        (!latest.is_empty()).then(|| latest.values().sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use equilibrio_contract::report::MAX_REQUESTS;

    fn report(proxy: &str, requests: u64, in_flight: i64) -> Report {
        Report {
            service: "av".into(),
            proxy: proxy.into(),
            table_version: 1,
            window_ms: 1000,
            rate_limited: 0,
            endpoints: vec![EndpointReport {
                id: "a".into(),
                requests,
                errors: requests / 10,
                latency_sum_ms: requests as f64 * 2.0,
                latency_p95_ms: 5.0,
                in_flight,
                ejected: false,
            }],
            zone: None,
        }
    }

    #[test]
    fn proxies_are_counted_per_zone_within_the_window() {
        let mut r = Reports::new(10_000);
        let zoned = |proxy: &str, zone: &str| Report { zone: Some(zone.into()), ..report(proxy, 1, 0) };
        for (proxy, zone) in [("p1", "a"), ("p2", "a"), ("p3", "b"), ("p1", "a")] {
            r.record(&zoned(proxy, zone), 1_000);
        }
        r.record(&report("p4", 1, 0), 1_000);
        assert_eq!(r.proxy_zones("av", 1_000), BTreeMap::from([("a".into(), 2), ("b".into(), 1)]));
        assert!(r.proxy_zones("other", 1_000).is_empty());
        // p2 and p3 stop reporting
        r.record(&zoned("p1", "a"), 10_500);
        assert_eq!(r.proxy_zones("av", 12_000), BTreeMap::from([("a".into(), 1)]));
    }

    #[test]
    fn sums_over_proxies_and_the_window() {
        let mut r = Reports::new(60_000);
        for t in 1..=10u64 {
            r.record(&report("p1", 100, 3), t * 1000);
            r.record(&report("p2", 50, 2), t * 1000);
        }
        let t = r.traffic("av", "a", 10_000);
        assert!((t.requests_per_second - 1500.0 / 9.0).abs() < 1.0, "{t:?}");
        assert!((t.error_rate - 0.1).abs() < 0.01);
        assert_eq!(t.in_flight, 5);
        assert_eq!(t.latency_p95_ms, 5.0);
        assert_eq!(t.requests_total, 1500);
        assert_eq!(r.in_flight("av", "a", 10_000), Some(5));
        // the window forgets
        assert_eq!(r.in_flight("av", "a", 200_000), None);
        assert_eq!(r.traffic("av", "zz", 0), Traffic::default());
    }

    #[test]
    fn hostile_reports_are_refused_naming_the_field() {
        let mut bad = report("p", 10, 1);
        bad.endpoints[0].requests = u64::MAX;
        assert_eq!(bad.validate().unwrap_err().key, "endpoints[0].requests");
        let mut bad = report("p", 10, 1);
        bad.endpoints[0].errors = 11;
        assert_eq!(bad.validate().unwrap_err().key, "endpoints[0].errors");
        let mut bad = report("p", 10, -2);
        bad.endpoints[0].in_flight = -2;
        assert_eq!(bad.validate().unwrap_err().key, "endpoints[0].in_flight");
        let mut bad = report("p", 10, 1);
        bad.endpoints[0].latency_p95_ms = f64::INFINITY;
        assert_eq!(bad.validate().unwrap_err().key, "endpoints[0].latency_p95_ms");
        report("p", 10, 1).validate().unwrap();
        // the largest accepted values still add up without overflow
        let mut r = Reports::new(60_000);
        let mut big = report("p", 10, 1);
        big.endpoints[0].requests = MAX_REQUESTS;
        big.endpoints[0].errors = 0;
        for t in 0..100 {
            r.record(&big, t);
        }
        assert_eq!(r.traffic("av", "a", 100).requests_total, 100 * MAX_REQUESTS);
        r.retain(|_, id| id != "a");
        assert_eq!(r.traffic("av", "a", 100), Traffic::default());
    }
}
