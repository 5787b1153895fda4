//! `_summary` and `_elements`: returning a subset of a resource's top-level elements.
//!
//! See <https://hl7.org/fhir/R4/search.html#summary> and <https://hl7.org/fhir/R4/search.html#elements>.
//! Which elements are "summary" or mandatory comes from the resource StructureDefinitions (derived into
//! `data/elements.json`). A subsetted resource is tagged `SUBSETTED` so it is not mistaken for the whole.

use serde_json::{Map, Value, json};

use crate::ResourceType;
use crate::definitions::{TypeElements, elements};

/// `http://terminology.hl7.org/CodeSystem/v3-ObservationValue`, the system of the `SUBSETTED` tag.
pub const SUBSETTED_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue";
pub const SUBSETTED_CODE: &str = "SUBSETTED";

/// The `_summary` search/read parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SummaryMode {
    /// `true`: only the elements marked as summary elements in the base definition.
    True,
    /// `text`: only `text`, `id`, `meta` and the mandatory top-level elements.
    Text,
    /// `data`: everything but `text`.
    Data,
    /// `count`: a search returns only the count; resources (if any) are summarised as for `true`.
    Count,
    /// `false`: the whole resource.
    False,
}

impl SummaryMode {
    /// Parses the parameter value (`true`, `text`, `data`, `count`, `false`; exact, lowercase).
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "true" => Some(SummaryMode::True),
            "text" => Some(SummaryMode::Text),
            "data" => Some(SummaryMode::Data),
            "count" => Some(SummaryMode::Count),
            "false" => Some(SummaryMode::False),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SummaryMode::True => "true",
            SummaryMode::Text => "text",
            SummaryMode::Data => "data",
            SummaryMode::Count => "count",
            SummaryMode::False => "false",
        }
    }
}

/// Elements every subset keeps.
const ALWAYS_KEPT: [&str; 3] = ["resourceType", "id", "meta"];

/// Applies `_summary` to one resource, tagging it `SUBSETTED` when anything was removed.
///
/// Resources of unknown type (or non-objects) keep only `resourceType`, `id` and `meta` (and `text` for
/// [`SummaryMode::Text`]) in the subsetting modes.
pub fn apply_summary(resource: &Value, mode: SummaryMode) -> Value {
    let type_elements = type_elements(resource);
    match mode {
        SummaryMode::False => resource.clone(),
        SummaryMode::Data => subset(resource, |name| name != "text"),
        SummaryMode::True | SummaryMode::Count => subset(resource, |name| {
            ALWAYS_KEPT.contains(&name) || type_elements.is_some_and(|e| contains(&e.summary, name))
        }),
        SummaryMode::Text => subset(resource, |name| {
            ALWAYS_KEPT.contains(&name) || name == "text" || type_elements.is_some_and(|e| contains(&e.mandatory, name))
        }),
    }
}

/// Applies `_elements` to one resource: keeps the listed top-level elements plus `resourceType`, `id`, `meta`
/// and the mandatory elements, tagging it `SUBSETTED` when anything was removed.
///
/// Accepts `name` and `Patient.name` forms (deeper paths such as `Patient.name.given` keep the whole
/// top-level `name`); a choice element's base name (`value`) keeps whichever type is present (`valueQuantity`).
pub fn apply_elements(resource: &Value, requested: &[&str]) -> Value {
    let resource_type = resource.get("resourceType").and_then(Value::as_str).unwrap_or_default();
    let type_elements = type_elements(resource);
    let mut wanted: Vec<&str> = Vec::new();
    for element in requested {
        let element = element.trim();
        let element = element
            .strip_prefix(resource_type)
            .and_then(|rest| rest.strip_prefix('.'))
            .filter(|_| !resource_type.is_empty())
            .unwrap_or(element);
        let top = element.split('.').next().unwrap_or_default();
        match type_elements.and_then(|e| e.choices.get(top)) {
            Some(names) => wanted.extend(names.iter().map(String::as_str)),
            None => wanted.push(top),
        }
    }
    subset(resource, |name| {
        ALWAYS_KEPT.contains(&name)
            || wanted.contains(&name)
            || type_elements.is_some_and(|e| contains(&e.mandatory, name))
    })
}

fn type_elements(resource: &Value) -> Option<&'static TypeElements> {
    resource.get("resourceType").and_then(Value::as_str).and_then(ResourceType::parse).and_then(elements)
}

fn contains(names: &[String], name: &str) -> bool {
    names.iter().any(|n| n == name)
}

/// Keeps the top-level elements `keep` accepts (a primitive's `_name` goes with `name`); tags the result
/// `SUBSETTED` when something was dropped.
fn subset(resource: &Value, keep: impl Fn(&str) -> bool) -> Value {
    let Some(object) = resource.as_object() else {
        return resource.clone();
    };
    let kept: Map<String, Value> = object
        .iter()
        .filter(|(name, _)| keep(name.strip_prefix('_').unwrap_or(name)))
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect();
    let removed = kept.len() < object.len();
    let mut result = Value::Object(kept);
    if removed {
        add_subsetted_tag(&mut result);
    }
    result
}

