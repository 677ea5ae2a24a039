//! The plugin configuration: the JSON an operator gives the filter, and its validation.
//!
//! Keys follow the original plan's vocabulary (`algorithm`, `sticky_sessions`, `rate_limiting`...). Parsing is strict:
//! an unknown key, a wrong type or an out-of-range value is a [`ConfigError`] that names the key (as a dotted path) and
//! the reason, so the proxy refuses the plugin with one clear log line instead of running with a surprise.
//!
//! The supervisor may override the balancing policy at runtime (the `policy` object of the endpoint table). Those
//! overrides are merged into the static JSON and go through this same validation ([`Config::with_policy`]), so a
//! runtime policy can never reach a state that a static configuration could not.

use serde::Deserialize;
use serde_json::Value;
use std::fmt;

pub use equilibrio_contract::is_id_byte;
pub use equilibrio_contract::keyed::{Millis, deserialize_keyed, error_key, merge, parse_duration};
use equilibrio_contract::table::{Endpoint, EndpointState, Table};

/// The balancing algorithm for new sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// Smooth weighted round robin (nginx): exact proportions, no bursts.
    #[default]
    WeightedRoundRobin,
    /// Round robin that ignores weights (every weight counts as 1; weight 0 still excluded).
    RoundRobin,
    /// Power of two choices over in-flight requests shared by all workers, weighted.
    LeastConnections,
    /// Power of two choices over peak-EWMA latency times (in-flight + 1).
    ResponseTime,
    /// Consistent hash of the client address (no load bound: a client keeps its endpoint while it is available).
    IpHash,
    /// Consistent hash with bounded load on a key taken from the request (`consistent_hash.key`).
    ConsistentHash,
    /// Weighted random.
    Random,
}

impl Algorithm {
    /// Whether selection reads the in-flight counts (which must then be exact across workers at every request).
    pub fn balances_on_inflight(self) -> bool {
        matches!(self, Algorithm::LeastConnections | Algorithm::ResponseTime | Algorithm::ConsistentHash)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::WeightedRoundRobin => "weighted_round_robin",
            Algorithm::RoundRobin => "round_robin",
            Algorithm::LeastConnections => "least_connections",
            Algorithm::ResponseTime => "response_time",
            Algorithm::IpHash => "ip_hash",
            Algorithm::ConsistentHash => "consistent_hash",
            Algorithm::Random => "random",
        }
    }
}

/// Where a request's hash key (or rate-limit key) comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// The client address (the peer, or the trusted X-Forwarded-For entry).
    ClientAddress,
    /// A request header, by lower-case name.
    Header(String),
    /// A cookie, by name.
    Cookie(String),
    /// The request path without its query string.
    Path,
    /// A query-string parameter, by name.
    Query(String),
}

impl KeySource {
    /// Parses `client_address`, `path`, `header:<name>`, `cookie:<name>` or `query:<name>`.
    pub fn parse(text: &str) -> Result<KeySource, String> {
        let named = |prefix: &str| -> Option<Result<String, String>> {
            text.strip_prefix(prefix).map(|name| {
                if name.is_empty() || !name.bytes().all(is_token_byte) {
                    Err(format!("`{text}` needs a name of token characters after `{prefix}`"))
                } else {
                    Ok(name.to_string())
                }
            })
        };
        match text {
            "client_address" => Ok(KeySource::ClientAddress),
            "path" => Ok(KeySource::Path),
            _ => {
                if let Some(name) = named("header:") {
                    return name.map(|n| KeySource::Header(n.to_ascii_lowercase()));
                }
                if let Some(name) = named("cookie:") {
                    return name.map(KeySource::Cookie);
                }
                if let Some(name) = named("query:") {
                    return name.map(KeySource::Query);
                }
                Err(format!("`{text}` is not one of client_address, path, header:<name>, cookie:<name>, query:<name>"))
            }
        }
    }
}

