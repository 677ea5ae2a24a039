//! The filter's acceptance scenarios, each run against both proxies with the same `.wasm` and the same filter
//! configuration: real Envoy 1.40 (`--concurrency 2`) and the bundled proxy (`equilibrio-host`, 2 workers), with
//! real backends and the table stand-in. Each test starts its own processes on kernel-chosen ports.

// test code: a failed unwrap is a failed test
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use equilibrio_tests::backend::Backend;
use equilibrio_tests::proxy::{Kind, Proxy};
use equilibrio_tests::supervisor::{Supervisor, TOKEN};
use equilibrio_tests::table_server::{TableServer, endpoint};
use equilibrio_tests::{by_body, load, load_until};
use serde_json::{Value, json};

const SERVICE: &str = "agente-vendedor";
const SECRET: &str = "integration-secret-0123456789";

fn filter_config(table: &TableServer, poll: &str, extra: Value) -> Value {
    let mut cfg = json!({
        "service": SERVICE,
        "supervisor": {"cluster": "supervisor", "authority": table.addr().to_string(), "poll_period": poll},
    });
    if let (Some(c), Value::Object(extra)) = (cfg.as_object_mut(), extra) {
        c.extend(extra);
    }
    cfg
}

struct Setup {
    backends: Vec<Backend>,
    table: TableServer,
    proxy: Proxy,
    client: reqwest::Client,
}

/// Backends `av-1..` with these weights, all healthy, and the table stand-in serving them with `policy`.
async fn backends_and_table(weights: &[u32], policy: Value) -> (Vec<Backend>, TableServer) {
    let mut backends = Vec::new();
    for (i, _) in weights.iter().enumerate() {
        backends.push(Backend::start(&format!("av-{}", i + 1)).await.unwrap());
    }
    let eps = backends.iter().zip(weights).map(|(b, w)| endpoint(&b.id, b.addr, *w, "healthy")).collect();
    (backends, TableServer::start(SERVICE, eps, policy).await.unwrap())
}

async fn setup(kind: Kind, weights: &[u32], policy: Value, extra: Value, poll: &str) -> Setup {
    let (backends, table) = backends_and_table(weights, policy).await;
    let proxy = Proxy::start(kind, &filter_config(&table, poll, extra), table.addr()).await.unwrap();
    proxy.wait_for_table(weights.len(), 1).await.unwrap();
    // connection pooling on, several connections so that both workers serve
    let client = reqwest::Client::builder().pool_max_idle_per_host(32).build().unwrap();
    Setup { backends, table, proxy, client }
}

fn share(counts: &std::collections::BTreeMap<String, usize>, id: &str, total: usize) -> f64 {
    *counts.get(id).unwrap_or(&0) as f64 / total as f64
}

async fn equal_weights_spread_within_two_percent(kind: Kind) {
    let s = setup(kind, &[100, 100, 100], Value::Null, json!({}), "500ms").await;
    // The kernel (SO_REUSEPORT) hashes each new connection to a worker: with 8 connections all land on one worker in
    // 1 run of 128; with 32, in 1 of 2^31.
    let results = load(&s.client, &s.proxy.url("/search?q=x"), 3000, 32).await;
    let counts = by_body(&results);
    assert_eq!(results.iter().filter(|(st, _)| *st == 200).count(), 3000, "{counts:?}");
    for b in &s.backends {
        let got = share(&counts, &b.id, 3000);
        assert!((got - 1.0 / 3.0).abs() <= 0.02, "{} got {got:.3}: {counts:?}", b.id);
    }
    // both workers served (the spread is the sum of two exact per-worker sequences)
    let per_worker = s.proxy.worker_connections().await;
    assert!(per_worker.len() == 2 && per_worker.iter().all(|c| *c > 0), "both workers serve: {per_worker:?}");
}

async fn weights_one_two_three_within_three_percent(kind: Kind) {
    let s = setup(kind, &[1, 2, 3], Value::Null, json!({}), "500ms").await;
    let results = load(&s.client, &s.proxy.url("/"), 3000, 8).await;
    let counts = by_body(&results);
    for (b, want) in s.backends.iter().zip([1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0]) {
        let got = share(&counts, &b.id, 3000);
        assert!((got - want).abs() <= 0.03, "{} got {got:.3}, want {want:.3}: {counts:?}", b.id);
    }
}

async fn a_client_cannot_pick_the_upstream(kind: Kind) {
    let s = setup(kind, &[100, 100, 100], Value::Null, json!({}), "500ms").await;
    let target = s.backends[2].addr.to_string();
    let mut counts = std::collections::BTreeMap::new();
    for _ in 0..300 {
        let r = s.client.get(s.proxy.url("/")).header("x-equilibrio-upstream", &target).send().await.unwrap();
        assert_eq!(r.status(), 200);
        *counts.entry(r.text().await.unwrap()).or_insert(0usize) += 1;
    }
    for b in &s.backends {
        let got = counts.get(&b.id).copied().unwrap_or(0);
        assert!((90..=110).contains(&got), "{counts:?}");
    }
}

