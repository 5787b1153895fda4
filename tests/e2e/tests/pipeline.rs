//! The scale-out event path in one process: the DynamoDB store (moto) → relay (from the change log,
//! or from DynamoDB Streams) → NATS JetStream or SNS + SQS → indexer, checked end to end: what is written over HTTP is found by search, and the
//! events really travelled on the external bus (a second durable consumer sees every one).

use std::collections::BTreeSet;
use std::time::Duration;

use fhirmesh::config::{BusBackend, Config, RelaySource};
use fhirmesh_core::ports::EventConsumer;
use fhirmesh_testkit::{TestServer, nats_url, unique_name, use_dynamodb};
use serde_json::json;

const PATIENTS: usize = 12;

/// Writes `PATIENTS` Patients of one family (and updates one, deletes another), then checks the
/// search answer; returns the ids written and the family.
async fn write_and_search(server: &TestServer) -> (BTreeSet<String>, String) {
    let family = unique_name("Pipeline");
    let mut ids = BTreeSet::new();
    for i in 0..PATIENTS {
        let (status, created) = server
            .create(&json!({"resourceType": "Patient", "name": [{"family": family, "given": [format!("n{i}")]}]}))
            .await;
        assert_eq!(status, 201, "{created}");
        ids.insert(created["id"].as_str().expect("id").to_owned());
    }
    let deleted = ids.iter().next().cloned().expect("one id");
    let response = server.client.delete(server.url(&format!("Patient/{deleted}"))).send().await.expect("delete");
    assert_eq!(response.status(), 204);
    // A search right after the writes sees them (read-your-writes through the external bus).
    let (status, found) = server.get(&format!("Patient?family={family}&_count=100")).await;
    assert_eq!(status, 200, "{found}");
    assert_eq!(found["total"], PATIENTS - 1, "{found}");
    (ids, family)
}

/// Every (id, operation) the observer consumer receives within the deadline, acknowledged.
async fn observe(consumer: &dyn EventConsumer, expected_events: usize) -> Vec<(String, String)> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while seen.len() < expected_events && tokio::time::Instant::now() < deadline {
        for delivery in consumer.fetch(100, Duration::from_secs(1)).await.expect("fetch") {
            seen.push((delivery.event.id.to_string(), delivery.event.operation.as_str().to_owned()));
            delivery.ack.ack().await.expect("ack");
        }
    }
    seen
}

fn expected(ids: &BTreeSet<String>) -> Vec<(String, String)> {
    let mut events: Vec<(String, String)> = ids.iter().map(|id| (id.clone(), "create".to_owned())).collect();
    events.push((ids.iter().next().cloned().expect("one id"), "delete".to_owned()));
    events.sort();
    events
}

/// A NATS stream of this test's own: the server's configuration, and an observer consumer.
struct TestNats {
    settings: fhirmesh_bus::NatsConfig,
}

impl TestNats {
    fn new() -> TestNats {
        TestNats {
            settings: fhirmesh_bus::NatsConfig {
                url: nats_url(),
                stream: unique_name("CHANGES"),
                subject_prefix: unique_name("changes"),
                dead_letter_stream: unique_name("DLQ"),
                dead_letter_subject_prefix: unique_name("dlq"),
                ..fhirmesh_bus::NatsConfig::default()
            },
        }
    }

    fn configure(&self, config: &mut Config) {
        config.bus.backend = BusBackend::Nats;
        config.bus.provision = true;
        config.nats.url = self.settings.url.clone();
        config.nats.stream = self.settings.stream.clone();
        config.nats.subject_prefix = self.settings.subject_prefix.clone();
        config.nats.dead_letter_stream = self.settings.dead_letter_stream.clone();
        config.nats.dead_letter_subject_prefix = self.settings.dead_letter_subject_prefix.clone();
    }

    /// A durable consumer of its own on the same stream, from the beginning.
    async fn observer(&self) -> fhirmesh_bus::nats::NatsConsumer {
        let bus = fhirmesh_bus::NatsBus::connect(self.settings.clone()).await.expect("connect");
        bus.consumer("observer").await.expect("consumer")
    }
}

/// An SNS topic and SQS queues of this test's own (on moto).
struct TestSnsSqs {
    settings: fhirmesh_bus::SnsSqsConfig,
}

impl TestSnsSqs {
    fn new() -> TestSnsSqs {
        TestSnsSqs {
            settings: fhirmesh_bus::SnsSqsConfig {
                topic_name: unique_name("changes"),
                queue_prefix: unique_name("fm"),
                ..fhirmesh_bus::SnsSqsConfig::default()
            },
        }
    }

