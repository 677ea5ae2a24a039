//! The balancing policy: how a proxy picks an endpoint, keeps sessions, limits rates and ejects failing endpoints.
//! An operator writes it in the filter's JSON and may change it at runtime through the supervisor's API, which sends
//! it to the proxies in the `policy` object of the table. Both sides parse it here, once, into enums (the algorithm,
//! where a hash key comes from), with the same limits, so that a policy the supervisor accepts is one every proxy
//! accepts. What may be shown of it to anyone: [`redact`].

use serde::Deserialize;
use serde_json::{Value, json};

use crate::field_error::FieldError;
use crate::keyed::{Millis, deserialize_keyed};

/// The top-level keys of a policy, in the order the documentation lists them.
pub const POLICY_KEYS: [&str; 9] = [
    "algorithm",
    "routes",
    "consistent_hash",
    "sticky_sessions",
    "rate_limiting",
    "passive_health",
    "circuit_breaker",
    "locality",
    "observation",
];

/// The balancing algorithm for new sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
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

/// Where a request's hash key (or rate-limit key) comes from. Written `client_address`, `path`, `header:<name>`,
/// `cookie:<name>` or `query:<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
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

impl TryFrom<String> for KeySource {
    type Error = String;

    fn try_from(text: String) -> Result<KeySource, String> {
        KeySource::parse(&text)
    }
}

/// RFC 9110 token characters: what header, cookie and parameter names may use here.
pub fn is_token_byte(b: u8) -> bool {
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
    pub key: KeySource,
    /// Bounded-load factor c (Mirrokni et al.): no endpoint takes more than c times the mean in-flight load.
    pub load_factor: f64,
    /// Virtual nodes on the ring for the heaviest endpoint (others get a share proportional to weight).
    pub vnodes: u32,
}

impl Default for ConsistentHashConfig {
    fn default() -> Self {
        ConsistentHashConfig { key: KeySource::Path, load_factor: 1.25, vnodes: 160 }
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
    pub key: KeySource,
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
            key: KeySource::ClientAddress,
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
    /// Half-open: after its ejection time an endpoint gets at most this many trial requests at a time; a trial that
    /// succeeds closes the breaker, one that fails ejects it again for longer. 0: straight back to full traffic.
    pub half_open_trials: u32,
    /// How often the success-rate and failure-percentage detectors look at the last interval's outcomes (Envoy's
    /// `interval`).
    pub interval: Millis,
    pub success_rate: SuccessRateConfig,
    pub failure_percentage: FailurePercentageConfig,
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
            half_open_trials: 1,
            interval: Millis(10_000),
            success_rate: SuccessRateConfig::default(),
            failure_percentage: FailurePercentageConfig::default(),
        }
    }
}

/// Envoy's success-rate outlier detection: among the endpoints with `request_volume` requests in the interval (at
/// least `minimum_hosts` of them), one whose success rate is below `mean - stdev_factor x stdev` is ejected.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SuccessRateConfig {
    pub enabled: bool,
    pub minimum_hosts: u32,
    pub request_volume: u64,
    pub stdev_factor: f64,
}

impl Default for SuccessRateConfig {
    fn default() -> Self {
        SuccessRateConfig { enabled: true, minimum_hosts: 5, request_volume: 100, stdev_factor: 1.9 }
    }
}

/// Envoy's failure-percentage outlier detection: among the endpoints with `request_volume` requests in the interval
/// (at least `minimum_hosts` of them), one failing `threshold` percent or more is ejected. Off by default, as in
/// Envoy.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FailurePercentageConfig {
    pub enabled: bool,
    pub threshold: u32,
    pub minimum_hosts: u32,
    pub request_volume: u64,
}

impl Default for FailurePercentageConfig {
    fn default() -> Self {
        FailurePercentageConfig { enabled: false, threshold: 85, minimum_hosts: 5, request_volume: 50 }
    }
}

/// Limits per endpoint (Envoy's circuit breakers, per host).
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitBreakerConfig {
    /// Requests in flight per endpoint across the proxy's workers; a request over it goes to the next listed
    /// endpoint, or is answered 503 with `Retry-After` when every listed one is full. 0: no limit.
    pub max_requests_per_endpoint: u32,
}

