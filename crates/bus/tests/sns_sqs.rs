//! The SNS + SQS bus against a real moto server (run under `tools/testinfra/with-infra.sh`).
//! Every test makes its own topic and queues (`unique_name`), so they run in parallel; every wait
//! is bounded.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use aws_sdk_sqs::types::{MessageAttributeValue, MessageSystemAttributeName, QueueAttributeName};
use base64::Engine;
use fhirmesh_bus::sns_sqs::{SnsSqsBus, SnsSqsConfig, SqsConsumer, attributes};
use fhirmesh_core::ports::{BusError, Delivery, EventConsumer, EventPublisher};
use fhirmesh_core::{Operation, ResourceChanged, TenantId};
use fhirmesh_fhir::{LogicalId, ResourceType};
use fhirmesh_testinfra::{aws_config, unique_name};

const CONSUMER: &str = "indexer";
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn config(visibility_secs: u64, max_receive_count: u32) -> SnsSqsConfig {
    SnsSqsConfig {
        topic_name: unique_name("fhirmesh-test-topic"),
        queue_prefix: unique_name("fhirmesh-test"),
        visibility_timeout: Duration::from_secs(visibility_secs),
        max_receive_count,
        nak_delay: Duration::ZERO,
        ..SnsSqsConfig::default()
    }
}

struct Setup {
    bus: SnsSqsBus,
    consumer: SqsConsumer,
    sqs: aws_sdk_sqs::Client,
    queue_url: String,
    dead_letter_url: String,
}

async fn setup(config: SnsSqsConfig) -> Setup {
    let sdk = aws_config().await;
    let bus = SnsSqsBus::new(&sdk, config);
    let provisioned = bus.provision(&[CONSUMER]).await.expect("provision");
    let queue = provisioned.queues.first().expect("one queue per consumer").clone();
    Setup {
        consumer: bus.consumer(CONSUMER),
        bus,
        sqs: aws_sdk_sqs::Client::new(&sdk),
        queue_url: queue.queue_url,
        dead_letter_url: queue.dead_letter_queue_url,
    }
}

