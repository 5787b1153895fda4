//! create (POST /{type}), including conditional create (`If-None-Exist`).

use fhirmesh_fhir::LogicalId;

use super::FhirResources;
use super::body::{self, IdRule, Stamp};
use super::limits::LimitedWrites;
use crate::auth::Interaction;
use crate::error::{ErrorCategory, FhirError, FhirResult};
use crate::model::Operation;
use crate::ports::{Expected, StoreError, VersionWrite};
use crate::service::{CreateRequest, RequestContext, WriteResult};

pub(super) async fn create(
    svc: &FhirResources,
    ctx: &RequestContext,
    request: CreateRequest,
) -> FhirResult<WriteResult> {
    let reach = super::authorize_reach(ctx, Interaction::Create, Some(request.resource_type))?;
    let resource = body::parse_json(&request.body)?;
    if !reach.covers_json(request.resource_type, &resource) {
        return Err(super::outside_reach(request.resource_type));
    }

    if let Some(query) = &request.if_none_exist {
        let params: Vec<(String, String)> =
            form_urlencoded::parse(query.strip_prefix('?').unwrap_or(query).as_bytes()).into_owned().collect();
        if params.is_empty() {
            return Err(FhirError::invalid("If-None-Exist must carry search parameters, e.g. identifier=system|value"));
        }
        let mut found = super::search::find(svc, &ctx.tenant, request.resource_type, &params, 2).await?;
        match found.len() {
            0 => {}
            1 => {
                let version = found.remove(0);
                return Ok(WriteResult { version, created: false, written: false });
            }
            _ => {
                return Err(FhirError::new(
                    ErrorCategory::PreconditionFailed,
                    format!("If-None-Exist '{query}' matches more than one {}", request.resource_type),
                ));
            }
        }
    }

    crate::binary::check_write(ctx, request.resource_type, Some(&resource), None)?;
    // A fresh UUID never collides in practice; the loop only guards the impossible case.
    for _ in 0..3 {
        let id = LogicalId::generate();
        let last_updated = body::now();
        let rules = &svc.config.write_rules;
        let mut limited = LimitedWrites::default();
        limited.record(rules.as_deref(), 0, (request.resource_type, &id), Some(&resource), None, last_updated);
        let stamp = Stamp { id: id.clone(), id_rule: IdRule::Replace, version_id: 1, last_updated };
        let bytes =
            body::prepare(resource.clone(), request.body.len(), request.resource_type, &stamp, rules.as_ref()).await?;
        limited.check(svc, &ctx.tenant).await.map_err(|(_, err)| err)?;
        let write = VersionWrite {
            resource_type: request.resource_type,
            id: id.clone(),
            expected: Expected::Absent,
            version_id: 1,
            last_updated,
            operation: Operation::Create,
            body: Some(bytes.clone()),
            traceparent: ctx.traceparent.clone(),
        };
        match svc.store.commit(&ctx.tenant, vec![write]).await {
            Ok(receipt) => {
                let version = crate::model::ResourceVersion {
                    resource_type: request.resource_type,
                    id,
                    version_id: 1,
                    last_updated,
                    operation: Operation::Create,
                    body: Some(bytes),
                    sequence: receipt.first_sequence,
                };
                tracing::debug!(resource_type = %request.resource_type, "resource created");
                return Ok(WriteResult { version, created: true, written: true });
            }
            Err(StoreError::Conflict { .. }) => continue,
            Err(err) => return Err(err.into()),
        }
    }
    Err(FhirError::internal("could not allocate a resource id"))
}
