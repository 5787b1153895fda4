//! Port traits: what the domain needs from the outside world. Adapters (crates/store-*, crates/bus)
//! implement them; only composition roots choose one.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use fhirmesh_fhir::{LogicalId, ResourceType};
use time::OffsetDateTime;

use crate::error::{ErrorCategory, FhirError};
use crate::events::ResourceChanged;
use crate::model::{Operation, ResourceVersion, TenantId};

/// What a write expects to find as the current version (optimistic concurrency, checked inside
/// the store's atomic commit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    /// No version of this resource exists (not even a tombstone).
    Absent,
    /// The current version (possibly a tombstone) is exactly this one.
    Version(u64),
}

/// One new version to append.
#[derive(Debug, Clone, PartialEq)]
pub struct VersionWrite {
    pub resource_type: ResourceType,
    pub id: LogicalId,
    pub expected: Expected,
    pub version_id: u64,
    pub last_updated: OffsetDateTime,
    pub operation: Operation,
    /// Stamped resource JSON; `None` for a delete.
    pub body: Option<Bytes>,
    /// W3C trace context of the request that made this write: the store keeps it with the
    /// change, so the change's consumers (indexer, notifier) continue the request's trace.
    pub traceparent: Option<String>,
}

/// The result of a successful commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitReceipt {
    /// Change-log sequence of each write, in the order given.
    pub first_sequence: u64,
    pub last_sequence: u64,
}

/// Which versions a history query walks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HistoryScope {
    System,
    Type(ResourceType),
    Instance(ResourceType, LogicalId),
}

/// A page of history, newest first.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryQuery {
    pub scope: HistoryScope,
    /// Only versions with `last_updated >= since`.
    pub since: Option<OffsetDateTime>,
    /// Only versions that were current at some point in `[start, end)`.
    pub at: Option<(OffsetDateTime, OffsetDateTime)>,
    /// Only versions with a sequence strictly below this (the paging cursor).
    pub before_sequence: Option<u64>,
    /// Page size; the store returns at most `limit` versions.
    pub limit: usize,
}

/// Store failures, as the domain sees them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("version conflict on {resource_type}/{id}: expected {expected:?}, found {actual:?}")]
    Conflict { resource_type: ResourceType, id: LogicalId, expected: Expected, actual: Option<u64> },
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A write this backend cannot hold (the message says what and why).
    #[error("{0}")]
    Unsupported(String),
    #[error("store failure: {0}")]
    Internal(String),
}

impl From<StoreError> for FhirError {
    fn from(err: StoreError) -> Self {
        match &err {
            StoreError::Conflict { .. } => FhirError::new(ErrorCategory::Conflict, err.to_string()),
            StoreError::Unavailable(_) => FhirError::new(ErrorCategory::Unavailable, err.to_string()),
            StoreError::Unsupported(_) => FhirError::unsupported(err.to_string()),
            // Internal details go to the log, not to the client.
            StoreError::Internal(detail) => {
                tracing::error!(error = %detail, "store failure");
                FhirError::internal("internal store failure")
            }
        }
    }
}

/// Versioned resource storage. Every method is scoped by tenant.
#[async_trait]
pub trait ResourceStore: Send + Sync + 'static {
    /// The current version (a tombstone if the resource was deleted), or `None` if it never existed.
    async fn read(
        &self,
        tenant: &TenantId,
        resource_type: ResourceType,
        id: &LogicalId,
    ) -> Result<Option<ResourceVersion>, StoreError>;

    /// The current versions of several resources at once (one round trip for a page of search
    /// hits), in the order asked; `None` where a resource never existed.
    async fn read_many(
        &self,
        tenant: &TenantId,
        keys: &[(ResourceType, LogicalId)],
    ) -> Result<Vec<Option<ResourceVersion>>, StoreError> {
        let mut out = Vec::with_capacity(keys.len());
        for (resource_type, id) in keys {
            out.push(self.read(tenant, *resource_type, id).await?);
        }
        Ok(out)
    }

    /// One specific version (live or tombstone).
    async fn vread(
        &self,
        tenant: &TenantId,
        resource_type: ResourceType,
        id: &LogicalId,
        version_id: u64,
    ) -> Result<Option<ResourceVersion>, StoreError>;

    /// Appends all writes atomically, with one change-log row each, durably. If any write's
    /// `expected` does not hold, nothing is written and [`StoreError::Conflict`] is returned.
    async fn commit(&self, tenant: &TenantId, writes: Vec<VersionWrite>) -> Result<CommitReceipt, StoreError>;

    /// A page of history, newest (highest sequence) first.
    async fn history(&self, tenant: &TenantId, query: HistoryQuery) -> Result<Vec<ResourceVersion>, StoreError>;
}

