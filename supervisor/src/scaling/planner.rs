//! The reconciliation plan: from the desired instance count, the containers Docker shows and what the registry knows,
//! the actions that bring them together. Pure and restart-safe: everything it needs is observed again every round,
//! so a supervisor that restarts simply adopts what is running (no duplicates, no orphans).
//!
//! Lifecycle of a managed instance: created and started -> registered (it gets no traffic until its health check
//! passes) -> healthy (in the table) -> drained when it is the victim of a scale-down -> stopped (SIGTERM, grace,
//! SIGKILL) once its drain is done -> removed and deregistered. A container that exits on its own is removed and
//! deregistered, and counts as a failure (the controller backs off from a crash-looping template).
//!
//! Replacing a running container is the one action that can turn a bad observation into an outage, so it is held
//! back: a managed instance is replaced only after it failed its health checks for `replace_unhealthy_after` (or never
//! passed one `start_timeout` after its start or its adoption by this supervisor), one at a time, through a drain, and
//! never while more than `max_unhealthy_share` of the service is unhealthy at once: then the health checker, the
//! network or overload is failing, not the containers (Envoy's panic threshold and Kubernetes' `maxUnavailable`
//! answer the same question), and the plan says so with [`Action::HoldReplacements`] instead.

use std::collections::BTreeMap;

use crate::registry::Source;
use crate::scaling::policy::Victim;
use crate::scaling::runtime::Container;

/// An instance's health, as the planner needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Healthy,
    /// Has not passed a health check since it started or was adopted at `since_ms`.
    Starting {
        since_ms: u64,
    },
    /// Was healthy, fails its checks since `since_ms`.
    Failing {
        since_ms: u64,
    },
}

/// What the registry knows of an instance, for planning.
#[derive(Debug, Clone, PartialEq)]
pub struct Known {
    pub source: Source,
    pub health: Health,
    pub draining: bool,
    pub drain_done: bool,
    pub in_flight: i64,
}

