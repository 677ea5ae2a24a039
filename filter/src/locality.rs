//! Zone-aware locality: a proxy that knows its zone keeps new requests in that zone while the zone has its share of
//! the healthy capacity, and sends the overflow to the other zones (Envoy's zone-aware routing).
//!
//! With `t` the local zone's share of the traffic (its share of the service's proxies, from the table's
//! `proxy_zones`; without them every zone with endpoints is taken to get an equal share) and `c` its share of the
//! healthy capacity (the weights of the endpoints that take new requests), the local zone takes `min(1, c / t)` of the
//! new requests. The rest goes first to the zones of `locality.spillover`, in order, each up to its spare capacity
//! (its capacity share minus its traffic share), then to the other zones in proportion to their spare capacity. Below
//! `locality.min_endpoints` endpoints in the table, with one zone only, or without a configured zone, there is no plan
//! and requests balance over every candidate.
//!
//! A request draws a number in `[0, 1)` (at random, or from its hash key for the hashing algorithms, so a key keeps its
//! zone) and balances over the candidates of the zone it falls in. Sticky sessions ignore locality.

use std::collections::BTreeMap;

use crate::config::LocalityConfig;
use crate::table::Endpoint;

/// Below this, a share is taken as zero (floating-point noise).
const EPSILON: f64 = 1e-9;

/// The zones that take new requests, each with its candidates and its share.
#[derive(Debug, Clone, PartialEq)]
pub struct ZonePlan {
    /// `(candidates of the zone in table order, cumulative share up to and including this zone)`, the local zone
    /// first; only zones with a share above zero.
    zones: Vec<(Vec<usize>, f64)>,
    /// The share of new requests that stays in the local zone.
    pub local_share: f64,
}

impl ZonePlan {
    /// The candidates of the zone that a request drawing `u` (in `[0, 1)`) goes to.
    pub fn candidates(&self, u: f64) -> &[usize] {
        let zone = self.zones.iter().find(|(_, cumulative)| u < *cumulative).or(self.zones.last());
        zone.map_or(&[], |(c, _)| c.as_slice())
    }

    /// Each zone's share, by zone name (for tests and logs).
    pub fn shares<'a>(&self, endpoints: &'a [Endpoint]) -> BTreeMap<&'a str, f64> {
        let mut previous = 0.0;
        let mut out = BTreeMap::new();
        for (candidates, cumulative) in &self.zones {
            if let Some(e) = candidates.first().and_then(|&i| endpoints.get(i)) {
                out.insert(e.zone.as_str(), cumulative - previous);
            }
            previous = *cumulative;
        }
        out
    }
}

/// The plan for a proxy in zone `local`, over `candidates` (indices into `endpoints`: the ones that take new
/// requests now). `None`: no locality (balance over every candidate).
pub fn plan(
    local: &str,
    endpoints: &[Endpoint],
    candidates: &[usize],
    proxy_zones: &BTreeMap<String, u32>,
    cfg: &LocalityConfig,
) -> Option<ZonePlan> {
    if !cfg.enabled || local.is_empty() || endpoints.len() < cfg.min_endpoints as usize {
        return None;
    }
    // healthy capacity and candidates per zone
    let mut zones: BTreeMap<&str, (u64, Vec<usize>)> = BTreeMap::new();
    for &i in candidates {
        if let Some(e) = endpoints.get(i) {
            let z = zones.entry(e.zone.as_str()).or_default();
            z.0 += u64::from(e.weight);
            z.1.push(i);
        }
    }
    let total: u64 = zones.values().map(|(w, _)| w).sum();
    if total == 0 || zones.len() < 2 {
        return None;
    }
    let capacity = |z: &str| zones.get(z).map_or(0.0, |(w, _)| *w as f64 / total as f64);
    let traffic = traffic_shares(local, endpoints, proxy_zones);
    let traffic_of = |z: &str| traffic.get(z).copied().unwrap_or(0.0);

    let t_local = traffic_of(local);
    let local_share = if t_local <= EPSILON { 1.0 } else { (capacity(local) / t_local).min(1.0) };
    let local_share = if capacity(local) <= EPSILON { 0.0 } else { local_share };

    // the overflow: the spillover order first, each up to its spare capacity, then in proportion to spare capacity
    let others: Vec<&str> = zones.keys().copied().filter(|z| *z != local).collect();
    let mut spare: BTreeMap<&str, f64> = others.iter().map(|z| (*z, (capacity(z) - traffic_of(z)).max(0.0))).collect();
    if spare.values().sum::<f64>() <= EPSILON {
        spare = others.iter().map(|z| (*z, capacity(z))).collect();
    }
    let mut share: BTreeMap<&str, f64> = BTreeMap::new();
    let mut remaining = 1.0 - local_share;
    for z in &cfg.spillover {
        if let Some(s) = spare.get(z.as_str()) {
            let give = remaining.min(*s);
            *share.entry(z.as_str()).or_default() += give;
            remaining -= give;
        }
    }
    let spare_total: f64 = spare.values().sum();
    if remaining > EPSILON && spare_total > EPSILON {
        for (z, s) in &spare {
            *share.entry(z).or_default() += remaining * s / spare_total;
        }
    }

    let mut plan = ZonePlan { zones: Vec::new(), local_share };
    let mut cumulative = 0.0;
    let local_entry = (local, local_share);
    for (z, s) in std::iter::once(local_entry).chain(others.iter().map(|z| (*z, share.get(z).copied().unwrap_or(0.0))))
    {
        if s <= EPSILON {
            continue;
        }
        if let Some((_, c)) = zones.get(z) {
            cumulative += s;
            plan.zones.push((c.clone(), cumulative));
        }
    }
    // the last zone takes whatever rounding left
    if let Some(last) = plan.zones.last_mut() {
        last.1 = 1.0;
    }
    Some(plan)
}

