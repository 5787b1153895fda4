//! An `octofhir-fhirpath` ModelProvider over the official R4 JSON schema that fhirmesh-fhir embeds
//! (`crates/fhir/data/fhir.schema.json`): element types, cardinality and choice elements. The
//! engine's own model crate (`octofhir-fhirschema`) pulls rusqlite 0.37, whose bundled SQLite
//! cannot link beside the workspace's rusqlite 0.43, so the oracle brings its own.

use std::collections::HashMap;
use std::sync::LazyLock;

use async_trait::async_trait;
use octofhir_fhir_model::error::Result;
use octofhir_fhir_model::provider::{ChoiceTypeInfo, ElementInfo, ModelProvider, TypeInfo};
use serde_json::{Map, Value};

static SCHEMA_JSON: &str = include_str!("../../../../crates/fhir/data/fhir.schema.json");

/// Per definition: element name → (type, is array); plus the choice elements' expansions.
struct Schema {
    elements: HashMap<String, HashMap<String, (String, bool)>>,
    resource_types: Vec<String>,
}

static SCHEMA: LazyLock<Schema> = LazyLock::new(|| {
    let schema: Value = serde_json::from_str(SCHEMA_JSON).expect("the embedded schema is JSON");
    let definitions = schema["definitions"].as_object().expect("definitions");
    let resource_types: Vec<String> = definitions["ResourceList"]["properties"]["resourceType"]["enum"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
        .unwrap_or_default();
    let mut elements = HashMap::new();
    for (name, definition) in definitions {
        let Some(properties) = definition.get("properties").and_then(Value::as_object) else { continue };
        elements.insert(name.clone(), property_types(definitions, properties, &resource_types));
    }
    Schema { elements, resource_types }
});

fn property_types(
    definitions: &Map<String, Value>,
    properties: &Map<String, Value>,
    resource_types: &[String],
) -> HashMap<String, (String, bool)> {
    let mut out = HashMap::new();
    for (key, schema) in properties {
        if key.starts_with('_') || key == "resourceType" {
            continue;
        }
        let is_array = schema.get("items").is_some();
        let item = schema.get("items").unwrap_or(schema);
        let ty = if let Some(reference) = item.get("$ref").and_then(Value::as_str) {
            reference.trim_start_matches("#/definitions/").to_owned()
        } else if item.get("enum").is_some() {
            "code".to_owned()
        } else {
            // An inline primitive of a choice element: the type is the key's suffix.
            match choice_suffix(definitions, key, resource_types) {
                Some(ty) => ty,
                None => match item.get("type").and_then(Value::as_str) {
                    Some("boolean") => "boolean".to_owned(),
                    Some("number") => "decimal".to_owned(),
                    _ => "string".to_owned(),
                },
            }
        };
        out.insert(key.clone(), (ty, is_array));
    }
    out
}

/// The data type named by the longest type suffix of `key` (`valueDateTime` → `dateTime`).
fn choice_suffix(definitions: &Map<String, Value>, key: &str, resource_types: &[String]) -> Option<String> {
    key.char_indices().filter(|(i, c)| *i > 0 && c.is_ascii_uppercase()).find_map(|(i, _)| {
        let suffix = &key[i..];
        let lower = suffix[..1].to_ascii_lowercase() + &suffix[1..];
        [suffix.to_owned(), lower].into_iter().find(|candidate| {
            definitions.contains_key(candidate) && !candidate.contains('_') && !resource_types.contains(candidate)
        })
    })
}

const PRIMITIVES: [&str; 19] = [
    "boolean",
    "string",
    "code",
    "id",
    "markdown",
    "uri",
    "url",
    "canonical",
    "oid",
    "uuid",
    "integer",
    "positiveInt",
    "unsignedInt",
    "decimal",
    "date",
    "dateTime",
    "instant",
    "time",
    "base64Binary",
];

fn type_info(name: &str, singleton: bool) -> TypeInfo {
    TypeInfo {
        type_name: name.to_owned(),
        singleton: Some(singleton),
        is_empty: Some(false),
        namespace: Some("FHIR".to_owned()),
        name: Some(name.to_owned()),
    }
}

fn derives_from(derived: &str, base: &str) -> bool {
    // The engine names choice primitives in lowercase (`valueDateTime` is a `datetime`).
    if derived.eq_ignore_ascii_case(base) {
        return true;
    }
    let resource = SCHEMA.resource_types.iter().any(|t| t == derived);
    match base {
        "Resource" => resource,
        "DomainResource" => resource && !matches!(derived, "Bundle" | "Binary" | "Parameters"),
        "string" => matches!(derived, "code" | "id" | "markdown"),
        "uri" => matches!(derived, "url" | "canonical" | "oid" | "uuid"),
        "integer" => matches!(derived, "positiveInt" | "unsignedInt"),
        "Quantity" => matches!(derived, "Age" | "Count" | "Distance" | "Duration" | "MoneyQuantity" | "SimpleQuantity"),
        "Element" => !resource,
        _ => false,
    }
}

/// The R4 model from the JSON schema.
#[derive(Debug, Default)]
pub struct SchemaModel;

#[async_trait]
impl ModelProvider for SchemaModel {
    async fn get_type(&self, type_name: &str) -> Result<Option<TypeInfo>> {
        // The engine looks choice suffixes up as they are written (`valueDateTime` → `DateTime`);
        // name the FHIR primitive they stand for.
        let primitive = type_name[..1].to_ascii_lowercase() + &type_name[1..];
        if type_name.starts_with(|c: char| c.is_ascii_uppercase()) && PRIMITIVES.contains(&primitive.as_str()) {
            return Ok(Some(type_info(&primitive, true)));
        }
        let known = SCHEMA.elements.contains_key(type_name)
            || SCHEMA.resource_types.iter().any(|t| t == type_name)
            || PRIMITIVES.contains(&type_name)
            || matches!(type_name, "Resource" | "DomainResource");
        Ok(known.then(|| type_info(type_name, true)))
    }

    async fn get_element_type(&self, parent_type: &TypeInfo, property_name: &str) -> Result<Option<TypeInfo>> {
        let parent = parent_type.name.as_deref().unwrap_or(&parent_type.type_name);
        Ok(SCHEMA
            .elements
            .get(parent)
            .and_then(|e| e.get(property_name))
            .map(|(ty, is_array)| type_info(ty, !is_array)))
    }

    fn of_type(&self, type_info: &TypeInfo, target_type: &str) -> Option<TypeInfo> {
        let name = type_info.name.as_deref().unwrap_or(&type_info.type_name);
        derives_from(name, target_type).then(|| type_info.clone())
    }

    fn get_element_names(&self, parent_type: &TypeInfo) -> Vec<String> {
        let parent = parent_type.name.as_deref().unwrap_or(&parent_type.type_name);
        SCHEMA.elements.get(parent).map(|e| e.keys().cloned().collect()).unwrap_or_default()
    }

    async fn get_children_type(&self, _parent_type: &TypeInfo) -> Result<Option<TypeInfo>> {
        Ok(None)
    }

    async fn get_elements(&self, type_name: &str) -> Result<Vec<ElementInfo>> {
        Ok(SCHEMA
            .elements
            .get(type_name)
            .map(|e| {
                e.iter()
                    .map(|(name, (ty, _))| ElementInfo {
                        name: name.clone(),
                        element_type: ty.clone(),
                        documentation: None,
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn get_resource_types(&self) -> Result<Vec<String>> {
        Ok(SCHEMA.resource_types.clone())
    }

    async fn get_complex_types(&self) -> Result<Vec<String>> {
        Ok(SCHEMA.elements.keys().filter(|k| !k.contains('_') && !SCHEMA.resource_types.contains(k)).cloned().collect())
    }

    async fn get_primitive_types(&self) -> Result<Vec<String>> {
        Ok(PRIMITIVES.map(str::to_owned).to_vec())
    }

    fn is_type_derived_from(&self, derived_type: &str, base_type: &str) -> bool {
        derives_from(derived_type, base_type)
    }

    async fn get_choice_types(&self, parent_type: &str, property_name: &str) -> Result<Option<Vec<ChoiceTypeInfo>>> {
        let Some(elements) = SCHEMA.elements.get(parent_type) else { return Ok(None) };
        if elements.contains_key(property_name) {
            return Ok(None);
        }
        let choices: Vec<ChoiceTypeInfo> = elements
            .iter()
            .filter_map(|(key, (ty, _))| {
                let suffix = key.strip_prefix(property_name)?;
                let upper = suffix.starts_with(|c: char| c.is_ascii_uppercase());
                let names_type = suffix.eq_ignore_ascii_case(ty);
                (upper && names_type).then(|| ChoiceTypeInfo { suffix: suffix.to_owned(), type_name: ty.clone() })
            })
            .collect();
        Ok((!choices.is_empty()).then_some(choices))
    }
}
