//! The DynamoDB store against a real DynamoDB API (moto in server mode, started by
//! `tools/testinfra/with-infra.sh`). Each test has its own table.

use std::time::Duration;

use bytes::Bytes;
use fhirmesh_core::model::{Operation, TenantId};
use fhirmesh_core::ports::{ChangeLog, Expected, HistoryQuery, HistoryScope, ResourceStore, StoreError, VersionWrite};
use fhirmesh_fhir::{LogicalId, ResourceType};
use fhirmesh_store_dynamodb::{DynamoConfig, DynamoStore, MAX_WRITES_PER_TRANSACTION, provision};
use time::OffsetDateTime;

async fn store_with(adjust: impl FnOnce(&mut DynamoConfig)) -> DynamoStore {
    let sdk = fhirmesh_testinfra::aws_config().await;
    let client = aws_sdk_dynamodb::Client::new(&sdk);
    let mut config = DynamoConfig { table: fhirmesh_testinfra::unique_name("resources"), ..DynamoConfig::default() };
    adjust(&mut config);
    let provisioned = provision(&client, &config.table).await.expect("provision");
    assert!(provisioned.created);
    DynamoStore::new(client, config)
}

async fn store() -> DynamoStore {
    store_with(|_| {}).await
}

fn rt(name: &str) -> ResourceType {
    ResourceType::parse(name).expect("resource type")
}

fn lid(id: &str) -> LogicalId {
    LogicalId::parse(id).expect("id")
}

fn tenant(name: &str) -> TenantId {
    TenantId::parse(name).expect("tenant")
}

fn t(seconds: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_700_000_000 + seconds).expect("time")
}

fn body(resource_type: &str, id: &str, version: u64) -> Bytes {
    Bytes::from(format!(
        "{{\"resourceType\":\"{resource_type}\",\"id\":\"{id}\",\"meta\":{{\"versionId\":\"{version}\"}}}}"
    ))
}

fn write(resource_type: &str, id: &str, expected: Expected, version_id: u64, at: OffsetDateTime) -> VersionWrite {
    VersionWrite {
        resource_type: rt(resource_type),
        id: lid(id),
        expected,
        version_id,
        last_updated: at,
        operation: if version_id == 1 { Operation::Create } else { Operation::Update },
        body: Some(body(resource_type, id, version_id)),
        traceparent: None,
    }
}

fn delete(resource_type: &str, id: &str, current: u64, at: OffsetDateTime) -> VersionWrite {
    VersionWrite {
        resource_type: rt(resource_type),
        id: lid(id),
        expected: Expected::Version(current),
        version_id: current + 1,
        last_updated: at,
        operation: Operation::Delete,
        body: None,
        traceparent: None,
    }
}

fn query(scope: HistoryScope) -> HistoryQuery {
    HistoryQuery { scope, since: None, at: None, before_sequence: None, limit: 100 }
}

fn sequences(versions: &[fhirmesh_core::ResourceVersion]) -> Vec<u64> {
    versions.iter().map(|v| v.sequence).collect()
}

#[tokio::test]
async fn provisioning_is_idempotent_and_enables_the_stream() {
    let sdk = fhirmesh_testinfra::aws_config().await;
    let client = aws_sdk_dynamodb::Client::new(&sdk);
    let table = fhirmesh_testinfra::unique_name("provision");
    let first = provision(&client, &table).await.expect("first provision");
    let second = provision(&client, &table).await.expect("second provision");
    assert!(first.created && !second.created);
    assert!(first.stream_arn.is_some(), "the relay needs the table's stream");
    assert_eq!(first.stream_arn, second.stream_arn);
}

