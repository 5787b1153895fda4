//! `apply` and `clear`: the index's only writes, each one transaction on the write connection.
//!
//! Idempotency: an update is applied only when its `version_id` is newer than the version held in
//! `resources` for (tenant, type, id) — live or tombstone — so redelivered and reordered updates
//! change nothing. The watermark moves to the highest sequence of the batch (never backwards) in
//! the same transaction.

use fhirmesh_core::ports::IndexUpdate;
use fhirmesh_fhir::search::IndexValue;
use fhirmesh_fhir::search::values::normalize_string;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use crate::error::Result;
use crate::rows::{to_i64, to_micros, to_u64};
use crate::search::schema::{NO_LAST_UPDATED_ASC, NO_LAST_UPDATED_DESC, VALUE_TABLES, component_param};

/// The key every value row of one resource shares.
struct Key<'a> {
    tenant: &'a str,
    resource_type: &'a str,
    id: &'a str,
}

/// Applies a batch in one transaction (`BEGIN IMMEDIATE` … `COMMIT`).
pub(crate) fn apply(conn: &mut Connection, updates: &[IndexUpdate]) -> Result<()> {
    if updates.is_empty() {
        return Ok(());
    }
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut highest = 0_i64;
    for update in updates {
        highest = highest.max(to_i64(update.sequence, "sequence")?);
        apply_one(&tx, update)?;
    }
    tx.prepare_cached("UPDATE meta SET value = MAX(value, ?1) WHERE key = 'watermark'")?.execute(params![highest])?;
    tx.commit()?;
    Ok(())
}

fn apply_one(conn: &Connection, update: &IndexUpdate) -> Result<()> {
    let key =
        Key { tenant: update.tenant.as_str(), resource_type: update.resource_type.as_str(), id: update.id.as_str() };
    let held: Option<i64> = conn
        .prepare_cached("SELECT version_id FROM resources WHERE tenant = ?1 AND type = ?2 AND id = ?3")?
        .query_row(params![key.tenant, key.resource_type, key.id], |row| row.get(0))
        .optional()?;
    if let Some(held) = held
        && to_u64(held, "version_id")? >= update.version_id
    {
        tracing::trace!(version_id = update.version_id, held, "search index update not newer: skipped");
        return Ok(());
    }
    if held.is_some() {
        for table in VALUE_TABLES {
            conn.prepare_cached(&format!("DELETE FROM {table} WHERE tenant = ?1 AND type = ?2 AND id = ?3"))?
                .execute(params![key.tenant, key.resource_type, key.id])?;
        }
    }
    let entries = update.entries.as_deref().unwrap_or_default();
    let (mut lu_asc, mut lu_desc) = (NO_LAST_UPDATED_ASC, NO_LAST_UPDATED_DESC);
    for entry in entries.iter().filter(|e| e.param == "_lastUpdated") {
        if let IndexValue::Date { start, end } = &entry.value {
            lu_asc = lu_asc.min(to_micros(*start)?);
            lu_desc = lu_desc.max(to_micros(*end)?);
        }
    }
    conn.prepare_cached(
        "INSERT INTO resources (tenant, type, id, version_id, sequence, last_updated, deleted, lu_asc, lu_desc) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) \
         ON CONFLICT (tenant, type, id) DO UPDATE SET version_id = excluded.version_id, \
         sequence = excluded.sequence, last_updated = excluded.last_updated, deleted = excluded.deleted, \
         lu_asc = excluded.lu_asc, lu_desc = excluded.lu_desc",
    )?
    .execute(params![
        key.tenant,
        key.resource_type,
        key.id,
        to_i64(update.version_id, "version_id")?,
        to_i64(update.sequence, "sequence")?,
        to_micros(update.last_updated)?,
        update.entries.is_none(),
        lu_asc,
        lu_desc,
    ])?;
    if update.entries.is_none() {
        return Ok(());
    }
    for (ord, entry) in entries.iter().enumerate() {
        let ord = ord as i64;
        if let IndexValue::Composite(components) = &entry.value {
            conn.prepare_cached(
                "INSERT INTO composite_values (tenant, type, id, param, ord, components) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                key.tenant,
                key.resource_type,
                key.id,
                entry.param,
                ord,
                components.len() as i64
            ])?;
            for (index, component) in components.iter().enumerate() {
                if matches!(component, IndexValue::Composite(_)) {
                    tracing::warn!(param = %entry.param, "nested composite component not indexed");
                    continue;
                }
                insert_value(conn, &key, &component_param(&entry.param, index), ord, component)?;
            }
        } else {
            insert_value(conn, &key, &entry.param, ord, &entry.value)?;
        }
    }
    if !entries.iter().any(|e| e.param == "_id") {
        // Every resource is searchable by its id: an implicit `_id` token (no system).
        let implicit = IndexValue::Token { system: None, code: Some(key.id.to_owned()), text: None };
        insert_value(conn, &key, "_id", entries.len() as i64, &implicit)?;
    }
    Ok(())
}

