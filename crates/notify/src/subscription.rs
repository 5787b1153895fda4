//! A Subscription resource (R4) parsed and validated into what the notifier acts on.
//!
//! [`SubscriptionSpec::parse`] is the one validation of a Subscription body: the API layer calls it
//! on create and update (the id may not be assigned yet) and answers its [`FhirError`] directly —
//! category `invalid` (400), one OperationOutcome issue per problem, each with the FHIRPath
//! `expression` of the element and a human message. The notifier loads stored subscriptions with
//! [`ActiveSubscription::from_resource`], which adds the tenant, id and version.
//!
//! What is checked (see `design.md` for why):
//! - `status` (required): `requested` | `active` | `error` | `off`.
//! - `criteria` (required): `[type]?[parameters]`, parsed by the search parser
//!   ([`fhirmesh_fhir::search::parse::parse_search`], strict: unknown parameters are errors) for a
//!   known resource type. Chains and `_has` are refused (a subscription is matched against the
//!   changed resource alone); so are the result parameters (`_sort`, `_count`, `_include`, …),
//!   which have no meaning for a notification. `_format` and `_pretty` are ignored, as in search.
//! - `channel.type` (required): `rest-hook`; the other R4 channel types are refused as not supported.
//! - `channel.endpoint` (required for rest-hook): the [`EndpointPolicy`].
//! - `channel.payload`: absent (notification without body), `application/fhir+json` or
//!   `application/json` (parameters such as `fhirVersion` kept); XML is refused (the server only
//!   produces JSON).
//! - `channel.header`: each `Name: value`, an HTTP token name and a visible-ASCII value; headers
//!   that belong to the transport or to the notifier itself are refused ([`RESERVED_HEADERS`],
//!   and every `X-Fhirmesh-*`); at most [`MAX_HEADERS`] headers of [`MAX_HEADER_BYTES`] in total.
//! - `end`: an instant; once past, the subscription is effectively `off`.
//! - the signing secret: the project extension [`SIGNING_SECRET_EXTENSION`] on `channel`
//!   (`valueString`, 16 to 256 characters).

use std::fmt;

use fhirmesh_core::model::TenantId;
use fhirmesh_core::{ErrorCategory, FhirError};
use fhirmesh_fhir::datetime::parse_fhir_datetime;
use fhirmesh_fhir::outcome::{Issue, IssueType};
use fhirmesh_fhir::search::SearchQuery;
use fhirmesh_fhir::search::criteria::ResourceCriteria;
use fhirmesh_fhir::{LogicalId, ResourceType};
use serde_json::Value;
use time::OffsetDateTime;

use crate::clip;
use crate::endpoint::{Endpoint, EndpointPolicy};

/// A Subscription's logical id; unique within its tenant only.
pub type SubscriptionId = LogicalId;

/// The extension on `Subscription.channel` carrying the per-subscription secret the notifier
/// signs deliveries with (`valueString`).
pub const SIGNING_SECRET_EXTENSION: &str = "http://fhirmesh.dev/fhir/StructureDefinition/subscription-signing-secret";

/// Header names a subscription may not set (compared case-insensitively): the transport's, and
/// the ones the notifier sets itself. Every name starting with `X-Fhirmesh-` is refused too.
pub const RESERVED_HEADERS: [&str; 15] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
    "proxy-connection",
    "proxy-authorization",
    "expect",
    "content-type",
    "content-encoding",
    "traceparent",
    "tracestate",
];

/// The most `channel.header` entries a subscription may have.
pub const MAX_HEADERS: usize = 32;
/// The most bytes all `channel.header` entries may add up to.
pub const MAX_HEADER_BYTES: usize = 8 * 1024;

const MIN_SECRET_CHARS: usize = 16;
const MAX_SECRET_CHARS: usize = 256;

/// `Subscription.status` (R4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SubscriptionStatus {
    /// Submitted by a client, not yet loaded by the notifier.
    Requested,
    /// Loaded and delivering.
    Active,
    /// Deliveries keep failing (`Subscription.error` says why); still delivering.
    Error,
    /// No deliveries.
    Off,
}

