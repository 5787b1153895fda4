//! Patching resources: JSON Patch (RFC 6902) and FHIRPath Patch (<https://hl7.org/fhir/R4/fhirpatch.html>).
//!
//! Both are atomic: on error the target is left unchanged. Neither validates the result against the schema;
//! the caller validates the patched resource as it would any update.

mod path;

use serde::Deserialize;
use serde_json::{Map, Value};

use self::path::{Location, Segment, Step};
use crate::ResourceType;
use crate::definitions::{Property, property};
use crate::outcome::{Issue, IssueType};
use crate::validate::fhirpath_of_pointer;

/// Why a patch could not be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatchError {
    /// The patch document itself is malformed (not a JSON Patch array, not a valid `Parameters`, ...).
    #[error("invalid patch document: {reason}")]
    InvalidDocument {
        reason: String,
        /// Where in the patch document, e.g. `Parameters.parameter[1]`.
        expression: Option<String>,
    },
    /// A JSON Patch operation failed (bad pointer, failed `test`, ...).
    #[error("json patch operation {index} failed at '{pointer}': {reason}")]
    JsonPatch {
        index: usize,
        pointer: String,
        reason: String,
        /// The FHIRPath of `pointer` in the target, when it is a resource.
        expression: Option<String>,
    },
    /// A FHIRPath Patch path is malformed or outside the supported FHIRPath subset.
    #[error("unsupported fhirpath '{path}': {reason}")]
    UnsupportedPath { path: String, reason: String },
    /// A FHIRPath Patch operation does not apply to this resource.
    #[error("fhirpath patch operation {index} ({kind} at '{path}') failed: {reason}")]
    Operation { index: usize, kind: &'static str, path: String, reason: String },
}

impl PatchError {
    /// The OperationOutcome issue for this error: `invalid` for a bad patch document or path, `processing` when
    /// a well-formed patch does not apply to the resource.
    pub fn to_issue(&self) -> Issue {
        let diagnostics = self.to_string();
        match self {
            PatchError::InvalidDocument { expression, .. } => {
                with_expression(Issue::error(IssueType::Invalid, diagnostics), expression.clone())
            }
            PatchError::UnsupportedPath { .. } => Issue::error(IssueType::Invalid, diagnostics),
            PatchError::JsonPatch { expression, .. } => {
                with_expression(Issue::error(IssueType::Processing, diagnostics), expression.clone())
            }
            PatchError::Operation { path, .. } => Issue::error(IssueType::Processing, diagnostics).at(path.clone()),
        }
    }
}

fn with_expression(issue: Issue, expression: Option<String>) -> Issue {
    match expression {
        Some(expression) => issue.at(expression),
        None => issue,
    }
}

fn invalid(reason: impl Into<String>, expression: impl Into<Option<String>>) -> PatchError {
    PatchError::InvalidDocument { reason: reason.into(), expression: expression.into() }
}

/// Applies an RFC 6902 JSON Patch (an array of operations, including `test`) atomically.
pub fn apply_json_patch(target: &mut Value, patch: &Value) -> Result<(), PatchError> {
    if !patch.is_array() {
        return Err(invalid("a json patch must be an array of operations", None));
    }
    let operations = json_patch::Patch::deserialize(patch).map_err(|error| invalid(error.to_string(), None))?;
    json_patch::patch(target, &operations).map_err(|error| {
        let pointer = error.path.to_string();
        let expression = target
            .get("resourceType")
            .and_then(Value::as_str)
            .and_then(ResourceType::parse)
            .map(|resource_type| fhirpath_of_pointer(resource_type, target, &pointer));
        PatchError::JsonPatch { index: error.operation, pointer, reason: error.kind.to_string(), expression }
    })
}

