//! The NATS JetStream adapter against a real nats-server (started by `tools/testinfra/with-infra.sh`).
//! Every test uses its own streams, subject prefixes and durable names, so they run in parallel;
//! every wait is bounded.

use std::future::Future;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream::StorageType};
use bytes::Bytes;
use fhirmesh_bus::nats::{NatsBus, NatsConfig, NatsConsumer};
use fhirmesh_core::ports::{BusError, Delivery, EventConsumer, EventPublisher};
use fhirmesh_core::{Operation, ResourceChanged, TenantId};
use fhirmesh_fhir::{LogicalId, ResourceType};
use fhirmesh_proto::{decode_resource_changed, encode_resource_changed};
use fhirmesh_testinfra::{nats_url, unique_name};

const TEST_BOUND: Duration = Duration::from_secs(25);
const ACK_WAIT: Duration = Duration::from_secs(1);

/// Runs a test body with an overall time limit.
async fn bounded<F: Future<Output = ()>>(body: F) {
    tokio::time::timeout(TEST_BOUND, body).await.expect("test exceeded its time limit");
}

fn test_config() -> NatsConfig {
    NatsConfig {
        url: nats_url(),
        connection_name: "fhirmesh-bus-tests".to_owned(),
        stream: unique_name("CHANGES"),
        subject_prefix: format!("test.{}", unique_name("changes")),
        dead_letter_stream: unique_name("DLQ"),
        dead_letter_subject_prefix: format!("test.{}", unique_name("dlq")),
        ack_wait: ACK_WAIT,
        max_deliver: 3,
        connect_attempts: 2,
        nak_delay: Duration::from_millis(100),
        ..NatsConfig::default()
    }
}

struct Fixture {
    bus: NatsBus,
    config: NatsConfig,
    /// A plain JetStream context, to look at the streams the way an operator would.
    js: jetstream::Context,
}

async fn fixture(config: NatsConfig) -> Fixture {
    let bus = NatsBus::connect(config.clone()).await.expect("connect to nats");
    bus.provision().await.expect("provision");
    let client = async_nats::connect(nats_url()).await.expect("raw nats connection");
    Fixture { bus, config, js: jetstream::new(client) }
}

