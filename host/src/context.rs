//! What a VM's host functions can see: the plugin, the process-wide stores, and, during a stream callback, the
//! stream (request and response heads, addresses, flags). Host functions also leave effects here (a new tick
//! period, HTTP calls to make, streams to resume) that the driver applies after the call returns.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{request, response};
use wasmtime::{Memory, TypedFunc};
use wasmtime_wasi::p1::WasiP1Ctx;

use crate::config::LogLevel;
use crate::headers::Pairs;
use crate::shared_data::Scope;
use crate::stats::{Metric, Stats};

/// A plugin's identity and configuration, as the guest reads them.
pub struct PluginInfo {
    pub name: String,
    pub root_id: String,
    pub vm_id: String,
    pub configuration: Vec<u8>,
    pub vm_configuration: Vec<u8>,
}

/// Process-wide services every VM uses.
pub struct Env {
    pub stats: Arc<Stats>,
    pub shared: Arc<crate::shared_data::SharedData>,
    pub log_level: LogLevel,
    /// Cluster names a filter may call with `dispatch_http_call`.
    pub clusters: Vec<String>,
    /// The route's cluster (the `cluster_name` property).
    pub route_cluster: String,
    /// Bounds of every VM.
    pub limits: VmLimits,
}

/// A VM's bounds, as the runtime applies them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmLimits {
    pub max_memory_bytes: usize,
    /// Epoch ticks one entry may run (`None`: unbounded; the engine has no epoch checks).
    pub deadline_ticks: Option<u64>,
}

impl Default for VmLimits {
    fn default() -> Self {
        VmLimits { max_memory_bytes: 256 << 20, deadline_ticks: None }
    }
}

/// A reply the filter asked for (`proxy_send_local_response`).
#[derive(Debug, Clone)]
pub struct LocalReply {
    pub status: u16,
    pub details: String,
    pub body: Vec<u8>,
    pub headers: Pairs,
    /// The proxy's own reply (an upstream failure, a limit), not a filter's: as Envoy's router replies, its head
    /// carries no `content-length` and its body goes chunked over HTTP/1.1.
    pub proxy: bool,
}

/// One HTTP request/response as the filters see it.
pub struct Stream {
    pub request: request::Parts,
    pub response: Option<response::Parts>,
    pub source: SocketAddr,
    pub destination: SocketAddr,
    pub upstream: Option<SocketAddr>,
    /// Envoy response-flag bits (`response.flags`).
    pub flags: u64,
    pub details: &'static str,
    pub local_reply: Option<LocalReply>,
    /// Set by `proxy_close_stream`: the proxy resets the stream.
    pub closed: bool,
    /// Request and response trailers, once they arrived (read and changed by the trailer callbacks).
    pub request_trailers: Option<http::HeaderMap>,
    pub response_trailers: Option<http::HeaderMap>,
    /// The client's request body has been read to its end (or there was none).
    pub request_complete: bool,
    pub filter_state: Pairs,
    pub started: Instant,
}

impl Stream {
    pub fn new(request: request::Parts, source: SocketAddr, destination: SocketAddr) -> Stream {
        Stream {
            request,
            response: None,
            source,
            destination,
            upstream: None,
            flags: 0,
            details: "",
            local_reply: None,
            closed: false,
            request_trailers: None,
            response_trailers: None,
            request_complete: false,
            filter_state: vec![],
            started: Instant::now(),
        }
    }
}

/// Paused streams by context id.
pub type Parked = std::collections::HashMap<u32, Box<Stream>>;

/// Which body a body callback sees, and its bytes (what the filter has buffered, the new data included).
pub struct BodyBuffer {
    pub response: bool,
    pub bytes: Vec<u8>,
}

/// An HTTP call a filter dispatched (`proxy_http_call`), to be made by the driver.
#[derive(Debug, Clone)]
pub struct HttpCall {
    pub token: u32,
    pub context_id: u32,
    pub cluster: String,
    pub headers: Pairs,
    pub body: Vec<u8>,
    pub timeout_ms: u32,
}

/// The answer to an HTTP call, readable during `proxy_on_http_call_response`.
#[derive(Debug, Clone, Default)]
pub struct CallResponse {
    pub headers: Pairs,
    pub body: Vec<u8>,
    pub trailers: Pairs,
}

