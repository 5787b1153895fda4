//! Turning a client's resource JSON into the bytes the store keeps: parse, check the FHIR rules
//! that hold for every write, validate against the R4 schema and the configured
//! [`WriteRules`], stamp `id` and `meta`.

use bytes::Bytes;
use fhirmesh_fhir::datetime::format_instant;
use fhirmesh_fhir::{LogicalId, ResourceType, validate};
use serde_json::{Map, Value};
use time::OffsetDateTime;

use crate::error::{ErrorCategory, FhirError, FhirResult};
use crate::ports::{DynWriteRules, WriteRules};

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

/// The version a prepared resource becomes.
#[derive(Debug, Clone)]
pub(crate) struct Stamp {
    pub(crate) id: LogicalId,
    /// How the body's `id` must relate to `id`.
    pub(crate) id_rule: IdRule,
    pub(crate) version_id: u64,
    pub(crate) last_updated: OffsetDateTime,
}

/// Checks, validates (the R4 schema, then the type's `rules`) and stamps a resource for a write.
/// `size_hint` is the resource's approximate JSON size, which decides where validation runs.
pub(crate) async fn prepare(
    resource: Value,
    size_hint: usize,
    resource_type: ResourceType,
    stamp: &Stamp,
    rules: Option<&DynWriteRules>,
) -> FhirResult<Bytes> {
    if size_hint > INLINE_VALIDATION_LIMIT {
        let (stamp, rules) = (stamp.clone(), rules.cloned());
        tokio::task::spawn_blocking(move || prepare_blocking(resource, resource_type, &stamp, rules.as_deref()))
            .await
            .map_err(|_| FhirError::internal("validation task failed"))?
    } else {
        prepare_blocking(resource, resource_type, stamp, rules.map(|rules| &**rules))
    }
}

/// [`prepare`] on the calling thread: for callers that already run on the blocking pool (a
/// transaction validates its entries there, several at a time).
pub(crate) fn prepare_blocking(
    resource: Value,
    resource_type: ResourceType,
    stamp: &Stamp,
    rules: Option<&dyn WriteRules>,
) -> FhirResult<Bytes> {
    let resource = check_identity(resource, resource_type, &stamp.id, stamp.id_rule)?;
    let resource = validated(resource)?;
    if let Some(rules) = rules {
        rules.check(resource_type, &resource)?;
    }
    self::stamp(resource, &stamp.id, stamp.version_id, stamp.last_updated)
}

fn check_identity(resource: Value, resource_type: ResourceType, id: &LogicalId, id_rule: IdRule) -> FhirResult<Value> {
    check_identity_of(resource, resource_type, Some(id), id_rule)
}

/// The checks of `resourceType` and (with [`IdRule::MustMatch`] and an `id`) of the body's id.
pub(crate) fn check_identity_of(
    resource: Value,
    resource_type: ResourceType,
    id: Option<&LogicalId>,
    id_rule: IdRule,
) -> FhirResult<Value> {
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
    if let (IdRule::MustMatch, Some(id)) = (id_rule, id) {
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use serde_json::json;

    use super::*;

    /// Refuses Basic resources whose code text is "refused", and records what it was asked.
    #[derive(Debug, Default)]
    struct RefuseCode {
        asked: Mutex<Vec<Value>>,
    }

    impl WriteRules for RefuseCode {
        fn check(&self, resource_type: ResourceType, resource: &Value) -> FhirResult<()> {
            self.asked.lock().expect("not poisoned").push(resource.clone());
            if resource_type.as_str() == "Basic" && resource["code"]["text"] == "refused" {
                return Err(FhirError::invalid("this code is refused").at("Basic.code.text"));
            }
            Ok(())
        }
    }

    fn basic(code: Value) -> Value {
        json!({"resourceType": "Basic", "id": "b1", "code": code})
    }

    fn stamp() -> Stamp {
        let id = LogicalId::parse("b1").expect("an id");
        Stamp { id, id_rule: IdRule::MustMatch, version_id: 2, last_updated: OffsetDateTime::UNIX_EPOCH }
    }

    fn basic_type() -> ResourceType {
        ResourceType::parse("Basic").expect("a type")
    }

    #[test]
    fn the_write_rules_judge_schema_valid_resources_before_they_are_stamped() {
        let rules = RefuseCode::default();
        let accepted =
            prepare_blocking(basic(json!({"text": "fine"})), basic_type(), &stamp(), Some(&rules)).expect("accepted");
        let stored: Value = serde_json::from_slice(&accepted).expect("JSON");
        assert_eq!(stored["meta"]["versionId"], "2");
        let err = prepare_blocking(basic(json!({"text": "refused"})), basic_type(), &stamp(), Some(&rules))
            .expect_err("the rules refuse it");
        assert_eq!(err.http_status(), 400);
        assert_eq!(err.issues[0].expression.as_deref(), Some("Basic.code.text"));
        // A schema error answers first: the rules never see an invalid resource.
        let err = prepare_blocking(basic(json!({"text": 7})), basic_type(), &stamp(), Some(&rules))
            .expect_err("schema invalid");
        assert_eq!(err.issues[0].expression.as_deref(), Some("Basic.code.text"));
        assert!(!err.issues[0].diagnostics.contains("this code is refused"), "{err:?}");
        let asked = rules.asked.lock().expect("not poisoned");
        assert_eq!(asked.len(), 2, "asked about the two schema-valid resources only");
        assert!(asked[0].get("meta").is_none(), "asked before stamping");
    }

    #[tokio::test]
    async fn large_bodies_are_judged_on_the_blocking_pool_too() {
        let rules: DynWriteRules = std::sync::Arc::new(RefuseCode::default());
        let refused = basic(json!({"text": "refused"}));
        let err = prepare(refused, INLINE_VALIDATION_LIMIT + 1, basic_type(), &stamp(), Some(&rules))
            .await
            .expect_err("refused off the executor as on it");
        assert_eq!(err.issues[0].expression.as_deref(), Some("Basic.code.text"));
    }
}
