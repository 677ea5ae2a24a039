//! The supervisor's YAML configuration, in our users' vocabulary (docs/configuration.md), and its validation.
//!
//! `environment` picks a profile (production, staging, development) that supplies the health-check defaults; every
//! service may override them. A bad file is a [`ConfigError`] naming the key (a dotted path) and the reason, and the
//! supervisor refuses to start. Balancing policies are validated by the filter's own validator, so the supervisor can
//! never hand the proxies a policy they would refuse.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use equilibrio_contract::FieldError;
use equilibrio_contract::is_id_byte;
use equilibrio_contract::keyed::{Millis, deserialize_keyed};
use equilibrio_contract::policy::Policy;

pub use crate::environment::Environment;

/// Health-check settings of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HealthCheck {
    /// Between checks of one instance (each check is jittered by up to 10%).
    pub interval_ms: u64,
    pub timeout_ms: u64,
    /// Consecutive failures that mark an instance unhealthy.
    pub retries: u32,
    /// Consecutive successes that mark it healthy again.
    pub rise: u32,
    /// The path checked (a 2xx answer is healthy).
    pub endpoint: String,
}

impl HealthCheck {
    /// The profile's defaults. Faster than our users' plan's 30 s interval (docs/configuration.md) (which needs 90 s to notice a dead
    /// instance, three times its own 30 s failover target): HAProxy's defaults (2 s, fall 3, rise 2) notice in about
    /// 6 s (docs/supervisor.md).
    pub fn for_environment(env: Environment) -> HealthCheck {
        let (interval_ms, timeout_ms, retries, rise) = match env {
            Environment::Production => (2000, 1000, 3, 2),
            Environment::Staging => (2000, 1000, 3, 2),
            Environment::Development => (1000, 500, 2, 1),
        };
        HealthCheck { interval_ms, timeout_ms, retries, rise, endpoint: "/health".into() }
    }
}

/// An instance as configured or registered: the metadata of docs/configuration.md's instance metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceSpec {
    pub id: String,
    /// `ip:port` where the proxies reach it.
    pub address: String,
    #[serde(default = "equilibrio_contract::table::default_weight")]
    pub weight: u32,
    #[serde(default)]
    pub zone: String,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub capabilities: Vec<String>,
}

/// Longest zone, tag, capability or version.
pub const MAX_LABEL_BYTES: usize = 64;
/// Most tags, and most capabilities, per instance.
pub const MAX_LABELS: usize = 16;

impl InstanceSpec {
    /// Validates the fields and writes the address in its one canonical form (`127.0.0.1:019117` and
    /// `[::ffff:127.0.0.1]:19117` are `127.0.0.1:19117`, so one backend cannot be registered twice under two spellings);
    /// on error gives the field and the reason. Every field is bounded: what is accepted here always fits the table
    /// the proxies take (a zone of 600 KB once froze every proxy on a stale table).
    pub fn validate(&mut self) -> Result<(), FieldError> {
        equilibrio_contract::table::validate_endpoint_fields(&self.id, &self.address, self.weight)?;
        self.address = canonical_address(&self.address).map_err(|r| FieldError::new("address", r))?;
        validate_zone(&self.zone).map_err(|r| FieldError::new("zone", r))?;
        if self.version.len() > MAX_LABEL_BYTES || self.version.bytes().any(|b| !b.is_ascii_graphic()) {
            return Err(FieldError::new(
                "version",
                format!("must be at most {MAX_LABEL_BYTES} printable characters, no spaces"),
            ));
        }
        for (field, labels) in [("tags", &self.tags), ("capabilities", &self.capabilities)] {
            let ok = |l: &String| {
                !l.is_empty() && l.len() <= MAX_LABEL_BYTES && l.bytes().all(equilibrio_contract::is_id_byte)
            };
            if labels.len() > MAX_LABELS || !labels.iter().all(ok) {
                return Err(FieldError::new(
                    field,
                    format!("at most {MAX_LABELS}, each 1 to {MAX_LABEL_BYTES} of [A-Za-z0-9._-]"),
                ));
            }
        }
        Ok(())
    }
}

