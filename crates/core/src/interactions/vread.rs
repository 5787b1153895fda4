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
    match svc.store.vread(&ctx.tenant, resource_type, &id, version_id).await? {
        None => Err(FhirError::not_found(format!("{resource_type}/{id} has no version {version_id}"))),
        Some(version) if !reach.covers(&version) => Err(super::out_of_reach(resource_type, &id)),
        Some(version) if version.is_deleted() => Err(gone(&version)),
        Some(version) => Ok(version),
    }
}
