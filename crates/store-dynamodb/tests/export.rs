//! Export scans against a real DynamoDB API (moto, see `tests/store.rs`): the snapshot read of
//! the export port ([`ExportSource`]) and the current-version scan ([`DynamoStore::export_page`]).
//! Each test has its own table.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;
use bytes::Bytes;
use fhirmesh_core::export::{ChunkPart, ExportSource};
use fhirmesh_core::model::{Operation, ResourceVersion, TenantId};
use fhirmesh_core::ports::{ChangeLog, Expected, ResourceStore, StoreError, VersionWrite};
use fhirmesh_fhir::{LogicalId, ResourceType};
use fhirmesh_store_dynamodb::{
    DynamoConfig, DynamoStore, ExportCursor, ExportScan, MAX_WRITES_PER_TRANSACTION, provision,
};
use serde_json::json;
use time::OffsetDateTime;

async fn store() -> DynamoStore {
    let sdk = fhirmesh_testinfra::aws_config().await;
    let client = aws_sdk_dynamodb::Client::new(&sdk);
    let config = DynamoConfig { table: fhirmesh_testinfra::unique_name("export"), ..DynamoConfig::default() };
    let provisioned = provision(&client, &config.table).await.expect("provision");
    assert!(provisioned.created);
    DynamoStore::new(client, config)
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

/// A body that names its version, so versions of one resource differ.
fn versioned_body(resource_type: &str, id: &str, version: u64) -> Bytes {
    Bytes::from(json!({"resourceType": resource_type, "id": id, "note": format!("{id} v{version}")}).to_string())
}

/// `version` of a resource (a delete when `live` is false) at `t(secs)`.
fn put(resource_type: &str, id: &str, version: u64, secs: i64, live: bool) -> VersionWrite {
    VersionWrite {
        resource_type: rt(resource_type),
        id: lid(id),
        expected: if version == 1 { Expected::Absent } else { Expected::Version(version - 1) },
        version_id: version,
        last_updated: t(secs),
        operation: match (live, version) {
            (false, _) => Operation::Delete,
            (true, 1) => Operation::Create,
            (true, _) => Operation::Update,
        },
        body: live.then(|| versioned_body(resource_type, id, version)),
        traceparent: None,
    }
}

async fn set(
    store: &DynamoStore,
    tenant: &TenantId,
    resource_type: &str,
    id: &str,
    version: u64,
    secs: i64,
    live: bool,
) {
    store.commit(tenant, vec![put(resource_type, id, version, secs, live)]).await.expect("commit");
}

/// The current versions of `ids`, read now: what a snapshot taken now must return.
async fn current(store: &DynamoStore, tenant: &TenantId, resource_type: &str, ids: &[&str]) -> Vec<ResourceVersion> {
    let mut versions = Vec::new();
    for id in ids {
        let version = store.read(tenant, rt(resource_type), &lid(id)).await.expect("read").expect("exists");
        assert!(!version.is_deleted(), "{id} is live");
        versions.push(version);
    }
    versions
}

/// Every segment of the part (`types`, `segments`) read to its end in pages of `limit`: what
/// each segment yields, in order.
async fn read_part(
    store: &DynamoStore,
    tenant: &TenantId,
    types: &[ResourceType],
    segments: u32,
    as_of: u64,
    since: Option<OffsetDateTime>,
    limit: usize,
) -> Vec<Vec<ResourceVersion>> {
    let mut all = Vec::new();
    for segment in 0..segments {
        let part = ChunkPart { types: types.to_vec(), segment, segments };
        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..10_000 {
            let page = store
                .snapshot_page(tenant, &part, as_of, since, cursor.as_deref(), limit)
                .await
                .expect("snapshot page");
            assert!(page.resources.len() <= limit.max(1), "{} resources in a page of {limit}", page.resources.len());
            seen.extend(page.resources);
            cursor = page.next;
            if cursor.is_none() {
                break;
            }
        }
        assert!(cursor.is_none(), "segment {segment} ended");
        all.push(seen);
    }
    all
}

/// The resources of all segments, by type and id.
fn sorted(segments: &[Vec<ResourceVersion>]) -> Vec<ResourceVersion> {
    let mut all: Vec<ResourceVersion> = segments.iter().flatten().cloned().collect();
    all.sort_by(|a, b| (a.resource_type.as_str(), a.id.as_str()).cmp(&(b.resource_type.as_str(), b.id.as_str())));
    all
}

/// `(id, version)` of each resource, by type and id.
fn id_versions(segments: &[Vec<ResourceVersion>]) -> Vec<(String, u64)> {
    sorted(segments).iter().map(|v| (v.id.to_string(), v.version_id)).collect()
}

fn ids(segments: &[Vec<ResourceVersion>]) -> Vec<String> {
    sorted(segments).iter().map(|v| v.id.to_string()).collect()
}

/// Before the snapshot: `a` updated (v2), `b` live (v1), `c` deleted (v2), `d` untouched (v1),
/// `e` deleted and re-created (v3); an Observation and another tenant's Patients besides.
async fn snapshot_fixture(store: &DynamoStore, mine: &TenantId, other: &TenantId) {
    set(store, mine, "Patient", "a", 1, 1, true).await;
    set(store, mine, "Patient", "a", 2, 2, true).await;
    set(store, mine, "Patient", "b", 1, 3, true).await;
    set(store, mine, "Patient", "c", 1, 4, true).await;
    set(store, mine, "Patient", "c", 2, 5, false).await;
    set(store, mine, "Patient", "d", 1, 6, true).await;
    set(store, mine, "Patient", "e", 1, 7, true).await;
    set(store, mine, "Patient", "e", 2, 8, false).await;
    set(store, mine, "Patient", "e", 3, 9, true).await;
    set(store, mine, "Observation", "o", 1, 10, true).await;
    set(store, other, "Patient", "a", 1, 11, true).await;
    set(store, other, "Patient", "x", 1, 12, true).await;
}

/// New patients of the staged commit after the snapshot.
const STAGED_NEW: usize = 30;

/// After the snapshot: `a` updated twice more, the second time in a staged commit (more writes
/// than one DynamoDB transaction takes) that also deletes `b`, re-creates `c`, updates `e` and
/// creates `f`, `0` and [`STAGED_NEW`] more; another Observation and more of the other tenant.
async fn writes_after_snapshot(store: &DynamoStore, mine: &TenantId, other: &TenantId) {
    set(store, mine, "Patient", "a", 3, 100, true).await;
    let mut staged = vec![
        put("Patient", "a", 4, 101, true),
        put("Patient", "b", 2, 102, false),
        put("Patient", "c", 3, 103, true),
        put("Patient", "e", 4, 104, true),
        put("Patient", "f", 1, 105, true),
        put("Patient", "0", 1, 106, true),
    ];
    staged.extend((0..STAGED_NEW).map(|n| put("Patient", &format!("n{n:02}"), 1, 110, true)));
    assert!(staged.len() > MAX_WRITES_PER_TRANSACTION, "the staged path");
    store.commit(mine, staged).await.expect("staged commit");
    set(store, mine, "Observation", "o2", 1, 107, true).await;
    set(store, other, "Patient", "y", 1, 108, true).await;
}

#[tokio::test]
async fn a_snapshot_is_the_versions_current_at_as_of_whatever_is_written_later() {
    let store = store().await;
    let (mine, other) = (tenant("t1"), tenant("t2"));
    snapshot_fixture(&store, &mine, &other).await;
    let as_of = store.latest_sequence().await.expect("latest");
    let expected = current(&store, &mine, "Patient", &["a", "b", "d", "e"]).await;
    assert_eq!(
        expected.iter().map(|v| (v.id.to_string(), v.version_id)).collect::<Vec<_>>(),
        [("a".into(), 2), ("b".into(), 1), ("d".into(), 1), ("e".into(), 3)]
    );
    let patients = [rt("Patient")];
    let before = read_part(&store, &mine, &patients, 3, as_of, None, 2).await;
    assert_eq!(sorted(&before), expected, "before later writes");

    writes_after_snapshot(&store, &mine, &other).await;
    // Every segment yields the same versions in the same order, whatever the page size.
    assert_eq!(read_part(&store, &mine, &patients, 3, as_of, None, 2).await, before);
    assert_eq!(read_part(&store, &mine, &patients, 3, as_of, None, 1000).await, before);
    let whole = read_part(&store, &mine, &patients, 1, as_of, None, 1).await;
    // Full equality: bodies, versions, timestamps and sequences of the as_of versions.
    assert_eq!(sorted(&whole), expected);
    let page = sorted(&whole);
    assert_eq!(page[0].body, Some(versioned_body("Patient", "a", 2)));
    assert_eq!(page[1].body, Some(versioned_body("Patient", "b", 1)), "deleted after as_of: its earlier version");
    assert!(page.iter().all(|v| v.sequence <= as_of));

    // The present, for contrast: the latest sequence sees the later writes.
    let latest = store.latest_sequence().await.expect("latest");
    let now = read_part(&store, &mine, &patients, 3, latest, None, 100).await;
    let mut present: Vec<(String, u64)> =
        [("0", 1), ("a", 4), ("c", 3), ("d", 1), ("e", 4), ("f", 1)].map(|(id, v)| (id.to_owned(), v)).to_vec();
    present.extend((0..STAGED_NEW).map(|n| (format!("n{n:02}"), 1)));
    present.sort();
    assert_eq!(id_versions(&now), present);
    // The current-version scan agrees with the present.
    let scan = ExportScan { tenant: &mine, types: &patients, since: None, segment: 0, segments: 1 };
    let mut current_page = store.export_page(&scan, None, 1000).await.expect("current export");
    assert!(current_page.next.is_none());
    current_page.resources.sort_by(|a, b| a.id.as_str().cmp(b.id.as_str()));
    assert_eq!(id_versions(&[current_page.resources]), present);

    // Other types and tenants never appear; nothing existed at sequence 0.
    let observations = read_part(&store, &mine, &[rt("Observation")], 3, as_of, None, 100).await;
    assert_eq!(ids(&observations), ["o"]);
    let both = read_part(&store, &mine, &[rt("Patient"), rt("Observation")], 2, as_of, None, 3).await;
    assert_eq!(
        id_versions(&both),
        [("o".into(), 1), ("a".into(), 2), ("b".into(), 1), ("d".into(), 1), ("e".into(), 3)]
    );
    let theirs = sorted(&read_part(&store, &other, &patients, 3, as_of, None, 100).await);
    assert_eq!(theirs.iter().map(|v| v.id.as_str()).collect::<Vec<_>>(), ["a", "x"]);
    assert_eq!(theirs[0].body, Some(versioned_body("Patient", "a", 1)));
    assert_eq!(sorted(&read_part(&store, &tenant("nobody"), &patients, 2, as_of, None, 100).await), []);
    assert_eq!(sorted(&read_part(&store, &mine, &patients, 2, 0, None, 100).await), []);
    assert_eq!(sorted(&read_part(&store, &mine, &[], 2, as_of, None, 100).await), [], "a part of no types");

    // More types than one scan filters by key: the store drops the other types itself.
    let every_type = ResourceType::all().to_vec();
    assert!(every_type.len() > fhirmesh_store_dynamodb::MAX_EXPORT_TYPES);
    let all = read_part(&store, &mine, &every_type, 3, as_of, None, 5).await;
    assert_eq!(sorted(&all), sorted(&both));
    let but_observations: Vec<ResourceType> =
        every_type.iter().copied().filter(|t| t.as_str() != "Observation").collect();
    assert!(but_observations.len() > fhirmesh_store_dynamodb::MAX_EXPORT_TYPES);
    assert_eq!(sorted(&read_part(&store, &mine, &but_observations, 3, as_of, None, 5).await), expected);
}

#[tokio::test]
async fn a_snapshot_filters_by_since_on_its_own_versions_and_refuses_bad_cursors() {
    let store = store().await;
    let (mine, other) = (tenant("t1"), tenant("t2"));
    snapshot_fixture(&store, &mine, &other).await;
    let as_of = store.latest_sequence().await.expect("latest");
    writes_after_snapshot(&store, &mine, &other).await;

    // Last updated: a t(2), b t(3), d t(6), e t(9). Strictly after `since`.
    let patients = [rt("Patient")];
    for (secs, expected) in [
        (0, &["a", "b", "d", "e"][..]),
        (2, &["b", "d", "e"][..]), // a at exactly t(2) is not after it
        (5, &["d", "e"][..]),
        // `a`, `b` and `e` were written at t(100)+ after the snapshot; their snapshot versions
        // are older.
        (50, &[][..]),
    ] {
        let page = read_part(&store, &mine, &patients, 2, as_of, Some(t(secs)), 3).await;
        assert_eq!(ids(&page), expected, "since t({secs})");
    }
    let micro_before = t(6) - time::Duration::microseconds(1);
    assert_eq!(ids(&read_part(&store, &mine, &patients, 2, as_of, Some(micro_before), 3).await), ["d", "e"]);

    // Cursors are opaque but checked; segments must be in range.
    let part = ChunkPart { types: patients.to_vec(), segment: 0, segments: 2 };
    for bad in ["", "x", "\nC", "R#t1#Patient#a\n"] {
        let result = store.snapshot_page(&mine, &part, as_of, None, Some(bad), 10).await;
        assert!(matches!(result, Err(StoreError::Internal(_))), "{bad:?}: {result:?}");
    }
    for (segment, segments) in [(2, 2), (0, 0), (0, 1_000_001)] {
        let part = ChunkPart { types: patients.to_vec(), segment, segments };
        let result = store.snapshot_page(&mine, &part, as_of, None, None, 10).await;
        assert!(matches!(result, Err(StoreError::Internal(_))), "{segment}/{segments}: {result:?}");
    }
    // A page of limit 0 reads one item.
    let first = store.snapshot_page(&mine, &part, as_of, None, None, 0).await.expect("limit 0");
    assert!(first.resources.len() <= 1 && first.next.is_some());
}

// ---------------------------------------------------------------------------------------------
// Staged transactions caught in the middle. A finished staged commit leaves no trace readers
// see; these are the states a reader meets while one runs, or after its writer died: written
// here item by item (layout in design.md).

fn pk_of(tenant: &TenantId, id: &str) -> String {
    format!("R#{tenant}#Patient#{id}")
}

fn version_key(version: u64) -> String {
    format!("V#{version:020}")
}

async fn put_item(store: &DynamoStore, item: HashMap<String, AttributeValue>) {
    store.client().put_item().table_name(store.table()).set_item(Some(item)).send().await.expect("put item");
}

/// A transaction record in `state` (a pending one's deadline far ahead).
async fn record(store: &DynamoStore, txn: &str, state: &str) {
    let deadline = (OffsetDateTime::now_utc().unix_timestamp() + 3600) * 1000;
    put_item(
        store,
        HashMap::from([
            ("pk".to_owned(), AttributeValue::S(format!("X#{txn}"))),
            ("sk".to_owned(), AttributeValue::S("X".into())),
            ("state".to_owned(), AttributeValue::S(state.into())),
            ("deadline".to_owned(), AttributeValue::N(deadline.to_string())),
        ]),
    )
    .await;
}

/// A version item of `txn`, as its staging writes it (`live` false: a delete).
async fn stage(store: &DynamoStore, tenant: &TenantId, id: &str, version: u64, sequence: u64, txn: &str, live: bool) {
    let mut item = HashMap::from([
        ("pk".to_owned(), AttributeValue::S(pk_of(tenant, id))),
        ("sk".to_owned(), AttributeValue::S(version_key(version))),
        ("tenant".to_owned(), AttributeValue::S(tenant.to_string())),
        ("type".to_owned(), AttributeValue::S("Patient".into())),
        ("id".to_owned(), AttributeValue::S(id.into())),
        ("ver".to_owned(), AttributeValue::N(version.to_string())),
        ("seq".to_owned(), AttributeValue::N(sequence.to_string())),
        ("cend".to_owned(), AttributeValue::N(sequence.to_string())),
        ("lu".to_owned(), AttributeValue::N((t(500).unix_timestamp() * 1_000_000).to_string())),
        ("op".to_owned(), AttributeValue::S(if live { "update" } else { "delete" }.into())),
        ("tpk".to_owned(), AttributeValue::S(format!("{tenant}#Patient"))),
        ("spk".to_owned(), AttributeValue::S(tenant.to_string())),
        ("txn".to_owned(), AttributeValue::S(txn.into())),
    ]);
    if live {
        let body = versioned_body("Patient", id, version);
        item.insert("body".to_owned(), AttributeValue::B(aws_sdk_dynamodb::primitives::Blob::new(body.to_vec())));
    }
    put_item(store, item).await;
}

/// `txn` locks the pointer of `id` (creating it when the resource does not exist).
async fn lock(store: &DynamoStore, tenant: &TenantId, id: &str, txn: &str) {
    store
        .client()
        .update_item()
        .table_name(store.table())
        .key("pk", AttributeValue::S(pk_of(tenant, id)))
        .key("sk", AttributeValue::S("C".into()))
        .update_expression("SET lk = :txn")
        .expression_attribute_values(":txn", AttributeValue::S(txn.into()))
        .send()
        .await
        .expect("lock");
}

#[tokio::test]
async fn a_snapshot_reads_through_staged_transactions_committed_or_not() {
    let store = store().await;
    let mine = tenant("t1");
    for id in ["before", "after", "pending", "leftover", "gone", "plain"] {
        set(&store, &mine, "Patient", id, 1, 1, true).await;
    }
    let as_of = store.latest_sequence().await.expect("latest");
    let (at, later) = (as_of, as_of + 100);
    record(&store, "committed", "committed").await;
    record(&store, "pending", "pending").await;
    record(&store, "aborted", "aborted").await;
    // Committed at or before as_of, its pointers not rolled forward yet: the staged versions.
    stage(&store, &mine, "before", 2, at, "committed", true).await;
    lock(&store, &mine, "before", "committed").await;
    stage(&store, &mine, "new-before", 1, at, "committed", true).await;
    lock(&store, &mine, "new-before", "committed").await;
    stage(&store, &mine, "gone", 2, at, "committed", false).await;
    lock(&store, &mine, "gone", "committed").await;
    // Committed after as_of: the earlier versions.
    stage(&store, &mine, "after", 2, later, "committed", true).await;
    lock(&store, &mine, "after", "committed").await;
    stage(&store, &mine, "new-after", 1, later, "committed", true).await;
    lock(&store, &mine, "new-after", "committed").await;
    // Pending: not (yet) data at all.
    stage(&store, &mine, "pending", 2, later, "pending", true).await;
    lock(&store, &mine, "pending", "pending").await;
    lock(&store, &mine, "new-pending", "pending").await;
    // What an aborted transaction left behind (below as_of), under a lock of a pending one that
    // has not staged its own version over it yet.
    stage(&store, &mine, "leftover", 2, at, "aborted", true).await;
    lock(&store, &mine, "leftover", "pending").await;

    let patients = [rt("Patient")];
    let snapshot = read_part(&store, &mine, &patients, 3, as_of, None, 2).await;
    assert_eq!(
        id_versions(&snapshot),
        [("after", 1), ("before", 2), ("leftover", 1), ("new-before", 1), ("pending", 1), ("plain", 1)]
            .map(|(id, v)| (id.to_owned(), v))
    );
    let staged = sorted(&snapshot).into_iter().find(|v| v.id.as_str() == "before").expect("before");
    assert_eq!((staged.sequence, staged.last_updated), (at, t(500)));
    assert_eq!(staged.body, Some(versioned_body("Patient", "before", 2)));
    // `since` applies to the staged version too.
    let recent = read_part(&store, &mine, &patients, 1, as_of, Some(t(100)), 10).await;
    assert_eq!(ids(&recent), ["before", "new-before"]);

    // The current-version scan reads what reads read: committed versions, whatever the pointer.
    let scan = ExportScan { tenant: &mine, types: &patients, since: None, segment: 0, segments: 2 };
    let mut exported = Vec::new();
    for segment in 0..2 {
        let scan = ExportScan { segment, ..scan.clone() };
        let mut cursor: Option<ExportCursor> = None;
        loop {
            let page = store.export_page(&scan, cursor.as_ref(), 3).await.expect("export page");
            exported.extend(page.resources);
            cursor = page.next;
            if cursor.is_none() {
                break;
            }
        }
    }
    let mut read = Vec::new();
    for id in ["after", "before", "gone", "leftover", "new-after", "new-before", "new-pending", "pending", "plain"] {
        if let Some(version) = store.read(&mine, rt("Patient"), &lid(id)).await.expect("read")
            && !version.is_deleted()
        {
            read.push(version);
        }
    }
    assert_eq!(sorted(&[exported]), read);
    assert_eq!(
        read.iter().map(|v| (v.id.to_string(), v.version_id)).collect::<Vec<_>>(),
        [
            ("after", 2),
            ("before", 2),
            ("leftover", 1),
            ("new-after", 1),
            ("new-before", 1),
            ("pending", 1),
            ("plain", 1)
        ]
        .map(|(id, v)| (id.to_owned(), v))
    );
}

/// The current-version scan (`export_page`): live resources at their current version, once
/// across segments, with `since` strictly after.
#[tokio::test]
async fn export_scans_cover_the_current_live_resources_once_across_segments() {
    let store = store().await;
    let (a, b) = (tenant("exp-a"), tenant("exp-b"));
    // 40 Patients in one staged commit, 10 Observations, another tenant's Patients.
    let patients: Vec<VersionWrite> = (0..40).map(|i| put("Patient", &format!("p{i}"), 1, 1, true)).collect();
    store.commit(&a, patients).await.expect("patients");
    let observations: Vec<VersionWrite> = (0..10).map(|i| put("Observation", &format!("o{i}"), 1, 2, true)).collect();
    store.commit(&a, observations).await.expect("observations");
    store.commit(&b, vec![put("Patient", "other", 1, 1, true)]).await.expect("other tenant");
    // Deleted resources are not exported; updated ones once, at their current version.
    store.commit(&a, vec![put("Patient", "p0", 2, 3, false), put("Patient", "p1", 2, 3, false)]).await.expect("delete");
    store.commit(&a, vec![put("Patient", "p2", 2, 5, true)]).await.expect("update");

    let mut expected: Vec<(String, String, u64)> = (2..40)
        .map(|i| ("Patient".to_owned(), format!("p{i}"), if i == 2 { 2 } else { 1 }))
        .chain((0..10).map(|i| ("Observation".to_owned(), format!("o{i}"), 1)))
        .collect();
    expected.sort();
    let all = ExportScan { tenant: &a, types: &[], since: None, segment: 0, segments: 4 };
    assert_eq!(export_all(&store, all.clone(), 7).await, expected);
    assert_eq!(export_all(&store, ExportScan { segments: 1, ..all.clone() }, 1000).await, expected);

    let observation_type = [rt("Observation")];
    let only_observations = ExportScan { types: &observation_type, ..all.clone() };
    assert_eq!(export_all(&store, only_observations, 3).await.len(), 10);
    let since = ExportScan { since: Some(t(1)), ..all.clone() };
    let recent: Vec<String> = export_all(&store, since, 50).await.into_iter().map(|(_, id, _)| id).collect();
    assert_eq!(recent.len(), 11, "the observations and the updated patient: {recent:?}");
    assert!(recent.contains(&"p2".to_owned()));
    let since = ExportScan { since: Some(t(2)), ..all.clone() };
    let recent: Vec<String> = export_all(&store, since, 50).await.into_iter().map(|(_, id, _)| id).collect();
    assert_eq!(recent, ["p2"], "strictly after");

    let bad = ExportScan { segment: 4, ..all.clone() };
    assert!(store.export_page(&bad, None, 10).await.is_err(), "segment out of range");
}

/// Every resource of `scan`'s segments, read page by page with `limit`.
async fn export_all(store: &DynamoStore, scan: ExportScan<'_>, limit: usize) -> Vec<(String, String, u64)> {
    let mut found = Vec::new();
    for segment in 0..scan.segments {
        let scan = ExportScan { segment, ..scan.clone() };
        let mut cursor: Option<ExportCursor> = None;
        for _ in 0..1000 {
            let page = store.export_page(&scan, cursor.as_ref(), limit).await.expect("export page");
            assert!(page.resources.len() <= limit);
            found.extend(page.resources.iter().map(|v| (v.resource_type.to_string(), v.id.to_string(), v.version_id)));
            // Cursors survive being stored as text.
            cursor = page.next.map(|next| ExportCursor::decode(&next.encode()).expect("cursor"));
            if cursor.is_none() {
                break;
            }
        }
        assert!(cursor.is_none(), "segment {segment} ended");
    }
    found.sort();
    found
}
