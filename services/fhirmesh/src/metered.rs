//! The store and the search index as a service uses them, timed: every call counted by operation
//! and outcome and its duration observed, whatever the backend —
//! `fhirmesh_store_requests_total{operation,code}`, `fhirmesh_store_request_duration_seconds`,
//! `fhirmesh_search_index_requests_total{operation,code}`,
//! `fhirmesh_search_index_request_duration_seconds`. Decorators on the ports, wired by `serve`.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use fhirmesh_core::ports::{
    CommitReceipt, DynResourceStore, DynSearchIndex, HistoryQuery, IndexError, IndexGenerations, IndexPage,
    IndexUpdate, ResourceStore, SearchIndex, StoreError, VersionWrite,
};
use fhirmesh_core::{ResourceVersion, TenantId};
use fhirmesh_fhir::{LogicalId, ResourceType};
use fhirmesh_ops::{Ops, RequestMetrics};

/// Store and index calls take from a tenth of a millisecond (SQLite, cached) to seconds (a
/// throttled DynamoDB, a large OpenSearch page).
const BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// `store`, timed, its metrics served by `ops`.
pub fn store(store: DynResourceStore, ops: &Ops) -> DynResourceStore {
    Arc::new(MeteredStore { inner: store, metrics: served(ops, "fhirmesh_store", "the resource store") })
}

/// `index`, timed, its metrics served by `ops`.
pub fn index(index: DynSearchIndex, ops: &Ops) -> DynSearchIndex {
    Arc::new(MeteredIndex { inner: index, metrics: served(ops, "fhirmesh_search_index", "the search index") })
}

/// Call metrics named `prefix` for calls to `what`, rendered by `ops`.
fn served(ops: &Ops, prefix: &str, what: &str) -> RequestMetrics {
    let metrics = RequestMetrics::new(
        prefix,
        &format!("Calls to {what}, by operation and outcome."),
        &format!("Duration of calls to {what}, by operation."),
        BUCKETS,
    );
    let rendered = metrics.clone();
    ops.metrics(move |out| rendered.render(out));
    metrics
}

/// Runs `call`, recording it as `operation` with the outcome `code` names.
async fn timed<T, E>(
    metrics: &RequestMetrics,
    operation: &'static str,
    code: fn(&E) -> &'static str,
    call: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let started = Instant::now();
    let result = call.await;
    let outcome = result.as_ref().map_or_else(code, |_| "ok");
    metrics.record(&[("operation", operation.to_owned())], outcome.to_owned(), started.elapsed());
    result
}

fn store_code(error: &StoreError) -> &'static str {
    match error {
        StoreError::Conflict { .. } => "conflict",
        StoreError::Unavailable(_) => "unavailable",
        StoreError::Unsupported(_) => "unsupported",
        StoreError::Internal(_) => "internal",
    }
}

fn index_code(error: &IndexError) -> &'static str {
    match error {
        IndexError::InvalidCursor(_) => "invalid_cursor",
        IndexError::Unsupported(_) => "unsupported",
        IndexError::Unavailable(_) => "unavailable",
        IndexError::Internal(_) => "internal",
    }
}

struct MeteredStore {
    inner: DynResourceStore,
    metrics: RequestMetrics,
}

#[async_trait]
impl ResourceStore for MeteredStore {
    async fn read(
        &self,
        tenant: &TenantId,
        resource_type: ResourceType,
        id: &LogicalId,
    ) -> Result<Option<ResourceVersion>, StoreError> {
        timed(&self.metrics, "read", store_code, self.inner.read(tenant, resource_type, id)).await
    }

    async fn read_many(
        &self,
        tenant: &TenantId,
        keys: &[(ResourceType, LogicalId)],
    ) -> Result<Vec<Option<ResourceVersion>>, StoreError> {
        timed(&self.metrics, "read_many", store_code, self.inner.read_many(tenant, keys)).await
    }