/// Applies a FHIRPath Patch (a `Parameters` resource of `operation` parameters) atomically.
///
/// Supported operation types: `add`, `insert`, `delete`, `replace`, `move`. Paths may use the FHIRPath subset
/// supported here: the resource type root, element names, `[n]`, `first()`, `last()` and
/// `where(a.b = 'literal')`. Values are any `value[x]`, or nested `part`s for complex values.
///
/// Semantics follow the specification: `delete` of a path matching nothing is a no-op and of more than one
/// element an error; `add` and `replace` need exactly one match; `insert` and `move` need a path ending in a
/// list element of exactly one parent, and indices inside the list.
pub fn apply_fhirpath_patch(target: &mut Value, parameters: &Value) -> Result<(), PatchError> {
    let operations = parse_operations(parameters)?;
    let resource_type = target.get("resourceType").and_then(Value::as_str).unwrap_or_default().to_owned();
    let mut working = target.clone();
    for (index, operation) in operations.iter().enumerate() {
        let steps = path::parse(&operation.path, &resource_type)
            .map_err(|error| PatchError::UnsupportedPath { path: operation.path.clone(), reason: error.0 })?;
        apply_operation(&mut working, operation, &steps).map_err(|reason| PatchError::Operation {
            index,
            kind: operation.kind.as_str(),
            path: operation.path.clone(),
            reason,
        })?;
    }
    *target = working;
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OperationKind {
    Add,
    Insert,
    Delete,
    Replace,
    Move,
}

impl OperationKind {
    fn parse(code: &str) -> Option<Self> {
        match code {
            "add" => Some(OperationKind::Add),
            "insert" => Some(OperationKind::Insert),
            "delete" => Some(OperationKind::Delete),
            "replace" => Some(OperationKind::Replace),
            "move" => Some(OperationKind::Move),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            OperationKind::Add => "add",
            OperationKind::Insert => "insert",
            OperationKind::Delete => "delete",
            OperationKind::Replace => "replace",
            OperationKind::Move => "move",
        }
    }
}

/// The `value` of an operation: a `value[x]` (with its type suffix, `Quantity`) or nested parts.
#[derive(Debug, Clone, PartialEq)]
enum PatchValue {
    Typed { type_suffix: String, value: Value },
    Parts { parts: Vec<Value>, expression: String },
}

impl PatchValue {
    fn type_suffix(&self) -> Option<&str> {
        match self {
            PatchValue::Typed { type_suffix, .. } => Some(type_suffix),
            PatchValue::Parts { .. } => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Operation {
    kind: OperationKind,
    path: String,
    name: Option<String>,
    value: Option<PatchValue>,
    index: Option<usize>,
    source: Option<usize>,
    destination: Option<usize>,
}

fn parse_operations(parameters: &Value) -> Result<Vec<Operation>, PatchError> {
    if parameters.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
        return Err(invalid("a fhirpath patch must be a Parameters resource", None));
    }
    let entries = match parameters.get("parameter") {
        None => return Ok(Vec::new()),
        Some(Value::Array(entries)) => entries,
        Some(_) => {
            return Err(invalid("Parameters.parameter must be an array", "Parameters.parameter".to_owned()));
        }
    };
    entries
        .iter()
        .enumerate()
        .map(|(index, entry)| parse_operation(entry, &format!("Parameters.parameter[{index}]")))
        .collect()
}

fn parse_operation(entry: &Value, at: &str) -> Result<Operation, PatchError> {
    if entry.get("name").and_then(Value::as_str) != Some("operation") {
        return Err(invalid("every parameter must be named 'operation'", at.to_owned()));
    }
    let Some(parts) = entry.get("part").and_then(Value::as_array) else {
        return Err(invalid("an operation needs parts", at.to_owned()));
    };
    let mut kind = None;
    let mut path = None;
    let mut name = None;
    let mut value = None;
    let (mut index, mut source, mut destination) = (None, None, None);
    for (position, part) in parts.iter().enumerate() {
        let at = format!("{at}.part[{position}]");
        let part_name = part.get("name").and_then(Value::as_str).unwrap_or_default();
        let text = || -> Result<String, PatchError> {
            ["valueCode", "valueString", "valueUri"]
                .iter()
                .find_map(|key| part.get(*key).and_then(Value::as_str))
                .map(str::to_owned)
                .ok_or_else(|| invalid(format!("part '{part_name}' needs a string value"), at.clone()))
        };
        let integer = || -> Result<usize, PatchError> {
            ["valueInteger", "valueUnsignedInt", "valuePositiveInt"]
                .iter()
                .find_map(|key| part.get(*key).and_then(Value::as_u64))
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| invalid(format!("part '{part_name}' needs a non-negative integer value"), at.clone()))
        };
        let duplicate = |present: bool| {
            if present { Err(invalid(format!("part '{part_name}' is repeated"), at.clone())) } else { Ok(()) }
        };
        match part_name {
            "type" => {
                duplicate(kind.is_some())?;
                let code = text()?;
                kind = Some(OperationKind::parse(&code).ok_or_else(|| {
                    invalid(
                        format!("unknown operation type '{code}' (expected add, insert, delete, replace or move)"),
                        at.clone(),
                    )
                })?);
            }
            "path" => {
                duplicate(path.is_some())?;
                path = Some(text()?);
            }
            "name" => {
                duplicate(name.is_some())?;
                name = Some(text()?);
            }
            "value" => {
                duplicate(value.is_some())?;
                value = Some(patch_value(part, &at)?);
            }
            "index" => {
                duplicate(index.is_some())?;
                index = Some(integer()?);
            }
            "source" => {
                duplicate(source.is_some())?;
                source = Some(integer()?);
            }
            "destination" => {
                duplicate(destination.is_some())?;
                destination = Some(integer()?);
            }
            other => return Err(invalid(format!("unknown operation part '{other}'"), at)),
        }
    }
    let kind = kind.ok_or_else(|| invalid("an operation needs a 'type' part", at.to_owned()))?;
    let path = path.ok_or_else(|| invalid("an operation needs a 'path' part", at.to_owned()))?;
    let missing = |part: &str| invalid(format!("a {} operation needs a '{part}' part", kind.as_str()), at.to_owned());
    match kind {
        OperationKind::Add if name.is_none() => return Err(missing("name")),
        OperationKind::Add | OperationKind::Insert | OperationKind::Replace if value.is_none() => {
            return Err(missing("value"));
        }
        OperationKind::Insert if index.is_none() => return Err(missing("index")),
        OperationKind::Move if source.is_none() => return Err(missing("source")),
        OperationKind::Move if destination.is_none() => return Err(missing("destination")),
        _ => {}
    }
    Ok(Operation { kind, path, name, value, index, source, destination })
}

/// The `value[x]` of a parameter part (`valueQuantity` → (`Quantity`, its value)), or its nested parts.
fn patch_value(part: &Value, at: &str) -> Result<PatchValue, PatchError> {
    let typed = typed_value(part);
    match (typed, part.get("part")) {
        (Some((type_suffix, value)), None) => Ok(PatchValue::Typed { type_suffix, value: value.clone() }),
        (None, Some(Value::Array(parts))) => Ok(PatchValue::Parts { parts: parts.clone(), expression: at.to_owned() }),
        (Some(_), Some(_)) => Err(invalid("a value part has both a value[x] and parts", at.to_owned())),
        _ => Err(invalid("a value part needs a value[x] or parts", at.to_owned())),
    }
}

fn typed_value(part: &Value) -> Option<(String, &Value)> {
    part.as_object()?.iter().find_map(|(key, value)| {
        let suffix = key.strip_prefix("value")?;
        suffix.starts_with(|c: char| c.is_ascii_uppercase()).then(|| (suffix.to_owned(), value))
    })
}

/// Builds the JSON of a value, given the schema definition of the element it becomes (when known).
fn build_value(value: &PatchValue, definition: Option<&'static str>) -> Result<Value, String> {
    let (parts, expression) = match value {
        PatchValue::Typed { value, .. } => return Ok(value.clone()),
        PatchValue::Parts { parts, expression } => (parts, expression),
    };
    let mut object = Map::new();
    for (position, part) in parts.iter().enumerate() {
        let at = format!("{expression}.part[{position}]");
        let Some(name) = part.get("name").and_then(Value::as_str) else {
            return Err(format!("{at} has no name"));
        };
        let value = patch_value(part, &at).map_err(|error| error.to_string())?;
        let (key, element) = resolve_name(definition, name, value.type_suffix());
        if definition.is_some() && element.is_none() {
            return Err(format!("'{name}' is not an element of {}", definition.unwrap_or_default()));
        }
        let built = build_value(&value, element.and_then(|e| e.definition))?;
        match object.get_mut(&key) {
            Some(Value::Array(items)) => items.push(built),
            Some(existing) => {
                let first = existing.take();
                *existing = Value::Array(vec![first, built]);
            }
            None if element.is_some_and(|e| e.is_array) => {
                object.insert(key, Value::Array(vec![built]));
            }
            None => {
                object.insert(key, built);
            }
        }
    }
    Ok(Value::Object(object))
}

/// The JSON name of element `name` of `definition`: `name` itself or, for a choice element, `name` + the
/// value's type (`value` + `Quantity`).
fn resolve_name(definition: Option<&str>, name: &str, type_suffix: Option<&str>) -> (String, Option<Property>) {
    let Some(definition) = definition else {
        return (name.to_owned(), None);
    };
    if let Some(element) = property(definition, name) {
        return (name.to_owned(), Some(element));
    }
    if let Some(suffix) = type_suffix {
        let choice = format!("{name}{suffix}");
        if let Some(element) = property(definition, &choice) {
            return (choice, Some(element));
        }
    }
    (name.to_owned(), None)
}

/// The schema definition of the value at `location` (`Patient`, `HumanName`, `Patient_Contact`, `string`...).
fn definition_at(document: &Value, location: &[Segment]) -> Option<&'static str> {
    fn resource_definition(node: &Value) -> Option<&'static str> {
        node.get("resourceType").and_then(Value::as_str).and_then(ResourceType::parse).map(|t| t.as_str())
    }
    let mut definition = resource_definition(document)?;
    let mut node = document;
    for segment in location {
        match segment {
            Segment::Key(key) => {
                definition = property(definition, key)?.definition?;
                node = node.get(key)?;
            }
            Segment::Index(index) => node = node.get(index)?,
        }
        if definition == "ResourceList" && node.is_object() {
            definition = resource_definition(node)?;
        }
    }
    Some(definition)
}

