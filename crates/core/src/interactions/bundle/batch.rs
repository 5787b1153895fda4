//! `batch` Bundles: every entry is processed on its own, in order, through the same interactions
//! as a single request; one entry failing does not fail the others (R4 http.html#transaction).
//! References between entries are not resolved in a batch (the spec forbids them).

use super::entry::{Entry, Method, Target, to_bytes};
use super::transaction::location;
use super::{failed, in_entry, read_entry};
use crate::error::{FhirError, FhirResult};
use crate::interactions::FhirResources;
use crate::service::{
    BundleKind, BundleResult, ConditionalDeleteRequest, ConditionalUpdateRequest, CreateRequest, DeleteRequest,
    EntryResult, PatchRequest, RequestContext, UpdateRequest, WriteResult,
};

pub(super) async fn batch(svc: &FhirResources, ctx: &RequestContext, entries: &[Entry]) -> FhirResult<BundleResult> {
    let mut results = Vec::with_capacity(entries.len());
    let mut last_sequence = None;
    for entry in entries {
        let result = if matches!(entry.method, Method::Get | Method::Head) {
            read_entry(svc, ctx, entry, last_sequence).await
        } else {
            match write(svc, ctx, entry).await {
                Ok(result) => {
                    if let Some(version) = &result.version {
                        last_sequence = last_sequence.max(Some(version.sequence));
                    }
                    result
                }
                Err(err) => failed(in_entry(err, entry)),
            }
        };
        results.push(result);
    }
    Ok(BundleResult { kind: BundleKind::Batch, entries: results, last_sequence })
}

async fn write(svc: &FhirResources, ctx: &RequestContext, entry: &Entry) -> FhirResult<EntryResult> {
    let body = || -> FhirResult<bytes::Bytes> {
        let resource = entry.resource.as_ref().ok_or_else(|| {
            FhirError::invalid("this entry needs a resource").at(format!("{}.resource", entry.path()))
        })?;
        to_bytes(resource)
    };
    match (entry.method, &entry.target) {
        (Method::Post, Target::Type(resource_type)) => {
            let request = CreateRequest {
                resource_type: *resource_type,
                body: body()?,
                if_none_exist: entry.if_none_exist.clone(),
            };
            written(super::super::create::create(svc, ctx, request).await?)
        }
        (Method::Put, Target::Instance(resource_type, id)) => {
            let request = UpdateRequest {
                resource_type: *resource_type,
                id: id.clone(),
                body: body()?,
                if_match: entry.if_match,
            };
            written(super::super::update::update(svc, ctx, request).await?)
        }
        (Method::Put, Target::Search(resource_type, criteria)) => {
            let request = ConditionalUpdateRequest {
                resource_type: *resource_type,
                criteria: criteria.clone(),
                body: body()?,
                if_match: entry.if_match,
            };
            written(super::super::conditional::update(svc, ctx, request).await?)
        }
        (Method::Patch, Target::Instance(resource_type, id)) => {
            let request = PatchRequest {
                resource_type: *resource_type,
                id: id.clone(),
                patch: entry.patch_document()?,
                if_match: entry.if_match,
            };
            written(super::super::patch::patch(svc, ctx, request).await?)
        }
        (Method::Delete, Target::Instance(resource_type, id)) => {
            let request = DeleteRequest { resource_type: *resource_type, id: id.clone(), if_match: entry.if_match };
            super::super::delete::delete(svc, ctx, request).await?;
            Ok(EntryResult { status: 204, location: None, version: None, search: None, error: None })
        }
        (Method::Delete, Target::Search(resource_type, criteria)) => {
            let request = ConditionalDeleteRequest { resource_type: *resource_type, criteria: criteria.clone() };
            super::super::conditional::delete(svc, ctx, request).await?;
            Ok(EntryResult { status: 204, location: None, version: None, search: None, error: None })
        }
        (method, target) => {
            Err(FhirError::invalid(format!("{method:?} on {target:?} is not an interaction a batch entry can carry"))
                .at(format!("{}.request", entry.path())))
        }
    }
}

fn written(result: WriteResult) -> FhirResult<EntryResult> {
    let status = if result.created { 201 } else { 200 };
    Ok(EntryResult {
        status,
        location: Some(location(&result.version)),
        version: Some(result.version),
        search: None,
        error: None,
    })
}