#[tokio::test]
async fn versions_tombstones_and_reads() {
    let store = store().await;
    let tenant = tenant("t1");
    let created = store.commit(&tenant, vec![write("Patient", "a", Expected::Absent, 1, t(1))]).await.expect("create");
    assert_eq!((created.first_sequence, created.last_sequence), (1, 1));
    store.commit(&tenant, vec![write("Patient", "a", Expected::Version(1), 2, t(2))]).await.expect("update");

    let current = store.read(&tenant, rt("Patient"), &lid("a")).await.expect("read").expect("found");
    assert_eq!((current.version_id, current.sequence, current.last_updated), (2, 2, t(2)));
    assert_eq!(current.body, Some(body("Patient", "a", 2)));
    let old = store.vread(&tenant, rt("Patient"), &lid("a"), 1).await.expect("vread").expect("found");
    assert_eq!((old.version_id, old.operation), (1, Operation::Create));
    assert_eq!(store.vread(&tenant, rt("Patient"), &lid("a"), 3).await, Ok(None));
    assert_eq!(store.read(&tenant, rt("Patient"), &lid("missing")).await, Ok(None));

    store.commit(&tenant, vec![delete("Patient", "a", 2, t(3))]).await.expect("delete");
    let tombstone = store.read(&tenant, rt("Patient"), &lid("a")).await.expect("read").expect("tombstone");
    assert!(tombstone.is_deleted());
    assert_eq!((tombstone.version_id, tombstone.body), (3, None));
    // A tombstone is a version: Absent no longer holds, Version(3) does.
    let recreate = store.commit(&tenant, vec![write("Patient", "a", Expected::Absent, 1, t(4))]).await;
    assert!(matches!(recreate, Err(StoreError::Conflict { actual: Some(3), .. })), "{recreate:?}");
    store.commit(&tenant, vec![write("Patient", "a", Expected::Version(3), 4, t(4))]).await.expect("revive");

    let many = store
        .read_many(&tenant, &[(rt("Patient"), lid("a")), (rt("Patient"), lid("nope")), (rt("Patient"), lid("a"))])
        .await
        .expect("read many");
    let versions: Vec<Option<u64>> = many.iter().map(|v| v.as_ref().map(|v| v.version_id)).collect();
    assert_eq!(versions, vec![Some(4), None, Some(4)]);
}

#[tokio::test]
async fn concurrent_writers_of_one_version_one_wins() {
    let store = store().await;
    let tenant = tenant("race");
    store.commit(&tenant, vec![write("Patient", "r", Expected::Absent, 1, t(1))]).await.expect("create");
    let attempts = (0..6).map(|_| {
        let (store, tenant) = (store.clone(), tenant.clone());
        tokio::spawn(
            async move { store.commit(&tenant, vec![write("Patient", "r", Expected::Version(1), 2, t(2))]).await },
        )
    });
    let mut won = 0;
    for attempt in attempts {
        match attempt.await.expect("task") {
            Ok(_) => won += 1,
            Err(StoreError::Conflict { actual, .. }) => assert_eq!(actual, Some(2)),
            Err(other) => panic!("unexpected error {other}"),
        }
    }
    assert_eq!(won, 1, "exactly one writer of version 2 wins");
    // The losers' reserved sequences were voided: the change log is gap-free, with 2 changes.
    let changes = store.changes_after(0, 100).await.expect("changes");
    assert_eq!(changes.iter().map(|c| c.version.version_id).collect::<Vec<_>>(), vec![1, 2]);
    // The voids after the winner do not count as changes a reader must wait for.
    assert_eq!(store.latest_sequence().await, Ok(changes[1].version.sequence));
}

#[tokio::test]
async fn a_failed_transaction_leaves_nothing_behind() {
    let store = store().await;
    let tenant = tenant("tx");
    store.commit(&tenant, vec![write("Patient", "exists", Expected::Absent, 1, t(1))]).await.expect("seed");
    let transaction = vec![
        write("Patient", "new1", Expected::Absent, 1, t(2)),
        write("Observation", "new2", Expected::Absent, 1, t(2)),
        // Wrong expectation: the whole commit must fail.
        write("Patient", "exists", Expected::Version(7), 8, t(2)),
    ];
    let failed = store.commit(&tenant, transaction).await;
    assert!(
        matches!(&failed, Err(StoreError::Conflict { id, actual: Some(1), .. }) if id.as_str() == "exists"),
        "{failed:?}"
    );
    assert_eq!(store.read(&tenant, rt("Patient"), &lid("new1")).await, Ok(None));
    assert_eq!(store.read(&tenant, rt("Observation"), &lid("new2")).await, Ok(None));
    assert_eq!(sequences(&store.history(&tenant, query(HistoryScope::System)).await.expect("history")), vec![1]);
    assert_eq!(store.changes_after(0, 100).await.expect("changes").len(), 1);

    // A good transaction is atomic and contiguous, each change knowing the commit's end.
    let receipt = store
        .commit(
            &tenant,
            vec![
                write("Patient", "new1", Expected::Absent, 1, t(3)),
                write("Observation", "new2", Expected::Absent, 1, t(3)),
                write("Patient", "exists", Expected::Version(1), 2, t(3)),
            ],
        )
        .await
        .expect("transaction");
    let changes = store.changes_after(1, 100).await.expect("changes");
    assert_eq!(changes.len(), 3);
    assert!(changes.iter().all(|c| c.commit_end == receipt.last_sequence));
    let seqs: Vec<u64> = changes.iter().map(|c| c.version.sequence).collect();
    assert_eq!(seqs, (receipt.first_sequence..=receipt.last_sequence).collect::<Vec<_>>());
}

