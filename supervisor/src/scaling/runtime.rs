//! The container runtime behind a trait: Docker through bollard in production, an in-memory fake in unit tests.
//!
//! Managed containers carry labels under one reverse-DNS prefix (`io.equilibrio.*`): the service, the instance id and
//! `managed-by=equilibrio`. Containers a user starts with just `io.equilibrio.service=<name>` (and optionally
//! `io.equilibrio.port`) are discovered too, as Traefik's Docker provider does, but never stopped by the autoscaler.

use equilibrio_contract::FieldError;
use std::collections::HashMap;
use std::future::Future;

use serde::{Deserialize, Serialize};

pub const LABEL_SERVICE: &str = "io.equilibrio.service";
pub const LABEL_INSTANCE: &str = "io.equilibrio.instance";
pub const LABEL_MANAGED_BY: &str = "io.equilibrio.managed-by";
pub const LABEL_PORT: &str = "io.equilibrio.port";
pub const MANAGED_BY: &str = "equilibrio";
/// HMAC of the labels above and the container name under the deployment secret ([`crate::secret`]).
pub const LABEL_SIGNATURE: &str = "io.equilibrio.signature";

/// How a service's containers are made (`services.<name>.docker` in the configuration).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Template {
    pub image: String,
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    /// The port the application listens on inside the container.
    pub port: u16,
    #[serde(default)]
    pub labels: HashMap<String, String>,
    /// CPU limit in cores (e.g. 0.5).
    #[serde(default)]
    pub cpus: Option<f64>,
    /// Memory limit in MiB.
    #[serde(default)]
    pub memory_mb: Option<u64>,
    /// Reach containers at their address on this user network instead of a port published on 127.0.0.1.
    #[serde(default)]
    pub network: Option<String>,
    /// Seconds between SIGTERM and SIGKILL when stopping.
    #[serde(default = "default_grace")]
    pub stop_grace: u32,
    /// Also serve running containers that carry the service label but were not started by this supervisor (no valid
    /// signature): under their container name, at `port`, counted as capacity, never stopped. Off by default: anyone
    /// able to start a container could otherwise take a share of the traffic (docs/security.md).
    #[serde(default)]
    pub adopt_unsigned: bool,
    /// `container` (the default): containers on the supervisor's Docker host. `swarm`: a Docker Swarm service whose
    /// replicas the supervisor sets, across the swarm's nodes (docs/swarm.md).
    #[serde(default)]
    pub mode: Mode,
    /// Swarm mode: where Swarm may place the tasks.
    #[serde(default)]
    pub placement: Placement,
    /// Swarm mode: the node label whose value is the zone of the tasks on that node.
    #[serde(default = "default_zone_label")]
    pub zone_label: String,
    /// Swarm mode: each node's Docker API by hostname or node address (`tcp://10.0.0.2:2375`,
    /// `unix:///run/docker-n2.sock`), read for the CPU and memory of the tasks on it. Tasks on the node the supervisor's own daemon runs need no entry; on a
    /// node without one, the scaling decision goes by the proxies' request rate and latency.
    #[serde(default)]
    pub node_apis: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    #[default]
    Container,
    Swarm,
}

/// Swarm placement: constraints (`node.labels.io.equilibrio.zone!=c`, `node.role==worker`) and the labels to spread
/// the tasks evenly over (`node.labels.io.equilibrio.zone`), as `docker service create --constraint` and
/// `--placement-pref spread=` take them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    #[serde(default)]
    pub constraints: Vec<String>,
    #[serde(default)]
    pub spread: Vec<String>,
}

fn default_grace() -> u32 {
    10
}

fn default_zone_label() -> String {
    "io.equilibrio.zone".into()
}

