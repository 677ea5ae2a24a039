//! One request through the bundled proxy, in Envoy's order: the filters' request phase (which may answer locally or
//! pause), the upstream chosen by the filter (`x-equilibrio-upstream`) with retries on the next listed host, the
//! filters' response phase in reverse order, and the response streamed back; the filters' log phase runs when the
//! response body is done.

use std::cell::Cell;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::rc::Rc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Empty};
use hyper::body::{Body, Incoming};
use tokio::time::{Instant, timeout_at};

use crate::abi::types::{Action, response_flags as rf};
use crate::body::{ProxyBody, Release};
use crate::client_body::ClientBody;
use crate::config::RouteConfig;
use crate::conn_timer::ConnState;
use crate::context::{LocalReply, Stream};
use crate::driver::VmSlot;
use crate::forward::{self, Peer, Upstreams};
use crate::stats::Metric;
use crate::stream_end::StreamGuard;
use crate::upstream::{Pool, Sender, UpstreamBody};

/// The proxy's counters, named as Envoy names them.
pub struct ProxyStats {
    pub downstream_rq_total: MetricRef,
    pub upstream_rq_total: MetricRef,
    pub upstream_rq_retry: MetricRef,
    pub upstream_cx_connect_fail: MetricRef,
    pub upstream_rq_timeout: MetricRef,
    pub upstream_rq_5xx: MetricRef,
    pub no_healthy_upstream: MetricRef,
    pub local_replies: MetricRef,
    pub downstream_cx_protocol_error: MetricRef,
    pub handler_panics: MetricRef,
}

pub type MetricRef = std::sync::Arc<Metric>;

/// What one worker thread serves requests with.
pub struct Worker {
    pub filters: Vec<Rc<VmSlot>>,
    pub pool: Rc<Pool>,
    pub route: RouteConfig,
    /// The route cluster's static members, used round robin when no filter names a host.
    pub fallback: Vec<SocketAddr>,
    pub next_fallback: Cell<usize>,
    pub local: SocketAddr,
    pub stats: ProxyStats,
    /// Test-only fault injection (`EQUILIBRIO_FAULT_INJECTION=1`): `x-equilibrio-fault: panic` panics the request.
    pub faults: bool,
}

pub async fn handle(
    w: Rc<Worker>,
    peer: Peer,
    conn: Rc<ConnState>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    conn.request_started();
    if w.faults && req.headers().get("x-equilibrio-fault").is_some_and(|v| v == "panic") {
        #[allow(clippy::panic)] // the one deliberate panic: what fault injection exists for
        {
            panic!("fault injected by x-equilibrio-fault");
        }
    }
    // the supervisor's health check: say that this is a proxy, so an instance registered at our own address (a
    // routing loop) never becomes healthy
    let health_check = req.headers().contains_key(&forward::HEALTH_CHECK);
    let mut response = serve(w, peer, req).await;
    if health_check {
        response.headers_mut().insert(forward::PROXY_MARK.clone(), http::HeaderValue::from_static("equilibrio-host"));
    }
    Ok(response.map(|body| body.on_connection(conn)))
}

