//! Group rules, FHIR Works on AWS style: a caller in a group may perform the group's interactions
//! on the group's resource types. A caller in several groups gets the union; rules grant whole
//! types ([`Permit::All`](super::Permit::All)). Which token claim holds the groups is the
//! gateway's business.
//!
//! Rules deserialize from TOML or JSON:
//!
//! ```toml
//! [groups.practitioner]
//! interactions = ["*"]
//! resource_types = ["*"]
//!
//! [groups.auditor]
//! interactions = ["read", "vread", "search-type"]
//! resource_types = ["Patient"]
//! ```
//!
//! `search-system`, `history-system` and a system-level `operation` need that interaction on `"*"`;
//! `transaction` and `batch` are permitted to anyone in a group with rules (each entry is checked on
//! its own), whether or not the group lists them.

use std::collections::BTreeMap;
use std::fmt;

use fhirmesh_fhir::ResourceType;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{Grant, Interaction, Principal};
use crate::error::FhirError;

/// The financial types FHIR Works on AWS lets its `non-practitioner` group read.
const FINANCIAL_TYPES: [&str; 16] = [
    "Account",
    "ChargeItem",
    "ChargeItemDefinition",
    "Claim",
    "ClaimResponse",
    "Contract",
    "Coverage",
    "CoverageEligibilityRequest",
    "CoverageEligibilityResponse",
    "EnrollmentRequest",
    "EnrollmentResponse",
    "ExplanationOfBenefit",
    "InsurancePlan",
    "Invoice",
    "PaymentNotice",
    "PaymentReconciliation",
];

/// The access rules of each group, by group name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RbacRules {
    pub groups: BTreeMap<String, GroupRule>,
}

/// What the members of one group may do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupRule {
    pub interactions: Vec<InteractionPattern>,
    /// Resource type names, or `"*"` for every type.
    pub resource_types: Vec<String>,
}

/// An interaction in a [`GroupRule`]: one by name (`"search-type"`), or `"*"` for all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InteractionPattern {
    Any,
    One(Interaction),
}

impl RbacRules {
    /// FHIR Works on AWS's default groups: `practitioner` may do everything; `non-practitioner`
    /// may read, vread, search and read the history of the financial types (Account, Claim,
    /// Coverage, ExplanationOfBenefit, …); `auditor` may read, vread and search Patient.
    pub fn fhir_works_defaults() -> RbacRules {
        let rule = |interactions: &[Interaction], resource_types: &[&str]| GroupRule {
            interactions: interactions.iter().copied().map(InteractionPattern::One).collect(),
            resource_types: resource_types.iter().map(|name| (*name).to_owned()).collect(),
        };
        let groups = BTreeMap::from([
            (
                "practitioner".to_owned(),
                GroupRule { interactions: vec![InteractionPattern::Any], resource_types: vec!["*".to_owned()] },
            ),
            (
                "non-practitioner".to_owned(),
                rule(
                    &[Interaction::Read, Interaction::Vread, Interaction::SearchType, Interaction::HistoryInstance],
                    &FINANCIAL_TYPES,
                ),
            ),
            (
                "auditor".to_owned(),
                rule(&[Interaction::Read, Interaction::Vread, Interaction::SearchType], &["Patient"]),
            ),
        ]);
        RbacRules { groups }
    }

    /// Every problem of the rules, `; `-separated: no groups, a group without interactions or
    /// types, an unknown resource type.
    pub fn validate(&self) -> Result<(), String> {
        let mut problems = Vec::new();
        if self.groups.is_empty() {
            problems.push("no groups are defined".to_owned());
        }
        for (name, rule) in &self.groups {
            if name.is_empty() {
                problems.push("a group has an empty name".to_owned());
            }
            if rule.interactions.is_empty() {
                problems.push(format!("group '{name}' grants no interactions"));
            }
            if rule.resource_types.is_empty() {
                problems.push(format!("group '{name}' names no resource types"));
            }
            for unknown in rule.resource_types.iter().filter(|t| *t != "*" && ResourceType::parse(t).is_none()) {
                problems.push(format!("group '{name}' names an unknown resource type '{unknown}'"));
            }
        }
        if problems.is_empty() { Ok(()) } else { Err(problems.join("; ")) }
    }

    /// The union of the grants of `principal`'s groups; forbidden when none of them has rules.
    /// Unknown type names grant nothing ([`RbacRules::validate`] reports them at start-up).
    pub(super) fn grants_for(&self, principal: &Principal) -> Result<Vec<Grant>, FhirError> {
        let mut grants: Vec<Grant> = Vec::new();
        for rule in principal.groups.iter().filter_map(|group| self.groups.get(group)) {
            let interactions = rule.granted_interactions();
            if interactions.is_empty() {
                continue;
            }
            for resource_type in rule.granted_types() {
                let grant = Grant::unlimited(resource_type, interactions.clone());
                if !grants.contains(&grant) {
                    grants.push(grant);
                }
            }
        }
        if grants.is_empty() {
            return Err(FhirError::forbidden("the caller is in no group that grants access"));
        }
        Ok(grants)
    }
}

