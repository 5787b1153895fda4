//! Index updates as OpenSearch documents, and the one mapping every resource index shares.
//!
//! The extracted values are kept per kind in nested arrays whose entries carry the parameter code
//! (`p`): one fixed mapping for all 145 resource types and every SearchParameter — no mapping
//! explosion, no mapping change when an Implementation Guide adds parameters — and each value's
//! parts (system and code of one coding, the bounds of one range) stay together for matching.

use serde_json::{Map, Value, json};
use time::OffsetDateTime;

use fhirmesh_core::model::TenantId;
use fhirmesh_core::ports::IndexUpdate;
use fhirmesh_fhir::LogicalId;
use fhirmesh_fhir::search::values::normalize_string;
use fhirmesh_fhir::search::{IndexEntry, IndexValue};

/// The document id of a resource: tenant and logical id (a type has its own index).
pub fn document_id(tenant: &TenantId, id: &LogicalId) -> String {
    format!("{tenant}/{id}")
}

/// Microseconds since the epoch, rounded down (sub-microsecond precision is dropped; the search
/// side rounds its bounds to match, see `query.rs`).
pub(crate) fn micros(at: OffsetDateTime) -> i64 {
    i64::try_from(at.unix_timestamp_nanos().div_euclid(1_000)).unwrap_or(i64::MAX)
}

/// Composite parameters with more components than this are refused at indexing (R4's have two).
pub(crate) const MAX_COMPONENTS: usize = 4;

/// The document of an update: identity, version, `lastUpdated`, and either the extracted values
/// (`deleted: false`) or nothing (`deleted: true`, a tombstone that keeps the version). Every live
/// resource is searchable by its id: without an `_id` entry it gets an implicit `_id` token.
pub fn to_document(update: &IndexUpdate) -> Value {
    let mut document = json!({
        "tenant": update.tenant.as_str(),
        "type": update.resource_type.as_str(),
        "id": update.id.as_str(),
        "version": update.version_id,
        "sequence": update.sequence,
        "lastUpdated": micros(update.last_updated),
        "deleted": update.entries.is_none(),
    });
    let mut kinds: std::collections::BTreeMap<&'static str, Vec<Value>> = std::collections::BTreeMap::new();
    for entry in update.entries.iter().flatten() {
        let (kind, value) = encode(entry);
        kinds.entry(kind).or_default().push(value);
    }
    if let Some(entries) = &update.entries
        && !entries.iter().any(|entry| entry.param == "_id")
    {
        let implicit = IndexEntry {
            param: "_id".into(),
            value: IndexValue::Token { system: None, code: Some(update.id.as_str().to_owned()), text: None },
        };
        let (kind, value) = encode(&implicit);
        kinds.entry(kind).or_default().push(value);
    }
    if let Some(fields) = document.as_object_mut() {
        for (kind, values) in kinds {
            fields.insert(kind.to_owned(), Value::Array(values));
        }
    }
    document
}

/// The nested field a value goes to, and its entry.
fn encode(entry: &IndexEntry) -> (&'static str, Value) {
    let (kind, mut value) = encode_value(&entry.value);
    if let Some(fields) = value.as_object_mut() {
        fields.insert("p".into(), Value::String(entry.param.clone()));
    }
    (kind, value)
}

fn encode_value(value: &IndexValue) -> (&'static str, Value) {
    match value {
        IndexValue::String { normalized, exact } => ("s", json!({"n": normalized, "e": exact})),
        IndexValue::Token { system, code, text } => {
            ("t", json!({"s": system, "c": code, "x": text, "xn": text.as_deref().map(normalize_string)}))
        }
        IndexValue::Reference { target_type, id, url, version, identifier } => (
            "r",
            json!({
                "tt": target_type.map(|t| t.as_str()),
                "id": id,
                "u": url,
                "v": version,
                "is": identifier.as_ref().and_then(|(system, _)| system.clone()),
                "iv": identifier.as_ref().map(|(_, value)| value.clone()),
            }),
        ),
        IndexValue::Date { start, end } => ("d", json!({"s": micros(*start), "e": micros(*end)})),
        IndexValue::Number { value, low, high } => ("n", json!({"v": value, "lo": low, "hi": high})),
        IndexValue::Quantity { value, low, high, system, code, unit, canonical } => (
            "q",
            json!({
                "v": value, "lo": low, "hi": high, "s": system, "c": code, "un": unit,
                "cv": canonical.as_ref().map(|(v, _)| v), "cc": canonical.as_ref().map(|(_, c)| c),
            }),
        ),
        IndexValue::Uri(uri) => ("u", json!({"v": uri})),
        // Component `i` under `c{i}`, as `{kind: fields}`: one nested entry keeps the components
        // of one composite value together. Past `MAX_COMPONENTS` the rest are left out (and so
        // never match); `query.rs` refuses searches on them.
        IndexValue::Composite(parts) => {
            let mut fields = Map::new();
            fields.insert("m".into(), json!(parts.len()));
            for (index, part) in parts.iter().take(MAX_COMPONENTS).enumerate() {
                let (kind, value) = encode_value(part);
                fields.insert(format!("c{index}"), json!({ kind: value }));
            }
            ("k", Value::Object(fields))
        }
    }
}

