//! One request through the bundled proxy, in Envoy's order: the filters' request phase (which may answer locally or
//! pause), the upstream chosen by the filter (`x-equilibrio-upstream`) with retries on the next listed host, the
//! filters' response phase in reverse order, and the response streamed back; the filters' log phase runs when the
//! response body is done. A paused stream waits parked with its filter (see [`crate::driver`]); when a filter has body
//! callbacks, this request's task feeds the upstream what they pass on ([`crate::body_filters`]).

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Empty};
use hyper::body::{Body, Incoming};
use tokio::time::{Instant, timeout_at};

use crate::abi::types::{Action, response_flags as rf};
use crate::body::{BodyCallbacks, ProxyBody, Release};
use crate::body_filters::{BodyFilters, Ending, Step, payload_too_large, response_too_large};
use crate::client_body::{ClientBody, FilteredBody};
use crate::config::RouteConfig;
use crate::conn_timer::ConnState;
use crate::context::{LocalReply, Stream};
use crate::driver::VmSlot;
use crate::forward::{self, Peer, Upstreams};
use crate::retry_budget;
use crate::stats::Metric;
use crate::stream_end::StreamGuard;
use crate::upstream::{Pool, Sender, UpstreamBody};

/// The proxy's counters, named as Envoy names them.
pub struct ProxyStats {
    pub downstream_rq_total: MetricRef,
    pub upstream_rq_total: MetricRef,
    pub upstream_rq_retry: MetricRef,
    /// Retries the budget refused (Envoy's name).
    pub upstream_rq_retry_overflow: MetricRef,
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
    pub retry_budget: std::sync::Arc<crate::retry_budget::RetryBudget>,
    /// The route cluster's static members, used round robin when no filter names a host.
    pub fallback: Vec<SocketAddr>,
    pub next_fallback: Cell<usize>,
    pub local: SocketAddr,
    pub stats: ProxyStats,
    /// Whether any filter has body (or trailers) callbacks, for requests and for responses: only then do bodies go
    /// through the filters.
    pub body_filters: [bool; 2],
    /// Largest body a filter may buffer (`listener.buffer_limit_kb`).
    pub buffer_limit: usize,
    /// Test-only fault injection (`EQUILIBRIO_FAULT_INJECTION=1`): `x-equilibrio-fault: panic` panics the request.
    pub faults: bool,
}

/// A stream a filter closed (`proxy_close_stream`): the client's stream is reset (HTTP/1.1: the connection closes
/// without a response; HTTP/2: `RST_STREAM`), as Envoy resets it.
#[derive(Debug)]
pub struct Reset;

impl std::fmt::Display for Reset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stream closed by a filter")
    }
}

impl std::error::Error for Reset {}