/// One row of the store's change log.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeRecord {
    pub tenant: TenantId,
    pub version: ResourceVersion,
    /// The last sequence of the commit this change belongs to (its own sequence for a commit of
    /// one write). A consumer that must never expose part of a transaction (the indexer) applies
    /// changes up to a commit's end together.
    pub commit_end: u64,
    /// The W3C trace context the write carried ([`VersionWrite::traceparent`]).
    pub traceparent: Option<String>,
}

/// The store's change stream, read by the relay.
#[async_trait]
pub trait ChangeLog: Send + Sync + 'static {
    /// Up to `limit` changes with `sequence > after`, in sequence order.
    async fn changes_after(&self, after: u64, limit: usize) -> Result<Vec<ChangeRecord>, StoreError>;

    /// The highest committed sequence (0 when empty).
    async fn latest_sequence(&self) -> Result<u64, StoreError>;

    /// A consumer's durable checkpoint (0 when never saved).
    async fn checkpoint(&self, consumer: &str) -> Result<u64, StoreError>;

    async fn save_checkpoint(&self, consumer: &str, sequence: u64) -> Result<(), StoreError>;

    /// Resolves when a commit may have appended changes after the last call (a hint, not a guarantee:
    /// callers also poll on a timer).
    async fn wait_for_changes(&self);
}

/// Event bus failures.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    #[error("event bus unavailable: {0}")]
    Unavailable(String),
    #[error("event bus closed")]
    Closed,
}

/// Publishes change events. Consumers are attached by the adapter (see crates/bus).
#[async_trait]
pub trait EventPublisher: Send + Sync + 'static {
    /// Publishes in order; returns once the bus has accepted every event durably (for the
    /// in-process bus: once it was handed to every subscriber).
    async fn publish(&self, events: &[ResourceChanged]) -> Result<(), BusError>;
}

pub type DynResourceStore = Arc<dyn ResourceStore>;
pub type DynChangeLog = Arc<dyn ChangeLog>;
pub type DynEventPublisher = Arc<dyn EventPublisher>;

/// What the indexer hands the search index for one resource version.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexUpdate {
    pub tenant: TenantId,
    pub resource_type: ResourceType,
    pub id: LogicalId,
    pub version_id: u64,
    /// Change-log sequence of this version: the index's watermark moves to the highest applied.
    pub sequence: u64,
    pub last_updated: OffsetDateTime,
    /// The extracted values of a live version; `None` removes the resource from search (delete).
    pub entries: Option<Vec<fhirmesh_fhir::search::IndexEntry>>,
}

/// A resource the index found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexHit {
    pub resource_type: ResourceType,
    pub id: LogicalId,
    /// The version the index holds (the store may already have a newer one).
    pub version_id: u64,
}

/// One page of index results.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexPage {
    /// Matches in query order (`SearchQuery::sort`, ties by type then id).
    pub hits: Vec<IndexHit>,
    /// Per `SearchQuery::total`: exact for `Accurate`; for `Estimate` exact while the count is
    /// cheap (the SQLite index: up to 1,000 matches) and otherwise `None` or an approximation.
    pub total: Option<u64>,
    /// Opaque keyset cursors for the next and previous pages.
    pub next: Option<String>,
    pub previous: Option<String>,
    /// The watermark of the snapshot the page was read from: the page reflects every change up
    /// to this sequence, so a caller can tell without another round trip whether it saw its own
    /// writes.
    pub watermark: u64,
}

/// Search index failures.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IndexError {
    /// A cursor the index did not issue, or one that no longer fits the query.
    #[error("invalid page cursor: {0}")]
    InvalidCursor(String),
    /// A query feature this backend cannot run (the message names it).
    #[error("not supported by the search index: {0}")]
    Unsupported(String),
    #[error("search index unavailable: {0}")]
    Unavailable(String),
    #[error("search index failure: {0}")]
    Internal(String),
}

impl From<IndexError> for FhirError {
    fn from(err: IndexError) -> Self {
        match &err {
            IndexError::InvalidCursor(_) => FhirError::invalid(err.to_string()),
            IndexError::Unsupported(_) => FhirError::unsupported(err.to_string()),
            IndexError::Unavailable(_) => FhirError::new(ErrorCategory::Unavailable, err.to_string()),
            IndexError::Internal(detail) => {
                tracing::error!(error = %detail, "search index failure");
                FhirError::internal("internal search index failure")
            }
        }
    }
}

