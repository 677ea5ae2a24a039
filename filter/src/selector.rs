//! Picking the endpoints of a request: the policy's algorithm over a snapshot's candidates, and the state the
//! algorithm keeps (smooth weighted round robin's running values, response times, the hash ring).
//!
//! A [`Selector`] is built for each snapshot (like pingora's `BackendSelection`, built per backend set and asked per
//! key): what only changes with the table (the ring) is computed then, and the running state of the previous
//! selector is carried over by endpoint id, so that a table change neither resets the rotation nor forgets latencies.

use crate::balancer::ewma::PeakEwma;
use crate::balancer::ring::{LoadBound, Ring, hash_key};
use crate::balancer::swrr::Swrr;
use crate::balancer::{MAX_UPSTREAMS, p2c, random};
use crate::config::Algorithm;
use crate::locality::draw_from_hash;
use crate::request::{RequestView, client_of, key_of};
use crate::snapshot::{Snapshot, remap};

/// Makes a key's zone draw independent of its place on the ring.
const ZONE_DRAW_SALT: u64 = 0x7a6f_6e65; // "zone"

#[derive(Debug, Clone)]
pub struct Selector {
    algorithm: Algorithm,
    /// Built for the hashing algorithms only.
    ring: Ring,
    /// Running values, also the fallback of requests without a hash key.
    swrr: Swrr,
    /// Per endpoint; fed only when the algorithm reads it.
    ewma: Vec<PeakEwma>,
    /// Bounded load's total in flight and when it was read (see [`TOTAL_LOAD_MAX_AGE_MS`]).
    total_load: std::cell::Cell<Option<(u64, i64)>>,
}

/// How long bounded load's total in flight is reused. Reading it takes one shared-data read per endpoint (a host call
/// each: 1,000 per request with 1,000 endpoints); the cap it sets moves with the whole service's load, so a quarter of
/// a second old is current enough, while the key's own endpoint's load is always read live (and a total below it is
/// read again at once).
const TOTAL_LOAD_MAX_AGE_MS: u64 = 250;

impl Selector {
    /// A selector for `snap` with fresh state.
    pub fn new(snap: &Snapshot) -> Selector {
        let n = snap.endpoints().len();
        Selector {
            algorithm: snap.policy.algorithm,
            ring: ring_for(snap),
            swrr: Swrr::new(n),
            ewma: vec![PeakEwma::default(); n],
            total_load: std::cell::Cell::new(None),
        }
    }

    /// A selector for `snap` that carries this one's state over; `mapping` gives, for each endpoint of `snap`, its
    /// index in the snapshot this selector was built for.
    pub fn rebuild(&self, snap: &Snapshot, mapping: &[Option<usize>]) -> Selector {
        Selector {
            algorithm: snap.policy.algorithm,
            ring: ring_for(snap),
            swrr: self.swrr.remap(mapping),
            ewma: remap(&self.ewma, mapping),
            total_load: std::cell::Cell::new(None),
        }
    }

