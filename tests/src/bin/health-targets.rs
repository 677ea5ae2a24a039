//! `health-targets N`: N tiny HTTP servers on loopback (kernel-chosen ports) that answer 200 to everything; prints
//! one `ip:port` per line, then serves until killed. Stands in for many instances in `scripts/bench-health`.

use std::convert::Infallible;

use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(1);
    let mut out = String::new();
    for _ in 0..n {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        out.push_str(&format!("{}\n", listener.local_addr()?));
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let svc = service_fn(|_req: Request<hyper::body::Incoming>| async {
                        Ok::<_, Infallible>(Response::new(http_body_util::Full::new(hyper::body::Bytes::from_static(
                            b"ok",
                        ))))
                    });
                    let _ =
                        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                });
            }
        });
    }
    print!("{out}");
    use std::io::Write;
    std::io::stdout().flush()?;
    std::future::pending::<()>().await;
    Ok(())
}
