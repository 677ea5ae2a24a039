//! `host.yaml`: the bundled proxy's configuration, mirroring the Envoy config's concepts (listener, admin, route,
//! clusters, a singleton wasm service and HTTP filters). Parsing is strict: an unknown key, a wrong type or a bad value
//! is refused with the dotted key and the reason, and the proxy does not start.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use equilibrio_contract::FieldError;
use equilibrio_contract::keyed::{Millis, deserialize_keyed};
use serde::Deserialize;
use serde_json::Value;

/// Why `host.yaml` was refused: the dotted key and the reason.
pub type ConfigError = FieldError;

fn err(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    FieldError::new(key, reason)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenerConfig {
    /// Where clients connect.
    pub address: SocketAddr,
    /// Worker threads, each with its own event loop, filter VMs and upstream pool (0: one per core).
    pub workers: usize,
    /// Open client connections above which new ones are refused (closed at once).
    pub max_connections: usize,
    /// Largest request head (request line and headers) accepted; above it the client gets 431.
    pub max_request_headers_kb: usize,
    /// Largest body a filter may buffer (`StopIterationAndBuffer`), per request and direction: Envoy's
    /// `per_connection_buffer_limit_bytes`. Beyond it a request gets 413, a response 500 (or a reset once its head is
    /// sent).
    pub buffer_limit_kb: usize,
    /// A client that has not sent a complete request head within this time of its first byte is disconnected.
    pub header_read_timeout: Millis,
    /// A keep-alive connection with no request in flight for this long is closed.
    pub idle_timeout: Millis,
    /// Accept HTTP/2 (prior knowledge, h2c) as well as HTTP/1.1.
    pub http2: bool,
    /// On SIGTERM: stop accepting, then wait this long for in-flight requests before exiting.
    pub drain_timeout: Millis,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        ListenerConfig {
            address: SocketAddr::from(([127, 0, 0, 1], 10000)),
            workers: 0,
            max_connections: 50_000,
            max_request_headers_kb: 60,
            buffer_limit_kb: 1024,
            header_read_timeout: Millis(10_000),
            idle_timeout: Millis(60_000),
            http2: true,
            drain_timeout: Millis(10_000),
        }
    }
}

/// What a filter may use, per VM: a bug that loops or leaks stops at these, not with the worker.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WasmLimits {
    /// Linear memory per VM, MiB: a `memory.grow` beyond it traps, and the VM is re-created.
    pub max_memory_mb: usize,
    /// Longest a VM may run on one entry (a callback and what it calls): beyond it the call traps (the request gets a
    /// 5xx, the VM is re-created, the worker serves on). `0` turns the check off (and its small cost per call and
    /// loop iteration with it).
    pub callback_timeout: Millis,
}

impl Default for WasmLimits {
    fn default() -> Self {
        WasmLimits { max_memory_mb: 256, callback_timeout: Millis(1000) }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// `/stats`, `/stats/prometheus`, `/ready`, `/listeners`. Loopback unless you mean otherwise: it is unauthenticated.
    pub address: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig { address: SocketAddr::from(([127, 0, 0, 1], 9901)) }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouteConfig {
    /// The cluster requests go to; the filter names the hosts in `x-equilibrio-upstream`.
    pub cluster: String,
    /// Time allowed for the upstream's response headers, all attempts included (Envoy's route timeout).
    pub timeout: Millis,
    /// Further attempts on the next listed host after a connect failure or a reset (Envoy's `num_retries`).
    pub retries: u32,
    /// A response body that brings nothing for this long is cut off (Envoy's stream idle timeout, 5 minutes): an
    /// upstream that sends its headers and a few bytes and then hangs holds no client forever.
    pub idle_timeout: Millis,
    /// How many retries may be in flight, and how long each waits (see `retry_budget`).
    pub retry: RetryConfig,
}

impl Default for RouteConfig {
    fn default() -> Self {
        RouteConfig {
            cluster: "backend".into(),
            timeout: Millis(30_000),
            retries: 2,
            idle_timeout: Millis(300_000),
            retry: RetryConfig::default(),
        }
    }
}

/// The retry budget and backoff (Envoy's `retry_budget` and `retry_back_off`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Retries in flight may be at most this percent of the requests in flight (the shipped Envoy config's 50%)...
    pub budget_percent: f64,
    /// ...and may always be at least this many.
    pub min_concurrency: u32,
    /// The n-th retry waits a random time below `min(backoff_max, backoff_base x 2^(n-1))` (Envoy: 25 ms, 10x).
    pub backoff_base: Millis,
    pub backoff_max: Millis,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig { budget_percent: 50.0, min_concurrency: 64, backoff_base: Millis(25), backoff_max: Millis(250) }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    pub connect_timeout: Millis,
    /// Static members. For the route's cluster they are the fallback (round robin) when no filter names a host; for
    /// a cluster a filter calls (`dispatch_http_call`), the first reachable one is used.
    pub endpoints: Vec<SocketAddr>,
    /// Idle keep-alive connections kept per upstream host and worker.
    pub max_idle_per_host: usize,
    /// An idle pooled connection older than this is closed rather than reused.
    pub idle_timeout: Millis,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            connect_timeout: Millis(1000),
            endpoints: vec![],
            max_idle_per_host: 128,
            idle_timeout: Millis(30_000),
        }
    }
}

