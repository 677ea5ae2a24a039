//! Either proxy behind one interface, so that one scenario suite runs against real Envoy and the bundled proxy with
//! the same filter configuration and the same `.wasm`. Both expose Envoy's admin paths and stat names.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::Value;

use crate::admin;
use crate::envoy::Envoy;
use crate::host::Host;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Envoy,
    Host,
}

pub enum Proxy {
    Envoy(Envoy),
    Host(Host),
}

impl Proxy {
    pub async fn start(kind: Kind, filter_config: &Value, supervisor: SocketAddr) -> anyhow::Result<Proxy> {
        Ok(match kind {
            Kind::Envoy => Proxy::Envoy(Envoy::start(filter_config, supervisor).await?),
            Kind::Host => Proxy::Host(Host::start(filter_config, supervisor).await?),
        })
    }

    /// Starts a proxy that must refuse the configuration: (exited successfully?, log).
    pub async fn start_expecting_failure(
        kind: Kind,
        filter_config: &Value,
        supervisor: SocketAddr,
    ) -> anyhow::Result<(bool, String)> {
        match kind {
            Kind::Envoy => Envoy::start_expecting_failure(filter_config, supervisor).await,
            Kind::Host => Host::start_expecting_failure(&crate::host::render_config(filter_config, supervisor)?).await,
        }
    }

    pub fn kind(&self) -> Kind {
        match self {
            Proxy::Envoy(_) => Kind::Envoy,
            Proxy::Host(_) => Kind::Host,
        }
    }

    pub fn admin(&self) -> SocketAddr {
        match self {
            Proxy::Envoy(e) => e.admin,
            Proxy::Host(h) => h.admin,
        }
    }

    pub fn url(&self, path: &str) -> String {
        let listener = match self {
            Proxy::Envoy(e) => e.listener,
            Proxy::Host(h) => h.listener,
        };
        format!("http://{listener}{path}")
    }

    pub fn log(&self) -> String {
        match self {
            Proxy::Envoy(e) => e.log(),
            Proxy::Host(h) => h.log(),
        }
    }

    /// A stat from the admin `/stats` (None if absent).
    pub async fn stat(&self, name: &str) -> Option<u64> {
        admin::stat(self.admin(), name).await
    }

    /// Connections accepted by each worker on the ingress listener.
    pub async fn worker_connections(&self) -> Vec<u64> {
        admin::worker_connections(self.admin()).await
    }

    pub async fn prometheus(&self) -> String {
        admin::prometheus(self.admin()).await
    }

    /// Waits until the filter's poller reports table `version` (and, in Envoy, EDS has `hosts` hosts; the bundled
    /// proxy takes its hosts from the filter alone).
    pub async fn wait_for_table(&self, hosts: usize, version: u64) -> anyhow::Result<()> {
        if let Proxy::Envoy(e) = self {
            return e.wait_for_table(hosts, version).await;
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let v = self.stat("wasmcustom.equilibrio_table_version").await;
            if v == Some(version) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("no table: version {v:?} (want {version})\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
