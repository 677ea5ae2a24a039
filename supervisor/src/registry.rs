//! The registry: services, their instances, and each instance's health and administrative state.
//!
//! Pure state with explicit time: every change returns the events it caused and bumps the service's table version.
//! Versions are the time of the change in milliseconds, made strictly increasing, so they keep rising across restarts
//! (a proxy refuses a table older than the one it has).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use equilibrio_contract::table::EndpointState;

use crate::config::{HealthCheck, InstanceSpec, ServiceConfig};
use crate::events::{Event, EventKind};
use crate::health::{Health, HealthState, Thresholds};

/// Where an instance came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Config,
    Api,
    Docker,
}

/// Draining: no new traffic; done when its in-flight count reaches 0 or at the deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Drain {
    pub since_ms: u64,
    pub deadline_ms: u64,
    /// Set when the drain completed (in flight reached 0, or the deadline passed).
    pub done_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Instance {
    #[serde(flatten)]
    pub spec: InstanceSpec,
    pub source: Source,
    /// When it was registered (unix ms).
    pub started_at_ms: u64,
    #[schema(value_type = Object)]
    pub health: HealthState,
    pub drain: Option<Drain>,
    /// Heartbeat TTL (ms): an instance registered with one is removed when it misses it.
    pub heartbeat_ttl_ms: Option<u64>,
    pub last_heartbeat_ms: u64,
    /// Latency of the last health check (ms).
    pub check_latency_ms: Option<f64>,
    /// Since when it is healthy (for slow start).
    #[serde(default)]
    pub healthy_since_ms: Option<u64>,
    /// Set while the weight ramps up after a scale-up (slow start): the weight it ramps to.
    #[serde(default)]
    pub full_weight: Option<u32>,
    /// Since when it is unhealthy after having been healthy (the autoscaler replaces it after
    /// `replace_unhealthy_after`); cleared when it passes again.
    #[serde(default)]
    pub unhealthy_since_ms: Option<u64>,
    /// Since when this supervisor watches it: registration, or the restore after a restart. The start grace
    /// (`start_timeout`) counts from here, so a restart never makes an adopted instance look overdue.
    #[serde(default)]
    pub watched_since_ms: u64,
}

impl Instance {
    pub fn new(spec: InstanceSpec, source: Source, now_ms: u64, heartbeat_ttl_ms: Option<u64>) -> Instance {
        Instance {
            spec,
            source,
            started_at_ms: now_ms,
            health: HealthState::default(),
            drain: None,
            heartbeat_ttl_ms,
            last_heartbeat_ms: now_ms,
            check_latency_ms: None,
            healthy_since_ms: None,
            full_weight: None,
            unhealthy_since_ms: None,
            watched_since_ms: now_ms,
        }
    }

    /// The state the proxies see.
    pub fn endpoint_state(&self) -> EndpointState {
        match (self.health.health, self.drain.is_some()) {
            (Health::Healthy, false) => EndpointState::Healthy,
            (Health::Healthy, true) => EndpointState::Draining,
            _ => EndpointState::Unhealthy,
        }
    }

    /// [`Instance::endpoint_state`] by name: `healthy`, `draining` or `unhealthy`.
    pub fn table_state(&self) -> &'static str {
        self.endpoint_state().as_str()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Service {
    pub name: String,
    pub policy: Value,
    pub health_check: HealthCheck,
    pub instances: BTreeMap<String, Instance>,
    /// Table version: the time of the last change (ms), strictly increasing.
    pub version: u64,
    /// The auto-scaling policy, when the service has a container template (runtime changes are kept here).
    #[serde(default)]
    pub scaling: Option<crate::scaling::policy::ScalingPolicy>,
}

impl Service {
    fn bump(&mut self, now_ms: u64) {
        self.version = now_ms.max(self.version + 1);
    }

