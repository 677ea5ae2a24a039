//! The body of a response the proxy sends: the upstream's, streamed through, or a local reply's. It carries what
//! must happen when the response ends: the upstream connection goes back to the pool (only after a complete body),
//! and the filters get `proxy_on_log` and their contexts are deleted (when the body is dropped, complete or not).
//! An upstream body that brings nothing for the route's `idle_timeout` ends in an error (the client's connection is
//! cut, as Envoy's stream idle timeout does); the timer exists only once the body has had to wait. When filters have
//! response body callbacks, the upstream's frames go through them ([`BodyFilters`]) on the way; their head is already
//! sent, so a local reply, a close or an overflow there resets the stream, as in Envoy.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::body_filters::{BodyFilters, Step};
use crate::conn_timer::ConnState;
use crate::stream_end::StreamGuard;
use crate::upstream::{Pool, Sender};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

enum Inner {
    Upstream(Incoming),
    Full(Option<Bytes>),
}

/// Gives the upstream connection back to the pool.
pub struct Release {
    pub pool: Rc<Pool>,
    pub addr: SocketAddr,
    pub sender: Sender,
}

/// The stream idle timeout of an upstream body: armed at the first wait, pushed back by every frame.
struct Idle {
    after: std::time::Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// The error a body cut off for idleness ends with.
#[derive(Debug)]
pub struct IdleTimeout;

impl std::fmt::Display for IdleTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("upstream response body idle for longer than the route's idle_timeout")
    }
}

impl std::error::Error for IdleTimeout {}

/// A wait for a filter to resume the stream: the wait, the filter's position and its VM generation.
type Waiting = (Pin<Box<dyn Future<Output = bool>>>, usize, u64);

/// What a body's next poll gives.
type Polled = Poll<Option<Result<Frame<Bytes>, BoxError>>>;

/// The response body callbacks an upstream body goes through: the filters, what they let through while the head
/// waited, and how long a filter may hold the stream.
pub struct BodyCallbacks {
    pub filters: BodyFilters,
    pub first: Option<Bytes>,
    pub wait_timeout: std::time::Duration,
}

/// The filters' response body callbacks on an upstream body.
struct Filtered {
    filters: BodyFilters,
    /// Frames ready to go out before the next upstream one.
    queued: std::collections::VecDeque<Frame<Bytes>>,
    /// The end of the body went through the filters.
    ended: bool,
    /// A filter stopped at the end of the body (or its watermark) and is being waited for: its position.
    waiting: Option<Waiting>,
    route_timeout: std::time::Duration,
}

/// A response body cut off by its filters (a local reply, a close or an overflow after the head was sent).
#[derive(Debug)]
pub struct FilterReset;

impl std::fmt::Display for FilterReset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("response body reset by a filter")
    }
}

impl std::error::Error for FilterReset {}

pub struct ProxyBody {
    inner: Inner,
    idle: Option<Idle>,
    release: Option<Release>,
    guard: Option<StreamGuard>,
    conn: Option<Rc<ConnState>>,
    /// The upstream's size is the one sent (false: a filter removed `content-length`, or may change the body).
    sized: bool,
    filtered: Option<Box<Filtered>>,
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        if let Some(c) = &self.conn {
            c.request_done();
        }
    }
}

impl ProxyBody {
    /// The upstream's body, through the response body callbacks if any filter has them.
    pub fn upstream(
        body: Incoming,
        release: Release,
        guard: StreamGuard,
        idle: std::time::Duration,
        sized: bool,
        callbacks: Option<BodyCallbacks>,
    ) -> ProxyBody {
        let filtered = callbacks.map(|c| {
            let ended = body.is_end_stream();
            let queued = c.first.filter(|b| !b.is_empty()).map(Frame::data).into_iter().collect();
            Box::new(Filtered { filters: c.filters, queued, ended, waiting: None, route_timeout: c.wait_timeout })
        });
        let mut b = ProxyBody {
            inner: Inner::Upstream(body),
            idle: Some(Idle { after: idle, timer: None }),
            release: Some(release),
            guard: Some(guard),
            conn: None,
            sized,
            filtered,
        };
        b.release_if_done();
        b
    }

    pub fn full(bytes: Bytes, guard: Option<StreamGuard>) -> ProxyBody {
        let data = if bytes.is_empty() { None } else { Some(bytes) };
        ProxyBody {
            inner: Inner::Full(data),
            idle: None,
            release: None,
            guard,
            conn: None,
            sized: true,
            filtered: None,
        }
    }

    /// Whether the body's length is announced (false: sent chunked over HTTP/1.1).
    pub fn sized(mut self, sized: bool) -> ProxyBody {
        self.sized = sized;
        self
    }

    /// Marks the end of the request on its connection when this body is done.
    pub fn on_connection(mut self, conn: Rc<ConnState>) -> ProxyBody {
        self.conn = Some(conn);
        self
    }

    fn release_if_done(&mut self) {
        if let Inner::Upstream(b) = &self.inner
            && b.is_end_stream()
            && let Some(r) = self.release.take()
        {
            r.pool.put(r.addr, r.sender);
        }
    }
}

