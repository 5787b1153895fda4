//! One validation walk: a resource (or a value) against a compiled profile tree.

use fhirmesh_fhir::outcome::{Issue, IssueType};
use serde_json::{Map, Value};

use super::compile::{Discriminator, DiscriminatorKind, Node, Slicing, starts_upper};
use super::{Validator, warning};

/// Profiles reach other profiles (extensions, data types, slices by profile); deeper than this
/// is taken for a cycle and not followed.
const MAX_DEPTH: usize = 8;

/// The FHIR primitive types: a choice element's JSON suffix names them capitalised
/// (`valueDateTime`), their type code is not (`dateTime`).
const PRIMITIVES: &[&str] = &[
    "base64Binary",
    "boolean",
    "canonical",
    "code",
    "date",
    "dateTime",
    "decimal",
    "id",
    "instant",
    "integer",
    "markdown",
    "oid",
    "positiveInt",
    "string",
    "time",
    "unsignedInt",
    "uri",
    "url",
    "uuid",
    "xhtml",
];

/// A value in the instance: where it is (FHIRPath) and, for a choice element, its type.
#[derive(Debug, Clone)]
pub(super) struct Item<'v> {
    value: &'v Value,
    path: String,
    type_code: Option<String>,
}

pub(super) struct Check<'a> {
    validator: &'a Validator,
    profile: &'a str,
    issues: Vec<Issue>,
    depth: usize,
}

