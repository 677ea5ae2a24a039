//! The table poller: one per proxy process (Envoy's singleton `envoy.bootstrap.wasm` service), it fetches the endpoint
//! table from the supervisor every poll period, publishes good tables to every worker through shared data, and reports
//! the workers' aggregates back.
//!
//! A non-200 answer, no answer, or a malformed, oversized, foreign or stale table keeps the last good table; each is
//! counted under its condition, and logged once when the condition changes (not once per poll). An invalid runtime
//! policy does not block endpoint updates: the table is published with the last good policy. `ETag`/`If-None-Match`
//! make an unchanged table a 304 with no body.
//!
//! The poller also sees every worker's counts, so it runs the interval detectors (success rate, failure percentage:
//! [`crate::detection`]) and ejects their outliers for every worker.

use serde_json::Value;

use crate::config::{Config, ParsedConfig, Policy, SupervisorConfig};
use crate::detection::Interval;
use crate::outlier::Ejections;
use crate::report::{Aggregate, EndpointReport, GlobalStats, Report};
use crate::shared::{self, SharedStore, keys};
use crate::table::{EndpointState, Table};

/// The answer to a table fetch, as the proxy hands it over.
#[derive(Debug, Clone, Copy)]
pub enum Answer<'a> {
    Response {
        status: u32,
        etag: Option<&'a str>,
        body: &'a [u8],
    },
    /// No answer: connect failure, timeout, reset.
    Failed,
}

/// What the adapter must do after an answer.
#[derive(Debug, Default, PartialEq)]
pub struct PollOutcome {
    /// A log line (only when the condition changed).
    pub log: Option<String>,
    /// The condition to count as an error (`unreachable`, `http_status`, `malformed`, `oversized`, `stale`,
    /// `wrong_service`, `policy_invalid`).
    pub error: Option<&'static str>,
    /// A new table was published.
    pub published: bool,
}

/// One endpoint's deltas for the metrics, from one report period.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointStats {
    pub id: String,
    pub aggregate: Aggregate,
    pub in_flight: i64,
    pub ejected: bool,
}

pub struct Poller {
    base: ParsedConfig,
    sup: SupervisorConfig,
    version: Option<u64>,
    etag: Option<String>,
    condition: &'static str,
    policy_condition: &'static str,
    last_good_ms: Option<u64>,
    last_good_policy: Option<Value>,
    seq: u64,
    table: Option<Table>,
    last_report_ms: Option<u64>,
    /// The supervisor clusters, and the one asked now.
    targets: Vec<String>,
    current: usize,
    /// The effective policy of the published table (the detectors' settings).
    policy: Policy,
    /// The detectors' counts of the current interval.
    interval: Interval,
    /// What happened that the adapter logs (taken by [`Poller::take_logs`]).
    logs: Vec<String>,
}

impl Poller {
    /// `None` when the configuration has no supervisor (static endpoints only).
    pub fn new(base: ParsedConfig) -> Option<Poller> {
        let sup = base.config.supervisor.clone()?;
        let targets = sup.targets();
        let policy = base.config.policy.clone();
        Some(Poller {
            targets,
            current: 0,
            base,
            sup,
            version: None,
            etag: None,
            condition: "ok",
            policy_condition: "ok",
            last_good_ms: None,
            last_good_policy: None,
            seq: 0,
            table: None,
            last_report_ms: None,
            policy,
            interval: Interval::default(),
            logs: Vec::new(),
        })
    }

    /// Log lines since the last call.
    pub fn take_logs(&mut self) -> Vec<String> {
        std::mem::take(&mut self.logs)
    }

    pub fn supervisor(&self) -> &SupervisorConfig {
        &self.sup
    }

    /// The supervisor cluster to call now.
    pub fn cluster(&self) -> &str {
        self.targets.get(self.current).map_or(self.sup.cluster.as_str(), String::as_str)
    }

    /// After a failed call: the next supervisor cluster is asked from now on. Returns it when there is another.
    pub fn next_cluster(&mut self) -> Option<&str> {
        if self.targets.len() < 2 {
            return None;
        }
        self.current = (self.current + 1) % self.targets.len();
        Some(self.cluster())
    }

    pub fn service(&self) -> &str {
        &self.base.config.service
    }

    pub fn version(&self) -> Option<u64> {
        self.version
    }

    pub fn table(&self) -> Option<&Table> {
        self.table.as_ref()
    }

    /// Seconds since the last good answer (200 or 304); `None` before the first.
    pub fn age_s(&self, now_ms: u64) -> Option<u64> {
        self.last_good_ms.map(|t| now_ms.saturating_sub(t) / 1000)
    }

