//! The embedded, derived FHIR definitions (see `data/PROVENANCE.md`), parsed once on first use.

use std::collections::HashMap;
use std::sync::LazyLock;

use serde::Deserialize;
use serde_json::Value;

use crate::ResourceType;

static SCHEMA_JSON: &str = include_str!("../data/fhir.schema.json");
static ELEMENTS_JSON: &str = include_str!("../data/elements.json");

/// The derived R4 JSON schema document (draft-07, dispatching on `resourceType`).
pub(crate) fn schema() -> &'static Value {
    static SCHEMA: LazyLock<Value> = LazyLock::new(|| {
        // The file is generated and covered by tests; failing here is a build defect, not an input error.
        serde_json::from_str(SCHEMA_JSON).expect("data/fhir.schema.json is valid JSON")
    });
    &SCHEMA
}

/// `#/definitions/<name>` of the schema.
pub(crate) fn definition(name: &str) -> Option<&'static Value> {
    schema().get("definitions")?.get(name)
}

/// What the schema says about property `name` of definition `owner`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Property {
    /// The element repeats (a JSON array).
    pub is_array: bool,
    /// The definition the element's values conform to, when it is a named definition
    /// (`HumanName`, `Patient_Contact`, `ResourceList`, `string`, ...).
    pub definition: Option<&'static str>,
}

pub(crate) fn property(owner: &str, name: &str) -> Option<Property> {
    let schema = definition(owner)?.get("properties")?.get(name)?;
    let (is_array, item) = match schema.get("items") {
        Some(items) => (true, items),
        None => (schema.get("type").and_then(Value::as_str) == Some("array"), schema),
    };
    let definition = item.get("$ref").and_then(Value::as_str).and_then(|r| r.strip_prefix("#/definitions/"));
    Some(Property { is_array, definition })
}

/// Top-level element facts of one resource type, from its StructureDefinition snapshot.
#[derive(Debug, Deserialize)]
pub(crate) struct TypeElements {
    /// JSON names of the elements marked `isSummary` (choice elements expanded).
    pub summary: Vec<String>,
    /// JSON names of the elements with `min >= 1` (choice elements expanded).
    pub mandatory: Vec<String>,
    /// Choice elements: base name (`value`) to JSON names (`valueQuantity`, ...).
    pub choices: HashMap<String, Vec<String>>,
}

pub(crate) fn elements(resource_type: ResourceType) -> Option<&'static TypeElements> {
    static ELEMENTS: LazyLock<HashMap<String, TypeElements>> =
        LazyLock::new(|| serde_json::from_str(ELEMENTS_JSON).expect("data/elements.json matches TypeElements"));
    ELEMENTS.get(resource_type.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_has_a_definition_per_resource_type() {
        for resource_type in ResourceType::all() {
            let definition = definition(resource_type.as_str()).expect("definition");
            assert_eq!(definition.get("additionalProperties"), Some(&Value::Bool(false)), "{resource_type}");
            assert!(elements(*resource_type).is_some(), "{resource_type}");
        }
    }

    #[test]
    fn properties_know_cardinality_and_type() {
        let name = property("Patient", "name").expect("Patient.name");
        assert_eq!(name, Property { is_array: true, definition: Some("HumanName") });
        let gender = property("Patient", "gender").expect("Patient.gender");
        assert!(!gender.is_array);
        let contact = property("Patient", "contact").expect("Patient.contact");
        assert_eq!(contact.definition, Some("Patient_Contact"));
        assert_eq!(property("Patient", "contained").and_then(|p| p.definition), Some("ResourceList"));
        assert_eq!(property("Patient", "nope"), None);
    }

    #[test]
    fn elements_expand_choices() {
        let observation = elements(ResourceType::parse("Observation").expect("type")).expect("elements");
        assert!(observation.summary.iter().any(|n| n == "valueQuantity"));
        assert!(observation.mandatory.iter().any(|n| n == "status"));
        assert!(observation.choices.get("value").is_some_and(|names| names.iter().any(|n| n == "valueString")));
    }
}
