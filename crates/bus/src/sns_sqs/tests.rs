//! Unit tests of the pure parts (no I/O); the adapter itself is tested against moto in
//! `crates/bus/tests/sns_sqs.rs`.

use std::time::Duration;

use aws_sdk_sqs::types::{Message, MessageSystemAttributeName};
use fhirmesh_core::{Operation, ResourceChanged, TenantId};
use fhirmesh_fhir::{LogicalId, ResourceType};

use super::consumer::{decode_body, receive_count, whole_seconds_floor};
use super::publish::{MAX_BATCH_ENTRIES, MAX_PAYLOAD_BYTES, Outgoing, backoff, batch_ranges};
use super::*;

fn event(version: u64, traceparent: Option<&str>) -> ResourceChanged {
    let tenant = TenantId::parse("acme").expect("valid tenant");
    let resource_type = ResourceType::parse("Observation").expect("a resource type");
    let id = LogicalId::parse("obs-1").expect("valid id");
    ResourceChanged {
        idempotency_key: ResourceChanged::idempotency_key_for(&tenant, resource_type, &id, version),
        tenant,
        resource_type,
        id,
        version_id: version,
        operation: Operation::Update,
        last_updated: time::OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(1_700_000_000),
        sequence: 40 + version,
        commit_end: 40 + version,
        resource: Some(bytes::Bytes::from_static(br#"{"resourceType":"Observation","id":"obs-1"}"#)),
        traceparent: traceparent.map(str::to_owned),
    }
}

#[test]
fn batches_hold_at_most_ten_entries_in_order() {
    assert_eq!(batch_ranges(&[]), Vec::<std::ops::Range<usize>>::new());
    assert_eq!(batch_ranges(&[100; 25]), vec![0..10, 10..20, 20..25]);
    assert_eq!(batch_ranges(&[100; MAX_BATCH_ENTRIES]), vec![0..10]);
    assert_eq!(batch_ranges(&[1]), vec![0..1]);
}

#[test]
fn batches_stay_under_the_payload_limit() {
    let third = MAX_PAYLOAD_BYTES / 3;
    // Three thirds fit exactly; the fourth starts a new batch.
    assert_eq!(batch_ranges(&[third, third, third, third]), vec![0..3, 3..4]);
    // A message over the limit gets a batch of its own.
    assert_eq!(batch_ranges(&[10, MAX_PAYLOAD_BYTES + 1, 10]), vec![0..1, 1..2, 2..3]);
}

#[test]
fn backoff_grows_is_capped_and_jittered() {
    for _ in 0..100 {
        let first = backoff(1);
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100), "{first:?}");
        let third = backoff(3);
        assert!(third >= Duration::from_millis(200) && third <= Duration::from_millis(400), "{third:?}");
        let late = backoff(u32::MAX);
        assert!(late >= Duration::from_secs(1) && late <= Duration::from_secs(2), "{late:?}");
    }
}

#[test]
fn sqs_seconds_round_as_documented() {
    assert_eq!(whole_seconds_ceil(Duration::from_millis(1500), MAX_VISIBILITY_TIMEOUT), 2);
    assert_eq!(whole_seconds_ceil(Duration::ZERO, MAX_VISIBILITY_TIMEOUT), 0);
    assert_eq!(whole_seconds_ceil(Duration::from_secs(u64::MAX), MAX_VISIBILITY_TIMEOUT), 43_200);
    assert_eq!(whole_seconds_floor(Duration::from_millis(1999), MAX_LONG_POLL), 1);
    assert_eq!(whole_seconds_floor(Duration::from_millis(900), MAX_LONG_POLL), 0);
    assert_eq!(whole_seconds_floor(Duration::from_secs(3600), MAX_LONG_POLL), 20);
}

