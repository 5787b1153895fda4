//! [`SqliteJobStore`]: the export [`JobStore`] of the embedded deployment — a small SQLite file of
//! its own (`{data_dir}/jobs.db`) beside the resource store, WAL mode, one connection behind a
//! mutex, every operation one transaction on tokio's blocking pool. Jobs are few and their
//! operations rare (a lease per chunk, a renewal per lease period), so one connection is plenty;
//! SQLite's file locks (`BEGIN IMMEDIATE` + busy timeout) keep it correct when several processes
//! share the file. See `design.md` for the layout.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use fhirmesh_core::export::{
    ChunkState, ExportJob, ExportRequest, JobError, JobId, JobStatus, JobStore, JobView, LeasedChunk, OutputFile,
};
use fhirmesh_core::model::TenantId;
use rusqlite::{Connection, OptionalExtension, Row, Transaction, TransactionBehavior, params};
use time::OffsetDateTime;

use crate::error::{Error, Result};
use crate::rows::{from_micros, saturating_i64, tenant_from_row, to_i64, to_micros, to_u64};
use crate::schema::open_wal_writer;

/// The job database's schema version, in its own `PRAGMA user_version`.
pub(crate) const JOBS_SCHEMA_VERSION: i64 = 1;

/// Version 1. Every timestamp is integer microseconds since the Unix epoch, UTC.
const JOBS_SCHEMA_V1: &str = "
CREATE TABLE IF NOT EXISTS export_jobs (
    tenant           TEXT    NOT NULL,
    id               TEXT    NOT NULL,
    owner            TEXT,              -- NULL without authentication
    request_json     TEXT    NOT NULL,  -- the ExportRequest, serde JSON
    as_of            INTEGER NOT NULL,  -- the snapshot's change sequence
    transaction_time INTEGER NOT NULL,
    created_at       INTEGER NOT NULL,
    status           TEXT    NOT NULL,  -- active | completed | failed
    error            TEXT,              -- why it failed
    finished_at      INTEGER,           -- when it completed or failed
    PRIMARY KEY (tenant, id)
) WITHOUT ROWID;
-- The lease queue: active jobs, oldest first.
CREATE INDEX IF NOT EXISTS export_jobs_queue ON export_jobs (status, created_at, id, tenant);
-- Expiry: finished jobs, oldest first.
CREATE INDEX IF NOT EXISTS export_jobs_finished ON export_jobs (finished_at);
CREATE TABLE IF NOT EXISTS export_chunks (
    tenant        TEXT    NOT NULL,
    job_id        TEXT    NOT NULL,
    idx           INTEGER NOT NULL,  -- position of its type in the request
    resource_type TEXT    NOT NULL,
    done          INTEGER NOT NULL,  -- 0 | 1
    worker        TEXT,              -- who holds (or last held) the lease
    lease_until   INTEGER,           -- NULL: never leased (or done)
    outputs_json  TEXT,              -- [OutputFile] once done
    attempts      INTEGER NOT NULL DEFAULT 0,  -- leases so far
    last_error    TEXT,              -- why the last attempt gave it back
    PRIMARY KEY (tenant, job_id, idx)
) WITHOUT ROWID;
";

/// The columns [`job_from_row`] decodes, in order, for an `export_jobs` alias `j`.
const JOB_COLUMNS: &str = "j.tenant, j.id, j.owner, j.request_json, j.as_of, j.transaction_time, j.created_at, \
                           j.status, j.error, j.finished_at";

/// Export jobs, chunks and leases in SQLite. Cheap to clone (clones share the connection).
#[derive(Clone)]
pub struct SqliteJobStore {
    conn: Arc<Mutex<Connection>>,
}

impl std::fmt::Debug for SqliteJobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteJobStore").finish_non_exhaustive()
    }
}

