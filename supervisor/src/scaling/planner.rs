//! The reconciliation plan: from the desired instance count, the containers Docker shows and what the registry knows,
//! the actions that bring them together. Pure and restart-safe: everything it needs is observed again every round,
//! so a supervisor that restarts simply adopts what is running (no duplicates, no orphans).
//!
//! Lifecycle of a managed instance: created and started -> registered (it gets no traffic until its health check
//! passes) -> healthy (in the table) -> drained when it is the victim of a scale-down -> stopped (SIGTERM, grace,
//! SIGKILL) once its drain is done -> removed and deregistered. A container that exits on its own is removed and
//! deregistered, and counts as a failure (the controller backs off from a crash-looping template).

use std::collections::BTreeMap;

use crate::registry::Source;
use crate::scaling::policy::Victim;
use crate::scaling::runtime::Container;

/// What the registry knows of an instance, for planning.
#[derive(Debug, Clone, PartialEq)]
pub struct Known {
    pub source: Source,
    pub healthy: bool,
    pub draining: bool,
    pub drain_done: bool,
    pub in_flight: i64,
    pub registered_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Create and start a managed container for a new instance id.
    Create { instance: String },
    /// A running container the registry does not know yet (just created, adopted after a restart, or started by a user).
    Register { instance: String, address: String },
    /// Scale-down victim: no new traffic, sticky sessions re-pinned elsewhere.
    Drain { instance: String },
    /// SIGTERM with grace, then removal.
    Stop { container: String, instance: String, reason: String },
    /// An exited container: removed, deregistered; `failed` if it died on its own.
    Remove { container: String, instance: String, failed: bool, reason: String },
    /// A Docker-sourced registry entry whose container is gone.
    Deregister { instance: String },
}

#[derive(Debug, Clone, Copy)]
pub struct PlanInput<'a> {
    pub desired: u32,
    pub containers: &'a [Container],
    pub known: &'a BTreeMap<String, Known>,
    pub now_ms: u64,
    pub victim: Victim,
    /// A managed instance not healthy this long after registration is replaced.
    pub start_timeout_ms: u64,
    /// No creation before this time (crash-loop backoff).
    pub backoff_until_ms: u64,
}

/// Instances serving or about to (running, not draining): the count the decision compares with the desired one.
pub fn active(containers: &[Container], known: &BTreeMap<String, Known>) -> u32 {
    containers.iter().filter(|c| c.running && !known.get(&c.instance).is_some_and(|k| k.draining)).count() as u32
}

