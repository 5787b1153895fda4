//! Conversions between wire (protobuf) values and core values. Wire-to-core conversions validate
//! and return [`WireError`]; the server turns it into an `Invalid` error, the client into an
//! `Internal` one.

use std::sync::Arc;

use bytes::Bytes;
use fhirmesh_core::auth::Access;
use fhirmesh_core::service::{BundleKind, BundleResult, EntryResult, SearchPage, WriteResult};
use fhirmesh_core::{ErrorCategory, FhirError, Operation, RequestContext, ResourceVersion, TenantId};
use fhirmesh_fhir::outcome::{Issue, operation_outcome};
use fhirmesh_fhir::{LogicalId, ResourceType};
use time::OffsetDateTime;

use crate::pb;

/// Longest wire value echoed back in an error message.
const MAX_ECHO_CHARS: usize = 64;

/// A protobuf message that does not make a valid core value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("missing field `{0}`")]
    Missing(&'static str),
    #[error("`{0}` is not a valid access grant")]
    InvalidAccess(&'static str),
    #[error("unknown resource type '{0}'")]
    UnknownResourceType(String),
    #[error("invalid resource id '{value}': {reason}")]
    InvalidId { value: String, reason: String },
    #[error("invalid tenant '{0}': expected 1 to 64 characters of A-Z, a-z, 0-9, '_' and '-'")]
    InvalidTenant(String),
    #[error("unknown operation {0}")]
    UnknownOperation(i32),
    #[error("invalid timestamp in `{0}`")]
    InvalidTimestamp(&'static str),
    #[error("instance history needs a resource type")]
    IdWithoutResourceType,
    #[error("unknown bundle kind {0}")]
    UnknownBundleKind(i32),
    #[error("unknown export level {0}")]
    UnknownExportLevel(i32),
    #[error("invalid `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("invalid HTTP status {0}: expected 100 to 599")]
    InvalidStatus(u32),
    #[error("unknown error category '{0}'")]
    UnknownCategory(String),
    #[error("invalid OperationOutcome in `{field}`: {reason}")]
    InvalidOutcome { field: &'static str, reason: String },
    #[error("bundle entry {index}: {source}")]
    InEntry { index: usize, source: Box<WireError> },
    #[error("malformed protobuf message: {0}")]
    Decode(#[from] prost::DecodeError),
}

impl WireError {
    /// The error a server answers for malformed request data.
    pub(crate) fn into_invalid(self) -> FhirError {
        FhirError::invalid(self.to_string())
    }

    /// The error a client reports for a malformed response.
    pub(crate) fn into_internal(self, service: &str) -> FhirError {
        tracing::warn!(service, error = %self, "malformed grpc response");
        FhirError::internal(format!("malformed response from the {service} service: {self}"))
    }
}

pub(crate) use fhirmesh_fhir::outcome::clip_to as clip;

pub(crate) fn required<T>(value: Option<T>, field: &'static str) -> Result<T, WireError> {
    value.ok_or(WireError::Missing(field))
}

pub(crate) fn resource_type_from_wire(value: &str) -> Result<ResourceType, WireError> {
    ResourceType::parse(value).ok_or_else(|| WireError::UnknownResourceType(clip(value, MAX_ECHO_CHARS)))
}

pub(crate) fn id_from_wire(value: &str) -> Result<LogicalId, WireError> {
    LogicalId::parse(value)
        .map_err(|err| WireError::InvalidId { value: clip(value, MAX_ECHO_CHARS), reason: err.to_string() })
}

pub(crate) fn tenant_from_wire(value: &str) -> Result<TenantId, WireError> {
    TenantId::parse(value).ok_or_else(|| WireError::InvalidTenant(clip(value, MAX_ECHO_CHARS)))
}

pub(crate) fn operation_to_wire(operation: Operation) -> pb::Operation {
    match operation {
        Operation::Create => pb::Operation::Create,
        Operation::Update => pb::Operation::Update,
        Operation::Delete => pb::Operation::Delete,
    }
}

pub(crate) fn operation_from_wire(value: i32) -> Result<Operation, WireError> {
    match pb::Operation::try_from(value) {
        Ok(pb::Operation::Create) => Ok(Operation::Create),
        Ok(pb::Operation::Update) => Ok(Operation::Update),
        Ok(pb::Operation::Delete) => Ok(Operation::Delete),
        Ok(pb::Operation::Unspecified) | Err(_) => Err(WireError::UnknownOperation(value)),
    }
}

pub(crate) fn timestamp_to_wire(instant: OffsetDateTime) -> prost_types::Timestamp {
    // `nanosecond()` is below 10^9, so the cast is lossless.
    prost_types::Timestamp { seconds: instant.unix_timestamp(), nanos: instant.nanosecond() as i32 }
}

pub(crate) fn timestamp_from_wire(
    value: Option<prost_types::Timestamp>,
    field: &'static str,
) -> Result<OffsetDateTime, WireError> {
    let value = required(value, field)?;
    if !(0..1_000_000_000).contains(&value.nanos) {
        return Err(WireError::InvalidTimestamp(field));
    }
    let nanos = i128::from(value.seconds) * 1_000_000_000 + i128::from(value.nanos);
    OffsetDateTime::from_unix_timestamp_nanos(nanos).map_err(|_| WireError::InvalidTimestamp(field))
}

pub(crate) fn context_to_wire(ctx: &RequestContext) -> pb::RequestContext {
    pb::RequestContext {
        tenant: ctx.tenant.as_str().to_owned(),
        request_id: ctx.request_id.clone(),
        traceparent: ctx.traceparent.clone(),
        // Unrestricted grants still carry the caller when there is one (an open policy with
        // tokens): export jobs belong to it.
        access_json: (!ctx.access.is_unrestricted() || ctx.access.principal().is_some())
            .then(|| serde_json::to_string(ctx.access.as_ref()).unwrap_or_default()),
        binary_upload: ctx.binary_upload.clone(),
    }
}

/// The request context is required: a request without one must not silently land in a tenant.
/// Its `traceparent` becomes the receiving call's own span when spans are exported (the gRPC
/// server's span is current here), so what the call writes continues the trace from there.
pub(crate) fn context_from_wire(value: Option<pb::RequestContext>) -> Result<RequestContext, WireError> {
    let value = required(value, "context")?;
    let access = match value.access_json.as_deref() {
        None => Access::unrestricted(),
        Some(json) => serde_json::from_str(json).map_err(|_| WireError::InvalidAccess("context.access_json"))?,
    };
    Ok(RequestContext {
        tenant: tenant_from_wire(&value.tenant)?,
        request_id: value.request_id,
        traceparent: fhirmesh_core::trace::outgoing_traceparent(
            &tracing::Span::current(),
            value.traceparent.as_deref(),
        ),
        access: Arc::new(access),
        binary_upload: value.binary_upload,
    })
}

impl From<ResourceVersion> for pb::ResourceVersion {
    fn from(version: ResourceVersion) -> Self {
        pb::ResourceVersion {
            resource_type: version.resource_type.as_str().to_owned(),
            id: version.id.as_str().to_owned(),
            version_id: version.version_id,
            last_updated: Some(timestamp_to_wire(version.last_updated)),
            operation: operation_to_wire(version.operation).into(),
            body: version.body,
            sequence: version.sequence,
        }
    }
}

impl TryFrom<pb::ResourceVersion> for ResourceVersion {
    type Error = WireError;

    fn try_from(version: pb::ResourceVersion) -> Result<Self, WireError> {
        Ok(ResourceVersion {
            resource_type: resource_type_from_wire(&version.resource_type)?,
            id: id_from_wire(&version.id)?,
            version_id: version.version_id,
            last_updated: timestamp_from_wire(version.last_updated, "last_updated")?,
            operation: operation_from_wire(version.operation)?,
            body: version.body,
            sequence: version.sequence,
        })
    }
}

impl From<WriteResult> for pb::WriteResult {
    fn from(result: WriteResult) -> Self {
        pb::WriteResult { version: Some(result.version.into()), created: result.created, written: result.written }
    }
}

impl TryFrom<pb::WriteResult> for WriteResult {
    type Error = WireError;

    fn try_from(result: pb::WriteResult) -> Result<Self, WireError> {
        Ok(WriteResult {
            version: required(result.version, "version")?.try_into()?,
            created: result.created,
            written: result.written,
        })
    }
}

/// Converts every element, failing on the first bad one.
pub(crate) fn versions_from_wire(entries: Vec<pb::ResourceVersion>) -> Result<Vec<ResourceVersion>, WireError> {
    entries.into_iter().map(ResourceVersion::try_from).collect()
}

/// Issues as OperationOutcome JSON: how issues travel everywhere (status trailers, search warnings,
/// bundle entry errors).
pub(crate) fn outcome_to_wire(issues: &[Issue]) -> Bytes {
    Bytes::from(operation_outcome(issues).to_string())
}

/// The issues of an OperationOutcome JSON, strictly: every issue must parse, none is dropped, so
/// what arrives is what was sent ([`Issue::to_json`] and [`Issue::from_json`] are inverses).
pub(crate) fn issues_from_wire(outcome: &[u8], field: &'static str) -> Result<Vec<Issue>, WireError> {
    let invalid = |reason: String| WireError::InvalidOutcome { field, reason };
    let outcome: serde_json::Value =
        serde_json::from_slice(outcome).map_err(|err| invalid(format!("not JSON ({err})")))?;
    if outcome.get("resourceType").and_then(serde_json::Value::as_str) != Some("OperationOutcome") {
        return Err(invalid("not an OperationOutcome".to_owned()));
    }
    let issues = outcome
        .get("issue")
        .and_then(serde_json::Value::as_array)
        .ok_or_else(|| invalid("no `issue` array".to_owned()))?;
    issues
        .iter()
        .enumerate()
        .map(|(index, issue)| Issue::from_json(issue).ok_or_else(|| invalid(format!("issue {index} is malformed"))))
        .collect()
}

pub(crate) fn bundle_kind_to_wire(kind: BundleKind) -> pb::BundleKind {
    match kind {
        BundleKind::Transaction => pb::BundleKind::Transaction,
        BundleKind::Batch => pb::BundleKind::Batch,
    }
}

pub(crate) fn bundle_kind_from_wire(value: i32) -> Result<BundleKind, WireError> {
    match pb::BundleKind::try_from(value) {
        Ok(pb::BundleKind::Transaction) => Ok(BundleKind::Transaction),
        Ok(pb::BundleKind::Batch) => Ok(BundleKind::Batch),
        Ok(pb::BundleKind::Unspecified) | Err(_) => Err(WireError::UnknownBundleKind(value)),
    }
}

/// An HTTP status code: three digits, 100 to 599 (0, the proto3 default, means it was not set).
pub(crate) fn http_status_from_wire(value: u32) -> Result<u16, WireError> {
    u16::try_from(value).ok().filter(|status| (100..=599).contains(status)).ok_or(WireError::InvalidStatus(value))
}

impl From<&FhirError> for pb::ErrorOutcome {
    fn from(err: &FhirError) -> Self {
        pb::ErrorOutcome { category: err.category.name().to_owned(), outcome: outcome_to_wire(&err.issues) }
    }
}

impl TryFrom<pb::ErrorOutcome> for FhirError {
    type Error = WireError;

    /// Exactly the error that was sent (an error without issues stays without issues).
    fn try_from(err: pb::ErrorOutcome) -> Result<Self, WireError> {
        let category = ErrorCategory::from_name(&err.category)
            .ok_or_else(|| WireError::UnknownCategory(clip(&err.category, MAX_ECHO_CHARS)))?;
        Ok(FhirError { category, issues: issues_from_wire(&err.outcome, "error.outcome")? })
    }
}

impl From<SearchPage> for pb::SearchResponse {
    fn from(page: SearchPage) -> Self {
        pb::SearchResponse {
            entries: page.entries.into_iter().map(Into::into).collect(),
            total: page.total,
            next_page_token: page.next_page_token,
            included: page.included.into_iter().map(Into::into).collect(),
            previous_page_token: page.previous_page_token,
            applied: page.applied.into_iter().map(|(name, value)| pb::SearchParam { name, value }).collect(),
            // Empty when there are no warnings, so the common case costs nothing on the wire.
            warnings: if page.warnings.is_empty() { Bytes::new() } else { outcome_to_wire(&page.warnings) },
        }
    }
}

impl TryFrom<pb::SearchResponse> for SearchPage {
    type Error = WireError;

    fn try_from(page: pb::SearchResponse) -> Result<Self, WireError> {
        let warnings =
            if page.warnings.is_empty() { Vec::new() } else { issues_from_wire(&page.warnings, "warnings")? };
        Ok(SearchPage {
            entries: versions_from_wire(page.entries)?,
            included: versions_from_wire(page.included)?,
            total: page.total,
            next_page_token: page.next_page_token,
            previous_page_token: page.previous_page_token,
            applied: page.applied.into_iter().map(|p| (p.name, p.value)).collect(),
            warnings,
        })
    }
}

impl From<EntryResult> for pb::BundleEntryResult {
    fn from(entry: EntryResult) -> Self {
        pb::BundleEntryResult {
            status: u32::from(entry.status),
            location: entry.location,
            version: entry.version.map(Into::into),
            search: entry.search.map(Into::into),
            error: entry.error.as_ref().map(Into::into),
        }
    }
}

impl TryFrom<pb::BundleEntryResult> for EntryResult {
    type Error = WireError;

    fn try_from(entry: pb::BundleEntryResult) -> Result<Self, WireError> {
        Ok(EntryResult {
            status: http_status_from_wire(entry.status)?,
            location: entry.location,
            version: entry.version.map(ResourceVersion::try_from).transpose()?,
            search: entry.search.map(SearchPage::try_from).transpose()?,
            error: entry.error.map(FhirError::try_from).transpose()?,
        })
    }
}

impl From<BundleResult> for pb::BundleResponse {
    fn from(result: BundleResult) -> Self {
        pb::BundleResponse {
            kind: bundle_kind_to_wire(result.kind).into(),
            entries: result.entries.into_iter().map(Into::into).collect(),
            last_sequence: result.last_sequence,
        }
    }
}

impl TryFrom<pb::BundleResponse> for BundleResult {
    type Error = WireError;

    /// Fails on the first bad entry, naming its index.
    fn try_from(response: pb::BundleResponse) -> Result<Self, WireError> {
        let kind = bundle_kind_from_wire(response.kind)?;
        let entries = response
            .entries
            .into_iter()
            .enumerate()
            .map(|(index, entry)| {
                EntryResult::try_from(entry).map_err(|err| WireError::InEntry { index, source: Box::new(err) })
            })
            .collect::<Result<_, _>>()?;
        Ok(BundleResult { kind, entries, last_sequence: response.last_sequence })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_with_nanoseconds() {
        let instant = OffsetDateTime::from_unix_timestamp_nanos(1_700_000_000_123_456_789).expect("valid instant");
        let back = timestamp_from_wire(Some(timestamp_to_wire(instant)), "t").expect("round trip");
        assert_eq!(back, instant);
        let before_epoch = OffsetDateTime::from_unix_timestamp_nanos(-1_500_000_000).expect("valid instant");
        assert_eq!(timestamp_from_wire(Some(timestamp_to_wire(before_epoch)), "t"), Ok(before_epoch));
    }

    #[test]
    fn bad_timestamps_are_errors_not_panics() {
        let bad_nanos = prost_types::Timestamp { seconds: 0, nanos: -1 };
        assert_eq!(timestamp_from_wire(Some(bad_nanos), "t"), Err(WireError::InvalidTimestamp("t")));
        let too_late = prost_types::Timestamp { seconds: i64::MAX, nanos: 0 };
        assert_eq!(timestamp_from_wire(Some(too_late), "t"), Err(WireError::InvalidTimestamp("t")));
        assert_eq!(timestamp_from_wire(None, "t"), Err(WireError::Missing("t")));
    }

    #[test]
    fn operations_round_trip_and_unspecified_is_rejected() {
        for operation in [Operation::Create, Operation::Update, Operation::Delete] {
            assert_eq!(operation_from_wire(operation_to_wire(operation).into()), Ok(operation));
        }
        assert_eq!(operation_from_wire(0), Err(WireError::UnknownOperation(0)));
        assert_eq!(operation_from_wire(99), Err(WireError::UnknownOperation(99)));
    }

    #[test]
    fn context_is_required_and_tenant_validated() {
        assert_eq!(context_from_wire(None), Err(WireError::Missing("context")));
        let bad = pb::RequestContext { tenant: "a/b".into(), ..Default::default() };
        assert_eq!(context_from_wire(Some(bad)), Err(WireError::InvalidTenant("a/b".into())));
        let ctx = RequestContext {
            tenant: TenantId::parse("acme").expect("valid tenant"),
            request_id: Some("r-1".into()),
            binary_upload: Some("binary/0123abcd".into()),
            ..RequestContext::default()
        };
        assert_eq!(context_from_wire(Some(context_to_wire(&ctx))), Ok(ctx.clone()));
        // A caller's grants travel with the request; a grant the server cannot read is refused.
        let principal = fhirmesh_core::auth::Principal {
            subject: "u-1".into(),
            groups: vec!["auditor".into()],
            ..Default::default()
        };
        let policy = fhirmesh_core::auth::AccessPolicy::Rbac(fhirmesh_core::auth::RbacRules::fhir_works_defaults());
        let restricted = RequestContext {
            access: Arc::new(Access::for_principal(&policy, &principal).expect("an auditor has grants")),
            ..ctx
        };
        assert_eq!(context_from_wire(Some(context_to_wire(&restricted))), Ok(restricted.clone()));
        let mut garbled = context_to_wire(&restricted);
        garbled.access_json = Some("{not json".into());
        assert_eq!(context_from_wire(Some(garbled)), Err(WireError::InvalidAccess("context.access_json")));
    }

    #[test]
    fn bundle_kinds_round_trip_and_unspecified_is_rejected() {
        for kind in [BundleKind::Transaction, BundleKind::Batch] {
            assert_eq!(bundle_kind_from_wire(bundle_kind_to_wire(kind).into()), Ok(kind));
        }
        assert_eq!(bundle_kind_from_wire(0), Err(WireError::UnknownBundleKind(0)));
        assert_eq!(bundle_kind_from_wire(7), Err(WireError::UnknownBundleKind(7)));
    }

    #[test]
    fn entry_statuses_are_http_statuses() {
        assert_eq!(http_status_from_wire(100), Ok(100));
        assert_eq!(http_status_from_wire(599), Ok(599));
        for bad in [0, 99, 600, 70_000, u32::MAX] {
            assert_eq!(http_status_from_wire(bad), Err(WireError::InvalidStatus(bad)));
        }
    }

    #[test]
    fn entry_errors_round_trip_exactly() {
        let err = FhirError::with_issues(
            ErrorCategory::Gone,
            vec![
                Issue::error(fhirmesh_fhir::outcome::IssueType::Deleted, "Patient/x was deleted").at("Bundle.entry[0]"),
                Issue {
                    severity: fhirmesh_fhir::outcome::Severity::Information,
                    code: fhirmesh_fhir::outcome::IssueType::Informational,
                    diagnostics: String::new(),
                    expression: None,
                },
            ],
        );
        assert_eq!(FhirError::try_from(pb::ErrorOutcome::from(&err)), Ok(err));
        let empty = FhirError { category: ErrorCategory::Internal, issues: Vec::new() };
        assert_eq!(FhirError::try_from(pb::ErrorOutcome::from(&empty)), Ok(empty));
    }

    #[test]
    fn bad_entry_errors_are_rejected_precisely() {
        let good = pb::ErrorOutcome::from(&FhirError::invalid("bad").at("Bundle.entry[0]"));
        let unknown = pb::ErrorOutcome { category: "teapot".into(), ..good.clone() };
        assert_eq!(FhirError::try_from(unknown), Err(WireError::UnknownCategory("teapot".into())));
        let cases = [
            (&b"not json"[..], "not JSON (expected ident at line 1 column 2)"),
            (br#"{"resourceType": "Patient", "issue": []}"#, "not an OperationOutcome"),
            (br#"{"resourceType": "OperationOutcome"}"#, "no `issue` array"),
            (
                br#"{"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "nonsense"}]}"#,
                "issue 0 is malformed",
            ),
        ];
        for (outcome, reason) in cases {
            let wire = pb::ErrorOutcome { outcome: Bytes::copy_from_slice(outcome), ..good.clone() };
            let expected = WireError::InvalidOutcome { field: "error.outcome", reason: reason.to_owned() };
            assert_eq!(FhirError::try_from(wire), Err(expected));
        }
    }

    #[test]
    fn a_bad_entry_is_named_by_its_index() {
        let version = ResourceVersion {
            resource_type: ResourceType::parse("Patient").expect("Patient"),
            id: LogicalId::parse("a").expect("valid id"),
            version_id: 1,
            last_updated: OffsetDateTime::UNIX_EPOCH,
            operation: Operation::Create,
            body: None,
            sequence: 1,
        };
        let entry = EntryResult { status: 201, location: None, version: Some(version), search: None, error: None };
        let result = BundleResult { kind: BundleKind::Batch, entries: vec![entry.clone(), entry], last_sequence: None };
        let mut wire = pb::BundleResponse::from(result.clone());
        assert_eq!(BundleResult::try_from(wire.clone()), Ok(result));

        if let Some(version) = wire.entries[1].version.as_mut() {
            version.resource_type = "Nonsense".into();
        }
        let err = BundleResult::try_from(wire.clone()).expect_err("bad version in entry 1");
        assert_eq!(err.to_string(), "bundle entry 1: unknown resource type 'Nonsense'");
        wire.kind = 0;
        assert_eq!(BundleResult::try_from(wire), Err(WireError::UnknownBundleKind(0)));
    }

    #[test]
    fn search_warnings_must_be_an_outcome() {
        let wire = pb::SearchResponse { warnings: Bytes::from_static(b"[1, 2]"), ..Default::default() };
        let expected = WireError::InvalidOutcome { field: "warnings", reason: "not an OperationOutcome".to_owned() };
        assert_eq!(SearchPage::try_from(wire), Err(expected));
        let page = SearchPage::try_from(pb::SearchResponse::default()).expect("empty page");
        assert!(page.warnings.is_empty() && page.entries.is_empty());
    }

    #[test]
    fn echoed_values_are_clipped() {
        let long = "x".repeat(1000);
        let WireError::UnknownResourceType(echo) = resource_type_from_wire(&long).expect_err("unknown type") else {
            panic!("wrong error");
        };
        assert_eq!(echo.chars().count(), MAX_ECHO_CHARS + 1);
        assert_eq!(clip("héllo", 2), "hé…");
    }
}
