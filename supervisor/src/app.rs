//! The running supervisor's shared state, and the one path every change takes: mutate the registry under its lock,
//! save the state file, publish the events.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::config::Config;
use crate::events::{Event, EventBus};
use crate::metrics::Metrics;
use crate::persist;
use crate::registry::Registry;
use crate::reports::Reports;
use crate::scaling::controller::ScalingState;
use crate::scaling::runtime::Template;

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// How long proxies' reports are kept for rates and p95.
pub const REPORT_WINDOW_MS: u64 = 60_000;

pub struct App {
    pub config: Config,
    registry: Mutex<Registry>,
    pub events: EventBus,
    pub reports: Mutex<Reports>,
    pub metrics: Metrics,
    /// Cleared at shutdown so `/readyz` fails first.
    pub ready: AtomicBool,
    /// Cleared while Docker is unreachable (the supervisor is then not ready, but keeps serving its tables).
    pub docker_ok: AtomicBool,
    scaling: Mutex<BTreeMap<String, ScalingState>>,
    /// The host's CPU and memory use (%), from sysinfo, sampled by the autoscaler.
    host_usage: Mutex<(f64, f64)>,
}

impl App {
    /// Builds the state from the configuration and the state file (runtime changes win over the file's defaults).
    pub fn new(config: Config) -> Result<App, persist::PersistError> {
        let now = now_ms();
        let mut registry = Registry::from_config(&config.services, now);
        if let Some(path) = &config.state_file
            && let Some(saved) = persist::load(path)?
        {
            registry.restore(saved, now);
        }
        if registry.secret.is_none() {
            // kept before anything uses it: a container signed with a secret that was never saved is an orphan
            let secret = crate::secret::Secret::generate().map_err(|e| persist::PersistError::Write {
                path: config.state_file.clone().unwrap_or_default(),
                source: std::io::Error::other(format!("no random bytes for the deployment secret: {e}")),
            })?;
            registry.secret = Some(secret);
            if let Some(path) = &config.state_file {
                persist::save(path, &registry)?;
            }
        }
        let events = EventBus::new(&config.webhooks, config.webhook_ca_pem.as_deref());
        let scaling = Mutex::new(
            config
                .services
                .iter()
                .filter_map(|(name, s)| s.docker.clone().map(|t| (name.clone(), ScalingState::new(t))))
                .collect(),
        );
        Ok(App {
            config,
            registry: Mutex::new(registry),
            events,
            reports: Mutex::new(Reports::new(REPORT_WINDOW_MS)),
            metrics: Metrics::default(),
            ready: AtomicBool::new(true),
            docker_ok: AtomicBool::new(true),
            scaling,
            host_usage: Mutex::new((0.0, 0.0)),
        })
    }

    /// The registry, for reading (a poisoned lock is still usable: the data is plain values).
    pub fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn reports(&self) -> MutexGuard<'_, Reports> {
        self.reports.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies a change that users made: saved to the state file before it is acknowledged (a failed save undoes it).
    pub fn change<T, E: From<persist::PersistError>>(
        &self,
        f: impl FnOnce(&mut Registry, u64) -> Result<(T, Vec<Event>), E>,
    ) -> Result<T, E> {
        let mut reg = self.registry();
        let before = reg.clone();
        let (out, events) = f(&mut reg, now_ms())?;
        if !events.is_empty()
            && let Some(path) = &self.config.state_file
            && let Err(e) = persist::save(path, &reg)
        {
            *reg = before;
            return Err(e.into());
        }
        drop(reg);
        self.observe(events);
        Ok(out)
    }

    /// Publishes events the supervisor observed (health changes, drains done, expired heartbeats).
    pub fn observe(&self, events: Vec<Event>) {
        for e in &events {
            self.metrics.event(e.kind);
        }
        // a deregistered instance's traffic figures go with it
        let gone: Vec<(&str, &str)> = events
            .iter()
            .filter(|e| e.kind == crate::events::EventKind::Deregistered)
            .filter_map(|e| Some((e.service.as_str(), e.instance.as_deref()?)))
            .collect();
        if !gone.is_empty() {
            self.reports().retain(|s, id| !gone.contains(&(s, id)));
        }
        self.events.publish(events);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) && self.docker_ok.load(Ordering::SeqCst)
    }

    /// The autoscaler's state per service (services with a container template).
    pub fn scaling(&self) -> MutexGuard<'_, BTreeMap<String, ScalingState>> {
        self.scaling.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_host_usage(&self, cpu_percent: f64, memory_percent: f64) {
        *self.host_usage.lock().unwrap_or_else(|p| p.into_inner()) = (cpu_percent, memory_percent);
    }

    /// The host's (CPU %, memory %).
    pub fn host_usage(&self) -> (f64, f64) {
        *self.host_usage.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn scaling_template(&self, service: &str) -> Option<Template> {
        self.scaling().get(service).map(|s| s.template.clone())
    }
}