impl SqliteJobStore {
    /// Opens the job database at `path` (e.g. `{data_dir}/jobs.db`), creating the file and its
    /// tables if missing. Blocking: call it once at start-up.
    pub fn open(path: &Path) -> Result<SqliteJobStore, JobError> {
        let conn = open_wal_writer(path, true)?;
        migrate(&conn)?;
        Ok(SqliteJobStore { conn: Arc::new(Mutex::new(conn)) })
    }

    /// Runs `work` in one transaction on the blocking pool; commits when it returns `Ok`, rolls
    /// back otherwise.
    async fn transaction<T, F>(&self, behavior: TransactionBehavior, work: F) -> Result<T, JobError>
    where
        F: FnOnce(&Transaction<'_>) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        let task = tokio::task::spawn_blocking(move || -> Result<T> {
            // A panic while the lock was held dropped its transaction (a rollback): the
            // connection is still sound.
            let mut conn = conn.lock().unwrap_or_else(PoisonError::into_inner);
            let tx = conn.transaction_with_behavior(behavior)?;
            let value = work(&tx)?;
            tx.commit()?;
            Ok(value)
        });
        let result = task.await.map_err(|err| JobError::Internal(format!("job store task failed: {err}")))?;
        result.map_err(JobError::from)
    }

    /// A transaction that writes: `BEGIN IMMEDIATE`, so it takes the write lock up front and its
    /// reads and writes are one atomic step even with other processes on the file.
    async fn write<T, F>(&self, work: F) -> Result<T, JobError>
    where
        F: FnOnce(&Transaction<'_>) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        self.transaction(TransactionBehavior::Immediate, work).await
    }

    /// A read-only transaction: one consistent WAL snapshot, without taking the write lock.
    async fn read<T, F>(&self, work: F) -> Result<T, JobError>
    where
        F: FnOnce(&Transaction<'_>) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        self.transaction(TransactionBehavior::Deferred, work).await
    }
}

fn migrate(conn: &Connection) -> Result<()> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    if version == JOBS_SCHEMA_VERSION {
        return Ok(());
    }
    if version > JOBS_SCHEMA_VERSION {
        return Err(Error::Corrupt(format!(
            "job database schema version {version} is not supported (this build reads version {JOBS_SCHEMA_VERSION})"
        )));
    }
    // `BEGIN IMMEDIATE` so two processes racing to create the schema serialise.
    conn.execute_batch(&format!(
        "BEGIN IMMEDIATE; {JOBS_SCHEMA_V1} PRAGMA user_version = {JOBS_SCHEMA_VERSION}; COMMIT;"
    ))
    .inspect_err(|_| {
        if !conn.is_autocommit() {
            let _ = conn.execute_batch("ROLLBACK");
        }
    })?;
    Ok(())
}

#[async_trait]
impl JobStore for SqliteJobStore {
    async fn create(&self, job: &ExportJob, max_active: usize) -> Result<(), JobError> {
        let job = job.clone();
        self.write(move |tx| create(tx, &job, max_active)).await?
    }

    async fn get(&self, tenant: &TenantId, id: &JobId) -> Result<Option<JobView>, JobError> {
        let (tenant, id) = (tenant.clone(), id.clone());
        self.read(move |tx| {
            let Some(job) = read_job(tx, tenant.as_str(), id.as_str())? else {
                return Ok(None);
            };
            let chunks = read_chunks(tx, tenant.as_str(), id.as_str())?;
            Ok(Some(JobView { job, chunks }))
        })
        .await
    }

    async fn lease(
        &self,
        worker: &str,
        now: OffsetDateTime,
        until: OffsetDateTime,
    ) -> Result<Option<LeasedChunk>, JobError> {
        let worker = worker.to_owned();
        self.write(move |tx| lease(tx, &worker, now, until)).await
    }