impl<'a> Check<'a> {
    pub(super) fn new(validator: &'a Validator, profile: &'a str) -> Check<'a> {
        Check { validator, profile, issues: Vec::new(), depth: 0 }
    }

    pub(super) fn into_issues(self) -> Vec<Issue> {
        self.issues
    }

    fn full(&self) -> bool {
        self.issues.len() >= fhirmesh_fhir::validate::MAX_ISSUES
    }

    fn error(&mut self, code: IssueType, path: &str, diagnostics: String) {
        let profile = self.profile;
        self.issues.push(Issue::error(code, format!("{diagnostics} (profile {profile})")).at(path));
    }

    pub(super) fn resource(&mut self, root: &Node, resource: &'a Value, resource_type: &str) {
        let item = Item { value: resource, path: resource_type.to_owned(), type_code: None };
        self.value(root, &item);
    }

    /// The values an element has in one parent: their count, each value, their slices.
    fn element(&mut self, node: &Node, items: &[Item<'_>], location: &str) {
        if self.full() {
            return;
        }
        let what = match &node.slice_name {
            Some(slice) => format!("slice '{slice}' of {location}"),
            None => location.to_owned(),
        };
        let count = items.len() as u64;
        if count < node.min {
            self.error(IssueType::Required, location, format!("{what}: at least {} required, found {count}", node.min));
        }
        if let Some(max) = node.max
            && count > max
        {
            let diagnostics = if max == 0 {
                format!("{what}: not allowed here, found {count}")
            } else {
                format!("{what}: at most {max} allowed, found {count}")
            };
            self.error(IssueType::Structure, location, diagnostics);
        }
        for item in items {
            self.value(node, item);
        }
        if let Some(slicing) = &node.slicing {
            self.slices(node, slicing, items, location);
        }
    }

    /// One value against its element's constraints, then its children.
    fn value(&mut self, node: &Node, item: &Item<'_>) {
        if self.full() {
            return;
        }
        let type_code = item.type_code.clone().or_else(|| match node.types.as_slice() {
            [only] => Some(only.code.clone()),
            _ => None,
        });
        if let (true, Some(found)) = (node.is_choice() && !node.types.is_empty(), &item.type_code)
            && !node.types.iter().any(|t| &t.code == found)
        {
            let allowed: Vec<&str> = node.types.iter().map(|t| t.code.as_str()).collect();
            self.error(
                IssueType::Structure,
                &item.path,
                format!("type {found} is not allowed here; allowed: {}", allowed.join(", ")),
            );
            return;
        }
        if let Some(fixed) = &node.fixed
            && !equal(item.value, fixed)
        {
            self.error(IssueType::Value, &item.path, format!("must be exactly {}", clip(fixed)));
        }
        if let Some(pattern) = &node.pattern
            && !contains(item.value, pattern)
        {
            self.error(IssueType::Value, &item.path, format!("must match the pattern {}", clip(pattern)));
        }
        if let Some(value_set) = &node.required_binding {
            self.binding(value_set, item);
        }
        if let Some(code) = &type_code {
            self.type_profiles(node, code, item);
        }
        // Every extension is checked against its definition when that is loaded (once: on the
        // sliced element, not again on the slice it matched).
        if node.slice_name.is_none()
            && matches!(node.name.as_str(), "extension" | "modifierExtension")
            && let Some(url) = item.value["url"].as_str()
            && let Some(definition) = self.validator.profile(url)
            && definition.constrained == "Extension"
        {
            self.nested(&definition.root, &definition.url, item);
        }
        if let Some(object) = item.value.as_object() {
            for child in &node.children {
                let items = gather(object, child, &node.children, &item.path);
                let location = format!("{}.{}", item.path, child.name.trim_end_matches("[x]"));
                self.element(child, &items, &location);
            }
        }
    }

    /// A value whose type names profiles must conform to one of them (those that are loaded).
    fn type_profiles(&mut self, node: &Node, code: &str, item: &Item<'_>) {
        let Some(declared) = node.types.iter().find(|t| t.code == code) else { return };
        if code == "Extension" || declared.profiles.is_empty() {
            return; // extensions are checked by their url
        }
        let loaded: Vec<&super::Profile> =
            declared.profiles.iter().filter_map(|url| self.validator.profile(url)).collect();
        let mut first_failure = None;
        for profile in &loaded {
            let issues = self.sub_check(&profile.root, &profile.url, item);
            if !issues.iter().any(is_error) {
                self.issues.extend(issues);
                return;
            }
            first_failure.get_or_insert(issues);
        }
        if let Some(issues) = first_failure {
            self.issues.extend(issues);
        }
    }

    /// `item` against another profile's root, into this walk's issues.
    fn nested(&mut self, root: &Node, url: &str, item: &Item<'_>) {
        let issues = self.sub_check(root, url, item);
        self.issues.extend(issues);
    }

    fn sub_check(&self, root: &Node, url: &str, item: &Item<'_>) -> Vec<Issue> {
        if self.depth >= MAX_DEPTH {
            return Vec::new();
        }
        let mut sub = Check { validator: self.validator, profile: url, issues: Vec::new(), depth: self.depth + 1 };
        sub.value(root, item);
        sub.issues
    }

    fn binding(&mut self, value_set: &str, item: &Item<'_>) {
        let expansion = match self.validator.terminology.expansion(value_set) {
            Ok(expansion) => expansion,
            Err(_) if value_set.starts_with("http://hl7.org/fhir/ValueSet/") => return,
            Err(why) => {
                let profile = self.profile;
                self.issues.push(
                    warning(IssueType::Informational, format!("binding not checked: {why} (profile {profile})"))
                        .at(&item.path),
                );
                return;
            }
        };
        let value = item.value;
        let in_set = match value {
            Value::String(code) => expansion.contains(None, code),
            Value::Object(object) if object.contains_key("coding") || object.contains_key("text") => {
                let codings = object.get("coding").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
                codings.iter().any(|c| coding_in(expansion, c))
            }
            Value::Object(object) if object.contains_key("code") => coding_in(expansion, value),
            _ => return,
        };
        if !in_set {
            let found = match value {
                Value::String(code) => format!("code '{}'", clip_str(code)),
                _ => clip(value),
            };
            self.error(
                IssueType::Value,
                &item.path,
                format!("{found} is not in the value set {value_set}, which the binding requires"),
            );
        }
    }

    /// Assigns each value to the slice its discriminators select, then checks each slice.
    fn slices(&mut self, node: &Node, slicing: &Slicing, items: &[Item<'_>], location: &str) {
        let assignable = !slicing.discriminators.is_empty()
            && slicing.discriminators.iter().all(|d| d.path.iter().all(|step| !step.contains('(')));
        if !assignable {
            return;
        }
        let mut matched: Vec<Vec<Item<'_>>> = vec![Vec::new(); node.slices.len()];
        for item in items {
            let slice = node.slices.iter().position(|slice| {
                slicing.discriminators.iter().all(|d| self.discriminates(d, slice, item) == Some(true))
            });
            match slice {
                Some(i) => matched[i].push(item.clone()),
                None if slicing.closed => {
                    let names: Vec<&str> = node.slices.iter().filter_map(|s| s.slice_name.as_deref()).collect();
                    self.error(
                        IssueType::Structure,
                        &item.path,
                        format!("matches none of the slices ({}) and the slicing is closed", names.join(", ")),
                    );
                }
                None => {}
            }
        }
        for (slice, items) in node.slices.iter().zip(&matched) {
            self.element(slice, items, location);
        }
    }

    /// Whether `item` belongs to `slice` by one discriminator (`None`: the slice does not say).
    fn discriminates(&self, d: &Discriminator, slice: &Node, item: &Item<'_>) -> Option<bool> {
        let target = slice.descendant(&d.path);
        let found = navigate(item, &d.path);
        match d.kind {
            DiscriminatorKind::Value | DiscriminatorKind::Pattern => {
                let (expected, exact) = match target {
                    Some(Node { fixed: Some(fixed), .. }) => (fixed.clone(), true),
                    Some(Node { pattern: Some(pattern), .. }) => (pattern.clone(), false),
                    // An extension slice often says its url only as its type's profile.
                    _ if d.path == ["url"] => (Value::String(extension_profile(slice)?.to_owned()), true),
                    _ => return None,
                };
                Some(found.iter().any(|f| if exact { equal(f.value, &expected) } else { contains(f.value, &expected) }))
            }
            DiscriminatorKind::Exists => {
                let target = target?;
                let exists = !found.is_empty();
                if target.min >= 1 {
                    Some(exists)
                } else if target.max == Some(0) {
                    Some(!exists)
                } else {
                    None
                }
            }
            DiscriminatorKind::Type => {
                let target = target?;
                Some(found.iter().any(|f| {
                    let code = f.type_code.clone().or_else(|| guess_type(f.value));
                    code.is_some_and(|code| target.types.iter().any(|t| t.code == code))
                }))
            }
            DiscriminatorKind::Profile => {
                let target = target?;
                let profiles: Vec<&super::Profile> = target
                    .types
                    .iter()
                    .flat_map(|t| &t.profiles)
                    .filter_map(|url| self.validator.profile(url))
                    .collect();
                if profiles.is_empty() {
                    return None;
                }
                Some(
                    found
                        .iter()
                        .any(|f| profiles.iter().any(|p| !self.sub_check(&p.root, &p.url, f).iter().any(is_error))),
                )
            }
        }
    }
}

fn is_error(issue: &Issue) -> bool {
    matches!(issue.severity, fhirmesh_fhir::outcome::Severity::Error | fhirmesh_fhir::outcome::Severity::Fatal)
}

fn extension_profile(slice: &Node) -> Option<&str> {
    slice.types.iter().find(|t| t.code == "Extension")?.profiles.first().map(String::as_str)
}

/// The values `child` has in `parent` (an array's elements each on its own, a choice element by
/// whichever typed name is present — not a sibling element whose name only starts like it, such
/// as `participantEffectiveDescription` beside `participantEffective[x]`; a primitive that has
/// only `_name` still counts).
fn gather<'v>(parent: &'v Map<String, Value>, child: &Node, siblings: &[Node], path: &str) -> Vec<Item<'v>> {
    let mut out = Vec::new();
    if child.is_choice() {
        let prefix = child.name.trim_end_matches("[x]");
        for (key, value) in parent {
            if let Some(suffix) = key.strip_prefix(prefix)
                && starts_upper(suffix)
                && !siblings.iter().any(|sibling| sibling.name == *key)
            {
                push_values(&mut out, value, &format!("{path}.{key}"), Some(type_code(suffix)));
            }
        }
        return out;
    }
    if let Some(value) = parent.get(&child.name).or_else(|| parent.get(&format!("_{}", child.name))) {
        push_values(&mut out, value, &format!("{path}.{}", child.name), None);
    }
    out
}