    pub fn thresholds(&self) -> Thresholds {
        Thresholds { retries: self.health_check.retries, rise: self.health_check.rise }
    }
}

/// The proxies' default table limit (the filter's `supervisor.max_table_bytes`), less room for the rest of the table.
const MAX_TABLE_BYTES: usize = (1 << 20) - 4096;

/// An upper bound of an endpoint's bytes in the table (its fields and the JSON around them).
fn endpoint_bytes(spec: &InstanceSpec) -> usize {
    spec.id.len() + spec.address.len() + spec.zone.len() + 96
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("no service `{0}`")]
    NoService(String),
    #[error("no instance `{1}` in service `{0}`")]
    NoInstance(String, String),
    #[error("instance `{0}` already exists")]
    Exists(String),
    #[error("address {0} is already used by instance `{1}`")]
    AddressTaken(String, String),
    #[error("service `{service}` has {count} instances: one more would not fit the proxies' table")]
    Full { service: String, count: usize },
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Registry {
    pub services: BTreeMap<String, Service>,
    /// The deployment secret (made at the first start, kept in the state file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<crate::secret::Secret>,
}

/// A change to an instance's administrative fields.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceUpdate {
    #[schema(maximum = 1_000_000)]
    pub weight: Option<u32>,
    #[schema(pattern = "^[A-Za-z0-9._-]{0,64}$")]
    pub zone: Option<String>,
}

impl Registry {
    /// A registry from the configuration; instances from the config are kept as configured.
    pub fn from_config(services: &BTreeMap<String, ServiceConfig>, now_ms: u64) -> Registry {
        let mut r = Registry::default();
        for (name, s) in services {
            let instances = s
                .instances
                .iter()
                .map(|spec| (spec.id.clone(), Instance::new(spec.clone(), Source::Config, now_ms, None)))
                .collect();
            r.services.insert(
                name.clone(),
                Service {
                    name: name.clone(),
                    policy: s.policy.clone(),
                    health_check: s.health_check.clone(),
                    instances,
                    version: now_ms,
                    scaling: s.docker.as_ref().map(|_| s.scaling.clone()),
                },
            );
        }
        r
    }

    /// Restores runtime changes from a saved registry onto one built from the configuration: instances registered
    /// through the API, weights, zones, drains, policies and health-check settings. Health is re-learnt by checking,
    /// and every instance gets a fresh start grace from `now_ms`: what it did before the restart is not held against it.
    pub fn restore(&mut self, saved: Registry, now_ms: u64) {
        if saved.secret.is_some() {
            self.secret = saved.secret;
        }
        for (name, saved_svc) in saved.services {
            let Some(svc) = self.services.get_mut(&name) else { continue };
            svc.policy = saved_svc.policy;
            svc.health_check = saved_svc.health_check;
            if svc.scaling.is_some() && saved_svc.scaling.is_some() {
                svc.scaling = saved_svc.scaling;
            }
            for (id, mut inst) in saved_svc.instances {
                inst.health = HealthState::default();
                inst.check_latency_ms = None;
                inst.last_heartbeat_ms = now_ms;
                inst.unhealthy_since_ms = None;
                inst.watched_since_ms = now_ms;
                match svc.instances.get_mut(&id) {
                    Some(current) => {
                        current.spec.weight = inst.spec.weight;
                        current.spec.zone = inst.spec.zone;
                        current.drain = inst.drain;
                    }
                    None if inst.source != Source::Config => {
                        svc.instances.insert(id, inst);
                    }
                    // removed from the config file since: the file wins
                    None => {}
                }
            }
            svc.version = saved_svc.version.max(svc.version) + 1;
        }
    }

    /// Adds what the configuration has and this registry (read from a shared store) lacks: services, and instances of
    /// the configuration. What the store has wins: several supervisors may start with different files, and the
    /// registry they share is the truth once written.
    pub fn adopt_config(&mut self, services: &BTreeMap<String, ServiceConfig>, now_ms: u64) {
        let configured = Registry::from_config(services, now_ms);
        for (name, svc) in configured.services {
            match self.services.get_mut(&name) {
                None => {
                    self.services.insert(name, svc);
                }
                Some(current) => {
                    let mut added = false;
                    for (id, inst) in svc.instances {
                        if let std::collections::btree_map::Entry::Vacant(slot) = current.instances.entry(id) {
                            slot.insert(inst);
                            added = true;
                        }
                    }
                    if added {
                        current.bump(now_ms);
                    }
                }
            }
        }
    }

    pub fn service(&self, name: &str) -> Result<&Service, RegistryError> {
        self.services.get(name).ok_or_else(|| RegistryError::NoService(name.to_string()))
    }

