//! The closed set of concrete FHIR R4 resource types.

use std::fmt;
use std::str::FromStr;

// `static ALL: [ResourceType; N]`, generated from the schema by tools/gen-fhir-data.
include!("../data/resource_types.rs");

/// A concrete FHIR R4 resource type (`Patient`, `Observation`, ...).
///
/// Only the concrete types of R4 4.0.1 exist as values: the abstract `Resource` and `DomainResource` do not
/// parse. The name list is generated from the official R4 JSON schema (see `data/PROVENANCE.md`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct ResourceType(&'static str);

impl ResourceType {
    /// Parses an exact, case-sensitive resource type name.
    pub fn parse(name: &str) -> Option<ResourceType> {
        ALL.binary_search_by(|candidate| candidate.0.cmp(name)).ok().and_then(|index| ALL.get(index)).copied()
    }

    /// The type name as it appears in `resourceType` and in URLs.
    pub fn as_str(&self) -> &'static str {
        self.0
    }

    /// Every concrete resource type, sorted by name.
    pub fn all() -> &'static [ResourceType] {
        &ALL
    }
}

impl fmt::Display for ResourceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// The error of [`ResourceType::from_str`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown resource type '{0}'")]
pub struct UnknownResourceType(pub String);

impl FromStr for ResourceType {
    type Err = UnknownResourceType;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        ResourceType::parse(name).ok_or_else(|| UnknownResourceType(name.to_owned()))
    }
}

impl AsRef<str> for ResourceType {
    fn as_ref(&self) -> &str {
        self.0
    }
}

impl serde::Serialize for ResourceType {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.0)
    }
}

impl<'de> serde::Deserialize<'de> for ResourceType {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        ResourceType::parse(&name).ok_or_else(|| serde::de::Error::custom(UnknownResourceType(name.into_owned())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_concrete_types_exactly() {
        let patient = ResourceType::parse("Patient").expect("Patient is a resource type");
        assert_eq!(patient.as_str(), "Patient");
        assert_eq!(patient.to_string(), "Patient");
        assert_eq!(ResourceType::parse("patient"), None);
        assert_eq!(ResourceType::parse("Patient "), None);
        assert_eq!(ResourceType::parse(""), None);
        assert_eq!(ResourceType::parse("Resource"), None);
        assert_eq!(ResourceType::parse("DomainResource"), None);
        assert_eq!(ResourceType::parse("HumanName"), None);
        assert!(ResourceType::parse("Parameters").is_some());
        assert!(ResourceType::parse("Binary").is_some());
        assert!(ResourceType::parse("Bundle").is_some());
    }

    #[test]
    fn all_lists_every_r4_type_once_in_order() {
        let all = ResourceType::all();
        assert_eq!(all.len(), 146);
        assert!(all.windows(2).all(|pair| pair[0] < pair[1]));
        for resource_type in all {
            assert_eq!(ResourceType::parse(resource_type.as_str()), Some(*resource_type));
        }
        assert_eq!(all.first().map(ResourceType::as_str), Some("Account"));
        assert_eq!(all.last().map(ResourceType::as_str), Some("VisionPrescription"));
    }

    #[test]
    fn from_str_and_serde() {
        assert_eq!("Observation".parse::<ResourceType>().map(|t| t.as_str()), Ok("Observation"));
        assert_eq!(
            "Foo".parse::<ResourceType>().map_err(|e| e.to_string()),
            Err("unknown resource type 'Foo'".to_owned())
        );
        let json = serde_json::to_value(ResourceType::parse("Patient")).expect("serializes");
        assert_eq!(json, serde_json::json!("Patient"));
        let back: ResourceType = serde_json::from_value(json).expect("deserializes");
        assert_eq!(back.as_str(), "Patient");
        assert!(serde_json::from_value::<ResourceType>(serde_json::json!("Nope")).is_err());
    }
}
