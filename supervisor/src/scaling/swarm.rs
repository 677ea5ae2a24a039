//! Docker Swarm through bollard, for services whose template says `mode: swarm`: the service spec made from the
//! template, its replica count (read, and updated naming the version read), and its tasks as instances. Moves data in
//! and out and decides nothing ([`crate::scaling::swarm_plan`] decides). Every call has a timeout.
//!
//! A task is reached at its node's address (`Status.Addr`) and the port Swarm published for it in host mode (each task
//! gets an ephemeral one, read from its `PortStatus`): the routing mesh is never in the request path, our filter picks
//! the task. The instance id is Swarm's task name, `<service>.<slot>.<task id>` (also the task's `INSTANCE_ID`).

use std::collections::HashMap;

use bollard::Docker;
use bollard::models::{
    EndpointPortConfig, EndpointPortConfigPublishModeEnum, EndpointSpec, Limit, ServiceSpec, ServiceSpecMode,
    ServiceSpecModeReplicated, TaskSpec, TaskSpecContainerSpec, TaskSpecPlacement, TaskSpecPlacementPreferences,
    TaskSpecPlacementSpread, TaskSpecResources, TaskSpecRestartPolicy, TaskSpecRestartPolicyConditionEnum, TaskState,
};
use bollard::query_parameters::{InspectServiceOptions, ListNodesOptions, ListTasksOptions, UpdateServiceOptions};

use super::docker_call::timed;
use super::runtime::{
    Container, LABEL_MANAGED_BY, LABEL_PORT, LABEL_SERVICE, LABEL_SIGNATURE, MANAGED_BY, Replicas, RuntimeError, Task,
    Template,
};
use crate::secret::{LabelClaims, Secret};

/// What the signature of a Swarm service made here claims as its instance (the service is one object).
const SERVICE_CLAIM: &str = "swarm-service";