fn push_values<'v>(out: &mut Vec<Item<'v>>, value: &'v Value, path: &str, type_code: Option<String>) {
    match value {
        Value::Array(values) => out.extend(values.iter().enumerate().map(|(i, value)| Item {
            value,
            path: format!("{path}[{i}]"),
            type_code: type_code.clone(),
        })),
        value => out.push(Item { value, path: path.to_owned(), type_code }),
    }
}

/// The type code a choice element's JSON suffix stands for: `DateTime` → `dateTime`,
/// `Quantity` → `Quantity`.
fn type_code(suffix: &str) -> String {
    let mut chars = suffix.chars();
    let lowered: String = chars.next().map(|c| c.to_ascii_lowercase()).into_iter().chain(chars).collect();
    if PRIMITIVES.contains(&lowered.as_str()) { lowered } else { suffix.to_owned() }
}

/// The values at a discriminator path below `item` (steps of element names; choice elements by
/// their name without `[x]`).
fn navigate<'v>(item: &Item<'v>, steps: &[String]) -> Vec<Item<'v>> {
    let mut current = vec![item.clone()];
    for step in steps {
        let mut next = Vec::new();
        for item in &current {
            let Some(object) = item.value.as_object() else { continue };
            let step = step.trim_end_matches("[x]");
            match object.get(step) {
                Some(value) => push_values(&mut next, value, &format!("{}.{step}", item.path), None),
                None => {
                    for (key, value) in object {
                        if let Some(suffix) = key.strip_prefix(step)
                            && starts_upper(suffix)
                        {
                            push_values(&mut next, value, &format!("{}.{key}", item.path), Some(type_code(suffix)));
                        }
                    }
                }
            }
        }
        current = next;
    }
    current
}

