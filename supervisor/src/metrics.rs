//! Prometheus metrics (`GET /metrics`), with `prometheus-client`: counters and histograms recorded as things happen,
//! gauges filled from the registry and the reports at scrape time. One `equilibrio_supervisor_` prefix, base units,
//! labels limited to service, instance, state and result.

use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::events::EventKind;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CheckLabels {
    service: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabel {
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    service: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InstanceLabels {
    service: String,
    instance: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceKind {
    service: String,
    kind: String,
}

type ServiceFloat = Family<ServiceLabel, Gauge<f64, std::sync::atomic::AtomicU64>>;

/// Per-service scaling values for the scrape.
pub struct ScalingSample {
    pub service: String,
    pub current: u32,
    pub desired: u32,
    pub cpu_avg: f64,
    pub cpu_peak: f64,
    pub memory_avg: f64,
    pub memory_peak: f64,
    pub cost_per_request: f64,
    pub efficiency: f64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

type FloatFamily = Family<InstanceLabels, Gauge<f64, std::sync::atomic::AtomicU64>>;

/// Per-instance values for the scrape.
pub struct InstanceSample {
    pub service: String,
    pub instance: String,
    pub state: &'static str,
    pub requests_per_second: f64,
    pub error_rate: f64,
    pub in_flight: i64,
    pub latency_p95_seconds: f64,
}

pub struct Metrics {
    registry: Mutex<Registry>,
    checks: Family<CheckLabels, Counter>,
    check_seconds: Family<ServiceLabel, Histogram>,
    events: Family<KindLabel, Counter>,
    reports: Counter,
    reports_refused: Counter,
    store_conflicts: Counter,
    leader: prometheus_client::metrics::gauge::Gauge,
    report_unknown_endpoints: Counter,
    /// Requests whose handler panicked (answered 500; the process serves on).
    pub handler_panics: Counter,
    instances: Family<StateLabels, Gauge>,
    rps: FloatFamily,
    errors: FloatFamily,
    in_flight: Family<InstanceLabels, Gauge>,
    p95: FloatFamily,
    scaling_events: Family<ServiceKind, Counter>,
    instance_seconds: Family<ServiceLabel, Counter<f64, std::sync::atomic::AtomicU64>>,
    scaling_gauges: Vec<(&'static str, ServiceFloat)>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("equilibrio_supervisor");
        let checks = Family::<CheckLabels, Counter>::default();
        registry.register("health_checks", "Health checks by result", checks.clone());
        let check_seconds = Family::<ServiceLabel, Histogram>::new_with_constructor(|| {
            Histogram::new([0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0])
        });
        registry.register("health_check_duration_seconds", "Health check latency", check_seconds.clone());
        let events = Family::<KindLabel, Counter>::default();
        registry.register("events", "Events by kind", events.clone());
        let reports = Counter::default();
        registry.register("reports", "Reports received from proxies", reports.clone());
        let reports_refused = Counter::default();
        registry.register("reports_refused", "Reports refused as malformed (422)", reports_refused.clone());
        let store_conflicts = Counter::default();
        registry.register(
            "store_conflicts",
            "Changes made again because another supervisor changed the same entries first (etcd)",
            store_conflicts.clone(),
        );
        let leader = prometheus_client::metrics::gauge::Gauge::default();
        registry.register("leader", "1 while this supervisor runs health checks and the autoscaler", leader.clone());
        let report_unknown_endpoints = Counter::default();
        registry.register(
            "report_unknown_endpoints",
            "Endpoints in reports that name no instance of the service (dropped, not kept)",
            report_unknown_endpoints.clone(),
        );
        let handler_panics = Counter::default();
        registry.register(
            "handler_panics",
            "API requests whose handler panicked: answered 500, logged, the process serves on",
            handler_panics.clone(),
        );
        let instances = Family::<StateLabels, Gauge>::default();
        registry.register("instances", "Instances by table state", instances.clone());
        let rps = FloatFamily::default();
        registry.register("instance_requests_per_second", "Request rate from proxy reports", rps.clone());
        let errors = FloatFamily::default();
        registry.register("instance_error_ratio", "Share of requests that failed", errors.clone());
        let in_flight = Family::<InstanceLabels, Gauge>::default();
        registry.register("instance_in_flight", "Requests in flight as last reported", in_flight.clone());
        let p95 = FloatFamily::default();
        registry.register("instance_latency_p95_seconds", "p95 latency from proxy reports", p95.clone());
        let scaling_events = Family::<ServiceKind, Counter>::default();
        registry.register(
            "scaling_events",
            "Scaling decisions by kind (scale_up, scale_down, manual, failed, replaced, replacements_held)",
            scaling_events.clone(),
        );
        let instance_seconds = Family::<ServiceLabel, Counter<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "instance_seconds",
            "Seconds of running instances, measured on a monotonic clock (for cost)",
            instance_seconds.clone(),
        );
        let mut scaling_gauges = Vec::new();
        for (name, help) in [
            ("scaling_current_instances", "Instances serving or starting"),
            ("scaling_desired_instances", "Instances the autoscaler wants"),
            ("cpu_percent_average", "Mean CPU utilization of the containers' limits"),
            ("cpu_percent_peak", "Peak CPU utilization"),
            ("memory_percent_average", "Mean memory utilization"),
            ("memory_percent_peak", "Peak memory utilization"),
            ("cost_per_request", "Instance cost per request at the configured price per instance-hour"),
            ("efficiency_ratio", "Used over allocated capacity"),
        ] {
            let f = ServiceFloat::default();
            registry.register(name, help, f.clone());
            scaling_gauges.push((name, f));
        }
        Metrics {
            scaling_events,
            instance_seconds,
            scaling_gauges,
            registry: Mutex::new(registry),
            checks,
            check_seconds,
            events,
            reports,
            reports_refused,
            store_conflicts,
            leader,
            report_unknown_endpoints,
            handler_panics,
            instances,
            rps,
            errors,
            in_flight,
            p95,
        }
    }
}

impl Metrics {
    pub fn check(&self, service: &str, ok: bool, seconds: f64) {
        let result = if ok { "success" } else { "failure" };
        self.checks.get_or_create(&CheckLabels { service: service.into(), result: result.into() }).inc();
        self.check_seconds.get_or_create(&ServiceLabel { service: service.into() }).observe(seconds);
    }

    pub fn event(&self, kind: EventKind) {
        let kind = serde_json::to_value(kind).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
        self.events.get_or_create(&KindLabel { kind }).inc();
    }

    pub fn scaling_event(&self, service: &str, kind: &str) {
        self.scaling_events.get_or_create(&ServiceKind { service: service.into(), kind: kind.into() }).inc();
    }

    pub fn instance_seconds(&self, service: &str, seconds: f64) {
        self.instance_seconds.get_or_create(&ServiceLabel { service: service.into() }).inc_by(seconds);
    }

    pub fn store_conflict(&self) {
        self.store_conflicts.inc();
    }

    pub fn set_leader(&self, leads: bool) {
        self.leader.set(i64::from(leads));
    }

    pub fn report_refused(&self) {
        self.reports_refused.inc();
    }

    pub fn report_unknown_endpoints(&self, n: usize) {
        self.report_unknown_endpoints.inc_by(n as u64);
    }

    pub fn report(&self) {
        self.reports.inc();
    }

    /// The text exposition, with the gauges set from `samples`.
    pub fn render(&self, samples: &[InstanceSample], scaling: &[ScalingSample]) -> String {
        for (name, family) in &self.scaling_gauges {
            family.clear();
            for s in scaling {
                let v = match *name {
                    "scaling_current_instances" => f64::from(s.current),
                    "scaling_desired_instances" => f64::from(s.desired),
                    "cpu_percent_average" => s.cpu_avg,
                    "cpu_percent_peak" => s.cpu_peak,
                    "memory_percent_average" => s.memory_avg,
                    "memory_percent_peak" => s.memory_peak,
                    "cost_per_request" => s.cost_per_request,
                    _ => s.efficiency,
                };
                family.get_or_create(&ServiceLabel { service: s.service.clone() }).set(v);
            }
        }
        self.instances.clear();
        self.rps.clear();
        self.errors.clear();
        self.in_flight.clear();
        self.p95.clear();
        for s in samples {
            self.instances.get_or_create(&StateLabels { service: s.service.clone(), state: s.state.into() }).inc();
            let l = InstanceLabels { service: s.service.clone(), instance: s.instance.clone() };
            self.rps.get_or_create(&l).set(s.requests_per_second);
            self.errors.get_or_create(&l).set(s.error_rate);
            self.in_flight.get_or_create(&l).set(s.in_flight);
            self.p95.get_or_create(&l).set(s.latency_p95_seconds);
        }
        let mut out = String::new();
        if let Ok(reg) = self.registry.lock() {
            let _ = prometheus_client::encoding::text::encode(&mut out, &reg);
        }
        out
    }
}
