//! Conditional update (`PUT /{type}?criteria`) and conditional delete (`DELETE /{type}?criteria`),
//! resolved with full search (R4 http.html#cond-update, #cond-delete).

use bytes::Bytes;
use fhirmesh_fhir::LogicalId;
use serde_json::Value;

use super::FhirResources;
use super::body;
use crate::auth::Interaction;
use crate::error::{ErrorCategory, FhirError, FhirResult};
use crate::service::{
    ConditionalDeleteRequest, ConditionalDeleteResult, ConditionalUpdateRequest, CreateRequest, DeleteRequest,
    RequestContext, UpdateRequest, WriteResult,
};

/// No match: create (with the body's id, as update-as-create, or a new one). One match: update it
/// (a body id must be that resource's). Several: 412.
pub(super) async fn update(
    svc: &FhirResources,
    ctx: &RequestContext,
    request: ConditionalUpdateRequest,
) -> FhirResult<WriteResult> {
    let reach = super::authorize_reach(ctx, Interaction::Update, Some(request.resource_type))?;
    let mut resource = body::parse_json(&request.body)?;
    let body_id = match resource.get("id") {
        None => None,
        Some(Value::String(id)) => Some(
            LogicalId::parse(id).map_err(|_| FhirError::invalid(format!("'{id}' is not a valid FHIR id")).at("id"))?,
        ),
        Some(_) => return Err(FhirError::invalid("id must be a string").at("id")),
    };
    let mut found = find_within(svc, ctx, &reach, request.resource_type, &request.criteria, 2).await?;
    let body_has_id = body_id.is_some();
    let target = match found.len() {
        0 => match body_id {
            Some(id) => id,
            None if request.if_match.is_some() => {
                return Err(FhirError::new(
                    ErrorCategory::PreconditionFailed,
                    "no resource matches the conditional update, so If-Match cannot hold",
                ));
            }
            None => {
                let create =
                    CreateRequest { resource_type: request.resource_type, body: request.body, if_none_exist: None };
                return super::create::create(svc, ctx, create).await;
            }
        },
        1 => {
            let matched = found.remove(0).id;
            if let Some(id) = &body_id
                && *id != matched
            {
                return Err(FhirError::invalid(format!(
                    "the resource id '{id}' is not the id of the resource the criteria matched ('{matched}')"
                ))
                .at(format!("{}.id", request.resource_type)));
            }
            matched
        }
        _ => {
            return Err(FhirError::new(
                ErrorCategory::PreconditionFailed,
                format!("the conditional update criteria match more than one {}", request.resource_type),
            ));
        }
    };
    if !body_has_id {
        resource["id"] = Value::String(target.as_str().to_owned());
    }
    let body = Bytes::from(
        serde_json::to_vec(&resource)
            .map_err(|err| FhirError::internal(format!("cannot serialise resource: {err}")))?,
    );
    let update = UpdateRequest { resource_type: request.resource_type, id: target, body, if_match: request.if_match };
    super::update::update(svc, ctx, update).await
}

/// Deletes the resource the criteria match; several matches are a 412 unless
/// `conditional_delete_multiple` allows deleting them all. No match is not an error.
pub(super) async fn delete(
    svc: &FhirResources,
    ctx: &RequestContext,
    request: ConditionalDeleteRequest,
) -> FhirResult<ConditionalDeleteResult> {
    let reach = super::authorize_reach(ctx, Interaction::Delete, Some(request.resource_type))?;
    let limit = if svc.config.conditional_delete_multiple { svc.config.max_page_size } else { 2 };
    let found = find_within(svc, ctx, &reach, request.resource_type, &request.criteria, limit).await?;
    if found.len() > 1 && !svc.config.conditional_delete_multiple {
        return Err(FhirError::new(
            ErrorCategory::PreconditionFailed,
            format!(
                "the conditional delete criteria match more than one {}; this server deletes one at a time",
                request.resource_type
            ),
        ));
    }
    let mut deleted = Vec::with_capacity(found.len());
    let mut sequence = None;
    for version in found {
        let delete = DeleteRequest { resource_type: request.resource_type, id: version.id.clone(), if_match: None };
        let result = super::delete::delete(svc, ctx, delete).await?;
        if let Some(version_id) = result.version_id {
            deleted.push((version.id, version_id));
        }
        sequence = sequence.max(result.sequence);
    }
    Ok(ConditionalDeleteResult { deleted, sequence })
}

/// The live resources matching a condition that the caller can reach, at most `limit` of them.
/// What lies outside a partial grant (a patient's compartment, a fine-grained scope) does not
/// exist for the caller: it is neither counted nor changed. Under such a grant the search looks
/// further (up to the page limit), so out-of-reach matches do not hide reachable ones.
async fn find_within(
    svc: &FhirResources,
    ctx: &RequestContext,
    reach: &super::Reach,
    resource_type: fhirmesh_fhir::ResourceType,
    criteria: &[(String, String)],
    limit: usize,
) -> FhirResult<Vec<crate::model::ResourceVersion>> {
    if *reach == super::Reach::All {
        return super::search::find(svc, &ctx.tenant, resource_type, criteria, limit).await;
    }
    let mut found =
        super::search::find(svc, &ctx.tenant, resource_type, criteria, svc.config.max_page_size.max(limit)).await?;
    found.retain(|version| reach.covers(version));
    found.truncate(limit);
    Ok(found)
}
