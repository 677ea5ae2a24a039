//! The request path end to end, natively: a worker (or two) over a shared [`MemoryStore`].

use super::*;
use crate::config::Config;
use crate::poller::{Answer, Poller};
use crate::shared::MemoryStore;
use std::collections::HashMap;

const SECRET: &str = "test-secret-0123456789";

struct Req {
    peer: String,
    headers: HashMap<String, String>,
}

impl Req {
    fn new() -> Req {
        Req { peer: "10.0.0.1:5555".into(), headers: HashMap::new() }
    }
    fn with(mut self, k: &str, v: &str) -> Req {
        self.headers.insert(k.into(), v.into());
        self
    }
    fn clone_with(&self, k: &str, v: &str) -> Req {
        Req { peer: self.peer.clone(), headers: self.headers.clone() }.with(k, v)
    }
    fn peer(mut self, p: &str) -> Req {
        self.peer = p.into();
        self
    }
}

impl RequestView for Req {
    fn header(&self, name: &str) -> Option<String> {
        self.headers.get(name).cloned()
    }
    fn peer(&self) -> Option<String> {
        Some(self.peer.clone())
    }
}

/// A worker whose table comes from a poller fed `endpoints` (id, weight, state) and `policy`.
fn setup(config: &str, endpoints: &[(&str, u32, &str)], policy: &str) -> (Worker, Poller, MemoryStore) {
    let parsed = Config::parse(config.as_bytes()).unwrap();
    let store = MemoryStore::new();
    let mut poller = Poller::new(parsed.clone()).unwrap();
    publish(&mut poller, &store, 1, endpoints, policy);
    (Worker::new(parsed, 7), poller, store)
}

