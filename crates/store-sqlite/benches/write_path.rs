//! Micro-benchmarks of the SQLite write path: the store's group commit of single creates, and the
//! search index's `apply` of a batch of extracted updates, plus two searches on a populated index.
//!
//! Every database lives in a fresh directory under Cargo's `CARGO_TARGET_TMPDIR` (the target
//! directory's disk, like a real data directory), removed when the benchmark ends. Opening stores,
//! building bodies and extracting index entries happen outside the measured part.
//!
//! `cargo bench -p fhirmesh-store-sqlite --bench write_path` (add `-- --quick` for a short run).

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use fhirmesh_core::model::{Operation, TenantId};
use fhirmesh_core::ports::{Expected, IndexUpdate, ResourceStore, SearchIndex, VersionWrite};
use fhirmesh_fhir::search::extract::{self, extract};
use fhirmesh_fhir::search::parse::{ParseOptions, parse_search};
use fhirmesh_fhir::search::query::SearchScope;
use fhirmesh_fhir::{LogicalId, ResourceType};
use fhirmesh_store_sqlite::{SqliteConfig, SqliteSearchConfig, SqliteSearchIndex, SqliteStore};
use serde_json::{Value, json};
use tempfile::TempDir;
use time::OffsetDateTime;
use tokio::runtime::Runtime;

/// Index updates per `apply` batch: the indexer's default batch size is 1,024 changes.
const APPLY_BATCH: usize = 1000;
/// Patients in the index the search benchmarks query.
const SEARCH_PATIENTS: usize = 10_000;

fn temp_dir() -> TempDir {
    tempfile::Builder::new()
        .prefix("fhirmesh-write-path-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("a temporary directory under CARGO_TARGET_TMPDIR")
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("a tokio runtime")
}

fn patient_type() -> ResourceType {
    ResourceType::parse("Patient").expect("Patient is a resource type")
}

fn instant() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_764_000_000).expect("a valid timestamp")
}

/// A typical Patient (≈ 600 bytes compact), varied by `n`, stamped with its id and meta.
fn patient(n: usize) -> Value {
    const FAMILIES: [&str; 8] = ["Smith", "Erdman", "Hammes", "Leuschke", "Escalante", "García", "Nguyen", "Müller"];
    const GIVEN: [&str; 6] = ["Jane", "Darrell", "Juliane", "Donnell", "Miguel Ángel", "Anna"];
    json!({
        "resourceType": "Patient",
        "id": format!("p{n}"),
        "meta": {"versionId": "1", "lastUpdated": "2025-11-24T16:00:00Z"},
        "identifier": [
            {"system": "urn:bench", "value": n.to_string()},
            {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]},
             "system": "http://hospital.example.org/mrn", "value": format!("MRN-{n:08}")}
        ],
        "active": true,
        "name": [{"use": "official", "family": format!("{}{}", FAMILIES[n % FAMILIES.len()], n % 1000),
                  "given": [GIVEN[n % GIVEN.len()]], "prefix": ["Mx."]}],
        "telecom": [{"system": "phone", "value": format!("555-{:04}", n % 10_000), "use": "home"}],
        "gender": if n.is_multiple_of(2) { "female" } else { "male" },
        "birthDate": format!("{}-{:02}-{:02}", 1930 + n % 90, 1 + n % 12, 1 + n % 28),
        "address": [{"line": [format!("{} Main Street", n % 500)], "city": "Springfield", "state": "MA",
                     "postalCode": format!("{:05}", n % 100_000), "country": "US"}]
    })
}

// ---------------------------------------------------------------------------------------------
// store: group commit of single creates

/// Distinct ids across every benchmark run in this process.
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

fn create_write(body: &Bytes) -> VersionWrite {
    let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    VersionWrite {
        resource_type: patient_type(),
        id: LogicalId::parse(&format!("c{n}")).expect("a valid id"),
        expected: Expected::Absent,
        version_id: 1,
        last_updated: instant(),
        operation: Operation::Create,
        body: Some(body.clone()),
        traceparent: None,
    }
}