/// Zone-aware locality (Envoy's zone-aware routing): a proxy that knows its zone keeps new requests in it while the
/// zone has its share of the healthy capacity, and sends the rest to the other zones (see the filter's `locality`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LocalityConfig {
    /// On by default; it only acts in a proxy configured with a `zone`.
    pub enabled: bool,
    /// Below this many endpoints in the table, locality is off (Envoy's `min_cluster_size`): small pools balance
    /// across zones.
    pub min_endpoints: u32,
    /// The zones that take the local zone's overflow first, in order; the rest goes to the others in proportion to
    /// their spare capacity.
    pub spillover: Vec<String>,
}

impl Default for LocalityConfig {
    fn default() -> Self {
        LocalityConfig { enabled: true, min_endpoints: 6, spillover: Vec::new() }
    }
}

/// The longest zone name.
pub const MAX_ZONE_LEN: usize = 64;

/// Whether `zone` is a valid zone name: 1 to 64 of `[A-Za-z0-9._-]`.
pub fn valid_zone(zone: &str) -> bool {
    !zone.is_empty() && zone.len() <= MAX_ZONE_LEN && zone.bytes().all(crate::is_id_byte)
}

/// How many request outcomes a worker reads from the proxy (see the filter's `sampling` module).
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

/// A whole policy, every key at its default unless given.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    pub algorithm: Algorithm,
    /// Request-aware routes, first match wins ([`crate::route`]).
    pub routes: Vec<crate::route::Route>,
    pub consistent_hash: ConsistentHashConfig,
    pub sticky_sessions: StickyConfig,
    pub rate_limiting: RateLimitConfig,
    pub passive_health: PassiveHealthConfig,
    pub circuit_breaker: CircuitBreakerConfig,
    pub locality: LocalityConfig,
    pub observation: ObservationConfig,
}

fn err(key: &str, reason: impl Into<String>) -> FieldError {
    FieldError::new(key, reason)
}

impl Policy {
    /// Parses and validates a policy object (only the [`POLICY_KEYS`]; an unknown key is refused by name).
    pub fn parse(v: &Value) -> Result<Policy, FieldError> {
        if !v.is_object() {
            return Err(err("", "expected a JSON object"));
        }
        let policy: Policy = deserialize_keyed(v)?;
        policy.validate()?;
        Ok(policy)
    }

