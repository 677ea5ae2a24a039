//! A worker's upstream connections: HTTP/1.1 keep-alive connections per host, owned by one thread (no locks). A
//! connection goes back to the pool only once its response has been read to the end, so whatever the pool hands out
//! is idle; closed and expired ones are dropped on the way.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{Either, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

use crate::client_body::{ClientBody, FilteredBody};

/// The body of a request to an upstream: the client's (as it came, or as the filters' body callbacks passed it on),
/// or nothing (a retry of a request without a body).
pub type UpstreamBody = Either<Either<ClientBody, FilteredBody>, Empty<Bytes>>;
pub type Sender = SendRequest<UpstreamBody>;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {0} timed out")]
    Timeout(SocketAddr),
    #[error("connect to {0} failed: {1}")]
    Refused(SocketAddr, std::io::Error),
    #[error("HTTP handshake with {0} failed: {1}")]
    Handshake(SocketAddr, hyper::Error),
}

pub struct Pool {
    idle: RefCell<HashMap<SocketAddr, Vec<(Sender, Instant)>>>,
    max_idle: usize,
    idle_timeout: Duration,
    connect_timeout: Duration,
}

impl Pool {
    pub fn new(max_idle: usize, idle_timeout: Duration, connect_timeout: Duration) -> Pool {
        Pool { idle: RefCell::new(HashMap::new()), max_idle, idle_timeout, connect_timeout }
    }

    /// An idle pooled connection to `addr`, if there is one.
    pub fn checkout(&self, addr: SocketAddr) -> Option<Sender> {
        let mut idle = self.idle.borrow_mut();
        let list = idle.get_mut(&addr)?;
        while let Some((sender, since)) = list.pop() {
            if !sender.is_closed() && since.elapsed() < self.idle_timeout {
                return Some(sender);
            }
        }
        None
    }

    /// Returns a connection whose exchange is complete.
    pub fn put(&self, addr: SocketAddr, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.borrow_mut();
        let list = idle.entry(addr).or_default();
        if list.len() < self.max_idle {
            list.push((sender, Instant::now()));
        }
    }

    /// Forgets every idle connection to `addr` (after one of them failed: the others likely will too).
    pub fn evict(&self, addr: SocketAddr) {
        self.idle.borrow_mut().remove(&addr);
    }

    /// A new connection to `addr`, its I/O driven by a task on this thread.
    pub async fn connect(&self, addr: SocketAddr) -> Result<Sender, ConnectError> {
        let tcp = match tokio::time::timeout(self.connect_timeout, tokio::net::TcpStream::connect(addr)).await {
            Err(_) => return Err(ConnectError::Timeout(addr)),
            Ok(Err(e)) => return Err(ConnectError::Refused(addr, e)),
            Ok(Ok(tcp)) => tcp,
        };
        let _ = tcp.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| ConnectError::Handshake(addr, e))?;
        tokio::task::spawn_local(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }
}
