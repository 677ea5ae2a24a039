//! An in-memory [`Runtime`] for unit tests (compiled into test builds only): containers are records; tests can kill
//! them, make creation fail or the runtime unreachable, and set the stats every container reports.

use std::sync::Mutex;

use super::runtime::{Container, Replicas, Runtime, RuntimeError, Stats, Task, Template};

/// An in-memory runtime for unit tests: containers are records; tests can kill them or make creation fail.
#[derive(Default)]
pub struct FakeRuntime {
    state: Mutex<FakeState>,
}

#[derive(Default)]
struct FakeState {
    containers: Vec<Container>,
    next: u32,
    fail_create: Option<String>,
    unreachable: bool,
    stats: Stats,
    /// A Swarm service's replicas (`None`: plain containers).
    swarm: Option<Replicas>,
}

impl FakeRuntime {
    fn with<T>(&self, f: impl FnOnce(&mut FakeState) -> T) -> T {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s)
    }
    pub fn fail_create(&self, message: Option<&str>) {
        self.with(|s| s.fail_create = message.map(str::to_string));
    }
    pub fn set_unreachable(&self, down: bool) {
        self.with(|s| s.unreachable = down);
    }
    pub fn set_stats(&self, stats: Stats) {
        self.with(|s| s.stats = stats);
    }
    /// The service is a Swarm service with `count` replicas.
    pub fn as_swarm(&self, count: u32) {
        self.with(|s| s.swarm = Some(Replicas { count, version: 1 }));
    }
    pub fn swarm_replicas(&self) -> Option<Replicas> {
        self.with(|s| s.swarm)
    }
    /// Swarm starts a task in `slot` on `node` (running, at `address`).
    pub fn add_task(&self, service: &str, slot: u64, node: &str, address: &str) {
        self.with(|s| {
            s.containers.push(Container {
                id: format!("c{slot}"),
                name: format!("{service}.{slot}.t{slot}"),
                service: service.into(),
                instance: format!("{service}.{slot}.t{slot}"),
                managed: true,
                running: true,
                address: Some(address.into()),
                created_ms: 0,
                oom_killed: false,
                exit_code: None,
                task: Some(Task {
                    slot,
                    node: Some(node.into()),
                    live: true,
                    zone: format!("zone-{node}"),
                    hostname: node.into(),
                    addr: String::new(),
                }),
            })
        });
    }
    /// Swarm removes the task in `slot`.
    pub fn remove_task(&self, slot: u64) {
        self.with(|s| s.containers.retain(|c| c.task.as_ref().is_none_or(|t| t.slot != slot)));
    }
    /// The container dies (as `docker kill` or an OOM kill).
    pub fn kill(&self, instance: &str, oom: bool) {
        self.with(|s| {
            for c in s.containers.iter_mut().filter(|c| c.instance == instance) {
                c.running = false;
                c.oom_killed = oom;
                c.exit_code = Some(137);
            }
        });
    }
    /// A container a user started by hand with the service label.
    pub fn add_unmanaged(&self, service: &str, name: &str, address: &str) {
        self.with(|s| {
            s.containers.push(Container {
                id: format!("user-{name}"),
                name: name.into(),
                service: service.into(),
                instance: name.into(),
                managed: false,
                running: true,
                address: Some(address.into()),
                created_ms: 0,
                oom_killed: false,
                exit_code: None,
                task: None,
            })
        });
    }
    pub fn running(&self, service: &str) -> usize {
        self.with(|s| s.containers.iter().filter(|c| c.service == service && c.running).count())
    }
    pub fn all(&self) -> Vec<Container> {
        self.with(|s| s.containers.clone())
    }
}

impl Runtime for FakeRuntime {
    async fn list(&self, service: &str) -> Result<Vec<Container>, RuntimeError> {
        self.with(|s| {
            if s.unreachable {
                return Err(RuntimeError::Unreachable("fake runtime down".into()));
            }
            Ok(s.containers.iter().filter(|c| c.service == service).cloned().collect())
        })
    }

    async fn create(&self, service: &str, instance: &str, t: &Template) -> Result<Container, RuntimeError> {
        self.with(|s| {
            if s.unreachable {
                return Err(RuntimeError::Unreachable("fake runtime down".into()));
            }
            if let Some(m) = &s.fail_create {
                return Err(RuntimeError::Failed(m.clone()));
            }
            s.next += 1;
            let c = Container {
                id: format!("c{}", s.next),
                name: instance.into(),
                service: service.into(),
                instance: instance.into(),
                managed: true,
                running: true,
                address: Some(format!("127.0.0.1:{}", 40_000 + s.next + u32::from(t.port % 10))),
                created_ms: u64::from(s.next),
                oom_killed: false,
                exit_code: None,
                task: None,
            };
            s.containers.push(c.clone());
            Ok(c)
        })
    }

    async fn stop(&self, id: &str, _grace: u32) -> Result<(), RuntimeError> {
        self.with(|s| {
            for c in s.containers.iter_mut().filter(|c| c.id == id) {
                c.running = false;
                c.exit_code = Some(0);
            }
            Ok(())
        })
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        self.with(|s| {
            s.containers.retain(|c| c.id != id);
            Ok(())
        })
    }

    async fn stats(&self, _c: &Container) -> Result<Stats, RuntimeError> {
        self.with(|s| Ok(s.stats))
    }

    async fn replicas(&self, _service: &str, _create_with: u32) -> Result<Option<Replicas>, RuntimeError> {
        self.with(|s| if s.unreachable { Err(RuntimeError::Unreachable("fake".into())) } else { Ok(s.swarm) })
    }

    async fn set_replicas(&self, _service: &str, read: Replicas, to: u32) -> Result<(), RuntimeError> {
        self.with(|s| match &mut s.swarm {
            Some(r) if r.version == read.version => {
                *r = Replicas { count: to, version: r.version + 1 };
                Ok(())
            }
            Some(_) => Err(RuntimeError::Failed("update out of sequence".into())),
            None => Err(RuntimeError::Failed("not a swarm service".into())),
        })
    }

    async fn watch(&self, _wake: &tokio::sync::Notify) -> Result<(), RuntimeError> {
        std::future::pending().await
    }
}
