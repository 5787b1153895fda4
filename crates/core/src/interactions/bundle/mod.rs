//! `POST /` with a `transaction` (all or nothing, [`transaction`]) or `batch` (entries
//! independent, [`batch`]) Bundle, per R4 http.html#transaction.

mod batch;
mod entry;
mod references;
mod transaction;

use fhirmesh_fhir::ResourceType;
use serde_json::Value;

use self::entry::{Entry, Method, Target};
use super::FhirResources;
use crate::auth::Interaction;
use crate::error::{FhirError, FhirResult};
use crate::service::{BundleKind, BundleRequest, BundleResult, EntryResult, RequestContext, SearchRequest};

/// Bundles bigger than this are parsed on the blocking pool rather than the async executor.
const INLINE_PARSE_LIMIT: usize = 64 * 1024;

pub(super) async fn bundle(
    svc: &FhirResources,
    ctx: &RequestContext,
    request: BundleRequest,
) -> FhirResult<BundleResult> {
    let max_entries = svc.config.max_bundle_entries;
    let parse = move |body: &[u8]| -> FhirResult<(BundleKind, Vec<Entry>)> {
        let bundle: Value = serde_json::from_slice(body)
            .map_err(|err| FhirError::invalid(format!("request body is not valid JSON: {err}")))?;
        entry::parse_bundle(&bundle, max_entries)
    };
    let (kind, entries) = if request.body.len() > INLINE_PARSE_LIMIT {
        let body = request.body.clone();
        tokio::task::spawn_blocking(move || parse(&body))
            .await
            .map_err(|_| FhirError::internal("bundle parsing task failed"))??
    } else {
        parse(&request.body)?
    };
    match kind {
        BundleKind::Transaction => {
            super::authorize(ctx, Interaction::Transaction, None)?;
            // All or nothing: an entry the caller may not perform fails the whole transaction.
            // Grants that reach part of a type are applied to the planned writes.
            let reaches = entries
                .iter()
                .map(|entry| {
                    super::authorize_reach(ctx, entry.interaction(), Some(entry.target.resource_type()))
                        .map_err(|err| in_entry(err, entry))
                })
                .collect::<FhirResult<Vec<_>>>()?;
            transaction::transaction(svc, ctx, &entries, &reaches).await
        }
        // Each batch entry is checked where it runs, and fails alone.
        BundleKind::Batch => {
            super::authorize(ctx, Interaction::Batch, None)?;
            batch::batch(svc, ctx, &entries).await
        }
    }
}

/// Points an error about `entry` into the Bundle: `Patient.name[0]` becomes
/// `Bundle.entry[3].resource.name[0]`; an error without a location names the entry.
fn in_entry(mut err: FhirError, entry: &Entry) -> FhirError {
    let prefix = entry.path();
    let resource_type = entry.target.resource_type();
    for issue in &mut err.issues {
        issue.expression = Some(match issue.expression.take() {
            None => prefix.clone(),
            Some(expression) if expression.starts_with("Bundle.") => expression,
            Some(expression) => match relative_to(&expression, resource_type, entry) {
                Some("") => format!("{prefix}.resource"),
                Some(rest) => format!("{prefix}.resource.{rest}"),
                None => format!("{prefix}.resource.{expression}"),
            },
        });
    }
    err
}

/// `Type.rest` → `rest` for the entry's (or its resource's) type.
fn relative_to<'a>(expression: &'a str, resource_type: ResourceType, entry: &Entry) -> Option<&'a str> {
    let body_type = entry.resource.as_ref().and_then(|r| r.get("resourceType")).and_then(Value::as_str);
    [Some(resource_type.as_str()), body_type].into_iter().flatten().find_map(|type_name| {
        if expression == type_name {
            Some("")
        } else {
            expression.strip_prefix(type_name).and_then(|rest| rest.strip_prefix('.'))
        }
    })
}

/// Answers a GET/HEAD entry (read, vread, search), after the writes of its Bundle: failures are
/// the entry's status and outcome, not the Bundle's.
async fn read_entry(
    svc: &FhirResources,
    ctx: &RequestContext,
    entry: &Entry,
    consistency_token: Option<u64>,
) -> EntryResult {
    match read(svc, ctx, entry, consistency_token).await {
        Ok(result) => result,
        Err(err) => failed(in_entry(err, entry)),
    }
}

/// A failed entry: its status and outcome.
fn failed(err: FhirError) -> EntryResult {
    EntryResult { status: err.http_status(), location: None, version: None, search: None, error: Some(err) }
}

async fn read(
    svc: &FhirResources,
    ctx: &RequestContext,
    entry: &Entry,
    consistency_token: Option<u64>,
) -> FhirResult<EntryResult> {
    if !matches!(entry.method, Method::Get | Method::Head) {
        return Err(FhirError::internal("not a read entry"));
    }
    let version = match &entry.target {
        Target::Instance(resource_type, id) => super::read::read(svc, ctx, *resource_type, id.clone()).await?,
        Target::Version(resource_type, id, version_id) => {
            super::vread::vread(svc, ctx, *resource_type, id.clone(), *version_id).await?
        }
        Target::Type(resource_type) | Target::Search(resource_type, _) => {
            let params = match &entry.target {
                Target::Search(_, params) => params.clone(),
                _ => Vec::new(),
            };
            let request = SearchRequest {
                scope: fhirmesh_fhir::search::query::SearchScope::Type(*resource_type),
                params,
                strict: false,
                page_token: None,
                consistency_token,
            };
            let page = super::search::search(svc, ctx, request).await?;
            let location = Some(resource_type.to_string());
            return Ok(EntryResult { status: 200, location, version: None, search: Some(page), error: None });
        }
    };
    // Conditional reads: the client's copy is still current.
    let etag_matches = entry.if_none_match.as_deref().and_then(entry::parse_etag) == Some(version.version_id)
        || entry.if_none_match.as_deref().map(str::trim) == Some("*");
    let unmodified = entry.if_modified_since.is_some_and(|since| version.last_updated <= since);
    if etag_matches || unmodified {
        return Ok(EntryResult {
            status: 304,
            location: Some(transaction::location(&version)),
            version: None,
            search: None,
            error: None,
        });
    }
    Ok(EntryResult {
        status: 200,
        location: Some(transaction::location(&version)),
        version: Some(version),
        search: None,
        error: None,
    })
}