fn tagged(id: &str, expected: Expected, version_id: u64, tag: &str) -> VersionWrite {
    let mut w = write("Basic", id, expected, version_id, t(version_id as i64));
    w.body = Some(Bytes::from(format!("{{\"resourceType\":\"Basic\",\"id\":\"{id}\",\"tag\":\"{tag}\"}}")));
    w
}

fn tag(version: &fhirmesh_core::ResourceVersion) -> String {
    let body: serde_json::Value = serde_json::from_slice(version.body.as_deref().expect("body")).expect("json");
    body["tag"].as_str().expect("tag").to_owned()
}

fn basic_keys(count: usize) -> Vec<(ResourceType, LogicalId)> {
    (0..count).map(|i| (rt("Basic"), lid(&format!("b{i}")))).collect()
}

#[tokio::test]
async fn commits_larger_than_one_dynamodb_transaction_are_staged_and_atomic() {
    let store = store().await;
    let tenant = tenant("large");
    const N: usize = 3 * MAX_WRITES_PER_TRANSACTION; // 99 writes: three transactions' worth of items
    let creates: Vec<VersionWrite> = (0..N).map(|i| tagged(&format!("b{i}"), Expected::Absent, 1, "v1")).collect();
    let receipt = store.commit(&tenant, creates).await.expect("large create");
    assert_eq!((receipt.first_sequence, receipt.last_sequence), (1, N as u64));
    let changes = store.changes_after(0, 1000).await.expect("changes");
    assert_eq!(changes.iter().map(|c| c.version.sequence).collect::<Vec<_>>(), (1..=N as u64).collect::<Vec<_>>());
    assert!(changes.iter().all(|c| c.commit_end == N as u64));
    let all = store.read_many(&tenant, &basic_keys(N)).await.expect("read many");
    assert!(all.iter().all(|v| v.as_ref().is_some_and(|v| v.version_id == 1)));
    let type_history = HistoryQuery { limit: 1000, ..query(HistoryScope::Type(rt("Basic"))) };
    assert_eq!(store.history(&tenant, type_history).await.expect("history").len(), N);

    // One wrong expectation in the middle: nothing of the commit happens.
    let mut updates: Vec<VersionWrite> =
        (0..N).map(|i| tagged(&format!("b{i}"), Expected::Version(1), 2, "v2")).collect();
    updates[50] = tagged("b50", Expected::Version(4), 5, "v2");
    let failed = store.commit(&tenant, updates).await;
    assert!(
        matches!(&failed, Err(StoreError::Conflict { id, actual: Some(1), .. }) if id.as_str() == "b50"),
        "{failed:?}"
    );
    let all = store.read_many(&tenant, &basic_keys(N)).await.expect("read many");
    assert!(all.iter().all(|v| v.as_ref().is_some_and(|v| v.version_id == 1 && tag(v) == "v1")));
    assert_eq!(store.vread(&tenant, rt("Basic"), &lid("b0"), 2).await, Ok(None));
    assert_eq!(store.changes_after(N as u64, 1000).await, Ok(vec![]));
    assert_eq!(store.latest_sequence().await, Ok(N as u64), "the aborted commit's sequences are not waited for");

    // Its locks are gone: a single write and then a large commit with deletes go through.
    store.commit(&tenant, vec![tagged("b0", Expected::Version(1), 2, "single")]).await.expect("single write");
    let mut mixed: Vec<VersionWrite> =
        (1..N).map(|i| tagged(&format!("b{i}"), Expected::Version(1), 2, "v2")).collect();
    mixed[0] = delete("Basic", "b1", 1, t(9));
    mixed.push(tagged("b0", Expected::Version(2), 3, "v3"));
    mixed.push(tagged("new", Expected::Absent, 1, "v1"));
    let receipt = store.commit(&tenant, mixed).await.expect("large update");
    assert_eq!(receipt.last_sequence - receipt.first_sequence + 1, N as u64 + 1);
    assert_eq!(store.read(&tenant, rt("Basic"), &lid("b1")).await.expect("read").map(|v| v.body), Some(None));
    let b0 = store.read(&tenant, rt("Basic"), &lid("b0")).await.expect("read").expect("b0");
    assert_eq!((b0.version_id, tag(&b0).as_str()), (3, "v3"));
    let changes = store.changes_after(N as u64, 1000).await.expect("changes");
    let last = changes.last().expect("changes").version.sequence;
    assert_eq!(last, receipt.last_sequence);
    assert_eq!(changes.len(), N + 2, "the single write and the whole large commit");
}

