//! Client side: a [`ResourceService`] that calls a remote one over gRPC. Encode the request, call,
//! decode the answer; a bad answer is an `Internal` error, an unreachable server `Unavailable`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use fhirmesh_core::ports::HistoryScope;
use fhirmesh_core::service::{
    BundleRequest, BundleResult, ConditionalDeleteRequest, ConditionalDeleteResult, ConditionalUpdateRequest,
    CreateRequest, DeleteRequest, DeleteResult, HistoryPage, HistoryRequest, IndexStatus, PatchDocument, PatchRequest,
    SearchPage, SearchRequest, UpdateRequest, ValidateRequest, WriteResult,
};
use fhirmesh_core::{FhirError, FhirResult, RequestContext, ResourceService, ResourceVersion};
use fhirmesh_fhir::search::query::SearchScope;
use fhirmesh_fhir::{LogicalId, ResourceType};
use tonic::Status;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::convert::{WireError, context_to_wire, required, versions_from_wire};
use crate::pb;
use crate::pb::resource_service_client::ResourceServiceClient;
use crate::status::status_to_fhir_error;

const SERVICE: &str = "resource";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The first pause before a read is tried again; it doubles after each try.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// How a [`GrpcResourceClient`] calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallPolicy {
    /// Each call's deadline, retries included: sent as `grpc-timeout` (the server abandons the
    /// call past it) and enforced here (a server or network that never answers fails the call as
    /// unavailable).
    pub timeout: Duration,
    /// How often a read-only call (read, vread, search, history, index status) is tried again
    /// when it failed before the service answered — a refused or reset connection, e.g. while a
    /// resource service restarts — after 100 ms, 200 ms, … Writes are never tried again: one
    /// may have been applied even though its answer was lost.
    pub read_retries: u32,
}

impl Default for CallPolicy {
    fn default() -> Self {
        CallPolicy { timeout: Duration::from_secs(60), read_retries: 2 }
    }
}

/// A failure of the connection rather than an answer of the service (which carries its category):
/// refused (`UNAVAILABLE`) or closed before the answer (`CANCELLED`).
fn is_transport_failure(status: &Status) -> bool {
    matches!(status.code(), tonic::Code::Unavailable | tonic::Code::Cancelled)
        && status.metadata().get(crate::CATEGORY_METADATA_KEY).is_none()
}

/// [`ResourceService`] over gRPC: the gateway's view of a remote resource service.
///
/// Cheap to clone (clones share one HTTP/2 channel).
#[derive(Debug, Clone)]
pub struct GrpcResourceClient {
    client: ResourceServiceClient<Channel>,
    /// Where the service lives, for error messages.
    endpoint: Arc<str>,
    policy: CallPolicy,
}

impl GrpcResourceClient {
    /// A client for the service at `endpoint` (`http://host:port`; a bare `host:port` means
    /// `http://`). Connects lazily, on the first call, and reconnects after failures; must be
    /// called inside a Tokio runtime. Fails only when `endpoint` is not a valid URI.
    pub fn connect(endpoint: String) -> Result<Self, tonic::transport::Error> {
        Self::connect_with(endpoint, None)
    }

    /// [`GrpcResourceClient::connect`], over TLS with `tls`.
    pub fn connect_with(endpoint: String, tls: Option<ClientTlsConfig>) -> Result<Self, tonic::transport::Error> {
        let (channel, endpoint) = lazy_channel(endpoint, tls)?;
        Ok(Self::with_label(channel, endpoint))
    }

    /// A client over an existing channel.
    pub fn new(channel: Channel) -> Self {
        Self::with_label(channel, "(configured channel)".to_owned())
    }

    fn with_label(channel: Channel, endpoint: String) -> Self {
        let client = ResourceServiceClient::new(channel)
            .max_decoding_message_size(crate::DEFAULT_MAX_MESSAGE_SIZE)
            .max_encoding_message_size(crate::DEFAULT_MAX_MESSAGE_SIZE);
        GrpcResourceClient { client, endpoint: endpoint.into(), policy: CallPolicy::default() }
    }

