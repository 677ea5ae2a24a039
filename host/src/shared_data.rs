//! Shared data: a key-value store shared by every VM with the same `vm_id` across all threads, with Envoy's
//! compare-and-swap semantics. A value carries a CAS number that changes on every write; a write that names a CAS
//! other than the current one fails with `CasMismatch`; CAS 0 writes unconditionally.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

#[derive(Debug, PartialEq, Eq)]
pub enum SetError {
    CasMismatch,
}

/// The store of one `vm_id`.
/// A value and its CAS number, by key.
type Entries = HashMap<Vec<u8>, (Vec<u8>, u32)>;

#[derive(Default)]
pub struct Scope {
    entries: Mutex<Entries>,
}

impl Scope {
    /// The value and its CAS, handed to `f` under the lock (so the caller copies it straight into guest memory).
    pub fn with<R>(&self, key: &[u8], f: impl FnOnce(Option<(&[u8], u32)>) -> R) -> R {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        f(entries.get(key).map(|(v, cas)| (v.as_slice(), *cas)))
    }

    pub fn set(&self, key: &[u8], value: &[u8], cas: u32) -> Result<(), SetError> {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        match entries.get_mut(key) {
            Some((v, current)) => {
                if cas != 0 && cas != *current {
                    return Err(SetError::CasMismatch);
                }
                v.clear();
                v.extend_from_slice(value);
                *current = current.wrapping_add(1).max(1);
            }
            None => {
                if cas != 0 {
                    return Err(SetError::CasMismatch);
                }
                entries.insert(key.to_vec(), (value.to_vec(), 1));
            }
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// All scopes of the process, by `vm_id`.
#[derive(Default)]
pub struct SharedData {
    scopes: Mutex<HashMap<String, Arc<Scope>>>,
}

impl SharedData {
    /// The scope for `vm_id` (created on first use); VMs keep the handle so requests never look it up.
    pub fn scope(&self, vm_id: &str) -> Arc<Scope> {
        let mut scopes = self.scopes.lock().unwrap_or_else(|p| p.into_inner());
        scopes.entry(vm_id.to_string()).or_default().clone()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn get(s: &Scope, k: &[u8]) -> Option<(Vec<u8>, u32)> {
        s.with(k, |e| e.map(|(v, c)| (v.to_vec(), c)))
    }

    #[test]
    fn compare_and_swap() {
        let s = Scope::default();
        assert_eq!(get(&s, b"k"), None);
        assert_eq!(s.set(b"k", b"a", 7), Err(SetError::CasMismatch), "a CAS on a missing key fails");
        s.set(b"k", b"a", 0).unwrap();
        let (v, cas) = get(&s, b"k").unwrap();
        assert_eq!(v, b"a");
        assert_ne!(cas, 0);
        s.set(b"k", b"b", cas).unwrap();
        assert_eq!(s.set(b"k", b"c", cas), Err(SetError::CasMismatch), "a stale CAS fails");
        s.set(b"k", b"d", 0).unwrap();
        assert_eq!(get(&s, b"k").unwrap().0, b"d");
    }

    #[test]
    fn scopes_are_separate_and_shared_by_vm_id() {
        let d = SharedData::default();
        d.scope("a").set(b"k", b"1", 0).unwrap();
        assert!(d.scope("b").is_empty());
        assert_eq!(d.scope("a").len(), 1);
    }

    #[test]
    fn concurrent_increments_lose_nothing() {
        let s = Arc::new(Scope::default());
        s.set(b"n", &0u64.to_le_bytes(), 0).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for _ in 0..500 {
                        loop {
                            let (v, cas) = get(&s, b"n").unwrap();
                            let n = u64::from_le_bytes(v.try_into().unwrap());
                            if s.set(b"n", &(n + 1).to_le_bytes(), cas).is_ok() {
                                break;
                            }
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(u64::from_le_bytes(get(&s, b"n").unwrap().0.try_into().unwrap()), 2000);
    }
}
