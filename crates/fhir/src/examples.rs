//! The FHIR R4 specification's example resources (feature `examples`), for round-trip and validation tests.
//!
//! 741 instances of 140 resource types from `hl7.fhir.r4.examples@4.0.1`, excluding the definitions the spec
//! build generates (see `tools/gen-fhir-data` and `data/PROVENANCE.md`). Embedded, so ~5.7 MB of binary size.

use serde_json::Value;

/// Spec examples the official R4 JSON schema itself rejects, as (`Type/id`, expression of the first
/// rejected element); the reasons are in `data/SCHEMA_REJECTS.md`. A server validating against the
/// schema refuses exactly these.
pub const SCHEMA_REJECTS: &[(&str, &str)] = &[
    // Contains a U+00A0 no-break space; the schema's string pattern `^[ \r\n\t\S]+$` excludes it.
    ("DiagnosticReport/gingival-mass", "DiagnosticReport.resultsInterpreter[0].display"),
    // Uses `_profile` on ElementDefinition.type; the schema has no `_profile` for that canonical list.
    ("StructureDefinition/example-composition", "StructureDefinition.differential.element[2].type[0].profile"),
];

static EXAMPLES_NDJSON: &str = include_str!("../data/examples.ndjson");

/// Every spec example, one parsed resource at a time, in file-name order (`Account-ewg.json`, ...).
pub fn spec_examples() -> impl Iterator<Item = Value> {
    EXAMPLES_NDJSON
        .lines()
        .filter(|line| !line.is_empty())
        // Generated data covered by the tests below; a parse failure is a build defect, not an input error.
        .map(|line| serde_json::from_str(line).expect("data/examples.ndjson holds one JSON resource per line"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{LogicalId, ResourceType};

    #[test]
    fn examples_are_identified_resources_of_known_types() {
        let mut count = 0;
        let mut keys = std::collections::HashSet::new();
        for example in spec_examples() {
            let resource_type = example["resourceType"].as_str().and_then(ResourceType::parse);
            let id = example["id"].as_str().map(LogicalId::parse);
            assert!(resource_type.is_some(), "{}", example["resourceType"]);
            assert!(matches!(id, Some(Ok(_))), "{}", example["id"]);
            assert!(keys.insert((resource_type, example["id"].clone())), "duplicate {}", example["id"]);
            count += 1;
        }
        assert_eq!(count, 741);
        let types: std::collections::HashSet<_> = keys.iter().map(|(t, _)| *t).collect();
        assert_eq!(types.len(), 140);
    }
}
