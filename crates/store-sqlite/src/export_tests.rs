//! Tests of the export ports: the snapshot read ([`ExportSource`]) on the resource store, and the
//! job store ([`SqliteJobStore`]). Real SQLite files in temporary directories.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use fhirmesh_core::export::job_store_suite::{self as suite, job, job_id, view};
use fhirmesh_core::export::{ChunkPart, ExportSource, JobError, JobStore};
use fhirmesh_core::model::{ResourceVersion, TenantId};
use fhirmesh_core::ports::{ChangeLog, Expected, ResourceStore, StoreError};
use serde_json::json;
use tempfile::TempDir;
use time::OffsetDateTime;

use crate::tests::{commit_one, lid, open, put, raw_connection, rt, t, tenant};
use crate::{SqliteJobStore, SqliteStore};

// ---------------------------------------------------------------------------------------------
// snapshot_page

/// A body that names its version, so versions of one resource differ.
fn versioned_body(resource_type: &str, id: &str, version: u64) -> Bytes {
    Bytes::from(json!({"resourceType": resource_type, "id": id, "note": format!("{id} v{version}")}).to_string())
}

/// Writes `version` of a resource (a delete when `live` is false) at `t(secs)`.
async fn set(
    store: &SqliteStore,
    tenant: &TenantId,
    resource_type: &str,
    id: &str,
    version: u64,
    secs: i64,
    live: bool,
) {
    let expected = if version == 1 { Expected::Absent } else { Expected::Version(version - 1) };
    let body = live.then(|| versioned_body(resource_type, id, version));
    commit_one(store, tenant, put(resource_type, id, expected, version, t(secs), body)).await;
}

/// The current versions of `ids`, read now: what a snapshot taken now must return.
async fn current(store: &SqliteStore, tenant: &TenantId, resource_type: &str, ids: &[&str]) -> Vec<ResourceVersion> {
    let mut versions = Vec::new();
    for id in ids {
        let version = store.read(tenant, rt(resource_type), &lid(id)).await.expect("read").expect("exists");
        assert!(!version.is_deleted(), "{id} is live");
        versions.push(version);
    }
    versions
}

async fn snapshot(
    store: &SqliteStore,
    tenant: &TenantId,
    resource_type: &str,
    as_of: u64,
    since: Option<OffsetDateTime>,
    after: Option<&str>,
    limit: usize,
) -> Vec<ResourceVersion> {
    let part = ChunkPart { types: vec![rt(resource_type)], segment: 0, segments: 1 };
    let cursor = after.map(|id| format!("0/{id}"));
    let page = store.snapshot_page(tenant, &part, as_of, since, cursor.as_deref(), limit).await.expect("snapshot page");
    page.resources
}

const NOTHING: Vec<ResourceVersion> = Vec::new();

fn ids(versions: &[ResourceVersion]) -> Vec<String> {
    versions.iter().map(|v| v.id.to_string()).collect()
}

