//! The adapter's integration tests: real SQLite files in temporary directories.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fhirmesh_core::model::{Operation, ResourceVersion, TenantId};
use fhirmesh_core::ports::{
    ChangeLog, CommitReceipt, Expected, HistoryQuery, HistoryScope, ResourceStore, StoreError, VersionWrite,
};
use fhirmesh_fhir::{LogicalId, ResourceType};
use serde_json::json;
use tempfile::TempDir;
use time::OffsetDateTime;
use tokio::sync::oneshot;

use crate::writer::Request;
use crate::{SqliteConfig, SqliteStore};

// ---------------------------------------------------------------------------------------------
// helpers

pub(crate) fn open(dir: &TempDir) -> SqliteStore {
    SqliteStore::open(SqliteConfig::new(db_path(dir))).expect("store opens")
}

pub(crate) fn db_path(dir: &TempDir) -> std::path::PathBuf {
    dir.path().join("fhirmesh.db")
}

pub(crate) fn tenant(name: &str) -> TenantId {
    TenantId::parse(name).expect("valid tenant")
}

pub(crate) fn rt(name: &str) -> ResourceType {
    ResourceType::parse(name).expect("valid resource type")
}

pub(crate) fn lid(id: &str) -> LogicalId {
    LogicalId::parse(id).expect("valid id")
}

/// A fixed instant plus `secs` seconds.
pub(crate) fn t(secs: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_700_000_000 + secs).expect("valid timestamp")
}

fn body(resource_type: &str, id: &str, identifiers: &serde_json::Value) -> Bytes {
    Bytes::from(json!({"resourceType": resource_type, "id": id, "identifier": identifiers}).to_string())
}

pub(crate) fn put(
    resource_type: &str,
    id: &str,
    expected: Expected,
    version_id: u64,
    at: OffsetDateTime,
    body: Option<Bytes>,
) -> VersionWrite {
    let operation = match (&expected, &body) {
        (_, None) => Operation::Delete,
        (Expected::Absent, Some(_)) => Operation::Create,
        (Expected::Version(_), Some(_)) => Operation::Update,
    };
    VersionWrite {
        resource_type: rt(resource_type),
        id: lid(id),
        expected,
        version_id,
        last_updated: at,
        operation,
        body,
        traceparent: None,
    }
}

fn create(resource_type: &str, id: &str, at: OffsetDateTime) -> VersionWrite {
    put(resource_type, id, Expected::Absent, 1, at, Some(body(resource_type, id, &json!([]))))
}

fn update(resource_type: &str, id: &str, current: u64, at: OffsetDateTime) -> VersionWrite {
    let body = body(resource_type, id, &json!([]));
    put(resource_type, id, Expected::Version(current), current + 1, at, Some(body))
}

fn delete(resource_type: &str, id: &str, current: u64, at: OffsetDateTime) -> VersionWrite {
    put(resource_type, id, Expected::Version(current), current + 1, at, None)
}

pub(crate) async fn commit_one(store: &SqliteStore, tenant: &TenantId, write: VersionWrite) -> CommitReceipt {
    store.commit(tenant, vec![write]).await.expect("commit succeeds")
}

/// (type, id, version) of each entry, for compact assertions.
fn keys(versions: &[ResourceVersion]) -> Vec<(String, String, u64)> {
    versions.iter().map(|v| (v.resource_type.to_string(), v.id.to_string(), v.version_id)).collect()
}

fn key(resource_type: &str, id: &str, version: u64) -> (String, String, u64) {
    (resource_type.to_owned(), id.to_owned(), version)
}

fn query(scope: HistoryScope) -> HistoryQuery {
    HistoryQuery { scope, since: None, at: None, before_sequence: None, limit: 100 }
}

pub(crate) fn raw_connection(dir: &TempDir) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(db_path(dir)).expect("raw connection opens");
    conn.busy_timeout(Duration::from_secs(5)).expect("busy timeout");
    conn
}

// ---------------------------------------------------------------------------------------------
// commit, read, vread

#[tokio::test]
async fn commit_read_and_vread() {
    let dir = TempDir::new().expect("temp dir");
    let store = open(&dir);
    let tenant = tenant("t1");
    assert_eq!(store.read(&tenant, rt("Patient"), &lid("a")).await, Ok(None));
    assert_eq!(store.latest_sequence().await, Ok(0));

    let v1 = create("Patient", "a", t(1));
    let receipt = commit_one(&store, &tenant, v1.clone()).await;
    assert_eq!(receipt, CommitReceipt { first_sequence: 1, last_sequence: 1 });
    let v2 = update("Patient", "a", 1, t(2));
    let receipt = commit_one(&store, &tenant, v2.clone()).await;
    assert_eq!(receipt, CommitReceipt { first_sequence: 2, last_sequence: 2 });

    let current = store.read(&tenant, rt("Patient"), &lid("a")).await.expect("read").expect("found");
    assert_eq!(
        current,
        ResourceVersion {
            resource_type: rt("Patient"),
            id: lid("a"),
            version_id: 2,
            last_updated: t(2),
            operation: Operation::Update,
            body: v2.body.clone(),
            sequence: 2,
        }
    );
    let first = store.vread(&tenant, rt("Patient"), &lid("a"), 1).await.expect("vread").expect("found");
    assert_eq!((first.version_id, first.operation, first.sequence), (1, Operation::Create, 1));
    assert_eq!(first.body, v1.body);
    assert_eq!(first.last_updated, t(1));
    assert_eq!(store.vread(&tenant, rt("Patient"), &lid("a"), 3).await, Ok(None));
    assert_eq!(store.vread(&tenant, rt("Patient"), &lid("a"), u64::MAX).await, Ok(None));
    assert_eq!(store.read(&tenant, rt("Observation"), &lid("a")).await, Ok(None));
    assert_eq!(store.latest_sequence().await, Ok(2));
}

