//! patch (PATCH /{type}/{id}): JSON Patch and FHIRPath Patch, applied to the current version and
//! validated like any update.

use fhirmesh_fhir::patch::{apply_fhirpath_patch, apply_json_patch};
use serde_json::Value;

use super::FhirResources;
use super::body;
use super::read::{gone, not_found};
use super::write::{self, Attempt};
use crate::auth::Interaction;
use crate::error::{FhirError, FhirResult};
use crate::service::{PatchDocument, PatchRequest, RequestContext, WriteResult};

pub(super) async fn patch(svc: &FhirResources, ctx: &RequestContext, request: PatchRequest) -> FhirResult<WriteResult> {
    let reach = super::authorize_reach(ctx, Interaction::Patch, Some(request.resource_type))?;
    let document: Value = match &request.patch {
        PatchDocument::JsonPatch(bytes) | PatchDocument::FhirPathPatch(bytes) => body::parse_json(bytes)?,
    };
    if let PatchDocument::FhirPathPatch(_) = &request.patch
        && document.get("resourceType").and_then(Value::as_str) != Some("Parameters")
    {
        return Err(FhirError::invalid("a FHIRPath Patch body must be a Parameters resource").at("resourceType"));
    }
    let (resource_type, id) = (request.resource_type, request.id.clone());
    write::with_retries(svc, ctx, resource_type, &id, request.if_match, &reach, |current| {
        let current = match current {
            None => return Err(not_found(resource_type, &id)),
            Some(current) if current.is_deleted() => return Err(gone(current)),
            Some(current) => current,
        };
        let bytes = current.body.as_deref().unwrap_or_default();
        let mut resource: Value = serde_json::from_slice(bytes)
            .map_err(|err| FhirError::internal(format!("stored resource is not JSON: {err}")))?;
        match &request.patch {
            PatchDocument::JsonPatch(_) => apply_json_patch(&mut resource, &document),
            PatchDocument::FhirPathPatch(_) => apply_fhirpath_patch(&mut resource, &document),
        }
        .map_err(|err| FhirError::with_issues(crate::error::ErrorCategory::Unprocessable, vec![err.to_issue()]))?;
        Ok(Attempt::Write { resource, size: bytes.len() })
    })
    .await
    .and_then(|outcome| outcome.ok_or_else(|| FhirError::internal("patch produced no write")))
}
