//! Kick-off parameters (Bulk Data IG 2.0.0, "Bulk Data Kick-off Request") validated into an
//! [`ExportRequest`]. Every problem is a 400 naming the parameter; a parameter this server does not
//! support is an error too, unless the client sent `Prefer: handling=lenient` — then it is ignored
//! (and named in a log line and the status answer's warnings).
//!
//! - `_outputFormat`: `application/fhir+ndjson` and its aliases `application/ndjson`, `ndjson`.
//! - `_since`: a FHIR instant (with time zone); only resources last updated after it.
//! - `_type`: resource types, comma-separated and/or repeated. At Patient and Group level only
//!   types of the R4 Patient compartment (and Patient itself).
//! - `_typeFilter`: `[type]?[parameters]` searches, comma-separated (commas inside a query
//!   escaped as `%2C`) and/or repeated, matched against each resource alone (no chains, no
//!   `_has`); a type with filters exports the resources matching any of them, and must be one of
//!   the exported types.
//! - `_elements`: element names, `name` for every type or `Type.name` for one; each exported
//!   resource keeps those plus its mandatory elements and is tagged `SUBSETTED`.
//! - `patient` (POST only, Patient and Group level): references `Patient/[id]`.
//! - `_format` and `_pretty` are ignored, as on every interaction.
//! - Anything else (`includeAssociatedData`, `organizeOutputBy`, unknown names) is not supported.

use fhirmesh_fhir::ResourceType;
use fhirmesh_fhir::datetime::parse_fhir_datetime;
use fhirmesh_fhir::outcome::{Issue, IssueType, clip};
use fhirmesh_fhir::search::compartments::compartment_params;
use fhirmesh_fhir::search::criteria::ResourceCriteria;
use serde_json::Value;

use crate::error::{ErrorCategory, FhirError};
use crate::export::job::{ExportLevel, ExportRequest};

/// The NDJSON format names accepted for `_outputFormat`.
const NDJSON_FORMATS: [&str; 3] = ["application/fhir+ndjson", "application/ndjson", "ndjson"];

/// A kick-off request as the gateway received it.
#[derive(Debug, Clone)]
pub struct KickOff {
    pub level: ExportLevel,
    /// The query parameters (GET) or the `Parameters` resource's parameters (POST), in order.
    pub params: Vec<(String, String)>,
    /// `Prefer: handling=lenient`: unsupported parameters are ignored instead of refused.
    pub lenient: bool,
    /// The full request URL (the manifest's `request`).
    pub request_url: String,
}

/// Whether `resource_type` is exported at Patient and Group level: Patient itself and the types
/// of the Patient compartment.
pub fn in_patient_compartment(resource_type: ResourceType) -> bool {
    resource_type.as_str() == "Patient" || !compartment_params(patient(), resource_type).is_empty()
}

fn patient() -> ResourceType {
    ResourceType::parse("Patient").expect("Patient is an R4 resource type")
}

fn invalid(issues: Vec<Issue>) -> FhirError {
    FhirError::with_issues(ErrorCategory::Invalid, issues)
}

fn issue(code: IssueType, message: String) -> Issue {
    Issue::error(code, message)
}

