//! The admin endpoint, with Envoy's paths so that tools and tests treat both proxies alike: `/ready`, `/stats`
//! (`?filter=<regex>`), `/stats/prometheus`, `/listeners?format=json`, `/server_info`. Read-only, and on loopback
//! by default: it has no authentication.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::stats::Stats;

pub struct Admin {
    pub stats: Arc<Stats>,
    pub listener: SocketAddr,
    pub started: std::time::Instant,
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(content_type));
    r
}

fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Admin {
    pub fn route(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let query = req.uri().query().unwrap_or("");
        match req.uri().path() {
            "/ready" => respond(StatusCode::OK, "text/plain", "LIVE\n".into()),
            "/stats" => {
                let filter = match query_param(query, "filter").map(|f| regex_lite::Regex::new(&f)) {
                    None => None,
                    Some(Ok(re)) => Some(re),
                    Some(Err(e)) => {
                        return respond(StatusCode::BAD_REQUEST, "text/plain", format!("invalid filter regex: {e}\n"));
                    }
                };
                respond(StatusCode::OK, "text/plain", self.stats.render_text(filter.as_ref()))
            }
            "/stats/prometheus" => respond(StatusCode::OK, "text/plain; version=0.0.4", self.stats.render_prometheus()),
            "/listeners" => {
                let body = serde_json::json!({"listener_statuses": [{
                    "name": "ingress",
                    "local_address": {"socket_address": {
                        "address": self.listener.ip().to_string(),
                        "port_value": self.listener.port(),
                    }},
                }]});
                respond(StatusCode::OK, "application/json", body.to_string())
            }
            "/server_info" => {
                let body = serde_json::json!({
                    "version": concat!("equilibrio-host/", env!("CARGO_PKG_VERSION")),
                    "state": "LIVE",
                    "uptime_current_epoch": format!("{}s", self.started.elapsed().as_secs()),
                });
                respond(StatusCode::OK, "application/json", body.to_string())
            }
            _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
        }
    }
}

/// Serves the admin endpoint on `listener` until the process ends.
pub fn spawn(admin: Arc<Admin>, listener: std::net::TcpListener) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("admin".into()).spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
        rt.block_on(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else { return };
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                let admin = admin.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let r = admin.route(&req);
                        async move { Ok::<_, Infallible>(r) }
                    });
                    let _ =
                        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), service).await;
                });
            }
        });
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_are_decoded() {
        assert_eq!(query_param("a=1&filter=%5Ewasm.%2A%24", "filter").unwrap(), "^wasm.*$");
        assert_eq!(query_param("filter=worker_[0-9]+\\.x", "filter").unwrap(), "worker_[0-9]+\\.x");
        assert_eq!(percent_decode("%"), "%");
        assert_eq!(percent_decode("%4"), "%4");
        assert!(query_param("a=1", "filter").is_none());
    }
}