/// Before the snapshot: `a` updated (v2), `b` live (v1), `c` deleted (v2), `d` untouched (v1),
/// `e` deleted and re-created (v3); an Observation and another tenant's Patient besides.
async fn snapshot_fixture(store: &SqliteStore, mine: &TenantId, other: &TenantId) {
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

/// After the snapshot: `a` updated twice more, `b` deleted, `c` re-created, `e` updated, `f` and
/// `0` created, more Observations and more of the other tenant.
async fn writes_after_snapshot(store: &SqliteStore, mine: &TenantId, other: &TenantId) {
    set(store, mine, "Patient", "a", 3, 100, true).await;
    set(store, mine, "Patient", "a", 4, 101, true).await;
    set(store, mine, "Patient", "b", 2, 102, false).await;
    set(store, mine, "Patient", "c", 3, 103, true).await;
    set(store, mine, "Patient", "e", 4, 104, true).await;
    set(store, mine, "Patient", "f", 1, 105, true).await;
    set(store, mine, "Patient", "0", 1, 106, true).await;
    set(store, mine, "Observation", "o2", 1, 107, true).await;
    set(store, other, "Patient", "y", 1, 108, true).await;
}

#[tokio::test]
async fn snapshot_page_returns_the_versions_current_at_as_of() {
    let dir = TempDir::new().expect("temp dir");
    let store = open(&dir);
    let (mine, other) = (tenant("t1"), tenant("t2"));
    snapshot_fixture(&store, &mine, &other).await;
    let as_of = store.latest_sequence().await.expect("latest");
    let expected = current(&store, &mine, "Patient", &["a", "b", "d", "e"]).await;
    assert_eq!(
        expected.iter().map(|v| (v.id.to_string(), v.version_id)).collect::<Vec<_>>(),
        [("a".into(), 2), ("b".into(), 1), ("d".into(), 1), ("e".into(), 3)]
    );
    assert_eq!(snapshot(&store, &mine, "Patient", as_of, None, None, 100).await, expected, "before later writes");

    writes_after_snapshot(&store, &mine, &other).await;
    let page = snapshot(&store, &mine, "Patient", as_of, None, None, 100).await;
    // Full equality: bodies, versions, timestamps and sequences of the as_of versions.
    assert_eq!(page, expected);
    assert_eq!(page[0].body, Some(versioned_body("Patient", "a", 2)));
    assert_eq!(page[1].body, Some(versioned_body("Patient", "b", 1)), "deleted after as_of: its earlier version");
    assert!(page.iter().all(|v| v.sequence <= as_of));

    // The present, for contrast: the same query at the latest sequence sees the later writes.
    let latest = store.latest_sequence().await.expect("latest");
    let now = snapshot(&store, &mine, "Patient", latest, None, None, 100).await;
    assert_eq!(
        now.iter().map(|v| (v.id.to_string(), v.version_id)).collect::<Vec<_>>(),
        [("0".into(), 1), ("a".into(), 4), ("c".into(), 3), ("d".into(), 1), ("e".into(), 4), ("f".into(), 1)]
    );

    // Other types and tenants never appear; nothing existed at sequence 0.
    let observations = snapshot(&store, &mine, "Observation", as_of, None, None, 100).await;
    assert_eq!(ids(&observations), ["o"]);
    let theirs = snapshot(&store, &other, "Patient", as_of, None, None, 100).await;
    assert_eq!(ids(&theirs), ["a", "x"]);
    assert_eq!(theirs[0].body, Some(versioned_body("Patient", "a", 1)));
    assert_eq!(snapshot(&store, &tenant("nobody"), "Patient", as_of, None, None, 100).await, NOTHING);
    assert_eq!(snapshot(&store, &mine, "Patient", 0, None, None, 100).await, NOTHING);
}

#[tokio::test]
async fn snapshot_page_filters_by_since_on_the_snapshot_version() {
    let dir = TempDir::new().expect("temp dir");
    let store = open(&dir);
    let (mine, other) = (tenant("t1"), tenant("t2"));
    snapshot_fixture(&store, &mine, &other).await;
    let as_of = store.latest_sequence().await.expect("latest");
    writes_after_snapshot(&store, &mine, &other).await;

    // Last updated: a t(2), b t(3), d t(6), e t(9). Strictly after `since`.
    let since = |secs| snapshot(&store, &mine, "Patient", as_of, Some(t(secs)), None, 100);
    assert_eq!(ids(&since(0).await), ["a", "b", "d", "e"]);
    assert_eq!(ids(&since(2).await), ["b", "d", "e"], "a at exactly t(2) is not after it");
    assert_eq!(ids(&since(5).await), ["d", "e"]);
    // `a` and `e` were updated at t(100)+ after the snapshot; their snapshot versions are older.
    assert_eq!(since(50).await, NOTHING);
    let micro_before = t(6) - time::Duration::microseconds(1);
    let page = snapshot(&store, &mine, "Patient", as_of, Some(micro_before), None, 100).await;
    assert_eq!(ids(&page), ["d", "e"]);
}

#[tokio::test]
async fn snapshot_pages_cover_every_resource_once_in_id_order() {
    let dir = TempDir::new().expect("temp dir");
    let store = open(&dir);
    let (mine, other) = (tenant("t1"), tenant("t2"));
    // Ids whose byte order differs from a case-insensitive or numeric one.
    let mut names: Vec<String> = (0..23).map(|n| format!("p{n}")).collect();
    names.extend(["Z", "a", "a-1", "a.1", "A", "9", "10"].map(String::from));
    for (n, name) in names.iter().enumerate() {
        set(&store, &mine, "Patient", name, 1, n as i64, true).await;
        if n % 3 == 0 {
            set(&store, &mine, "Patient", name, 2, 50 + n as i64, true).await;
        }
    }
    set(&store, &mine, "Patient", "p5", 2, 60, false).await;
    set(&store, &other, "Patient", "p1", 1, 61, true).await;
    let as_of = store.latest_sequence().await.expect("latest");
    let mut live: Vec<&str> = names.iter().map(String::as_str).filter(|name| *name != "p5").collect();
    live.sort_unstable(); // byte order
    let expected = current(&store, &mine, "Patient", &live).await;

    // Later writes to every resource, a new one in the middle of the id range, and deletes.
    for (n, name) in names.iter().enumerate() {
        let next = if n % 3 == 0 { 3 } else { 2 };
        if name != "p5" {
            set(&store, &mine, "Patient", name, next, 200 + n as i64, n % 2 == 0).await;
        }
    }
    set(&store, &mine, "Patient", "p10a", 1, 300, true).await;

    for limit in [1, 3, 7, 100] {
        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = snapshot(&store, &mine, "Patient", as_of, None, after.as_deref(), limit).await;
            assert!(page.len() <= limit);
            let Some(last) = page.last() else { break };
            after = Some(last.id.to_string());
            seen.extend(page);
        }
        assert_eq!(seen, expected, "pages of {limit}");
    }
    assert_eq!(ids(&expected), live);
    assert!(live.windows(2).all(|pair| pair[0].as_bytes() < pair[1].as_bytes()));
    // The limit is clamped to at least 1 and at most 10 000.
    assert_eq!(snapshot(&store, &mine, "Patient", as_of, None, None, 0).await.len(), 1);
    assert_eq!(snapshot(&store, &mine, "Patient", as_of, None, None, usize::MAX).await.len(), live.len());
    // After the last id: nothing.
    let last = live.last().expect("some");
    assert_eq!(snapshot(&store, &mine, "Patient", as_of, None, Some(last), 10).await, NOTHING);
}

