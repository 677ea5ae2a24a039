//! The HTTP filter on a worker: a root holding the worker engine, and the state of each request from its headers to
//! its end.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use super::abi::{self, HeaderMap, LogLevel};
use super::host::{self, HostRequest, HostStore};
use crate::UPSTREAM_HEADER;
use crate::config::Config;
use crate::worker::{Pending, ResponseInfo, Verdict, Worker};

/// Envoy's legacy response-flag bits for "no answer from the upstream": remote reset, connection failure,
/// connection termination.
const GATEWAY_FAILURE_FLAGS: u64 = 0x10 | 0x20 | 0x40;

/// What a request callback tells the host: go on, or stop (the filter answered itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Continue = 0,
    Pause = 1,
}

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

    pub fn on_configure(&mut self, bytes: &[u8]) -> bool {
        match Config::parse(bytes) {
            Ok(parsed) => {
                let seed = host::now_ms() ^ (u64::from(self.context_id) << 32);
                abi::set_tick_period(tick_period(&parsed.config));
                // before this worker serves: the counters of the endpoints it starts with (the poller creates those
                // of the tables it publishes)
                crate::counters::create(&HostStore, parsed.config.endpoints.iter().map(|e| e.id.as_str()));
                self.worker = Some(Rc::new(RefCell::new(Worker::new(parsed, seed))));
                true
            }
            Err(e) => {
                host::log(LogLevel::Error, &format!("invalid configuration: {e}"));
                false
            }
        }
    }

    pub fn on_tick(&mut self) {
        if let Some(worker) = &self.worker
            && let Ok(mut w) = worker.try_borrow_mut()
        {
            w.observe_time(host::now_ms());
            w.refresh(&HostStore);
            w.flush(&HostStore);
            Self::log_pending(&mut w);
        }
    }

    /// The state of a new request, if this root is configured.
    pub fn new_stream(&self) -> Option<Stream> {
        Some(Stream { worker: self.worker.clone()?, pending: None })
    }
}

/// One request.
pub struct Stream {
    worker: Rc<RefCell<Worker>>,
    pending: Option<Pending>,
}

impl Stream {
    pub fn on_request_headers(&mut self) -> Action {
        let Ok(mut worker) = self.worker.try_borrow_mut() else {
            abi::set_header(HeaderMap::Request, UPSTREAM_HEADER, None);
            return Action::Continue;
        };
        let verdict = worker.on_request_at(&HostRequest, &host::now_ms, &HostStore);
        FilterRoot::log_pending(&mut worker);
        match verdict {
            Verdict::Forward(pending) => {
                // replaces (or removes) whatever a client sent: a client's value is never trusted
                let value = Some(pending.upstreams.as_str()).filter(|v| !v.is_empty());
                abi::set_header(HeaderMap::Request, UPSTREAM_HEADER, value);
                self.pending = Some(pending);
                Action::Continue
            }
            Verdict::Reply(reply) => {
                let headers: Vec<(&str, &str)> = reply.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                abi::send_local_response(reply.status, &headers, reply.body.as_bytes());
                Action::Pause
            }
        }
    }

    pub fn on_response_headers(&mut self) -> Action {
        let Some(pending) = self.pending.as_mut() else { return Action::Continue };
        let Ok(mut worker) = self.worker.try_borrow_mut() else { return Action::Continue };
        // only sticky sessions need the response headers (to add a cookie); the rest waits for the end of the request
        if pending.needs_response_headers() {
            if let Some(cookie) = record_response(&mut worker, pending) {
                abi::add_header(HeaderMap::Response, "set-cookie", &cookie);
            }
            FilterRoot::log_pending(&mut worker);
        }
        Action::Continue
    }

    /// The request is over (answered, failed or abandoned).
    pub fn on_log(mut self) {
        if let Some(mut pending) = self.pending.take()
            && let Ok(mut worker) = self.worker.try_borrow_mut()
        {
            // a request left out by sampling costs no host call at its end; an observed one is measured to its
            // response, read here if the response headers did not read it already
            if pending.observed() && !pending.responded {
                record_response(&mut worker, &mut pending);
            }
            worker.on_done(&mut pending, 0, &HostStore);
            FilterRoot::log_pending(&mut worker);
        }
    }
}

/// Reads what the proxy knows about the response and hands it to the worker.
fn record_response(worker: &mut Worker, pending: &mut Pending) -> Option<String> {
    let status = host::header(HeaderMap::Response, ":status").and_then(|s| s.parse().ok()).unwrap_or(0);
    let upstream = host::property_string(&["upstream", "address"]);
    // the flags only matter for a failure (a 5xx, or no status at all)
    let failed = status == 0 || status >= 500;
    let flags = if failed { host::property_u64(&["response", "flags"]).unwrap_or(0) } else { 0 };
    let info = ResponseInfo {
        status,
        upstream_address: upstream.as_deref(),
        gateway_failure: flags & GATEWAY_FAILURE_FLAGS != 0,
    };
    // the clock only for an observed request (its latency)
    let now = if pending.observed() { host::now_ms() } else { pending.started_ms() };
    worker.on_response(pending, info, now, &HostStore)
}
