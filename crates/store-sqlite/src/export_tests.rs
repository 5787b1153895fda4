//! Tests of the export ports: the snapshot read ([`ExportSource`]) on the resource store, and the
//! job store ([`SqliteJobStore`]). Real SQLite files in temporary directories.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use fhirmesh_core::export::{
    ChunkPart, ChunkState, ExportJob, ExportLevel, ExportRequest, ExportSource, JobError, JobId, JobStatus, JobStore,
    JobView, LeasedChunk, OutputFile,
};
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

fn job_id(text: &str) -> JobId {
    JobId::parse(text).expect("valid job id")
}

/// An export job of `tenant` created at `t(created)`, one chunk per type.
fn job(tenant_name: &str, id: &str, owner: Option<&str>, types: &[&str], created: i64) -> ExportJob {
    ExportJob {
        id: job_id(id),
        tenant: tenant(tenant_name),
        owner: owner.map(str::to_owned),
        request: ExportRequest {
            level: ExportLevel::Group { id: "g1".into() },
            types: types.iter().map(|ty| (*ty).to_owned()).collect(),
            since: Some(t(-100)),
            type_filters: vec!["Observation?status=final".into()],
            elements: vec!["Patient.name".into(), "status".into()],
            patients: vec!["p1".into()],
            request_url: format!("http://h/Group/g1/$export?job={id}"),
            segments: 1,
        },
        as_of: 42,
        transaction_time: t(created) - time::Duration::microseconds(5),
        created_at: t(created),
        status: JobStatus::Active,
        error: None,
        finished_at: None,
    }
}

fn output(resource_type: &str, part: u32) -> OutputFile {
    OutputFile {
        resource_type: resource_type.to_owned(),
        name: format!("{resource_type}-{part}.ndjson"),
        count: 10 + u64::from(part),
        bytes: 1000 + u64::from(part),
    }
}

async fn view(jobs: &SqliteJobStore, tenant_name: &str, id: &str) -> Option<JobView> {
    jobs.get(&tenant(tenant_name), &job_id(id)).await.expect("get")
}

async fn lease(jobs: &SqliteJobStore, worker: &str, now: i64, until: i64) -> Option<LeasedChunk> {
    jobs.lease(worker, t(now), t(until)).await.expect("lease")
}

/// (job id, chunk index) of a lease.
fn which(chunk: &Option<LeasedChunk>) -> Option<(String, u32)> {
    chunk.as_ref().map(|chunk| (chunk.job.id.to_string(), chunk.index))
}

#[tokio::test]
async fn jobs_round_trip_and_persist() {
    let dir = TempDir::new().expect("temp dir");
    let jobs = open_jobs(&dir);
    let created = job("t1", "job-1", Some("alice"), &["Patient", "Observation"], 1);
    jobs.create(&created, 5).await.expect("create");
    let expected = JobView {
        job: created.clone(),
        chunks: vec![
            ChunkState { index: 0, done: false, outputs: vec![] },
            ChunkState { index: 1, done: false, outputs: vec![] },
        ],
    };
    assert_eq!(view(&jobs, "t1", "job-1").await, Some(expected.clone()));
    assert_eq!(view(&jobs, "t1", "job-2").await, None);
    assert_eq!(view(&jobs, "t2", "job-1").await, None, "jobs are per tenant");

    // Whatever status the caller set, a new job is active; no owner is stored as none.
    let mut anonymous = job("t1", "job-2", None, &["Patient"], 2);
    anonymous.status = JobStatus::Failed;
    jobs.create(&anonymous, 5).await.expect("create");
    let stored = view(&jobs, "t1", "job-2").await.expect("stored");
    assert_eq!((stored.job.status, stored.job.owner), (JobStatus::Active, None));

    // The same id twice is an error, not a second job.
    let again = jobs.create(&created, 5).await;
    assert!(matches!(again, Err(JobError::Internal(_))), "{again:?}");

    drop(jobs);
    let jobs = open_jobs(&dir);
    assert_eq!(view(&jobs, "t1", "job-1").await, Some(expected));
    let conn = rusqlite::Connection::open(jobs_path(&dir)).expect("raw");
    let mode: String = conn.query_row("PRAGMA journal_mode", [], |row| row.get(0)).expect("mode");
    assert_eq!(mode, "wal");
}

