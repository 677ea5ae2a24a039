//! The differential conformance harness: the same chain of proxy-wasm modules (`tests/corpus`) runs in real Envoy
//! (the reference) and in `equilibrio-host`, both routed to one recording upstream; the same requests go to both, over
//! HTTP/1.1 and HTTP/2; what a client sees (status, headers, body, reset, how long it took) and what the filters log is
//! compared. Differences that are Envoy's own additions are dropped by name here and listed in `docs/host.md`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

use crate::{admin, repo_root, work_dir};

/// The route timeout both proxies get: a request slower than this is answered 504.
pub const ROUTE_TIMEOUT_MS: u64 = 2000;
/// The per-request body buffer limit both proxies get (Envoy's `per_connection_buffer_limit_bytes`).
pub const BUFFER_LIMIT: usize = 64 * 1024;

/// Response headers only Envoy adds (`server: envoy`, its upstream timing) or whose values differ by nature (`date`).
pub const ENVOY_RESPONSE_HEADERS: [&str; 3] = ["date", "server", "x-envoy-upstream-service-time"];
/// Headers only Envoy adds on the way (to the filters' views, to the upstream, to HTTP-call answers).
pub const ENVOY_HEADERS: [&str; 4] =
    ["x-envoy-expected-rq-timeout-ms", "x-envoy-internal", "x-envoy-external-address", "x-envoy-upstream-service-time"];
/// The stream idle timeout both proxies get (Envoy's `stream_idle_timeout`, the host's `route.idle_timeout`): a
/// stream a filter holds without end is answered (or cut) after it.
pub const IDLE_TIMEOUT_MS: u64 = 3000;

/// A module of the corpus in the chain, in order.
pub struct Module {
    /// The plugin's name, root id and VM id.
    pub name: &'static str,
    /// The built `.wasm`, from the repository root.
    pub file: &'static str,
    pub configuration: &'static str,
}

pub fn corpus_wasm(m: &Module) -> anyhow::Result<PathBuf> {
    let path = repo_root().join(m.file);
    if !path.exists() {
        bail!(
            "{} is missing: run `cargo build --release --target wasm32-wasip1 -p equilibrio-corpus --examples` and \
             `npm run build` in tests/corpus/assemblyscript (scripts/test does both)",
            path.display()
        );
    }
    Ok(path)
}

/// Envoy's configuration: the modules as Wasm HTTP filters (V8) before the router, one static upstream.
pub fn envoy_config(modules: &[Module], upstream: SocketAddr) -> anyhow::Result<String> {
    let mut filters = String::new();
    for m in modules {
        let wasm = corpus_wasm(m)?;
        filters.push_str(&format!(
            r#"          - name: envoy.filters.http.wasm
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: {name}
                root_id: {name}
                vm_config:
                  vm_id: {name}
                  runtime: envoy.wasm.runtime.v8
                  code: {{local: {{filename: {wasm}}}}}
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: '{config}'
"#,
            name = m.name,
            wasm = wasm.display(),
            config = m.configuration
        ));
    }
    let cluster = |name: &str| {
        format!(
            r#"  - name: {name}
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}
"#,
            port = upstream.port()
        )
    };
    Ok(format!(
        r#"admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
static_resources:
  listeners:
  - name: ingress
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    per_connection_buffer_limit_bytes: {limit}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          use_remote_address: true
          generate_request_id: false
          stream_idle_timeout: {idle}s
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                route: {{cluster: upstream, timeout: {timeout}s}}
          http_filters:
{filters}          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
{upstream}{auth}"#,
        limit = BUFFER_LIMIT,
        timeout = ROUTE_TIMEOUT_MS / 1000,
        idle = IDLE_TIMEOUT_MS / 1000,
        upstream = cluster("upstream"),
        auth = cluster("auth"),
    ))
}

/// The bundled proxy's configuration with the same modules, route and clusters.
pub fn host_config(modules: &[Module], upstream: SocketAddr) -> anyhow::Result<String> {
    let mut filters = String::new();
    for m in modules {
        let wasm = corpus_wasm(m)?;
        filters.push_str(&format!(
            "- name: {name}\n  root_id: {name}\n  vm_id: {name}\n  file: {wasm}\n  configuration: '{config}'\n",
            name = m.name,
            wasm = wasm.display(),
            config = m.configuration
        ));
    }
    Ok(format!(
        "listener:\n  address: 127.0.0.1:0\n  buffer_limit_kb: {limit}\nadmin:\n  address: 127.0.0.1:0\n\
         route:\n  cluster: upstream\n  timeout: {timeout}ms\n  idle_timeout: {idle}ms\n  retries: 0\n\
         clusters:\n  upstream:\n    endpoints: [{upstream}]\n  auth:\n    endpoints: [{upstream}]\n\
         http_filters:\n{filters}",
        limit = BUFFER_LIMIT / 1024,
        timeout = ROUTE_TIMEOUT_MS,
        idle = IDLE_TIMEOUT_MS,
    ))
}

