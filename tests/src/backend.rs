//! A real HTTP backend: answers every request with its id (body and `x-backend` header), counts requests, and can be
//! killed like a crashed process (listener and every open connection closed at once). `/echo-headers` answers with
//! the request headers it received (JSON); `/slow?ms=N` answers after N milliseconds. [`Backend::fail_every`] makes it
//! answer 503 on every n-th request, [`Backend::delay`] answer every request after a delay.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, Uri};
use axum::response::IntoResponse;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

#[derive(Clone)]
struct Shared {
    id: String,
    hits: Arc<AtomicUsize>,
    fail_every: Arc<AtomicUsize>,
    delay_ms: Arc<AtomicUsize>,
}

pub struct Backend {
    pub id: String,
    pub addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    fail_every: Arc<AtomicUsize>,
    delay_ms: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

async fn answer(State(s): State<Shared>, uri: Uri, headers: HeaderMap) -> axum::response::Response {
    let hit = s.hits.fetch_add(1, Ordering::SeqCst) + 1;
    let delay = s.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(delay as u64)).await;
    }
    let every = s.fail_every.load(Ordering::SeqCst);
    if every > 0 && hit % every == 0 {
        return (axum::http::StatusCode::SERVICE_UNAVAILABLE, [("x-backend", s.id.clone())], "failing").into_response();
    }
    let upstream_header = headers.get("x-equilibrio-upstream").is_some();
    let body = match uri.path() {
        // the request headers as received, as a JSON object (a header sent twice keeps its last value)
        "/echo-headers" => {
            let map: serde_json::Map<String, serde_json::Value> = headers
                .iter()
                .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned().into()))
                .collect();
            serde_json::Value::Object(map).to_string()
        }
        // answers after `ms` milliseconds
        "/slow" => {
            let ms = uri.query().and_then(|q| q.strip_prefix("ms=")).and_then(|v| v.parse().ok()).unwrap_or(1000);
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            s.id.clone()
        }
        _ => s.id.clone(),
    };
    ([("x-backend", s.id.clone()), ("x-saw-upstream-header", upstream_header.to_string())], body).into_response()
}

impl Backend {
    pub async fn start(id: &str) -> anyhow::Result<Backend> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let hits = Arc::new(AtomicUsize::new(0));
        let fail_every = Arc::new(AtomicUsize::new(0));
        let delay_ms = Arc::new(AtomicUsize::new(0));
        let state = Shared {
            id: id.to_string(),
            hits: hits.clone(),
            fail_every: fail_every.clone(),
            delay_ms: delay_ms.clone(),
        };
        let app = Router::new().fallback(answer).with_state(state);
        let task = tokio::spawn(async move {
            // connections live in this set, so aborting the task closes them all, as a crash would
            let mut conns = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    break;
                };
                let svc = TowerToHyperService::new(app.clone());
                conns.spawn(async move {
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
                while conns.try_join_next().is_some() {}
            }
        });
        Ok(Backend { id: id.to_string(), addr, hits, fail_every, delay_ms, task })
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Answers 503 on every `n`-th request from now on (1: every request; 0: none).
    pub fn fail_every(&self, n: usize) {
        self.fail_every.store(n, Ordering::SeqCst);
    }

    /// Answers every request `ms` milliseconds late from now on (0: at once).
    pub fn delay(&self, ms: usize) {
        self.delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Closes the listener and every connection.
    pub fn kill(&self) {
        self.task.abort();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}
