//! A StructureDefinition snapshot as a tree of element constraints.

use std::collections::HashMap;

use serde_json::Value;

/// What a snapshot says about one element (or one slice of it).
#[derive(Debug, Clone, Default)]
pub(crate) struct Node {
    /// The element's name in its parent: `identifier`, `value[x]`.
    pub name: String,
    /// Set on the node of a slice: its name.
    pub slice_name: Option<String>,
    pub min: u64,
    /// `None`: unbounded (`*`).
    pub max: Option<u64>,
    pub types: Vec<TypeRef>,
    pub fixed: Option<Value>,
    pub pattern: Option<Value>,
    /// A `required` binding: the value set's canonical URL.
    pub required_binding: Option<String>,
    pub slicing: Option<Slicing>,
    pub children: Vec<Node>,
    /// The slices of this element, each a node of its own (with the slice's constraints).
    pub slices: Vec<Node>,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct TypeRef {
    pub code: String,
    /// Profiles the value must conform to (one of them).
    pub profiles: Vec<String>,
}

#[derive(Debug, Clone)]
pub(crate) struct Slicing {
    pub discriminators: Vec<Discriminator>,
    /// Values matching no slice are an error.
    pub closed: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct Discriminator {
    pub kind: DiscriminatorKind,
    /// A FHIRPath of simple steps from the sliced element (`$this`, `code`, `coding.system`).
    pub path: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DiscriminatorKind {
    Value,
    Pattern,
    Exists,
    Type,
    Profile,
}

impl Node {
    pub fn is_choice(&self) -> bool {
        self.name.ends_with("[x]")
    }

    pub fn child(&self, name: &str) -> Option<&Node> {
        self.children.iter().find(|c| c.name == name)
    }

    /// The node a path of simple steps leads to (`[]`: this one). Choice elements are reached by
    /// their `[x]` name or a typed one (`valueCoding` → `value[x]`).
    pub fn descendant(&self, path: &[String]) -> Option<&Node> {
        let Some((first, rest)) = path.split_first() else { return Some(self) };
        let child = self.child(first).or_else(|| {
            self.children
                .iter()
                .find(|c| c.is_choice() && first.strip_prefix(c.name.trim_end_matches("[x]")).is_some_and(starts_upper))
        })?;
        child.descendant(rest)
    }
}

pub(crate) fn starts_upper(s: &str) -> bool {
    s.chars().next().is_some_and(char::is_uppercase)
}

/// Builds the tree of a snapshot; says why it cannot.
pub(crate) fn compile(definition: &Value) -> Result<Node, String> {
    let elements = definition["snapshot"]["element"]
        .as_array()
        .filter(|e| !e.is_empty())
        .ok_or("it has no snapshot (a differential alone is not validated against)")?;
    let mut nodes: Vec<Node> = Vec::with_capacity(elements.len());
    // Element id → index in `nodes`; the parent of each node (a slice's parent is the sliced
    // element), to assemble the tree at the end.
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut parents: Vec<Option<(usize, bool)>> = Vec::with_capacity(elements.len());
    for (i, element) in elements.iter().enumerate() {
        let id = element_id(element).ok_or_else(|| format!("snapshot element {i} has neither an id nor a path"))?;
        let (parent, name, slice) = split_id(&id);
        let parent_link = match (parent, slice) {
            (None, _) if i == 0 => None,
            (None, _) => return Err(format!("snapshot element {id} is a second root")),
            (Some(parent), None) => Some((*index.get(parent).ok_or_else(|| orphan(&id, parent))?, false)),
            (Some(parent), Some(_)) => {
                let sliced = format!("{parent}.{name}");
                Some((*index.get(&sliced).ok_or_else(|| orphan(&id, &sliced))?, true))
            }
        };
        if i == 0 && parent_link.is_some() {
            return Err(format!("the first snapshot element {id} is not the root"));
        }
        index.insert(id.clone(), nodes.len());
        parents.push(parent_link);
        let mut node = node_of(element, &id, name.to_owned())?;
        node.slice_name = slice.map(str::to_owned);
        nodes.push(node);
    }
    // Children after parents in a snapshot: attach from the last up.
    for i in (1..nodes.len()).rev() {
        let node = std::mem::take(&mut nodes[i]);
        if let Some((parent, is_slice)) = parents[i] {
            if is_slice {
                nodes[parent].slices.insert(0, node);
            } else {
                nodes[parent].children.insert(0, node);
            }
        }
    }
    Ok(nodes.swap_remove(0))
}

fn orphan(id: &str, parent: &str) -> String {
    format!("snapshot element {id} comes before (or without) its parent {parent}")
}

/// The element id; older snapshots without ids get one from the path and slice name.
fn element_id(element: &Value) -> Option<String> {
    if let Some(id) = element["id"].as_str() {
        return Some(id.to_owned());
    }
    let path = element["path"].as_str()?;
    Some(match element["sliceName"].as_str() {
        Some(slice) => format!("{path}:{slice}"),
        None => path.to_owned(),
    })
}

/// `Patient.identifier:mrn.system` → (`Some("Patient.identifier:mrn")`, `system`, `None`);
/// `Patient.identifier:mrn` → (`Some("Patient")`, `identifier`, `Some("mrn")`).
fn split_id(id: &str) -> (Option<&str>, &str, Option<&str>) {
    let (parent, last) = match id.rsplit_once('.') {
        Some((parent, last)) => (Some(parent), last),
        None => (None, id),
    };
    match last.split_once(':') {
        Some((name, slice)) => (parent, name, Some(slice)),
        None => (parent, last, None),
    }
}

fn node_of(element: &Value, id: &str, name: String) -> Result<Node, String> {
    let min = element["min"].as_u64().unwrap_or(0);
    let max = match element["max"].as_str() {
        None | Some("*") => None,
        Some(max) => Some(max.parse().map_err(|_| format!("snapshot element {id} has max {max:?}"))?),
    };
    let types = element["type"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| {
            Some(TypeRef {
                code: t["code"].as_str()?.to_owned(),
                profiles: t["profile"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|p| p.as_str().map(str::to_owned))
                    .collect(),
            })
        })
        .collect();
    let prefixed = |prefix: &str| {
        element.as_object().and_then(|o| {
            o.iter().find(|(k, _)| k.strip_prefix(prefix).is_some_and(starts_upper)).map(|(_, v)| v.clone())
        })
    };
    let required_binding = match (&element["binding"]["strength"], element["binding"]["valueSet"].as_str()) {
        (Value::String(strength), Some(value_set)) if strength == "required" => Some(value_set.to_owned()),
        _ => None,
    };
    let slicing = match element.get("slicing") {
        None => None,
        Some(slicing) => Some(Slicing {
            discriminators: slicing["discriminator"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|d| discriminator(id, d))
                .collect::<Result<_, _>>()?,
            closed: slicing["rules"] == "closed",
        }),
    };
    Ok(Node {
        name,
        slice_name: None,
        min,
        max,
        types,
        fixed: prefixed("fixed"),
        pattern: prefixed("pattern"),
        required_binding,
        slicing,
        children: Vec::new(),
        slices: Vec::new(),
    })
}

fn discriminator(id: &str, d: &Value) -> Result<Discriminator, String> {
    let kind = match d["type"].as_str() {
        Some("value") => DiscriminatorKind::Value,
        Some("pattern") => DiscriminatorKind::Pattern,
        Some("exists") => DiscriminatorKind::Exists,
        Some("type") => DiscriminatorKind::Type,
        Some("profile") => DiscriminatorKind::Profile,
        other => return Err(format!("the slicing of {id} has a discriminator of type {other:?}")),
    };
    let path = d["path"].as_str().unwrap_or("$this");
    let steps: Vec<String> = path.split('.').filter(|s| *s != "$this").map(str::to_owned).collect();
    Ok(Discriminator { kind, path: steps })
}
