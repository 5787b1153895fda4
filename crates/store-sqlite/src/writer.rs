//! The single writer thread and its group-commit protocol (see `design.md`).
//!
//! Callers send a [`Request`] with a oneshot reply. The writer blocks for one request, drains
//! whatever else is already queued (up to [`MAX_GROUP_REQUESTS`]), runs the whole group in ONE
//! transaction with one SAVEPOINT per request, COMMITs once (one WAL fsync under
//! `synchronous=FULL`) and only then answers. A request that fails (a conflict, an invalid write)
//! is rolled back to its savepoint and answered with its error; the others still commit.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::{self, JoinHandle};

use fhirmesh_core::model::{Operation, TenantId};
use fhirmesh_core::ports::{CommitReceipt, Expected, StoreError, VersionWrite};
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{Notify, oneshot};

use crate::config::MAX_GROUP_REQUESTS;
use crate::error::{Error, Result};
use crate::rows::{to_i64, to_micros, to_u64};

/// What callers ask of the writer.
pub(crate) enum Request {
    Commit { tenant: TenantId, writes: Vec<VersionWrite>, reply: oneshot::Sender<Result<CommitReceipt, StoreError>> },
    SaveCheckpoint { consumer: String, sequence: u64, reply: oneshot::Sender<Result<(), StoreError>> },
}

/// What a request did, once its group committed.
enum Applied {
    Commit(CommitReceipt),
    Checkpoint,
}

impl Request {
    fn answer(self, outcome: Result<Applied, StoreError>) {
        // A caller that went away (cancelled future) just misses the answer; what was committed
        // stays committed.
        match self {
            Request::Commit { reply, .. } => {
                let _ = reply.send(outcome.and_then(|applied| match applied {
                    Applied::Commit(receipt) => Ok(receipt),
                    Applied::Checkpoint => Err(StoreError::Internal("mismatched writer reply".into())),
                }));
            }
            Request::SaveCheckpoint { reply, .. } => {
                let _ = reply.send(outcome.map(|_| ()));
            }
        }
    }
}

/// State the writer shares with the store handles.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    /// The highest committed sequence.
    pub latest_sequence: AtomicU64,
    /// Signalled after every group that appended changes.
    pub changed: Notify,
    /// Committed groups and the requests they carried (successful or not).
    pub groups: AtomicU64,
    pub requests: AtomicU64,
}

/// The store's handle on the writer thread. Dropping it closes the channel; the writer finishes
/// the requests already queued, closes its connection and exits, and the drop joins it.
pub(crate) struct WriterHandle {
    tx: Option<mpsc::Sender<Request>>,
    thread: Option<JoinHandle<()>>,
}

impl WriterHandle {
    /// Starts the writer thread, which takes ownership of the write connection.
    pub(crate) fn start(conn: Connection, shared: Arc<Shared>) -> Result<WriterHandle> {
        let latest = last_sequence(&conn)?;
        shared.latest_sequence.store(latest, Ordering::Release);
        let (tx, rx) = mpsc::channel();
        let writer = Writer { conn, shared, next_sequence: latest + 1 };
        let thread = thread::Builder::new()
            .name("sqlite-writer".to_owned())
            .spawn(move || writer.run(&rx))
            .map_err(|err| StoreError::Internal(format!("cannot start the writer thread: {err}")))?;
        Ok(WriterHandle { tx: Some(tx), thread: Some(thread) })
    }

    /// Queues a request; its answer comes on the request's oneshot.
    pub(crate) fn submit(&self, request: Request) -> Result<(), StoreError> {
        let stopped = || StoreError::Unavailable("the sqlite writer has stopped".to_owned());
        let tx = self.tx.as_ref().ok_or_else(stopped)?;
        tx.send(request).map_err(|_| stopped())
    }
}

impl Drop for WriterHandle {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("sqlite writer thread panicked");
        }
    }
}

