//! The proxies' reports to the supervisor (`POST /v1/reports`): the filter builds them, the supervisor validates them
//! ([`Report::validate`]) before it believes any figure.

use serde::{Deserialize, Serialize};

use crate::field_error::FieldError;

/// The body of `POST /v1/reports`: what a proxy's filter saw of each endpoint over one window.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
pub struct Report {
    pub service: String,
    pub proxy: String,
    /// The version of the table the proxy used (unix milliseconds).
    #[serde(default)]
    #[cfg_attr(feature = "schema", schema(maximum = 9_223_372_036_854_775_807_u64))]
    pub table_version: u64,
    #[cfg_attr(feature = "schema", schema(maximum = 3_600_000))]
    pub window_ms: u64,
    #[serde(default)]
    #[cfg_attr(feature = "schema", schema(maximum = 1_000_000_000))]
    pub rate_limited: u64,
    #[cfg_attr(feature = "schema", schema(max_items = 4096))]
    pub endpoints: Vec<EndpointReport>,
    /// The zone the proxy runs in, if it has one (the supervisor counts proxies per zone for locality).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
pub struct EndpointReport {
    pub id: String,
    #[cfg_attr(feature = "schema", schema(maximum = 1_000_000_000))]
    pub requests: u64,
    /// At most `requests`.
    #[cfg_attr(feature = "schema", schema(maximum = 1_000_000_000))]
    pub errors: u64,
    /// At most a day per request.
    #[serde(default)]
    #[cfg_attr(feature = "schema", schema(minimum = 0))]
    pub latency_sum_ms: f64,
    #[serde(default)]
    #[cfg_attr(feature = "schema", schema(minimum = 0, maximum = 86_400_000))]
    pub latency_p95_ms: f64,
    #[serde(default)]
    #[cfg_attr(feature = "schema", schema(minimum = 0, maximum = 10_000_000))]
    pub in_flight: i64,
    #[serde(default)]
    pub ejected: bool,
}

/// Bounds of a report: far above anything a proxy sends in one window, low enough that sums over a window and over
/// every proxy cannot overflow.
pub const MAX_REQUESTS: u64 = 1_000_000_000;
const MAX_IN_FLIGHT: i64 = 10_000_000;
const MAX_LATENCY_MS: f64 = 86_400_000.0;
const MAX_WINDOW_MS: u64 = 3_600_000;

impl Report {
    /// Checks a report from a proxy; on error gives the dotted field and the reason (the report is refused whole, and
    /// what the supervisor knows stays as it was).
    pub fn validate(&self) -> Result<(), FieldError> {
        let err = |f: String, r: &str| Err(FieldError::new(f, r));
        if self.table_version > i64::MAX as u64 {
            // versions are unix milliseconds; the document's integers are int64
            return err("table_version".into(), "must be at most 9223372036854775807");
        }
        if self.window_ms > MAX_WINDOW_MS {
            return err("window_ms".into(), "must be at most 1 hour");
        }
        if self.endpoints.len() > crate::table::MAX_ENDPOINTS {
            return err("endpoints".into(), "more endpoints than a table holds");
        }
        if self.zone.as_deref().is_some_and(|z| !crate::policy::valid_zone(z)) {
            return err("zone".into(), "must be 1 to 64 of [A-Za-z0-9._-]");
        }
        if self.rate_limited > MAX_REQUESTS {
            return err("rate_limited".into(), "must be at most 1000000000");
        }
        for (i, e) in self.endpoints.iter().enumerate() {
            let f = |name: &str| format!("endpoints[{i}].{name}");
            if e.requests > MAX_REQUESTS {
                return err(f("requests"), "must be at most 1000000000");
            }
            if e.errors > e.requests {
                return err(f("errors"), "must not exceed requests");
            }
            if !(0..=MAX_IN_FLIGHT).contains(&e.in_flight) {
                return err(f("in_flight"), "must be between 0 and 10000000");
            }
            for (name, v) in [
                ("latency_sum_ms", e.latency_sum_ms / (e.requests.max(1) as f64)),
                ("latency_p95_ms", e.latency_p95_ms),
            ] {
                if !(v.is_finite() && (0.0..=MAX_LATENCY_MS).contains(&v)) {
                    return err(f(name), "must be a finite number of milliseconds, at most a day per request");
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(requests: u64, errors: u64) -> Report {
        Report {
            service: "av".into(),
            proxy: "p".into(),
            table_version: 1,
            window_ms: 1000,
            rate_limited: 0,
            endpoints: vec![EndpointReport {
                id: "a".into(),
                requests,
                errors,
                latency_sum_ms: 10.0,
                latency_p95_ms: 2.0,
                in_flight: 0,
                ejected: false,
            }],
            zone: None,
        }
    }

    #[test]
    fn a_report_outside_its_bounds_names_the_field() {
        assert!(report(10, 1).validate().is_ok());
        assert_eq!(report(10, 11).validate().unwrap_err().key, "endpoints[0].errors");
        assert_eq!(report(u64::MAX, 0).validate().unwrap_err().key, "endpoints[0].requests");
        let mut r = report(1, 0);
        r.table_version = u64::MAX;
        assert_eq!(r.validate().unwrap_err().key, "table_version");
        let mut r = report(1, 0);
        r.zone = Some("eu west".into());
        assert_eq!(r.validate().unwrap_err().key, "zone");
        let json = serde_json::to_string(&report(3, 1)).unwrap();
        assert_eq!(serde_json::from_str::<Report>(&json).unwrap(), report(3, 1), "the wire form round-trips");
    }
}
