//! Structural validation of resources against the official FHIR R4 JSON schema.
//!
//! The schema (see `data/PROVENANCE.md`) is compiled once, lazily, as one validator for the whole document.
//! Its root and `ResourceList` (contained resources, `Bundle.entry.resource`, `Parameters.parameter.resource`)
//! dispatch on `resourceType` instead of the official `oneOf` over all 146 resources, so each resource is
//! checked against exactly its own definition and errors point at the offending element.
//!
//! This checks structure, primitive formats, codes bound with `enum`, and unknown elements. It does not check
//! invariants (FHIRPath constraints), terminology bindings beyond the schema's enums, or profiles.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::LazyLock;

use jsonschema::error::{TypeKind, ValidationErrorKind};
use jsonschema::{Draft, PatternOptions, ValidationError, Validator};
use serde_json::Value;

use crate::ResourceType;
use crate::definitions::schema;
use crate::outcome::{Issue, IssueType};

/// At most this many issues are reported for one resource.
pub const MAX_ISSUES: usize = 100;

/// Longest echo of a client value in a diagnostic, in characters.
const MAX_ECHO: usize = 100;

static VALIDATOR: LazyLock<Result<Validator, String>> = LazyLock::new(|| {
    jsonschema::options()
        .with_draft(Draft::Draft7)
        // FHIR's patterns need no look-around or back-references; the `regex` engine matches in linear time,
        // so no client value can make a pattern backtrack catastrophically.
        .with_pattern_options(PatternOptions::regex())
        .should_validate_formats(false)
        .build(schema())
        .map_err(|error| error.to_string())
});

/// Pattern of each FHIR primitive type to the primitive type names using it (`^\S*$` → `uri`...).
static PRIMITIVE_PATTERNS: LazyLock<HashMap<&'static str, String>> = LazyLock::new(|| {
    let mut patterns: HashMap<&'static str, String> = HashMap::new();
    let definitions = schema().get("definitions").and_then(Value::as_object);
    for (name, definition) in definitions.into_iter().flatten() {
        if let Some(pattern) = definition.get("pattern").and_then(Value::as_str) {
            let names = patterns.entry(pattern).or_default();
            if !names.is_empty() {
                names.push_str(" or ");
            }
            names.push_str(name);
        }
    }
    patterns
});

/// Compiles the schema now rather than on the first validation (call at server start; takes a moment).
pub fn warm_up() {
    LazyLock::force(&VALIDATOR);
    LazyLock::force(&PRIMITIVE_PATTERNS);
}

/// Validates a resource; an empty result means valid.
///
/// The resource must be a JSON object whose `resourceType` names a concrete R4 resource type (otherwise one
/// `invalid` issue with expression `resourceType`); then every schema violation becomes an `error` issue with
/// code `structure` (unknown element, wrong JSON type), `required` or `value` (bad format, unknown code) and
/// the FHIRPath of the offending element. At most [`MAX_ISSUES`] issues are returned.
pub fn validate_resource(resource: &Value) -> Vec<Issue> {
    let Some(object) = resource.as_object() else {
        return vec![Issue::error(IssueType::Invalid, "a resource must be a JSON object")];
    };
    let resource_type = match object.get("resourceType") {
        Some(Value::String(name)) => match ResourceType::parse(name) {
            Some(resource_type) => resource_type,
            None => {
                return vec![
                    Issue::error(IssueType::Invalid, format!("unknown resource type \"{}\"", truncate(name)))
                        .at("resourceType"),
                ];
            }
        },
        Some(_) => {
            return vec![Issue::error(IssueType::Invalid, "resourceType must be a string").at("resourceType")];
        }
        None => {
            return vec![Issue::error(IssueType::Invalid, "missing resourceType").at("resourceType")];
        }
    };
    let validator = match &*VALIDATOR {
        Ok(validator) => validator,
        Err(error) => {
            return vec![Issue::error(IssueType::Exception, format!("the FHIR schema failed to compile: {error}"))];
        }
    };
    let mut issues: Vec<(Kind, Issue)> = Vec::new();
    for error in validator.iter_errors(resource) {
        issues.extend(issues_for(resource_type, resource, &error));
        if issues.len() >= MAX_ISSUES {
            break;
        }
    }
    // A wrong JSON type often also fails the primitive's pattern (`"yes"` for a boolean): report the type only.
    let mistyped: Vec<Option<String>> =
        issues.iter().filter(|(kind, _)| *kind == Kind::Type).map(|(_, issue)| issue.expression.clone()).collect();
    issues.retain(|(kind, issue)| *kind != Kind::Pattern || !mistyped.contains(&issue.expression));
    issues.into_iter().map(|(_, issue)| issue).take(MAX_ISSUES).collect()
}

/// Which schema keyword an issue came from, where later filtering needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Type,
    Pattern,
    Other,
}