    fn service_mut(&mut self, name: &str) -> Result<&mut Service, RegistryError> {
        self.services.get_mut(name).ok_or_else(|| RegistryError::NoService(name.to_string()))
    }

    fn instance_mut(&mut self, service: &str, id: &str) -> Result<(&mut Instance, u64), RegistryError> {
        let svc = self.service_mut(service)?;
        let version = svc.version;
        let inst = svc.instances.get_mut(id).ok_or_else(|| RegistryError::NoInstance(service.into(), id.into()))?;
        Ok((inst, version))
    }

    pub fn register(
        &mut self,
        service: &str,
        spec: InstanceSpec,
        source: Source,
        heartbeat_ttl_ms: Option<u64>,
        now_ms: u64,
    ) -> Result<Vec<Event>, RegistryError> {
        let svc = self.service_mut(service)?;
        if svc.instances.contains_key(&spec.id) {
            return Err(RegistryError::Exists(spec.id));
        }
        if let Some(other) = svc.instances.values().find(|i| i.spec.address == spec.address) {
            return Err(RegistryError::AddressTaken(spec.address, other.spec.id.clone()));
        }
        // the proxies refuse a table with more endpoints (and keep a stale one): refuse the instance instead
        let bytes: usize =
            svc.instances.values().map(|i| endpoint_bytes(&i.spec)).sum::<usize>() + endpoint_bytes(&spec);
        if svc.instances.len() >= equilibrio_contract::table::MAX_ENDPOINTS || bytes > MAX_TABLE_BYTES {
            return Err(RegistryError::Full { service: service.to_string(), count: svc.instances.len() });
        }
        let id = spec.id.clone();
        let detail = serde_json::json!({"address": spec.address, "weight": spec.weight, "zone": spec.zone});
        svc.instances.insert(id.clone(), Instance::new(spec, source, now_ms, heartbeat_ttl_ms));
        svc.bump(now_ms);
        Ok(vec![Event::new(now_ms, EventKind::Registered, service, Some(&id), detail)])
    }

    pub fn deregister(&mut self, service: &str, id: &str, now_ms: u64, why: &str) -> Result<Vec<Event>, RegistryError> {
        let svc = self.service_mut(service)?;
        svc.instances.remove(id).ok_or_else(|| RegistryError::NoInstance(service.into(), id.into()))?;
        svc.bump(now_ms);
        Ok(vec![Event::new(now_ms, EventKind::Deregistered, service, Some(id), serde_json::json!({"reason": why}))])
    }

    pub fn update(
        &mut self,
        service: &str,
        id: &str,
        u: &InstanceUpdate,
        now_ms: u64,
    ) -> Result<Vec<Event>, RegistryError> {
        let (inst, _) = self.instance_mut(service, id)?;
        let mut events = Vec::new();
        if let Some(w) = u.weight
            && w != inst.spec.weight
        {
            let from = inst.spec.weight;
            inst.spec.weight = w;
            events.push(Event::new(
                now_ms,
                EventKind::WeightChanged,
                service,
                Some(id),
                serde_json::json!({"from": from, "to": w}),
            ));
        }
        if let Some(z) = &u.zone
            && *z != inst.spec.zone
        {
            let from = std::mem::replace(&mut inst.spec.zone, z.clone());
            events.push(Event::new(
                now_ms,
                EventKind::ZoneChanged,
                service,
                Some(id),
                serde_json::json!({"from": from, "to": z}),
            ));
        }
        if !events.is_empty() {
            self.service_mut(service)?.bump(now_ms);
        }
        Ok(events)
    }

    /// Starts draining `id`; a drain already under way is left as it is.
    pub fn drain(
        &mut self,
        service: &str,
        id: &str,
        timeout_ms: u64,
        now_ms: u64,
    ) -> Result<Vec<Event>, RegistryError> {
        let (inst, _) = self.instance_mut(service, id)?;
        if inst.drain.is_some() {
            return Ok(vec![]);
        }
        inst.drain = Some(Drain { since_ms: now_ms, deadline_ms: now_ms + timeout_ms, done_ms: None });
        self.service_mut(service)?.bump(now_ms);
        Ok(vec![Event::new(
            now_ms,
            EventKind::Draining,
            service,
            Some(id),
            serde_json::json!({"timeout_ms": timeout_ms}),
        )])
    }

