//! The client's request body on its way to the upstream. It remembers whether reading it failed (a malformed chunked
//! body: a chunk size that overflows, a bad line end), so that the proxy answers the client 400 (its request was bad)
//! instead of a 503 that blames the upstream, as Envoy does for a downstream protocol error. When a filter has body
//! callbacks, the upstream gets the body the filters pass on instead ([`FilteredBody`]). Trailers stay behind: the
//! upstream speaks HTTP/1, whose trailers Envoy drops unless `enable_trailers` is set.

use std::cell::Cell;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

pub struct ClientBody {
    inner: Incoming,
    failed: Rc<Cell<bool>>,
}

impl ClientBody {
    /// The body, and a flag set if reading it fails.
    pub fn new(inner: Incoming) -> (ClientBody, Rc<Cell<bool>>) {
        let failed = Rc::new(Cell::new(false));
        (ClientBody { inner, failed: failed.clone() }, failed)
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Err(e))) => {
                self.failed.set(true);
                Poll::Ready(Some(Err(e)))
            }
            // trailers end the body; the HTTP/1 upstream does not get them (Envoy's default, `enable_trailers` off)
            Poll::Ready(Some(Ok(frame))) if frame.is_trailers() => Poll::Ready(None),
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The client's request body after the filters' body callbacks: what they pass on arrives through a channel, fed by
/// the request's own task (see `proxy::pump_request`); the end of the channel is the end of the body.
pub struct FilteredBody {
    rx: tokio::sync::mpsc::Receiver<Frame<Bytes>>,
}

impl FilteredBody {
    pub fn new() -> (tokio::sync::mpsc::Sender<Frame<Bytes>>, FilteredBody) {
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        (tx, FilteredBody { rx })
    }
}

impl Body for FilteredBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        self.rx.poll_recv(cx).map(|f| f.map(Ok))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::new()
    }
}
