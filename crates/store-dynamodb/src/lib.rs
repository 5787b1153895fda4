//! The scale-out resource store: [`ResourceStore`] and [`ChangeLog`] on one DynamoDB table.
//!
//! What it is: versioned resource items keyed by tenant, a current-version pointer moved with
//! conditional writes, atomic commits with `TransactWriteItems`, and a gap-free change log built
//! from a sequence counter and change items (holes of dead writers voided after a timeout). See
//! `design.md` beside this crate for the table, the protocol and the deliberate differences from
//! the SQLite store.
//!
//! Also here: the DynamoDB Streams relay ([`streams`]: shard discovery, parent-before-child
//! order, per-shard checkpoints and leases) and the export job store ([`DynamoJobStore`], a
//! table of its own). What it is not: the search index.

mod batch;
mod blobs;
mod changes;
mod commit;
mod error;
mod export;
mod items;
mod jobs;
mod provision;
mod queries;
pub mod streams;
mod txn;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use fhirmesh_core::blob::DynBlobStore;
use fhirmesh_core::model::{ResourceVersion, TenantId};
use fhirmesh_core::ports::{
    ChangeLog, ChangeRecord, CommitReceipt, HistoryQuery, ResourceStore, StoreError, VersionWrite,
};
use fhirmesh_fhir::{LogicalId, ResourceType};
use tokio::sync::Notify;

pub use crate::commit::{MAX_BODY_BYTES, MAX_TRANSACTION_BYTES, MAX_WRITES_PER_TRANSACTION};
pub use crate::export::{ExportCursor, ExportPage, ExportScan, MAX_EXPORT_TYPES, MAX_SEGMENTS};
pub use crate::jobs::{DynamoJobStore, MAX_OWNER_BYTES};
pub use crate::provision::{Provisioned, provision, provision_jobs, stream_arn};
pub use crate::streams::{StreamRelay, StreamRelayConfig, provision_leases};

/// Wall-clock epoch milliseconds: lease expiries and transaction deadlines, compared across
/// processes (their clock skew must stay well below those durations).
pub(crate) fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|since| u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Where transaction deadlines read the time: the wall clock, or in tests a manual one that
/// moves only when the test says, so deadline checks do not race a loaded machine.
#[derive(Clone, Default)]
pub(crate) struct Clock(Option<Arc<std::sync::atomic::AtomicU64>>);

impl Clock {
    pub(crate) fn now_millis(&self) -> u64 {
        match &self.0 {
            None => now_millis(),
            Some(manual) => manual.load(std::sync::atomic::Ordering::Acquire),
        }
    }

    /// A clock standing at `epoch_ms` until [`Clock::advance`] moves it.
    #[cfg(test)]
    pub(crate) fn manual(epoch_ms: u64) -> Clock {
        Clock(Some(Arc::new(std::sync::atomic::AtomicU64::new(epoch_ms))))
    }