#[tokio::test]
async fn read_many_answers_in_the_order_asked_with_gaps_and_tombstones() {
    let dir = TempDir::new().expect("temp dir");
    let store = open(&dir);
    let (mine, other) = (tenant("t1"), tenant("other"));
    commit_one(&store, &mine, create("Patient", "a", t(1))).await;
    commit_one(&store, &mine, create("Patient", "b", t(2))).await;
    commit_one(&store, &mine, delete("Patient", "b", 1, t(3))).await;
    commit_one(&store, &other, create("Patient", "c", t(4))).await;
    let asked = [
        (rt("Patient"), lid("b")),
        (rt("Patient"), lid("missing")),
        (rt("Patient"), lid("c")),
        (rt("Patient"), lid("a")),
    ];
    let found = store.read_many(&mine, &asked).await.expect("read_many");
    let summary: Vec<Option<(String, u64, bool)>> =
        found.iter().map(|v| v.as_ref().map(|v| (v.id.to_string(), v.version_id, v.is_deleted()))).collect();
    assert_eq!(summary, [Some(("b".into(), 2, true)), None, None, Some(("a".into(), 1, false))]);
    assert_eq!(store.read_many(&mine, &[]).await, Ok(Vec::new()));
}

#[tokio::test]
async fn timestamps_keep_microseconds_and_come_back_in_utc() {
    let dir = TempDir::new().expect("temp dir");
    let store = open(&dir);
    let tenant = tenant("t1");
    let at = t(5) + time::Duration::microseconds(123_456) + time::Duration::nanoseconds(789);
    let at = at.to_offset(time::UtcOffset::from_hms(2, 0, 0).expect("offset"));
    commit_one(&store, &tenant, create("Patient", "a", at)).await;
    let read = store.read(&tenant, rt("Patient"), &lid("a")).await.expect("read").expect("found");
    assert_eq!(read.last_updated, t(5) + time::Duration::microseconds(123_456));
    assert_eq!(read.last_updated.offset(), time::UtcOffset::UTC);
}

#[tokio::test]
async fn a_multi_write_commit_is_atomic_with_consecutive_sequences() {
    let dir = TempDir::new().expect("temp dir");
    let store = open(&dir);
    let tenant = tenant("t1");
    let receipt =
        store.commit(&tenant, vec![create("Patient", "a", t(1)), create("Patient", "b", t(1))]).await.expect("commit");
    assert_eq!(receipt, CommitReceipt { first_sequence: 1, last_sequence: 2 });
    let b = store.read(&tenant, rt("Patient"), &lid("b")).await.expect("read").expect("found");
    assert_eq!(b.sequence, 2);

    // Two writes to the same resource in one commit: the second sees the first.
    let receipt = store
        .commit(&tenant, vec![update("Patient", "a", 1, t(2)), update("Patient", "a", 2, t(2))])
        .await
        .expect("commit");
    assert_eq!(receipt, CommitReceipt { first_sequence: 3, last_sequence: 4 });

    // The second write fails: nothing of the commit is written, no sequence is used up.
    let err = store
        .commit(&tenant, vec![create("Patient", "c", t(3)), create("Patient", "a", t(3))])
        .await
        .expect_err("conflict");
    assert_eq!(
        err,
        StoreError::Conflict {
            resource_type: rt("Patient"),
            id: lid("a"),
            expected: Expected::Absent,
            actual: Some(3),
        }
    );
    assert_eq!(store.read(&tenant, rt("Patient"), &lid("c")).await, Ok(None));
    assert_eq!(store.latest_sequence().await, Ok(4));
    let receipt = commit_one(&store, &tenant, create("Patient", "c", t(4))).await;
    assert_eq!(receipt.first_sequence, 5);
}

#[tokio::test]
async fn conflicts_report_the_actual_current_version() {
    let dir = TempDir::new().expect("temp dir");
    let store = open(&dir);
    let tenant = tenant("t1");
    commit_one(&store, &tenant, create("Patient", "a", t(1))).await;

    let conflict =
        |expected, actual| StoreError::Conflict { resource_type: rt("Patient"), id: lid("a"), expected, actual };
    let again = store.commit(&tenant, vec![create("Patient", "a", t(2))]).await;
    assert_eq!(again, Err(conflict(Expected::Absent, Some(1))));
    let stale = store.commit(&tenant, vec![update("Patient", "a", 5, t(2))]).await;
    assert_eq!(stale, Err(conflict(Expected::Version(5), Some(1))));
    let missing = store.commit(&tenant, vec![update("Patient", "b", 1, t(2))]).await;
    assert!(matches!(missing, Err(StoreError::Conflict { actual: None, .. })), "{missing:?}");
    assert_eq!(store.latest_sequence().await, Ok(1));
}