/// A part of several types is read type after type through the opaque cursor; scan segments are
/// refused (SQLite reads by type).
#[tokio::test]
async fn a_part_of_several_types_pages_through_each_in_turn() {
    let dir = TempDir::new().expect("temp dir");
    let store = open(&dir);
    let mine = tenant("t1");
    for n in 0..5 {
        set(&store, &mine, "Patient", &format!("p{n}"), 1, n, true).await;
        set(&store, &mine, "Observation", &format!("o{n}"), 1, 10 + n, true).await;
    }
    let as_of = store.latest_sequence().await.expect("latest");
    let part = ChunkPart { types: vec![rt("Observation"), rt("Encounter"), rt("Patient")], segment: 0, segments: 1 };
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let page = store.snapshot_page(&mine, &part, as_of, None, cursor.as_deref(), 2).await.expect("page");
        assert!(page.resources.len() <= 2);
        seen.extend(page.resources.iter().map(|v| format!("{}/{}", v.resource_type, v.id)));
        pages += 1;
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    let expected: Vec<String> =
        (0..5).map(|n| format!("Observation/o{n}")).chain((0..5).map(|n| format!("Patient/p{n}"))).collect();
    assert_eq!(seen, expected);
    assert!(pages >= 5, "{pages} pages of at most 2");
    for bad in ["x", "9/p1", "0/", "1/p 1"] {
        let result = store.snapshot_page(&mine, &part, as_of, None, Some(bad), 2).await;
        assert!(matches!(result, Err(StoreError::Internal(_))), "{bad:?}: {result:?}");
    }
    let segmented = ChunkPart { types: vec![rt("Patient")], segment: 0, segments: 4 };
    let result = store.snapshot_page(&mine, &segmented, as_of, None, None, 2).await;
    assert!(matches!(result, Err(StoreError::Unsupported(_))), "{result:?}");
}

