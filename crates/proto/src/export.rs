//! The export API over gRPC: [`GrpcExportAdapter`] serves any [`ExportService`] (the exporter),
//! [`GrpcExportClient`] is an [`ExportService`] that calls a remote one (the mesh gateway). A
//! download streams: the first message carries the file's metadata, every message a piece of it,
//! so neither side holds a file in memory.

use std::sync::Arc;

use async_trait::async_trait;
use fhirmesh_core::blob::{Blob, BlobKey};
use fhirmesh_core::export::{
    DynExportService, ExportLevel, ExportService, ExportStatus, JobId, KickOff, Manifest, OutputFile,
};
use fhirmesh_core::{FhirError, FhirResult, RequestContext};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::blob_stream::{BlobStream, blob_from_wire, blob_to_wire};
use crate::client::traced;
use crate::convert::{WireError, context_from_wire, context_to_wire, required, timestamp_from_wire, timestamp_to_wire};
use crate::pb;
use crate::pb::export_service_client::ExportServiceClient;
use crate::pb::export_service_server::{ExportService as ExportServiceRpc, ExportServiceServer};
use crate::status::{fhir_error_to_status, status_to_fhir_error};

const SERVICE: &str = "exporter";

/// Serves an [`ExportService`] as the gRPC `fhirmesh.v1.ExportService`.
#[derive(Clone)]
pub struct GrpcExportAdapter(pub DynExportService);

/// The tonic service for `svc`.
pub fn export_service_server(svc: DynExportService) -> ExportServiceServer<GrpcExportAdapter> {
    ExportServiceServer::new(GrpcExportAdapter(svc))
        .max_decoding_message_size(crate::DEFAULT_MAX_MESSAGE_SIZE)
        .max_encoding_message_size(crate::DEFAULT_MAX_MESSAGE_SIZE)
}

fn level_to_wire(level: &ExportLevel) -> (pb::ExportLevel, String) {
    match level {
        ExportLevel::System => (pb::ExportLevel::System, String::new()),
        ExportLevel::Patient => (pb::ExportLevel::Patient, String::new()),
        ExportLevel::Group { id } => (pb::ExportLevel::Group, id.clone()),
    }
}

fn level_from_wire(level: i32, group_id: String) -> Result<ExportLevel, WireError> {
    match pb::ExportLevel::try_from(level) {
        Ok(pb::ExportLevel::System) => Ok(ExportLevel::System),
        Ok(pb::ExportLevel::Patient) => Ok(ExportLevel::Patient),
        Ok(pb::ExportLevel::Group) => Ok(ExportLevel::Group { id: group_id }),
        _ => Err(WireError::UnknownExportLevel(level)),
    }
}

fn kick_off_from_wire(req: pb::ExportKickOffRequest) -> Result<(RequestContext, KickOff), WireError> {
    let ctx = context_from_wire(req.context)?;
    let kick_off = KickOff {
        level: level_from_wire(req.level, req.group_id)?,
        params: req.params.into_iter().map(|p| (p.name, p.value)).collect(),
        lenient: req.lenient,
        request_url: req.request_url,
    };
    Ok((ctx, kick_off))
}

fn status_to_wire(status: ExportStatus) -> pb::ExportStatusResponse {
    use pb::export_status_response::State;
    let state = match status {
        ExportStatus::InProgress { progress } => State::InProgress(progress),
        ExportStatus::Failed(error) => State::Failed(pb::ErrorOutcome::from(&error)),
        ExportStatus::Complete(manifest) => State::Complete(pb::ExportManifest {
            job_id: manifest.job.to_string(),
            transaction_time: Some(timestamp_to_wire(manifest.transaction_time)),
            request: manifest.request,
            requires_access_token: manifest.requires_access_token,
            output: manifest
                .output
                .into_iter()
                .map(|file| pb::ExportOutputFile {
                    resource_type: file.resource_type,
                    name: file.name,
                    count: file.count,
                    bytes: file.bytes,
                })
                .collect(),
            presigned_urls: manifest.presigned.into_iter().collect(),
        }),
    };
    pb::ExportStatusResponse { state: Some(state) }
}

fn status_from_wire(response: pb::ExportStatusResponse) -> Result<ExportStatus, WireError> {
    use pb::export_status_response::State;
    Ok(match required(response.state, "state")? {
        State::InProgress(progress) => ExportStatus::InProgress { progress },
        State::Failed(error) => ExportStatus::Failed(FhirError::try_from(error)?),
        State::Complete(manifest) => ExportStatus::Complete(Manifest {
            job: JobId::parse(&manifest.job_id)
                .ok_or_else(|| WireError::Invalid { field: "job_id", reason: "not a job id".to_owned() })?,
            transaction_time: timestamp_from_wire(manifest.transaction_time, "transaction_time")?,
            request: manifest.request,
            requires_access_token: manifest.requires_access_token,
            output: manifest
                .output
                .into_iter()
                .map(|file| OutputFile {
                    resource_type: file.resource_type,
                    name: file.name,
                    count: file.count,
                    bytes: file.bytes,
                })
                .collect(),
            presigned: manifest.presigned_urls.into_iter().collect(),
        }),
    })
}

fn respond<T>(result: FhirResult<T>) -> Result<Response<T>, Status> {
    result.map(Response::new).map_err(|err| fhir_error_to_status(&err))
}

fn decode<T>(value: Result<T, WireError>) -> Result<T, Status> {
    value.map_err(|err| fhir_error_to_status(&err.into_invalid()))
}

