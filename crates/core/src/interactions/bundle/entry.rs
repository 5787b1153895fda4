//! Reading a `transaction`/`batch` Bundle into checked entries: the request method and URL, the
//! resource, and the conditional headers, each error naming its place in the Bundle.

use std::collections::HashSet;

use base64::Engine;
use fhirmesh_fhir::datetime::parse_fhir_datetime;
use fhirmesh_fhir::{LogicalId, ResourceType};
use serde_json::Value;
use time::OffsetDateTime;

use crate::auth::Interaction;
use crate::error::{FhirError, FhirResult};
use crate::service::{BundleKind, PatchDocument};

/// `Bundle.entry.request.method`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Method {
    Get,
    Head,
    Post,
    Put,
    Patch,
    Delete,
}

impl Method {
    fn parse(text: &str) -> Option<Method> {
        Some(match text {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "PATCH" => Method::Patch,
            "DELETE" => Method::Delete,
            _ => return None,
        })
    }

    /// The transaction processing order (R4 http.html#trules): DELETE, POST, PUT/PATCH, GET/HEAD.
    pub(super) fn transaction_rank(self) -> u8 {
        match self {
            Method::Delete => 0,
            Method::Post => 1,
            Method::Put | Method::Patch => 2,
            Method::Get | Method::Head => 3,
        }
    }
}

/// What `Bundle.entry.request.url` names.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Target {
    /// `Patient`
    Type(ResourceType),
    /// `Patient/1`
    Instance(ResourceType, LogicalId),
    /// `Patient/1/_history/2`
    Version(ResourceType, LogicalId, u64),
    /// `Patient?identifier=…` (search, conditional update/delete)
    Search(ResourceType, Vec<(String, String)>),
}

impl Target {
    pub(super) fn resource_type(&self) -> ResourceType {
        match self {
            Target::Type(t) | Target::Instance(t, _) | Target::Version(t, _, _) | Target::Search(t, _) => *t,
        }
    }
}

/// One checked entry.
#[derive(Debug, Clone)]
pub(super) struct Entry {
    /// Position in `Bundle.entry`.
    pub index: usize,
    pub full_url: Option<String>,
    pub method: Method,
    pub target: Target,
    pub resource: Option<Value>,
    pub if_none_exist: Option<String>,
    pub if_match: Option<u64>,
    pub if_none_match: Option<String>,
    pub if_modified_since: Option<OffsetDateTime>,
}

impl Entry {
    /// The interaction this entry performs, for authorization.
    pub(super) fn interaction(&self) -> Interaction {
        match (self.method, &self.target) {
            (Method::Get | Method::Head, Target::Instance(..)) => Interaction::Read,
            (Method::Get | Method::Head, Target::Version(..)) => Interaction::Vread,
            (Method::Get | Method::Head, Target::Type(_) | Target::Search(..)) => Interaction::SearchType,
            (Method::Post, _) => Interaction::Create,
            (Method::Put, _) => Interaction::Update,
            (Method::Patch, _) => Interaction::Patch,
            (Method::Delete, _) => Interaction::Delete,
        }
    }

    /// `Bundle.entry[i]` — the prefix of every expression about this entry.
    pub(super) fn path(&self) -> String {
        entry_path(self.index)
    }

    /// The patch document a PATCH entry carries: a `Binary` holding a JSON Patch, or a
    /// `Parameters` resource (FHIRPath Patch).
    pub(super) fn patch_document(&self) -> FhirResult<PatchDocument> {
        let at = format!("{}.resource", self.path());
        let Some(resource) = &self.resource else {
            return Err(FhirError::invalid(
                "a PATCH entry needs a Binary (JSON Patch) or Parameters (FHIRPath Patch) resource",
            )
            .at(at));
        };
        match resource.get("resourceType").and_then(Value::as_str) {
            Some("Parameters") => Ok(PatchDocument::FhirPathPatch(to_bytes(resource)?)),
            Some("Binary") => {
                let content_type = resource.get("contentType").and_then(Value::as_str).unwrap_or_default();
                if !content_type.starts_with("application/json-patch+json") {
                    return Err(FhirError::invalid(format!(
                        "a Binary patch must have contentType application/json-patch+json, not '{content_type}'"
                    ))
                    .at(format!("{at}.contentType")));
                }
                let data = resource.get("data").and_then(Value::as_str).unwrap_or_default();
                let bytes = base64::engine::general_purpose::STANDARD.decode(data.trim()).map_err(|err| {
                    FhirError::invalid(format!("Binary.data is not base64: {err}")).at(format!("{at}.data"))
                })?;
                Ok(PatchDocument::JsonPatch(bytes.into()))
            }
            _ => Err(FhirError::invalid("a PATCH entry's resource must be a Binary or a Parameters resource").at(at)),
        }
    }
}

pub(super) fn entry_path(index: usize) -> String {
    format!("Bundle.entry[{index}]")
}

