//! Runs real Envoy 1.40 with the shipped `proxy-config/envoy.yaml`, rewritten only where a test must differ: ports
//! (kernel-chosen), the supervisor's address, the absolute path of the built filter, and the filter's JSON.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

use crate::{admin, repo_root, work_dir};

pub struct Envoy {
    child: Child,
    pub admin: SocketAddr,
    pub listener: SocketAddr,
    dir: PathBuf,
}

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
        Envoy::start_with(&render_config(filter_config, supervisor)?).await
    }

    /// Starts Envoy (`--concurrency 2`) with this whole configuration (e.g. a rendered one, edited by a test).
    pub async fn start_with(config: &str) -> anyhow::Result<Envoy> {
        let dir = work_dir("envoy")?;
        let mut child = spawn(&dir, config, 2)?;
        let (admin, listener) = admin::wait_until_ready(&mut child, &dir, "envoy.log", "envoy").await?;
        Ok(Envoy { child, admin, listener, dir })
    }

    /// Runs Envoy with a configuration that must be refused: returns its exit status and log.
    pub async fn start_expecting_failure(
        filter_config: &Value,
        supervisor: SocketAddr,
    ) -> anyhow::Result<(bool, String)> {
        let dir = work_dir("envoy")?;
        let child = spawn(&dir, &render_config(filter_config, supervisor)?, 1)?;
        admin::wait_for_refusal(child, &dir.join("envoy.log")).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.listener)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("envoy.log")).unwrap_or_default()
    }

    /// A stat from the admin `/stats` (None if absent).
    pub async fn stat(&self, name: &str) -> Option<u64> {
        admin::stat(self.admin, name).await
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
                    admin::tail_text(&self.log())
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