fn publish(poller: &mut Poller, store: &MemoryStore, version: u64, endpoints: &[(&str, u32, &str)], policy: &str) {
    let eps: Vec<String> = endpoints
        .iter()
        .enumerate()
        .map(|(i, (id, w, st))| {
            format!(r#"{{"id":"{id}","address":"127.0.0.1:{}","weight":{w},"state":"{st}"}}"#, 8000 + i)
        })
        .collect();
    let body = format!(r#"{{"service":"av","version":{version},"endpoints":[{}],"policy":{policy}}}"#, eps.join(","));
    let o = poller.on_answer(Answer::Response { status: 200, etag: None, body: body.as_bytes() }, 0, store);
    assert_eq!(o.error, None, "{o:?}");
}

const CFG: &str = r#"{"service":"av","supervisor":{}}"#;

fn forward(w: &mut Worker, s: &MemoryStore, req: &Req, now: u64) -> Pending {
    match w.on_request(req, now, s) {
        Verdict::Forward(p) => p,
        Verdict::Reply(r) => panic!("unexpected local reply {r:?}"),
    }
}

/// Runs one request to completion: the primary answers 200.
fn run(w: &mut Worker, s: &MemoryStore, req: &Req, now: u64) -> (String, Option<String>) {
    let mut p = forward(w, s, req, now);
    let primary = p.upstreams.split(',').next().unwrap_or_default().to_string();
    let cookie = w.on_response(
        &mut p,
        ResponseInfo { status: 200, upstream_address: Some(&primary), gateway_failure: false },
        now,
        s,
    );
    w.on_done(&mut p, now + 1, s);
    (primary, cookie)
}

fn spread(w: &mut Worker, s: &MemoryStore, n: usize) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for i in 0..n {
        let (a, _) = run(w, s, &Req::new(), i as u64);
        *counts.entry(a).or_insert(0) += 1;
    }
    counts
}

#[test]
fn equal_weights_spread_exactly() {
    let (mut w, _, s) = setup(CFG, &[("a", 100, "healthy"), ("b", 100, "healthy"), ("c", 100, "healthy")], "null");
    let c = spread(&mut w, &s, 3000);
    assert_eq!(c.values().copied().collect::<Vec<_>>(), vec![1000, 1000, 1000]);
}

#[test]
fn weights_one_two_three_are_exact() {
    let (mut w, _, s) = setup(CFG, &[("a", 1, "healthy"), ("b", 2, "healthy"), ("c", 3, "healthy")], "null");
    let c = spread(&mut w, &s, 600);
    assert_eq!((c["127.0.0.1:8000"], c["127.0.0.1:8001"], c["127.0.0.1:8002"]), (100, 200, 300));
}

#[test]
fn lists_three_distinct_upstreams() {
    let (mut w, _, s) =
        setup(CFG, &[("a", 1, "healthy"), ("b", 1, "healthy"), ("c", 1, "healthy"), ("d", 1, "healthy")], "null");
    for i in 0..20 {
        let p = forward(&mut w, &s, &Req::new(), i);
        let list: Vec<&str> = p.upstreams.split(',').collect();
        assert_eq!(list.len(), 3);
        let mut d = list.clone();
        d.dedup();
        d.sort();
        d.dedup();
        assert_eq!(d.len(), 3, "{list:?}");
    }
}

#[test]
fn draining_unhealthy_and_zero_weight_get_no_new_sessions() {
    let (mut w, _, s) = setup(
        CFG,
        &[("a", 100, "healthy"), ("b", 100, "draining"), ("c", 100, "unhealthy"), ("d", 0, "healthy")],
        "null",
    );
    let c = spread(&mut w, &s, 100);
    assert_eq!(c.len(), 1, "{c:?}");
    assert_eq!(c["127.0.0.1:8000"], 100);
}

#[test]
fn no_candidate_means_no_header() {
    let (mut w, _, s) = setup(CFG, &[("a", 100, "unhealthy")], "null");
    let p = forward(&mut w, &s, &Req::new(), 0);
    assert_eq!(p.upstreams, "");
}

fn sticky_policy() -> String {
    format!(r#"{{"sticky_sessions":{{"enabled":true,"secret":"{SECRET}","ttl":60}}}}"#)
}

#[test]
fn sticky_sessions_pin_and_reissue() {
    let eps = [("a", 100, "healthy"), ("b", 100, "healthy"), ("c", 100, "healthy")];
    let (mut w, mut poller, s) = setup(CFG, &eps, &sticky_policy());
    let (first, cookie) = run(&mut w, &s, &Req::new(), 1_000_000);
    let set = cookie.expect("a new session gets a cookie");
    assert!(set.starts_with("AGENTE_VENDEDOR_SESSION="));
    assert!(set.contains("Max-Age=60; Path=/; HttpOnly; Secure; SameSite=Lax"), "{set}");
    assert!(!set.contains("127.0.0.1"), "the cookie names an id, not an address");
    let value = set.split(';').next().unwrap().to_string();
    for i in 0..30 {
        let (a, c) = run(&mut w, &s, &Req::new().with("cookie", &format!("x=1; {value}")), 1_000_000 + i);
        assert_eq!(a, first);
        assert_eq!(c, None, "a valid young cookie is not re-sent");
    }
    // late in its life the cookie is renewed
    let (_, c) = run(&mut w, &s, &Req::new().with("cookie", &value), 1_000_000 + 40_000);
    assert!(c.is_some());

    // draining: still honoured
    let idx = ["127.0.0.1:8000", "127.0.0.1:8001", "127.0.0.1:8002"].iter().position(|a| *a == first).unwrap();
    let mut eps2 = eps;
    eps2[idx].2 = "draining";
    publish(&mut poller, &s, 2, &eps2, &sticky_policy());
    w.refresh(&s);
    assert_eq!(run(&mut w, &s, &Req::new().with("cookie", &value), 1_000_100).0, first);
    // unhealthy: re-picked and re-issued
    eps2[idx].2 = "unhealthy";
    publish(&mut poller, &s, 3, &eps2, &sticky_policy());
    w.refresh(&s);
    let (a, c) = run(&mut w, &s, &Req::new().with("cookie", &value), 1_000_200);
    assert_ne!(a, first);
    assert!(c.is_some());
}

#[test]
fn tampered_expired_and_garbage_cookies_are_ignored() {
    let (mut w, _, s) = setup(CFG, &[("a", 1, "healthy"), ("b", 1, "healthy")], &sticky_policy());
    let (_, cookie) = run(&mut w, &s, &Req::new(), 1_000_000);
    let value = cookie.unwrap().split(';').next().unwrap().to_string();
    let (name, v) = value.split_once('=').unwrap();
    let forged = format!("{name}={}x", &v[..v.len() - 1]);
    for bad in [forged, format!("{name}=garbage"), format!("{name}=")] {
        let (_, c) = run(&mut w, &s, &Req::new().with("cookie", &bad), 1_000_001);
        assert!(c.is_some(), "treated as absent: a fresh cookie is issued");
    }
    // expired (ttl 60 s)
    let (_, c) = run(&mut w, &s, &Req::new().with("cookie", &value), 1_000_000 + 61_000);
    assert!(c.is_some());
}

#[test]
fn rate_limit_is_shared_by_workers_and_answers_429() {
    let cfg =
        r#"{"service":"av","supervisor":{},"rate_limiting":{"enabled":true,"requests_per_minute":1,"burst_size":4}}"#;
    let (mut w1, _, s) = setup(cfg, &[("a", 1, "healthy")], "null");
    let mut w2 = Worker::new(Config::parse(cfg.as_bytes()).unwrap(), 8);
    let mut allowed = 0;
    let mut reply = None;
    for i in 0..10 {
        let w = if i % 2 == 0 { &mut w1 } else { &mut w2 };
        match w.on_request(&Req::new(), 1000 + i, &s) {
            Verdict::Forward(_) => allowed += 1,
            Verdict::Reply(r) => reply = Some(r),
        }
    }
    assert_eq!(allowed, 4);
    let r = reply.unwrap();
    assert_eq!(r.status, 429);
    assert!(r.headers.iter().any(|(k, v)| k == "retry-after" && v == "60"), "{:?}", r.headers);
    assert!(r.headers.iter().any(|(k, _)| k == "ratelimit-policy"));
    assert!(r.headers.iter().any(|(k, _)| k == "ratelimit"));
    // another client has its own bucket
    assert!(matches!(w1.on_request(&Req::new().peer("10.9.9.9:1"), 2000, &s), Verdict::Forward(_)));
}

#[test]
fn x_forwarded_for_is_only_trusted_for_configured_hops() {
    let cfg =
        r#"{"service":"av","supervisor":{},"rate_limiting":{"enabled":true,"requests_per_minute":1,"burst_size":1}}"#;
    let (mut w, _, s) = setup(cfg, &[("a", 1, "healthy")], "null");
    assert!(matches!(w.on_request(&Req::new(), 0, &s), Verdict::Forward(_)));
    // spoofing X-Forwarded-For does not give a new bucket with 0 trusted hops
    let spoof = Req::new().with("x-forwarded-for", "1.2.3.4, 10.0.0.1");
    assert!(matches!(w.on_request(&spoof, 1, &s), Verdict::Reply(_)));
    let cfg1 = r#"{"service":"av","supervisor":{},"rate_limiting":{"enabled":true,"requests_per_minute":1,"burst_size":1,"xff_trusted_hops":1}}"#;
    let (mut w, _, s) = setup(cfg1, &[("a", 1, "healthy")], "null");
    let via = |client: &str| Req::new().with("x-forwarded-for", &format!("6.6.6.6, {client}, 10.0.0.1"));
    assert!(matches!(w.on_request(&via("1.1.1.1"), 0, &s), Verdict::Forward(_)));
    assert!(matches!(w.on_request(&via("2.2.2.2"), 0, &s), Verdict::Forward(_)));
    assert!(matches!(w.on_request(&via("1.1.1.1"), 0, &s), Verdict::Reply(_)));
}

#[test]
fn a_failed_primary_is_ejected_for_all_workers() {
    let cfg = r#"{"service":"av","supervisor":{},"passive_health":{"base_ejection_time":"10s"}}"#;
    let (mut w1, _, s) = setup(cfg, &[("a", 1, "healthy"), ("b", 1, "healthy"), ("c", 1, "healthy")], "null");
    let mut w2 = Worker::new(Config::parse(cfg.as_bytes()).unwrap(), 9);
    // the proxy moved from the primary to the second listed host
    let mut p = loop {
        let p = forward(&mut w1, &s, &Req::new(), 0);
        if p.upstreams.starts_with("127.0.0.1:8001") {
            break p;
        }
        w1.on_done(&mut p.clone(), 0, &s);
    };
    let second = p.upstreams.split(',').nth(1).unwrap().to_string();
    w1.on_response(
        &mut p,
        ResponseInfo { status: 200, upstream_address: Some(&second), gateway_failure: false },
        0,
        &s,
    );
    w1.on_done(&mut p, 1, &s);
    assert!(w1.take_logs().iter().any(|l| l.contains("ejected endpoint b")));
    // the other worker no longer picks it
    let c = spread(&mut w2, &s, 100);
    assert!(!c.contains_key("127.0.0.1:8001"), "{c:?}");
    // after the ejection time its first request is a trial; it succeeds, and b is back in the rotation
    assert_eq!(run(&mut w2, &s, &Req::new(), 10_001).0, "127.0.0.1:8001", "the trial");
    let mut back = 0;
    for i in 0..30 {
        if run(&mut w2, &s, &Req::new(), 10_002 + i).0 == "127.0.0.1:8001" {
            back += 1;
        }
    }
    assert_eq!(back, 10);
}

/// Runs one request whose primary answers `status`; returns the primary.
fn answered(w: &mut Worker, s: &MemoryStore, now: u64, status: impl Fn(&str) -> u32) -> String {
    let mut p = forward(w, s, &Req::new(), now);
    let primary = p.upstreams.split(',').next().unwrap_or_default().to_string();
    let info = ResponseInfo { status: status(&primary), upstream_address: Some(&primary), gateway_failure: false };
    w.on_response(&mut p, info, now, s);
    w.on_done(&mut p, now + 1, s);
    primary
}

#[test]
fn a_half_open_endpoint_gets_only_its_trials_until_one_succeeds() {
    let cfg = r#"{"service":"av","supervisor":{},"passive_health":{"base_ejection_time":"10s","consecutive_5xx":3,"half_open_trials":2}}"#;
    let eps = [("a", 1, "healthy"), ("b", 1, "healthy"), ("c", 1, "healthy")];
    let (mut w1, _, s) = setup(cfg, &eps, "null");
    let mut w2 = Worker::new(Config::parse(cfg.as_bytes()).unwrap(), 9);
    let b = "127.0.0.1:8001";
    let failing = |up: &str| if up == b { 503 } else { 200 };
    let mut t = 0;
    while !w1.take_logs().iter().any(|l| l.contains("ejected endpoint b")) {
        answered(&mut w1, &s, t, failing);
        t += 1;
    }
    w2.refresh(&s);
    // half-open from 10 s on; trials that fail re-open it (20 s, then 30 s): 2 trials per round, shared by both workers
    let mut to_b = Vec::new();
    for now in (10_000..70_000).step_by(50) {
        for w in [&mut w1, &mut w2] {
            if answered(w, &s, now, failing) == b {
                to_b.push(now);
            }
        }
        if now % 500 == 0 {
            w1.refresh(&s);
            w2.refresh(&s);
        }
    }
    // each trial fails at once and re-opens it for longer (20 s, then 30 s): one request per round reaches b, the
    // other worker's stale view notwithstanding
    assert_eq!(to_b.len(), 3, "{to_b:?}");
    for (got, round) in to_b.iter().zip([10_000, 30_000, 60_000]) {
        assert!((round..round + 100).contains(got), "{to_b:?}");
    }
    // it recovers: the next trial succeeds and it takes its share again
    let ok = |_: &str| 200;
    let mut back = 0;
    for now in (120_000..126_000).step_by(20) {
        if answered(&mut w1, &s, now, ok) == b {
            back += 1;
        }
    }
    assert!((90..=110).contains(&back), "{back}");
}

#[test]
fn five_server_errors_in_a_row_eject() {
    let (mut w, _, s) = setup(CFG, &[("a", 1, "healthy"), ("b", 1, "healthy"), ("c", 1, "healthy")], "null");
    let mut errors = 0;
    for i in 0..100 {
        let mut p = forward(&mut w, &s, &Req::new(), i);
        let primary = p.upstreams.split(',').next().unwrap().to_string();
        let status = if primary == "127.0.0.1:8002" { 503 } else { 200 };
        if status == 503 {
            errors += 1;
        }
        w.on_response(&mut p, ResponseInfo { status, upstream_address: Some(&primary), gateway_failure: false }, i, &s);
        w.on_done(&mut p, i, &s);
    }
    assert_eq!(errors, 5, "ejected after the fifth 5xx");
}

#[test]
fn in_flight_is_shared_and_returns_to_zero() {
    let (mut w, mut poller, s) =
        setup(CFG, &[("a", 1, "healthy"), ("b", 1, "healthy")], r#"{"algorithm":"least_connections"}"#);
    let held: Vec<Pending> = (0..10).map(|i| forward(&mut w, &s, &Req::new(), i)).collect();
    let a = shared::get_i64(&s, &keys::inflight("a"));
    let b = shared::get_i64(&s, &keys::inflight("b"));
    assert_eq!(a + b, 10);
    assert!((a - b).abs() <= 2, "least connections keeps them level: {a} {b}");
    for mut p in held {
        w.on_done(&mut p, 20, &s);
    }
    assert_eq!(shared::get_i64(&s, &keys::inflight("a")) + shared::get_i64(&s, &keys::inflight("b")), 0);
    w.flush(&s);
    let (report, _, _) = poller.collect(&s, 100);
    assert_eq!(report.endpoints.iter().map(|e| e.requests).sum::<u64>(), 10);
}

#[test]
fn response_time_prefers_the_fast_endpoint() {
    let (mut w, _, s) =
        setup(CFG, &[("fast", 1, "healthy"), ("slow", 1, "healthy")], r#"{"algorithm":"response_time"}"#);
    let mut slow_hits = 0;
    for i in 0..400u64 {
        let now = i * 10;
        let mut p = forward(&mut w, &s, &Req::new(), now);
        let primary = p.upstreams.split(',').next().unwrap().to_string();
        let latency = if primary == "127.0.0.1:8001" {
            slow_hits += 1;
            200
        } else {
            2
        };
        w.on_response(
            &mut p,
            ResponseInfo { status: 200, upstream_address: Some(&primary), gateway_failure: false },
            now + latency,
            &s,
        );
        w.on_done(&mut p, 0, &s);
    }
    assert!(slow_hits < 60, "slow endpoint got {slow_hits} of 400");
}

#[test]
fn bounded_load_reads_a_few_loads_per_request_not_every_endpoints() {
    let ids: Vec<String> = (0..100).map(|i| format!("e{i}")).collect();
    let eps: Vec<(&str, u32, &str)> = ids.iter().map(|id| (id.as_str(), 100, "healthy")).collect();
    let policy = r#"{"algorithm":"consistent_hash","consistent_hash":{"key":"header:x-user"}}"#;
    let (mut w, _p, s) = setup(CFG, &eps, policy);
    // a burst: every endpoint busy with requests held in flight, the total read at its start now out of date
    let held: Vec<Pending> =
        (0..400).map(|k| forward(&mut w, &s, &Req::new().with("x-user", &format!("held-{k}")), 0)).collect();
    let reads = |w: &mut Worker, now: u64| {
        let before = s.reads();
        for k in 0..100 {
            forward(w, &s, &Req::new().with("x-user", &format!("u{k}")), now);
        }
        s.reads() - before
    };
    // the walk passes over a bounded number of endpoints: not one read per endpoint of the table
    let burst = reads(&mut w, 10);
    assert!(burst < 2_000, "{burst} shared-data reads for 100 requests over 100 endpoints");
    // once the total is read again, the key's endpoint is under the cap: a few reads each
    let settled = reads(&mut w, 300);
    assert!(settled < 500, "{settled} shared-data reads for 100 requests over 100 endpoints");
    assert_eq!(held.len(), 400);
}

#[test]
fn consistent_hash_keeps_keys_on_their_endpoint() {
    let policy = r#"{"algorithm":"consistent_hash","consistent_hash":{"key":"query:q"}}"#;
    let (mut w, _, s) = setup(CFG, &[("a", 1, "healthy"), ("b", 1, "healthy"), ("c", 1, "healthy")], policy);
    let mut owners = HashMap::new();
    for round in 0..3 {
        for k in 0..50 {
            let (a, _) =
                run(&mut w, &s, &Req::new().with(":path", &format!("/search?lang=es&q=item{k}")), round * 100 + k);
            let prev = owners.insert(k, a.clone());
            if let Some(prev) = prev {
                assert_eq!(prev, a);
            }
        }
    }
    let distinct: std::collections::HashSet<_> = owners.values().collect();
    assert_eq!(distinct.len(), 3);
}

#[test]
fn ip_hash_follows_the_client() {
    let (mut w, _, s) =
        setup(CFG, &[("a", 1, "healthy"), ("b", 1, "healthy"), ("c", 1, "healthy")], r#"{"algorithm":"ip_hash"}"#);
    for client in 0..20 {
        let peer = format!("10.1.0.{client}:999");
        let first = run(&mut w, &s, &Req::new().peer(&peer), 0).0;
        for i in 0..5 {
            assert_eq!(run(&mut w, &s, &Req::new().peer(&format!("10.1.0.{client}:{i}")), i).0, first);
        }
    }
}

#[test]
fn a_table_change_applies_on_the_next_tick() {
    let (mut w, mut poller, s) = setup(CFG, &[("a", 1, "healthy")], "null");
    assert_eq!(run(&mut w, &s, &Req::new(), 0).0, "127.0.0.1:8000", "the first table is picked up by a request");
    publish(&mut poller, &s, 2, &[("a", 1, "unhealthy"), ("b", 1, "healthy")], "null");
    w.refresh(&s);
    assert_eq!(run(&mut w, &s, &Req::new(), 1).0, "127.0.0.1:8001");
}

#[test]
fn local_in_flight_counts_reach_the_shared_counter_on_the_tick() {
    let (mut w, _, s) = setup(CFG, &[("a", 1, "healthy"), ("b", 1, "healthy")], "null");
    let mut held: Vec<Pending> = (0..6).map(|i| forward(&mut w, &s, &Req::new(), i)).collect();
    assert_eq!(shared::get_i64(&s, &keys::inflight("a")), 0, "round robin does not pay for shared counts per request");
    w.flush(&s);
    assert_eq!(shared::get_i64(&s, &keys::inflight("a")), 3);
    assert_eq!(shared::get_i64(&s, &keys::inflight("b")), 3);
    for p in held.iter_mut().take(4) {
        w.on_done(p, 10, &s);
    }
    w.flush(&s);
    assert_eq!(shared::get_i64(&s, &keys::inflight("a")) + shared::get_i64(&s, &keys::inflight("b")), 2);
    for p in held.iter_mut().skip(4) {
        w.on_done(p, 10, &s);
    }
    w.flush(&s);
    assert_eq!(shared::get_i64(&s, &keys::inflight("a")) + shared::get_i64(&s, &keys::inflight("b")), 0);
}

#[test]
fn static_endpoints_work_without_a_supervisor() {
    let cfg = Config::parse(br#"{"service":"av","endpoints":[{"id":"a","address":"127.0.0.1:9001"},{"id":"b","address":"127.0.0.1:9002","weight":300}]}"#).unwrap();
    let mut w = Worker::new(cfg, 1);
    let s = MemoryStore::new();
    let c = spread(&mut w, &s, 400);
    assert_eq!((c["127.0.0.1:9001"], c["127.0.0.1:9002"]), (100, 300));
}

/// 20,000 requests per second for `seconds` on two endpoints, one in five answered 503 after 4 ms; the adapter reads
/// only the outcomes the worker asks for. Returns the outcomes read and the report.
fn sampled_load(policy: &str, seconds: u64) -> (u64, crate::report::Report) {
    let (mut w, mut poller, s) = setup(CFG, &[("a", 1, "healthy"), ("b", 1, "healthy")], policy);
    let mut observed = 0;
    let n = 20_000 * seconds;
    for i in 0..n {
        let now = 1_000_000 + i / 20;
        let mut p = forward(&mut w, &s, &Req::new(), now);
        if !p.observed() {
            w.on_done(&mut p, 0, &s);
            continue;
        }
        observed += 1;
        let primary = p.upstreams.split(',').next().unwrap().to_string();
        let status = if i % 5 == 0 { 503 } else { 200 };
        w.on_response(
            &mut p,
            ResponseInfo { status, upstream_address: Some(&primary), gateway_failure: false },
            now + 4,
            &s,
        );
        w.on_done(&mut p, 0, &s);
    }
    w.flush(&s);
    (observed, poller.collect(&s, 1_000_000 + n / 20).0)
}

#[test]
fn under_load_outcomes_are_sampled_and_the_report_stays_unbiased() {
    let (observed, report) = sampled_load("{}", 5);
    // the first second in full, then about 1,000 a second
    assert!((23_000..=25_500).contains(&observed), "{observed} outcomes read");
    let requests: u64 = report.endpoints.iter().map(|e| e.requests).sum();
    let errors: u64 = report.endpoints.iter().map(|e| e.errors).sum();
    let latency: f64 = report.endpoints.iter().map(|e| e.latency_sum_ms).sum();
    assert_eq!(requests, 100_000, "every request is counted");
    assert!((errors as f64 - 20_000.0).abs() < 1_200.0, "{errors} errors estimated for 20000");
    assert!((latency / requests as f64 - 4.0).abs() < 0.2, "mean latency {}", latency / requests as f64);
    for e in &report.endpoints {
        assert!((3.0..=5.0).contains(&e.latency_p95_ms), "{e:?}");
    }
}

#[test]
fn sampling_can_be_turned_off() {
    assert_eq!(sampled_load(r#"{"observation":{"max_per_second":0}}"#, 2).0, 40_000);
}

/// A client whose cookie pins the endpoint its request goes to, and needs no renewal, gets nothing from the response:
/// its unobserved requests read nothing at the response headers. A new session, a renewal, or a pin that cannot be
/// honoured still reads the response (for the cookie).
#[test]
fn a_settled_session_reads_its_response_only_when_observed() {
    let eps = [("a", 100, "healthy"), ("b", 100, "healthy"), ("c", 100, "healthy")];
    let (mut w, mut poller, s) = setup(CFG, &eps, &sticky_policy());
    let start = 1_000_000;
    let (first, cookie) = run(&mut w, &s, &Req::new(), start);
    let value = cookie.unwrap().split(';').next().unwrap().to_string();
    let with_cookie = Req::new().with("cookie", &value);
    let (mut unobserved, mut read) = (0, 0);
    for i in 0..40_000u64 {
        let mut p = forward(&mut w, &s, &with_cookie, start + 1 + i / 20);
        assert_eq!(p.upstreams.split(',').next(), Some(first.as_str()));
        assert_eq!(p.needs_response_headers(), p.observed(), "request {i}");
        if p.needs_response_headers() {
            read += 1;
        } else {
            unobserved += 1;
        }
        w.on_done(&mut p, 0, &s);
    }
    assert!(unobserved > 10_000 && read > 1_000, "{unobserved} unobserved, {read} read");
    // a new session, and a cookie due a renewal, read it
    assert!(forward(&mut w, &s, &Req::new(), start + 2_100).needs_response_headers());
    assert!(forward(&mut w, &s, &with_cookie, start + 40_000).needs_response_headers());
    // the pinned endpoint cannot take it: the client is re-pinned from this response
    let idx = ["127.0.0.1:8000", "127.0.0.1:8001", "127.0.0.1:8002"].iter().position(|a| *a == first).unwrap();
    let mut eps2 = eps;
    eps2[idx].2 = "unhealthy";
    publish(&mut poller, &s, 2, &eps2, &sticky_policy());
    w.refresh(&s);
    assert!(forward(&mut w, &s, &with_cookie, start + 2_200).needs_response_headers());
}

/// The clock is read only by what needs it: an observed request (its latency), rate limiting; an unobserved request
/// of plain balancing reads nothing (the sampler's budget runs on the last time read).
#[test]
fn the_clock_is_read_only_when_a_request_needs_it() {
    let reads = std::cell::Cell::new(0u64);
    let run = |w: &mut Worker, s: &MemoryStore, now: u64| {
        let before = reads.get();
        let clock = || {
            reads.set(reads.get() + 1);
            now
        };
        let mut p = match w.on_request_at(&Req::new(), &clock, s) {
            Verdict::Forward(p) => p,
            Verdict::Reply(r) => panic!("{r:?}"),
        };
        w.on_done(&mut p, 0, s);
        (p.observed(), reads.get() - before)
    };
    let (mut w, _, s) = setup(CFG, &[("a", 1, "healthy"), ("b", 1, "healthy")], "{}");
    let (mut observed, mut unobserved) = (0, 0);
    for i in 0..40_000u64 {
        let (seen, read) = run(&mut w, &s, 1_000_000 + i / 20);
        assert_eq!(read, u64::from(seen), "request {i}: observed {seen}, clock read {read} times");
        if seen { observed += 1 } else { unobserved += 1 }
    }
    // the sampler still keeps to its budget on the time the observed requests read: the first second in full, then
    // about 1,000 a second
    assert!((20_000..=22_000).contains(&observed) && unobserved > 18_000, "{observed} observed");
    // rate limiting needs the time of every request
    let limited = r#"{"rate_limiting":{"enabled":true,"requests_per_minute":100000000,"burst_size":1000000}}"#;
    let (mut w, _, s) = setup(CFG, &[("a", 1, "healthy"), ("b", 1, "healthy")], limited);
    for i in 0..40_000u64 {
        assert_eq!(run(&mut w, &s, 1_000_000 + i / 20).1, 1, "request {i}");
    }
}

/// With sticky sessions every response is read (its cookie, its outcome for passive health), but only a sample of
/// requests is timed (the clock read the adapter saves on the others).
#[test]
fn sticky_sessions_read_every_response_and_time_a_sample() {
    let policy = format!(r#"{{"sticky_sessions":{{"enabled":true,"secret":"{SECRET}"}}}}"#);
    let (mut w, _, s) = setup(CFG, &[("a", 1, "healthy"), ("b", 1, "healthy")], &policy);
    let (mut observed, mut cookies) = (0, 0);
    let n = 40_000u64;
    for i in 0..n {
        let now = 1_000_000 + i / 20;
        let mut p = forward(&mut w, &s, &Req::new(), now);
        assert!(p.needs_response_headers());
        let primary = p.upstreams.split(',').next().unwrap().to_string();
        let at = if p.observed() {
            observed += 1;
            now + 4
        } else {
            p.started_ms()
        };
        let info = ResponseInfo { status: 200, upstream_address: Some(&primary), gateway_failure: false };
        if w.on_response(&mut p, info, at, &s).is_some() {
            cookies += 1;
        }
        w.on_done(&mut p, 0, &s);
    }
    assert_eq!(cookies, n, "every new session gets its cookie");
    // the first second in full, then about 1,000 a second
    assert!((20_000..=22_000).contains(&observed), "{observed} requests timed");
}

/// A worker of a proxy in zone `a`, over endpoints `a1..a3` (ports 8000-8002) and `b1..b3` (8003-8005), of which the
/// first `a_up` of zone a are healthy.
fn zoned(a_up: usize, policy: &str) -> (Worker, MemoryStore) {
    let parsed = Config::parse(br#"{"service":"av","supervisor":{},"zone":"a"}"#).unwrap();
    let store = MemoryStore::new();
    let mut poller = Poller::new(parsed.clone()).unwrap();
    let eps: Vec<String> = (0..6)
        .map(|i| {
            let (zone, n) = if i < 3 { ("a", i + 1) } else { ("b", i - 2) };
            let state = if i >= 3 || i < a_up { "healthy" } else { "unhealthy" };
            format!(r#"{{"id":"{zone}{n}","address":"127.0.0.1:{}","state":"{state}","zone":"{zone}"}}"#, 8000 + i)
        })
        .collect();
    let body = format!(r#"{{"service":"av","version":1,"endpoints":[{}],"policy":{policy}}}"#, eps.join(","));
    let o = poller.on_answer(Answer::Response { status: 200, etag: None, body: body.as_bytes() }, 0, &store);
    assert_eq!(o.error, None, "{o:?}");
    (Worker::new(parsed, 7), store)
}

fn zone_a_share(c: &HashMap<String, usize>, n: usize) -> f64 {
    let a: usize = (8000..8003).map(|p| c.get(&format!("127.0.0.1:{p}")).copied().unwrap_or(0)).sum();
    a as f64 / n as f64
}

#[test]
fn a_proxy_keeps_its_zone_and_spills_by_capacity_over_traffic() {
    let (mut w, s) = zoned(3, "null");
    assert_eq!(zone_a_share(&spread(&mut w, &s, 3000), 3000), 1.0, "all local while a has its share");
    // a has 1 of 4 healthy endpoints for half the traffic: it keeps 1/4 / 1/2 = 50%
    let (mut w, s) = zoned(1, "null");
    let got = zone_a_share(&spread(&mut w, &s, 4000), 4000);
    assert!((got - 0.5).abs() < 0.03, "{got}");
    let (mut w, s) = zoned(0, "null");
    assert_eq!(zone_a_share(&spread(&mut w, &s, 300), 300), 0.0);
    // locality off: the plain spread (1 of 4)
    let (mut w, s) = zoned(1, r#"{"locality":{"enabled":false}}"#);
    let got = zone_a_share(&spread(&mut w, &s, 4000), 4000);
    assert!((got - 0.25).abs() < 0.02, "{got}");
}

#[test]
fn a_local_request_retries_in_its_zone_then_outside() {
    let (mut w, s) = zoned(3, "null");
    for i in 0..30 {
        let p = forward(&mut w, &s, &Req::new(), i);
        let zones: Vec<bool> = p.upstreams.split(',').map(|u| u < "127.0.0.1:8003").collect();
        assert_eq!(zones, vec![true, true, false], "{}", p.upstreams);
    }
}

#[test]
fn a_hash_key_keeps_its_zone() {
    let (mut w, s) = zoned(1, r#"{"algorithm":"consistent_hash","consistent_hash":{"key":"header:x-user"}}"#);
    let mut zones = std::collections::HashSet::new();
    for user in 0..200 {
        let req = Req::new().with("x-user", &format!("u{user}"));
        let first = run(&mut w, &s, &req, 0).0;
        for t in 1..4 {
            assert_eq!(run(&mut w, &s, &req, t).0, first, "u{user} keeps its endpoint");
        }
        zones.insert(first.as_str() < "127.0.0.1:8003");
    }
    assert_eq!(zones.len(), 2, "keys spread over both zones");
}

#[test]
fn a_full_endpoint_passes_requests_to_the_next_and_all_full_is_503() {
    let cfg = r#"{"service":"av","supervisor":{},"circuit_breaker":{"max_requests_per_endpoint":2}}"#;
    let (mut w, _, s) = setup(cfg, &[("a", 1, "healthy"), ("b", 1, "healthy"), ("c", 1, "healthy")], "null");
    let mut w2 = Worker::new(Config::parse(cfg.as_bytes()).unwrap(), 3);
    w2.refresh(&s);
    // six requests that do not end, from two workers: two per endpoint, never three
    let mut open = Vec::new();
    for k in 0..6 {
        let worker = if k % 2 == 0 { &mut w } else { &mut w2 };
        open.push(forward(worker, &s, &Req::new(), k));
    }
    let mut per: HashMap<String, usize> = HashMap::new();
    for p in &open {
        *per.entry(p.upstreams.split(',').next().unwrap().to_string()).or_default() += 1;
    }
    assert_eq!(per.values().copied().collect::<Vec<_>>(), vec![2, 2, 2], "{per:?}");
    assert_eq!(w.stats.overflowed + w2.stats.overflowed, 0, "round robin found room first each time");
    match w.on_request(&Req::new(), 10, &s) {
        Verdict::Reply(r) => {
            assert_eq!(r.status, 503);
            assert!(r.headers.contains(&("retry-after".into(), "1".into())));
        }
        Verdict::Forward(p) => panic!("a seventh request found room: {}", p.upstreams),
    }
    assert_eq!(w.stats.overloaded, 1);
    // one of c's ends; round robin names b (full) next: the request goes on to c, listed after b
    let mut done = open.remove(4);
    assert!(done.upstreams.starts_with("127.0.0.1:8002"), "{}", done.upstreams);
    w.on_done(&mut done, 20, &s);
    let p = forward(&mut w, &s, &Req::new(), 21);
    assert!(p.upstreams.starts_with("127.0.0.1:8002"), "{}", p.upstreams);
    assert_eq!(w.stats.overflowed, 1);
}

/// A worker over `s1`, `s2` (tag `search`, ports 8000-8001), `r1`, `r2` (tag `reco`, 8002-8003) and `o1` (no tag,
/// 8004), with agente-vendedor's routes; `reco_state` for r1 and r2.
fn routed(reco_state: &str) -> (Worker, MemoryStore) {
    let parsed = Config::parse(br#"{"service":"av","supervisor":{}}"#).unwrap();
    let store = MemoryStore::new();
    let mut poller = Poller::new(parsed.clone()).unwrap();
    let eps = [
        ("s1", "search", "healthy"),
        ("s2", "search", "healthy"),
        ("r1", "reco", reco_state),
        ("r2", "reco", reco_state),
        ("o1", "", "healthy"),
    ]
    .iter()
    .enumerate()
    .map(|(i, (id, tag, state))| {
        let tags = if tag.is_empty() { String::new() } else { format!(r#","tags":["{tag}"]"#) };
        format!(r#"{{"id":"{id}","address":"127.0.0.1:{}","state":"{state}"{tags}}}"#, 8000 + i)
    })
    .collect::<Vec<_>>()
    .join(",");
    let policy = r#"{"routes":[
        {"name":"search","match":{"path":{"prefix":"/search"}},"pool":{"tags":["search"]},
         "algorithm":"consistent_hash","consistent_hash":{"key":"query:q"}},
        {"name":"recommend","match":{"path":{"prefix":"/recommend"}},"pool":{"tags":["reco"]},"algorithm":"least_connections"},
        {"name":"writes","match":{"methods":["POST"]},"rate_limiting":{"requests_per_minute":60,"burst_size":2}}]}"#;
    let body = format!(r#"{{"service":"av","version":1,"endpoints":[{eps}],"policy":{policy}}}"#);
    let o = poller.on_answer(Answer::Response { status: 200, etag: None, body: body.as_bytes() }, 0, &store);
    assert_eq!(o.error, None, "{o:?}");
    (Worker::new(parsed, 7), store)
}

fn get(path: &str) -> Req {
    Req::new().with(":path", path).with(":method", "GET")
}

#[test]
fn routes_send_each_request_to_its_pool_with_its_algorithm() {
    let (mut w, s) = routed("healthy");
    let mut search = std::collections::HashSet::new();
    for q in 0..50 {
        let req = get(&format!("/search?q=item{q}"));
        let first = run(&mut w, &s, &req, q).0;
        assert!(first == "127.0.0.1:8000" || first == "127.0.0.1:8001", "{first}");
        assert_eq!(run(&mut w, &s, &req, q + 100).0, first, "the same query, the same endpoint");
        search.insert(first);
        let listed = forward(&mut w, &s, &req, 0).upstreams;
        assert!(listed.split(',').all(|u| u < "127.0.0.1:8002"), "retries stay in the pool: {listed}");
    }
    assert_eq!(search.len(), 2, "queries spread over the pool");
    for t in 0..20 {
        let up = run(&mut w, &s, &get("/recommend?user=1"), t).0;
        assert!(up == "127.0.0.1:8002" || up == "127.0.0.1:8003", "{up}");
    }
    let mut any = std::collections::HashSet::new();
    for t in 0..50 {
        any.insert(run(&mut w, &s, &get("/other"), t).0);
    }
    assert_eq!(any.len(), 5, "no route: every endpoint");
}

#[test]
fn a_route_limits_its_own_requests_and_an_empty_pool_answers_503() {
    let (mut w, s) = routed("unhealthy");
    let post = Req::new().with(":path", "/cart").with(":method", "POST");
    let verdicts: Vec<bool> = (0..4).map(|t| matches!(w.on_request(&post, t, &s), Verdict::Forward(_))).collect();
    assert_eq!(verdicts, [true, true, false, false], "burst of 2 for writes");
    assert!(matches!(w.on_request(&get("/other"), 5, &s), Verdict::Forward(_)), "reads are not limited");
    match w.on_request(&get("/recommend"), 6, &s) {
        Verdict::Reply(r) => {
            assert_eq!(r.status, 503);
            assert!(r.body.contains("recommend"), "{}", r.body);
        }
        Verdict::Forward(p) => panic!("an empty pool forwarded to {}", p.upstreams),
    }
}

#[test]
fn a_route_can_turn_sticky_sessions_on_for_its_requests_only() {
    let cfg = format!(
        r#"{{"service":"av","supervisor":{{}},"sticky_sessions":{{"enabled":false,"secret":"{SECRET}"}},
            "routes":[{{"name":"cart","match":{{"path":{{"prefix":"/cart"}}}},"sticky_sessions":{{"enabled":true}}}}]}}"#
    );
    let (mut w, _, s) = setup(&cfg, &[("a", 1, "healthy"), ("b", 1, "healthy"), ("c", 1, "healthy")], "null");
    let cart = get("/cart");
    let p = forward(&mut w, &s, &cart, 0);
    assert!(p.needs_response_headers(), "the route's requests carry a cookie");
    let (first, cookie) = run(&mut w, &s, &cart, 1);
    let cookie = cookie.expect("a new session on the route gets a cookie");
    let pair = cookie.split(';').next().unwrap().to_string();
    for t in 2..10 {
        assert_eq!(run(&mut w, &s, &cart.clone_with("cookie", &pair), t).0, first, "pinned on the route");
    }
    let home = get("/home");
    assert!(!forward(&mut w, &s, &home, 20).needs_response_headers(), "other requests do not");
    assert_eq!(run(&mut w, &s, &home, 21).1, None);
}