pub async fn handle(
    w: Rc<Worker>,
    peer: Peer,
    conn: Rc<ConnState>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Reset> {
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
    let served = serve(w, peer, req).await;
    let Ok(mut response) = served else {
        conn.request_done();
        return Err(Reset);
    };
    if health_check {
        response.headers_mut().insert(forward::PROXY_MARK.clone(), http::HeaderValue::from_static("equilibrio-host"));
    }
    Ok(response.map(|body| body.on_connection(conn)))
}

/// Why a request ends before its upstream response: a local reply to send, or a reset.
enum Stop {
    Reply(LocalReply),
    Reset,
}

impl Stop {
    /// How a stream the body filters end stops: with the filter's reply, a reset, or the buffer limit's answer (413
    /// for a request body, 500 for a response's).
    fn ending(e: Ending, response: bool) -> Stop {
        match e {
            Ending::Reply(r) => Stop::Reply(r),
            Ending::Close => Stop::Reset,
            Ending::Overflow if response => Stop::Reply(response_too_large()),
            Ending::Overflow => Stop::Reply(payload_too_large()),
        }
    }
}

/// After a callback: the local reply it asked for, or the close.
fn stopped(guard: &mut StreamGuard) -> Option<Stop> {
    let s = guard.stream.as_deref_mut()?;
    if let Some(r) = s.local_reply.take() {
        return Some(Stop::Reply(r));
    }
    s.closed.then_some(Stop::Reset)
}

/// Parks the stream with the filter that paused it, waits until the filter resumes it (or answers or closes it from
/// a callback), and takes it back.
async fn paused(w: &Worker, guard: &mut StreamGuard, slot: &Rc<VmSlot>, context: u32, generation: u64) -> Option<Stop> {
    guard.park(slot, context);
    // as long as Envoy's stream idle timeout: nothing moves on a stream its filter holds
    let timeout = std::time::Duration::from_millis(w.route.idle_timeout.0);
    let resumed = slot.wait_resumed(context, timeout).await;
    guard.unpark();
    after_wait(guard, slot, generation, resumed)
}

/// What a wait for a filter to resume its stream ended with (the stream taken back): the filter's VM gone (503), its
/// local reply or close, or nothing resuming it (504).
fn after_wait(guard: &mut StreamGuard, slot: &VmSlot, generation: u64, resumed: bool) -> Option<Stop> {
    if slot.generation() != generation || guard.stream.is_none() {
        return Some(Stop::Reply(reply(503, "filter_error")));
    }
    if let Some(stop) = stopped(guard) {
        return Some(stop);
    }
    (!resumed).then(stream_timeout)
}

/// Envoy's answer to a stream idle for its whole idle timeout.
fn stream_timeout() -> Stop {
    Stop::Reply(LocalReply {
        status: 504,
        details: "stream_idle_timeout".into(),
        body: b"stream timeout".to_vec(),
        headers: vec![],
        proxy: true,
    })
}

/// The paths most requests never take (a filter pausing, body callbacks, a new upstream connection, a retry's wait)
/// await boxed futures: a future's size is that of its largest state, and every request's future is moved whole at
/// least once, so the common path should not carry the rare ones' state.
async fn serve(w: Rc<Worker>, peer: Peer, req: Request<Incoming>) -> Result<Response<ProxyBody>, Reset> {
    w.stats.downstream_rq_total.inc();
    let (mut parts, body) = req.into_parts();
    let client_version = parts.version;
    forward::prepare_request(&mut parts, &peer);
    let end_of_stream = body.is_end_stream();
    // the guard owns the stream from here on: however the request ends (even abandoned by the client while the
    // upstream works on it), dropping the guard gives each filter the end of its stream
    let mut guard = StreamGuard::new();
    let mut stream = Box::new(Stream::new(parts, peer.addr, w.local));
    stream.request_complete = end_of_stream;
    guard.stream = Some(stream);

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
        let generation = slot.generation();
        guard.push(slot.clone(), context, generation);
        let mut stop = stopped(&mut guard);
        if stop.is_none() && action == Action::Pause {
            stop = Box::pin(paused(&w, &mut guard, slot, context, generation)).await;
        }
        match stop {
            Some(Stop::Reply(r)) => return local(&w, guard, client_version, r, 0),
            Some(Stop::Reset) => return Err(Reset),
            None => {}
        }
    }

    // upstream
    let Some(s) = guard.stream.as_deref_mut() else {
        return Ok(plain(client_version, StatusCode::INTERNAL_SERVER_ERROR));
    };
    let max = w.route.retries as usize + 1;
    let upstreams = match s.request.headers.remove(&forward::UPSTREAM) {
        Some(v) => Upstreams::listed(v, max),
        None => Upstreams::fixed(fallback(&w, max), max),
    };
    let mut upstreams = upstreams.peekable();
    if upstreams.peek().is_none() {
        w.stats.no_healthy_upstream.inc();
        let r = LocalReply {
            status: 503,
            details: "no_healthy_upstream".into(),
            body: b"no healthy upstream".to_vec(),
            headers: vec![],
            proxy: true,
        };
        return local(&w, guard, client_version, r, rf::NO_HEALTHY_UPSTREAM);
    }
    // one timer for all attempts: the route timeout covers them all, as Envoy's does
    let deadline = Instant::now() + std::time::Duration::from_millis(w.route.timeout.0);
    let tried = Cell::new(None);
    let sent = if w.body_filters[0] && !end_of_stream {
        // the filters' body callbacks see the request body on its way: this task feeds the upstream what they pass
        let head = Head::of(s);
        let (tx, filtered) = FilteredBody::new();
        let outcome = {
            let mut send =
                Box::pin(timeout_at(deadline, send(&w, &head, &tried, Either::Right(filtered), false, upstreams)));
            let mut pump = Box::pin(pump_request(&w, &mut guard, body, tx));
            let mut pumping = true;
            loop {
                tokio::select! {
                    sent = &mut send => break Ok(sent),
                    stop = &mut pump, if pumping => {
                        pumping = false;
                        if let Some(stop) = stop {
                            break Err(stop);
                        }
                    }
                }
            }
        };
        match outcome {
            Ok(sent) => sent,
            Err(Stop::Reply(r)) => return local(&w, guard, client_version, r, 0),
            Err(Stop::Reset) => return Err(Reset),
        }
    } else {
        let head = Head::borrowed(s);
        let (client, failed) = ClientBody::new(body);
        let sent = timeout_at(deadline, send(&w, &head, &tried, Either::Left(client), end_of_stream, upstreams)).await;
        if failed.get() && sent.as_ref().is_ok_and(Result::is_err) {
            // the client's body was malformed: its fault, not the upstream's, and nothing to retry
            Ok(Err(rf::DOWNSTREAM_PROTOCOL_ERROR))
        } else {
            sent
        }
    };
    let Some(s) = guard.stream.as_deref_mut() else {
        return Ok(plain(client_version, StatusCode::INTERNAL_SERVER_ERROR));
    };
    s.upstream = tried.get();
    // sent upstream, or failed there: a local reply now is no longer the client's unread body's concern
    s.request_complete = true;
    let (response, addr, sender) = match sent.unwrap_or(Err(rf::UPSTREAM_REQUEST_TIMEOUT)) {
        Ok(x) => x,
        Err(flags) => {
            let (status, details, text): (u16, &str, &[u8]) = if flags & rf::DOWNSTREAM_PROTOCOL_ERROR != 0 {
                w.stats.downstream_cx_protocol_error.inc();
                (400, "http1.codec_error", b"Bad Request")
            } else if flags & rf::UPSTREAM_REQUEST_TIMEOUT != 0 {
                w.stats.upstream_rq_timeout.inc();
                (504, "upstream_response_timeout", b"upstream request timeout")
            } else if flags & rf::UPSTREAM_CONNECTION_FAILURE != 0 {
                (
                    503,
                    "upstream_reset_before_response_started",
                    b"upstream connect error or disconnect/reset before headers. reset reason: remote connection failure",
                )
            } else {
                // the words Envoy's router uses
                (
                    503,
                    "upstream_reset_before_response_started",
                    b"upstream connect error or disconnect/reset before headers. reset reason: connection termination",
                )
            };
            let r = LocalReply { status, details: details.into(), body: text.to_vec(), headers: vec![], proxy: true };
            return local(&w, guard, client_version, r, flags);
        }
    };
    let (mut rparts, mut rbody) = response.into_parts();
    if rparts.status.is_server_error() {
        w.stats.upstream_rq_5xx.inc();
    }
    forward::strip_hop_by_hop(&mut rparts.headers);
    s.upstream = Some(addr);
    s.details = "via_upstream";
    s.response = Some(rparts);

    // response phase
    let end_of_stream = rbody.is_end_stream();
    let mut filters = w.body_filters[1].then(|| BodyFilters::new(w.filters.len(), true, w.buffer_limit));
    let mut position = 0;
    // body read while a filter held the head: it has been through the filters before `held.from`
    let mut held = Held { data: Vec::new(), from: 0, any: false };
    while let Some((at, slot, context, generation)) = response_phase(&mut guard, position, end_of_stream) {
        // a filter stopped the response head: it goes on once the filter resumes it from another callback; the body
        // goes meanwhile through the filters that saw the head, and waits, buffered up to the limit (beyond it: 500,
        // as Envoy answers)
        let waited = Box::pin(held_head(
            &w,
            &mut guard,
            (&slot, context, generation, at),
            filters.as_mut(),
            &mut rbody,
            &mut held,
        ));
        match waited.await {
            None => {}
            Some(Stop::Reply(r)) => return local_after_head(&w, guard, client_version, r),
            Some(Stop::Reset) => return Err(Reset),
        }
        position = at + 1;
    }
    if let Some(stop) = stopped(&mut guard) {
        return match stop {
            // a local reply from the response phase replaces the response without going through the filters again
            Stop::Reply(r) => local_after_head(&w, guard, client_version, r),
            Stop::Reset => Err(Reset),
        };
    }
    let mut first = None;
    if held.any
        && let Some(f) = filters.as_mut()
    {
        // what was read while the head waited goes on through the filters after the one that held it
        match Box::pin(through(&w, &mut guard, f, held.from, usize::MAX, held.data, rbody.is_end_stream())).await {
            Ok(b) => first = b,
            Err(Stop::Reply(r)) => return local_after_head(&w, guard, client_version, r),
            Err(Stop::Reset) => return Err(Reset),
        }
    } else if !held.data.is_empty() {
        first = Some(Bytes::from(held.data));
    }
    let out = head(guard.stream.as_deref(), client_version);
    // a response whose `content-length` a filter removed is sent chunked (HTTP/1.1), as Envoy sends it
    let sized = out.headers().contains_key(http::header::CONTENT_LENGTH) && filters.is_none();
    let release = Release { pool: w.pool.clone(), addr, sender };
    let idle = std::time::Duration::from_millis(w.route.idle_timeout.0);
    let callbacks = filters.map(|filters| BodyCallbacks { filters, first, wait_timeout: idle });
    Ok(out.map(|()| ProxyBody::upstream(rbody, release, guard, idle, sized, callbacks)))
}

