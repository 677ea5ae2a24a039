//! The singleton service: ticks every poll period, fetches the table, posts the report, and updates the metrics.

use std::time::Duration;

use super::abi::{self, BufferType, HeaderMap, LogLevel};
use super::host::{self, HostStore};
use super::metrics::{Metrics, endpoint_metric};
use crate::config::Config;
use crate::poller::{Answer, Poller};

pub struct PollerRoot {
    poller: Option<Poller>,
    /// The outstanding table fetch and when it left (a call the host never answers is forgotten after 2 timeouts).
    fetch: Option<(u32, u64)>,
    report: Option<u32>,
    metrics: Metrics,
    last_report_failed: bool,
}

impl PollerRoot {
    pub fn new() -> Self {
        PollerRoot { poller: None, fetch: None, report: None, metrics: Metrics::default(), last_report_failed: false }
    }

    fn dispatch(poller: &Poller, headers: &[(String, String)], body: Option<&[u8]>) -> Option<u32> {
        let sup = poller.supervisor();
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let cluster = poller.cluster();
        match abi::http_call(cluster, &headers, body.unwrap_or_default(), Duration::from_millis(sup.timeout.0)) {
            Ok(token) => Some(token),
            Err(status) => {
                host::log(LogLevel::Warn, &format!("cannot call cluster `{cluster}`: {status:?}"));
                None
            }
        }
    }

    fn report_and_measure(&mut self) {
        let Some(poller) = self.poller.as_mut() else {
            return;
        };
        let now = host::now_ms();
        let (report, stats, global) = poller.collect(&HostStore, now);
        for line in poller.take_logs() {
            host::log(LogLevel::Info, &line);
        }
        let m = &mut self.metrics;
        for s in &stats {
            m.add(&endpoint_metric(&s.id, "requests_total"), s.aggregate.requests);
            m.add(&endpoint_metric(&s.id, "errors_total"), s.aggregate.errors.min(s.aggregate.requests));
            m.set(&endpoint_metric(&s.id, "in_flight"), s.in_flight.max(0) as u64);
            m.set(&endpoint_metric(&s.id, "ejected"), u64::from(s.ejected));
            if !s.aggregate.is_empty() {
                m.set(
                    &endpoint_metric(&s.id, "latency_p95_microseconds"),
                    (s.aggregate.quantile_ms(0.95) * 1000.0) as u64,
                );
            }
        }
        m.add("equilibrio_requests_total", stats.iter().map(|s| s.aggregate.requests).sum());
        m.add("equilibrio_rate_limited_total", global.rate_limited);
        m.add("equilibrio_rate_limit_evictions_total", global.rate_limit_evictions);
        m.add("equilibrio_rate_limit_contended_total", global.rate_limit_contended);
        m.add("equilibrio_sticky_hits_total", global.sticky_hits);
        m.add("equilibrio_sticky_invalid_total", global.sticky_invalid);
        m.add("equilibrio_ejections_total", global.ejections);
        m.add("equilibrio_no_upstream_total", global.no_upstream);
        m.add("equilibrio_overflowed_total", global.overflowed);
        m.add("equilibrio_overloaded_total", global.overloaded);
        m.set("equilibrio_table_version", poller.version().unwrap_or(0));
        m.set("equilibrio_table_age_seconds", poller.age_s(now).unwrap_or(0));
        m.set("equilibrio_endpoints_healthy", poller.healthy() as u64);

        if poller.supervisor().reports
            && poller.table().is_some()
            && self.report.is_none()
            && let Ok(body) = serde_json::to_vec(&report)
        {
            let headers = poller.report_request(body.len());
            self.report = Self::dispatch(poller, &headers, Some(&body));
        }
    }
}

impl PollerRoot {
    pub fn on_http_call_response(&mut self, token: u32, headers: usize, body_size: usize) {
        let status: Option<u32> =
            host::header(HeaderMap::CallResponse, ":status").and_then(|s| s.parse().ok()).filter(|_| headers > 0);
        if self.report == Some(token) {
            self.report = None;
            let failed = !matches!(status, Some(200..=299));
            self.metrics.add("equilibrio_reports_failed_total", u64::from(failed));
            if failed != self.last_report_failed {
                self.last_report_failed = failed;
                let line = if failed {
                    format!("report refused or lost (status {status:?})")
                } else {
                    "reports accepted again".into()
                };
                host::log(LogLevel::Warn, &line);
            }
            return;
        }
        if self.fetch.map(|(t, _)| t) != Some(token) {
            return;
        }
        self.fetch = None;
        let Some(poller) = self.poller.as_mut() else {
            return;
        };
        let limit = poller.supervisor().max_table_bytes as usize;
        let etag = host::header(HeaderMap::CallResponse, "etag");
        // never copy an oversized body into the VM: hand over its size only
        let body = if body_size > limit {
            Vec::new()
        } else {
            abi::buffer(BufferType::HttpCallResponseBody, body_size).unwrap_or_default()
        };
        let now = host::now_ms();
        let outcome = match status {
            _ if body_size > limit => poller.on_oversized(body_size),
            None => poller.on_answer(Answer::Failed, now, &HostStore),
            Some(status) => {
                poller.on_answer(Answer::Response { status, etag: etag.as_deref(), body: &body }, now, &HostStore)
            }
        };
        if let Some(line) = &outcome.log {
            let level = if outcome.error.is_some() { LogLevel::Warn } else { LogLevel::Info };
            host::log(level, line);
        }
        match outcome.error {
            Some(condition) => {
                self.metrics.add("equilibrio_table_errors_total", 1);
                self.metrics.add(&format!("equilibrio_table_errors_{condition}_total"), 1);
            }
            None => self.metrics.add("equilibrio_table_errors_total", 0),
        }
        self.metrics.add("equilibrio_table_updates_total", u64::from(outcome.published));
    }

    pub fn on_configure(&mut self, bytes: &[u8]) -> bool {
        match Config::parse(bytes) {
            Ok(parsed) => {
                self.poller = Poller::new(parsed);
                match &self.poller {
                    Some(p) => {
                        abi::set_tick_period(Duration::from_millis(p.supervisor().poll_period.0));
                        host::log(
                            LogLevel::Info,
                            &format!("polling the `{}` table every {} ms", p.service(), p.supervisor().poll_period.0),
                        );
                    }
                    None => host::log(LogLevel::Info, "no supervisor configured: static endpoints only"),
                }
                true
            }
            Err(e) => {
                host::log(LogLevel::Error, &format!("invalid configuration: {e}"));
                false
            }
        }
    }

    pub fn on_tick(&mut self) {
        let now = host::now_ms();
        if let Some(poller) = &mut self.poller {
            let give_up = poller.supervisor().timeout.0.saturating_mul(2);
            if self.fetch.is_some_and(|(_, at)| now.saturating_sub(at) > give_up) {
                // a call the proxy never answered: that node is as good as down
                self.fetch = None;
                poller.next_cluster();
            }
            if self.fetch.is_none() {
                self.fetch = Self::dispatch(poller, &poller.table_request(), None).map(|t| (t, now));
                if self.fetch.is_none() {
                    // the proxy refused the call itself (no such cluster): the next node's cluster next time
                    poller.next_cluster();
                }
            }
        }
        self.report_and_measure();
    }
}