#[tokio::test]
async fn concurrent_large_commits_over_the_same_resources_one_wins_whole() {
    let store = store().await;
    let tenant = tenant("race");
    const N: usize = 40;
    let creates: Vec<VersionWrite> = (0..N).map(|i| tagged(&format!("b{i}"), Expected::Absent, 1, "v1")).collect();
    store.commit(&tenant, creates).await.expect("seed");
    // Two large writers in opposite orders, and a small one, all expecting version 1.
    let forward: Vec<VersionWrite> = (0..N).map(|i| tagged(&format!("b{i}"), Expected::Version(1), 2, "fwd")).collect();
    let backward: Vec<VersionWrite> =
        (0..N).rev().map(|i| tagged(&format!("b{i}"), Expected::Version(1), 2, "bwd")).collect();
    let small = vec![tagged("b20", Expected::Version(1), 2, "small")];
    let (s1, s2, s3) = (store.clone(), store.clone(), store.clone());
    let (t1, t2, t3) = (tenant.clone(), tenant.clone(), tenant.clone());
    let results = tokio::join!(
        tokio::spawn(async move { s1.commit(&t1, forward).await }),
        tokio::spawn(async move { s2.commit(&t2, backward).await }),
        tokio::spawn(async move { s3.commit(&t3, small).await }),
    );
    let results = [results.0.expect("join"), results.1.expect("join"), results.2.expect("join")];
    let won: Vec<usize> = (0..3).filter(|&i| results[i].is_ok()).collect();
    assert_eq!(won.len(), 1, "exactly one writer wins: {results:?}");
    for (i, result) in results.iter().enumerate() {
        if !won.contains(&i) {
            assert!(matches!(result, Err(StoreError::Conflict { actual: Some(2), .. })), "{result:?}");
        }
    }
    let all = store.read_many(&tenant, &basic_keys(N)).await.expect("read many");
    let tags: std::collections::BTreeSet<String> =
        all.iter().map(|v| v.as_ref().expect("present")).filter(|v| v.version_id == 2).map(tag).collect();
    let expected = ["fwd", "bwd", "small"][won[0]];
    assert_eq!(tags, std::collections::BTreeSet::from([expected.to_owned()]), "no mix of writers");
    let changed = store.changes_after(N as u64, 1000).await.expect("changes");
    assert_eq!(changed.len(), if won[0] == 2 { 1 } else { N });
}

#[tokio::test]
async fn bodies_too_large_for_an_item_live_in_the_blob_store() {
    let big = Bytes::from(format!("{{\"resourceType\":\"Binary\",\"data\":\"{}\"}}", "A".repeat(500 * 1024)));
    let mut write_big = write("Binary", "big", Expected::Absent, 1, t(1));
    write_big.body = Some(big.clone());

    // Without a blob store they are refused, before anything is reserved.
    let plain = store().await;
    let tenant = tenant("blobs");
    let refused = plain.commit(&tenant, vec![write_big.clone()]).await;
    assert!(matches!(&refused, Err(StoreError::Unsupported(m)) if m.contains("blob")), "{refused:?}");
    assert_eq!(plain.latest_sequence().await, Ok(0));

    let dir = tempfile::tempdir().expect("tempdir");
    let blobs = std::sync::Arc::new(fhirmesh_blob::LocalBlobStore::open(dir.path()).await.expect("blob store"));
    let store = DynamoStore::with_blob_store(
        plain.client().clone(),
        DynamoConfig { table: plain.table().to_owned(), ..DynamoConfig::default() },
        blobs,
    );
    store.commit(&tenant, vec![write_big]).await.expect("a 500 KB resource");
    let read = store.read(&tenant, rt("Binary"), &lid("big")).await.expect("read").expect("present");
    assert_eq!(read.body.as_ref(), Some(&big));
    let vread = store.vread(&tenant, rt("Binary"), &lid("big"), 1).await.expect("vread").expect("present");
    assert_eq!(vread.body.as_ref(), Some(&big));
    let changes = store.changes_after(0, 10).await.expect("changes");
    assert_eq!(changes[0].version.body.as_ref(), Some(&big));
    // The item keeps the blob's key, not the body.
    let item = store
        .client()
        .get_item()
        .table_name(store.table())
        .key("pk", aws_sdk_dynamodb::types::AttributeValue::S("R#blobs#Binary#big".into()))
        .key("sk", aws_sdk_dynamodb::types::AttributeValue::S("V#00000000000000000001".into()))
        .send()
        .await
        .expect("get item")
        .item
        .expect("version item");
    assert!(item.contains_key("blob") && !item.contains_key("body"), "{:?}", item.keys());

    // A commit whose bodies exceed what one DynamoDB transaction takes (4 MB) is staged.
    let heavy_body = Bytes::from(format!("{{\"resourceType\":\"Binary\",\"data\":\"{}\"}}", "B".repeat(300 * 1024)));
    let heavy: Vec<VersionWrite> = (0..12)
        .map(|i| {
            let mut w = write("Binary", &format!("h{i}"), Expected::Absent, 1, t(2));
            w.body = Some(heavy_body.clone());
            w
        })
        .collect();
    let receipt = store.commit(&tenant, heavy).await.expect("12 × 300 KB");
    assert_eq!(receipt.last_sequence - receipt.first_sequence, 11);
    let h = store.read(&tenant, rt("Binary"), &lid("h11")).await.expect("read").expect("present");
    assert_eq!(h.body, Some(heavy_body));
}