/// The search index: written by the indexer from change events, read by search.
#[async_trait]
pub trait SearchIndex: Send + Sync + 'static {
    /// Applies updates idempotently: an update whose `version_id` is not newer than what the index
    /// holds for (tenant, type, id) changes nothing, so redelivered and reordered events are safe.
    /// Durably records the highest `sequence` applied as the watermark, in the same transaction.
    async fn apply(&self, updates: Vec<IndexUpdate>) -> Result<(), IndexError>;

    /// Runs `query` for `tenant`; `cursor` is a `next`/`previous` value from an earlier page of the
    /// same query.
    async fn search(
        &self,
        tenant: &TenantId,
        query: &fhirmesh_fhir::search::SearchQuery,
        cursor: Option<&str>,
    ) -> Result<IndexPage, IndexError>;

    /// The highest change-log sequence applied (0 when empty).
    async fn watermark(&self) -> Result<u64, IndexError>;

    /// Removes everything (before a full reindex).
    async fn clear(&self) -> Result<(), IndexError>;

    /// The index's generations, when it can build a new one beside the one it serves (a
    /// zero-downtime reindex, see [`crate::indexer::rebuild`]); `None` when a rebuild clears and
    /// applies in place.
    fn generations(&self) -> Option<&dyn IndexGenerations> {
        None
    }
}

pub type DynSearchIndex = Arc<dyn SearchIndex>;

/// A search index kept in generations: a new generation is built from the change log while the
/// served one keeps answering searches, then searches switch to it at once.
#[async_trait]
pub trait IndexGenerations: Send + Sync {
    /// Starts a new, empty generation, abandoning one a failed rebuild left unfinished. From now on
    /// live writes go to it as well as to the served generation (its watermark stays the
    /// rebuild's own until it is promoted).
    async fn begin(&self) -> Result<NewGeneration, IndexError>;

    /// Makes `generation` the one searches read and the only one live writes go to. Fails if
    /// another rebuild began since (the generation is no longer the one being built).
    async fn promote(&self, generation: u32) -> Result<(), IndexError>;

    /// Drops every generation but the served one (and one being built).
    async fn retire(&self) -> Result<(), IndexError>;
}

/// What [`IndexGenerations::begin`] started.
pub struct NewGeneration {
    /// The new generation's number.
    pub generation: u32,
    /// The new generation alone: applies to it and reports its own watermark.
    pub building: DynSearchIndex,
    /// The live handle: applies to every generation live writes go to (the served one and the
    /// new one) and raises the served one's watermark only once both hold the batch. Catching the
    /// served generation up through it (rather than through a handle on the served generation
    /// alone) keeps the new one holding everything the served watermark claims.
    pub live: DynSearchIndex,
}

/// What a subscriber receives from the bus.
#[derive(Debug, Clone, PartialEq)]
pub enum Received {
    Event(Arc<ResourceChanged>),
    /// The subscriber fell behind and events were dropped: catch up from the change log.
    Lagged,
    /// The bus is gone.
    Closed,
}

/// A live subscription to change events. Durability comes from the consumer's own position (for
/// the indexer: the index watermark) plus catching up from the [`ChangeLog`] after a gap.
#[async_trait]
pub trait EventSubscription: Send + 'static {
    async fn recv(&mut self) -> Received;

    /// An event already waiting, without blocking.
    fn try_recv(&mut self) -> Option<Received>;
}

/// A durable, at-least-once consumer of change events (NATS JetStream, SQS): the bus keeps the
/// consumer's position. Each [`Delivery`] is acknowledged once processed; one that is not is
/// delivered again after the bus's ack wait (or after [`Acknowledge::nak`]'s delay), and one that
/// keeps failing goes to a dead-letter destination after the configured number of attempts.
#[async_trait]
pub trait EventConsumer: Send + Sync + 'static {
    /// Up to `max` deliveries, waiting at most `wait` for the first; empty when none came.
    async fn fetch(&self, max: usize, wait: std::time::Duration) -> Result<Vec<Delivery>, BusError>;

    /// How many events wait for this consumer — published and not yet acknowledged, delivered or
    /// not (the bus's own count, approximate where the bus's is); `None` when the bus cannot say.
    async fn backlog(&self) -> Result<Option<u64>, BusError> {
        Ok(None)
    }
}

/// One delivery of an event to a durable consumer.
pub struct Delivery {
    pub event: Arc<ResourceChanged>,
    /// 1 on the first delivery, counting up on every redelivery.
    pub attempt: u32,
    pub ack: Box<dyn Acknowledge>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery").field("event", &self.event.idempotency_key).field("attempt", &self.attempt).finish()
    }
}

