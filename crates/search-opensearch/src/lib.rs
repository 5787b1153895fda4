//! The scale-out [`SearchIndex`] on OpenSearch. Index updates become documents (one per
//! resource, keyed by tenant and id, externally versioned so that a redelivered or reordered older
//! version never wins), deletes become versioned tombstones, and the watermark (the highest
//! change-log sequence applied) lives in a meta index and only moves forward. Searches compile
//! the backend-neutral query to the query DSL (`query.rs`) and page by `search_after` inside a
//! point in time (`search.rs`). See `design.md` beside this crate.

mod document;
mod query;
mod search;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use opensearch::http::StatusCode;
use opensearch::http::response::Response;
use opensearch::http::transport::{SingleNodeConnectionPool, TransportBuilder};
use opensearch::indices::{IndicesCreateParts, IndicesDeleteParts, IndicesPutIndexTemplateParts};
use opensearch::params::{Refresh, VersionType};
use opensearch::{BulkOperation, BulkParts, GetParts, IndexParts, OpenSearch, UpdateParts};
use serde_json::{Value, json};

use fhirmesh_core::model::TenantId;
use fhirmesh_core::ports::{IndexError, IndexPage, IndexUpdate, SearchIndex};
use fhirmesh_fhir::search::SearchQuery;
use fhirmesh_fhir::{LogicalId, ResourceType};

pub use crate::document::{document_id, to_document};
pub use crate::query::MAX_STAGED;
pub use crate::search::ESTIMATE_EXACT_UP_TO;

/// Where the index lives and how its indices are named.
#[derive(Debug, Clone)]
pub struct OpenSearchConfig {
    /// e.g. `http://127.0.0.1:9200`.
    pub url: String,
    /// Every index name starts with it: `{prefix}-r-{type}` for resources, `{prefix}-meta`.
    pub prefix: String,
}

impl Default for OpenSearchConfig {
    fn default() -> Self {
        OpenSearchConfig { url: "http://127.0.0.1:9200".into(), prefix: "fhirmesh".into() }
    }
}

/// The OpenSearch search index. Cheap to clone.
#[derive(Clone)]
pub struct OpenSearchIndex {
    client: OpenSearch,
    prefix: String,
    /// Set once the index template is in place (before the first write).
    template_installed: Arc<AtomicBool>,
}

const WATERMARK_ID: &str = "watermark";

fn unavailable(what: &str, err: impl std::fmt::Display) -> IndexError {
    IndexError::Unavailable(format!("OpenSearch {what}: {err}"))
}

/// Fails on an error status, naming what was asked and what OpenSearch said.
async fn check(what: &str, response: Response) -> Result<Value, IndexError> {
    let status = response.status_code();
    let body: Value = response.json().await.map_err(|e| unavailable(what, e))?;
    if status.is_success() {
        return Ok(body);
    }
    let reason = body.pointer("/error/reason").and_then(Value::as_str).unwrap_or("no reason given");
    // "all shards failed" says little: name the first shard's own failure too.
    let cause = body
        .pointer("/error/failed_shards/0/reason/reason")
        .or_else(|| body.pointer("/error/root_cause/0/reason"))
        .and_then(Value::as_str)
        .filter(|cause| *cause != reason)
        .map(|cause| format!(" ({cause})"))
        .unwrap_or_default();
    let detail = format!("OpenSearch {what}: {status} {reason}{cause}");
    Err(if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
        IndexError::Unavailable(detail)
    } else {
        IndexError::Internal(detail)
    })
}

impl OpenSearchIndex {
    /// Connects and installs the index template (idempotent): resource indices are created on
    /// first write with the fixed mapping of `document.rs`. An OpenSearch that does not answer is
    /// not an error here: searches report it as unavailable and the first write installs the
    /// template once it is back. A refusal (a bad url, a forbidden request) is.
    pub async fn connect(config: OpenSearchConfig) -> Result<OpenSearchIndex, IndexError> {
        let index = OpenSearchIndex::new(config)?;
        match index.ensure_template().await {
            Err(IndexError::Unavailable(reason)) => {
                tracing::warn!(%reason, "OpenSearch not reachable yet: search answers 503 until it is");
                Ok(index)
            }
            other => other.map(|()| index),
        }
    }

    /// Connects and installs the template now, failing when OpenSearch does not answer.
    pub async fn connect_now(config: OpenSearchConfig) -> Result<OpenSearchIndex, IndexError> {
        let index = OpenSearchIndex::new(config)?;
        index.ensure_template().await?;
        Ok(index)
    }

    fn new(config: OpenSearchConfig) -> Result<OpenSearchIndex, IndexError> {
        let url = opensearch::http::Url::parse(&config.url)
            .map_err(|e| IndexError::Internal(format!("OpenSearch url {:?}: {e}", config.url)))?;
        let transport = TransportBuilder::new(SingleNodeConnectionPool::new(url))
            .disable_proxy()
            .build()
            .map_err(|e| IndexError::Internal(format!("OpenSearch client: {e}")))?;
        Ok(OpenSearchIndex {
            client: OpenSearch::new(transport),
            prefix: config.prefix,
            template_installed: Arc::new(AtomicBool::new(false)),
        })
    }

