//! Binary content over gRPC: [`GrpcBinaryAdapter`] serves any [`BinaryService`] (the binary
//! service), [`GrpcBinaryClient`] is a [`BinaryService`] that calls a remote one (the mesh
//! gateway). Uploads and downloads stream in pieces of at most 1 MiB; an upload counts only once
//! its last message says it is complete, so a caller that goes away midway stores nothing.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use fhirmesh_core::binary::{BinaryService, ContentRef, DynBinaryService};
use fhirmesh_core::blob::{Blob, BlobKey, PresignMethod, PresignedUrl, PutBody};
use fhirmesh_core::{FhirError, FhirResult, RequestContext};
use futures::StreamExt;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use crate::blob_stream::{BlobStream, blob_from_wire, blob_to_wire, pieces};
use crate::client::traced;
use crate::convert::{WireError, context_from_wire, context_to_wire, required, timestamp_from_wire, timestamp_to_wire};
use crate::pb;
use crate::pb::binary_service_client::BinaryServiceClient;
use crate::pb::binary_service_server::{BinaryService as BinaryServiceRpc, BinaryServiceServer};
use crate::status::{fhir_error_to_status, status_to_fhir_error};

const SERVICE: &str = "binary";

/// Serves a [`BinaryService`] as the gRPC `fhirmesh.v1.BinaryService`.
#[derive(Clone)]
pub struct GrpcBinaryAdapter(pub DynBinaryService);

/// The tonic service for `svc`.
pub fn binary_service_server(svc: DynBinaryService) -> BinaryServiceServer<GrpcBinaryAdapter> {
    BinaryServiceServer::new(GrpcBinaryAdapter(svc))
        .max_decoding_message_size(crate::DEFAULT_MAX_MESSAGE_SIZE)
        .max_encoding_message_size(crate::DEFAULT_MAX_MESSAGE_SIZE)
}

fn content_to_wire(content: &ContentRef) -> pb::BinaryContent {
    pb::BinaryContent { key: content.key.clone(), size: content.size, sha256: content.sha256.clone() }
}

fn presigned_to_wire(content: &ContentRef, url: Option<PresignedUrl>) -> pb::BinaryPresignResponse {
    let mut response = pb::BinaryPresignResponse { content: Some(content_to_wire(content)), ..Default::default() };
    if let Some(url) = url {
        response.url = Some(url.url);
        response.headers = url.headers.into_iter().map(|(name, value)| pb::Header { name, value }).collect();
        response.expires_at = Some(timestamp_to_wire(url.expires_at));
    }
    response
}

fn presigned_from_wire(
    response: pb::BinaryPresignResponse,
    method: PresignMethod,
) -> Result<(ContentRef, Option<PresignedUrl>), WireError> {
    let content = content_from_wire(response.content)?;
    let Some(url) = response.url else { return Ok((content, None)) };
    let expires_at = timestamp_from_wire(response.expires_at, "expires_at")?;
    let headers = response.headers.into_iter().map(|h| (h.name, h.value)).collect();
    Ok((content, Some(PresignedUrl { url, method, expires_at, headers })))
}

/// A presign expiry on the wire: whole seconds, at least one.
fn expiry_from_wire(seconds: u32) -> Result<Duration, WireError> {
    if seconds == 0 {
        return Err(WireError::Invalid { field: "expires_in_seconds", reason: "must be at least 1".to_owned() });
    }
    Ok(Duration::from_secs(u64::from(seconds)))
}

fn expiry_to_wire(expires_in: Duration) -> u32 {
    u32::try_from(expires_in.as_secs()).unwrap_or(u32::MAX).max(1)
}

fn content_from_wire(content: Option<pb::BinaryContent>) -> Result<ContentRef, WireError> {
    let content = required(content, "content")?;
    Ok(ContentRef { key: content.key, size: content.size, sha256: content.sha256 })
}

fn decode<T>(value: Result<T, WireError>) -> Result<T, Status> {
    value.map_err(|err| fhir_error_to_status(&err.into_invalid()))
}

/// The content of an upload after its first message: data until the message marked `end`; a
/// stream that stops before it (or breaks) fails the body, so nothing is stored.
fn upload_body(stream: Streaming<pb::BinaryUploadChunk>) -> PutBody {
    futures::stream::unfold(Some(stream), |stream| async move {
        let mut stream = stream?;
        match stream.message().await {
            Ok(Some(piece)) if piece.end => (!piece.data.is_empty()).then_some(Ok(piece.data)).map(|data| (data, None)),
            Ok(Some(piece)) => Some((Ok(piece.data), Some(stream))),
            Ok(None) => Some((Err(io::Error::other("the upload ended before its last message")), None)),
            Err(status) => Some((Err(io::Error::other(format!("the upload broke: {}", status.message()))), None)),
        }
    })
    .boxed()
}