/// A keyword field. Lucene refuses terms over 32,766 bytes (and with them the whole document):
/// longer values are kept in `_source` but not indexed — not found by search, nor sorted by.
fn keyword() -> Value {
    json!({"type": "keyword", "ignore_above": 8191})
}

/// The fields of one value of each kind (without the parameter code).
fn value_properties() -> Map<String, Value> {
    let keyword = keyword();
    let double = json!({"type": "double"});
    let long = json!({"type": "long"});
    let mut kinds = Map::new();
    kinds.insert("s".into(), json!({"n": keyword, "e": keyword}));
    kinds.insert("t".into(), json!({"s": keyword, "c": keyword, "x": keyword, "xn": keyword}));
    kinds.insert(
        "r".into(),
        json!({"tt": keyword, "id": keyword, "u": keyword, "v": keyword, "is": keyword, "iv": keyword}),
    );
    kinds.insert("d".into(), json!({"s": long, "e": long}));
    kinds.insert("n".into(), json!({"v": double, "lo": double, "hi": double}));
    kinds.insert(
        "q".into(),
        json!({
            "v": double, "lo": double, "hi": double,
            "s": keyword, "c": keyword, "un": keyword, "cv": double, "cc": keyword,
        }),
    );
    kinds.insert("u".into(), json!({"v": keyword}));
    kinds
}

/// The mapping of every resource index (installed as an index template).
pub(crate) fn mapping() -> Value {
    let keyword = keyword();
    let kinds = value_properties();
    let mut properties = Map::new();
    for (field, value) in [
        ("tenant", keyword.clone()),
        ("type", keyword.clone()),
        ("id", keyword.clone()),
        ("version", json!({"type": "long"})),
        ("sequence", json!({"type": "long"})),
        ("lastUpdated", json!({"type": "long"})),
        ("deleted", json!({"type": "boolean"})),
    ] {
        properties.insert(field.into(), value);
    }
    for (kind, fields) in &kinds {
        let mut fields = fields.as_object().cloned().unwrap_or_default();
        fields.insert("p".into(), keyword.clone());
        properties.insert(kind.clone(), json!({"type": "nested", "properties": fields}));
    }
    let mut component = Map::new();
    for (kind, fields) in &kinds {
        component.insert(kind.clone(), json!({"properties": fields}));
    }
    let mut composite = Map::new();
    composite.insert("p".into(), keyword);
    composite.insert("m".into(), json!({"type": "integer"}));
    for index in 0..MAX_COMPONENTS {
        composite.insert(format!("c{index}"), json!({"properties": component}));
    }
    properties.insert("k".into(), json!({"type": "nested", "properties": composite}));
    json!({"dynamic": "strict", "properties": properties})
}

#[cfg(test)]
mod tests {
    use super::*;
    use fhirmesh_fhir::ResourceType;

    fn update(entries: Option<Vec<IndexEntry>>) -> IndexUpdate {
        IndexUpdate {
            tenant: TenantId::parse("t1").expect("tenant"),
            resource_type: ResourceType::parse("Observation").expect("type"),
            id: LogicalId::parse("o1").expect("id"),
            version_id: 4,
            sequence: 17,
            last_updated: OffsetDateTime::from_unix_timestamp(1_700_000_000).expect("time"),
            entries,
        }
    }

    #[test]
    fn values_go_to_their_kind_with_their_parameter() {
        let entries = vec![
            IndexEntry {
                param: "code".into(),
                value: IndexValue::Token {
                    system: Some("http://loinc.org".into()),
                    code: Some("1-8".into()),
                    text: None,
                },
            },
            IndexEntry {
                param: "code".into(),
                value: IndexValue::Token { system: None, code: Some("x".into()), text: None },
            },
            IndexEntry {
                param: "date".into(),
                value: IndexValue::Date {
                    start: OffsetDateTime::UNIX_EPOCH,
                    end: OffsetDateTime::UNIX_EPOCH + time::Duration::days(1),
                },
            },
            IndexEntry {
                param: "code-value-quantity".into(),
                value: IndexValue::Composite(vec![IndexValue::Uri("u".into())]),
            },
        ];
        let document = to_document(&update(Some(entries)));
        assert_eq!(document["deleted"], false);
        assert_eq!(document["version"], 4);
        assert_eq!(document["lastUpdated"], 1_700_000_000_000_000_i64);
        // Two codes and the implicit `_id`.
        assert_eq!(document["t"].as_array().map(Vec::len), Some(3));
        assert_eq!(document["t"][0], json!({"p": "code", "s": "http://loinc.org", "c": "1-8", "x": null, "xn": null}));
        assert_eq!(document["t"][2], json!({"p": "_id", "s": null, "c": "o1", "x": null, "xn": null}));
        assert_eq!(document["d"][0], json!({"p": "date", "s": 0, "e": 86_400_000_000_i64}));
        assert_eq!(document["k"][0], json!({"p": "code-value-quantity", "m": 1, "c0": {"u": {"v": "u"}}}));
    }

    #[test]
    fn a_delete_is_a_tombstone_without_values() {
        let document = to_document(&update(None));
        assert_eq!(document["deleted"], true);
        assert!(document.get("t").is_none());
        assert_eq!(document_id(&TenantId::parse("t1").expect("tenant"), &LogicalId::parse("o1").expect("id")), "t1/o1");
    }
}
