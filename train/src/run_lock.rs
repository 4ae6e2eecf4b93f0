//! One process at a time per run directory: a trainer holds an advisory lock on `RUN/.lock` for
//! as long as it lives, so a second trainer on the same `--out` is refused instead of
//! interleaving its log lines and checkpoints with the first's. The operating system releases
//! the lock when the holder exits, however it exits (a crash or SIGKILL included), so no stale
//! lock is ever left to clear by hand.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The lock file's name in a run directory.
pub const LOCK_FILE: &str = ".lock";

/// How long a taken lock is retried before the directory counts as in use. A lock belongs to
/// the open file, which a child forked by any thread shares until it executes its program:
/// a lock just let go can look held for that moment (another thread starting a process).
const PATIENCE: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "{0} is in use by another training process (it holds {0}/.lock); wait for it to end or \
         choose another directory"
    )]
    Busy(PathBuf),
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
}

/// The held lock of a run directory; dropping it (or the process ending) releases it.
#[derive(Debug)]
pub struct RunLock {
    _file: File,
}

impl RunLock {
    /// Takes the lock of the run directory `dir` (which must exist), or says who holds it.
    pub fn acquire(dir: &Path) -> Result<Self, LockError> {
        let path = dir.join(LOCK_FILE);
        let io = |error| LockError::Io {
            path: path.clone(),
            error,
        };
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io)?;
        let started = Instant::now();
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(Self { _file: file }),
                Err(TryLockError::WouldBlock) if started.elapsed() < PATIENCE => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(TryLockError::WouldBlock) => return Err(LockError::Busy(dir.to_path_buf())),
                Err(TryLockError::Error(error)) => return Err(io(error)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let first = RunLock::acquire(dir.path()).unwrap();
        let err = RunLock::acquire(dir.path()).unwrap_err();
        assert!(matches!(err, LockError::Busy(_)), "{err}");
        drop(first);
        RunLock::acquire(dir.path()).unwrap();
    }
}