/// Runs body data through the filters at positions `from..to`, waiting for a filter that stops at the end of the body
/// (or at its watermark) to be resumed. `None`: a filter holds the data.
async fn through(
    w: &Worker,
    guard: &mut StreamGuard,
    filters: &mut BodyFilters,
    from: usize,
    to: usize,
    data: Vec<u8>,
    end: bool,
) -> Result<Option<Bytes>, Stop> {
    let mut step = filters.run(guard, from, to, data, end);
    loop {
        match step {
            Step::Forward(b) => return Ok(Some(b)),
            Step::Held => return Ok(None),
            Step::Wait(position) => {
                let (slot, context, generation) = filters.context_at(guard, position).ok_or(Stop::Reset)?;
                if let Some(stop) = paused(w, guard, &slot, context, generation).await {
                    return Err(stop);
                }
                let held = filters.take_held(position);
                step = filters.run(guard, position + 1, to, held, end);
            }
            Step::End(e) => return Err(Stop::ending(e, filters.is_response())),
        }
    }
}

/// A response body read while filters held the response head.
struct Held {
    /// What passed the filters before position `from`.
    data: Vec<u8>,
    from: usize,
    /// A filter held the head.
    any: bool,
}

/// Waits for the filter at response position `at` that stopped the response head (as [`paused`] does), while the
/// upstream body is read and goes through the filters before it (those that saw the head, as in Envoy), into `held`,
/// up to the buffer limit.
async fn held_head(
    w: &Worker,
    guard: &mut StreamGuard,
    (slot, context, generation, at): (&Rc<VmSlot>, u32, u64, usize),
    mut filters: Option<&mut BodyFilters>,
    body: &mut Incoming,
    held: &mut Held,
) -> Option<Stop> {
    use http_body_util::BodyExt;
    held.any = true;
    // what an earlier hold kept first passes the filters between that one and this one
    if let Some(f) = filters.as_deref_mut()
        && held.from < at
    {
        let data = std::mem::take(&mut held.data);
        match f.run(guard, held.from, at, data, false) {
            Step::Forward(b) => held.data = b.to_vec(),
            Step::Held | Step::Wait(_) => {}
            Step::End(e) => return Some(Stop::ending(e, true)),
        }
    }
    held.from = at;
    let mut reading = !body.is_end_stream();
    guard.park(slot, context);
    // as long as Envoy's stream idle timeout: nothing moves on a stream its filter holds
    let timeout = std::time::Duration::from_millis(w.route.idle_timeout.0);
    let outcome = {
        let wait = slot.wait_resumed(context, timeout);
        tokio::pin!(wait);
        loop {
            tokio::select! {
                resumed = &mut wait => break Ok(resumed),
                frame = body.frame(), if reading => {
                    let data = match frame {
                        None | Some(Err(_)) => {
                            reading = false;
                            Vec::new()
                        }
                        Some(Ok(frame)) => {
                            reading = !body.is_end_stream();
                            frame.into_data().map(|d| d.to_vec()).unwrap_or_default()
                        }
                    };
                    match filters.as_deref_mut() {
                        Some(f) if at > 0 => {
                            // the filters before this one run with the stream in hand, and give it back
                            guard.unpark();
                            let step = f.run(guard, 0, at, data, !reading);
                            guard.park(slot, context);
                            match step {
                                Step::Forward(b) => held.data.extend_from_slice(&b),
                                Step::Held | Step::Wait(_) => {}
                                Step::End(e) => break Err(Stop::ending(e, true)),
                            }
                        }
                        _ => held.data.extend_from_slice(&data),
                    }
                    if held.data.len() > w.buffer_limit {
                        break Err(Stop::Reply(response_too_large()));
                    }
                }
            }
        }
    };
    guard.unpark();
    match outcome {
        Ok(resumed) => after_wait(guard, slot, generation, resumed),
        Err(stop) => Some(stop),
    }
}

