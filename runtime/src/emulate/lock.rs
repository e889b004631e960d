//! The host-wide lock that serializes emulated compute.

use anyhow::{Context, Result};
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// Environment variable that overrides [`ComputeLock::default_path`].
pub const COMPUTE_LOCK_ENV: &str = "LEGION_COMPUTE_LOCK";

/// The host-wide lock that serializes emulated compute: an exclusive advisory lock
/// (`flock`) on a file, plus a mutex for callers sharing one `ComputeLock` in a process.
///
/// A file lock belongs to an open file description, so every `ComputeLock` opens the
/// file itself: two locks on the same path exclude each other whether they live in two
/// processes or in one.
#[derive(Debug)]
pub struct ComputeLock {
    path: PathBuf,
    file: File,
    local: Mutex<()>,
}

/// Holds a [`ComputeLock`] until dropped.
#[must_use = "the lock is released when the guard is dropped"]
pub struct ComputeGuard<'a> {
    file: &'a File,
    _local: MutexGuard<'a, ()>,
}

impl Drop for ComputeGuard<'_> {
    fn drop(&mut self) {
        // Closing the file would release it too; unlocking here frees it for the next
        // holder now. The mutex is released after this body, when the fields drop.
        if let Err(e) = self.file.unlock() {
            tracing::warn!("releasing the emulated-compute lock: {e}");
        }
    }
}

impl ComputeLock {
    /// `$LEGION_COMPUTE_LOCK` if set, else `legion-emulated-compute.lock` in the
    /// system's temporary directory.
    pub fn default_path() -> PathBuf {
        std::env::var_os(COMPUTE_LOCK_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| std::env::temp_dir().join("legion-emulated-compute.lock"))
    }

    /// Opens (creating it if needed) the lock file at `path`; does not lock it.
    pub fn open(path: impl AsRef<Path>) -> Result<ComputeLock> {
        let path = path.as_ref().to_path_buf();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| {
                format!(
                    "opening the emulated-compute lock {} (set {COMPUTE_LOCK_ENV} to move it)",
                    path.display()
                )
            })?;
        Ok(ComputeLock {
            path,
            file,
            local: Mutex::new(()),
        })
    }

    /// The lock file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Blocks until this process's thread holds the lock exclusively; released when the
    /// guard drops.
    pub fn hold(&self) -> Result<ComputeGuard<'_>> {
        // The mutex guards no data, so a panic while holding it leaves nothing broken.
        let local = self.local.lock().unwrap_or_else(|e| e.into_inner());
        self.file.lock().with_context(|| {
            format!("locking the emulated-compute lock {}", self.path.display())
        })?;
        Ok(ComputeGuard {
            file: &self.file,
            _local: local,
        })
    }
}