#[tonic::async_trait]
impl BinaryServiceRpc for GrpcBinaryAdapter {
    async fn upload(
        &self,
        request: Request<Streaming<pb::BinaryUploadChunk>>,
    ) -> Result<Response<pb::BinaryContent>, Status> {
        let mut stream = request.into_inner();
        let first =
            stream.message().await?.ok_or_else(|| Status::invalid_argument("an upload needs a first message"))?;
        let start = decode(required(first.start, "start"))?;
        let ctx = decode(context_from_wire(start.context))?;
        let head = futures::stream::iter((!first.data.is_empty()).then_some(Ok(first.data)));
        let body: PutBody = if first.end { head.boxed() } else { head.chain(upload_body(stream)).boxed() };
        let stored = self.0.upload(&ctx, &start.content_type, body, start.max_bytes).await;
        stored.map(|content| Response::new(content_to_wire(&content))).map_err(|e| fhir_error_to_status(&e))
    }

    type DownloadStream = BlobStream;

    async fn download(&self, request: Request<pb::BinaryContentRequest>) -> Result<Response<BlobStream>, Status> {
        let request = request.into_inner();
        let ctx = decode(context_from_wire(request.context))?;
        let content = decode(content_from_wire(request.content))?;
        let blob = self.0.download(&ctx, &content).await.map_err(|e| fhir_error_to_status(&e))?;
        Ok(Response::new(blob_to_wire(blob, "the Binary's content")))
    }

    async fn discard(
        &self,
        request: Request<pb::BinaryContentRequest>,
    ) -> Result<Response<pb::BinaryDiscardResponse>, Status> {
        let request = request.into_inner();
        let ctx = decode(context_from_wire(request.context))?;
        let content = decode(content_from_wire(request.content))?;
        let discarded = self.0.discard(&ctx, &content).await;
        discarded.map(|()| Response::new(pb::BinaryDiscardResponse {})).map_err(|e| fhir_error_to_status(&e))
    }

    async fn presign_upload(
        &self,
        request: Request<pb::BinaryPresignUploadRequest>,
    ) -> Result<Response<pb::BinaryPresignResponse>, Status> {
        let request = request.into_inner();
        let ctx = decode(context_from_wire(request.context))?;
        let expires_in = decode(expiry_from_wire(request.expires_in_seconds))?;
        let presigned = self.0.presign_upload(&ctx, &request.content_type, expires_in).await;
        match presigned.map_err(|e| fhir_error_to_status(&e))? {
            Some((content, url)) => Ok(Response::new(presigned_to_wire(&content, Some(url)))),
            None => Ok(Response::new(pb::BinaryPresignResponse::default())),
        }
    }

    async fn presign_download(
        &self,
        request: Request<pb::BinaryPresignDownloadRequest>,
    ) -> Result<Response<pb::BinaryPresignResponse>, Status> {
        let request = request.into_inner();
        let ctx = decode(context_from_wire(request.context))?;
        let content = decode(content_from_wire(request.content))?;
        let expires_in = decode(expiry_from_wire(request.expires_in_seconds))?;
        let url = self.0.presign_download(&ctx, &content, expires_in).await.map_err(|e| fhir_error_to_status(&e))?;
        Ok(Response::new(presigned_to_wire(&content, url)))
    }
}

/// [`BinaryService`] over gRPC: the mesh gateway's view of the binary service. Cheap to clone.
#[derive(Debug, Clone)]
pub struct GrpcBinaryClient {
    client: BinaryServiceClient<Channel>,
    endpoint: Arc<str>,
}

impl GrpcBinaryClient {
    /// A client for the binary service at `endpoint` (`http://host:port`; a bare `host:port`
    /// means `http://`). Connects lazily and reconnects after failures; must be called inside a
    /// Tokio runtime. Fails only when `endpoint` is not a valid URI.
    pub fn connect(endpoint: String) -> Result<Self, tonic::transport::Error> {
        Self::connect_with(endpoint, None)
    }

    /// [`GrpcBinaryClient::connect`], over TLS with `tls`.
    pub fn connect_with(
        endpoint: String,
        tls: Option<tonic::transport::ClientTlsConfig>,
    ) -> Result<Self, tonic::transport::Error> {
        let (channel, endpoint) = crate::client::lazy_channel(endpoint, tls)?;
        let client = BinaryServiceClient::new(channel)
            .max_decoding_message_size(crate::DEFAULT_MAX_MESSAGE_SIZE)
            .max_encoding_message_size(crate::DEFAULT_MAX_MESSAGE_SIZE);
        Ok(GrpcBinaryClient { client, endpoint: endpoint.into() })
    }

    fn status_error(&self, status: &Status) -> FhirError {
        status_to_fhir_error(status, SERVICE, &self.endpoint)
    }

