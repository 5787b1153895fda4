//! history (GET /_history, /{type}/_history, /{type}/{id}/_history) with `_count`, `_since`,
//! `_at` and cursor paging, newest first.

use fhirmesh_fhir::datetime::parse_fhir_datetime;

use super::FhirResources;
use crate::auth::Interaction;
use crate::error::{FhirError, FhirResult};
use crate::ports::{HistoryQuery, HistoryScope};
use crate::service::{HistoryPage, HistoryRequest, RequestContext};

pub(super) async fn history(
    svc: &FhirResources,
    ctx: &RequestContext,
    request: HistoryRequest,
) -> FhirResult<HistoryPage> {
    // Under a partial grant (a patient's compartment, a fine-grained scope) history shows the
    // versions that were within reach; deletes, which carry no body to place, are left out.
    let reach = match &request.scope {
        HistoryScope::System => super::authorize_reach(ctx, Interaction::HistorySystem, None)?,
        HistoryScope::Type(t) => super::authorize_reach(ctx, Interaction::HistoryType, Some(*t))?,
        HistoryScope::Instance(t, _) => super::authorize_reach(ctx, Interaction::HistoryInstance, Some(*t))?,
    };
    let limit = page_size(request.count.as_deref(), &svc.config)?;
    let scope = request.scope.clone();
    let since = request
        .since
        .as_deref()
        .map(|raw| {
            parse_fhir_datetime(raw)
                .map(|range| range.start)
                .map_err(|err| FhirError::invalid(format!("_since '{raw}' is not a FHIR instant: {err}")))
        })
        .transpose()?;
    let at = request
        .at
        .as_deref()
        .map(|raw| {
            parse_fhir_datetime(raw)
                .map(|range| (range.start, range.end))
                .map_err(|err| FhirError::invalid(format!("_at '{raw}' is not a FHIR date/dateTime: {err}")))
        })
        .transpose()?;
    let before_sequence = request.page_token.as_deref().map(parse_page_token).transpose()?;
    if limit == 0 {
        return Ok(HistoryPage { entries: Vec::new(), next_page_token: None });
    }
    let mut entries = svc
        .store
        .history(&ctx.tenant, HistoryQuery { scope: scope.clone(), since, at, before_sequence, limit: limit + 1 })
        .await?;
    let next_page_token = if entries.len() > limit {
        entries.truncate(limit);
        entries.last().map(|last| page_token(last.sequence))
    } else {
        None
    };
    if reach != super::Reach::All {
        entries.retain(|version| reach.covers(version));
        if entries.is_empty()
            && let HistoryScope::Instance(t, id) = &scope
        {
            return Err(super::out_of_reach(*t, id));
        }
    }
    Ok(HistoryPage { entries, next_page_token })
}

/// Validates `_count` against the configured bounds.
pub(super) fn page_size(count: Option<&str>, config: &super::ResourceConfig) -> FhirResult<usize> {
    match count {
        None => Ok(config.default_page_size),
        Some(raw) => {
            let n: usize =
                raw.parse().map_err(|_| FhirError::invalid(format!("_count '{raw}' is not a non-negative integer")))?;
            Ok(n.min(config.max_page_size))
        }
    }
}

fn page_token(sequence: u64) -> String {
    format!("s{sequence}")
}

fn parse_page_token(raw: &str) -> FhirResult<u64> {
    raw.strip_prefix('s')
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| FhirError::invalid(format!("page token '{raw}' is not one this server issued")))
}
