//! How the registry lies in etcd: one key per service (its settings and table version, without instances), one key
//! per instance, one for the deployment secret. Small keys, so a health transition writes a few hundred bytes, not
//! the service; and the table version lives in the service's key, so every node serves the same version for the same
//! content. Pure: the keys a change touches, their values, and applying a value read from etcd.
//!
//! What is shared is what the proxies' tables and the API depend on. The health checker's counters (consecutive
//! results) and the last check's latency stay with the node that checks (the leader): writing them would be a write per
//! check.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::HealthCheck;
use crate::health::HealthState;
use crate::registry::{Instance, Registry, Service};
use crate::scaling::policy::ScalingPolicy;
use crate::secret::Secret;

/// A key of the layout, under the deployment's prefix.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Key {
    Secret,
    Service(String),
    Instance(String, String),
}

/// The directory of the registry's keys under the prefix.
pub const REGISTRY_DIR: &str = "/registry/";

/// Where the registry's keys are.
pub fn registry_dir(prefix: &str) -> String {
    format!("{prefix}{REGISTRY_DIR}")
}

/// Where the nodes' events are, each node's under `<node>/` (see `etcd/store.rs`).
pub fn events_dir(prefix: &str) -> String {
    format!("{prefix}/events/")
}

impl Key {
    pub fn path(&self, prefix: &str) -> String {
        match self {
            Key::Secret => format!("{prefix}{REGISTRY_DIR}secret"),
            Key::Service(s) => format!("{prefix}{REGISTRY_DIR}services/{s}"),
            Key::Instance(s, id) => format!("{prefix}{REGISTRY_DIR}instances/{s}/{id}"),
        }
    }

    /// The key of an etcd path, if it is one of the layout's.
    pub fn parse(prefix: &str, path: &str) -> Option<Key> {
        let rest = path.strip_prefix(prefix)?.strip_prefix(REGISTRY_DIR)?;
        let valid = |s: &str| !s.is_empty() && s.bytes().all(equilibrio_contract::is_id_byte);
        if rest == "secret" {
            return Some(Key::Secret);
        }
        if let Some(name) = rest.strip_prefix("services/") {
            return valid(name).then(|| Key::Service(name.to_string()));
        }
        let (service, id) = rest.strip_prefix("instances/")?.split_once('/')?;
        (valid(service) && valid(id)).then(|| Key::Instance(service.to_string(), id.to_string()))
    }
}

/// A service as kept: everything but its instances.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ServiceRecord {
    policy: Value,
    health_check: HealthCheck,
    version: u64,
    #[serde(default)]
    scaling: Option<ScalingPolicy>,
}

/// Every key the registry has.
pub fn keys(reg: &Registry) -> Vec<Key> {
    let mut keys = Vec::new();
    if reg.secret.is_some() {
        keys.push(Key::Secret);
    }
    for (name, svc) in &reg.services {
        keys.push(Key::Service(name.clone()));
        keys.extend(svc.instances.keys().map(|id| Key::Instance(name.clone(), id.clone())));
    }
    keys
}

/// The value of `key` in `reg`; `None` when the registry does not have it (a delete).
pub fn value(reg: &Registry, key: &Key) -> Option<Vec<u8>> {
    match key {
        Key::Secret => reg.secret.as_ref().and_then(|s| serde_json::to_vec(s).ok()),
        Key::Service(name) => {
            let s = reg.services.get(name)?;
            let record = ServiceRecord {
                policy: s.policy.clone(),
                health_check: s.health_check.clone(),
                version: s.version,
                scaling: s.scaling.clone(),
            };
            serde_json::to_vec(&record).ok()
        }
        Key::Instance(service, id) => {
            let mut inst = reg.services.get(service)?.instances.get(id)?.clone();
            inst.health = HealthState { health: inst.health.health, successes: 0, failures: 0 };
            inst.check_latency_ms = None;
            serde_json::to_vec(&inst).ok()
        }
    }
}

/// The keys whose values differ between `before` and `after` (compared field by field, without encoding: this runs
/// on every change, over every instance).
pub fn changed(before: &Registry, after: &Registry) -> Vec<Key> {
    let mut out = Vec::new();
    if before.secret != after.secret {
        out.push(Key::Secret);
    }
    let names: std::collections::BTreeSet<&String> = before.services.keys().chain(after.services.keys()).collect();
    for name in names {
        let (b, a) = (before.services.get(name), after.services.get(name));
        let same_record = match (b, a) {
            (Some(b), Some(a)) => {
                b.policy == a.policy
                    && b.health_check == a.health_check
                    && b.version == a.version
                    && b.scaling == a.scaling
            }
            _ => false,
        };
        if !same_record {
            out.push(Key::Service(name.clone()));
        }
        let empty = std::collections::BTreeMap::new();
        let (bi, ai) = (b.map_or(&empty, |s| &s.instances), a.map_or(&empty, |s| &s.instances));
        let ids: std::collections::BTreeSet<&String> = bi.keys().chain(ai.keys()).collect();
        for id in ids {
            let same = match (bi.get(id), ai.get(id)) {
                (Some(x), Some(y)) => same_shared(x, y),
                _ => false,
            };
            if !same {
                out.push(Key::Instance(name.clone(), id.clone()));
            }
        }
    }
    out
}