    /// The algorithm's pick among `candidates` (indices into `snap`): a primary, and for some algorithms their own
    /// ordered retries. `inflight` gives an endpoint's in-flight count across workers.
    pub fn pick(
        &mut self,
        snap: &Snapshot,
        req: &dyn RequestView,
        candidates: &[usize],
        inflight: impl Fn(usize) -> i64,
        now_ms: u64,
        rng: &mut fastrand::Rng,
    ) -> Vec<usize> {
        let weight = |i: usize| snap.endpoint(i).map_or(0, |e| e.weight);
        // candidate lists are ascending endpoint indices (see `Snapshot::new_session_candidates`)
        debug_assert!(candidates.is_sorted());
        let eligible = |i: usize| candidates.binary_search(&i).is_ok();
        let hops = snap.policy.rate_limiting.xff_trusted_hops;
        match self.algorithm {
            // equal weights (the usual case) cost O(1) whatever the table's size; unequal ones walk the candidates
            Algorithm::WeightedRoundRobin if snap.uniform_weights => self.swrr.rotate(candidates).into_iter().collect(),
            Algorithm::WeightedRoundRobin => {
                self.swrr.pick(candidates.iter().map(|&i| (i, weight(i)))).into_iter().collect()
            }
            Algorithm::RoundRobin => self.swrr.rotate(candidates).into_iter().collect(),
            Algorithm::Random if snap.uniform_weights => random::pick_uniform(candidates, rng).into_iter().collect(),
            Algorithm::Random => {
                let weighted: Vec<(usize, u32)> = candidates.iter().map(|&i| (i, weight(i))).collect();
                random::pick(&weighted, rng).into_iter().collect()
            }
            Algorithm::LeastConnections => {
                let load = |i: usize| (inflight(i) as f64 + 1.0) / f64::from(weight(i).max(1));
                p2c::pick(candidates, rng, load)
                    .map(|(w, l)| [Some(w), l].into_iter().flatten().collect())
                    .unwrap_or_default()
            }
            Algorithm::ResponseTime => {
                let ewma = &self.ewma;
                let load = |i: usize| {
                    let e = ewma.get(i).copied().unwrap_or_default();
                    e.load(now_ms, inflight(i)) / f64::from(weight(i).max(1))
                };
                p2c::pick(candidates, rng, load)
                    .map(|(w, l)| [Some(w), l].into_iter().flatten().collect())
                    .unwrap_or_default()
            }
            Algorithm::IpHash => {
                let ip = client_of(req, hops);
                self.ring.pick(hash_key(snap.seed, ip.as_bytes()), MAX_UPSTREAMS, eligible, None)
            }
            Algorithm::ConsistentHash => match key_of(req, &snap.policy.consistent_hash.key, hops) {
                Some(key) => {
                    // loads are read as the walk needs them: the total (every candidate's) only when the key's
                    // endpoint is busy, and then at most every TOTAL_LOAD_MAX_AGE_MS, so a request costs a few reads,
                    // not one per endpoint of the table
                    let cached = &self.total_load;
                    let total = |seen: i64| match cached.get() {
                        Some((at, total)) if now_ms.saturating_sub(at) < TOTAL_LOAD_MAX_AGE_MS && total >= seen => {
                            total
                        }
                        _ => {
                            let total = candidates.iter().map(|&i| inflight(i)).sum();
                            cached.set(Some((now_ms, total)));
                            total
                        }
                    };
                    let bound = LoadBound {
                        load: &inflight,
                        factor: snap.policy.consistent_hash.load_factor,
                        total: &total,
                        candidates: candidates.len(),
                    };
                    self.ring.pick(hash_key(snap.seed, key.as_bytes()), MAX_UPSTREAMS, eligible, Some(bound))
                }
                None => self.swrr.pick(candidates.iter().map(|&i| (i, weight(i)))).into_iter().collect(),
            },
        }
    }

    /// The request's draw for zone-aware locality ([`crate::locality`]): from its hash key for the hashing
    /// algorithms, so that a key keeps its zone (and its endpoint), otherwise at random.
    pub fn zone_draw(&self, snap: &Snapshot, req: &dyn RequestView, rng: &mut fastrand::Rng) -> f64 {
        let hops = snap.policy.rate_limiting.xff_trusted_hops;
        let key = match self.algorithm {
            Algorithm::IpHash => Some(client_of(req, hops)),
            Algorithm::ConsistentHash => key_of(req, &snap.policy.consistent_hash.key, hops),
            _ => None,
        };
        match key {
            Some(key) => draw_from_hash(hash_key(snap.seed ^ ZONE_DRAW_SALT, key.as_bytes())),
            None => rng.f64(),
        }
    }

    /// A request to endpoint `i` took `latency_ms` (read only by the response-time algorithm).
    pub fn observe_latency(&mut self, i: usize, latency_ms: u64, now_ms: u64) {
        if self.algorithm == Algorithm::ResponseTime
            && let Some(e) = self.ewma.get_mut(i)
        {
            e.observe(latency_ms as f64, now_ms);
        }
    }
}

fn ring_for(snap: &Snapshot) -> Ring {
    match snap.policy.algorithm {
        Algorithm::ConsistentHash | Algorithm::IpHash => {
            let endpoints = snap.endpoints().iter().map(|e| (e.id.as_str(), e.weight));
            Ring::build(endpoints, snap.policy.consistent_hash.vnodes, snap.seed)
        }
        _ => Ring::default(),
    }
}
