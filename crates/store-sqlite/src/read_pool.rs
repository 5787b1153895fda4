//! A small pool of read-only connections, used from tokio's blocking pool so SQLite never runs on
//! an executor thread. Readers are WAL readers: they never wait for the writer.

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
