//! The reconciliation plan for a service Docker Swarm runs: Swarm places, restarts and removes its tasks; we set the
//! replica count and keep the registry in step with the tasks. Pure, like [`crate::scaling::planner`]: everything is
//! observed again each round, so a supervisor that restarts (or a new leader) adopts the service as it is.
//!
//! - A task that runs and has its address is registered (it gets traffic once its health check passes, with slow
//!   start); a registered task that stopped running, or that Swarm is removing, is deregistered.
//! - Scale-up sets the replicas; Swarm starts the tasks.
//! - Scale-down first drains the tasks Swarm will remove ([`swarm_order`](crate::scaling::swarm_order)), and lowers
//!   the replicas only once their drains are done, so no request is cut. If Swarm removed others after all, the
//!   drained tasks it kept are deregistered and come back through registration (health check, slow start), once
//!   Swarm has settled (no more live tasks than replicas).
//! - A replica count changed by someone else (`docker service scale`) is noticed: one below the policy's minimum or
//!   above its maximum is set back at once, any other is adopted and left to the policy's metrics, like any count.

use std::collections::BTreeMap;

use crate::scaling::planner::Known;
use crate::scaling::runtime::{Container, Replicas};
use crate::scaling::swarm_order::{SlotTask, removed_slots};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SwarmAction {
    Register {
        instance: String,
        address: String,
        zone: String,
    },
    Deregister {
        instance: String,
        reason: String,
    },
    Drain {
        instance: String,
    },
    /// Update the service's replicas (naming `version`, so that a concurrent change fails instead of being lost).
    SetReplicas {
        from: u32,
        to: u32,
        version: u64,
    },
    /// The count changed without us: publish it (once).
    ChangedByHand {
        from: u32,
        to: u32,
    },
}

#[derive(Debug, Clone, Copy)]
pub struct SwarmPlanInput<'a> {
    /// The count the policy (or a manual scale through our API) wants.
    pub desired: u32,
    /// Whether `desired` is a manual scale through our API, which wins over a change by hand for its hold time.
    pub manual: bool,
    pub min: u32,
    pub max: u32,
    pub replicas: Replicas,
    /// The count this supervisor last set or adopted (`None` on its first round as leader: adopt what is there).
    pub last_set: Option<u32>,
    /// The service's tasks (a task is a [`Container`] with its [`crate::scaling::runtime::Task`]).
    pub tasks: &'a [Container],
    pub known: &'a BTreeMap<String, Known>,
}

/// Live tasks: those Swarm wants running (desired state `running` or earlier).
fn live(tasks: &[Container]) -> impl Iterator<Item = &Container> {
    tasks.iter().filter(|c| c.task.as_ref().is_some_and(|t| t.live))
}

