//! The base R4 SearchParameters (1,375 definitions from `Bundle-searchParams.json`), and those of
//! the Implementation Guides the process loads ([`install_extensions`]), looked up by resource
//! type and code.

use std::collections::HashMap;
use std::sync::OnceLock;

use serde::Deserialize;

use crate::ResourceType;

static SEARCH_PARAMS_JSON: &str = include_str!("../../data/search_params.json");

/// `SearchParameter.type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParamType {
    Number,
    Date,
    String,
    Token,
    Reference,
    Composite,
    Quantity,
    Uri,
    Special,
}

impl ParamType {
    pub fn as_str(self) -> &'static str {
        match self {
            ParamType::Number => "number",
            ParamType::Date => "date",
            ParamType::String => "string",
            ParamType::Token => "token",
            ParamType::Reference => "reference",
            ParamType::Composite => "composite",
            ParamType::Quantity => "quantity",
            ParamType::Uri => "uri",
            ParamType::Special => "special",
        }
    }
}

/// One component of a composite parameter.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Component {
    /// Canonical URL of the component's own SearchParameter.
    pub definition: String,
    /// FHIRPath relative to the composite's expression result.
    pub expression: String,
}

/// One SearchParameter definition, as derived from the spec.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SearchParamDef {
    pub url: String,
    pub code: String,
    /// Resource types (or `Resource`/`DomainResource`) it applies to.
    pub base: Vec<String>,
    #[serde(rename = "type")]
    pub kind: ParamType,
    /// FHIRPath; may cover several base types joined with `|`. Absent for `_text`, `_content`, `_query`.
    #[serde(default)]
    pub expression: Option<String>,
    /// Allowed target types of a reference parameter (may contain `Resource` = any).
    #[serde(default)]
    pub target: Vec<String>,
    #[serde(default)]
    pub component: Vec<Component>,
    #[serde(default)]
    pub modifier: Vec<String>,
    #[serde(default)]
    pub comparator: Vec<String>,
}

impl SearchParamDef {
    /// Target resource types of a reference parameter; all types when it targets `Resource`.
    pub fn target_types(&self) -> Vec<ResourceType> {
        if self.target.iter().any(|t| t == "Resource") {
            return ResourceType::all().to_vec();
        }
        self.target.iter().filter_map(|t| ResourceType::parse(t)).collect()
    }
}

/// Lookup of search parameters by resource type and code.
pub struct Registry {
    definitions: Vec<SearchParamDef>,
    by_type: HashMap<ResourceType, HashMap<String, usize>>,
    by_url: HashMap<String, usize>,
}

/// Types that are not DomainResources (no `text`, `contained`, `extension`).
const NOT_DOMAIN_RESOURCES: [&str; 3] = ["Binary", "Bundle", "Parameters"];

impl Registry {
    /// The base definitions, then `extensions` (an extension with the code of a base parameter of
    /// the same type replaces it there).
    fn load(extensions: &[SearchParamDef]) -> Registry {
        let mut definitions: Vec<SearchParamDef> =
            serde_json::from_str(SEARCH_PARAMS_JSON).expect("data/search_params.json is generated, valid JSON");
        definitions.extend(extensions.iter().cloned());
        let mut by_type: HashMap<ResourceType, HashMap<String, usize>> = HashMap::new();
        let mut by_url = HashMap::new();
        for (index, def) in definitions.iter().enumerate() {
            by_url.insert(def.url.clone(), index);
            for base in &def.base {
                let types: Vec<ResourceType> = match base.as_str() {
                    "Resource" => ResourceType::all().to_vec(),
                    "DomainResource" => ResourceType::all()
                        .iter()
                        .copied()
                        .filter(|t| !NOT_DOMAIN_RESOURCES.contains(&t.as_str()))
                        .collect(),
                    other => ResourceType::parse(other).into_iter().collect(),
                };
                for rt in types {
                    by_type.entry(rt).or_default().insert(def.code.clone(), index);
                }
            }
        }
        Registry { definitions, by_type, by_url }
    }

    /// The parameter `code` of `resource_type` (including the `Resource`-level ones like `_id`).
    pub fn get(&self, resource_type: ResourceType, code: &str) -> Option<&SearchParamDef> {
        self.by_type.get(&resource_type)?.get(code).map(|&i| &self.definitions[i])
    }

    /// Every parameter of `resource_type`, sorted by code.
    pub fn for_type(&self, resource_type: ResourceType) -> Vec<&SearchParamDef> {
        let mut out: Vec<&SearchParamDef> = self
            .by_type
            .get(&resource_type)
            .map(|m| m.values().map(|&i| &self.definitions[i]).collect())
            .unwrap_or_default();
        out.sort_by(|a, b| a.code.cmp(&b.code));
        out
    }

    pub fn by_url(&self, url: &str) -> Option<&SearchParamDef> {
        self.by_url.get(url).map(|&i| &self.definitions[i])
    }

    /// Every definition.
    pub fn all(&self) -> &[SearchParamDef] {
        &self.definitions
    }
}