fn event(id: &str, version: u64, traceparent: Option<&str>) -> ResourceChanged {
    let tenant = TenantId::parse("acme").expect("valid tenant");
    let resource_type = ResourceType::parse("Patient").expect("a resource type");
    let id = LogicalId::parse(id).expect("valid id");
    ResourceChanged {
        idempotency_key: ResourceChanged::idempotency_key_for(&tenant, resource_type, &id, version),
        tenant,
        resource_type,
        id,
        version_id: version,
        operation: Operation::Update,
        last_updated: time::OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(1_750_000_000),
        sequence: version,
        commit_end: version,
        resource: Some(bytes::Bytes::from(format!(r#"{{"resourceType":"Patient","id":"p","v":{version}}}"#))),
        traceparent: traceparent.map(str::to_owned),
    }
}

/// Fetches until `want` deliveries came or `within` passed.
async fn fetch_until(consumer: &SqsConsumer, want: usize, within: Duration) -> Vec<Delivery> {
    let deadline = Instant::now() + within;
    let mut out = Vec::new();
    while out.len() < want && Instant::now() < deadline {
        let batch = consumer.fetch(want - out.len(), Duration::from_secs(1)).await.expect("fetch");
        out.extend(batch);
    }
    out
}

/// Asserts nothing is delivered for `during`.
async fn assert_nothing_for(consumer: &SqsConsumer, during: Duration) {
    let deadline = Instant::now() + during;
    while Instant::now() < deadline {
        let batch = consumer.fetch(10, Duration::from_secs(1)).await.expect("fetch");
        assert!(batch.is_empty(), "unexpected deliveries: {batch:?}");
    }
}

/// Raw messages of a queue (with all attributes), until `want` came or `within` passed.
async fn raw_messages(
    sqs: &aws_sdk_sqs::Client,
    queue_url: &str,
    want: usize,
    within: Duration,
) -> Vec<aws_sdk_sqs::types::Message> {
    let deadline = Instant::now() + within;
    let mut out = Vec::new();
    while out.len() < want && Instant::now() < deadline {
        let received = sqs
            .receive_message()
            .queue_url(queue_url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .message_attribute_names("All")
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .send()
            .await
            .expect("receive raw");
        out.extend(received.messages.unwrap_or_default());
    }
    out
}

async fn queue_attribute(sqs: &aws_sdk_sqs::Client, queue_url: &str, name: QueueAttributeName) -> String {
    let out = sqs
        .get_queue_attributes()
        .queue_url(queue_url)
        .attribute_names(name.clone())
        .send()
        .await
        .expect("get queue attributes");
    out.attributes().and_then(|a| a.get(&name)).cloned().unwrap_or_default()
}

fn decode(body: Option<&str>) -> ResourceChanged {
    let bytes = base64::engine::general_purpose::STANDARD.decode(body.expect("a body")).expect("base64 body");
    fhirmesh_proto::decode_resource_changed(bytes::Bytes::from(bytes)).expect("an event")
}

#[tokio::test]
async fn published_events_arrive_once_and_an_ack_removes_them() {
    let s = setup(config(1, 5)).await;
    // A publisher that did not provision finds the topic by name.
    let publisher = SnsSqsBus::new(&aws_config().await, s.bus.config().clone());
    let events = [event("a", 1, Some(TRACEPARENT)), event("b", 1, None)];
    assert_eq!(s.consumer.backlog().await, Ok(Some(0)));
    publisher.publish(&events).await.expect("publish");
    assert_eq!(s.consumer.backlog().await, Ok(Some(2)), "published, not received");

    let deliveries = fetch_until(&s.consumer, 2, Duration::from_secs(10)).await;
    assert_eq!(deliveries.len(), 2, "{deliveries:?}");
    assert_eq!(s.consumer.backlog().await, Ok(Some(2)), "received, not deleted");
    let mut got: Vec<ResourceChanged> = deliveries.iter().map(|d| (*d.event).clone()).collect();
    got.sort_by(|x, y| x.idempotency_key.cmp(&y.idempotency_key));
    assert_eq!(got, events);
    assert!(deliveries.iter().all(|d| d.attempt == 1));
    for delivery in &deliveries {
        delivery.ack.ack().await.expect("ack");
    }
    // Longer than the 1 s visibility timeout: an unacknowledged message would be back by now.
    assert_nothing_for(&s.consumer, Duration::from_secs(3)).await;
    assert_eq!(queue_attribute(&s.sqs, &s.queue_url, QueueAttributeName::ApproximateNumberOfMessages).await, "0");
    assert_eq!(
        queue_attribute(&s.sqs, &s.queue_url, QueueAttributeName::ApproximateNumberOfMessagesNotVisible).await,
        "0"
    );
    assert_eq!(s.consumer.backlog().await, Ok(Some(0)));
}

#[tokio::test]
async fn an_unacknowledged_delivery_comes_back_with_the_next_attempt() {
    let s = setup(config(1, 5)).await;
    s.bus.publish(&[event("a", 7, None)]).await.expect("publish");
    let first = fetch_until(&s.consumer, 1, Duration::from_secs(10)).await;
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].attempt, 1);
    // Not settled: after the 1 s visibility timeout SQS delivers it again.
    let second = fetch_until(&s.consumer, 1, Duration::from_secs(10)).await;
    assert_eq!(second.len(), 1, "not redelivered");
    assert_eq!(second[0].attempt, 2);
    assert_eq!(second[0].event.idempotency_key, first[0].event.idempotency_key);
    second[0].ack.ack().await.expect("ack");
}

#[tokio::test]
async fn naks_past_max_receive_count_end_in_the_dead_letter_queue() {
    let s = setup(config(30, 2)).await;
    let original = event("doomed", 3, None);
    s.bus.publish(std::slice::from_ref(&original)).await.expect("publish");
    for attempt in 1..=2 {
        let got = fetch_until(&s.consumer, 1, Duration::from_secs(10)).await;
        assert_eq!(got.len(), 1, "attempt {attempt} not delivered");
        assert_eq!(got[0].attempt, attempt);
        // A 30 s visibility timeout: only the nak (no delay) makes it come back in time.
        got[0].ack.nak(Some(Duration::ZERO)).await.expect("nak");
    }
    // The third receive would exceed maxReceiveCount: the redrive policy moves it, undelivered.
    assert_nothing_for(&s.consumer, Duration::from_secs(2)).await;
    let dead = raw_messages(&s.sqs, &s.dead_letter_url, 1, Duration::from_secs(5)).await;
    assert_eq!(dead.len(), 1, "not in the dead-letter queue");
    assert_eq!(decode(dead[0].body()), original);
}

#[tokio::test]
async fn a_nak_with_a_delay_holds_the_message_back_that_long() {
    let s = setup(config(30, 5)).await;
    s.bus.publish(&[event("later", 1, None)]).await.expect("publish");
    let got = fetch_until(&s.consumer, 1, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 1);
    let naked_at = Instant::now();
    got[0].ack.nak(Some(Duration::from_secs(2))).await.expect("nak");
    let again = fetch_until(&s.consumer, 1, Duration::from_secs(10)).await;
    assert_eq!(again.len(), 1, "not redelivered after the nak delay");
    assert!(naked_at.elapsed() >= Duration::from_millis(1500), "redelivered after {:?}", naked_at.elapsed());
    assert_eq!(again[0].attempt, 2);
    again[0].ack.ack().await.expect("ack");
}

#[tokio::test]
async fn provisioning_twice_changes_nothing() {
    let sdk = aws_config().await;
    let config = config(7, 4);
    let bus = SnsSqsBus::new(&sdk, config.clone());
    let first = bus.provision(&[CONSUMER, "relay"]).await.expect("first provision");
    // A second instance (another service starting) provisions the same names.
    let second = SnsSqsBus::new(&sdk, config.clone()).provision(&[CONSUMER, "relay"]).await.expect("again");
    assert_eq!(first, second);
    assert_eq!(first.queues.len(), 2);

    let sns = aws_sdk_sns::Client::new(&sdk);
    let subscriptions =
        sns.list_subscriptions_by_topic().topic_arn(&first.topic_arn).send().await.expect("list subscriptions");
    let endpoints: BTreeSet<&str> = subscriptions.subscriptions().iter().filter_map(|s| s.endpoint()).collect();
    assert_eq!(subscriptions.subscriptions().len(), 2, "{subscriptions:?}");
    assert_eq!(endpoints, first.queues.iter().map(|q| q.queue_arn.as_str()).collect());

    let sqs = aws_sdk_sqs::Client::new(&sdk);
    for queue in &first.queues {
        assert_eq!(queue.queue_url, sqs_url(&sqs, &config.queue_name(&queue.consumer)).await);
        assert_eq!(queue.dead_letter_queue_url, sqs_url(&sqs, &config.dead_letter_queue_name(&queue.consumer)).await);
        let raw = sns
            .get_subscription_attributes()
            .subscription_arn(&queue.subscription_arn)
            .send()
            .await
            .expect("subscription attributes");
        let raw = raw.attributes().and_then(|a| a.get("RawMessageDelivery")).cloned();
        assert_eq!(raw.as_deref(), Some("true"));
        assert_eq!(queue_attribute(&sqs, &queue.queue_url, QueueAttributeName::VisibilityTimeout).await, "7");
        let redrive = queue_attribute(&sqs, &queue.queue_url, QueueAttributeName::RedrivePolicy).await;
        assert!(redrive.contains(&queue.dead_letter_queue_arn), "{redrive}");
        assert!(redrive.contains("\"maxReceiveCount\": 4") || redrive.contains("\"maxReceiveCount\":4"), "{redrive}");
        let policy = queue_attribute(&sqs, &queue.queue_url, QueueAttributeName::Policy).await;
        assert!(policy.contains(&first.topic_arn) && policy.contains("sqs:SendMessage"), "{policy}");
    }
    // Exactly one queue per name pattern was made.
    let listed = sqs.list_queues().queue_name_prefix(&config.queue_prefix).send().await.expect("list queues");
    assert_eq!(listed.queue_urls().len(), 4, "{listed:?}");
}

async fn sqs_url(sqs: &aws_sdk_sqs::Client, name: &str) -> String {
    let out = sqs.get_queue_url().queue_name(name).send().await.expect("get queue url");
    out.queue_url().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn message_attributes_carry_the_trace_context_and_routing_keys() {
    let s = setup(config(30, 5)).await;
    let traced = event("t", 2, Some(TRACEPARENT));
    s.bus.publish(std::slice::from_ref(&traced)).await.expect("publish");
    let raw = raw_messages(&s.sqs, &s.queue_url, 1, Duration::from_secs(10)).await;
    assert_eq!(raw.len(), 1);
    // Raw delivery: the body is the event itself, not an SNS envelope.
    assert_eq!(decode(raw[0].body()), traced);
    let attribute = |name: &str| {
        raw[0].message_attributes().and_then(|a| a.get(name)).and_then(|v| v.string_value()).map(str::to_owned)
    };
    assert_eq!(attribute(attributes::TRACEPARENT).as_deref(), Some(TRACEPARENT));
    assert_eq!(attribute(attributes::IDEMPOTENCY_KEY).as_deref(), Some("acme/Patient/t/_history/2"));
    assert_eq!(attribute(attributes::TENANT).as_deref(), Some("acme"));
    assert_eq!(attribute(attributes::RESOURCE_TYPE).as_deref(), Some("Patient"));
}

#[tokio::test]
async fn a_traceparent_attribute_fills_in_a_body_without_one() {
    let s = setup(config(30, 5)).await;
    let untraced = event("u", 1, None);
    let body = base64::engine::general_purpose::STANDARD.encode(fhirmesh_proto::encode_resource_changed(&untraced));
    let traceparent = MessageAttributeValue::builder().data_type("String").string_value(TRACEPARENT).build();
    s.sqs
        .send_message()
        .queue_url(&s.queue_url)
        .message_body(body)
        .message_attributes(attributes::TRACEPARENT, traceparent.expect("attribute"))
        .send()
        .await
        .expect("send directly");
    let got = fetch_until(&s.consumer, 1, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].event.traceparent.as_deref(), Some(TRACEPARENT));
    assert_eq!(ResourceChanged { traceparent: None, ..(*got[0].event).clone() }, untraced);
    got[0].ack.ack().await.expect("ack");
}

#[tokio::test]
async fn poison_messages_go_to_the_dead_letter_queue_and_good_ones_still_arrive() {
    let s = setup(config(1, 5)).await;
    let good = [event("g1", 1, None), event("g2", 1, None)];
    s.bus.publish(&good[..1]).await.expect("publish");
    for garbage in ["this is not base64!", "aGVsbG8gd29ybGQ="] {
        s.sqs.send_message().queue_url(&s.queue_url).message_body(garbage).send().await.expect("send garbage");
    }
    s.bus.publish(&good[1..]).await.expect("publish");

    let deliveries = fetch_until(&s.consumer, 2, Duration::from_secs(10)).await;
    let mut keys: Vec<&str> = deliveries.iter().map(|d| d.event.idempotency_key.as_str()).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["acme/Patient/g1/_history/1", "acme/Patient/g2/_history/1"]);
    for delivery in &deliveries {
        delivery.ack.ack().await.expect("ack");
    }
    // The garbage never comes back (it was deleted from the queue, not just hidden) ...
    assert_nothing_for(&s.consumer, Duration::from_secs(2)).await;
    // ... and waits in the dead-letter queue, with the reason.
    let dead = raw_messages(&s.sqs, &s.dead_letter_url, 2, Duration::from_secs(5)).await;
    let mut bodies: Vec<&str> = dead.iter().filter_map(|m| m.body()).collect();
    bodies.sort_unstable();
    assert_eq!(bodies, ["aGVsbG8gd29ybGQ=", "this is not base64!"]);
    for message in &dead {
        let reason = message
            .message_attributes()
            .and_then(|a| a.get(attributes::DEAD_LETTER_REASON))
            .and_then(|v| v.string_value())
            .unwrap_or_default();
        assert!(reason.starts_with("body is not"), "reason: {reason:?}");
    }
}

#[tokio::test]
async fn more_than_ten_events_are_batched_and_all_arrive() {
    let s = setup(config(30, 5)).await;
    let events: Vec<ResourceChanged> = (1..=25).map(|v| event("many", v, None)).collect();
    s.bus.publish(&events).await.expect("publish 25");

    // One fetch asks for all 25: it keeps receiving past SQS's 10 per call.
    let first = s.consumer.fetch(25, Duration::from_secs(2)).await.expect("fetch");
    assert!(first.len() > 10, "one fetch returned only {}", first.len());
    let mut deliveries = first;
    let rest = fetch_until(&s.consumer, 25 - deliveries.len(), Duration::from_secs(10)).await;
    deliveries.extend(rest);
    let versions: BTreeSet<u64> = deliveries.iter().map(|d| d.event.version_id).collect();
    assert_eq!(versions, (1..=25).collect());
    assert_eq!(deliveries.len(), 25, "duplicates delivered");
    for delivery in &deliveries {
        delivery.ack.ack().await.expect("ack");
    }
}

#[tokio::test]
async fn acks_sent_together_are_batched_and_each_gets_its_own_answer() {
    let s = setup(config(30, 5)).await;
    let events: Vec<ResourceChanged> = (1..=25).map(|v| event("acked", v, None)).collect();
    s.bus.publish(&events).await.expect("publish 25");
    let deliveries = fetch_until(&s.consumer, 25, Duration::from_secs(10)).await;
    assert_eq!(deliveries.len(), 25);
    // All at once, as the indexer acknowledges a whole fetch: DeleteMessageBatch calls of 10.
    let acked = futures::future::join_all(deliveries.iter().map(|d| d.ack.ack())).await;
    assert!(acked.iter().all(Result::is_ok), "{acked:?}");
    assert_eq!(queue_attribute(&s.sqs, &s.queue_url, QueueAttributeName::ApproximateNumberOfMessages).await, "0");
    assert_eq!(
        queue_attribute(&s.sqs, &s.queue_url, QueueAttributeName::ApproximateNumberOfMessagesNotVisible).await,
        "0",
        "every message deleted"
    );

    // A batch that fails fails every ack it carried, each saying which message.
    s.bus.publish(&[event("late", 1, None), event("late", 2, None)]).await.expect("publish");
    let late = fetch_until(&s.consumer, 2, Duration::from_secs(10)).await;
    s.sqs.delete_queue().queue_url(&s.queue_url).send().await.expect("delete the queue");
    let acked = futures::future::join_all(late.iter().map(|d| d.ack.ack())).await;
    for result in &acked {
        let err = result.as_ref().expect_err("the queue is gone");
        assert!(err.to_string().contains("acknowledging (deleting) message"), "{err}");
    }
}

#[tokio::test]
async fn in_progress_keeps_a_slow_delivery_from_coming_back() {
    let s = setup(config(2, 5)).await;
    s.bus.publish(&[event("slow", 1, None)]).await.expect("publish");
    let got = fetch_until(&s.consumer, 1, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 1);
    let received_at = Instant::now();
    // Keep extending for twice the 2 s visibility timeout: nothing is redelivered meanwhile.
    while received_at.elapsed() < Duration::from_secs(4) {
        got[0].ack.in_progress().await.expect("in progress");
        let batch = s.consumer.fetch(10, Duration::from_secs(1)).await.expect("fetch");
        assert!(batch.is_empty(), "redelivered while extended after {:?}", received_at.elapsed());
    }
    // Once no longer extended, it comes back within the timeout.
    let again = fetch_until(&s.consumer, 1, Duration::from_secs(10)).await;
    assert_eq!(again.len(), 1, "never redelivered");
    assert_eq!(again[0].attempt, 2);
    again[0].ack.ack().await.expect("ack");
}

#[tokio::test]
async fn missing_resources_and_empty_requests_are_reported_not_hidden() {
    let sdk = aws_config().await;
    let bus = SnsSqsBus::new(&sdk, config(30, 5));
    // Nothing provisioned: publishing names the topic; fetching names the queue.
    match bus.publish(&[event("x", 1, None)]).await {
        Err(BusError::Unavailable(message)) => assert!(message.contains(&bus.config().topic_name), "{message}"),
        other => panic!("publish without a topic: {other:?}"),
    }
    match bus.consumer(CONSUMER).fetch(1, Duration::ZERO).await {
        Err(BusError::Unavailable(message)) => {
            assert!(message.contains(&bus.config().queue_name(CONSUMER)), "{message}")
        }
        other => panic!("fetch without a queue: {other:?}"),
    }
    match bus.consumer("not/a/name").fetch(1, Duration::ZERO).await {
        Err(BusError::Unavailable(message)) => assert!(message.contains("consumer name"), "{message}"),
        other => panic!("fetch with an invalid name: {other:?}"),
    }
    // Nothing to do is not an error, and needs no topic or queue.
    bus.publish(&[]).await.expect("empty publish");
    assert!(bus.consumer(CONSUMER).fetch(0, Duration::from_secs(5)).await.expect("fetch none").is_empty());
}

#[tokio::test]
async fn subscriptions_deliver_to_every_consumer_queue() {
    let sdk = aws_config().await;
    let bus = SnsSqsBus::new(&sdk, config(30, 5));
    bus.provision(&[CONSUMER, "subscriptions"]).await.expect("provision");
    let original = event("fan", 1, None);
    bus.publish(std::slice::from_ref(&original)).await.expect("publish");
    for consumer in [CONSUMER, "subscriptions"] {
        let got = fetch_until(&bus.consumer(consumer), 1, Duration::from_secs(10)).await;
        assert_eq!(got.len(), 1, "{consumer} got nothing");
        assert_eq!(*got[0].event, original);
        got[0].ack.ack().await.expect("ack");
    }
}