    /// Marks drains done when the instance has nothing in flight (as the proxies report) or the deadline passed.
    pub fn advance_drains(&mut self, in_flight: impl Fn(&str, &str) -> Option<i64>, now_ms: u64) -> Vec<Event> {
        let mut events = Vec::new();
        for (name, svc) in &mut self.services {
            for (id, inst) in &mut svc.instances {
                let Some(drain) = &mut inst.drain else { continue };
                if drain.done_ms.is_some() {
                    continue;
                }
                let idle = in_flight(name, id).is_some_and(|n| n <= 0) && now_ms > drain.since_ms;
                let late = now_ms >= drain.deadline_ms;
                if idle || late {
                    drain.done_ms = Some(now_ms);
                    let reason = if idle { "no requests in flight" } else { "drain timeout" };
                    events.push(Event::new(
                        now_ms,
                        EventKind::Drained,
                        name,
                        Some(id),
                        serde_json::json!({"reason": reason}),
                    ));
                }
            }
        }
        events
    }

    /// Records a health-check result; returns the event when the instance's health changed.
    pub fn record_check(&mut self, service: &str, id: &str, ok: bool, latency_ms: f64, now_ms: u64) -> Option<Event> {
        let svc = self.services.get_mut(service)?;
        let thresholds = svc.thresholds();
        let inst = svc.instances.get_mut(id)?;
        inst.check_latency_ms = Some(latency_ms);
        let was = inst.health.health;
        let changed = inst.health.record(ok, thresholds)?;
        inst.healthy_since_ms = (changed == Health::Healthy).then_some(now_ms);
        // failing after having served (a start that never passed is the start grace's business)
        inst.unhealthy_since_ms = (was == Health::Healthy && changed != Health::Healthy).then_some(now_ms);
        svc.bump(now_ms);
        let kind = if changed == Health::Healthy { EventKind::Healthy } else { EventKind::Unhealthy };
        Some(Event::new(now_ms, kind, service, Some(id), serde_json::json!({"check_latency_ms": latency_ms})))
    }

    /// Sets an instance's health as the checker found it (health, since when healthy, since when unhealthy): a
    /// transition made again after another node's write replaced it.
    pub fn set_health(&mut self, service: &str, id: &str, state: (HealthState, Option<u64>, Option<u64>), now_ms: u64) {
        let Some(svc) = self.services.get_mut(service) else { return };
        let Some(inst) = svc.instances.get_mut(id) else { return };
        if (inst.health.health, inst.healthy_since_ms, inst.unhealthy_since_ms) == (state.0.health, state.1, state.2) {
            return;
        }
        (inst.health, inst.healthy_since_ms, inst.unhealthy_since_ms) = state;
        svc.bump(now_ms);
    }

    pub fn heartbeat(&mut self, service: &str, id: &str, now_ms: u64) -> Result<(), RegistryError> {
        let (inst, _) = self.instance_mut(service, id)?;
        inst.last_heartbeat_ms = now_ms;
        Ok(())
    }

    /// Removes the instances that missed their heartbeat TTL (as Consul's TTL checks).
    pub fn expire_heartbeats(&mut self, now_ms: u64) -> Vec<Event> {
        self.missed_heartbeats(now_ms)
            .into_iter()
            .flat_map(|(s, id)| self.deregister(&s, &id, now_ms, "missed its heartbeat").unwrap_or_default())
            .collect()
    }

    /// (service, instance) of the instances past their heartbeat TTL at `now_ms`.
    pub fn missed_heartbeats(&self, now_ms: u64) -> Vec<(String, String)> {
        let mut missed = Vec::new();
        for (name, svc) in &self.services {
            for (id, inst) in &svc.instances {
                if let Some(ttl) = inst.heartbeat_ttl_ms
                    && now_ms.saturating_sub(inst.last_heartbeat_ms) > ttl
                {
                    missed.push((name.clone(), id.clone()));
                }
            }
        }
        missed
    }

    pub fn set_policy(&mut self, service: &str, policy: Value, now_ms: u64) -> Result<Vec<Event>, RegistryError> {
        let svc = self.service_mut(service)?;
        if svc.policy == policy {
            return Ok(vec![]);
        }
        svc.policy = policy;
        svc.bump(now_ms);
        let shown = equilibrio_contract::policy::redact(&svc.policy);
        Ok(vec![Event::new(now_ms, EventKind::PolicyChanged, service, None, shown)])
    }