#[test]
fn an_event_survives_the_sns_encoding_with_its_attributes() {
    let original = event(3, Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"));
    let outgoing = Outgoing::new(&original);
    assert_eq!(decode_body(&outgoing.message).expect("decodes"), original);
    let names: Vec<&str> = outgoing.attributes.iter().map(|(name, _)| *name).collect();
    assert_eq!(
        names,
        [attributes::IDEMPOTENCY_KEY, attributes::TENANT, attributes::RESOURCE_TYPE, attributes::TRACEPARENT]
    );
    assert!(outgoing.attributes.contains(&(attributes::IDEMPOTENCY_KEY, "acme/Observation/obs-1/_history/3".into())));
    assert!(outgoing.attributes.contains(&(attributes::RESOURCE_TYPE, "Observation".into())));
    let attribute_bytes: usize = outgoing.attributes.iter().map(|(n, v)| n.len() + "String".len() + v.len()).sum();
    assert_eq!(outgoing.size, outgoing.message.len() + attribute_bytes);

    let untraced = Outgoing::new(&event(4, None));
    assert!(untraced.attributes.iter().all(|(name, _)| *name != attributes::TRACEPARENT));
}

#[test]
fn garbage_bodies_are_refused_without_panicking() {
    for body in ["", "not base64 at all!", "AAAA", "////", "aGVsbG8gd29ybGQ=", "\u{0}\u{ffff}"] {
        assert!(decode_body(body).is_err(), "{body:?} decoded");
    }
}

#[test]
fn the_receive_count_is_the_attempt() {
    let counted = Message::builder().attributes(MessageSystemAttributeName::ApproximateReceiveCount, "3").build();
    assert_eq!(receive_count(&counted), 3);
    assert_eq!(receive_count(&Message::builder().build()), 1);
    let nonsense = Message::builder().attributes(MessageSystemAttributeName::ApproximateReceiveCount, "x").build();
    assert_eq!(receive_count(&nonsense), 1);
    let zero = Message::builder().attributes(MessageSystemAttributeName::ApproximateReceiveCount, "0").build();
    assert_eq!(receive_count(&zero), 1);
}

#[test]
fn config_validation_names_the_wrong_value() {
    assert_eq!(SnsSqsConfig::default().validate(), Ok(()));
    let bad = |config: SnsSqsConfig, needle: &str| match config.validate() {
        Err(BusError::Unavailable(message)) => assert!(message.contains(needle), "{message}"),
        other => panic!("expected an error mentioning {needle}, got {other:?}"),
    };
    bad(SnsSqsConfig { topic_name: "has space".into(), ..Default::default() }, "topic name");
    bad(SnsSqsConfig { queue_prefix: String::new(), ..Default::default() }, "queue prefix");
    bad(SnsSqsConfig { max_receive_count: 0, ..Default::default() }, "max receive count");
    bad(SnsSqsConfig { visibility_timeout: Duration::from_secs(50_000), ..Default::default() }, "visibility");
    bad(SnsSqsConfig { message_retention: Duration::from_secs(1), ..Default::default() }, "message retention");
    bad(SnsSqsConfig { publish_attempts: 0, ..Default::default() }, "publish attempts");

    let config = SnsSqsConfig::default();
    assert_eq!(config.queue_name("indexer"), "fhirmesh-indexer");
    assert_eq!(config.dead_letter_queue_name("indexer"), "fhirmesh-indexer-dlq");
    assert_eq!(config.check_consumer("indexer"), Ok(()));
    assert!(config.check_consumer("in/dexer").is_err());
    assert!(config.check_consumer(&"x".repeat(80)).is_err());
}

#[test]
fn policies_are_the_json_sqs_expects() {
    assert_eq!(
        redrive_policy("arn:aws:sqs:us-east-1:123456789012:q-dlq", 5),
        r#"{"deadLetterTargetArn":"arn:aws:sqs:us-east-1:123456789012:q-dlq","maxReceiveCount":5}"#
    );
    assert_eq!(
        topic_may_send_policy("arn:q", "arn:t"),
        concat!(
            r#"{"Version":"2012-10-17","Statement":[{"Sid":"fhirmesh-topic-to-queue","Effect":"Allow","#,
            r#""Principal":{"Service":"sns.amazonaws.com"},"Action":"sqs:SendMessage","Resource":"arn:q","#,
            r#""Condition":{"ArnEquals":{"aws:SourceArn":"arn:t"}}}]}"#
        )
    );
    assert_eq!(json_string("a\"b\\c\nd"), r#""a\"b\\c\u000ad""#);
}
