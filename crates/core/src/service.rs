//! The `ResourceService` contract: what the gateway calls, in-process or over gRPC. The gRPC server
//! wraps an `Arc<dyn ResourceService>`; the gRPC client implements this same trait.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use fhirmesh_fhir::outcome::Issue;
use fhirmesh_fhir::search::query::SearchScope;
use fhirmesh_fhir::{LogicalId, ResourceType};

use crate::auth::Access;
use crate::error::FhirResult;
use crate::model::{ResourceVersion, TenantId};
use crate::ports::HistoryScope;

/// Who is asking, and for which tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestContext {
    pub tenant: TenantId,
    /// Correlates logs across services.
    pub request_id: Option<String>,
    /// W3C trace context of the incoming request.
    pub traceparent: Option<String>,
    /// What the caller may do; every interaction checks it (`crate::auth`).
    pub access: Arc<Access>,
    /// The blob key of raw Binary content the gateway stored for this request: the one
    /// content pointer a create or update of a Binary may newly set (`crate::binary`).
    pub binary_upload: Option<String>,
}

impl Default for RequestContext {
    /// The default tenant, unrestricted: internal callers and `auth.mode = none`.
    fn default() -> Self {
        RequestContext {
            tenant: TenantId::default(),
            request_id: None,
            traceparent: None,
            access: Arc::new(Access::unrestricted()),
            binary_upload: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct CreateRequest {
    pub resource_type: ResourceType,
    /// The resource JSON as the client sent it.
    pub body: Bytes,
    /// `If-None-Exist` header: a search query string (`identifier=sys|val`, `_id=x`).
    pub if_none_exist: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpdateRequest {
    pub resource_type: ResourceType,
    pub id: LogicalId,
    pub body: Bytes,
    /// `If-Match` version, when the client sent one.
    pub if_match: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum PatchDocument {
    /// `application/json-patch+json` (RFC 6902).
    JsonPatch(Bytes),
    /// FHIRPath Patch: a `Parameters` resource.
    FhirPathPatch(Bytes),
}

#[derive(Debug, Clone, PartialEq)]
pub struct PatchRequest {
    pub resource_type: ResourceType,
    pub id: LogicalId,
    pub patch: PatchDocument,
    pub if_match: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DeleteRequest {
    pub resource_type: ResourceType,
    pub id: LogicalId,
    pub if_match: Option<u64>,
}

/// `PUT /{type}?criteria`: update the one resource matching `criteria`, or create one when none
/// does (R4 http.html#cond-update).
#[derive(Debug, Clone, PartialEq)]
pub struct ConditionalUpdateRequest {
    pub resource_type: ResourceType,
    /// Search parameters, percent-decoded, in request order.
    pub criteria: Vec<(String, String)>,
    pub body: Bytes,
    pub if_match: Option<u64>,
}

/// `DELETE /{type}?criteria`.
#[derive(Debug, Clone, PartialEq)]
pub struct ConditionalDeleteRequest {
    pub resource_type: ResourceType,
    pub criteria: Vec<(String, String)>,
}

/// The tombstones a conditional delete wrote (empty when nothing matched).
#[derive(Debug, Clone, PartialEq)]
pub struct ConditionalDeleteResult {
    pub deleted: Vec<(LogicalId, u64)>,
    /// The change sequence of the last tombstone written, when any was.
    pub sequence: Option<u64>,
}

/// The outcome of create, update and patch.
#[derive(Debug, Clone, PartialEq)]
pub struct WriteResult {
    /// The version now current (for a conditional create that matched, the existing one).
    pub version: ResourceVersion,
    /// `true` when the write created the resource (HTTP 201).
    pub created: bool,
    /// `false` when nothing was written (conditional create matched an existing resource).
    pub written: bool,
}

/// The outcome of a delete.
#[derive(Debug, Clone, PartialEq)]
pub struct DeleteResult {
    /// The tombstone version written, or `None` when there was nothing live to delete.
    pub version_id: Option<u64>,
    /// The tombstone's change sequence (the consistency token a search may wait for).
    pub sequence: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HistoryRequest {
    pub scope: HistoryScope,
    /// Raw `_count`, `_since`, `_at` and page token values, validated by the service.
    pub count: Option<String>,
    pub since: Option<String>,
    pub at: Option<String>,
    pub page_token: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HistoryPage {
    /// Newest first; tombstones included.
    pub entries: Vec<ResourceVersion>,
    /// Opaque token for the next (older) page.
    pub next_page_token: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SearchRequest {
    /// Type-level, system-level or compartment search.
    pub scope: SearchScope,
    /// Query parameters in request order, percent-decoded (without `_page_token`).
    pub params: Vec<(String, String)>,
    /// `Prefer: handling=strict`: unknown or unsupported parameters are errors instead of ignored.
    pub strict: bool,
    /// Cursor from a previous page's `next`/`previous` link.
    pub page_token: Option<String>,
    /// The client's last consistency token (`X-Consistency-Token`): the search waits, bounded, until
    /// the index has applied it. Without one the service waits for the latest committed write.
    pub consistency_token: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SearchPage {
    /// Current versions of the matches, in search order.
    pub entries: Vec<ResourceVersion>,
    /// Resources added by `_include` / `_revinclude` (Bundle entries with search mode `include`).
    pub included: Vec<ResourceVersion>,
    pub total: Option<u64>,
    pub next_page_token: Option<String>,
    pub previous_page_token: Option<String>,
    /// The parameters applied, canonical, for the `self` link (and to rebuild page links).
    pub applied: Vec<(String, String)>,
    /// Warnings for the client (parameters ignored, a stale index), rendered as an OperationOutcome
    /// entry.
    pub warnings: Vec<Issue>,
}

/// A `transaction` or `batch` Bundle (`POST /`), as the client sent it.
#[derive(Debug, Clone, PartialEq)]
pub struct BundleRequest {
    pub body: Bytes,
}

/// Which kind of Bundle was processed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BundleKind {
    Transaction,
    Batch,
}

impl BundleKind {
    /// `Bundle.type` of the response.
    pub fn response_type(self) -> &'static str {
        match self {
            BundleKind::Transaction => "transaction-response",
            BundleKind::Batch => "batch-response",
        }
    }
}

/// The outcome of a processed Bundle: one entry per request entry, in the request's order. (A
/// transaction that fails fails as a whole, as an error, not as a result.)
#[derive(Debug, Clone, PartialEq)]
pub struct BundleResult {
    pub kind: BundleKind,
    pub entries: Vec<EntryResult>,
    /// The change-log sequence of the bundle's writes (a consistency token), if it wrote.
    pub last_sequence: Option<u64>,
}

/// What one entry did: `Bundle.entry.response` and what to render in `entry.resource`.
#[derive(Debug, Clone, PartialEq)]
pub struct EntryResult {
    /// HTTP status code (`201`, `200`, `204`, `304`, `4xx`…).
    pub status: u16,
    /// `Type/id/_history/vid` of a written or read resource; for a search entry, the path searched
    /// (`Patient`), relative to the base, from which the searchset's links are built.
    pub location: Option<String>,
    /// The resource version written or read (its `ETag`, `Last-Modified`, and the representation
    /// `Prefer: return=representation` asks for).
    pub version: Option<ResourceVersion>,
    /// A search entry's page (rendered as a `searchset` Bundle).
    pub search: Option<SearchPage>,
    /// A failed batch entry, or a warning-bearing one (rendered as `response.outcome`).
    pub error: Option<crate::error::FhirError>,
}

/// How far the search index is behind the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexStatus {
    /// The highest change sequence the store committed.
    pub latest_sequence: u64,
    /// The highest change sequence the search index applied.
    pub watermark: u64,
}

impl IndexStatus {
    /// Changes committed but not yet searchable.
    pub fn lag(&self) -> u64 {
        self.latest_sequence.saturating_sub(self.watermark)
    }
}

/// FHIR interactions on resources.
#[async_trait]
pub trait ResourceService: Send + Sync + 'static {
    async fn create(&self, ctx: &RequestContext, request: CreateRequest) -> FhirResult<WriteResult>;

    /// The current version; `Gone` if deleted, `NotFound` if it never existed.
    async fn read(
        &self,
        ctx: &RequestContext,
        resource_type: ResourceType,
        id: LogicalId,
    ) -> FhirResult<ResourceVersion>;

    /// One version; `Gone` for a tombstone version, `NotFound` if it does not exist.
    async fn vread(
        &self,
        ctx: &RequestContext,
        resource_type: ResourceType,
        id: LogicalId,
        version_id: u64,
    ) -> FhirResult<ResourceVersion>;

    async fn update(&self, ctx: &RequestContext, request: UpdateRequest) -> FhirResult<WriteResult>;

    async fn patch(&self, ctx: &RequestContext, request: PatchRequest) -> FhirResult<WriteResult>;

    async fn delete(&self, ctx: &RequestContext, request: DeleteRequest) -> FhirResult<DeleteResult>;

    async fn conditional_update(
        &self,
        ctx: &RequestContext,
        request: ConditionalUpdateRequest,
    ) -> FhirResult<WriteResult>;

    async fn conditional_delete(
        &self,
        ctx: &RequestContext,
        request: ConditionalDeleteRequest,
    ) -> FhirResult<ConditionalDeleteResult>;

    async fn history(&self, ctx: &RequestContext, request: HistoryRequest) -> FhirResult<HistoryPage>;

    async fn search(&self, ctx: &RequestContext, request: SearchRequest) -> FhirResult<SearchPage>;

    /// A `transaction` (all or nothing) or `batch` (entries independent) Bundle.
    async fn bundle(&self, ctx: &RequestContext, request: BundleRequest) -> FhirResult<BundleResult>;

    /// The search index's progress against the store (for the index-lag metric).
    async fn index_status(&self) -> FhirResult<IndexStatus>;
}

pub type DynResourceService = Arc<dyn ResourceService>;
