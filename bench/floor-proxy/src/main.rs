//! Benchmark reference only: the floor of an HTTP/1 reverse proxy on tokio and httparse, to price what the bundled
//! proxy's machinery (hyper's server and client, header maps, the filter) costs above it. One current-thread runtime,
//! round robin over the backends, keep-alive on both sides, and for each request what any proxy must do: parse the
//! head, write it upstream in one write, parse the response head, read a `content-length` body and write the response
//! in one write, the upstream connection driven inside the client's task. Nothing else: GET-style requests without a
//! body, responses with a `content-length` of at most 1 MiB, anything else closes the connection. `scripts/bench` runs it as the case
//! `floor_proxy` (`BENCH_CASES="nginx_rr host_filter floor_proxy" scripts/bench`); it serves no user.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser)]
#[command(about = "The floor of an HTTP/1 reverse proxy (benchmark reference)")]
struct Args {
    /// Where to listen.
    listen: SocketAddr,
    /// The backends, used round robin.
    #[arg(required = true)]
    backends: Vec<SocketAddr>,
}

/// A request or response head larger than this closes the connection.
const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 64;
/// A response body is read whole before it is written (a reference, not a streaming proxy): larger ones close.
const MAX_BODY: usize = 1024 * 1024;

/// A kept-alive upstream connection and what it has read past the last response.
struct Upstream {
    stream: TcpStream,
    buf: Vec<u8>,
}

struct Backends {
    addrs: Vec<SocketAddr>,
    idle: Vec<RefCell<Vec<Upstream>>>,
    next: Cell<usize>,
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_current_thread().enable_io().build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        let backends = Rc::new(Backends {
            idle: args.backends.iter().map(|_| RefCell::new(Vec::new())).collect(),
            addrs: args.backends,
            next: Cell::new(0),
        });
        let listener = TcpListener::bind(args.listen).await?;
        loop {
            let Ok((client, _)) = listener.accept().await else { continue };
            let _ = client.set_nodelay(true);
            let backends = backends.clone();
            tokio::task::spawn_local(async move {
                let _ = serve(client, &backends).await;
            });
        }
    })
}

fn closed() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed")
}

/// A head this proxy does not take: malformed, or asking for what it does not do (a request body, a response
/// without a `content-length` or with a larger one than [`MAX_BODY`]).
struct Refused;

impl From<httparse::Error> for Refused {
    fn from(_: httparse::Error) -> Refused {
        Refused
    }
}

/// Reads into `buf` until `parse` finds a complete head in it; the head's length and what `parse` made of it.
async fn read_head<T>(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    mut parse: impl FnMut(&[u8]) -> Result<Option<(usize, T)>, Refused>,
) -> std::io::Result<(usize, T)> {
    loop {
        match parse(buf) {
            Ok(Some(done)) => return Ok(done),
            Ok(None) if buf.len() < MAX_HEAD => {
                buf.reserve(4096);
                if stream.read_buf(buf).await? == 0 {
                    return Err(closed());
                }
            }
            _ => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "refused or oversized head")),
        }
    }
}

/// Appends `name: value` lines, without `connection` (hop by hop).
fn copy_headers(out: &mut Vec<u8>, headers: &[httparse::Header<'_>]) {
    for h in headers.iter().filter(|h| !h.name.eq_ignore_ascii_case("connection")) {
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
}

async fn serve(mut client: TcpStream, backends: &Backends) -> std::io::Result<()> {
    let peer = client.peer_addr()?.ip().to_string();
    let mut buf = Vec::with_capacity(8192);
    let mut out = Vec::with_capacity(8192);
    loop {
        // the request head, rewritten for the upstream as it is parsed
        let (head, ()) = read_head(&mut client, &mut buf, |bytes| {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut req = httparse::Request::new(&mut headers);
            let httparse::Status::Complete(n) = req.parse(bytes)? else { return Ok(None) };
            let has_body = req.headers.iter().any(|h| {
                h.name.eq_ignore_ascii_case("transfer-encoding")
                    || (h.name.eq_ignore_ascii_case("content-length") && h.value != b"0")
            });
            if has_body {
                return Err(Refused);
            }
            out.clear();
            out.extend_from_slice(req.method.unwrap_or("GET").as_bytes());
            out.push(b' ');
            out.extend_from_slice(req.path.unwrap_or("/").as_bytes());
            out.extend_from_slice(b" HTTP/1.1\r\n");
            copy_headers(&mut out, req.headers);
            out.extend_from_slice(b"x-forwarded-for: ");
            out.extend_from_slice(peer.as_bytes());
            out.extend_from_slice(b"\r\n\r\n");
            Ok(Some((n, ())))
        })
        .await?;
        buf.drain(..head);

        let i = backends.next.get() % backends.addrs.len();
        backends.next.set(backends.next.get().wrapping_add(1));
        let pooled = backends.idle[i].borrow_mut().pop();
        let mut up = match pooled {
            Some(up) => up,
            None => {
                let stream = TcpStream::connect(backends.addrs[i]).await?;
                let _ = stream.set_nodelay(true);
                Upstream { stream, buf: Vec::with_capacity(8192) }
            }
        };
        up.stream.write_all(&out).await?;

        // the response head, rewritten for the client; then its body
        let (head, length) = read_head(&mut up.stream, &mut up.buf, |bytes| {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut resp = httparse::Response::new(&mut headers);
            let httparse::Status::Complete(n) = resp.parse(bytes)? else { return Ok(None) };
            let length = resp
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok()?.parse::<usize>().ok())
                .filter(|&length| length <= MAX_BODY)
                .ok_or(Refused)?;
            // httparse reads exactly three digits
            let code = resp.code.unwrap_or(502);
            out.clear();
            out.extend_from_slice(b"HTTP/1.1 ");
            out.extend([code / 100, code / 10 % 10, code % 10].map(|d| b'0' + d as u8));
            out.push(b' ');
            out.extend_from_slice(resp.reason.unwrap_or("").as_bytes());
            out.extend_from_slice(b"\r\n");
            copy_headers(&mut out, resp.headers);
            out.extend_from_slice(b"\r\n");
            Ok(Some((n, length)))
        })
        .await?;
        let end = head.saturating_add(length);
        while up.buf.len() < end {
            up.buf.reserve(end - up.buf.len());
            if up.stream.read_buf(&mut up.buf).await? == 0 {
                return Err(closed());
            }
        }
        out.extend_from_slice(&up.buf[head..end]);
        up.buf.drain(..end);
        backends.idle[i].borrow_mut().push(up);
        client.write_all(&out).await?;
    }
}