#[tokio::test]
async fn invalid_writes_are_rejected_without_a_panic() {
    let dir = TempDir::new().expect("temp dir");
    let store = open(&dir);
    let tenant = tenant("t1");
    assert!(matches!(store.commit(&tenant, vec![]).await, Err(StoreError::Internal(_))));
    // Version 0 and a version that does not increase.
    let zero = put("Patient", "a", Expected::Absent, 0, t(1), Some(body("Patient", "a", &json!([]))));
    assert!(matches!(store.commit(&tenant, vec![zero]).await, Err(StoreError::Internal(_))));
    commit_one(&store, &tenant, create("Patient", "a", t(1))).await;
    let same = put("Patient", "a", Expected::Version(1), 1, t(2), None);
    assert!(matches!(store.commit(&tenant, vec![same]).await, Err(StoreError::Internal(_))));
    let huge = put("Patient", "a", Expected::Version(1), u64::MAX, t(2), None);
    assert!(matches!(store.commit(&tenant, vec![huge]).await, Err(StoreError::Internal(_))));
    // The store is still fine and no sequence was used up.
    assert_eq!(commit_one(&store, &tenant, update("Patient", "a", 1, t(3))).await.first_sequence, 2);
}

// ---------------------------------------------------------------------------------------------
// group commit

/// Holds SQLite's write lock from another connection so that the writer stalls in BEGIN and the
/// requests sent meanwhile form ONE group; a conflicting request in it must not affect the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_inside_a_group_rolls_back_only_its_own_request() {
    let dir = TempDir::new().expect("temp dir");
    let store = open(&dir);
    let tenant = tenant("t1");
    let blocker = raw_connection(&dir);
    blocker.execute_batch("BEGIN IMMEDIATE").expect("lock");

    let submit = |writes: Vec<VersionWrite>| {
        let (reply, answer) = oneshot::channel();
        store.inner.writer.submit(Request::Commit { tenant: tenant.clone(), writes, reply }).expect("submit");
        answer
    };
    let first = submit(vec![create("Patient", "first", t(1))]);
    tokio::time::sleep(Duration::from_millis(300)).await; // the writer now waits in BEGIN
    let a = submit(vec![create("Patient", "a", t(1))]);
    let a_again = submit(vec![create("Patient", "a", t(1))]);
    let b = submit(vec![create("Patient", "b", t(1)), create("Patient", "b2", t(1))]);
    let stale = submit(vec![update("Patient", "c", 1, t(1))]);
    let (reply, checkpoint) = oneshot::channel();
    store
        .inner
        .writer
        .submit(Request::SaveCheckpoint { consumer: "relay".to_owned(), sequence: 7, reply })
        .expect("submit");
    let a2 = submit(vec![update("Patient", "a", 1, t(2))]);
    blocker.execute_batch("COMMIT").expect("unlock");

    let receipt = |first, last| Ok(CommitReceipt { first_sequence: first, last_sequence: last });
    assert_eq!(first.await.expect("answered"), receipt(1, 1));
    assert_eq!(a.await.expect("answered"), receipt(2, 2));
    assert!(matches!(
        a_again.await.expect("answered"),
        Err(StoreError::Conflict { expected: Expected::Absent, actual: Some(1), .. })
    ));
    assert_eq!(b.await.expect("answered"), receipt(3, 4));
    assert!(matches!(stale.await.expect("answered"), Err(StoreError::Conflict { actual: None, .. })));
    assert_eq!(checkpoint.await.expect("answered"), Ok(()));
    assert_eq!(a2.await.expect("answered"), receipt(5, 5));

    let stats = store.writer_stats();
    assert_eq!((stats.groups, stats.requests), (2, 7), "one group of 1, one of 6");
    assert_eq!(store.checkpoint("relay").await, Ok(7));
    let changes = store.changes_after(0, 100).await.expect("changes");
    let sequences: Vec<u64> = changes.iter().map(|c| c.version.sequence).collect();
    assert_eq!(sequences, vec![1, 2, 3, 4, 5]);
}

/// Many tasks at once: creates racing on one id, optimistic update loops on one hot resource, and
/// independent creates. Exactly one winner per expected version, no lost or duplicate versions,
/// and a gap-free change log.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_commits_have_exactly_one_winner_per_expected_version() {
    const RACERS: usize = 16;
    const UPDATERS: usize = 8;
    const WINS_EACH: usize = 10;
    const CREATORS: usize = 8;
    const CREATES_EACH: usize = 10;

    let dir = TempDir::new().expect("temp dir");
    let store = open(&dir);
    let tenant = tenant("t1");
    commit_one(&store, &tenant, create("Patient", "hot", t(0))).await;

    let mut racers = Vec::new();
    for _ in 0..RACERS {
        let (store, tenant) = (store.clone(), tenant.clone());
        racers.push(tokio::spawn(async move { store.commit(&tenant, vec![create("Patient", "race", t(1))]).await }));
    }
    let mut updaters = Vec::new();
    for _ in 0..UPDATERS {
        let (store, tenant) = (store.clone(), tenant.clone());
        updaters.push(tokio::spawn(async move {
            let mut won = Vec::new();
            while won.len() < WINS_EACH {
                let current =
                    store.read(&tenant, rt("Patient"), &lid("hot")).await.expect("read").expect("found").version_id;
                match store.commit(&tenant, vec![update("Patient", "hot", current, t(2))]).await {
                    Ok(_) => won.push(current),
                    Err(StoreError::Conflict { actual: Some(actual), .. }) => {
                        assert!(actual > current, "a conflict means someone else moved on");
                    }
                    Err(other) => panic!("unexpected error {other:?}"),
                }
            }
            won
        }));
    }
    let mut creators = Vec::new();
    for task in 0..CREATORS {
        let (store, tenant) = (store.clone(), tenant.clone());
        creators.push(tokio::spawn(async move {
            for n in 0..CREATES_EACH {
                let id = format!("c{task}-{n}");
                store.commit(&tenant, vec![create("Observation", &id, t(3))]).await.expect("create");
            }
        }));
    }

    let mut race_wins = 0;
    for racer in racers {
        match racer.await.expect("task") {
            Ok(_) => race_wins += 1,
            Err(StoreError::Conflict { actual: Some(1), .. }) => {}
            Err(other) => panic!("unexpected error {other:?}"),
        }
    }
    assert_eq!(race_wins, 1, "exactly one create wins");

    let mut expected_versions_won = Vec::new();
    for updater in updaters {
        expected_versions_won.extend(updater.await.expect("task"));
    }
    expected_versions_won.sort_unstable();
    let total_updates = UPDATERS * WINS_EACH;
    assert_eq!(expected_versions_won, (1..=total_updates as u64).collect::<Vec<_>>());
    for creator in creators {
        creator.await.expect("task");
    }

    // Every version of the hot resource exists exactly once, newest first.
    let mut history = query(HistoryScope::Instance(rt("Patient"), lid("hot")));
    history.limit = 1000;
    let versions = store.history(&tenant, history).await.expect("history");
    let numbers: Vec<u64> = versions.iter().map(|v| v.version_id).collect();
    assert_eq!(numbers, (1..=total_updates as u64 + 1).rev().collect::<Vec<_>>());

    // The change log has one row per successful write, gap-free, in order.
    let total = 1 + 1 + total_updates + CREATORS * CREATES_EACH;
    let changes = store.changes_after(0, 10_000).await.expect("changes");
    let sequences: Vec<u64> = changes.iter().map(|c| c.version.sequence).collect();
    assert_eq!(sequences, (1..=total as u64).collect::<Vec<_>>());
    assert_eq!(store.latest_sequence().await, Ok(total as u64));
    let distinct: BTreeSet<_> =
        changes.iter().map(|c| (c.version.resource_type, c.version.id.clone(), c.version.version_id)).collect();
    assert_eq!(distinct.len(), total, "no duplicate versions");
}