/// One iteration is one single-write create commit; `tasks` tasks commit concurrently, each
/// awaiting its commit before the next, so the writer folds up to `tasks` commits into a group.
fn bench_commit(c: &mut Criterion) {
    let rt = runtime();
    let tenant = TenantId::default_tenant();
    let body = Bytes::from(serde_json::to_vec(&patient(1)).expect("serializes"));
    let mut group = c.benchmark_group("store_commit");
    group.throughput(Throughput::Elements(1));
    group.sample_size(20).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));
    for (mode, durable) in [("durable", true), ("normal", false)] {
        for tasks in [1_usize, 32] {
            let dir = temp_dir();
            let config = SqliteConfig { synchronous_full: durable, ..SqliteConfig::new(dir.path().join("store.db")) };
            let store = SqliteStore::open(config).expect("the store opens");
            let before = store.writer_stats();
            group.bench_function(BenchmarkId::new(mode, format!("tasks_{tasks}")), |b| {
                b.iter_custom(|iters| {
                    // Each task's writes, built before the clock starts.
                    let per_task: Vec<Vec<VersionWrite>> = (0..tasks as u64)
                        .map(|t| {
                            let count = iters / tasks as u64 + u64::from(t < iters % tasks as u64);
                            (0..count).map(|_| create_write(&body)).collect()
                        })
                        .filter(|writes: &Vec<VersionWrite>| !writes.is_empty())
                        .collect();
                    rt.block_on(async {
                        let started = Instant::now();
                        let handles: Vec<_> = per_task
                            .into_iter()
                            .map(|writes| {
                                let (store, tenant) = (store.clone(), tenant.clone());
                                tokio::spawn(async move {
                                    for write in writes {
                                        store.commit(&tenant, vec![write]).await.expect("the commit succeeds");
                                    }
                                })
                            })
                            .collect();
                        for handle in handles {
                            handle.await.expect("the commit task finishes");
                        }
                        started.elapsed()
                    })
                })
            });
            let after = store.writer_stats();
            let (groups, requests) = (after.groups - before.groups, after.requests - before.requests);
            if groups > 0 {
                eprintln!(
                    "store_commit/{mode}/tasks_{tasks}: {requests} commits in {groups} transactions, \
                     average group {:.1}",
                    requests as f64 / groups as f64
                );
            }
            drop(store);
        }
    }
    group.finish();
}

// ---------------------------------------------------------------------------------------------
// search index: apply and search

/// Index updates for `resources` (entries extracted up front), sequences from `first_sequence`.
fn updates(resources: &[Value], first_sequence: u64) -> Vec<IndexUpdate> {
    let tenant = TenantId::default_tenant();
    resources
        .iter()
        .zip(first_sequence..)
        .map(|(resource, sequence)| IndexUpdate {
            tenant: tenant.clone(),
            resource_type: resource["resourceType"].as_str().and_then(ResourceType::parse).expect("a resource type"),
            id: resource["id"].as_str().and_then(|id| LogicalId::parse(id).ok()).expect("a valid id"),
            version_id: 1,
            sequence,
            last_updated: instant(),
            entries: Some(extract(resource)),
        })
        .collect()
}

/// Every entry resource of the largest Synthea fixture bundle (1,434 resources of 20 types).
fn synthea_bundle() -> Vec<Value> {
    let path: PathBuf =
        [env!("CARGO_MANIFEST_DIR"), "../../tests/e2e/data/synthea/13-miguel-angel-escalante.json"].iter().collect();
    let text = std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let bundle: Value = serde_json::from_slice(&text).expect("a Synthea bundle is JSON");
    bundle["entry"].as_array().expect("entries").iter().map(|entry| entry["resource"].clone()).collect()
}

fn open_index(dir: &TempDir) -> SqliteSearchIndex {
    SqliteSearchIndex::open(SqliteSearchConfig::new(dir.path().join("search.db"))).expect("the index opens")
}

/// Applies `count` generated Patients (`p0`, `p1`, ...) in batches of `APPLY_BATCH`.
fn populate(rt: &Runtime, index: &SqliteSearchIndex, count: usize) {
    rt.block_on(async {
        for start in (0..count).step_by(APPLY_BATCH) {
            let patients: Vec<Value> = (start..(start + APPLY_BATCH).min(count)).map(patient).collect();
            index.apply(updates(&patients, start as u64 + 1)).await.expect("the batch applies");
        }
    });
}

