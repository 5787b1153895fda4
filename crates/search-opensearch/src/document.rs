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
use fhirmesh_fhir::search::{IndexEntry, IndexValue};

/// The document id of a resource: tenant and logical id (a type has its own index).
pub fn document_id(tenant: &TenantId, id: &LogicalId) -> String {
    format!("{tenant}/{id}")
}

fn millis(at: OffsetDateTime) -> i64 {
    i64::try_from(at.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

/// The document of an update: identity, version, `lastUpdated`, and either the extracted values
/// (`deleted: false`) or nothing (`deleted: true`, a tombstone that keeps the version).
pub fn to_document(update: &IndexUpdate) -> Value {
    let mut document = json!({
        "tenant": update.tenant.as_str(),
        "type": update.resource_type.as_str(),
        "id": update.id.as_str(),
        "version": update.version_id,
        "sequence": update.sequence,
        "lastUpdated": millis(update.last_updated),
        "deleted": update.entries.is_none(),
    });
    let mut kinds: std::collections::BTreeMap<&'static str, Vec<Value>> = std::collections::BTreeMap::new();
    for entry in update.entries.iter().flatten() {
        let (kind, value) = encode(entry);
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
        IndexValue::Token { system, code, text } => ("t", json!({"s": system, "c": code, "x": text})),
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
        IndexValue::Date { start, end } => ("d", json!({"r": {"gte": millis(*start), "lt": millis(*end)}})),
        IndexValue::Number { value, low, high } => ("n", json!({"v": value, "lo": low, "hi": high})),
        IndexValue::Quantity { value, low, high, system, code, unit, canonical } => (
            "q",
            json!({
                "v": value, "lo": low, "hi": high, "s": system, "c": code, "un": unit,
                "cv": canonical.as_ref().map(|(v, _)| v), "cc": canonical.as_ref().map(|(_, c)| c),
            }),
        ),
        IndexValue::Uri(uri) => ("u", json!({"v": uri})),
        // Kept whole (component order matters); matched by the search side (NOT YET).
        IndexValue::Composite(parts) => {
            let parts: Vec<Value> = parts
                .iter()
                .map(|part| {
                    let (kind, value) = encode_value(part);
                    let mut fields = Map::new();
                    fields.insert(kind.to_owned(), value);
                    Value::Object(fields)
                })
                .collect();
            ("k", json!({"parts": parts}))
        }
    }
}

/// The mapping of every resource index (installed as an index template).
pub(crate) fn mapping() -> Value {
    let keyword = json!({"type": "keyword"});
    let nested = |properties: Value| json!({"type": "nested", "properties": properties});
    json!({
        "dynamic": "strict",
        "properties": {
            "tenant": keyword, "type": keyword, "id": keyword,
            "version": {"type": "long"}, "sequence": {"type": "long"},
            "lastUpdated": {"type": "date", "format": "epoch_millis"},
            "deleted": {"type": "boolean"},
            "s": nested(json!({"p": keyword, "n": keyword, "e": keyword})),
            "t": nested(json!({"p": keyword, "s": keyword, "c": keyword, "x": {"type": "keyword", "normalizer": "lowercase"}})),
            "r": nested(json!({"p": keyword, "tt": keyword, "id": keyword, "u": keyword, "v": keyword, "is": keyword, "iv": keyword})),
            "d": nested(json!({"p": keyword, "r": {"type": "date_range", "format": "epoch_millis"}})),
            "n": nested(json!({"p": keyword, "v": {"type": "double"}, "lo": {"type": "double"}, "hi": {"type": "double"}})),
            "q": nested(json!({
                "p": keyword, "v": {"type": "double"}, "lo": {"type": "double"}, "hi": {"type": "double"},
                "s": keyword, "c": keyword, "un": keyword, "cv": {"type": "double"}, "cc": keyword,
            })),
            "u": nested(json!({"p": keyword, "v": keyword})),
            "k": {"type": "nested", "dynamic": false, "properties": {"p": keyword}},
        },
    })
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
        assert_eq!(document["lastUpdated"], 1_700_000_000_000_i64);
        assert_eq!(document["t"].as_array().map(Vec::len), Some(2));
        assert_eq!(document["t"][0], json!({"p": "code", "s": "http://loinc.org", "c": "1-8", "x": null}));
        assert_eq!(document["d"][0]["r"], json!({"gte": 0, "lt": 86_400_000}));
        assert_eq!(document["k"][0], json!({"p": "code-value-quantity", "parts": [{"u": {"v": "u"}}]}));
    }

    #[test]
    fn a_delete_is_a_tombstone_without_values() {
        let document = to_document(&update(None));
        assert_eq!(document["deleted"], true);
        assert!(document.get("t").is_none());
        assert_eq!(document_id(&TenantId::parse("t1").expect("tenant"), &LogicalId::parse("o1").expect("id")), "t1/o1");
    }
}
