//! Bundles the gateway returns: `history` and `searchset`. Stored resources are spliced into the
//! Bundle as the bytes the store holds (`RawValue`) when no `_summary`/`_elements` reshapes them, so
//! a page of search results is never parsed into a tree and printed again.

use bytes::Bytes;
use fhirmesh_core::service::{BundleResult, HistoryPage, SearchPage};
use fhirmesh_core::{FhirError, Operation, ResourceVersion};
use fhirmesh_fhir::datetime::format_instant;
use serde::Serialize;
use serde_json::Value;
use serde_json::value::RawValue;

use crate::negotiate::{Presentation, Return};
use crate::response::{json_bytes_of, shaped_value};

/// Absolute URL of a resource.
pub(crate) fn resource_url(base: &str, version: &ResourceVersion) -> String {
    format!("{base}/{}/{}", version.resource_type, version.id)
}

/// A resource inside a Bundle entry: the stored bytes as they are, or reshaped.
#[derive(Serialize)]
#[serde(untagged)]
enum Embedded<'a> {
    Raw(&'a RawValue),
    Shaped(Value),
}

fn embed<'a>(body: &'a Bytes, presentation: &Presentation) -> Result<Embedded<'a>, FhirError> {
    if presentation.is_plain() {
        let text = std::str::from_utf8(body).map_err(|_| FhirError::internal("stored resource is not UTF-8"))?;
        let raw = serde_json::from_str::<&RawValue>(text)
            .map_err(|err| FhirError::internal(format!("stored resource is not JSON: {err}")))?;
        Ok(Embedded::Raw(raw))
    } else {
        Ok(Embedded::Shaped(shaped_value(body, presentation)?))
    }
}

#[derive(Serialize)]
struct Link<'a> {
    relation: &'static str,
    url: &'a str,
}

#[derive(Serialize)]
struct Meta {
    #[serde(rename = "lastUpdated")]
    last_updated: String,
}

#[derive(Serialize)]
struct Bundle<'a, E> {
    #[serde(rename = "resourceType")]
    resource_type: &'static str,
    id: String,
    meta: Meta,
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    total: Option<u64>,
    link: Vec<Link<'a>>,
    entry: Vec<E>,
}

impl<'a, E: Serialize> Bundle<'a, E> {
    fn new(kind: &'static str, total: Option<u64>, link: Vec<Link<'a>>, entry: Vec<E>) -> Self {
        Bundle {
            resource_type: "Bundle",
            id: uuid::Uuid::new_v4().to_string(),
            meta: Meta { last_updated: format_instant(time::OffsetDateTime::now_utc()) },
            kind,
            total,
            link,
            entry,
        }
    }
}

#[derive(Serialize)]
struct HistoryEntry<'a> {
    #[serde(rename = "fullUrl")]
    full_url: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    resource: Option<Embedded<'a>>,
    request: HistoryRequest,
    response: HistoryResponse,
}

#[derive(Serialize)]
struct HistoryRequest {
    method: &'static str,
    url: String,
}

#[derive(Serialize)]
struct HistoryResponse {
    status: &'static str,
    etag: String,
    #[serde(rename = "lastModified")]
    last_modified: String,
}

pub(crate) fn history_bundle(
    base: &str,
    self_link: &str,
    next_link: Option<&str>,
    page: &HistoryPage,
    presentation: &Presentation,
) -> Result<Bytes, FhirError> {
    let mut entries = Vec::with_capacity(page.entries.len());
    for version in &page.entries {
        let resource = version.body.as_ref().map(|body| embed(body, presentation)).transpose()?;
        let url = match version.operation {
            Operation::Create => version.resource_type.to_string(),
            Operation::Update | Operation::Delete => format!("{}/{}", version.resource_type, version.id),
        };
        let status = match version.operation {
            Operation::Create => "201 Created",
            Operation::Update => "200 OK",
            Operation::Delete => "204 No Content",
        };
        entries.push(HistoryEntry {
            full_url: resource_url(base, version),
            resource,
            request: HistoryRequest { method: version.operation.http_method(), url },
            response: HistoryResponse {
                status,
                etag: version.etag(),
                last_modified: format_instant(version.last_updated),
            },
        });
    }
    let mut links = vec![Link { relation: "self", url: self_link }];
    if let Some(next) = next_link {
        links.push(Link { relation: "next", url: next });
    }
    Ok(json_bytes_of(&Bundle::new("history", None, links, entries), presentation.pretty))
}

/// The links of a searchset page.
pub(crate) struct SearchLinks {
    pub self_link: String,
    pub next: Option<String>,
    pub previous: Option<String>,
}

#[derive(Serialize)]
struct SearchEntry<'a> {
    #[serde(rename = "fullUrl")]
    full_url: String,
    resource: Embedded<'a>,
    search: SearchMode,
}

#[derive(Serialize)]
struct SearchMode {
    mode: &'static str,
}