/// Each zone's share of the traffic: from the proxies per zone when they include the local zone, otherwise an equal
/// share for every zone that has endpoints (and the local zone).
fn traffic_shares(local: &str, endpoints: &[Endpoint], proxy_zones: &BTreeMap<String, u32>) -> BTreeMap<String, f64> {
    let proxies: u64 = proxy_zones.values().map(|&n| u64::from(n)).sum();
    if proxy_zones.get(local).is_some_and(|&n| n > 0) && proxies > 0 {
        return proxy_zones.iter().map(|(z, n)| (z.clone(), f64::from(*n) / proxies as f64)).collect();
    }
    let mut zones: Vec<&str> = endpoints.iter().map(|e| e.zone.as_str()).chain([local]).collect();
    zones.sort_unstable();
    zones.dedup();
    let n = zones.len() as f64;
    zones.into_iter().map(|z| (z.to_string(), 1.0 / n)).collect()
}

/// A draw in `[0, 1)` from a 64-bit hash, so that a key always falls in the same zone.
pub fn draw_from_hash(hash: u64) -> f64 {
    (hash >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::EndpointState;
    use proptest::prelude::*;

    fn eps(zones: &[(&str, u32)]) -> Vec<Endpoint> {
        zones
            .iter()
            .enumerate()
            .map(|(i, (z, w))| Endpoint {
                id: format!("e{i}"),
                address: format!("127.0.0.1:{}", 9000 + i),
                weight: *w,
                state: EndpointState::Healthy,
                zone: z.to_string(),
                tags: Vec::new(),
            })
            .collect()
    }

    fn cfg() -> LocalityConfig {
        LocalityConfig::default()
    }

    const SIX: [(&str, u32); 6] = [("a", 1), ("a", 1), ("a", 1), ("b", 1), ("b", 1), ("b", 1)];

    #[test]
    fn a_zone_with_its_share_keeps_all_its_traffic() {
        let e = eps(&SIX);
        let p = plan("a", &e, &[0, 1, 2, 3, 4, 5], &BTreeMap::new(), &cfg()).unwrap();
        assert_eq!(p.local_share, 1.0);
        assert_eq!(p.candidates(0.999), &[0, 1, 2]);
        assert_eq!(p.shares(&e), BTreeMap::from([("a", 1.0)]));
    }

    #[test]
    fn a_short_zone_keeps_capacity_over_traffic_and_spills_the_rest() {
        let e = eps(&SIX);
        // two of a's three are down: c = 1/4, t = 1/2, so a keeps 50%
        let p = plan("a", &e, &[2, 3, 4, 5], &BTreeMap::new(), &cfg()).unwrap();
        assert!((p.local_share - 0.5).abs() < 1e-9, "{p:?}");
        assert_eq!(p.candidates(0.25), &[2]);
        assert_eq!(p.candidates(0.75), &[3, 4, 5]);
        // a is down: everything to b
        let p = plan("a", &e, &[3, 4, 5], &BTreeMap::new(), &cfg());
        assert!(p.is_none(), "one zone left: no plan, every candidate is in b");
    }

    #[test]
    fn proxies_per_zone_set_the_traffic_share() {
        let e = eps(&SIX);
        // three proxies in a, one in b: a carries 3/4 of the traffic on 1/2 of the capacity, keeps 2/3
        let proxies = BTreeMap::from([("a".to_string(), 3), ("b".to_string(), 1)]);
        let p = plan("a", &e, &[0, 1, 2, 3, 4, 5], &proxies, &cfg()).unwrap();
        assert!((p.local_share - 2.0 / 3.0).abs() < 1e-9, "{p:?}");
        // b's proxy has more than its share: all local
        assert_eq!(plan("b", &e, &[0, 1, 2, 3, 4, 5], &proxies, &cfg()).unwrap().local_share, 1.0);
    }

    #[test]
    fn spillover_fills_the_preferred_zone_first() {
        let e = eps(&[("a", 1), ("a", 1), ("a", 1), ("b", 1), ("b", 1), ("b", 1), ("c", 1), ("c", 1), ("c", 1)]);
        let candidates = [2, 3, 4, 5, 6, 7, 8]; // a has 1 of 7; t = 1/3 each
        let shares = |spillover: &[&str]| {
            let cfg = LocalityConfig { spillover: spillover.iter().map(|s| s.to_string()).collect(), ..cfg() };
            let p = plan("a", &e, &candidates, &BTreeMap::new(), &cfg).unwrap();
            p.shares(&e).into_iter().map(|(z, s)| (z.to_string(), (s * 1000.0).round() / 1000.0)).collect::<Vec<_>>()
        };
        // local 3/7 of 1/3 -> 0.429; b and c have spare 3/7 - 1/3 = 0.095 each
        assert_eq!(shares(&[]), [("a".into(), 0.429), ("b".into(), 0.286), ("c".into(), 0.286)]);
        // c first: it takes its spare, the rest is shared by spare
        assert_eq!(shares(&["c"]), [("a".into(), 0.429), ("b".into(), 0.238), ("c".into(), 0.333)]);
    }

    #[test]
    fn small_tables_and_unknown_zones_have_no_plan() {
        let e = eps(&SIX[1..]);
        assert!(plan("a", &e, &[0, 1, 2, 3, 4], &BTreeMap::new(), &cfg()).is_none(), "5 endpoints < 6");
        let e = eps(&SIX);
        assert!(plan("", &e, &[0, 1, 2, 3, 4, 5], &BTreeMap::new(), &cfg()).is_none(), "no zone configured");
        let off = LocalityConfig { enabled: false, ..cfg() };
        assert!(plan("a", &e, &[0, 1, 2, 3, 4, 5], &BTreeMap::new(), &off).is_none());
        // a proxy in a zone without endpoints sends everything out, in proportion to capacity
        let p = plan("z", &e, &[0, 1, 2, 3, 4, 5], &BTreeMap::new(), &cfg()).unwrap();
        assert_eq!(p.local_share, 0.0);
        assert_eq!(p.shares(&e), BTreeMap::from([("a", 0.5), ("b", 0.5)]));
    }

    proptest! {
        #[test]
        fn shares_add_up_and_follow_the_formula(
            zones in prop::collection::vec((0u8..4, 1u32..5), 6..24),
            up in prop::collection::vec(any::<bool>(), 24),
            local in 0u8..4,
        ) {
            let names = ["a", "b", "c", "d"];
            let e = eps(&zones.iter().map(|(z, w)| (names[*z as usize], *w)).collect::<Vec<_>>());
            let candidates: Vec<usize> = (0..e.len()).filter(|&i| up[i]).collect();
            let local = names[local as usize];
            if let Some(p) = plan(local, &e, &candidates, &BTreeMap::new(), &cfg()) {
                let shares = p.shares(&e);
                let sum: f64 = shares.values().sum();
                prop_assert!((sum - 1.0).abs() < 1e-6, "{shares:?}");
                let total: u32 = candidates.iter().map(|&i| e[i].weight).sum();
                let cap: u32 = candidates.iter().filter(|&&i| e[i].zone == local).map(|&i| e[i].weight).sum();
                let mut present: Vec<&str> = e.iter().map(|x| x.zone.as_str()).chain([local]).collect();
                present.sort_unstable();
                present.dedup();
                let want = (f64::from(cap) / f64::from(total) * present.len() as f64).min(1.0);
                prop_assert!((p.local_share - want).abs() < 1e-9, "{} vs {want}", p.local_share);
                for u in [0.0, 0.3, 0.6, 0.999_999] {
                    prop_assert!(p.candidates(u).iter().all(|i| candidates.contains(i)));
                }
            }
        }
    }
}