    /// Headers of the table fetch (pseudo-headers included).
    pub fn table_request(&self) -> Vec<(String, String)> {
        let mut h = vec![
            (":method".to_string(), "GET".to_string()),
            (":path".to_string(), format!("/v1/services/{}/endpoints", self.base.config.service)),
            (":authority".to_string(), self.sup.authority.clone()),
            ("accept".to_string(), "application/json".to_string()),
        ];
        if let Some(token) = &self.sup.token {
            h.push(("authorization".to_string(), format!("Bearer {token}")));
        }
        if let Some(etag) = &self.etag {
            h.push(("if-none-match".to_string(), etag.clone()));
        }
        h
    }

    /// Headers of the report POST.
    pub fn report_request(&self, body_len: usize) -> Vec<(String, String)> {
        let mut h = vec![
            (":method".to_string(), "POST".to_string()),
            (":path".to_string(), "/v1/reports".to_string()),
            (":authority".to_string(), self.sup.authority.clone()),
            ("content-type".to_string(), "application/json".to_string()),
            ("content-length".to_string(), body_len.to_string()),
        ];
        if let Some(token) = &self.sup.token {
            h.push(("authorization".to_string(), format!("Bearer {token}")));
        }
        h
    }

    fn condition_changed(&mut self, condition: &'static str, message: String) -> Option<String> {
        if self.condition == condition {
            return None;
        }
        self.condition = condition;
        Some(message)
    }

    /// Moves to the next supervisor cluster, if there is one, and says so in `message`.
    fn switch(&mut self, message: String) -> String {
        match self.next_cluster() {
            Some(next) => format!("{message}; asking cluster `{next}` next"),
            None => message,
        }
    }

    fn fail(&mut self, condition: &'static str, message: String) -> PollOutcome {
        let kept = self.version.map_or("no table yet".to_string(), |v| format!("keeping table version {v}"));
        let log = self.condition_changed(condition, format!("endpoint table refused ({condition}): {message}; {kept}"));
        PollOutcome { log, error: Some(condition), published: false }
    }

    /// An answer whose body is over the size limit (the adapter does not even copy it).
    pub fn on_oversized(&mut self, bytes: usize) -> PollOutcome {
        let e = crate::table::TableError::Oversized { bytes, limit: self.sup.max_table_bytes };
        self.fail(e.condition(), e.to_string())
    }

    /// Handles an answer to the table fetch, publishing a good table into `store`.
    pub fn on_answer<S: SharedStore + ?Sized>(&mut self, answer: Answer<'_>, now_ms: u64, store: &S) -> PollOutcome {
        let (status, etag, body) = match answer {
            Answer::Failed => {
                let message = self.switch(format!("no answer from cluster `{}`", self.cluster()));
                return self.fail("unreachable", message);
            }
            Answer::Response { status, etag, body } => (status, etag, body),
        };
        if status == 304 && self.version.is_some() {
            self.last_good_ms = Some(now_ms);
            let log = self.condition_changed("ok", "endpoint table fetch recovered (not modified)".into());
            return PollOutcome { log, error: None, published: false };
        }
        if status != 200 {
            let message = format!("HTTP {status} from cluster `{}`", self.cluster());
            // a node that is down or failing: the next one may answer (a 4xx is the same on every node)
            let message = if status >= 500 { self.switch(message) } else { message };
            return self.fail("http_status", message);
        }
        let mut table = match Table::parse(body, &self.base.config.service, self.version, self.sup.max_table_bytes) {
            Ok(t) => t,
            Err(e) => return self.fail(e.condition(), e.to_string()),
        };
        let mut outcome = PollOutcome::default();
        // an invalid runtime policy must not block endpoint updates: publish with the last good policy
        if let Some(policy) = table.policy.take().filter(|p| !p.is_null()) {
            match Config::with_policy(&self.base.source, &policy) {
                Ok(config) => {
                    self.policy = config.policy;
                    if self.policy_condition != "ok" {
                        outcome.log = Some("runtime policy accepted again".into());
                    }
                    self.policy_condition = "ok";
                    self.last_good_policy = Some(policy);
                }
                Err(e) => {
                    outcome.error = Some("policy_invalid");
                    if self.policy_condition != "policy_invalid" {
                        outcome.log = Some(format!("runtime policy refused, keeping the last good one: {e}"));
                    }
                    self.policy_condition = "policy_invalid";
                }
            }
        }
        table.policy = self.last_good_policy.clone();
        self.last_good_ms = Some(now_ms);
        self.etag = etag.map(str::to_string);
        if let Some(log) = self.condition_changed("ok", format!("endpoint table version {} accepted", table.version)) {
            outcome.log.get_or_insert(log);
        }
        if self.table.as_ref() != Some(&table) {
            if let Ok(bytes) = serde_json::to_vec(&table) {
                self.seq += 1;
                // the counters first, then the table, then its sequence: a worker that sees the new sequence finds
                // the new table, and the keys to count its endpoints on
                let ids = table.endpoints.iter().map(|e| e.id.as_str());
                let written = crate::counters::create(store, ids)
                    && store.set(keys::TABLE, &bytes, None).is_ok()
                    && store.set(keys::TABLE_SEQ, &(self.seq as i64).to_le_bytes(), None).is_ok();
                outcome.published = written;
            }
            self.version = Some(table.version);
            self.table = Some(table);
        }
        outcome
    }

