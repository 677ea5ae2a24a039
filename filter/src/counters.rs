//! The shared keys that count: per endpoint its in-flight count and its aggregate, process-wide the global stats and
//! the ejections.
//!
//! Two contexts that both find a key absent both write it, and one write is lost (the host checks no `cas` for a key it
//! does not have; see [`crate::shared::update`]): two workers flushing their first counts at once would lose one's.
//! So these keys are created, empty, by one context before anyone counts on them: the poller for a table's endpoints
//! before it publishes the table, and a worker for its static endpoints when it is configured, before it serves.
//! Everyone else updates them in place only ([`crate::shared::update_present`]) and keeps its counts until they exist.

use crate::outlier::Ejections;
use crate::report::{Aggregate, GlobalStats};
use crate::shared::{self, SharedStore, keys};

/// Creates the counting keys of endpoints `ids` and the process-wide ones, where absent; false if the host refused one.
pub fn create<'a, S: SharedStore + ?Sized>(store: &S, ids: impl IntoIterator<Item = &'a str>) -> bool {
    let mut ok = shared::create(store, keys::GLOBAL_STATS, &GlobalStats::default().encode())
        && shared::create(store, keys::EJECTIONS, &Ejections::default().encode());
    for id in ids {
        ok &= shared::create(store, &keys::inflight(id), &0i64.to_le_bytes())
            && shared::create(store, &keys::aggregate(id), &Aggregate::default().encode());
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared::MemoryStore;

    #[test]
    fn creates_empty_counters_and_never_overwrites_one() {
        let s = MemoryStore::new();
        assert!(create(&s, ["a"]));
        assert_eq!(shared::get_i64(&s, &keys::inflight("a")), 0);
        assert_eq!(s.get(&keys::aggregate("a")).and_then(|(v, _)| Aggregate::decode(&v)), Some(Aggregate::default()));
        shared::add_i64(&s, &keys::inflight("a"), 2).unwrap();
        assert!(create(&s, ["a", "b"]));
        assert_eq!(shared::get_i64(&s, &keys::inflight("a")), 2, "an existing count stays");
        assert_eq!(s.keys_with_prefix("equilibrio/"), 6);
    }
}