fn exactly_one(mut locations: Vec<Location>) -> Result<Location, String> {
    match locations.len() {
        0 => Err("the path matches no element".to_owned()),
        1 => Ok(locations.remove(0)),
        count => Err(format!("the path matches {count} elements; it must match exactly one")),
    }
}

fn apply_operation(document: &mut Value, operation: &Operation, steps: &[Step]) -> Result<(), String> {
    match operation.kind {
        OperationKind::Add => {
            let (Some(name), Some(value)) = (&operation.name, &operation.value) else {
                return Err("add needs a name and a value".to_owned());
            };
            add(document, steps, name, value)
        }
        OperationKind::Insert => {
            let (Some(value), Some(index)) = (&operation.value, operation.index) else {
                return Err("insert needs a value and an index".to_owned());
            };
            insert(document, steps, value, index)
        }
        OperationKind::Delete => delete(document, steps),
        OperationKind::Replace => {
            let Some(value) = &operation.value else {
                return Err("replace needs a value".to_owned());
            };
            replace(document, steps, value)
        }
        OperationKind::Move => {
            let (Some(source), Some(destination)) = (operation.source, operation.destination) else {
                return Err("move needs a source and a destination".to_owned());
            };
            move_item(document, steps, source, destination)
        }
    }
}

fn add(document: &mut Value, steps: &[Step], name: &str, value: &PatchValue) -> Result<(), String> {
    let container = exactly_one(path::evaluate(document, steps))?;
    let definition = definition_at(document, &container);
    let (key, element) = resolve_name(definition, name, value.type_suffix());
    if let (Some(definition), None) = (definition, element) {
        return Err(format!("'{name}' is not an element of {definition}"));
    }
    let built = build_value(value, element.and_then(|e| e.definition))?;
    let Some(Value::Object(object)) = path::get_mut(document, &container) else {
        return Err("elements can only be added to a complex element".to_owned());
    };
    let is_list = element.map_or_else(|| object.get(&key).is_some_and(Value::is_array), |e| e.is_array);
    match object.get_mut(&key) {
        Some(Value::Array(items)) if is_list => items.push(built),
        None if is_list => {
            object.insert(key, Value::Array(vec![built]));
        }
        None => {
            object.insert(key, built);
        }
        Some(_) if is_list => return Err(format!("'{key}' is not a list")),
        Some(_) => return Err(format!("'{key}' already has a value; use replace")),
    }
    Ok(())
}

