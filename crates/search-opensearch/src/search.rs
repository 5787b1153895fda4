//! Searching: one `_search` per page, sorted by the query's keys then type and id, continued with
//! `search_after` from a cursor (no `from`, so no 10,000-result window), inside a point in time
//! once a search has more than one page, so later pages read the same snapshot as the second.

use std::pin::Pin;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use opensearch::SearchParts;
use serde_json::{Value, json};
use time::OffsetDateTime;

use fhirmesh_core::model::TenantId;
use fhirmesh_core::ports::{IndexError, IndexHit, IndexPage};
use fhirmesh_fhir::search::query::TotalMode;
use fhirmesh_fhir::search::{ParamType, SearchQuery};
use fhirmesh_fhir::{LogicalId, ResourceType};

use crate::query::{Compiler, Keys, MAX_STAGED, Stages};
use crate::{OpenSearchIndex, check, unavailable};

/// `Estimate` totals are exact up to this many matches (`track_total_hits`); past it, none.
pub const ESTIMATE_EXACT_UP_TO: u64 = 1000;

/// How long a point in time lives between two pages.
const PIT_KEEP_ALIVE: &str = "5m";

/// The longest point-in-time id a cursor carries (a point in time over a few indices is a few
/// hundred bytes; one over every resource type, several kilobytes).
const MAX_PIT_ID: usize = 1024;

/// Tries of a search that OpenSearch answers 503 (see `run_search`).
const SEARCH_ATTEMPTS: usize = 6;

/// Documents read per request while resolving a stage.
const STAGE_PAGE: usize = 10_000;

const CURSOR_VERSION: &str = "o1";

/// Which way a cursor walks from its boundary row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Next,
    Previous,
}

/// A decoded cursor: `o1.<n|p>.<fingerprint>.<watermark>.<pit>.<after>`, the point in time id
/// (`-` for none) and the boundary row's sort values (a JSON array) in URL-safe base64.
#[derive(Debug, Clone, PartialEq)]
struct Cursor {
    direction: Direction,
    fingerprint: u64,
    /// The watermark of the snapshot the point in time was opened on.
    watermark: u64,
    pit: Option<String>,
    /// The boundary row's sort values: one per sort key, then type and id.
    after: Vec<Value>,
}

fn invalid(why: &str) -> IndexError {
    IndexError::InvalidCursor(why.to_owned())
}

impl Cursor {
    fn encode(&self) -> String {
        let direction = match self.direction {
            Direction::Next => "n",
            Direction::Previous => "p",
        };
        let pit = self.pit.as_deref().map_or_else(|| "-".to_owned(), |pit| URL_SAFE_NO_PAD.encode(pit));
        let after = URL_SAFE_NO_PAD.encode(Value::Array(self.after.clone()).to_string());
        format!("{CURSOR_VERSION}.{direction}.{:016x}.{}.{pit}.{after}", self.fingerprint, self.watermark)
    }

    fn decode(text: &str) -> Result<Cursor, IndexError> {
        if text.len() > 16 * 1024 {
            return Err(invalid("too long"));
        }
        let parts: Vec<&str> = text.split('.').collect();
        let [version, direction, fingerprint, watermark, pit, after] = parts.as_slice() else {
            return Err(invalid("unknown format"));
        };
        if *version != CURSOR_VERSION {
            return Err(invalid("unknown format"));
        }
        let direction = match *direction {
            "n" => Direction::Next,
            "p" => Direction::Previous,
            _ => return Err(invalid("bad direction")),
        };
        let fingerprint = Some(fingerprint)
            .filter(|f| f.len() == 16)
            .and_then(|f| u64::from_str_radix(f, 16).ok())
            .ok_or_else(|| invalid("bad fingerprint"))?;
        let watermark = watermark.parse::<u64>().map_err(|_| invalid("bad watermark"))?;
        let pit = match *pit {
            "-" => None,
            encoded => Some(
                URL_SAFE_NO_PAD
                    .decode(encoded)
                    .ok()
                    .and_then(|bytes| String::from_utf8(bytes).ok())
                    .ok_or_else(|| invalid("bad point in time"))?,
            ),
        };
        let after = URL_SAFE_NO_PAD
            .decode(after)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
            .and_then(|value| match value {
                Value::Array(values) => Some(values),
                _ => None,
            })
            .ok_or_else(|| invalid("bad keys"))?;
        Ok(Cursor { direction, fingerprint, watermark, pit, after })
    }

