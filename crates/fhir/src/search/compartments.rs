//! The R4 CompartmentDefinitions: which search parameters put a resource in a compartment
//! (e.g. an Observation is in Patient/123's compartment when `subject` or `performer` is Patient/123).

use std::collections::HashMap;
use std::sync::LazyLock;

use crate::ResourceType;

static COMPARTMENTS_JSON: &str = include_str!("../../data/compartments.json");

type Definitions = HashMap<String, HashMap<String, Vec<String>>>;

static COMPARTMENTS: LazyLock<Definitions> =
    LazyLock::new(|| serde_json::from_str(COMPARTMENTS_JSON).expect("data/compartments.json is generated, valid JSON"));

/// The compartment types (Patient, Encounter, RelatedPerson, Practitioner, Device).
pub fn compartment_types() -> Vec<ResourceType> {
    let mut out: Vec<ResourceType> = COMPARTMENTS.keys().filter_map(|k| ResourceType::parse(k)).collect();
    out.sort();
    out
}

/// The parameters of `member` that link it into a `compartment` compartment; empty when `member`
/// is not part of that compartment.
pub fn compartment_params(compartment: ResourceType, member: ResourceType) -> &'static [String] {
    COMPARTMENTS
        .get(compartment.as_str())
        .and_then(|members| members.get(member.as_str()))
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patient_compartment_links_observations_by_subject_and_performer() {
        let patient = ResourceType::parse("Patient").expect("type");
        let observation = ResourceType::parse("Observation").expect("type");
        assert_eq!(compartment_params(patient, observation), ["subject", "performer"]);
        assert_eq!(compartment_types().len(), 5);
        let binary = ResourceType::parse("Binary").expect("type");
        assert!(compartment_params(patient, binary).is_empty());
    }
}
