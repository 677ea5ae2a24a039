//! The running supervisor's shared state, and the one path every change takes: make it on a copy of the registry,
//! keep it in the store (one supervisor's file, or etcd shared by several), apply it, publish the events.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::config::{Config, StoreConfig};
use crate::events::{Event, EventBus};
use crate::leadership::Leadership;
use crate::metrics::Metrics;
use crate::persist;
use crate::registry::Registry;
use crate::reports::Reports;
use crate::scaling::runtime::Template;
use crate::scaling::state::ScalingState;
use crate::store::{Change, NoStore, PersistError, Store};

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
    /// Shared with a store that keeps it current from other nodes' changes (etcd).
    registry: Arc<Mutex<Registry>>,
    /// Where the registry is kept.
    store: Arc<dyn Store>,
    /// Whether this node runs health checks and the autoscaler.
    pub leadership: Arc<Leadership>,
    /// One change at a time from this node: a change is made on a copy, committed, then applied.
    writer: tokio::sync::Mutex<()>,
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

/// How many times a change that lost a race with another node is made again on what etcd holds.
const CONFLICT_ATTEMPTS: usize = 5;

impl App {
    /// Builds the state of a lone supervisor from the configuration and its state file, if any (runtime changes win
    /// over the file's defaults).
    pub fn new(config: Config) -> Result<App, PersistError> {
        let (store, saved): (Arc<dyn Store>, _) = match &config.store {
            StoreConfig::File(path) => (Arc::new(persist::FileStore { path: path.clone() }), persist::load(path)?),
            StoreConfig::Memory | StoreConfig::Etcd(_) => (Arc::new(NoStore), None),
        };
        let leadership = Arc::new(Leadership::alone());
        let now = now_ms();
        let mut registry = Registry::from_config(&config.services, now);
        if let Some(saved) = saved {
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
            registry.secret = Some(new_secret()?);
            if let StoreConfig::File(path) = &config.store {
                persist::save(path, &registry)?;
            }
        }
        Ok(App::assemble(config, registry, store, leadership))
    }

    /// Builds the state of one of several supervisors on a shared store: the registry is what `store` holds
    /// (`saved`), completed with the configuration's services and instances it lacks (a new deployment: all of them),
    /// which are written to it before the node serves anything.
    pub async fn shared(
        config: Config,
        store: Arc<dyn Store>,
        saved: Option<Registry>,
        leadership: Arc<Leadership>,
    ) -> Result<App, PersistError> {
        let now = now_ms();
        let before = saved.unwrap_or_default();
        let mut registry = before.clone();
        registry.adopt_config(&config.services, now);
        if registry.secret.is_none() {
            registry.secret = Some(new_secret()?);
        }
        let keys = crate::etcd::layout::changed(&before, &registry);
        if !keys.is_empty() {
            // another node seeding at the same moment wins the race; this one starts again from what it wrote
            store.commit(Change { after: &registry, keys: &keys, eventful: true, fenced: false }).await?;
        }
        Ok(App::assemble(config, registry, store, leadership))
    }

    fn assemble(config: Config, registry: Registry, store: Arc<dyn Store>, leadership: Arc<Leadership>) -> App {
        let registry = Arc::new(Mutex::new(registry));
        store.attach(registry.clone());
        let events = EventBus::new(&config.webhooks, config.webhook_ca_pem.as_deref());
        let scaling = Mutex::new(
            config
                .services
                .iter()
                .filter_map(|(name, s)| s.docker.clone().map(|t| (name.clone(), ScalingState::new(t))))
                .collect(),
        );
        App {
            config,
            registry,
            store,
            leadership,
            writer: tokio::sync::Mutex::new(()),
            events,
            reports: Mutex::new(Reports::new(REPORT_WINDOW_MS)),
            metrics: Metrics::default(),
            ready: AtomicBool::new(true),
            docker_ok: AtomicBool::new(true),
            scaling,
            host_usage: Mutex::new((0.0, 0.0)),
        }
    }

