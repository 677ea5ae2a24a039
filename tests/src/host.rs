//! Runs the bundled proxy (`target/release/equilibrio-host`) with the shipped `proxy-config/host.yaml`, rewritten
//! only where a test must differ, exactly as [`crate::envoy`] does for Envoy: kernel-chosen ports, the supervisor's
//! address, the absolute path of the built filter, and the filter's JSON.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

use crate::envoy::filter_wasm;
use crate::{admin, repo_root, work_dir};

pub struct Host {
    child: Child,
    pub admin: SocketAddr,
    pub listener: SocketAddr,
    dir: PathBuf,
}

pub fn host_binary() -> anyhow::Result<PathBuf> {
    let bin = repo_root().join("target/release/equilibrio-host");
    if !bin.exists() {
        bail!("{} is missing: run `cargo build --release -p equilibrio-host` (scripts/test does)", bin.display());
    }
    Ok(bin)
}

/// The shipped host config with this test's ports, paths and filter configuration.
pub fn render_config(filter_config: &Value, supervisor: SocketAddr) -> anyhow::Result<String> {
    let template = std::fs::read_to_string(repo_root().join("proxy-config/host.yaml"))?;
    let wasm = filter_wasm()?;
    let json = filter_config.to_string().replace('\'', "''");
    let mut out = String::new();
    for line in template.lines() {
        let trimmed = line.trim_start();
        let indent = &line[..line.len() - trimmed.len()];
        let line = if trimmed.starts_with("configuration: '{") {
            format!("{indent}configuration: '{json}'")
        } else if trimmed.starts_with("file: ") && trimmed.ends_with("equilibrio_filter.wasm") {
            format!("{indent}file: {}", wasm.display())
        } else {
            line.replace("127.0.0.1:10000", "127.0.0.1:0")
                .replace("127.0.0.1:9901", "127.0.0.1:0")
                .replace("[127.0.0.1:9900]", &format!("[{supervisor}]"))
        };
        out.push_str(&line);
        out.push('\n');
    }
    Ok(out)
}

/// The shipped host config for a filter that polls several supervisor nodes: one cluster `supervisor-<i>` per node
/// (the filter's `supervisor.clusters`).
pub fn render_config_nodes(filter_config: &Value, nodes: &[SocketAddr]) -> anyhow::Result<String> {
    let first = *nodes.first().ok_or_else(|| anyhow::anyhow!("no supervisor node"))?;
    let config = render_config(filter_config, first)?;
    let one = format!("  supervisor:\n    connect_timeout: 1s\n    endpoints: [{first}]\n");
    anyhow::ensure!(config.contains(&one), "proxy-config/host.yaml has no `supervisor` cluster block");
    let all: String = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| format!("  supervisor-{i}:\n    connect_timeout: 1s\n    endpoints: [{n}]\n"))
        .collect();
    Ok(config.replace(&one, &all))
}

fn spawn(dir: &Path, config: &str, concurrency: usize, env: &[(&str, &str)]) -> anyhow::Result<Child> {
    let cfg = dir.join("host.yaml");
    std::fs::write(&cfg, config)?;
    let log = std::fs::File::create(dir.join("host.log"))?;
    Command::new(host_binary()?)
        .arg("-c")
        .arg(&cfg)
        .args(["--concurrency", &concurrency.to_string()])
        .arg("--admin-address-path")
        .arg(dir.join("admin"))
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting equilibrio-host")
}

impl Host {
    /// Starts the proxy with 2 workers and waits until its admin answers.
    pub async fn start(filter_config: &Value, supervisor: SocketAddr) -> anyhow::Result<Host> {
        Host::start_with(&render_config(filter_config, supervisor)?, 2).await
    }

    /// Starts the proxy with a complete configuration.
    pub async fn start_with(config: &str, workers: usize) -> anyhow::Result<Host> {
        Host::start_with_env(config, workers, &[]).await
    }

    /// [`Host::start_with`] with these environment variables added.
    pub async fn start_with_env(config: &str, workers: usize, env: &[(&str, &str)]) -> anyhow::Result<Host> {
        let dir = work_dir("host")?;
        let mut child = spawn(&dir, config, workers, env)?;
        let (admin, listener) = admin::wait_until_ready(&mut child, &dir, "host.log", "equilibrio-host").await?;
        Ok(Host { child, admin, listener, dir })
    }

    /// Runs the proxy with a configuration that must be refused: returns its exit status and log.
    pub async fn start_expecting_failure(config: &str) -> anyhow::Result<(bool, String)> {
        let dir = work_dir("host")?;
        let child = spawn(&dir, config, 1, &[])?;
        admin::wait_for_refusal(child, &dir.join("host.log")).await
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process to exit (after a signal) for up to `timeout`; its exit status.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("host.log")).unwrap_or_default()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