/// Paging while another task keeps writing: every page still reads the snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_pages_are_stable_while_writes_continue() {
    let dir = TempDir::new().expect("temp dir");
    let store = open(&dir);
    let tenant = tenant("t1");
    let names: Vec<String> = (0..40).map(|n| format!("r{n:02}")).collect();
    for (n, name) in names.iter().enumerate() {
        set(&store, &tenant, "Patient", name, 1, n as i64, true).await;
    }
    let as_of = store.latest_sequence().await.expect("latest");
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let expected = current(&store, &tenant, "Patient", &refs).await;

    let writer = {
        let (store, tenant, names) = (store.clone(), tenant.clone(), names.clone());
        tokio::spawn(async move {
            for round in 0..5u64 {
                for (n, name) in names.iter().enumerate() {
                    let live = !(round == 4 && n % 2 == 0);
                    set(&store, &tenant, "Patient", name, round + 2, 1000 + n as i64, live).await;
                    if round == 0 {
                        set(&store, &tenant, "Patient", &format!("{name}x"), 1, 2000, true).await;
                    }
                }
            }
        })
    };
    let mut pages = 0;
    while !writer.is_finished() || pages < 2 {
        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = snapshot(&store, &tenant, "Patient", as_of, None, after.as_deref(), 3).await;
            let Some(last) = page.last() else { break };
            after = Some(last.id.to_string());
            seen.extend(page);
            tokio::task::yield_now().await;
        }
        assert_eq!(seen, expected);
        pages += 1;
    }
    writer.await.expect("writer");
    assert!(store.latest_sequence().await.expect("latest") > as_of + 200, "the writes happened");
    assert_eq!(snapshot(&store, &tenant, "Patient", as_of, None, None, 1000).await, expected);
}

/// The snapshot query is index seeks and ordered walks: the current-version table by primary key
/// in id order, a rowid lookup per resource, and for a resource changed since the snapshot a
/// backwards walk of its own entries in the unique (covering) index — never a scan or a sort.
#[test]
fn snapshot_query_uses_indexes() {
    let dir = TempDir::new().expect("temp dir");
    drop(open(&dir));
    let conn = raw_connection(&dir);
    let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {}", crate::queries::snapshot_sql())).expect("explain");
    let since: Option<i64> = None;
    let rows = stmt
        .query_map(rusqlite::params!["t1", "Patient", 10, "", since, 100], |row| row.get::<_, String>(3))
        .expect("plan");
    let plan = rows.collect::<Result<Vec<_>, _>>().expect("plan rows");
    assert!(plan.iter().all(|step| !step.contains("SCAN") && !step.contains("TEMP B-TREE")), "{plan:?}");
    let has = |text: &str| plan.iter().any(|step| step.starts_with(text));
    assert!(has("SEARCH c USING PRIMARY KEY (tenant=? AND type=? AND id>?)"), "{plan:?}");
    assert!(has("SEARCH v USING INTEGER PRIMARY KEY (rowid=?)"), "{plan:?}");
    assert!(has("SEARCH w USING COVERING INDEX resource_versions_instance (tenant=? AND type=? AND id=?)"), "{plan:?}");
}

#[tokio::test]
async fn corrupt_snapshot_rows_are_internal_errors() {
    let dir = TempDir::new().expect("temp dir");
    let store = open(&dir);
    let tenant = tenant("t1");
    set(&store, &tenant, "Patient", "a", 1, 1, true).await;
    let conn = raw_connection(&dir);
    conn.execute_batch("UPDATE resource_versions SET operation = 'frobnicate' WHERE sequence = 1").expect("corrupt");
    drop(conn);
    let result = store
        .snapshot_page(&tenant, &ChunkPart { types: vec![rt("Patient")], segment: 0, segments: 1 }, 1, None, None, 10)
        .await;
    assert!(matches!(result, Err(StoreError::Internal(_))), "{result:?}");
}

// ---------------------------------------------------------------------------------------------
// SqliteJobStore

fn jobs_path(dir: &TempDir) -> PathBuf {
    dir.path().join("jobs.db")
}

fn open_jobs(dir: &TempDir) -> SqliteJobStore {
    SqliteJobStore::open(&jobs_path(dir)).expect("job store opens")
}

/// Rows of `export_chunks` matching `condition`.
fn chunk_rows(dir: &TempDir, condition: &str) -> i64 {
    let raw = rusqlite::Connection::open(jobs_path(dir)).expect("raw");
    raw.query_row(&format!("SELECT COUNT(*) FROM export_chunks WHERE {condition}"), [], |row| row.get(0))
        .expect("count")
}

/// The shared cases (`fhirmesh_core::export::job_store_suite`), each on a fresh job database.
macro_rules! job_store_cases {
    ($($case:ident),* $(,)?) => {$(
        #[tokio::test]
        async fn $case() {
            let dir = TempDir::new().expect("temp dir");
            suite::$case(&open_jobs(&dir)).await;
        }
    )*};
}