#[tokio::test]
async fn the_active_job_limit_is_per_owner_and_tenant() {
    let dir = TempDir::new().expect("temp dir");
    let jobs = open_jobs(&dir);
    jobs.create(&job("t1", "a1", Some("alice"), &["Patient"], 1), 2).await.expect("first");
    jobs.create(&job("t1", "a2", Some("alice"), &["Patient"], 2), 2).await.expect("second");
    let third = jobs.create(&job("t1", "a3", Some("alice"), &["Patient", "Observation"], 3), 2).await;
    assert_eq!(third, Err(JobError::TooMany { active: 2, max: 2 }));
    assert_eq!(view(&jobs, "t1", "a3").await, None, "nothing stored");
    let raw = rusqlite::Connection::open(jobs_path(&dir)).expect("raw");
    let chunks: i64 =
        raw.query_row("SELECT COUNT(*) FROM export_chunks WHERE job_id = 'a3'", [], |row| row.get(0)).expect("count");
    assert_eq!(chunks, 0);

    // Another owner, no owner, another tenant: each counted on its own.
    jobs.create(&job("t1", "b1", Some("bob"), &["Patient"], 4), 2).await.expect("bob");
    jobs.create(&job("t1", "n1", None, &["Patient"], 5), 2).await.expect("anonymous");
    jobs.create(&job("t1", "n2", None, &["Patient"], 6), 2).await.expect("anonymous again");
    let n3 = jobs.create(&job("t1", "n3", None, &["Patient"], 7), 2).await;
    assert_eq!(n3, Err(JobError::TooMany { active: 2, max: 2 }));
    jobs.create(&job("t2", "a1", Some("alice"), &["Patient"], 8), 2).await.expect("alice elsewhere");

    // Only active jobs count: once one of alice's fails, she may start another.
    jobs.fail(&tenant("t1"), &job_id("a1"), "boom", t(9)).await.expect("fail");
    jobs.create(&job("t1", "a3", Some("alice"), &["Patient"], 10), 2).await.expect("room again");
    assert_eq!(view(&jobs, "t1", "a3").await.expect("stored").chunks.len(), 1);
    let zero = jobs.create(&job("t1", "c1", Some("carol"), &["Patient"], 11), 0).await;
    assert_eq!(zero, Err(JobError::TooMany { active: 0, max: 0 }));
}

#[tokio::test]
async fn leases_go_oldest_job_first_and_are_exclusive() {
    let dir = TempDir::new().expect("temp dir");
    let jobs = open_jobs(&dir);
    // Created out of order and not in id order ("z" is the oldest); "b" and "c" at the same
    // instant (the id breaks the tie); "f" failed.
    jobs.create(&job("t1", "c", None, &["Patient"], 2), 10).await.expect("c");
    jobs.create(&job("t1", "z", None, &["Patient"], 0), 10).await.expect("z");
    jobs.create(&job("t2", "late", None, &["Patient"], 3), 10).await.expect("late");
    jobs.create(&job("t1", "f", None, &["Patient"], 0), 10).await.expect("f");
    jobs.fail(&tenant("t1"), &job_id("f"), "gave up", t(1)).await.expect("fail");
    jobs.create(&job("t1", "b", None, &["Patient", "Observation", "Encounter"], 2), 10).await.expect("b");
    jobs.create(&job("t1", "a", None, &["Patient"], 1), 10).await.expect("a");

    let order = [("z", 0), ("a", 0), ("b", 0), ("b", 1), ("b", 2), ("c", 0), ("late", 0)];
    for (n, (id, index)) in order.iter().enumerate() {
        let leased = lease(&jobs, &format!("w{n}"), 10, 20).await;
        assert_eq!(which(&leased), Some(((*id).to_owned(), *index)), "lease {n}");
        let leased = leased.expect("leased");
        let stored = view(&jobs, leased.job.tenant.as_str(), id).await.expect("job");
        assert_eq!(leased.job, stored.job, "the lease carries the full job");
        assert_eq!(stored.chunks[*index as usize].index, *index);
        assert_eq!(leased.until, t(20));
    }
    assert_eq!(which(&lease(&jobs, "w9", 10, 20).await), None, "everything is leased");
    assert_eq!(which(&lease(&jobs, "w9", 20, 30).await), None, "a lease ending now is still held");
    // Once the leases have ended, the oldest chunk goes first again.
    assert_eq!(which(&lease(&jobs, "w9", 21, 30).await), Some(("z".to_owned(), 0)));
}

