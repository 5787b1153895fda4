//! Stream records → events: the Streams SDK's `AttributeValue` is a different type from the
//! DynamoDB SDK's (same shape), so a stream image is converted into a table [`Item`] and decoded by
//! the same code that reads version items from the table.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_dynamodbstreams::types::{AttributeValue as StreamValue, OperationType, Record};
use fhirmesh_core::events::ResourceChanged;
use fhirmesh_core::ports::StoreError;

use crate::items::{Item, PK, SK, VERSION_PREFIX, change_from_version_item};
use crate::txn::txn_of;

/// DynamoDB allows 32 levels of nesting; anything deeper is not an item DynamoDB wrote.
const MAX_DEPTH: usize = 64;

/// Converts one stream attribute value into the table SDK's type. Total: every variant the SDK
/// knows maps one to one; an unknown variant (a newer service than this SDK) or absurd nesting is
/// an error, never a panic.
#[cfg(test)]
pub(crate) fn convert_value(value: &StreamValue) -> Result<AttributeValue, String> {
    convert_at(value, 0)
}

fn convert_at(value: &StreamValue, depth: usize) -> Result<AttributeValue, String> {
    if depth > MAX_DEPTH {
        return Err(format!("attribute nested deeper than {MAX_DEPTH} levels"));
    }
    Ok(match value {
        StreamValue::S(s) => AttributeValue::S(s.clone()),
        StreamValue::N(n) => AttributeValue::N(n.clone()),
        StreamValue::B(b) => AttributeValue::B(b.clone()),
        StreamValue::Bool(b) => AttributeValue::Bool(*b),
        StreamValue::Null(b) => AttributeValue::Null(*b),
        StreamValue::Ss(values) => AttributeValue::Ss(values.clone()),
        StreamValue::Ns(values) => AttributeValue::Ns(values.clone()),
        StreamValue::Bs(values) => AttributeValue::Bs(values.clone()),
        StreamValue::L(values) => {
            AttributeValue::L(values.iter().map(|v| convert_at(v, depth + 1)).collect::<Result<_, _>>()?)
        }
        StreamValue::M(map) => AttributeValue::M(convert_map(map, depth + 1)?),
        _ => return Err("attribute of a type this SDK does not know".to_owned()),
    })
}

fn convert_map(map: &HashMap<String, StreamValue>, depth: usize) -> Result<HashMap<String, AttributeValue>, String> {
    map.iter()
        .map(|(name, value)| convert_at(value, depth).map(|v| (name.clone(), v)).map_err(|e| format!("{name}: {e}")))
        .collect()
}

/// Converts a stream image (`NewImage`, `Keys`) into a table item.
pub(crate) fn image_to_item(image: &HashMap<String, StreamValue>) -> Result<Item, String> {
    convert_map(image, 0)
}

fn string_key<'a>(image: Option<&'a HashMap<String, StreamValue>>, name: &str) -> Option<&'a str> {
    match image?.get(name) {
        Some(StreamValue::S(value)) => Some(value),
        _ => None,
    }
}

/// Whether a stream record writes a version item (`pk = R#…`, `sk = V#…`): the only records
/// that become events. An INSERT, or a MODIFY — a version item is only ever replaced when it was
/// left behind by an aborted staged transaction (see `design.md`, "Large commits"). Pointer,
/// change-log, counter, transaction and checkpoint items, and every REMOVE, are not.
fn is_version_write(record: &Record) -> bool {
    if !matches!(record.event_name(), Some(OperationType::Insert | OperationType::Modify)) {
        return false;
    }
    let Some(data) = record.dynamodb() else { return false };
    // The keys are always in the record; the new image repeats them.
    let pk = string_key(data.keys(), PK).or_else(|| string_key(data.new_image(), PK));
    let sk = string_key(data.keys(), SK).or_else(|| string_key(data.new_image(), SK));
    matches!((pk, sk), (Some(pk), Some(sk)) if pk.starts_with("R#") && sk.starts_with(VERSION_PREFIX))
}

/// A version write read from the stream.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct VersionEvent {
    pub event: ResourceChanged,
    /// The staged transaction that wrote it: the event is published only once that commits.
    pub txn: Option<String>,
}

