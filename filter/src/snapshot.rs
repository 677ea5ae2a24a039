//! A worker's view of one endpoint table: the endpoints, the effective policy, and what is derived from them once per
//! table rather than once per request (id and address indexes, the hash ring, the cookie codec, shared-data keys).

use std::collections::HashMap;

use crate::balancer::ring::Ring;
use crate::config::{Algorithm, Config, KeySource};
use crate::ratelimit::Limits;
use crate::shared::keys;
use crate::sticky::StickyCodec;
use crate::table::{Endpoint, EndpointState, Table};

#[derive(Debug, Clone)]
pub struct Snapshot {
    pub table: Table,
    pub config: Config,
    pub by_id: HashMap<String, usize>,
    pub by_address: HashMap<String, usize>,
    pub ring: Ring,
    pub codec: Option<StickyCodec>,
    pub hash_key: KeySource,
    /// The table's key-hashing seed (see [`Table::seed`]).
    pub seed: u64,
    pub rate_key: KeySource,
    pub limits: Limits,
    pub inflight_keys: Vec<String>,
    pub aggregate_keys: Vec<String>,
    /// The endpoints that take new sessions (healthy, weight above 0), in table order: the candidates of every
    /// request while nothing is ejected.
    pub new_session_candidates: Vec<usize>,
}

impl Snapshot {
    pub fn build(table: Table, config: Config) -> Snapshot {
        let by_id = table.endpoints.iter().enumerate().map(|(i, e)| (e.id.clone(), i)).collect();
        let by_address = table.endpoints.iter().enumerate().map(|(i, e)| (e.address.clone(), i)).collect();
        let ring = match config.algorithm {
            Algorithm::ConsistentHash | Algorithm::IpHash => {
                let endpoints = table.endpoints.iter().map(|e| (e.id.as_str(), e.weight));
                Ring::build(endpoints, config.consistent_hash.vnodes, table.seed())
            }
            _ => Ring::default(),
        };
        let sticky = &config.sticky_sessions;
        let codec =
            if sticky.enabled { sticky.secret.as_deref().and_then(|s| StickyCodec::new(s.as_bytes())) } else { None };
        // validated by Config; the fallbacks only guard against a policy that skipped validation
        let seed = table.seed();
        let hash_key = KeySource::parse(&config.consistent_hash.key).unwrap_or(KeySource::Path);
        let rate_key = KeySource::parse(&config.rate_limiting.key).unwrap_or(KeySource::ClientAddress);
        let limits = Limits {
            requests_per_minute: config.rate_limiting.requests_per_minute,
            burst_size: config.rate_limiting.burst_size,
            slots: config.rate_limiting.slots,
        };
        let inflight_keys = table.endpoints.iter().map(|e| keys::inflight(&e.id)).collect();
        let aggregate_keys = table.endpoints.iter().map(|e| keys::aggregate(&e.id)).collect();
        let new_session_candidates = table
            .endpoints
            .iter()
            .enumerate()
            .filter(|(_, e)| e.state == EndpointState::Healthy && e.weight > 0)
            .map(|(i, _)| i)
            .collect();
        Snapshot {
            new_session_candidates,
            table,
            config,
            by_id,
            by_address,
            ring,
            codec,
            hash_key,
            seed,
            rate_key,
            limits,
            inflight_keys,
            aggregate_keys,
        }
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

    /// May take new sessions: healthy and weight above 0 (ejections are checked by the caller).
    pub fn takes_new(&self, i: usize) -> bool {
        self.endpoint(i).is_some_and(|e| e.state == EndpointState::Healthy && e.weight > 0)
    }

    /// May keep its sticky sessions: healthy or draining.
    pub fn keeps_sessions(&self, i: usize) -> bool {
        self.endpoint(i).is_some_and(|e| matches!(e.state, EndpointState::Healthy | EndpointState::Draining))
    }
}

/// Carries per-endpoint values over to a new snapshot by id; new endpoints start from `T::default()`.
pub fn remap<T: Clone + Default>(old: &[T], mapping: &[Option<usize>]) -> Vec<T> {
    mapping.iter().map(|m| m.and_then(|o| old.get(o).cloned()).unwrap_or_default()).collect()
}