#[tokio::test]
async fn an_expired_lease_passes_to_another_worker() {
    let dir = TempDir::new().expect("temp dir");
    let jobs = open_jobs(&dir);
    jobs.create(&job("t1", "j", None, &["Patient"], 1), 10).await.expect("create");
    let first = lease(&jobs, "w1", 5, 10).await.expect("leased");
    assert!(jobs.renew(&first, "w1", t(15)).await.expect("renew"), "the holder renews");
    assert!(!jobs.renew(&first, "w2", t(15)).await.expect("renew"), "not the holder");
    assert_eq!(which(&lease(&jobs, "w2", 14, 20).await), None, "renewed until t(15)");

    let second = lease(&jobs, "w2", 16, 30).await.expect("the expired lease is taken over");
    assert_eq!((second.job.id.as_str(), second.index), ("j", 0));
    assert!(!jobs.renew(&first, "w1", t(40)).await.expect("renew"), "w1 lost it");
    assert!(!jobs.complete(&first, "w1", &[output("Patient", 1)], t(17)).await.expect("complete"));
    let chunk = &view(&jobs, "t1", "j").await.expect("job").chunks[0];
    assert!(!chunk.done && chunk.outputs.is_empty(), "w1's completion changed nothing");
    assert_eq!(which(&lease(&jobs, "w3", 25, 40).await), None, "w1's failed renewal did not extend w2's lease");

    assert!(jobs.renew(&second, "w2", t(50)).await.expect("renew"));
    assert_eq!(which(&lease(&jobs, "w3", 40, 60).await), None, "w2 renewed until t(50)");
    assert!(jobs.complete(&second, "w2", &[output("Patient", 1)], t(45)).await.expect("complete"));
}

#[tokio::test]
async fn completing_the_last_chunk_completes_the_job() {
    let dir = TempDir::new().expect("temp dir");
    let jobs = open_jobs(&dir);
    jobs.create(&job("t1", "j", Some("alice"), &["Patient", "Observation"], 1), 10).await.expect("create");
    let patients = lease(&jobs, "w1", 2, 100).await.expect("chunk 0");
    let observations = lease(&jobs, "w2", 2, 100).await.expect("chunk 1");
    assert_eq!((patients.index, observations.index), (0, 1));

    let obs_outputs = vec![output("Observation", 1), output("Observation", 2)];
    assert!(jobs.complete(&observations, "w2", &obs_outputs, t(10)).await.expect("complete"));
    let partial = view(&jobs, "t1", "j").await.expect("job");
    assert_eq!((partial.job.status, partial.job.finished_at), (JobStatus::Active, None));
    assert_eq!(
        partial.chunks.iter().map(|c| (c.done, c.outputs.clone())).collect::<Vec<_>>(),
        [(false, vec![]), (true, obs_outputs.clone())]
    );
    assert!(!jobs.complete(&observations, "w2", &[], t(11)).await.expect("again"), "already done");
    assert!(!jobs.renew(&observations, "w2", t(200)).await.expect("renew"), "done chunks are not held");

    assert!(jobs.complete(&patients, "w1", &[output("Patient", 1)], t(20)).await.expect("complete"));
    let done = view(&jobs, "t1", "j").await.expect("job");
    assert_eq!(
        (done.job.status, done.job.finished_at, done.job.error.clone()),
        (JobStatus::Completed, Some(t(20)), None)
    );
    assert_eq!(done.chunks[0].outputs, [output("Patient", 1)]);
    assert_eq!(done.chunks[1].outputs, obs_outputs, "earlier outputs unchanged");
    assert!(done.chunks.iter().all(|c| c.done));
    assert_eq!(which(&lease(&jobs, "w3", 500, 600).await), None, "nothing left to do");
    // A completed job no longer counts against its owner.
    jobs.create(&job("t1", "k", Some("alice"), &["Patient"], 30), 1).await.expect("room");
}

