//! The body of a response the proxy sends: the upstream's, streamed through, or a local reply's. It carries what
//! must happen when the response ends: the upstream connection goes back to the pool (only after a complete body),
//! and the filters get `proxy_on_log` and their contexts are deleted (when the body is dropped, complete or not).
//! An upstream body that brings nothing for the route's `idle_timeout` ends in an error (the client's connection is
//! cut, as Envoy's stream idle timeout does); the timer exists only once the body has had to wait.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

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

pub struct ProxyBody {
    inner: Inner,
    idle: Option<Idle>,
    release: Option<Release>,
    _guard: Option<StreamGuard>,
    conn: Option<Rc<ConnState>>,
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        if let Some(c) = &self.conn {
            c.request_done();
        }
    }
}

impl ProxyBody {
    pub fn upstream(body: Incoming, release: Release, guard: StreamGuard, idle: std::time::Duration) -> ProxyBody {
        let mut b = ProxyBody {
            inner: Inner::Upstream(body),
            idle: Some(Idle { after: idle, timer: None }),
            release: Some(release),
            _guard: Some(guard),
            conn: None,
        };
        b.release_if_done();
        b
    }

    pub fn full(bytes: Bytes, guard: Option<StreamGuard>) -> ProxyBody {
        let data = if bytes.is_empty() { None } else { Some(bytes) };
        ProxyBody { inner: Inner::Full(data), idle: None, release: None, _guard: guard, conn: None }
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

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
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

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Full(data) => data.is_none(),
            Inner::Upstream(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Full(Some(d)) => SizeHint::with_exact(d.len() as u64),
            Inner::Full(None) => SizeHint::with_exact(0),
            Inner::Upstream(b) => b.size_hint(),
        }
    }
}