/// Settles one delivery with the bus it came from.
#[async_trait]
pub trait Acknowledge: Send + Sync {
    /// Processed: the bus will not deliver it again.
    async fn ack(&self) -> Result<(), BusError>;
    /// Not processed: deliver again after `delay` (`None`: the adapter's default back-off). On the
    /// last allowed attempt the adapter moves the event to its dead-letter destination instead.
    async fn nak(&self, delay: Option<std::time::Duration>) -> Result<(), BusError>;
    /// Still working on it: extends the deadline before the bus redelivers it.
    async fn in_progress(&self) -> Result<(), BusError>;
}

pub type DynEventConsumer = Arc<dyn EventConsumer>;

/// Rules particular to some resource types that every write of them must satisfy, beyond the R4
/// schema every write is validated against — e.g. that a Subscription's criteria are a search this
/// server can match and its endpoint one the server may call, and that a tenant has at most so
/// many active Subscriptions. The resource service (configured with
/// [`ResourceConfig::write_rules`](crate::ResourceConfig::write_rules)) applies them on every
/// path that writes a resource version: create, update, conditional create and update, patch (to
/// the patched result) and each write entry of a transaction or batch Bundle. Deletes are never
/// checked. An adapter implements them for the types it knows (`fhirmesh-notify`: Subscription);
/// every other type passes untouched.
///
/// Pure and synchronous: [`check`](WriteRules::check) runs on the blocking pool beside schema
/// validation; the counting a [`TenantLimit`] needs is done by the resource service with its
/// search index.
pub trait WriteRules: Send + Sync + std::fmt::Debug {
    /// Checks a schema-valid `resource` of `resource_type` before it is written. An error refuses
    /// the write and is the answer (usually category `invalid`: a 400 with one issue per problem,
    /// each with its FHIRPath expression). Types without rules: `Ok(())`.
    fn check(&self, resource_type: ResourceType, resource: &serde_json::Value) -> Result<(), FhirError>;

    /// Everything `$validate` reports about a schema-valid `resource` under these rules:
    /// warnings as well as errors, and, when `profile` is given, its conformance to that profile
    /// (an issue says so when the rules know no such profile). The default reports the issues of
    /// [`check`](WriteRules::check)'s error and knows no profiles.
    fn validate(
        &self,
        resource_type: ResourceType,
        resource: &serde_json::Value,
        profile: Option<&str>,
    ) -> Vec<fhirmesh_fhir::outcome::Issue> {
        let mut issues = match self.check(resource_type, resource) {
            Ok(()) => Vec::new(),
            Err(error) => error.issues,
        };
        if let Some(profile) = profile {
            issues.push(unknown_profile(profile));
        }
        issues
    }

    /// The per-tenant limit `resource` counts against when it is the current version at `now`, or
    /// `None` if it counts against none (types without a limit; a Subscription that is `off`).
    /// Asked about the version being written and about the version it replaces.
    fn tenant_limit(
        &self,
        resource_type: ResourceType,
        resource: &serde_json::Value,
        now: OffsetDateTime,
    ) -> Option<TenantLimit> {
        let _ = (resource_type, resource, now);
        None
    }

    /// Judges a write that adds one to the count of `limit`, when `others` of the tenant's
    /// resources (not counting the one written) already count against it. The default refuses
    /// with `unprocessable` (422) once `others` reaches `limit.max`.
    fn check_limit(&self, resource_type: ResourceType, others: usize, limit: &TenantLimit) -> Result<(), FhirError> {
        if others < limit.max {
            return Ok(());
        }
        Err(FhirError::new(
            ErrorCategory::Unprocessable,
            format!(
                "this tenant already has {others} {resource_type} resources of this kind, the most allowed is {}",
                limit.max
            ),
        ))
    }
}

/// A cap on how many resources of one type a tenant may have that match a search.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantLimit {
    /// Search parameters on the written type (`status=requested,active,error`), parsed strictly,
    /// that select the resources counted against the limit.
    pub counted: Vec<(String, String)>,
    /// How many may count at most.
    pub max: usize,
}

pub type DynWriteRules = Arc<dyn WriteRules>;

/// The issue `$validate` reports for a profile the server cannot validate against: an error, as
/// the caller asked for exactly that profile.
pub fn unknown_profile(profile: &str) -> fhirmesh_fhir::outcome::Issue {
    fhirmesh_fhir::outcome::Issue::error(
        fhirmesh_fhir::outcome::IssueType::NotSupported,
        format!(
            "profile {} is not known here (install the IG package that defines it)",
            fhirmesh_fhir::outcome::clip(profile)
        ),
    )
}
