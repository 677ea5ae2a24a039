//! Envoy's admin API, which both proxies serve (`--admin-address-path`, `/ready`, `/listeners`, `/stats`,
//! `/stats/prometheus`): starting a proxy process and reading its stats the same way for either.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

/// Waits until the proxy started as `child` (writing its admin address to `dir/admin` and its log to `dir/<log>`)
/// is ready; returns its admin and ingress listener addresses.
pub async fn wait_until_ready(
    child: &mut Child,
    dir: &Path,
    log: &str,
    name: &str,
) -> anyhow::Result<(SocketAddr, SocketAddr)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let client = reqwest::Client::new();
    let admin = loop {
        if let Some(status) = child.try_wait()? {
            bail!("{name} exited at start ({status}):\n{}", tail(&dir.join(log)));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("{name} did not start in 30 s:\n{}", tail(&dir.join(log)));
        }
        if let Ok(text) = std::fs::read_to_string(dir.join("admin"))
            && let Ok(addr) = text.trim().parse::<SocketAddr>()
            && let Ok(r) = client.get(format!("http://{addr}/ready")).send().await
            && r.status().is_success()
        {
            break addr;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let listeners: Value = client.get(format!("http://{admin}/listeners?format=json")).send().await?.json().await?;
    let port = listeners["listener_statuses"][0]["local_address"]["socket_address"]["port_value"]
        .as_u64()
        .context("listener port in /listeners")?;
    Ok((admin, SocketAddr::from(([127, 0, 0, 1], port as u16))))
}

/// Waits (up to 30 s) for a proxy that must refuse its configuration to exit: (exited successfully?, its log).
pub async fn wait_for_refusal(mut child: Child, log: &Path) -> anyhow::Result<(bool, String)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok((status.success(), std::fs::read_to_string(log)?));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok((true, std::fs::read_to_string(log)?));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A stat from the admin `/stats` (None if absent).
pub async fn stat(admin: SocketAddr, name: &str) -> Option<u64> {
    let url = format!("http://{admin}/stats?filter=^{name}$");
    let text = reqwest::get(url).await.ok()?.text().await.ok()?;
    text.lines().find_map(|l| l.strip_prefix(&format!("{name}: ")).and_then(|v| v.trim().parse().ok()))
}

/// Connections accepted by each worker on the ingress listener (`listener.<addr>.worker_<n>.downstream_cx_total`).
pub async fn worker_connections(admin: SocketAddr) -> Vec<u64> {
    let url = format!("http://{admin}/stats?filter=worker_[0-9]+\\.downstream_cx_total$");
    let Ok(r) = reqwest::get(url).await else {
        return vec![];
    };
    let text = r.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("listener.") && !l.starts_with("listener.admin"))
        .filter_map(|l| l.rsplit_once(": ").and_then(|(_, v)| v.trim().parse().ok()))
        .collect()
}

pub async fn prometheus(admin: SocketAddr) -> String {
    match reqwest::get(format!("http://{admin}/stats/prometheus")).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// The last 40 lines of a log file.
pub fn tail(path: &Path) -> String {
    tail_text(&std::fs::read_to_string(path).unwrap_or_default())
}

pub fn tail_text(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
