//! A worker's view of one endpoint table: the endpoints, the effective policy, and what is derived from them once per
//! table rather than once per request (the id index, the cookie codec, the rate limits, shared-data keys, the endpoints that take new sessions).

use std::collections::HashMap;
use std::rc::Rc;

use crate::config::Policy;
use crate::locality::{self, ZonePlan};
use crate::ratelimit::Limits;
use crate::shared::keys;
use crate::sticky::StickyCodec;
use crate::table::{Endpoint, EndpointState, Table};

#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The table and what only depends on it, shared by the snapshots of its routes.
    pub table: Rc<Table>,
    pub by_id: Rc<HashMap<String, usize>>,
    pub inflight_keys: Rc<[String]>,
    pub aggregate_keys: Rc<[String]>,
    /// The effective policy: the static one with the table's runtime policy merged in (a route's: with its overrides).
    pub policy: Policy,
    pub codec: Option<StickyCodec>,
    /// The table's key-hashing seed (see [`Table::seed`]).
    pub seed: u64,
    pub limits: Limits,
    /// The endpoints a route may use (its pool, see [`crate::routing`]); `None`: every endpoint.
    pub pool: Option<Vec<bool>>,
    /// The endpoints that take new sessions (healthy, weight above 0, in the pool), in table order: the candidates of
    /// every request while nothing is ejected. Every candidate list is a subset of it in the same (ascending) order.
    pub new_session_candidates: Vec<usize>,
    /// Every new-session candidate has the same weight: weighted choices reduce to plain ones, in O(1) per request.
    pub uniform_weights: bool,
    /// The proxy's zone (from its configuration), if it has one.
    pub zone: Option<String>,
    /// Zone-aware locality over `new_session_candidates` (see [`crate::locality`]).
    pub zone_plan: Option<ZonePlan>,
}

impl Snapshot {
    pub fn build(table: Table, policy: Policy, zone: Option<&str>) -> Snapshot {
        let by_id = table.endpoints.iter().enumerate().map(|(i, e)| (e.id.clone(), i)).collect();
        let inflight_keys = table.endpoints.iter().map(|e| keys::inflight(&e.id)).collect();
        let aggregate_keys = table.endpoints.iter().map(|e| keys::aggregate(&e.id)).collect();
        let shared = Snapshot {
            table: Rc::new(table),
            by_id: Rc::new(by_id),
            inflight_keys,
            aggregate_keys,
            policy: Policy::default(),
            codec: None,
            seed: 0,
            limits: Limits { requests_per_minute: 1, burst_size: 1, slots: 1 },
            pool: None,
            new_session_candidates: Vec::new(),
            uniform_weights: true,
            zone: zone.map(str::to_string),
            zone_plan: None,
        };
        shared.with_policy(policy, None)
    }

    /// A snapshot of the same table with `policy`, over the endpoints of `pool` only (`None`: all).
    pub fn with_policy(&self, policy: Policy, pool: Option<Vec<bool>>) -> Snapshot {
        let sticky = &policy.sticky_sessions;
        let codec =
            if sticky.enabled { sticky.secret.as_deref().and_then(|s| StickyCodec::new(s.as_bytes())) } else { None };
        let limits = Limits {
            requests_per_minute: policy.rate_limiting.requests_per_minute,
            burst_size: policy.rate_limiting.burst_size,
            slots: policy.rate_limiting.slots,
        };
        let in_pool = |i: usize| pool.as_ref().is_none_or(|p| p.get(i).copied().unwrap_or(false));
        let new_session_candidates = self
            .table
            .endpoints
            .iter()
            .enumerate()
            .filter(|(i, e)| e.state == EndpointState::Healthy && e.weight > 0 && in_pool(*i))
            .map(|(i, _)| i)
            .collect::<Vec<usize>>();
        let weight = |i: &usize| self.table.endpoints.get(*i).map(|e| e.weight);
        let first = new_session_candidates.first().and_then(weight);
        let uniform_weights = new_session_candidates.iter().all(|i| weight(i) == first);
        let mut snap = Snapshot {
            table: self.table.clone(),
            by_id: self.by_id.clone(),
            inflight_keys: self.inflight_keys.clone(),
            aggregate_keys: self.aggregate_keys.clone(),
            seed: self.table.seed(),
            policy,
            codec,
            limits,
            pool,
            new_session_candidates,
            uniform_weights,
            zone: self.zone.clone(),
            zone_plan: None,
        };
        snap.zone_plan = snap.zone_plan_over(&snap.new_session_candidates);
        snap
    }

    /// The zone plan over `candidates` (a subset of the endpoints that take new sessions), if locality applies.
    pub fn zone_plan_over(&self, candidates: &[usize]) -> Option<ZonePlan> {
        let zone = self.zone.as_deref()?;
        locality::plan(zone, &self.table.endpoints, candidates, &self.table.proxy_zones, &self.policy.locality)
    }

    pub fn endpoints(&self) -> &[Endpoint] {
        &self.table.endpoints
    }

    pub fn endpoint(&self, i: usize) -> Option<&Endpoint> {
        self.table.endpoints.get(i)
    }

    /// For each endpoint of this snapshot, its index in `old` (same id), to carry per-endpoint state over.
    pub fn mapping_from(&self, old: &Snapshot) -> Vec<Option<usize>> {
        self.table.endpoints.iter().map(|e| old.by_id.get(&e.id).copied()).collect()
    }

    /// May keep its sticky sessions: healthy or draining, and in the pool.
    pub fn keeps_sessions(&self, i: usize) -> bool {
        self.endpoint(i).is_some_and(|e| matches!(e.state, EndpointState::Healthy | EndpointState::Draining))
            && self.pool.as_ref().is_none_or(|p| p.get(i).copied().unwrap_or(false))
    }
}

/// Carries per-endpoint values over to a new snapshot by id; new endpoints start from `T::default()`.
pub fn remap<T: Clone + Default>(old: &[T], mapping: &[Option<usize>]) -> Vec<T> {
    mapping.iter().map(|m| m.and_then(|o| old.get(o).cloned()).unwrap_or_default()).collect()
}