/// Whether two instances have the same value in etcd: every field but the checker's counters and latency (listed by
/// name, so that a new field cannot be forgotten here).
fn same_shared(a: &Instance, b: &Instance) -> bool {
    let Instance {
        spec,
        source,
        started_at_ms,
        health,
        drain,
        heartbeat_ttl_ms,
        last_heartbeat_ms,
        check_latency_ms: _,
        healthy_since_ms,
        full_weight,
        unhealthy_since_ms,
        watched_since_ms,
    } = a;
    *spec == b.spec
        && *source == b.source
        && *started_at_ms == b.started_at_ms
        && health.health == b.health.health
        && *drain == b.drain
        && *heartbeat_ttl_ms == b.heartbeat_ttl_ms
        && *last_heartbeat_ms == b.last_heartbeat_ms
        && *healthy_since_ms == b.healthy_since_ms
        && *full_weight == b.full_weight
        && *unhealthy_since_ms == b.unhealthy_since_ms
        && *watched_since_ms == b.watched_since_ms
}

/// Puts `bytes` (or, with `None`, deletes `key`) into `reg`. The node's own health counters and check latency are
/// kept when the health state is the same. An instance of a service `reg` does not have yet waits for it: it is
/// refused, and the caller reads it again after the service. A value that does not parse is refused and `reg` is
/// unchanged.
pub fn apply(reg: &mut Registry, key: &Key, bytes: Option<&[u8]>) -> Result<(), String> {
    match (key, bytes) {
        (Key::Secret, Some(b)) => {
            reg.secret = Some(serde_json::from_slice::<Secret>(b).map_err(|e| format!("secret: {e}"))?);
        }
        (Key::Secret, None) => {}
        (Key::Service(name), Some(b)) => {
            let r: ServiceRecord = serde_json::from_slice(b).map_err(|e| format!("service {name}: {e}"))?;
            let svc = reg.services.entry(name.clone()).or_insert_with(|| Service {
                name: name.clone(),
                policy: Value::Null,
                health_check: r.health_check.clone(),
                instances: Default::default(),
                version: 0,
                scaling: None,
            });
            svc.policy = r.policy;
            svc.health_check = r.health_check;
            svc.version = r.version;
            svc.scaling = r.scaling;
        }
        (Key::Service(name), None) => {
            reg.services.remove(name);
        }
        (Key::Instance(service, id), Some(b)) => {
            let mut inst: Instance = serde_json::from_slice(b).map_err(|e| format!("instance {service}/{id}: {e}"))?;
            if inst.spec.id != *id {
                return Err(format!("instance {service}/{id}: its value names `{}`", inst.spec.id));
            }
            let svc =
                reg.services.get_mut(service).ok_or_else(|| format!("instance {service}/{id}: no such service"))?;
            keep_checker_state(svc.instances.get(id), &mut inst);
            svc.instances.insert(id.clone(), inst);
        }
        (Key::Instance(service, id), None) => {
            if let Some(svc) = reg.services.get_mut(service) {
                svc.instances.remove(id);
            }
        }
    }
    Ok(())
}

/// Keeps this node's health-check counters and last latency in `incoming` (a value from etcd, or from a change) when
/// the health state is the one it has: they are not shared (see the module's doc).
pub fn keep_checker_state(current: Option<&Instance>, incoming: &mut Instance) {
    if let Some(current) = current
        && current.health.health == incoming.health.health
    {
        incoming.health = current.health;
        incoming.check_latency_ms = current.check_latency_ms;
    }
}