/// The event a stream record stands for: `Ok(None)` for records that are not version writes,
/// `Err` for a version write whose image cannot be decoded (the caller logs and skips it).
pub(crate) fn event_from_record(record: &Record) -> Result<Option<VersionEvent>, StoreError> {
    if !is_version_write(record) {
        return Ok(None);
    }
    let image = record.dynamodb().and_then(|data| data.new_image()).ok_or_else(|| {
        StoreError::Internal(
            "a version insert without a new image: the stream must carry NEW_IMAGE or NEW_AND_OLD_IMAGES".to_owned(),
        )
    })?;
    let item = image_to_item(image)
        .map_err(|e| StoreError::Internal(format!("cannot convert the stream image of a version item: {e}")))?;
    // A body kept in the blob store is not in the image: the event goes without it
    // (`body_omitted`), and consumers read the version from the store.
    let change = change_from_version_item(&item)?;
    let event = ResourceChanged::from(change);
    Ok(Some(VersionEvent { event, txn: txn_of(&item, "txn").map(str::to_owned) }))
}

/// The sequence number of a stream record, when it carries one.
pub(crate) fn sequence_number(record: &Record) -> Option<&str> {
    record.dynamodb().and_then(|data| data.sequence_number())
}

#[cfg(test)]
mod tests {
    use aws_sdk_dynamodb::primitives::Blob;
    use aws_sdk_dynamodbstreams::types::StreamRecord;
    use fhirmesh_core::model::Operation;

    use super::*;

    fn s(value: &str) -> StreamValue {
        StreamValue::S(value.to_owned())
    }

    fn n(value: u64) -> StreamValue {
        StreamValue::N(value.to_string())
    }

    fn version_image(sk: &str) -> HashMap<String, StreamValue> {
        HashMap::from([
            ("pk".to_owned(), s("R#t1#Patient#p1")),
            ("sk".to_owned(), s(sk)),
            ("tenant".to_owned(), s("t1")),
            ("type".to_owned(), s("Patient")),
            ("id".to_owned(), s("p1")),
            ("ver".to_owned(), n(2)),
            ("seq".to_owned(), n(7)),
            ("cend".to_owned(), n(8)),
            ("lu".to_owned(), n(1_700_000_000_000_000)),
            ("op".to_owned(), s("update")),
            ("body".to_owned(), StreamValue::B(Blob::new(b"{\"resourceType\":\"Patient\"}".to_vec()))),
        ])
    }

    fn record(event: OperationType, image: HashMap<String, StreamValue>, sequence: &str) -> Record {
        let keys: HashMap<String, StreamValue> = image
            .iter()
            .filter(|(name, _)| *name == "pk" || *name == "sk")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let data =
            StreamRecord::builder().set_keys(Some(keys)).set_new_image(Some(image)).sequence_number(sequence).build();
        Record::builder().event_name(event).dynamodb(data).build()
    }

    #[test]
    fn every_attribute_type_converts() {
        let blob = Blob::new(vec![1, 2, 3]);
        let cases = vec![
            (s("x"), AttributeValue::S("x".into())),
            (n(5), AttributeValue::N("5".into())),
            (StreamValue::B(blob.clone()), AttributeValue::B(blob.clone())),
            (StreamValue::Bool(true), AttributeValue::Bool(true)),
            (StreamValue::Null(true), AttributeValue::Null(true)),
            (StreamValue::Ss(vec!["a".into(), "b".into()]), AttributeValue::Ss(vec!["a".into(), "b".into()])),
            (StreamValue::Ns(vec!["1".into(), "2.5".into()]), AttributeValue::Ns(vec!["1".into(), "2.5".into()])),
            (StreamValue::Bs(vec![blob.clone()]), AttributeValue::Bs(vec![blob.clone()])),
            (
                StreamValue::L(vec![s("a"), StreamValue::L(vec![n(1)]), StreamValue::M(HashMap::new())]),
                AttributeValue::L(vec![
                    AttributeValue::S("a".into()),
                    AttributeValue::L(vec![AttributeValue::N("1".into())]),
                    AttributeValue::M(HashMap::new()),
                ]),
            ),
            (
                StreamValue::M(HashMap::from([(
                    "k".to_owned(),
                    StreamValue::M(HashMap::from([("z".to_owned(), n(0))])),
                )])),
                AttributeValue::M(HashMap::from([(
                    "k".to_owned(),
                    AttributeValue::M(HashMap::from([("z".to_owned(), AttributeValue::N("0".into()))])),
                )])),
            ),
        ];
        for (stream, table) in cases {
            assert_eq!(convert_value(&stream), Ok(table), "{stream:?}");
        }
    }

    #[test]
    fn unknown_variants_and_absurd_nesting_are_errors() {
        let mut deep = s("leaf");
        for _ in 0..=MAX_DEPTH + 1 {
            deep = StreamValue::L(vec![deep]);
        }
        assert!(convert_value(&deep).is_err());
        let image = HashMap::from([("a".to_owned(), deep)]);
        let err = image_to_item(&image).expect_err("too deep");
        assert!(err.starts_with("a: "), "names the attribute: {err}");
        // Just within the limit still converts.
        let mut fine = s("leaf");
        for _ in 0..MAX_DEPTH {
            fine = StreamValue::L(vec![fine]);
        }
        assert!(convert_value(&fine).is_ok());
    }