    #[cfg(test)]
    pub(crate) fn advance(&self, by: Duration) {
        let manual = self.0.as_ref().expect("only a manual clock moves");
        manual.fetch_add(by.as_millis() as u64, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Tunables of [`DynamoStore`].
#[derive(Debug, Clone)]
pub struct DynamoConfig {
    pub table: String,
    /// How long a change-log hole (a reserved sequence without its commit) stays open before a
    /// reader voids it: longer than any commit takes, with the SDK's retries.
    pub hole_timeout: Duration,
    /// How often [`ChangeLog::wait_for_changes`] wakes up when this process committed nothing
    /// (other processes' commits are only seen by polling).
    pub poll_interval: Duration,
    /// How long a large (staged) commit may stay pending after its writer's last renewal before
    /// anyone may abort it: change-log readers wait for a pending commit at most this long when
    /// its writer dies (a live writer renews it while it stages).
    pub txn_timeout: Duration,
}

impl Default for DynamoConfig {
    fn default() -> Self {
        DynamoConfig {
            table: "fhirmesh-resources".to_owned(),
            hole_timeout: Duration::from_secs(10),
            poll_interval: Duration::from_millis(200),
            txn_timeout: Duration::from_secs(30),
        }
    }
}

/// The DynamoDB-backed [`ResourceStore`] and [`ChangeLog`]. Cheap to clone.
#[derive(Clone)]
pub struct DynamoStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    config: DynamoConfig,
    /// Commits of this process wake the change-log followers in it.
    committed: Notify,
    /// When each open change-log hole was first seen by this process.
    holes: Mutex<HashMap<u64, Instant>>,
    /// How far [`DynamoStore::latest_committed`] has read the change log: (the last resolved
    /// sequence, the last change among them).
    frontier: Mutex<(u64, u64)>,
    /// Final states of staged transactions (true: committed), which never change.
    txns: Mutex<HashMap<String, bool>>,
    /// Where bodies too large for an item go (none: they are refused).
    blobs: Option<DynBlobStore>,
    /// What transaction deadlines are set and checked against.
    clock: Clock,
}

impl DynamoStore {
    /// A store on `config.table`, which must exist (see [`provision`]).
    pub fn new(client: Client, config: DynamoConfig) -> DynamoStore {
        DynamoStore::build(client, config, None)
    }

    /// A store on `config.table` that keeps bodies over [`MAX_BODY_BYTES`] in `blobs`.
    pub fn with_blob_store(client: Client, config: DynamoConfig, blobs: DynBlobStore) -> DynamoStore {
        DynamoStore::build(client, config, Some(blobs))
    }

    fn build(client: Client, config: DynamoConfig, blobs: Option<DynBlobStore>) -> DynamoStore {
        DynamoStore {
            inner: Arc::new(Inner {
                client,
                config,
                committed: Notify::new(),
                holes: Mutex::new(HashMap::new()),
                frontier: Mutex::new((0, 0)),
                txns: Mutex::new(HashMap::new()),
                blobs,
                clock: Clock::default(),
            }),
        }
    }

    /// The same store with its transaction deadlines on `clock`.
    #[cfg(test)]
    pub(crate) fn with_clock(client: Client, config: DynamoConfig, clock: Clock) -> DynamoStore {
        let mut store = DynamoStore::build(client, config, None);
        Arc::get_mut(&mut store.inner).expect("just built").clock = clock;
        store
    }

    /// Wakes the change-log followers of this process: every current waiter, and one permit
    /// for a follower that is between two waits (it would otherwise sleep a poll interval).
    fn signal_commit(&self) {
        self.inner.committed.notify_waiters();
        self.inner.committed.notify_one();
    }

    pub fn table(&self) -> &str {
        &self.inner.config.table
    }

    pub fn client(&self) -> &Client {
        &self.inner.client
    }
}

#[async_trait]
impl ResourceStore for DynamoStore {
    async fn read(
        &self,
        tenant: &TenantId,
        resource_type: ResourceType,
        id: &LogicalId,
    ) -> Result<Option<ResourceVersion>, StoreError> {
        self.read_current(tenant, resource_type, id).await
    }

    async fn read_many(
        &self,
        tenant: &TenantId,
        keys: &[(ResourceType, LogicalId)],
    ) -> Result<Vec<Option<ResourceVersion>>, StoreError> {
        self.read_current_many(tenant, keys).await
    }

    async fn vread(
        &self,
        tenant: &TenantId,
        resource_type: ResourceType,
        id: &LogicalId,
        version_id: u64,
    ) -> Result<Option<ResourceVersion>, StoreError> {
        self.read_version(tenant, resource_type, id, version_id).await
    }

    async fn commit(&self, tenant: &TenantId, writes: Vec<VersionWrite>) -> Result<CommitReceipt, StoreError> {
        self.commit_writes(tenant, writes).await
    }

    async fn history(&self, tenant: &TenantId, query: HistoryQuery) -> Result<Vec<ResourceVersion>, StoreError> {
        self.read_history(tenant, query).await
    }
}

#[async_trait]
impl ChangeLog for DynamoStore {
    async fn changes_after(&self, after: u64, limit: usize) -> Result<Vec<ChangeRecord>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.read_changes(after, limit).await
    }

    async fn latest_sequence(&self) -> Result<u64, StoreError> {
        self.latest_committed().await
    }

    async fn checkpoint(&self, consumer: &str) -> Result<u64, StoreError> {
        self.read_checkpoint(consumer).await
    }

    async fn save_checkpoint(&self, consumer: &str, sequence: u64) -> Result<(), StoreError> {
        self.write_checkpoint(consumer, sequence).await
    }

    async fn wait_for_changes(&self) {
        tokio::select! {
            _ = self.inner.committed.notified() => {}
            _ = tokio::time::sleep(self.inner.config.poll_interval) => {}
        }
    }
}