impl SubscriptionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SubscriptionStatus::Requested => "requested",
            SubscriptionStatus::Active => "active",
            SubscriptionStatus::Error => "error",
            SubscriptionStatus::Off => "off",
        }
    }

    pub fn parse(value: &str) -> Option<SubscriptionStatus> {
        [SubscriptionStatus::Requested, SubscriptionStatus::Active, SubscriptionStatus::Error, SubscriptionStatus::Off]
            .into_iter()
            .find(|s| s.as_str() == value)
    }

    /// Whether changes are matched and delivered in this status (every status but `off`).
    pub fn delivers(self) -> bool {
        self != SubscriptionStatus::Off
    }
}

impl fmt::Display for SubscriptionStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A status change the notifier must write to the stored Subscription
/// ([`Transition::apply`] edits the JSON).
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum Transition {
    /// `status = active`, `error` removed.
    ToActive,
    /// `status = error`, `error = reason`.
    ToError { reason: String },
    /// `status = off` (`end` has passed).
    ToOff,
}

impl Transition {
    /// The status after the transition.
    pub fn status(&self) -> SubscriptionStatus {
        match self {
            Transition::ToActive => SubscriptionStatus::Active,
            Transition::ToError { .. } => SubscriptionStatus::Error,
            Transition::ToOff => SubscriptionStatus::Off,
        }
    }

    /// Applies the transition to a Subscription resource's JSON.
    pub fn apply(&self, subscription: &mut Value) {
        let Some(object) = subscription.as_object_mut() else { return };
        object.insert("status".to_owned(), Value::from(self.status().as_str()));
        match self {
            Transition::ToActive => {
                object.remove("error");
            }
            Transition::ToError { reason } => {
                object.insert("error".to_owned(), Value::from(reason.as_str()));
            }
            Transition::ToOff => {}
        }
    }
}

/// `Subscription.criteria`: a type-level search the changed resource alone can be matched against
/// ([`ResourceCriteria`], shared with Bulk Data `_typeFilter`).
#[derive(Debug, Clone, PartialEq)]
pub struct Criteria(ResourceCriteria);

impl Criteria {
    /// Parses `[type]?[parameters]`. Issues point at `Subscription.criteria` and name the
    /// offending parameter in their message.
    pub fn parse(text: &str) -> Result<Criteria, Vec<Issue>> {
        ResourceCriteria::parse(text, "Subscription.criteria")
            .map(Criteria)
            .map_err(|issues| issues.into_iter().map(|issue| issue.at("Subscription.criteria")).collect())
    }

    /// The criteria as written (trimmed).
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    /// The resource type whose changes are matched.
    pub fn resource_type(&self) -> ResourceType {
        self.0.resource_type()
    }

    /// The parsed search (only `criteria` matters for matching).
    pub fn query(&self) -> &SearchQuery {
        self.0.query()
    }

    /// True when the criteria can be decided from the resource's type and id alone (no
    /// criterion, or only `_id` criteria): such subscriptions are notified of deletes even when the
    /// deleted version's body is not known (see [`crate::matcher`]).
    pub fn decidable_without_body(&self) -> bool {
        self.0.decidable_without_body()
    }
}

/// `Subscription.channel.payload`: the MIME type the resource is sent in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payload {
    content_type: String,
}

impl Payload {
    /// Accepts `application/fhir+json` and `application/json`, with parameters; the type is
    /// lowercased, parameters are kept as written.
    fn parse(value: &str) -> Result<Payload, Issue> {
        let at = |code: IssueType, message: String| Issue::error(code, message).at("Subscription.channel.payload");
        let value = value.trim();
        let (essence, parameters) = match value.split_once(';') {
            Some((essence, parameters)) => (essence.trim().to_ascii_lowercase(), Some(parameters.trim())),
            None => (value.to_ascii_lowercase(), None),
        };
        match essence.as_str() {
            "application/fhir+json" | "application/json" => {}
            "application/fhir+xml" | "application/xml" | "text/xml" => {
                return Err(at(
                    IssueType::NotSupported,
                    format!(
                        "payload '{}' is not supported: this server sends resources as JSON only; use \
                         application/fhir+json",
                        clip(value)
                    ),
                ));
            }
            _ => {
                return Err(at(
                    IssueType::NotSupported,
                    format!(
                        "payload '{}' is not supported: use application/fhir+json (or leave payload out for a \
                         notification without a body)",
                        clip(value)
                    ),
                ));
            }
        }
        let parameters_ok = parameters
            .is_none_or(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_graphic() || b == b' ' || b == b'\t'));
        if !parameters_ok {
            return Err(at(IssueType::Value, format!("payload '{}' has malformed parameters", clip(value))));
        }
        let content_type = match parameters {
            Some(parameters) => format!("{essence}; {parameters}"),
            None => essence,
        };
        Ok(Payload { content_type })
    }

    /// The `Content-Type` of the delivered resource.
    pub fn content_type(&self) -> &str {
        &self.content_type
    }
}

