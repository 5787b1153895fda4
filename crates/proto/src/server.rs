//! Server side: any [`ResourceService`] served over gRPC. Decode the wire request (malformed input
//! is `Invalid`), call the service, encode the answer; nothing else.

use std::sync::Arc;

use fhirmesh_core::ports::HistoryScope;
use fhirmesh_core::service::{
    BundleRequest, ConditionalDeleteRequest, ConditionalUpdateRequest, CreateRequest, DeleteRequest, HistoryRequest,
    PatchDocument, PatchRequest, SearchRequest, UpdateRequest, ValidateMode, ValidateRequest,
};
use fhirmesh_core::{FhirResult, RequestContext, ResourceService};
use fhirmesh_fhir::search::query::SearchScope;
use fhirmesh_fhir::{LogicalId, ResourceType};
use tonic::{Request, Response, Status};

use crate::convert::{WireError, clip, context_from_wire, id_from_wire, resource_type_from_wire};
use crate::pb;
use crate::pb::resource_service_server::{ResourceService as ResourceServiceRpc, ResourceServiceServer};
use crate::status::fhir_error_to_status;

/// Serves an [`Arc<dyn ResourceService>`] as the gRPC `fhirmesh.v1.ResourceService`.
#[derive(Clone)]
pub struct GrpcResourceAdapter(pub Arc<dyn ResourceService>);

/// The tonic service for `svc`, with [`crate::DEFAULT_MAX_MESSAGE_SIZE`] as the message cap.
pub fn resource_service_server(svc: Arc<dyn ResourceService>) -> ResourceServiceServer<GrpcResourceAdapter> {
    resource_service_server_with_limit(svc, crate::DEFAULT_MAX_MESSAGE_SIZE)
}

/// The tonic service for `svc`, accepting and sending messages of at most `max_message_size` bytes.
pub fn resource_service_server_with_limit(
    svc: Arc<dyn ResourceService>,
    max_message_size: usize,
) -> ResourceServiceServer<GrpcResourceAdapter> {
    ResourceServiceServer::new(GrpcResourceAdapter(svc))
        .max_decoding_message_size(max_message_size)
        .max_encoding_message_size(max_message_size)
}

/// Malformed request data is the caller's fault.
fn decode<T>(value: Result<T, WireError>) -> FhirResult<T> {
    value.map_err(WireError::into_invalid)
}

fn respond<T>(result: FhirResult<T>) -> Result<Response<T>, Status> {
    match result {
        Ok(message) => Ok(Response::new(message)),
        Err(err) => {
            tracing::debug!(category = err.category.name(), "resource rpc failed");
            Err(fhir_error_to_status(&err))
        }
    }
}

// Wire → core, one function per request. Every failure here is the caller's fault (`Invalid`).

fn create_from_wire(req: pb::CreateRequest) -> Result<(RequestContext, CreateRequest), WireError> {
    let ctx = context_from_wire(req.context)?;
    let request = CreateRequest {
        resource_type: resource_type_from_wire(&req.resource_type)?,
        body: req.body,
        if_none_exist: req.if_none_exist,
    };
    Ok((ctx, request))
}

fn target_from_wire(
    context: Option<pb::RequestContext>,
    resource_type: &str,
    id: &str,
) -> Result<(RequestContext, ResourceType, LogicalId), WireError> {
    Ok((context_from_wire(context)?, resource_type_from_wire(resource_type)?, id_from_wire(id)?))
}

fn update_from_wire(req: pb::UpdateRequest) -> Result<(RequestContext, UpdateRequest), WireError> {
    let ctx = context_from_wire(req.context)?;
    let request = UpdateRequest {
        resource_type: resource_type_from_wire(&req.resource_type)?,
        id: id_from_wire(&req.id)?,
        body: req.body,
        if_match: req.if_match,
    };
    Ok((ctx, request))
}

fn patch_from_wire(req: pb::PatchRequest) -> Result<(RequestContext, PatchRequest), WireError> {
    let ctx = context_from_wire(req.context)?;
    let patch = match req.patch {
        Some(pb::patch_request::Patch::JsonPatch(doc)) => PatchDocument::JsonPatch(doc),
        Some(pb::patch_request::Patch::FhirPathPatch(doc)) => PatchDocument::FhirPathPatch(doc),
        None => return Err(WireError::Missing("patch")),
    };
    let request = PatchRequest {
        resource_type: resource_type_from_wire(&req.resource_type)?,
        id: id_from_wire(&req.id)?,
        patch,
        if_match: req.if_match,
    };
    Ok((ctx, request))
}

