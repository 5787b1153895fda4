//! The embedded search index: [`SearchIndex`] on its own SQLite file.
//!
//! What it is: a `resources` table (the version each resource is indexed at, deletes kept as
//! tombstones) and one table per value kind, every key starting with the tenant; a watermark in
//! `meta`, moved in the same transaction as the rows. Writes (`apply`, `clear`) run on tokio's
//! blocking pool on the one write connection, behind a mutex; searches compile the
//! [`SearchQuery`] to one SQL statement per page (plus a `COUNT(*)` for a total) and run on the
//! store's read-only connection pool. Paging is keyset paging with opaque cursors.
//! See `search-design.md` beside this crate.
//!
//! What it is not: it holds keys and versions, not resources (the store serves those), and it
//! does not evaluate `_include`/`_revinclude`, `_summary` or `_elements`.

mod compile;
mod config;
mod cursor;
mod schema;
mod write;

#[cfg(test)]
mod oracle_tests;
#[cfg(test)]
mod tests;

use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use fhirmesh_core::model::TenantId;
use fhirmesh_core::ports::{IndexError, IndexHit, IndexPage, IndexUpdate, SearchIndex, StoreError};
use fhirmesh_fhir::search::query::SortKey;
use fhirmesh_fhir::search::{ParamType, SearchQuery};
use fhirmesh_fhir::{LogicalId, ResourceType};
use rusqlite::types::Value;
use rusqlite::{Connection, params_from_iter};
use time::OffsetDateTime;

use self::compile::CompiledPage;
pub use self::config::SqliteSearchConfig;
use self::cursor::{Cursor, Direction};
use crate::error::{Error, Result};
use crate::read_pool::ReadPool;

/// The SQLite-backed [`SearchIndex`]. Cheap to clone (clones share the write connection and the
/// read pool).
#[derive(Clone)]
pub struct SqliteSearchIndex {
    inner: Arc<Inner>,
}

struct Inner {
    writer: Arc<Mutex<Connection>>,
    readers: Arc<ReadPool>,
}

impl std::fmt::Debug for SqliteSearchIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteSearchIndex").finish_non_exhaustive()
    }
}

fn index_error(err: StoreError) -> IndexError {
    match err {
        StoreError::Unavailable(message) => IndexError::Unavailable(message),
        other => IndexError::Internal(other.to_string()),
    }
}

impl SqliteSearchIndex {
    /// Opens the index at `config.path`, creating the file and its schema if missing. Blocking:
    /// call it once at start-up.
    pub fn open(config: SqliteSearchConfig) -> Result<SqliteSearchIndex, IndexError> {
        let conn = schema::open_writer(&config.path, config.synchronous_full)
            .map_err(|err| index_error(StoreError::from(err)))?;
        let readers = ReadPool::open(config.path.clone(), config.read_connections)
            .map_err(|err| index_error(StoreError::from(err)))?;
        tracing::info!(
            read_connections = config.read_connections.max(1),
            synchronous_full = config.synchronous_full,
            "sqlite search index opened"
        );
        Ok(SqliteSearchIndex {
            inner: Arc::new(Inner { writer: Arc::new(Mutex::new(conn)), readers: Arc::new(readers) }),
        })
    }

    /// Runs `write` on the write connection on the blocking pool.
    async fn write<F>(&self, write: F) -> Result<(), IndexError>
    where
        F: FnOnce(&mut Connection) -> Result<()> + Send + 'static,
    {
        let writer = Arc::clone(&self.inner.writer);
        let task = tokio::task::spawn_blocking(move || {
            let mut conn = writer.lock().unwrap_or_else(PoisonError::into_inner);
            let result = write(&mut conn);
            if result.is_err() && !conn.is_autocommit() {
                // A failed statement inside the transaction: make sure it is gone.
                let _ = conn.execute_batch("ROLLBACK");
            }
            result
        });
        let result =
            task.await.map_err(|err| IndexError::Internal(format!("sqlite index write task failed: {err}")))?;
        result.map_err(|err| index_error(StoreError::from(err)))
    }

    async fn read<T, F>(&self, query: F) -> Result<T, IndexError>
    where
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        self.inner.readers.run(query).await.map_err(index_error)
    }

    /// [`SearchIndex::search`] with `now` given (it anchors the `ap` prefix on dates).
    pub(crate) async fn search_at(
        &self,
        tenant: &TenantId,
        query: &SearchQuery,
        cursor: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<IndexPage, IndexError> {
        let cursor = cursor.map(|text| check_cursor(tenant, query, text)).transpose()?;
        let fingerprint = query.fingerprint(tenant.as_str());
        let mut compiled = compile::compile(tenant, query, cursor.as_ref(), now)?;
        let count = query.count;
        if count == 0 && compiled.count.is_none() {
            let watermark = self.read(write::watermark).await?;
            return Ok(IndexPage { hits: Vec::new(), total: None, next: None, previous: None, watermark });
        }
        if count == 0 {
            // Only the total: skip the page statement.
            compiled.page.text = "SELECT NULL, NULL, NULL WHERE 0".to_owned();
            compiled.page.params.clear();
        }
        let sort_keys = query.sort.len();
        let reversed = compiled.reversed;
        let (mut rows, total, watermark) = self.read(move |conn| run_page(conn, &compiled, sort_keys)).await?;
        if count == 0 {
            return Ok(IndexPage { hits: Vec::new(), total, next: None, previous: None, watermark });
        }
        let more = rows.len() > count;
        rows.truncate(count);
        if reversed {
            rows.reverse();
        }
        let make = |direction: Direction, row: &Row| {
            cursor::encode(&Cursor { direction, fingerprint, keys: row.keys.clone() })
        };
        let (next, previous) = match (&cursor, rows.first(), rows.last()) {
            (_, None, _) | (_, _, None) => (None, None),
            // First page: nothing before it.
            (None, _, Some(last)) => (more.then(|| make(Direction::Next, last)), None),
            // Walking forward from a row of an earlier page: that row precedes this page.
            (Some(c), Some(first), Some(last)) if c.direction == Direction::Next => {
                (more.then(|| make(Direction::Next, last)), Some(make(Direction::Previous, first)))
            }
            // Walking backwards from a row of a later page: that row follows this page.
            (Some(_), Some(first), Some(last)) => {
                (Some(make(Direction::Next, last)), more.then(|| make(Direction::Previous, first)))
            }
        };
        Ok(IndexPage { hits: rows.into_iter().map(|row| row.hit).collect(), total, next, previous, watermark })
    }
}