    fn content_request(ctx: &RequestContext, content: &ContentRef) -> pb::BinaryContentRequest {
        pb::BinaryContentRequest { context: Some(context_to_wire(ctx)), content: Some(content_to_wire(content)) }
    }
}

/// The messages of an upload of `body`: the start, the data in pieces, and `end` — unless the
/// body fails, which ends the stream without `end` (the service then stores nothing).
fn upload_messages(
    start: pb::BinaryUploadStart,
    body: PutBody,
) -> impl futures::Stream<Item = pb::BinaryUploadChunk> + Send + 'static {
    enum State {
        Start(pb::BinaryUploadStart, PutBody),
        Data(PutBody),
        Done,
    }
    let data = |data: Bytes| pb::BinaryUploadChunk { data, ..Default::default() };
    futures::stream::unfold(State::Start(start, body), move |state| async move {
        match state {
            State::Start(start, body) => {
                let first = pb::BinaryUploadChunk { start: Some(start), ..Default::default() };
                Some((vec![first], State::Data(body)))
            }
            State::Data(mut body) => match body.next().await {
                Some(Ok(bytes)) => Some((pieces(bytes).into_iter().map(data).collect(), State::Data(body))),
                Some(Err(error)) => {
                    tracing::debug!(%error, "the Binary upload body failed; ending the upload incomplete");
                    None
                }
                None => Some((vec![pb::BinaryUploadChunk { end: true, ..Default::default() }], State::Done)),
            },
            State::Done => None,
        }
    })
    .flat_map(futures::stream::iter)
}

#[async_trait]
impl BinaryService for GrpcBinaryClient {
    async fn upload(
        &self,
        ctx: &RequestContext,
        content_type: &str,
        body: PutBody,
        max_bytes: u64,
    ) -> FhirResult<ContentRef> {
        let start = pb::BinaryUploadStart {
            context: Some(context_to_wire(ctx)),
            content_type: content_type.to_owned(),
            max_bytes,
        };
        let response = self
            .client
            .clone()
            .upload(traced(Some(ctx), upload_messages(start, body)))
            .await
            .map_err(|s| self.status_error(&s))?;
        content_from_wire(Some(response.into_inner())).map_err(|e| e.into_internal(SERVICE))
    }

    async fn download(&self, ctx: &RequestContext, content: &ContentRef) -> FhirResult<Blob> {
        let request = Self::content_request(ctx, content);
        let stream = self
            .client
            .clone()
            .download(traced(Some(ctx), request))
            .await
            .map_err(|s| self.status_error(&s))?
            .into_inner();
        let key = BlobKey::new(&ctx.tenant, &content.key)
            .map_err(|e| WireError::Invalid { field: "key", reason: e.to_string() }.into_internal(SERVICE))?;
        let peer: Arc<str> = format!("the binary service at {}", self.endpoint).into();
        blob_from_wire(stream, key, SERVICE, peer, |status| self.status_error(status)).await
    }

    async fn discard(&self, ctx: &RequestContext, content: &ContentRef) -> FhirResult<()> {
        let request = Self::content_request(ctx, content);
        self.client.clone().discard(traced(Some(ctx), request)).await.map_err(|s| self.status_error(&s))?;
        Ok(())
    }

    async fn presign_upload(
        &self,
        ctx: &RequestContext,
        content_type: &str,
        expires_in: Duration,
    ) -> FhirResult<Option<(ContentRef, PresignedUrl)>> {
        let request = pb::BinaryPresignUploadRequest {
            context: Some(context_to_wire(ctx)),
            content_type: content_type.to_owned(),
            expires_in_seconds: expiry_to_wire(expires_in),
        };
        let response =
            self.client.clone().presign_upload(traced(Some(ctx), request)).await.map_err(|s| self.status_error(&s))?;
        let response = response.into_inner();
        if response.content.is_none() {
            return Ok(None);
        }
        match presigned_from_wire(response, PresignMethod::Put).map_err(|e| e.into_internal(SERVICE))? {
            (content, Some(url)) => Ok(Some((content, url))),
            (_, None) => Ok(None),
        }
    }

    async fn presign_download(
        &self,
        ctx: &RequestContext,
        content: &ContentRef,
        expires_in: Duration,
    ) -> FhirResult<Option<PresignedUrl>> {
        let request = pb::BinaryPresignDownloadRequest {
            context: Some(context_to_wire(ctx)),
            content: Some(content_to_wire(content)),
            expires_in_seconds: expiry_to_wire(expires_in),
        };
        let response = self
            .client
            .clone()
            .presign_download(traced(Some(ctx), request))
            .await
            .map_err(|s| self.status_error(&s))?;
        let (_, url) =
            presigned_from_wire(response.into_inner(), PresignMethod::Get).map_err(|e| e.into_internal(SERVICE))?;
        Ok(url)
    }
}

#[cfg(test)]
mod tests;
