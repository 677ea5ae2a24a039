//! The plugin configuration: the JSON an operator gives the filter, and its validation.
//!
//! The balancing policy's keys (`algorithm`, `sticky_sessions`, `rate_limiting`...; our users' vocabulary,
//! docs/configuration.md) are typed and validated in the contract crate ([`Policy`]), because the supervisor validates
//! the runtime policies it accepts with the same code; the rest (the service, the supervisor to poll, static
//! endpoints) is here. Parsing is strict: an unknown key, a wrong type or an out-of-range value is a [`FieldError`]
//! that names the key (as a dotted path) and the reason, so the proxy refuses the plugin with one clear log line
//! instead of running with a surprise.
//!
//! The supervisor may override the balancing policy at runtime (the `policy` object of the endpoint table). Those
//! overrides are merged into the static JSON and go through this same validation ([`Config::with_policy`]), so a
//! runtime policy can never reach a state that a static configuration could not.

use serde::Deserialize;
use serde_json::Value;

pub use equilibrio_contract::FieldError;
pub use equilibrio_contract::is_id_byte;
pub use equilibrio_contract::keyed::{Millis, deserialize_keyed, error_key, merge, parse_duration};
pub use equilibrio_contract::policy::{
    Algorithm, CircuitBreakerConfig, ConsistentHashConfig, FailurePercentageConfig, KeySource, LocalityConfig,
    ObservationConfig, POLICY_KEYS, PassiveHealthConfig, Policy, RateLimitConfig, SameSite, StickyConfig,
    SuccessRateConfig, valid_zone,
};
use equilibrio_contract::table::{Endpoint, EndpointState, Table};

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SupervisorConfig {
    /// The proxy's cluster name for the supervisor (Envoy: a STATIC cluster).
    pub cluster: String,
    /// Several supervisor nodes (one cluster each), instead of `cluster`: the poller asks one and moves to the next
    /// when it does not answer (or answers 5xx), so that it follows whichever nodes are up.
    pub clusters: Vec<String>,
    /// `:authority` of the calls.
    pub authority: String,
    pub poll_period: Millis,
    pub timeout: Millis,
    /// Bearer token sent with the calls.
    pub token: Option<String>,
    /// Answers larger than this are refused (the last good table is kept).
    pub max_table_bytes: u64,
    /// POST per-endpoint aggregates to `/v1/reports` every poll period.
    pub reports: bool,
    /// Identifies this proxy in reports.
    pub proxy_id: String,
}

impl SupervisorConfig {
    /// The clusters to poll, in order: `clusters`, or `cluster` alone.
    pub fn targets(&self) -> Vec<String> {
        if self.clusters.is_empty() { vec![self.cluster.clone()] } else { self.clusters.clone() }
    }
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        SupervisorConfig {
            cluster: "supervisor".into(),
            clusters: Vec::new(),
            authority: "127.0.0.1:9900".into(),
            poll_period: Millis(1000),
            timeout: Millis(900),
            token: None,
            max_table_bytes: 1 << 20,
            reports: true,
            proxy_id: "envoy".into(),
        }
    }
}

/// An endpoint given in the static configuration (used until the supervisor answers, or without a supervisor).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StaticEndpoint {
    pub id: String,
    pub address: String,
    #[serde(default = "equilibrio_contract::table::default_weight")]
    pub weight: u32,
    #[serde(default)]
    pub zone: String,
    #[serde(default)]
    pub tags: Vec<String>,
}

/// The whole validated configuration: the service, its balancing policy (the keys the supervisor may override at
/// runtime, [`POLICY_KEYS`], written at the top level of the JSON beside the others), and where endpoints come from.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub service: String,
    pub policy: Policy,
    /// Absent: no supervisor, the static endpoints are the table.
    pub supervisor: Option<SupervisorConfig>,
    pub endpoints: Vec<StaticEndpoint>,
    /// The zone this proxy runs in (zone-aware locality, see `crate::locality`); absent: no locality.
    pub zone: Option<String>,
}

