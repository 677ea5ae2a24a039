//! The real supervisor binary with real HTTP instances (and real Envoy): health checking, the management API over a
//! socket, restarts and `kill -9`, graceful shutdown, and the proxies consuming its tables.

// test code: a failed unwrap is a failed test
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use equilibrio_tests::backend::Backend;
use equilibrio_tests::envoy::Envoy;
use equilibrio_tests::supervisor::{Supervisor, TOKEN, binary};
use equilibrio_tests::{by_body, load};
use serde_json::json;

fn service_yaml(backends: &[Backend], health: &str) -> String {
    let instances: Vec<String> =
        backends.iter().map(|b| format!("{{id: {}, address: '{}', zone: local}}", b.id, b.addr)).collect();
    format!(
        "environment: development\nservices:\n  agente-vendedor:\n    health_check: {health}\n    instances: [{}]\n",
        instances.join(", ")
    )
}

async fn backends(n: usize) -> Vec<Backend> {
    let mut v = Vec::new();
    for i in 1..=n {
        v.push(Backend::start(&format!("av-{i}")).await.unwrap());
    }
    v
}

/// 300 requests through `url` reach each of the three backends 95 to 105 times.
async fn assert_even_thirds(client: &reqwest::Client, url: &str, b: &[Backend]) {
    let counts = by_body(&load(client, url, 300, 4).await);
    assert_eq!(counts.values().sum::<usize>(), 300, "{counts:?}");
    for x in b {
        let n = counts.get(&x.id).copied().unwrap_or(0);
        assert!((95..=105).contains(&n), "{counts:?}");
    }
}

