//! What the proxies read: the endpoint table in the filter's wire format, and Envoy's REST EDS answer.
//!
//! Both come from the same registry state, so Envoy's cluster membership and the filter's choices always agree:
//! healthy instances are `HEALTHY`, draining ones `DRAINING` (Envoy's `override_host` still reaches them for their
//! sticky sessions), and unhealthy or not yet checked ones `UNHEALTHY`.

use serde_json::Value;

use equilibrio_contract::table::{Endpoint, Table};

use std::collections::BTreeMap;

use crate::registry::Service;

/// The filter's table of `svc` (`GET /v1/services/{service}/endpoints`), typed by the contract. `hash_seed` is the
/// deployment's secret seed for the service ([`crate::secret::Secret::hash_seed`]).
pub fn table(svc: &Service, hash_seed: Option<&str>) -> Table {
    with_zones(svc, hash_seed, Default::default())
}

/// [`table`] with the service's proxies per zone (from their reports), for zone-aware locality.
pub fn with_zones(svc: &Service, hash_seed: Option<&str>, proxy_zones: BTreeMap<String, u32>) -> Table {
    Table {
        service: svc.name.clone(),
        version: svc.version,
        endpoints: svc
            .instances
            .values()
            .map(|i| Endpoint {
                id: i.spec.id.clone(),
                address: i.spec.address.clone(),
                weight: i.spec.weight,
                state: i.endpoint_state(),
                zone: i.spec.zone.clone(),
                tags: i.spec.tags.clone(),
            })
            .collect(),
        policy: Some(svc.policy.clone()),
        proxy_zones,
        hash_seed: hash_seed.map(str::to_string),
    }
}

/// The table as JSON.
pub fn endpoints(svc: &Service, hash_seed: Option<&str>, proxy_zones: BTreeMap<String, u32>) -> Value {
    serde_json::to_value(with_zones(svc, hash_seed, proxy_zones)).unwrap_or(Value::Null)
}

/// The table's `ETag`: its version, and the proxies per zone when there are any (they change the table too).
pub fn etag(svc: &Service, proxy_zones: &BTreeMap<String, u32>) -> String {
    if proxy_zones.is_empty() {
        return format!("\"{}\"", svc.version);
    }
    let mut h = std::hash::DefaultHasher::new();
    std::hash::Hash::hash(proxy_zones, &mut h);
    format!("\"{}-{:016x}\"", svc.version, std::hash::Hasher::finish(&h))
}

/// Envoy's REST EDS `DiscoveryResponse` for the `ClusterLoadAssignment` named `cluster` (the same name as the
/// service: the proxy config names its cluster after the service or lists it in `resource_names`), from the same
/// endpoints as the filter's table.
pub fn eds(svc: &Service, cluster: &str) -> Value {
    equilibrio_contract::eds::discovery_response(cluster, svc.version, &table(svc, None).endpoints)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::config::InstanceSpec;
    use crate::registry::{Registry, RegistryError, Source};

    #[test]
    fn table_and_eds_agree() {
        let c = Config::parse(
            "services:\n  av:\n    instances: [{id: a, address: '127.0.0.1:1'}, {id: b, address: '127.0.0.1:2', weight: 0}]\n",
            None,
        )
        .unwrap();
        let mut r = Registry::from_config(&c.services, 5);
        r.record_check("av", "a", true, 1.0, 6);
        let svc = r.service("av").unwrap();
        let seed = crate::secret::Secret::generate().unwrap().hash_seed("av");
        let t = endpoints(svc, Some(&seed), BTreeMap::new());
        assert_eq!(t["endpoints"][0]["state"], "healthy");
        assert_eq!(t["endpoints"][1]["state"], "unhealthy");
        let parsed = equilibrio_contract::table::Table::parse(t.to_string().as_bytes(), "av", None, 1 << 20).unwrap();
        assert_eq!(parsed.version, svc.version);
        assert_eq!(parsed.hash_seed.as_deref(), Some(seed.as_str()), "the filter reads the seed it is sent");
        let e = eds(svc, "backend");
        let eps = &e["resources"][0]["endpoints"][0]["lb_endpoints"];
        assert_eq!(eps[0]["health_status"], "HEALTHY");
        assert_eq!(eps[1]["health_status"], "UNHEALTHY");
        assert_eq!(eps[1]["load_balancing_weight"], 1, "EDS weights are at least 1");
    }

    #[test]
    fn proxies_per_zone_go_into_the_table_and_its_etag() {
        let c = Config::parse("services:\n  av:\n    instances: [{id: a, address: '127.0.0.1:1'}]\n", None).unwrap();
        let r = Registry::from_config(&c.services, 5);
        let svc = r.service("av").unwrap();
        let none = BTreeMap::new();
        let zones = BTreeMap::from([("a".to_string(), 2u32), ("b".to_string(), 1)]);
        assert_eq!(etag(svc, &none), format!("\"{}\"", svc.version));
        assert_ne!(etag(svc, &zones), etag(svc, &none));
        assert_ne!(etag(svc, &zones), etag(svc, &BTreeMap::from([("a".to_string(), 1u32), ("b".to_string(), 1)])));
        let t = endpoints(svc, None, zones.clone());
        let parsed = equilibrio_contract::table::Table::parse(t.to_string().as_bytes(), "av", None, 1 << 20).unwrap();
        assert_eq!(parsed.proxy_zones, zones);
    }

    #[test]
    fn a_service_takes_no_more_instances_than_a_proxy_table_holds() {
        let mut r = Registry::from_config(
            &Config::parse("services:\n  av:\n    instances: [{id: a, address: '127.0.0.1:1'}]\n", None)
                .unwrap()
                .services,
            1000,
        );
        let mut n = 1;
        let err = loop {
            let mut s = InstanceSpec {
                id: format!("i{n:0>120}"),
                address: String::new(),
                weight: 100,
                zone: String::new(),
                tags: vec![],
                version: String::new(),
                capabilities: vec![],
            };
            s.address = format!("10.{}.{}.{}:8080", n / 65536, (n / 256) % 256, n % 256);
            s.zone = "z".repeat(64);
            match r.register("av", s, Source::Api, None, 1) {
                Ok(_) => n += 1,
                Err(e) => break e,
            }
        };
        assert!(matches!(err, RegistryError::Full { .. }), "{err}");
        assert!(n <= equilibrio_contract::table::MAX_ENDPOINTS);
        let svc = r.service("av").unwrap();
        let table = endpoints(svc, Some("0123456789abcdef"), BTreeMap::new()).to_string();
        assert!(table.len() < 1 << 20, "{} bytes", table.len());
    }
}
