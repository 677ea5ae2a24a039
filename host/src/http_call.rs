//! `dispatch_http_call`: makes a filter's HTTP call to a named cluster and returns what the filter will read in
//! `proxy_on_http_call_response`. A failure (no endpoint reachable, timeout, bad answer) is an empty response, as in
//! Envoy, where the filter sees zero headers.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;

use crate::config::ClusterConfig;
use crate::context::{CallResponse, HttpCall};

/// Largest response body a filter is handed.
const MAX_BODY: usize = 16 * 1024 * 1024;

pub async fn execute(cluster: Option<&ClusterConfig>, call: &HttpCall) -> CallResponse {
    let Some(cluster) = cluster else { return CallResponse::default() };
    let timeout = Duration::from_millis(u64::from(call.timeout_ms.max(1)));
    let attempt = async {
        for addr in &cluster.endpoints {
            match exchange(cluster, *addr, call).await {
                Ok(r) => return Some(r),
                Err(e) => tracing::debug!("http call to {} ({addr}) failed: {e}", call.cluster),
            }
        }
        None
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Some(r)) => r,
        Ok(None) => CallResponse::default(),
        Err(_) => {
            tracing::debug!("http call to {} timed out after {timeout:?}", call.cluster);
            CallResponse::default()
        }
    }
}

async fn exchange(
    cluster: &ClusterConfig,
    addr: std::net::SocketAddr,
    call: &HttpCall,
) -> anyhow::Result<CallResponse> {
    let connect = Duration::from_millis(cluster.connect_timeout.0);
    let tcp = tokio::time::timeout(connect, tokio::net::TcpStream::connect(addr)).await??;
    let _ = tcp.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::task::spawn_local(async move {
        let _ = conn.await;
    });
    let mut builder = http::Request::builder();
    for (k, v) in &call.headers {
        builder = match k.as_slice() {
            b":method" => builder.method(v.as_slice()),
            b":path" => builder.uri(v.as_slice()),
            b":authority" => builder.header(http::header::HOST, v.as_slice()),
            k if k.first() == Some(&b':') => builder,
            k => builder.header(k, v.as_slice()),
        };
    }
    let request = builder.body(Full::new(Bytes::copy_from_slice(&call.body)))?;
    let response = sender.send_request(request).await?;
    let (parts, body) = response.into_parts();
    let body = Limited::new(body, MAX_BODY).collect().await.map_err(|e| anyhow::anyhow!("{e}"))?.to_bytes();
    let mut headers = vec![(b":status".to_vec(), parts.status.as_str().as_bytes().to_vec())];
    headers.extend(parts.headers.iter().map(|(k, v)| (k.as_str().as_bytes().to_vec(), v.as_bytes().to_vec())));
    Ok(CallResponse { headers, body: body.to_vec(), trailers: vec![] })
}