    /// Checks the cursor against the query it is used with.
    fn check(&self, tenant: &TenantId, query: &SearchQuery) -> Result<(), IndexError> {
        if self.fingerprint != query.fingerprint(tenant.as_str()) {
            return Err(invalid("the cursor belongs to another search"));
        }
        if self.after.len() != query.sort.len() + 2 {
            return Err(invalid("wrong number of keys"));
        }
        let (values, row) = self.after.split_at(query.sort.len());
        let fits = query.sort.iter().zip(values).all(|(key, value)| match value {
            Value::Null => true,
            Value::Number(_) => matches!(key.kind, ParamType::Date | ParamType::Number | ParamType::Quantity),
            Value::String(text) => {
                matches!(key.kind, ParamType::String | ParamType::Token | ParamType::Reference | ParamType::Uri)
                    // What OpenSearch returns for a missing double sorted last (or first).
                    || (matches!(key.kind, ParamType::Number | ParamType::Quantity)
                        && matches!(text.as_str(), "Infinity" | "-Infinity"))
            }
            _ => false,
        });
        if !fits {
            return Err(invalid("sort key of the wrong type"));
        }
        let type_ok = matches!(&row[0], Value::String(t) if query.types.iter().any(|q| q.as_str() == t));
        let id_ok = matches!(&row[1], Value::String(id) if LogicalId::parse(id).is_ok());
        if !type_ok || !id_ok {
            return Err(invalid("bad row key"));
        }
        Ok(())
    }
}

/// One hit with its sort values.
struct Row {
    hit: IndexHit,
    sort: Vec<Value>,
}

fn parse_hits(body: &Value) -> Result<Vec<Row>, IndexError> {
    let hits = body.pointer("/hits/hits").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    hits.iter()
        .map(|hit| {
            let source = hit.get("_source").unwrap_or(&Value::Null);
            let resource_type = source
                .get("type")
                .and_then(Value::as_str)
                .and_then(ResourceType::parse)
                .ok_or_else(|| IndexError::Internal(format!("OpenSearch hit without a known type: {hit}")))?;
            let id = source
                .get("id")
                .and_then(Value::as_str)
                .and_then(|id| LogicalId::parse(id).ok())
                .ok_or_else(|| IndexError::Internal(format!("OpenSearch hit without a valid id: {hit}")))?;
            let version_id = source.get("version").and_then(Value::as_u64).unwrap_or(0);
            let sort = hit.get("sort").and_then(Value::as_array).cloned().unwrap_or_default();
            Ok(Row { hit: IndexHit { resource_type, id, version_id }, sort })
        })
        .collect()
}

/// What a search error means: with a client's cursor in the request, a 400 is the cursor's fault.
fn search_error(err: IndexError, with_cursor: bool) -> IndexError {
    match err {
        IndexError::Internal(detail) if with_cursor && detail.contains(" 400 ") => {
            IndexError::InvalidCursor(format!("the cursor does not fit this search ({detail})"))
        }
        other => other,
    }
}

/// Whether an error answer to a point-in-time search says the point in time is gone.
fn pit_gone(body: &Value) -> bool {
    let text = body.to_string();
    text.contains("search_context_missing") || text.contains("No search context found")
}

impl OpenSearchIndex {
    /// The indices holding `types`: the pattern of every resource index for a search over many.
    fn indices_of(&self, types: &[ResourceType]) -> Vec<String> {
        if types.len() > 16 {
            return vec![format!("{}-r-*", self.prefix)];
        }
        types.iter().map(|t| self.index_of(*t)).collect()
    }