// ---------------------------------------------------------------------------------------------
// tombstones

#[tokio::test]
async fn deletes_are_kept_as_tombstones() {
    let dir = TempDir::new().expect("temp dir");
    let store = open(&dir);
    let tenant = tenant("t1");
    let ids = json!([{"system": "urn:s", "value": "x"}]);
    let live = put("Patient", "a", Expected::Absent, 1, t(1), Some(body("Patient", "a", &ids)));
    commit_one(&store, &tenant, live).await;
    commit_one(&store, &tenant, delete("Patient", "a", 1, t(2))).await;

    let current = store.read(&tenant, rt("Patient"), &lid("a")).await.expect("read").expect("found");
    assert!(current.is_deleted());
    assert_eq!((current.version_id, current.body.as_ref(), current.sequence), (2, None, 2));
    let old = store.vread(&tenant, rt("Patient"), &lid("a"), 1).await.expect("vread").expect("found");
    assert!(old.body.is_some());

    // A tombstone is a version: Absent no longer holds, Version(2) does.
    let recreate = store.commit(&tenant, vec![create("Patient", "a", t(3))]).await;
    assert!(matches!(recreate, Err(StoreError::Conflict { actual: Some(2), .. })));
    commit_one(&store, &tenant, update("Patient", "a", 2, t(3))).await;
    let current = store.read(&tenant, rt("Patient"), &lid("a")).await.expect("read").expect("found");
    assert_eq!((current.version_id, current.is_deleted()), (3, false));
    let history = store.history(&tenant, query(HistoryScope::Instance(rt("Patient"), lid("a")))).await;
    let operations: Vec<Operation> = history.expect("history").iter().map(|v| v.operation).collect();
    assert_eq!(operations, vec![Operation::Update, Operation::Delete, Operation::Create]);
}

// ---------------------------------------------------------------------------------------------
// history

/// Sequence order: a1 (t10), b1 (t15), a2 (t20), o1 (t25), a3 = delete (t30), o2 (t35).
async fn history_fixture(store: &SqliteStore, tenant: &TenantId) {
    commit_one(store, tenant, create("Patient", "a", t(10))).await;
    commit_one(store, tenant, create("Patient", "b", t(15))).await;
    commit_one(store, tenant, update("Patient", "a", 1, t(20))).await;
    commit_one(store, tenant, create("Observation", "o", t(25))).await;
    commit_one(store, tenant, delete("Patient", "a", 2, t(30))).await;
    commit_one(store, tenant, update("Observation", "o", 1, t(35))).await;
}

#[tokio::test]
async fn history_of_each_scope_is_newest_first() {
    let dir = TempDir::new().expect("temp dir");
    let store = open(&dir);
    let tenant = tenant("t1");
    history_fixture(&store, &tenant).await;

    let system = store.history(&tenant, query(HistoryScope::System)).await.expect("history");
    assert_eq!(
        keys(&system),
        vec![
            key("Observation", "o", 2),
            key("Patient", "a", 3),
            key("Observation", "o", 1),
            key("Patient", "a", 2),
            key("Patient", "b", 1),
            key("Patient", "a", 1),
        ]
    );
    assert_eq!(system.iter().map(|v| v.sequence).collect::<Vec<_>>(), vec![6, 5, 4, 3, 2, 1]);
    let patients = store.history(&tenant, query(HistoryScope::Type(rt("Patient")))).await;
    assert_eq!(
        keys(&patients.expect("history")),
        vec![key("Patient", "a", 3), key("Patient", "a", 2), key("Patient", "b", 1), key("Patient", "a", 1)]
    );
    let a = store.history(&tenant, query(HistoryScope::Instance(rt("Patient"), lid("a")))).await;
    assert_eq!(
        keys(&a.expect("history")),
        vec![key("Patient", "a", 3), key("Patient", "a", 2), key("Patient", "a", 1)]
    );
    let none = store.history(&tenant, query(HistoryScope::Instance(rt("Patient"), lid("zz")))).await;
    assert_eq!(none, Ok(vec![]));
    let none = store.history(&tenant, query(HistoryScope::Type(rt("Encounter")))).await;
    assert_eq!(none, Ok(vec![]));
}