#[tokio::test]
async fn failing_a_job_stops_its_chunks() {
    let dir = TempDir::new().expect("temp dir");
    let jobs = open_jobs(&dir);
    jobs.create(&job("t1", "j", None, &["Patient", "Observation"], 1), 10).await.expect("create");
    let held = lease(&jobs, "w1", 2, 100).await.expect("leased");
    jobs.fail(&tenant("t1"), &job_id("j"), "blob store is down", t(7)).await.expect("fail");
    let failed = view(&jobs, "t1", "j").await.expect("job");
    assert_eq!(
        (failed.job.status, failed.job.error.as_deref(), failed.job.finished_at),
        (JobStatus::Failed, Some("blob store is down"), Some(t(7)))
    );
    assert_eq!(which(&lease(&jobs, "w2", 3, 100).await), None, "the other chunk of a failed job is not leased");
    assert!(!jobs.renew(&held, "w1", t(200)).await.expect("renew"));
    assert!(!jobs.complete(&held, "w1", &[output("Patient", 1)], t(8)).await.expect("complete"));
    assert!(view(&jobs, "t1", "j").await.expect("job").chunks.iter().all(|c| !c.done));

    // Failing again, or failing a completed job, changes nothing; failing a missing job is no error.
    jobs.fail(&tenant("t1"), &job_id("j"), "other", t(9)).await.expect("fail again");
    let still = view(&jobs, "t1", "j").await.expect("job").job;
    assert_eq!((still.error.as_deref(), still.finished_at), (Some("blob store is down"), Some(t(7))));
    jobs.create(&job("t1", "k", None, &["Patient"], 1), 10).await.expect("create");
    let chunk = lease(&jobs, "w1", 2, 100).await.expect("leased");
    assert!(jobs.complete(&chunk, "w1", &[], t(3)).await.expect("complete"));
    jobs.fail(&tenant("t1"), &job_id("k"), "late", t(4)).await.expect("fail");
    assert_eq!(view(&jobs, "t1", "k").await.expect("job").job.status, JobStatus::Completed);
    jobs.fail(&tenant("t1"), &job_id("missing"), "x", t(4)).await.expect("no such job");
}

