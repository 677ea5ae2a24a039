//! The bundled proxy's own behaviour, beyond the filter scenarios it shares with Envoy: configuration and module
//! errors, a trapping filter, unsupported host calls, the properties it gives, what forwarding changes, limits, HTTP/2,
//! retries on the next listed host, and draining on SIGTERM. Uses the probe filter (`tests/probe-filter`).

// test code: a failed unwrap is a failed test
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::time::Duration;

use equilibrio_tests::backend::Backend;
use equilibrio_tests::host::Host;
use equilibrio_tests::repo_root;
use serde_json::Value;

fn probe_wasm() -> String {
    let path = repo_root().join("target/wasm32-wasip1/release/equilibrio_probe_filter.wasm");
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --release --target wasm32-wasip1 -p equilibrio-probe-filter` (scripts/test does)",
        path.display()
    );
    path.display().to_string()
}

/// A host config with the probe filter routing to `upstreams`, and `listener` keys added.
fn config(upstreams: &str, listener: &str) -> String {
    format!(
        r#"
listener: {{address: 127.0.0.1:0, drain_timeout: 5s{listener}}}
admin: {{address: 127.0.0.1:0}}
route: {{cluster: backend, timeout: 5s, retries: 2}}
clusters: {{backend: {{connect_timeout: 1s}}}}
http_filters:
- name: probe
  root_id: probe
  vm_id: probe
  file: {}
  configuration: "{upstreams}"
"#,
        probe_wasm()
    )
}

async fn stat(host: &Host, name: &str) -> Option<u64> {
    let text = reqwest::get(format!("http://{}/stats", host.admin)).await.ok()?.text().await.ok()?;
    text.lines().find_map(|l| l.strip_prefix(&format!("{name}: ")).and_then(|v| v.trim().parse().ok()))
}

fn url(host: &Host, path: &str) -> String {
    format!("http://{}{path}", host.listener)
}

#[tokio::test]
async fn bad_configuration_module_or_filter_stops_the_start_with_a_message() {
    let (ok, log) =
        Host::start_expecting_failure("listener: {adress: 127.0.0.1:0}\nclusters: {backend: {}}").await.unwrap();
    assert!(!ok);
    assert!(log.contains("invalid configuration: `listener.adress`: unknown field"), "{log}");

    let dir = repo_root().join("target/equilibrio-tests");
    std::fs::create_dir_all(&dir).unwrap();
    let junk = dir.join("not-a-module.wasm");
    std::fs::write(&junk, "this is not wasm").unwrap();
    let (ok, log) = Host::start_expecting_failure(&config("", "").replace(&probe_wasm(), &junk.display().to_string()))
        .await
        .unwrap();
    assert!(!ok);
    assert!(log.contains("`http_filters[0].file`") && log.contains("is not a valid wasm module"), "{log}");

    let (ok, log) = Host::start_expecting_failure(&config("refuse", "")).await.unwrap();
    assert!(!ok);
    assert!(log.contains("probe: refusing configuration `refuse`"), "the filter's own log line: {log}");
    assert!(log.contains("plugin `probe`: the filter refused its configuration"), "{log}");
}

#[tokio::test]
async fn a_trapping_filter_costs_that_request_a_503_and_is_recreated() {
    let b = Backend::start("av-1").await.unwrap();
    let host = Host::start_with(&config(&b.addr.to_string(), ""), 1).await.unwrap();
    let client = reqwest::Client::new();
    assert_eq!(client.get(url(&host, "/")).send().await.unwrap().text().await.unwrap(), "av-1");
    let r = client.get(url(&host, "/")).header("x-probe", "trap").send().await.unwrap();
    assert_eq!(r.status(), 503);
    for _ in 0..5 {
        let r = client.get(url(&host, "/")).send().await.unwrap();
        assert_eq!(r.status(), 200, "the proxy stays up and the filter is back");
        assert_eq!(r.headers()["x-probe-response-status"], "200");
    }
    assert_eq!(stat(&host, "wasm.probe.vm_restarts").await, Some(1));
    let log = host.log();
    assert!(log.contains("trapped") && log.contains("re-created"), "{log}");
}

#[tokio::test]
async fn host_calls_it_does_not_support_answer_unimplemented() {
    let host = Host::start_with(&config("", ""), 1).await.unwrap();
    let r = reqwest::Client::new().get(url(&host, "/")).header("x-probe", "unsupported").send().await.unwrap();
    assert_eq!(r.status(), 200);
    // the spec's Unimplemented is 12
    for h in ["x-grpc-status", "x-queue-status", "x-future-status"] {
        assert_eq!(r.headers()[h], "12", "{h}");
    }
}

#[tokio::test]
async fn properties_are_the_ones_envoy_gives() {
    let host = Host::start_with(&config("", ""), 1).await.unwrap();
    let r = reqwest::Client::new().get(url(&host, "/p?x=1")).header("x-probe", "properties").send().await.unwrap();
    let body = r.text().await.unwrap();
    let props: std::collections::BTreeMap<&str, &str> = body.lines().filter_map(|l| l.split_once('=')).collect();
    assert!(props["source.address"].starts_with("127.0.0.1:"), "{body}");
    assert_eq!(props["destination.address"], host.listener.to_string());
    assert_eq!(props["request.path"], "/p?x=1");
    assert_eq!(props["request.method"], "GET");
    assert_eq!(props["request.host"], host.listener.to_string());
    assert_eq!(props["request.protocol"], "HTTP/1.1");
    assert_eq!(props["plugin_name"], "probe");
    assert_eq!(props["plugin_root_id"], "probe");
    assert_eq!(props["plugin_vm_id"], "probe");
    assert_eq!(props["no.such.property"], "<none>");
}

#[tokio::test]
async fn forwarding_sets_forwarded_headers_and_drops_hop_by_hop_and_client_routing() {
    let a = Backend::start("av-1").await.unwrap();
    let other = Backend::start("av-2").await.unwrap();
    let host = Host::start_with(&config(&a.addr.to_string(), ""), 1).await.unwrap();
    let client = reqwest::Client::new();
    let r = client
        .get(url(&host, "/echo-headers"))
        .header("connection", "x-secret")
        .header("x-secret", "1")
        .header("x-forwarded-for", "10.0.0.1")
        .header("x-equilibrio-upstream", other.addr.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-backend"], "av-1", "a client's x-equilibrio-upstream never routes");
    let seen: Value = r.json().await.unwrap();
    assert_eq!(seen["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert!(seen.get("x-secret").is_none() && seen.get("connection").is_none(), "hop-by-hop removed: {seen}");
    assert!(seen.get("x-equilibrio-upstream").is_none(), "the routing header is not forwarded: {seen}");
    assert_eq!(other.hits(), 0);

    // a filter's local reply, through the response phase
    let r = client.get(url(&host, "/")).header("x-probe", "reply").send().await.unwrap();
    assert_eq!(r.status(), 418);
    assert_eq!(r.headers()["x-probe-reply"], "yes");
    assert_eq!(r.headers()["x-probe-response-status"], "418");
    assert_eq!(r.text().await.unwrap(), "short and stout");
}

#[tokio::test]
async fn a_dead_host_moves_the_request_to_the_next_listed_one() {
    let live = Backend::start("av-1").await.unwrap();
    // nothing listens on the first address
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let host = Host::start_with(&config(&format!("{dead},{}", live.addr), ""), 1).await.unwrap();
    let client = reqwest::Client::new();
    for _ in 0..20 {
        let r = client.post(url(&host, "/")).body("a body").send().await.unwrap();
        assert_eq!(r.status(), 200, "a connect failure is retried, body and all");
    }
    assert!(stat(&host, "cluster.backend.upstream_rq_retry").await.unwrap() >= 10);
    assert!(stat(&host, "cluster.backend.upstream_cx_connect_fail").await.unwrap() >= 10);

    // no host at all answers: 503 with Envoy's wording
    let host = Host::start_with(&config(&dead.to_string(), ""), 1).await.unwrap();
    let r = client.get(url(&host, "/")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["x-probe-response-status"], "503", "the filter sees the failure");
    assert!(r.text().await.unwrap().starts_with("upstream connect error"));
}

/// The retry budget (Envoy's `retry_budget`): with no room for retries, a dead first host fails the request and counts
/// a retry overflow; a retry waits a jittered backoff first.
#[tokio::test]
async fn retries_stay_within_their_budget_and_wait_a_jittered_backoff() {
    let live = Backend::start("av-1").await.unwrap();
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let upstreams = format!("{dead},{}", live.addr);
    let with_retry =
        |retry: &str| config(&upstreams, "").replace("retries: 2}", &format!("retries: 2, retry: {{{retry}}}}}"));
    let client = reqwest::Client::new();

    // the probe lists the dead host first on every other request
    let host = Host::start_with(&with_retry("budget_percent: 0, min_concurrency: 0"), 1).await.unwrap();
    let mut statuses = Vec::new();
    for _ in 0..10 {
        statuses.push(client.get(url(&host, "/")).send().await.unwrap().status().as_u16());
    }
    assert_eq!(statuses.iter().filter(|s| **s == 503).count(), 5, "no budget: no retry: {statuses:?}");
    assert_eq!(stat(&host, "cluster.backend.upstream_rq_retry_overflow").await, Some(5));
    assert_eq!(stat(&host, "cluster.backend.upstream_rq_retry").await.unwrap_or(0), 0);

    // each retry waits uniformly below 200 ms: 30 of them wait about 3 s together (below 1 s: about one chance in
    // 10^10)
    let host = Host::start_with(&with_retry("backoff_base: 200ms, backoff_max: 200ms"), 1).await.unwrap();
    let started = std::time::Instant::now();
    for _ in 0..60 {
        assert_eq!(client.get(url(&host, "/")).send().await.unwrap().status(), 200);
    }
    assert!(started.elapsed() > std::time::Duration::from_secs(1), "retries waited: {:?}", started.elapsed());
    assert_eq!(stat(&host, "cluster.backend.upstream_rq_retry").await, Some(30));
}

/// A backend that answers the first request of each connection and closes the connection when a second one arrives,
/// as a server whose keep-alive timeout just expired does.
async fn one_request_per_connection_backend() -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match c.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = c.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
                // the next request is read, then the connection closes unanswered
                let _ = c.read(&mut buf).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_closing_a_pooled_connection_costs_no_request() {
    let backend = one_request_per_connection_backend().await;
    // one host only: there is no next host to move to
    let host = Host::start_with(&config(&backend.to_string(), ""), 1).await.unwrap();
    let client = reqwest::Client::new();
    for i in 0..10 {
        let r = client.get(url(&host, "/")).send().await.unwrap();
        assert_eq!(r.status(), 200, "request {i}");
        assert_eq!(r.text().await.unwrap(), "ok");
    }
}

// blocking sockets below: the backend needs another runtime thread
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_get_431_and_extra_connections_are_closed() {
    let b = Backend::start("av-1").await.unwrap();
    let host = Host::start_with(&config(&b.addr.to_string(), ", max_request_headers_kb: 8, max_connections: 3"), 1)
        .await
        .unwrap();
    let r = reqwest::Client::new().get(url(&host, "/")).header("x-big", "a".repeat(10_000)).send().await.unwrap();
    assert_eq!(r.status(), 431);

    let request = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n";
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut c = std::net::TcpStream::connect(host.listener).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(request).unwrap();
        let mut buf = [0u8; 512];
        let n = c.read(&mut buf).unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf[..n]));
        open.push(c);
    }
    let mut extra = std::net::TcpStream::connect(host.listener).unwrap();
    extra.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = extra.write_all(request);
    let mut buf = [0u8; 64];
    assert!(matches!(extra.read(&mut buf), Ok(0) | Err(_)), "the 4th connection is closed unanswered");
    assert_eq!(
        stat(&host, &format!("listener.127.0.0.1_{}.downstream_cx_overflow", host.listener.port())).await,
        Some(1)
    );
    drop(open);
}

// blocking sockets below: the backend needs another runtime thread
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_heads_and_idle_connections_are_closed() {
    let b = Backend::start("av-1").await.unwrap();
    let host =
        Host::start_with(&config(&b.addr.to_string(), ", header_read_timeout: 1s, idle_timeout: 3s"), 1).await.unwrap();
    let started = std::time::Instant::now();
    // slowloris: a head that never ends
    let mut slow = std::net::TcpStream::connect(host.listener).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n").unwrap();
    // a well-behaved keep-alive client that then goes quiet
    let mut idle = std::net::TcpStream::connect(host.listener).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    let mut buf = [0u8; 512];
    assert!(idle.read(&mut buf).unwrap() > 0);

    let mut buf = [0u8; 64];
    assert!(matches!(slow.read(&mut buf), Ok(0) | Err(_)));
    let head_closed = started.elapsed();
    assert!(head_closed < Duration::from_millis(2900), "closed {head_closed:?} into the head (timeout 1 s)");
    assert!(matches!(idle.read(&mut buf), Ok(0) | Err(_)));
    let idle_closed = started.elapsed();
    assert!(idle_closed >= Duration::from_secs(3), "not before the idle timeout: {idle_closed:?}");
}

#[tokio::test]
async fn http2_clients_are_served() {
    let b = Backend::start("av-1").await.unwrap();
    let host = Host::start_with(&config(&b.addr.to_string(), ""), 1).await.unwrap();
    let client = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    for _ in 0..10 {
        let r = client.get(url(&host, "/")).send().await.unwrap();
        assert_eq!(r.version(), reqwest::Version::HTTP_2);
        assert_eq!(r.text().await.unwrap(), "av-1");
    }
}

#[tokio::test]
async fn sigterm_stops_accepting_and_drains_in_flight_requests() {
    let b = Backend::start("av-1").await.unwrap();
    let mut host = Host::start_with(&config(&b.addr.to_string(), ""), 2).await.unwrap();
    let slow = tokio::spawn(reqwest::get(url(&host, "/slow?ms=1500")));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = std::process::Command::new("kill").args(["-TERM", &host.pid().to_string()]).status().unwrap();
    assert!(status.success());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(std::net::TcpStream::connect(host.listener).is_err(), "no new connections once draining");
    let r = slow.await.unwrap().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "av-1", "the in-flight request completes");
    let exit = host.wait_exit(Duration::from_secs(10)).await.expect("exits after draining");
    assert!(exit.success(), "{exit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_goes_silent_mid_body_is_cut_off_at_the_idle_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // sends its headers and 7 bytes of a 100-byte body, then nothing, holding the connection
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = c.read(&mut buf).await;
                let _ = c.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n1234567").await;
                tokio::time::sleep(Duration::from_secs(60)).await;
            });
        }
    });
    let cfg = config(&backend.to_string(), "").replace(
        "route: {cluster: backend, timeout: 5s, retries: 2}",
        "route: {cluster: backend, timeout: 5s, retries: 2, idle_timeout: 1s}",
    );
    let host = Host::start_with(&cfg, 1).await.unwrap();
    let started = std::time::Instant::now();
    let r = reqwest::get(url(&host, "/")).await.unwrap();
    assert_eq!(r.status(), 200, "the headers came");
    let body = tokio::time::timeout(Duration::from_secs(10), r.bytes()).await;
    assert!(body.is_ok(), "the client is still held after 10 s");
    assert!(body.unwrap().is_err(), "a body cut short must not look complete");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900), "cut before the idle timeout: {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_that_loops_or_leaks_is_stopped_and_the_worker_serves_on() {
    let b = Backend::start("av-1").await.unwrap();
    // one worker: if the loop held it, nothing else would be served
    let cfg = format!("{}wasm: {{max_memory_mb: 96, callback_timeout: 200ms}}\n", config(&b.addr.to_string(), ""));
    let host = Host::start_with(&cfg, 1).await.unwrap();
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let probe = |action: &'static str| {
        let (client, url) = (client.clone(), url(&host, "/"));
        async move {
            let started = std::time::Instant::now();
            let r = client.get(url).header("x-probe", action).send().await.expect("an answer, not a hang");
            (r.status().as_u16(), r.text().await.unwrap_or_default(), started.elapsed())
        }
    };
    let (status, _, took) = probe("loop").await;
    assert!(status >= 500, "the looping request gets a 5xx, got {status}");
    assert!(took < Duration::from_secs(5), "stopped after {took:?}");
    let (status, body, _) = probe("none").await;
    assert_eq!((status, body.as_str()), (200, "av-1"), "the worker serves on after the loop");
    // 16 MiB a request against a 96 MiB limit: stopped within a few requests, never grows the proxy without bound
    let mut stopped = false;
    for _ in 0..10 {
        let (status, _, _) = probe("leak").await;
        if status >= 500 {
            stopped = true;
            break;
        }
    }
    assert!(stopped, "the leak was never stopped");
    let (status, body, _) = probe("none").await;
    assert_eq!((status, body.as_str()), (200, "av-1"), "a fresh VM serves after the leak");
    assert!(stat(&host, "wasm.probe.vm_restarts").await.unwrap_or(0) >= 2, "both VMs were re-created");
}

/// Sends `raw` on a new connection and reads until the proxy closes it (or 5 s).
fn exchange(host: &Host, raw: &[u8]) -> String {
    let mut c = std::net::TcpStream::connect(host.listener).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(raw).unwrap();
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

// blocking sockets below: the backend needs another runtime thread
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_shapes_get_400_bare_lf_heads_and_overflowing_chunk_sizes() {
    let b = Backend::start("av-1").await.unwrap();
    let host = Host::start_with(&config(&b.addr.to_string(), ""), 1).await.unwrap();

    // a bare LF ends a header line: a front proxy splitting at CRLF sees one header, we would see two
    let bare = b"GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    let got = exchange(&host, bare);
    assert!(got.starts_with("HTTP/1.1 400"), "{got}");
    // as the request line's end, and in a request pipelined after a valid one with a body
    let got = exchange(&host, b"GET / HTTP/1.1\nHost: x\r\n\r\n");
    assert!(got.starts_with("HTTP/1.1 400"), "{got}");
    let pipelined =
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\na\nb\nGET / HTTP/1.1\r\nHost: x\nA: 1\r\n\r\n";
    let got = exchange(&host, pipelined);
    assert!(got.starts_with("HTTP/1.1 200") && got.matches("HTTP/1.1 ").count() == 2, "{got}");
    assert!(got.contains("HTTP/1.1 400"), "the second request is refused: {got}");
    assert_eq!(b.hits(), 1, "only the valid request reached the backend");

    // a chunk size that overflows: the client's fault (400), not the upstream's (503)
    let overflow =
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFFFFFF\r\nabc\r\n0\r\n\r\n";
    let got = exchange(&host, overflow);
    assert!(got.starts_with("HTTP/1.1 400"), "{got}");
    assert_eq!(stat(&host, "http.ingress.downstream_cx_protocol_error").await, Some(1));

    // valid requests on the same proxy are untouched, bodies with LFs included
    let ok =
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\na\nb\r\n0\r\n\r\n";
    let got = exchange(&host, ok);
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
}

/// One panic while serving a request costs that request a 500 (counted), not the worker nor the process: with one
/// worker, the next requests on the same and on new connections are served. (Fault injection is test-only.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_request_costs_only_that_request() {
    let b = Backend::start("av-1").await.unwrap();
    let host = Host::start_with_env(&config(&b.addr.to_string(), ""), 1, &[("EQUILIBRIO_FAULT_INJECTION", "1")])
        .await
        .unwrap();
    let client = reqwest::Client::builder().pool_max_idle_per_host(1).build().unwrap();
    for _ in 0..3 {
        let r = client.get(url(&host, "/")).header("x-equilibrio-fault", "panic").send().await.unwrap();
        assert_eq!(r.status(), 500);
        let r = client.get(url(&host, "/")).send().await.unwrap();
        assert_eq!(r.status(), 200, "the same worker serves the next request");
    }
    assert_eq!(stat(&host, "http.ingress.handler_panics").await, Some(3));
    assert_eq!(reqwest::get(url(&host, "/")).await.unwrap().status(), 200, "a new connection too");
    assert!(host.log().contains("a request panicked"), "{}", host.log());
}
