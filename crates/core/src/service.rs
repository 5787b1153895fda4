//! The `ResourceService` contract: what the gateway calls, in-process or over gRPC. The gRPC server
//! wraps an `Arc<dyn ResourceService>`; the gRPC client implements this same trait.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use fhirmesh_fhir::outcome::Issue;
use fhirmesh_fhir::search::query::SearchScope;
use fhirmesh_fhir::{LogicalId, ResourceType};

use crate::auth::Access;
use crate::error::{FhirError, FhirResult};
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

/// What `$validate` checks a resource as (R4 Resource-validate `mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValidateMode {
    /// No mode: the resource on its own.
    General,
    /// As a create would.
    Create,
    /// As an update of the instance would (instance level only).
    Update,
    /// Whether the instance could be deleted (instance level only; no resource).
    Delete,
}

impl ValidateMode {
    pub fn parse(code: &str) -> Option<ValidateMode> {
        match code {
            "create" => Some(ValidateMode::Create),
            "update" => Some(ValidateMode::Update),
            "delete" => Some(ValidateMode::Delete),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ValidateMode::General => "",
            ValidateMode::Create => "create",
            ValidateMode::Update => "update",
            ValidateMode::Delete => "delete",
        }
    }
}

/// `POST [type]/$validate`, `POST [type]/[id]/$validate`.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidateRequest {
    pub resource_type: ResourceType,
    /// The instance, at instance level.
    pub id: Option<LogicalId>,
    /// The resource to check, as JSON (absent only in mode `delete`).
    pub resource: Option<Bytes>,
    pub mode: ValidateMode,
    /// A profile to check the resource against, besides the ones it claims.
    pub profile: Option<String>,
}

impl ValidateRequest {
    /// The request an HTTP `$validate` call makes: its body is the resource itself or a
    /// `Parameters` resource with `resource`, `mode` and `profile`; `mode` and `profile` may also
    /// come as URL parameters (`query`).
    pub fn from_http(
        resource_type: ResourceType,
        id: Option<LogicalId>,
        body: &[u8],
        query: &[(String, String)],
    ) -> FhirResult<ValidateRequest> {
        let (mut resource, mut mode, mut profile) = (None, None, None);
        if !body.iter().all(u8::is_ascii_whitespace) {
            let value: serde_json::Value = serde_json::from_slice(body)
                .map_err(|err| FhirError::invalid(format!("request body is not valid JSON: {err}")))?;
            // A Parameters body is the operation's input, unless Parameters is what is validated
            // and it carries no resource parameter.
            let is_parameters = value["resourceType"] == "Parameters"
                && (resource_type.as_str() != "Parameters"
                    || value["parameter"].as_array().is_some_and(|p| p.iter().any(|p| p["name"] == "resource")));
            if is_parameters {
                for (i, parameter) in value["parameter"].as_array().into_iter().flatten().enumerate() {
                    let at = format!("Parameters.parameter[{i}]");
                    match parameter["name"].as_str() {
                        Some("resource") => {
                            let found = parameter.get("resource").filter(|r| r.is_object()).ok_or_else(|| {
                                FhirError::invalid("the resource parameter carries no resource").at(at.clone())
                            })?;
                            resource = Some(Bytes::from(serde_json::to_vec(found).unwrap_or_default()));
                        }
                        Some("mode") => mode = Some(string_value(parameter, &["valueCode", "valueString"], &at)?),
                        Some("profile") => {
                            profile =
                                Some(string_value(parameter, &["valueUri", "valueCanonical", "valueString"], &at)?)
                        }
                        Some(other) => {
                            return Err(FhirError::invalid(format!(
                                "$validate takes the parameters resource, mode and profile, not {}",
                                fhirmesh_fhir::outcome::clip(other)
                            ))
                            .at(format!("{at}.name")));
                        }
                        None => return Err(FhirError::invalid("a parameter has no name").at(format!("{at}.name"))),
                    }
                }
            } else {
                resource = Some(Bytes::copy_from_slice(body));
            }
        }
        for (name, value) in query {
            match name.as_str() {
                "mode" if mode.is_none() => mode = Some(value.clone()),
                "profile" if profile.is_none() => profile = Some(value.clone()),
                "mode" | "profile" => {
                    return Err(FhirError::invalid(format!("{name} is given both in the URL and in the Parameters")));
                }
                _ => {}
            }
        }
        let mode = match mode.as_deref() {
            None => ValidateMode::General,
            Some(code) => ValidateMode::parse(code).ok_or_else(|| {
                FhirError::invalid(format!(
                    "unknown $validate mode '{}': use create, update or delete",
                    fhirmesh_fhir::outcome::clip(code)
                ))
            })?,
        };
        if matches!(mode, ValidateMode::Update | ValidateMode::Delete) && id.is_none() {
            return Err(FhirError::invalid(format!(
                "mode {} validates an instance: POST [type]/[id]/$validate",
                mode.as_str()
            )));
        }
        if resource.is_none() && mode != ValidateMode::Delete {
            return Err(FhirError::invalid(
                "no resource to validate: send it as the body or as the resource parameter",
            ));
        }
        Ok(ValidateRequest { resource_type, id, resource, mode, profile })
    }
}

