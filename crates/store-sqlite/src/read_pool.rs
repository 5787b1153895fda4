//! A small pool of read-only connections. Queries run on tokio's blocking pool, except point reads
//! by key ([`ReadPool::run_point`]), which run in place when a connection is idle. Readers are WAL
//! readers: they never wait for the writer.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use fhirmesh_core::ports::StoreError;
use rusqlite::Connection;
use tokio::sync::Semaphore;

use crate::error::Result;
use crate::schema::open_reader;

pub(crate) struct ReadPool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    /// One permit per connection: callers queue here (asynchronously) rather than holding a
    /// blocking-pool thread while they wait for a connection.
    permits: Arc<Semaphore>,
}

impl ReadPool {
    pub(crate) fn open(path: PathBuf, size: usize) -> Result<ReadPool> {
        let size = size.max(1);
        let idle = (0..size).map(|_| open_reader(&path)).collect::<Result<Vec<_>>>()?;
        Ok(ReadPool { path, idle: Mutex::new(idle), permits: Arc::new(Semaphore::new(size)) })
    }

    /// Runs `query` on a pooled connection on the blocking pool.
    pub(crate) async fn run<T, F>(self: &Arc<Self>, query: F) -> Result<T, StoreError>
    where
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Unavailable("the sqlite read pool is closed".to_owned()))?;
        let pool = Arc::clone(self);
        let task = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let conn = pool.take()?;
            let result = query(&conn);
            pool.put(conn);
            result.map_err(StoreError::from)
        });
        task.await.map_err(|err| StoreError::Internal(format!("sqlite read task failed: {err}")))?
    }

    /// Runs a point read — a handful of B-tree page lookups by primary key, tens of microseconds
    /// when the pages are cached — on the calling thread when a connection is idle, and otherwise
    /// like [`ReadPool::run`]. Handing such a query to the blocking pool costs more than the query:
    /// two thread wake-ups, measured as a fifth of the server's CPU time under a read load (see
    /// docs/benchmarks.md). Only for queries bounded by a few page reads.
    pub(crate) async fn run_point<T, F>(self: &Arc<Self>, query: F) -> Result<T, StoreError>
    where
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let Ok(_permit) = self.permits.try_acquire() else { return self.run(query).await };
        let conn = self.take()?;
        let result = query(&conn);
        self.put(conn);
        result.map_err(StoreError::from)
    }

    fn take(&self) -> Result<Connection, StoreError> {
        let pooled = self.idle.lock().unwrap_or_else(PoisonError::into_inner).pop();
        match pooled {
            Some(conn) => Ok(conn),
            // Only after a query panicked and lost its connection: replace it.
            None => open_reader(&self.path).map_err(StoreError::from),
        }
    }

    fn put(&self, conn: Connection) {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner).push(conn);
    }
}