impl GroupRule {
    /// In [`Interaction::ALL`] order.
    fn granted_interactions(&self) -> Vec<Interaction> {
        let granted = |interaction: &Interaction| {
            self.interactions.iter().any(|pattern| match pattern {
                InteractionPattern::Any => true,
                InteractionPattern::One(one) => one == interaction,
            })
        };
        Interaction::ALL.into_iter().filter(granted).collect()
    }

    /// `[None]` (every type) when the rule names `*`.
    fn granted_types(&self) -> Vec<Option<ResourceType>> {
        if self.resource_types.iter().any(|name| name == "*") {
            return vec![None];
        }
        self.resource_types.iter().filter_map(|name| ResourceType::parse(name)).map(Some).collect()
    }
}

impl fmt::Display for InteractionPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InteractionPattern::Any => f.write_str("*"),
            InteractionPattern::One(interaction) => interaction.fmt(f),
        }
    }
}

impl Serialize for InteractionPattern {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for InteractionPattern {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        if name == "*" {
            return Ok(InteractionPattern::Any);
        }
        Interaction::parse(&name).map(InteractionPattern::One).ok_or_else(|| {
            let expected: Vec<&str> = Interaction::ALL.iter().map(|i| i.as_str()).collect();
            serde::de::Error::custom(format!(
                "unknown interaction '{name}', expected \"*\" or one of {}",
                expected.join(", ")
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_name_the_three_groups() {
        let rules = RbacRules::fhir_works_defaults();
        assert_eq!(rules.validate(), Ok(()));
        assert_eq!(rules.groups.keys().collect::<Vec<_>>(), ["auditor", "non-practitioner", "practitioner"]);
        for name in FINANCIAL_TYPES {
            assert!(ResourceType::parse(name).is_some(), "{name}");
        }
    }

    #[test]
    fn validate_reports_every_problem() {
        let toml = r#"
            [groups.clerk]
            interactions = []
            resource_types = ["Patient", "Nope", "*"]

            [groups.nurse]
            interactions = ["read"]
            resource_types = []
        "#;
        let rules: RbacRules = toml::from_str(toml).expect("parses");
        assert_eq!(
            rules.validate(),
            Err("group 'clerk' grants no interactions; group 'clerk' names an unknown resource type 'Nope'; \
                 group 'nurse' names no resource types"
                .to_owned())
        );
        let empty: RbacRules = toml::from_str("groups = {}").expect("parses");
        assert_eq!(empty.validate(), Err("no groups are defined".to_owned()));
    }

    #[test]
    fn rules_parse_from_toml() {
        let toml = r#"
            [groups.practitioner]
            interactions = ["*"]
            resource_types = ["*"]

            [groups.non-practitioner]
            interactions = ["read", "vread", "search-type", "history-instance"]
            resource_types = ["Account", "ChargeItem", "ChargeItemDefinition", "Claim", "ClaimResponse", "Contract",
                "Coverage", "CoverageEligibilityRequest", "CoverageEligibilityResponse", "EnrollmentRequest",
                "EnrollmentResponse", "ExplanationOfBenefit", "InsurancePlan", "Invoice", "PaymentNotice",
                "PaymentReconciliation"]

            [groups.auditor]
            interactions = ["read", "vread", "search-type"]
            resource_types = ["Patient"]
        "#;
        let rules: RbacRules = toml::from_str(toml).expect("parses");
        assert_eq!(rules, RbacRules::fhir_works_defaults());
    }

    #[test]
    fn toml_rejects_unknown_interactions_and_fields() {
        let unknown_interaction = "[groups.a]\ninteractions = [\"search\"]\nresource_types = [\"*\"]\n";
        let error = toml::from_str::<RbacRules>(unknown_interaction).expect_err("unknown interaction").to_string();
        assert!(error.contains("unknown interaction 'search'"), "{error}");
        let misspelt_field = "[groups.a]\ninteractions = [\"read\"]\nresource_type = [\"Patient\"]\n";
        assert!(toml::from_str::<RbacRules>(misspelt_field).is_err());
    }

    #[test]
    fn rules_round_trip_through_json() {
        let rules = RbacRules::fhir_works_defaults();
        let json = serde_json::to_value(&rules).expect("serializes");
        assert_eq!(json["groups"]["practitioner"], serde_json::json!({"interactions": ["*"], "resource_types": ["*"]}));
        assert_eq!(json["groups"]["auditor"]["interactions"], serde_json::json!(["read", "vread", "search-type"]));
        let back: RbacRules = serde_json::from_value(json).expect("deserializes");
        assert_eq!(back, rules);
    }
}
