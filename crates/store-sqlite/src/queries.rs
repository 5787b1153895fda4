//! The read queries, each one SQL statement (so one consistent WAL snapshot) on a read connection.

use fhirmesh_core::model::{ResourceVersion, TenantId};
use fhirmesh_core::ports::{ChangeRecord, HistoryQuery, HistoryScope};
use fhirmesh_fhir::{LogicalId, ResourceType};
use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension, params, params_from_iter};

use crate::error::Result;
use crate::rows::{VERSION_COLUMNS, saturating_i64, tenant_from_row, to_micros, to_u64, version_from_row};
use crate::schema::{INSTANCE_INDEX, SYSTEM_HISTORY_INDEX, TYPE_HISTORY_INDEX};

/// The current version: a primary-key seek in `resources_current`, then a rowid lookup.
pub(crate) fn read_current(
    conn: &Connection,
    tenant: &TenantId,
    resource_type: ResourceType,
    id: &LogicalId,
) -> Result<Option<ResourceVersion>> {
    let sql = format!(
        "SELECT {VERSION_COLUMNS} FROM resources_current c \
         JOIN resource_versions v ON v.sequence = c.sequence \
         WHERE c.tenant = ?1 AND c.type = ?2 AND c.id = ?3"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let mut rows = stmt.query(params![tenant.as_str(), resource_type.as_str(), id.as_str()])?;
    rows.next()?.map(|row| version_from_row(row, 0)).transpose()
}

/// One version, by its logical key (a unique-index seek).
pub(crate) fn read_version(
    conn: &Connection,
    tenant: &TenantId,
    resource_type: ResourceType,
    id: &LogicalId,
    version_id: u64,
) -> Result<Option<ResourceVersion>> {
    let Ok(version) = i64::try_from(version_id) else {
        return Ok(None);
    };
    let sql = format!(
        "SELECT {VERSION_COLUMNS} FROM resource_versions v \
         WHERE v.tenant = ?1 AND v.type = ?2 AND v.id = ?3 AND v.version = ?4"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let mut rows = stmt.query(params![tenant.as_str(), resource_type.as_str(), id.as_str(), version])?;
    rows.next()?.map(|row| version_from_row(row, 0)).transpose()
}

/// The SQL and parameters of a history page. Each scope walks one index backwards, named with
/// `INDEXED BY` so SQLite can never fall back to a scan and sort:
/// system → `(tenant, sequence)`, type → `(tenant, type, sequence)`, instance →
/// `(tenant, type, id, version)` (within one resource, version order is sequence order: the writer
/// only accepts increasing versions). `since`, `at` and the cursor are filters on that walk; `at`
/// looks up each candidate's successor with one more seek on the instance index.
pub(crate) fn history_sql(tenant: &TenantId, query: &HistoryQuery) -> Result<(String, Vec<Value>)> {
    let mut params = vec![Value::Text(tenant.as_str().to_owned())];
    let (index, scope_filter, order) = match &query.scope {
        HistoryScope::System => (SYSTEM_HISTORY_INDEX, "", "v.sequence DESC"),
        HistoryScope::Type(resource_type) => {
            params.push(Value::Text(resource_type.as_str().to_owned()));
            (TYPE_HISTORY_INDEX, " AND v.type = ?", "v.sequence DESC")
        }
        HistoryScope::Instance(resource_type, id) => {
            params.push(Value::Text(resource_type.as_str().to_owned()));
            params.push(Value::Text(id.as_str().to_owned()));
            (INSTANCE_INDEX, " AND v.type = ? AND v.id = ?", "v.version DESC")
        }
    };
    let mut sql = format!(
        "SELECT {VERSION_COLUMNS} FROM resource_versions v INDEXED BY {index} \
         WHERE v.tenant = ?{scope_filter}"
    );
    if let Some(since) = query.since {
        sql.push_str(" AND v.last_updated >= ?");
        params.push(Value::Integer(to_micros(since)?));
    }
    if let Some(before) = query.before_sequence {
        sql.push_str(" AND v.sequence < ?");
        params.push(Value::Integer(saturating_i64(before)));
    }
    if let Some((start, end)) = query.at {
        // Current at some point in [start, end): it began before `end`, and its successor (if
        // any) began after `start`.
        sql.push_str(&format!(
            " AND v.last_updated < ? AND COALESCE((SELECT n.last_updated FROM resource_versions n \
             INDEXED BY {INSTANCE_INDEX} WHERE n.tenant = v.tenant AND n.type = v.type \
             AND n.id = v.id AND n.version > v.version ORDER BY n.version LIMIT 1), {}) > ?",
            i64::MAX
        ));
        params.push(Value::Integer(to_micros(end)?));
        params.push(Value::Integer(to_micros(start)?));
    }
    sql.push_str(&format!(" ORDER BY {order} LIMIT ?"));
    params.push(Value::Integer(saturating_i64(query.limit as u64)));
    Ok((sql, params))
}

pub(crate) fn history(conn: &Connection, tenant: &TenantId, query: &HistoryQuery) -> Result<Vec<ResourceVersion>> {
    if query.limit == 0 {
        return Ok(Vec::new());
    }
    let (sql, params) = history_sql(tenant, query)?;
    let mut stmt = conn.prepare_cached(&sql)?;
    let mut rows = stmt.query(params_from_iter(params))?;
    let mut page = Vec::new();
    while let Some(row) = rows.next()? {
        page.push(version_from_row(row, 0)?);
    }
    Ok(page)
}

/// Up to `limit` changes after `after`, in sequence order, with their full versions.
pub(crate) fn changes_after(conn: &Connection, after: u64, limit: usize) -> Result<Vec<ChangeRecord>> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    let Ok(after) = i64::try_from(after) else {
        return Ok(Vec::new());
    };
    let sql = format!(
        "SELECT c.tenant, c.commit_end, c.traceparent, {VERSION_COLUMNS} FROM changes c \
         JOIN resource_versions v ON v.sequence = c.sequence \
         WHERE c.sequence > ?1 ORDER BY c.sequence LIMIT ?2"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let mut rows = stmt.query(params![after, saturating_i64(limit as u64)])?;
    let mut changes = Vec::new();
    while let Some(row) = rows.next()? {
        let version = version_from_row(row, 3)?;
        let commit_end = row.get::<_, Option<i64>>(1)?.map(|end| to_u64(end, "commit_end")).transpose()?;
        let commit_end = commit_end.unwrap_or(version.sequence).max(version.sequence);
        let traceparent = row.get::<_, Option<String>>(2)?;
        changes.push(ChangeRecord { tenant: tenant_from_row(row, 0)?, version, commit_end, traceparent });
    }
    Ok(changes)
}

pub(crate) fn checkpoint(conn: &Connection, consumer: &str) -> Result<u64> {
    let sequence: Option<i64> = conn
        .prepare_cached("SELECT sequence FROM checkpoints WHERE consumer = ?1")?
        .query_row(params![consumer], |row| row.get(0))
        .optional()?;
    to_u64(sequence.unwrap_or(0), "checkpoint")
}

/// The most resources one [`snapshot_page`] returns.
pub(crate) const MAX_SNAPSHOT_PAGE: usize = 10_000;

/// The SQL of [`snapshot_page`]: walk `resources_current` by primary key from `(tenant, type, id >
/// after)` in id order; for each resource pick the sequence of the version current at `as_of` —
/// the current row's own when it is not newer than `as_of` (the common case, no extra read),
/// otherwise the newest version at or before `as_of`, found walking the resource's entries of the
/// unique `(tenant, type, id, version)` index backwards (it covers `sequence`, the rowid); then a
/// rowid lookup of that version. No such version (created after `as_of`) makes the join miss;
/// a tombstone (NULL body) is filtered out, as is anything not updated after `since` (`?5`, NULL
/// for none).
pub(crate) fn snapshot_sql() -> String {
    format!(
        "SELECT {VERSION_COLUMNS} FROM resources_current c \
         JOIN resource_versions v ON v.sequence = CASE WHEN c.sequence <= ?3 THEN c.sequence ELSE \
         (SELECT w.sequence FROM resource_versions w INDEXED BY {INSTANCE_INDEX} \
         WHERE w.tenant = c.tenant AND w.type = c.type AND w.id = c.id AND w.sequence <= ?3 \
         ORDER BY w.version DESC LIMIT 1) END \
         WHERE c.tenant = ?1 AND c.type = ?2 AND c.id > ?4 \
         AND v.body IS NOT NULL AND (?5 IS NULL OR v.last_updated > ?5) \
         ORDER BY c.id LIMIT ?6"
    )
}

/// Up to `limit` (clamped to `1..=MAX_SNAPSHOT_PAGE`) resources of one type, each in its version
/// current at change sequence `as_of`, live ones only, last updated after `since`, with ids after
/// `after`, in id (byte) order.
///
/// Stable across calls however much is written meanwhile, provided `as_of` had been committed
/// when the snapshot was taken: versions up to `as_of` are never rewritten or removed, and every
/// resource that has one keeps its `resources_current` row (deletes are tombstones), so the answer
/// depends only on rows that no longer change.
pub(crate) fn snapshot_page(
    conn: &Connection,
    tenant: &TenantId,
    resource_type: ResourceType,
    as_of: u64,
    since: Option<time::OffsetDateTime>,
    after: Option<&LogicalId>,
    limit: usize,
) -> Result<Vec<ResourceVersion>> {
    let limit = limit.clamp(1, MAX_SNAPSHOT_PAGE);
    let since = since.map(to_micros).transpose()?;
    // Logical ids are never empty, so "" is below all of them.
    let after = after.map_or("", LogicalId::as_str);
    let mut stmt = conn.prepare_cached(&snapshot_sql())?;
    let mut rows = stmt.query(params![
        tenant.as_str(),
        resource_type.as_str(),
        saturating_i64(as_of),
        after,
        since,
        saturating_i64(limit as u64),
    ])?;
    let mut page = Vec::new();
    while let Some(row) = rows.next()? {
        page.push(version_from_row(row, 0)?);
    }
    Ok(page)
}