fn validate_from_wire(req: pb::ValidateRequest) -> Result<(RequestContext, ValidateRequest), WireError> {
    let ctx = context_from_wire(req.context)?;
    let mode = match req.mode.as_str() {
        "" => ValidateMode::General,
        code => ValidateMode::parse(code).ok_or_else(|| WireError::Invalid {
            field: "mode",
            reason: format!("unknown mode '{}'", clip(code, 40)),
        })?,
    };
    let request = ValidateRequest {
        resource_type: resource_type_from_wire(&req.resource_type)?,
        id: req.id.as_deref().map(id_from_wire).transpose()?,
        resource: req.resource,
        mode,
        profile: req.profile,
    };
    Ok((ctx, request))
}

fn delete_from_wire(req: pb::DeleteRequest) -> Result<(RequestContext, DeleteRequest), WireError> {
    let ctx = context_from_wire(req.context)?;
    let request = DeleteRequest {
        resource_type: resource_type_from_wire(&req.resource_type)?,
        id: id_from_wire(&req.id)?,
        if_match: req.if_match,
    };
    Ok((ctx, request))
}

fn criteria_from_wire(criteria: Vec<pb::SearchParam>) -> Vec<(String, String)> {
    criteria.into_iter().map(|p| (p.name, p.value)).collect()
}

fn conditional_update_from_wire(
    req: pb::ConditionalUpdateRequest,
) -> Result<(RequestContext, ConditionalUpdateRequest), WireError> {
    let ctx = context_from_wire(req.context)?;
    let request = ConditionalUpdateRequest {
        resource_type: resource_type_from_wire(&req.resource_type)?,
        criteria: criteria_from_wire(req.criteria),
        body: req.body,
        if_match: req.if_match,
    };
    Ok((ctx, request))
}

fn conditional_delete_from_wire(
    req: pb::ConditionalDeleteRequest,
) -> Result<(RequestContext, ConditionalDeleteRequest), WireError> {
    let ctx = context_from_wire(req.context)?;
    let request = ConditionalDeleteRequest {
        resource_type: resource_type_from_wire(&req.resource_type)?,
        criteria: criteria_from_wire(req.criteria),
    };
    Ok((ctx, request))
}

fn history_from_wire(req: pb::HistoryRequest) -> Result<(RequestContext, HistoryRequest), WireError> {
    let ctx = context_from_wire(req.context)?;
    let scope = match (req.resource_type.as_deref(), req.id.as_deref()) {
        (None, None) => HistoryScope::System,
        (Some(resource_type), None) => HistoryScope::Type(resource_type_from_wire(resource_type)?),
        (Some(resource_type), Some(id)) => {
            HistoryScope::Instance(resource_type_from_wire(resource_type)?, id_from_wire(id)?)
        }
        (None, Some(_)) => return Err(WireError::IdWithoutResourceType),
    };
    let request = HistoryRequest { scope, count: req.count, since: req.since, at: req.at, page_token: req.page_token };
    Ok((ctx, request))
}

fn search_from_wire(req: pb::SearchRequest) -> Result<(RequestContext, SearchRequest), WireError> {
    let ctx = context_from_wire(req.context)?;
    let resource_type = req.resource_type.as_deref().map(resource_type_from_wire).transpose()?;
    let scope = match (req.compartment_type.as_deref(), req.compartment_id, resource_type) {
        (Some(compartment), Some(id), member) => SearchScope::Compartment {
            compartment: resource_type_from_wire(compartment)?,
            id: id_from_wire(&id)?.into_string(),
            member,
        },
        (Some(_), None, _) => return Err(WireError::Missing("compartment_id")),
        (None, _, Some(resource_type)) => SearchScope::Type(resource_type),
        (None, _, None) => SearchScope::System,
    };
    let params = req.params.into_iter().map(|p| (p.name, p.value)).collect();
    let request = SearchRequest {
        scope,
        params,
        strict: req.strict,
        page_token: req.page_token,
        consistency_token: req.consistency_token,
    };
    Ok((ctx, request))
}

fn bundle_from_wire(req: pb::BundleRequest) -> Result<(RequestContext, BundleRequest), WireError> {
    Ok((context_from_wire(req.context)?, BundleRequest { body: req.bundle }))
}

#[tonic::async_trait]
impl ResourceServiceRpc for GrpcResourceAdapter {
    async fn create(&self, request: Request<pb::CreateRequest>) -> Result<Response<pb::CreateResponse>, Status> {
        respond(
            async {
                let (ctx, request) = decode(create_from_wire(request.into_inner()))?;
                let result = self.0.create(&ctx, request).await?;
                Ok(pb::CreateResponse { result: Some(result.into()) })
            }
            .await,
        )
    }

    async fn read(&self, request: Request<pb::ReadRequest>) -> Result<Response<pb::ReadResponse>, Status> {
        respond(
            async {
                let req = request.into_inner();
                let (ctx, resource_type, id) = decode(target_from_wire(req.context, &req.resource_type, &req.id))?;
                let version = self.0.read(&ctx, resource_type, id).await?;
                Ok(pb::ReadResponse { version: Some(version.into()) })
            }
            .await,
        )
    }