/// A zone: at most 64 of `[A-Za-z0-9._-]` (empty: none), at registration and on update alike.
pub fn validate_zone(zone: &str) -> Result<(), String> {
    // the proxies' rule (a table with another zone is refused by every proxy)
    if zone.is_empty() || equilibrio_contract::policy::valid_zone(zone) {
        Ok(())
    } else {
        Err(format!("must be at most {MAX_LABEL_BYTES} of [A-Za-z0-9._-]"))
    }
}

/// The one spelling of an instance's address, or why it cannot be one: port 0, an unspecified, broadcast or multicast
/// address reach no single backend.
pub fn canonical_address(address: &str) -> Result<String, String> {
    let addr: std::net::SocketAddr =
        address.parse().map_err(|_| format!("`{address}` is not an ip:port socket address"))?;
    let ip = match addr.ip() {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
        v4 => v4,
    };
    let broadcast = matches!(ip, std::net::IpAddr::V4(v4) if v4.is_broadcast());
    if addr.port() == 0 || ip.is_unspecified() || ip.is_multicast() || broadcast {
        return Err(format!("`{address}` is not one backend's address (port 0, unspecified, broadcast or multicast)"));
    }
    Ok(std::net::SocketAddr::new(ip, addr.port()).to_string())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealthCheck {
    interval: Option<Millis>,
    timeout: Option<Millis>,
    retries: Option<u32>,
    rise: Option<u32>,
    endpoint: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    #[serde(default)]
    load_balancer: Option<Value>,
    #[serde(default)]
    docker: Option<crate::scaling::runtime::Template>,
    #[serde(default)]
    scaling: Option<Value>,
    #[serde(default)]
    health_check: Option<RawHealthCheck>,
    #[serde(default)]
    instances: Vec<InstanceSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    environment: Environment,
    listen: Option<String>,
    token_file: Option<PathBuf>,
    state_file: Option<PathBuf>,
    store: Option<RawStore>,
    node_id: Option<String>,
    drain_timeout: Option<Millis>,
    header_read_timeout: Option<Millis>,
    max_connections: Option<usize>,
    #[serde(default)]
    public_reads: bool,
    #[serde(default)]
    webhooks: Vec<String>,
    webhook_ca_file: Option<PathBuf>,
    #[serde(default)]
    services: BTreeMap<String, RawService>,
}

/// `store:` as written: `{kind: file, path}` or `{kind: etcd, endpoints, prefix, lease_ttl, username,
/// password_file}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "snake_case")]
enum RawStore {
    File {
        path: PathBuf,
    },
    Etcd {
        endpoints: Vec<String>,
        #[serde(default)]
        prefix: Option<String>,
        #[serde(default)]
        lease_ttl: Option<Millis>,
        #[serde(default)]
        username: Option<String>,
        #[serde(default)]
        password_file: Option<PathBuf>,
        #[serde(default)]
        ca_file: Option<PathBuf>,
        #[serde(default)]
        cert_file: Option<PathBuf>,
        #[serde(default)]
        key_file: Option<PathBuf>,
    },
}

/// Where the registry is kept (see `store.rs`).
#[derive(Debug, Clone, PartialEq)]
pub enum StoreConfig {
    /// Nothing is kept: a restart starts from this file.
    Memory,
    /// The state file (one supervisor).
    File(PathBuf),
    /// etcd, shared by several supervisors (one leader).
    Etcd(EtcdConfig),
}

#[derive(Debug, Clone, PartialEq)]
pub struct EtcdConfig {
    /// Client URLs of the etcd members (`http://host:port`).
    pub endpoints: Vec<String>,
    /// Every key of this deployment is under it (`/equilibrio`).
    pub prefix: String,
    /// The leader's lease: another node takes over within this (and a second) after the leader is lost.
    pub lease_ttl_ms: u64,
    /// etcd authentication: the user, and the password read from `password_file`.
    pub user: Option<(String, String)>,
    /// TLS to etcd (`https://` endpoints).
    pub tls: Option<EtcdTls>,
}

/// TLS to etcd: the CA that signed its certificates, and this node's client certificate and key when etcd asks for
/// one (`--client-cert-auth`). PEM, read at start.
#[derive(Clone, PartialEq)]
pub struct EtcdTls {
    pub ca_pem: Vec<u8>,
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EtcdTls(<redacted>)")
    }
}