/// Envoy shares one VM between the filter plugins of one `vm_id`, and the filter makes a request's state at its
/// headers (it exports no `proxy_on_context_create`): each request must still be served under its own plugin's
/// configuration. Two listeners, the same root id, two plugin names: one plugin with sticky sessions, one without.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_plugins_sharing_a_vm_each_serve_under_their_own_configuration() {
    let (_backends, table) = backends_and_table(&[100, 100, 100], Value::Null).await;
    let plain = filter_config(&table, "500ms", json!({}));
    let sticky = filter_config(
        &table,
        "500ms",
        json!({"sticky_sessions": {"enabled": true, "secret": SECRET, "secure": false}}),
    );
    let rendered = equilibrio_tests::envoy::render_config(&plain, table.addr()).unwrap();
    // a second listener: a copy of the first, its plugin named apart and configured with sticky sessions
    let start = rendered.find("  - name: ingress\n").expect("the ingress listener");
    let end = rendered.find("\n  clusters:").expect("the clusters");
    let plain_value = format!("value: '{}'", plain.to_string().replace('\'', "''"));
    let second = rendered[start..end]
        .replace("- name: ingress\n", "- name: ingress_sticky\n")
        .replace("stat_prefix: ingress", "stat_prefix: ingress_sticky")
        .replace("name: equilibrio\n", "name: equilibrio_sticky\n")
        .replace(&plain_value, &format!("value: '{}'", sticky.to_string().replace('\'', "''")));
    assert!(second.contains("equilibrio_sticky") && second.contains("sticky_sessions"), "{second}");
    let config = format!("{}{}\n{}", &rendered[..end], second.trim_end_matches('\n'), &rendered[end..]);
    let envoy = equilibrio_tests::envoy::Envoy::start_with(&config).await.unwrap();
    let listeners: Value =
        reqwest::get(format!("http://{}/listeners?format=json", envoy.admin)).await.unwrap().json().await.unwrap();
    let port_of = |name: &str| {
        let statuses = listeners["listener_statuses"].as_array().unwrap();
        let l = statuses.iter().find(|l| l["name"] == name).unwrap_or_else(|| panic!("{name}: {listeners}"));
        l["local_address"]["socket_address"]["port_value"].as_u64().unwrap()
    };
    let (plain_port, sticky_port) = (port_of("ingress"), port_of("ingress_sticky"));
    let proxy = Proxy::Envoy(envoy);
    proxy.wait_for_table(3, 1).await.unwrap();
    let client = reqwest::Client::new();
    for _ in 0..20 {
        let r = client.get(format!("http://127.0.0.1:{plain_port}/")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.headers().get("set-cookie").is_none(), "the plain plugin's request got a session cookie");
        let r = client.get(format!("http://127.0.0.1:{sticky_port}/")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.headers().get("set-cookie").is_some(), "the sticky plugin's new session got no cookie");
    }
}

/// Envoy removes a client's `x-equilibrio-upstream` before any filter runs (early header mutation), so even a request
/// the filter keeps no state for cannot steer the override-host balancer. Here the HTTP filter runs the poller's root,
/// which has no per-request state: the header reaches the router untouched unless the connection manager stripped it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_strips_a_client_upstream_header_before_any_filter() {
    let (backends, table) = backends_and_table(&[100, 100, 100], Value::Null).await;
    let rendered =
        equilibrio_tests::envoy::render_config(&filter_config(&table, "500ms", json!({})), table.addr()).unwrap();
    let mut edited = String::new();
    let mut http_filter_roots = 0;
    for line in rendered.lines() {
        if line.trim() == "root_id: equilibrio" {
            http_filter_roots += 1;
            edited.push_str(&line.replace("root_id: equilibrio", "root_id: equilibrio_poller"));
        } else {
            edited.push_str(line);
        }
        edited.push('\n');
    }
    assert_eq!(http_filter_roots, 1, "the shipped config has one HTTP filter root");
    let proxy = Proxy::Envoy(equilibrio_tests::envoy::Envoy::start_with(&edited).await.unwrap());
    proxy.wait_for_table(3, 1).await.unwrap();
    let client = reqwest::Client::new();
    let target = backends[2].addr.to_string();
    let mut counts = std::collections::BTreeMap::new();
    for _ in 0..60 {
        let r = client.get(proxy.url("/")).header("x-equilibrio-upstream", &target).send().await.unwrap();
        assert_eq!(r.status(), 200);
        *counts.entry(r.text().await.unwrap()).or_insert(0usize) += 1;
    }
    // the fallback round robin spreads them; a followed header would send all 60 to av-3
    assert!(counts.len() == 3 && counts.values().all(|&n| n >= 10), "{counts:?}");
}

