//! Runs the real `equilibrio-supervisor` binary (built by `cargo build -p equilibrio-supervisor`) with a test's
//! configuration, on a free loopback port.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::repo_root;

pub const TOKEN: &str = "integration-token-0123456789";

/// A scaling policy on CPU and request rate (from the filter's reports) with short windows, so that a load step
/// scales a service up and back down within a minute, not the plan's minutes (the autoscaling and Swarm tests).
pub const QUICK_SCALING: &str = "{min_instances: 1, max_instances: 3, target_cpu_percent: 50, slow_start: 2, scale_down_stabilization: 10, scale_down_cooldown: 5, scale_up_cooldown: 3, \
    cpu_utilization: {weight: 0.5, scale_up_threshold: 60, scale_down_threshold: 20, measurement_window: 8}, \
    memory_utilization: {weight: 0, scale_up_threshold: 95, scale_down_threshold: 1, measurement_window: 8}, \
    request_rate: {weight: 0.5, scale_up_threshold: 300, scale_down_threshold: 30, measurement_window: 8}, \
    response_time: {weight: 0, scale_up_threshold: 100000, scale_down_threshold: 1, measurement_window: 8}}";

pub struct Supervisor {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub dir: PathBuf,
    config: PathBuf,
    /// Environment variables added to the process (besides the token).
    env: Vec<(String, String)>,
}

pub fn binary() -> anyhow::Result<PathBuf> {
    let bin = repo_root().join("target/debug/equilibrio-supervisor");
    if !bin.exists() {
        bail!("{} is missing: run `cargo build -p equilibrio-supervisor` (scripts/test does)", bin.display());
    }
    Ok(bin)
}

/// A free loopback port (bound then released: fine for tests on one machine).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Supervisor {
    /// Writes `yaml` (without `listen`/`state_file`, which the harness sets) and starts the supervisor.
    pub async fn start(yaml: &str) -> anyhow::Result<Supervisor> {
        Supervisor::start_with_env(yaml, &[]).await
    }

    /// [`Supervisor::start`] with these environment variables added.
    pub async fn start_with_env(yaml: &str, env: &[(&str, &str)]) -> anyhow::Result<Supervisor> {
        let dir = crate::work_dir("supervisor")?;
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let config = dir.join("supervisor.yaml");
        std::fs::write(&config, format!("listen: {addr}\nstate_file: {}\n{yaml}", dir.join("state.json").display()))?;
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut s = Supervisor { child: None, addr, dir, config, env };
        s.restart().await?;
        Ok(s)
    }

    /// A node of several: `store` (an etcd `store:` section, see [`crate::etcd::Etcd::store_yaml`]) instead of a
    /// state file, and `node_id`.
    pub async fn start_node(node_id: &str, store: &str, yaml: &str) -> anyhow::Result<Supervisor> {
        let dir = crate::work_dir("supervisor")?;
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let config = dir.join("supervisor.yaml");
        std::fs::write(&config, format!("listen: {addr}\nnode_id: {node_id}\n{store}{yaml}"))?;
        let mut s = Supervisor { child: None, addr, dir, config, env: vec![] };
        s.restart().await?;
        Ok(s)
    }

    /// Sends SIGSTOP (`true`) or SIGCONT (`false`) to the process.
    pub fn pause(&self, stop: bool) {
        if let Some(pid) = self.pid() {
            let signal = if stop { "-STOP" } else { "-CONT" };
            let _ = Command::new("kill").arg(signal).arg(pid.to_string()).status();
        }
    }

    /// The service's recent events (the SSE stream's history, read for a second).
    pub async fn event_history(&self, service: &str) -> String {
        let Ok(mut resp) =
            Self::client().get(self.url(&format!("/v1/events?service={service}"))).bearer_auth(TOKEN).send().await
        else {
            return String::new();
        };
        let mut text = String::new();
        let until = Instant::now() + Duration::from_secs(1);
        while let Ok(Ok(Some(chunk))) = tokio::time::timeout_at(until.into(), resp.chunk()).await {
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
        text
    }

    /// Whether this node says it leads (its `equilibrio_supervisor_leader` metric).
    pub async fn leads(&self) -> bool {
        let text =
            async { Self::client().get(self.url("/metrics")).bearer_auth(TOKEN).send().await.ok()?.text().await.ok() };
        text.await.is_some_and(|t| t.lines().any(|l| l.starts_with("equilibrio_supervisor_leader 1")))
    }

    /// Starts the process again on the same configuration and state file.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("supervisor.log"))?;
        let child = Command::new(binary()?)
            .arg("--config")
            .arg(&self.config)
            .env("EQUILIBRIO_TOKEN", TOKEN)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting the supervisor")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(c) = self.child.as_mut()
                && let Some(status) = c.try_wait()?
            {
                bail!("supervisor exited ({status}):\n{}", self.log());
            }
            if reqwest::get(self.url("/livez")).await.is_ok_and(|r| r.status().is_success()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("supervisor did not answer in 15 s:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait: returns whether it exited on its own within `within`.
    pub fn terminate(&mut self, within: Duration) -> bool {
        let Some(mut c) = self.child.take() else { return false };
        let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        false
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("supervisor.log")).unwrap_or_default()
    }

    pub fn client() -> reqwest::Client {
        reqwest::Client::new()
    }

    /// GET with the token, as JSON.
    pub async fn get(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        Ok(Self::client().get(self.url(path)).bearer_auth(TOKEN).send().await?.json().await?)
    }

    /// A call with the token; returns the status and the JSON body (Null when empty).
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        let mut req = Self::client().request(method.parse()?, self.url(path)).bearer_auth(TOKEN);
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b.to_string());
        }
        let r = req.send().await?;
        let status = r.status().as_u16();
        let text = r.text().await?;
        Ok((status, serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)))
    }

    /// Waits until `instance` of `service` has table state `state`; returns how long it took.
    pub async fn wait_state(
        &self,
        service: &str,
        instance: &str,
        state: &str,
        within: Duration,
    ) -> anyhow::Result<Duration> {
        let started = Instant::now();
        loop {
            let v = self.get(&format!("/v1/services/{service}/instances")).await?;
            let now = v.as_array().and_then(|a| a.iter().find(|i| i["id"] == instance)).map(|i| i["state"].clone());
            if now.as_ref().and_then(|s| s.as_str()) == Some(state) {
                return Ok(started.elapsed());
            }
            if started.elapsed() > within {
                bail!("{instance} is {now:?}, not {state}, after {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The index of the first running node (a killed one is skipped) that says it leads.
pub async fn leading(nodes: &[Supervisor]) -> Option<usize> {
    for (i, n) in nodes.iter().enumerate() {
        if n.pid().is_some() && n.leads().await {
            return Some(i);
        }
    }
    None
}

/// [`leading`], asked every 20 ms until one leads or `within` has passed.
pub async fn wait_leading(nodes: &[Supervisor], within: Duration) -> Option<usize> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(i) = leading(nodes).await {
            return Some(i);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.kill9();
    }
}
