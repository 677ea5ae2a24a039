//! The Docker runtime, through bollard: with [`swarm`] (for services in `mode: swarm`), the only module that talks to
//! the Docker API. It moves data in and out and decides nothing. Every call has a timeout; a daemon that does not
//! answer is [`RuntimeError::Unreachable`].

use std::collections::HashMap;
use std::time::Duration;

use bollard::Docker;
use bollard::models::{ContainerCreateBody, ContainerSummary, ContainerSummaryStateEnum, HostConfig, PortBinding};
use bollard::query_parameters::{
    CreateContainerOptions, EventsOptions, InspectContainerOptions, ListContainersOptions, RemoveContainerOptions,
    StartContainerOptions, StatsOptions, StopContainerOptions,
};
use futures_util::StreamExt;

use super::docker_call::{CALL_TIMEOUT, failed, timed};
use super::runtime::{
    Container, LABEL_INSTANCE, LABEL_MANAGED_BY, LABEL_PORT, LABEL_SERVICE, LABEL_SIGNATURE, MANAGED_BY, Mode,
    Replicas, Runtime, RuntimeError, Stats, Template,
};
use super::swarm;
use crate::secret::{LabelClaims, Secret};

pub struct DockerRuntime {
    /// Connected and version-negotiated on first use, and again after the daemon was unreachable (Debian's
    /// dockerd speaks API 1.41, older than bollard's default).
    docker: tokio::sync::Mutex<Option<Docker>>,
    /// The template per service, to know the container port and network when reading addresses.
    templates: HashMap<String, Template>,
    /// Signs the labels of the containers started here; only those are adopted as ours (see [`crate::secret`]).
    secret: Secret,
    /// Containers with a service label but no valid signature, already logged (logged once each).
    ignored: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Swarm mode: the Docker API of other nodes (by hostname), connected on first use.
    nodes: tokio::sync::Mutex<HashMap<String, Docker>>,
    /// Swarm mode: the node id of the supervisor's own daemon, once read.
    local_node: tokio::sync::OnceCell<String>,
}

impl DockerRuntime {
    /// The local daemon (`DOCKER_HOST`, or the unix socket `/var/run/docker.sock`); connects lazily.
    pub fn new(templates: HashMap<String, Template>, secret: Secret) -> DockerRuntime {
        DockerRuntime {
            docker: tokio::sync::Mutex::new(None),
            templates,
            secret,
            ignored: Default::default(),
            nodes: Default::default(),
            local_node: Default::default(),
        }
    }

    /// Whether a container's labels carry this supervisor's signature for what they claim.
    fn signed(&self, service: &str, name: &str, labels: &HashMap<String, String>) -> bool {
        let (Some(instance), Some(port), Some(sig)) =
            (labels.get(LABEL_INSTANCE), labels.get(LABEL_PORT), labels.get(LABEL_SIGNATURE))
        else {
            return false;
        };
        self.secret.verify(&LabelClaims { service, instance, port, name }, sig)
    }

    fn log_ignored_once(&self, service: &str, id: &str, name: &str) {
        let mut ignored = self.ignored.lock().unwrap_or_else(|p| p.into_inner());
        if ignored.len() < 4096 && ignored.insert(id.to_string()) {
            tracing::warn!(
                %service, container = %name,
                "a container labelled for this service was not started by this supervisor (no valid signature): \
                 ignored (set `adopt_unsigned: true` in the service's docker template to serve it)"
            );
        }
    }

    async fn client(&self) -> Result<Docker, RuntimeError> {
        let mut guard = self.docker.lock().await;
        if let Some(d) = guard.as_ref() {
            return Ok(d.clone());
        }
        let d = Docker::connect_with_local_defaults().map_err(|e| RuntimeError::Unreachable(e.to_string()))?;
        let d = match tokio::time::timeout(CALL_TIMEOUT, d.negotiate_version()).await {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => return Err(RuntimeError::Unreachable(e.to_string())),
            Err(_) => return Err(RuntimeError::Unreachable("no answer to the version negotiation".into())),
        };
        *guard = Some(d.clone());
        Ok(d)
    }

    /// After a failure that may mean the daemon went away: connect and negotiate again next time.
    async fn forget_on_unreachable<T>(&self, r: Result<T, RuntimeError>) -> Result<T, RuntimeError> {
        if matches!(r, Err(RuntimeError::Unreachable(_))) {
            *self.docker.lock().await = None;
        }
        r
    }