/// Adds the `SUBSETTED` tag to `meta.tag` unless present (no-op on a malformed `meta`).
pub fn add_subsetted_tag(resource: &mut Value) {
    let Some(object) = resource.as_object_mut() else {
        return;
    };
    let meta = object.entry("meta").or_insert_with(|| json!({}));
    let Some(meta) = meta.as_object_mut() else {
        return;
    };
    let tags = meta.entry("tag").or_insert_with(|| json!([]));
    let Some(tags) = tags.as_array_mut() else {
        return;
    };
    let present = tags.iter().any(|tag| {
        tag.get("system").and_then(Value::as_str) == Some(SUBSETTED_SYSTEM)
            && tag.get("code").and_then(Value::as_str) == Some(SUBSETTED_CODE)
    });
    if !present {
        tags.push(json!({"system": SUBSETTED_SYSTEM, "code": SUBSETTED_CODE}));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patient() -> Value {
        json!({
            "resourceType": "Patient",
            "id": "p1",
            "meta": {"versionId": "2"},
            "text": {"status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">Jim</div>"},
            "identifier": [{"system": "urn:x", "value": "1"}],
            "name": [{"family": "Chalmers"}],
            "birthDate": "1974-12-25",
            "_birthDate": {"extension": [{"url": "http://example.org/x", "valueString": "y"}]},
            "maritalStatus": {"text": "married"},
            "deceasedBoolean": false,
            "contact": [{"name": {"family": "Du Marché"}}],
            "link": [{"other": {"reference": "Patient/2"}, "type": "seealso"}]
        })
    }

    fn keys(value: &Value) -> Vec<&str> {
        value.as_object().map(|o| o.keys().map(String::as_str).collect()).unwrap_or_default()
    }

    fn is_subsetted(value: &Value) -> bool {
        value["meta"]["tag"]
            .as_array()
            .is_some_and(|tags| tags.iter().any(|t| t["code"] == "SUBSETTED" && t["system"] == SUBSETTED_SYSTEM))
    }

    #[test]
    fn parses_modes() {
        for mode in [SummaryMode::True, SummaryMode::Text, SummaryMode::Data, SummaryMode::Count, SummaryMode::False] {
            assert_eq!(SummaryMode::parse(mode.as_str()), Some(mode));
        }
        assert_eq!(SummaryMode::parse("TRUE"), None);
        assert_eq!(SummaryMode::parse(""), None);
    }

    #[test]
    fn summary_true_keeps_summary_elements_and_tags() {
        let summary = apply_summary(&patient(), SummaryMode::True);
        assert_eq!(
            keys(&summary),
            ["resourceType", "id", "meta", "identifier", "name", "birthDate", "_birthDate", "deceasedBoolean", "link"]
        );
        assert!(is_subsetted(&summary));
        assert_eq!(summary["meta"]["versionId"], "2");
        assert_eq!(apply_summary(&patient(), SummaryMode::Count), summary);
    }

    #[test]
    fn summary_text_keeps_text_and_mandatory_elements() {
        let observation = json!({
            "resourceType": "Observation", "id": "o", "text": {"status": "generated", "div": "<div/>"},
            "status": "final", "code": {"text": "x"}, "valueQuantity": {"value": 1}, "subject": {"reference": "Patient/1"}
        });
        let text = apply_summary(&observation, SummaryMode::Text);
        assert_eq!(keys(&text), ["resourceType", "id", "text", "status", "code", "meta"]);
        assert!(is_subsetted(&text));
    }

    #[test]
    fn summary_data_removes_only_text() {
        let data = apply_summary(&patient(), SummaryMode::Data);
        let mut expected = patient();
        expected.as_object_mut().map(|o| o.remove("text"));
        add_subsetted_tag(&mut expected);
        assert_eq!(data, expected);
        let no_text = json!({"resourceType": "Basic", "id": "b", "code": {"text": "c"}});
        assert_eq!(apply_summary(&no_text, SummaryMode::Data), no_text, "nothing removed, no tag");
    }

    #[test]
    fn summary_false_is_identity() {
        assert_eq!(apply_summary(&patient(), SummaryMode::False), patient());
    }

    #[test]
    fn summary_true_expands_choice_elements() {
        let observation = json!({
            "resourceType": "Observation", "status": "final", "code": {"text": "x"},
            "valueQuantity": {"value": 1}, "note": [{"text": "n"}], "effectiveDateTime": "2020"
        });
        let summary = apply_summary(&observation, SummaryMode::True);
        assert_eq!(keys(&summary), ["resourceType", "status", "code", "valueQuantity", "effectiveDateTime", "meta"]);
    }

    #[test]
    fn elements_keep_requested_and_mandatory() {
        let subset = apply_elements(&patient(), &["Patient.birthDate", "maritalStatus"]);
        assert_eq!(keys(&subset), ["resourceType", "id", "meta", "birthDate", "_birthDate", "maritalStatus"]);
        assert!(is_subsetted(&subset));
        assert_eq!(subset["meta"]["tag"].as_array().map(Vec::len), Some(1));

        let observation = json!({
            "resourceType": "Observation", "status": "final", "code": {"text": "x"},
            "valueQuantity": {"value": 1}, "subject": {"reference": "Patient/1"}, "note": [{"text": "n"}]
        });
        let subset = apply_elements(&observation, &["value", "Observation.subject.reference"]);
        assert_eq!(keys(&subset), ["resourceType", "status", "code", "valueQuantity", "subject", "meta"]);
        let everything = apply_elements(&observation, &["value", "subject", "note"]);
        assert_eq!(everything, observation, "nothing removed, no tag");
    }

    #[test]
    fn subsetting_keeps_an_existing_tag_list_and_does_not_duplicate() {
        let mut resource = patient();
        resource["meta"]["tag"] = json!([{"system": "urn:t", "code": "a"}]);
        let once = apply_summary(&resource, SummaryMode::True);
        let twice = apply_summary(&once, SummaryMode::Text);
        assert_eq!(twice["meta"]["tag"].as_array().map(Vec::len), Some(2));
    }
}