#[tokio::test]
async fn history_filters_since_at_cursor_and_limit() {
    let dir = TempDir::new().expect("temp dir");
    let store = open(&dir);
    let tenant = tenant("t1");
    history_fixture(&store, &tenant).await;
    let run = |query: HistoryQuery| {
        let (store, tenant) = (store.clone(), tenant.clone());
        async move { keys(&store.history(&tenant, query).await.expect("history")) }
    };

    // since: last_updated >= since
    let since = HistoryQuery { since: Some(t(20)), ..query(HistoryScope::System) };
    assert_eq!(
        run(since).await,
        vec![key("Observation", "o", 2), key("Patient", "a", 3), key("Observation", "o", 1), key("Patient", "a", 2)]
    );
    let since = HistoryQuery { since: Some(t(20)), ..query(HistoryScope::Type(rt("Patient"))) };
    assert_eq!(run(since).await, vec![key("Patient", "a", 3), key("Patient", "a", 2)]);
    let since = HistoryQuery { since: Some(t(31)), ..query(HistoryScope::Instance(rt("Patient"), lid("a"))) };
    assert_eq!(run(since).await, vec![]);

    // at: current at some point in [start, end)
    let at = HistoryQuery { at: Some((t(22), t(24))), ..query(HistoryScope::System) };
    assert_eq!(run(at).await, vec![key("Patient", "a", 2), key("Patient", "b", 1)]);
    // a1 was current in [10, 20): it does not overlap [20, 21).
    let at = HistoryQuery { at: Some((t(20), t(21))), ..query(HistoryScope::Type(rt("Patient"))) };
    assert_eq!(run(at).await, vec![key("Patient", "a", 2), key("Patient", "b", 1)]);
    let at = HistoryQuery { at: Some((t(19), t(21))), ..query(HistoryScope::Instance(rt("Patient"), lid("a"))) };
    assert_eq!(run(at).await, vec![key("Patient", "a", 2), key("Patient", "a", 1)]);
    // The tombstone is the current version from t30 on.
    let at = HistoryQuery { at: Some((t(40), t(50))), ..query(HistoryScope::Instance(rt("Patient"), lid("a"))) };
    assert_eq!(run(at).await, vec![key("Patient", "a", 3)]);
    // Nothing existed before t10.
    let at = HistoryQuery { at: Some((t(0), t(10))), ..query(HistoryScope::System) };
    assert_eq!(run(at).await, vec![]);

    // cursor + limit: paging through the system history two at a time.
    let mut pages = Vec::new();
    let mut cursor = None;
    loop {
        let page = HistoryQuery { before_sequence: cursor, limit: 2, ..query(HistoryScope::System) };
        let page = store.history(&tenant, page).await.expect("history");
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 2);
        cursor = page.last().map(|v| v.sequence);
        pages.push(page.iter().map(|v| v.sequence).collect::<Vec<_>>());
    }
    assert_eq!(pages, vec![vec![6, 5], vec![4, 3], vec![2, 1]]);
    let typed = HistoryQuery { before_sequence: Some(5), limit: 1, ..query(HistoryScope::Type(rt("Patient"))) };
    assert_eq!(run(typed).await, vec![key("Patient", "a", 2)]);
    let instance = HistoryQuery { before_sequence: Some(3), ..query(HistoryScope::Instance(rt("Patient"), lid("a"))) };
    assert_eq!(run(instance).await, vec![key("Patient", "a", 1)]);
    let everything = HistoryQuery { before_sequence: Some(u64::MAX), ..query(HistoryScope::System) };
    assert_eq!(run(everything).await.len(), 6);
    let zero = HistoryQuery { limit: 0, ..query(HistoryScope::System) };
    assert_eq!(run(zero).await, vec![]);

    // All filters together.
    let all = HistoryQuery {
        scope: HistoryScope::System,
        since: Some(t(15)),
        at: Some((t(16), t(26))),
        before_sequence: Some(4),
        limit: 10,
    };
    assert_eq!(run(all).await, vec![key("Patient", "a", 2), key("Patient", "b", 1)]);
}

/// The common read paths are index seeks and ordered index walks: no table scan, no sort.
#[test]
fn read_paths_use_indexes() {
    let dir = TempDir::new().expect("temp dir");
    drop(open(&dir));
    let conn = raw_connection(&dir);
    let tenant = tenant("t1");
    let plan = |sql: &str, params: Vec<rusqlite::types::Value>| -> Vec<String> {
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).expect("explain");
        let rows = stmt.query_map(rusqlite::params_from_iter(params), |row| row.get::<_, String>(3)).expect("plan");
        rows.collect::<Result<Vec<_>, _>>().expect("plan rows")
    };
    let scopes =
        [HistoryScope::System, HistoryScope::Type(rt("Patient")), HistoryScope::Instance(rt("Patient"), lid("a"))];
    for scope in scopes {
        for (since, at, before) in
            [(None, None, None), (Some(t(1)), None, Some(10)), (Some(t(1)), Some((t(1), t(2))), Some(10))]
        {
            let q = HistoryQuery { scope: scope.clone(), since, at, before_sequence: before, limit: 10 };
            let (sql, params) = crate::queries::history_sql(&tenant, &q).expect("sql");
            let plan = plan(&sql, params);
            assert!(plan.iter().all(|step| !step.contains("SCAN") && !step.contains("TEMP B-TREE")), "{q:?}: {plan:?}");
            assert!(plan.iter().any(|step| step.starts_with("SEARCH v USING INDEX")), "{plan:?}");
        }
    }
    let read = plan(
        "SELECT v.body FROM resources_current c JOIN resource_versions v ON v.sequence = c.sequence \
         WHERE c.tenant = 't1' AND c.type = 'Patient' AND c.id = 'a'",
        vec![],
    );
    assert!(read.iter().all(|step| step.starts_with("SEARCH")), "{read:?}");
    let changes = plan(
        "SELECT v.body FROM changes c JOIN resource_versions v ON v.sequence = c.sequence \
         WHERE c.sequence > 5 ORDER BY c.sequence LIMIT 10",
        vec![],
    );
    assert!(changes.iter().all(|step| step.starts_with("SEARCH")), "{changes:?}");
}