pub fn plan(input: SwarmPlanInput<'_>) -> Vec<SwarmAction> {
    let SwarmPlanInput { replicas, tasks, known, .. } = input;
    let mut actions = Vec::new();

    // registry <- tasks
    for (id, _) in known.iter() {
        match tasks.iter().find(|c| &c.instance == id) {
            Some(c) if c.running && c.task.as_ref().is_some_and(|t| t.live) => {}
            Some(_) => {
                actions.push(SwarmAction::Deregister { instance: id.clone(), reason: "task ending".into() });
            }
            None => actions.push(SwarmAction::Deregister { instance: id.clone(), reason: "task gone".into() }),
        }
    }
    // Swarm has more live tasks than replicas only until it has marked those it removes (it does so at once, but a
    // round can fall in between): register nothing then, nor take a drained task back
    let settled = live(tasks).count() as u32 <= replicas.count;
    for c in live(tasks).filter(|c| settled && c.running && !known.contains_key(&c.instance)) {
        if let (Some(address), Some(t)) = (&c.address, &c.task) {
            let zone = t.zone.clone();
            actions.push(SwarmAction::Register { instance: c.instance.clone(), address: address.clone(), zone });
        }
    }

    // the count: adopted on the first round; a change by hand is published, and held to min/max
    let (target, by_hand) = match input.last_set {
        None => (replicas.count, false),
        Some(last) if last != replicas.count => {
            actions.push(SwarmAction::ChangedByHand { from: last, to: replicas.count });
            let held = if input.manual { input.desired } else { replicas.count.clamp(input.min, input.max) };
            (held, true)
        }
        Some(_) => (input.desired, false),
    };
    if by_hand || input.last_set.is_none() {
        if target != replicas.count {
            actions.push(SwarmAction::SetReplicas { from: replicas.count, to: target, version: replicas.version });
        }
        return actions;
    }

    let slots: Vec<SlotTask> = live(tasks)
        .filter_map(|c| c.task.as_ref().map(|t| SlotTask { slot: t.slot, node: t.node.clone(), running: c.running }))
        .collect();
    let victims: Vec<&Container> = if target < replicas.count {
        let removed = removed_slots(&slots, target as usize);
        live(tasks).filter(|c| c.task.as_ref().is_some_and(|t| removed.contains(&t.slot))).collect()
    } else {
        vec![]
    };
    // drained tasks Swarm keeps (a scale-down called off, or Swarm chose others): back through registration
    for c in live(tasks) {
        let draining = known.get(&c.instance).is_some_and(|k| k.draining);
        if settled && draining && !victims.iter().any(|v| v.instance == c.instance) {
            let reason = "drained, but Swarm keeps the task".to_string();
            actions.push(SwarmAction::Deregister { instance: c.instance.clone(), reason });
        }
    }
    if target > replicas.count {
        actions.push(SwarmAction::SetReplicas { from: replicas.count, to: target, version: replicas.version });
    } else if target < replicas.count {
        let mut all_drained = true;
        for v in &victims {
            match known.get(&v.instance) {
                // not registered (starting, or not running): carries no traffic, nothing to drain
                None => {}
                Some(k) if k.draining => all_drained &= k.drain_done,
                Some(_) => {
                    actions.push(SwarmAction::Drain { instance: v.instance.clone() });
                    all_drained = false;
                }
            }
        }
        if all_drained {
            actions.push(SwarmAction::SetReplicas { from: replicas.count, to: target, version: replicas.version });
        }
    }
    actions
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::registry::Source;
    use crate::scaling::planner::Health;
    use crate::scaling::runtime::Task;

    fn task(slot: u64, node: &str, running: bool) -> Container {
        Container {
            id: format!("t{slot}"),
            name: format!("av.{slot}.t{slot}"),
            service: "av".into(),
            instance: format!("av.{slot}"),
            managed: true,
            running,
            address: Some(format!("10.0.0.{slot}:3000{slot}")),
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
        }
    }

    fn known(draining: bool, drain_done: bool) -> Known {
        Known { source: Source::Docker, health: Health::Healthy, draining, drain_done, in_flight: 0 }
    }

    fn input<'a>(
        desired: u32,
        count: u32,
        last_set: Option<u32>,
        tasks: &'a [Container],
        k: &'a BTreeMap<String, Known>,
    ) -> SwarmPlanInput<'a> {
        SwarmPlanInput {
            desired,
            manual: false,
            min: 1,
            max: 6,
            replicas: Replicas { count, version: 7 },
            last_set,
            tasks,
            known: k,
        }
    }

    fn all_known(tasks: &[Container]) -> BTreeMap<String, Known> {
        tasks.iter().map(|t| (t.instance.clone(), known(false, false))).collect()
    }

    #[test]
    fn running_tasks_are_registered_with_their_node_zone_and_gone_ones_deregistered() {
        let tasks = [task(1, "a", true), task(2, "b", false)];
        let mut k = BTreeMap::new();
        k.insert("av.9".to_string(), known(false, false));
        let actions = plan(input(2, 2, Some(2), &tasks, &k));
        assert!(actions.contains(&SwarmAction::Register {
            instance: "av.1".into(),
            address: "10.0.0.1:30001".into(),
            zone: "zone-a".into()
        }));
        assert!(actions.contains(&SwarmAction::Deregister { instance: "av.9".into(), reason: "task gone".into() }));
        assert_eq!(actions.len(), 2, "a task not running yet waits: {actions:?}");
    }

    #[test]
    fn the_first_round_adopts_the_count_as_it_is() {
        let tasks = [task(1, "a", true), task(2, "b", true), task(3, "c", true)];
        let k = all_known(&tasks);
        assert!(plan(input(1, 3, None, &tasks, &k)).is_empty(), "no replica change on start");
    }

    #[test]
    fn scale_up_sets_the_replicas_with_the_version() {
        let tasks = [task(1, "a", true)];
        let k = all_known(&tasks);
        assert_eq!(
            plan(input(3, 1, Some(1), &tasks, &k)),
            vec![SwarmAction::SetReplicas { from: 1, to: 3, version: 7 }]
        );
    }

    #[test]
    fn scale_down_drains_what_swarm_will_remove_then_lowers_the_count() {
        // node a holds two: Swarm removes a's second copy (slot 2), not the highest slot
        let tasks = [task(1, "a", true), task(2, "a", true), task(3, "b", true)];
        let mut k = all_known(&tasks);
        assert_eq!(plan(input(2, 3, Some(3), &tasks, &k)), vec![SwarmAction::Drain { instance: "av.2".into() }]);
        k.insert("av.2".into(), known(true, false));
        assert!(plan(input(2, 3, Some(3), &tasks, &k)).is_empty(), "waits for the drain");
        k.insert("av.2".into(), known(true, true));
        assert_eq!(
            plan(input(2, 3, Some(3), &tasks, &k)),
            vec![SwarmAction::SetReplicas { from: 3, to: 2, version: 7 }]
        );
    }

    #[test]
    fn a_drained_task_swarm_keeps_comes_back_through_registration() {
        // Swarm removed slot 3 instead of the drained slot 2: 2 is kept, so it is deregistered (then re-registered)
        let mut tasks = vec![task(1, "a", true), task(2, "a", true), task(3, "b", true)];
        tasks[2].task.as_mut().unwrap().live = false;
        let mut k = all_known(&tasks);
        k.insert("av.2".into(), known(true, true));
        let actions = plan(input(2, 2, Some(2), &tasks, &k));
        assert!(actions.contains(&SwarmAction::Deregister {
            instance: "av.2".into(),
            reason: "drained, but Swarm keeps the task".into()
        }));
        assert!(actions.contains(&SwarmAction::Deregister { instance: "av.3".into(), reason: "task ending".into() }));
        assert!(!actions.iter().any(|a| matches!(a, SwarmAction::SetReplicas { .. })));
    }

    #[test]
    fn nothing_is_registered_or_taken_back_while_swarm_removes() {
        // replicas just lowered to 2; Swarm has not marked slot 2 yet: the drained task stays out, nothing new comes in
        let tasks = [task(1, "a", true), task(2, "a", true), task(3, "b", true)];
        let mut k = all_known(&tasks);
        k.remove("av.3");
        k.insert("av.2".into(), known(true, true));
        assert!(plan(input(2, 2, Some(2), &tasks, &k)).is_empty());
    }

    #[test]
    fn a_change_by_hand_is_published_and_held_to_min_and_max() {
        let tasks = [task(1, "a", true)];
        let k = all_known(&tasks);
        // within bounds: adopted (no set), published
        assert_eq!(plan(input(1, 4, Some(2), &tasks, &k)), vec![SwarmAction::ChangedByHand { from: 2, to: 4 }]);
        // above max: set back to max
        assert_eq!(
            plan(input(1, 9, Some(2), &tasks, &k)),
            vec![
                SwarmAction::ChangedByHand { from: 2, to: 9 },
                SwarmAction::SetReplicas { from: 9, to: 6, version: 7 }
            ]
        );
        // a manual scale through our API wins
        let mut i = input(3, 5, Some(3), &tasks, &k);
        i.manual = true;
        assert_eq!(
            plan(i),
            vec![
                SwarmAction::ChangedByHand { from: 3, to: 5 },
                SwarmAction::SetReplicas { from: 5, to: 3, version: 7 }
            ]
        );
    }
}
