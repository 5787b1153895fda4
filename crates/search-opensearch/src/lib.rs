//! The scale-out [`SearchIndex`] on OpenSearch. Index updates become documents (one per
//! resource, keyed by tenant and id, externally versioned so that a redelivered or reordered older
//! version never wins), deletes become versioned tombstones, and the watermark (the highest
//! change-log sequence applied) lives in a meta index and only moves forward. Documents live in
//! index generations read through aliases, so a reindex fills a new generation and then switches
//! searches at once (`generations.rs`). Searches compile
//! the backend-neutral query to the query DSL (`query.rs`) and page by `search_after` inside a
//! point in time (`search.rs`). See `design.md` beside this crate.

mod document;
mod generations;
mod query;
mod search;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opensearch::http::StatusCode;
use opensearch::http::response::Response;
use opensearch::http::transport::{SingleNodeConnectionPool, TransportBuilder};
use opensearch::indices::{IndicesCreateParts, IndicesPutIndexTemplateParts};
use opensearch::params::Refresh;
use opensearch::{BulkParts, GetParts, OpenSearch};
use serde_json::{Value, json};

use fhirmesh_core::model::TenantId;
use fhirmesh_core::ports::{IndexError, IndexGenerations, IndexPage, IndexUpdate, SearchIndex};
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
    /// Every index name starts with it: `{prefix}-g{generation}-{type}` for resources (read
    /// through the aliases `{prefix}-r-{type}`), `{prefix}-meta`.
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
    target: Target,
    /// The (generation, type) pairs whose search alias this process has pointed.
    aliased: Arc<Mutex<HashSet<(u32, ResourceType)>>>,
}

/// Which generations a handle applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// Wherever live writes go (the state document says): the index the server uses.
    Live,
    /// One generation only, with its own watermark: a rebuild's handles.
    Generation(u32),
}

/// A bulk request carries at most this much (AWS OpenSearch Service refuses bodies over 10 MiB
/// on small instance types); a larger document goes alone.
const MAX_BULK_BYTES: usize = 5 << 20;

/// Attempts of a bulk request whose items OpenSearch refused as too busy (429), with doubling
/// pauses from 100 ms (~3 s in all) before the batch is reported unavailable.
const BULK_ATTEMPTS: u32 = 6;

