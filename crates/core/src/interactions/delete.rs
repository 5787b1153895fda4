//! delete (DELETE /{type}/{id}): writes a tombstone version; deleting what is absent or already
//! deleted succeeds without writing.

use super::FhirResources;
use super::write::{self, Attempt};
use crate::auth::Interaction;
use crate::error::FhirResult;
use crate::service::{DeleteRequest, DeleteResult, RequestContext};

pub(super) async fn delete(
    svc: &FhirResources,
    ctx: &RequestContext,
    request: DeleteRequest,
) -> FhirResult<DeleteResult> {
    let reach = super::authorize_reach(ctx, Interaction::Delete, Some(request.resource_type))?;
    let written =
        write::with_retries(svc, ctx, request.resource_type, &request.id, request.if_match, &reach, |current| {
            Ok(match current {
                Some(current) if !current.is_deleted() => Attempt::Delete,
                _ => Attempt::Skip,
            })
        })
        .await?;
    Ok(DeleteResult {
        version_id: written.as_ref().map(|w| w.version.version_id),
        sequence: written.map(|w| w.version.sequence),
    })
}
