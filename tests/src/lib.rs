//! Harness for the cross-component tests: real HTTP backends, a stand-in for the supervisor's table and EDS, and the
//! built filter running in real Envoy 1.40 (`proxy-config/envoy.yaml`) or in the bundled proxy
//! (`proxy-config/host.yaml`).
//!
//! Everything listens on 127.0.0.1 with ports chosen by the kernel. Envoy and the filter must have been installed and
//! built (`scripts/setup`, `cargo build --release --target wasm32-wasip1 -p equilibrio-filter`); a missing piece is a
//! test failure with a message saying what to run, never a skip.

pub mod admin;
pub mod backend;
pub mod conformance;
pub mod containers;
pub mod envoy;
pub mod etcd;
pub mod host;
pub mod proxy;
pub mod supervisor;
pub mod swarm;
pub mod table_server;

use std::path::PathBuf;

/// A fresh, empty directory for one process a test starts (`target/equilibrio-tests/<kind>-<pid>-<n>`).
pub fn work_dir(kind: &str) -> std::io::Result<PathBuf> {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let dir = repo_root().join(format!("target/equilibrio-tests/{kind}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// One GET: (status, body), or (0, the error) when no answer came.
pub async fn fetch(client: &reqwest::Client, url: &str) -> (u16, String) {
    match client.get(url).send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            (status, r.text().await.unwrap_or_default())
        }
        Err(e) => (0, e.to_string()),
    }
}

/// GETs from `connections` keep-alive connections until `stop` is set; each task's (status, body) per request.
pub fn load_until(
    client: &reqwest::Client,
    url: &str,
    connections: usize,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinSet<Vec<(u16, String)>> {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let (client, url, stop) = (client.clone(), url.to_string(), stop.clone());
        tasks.spawn(async move {
            let mut out = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                out.push(fetch(&client, &url).await);
            }
            out
        });
    }
    tasks
}

/// Sends `n` GETs to `url` over `concurrency` keep-alive connections; returns (status, body) per request.
pub async fn load(client: &reqwest::Client, url: &str, n: usize, concurrency: usize) -> Vec<(u16, String)> {
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, url, next) = (client.clone(), url.to_string(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < n {
                out.push(fetch(&client, &url).await);
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        if let Ok(v) = t.await {
            all.extend(v);
        }
    }
    all
}

/// Counts by body (backends answer with their id).
pub fn by_body(results: &[(u16, String)]) -> std::collections::BTreeMap<String, usize> {
    let mut m = std::collections::BTreeMap::new();
    for (status, body) in results {
        let key = if *status == 200 { body.clone() } else { format!("status {status}") };
        *m.entry(key).or_insert(0) += 1;
    }
    m
}
