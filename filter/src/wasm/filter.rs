//! The HTTP filter on a worker: a root context holding the worker engine, and one HTTP context per request.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType};

use super::host::{self, HostRequest, HostStore};
use crate::UPSTREAM_HEADER;
use crate::config::Config;
use crate::worker::{Pending, ResponseInfo, Verdict, Worker};

/// Envoy's legacy response-flag bits for "no answer from the upstream": remote reset, connection failure,
/// connection termination.
const GATEWAY_FAILURE_FLAGS: u64 = 0x10 | 0x20 | 0x40;

/// How often a worker picks up a new table and merges its counts into the shared aggregates: a quarter of the poll
/// period (so a table change applies well within two poll periods), between 100 ms and 500 ms.
fn tick_period(config: &Config) -> Duration {
    let poll = config.supervisor.as_ref().map_or(2000, |s| s.poll_period.0);
    Duration::from_millis((poll / 4).clamp(100, 500))
}

pub struct FilterRoot {
    context_id: u32,
    worker: Option<Rc<RefCell<Worker>>>,
}

impl FilterRoot {
    pub fn new(context_id: u32) -> Self {
        FilterRoot { context_id, worker: None }
    }

    fn log_pending(worker: &mut Worker) {
        for line in worker.take_logs() {
            host::log(LogLevel::Info, &line);
        }
    }
}

impl Context for FilterRoot {}

impl RootContext for FilterRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes =
            hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX).ok().flatten().unwrap_or_default();
        match Config::parse(&bytes) {
            Ok(parsed) => {
                let seed = host::now_ms() ^ (u64::from(self.context_id) << 32);
                let _ = hostcalls::set_tick_period(tick_period(&parsed.config));
                self.worker = Some(Rc::new(RefCell::new(Worker::new(parsed, seed))));
                true
            }
            Err(e) => {
                host::log(LogLevel::Error, &e.to_string());
                false
            }
        }
    }

    fn on_tick(&mut self) {
        if let Some(worker) = &self.worker
            && let Ok(mut w) = worker.try_borrow_mut()
        {
            w.refresh(&HostStore);
            w.flush(&HostStore);
            Self::log_pending(&mut w);
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let worker = self.worker.clone()?;
        Some(Box::new(Filter { worker, pending: None }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Filter {
    worker: Rc<RefCell<Worker>>,
    pending: Option<Pending>,
}

impl Context for Filter {}

impl HttpContext for Filter {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let Ok(mut worker) = self.worker.try_borrow_mut() else {
            let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, UPSTREAM_HEADER, None);
            return Action::Continue;
        };
        let verdict = worker.on_request(&HostRequest, host::now_ms(), &HostStore);
        FilterRoot::log_pending(&mut worker);
        match verdict {
            Verdict::Forward(pending) => {
                // replaces (or removes) whatever a client sent: a client's value is never trusted
                let value = Some(pending.upstreams.as_str()).filter(|v| !v.is_empty());
                let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, UPSTREAM_HEADER, value);
                self.pending = Some(pending);
                Action::Continue
            }
            Verdict::Reply(reply) => {
                let headers: Vec<(&str, &str)> = reply.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                let _ = hostcalls::send_http_response(reply.status, headers, Some(reply.body.as_bytes()));
                Action::Pause
            }
        }
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let Some(pending) = self.pending.as_mut() else { return Action::Continue };
        let Ok(mut worker) = self.worker.try_borrow_mut() else { return Action::Continue };
        // only sticky sessions need the response headers (to add a cookie); the rest waits for the end of the request
        if worker.needs_response_headers() {
            if let Some(cookie) = record_response(&mut worker, pending) {
                let _ = hostcalls::add_map_value(MapType::HttpResponseHeaders, "set-cookie", &cookie);
            }
            FilterRoot::log_pending(&mut worker);
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        if let Some(mut pending) = self.pending.take()
            && let Ok(mut worker) = self.worker.try_borrow_mut()
        {
            if !pending.responded {
                record_response(&mut worker, &mut pending);
            }
            worker.on_done(&mut pending, host::now_ms(), &HostStore);
            FilterRoot::log_pending(&mut worker);
        }
    }
}

/// Reads what the proxy knows about the response and hands it to the worker.
fn record_response(worker: &mut Worker, pending: &mut Pending) -> Option<String> {
    let status = host::header(MapType::HttpResponseHeaders, ":status").and_then(|s| s.parse().ok()).unwrap_or(0);
    let upstream = host::property_string(&["upstream", "address"]);
    // the flags only matter for a failure (a 5xx, or no status at all)
    let failed = status == 0 || status >= 500;
    let flags = if failed { host::property_u64(&["response", "flags"]).unwrap_or(0) } else { 0 };
    let info = ResponseInfo {
        status,
        upstream_address: upstream.as_deref(),
        gateway_failure: flags & GATEWAY_FAILURE_FLAGS != 0,
    };
    worker.on_response(pending, info, host::now_ms(), &HostStore)
}