impl Template {
    pub fn validate(&self) -> Result<(), FieldError> {
        if self.image.is_empty() {
            return Err(FieldError::new("image", "must not be empty"));
        }
        if self.port == 0 {
            return Err(FieldError::new("port", "must be a port number"));
        }
        if let Some(c) = self.cpus
            && !(0.01..=256.0).contains(&c)
        {
            return Err(FieldError::new("cpus", "must be between 0.01 and 256"));
        }
        if let Some(m) = self.memory_mb
            && !(6..=1 << 20).contains(&m)
        {
            return Err(FieldError::new("memory_mb", "must be between 6 and 1048576"));
        }
        if self.labels.keys().any(|k| k.starts_with("io.equilibrio.")) {
            return Err(FieldError::new("labels", "keys under io.equilibrio. are reserved"));
        }
        if self.stop_grace > 600 {
            return Err(FieldError::new("stop_grace", "must be at most 600 seconds"));
        }
        if self.mode == Mode::Swarm {
            if self.network.is_some() {
                return Err(FieldError::new(
                    "network",
                    "not supported with mode: swarm (tasks publish a port per node)",
                ));
            }
            if self.adopt_unsigned {
                return Err(FieldError::new("adopt_unsigned", "not supported with mode: swarm"));
            }
            for (name, api) in &self.node_apis {
                if !["tcp://", "http://", "unix://"].iter().any(|p| api.starts_with(p)) {
                    return Err(FieldError::new(
                        format!("node_apis.{name}"),
                        "must be a tcp://, http:// or unix:// Docker API address",
                    ));
                }
            }
        } else if !self.placement.constraints.is_empty() || !self.placement.spread.is_empty() {
            return Err(FieldError::new("placement", "only with mode: swarm"));
        }
        Ok(())
    }
}

/// A container as observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    pub id: String,
    pub name: String,
    pub service: String,
    /// The instance id (the label, or the container name for discovered containers).
    pub instance: String,
    /// Started by the autoscaler (only those are ever stopped by it).
    pub managed: bool,
    pub running: bool,
    /// `ip:port` the proxies reach it at, once known.
    pub address: Option<String>,
    pub created_ms: u64,
    /// Killed by the kernel's OOM killer.
    pub oom_killed: bool,
    pub exit_code: Option<i64>,
    /// For a Swarm task: where Swarm placed it (a plain container has none).
    pub task: Option<Task>,
}

/// A Swarm service's replica count as Swarm holds it, with the version an update must name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replicas {
    pub count: u32,
    pub version: u64,
}

/// A Swarm task's place: its slot, its node and whether Swarm wants it running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    pub slot: u64,
    pub node: Option<String>,
    /// Its desired state is `running` (or earlier): Swarm is not removing it.
    pub live: bool,
    /// Its node's zone (the node label the template names), or empty.
    pub zone: String,
    /// Its node's hostname and address (whose Docker API gives its CPU and memory: the template's `node_apis`).
    pub hostname: String,
    pub addr: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Stats {
    pub cpu_percent: f64,
    pub memory_percent: f64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuntimeError {
    #[error("the container runtime is unreachable: {0}")]
    Unreachable(String),
    #[error("{0}")]
    Failed(String),
}

pub trait Runtime: Send + Sync + 'static {
    /// Containers labelled for `service`, running or not.
    fn list(&self, service: &str) -> impl Future<Output = Result<Vec<Container>, RuntimeError>> + Send;
    /// Creates and starts a managed container for `instance`.
    fn create(
        &self,
        service: &str,
        instance: &str,
        t: &Template,
    ) -> impl Future<Output = Result<Container, RuntimeError>> + Send;
    /// SIGTERM, then SIGKILL after `grace` seconds.
    fn stop(&self, id: &str, grace: u32) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    fn remove(&self, id: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// CPU and memory of a running container (or Swarm task, read on its node).
    fn stats(&self, c: &Container) -> impl Future<Output = Result<Stats, RuntimeError>> + Send;
    /// A Swarm service's replica count (the service is created with `create_with` if it does not exist yet); `None`
    /// for a service of plain containers.
    fn replicas(
        &self,
        service: &str,
        create_with: u32,
    ) -> impl Future<Output = Result<Option<Replicas>, RuntimeError>> + Send;
    /// Sets a Swarm service's replicas, refused if the service changed since `read`.
    fn set_replicas(
        &self,
        service: &str,
        read: Replicas,
        to: u32,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Follows the runtime's container events (start, die, OOM...) of Equilibrio's services, calling `wake` for
    /// each, so the loop reacts at once instead of at its next tick. Returns when the stream ends or fails.
    fn watch(&self, wake: &tokio::sync::Notify) -> impl Future<Output = Result<(), RuntimeError>> + Send;
}
