//! Value sets over the loaded packages: what required bindings are checked against.
//!
//! A value set is enumerable when it has an `expansion`, or when its `compose` includes listed
//! concepts, whole code systems that are loaded (with their concepts: `content` complete or
//! fragment), or other enumerable value sets — minus what it excludes the same way. Filters
//! (`is-a`, regexes, …) and code systems that are not loaded make it not enumerable: a binding to
//! it cannot be checked here, and [`Terminology::expansion`] says why.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use serde_json::Value;

use crate::IgSet;

/// Value sets nest through `compose.include.valueSet`; deeper than this is taken for a cycle.
const MAX_DEPTH: usize = 16;

/// One code of an expansion.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Concept {
    pub system: String,
    pub code: String,
    pub display: Option<String>,
}

/// The codes of an enumerable value set.
#[derive(Debug, Clone, Default)]
pub struct Expansion {
    concepts: Vec<Concept>,
    /// (system, code) → index in `concepts`.
    index: HashMap<(String, String), usize>,
    /// code → how many systems define it in this expansion.
    codes: HashMap<String, usize>,
}

impl Expansion {
    fn from_concepts(concepts: impl IntoIterator<Item = Concept>) -> Expansion {
        let mut unique: BTreeMap<(String, String), Concept> = BTreeMap::new();
        for concept in concepts {
            unique.entry((concept.system.clone(), concept.code.clone())).or_insert(concept);
        }
        let concepts: Vec<Concept> = unique.into_values().collect();
        let mut expansion = Expansion { index: HashMap::new(), codes: HashMap::new(), concepts: Vec::new() };
        for (i, concept) in concepts.iter().enumerate() {
            expansion.index.insert((concept.system.clone(), concept.code.clone()), i);
            *expansion.codes.entry(concept.code.clone()).or_default() += 1;
        }
        expansion.concepts = concepts;
        expansion
    }

    pub fn concepts(&self) -> &[Concept] {
        &self.concepts
    }

    /// Whether the expansion holds `code` of `system`; without a system, `code` of any system.
    pub fn contains(&self, system: Option<&str>, code: &str) -> bool {
        match system {
            Some(system) => self.index.contains_key(&(system.to_owned(), code.to_owned())),
            None => self.codes.contains_key(code),
        }
    }
}

/// The value sets and code systems of an [`IgSet`], expanded where they can be.
#[derive(Debug, Default)]
pub struct Terminology {
    /// Value set canonical URL → its expansion, or why it has none.
    value_sets: HashMap<String, Result<Arc<Expansion>, String>>,
    /// Code system canonical URL → its concepts, or why they are not here.
    code_systems: HashMap<String, Result<Vec<Concept>, String>>,
}

impl Terminology {
    /// Expands every value set of `set` that can be.
    pub fn new(set: &IgSet) -> Terminology {
        let mut code_systems = HashMap::new();
        for system in set.of_type("CodeSystem") {
            if let Some(url) = system["url"].as_str() {
                code_systems.insert(url.to_owned(), code_system_concepts(url, system));
            }
        }
        let definitions: HashMap<&str, &Value> =
            set.of_type("ValueSet").filter_map(|vs| Some((vs["url"].as_str()?, vs))).collect();
        let mut terminology = Terminology { value_sets: HashMap::new(), code_systems };
        for url in definitions.keys() {
            let expansion = terminology.expand(url, &definitions, 0);
            terminology.value_sets.insert((*url).to_owned(), expansion);
        }
        terminology
    }

    /// The expansion of the value set `url` (`url|version` accepted, the version ignored: one
    /// version of each canonical is loaded), or why there is none.
    pub fn expansion(&self, url: &str) -> Result<&Expansion, String> {
        let bare = url.split_once('|').map_or(url, |(bare, _)| bare);
        match self.value_sets.get(bare) {
            Some(Ok(expansion)) => Ok(expansion),
            Some(Err(why)) => Err(why.clone()),
            None => Err(format!("value set {bare} is not loaded")),
        }
    }

