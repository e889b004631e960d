//! The host-wide lock that serializes emulated compute.

use anyhow::{Context, Result};
use std::fs::{File, OpenOptions, TryLockError};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// Environment variable that overrides [`ComputeLock::default_path`].
pub const COMPUTE_LOCK_ENV: &str = "LEGION_COMPUTE_LOCK";

/// The host-wide lock that serializes emulated compute: an exclusive advisory lock
/// (`flock`) on a file, plus a mutex for callers sharing one `ComputeLock` in a process.
///
/// A file lock belongs to an open file description, so every `ComputeLock` opens the
/// file itself: two locks on the same path exclude each other whether they live in two
/// processes or in one.
///
/// The holder writes its process id into the file. A worker stopped (SIGSTOP) while it
/// holds the lock computes nothing, and a real board's stop does not stop the others;
/// so a caller waiting on a stopped holder goes ahead without the lock.
#[derive(Debug)]
pub struct ComputeLock {
    path: PathBuf,
    file: File,
    local: Mutex<()>,
}

/// Holds a [`ComputeLock`] until dropped.
#[must_use = "the lock is released when the guard is dropped"]
pub struct ComputeGuard<'a> {
    /// The locked file; `None` when the holder was stopped and the caller went ahead.
    file: Option<&'a File>,
    _local: MutexGuard<'a, ()>,
}

/// How often a caller waiting for the lock looks again, and whether its holder stopped.
const RETRY: Duration = Duration::from_micros(200);

impl Drop for ComputeGuard<'_> {
    fn drop(&mut self) {
        let Some(file) = self.file else {
            return;
        };
        // Closing the file would release it too; unlocking here frees it for the next
        // holder now. The mutex is released after this body, when the fields drop.
        if let Err(e) = file.unlock() {
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

    /// Blocks until this process's thread holds the lock exclusively (or its holder is
    /// a stopped process); released when the guard drops.
    pub fn hold(&self) -> Result<ComputeGuard<'_>> {
        // The mutex guards no data, so a panic while holding it leaves nothing broken.
        let local = self.local.lock().unwrap_or_else(|e| e.into_inner());
        let context = || format!("locking the emulated-compute lock {}", self.path.display());
        loop {
            match self.file.try_lock() {
                Ok(()) => break,
                Err(TryLockError::WouldBlock) if self.holder_stopped() => {
                    return Ok(ComputeGuard {
                        file: None,
                        _local: local,
                    });
                }
                Err(TryLockError::WouldBlock) => std::thread::sleep(RETRY),
                Err(TryLockError::Error(e)) => return Err(e).with_context(context),
            }
        }
        let pid = format!("{:<20}", std::process::id());
        self.file
            .write_at(pid.as_bytes(), 0)
            .with_context(context)?;
        Ok(ComputeGuard {
            file: Some(&self.file),
            _local: local,
        })
    }

    /// Whether the process that wrote its id into the file last is stopped.
    fn holder_stopped(&self) -> bool {
        let mut id = [0u8; 20];
        let Ok(n) = self.file.read_at(&mut id, 0) else {
            return false;
        };
        let Some(pid) = std::str::from_utf8(&id[..n])
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
        else {
            return false;
        };
        process_stopped(pid)
    }
}

/// Whether process `pid` is stopped by a signal or traced (state `T` or `t` in
/// `/proc/PID/stat`); false when it cannot be read.
fn process_stopped(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which is in parentheses and may hold spaces.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .is_some_and(|state| state == "T" || state == "t")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use std::sync::mpsc;
    use std::time::Instant;

    fn signal(pid: u32, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Another process holds the lock (flock(1) keeps it while `sleep` runs, and its
    /// id is written as a worker writes its own): a caller waits while it runs, and goes
    /// ahead without the lock once it is stopped.
    #[test]
    fn a_stopped_holder_does_not_hold_others_up() {
        let path = std::env::temp_dir().join(format!(
            "legion-lock-test-stopped-{}.lock",
            std::process::id()
        ));
        let lock = ComputeLock::open(&path).unwrap();
        let mut holder = Command::new("flock")
            .arg(&path)
            .args(["sleep", "30"])
            .spawn()
            .unwrap();
        let started = Instant::now();
        while lock.file.try_lock().is_ok() {
            lock.file.unlock().unwrap();
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "flock never locked"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let id = format!("{:<20}", holder.id());
        lock.file.write_at(id.as_bytes(), 0).unwrap();
        let waited = std::thread::scope(|scope| {
            let (done, held) = mpsc::channel();
            let lock = &lock;
            scope.spawn(move || {
                let guard = lock.hold().unwrap();
                done.send(guard.file.is_none()).unwrap();
            });
            assert!(
                held.recv_timeout(Duration::from_millis(300)).is_err(),
                "went ahead while the holder runs"
            );
            signal(holder.id(), "-STOP");
            let waited = held.recv_timeout(Duration::from_secs(5));
            signal(holder.id(), "-CONT");
            waited
        });
        holder.kill().unwrap();
        holder.wait().unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            waited,
            Ok(true),
            "went ahead without the lock once it stopped"
        );
    }
}
