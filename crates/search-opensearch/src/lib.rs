//! The scale-out search index on OpenSearch — first increment: the write side. Index updates
//! become documents (one per resource, keyed by tenant and id, externally versioned so that a
//! redelivered or reordered older version never wins), deletes become versioned tombstones, and
//! the watermark (the highest change-log sequence applied) lives in a meta index and only moves
//! forward. See `design.md` beside this crate.
//!
//! NOT YET: searching (compiling the search AST to the query DSL), the `SearchIndex` port
//! implementation built on it, aliases for zero-downtime reindex, and the service wiring.

mod document;

use opensearch::http::StatusCode;
use opensearch::http::response::Response;
use opensearch::http::transport::{SingleNodeConnectionPool, TransportBuilder};
use opensearch::indices::{IndicesDeleteParts, IndicesPutIndexTemplateParts};
use opensearch::params::{Refresh, VersionType};
use opensearch::{BulkOperation, BulkParts, GetParts, IndexParts, OpenSearch, UpdateParts};
use serde_json::{Value, json};

use fhirmesh_core::model::TenantId;
use fhirmesh_core::ports::{IndexError, IndexUpdate};
use fhirmesh_fhir::{LogicalId, ResourceType};

pub use crate::document::{document_id, to_document};

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

/// The OpenSearch search index (write side). Cheap to clone.
#[derive(Clone)]
pub struct OpenSearchIndex {
    client: OpenSearch,
    prefix: String,
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
    let detail = format!("OpenSearch {what}: {status} {reason}");
    Err(if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
        IndexError::Unavailable(detail)
    } else {
        IndexError::Internal(detail)
    })
}

impl OpenSearchIndex {
    /// Connects and installs the index template (idempotent): resource indices are created on
    /// first write with the fixed mapping of `document.rs`.
    pub async fn connect(config: OpenSearchConfig) -> Result<OpenSearchIndex, IndexError> {
        let url = opensearch::http::Url::parse(&config.url)
            .map_err(|e| IndexError::Internal(format!("OpenSearch url {:?}: {e}", config.url)))?;
        let transport = TransportBuilder::new(SingleNodeConnectionPool::new(url))
            .disable_proxy()
            .build()
            .map_err(|e| IndexError::Internal(format!("OpenSearch client: {e}")))?;
        let index = OpenSearchIndex { client: OpenSearch::new(transport), prefix: config.prefix };
        index.install_template().await?;
        Ok(index)
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

    /// Applies updates idempotently: a document keeps the highest `version_id` it was given (an
    /// older one is refused by OpenSearch's external versioning and changes nothing); a delete is a
    /// versioned tombstone. Then the watermark moves to the highest `sequence` (never back). Both
    /// are visible to searches when this returns.
    pub async fn apply(&self, updates: Vec<IndexUpdate>) -> Result<(), IndexError> {
        let Some(highest) = updates.iter().map(|u| u.sequence).max() else { return Ok(()) };
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
            .refresh(Refresh::WaitFor)
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
