//! Logical ids of resources (`Resource.id`).

use std::fmt;
use std::str::FromStr;

/// The maximum length of a FHIR id.
pub const MAX_ID_LEN: usize = 64;

/// A resource's logical id: 1 to 64 characters from `[A-Za-z0-9\-\.]`.
#[derive(Clone, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct LogicalId(String);

/// Why a string is not a FHIR id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidId {
    #[error("id is empty")]
    Empty,
    #[error("id is longer than 64 characters")]
    TooLong,
    #[error("id contains a character other than A-Z, a-z, 0-9, '-' and '.'")]
    InvalidCharacter,
}

impl LogicalId {
    /// Validates `id` against the FHIR id rule `[A-Za-z0-9\-\.]{1,64}`.
    pub fn parse(id: &str) -> Result<LogicalId, InvalidId> {
        if id.is_empty() {
            return Err(InvalidId::Empty);
        }
        if id.len() > MAX_ID_LEN {
            return Err(InvalidId::TooLong);
        }
        if !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.') {
            return Err(InvalidId::InvalidCharacter);
        }
        Ok(LogicalId(id.to_owned()))
    }

    /// A fresh server-assigned id: a random (v4) UUID in lowercase hyphenated form.
    pub fn generate() -> LogicalId {
        LogicalId(uuid::Uuid::new_v4().hyphenated().to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for LogicalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for LogicalId {
    type Err = InvalidId;

    fn from_str(id: &str) -> Result<Self, Self::Err> {
        LogicalId::parse(id)
    }
}

impl AsRef<str> for LogicalId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl serde::Serialize for LogicalId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for LogicalId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let id = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        LogicalId::parse(&id).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_ids() {
        for id in ["a", "example", "123", "a.b-C", "2.16.840.1.113883", &"x".repeat(64)] {
            assert_eq!(LogicalId::parse(id).map(|i| i.to_string()), Ok(id.to_owned()), "{id}");
        }
    }

    #[test]
    fn rejects_invalid_ids() {
        assert_eq!(LogicalId::parse(""), Err(InvalidId::Empty));
        assert_eq!(LogicalId::parse(&"x".repeat(65)), Err(InvalidId::TooLong));
        for id in ["a b", "a/b", "a_b", "é", "a%20", "a\n", "a:b"] {
            assert_eq!(LogicalId::parse(id), Err(InvalidId::InvalidCharacter), "{id:?}");
        }
    }

    #[test]
    fn generated_ids_are_valid_and_distinct() {
        let a = LogicalId::generate();
        let b = LogicalId::generate();
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), 36);
        assert_eq!(LogicalId::parse(a.as_str()), Ok(a.clone()));
        assert_eq!(uuid::Uuid::parse_str(a.as_str()).map(|u| u.get_version_num()), Ok(4));
    }

    #[test]
    fn serde_validates() {
        let id: LogicalId = serde_json::from_value(serde_json::json!("abc")).expect("valid id");
        assert_eq!(serde_json::to_value(&id).expect("serializes"), serde_json::json!("abc"));
        assert!(serde_json::from_value::<LogicalId>(serde_json::json!("a b")).is_err());
    }
}
