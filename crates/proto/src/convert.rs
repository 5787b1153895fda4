//! Conversions between wire (protobuf) values and core values. Wire-to-core conversions validate
//! and return [`WireError`]; the server turns it into an `Invalid` error, the client into an
//! `Internal` one.

use fhirmesh_core::service::WriteResult;
use fhirmesh_core::{FhirError, Operation, RequestContext, ResourceVersion, TenantId};
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
    #[error("unknown resource type '{0}'")]
    UnknownResourceType(String),
    #[error("invalid resource id '{value}': {reason}")]
    InvalidId { value: String, reason: String },
    #[error("invalid tenant '{0}': expected 1 to 64 characters of A-Z, a-z, 0-9 and '-'")]
    InvalidTenant(String),
    #[error("unknown operation {0}")]
    UnknownOperation(i32),
    #[error("invalid timestamp in `{0}`")]
    InvalidTimestamp(&'static str),
    #[error("instance history needs a resource type")]
    IdWithoutResourceType,
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

/// At most [`MAX_ECHO_CHARS`] characters of a wire value, for error messages.
pub(crate) fn clip(value: &str, max_chars: usize) -> String {
    match value.char_indices().nth(max_chars) {
        Some((end, _)) => format!("{}…", &value[..end]),
        None => value.to_owned(),
    }
}

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
    }
}

/// The request context is required: a request without one must not silently land in a tenant.
pub(crate) fn context_from_wire(value: Option<pb::RequestContext>) -> Result<RequestContext, WireError> {
    let value = required(value, "context")?;
    Ok(RequestContext {
        tenant: tenant_from_wire(&value.tenant)?,
        request_id: value.request_id,
        traceparent: value.traceparent,
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
            traceparent: None,
        };
        assert_eq!(context_from_wire(Some(context_to_wire(&ctx))), Ok(ctx));
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
