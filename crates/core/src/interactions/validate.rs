//! `$validate` (POST /{type}/$validate, POST /{type}/{id}/$validate): everything a write would
//! check — the R4 schema, the id and type rules, the write rules (Subscriptions, IG profiles) —
//! reported as issues instead of refusing, and nothing written.

use fhirmesh_fhir::outcome::{Issue, IssueType};
use fhirmesh_fhir::validate::validate_resource;

use super::FhirResources;
use super::body::{self, IdRule};
use crate::auth::Interaction;
use crate::error::FhirResult;
use crate::service::{RequestContext, ValidateMode, ValidateRequest};

pub(super) async fn validate(
    svc: &FhirResources,
    ctx: &RequestContext,
    request: ValidateRequest,
) -> FhirResult<Vec<Issue>> {
    let resource_type = request.resource_type;
    let reach = super::authorize_reach(ctx, Interaction::Operation, Some(resource_type))?;
    // An update or delete is of a resource that exists, within the caller's reach.
    if let Some(id) = &request.id
        && matches!(request.mode, ValidateMode::Update | ValidateMode::Delete)
    {
        let current = svc.store.read(&ctx.tenant, resource_type, id).await?;
        let Some(current) = current.filter(|v| !v.is_deleted()) else {
            return Ok(vec![Issue::error(
                IssueType::NotFound,
                format!("{resource_type}/{id} does not exist to {}", request.mode.as_str()),
            )]);
        };
        if !super::covers_through_security_context(svc, ctx, &reach, &current).await? {
            return Err(super::out_of_reach(resource_type, id));
        }
    }
    let Some(bytes) = request.resource else {
        // Deletes are checked by no rules.
        return Ok(Vec::new());
    };
    let resource = body::parse_json(&bytes)?;
    let rules = svc.config.write_rules.clone();
    let (mode, id, profile) = (request.mode, request.id, request.profile);
    tokio::task::spawn_blocking(move || {
        let (id_rule, id) = match (mode, id) {
            (ValidateMode::Update, Some(id)) => (IdRule::MustMatch, Some(id)),
            _ => (IdRule::Replace, None),
        };
        let resource = match body::check_identity_of(resource, resource_type, id.as_ref(), id_rule) {
            Ok(resource) => resource,
            Err(error) => return error.issues,
        };
        let mut issues = validate_resource(&resource);
        if issues.is_empty() {
            // The rules judge schema-valid resources only.
            match &rules {
                Some(rules) => issues.extend(rules.validate(resource_type, &resource, profile.as_deref())),
                None => issues.extend(profile.as_deref().map(crate::ports::unknown_profile)),
            }
        }
        issues
    })
    .await
    .map_err(|_| crate::error::FhirError::internal("validation task failed"))
}