/// A proxy under comparison: its listener and log file.
pub struct Proxy {
    pub name: &'static str,
    pub listener: SocketAddr,
    pub log: PathBuf,
    child: std::process::Child,
}

impl Proxy {
    pub async fn start(name: &'static str, binary: PathBuf, args: &[&str], config: &str) -> anyhow::Result<Proxy> {
        let dir = work_dir(&format!("conformance-{name}"))?;
        let file = dir.join("config.yaml");
        std::fs::write(&file, config)?;
        let log = dir.join("proxy.log");
        let mut child = std::process::Command::new(binary)
            .arg("-c")
            .arg(&file)
            .args(args)
            .arg("--admin-address-path")
            .arg(dir.join("admin"))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let (_, listener) = admin::wait_until_ready(&mut child, &dir, "proxy.log", name).await?;
        Ok(Proxy { name, listener, log, child })
    }

    /// The log's length now (where the next case's lines start).
    pub fn log_offset(&self) -> u64 {
        std::fs::metadata(&self.log).map_or(0, |m| m.len())
    }

    /// What the filters logged since `offset`: the text after `corpus: ` on each line.
    pub fn corpus_lines(&self, offset: u64) -> Vec<String> {
        let text = std::fs::read(&self.log).unwrap_or_default();
        let text = String::from_utf8_lossy(text.get(offset as usize..).unwrap_or_default()).into_owned();
        text.lines().filter_map(|l| l.split_once("corpus: ").map(|(_, m)| m.trim().to_string())).collect()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
}

/// A request body as the client sends it.
#[derive(Clone, Debug)]
pub enum SendBody {
    None,
    /// With `content-length`.
    Sized(Vec<u8>),
    /// In these pieces, 20 ms apart, without a length (chunked over HTTP/1.1).
    Chunked(Vec<Vec<u8>>),
    /// In pieces as `Chunked`, then these trailers (over HTTP/1.1 the request must name them in a `trailer` header).
    Trailed(Vec<Vec<u8>>, Vec<(&'static str, &'static str)>),
}

#[derive(Clone, Debug)]
pub struct Request {
    pub method: &'static str,
    pub path: String,
    pub headers: Vec<(&'static str, String)>,
    pub body: SendBody,
}

/// What a client observed.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Response {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    },
    /// The stream or connection was reset before a complete response.
    Reset,
    /// Nothing within 10 s.
    NoAnswer,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Observation {
    pub outcome: Outcome,
    /// `immediate`, or `timeout` (the route timeout or longer).
    pub timing: &'static str,
    pub logs: Vec<String>,
}

/// A body sent in pieces (and perhaps trailers).
struct Pieces {
    rx: tokio::sync::mpsc::Receiver<Frame<Bytes>>,
}

impl Body for Pieces {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.rx.poll_recv(cx).map(|f| f.map(Ok))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::new()
    }
}

type ClientBody = http_body_util::Either<Full<Bytes>, Pieces>;

fn body_of(body: &SendBody) -> ClientBody {
    match body {
        SendBody::None => http_body_util::Either::Left(Full::new(Bytes::new())),
        SendBody::Sized(b) => http_body_util::Either::Left(Full::new(Bytes::from(b.clone()))),
        SendBody::Chunked(pieces) => sent_in_pieces(pieces, &[]),
        SendBody::Trailed(pieces, trailers) => sent_in_pieces(pieces, trailers),
    }
}

fn sent_in_pieces(pieces: &[Vec<u8>], trailers: &[(&'static str, &'static str)]) -> ClientBody {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut frames: Vec<Frame<Bytes>> = pieces.iter().map(|p| Frame::data(Bytes::from(p.clone()))).collect();
    if !trailers.is_empty() {
        let mut map = hyper::HeaderMap::new();
        for (k, v) in trailers {
            map.append(*k, hyper::header::HeaderValue::from_static(v));
        }
        frames.push(Frame::trailers(map));
    }
    tokio::spawn(async move {
        for f in frames {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if tx.send(f).await.is_err() {
                break;
            }
        }
    });
    http_body_util::Either::Right(Pieces { rx })
}

/// Sends `request` to `proxy` on a new connection and observes the answer and the filters' logs.
pub async fn observe(proxy: &Proxy, protocol: Protocol, request: &Request) -> anyhow::Result<Observation> {
    let offset = proxy.log_offset();
    let started = Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs(10), exchange(proxy.listener, protocol, request))
        .await
        .unwrap_or(Ok(Outcome::NoAnswer))?;
    let elapsed = started.elapsed();
    let timing = if elapsed >= Duration::from_millis(IDLE_TIMEOUT_MS * 3 / 4) {
        "idle timeout"
    } else if elapsed >= Duration::from_millis(ROUTE_TIMEOUT_MS * 3 / 4) {
        "route timeout"
    } else {
        "immediate"
    };
    // the log phase runs when the response ends; give both proxies the same moment to write it
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(Observation { outcome, timing, logs: proxy.corpus_lines(offset) })
}