#[tokio::test]
async fn history_at_every_level_with_paging_since_and_at() {
    let store = store().await;
    let tenant = tenant("h");
    store.commit(&tenant, vec![write("Patient", "a", Expected::Absent, 1, t(10))]).await.expect("1");
    store.commit(&tenant, vec![write("Observation", "o", Expected::Absent, 1, t(20))]).await.expect("2");
    store.commit(&tenant, vec![write("Patient", "a", Expected::Version(1), 2, t(30))]).await.expect("3");
    store.commit(&tenant, vec![write("Patient", "b", Expected::Absent, 1, t(40))]).await.expect("4");
    store.commit(&tenant, vec![delete("Patient", "a", 2, t(50))]).await.expect("5");
    // Another tenant's writes never show.
    store
        .commit(&TenantId::parse("other").expect("tenant"), vec![write("Patient", "a", Expected::Absent, 1, t(60))])
        .await
        .expect("6");

    let system = store.history(&tenant, query(HistoryScope::System)).await.expect("system");
    assert_eq!(sequences(&system), vec![5, 4, 3, 2, 1]);
    let by_type = store.history(&tenant, query(HistoryScope::Type(rt("Patient")))).await.expect("type");
    assert_eq!(sequences(&by_type), vec![5, 4, 3, 1]);
    let instance =
        store.history(&tenant, query(HistoryScope::Instance(rt("Patient"), lid("a")))).await.expect("instance");
    assert_eq!(sequences(&instance), vec![5, 3, 1]);

    // Paging: two at a time, the cursor is the last sequence seen.
    let mut page_query = HistoryQuery { limit: 2, ..query(HistoryScope::System) };
    let mut pages = Vec::new();
    loop {
        let page = store.history(&tenant, page_query.clone()).await.expect("page");
        let Some(last) = page.last() else { break };
        page_query.before_sequence = Some(last.sequence);
        pages.push(sequences(&page));
    }
    assert_eq!(pages, vec![vec![5, 4], vec![3, 2], vec![1]]);

    let since = HistoryQuery { since: Some(t(30)), ..query(HistoryScope::Type(rt("Patient"))) };
    assert_eq!(sequences(&store.history(&tenant, since).await.expect("since")), vec![5, 4, 3]);
    // Current at some point in [35, 45): b's v1 (40..), a's v2 (30..50), o's v1 (20..); not a's v1
    // (10..30) nor its tombstone (50..).
    let at = HistoryQuery { at: Some((t(35), t(45))), ..query(HistoryScope::System) };
    assert_eq!(sequences(&store.history(&tenant, at).await.expect("at")), vec![4, 3, 2]);
    let none = HistoryQuery { limit: 0, ..query(HistoryScope::System) };
    assert_eq!(store.history(&tenant, none).await, Ok(vec![]));
}

