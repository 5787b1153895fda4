//! The schema, its version, and how connections are opened. See `design.md` for the reasoning.

use std::path::Path;

use rusqlite::{Connection, OpenFlags};

use crate::config::BUSY_TIMEOUT;
use crate::error::{Error, Result};

/// The schema version this code reads and writes, kept in `PRAGMA user_version`.
pub(crate) const SCHEMA_VERSION: i64 = 3;

/// Index names the history queries name with `INDEXED BY`, so a plan change is an error, not a
/// silent table scan.
pub(crate) const TYPE_HISTORY_INDEX: &str = "resource_versions_type_history";
pub(crate) const SYSTEM_HISTORY_INDEX: &str = "resource_versions_system_history";
pub(crate) const INSTANCE_INDEX: &str = "resource_versions_instance";

/// Version 1. Every key starts with the tenant.
const SCHEMA_V1: &str = "
-- One row per version, tombstones included. The rowid is the change-log sequence, so joins from
-- the change log and from resources_current are rowid lookups and bodies live in a rowid table.
CREATE TABLE resource_versions (
    sequence     INTEGER PRIMARY KEY,
    tenant       TEXT    NOT NULL,
    type         TEXT    NOT NULL,
    id           TEXT    NOT NULL,
    version      INTEGER NOT NULL,
    last_updated INTEGER NOT NULL, -- microseconds since the Unix epoch, UTC
    operation    TEXT    NOT NULL, -- create | update | delete
    body         BLOB              -- the stamped resource JSON; NULL for a delete tombstone
);
-- The logical key: vread, instance history, the next version for `_at`.
CREATE UNIQUE INDEX resource_versions_instance ON resource_versions (tenant, type, id, version);
-- Type-level and system-level history, newest first, paged by sequence.
CREATE INDEX resource_versions_type_history ON resource_versions (tenant, type, sequence);
CREATE INDEX resource_versions_system_history ON resource_versions (tenant, sequence);

-- The current version of each resource: the O(1) read and the optimistic-concurrency check.
CREATE TABLE resources_current (
    tenant   TEXT    NOT NULL,
    type     TEXT    NOT NULL,
    id       TEXT    NOT NULL,
    version  INTEGER NOT NULL,
    sequence INTEGER NOT NULL, -- rowid of the current row in resource_versions
    deleted  INTEGER NOT NULL, -- 1 when the current version is a tombstone
    PRIMARY KEY (tenant, type, id)
) WITHOUT ROWID;

-- The change log the relay tails: one row per committed version, in commit order.
CREATE TABLE changes (
    sequence INTEGER PRIMARY KEY,
    tenant   TEXT    NOT NULL,
    type     TEXT    NOT NULL,
    id       TEXT    NOT NULL,
    version  INTEGER NOT NULL
);

-- Durable positions of change-log consumers.
CREATE TABLE checkpoints (
    consumer TEXT    PRIMARY KEY,
    sequence INTEGER NOT NULL
) WITHOUT ROWID;
";

/// Opens (creating if missing) the database and returns the single write connection, with the
/// schema in place.
pub(crate) fn open_writer(path: &Path, synchronous_full: bool) -> Result<Connection> {
    let conn = open_wal_writer(path, synchronous_full)?;
    conn.pragma_update(None, "foreign_keys", "OFF")?;
    migrate(&conn)?;
    Ok(conn)
}

/// A read-write connection in WAL mode, shared by the store's and the search index's writers and
/// the export job store.
pub(crate) fn open_wal_writer(path: &Path, synchronous_full: bool) -> Result<Connection> {
    let conn = Connection::open(path)?;
    tune(&conn)?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(Error::Corrupt(format!("could not switch to WAL mode (journal_mode is {mode})")));
    }
    // In WAL mode FULL syncs the WAL on every commit; NORMAL only at checkpoints.
    conn.pragma_update(None, "synchronous", if synchronous_full { "FULL" } else { "NORMAL" })?;
    // Writes walk the B-trees of every index they touch: keep those pages cached (the default
    // 2 MB cache spills and re-reads pages on every batch once the file outgrows it), and
    // checkpoint the WAL less often.
    conn.pragma_update(None, "cache_size", WRITER_CACHE_KIB)?;
    conn.pragma_update(None, "wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES)?;
    // Pages missing from the cache are read through the memory map rather than copied by a
    // pread each (writes still go through the WAL); in a reindex of 100k Patients the copies
    // were a third of the time.
    conn.pragma_update(None, "mmap_size", READER_MMAP_BYTES)?;
    Ok(conn)
}