async fn serve(w: Rc<Worker>, peer: Peer, req: Request<Incoming>) -> Response<ProxyBody> {
    w.stats.downstream_rq_total.inc();
    let (mut parts, body) = req.into_parts();
    let client_version = parts.version;
    forward::prepare_request(&mut parts, &peer);
    let end_of_stream = body.is_end_stream();
    // the guard owns the stream from here on: however the request ends (even abandoned by the client while the
    // upstream works on it), dropping the guard gives each filter the end of its stream
    let mut guard = StreamGuard::new();
    guard.stream = Some(Box::new(Stream::new(parts, peer.addr, w.local)));

    // request phase
    for slot in &w.filters {
        let step = slot.call(|vm| {
            let context = vm.create_stream_context()?;
            let action = vm.on_request_headers(context, &mut guard.stream, end_of_stream)?;
            Ok((context, action))
        });
        let (context, action) = match step {
            Ok(x) => x,
            Err(_) => return local(&w, guard, client_version, reply(503, "filter_error"), 0),
        };
        guard.push(slot.clone(), context, slot.generation());
        if let Some(r) = guard.stream.as_deref_mut().and_then(|s| s.local_reply.take()) {
            return local(&w, guard, client_version, r, 0);
        }
        if guard.stream.as_deref().is_some_and(|s| s.closed) {
            return local(&w, guard, client_version, reply(503, "closed_by_filter"), 0);
        }
        if action == Action::Pause {
            let timeout = std::time::Duration::from_millis(w.route.timeout.0);
            if !slot.wait_resumed(context, timeout).await {
                return local(&w, guard, client_version, reply(504, "filter_paused_too_long"), 0);
            }
            if let Some(r) = guard.stream.as_deref_mut().and_then(|s| s.local_reply.take()) {
                return local(&w, guard, client_version, r, 0);
            }
        }
    }

    // upstream
    let Some(s) = guard.stream.as_deref_mut() else {
        return plain(client_version, StatusCode::INTERNAL_SERVER_ERROR);
    };
    let max = w.route.retries as usize + 1;
    let mut upstreams = match s.request.headers.remove(&forward::UPSTREAM) {
        Some(v) => Upstreams::listed(v, max),
        None => Upstreams::fixed(fallback(&w, max), max),
    };
    let Some(first) = upstreams.next() else {
        w.stats.no_healthy_upstream.inc();
        let r = LocalReply {
            status: 503,
            details: "no_healthy_upstream".into(),
            body: b"no healthy upstream".to_vec(),
            headers: vec![],
        };
        return local(&w, guard, client_version, r, rf::NO_HEALTHY_UPSTREAM);
    };
    // one timer for all attempts: the route timeout covers them all, as Envoy's does
    let deadline = Instant::now() + std::time::Duration::from_millis(w.route.timeout.0);
    let sent = timeout_at(deadline, send(&w, s, body, std::iter::once(first).chain(upstreams))).await;
    let (response, addr, sender) = match sent.unwrap_or(Err(rf::UPSTREAM_REQUEST_TIMEOUT)) {
        Ok(x) => x,
        Err(flags) => {
            let (status, details, text): (u16, &str, &[u8]) = if flags & rf::DOWNSTREAM_PROTOCOL_ERROR != 0 {
                w.stats.downstream_cx_protocol_error.inc();
                (400, "http1.codec_error", b"Bad Request")
            } else if flags & rf::UPSTREAM_REQUEST_TIMEOUT != 0 {
                w.stats.upstream_rq_timeout.inc();
                (504, "upstream_response_timeout", b"upstream request timeout")
            } else {
                (
                    503,
                    "upstream_reset_before_response_started",
                    b"upstream connect error or disconnect/reset before headers",
                )
            };
            let r = LocalReply { status, details: details.into(), body: text.to_vec(), headers: vec![] };
            return local(&w, guard, client_version, r, flags);
        }
    };
    let (mut rparts, rbody) = response.into_parts();
    if rparts.status.is_server_error() {
        w.stats.upstream_rq_5xx.inc();
    }
    forward::strip_hop_by_hop(&mut rparts.headers);
    s.upstream = Some(addr);
    s.details = "via_upstream";
    s.response = Some(rparts);

    // response phase
    response_phase(&mut guard, rbody.is_end_stream());
    if let Some(r) = guard.stream.as_deref_mut().and_then(|s| s.local_reply.take()) {
        return local(&w, guard, client_version, r, 0);
    }
    let out = head(guard.stream.as_deref(), client_version);
    let release = Release { pool: w.pool.clone(), addr, sender };
    let idle = std::time::Duration::from_millis(w.route.idle_timeout.0);
    out.map(|()| ProxyBody::upstream(rbody, release, guard, idle))
}

fn reply(status: u16, details: &str) -> LocalReply {
    LocalReply { status, details: details.into(), body: vec![], headers: vec![] }
}

fn fallback(w: &Worker, max: usize) -> Vec<SocketAddr> {
    let n = w.fallback.len();
    if n == 0 {
        return vec![];
    }
    let start = w.next_fallback.get();
    w.next_fallback.set(start.wrapping_add(1));
    (0..n.min(max)).map(|i| w.fallback[(start + i) % n]).collect()
}

fn plain(version: Version, status: StatusCode) -> Response<ProxyBody> {
    let mut r = Response::new(ProxyBody::full(Bytes::new(), None));
    *r.status_mut() = status;
    *r.version_mut() = version;
    r
}

/// The response head to send, from the stream's response.
fn head(stream: Option<&Stream>, version: Version) -> Response<()> {
    let mut out = Response::new(());
    *out.version_mut() = version;
    if let Some(r) = stream.and_then(|s| s.response.as_ref()) {
        *out.status_mut() = r.status;
        *out.headers_mut() = r.headers.clone();
    } else {
        *out.status_mut() = StatusCode::BAD_GATEWAY;
    }
    out
}

fn response_phase(guard: &mut StreamGuard, end_of_stream: bool) {
    let (stream, contexts) = guard.parts();
    for (slot, context, generation) in contexts.iter().rev() {
        if slot.generation() == *generation {
            // a trap here leaves the response as it is; the VM is re-created for the next request
            let _ = slot.call(|vm| vm.on_response_headers(*context, stream, end_of_stream));
        }
    }
}

