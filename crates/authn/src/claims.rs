//! The verified claims of a token.

use serde_json::{Map, Value};

/// The verified claims: the standard ones typed, plus everything as JSON for claim paths.
#[derive(Debug, Clone, PartialEq)]
pub struct Claims {
    /// `sub`.
    pub subject: String,
    /// `iss` (equal to the configured issuer).
    pub issuer: String,
    /// `aud`, as a list even when the token carries a single string.
    pub audience: Vec<String>,
    /// `exp`, seconds since the Unix epoch.
    pub expires_at: i64,
    /// The whole payload.
    pub raw: Map<String, Value>,
}

impl Claims {
    /// A claim by name or dotted path (`custom:tenantId`, `ext.tenant`); names containing ':' are
    /// looked up whole first.
    ///
    /// The whole path is always tried as a top-level name first (so `https://example.org/tenant`
    /// or `a.b` as a literal name both work); otherwise it is split on `.` and walked through
    /// objects, with numeric segments indexing arrays (`groups.0`).
    pub fn get(&self, path: &str) -> Option<&Value> {
        if let Some(value) = self.raw.get(path) {
            return Some(value);
        }
        let mut segments = path.split('.');
        let mut current = self.raw.get(segments.next()?)?;
        for segment in segments {
            current = match current {
                Value::Object(map) => map.get(segment)?,
                Value::Array(items) => items.get(segment.parse::<usize>().ok()?)?,
                _ => return None,
            };
        }
        Some(current)
    }

    /// A claim as a list of strings: a JSON array of strings, or a space-separated string (OAuth
    /// `scope`). Non-string array items are skipped; any other value, or no claim, gives an empty
    /// list.
    pub fn strings(&self, path: &str) -> Vec<String> {
        match self.get(path) {
            Some(Value::String(s)) => s.split_whitespace().map(str::to_owned).collect(),
            Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).map(str::to_owned).collect(),
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn claims(raw: Value) -> Claims {
        let Value::Object(raw) = raw else { panic!("object") };
        Claims {
            subject: "u1".into(),
            issuer: "https://idp.example".into(),
            audience: vec!["fhirmesh".into()],
            expires_at: 0,
            raw,
        }
    }

    #[test]
    fn get_looks_up_whole_names_then_dotted_paths() {
        let c = claims(json!({
            "custom:tenantId": "t1",
            "https://example.org/claims.tenant": "t2",
            "ext": {"tenant": "t3", "deep": {"x": 1}},
            "a.b": "literal",
            "a": {"b": "nested"},
            "groups": ["g0", "g1"],
        }));
        assert_eq!(c.get("custom:tenantId"), Some(&json!("t1")));
        assert_eq!(c.get("https://example.org/claims.tenant"), Some(&json!("t2")));
        assert_eq!(c.get("ext.tenant"), Some(&json!("t3")));
        assert_eq!(c.get("ext.deep.x"), Some(&json!(1)));
        assert_eq!(c.get("a.b"), Some(&json!("literal")));
        assert_eq!(c.get("groups.1"), Some(&json!("g1")));
        assert_eq!(c.get("groups.2"), None);
        assert_eq!(c.get("groups.x"), None);
        assert_eq!(c.get("ext.tenant.more"), None);
        assert_eq!(c.get("missing"), None);
        assert_eq!(c.get(""), None);
        assert_eq!(c.get("."), None);
    }

    #[test]
    fn strings_reads_arrays_and_space_separated_scopes() {
        let c = claims(json!({
            "scope": "patient/*.read  openid\tlaunch",
            "roles": ["admin", 7, "reader", null],
            "n": 3,
            "ext": {"groups": ["a", "b"]},
        }));
        assert_eq!(c.strings("scope"), ["patient/*.read", "openid", "launch"]);
        assert_eq!(c.strings("roles"), ["admin", "reader"]);
        assert_eq!(c.strings("ext.groups"), ["a", "b"]);
        assert!(c.strings("n").is_empty());
        assert!(c.strings("missing").is_empty());
    }
}
