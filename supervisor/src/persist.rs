//! The state file: runtime changes (registered instances, weights, drains, policies) survive restarts and `kill -9`.
//!
//! Written atomically: a temporary file in the same directory, fsync, rename over the old one, fsync of the directory.
//! A reader sees the old file or the new one, never a torn one. A file that does not parse stops the start with a clear
//! error and is left untouched for the operator. The file is readable by its owner only (mode 0600: it holds the
//! policies, sticky-session secrets included), and temporary files a crash left behind are removed at start.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::registry::Registry;
pub use crate::store::PersistError;
use crate::store::{Change, Store, StoreFuture};

/// The state file as a [`Store`]: the whole registry, written when a change has events (runtime changes users made;
/// health is learnt again after a restart).
pub struct FileStore {
    pub path: PathBuf,
}

impl Store for FileStore {
    fn commit<'a>(&'a self, change: Change<'a>) -> StoreFuture<'a, ()> {
        let result = if change.eventful { save(&self.path, change.after) } else { Ok(()) };
        Box::pin(async move { result })
    }
}

/// The saved registry, `None` if there is no file yet. Removes the temporary files of writes a crash interrupted.
pub fn load(path: &Path) -> Result<Option<Registry>, PersistError> {
    remove_leftovers(path);
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(PersistError::Read { path: path.into(), source }),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| PersistError::Corrupt { path: path.into(), reason: e.to_string() })
}

pub fn save(path: &Path, registry: &Registry) -> Result<(), PersistError> {
    let werr = |source| PersistError::Write { path: path.into(), source };
    let bytes = serde_json::to_vec_pretty(registry).map_err(|e| werr(std::io::Error::other(e)))?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(werr)?;
    let tmp = dir.join(format!("{}{}", tmp_prefix(path), std::process::id()));
    {
        let mut f = private_file(&tmp).map_err(werr)?;
        f.write_all(&bytes).map_err(werr)?;
        f.sync_all().map_err(werr)?;
    }
    std::fs::rename(&tmp, path).map_err(werr)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

fn tmp_prefix(path: &Path) -> String {
    format!(".{}.tmp-", path.file_name().and_then(|n| n.to_str()).unwrap_or("state"))
}

/// A new file only its owner can read and write.
fn private_file(path: &Path) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let f = options.open(path)?;
    // an existing temporary file keeps its old mode through `open`: set it
    #[cfg(unix)]
    f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    Ok(f)
}

/// Removes `.<name>.tmp-<pid>` files beside the state file: writes that a crash (or `kill -9`) interrupted.
fn remove_leftovers(path: &Path) {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let prefix = tmp_prefix(path);
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        if e.file_name().to_str().is_some_and(|n| n.starts_with(&prefix)) {
            match std::fs::remove_file(e.path()) {
                Ok(()) => tracing::warn!(file = %e.path().display(), "removed a state file write left by a crash"),
                Err(err) => tracing::warn!(file = %e.path().display(), error = %err, "cannot remove a crash leftover"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption_is_refused_untouched() {
        let dir = std::env::temp_dir().join(format!("eq-persist-{}", std::process::id()));
        let path = dir.join("state.json");
        assert!(load(&path).unwrap().is_none());
        let r = Registry::default();
        save(&path, &r).unwrap();
        assert_eq!(load(&path).unwrap(), Some(r));
        std::fs::write(&path, b"{half a file").unwrap();
        let e = load(&path).unwrap_err();
        assert!(e.to_string().contains("corrupt"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"{half a file");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn the_file_is_private_and_crash_leftovers_go() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("eq-persist-mode-{}", std::process::id()));
        let path = dir.join("state.json");
        save(&path, &Registry::default()).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let leftover = dir.join(".state.json.tmp-999999");
        std::fs::write(&leftover, b"{half").unwrap();
        let other = dir.join("keep.json");
        std::fs::write(&other, b"{}").unwrap();
        load(&path).unwrap();
        assert!(!leftover.exists() && other.exists());
        let _ = std::fs::remove_dir_all(dir);
    }
}
