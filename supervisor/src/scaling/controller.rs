//! The control loop: every second, for each service with a container template, observe (containers, their stats,
//! the proxies' reports), decide (policy), plan (planner) and act (runtime and registry), recording every scaling
//! decision with its reason.
//!
//! Faults: when Docker is unreachable the loop keeps the registry and the tables as they are, marks the supervisor
//! not ready, publishes one event, and retries with backoff (1 s doubling to 30 s); it never exits. A failed create
//! is a `scaling_failed` event with Docker's message; containers that die on their own are replaced, and a template
//! that keeps failing is retried with exponential backoff (1 s doubling to 5 min).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::app::{App, now_ms};
use crate::config::InstanceSpec;
use crate::etcd::layout::Key;
use crate::events::{Event, EventKind};
use crate::persist::PersistError;
use crate::registry::Source;
use crate::scaling::cost::Observation;
use crate::scaling::planner::{self, Action, Health, Known, PlanInput};
use crate::scaling::policy::{self, Sample, ScalingPolicy};
use crate::scaling::runtime::{Container, Replicas, Runtime};
use crate::scaling::state::{Episode, ScalingEventKind};
use crate::scaling::swarm_plan::{self, SwarmAction, SwarmPlanInput};

/// Evaluation period.
pub const TICK_MS: u64 = 1000;
/// Request rate and latency of a sample: the proxies' reports of the last few seconds (the policy's measurement
/// windows do the averaging).
const SAMPLE_TRAFFIC_MS: u64 = 3000;

/// The time of a round: wall-clock for events and the registry, monotonic for measured intervals (cost).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub wall_ms: u64,
    pub mono_ms: u64,
}

impl Now {
    /// Both clocks at `ms` (tests drive time by hand).
    pub fn at(ms: u64) -> Now {
        Now { wall_ms: ms, mono_ms: ms }
    }

    /// The clocks now; `origin` is the loop's start, for the monotonic clock.
    fn read(origin: std::time::Instant) -> Now {
        Now { wall_ms: now_ms(), mono_ms: origin.elapsed().as_millis() as u64 }
    }
}

fn event(now: u64, kind: EventKind, service: &str, instance: Option<&str>, detail: serde_json::Value) -> Event {
    Event::new(now, kind, service, instance, detail)
}