    fn configure(&self, config: &mut Config) {
        config.aws.endpoint_url = Some(fhirmesh_testkit::aws_endpoint());
        config.aws.region = Some("us-east-1".into());
        config.bus.backend = BusBackend::SnsSqs;
        config.bus.provision = true;
        config.sns_sqs.topic_name = self.settings.topic_name.clone();
        config.sns_sqs.queue_prefix = self.settings.queue_prefix.clone();
    }

    /// The notifier's queue: provisioned with the indexer's, it receives the same events.
    async fn observer(&self) -> fhirmesh_bus::sns_sqs::SqsConsumer {
        let sdk = fhirmesh_testinfra::aws_config().await;
        fhirmesh_bus::SnsSqsBus::new(&sdk, self.settings.clone()).consumer("notifier")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_relay_nats_indexer() {
    nats_pipeline(RelaySource::ChangeLog).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_streams_relay_nats_indexer() {
    nats_pipeline(RelaySource::Streams).await;
}

async fn nats_pipeline(source: RelaySource) {
    let nats = TestNats::new();
    let server = TestServer::start_with(|config| {
        use_dynamodb(config);
        nats.configure(config);
        config.relay.source = source;
    })
    .await;
    let observer = nats.observer().await;

    let (ids, _) = write_and_search(&server).await;
    let mut seen = observe(&observer, PATIENTS + 1).await;
    seen.sort();
    assert_eq!(seen, expected(&ids), "every change crossed NATS exactly once");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_relay_sns_sqs_indexer() {
    let sns_sqs = TestSnsSqs::new();
    let server = TestServer::start_with(|config| {
        use_dynamodb(config);
        sns_sqs.configure(config);
    })
    .await;
    let observer = sns_sqs.observer().await;

    let (ids, _) = write_and_search(&server).await;
    let mut seen = observe(&observer, PATIENTS + 1).await;
    seen.sort();
    assert_eq!(seen, expected(&ids), "every change crossed SNS and SQS exactly once");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dynamodb_outage_is_a_503_with_retry_after() {
    let server = TestServer::start_with(|config| {
        use_dynamodb(config);
        // Nothing listens on the discard port; the table is not created at start-up.
        config.aws.endpoint_url = Some("http://127.0.0.1:9".into());
        config.dynamodb.create_table = false;
    })
    .await;
    let response = server.client.get(server.url("Patient/p1")).send().await.expect("read");
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("2"));
    let (_, outcome) = fhirmesh_testkit::status_and_json(response).await;
    assert_eq!(outcome["issue"][0]["code"], "transient", "{outcome}");
    let write = server.create(&json!({"resourceType": "Patient"})).await;
    assert_eq!(write.0, 503, "{}", write.1);
    server.stop().await;
}

/// Creates a Basic of about `size` bytes, checks search finds it (the indexer read its body from
/// the change log) and that the bus carried the event without the body.
async fn oversized_resource_travels_without_its_body(server: &TestServer, observer: &dyn EventConsumer, size: usize) {
    let (status, created) = server.create(&json!({"resourceType": "Basic", "code": {"text": "x".repeat(size)}})).await;
    assert_eq!(status, 201, "{}", created["issue"]);
    let id = created["id"].as_str().expect("id");
    let (status, found) = server.get(&format!("Basic?_id={id}&_elements=id")).await;
    assert_eq!(status, 200, "{found}");
    assert_eq!(found["total"], 1, "indexed from the store, not dropped as a delete: {found}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let deliveries = observer.fetch(10, Duration::from_secs(1)).await.expect("fetch");
        if let Some(event) = deliveries.iter().map(|d| &d.event).find(|e| e.id.as_str() == id) {
            assert!(event.body_omitted(), "a {size}-byte body does not fit the bus");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the event never arrived");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resource_too_large_for_nats_is_indexed_from_the_store() {
    let nats = TestNats::new();
    let server = TestServer::start_with(|config| nats.configure(config)).await;
    let observer = nats.observer().await;
    // NATS's default max_payload is 1 MiB.
    oversized_resource_travels_without_its_body(&server, &observer, 1_200_000).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resource_too_large_for_sns_is_indexed_from_the_store() {
    let sns_sqs = TestSnsSqs::new();
    let server = TestServer::start_with(|config| sns_sqs.configure(config)).await;
    let observer = sns_sqs.observer().await;
    // SNS takes 256 KiB per message (the body travels base64-encoded).
    oversized_resource_travels_without_its_body(&server, &observer, 300_000).await;
    server.stop().await;
}
