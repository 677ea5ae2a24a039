//! The state file: runtime changes (registered instances, weights, drains, policies) survive restarts and `kill -9`.
//!
//! Written atomically: a temporary file in the same directory, fsync, rename over the old one, fsync of the directory.
//! A reader sees the old file or the new one, never a torn one. A file that does not parse stops the start with a clear
//! error and is left untouched for the operator.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::registry::Registry;

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("cannot read state file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("state file {path} is corrupt ({reason}); it was left untouched: fix or move it, then start again")]
    Corrupt { path: PathBuf, reason: String },
    #[error("cannot write state file {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// The saved registry, `None` if there is no file yet.
pub fn load(path: &Path) -> Result<Option<Registry>, PersistError> {
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
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("state"),
        std::process::id()
    ));
    {
        let mut f = std::fs::File::create(&tmp).map_err(werr)?;
        f.write_all(&bytes).map_err(werr)?;
        f.sync_all().map_err(werr)?;
    }
    std::fs::rename(&tmp, path).map_err(werr)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
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
}