fn event(tenant: &str, resource_type: &str, id: &str, version_id: u64) -> ResourceChanged {
    let tenant = TenantId::parse(tenant).expect("valid tenant");
    let resource_type = ResourceType::parse(resource_type).expect("known resource type");
    let id = LogicalId::parse(id).expect("valid id");
    ResourceChanged {
        idempotency_key: ResourceChanged::idempotency_key_for(&tenant, resource_type, &id, version_id),
        resource: Some(Bytes::from(format!(r#"{{"resourceType":"{resource_type}","id":"{id}"}}"#))),
        tenant,
        resource_type,
        id,
        version_id,
        operation: if version_id == 1 { Operation::Create } else { Operation::Update },
        last_updated: time::OffsetDateTime::from_unix_timestamp(1_700_000_000).expect("timestamp"),
        sequence: version_id,
        commit_end: version_id,
        traceparent: None,
    }
}

/// Fetches until `n` deliveries arrived or `within` passed.
async fn fetch_n(consumer: &NatsConsumer, n: usize, within: Duration) -> Vec<Delivery> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    while got.len() < n && Instant::now() < deadline {
        let batch = consumer.fetch(n - got.len(), Duration::from_millis(500)).await.expect("fetch");
        got.extend(batch);
    }
    got
}

/// Waits (at most 5 s) until the consumer's backlog is `want`.
async fn backlog_becomes(consumer: &NatsConsumer, want: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let backlog = consumer.backlog().await.expect("backlog");
        if backlog == Some(want) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "backlog {backlog:?}, want {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn stream_messages(js: &jetstream::Context, stream: &str) -> u64 {
    let mut stream = js.get_stream(stream).await.expect("stream exists");
    stream.info().await.expect("stream info").state.messages
}

async fn raw_message(js: &jetstream::Context, stream: &str, sequence: u64) -> jetstream::message::StreamMessage {
    let stream = js.get_stream(stream).await.expect("stream exists");
    stream.get_raw_message(sequence).await.expect("stored message")
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).map(|v| v.as_str())
}

#[tokio::test]
async fn published_events_are_consumed_acked_and_not_redelivered() {
    bounded(async {
        let f = fixture(test_config()).await;
        let consumer = f.bus.consumer("indexer").await.expect("consumer");
        let mut first = event("acme", "Patient", "p1", 1);
        first.traceparent = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned());
        let second = event("acme", "Patient", "p1", 2);
        assert_eq!(consumer.backlog().await, Ok(Some(0)));
        f.bus.publish(&[first.clone(), second.clone()]).await.expect("publish");
        assert_eq!(consumer.backlog().await, Ok(Some(2)), "published, not delivered");

        let deliveries = fetch_n(&consumer, 2, Duration::from_secs(5)).await;
        assert_eq!(consumer.backlog().await, Ok(Some(2)), "delivered, not acknowledged");
        let events: Vec<ResourceChanged> = deliveries.iter().map(|d| (*d.event).clone()).collect();
        assert_eq!(events, vec![first, second]);
        assert!(deliveries.iter().all(|d| d.attempt == 1), "{deliveries:?}");
        for delivery in &deliveries {
            delivery.ack.ack().await.expect("ack");
            delivery.ack.ack().await.expect("a second ack is harmless");
        }
        backlog_becomes(&consumer, 0).await;

        // Well past ack_wait: nothing comes back.
        let again = consumer.fetch(10, ACK_WAIT + Duration::from_millis(700)).await.expect("fetch");
        assert!(again.is_empty(), "acknowledged events were redelivered: {again:?}");
    })
    .await;
}

#[tokio::test]
async fn an_unacknowledged_event_comes_back_after_ack_wait_as_attempt_two() {
    bounded(async {
        let f = fixture(test_config()).await;
        let consumer = f.bus.consumer("slow").await.expect("consumer");
        let published = event("acme", "Observation", "o1", 1);
        f.bus.publish(std::slice::from_ref(&published)).await.expect("publish");

        let first = fetch_n(&consumer, 1, Duration::from_secs(5)).await;
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].attempt, 1);

        let started = Instant::now();
        let second = fetch_n(&consumer, 1, Duration::from_secs(5)).await;
        assert_eq!(second.len(), 1, "the event was not redelivered");
        // At least 2: under load a redelivery can reach a pull that expired as it arrived; the
        // server counts that delivery too (at-least-once), and the next one is attempt 3.
        assert!(second[0].attempt >= 2, "a redelivery counts up: attempt {}", second[0].attempt);
        assert_eq!(*second[0].event, published);
        assert!(started.elapsed() >= ACK_WAIT / 2, "redelivered before ack_wait: {:?}", started.elapsed());
        second[0].ack.ack().await.expect("ack");
    })
    .await;
}

#[tokio::test]
async fn in_progress_holds_off_redelivery() {
    bounded(async {
        let config = NatsConfig { ack_wait: Duration::from_secs(2), ..test_config() };
        let f = fixture(config).await;
        let consumer = f.bus.consumer("busy").await.expect("consumer");
        f.bus.publish(&[event("acme", "Patient", "p1", 1)]).await.expect("publish");
        let deliveries = fetch_n(&consumer, 1, Duration::from_secs(5)).await;
        assert_eq!(deliveries.len(), 1);

        for _ in 0..2 {
            tokio::time::sleep(Duration::from_millis(1200)).await;
            deliveries[0].ack.in_progress().await.expect("in progress");
        }
        // 2.4 s after delivery, beyond the 2 s ack_wait, but the deadline was extended.
        let redelivered = consumer.fetch(10, Duration::from_millis(500)).await.expect("fetch");
        assert!(redelivered.is_empty(), "redelivered despite in_progress: {redelivered:?}");
        deliveries[0].ack.ack().await.expect("ack");
    })
    .await;
}

