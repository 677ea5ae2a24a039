//! Request-aware routes: the policy's ordered `routes` list. The first route whose `match` fits a request decides its
//! pool (the endpoints whose tags include every tag of the route's `pool`) and may override the algorithm, the hash
//! key, sticky sessions and the rate limit for it; a request no route matches gets the service's policy and every
//! endpoint. Parsed and validated here for the supervisor and the filter alike; the filter's `routing` module
//! compiles and applies them.

use serde::Deserialize;

use crate::field_error::FieldError;
use crate::policy::{Algorithm, ConsistentHashConfig, is_token_byte};

/// The most routes in a policy.
pub const MAX_ROUTES: usize = 32;
/// The most header or query conditions, methods and pool tags in one route.
pub const MAX_CONDITIONS: usize = 16;
/// The longest path, value or regex in a condition.
pub const MAX_PATTERN_LEN: usize = 256;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Names the route in logs, metrics and rate-limit buckets: 1 to 64 of `[A-Za-z0-9._-]`, unique.
    pub name: String,
    #[serde(rename = "match", default)]
    pub matcher: RouteMatch,
    #[serde(default)]
    pub pool: Pool,
    /// Overrides the service's algorithm.
    #[serde(default)]
    pub algorithm: Option<Algorithm>,
    /// Replaces the service's `consistent_hash` section (keys left out take their defaults).
    #[serde(default)]
    pub consistent_hash: Option<ConsistentHashConfig>,
    /// Turns the service's sticky sessions on or off for this route (the cookie settings stay the service's).
    #[serde(default)]
    pub sticky_sessions: Option<RouteSticky>,
    /// A limit of this route's own (its own buckets; the key, trusted hops and slots stay the service's).
    #[serde(default)]
    pub rate_limiting: Option<RouteRateLimit>,
}

/// What a request must have for the route to apply; every condition given must hold.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RouteMatch {
    pub path: Option<PathMatch>,
    /// Any of these methods (upper case); empty: any method.
    pub methods: Vec<String>,
    pub headers: Vec<ValueMatch>,
    pub query: Vec<ValueMatch>,
}

/// The request path (without its query string).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum PathMatch {
    Prefix(String),
    Exact(String),
    /// A regular expression over the whole path (anchored), up to 256 bytes; matched in linear time.
    Regex(String),
}

/// A header (lower-case name) or query parameter: present, or with exactly this value.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ValueMatch {
    pub name: String,
    #[serde(default)]
    pub value: Option<String>,
}

