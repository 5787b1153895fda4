//! The DynamoDB Streams relay against a real DynamoDB + Streams API (moto in server mode, started
//! by `tools/testinfra/with-infra.sh`). Each test has its own resource table and lease table.
//! moto has one shard per stream and iterators that never expire: the shard graph, iterator
//! renewal and trimming are unit-tested in `src/streams/`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_dynamodb::types::{AttributeValue, TimeToLiveStatus};
use bytes::Bytes;
use fhirmesh_core::events::ResourceChanged;
use fhirmesh_core::model::{Operation, TenantId};
use fhirmesh_core::ports::{BusError, ChangeLog, EventPublisher, Expected, ResourceStore, StoreError, VersionWrite};
use fhirmesh_fhir::{LogicalId, ResourceType};
use fhirmesh_store_dynamodb::{DynamoConfig, DynamoStore, StreamRelay, StreamRelayConfig, provision, provision_leases};
use time::OffsetDateTime;

/// Records what it is asked to publish; fails (publishing nothing) while `failing` is set.
#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<ResourceChanged>>,
    failing: AtomicBool,
}

impl Recorder {
    fn events(&self) -> Vec<ResourceChanged> {
        self.events.lock().expect("recorder lock").clone()
    }

    fn len(&self) -> usize {
        self.events.lock().expect("recorder lock").len()
    }
}

#[async_trait]
impl EventPublisher for Recorder {
    async fn publish(&self, events: &[ResourceChanged]) -> Result<(), BusError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(BusError::Unavailable("test bus is down".into()));
        }
        self.events.lock().expect("recorder lock").extend_from_slice(events);
        Ok(())
    }
}

struct Fixture {
    store: DynamoStore,
    dynamodb: aws_sdk_dynamodb::Client,
    streams: aws_sdk_dynamodbstreams::Client,
    stream_arn: String,
    lease_table: String,
}

impl Fixture {
    async fn new() -> Fixture {
        let sdk = fhirmesh_testinfra::aws_config().await;
        let dynamodb = aws_sdk_dynamodb::Client::new(&sdk);
        let streams = aws_sdk_dynamodbstreams::Client::new(&sdk);
        let table = fhirmesh_testinfra::unique_name("streams");
        let provisioned = provision(&dynamodb, &table).await.expect("provision the resource table");
        let stream_arn = provisioned.stream_arn.expect("the table has a stream");
        let lease_table = fhirmesh_testinfra::unique_name("leases");
        assert!(provision_leases(&dynamodb, &lease_table).await.expect("provision the lease table"));
        assert!(!provision_leases(&dynamodb, &lease_table).await.expect("again"), "idempotent");
        let ttl = dynamodb.describe_time_to_live().table_name(&lease_table).send().await.expect("describe TTL");
        let ttl = ttl.time_to_live_description().expect("a TTL description");
        assert_eq!(ttl.time_to_live_status(), Some(&TimeToLiveStatus::Enabled));
        assert_eq!(ttl.attribute_name(), Some("ttl"));
        let store = DynamoStore::new(dynamodb.clone(), DynamoConfig { table, ..DynamoConfig::default() });
        Fixture { store, dynamodb, streams, stream_arn, lease_table }
    }

    fn relay(&self, worker: &str, lease_duration: Duration) -> StreamRelay {
        let config = StreamRelayConfig {
            lease_duration,
            poll_interval: Duration::from_millis(50),
            ..StreamRelayConfig::new(&self.stream_arn, &self.lease_table, worker)
        };
        StreamRelay::new(self.store.clone(), self.streams.clone(), config)
    }

    /// The lease table's items, by shard.
    async fn leases(&self) -> HashMap<String, HashMap<String, AttributeValue>> {
        let out = self.dynamodb.scan().table_name(&self.lease_table).consistent_read(true).send().await.expect("scan");
        out.items()
            .iter()
            .map(|item| match item.get("shard") {
                Some(AttributeValue::S(shard)) => (shard.clone(), item.clone()),
                other => panic!("lease item without a shard: {other:?}"),
            })
            .collect()
    }

    async fn commit(&self, writes: Vec<VersionWrite>) -> (u64, u64) {
        let receipt = self.store.commit(&tenant(), writes).await.expect("commit");
        (receipt.first_sequence, receipt.last_sequence)
    }
}

fn tenant() -> TenantId {
    TenantId::parse("t1").expect("tenant")
}

fn at(seconds: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_700_000_000 + seconds).expect("time")
}

fn body(resource_type: &str, id: &str, version: u64) -> Bytes {
    Bytes::from(format!(
        "{{\"resourceType\":\"{resource_type}\",\"id\":\"{id}\",\"meta\":{{\"versionId\":\"{version}\"}}}}"
    ))
}