/// The secret deliveries are signed with. Its `Debug` form never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningSecret(String);

impl SigningSecret {
    /// A secret from configuration or a test (no length rule; the resource's is checked on parse).
    pub fn new(secret: impl Into<String>) -> SigningSecret {
        SigningSecret(secret.into())
    }

    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningSecret(***)")
    }
}

/// The rest-hook channel. Its `Debug` form shows header names, not values (they often carry
/// credentials).
#[derive(Clone, PartialEq, Eq)]
pub struct RestHook {
    endpoint: Endpoint,
    payload: Option<Payload>,
    headers: Vec<(String, String)>,
    signing_secret: Option<SigningSecret>,
}

impl fmt::Debug for RestHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let header_names: Vec<&str> = self.headers.iter().map(|(name, _)| name.as_str()).collect();
        f.debug_struct("RestHook")
            .field("endpoint", &self.endpoint.as_str())
            .field("payload", &self.payload.as_ref().map(Payload::content_type))
            .field("header_names", &header_names)
            .field("signing_secret", &self.signing_secret)
            .finish()
    }
}

impl RestHook {
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// `None`: notifications carry no body.
    pub fn payload(&self) -> Option<&Payload> {
        self.payload.as_ref()
    }

    /// `channel.header` as (name, value), in order, names as written.
    pub fn headers(&self) -> &[(String, String)] {
        &self.headers
    }

    pub fn signing_secret(&self) -> Option<&SigningSecret> {
        self.signing_secret.as_ref()
    }
}

/// A validated Subscription body, without its identity.
#[derive(Debug, Clone, PartialEq)]
pub struct SubscriptionSpec {
    status: SubscriptionStatus,
    criteria: Criteria,
    channel: RestHook,
    end: Option<OffsetDateTime>,
    error: Option<String>,
}

impl SubscriptionSpec {
    /// Validates a Subscription resource (module documentation); every problem found is one issue
    /// of the returned error.
    pub fn parse(resource: &Value, policy: &EndpointPolicy) -> Result<SubscriptionSpec, FhirError> {
        let mut issues = Vec::new();
        if resource.get("resourceType").and_then(Value::as_str) != Some("Subscription") {
            issues.push(Issue::error(IssueType::Structure, "expected a Subscription resource").at("Subscription"));
            return Err(FhirError::with_issues(ErrorCategory::Invalid, issues));
        }

        let status = match required_string(resource, "status", "Subscription.status", &mut issues) {
            Some(text) => SubscriptionStatus::parse(text).or_else(|| {
                issues.push(
                    Issue::error(
                        IssueType::Value,
                        format!("status must be requested, active, error or off, not '{}'", clip(text)),
                    )
                    .at("Subscription.status"),
                );
                None
            }),
            None => None,
        };

        let criteria = match required_string(resource, "criteria", "Subscription.criteria", &mut issues) {
            Some(text) => Criteria::parse(text).map_err(|found| issues.extend(found)).ok(),
            None => None,
        };

        let channel = match resource.get("channel") {
            None => {
                issues.push(required("Subscription.channel"));
                None
            }
            Some(channel) if !channel.is_object() => {
                issues.push(structure("Subscription.channel", "channel must be an object"));
                None
            }
            Some(channel) => parse_channel(channel, policy, &mut issues),
        };

        let end = match resource.get("end") {
            None => None,
            Some(Value::String(text)) => parse_instant(text).map_err(|issue| issues.push(issue)).ok(),
            Some(_) => {
                issues.push(structure("Subscription.end", "end must be an instant string"));
                None
            }
        };

        let error = resource.get("error").and_then(Value::as_str).map(str::to_owned);

        match (status, criteria, channel) {
            (Some(status), Some(criteria), Some(channel)) if issues.is_empty() => {
                Ok(SubscriptionSpec { status, criteria, channel, end, error })
            }
            _ => Err(FhirError::with_issues(ErrorCategory::Invalid, issues)),
        }
    }