/// For insert and move: the path's last step must name a list element of exactly one parent.
fn list_parent(document: &Value, steps: &[Step]) -> Result<(Location, String), String> {
    let Some((Step::Child(name), parent_steps)) = steps.split_last() else {
        return Err("the path must end with the name of a list element".to_owned());
    };
    let parent = exactly_one(path::evaluate(document, parent_steps)).map_err(|e| format!("{e} (the list's parent)"))?;
    Ok((parent, name.clone()))
}

fn insert(document: &mut Value, steps: &[Step], value: &PatchValue, index: usize) -> Result<(), String> {
    let (parent, name) = list_parent(document, steps)?;
    let definition = definition_at(document, &parent);
    let element = definition.and_then(|d| property(d, &name));
    match (definition, element) {
        (Some(definition), None) => {
            return Err(format!("'{name}' is not an element of {definition}"));
        }
        (_, Some(element)) if !element.is_array => return Err(format!("'{name}' is not a list")),
        _ => {}
    }
    let built = build_value(value, element.and_then(|e| e.definition))?;
    let Some(Value::Object(object)) = path::get_mut(document, &parent) else {
        return Err("the list's parent is not a complex element".to_owned());
    };
    match object.get_mut(&name) {
        Some(Value::Array(items)) if index <= items.len() => items.insert(index, built),
        Some(Value::Array(items)) => {
            return Err(format!("index {index} is out of range for a list of {}", items.len()));
        }
        None if index == 0 => {
            object.insert(name, Value::Array(vec![built]));
        }
        None => return Err(format!("index {index} is out of range for an empty list")),
        Some(_) => return Err(format!("'{name}' is not a list")),
    }
    Ok(())
}

