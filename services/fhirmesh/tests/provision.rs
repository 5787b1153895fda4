//! `fhirmesh provision` against moto: creates the DynamoDB table, lease table and export job
//! table, the SNS topic
//! with the consumers' SQS queues and dead-letter queues, and the S3 bucket — and a second run
//! finds them all and changes nothing.

mod support;

use fhirmesh_testinfra::{aws_endpoint, unique_name};

fn provision(env: &[(&str, String)]) -> String {
    let env: Vec<(String, String)> = env.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect();
    support::provision(&env)
}

#[test]
fn provision_creates_every_backend_once() {
    let (table, topic, prefix, bucket) =
        (unique_name("prov"), unique_name("prov"), unique_name("prov"), unique_name("prov"));
    let env = [
        ("FHIRMESH_AWS__ENDPOINT_URL", aws_endpoint()),
        ("FHIRMESH_AWS__REGION", "us-east-1".to_owned()),
        ("FHIRMESH_STORAGE__BACKEND", "dynamodb".to_owned()),
        ("FHIRMESH_DYNAMODB__TABLE", table.clone()),
        ("FHIRMESH_BUS__BACKEND", "sns_sqs".to_owned()),
        ("FHIRMESH_SNS_SQS__TOPIC_NAME", topic.clone()),
        ("FHIRMESH_SNS_SQS__QUEUE_PREFIX", prefix.clone()),
        ("FHIRMESH_BLOB__BACKEND", "s3".to_owned()),
        ("FHIRMESH_BLOB__BUCKET", bucket.clone()),
    ];
    let first = provision(&env);
    assert!(first.contains(&format!("DynamoDB table {table}: created (stream arn:")), "{first}");
    assert!(first.contains(&format!("DynamoDB lease table {table}-leases (Streams relay): created")), "{first}");
    assert!(
        first.contains(&format!("SNS topic {topic} and SQS queues {prefix}-indexer, {prefix}-notifier")),
        "{first}"
    );
    assert!(first.contains(&format!("DynamoDB export job table {table}-jobs: created")), "{first}");
    assert!(first.contains(&format!("S3 bucket {bucket}: ready")), "{first}");

    let second = provision(&env);
    assert!(second.contains(&format!("DynamoDB table {table}: exists")), "{second}");
    assert!(second.contains(&format!("DynamoDB lease table {table}-leases (Streams relay): exists")), "{second}");
    assert!(second.contains(&format!("DynamoDB export job table {table}-jobs: exists")), "{second}");
}

#[test]
fn provision_on_the_embedded_backends_has_nothing_to_create() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = provision(&[("FHIRMESH_STORAGE__DATA_DIR", dir.path().display().to_string())]);
    assert!(out.contains("resources: SQLite under"), "{out}");
    assert!(out.contains("event bus: in-process (nothing to create)"), "{out}");
    assert!(out.contains("blobs: local files"), "{out}");
}