    /// `status` as stored.
    pub fn status(&self) -> SubscriptionStatus {
        self.status
    }

    pub fn criteria(&self) -> &Criteria {
        &self.criteria
    }

    pub fn channel(&self) -> &RestHook {
        &self.channel
    }

    pub fn end(&self) -> Option<OffsetDateTime> {
        self.end
    }

    /// `Subscription.error` as stored.
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    /// The status in force at `now`: `off` once `end` has passed, the stored status otherwise.
    pub fn effective_status(&self, now: OffsetDateTime) -> SubscriptionStatus {
        match self.end {
            Some(end) if end <= now => SubscriptionStatus::Off,
            _ => self.status,
        }
    }

    /// Whether changes are matched and delivered at `now` (counts towards the tenant limit).
    pub fn is_deliverable(&self, now: OffsetDateTime) -> bool {
        self.effective_status(now).delivers()
    }
}

/// A stored subscription of a tenant, as the notifier holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct ActiveSubscription {
    tenant: TenantId,
    id: SubscriptionId,
    version_id: u64,
    spec: SubscriptionSpec,
}

impl ActiveSubscription {
    pub fn new(tenant: TenantId, id: SubscriptionId, version_id: u64, spec: SubscriptionSpec) -> ActiveSubscription {
        ActiveSubscription { tenant, id, version_id, spec }
    }

    /// Validates a stored Subscription of `tenant`: the body as [`SubscriptionSpec::parse`], plus
    /// `id` and a numeric `meta.versionId`.
    pub fn from_resource(
        tenant: TenantId,
        resource: &Value,
        policy: &EndpointPolicy,
    ) -> Result<ActiveSubscription, FhirError> {
        let mut issues = Vec::new();
        let id = match resource.get("id").and_then(Value::as_str) {
            Some(id) => LogicalId::parse(id)
                .map_err(|e| issues.push(Issue::error(IssueType::Value, e.to_string()).at("Subscription.id")))
                .ok(),
            None => {
                issues.push(required("Subscription.id"));
                None
            }
        };
        let version_id = resource.pointer("/meta/versionId").and_then(Value::as_str).and_then(|v| v.parse().ok());
        if version_id.is_none() {
            issues.push(
                Issue::error(IssueType::Required, "a stored subscription needs a numeric meta.versionId")
                    .at("Subscription.meta.versionId"),
            );
        }
        let spec = SubscriptionSpec::parse(resource, policy);
        match (id, version_id, spec) {
            (Some(id), Some(version_id), Ok(spec)) if issues.is_empty() => {
                Ok(ActiveSubscription { tenant, id, version_id, spec })
            }
            (_, _, spec) => {
                if let Err(error) = spec {
                    issues.extend(error.issues);
                }
                Err(FhirError::with_issues(ErrorCategory::Invalid, issues))
            }
        }
    }

    pub fn tenant(&self) -> &TenantId {
        &self.tenant
    }

    pub fn id(&self) -> &SubscriptionId {
        &self.id
    }

    /// `meta.versionId` of the stored Subscription: a newer version replaces an older one.
    pub fn version_id(&self) -> u64 {
        self.version_id
    }

    pub fn spec(&self) -> &SubscriptionSpec {
        &self.spec
    }

    pub fn criteria(&self) -> &Criteria {
        &self.spec.criteria
    }

    pub fn channel(&self) -> &RestHook {
        &self.spec.channel
    }

    /// `status` as stored.
    pub fn status(&self) -> SubscriptionStatus {
        self.spec.status
    }

    pub fn effective_status(&self, now: OffsetDateTime) -> SubscriptionStatus {
        self.spec.effective_status(now)
    }

    pub fn is_deliverable(&self, now: OffsetDateTime) -> bool {
        self.spec.is_deliverable(now)
    }