    fn swarm_template(&self, service: &str) -> Option<&Template> {
        self.templates.get(service).filter(|t| t.mode == Mode::Swarm)
    }

    /// The daemon that runs a container: ours, or for a Swarm task on another node that node's (`node_apis`).
    async fn daemon_of(&self, c: &Container) -> Result<Docker, RuntimeError> {
        let docker = self.client().await?;
        let Some(task) = &c.task else { return Ok(docker) };
        let local = self
            .local_node
            .get_or_try_init(|| async {
                let info = timed(docker.info()).await?;
                Ok::<_, RuntimeError>(info.swarm.and_then(|s| s.node_id).unwrap_or_default())
            })
            .await?;
        if task.node.as_deref() == Some(local.as_str()) {
            return Ok(docker);
        }
        // by hostname, else by the node's address
        let apis = self.templates.get(&c.service).map(|t| &t.node_apis);
        let Some((key, api)) =
            [&task.hostname, &task.addr].into_iter().find_map(|k| apis.and_then(|a| a.get_key_value(k.as_str())))
        else {
            return Err(RuntimeError::Failed(format!("no Docker API for node {} (node_apis)", task.hostname)));
        };
        let mut nodes = self.nodes.lock().await;
        if let Some(d) = nodes.get(key) {
            return Ok(d.clone());
        }
        let d = Docker::connect_with_host(api).map_err(|e| RuntimeError::Unreachable(e.to_string()))?;
        let d = timed(d.negotiate_version()).await?;
        nodes.insert(key.clone(), d.clone());
        Ok(d)
    }

    /// Where a container serves. `signed_port` is its port label, believed only when signed; otherwise the template's.
    fn address(&self, service: &str, c: &ContainerSummary, signed_port: Option<u16>) -> Option<String> {
        let template = self.templates.get(service);
        let port = signed_port.or(template.map(|t| t.port));
        if let Some(net) = template.and_then(|t| t.network.as_ref()) {
            let ip = c.network_settings.as_ref()?.networks.as_ref()?.get(net)?.ip_address.clone()?;
            let port = port?;
            return (!ip.is_empty()).then(|| format!("{ip}:{port}"));
        }
        let ports = c.ports.as_ref()?;
        ports.iter().filter(|p| port.is_none_or(|want| p.private_port == want)).find_map(|p| {
            match (p.ip.as_deref(), p.public_port) {
                (Some("127.0.0.1") | Some("0.0.0.0") | None, Some(public)) => Some(format!("127.0.0.1:{public}")),
                _ => None,
            }
        })
    }
}

impl Runtime for DockerRuntime {
    async fn list(&self, service: &str) -> Result<Vec<Container>, RuntimeError> {
        if let Some(t) = self.swarm_template(service) {
            let docker = self.client().await?;
            let nodes = self.forget_on_unreachable(swarm::nodes(&docker, &t.zone_label).await).await?;
            return swarm::tasks(&docker, service, t, &nodes).await;
        }
        let filters = HashMap::from([("label".to_string(), vec![format!("{LABEL_SERVICE}={service}")])]);
        let opts = ListContainersOptions { all: true, filters: Some(filters), ..Default::default() };
        let docker = self.client().await?;
        let list = self.forget_on_unreachable(timed(docker.list_containers(Some(opts))).await).await?;
        let mut out = Vec::new();
        for c in list {
            let Some(id) = c.id.clone() else { continue };
            let labels = c.labels.clone().unwrap_or_default();
            let name = c
                .names
                .as_ref()
                .and_then(|n| n.first())
                .map(|n| n.trim_start_matches('/').to_string())
                .unwrap_or_default();
            // only what this supervisor signed is believed: any other container with the service label is served
            // (under its own name, at the template's port, never stopped) only when the operator opted in
            let managed = self.signed(service, &name, &labels);
            if !managed && !self.templates.get(service).is_some_and(|t| t.adopt_unsigned) {
                self.log_ignored_once(service, &id, &name);
                continue;
            }
            let instance = if managed { labels.get(LABEL_INSTANCE).cloned() } else { None }.unwrap_or(name.clone());
            let signed_port = if managed { labels.get(LABEL_PORT).and_then(|p| p.parse::<u16>().ok()) } else { None };
            // a paused container is alive (it holds its resources and its port) but answers nothing: the health checks
            // decide about it, like any hung process; left out, it would be forgotten and run on as an orphan
            let running =
                matches!(c.state, Some(ContainerSummaryStateEnum::RUNNING | ContainerSummaryStateEnum::PAUSED));
            let (mut oom_killed, mut exit_code) = (false, None);
            if !running && matches!(c.state, Some(ContainerSummaryStateEnum::EXITED | ContainerSummaryStateEnum::DEAD))
            {
                if let Ok(info) = timed(docker.inspect_container(&id, None::<InspectContainerOptions>)).await
                    && let Some(state) = info.state
                {
                    oom_killed = state.oom_killed.unwrap_or(false);
                    exit_code = state.exit_code;
                }
            } else if !running {
                // created or restarting: not serving, not finished either; leave it out of this round
                continue;
            }
            out.push(Container {
                address: if running { self.address(service, &c, signed_port) } else { None },
                id,
                name,
                service: service.to_string(),
                instance,
                managed,
                running,
                created_ms: c.created.unwrap_or(0).max(0) as u64 * 1000,
                oom_killed,
                exit_code,
                task: None,
            });
        }
        Ok(out)
    }