fn write(resource_type: &str, id: &str, version_id: u64) -> VersionWrite {
    VersionWrite {
        resource_type: ResourceType::parse(resource_type).expect("type"),
        id: LogicalId::parse(id).expect("id"),
        expected: if version_id == 1 { Expected::Absent } else { Expected::Version(version_id - 1) },
        version_id,
        last_updated: at(version_id as i64),
        operation: if version_id == 1 { Operation::Create } else { Operation::Update },
        body: Some(body(resource_type, id, version_id)),
        traceparent: None,
    }
}

fn delete(resource_type: &str, id: &str, version_id: u64) -> VersionWrite {
    VersionWrite { operation: Operation::Delete, body: None, ..write(resource_type, id, version_id) }
}

/// What a test expects of one event.
type Expect = (&'static str, &'static str, u64, Operation, u64, u64);

fn summary(events: &[ResourceChanged]) -> Vec<(String, String, u64, Operation, u64, u64)> {
    events
        .iter()
        .map(|e| (e.resource_type.to_string(), e.id.to_string(), e.version_id, e.operation, e.sequence, e.commit_end))
        .collect()
}

fn expected(list: &[Expect]) -> Vec<(String, String, u64, Operation, u64, u64)> {
    list.iter().map(|(t, id, v, op, seq, end)| ((*t).to_owned(), (*id).to_owned(), *v, *op, *seq, *end)).collect()
}