#[tokio::test]
async fn a_nak_on_the_last_attempt_dead_letters_the_event() {
    bounded(async {
        let config = NatsConfig { max_deliver: 2, ..test_config() };
        let f = fixture(config).await;
        let consumer = f.bus.consumer("failing").await.expect("consumer");
        let mut published = event("acme", "Patient", "p7", 4);
        published.traceparent = Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned());
        f.bus.publish(std::slice::from_ref(&published)).await.expect("publish");

        let first = fetch_n(&consumer, 1, Duration::from_secs(5)).await;
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].attempt, 1);
        first[0].ack.nak(Some(Duration::ZERO)).await.expect("nak");

        let second = fetch_n(&consumer, 1, Duration::from_secs(5)).await;
        assert_eq!(second.len(), 1, "a nak'd event must come back");
        // At least 2: under load a redelivery can reach a pull that expired as it arrived; the
        // server counts that delivery too (at-least-once), and the next one is attempt 3.
        assert!(second[0].attempt >= 2, "a redelivery counts up: attempt {}", second[0].attempt);
        second[0].ack.nak(None).await.expect("nak on the last attempt");

        let dead_letter = raw_message(&f.js, &f.config.dead_letter_stream, 1).await;
        assert_eq!(dead_letter.subject.as_str(), format!("{}.failing", f.config.dead_letter_subject_prefix));
        assert_eq!(decode_resource_changed(dead_letter.payload.clone()).expect("original body"), published);
        assert_eq!(header(&dead_letter.headers, "Fhirmesh-Dead-Letter-Consumer"), Some("failing"));
        assert_eq!(header(&dead_letter.headers, "Fhirmesh-Original-Msg-Id"), Some(published.idempotency_key.as_str()));
        assert_eq!(header(&dead_letter.headers, "Fhirmesh-Delivery-Attempts"), Some("2"));
        assert_eq!(header(&dead_letter.headers, "traceparent"), published.traceparent.as_deref());
        assert_eq!(
            header(&dead_letter.headers, "Fhirmesh-Original-Subject"),
            Some(format!("{}.acme.Patient", f.config.subject_prefix).as_str())
        );

        let after = consumer.fetch(10, ACK_WAIT + Duration::from_millis(700)).await.expect("fetch");
        assert!(after.is_empty(), "a dead-lettered event was delivered again: {after:?}");
        assert_eq!(stream_messages(&f.js, &f.config.dead_letter_stream).await, 1);
    })
    .await;
}

#[tokio::test]
async fn a_duplicate_publish_is_stored_once() {
    bounded(async {
        let f = fixture(test_config()).await;
        let once = event("acme", "Patient", "p1", 1);
        f.bus.publish(std::slice::from_ref(&once)).await.expect("first publish");
        f.bus.publish(std::slice::from_ref(&once)).await.expect("retried publish");
        f.bus.publish(&[once.clone(), once.clone()]).await.expect("duplicate within a batch");
        assert_eq!(stream_messages(&f.js, &f.config.stream).await, 1);

        let consumer = f.bus.consumer("dedup").await.expect("consumer");
        let deliveries = consumer.fetch(10, Duration::from_secs(1)).await.expect("fetch");
        assert_eq!(deliveries.len(), 1);
        assert_eq!(*deliveries[0].event, once);
    })
    .await;
}

