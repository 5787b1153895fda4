//! The embedded resource store: [`ResourceStore`] and [`ChangeLog`] on one SQLite file.
//!
//! What it is: versioned resource rows (every version kept, deletes as tombstones), an O(1)
//! current-version table, a change log in commit order and consumer checkpoints, all keyed by
//! tenant first. Writes go through ONE writer thread that group-commits: concurrent commits share
//! one transaction and one fsync, each isolated in its own savepoint, and are acknowledged only
//! once durable. Reads run on tokio's blocking pool over a small pool of read-only WAL
//! connections, so they never wait for the writer. See `design.md` beside this crate for the
//! schema, the protocol and the durability argument.
//!
//! What it is not: the search index (see [`search`]), nor a multi-process store: one process owns
//! the file.
//!
//! Also here, for `$export`: the store's snapshot read ([`ExportSource`]) and the job store
//! [`SqliteJobStore`] (a separate small file).

mod config;
mod error;
mod jobs;
mod queries;
mod read_pool;
mod rows;
mod schema;
pub mod search;
mod writer;

#[cfg(test)]
mod export_tests;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use async_trait::async_trait;
use fhirmesh_core::export::{ChunkPart, ExportSource, SnapshotPage};
use fhirmesh_core::model::{ResourceVersion, TenantId};
use fhirmesh_core::ports::{
    ChangeLog, ChangeRecord, CommitReceipt, HistoryQuery, ResourceStore, StoreError, VersionWrite,
};
use fhirmesh_fhir::{LogicalId, ResourceType};
use time::OffsetDateTime;
use tokio::sync::oneshot;

pub use crate::config::SqliteConfig;
pub use crate::jobs::SqliteJobStore;
use crate::read_pool::ReadPool;
pub use crate::search::{SqliteSearchConfig, SqliteSearchIndex};
use crate::writer::{Request, Shared, WriterHandle};

/// The SQLite-backed [`ResourceStore`] and [`ChangeLog`]. Cheap to clone (all clones share one
/// writer thread and one read pool); dropping the last clone stops the writer after it has
/// finished the requests already queued.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    // Field order is drop order: the read connections close first (reads in flight keep the pool
    // alive through their own `Arc`), then the writer finishes what is queued and closes last —
    // the last connection to close checkpoints the WAL and removes it, which a read-only one cannot.
    readers: Arc<ReadPool>,
    writer: WriterHandle,
    shared: Arc<Shared>,
}

/// Counters of the writer's group commit since the store was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WriterStats {
    /// Transactions committed.
    pub groups: u64,
    /// Requests (commits and checkpoint saves, successful or not) those transactions carried.
    pub requests: u64,
}

impl WriterStats {
    /// Requests per committed transaction (0 before the first).
    pub fn average_group_size(&self) -> f64 {
        if self.groups == 0 { 0.0 } else { self.requests as f64 / self.groups as f64 }
    }
}

impl SqliteStore {
    /// Opens the database at `config.path`, creating the file and its schema if missing, and
    /// starts the writer thread. Blocking: call it once at start-up.
    pub fn open(config: SqliteConfig) -> Result<SqliteStore, StoreError> {
        let conn = schema::open_writer(&config.path, config.synchronous_full)?;
        let readers = Arc::new(ReadPool::open(config.path.clone(), config.read_connections)?);
        let shared = Arc::new(Shared::default());
        let writer = WriterHandle::start(conn, Arc::clone(&shared))?;
        tracing::info!(
            read_connections = config.read_connections.max(1),
            synchronous_full = config.synchronous_full,
            latest_sequence = shared.latest_sequence.load(Ordering::Acquire),
            "sqlite store opened"
        );
        Ok(SqliteStore { inner: Arc::new(Inner { readers, writer, shared }) })
    }

    /// Group-commit counters, e.g. for metrics or benchmarks.
    pub fn writer_stats(&self) -> WriterStats {
        WriterStats {
            groups: self.inner.shared.groups.load(Ordering::Relaxed),
            requests: self.inner.shared.requests.load(Ordering::Relaxed),
        }
    }