    async fn ensure_template(&self) -> Result<(), IndexError> {
        if !self.template_installed.load(Ordering::Acquire) {
            self.install_template().await?;
            self.create_meta_index().await?;
            self.template_installed.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// The index of `resource_type`'s documents.
    pub fn index_of(&self, resource_type: ResourceType) -> String {
        format!("{}-r-{}", self.prefix, resource_type.as_str().to_ascii_lowercase())
    }

    fn meta_index(&self) -> String {
        format!("{}-meta", self.prefix)
    }

    async fn install_template(&self) -> Result<(), IndexError> {
        let template = json!({
            "index_patterns": [format!("{}-r-*", self.prefix)],
            "template": {
                "settings": {"number_of_shards": 1, "number_of_replicas": 0},
                "mappings": document::mapping(),
            },
        });
        let response = self
            .client
            .indices()
            .put_index_template(IndicesPutIndexTemplateParts::Name(&format!("{}-resources", self.prefix)))
            .body(template)
            .send()
            .await
            .map_err(|e| unavailable("install the index template", e))?;
        check("install the index template", response).await.map(|_| ())
    }

    /// Creates the meta index unless it exists; returns once its shard is active (so a watermark
    /// read never races its creation).
    async fn create_meta_index(&self) -> Result<(), IndexError> {
        let response = self
            .client
            .indices()
            .create(IndicesCreateParts::Index(&self.meta_index()))
            .body(json!({"settings": {"number_of_shards": 1, "number_of_replicas": 0}}))
            .send()
            .await
            .map_err(|e| unavailable("create the meta index", e))?;
        if response.status_code() == StatusCode::BAD_REQUEST {
            let body: Value = response.json().await.map_err(|e| unavailable("create the meta index", e))?;
            if body.pointer("/error/type").and_then(Value::as_str) == Some("resource_already_exists_exception") {
                return Ok(());
            }
            return Err(IndexError::Internal(format!("OpenSearch create the meta index: {body}")));
        }
        check("create the meta index", response).await.map(|_| ())
    }

    /// Applies updates idempotently: a document keeps the highest `version_id` it was given (an
    /// older one is refused by OpenSearch's external versioning and changes nothing); a delete is a
    /// versioned tombstone. Then the watermark moves to the highest `sequence` (never back). Both
    /// are visible to searches when this returns.
    pub async fn apply(&self, updates: Vec<IndexUpdate>) -> Result<(), IndexError> {
        let Some(highest) = updates.iter().map(|u| u.sequence).max() else { return Ok(()) };
        self.ensure_template().await?;
        let operations: Vec<BulkOperation<Value>> = updates
            .iter()
            .map(|update| {
                BulkOperation::index(to_document(update))
                    .index(self.index_of(update.resource_type))
                    .id(document_id(&update.tenant, &update.id))
                    .version(update.version_id as i64)
                    .version_type(VersionType::External)
                    .into()
            })
            .collect();
        let response = self
            .client
            .bulk(BulkParts::None)
            .body(operations)
            // One refresh per batch (batches grow with load): writes are searchable when this
            // returns, without waiting up to `refresh_interval` as `wait_for` does.
            .refresh(Refresh::True)
            .send()
            .await
            .map_err(|e| unavailable("bulk index", e))?;
        let body = check("bulk index", response).await?;
        bulk_failures(&body)?;
        self.raise_watermark(highest).await
    }

    /// Moves the watermark to `sequence` unless it is already further.
    async fn raise_watermark(&self, sequence: u64) -> Result<(), IndexError> {
        let response = self
            .client
            .update(UpdateParts::IndexId(&self.meta_index(), WATERMARK_ID))
            .body(json!({
                "script": {
                    "lang": "painless",
                    "source": "if (params.seq > ctx._source.seq) { ctx._source.seq = params.seq } else { ctx.op = 'none' }",
                    "params": {"seq": sequence},
                },
                "upsert": {"seq": sequence},
            }))
            .refresh(Refresh::True)
            .retry_on_conflict(5)
            .send()
            .await
            .map_err(|e| unavailable("raise the watermark", e))?;
        check("raise the watermark", response).await.map(|_| ())
    }

    /// The highest change-log sequence applied (0 when empty).
    pub async fn watermark(&self) -> Result<u64, IndexError> {
        let response = self
            .client
            .get(GetParts::IndexId(&self.meta_index(), WATERMARK_ID))
            .send()
            .await
            .map_err(|e| unavailable("read the watermark", e))?;
        if response.status_code() == StatusCode::NOT_FOUND {
            return Ok(0);
        }
        let body = check("read the watermark", response).await?;
        body.pointer("/_source/seq")
            .and_then(Value::as_u64)
            .ok_or_else(|| IndexError::Internal(format!("OpenSearch watermark document without seq: {body}")))
    }

    /// Removes every resource document and resets the watermark. The resource indices are
    /// dropped, not emptied: a fresh index has no version tombstones, so a reindex can write any
    /// version again.
    pub async fn clear(&self) -> Result<(), IndexError> {
        let pattern = format!("{}-r-*", self.prefix);
        let response = self
            .client
            .indices()
            .delete(IndicesDeleteParts::Index(&[pattern.as_str()]))
            .send()
            .await
            .map_err(|e| unavailable("drop the resource indices", e))?;
        check("drop the resource indices", response).await?;
        let response = self
            .client
            .index(IndexParts::IndexId(&self.meta_index(), WATERMARK_ID))
            .body(json!({"seq": 0}))
            .refresh(Refresh::True)
            .send()
            .await
            .map_err(|e| unavailable("reset the watermark", e))?;
        check("reset the watermark", response).await.map(|_| ())
    }

    /// The stored document of a resource (version, tombstone flag, values), `None` if never
    /// indexed. For tests and diagnostics until search lands.
    pub async fn document(
        &self,
        tenant: &TenantId,
        resource_type: ResourceType,
        id: &LogicalId,
    ) -> Result<Option<(u64, Value)>, IndexError> {
        let response = self
            .client
            .get(GetParts::IndexId(&self.index_of(resource_type), &document_id(tenant, id)))
            .send()
            .await
            .map_err(|e| unavailable("read a document", e))?;
        if response.status_code() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let body = check("read a document", response).await?;
        if body.get("found") != Some(&Value::Bool(true)) {
            return Ok(None);
        }
        let version = body.get("_version").and_then(Value::as_u64).unwrap_or(0);
        Ok(Some((version, body.get("_source").cloned().unwrap_or(Value::Null))))
    }
}

#[async_trait::async_trait]
impl SearchIndex for OpenSearchIndex {
    async fn apply(&self, updates: Vec<IndexUpdate>) -> Result<(), IndexError> {
        OpenSearchIndex::apply(self, updates).await
    }

    async fn search(
        &self,
        tenant: &TenantId,
        query: &SearchQuery,
        cursor: Option<&str>,
    ) -> Result<IndexPage, IndexError> {
        self.search_at(tenant, query, cursor, time::OffsetDateTime::now_utc()).await
    }

    async fn watermark(&self) -> Result<u64, IndexError> {
        OpenSearchIndex::watermark(self).await
    }

    async fn clear(&self) -> Result<(), IndexError> {
        OpenSearchIndex::clear(self).await
    }
}

/// The bulk items that failed for another reason than "an equal or newer version is there".
fn bulk_failures(body: &Value) -> Result<(), IndexError> {
    if body.get("errors") != Some(&Value::Bool(true)) {
        return Ok(());
    }
    let items = body.get("items").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    let mut transient = false;
    let mut failures = Vec::new();
    for item in items {
        let Some(result) = item.as_object().and_then(|o| o.values().next()) else { continue };
        let status = result.get("status").and_then(Value::as_u64).unwrap_or(0);
        if status < 300 || status == 409 {
            continue; // applied, or a stale version: nothing to do
        }
        transient |= status == 429 || status >= 500;
        let reason = result.pointer("/error/reason").and_then(Value::as_str).unwrap_or("?");
        failures.push(format!("{} {status}: {reason}", result.get("_id").and_then(Value::as_str).unwrap_or("?")));
    }
    if failures.is_empty() {
        return Ok(());
    }
    let detail = format!("OpenSearch bulk index: {} failed, first: {}", failures.len(), failures[0]);
    Err(if transient { IndexError::Unavailable(detail) } else { IndexError::Internal(detail) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_versions_in_a_bulk_answer_are_not_failures() {
        let ok = json!({"errors": false, "items": []});
        assert!(bulk_failures(&ok).is_ok());
        let stale = json!({"errors": true, "items": [
            {"index": {"_id": "t/a", "status": 201}},
            {"index": {"_id": "t/b", "status": 409, "error": {"reason": "version conflict"}}},
        ]});
        assert!(bulk_failures(&stale).is_ok());
        let busy =
            json!({"errors": true, "items": [{"index": {"_id": "t/c", "status": 429, "error": {"reason": "busy"}}}]});
        assert!(matches!(bulk_failures(&busy), Err(IndexError::Unavailable(m)) if m.contains("t/c")));
        let bad =
            json!({"errors": true, "items": [{"index": {"_id": "t/d", "status": 400, "error": {"reason": "mapper"}}}]});
        assert!(matches!(bulk_failures(&bad), Err(IndexError::Internal(m)) if m.contains("mapper")));
    }
}