    async fn create(&self, service: &str, instance: &str, t: &Template) -> Result<Container, RuntimeError> {
        let mut labels = t.labels.clone();
        labels.insert(LABEL_SERVICE.into(), service.into());
        labels.insert(LABEL_INSTANCE.into(), instance.into());
        labels.insert(LABEL_MANAGED_BY.into(), MANAGED_BY.into());
        labels.insert(LABEL_PORT.into(), t.port.to_string());
        let name = format!("{service}-{instance}");
        let port = t.port.to_string();
        let signature = self.secret.sign(&LabelClaims { service, instance, port: &port, name: &name });
        labels.insert(LABEL_SIGNATURE.into(), signature);
        let port_key = format!("{}/tcp", t.port);
        let mut env = t.env.clone();
        env.push(format!("INSTANCE_ID={instance}"));
        let host_config = HostConfig {
            // published on loopback only, on a port the kernel picks (unless a user network is used)
            port_bindings: t.network.is_none().then(|| {
                HashMap::from([(
                    port_key.clone(),
                    Some(vec![PortBinding { host_ip: Some("127.0.0.1".into()), host_port: Some(String::new()) }]),
                )])
            }),
            nano_cpus: t.cpus.map(|c| (c * 1e9) as i64),
            memory: t.memory_mb.map(|m| (m * 1024 * 1024) as i64),
            network_mode: t.network.clone(),
            ..Default::default()
        };
        let body = ContainerCreateBody {
            image: Some(t.image.clone()),
            cmd: (!t.command.is_empty()).then(|| t.command.clone()),
            env: Some(env),
            labels: Some(labels),
            exposed_ports: Some(vec![port_key]),
            host_config: Some(host_config),
            stop_timeout: Some(i64::from(t.stop_grace)),
            ..Default::default()
        };
        let opts = CreateContainerOptions { name: Some(name), ..Default::default() };
        let docker = self.client().await?;
        let created = self.forget_on_unreachable(timed(docker.create_container(Some(opts), body)).await).await?;
        if let Err(e) = timed(docker.start_container(&created.id, None::<StartContainerOptions>)).await {
            let _ = self.remove(&created.id).await;
            return Err(e);
        }
        // read back the published port
        let listed = self.list(service).await?;
        listed
            .into_iter()
            .find(|c| c.id == created.id)
            .ok_or_else(|| RuntimeError::Failed("container vanished after start".into()))
    }