/// The spec of `service`'s Swarm service from its template, with `replicas`.
pub fn spec(service: &str, t: &Template, replicas: u32, secret: &Secret) -> ServiceSpec {
    let port = t.port.to_string();
    let mut labels = t.labels.clone();
    labels.insert(LABEL_SERVICE.into(), service.into());
    labels.insert(LABEL_MANAGED_BY.into(), MANAGED_BY.into());
    labels.insert(LABEL_PORT.into(), port.clone());
    let claims = LabelClaims { service, instance: SERVICE_CLAIM, port: &port, name: service };
    labels.insert(LABEL_SIGNATURE.into(), secret.sign(&claims));
    let mut env = t.env.clone();
    // Swarm expands this per task: the instance id the supervisor registers it under
    env.push("INSTANCE_ID={{.Task.Name}}".into());
    let container = TaskSpecContainerSpec {
        image: Some(t.image.clone()),
        args: (!t.command.is_empty()).then(|| t.command.clone()),
        env: Some(env),
        stop_grace_period: Some(i64::from(t.stop_grace) * 1_000_000_000),
        ..Default::default()
    };
    let placement = TaskSpecPlacement {
        constraints: (!t.placement.constraints.is_empty()).then(|| t.placement.constraints.clone()),
        preferences: (!t.placement.spread.is_empty()).then(|| {
            t.placement
                .spread
                .iter()
                .map(|label| TaskSpecPlacementPreferences {
                    spread: Some(TaskSpecPlacementSpread { spread_descriptor: Some(label.clone()) }),
                })
                .collect()
        }),
        ..Default::default()
    };
    let task = TaskSpec {
        container_spec: Some(container),
        resources: Some(TaskSpecResources {
            limits: Some(Limit {
                nano_cpus: t.cpus.map(|c| (c * 1e9) as i64),
                memory_bytes: t.memory_mb.map(|m| (m * 1024 * 1024) as i64),
                ..Default::default()
            }),
            ..Default::default()
        }),
        // a task that ends is replaced in its slot after a second (Swarm's default waits 5 s)
        restart_policy: Some(TaskSpecRestartPolicy {
            condition: Some(TaskSpecRestartPolicyConditionEnum::ANY),
            delay: Some(1_000_000_000),
            ..Default::default()
        }),
        placement: Some(placement),
        ..Default::default()
    };
    ServiceSpec {
        name: Some(service.into()),
        labels: Some(labels),
        task_template: Some(task),
        mode: Some(ServiceSpecMode {
            replicated: Some(ServiceSpecModeReplicated { replicas: Some(i64::from(replicas)) }),
            ..Default::default()
        }),
        // a port per task on its node, no routing mesh
        endpoint_spec: Some(EndpointSpec {
            ports: Some(vec![EndpointPortConfig {
                target_port: Some(i64::from(t.port)),
                publish_mode: Some(EndpointPortConfigPublishModeEnum::HOST),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The service's replica count and version, creating the service with `create_with` replicas if it does not exist.
/// A service of that name that this supervisor did not create (no valid signature) is refused, never taken over.
pub async fn replicas(
    docker: &Docker,
    service: &str,
    t: &Template,
    secret: &Secret,
    create_with: u32,
) -> Result<Replicas, RuntimeError> {
    let found = match timed(docker.inspect_service(service, None::<InspectServiceOptions>)).await {
        Ok(s) => Some(s),
        Err(RuntimeError::Failed(m)) if m.contains("404") => None,
        Err(e) => return Err(e),
    };
    let Some(found) = found else {
        timed(docker.create_service(spec(service, t, create_with, secret), None)).await?;
        tracing::info!(%service, replicas = create_with, "swarm service created");
        return Box::pin(replicas(docker, service, t, secret, create_with)).await;
    };
    let spec = found.spec.unwrap_or_default();
    let labels = spec.labels.clone().unwrap_or_default();
    let port = t.port.to_string();
    let claims = LabelClaims { service, instance: SERVICE_CLAIM, port: &port, name: service };
    if !labels.get(LABEL_SIGNATURE).is_some_and(|sig| secret.verify(&claims, sig)) {
        return Err(RuntimeError::Failed(format!(
            "a Swarm service named {service} exists but was not created by this supervisor (no valid signature): \
             not managed; remove it or rename the service"
        )));
    }
    let count = spec.mode.and_then(|m| m.replicated).and_then(|r| r.replicas).unwrap_or(0);
    let version = found.version.and_then(|v| v.index).unwrap_or(0);
    Ok(Replicas { count: u32::try_from(count).unwrap_or(0), version })
}

/// Sets the replicas, naming the version read: if someone changed the service since, Swarm refuses (`update out of
/// sequence`) and the next round reads it again.
pub async fn set_replicas(docker: &Docker, service: &str, read: Replicas, to: u32) -> Result<(), RuntimeError> {
    let found = timed(docker.inspect_service(service, None::<InspectServiceOptions>)).await?;
    let version = found.version.and_then(|v| v.index).unwrap_or(0);
    if version != read.version {
        return Err(RuntimeError::Failed(format!(
            "the service changed since it was read (version {} -> {version}): not updated",
            read.version
        )));
    }
    let mut spec = found.spec.unwrap_or_default();
    spec.mode = Some(ServiceSpecMode {
        replicated: Some(ServiceSpecModeReplicated { replicas: Some(i64::from(to)) }),
        ..Default::default()
    });
    let opts = UpdateServiceOptions {
        version: i32::try_from(version).unwrap_or(i32::MAX),
        registry_auth_from: "spec".into(),
        ..Default::default()
    };
    timed(docker.update_service(service, spec, opts, None)).await?;
    Ok(())
}

/// A node as the tasks need it.
#[derive(Debug, Clone, Default)]
pub struct NodeInfo {
    pub addr: String,
    pub hostname: String,
    pub zone: String,
}

pub async fn nodes(docker: &Docker, zone_label: &str) -> Result<HashMap<String, NodeInfo>, RuntimeError> {
    let list = timed(docker.list_nodes(None::<ListNodesOptions>)).await?;
    Ok(list
        .into_iter()
        .filter_map(|n| {
            let id = n.id?;
            let addr = n.status.and_then(|s| s.addr).unwrap_or_default();
            let hostname = n.description.and_then(|d| d.hostname).unwrap_or_default();
            // a label that is not a zone name (the proxies refuse a table with one) counts as no zone
            let zone = n
                .spec
                .and_then(|s| s.labels)
                .and_then(|l| l.get(zone_label).cloned())
                .filter(|z| equilibrio_contract::policy::valid_zone(z))
                .unwrap_or_default();
            Some((id, NodeInfo { addr, hostname, zone }))
        })
        .collect())
}

/// The service's tasks that matter now: those Swarm wants running, and those still running that it is removing.
pub async fn tasks(
    docker: &Docker,
    service: &str,
    t: &Template,
    nodes: &HashMap<String, NodeInfo>,
) -> Result<Vec<Container>, RuntimeError> {
    let filters = HashMap::from([("service".to_string(), vec![service.to_string()])]);
    let list = match timed(docker.list_tasks(Some(ListTasksOptions { filters: Some(filters) }))).await {
        Ok(l) => l,
        // no such service yet: the round creates it
        Err(RuntimeError::Failed(m)) if m.contains("404") => vec![],
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for task in list {
        let (Some(id), Some(slot)) = (task.id, task.slot) else { continue };
        let desired = task.desired_state.unwrap_or(TaskState::SHUTDOWN);
        let status = task.status.unwrap_or_default();
        let state = status.state.unwrap_or(TaskState::NEW);
        let live = desired <= TaskState::RUNNING;
        if !live && state != TaskState::RUNNING {
            continue; // history
        }
        let node = task.node_id.and_then(|n| nodes.get(&n).map(|info| (n, info.clone())));
        let published = status
            .port_status
            .and_then(|p| p.ports)
            .unwrap_or_default()
            .into_iter()
            .find(|p| p.target_port == Some(i64::from(t.port)))
            .and_then(|p| p.published_port);
        let address = match (&node, published) {
            (Some((_, info)), Some(port)) if !info.addr.is_empty() => Some(format!("{}:{port}", info.addr)),
            _ => None,
        };
        let container = status.container_status.as_ref();
        let slot = u64::try_from(slot).unwrap_or(0);
        out.push(Container {
            id: container.and_then(|c| c.container_id.clone()).unwrap_or_default(),
            name: format!("{service}.{slot}.{id}"),
            service: service.into(),
            instance: format!("{service}.{slot}.{id}"),
            managed: true,
            running: live && state == TaskState::RUNNING,
            address,
            created_ms: 0,
            oom_killed: false,
            exit_code: container.and_then(|c| c.exit_code),
            task: Some(Task {
                slot,
                node: node.as_ref().map(|(id, _)| id.clone()),
                live,
                zone: node.as_ref().map(|(_, n)| n.zone.clone()).unwrap_or_default(),
                hostname: node.as_ref().map(|(_, n)| n.hostname.clone()).unwrap_or_default(),
                addr: node.map(|(_, n)| n.addr).unwrap_or_default(),
            }),
        });
    }
    Ok(out)
}