pub(super) fn to_bytes(resource: &Value) -> FhirResult<bytes::Bytes> {
    serde_json::to_vec(resource)
        .map(bytes::Bytes::from)
        .map_err(|err| FhirError::internal(format!("cannot serialise a bundle entry: {err}")))
}

/// Reads the Bundle: its type and every entry, checked. Fails on the first malformed part.
pub(super) fn parse_bundle(bundle: &Value, max_entries: usize) -> FhirResult<(BundleKind, Vec<Entry>)> {
    let Value::Object(bundle) = bundle else {
        return Err(FhirError::invalid("the request body must be a Bundle resource (a JSON object)"));
    };
    if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err(FhirError::invalid("POST to the base URL takes a Bundle resource").at("Bundle.resourceType"));
    }
    let kind = match bundle.get("type").and_then(Value::as_str) {
        Some("transaction") => BundleKind::Transaction,
        Some("batch") => BundleKind::Batch,
        Some(other) => {
            return Err(FhirError::invalid(format!(
                "Bundle.type '{other}' cannot be processed; POST a 'transaction' or a 'batch'"
            ))
            .at("Bundle.type"));
        }
        None => return Err(FhirError::invalid("Bundle.type is missing").at("Bundle.type")),
    };
    let entries = match bundle.get("entry") {
        None => &Vec::new(),
        Some(Value::Array(entries)) => entries,
        Some(_) => return Err(FhirError::invalid("Bundle.entry must be an array").at("Bundle.entry")),
    };
    if entries.len() > max_entries {
        return Err(FhirError::new(
            crate::error::ErrorCategory::TooLarge,
            format!("the Bundle has {} entries; this server takes at most {max_entries}", entries.len()),
        )
        .at("Bundle.entry"));
    }
    let mut full_urls = HashSet::new();
    let mut parsed = Vec::with_capacity(entries.len());
    for (index, entry) in entries.iter().enumerate() {
        let entry = parse_entry(index, entry)?;
        if let Some(full_url) = &entry.full_url
            && !full_urls.insert(full_url.clone())
        {
            return Err(FhirError::invalid(format!("fullUrl '{full_url}' appears on more than one entry"))
                .at(format!("{}.fullUrl", entry.path())));
        }
        parsed.push(entry);
    }
    Ok((kind, parsed))
}

fn parse_entry(index: usize, entry: &Value) -> FhirResult<Entry> {
    let at = entry_path(index);
    let Value::Object(entry) = entry else {
        return Err(FhirError::invalid("a Bundle entry must be an object").at(at));
    };
    let full_url = match entry.get("fullUrl") {
        None => None,
        Some(Value::String(url)) if !url.is_empty() => Some(url.clone()),
        Some(_) => return Err(FhirError::invalid("fullUrl must be a non-empty string").at(format!("{at}.fullUrl"))),
    };
    let Some(Value::Object(request)) = entry.get("request") else {
        return Err(
            FhirError::invalid("every entry of a transaction or batch needs a request").at(format!("{at}.request"))
        );
    };
    let text = |name: &str| -> FhirResult<Option<&str>> {
        match request.get(name) {
            None => Ok(None),
            Some(Value::String(value)) => Ok(Some(value.as_str())),
            Some(_) => {
                Err(FhirError::invalid(format!("request.{name} must be a string")).at(format!("{at}.request.{name}")))
            }
        }
    };
    let method_text = text("method")?
        .ok_or_else(|| FhirError::invalid("request.method is missing").at(format!("{at}.request.method")))?;
    let method = Method::parse(method_text).ok_or_else(|| {
        FhirError::invalid(format!("request.method '{method_text}' is not GET, HEAD, POST, PUT, PATCH or DELETE"))
            .at(format!("{at}.request.method"))
    })?;
    let url =
        text("url")?.ok_or_else(|| FhirError::invalid("request.url is missing").at(format!("{at}.request.url")))?;
    let target = parse_url(url).map_err(|message| FhirError::invalid(message).at(format!("{at}.request.url")))?;
    let resource = entry.get("resource").cloned();
    if resource.as_ref().is_some_and(|r| !r.is_object()) {
        return Err(
            FhirError::invalid("entry.resource must be a resource (a JSON object)").at(format!("{at}.resource"))
        );
    }
    let if_match = text("ifMatch")?
        .map(|etag| {
            parse_etag(etag).ok_or_else(|| {
                FhirError::invalid(format!("ifMatch '{etag}' is not a version ETag like W/\"3\""))
                    .at(format!("{at}.request.ifMatch"))
            })
        })
        .transpose()?;
    let if_modified_since = text("ifModifiedSince")?
        .map(|instant| {
            parse_fhir_datetime(instant).map(|range| range.start).map_err(|err| {
                FhirError::invalid(format!("ifModifiedSince is not an instant: {err}"))
                    .at(format!("{at}.request.ifModifiedSince"))
            })
        })
        .transpose()?;
    Ok(Entry {
        index,
        full_url,
        method,
        target,
        resource,
        if_none_exist: text("ifNoneExist")?.map(str::to_owned),
        if_match,
        if_none_match: text("ifNoneMatch")?.map(str::to_owned),
        if_modified_since,
    })
}