/// Feeds the upstream the client's body as the filters' body callbacks pass it on; ends with the body, or with the
/// filters' local reply or reset.
async fn pump_request(
    w: &Worker,
    guard: &mut StreamGuard,
    mut body: Incoming,
    tx: tokio::sync::mpsc::Sender<hyper::body::Frame<Bytes>>,
) -> Option<Stop> {
    use http_body_util::BodyExt;
    let mut filters = BodyFilters::new(w.filters.len(), false, w.buffer_limit);
    loop {
        let (data, end) = match body.frame().await {
            None => (Vec::new(), true),
            Some(Err(_)) => {
                w.stats.downstream_cx_protocol_error.inc();
                let r = LocalReply {
                    status: 400,
                    details: "http1.codec_error".into(),
                    body: b"Bad Request".to_vec(),
                    headers: vec![],
                    proxy: true,
                };
                return Some(Stop::Reply(r));
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(d) => (d.to_vec(), body.is_end_stream()),
                Err(frame) => {
                    // Trailers end the body. As in Envoy (HTTP/1 `enable_trailers` off by default), those of an
                    // HTTP/1 client are dropped unseen; an HTTP/2 client's reach the filters; none go on to the
                    // HTTP/1 upstream. What the filters held goes on.
                    let http2 = guard.stream.as_deref().is_some_and(|s| s.request.version == http::Version::HTTP_2);
                    if let (Some(s), Ok(t), true) = (guard.stream.as_deref_mut(), frame.into_trailers(), http2) {
                        s.request_trailers = Some(t);
                        let contexts = guard.filters().to_vec();
                        for (slot, context, generation) in contexts {
                            if slot.generation() == generation {
                                let _ = slot.call(|vm| vm.on_trailers(context, &mut guard.stream, false));
                            }
                            if let Some(stop) = stopped(guard) {
                                return Some(stop);
                            }
                        }
                    }
                    let held = filters.take_all();
                    if !held.is_empty() && tx.send(hyper::body::Frame::data(Bytes::from(held))).await.is_err() {
                        return None;
                    }
                    if let Some(s) = guard.stream.as_deref_mut() {
                        s.request_complete = true;
                    }
                    return None;
                }
            },
        };
        match through(w, guard, &mut filters, 0, usize::MAX, data, end).await {
            Ok(Some(b)) if !b.is_empty() => {
                if tx.send(hyper::body::Frame::data(b)).await.is_err() {
                    return None; // the upstream no longer reads it
                }
            }
            Ok(_) => {}
            Err(stop) => return Some(stop),
        }
        if end {
            if let Some(s) = guard.stream.as_deref_mut() {
                s.request_complete = true;
            }
            return None;
        }
    }
}