    async fn vread(&self, request: Request<pb::VreadRequest>) -> Result<Response<pb::VreadResponse>, Status> {
        respond(
            async {
                let req = request.into_inner();
                let (ctx, resource_type, id) = decode(target_from_wire(req.context, &req.resource_type, &req.id))?;
                let version = self.0.vread(&ctx, resource_type, id, req.version_id).await?;
                Ok(pb::VreadResponse { version: Some(version.into()) })
            }
            .await,
        )
    }

    async fn update(&self, request: Request<pb::UpdateRequest>) -> Result<Response<pb::UpdateResponse>, Status> {
        respond(
            async {
                let (ctx, request) = decode(update_from_wire(request.into_inner()))?;
                let result = self.0.update(&ctx, request).await?;
                Ok(pb::UpdateResponse { result: Some(result.into()) })
            }
            .await,
        )
    }

    async fn patch(&self, request: Request<pb::PatchRequest>) -> Result<Response<pb::PatchResponse>, Status> {
        respond(
            async {
                let (ctx, request) = decode(patch_from_wire(request.into_inner()))?;
                let result = self.0.patch(&ctx, request).await?;
                Ok(pb::PatchResponse { result: Some(result.into()) })
            }
            .await,
        )
    }

    async fn validate(&self, request: Request<pb::ValidateRequest>) -> Result<Response<pb::ValidateResponse>, Status> {
        respond(
            async {
                let (ctx, request) = decode(validate_from_wire(request.into_inner()))?;
                let issues = self.0.validate(&ctx, request).await?;
                let outcome = fhirmesh_fhir::outcome::operation_outcome(&issues);
                Ok(pb::ValidateResponse { operation_outcome: serde_json::to_vec(&outcome).unwrap_or_default().into() })
            }
            .await,
        )
    }

    async fn delete(&self, request: Request<pb::DeleteRequest>) -> Result<Response<pb::DeleteResponse>, Status> {
        respond(
            async {
                let (ctx, request) = decode(delete_from_wire(request.into_inner()))?;
                let result = self.0.delete(&ctx, request).await?;
                Ok(pb::DeleteResponse { version_id: result.version_id, sequence: result.sequence })
            }
            .await,
        )
    }

    async fn conditional_update(
        &self,
        request: Request<pb::ConditionalUpdateRequest>,
    ) -> Result<Response<pb::UpdateResponse>, Status> {
        respond(
            async {
                let (ctx, request) = decode(conditional_update_from_wire(request.into_inner()))?;
                let result = self.0.conditional_update(&ctx, request).await?;
                Ok(pb::UpdateResponse { result: Some(result.into()) })
            }
            .await,
        )
    }

    async fn conditional_delete(
        &self,
        request: Request<pb::ConditionalDeleteRequest>,
    ) -> Result<Response<pb::ConditionalDeleteResponse>, Status> {
        respond(
            async {
                let (ctx, request) = decode(conditional_delete_from_wire(request.into_inner()))?;
                let result = self.0.conditional_delete(&ctx, request).await?;
                let deleted = result
                    .deleted
                    .into_iter()
                    .map(|(id, version_id)| pb::DeletedResource { id: id.into_string(), version_id })
                    .collect();
                Ok(pb::ConditionalDeleteResponse { deleted, sequence: result.sequence })
            }
            .await,
        )
    }

    async fn history(&self, request: Request<pb::HistoryRequest>) -> Result<Response<pb::HistoryResponse>, Status> {
        respond(
            async {
                let (ctx, request) = decode(history_from_wire(request.into_inner()))?;
                let page = self.0.history(&ctx, request).await?;
                Ok(pb::HistoryResponse {
                    entries: page.entries.into_iter().map(Into::into).collect(),
                    next_page_token: page.next_page_token,
                })
            }
            .await,
        )
    }

    async fn search(&self, request: Request<pb::SearchRequest>) -> Result<Response<pb::SearchResponse>, Status> {
        respond(
            async {
                let (ctx, request) = decode(search_from_wire(request.into_inner()))?;
                let page = self.0.search(&ctx, request).await?;
                Ok(page.into())
            }
            .await,
        )
    }

    async fn index_status(
        &self,
        _: Request<pb::IndexStatusRequest>,
    ) -> Result<Response<pb::IndexStatusResponse>, Status> {
        respond(
            async {
                let status = self.0.index_status().await?;
                Ok(pb::IndexStatusResponse { latest_sequence: status.latest_sequence, watermark: status.watermark })
            }
            .await,
        )
    }

    async fn bundle(&self, request: Request<pb::BundleRequest>) -> Result<Response<pb::BundleResponse>, Status> {
        respond(
            async {
                let (ctx, request) = decode(bundle_from_wire(request.into_inner()))?;
                let result = self.0.bundle(&ctx, request).await?;
                Ok(result.into())
            }
            .await,
        )
    }
}
