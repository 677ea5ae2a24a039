//! Which tasks Docker Swarm removes when a replicated service's replicas go down, in swarmkit's order, so that the
//! supervisor can drain exactly those before it lowers the count. Docker's API cannot remove a chosen task (swarmkit's
//! `RemoveTask` is not exposed, and a task whose container is stopped is restarted in the same slot), so we predict
//! instead of control, and the controller checks afterwards what Swarm did.
//!
//! swarmkit (`manager/orchestrator/replicated/services.go`, `reconcile`; the sorts in `slot.go`), unchanged since 2017
//! and so also Docker 20.10's: of the slots with a live task (desired state running or earlier), those whose task
//! runs come first, then by slot number; each slot with exactly one task on a node gets its index among that node's
//! copies (0 for the first, 1 for the second, ...), others -1; a sort by index (ascending, -1 last) keeps the first
//! `replicas` slots and removes the rest. So the copies on the most loaded nodes go first, and among equals the
//! tasks not running, then the highest slots. swarmkit's sort is Go's unstable `sort.Sort`, which keeps equal items
//! in order for up to 12 of them: beyond that the tie-break is a tendency, which is why the controller checks.

use std::collections::BTreeMap;

/// A task of the service as the removal order needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotTask {
    pub slot: u64,
    pub node: Option<String>,
    /// Its observed state is `running`.
    pub running: bool,
}

/// The slots Swarm removes when the service's live tasks (`tasks`: those whose desired state is `running` or
/// earlier) go down to `replicas`.
pub fn removed_slots(tasks: &[SlotTask], replicas: usize) -> Vec<u64> {
    let mut slots: BTreeMap<u64, Vec<&SlotTask>> = BTreeMap::new();
    for t in tasks {
        slots.entry(t.slot).or_default().push(t);
    }
    if slots.len() <= replicas {
        return vec![];
    }
    // running slots first, then by slot number (the map is in slot order; the sort is stable)
    let mut ordered: Vec<(u64, Vec<&SlotTask>)> = slots.into_iter().collect();
    ordered.sort_by_key(|(_, ts)| !ts.iter().any(|t| t.running));
    let mut per_node: BTreeMap<&str, i64> = BTreeMap::new();
    let mut indexed: Vec<(i64, u64)> = ordered
        .iter()
        .map(|(slot, ts)| match ts.as_slice() {
            [t] if t.node.is_some() => {
                let n = per_node.entry(t.node.as_deref().unwrap_or_default()).or_insert(0);
                *n += 1;
                (*n - 1, *slot)
            }
            _ => (-1, *slot),
        })
        .collect();
    indexed.sort_by_key(|(index, _)| if *index < 0 { i64::MAX } else { *index });
    indexed[replicas..].iter().map(|(_, slot)| *slot).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn task(slot: u64, node: &str, running: bool) -> SlotTask {
        SlotTask { slot, node: Some(node.into()), running }
    }

    fn sorted(mut v: Vec<u64>) -> Vec<u64> {
        v.sort();
        v
    }

    #[test]
    fn copies_on_the_most_loaded_node_go_first() {
        // swarmkit's own example (TestReplicatedScaleDown): A holds 1, 2, 3 and B holds 4; down to 2 keeps 1 and 4
        let tasks = [task(1, "a", true), task(2, "a", true), task(3, "a", true), task(4, "b", true)];
        assert_eq!(sorted(removed_slots(&tasks, 2)), vec![2, 3]);
        assert_eq!(removed_slots(&tasks, 3), vec![3]);
    }

    #[test]
    fn one_per_node_the_highest_slots_go() {
        let tasks = [task(1, "a", true), task(2, "b", true), task(3, "c", true)];
        assert_eq!(removed_slots(&tasks, 2), vec![3]);
        assert_eq!(sorted(removed_slots(&tasks, 1)), vec![2, 3]);
    }

    #[test]
    fn a_task_not_running_goes_before_a_running_one() {
        let tasks = [task(1, "a", false), task(2, "b", true), task(3, "c", true)];
        assert_eq!(removed_slots(&tasks, 2), vec![1]);
    }

    #[test]
    fn unassigned_and_doubled_slots_go_first() {
        let unassigned = SlotTask { slot: 1, node: None, running: false };
        let tasks = [unassigned, task(2, "a", true), task(3, "a", true), task(4, "b", true), task(4, "b", false)];
        // slot 4 has two tasks (an update in flight): -1 like the unassigned slot 1
        assert_eq!(sorted(removed_slots(&tasks, 2)), vec![1, 4]);
    }

    #[test]
    fn nothing_goes_when_the_count_is_not_above_replicas() {
        let tasks = [task(1, "a", true), task(2, "b", true)];
        assert!(removed_slots(&tasks, 2).is_empty());
        assert!(removed_slots(&tasks, 5).is_empty());
        assert!(removed_slots(&[], 0).is_empty());
    }

    proptest! {
        #[test]
        fn exactly_the_excess_goes_and_nodes_end_balanced_when_all_run(
            nodes in proptest::collection::vec(0u8..3, 1..12),
            replicas in 0usize..12,
        ) {
            let tasks: Vec<SlotTask> =
                nodes.iter().enumerate().map(|(i, n)| task(i as u64 + 1, &n.to_string(), true)).collect();
            let removed = removed_slots(&tasks, replicas);
            prop_assert_eq!(removed.len(), tasks.len().saturating_sub(replicas));
            let kept: Vec<&SlotTask> = tasks.iter().filter(|t| !removed.contains(&t.slot)).collect();
            // what stays on each node: no node keeps two more than another that had enough to give
            let mut count: BTreeMap<String, usize> = BTreeMap::new();
            let mut had: BTreeMap<String, usize> = BTreeMap::new();
            for t in &tasks {
                *had.entry(t.node.clone().unwrap()).or_default() += 1;
            }
            for t in &kept {
                *count.entry(t.node.clone().unwrap()).or_default() += 1;
            }
            let max = count.values().copied().max().unwrap_or(0);
            for (node, h) in &had {
                let c = count.get(node).copied().unwrap_or(0);
                prop_assert!(c + 1 >= max.min(*h), "node {node} keeps {c} of {h}, another keeps {max}");
            }
        }
    }
}