// ---------------------------------------------------------------------------------------------
// tenants

#[tokio::test]
async fn tenants_never_see_each_other() {
    let dir = TempDir::new().expect("temp dir");
    let store = open(&dir);
    let (one, two) = (tenant("one"), tenant("two"));
    let ids = json!([{"system": "urn:mrn", "value": "42"}]);
    let in_one = Some(Bytes::from_static(b"{\"resourceType\":\"Patient\",\"id\":\"a\",\"identifier\":[{\"system\":\"urn:mrn\",\"value\":\"42\"}],\"name\":[{\"family\":\"One\"}]}"));
    let in_two = Some(body("Patient", "a", &ids));
    commit_one(&store, &one, put("Patient", "a", Expected::Absent, 1, t(1), in_one.clone())).await;
    // The same type/id in tenant two is Absent there, whatever tenant one holds.
    commit_one(&store, &two, put("Patient", "a", Expected::Absent, 1, t(2), in_two.clone())).await;
    commit_one(&store, &two, update("Patient", "a", 1, t(3))).await;

    let a1 = store.read(&one, rt("Patient"), &lid("a")).await.expect("read").expect("found");
    assert_eq!((a1.version_id, &a1.body), (1, &in_one));
    let a2 = store.read(&two, rt("Patient"), &lid("a")).await.expect("read").expect("found");
    assert_eq!(a2.version_id, 2);
    assert_eq!(store.vread(&one, rt("Patient"), &lid("a"), 2).await, Ok(None));
    let other = tenant("three");
    assert_eq!(store.read(&other, rt("Patient"), &lid("a")).await, Ok(None));

    for scope in
        [HistoryScope::System, HistoryScope::Type(rt("Patient")), HistoryScope::Instance(rt("Patient"), lid("a"))]
    {
        let h1 = store.history(&one, query(scope.clone())).await.expect("history");
        assert_eq!(h1.iter().map(|v| v.sequence).collect::<Vec<_>>(), vec![1], "{scope:?}");
        let h2 = store.history(&two, query(scope.clone())).await.expect("history");
        assert_eq!(h2.iter().map(|v| v.sequence).collect::<Vec<_>>(), vec![3, 2], "{scope:?}");
    }

    let changes = store.changes_after(0, 10).await.expect("changes");
    let tenants: Vec<(&str, u64)> = changes.iter().map(|c| (c.tenant.as_str(), c.version.sequence)).collect();
    assert_eq!(tenants, vec![("one", 1), ("two", 2), ("two", 3)]);
}

// ---------------------------------------------------------------------------------------------
// change log

#[tokio::test]
async fn changes_after_is_ordered_and_checkpoints_are_durable() {
    let dir = TempDir::new().expect("temp dir");
    let store = open(&dir);
    let tenant = tenant("t1");
    assert_eq!(store.changes_after(0, 10).await, Ok(vec![]));
    assert_eq!(store.checkpoint("relay").await, Ok(0));
    history_fixture(&store, &tenant).await;

    let all = store.changes_after(0, 100).await.expect("changes");
    assert_eq!(all.iter().map(|c| c.version.sequence).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5, 6]);
    assert!(all.iter().all(|c| c.tenant == tenant));
    // Full versions, tombstones included.
    assert_eq!(all[4].version.operation, Operation::Delete);
    assert_eq!(all[4].version.body, None);
    assert!(all[5].version.body.is_some());
    let page = store.changes_after(2, 2).await.expect("changes");
    assert_eq!(page.iter().map(|c| c.version.sequence).collect::<Vec<_>>(), vec![3, 4]);
    assert_eq!(store.changes_after(6, 10).await, Ok(vec![]));
    assert_eq!(store.changes_after(u64::MAX, 10).await, Ok(vec![]));
    assert_eq!(store.changes_after(0, 0).await, Ok(vec![]));
    assert_eq!(store.latest_sequence().await, Ok(6));

    store.save_checkpoint("relay", 4).await.expect("save");
    store.save_checkpoint("indexer", 2).await.expect("save");
    store.save_checkpoint("relay", 6).await.expect("save");
    assert_eq!(store.checkpoint("relay").await, Ok(6));
    assert_eq!(store.checkpoint("indexer").await, Ok(2));
    assert_eq!(store.checkpoint("other").await, Ok(0));
    drop(store);
    let store = open(&dir);
    assert_eq!(store.checkpoint("relay").await, Ok(6));
}