async fn sticky_sessions_pin_and_a_tampered_cookie_is_ignored(kind: Kind) {
    let policy = json!({"sticky_sessions": {"enabled": true, "secret": SECRET, "ttl": 600, "secure": false}});
    let s = setup(kind, &[100, 100, 100], policy, json!({}), "500ms").await;
    let first = s.client.get(s.proxy.url("/")).send().await.unwrap();
    let set = first.headers().get("set-cookie").expect("a new session gets a cookie").to_str().unwrap().to_string();
    let pinned = first.text().await.unwrap();
    assert!(set.starts_with("AGENTE_VENDEDOR_SESSION="), "{set}");
    assert!(
        set.contains("Max-Age=600")
            && set.contains("Path=/")
            && set.contains("HttpOnly")
            && set.contains("SameSite=Lax"),
        "{set}"
    );
    assert!(!set.contains("127.0.0.1"), "the cookie must not carry an address: {set}");
    let cookie = set.split(';').next().unwrap().to_string();
    // pinned across connections (and so across workers)
    for _ in 0..30 {
        let fresh = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
        let r = fresh.get(s.proxy.url("/")).header("cookie", &cookie).send().await.unwrap();
        assert_eq!(r.text().await.unwrap(), pinned);
    }
    // tampered: flip the last character of the signature; the request is served normally and re-issued
    let mut forged = cookie.clone();
    let last = forged.pop().unwrap();
    forged.push(if last == 'A' { 'B' } else { 'A' });
    let mut served = std::collections::BTreeSet::new();
    for _ in 0..9 {
        let r = s.client.get(s.proxy.url("/")).header("cookie", &forged).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.headers().get("set-cookie").is_some(), "a tampered cookie is treated as absent");
        served.insert(r.text().await.unwrap());
    }
    assert!(served.len() > 1, "a forged cookie does not pin: {served:?}");
    // garbage cookie: never an error
    let r = s.client.get(s.proxy.url("/")).header("cookie", "AGENTE_VENDEDOR_SESSION=%%%garbage").send().await.unwrap();
    assert_eq!(r.status(), 200);
}