impl Known {
    pub fn healthy(&self) -> bool {
        self.health == Health::Healthy
    }
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
    /// A running managed container that stayed unhealthy: drained (then stopped like a scale-down victim) and
    /// replaced.
    Replace { instance: String, reason: String },
    /// Replacements are held: `unhealthy` of `running` instances fail at once.
    HoldReplacements { unhealthy: u32, running: u32 },
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
    /// A managed instance that has not passed a check this long after its start or adoption is replaced.
    pub start_timeout_ms: u64,
    /// A managed instance failing this long after it was healthy is replaced.
    pub replace_unhealthy_after_ms: u64,
    /// Above this share of unhealthy running instances (and more than one), nothing is replaced.
    pub max_unhealthy_share: f64,
    /// Failing time counts from here at the earliest: the end of the last episode where replacements were held (the
    /// time they were held is not held against the instances, so a straggler of a recovery is not replaced for it).
    pub failing_counts_from_ms: u64,
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
    let mut overdue = Vec::new();

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
            (Some(k), _) if !k.draining => {
                if let Some(reason) = overdue_reason(&input, k.health) {
                    overdue.push((c, reason));
                }
            }
            _ => {}
        }
    }
    // replacements: one at a time (none while an unhealthy instance is still draining), and none when so many fail
    // together that the containers are unlikely to be the cause
    let running: Vec<&Known> = containers
        .iter()
        .filter(|c| c.running && !removed_or_stopping.contains(&c.instance))
        .filter_map(|c| known.get(&c.instance))
        .filter(|k| !k.draining)
        .collect();
    let failing = overdue.len() as u32;
    let total = running.len() as u32;
    let replacing = containers.iter().any(|c| {
        c.managed && c.running && known.get(&c.instance).is_some_and(|k| k.draining && !k.drain_done && !k.healthy())
    });
    if failing > 1 && f64::from(failing) > input.max_unhealthy_share * f64::from(total) {
        actions.push(Action::HoldReplacements { unhealthy: failing, running: total });
    } else if !replacing
        && let Some((c, reason)) = overdue
            .into_iter()
            .filter(|(c, _)| c.managed)
            .min_by_key(|(c, _)| known.get(&c.instance).map_or(0, |k| overdue_since(k.health)))
    {
        actions.push(Action::Replace { instance: c.instance.clone(), reason });
        removed_or_stopping.insert(c.instance.clone());
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
        let healthy = |c: &Container| known.get(&c.instance).is_some_and(Known::healthy);
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

/// Why an instance with this health is overdue for replacement, if it is (managed or not: unmanaged ones count
/// toward the unhealthy share but are never replaced).
fn overdue_reason(input: &PlanInput<'_>, health: Health) -> Option<String> {
    let (since, limit, what) = match health {
        Health::Healthy => return None,
        Health::Starting { since_ms } => (since_ms, input.start_timeout_ms, "not healthy"),
        Health::Failing { since_ms } => {
            (since_ms.max(input.failing_counts_from_ms), input.replace_unhealthy_after_ms, "unhealthy for")
        }
    };
    let late = input.now_ms.saturating_sub(since);
    (late > limit).then(|| match health {
        Health::Starting { .. } => format!("{what} {} s after its start or adoption", limit / 1000),
        _ => format!("{what} {} s", late / 1000),
    })
}

fn overdue_since(health: Health) -> u64 {
    match health {
        Health::Healthy => u64::MAX,
        Health::Starting { since_ms } | Health::Failing { since_ms } => since_ms,
    }
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
            task: None,
        }
    }

    fn known(healthy: bool, draining: bool, done: bool, in_flight: i64) -> Known {
        let health = if healthy { Health::Healthy } else { Health::Starting { since_ms: 0 } };
        Known { source: Source::Docker, health, draining, drain_done: done, in_flight }
    }

    fn with(health: Health) -> Known {
        Known { health, ..known(true, false, false, 0) }
    }

    fn input<'a>(
        desired: u32,
        containers: &'a [Container],
        k: &'a BTreeMap<String, Known>,
        now_ms: u64,
    ) -> PlanInput<'a> {
        PlanInput {
            desired,
            containers,
            known: k,
            now_ms,
            victim: Victim::LeastLoaded,
            start_timeout_ms: 60_000,
            replace_unhealthy_after_ms: 30_000,
            max_unhealthy_share: 0.5,
            failing_counts_from_ms: 0,
            backoff_until_ms: 0,
        }
    }

    fn run_at(now_ms: u64, desired: u32, containers: &[Container], k: &BTreeMap<String, Known>) -> Vec<Action> {
        let mut n = 0;
        plan(input(desired, containers, k, now_ms), || {
            n += 1;
            format!("new-{n}")
        })
    }

    fn run(desired: u32, containers: &[Container], k: &BTreeMap<String, Known>) -> Vec<Action> {
        run_at(10_000, desired, containers, k)
    }

    fn replaced(a: &[Action]) -> Vec<&str> {
        a.iter()
            .filter_map(|x| match x {
                Action::Replace { instance, .. } => Some(instance.as_str()),
                Action::Remove { instance, failed: true, .. } => Some(instance.as_str()),
                _ => None,
            })
            .collect()
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
    fn backoff_holds_creation_and_a_stuck_start_is_replaced_through_a_drain() {
        let k = BTreeMap::new();
        let held = plan(PlanInput { backoff_until_ms: 10, ..input(2, &[], &k, 5) }, || "x".into());
        assert!(held.is_empty());
        let c = [container("slow", true, true, 1)];
        let k = BTreeMap::from([("slow".to_string(), with(Health::Starting { since_ms: 0 }))]);
        assert!(run_at(60_000, 1, &c, &k).is_empty(), "within its start grace");
        let a = run_at(61_000, 1, &c, &k);
        assert!(matches!(&a[0], Action::Replace { instance, .. } if instance == "slow"), "{a:?}");
        assert_eq!(a[1], Action::Create { instance: "new-1".into() });
    }

    #[test]
    fn adopted_instances_get_a_fresh_start_grace() {
        // a supervisor restarted long after these containers started: the grace counts from the adoption (now - 5 s)
        let c = [container("a", true, true, 1), container("b", true, true, 2)];
        let now = 10_000_000;
        let k = BTreeMap::from([
            ("a".to_string(), with(Health::Starting { since_ms: now - 5000 })),
            ("b".to_string(), with(Health::Starting { since_ms: now - 5000 })),
        ]);
        let a = run_at(now, 2, &c, &k);
        assert!(replaced(&a).is_empty() && !a.iter().any(|x| matches!(x, Action::Create { .. })), "{a:?}");
    }

    #[test]
    fn a_failing_instance_is_replaced_after_its_time_one_at_a_time() {
        let c: Vec<Container> = (1..=5).map(|n| container(&format!("i{n}"), true, true, n)).collect();
        let mut k: BTreeMap<String, Known> = c.iter().map(|c| (c.instance.clone(), with(Health::Healthy))).collect();
        k.insert("i2".into(), with(Health::Failing { since_ms: 100_000 }));
        k.insert("i4".into(), with(Health::Failing { since_ms: 90_000 }));
        assert!(replaced(&run_at(120_000, 5, &c, &k)).is_empty(), "not failing long enough");
        let a = run_at(131_000, 5, &c, &k);
        assert_eq!(replaced(&a), vec!["i4"], "the longest failing first, one at a time: {a:?}");
        assert_eq!(a.iter().filter(|x| matches!(x, Action::Create { .. })).count(), 1, "{a:?}");
        // while i4 drains, i2 waits
        k.insert("i4".into(), Known { draining: true, ..with(Health::Failing { since_ms: 90_000 }) });
        assert!(replaced(&run_at(140_000, 5, &c, &k)).is_empty());
        // i4 drained (stopped): now i2
        k.insert("i4".into(), Known { draining: true, drain_done: true, ..with(Health::Failing { since_ms: 90_000 }) });
        let a = run_at(141_000, 5, &c, &k);
        assert!(a.iter().any(|x| matches!(x, Action::Stop { instance, .. } if instance == "i4")), "{a:?}");
        assert_eq!(replaced(&a), vec!["i2"]);
    }

    #[test]
    fn when_most_of_the_service_fails_at_once_nothing_is_replaced() {
        let c: Vec<Container> = (1..=4).map(|n| container(&format!("i{n}"), true, true, n)).collect();
        let mut k: BTreeMap<String, Known> =
            c.iter().map(|c| (c.instance.clone(), with(Health::Failing { since_ms: 0 }))).collect();
        k.insert("i1".into(), with(Health::Healthy));
        let a = run_at(1_000_000, 4, &c, &k);
        assert_eq!(a, vec![Action::HoldReplacements { unhealthy: 3, running: 4 }]);
        // half of them: still replaced one at a time (2 of 4 is not more than 50%)
        k.insert("i2".into(), with(Health::Healthy));
        assert_eq!(replaced(&run_at(1_000_000, 4, &c, &k)).len(), 1);
        // when the episode ends, the stragglers get their whole replace_unhealthy_after again
        k.insert("i3".into(), with(Health::Healthy));
        let resumed = PlanInput { failing_counts_from_ms: 999_000, ..input(4, &c, &k, 1_000_000) };
        assert!(replaced(&plan(resumed, || "n".into())).is_empty());
        let later = PlanInput { failing_counts_from_ms: 999_000, ..input(4, &c, &k, 1_030_000) };
        assert_eq!(replaced(&plan(later, || "n".into())), vec!["i4"]);
        // a single instance service can always replace its one instance
        let one = [container("solo", true, true, 1)];
        let k = BTreeMap::from([("solo".to_string(), with(Health::Failing { since_ms: 0 }))]);
        assert_eq!(replaced(&run_at(1_000_000, 1, &one, &k)), vec!["solo"]);
    }

    #[test]
    fn user_containers_that_fail_are_never_replaced() {
        let c = [container("mine", true, false, 1)];
        let k = BTreeMap::from([("mine".to_string(), with(Health::Failing { since_ms: 0 }))]);
        assert!(run_at(1_000_000, 1, &c, &k).is_empty());
    }
}
