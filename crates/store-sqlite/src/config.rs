//! Configuration of the SQLite store.

use std::path::PathBuf;
use std::time::Duration;

/// How long a connection waits on a lock held by another connection before giving up with
/// `SQLITE_BUSY` (mapped to `StoreError::Unavailable`).
pub(crate) const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The most requests the writer folds into one transaction, so that one group's latency stays
/// bounded under a flood of writers.
pub(crate) const MAX_GROUP_REQUESTS: usize = 256;

/// Where the database lives and how it is opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqliteConfig {
    /// The database file (created with its schema if missing; `-wal` and `-shm` files sit beside it).
    pub path: PathBuf,
    /// Size of the read-only connection pool (default 4; at least 1 is used).
    pub read_connections: usize,
    /// `synchronous=FULL` (default): every acknowledged commit has been fsynced and survives a crash
    /// or power loss. `false` uses `synchronous=NORMAL`: still crash-safe against a process kill,
    /// but the last commits may be lost on power failure.
    pub synchronous_full: bool,
}

impl SqliteConfig {
    pub const DEFAULT_READ_CONNECTIONS: usize = 4;

    /// The defaults for a database at `path`: 4 read connections, durable (`FULL`) commits.
    pub fn new(path: impl Into<PathBuf>) -> SqliteConfig {
        SqliteConfig { path: path.into(), read_connections: Self::DEFAULT_READ_CONNECTIONS, synchronous_full: true }
    }
}