#[tokio::test]
async fn changes_carry_the_end_of_their_commit() {
    let dir = TempDir::new().expect("temp dir");
    let store = open(&dir);
    let tenant = tenant("t1");
    commit_one(&store, &tenant, create("Patient", "solo", t(1))).await;
    let transaction = (0..3).map(|i| create("Patient", &format!("tx{i}"), t(2))).collect();
    store.commit(&tenant, transaction).await.expect("commit");
    commit_one(&store, &tenant, create("Patient", "after", t(3))).await;
    let ends: Vec<(u64, u64)> =
        store.changes_after(0, 10).await.expect("changes").iter().map(|c| (c.version.sequence, c.commit_end)).collect();
    assert_eq!(ends, vec![(1, 1), (2, 4), (3, 4), (4, 4), (5, 5)]);
}

#[tokio::test]
async fn a_changes_trace_context_is_kept_with_it() {
    let dir = TempDir::new().expect("temp dir");
    let store = open(&dir);
    let tenant = tenant("t1");
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let traced = VersionWrite { traceparent: Some(traceparent.to_owned()), ..create("Patient", "a", t(1)) };
    store.commit(&tenant, vec![traced, create("Patient", "b", t(1))]).await.expect("commit");
    let changes = store.changes_after(0, 10).await.expect("changes");
    let kept: Vec<Option<&str>> = changes.iter().map(|c| c.traceparent.as_deref()).collect();
    assert_eq!(kept, vec![Some(traceparent), None]);
}

