//! Where the registry is kept, behind one trait: the in-memory model (`registry.rs`) never knows. A file for one
//! supervisor ([`crate::persist::FileStore`]), etcd for several ([`crate::etcd::store::EtcdStore`]), or nothing
//! ([`NoStore`]: a restart starts from the configuration).
//!
//! A change is committed as the keys it touched (see [`crate::etcd::layout`]) with the registry they come from: the file
//! store writes the whole registry, etcd one transaction over those keys. Writes only the leader may make (health
//! transitions, the autoscaler's) are *fenced*: a shared store refuses them once this node's leadership is gone.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

use crate::etcd::layout::Key;
use crate::registry::Registry;

/// Why the state could not be read or kept.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("cannot read state file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("state file {path} is corrupt ({reason}); it was left untouched: fix or move it, then start again")]
    Corrupt { path: PathBuf, reason: String },
    #[error("cannot write state file {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    /// The shared store cannot be reached, or has no quorum: the change is not acknowledged (etcd may still apply a
    /// write it timed out on, when its quorum returns: read the state back before trying again).
    #[error(
        "the registry store is unavailable ({0}); the change was not acknowledged: read the state back, then retry"
    )]
    Unavailable(String),
    /// Another node changed the same keys first: the registry was brought up to date, the change can be tried again.
    #[error("another supervisor changed the same entries at the same time; nothing was changed, try again")]
    Conflict,
    /// A leader-only write from a node that no longer leads.
    #[error("this supervisor is not the leader any more; nothing was changed")]
    NotLeader,
}

/// A store's answer, later.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, PersistError>> + Send + 'a>>;

/// One change to keep.
#[derive(Debug, Clone, Copy)]
pub struct Change<'a> {
    /// The registry with the change applied.
    pub after: &'a Registry,
    /// The keys whose values the change made different.
    pub keys: &'a [Key],
    /// The change is one users see (it has events): the file store keeps only those, as before etcd existed.
    pub eventful: bool,
    /// Only the leader may make it.
    pub fenced: bool,
}

pub trait Store: Send + Sync {
    /// Keeps `change`, atomically: once this returns `Ok`, a restart (or, for a shared store, every node) sees all of
    /// it; on `Err`, none of it.
    fn commit<'a>(&'a self, change: Change<'a>) -> StoreFuture<'a, ()>;

    /// `Ok` when this node still leads, checked against the store (for actions outside it, such as a Docker call). A
    /// store of one supervisor always leads.
    fn confirm_leadership(&self) -> StoreFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    /// Passes this node's events on to the other nodes sharing the store (best effort).
    fn share_events(&self, _events: &[crate::events::Event]) {}

    /// Gives a shared store the registry it keeps current (from other nodes' changes).
    fn attach(&self, _registry: std::sync::Arc<std::sync::Mutex<Registry>>) {}

    /// Whether a restart sees what is kept (not for [`NoStore`]).
    fn is_durable(&self) -> bool {
        true
    }
}

/// No state is kept: a restart starts from the configuration.
pub struct NoStore;

impl Store for NoStore {
    fn commit<'a>(&'a self, _: Change<'a>) -> StoreFuture<'a, ()> {
        Box::pin(async { Ok(()) })
    }

    fn is_durable(&self) -> bool {
        false
    }
}