pub fn plan(input: PlanInput<'_>, mut new_id: impl FnMut() -> String) -> Vec<Action> {
    let PlanInput { desired, containers, known, now_ms, .. } = input;
    let mut actions = Vec::new();
    let mut removed_or_stopping = std::collections::HashSet::new();

    for c in containers {
        let k = known.get(&c.instance);
        if !c.running {
            let reason = if c.oom_killed {
                "OOM-killed".to_string()
            } else {
                format!("exited with code {}", c.exit_code.map_or("?".into(), |x| x.to_string()))
            };
            let failed = c.managed && !k.is_some_and(|k| k.draining);
            if c.managed {
                actions.push(Action::Remove { container: c.id.clone(), instance: c.instance.clone(), failed, reason });
            } else if k.is_some() {
                actions.push(Action::Deregister { instance: c.instance.clone() });
            }
            removed_or_stopping.insert(c.instance.clone());
            continue;
        }
        match (k, &c.address) {
            (None, Some(address)) => {
                actions.push(Action::Register { instance: c.instance.clone(), address: address.clone() })
            }
            (Some(k), _) if c.managed && k.draining && k.drain_done => {
                actions.push(Action::Stop {
                    container: c.id.clone(),
                    instance: c.instance.clone(),
                    reason: "drained".into(),
                });
                removed_or_stopping.insert(c.instance.clone());
            }
            (Some(k), _)
                if c.managed
                    && !k.healthy
                    && !k.draining
                    && now_ms.saturating_sub(k.registered_ms) > input.start_timeout_ms =>
            {
                let reason = format!("not healthy {} s after start", input.start_timeout_ms / 1000);
                actions.push(Action::Remove {
                    container: c.id.clone(),
                    instance: c.instance.clone(),
                    failed: true,
                    reason,
                });
                removed_or_stopping.insert(c.instance.clone());
            }
            _ => {}
        }
    }
    // registry entries from Docker whose container is gone
    for (id, k) in known {
        if k.source == Source::Docker && !containers.iter().any(|c| &c.instance == id) {
            actions.push(Action::Deregister { instance: id.clone() });
        }
    }

    let serving: Vec<&Container> = containers
        .iter()
        .filter(|c| c.running && !removed_or_stopping.contains(&c.instance))
        .filter(|c| !known.get(&c.instance).is_some_and(|k| k.draining))
        .collect();
    let current = serving.len() as u32;
    if desired > current && now_ms >= input.backoff_until_ms {
        for _ in current..desired {
            actions.push(Action::Create { instance: new_id() });
        }
    } else if desired < current {
        // only managed containers can be taken away; not-yet-healthy ones first (they carry no traffic)
        let mut candidates: Vec<&&Container> = serving.iter().filter(|c| c.managed).collect();
        let load = |c: &Container| known.get(&c.instance).map_or(0, |k| k.in_flight);
        let healthy = |c: &Container| known.get(&c.instance).is_some_and(|k| k.healthy);
        candidates.sort_by(|a, b| {
            healthy(a)
                .cmp(&healthy(b))
                .then_with(|| match input.victim {
                    Victim::LeastLoaded => load(a).cmp(&load(b)),
                    Victim::Newest => std::cmp::Ordering::Equal,
                })
                .then_with(|| b.created_ms.cmp(&a.created_ms))
        });
        for c in candidates.into_iter().take((current - desired) as usize) {
            if known.contains_key(&c.instance) {
                actions.push(Action::Drain { instance: c.instance.clone() });
            } else {
                actions.push(Action::Stop {
                    container: c.id.clone(),
                    instance: c.instance.clone(),
                    reason: "not registered yet".into(),
                });
            }
        }
    }
    actions
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(instance: &str, running: bool, managed: bool, created: u64) -> Container {
        Container {
            id: format!("id-{instance}"),
            name: instance.into(),
            service: "av".into(),
            instance: instance.into(),
            managed,
            running,
            address: Some(format!("127.0.0.1:{}", 30_000 + created)),
            created_ms: created,
            oom_killed: false,
            exit_code: if running { None } else { Some(137) },
        }
    }

    fn known(healthy: bool, draining: bool, done: bool, in_flight: i64) -> Known {
        Known { source: Source::Docker, healthy, draining, drain_done: done, in_flight, registered_ms: 0 }
    }

    fn run(desired: u32, containers: &[Container], k: &BTreeMap<String, Known>) -> Vec<Action> {
        let mut n = 0;
        plan(
            PlanInput {
                desired,
                containers,
                known: k,
                now_ms: 10_000,
                victim: Victim::LeastLoaded,
                start_timeout_ms: 60_000,
                backoff_until_ms: 0,
            },
            || {
                n += 1;
                format!("new-{n}")
            },
        )
    }

    #[test]
    fn creates_the_missing_and_registers_the_unknown() {
        let c = [container("a", true, true, 1)];
        let a = run(3, &c, &BTreeMap::new());
        assert_eq!(
            a,
            vec![
                Action::Register { instance: "a".into(), address: "127.0.0.1:30001".into() },
                Action::Create { instance: "new-1".into() },
                Action::Create { instance: "new-2".into() },
            ]
        );
    }

    #[test]
    fn adopts_after_a_restart_without_duplicates() {
        // three managed containers running, registry empty (fresh supervisor): register all, create none
        let c = [container("a", true, true, 1), container("b", true, true, 2), container("c", true, true, 3)];
        let a = run(3, &c, &BTreeMap::new());
        assert_eq!(a.iter().filter(|x| matches!(x, Action::Register { .. })).count(), 3);
        assert!(!a.iter().any(|x| matches!(x, Action::Create { .. })));
    }

    #[test]
    fn a_dead_container_is_removed_and_replaced() {
        let c = [container("a", true, true, 1), container("b", false, true, 2)];
        let k = BTreeMap::from([
            ("a".to_string(), known(true, false, false, 0)),
            ("b".to_string(), known(true, false, false, 0)),
        ]);
        let a = run(2, &c, &k);
        assert!(a.contains(&Action::Remove {
            container: "id-b".into(),
            instance: "b".into(),
            failed: true,
            reason: "exited with code 137".into()
        }));
        assert!(a.contains(&Action::Create { instance: "new-1".into() }));
    }

    #[test]
    fn scale_down_drains_the_least_loaded_then_stops_it_when_done() {
        let c = [container("a", true, true, 1), container("b", true, true, 2), container("c", true, true, 3)];
        let k = BTreeMap::from([
            ("a".to_string(), known(true, false, false, 5)),
            ("b".to_string(), known(true, false, false, 0)),
            ("c".to_string(), known(true, false, false, 2)),
        ]);
        assert_eq!(run(2, &c, &k), vec![Action::Drain { instance: "b".into() }]);
        let k2 = BTreeMap::from([
            ("a".to_string(), known(true, false, false, 5)),
            ("b".to_string(), known(true, true, false, 0)),
            ("c".to_string(), known(true, false, false, 2)),
        ]);
        assert!(run(2, &c, &k2).is_empty(), "draining: wait");
        let k3 = BTreeMap::from([
            ("a".to_string(), known(true, false, false, 5)),
            ("b".to_string(), known(true, true, true, 0)),
            ("c".to_string(), known(true, false, false, 2)),
        ]);
        assert_eq!(
            run(2, &c, &k3),
            vec![Action::Stop { container: "id-b".into(), instance: "b".into(), reason: "drained".into() }]
        );
    }

    #[test]
    fn user_containers_are_adopted_but_never_stopped() {
        let c = [container("mine", true, false, 1), container("m", true, true, 2)];
        let k = BTreeMap::from([
            ("mine".to_string(), known(true, false, false, 0)),
            ("m".to_string(), known(true, false, false, 0)),
        ]);
        assert_eq!(run(1, &c, &k), vec![Action::Drain { instance: "m".into() }]);
        assert!(run(0, &c[..1], &k).iter().all(|a| !matches!(a, Action::Drain { .. } | Action::Stop { .. })));
    }

    #[test]
    fn backoff_holds_creation_and_a_stuck_start_is_replaced() {
        let k = BTreeMap::new();
        let held = plan(
            PlanInput {
                desired: 2,
                containers: &[],
                known: &k,
                now_ms: 5,
                victim: Victim::Newest,
                start_timeout_ms: 60_000,
                backoff_until_ms: 10,
            },
            || "x".into(),
        );
        assert!(held.is_empty());
        let c = [container("slow", true, true, 1)];
        let k = BTreeMap::from([("slow".to_string(), Known { registered_ms: 0, ..known(false, false, false, 0) })]);
        let a = plan(
            PlanInput {
                desired: 1,
                containers: &c,
                known: &k,
                now_ms: 61_000,
                victim: Victim::Newest,
                start_timeout_ms: 60_000,
                backoff_until_ms: 0,
            },
            || "n".into(),
        );
        assert!(matches!(&a[0], Action::Remove { failed: true, .. }));
        assert_eq!(a[1], Action::Create { instance: "n".into() });
    }
}