    /// The registry, for reading (a poisoned lock is still usable: the data is plain values).
    pub fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn reports(&self) -> MutexGuard<'_, Reports> {
        self.reports.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies a change that users made: kept in the store before it is acknowledged (a change the store refuses is
    /// not made). `f` may run more than once: when another node changed the same entries first, it runs again on
    /// what that node wrote.
    pub async fn change<T, E: From<PersistError>>(
        &self,
        f: impl FnMut(&mut Registry, u64) -> Result<(T, Vec<Event>), E>,
    ) -> Result<T, E> {
        self.commit(false, f).await
    }

    /// [`App::change`] for what only the leader does (the autoscaler's registrations, heartbeat expiry): refused
    /// once this node does not lead.
    pub async fn change_as_leader<T, E: From<PersistError>>(
        &self,
        f: impl FnMut(&mut Registry, u64) -> Result<(T, Vec<Event>), E>,
    ) -> Result<T, E> {
        self.commit(true, f).await
    }

    async fn commit<T, E: From<PersistError>>(
        &self,
        fenced: bool,
        mut f: impl FnMut(&mut Registry, u64) -> Result<(T, Vec<Event>), E>,
    ) -> Result<T, E> {
        let _one_at_a_time = self.writer.lock().await;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let before = self.registry().clone();
            let mut after = before.clone();
            let (out, events) = f(&mut after, now_ms())?;
            let keys = crate::etcd::layout::changed(&before, &after);
            if keys.is_empty() {
                drop(_one_at_a_time);
                self.observe(events);
                return Ok(out);
            }
            let change = Change { after: &after, keys: &keys, eventful: !events.is_empty(), fenced };
            match self.store.commit(change).await {
                Ok(()) => {
                    {
                        let mut reg = self.registry();
                        for key in &keys {
                            crate::etcd::layout::copy(&after, &mut reg, key);
                        }
                    }
                    drop(_one_at_a_time);
                    self.observe(events);
                    return Ok(out);
                }
                Err(PersistError::Conflict) if attempt < CONFLICT_ATTEMPTS => {
                    self.metrics.store_conflict();
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Keeps what the leader changed in place (a health transition, a finished drain, a slow-start step): the current
    /// values of `keys`, fenced. Nothing to do for a lone supervisor's file (health is learnt again after a restart).
    pub async fn publish_as_leader(&self, keys: Vec<crate::etcd::layout::Key>) -> Result<(), PersistError> {
        if keys.is_empty() || !self.leadership.is_elected() {
            return Ok(());
        }
        let _one_at_a_time = self.writer.lock().await;
        let after = self.registry().clone();
        self.store.commit(Change { after: &after, keys: &keys, eventful: false, fenced: true }).await
    }

    /// `Ok` when this node still leads, as the store says: asked before each Docker action.
    pub async fn confirm_leadership(&self) -> Result<(), PersistError> {
        if !self.leadership.is_leader() {
            return Err(PersistError::NotLeader);
        }
        self.store.confirm_leadership().await
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
        self.store.share_events(&events);
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

/// A new deployment secret.
fn new_secret() -> Result<crate::secret::Secret, PersistError> {
    crate::secret::Secret::generate()
        .map_err(|e| PersistError::Unavailable(format!("no random bytes for the deployment secret: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreFuture;

    /// A store whose writes fail (a full disk, a lost etcd quorum).
    struct Failing;

    impl Store for Failing {
        fn commit<'a>(&'a self, _: Change<'a>) -> StoreFuture<'a, ()> {
            Box::pin(async { Err(PersistError::Unavailable("disk full".into())) })
        }
    }

    /// A store that loses the race to another node `n` times, then keeps the change.
    struct LosesRaces(std::sync::atomic::AtomicUsize);

    impl Store for LosesRaces {
        fn commit<'a>(&'a self, _: Change<'a>) -> StoreFuture<'a, ()> {
            let lost = self.0.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
            Box::pin(async move { if lost { Err(PersistError::Conflict) } else { Ok(()) } })
        }
    }

    fn spec() -> crate::config::InstanceSpec {
        crate::config::InstanceSpec {
            id: "a".into(),
            address: "127.0.0.1:9".into(),
            weight: 100,
            zone: String::new(),
            tags: vec![],
            version: String::new(),
            capabilities: vec![],
        }
    }

    async fn register(app: &App) -> Result<(), PersistError> {
        app.change(|reg, now| {
            reg.register("av", spec(), crate::registry::Source::Api, None, now)
                .map(|e| ((), e))
                .map_err(|_| PersistError::Unavailable("no".into()))
        })
        .await
    }

    #[tokio::test]
    async fn a_change_the_store_refuses_is_not_made_and_a_lost_race_is_made_again() {
        let config = Config::parse("services:\n  av:\n    instances: []\n", None).unwrap();
        let app = App::new(config.clone()).unwrap();
        let app = App { store: Arc::new(Failing), ..app };
        assert!(register(&app).await.is_err());
        assert!(app.registry().service("av").unwrap().instances.is_empty(), "not made");

        let app = App::new(config).unwrap();
        let app = App { store: Arc::new(LosesRaces(2.into())), ..app };
        register(&app).await.unwrap();
        assert_eq!(app.registry().service("av").unwrap().instances.len(), 1);
        let app = App { store: Arc::new(LosesRaces(CONFLICT_ATTEMPTS.into())), ..app };
        app.change(|reg, now| {
            reg.deregister("av", "a", now, "test").map(|e| ((), e)).map_err(|_| PersistError::Conflict)
        })
        .await
        .unwrap_err();
        assert_eq!(app.registry().service("av").unwrap().instances.len(), 1, "given up after the attempts");
    }

    #[tokio::test]
    async fn a_shared_store_is_seeded_with_the_configuration_once() {
        let config =
            Config::parse("services:\n  av:\n    instances: [{id: c, address: '127.0.0.1:7'}]\n", None).unwrap();
        let app = App::shared(config.clone(), Arc::new(NoStore), None, Arc::new(Leadership::elected())).await.unwrap();
        let held = app.registry().clone();
        assert!(held.secret.is_some());
        assert!(held.services["av"].instances.contains_key("c"));
        // a second node finds it all and keeps it (the same secret)
        let second = App::shared(config, Arc::new(Failing), Some(held.clone()), Arc::new(Leadership::elected())).await;
        assert_eq!(second.unwrap().registry().secret, held.secret, "nothing to write: the failing store is not asked");
    }
}