    /// Slow start: moves a ramping instance's weight toward its full weight (10% at first, linear over
    /// `slow_start_ms` from when it became healthy). Returns whether the table changed.
    pub fn ramp(&mut self, service: &str, id: &str, slow_start_ms: u64, now_ms: u64) -> bool {
        let Some(svc) = self.services.get_mut(service) else { return false };
        let Some(inst) = svc.instances.get_mut(id) else { return false };
        let (Some(full), Some(since)) = (inst.full_weight, inst.healthy_since_ms) else { return false };
        let share = if slow_start_ms == 0 { 1.0 } else { now_ms.saturating_sub(since) as f64 / slow_start_ms as f64 };
        let weight = ((f64::from(full) * share.clamp(0.1, 1.0)).round() as u32).clamp(1, full.max(1));
        if share >= 1.0 {
            inst.full_weight = None;
        }
        if weight == inst.spec.weight {
            return false;
        }
        inst.spec.weight = weight;
        svc.bump(now_ms);
        true
    }

    pub fn set_scaling(
        &mut self,
        service: &str,
        policy: crate::scaling::policy::ScalingPolicy,
        now_ms: u64,
    ) -> Result<Vec<Event>, RegistryError> {
        let svc = self.service_mut(service)?;
        if svc.scaling.as_ref() == Some(&policy) {
            return Ok(vec![]);
        }
        let detail = serde_json::to_value(&policy).unwrap_or_default();
        svc.scaling = Some(policy);
        Ok(vec![Event::new(now_ms, EventKind::ScalingPolicyChanged, service, None, detail)])
    }

