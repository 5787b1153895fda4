//! update (PUT /{type}/{id}), with update-as-create and version-aware updates (`If-Match`).

use serde_json::Value;

use super::FhirResources;
use super::body;
use super::write::{self, Attempt};
use crate::auth::Interaction;
use crate::error::{ErrorCategory, FhirError, FhirResult};
use crate::service::{RequestContext, UpdateRequest, WriteResult};

pub(super) async fn update(
    svc: &FhirResources,
    ctx: &RequestContext,
    request: UpdateRequest,
) -> FhirResult<WriteResult> {
    let reach = super::authorize_reach(ctx, Interaction::Update, Some(request.resource_type))?;
    let resource: Value = body::parse_json(&request.body)?;
    let update_create = svc.config.update_create;
    write::with_retries(svc, ctx, request.resource_type, &request.id, request.if_match, &reach, |current| {
        if current.is_none() && !update_create {
            return Err(FhirError::new(
                ErrorCategory::MethodNotAllowed,
                format!(
                    "{}/{} does not exist and this server does not allow update-as-create",
                    request.resource_type, request.id
                ),
            ));
        }
        Ok(Attempt::Write { resource: resource.clone(), size: request.body.len() })
    })
    .await
    .and_then(|outcome| outcome.ok_or_else(|| FhirError::internal("update produced no write")))
}
