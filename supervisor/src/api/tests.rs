//! The API through the router, without a socket: auth, errors, tables, policy, persistence, OpenAPI coverage.

use super::*;
use crate::app::{App, now_ms};
use crate::config::Config;
use axum::body::Body;
use axum::http::Request;
use axum::http::{HeaderMap, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use serde_json::json;
use std::sync::Arc;
use tower::ServiceExt;

const TOKEN: &str = "test-token-0123456789";

/// Every route the API must have (an independent list: the router and the document come from one declaration).
const ROUTES: [(&str, &str); 25] = [
    ("get", "/"),
    ("get", "/livez"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
    ("get", "/v1/services"),
    ("get", "/v1/services/{service}"),
    ("get", "/v1/services/{service}/instances"),
    ("post", "/v1/services/{service}/instances"),
    ("delete", "/v1/services/{service}/instances/{id}"),
    ("put", "/v1/services/{service}/instances/{id}"),
    ("post", "/v1/services/{service}/instances/{id}/drain"),
    ("post", "/v1/services/{service}/instances/{id}/heartbeat"),
    ("get", "/v1/services/{service}/policy"),
    ("put", "/v1/services/{service}/policy"),
    ("get", "/v1/services/{service}/health_check"),
    ("put", "/v1/services/{service}/health_check"),
    ("get", "/v1/services/{service}/endpoints"),
    ("post", "/v3/discovery:endpoints"),
    ("post", "/v1/reports"),
    ("get", "/v1/events"),
    ("get", "/v1/services/{service}/scaling"),
    ("put", "/v1/services/{service}/scaling"),
    ("post", "/v1/services/{service}/scale"),
    ("get", "/v1/services/{service}/scaling/events"),
];

fn app_with(yaml: &str, token: Option<&str>) -> AppState {
    Arc::new(App::new(Config::parse(yaml, token.map(str::to_string)).unwrap()).unwrap())
}

fn app() -> AppState {
    app_with(
        "services:\n  av:\n    instances: [{id: a, address: '127.0.0.1:1001'}, {id: b, address: '127.0.0.1:1002', weight: 50}]\n",
        Some(TOKEN),
    )
}

async fn call(
    app: &AppState,
    method: &str,
    uri: &str,
    body: Option<Value>,
    token: Option<&str>,
) -> (StatusCode, HeaderMap, Value) {
    let mut req = Request::builder().method(method).uri(uri).header("host", "127.0.0.1:9900");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let req = req.body(body.map_or(Body::empty(), |b| Body::from(b.to_string()))).unwrap();
    let resp = router(app.clone()).oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, headers, json)
}

#[tokio::test]
async fn changes_need_the_token() {
    let a = app();
    let body = json!({"id": "c", "address": "127.0.0.1:1003"});
    let (s, _, e) = call(&a, "POST", "/v1/services/av/instances", Some(body.clone()), None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(e["error"]["code"], "unauthorized");
    let (s, _, _) =
        call(&a, "POST", "/v1/services/av/instances", Some(body.clone()), Some("wrong-token-0123456789")).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _, v) = call(&a, "POST", "/v1/services/av/instances", Some(body), Some(TOKEN)).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["id"], "c");
    assert_eq!(v["state"], "unhealthy", "not checked yet");
    for (m, uri) in [
        ("DELETE", "/v1/services/av/instances/a"),
        ("PUT", "/v1/services/av/instances/a"),
        ("POST", "/v1/services/av/instances/a/drain"),
        ("PUT", "/v1/services/av/policy"),
        ("PUT", "/v1/services/av/health_check"),
        ("GET", "/v1/services/av/endpoints"),
        ("POST", "/v1/reports"),
    ] {
        let (s, _, _) = call(&a, m, uri, Some(json!({})), None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{m} {uri}");
    }
    // reads too (they show every instance's address), but for the probes, the page and the API description
    for uri in ["/v1/services", "/v1/services/av", "/v1/services/av/instances", "/v1/events", "/metrics"] {
        assert_eq!(call(&a, "GET", uri, None, None).await.0, StatusCode::UNAUTHORIZED, "{uri}");
    }
    assert_eq!(call(&a, "GET", "/v1/services/av", None, Some(TOKEN)).await.0, StatusCode::OK);
    for uri in ["/", "/livez", "/readyz", "/openapi.json"] {
        assert_eq!(call(&a, "GET", uri, None, None).await.0, StatusCode::OK, "{uri}");
    }
    // `public_reads` opens reads, never changes (nor the table, which carries the sticky secret)
    let open = app_with("public_reads: true\nservices:\n  av:\n    instances: []\n", Some(TOKEN));
    assert_eq!(call(&open, "GET", "/v1/services/av", None, None).await.0, StatusCode::OK);
    assert_eq!(call(&open, "GET", "/v1/services/av/endpoints", None, None).await.0, StatusCode::UNAUTHORIZED);
    let (s, _, _) =
        call(&open, "POST", "/v1/services/av/instances", Some(json!({"id": "d", "address": "127.0.0.1:1004"})), None)
            .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn without_a_token_changes_need_a_loopback_host() {
    let a = app_with("services:\n  av:\n    instances: []\n", None);
    let post = |host: &'static str, port: u16| {
        let a = a.clone();
        async move {
            let req = Request::builder()
                .method("POST")
                .uri("/v1/services/av/instances")
                .header("host", host)
                .body(Body::from(
                    json!({"id": host.replace([':', '.', '[', ']'], "-"), "address": format!("127.0.0.1:{port}")})
                        .to_string(),
                ))
                .unwrap();
            router(a).oneshot(req).await.unwrap().status()
        }
    };
    // a page of another site posting a form to 127.0.0.1 (loopback Host, but its own Origin): refused
    for (name, value) in [("origin", "http://attacker.example"), ("origin", "null"), ("sec-fetch-site", "cross-site")] {
        let req = Request::builder()
            .method("POST")
            .uri("/v1/services/av/instances/x/drain")
            .header("host", "127.0.0.1:9900")
            .header(name, value)
            .body(Body::empty())
            .unwrap();
        assert_eq!(router(a.clone()).oneshot(req).await.unwrap().status(), StatusCode::FORBIDDEN, "{name}: {value}");
    }
    // the dashboard, served from the supervisor itself, sends its own loopback origin: taken
    let req = Request::builder()
        .uri("/v1/services")
        .header("host", "127.0.0.1:9900")
        .header("origin", "http://127.0.0.1:9900")
        .header("sec-fetch-site", "same-origin")
        .body(Body::empty())
        .unwrap();
    assert_eq!(router(a.clone()).oneshot(req).await.unwrap().status(), StatusCode::OK);
    // a rebound DNS name, as a page in a local browser would send it: no change, and no read either
    assert_eq!(post("attacker.example:9900", 1).await, StatusCode::FORBIDDEN);
    let read = Request::builder().uri("/v1/services/av/instances").header("host", "attacker.example:9900");
    let resp = router(a.clone()).oneshot(read.body(Body::empty()).unwrap()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(post("127.0.0.1.nip.io:9900", 2).await, StatusCode::FORBIDDEN);
    for (port, host) in (10..).zip(["127.0.0.1:9900", "localhost:9900", "[::1]:9900", "localhost"]) {
        assert_eq!(post(host, port).await, StatusCode::CREATED, "{host}");
    }
}

#[tokio::test]
async fn bad_requests_name_the_field() {
    let a = app();
    let cases = [
        (json!({"id": "c", "address": "nowhere"}), StatusCode::UNPROCESSABLE_ENTITY, "address"),
        (json!({"id": "c c", "address": "127.0.0.1:5"}), StatusCode::UNPROCESSABLE_ENTITY, "id"),
        (json!({"id": "c", "address": "127.0.0.1:5", "wieght": 3}), StatusCode::UNPROCESSABLE_ENTITY, "wieght"),
        (json!({"id": "c", "address": "127.0.0.1:5", "weight": "heavy"}), StatusCode::UNPROCESSABLE_ENTITY, "weight"),
        (
            json!({"id": "c", "address": "127.0.0.1:5", "heartbeat_ttl": "forever"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "heartbeat_ttl",
        ),
        (json!({"id": "a", "address": "127.0.0.1:5"}), StatusCode::CONFLICT, "id"),
        (json!({"id": "c", "address": "127.0.0.1:1001"}), StatusCode::CONFLICT, "address"),
    ];
    for (body, status, field) in cases {
        let (s, _, e) = call(&a, "POST", "/v1/services/av/instances", Some(body.clone()), Some(TOKEN)).await;
        assert_eq!(s, status, "{body}: {e}");
        assert_eq!(e["error"]["field"], field, "{body}: {e}");
        assert!(e["error"]["message"].is_string());
    }
    let req = Request::post("/v1/services/av/instances")
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(Body::from("{not json"))
        .unwrap();
    let resp = router(a.clone()).oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let (s, _, e) = call(&a, "PUT", "/v1/services/av/instances/zz", Some(json!({"weight": 1})), Some(TOKEN)).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(e["error"]["code"], "not_found");
    assert_eq!(call(&a, "GET", "/v1/services/nope", None, Some(TOKEN)).await.0, StatusCode::NOT_FOUND);
    let (s, _, e) =
        call(&a, "PUT", "/v1/services/av/health_check", Some(json!({"interval": 1, "timeout": 5})), Some(TOKEN)).await;
    assert_eq!((s, e["error"]["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("timeout")));
}

#[tokio::test]
async fn the_table_has_etags_and_follows_changes() {
    let a = app();
    let (s, h, t) = call(&a, "GET", "/v1/services/av/endpoints", None, Some(TOKEN)).await;
    assert_eq!(s, StatusCode::OK);
    let etag = h["etag"].to_str().unwrap().to_string();
    assert_eq!(t["endpoints"].as_array().unwrap().len(), 2);
    let req = Request::get("/v1/services/av/endpoints")
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("if-none-match", &etag)
        .body(Body::empty())
        .unwrap();
    assert_eq!(router(a.clone()).oneshot(req).await.unwrap().status(), StatusCode::NOT_MODIFIED);
    // a change: new version, new etag, the filter parses it
    a.registry().record_check("av", "a", true, 1.0, now_ms());
    let (s, _, v) = call(&a, "PUT", "/v1/services/av/instances/a", Some(json!({"weight": 7})), Some(TOKEN)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (_, h2, t2) = call(&a, "GET", "/v1/services/av/endpoints", None, Some(TOKEN)).await;
    assert_ne!(h2["etag"].to_str().unwrap(), etag);
    assert!(t2["version"].as_u64() > t["version"].as_u64());
    let parsed = equilibrio_contract::table::Table::parse(t2.to_string().as_bytes(), "av", None, 1 << 20).unwrap();
    assert_eq!(parsed.endpoints[0].weight, 7);
    assert_eq!(parsed.endpoints[0].state, equilibrio_contract::table::EndpointState::Healthy);
    // drain
    let (_, _, v) = call(&a, "POST", "/v1/services/av/instances/a/drain", None, Some(TOKEN)).await;
    assert_eq!(v["state"], "draining");
    let (_, _, eds) = call(&a, "POST", "/v3/discovery:endpoints", Some(json!({"resource_names": ["av"]})), None).await;
    assert_eq!(eds["resources"][0]["cluster_name"], "av");
    assert_eq!(eds["resources"][0]["endpoints"][0]["lb_endpoints"][0]["health_status"], "DRAINING");
    let version = eds["version_info"].as_str().unwrap().to_string();
    let req = Request::post("/v3/discovery:endpoints")
        .body(Body::from(json!({"resource_names": ["av"], "version_info": version}).to_string()))
        .unwrap();
    assert_eq!(router(a.clone()).oneshot(req).await.unwrap().status(), StatusCode::NOT_MODIFIED);
}

#[tokio::test]
async fn policies_are_validated_like_the_filter_and_the_secret_is_hidden() {
    let a = app();
    let (s, _, e) = call(&a, "PUT", "/v1/services/av/policy", Some(json!({"algorithm": "fastest"})), Some(TOKEN)).await;
    assert_eq!((s, e["error"]["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("algorithm")));
    let (s, _, e) = call(&a, "PUT", "/v1/services/av/policy", Some(json!({"colour": "red"})), Some(TOKEN)).await;
    assert_eq!((s, e["error"]["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("colour")));
    let policy = json!({"algorithm": "least_connections", "sticky_sessions": {"enabled": true, "secret": "a-secret-of-20-chars"}});
    let (s, _, v) = call(&a, "PUT", "/v1/services/av/policy", Some(policy), Some(TOKEN)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["sticky_sessions"]["secret"], "<redacted>");
    let (_, _, shown) = call(&a, "GET", "/v1/services/av/policy", None, Some(TOKEN)).await;
    assert_eq!(shown["sticky_sessions"]["secret"], "<redacted>");
    // sending the redacted policy back keeps the secret
    let mut back = shown.clone();
    back["algorithm"] = json!("random");
    assert_eq!(call(&a, "PUT", "/v1/services/av/policy", Some(back), Some(TOKEN)).await.0, StatusCode::OK);
    let (_, _, t) = call(&a, "GET", "/v1/services/av/endpoints", None, Some(TOKEN)).await;
    assert_eq!(t["policy"]["sticky_sessions"]["secret"], "a-secret-of-20-chars", "the proxies get the real secret");
    assert_eq!(t["policy"]["algorithm"], "random");
}

#[tokio::test]
async fn reports_become_instance_traffic() {
    let a = app();
    let report = json!({"service": "av", "proxy": "envoy-1", "window_ms": 1000,
        "endpoints": [{"id": "a", "requests": 120, "errors": 6, "latency_sum_ms": 240.0, "latency_p95_ms": 4.5, "in_flight": 3}]});
    let (s, _, _) = call(&a, "POST", "/v1/reports", Some(report), Some(TOKEN)).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (_, _, v) = call(&a, "GET", "/v1/services/av/instances", None, Some(TOKEN)).await;
    let t = &v[0]["traffic"];
    assert_eq!(t["in_flight"], 3);
    assert_eq!(t["latency_p95_ms"], 4.5);
    assert!((t["error_rate"].as_f64().unwrap() - 0.05).abs() < 1e-9);
    let (s, _, e) = call(&a, "POST", "/v1/reports", Some(json!({"service": "av"})), Some(TOKEN)).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    let req = Request::get("/metrics").header("authorization", format!("Bearer {TOKEN}")).body(Body::empty()).unwrap();
    let body = router(a.clone()).oneshot(req).await.unwrap().into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("equilibrio_supervisor_instance_in_flight{service=\"av\",instance=\"a\"} 3"), "{text}");
    assert!(text.contains("equilibrio_supervisor_reports_total 1"), "{text}");
}

#[tokio::test]
async fn runtime_changes_survive_a_restart() {
    let dir = std::env::temp_dir().join(format!("eq-api-{}-{}", std::process::id(), now_ms()));
    let yaml = format!(
        "state_file: {}\nservices:\n  av:\n    instances: [{{id: a, address: '127.0.0.1:1001'}}]\n",
        dir.join("state.json").display()
    );
    let a = app_with(&yaml, Some(TOKEN));
    call(&a, "POST", "/v1/services/av/instances", Some(json!({"id": "c", "address": "127.0.0.1:1003"})), Some(TOKEN))
        .await;
    call(&a, "PUT", "/v1/services/av/instances/a", Some(json!({"weight": 9, "zone": "z1"})), Some(TOKEN)).await;
    call(&a, "POST", "/v1/services/av/instances/a/drain", Some(json!({"timeout": "10m"})), Some(TOKEN)).await;
    call(&a, "PUT", "/v1/services/av/policy", Some(json!({"algorithm": "random"})), Some(TOKEN)).await;
    let version = a.registry().service("av").unwrap().version;
    drop(a);
    let b = app_with(&yaml, Some(TOKEN));
    let svc = b.registry().service("av").unwrap().clone();
    assert!(svc.instances.contains_key("c"));
    assert_eq!(svc.instances["a"].spec.weight, 9);
    assert_eq!(svc.instances["a"].spec.zone, "z1");
    assert!(svc.instances["a"].drain.is_some());
    assert_eq!(svc.policy["algorithm"], "random");
    assert!(svc.version > version, "versions keep rising across restarts");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn openapi_covers_every_route() {
    let a = app();
    let (s, _, doc) = call(&a, "GET", "/openapi.json", None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for (method, path) in ROUTES {
        assert!(doc["paths"][path][method].is_object(), "{method} {path} is missing from /openapi.json");
    }
    let documented: usize = doc["paths"].as_object().unwrap().values().map(|p| p.as_object().unwrap().len()).sum();
    assert_eq!(documented, ROUTES.len(), "the document lists routes the router does not have");
    // and every listed route exists in the router (no 404 from the fallback)
    for (method, path) in ROUTES {
        let uri = path.replace("{service}", "av").replace("{id}", "a");
        let req = Request::builder().method(method.to_uppercase().as_str()).uri(&uri).body(Body::from("{}")).unwrap();
        let resp = router(a.clone()).oneshot(req).await.unwrap();
        let is_fallback = resp.status() == StatusCode::NOT_FOUND && {
            let b = resp.into_body().collect().await.unwrap().to_bytes();
            String::from_utf8_lossy(&b).contains("no such route")
        };
        assert!(!is_fallback, "{method} {uri} is not routed");
    }
}

#[tokio::test]
async fn every_operation_of_the_document_needs_the_token_but_the_open_ones() {
    // walks the OpenAPI document, so that a route added later is checked without anyone listing it here
    let a = app();
    let doc = serde_json::to_value(document()).unwrap();
    let mut checked = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            let m = method.to_uppercase();
            let uri = path.replace("{service}", "av").replace("{id}", "a");
            let open = (m == "GET" && auth::PUBLIC_READS.contains(&path.as_str()))
                || auth::OPEN_CALLS.iter().any(|(om, op)| *om == m && op == path);
            let (s, _, _) = call(&a, &m, &uri, Some(json!({})), None).await;
            if open {
                assert_ne!(s, StatusCode::UNAUTHORIZED, "{m} {uri} is open");
            } else {
                assert_eq!(s, StatusCode::UNAUTHORIZED, "{m} {uri} needs the token");
            }
            checked += 1;
        }
    }
    assert_eq!(checked, ROUTES.len(), "every route is in the document");
}