fn move_item(document: &mut Value, steps: &[Step], source: usize, destination: usize) -> Result<(), String> {
    let (parent, name) = list_parent(document, steps)?;
    let Some(Value::Array(items)) = path::get_mut(document, &parent).and_then(|p| p.get_mut(&name)) else {
        return Err(format!("'{name}' is not a list with items"));
    };
    let len = items.len();
    if source >= len || destination >= len {
        return Err(format!("source {source} or destination {destination} is out of range for a list of {len}"));
    }
    let item = items.remove(source);
    items.insert(destination, item);
    Ok(())
}

fn delete(document: &mut Value, steps: &[Step]) -> Result<(), String> {
    let mut locations = path::evaluate(document, steps);
    let location = match locations.len() {
        0 => return Ok(()),
        1 => locations.remove(0),
        count => {
            return Err(format!("the path matches {count} elements; only one element can be deleted"));
        }
    };
    match location.as_slice() {
        [] => Err("the resource itself cannot be deleted".to_owned()),
        [parent @ .., Segment::Key(key)] => {
            let Some(Value::Object(object)) = path::get_mut(document, parent) else {
                return Err("the element's parent is not a complex element".to_owned());
            };
            object.remove(key);
            object.remove(&format!("_{key}"));
            Ok(())
        }
        [grandparent @ .., Segment::Key(key), Segment::Index(index)] => {
            let Some(Value::Object(object)) = path::get_mut(document, grandparent) else {
                return Err("the list's parent is not a complex element".to_owned());
            };
            let extension_key = format!("_{key}");
            for list_key in [key, &extension_key] {
                if let Some(Value::Array(items)) = object.get_mut(list_key) {
                    if *index < items.len() {
                        items.remove(*index);
                    }
                    if items.iter().all(Value::is_null) {
                        object.remove(list_key);
                    }
                }
            }
            Ok(())
        }
        _ => Err("the path does not designate an element".to_owned()),
    }
}

fn replace(document: &mut Value, steps: &[Step], value: &PatchValue) -> Result<(), String> {
    let location = exactly_one(path::evaluate(document, steps))?;
    let Some((last, parent)) = location.split_last() else {
        return Err("the resource itself cannot be replaced".to_owned());
    };
    // A choice element replaced by a value of another type changes its JSON name (valueString → valueQuantity).
    if let (Segment::Key(key), Some(Step::Child(base)), PatchValue::Typed { type_suffix, .. }) =
        (last, steps.last(), value)
    {
        let renamed = format!("{base}{type_suffix}");
        let parent_definition = definition_at(document, parent);
        if key != base && *key != renamed && parent_definition.and_then(|d| property(d, &renamed)).is_some() {
            let built = build_value(value, None)?;
            let Some(Value::Object(object)) = path::get_mut(document, parent) else {
                return Err("the element's parent is not a complex element".to_owned());
            };
            object.remove(key);
            object.remove(&format!("_{key}"));
            object.insert(renamed, built);
            return Ok(());
        }
    }
    let built = build_value(value, definition_at(document, &location))?;
    let Some(slot) = path::get_mut(document, &location) else {
        return Err("the path matches no element".to_owned());
    };
    *slot = built;
    Ok(())
}

#[cfg(test)]
mod tests;