#[tokio::test]
async fn subjects_name_the_tenant_and_resource_type_and_headers_carry_ids_and_traces() {
    bounded(async {
        let f = fixture(test_config()).await;
        let mut traced = event("tenant_a", "Patient", "p1", 1);
        traced.traceparent = Some("00-11111111111111111111111111111111-2222222222222222-01".to_owned());
        let untraced = event("tenant-b", "Observation", "o1", 1);
        f.bus.publish(&[traced.clone(), untraced.clone()]).await.expect("publish");

        let stored = raw_message(&f.js, &f.config.stream, 1).await;
        assert_eq!(stored.subject.as_str(), format!("{}.tenant_a.Patient", f.config.subject_prefix));
        assert_eq!(header(&stored.headers, "Nats-Msg-Id"), Some("tenant_a/Patient/p1/_history/1"));
        assert_eq!(header(&stored.headers, "traceparent"), traced.traceparent.as_deref());
        assert_eq!(decode_resource_changed(stored.payload).expect("protobuf body"), traced);

        let stored = raw_message(&f.js, &f.config.stream, 2).await;
        assert_eq!(stored.subject.as_str(), format!("{}.tenant-b.Observation", f.config.subject_prefix));
        assert_eq!(header(&stored.headers, "Nats-Msg-Id"), Some("tenant-b/Observation/o1/_history/1"));
        assert_eq!(header(&stored.headers, "traceparent"), None);
    })
    .await;
}

#[tokio::test]
async fn order_is_preserved_within_a_batch() {
    bounded(async {
        let f = fixture(test_config()).await;
        let batch: Vec<ResourceChanged> = (1..=300).map(|v| event("acme", "Patient", "p1", v)).collect();
        f.bus.publish(&batch).await.expect("publish");
        assert_eq!(stream_messages(&f.js, &f.config.stream).await, 300);

        let consumer = f.bus.consumer("ordered").await.expect("consumer");
        let deliveries = fetch_n(&consumer, 300, Duration::from_secs(10)).await;
        let versions: Vec<u64> = deliveries.iter().map(|d| d.event.version_id).collect();
        assert_eq!(versions, (1..=300).collect::<Vec<u64>>());
        for delivery in &deliveries {
            delivery.ack.ack().await.expect("ack");
        }
    })
    .await;
}

#[tokio::test]
async fn a_poison_message_is_dead_lettered_and_the_good_ones_are_delivered() {
    bounded(async {
        let f = fixture(test_config()).await;
        let consumer = f.bus.consumer("indexer").await.expect("consumer");
        let good1 = event("acme", "Patient", "p1", 1);
        let good2 = event("acme", "Patient", "p2", 1);
        f.bus.publish(std::slice::from_ref(&good1)).await.expect("publish");
        let subject = format!("{}.acme.Patient", f.config.subject_prefix);
        f.js.publish(subject.clone(), Bytes::from_static(b"\xff\xff\xffnot a protobuf event"))
            .await
            .expect("publish garbage")
            .await
            .expect("garbage stored");
        f.bus.publish(std::slice::from_ref(&good2)).await.expect("publish");

        let deliveries = fetch_n(&consumer, 2, Duration::from_secs(5)).await;
        let events: Vec<ResourceChanged> = deliveries.iter().map(|d| (*d.event).clone()).collect();
        assert_eq!(events, vec![good1, good2]);
        for delivery in &deliveries {
            delivery.ack.ack().await.expect("ack");
        }

        let dead_letter = raw_message(&f.js, &f.config.dead_letter_stream, 1).await;
        assert_eq!(dead_letter.subject.as_str(), format!("{}.indexer", f.config.dead_letter_subject_prefix));
        assert_eq!(dead_letter.payload.as_ref(), b"\xff\xff\xffnot a protobuf event");
        assert_eq!(header(&dead_letter.headers, "Fhirmesh-Original-Subject"), Some(subject.as_str()));
        assert_eq!(header(&dead_letter.headers, "Fhirmesh-Original-Sequence"), Some("2"));
        let reason = header(&dead_letter.headers, "Fhirmesh-Dead-Letter-Reason").unwrap_or_default();
        assert!(reason.starts_with("undecodable event"), "{reason}");

        // The poison message was terminated, not left to be redelivered.
        let after = consumer.fetch(10, ACK_WAIT + Duration::from_millis(700)).await.expect("fetch");
        assert!(after.is_empty(), "{after:?}");
        assert_eq!(stream_messages(&f.js, &f.config.dead_letter_stream).await, 1);
    })
    .await;
}

