//! Consistent hashing on a ring of virtual nodes (Karger et al., 1997; ketama), with bounded load
//! (Mirrokni, Thorup, Zadimoghaddam, 2018).
//!
//! Each endpoint owns points on a 64-bit ring, in number proportional to its weight; a key goes to the first point at
//! or after its hash. Adding or removing one of N endpoints moves only the keys of that endpoint's arcs, about 1/N of
//! them: the cache-aware routing our users ask for (docs/filter.md) (the same search lands on the instance whose cache holds it).
//! Points are placed by endpoint id (not address) with the table's seed (the same for every proxy of a deployment:
//! secret, from the supervisor), so every worker, every proxy and every restart agree on placement. With bounded load, an endpoint already carrying more than `c x mean` in-flight requests is
//! passed over and the walk continues clockwise, so a hot key cannot melt one instance.

use xxhash_rust::xxh3::xxh3_64_with_seed;

pub use equilibrio_contract::table::PUBLIC_SEED;
/// Upper bound on ring points, whatever the endpoint count (memory and build time).
const MAX_POINTS: usize = 1 << 16;
/// The most endpoints bounded load passes over for one key: each costs a load read (a host call), and with the cap
/// right one under it comes within a few steps (at least a fifth of the endpoints are under `c x mean` for c = 1.25).
const MAX_PASSED_OVER: usize = 16;

pub fn hash_key(seed: u64, key: &[u8]) -> u64 {
    xxh3_64_with_seed(key, seed)
}

/// The bounded-load check: current in-flight per endpoint, the factor c, the total in flight and the candidate count.
/// The total is asked for only when the key's endpoint is busy (it reads every candidate's load), with that load: a
/// total below it is out of date.
#[derive(Clone, Copy)]
pub struct LoadBound<'a> {
    pub load: &'a dyn Fn(usize) -> i64,
    pub factor: f64,
    pub total: &'a dyn Fn(i64) -> i64,
    pub candidates: usize,
}

impl LoadBound<'_> {
    /// `ceil(c x (total + 1) / n)`: the most one endpoint may hold, counting the request being placed; at least 1, so an
    /// idle endpoint is always under it. `seen` is a load just read.
    pub fn cap(&self, seen: i64) -> i64 {
        let total = (self.total)(seen).max(0);
        ((self.factor * (total as f64 + 1.0) / self.candidates.max(1) as f64).ceil() as i64).max(1)
    }
}

#[derive(Debug, Clone, Default)]
pub struct Ring {
    /// (point, endpoint index), sorted by point.
    points: Vec<(u64, u32)>,
}

