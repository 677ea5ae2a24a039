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

/// Envoy's EDS from the current table, by the same function as the supervisor's (the contract crate); endpoints a
/// test made malformed are left out.
async fn eds(State(s): State<TableServer>, _body: Bytes) -> Response {
    let inner = lock(&s);
    let endpoints: Vec<equilibrio_contract::table::Endpoint> = inner.table["endpoints"]
        .as_array()
        .map(|a| a.iter().filter_map(|e| serde_json::from_value(e.clone()).ok()).collect())
        .unwrap_or_default();
    let version = inner.table["version"].as_u64().unwrap_or(0);
    axum::Json(equilibrio_contract::eds::discovery_response("backend", version, &endpoints)).into_response()
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
