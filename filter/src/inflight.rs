//! In-flight request counts per endpoint, as all of a proxy's workers see them.
//!
//! When the algorithm balances on them (least connections, response time, bounded-load hashing) every request adds
//! and removes its count in shared data directly, so that every worker's pick sees them exact. Otherwise they are
//! only reported: a worker counts locally and publishes the change on its tick, which saves four host calls per
//! request.

use std::collections::HashMap;

use crate::shared::{self, SharedStore, keys};

/// A count a request holds, to give back when it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    /// The endpoint, an index into the request's snapshot.
    pub index: usize,
    /// Whether the count is in shared data (or this worker's local count).
    shared: bool,
}

/// A worker's local counts, and the part of them already added to the shared counts.
#[derive(Debug, Default)]
pub struct InFlight {
    local: HashMap<String, i64>,
    published: HashMap<String, i64>,
}

impl InFlight {
    /// Counts a request on endpoint `id` (index `index` of the request's snapshot): in shared data when `exact`,
    /// otherwise locally. `None` if the shared count could not be changed.
    pub fn acquire<S: SharedStore + ?Sized>(&mut self, store: &S, index: usize, id: &str, exact: bool) -> Option<Held> {
        if exact {
            shared::add_i64(store, &keys::inflight(id), 1).ok()?;
        } else {
            match self.local.get_mut(id) {
                Some(n) => *n += 1,
                None => {
                    self.local.insert(id.to_string(), 1);
                }
            }
        }
        Some(Held { index, shared: exact })
    }

    /// Counts a request on endpoint `id` in shared data if it holds fewer than `limit` (one compare-and-swap: no
    /// two workers can both take the last place). `None` if it is full (or the count could not be changed).
    pub fn acquire_below<S: SharedStore + ?Sized>(
        &mut self,
        store: &S,
        index: usize,
        id: &str,
        limit: u32,
    ) -> Option<Held> {
        let taken = shared::update_present(store, &keys::inflight(id), |cur| {
            let n = shared::decode_i64(cur);
            if n < i64::from(limit) { (Some((n + 1).to_le_bytes().to_vec()), true) } else { (None, false) }
        });
        taken.ok().filter(|t| *t).map(|_| Held { index, shared: true })
    }

    /// Gives back the count `held` on endpoint `id`.
    pub fn release<S: SharedStore + ?Sized>(&mut self, store: &S, held: Held, id: &str) {
        if held.shared {
            let _ = shared::add_i64(store, &keys::inflight(id), -1);
        } else if let Some(n) = self.local.get_mut(id) {
            *n -= 1;
        }
    }

    /// Publishes the change of the local counts since the last call (on the worker's tick).
    pub fn publish<S: SharedStore + ?Sized>(&mut self, store: &S) {
        for (id, now) in &self.local {
            let published = self.published.get(id).copied().unwrap_or(0);
            if *now != published && shared::add_i64(store, &keys::inflight(id), now - published).is_ok() {
                self.published.insert(id.clone(), *now);
            }
        }
        let published = &self.published;
        self.local.retain(|id, n| *n != 0 || published.get(id).is_some_and(|p| *p != 0));
        let local = &self.local;
        self.published.retain(|id, _| local.contains_key(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared::MemoryStore;

    #[test]
    fn exact_counts_are_shared_at_once_and_local_ones_on_publish() {
        let store = MemoryStore::default();
        crate::counters::create(&store, ["a", "b"]);
        let mut f = InFlight::default();
        let exact = f.acquire(&store, 0, "a", true).unwrap();
        assert_eq!(shared::get_i64(&store, &keys::inflight("a")), 1);
        let local = f.acquire(&store, 1, "b", false).unwrap();
        assert_eq!(shared::get_i64(&store, &keys::inflight("b")), 0);
        f.publish(&store);
        assert_eq!(shared::get_i64(&store, &keys::inflight("b")), 1);
        f.release(&store, exact, "a");
        f.release(&store, local, "b");
        assert_eq!(shared::get_i64(&store, &keys::inflight("a")), 0);
        f.publish(&store);
        assert_eq!(shared::get_i64(&store, &keys::inflight("b")), 0);
        f.publish(&store);
        assert!(f.local.is_empty() && f.published.is_empty(), "settled counts are forgotten");
    }

    #[test]
    fn a_limit_is_never_passed() {
        let store = MemoryStore::default();
        crate::counters::create(&store, ["a"]);
        let mut f = InFlight::default();
        let held: Vec<Held> = (0..5).filter_map(|_| f.acquire_below(&store, 0, "a", 3)).collect();
        assert_eq!(held.len(), 3);
        assert_eq!(shared::get_i64(&store, &keys::inflight("a")), 3);
        f.release(&store, held[0], "a");
        assert!(f.acquire_below(&store, 0, "a", 3).is_some(), "a place came free");
    }

    #[test]
    fn counts_wait_for_their_keys() {
        let store = MemoryStore::default();
        let mut f = InFlight::default();
        assert!(f.acquire(&store, 0, "a", true).is_none(), "no exact count before the key exists");
        f.acquire(&store, 1, "b", false).unwrap();
        f.publish(&store);
        assert!(store.get(&keys::inflight("b")).is_none(), "a publish does not create the key");
        crate::counters::create(&store, ["b"]);
        f.publish(&store);
        assert_eq!(shared::get_i64(&store, &keys::inflight("b")), 1, "the kept count arrives once it exists");
    }
}