    async fn stop(&self, id: &str, grace: u32) -> Result<(), RuntimeError> {
        let opts = StopContainerOptions { t: Some(grace as i32), signal: None };
        let docker = self.client().await?;
        match tokio::time::timeout(
            CALL_TIMEOUT + Duration::from_secs(u64::from(grace)),
            docker.stop_container(id, Some(opts)),
        )
        .await
        {
            Ok(Ok(())) => Ok(()),
            // already stopped
            Ok(Err(bollard::errors::Error::DockerResponseServerError { status_code: 304, .. })) => Ok(()),
            Ok(Err(e)) => Err(failed(e)),
            Err(_) => Err(RuntimeError::Unreachable("stop did not finish".into())),
        }
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        let opts = RemoveContainerOptions { force: true, ..Default::default() };
        let docker = self.client().await?;
        match timed(docker.remove_container(id, Some(opts))).await {
            Ok(()) => Ok(()),
            Err(RuntimeError::Failed(m)) if m.contains("404") => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn watch(&self, wake: &tokio::sync::Notify) -> Result<(), RuntimeError> {
        let docker = self.client().await?;
        let filters = HashMap::from([
            ("type".to_string(), vec!["container".to_string()]),
            ("label".to_string(), vec![LABEL_SERVICE.to_string()]),
        ]);
        let ours = docker.events(Some(EventsOptions { filters: Some(filters), ..Default::default() }));
        // Swarm services: their tasks' containers on this node, and the swarm's service and node changes (the other
        // nodes' tasks are read each round)
        let swarm: Vec<String> =
            self.templates.iter().filter(|(_, t)| t.mode == Mode::Swarm).map(|(n, _)| n.clone()).collect();
        let tasks = HashMap::from([
            ("type".to_string(), vec!["container".to_string()]),
            ("label".to_string(), swarm.iter().map(|s| format!("com.docker.swarm.service.name={s}")).collect()),
        ]);
        let cluster = HashMap::from([("type".to_string(), vec!["service".to_string(), "node".to_string()])]);
        let mut events = if swarm.is_empty() {
            ours.boxed()
        } else {
            let tasks = docker.events(Some(EventsOptions { filters: Some(tasks), ..Default::default() }));
            let cluster = docker.events(Some(EventsOptions { filters: Some(cluster), ..Default::default() }));
            futures_util::stream::select(ours, futures_util::stream::select(tasks, cluster)).boxed()
        };
        while let Some(e) = events.next().await {
            match e {
                Ok(m) => {
                    let action = m.action.unwrap_or_default();
                    if matches!(
                        action.as_str(),
                        "start" | "die" | "oom" | "kill" | "stop" | "destroy" | "update" | "remove"
                    ) {
                        tracing::debug!(%action, "docker event");
                        wake.notify_one();
                    }
                }
                Err(e) => return self.forget_on_unreachable(Err(failed(e))).await,
            }
        }
        Ok(())
    }

    async fn replicas(&self, service: &str, create_with: u32) -> Result<Option<Replicas>, RuntimeError> {
        let Some(t) = self.swarm_template(service) else { return Ok(None) };
        let docker = self.client().await?;
        let r = swarm::replicas(&docker, service, t, &self.secret, create_with).await;
        self.forget_on_unreachable(r).await.map(Some)
    }

    async fn set_replicas(&self, service: &str, read: Replicas, to: u32) -> Result<(), RuntimeError> {
        let docker = self.client().await?;
        swarm::set_replicas(&docker, service, read, to).await
    }

    async fn stats(&self, c: &Container) -> Result<Stats, RuntimeError> {
        let opts = StatsOptions { stream: false, one_shot: false };
        let docker = self.daemon_of(c).await?;
        let mut stream = docker.stats(&c.id, Some(opts));
        let s = match tokio::time::timeout(CALL_TIMEOUT, stream.next()).await {
            Ok(Some(Ok(s))) => s,
            Ok(Some(Err(e))) => return Err(failed(e)),
            Ok(None) => return Err(RuntimeError::Failed("no stats".into())),
            Err(_) => return Err(RuntimeError::Unreachable("stats did not answer".into())),
        };
        let total = |c: &Option<bollard::models::ContainerCpuStats>| {
            c.as_ref().and_then(|c| c.cpu_usage.as_ref()).and_then(|u| u.total_usage).unwrap_or(0)
        };
        let system =
            |c: &Option<bollard::models::ContainerCpuStats>| c.as_ref().and_then(|c| c.system_cpu_usage).unwrap_or(0);
        let cpus = s.cpu_stats.as_ref().and_then(|c| c.online_cpus).unwrap_or(1).max(1);
        let cpu_delta = total(&s.cpu_stats).saturating_sub(total(&s.precpu_stats)) as f64;
        let system_delta = system(&s.cpu_stats).saturating_sub(system(&s.precpu_stats)) as f64;
        // percent of one core, as `docker stats` shows it
        let of_one_core = if system_delta > 0.0 { cpu_delta / system_delta * f64::from(cpus) * 100.0 } else { 0.0 };
        let mem = s.memory_stats.as_ref();
        let usage = mem.and_then(|m| m.usage).unwrap_or(0);
        let cache = mem
            .and_then(|m| m.stats.as_ref())
            .and_then(|st| st.get("inactive_file").or(st.get("cache")).copied())
            .unwrap_or(0);
        let limit = mem.and_then(|m| m.limit).unwrap_or(0);
        let memory_percent = if limit > 0 { usage.saturating_sub(cache) as f64 / limit as f64 * 100.0 } else { 0.0 };
        Ok(Stats { cpu_percent: of_one_core, memory_percent })
    }
}