    async fn write<T>(
        &self,
        request: Request,
        reply: oneshot::Receiver<Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        self.inner.writer.submit(request)?;
        reply.await.map_err(|_| StoreError::Unavailable("the sqlite writer stopped before answering".to_owned()))?
    }
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("latest_sequence", &self.inner.shared.latest_sequence.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl ResourceStore for SqliteStore {
    async fn read(
        &self,
        tenant: &TenantId,
        resource_type: ResourceType,
        id: &LogicalId,
    ) -> Result<Option<ResourceVersion>, StoreError> {
        let (tenant, id) = (tenant.clone(), id.clone());
        self.inner.readers.run_point(move |conn| queries::read_current(conn, &tenant, resource_type, &id)).await
    }

    async fn read_many(
        &self,
        tenant: &TenantId,
        keys: &[(ResourceType, LogicalId)],
    ) -> Result<Vec<Option<ResourceVersion>>, StoreError> {
        let (tenant, keys) = (tenant.clone(), keys.to_vec());
        self.inner
            .readers
            .run(move |conn| keys.iter().map(|(rt, id)| queries::read_current(conn, &tenant, *rt, id)).collect())
            .await
    }

    async fn vread(
        &self,
        tenant: &TenantId,
        resource_type: ResourceType,
        id: &LogicalId,
        version_id: u64,
    ) -> Result<Option<ResourceVersion>, StoreError> {
        let (tenant, id) = (tenant.clone(), id.clone());
        self.inner
            .readers
            .run_point(move |conn| queries::read_version(conn, &tenant, resource_type, &id, version_id))
            .await
    }

    async fn commit(&self, tenant: &TenantId, writes: Vec<VersionWrite>) -> Result<CommitReceipt, StoreError> {
        if writes.is_empty() {
            return Err(StoreError::Internal("a commit needs at least one write".to_owned()));
        }
        let (reply, answer) = oneshot::channel();
        self.write(Request::Commit { tenant: tenant.clone(), writes, reply }, answer).await
    }

    async fn history(&self, tenant: &TenantId, query: HistoryQuery) -> Result<Vec<ResourceVersion>, StoreError> {
        let tenant = tenant.clone();
        self.inner.readers.run(move |conn| queries::history(conn, &tenant, &query)).await
    }
}

#[async_trait]
impl ChangeLog for SqliteStore {
    async fn changes_after(&self, after: u64, limit: usize) -> Result<Vec<ChangeRecord>, StoreError> {
        self.inner.readers.run(move |conn| queries::changes_after(conn, after, limit)).await
    }

    async fn latest_sequence(&self) -> Result<u64, StoreError> {
        // Maintained by the writer after each COMMIT: every sequence up to it is readable.
        Ok(self.inner.shared.latest_sequence.load(Ordering::Acquire))
    }

    async fn checkpoint(&self, consumer: &str) -> Result<u64, StoreError> {
        let consumer = consumer.to_owned();
        self.inner.readers.run(move |conn| queries::checkpoint(conn, &consumer)).await
    }

    async fn save_checkpoint(&self, consumer: &str, sequence: u64) -> Result<(), StoreError> {
        // Through the writer: it is the only connection that writes, and the save is as durable
        // as a commit (it rides in the next group).
        let (reply, answer) = oneshot::channel();
        self.write(Request::SaveCheckpoint { consumer: consumer.to_owned(), sequence, reply }, answer).await
    }

    /// Resolves after the next commit that appends changes, or at once if one happened since the
    /// last wake-up of any waiter (a single stored permit, so a lone consumer such as the relay
    /// cannot miss a commit that lands between its read and its wait; with several consumers one
    /// may sleep until its poll timer). A hint: callers still poll.
    async fn wait_for_changes(&self) {
        self.inner.shared.changed.notified().await;
    }
}

/// The snapshot export jobs read: one statement per page on a read connection (off the async
/// runtime), consistent across pages because it only depends on versions up to `as_of`, which
/// later writes never touch (see `queries::snapshot_page` and `design.md`).
#[async_trait]
impl ExportSource for SqliteStore {
    async fn snapshot_page(
        &self,
        tenant: &TenantId,
        part: &ChunkPart,
        as_of: u64,
        since: Option<OffsetDateTime>,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<SnapshotPage, StoreError> {
        if part.segments > 1 {
            return Err(StoreError::Unsupported(format!(
                "the SQLite store reads exports by type, not in {} scan segments (export segments = 1)",
                part.segments
            )));
        }
        // The cursor is `{type index}/{last id}`: the part's types are read one after another.
        let (mut position, mut after) = match cursor {
            None => (0, None),
            Some(text) => parse_snapshot_cursor(text, part.types.len())?,
        };
        while let Some(resource_type) = part.types.get(position).copied() {
            let tenant = tenant.clone();
            let from = after.take();
            let resources = self
                .inner
                .readers
                .run(move |conn| {
                    queries::snapshot_page(conn, &tenant, resource_type, as_of, since, from.as_ref(), limit)
                })
                .await?;
            if let Some(last) = resources.last() {
                let next = Some(format!("{position}/{}", last.id));
                return Ok(SnapshotPage { resources, next });
            }
            position += 1;
        }
        Ok(SnapshotPage::default())
    }
}

/// `{type index}/{id}` of a snapshot cursor, the index below `types`.
fn parse_snapshot_cursor(text: &str, types: usize) -> Result<(usize, Option<LogicalId>), StoreError> {
    let bad = || StoreError::Internal(format!("not an export cursor: {}", fhirmesh_fhir::outcome::clip(text)));
    let (position, id) = text.split_once('/').ok_or_else(bad)?;
    let position: usize = position.parse().map_err(|_| bad())?;
    let id = LogicalId::parse(id).map_err(|_| bad())?;
    if position >= types {
        return Err(bad());
    }
    Ok((position, Some(id)))
}
