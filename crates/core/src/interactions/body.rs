//! Turning a client's resource JSON into the bytes the store keeps: parse, check the FHIR rules
//! that hold for every write, validate against the R4 schema, stamp `id` and `meta`.

use bytes::Bytes;
use fhirmesh_fhir::datetime::format_instant;
use fhirmesh_fhir::{LogicalId, ResourceType, validate};
use serde_json::{Map, Value};
use time::OffsetDateTime;

use crate::error::{ErrorCategory, FhirError, FhirResult};

/// Bodies larger than this are validated on the blocking pool rather than the async executor.
const INLINE_VALIDATION_LIMIT: usize = 32 * 1024;

/// How the body's `id` must relate to the id the write targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IdRule {
    /// create: any id in the body is ignored and replaced (FHIR R4 http.html#create).
    Replace,
    /// update/patch: the body must carry exactly the URL's id.
    MustMatch,
}

/// Parses client JSON into an object, with a precise message on failure.
pub(crate) fn parse_json(body: &[u8]) -> FhirResult<Value> {
    serde_json::from_slice(body).map_err(|err| FhirError::invalid(format!("request body is not valid JSON: {err}")))
}

/// Checks, validates and stamps a resource for a write of `version_id` at `last_updated`.
/// `size_hint` is the resource's approximate JSON size, which decides where validation runs.
pub(crate) async fn prepare(
    resource: Value,
    size_hint: usize,
    resource_type: ResourceType,
    id: &LogicalId,
    id_rule: IdRule,
    version_id: u64,
    last_updated: OffsetDateTime,
) -> FhirResult<Bytes> {
    if size_hint > INLINE_VALIDATION_LIMIT {
        let id = id.clone();
        tokio::task::spawn_blocking(move || {
            prepare_blocking(resource, resource_type, &id, id_rule, version_id, last_updated)
        })
        .await
        .map_err(|_| FhirError::internal("validation task failed"))?
    } else {
        prepare_blocking(resource, resource_type, id, id_rule, version_id, last_updated)
    }
}

/// [`prepare`] on the calling thread: for callers that already run on the blocking pool (a
/// transaction validates its entries there, several at a time).
pub(crate) fn prepare_blocking(
    resource: Value,
    resource_type: ResourceType,
    id: &LogicalId,
    id_rule: IdRule,
    version_id: u64,
    last_updated: OffsetDateTime,
) -> FhirResult<Bytes> {
    let resource = check_identity(resource, resource_type, id, id_rule)?;
    let resource = validated(resource)?;
    stamp(resource, id, version_id, last_updated)
}

fn check_identity(resource: Value, resource_type: ResourceType, id: &LogicalId, id_rule: IdRule) -> FhirResult<Value> {
    let Value::Object(map) = resource else {
        return Err(FhirError::invalid("a resource must be a JSON object"));
    };
    match map.get("resourceType") {
        Some(Value::String(found)) if found == resource_type.as_str() => {}
        Some(Value::String(found)) => {
            return Err(FhirError::invalid(format!(
                "resourceType '{found}' does not match the type in the URL '{resource_type}'"
            ))
            .at("resourceType"));
        }
        _ => {
            return Err(FhirError::invalid("the resource has no resourceType string").at("resourceType"));
        }
    }
    if id_rule == IdRule::MustMatch {
        match map.get("id") {
            Some(Value::String(found)) if found == id.as_str() => {}
            Some(Value::String(found)) => {
                return Err(FhirError::invalid(format!(
                    "resource id '{found}' does not match the id in the URL '{id}'"
                ))
                .at(format!("{resource_type}.id")));
            }
            Some(_) => return Err(FhirError::invalid("id must be a string").at(format!("{resource_type}.id"))),
            None => {
                return Err(FhirError::invalid(format!(
                    "the resource has no id; an update must carry the id of the URL ('{id}')"
                ))
                .at(format!("{resource_type}.id")));
            }
        }
    }
    Ok(Value::Object(map))
}

fn validated(resource: Value) -> FhirResult<Value> {
    let issues = validate::validate_resource(&resource);
    if issues.is_empty() { Ok(resource) } else { Err(FhirError::with_issues(ErrorCategory::Invalid, issues)) }
}

/// Sets `id`, `meta.versionId` and `meta.lastUpdated`, keeping `resourceType`, `id` and `meta`
/// first, and serialises.
pub(crate) fn stamp(
    resource: Value,
    id: &LogicalId,
    version_id: u64,
    last_updated: OffsetDateTime,
) -> FhirResult<Bytes> {
    let Value::Object(mut map) = resource else {
        return Err(FhirError::invalid("a resource must be a JSON object"));
    };
    let resource_type = map.remove("resourceType").unwrap_or(Value::Null);
    map.remove("id");
    let mut meta = match map.remove("meta") {
        Some(Value::Object(meta)) => meta,
        Some(_) => return Err(FhirError::invalid("meta must be an object").at("meta")),
        None => Map::new(),
    };
    meta.remove("versionId");
    meta.remove("lastUpdated");
    let mut stamped_meta = Map::with_capacity(meta.len() + 2);
    stamped_meta.insert("versionId".into(), Value::String(version_id.to_string()));
    stamped_meta.insert("lastUpdated".into(), Value::String(format_instant(last_updated)));
    stamped_meta.extend(meta);

    let mut out = Map::with_capacity(map.len() + 3);
    out.insert("resourceType".into(), resource_type);
    out.insert("id".into(), Value::String(id.as_str().to_owned()));
    out.insert("meta".into(), Value::Object(stamped_meta));
    out.extend(map);
    serde_json::to_vec(&Value::Object(out))
        .map(Bytes::from)
        .map_err(|err| FhirError::internal(format!("failed to serialise resource: {err}")))
}

/// The current time, truncated to the millisecond precision `meta.lastUpdated` carries, so that
/// what the store keeps and what the body says are the same instant.
pub(crate) fn now() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(now.nanosecond() / 1_000_000 * 1_000_000).unwrap_or(now)
}