/// One proxy-wasm plugin: which module, which root context, its configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    pub name: String,
    #[serde(default)]
    pub root_id: String,
    /// Plugins with the same `vm_id` share shared data (as in Envoy).
    #[serde(default)]
    pub vm_id: String,
    /// Path of the `.wasm` (relative paths are relative to the working directory, as in Envoy).
    pub file: PathBuf,
    /// The plugin configuration: a string is passed as is; a mapping is passed as JSON.
    #[serde(default)]
    pub configuration: Value,
    /// The VM configuration (`proxy_on_vm_start`), same rules.
    #[serde(default)]
    pub vm_configuration: Value,
}

impl PluginConfig {
    pub fn configuration_bytes(&self) -> Vec<u8> {
        value_bytes(&self.configuration)
    }

    pub fn vm_configuration_bytes(&self) -> Vec<u8> {
        value_bytes(&self.vm_configuration)
    }
}

fn value_bytes(v: &Value) -> Vec<u8> {
    match v {
        Value::Null => vec![],
        Value::String(s) => s.clone().into_bytes(),
        other => other.to_string().into_bytes(),
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Trace => "trace",
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    listener: ListenerConfig,
    #[serde(default)]
    admin: AdminConfig,
    #[serde(default)]
    route: RouteConfig,
    #[serde(default)]
    clusters: BTreeMap<String, ClusterConfig>,
    #[serde(default)]
    wasm_services: Vec<PluginConfig>,
    #[serde(default)]
    http_filters: Vec<PluginConfig>,
    #[serde(default)]
    log_level: Option<LogLevel>,
    #[serde(default)]
    wasm: WasmLimits,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listener: ListenerConfig,
    pub admin: AdminConfig,
    pub route: RouteConfig,
    pub clusters: BTreeMap<String, ClusterConfig>,
    /// Singleton plugins: one VM for the whole process, with tick timers and HTTP calls (Envoy's
    /// `envoy.bootstrap.wasm` with `singleton: true`).
    pub wasm_services: Vec<PluginConfig>,
    /// HTTP filters, in order: one VM per worker each.
    pub http_filters: Vec<PluginConfig>,
    pub log_level: LogLevel,
    pub wasm: WasmLimits,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| err("", format!("cannot read {}: {e}", path.display())))?;
        Config::parse(&text)
    }

    pub fn parse(yaml: &str) -> Result<Config, ConfigError> {
        let doc: Value = serde_saphyr::from_str(yaml).map_err(|e| err("", format!("not valid YAML: {e}")))?;
        let doc = if doc.is_null() { Value::Object(Default::default()) } else { doc };
        let raw: RawConfig = deserialize_keyed(&doc)?;
        Config::validate(raw)
    }

    fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
        let l = &raw.listener;
        if l.workers > 256 {
            return Err(err("listener.workers", "at most 256 (0: one per core)"));
        }
        if l.max_connections == 0 {
            return Err(err("listener.max_connections", "must be at least 1"));
        }
        if !(1..=1024).contains(&l.max_request_headers_kb) {
            return Err(err("listener.max_request_headers_kb", "must be between 1 and 1024"));
        }
        if !(1..=1024 * 1024).contains(&l.buffer_limit_kb) {
            return Err(err("listener.buffer_limit_kb", "must be between 1 and 1048576 (1 GiB)"));
        }
        for (key, v) in
            [("listener.header_read_timeout", l.header_read_timeout), ("listener.idle_timeout", l.idle_timeout)]
        {
            if v.0 == 0 {
                return Err(err(key, "must be more than 0"));
            }
        }
        if raw.route.timeout.0 == 0 {
            return Err(err("route.timeout", "must be more than 0"));
        }
        if !(1..=65_536).contains(&raw.wasm.max_memory_mb) {
            return Err(err("wasm.max_memory_mb", "must be between 1 and 65536"));
        }
        if raw.wasm.callback_timeout.0 > 3_600_000 {
            return Err(err("wasm.callback_timeout", "must be at most 1h (0: off)"));
        }
        if raw.route.idle_timeout.0 == 0 {
            return Err(err("route.idle_timeout", "must be more than 0"));
        }
        if raw.route.retries > 10 {
            return Err(err("route.retries", "at most 10"));
        }
        let r = &raw.route.retry;
        if !(0.0..=100.0).contains(&r.budget_percent) {
            return Err(err("route.retry.budget_percent", "must be between 0 and 100"));
        }
        if r.min_concurrency > 1_000_000 {
            return Err(err("route.retry.min_concurrency", "at most 1000000"));
        }
        if r.backoff_max < r.backoff_base || r.backoff_max.0 > 60_000 {
            return Err(err("route.retry.backoff_max", "must be between backoff_base and 60s"));
        }
        if !raw.clusters.contains_key(&raw.route.cluster) {
            return Err(err("route.cluster", format!("no cluster named `{}` in `clusters`", raw.route.cluster)));
        }
        for (name, c) in &raw.clusters {
            if c.connect_timeout.0 == 0 {
                return Err(err(format!("clusters.{name}.connect_timeout"), "must be more than 0"));
            }
        }
        let mut names = std::collections::BTreeSet::new();
        for (list, plugins) in [("wasm_services", &raw.wasm_services), ("http_filters", &raw.http_filters)] {
            for (i, p) in plugins.iter().enumerate() {
                if p.name.is_empty() {
                    return Err(err(format!("{list}[{i}].name"), "must not be empty"));
                }
                if !names.insert(p.name.clone()) {
                    return Err(err(format!("{list}[{i}].name"), format!("`{}` is used twice", p.name)));
                }
                if !p.file.is_file() {
                    return Err(err(
                        format!("{list}[{i}].file"),
                        format!("{} is not a readable file", p.file.display()),
                    ));
                }
            }
        }
        Ok(Config {
            listener: raw.listener,
            admin: raw.admin,
            route: raw.route,
            clusters: raw.clusters,
            wasm_services: raw.wasm_services,
            http_filters: raw.http_filters,
            log_level: raw.log_level.unwrap_or(LogLevel::Info),
            wasm: raw.wasm,
        })
    }

    /// Worker threads to run: the configured count, or one per core.
    pub fn workers(&self) -> usize {
        match self.listener.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn defaults_mirror_envoy() {
        let c = Config::parse("clusters: {backend: {}}").unwrap();
        assert_eq!(c.listener.address.to_string(), "127.0.0.1:10000");
        assert_eq!(c.admin.address.to_string(), "127.0.0.1:9901");
        assert_eq!(c.route.retries, 2);
        assert_eq!(c.listener.max_request_headers_kb, 60);
    }

    #[test]
    fn errors_name_the_key() {
        let e = Config::parse("clusters: {backend: {}}\nlistener: {adress: 1}").unwrap_err();
        assert_eq!(e.key, "listener.adress");
        let e = Config::parse("clusters: {backend: {connect_timeout: soon}}").unwrap_err();
        assert_eq!(e.key, "clusters.backend.connect_timeout");
        let e = Config::parse("clusters: {}").unwrap_err();
        assert_eq!(e.key, "route.cluster");
        let e =
            Config::parse("clusters: {backend: {}}\nhttp_filters: [{name: f, file: /nonexistent.wasm}]").unwrap_err();
        assert_eq!(e.key, "http_filters[0].file");
        let e = Config::parse("clusters: {backend: {}}\nlistener: {address: nowhere}").unwrap_err();
        assert_eq!(e.key, "listener.address");
    }

    #[test]
    fn plugin_configuration_is_a_string_or_json() {
        let p = PluginConfig {
            name: "x".into(),
            root_id: String::new(),
            vm_id: String::new(),
            file: PathBuf::new(),
            configuration: serde_json::json!({"a": 1}),
            vm_configuration: Value::String("raw".into()),
        };
        assert_eq!(p.configuration_bytes(), br#"{"a":1}"#);
        assert_eq!(p.vm_configuration_bytes(), b"raw");
    }
}