async fn exchange(addr: SocketAddr, protocol: Protocol, request: &Request) -> anyhow::Result<Outcome> {
    let tcp = TcpStream::connect(addr).await?;
    let mut builder = hyper::Request::builder().method(request.method);
    builder = match protocol {
        Protocol::Http1 => builder.uri(request.path.as_str()).header("host", "conformance.test"),
        Protocol::Http2 => builder.uri(format!("http://conformance.test{}", request.path)),
    };
    for (k, v) in &request.headers {
        builder = builder.header(*k, v.as_str());
    }
    let req = builder.body(body_of(&request.body))?;
    let response = match protocol {
        Protocol::Http1 => {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
            tokio::spawn(conn);
            sender.send_request(req).await
        }
        Protocol::Http2 => {
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await?;
            tokio::spawn(conn);
            sender.send_request(req).await
        }
    };
    let Ok(response) = response else { return Ok(Outcome::Reset) };
    let status = response.status().as_u16();
    let mut headers: Vec<(String, String)> = response
        .headers()
        .iter()
        .filter(|(k, _)| !ENVOY_RESPONSE_HEADERS.contains(&k.as_str()))
        .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    headers.sort();
    let Ok(body) = response.into_body().collect().await else { return Ok(Outcome::Reset) };
    Ok(Outcome::Response { status, headers, body: String::from_utf8_lossy(&body.to_bytes()).into_owned() })
}

/// The recording upstream both proxies route to:
/// - `/echo`: the request as received (method, path, headers without Envoy's own, body, trailers), as text;
/// - `/secret`: a body with secrets in it, with its length; `/secret-chunked`: the same in three chunks;
/// - `/big?kb=N`: N KiB; `/slow`: answers after 5 s (beyond the route timeout);
/// - `/reset`: closes the connection without an answer; `/auth`: 200 for `x-user: alice`, else 403;
/// - anything else: 200 `ok`.
pub struct Upstream {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Debug)]
struct Abort;

impl std::fmt::Display for Abort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("aborted on purpose")
    }
}

impl std::error::Error for Abort {}

type UpstreamBody = http_body_util::Either<Full<Bytes>, Pieces>;

fn pieces(parts: &[&'static str]) -> UpstreamBody {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let parts: Vec<&'static str> = parts.to_vec();
    tokio::spawn(async move {
        for p in parts {
            tokio::time::sleep(Duration::from_millis(10)).await;
            if tx.send(Frame::data(Bytes::from_static(p.as_bytes()))).await.is_err() {
                break;
            }
        }
    });
    http_body_util::Either::Right(Pieces { rx })
}

async fn answer(req: hyper::Request<Incoming>) -> Result<hyper::Response<UpstreamBody>, Abort> {
    let (parts, body) = req.into_parts();
    let collected = body.collect().await.map_err(|_| Abort)?;
    let trailers: Vec<String> = collected
        .trailers()
        .map(|t| t.iter().map(|(k, v)| format!("{k}={}", String::from_utf8_lossy(v.as_bytes()))).collect())
        .unwrap_or_default();
    let body = collected.to_bytes();
    let full = |s: String| http_body_util::Either::Left(Full::new(Bytes::from(s)));
    let path = parts.uri.path();
    let query = parts.uri.query().unwrap_or_default();
    let mut status = 200;
    let out = match path {
        "/echo" => {
            let mut headers: Vec<String> = parts
                .headers
                .iter()
                .filter(|(k, _)| !ENVOY_HEADERS.contains(&k.as_str()))
                .map(|(k, v)| format!("{k}: {}", String::from_utf8_lossy(v.as_bytes())))
                .collect();
            headers.sort();
            full(format!(
                "{} {}\n{}\nbody: {}\ntrailers: {}\n",
                parts.method,
                parts.uri,
                headers.join("\n"),
                String::from_utf8_lossy(&body),
                trailers.join(" ")
            ))
        }
        "/secret" => full("the secret is: secret\n".into()),
        "/secret-chunked" => pieces(&["the secret ", "is: sec", "ret\n"]),
        "/big" => {
            let kb: usize = query.strip_prefix("kb=").and_then(|v| v.parse().ok()).unwrap_or(1);
            full("x".repeat(kb * 1024))
        }
        "/slow" => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            full("slow\n".into())
        }
        "/reset" => return Err(Abort),
        "/auth" => {
            let user = parts.headers.get("x-user").map(|v| v.as_bytes().to_vec()).unwrap_or_default();
            if user != b"alice" {
                status = 403;
            }
            full(format!("user {}\n", String::from_utf8_lossy(&user)))
        }
        _ => full("ok\n".into()),
    };
    let mut response = hyper::Response::new(out);
    *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or_default();
    response.headers_mut().insert("x-upstream", hyper::header::HeaderValue::from_static("conformance"));
    Ok(response)
}

impl Upstream {
    pub async fn start() -> anyhow::Result<Upstream> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(answer);
                    let _ =
                        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), service).await;
                });
            }
        });
        Ok(Upstream { addr, task })
    }
}