    /// Runs one `_search` on `indices` (or the point in time in `body`). `Ok(None)` when the
    /// point in time was gone. A shard that is not searchable yet (an index the indexer is
    /// creating this instant) answers 503 "all shards failed": retried a few times, ~3 s in
    /// all, before the search reports the index unavailable.
    async fn run_search(&self, indices: &[String], body: Value) -> Result<Option<Value>, IndexError> {
        let mut pause = std::time::Duration::from_millis(100);
        for _ in 0..SEARCH_ATTEMPTS - 1 {
            match self.search_once(indices, body.clone()).await {
                Err(IndexError::Unavailable(reason)) if reason.contains(" 503 ") => {
                    tracing::debug!(%reason, "search shards not ready; retrying");
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
                other => return other,
            }
        }
        self.search_once(indices, body).await
    }

    async fn search_once(&self, indices: &[String], body: Value) -> Result<Option<Value>, IndexError> {
        let with_pit = body.get("pit").is_some();
        let response = if with_pit {
            self.client.search(SearchParts::None).body(body).send().await
        } else {
            let names: Vec<&str> = indices.iter().map(String::as_str).collect();
            self.client
                .search(SearchParts::Index(&names))
                .ignore_unavailable(true)
                .allow_no_indices(true)
                .body(body)
                .send()
                .await
        }
        .map_err(|e| unavailable("search", e))?;
        let status = response.status_code();
        if with_pit && (status.as_u16() == 404 || status.as_u16() == 400) {
            let body: Value = response.json().await.map_err(|e| unavailable("search", e))?;
            if pit_gone(&body) {
                return Ok(None);
            }
            let reason = body.pointer("/error/reason").and_then(Value::as_str).unwrap_or("no reason given");
            return Err(IndexError::Internal(format!("OpenSearch search: {status} {reason}")));
        }
        check("search", response).await.map(Some)
    }

    /// Opens a point in time on `indices`; `None` when OpenSearch would not (too many open, no
    /// index yet): paging then goes on without one.
    async fn open_pit(&self, indices: &[String]) -> Option<String> {
        let names: Vec<&str> = indices.iter().map(String::as_str).collect();
        let response = self
            .client
            .create_pit(opensearch::CreatePitParts::Index(&names))
            .keep_alive(PIT_KEEP_ALIVE)
            .ignore_unavailable(true)
            .send()
            .await
            .ok()?;
        match check("open a point in time", response).await {
            // A point in time over many indices has a long id, and it travels in every page's
            // url: past `MAX_PIT_ID` the search pages on the live index instead.
            Ok(body) => {
                body.get("pit_id").and_then(Value::as_str).filter(|id| id.len() <= MAX_PIT_ID).map(str::to_owned)
            }
            Err(err) => {
                tracing::debug!(error = %err, "paging without a point in time");
                None
            }
        }
    }

    /// [`fhirmesh_core::ports::SearchIndex::search`] with `now` given (it anchors the `ap`
    /// prefix on dates).
    pub async fn search_at(
        &self,
        tenant: &TenantId,
        query: &SearchQuery,
        cursor: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<IndexPage, IndexError> {
        let cursor = cursor.map(Cursor::decode).transpose()?;
        if let Some(cursor) = &cursor {
            cursor.check(tenant, query)?;
        }
        // Read before the documents: the page then reflects at least this much (see design.md).
        let watermark = match &cursor {
            Some(Cursor { pit: Some(_), watermark, .. }) => *watermark,
            _ => self.watermark().await?,
        };
        if query.types.is_empty() {
            return Ok(IndexPage { hits: Vec::new(), total: None, next: None, previous: None, watermark });
        }
        let compiler = Compiler { tenant, now, stages: self };
        let mut filter = compiler.scope(&query.types);
        for criterion in &query.criteria {
            filter.push(compiler.criterion(&query.types, criterion).await?);
        }
        let reversed = matches!(&cursor, Some(c) if c.direction == Direction::Previous);
        let count = query.count;
        let mut body = json!({
            "query": {"bool": {"filter": filter}},
            "sort": Compiler::sort(&query.sort, reversed)?,
            "size": if count == 0 { 0 } else { count + 1 },
            "_source": ["type", "id", "version"],
            "track_total_hits": match query.total {
                TotalMode::None => json!(false),
                TotalMode::Estimate => json!(ESTIMATE_EXACT_UP_TO),
                TotalMode::Accurate => json!(true),
            },
        });
        if let Some(cursor) = &cursor {
            body["search_after"] = Value::Array(cursor.after.clone());
        }
        let indices = self.indices_of(&query.types);
        let mut pit = cursor.as_ref().and_then(|c| c.pit.clone());
        let mut answer = None;
        if let Some(id) = &pit {
            let mut with_pit = body.clone();
            with_pit["pit"] = json!({"id": id, "keep_alive": PIT_KEEP_ALIVE});
            answer = self.run_search(&indices, with_pit).await.map_err(|e| search_error(e, true))?;
            if answer.is_none() {
                tracing::debug!("point in time expired: paging on the live index");
                pit = None;
            }
        }
        let answer = match answer {
            Some(answer) => answer,
            None => self
                .run_search(&indices, body)
                .await
                .map_err(|e| search_error(e, cursor.is_some()))?
                .ok_or_else(|| IndexError::Internal("OpenSearch search without an answer".to_owned()))?,
        };
        if let Some(id) = answer.get("pit_id").and_then(Value::as_str) {
            pit = Some(id.to_owned());
        }
        let total = match query.total {
            TotalMode::None => None,
            _ => {
                let value = answer.pointer("/hits/total/value").and_then(Value::as_u64);
                let exact = answer.pointer("/hits/total/relation").and_then(Value::as_str) == Some("eq");
                value.filter(|_| exact)
            }
        };
        if count == 0 {
            return Ok(IndexPage { hits: Vec::new(), total, next: None, previous: None, watermark });
        }
        let mut rows = parse_hits(&answer)?;
        let more = rows.len() > count;
        rows.truncate(count);
        if reversed {
            rows.reverse();
        }
        let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
            return Ok(IndexPage { hits: Vec::new(), total, next: None, previous: None, watermark });
        };
        let (has_next, has_previous) = match &cursor {
            // First page: nothing before it.
            None => (more, false),
            // Walking forward from a row of an earlier page: that row precedes this page.
            Some(c) if c.direction == Direction::Next => (more, true),
            // Walking backwards from a row of a later page: that row follows this page.
            Some(_) => (true, more),
        };
        if (has_next || has_previous) && pit.is_none() && cursor.is_none() {
            pit = self.open_pit(&indices).await;
        }
        let fingerprint = query.fingerprint(tenant.as_str());
        let make = |direction: Direction, row: &Row| {
            Cursor { direction, fingerprint, watermark, pit: pit.clone(), after: row.sort.clone() }.encode()
        };
        let next = has_next.then(|| make(Direction::Next, last));
        let previous = has_previous.then(|| make(Direction::Previous, first));
        Ok(IndexPage { hits: rows.into_iter().map(|row| row.hit).collect(), total, next, previous, watermark })
    }

    /// The live resources of `types` matching `query` (or the targets of their `references`
    /// parameter), read in pages of [`STAGE_PAGE`] by `search_after`, at most [`MAX_STAGED`].
    async fn stage(&self, types: &[ResourceType], query: Value, references: Option<&str>) -> Result<Keys, IndexError> {
        let indices = self.indices_of(types);
        let mut keys = Keys::new();
        let (mut read, mut reached) = (0_usize, 0_usize);
        let mut after: Option<Value> = None;
        loop {
            let mut body = json!({
                "query": query,
                "sort": [{"type": "asc"}, {"id": "asc"}],
                "size": STAGE_PAGE,
                "_source": if references.is_some() { json!(["type", "id", "r"]) } else { json!(["type", "id"]) },
                "track_total_hits": false,
            });
            if let Some(after) = after.take() {
                body["search_after"] = after;
            }
            let answer = self
                .run_search(&indices, body)
                .await?
                .ok_or_else(|| IndexError::Internal("OpenSearch search without an answer".to_owned()))?;
            let hits = answer.pointer("/hits/hits").and_then(Value::as_array).cloned().unwrap_or_default();
            read += hits.len();
            if read > MAX_STAGED {
                return Err(too_many());
            }
            for hit in &hits {
                let source = hit.get("_source").unwrap_or(&Value::Null);
                match references {
                    None => {
                        let resource_type = source.get("type").and_then(Value::as_str).and_then(ResourceType::parse);
                        let id = source.get("id").and_then(Value::as_str);
                        if let (Some(resource_type), Some(id)) = (resource_type, id)
                            && keys.entry(resource_type).or_default().insert(id.to_owned())
                        {
                            reached += 1;
                        }
                    }
                    Some(param) => {
                        let entries = source.get("r").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
                        for entry in entries.iter().filter(|e| e.get("p").and_then(Value::as_str) == Some(param)) {
                            let target = entry.get("tt").and_then(Value::as_str).and_then(ResourceType::parse);
                            let id = entry.get("id").and_then(Value::as_str);
                            if let (Some(target), Some(id)) = (target, id)
                                && keys.entry(target).or_default().insert(id.to_owned())
                            {
                                reached += 1;
                            }
                        }
                    }
                }
            }
            if reached > MAX_STAGED {
                return Err(too_many());
            }
            if hits.len() < STAGE_PAGE {
                return Ok(keys);
            }
            after = hits.last().and_then(|hit| hit.get("sort")).cloned();
        }
    }
}

fn too_many() -> IndexError {
    IndexError::Unsupported(format!(
        "a chained parameter or _has criterion reaches more than {MAX_STAGED} resources; narrow it with more \
         criteria on the referenced resources"
    ))
}

impl Stages for OpenSearchIndex {
    fn matching<'a>(
        &'a self,
        types: &'a [ResourceType],
        query: Value,
        references: Option<&'a str>,
    ) -> Pin<Box<dyn std::future::Future<Output = Result<Keys, IndexError>> + Send + 'a>> {
        Box::pin(self.stage(types, query, references))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_malformed_ones_are_refused() {
        let cursor = Cursor {
            direction: Direction::Previous,
            fingerprint: 0xdead_beef_0123_4567,
            watermark: 42,
            pit: Some("o463QQEOZmhpcm1lc2gtci1wYXRpZW50Fk1=".to_owned()),
            after: vec![Value::Null, json!(1.5), json!("Müller"), json!("Patient"), json!("a-1")],
        };
        let text = cursor.encode();
        assert!(text.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)), "{text}");
        assert_eq!(Cursor::decode(&text), Ok(cursor.clone()));
        let without_pit = Cursor { pit: None, ..cursor };
        assert_eq!(Cursor::decode(&without_pit.encode()), Ok(without_pit));
        for bad in [
            "",
            "o1",
            "k1.n.0000000000000000.0.-.W10",
            "o1.x.0000000000000000.0.-.W10",
            "o1.n.00000000000000.0.-.W10",
            "o1.n.0000000000000000.x.-.W10",
            "o1.n.0000000000000000.0.!.W10",
            "o1.n.0000000000000000.0.-.e30",
            "o1.n.0000000000000000.0.-.!!",
            "o1.n.0000000000000000.0.-.W10.extra",
        ] {
            assert!(matches!(Cursor::decode(bad), Err(IndexError::InvalidCursor(_))), "{bad:?}");
        }
    }
}