/// Follows the runtime's events (reconnecting with backoff) and wakes the loop on each.
async fn watch<R: Runtime>(runtime: Arc<R>, wake: Arc<tokio::sync::Notify>) {
    let mut delay = Duration::from_secs(1);
    loop {
        let started = std::time::Instant::now();
        if let Err(e) = runtime.watch(&wake).await {
            tracing::debug!(error = %e, "container events stream ended");
        }
        if started.elapsed() > Duration::from_secs(30) {
            delay = Duration::from_secs(1);
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

/// Runs the loop until `shutdown` changes.
pub async fn run<R: Runtime>(app: Arc<App>, runtime: Arc<R>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_millis(TICK_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let wake = Arc::new(tokio::sync::Notify::new());
    let watcher = tokio::spawn(watch(runtime.clone(), wake.clone()));
    let mut host = sysinfo::System::new().ok();
    let mut unreachable_since: Option<u64> = None;
    let mut retry_at = 0u64;
    let mut retry_delay = 1000u64;
    let origin = std::time::Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = wake.notified() => {}
            _ = shutdown.changed() => {
                watcher.abort();
                return;
            }
        }
        let clock = Now::read(origin);
        let now = clock.wall_ms;
        if let Some(h) = host.as_mut() {
            h.refresh_cpu_usage();
            h.refresh_memory();
            let memory =
                if h.total_memory() > 0 { h.used_memory() as f64 / h.total_memory() as f64 * 100.0 } else { 0.0 };
            app.set_host_usage(f64::from(h.global_cpu_usage()), memory);
        }
        if !app.leadership.is_leader() {
            // a Swarm count set while leading may have changed since: adopt it afresh when leading again
            for st in app.scaling().values_mut() {
                (st.swarm_replicas, st.swarm_target) = (None, None);
            }
        }
        if now < retry_at || !app.leadership.is_leader() {
            // another supervisor leads: it scales; this one serves the registry it writes
            continue;
        }
        match round(&app, runtime.as_ref(), clock).await {
            Ok(()) => {
                if unreachable_since.take().is_some() {
                    app.docker_ok.store(true, std::sync::atomic::Ordering::SeqCst);
                    app.observe(vec![event(now, EventKind::DockerReachable, "-", None, serde_json::json!({}))]);
                }
                retry_delay = 1000;
            }
            Err(message) => {
                if unreachable_since.is_none() {
                    unreachable_since = Some(now);
                    app.docker_ok.store(false, std::sync::atomic::Ordering::SeqCst);
                    tracing::error!(%message, "docker unreachable: keeping the current tables, retrying");
                    app.observe(vec![event(
                        now,
                        EventKind::DockerUnreachable,
                        "-",
                        None,
                        serde_json::json!({"message": message}),
                    )]);
                }
                retry_at = now + retry_delay;
                retry_delay = (retry_delay * 2).min(30_000);
            }
        }
    }
}

/// One evaluation of every scaled service. `Err` only when the runtime is unreachable.
pub async fn round<R: Runtime>(app: &App, runtime: &R, now: Now) -> Result<(), String> {
    let services: Vec<(String, ScalingPolicy)> = {
        let reg = app.registry();
        reg.services.values().filter_map(|s| s.scaling.clone().map(|p| (s.name.clone(), p))).collect()
    };
    for (service, policy) in services {
        let containers = match runtime.list(&service).await {
            Ok(c) => c,
            Err(crate::scaling::runtime::RuntimeError::Unreachable(m)) => return Err(m),
            Err(e) => return Err(e.to_string()),
        };
        scale_service(app, runtime, &service, &policy, containers, now).await;
    }
    Ok(())
}

async fn scale_service<R: Runtime>(
    app: &App,
    runtime: &R,
    service: &str,
    policy: &ScalingPolicy,
    containers: Vec<Container>,
    clock: Now,
) {
    let now = clock.wall_ms;
    // ---- observe
    let known: BTreeMap<String, Known> = {
        let reg = app.registry();
        let reports = app.reports();
        reg.service(service)
            .map(|s| {
                s.instances
                    .iter()
                    .filter(|(_, i)| i.source == Source::Docker)
                    .map(|(id, i)| {
                        let health = if i.health.health == crate::health::Health::Healthy {
                            Health::Healthy
                        } else if let Some(since) = i.unhealthy_since_ms {
                            Health::Failing { since_ms: since.max(i.watched_since_ms) }
                        } else {
                            Health::Starting { since_ms: i.watched_since_ms }
                        };
                        let k = Known {
                            source: i.source,
                            health,
                            draining: i.drain.is_some(),
                            drain_done: i.drain.is_some_and(|d| d.done_ms.is_some()),
                            in_flight: reports.in_flight(service, id, now).unwrap_or(0),
                        };
                        (id.clone(), k)
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let serving: Vec<&Container> = containers
        .iter()
        .filter(|c| c.running && known.get(&c.instance).is_some_and(|k| k.healthy() && !k.draining))
        .collect();
    let limit =
        |c: &Container| if c.managed { app.scaling_template(service).and_then(|t| t.cpus).unwrap_or(1.0) } else { 1.0 };
    // concurrently: each stats call takes about a second (Docker measures over an interval)
    let stats = futures_util::future::join_all(serving.iter().map(|c| runtime.stats(c))).await;
    let mut cpu = Vec::new();
    let mut mem = Vec::new();
    for (c, s) in serving.iter().zip(stats) {
        match s {
            Ok(s) => {
                cpu.push((s.cpu_percent / limit(c)).min(100.0));
                mem.push(s.memory_percent);
            }
            // a Swarm task on a node without `node_apis`, or a container gone meanwhile: the round goes on without it
            Err(e) => tracing::debug!(%service, instance = %c.instance, error = %e, "no CPU and memory figure"),
        }
    }
    let avg = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    let (rps_sum, p95_max, reported) = {
        let reports = app.reports();
        let mut rps = 0.0;
        let mut p95: f64 = 0.0;
        let mut any = false;
        for c in &serving {
            if reports.in_flight(service, &c.instance, now).is_some() {
                any = true;
                let t = reports.traffic_over(service, &c.instance, now, SAMPLE_TRAFFIC_MS);
                rps += t.requests_per_second;
                p95 = p95.max(t.latency_p95_ms);
            }
        }
        (rps, p95, any)
    };
    let n = serving.len().max(1) as f64;
    let sample = Sample {
        at_ms: now,
        values: [avg(&cpu), avg(&mem), reported.then_some(rps_sum * 60.0 / n), reported.then_some(p95_max)],
    };
    let current = planner::active(&containers, &known);
    let keep_ms =
        policy.metrics().iter().map(|(_, m)| (m.measurement_window * 1000.0) as u64).max().unwrap_or(300_000) + 10_000;

    // ---- decide
    let (desired, manual, reason, decided, (backoff_until_ms, failing_counts_from_ms)) = {
        let mut states = app.scaling();
        let Some(st) = states.get_mut(service) else { return };
        let observation = Observation {
            at_mono_ms: clock.mono_ms,
            running: containers.iter().filter(|c| c.running).count(),
            cpu_percent: sample.values[0],
            memory_percent: sample.values[1],
            requests_per_second: rps_sum,
        };
        let added = st.observe(sample, keep_ms, observation);
        app.metrics.instance_seconds(service, added);
        st.forgive_failures(now, serving.len() as u32, current);
        let (desired, manual, reason) = match st.manual_target(now) {
            Some(d) => (d.clamp(policy.min_instances, policy.max_instances), true, "manual scale".to_string()),
            None => {
                let d = policy::decide(policy, current, &mut st.history, now, TICK_MS);
                (d.desired, false, d.reason)
            }
        };
        // a new decision (not the one already under way) is recorded and published once
        let decided = st.decide(now, current, desired, &reason);
        if let Some(kind) = decided {
            app.metrics.scaling_event(service, kind.as_str());
        }
        (desired, manual, reason, decided.is_some(), (st.backoff_until_ms, st.failing_counts_from_ms(now)))
    };
    if decided {
        let kind = if desired > current { EventKind::ScaledUp } else { EventKind::ScaledDown };
        let detail = serde_json::json!({"from": current, "to": desired, "reason": reason});
        app.observe(vec![event(now, kind, service, None, detail)]);
    }

    // ---- plan and act
    match runtime.replicas(service, policy.min_instances).await {
        Ok(Some(replicas)) => {
            let (last_set, target) = {
                let mut states = app.scaling();
                let Some(st) = states.get_mut(service) else { return };
                if manual || desired != current {
                    st.swarm_target = Some(desired); // a decision this round
                }
                (st.swarm_replicas, st.swarm_target.unwrap_or(replicas.count))
            };
            let input = SwarmPlanInput {
                desired: target,
                manual,
                min: policy.min_instances,
                max: policy.max_instances,
                replicas,
                last_set,
                tasks: &containers,
                known: &known,
            };
            let actions = swarm_plan::plan(input);
            if last_set.is_none()
                && let Some(st) = app.scaling().get_mut(service)
            {
                st.swarm_replicas = Some(replicas.count); // adopted as it is
            }
            for action in actions {
                act_swarm(app, runtime, service, policy, action, now).await;
            }
            ramp(app, service, policy, now).await;
            return;
        }
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(%service, error = %e, "swarm service");
            return;
        }
    }
    let mut counter = 0u32;
    let actions = planner::plan(
        PlanInput {
            desired,
            containers: &containers,
            known: &known,
            now_ms: now,
            victim: policy.victim,
            start_timeout_ms: secs(policy.start_timeout),
            replace_unhealthy_after_ms: secs(policy.replace_unhealthy_after),
            max_unhealthy_share: policy.max_unhealthy_share,
            failing_counts_from_ms,
            backoff_until_ms,
        },
        || {
            counter += 1;
            format!("{}-{:x}{:04x}", short(service), now % 0xffff_ffff, fastrand::u16(..) as u32 + counter)
        },
    );
    let held = actions.iter().find_map(|a| match a {
        Action::HoldReplacements { unhealthy, running } => Some((*unhealthy, *running)),
        _ => None,
    });
    hold_replacements(app, service, held, now);
    for action in actions {
        act(app, runtime, service, policy, action, now).await;
    }
    ramp(app, service, policy, now).await;
}

/// Slow start: each round, the instances still ramping get their next step of weight.
async fn ramp(app: &App, service: &str, policy: &ScalingPolicy, now: u64) {
    let ramping: Vec<String> = {
        let reg = app.registry();
        reg.service(service)
            .map(|s| s.instances.values().filter(|i| i.full_weight.is_some()).map(|i| i.spec.id.clone()).collect())
            .unwrap_or_default()
    };
    for id in ramping {
        if app.registry().ramp(service, &id, (policy.slow_start * 1000.0) as u64, now) {
            let keys = vec![Key::Service(service.to_string()), Key::Instance(service.to_string(), id.clone())];
            // not kept (a race with another write): the next round ramps it again from what etcd holds
            if let Err(e) = app.publish_as_leader(keys).await {
                tracing::debug!(%service, instance = %id, error = %e, "slow-start step not kept");
            }
        }
    }
}

fn secs(s: f64) -> u64 {
    (s * 1000.0) as u64
}

/// Publishes the start and the end of an episode where replacements are held (once each, not every round): the
/// alert that the health checks fail for most of the service at once.
fn hold_replacements(app: &App, service: &str, held: Option<(u32, u32)>, now: u64) {
    let episode = app.scaling().get_mut(service).and_then(|st| st.replacements(held, now));
    match episode {
        Some(Episode::Held { reason }) => {
            tracing::error!(%service, %reason, "replacements held");
            app.metrics.scaling_event(service, ScalingEventKind::ReplacementsHeld.as_str());
            let (unhealthy, running) = held.unwrap_or_default();
            let detail = serde_json::json!({"unhealthy": unhealthy, "running": running, "reason": reason});
            app.observe(vec![event(now, EventKind::ReplacementsHeld, service, None, detail)]);
        }
        Some(Episode::Resumed) => {
            app.observe(vec![event(now, EventKind::ReplacementsResumed, service, None, serde_json::json!({}))]);
        }
        None => {}
    }
}

/// A short prefix of the service name for instance ids.
fn short(service: &str) -> String {
    let initials: String = service.split(['-', '_', '.']).filter_map(|w| w.chars().next()).collect();
    if initials.len() >= 2 { initials } else { service.chars().take(8).collect() }
}

async fn act<R: Runtime>(app: &App, runtime: &R, service: &str, policy: &ScalingPolicy, action: Action, now: u64) {
    // a node that stopped leading (paused past its lease, cut off from etcd) must not touch a container
    if let Err(e) = app.confirm_leadership().await {
        tracing::warn!(%service, error = %e, "not acting: leadership not confirmed");
        return;
    }
    let template = app.scaling_template(service);
    match action {
        Action::Create { instance } => {
            let Some(t) = template else { return };
            match runtime.create(service, &instance, &t).await {
                Ok(c) => {
                    tracing::info!(%service, %instance, address = ?c.address, "container started");
                    if let Some(address) = c.address {
                        register(app, service, &instance, &address, ("docker", "docker"), policy.slow_start > 0.0)
                            .await;
                    }
                }
                Err(e) => {
                    let message = e.to_string();
                    tracing::error!(%service, %message, "scale-up failed");
                    let detail = serde_json::json!({"message": message});
                    let published = event(now, EventKind::ScalingFailed, service, Some(&instance), detail);
                    record_failure(app, service, now, ScalingEventKind::Failed, message, published);
                }
            }
        }
        Action::Register { instance, address } => {
            register(app, service, &instance, &address, ("docker", "docker"), false).await
        }
        Action::Drain { instance } => drain(app, service, &instance).await,
        Action::Stop { container, instance, reason } => {
            let grace = template.map_or(10, |t| t.stop_grace);
            if let Err(e) = runtime.stop(&container, grace).await {
                tracing::warn!(%service, %instance, error = %e, "stop");
                return;
            }
            let _ = runtime.remove(&container).await;
            deregister(app, service, &instance, &reason).await;
        }
        Action::Remove { container, instance, failed, reason } => {
            let _ = runtime.remove(&container).await;
            deregister(app, service, &instance, &reason).await;
            if failed {
                replaced(app, service, &instance, &reason, now);
            }
        }
        Action::Deregister { instance } => deregister(app, service, &instance, "container gone").await,
        Action::Replace { instance, reason } => {
            // drained like a scale-down victim (then stopped by a later plan); its replacement is created now
            let timeout = app.config.drain_timeout_ms;
            let r = app
                .change_as_leader(|reg, now| {
                    reg.drain(service, &instance, timeout, now).map(|e| ((), e)).map_err(ActError::from)
                })
                .await;
            if let Err(e) = r {
                tracing::warn!(%service, %instance, error = %e, "drain before replacement");
                return;
            }
            replaced(app, service, &instance, &reason, now);
        }
        Action::HoldReplacements { .. } => {}
    }
}

/// Records a replacement and publishes it.
fn replaced(app: &App, service: &str, instance: &str, reason: &str, now: u64) {
    let detail = serde_json::json!({"reason": reason});
    let published = event(now, EventKind::InstanceReplaced, service, Some(instance), detail);
    record_failure(app, service, now, ScalingEventKind::Replaced, format!("{instance} {reason}"), published);
}

/// Records a failure (it feeds the crash-loop backoff) as a scaling event of `kind`, and publishes `published`.
fn record_failure(app: &App, service: &str, now: u64, kind: ScalingEventKind, reason: String, published: Event) {
    if let Some(st) = app.scaling().get_mut(service) {
        st.failed(now, kind, reason);
        app.metrics.scaling_event(service, kind.as_str());
    }
    app.observe(vec![published]);
}

/// What a registry change made by the controller can fail with.
#[derive(Debug, thiserror::Error)]
enum ActError {
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    #[error(transparent)]
    Persist(#[from] PersistError),
}

/// The actions of a Swarm service's plan ([`swarm_plan`]).
async fn act_swarm<R: Runtime>(
    app: &App,
    runtime: &R,
    service: &str,
    policy: &ScalingPolicy,
    action: SwarmAction,
    now: u64,
) {
    if let Err(e) = app.confirm_leadership().await {
        tracing::warn!(%service, error = %e, "not acting: leadership not confirmed");
        return;
    }
    match action {
        SwarmAction::Register { instance, address, zone } => {
            let zone = if zone.is_empty() { "swarm".to_string() } else { zone };
            register(app, service, &instance, &address, (&zone, "swarm"), policy.slow_start > 0.0).await
        }
        SwarmAction::Deregister { instance, reason } => deregister(app, service, &instance, &reason).await,
        SwarmAction::Drain { instance } => drain(app, service, &instance).await,
        SwarmAction::ChangedByHand { from, to } => {
            tracing::warn!(%service, from, to, "the Swarm service's replicas were changed outside the supervisor");
            if let Some(st) = app.scaling().get_mut(service) {
                st.changed_outside(now, from, to);
            }
            app.metrics.scaling_event(service, ScalingEventKind::ChangedOutside.as_str());
            let detail =
                serde_json::json!({"from": from, "to": to, "min": policy.min_instances, "max": policy.max_instances});
            app.observe(vec![event(now, EventKind::ReplicasChangedOutside, service, None, detail)]);
        }
        SwarmAction::SetReplicas { from, to, version } => {
            match runtime.set_replicas(service, Replicas { count: from, version }, to).await {
                Ok(()) => {
                    tracing::info!(%service, from, to, "swarm replicas set");
                    if let Some(st) = app.scaling().get_mut(service) {
                        st.swarm_replicas = Some(to);
                        st.swarm_target = Some(to);
                    }
                }
                Err(e) => {
                    let message = e.to_string();
                    tracing::warn!(%service, %message, "setting the swarm replicas failed");
                    let detail = serde_json::json!({"message": message, "from": from, "to": to});
                    let published = event(now, EventKind::ScalingFailed, service, None, detail);
                    record_failure(app, service, now, ScalingEventKind::Failed, message, published);
                }
            }
        }
    }
}

async fn drain(app: &App, service: &str, instance: &str) {
    let timeout = app.config.drain_timeout_ms;
    let r = app
        .change_as_leader(|reg, now| {
            reg.drain(service, instance, timeout, now).map(|e| ((), e)).map_err(ActError::from)
        })
        .await;
    if let Err(e) = r {
        tracing::warn!(%service, %instance, error = %e, "drain");
    }
}

/// Registers an instance in `(zone, tag)`; with slow start it begins at a tenth of its weight.
async fn register(app: &App, service: &str, instance: &str, address: &str, place: (&str, &str), slow_start: bool) {
    let (zone, tag) = place;
    let full = equilibrio_contract::table::DEFAULT_WEIGHT;
    let spec = InstanceSpec {
        id: instance.into(),
        address: address.into(),
        weight: full,
        zone: zone.into(),
        tags: vec![tag.into()],
        version: String::new(),
        capabilities: vec![],
    };
    let r = app
        .change_as_leader(|reg, now| {
            let events = reg.register(service, spec.clone(), Source::Docker, None, now).map_err(ActError::from)?;
            if slow_start && let Some(i) = reg.services.get_mut(service).and_then(|s| s.instances.get_mut(instance)) {
                i.full_weight = Some(full);
                i.spec.weight = (full / 10).max(1);
            }
            Ok::<_, ActError>(((), events))
        })
        .await;
    if let Err(e) = r {
        tracing::warn!(%service, %instance, error = %e, "register");
    }
}

async fn deregister(app: &App, service: &str, instance: &str, why: &str) {
    let r = app
        .change_as_leader(|reg, now| match reg.deregister(service, instance, now, why) {
            Ok(e) => Ok(((), e)),
            Err(crate::registry::RegistryError::NoInstance(..)) => Ok(((), vec![])),
            Err(e) => Err(ActError::from(e)),
        })
        .await;
    if let Err(e) = r {
        tracing::warn!(%service, %instance, error = %e, "deregister");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::scaling::fake_runtime::FakeRuntime;
    use crate::scaling::runtime::Stats;

    fn app(extra: &str) -> App {
        let yaml = format!(
            "environment: development\nservices:\n  av:\n    docker: {{image: 'equilibrio/agente-vendedor:dev', port: 8080}}\n    scaling: {{min_instances: 1, max_instances: 3, slow_start: 0{extra}}}\n"
        );
        App::new(Config::parse(&yaml, None).unwrap()).unwrap()
    }

    /// Marks every registered instance healthy, as passing health checks would.
    fn all_healthy(app: &App, now: u64) {
        let ids: Vec<String> = app.registry().service("av").unwrap().instances.keys().cloned().collect();
        for id in ids {
            app.registry().record_check("av", &id, true, 1.0, now);
        }
    }

    #[tokio::test]
    async fn starts_the_minimum_and_registers_it() {
        let (a, rt) = (app(""), FakeRuntime::default());
        round(&a, &rt, Now::at(1000)).await.unwrap();
        assert_eq!(rt.running("av"), 1);
        let reg = a.registry();
        let inst = reg.service("av").unwrap().instances.values().next().unwrap().clone();
        assert_eq!(inst.source, Source::Docker);
        assert_eq!(inst.table_state(), "unhealthy", "no traffic before the health check passes");
    }

    #[tokio::test]
    async fn scales_up_on_cpu_and_respects_max() {
        let (a, rt) = (app(""), FakeRuntime::default());
        rt.set_stats(Stats { cpu_percent: 100.0, memory_percent: 10.0 });
        let mut now = 1000;
        for _ in 0..40 {
            round(&a, &rt, Now::at(now)).await.unwrap();
            all_healthy(&a, now);
            now += 1000;
        }
        assert_eq!(rt.running("av"), 3, "max_instances holds");
        let events = a.scaling().get("av").unwrap().events.clone();
        let up = events.iter().find(|e| e.kind == "scale_up" && e.from >= 1).unwrap();
        assert!(up.reason.contains("cpu_utilization"), "{}", up.reason);
    }

    #[tokio::test]
    async fn a_killed_container_is_replaced_and_adoption_makes_no_duplicates() {
        let (a, rt) = (app(""), FakeRuntime::default());
        rt.set_stats(Stats { cpu_percent: 50.0, memory_percent: 10.0 });
        round(&a, &rt, Now::at(1000)).await.unwrap();
        all_healthy(&a, 1000);
        let first = rt.all()[0].instance.clone();
        rt.kill(&first, true);
        round(&a, &rt, Now::at(2000)).await.unwrap();
        round(&a, &rt, Now::at(3000)).await.unwrap();
        assert_eq!(rt.running("av"), 1);
        assert!(!a.registry().service("av").unwrap().instances.contains_key(&first));
        let events = a.scaling().get("av").unwrap().events.clone();
        assert!(events.iter().any(|e| e.kind == "replaced" && e.reason.contains("OOM")), "{events:?}");
        // a new supervisor (empty registry) over the same containers adopts them
        let b = app("");
        round(&b, &rt, Now::at(10_000)).await.unwrap();
        assert_eq!(rt.running("av"), 1, "no duplicate");
        assert_eq!(b.registry().service("av").unwrap().instances.len(), 1);
    }

    #[tokio::test]
    async fn docker_down_is_an_error_and_failed_creates_are_events() {
        let (a, rt) = (app(""), FakeRuntime::default());
        rt.set_unreachable(true);
        assert!(round(&a, &rt, Now::at(1000)).await.is_err());
        rt.set_unreachable(false);
        rt.fail_create(Some("No such image: equilibrio/agente-vendedor:dev"));
        round(&a, &rt, Now::at(2000)).await.unwrap();
        let events = a.scaling().get("av").unwrap().events.clone();
        assert!(events.iter().any(|e| e.kind == "failed" && e.reason.contains("No such image")), "{events:?}");
        // backed off: no new attempt right away
        round(&a, &rt, Now::at(2500)).await.unwrap();
        assert_eq!(a.scaling().get("av").unwrap().events.iter().filter(|e| e.kind == "failed").count(), 1);
    }

    #[tokio::test]
    async fn a_swarm_service_is_adopted_scaled_through_its_replicas_and_drained_before_swarm_removes() {
        // no proxy reports here: CPU and memory decide; short windows
        let quick = ", scale_down_stabilization: 10, scale_down_cooldown: 5, request_rate: {weight: 0}, response_time: {weight: 0}, cpu_utilization: {measurement_window: 10}, memory_utilization: {measurement_window: 10}";
        let (a, rt) = (app(quick), FakeRuntime::default());
        rt.as_swarm(2);
        rt.add_task("av", 1, "n1", "10.0.0.1:30001");
        rt.add_task("av", 2, "n1", "10.0.0.1:30002");
        rt.set_stats(Stats { cpu_percent: 100.0, memory_percent: 10.0 });
        // first round: adopted as it is (no replica change on start), tasks registered with their node's zone
        round(&a, &rt, Now::at(1000)).await.unwrap();
        assert_eq!(rt.swarm_replicas().unwrap().count, 2);
        {
            let reg = a.registry();
            let i = &reg.service("av").unwrap().instances["av.1.t1"];
            assert_eq!((i.spec.zone.as_str(), i.spec.address.as_str()), ("zone-n1", "10.0.0.1:30001"));
        }
        all_healthy(&a, 1000);
        // hot: the next rounds raise the replicas (max 3); Swarm places the task on another node
        let mut now = 2000;
        while rt.swarm_replicas().unwrap().count < 3 && now < 60_000 {
            round(&a, &rt, Now::at(now)).await.unwrap();
            all_healthy(&a, now);
            now += 1000;
        }
        assert_eq!(rt.swarm_replicas().unwrap().count, 3);
        rt.add_task("av", 3, "n2", "10.0.0.2:30003");
        // someone scales it by hand above max: set back, with an event
        let hand = rt.swarm_replicas().unwrap();
        rt.set_replicas("av", hand, 5).await.unwrap();
        round(&a, &rt, Now::at(now)).await.unwrap();
        assert_eq!(rt.swarm_replicas().unwrap().count, 3, "held to max_instances");
        assert!(a.events.history(Some("av")).iter().any(|e| e.kind == EventKind::ReplicasChangedOutside));
        // idle: down to the minimum; Swarm keeps slot 1 (n1's first copy) and removes 2 and 3, which are drained
        // first: the count goes down only once both drains are done
        rt.set_stats(Stats { cpu_percent: 1.0, memory_percent: 10.0 });
        all_healthy(&a, now);
        let drained =
            |id: &str| a.registry().service("av").unwrap().instances.get(id).is_some_and(|i| i.drain.is_some());
        let mut both_drained = false;
        for _ in 0..120 {
            now += 1000;
            round(&a, &rt, Now::at(now)).await.unwrap();
            all_healthy(&a, now);
            if rt.swarm_replicas().unwrap().count < 3 {
                break;
            }
            assert!(!drained("av.1.t1"), "slot 1 is the one Swarm keeps");
            both_drained = drained("av.2.t2") && drained("av.3.t3");
            // the drains complete (nothing in flight) in the registry's own (wall-clock) time
            a.registry().advance_drains(|_, _| Some(0), crate::app::now_ms() + 60_000);
        }
        let events = a.scaling().get("av").unwrap().events.clone();
        assert_eq!(rt.swarm_replicas().unwrap().count, 1, "{events:?}");
        assert!(both_drained, "the count went down before slots 2 and 3 were drained");
    }
}