#[tonic::async_trait]
impl ExportServiceRpc for GrpcExportAdapter {
    async fn kick_off(
        &self,
        request: Request<pb::ExportKickOffRequest>,
    ) -> Result<Response<pb::ExportKickOffResponse>, Status> {
        let (ctx, kick_off) = decode(kick_off_from_wire(request.into_inner()))?;
        let job = self.0.kick_off(&ctx, kick_off).await;
        respond(job.map(|id| pb::ExportKickOffResponse { job_id: id.to_string() }))
    }

    async fn status(
        &self,
        request: Request<pb::ExportJobRequest>,
    ) -> Result<Response<pb::ExportStatusResponse>, Status> {
        let request = request.into_inner();
        let ctx = decode(context_from_wire(request.context))?;
        respond(self.0.status(&ctx, &request.job_id).await.map(status_to_wire))
    }

    async fn cancel(
        &self,
        request: Request<pb::ExportJobRequest>,
    ) -> Result<Response<pb::ExportCancelResponse>, Status> {
        let request = request.into_inner();
        let ctx = decode(context_from_wire(request.context))?;
        respond(self.0.cancel(&ctx, &request.job_id).await.map(|()| pb::ExportCancelResponse {}))
    }

    type DownloadStream = BlobStream;

    async fn download(&self, request: Request<pb::ExportDownloadRequest>) -> Result<Response<BlobStream>, Status> {
        let request = request.into_inner();
        let ctx = decode(context_from_wire(request.context))?;
        let blob = self.0.download(&ctx, &request.job_id, &request.file).await.map_err(|e| fhir_error_to_status(&e))?;
        Ok(Response::new(blob_to_wire(blob, "the export file")))
    }
}

/// [`ExportService`] over gRPC: the mesh gateway's view of the exporter. Cheap to clone.
#[derive(Debug, Clone)]
pub struct GrpcExportClient {
    client: ExportServiceClient<Channel>,
    endpoint: Arc<str>,
}

impl GrpcExportClient {
    /// A client for the exporter at `endpoint` (`http://host:port`; a bare `host:port` means
    /// `http://`). Connects lazily and reconnects after failures; must be called inside a Tokio
    /// runtime. Fails only when `endpoint` is not a valid URI.
    pub fn connect(endpoint: String) -> Result<Self, tonic::transport::Error> {
        Self::connect_with(endpoint, None)
    }

    /// [`GrpcExportClient::connect`], over TLS with `tls`.
    pub fn connect_with(
        endpoint: String,
        tls: Option<tonic::transport::ClientTlsConfig>,
    ) -> Result<Self, tonic::transport::Error> {
        let (channel, endpoint) = crate::client::lazy_channel(endpoint, tls)?;
        let client = ExportServiceClient::new(channel)
            .max_decoding_message_size(crate::DEFAULT_MAX_MESSAGE_SIZE)
            .max_encoding_message_size(crate::DEFAULT_MAX_MESSAGE_SIZE);
        Ok(GrpcExportClient { client, endpoint: endpoint.into() })
    }

    fn status_error(&self, status: &Status) -> FhirError {
        status_to_fhir_error(status, SERVICE, &self.endpoint)
    }

    fn job_request(ctx: &RequestContext, job: &str) -> pb::ExportJobRequest {
        pb::ExportJobRequest { context: Some(context_to_wire(ctx)), job_id: job.to_owned() }
    }
}

#[async_trait]
impl ExportService for GrpcExportClient {
    async fn kick_off(&self, ctx: &RequestContext, kick_off: KickOff) -> Result<JobId, FhirError> {
        let (level, group_id) = level_to_wire(&kick_off.level);
        let request = pb::ExportKickOffRequest {
            context: Some(context_to_wire(ctx)),
            level: level.into(),
            group_id,
            params: kick_off.params.into_iter().map(|(name, value)| pb::ExportParam { name, value }).collect(),
            lenient: kick_off.lenient,
            request_url: kick_off.request_url,
        };
        let response =
            self.client.clone().kick_off(traced(Some(ctx), request)).await.map_err(|s| self.status_error(&s))?;
        let job_id = response.into_inner().job_id;
        JobId::parse(&job_id).ok_or_else(|| {
            WireError::Invalid { field: "job_id", reason: "not a job id".to_owned() }.into_internal(SERVICE)
        })
    }

    async fn status(&self, ctx: &RequestContext, job: &str) -> Result<ExportStatus, FhirError> {
        let response = self
            .client
            .clone()
            .status(traced(Some(ctx), Self::job_request(ctx, job)))
            .await
            .map_err(|s| self.status_error(&s))?;
        status_from_wire(response.into_inner()).map_err(|e| e.into_internal(SERVICE))
    }

    async fn cancel(&self, ctx: &RequestContext, job: &str) -> Result<(), FhirError> {
        self.client
            .clone()
            .cancel(traced(Some(ctx), Self::job_request(ctx, job)))
            .await
            .map_err(|s| self.status_error(&s))?;
        Ok(())
    }

    async fn download(&self, ctx: &RequestContext, job: &str, file: &str) -> Result<Blob, FhirError> {
        let request = pb::ExportDownloadRequest {
            context: Some(context_to_wire(ctx)),
            job_id: job.to_owned(),
            file: file.to_owned(),
        };
        let stream = self
            .client
            .clone()
            .download(traced(Some(ctx), request))
            .await
            .map_err(|s| self.status_error(&s))?
            .into_inner();
        let key = BlobKey::new(&ctx.tenant, &format!("export/{job}/{file}"))
            .map_err(|_| FhirError::not_found(format!("export job '{job}' has no such file")))?;
        let peer: Arc<str> = format!("the exporter at {}", self.endpoint).into();
        blob_from_wire(stream, key, SERVICE, peer, |status| self.status_error(status)).await
    }
}

#[cfg(test)]
mod tests;