    fn expand(&self, url: &str, definitions: &HashMap<&str, &Value>, depth: usize) -> Result<Arc<Expansion>, String> {
        if let Some(done) = self.value_sets.get(url) {
            return done.clone();
        }
        if depth > MAX_DEPTH {
            return Err(format!("value set {url} includes value sets {MAX_DEPTH} levels deep (a cycle?)"));
        }
        let Some(definition) = definitions.get(url) else {
            return Err(format!("value set {url} is not loaded"));
        };
        if let Some(contains) = definition["expansion"]["contains"].as_array() {
            let mut concepts = Vec::new();
            flatten_contains(contains, &mut concepts);
            return Ok(Arc::new(Expansion::from_concepts(concepts)));
        }
        let compose = &definition["compose"];
        if !compose.is_object() {
            return Err(format!("value set {url} has neither an expansion nor a compose"));
        }
        let mut included = Vec::new();
        for include in compose["include"].as_array().into_iter().flatten() {
            included.extend(self.selection(url, include, definitions, depth)?);
        }
        let mut excluded = HashSet::new();
        for exclude in compose["exclude"].as_array().into_iter().flatten() {
            for concept in self.selection(url, exclude, definitions, depth)? {
                excluded.insert((concept.system, concept.code));
            }
        }
        included.retain(|c| !excluded.contains(&(c.system.clone(), c.code.clone())));
        Ok(Arc::new(Expansion::from_concepts(included)))
    }

    /// The concepts one `compose.include` (or `exclude`) selects.
    fn selection(
        &self,
        url: &str,
        include: &Value,
        definitions: &HashMap<&str, &Value>,
        depth: usize,
    ) -> Result<Vec<Concept>, String> {
        if include["filter"].as_array().is_some_and(|f| !f.is_empty()) {
            return Err(format!("value set {url} selects codes with a filter, which is not expanded here"));
        }
        let system = include["system"].as_str();
        let mut selected: Option<Vec<Concept>> = match (system, include["concept"].as_array()) {
            (Some(system), Some(listed)) => Some(
                listed
                    .iter()
                    .filter_map(|c| {
                        Some(Concept {
                            system: system.to_owned(),
                            code: c["code"].as_str()?.to_owned(),
                            display: c["display"].as_str().map(str::to_owned),
                        })
                    })
                    .collect(),
            ),
            (Some(system), None) => match self.code_systems.get(system) {
                Some(Ok(concepts)) => Some(concepts.clone()),
                Some(Err(why)) => return Err(format!("value set {url} includes all of {system}, but {why}")),
                None => {
                    return Err(format!("value set {url} includes all of code system {system}, which is not loaded"));
                }
            },
            (None, _) => None,
        };
        // Included value sets intersect with each other and with the system's selection.
        for nested in include["valueSet"].as_array().into_iter().flatten() {
            let Some(nested) = nested.as_str() else { continue };
            let bare = nested.split_once('|').map_or(nested, |(bare, _)| bare);
            let expansion = self.expand(bare, definitions, depth + 1)?;
            selected = Some(match selected {
                None => expansion.concepts.clone(),
                Some(so_far) => so_far.into_iter().filter(|c| expansion.contains(Some(&c.system), &c.code)).collect(),
            });
        }
        selected.ok_or_else(|| format!("value set {url} has an include with neither a system nor a value set"))
    }
}

fn flatten_contains(contains: &[Value], out: &mut Vec<Concept>) {
    for entry in contains {
        if let (Some(system), Some(code)) = (entry["system"].as_str(), entry["code"].as_str())
            && entry["abstract"] != true
        {
            out.push(Concept {
                system: system.to_owned(),
                code: code.to_owned(),
                display: entry["display"].as_str().map(str::to_owned),
            });
        }
        if let Some(nested) = entry["contains"].as_array() {
            flatten_contains(nested, out);
        }
    }
}

/// Every concept a code system defines (nested ones included), when it carries them.
fn code_system_concepts(url: &str, system: &Value) -> Result<Vec<Concept>, String> {
    match system["content"].as_str() {
        Some("complete") | Some("fragment") | None => {}
        Some(content) => return Err(format!("code system {url} is loaded without its concepts (content {content})")),
    }
    fn walk(url: &str, concepts: &[Value], out: &mut Vec<Concept>) {
        for concept in concepts {
            if let Some(code) = concept["code"].as_str() {
                out.push(Concept {
                    system: url.to_owned(),
                    code: code.to_owned(),
                    display: concept["display"].as_str().map(str::to_owned),
                });
            }
            if let Some(nested) = concept["concept"].as_array() {
                walk(url, nested, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(url, system["concept"].as_array().map(Vec::as_slice).unwrap_or_default(), &mut out);
    Ok(out)
}
