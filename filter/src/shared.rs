//! Process-wide shared data, as the proxy-wasm host offers it: a key-value map with compare-and-swap.
//!
//! Each proxy worker runs its own VM, so anything that must be exact across the process (rate-limit buckets, in-flight
//! counts, ejections, the endpoint table) lives here and changes through [`update`], a bounded CAS loop. The trait lets
//! the same logic run on the host (the wasm adapter) and in native tests ([`MemoryStore`]).
//!
//! Host semantics (Envoy's, which our bundled proxy copies): every write bumps the key's `cas`; a write that carries a
//! non-zero `cas` fails with a mismatch if the key changed since it was read; `cas = 0` writes unconditionally. Keys have
//! no expiry, so every key family here is bounded (per endpoint, or a fixed slot count).

/// Key names. One prefix, so the keys of this filter never meet another filter's in the same VM id.
pub mod keys {
    /// The published table (JSON), and its publish sequence (u64 LE) that workers poll cheaply.
    pub const TABLE: &str = "equilibrio/table";
    pub const TABLE_SEQ: &str = "equilibrio/table_seq";
    /// Current passive-health ejections (JSON).
    pub const EJECTIONS: &str = "equilibrio/ejections";
    /// Process-wide counters flushed by workers (rate limited, sticky hits...).
    pub const GLOBAL_STATS: &str = "equilibrio/stats";

