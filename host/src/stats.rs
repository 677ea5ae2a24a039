//! Statistics: the counters, gauges and histograms that filters define (`proxy_define_metric`) and the proxy's own,
//! named as Envoy names them (`wasmcustom.<name>`, `cluster.<name>.upstream_rq_retry`,
//! `listener.<address>.worker_<n>.downstream_cx_total`...) so dashboards and alerts work with either proxy. Served
//! by the admin endpoint as `/stats` (text) and `/stats/prometheus`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::abi::types::MetricKind;

/// Envoy's default histogram buckets.
const BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0, 300000.0,
    600000.0, 1800000.0, 3600000.0,
];

pub struct Metric {
    pub name: String,
    pub kind: MetricKind,
    value: AtomicI64,
    buckets: Vec<AtomicU64>,
    sum: AtomicU64,
}

impl Metric {
    fn new(name: String, kind: MetricKind) -> Metric {
        let buckets =
            if kind == MetricKind::Histogram { BUCKETS.iter().map(|_| AtomicU64::new(0)).collect() } else { vec![] };
        Metric { name, kind, value: AtomicI64::new(0), buckets, sum: AtomicU64::new(0) }
    }

    /// Adds to a counter or gauge (a counter never goes below zero).
    pub fn increment(&self, by: i64) {
        match self.kind {
            MetricKind::Counter if by < 0 => {}
            MetricKind::Histogram => self.record(by.max(0) as u64),
            _ => {
                self.value.fetch_add(by, Ordering::Relaxed);
            }
        }
    }

    pub fn inc(&self) {
        self.value.fetch_add(1, Ordering::Relaxed);
    }

