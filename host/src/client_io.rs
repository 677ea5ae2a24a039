//! A client connection's socket as hyper reads it: every read is reported to the connection's timer state
//! ([`crate::conn_timer::ConnState`]: slowloris and idle timeouts) and its request heads are checked for bare line
//! feeds ([`crate::line_ends::LineEnds`]). One wrapper with one read hook, so each byte is looked at in one place;
//! writes go straight through.

use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::conn_timer::ConnState;
use crate::line_ends::LineEnds;

pub struct ClientIo<T> {
    inner: T,
    state: Rc<ConnState>,
    line_ends: LineEnds,
}

impl<T> ClientIo<T> {
    pub fn new(inner: T, state: Rc<ConnState>) -> ClientIo<T> {
        ClientIo { inner, state, line_ends: LineEnds::default() }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ClientIo<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r
            && buf.filled().len() > before
        {
            // the timer sees the bytes as the client sent them; then bare line feeds become NULs for hyper to refuse
            self.state.bytes_read(&buf.filled()[before..]);
            self.line_ends.scan(&mut buf.filled_mut()[before..]);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ClientIo<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