/// `W/"3"` or `"3"` → 3.
pub(super) fn parse_etag(etag: &str) -> Option<u64> {
    let etag = etag.trim();
    let etag = etag.strip_prefix("W/").unwrap_or(etag);
    etag.strip_prefix('"')?.strip_suffix('"')?.parse().ok()
}

/// A relative request URL (`Patient`, `Patient/1`, `Patient/1/_history/2`, `Patient?…`), or an
/// absolute one whose path contains one of those.
pub(super) fn parse_url(url: &str) -> Result<Target, String> {
    let (path, query) = match url.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (url, None),
    };
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let start = segments
        .iter()
        .position(|s| ResourceType::parse(s).is_some())
        .ok_or_else(|| format!("'{url}' does not name a resource type"))?;
    let segments = &segments[start..];
    let resource_type = ResourceType::parse(segments[0]).ok_or_else(|| format!("'{url}' has no resource type"))?;
    let id = |text: &str| LogicalId::parse(text).map_err(|_| format!("'{text}' is not a valid resource id"));
    match (segments, query) {
        ([_], None) => Ok(Target::Type(resource_type)),
        ([_], Some(query)) => {
            let params: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes()).into_owned().collect();
            Ok(Target::Search(resource_type, params))
        }
        ([_, logical], None) => Ok(Target::Instance(resource_type, id(logical)?)),
        ([_, logical, "_history", version], None) => {
            let version = version.parse().map_err(|_| format!("'{version}' is not a version number"))?;
            Ok(Target::Version(resource_type, id(logical)?, version))
        }
        _ => Err(format!("'{url}' is not a request URL this server processes in a Bundle")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_urls() {
        let t = |s: &str| ResourceType::parse(s).expect("type");
        let id = |s: &str| LogicalId::parse(s).expect("id");
        assert_eq!(parse_url("Patient"), Ok(Target::Type(t("Patient"))));
        assert_eq!(parse_url("Patient/1"), Ok(Target::Instance(t("Patient"), id("1"))));
        assert_eq!(parse_url("Patient/1/_history/2"), Ok(Target::Version(t("Patient"), id("1"), 2)));
        assert_eq!(
            parse_url("Patient?identifier=urn:x%7C1&active=true"),
            Ok(Target::Search(
                t("Patient"),
                vec![("identifier".into(), "urn:x|1".into()), ("active".into(), "true".into())]
            ))
        );
        assert_eq!(parse_url("http://example.org/fhir/Patient/1"), Ok(Target::Instance(t("Patient"), id("1"))));
        assert!(parse_url("Nope/1").is_err());
        assert!(parse_url("Patient/bad id").is_err());
        assert!(parse_url("Patient/1/_history/x").is_err());
        assert!(parse_url("Patient/1/$everything").is_err());
    }

    #[test]
    fn etags() {
        assert_eq!(parse_etag("W/\"3\""), Some(3));
        assert_eq!(parse_etag("\"12\""), Some(12));
        assert_eq!(parse_etag("3"), None);
        assert_eq!(parse_etag("W/\"x\""), None);
    }

    #[test]
    fn malformed_bundles_name_the_place() {
        let err = |bundle: Value| parse_bundle(&bundle, 10).expect_err("malformed");
        let at = |e: FhirError| e.issues[0].expression.clone().unwrap_or_default();
        assert_eq!(at(err(serde_json::json!({"resourceType": "Patient"}))), "Bundle.resourceType");
        assert_eq!(at(err(serde_json::json!({"resourceType": "Bundle", "type": "collection"}))), "Bundle.type");
        assert_eq!(
            at(err(serde_json::json!({"resourceType": "Bundle", "type": "batch", "entry": [{"resource": {}}]}))),
            "Bundle.entry[0].request"
        );
        assert_eq!(
            at(err(serde_json::json!({"resourceType": "Bundle", "type": "batch",
                "entry": [{"request": {"method": "FETCH", "url": "Patient"}}]}))),
            "Bundle.entry[0].request.method"
        );
        assert_eq!(
            at(err(serde_json::json!({"resourceType": "Bundle", "type": "transaction", "entry": [
                {"fullUrl": "urn:uuid:1", "request": {"method": "POST", "url": "Patient"}},
                {"fullUrl": "urn:uuid:1", "request": {"method": "POST", "url": "Patient"}}]}))),
            "Bundle.entry[1].fullUrl"
        );
        let too_many = serde_json::json!({"resourceType": "Bundle", "type": "batch",
            "entry": (0..11).map(|_| serde_json::json!({"request": {"method": "GET", "url": "Patient"}})).collect::<Vec<_>>()});
        assert_eq!(parse_bundle(&too_many, 10).expect_err("too many").category, crate::error::ErrorCategory::TooLarge);
    }
}