    /// Sets a gauge, adds to a counter, or records a histogram sample.
    pub fn record(&self, v: u64) {
        match self.kind {
            MetricKind::Gauge => self.value.store(i64::try_from(v).unwrap_or(i64::MAX), Ordering::Relaxed),
            MetricKind::Counter => {
                self.value.fetch_add(i64::try_from(v).unwrap_or(i64::MAX), Ordering::Relaxed);
            }
            MetricKind::Histogram => {
                // the sample count lives in `value`
                self.value.fetch_add(1, Ordering::Relaxed);
                self.sum.fetch_add(v, Ordering::Relaxed);
                if let Some(i) = BUCKETS.iter().position(|b| v as f64 <= *b) {
                    self.buckets[i].fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    pub fn get(&self) -> i64 {
        self.value.load(Ordering::Relaxed)
    }
}

/// A metric name already defined with another kind (or the registry is full).
#[derive(Debug, PartialEq, Eq)]
pub struct KindClash;

/// The process-wide registry. Ids are indices, stable for the life of the process; defining a name twice returns
/// the same id (every worker's VM defines the same metrics).
#[derive(Default)]
pub struct Stats {
    metrics: RwLock<Vec<Arc<Metric>>>,
    index: Mutex<HashMap<String, u32>>,
}

impl Stats {
    pub fn define(&self, kind: MetricKind, name: &str) -> Result<u32, KindClash> {
        let mut index = self.index.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(id) = index.get(name) {
            return if self.get(*id).is_some_and(|m| m.kind == kind) { Ok(*id) } else { Err(KindClash) };
        }
        let mut metrics = self.metrics.write().unwrap_or_else(|p| p.into_inner());
        let id = u32::try_from(metrics.len()).map_err(|_| KindClash)?;
        metrics.push(Arc::new(Metric::new(name.to_string(), kind)));
        index.insert(name.to_string(), id);
        Ok(id)
    }

    /// A filter-defined metric: Envoy files them under `wasmcustom.`.
    pub fn define_custom(&self, kind: MetricKind, name: &str) -> Result<u32, KindClash> {
        self.define(kind, &format!("wasmcustom.{name}"))
    }

    pub fn get(&self, id: u32) -> Option<Arc<Metric>> {
        self.metrics.read().unwrap_or_else(|p| p.into_inner()).get(id as usize).cloned()
    }

    /// The proxy's own counter or gauge by name (created on first use).
    pub fn handle(&self, kind: MetricKind, name: &str) -> Arc<Metric> {
        match self.define(kind, name).ok().and_then(|id| self.get(id)) {
            Some(m) => m,
            // a name clash of kinds: a detached metric keeps the caller working
            None => Arc::new(Metric::new(name.to_string(), kind)),
        }
    }

    fn sorted(&self) -> Vec<Arc<Metric>> {
        let mut all = self.metrics.read().unwrap_or_else(|p| p.into_inner()).clone();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Envoy's `/stats` text: `name: value`, optionally only names matching `filter`.
    pub fn render_text(&self, filter: Option<&regex_lite::Regex>) -> String {
        let mut out = String::new();
        for m in self.sorted() {
            if filter.is_some_and(|f| !f.is_match(&m.name)) {
                continue;
            }
            if m.kind == MetricKind::Histogram {
                out.push_str(&format!("{}: count={} sum={}\n", m.name, m.get(), m.sum.load(Ordering::Relaxed)));
            } else {
                out.push_str(&format!("{}: {}\n", m.name, m.get()));
            }
        }
        out
    }

    /// Prometheus text exposition, with Envoy's `envoy_` prefix and name sanitizing.
    pub fn render_prometheus(&self) -> String {
        let mut out = String::new();
        for m in self.sorted() {
            let name = prometheus_name(&m.name);
            match m.kind {
                MetricKind::Counter => out.push_str(&format!("# TYPE {name} counter\n{name} {}\n", m.get())),
                MetricKind::Gauge => out.push_str(&format!("# TYPE {name} gauge\n{name} {}\n", m.get())),
                MetricKind::Histogram => {
                    out.push_str(&format!("# TYPE {name} histogram\n"));
                    let mut cumulative = 0;
                    for (b, c) in BUCKETS.iter().zip(&m.buckets) {
                        cumulative += c.load(Ordering::Relaxed);
                        out.push_str(&format!("{name}_bucket{{le=\"{b}\"}} {cumulative}\n"));
                    }
                    out.push_str(&format!("{name}_bucket{{le=\"+Inf\"}} {}\n", m.get()));
                    out.push_str(&format!("{name}_sum {}\n{name}_count {}\n", m.sum.load(Ordering::Relaxed), m.get()));
                }
            }
        }
        out
    }
}

fn prometheus_name(stat: &str) -> String {
    let mut name = String::with_capacity(stat.len() + 6);
    name.push_str("envoy_");
    for c in stat.chars() {
        name.push(if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' });
    }
    name
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn define_is_idempotent_per_name_and_kind() {
        let s = Stats::default();
        let a = s.define_custom(MetricKind::Counter, "x").unwrap();
        assert_eq!(s.define_custom(MetricKind::Counter, "x").unwrap(), a);
        assert!(s.define_custom(MetricKind::Gauge, "x").is_err());
        s.get(a).unwrap().increment(3);
        s.get(a).unwrap().increment(-1);
        assert_eq!(s.get(a).unwrap().get(), 3, "a counter never decreases");
        assert!(s.get(99).is_none());
    }

    #[test]
    fn renders_like_envoy() {
        let s = Stats::default();
        let g = s.define_custom(MetricKind::Gauge, "table_version").unwrap();
        s.get(g).unwrap().record(17);
        let h = s.define_custom(MetricKind::Histogram, "latency").unwrap();
        s.get(h).unwrap().record(3);
        s.get(h).unwrap().record(700);
        s.handle(MetricKind::Counter, "cluster.backend.upstream_rq_retry").inc();
        let text = s.render_text(None);
        assert!(text.contains("wasmcustom.table_version: 17\n"), "{text}");
        assert!(text.contains("cluster.backend.upstream_rq_retry: 1\n"), "{text}");
        let re = regex_lite::Regex::new("^wasmcustom.table_version$").unwrap();
        assert_eq!(s.render_text(Some(&re)), "wasmcustom.table_version: 17\n");
        let prom = s.render_prometheus();
        assert!(prom.contains("envoy_wasmcustom_table_version 17\n"), "{prom}");
        assert!(prom.contains("envoy_wasmcustom_latency_bucket{le=\"5\"} 1\n"), "{prom}");
        assert!(prom.contains("envoy_wasmcustom_latency_bucket{le=\"1000\"} 2\n"), "{prom}");
        assert!(prom.contains("envoy_wasmcustom_latency_count 2\n"), "{prom}");
    }
}
