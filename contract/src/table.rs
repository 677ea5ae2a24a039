//! The endpoint table: what the supervisor serves and every proxy's filter takes.
//!
//! `GET /v1/services/{service}/endpoints` answers
//! `{"service", "version", "endpoints": [{"id", "address", "weight", "state", "zone"}], "policy": {...}}`.
//! The poller validates an answer completely before it replaces the last good table: a malformed, oversized, foreign or
//! stale answer is a [`TableError`] and changes nothing.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::field_error::FieldError;
use std::fmt;

/// What the supervisor says about an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndpointState {
    /// Takes new sessions (if its weight is above 0) and its sticky sessions.
    Healthy,
    /// Takes only its sticky sessions, so it can drain.
    Draining,
    /// Takes nothing.
    Unhealthy,
}

impl EndpointState {
    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            EndpointState::Healthy => "healthy",
            EndpointState::Draining => "draining",
            EndpointState::Unhealthy => "unhealthy",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Endpoint {
    pub id: String,
    /// `ip:port`, exactly as the proxy's cluster knows the host.
    pub address: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
    pub state: EndpointState,
    #[serde(default)]
    pub zone: String,
    /// The instance's tags: the routes' pools select on them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

/// The weight of an endpoint that names none.
pub const DEFAULT_WEIGHT: u32 = 100;

/// For `#[serde(default = ...)]`, wherever an endpoint or instance is described.
pub fn default_weight() -> u32 {
    DEFAULT_WEIGHT
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Table {
    pub service: String,
    pub version: u64,
    pub endpoints: Vec<Endpoint>,
    /// Runtime overrides of the balancing policy (the filter's policy keys; the filter validates them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<Value>,
    /// The deployment's secret seed for key hashing (16 hex digits; see [`Table::seed`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_seed: Option<String>,
    /// How many of the service's proxies run in each zone (the ones that reported lately): each zone's share of the
    /// traffic, for zone-aware locality. Empty: the zones of the endpoints are taken to get equal shares.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub proxy_zones: std::collections::BTreeMap<String, u32>,
}

/// The seed of a table that brings none (static endpoints): public, so keys could be crafted to collide; the
/// supervisor's tables carry a secret one. Changing a seed remaps every key.
pub const PUBLIC_SEED: u64 = 0x6571_7569_6c69_6272; // "equilibr"

/// The most endpoints a table may hold (bounds the work per table and the shared-data keys per endpoint).
pub const MAX_ENDPOINTS: usize = 4096;
/// The largest accepted weight.
pub const MAX_WEIGHT: u32 = 1_000_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableError {
    Oversized { bytes: usize, limit: u64 },
    Malformed(String),
    WrongService { expected: String, got: String },
    Stale { version: u64, current: u64 },
}

impl TableError {
    /// A short stable name for metrics and for "log once per change of condition".
    pub fn condition(&self) -> &'static str {
        match self {
            TableError::Oversized { .. } => "oversized",
            TableError::Malformed(_) => "malformed",
            TableError::WrongService { .. } => "wrong_service",
            TableError::Stale { .. } => "stale",
        }
    }
}

impl fmt::Display for TableError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TableError::Oversized { bytes, limit } => {
                write!(f, "table of {bytes} bytes exceeds the limit of {limit}")
            }
            TableError::Malformed(why) => write!(f, "malformed table: {why}"),
            TableError::WrongService { expected, got } => {
                write!(f, "table is for service `{got}`, expected `{expected}`")
            }
            TableError::Stale { version, current } => {
                write!(f, "stale table: version {version} is older than {current}")
            }
        }
    }
}

/// Validates the fields of one endpoint; on error gives the field name and the reason.
pub fn validate_endpoint_fields(id: &str, address: &str, weight: u32) -> Result<(), FieldError> {
    if id.is_empty() || id.len() > 128 || !id.bytes().all(crate::is_id_byte) {
        return Err(FieldError::new("id", format!("`{id}` must be 1 to 128 of [A-Za-z0-9._-]")));
    }
    if address.parse::<std::net::SocketAddr>().is_err() {
        return Err(FieldError::new("address", format!("`{address}` is not an ip:port socket address")));
    }
    if weight > MAX_WEIGHT {
        return Err(FieldError::new("weight", format!("{weight} is above {MAX_WEIGHT}")));
    }
    Ok(())
}

impl Table {
    /// Parses and validates an answer for `service`. `current` is the version of the last good table, if any: an
    /// older version is stale (the same version is accepted, it changes nothing).
    pub fn parse(body: &[u8], service: &str, current: Option<u64>, limit: u64) -> Result<Table, TableError> {
        if body.len() as u64 > limit {
            return Err(TableError::Oversized { bytes: body.len(), limit });
        }
        let table: Table = serde_json::from_slice(body).map_err(|e| TableError::Malformed(e.to_string()))?;
        if table.service != service {
            return Err(TableError::WrongService { expected: service.to_string(), got: table.service });
        }
        if let Some(current) = current
            && table.version < current
        {
            return Err(TableError::Stale { version: table.version, current });
        }
        table.validate().map_err(TableError::Malformed)?;
        Ok(table)
    }

