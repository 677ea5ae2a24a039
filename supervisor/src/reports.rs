//! Traffic per instance from the proxies' reports (`POST /v1/reports`), kept in a time window.
//!
//! Each proxy reports per-endpoint aggregates every poll period. Request and error rates are summed over all proxies
//! across the window; in flight is the sum of each proxy's latest value; p95 is the largest recent p95 of any proxy
//! (a conservative merge: quantiles do not add). Pure: reports and time come in.

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::Serialize;

pub use equilibrio_contract::report::{EndpointReport, Report};

/// Reports are summed into buckets of this length: memory per instance is bounded by the window, not by how many
/// proxies report (50 proxies reporting 1,000 instances every second were 3 million samples a minute).
const BUCKET_MS: u64 = 1000;

/// What every proxy reported about one instance within one bucket.
#[derive(Debug, Clone, Default)]
struct Bucket {
    /// `at_ms / BUCKET_MS` of its reports.
    slot: u64,
    first_at_ms: u64,
    last_at_ms: u64,
    requests: u64,
    errors: u64,
    latency_sum_ms: f64,
    /// The largest p95 of a report with requests in it.
    p95_ms: f64,
}

/// One instance's window.
#[derive(Debug, Default)]
struct Instance {
    /// Oldest first; at most one per bucket of the window.
    buckets: VecDeque<Bucket>,
    /// Each proxy's latest in-flight count and when it reported it, by a hash of the proxy's id: a short contiguous
    /// list scanned in place (a map keyed by the id's string chased a pointer per report and endpoint).
    in_flight: Vec<InFlight>,
    total: u64,
}

#[derive(Debug, Clone, Copy)]
struct InFlight {
    proxy: u64,
    at_ms: u64,
    count: i64,
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
    /// By service, then instance id.
    instances: HashMap<String, HashMap<String, Instance>>,
    /// When each proxy in a zone last reported, by (service, zone, proxy id).
    proxies: BTreeMap<(String, String, String), u64>,
    /// Hashes proxy ids for [`Instance::in_flight`] (random keys: ids cannot be chosen to collide).
    proxy_hasher: std::hash::RandomState,
}

impl Reports {
    pub fn new(window_ms: u64) -> Reports {
        Reports {
            window_ms,
            instances: HashMap::new(),
            proxies: BTreeMap::new(),
            proxy_hasher: std::hash::RandomState::new(),
        }
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
        let horizon = now_ms.saturating_sub(self.window_ms);
        let slot = now_ms / BUCKET_MS;
        let proxy = std::hash::BuildHasher::hash_one(&self.proxy_hasher, &r.proxy);
        let service = match self.instances.get_mut(&r.service) {
            Some(s) => s,
            None => self.instances.entry(r.service.clone()).or_default(),
        };
        for e in &r.endpoints {
            let inst = match service.get_mut(&e.id) {
                Some(i) => i,
                None => service.entry(e.id.clone()).or_default(),
            };
            inst.total = inst.total.saturating_add(e.requests);
            if inst.buckets.back().is_none_or(|b| b.slot != slot) {
                inst.buckets.push_back(Bucket { slot, first_at_ms: now_ms, ..Bucket::default() });
            }
            if let Some(b) = inst.buckets.back_mut() {
                b.last_at_ms = now_ms;
                b.requests = b.requests.saturating_add(e.requests);
                b.errors = b.errors.saturating_add(e.errors);
                b.latency_sum_ms += e.latency_sum_ms;
                if e.requests > 0 {
                    b.p95_ms = b.p95_ms.max(e.latency_p95_ms);
                }
            }
            while inst.buckets.front().is_some_and(|b| b.last_at_ms < horizon) {
                inst.buckets.pop_front();
            }
            let latest = InFlight { proxy, at_ms: now_ms, count: e.in_flight };
            match inst.in_flight.iter_mut().find(|f| f.proxy == proxy) {
                Some(f) => *f = latest,
                None => {
                    inst.in_flight.retain(|f| f.at_ms >= horizon);
                    if inst.in_flight.len() < MAX_PROXIES {
                        inst.in_flight.push(latest);
                    }
                }
            }
        }
    }