/// Waits (up to 5 s) until `id`'s drain is done: nothing of it in flight, as the proxies report.
async fn wait_drain_done(s: &Supervisor, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let v = s.get("/v1/services/agente-vendedor/instances").await.unwrap();
        let inst = v.as_array().unwrap().iter().find(|i| i["id"] == id).unwrap().clone();
        if inst["drain"]["done_ms"].is_u64() {
            break;
        }
        assert!(Instant::now() < deadline, "drain never completed: {inst}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_become_healthy_and_a_dead_one_is_noticed_in_time() {
    let b = backends(3).await;
    // interval 200 ms, timeout 100 ms, 2 failures
    let s =
        Supervisor::start(&service_yaml(&b, "{interval: 200ms, timeout: 100ms, retries: 2, rise: 1}")).await.unwrap();
    for x in &b {
        s.wait_state("agente-vendedor", &x.id, "healthy", Duration::from_secs(5)).await.unwrap();
    }
    let killed = Instant::now();
    b[1].kill();
    let took = s.wait_state("agente-vendedor", "av-2", "unhealthy", Duration::from_secs(5)).await.unwrap();
    // within interval x retries + timeout (plus the jitter of one interval and scheduling)
    assert!(killed.elapsed() <= Duration::from_millis(200 * 2 + 100 + 300), "noticed after {took:?}");
    // the others stay healthy, and the check latency is recorded
    let v = s.get("/v1/services/agente-vendedor/instances").await.unwrap();
    let healthy: Vec<_> = v.as_array().unwrap().iter().filter(|i| i["state"] == "healthy").collect();
    assert_eq!(healthy.len(), 2);
    assert!(healthy[0]["check_latency_ms"].as_f64().unwrap() < 100.0);
    // the transition is an event, in the SSE stream
    let mut resp = Supervisor::client().get(s.url("/v1/events")).bearer_auth(TOKEN).send().await.unwrap();
    let mut text = String::new();
    while !text.contains("\"unhealthy\"") {
        let chunk = tokio::time::timeout(Duration::from_secs(2), resp.chunk()).await.unwrap().unwrap().unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(text.contains("event: event") && text.contains("\"instance\":\"av-2\""), "{text}");
    // and a metric
    let metrics =
        Supervisor::client().get(s.url("/metrics")).bearer_auth(TOKEN).send().await.unwrap().text().await.unwrap();
    assert!(
        metrics.contains("equilibrio_supervisor_instances{service=\"agente-vendedor\",state=\"unhealthy\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_changes_survive_kill_9_and_a_corrupt_state_file_stops_the_start() {
    let b = backends(2).await;
    let mut s = Supervisor::start(&service_yaml(&b[..1], "{interval: 200ms, timeout: 100ms}")).await.unwrap();
    let (st, v) = s
        .call(
            "POST",
            "/v1/services/agente-vendedor/instances",
            Some(json!({"id": "av-2", "address": b[1].addr.to_string(), "tags": ["api"]})),
        )
        .await
        .unwrap();
    assert_eq!(st, 201, "{v}");
    assert_eq!(
        s.call("PUT", "/v1/services/agente-vendedor/instances/av-1", Some(json!({"weight": 30}))).await.unwrap().0,
        200
    );
    assert_eq!(
        s.call("PUT", "/v1/services/agente-vendedor/policy", Some(json!({"algorithm": "least_connections"})))
            .await
            .unwrap()
            .0,
        200
    );
    // without the token: refused
    let r = Supervisor::client().delete(s.url("/v1/services/agente-vendedor/instances/av-2")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let before = s.get("/v1/services/agente-vendedor/endpoints").await.unwrap();

    s.kill9();
    s.restart().await.unwrap();
    s.wait_state("agente-vendedor", "av-2", "healthy", Duration::from_secs(5)).await.unwrap();
    let after = s.get("/v1/services/agente-vendedor/endpoints").await.unwrap();
    assert_eq!(after["policy"]["algorithm"], "least_connections");
    let weight = |t: &serde_json::Value, id: &str| {
        t["endpoints"].as_array().unwrap().iter().find(|e| e["id"] == id).unwrap()["weight"].clone()
    };
    assert_eq!(weight(&after, "av-1"), 30);
    assert_eq!(after["endpoints"].as_array().unwrap().len(), 2);
    assert!(after["version"].as_u64() > before["version"].as_u64(), "versions rise across restarts");
    // the deployment's secret hash seed: in every table, kept across restarts (placement does not move), and
    // another deployment's differs (clients cannot know it to craft colliding keys)
    let seed = before["hash_seed"].as_str().unwrap().to_string();
    assert!(seed.len() == 16 && seed.bytes().all(|b| b.is_ascii_hexdigit()), "{seed}");
    assert_eq!(after["hash_seed"], seed.as_str());
    let other = Supervisor::start(&service_yaml(&b[..1], "{interval: 200ms, timeout: 100ms}")).await.unwrap();
    let theirs = other.get("/v1/services/agente-vendedor/endpoints").await.unwrap();
    assert_ne!(theirs["hash_seed"], seed.as_str());
    drop(other);
    let mode =
        std::fs::metadata(s.dir.join("state.json")).map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()));
    assert_eq!(mode.unwrap() & 0o777, 0o600, "the state file holds the secret: owner only");

    // a corrupt state file: refuses to start, says why, leaves the file alone
    s.kill9();
    let state = s.dir.join("state.json");
    std::fs::write(&state, b"{\"services\": {truncated").unwrap();
    let err = s.restart().await.unwrap_err().to_string();
    assert!(err.contains("corrupt") && err.contains("left untouched"), "{err}");
    assert_eq!(std::fs::read(&state).unwrap(), b"{\"services\": {truncated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_and_refusals_at_start() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let b = backends(2).await;
    let mut s = Supervisor::start(&service_yaml(&b[..1], "{interval: 1}")).await.unwrap();
    // a registration in flight when SIGTERM arrives (headers sent, body not yet): it finishes, is acknowledged, and is
    // in the state file for the next start
    let body = format!("{{\"id\": \"late\", \"address\": \"{}\"}}", b[1].addr);
    let mut conn = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let head = format!(
        "POST /v1/services/agente-vendedor/instances HTTP/1.1\r\nhost: {}\r\nauthorization: Bearer {TOKEN}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        s.addr,
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let pid = s.pid().unwrap();
    std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // not ready any more: a new connection is refused (the listener is closed)
    assert!(tokio::net::TcpStream::connect(s.addr).await.is_err(), "still accepting after SIGTERM");
    conn.write_all(body.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut answer)).await.unwrap().unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 201"), "the call in flight was not finished: {answer}");
    assert!(s.terminate(Duration::from_secs(10)), "SIGTERM ends it cleanly");
    s.restart().await.unwrap();
    let v = s.get("/v1/services/agente-vendedor/instances").await.unwrap();
    assert!(v.as_array().unwrap().iter().any(|i| i["id"] == "late"), "the acknowledged write survived: {v}");
    s.kill9();

    // a non-loopback listen address without a token is refused, naming the key
    let dir = std::env::temp_dir().join(format!("eq-sup-refuse-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("s.yaml");
    std::fs::write(&cfg, "listen: 0.0.0.0:9999\n").unwrap();
    let out = std::process::Command::new(binary().unwrap())
        .arg("--config")
        .arg(&cfg)
        .env_remove("EQUILIBRIO_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("`listen`") && stderr.contains("token"), "{stderr}");
    // a bad key is named
    std::fs::write(&cfg, "services:\n  av:\n    health_check: {interval: soon}\n").unwrap();
    let out = std::process::Command::new(binary().unwrap()).arg("--config").arg(&cfg).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("services.av.health_check.interval"));
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_and_the_filter_follow_the_supervisor() {
    let b = backends(3).await;
    let s =
        Supervisor::start(&service_yaml(&b, "{interval: 200ms, timeout: 100ms, retries: 2, rise: 1}")).await.unwrap();
    for x in &b {
        s.wait_state("agente-vendedor", &x.id, "healthy", Duration::from_secs(5)).await.unwrap();
    }
    let filter = json!({"service": "agente-vendedor",
        "supervisor": {"cluster": "supervisor", "authority": s.addr.to_string(), "poll_period": "500ms", "token": TOKEN}});
    let envoy = Envoy::start(&filter, s.addr).await.unwrap();
    let version = s.get("/v1/services/agente-vendedor/endpoints").await.unwrap()["version"].as_u64().unwrap();
    envoy.wait_for_table(3, version).await.unwrap();
    let client = reqwest::Client::new();
    assert_even_thirds(&client, &envoy.url("/"), &b).await;
    // drain av-3 through the API: no new traffic within two poll periods (plus EDS)
    let (st, v) = s.call("POST", "/v1/services/agente-vendedor/instances/av-3/drain", None).await.unwrap();
    assert_eq!((st, v["state"].as_str()), (200, Some("draining")));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let counts = by_body(&load(&client, &envoy.url("/"), 30, 2).await);
        if !counts.contains_key("av-3") {
            break;
        }
        assert!(Instant::now() < deadline, "still sending to a draining instance: {counts:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // the reports arrive: the supervisor sees the traffic per instance
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let v = s.get("/v1/services/agente-vendedor/instances").await.unwrap();
        let total: u64 =
            v.as_array().unwrap().iter().map(|i| i["traffic"]["requests_total"].as_u64().unwrap_or(0)).sum();
        if total >= 300 {
            break;
        }
        assert!(Instant::now() < deadline, "reports counted {total} requests");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // and once nothing is in flight the drain completes
    wait_drain_done(&s, "av-3").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_get_events_and_a_slow_instance_delays_no_other() {
    use axum::routing::post;
    // a webhook receiver that fails its first two calls: the supervisor must retry
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::<serde_json::Value>::new()));
    let failures = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (r2, f2) = (received.clone(), failures.clone());
    let hook = axum::Router::new().route(
        "/hook",
        post(move |body: axum::body::Bytes| {
            let (r, f) = (r2.clone(), f2.clone());
            async move {
                if f.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 2 {
                    return axum::http::StatusCode::SERVICE_UNAVAILABLE;
                }
                r.lock().unwrap().push(serde_json::from_slice(&body).unwrap_or_default());
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, hook).await });

    // four slow instances: accept connections and never answer (each check waits its whole 150 ms timeout)
    let mut slow_addrs = Vec::new();
    for _ in 0..4 {
        let slow = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        slow_addrs.push(slow.local_addr().unwrap());
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((sock, _)) = slow.accept().await {
                held.push(sock);
            }
        });
    }
    let slow_yaml: String =
        slow_addrs.iter().enumerate().map(|(i, a)| format!("{{id: slow-{i}, address: '{a}'}}, ")).collect();

    let b = backends(2).await;
    let yaml = format!(
        "webhooks: ['http://{hook_addr}/hook']\n{}",
        service_yaml(&b, "{interval: 200ms, timeout: 150ms, retries: 2, rise: 1}")
    )
    .replace("instances: [", &format!("instances: [{slow_yaml}"));
    let s = Supervisor::start(&yaml).await.unwrap();
    for i in 0..4 {
        s.wait_state("agente-vendedor", &format!("slow-{i}"), "unhealthy", Duration::from_secs(5)).await.unwrap();
    }
    for x in &b {
        s.wait_state("agente-vendedor", &x.id, "healthy", Duration::from_secs(5)).await.unwrap();
    }
    // the fast instances keep being checked every 200 ms while the slow ones time out: checked one after another,
    // a round would take 4 x 150 ms and they would get at most 4 checks in 2 s, not about 10
    let before: Vec<usize> = b.iter().map(Backend::hits).collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (x, n) in b.iter().zip(before) {
        let checks = x.hits() - n;
        assert!(checks >= 7, "{} was checked {checks} times in 2 s at a 200 ms interval", x.id);
    }
    let v = s.get("/v1/services/agente-vendedor/instances").await.unwrap();
    for i in v.as_array().unwrap().iter().filter(|i| !i["id"].as_str().unwrap().starts_with("slow")) {
        assert!(i["check_latency_ms"].as_f64().unwrap() < 50.0, "{i}");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let kinds: Vec<String> = received
            .lock()
            .unwrap()
            .iter()
            .map(|e| format!("{}:{}", e["kind"].as_str().unwrap_or(""), e["instance"].as_str().unwrap_or("")))
            .collect();
        if kinds.contains(&"healthy:av-1".to_string()) && kinds.contains(&"unhealthy:slow-0".to_string()) {
            break;
        }
        assert!(Instant::now() < deadline, "webhook got {kinds:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(failures.load(std::sync::atomic::Ordering::SeqCst) >= 3, "the failed deliveries were retried");
}

/// A private CA and a certificate it signed for 127.0.0.1: (CA PEM, leaf DER, leaf key DER).
fn test_ca() -> (String, Vec<u8>, Vec<u8>) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "equilibrio test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let mut leaf = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    leaf.subject_alt_names.push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_cert = leaf.signed_by(&leaf_key, &ca_cert, &ca_key).unwrap();
    (ca_cert.pem(), leaf_cert.der().to_vec(), leaf_key.serialize_der())
}

/// An HTTPS webhook receiver on loopback: every JSON body posted to it, and its address.
async fn https_receiver(
    cert: Vec<u8>,
    key: Vec<u8>,
) -> (std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>, std::net::SocketAddr) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio_rustls::rustls;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![rustls::pki_types::CertificateDer::from(cert)],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.into()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let r = received.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: axum::body::Bytes| {
            let r = r.clone();
            async move {
                r.lock().unwrap().push(serde_json::from_slice(&body).unwrap_or_default());
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                // a client that does not trust the certificate ends the handshake: nothing to serve
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let svc = hyper_util::service::TowerToHyperService::new(app);
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (received, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_webhooks_are_delivered_to_a_receiver_the_configured_ca_signed() {
    let (ca_pem, cert, key) = test_ca();
    let (received, hook) = https_receiver(cert, key).await;
    let dir = equilibrio_tests::work_dir("webhook-ca").unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, &ca_pem).unwrap();
    let b = backends(2).await;
    // one supervisor trusts the test CA, the other only the platform's roots (which never signed this receiver)
    let trusted = Supervisor::start(&format!(
        "webhooks: ['https://{hook}/hook']\nwebhook_ca_file: {}\n{}",
        ca_file.display(),
        service_yaml(&b[..1], "{interval: 200ms, timeout: 100ms, rise: 1}")
    ))
    .await
    .unwrap();
    let untrusted = Supervisor::start(&format!(
        "webhooks: ['https://{hook}/hook']\n{}",
        service_yaml(&b[1..], "{interval: 200ms, timeout: 100ms, rise: 1}")
    ))
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got: Vec<String> = received
            .lock()
            .unwrap()
            .iter()
            .map(|e| format!("{}:{}", e["kind"].as_str().unwrap_or(""), e["instance"].as_str().unwrap_or("")))
            .collect();
        if got.contains(&"healthy:av-1".to_string()) {
            break;
        }
        assert!(Instant::now() < deadline, "the https webhook got {got:?}\n{}", trusted.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // the untrusted one gives up after its retries and says why; nothing of its reached the receiver
    let deadline = Instant::now() + Duration::from_secs(15);
    while !untrusted.log().contains("webhook failed 6 times") {
        assert!(Instant::now() < deadline, "{}", untrusted.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = untrusted.log();
    assert!(log.contains("certificate") || log.contains("UnknownIssuer"), "{log}");
    assert!(!received.lock().unwrap().iter().any(|e| e["instance"] == "av-2"));
    // a CA file without a certificate is refused at start, naming the key
    let bad = dir.join("not-a-ca.pem");
    std::fs::write(&bad, "hello").unwrap();
    let cfg = dir.join("bad.yaml");
    std::fs::write(&cfg, format!("webhook_ca_file: {}\n", bad.display())).unwrap();
    let out = std::process::Command::new(binary().unwrap()).arg("--config").arg(&cfg).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("`webhook_ca_file`"), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bundled_proxy_follows_the_supervisor_end_to_end() {
    use equilibrio_tests::proxy::{Kind, Proxy};
    // no instance in the configuration: they arrive through the API
    let s = Supervisor::start(
        "environment: development\nservices:\n  agente-vendedor:\n    health_check: {interval: 200ms, timeout: 100ms, retries: 2, rise: 1}\n    instances: []\n",
    )
    .await
    .unwrap();
    let filter = json!({"service": "agente-vendedor",
        "supervisor": {"cluster": "supervisor", "authority": s.addr.to_string(), "poll_period": "500ms", "token": TOKEN}});
    let proxy = Proxy::start(Kind::Host, &filter, s.addr).await.unwrap();
    let b = backends(3).await;
    for x in &b {
        let (st, v) = s
            .call(
                "POST",
                "/v1/services/agente-vendedor/instances",
                Some(json!({"id": x.id, "address": x.addr.to_string()})),
            )
            .await
            .unwrap();
        assert_eq!(st, 201, "{v}");
    }
    for x in &b {
        s.wait_state("agente-vendedor", &x.id, "healthy", Duration::from_secs(5)).await.unwrap();
    }
    let version = s.get("/v1/services/agente-vendedor/endpoints").await.unwrap()["version"].as_u64().unwrap();
    proxy.wait_for_table(3, version).await.unwrap();
    // traffic follows: every registered instance gets its third
    let client = reqwest::Client::new();
    assert_even_thirds(&client, &proxy.url("/"), &b).await;
    // a drain empties an instance: no new request reaches it, and the drain completes
    let (st, _) = s.call("POST", "/v1/services/agente-vendedor/instances/av-3/drain", None).await.unwrap();
    assert_eq!(st, 200);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let counts = by_body(&load(&client, &proxy.url("/"), 30, 2).await);
        if !counts.contains_key("av-3") && counts.values().sum::<usize>() == 30 {
            break;
        }
        assert!(Instant::now() < deadline, "still sending to a draining instance: {counts:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let hits = b[2].hits();
    let counts = by_body(&load(&client, &proxy.url("/"), 60, 2).await);
    assert!(!counts.contains_key("av-3"), "{counts:?}");
    assert!(b[2].hits() - hits <= 2, "only health checks reach the drained instance");
    wait_drain_done(&s, "av-3").await;
    // a policy change applies: with ip_hash, every request of this one client goes to one instance
    let (st, v) =
        s.call("PUT", "/v1/services/agente-vendedor/policy", Some(json!({"algorithm": "ip_hash"}))).await.unwrap();
    assert_eq!(st, 200, "{v}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let counts = by_body(&load(&client, &proxy.url("/"), 40, 2).await);
        if counts.len() == 1 && counts.values().sum::<usize>() == 40 {
            assert!(!counts.contains_key("av-3"), "{counts:?}");
            break;
        }
        assert!(Instant::now() < deadline, "the policy change did not apply: {counts:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_registrations_and_reports_are_refused_naming_the_field() {
    let b = backends(1).await;
    let mut s =
        Supervisor::start(&service_yaml(&b, "{interval: 200ms, timeout: 100ms, retries: 2, rise: 1}")).await.unwrap();
    let register = |body: serde_json::Value| {
        let s = &s;
        async move { s.call("POST", "/v1/services/agente-vendedor/instances", Some(body)).await.unwrap() }
    };
    // a zone that would make a table no proxy takes (600 KB): refused, not accepted and frozen in every proxy
    let (st, e) = register(json!({"id": "big", "address": "127.0.0.1:9", "zone": "z".repeat(600_000)})).await;
    assert_eq!((st, e["error"]["field"].as_str()), (422, Some("zone")), "{e}");
    let (st, e) = register(json!({"id": "tags", "address": "127.0.0.1:9", "tags": vec!["t"; 100]})).await;
    assert_eq!((st, e["error"]["field"].as_str()), (422, Some("tags")), "{e}");
    // one backend, one spelling: the same address written differently is the same address
    let port = b[0].addr.port();
    for other in [format!("127.0.0.1:0{port}"), format!("[::ffff:127.0.0.1]:{port}")] {
        let (st, e) = register(json!({"id": "twin", "address": other})).await;
        assert_eq!((st, e["error"]["field"].as_str()), (409, Some("address")), "{other}: {e}");
    }
    for bad in ["127.0.0.1:0", "0.0.0.0:8080", "255.255.255.255:80"] {
        let (st, e) = register(json!({"id": "nowhere", "address": bad})).await;
        assert_eq!((st, e["error"]["field"].as_str()), (422, Some("address")), "{bad}: {e}");
    }

    // reports: overflowing numbers are refused whole; unknown endpoints are not kept
    s.wait_state("agente-vendedor", "av-1", "healthy", Duration::from_secs(5)).await.unwrap();
    let report = |endpoints: serde_json::Value| json!({"service": "agente-vendedor", "proxy": "attacker", "window_ms": 1000, "endpoints": endpoints});
    let huge = report(json!([{"id": "av-1", "requests": u64::MAX, "errors": 0, "in_flight": 0}]));
    let (st, e) = s.call("POST", "/v1/reports", Some(huge)).await.unwrap();
    assert_eq!((st, e["error"]["field"].as_str()), (422, Some("endpoints[0].requests")), "{e}");
    let made_up: Vec<serde_json::Value> =
        (0..500).map(|n| json!({"id": format!("ghost-{n}"), "requests": 1, "errors": 0})).collect();
    let (st, _) = s.call("POST", "/v1/reports", Some(report(json!(made_up)))).await.unwrap();
    assert_eq!(st, 204);
    let metrics =
        Supervisor::client().get(s.url("/metrics")).bearer_auth(TOKEN).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("equilibrio_supervisor_reports_refused_total 1"), "{metrics}");
    assert!(metrics.contains("equilibrio_supervisor_report_unknown_endpoints_total 500"), "{metrics}");
    let v = s.get("/v1/services/agente-vendedor/instances").await.unwrap();
    assert_eq!(v[0]["traffic"]["requests_total"], 0, "the refused report left nothing: {v}");

    // the state file holds the sticky secret: its owner's only; a write a crash interrupted is cleaned up
    let (st, _) = register(json!({"id": "ok", "address": "127.0.0.1:9"})).await;
    assert_eq!(st, 201);
    use std::os::unix::fs::PermissionsExt;
    let state = s.dir.join("state.json");
    assert_eq!(std::fs::metadata(&state).unwrap().permissions().mode() & 0o777, 0o600);
    s.kill9();
    let leftover = s.dir.join(".state.json.tmp-4242");
    std::fs::write(&leftover, b"{\"services\": {half").unwrap();
    s.restart().await.unwrap();
    assert!(!leftover.exists(), "the crash leftover is still there");
    assert_eq!(s.get("/v1/services/agente-vendedor/instances").await.unwrap().as_array().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_misses_its_heartbeat_is_removed_and_one_that_keeps_it_stays() {
    let s = Supervisor::start("environment: development\nservices:\n  av: {}\n").await.unwrap();
    for id in ["quiet", "alive"] {
        let body = json!({"id": id, "address": format!("127.0.0.{}:8080", if id == "quiet" { 2 } else { 3 }), "heartbeat_ttl": 1});
        assert_eq!(s.call("POST", "/v1/services/av/instances", Some(body)).await.unwrap().0, 201);
    }
    let started = Instant::now();
    let ids = || async {
        let v = s.get("/v1/services/av/instances").await.unwrap();
        v.as_array().unwrap().iter().map(|i| i["id"].as_str().unwrap().to_string()).collect::<Vec<_>>()
    };
    while ids().await.contains(&"quiet".to_string()) {
        assert!(started.elapsed() < Duration::from_secs(3), "not removed after missing its heartbeat");
        assert_eq!(s.call("POST", "/v1/services/av/instances/alive/heartbeat", None).await.unwrap().0, 204);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(started.elapsed() >= Duration::from_millis(900), "removed before its TTL");
    assert_eq!(ids().await, vec!["alive".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_do_not_follow_redirects() {
    use axum::routing::get;
    let b = backends(1).await;
    // an instance that answers its health check with a redirect to a healthy host: it must not borrow that health
    let target = format!("http://{}/health", b[0].addr);
    let redirector = axum::Router::new().route(
        "/health",
        get(move || {
            let target = target.clone();
            async move { (axum::http::StatusCode::FOUND, [(axum::http::header::LOCATION, target)]) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, redirector).await });
    let yaml = service_yaml(&b, "{interval: 200ms, timeout: 100ms, retries: 2, rise: 1}")
        .replace("instances: [", &format!("instances: [{{id: borrower, address: '{addr}'}}, "));
    let s = Supervisor::start(&yaml).await.unwrap();
    s.wait_state("agente-vendedor", "av-1", "healthy", Duration::from_secs(5)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let v = s.get("/v1/services/agente-vendedor/instances").await.unwrap();
    let borrower = v.as_array().unwrap().iter().find(|i| i["id"] == "borrower").unwrap();
    assert_eq!(borrower["state"], "unhealthy", "{borrower}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_a_rebound_dns_name_cannot_change_anything() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = equilibrio_tests::work_dir("supervisor-no-token").unwrap();
    let port = equilibrio_tests::supervisor::free_port().unwrap();
    let cfg = dir.join("s.yaml");
    std::fs::write(&cfg, format!("listen: 127.0.0.1:{port}\nservices:\n  av:\n    instances: []\n")).unwrap();
    /// Kills the supervisor when the test ends, passed or failed.
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _child = Killed(
        std::process::Command::new(binary().unwrap())
            .arg("--config")
            .arg(&cfg)
            .env_remove("EQUILIBRIO_TOKEN")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{port}");
    let start = Instant::now();
    while !reqwest::get(format!("{base}/livez")).await.is_ok_and(|r| r.status().is_success()) {
        assert!(start.elapsed() < Duration::from_secs(10), "the supervisor did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // what a page on attacker.example sends once its name resolves to 127.0.0.1
    let post = |host: String, id: &str, p: u16| {
        let body = format!("{{\"id\": \"{id}\", \"address\": \"127.0.0.1:{p}\"}}");
        async move {
            let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            let req = format!(
                "POST /v1/services/av/instances HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            c.write_all(req.as_bytes()).await.unwrap();
            let mut answer = String::new();
            c.read_to_string(&mut answer).await.unwrap();
            answer
        }
    };
    let refused = post(format!("attacker.example:{port}"), "evil", 1).await;
    assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
    let accepted = post(format!("127.0.0.1:{port}"), "mine", 2).await;
    assert!(accepted.starts_with("HTTP/1.1 201"), "{accepted}");
    // another site's page posting a form to 127.0.0.1 (the Host is loopback, the Origin is not): no drain
    let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let form = format!(
        "POST /v1/services/av/instances/mine/drain HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\norigin: http://attacker.example\r\ncontent-type: text/plain\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    );
    c.write_all(form.as_bytes()).await.unwrap();
    let mut answer = String::new();
    c.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    // nor read the topology (instance addresses)
    let read = |host: String| async move {
        let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let req = format!("GET /v1/services/av/instances HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
        c.write_all(req.as_bytes()).await.unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).await.unwrap();
        answer
    };
    let refused = read(format!("attacker.example:{port}")).await;
    assert!(refused.starts_with("HTTP/1.1 403") && !refused.contains("127.0.0.1:2"), "{refused}");
    let shown = read(format!("localhost:{port}")).await;
    assert!(shown.starts_with("HTTP/1.1 200") && shown.contains("127.0.0.1:2"), "{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_reads_need_it_too_unless_public_reads_is_set() {
    let b = backends(1).await;
    let yaml = service_yaml(&b, "{interval: 200ms, timeout: 100ms}");
    let s = Supervisor::start(&yaml).await.unwrap();
    let plain = Supervisor::client();
    for path in ["/v1/services", "/v1/services/agente-vendedor/instances", "/v1/events", "/metrics"] {
        let r = plain.get(s.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
        assert!(!r.text().await.unwrap().contains(&b[0].addr.to_string()), "{path} shows an address");
    }
    for path in ["/livez", "/readyz", "/", "/openapi.json"] {
        assert_eq!(plain.get(s.url(path)).send().await.unwrap().status(), 200, "{path}");
    }
    let v = s.get("/v1/services/agente-vendedor/instances").await.unwrap();
    assert_eq!(v[0]["address"], b[0].addr.to_string(), "with the token: {v}");
    drop(s);
    let open = Supervisor::start(&format!("public_reads: true\n{yaml}")).await.unwrap();
    let r = plain.get(open.url("/v1/services/agente-vendedor/instances")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = plain.get(open.url("/v1/services/agente-vendedor/endpoints")).send().await.unwrap();
    assert_eq!(r.status(), 401, "the table carries the sticky secret: never public");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_are_cut_off_and_others_are_served() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let b = backends(1).await;
    let yaml = format!("header_read_timeout: 1s\nmax_connections: 50\n{}", service_yaml(&b, "{interval: 1}"));
    let s = Supervisor::start(&yaml).await.unwrap();
    // 100 clients that send part of a request head and then nothing (twice the connection cap)
    let mut slow = Vec::new();
    for _ in 0..100 {
        let mut c = tokio::net::TcpStream::connect(s.addr).await.unwrap();
        c.write_all(b"GET /livez HTTP/1.1\r\nhost: 127.0.0.1\r\nx-slow: ").await.unwrap();
        slow.push(c);
    }
    // a real client still gets its answer: each slow one is cut off after the header read timeout
    let start = Instant::now();
    let ok = tokio::time::timeout(Duration::from_secs(10), reqwest::get(s.url("/livez"))).await;
    assert!(ok.is_ok_and(|r| r.is_ok_and(|r| r.status().is_success())), "not served beside the slow clients");
    eprintln!("served after {:?} beside 100 slowloris connections", start.elapsed());
    // and every slow connection is closed by the server (read gives end of file or an error), not held
    for (i, c) in slow.iter_mut().enumerate() {
        let mut buf = [0u8; 512];
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match c.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    // hyper may answer 408 first
                    Ok(_) => continue,
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "slow connection {i} is still open");
    }
}

/// An instance registered at a proxy's own listener address would send the proxy's traffic back to itself (the attack
/// run saw 40 requests become 54). The proxies answer the supervisor's health checks with a mark, so such an instance
/// is never healthy and never gets a request.
async fn an_instance_at_the_proxys_own_address_is_never_healthy(kind: equilibrio_tests::proxy::Kind) {
    use equilibrio_tests::proxy::Proxy;
    let b = backends(1).await;
    let s = Supervisor::start(&service_yaml(&b, "{interval: 1s, timeout: 500ms, retries: 1, rise: 1}")).await.unwrap();
    s.wait_state("agente-vendedor", "av-1", "healthy", Duration::from_secs(5)).await.unwrap();
    let filter = json!({"service": "agente-vendedor",
        "supervisor": {"cluster": "supervisor", "authority": s.addr.to_string(), "poll_period": "500ms", "token": TOKEN}});
    let proxy = Proxy::start(kind, &filter, s.addr).await.unwrap();
    let own = proxy.url("").trim_start_matches("http://").to_string();
    let (st, v) = s
        .call("POST", "/v1/services/agente-vendedor/instances", Some(json!({"id": "loop", "address": own})))
        .await
        .unwrap();
    assert_eq!(st, 201, "{v}");
    // three check intervals: a proxy answering 200 for its backend would have been healthy after the first
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let v = s.get("/v1/services/agente-vendedor/instances").await.unwrap();
    let state = v.as_array().unwrap().iter().find(|i| i["id"] == "loop").unwrap()["state"].clone();
    assert_eq!(state, "unhealthy", "{v}");
    assert!(s.log().contains("routing loop"), "the operator is told why:\n{}", s.log());
    let version = s.get("/v1/services/agente-vendedor/endpoints").await.unwrap()["version"].as_u64().unwrap();
    proxy.wait_for_table(2, version).await.unwrap();
    let before = proxy.stat("http.ingress.downstream_rq_total").await.unwrap_or(0);
    let client = reqwest::Client::new();
    let counts = by_body(&load(&client, &proxy.url("/"), 40, 2).await);
    assert_eq!(counts.get("av-1"), Some(&40), "{counts:?}");
    let after = proxy.stat("http.ingress.downstream_rq_total").await.unwrap_or(0);
    // the 40, and at most the loop instance's health checks meanwhile: no request came back through the proxy
    assert!(after - before <= 42, "{} proxy requests for 40", after - before);
}

mod loop_guard {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn envoy() {
        super::an_instance_at_the_proxys_own_address_is_never_healthy(equilibrio_tests::proxy::Kind::Envoy).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn host() {
        super::an_instance_at_the_proxys_own_address_is_never_healthy(equilibrio_tests::proxy::Kind::Host).await
    }
}

/// One panic in a request handler costs that request a 500 (counted, logged), not the process: the next request, on
/// the same supervisor, is served. (Release builds unwind; fault injection is test-only, from the environment.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_request_costs_only_that_request() {
    let b = backends(1).await;
    let yaml = service_yaml(&b, "{interval: 200ms, timeout: 100ms}");
    let s = Supervisor::start_with_env(&yaml, &[("EQUILIBRIO_FAULT_INJECTION", "1")]).await.unwrap();
    let client = Supervisor::client();
    for _ in 0..3 {
        let r = client
            .get(s.url("/v1/services"))
            .bearer_auth(TOKEN)
            .header("x-equilibrio-fault", "panic")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 500);
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "internal_error");
    }
    let v = s.get("/v1/services/agente-vendedor/instances").await.unwrap();
    assert_eq!(v[0]["id"], "av-1", "still serving: {v}");
    let metrics = client.get(s.url("/metrics")).bearer_auth(TOKEN).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("equilibrio_supervisor_handler_panics_total 3"), "{metrics}");
    assert!(s.log().contains("a request handler panicked"), "{}", s.log());
    // without the variable, the header does nothing
    let plain = Supervisor::start(&yaml).await.unwrap();
    let r = client.get(plain.url("/v1/services")).bearer_auth(TOKEN).header("x-equilibrio-fault", "panic").send();
    assert_eq!(r.await.unwrap().status(), 200);
}