    /// The limits of each key, beyond what its type says.
    pub fn validate(&self) -> Result<(), FieldError> {
        crate::route::validate(&self.routes)?;
        let ch = &self.consistent_hash;
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
        if s.enabled && s.secret.as_ref().is_none_or(|secret| secret.len() < 16) {
            return Err(err("sticky_sessions.secret", "required when enabled: at least 16 bytes"));
        }
        let r = &self.rate_limiting;
        if !(1..=100_000_000).contains(&r.requests_per_minute) {
            return Err(err("rate_limiting.requests_per_minute", "must be between 1 and 100000000"));
        }
        if !(1..=10_000_000).contains(&r.burst_size) {
            return Err(err("rate_limiting.burst_size", "must be between 1 and 10000000"));
        }
        if !matches!(r.key, KeySource::ClientAddress | KeySource::Header(_)) {
            return Err(err("rate_limiting.key", "must be client_address or header:<name>"));
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
        if p.half_open_trials > 1000 {
            return Err(err("passive_health.half_open_trials", "must be between 0 and 1000"));
        }
        if p.interval.0 < 100 || p.interval.0 > 3_600_000 {
            return Err(err("passive_health.interval", "must be between 100ms and 1h"));
        }
        let sr = &p.success_rate;
        if !(1..=4096).contains(&sr.minimum_hosts) {
            return Err(err("passive_health.success_rate.minimum_hosts", "must be between 1 and 4096"));
        }
        if !(1..=1_000_000_000).contains(&sr.request_volume) {
            return Err(err("passive_health.success_rate.request_volume", "must be between 1 and 1000000000"));
        }
        if !(0.1..=10.0).contains(&sr.stdev_factor) {
            return Err(err("passive_health.success_rate.stdev_factor", "must be between 0.1 and 10"));
        }
        let fp = &p.failure_percentage;
        if !(1..=100).contains(&fp.threshold) {
            return Err(err("passive_health.failure_percentage.threshold", "must be between 1 and 100"));
        }
        if !(1..=4096).contains(&fp.minimum_hosts) {
            return Err(err("passive_health.failure_percentage.minimum_hosts", "must be between 1 and 4096"));
        }
        if !(1..=1_000_000_000).contains(&fp.request_volume) {
            return Err(err("passive_health.failure_percentage.request_volume", "must be between 1 and 1000000000"));
        }
        if self.circuit_breaker.max_requests_per_endpoint > 10_000_000 {
            return Err(err("circuit_breaker.max_requests_per_endpoint", "must be between 0 and 10000000"));
        }
        let l = &self.locality;
        if !(1..=crate::table::MAX_ENDPOINTS as u32).contains(&l.min_endpoints) {
            return Err(err("locality.min_endpoints", "must be between 1 and 4096"));
        }
        if l.spillover.len() > 32 {
            return Err(err("locality.spillover", "at most 32 zones"));
        }
        for (i, zone) in l.spillover.iter().enumerate() {
            if !valid_zone(zone) {
                return Err(err(
                    &format!("locality.spillover[{i}]"),
                    format!("`{zone}` must be 1 to 64 of [A-Za-z0-9._-]"),
                ));
            }
            if l.spillover[..i].contains(zone) {
                return Err(err(&format!("locality.spillover[{i}]"), format!("`{zone}` appears twice")));
            }
        }
        if self.observation.max_per_second > 1_000_000 {
            return Err(err("observation.max_per_second", "must be between 0 and 1000000"));
        }
        Ok(())
    }
}

/// A policy fit to show to anyone: the sticky-session secret is replaced by `<redacted>` (sending that back through
/// the API keeps the secret).
pub fn redact(policy: &Value) -> Value {
    let mut p = policy.clone();
    if let Some(secret) = p.pointer_mut("/sticky_sessions/secret")
        && !secret.is_null()
    {
        *secret = json!("<redacted>");
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_the_secret() {
        let p = json!({"sticky_sessions": {"enabled": true, "secret": "s3cr3t-s3cr3t-s3cr3t"}});
        assert_eq!(redact(&p)["sticky_sessions"]["secret"], "<redacted>");
        assert_eq!(redact(&json!({}))["algorithm"], Value::Null);
    }

    #[test]
    fn key_sources_parse_once_into_their_kind() {
        assert_eq!(KeySource::parse("header:X-User"), Ok(KeySource::Header("x-user".into())));
        assert_eq!(KeySource::parse("cookie:sid"), Ok(KeySource::Cookie("sid".into())));
        assert_eq!(KeySource::parse("query:q"), Ok(KeySource::Query("q".into())));
        assert_eq!(KeySource::parse("path"), Ok(KeySource::Path));
        assert!(KeySource::parse("header:").is_err());
        assert!(KeySource::parse("header:a b").is_err());
        let p = Policy::parse(&json!({"consistent_hash": {"key": "query:q"}})).unwrap();
        assert_eq!(p.consistent_hash.key, KeySource::Query("q".into()));
    }

    #[test]
    fn a_policy_is_refused_by_the_key_at_fault() {
        let cases = [
            (json!({"algorithm": "fastest"}), "algorithm"),
            (json!({"algoritm": "random"}), "algoritm"),
            (json!({"consistent_hash": {"key": "body"}}), "consistent_hash.key"),
            (json!({"rate_limiting": {"key": "path"}}), "rate_limiting.key"),
            (json!({"sticky_sessions": {"enabled": true}}), "sticky_sessions.secret"),
            (
                json!({"passive_health": {"base_ejection_time": "2s", "max_ejection_time": "1s"}}),
                "passive_health.max_ejection_time",
            ),
            (json!({"locality": {"min_endpoints": 0}}), "locality.min_endpoints"),
            (
                json!({"passive_health": {"success_rate": {"stdev_factor": 0}}}),
                "passive_health.success_rate.stdev_factor",
            ),
            (
                json!({"passive_health": {"failure_percentage": {"threshold": 101}}}),
                "passive_health.failure_percentage.threshold",
            ),
            (json!({"passive_health": {"interval": "10ms"}}), "passive_health.interval"),
            (json!({"locality": {"spillover": ["b", "b"]}}), "locality.spillover[1]"),
            (json!({"locality": {"spillover": ["a b"]}}), "locality.spillover[0]"),
            (json!([]), ""),
        ];
        for (policy, key) in cases {
            assert_eq!(Policy::parse(&policy).unwrap_err().key, key, "{policy}");
        }
        assert_eq!(Policy::parse(&json!({})).unwrap(), Policy::default());
    }
}