    async fn renew(&self, chunk: &LeasedChunk, worker: &str, until: OffsetDateTime) -> Result<bool, JobError> {
        let (tenant, id, index, worker) =
            (chunk.job.tenant.clone(), chunk.job.id.clone(), chunk.index, worker.to_owned());
        self.write(move |tx| {
            let renewed = tx
                .prepare_cached(&format!(
                    "UPDATE export_chunks SET lease_until = ?5 WHERE {HELD_CHUNK} AND EXISTS ({ACTIVE_JOB})"
                ))?
                .execute(params![tenant.as_str(), id.as_str(), index, worker, to_micros(until)?])?;
            Ok(renewed == 1)
        })
        .await
    }

    async fn release(
        &self,
        chunk: &LeasedChunk,
        worker: &str,
        error: &str,
        retry_at: OffsetDateTime,
    ) -> Result<bool, JobError> {
        let (tenant, id, index, worker, error) =
            (chunk.job.tenant.clone(), chunk.job.id.clone(), chunk.index, worker.to_owned(), error.to_owned());
        self.write(move |tx| {
            let released = tx
                .prepare_cached(&format!(
                    "UPDATE export_chunks SET lease_until = ?6, last_error = ?5 WHERE {HELD_CHUNK}"
                ))?
                .execute(params![tenant.as_str(), id.as_str(), index, worker, error, to_micros(retry_at)?])?;
            Ok(released == 1)
        })
        .await
    }

    async fn complete(
        &self,
        chunk: &LeasedChunk,
        worker: &str,
        outputs: &[OutputFile],
        now: OffsetDateTime,
    ) -> Result<bool, JobError> {
        let (tenant, id, index, worker) =
            (chunk.job.tenant.clone(), chunk.job.id.clone(), chunk.index, worker.to_owned());
        let outputs = serde_json::to_string(outputs)
            .map_err(|err| JobError::Internal(format!("cannot encode the chunk's outputs: {err}")))?;
        self.write(move |tx| {
            let (tenant, id) = (tenant.as_str(), id.as_str());
            let marked = tx
                .prepare_cached(&format!(
                    "UPDATE export_chunks SET done = 1, lease_until = NULL, outputs_json = ?5 \
                     WHERE {HELD_CHUNK} AND EXISTS ({ACTIVE_JOB})"
                ))?
                .execute(params![tenant, id, index, worker, outputs])?;
            if marked != 1 {
                return Ok(false);
            }
            let pending: i64 = tx
                .prepare_cached("SELECT COUNT(*) FROM export_chunks WHERE tenant = ?1 AND job_id = ?2 AND done = 0")?
                .query_row(params![tenant, id], |row| row.get(0))?;
            if pending == 0 {
                tx.prepare_cached(
                    "UPDATE export_jobs SET status = 'completed', finished_at = ?3 \
                     WHERE tenant = ?1 AND id = ?2 AND status = 'active'",
                )?
                .execute(params![tenant, id, to_micros(now)?])?;
            }
            Ok(true)
        })
        .await
    }

    async fn fail(&self, tenant: &TenantId, id: &JobId, reason: &str, now: OffsetDateTime) -> Result<(), JobError> {
        let (tenant, id, reason) = (tenant.clone(), id.clone(), reason.to_owned());
        self.write(move |tx| {
            tx.prepare_cached(
                "UPDATE export_jobs SET status = 'failed', error = ?3, finished_at = ?4 \
                 WHERE tenant = ?1 AND id = ?2 AND status = 'active'",
            )?
            .execute(params![tenant.as_str(), id.as_str(), reason, to_micros(now)?])?;
            Ok(())
        })
        .await
    }

    async fn delete(&self, tenant: &TenantId, id: &JobId) -> Result<bool, JobError> {
        let (tenant, id) = (tenant.clone(), id.clone());
        self.write(move |tx| {
            let keys = params![tenant.as_str(), id.as_str()];
            tx.prepare_cached("DELETE FROM export_chunks WHERE tenant = ?1 AND job_id = ?2")?.execute(keys)?;
            let removed = tx.prepare_cached("DELETE FROM export_jobs WHERE tenant = ?1 AND id = ?2")?.execute(keys)?;
            Ok(removed > 0)
        })
        .await
    }