    /// Takes (and resets) the workers' shared aggregates for the current table's endpoints; returns the report to
    /// POST, the per-endpoint deltas and the global counters for the metrics.
    pub fn collect<S: SharedStore + ?Sized>(
        &mut self,
        store: &S,
        now_ms: u64,
    ) -> (Report, Vec<EndpointStats>, GlobalStats) {
        let window_ms = self.last_report_ms.map_or(self.sup.poll_period.0, |t| now_ms.saturating_sub(t));
        self.last_report_ms = Some(now_ms);
        let ejections = store.get(keys::EJECTIONS).map(|(b, _)| Ejections::decode(&b)).unwrap_or_default();
        let mut stats = Vec::new();
        for e in self.table.iter().flat_map(|t| t.endpoints.iter()) {
            let aggregate =
                shared::update(store, &keys::aggregate(&e.id), |cur| match cur.and_then(Aggregate::decode) {
                    Some(a) if !a.is_empty() => (Some(Aggregate::default().encode()), a),
                    _ => (None, Aggregate::default()),
                })
                .unwrap_or_default();
            stats.push(EndpointStats {
                id: e.id.clone(),
                aggregate,
                in_flight: shared::get_i64(store, &keys::inflight(&e.id)).max(0),
                ejected: ejections.is_ejected(&e.id, now_ms),
            });
        }
        let mut global = shared::update(store, keys::GLOBAL_STATS, |cur| match cur.map(GlobalStats::decode) {
            Some(g) if !g.is_empty() => (Some(GlobalStats::default().encode()), g),
            _ => (None, GlobalStats::default()),
        })
        .unwrap_or_default();
        global.ejections += self.detect(&stats, store, now_ms);
        let report = Report {
            zone: self.base.config.zone.clone(),
            service: self.base.config.service.clone(),
            proxy: self.sup.proxy_id.clone(),
            table_version: self.version.unwrap_or(0),
            window_ms,
            rate_limited: global.rate_limited,
            endpoints: stats
                .iter()
                .map(|s| EndpointReport {
                    id: s.id.clone(),
                    requests: s.aggregate.requests,
                    // sampled errors are an estimate: never more than the requests
                    errors: s.aggregate.errors.min(s.aggregate.requests),
                    latency_sum_ms: s.aggregate.latency_sum_us as f64 / 1000.0,
                    latency_p95_ms: s.aggregate.quantile_ms(0.95),
                    in_flight: s.in_flight,
                    ejected: s.ejected,
                })
                .collect(),
        };
        (report, stats, global)
    }

    /// Healthy endpoints in the current table (a gauge).
    /// Adds this period's counts to the detectors' interval; at its end, ejects the outliers. Returns the ejections.
    fn detect<S: SharedStore + ?Sized>(&mut self, stats: &[EndpointStats], store: &S, now_ms: u64) -> u64 {
        let cfg = &self.policy.passive_health;
        if !cfg.enabled || !(cfg.success_rate.enabled || cfg.failure_percentage.enabled) {
            return 0;
        }
        for s in stats {
            self.interval.add(&s.id, s.aggregate.requests, s.aggregate.errors, now_ms);
        }
        let Some(found) = self.interval.close(stats.iter().map(|s| s.id.as_str()), cfg, now_ms) else { return 0 };
        let total = stats.len();
        let mut ejected = 0;
        for (id, reason) in found {
            let done = shared::update_present(store, keys::EJECTIONS, |cur| {
                let mut ej = Ejections::decode(cur);
                match ej.eject(&id, total, cfg, now_ms) {
                    Some(d) => (Some(ej.encode()), Some(d)),
                    None => (None, None),
                }
            });
            if let Ok(Some(duration)) = done {
                ejected += 1;
                self.logs.push(format!("ejected endpoint {id} for {duration} ms: {reason}"));
            }
        }
        ejected
    }