fn reply(status: u16, details: &str) -> LocalReply {
    LocalReply { status, details: details.into(), body: vec![], headers: vec![], proxy: true }
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

/// The filters' response-head callbacks, in reverse order, from `position` on (in that order). A filter that stops the
/// head: its position, slot, context and generation (the filters after it have not seen the head yet).
fn response_phase(
    guard: &mut StreamGuard,
    position: usize,
    end_of_stream: bool,
) -> Option<(usize, Rc<VmSlot>, u32, u64)> {
    let (stream, contexts) = guard.parts();
    for (at, (slot, context, generation)) in contexts.iter().rev().enumerate().skip(position) {
        if slot.generation() == *generation {
            // a trap here leaves the response as it is; the VM is re-created for the next request
            let action = slot.call(|vm| vm.on_response_headers(*context, stream, end_of_stream));
            if stream.as_deref().is_some_and(|s| s.local_reply.is_some() || s.closed) {
                return None;
            }
            if matches!(action, Ok(Action::Pause)) && !end_of_stream {
                return Some((at, slot.clone(), *context, *generation));
            }
        }
    }
    None
}

/// Answers locally (a filter's reply, or the proxy's own), through the filters' response phase.
fn local(
    w: &Worker,
    guard: StreamGuard,
    version: Version,
    r: LocalReply,
    flags: u64,
) -> Result<Response<ProxyBody>, Reset> {
    reply_with(w, guard, version, r, flags, true)
}

/// A local reply asked for in the response phase: it replaces the response, and the filters do not see it again.
fn local_after_head(
    w: &Worker,
    guard: StreamGuard,
    version: Version,
    r: LocalReply,
) -> Result<Response<ProxyBody>, Reset> {
    reply_with(w, guard, version, r, 0, false)
}

fn reply_with(
    w: &Worker,
    mut guard: StreamGuard,
    version: Version,
    r: LocalReply,
    flags: u64,
    through_filters: bool,
) -> Result<Response<ProxyBody>, Reset> {
    w.stats.local_replies.inc();
    let mut parts = Response::new(()).into_parts().0;
    parts.status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if !r.body.is_empty() {
        // as Envoy's local replies: the filters see the type, and the length of a filter's reply (the proxy's own
        // go chunked, as Envoy's router sends them, unless they replace a response)
        if !r.proxy || !through_filters {
            parts.headers.insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(r.body.len()));
        }
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
    // a local reply's head goes through the filters' response phase once; a filter stopping it is not waited for
    if through_filters {
        let _ = response_phase(&mut guard, 0, true);
    }
    if guard.stream.as_deref().is_some_and(|s| s.closed) {
        return Err(Reset);
    }
    let mut out = head(guard.stream.as_deref(), version);
    // an HTTP/1 request whose body was not read: the connection cannot be reused, and says so (as Envoy's does)
    let incomplete = guard.stream.as_deref().is_some_and(|s| !s.request_complete);
    if incomplete && version != Version::HTTP_2 {
        out.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
    }
    Ok(out.map(|()| ProxyBody::full(body, Some(guard)).sized(!r.proxy || !through_filters)))
}

/// The request head as sent upstream, borrowed from the stream or (while body callbacks may change the stream)
/// copied out of it.
struct Head<'a> {
    method: std::borrow::Cow<'a, Method>,
    uri: std::borrow::Cow<'a, Uri>,
    headers: std::borrow::Cow<'a, http::HeaderMap>,
}

