//! Worker threads, as in Envoy: each has its own event loop (a current-thread Tokio runtime), its own listening
//! socket on the shared port (`SO_REUSEPORT`, so the kernel spreads connections), its own filter VMs and upstream
//! pool. Nothing on the request path crosses threads except shared data and counters. The service thread runs the
//! singleton plugins the same way, without a listener.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::sync::watch;
use wasmtime::Engine;

use crate::abi::types::MetricKind;
use crate::client_io::ClientIo;
use crate::config::{ClusterConfig, Config};
use crate::conn_timer::{Close, Sweeper, Watched};
use crate::context::Env;
use crate::driver::VmSlot;
use crate::proxy::{ProxyStats, Worker};
use crate::stats::Stats;
use crate::upstream::Pool;
use crate::vm::Plugin;

/// What every thread shares.
pub struct Shared {
    pub config: Arc<Config>,
    pub engine: Engine,
    pub filters: Vec<Arc<Plugin>>,
    pub services: Vec<Arc<Plugin>>,
    pub env: Arc<Env>,
    pub stats: Arc<Stats>,
    pub clusters: Arc<BTreeMap<String, ClusterConfig>>,
    /// Open client connections, all workers together (for `max_connections`).
    pub connections: AtomicUsize,
    /// Requests and retries in flight, all workers together.
    pub retry_budget: Arc<crate::retry_budget::RetryBudget>,
}

/// Runs futures that need not be `Send` on the current thread (hyper's HTTP/2 streams).
#[derive(Clone, Copy)]
struct LocalExec;

impl<F> hyper::rt::Executor<F> for LocalExec
where
    F: std::future::Future + 'static,
{
    fn execute(&self, fut: F) {
        tokio::task::spawn_local(fut);
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()
}

/// Binds one listening socket per worker on the same address (the first one picks the port if it is 0).
pub fn bind_listeners(addr: SocketAddr, count: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let mut out = Vec::with_capacity(count);
    let mut addr = addr;
    for _ in 0..count {
        let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(4096)?;
        let listener: std::net::TcpListener = socket.into();
        addr = listener.local_addr()?;
        out.push(listener);
    }
    Ok(out)
}

fn start_slots(shared: &Shared, plugins: &[Arc<Plugin>]) -> Result<Vec<Rc<VmSlot>>, String> {
    plugins
        .iter()
        .map(|p| {
            VmSlot::start(&shared.engine, p.clone(), shared.env.clone(), shared.clusters.clone())
                .map_err(|e| format!("plugin `{}`: {e}", p.info.name))
        })
        .collect()
}

/// A thread with its own event loop (a current-thread runtime and a `LocalSet`, so tasks need not be `Send`),
/// running `body`; a runtime that cannot be built is reported on `ready`.
fn spawn_event_loop<F, Fut>(name: String, ready: Ready, body: F) -> std::io::Result<std::thread::JoinHandle<()>>
where
    F: FnOnce(Ready) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    std::thread::Builder::new().name(name).spawn(move || {
        let rt = match runtime() {
            Ok(rt) => rt,
            Err(e) => {
                let _ = ready.send(Err(format!("runtime: {e}")));
                return;
            }
        };
        let run = std::panic::AssertUnwindSafe(|| tokio::task::LocalSet::new().block_on(&rt, body(ready)));
        if std::panic::catch_unwind(run).is_err() {
            fatal(&format!("thread {}", std::thread::current().name().unwrap_or("?")));
        }
    })
}

/// A panic outside any one request (an accept loop, a filter's ticks) would leave the proxy half working: the process
/// exits instead, for its service manager to restart it. (A request's panic costs only that request: see `serve_one`.)
fn fatal(what: &str) -> ! {
    tracing::error!("{what} panicked: exiting");
    std::process::exit(70)
}

/// Runs a task the worker cannot do without; see [`fatal`].
async fn essential(what: &'static str, task: impl std::future::Future<Output = ()>) {
    use futures_util::FutureExt;
    if std::panic::AssertUnwindSafe(task).catch_unwind().await.is_err() {
        fatal(what);
    }
}