/// What host functions ask of the driver.
#[derive(Default)]
pub struct Effects {
    pub tick_period_ms: Option<u32>,
    pub http_calls: Vec<HttpCall>,
    /// Streams (context ids) a filter resumed with `proxy_continue_stream`.
    pub resumed: Vec<u32>,
}

impl Effects {
    pub fn is_empty(&self) -> bool {
        self.tick_period_ms.is_none() && self.http_calls.is_empty() && self.resumed.is_empty()
    }
}

/// The store data of one VM.
pub struct HostState {
    pub wasi: WasiP1Ctx,
    pub plugin: Arc<PluginInfo>,
    pub env: Arc<Env>,
    pub shared: Arc<Scope>,
    pub memory: Option<Memory>,
    pub malloc: Option<TypedFunc<i32, i32>>,
    /// Metric handles by id, cached so that the hot path takes no lock.
    pub metrics: Vec<Option<Arc<Metric>>>,
    pub stream: Option<Box<Stream>>,
    /// The context id of `stream`.
    pub stream_context: u32,
    /// Streams paused by this VM's filters, by context id: reachable from HTTP-call and tick callbacks (through
    /// `proxy_set_effective_context`), which may answer them, read or change their headers, or resume them.
    pub parked: Parked,
    /// The body buffer of the current body callback (`proxy_get_buffer_bytes` / `proxy_set_buffer_bytes`).
    pub body: Option<BodyBuffer>,
    pub call_response: Option<CallResponse>,
    pub effects: Effects,
    pub effective_context: u32,
    pub next_token: u32,
    /// A line of guest stdout/stderr not yet ended by a newline.
    pub stdio_line: Vec<u8>,
    /// The VM's memory bound (wasmtime's resource limiter).
    pub store_limits: wasmtime::StoreLimits,
}

impl HostState {
    pub fn new(plugin: Arc<PluginInfo>, env: Arc<Env>) -> HostState {
        let shared = env.shared.scope(&plugin.vm_id);
        let store_limits = wasmtime::StoreLimitsBuilder::new()
            .memory_size(env.limits.max_memory_bytes)
            .trap_on_grow_failure(true)
            .build();
        HostState {
            wasi: wasmtime_wasi::WasiCtxBuilder::new().build_p1(),
            plugin,
            env,
            shared,
            memory: None,
            malloc: None,
            metrics: vec![],
            stream: None,
            stream_context: 0,
            parked: Parked::new(),
            body: None,
            call_response: None,
            effects: Effects::default(),
            effective_context: 0,
            next_token: 1,
            stdio_line: vec![],
            store_limits,
        }
    }

    /// The stream of the effective context: the one being called back for, or a paused one a callback reaches.
    pub fn stream_mut(&mut self) -> Option<&mut Stream> {
        let context = self.effective_context;
        if context == self.stream_context
            && let Some(s) = self.stream.as_deref_mut()
        {
            return Some(s);
        }
        self.parked.get_mut(&context).map(|s| &mut **s)
    }

    pub fn stream_ref(&self) -> Option<&Stream> {
        let context = self.effective_context;
        if context == self.stream_context
            && let Some(s) = self.stream.as_deref()
        {
            return Some(s);
        }
        self.parked.get(&context).map(|s| &**s)
    }

    /// Whether the effective context is a paused stream (an answer to it must wake the request that waits).
    pub fn effective_is_parked(&self) -> bool {
        self.parked.contains_key(&self.effective_context)
    }

    pub fn metric(&mut self, id: u32) -> Option<Arc<Metric>> {
        let i = id as usize;
        if let Some(Some(m)) = self.metrics.get(i) {
            return Some(m.clone());
        }
        let m = self.env.stats.get(id)?;
        if self.metrics.len() <= i {
            self.metrics.resize(i + 1, None);
        }
        self.metrics[i] = Some(m.clone());
        Some(m)
    }

    /// Emits one line of guest output to the proxy's log, as Envoy does with a filter's stdout and stderr.
    pub fn log_line(&self, level: i32, message: &str) {
        let plugin = &self.plugin.name;
        match level {
            0 => tracing::trace!(target: "wasm", "wasm log {plugin}: {message}"),
            1 => tracing::debug!(target: "wasm", "wasm log {plugin}: {message}"),
            2 => tracing::info!(target: "wasm", "wasm log {plugin}: {message}"),
            3 => tracing::warn!(target: "wasm", "wasm log {plugin}: {message}"),
            _ => tracing::error!(target: "wasm", "wasm log {plugin}: {message}"),
        }
    }
}
