//! Metrics defined by the filter (Envoy shows them at `/stats/prometheus` under the given name, no labels, summed
//! over all VMs). Names follow Prometheus conventions under one `equilibrio_` prefix; per-endpoint series carry the
//! endpoint id in the name (ids are restricted to `[A-Za-z0-9._-]`; `.` and `-` become `_`).

use std::collections::HashMap;

use super::abi::{self, MetricType};

#[derive(Default)]
pub struct Metrics {
    ids: HashMap<String, u32>,
}

impl Metrics {
    fn id(&mut self, kind: MetricType, name: &str) -> Option<u32> {
        if let Some(id) = self.ids.get(name) {
            return Some(*id);
        }
        let id = abi::define_metric(kind, name).ok()?;
        self.ids.insert(name.to_string(), id);
        Some(id)
    }

    pub fn add(&mut self, name: &str, by: u64) {
        if let Some(id) = self.id(MetricType::Counter, name) {
            // define the series even when there is nothing to add, so it shows as 0
            if by > 0 {
                abi::increment_metric(id, i64::try_from(by).unwrap_or(i64::MAX));
            }
        }
    }

    pub fn set(&mut self, name: &str, value: u64) {
        if let Some(id) = self.id(MetricType::Gauge, name) {
            abi::record_metric(id, value);
        }
    }
}

/// `equilibrio_endpoint_<id>_<suffix>` with the id made metric-safe.
pub fn endpoint_metric(id: &str, suffix: &str) -> String {
    let safe: String = id.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    format!("equilibrio_endpoint_{safe}_{suffix}")
}