/// Answers locally (a filter's reply, or the proxy's own), through the filters' response phase.
fn local(w: &Worker, mut guard: StreamGuard, version: Version, r: LocalReply, flags: u64) -> Response<ProxyBody> {
    w.stats.local_replies.inc();
    let mut parts = Response::new(()).into_parts().0;
    parts.status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if !r.body.is_empty() {
        parts.headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain"));
    }
    for (k, v) in &r.headers {
        if let (Ok(k), Ok(v)) = (http::HeaderName::from_bytes(k), http::HeaderValue::from_bytes(v)) {
            parts.headers.append(k, v);
        }
    }
    let body = Bytes::from(r.body);
    if let Some(s) = guard.stream.as_deref_mut() {
        s.flags |= flags;
        s.details = match r.details.as_str() {
            "no_healthy_upstream" => "no_healthy_upstream",
            "upstream_response_timeout" => "upstream_response_timeout",
            "upstream_reset_before_response_started" => "upstream_reset_before_response_started",
            "http1.codec_error" => "http1.codec_error",
            _ => "local_reply",
        };
        s.response = Some(parts);
    }
    response_phase(&mut guard, body.is_empty());
    let out = head(guard.stream.as_deref(), version);
    out.map(|()| ProxyBody::full(body, Some(guard)))
}

/// The request as sent upstream: HTTP/1.1, origin-form target.
fn upstream_request(s: &Stream, body: UpstreamBody) -> Request<UpstreamBody> {
    let mut req = Request::new(body);
    *req.method_mut() = s.request.method.clone();
    *req.uri_mut() = s.request.uri.path_and_query().map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone()));
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = s.request.headers.clone();
    req
}

/// Tries the listed hosts in order. A request never sent (connect failure, or a connection that closed before it
/// was written) moves on with its body; one sent and then reset moves on only if it is safe to repeat (GET, HEAD,
/// OPTIONS without a body). When the failed connection came from the pool (the upstream may have closed it while
/// idle), the same host is tried once more on a new connection first. The error is the Envoy response flags of the
/// last failure.
async fn send(
    w: &Worker,
    s: &mut Stream,
    body: Incoming,
    upstreams: impl Iterator<Item = SocketAddr>,
) -> Result<(Response<Incoming>, SocketAddr, Sender), u64> {
    let bodyless = body.is_end_stream();
    let repeatable = bodyless && matches!(s.request.method, Method::GET | Method::HEAD | Method::OPTIONS);
    let (body, client_failed) = ClientBody::new(body);
    let mut body = Some(body);
    let mut flags = 0;
    'hosts: for (attempt, addr) in upstreams.enumerate() {
        if attempt > 0 {
            w.stats.upstream_rq_retry.inc();
        }
        s.upstream = Some(addr);
        let mut pooled = w.pool.checkout(addr);
        // a pooled connection the upstream closed while idle is not the host's failure: once, the same host gets a
        // new connection
        loop {
            let reused = pooled.is_some();
            let mut sender = match pooled.take() {
                Some(sender) => sender,
                None => match w.pool.connect(addr).await {
                    Err(e) => {
                        tracing::debug!("{e}");
                        w.stats.upstream_cx_connect_fail.inc();
                        flags = rf::UPSTREAM_CONNECTION_FAILURE;
                        continue 'hosts;
                    }
                    Ok(sender) => sender,
                },
            };
            if sender.ready().await.is_err() {
                w.pool.evict(addr);
                if reused {
                    continue;
                }
                flags = rf::UPSTREAM_CONNECTION_TERMINATION;
                continue 'hosts;
            }
            let req_body = match body.take() {
                Some(b) => Either::Left(b),
                None if bodyless => Either::Right(Empty::new()),
                None => break 'hosts,
            };
            w.stats.upstream_rq_total.inc();
            match sender.try_send_request(upstream_request(s, req_body)).await {
                Ok(response) => return Ok((response, addr, sender)),
                Err(mut e) => {
                    w.pool.evict(addr);
                    if client_failed.get() {
                        // the client's body was malformed: its fault, not the upstream's, and nothing to retry
                        return Err(rf::DOWNSTREAM_PROTOCOL_ERROR);
                    }
                    match e.take_message() {
                        // never written: the body is still ours
                        Some(req) => {
                            if let Either::Left(b) = req.into_body() {
                                body = Some(b);
                            }
                            if reused {
                                continue;
                            }
                            flags = rf::UPSTREAM_CONNECTION_TERMINATION;
                            continue 'hosts;
                        }
                        None => {
                            flags = rf::UPSTREAM_REMOTE_RESET;
                            if !repeatable {
                                break 'hosts;
                            }
                            if reused {
                                continue;
                            }
                            continue 'hosts;
                        }
                    }
                }
            }
        }
    }
    Err(flags)
}