#[tokio::test]
async fn a_version_1_store_is_upgraded_in_place() {
    let dir = TempDir::new().expect("temp dir");
    let tenant = tenant("t1");
    let store = open(&dir);
    commit_one(&store, &tenant, create("Patient", "old", t(1))).await;
    drop(store);
    // What version 1 looked like: no commit_end column.
    let conn = raw_connection(&dir);
    conn.execute_batch(
        "ALTER TABLE changes DROP COLUMN traceparent; ALTER TABLE changes DROP COLUMN commit_end; \
         PRAGMA user_version = 1;",
    )
    .expect("downgrade");
    drop(conn);
    let store = open(&dir);
    store.commit(&tenant, vec![create("Patient", "a", t(2)), create("Patient", "b", t(2))]).await.expect("commit");
    let ends: Vec<(u64, u64)> =
        store.changes_after(0, 10).await.expect("changes").iter().map(|c| (c.version.sequence, c.commit_end)).collect();
    assert_eq!(ends, vec![(1, 1), (2, 3), (3, 3)], "old rows are their own commits");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_changes_wakes_on_commit() {
    let dir = TempDir::new().expect("temp dir");
    let store = open(&dir);
    let tenant = tenant("t1");
    let waiter = {
        let store = store.clone();
        tokio::spawn(async move { store.wait_for_changes().await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    commit_one(&store, &tenant, create("Patient", "a", t(1))).await;
    tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("woken by the commit").expect("task");

    // A commit that lands while nobody waits is not lost for the next waiter.
    commit_one(&store, &tenant, create("Patient", "b", t(1))).await;
    tokio::time::timeout(Duration::from_secs(5), store.wait_for_changes())
        .await
        .expect("the stored permit wakes the next waiter");
    // A checkpoint save appends no change and wakes nobody.
    store.save_checkpoint("relay", 1).await.expect("save");
    let idle = tokio::time::timeout(Duration::from_millis(100), store.wait_for_changes()).await;
    assert!(idle.is_err(), "no change, no wake-up");
}

// ---------------------------------------------------------------------------------------------
// durability, shutdown, corruption

#[tokio::test]
async fn everything_survives_a_reopen() {
    let dir = TempDir::new().expect("temp dir");
    let (one, two) = (tenant("one"), tenant("two"));
    {
        let store = open(&dir);
        history_fixture(&store, &one).await;
        commit_one(&store, &two, create("Patient", "a", t(1))).await;
        store.save_checkpoint("relay", 3).await.expect("save");
        let clone = store.clone();
        drop(store);
        // Still usable through the clone.
        commit_one(&clone, &two, update("Patient", "a", 1, t(2))).await;
    }
    let wal = dir.path().join("fhirmesh.db-wal");
    assert!(!wal.exists(), "the last connection closed cleanly and checkpointed the WAL");

    let store = open(&dir);
    assert_eq!(store.latest_sequence().await, Ok(8));
    assert_eq!(store.checkpoint("relay").await, Ok(3));
    let a = store.read(&one, rt("Patient"), &lid("a")).await.expect("read").expect("found");
    assert_eq!((a.version_id, a.is_deleted(), a.last_updated), (3, true, t(30)));
    let system = store.history(&one, query(HistoryScope::System)).await.expect("history");
    assert_eq!(system.len(), 6);
    let changes = store.changes_after(0, 100).await.expect("changes");
    assert_eq!(changes.len(), 8);
    // Sequences continue after the reopen.
    let receipt = commit_one(&store, &two, update("Patient", "a", 2, t(3))).await;
    assert_eq!(receipt.first_sequence, 9);
}

#[tokio::test]
async fn synchronous_normal_works_too() {
    let dir = TempDir::new().expect("temp dir");
    let config = SqliteConfig { read_connections: 0, synchronous_full: false, ..SqliteConfig::new(db_path(&dir)) };
    let store = SqliteStore::open(config).expect("open");
    let tenant = tenant("t1");
    commit_one(&store, &tenant, create("Patient", "a", t(1))).await;
    assert!(store.read(&tenant, rt("Patient"), &lid("a")).await.expect("read").is_some());
    let conn = raw_connection(&dir);
    let mode: String = conn.query_row("PRAGMA journal_mode", [], |row| row.get(0)).expect("mode");
    assert_eq!(mode, "wal");
    let version: i64 = conn.query_row("PRAGMA user_version", [], |row| row.get(0)).expect("version");
    assert_eq!(version, crate::schema::SCHEMA_VERSION);
}

#[test]
fn a_newer_schema_is_refused() {
    let dir = TempDir::new().expect("temp dir");
    let conn = rusqlite::Connection::open(db_path(&dir)).expect("open");
    conn.pragma_update(None, "user_version", 99).expect("set version");
    drop(conn);
    let err = SqliteStore::open(SqliteConfig::new(db_path(&dir))).expect_err("refused");
    assert!(matches!(err, StoreError::Internal(message) if message.contains("99")));
}

#[tokio::test]
async fn corrupt_rows_are_internal_errors_not_panics() {
    let dir = TempDir::new().expect("temp dir");
    let store = open(&dir);
    let tenant = tenant("t1");
    commit_one(&store, &tenant, create("Patient", "a", t(1))).await;
    commit_one(&store, &tenant, create("Patient", "b", t(1))).await;
    commit_one(&store, &tenant, create("Patient", "c", t(1))).await;
    let conn = raw_connection(&dir);
    conn.execute_batch(
        "UPDATE resource_versions SET type = 'NotAType' WHERE sequence = 1; \
         UPDATE resource_versions SET operation = 'frobnicate' WHERE sequence = 2; \
         UPDATE changes SET tenant = 'bad tenant!' WHERE sequence = 3; \
         UPDATE resource_versions SET version = -1, body = 12 WHERE sequence = 3;",
    )
    .expect("corrupt");
    drop(conn);

    fn internal<T>(result: Result<T, StoreError>) -> bool {
        matches!(result, Err(StoreError::Internal(_)))
    }
    assert!(internal(store.read(&tenant, rt("Patient"), &lid("a")).await));
    assert!(internal(store.read(&tenant, rt("Patient"), &lid("b")).await));
    assert!(internal(store.read(&tenant, rt("Patient"), &lid("c")).await));
    assert!(internal(store.history(&tenant, query(HistoryScope::System)).await));
    assert!(internal(store.changes_after(2, 10).await));
    assert!(internal(store.changes_after(0, 10).await));
}

#[test]
fn unopenable_paths_are_errors() {
    let dir = TempDir::new().expect("temp dir");
    let path: &Path = &dir.path().join("missing-dir").join("db");
    let err = SqliteStore::open(SqliteConfig::new(path)).expect_err("no such directory");
    assert!(matches!(err, StoreError::Internal(_)), "{err:?}");
}

// ---------------------------------------------------------------------------------------------
// measurement

/// `cargo test -p fhirmesh-store-sqlite --release -- --ignored --nocapture group_commit_throughput`
///
/// 32 tasks each committing single-write creates, `synchronous=FULL`: prints commits/s and the
/// average group size; for comparison, one task committing alone (one fsync per commit).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "measurement, prints figures"]
async fn group_commit_throughput() {
    const TASKS: usize = 32;
    const PER_TASK: usize = 200;

    let dir = TempDir::new().expect("temp dir");
    let store = open(&dir);
    let tenant = tenant("bench");

    let started = Instant::now();
    for n in 0..PER_TASK {
        commit_one(&store, &tenant, create("Patient", &format!("solo-{n}"), t(1))).await;
    }
    let solo = started.elapsed();
    let solo_stats = store.writer_stats();

    let started = Instant::now();
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let (store, tenant) = (store.clone(), tenant.clone());
        tasks.push(tokio::spawn(async move {
            for n in 0..PER_TASK {
                let id = format!("p{task}-{n}");
                commit_one(&store, &tenant, create("Patient", &id, t(1))).await;
            }
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }
    let elapsed = started.elapsed();
    let stats = store.writer_stats();
    let groups = stats.groups - solo_stats.groups;
    let requests = stats.requests - solo_stats.requests;
    let commits = (TASKS * PER_TASK) as f64;
    println!(
        "sequential (1 task): {PER_TASK} commits in {solo:?} = {:.0} commits/s",
        PER_TASK as f64 / solo.as_secs_f64()
    );
    println!(
        "group commit ({TASKS} tasks): {commits} commits in {elapsed:?} = {:.0} commits/s, \
         {groups} groups, average group size {:.1}",
        commits / elapsed.as_secs_f64(),
        requests as f64 / groups as f64
    );
    assert_eq!(requests as f64, commits);
}

#[tokio::test]
async fn cached_statements_are_not_reprepared_on_every_run() {
    // The bundled SQLite has STAT4, which re-parses a statement whenever new bound values might
    // change its plan; connections opt out (QPSG) so a cached statement stays prepared.
    let dir = TempDir::new().expect("temp dir");
    let store = open(&dir);
    let tenant = tenant("t1");
    commit_one(&store, &tenant, create("Patient", "a", t(1))).await;
    let conn = crate::schema::open_reader(&db_path(&dir)).expect("reader");
    for id in ["a", "b", "c", "d"] {
        crate::queries::read_current(&conn, &tenant, rt("Patient"), &lid(id)).expect("read");
    }
    let sql = format!(
        "SELECT {} FROM resources_current c JOIN resource_versions v ON v.sequence = c.sequence \
         WHERE c.tenant = ?1 AND c.type = ?2 AND c.id = ?3",
        crate::rows::VERSION_COLUMNS
    );
    let stmt = conn.prepare_cached(&sql).expect("the statement read_current caches");
    assert_eq!(stmt.get_status(rusqlite::StatementStatus::Run), 4, "the same cached statement ran every read");
    assert_eq!(stmt.get_status(rusqlite::StatementStatus::RePrepare), 0);
}
