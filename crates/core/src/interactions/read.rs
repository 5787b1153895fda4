//! read (GET /{type}/{id}).

use fhirmesh_fhir::{LogicalId, ResourceType};

use super::FhirResources;
use crate::auth::Interaction;
use crate::error::{ErrorCategory, FhirError, FhirResult};
use crate::model::ResourceVersion;
use crate::service::RequestContext;

pub(super) async fn read(
    svc: &FhirResources,
    ctx: &RequestContext,
    resource_type: ResourceType,
    id: LogicalId,
) -> FhirResult<ResourceVersion> {
    let reach = super::authorize_reach(ctx, Interaction::Read, Some(resource_type))?;
    let Some(version) = svc.store.read(&ctx.tenant, resource_type, &id).await? else {
        return Err(not_found(resource_type, &id));
    };
    if !super::covers_through_security_context(svc, ctx, &reach, &version).await? {
        return Err(super::out_of_reach(resource_type, &id));
    }
    if version.is_deleted() { Err(gone(&version)) } else { Ok(version) }
}

pub(super) fn not_found(resource_type: ResourceType, id: &LogicalId) -> FhirError {
    FhirError::not_found(format!("{resource_type}/{id} is not known"))
}

pub(super) fn gone(tombstone: &ResourceVersion) -> FhirError {
    FhirError::new(
        ErrorCategory::Gone,
        format!("{}/{} was deleted (version {})", tombstone.resource_type, tombstone.id, tombstone.version_id),
    )
}