/// Copies `key` from `from` into `to` as [`apply`] would put its value, without a round trip through JSON: how a
/// node applies its own committed change to the registry it serves.
pub fn copy(from: &Registry, to: &mut Registry, key: &Key) {
    match key {
        Key::Secret => {
            if from.secret.is_some() {
                to.secret.clone_from(&from.secret);
            }
        }
        Key::Service(name) => match from.services.get(name) {
            Some(s) => {
                let t = to
                    .services
                    .entry(name.clone())
                    .or_insert_with(|| Service { instances: Default::default(), ..s.clone() });
                t.policy.clone_from(&s.policy);
                t.health_check = s.health_check.clone();
                t.version = s.version;
                t.scaling.clone_from(&s.scaling);
            }
            None => {
                to.services.remove(name);
            }
        },
        Key::Instance(service, id) => {
            let inst = from.services.get(service).and_then(|s| s.instances.get(id));
            let Some(svc) = to.services.get_mut(service) else { return };
            match inst {
                Some(inst) => {
                    let mut inst = inst.clone();
                    keep_checker_state(svc.instances.get(id), &mut inst);
                    svc.instances.insert(id.clone(), inst);
                }
                None => {
                    svc.instances.remove(id);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, InstanceSpec};
    use crate::registry::Source;

    fn registry() -> Registry {
        let c = Config::parse(
            "services:\n  av:\n    instances: [{id: a, address: '127.0.0.1:1'}, {id: b, address: '127.0.0.1:2'}]\n  other: {}\n",
            None,
        )
        .unwrap();
        let mut r = Registry::from_config(&c.services, 1000);
        r.secret = Some(Secret::generate().unwrap());
        r
    }

    #[test]
    fn keys_round_trip_through_their_paths() {
        for key in keys(&registry()) {
            assert_eq!(Key::parse("/eq", &key.path("/eq")), Some(key.clone()));
            assert_eq!(Key::parse("/other", &key.path("/eq")), None);
        }
        for bad in ["/eq/registry/instances/av", "/eq/registry/services/", "/eq/registry/instances/a b/c", "/eq/leader"]
        {
            assert_eq!(Key::parse("/eq", bad), None, "{bad}");
        }
    }

    #[test]
    fn a_registry_rebuilt_from_its_values_is_the_same_but_for_the_checkers_counters() {
        let mut original = registry();
        original.record_check("av", "a", true, 3.0, 2000);
        let mut copy = Registry::default();
        // services first, as a reader of the whole prefix does
        let mut all = keys(&original);
        all.sort_by_key(|k| matches!(k, Key::Instance(..)));
        for k in &all {
            apply(&mut copy, k, value(&original, k).as_deref()).unwrap();
        }
        assert!(changed(&original, &copy).is_empty(), "{:?}", changed(&original, &copy));
        let (a, b) = (&original.services["av"].instances["a"], &copy.services["av"].instances["a"]);
        assert_eq!(a.health.health, b.health.health);
        assert_eq!(b.check_latency_ms, None, "the check latency stays with the checker");
    }

    #[test]
    fn a_change_touches_only_its_keys_and_counters_touch_none() {
        let before = registry();
        let mut after = before.clone();
        after.record_check("av", "a", false, 1.0, 2000); // unknown -> unhealthy: a transition
        assert_eq!(changed(&before, &after), vec![Key::Service("av".into()), Key::Instance("av".into(), "a".into())]);
        let mut counted = after.clone();
        counted.record_check("av", "a", false, 1.0, 3000); // only the counters move
        assert!(changed(&after, &counted).is_empty());
        let mut removed = after.clone();
        removed.deregister("av", "b", 4000, "test").unwrap();
        assert_eq!(changed(&after, &removed), vec![Key::Service("av".into()), Key::Instance("av".into(), "b".into())]);
        assert_eq!(value(&removed, &Key::Instance("av".into(), "b".into())), None);
    }

    #[test]
    fn changed_agrees_with_the_encoded_values() {
        let base = registry();
        let mut variants = vec![base.clone()];
        let mut v = base.clone();
        v.update("av", "a", &crate::registry::InstanceUpdate { weight: Some(7), zone: None }, 5).unwrap();
        variants.push(v.clone());
        v.heartbeat("av", "b", 9).unwrap();
        variants.push(v.clone());
        v.secret = Some(Secret::generate().unwrap());
        variants.push(v.clone());
        v.services.remove("other");
        variants.push(v);
        for x in &variants {
            for y in &variants {
                let mut all = keys(x);
                all.extend(keys(y));
                all.sort();
                all.dedup();
                let by_value: Vec<Key> = all.into_iter().filter(|k| value(x, k) != value(y, k)).collect();
                let mut fast = changed(x, y);
                fast.sort();
                assert_eq!(fast, by_value);
            }
        }
    }

    #[test]
    fn copying_the_changed_keys_makes_the_change() {
        let before = registry();
        let mut after = before.clone();
        after.deregister("av", "b", 4000, "test").unwrap();
        after.drain("av", "a", 1000, 4000).unwrap();
        after.set_policy("other", serde_json::json!({"algorithm": "random"}), 4000).unwrap();
        let mut target = before.clone();
        for k in changed(&before, &after) {
            copy(&after, &mut target, &k);
        }
        assert_eq!(target, after);
    }

    #[test]
    fn malformed_values_change_nothing() {
        let mut r = registry();
        let before = r.clone();
        for (key, bytes) in [
            (Key::Service("av".into()), &b"{not json"[..]),
            (Key::Instance("av".into(), "a".into()), br#"{"id": "a"}"#),
            (Key::Secret, br#""short""#),
        ] {
            assert!(apply(&mut r, &key, Some(bytes)).is_err());
        }
        let spec = InstanceSpec {
            id: "zz".into(),
            address: "127.0.0.1:9".into(),
            weight: 1,
            zone: String::new(),
            tags: vec![],
            version: String::new(),
            capabilities: vec![],
        };
        let other = serde_json::to_vec(&Instance::new(spec, Source::Api, 1, None)).unwrap();
        assert!(
            apply(&mut r, &Key::Instance("av".into(), "a".into()), Some(&other)).is_err(),
            "a value for another id"
        );
        assert!(apply(&mut r, &Key::Instance("nope".into(), "zz".into()), Some(&other)).is_err(), "no such service");
        assert_eq!(r, before);
    }
}