    async fn finished_before(&self, before: OffsetDateTime, limit: usize) -> Result<Vec<(TenantId, JobId)>, JobError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.read(move |tx| {
            let mut stmt = tx.prepare_cached(
                "SELECT tenant, id FROM export_jobs \
                 WHERE finished_at < ?1 AND status IN ('completed', 'failed') \
                 ORDER BY finished_at, tenant, id LIMIT ?2",
            )?;
            let mut rows = stmt.query(params![to_micros(before)?, saturating_i64(limit as u64)])?;
            let mut jobs = Vec::new();
            while let Some(row) = rows.next()? {
                jobs.push((tenant_from_row(row, 0)?, job_id_from_row(row, 1)?));
            }
            Ok(jobs)
        })
        .await
    }
}

/// The chunk `(?1 tenant, ?2 job, ?3 index)`, not done and leased by worker `?4`.
const HELD_CHUNK: &str = "tenant = ?1 AND job_id = ?2 AND idx = ?3 AND worker = ?4 AND done = 0";
/// Its job `(?1, ?2)`, still there and active.
const ACTIVE_JOB: &str = "SELECT 1 FROM export_jobs j WHERE j.tenant = ?1 AND j.id = ?2 AND j.status = 'active'";

/// `Ok(Err(TooMany))` when the owner is at the limit: nothing is written.
fn create(tx: &Transaction<'_>, job: &ExportJob, max_active: usize) -> Result<Result<(), JobError>> {
    let (tenant, id) = (job.tenant.as_str(), job.id.as_str());
    let active: i64 = tx
        .prepare_cached("SELECT COUNT(*) FROM export_jobs WHERE tenant = ?1 AND owner IS ?2 AND status = 'active'")?
        .query_row(params![tenant, job.owner], |row| row.get(0))?;
    let active = usize::try_from(active).map_err(|_| Error::Corrupt(format!("negative count {active}")))?;
    if active >= max_active {
        return Ok(Err(JobError::TooMany { active, max: max_active }));
    }
    let request = serde_json::to_string(&job.request)
        .map_err(|err| Error::Invalid(format!("cannot encode the export request: {err}")))?;
    tx.prepare_cached(
        "INSERT INTO export_jobs (tenant, id, owner, request_json, as_of, transaction_time, created_at, status) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'active')",
    )?
    .execute(params![
        tenant,
        id,
        job.owner,
        request,
        to_i64(job.as_of, "as_of")?,
        to_micros(job.transaction_time)?,
        to_micros(job.created_at)?,
    ])?;
    let mut insert = tx.prepare_cached(
        "INSERT INTO export_chunks (tenant, job_id, idx, resource_type, done) VALUES (?1, ?2, ?3, ?4, 0)",
    )?;
    for (index, part) in job.request.chunks().iter().enumerate() {
        let index = u32::try_from(index).map_err(|_| Error::Invalid("too many chunks in one export".to_owned()))?;
        // The column names what the chunk covers, for people reading the table.
        let label = match part.types.as_slice() {
            [one] if part.segments <= 1 => one.to_string(),
            _ => format!("segment {} of {}", part.segment, part.segments),
        };
        insert.execute(params![tenant, id, index, label])?;
    }
    Ok(Ok(()))
}