/// A closed index of `SEARCH_PATIENTS` Patients, copied for every iteration that starts from it.
fn index_template(rt: &Runtime) -> TempDir {
    let dir = temp_dir();
    let index = open_index(&dir);
    populate(rt, &index, SEARCH_PATIENTS);
    drop(index);
    dir
}

/// A fresh index in its own directory: empty, or a copy of `template`'s files (not measured).
fn fresh_index(template: Option<&TempDir>) -> (TempDir, SqliteSearchIndex) {
    let dir = temp_dir();
    if let Some(template) = template {
        for file in ["search.db", "search.db-wal"] {
            let source = template.path().join(file);
            if source.exists() {
                std::fs::copy(&source, dir.path().join(file)).expect("the template copies");
            }
        }
    }
    let index = open_index(&dir);
    (dir, index)
}

/// One iteration is one `apply` of a whole batch (its own transaction) into a fresh index: empty,
/// or already holding `SEARCH_PATIENTS` Patients (the batch then adds the next 1,000).
fn bench_index_apply(c: &mut Criterion) {
    extract::warm_up();
    let rt = runtime();
    let template = index_template(&rt);
    let (_copy, copied) = fresh_index(Some(&template));
    let watermark = rt.block_on(copied.watermark()).expect("the watermark reads");
    assert_eq!(watermark, SEARCH_PATIENTS as u64, "the template copy holds every Patient");
    let first: Vec<Value> = (0..APPLY_BATCH).map(patient).collect();
    let next: Vec<Value> = (SEARCH_PATIENTS..SEARCH_PATIENTS + APPLY_BATCH).map(patient).collect();
    let batches = [
        ("patients_1000", updates(&first, 1), None),
        ("synthea_bundle", updates(&synthea_bundle(), 1), None),
        ("patients_1000_onto_10000", updates(&next, SEARCH_PATIENTS as u64 + 1), Some(&template)),
    ];
    let mut group = c.benchmark_group("index_apply");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    for (name, batch, template) in &batches {
        let entries: usize = batch.iter().map(|u| u.entries.as_ref().map_or(0, Vec::len)).sum();
        eprintln!("index_apply/{name}: {} resources, {entries} index entries", batch.len());
        group.throughput(Throughput::Elements(batch.len() as u64));
        group.bench_function(*name, |b| {
            b.iter_custom(|iters| {
                let mut measured = Duration::ZERO;
                for _ in 0..iters {
                    let (dir, index) = fresh_index(*template);
                    let batch = batch.clone();
                    measured += rt.block_on(async {
                        let started = Instant::now();
                        index.apply(batch).await.expect("the batch applies");
                        started.elapsed()
                    });
                    drop(index);
                    drop(dir);
                }
                measured
            })
        });
    }
    group.finish();
}

/// First page of a token and a string search over an index of `SEARCH_PATIENTS` Patients.
fn bench_index_search(c: &mut Criterion) {
    extract::warm_up();
    let rt = runtime();
    let dir = temp_dir();
    let index = open_index(&dir);
    populate(&rt, &index, SEARCH_PATIENTS);
    let tenant = TenantId::default_tenant();
    let scope = SearchScope::Type(patient_type());
    let queries = [
        // One hit.
        ("token_identifier", vec![("identifier", "urn:bench|4242")], 1),
        // String search matches by prefix: `Smith40` and `Smith400`–`Smith409`, 30 in all; a page of 20.
        ("string_family", vec![("family", "Smith40")], 20),
        // A broad token search: half the index matches, first page of 20 with an accurate total.
        ("token_gender", vec![("gender", "female")], 20),
    ];
    let mut group = c.benchmark_group("index_search");
    group.sample_size(20).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    for (name, params, expected_hits) in queries {
        let params: Vec<(String, String)> = params.iter().map(|(n, v)| ((*n).to_owned(), (*v).to_owned())).collect();
        let query = parse_search(&scope, &params, &ParseOptions::default()).expect("a valid query");
        let page = rt.block_on(index.search(&tenant, &query, None)).expect("the search runs");
        assert_eq!(page.hits.len(), expected_hits, "{name}: {page:?}");
        group.bench_function(name, |b| {
            b.iter(|| rt.block_on(index.search(&tenant, black_box(&query), None)).expect("the search runs"))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_commit, bench_index_apply, bench_index_search);
criterion_main!(benches);