/// RFC 9110 token characters: what header, cookie and parameter names may use here.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SameSite {
    Strict,
    Lax,
    None,
}

impl SameSite {
    pub fn as_str(self) -> &'static str {
        match self {
            SameSite::Strict => "Strict",
            SameSite::Lax => "Lax",
            SameSite::None => "None",
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ConsistentHashConfig {
    /// Where the key comes from; a request without it is balanced by weighted round robin.
    pub key: String,
    /// Bounded-load factor c (Mirrokni et al.): no endpoint takes more than c times the mean in-flight load.
    pub load_factor: f64,
    /// Virtual nodes on the ring for the heaviest endpoint (others get a share proportional to weight).
    pub vnodes: u32,
}

impl Default for ConsistentHashConfig {
    fn default() -> Self {
        ConsistentHashConfig { key: "path".into(), load_factor: 1.25, vnodes: 160 }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StickyConfig {
    pub enabled: bool,
    pub cookie_name: String,
    /// Lifetime in seconds (Max-Age and the signed expiry).
    pub ttl: Millis,
    pub secure: bool,
    pub http_only: bool,
    pub same_site: SameSite,
    /// HMAC-SHA256 key; required (16 bytes or more) when enabled.
    pub secret: Option<String>,
}

impl Default for StickyConfig {
    fn default() -> Self {
        StickyConfig {
            enabled: false,
            cookie_name: "AGENTE_VENDEDOR_SESSION".into(),
            ttl: Millis(3_600_000),
            secure: true,
            http_only: true,
            same_site: SameSite::Lax,
            secret: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    pub enabled: bool,
    pub requests_per_minute: u64,
    pub burst_size: u64,
    /// `client_address` or `header:<name>` (a request without that header falls back to the client address).
    pub key: String,
    /// Trusted proxies in front of us: the client is the Nth X-Forwarded-For entry from the right.
    pub xff_trusted_hops: u32,
    /// Number of bucket slots shared by all workers: the memory bound under a flood of distinct keys.
    pub slots: u32,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            enabled: false,
            requests_per_minute: 1000,
            burst_size: 100,
            key: "client_address".into(),
            xff_trusted_hops: 0,
            slots: 8192,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PassiveHealthConfig {
    pub enabled: bool,
    /// Connect failures or resets in a row (as seen by one worker) that eject an endpoint.
    pub consecutive_gateway_failures: u32,
    /// 5xx responses in a row (as seen by one worker) that eject an endpoint.
    pub consecutive_5xx: u32,
    /// First ejection time; the n-th ejection in a row lasts n times this, up to `max_ejection_time`.
    pub base_ejection_time: Millis,
    pub max_ejection_time: Millis,
    /// At most this share of the endpoints is ejected at once (at least one).
    pub max_ejection_percent: u32,
}

impl Default for PassiveHealthConfig {
    fn default() -> Self {
        PassiveHealthConfig {
            enabled: true,
            consecutive_gateway_failures: 1,
            consecutive_5xx: 5,
            base_ejection_time: Millis(10_000),
            max_ejection_time: Millis(300_000),
            max_ejection_percent: 50,
        }
    }
}

/// How many request outcomes a worker reads from the proxy (see [`crate::sampling`]).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ObservationConfig {
    /// Up to this many requests per second per worker, every outcome is read; above it, a random share of about
    /// this many per second, each counted for the requests it stands for. 0: every request, at any rate.
    pub max_per_second: u32,
}

impl Default for ObservationConfig {
    fn default() -> Self {
        ObservationConfig { max_per_second: 1000 }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SupervisorConfig {
    /// The proxy's cluster name for the supervisor (Envoy: a STATIC cluster).
    pub cluster: String,
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

impl Default for SupervisorConfig {
    fn default() -> Self {
        SupervisorConfig {
            cluster: "supervisor".into(),
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
}

/// The whole validated configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub service: String,
    #[serde(default)]
    pub algorithm: Algorithm,
    #[serde(default)]
    pub consistent_hash: ConsistentHashConfig,
    #[serde(default)]
    pub sticky_sessions: StickyConfig,
    #[serde(default)]
    pub rate_limiting: RateLimitConfig,
    #[serde(default)]
    pub passive_health: PassiveHealthConfig,
    #[serde(default)]
    pub observation: ObservationConfig,
    /// Absent: no supervisor, the static endpoints are the table.
    #[serde(default)]
    pub supervisor: Option<SupervisorConfig>,
    #[serde(default)]
    pub endpoints: Vec<StaticEndpoint>,
}

/// Why a configuration (or a runtime policy) was refused: the dotted key and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "invalid configuration: {}", self.reason)
        } else {
            write!(f, "invalid configuration: `{}`: {}", self.key, self.reason)
        }
    }
}

impl std::error::Error for ConfigError {}

fn err(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError { key: key.to_string(), reason: reason.into() }
}

/// The policy keys the supervisor may override at runtime.
pub const POLICY_KEYS: [&str; 6] =
    ["algorithm", "consistent_hash", "sticky_sessions", "rate_limiting", "passive_health", "observation"];

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
                })
                .collect(),
            policy: None,
            hash_seed: None,
        }
    }

    /// Parses and validates the plugin configuration bytes.
    pub fn parse(bytes: &[u8]) -> Result<ParsedConfig, ConfigError> {
        let source: Value = serde_json::from_slice(bytes).map_err(|e| err("", format!("not valid JSON: {e}")))?;
        let config = Config::from_value(&source)?;
        Ok(ParsedConfig { config, source })
    }

    fn from_value(v: &Value) -> Result<Config, ConfigError> {
        if !v.is_object() {
            return Err(err("", "expected a JSON object"));
        }
        let config: Config = deserialize_keyed(v).map_err(|(key, reason)| err(&key, reason))?;
        config.validate()?;
        Ok(config)
    }

    /// The configuration with a runtime `policy` object merged in. Unknown policy keys are ignored (they may belong
    /// to a newer supervisor); known ones are merged key by key and validated as a whole.
    pub fn with_policy(source: &Value, policy: &Value) -> Result<Config, ConfigError> {
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
        Config::from_value(&merged).map_err(|e| err(&format!("policy.{}", e.key), e.reason))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.service.is_empty() || !self.service.bytes().all(is_id_byte) {
            return Err(err("service", "must be 1 or more of [A-Za-z0-9._-]"));
        }
        let ch = &self.consistent_hash;
        KeySource::parse(&ch.key).map_err(|r| err("consistent_hash.key", r))?;
        if !(1.0..=10.0).contains(&ch.load_factor) {
            return Err(err("consistent_hash.load_factor", "must be between 1.0 and 10.0"));
        }
        if !(1..=1000).contains(&ch.vnodes) {
            return Err(err("consistent_hash.vnodes", "must be between 1 and 1000"));
        }
        let s = &self.sticky_sessions;
        if s.cookie_name.is_empty() || !s.cookie_name.bytes().all(is_token_byte) {
            return Err(err("sticky_sessions.cookie_name", "must be a non-empty cookie name (RFC 6265 token)"));
        }
        if s.ttl.0 < 1000 || s.ttl.0 > 400 * 86_400_000 {
            return Err(err("sticky_sessions.ttl", "must be between 1 second and 400 days"));
        }
        if s.same_site == SameSite::None && !s.secure {
            return Err(err("sticky_sessions.same_site", "`none` requires `secure: true` (browsers drop the cookie)"));
        }
        if s.enabled {
            match &s.secret {
                Some(secret) if secret.len() >= 16 => {}
                _ => {
                    return Err(err("sticky_sessions.secret", "required when enabled: at least 16 bytes"));
                }
            }
        }
        let r = &self.rate_limiting;
        if !(1..=100_000_000).contains(&r.requests_per_minute) {
            return Err(err("rate_limiting.requests_per_minute", "must be between 1 and 100000000"));
        }
        if !(1..=10_000_000).contains(&r.burst_size) {
            return Err(err("rate_limiting.burst_size", "must be between 1 and 10000000"));
        }
        match KeySource::parse(&r.key) {
            Ok(KeySource::ClientAddress | KeySource::Header(_)) => {}
            Ok(_) => {
                return Err(err("rate_limiting.key", "must be client_address or header:<name>"));
            }
            Err(reason) => return Err(err("rate_limiting.key", reason)),
        }
        if r.xff_trusted_hops > 10 {
            return Err(err("rate_limiting.xff_trusted_hops", "must be between 0 and 10"));
        }
        if !(16..=1_048_576).contains(&r.slots) {
            return Err(err("rate_limiting.slots", "must be between 16 and 1048576"));
        }
        let p = &self.passive_health;
        if !(1..=1000).contains(&p.consecutive_gateway_failures) {
            return Err(err("passive_health.consecutive_gateway_failures", "must be between 1 and 1000"));
        }
        if !(1..=1000).contains(&p.consecutive_5xx) {
            return Err(err("passive_health.consecutive_5xx", "must be between 1 and 1000"));
        }
        if p.base_ejection_time.0 < 100 || p.base_ejection_time.0 > 3_600_000 {
            return Err(err("passive_health.base_ejection_time", "must be between 100ms and 1h"));
        }
        if p.max_ejection_time < p.base_ejection_time || p.max_ejection_time.0 > 86_400_000 {
            return Err(err("passive_health.max_ejection_time", "must be between base_ejection_time and 24h"));
        }
        if p.max_ejection_percent > 100 {
            return Err(err("passive_health.max_ejection_percent", "must be between 0 and 100"));
        }
        if self.observation.max_per_second > 1_000_000 {
            return Err(err("observation.max_per_second", "must be between 0 and 1000000"));
        }
        if let Some(sup) = &self.supervisor {
            if sup.cluster.is_empty() {
                return Err(err("supervisor.cluster", "must not be empty"));
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
                .map_err(|(field, reason)| err(&format!("endpoints[{i}].{field}"), reason))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<Config, ConfigError> {
        Config::parse(v.to_string().as_bytes()).map(|p| p.config)
    }

    #[test]
    fn minimal_config_gets_the_plan_defaults() {
        let c = parse(json!({"service": "agente-vendedor", "supervisor": {}})).unwrap();
        assert_eq!(c.algorithm, Algorithm::WeightedRoundRobin);
        assert_eq!(c.sticky_sessions.cookie_name, "AGENTE_VENDEDOR_SESSION");
        assert_eq!(c.sticky_sessions.ttl, Millis(3_600_000));
        assert_eq!(c.rate_limiting.requests_per_minute, 1000);
        assert_eq!(c.rate_limiting.burst_size, 100);
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
        assert_eq!(c.algorithm, Algorithm::Random);
        assert_eq!(c.rate_limiting.requests_per_minute, 60);
        assert_eq!(c.rate_limiting.burst_size, 5, "keys the policy does not name keep their static value");
        let e = Config::with_policy(&p.source, &json!({"sticky_sessions": {"enabled": true}})).unwrap_err();
        assert_eq!(e.key, "policy.sticky_sessions.secret");
    }

    #[test]
    fn key_sources_parse() {
        assert_eq!(KeySource::parse("header:X-User"), Ok(KeySource::Header("x-user".into())));
        assert_eq!(KeySource::parse("cookie:sid"), Ok(KeySource::Cookie("sid".into())));
        assert_eq!(KeySource::parse("query:q"), Ok(KeySource::Query("q".into())));
        assert_eq!(KeySource::parse("path"), Ok(KeySource::Path));
        assert!(KeySource::parse("header:").is_err());
        assert!(KeySource::parse("header:a b").is_err());
    }
}