impl Ring {
    /// Builds the ring from `(id, weight)` per endpoint index; weight 0 places no points.
    pub fn build<'a>(endpoints: impl Iterator<Item = (&'a str, u32)> + Clone, vnodes: u32, seed: u64) -> Ring {
        let max_w = endpoints.clone().map(|(_, w)| w).max().unwrap_or(0);
        let n = endpoints.clone().filter(|(_, w)| *w > 0).count();
        if max_w == 0 || n == 0 {
            return Ring::default();
        }
        let vnodes = u64::from(vnodes).min((MAX_POINTS / n).max(1) as u64);
        let mut points = Vec::new();
        for (i, (id, w)) in endpoints.enumerate() {
            if w == 0 {
                continue;
            }
            let count = (vnodes * u64::from(w) / u64::from(max_w)).max(1);
            for k in 0..count {
                let label = format!("{id}#{k}");
                points.push((hash_key(seed, label.as_bytes()), i as u32));
            }
        }
        points.sort_unstable();
        Ring { points }
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// Endpoint indices clockwise from `hash`, once around the ring (an index may repeat).
    pub fn walk(&self, hash: u64) -> impl Iterator<Item = usize> + '_ {
        let start = self.points.partition_point(|(p, _)| *p < hash);
        let (tail, head) = self.points.split_at(start.min(self.points.len()));
        head.iter().chain(tail.iter()).map(|(_, i)| *i as usize)
    }

    /// Up to `want` distinct endpoints for `hash`, among those `eligible`, in walk order. With a `bound`, the first is
    /// the first eligible endpoint whose in-flight load is under [`LoadBound::cap`].
    pub fn pick(
        &self,
        hash: u64,
        want: usize,
        eligible: impl Fn(usize) -> bool,
        bound: Option<LoadBound<'_>>,
    ) -> Vec<usize> {
        let mut order: Vec<usize> = Vec::with_capacity(want);
        // (endpoint, load) of those passed over
        let mut passed: Vec<(usize, i64)> = Vec::new();
        let mut cap = None;
        for i in self.walk(hash) {
            if order.len() >= want {
                break;
            }
            if !eligible(i) || order.contains(&i) || passed.iter().any(|(p, _)| *p == i) {
                continue;
            }
            if order.is_empty()
                && let Some(bound) = bound
                && let load = (bound.load)(i)
                && load > 0
                && load >= *cap.get_or_insert_with(|| bound.cap(load))
            {
                passed.push((i, load));
                if passed.len() < MAX_PASSED_OVER {
                    // over its bound: keep it as a fallback candidate after the primary
                    continue;
                }
                // walked far enough (a cap from a stale total can be below every load): the least loaded seen
                if let Some(k) = passed.iter().enumerate().min_by_key(|(_, (_, l))| *l).map(|(k, _)| k) {
                    order.push(passed.remove(k).0);
                }
                continue;
            }
            order.push(i);
        }
        // overloaded endpoints passed over stay usable as retries
        for (i, _) in passed {
            if order.len() >= want {
                break;
            }
            order.push(i);
        }
        order
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("av-{i}")).collect()
    }

    fn owner(ring: &Ring, key: u64) -> usize {
        ring.pick(key, 1, |_| true, None)[0]
    }

    #[test]
    fn empty_ring_picks_nothing() {
        let r = Ring::build(std::iter::empty(), 160, PUBLIC_SEED);
        assert!(r.pick(1, 3, |_| true, None).is_empty());
        let r = Ring::build([("a", 0u32)].into_iter(), 160, PUBLIC_SEED);
        assert!(r.is_empty());
    }

    #[test]
    fn spread_is_roughly_even() {
        let ids = ids(4);
        let r = Ring::build(ids.iter().map(|s| (s.as_str(), 100)), 160, PUBLIC_SEED);
        let mut counts = [0usize; 4];
        for k in 0..40_000u64 {
            counts[owner(&r, hash_key(PUBLIC_SEED, &k.to_le_bytes()))] += 1;
        }
        for c in counts {
            assert!((7_000..13_000).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn weights_shift_ownership() {
        let r = Ring::build([("a", 100u32), ("b", 300)].into_iter(), 160, PUBLIC_SEED);
        let b = (0..40_000u64).filter(|k| owner(&r, hash_key(PUBLIC_SEED, &k.to_le_bytes())) == 1).count();
        assert!((26_000..34_000).contains(&b), "{b}");
    }

    #[test]
    fn adding_one_endpoint_moves_about_one_nth_of_keys() {
        for n in [3usize, 5, 10] {
            let before_ids = ids(n);
            let after_ids = ids(n + 1);
            let before = Ring::build(before_ids.iter().map(|s| (s.as_str(), 100)), 160, PUBLIC_SEED);
            let after = Ring::build(after_ids.iter().map(|s| (s.as_str(), 100)), 160, PUBLIC_SEED);
            let keys = 20_000u64;
            let moved = (0..keys)
                .filter(|k| {
                    let h = hash_key(PUBLIC_SEED, &k.to_le_bytes());
                    owner(&before, h) != owner(&after, h)
                })
                .count();
            let share = moved as f64 / keys as f64;
            let ideal = 1.0 / (n + 1) as f64;
            assert!(share < ideal * 1.5 && share > ideal * 0.5, "n={n} moved {share:.3}, ideal {ideal:.3}");
            // and every moved key went to the new endpoint
            let wrong = (0..keys)
                .filter(|k| {
                    let h = hash_key(PUBLIC_SEED, &k.to_le_bytes());
                    owner(&before, h) != owner(&after, h) && owner(&after, h) != n
                })
                .count();
            assert_eq!(wrong, 0);
        }
    }

    #[test]
    fn an_ineligible_endpoint_only_moves_its_own_keys() {
        let ids = ids(5);
        let r = Ring::build(ids.iter().map(|s| (s.as_str(), 100)), 160, PUBLIC_SEED);
        for k in 0..5_000u64 {
            let h = hash_key(PUBLIC_SEED, &k.to_le_bytes());
            let o = owner(&r, h);
            let without_2 = r.pick(h, 1, |i| i != 2, None)[0];
            if o != 2 {
                assert_eq!(o, without_2);
            }
        }
    }

    #[test]
    fn bounded_load_passes_over_a_hot_endpoint() {
        let ids = ids(3);
        let r = Ring::build(ids.iter().map(|s| (s.as_str(), 100)), 160, PUBLIC_SEED);
        let h = hash_key(PUBLIC_SEED, b"hot");
        let o = owner(&r, h);
        let loads = move |i: usize| if i == o { 10 } else { 0 };
        let picked =
            r.pick(h, 3, |_| true, Some(LoadBound { load: &loads, factor: 1.25, total: &|_| 10, candidates: 3 }));
        assert_ne!(picked[0], o);
        assert_eq!(picked.len(), 3);
        assert!(picked.contains(&o), "the hot endpoint stays as a retry");
        // under its bound it keeps the key
        let calm = |_: usize| 1;
        assert_eq!(
            r.pick(h, 1, |_| true, Some(LoadBound { load: &calm, factor: 1.25, total: &|_| 3, candidates: 3 }))[0],
            o
        );
    }

    #[test]
    fn placement_depends_on_the_seed() {
        // what a client cannot know, it cannot aim at: under another seed most keys land elsewhere
        let ids: Vec<String> = (0..5).map(|i| format!("e{i}")).collect();
        let a = Ring::build(ids.iter().map(|s| (s.as_str(), 100)), 160, 1);
        let b = Ring::build(ids.iter().map(|s| (s.as_str(), 100)), 160, 2);
        let moved = (0..1000u64)
            .filter(|k| owner(&a, hash_key(1, &k.to_le_bytes())) != owner(&b, hash_key(2, &k.to_le_bytes())))
            .count();
        assert!(moved > 600, "{moved} of 1000 moved");
    }
}