job_store_cases!(
    leases_go_oldest_job_first_and_are_exclusive,
    an_expired_lease_passes_to_another_worker,
    completing_the_last_chunk_completes_the_job,
    failing_a_job_stops_its_chunks,
    finished_before_lists_finished_jobs_oldest_first,
    a_released_chunk_comes_back_at_its_retry_time,
);

#[tokio::test]
async fn jobs_round_trip_and_persist() {
    let dir = TempDir::new().expect("temp dir");
    let expected = suite::jobs_round_trip(&open_jobs(&dir)).await;
    let jobs = open_jobs(&dir);
    assert_eq!(view(&jobs, "t1", "job-1").await, Some(expected), "reopened");
    let conn = rusqlite::Connection::open(jobs_path(&dir)).expect("raw");
    let mode: String = conn.query_row("PRAGMA journal_mode", [], |row| row.get(0)).expect("mode");
    assert_eq!(mode, "wal");
}

#[tokio::test]
async fn the_active_job_limit_is_per_owner_and_tenant() {
    let dir = TempDir::new().expect("temp dir");
    suite::the_active_job_limit_is_per_owner_and_tenant(&open_jobs(&dir)).await;
    assert_eq!(chunk_rows(&dir, "job_id = 'c1'"), 0, "the refused job left no chunk");
}

#[tokio::test]
async fn deleting_a_job_removes_it_and_its_chunks() {
    let dir = TempDir::new().expect("temp dir");
    suite::deleting_a_job_removes_it_and_its_chunks(&open_jobs(&dir)).await;
    assert_eq!((chunk_rows(&dir, "tenant = 't1'"), chunk_rows(&dir, "tenant = 't2'")), (0, 1));
}

#[tokio::test]
async fn corrupt_job_rows_are_internal_errors_not_panics() {
    let dir = TempDir::new().expect("temp dir");
    let jobs = open_jobs(&dir);
    for id in ["request", "status", "outputs", "bad-id"] {
        jobs.create(&job("t1", id, None, &["Patient"], 1), 10).await.expect("create");
    }
    jobs.fail(&tenant("t1"), &job_id("bad-id"), "x", t(2)).await.expect("fail");
    let raw = rusqlite::Connection::open(jobs_path(&dir)).expect("raw");
    raw.busy_timeout(Duration::from_secs(5)).expect("busy timeout");
    raw.execute_batch(
        "UPDATE export_jobs SET request_json = '{not json' WHERE id = 'request'; \
         UPDATE export_jobs SET status = 'bogus' WHERE id = 'status'; \
         UPDATE export_chunks SET outputs_json = '[{\"name\": 1}]', done = 1 WHERE job_id = 'outputs'; \
         UPDATE export_jobs SET id = 'Bad/Id' WHERE id = 'bad-id';",
    )
    .expect("corrupt");
    drop(raw);
    for id in ["request", "status", "outputs"] {
        let got = jobs.get(&tenant("t1"), &job_id(id)).await;
        assert!(matches!(got, Err(JobError::Internal(_))), "{id}: {got:?}");
    }
    let listed = jobs.finished_before(t(100), 10).await;
    assert!(matches!(listed, Err(JobError::Internal(_))), "{listed:?}");
    // The lease reaches the first job's (corrupt) request while building the LeasedChunk.
    let leased = jobs.lease("w", t(1), t(5)).await;
    assert!(matches!(leased, Err(JobError::Internal(_))), "{leased:?}");
}

#[test]
fn job_databases_of_a_newer_schema_or_at_bad_paths_are_refused() {
    let dir = TempDir::new().expect("temp dir");
    let conn = rusqlite::Connection::open(jobs_path(&dir)).expect("open");
    conn.pragma_update(None, "user_version", 99).expect("set version");
    drop(conn);
    let err = SqliteJobStore::open(&jobs_path(&dir)).expect_err("refused");
    assert!(matches!(&err, JobError::Internal(message) if message.contains("99")), "{err:?}");
    let missing = dir.path().join("missing-dir").join("jobs.db");
    let err = SqliteJobStore::open(&missing).expect_err("no such directory");
    assert!(matches!(err, JobError::Internal(_)), "{err:?}");
}