#[tokio::test]
async fn the_traceparent_header_fills_in_for_a_body_without_one() {
    bounded(async {
        let f = fixture(test_config()).await;
        let consumer = f.bus.consumer("tracing").await.expect("consumer");
        let published = event("acme", "Patient", "p1", 1);
        let mut headers = HeaderMap::new();
        headers.insert("traceparent", "00-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-bbbbbbbbbbbbbbbb-01");
        let subject = format!("{}.acme.Patient", f.config.subject_prefix);
        f.js.publish_with_headers(subject, headers, encode_resource_changed(&published))
            .await
            .expect("publish")
            .await
            .expect("stored");

        let deliveries = fetch_n(&consumer, 1, Duration::from_secs(5)).await;
        assert_eq!(deliveries.len(), 1);
        assert_eq!(
            deliveries[0].event.traceparent.as_deref(),
            Some("00-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-bbbbbbbbbbbbbbbb-01")
        );
    })
    .await;
}

#[tokio::test]
async fn provisioning_is_idempotent_and_keeps_operator_settings() {
    bounded(async {
        let config = test_config();
        // An operator created the stream first, with another duplicate window and a retention limit.
        let client = async_nats::connect(nats_url()).await.expect("raw nats connection");
        let js = jetstream::new(client);
        js.create_stream(jetstream::stream::Config {
            name: config.stream.clone(),
            subjects: vec![config.stream_subjects()],
            duplicate_window: Duration::from_secs(10),
            max_age: Duration::from_secs(3600),
            storage: StorageType::File,
            ..Default::default()
        })
        .await
        .expect("operator-created stream");

        let bus = NatsBus::connect(config.clone()).await.expect("connect");
        bus.provision().await.expect("first provision");
        bus.provision().await.expect("second provision");
        NatsBus::connect(config.clone()).await.expect("connect").provision().await.expect("another instance");

        let mut stream = js.get_stream(&config.stream).await.expect("change stream");
        let info = stream.info().await.expect("info");
        assert_eq!(info.config.subjects, vec![config.stream_subjects()]);
        assert_eq!(info.config.duplicate_window, config.duplicate_window);
        assert_eq!(info.config.max_age, Duration::from_secs(3600));
        assert_eq!(info.config.storage, StorageType::File);

        let mut dlq = js.get_stream(&config.dead_letter_stream).await.expect("dead-letter stream");
        let info = dlq.info().await.expect("info");
        assert_eq!(info.config.subjects, vec![config.dead_letter_stream_subjects()]);
        assert_eq!(info.config.storage, StorageType::File);

        bus.publish(&[event("acme", "Patient", "p1", 1)]).await.expect("publish after provisioning");
    })
    .await;
}

#[tokio::test]
async fn consumers_opened_with_the_same_durable_name_share_one_position() {
    bounded(async {
        let f = fixture(test_config()).await;
        let first = f.bus.consumer("shared").await.expect("consumer");
        let events: Vec<ResourceChanged> = (1..=3).map(|v| event("acme", "Patient", "p1", v)).collect();
        f.bus.publish(&events).await.expect("publish");

        let taken = fetch_n(&first, 2, Duration::from_secs(5)).await;
        assert_eq!(taken.iter().map(|d| d.event.version_id).collect::<Vec<_>>(), vec![1, 2]);
        for delivery in &taken {
            delivery.ack.ack().await.expect("ack");
        }
        drop(first);

        // Another process (another connection) opening the same durable consumer resumes there.
        let other_bus = NatsBus::connect(f.config.clone()).await.expect("second connection");
        let second = other_bus.consumer("shared").await.expect("same durable consumer");
        let rest = fetch_n(&second, 1, Duration::from_secs(5)).await;
        assert_eq!(rest.iter().map(|d| d.event.version_id).collect::<Vec<_>>(), vec![3]);
        rest[0].ack.ack().await.expect("ack");
        let nothing = second.fetch(10, Duration::from_millis(500)).await.expect("fetch");
        assert!(nothing.is_empty(), "{nothing:?}");
    })
    .await;
}