#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// The balancing policy served to the proxies (the filter's policy keys), validated.
    pub policy: Value,
    /// How to run the service's containers; with it, the service is auto-scaled.
    pub docker: Option<crate::scaling::runtime::Template>,
    /// The environment's scaling defaults with the service's overrides.
    pub scaling: crate::scaling::policy::ScalingPolicy,
    pub health_check: HealthCheck,
    pub instances: Vec<InstanceSpec>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub environment: Environment,
    pub listen: SocketAddr,
    pub token: Option<String>,
    pub store: StoreConfig,
    /// This supervisor's name among several (`store: {kind: etcd}`); by default `supervisor-<listen port>`.
    pub node_id: String,
    pub drain_timeout_ms: u64,
    /// A client must send a request's head within this (slowloris).
    pub header_read_timeout_ms: u64,
    /// Connections open at once; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// Reads (services, instances, events, metrics) open to anyone who can reach the port. Off by default: with a
    /// token, reads need it too (they show every instance's address).
    pub public_reads: bool,
    /// Test-only: `EQUILIBRIO_FAULT_INJECTION=1` in the environment (set by `main`, never from the file).
    pub fault_injection: bool,
    pub webhooks: Vec<String>,
    /// PEM certificates trusted for `https://` webhooks besides the platform's roots (a private CA).
    pub webhook_ca_pem: Option<Vec<u8>>,
    pub services: BTreeMap<String, ServiceConfig>,
}

/// Why the configuration file was refused: the dotted key and the reason.
pub type ConfigError = FieldError;

fn err(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    FieldError::new(key, reason)
}

/// Validates a balancing policy (the object of policy keys) as every proxy will; returns the error with its key.
pub fn validate_policy(policy: &Value) -> Result<(), FieldError> {
    Policy::parse(policy).map(|_| ())
}

/// Validates health-check settings; on error gives the field and the reason.
pub fn validate_health(h: &HealthCheck) -> Result<(), FieldError> {
    if !(100..=3_600_000).contains(&h.interval_ms) {
        return Err(FieldError::new("interval", "must be between 100ms and 1h"));
    }
    if h.timeout_ms < 10 || h.timeout_ms > h.interval_ms.max(10) {
        return Err(FieldError::new("timeout", "must be between 10ms and the interval"));
    }
    if !(1..=100).contains(&h.retries) {
        return Err(FieldError::new("retries", "must be between 1 and 100"));
    }
    if !(1..=100).contains(&h.rise) {
        return Err(FieldError::new("rise", "must be between 1 and 100"));
    }
    if !h.endpoint.starts_with('/') || h.endpoint.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
        return Err(FieldError::new("endpoint", "must be a path starting with `/`"));
    }
    Ok(())
}

fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}

impl Config {
    /// Parses and validates a YAML document. `env_token` is the `EQUILIBRIO_TOKEN` environment variable, if set.
    pub fn parse(yaml: &str, env_token: Option<String>) -> Result<Config, ConfigError> {
        let doc: Value = serde_saphyr::from_str(yaml).map_err(|e| err("", format!("not valid YAML: {e}")))?;
        let doc = if doc.is_null() { Value::Object(Default::default()) } else { doc };
        let raw: RawConfig = deserialize_keyed(&doc)?;
        Config::resolve(raw, env_token)
    }