/// What a cursor's sort-key value must look like for `key` (a sanity check on foreign cursors).
fn key_fits(key: &SortKey, value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Integer(_) => key.kind == ParamType::Date,
        Value::Real(_) => matches!(key.kind, ParamType::Number | ParamType::Quantity),
        Value::Text(_) => {
            matches!(key.kind, ParamType::String | ParamType::Token | ParamType::Reference | ParamType::Uri)
        }
        Value::Blob(_) => false,
    }
}

/// Decodes and checks a cursor against the query it is used with.
fn check_cursor(tenant: &TenantId, query: &SearchQuery, text: &str) -> Result<Cursor, IndexError> {
    let cursor = cursor::decode(text)?;
    if cursor.fingerprint != query.fingerprint(tenant.as_str()) {
        return Err(IndexError::InvalidCursor("the cursor belongs to another search".to_owned()));
    }
    if cursor.keys.len() != query.sort.len() + 2 {
        return Err(IndexError::InvalidCursor("wrong number of keys".to_owned()));
    }
    let (values, row) = cursor.keys.split_at(query.sort.len());
    if !query.sort.iter().zip(values).all(|(key, value)| key_fits(key, value)) {
        return Err(IndexError::InvalidCursor("sort key of the wrong type".to_owned()));
    }
    let type_ok = matches!(&row[0], Value::Text(t) if query.types.iter().any(|q| q.as_str() == t));
    let id_ok = matches!(&row[1], Value::Text(id) if LogicalId::parse(id).is_ok());
    if !type_ok || !id_ok {
        return Err(IndexError::InvalidCursor("bad row key".to_owned()));
    }
    Ok(cursor)
}

/// One fetched row: the hit and its keys (sort keys, then type and id) for cursors.
struct Row {
    hit: IndexHit,
    keys: Vec<Value>,
}

/// Runs the page (and count) statements in one read transaction, so both see one snapshot, and
/// reads that snapshot's watermark.
fn run_page(conn: &Connection, compiled: &CompiledPage, sort_keys: usize) -> Result<(Vec<Row>, Option<u64>, u64)> {
    let tx = conn.unchecked_transaction()?;
    tracing::trace!(page = %compiled.page.text, count = compiled.count.as_ref().map(|c| c.text.as_str()), "search sql");
    let mut rows = Vec::new();
    {
        let mut stmt = tx.prepare_cached(&compiled.page.text)?;
        let mut result = stmt.query(params_from_iter(compiled.page.params.iter()))?;
        while let Some(row) = result.next()? {
            let type_name: String = row.get(0)?;
            let id: String = row.get(1)?;
            let version_id: i64 = row.get(2)?;
            let resource_type = ResourceType::parse(&type_name)
                .ok_or_else(|| Error::Corrupt(format!("unknown resource type {type_name:?}")))?;
            let logical_id = LogicalId::parse(&id).map_err(|err| Error::Corrupt(format!("bad logical id: {err}")))?;
            let mut keys = Vec::with_capacity(sort_keys + 2);
            for index in 0..sort_keys {
                keys.push(row.get::<_, Value>(3 + index)?);
            }
            keys.push(Value::Text(type_name));
            keys.push(Value::Text(id));
            let version_id = crate::rows::to_u64(version_id, "version_id")?;
            rows.push(Row { hit: IndexHit { resource_type, id: logical_id, version_id }, keys });
        }
    }
    let total = match &compiled.count {
        Some(count) => {
            let total: i64 =
                tx.prepare_cached(&count.text)?.query_row(params_from_iter(count.params.iter()), |row| row.get(0))?;
            let total = crate::rows::to_u64(total, "count")?;
            // Past the cap the count stopped early: no total rather than a wrong one.
            compiled.count_cap.is_none_or(|cap| total <= cap).then_some(total)
        }
        None => None,
    };
    let watermark = write::watermark(&tx)?;
    tx.commit()?;
    Ok((rows, total, watermark))
}

#[async_trait]
impl SearchIndex for SqliteSearchIndex {
    async fn apply(&self, updates: Vec<IndexUpdate>) -> Result<(), IndexError> {
        if updates.is_empty() {
            return Ok(());
        }
        self.write(move |conn| write::apply(conn, &updates)).await
    }

    async fn search(
        &self,
        tenant: &TenantId,
        query: &SearchQuery,
        cursor: Option<&str>,
    ) -> Result<IndexPage, IndexError> {
        self.search_at(tenant, query, cursor, OffsetDateTime::now_utc()).await
    }

    async fn watermark(&self) -> Result<u64, IndexError> {
        self.read(write::watermark).await
    }

    async fn clear(&self) -> Result<(), IndexError> {
        self.write(write::clear).await
    }
}