    pub fn healthy(&self) -> usize {
        self.table.iter().flat_map(|t| t.endpoints.iter()).filter(|e| e.state == EndpointState::Healthy).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared::MemoryStore;

    fn poller() -> Poller {
        let cfg = Config::parse(br#"{"service":"av","supervisor":{"token":"t0k"}}"#).unwrap();
        Poller::new(cfg).unwrap()
    }

    fn table(version: u64) -> String {
        format!(
            r#"{{"service":"av","version":{version},"endpoints":[{{"id":"a","address":"127.0.0.1:1","weight":1,"state":"healthy"}}]}}"#
        )
    }

    fn ok(p: &mut Poller, s: &MemoryStore, body: &str, now: u64) -> PollOutcome {
        p.on_answer(Answer::Response { status: 200, etag: Some("\"e1\""), body: body.as_bytes() }, now, s)
    }

    #[test]
    fn publishes_good_tables_and_bumps_the_sequence() {
        let (mut p, s) = (poller(), MemoryStore::new());
        let o = ok(&mut p, &s, &table(1), 0);
        assert!(o.published);
        assert_eq!(shared::get_i64(&s, keys::TABLE_SEQ), 1);
        for key in [keys::inflight("a"), keys::aggregate("a"), keys::GLOBAL_STATS.into(), keys::EJECTIONS.into()] {
            assert!(s.get(&key).is_some(), "{key} exists before any worker counts on it");
        }
        // the same table again publishes nothing
        assert!(!ok(&mut p, &s, &table(1), 10).published);
        assert!(ok(&mut p, &s, &table(2), 20).published);
        assert_eq!(shared::get_i64(&s, keys::TABLE_SEQ), 2);
        let h = p.table_request();
        assert!(h.contains(&("if-none-match".into(), "\"e1\"".into())));
        assert!(h.contains(&("authorization".into(), "Bearer t0k".into())));
    }

    #[test]
    fn bad_answers_keep_the_last_good_table_and_log_once_per_condition() {
        let (mut p, s) = (poller(), MemoryStore::new());
        ok(&mut p, &s, &table(5), 0);
        let before = s.get(keys::TABLE).unwrap();
        let o1 = p.on_answer(Answer::Response { status: 200, etag: None, body: b"{garbage" }, 1000, &s);
        let o2 = p.on_answer(Answer::Response { status: 200, etag: None, body: b"{garbage" }, 2000, &s);
        assert_eq!(o1.error, Some("malformed"));
        assert!(o1.log.is_some());
        assert_eq!(o2.error, Some("malformed"));
        assert!(o2.log.is_none(), "same condition: no new log line");
        let o3 = p.on_answer(Answer::Response { status: 503, etag: None, body: b"" }, 3000, &s);
        assert_eq!(o3.error, Some("http_status"));
        assert!(o3.log.is_some());
        assert_eq!(p.on_answer(Answer::Failed, 4000, &s).error, Some("unreachable"));
        assert_eq!(ok(&mut p, &s, &table(4), 5000).error, Some("stale"));
        let big = format!("{}{}", table(9), " ".repeat(2 << 20));
        assert_eq!(ok(&mut p, &s, &big, 6000).error, Some("oversized"));
        assert_eq!(s.get(keys::TABLE).unwrap().0, before.0, "the last good table stays published");
        assert_eq!(p.age_s(7000), Some(7));
        let back = ok(&mut p, &s, &table(6), 8000);
        assert!(back.published && back.log.is_some());
    }

    #[test]
    fn a_failing_node_moves_the_poller_to_the_next_one() {
        let config = r#"{"service":"av","supervisor":{"clusters":["sup-1","sup-2","sup-3"]}}"#;
        let mut p = Poller::new(Config::parse(config.as_bytes()).unwrap()).unwrap();
        let s = MemoryStore::new();
        assert_eq!(p.cluster(), "sup-1");
        let o = p.on_answer(Answer::Failed, 1000, &s);
        assert!(o.log.unwrap().contains("asking cluster `sup-2` next"));
        assert_eq!(p.cluster(), "sup-2");
        p.on_answer(Answer::Response { status: 503, etag: None, body: b"" }, 2000, &s);
        assert_eq!(p.cluster(), "sup-3");
        p.on_answer(Answer::Response { status: 401, etag: None, body: b"" }, 3000, &s);
        assert_eq!(p.cluster(), "sup-3", "a 4xx is every node's answer: no move");
        ok(&mut p, &s, &table(5), 4000);
        assert_eq!(p.cluster(), "sup-3", "it stays with a node that answers");
        p.on_answer(Answer::Failed, 5000, &s);
        assert_eq!(p.cluster(), "sup-1", "round and round");
        let one = Poller::new(Config::parse(br#"{"service":"av","supervisor":{"cluster":"only"}}"#).unwrap());
        let mut one = one.unwrap();
        one.on_answer(Answer::Failed, 1000, &s);
        assert_eq!(one.cluster(), "only");
    }

    #[test]
    fn not_modified_refreshes_the_age() {
        let (mut p, s) = (poller(), MemoryStore::new());
        ok(&mut p, &s, &table(1), 0);
        let o = p.on_answer(Answer::Response { status: 304, etag: None, body: b"" }, 5000, &s);
        assert_eq!(o.error, None);
        assert_eq!(p.age_s(5000), Some(0));
    }

    #[test]
    fn an_invalid_policy_keeps_the_last_good_policy_but_applies_endpoints() {
        let (mut p, s) = (poller(), MemoryStore::new());
        let with_policy = |v: u64, policy: &str| {
            format!(
                r#"{{"service":"av","version":{v},"endpoints":[{{"id":"a","address":"127.0.0.1:{v}","state":"healthy"}}],"policy":{policy}}}"#
            )
        };
        ok(&mut p, &s, &with_policy(1, r#"{"algorithm":"random"}"#), 0);
        let o = ok(&mut p, &s, &with_policy(2, r#"{"algorithm":"fastest"}"#), 1);
        assert_eq!(o.error, Some("policy_invalid"));
        assert!(o.published);
        let t: Table = serde_json::from_slice(&s.get(keys::TABLE).unwrap().0).unwrap();
        assert_eq!(t.endpoints[0].address, "127.0.0.1:2");
        assert_eq!(t.policy.unwrap()["algorithm"], "random");
    }

    #[test]
    fn collect_takes_and_resets_aggregates() {
        let (mut p, s) = (poller(), MemoryStore::new());
        ok(&mut p, &s, &table(1), 0);
        let mut a = Aggregate::default();
        a.record(2_000, false, 1);
        a.record(3_000, true, 1);
        s.set(&keys::aggregate("a"), &a.encode(), None).unwrap();
        shared::add_i64(&s, &keys::inflight("a"), 3).unwrap();
        let (report, stats, _) = p.collect(&s, 1000);
        assert_eq!(report.endpoints[0].requests, 2);
        assert_eq!(report.endpoints[0].errors, 1);
        assert_eq!(report.endpoints[0].in_flight, 3);
        assert_eq!(stats[0].aggregate, a);
        let (again, _, _) = p.collect(&s, 2000);
        assert_eq!(again.endpoints[0].requests, 0);
        assert_eq!(again.window_ms, 1000);
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["service"], "av");
    }

    #[test]
    fn an_endpoint_failing_half_its_requests_over_an_interval_is_ejected_for_every_worker() {
        let (mut p, s) = (poller(), MemoryStore::new());
        let ids = ["a", "b", "c", "d", "e", "x"];
        let eps: Vec<String> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| format!(r#"{{"id":"{id}","address":"127.0.0.1:{}","state":"healthy"}}"#, 1 + i))
            .collect();
        let body = format!(
            r#"{{"service":"av","version":1,"endpoints":[{}],"policy":{{"passive_health":{{"interval":"2s"}}}}}}"#,
            eps.join(",")
        );
        ok(&mut p, &s, &body, 0);
        // two report periods of one second each: 100 requests per endpoint per period, x fails every other one
        for now in [1000, 2000, 3000] {
            for id in ids {
                let mut a = Aggregate::default();
                for k in 0..100 {
                    a.record(1_000, id == "x" && k % 2 == 0, 1);
                }
                s.set(&keys::aggregate(id), &a.encode(), None).unwrap();
            }
            let (_, _, global) = p.collect(&s, now);
            let ejected = s.get(keys::EJECTIONS).map(|(v, _)| Ejections::decode(&v)).unwrap_or_default();
            if now < 3000 {
                assert_eq!(global.ejections, 0, "the interval (2 s) is not over at {now}");
                assert!(!ejected.is_ejected("x", now));
            } else {
                assert_eq!(global.ejections, 1);
                assert!(ejected.is_ejected("x", now) && ids[..5].iter().all(|id| !ejected.is_ejected(id, now)));
                let logs = p.take_logs();
                assert!(
                    logs.iter().any(|l| l.starts_with("ejected endpoint x") && l.contains("success rate 50.0%")),
                    "{logs:?}"
                );
            }
        }
    }
}