#[tokio::test]
async fn fetch_returns_as_soon_as_events_arrive_and_waits_at_most_wait_when_none_do() {
    bounded(async {
        let f = fixture(test_config()).await;
        let consumer = f.bus.consumer("latency").await.expect("consumer");
        assert!(consumer.fetch(0, Duration::from_secs(5)).await.expect("fetch nothing").is_empty());

        let started = Instant::now();
        let none = consumer.fetch(10, Duration::from_millis(500)).await.expect("fetch");
        assert!(none.is_empty());
        assert!(started.elapsed() < Duration::from_secs(3), "an empty fetch took {:?}", started.elapsed());

        f.bus.publish(&[event("acme", "Patient", "p1", 1)]).await.expect("publish");
        let started = Instant::now();
        let one = consumer.fetch(10, Duration::from_secs(8)).await.expect("fetch");
        assert_eq!(one.len(), 1);
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "fetch waited for a full batch instead of returning what was there: {:?}",
            started.elapsed()
        );
    })
    .await;
}

#[tokio::test]
async fn connecting_to_nothing_fails_with_the_url_in_the_error() {
    bounded(async {
        let config = NatsConfig {
            url: "nats://user:secret@127.0.0.1:1".to_owned(),
            connect_attempts: 2,
            connect_timeout: Duration::from_millis(500),
            ..NatsConfig::default()
        };
        match NatsBus::connect(config).await {
            Err(BusError::Unavailable(message)) => {
                assert!(message.contains("127.0.0.1:1"), "{message}");
                assert!(!message.contains("secret"), "credentials leaked: {message}");
            }
            other => panic!("expected Unavailable, got {other:?}"),
        }
    })
    .await;
}

#[tokio::test]
async fn publishing_without_a_stream_fails_after_bounded_retries() {
    bounded(async {
        let config = NatsConfig { publish_attempts: 3, ..test_config() };
        // Connected but never provisioned: no stream listens on the subjects.
        let bus = NatsBus::connect(config.clone()).await.expect("connect");
        let started = Instant::now();
        match bus.publish(&[event("acme", "Patient", "p1", 1)]).await {
            Err(BusError::Unavailable(message)) => {
                assert!(message.contains(&config.subject_prefix), "{message}");
                assert!(message.contains("3 attempt"), "{message}");
            }
            other => panic!("expected Unavailable, got {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(10), "retries took {:?}", started.elapsed());

        match bus.consumer("indexer").await {
            Err(BusError::Unavailable(message)) => assert!(message.contains(&config.stream), "{message}"),
            other => panic!("expected Unavailable, got {other:?}"),
        }
    })
    .await;
}

#[tokio::test]
async fn invalid_durable_names_and_configs_are_refused() {
    bounded(async {
        let f = fixture(test_config()).await;
        for name in ["", "a.b", "a b", "x>"] {
            assert!(
                matches!(f.bus.consumer(name).await, Err(BusError::Unavailable(m)) if m.contains("durable")),
                "{name:?} was accepted"
            );
        }
        let bad = NatsConfig { subject_prefix: "a.*".to_owned(), ..test_config() };
        assert!(matches!(NatsBus::connect(bad).await, Err(BusError::Unavailable(m)) if m.contains("subject_prefix")));
    })
    .await;
}

#[tokio::test]
async fn a_consumer_deleted_on_the_server_is_recreated_by_the_next_fetch() {
    bounded(async {
        let f = fixture(test_config()).await;
        let consumer = f.bus.consumer("recreated").await.expect("consumer");
        let published = event("acme", "Patient", "p1", 1);
        f.bus.publish(std::slice::from_ref(&published)).await.expect("publish");

        let stream = f.js.get_stream(&f.config.stream).await.expect("stream");
        stream.delete_consumer("recreated").await.expect("operator deletes the consumer");

        let deliveries = fetch_n(&consumer, 1, Duration::from_secs(8)).await;
        assert_eq!(deliveries.len(), 1, "the fetch did not recover the consumer");
        assert_eq!(*deliveries[0].event, published);
        deliveries[0].ack.ack().await.expect("ack on the re-created consumer");
        stream.consumer_info("recreated").await.expect("the durable consumer exists again");
    })
    .await;
}

/// A nats-server of this test's own, so it can be restarted; killed (by its PID) when dropped.
struct OwnServer {
    child: Option<std::process::Child>,
    port: u16,
    store: std::path::PathBuf,
}

impl OwnServer {
    fn start(port: u16, store: std::path::PathBuf) -> OwnServer {
        let child = Self::spawn(port, &store);
        OwnServer { child: Some(child), port, store }
    }

    fn spawn(port: u16, store: &std::path::Path) -> std::process::Child {
        std::process::Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(store)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nats-server is installed (tools/testinfra/with-infra.sh checks it)")
    }

    async fn wait_until_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "own nats-server did not start on port {}", self.port);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the server and starts it again on the same port and store.
    async fn restart(&mut self) {
        self.stop();
        self.child = Some(Self::spawn(self.port, &self.store));
        self.wait_until_listening().await;
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.store);
    }
}

