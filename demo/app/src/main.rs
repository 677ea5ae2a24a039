//! `equilibrio-demo-app`: stands in for agente-vendedor (a search and recommendation API) in tests, benchmarks and
//! the demo. Built as a static binary into an image `FROM scratch` by `scripts/build-demo-image`.
//!
//! * `GET /health`: 200 `ok` (503 once SIGTERM arrived, while it finishes its requests).
//! * `GET /search?q=...&cost_ms=N&delay_ms=M`: burns N ms of CPU (default `CPU_COST_MS`, 5), waits M ms more without
//!   using CPU (default `DELAY_MS`, 0: a slow dependency), and answers JSON naming the instance. Results are kept in
//!   a bounded LRU cache by query (`CACHE_ENTRIES`, 1000; 0: none): a query found there costs no CPU. `x-cache: hit` or
//!   `miss` says which.
//! * `GET /whoami`: the instance id.
//! * `GET /metrics`: the cache's hits, misses and entries (Prometheus text).
//!
//! Environment: `PORT` (8080), `INSTANCE_ID` (default: the hostname, which Docker sets to the container id),
//! `CPU_COST_MS` (5), `DELAY_MS` (0), `CACHE_ENTRIES` (1000), `BALLAST_MB` (0: memory held, and touched, for the life
//! of the process; a cache that has filled up, for memory-driven scaling). On SIGTERM it stops accepting, finishes
//! in-flight requests (up to 10 s) and exits.

use std::convert::Infallible;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

struct State {
    id: String,
    default_cost_ms: u64,
    default_delay_ms: u64,
    stopping: AtomicBool,
    in_flight: AtomicUsize,
    /// Search results by query (the seed they are made from); `None`: no cache.
    cache: Option<Mutex<lru::LruCache<String, u64>>>,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl State {
    fn cached(&self, q: &str) -> Option<u64> {
        let mut cache = self.cache.as_ref()?.lock().unwrap_or_else(|p| p.into_inner());
        cache.get(q).copied()
    }

    fn keep(&self, q: String, seed: u64) {
        if let Some(cache) = &self.cache {
            cache.lock().unwrap_or_else(|p| p.into_inner()).put(q, seed);
        }
    }

    fn entries(&self) -> usize {
        self.cache.as_ref().map_or(0, |c| c.lock().unwrap_or_else(|p| p.into_inner()).len())
    }
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

/// Busy work, so that load shows as CPU in the container's stats.
fn burn(ms: u64) -> u64 {
    let until = Instant::now() + Duration::from_millis(ms);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    while Instant::now() < until {
        for _ in 0..1000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
        }
    }
    x
}

fn text(status: StatusCode, body: String, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(content_type));
    r
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    Ok(match path.as_str() {
        "/health" => {
            if state.stopping.load(Ordering::SeqCst) {
                text(StatusCode::SERVICE_UNAVAILABLE, "stopping".into(), "text/plain")
            } else {
                text(StatusCode::OK, "ok".into(), "text/plain")
            }
        }
        "/whoami" => text(StatusCode::OK, state.id.clone(), "text/plain"),
        "/search" | "/" => {
            state.in_flight.fetch_add(1, Ordering::SeqCst);
            let cost = query_param(&query, "cost_ms")
                .and_then(|v| v.parse().ok())
                .unwrap_or(state.default_cost_ms)
                .min(10_000);
            let q = query_param(&query, "q").unwrap_or("").replace(['"', '\\'], "");
            let delay = query_param(&query, "delay_ms")
                .and_then(|v| v.parse().ok())
                .unwrap_or(state.default_delay_ms)
                .min(60_000);
            let (seed, hit) = match state.cached(&q) {
                Some(seed) => {
                    state.hits.fetch_add(1, Ordering::Relaxed);
                    (seed, true)
                }
                None => {
                    state.misses.fetch_add(1, Ordering::Relaxed);
                    let seed = tokio::task::spawn_blocking(move || burn(cost)).await.unwrap_or(0);
                    if !q.is_empty() {
                        state.keep(q.clone(), seed);
                    }
                    (seed, false)
                }
            };
            if delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
            state.in_flight.fetch_sub(1, Ordering::SeqCst);
            let body = format!(
                "{{\"instance\":\"{}\",\"q\":\"{}\",\"cost_ms\":{},\"results\":[\"item-{}\",\"item-{}\"]}}",
                state.id,
                q,
                cost,
                seed % 1000,
                (seed >> 10) % 1000
            );
            let mut r = text(StatusCode::OK, body, "application/json");
            r.headers_mut()
                .insert("x-cache", hyper::header::HeaderValue::from_static(if hit { "hit" } else { "miss" }));
            r
        }
        "/metrics" => text(
            StatusCode::OK,
            format!(
                "# TYPE demo_cache_hits_total counter\ndemo_cache_hits_total {}\n\
                 # TYPE demo_cache_misses_total counter\ndemo_cache_misses_total {}\n\
                 # TYPE demo_cache_entries gauge\ndemo_cache_entries {}\n",
                state.hits.load(Ordering::Relaxed),
                state.misses.load(Ordering::Relaxed),
                state.entries()
            ),
            "text/plain; version=0.0.4",
        ),
        _ => text(StatusCode::NOT_FOUND, "not found".into(), "text/plain"),
    })
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let port: u16 = env_or("PORT", "8080").parse().unwrap_or(8080);
    let id = std::env::var("INSTANCE_ID")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_string()))
        .unwrap_or_else(|| "agente-vendedor".into());
    let state = Arc::new(State {
        id,
        default_cost_ms: env_or("CPU_COST_MS", "5").parse().unwrap_or(5),
        default_delay_ms: env_or("DELAY_MS", "0").parse().unwrap_or(0),
        stopping: AtomicBool::new(false),
        in_flight: AtomicUsize::new(0),
        cache: NonZeroUsize::new(env_or("CACHE_ENTRIES", "1000").parse().unwrap_or(1000).min(10_000_000))
            .map(|n| Mutex::new(lru::LruCache::new(n))),
        hits: AtomicU64::new(0),
        misses: AtomicU64::new(0),
    });
    // every page written, so that it counts as the container's memory
    let ballast_mb: usize = env_or("BALLAST_MB", "0").parse().unwrap_or(0).min(4096);
    let ballast = vec![1u8; ballast_mb << 20];
    let listener = match TcpListener::bind(("0.0.0.0", port)).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("equilibrio-demo-app: cannot listen on port {port}: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    eprintln!("equilibrio-demo-app: instance {} on port {port}", state.id);
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("equilibrio-demo-app: no SIGTERM handler: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let state = state.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| handle(state.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                });
            }
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    // stop accepting; finish what is in flight
    state.stopping.store(true, Ordering::SeqCst);
    drop(listener);
    let deadline = Instant::now() + Duration::from_secs(10);
    while state.in_flight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(std::hint::black_box(ballast));
    std::process::ExitCode::SUCCESS
}