fn string_value(parameter: &serde_json::Value, keys: &[&str], at: &str) -> FhirResult<String> {
    keys.iter()
        .find_map(|key| parameter[*key].as_str())
        .map(str::to_owned)
        .ok_or_else(|| FhirError::invalid(format!("expected one of {}", keys.join(", "))).at(at.to_owned()))
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

    /// `$validate`: the issues the resource has (errors and warnings), never writing. `Ok`
    /// whenever validation ran, whatever it found.
    async fn validate(&self, ctx: &RequestContext, request: ValidateRequest) -> FhirResult<Vec<Issue>> {
        let _ = (ctx, request);
        Err(FhirError::unsupported("$validate is not available here"))
    }
}

pub type DynResourceService = Arc<dyn ResourceService>;

#[cfg(test)]
mod validate_request_tests {
    use serde_json::json;

    use super::*;

    fn patient() -> ResourceType {
        ResourceType::parse("Patient").expect("type")
    }

    fn from(body: serde_json::Value, query: &[(&str, &str)]) -> FhirResult<ValidateRequest> {
        let query: Vec<(String, String)> = query.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        ValidateRequest::from_http(patient(), None, body.to_string().as_bytes(), &query)
    }

    #[test]
    fn the_body_is_the_resource_or_parameters_carrying_it() {
        let resource = json!({"resourceType": "Patient", "active": true});
        let plain = from(resource.clone(), &[("profile", "http://p"), ("_pretty", "true")]).expect("plain");
        assert_eq!(plain.resource.as_deref(), Some(resource.to_string().as_bytes()));
        assert_eq!((plain.mode, plain.profile.as_deref()), (ValidateMode::General, Some("http://p")));

        let parameters = json!({"resourceType": "Parameters", "parameter": [
            {"name": "resource", "resource": resource}, {"name": "mode", "valueCode": "create"},
            {"name": "profile", "valueCanonical": "http://q"}]});
        let wrapped = from(parameters, &[]).expect("parameters");
        let sent: serde_json::Value =
            serde_json::from_slice(wrapped.resource.as_deref().expect("resource")).expect("json");
        assert_eq!(sent, resource);
        assert_eq!((wrapped.mode, wrapped.profile.as_deref()), (ValidateMode::Create, Some("http://q")));

        // Validating a Parameters resource itself: it is the resource unless it has a resource parameter.
        let own = json!({"resourceType": "Parameters", "parameter": [{"name": "x", "valueString": "y"}]});
        let request = ValidateRequest::from_http(
            ResourceType::parse("Parameters").expect("type"),
            None,
            own.to_string().as_bytes(),
            &[],
        )
        .expect("own");
        assert_eq!(request.resource.as_deref(), Some(own.to_string().as_bytes()));
    }

    #[test]
    fn what_cannot_be_validated_is_refused_saying_where() {
        let unknown = json!({"resourceType": "Parameters", "parameter": [{"name": "resource", "resource": {"resourceType": "Patient"}}, {"name": "strict", "valueBoolean": true}]});
        let error = from(unknown, &[]).expect_err("unknown parameter");
        assert_eq!(error.issues[0].expression.as_deref(), Some("Parameters.parameter[1].name"));
        let not_a_resource =
            json!({"resourceType": "Parameters", "parameter": [{"name": "resource", "valueString": "x"}]});
        assert_eq!(
            from(not_a_resource, &[]).expect_err("no resource").issues[0].expression.as_deref(),
            Some("Parameters.parameter[0]")
        );
        let twice = json!({"resourceType": "Parameters", "parameter": [{"name": "resource", "resource": {"resourceType": "Patient"}}, {"name": "mode", "valueCode": "create"}]});
        assert!(from(twice, &[("mode", "create")]).expect_err("mode twice").issues[0].diagnostics.contains("both"));
        let no_mode_value = json!({"resourceType": "Parameters", "parameter": [{"name": "mode", "valueInteger": 1}]});
        assert!(from(no_mode_value, &[]).is_err());
        let delete = ValidateRequest::from_http(
            patient(),
            Some(LogicalId::parse("a").expect("id")),
            b"",
            &[("mode".into(), "delete".into())],
        )
        .expect("delete needs no resource");
        assert_eq!((delete.mode, delete.resource), (ValidateMode::Delete, None));
        assert!(
            ValidateRequest::from_http(patient(), None, b"  ", &[]).expect_err("nothing to validate").issues[0]
                .diagnostics
                .contains("no resource")
        );
    }
}