    /// Calls with `policy` (default: [`CallPolicy::default`]).
    pub fn with_policy(mut self, policy: CallPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// One call of `rpc` with `message` under the deadline; a read-only one (`read_only`) is tried
    /// again after a transport failure (see [`CallPolicy::read_retries`]).
    async fn call<M, T, F, Fut>(
        &self,
        message: M,
        read_only: bool,
        ctx: Option<&RequestContext>,
        rpc: F,
    ) -> FhirResult<T>
    where
        M: Clone,
        F: Fn(ResourceServiceClient<Channel>, tonic::Request<M>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let tries = if read_only { 1 + self.policy.read_retries } else { 1 };
        let mut message = Some(message);
        let mut pause = RETRY_PAUSE;
        let deadline = tokio::time::Instant::now() + self.policy.timeout;
        let mut tried = 0;
        loop {
            tried += 1;
            let last = tried >= tries;
            let this = if last { message.take() } else { message.clone() };
            let Some(this) = this else { return Err(FhirError::internal("gRPC call without a message")) };
            let mut request = traced(ctx, this);
            request.set_timeout(deadline.saturating_duration_since(tokio::time::Instant::now()));
            let answer = match tokio::time::timeout_at(deadline, rpc(self.client.clone(), request)).await {
                Ok(answer) => answer,
                Err(_) => Err(Status::deadline_exceeded(format!("no answer within {:?}", self.policy.timeout))),
            };
            match answer {
                Ok(response) => return Ok(response.into_inner()),
                Err(status)
                    if !last && is_transport_failure(&status) && tokio::time::Instant::now() + pause < deadline =>
                {
                    tracing::debug!(endpoint = %self.endpoint, %status, ?pause, "resource service unreachable; trying the read again");
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
                Err(status) => return Err(self.status_error(&status)),
            }
        }
    }

    /// Caps sent and received messages at `max_message_size` bytes (default
    /// [`crate::DEFAULT_MAX_MESSAGE_SIZE`]).
    pub fn with_max_message_size(mut self, max_message_size: usize) -> Self {
        self.client =
            self.client.max_decoding_message_size(max_message_size).max_encoding_message_size(max_message_size);
        self
    }

    /// The endpoint this client calls (for logs and error messages).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn status_error(&self, status: &Status) -> FhirError {
        status_to_fhir_error(status, SERVICE, &self.endpoint)
    }

    fn decoded<T>(&self, value: Result<T, WireError>) -> FhirResult<T> {
        value.map_err(|err| err.into_internal(SERVICE))
    }

    fn write_result(&self, result: Option<pb::WriteResult>) -> FhirResult<WriteResult> {
        self.decoded(required(result, "result").and_then(WriteResult::try_from))
    }

    fn version(&self, version: Option<pb::ResourceVersion>) -> FhirResult<ResourceVersion> {
        self.decoded(required(version, "version").and_then(ResourceVersion::try_from))
    }
}

#[async_trait]
impl ResourceService for GrpcResourceClient {
    async fn create(&self, ctx: &RequestContext, request: CreateRequest) -> FhirResult<WriteResult> {
        let request = pb::CreateRequest {
            context: Some(context_to_wire(ctx)),
            resource_type: request.resource_type.as_str().to_owned(),
            body: request.body,
            if_none_exist: request.if_none_exist,
        };
        let response = self.call(request, false, Some(ctx), |mut c, r| async move { c.create(r).await }).await?;
        self.write_result(response.result)
    }

    async fn read(
        &self,
        ctx: &RequestContext,
        resource_type: ResourceType,
        id: LogicalId,
    ) -> FhirResult<ResourceVersion> {
        let request = pb::ReadRequest {
            context: Some(context_to_wire(ctx)),
            resource_type: resource_type.as_str().to_owned(),
            id: id.into_string(),
        };
        let response = self.call(request, true, Some(ctx), |mut c, r| async move { c.read(r).await }).await?;
        self.version(response.version)
    }

    async fn vread(
        &self,
        ctx: &RequestContext,
        resource_type: ResourceType,
        id: LogicalId,
        version_id: u64,
    ) -> FhirResult<ResourceVersion> {
        let request = pb::VreadRequest {
            context: Some(context_to_wire(ctx)),
            resource_type: resource_type.as_str().to_owned(),
            id: id.into_string(),
            version_id,
        };
        let response = self.call(request, true, Some(ctx), |mut c, r| async move { c.vread(r).await }).await?;
        self.version(response.version)
    }