/// The keys of the JSON that are not policy keys.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    service: String,
    #[serde(default)]
    supervisor: Option<SupervisorConfig>,
    #[serde(default)]
    endpoints: Vec<StaticEndpoint>,
    #[serde(default)]
    zone: Option<String>,
}

fn err(key: &str, reason: impl Into<String>) -> FieldError {
    FieldError::new(key, reason)
}

/// The parsed configuration plus its source JSON, kept to merge runtime policies into.
#[derive(Debug, Clone)]
pub struct ParsedConfig {
    pub config: Config,
    pub source: Value,
}

impl Config {
    /// The table made of the static endpoints of the configuration (all healthy).
    pub fn static_table(&self) -> Table {
        Table {
            service: self.service.clone(),
            version: 0,
            endpoints: self
                .endpoints
                .iter()
                .map(|e| Endpoint {
                    id: e.id.clone(),
                    address: e.address.clone(),
                    weight: e.weight,
                    state: EndpointState::Healthy,
                    zone: e.zone.clone(),
                    tags: e.tags.clone(),
                })
                .collect(),
            policy: None,
            hash_seed: None,
            proxy_zones: Default::default(),
        }
    }

    /// Parses and validates the plugin configuration bytes.
    pub fn parse(bytes: &[u8]) -> Result<ParsedConfig, FieldError> {
        let source: Value = serde_json::from_slice(bytes).map_err(|e| err("", format!("not valid JSON: {e}")))?;
        let config = Config::from_value(&source)?;
        Ok(ParsedConfig { config, source })
    }

    fn from_value(v: &Value) -> Result<Config, FieldError> {
        if !v.is_object() {
            return Err(err("", "expected a JSON object"));
        }
        // the policy keys and the other keys are read as two documents, so that an error keeps its key
        let (mut policy, mut settings) = (serde_json::Map::new(), serde_json::Map::new());
        for (key, value) in v.as_object().into_iter().flatten() {
            let part = if POLICY_KEYS.contains(&key.as_str()) { &mut policy } else { &mut settings };
            part.insert(key.clone(), value.clone());
        }
        let settings: Settings = deserialize_keyed(&Value::Object(settings)).map_err(|mut e| {
            if e.reason.starts_with("unknown field") && !e.key.contains('.') {
                let known = ["service", "supervisor", "endpoints", "zone"].iter().chain(&POLICY_KEYS);
                e.reason = format!(
                    "unknown field `{}`, expected one of {}",
                    e.key,
                    known.copied().collect::<Vec<_>>().join(", ")
                );
            }
            e
        })?;
        let policy = Policy::parse(&Value::Object(policy))?;
        let Settings { service, supervisor, endpoints, zone } = settings;
        let config = Config { service, policy, supervisor, endpoints, zone };
        config.validate()?;
        Ok(config)
    }

    /// The configuration with a runtime `policy` object merged in. Unknown policy keys are ignored (they may belong
    /// to a newer supervisor); known ones are merged key by key and validated as a whole.
    pub fn with_policy(source: &Value, policy: &Value) -> Result<Config, FieldError> {
        let Value::Object(policy) = policy else {
            return Err(err("policy", "expected a JSON object"));
        };
        let mut merged = source.clone();
        if let Value::Object(target) = &mut merged {
            for key in POLICY_KEYS {
                if let Some(value) = policy.get(key) {
                    merge(target.entry(key.to_string()).or_insert(Value::Null), value);
                }
            }
        }
        Config::from_value(&merged).map_err(|e| e.within("policy"))
    }