#[tokio::test]
async fn the_change_log_waits_for_a_hole_then_voids_it() {
    let store = store_with(|c| c.hole_timeout = Duration::from_millis(300)).await;
    let tenant = tenant("holes");
    store.commit(&tenant, vec![write("Patient", "a", Expected::Absent, 1, t(1))]).await.expect("1");
    // A writer that reserved sequence 2 and died before its transaction.
    store
        .client()
        .update_item()
        .table_name(store.table())
        .key("pk", aws_sdk_dynamodb::types::AttributeValue::S("S".into()))
        .key("sk", aws_sdk_dynamodb::types::AttributeValue::S("S".into()))
        .update_expression("ADD #last :one")
        .expression_attribute_names("#last", "last")
        .expression_attribute_values(":one", aws_sdk_dynamodb::types::AttributeValue::N("1".into()))
        .send()
        .await
        .expect("reserve a sequence nobody commits");
    store.commit(&tenant, vec![write("Patient", "b", Expected::Absent, 1, t(2))]).await.expect("3");

    // Only the gap-free prefix is visible while the hole is young.
    let before = store.changes_after(0, 10).await.expect("changes");
    assert_eq!(before.iter().map(|c| c.version.sequence).collect::<Vec<_>>(), vec![1]);
    // The latest committed change is 1: 3 is acknowledged, but 2 may still commit before it.
    assert_eq!(store.latest_sequence().await, Ok(1));

    tokio::time::sleep(Duration::from_millis(400)).await;
    let after = store.changes_after(0, 10).await.expect("changes");
    assert_eq!(after.iter().map(|c| c.version.sequence).collect::<Vec<_>>(), vec![1, 3], "the hole was voided");
    assert_eq!(store.changes_after(1, 10).await.expect("changes").len(), 1);
    assert_eq!(store.changes_after(3, 10).await, Ok(vec![]));
    assert_eq!(store.latest_sequence().await, Ok(3));
}

#[tokio::test]
async fn the_change_log_crosses_buckets_and_respects_limits() {
    let store = store().await;
    let tenant = tenant("log");
    // Move the counter near a bucket boundary (4096) so the log spans two partitions.
    store
        .client()
        .put_item()
        .table_name(store.table())
        .item("pk", aws_sdk_dynamodb::types::AttributeValue::S("S".into()))
        .item("sk", aws_sdk_dynamodb::types::AttributeValue::S("S".into()))
        .item("last", aws_sdk_dynamodb::types::AttributeValue::N("4093".into()))
        .send()
        .await
        .expect("set the counter");
    for i in 0..5 {
        store.commit(&tenant, vec![write("Basic", &format!("b{i}"), Expected::Absent, 1, t(i))]).await.expect("write");
    }
    let all = store.changes_after(4093, 100).await.expect("changes");
    assert_eq!(all.iter().map(|c| c.version.sequence).collect::<Vec<_>>(), vec![4094, 4095, 4096, 4097, 4098]);
    let first_two = store.changes_after(4093, 2).await.expect("changes");
    assert_eq!(first_two.iter().map(|c| c.version.sequence).collect::<Vec<_>>(), vec![4094, 4095]);
    let across = store.changes_after(4095, 2).await.expect("changes");
    assert_eq!(across.iter().map(|c| c.version.sequence).collect::<Vec<_>>(), vec![4096, 4097]);
    assert_eq!(across[0].tenant, tenant);
    assert_eq!(across[0].version.body, Some(body("Basic", "b2", 1)));
}

#[tokio::test]
async fn checkpoints_persist() {
    let store = store().await;
    assert_eq!(store.checkpoint("relay").await, Ok(0));
    store.save_checkpoint("relay", 42).await.expect("save");
    store.save_checkpoint("other", 7).await.expect("save");
    assert_eq!(store.checkpoint("relay").await, Ok(42));
    let reopened = DynamoStore::new(
        store.client().clone(),
        DynamoConfig { table: store.table().to_owned(), ..DynamoConfig::default() },
    );
    assert_eq!(reopened.checkpoint("relay").await, Ok(42));
    assert_eq!(reopened.checkpoint("other").await, Ok(7));
}

#[tokio::test]
async fn an_unreachable_dynamodb_is_unavailable_not_internal() {
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url("http://127.0.0.1:9")
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_credential_types::Credentials::new("x", "x", None, None, "test"))
        .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(1))
        .load()
        .await;
    let store = DynamoStore::new(aws_sdk_dynamodb::Client::new(&sdk), DynamoConfig::default());
    let read = store.read(&tenant("t"), rt("Patient"), &lid("a")).await;
    assert!(matches!(read, Err(StoreError::Unavailable(_))), "{read:?}");
    let commit = store.commit(&tenant("t"), vec![write("Patient", "a", Expected::Absent, 1, t(1))]).await;
    assert!(matches!(commit, Err(StoreError::Unavailable(_))), "{commit:?}");
}