/// Runs rounds until `recorder` holds `count` events (bounded: 10 s), then one more round that
/// must publish nothing.
async fn drain(relay: &StreamRelay, recorder: &Recorder, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while recorder.len() < count {
        assert!(Instant::now() < deadline, "only {} of {count} events published within 10 s", recorder.len());
        relay.run_once(recorder).await.expect("round");
        if recorder.len() < count {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(relay.run_once(recorder).await, Ok(0), "nothing left to publish");
    assert_eq!(recorder.len(), count, "no more than the expected events");
}

#[tokio::test]
async fn every_committed_version_is_published_once_in_sequence_order() {
    let fx = Fixture::new().await;
    assert_eq!(fx.commit(vec![write("Patient", "a", 1)]).await, (1, 1));
    // One commit of two writes: both events carry the commit's end.
    assert_eq!(fx.commit(vec![write("Observation", "o", 1), write("Patient", "b", 1)]).await, (2, 3));
    assert_eq!(fx.commit(vec![write("Patient", "a", 2)]).await, (4, 4));
    assert_eq!(fx.commit(vec![delete("Patient", "b", 2)]).await, (5, 5));
    // A change-log consumer checkpoint item: not an event either.
    fx.store.save_checkpoint("somebody", 5).await.expect("checkpoint item");

    let recorder = Recorder::default();
    let relay = fx.relay("w1", Duration::from_secs(10));
    drain(&relay, &recorder, 5).await;

    let events = recorder.events();
    assert_eq!(
        summary(&events),
        expected(&[
            ("Patient", "a", 1, Operation::Create, 1, 1),
            ("Observation", "o", 1, Operation::Create, 2, 3),
            ("Patient", "b", 1, Operation::Create, 3, 3),
            ("Patient", "a", 2, Operation::Update, 4, 4),
            ("Patient", "b", 2, Operation::Delete, 5, 5),
        ])
    );
    for event in &events {
        assert_eq!(event.tenant, tenant());
        assert_eq!(event.traceparent, None);
        assert_eq!(
            event.idempotency_key,
            format!("t1/{}/{}/_history/{}", event.resource_type, event.id, event.version_id)
        );
        assert_eq!(event.last_updated, at(event.version_id as i64));
        let want = match event.operation {
            Operation::Delete => None,
            _ => Some(body(event.resource_type.as_str(), event.id.as_str(), event.version_id)),
        };
        assert_eq!(event.resource, want, "{}", event.idempotency_key);
    }
    // The checkpoint covers every record of the shard, the skipped ones included.
    let leases = fx.leases().await;
    assert_eq!(leases.len(), 1, "moto has one shard");
    let lease = leases.values().next().expect("one lease");
    assert!(matches!(lease.get("checkpoint"), Some(AttributeValue::S(_))), "{lease:?}");
    assert_eq!(lease.get("owner"), Some(&AttributeValue::S("w1".into())));
}

#[tokio::test]
async fn a_staged_commit_is_published_once_and_whole() {
    let fx = Fixture::new().await;
    // 40 writes: more than one DynamoDB transaction holds, so the commit is staged.
    let writes: Vec<VersionWrite> = (0..40).map(|i| write("Basic", &format!("b{i}"), 1)).collect();
    assert_eq!(fx.commit(writes).await, (1, 40));
    assert_eq!(fx.commit(vec![write("Basic", "b0", 2)]).await, (41, 41));

    let recorder = Recorder::default();
    let relay = fx.relay("w1", Duration::from_secs(10));
    drain(&relay, &recorder, 41).await;
    let events = recorder.events();
    let mut sequences: Vec<u64> = events.iter().map(|e| e.sequence).collect();
    sequences.sort_unstable();
    assert_eq!(sequences, (1..=41).collect::<Vec<_>>(), "each version once");
    for event in &events {
        let want_end = if event.sequence <= 40 { 40 } else { 41 };
        assert_eq!(event.commit_end, want_end, "{}", event.idempotency_key);
        assert_eq!(event.resource, Some(body("Basic", event.id.as_str(), event.version_id)));
    }
}

#[tokio::test]
async fn an_undecodable_version_item_is_skipped_without_stalling() {
    let fx = Fixture::new().await;
    // A version item that is not what a commit writes (no tenant, type, ...).
    fx.dynamodb
        .put_item()
        .table_name(fx.store.table())
        .item("pk", AttributeValue::S("R#t1#Patient#broken".into()))
        .item("sk", AttributeValue::S("V#00000000000000000001".into()))
        .item("ver", AttributeValue::S("not a number".into()))
        .send()
        .await
        .expect("put a broken item");
    fx.commit(vec![write("Patient", "fine", 1)]).await;

    let recorder = Recorder::default();
    let relay = fx.relay("w1", Duration::from_secs(10));
    drain(&relay, &recorder, 1).await;
    assert_eq!(summary(&recorder.events()), expected(&[("Patient", "fine", 1, Operation::Create, 1, 1)]));

    // Later commits still flow.
    fx.commit(vec![write("Patient", "fine", 2)]).await;
    drain(&relay, &recorder, 2).await;
    assert_eq!(recorder.events()[1].version_id, 2);
}

#[tokio::test]
async fn a_restarted_relay_resumes_from_its_checkpoint() {
    let fx = Fixture::new().await;
    fx.commit(vec![write("Patient", "a", 1)]).await;
    fx.commit(vec![write("Patient", "b", 1)]).await;
    let recorder = Recorder::default();
    let first = fx.relay("w1", Duration::from_secs(10));
    drain(&first, &recorder, 2).await;
    drop(first);

    fx.commit(vec![write("Patient", "a", 2)]).await;
    fx.commit(vec![write("Patient", "c", 1), write("Patient", "b", 2)]).await;
    // Same worker id and lease table: it takes its own (unexpired) lease back at once.
    let second = fx.relay("w1", Duration::from_secs(10));
    drain(&second, &recorder, 5).await;
    assert_eq!(
        summary(&recorder.events()),
        expected(&[
            ("Patient", "a", 1, Operation::Create, 1, 1),
            ("Patient", "b", 1, Operation::Create, 2, 2),
            ("Patient", "a", 2, Operation::Update, 3, 3),
            ("Patient", "c", 1, Operation::Create, 4, 5),
            ("Patient", "b", 2, Operation::Update, 5, 5),
        ]),
        "no gap and, in this clean case, no duplicate"
    );
}

#[tokio::test]
async fn another_relay_takes_over_when_the_lease_expires() {
    let fx = Fixture::new().await;
    let lease = Duration::from_secs(1);
    fx.commit(vec![write("Patient", "a", 1)]).await;
    fx.commit(vec![write("Patient", "b", 1)]).await;
    let (a_events, b_events) = (Recorder::default(), Recorder::default());
    let a = fx.relay("relay-a", lease);
    let b = fx.relay("relay-b", lease);
    drain(&a, &a_events, 2).await;

    fx.commit(vec![write("Patient", "a", 2)]).await;
    // A holds the shard: B reads nothing.
    assert_eq!(b.run_once(&b_events).await, Ok(0));
    assert_eq!(b_events.len(), 0);

    // A stops renewing; once its lease has expired, B takes the shard from A's checkpoint.
    tokio::time::sleep(lease + Duration::from_millis(300)).await;
    drain(&b, &b_events, 1).await;
    assert_eq!(summary(&b_events.events()), expected(&[("Patient", "a", 2, Operation::Update, 3, 3)]));
    let leases = fx.leases().await;
    let owner = leases.values().next().and_then(|item| item.get("owner")).cloned();
    assert_eq!(owner, Some(AttributeValue::S("relay-b".into())));

    // A comes back: its renewal fails, it publishes nothing again.
    assert_eq!(a.run_once(&a_events).await, Ok(0));
    assert_eq!(a_events.len(), 2);
}

#[tokio::test]
async fn a_relay_releases_its_leases_on_shutdown() {
    let fx = Fixture::new().await;
    // Long leases: B can only get the shard at once if A released it.
    let lease = Duration::from_secs(60);
    fx.commit(vec![write("Patient", "a", 1)]).await;
    let a_events = Arc::new(Recorder::default());
    let a = fx.relay("relay-a", lease);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(a.run(a_events.clone(), async move {
        let _ = stopped.await;
    }));
    let deadline = Instant::now() + Duration::from_secs(10);
    while a_events.len() < 1 {
        assert!(Instant::now() < deadline, "relay A published nothing within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.send(()).expect("relay A is running");
    tokio::time::timeout(Duration::from_secs(10), running).await.expect("A stops in time").expect("A's task");
    let leases = fx.leases().await;
    let lease_item = leases.values().next().expect("one lease");
    assert_eq!(lease_item.get("owner"), None, "released: {lease_item:?}");

    fx.commit(vec![write("Patient", "a", 2)]).await;
    let b_events = Recorder::default();
    let b = fx.relay("relay-b", lease);
    assert_eq!(b.run_once(&b_events).await, Ok(1), "B takes the shard in its first round");
    assert_eq!(summary(&b_events.events()), expected(&[("Patient", "a", 2, Operation::Update, 2, 2)]));
    assert_eq!(a_events.len(), 1);
}

#[tokio::test]
async fn two_relays_racing_for_a_shard_one_wins() {
    let fx = Fixture::new().await;
    fx.commit(vec![write("Patient", "a", 1)]).await;
    fx.commit(vec![write("Patient", "b", 1)]).await;
    let (a_events, b_events) = (Recorder::default(), Recorder::default());
    let a = fx.relay("relay-a", Duration::from_secs(10));
    let b = fx.relay("relay-b", Duration::from_secs(10));
    let (from_a, from_b) = tokio::join!(a.run_once(&a_events), b.run_once(&b_events));
    let mut counts = [from_a.expect("A's round"), from_b.expect("B's round")];
    counts.sort_unstable();
    assert_eq!(counts, [0, 2], "exactly one relay read the shard");
    assert_eq!(a_events.len() + b_events.len(), 2);
    let winner = if a_events.len() == 2 { "relay-a" } else { "relay-b" };
    let leases = fx.leases().await;
    let owner = leases.values().next().and_then(|item| item.get("owner")).cloned();
    assert_eq!(owner, Some(AttributeValue::S(winner.into())));
}

#[tokio::test]
async fn a_failing_publisher_does_not_move_the_checkpoint() {
    let fx = Fixture::new().await;
    fx.commit(vec![write("Patient", "a", 1)]).await;
    fx.commit(vec![write("Patient", "b", 1)]).await;
    let recorder = Recorder::default();
    recorder.failing.store(true, Ordering::SeqCst);
    let relay = fx.relay("w1", Duration::from_secs(10));
    for _ in 0..2 {
        let err = relay.run_once(&recorder).await.expect_err("the bus is down");
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
        assert!(err.to_string().contains("shard") && err.to_string().contains("test bus is down"), "{err}");
    }
    let leases = fx.leases().await;
    let lease = leases.values().next().expect("the shard was taken");
    assert_eq!(lease.get("checkpoint"), None, "nothing published, nothing checkpointed: {lease:?}");

    fx.commit(vec![write("Patient", "a", 2)]).await;
    recorder.failing.store(false, Ordering::SeqCst);
    drain(&relay, &recorder, 3).await;
    assert_eq!(
        summary(&recorder.events()),
        expected(&[
            ("Patient", "a", 1, Operation::Create, 1, 1),
            ("Patient", "b", 1, Operation::Create, 2, 2),
            ("Patient", "a", 2, Operation::Update, 3, 3),
        ])
    );
    let leases = fx.leases().await;
    assert!(matches!(leases.values().next().and_then(|l| l.get("checkpoint")), Some(AttributeValue::S(_))));
}

#[tokio::test]
async fn a_relay_on_a_missing_lease_table_fails_naming_it() {
    let fx = Fixture::new().await;
    let config = StreamRelayConfig::new(&fx.stream_arn, "no-such-lease-table", "w1");
    let relay = StreamRelay::new(fx.store.clone(), fx.streams.clone(), config);
    let err = relay.run_once(&Recorder::default()).await.expect_err("no lease table");
    assert!(err.to_string().contains("no-such-lease-table"), "{err}");
}