    /// What the notifier writes when it loads this version at `now`: `off` once `end` has passed
    /// (unless already `off`), `requested` becomes `active`, nothing otherwise.
    pub fn activation(&self, now: OffsetDateTime) -> Option<Transition> {
        match (self.spec.status, self.effective_status(now)) {
            (SubscriptionStatus::Off, _) => None,
            (_, SubscriptionStatus::Off) => Some(Transition::ToOff),
            (SubscriptionStatus::Requested, _) => Some(Transition::ToActive),
            _ => None,
        }
    }
}

/// The per-tenant limit on deliverable subscriptions. `active_others` counts the tenant's
/// deliverable subscriptions other than the one being written; call only when the written one is
/// deliverable. Refused with category `unprocessable` (422).
pub fn check_tenant_limit(active_others: usize, max_active: usize) -> Result<(), FhirError> {
    if active_others < max_active {
        return Ok(());
    }
    let issue = Issue::error(
        IssueType::Processing,
        format!(
            "this tenant already has {active_others} active subscriptions, the most this server allows is \
             {max_active}; turn one off (status 'off') or delete it first"
        ),
    )
    .at("Subscription.status");
    Err(FhirError::with_issues(ErrorCategory::Unprocessable, vec![issue]))
}

fn required(expression: &str) -> Issue {
    Issue::error(IssueType::Required, format!("{expression} is required")).at(expression)
}

fn structure(expression: &str, message: &str) -> Issue {
    Issue::error(IssueType::Structure, message).at(expression)
}

/// A required string element: `None` (and an issue) when absent or not a string.
fn required_string<'a>(object: &'a Value, key: &str, expression: &str, issues: &mut Vec<Issue>) -> Option<&'a str> {
    match object.get(key) {
        None => {
            issues.push(required(expression));
            None
        }
        Some(Value::String(text)) => Some(text),
        Some(_) => {
            issues.push(structure(expression, &format!("{key} must be a string")));
            None
        }
    }
}

fn parse_channel(channel: &Value, policy: &EndpointPolicy, issues: &mut Vec<Issue>) -> Option<RestHook> {
    let before = issues.len();
    match required_string(channel, "type", "Subscription.channel.type", issues) {
        Some("rest-hook") => {}
        Some(other @ ("websocket" | "email" | "sms" | "message")) => issues.push(
            Issue::error(
                IssueType::NotSupported,
                format!("channel type '{other}' is not supported: this server delivers rest-hook only"),
            )
            .at("Subscription.channel.type"),
        ),
        Some(other) => issues.push(
            Issue::error(
                IssueType::Value,
                format!(
                    "unknown channel type '{}': R4 defines rest-hook, websocket, email, sms and message; this server \
                     supports rest-hook",
                    clip(other)
                ),
            )
            .at("Subscription.channel.type"),
        ),
        None => {}
    }

    let endpoint = required_string(channel, "endpoint", "Subscription.channel.endpoint", issues).and_then(|url| {
        policy
            .check(url)
            .map_err(|refused| {
                issues.push(
                    Issue::error(IssueType::Security, format!("endpoint refused: {refused}"))
                        .at("Subscription.channel.endpoint"),
                )
            })
            .ok()
    });

    let payload = match channel.get("payload") {
        None => None,
        Some(Value::String(text)) => Payload::parse(text).map_err(|issue| issues.push(issue)).ok(),
        Some(_) => {
            issues.push(structure("Subscription.channel.payload", "payload must be a MIME type string"));
            None
        }
    };

    let headers = parse_headers(channel.get("header"), issues);
    let signing_secret = parse_signing_secret(channel, issues);

    let endpoint = endpoint?;
    (issues.len() == before).then_some(RestHook { endpoint, payload, headers, signing_secret })
}