    /// The seed of consistent-hash placement and rate-limit slots: the supervisor's per-deployment secret one, so
    /// that clients cannot craft keys that collide; the fixed public one for a table without it (static endpoints).
    pub fn seed(&self) -> u64 {
        self.hash_seed.as_deref().and_then(|s| u64::from_str_radix(s, 16).ok()).unwrap_or(PUBLIC_SEED)
    }

    fn validate(&self) -> Result<(), String> {
        if let Some(seed) = &self.hash_seed
            && (seed.len() != 16 || !seed.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(format!("hash_seed: `{seed}` must be 16 hexadecimal digits"));
        }
        if self.endpoints.len() > MAX_ENDPOINTS {
            return Err(format!("{} endpoints, the most is {MAX_ENDPOINTS}", self.endpoints.len()));
        }
        let mut ids = std::collections::HashSet::new();
        let mut addresses = std::collections::HashSet::new();
        for (i, e) in self.endpoints.iter().enumerate() {
            validate_endpoint_fields(&e.id, &e.address, e.weight)
                .map_err(|e| format!("endpoints[{i}].{}: {}", e.key, e.reason))?;
            if !ids.insert(e.id.as_str()) {
                return Err(format!("endpoints[{i}].id: `{}` appears twice", e.id));
            }
            if !addresses.insert(e.address.as_str()) {
                return Err(format!("endpoints[{i}].address: `{}` appears twice", e.address));
            }
            if e.tags.len() > 16
                || e.tags.iter().any(|t| t.is_empty() || t.len() > 64 || !t.bytes().all(crate::is_id_byte))
            {
                return Err(format!("endpoints[{i}].tags: at most 16, each 1 to 64 of [A-Za-z0-9._-]"));
            }
            if !e.zone.is_empty() && !crate::policy::valid_zone(&e.zone) {
                return Err(format!("endpoints[{i}].zone: `{}` must be 1 to 64 of [A-Za-z0-9._-]", e.zone));
            }
        }
        if self.proxy_zones.len() > 256 {
            return Err(format!("proxy_zones: {} zones, the most is 256", self.proxy_zones.len()));
        }
        if let Some(zone) = self.proxy_zones.keys().find(|z| !crate::policy::valid_zone(z)) {
            return Err(format!("proxy_zones: `{zone}` must be 1 to 64 of [A-Za-z0-9._-]"));
        }
        if let Some(p) = &self.policy
            && !(p.is_object() || p.is_null())
        {
            return Err("policy: expected an object".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"service":"av","version":17,"endpoints":[
        {"id":"av-1","address":"127.0.0.1:32768","weight":100,"state":"healthy","zone":"a"},
        {"id":"av-2","address":"127.0.0.1:32769","state":"draining"}],
        "policy":{"algorithm":"random"}}"#;

    #[test]
    fn the_hash_seed_is_the_tables_or_the_public_one_and_must_be_16_hex_digits() {
        let t = Table::parse(GOOD.as_bytes(), "av", None, 1 << 20).unwrap();
        assert_eq!(t.seed(), PUBLIC_SEED);
        let seeded = GOOD.replacen('{', r#"{"hash_seed":"00000000000000ff","#, 1);
        assert_eq!(Table::parse(seeded.as_bytes(), "av", None, 1 << 20).unwrap().seed(), 255);
        for bad in ["ff", "zzzzzzzzzzzzzzzz", "00000000000000ff0"] {
            let body = GOOD.replacen('{', &format!(r#"{{"hash_seed":"{bad}","#), 1);
            let e = Table::parse(body.as_bytes(), "av", None, 1 << 20).unwrap_err();
            assert!(e.to_string().contains("hash_seed"), "{e}");
        }
    }

    #[test]
    fn parses_the_wire_format() {
        let t = Table::parse(GOOD.as_bytes(), "av", None, 1 << 20).unwrap();
        assert_eq!(t.version, 17);
        assert_eq!(t.endpoints[1].weight, 100);
        assert_eq!(t.endpoints[1].state, EndpointState::Draining);
        assert!(t.policy.is_some());
    }

    #[test]
    fn refuses_bad_answers_with_a_condition() {
        let cases: [(&[u8], &str); 6] = [
            (b"not json", "malformed"),
            (br#"{"service":"av","version":1,"endpoints":[{"id":"x","address":"localhost:1","state":"healthy"}]}"#, "malformed"),
            (br#"{"service":"av","version":1,"endpoints":[{"id":"x","address":"127.0.0.1:1","state":"sleepy"}]}"#, "malformed"),
            (br#"{"service":"av","version":1,"endpoints":[{"id":"x","address":"127.0.0.1:1","state":"healthy"},{"id":"x","address":"127.0.0.1:2","state":"healthy"}]}"#, "malformed"),
            (br#"{"service":"other","version":1,"endpoints":[]}"#, "wrong_service"),
            (br#"{"service":"av","version":3,"endpoints":[]}"#, "stale"),
        ];
        for (body, condition) in cases {
            let current = if condition == "stale" { Some(5) } else { None };
            let e = Table::parse(body, "av", current, 1 << 20).unwrap_err();
            assert_eq!(e.condition(), condition, "{e}");
        }
        let e = Table::parse(GOOD.as_bytes(), "av", None, 100).unwrap_err();
        assert_eq!(e.condition(), "oversized");
    }

    #[test]
    fn same_version_is_not_stale() {
        assert!(Table::parse(GOOD.as_bytes(), "av", Some(17), 1 << 20).is_ok());
    }
}