/// Rounds of "write where live writes go, then check nothing changed" before giving up.
const APPLY_ROUNDS: usize = 4;

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
            target: Target::Live,
            aliased: Arc::new(Mutex::new(HashSet::new())),
        })
    }

    async fn ensure_template(&self) -> Result<(), IndexError> {
        if !self.template_installed.load(Ordering::Acquire) {
            self.install_template().await?;
            self.create_meta_index().await?;
            self.create_state().await?;
            self.template_installed.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// The search alias of `resource_type`'s documents (pointing at the served generation).
    pub fn index_of(&self, resource_type: ResourceType) -> String {
        format!("{}-r-{}", self.prefix, resource_type.as_str().to_ascii_lowercase())
    }

    fn meta_index(&self) -> String {
        format!("{}-meta", self.prefix)
    }

    async fn install_template(&self) -> Result<(), IndexError> {
        let template = json!({
            "index_patterns": [format!("{}-g*", self.prefix)],
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
            .body(json!({
                "settings": {"number_of_shards": 1, "number_of_replicas": 0},
                "mappings": {"enabled": false},
            }))
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
    ///
    /// The live handle writes to every generation live writes go to (two during a rebuild) and
    /// raises the served one's watermark only if that set and the served generation did not change
    /// meanwhile — checked atomically with the raise; otherwise it writes again where it did not
    /// yet. A rebuild's handle writes its one generation.
    pub async fn apply(&self, updates: Vec<IndexUpdate>) -> Result<(), IndexError> {
        let Some(highest) = updates.iter().map(|u| u.sequence).max() else { return Ok(()) };
        self.ensure_template().await?;
        let mut types: Vec<ResourceType> = updates.iter().map(|u| u.resource_type).collect();
        types.sort_unstable();
        types.dedup();
        let mut state = self.state().await?;
        let mut written: Vec<u32> = Vec::new();
        for _ in 0..APPLY_ROUNDS {
            let targets = match self.target {
                Target::Live => state.write.clone(),
                Target::Generation(generation) => vec![generation],
            };
            for generation in targets {
                if !written.contains(&generation) {
                    self.bulk(&updates, generation).await?;
                    written.push(generation);
                }
            }
            // Before the watermark says so, searches must find these types.
            if written.contains(&state.read) {
                self.ensure_aliases(state.read, &types).await?;
            }
            let after = match self.target {
                Target::Live => self.raise_served(state.read, &written, highest).await?,
                Target::Generation(generation) => return self.raise_generation(generation, highest).await.map(|_| ()),
            };
            if after.read == state.read && after.write.iter().all(|g| written.contains(g)) {
                return Ok(());
            }
            state = after;
        }
        Err(IndexError::Unavailable("the index generations kept changing while a batch was applied".into()))
    }

    /// Writes `updates` into `generation`'s indices with the bulk API, in requests of at most
    /// [`MAX_BULK_BYTES`]; items refused as too busy are sent again after a pause.
    async fn bulk(&self, updates: &[IndexUpdate], generation: u32) -> Result<(), IndexError> {
        let mut items = Vec::with_capacity(updates.len());
        for update in updates {
            let action = json!({"index": {
                "_index": self.generation_index(generation, update.resource_type),
                "_id": document_id(&update.tenant, &update.id),
                "version": update.version_id,
                "version_type": "external",
            }});
            let source = serde_json::to_vec(&to_document(update))
                .map_err(|e| IndexError::Internal(format!("serialize a document: {e}")))?;
            items.push((action.to_string().into_bytes(), source));
        }
        let sizes: Vec<usize> = items.iter().map(|(action, source)| action.len() + source.len() + 2).collect();
        for request in requests_of(&sizes, MAX_BULK_BYTES) {
            self.bulk_with_retries(&items[request]).await?;
        }
        Ok(())
    }

    /// One bulk request of `items` (action and source lines), then again for the items OpenSearch
    /// refused as too busy (429), with doubling pauses.
    async fn bulk_with_retries(&self, items: &[(Vec<u8>, Vec<u8>)]) -> Result<(), IndexError> {
        let mut pending: Vec<usize> = (0..items.len()).collect();
        let mut pause = Duration::from_millis(100);
        for attempt in 1..=BULK_ATTEMPTS {
            let body: Vec<&[u8]> =
                pending.iter().flat_map(|&i| [items[i].0.as_slice(), items[i].1.as_slice()]).collect();
            let response = self
                .client
                .bulk(BulkParts::None)
                .body(body)
                // One refresh per request (requests grow with load): writes are searchable when
                // this returns, without waiting up to `refresh_interval` as `wait_for` does.
                .refresh(Refresh::True)
                .send()
                .await
                .map_err(|e| unavailable("bulk index", e))?;
            let answer = if response.status_code() == StatusCode::TOO_MANY_REQUESTS && attempt < BULK_ATTEMPTS {
                None
            } else {
                Some(check("bulk index", response).await?)
            };
            let busy = match &answer {
                None => (0..pending.len()).collect(),
                Some(body) => bulk_failures(body)?,
            };
            if busy.is_empty() {
                return Ok(());
            }
            if attempt == BULK_ATTEMPTS {
                return Err(IndexError::Unavailable(format!(
                    "OpenSearch bulk index: {} documents refused as too busy (429) {BULK_ATTEMPTS} times",
                    busy.len()
                )));
            }
            tracing::debug!(busy = busy.len(), ?pause, "OpenSearch is busy; sending the refused documents again");
            pending = busy.into_iter().map(|position| pending[position]).collect();
            tokio::time::sleep(pause).await;
            pause *= 2;
        }
        Ok(())
    }

    /// The highest change-log sequence applied (0 when empty): the served generation's, or a
    /// rebuild handle's own generation's.
    pub async fn watermark(&self) -> Result<u64, IndexError> {
        let state = self.state().await?;
        Ok(match self.target {
            Target::Live => state.watermark(state.read),
            Target::Generation(generation) => state.watermark(generation),
        })
    }

    /// Removes every resource document and resets the watermark: searches move to a fresh, empty
    /// generation (a fresh index has no version tombstones, so a reindex can write any version
    /// again) and every other one is dropped.
    pub async fn clear(&self) -> Result<(), IndexError> {
        self.restart().await
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

    fn generations(&self) -> Option<&dyn IndexGenerations> {
        Some(self)
    }
}

/// Splits items of `sizes` bytes into consecutive requests of at most `max` bytes each (an item
/// larger than `max` alone).
fn requests_of(sizes: &[usize], max: usize) -> Vec<std::ops::Range<usize>> {
    let mut requests = Vec::new();
    let (mut start, mut size) = (0, 0);
    for (position, item) in sizes.iter().enumerate() {
        if position > start && size + item > max {
            requests.push(start..position);
            (start, size) = (position, 0);
        }
        size += item;
    }
    if start < sizes.len() {
        requests.push(start..sizes.len());
    }
    requests
}

/// The positions of the bulk items OpenSearch refused as too busy (429), to send again. Items
/// refused because an equal or newer version is there are done; any other failure is an error
/// naming the first document.
fn bulk_failures(body: &Value) -> Result<Vec<usize>, IndexError> {
    if body.get("errors") != Some(&Value::Bool(true)) {
        return Ok(Vec::new());
    }
    let items = body.get("items").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    let mut busy = Vec::new();
    let mut transient = false;
    let mut failures = Vec::new();
    for (position, item) in items.iter().enumerate() {
        let Some(result) = item.as_object().and_then(|o| o.values().next()) else { continue };
        let status = result.get("status").and_then(Value::as_u64).unwrap_or(0);
        if status < 300 || status == 409 {
            continue; // applied, or a stale version: nothing to do
        }
        if status == 429 {
            busy.push(position);
            continue;
        }
        transient |= status >= 500;
        let reason = result.pointer("/error/reason").and_then(Value::as_str).unwrap_or("?");
        failures.push(format!("{} {status}: {reason}", result.get("_id").and_then(Value::as_str).unwrap_or("?")));
    }
    if failures.is_empty() {
        return Ok(busy);
    }
    let detail = format!("OpenSearch bulk index: {} failed, first: {}", failures.len(), failures[0]);
    Err(if transient { IndexError::Unavailable(detail) } else { IndexError::Internal(detail) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bulk_requests_stay_under_the_size_bound() {
        assert_eq!(requests_of(&[], 10), Vec::<std::ops::Range<usize>>::new());
        assert_eq!(requests_of(&[4, 4, 4], 10), vec![0..2, 2..3]);
        assert_eq!(requests_of(&[4, 6, 4], 10), vec![0..2, 2..3]);
        // An item over the bound goes alone, never dropped.
        assert_eq!(requests_of(&[3, 25, 3, 3], 10), vec![0..1, 1..2, 2..4]);
        assert_eq!(requests_of(&[25], 10), vec![0..1]);
    }

    #[test]
    fn stale_versions_in_a_bulk_answer_are_not_failures() {
        let ok = json!({"errors": false, "items": []});
        assert_eq!(bulk_failures(&ok), Ok(vec![]));
        let stale = json!({"errors": true, "items": [
            {"index": {"_id": "t/a", "status": 201}},
            {"index": {"_id": "t/b", "status": 409, "error": {"reason": "version conflict"}}},
        ]});
        assert_eq!(bulk_failures(&stale), Ok(vec![]));
        let busy = json!({"errors": true, "items": [
            {"index": {"_id": "t/a", "status": 200}},
            {"index": {"_id": "t/c", "status": 429, "error": {"reason": "busy"}}},
        ]});
        assert_eq!(bulk_failures(&busy), Ok(vec![1]));
        let down =
            json!({"errors": true, "items": [{"index": {"_id": "t/e", "status": 503, "error": {"reason": "down"}}}]});
        assert!(matches!(bulk_failures(&down), Err(IndexError::Unavailable(m)) if m.contains("t/e")));
        let bad =
            json!({"errors": true, "items": [{"index": {"_id": "t/d", "status": 400, "error": {"reason": "mapper"}}}]});
        assert!(matches!(bulk_failures(&bad), Err(IndexError::Internal(m)) if m.contains("mapper")));
    }
}