async fn rate_limit_answers_429_after_the_burst_for_both_workers(kind: Kind) {
    let policy = json!({"rate_limiting": {"enabled": true, "requests_per_minute": 1, "burst_size": 5}});
    let s = setup(kind, &[100, 100], policy, json!({}), "500ms").await;
    let mut ok = 0;
    let mut limited = None;
    for _ in 0..20 {
        // a new connection each time, spread over both workers
        let fresh = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
        let r = fresh.get(s.proxy.url("/")).send().await.unwrap();
        match r.status().as_u16() {
            200 => ok += 1,
            429 => limited = Some(r),
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(ok, 5, "exactly the burst passes, whichever worker serves");
    let r = limited.expect("429 after the burst");
    let h = r.headers();
    assert_eq!(h.get("retry-after").unwrap(), "60");
    assert_eq!(h.get("ratelimit-policy").unwrap(), "\"default\";q=1;w=60");
    assert!(h.get("ratelimit").unwrap().to_str().unwrap().starts_with("\"default\";r=0;t="));
    // the kernel may hand 20 connections to one worker: more connections until both have served, each refused (the
    // bucket is shared)
    let mut per_worker = s.proxy.worker_connections().await;
    for _ in 0..40 {
        if per_worker.len() == 2 && per_worker.iter().all(|c| *c > 0) {
            break;
        }
        let fresh = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
        assert_eq!(fresh.get(s.proxy.url("/")).send().await.unwrap().status(), 429, "past the burst, on any worker");
        per_worker = s.proxy.worker_connections().await;
    }
    assert!(per_worker.len() == 2 && per_worker.iter().all(|c| *c > 0), "both workers serve: {per_worker:?}");
    // counted in the filter's metric once the poller has flushed
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.proxy.stat("wasmcustom.equilibrio_rate_limited_total").await.unwrap_or(0) < 15 {
        assert!(Instant::now() < deadline, "rate-limited metric not updated");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn a_killed_backend_costs_no_request_and_is_ejected(kind: Kind) {
    let s = setup(kind, &[100, 100, 100], Value::Null, json!({"passive_health": {"base_ejection_time": 30}}), "500ms")
        .await;
    let url = s.proxy.url("/");
    let client = s.client.clone();
    let traffic = tokio::spawn(async move { load(&client, &url, 3000, 8).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.backends[1].kill();
    let results = traffic.await.unwrap();
    let failed: Vec<_> = results.iter().filter(|(st, _)| *st != 200).collect();
    assert!(failed.is_empty(), "{} failed requests: {:?}", failed.len(), &failed[..failed.len().min(5)]);
    // ejected: the metric says so, and new traffic avoids it without retries
    let name = "wasmcustom.equilibrio_endpoint_av_2_ejected";
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.proxy.stat(name).await != Some(1) {
        assert!(Instant::now() < deadline, "av-2 not reported as ejected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let retries_before = s.proxy.stat("cluster.backend.upstream_rq_retry").await.unwrap_or(0);
    let after = load(&s.client, &s.proxy.url("/"), 300, 4).await;
    assert!(after.iter().all(|(st, _)| *st == 200));
    assert_eq!(
        s.proxy.stat("cluster.backend.upstream_rq_retry").await.unwrap_or(0),
        retries_before,
        "no more retries: ejected"
    );
    assert!(s.proxy.log().contains("ejected endpoint av-2"));
}

async fn a_table_change_applies_within_two_poll_periods(kind: Kind) {
    let s = setup(kind, &[100, 100, 100], Value::Null, json!({}), "1s").await;
    let eps: Vec<Value> = s
        .backends
        .iter()
        .map(|b| endpoint(&b.id, b.addr, 100, if b.id == "av-3" { "unhealthy" } else { "healthy" }))
        .collect();
    let changed = Instant::now();
    s.table.update(Some(eps), None);
    let applied = loop {
        let results = load(&s.client, &s.proxy.url("/"), 20, 2).await;
        if !by_body(&results).contains_key("av-3") {
            break changed.elapsed();
        }
        assert!(changed.elapsed() < Duration::from_secs(10), "table change never applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(applied <= Duration::from_secs(2), "applied after {applied:?}");
    // and it stays applied
    let results = load(&s.client, &s.proxy.url("/"), 300, 4).await;
    assert!(!by_body(&results).contains_key("av-3"));
}

async fn a_bad_table_keeps_the_last_good_one_and_is_counted(kind: Kind) {
    let s = setup(kind, &[100, 100], Value::Null, json!({}), "500ms").await;
    s.table.set_bad_answer(Some((200, "{not json".into())));
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.proxy.stat("wasmcustom.equilibrio_table_errors_malformed_total").await.unwrap_or(0) < 2 {
        assert!(Instant::now() < deadline, "malformed answers not counted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s.table.set_bad_answer(Some((503, "down".into())));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let results = load(&s.client, &s.proxy.url("/"), 200, 4).await;
    let counts = by_body(&results);
    // each worker's sequence is exact; two workers may each be one pick apart
    let av1 = counts.get("av-1").copied().unwrap_or(0);
    assert!(
        (98..=102).contains(&av1) && av1 + counts.get("av-2").copied().unwrap_or(0) == 200,
        "still balanced on the last good table: {counts:?}"
    );
    assert!(s.proxy.stat("wasmcustom.equilibrio_table_errors_http_status_total").await.unwrap_or(0) >= 1);
    // logged once per change of condition, not once per poll
    let log = s.proxy.log();
    assert_eq!(log.matches("endpoint table refused (malformed)").count(), 1, "{log}");
}

async fn reports_reach_the_supervisor(kind: Kind) {
    // the real supervisor (not the stand-in): what the proxy reports is what its API counts, per instance
    let backends = [Backend::start("av-1").await.unwrap(), Backend::start("av-2").await.unwrap()];
    let instances: Vec<String> = backends.iter().map(|b| format!("{{id: {}, address: '{}'}}", b.id, b.addr)).collect();
    let supervisor = Supervisor::start(&format!(
        "services:\n  {SERVICE}:\n    health_check: {{interval: 200ms, timeout: 100ms, rise: 1}}\n    instances: [{}]\n",
        instances.join(", ")
    ))
    .await
    .unwrap();
    for b in &backends {
        supervisor.wait_state(SERVICE, &b.id, "healthy", Duration::from_secs(5)).await.unwrap();
    }
    let cfg = json!({"service": SERVICE, "supervisor": {"cluster": "supervisor", "authority": supervisor.addr.to_string(),
        "poll_period": "500ms", "token": TOKEN}});
    let proxy = Proxy::start(kind, &cfg, supervisor.addr).await.unwrap();
    let version =
        supervisor.get(&format!("/v1/services/{SERVICE}/endpoints")).await.unwrap()["version"].as_u64().unwrap();
    proxy.wait_for_table(2, version).await.unwrap();
    let client = reqwest::Client::new();
    let results = load(&client, &proxy.url("/"), 400, 4).await;
    let sent = by_body(&results);
    assert_eq!(sent.values().sum::<usize>(), 400, "{sent:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let v = supervisor.get(&format!("/v1/services/{SERVICE}/instances")).await.unwrap();
        let counted: std::collections::BTreeMap<String, usize> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                (i["id"].as_str().unwrap().to_string(), i["traffic"]["requests_total"].as_u64().unwrap_or(0) as usize)
            })
            .collect();
        if counted == sent {
            let traffic = &v[0]["traffic"];
            assert!(traffic["latency_p95_ms"].is_number(), "{traffic}");
            break;
        }
        assert!(Instant::now() < deadline, "the supervisor counted {counted:?}, the backends served {sent:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let prom = proxy.prometheus().await;
    assert!(prom.contains("equilibrio_endpoint_av_1_requests_total"), "per-endpoint metrics exposed");
    assert!(prom.contains("equilibrio_table_version"));
}

async fn an_invalid_configuration_is_refused_with_our_message(kind: Kind) {
    let table = TableServer::start(SERVICE, vec![], Value::Null).await.unwrap();
    let cfg = filter_config(&table, "500ms", json!({"sticky_sessions": {"ttl": "forever"}}));
    let (ok, log) = Proxy::start_expecting_failure(kind, &cfg, table.addr()).await.unwrap();
    assert!(!ok, "the proxy must refuse the plugin");
    assert!(log.contains("equilibrio: invalid configuration: `sticky_sessions.ttl`"), "{log}");
}

async fn only_the_first_two_sticky_cookies_are_checked(kind: Kind) {
    let policy = json!({"sticky_sessions": {"enabled": true, "secret": SECRET, "ttl": 600, "secure": false}});
    let s = setup(kind, &[100, 100, 100], policy, json!({}), "500ms").await;
    let first = s.client.get(s.proxy.url("/")).send().await.unwrap();
    let cookie = first.headers()["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_string();
    let pinned = first.text().await.unwrap();
    let forged = "AGENTE_VENDEDOR_SESSION=bm9wZQ.9999999999.AAAA";
    let served = |header: String| {
        let (client, url) = (s.client.clone(), s.proxy.url("/"));
        async move {
            let mut by = std::collections::BTreeMap::new();
            for _ in 0..30 {
                let body = client.get(&url).header("cookie", &header).send().await.unwrap().text().await.unwrap();
                *by.entry(body).or_insert(0usize) += 1;
            }
            by
        }
    };
    // the valid cookie second (a browser's path-scoped duplicate): checked, pinned
    let second = served(format!("{forged}; {cookie}")).await;
    assert_eq!(second.get(&pinned), Some(&30), "{second:?}");
    // behind two forged values (or 600: each would cost an HMAC): not looked at, balanced as a new session
    let third = served(format!("{forged}; {forged}; {cookie}")).await;
    assert!(third.len() == 3, "the third value was checked: {third:?}");
    let many = served(format!("{}{cookie}", format!("{forged}; ").repeat(600))).await;
    assert!(many.len() == 3, "{many:?}");
}

async fn a_draining_endpoint_keeps_its_sticky_sessions_only(kind: Kind) {
    let policy = json!({"sticky_sessions": {"enabled": true, "secret": SECRET, "secure": false}});
    let s = setup(kind, &[100, 100, 100], policy, json!({}), "500ms").await;
    let first = s.client.get(s.proxy.url("/")).send().await.unwrap();
    let cookie = first.headers()["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_string();
    let pinned = first.text().await.unwrap();
    let eps: Vec<Value> = s
        .backends
        .iter()
        .map(|b| endpoint(&b.id, b.addr, 100, if b.id == pinned { "draining" } else { "healthy" }))
        .collect();
    s.table.update(Some(eps), None);
    s.proxy.wait_for_table(3, 2).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await; // EDS and the workers' tick
    for _ in 0..30 {
        let r = s.client.get(s.proxy.url("/")).header("cookie", &cookie).send().await.unwrap();
        assert_eq!(r.text().await.unwrap(), pinned, "a draining endpoint keeps its sessions");
    }
    let fresh = load(&s.client, &s.proxy.url("/"), 60, 4).await;
    let counts = by_body(&fresh);
    assert!(!counts.contains_key(&pinned), "no new session on a draining endpoint: {counts:?}");
}

/// The sum of a per-endpoint stat over the endpoints `av-1` .. `av-n`.
async fn endpoint_sum(proxy: &Proxy, n: usize, suffix: &str) -> u64 {
    let mut sum = 0;
    for i in 1..=n {
        sum += proxy.stat(&format!("wasmcustom.equilibrio_endpoint_av_{i}_{suffix}")).await.unwrap_or(0);
    }
    sum
}

/// The filter drops a request's state at its end (`proxy_on_log`): requests the clients abandon while the backend
/// still works on them must end too, or their in-flight counts would stay forever.
async fn abandoned_requests_still_end_their_accounting(kind: Kind) {
    let s = setup(kind, &[100, 100], Value::Null, json!({}), "500ms").await;
    let impatient = reqwest::Client::builder().timeout(Duration::from_secs(6)).build().unwrap();
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let (client, url) = (impatient.clone(), s.proxy.url("/slow?ms=20000"));
        clients.spawn(async move { client.get(url).send().await.is_err() });
    }
    // the gauge follows within a worker tick and a poll period
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let in_flight = endpoint_sum(&s.proxy, 2, "in_flight").await;
        if in_flight == 10 {
            break;
        }
        assert!(Instant::now() < deadline, "{in_flight} of the ten requests showed as in flight");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    while let Some(gave_up) = clients.join_next().await {
        assert!(gave_up.unwrap(), "the client gave up before the answer");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (in_flight, ended) =
            (endpoint_sum(&s.proxy, 2, "in_flight").await, endpoint_sum(&s.proxy, 2, "requests_total").await);
        if in_flight == 0 && ended == 10 {
            break;
        }
        assert!(Instant::now() < deadline, "after the clients left: {in_flight} in flight, {ended} of 10 ended");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Publishes `endpoints` as table `version` and waits until the proxy's workers and its cluster have it.
async fn publish(s: &Setup, endpoints: Vec<Value>, version: u64) {
    s.table.update(Some(endpoints), None);
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.proxy.stat("wasmcustom.equilibrio_table_version").await != Some(version) {
        assert!(Instant::now() < deadline, "table {version} not applied");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await; // EDS and the workers' tick
}

/// Zone-aware locality: a proxy in zone `a`, three endpoints in `a` (av-1..3) and three in `b` (av-4..6), under
/// steady traffic. All healthy: everything stays in `a`. Two of a's three die: a keeps min(1, c/t) = (1/4)/(1/2) =
/// 50%. All of a dies: everything goes to b. No request fails in any transition (the retry after the in-zone one
/// leaves the zone).
async fn zones_keep_traffic_local_and_spill_by_the_formula(kind: Kind) {
    let extra = json!({"zone": "a", "passive_health": {"base_ejection_time": 30}});
    let s = setup(kind, &[100; 6], Value::Null, extra, "500ms").await;
    let zoned = |down: &[&str]| -> Vec<Value> {
        s.backends
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let mut e =
                    endpoint(&b.id, b.addr, 100, if down.contains(&b.id.as_str()) { "unhealthy" } else { "healthy" });
                e["zone"] = json!(if i < 3 { "a" } else { "b" });
                e
            })
            .collect()
    };
    let in_a = |counts: &std::collections::BTreeMap<String, usize>| -> f64 {
        let total: usize = counts.values().sum();
        ["av-1", "av-2", "av-3"].iter().map(|id| counts.get(*id).copied().unwrap_or(0)).sum::<usize>() as f64
            / total as f64
    };
    publish(&s, zoned(&[]), 2).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut steady = load_until(&s.client, &s.proxy.url("/"), 4, &stop);

    let counts = by_body(&load(&s.client, &s.proxy.url("/"), 600, 16).await);
    assert_eq!(in_a(&counts), 1.0, "all in zone a while it has its share: {counts:?}");

    s.backends[1].kill();
    s.backends[2].kill();
    publish(&s, zoned(&["av-2", "av-3"]), 3).await;
    let counts = by_body(&load(&s.client, &s.proxy.url("/"), 2000, 16).await);
    let got = in_a(&counts);
    assert!((got - 0.5).abs() <= 0.05, "zone a keeps (1/4)/(1/2) = 50%, got {got:.3}: {counts:?}");

    s.backends[0].kill();
    publish(&s, zoned(&["av-1", "av-2", "av-3"]), 4).await;
    let counts = by_body(&load(&s.client, &s.proxy.url("/"), 600, 16).await);
    assert_eq!(in_a(&counts), 0.0, "all in zone b once a is down: {counts:?}");

    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut all = Vec::new();
    while let Some(done) = steady.join_next().await {
        all.extend(done.unwrap());
    }
    let failed: Vec<_> = all.iter().filter(|(st, _)| *st != 200).collect();
    assert!(all.len() > 100, "steady traffic ran: {}", all.len());
    assert!(failed.is_empty(), "{} of {} failed: {:?}", failed.len(), all.len(), &failed[..failed.len().min(5)]);
}

/// The breaker: av-6 of six answers 503 on every other request. Success-rate detection (over 2 s intervals, from
/// every worker's counts) ejects it and no other; after its ejection time it is half-open and only the configured
/// trial request reaches it per round (each fails while it keeps failing, and re-opens it for longer); once it answers
/// again, a trial closes the breaker and it takes its share again.
async fn a_breaker_ejects_by_success_rate_and_lets_only_trials_through(kind: Kind) {
    let extra = json!({"passive_health": {
        "interval": "2s", "base_ejection_time": "2s", "consecutive_5xx": 1000, "half_open_trials": 1,
    }});
    let s = setup(kind, &[100; 6], Value::Null, extra, "500ms").await;
    s.backends[5].fail_every(2);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut steady = load_until(&s.client, &s.proxy.url("/"), 8, &stop);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !s.proxy.log().contains("ejected endpoint av-6") {
        assert!(Instant::now() < deadline, "av-6 not ejected:\n{}", s.proxy.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ejected_at = Instant::now();
    s.backends[5].fail_every(1);
    let log = s.proxy.log();
    let ejection = log.lines().find(|l| l.contains("ejected endpoint av-6")).unwrap_or_default();
    assert!(ejection.contains("below the others' threshold"), "ejected by success rate: {ejection}");
    for id in ["av-1", "av-2", "av-3", "av-4", "av-5"] {
        assert!(!log.contains(&format!("ejected endpoint {id}")), "{id} is not an outlier: {log}");
    }
    // requests already on their way when it was ejected
    tokio::time::sleep(Duration::from_millis(500)).await;
    let settled = s.backends[5].hits();
    // open 2 s, a trial (fails: open 4 s), a trial (fails: open 6 s): two requests in the next 7 s
    tokio::time::sleep(Duration::from_millis(7000).saturating_sub(ejected_at.elapsed())).await;
    let trials = s.backends[5].hits() - settled;
    assert!((1..=2).contains(&trials), "{trials} requests reached the half-open endpoint; one trial per round");
    assert!(s.proxy.log().contains("ejected endpoint av-6 again: its trial request failed"), "{}", s.proxy.log());
    // it answers again: the next trial (about 12 s after the ejection) closes the breaker
    s.backends[5].fail_every(0);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !s.proxy.log().contains("endpoint av-6 recovered") {
        assert!(Instant::now() < deadline, "av-6 never recovered:\n{}", s.proxy.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await; // every worker's tick
    let counts = by_body(&load(&s.client, &s.proxy.url("/"), 1200, 16).await);
    let back = share(&counts, "av-6", 1200);
    assert!((0.10..=0.25).contains(&back), "av-6 takes its share again: {back:.3} {counts:?}");
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    while steady.join_next().await.is_some() {}
}

/// The concurrency limit: two requests in flight per endpoint across the proxy's workers. Ten slow requests at once on
/// three endpoints: six are served (two per endpoint), four are answered 503 with `Retry-After` at once.
async fn a_concurrency_limit_passes_over_full_endpoints_then_answers_503(kind: Kind) {
    let extra = json!({"circuit_breaker": {"max_requests_per_endpoint": 2}});
    let s = setup(kind, &[100, 100, 100], Value::Null, extra, "500ms").await;
    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let (client, url) = (s.client.clone(), s.proxy.url("/slow?ms=1500"));
        requests.spawn(async move {
            let started = Instant::now();
            let r = client.get(url).send().await.unwrap();
            let retry_after = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
            (r.status().as_u16(), retry_after, r.text().await.unwrap(), started.elapsed())
        });
    }
    let mut served: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
    let mut refused = 0;
    while let Some(done) = requests.join_next().await {
        let (status, retry_after, body, took) = done.unwrap();
        match status {
            200 => *served.entry(body).or_default() += 1,
            503 => {
                refused += 1;
                assert_eq!(retry_after.as_deref(), Some("1"), "{body}");
                assert!(body.contains("\"overloaded\""), "{body}");
                assert!(took < Duration::from_millis(1000), "refused at once, took {took:?}");
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(refused, 4, "{served:?}");
    assert!(served.len() == 3 && served.values().all(|&n| n == 2), "two per endpoint: {served:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.proxy.stat("wasmcustom.equilibrio_overloaded_total").await != Some(4) {
        assert!(Instant::now() < deadline, "overloaded_total not 4");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Request-aware routes, with the shipped example policy (`proxy-config/agente-vendedor-routes.json`) and a write
/// limit of 3: `/search` hashed on the query to the `search` pool (av-1, av-2), `/recommend` by least connections to
/// the `reco` pool (av-3, av-4), writes limited harder than reads, anything else to every endpoint.
async fn routes_send_each_request_to_its_pool(kind: Kind) {
    let text = std::fs::read_to_string(equilibrio_tests::repo_root().join("proxy-config/agente-vendedor-routes.json"))
        .unwrap();
    let mut policy: Value = serde_json::from_str(&text).unwrap();
    policy["routes"][2]["rate_limiting"] = json!({"requests_per_minute": 60, "burst_size": 3});
    let s = setup(kind, &[100; 4], Value::Null, json!({}), "500ms").await;
    let eps: Vec<Value> = s
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let mut e = endpoint(&b.id, b.addr, 100, "healthy");
            e["tags"] = json!([if i < 2 { "search" } else { "reco" }]);
            e
        })
        .collect();
    s.table.update(Some(eps), Some(policy));
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.proxy.stat("wasmcustom.equilibrio_table_version").await != Some(2) {
        assert!(Instant::now() < deadline, "table 2 not applied");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await; // EDS and the workers' tick

    let mut search = std::collections::BTreeMap::new();
    for q in 0..40 {
        let url = s.proxy.url(&format!("/search?q=item{q}"));
        let first = s.client.get(&url).send().await.unwrap().text().await.unwrap();
        for _ in 0..3 {
            assert_eq!(s.client.get(&url).send().await.unwrap().text().await.unwrap(), first, "q=item{q}");
        }
        *search.entry(first).or_insert(0) += 1;
    }
    assert!(search.keys().all(|b| b == "av-1" || b == "av-2") && search.len() == 2, "search pool: {search:?}");
    let reco = by_body(&load(&s.client, &s.proxy.url("/recommend?user=7"), 200, 8).await);
    assert!(reco.keys().all(|b| b == "av-3" || b == "av-4") && reco.len() == 2, "reco pool: {reco:?}");
    let other = by_body(&load(&s.client, &s.proxy.url("/home"), 400, 8).await);
    assert_eq!(other.len(), 4, "no route: every endpoint: {other:?}");

    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(s.client.post(s.proxy.url("/cart")).body("x").send().await.unwrap().status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429], "writes are limited (burst 3)");
    let reads = load(&s.client, &s.proxy.url("/home"), 20, 1).await;
    assert!(reads.iter().all(|(st, _)| *st == 200), "reads are not");
}

/// `round_robin` ignores weights: 1, 2, 3 get a third each.
async fn round_robin_ignores_weights(kind: Kind) {
    let s = setup(kind, &[1, 2, 3], json!({"algorithm": "round_robin"}), json!({}), "500ms").await;
    let counts = by_body(&load(&s.client, &s.proxy.url("/"), 3000, 32).await);
    for b in &s.backends {
        let got = share(&counts, &b.id, 3000);
        assert!((got - 1.0 / 3.0).abs() <= 0.03, "{} got {got:.3}: {counts:?}", b.id);
    }
}

/// `random` (weighted) spreads equal weights evenly in expectation.
async fn random_spreads_by_weight(kind: Kind) {
    let s = setup(kind, &[100, 100, 200], json!({"algorithm": "random"}), json!({}), "500ms").await;
    let counts = by_body(&load(&s.client, &s.proxy.url("/"), 4000, 16).await);
    for (b, want) in s.backends.iter().zip([0.25, 0.25, 0.5]) {
        let got = share(&counts, &b.id, 4000);
        assert!((got - want).abs() <= 0.05, "{} got {got:.3}, want {want}: {counts:?}", b.id);
    }
}

/// The algorithms that look at load send less to a slow endpoint (av-3 answers 40 ms late, the others at once).
async fn a_slow_endpoint_gets_less(kind: Kind, algorithm: &str) {
    let s = setup(kind, &[100, 100, 100], json!({"algorithm": algorithm}), json!({}), "500ms").await;
    s.backends[2].delay(40);
    // warm up (response_time learns latencies), then measure
    load(&s.client, &s.proxy.url("/"), 300, 12).await;
    let counts = by_body(&load(&s.client, &s.proxy.url("/"), 1500, 12).await);
    let slow = share(&counts, "av-3", 1500);
    assert!(slow < 0.15, "{algorithm}: the slow endpoint got {slow:.3} (a third without load awareness): {counts:?}");
}

async fn least_connections_sends_less_to_a_slow_endpoint(kind: Kind) {
    a_slow_endpoint_gets_less(kind, "least_connections").await;
}

async fn response_time_sends_less_to_a_slow_endpoint(kind: Kind) {
    a_slow_endpoint_gets_less(kind, "response_time").await;
}

/// `ip_hash` keeps a client on one endpoint; different clients spread. Clients are told apart by the
/// X-Forwarded-For entry one hop in front of the proxy (`xff_trusted_hops: 1`).
async fn ip_hash_keeps_a_client_on_one_endpoint(kind: Kind) {
    let policy = json!({"algorithm": "ip_hash", "rate_limiting": {"xff_trusted_hops": 1}});
    let s = setup(kind, &[100, 100, 100], policy, json!({}), "500ms").await;
    let mut used = std::collections::BTreeSet::new();
    for c in 0..30 {
        let client_ip = format!("203.0.113.{c}");
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..4 {
            let r = s.client.get(s.proxy.url("/")).header("x-forwarded-for", &client_ip).send().await.unwrap();
            seen.insert(r.text().await.unwrap());
        }
        assert_eq!(seen.len(), 1, "{client_ip} moved: {seen:?}");
        used.extend(seen);
    }
    assert_eq!(used.len(), 3, "clients spread: {used:?}");
}

/// `consistent_hash` keeps a key on its endpoint; removing one of four endpoints moves only that endpoint's keys,
/// about a quarter.
async fn consistent_hash_keeps_keys_and_a_removal_moves_about_one_in_n(kind: Kind) {
    let policy = json!({"algorithm": "consistent_hash", "consistent_hash": {"key": "header:x-user"}});
    let s = setup(kind, &[100; 4], policy, json!({}), "500ms").await;
    let placement = |s: &Setup| {
        let (client, url) = (s.client.clone(), s.proxy.url("/"));
        async move {
            let mut at = Vec::new();
            for u in 0..200 {
                let r = client.get(&url).header("x-user", format!("user-{u}")).send().await.unwrap();
                at.push(r.text().await.unwrap());
            }
            at
        }
    };
    let before = placement(&s).await;
    assert_eq!(placement(&s).await, before, "the same key, the same endpoint");
    let removed = "av-4";
    let eps: Vec<Value> =
        s.backends.iter().filter(|b| b.id != removed).map(|b| endpoint(&b.id, b.addr, 100, "healthy")).collect();
    publish(&s, eps, 2).await;
    let after = placement(&s).await;
    let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
    for (k, (b, a)) in before.iter().zip(&after).enumerate() {
        assert!(b == a || b == removed, "user-{k} moved from {b} to {a}, though {b} stayed");
    }
    let share_moved = moved as f64 / 200.0;
    assert!((0.12..=0.40).contains(&share_moved), "{moved} of 200 keys moved (about 1/4 expected)");
}

/// Each scenario, once per proxy: `envoy::<name>` and `host::<name>`.
macro_rules! on_both_proxies {
    ($($name:ident),* $(,)?) => {
        mod envoy {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                super::$name(super::Kind::Envoy).await
            })*
        }
        mod host {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                super::$name(super::Kind::Host).await
            })*
        }
    };
}

on_both_proxies!(
    equal_weights_spread_within_two_percent,
    weights_one_two_three_within_three_percent,
    a_client_cannot_pick_the_upstream,
    sticky_sessions_pin_and_a_tampered_cookie_is_ignored,
    rate_limit_answers_429_after_the_burst_for_both_workers,
    a_killed_backend_costs_no_request_and_is_ejected,
    a_table_change_applies_within_two_poll_periods,
    a_bad_table_keeps_the_last_good_one_and_is_counted,
    reports_reach_the_supervisor,
    an_invalid_configuration_is_refused_with_our_message,
    a_draining_endpoint_keeps_its_sticky_sessions_only,
    only_the_first_two_sticky_cookies_are_checked,
    abandoned_requests_still_end_their_accounting,
    zones_keep_traffic_local_and_spill_by_the_formula,
    a_breaker_ejects_by_success_rate_and_lets_only_trials_through,
    a_concurrency_limit_passes_over_full_endpoints_then_answers_503,
    routes_send_each_request_to_its_pool,
    round_robin_ignores_weights,
    random_spreads_by_weight,
    least_connections_sends_less_to_a_slow_endpoint,
    response_time_sends_less_to_a_slow_endpoint,
    ip_hash_keeps_a_client_on_one_endpoint,
    consistent_hash_keeps_keys_and_a_removal_moves_about_one_in_n,
);