    /// Forgets what was kept for instances that are gone (`keep` says which still exist).
    pub fn retain(&mut self, keep: impl Fn(&str, &str) -> bool) {
        for (s, instances) in self.instances.iter_mut() {
            instances.retain(|id, _| keep(s, id));
        }
        self.instances.retain(|_, instances| !instances.is_empty());
    }

    fn instance(&self, service: &str, id: &str) -> Option<&Instance> {
        self.instances.get(service)?.get(id)
    }

    pub fn traffic(&self, service: &str, id: &str, now_ms: u64) -> Traffic {
        self.traffic_over(service, id, now_ms, self.window_ms)
    }

    /// Traffic over the last `window_ms` only (the autoscaler samples a few seconds and averages over its own
    /// measurement windows).
    pub fn traffic_over(&self, service: &str, id: &str, now_ms: u64, window_ms: u64) -> Traffic {
        let Some(inst) = self.instance(service, id) else { return Traffic::default() };
        let total = inst.total;
        let window_ms = window_ms.min(self.window_ms);
        let horizon = now_ms.saturating_sub(window_ms);
        let recent = || inst.buckets.iter().filter(|b| b.last_at_ms >= horizon);
        let Some(first) = recent().next() else { return Traffic { requests_total: total, ..Traffic::default() } };
        let requests: u64 = recent().fold(0u64, |a, b| a.saturating_add(b.requests));
        let errors: u64 = recent().fold(0u64, |a, b| a.saturating_add(b.errors));
        let latency: f64 = recent().map(|b| b.latency_sum_ms).sum();
        let span_ms = now_ms.saturating_sub(first.first_at_ms).max(1000);
        Traffic {
            requests_per_second: requests as f64 * 1000.0 / span_ms as f64,
            error_rate: if requests == 0 { 0.0 } else { errors as f64 / requests as f64 },
            in_flight: in_flight_since(inst, horizon).unwrap_or(0),
            latency_p95_ms: recent().map(|b| b.p95_ms).fold(0.0, f64::max),
            latency_mean_ms: if requests == 0 { 0.0 } else { latency / requests as f64 },
            requests_total: total,
        }
    }

    /// In flight on an instance as the proxies last reported (`None` if no proxy reported it in the window).
    pub fn in_flight(&self, service: &str, id: &str, now_ms: u64) -> Option<i64> {
        in_flight_since(self.instance(service, id)?, now_ms.saturating_sub(self.window_ms))
    }
}

/// The sum of the proxies' latest in-flight counts reported at `horizon` or later; `None` if none reported since.
fn in_flight_since(inst: &Instance, horizon: u64) -> Option<i64> {
    let mut latest = inst.in_flight.iter().filter(|f| f.at_ms >= horizon).peekable();
    latest.peek()?;
    Some(latest.map(|f| f.count).sum())
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
    fn memory_is_bounded_by_the_window_not_by_the_reports() {
        let mut r = Reports::new(10_000);
        for t in 0..120u64 {
            for p in 0..50 {
                r.record(&report(&format!("p{p}"), 10, 1), t * 1000 + p);
            }
        }
        let inst = r.instance("av", "a").unwrap();
        assert!(inst.buckets.len() <= 11, "{} buckets", inst.buckets.len());
        assert_eq!(inst.in_flight.len(), 50);
        // 50 proxies x 10 requests a second over the last 10 s
        let t = r.traffic("av", "a", 119_049);
        assert!((t.requests_per_second - 500.0).abs() < 55.0, "{t:?}");
        assert_eq!(t.in_flight, 50);
        assert_eq!(t.requests_total, 120 * 50 * 10);
        // a short window counts only the proxies that reported within it
        r.record(&report("late", 10, 7), 200_000);
        assert_eq!(r.traffic_over("av", "a", 200_000, 5_000).in_flight, 7);
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