    #[test]
    fn version_inserts_become_events() {
        let written = event_from_record(&record(OperationType::Insert, version_image("V#00000000000000000002"), "100"))
            .expect("decodes")
            .expect("an event");
        assert_eq!(written.txn, None);
        let event = written.event;
        assert_eq!((event.version_id, event.sequence, event.commit_end), (2, 7, 8));
        assert_eq!(event.operation, Operation::Update);
        assert_eq!(event.idempotency_key, "t1/Patient/p1/_history/2");
        assert_eq!(event.traceparent, None);
        // The write's trace context rides on the version item to the event.
        let mut traced = version_image("V#00000000000000000002");
        traced.insert("tp".to_owned(), s("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        let written =
            event_from_record(&record(OperationType::Insert, traced, "101")).expect("decodes").expect("event");
        assert_eq!(
            written.event.traceparent.as_deref(),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
        assert_eq!(event.resource.as_deref(), Some(&b"{\"resourceType\":\"Patient\"}"[..]));
    }

    #[test]
    fn replaced_and_staged_versions_are_events_that_name_their_transaction() {
        let mut staged = version_image("V#00000000000000000002");
        staged.insert("txn".to_owned(), s("tx1"));
        let written = event_from_record(&record(OperationType::Modify, staged, "3")).expect("decodes").expect("event");
        assert_eq!(written.txn.as_deref(), Some("tx1"));
        assert_eq!(written.event.version_id, 2);
        // A body in the blob store: the event carries none and says so.
        let mut offloaded = version_image("V#00000000000000000002");
        offloaded.remove("body");
        offloaded.insert("blob".to_owned(), s("resources/Patient/p1/2-00.json"));
        offloaded.insert("blen".to_owned(), n(400_000));
        let written =
            event_from_record(&record(OperationType::Insert, offloaded, "4")).expect("decodes").expect("event");
        assert!(written.event.body_omitted());
    }

    #[test]
    fn other_items_and_other_operations_are_not_events() {
        let version = version_image("V#00000000000000000002");
        assert_eq!(event_from_record(&record(OperationType::Remove, version.clone(), "1")), Ok(None));
        let transaction = HashMap::from([("pk".to_owned(), s("X#abc")), ("sk".to_owned(), s("X"))]);
        assert_eq!(event_from_record(&record(OperationType::Insert, transaction, "1")), Ok(None));
        let pointer = HashMap::from([
            ("pk".to_owned(), s("R#t1#Patient#p1")),
            ("sk".to_owned(), s("C")),
            ("ver".to_owned(), n(2)),
        ]);
        let change = HashMap::from([("pk".to_owned(), s("L#0")), ("sk".to_owned(), s("00000000000000000007"))]);
        let counter = HashMap::from([("pk".to_owned(), s("S")), ("sk".to_owned(), s("S")), ("last".to_owned(), n(7))]);
        let checkpoint = HashMap::from([("pk".to_owned(), s("K#relay")), ("sk".to_owned(), s("K"))]);
        for image in [pointer, change, counter, checkpoint] {
            assert_eq!(event_from_record(&record(OperationType::Insert, image, "1")), Ok(None));
        }
        // No payload at all: nothing to publish, nothing to panic about.
        assert_eq!(event_from_record(&Record::builder().event_name(OperationType::Insert).build()), Ok(None));
    }

    #[test]
    fn undecodable_version_images_are_errors() {
        let mut broken = version_image("V#00000000000000000002");
        broken.insert("ver".to_owned(), s("two"));
        assert!(event_from_record(&record(OperationType::Insert, broken, "1")).is_err());
        let mut unknown_type = version_image("V#00000000000000000002");
        unknown_type.insert("type".to_owned(), s("NoSuchType"));
        assert!(event_from_record(&record(OperationType::Insert, unknown_type, "1")).is_err());
        // Keys only (a stream without images): a version insert that cannot be decoded.
        let keys_only = Record::builder()
            .event_name(OperationType::Insert)
            .dynamodb(
                StreamRecord::builder()
                    .keys("pk", s("R#t1#Patient#p1"))
                    .keys("sk", s("V#00000000000000000001"))
                    .sequence_number("5")
                    .build(),
            )
            .build();
        let err = event_from_record(&keys_only).expect_err("no image");
        assert!(err.to_string().contains("NEW_IMAGE"), "{err}");
        assert_eq!(sequence_number(&keys_only), Some("5"));
    }
}
