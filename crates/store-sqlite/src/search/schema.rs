//! The index schema and how its write connection is opened. See `search-design.md`.

use std::path::Path;

use rusqlite::Connection;

use crate::error::{Error, Result};

/// Kept in `PRAGMA user_version`.
pub(crate) const SCHEMA_VERSION: i64 = 5;

/// `PRAGMA application_id` of a search-index file ("FHSX"), so the store's own database (or any
/// other SQLite file) is refused rather than silently extended.
pub(crate) const APPLICATION_ID: i64 = 0x4648_5358;

/// The value tables, in the order `apply` clears them.
pub(crate) const VALUE_TABLES: [&str; 8] = [
    "string_values",
    "token_values",
    "reference_values",
    "date_values",
    "number_values",
    "quantity_values",
    "uri_values",
    "composite_values",
];

/// The `lu_asc` / `lu_desc` value of a resource without `_lastUpdated` entries.
pub(crate) const NO_LAST_UPDATED_ASC: i64 = i64::MAX;
pub(crate) const NO_LAST_UPDATED_DESC: i64 = i64::MIN;

/// Version 5. Every key starts with the tenant. Value rows are keyed by
/// `(tenant, type, id, param, ord)` where `ord` is the entry's position in the update, so the
/// correlated lookups (sort keys, composite components) are primary-key seeks; each table has
/// secondary indexes on `(tenant, type, param, <value columns>)` for the search shapes. (Version
/// 2 put `id` before `system` in `token_values_code`, so a code lookup yields rows in id order;
/// version 3 dropped the `exact` string index — `:exact` seeks `normalized` — and made the
/// token-text and reference-identifier indexes partial, skipping the rows without a value;
/// version 4 stores the interval a number covers, for Ranges; version 5 adds `exact` to the
/// normalised string index, so `:exact` is answered from that index alone — without it SQLite's
/// planner preferred scanning every string value of the type in key order, 20× slower.)
const SCHEMA: &str = "
CREATE TABLE meta (
    key   TEXT    PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO meta (key, value) VALUES ('watermark', 0);

-- One row per indexed resource; a delete keeps the row (deleted = 1) as a tombstone carrying the
-- version, so an older redelivered update cannot resurrect the resource.
CREATE TABLE resources (
    tenant       TEXT    NOT NULL,
    type         TEXT    NOT NULL,
    id           TEXT    NOT NULL,
    version_id   INTEGER NOT NULL,
    sequence     INTEGER NOT NULL,
    last_updated INTEGER NOT NULL, -- microseconds since the Unix epoch, UTC
    deleted      INTEGER NOT NULL,
    -- `_sort=_lastUpdated` keys, denormalised from the `_lastUpdated` entries so that sort is an
    -- ordered index walk: the lowest start (ascending) and the highest end (descending), with
    -- sentinels for no value that sort last (i64::MAX ascending, i64::MIN descending).
    lu_asc       INTEGER NOT NULL,
    lu_desc      INTEGER NOT NULL,
    PRIMARY KEY (tenant, type, id)
) WITHOUT ROWID;
CREATE INDEX resources_lu_asc ON resources (tenant, type, lu_asc) WHERE deleted = 0;
CREATE INDEX resources_lu_desc ON resources (tenant, type, lu_desc) WHERE deleted = 0;

CREATE TABLE string_values (
    tenant TEXT NOT NULL, type TEXT NOT NULL, id TEXT NOT NULL, param TEXT NOT NULL, ord INTEGER NOT NULL,
    normalized TEXT NOT NULL,
    exact      TEXT NOT NULL,
    PRIMARY KEY (tenant, type, id, param, ord)
) WITHOUT ROWID;
CREATE INDEX string_values_normalized ON string_values (tenant, type, param, normalized, exact);

CREATE TABLE token_values (
    tenant TEXT NOT NULL, type TEXT NOT NULL, id TEXT NOT NULL, param TEXT NOT NULL, ord INTEGER NOT NULL,
    system    TEXT,
    code      TEXT,
    text      TEXT,
    text_norm TEXT,
    PRIMARY KEY (tenant, type, id, param, ord)
) WITHOUT ROWID;
CREATE INDEX token_values_code ON token_values (tenant, type, param, code, id, system);
CREATE INDEX token_values_text ON token_values (tenant, type, param, text_norm) WHERE text_norm IS NOT NULL;

CREATE TABLE reference_values (
    tenant TEXT NOT NULL, type TEXT NOT NULL, id TEXT NOT NULL, param TEXT NOT NULL, ord INTEGER NOT NULL,
    target_type  TEXT,
    target_id    TEXT,
    url          TEXT NOT NULL,
    version      TEXT,
    ident_system TEXT,
    ident_value  TEXT,
    PRIMARY KEY (tenant, type, id, param, ord)
) WITHOUT ROWID;
CREATE INDEX reference_values_target ON reference_values (tenant, type, param, target_id, target_type);
CREATE INDEX reference_values_url ON reference_values (tenant, type, param, url);
CREATE INDEX reference_values_identifier ON reference_values (tenant, type, param, ident_value)
    WHERE ident_value IS NOT NULL;
-- _has and reverse lookups: who points at (target_type, target_id)?
CREATE INDEX reference_values_referrer ON reference_values (tenant, target_type, target_id, param);

CREATE TABLE date_values (
    tenant TEXT NOT NULL, type TEXT NOT NULL, id TEXT NOT NULL, param TEXT NOT NULL, ord INTEGER NOT NULL,
    start_us INTEGER NOT NULL, -- [start_us, end_us), microseconds since the Unix epoch
    end_us   INTEGER NOT NULL,
    PRIMARY KEY (tenant, type, id, param, ord)
) WITHOUT ROWID;
CREATE INDEX date_values_start ON date_values (tenant, type, param, start_us, end_us);
CREATE INDEX date_values_end ON date_values (tenant, type, param, end_us);

CREATE TABLE number_values (
    tenant TEXT NOT NULL, type TEXT NOT NULL, id TEXT NOT NULL, param TEXT NOT NULL, ord INTEGER NOT NULL,
    value REAL NOT NULL, -- the sort key (a Range's midpoint)
    low   REAL NOT NULL, -- [low, high]: the interval covered, a point for a decimal
    high  REAL NOT NULL,
    PRIMARY KEY (tenant, type, id, param, ord)
) WITHOUT ROWID;
CREATE INDEX number_values_low ON number_values (tenant, type, param, low);
CREATE INDEX number_values_high ON number_values (tenant, type, param, high);

CREATE TABLE quantity_values (
    tenant TEXT NOT NULL, type TEXT NOT NULL, id TEXT NOT NULL, param TEXT NOT NULL, ord INTEGER NOT NULL,
    value           REAL NOT NULL,
    system          TEXT,
    code            TEXT,
    unit            TEXT,
    canonical_value REAL,
    canonical_code  TEXT,
    PRIMARY KEY (tenant, type, id, param, ord)
) WITHOUT ROWID;
CREATE INDEX quantity_values_value ON quantity_values (tenant, type, param, value);
CREATE INDEX quantity_values_canonical ON quantity_values (tenant, type, param, canonical_code, canonical_value);

CREATE TABLE uri_values (
    tenant TEXT NOT NULL, type TEXT NOT NULL, id TEXT NOT NULL, param TEXT NOT NULL, ord INTEGER NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (tenant, type, id, param, ord)
) WITHOUT ROWID;
CREATE INDEX uri_values_value ON uri_values (tenant, type, param, value);

-- One row per composite entry; its components live in the kind tables under the parameter
-- `<param>$<component index>` with the SAME ord, so components pair up by (resource, ord).
CREATE TABLE composite_values (
    tenant TEXT NOT NULL, type TEXT NOT NULL, id TEXT NOT NULL, param TEXT NOT NULL, ord INTEGER NOT NULL,
    components INTEGER NOT NULL, -- how many components the entry has (a search must give as many)
    PRIMARY KEY (tenant, type, id, param, ord)
) WITHOUT ROWID;
CREATE INDEX composite_values_param ON composite_values (tenant, type, param);
";

/// The parameter name under which component `index` of composite parameter `param` is stored.
pub(crate) fn component_param(param: &str, index: usize) -> String {
    format!("{param}${index}")
}

/// Opens (creating if missing) the index database and returns its write connection.
pub(crate) fn open_writer(path: &Path, synchronous_full: bool) -> Result<Connection> {
    let conn = crate::schema::open_wal_writer(path, synchronous_full)?;
    migrate(&conn)?;
    Ok(conn)
}

/// What opening found.
enum Opened {
    Current,
    Created,
    /// An index of an older schema version, dropped and recreated empty.
    Rebuilt {
        from: i64,
    },
}

fn migrate(conn: &Connection) -> Result<()> {
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let outcome = (|| -> Result<Opened> {
        let version: i64 = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
        let application_id: i64 = conn.query_row("PRAGMA application_id", [], |row| row.get(0))?;
        if version == 0 && application_id == 0 {
            let tables: i64 = conn.query_row("SELECT COUNT(*) FROM sqlite_schema", [], |row| row.get(0))?;
            if tables != 0 {
                return Err(Error::Corrupt("the file is a database but not a search index".to_owned()));
            }
            create(conn)?;
            return Ok(Opened::Created);
        }
        if application_id != APPLICATION_ID {
            return Err(Error::Corrupt("the file is a database but not a search index".to_owned()));
        }
        if version > SCHEMA_VERSION {
            return Err(Error::Corrupt(format!(
                "search index schema version {version} is newer than this build reads ({SCHEMA_VERSION})"
            )));
        }
        if version < SCHEMA_VERSION {
            // The index is derived data: start it over at watermark 0 and the indexer rebuilds it
            // from the store's change log, as after `fhirmesh reindex`.
            let tables: Vec<String> = conn
                .prepare("SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")?
                .query_map([], |row| row.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            for table in tables {
                conn.execute_batch(&format!("DROP TABLE \"{}\"", table.replace('"', "\"\"")))?;
            }
            create(conn)?;
            return Ok(Opened::Rebuilt { from: version });
        }
        Ok(Opened::Current)
    })();
    match outcome {
        Ok(opened) => {
            conn.execute_batch("COMMIT")?;
            match opened {
                Opened::Current => {}
                Opened::Created => {
                    tracing::info!(schema_version = SCHEMA_VERSION, "sqlite search index schema created")
                }
                Opened::Rebuilt { from } => {
                    // Give the dropped tables' pages back to the file system (cheap: nothing is
                    // left to copy).
                    conn.execute_batch("VACUUM")?;
                    tracing::warn!(
                        from,
                        to = SCHEMA_VERSION,
                        "sqlite search index schema changed: the index starts empty and is rebuilt from the change log"
                    );
                }
            }
            Ok(())
        }
        Err(err) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(err)
        }
    }
}

fn create(conn: &Connection) -> Result<()> {
    conn.execute_batch(SCHEMA)?;
    conn.pragma_update(None, "application_id", APPLICATION_ID)?;
    conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    Ok(())
}
