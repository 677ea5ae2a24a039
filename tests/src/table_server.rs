//! A stand-in for the supervisor's proxy-facing side: the endpoint table (`GET /v1/services/{service}/endpoints`,
//! with ETag and 304), Envoy's REST EDS (`POST /v3/discovery:endpoints`) from the same table, and the report sink
//! (`POST /v1/reports`). Tests change the table and read the reports. (The real supervisor replaces it in its own
//! issue; the wire format is the same.)

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::net::TcpListener;

#[derive(Default)]
struct Inner {
    table: Value,
    /// Answer the table fetch with this instead (status, body), to test bad answers.
    override_answer: Option<(u16, String)>,
    reports: Vec<Value>,
    fetches: usize,
}

#[derive(Clone, Default)]
pub struct TableServer {
    inner: Arc<Mutex<Inner>>,
    pub addr: Option<SocketAddr>,
}

/// One endpoint of the table.
pub fn endpoint(id: &str, addr: SocketAddr, weight: u32, state: &str) -> Value {
    json!({"id": id, "address": addr.to_string(), "weight": weight, "state": state, "zone": "local"})
}

fn lock(s: &TableServer) -> std::sync::MutexGuard<'_, Inner> {
    s.inner.lock().unwrap_or_else(|p| p.into_inner())
}

impl TableServer {
    pub async fn start(service: &str, endpoints: Vec<Value>, policy: Value) -> anyhow::Result<TableServer> {
        Self::start_on("127.0.0.1:0", service, endpoints, policy).await
    }

    pub async fn start_on(
        listen: &str,
        service: &str,
        endpoints: Vec<Value>,
        policy: Value,
    ) -> anyhow::Result<TableServer> {
        let mut server = TableServer::default();
        lock(&server).table = json!({"service": service, "version": 1, "endpoints": endpoints, "policy": policy});
        let listener = TcpListener::bind(listen).await?;
        server.addr = Some(listener.local_addr()?);
        let app = Router::new()
            .route("/v1/services/{service}/endpoints", get(table))
            .route("/v3/discovery:endpoints", post(eds))
            .route("/v1/reports", post(report))
            .with_state(server.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(server)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Replaces the endpoints and/or policy and bumps the version.
    pub fn update(&self, endpoints: Option<Vec<Value>>, policy: Option<Value>) {
        let mut inner = lock(self);
        let version = inner.table["version"].as_u64().unwrap_or(0) + 1;
        inner.table["version"] = json!(version);
        if let Some(e) = endpoints {
            inner.table["endpoints"] = json!(e);
        }
        if let Some(p) = policy {
            inner.table["policy"] = p;
        }
    }

    pub fn version(&self) -> u64 {
        lock(self).table["version"].as_u64().unwrap_or(0)
    }

    pub fn set_bad_answer(&self, answer: Option<(u16, String)>) {
        lock(self).override_answer = answer;
    }

    pub fn reports(&self) -> Vec<Value> {
        lock(self).reports.clone()
    }

    pub fn fetches(&self) -> usize {
        lock(self).fetches
    }
}

async fn table(State(s): State<TableServer>, Path(service): Path<String>, headers: HeaderMap) -> Response {
    let mut inner = lock(&s);
    inner.fetches += 1;
    if let Some((status, body)) = &inner.override_answer {
        let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return (status, body.clone()).into_response();
    }
    if inner.table["service"] != service {
        return (StatusCode::NOT_FOUND, "{}").into_response();
    }
    let etag = format!("\"{}\"", inner.table["version"]);
    if headers.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) == Some(etag.as_str()) {
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response();
    }
    ([(header::ETAG, etag), (header::CONTENT_TYPE, "application/json".to_string())], inner.table.to_string())
        .into_response()
}

async fn eds(State(s): State<TableServer>, _body: Bytes) -> Response {
    let inner = lock(&s);
    let endpoints: Vec<Value> = inner.table["endpoints"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter_map(|e| {
            let addr: SocketAddr = e["address"].as_str()?.parse().ok()?;
            let health = match e["state"].as_str()? {
                "healthy" => "HEALTHY",
                "draining" => "DRAINING",
                _ => "UNHEALTHY",
            };
            Some(json!({
                "endpoint": {"address": {"socket_address": {"address": addr.ip().to_string(), "port_value": addr.port()}}},
                "health_status": health,
                "load_balancing_weight": e["weight"].as_u64().unwrap_or(1).max(1),
            }))
        })
        .collect();
    let version = inner.table["version"].to_string();
    axum::Json(json!({
        "version_info": version,
        "type_url": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
        "resources": [{
            "@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
            "cluster_name": "backend",
            "endpoints": [{"lb_endpoints": endpoints}],
        }],
    }))
    .into_response()
}

async fn report(State(s): State<TableServer>, body: Bytes) -> Response {
    match serde_json::from_slice::<Value>(&body) {
        Ok(v) => {
            lock(&s).reports.push(v);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(_) => StatusCode::BAD_REQUEST.into_response(),
    }
}