impl ProxyBody {
    /// The next frame of the upstream's body (or the local reply's), as it came.
    fn poll_raw(&mut self, cx: &mut Context<'_>) -> Polled {
        let this = self;
        match &mut this.inner {
            Inner::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Inner::Upstream(body) => {
                let polled = Pin::new(body).poll_frame(cx);
                match polled {
                    Poll::Pending => {
                        if let Some(idle) = &mut this.idle {
                            let after = idle.after;
                            let timer = idle.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(after)));
                            if timer.as_mut().poll(cx).is_ready() {
                                // not back to the pool: the upstream connection is in an unknown state
                                this.release = None;
                                this.idle = None;
                                return Poll::Ready(Some(Err(Box::new(IdleTimeout))));
                            }
                        }
                        Poll::Pending
                    }
                    Poll::Ready(None) => {
                        this.release_if_done();
                        Poll::Ready(None)
                    }
                    // Trailers end the body, and go no further: the upstream speaks HTTP/1, whose trailers Envoy drops
                    // unless `enable_trailers` is set (so response trailer callbacks are not reached either).
                    Poll::Ready(Some(Ok(frame))) if frame.is_trailers() => {
                        this.release_if_done();
                        Poll::Ready(None)
                    }
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Some(Idle { after, timer: Some(timer) }) = &mut this.idle {
                            timer.as_mut().reset(tokio::time::Instant::now() + *after);
                        }
                        this.release_if_done();
                        Poll::Ready(Some(Ok(frame)))
                    }
                    Poll::Ready(Some(Err(e))) => {
                        this.release = None;
                        Poll::Ready(Some(Err(Box::new(e))))
                    }
                }
            }
        }
    }

    /// The next frame after the filters' body callbacks.
    fn poll_filtered(&mut self, cx: &mut Context<'_>) -> Polled {
        loop {
            let Some(f) = self.filtered.as_deref_mut() else { return Poll::Ready(None) };
            if let Some(frame) = f.queued.pop_front() {
                return Poll::Ready(Some(Ok(frame)));
            }
            if let Some((wait, position, generation)) = &mut f.waiting {
                if wait.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                let (position, generation) = (*position, *generation);
                f.waiting = None;
                let Some(guard) = self.guard.as_mut() else { return Poll::Ready(None) };
                guard.unpark();
                let current = f.filters.context_at(guard, position).map(|(slot, _, _)| slot.generation());
                if current != Some(generation)
                    || guard.stream.as_deref().is_none_or(|s| s.closed || s.local_reply.is_some())
                {
                    return Poll::Ready(Some(Err(Box::new(FilterReset))));
                }
                let held = f.filters.take_held(position);
                let step = f.filters.run(guard, position + 1, usize::MAX, held, f.ended);
                if let Some(out) = self.on_step(step) {
                    return out;
                }
                continue;
            }
            if f.ended {
                return Poll::Ready(None);
            }
            let (data, end) = match self.poll_raw(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => (Vec::new(), true),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(d) => (d.to_vec(), self.raw_ended()),
                    Err(_) => continue, // not given: poll_raw ends the body at trailers
                },
            };
            let (Some(f), Some(guard)) = (self.filtered.as_deref_mut(), self.guard.as_mut()) else {
                return Poll::Ready(None);
            };
            f.ended = end;
            let step = f.filters.run(guard, 0, usize::MAX, data, end);
            if let Some(out) = self.on_step(step) {
                return out;
            }
        }
    }

    fn raw_ended(&self) -> bool {
        match &self.inner {
            Inner::Full(data) => data.is_none(),
            Inner::Upstream(b) => b.is_end_stream(),
        }
    }

    /// Acts on what the filters gave: `Some` is what to return now, `None` means poll on.
    fn on_step(&mut self, step: Step) -> Option<Polled> {
        let f = self.filtered.as_deref_mut()?;
        match step {
            Step::Forward(b) if !b.is_empty() => Some(Poll::Ready(Some(Ok(Frame::data(b))))),
            Step::Forward(_) | Step::Held => None,
            Step::Wait(position) => {
                let guard = self.guard.as_mut()?;
                let (slot, context, generation) = f.filters.context_at(guard, position)?;
                guard.park(&slot, context);
                let timeout = f.route_timeout;
                let wait = async move { slot.wait_resumed(context, timeout).await };
                f.waiting = Some((Box::pin(wait), position, generation));
                None
            }
            Step::End(_) => {
                self.release = None;
                Some(Poll::Ready(Some(Err(Box::new(FilterReset)))))
            }
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.filtered.is_some() { self.poll_filtered(cx) } else { self.poll_raw(cx) }
    }

    fn is_end_stream(&self) -> bool {
        match &self.filtered {
            Some(f) => f.ended && f.queued.is_empty() && f.waiting.is_none(),
            None => self.raw_ended(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Full(Some(d)) if self.sized => SizeHint::with_exact(d.len() as u64),
            Inner::Full(None) => SizeHint::with_exact(0),
            Inner::Full(Some(_)) => SizeHint::default(),
            Inner::Upstream(b) if self.sized => b.size_hint(),
            Inner::Upstream(_) => SizeHint::default(),
        }
    }
}