fn lease(
    tx: &Transaction<'_>,
    worker: &str,
    now: OffsetDateTime,
    until: OffsetDateTime,
) -> Result<Option<LeasedChunk>> {
    let candidate = tx
        .prepare_cached(
            "SELECT k.tenant, k.job_id, k.idx, k.attempts, k.last_error FROM export_jobs j \
             JOIN export_chunks k ON k.tenant = j.tenant AND k.job_id = j.id \
             WHERE j.status = 'active' AND k.done = 0 AND (k.lease_until IS NULL OR k.lease_until < ?1) \
             ORDER BY j.created_at, j.id, j.tenant, k.idx LIMIT 1",
        )?
        .query_row(params![to_micros(now)?], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, i64>(2)?,
                row.get::<_, i64>(3)?,
                row.get::<_, Option<String>>(4)?,
            ))
        })
        .optional()?;
    let Some((tenant, id, index, attempts, last_error)) = candidate else {
        return Ok(None);
    };
    tx.prepare_cached(
        "UPDATE export_chunks SET worker = ?4, lease_until = ?5, attempts = attempts + 1 \
         WHERE tenant = ?1 AND job_id = ?2 AND idx = ?3",
    )?
    .execute(params![tenant, id, index, worker, to_micros(until)?])?;
    let attempt = u32::try_from(attempts.saturating_add(1)).unwrap_or(u32::MAX);
    let job =
        read_job(tx, &tenant, &id)?.ok_or_else(|| Error::Corrupt(format!("chunk of a missing job {tenant}/{id}")))?;
    let index = chunk_index(index)?;
    Ok(Some(LeasedChunk { job, index, until, attempt, last_error }))
}

fn read_job(tx: &Transaction<'_>, tenant: &str, id: &str) -> Result<Option<ExportJob>> {
    let mut stmt =
        tx.prepare_cached(&format!("SELECT {JOB_COLUMNS} FROM export_jobs j WHERE j.tenant = ?1 AND j.id = ?2"))?;
    let mut rows = stmt.query(params![tenant, id])?;
    rows.next()?.map(job_from_row).transpose()
}

fn read_chunks(tx: &Transaction<'_>, tenant: &str, id: &str) -> Result<Vec<ChunkState>> {
    let mut stmt = tx.prepare_cached(
        "SELECT idx, done, outputs_json FROM export_chunks \
         WHERE tenant = ?1 AND job_id = ?2 ORDER BY idx",
    )?;
    let mut rows = stmt.query(params![tenant, id])?;
    let mut chunks = Vec::new();
    while let Some(row) = rows.next()? {
        let outputs = match row.get::<_, Option<String>>(2)? {
            None => Vec::new(),
            Some(json) => serde_json::from_str::<Vec<OutputFile>>(&json)
                .map_err(|err| Error::Corrupt(format!("chunk outputs of {tenant}/{id}: {err}")))?,
        };
        chunks.push(ChunkState { index: chunk_index(row.get(0)?)?, done: row.get::<_, i64>(1)? != 0, outputs });
    }
    Ok(chunks)
}

/// Decodes the [`JOB_COLUMNS`].
fn job_from_row(row: &Row<'_>) -> Result<ExportJob> {
    let tenant = tenant_from_row(row, 0)?;
    let id = job_id_from_row(row, 1)?;
    let request = serde_json::from_str::<ExportRequest>(&row.get::<_, String>(3)?)
        .map_err(|err| Error::Corrupt(format!("export request of job {tenant}/{id}: {err}")))?;
    let status = row.get::<_, String>(7)?;
    let status = JobStatus::parse(&status).ok_or_else(|| Error::Corrupt(format!("unknown job status {status:?}")))?;
    Ok(ExportJob {
        owner: row.get(2)?,
        request,
        as_of: to_u64(row.get(4)?, "as_of")?,
        transaction_time: from_micros(row.get(5)?)?,
        created_at: from_micros(row.get(6)?)?,
        status,
        error: row.get(8)?,
        finished_at: row.get::<_, Option<i64>>(9)?.map(from_micros).transpose()?,
        tenant,
        id,
    })
}

fn job_id_from_row(row: &Row<'_>, index: usize) -> Result<JobId> {
    let id = row.get::<_, String>(index)?;
    JobId::parse(&id).ok_or_else(|| Error::Corrupt(format!("bad job id {id:?}")))
}

fn chunk_index(index: i64) -> Result<u32> {
    u32::try_from(index).map_err(|_| Error::Corrupt(format!("chunk index {index} out of range")))
}
