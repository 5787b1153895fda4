//! Bundles the gateway returns: `history` and `searchset`.

use fhirmesh_core::service::{HistoryPage, SearchPage};
use fhirmesh_core::{FhirError, Operation, ResourceVersion};
use fhirmesh_fhir::datetime::format_instant;
use serde_json::{Map, Value, json};

use crate::negotiate::Presentation;
use crate::response::shaped_value;

/// Absolute URL of a resource.
pub(crate) fn resource_url(base: &str, version: &ResourceVersion) -> String {
    format!("{base}/{}/{}", version.resource_type, version.id)
}

pub(crate) fn history_bundle(
    base: &str,
    self_link: &str,
    next_link: Option<String>,
    page: &HistoryPage,
    presentation: &Presentation,
) -> Result<Value, FhirError> {
    let mut entries = Vec::with_capacity(page.entries.len());
    for version in &page.entries {
        let mut entry = Map::new();
        entry.insert("fullUrl".into(), json!(resource_url(base, version)));
        if let Some(body) = &version.body {
            entry.insert("resource".into(), shaped_value(body, presentation)?);
        }
        let url = match version.operation {
            Operation::Create => version.resource_type.to_string(),
            Operation::Update | Operation::Delete => format!("{}/{}", version.resource_type, version.id),
        };
        entry.insert("request".into(), json!({ "method": version.operation.http_method(), "url": url }));
        let status = match version.operation {
            Operation::Create => "201 Created",
            Operation::Update => "200 OK",
            Operation::Delete => "204 No Content",
        };
        entry.insert(
            "response".into(),
            json!({ "status": status, "etag": version.etag(), "lastModified": format_instant(version.last_updated) }),
        );
        entries.push(Value::Object(entry));
    }
    Ok(bundle("history", None, self_link, next_link, entries))
}

/// The links of a searchset page.
pub(crate) struct SearchLinks {
    pub self_link: String,
    pub next: Option<String>,
    pub previous: Option<String>,
}

pub(crate) fn search_bundle(
    base: &str,
    links: &SearchLinks,
    page: &SearchPage,
    presentation: &Presentation,
) -> Result<Value, FhirError> {
    let count_only = presentation.summary == Some(fhirmesh_fhir::elements::SummaryMode::Count);
    let mut entries = Vec::new();
    if !count_only {
        for (versions, mode) in [(&page.entries, "match"), (&page.included, "include")] {
            for version in versions {
                let Some(body) = &version.body else { continue };
                entries.push(json!({
                    "fullUrl": resource_url(base, version),
                    "resource": shaped_value(body, presentation)?,
                    "search": { "mode": mode },
                }));
            }
        }
    }
    if !page.warnings.is_empty() {
        entries.push(json!({
            "fullUrl": format!("urn:uuid:{}", uuid::Uuid::new_v4()),
            "resource": fhirmesh_fhir::outcome::operation_outcome(&page.warnings),
            "search": { "mode": "outcome" },
        }));
    }
    let mut out = bundle("searchset", page.total, &links.self_link, links.next.clone(), entries);
    if let Some(previous) = &links.previous
        && let Some(list) = out["link"].as_array_mut()
    {
        list.push(json!({ "relation": "previous", "url": previous }));
    }
    Ok(out)
}

fn bundle(kind: &str, total: Option<u64>, self_link: &str, next_link: Option<String>, entries: Vec<Value>) -> Value {
    let mut links = vec![json!({ "relation": "self", "url": self_link })];
    if let Some(next) = next_link {
        links.push(json!({ "relation": "next", "url": next }));
    }
    let mut out = Map::new();
    out.insert("resourceType".into(), json!("Bundle"));
    out.insert("id".into(), json!(uuid::Uuid::new_v4().to_string()));
    out.insert("meta".into(), json!({ "lastUpdated": format_instant(time::OffsetDateTime::now_utc()) }));
    out.insert("type".into(), json!(kind));
    if let Some(total) = total {
        out.insert("total".into(), json!(total));
    }
    out.insert("link".into(), Value::Array(links));
    out.insert("entry".into(), Value::Array(entries));
    Value::Object(out)
}
