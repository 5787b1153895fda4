//! vread (GET /{type}/{id}/_history/{vid}).

use fhirmesh_fhir::{LogicalId, ResourceType};

use super::FhirResources;
use super::read::gone;
use crate::auth::Interaction;
use crate::error::{FhirError, FhirResult};
use crate::model::ResourceVersion;
use crate::service::RequestContext;

pub(super) async fn vread(
    svc: &FhirResources,
    ctx: &RequestContext,
    resource_type: ResourceType,
    id: LogicalId,
    version_id: u64,
) -> FhirResult<ResourceVersion> {
    let reach = super::authorize_reach(ctx, Interaction::Vread, Some(resource_type))?;
    let Some(version) = svc.store.vread(&ctx.tenant, resource_type, &id, version_id).await? else {
        return Err(FhirError::not_found(format!("{resource_type}/{id} has no version {version_id}")));
    };
    if !super::covers_through_security_context(svc, ctx, &reach, &version).await? {
        return Err(super::out_of_reach(resource_type, &id));
    }
    if version.is_deleted() { Err(gone(&version)) } else { Ok(version) }
}
