//! Validation of resources against the profiles (StructureDefinition snapshots) of the loaded
//! packages: cardinality, choice types, fixed and pattern values, required bindings against the
//! loaded value sets, slicing (value, pattern, exists, type and profile discriminators on simple
//! paths), extensions against their definitions, and data-type profiles.
//!
//! Not checked here (yet): invariants (FHIRPath constraints), reference target profiles,
//! discriminators through functions (`resolve()`, `extension(url)`), slice order, and bindings
//! to value sets that cannot be enumerated from the loaded packages (a warning says so; base
//! specification value sets are left to the schema's enums).

mod check;
mod compile;

use std::collections::HashMap;

use fhirmesh_fhir::outcome::{Issue, IssueType, Severity};
use serde_json::Value;

use crate::IgSet;
use crate::terminology::Terminology;

/// Profile validation of resources loaded once from an [`IgSet`]. Cheap to share (`Arc`).
#[derive(Debug, Default)]
pub struct Validator {
    profiles: HashMap<String, Profile>,
    unusable: Vec<(String, String)>,
    terminology: Terminology,
}

#[derive(Debug)]
struct Profile {
    url: String,
    /// The type it constrains: a resource type, a data type, `Extension`.
    constrained: String,
    root: compile::Node,
}

impl Validator {
    /// Compiles every StructureDefinition of `set` (its snapshot) and expands its value sets.
    /// Definitions that cannot be validated against are listed by [`Validator::unusable`].
    pub fn new(set: &IgSet) -> Validator {
        let mut profiles = HashMap::new();
        let mut unusable = Vec::new();
        for definition in set.of_type("StructureDefinition") {
            let Some(url) = definition["url"].as_str() else { continue };
            // Logical models describe no instances a server receives.
            if definition["kind"] == "logical" {
                continue;
            }
            match compile::compile(definition) {
                Ok(root) => {
                    let constrained = definition["type"].as_str().unwrap_or(&root.name).to_owned();
                    profiles.insert(url.to_owned(), Profile { url: url.to_owned(), constrained, root });
                }
                Err(why) => unusable.push((url.to_owned(), why)),
            }
        }
        unusable.sort();
        Validator { profiles, unusable, terminology: Terminology::new(set) }
    }

    /// StructureDefinitions that cannot be validated against, with the reason (no snapshot, a
    /// snapshot out of order…): reported at start-up.
    pub fn unusable(&self) -> &[(String, String)] {
        &self.unusable
    }

    /// Whether the profile `url` (`url|version` accepted) can be validated against.
    pub fn has_profile(&self, url: &str) -> bool {
        self.profile(url).is_some()
    }

    /// The canonical URLs of the profiles, by the type they constrain (each list sorted): the
    /// CapabilityStatement's `supportedProfile`.
    pub fn profiles_by_type(&self) -> std::collections::BTreeMap<String, Vec<String>> {
        let mut by_type: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for profile in self.profiles.values() {
            by_type.entry(profile.constrained.clone()).or_default().push(profile.url.clone());
        }
        by_type.values_mut().for_each(|urls| urls.sort_unstable());
        by_type
    }

    pub fn terminology(&self) -> &Terminology {
        &self.terminology
    }

    fn profile(&self, url: &str) -> Option<&Profile> {
        let bare = url.split_once('|').map_or(url, |(bare, _)| bare);
        self.profiles.get(bare)
    }

    /// Validates `resource` against every profile it claims in `meta.profile`. A claimed profile
    /// that is not loaded is a warning (it is not checked).
    pub fn validate(&self, resource: &Value) -> Vec<Issue> {
        let mut issues = Vec::new();
        let claimed = resource["meta"]["profile"].as_array().map(Vec::as_slice).unwrap_or_default();
        for (i, url) in claimed.iter().enumerate() {
            let Some(url) = url.as_str() else { continue };
            match self.validate_against(resource, url) {
                Ok(found) => issues.extend(found),
                Err(why) => issues.push(warning(IssueType::Informational, why).at(format!("meta.profile[{i}]"))),
            }
        }
        dedup(issues)
    }

    /// Validates `resource` against the profile `url`; `Err` when it is not loaded.
    pub fn validate_against(&self, resource: &Value, url: &str) -> Result<Vec<Issue>, String> {
        let profile = self.profile(url).ok_or_else(|| format!("profile {url} is not loaded here: not checked"))?;
        let resource_type = resource["resourceType"].as_str().unwrap_or_default();
        if profile.constrained != resource_type {
            return Ok(vec![
                Issue::error(
                    IssueType::Invalid,
                    format!("profile {url} constrains {}, not {resource_type}", profile.constrained),
                )
                .at("resourceType"),
            ]);
        }
        let mut check = check::Check::new(self, &profile.url);
        check.resource(&profile.root, resource, resource_type);
        Ok(dedup(check.into_issues()))
    }
}

fn warning(code: IssueType, diagnostics: impl Into<String>) -> Issue {
    Issue { severity: Severity::Warning, ..Issue::error(code, diagnostics) }
}

/// The same issue found twice (a slice repeats its base element's constraints) is reported once.
fn dedup(issues: Vec<Issue>) -> Vec<Issue> {
    let mut seen = std::collections::HashSet::new();
    let mut out: Vec<Issue> =
        issues.into_iter().filter(|i| seen.insert((i.expression.clone(), i.diagnostics.clone()))).collect();
    out.truncate(fhirmesh_fhir::validate::MAX_ISSUES);
    out
}

#[cfg(test)]
mod tests;
