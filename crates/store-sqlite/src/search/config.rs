//! Configuration of the SQLite search index.

use std::path::PathBuf;

/// Where the index database lives and how it is opened. The index is its own file (the
/// composition root uses `<data_dir>/search.db`), so a reindex can simply drop it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqliteSearchConfig {
    /// The database file (created with its schema if missing; `-wal` and `-shm` files sit beside it).
    pub path: PathBuf,
    /// Size of the read-only connection pool (default 4; at least 1 is used).
    pub read_connections: usize,
    /// `synchronous=FULL` when `true`. The default is `false` (`NORMAL`): a power loss may drop the
    /// last applied batches, but the watermark is written in the same transaction as the rows, so
    /// it rolls back with them and the indexer re-applies from there (see `search-design.md`).
    pub synchronous_full: bool,
}

impl SqliteSearchConfig {
    pub const DEFAULT_READ_CONNECTIONS: usize = 4;

    /// The defaults for an index at `path`: 4 read connections, `synchronous=NORMAL`.
    pub fn new(path: impl Into<PathBuf>) -> SqliteSearchConfig {
        SqliteSearchConfig {
            path: path.into(),
            read_connections: Self::DEFAULT_READ_CONNECTIONS,
            synchronous_full: false,
        }
    }
}