    pub fn inflight(id: &str) -> String {
        format!("equilibrio/inflight/{id}")
    }
    pub fn aggregate(id: &str) -> String {
        format!("equilibrio/agg/{id}")
    }
    pub fn bucket(slot: u32) -> String {
        format!("equilibrio/rl/{slot}")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedError {
    /// The key changed since it was read.
    CasMismatch,
    /// Any other host failure.
    Host,
}

pub trait SharedStore {
    /// The value and its cas, or `None` if the key is absent (or the host failed).
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)>;
    /// Writes `value`; with `cas = Some(c)`, only if the key is still at `c`.
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SharedError>;
}

/// How many times [`update`] retries on contention before giving up.
pub const MAX_CAS_TRIES: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateError {
    /// Lost the race `MAX_CAS_TRIES` times in a row.
    Contended,
    Host,
    /// The key does not exist yet ([`update_present`] never creates one).
    Absent,
}

/// Read-modify-write with compare-and-swap. `f` gets the current bytes (None if absent) and returns the new bytes
/// (None: leave the key as it is) and a result.
///
/// Creating an absent key cannot be made atomic: the host checks no `cas` for a key it does not have, so two
/// contexts that both read "absent" both write, and the second write wins. Only keys where that costs nothing that
/// matters are created here (a rate-limit slot: one extra token, once per slot); counts go through
/// [`update_present`] on keys that one context created first ([`create`]).
pub fn update<S: SharedStore + ?Sized, T>(
    store: &S,
    key: &str,
    f: impl FnMut(Option<&[u8]>) -> (Option<Vec<u8>>, T),
) -> Result<T, UpdateError> {
    update_from(store, key, None, f)
}

/// [`update`] for a key that must already exist: an absent key is [`UpdateError::Absent`] and is left absent, so the
/// caller keeps what it wanted to add for later instead of racing another context to create the key.
pub fn update_present<S: SharedStore + ?Sized, T>(
    store: &S,
    key: &str,
    mut f: impl FnMut(&[u8]) -> (Option<Vec<u8>>, T),
) -> Result<T, UpdateError> {
    let Some(current) = store.get(key) else { return Err(UpdateError::Absent) };
    update_from(store, key, Some(Some(current)), |cur| match cur {
        Some(bytes) => {
            let (new, out) = f(bytes);
            (new, Some(out))
        }
        None => (None, None),
    })?
    .ok_or(UpdateError::Absent)
}

/// Writes `value` to `key` if the key is absent; true if the key exists afterwards. Called by the one context that
/// owns a key family (see [`update`]), before any other context updates those keys.
pub fn create<S: SharedStore + ?Sized>(store: &S, key: &str, value: &[u8]) -> bool {
    store.get(key).is_some() || store.set(key, value, None).is_ok()
}

/// [`update`] starting from a value the caller has just read (`read`: the value and its cas, `None` for absent), which
/// saves one shared read when nobody raced.
pub fn update_from<S: SharedStore + ?Sized, T>(
    store: &S,
    key: &str,
    read: Option<Option<(Vec<u8>, u32)>>,
    mut f: impl FnMut(Option<&[u8]>) -> (Option<Vec<u8>>, T),
) -> Result<T, UpdateError> {
    let mut read = read;
    for _ in 0..MAX_CAS_TRIES {
        let current = match read.take() {
            Some(current) => current,
            None => store.get(key),
        };
        let (new, out) = f(current.as_ref().map(|(v, _)| v.as_slice()));
        let Some(new) = new else { return Ok(out) };
        // An absent key has no cas to compare with; the host treats cas 0 as "no check".
        let cas = current.as_ref().map(|(_, c)| *c).filter(|c| *c != 0);
        match store.set(key, &new, cas) {
            Ok(()) => return Ok(out),
            Err(SharedError::CasMismatch) => continue,
            Err(SharedError::Host) => return Err(UpdateError::Host),
        }
    }
    Err(UpdateError::Contended)
}

/// Reads a little-endian i64 (absent or malformed: 0).
pub fn get_i64<S: SharedStore + ?Sized>(store: &S, key: &str) -> i64 {
    store.get(key).map(|(v, _)| decode_i64(&v)).unwrap_or(0)
}

pub fn decode_i64(bytes: &[u8]) -> i64 {
    bytes.get(..8).and_then(|b| b.try_into().ok()).map(i64::from_le_bytes).unwrap_or(0)
}

/// Adds `delta` to a shared i64 counter that exists ([`update_present`]); returns the new value.
pub fn add_i64<S: SharedStore + ?Sized>(store: &S, key: &str, delta: i64) -> Result<i64, UpdateError> {
    update_present(store, key, |cur| {
        let v = decode_i64(cur).saturating_add(delta);
        (Some(v.to_le_bytes().to_vec()), v)
    })
}

/// An in-memory store with the host's CAS semantics, for tests (and for a host that runs everything in one thread).
#[derive(Debug, Default)]
pub struct MemoryStore {
    map: std::cell::RefCell<std::collections::HashMap<String, (Vec<u8>, u32)>>,
    next_cas: std::cell::Cell<u32>,
    reads: std::cell::Cell<usize>,
}

impl MemoryStore {
    pub fn new() -> Self {
        MemoryStore::default()
    }
    pub fn len(&self) -> usize {
        self.map.borrow().len()
    }
    /// How many reads it has answered (what a proxy would count as host calls).
    pub fn reads(&self) -> usize {
        self.reads.get()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn keys_with_prefix(&self, prefix: &str) -> usize {
        self.map.borrow().keys().filter(|k| k.starts_with(prefix)).count()
    }
}

impl SharedStore for MemoryStore {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.reads.set(self.reads.get() + 1);
        self.map.borrow().get(key).cloned()
    }
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SharedError> {
        let mut map = self.map.borrow_mut();
        if let (Some(cas), Some((_, current))) = (cas, map.get(key))
            && cas != *current
        {
            return Err(SharedError::CasMismatch);
        }
        let next = self.next_cas.get().wrapping_add(1).max(1);
        self.next_cas.set(next);
        map.insert(key.to_string(), (value.to_vec(), next));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cas_rejects_a_stale_write() {
        let s = MemoryStore::new();
        s.set("k", b"a", None).unwrap();
        let (_, cas) = s.get("k").unwrap();
        s.set("k", b"b", None).unwrap();
        assert_eq!(s.set("k", b"c", Some(cas)), Err(SharedError::CasMismatch));
        assert_eq!(s.get("k").unwrap().0, b"b");
    }

    #[test]
    fn counters_add_up() {
        let s = MemoryStore::new();
        assert!(create(&s, "c", &0i64.to_le_bytes()));
        assert_eq!(add_i64(&s, "c", 3), Ok(3));
        assert_eq!(add_i64(&s, "c", -1), Ok(2));
        assert_eq!(get_i64(&s, "c"), 2);
        assert_eq!(get_i64(&s, "absent"), 0);
    }

    /// Two workers that both find a counter absent and both create it lose one's count (the host checks no cas on an
    /// absent key); so a counter is never created by the one adding to it.
    #[test]
    fn a_count_never_creates_its_key() {
        let s = MemoryStore::new();
        assert_eq!(add_i64(&s, "c", 1), Err(UpdateError::Absent));
        assert_eq!(update_present(&s, "c", |_| (Some(b"x".to_vec()), ())), Err(UpdateError::Absent));
        assert!(s.get("c").is_none(), "left absent");
        assert!(create(&s, "c", &5i64.to_le_bytes()));
        assert!(create(&s, "c", &0i64.to_le_bytes()), "exists");
        assert_eq!(add_i64(&s, "c", 1), Ok(6), "create leaves an existing value alone");
    }

    /// A store whose writes lose the race a given number of times, as under contention from other workers.
    struct Racy {
        inner: MemoryStore,
        losses: std::cell::Cell<usize>,
    }
    impl SharedStore for Racy {
        fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
            self.inner.get(key)
        }
        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SharedError> {
            if self.losses.get() > 0 {
                self.losses.set(self.losses.get() - 1);
                // another worker wrote in between
                let v = self.inner.get(key).map(|(v, _)| v).unwrap_or_default();
                self.inner.set(key, &v, None)?;
                return Err(SharedError::CasMismatch);
            }
            self.inner.set(key, value, cas)
        }
    }

    #[test]
    fn update_retries_then_gives_up() {
        let s = Racy { inner: MemoryStore::new(), losses: std::cell::Cell::new(3) };
        s.inner.set("k", &0i64.to_le_bytes(), None).unwrap();
        assert_eq!(add_i64(&s, "k", 1), Ok(1));
        s.losses.set(MAX_CAS_TRIES);
        assert_eq!(add_i64(&s, "k", 1), Err(UpdateError::Contended));
    }
}