impl<'a> Head<'a> {
    fn borrowed(s: &'a Stream) -> Head<'a> {
        use std::borrow::Cow::Borrowed;
        Head {
            method: Borrowed(&s.request.method),
            uri: Borrowed(&s.request.uri),
            headers: Borrowed(&s.request.headers),
        }
    }

    fn of(s: &Stream) -> Head<'static> {
        use std::borrow::Cow::Owned;
        // `content-length` stays as the client sent it (a filter that changes the body's length changes it, as in
        // Envoy)
        Head {
            method: Owned(s.request.method.clone()),
            uri: Owned(s.request.uri.clone()),
            headers: Owned(s.request.headers.clone()),
        }
    }
}

/// The request as sent upstream: HTTP/1.1, origin-form target.
fn upstream_request(head: &Head, body: UpstreamBody) -> Request<UpstreamBody> {
    let mut req = Request::new(body);
    *req.method_mut() = head.method.as_ref().clone();
    *req.uri_mut() = head.uri.path_and_query().map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone()));
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = head.headers.as_ref().clone();
    req
}

/// Tries the listed hosts in order. A request never sent (connect failure, or a connection that closed before it
/// was written) moves on with its body; one sent and then reset moves on only if it is safe to repeat (GET, HEAD,
/// OPTIONS without a body). When the failed connection came from the pool (the upstream may have closed it while
/// idle), the same host is tried once more on a new connection first. The error is the Envoy response flags of the
/// last failure; `tried` is the last host tried.
async fn send(
    w: &Worker,
    head: &Head<'_>,
    tried: &Cell<Option<SocketAddr>>,
    body: Either<ClientBody, FilteredBody>,
    bodyless: bool,
    upstreams: impl Iterator<Item = SocketAddr>,
) -> Result<(Response<Incoming>, SocketAddr, Sender), u64> {
    let repeatable = bodyless && matches!(*head.method, Method::GET | Method::HEAD | Method::OPTIONS);
    let mut body = Some(body);
    let mut flags = 0;
    let budget = &w.retry_budget;
    let _request = budget.request();
    let mut _retry = None;
    'hosts: for (attempt, addr) in upstreams.enumerate() {
        if attempt > 0 {
            // within the budget, after a jittered wait
            let Some(held) = budget.retry(&w.route.retry) else {
                w.stats.upstream_rq_retry_overflow.inc();
                break 'hosts;
            };
            _retry = Some(held);
            w.stats.upstream_rq_retry.inc();
            let wait = retry_budget::backoff(attempt as u32, fastrand::f64(), &w.route.retry);
            if !wait.is_zero() {
                Box::pin(tokio::time::sleep(wait)).await;
            }
        }
        tried.set(Some(addr));
        let mut pooled = w.pool.checkout(addr);
        // a pooled connection the upstream closed while idle is not the host's failure: once, the same host gets a
        // new connection
        loop {
            let reused = pooled.is_some();
            let mut sender = match pooled.take() {
                Some(sender) => sender,
                None => match Box::pin(w.pool.connect(addr)).await {
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
            match sender.try_send_request(upstream_request(head, req_body)).await {
                Ok(response) => return Ok((response, addr, sender)),
                Err(mut e) => {
                    w.pool.evict(addr);
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