/// Inserts one non-composite value row. NaN numbers are not stored (SQLite would store NULL and
/// no comparison can match them anyway).
fn insert_value(conn: &Connection, key: &Key<'_>, param: &str, ord: i64, value: &IndexValue) -> Result<()> {
    let k = (key.tenant, key.resource_type, key.id, param, ord);
    match value {
        IndexValue::String { normalized, exact } => {
            conn.prepare_cached(
                "INSERT INTO string_values (tenant, type, id, param, ord, normalized, exact) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![k.0, k.1, k.2, k.3, k.4, normalized, exact])?;
        }
        IndexValue::Token { system, code, text } => {
            let text_norm = text.as_deref().map(normalize_string);
            conn.prepare_cached(
                "INSERT INTO token_values (tenant, type, id, param, ord, system, code, text, text_norm) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?
            .execute(params![k.0, k.1, k.2, k.3, k.4, system, code, text, text_norm])?;
        }
        IndexValue::Reference { target_type, id, url, version, identifier } => {
            let (ident_system, ident_value) = match identifier {
                Some((system, value)) => (system.as_deref(), Some(value.as_str())),
                None => (None, None),
            };
            conn.prepare_cached(
                "INSERT INTO reference_values (tenant, type, id, param, ord, target_type, target_id, url, \
                 version, ident_system, ident_value) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            )?
            .execute(params![
                k.0,
                k.1,
                k.2,
                k.3,
                k.4,
                target_type.map(|t| t.as_str()),
                id,
                url,
                version,
                ident_system,
                ident_value
            ])?;
        }
        IndexValue::Date { start, end } => {
            conn.prepare_cached(
                "INSERT INTO date_values (tenant, type, id, param, ord, start_us, end_us) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![k.0, k.1, k.2, k.3, k.4, to_micros(*start)?, to_micros(*end)?])?;
        }
        IndexValue::Number { value, low, high } => {
            if value.is_nan() || low.is_nan() || high.is_nan() {
                return Ok(());
            }
            conn.prepare_cached(
                "INSERT INTO number_values (tenant, type, id, param, ord, value, low, high) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?
            .execute(params![k.0, k.1, k.2, k.3, k.4, value, low, high])?;
        }
        IndexValue::Quantity { value, system, code, unit, canonical, .. } => {
            if value.is_nan() {
                return Ok(());
            }
            let (canonical_value, canonical_code) = match canonical {
                Some((value, code)) if !value.is_nan() => (Some(*value), Some(code.as_str())),
                _ => (None, None),
            };
            conn.prepare_cached(
                "INSERT INTO quantity_values (tenant, type, id, param, ord, value, system, code, unit, \
                 canonical_value, canonical_code) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            )?
            .execute(params![
                k.0,
                k.1,
                k.2,
                k.3,
                k.4,
                value,
                system,
                code,
                unit,
                canonical_value,
                canonical_code
            ])?;
        }
        IndexValue::Uri(value) => {
            conn.prepare_cached(
                "INSERT INTO uri_values (tenant, type, id, param, ord, value) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![k.0, k.1, k.2, k.3, k.4, value])?;
        }
        IndexValue::Composite(_) => {}
    }
    Ok(())
}

/// Removes every row and resets the watermark to 0, in one transaction.
pub(crate) fn clear(conn: &mut Connection) -> Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    for table in VALUE_TABLES {
        tx.execute_batch(&format!("DELETE FROM {table}"))?;
    }
    tx.execute_batch("DELETE FROM resources; UPDATE meta SET value = 0 WHERE key = 'watermark';")?;
    tx.commit()?;
    Ok(())
}

/// The stored watermark.
pub(crate) fn watermark(conn: &Connection) -> Result<u64> {
    let value: i64 =
        conn.prepare_cached("SELECT value FROM meta WHERE key = 'watermark'")?.query_row([], |row| row.get(0))?;
    to_u64(value, "watermark")
}
