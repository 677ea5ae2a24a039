//! Where the registry is kept between runs, behind one trait: the in-memory model (`registry.rs`) never knows. Today
//! a file ([`crate::persist::FileStore`]) or nothing ([`NoStore`]: `state_file` unset); a shared store for several
//! supervisors is one more implementation.

use std::path::PathBuf;

use crate::registry::Registry;

/// Why the state could not be read or kept (named after the file store, the first one).
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("cannot read state file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("state file {path} is corrupt ({reason}); it was left untouched: fix or move it, then start again")]
    Corrupt { path: PathBuf, reason: String },
    #[error("cannot write state file {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

pub trait Store: Send + Sync {
    /// The saved registry; `None` when nothing was saved yet. A store that cannot be read, or holds something that
    /// does not parse, is an error: the supervisor does not start on a state it cannot trust.
    fn load(&self) -> Result<Option<Registry>, PersistError>;

    /// Keeps `registry` as the state, atomically: once this returns `Ok`, a restart sees all of it; on `Err`, the
    /// previous state is kept whole.
    fn save(&self, registry: &Registry) -> Result<(), PersistError>;

    /// Whether a restart sees what is saved (not for [`NoStore`]).
    fn is_durable(&self) -> bool {
        true
    }
}

/// No state is kept: a restart starts from the configuration.
pub struct NoStore;

impl Store for NoStore {
    fn load(&self) -> Result<Option<Registry>, PersistError> {
        Ok(None)
    }

    fn save(&self, _: &Registry) -> Result<(), PersistError> {
        Ok(())
    }

    fn is_durable(&self) -> bool {
        false
    }
}