fn last_sequence(conn: &Connection) -> Result<u64> {
    let last: Option<i64> = conn.query_row(
        "SELECT MAX(s) FROM (SELECT MAX(sequence) AS s FROM changes \
         UNION ALL SELECT MAX(sequence) FROM resource_versions)",
        [],
        |row| row.get(0),
    )?;
    to_u64(last.unwrap_or(0), "sequence")
}

struct Writer {
    conn: Connection,
    shared: Arc<Shared>,
    /// The sequence the next appended version gets; rewound when a savepoint or the whole
    /// transaction rolls back, so committed sequences have no gaps.
    next_sequence: u64,
}

impl Writer {
    fn run(mut self, rx: &mpsc::Receiver<Request>) {
        // `recv` keeps returning queued requests after the last sender is gone, so a shutdown
        // drains the queue before the loop ends.
        while let Ok(first) = rx.recv() {
            let mut group = Vec::with_capacity(16);
            group.push(first);
            while group.len() < MAX_GROUP_REQUESTS {
                match rx.try_recv() {
                    Ok(request) => group.push(request),
                    Err(_) => break,
                }
            }
            self.commit_group(group);
        }
        tracing::debug!("sqlite writer stopped");
    }

    fn commit_group(&mut self, group: Vec<Request>) {
        let group_start = self.next_sequence;
        let outcomes = match self.apply_group(&group) {
            Ok(outcomes) => outcomes,
            Err(err) => {
                // Nothing of this group is committed (or, after an fsync failure, its fate is
                // unknown): everyone gets the error.
                self.rollback();
                self.next_sequence = group_start;
                let err = StoreError::from(err);
                tracing::warn!(error = %err, requests = group.len(), "sqlite group commit failed");
                for request in group {
                    request.answer(Err(err.clone()));
                }
                return;
            }
        };
        let appended = self.next_sequence > group_start;
        self.shared.latest_sequence.store(self.next_sequence - 1, Ordering::Release);
        self.shared.groups.fetch_add(1, Ordering::Relaxed);
        self.shared.requests.fetch_add(group.len() as u64, Ordering::Relaxed);
        tracing::trace!(requests = group.len(), "sqlite group committed");
        if appended {
            // Wake every current waiter, and leave one permit for a waiter that arrives between
            // its last read and its next wait (see `ChangeLog::wait_for_changes`). Before the
            // answers, so a committer that then waits sees its own wake-up already spent.
            self.shared.changed.notify_waiters();
            self.shared.changed.notify_one();
        }
        for (request, outcome) in group.into_iter().zip(outcomes) {
            request.answer(outcome);
        }
    }

