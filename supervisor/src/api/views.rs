//! What the API shows of services and instances: the registry's data with the traffic the proxies report.

use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use crate::app::App;
use crate::config::HealthCheck;
use crate::registry::Instance;
use crate::reports::Traffic;

#[derive(Debug, Serialize, ToSchema)]
pub struct ServiceSummary {
    pub name: String,
    pub version: u64,
    pub instances: usize,
    pub healthy: usize,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct InstanceView {
    #[serde(flatten)]
    pub instance: Instance,
    /// What the proxies see: healthy, draining or unhealthy.
    pub state: String,
    pub traffic: Traffic,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ServiceView {
    pub name: String,
    pub version: u64,
    /// The balancing policy (secret redacted).
    #[schema(value_type = Object)]
    pub policy: Value,
    pub health_check: HealthCheck,
    pub instances: Vec<InstanceView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct HostInfo {
    pub environment: crate::environment::Environment,
    pub cpu_cores: usize,
    pub memory_bytes: u64,
    pub services: Vec<ServiceSummary>,
}

pub fn instance_view(app: &App, service: &str, inst: &Instance, now: u64) -> InstanceView {
    InstanceView {
        instance: inst.clone(),
        state: inst.table_state().to_string(),
        traffic: app.reports().traffic(service, &inst.spec.id, now),
    }
}