    fn resolve(raw: RawConfig, env_token: Option<String>) -> Result<Config, ConfigError> {
        let listen: SocketAddr = raw
            .listen
            .as_deref()
            .unwrap_or("127.0.0.1:9900")
            .parse()
            .map_err(|e| err("listen", format!("not an ip:port address ({e})")))?;
        let token = match (&raw.token_file, env_token.filter(|t| !t.is_empty())) {
            (_, Some(t)) => Some(t),
            (Some(path), None) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| err("token_file", format!("cannot read {}: {e}", path.display())))?
                    .trim()
                    .to_string(),
            ),
            (None, None) => None,
        };
        if let Some(t) = &token
            && (t.len() < 16 || !t.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(err("token_file", "the token must be at least 16 printable characters without spaces"));
        }
        if token.is_none() && !is_loopback(&listen) {
            return Err(err(
                "listen",
                format!("{listen} is not loopback: set a token (EQUILIBRIO_TOKEN or token_file) to listen there"),
            ));
        }
        let store = match (raw.store, raw.state_file) {
            (Some(_), Some(_)) => return Err(err("state_file", "give either `state_file` or `store`, not both")),
            (None, Some(path)) | (Some(RawStore::File { path }), None) => StoreConfig::File(path),
            (None, None) => StoreConfig::Memory,
            (
                Some(RawStore::Etcd {
                    endpoints,
                    prefix,
                    lease_ttl,
                    username,
                    password_file,
                    ca_file,
                    cert_file,
                    key_file,
                }),
                None,
            ) => {
                if endpoints.is_empty() {
                    return Err(err("store.endpoints", "list at least one etcd client URL"));
                }
                let https = endpoints.first().is_some_and(|e| e.starts_with("https://"));
                for (i, e) in endpoints.iter().enumerate() {
                    let scheme = if https { "https://" } else { "http://" };
                    if e.strip_prefix(scheme).is_none_or(|r| r.is_empty() || r.contains('/')) {
                        return Err(err(
                            format!("store.endpoints[{i}]"),
                            format!("must be {scheme}host:port, as the first"),
                        ));
                    }
                }
                let read = |key: &str, path: &PathBuf| {
                    std::fs::read(path)
                        .map_err(|e| err(format!("store.{key}"), format!("cannot read {}: {e}", path.display())))
                };
                let tls = match (https, ca_file, cert_file, key_file) {
                    (false, None, None, None) => None,
                    (false, ..) => return Err(err("store.ca_file", "TLS files need https:// endpoints")),
                    (true, None, ..) => {
                        return Err(err("store.ca_file", "https:// endpoints need the CA of etcd's certificates"));
                    }
                    (true, Some(ca), cert, key) => {
                        let identity = match (cert, key) {
                            (None, None) => None,
                            (Some(c), Some(k)) => Some((read("cert_file", &c)?, read("key_file", &k)?)),
                            _ => {
                                return Err(err("store.cert_file", "give both `cert_file` and `key_file`, or neither"));
                            }
                        };
                        Some(EtcdTls { ca_pem: read("ca_file", &ca)?, identity })
                    }
                };
                let prefix = prefix.unwrap_or_else(|| "/equilibrio".into());
                if !prefix.starts_with('/')
                    || prefix.len() < 2
                    || prefix.ends_with('/')
                    || !prefix[1..].split('/').all(|part| !part.is_empty() && part.bytes().all(is_id_byte))
                {
                    return Err(err("store.prefix", "must be a path like /equilibrio (segments of [A-Za-z0-9._-])"));
                }
                let lease_ttl_ms = lease_ttl.map_or(5_000, |m| m.0);
                if !(2_000..=60_000).contains(&lease_ttl_ms) || lease_ttl_ms % 1000 != 0 {
                    return Err(err("store.lease_ttl", "must be whole seconds between 2s and 60s"));
                }
                let user = match (username, password_file) {
                    (None, None) => None,
                    (Some(u), Some(path)) => {
                        let password = std::fs::read_to_string(&path)
                            .map_err(|e| err("store.password_file", format!("cannot read {}: {e}", path.display())))?;
                        Some((u, password.trim().to_string()))
                    }
                    _ => return Err(err("store.username", "give both `username` and `password_file`, or neither")),
                };
                StoreConfig::Etcd(EtcdConfig { endpoints, prefix, lease_ttl_ms, user, tls })
            }
        };
        let node_id = raw.node_id.unwrap_or_else(|| format!("supervisor-{}", listen.port()));
        if node_id.is_empty() || node_id.len() > 64 || !node_id.bytes().all(is_id_byte) {
            return Err(err("node_id", "must be 1 to 64 of [A-Za-z0-9._-]"));
        }
        let drain_timeout_ms = raw.drain_timeout.map_or(30_000, |m| m.0);
        if !(100..=3_600_000).contains(&drain_timeout_ms) {
            return Err(err("drain_timeout", "must be between 100ms and 1h"));
        }
        for (i, url) in raw.webhooks.iter().enumerate() {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(err(format!("webhooks[{i}]"), "must be an http:// or https:// URL"));
            }
        }
        let header_read_timeout_ms = raw.header_read_timeout.map_or(10_000, |m| m.0);
        if !(100..=300_000).contains(&header_read_timeout_ms) {
            return Err(err("header_read_timeout", "must be between 100ms and 5m"));
        }
        let max_connections = raw.max_connections.unwrap_or(1024);
        if !(1..=1_000_000).contains(&max_connections) {
            return Err(err("max_connections", "must be between 1 and 1000000"));
        }
        let webhook_ca_pem = match &raw.webhook_ca_file {
            None => None,
            Some(path) => {
                let pem = std::fs::read(path)
                    .map_err(|e| err("webhook_ca_file", format!("cannot read {}: {e}", path.display())))?;
                reqwest::Certificate::from_pem_bundle(&pem)
                    .ok()
                    .filter(|c| !c.is_empty())
                    .ok_or_else(|| err("webhook_ca_file", format!("{} holds no PEM certificate", path.display())))?;
                Some(pem)
            }
        };
        let defaults = HealthCheck::for_environment(raw.environment);
        let mut services = BTreeMap::new();
        for (name, svc) in raw.services {
            let key = format!("services.{name}");
            if name.is_empty() || !name.bytes().all(is_id_byte) {
                return Err(err(key, "service names are 1 or more of [A-Za-z0-9._-]"));
            }
            let policy = svc.load_balancer.unwrap_or_else(|| Value::Object(Default::default()));
            validate_policy(&policy).map_err(|e| e.within(&format!("{key}.load_balancer")))?;
            let h = svc.health_check.unwrap_or(RawHealthCheck {
                interval: None,
                timeout: None,
                retries: None,
                rise: None,
                endpoint: None,
            });
            let health_check = HealthCheck {
                interval_ms: h.interval.map_or(defaults.interval_ms, |m| m.0),
                timeout_ms: h.timeout.map_or(defaults.timeout_ms, |m| m.0),
                retries: h.retries.unwrap_or(defaults.retries),
                rise: h.rise.unwrap_or(defaults.rise),
                endpoint: h.endpoint.unwrap_or_else(|| defaults.endpoint.clone()),
            };
            validate_health(&health_check).map_err(|e| e.within(&format!("{key}.health_check")))?;
            let mut ids = std::collections::HashSet::new();
            let mut instances = svc.instances;
            for (i, inst) in instances.iter_mut().enumerate() {
                inst.validate().map_err(|e| e.within(&format!("{key}.instances[{i}]")))?;
                if !ids.insert(inst.id.clone()) {
                    return Err(err(format!("{key}.instances[{i}].id"), format!("`{}` appears twice", inst.id)));
                }
            }
            if let Some(t) = &svc.docker {
                t.validate().map_err(|e| e.within(&format!("{key}.docker")))?;
            }
            let scaling = crate::scaling::policy::ScalingPolicy::for_environment(raw.environment)
                .with_overrides(svc.scaling.as_ref())
                .map_err(|e| e.within(&format!("{key}.scaling")))?;
            services.insert(name, ServiceConfig { policy, docker: svc.docker, scaling, health_check, instances });
        }
        Ok(Config {
            environment: raw.environment,
            listen,
            token,
            store,
            node_id,
            drain_timeout_ms,
            header_read_timeout_ms,
            max_connections,
            public_reads: raw.public_reads,
            fault_injection: false,
            webhooks: raw.webhooks,
            webhook_ca_pem,
            services,
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn addresses_have_one_spelling_and_name_one_backend() {
        assert_eq!(canonical_address("127.0.0.1:019117").unwrap(), "127.0.0.1:19117");
        assert_eq!(canonical_address("[::ffff:127.0.0.1]:19117").unwrap(), "127.0.0.1:19117");
        assert_eq!(canonical_address("[::1]:80").unwrap(), "[::1]:80");
        for bad in ["127.0.0.1:0", "0.0.0.0:80", "[::]:80", "255.255.255.255:80", "224.0.0.1:80", "host:80"] {
            assert!(canonical_address(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn instance_labels_are_bounded() {
        let base = InstanceSpec {
            id: "a".into(),
            address: "127.0.0.1:1".into(),
            weight: 1,
            zone: "eu-west-1a".into(),
            tags: vec!["search".into()],
            version: "v1.2.3+build".into(),
            capabilities: vec![],
        };
        base.clone().validate().unwrap();
        let mut s = InstanceSpec { zone: "z".repeat(600_000), ..base.clone() };
        assert_eq!(s.validate().unwrap_err().key, "zone");
        let mut s = InstanceSpec { tags: vec!["t".into(); 17], ..base.clone() };
        assert_eq!(s.validate().unwrap_err().key, "tags");
        let mut s = InstanceSpec { capabilities: vec!["has space".into()], ..base.clone() };
        assert_eq!(s.validate().unwrap_err().key, "capabilities");
        let mut s = InstanceSpec { version: "v\n1".into(), ..base };
        assert_eq!(s.validate().unwrap_err().key, "version");
    }

    use super::*;

    const GOOD: &str = r#"
environment: production
listen: 127.0.0.1:9900
services:
  agente-vendedor:
    load_balancer:
      algorithm: weighted_round_robin
      sticky_sessions: {enabled: true, cookie_name: AGENTE_VENDEDOR_SESSION, ttl: 3600, secret: "0123456789abcdef0123"}
      rate_limiting: {enabled: true, requests_per_minute: 1000, burst_size: 100}
    health_check: {interval: 30, timeout: 5, retries: 3, endpoint: /health}
    instances:
      - {id: av-1, address: "127.0.0.1:8081", weight: 100, zone: a, tags: [api, rag, cache], version: 1.0.0}
"#;

    #[test]
    fn parses_the_plan_vocabulary() {
        let c = Config::parse(GOOD, None).unwrap();
        assert_eq!(c.environment, Environment::Production);
        let s = &c.services["agente-vendedor"];
        assert_eq!(s.health_check.interval_ms, 30_000);
        assert_eq!(s.health_check.rise, 2, "from the production profile");
        assert_eq!(s.instances[0].tags, vec!["api", "rag", "cache"]);
        assert_eq!(s.policy["rate_limiting"]["burst_size"], 100);
    }

    #[test]
    fn durations_take_units() {
        let y = "services:\n  s:\n    health_check: {interval: 500ms, timeout: 100ms}\n";
        let c = Config::parse(y, None).unwrap();
        assert_eq!(c.services["s"].health_check.interval_ms, 500);
        assert_eq!(c.services["s"].health_check.timeout_ms, 100);
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("listen: nowhere\n", "listen"),
            ("colour: blue\n", "colour"),
            ("environment: moon\n", "environment"),
            ("services:\n  s:\n    health_check: {interval: 1, timeout: 5}\n", "services.s.health_check.timeout"),
            ("services:\n  s:\n    health_check: {intervl: 1}\n", "services.s.health_check.intervl"),
            ("services:\n  s:\n    load_balancer: {algorithm: fastest}\n", "services.s.load_balancer.algorithm"),
            (
                "services:\n  s:\n    load_balancer: {sticky_sessions: {enabled: true}}\n",
                "services.s.load_balancer.sticky_sessions.secret",
            ),
            ("services:\n  s:\n    instances: [{id: a, address: 'x:1'}]\n", "services.s.instances[0].address"),
            (
                "services:\n  s:\n    instances: [{id: a, address: '127.0.0.1:1'}, {id: a, address: '127.0.0.1:2'}]\n",
                "services.s.instances[1].id",
            ),
            ("listen: 0.0.0.0:9900\n", "listen"),
            ("services:\n  s:\n    docker: {image: i, port: 80, mode: kubernetes}\n", "services.s.docker.mode"),
            (
                "services:\n  s:\n    docker: {image: i, port: 80, mode: swarm, network: n}\n",
                "services.s.docker.network",
            ),
            (
                "services:\n  s:\n    docker: {image: i, port: 80, placement: {constraints: ['node.role==worker']}}\n",
                "services.s.docker.placement",
            ),
            (
                "services:\n  s:\n    docker: {image: i, port: 80, mode: swarm, node_apis: {n2: '10.0.0.2:2375'}}\n",
                "services.s.docker.node_apis.n2",
            ),
        ];
        for (yaml, key) in cases {
            let e = Config::parse(yaml, None).unwrap_err();
            assert_eq!(e.key, key, "{yaml}: {e}");
        }
    }

    #[test]
    fn a_swarm_template_reads_its_placement_zone_label_and_node_apis() {
        let yaml = "services:\n  s:\n    docker:\n      mode: swarm\n      image: i\n      port: 80\n      placement: {constraints: ['node.role==worker'], spread: [node.labels.zone]}\n      node_apis: {n2: 'tcp://10.0.0.2:2375'}\n";
        let c = Config::parse(yaml, None).unwrap();
        let t = c.services["s"].docker.clone().unwrap();
        assert_eq!(t.mode, crate::scaling::runtime::Mode::Swarm);
        assert_eq!(t.placement.spread, vec!["node.labels.zone".to_string()]);
        assert_eq!(t.zone_label, "io.equilibrio.zone", "the default");
        assert_eq!(t.node_apis["n2"], "tcp://10.0.0.2:2375");
    }

    #[test]
    fn the_store_is_a_file_or_etcd_named_by_its_keys() {
        let c = Config::parse("state_file: /tmp/s.json\n", None).unwrap();
        assert_eq!(c.store, StoreConfig::File("/tmp/s.json".into()));
        let c =
            Config::parse("store: {kind: etcd, endpoints: ['http://127.0.0.1:2379']}\nnode_id: n1\n", None).unwrap();
        let StoreConfig::Etcd(e) = c.store else { panic!("not etcd") };
        assert_eq!((e.prefix.as_str(), e.lease_ttl_ms, c.node_id.as_str()), ("/equilibrio", 5000, "n1"));
        let cases = [
            ("state_file: a\nstore: {kind: file, path: b}\n", "state_file"),
            ("store: {kind: etcd, endpoints: []}\n", "store.endpoints"),
            ("store: {kind: etcd, endpoints: ['http://a:1', 'https://b:1']}\n", "store.endpoints[1]"),
            ("store: {kind: etcd, endpoints: ['127.0.0.1:2379']}\n", "store.endpoints[0]"),
            ("store: {kind: etcd, endpoints: ['http://a:1'], lease_ttl: 500ms}\n", "store.lease_ttl"),
            ("store: {kind: etcd, endpoints: ['http://a:1'], prefix: equilibrio}\n", "store.prefix"),
            ("store: {kind: etcd, endpoints: ['http://a:1'], ca_file: /x}\n", "store.ca_file"),
            ("store: {kind: etcd, endpoints: ['https://a:1']}\n", "store.ca_file"),
            ("store: {kind: etcd, endpoints: ['https://a:1'], ca_file: /nonexistent}\n", "store.ca_file"),
            ("store: {kind: etcd, endpoints: ['http://a:1'], username: u}\n", "store.username"),
            ("store: {kind: consul}\n", "store.kind"),
            ("node_id: 'a b'\n", "node_id"),
        ];
        for (yaml, key) in cases {
            let e = Config::parse(yaml, None).unwrap_err();
            assert_eq!(e.key, key, "{yaml}: {e}");
        }
    }

    #[test]
    fn a_token_allows_other_addresses() {
        let c = Config::parse("listen: 0.0.0.0:9900\n", Some("a-long-enough-token-123".into())).unwrap();
        assert_eq!(c.token.as_deref(), Some("a-long-enough-token-123"));
        let e = Config::parse("", Some("short".into())).unwrap_err();
        assert_eq!(e.key, "token_file");
    }

    #[test]
    fn empty_file_is_a_valid_development_supervisor() {
        let c = Config::parse("", None).unwrap();
        assert_eq!(c.environment, Environment::Development);
        assert_eq!(c.listen.to_string(), "127.0.0.1:9900");
    }
}

#[cfg(test)]
mod shipped {
    use super::*;

    #[test]
    fn the_shipped_config_is_valid() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../proxy-config/supervisor.yaml");
        let c = Config::parse(&std::fs::read_to_string(path).unwrap(), None).unwrap();
        assert!(c.services.contains_key("agente-vendedor"));
        for env in ["production", "staging", "development"] {
            let text = std::fs::read_to_string(path)
                .unwrap()
                .replace("environment: development", &format!("environment: {env}"));
            Config::parse(&text, None).unwrap();
        }
    }
}