    async fn update(&self, ctx: &RequestContext, request: UpdateRequest) -> FhirResult<WriteResult> {
        let request = pb::UpdateRequest {
            context: Some(context_to_wire(ctx)),
            resource_type: request.resource_type.as_str().to_owned(),
            id: request.id.into_string(),
            body: request.body,
            if_match: request.if_match,
        };
        let response = self.call(request, false, Some(ctx), |mut c, r| async move { c.update(r).await }).await?;
        self.write_result(response.result)
    }

    async fn patch(&self, ctx: &RequestContext, request: PatchRequest) -> FhirResult<WriteResult> {
        let patch = match request.patch {
            PatchDocument::JsonPatch(doc) => pb::patch_request::Patch::JsonPatch(doc),
            PatchDocument::FhirPathPatch(doc) => pb::patch_request::Patch::FhirPathPatch(doc),
        };
        let request = pb::PatchRequest {
            context: Some(context_to_wire(ctx)),
            resource_type: request.resource_type.as_str().to_owned(),
            id: request.id.into_string(),
            patch: Some(patch),
            if_match: request.if_match,
        };
        let response = self.call(request, false, Some(ctx), |mut c, r| async move { c.patch(r).await }).await?;
        self.write_result(response.result)
    }

    async fn validate(
        &self,
        ctx: &RequestContext,
        request: ValidateRequest,
    ) -> FhirResult<Vec<fhirmesh_fhir::outcome::Issue>> {
        let request = pb::ValidateRequest {
            context: Some(context_to_wire(ctx)),
            resource_type: request.resource_type.as_str().to_owned(),
            id: request.id.map(LogicalId::into_string),
            resource: request.resource,
            mode: request.mode.as_str().to_owned(),
            profile: request.profile,
        };
        // Nothing is written: safe to try again after a transport failure.
        let response = self.call(request, true, Some(ctx), |mut c, r| async move { c.validate(r).await }).await?;
        let outcome: serde_json::Value = self.decoded(
            serde_json::from_slice(&response.operation_outcome)
                .map_err(|err| WireError::Invalid { field: "operation_outcome", reason: err.to_string() }),
        )?;
        Ok(outcome["issue"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(fhirmesh_fhir::outcome::Issue::from_json)
            .collect())
    }

    async fn delete(&self, ctx: &RequestContext, request: DeleteRequest) -> FhirResult<DeleteResult> {
        let request = pb::DeleteRequest {
            context: Some(context_to_wire(ctx)),
            resource_type: request.resource_type.as_str().to_owned(),
            id: request.id.into_string(),
            if_match: request.if_match,
        };
        let response = self.call(request, false, Some(ctx), |mut c, r| async move { c.delete(r).await }).await?;
        Ok(DeleteResult { version_id: response.version_id, sequence: response.sequence })
    }

    async fn conditional_update(
        &self,
        ctx: &RequestContext,
        request: ConditionalUpdateRequest,
    ) -> FhirResult<WriteResult> {
        let request = pb::ConditionalUpdateRequest {
            context: Some(context_to_wire(ctx)),
            resource_type: request.resource_type.as_str().to_owned(),
            criteria: request.criteria.into_iter().map(|(name, value)| pb::SearchParam { name, value }).collect(),
            body: request.body,
            if_match: request.if_match,
        };
        let response =
            self.call(request, false, Some(ctx), |mut c, r| async move { c.conditional_update(r).await }).await?;
        self.write_result(response.result)
    }

    async fn conditional_delete(
        &self,
        ctx: &RequestContext,
        request: ConditionalDeleteRequest,
    ) -> FhirResult<ConditionalDeleteResult> {
        let request = pb::ConditionalDeleteRequest {
            context: Some(context_to_wire(ctx)),
            resource_type: request.resource_type.as_str().to_owned(),
            criteria: request.criteria.into_iter().map(|(name, value)| pb::SearchParam { name, value }).collect(),
        };
        let response =
            self.call(request, false, Some(ctx), |mut c, r| async move { c.conditional_delete(r).await }).await?;
        let deleted = response
            .deleted
            .into_iter()
            .map(|d| {
                LogicalId::parse(&d.id)
                    .map(|id| (id, d.version_id))
                    .map_err(|_| FhirError::internal("resource service returned an invalid id"))
            })
            .collect::<FhirResult<Vec<_>>>()?;
        Ok(ConditionalDeleteResult { deleted, sequence: response.sequence })
    }

    async fn index_status(&self) -> FhirResult<IndexStatus> {
        let response =
            self.call(pb::IndexStatusRequest {}, true, None, |mut c, r| async move { c.index_status(r).await }).await?;
        Ok(IndexStatus { latest_sequence: response.latest_sequence, watermark: response.watermark })
    }

    async fn history(&self, ctx: &RequestContext, request: HistoryRequest) -> FhirResult<HistoryPage> {
        let (resource_type, id) = match request.scope {
            HistoryScope::System => (None, None),
            HistoryScope::Type(resource_type) => (Some(resource_type.as_str().to_owned()), None),
            HistoryScope::Instance(resource_type, id) => {
                (Some(resource_type.as_str().to_owned()), Some(id.into_string()))
            }
        };
        let request = pb::HistoryRequest {
            context: Some(context_to_wire(ctx)),
            resource_type,
            id,
            count: request.count,
            since: request.since,
            at: request.at,
            page_token: request.page_token,
        };
        let response = self.call(request, true, Some(ctx), |mut c, r| async move { c.history(r).await }).await?;
        Ok(HistoryPage {
            entries: self.decoded(versions_from_wire(response.entries))?,
            next_page_token: response.next_page_token,
        })
    }

    async fn search(&self, ctx: &RequestContext, request: SearchRequest) -> FhirResult<SearchPage> {
        let (resource_type, compartment_type, compartment_id) = match request.scope {
            SearchScope::Type(t) => (Some(t.as_str().to_owned()), None, None),
            SearchScope::System => (None, None, None),
            SearchScope::Compartment { compartment, id, member } => {
                (member.map(|m| m.as_str().to_owned()), Some(compartment.as_str().to_owned()), Some(id))
            }
        };
        let request = pb::SearchRequest {
            context: Some(context_to_wire(ctx)),
            resource_type,
            params: request.params.into_iter().map(|(name, value)| pb::SearchParam { name, value }).collect(),
            compartment_type,
            compartment_id,
            strict: request.strict,
            page_token: request.page_token,
            consistency_token: request.consistency_token,
        };
        let response = self.call(request, true, Some(ctx), |mut c, r| async move { c.search(r).await }).await?;
        self.decoded(SearchPage::try_from(response))
    }

    async fn bundle(&self, ctx: &RequestContext, request: BundleRequest) -> FhirResult<BundleResult> {
        let request = pb::BundleRequest { context: Some(context_to_wire(ctx)), bundle: request.body };
        let response = self.call(request, false, Some(ctx), |mut c, r| async move { c.bundle(r).await }).await?;
        self.decoded(BundleResult::try_from(response))
    }
}

/// A channel to `endpoint` (`http://host:port`; a bare `host:port` means `http://`) that connects
/// on first use and reconnects after failures, and the endpoint as used. Must be called inside a
/// Tokio runtime; fails only when `endpoint` is not a valid URI.
/// With `tls`, over TLS: a bare `host:port` then means `https://` (an `http://` endpoint would
/// connect in the clear).
pub(crate) fn lazy_channel(
    endpoint: String,
    tls: Option<ClientTlsConfig>,
) -> Result<(Channel, String), tonic::transport::Error> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let endpoint = if endpoint.contains("://") { endpoint } else { format!("{scheme}://{endpoint}") };
    let mut channel = Endpoint::from_shared(endpoint.clone())?.connect_timeout(CONNECT_TIMEOUT);
    if let Some(tls) = tls {
        channel = channel.tls_config(tls)?;
    }
    Ok((channel.connect_lazy(), endpoint))
}

/// `message` as a request that carries the caller's trace context: the trace continues on the
/// server (W3C `traceparent` in the gRPC metadata).
pub(crate) fn traced<M>(ctx: Option<&RequestContext>, message: M) -> tonic::Request<M> {
    let mut request = tonic::Request::new(message);
    if let Some(traceparent) = ctx.and_then(|ctx| ctx.traceparent.as_deref())
        && let Ok(value) = traceparent.parse()
    {
        request.metadata_mut().insert("traceparent", value);
    }
    request
}