/// Page cache of a write connection, in KiB (negative = KiB for SQLite). The index writer touches
/// the B-tree pages of every value table it inserts into: reindexing 78k synthetic resources took
/// 57.6 s with 32 MiB, 47.3 s with 128 MiB and 44.5 s with 256 MiB (docs/benchmarks.md). The cache
/// fills only under write load.
const WRITER_CACHE_KIB: i64 = -128 * 1024;
/// Checkpoint the WAL into the database file once it holds this many pages (16 MiB).
const WAL_AUTOCHECKPOINT_PAGES: i64 = 4096;

/// Settings every connection gets.
fn tune(conn: &Connection) -> Result<()> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.set_prepared_statement_cache_capacity(64);
    // The bundled SQLite is built with STAT4, which re-prepares a cached statement on every run
    // whose bound values could change its plan — a full SQL parse per query. Our plans do not
    // depend on values (there are no statistics tables), so ask for plan stability instead.
    conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    Ok(())
}

/// A read-only connection; in WAL mode readers see the last committed state and never block the
/// writer (nor it them).
pub(crate) fn open_reader(path: &Path) -> Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)?;
    tune(&conn)?;
    // Read pages through a memory map (no pread syscall and copy per page) and keep a modest
    // per-connection page cache; both are address space and cache, not a floor on memory use.
    conn.pragma_update(None, "mmap_size", READER_MMAP_BYTES)?;
    conn.pragma_update(None, "cache_size", READER_CACHE_KIB)?;
    Ok(conn)
}

/// Memory-map up to this much of the database file per read connection.
const READER_MMAP_BYTES: i64 = 1 << 30;
/// Page cache per read connection, in KiB (negative = KiB for SQLite).
const READER_CACHE_KIB: i64 = -8 * 1024;

/// Version 2: `changes.commit_end`, the last sequence of a multi-write commit (NULL: the change is
/// its own commit), so consumers can apply a transaction whole.
const MIGRATE_V1_TO_V2: &str = "ALTER TABLE changes ADD COLUMN commit_end INTEGER;";

/// Version 3: `changes.traceparent`, the W3C trace context of the write (NULL: none), so the
/// change's consumers continue the request's trace.
const MIGRATE_V2_TO_V3: &str = "ALTER TABLE changes ADD COLUMN traceparent TEXT;";

fn migrate(conn: &Connection) -> Result<()> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    if version == SCHEMA_VERSION {
        return Ok(());
    }
    if version > SCHEMA_VERSION {
        return Err(Error::Corrupt(format!(
            "database schema version {version} is not supported (this build reads version {SCHEMA_VERSION})"
        )));
    }
    // `BEGIN IMMEDIATE` so two processes racing to create or upgrade the schema serialise.
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let upgraded = (|| -> Result<i64> {
        let from: i64 = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
        if from == 0 {
            conn.execute_batch(SCHEMA_V1)?;
        }
        if from < 2 {
            conn.execute_batch(MIGRATE_V1_TO_V2)?;
        }
        if from < 3 {
            conn.execute_batch(MIGRATE_V2_TO_V3)?;
        }
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        Ok(from)
    })();
    match upgraded {
        Ok(from) => {
            conn.execute_batch("COMMIT")?;
            if from == 0 {
                tracing::info!(schema_version = SCHEMA_VERSION, "sqlite store schema created");
            } else {
                tracing::info!(from, to = SCHEMA_VERSION, "sqlite store schema upgraded");
            }
            Ok(())
        }
        Err(err) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(err)
        }
    }
}