/// The endpoints a route sends to: those whose tags include every one of `tags` (none: every endpoint).
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Pool {
    pub tags: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteSticky {
    pub enabled: bool,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteRateLimit {
    #[serde(default = "yes")]
    pub enabled: bool,
    pub requests_per_minute: u64,
    pub burst_size: u64,
}

fn yes() -> bool {
    true
}

fn err(key: String, reason: impl Into<String>) -> FieldError {
    FieldError::new(&key, reason)
}

/// Checks the routes: names, bounds, and that each regex compiles. The error names the route's index and key.
pub fn validate(routes: &[Route]) -> Result<(), FieldError> {
    if routes.len() > MAX_ROUTES {
        return Err(err("routes".into(), format!("at most {MAX_ROUTES} routes")));
    }
    for (i, r) in routes.iter().enumerate() {
        let at = |key: &str| format!("routes[{i}].{key}");
        if r.name.is_empty() || r.name.len() > 64 || !r.name.bytes().all(crate::is_id_byte) {
            return Err(err(at("name"), "must be 1 to 64 of [A-Za-z0-9._-]"));
        }
        if routes[..i].iter().any(|o| o.name == r.name) {
            return Err(err(at("name"), format!("`{}` is used by an earlier route", r.name)));
        }
        let m = &r.matcher;
        match &m.path {
            Some(PathMatch::Prefix(p) | PathMatch::Exact(p)) if !p.starts_with('/') || p.len() > MAX_PATTERN_LEN => {
                return Err(err(
                    at("match.path"),
                    format!("must start with `/` and be at most {MAX_PATTERN_LEN} bytes"),
                ));
            }
            Some(PathMatch::Regex(re)) => {
                if re.len() > MAX_PATTERN_LEN {
                    return Err(err(at("match.path.regex"), format!("at most {MAX_PATTERN_LEN} bytes")));
                }
                compile(re).map_err(|e| err(at("match.path.regex"), e))?;
            }
            _ => {}
        }
        if m.methods.len() > MAX_CONDITIONS {
            return Err(err(at("match.methods"), format!("at most {MAX_CONDITIONS}")));
        }
        if let Some(bad) = m.methods.iter().find(|x| x.is_empty() || !x.bytes().all(|b| b.is_ascii_uppercase())) {
            return Err(err(at("match.methods"), format!("`{bad}` is not an upper-case method name")));
        }
        for (key, list) in [("match.headers", &m.headers), ("match.query", &m.query)] {
            if list.len() > MAX_CONDITIONS {
                return Err(err(at(key), format!("at most {MAX_CONDITIONS}")));
            }
            for (k, c) in list.iter().enumerate() {
                if c.name.is_empty() || !c.name.bytes().all(is_token_byte) {
                    return Err(err(at(&format!("{key}[{k}].name")), "must be a token (RFC 9110)"));
                }
                if key == "match.headers" && c.name.bytes().any(|b| b.is_ascii_uppercase()) {
                    return Err(err(at(&format!("{key}[{k}].name")), "must be lower case"));
                }
                if c.value.as_ref().is_some_and(|v| v.len() > MAX_PATTERN_LEN) {
                    return Err(err(at(&format!("{key}[{k}].value")), format!("at most {MAX_PATTERN_LEN} bytes")));
                }
            }
        }
        if r.pool.tags.len() > MAX_CONDITIONS
            || r.pool.tags.iter().any(|t| t.is_empty() || t.len() > 64 || !t.bytes().all(crate::is_id_byte))
        {
            return Err(err(at("pool.tags"), format!("at most {MAX_CONDITIONS}, each 1 to 64 of [A-Za-z0-9._-]")));
        }
        if let Some(ch) = &r.consistent_hash {
            if !(1.0..=10.0).contains(&ch.load_factor) {
                return Err(err(at("consistent_hash.load_factor"), "must be between 1.0 and 10.0"));
            }
            if !(1..=1000).contains(&ch.vnodes) {
                return Err(err(at("consistent_hash.vnodes"), "must be between 1 and 1000"));
            }
        }
        if let Some(rl) = &r.rate_limiting {
            if !(1..=100_000_000).contains(&rl.requests_per_minute) {
                return Err(err(at("rate_limiting.requests_per_minute"), "must be between 1 and 100000000"));
            }
            if !(1..=10_000_000).contains(&rl.burst_size) {
                return Err(err(at("rate_limiting.burst_size"), "must be between 1 and 10000000"));
            }
        }
    }
    Ok(())
}

/// Compiles a path regex, anchored at both ends (linear-time matching: no backtracking).
pub fn compile(re: &str) -> Result<regex_lite::Regex, String> {
    regex_lite::RegexBuilder::new(&format!("^(?:{re})$"))
        .size_limit(1 << 20)
        .nest_limit(32)
        .build()
        .map_err(|e| e.to_string().lines().last().unwrap_or("invalid regex").trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;
    use serde_json::json;

    #[test]
    fn routes_parse_with_their_overrides() {
        let p = Policy::parse(&json!({"routes": [
            {"name": "search", "match": {"path": {"prefix": "/search"}, "methods": ["GET"]},
             "pool": {"tags": ["search"]}, "algorithm": "consistent_hash", "consistent_hash": {"key": "query:q"}},
            {"name": "writes", "match": {"methods": ["POST", "PUT"], "headers": [{"name": "x-tenant"}]},
             "rate_limiting": {"requests_per_minute": 60, "burst_size": 5}},
            {"name": "item", "match": {"path": {"regex": "/item/[0-9]+"}, "query": [{"name": "v", "value": "2"}]}}
        ]}))
        .unwrap();
        assert_eq!(p.routes.len(), 3);
        assert_eq!(p.routes[0].pool.tags, ["search"]);
        assert_eq!(p.routes[0].algorithm, Some(Algorithm::ConsistentHash));
        assert!(p.routes[1].rate_limiting.as_ref().is_some_and(|r| r.enabled));
    }

    #[test]
    fn a_bad_route_is_refused_by_its_index_and_key() {
        let cases = [
            (json!([{"name": "a b"}]), "routes[0].name"),
            (json!([{"name": "a"}, {"name": "a"}]), "routes[1].name"),
            (json!([{"name": "a", "match": {"path": {"prefix": "search"}}}]), "routes[0].match.path"),
            (json!([{"name": "a", "match": {"path": {"regex": "(unclosed"}}}]), "routes[0].match.path.regex"),
            (json!([{"name": "a", "match": {"path": {"glob": "/x"}}}]), "routes[0].match.path"),
            (json!([{"name": "a", "match": {"methods": ["get"]}}]), "routes[0].match.methods"),
            (json!([{"name": "a", "match": {"headers": [{"name": "X-Up"}]}}]), "routes[0].match.headers[0].name"),
            (json!([{"name": "a", "pool": {"tags": [""]}}]), "routes[0].pool.tags"),
            (
                json!([{"name": "a", "rate_limiting": {"requests_per_minute": 0, "burst_size": 1}}]),
                "routes[0].rate_limiting.requests_per_minute",
            ),
            (json!([{"name": "a", "algorithm": "fastest"}]), "routes[0].algorithm"),
            (json!([{"name": "a", "colour": "red"}]), "routes[0].colour"),
        ];
        for (routes, key) in cases {
            let e = Policy::parse(&json!({ "routes": routes })).unwrap_err();
            assert_eq!(e.key, key, "{routes}: {e}");
        }
    }

    #[test]
    fn a_regex_matches_the_whole_path() {
        let re = compile("/item/[0-9]+").unwrap();
        assert!(re.is_match("/item/42"));
        assert!(!re.is_match("/item/42/reviews"));
        assert!(!re.is_match("/x/item/42"));
    }
}