/// A type for a value that is not a choice (only what a type discriminator can tell apart).
fn guess_type(value: &Value) -> Option<String> {
    match value {
        Value::Bool(_) => Some("boolean".into()),
        Value::String(_) => Some("string".into()),
        Value::Object(object) => object.get("resourceType").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

fn coding_in(expansion: &crate::terminology::Expansion, coding: &Value) -> bool {
    match coding["code"].as_str() {
        Some(code) => expansion.contains(coding["system"].as_str(), code),
        None => false,
    }
}

/// Fixed values: exactly equal (numbers by value: a fixed `1.0` is the instance's `1`).
fn equal(actual: &Value, expected: &Value) -> bool {
    match (actual, expected) {
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        (Value::Array(a), Value::Array(b)) => a.len() == b.len() && a.iter().zip(b).all(|(a, b)| equal(a, b)),
        (Value::Object(a), Value::Object(b)) => {
            a.len() == b.len() && a.iter().all(|(k, v)| b.get(k).is_some_and(|w| equal(v, w)))
        }
        _ => actual == expected,
    }
}

/// Pattern values: everything the pattern says is in the instance (which may say more); each
/// element of a pattern array matches some element of the instance's.
fn contains(actual: &Value, pattern: &Value) -> bool {
    match (actual, pattern) {
        (Value::Object(a), Value::Object(p)) => p.iter().all(|(k, v)| a.get(k).is_some_and(|w| contains(w, v))),
        (Value::Array(a), Value::Array(p)) => p.iter().all(|v| a.iter().any(|w| contains(w, v))),
        (actual, Value::Array(p)) => p.iter().all(|v| contains(actual, v)),
        _ => equal(actual, pattern),
    }
}

fn clip(value: &Value) -> String {
    fhirmesh_fhir::outcome::clip(&value.to_string())
}

fn clip_str(text: &str) -> String {
    fhirmesh_fhir::outcome::clip(text)
}
