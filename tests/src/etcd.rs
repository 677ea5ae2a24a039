//! Runs real etcd (Debian's `etcd-server`, installed by `scripts/setup`): one member, or a cluster of three for the
//! failure tests, on free loopback ports with data in fresh directories; optionally with TLS and client certificates.
//! Members can be killed and started again. Health is read on a plain-HTTP metrics port, whatever the client port
//! speaks.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::supervisor::free_port;

struct Member {
    name: String,
    client: u16,
    peer: u16,
    metrics: u16,
    dir: PathBuf,
    child: Option<Child>,
}

pub struct Etcd {
    members: Vec<Member>,
    initial_cluster: String,
    tls: Option<Tls>,
}

/// The PEM files of a TLS etcd: the CA, the server's certificate and key (for 127.0.0.1); clients must present a
/// certificate the CA signed.
#[derive(Clone)]
pub struct Tls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub fn binary() -> anyhow::Result<PathBuf> {
    let bin = PathBuf::from("/usr/bin/etcd");
    if !bin.exists() {
        bail!("{} is missing: run scripts/setup (it installs etcd-server)", bin.display());
    }
    Ok(bin)
}

impl Etcd {
    /// A cluster of `n` members (1 or 3), every member answering.
    pub async fn start(n: usize) -> anyhow::Result<Etcd> {
        Etcd::start_with(n, None).await
    }

    /// [`Etcd::start`] speaking TLS to clients (`https://` endpoints) and requiring their certificates.
    pub async fn start_with(n: usize, tls: Option<Tls>) -> anyhow::Result<Etcd> {
        let root = crate::work_dir("etcd")?;
        let mut members = Vec::new();
        for i in 0..n {
            members.push(Member {
                name: format!("m{i}"),
                client: free_port()?,
                peer: free_port()?,
                metrics: free_port()?,
                dir: root.join(format!("m{i}")),
                child: None,
            });
        }
        let initial_cluster =
            members.iter().map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer)).collect::<Vec<_>>().join(",");
        let mut etcd = Etcd { members, initial_cluster, tls };
        for i in 0..n {
            etcd.spawn(i)?;
        }
        for i in 0..n {
            etcd.wait_healthy(i, Duration::from_secs(20)).await?;
        }
        Ok(etcd)
    }

    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let initial_cluster = self.initial_cluster.clone();
        let scheme = self.scheme();
        let tls = self.tls.clone();
        let m = &mut self.members[i];
        std::fs::create_dir_all(&m.dir)?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(m.dir.with_extension("log"))?;
        let mut command = Command::new(binary()?);
        if let Some(t) = &tls {
            command.arg("--cert-file").arg(&t.cert).arg("--key-file").arg(&t.key);
            command.arg("--trusted-ca-file").arg(&t.ca).arg("--client-cert-auth");
        }
        let child = command
            .args(["--name", &m.name, "--data-dir"])
            .arg(&m.dir)
            .args(["--listen-client-urls", &format!("{scheme}://127.0.0.1:{}", m.client)])
            .args(["--advertise-client-urls", &format!("{scheme}://127.0.0.1:{}", m.client)])
            .args(["--listen-metrics-urls", &format!("http://127.0.0.1:{}", m.metrics)])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{}", m.peer)])
            .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{}", m.peer)])
            .args(["--initial-cluster", &initial_cluster, "--initial-cluster-state", "new"])
            // quick elections: a test kills members and waits for the others
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting etcd")?;
        m.child = Some(child);
        Ok(())
    }

    async fn wait_healthy(&self, i: usize, within: Duration) -> anyhow::Result<()> {
        let url = format!("http://127.0.0.1:{}/health", self.members[i].metrics);
        let deadline = Instant::now() + within;
        loop {
            if let Ok(r) = reqwest::get(&url).await
                && r.text().await.is_ok_and(|t| t.contains("\"health\":\"true\""))
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("etcd member {i} not healthy in {within:?}:\n{}", self.log(i));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until a running member says the cluster is healthy (it has a leader: after a member's loss, etcd's
    /// election takes about its election timeout, a second here).
    pub async fn wait_quorum(&self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            for (i, m) in self.members.iter().enumerate() {
                if m.child.is_some() && self.wait_healthy(i, Duration::from_millis(1)).await.is_ok() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("etcd has no quorum after {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    /// The client URLs of every member.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| format!("{}://127.0.0.1:{}", self.scheme(), m.client)).collect()
    }

    /// The supervisor's `store:` section for this cluster.
    pub fn store_yaml(&self, prefix: &str, lease_ttl: &str) -> String {
        let endpoints = self.endpoints().iter().map(|e| format!("'{e}'")).collect::<Vec<_>>().join(", ");
        format!("store: {{kind: etcd, endpoints: [{endpoints}], prefix: {prefix}, lease_ttl: {lease_ttl}}}\n")
    }

    /// `kill -9` of member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again on its data and waits until it answers.
    pub async fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.kill(i);
        self.spawn(i)?;
        self.wait_healthy(i, Duration::from_secs(20)).await
    }

    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.members[i].dir.with_extension("log")).unwrap_or_default()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        // the data goes (each member preallocates 64 MB of write-ahead log); the logs stay for a failed test to show
        for m in &self.members {
            let _ = std::fs::remove_dir_all(&m.dir);
        }
    }
}