#[tokio::test]
async fn deleting_a_job_removes_it_and_its_chunks() {
    let dir = TempDir::new().expect("temp dir");
    let jobs = open_jobs(&dir);
    jobs.create(&job("t1", "j", None, &["Patient", "Observation"], 1), 10).await.expect("create");
    jobs.create(&job("t2", "j", None, &["Patient"], 1), 10).await.expect("same id, other tenant");
    let held = lease(&jobs, "w1", 2, 100).await.expect("leased");
    assert_eq!(held.job.tenant, tenant("t1"), "t1/j and t2/j tie on created_at and id; tenant breaks it");

    assert!(jobs.delete(&tenant("t1"), &job_id("j")).await.expect("delete"));
    assert_eq!(view(&jobs, "t1", "j").await, None);
    assert!(!jobs.delete(&tenant("t1"), &job_id("j")).await.expect("delete again"));
    assert!(!jobs.renew(&held, "w1", t(200)).await.expect("renew"));
    assert!(!jobs.complete(&held, "w1", &[], t(3)).await.expect("complete"));
    // t1's other chunk is gone; t2's job is untouched and leased next.
    assert_eq!(which(&lease(&jobs, "w2", 3, 100).await), Some(("j".to_owned(), 0)));
    assert_eq!(which(&lease(&jobs, "w3", 3, 100).await), None);
    assert!(view(&jobs, "t2", "j").await.is_some());
    let raw = rusqlite::Connection::open(jobs_path(&dir)).expect("raw");
    let chunks: i64 =
        raw.query_row("SELECT COUNT(*) FROM export_chunks WHERE tenant = 't1'", [], |row| row.get(0)).expect("count");
    assert_eq!(chunks, 0);
}

#[tokio::test]
async fn finished_before_lists_finished_jobs_oldest_first() {
    let dir = TempDir::new().expect("temp dir");
    let jobs = open_jobs(&dir);
    for (tenant_name, id) in [("t1", "done-late"), ("t2", "failed"), ("t1", "done-early"), ("t1", "running")] {
        jobs.create(&job(tenant_name, id, None, &["Patient"], 1), 10).await.expect("create");
    }
    let complete = |id: &'static str, at: i64| {
        let jobs = jobs.clone();
        async move {
            let chunk = lease(&jobs, "w", 1, 1000).await.expect("leased");
            assert_eq!(chunk.job.id.as_str(), id);
            assert!(jobs.complete(&chunk, "w", &[], t(at)).await.expect("complete"));
        }
    };
    complete("done-early", 10).await;
    complete("done-late", 30).await;
    jobs.fail(&tenant("t2"), &job_id("failed"), "boom", t(20)).await.expect("fail");

    let finished = |before: i64, limit: usize| jobs.finished_before(t(before), limit);
    let names = |list: Vec<(TenantId, JobId)>| -> Vec<(String, String)> {
        list.into_iter().map(|(tenant, id)| (tenant.to_string(), id.to_string())).collect()
    };
    let all = names(finished(1000, 10).await.expect("list"));
    assert_eq!(
        all,
        [("t1".into(), "done-early".into()), ("t2".into(), "failed".into()), ("t1".into(), "done-late".into())]
    );
    assert_eq!(names(finished(30, 10).await.expect("list")), all[..2], "strictly before");
    assert_eq!(names(finished(1000, 1).await.expect("list")), all[..1]);
    assert_eq!(finished(10, 10).await, Ok(vec![]));
    assert_eq!(finished(1000, 0).await, Ok(vec![]));
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

#[tokio::test]
async fn a_released_chunk_comes_back_at_its_retry_time_with_its_reason_and_count() {
    let dir = TempDir::new().expect("temp dir");
    let jobs = open_jobs(&dir);
    jobs.create(&job("t1", "j", None, &["Patient"], 1), 10).await.expect("create");
    let first = lease(&jobs, "w1", 5, 100).await.expect("leased");
    assert_eq!((first.attempt, first.last_error.as_deref()), (1, None));
    assert!(!jobs.release(&first, "w2", "not mine", t(20)).await.expect("release"), "only the holder releases");
    assert!(jobs.release(&first, "w1", "blob store unavailable", t(20)).await.expect("release"));
    assert_eq!(which(&lease(&jobs, "w2", 19, 200).await), None, "not before its retry time");
    let second = lease(&jobs, "w2", 21, 200).await.expect("leased again after the retry time");
    assert_eq!((second.attempt, second.last_error.as_deref()), (2, Some("blob store unavailable")));
    assert!(jobs.complete(&second, "w2", &[output("Patient", 1)], t(30)).await.expect("complete"));
}