#[tokio::test]
async fn publisher_and_consumer_survive_a_server_restart() {
    bounded(async {
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("free port").local_addr().expect("addr").port();
        let store = std::env::temp_dir().join(unique_name("fhirmesh-nats-restart"));
        let mut server = OwnServer::start(port, store);
        server.wait_until_listening().await;

        let config = NatsConfig {
            url: format!("nats://127.0.0.1:{port}"),
            request_timeout: Duration::from_secs(1),
            ..test_config()
        };
        let bus = NatsBus::connect(config).await.expect("connect");
        bus.provision().await.expect("provision");
        let consumer = bus.consumer("survivor").await.expect("consumer");
        let before = event("acme", "Patient", "p1", 1);
        bus.publish(std::slice::from_ref(&before)).await.expect("publish before the restart");
        let deliveries = fetch_n(&consumer, 1, Duration::from_secs(5)).await;
        assert_eq!(deliveries.len(), 1);
        deliveries[0].ack.ack().await.expect("ack");

        server.restart().await;

        let after = event("acme", "Patient", "p1", 2);
        bus.publish(std::slice::from_ref(&after)).await.expect("publish after the restart");
        let deliveries = fetch_n(&consumer, 1, Duration::from_secs(8)).await;
        assert_eq!(deliveries.len(), 1, "the consumer lost its way after the restart");
        assert_eq!(*deliveries[0].event, after, "the consumer's position was lost");
        deliveries[0].ack.ack().await.expect("ack after the restart");
    })
    .await;
}

#[tokio::test]
async fn a_consumer_at_max_ack_pending_gets_nothing_rather_than_an_error() {
    bounded(async {
        let config = NatsConfig { max_ack_pending: 1, ack_wait: Duration::from_secs(10), ..test_config() };
        let f = fixture(config).await;
        let consumer = f.bus.consumer("backpressured").await.expect("consumer");
        let events: Vec<ResourceChanged> = (1..=2).map(|v| event("acme", "Patient", "p1", v)).collect();
        f.bus.publish(&events).await.expect("publish");

        let held = consumer.fetch(10, Duration::from_secs(2)).await.expect("fetch");
        assert_eq!(held.iter().map(|d| d.event.version_id).collect::<Vec<_>>(), vec![1]);

        let started = Instant::now();
        let blocked = consumer.fetch(10, Duration::from_millis(500)).await.expect("a full consumer is not an error");
        assert!(blocked.is_empty(), "{blocked:?}");
        assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());

        held[0].ack.ack().await.expect("ack");
        let next = fetch_n(&consumer, 1, Duration::from_secs(5)).await;
        assert_eq!(next.iter().map(|d| d.event.version_id).collect::<Vec<_>>(), vec![2]);
    })
    .await;
}