    fn validate(&self) -> Result<(), FieldError> {
        if self.service.is_empty() || !self.service.bytes().all(is_id_byte) {
            return Err(err("service", "must be 1 or more of [A-Za-z0-9._-]"));
        }
        if let Some(sup) = &self.supervisor {
            if sup.cluster.is_empty() {
                return Err(err("supervisor.cluster", "must not be empty"));
            }
            if sup.clusters.len() > 16 {
                return Err(err("supervisor.clusters", "at most 16 supervisor nodes"));
            }
            if let Some(i) = sup.clusters.iter().position(String::is_empty) {
                return Err(err(&format!("supervisor.clusters[{i}]"), "must not be empty"));
            }
            if sup.authority.is_empty() {
                return Err(err("supervisor.authority", "must not be empty"));
            }
            if sup.poll_period.0 < 100 || sup.poll_period.0 > 600_000 {
                return Err(err("supervisor.poll_period", "must be between 100ms and 10m"));
            }
            if sup.timeout.0 < 10 || sup.timeout.0 > 60_000 {
                return Err(err("supervisor.timeout", "must be between 10ms and 60s"));
            }
            if !(1024..=64 << 20).contains(&sup.max_table_bytes) {
                return Err(err("supervisor.max_table_bytes", "must be between 1024 and 67108864"));
            }
            if let Some(token) = &sup.token
                && (token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()))
            {
                return Err(err("supervisor.token", "must be printable ASCII without spaces"));
            }
        } else if self.endpoints.is_empty() {
            return Err(err("endpoints", "needed when there is no `supervisor` section"));
        }
        for (i, e) in self.endpoints.iter().enumerate() {
            equilibrio_contract::table::validate_endpoint_fields(&e.id, &e.address, e.weight)
                .map_err(|e| e.within(&format!("endpoints[{i}]")))?;
            if !e.zone.is_empty() && !valid_zone(&e.zone) {
                return Err(err(&format!("endpoints[{i}].zone"), "must be 1 to 64 of [A-Za-z0-9._-]"));
            }
            if e.tags.len() > 16 || e.tags.iter().any(|t| t.is_empty() || t.len() > 64 || !t.bytes().all(is_id_byte)) {
                return Err(err(&format!("endpoints[{i}].tags"), "at most 16, each 1 to 64 of [A-Za-z0-9._-]"));
            }
        }
        if let Some(zone) = &self.zone
            && !valid_zone(zone)
        {
            return Err(err("zone", "must be 1 to 64 of [A-Za-z0-9._-]"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<Config, FieldError> {
        Config::parse(v.to_string().as_bytes()).map(|p| p.config)
    }

    #[test]
    fn minimal_config_gets_the_plan_defaults() {
        let c = parse(json!({"service": "agente-vendedor", "supervisor": {}})).unwrap();
        assert_eq!(c.policy.algorithm, Algorithm::WeightedRoundRobin);
        assert_eq!(c.policy.sticky_sessions.cookie_name, "AGENTE_VENDEDOR_SESSION");
        assert_eq!(c.policy.sticky_sessions.ttl, Millis(3_600_000));
        assert_eq!(c.policy.rate_limiting.requests_per_minute, 1000);
        assert_eq!(c.policy.rate_limiting.burst_size, 100);
        assert_eq!(c.supervisor.unwrap().poll_period, Millis(1000));
    }

    #[test]
    fn unknown_key_is_named_with_its_path() {
        let e = parse(json!({"service": "s", "supervisor": {}, "sticky_sessions": {"ttl_s": 3}})).unwrap_err();
        assert_eq!(e.key, "sticky_sessions.ttl_s");
        assert!(e.reason.contains("unknown field"), "{e}");
        let e = parse(json!({"service": "s", "supervisor": {}, "algoritm": "random"})).unwrap_err();
        assert_eq!(e.key, "algoritm");
    }

    #[test]
    fn wrong_type_is_named_with_its_path() {
        let e = parse(json!({"service": "s", "supervisor": {}, "rate_limiting": {"burst_size": "many"}})).unwrap_err();
        assert_eq!(e.key, "rate_limiting.burst_size");
        let e = parse(json!({"service": "s", "supervisor": {}, "algorithm": "fastest"})).unwrap_err();
        assert_eq!(e.key, "algorithm");
        assert!(e.to_string().contains("`algorithm`"), "{e}");
    }

    #[test]
    fn out_of_range_values_are_refused() {
        let base = json!({"service": "s", "supervisor": {}});
        let cases = [
            (json!({"rate_limiting": {"burst_size": 0}}), "rate_limiting.burst_size"),
            (json!({"rate_limiting": {"key": "path"}}), "rate_limiting.key"),
            (json!({"sticky_sessions": {"enabled": true}}), "sticky_sessions.secret"),
            (json!({"sticky_sessions": {"enabled": true, "secret": "short"}}), "sticky_sessions.secret"),
            (json!({"sticky_sessions": {"same_site": "none", "secure": false}}), "sticky_sessions.same_site"),
            (json!({"consistent_hash": {"load_factor": 0.5}}), "consistent_hash.load_factor"),
            (json!({"consistent_hash": {"key": "body"}}), "consistent_hash.key"),
            (json!({"supervisor": {"poll_period": "5ms"}}), "supervisor.poll_period"),
            (json!({"passive_health": {"max_ejection_percent": 101}}), "passive_health.max_ejection_percent"),
            (json!({"observation": {"max_per_second": 2_000_000}}), "observation.max_per_second"),
            (json!({"observation": {"max_per_second": -1}}), "observation.max_per_second"),
        ];
        for (patch, key) in cases {
            let mut v = base.clone();
            merge(&mut v, &patch);
            let e = parse(v).unwrap_err();
            assert_eq!(e.key, key, "{e}");
        }
    }

    #[test]
    fn no_supervisor_needs_static_endpoints() {
        let e = parse(json!({"service": "s"})).unwrap_err();
        assert_eq!(e.key, "endpoints");
        let e = parse(json!({"service": "s", "endpoints": [{"id": "a b", "address": "127.0.0.1:1"}]})).unwrap_err();
        assert_eq!(e.key, "endpoints[0].id");
        let e = parse(json!({"service": "s", "endpoints": [{"id": "a", "address": "nowhere"}]})).unwrap_err();
        assert_eq!(e.key, "endpoints[0].address");
        parse(json!({"service": "s", "endpoints": [{"id": "a", "address": "127.0.0.1:8080"}]})).unwrap();
    }

    #[test]
    fn durations_accept_seconds_and_units() {
        assert_eq!(parse_duration(&json!(30)), Ok(30_000));
        assert_eq!(parse_duration(&json!(0.5)), Ok(500));
        assert_eq!(parse_duration(&json!("500ms")), Ok(500));
        assert_eq!(parse_duration(&json!("2s")), Ok(2000));
        assert_eq!(parse_duration(&json!("5m")), Ok(300_000));
        assert_eq!(parse_duration(&json!("1h")), Ok(3_600_000));
        assert!(parse_duration(&json!("5 parsecs")).is_err());
        assert!(parse_duration(&json!(-1)).is_err());
        assert!(parse_duration(&json!(true)).is_err());
    }

    #[test]
    fn policy_overrides_merge_and_validate() {
        let p = Config::parse(br#"{"service":"s","supervisor":{},"rate_limiting":{"enabled":true,"burst_size":5}}"#)
            .unwrap();
        let c = Config::with_policy(
            &p.source,
            &json!({"algorithm": "random", "rate_limiting": {"requests_per_minute": 60}, "future_key": 1}),
        )
        .unwrap();
        assert_eq!(c.policy.algorithm, Algorithm::Random);
        assert_eq!(c.policy.rate_limiting.requests_per_minute, 60);
        assert_eq!(c.policy.rate_limiting.burst_size, 5, "keys the policy does not name keep their static value");
        let e = Config::with_policy(&p.source, &json!({"sticky_sessions": {"enabled": true}})).unwrap_err();
        assert_eq!(e.key, "policy.sticky_sessions.secret");
    }
}