/// Validates `kick_off` into a request. `default_types` are the types exported when `_type` is
/// absent (those the caller may read); `ignored` receives a note for each parameter ignored
/// under `handling=lenient`.
pub fn validate(
    kick_off: &KickOff,
    default_types: &[ResourceType],
    ignored: &mut Vec<String>,
) -> Result<ExportRequest, FhirError> {
    let mut issues = Vec::new();
    let mut types: Vec<ResourceType> = Vec::new();
    let mut type_given = false;
    let mut since = None;
    let mut filters: Vec<ResourceCriteria> = Vec::new();
    let mut patients: Vec<String> = Vec::new();
    let mut elements: Vec<String> = Vec::new();
    let patient_level = !matches!(kick_off.level, ExportLevel::System);

    for (name, value) in &kick_off.params {
        match name.as_str() {
            "_outputFormat" => {
                if !NDJSON_FORMATS.contains(&value.trim()) {
                    issues.push(issue(
                        IssueType::NotSupported,
                        format!(
                            "_outputFormat '{}' is not supported: use application/fhir+ndjson (or application/ndjson, \
                             ndjson)",
                            clip(value)
                        ),
                    ));
                }
            }
            "_since" => match parse_fhir_datetime(value.trim()) {
                Ok(instant) if value.contains('T') => since = Some(instant.start),
                _ => issues.push(issue(
                    IssueType::Value,
                    format!("_since '{}' is not a FHIR instant such as 2026-01-31T12:00:00Z", clip(value)),
                )),
            },
            "_type" => {
                type_given = true;
                for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                    match ResourceType::parse(part) {
                        Some(t) if patient_level && !in_patient_compartment(t) => issues.push(issue(
                            IssueType::Value,
                            format!(
                                "_type {t} is not in the Patient compartment, so a Patient or Group export has none \
                                 to give"
                            ),
                        )),
                        Some(t) => {
                            if !types.contains(&t) {
                                types.push(t);
                            }
                        }
                        None => issues.push(issue(
                            IssueType::Value,
                            format!("_type names an unknown resource type '{}'", clip(part)),
                        )),
                    }
                }
            }
            "_typeFilter" => {
                for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                    match ResourceCriteria::parse(part, "_typeFilter") {
                        Ok(criteria) => filters.push(criteria),
                        Err(found) => issues.extend(found),
                    }
                }
            }
            "_elements" => {
                for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                    let (prefix, name) = part.split_once('.').map_or((None, part), |(t, n)| (Some(t), n));
                    let name_ok = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '.');
                    match prefix.map(ResourceType::parse) {
                        _ if !name_ok => issues.push(issue(
                            IssueType::Value,
                            format!("_elements '{}' is not an element name", clip(part)),
                        )),
                        Some(None) => issues.push(issue(
                            IssueType::Value,
                            format!("_elements '{}' names an unknown resource type", clip(part)),
                        )),
                        _ => elements.push(part.to_owned()),
                    }
                }
            }
            "patient" => {
                if !patient_level {
                    issues.push(issue(
                        IssueType::NotSupported,
                        "patient applies to Patient and Group exports, not to a system export".to_owned(),
                    ));
                    continue;
                }
                match value.trim().strip_prefix("Patient/").filter(|id| fhirmesh_fhir::LogicalId::parse(id).is_ok()) {
                    Some(id) => patients.push(id.to_owned()),
                    None => issues.push(issue(
                        IssueType::Value,
                        format!("patient '{}' is not a reference of the form Patient/[id]", clip(value)),
                    )),
                }
            }
            "_format" | "_pretty" => {}
            other => {
                if kick_off.lenient {
                    ignored.push(format!("the parameter '{}' is not supported and was ignored", clip(other)));
                } else {
                    issues.push(issue(
                        IssueType::NotSupported,
                        format!(
                            "the parameter '{}' is not supported by this server's $export (send Prefer: \
                             handling=lenient to have it ignored)",
                            clip(other)
                        ),
                    ));
                }
            }
        }
    }

    if !type_given {
        types = default_types.iter().copied().filter(|t| !patient_level || in_patient_compartment(*t)).collect();
    }
    for filter in &filters {
        if !types.contains(&filter.resource_type()) {
            issues.push(issue(
                IssueType::Value,
                format!(
                    "_typeFilter '{}' is on {}, which this export does not include",
                    clip(filter.as_str()),
                    filter.resource_type()
                ),
            ));
        }
    }
    if types.is_empty() && issues.is_empty() {
        issues.push(issue(IssueType::Forbidden, "there is no resource type this export could include".to_owned()));
    }
    if !issues.is_empty() {
        return Err(invalid(issues));
    }
    Ok(ExportRequest {
        level: kick_off.level.clone(),
        types: types.iter().map(|t| t.as_str().to_owned()).collect(),
        since,
        type_filters: filters.iter().map(|f| f.as_str().to_owned()).collect(),
        elements,
        patients,
        request_url: kick_off.request_url.clone(),
        segments: 1,
    })
}

/// The parameters of a POST kick-off's `Parameters` resource, as (name, value) text pairs:
/// `valueString`, `valueInstant`, `valueCode`, `valueUri`, or a `valueReference`'s reference.
pub fn parameters_from_body(body: &Value) -> Result<Vec<(String, String)>, FhirError> {
    if body.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
        return Err(invalid(vec![
            issue(IssueType::Structure, "a POST $export takes a Parameters resource".to_owned()).at("Parameters"),
        ]));
    }
    let mut params = Vec::new();
    let mut issues = Vec::new();
    let entries = body.get("parameter").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    for (index, entry) in entries.iter().enumerate() {
        let at = format!("Parameters.parameter[{index}]");
        let Some(name) = entry.get("name").and_then(Value::as_str) else {
            issues.push(issue(IssueType::Required, "a parameter needs a name".to_owned()).at(format!("{at}.name")));
            continue;
        };
        let value = ["valueString", "valueInstant", "valueCode", "valueUri", "valueDateTime"]
            .iter()
            .find_map(|key| entry.get(*key).and_then(Value::as_str))
            .or_else(|| entry.get("valueReference").and_then(|r| r.get("reference")).and_then(Value::as_str));
        match value {
            Some(value) => params.push((name.to_owned(), value.to_owned())),
            None => issues.push(
                issue(
                    IssueType::Value,
                    format!(
                        "parameter '{}' needs a valueString, valueInstant, valueCode, valueUri or valueReference",
                        clip(name)
                    ),
                )
                .at(at),
            ),
        }
    }
    if issues.is_empty() { Ok(params) } else { Err(invalid(issues)) }
}

#[cfg(test)]
mod tests;