    /// Runs the group in one transaction. `Ok` once COMMIT returned, with each request's own
    /// outcome; `Err` when the transaction as a whole failed.
    fn apply_group(&mut self, group: &[Request]) -> Result<Vec<Result<Applied, StoreError>>> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        let mut outcomes = Vec::with_capacity(group.len());
        for request in group {
            outcomes.push(self.apply_one(request)?);
        }
        self.conn.execute_batch("COMMIT")?;
        Ok(outcomes)
    }

    fn rollback(&self) {
        if !self.conn.is_autocommit()
            && let Err(err) = self.conn.execute_batch("ROLLBACK")
        {
            tracing::error!(error = %err, "sqlite rollback failed");
        }
    }

    /// Applies one request inside its own savepoint. `Ok(Err(_))`: this request failed and was
    /// rolled back alone. `Err(_)`: the enclosing transaction is lost.
    fn apply_one(&mut self, request: &Request) -> Result<Result<Applied, StoreError>> {
        let start = self.next_sequence;
        self.conn.execute_batch("SAVEPOINT request")?;
        let result = match request {
            Request::Commit { tenant, writes, .. } => self.append(tenant, writes).map(Applied::Commit),
            Request::SaveCheckpoint { consumer, sequence, .. } => {
                self.save_checkpoint(consumer, *sequence).map(|()| Applied::Checkpoint)
            }
        };
        match result {
            Ok(applied) => {
                self.conn.execute_batch("RELEASE request")?;
                Ok(Ok(applied))
            }
            Err(err) => {
                self.next_sequence = start;
                if self.conn.is_autocommit() {
                    // SQLite rolled back the whole transaction (I/O error, disk full, ...).
                    return Err(err);
                }
                self.conn.execute_batch("ROLLBACK TO request; RELEASE request")?;
                Ok(Err(err.into()))
            }
        }
    }

    fn append(&mut self, tenant: &TenantId, writes: &[VersionWrite]) -> Result<CommitReceipt> {
        if writes.is_empty() {
            return Err(Error::Invalid("a commit needs at least one write".to_owned()));
        }
        let first_sequence = self.next_sequence;
        // Every change of a multi-write commit records where the commit ends, so consumers can
        // apply it whole; a single write is its own commit (NULL).
        let commit_end =
            (writes.len() > 1).then(|| to_i64(first_sequence + writes.len() as u64 - 1, "sequence")).transpose()?;
        for write in writes {
            self.append_one(tenant, write, commit_end)?;
        }
        Ok(CommitReceipt { first_sequence, last_sequence: self.next_sequence - 1 })
    }

    fn append_one(&mut self, tenant: &TenantId, write: &VersionWrite, commit_end: Option<i64>) -> Result<()> {
        let (tenant, resource_type, id) = (tenant.as_str(), write.resource_type.as_str(), write.id.as_str());
        let current: Option<i64> = self
            .conn
            .prepare_cached("SELECT version FROM resources_current WHERE tenant = ?1 AND type = ?2 AND id = ?3")?
            .query_row(params![tenant, resource_type, id], |row| row.get(0))
            .optional()?;
        let current = current.map(|version| to_u64(version, "version")).transpose()?;
        let holds = match write.expected {
            Expected::Absent => current.is_none(),
            Expected::Version(expected) => current == Some(expected),
        };
        if !holds {
            return Err(StoreError::Conflict {
                resource_type: write.resource_type,
                id: write.id.clone(),
                expected: write.expected,
                actual: current,
            }
            .into());
        }
        if write.version_id <= current.unwrap_or(0) {
            return Err(Error::Invalid(format!(
                "version {} of {resource_type}/{id} does not follow the current version {}",
                write.version_id,
                current.unwrap_or(0)
            )));
        }

        let sequence = to_i64(self.next_sequence, "sequence")?;
        let version = to_i64(write.version_id, "version")?;
        let last_updated = to_micros(write.last_updated)?;
        let deleted = write.operation == Operation::Delete;
        self.conn
            .prepare_cached(
                "INSERT INTO resource_versions \
                 (sequence, tenant, type, id, version, last_updated, operation, body) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?
            .execute(params![
                sequence,
                tenant,
                resource_type,
                id,
                version,
                last_updated,
                write.operation.as_str(),
                write.body.as_deref(),
            ])?;
        self.conn
            .prepare_cached(
                "INSERT INTO changes (sequence, tenant, type, id, version, commit_end, traceparent) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![sequence, tenant, resource_type, id, version, commit_end, write.traceparent.as_deref()])?;
        self.conn
            .prepare_cached(
                "INSERT INTO resources_current (tenant, type, id, version, sequence, deleted) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
                 ON CONFLICT (tenant, type, id) DO UPDATE SET \
                 version = excluded.version, sequence = excluded.sequence, deleted = excluded.deleted",
            )?
            .execute(params![tenant, resource_type, id, version, sequence, deleted])?;
        self.next_sequence += 1;
        Ok(())
    }

    fn save_checkpoint(&mut self, consumer: &str, sequence: u64) -> Result<()> {
        let sequence = to_i64(sequence, "checkpoint")?;
        self.conn
            .prepare_cached(
                "INSERT INTO checkpoints (consumer, sequence) VALUES (?1, ?2) \
                 ON CONFLICT (consumer) DO UPDATE SET sequence = excluded.sequence",
            )?
            .execute(params![consumer, sequence])?;
        Ok(())
    }
}