    async fn vread(
        &self,
        tenant: &TenantId,
        resource_type: ResourceType,
        id: &LogicalId,
        version_id: u64,
    ) -> Result<Option<ResourceVersion>, StoreError> {
        timed(&self.metrics, "vread", store_code, self.inner.vread(tenant, resource_type, id, version_id)).await
    }

    async fn commit(&self, tenant: &TenantId, writes: Vec<VersionWrite>) -> Result<CommitReceipt, StoreError> {
        timed(&self.metrics, "commit", store_code, self.inner.commit(tenant, writes)).await
    }

    async fn history(&self, tenant: &TenantId, query: HistoryQuery) -> Result<Vec<ResourceVersion>, StoreError> {
        timed(&self.metrics, "history", store_code, self.inner.history(tenant, query)).await
    }
}

struct MeteredIndex {
    inner: DynSearchIndex,
    metrics: RequestMetrics,
}

#[async_trait]
impl SearchIndex for MeteredIndex {
    async fn apply(&self, updates: Vec<IndexUpdate>) -> Result<(), IndexError> {
        timed(&self.metrics, "apply", index_code, self.inner.apply(updates)).await
    }

    async fn search(
        &self,
        tenant: &TenantId,
        query: &fhirmesh_fhir::search::SearchQuery,
        cursor: Option<&str>,
    ) -> Result<IndexPage, IndexError> {
        timed(&self.metrics, "search", index_code, self.inner.search(tenant, query, cursor)).await
    }

    async fn watermark(&self) -> Result<u64, IndexError> {
        timed(&self.metrics, "watermark", index_code, self.inner.watermark()).await
    }

    async fn clear(&self) -> Result<(), IndexError> {
        timed(&self.metrics, "clear", index_code, self.inner.clear()).await
    }

    fn generations(&self) -> Option<&dyn IndexGenerations> {
        self.inner.generations()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store whose reads succeed and whose commits conflict.
    struct Fixed;

    #[async_trait]
    impl ResourceStore for Fixed {
        async fn read(
            &self,
            _: &TenantId,
            _: ResourceType,
            _: &LogicalId,
        ) -> Result<Option<ResourceVersion>, StoreError> {
            Ok(None)
        }

        async fn vread(
            &self,
            _: &TenantId,
            _: ResourceType,
            _: &LogicalId,
            _: u64,
        ) -> Result<Option<ResourceVersion>, StoreError> {
            Err(StoreError::Unavailable("down".into()))
        }

        async fn commit(&self, _: &TenantId, _: Vec<VersionWrite>) -> Result<CommitReceipt, StoreError> {
            Err(StoreError::Unavailable("down".into()))
        }

        async fn history(&self, _: &TenantId, _: HistoryQuery) -> Result<Vec<ResourceVersion>, StoreError> {
            Ok(Vec::new())
        }
    }

    #[tokio::test]
    async fn every_store_call_is_counted_by_operation_and_outcome() {
        let ops = Ops::new("test");
        let store = store(Arc::new(Fixed), &ops);
        let (tenant, patient) = (TenantId::default(), ResourceType::parse("Patient").expect("type"));
        let id = LogicalId::parse("p1").expect("id");
        for _ in 0..3 {
            assert_eq!(store.read(&tenant, patient, &id).await, Ok(None));
        }
        assert!(store.vread(&tenant, patient, &id, 1).await.is_err());
        let text = ops.render_metrics().await;
        assert!(text.contains("fhirmesh_store_requests_total{operation=\"read\",code=\"ok\"} 3\n"), "{text}");
        assert!(text.contains("fhirmesh_store_requests_total{operation=\"vread\",code=\"unavailable\"} 1\n"), "{text}");
        assert!(text.contains("fhirmesh_store_request_duration_seconds_count{operation=\"read\"} 3\n"), "{text}");
        assert!(!text.contains("operation=\"commit\""), "no commit was made: {text}");
    }
}