pub(crate) fn search_bundle(
    base: &str,
    links: &SearchLinks,
    page: &SearchPage,
    presentation: &Presentation,
) -> Result<Bytes, FhirError> {
    let count_only = presentation.summary == Some(fhirmesh_fhir::elements::SummaryMode::Count);
    let mut entries = Vec::new();
    if !count_only {
        for (versions, mode) in [(&page.entries, "match"), (&page.included, "include")] {
            for version in versions {
                let Some(body) = &version.body else { continue };
                entries.push(SearchEntry {
                    full_url: resource_url(base, version),
                    resource: embed(body, presentation)?,
                    search: SearchMode { mode },
                });
            }
        }
    }
    if !page.warnings.is_empty() {
        entries.push(SearchEntry {
            full_url: format!("urn:uuid:{}", uuid::Uuid::new_v4()),
            resource: Embedded::Shaped(fhirmesh_fhir::outcome::operation_outcome(&page.warnings)),
            search: SearchMode { mode: "outcome" },
        });
    }
    let mut link = vec![Link { relation: "self", url: &links.self_link }];
    if let Some(next) = &links.next {
        link.push(Link { relation: "next", url: next });
    }
    if let Some(previous) = &links.previous {
        link.push(Link { relation: "previous", url: previous });
    }
    Ok(json_bytes_of(&Bundle::new("searchset", page.total, link, entries), presentation.pretty))
}

#[derive(Serialize)]
struct ResponseEntry<'a> {
    #[serde(rename = "fullUrl", skip_serializing_if = "Option::is_none")]
    full_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    resource: Option<Embedded<'a>>,
    response: EntryResponse,
}

#[derive(Serialize)]
struct EntryResponse {
    status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    location: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    etag: Option<String>,
    #[serde(rename = "lastModified", skip_serializing_if = "Option::is_none")]
    last_modified: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    outcome: Option<Value>,
}

/// `transaction-response` / `batch-response`: one entry per request entry, in order. Resources
/// (written or read) are included as `Prefer: return` asks — representation by default, an
/// outcome, or nothing; search entries carry a `searchset` Bundle and failed batch entries their
/// OperationOutcome.
pub(crate) fn bundle_response(
    base: &str,
    result: &BundleResult,
    prefer: Return,
    presentation: &Presentation,
) -> Result<Bytes, FhirError> {
    let mut nested = Vec::new();
    for entry in &result.entries {
        nested.push(match (&entry.search, &entry.location) {
            (Some(page), path) => {
                let path = path.as_deref().unwrap_or_default();
                let mut query = form_urlencoded::Serializer::new(String::new());
                for (k, v) in &page.applied {
                    query.append_pair(k, v);
                }
                let query = query.finish();
                let separator = if query.is_empty() { "" } else { "?" };
                // Later pages are fetched with a plain search request (its token is bound to the query).
                let link = |token: Option<&str>| {
                    let mut url = format!("{base}/{path}{separator}{query}");
                    if let Some(token) = token {
                        url.push_str(if query.is_empty() { "?" } else { "&" });
                        url.push_str("_page_token=");
                        url.push_str(token);
                    }
                    url
                };
                let links = SearchLinks {
                    self_link: link(None),
                    next: page.next_page_token.as_deref().map(|t| link(Some(t))),
                    previous: page.previous_page_token.as_deref().map(|t| link(Some(t))),
                };
                Some(search_bundle(base, &links, page, presentation)?)
            }
            (None, _) => None,
        });
    }
    let mut entries = Vec::with_capacity(result.entries.len());
    for (entry, searchset) in result.entries.iter().zip(&nested) {
        let reason = http::StatusCode::from_u16(entry.status).ok().and_then(|s| s.canonical_reason()).unwrap_or("");
        let mut response = EntryResponse {
            status: format!("{} {reason}", entry.status).trim_end().to_owned(),
            location: None,
            etag: None,
            last_modified: None,
            outcome: entry.error.as_ref().map(FhirError::to_operation_outcome),
        };
        let mut resource = None;
        let mut full_url = None;
        if let Some(version) = &entry.version {
            response.location = entry.location.clone();
            response.etag = Some(version.etag());
            response.last_modified = Some(format_instant(version.last_updated));
            full_url = Some(resource_url(base, version));
            match prefer {
                Return::Representation => {
                    resource = version.body.as_ref().map(|body| embed(body, presentation)).transpose()?;
                }
                Return::OperationOutcome if response.outcome.is_none() => {
                    let message = format!(
                        "{} {}/{} version {}",
                        entry.status, version.resource_type, version.id, version.version_id
                    );
                    response.outcome = Some(fhirmesh_fhir::outcome::information(message));
                }
                Return::Minimal | Return::OperationOutcome => {}
            }
        } else if entry.search.is_none() {
            response.location = entry.location.clone();
        }
        if let Some(searchset) = searchset {
            let text = std::str::from_utf8(searchset).map_err(|_| FhirError::internal("searchset is not UTF-8"))?;
            let raw = serde_json::from_str::<&RawValue>(text)
                .map_err(|err| FhirError::internal(format!("searchset is not JSON: {err}")))?;
            resource = Some(Embedded::Raw(raw));
        }
        entries.push(ResponseEntry { full_url, resource, response });
    }
    Ok(json_bytes_of(&Bundle::new(result.kind.response_type(), None, Vec::new(), entries), presentation.pretty))
}