/// One request, its panic contained: the client gets a 500, the connection and the worker serve on.
async fn serve_one(
    worker: Rc<Worker>,
    client: crate::forward::Peer,
    conn: Rc<crate::conn_timer::ConnState>,
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<crate::body::ProxyBody>, crate::proxy::Reset> {
    use futures_util::FutureExt;
    let panics = worker.stats.handler_panics.clone();
    // boxed: hyper moves the request's future into the connection's in-flight slot, and the slot lives as long as
    // the connection; boxed, that move copies a pointer, and an idle keep-alive connection holds 8 bytes, not the
    // whole request state machine
    let handled = Box::pin(crate::proxy::handle(worker, client, conn.clone(), req));
    match std::panic::AssertUnwindSafe(handled).catch_unwind().await {
        Ok(response) => response,
        Err(panic) => {
            panics.inc();
            let what = panic.downcast_ref::<&str>().copied().unwrap_or("(no message)");
            tracing::error!(panic = what, "a request panicked in the proxy; answered 500");
            let body = crate::body::ProxyBody::full(bytes::Bytes::from_static(b"internal error"), None);
            let mut response = hyper::Response::new(body.on_connection(conn));
            *response.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
            Ok(response)
        }
    }
}

/// What a connection's task undoes when it ends, normally or by a panic in hyper's connection (a response body).
struct ConnEnd {
    sweeper: Rc<Sweeper>,
    id: u64,
    shared: Arc<Shared>,
    cx_active: crate::proxy::MetricRef,
    open: Rc<Cell<usize>>,
    all_closed: Rc<tokio::sync::Notify>,
}

impl Drop for ConnEnd {
    fn drop(&mut self) {
        self.sweeper.forget(self.id);
        self.shared.connections.fetch_sub(1, Ordering::Relaxed);
        self.cx_active.increment(-1);
        self.open.set(self.open.get() - 1);
        if self.open.get() == 0 {
            self.all_closed.notify_one();
        }
    }
}

/// Where a thread says it has started (or why it could not).
pub type Ready = std::sync::mpsc::Sender<Result<(), String>>;

/// The singleton plugins' thread: their VMs, ticks and HTTP calls, until shutdown.
pub fn spawn_services(
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
    ready: Ready,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    spawn_event_loop("wasm-services".into(), ready, move |ready| async move {
        let slots = match start_slots(&shared, &shared.services) {
            Ok(s) => s,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        for slot in &slots {
            tokio::task::spawn_local(slot.clone().run_ticks());
        }
        let _ = ready.send(Ok(()));
        let _ = shutdown.wait_for(|stop| *stop).await;
    })
}

pub fn spawn_worker(
    index: usize,
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
    ready: Ready,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    spawn_event_loop(format!("worker-{index}"), ready, move |ready| {
        run_worker(index, listener, shared, shutdown, ready)
    })
}

async fn run_worker(
    index: usize,
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
    ready: Ready,
) {
    let setup = async {
        let filters = start_slots(&shared, &shared.filters)?;
        let listener = tokio::net::TcpListener::from_std(listener).map_err(|e| format!("listener: {e}"))?;
        let local = listener.local_addr().map_err(|e| format!("listener: {e}"))?;
        Ok::<_, String>((filters, listener, local))
    };
    let (filters, listener, local) = match setup.await {
        Ok(x) => x,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    for slot in &filters {
        tokio::task::spawn_local(essential("a filter's ticks", slot.clone().run_ticks()));
    }
    let config = &shared.config;
    let route_cluster = shared.clusters.get(&config.route.cluster).cloned().unwrap_or_default();
    let stats = &shared.stats;
    let counter = |name: &str| stats.handle(MetricKind::Counter, name);
    let cluster = &config.route.cluster;
    // bodies go through the filters only if one of them has body or trailer callbacks
    let exports = |response: bool| {
        filters
            .iter()
            .any(|slot| slot.call(|vm| Ok(vm.exports_body(response) || vm.exports_trailers(response))).unwrap_or(false))
    };
    let body_filters = [exports(false), exports(true)];
    let worker = Rc::new(Worker {
        body_filters,
        buffer_limit: config.listener.buffer_limit_kb * 1024,
        filters,
        pool: Rc::new(Pool::new(
            route_cluster.max_idle_per_host,
            Duration::from_millis(route_cluster.idle_timeout.0),
            Duration::from_millis(route_cluster.connect_timeout.0),
        )),
        route: config.route.clone(),
        retry_budget: shared.retry_budget.clone(),
        fallback: route_cluster.endpoints.clone(),
        next_fallback: Cell::new(index),
        local,
        stats: ProxyStats {
            downstream_rq_total: counter("http.ingress.downstream_rq_total"),
            upstream_rq_total: counter(&format!("cluster.{cluster}.upstream_rq_total")),
            upstream_rq_retry: counter(&format!("cluster.{cluster}.upstream_rq_retry")),
            upstream_rq_retry_overflow: counter(&format!("cluster.{cluster}.upstream_rq_retry_overflow")),
            upstream_cx_connect_fail: counter(&format!("cluster.{cluster}.upstream_cx_connect_fail")),
            upstream_rq_timeout: counter(&format!("cluster.{cluster}.upstream_rq_timeout")),
            upstream_rq_5xx: counter(&format!("cluster.{cluster}.upstream_rq_5xx")),
            no_healthy_upstream: counter(&format!("cluster.{cluster}.upstream_cx_none_healthy")),
            local_replies: counter("http.ingress.local_replies"),
            downstream_cx_protocol_error: counter("http.ingress.downstream_cx_protocol_error"),
            handler_panics: counter("http.ingress.handler_panics"),
        },
        faults: std::env::var("EQUILIBRIO_FAULT_INJECTION").is_ok_and(|v| v == "1"),
    });
    let listener_name = format!("listener.{}_{}", local.ip(), local.port());
    let cx_total = counter(&format!("{listener_name}.worker_{index}.downstream_cx_total"));
    let cx_overflow = counter(&format!("{listener_name}.downstream_cx_overflow"));
    let cx_active = stats.handle(MetricKind::Gauge, &format!("{listener_name}.downstream_cx_active"));
    let _ = ready.send(Ok(()));

    let sweeper = Sweeper::new(
        Duration::from_millis(config.listener.header_read_timeout.0),
        Duration::from_millis(config.listener.idle_timeout.0),
    );
    tokio::task::spawn_local(sweeper.clone().run());
    let mut builder = auto::Builder::new(LocalExec);
    let header_bytes = config.listener.max_request_headers_kb * 1024;
    // the header-read timeout is the sweeper's (coarse and cheaper than hyper's per-request timer)
    // writev(false): the response head and a small body are copied into one buffer rather than written vectored
    // (the benchmarked setting; its own A/B difference was within noise, docs/performance-tuning.md)
    builder.http1().header_read_timeout(None).max_buf_size(header_bytes.max(8192)).writev(false);
    builder.http2().timer(TokioTimer::new()).max_header_list_size(u32::try_from(header_bytes).unwrap_or(u32::MAX));
    let builder = Rc::new(if config.listener.http2 { builder } else { builder.http1_only() });

    let open = Rc::new(Cell::new(0usize));
    let all_closed = Rc::new(tokio::sync::Notify::new());
    loop {
        let accepted = tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => break,
            r = listener.accept() => r,
        };
        let (tcp, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // out of file descriptors, usually: back off instead of spinning
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if shared.connections.fetch_add(1, Ordering::Relaxed) >= config.listener.max_connections {
            shared.connections.fetch_sub(1, Ordering::Relaxed);
            cx_overflow.inc();
            drop(tcp);
            continue;
        }
        cx_total.inc();
        cx_active.increment(1);
        let _ = tcp.set_nodelay(true);
        let (worker, builder, shared, cx_active) = (worker.clone(), builder.clone(), shared.clone(), cx_active.clone());
        let (open, all_closed) = (open.clone(), all_closed.clone());
        open.set(open.get() + 1);
        // tracked before the task first runs, so that a shutdown right now still reaches it
        let (id, state) = sweeper.track();
        let sweeper = sweeper.clone();
        tokio::task::spawn_local(async move {
            let _end = ConnEnd { sweeper, id, shared, cx_active, open, all_closed };
            let io = TokioIo::new(ClientIo::new(tcp, state.clone()));
            let conn_state = state.clone();
            let client = crate::forward::Peer::new(peer);
            let service = hyper::service::service_fn(move |req| {
                serve_one(worker.clone(), client.clone(), conn_state.clone(), req)
            });
            let conn = builder.serve_connection(io, service);
            tokio::pin!(conn);
            match state.watch(conn.as_mut()).await {
                Watched::Done(Err(e)) => tracing::debug!("connection from {peer}: {e}"),
                Watched::Done(Ok(())) | Watched::Close(Close::Expired) => {}
                Watched::Close(Close::Drain) => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    drop(listener);
    sweeper.drain_all();
    let drain = Duration::from_millis(config.listener.drain_timeout.0);
    let waited = tokio::time::timeout(drain, async {
        while open.get() > 0 {
            all_closed.notified().await;
        }
    })
    .await;
    if waited.is_err() {
        tracing::warn!("worker {index}: {} connections still open after the drain timeout; closing them", open.get());
    }
}