    pub fn set_health_check(
        &mut self,
        service: &str,
        h: HealthCheck,
        now_ms: u64,
    ) -> Result<Vec<Event>, RegistryError> {
        let svc = self.service_mut(service)?;
        if svc.health_check == h {
            return Ok(vec![]);
        }
        let detail = serde_json::to_value(&h).unwrap_or_default();
        svc.health_check = h;
        Ok(vec![Event::new(now_ms, EventKind::HealthCheckChanged, service, None, detail)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn registry() -> Registry {
        let c = Config::parse(
            "services:\n  av:\n    health_check: {retries: 2, rise: 1}\n    instances: [{id: a, address: '127.0.0.1:1'}]\n",
            None,
        )
        .unwrap();
        Registry::from_config(&c.services, 1000)
    }

    fn spec(id: &str, port: u16) -> InstanceSpec {
        InstanceSpec {
            id: id.into(),
            address: format!("127.0.0.1:{port}"),
            weight: 100,
            zone: String::new(),
            tags: vec![],
            version: String::new(),
            capabilities: vec![],
        }
    }

    #[test]
    fn versions_rise_on_every_change() {
        let mut r = registry();
        let v0 = r.service("av").unwrap().version;
        r.register("av", spec("b", 2), Source::Api, None, 500).unwrap();
        let v1 = r.service("av").unwrap().version;
        assert!(v1 > v0, "strictly increasing even if the clock is behind");
        r.update("av", "b", &InstanceUpdate { weight: Some(5), zone: None }, 2000).unwrap();
        assert_eq!(r.service("av").unwrap().version, 2000);
        // no change, no bump
        assert!(r.update("av", "b", &InstanceUpdate { weight: Some(5), zone: None }, 3000).unwrap().is_empty());
        assert_eq!(r.service("av").unwrap().version, 2000);
    }

    #[test]
    fn conflicts_are_refused() {
        let mut r = registry();
        assert_eq!(r.register("av", spec("a", 9), Source::Api, None, 1), Err(RegistryError::Exists("a".into())));
        assert!(matches!(r.register("av", spec("z", 1), Source::Api, None, 1), Err(RegistryError::AddressTaken(..))));
        assert!(matches!(r.register("nope", spec("z", 9), Source::Api, None, 1), Err(RegistryError::NoService(_))));
        assert!(matches!(r.deregister("av", "zz", 1, "x"), Err(RegistryError::NoInstance(..))));
    }

    #[test]
    fn health_checks_drive_the_table_state() {
        let mut r = registry();
        let state = |r: &Registry| r.service("av").unwrap().instances["a"].table_state();
        assert_eq!(state(&r), "unhealthy", "unknown gets no traffic");
        let e = r.record_check("av", "a", true, 1.0, 2000).unwrap();
        assert_eq!(e.kind, EventKind::Healthy);
        assert_eq!(state(&r), "healthy");
        assert!(r.record_check("av", "a", false, 1.0, 3000).is_none());
        assert_eq!(r.record_check("av", "a", false, 1.0, 4000).unwrap().kind, EventKind::Unhealthy);
        assert_eq!(state(&r), "unhealthy");
    }

    #[test]
    fn drains_finish_when_idle_or_late() {
        let mut r = registry();
        r.record_check("av", "a", true, 1.0, 1);
        r.drain("av", "a", 10_000, 2000).unwrap();
        assert_eq!(r.service("av").unwrap().instances["a"].table_state(), "draining");
        assert!(r.advance_drains(|_, _| Some(3), 3000).is_empty());
        let done = r.advance_drains(|_, _| Some(0), 4000);
        assert_eq!(done[0].kind, EventKind::Drained);
        let mut r2 = registry();
        r2.drain("av", "a", 10_000, 2000).unwrap();
        assert!(r2.advance_drains(|_, _| None, 11_999).is_empty());
        assert_eq!(r2.advance_drains(|_, _| None, 12_000).len(), 1);
    }

    #[test]
    fn heartbeats_expire() {
        let mut r = registry();
        r.register("av", spec("hb", 3), Source::Api, Some(5000), 1000).unwrap();
        r.heartbeat("av", "hb", 4000).unwrap();
        assert!(r.expire_heartbeats(8000).is_empty());
        let e = r.expire_heartbeats(9001);
        assert_eq!(e[0].kind, EventKind::Deregistered);
        assert!(!r.service("av").unwrap().instances.contains_key("hb"));
    }

    #[test]
    fn restore_keeps_runtime_changes() {
        let mut r = registry();
        r.register("av", spec("api", 4), Source::Api, None, 1).unwrap();
        r.update("av", "a", &InstanceUpdate { weight: Some(7), zone: Some("z".into()) }, 2).unwrap();
        r.drain("av", "a", 1000, 3).unwrap();
        r.set_policy("av", serde_json::json!({"algorithm": "random"}), 4).unwrap();
        let saved: Registry = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        let mut fresh = registry();
        fresh.restore(saved.clone(), 10);
        let s = fresh.service("av").unwrap();
        assert!(s.instances.contains_key("api"));
        assert_eq!(s.instances["a"].spec.weight, 7);
        assert!(s.instances["a"].drain.is_some());
        assert_eq!(s.policy["algorithm"], "random");
        assert!(s.version > saved.service("av").unwrap().version);
    }

    #[test]
    fn failing_is_timed_from_the_fall_and_a_restore_gives_a_fresh_grace() {
        let mut r = registry();
        r.register("av", spec("d", 5), Source::Docker, None, 1000).unwrap();
        let inst = |r: &Registry| r.service("av").unwrap().instances["d"].clone();
        assert_eq!(inst(&r).watched_since_ms, 1000);
        // a start that fails is not "failing after serving"
        r.record_check("av", "d", false, 1.0, 2000);
        assert_eq!(inst(&r).unhealthy_since_ms, None);
        r.record_check("av", "d", true, 1.0, 3000);
        r.record_check("av", "d", false, 1.0, 4000);
        r.record_check("av", "d", false, 1.0, 5000);
        assert_eq!(inst(&r).unhealthy_since_ms, Some(5000));
        r.record_check("av", "d", true, 1.0, 6000);
        assert_eq!(inst(&r).unhealthy_since_ms, None);
        r.record_check("av", "d", false, 1.0, 7000);
        r.record_check("av", "d", false, 1.0, 8000);
        let saved: Registry = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        let mut fresh = registry();
        fresh.restore(saved, 900_000);
        let i = inst(&fresh);
        assert_eq!((i.unhealthy_since_ms, i.watched_since_ms, i.started_at_ms), (None, 900_000, 1000));
        assert_eq!(i.health, HealthState::default());
    }
}