fn issues_for(resource_type: ResourceType, resource: &Value, error: &ValidationError<'_>) -> Vec<(Kind, Issue)> {
    let pointer = error.instance_path().as_str();
    let expression = fhirpath_of_pointer(resource_type, resource, pointer);
    let value = error.instance();
    let (kind, issue) = match error.kind() {
        ValidationErrorKind::AdditionalProperties { unexpected } => {
            return unexpected
                .iter()
                .map(|name| {
                    let issue = Issue::error(IssueType::Structure, format!("unknown element '{}'", truncate(name)));
                    (Kind::Other, issue.at(child(&expression, name)))
                })
                .collect();
        }
        ValidationErrorKind::Required { property } => {
            let name = property.as_str().unwrap_or_default();
            let issue = Issue::error(IssueType::Required, format!("missing required element '{name}'"));
            return vec![(Kind::Other, issue.at(child(&expression, name)))];
        }
        ValidationErrorKind::Type { kind } => {
            let expected = match kind {
                TypeKind::Single(json_type) => json_type.to_string(),
                TypeKind::Multiple(types) => types.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(" or "),
            };
            let found = format!("expected {} but found {} {}", article(&expected), json_type(value), echo(value));
            (Kind::Type, Issue::error(IssueType::Structure, found))
        }
        ValidationErrorKind::Pattern { pattern } => {
            let message = match PRIMITIVE_PATTERNS.get(pattern.as_str()) {
                Some(types) => format!("invalid {types} value {}", echo(value)),
                None => format!("value {} does not match the pattern {}", echo(value), truncate(pattern)),
            };
            (Kind::Pattern, Issue::error(IssueType::Value, message))
        }
        ValidationErrorKind::Enum { options } => {
            let message = if pointer.ends_with("/resourceType") {
                format!("unknown resource type {}", echo(value))
            } else {
                format!("{} is not one of {}", echo(value), list(options))
            };
            (Kind::Other, Issue::error(IssueType::Value, message))
        }
        ValidationErrorKind::Constant { expected_value } => {
            let message = format!("expected {} but found {}", echo(expected_value), echo(value));
            (Kind::Other, Issue::error(IssueType::Value, message))
        }
        ValidationErrorKind::MinItems { .. } | ValidationErrorKind::MinLength { .. } => {
            (Kind::Other, Issue::error(IssueType::Value, format!("{} must not be empty", echo(value))))
        }
        _ => (Kind::Other, Issue::error(IssueType::Structure, truncate(&error.masked().to_string()))),
    };
    vec![(kind, issue.at(expression))]
}

/// Converts a JSON pointer into `resource` to a FHIRPath-like expression:
/// `/name/0/given/1` on a Patient is `Patient.name[0].given[1]`; `_birthDate` (a primitive's extensions) is
/// reported as `birthDate`.
pub fn fhirpath_of_pointer(resource_type: ResourceType, resource: &Value, pointer: &str) -> String {
    let mut expression = resource_type.as_str().to_owned();
    let mut node = Some(resource);
    for raw in pointer.split('/').skip(1) {
        let segment = raw.replace("~1", "/").replace("~0", "~");
        match node {
            Some(Value::Array(items)) => {
                let _ = write!(expression, "[{segment}]");
                node = segment.parse::<usize>().ok().and_then(|index| items.get(index));
            }
            _ => {
                node = node.and_then(|n| n.get(&segment));
                expression = child(&expression, &segment);
            }
        }
    }
    expression
}

fn child(expression: &str, name: &str) -> String {
    let name = name.strip_prefix('_').filter(|n| !n.is_empty()).unwrap_or(name);
    format!("{expression}.{name}")
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn article(word: &str) -> String {
    let vowel = word.starts_with(['a', 'e', 'i', 'o', 'u']);
    format!("{} {word}", if vowel { "an" } else { "a" })
}

/// A client value as JSON, truncated to [`MAX_ECHO`] characters.
fn echo(value: &Value) -> String {
    truncate(&value.to_string())
}

fn truncate(text: &str) -> String {
    match text.char_indices().nth(MAX_ECHO) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

fn list(options: &Value) -> String {
    let Some(options) = options.as_array() else {
        return echo(options);
    };
    let mut shown: Vec<String> =
        options.iter().take(12).map(|o| o.as_str().map_or_else(|| o.to_string(), str::to_owned)).collect();
    if options.len() > shown.len() {
        shown.push(format!("… ({} codes)", options.len()));
    }
    truncate(&format!("[{}]", shown.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pointers_become_fhirpath() {
        let patient = ResourceType::parse("Patient").expect("type");
        let resource =
            json!({"resourceType": "Patient", "name": [{"given": ["a", "b"], "_given": [null, {}]}], "x": {"0": 1}});
        assert_eq!(fhirpath_of_pointer(patient, &resource, ""), "Patient");
        assert_eq!(fhirpath_of_pointer(patient, &resource, "/name/0/given/1"), "Patient.name[0].given[1]");
        assert_eq!(fhirpath_of_pointer(patient, &resource, "/name/0/_given/1"), "Patient.name[0].given[1]");
        assert_eq!(fhirpath_of_pointer(patient, &resource, "/x/0"), "Patient.x.0");
        assert_eq!(fhirpath_of_pointer(patient, &resource, "/a~1b/c~0d"), "Patient.a/b.c~d");
    }

    #[test]
    fn echo_truncates_on_char_boundaries() {
        let long = "é".repeat(300);
        let echoed = echo(&json!(long));
        assert_eq!(echoed.chars().count(), MAX_ECHO + 1);
        assert!(echoed.ends_with('…'));
    }
}