static REGISTRY: OnceLock<Registry> = OnceLock::new();
static EXTENSIONS: OnceLock<Vec<SearchParamDef>> = OnceLock::new();
static BASE: OnceLock<Registry> = OnceLock::new();

/// The base R4 definitions alone: what extensions are checked against before they are installed.
pub(crate) fn base_registry() -> &'static Registry {
    BASE.get_or_init(|| Registry::load(&[]))
}

/// The search parameter registry: the base R4 definitions and the installed extensions (built on
/// first use).
pub fn registry() -> &'static Registry {
    REGISTRY.get_or_init(|| Registry::load(EXTENSIONS.get().map_or(&[], Vec::as_slice)))
}

/// Adds `definitions` (the SearchParameters of the loaded Implementation Guides) to the registry:
/// searchable, extracted on every write, in the CapabilityStatement. Once per process, before the
/// registry is first used (a server installs them at start). Refuses definitions that cannot
/// work, each reason with its canonical URL: no code, a base that is not a resource type, an
/// expression (or a composite's component) the extractor cannot evaluate.
pub fn install_extensions(definitions: Vec<SearchParamDef>) -> Result<(), Vec<String>> {
    let mut errors = Vec::new();
    for def in &definitions {
        if def.code.is_empty() || def.code.starts_with('_') || def.code.contains(['.', ':', '=', ' ']) {
            errors.push(format!("{}: code {:?} cannot be a search parameter name", def.url, def.code));
        }
        let bases: Vec<ResourceType> = def.base.iter().filter_map(|b| ResourceType::parse(b)).collect();
        if bases.is_empty() || bases.len() != def.base.len() {
            errors.push(format!("{}: base {:?} names no resource type (or an unknown one)", def.url, def.base));
        }
        for base in bases {
            if let Err(reason) = crate::search::extract::check(def, base, &definitions) {
                errors.push(format!("{}: on {base}: {reason}", def.url));
            }
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    if REGISTRY.get().is_some() {
        return Err(vec!["the search parameter registry is already in use: install extensions first".to_owned()]);
    }
    EXTENSIONS.set(definitions).map_err(|_| vec!["search parameter extensions are installed already".to_owned()])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt(name: &str) -> ResourceType {
        ResourceType::parse(name).expect("known type")
    }

    fn extension(code: &str, base: &str, expression: &str) -> SearchParamDef {
        serde_json::from_value(serde_json::json!({"url": format!("http://x/{code}"), "code": code, "base": [base],
            "type": "token", "expression": expression}))
        .expect("definition")
    }

    #[test]
    fn extensions_that_cannot_work_are_refused_with_their_url() {
        // Refused before anything global changes (the registry stays the base one here).
        let errors = install_extensions(vec![
            extension("_mine", "Patient", "Patient.gender"),
            extension("colour", "Nope", "Patient.gender"),
            extension("broken", "Patient", "Patient.name.(("),
            extension("elsewhere", "Patient", "Observation.status"),
            serde_json::from_value(serde_json::json!({"url": "http://x/pair", "code": "pair", "base": ["Patient"],
                "type": "composite", "expression": "Patient",
                "component": [{"definition": "http://x/nowhere", "expression": "gender"}]}))
            .expect("composite"),
        ])
        .expect_err("refused");
        let expected = [
            "http://x/_mine: code \"_mine\" cannot be a search parameter name",
            "http://x/colour: base [\"Nope\"] names no resource type",
            "http://x/broken: on Patient: parse error",
            "http://x/elsewhere: on Patient: its expression selects nothing in this resource type",
            "http://x/pair: on Patient: unknown component definition http://x/nowhere",
        ];
        for line in expected {
            assert!(errors.iter().any(|e| e.starts_with(line)), "missing {line:?} in {errors:#?}");
        }
        assert_eq!(errors.len(), expected.len(), "{errors:#?}");
    }

    #[test]
    fn loads_every_base_definition() {
        assert_eq!(registry().all().len(), 1375);
    }

    #[test]
    fn resource_level_parameters_apply_to_every_type() {
        for t in ResourceType::all() {
            for code in ["_id", "_lastUpdated", "_tag", "_profile", "_security", "_source"] {
                assert!(registry().get(*t, code).is_some(), "{t}.{code}");
            }
        }
        assert!(registry().get(rt("Patient"), "_text").is_some());
        assert!(registry().get(rt("Bundle"), "_text").is_none(), "Bundle is not a DomainResource");
    }

    #[test]
    fn shared_definitions_resolve_per_type() {
        let code = registry().get(rt("Observation"), "code").expect("Observation.code");
        assert_eq!(code.kind, ParamType::Token);
        let subject = registry().get(rt("Observation"), "subject").expect("Observation.subject");
        assert_eq!(subject.kind, ParamType::Reference);
        assert!(subject.target_types().contains(&rt("Patient")));
        let composite = registry().get(rt("Observation"), "code-value-quantity").expect("composite");
        assert_eq!(composite.component.len(), 2);
        assert!(registry().by_url(&composite.component[1].definition).is_some());
        assert!(registry().get(rt("Patient"), "no-such-param").is_none());
    }
}
