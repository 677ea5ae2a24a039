//! The running supervisor's shared state, and the one path every change takes: mutate the registry under its lock,
//! keep it in the store, publish the events.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::config::Config;
use crate::events::{Event, EventBus};
use crate::metrics::Metrics;
use crate::persist;
use crate::registry::Registry;
use crate::reports::Reports;
use crate::scaling::runtime::Template;
use crate::scaling::state::ScalingState;
use crate::store::{NoStore, Store};

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The state the API's handlers share.
pub type AppState = std::sync::Arc<App>;

/// How long proxies' reports are kept for rates and p95.
pub const REPORT_WINDOW_MS: u64 = 60_000;

pub struct App {
    pub config: Config,
    registry: Mutex<Registry>,
    /// Where the registry is kept between runs.
    store: Box<dyn Store>,
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
        let store: Box<dyn Store> = match &config.state_file {
            Some(path) => Box::new(persist::FileStore { path: path.clone() }),
            None => Box::new(NoStore),
        };
        App::with_store(config, store)
    }

    /// Builds the state from the configuration and what `store` kept.
    pub fn with_store(config: Config, store: Box<dyn Store>) -> Result<App, persist::PersistError> {
        let now = now_ms();
        let mut registry = Registry::from_config(&config.services, now);
        if let Some(saved) = store.load()? {
            registry.restore(saved, now);
        }
        if !store.is_durable() && config.services.values().any(|s| s.docker.is_some()) {
            tracing::warn!(
                "no state_file: runtime changes and the deployment secret last only as long as this process, and the \
                 containers it starts will not be adopted by the next one"
            );
        }
        if registry.secret.is_none() {
            // kept before anything uses it: a container signed with a secret that was never saved is an orphan
            let secret = crate::secret::Secret::generate().map_err(|e| persist::PersistError::Write {
                path: config.state_file.clone().unwrap_or_default(),
                source: std::io::Error::other(format!("no random bytes for the deployment secret: {e}")),
            })?;
            registry.secret = Some(secret);
            store.save(&registry)?;
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
            store,
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

    /// Applies a change that users made: kept in the store before it is acknowledged (a failed save undoes it).
    pub fn change<T, E: From<persist::PersistError>>(
        &self,
        f: impl FnOnce(&mut Registry, u64) -> Result<(T, Vec<Event>), E>,
    ) -> Result<T, E> {
        let mut reg = self.registry();
        let before = reg.clone();
        let (out, events) = f(&mut reg, now_ms())?;
        if !events.is_empty()
            && let Err(e) = self.store.save(&reg)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persist::PersistError;

    /// A store whose writes fail (a full disk, a lost etcd quorum).
    struct Failing;

    impl Store for Failing {
        fn load(&self) -> Result<Option<Registry>, PersistError> {
            Ok(None)
        }
        fn save(&self, _: &Registry) -> Result<(), PersistError> {
            Err(PersistError::Write { path: "failing".into(), source: std::io::Error::other("disk full") })
        }
    }

    #[test]
    fn a_change_the_store_refuses_is_undone_and_not_acknowledged() {
        let config = Config::parse("services:\n  av:\n    instances: []\n", None).unwrap();
        // the first save (the new deployment secret) fails too: the start says so
        assert!(App::with_store(config.clone(), Box::new(Failing)).is_err());
        let app = App::with_store(config, Box::new(NoStore)).unwrap();
        let app = App { store: Box::new(Failing), ..app };
        let spec = crate::config::InstanceSpec {
            id: "a".into(),
            address: "127.0.0.1:9".into(),
            weight: 100,
            zone: String::new(),
            tags: vec![],
            version: String::new(),
            capabilities: vec![],
        };
        let r = app.change(|reg, now| {
            reg.register("av", spec, crate::registry::Source::Api, None, now)
                .map(|e| ((), e))
                .map_err(|_| PersistError::Write { path: "x".into(), source: std::io::Error::other("no") })
        });
        assert!(r.is_err());
        assert!(app.registry().service("av").unwrap().instances.is_empty(), "undone");
    }
}
