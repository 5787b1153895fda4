//! search (GET /{type}?…): the interim matcher for `_id` and `identifier` until the search index
//! (issue 3) serves every parameter. Other parameters are refused with a clear message rather than
//! silently ignored.

use super::FhirResources;
use super::conditional::Criteria;
use super::history::page_size;
use crate::error::{FhirError, FhirResult};
use crate::service::{RequestContext, SearchPage, SearchRequest};

/// Result-shaping parameters the gateway applies; they do not select resources.
const PRESENTATION: &[&str] = &["_count", "_format", "_pretty", "_summary", "_elements"];

pub(super) async fn search(
    svc: &FhirResources,
    ctx: &RequestContext,
    request: SearchRequest,
) -> FhirResult<SearchPage> {
    let Some(resource_type) = request.resource_type else {
        return Err(FhirError::unsupported("system-level search is not supported yet; search one resource type"));
    };
    let count = request.params.iter().rev().find(|(name, _)| name == "_count").map(|(_, v)| v.as_str());
    let limit = page_size(count, &svc.config)?;
    let criteria = Criteria::parse(&request.params, PRESENTATION)?;
    if criteria.is_empty() {
        return Err(FhirError::unsupported(format!(
            "searching {resource_type} needs _id or identifier for now; full search is coming"
        )));
    }
    let mut entries = criteria.matches(&svc.store, &ctx.tenant, resource_type, limit.saturating_add(1)).await?;
    // The interim matcher does not page: report a total only when every match fits the page.
    let total = if entries.len() > limit {
        entries.truncate(limit);
        None
    } else {
        Some(entries.len() as u64)
    };
    Ok(SearchPage { total, entries, next_page_token: None })
}