fn parse_headers(headers: Option<&Value>, issues: &mut Vec<Issue>) -> Vec<(String, String)> {
    let Some(headers) = headers else { return Vec::new() };
    let Some(lines) = headers.as_array() else {
        issues.push(structure("Subscription.channel.header", "header must be an array of 'Name: value' strings"));
        return Vec::new();
    };
    if lines.len() > MAX_HEADERS {
        issues.push(
            Issue::error(IssueType::TooLong, format!("at most {MAX_HEADERS} headers are allowed, not {}", lines.len()))
                .at("Subscription.channel.header"),
        );
        return Vec::new();
    }
    let mut parsed = Vec::new();
    let mut total = 0;
    for (index, line) in lines.iter().enumerate() {
        let expression = format!("Subscription.channel.header[{index}]");
        let Some(line) = line.as_str() else {
            issues.push(structure(&expression, "each header must be a 'Name: value' string"));
            continue;
        };
        total += line.len();
        match parse_header(line) {
            Ok(header) => parsed.push(header),
            Err(message) => issues.push(Issue::error(IssueType::Value, message).at(expression)),
        }
    }
    if total > MAX_HEADER_BYTES {
        issues.push(
            Issue::error(
                IssueType::TooLong,
                format!("headers add up to {total} bytes; at most {MAX_HEADER_BYTES} are allowed"),
            )
            .at("Subscription.channel.header"),
        );
    }
    parsed
}

/// `Name: value` → (name, value without surrounding blanks).
fn parse_header(line: &str) -> Result<(String, String), String> {
    let Some((name, value)) = line.split_once(':') else {
        return Err(format!("expected 'Name: value', not '{}'", clip(line)));
    };
    let is_tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || !name.bytes().all(is_tchar) {
        return Err(format!(
            "'{}' is not a valid header name (letters, digits and !#$%&'*+-.^_`|~ only, no spaces)",
            clip(name)
        ));
    }
    let lower = name.to_ascii_lowercase();
    if RESERVED_HEADERS.contains(&lower.as_str()) || lower.starts_with("x-fhirmesh-") {
        return Err(format!("header '{name}' is set by the server and cannot be set by a subscription"));
    }
    let value = value.trim_matches([' ', '\t']);
    if let Some(c) = value.chars().find(|c| !(c.is_ascii_graphic() || *c == ' ' || *c == '\t')) {
        return Err(format!(
            "the value of header '{name}' contains {c:?}: only visible ASCII characters, spaces and tabs are allowed"
        ));
    }
    Ok((name.to_owned(), value.to_owned()))
}

fn parse_signing_secret(channel: &Value, issues: &mut Vec<Issue>) -> Option<SigningSecret> {
    let extensions = channel.get("extension")?.as_array()?;
    let (index, extension) = extensions
        .iter()
        .enumerate()
        .find(|(_, e)| e.get("url").and_then(Value::as_str) == Some(SIGNING_SECRET_EXTENSION))?;
    let expression = format!("Subscription.channel.extension[{index}].valueString");
    let Some(secret) = extension.get("valueString").and_then(Value::as_str) else {
        issues.push(structure(&expression, "the signing secret extension needs a valueString"));
        return None;
    };
    let chars = secret.chars().count();
    if !(MIN_SECRET_CHARS..=MAX_SECRET_CHARS).contains(&chars) {
        issues.push(
            Issue::error(
                IssueType::Value,
                format!(
                    "the signing secret must have {MIN_SECRET_CHARS} to {MAX_SECRET_CHARS} characters, not {chars}"
                ),
            )
            .at(expression),
        );
        return None;
    }
    Some(SigningSecret(secret.to_owned()))
}

/// An R4 `instant`: a date-time to the second (or finer) with a zone.
fn parse_instant(text: &str) -> Result<OffsetDateTime, Issue> {
    let invalid = |reason: &str| {
        Issue::error(IssueType::Value, format!("end must be an instant like 2030-01-01T00:00:00Z: {reason}"))
            .at("Subscription.end")
    };
    let bytes = text.as_bytes();
    let has_seconds = bytes.len() >= 19 && bytes[10] == b'T' && bytes[16] == b':';
    let has_zone = text.ends_with('Z') || (bytes.len() >= 6 && matches!(bytes[bytes.len() - 6], b'+' | b'-'));
    if !has_seconds || !has_zone {
        return Err(invalid(&format!("'{}' lacks the seconds or the time zone", clip(text))));
    }
    parse_fhir_datetime(text).map(|range| range.start).map_err(|e| invalid(&e.to_string()))
}

#[cfg(test)]
mod tests;
