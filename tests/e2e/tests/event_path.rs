//! The change-event path into the search index: redelivered, duplicated and reordered events, and
//! an indexer stopped mid-stream and restarted, all end with the index equal to the store.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fhirmesh_core::indexer::{Indexer, IndexerConfig};
use fhirmesh_core::ports::{ChangeLog, ResourceStore, SearchIndex};
use fhirmesh_core::service::{CreateRequest, DeleteRequest, UpdateRequest};
use fhirmesh_core::{FhirResources, RequestContext, ResourceChanged, ResourceConfig, ResourceService, TenantId};
use fhirmesh_fhir::search::parse::{ParseOptions, parse_search};
use fhirmesh_fhir::search::query::SearchScope;
use fhirmesh_fhir::{LogicalId, ResourceType};
use fhirmesh_store_sqlite::{SqliteSearchIndex, SqliteStore};
use serde_json::json;

fn basic() -> ResourceType {
    ResourceType::parse("Basic").expect("Basic")
}

/// Writes a deterministic mix of creates, updates and deletes; returns the ids.
async fn write_history(service: &FhirResources, resources: usize) -> Vec<LogicalId> {
    let ctx = RequestContext::default();
    let mut ids = Vec::new();
    for n in 0..resources {
        let body = json!({ "resourceType": "Basic", "code": { "text": format!("item {n}") } });
        let created = service
            .create(
                &ctx,
                CreateRequest { resource_type: basic(), body: Bytes::from(body.to_string()), if_none_exist: None },
            )
            .await
            .expect("create");
        ids.push(created.version.id.clone());
    }
    for (n, id) in ids.iter().enumerate() {
        if n % 3 == 0 {
            let body =
                json!({ "resourceType": "Basic", "id": id.as_str(), "code": { "text": format!("updated {n}") } });
            service
                .update(
                    &ctx,
                    UpdateRequest {
                        resource_type: basic(),
                        id: id.clone(),
                        body: Bytes::from(body.to_string()),
                        if_match: None,
                    },
                )
                .await
                .expect("update");
        }
        if n % 4 == 0 {
            service
                .delete(&ctx, DeleteRequest { resource_type: basic(), id: id.clone(), if_match: None })
                .await
                .expect("delete");
        }
    }
    ids
}

/// (id, version) of every Basic the index returns, sorted.
async fn indexed(index: &SqliteSearchIndex) -> Vec<(String, u64)> {
    let query = parse_search(
        &SearchScope::Type(basic()),
        &[("_count".to_owned(), "1000".to_owned())],
        &ParseOptions { strict: true, default_count: 1000, max_count: 1000 },
    )
    .expect("query");
    let page = index.search(&TenantId::default_tenant(), &query, None).await.expect("search");
    assert!(page.next.is_none(), "one page holds everything");
    let mut out: Vec<(String, u64)> = page.hits.into_iter().map(|h| (h.id.as_str().to_owned(), h.version_id)).collect();
    out.sort();
    out
}

/// (id, version) of every live Basic in the store, sorted.
async fn live(store: &SqliteStore, ids: &[LogicalId]) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for id in ids {
        let current = store.read(&TenantId::default_tenant(), basic(), id).await.expect("read").expect("exists");
        if !current.is_deleted() {
            out.push((id.as_str().to_owned(), current.version_id));
        }
    }
    out.sort();
    out
}

struct Fixture {
    _dir: tempfile::TempDir,
    store: Arc<SqliteStore>,
    index: Arc<SqliteSearchIndex>,
    service: FhirResources,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = fhirmesh_resource::open_sqlite_store(dir.path(), false).expect("store");
    let index = fhirmesh_resource::open_sqlite_search_index(dir.path()).expect("index");
    let service = FhirResources::new(store.clone(), ResourceConfig::default());
    Fixture { _dir: dir, store, index, service }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicated_and_reordered_events_converge_to_the_store() {
    let f = fixture();
    let ids = write_history(&f.service, 40).await;
    let events: Vec<ResourceChanged> =
        f.store.changes_after(0, 10_000).await.expect("changes").into_iter().map(ResourceChanged::from).collect();
    assert!(events.len() > 50);

    // Deliver every event twice, in a scrambled order (a fixed permutation), in uneven batches.
    let mut deliveries: Vec<ResourceChanged> = events.iter().chain(events.iter()).cloned().collect();
    let len = deliveries.len();
    for i in 0..len {
        deliveries.swap(i, (i * 7919 + 13) % len);
    }
    let indexer = Indexer::new(f.index.clone(), f.store.clone(), IndexerConfig::default());
    for batch in deliveries.chunks(17) {
        indexer.apply(batch.to_vec()).await.expect("apply");
    }
    assert_eq!(indexed(&f.index).await, live(&f.store, &ids).await);
    assert_eq!(f.index.watermark().await.expect("watermark"), f.store.latest_sequence().await.expect("latest"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_indexer_stopped_mid_stream_resumes_from_its_watermark() {
    let f = fixture();
    let bus = fhirmesh_bus::InProcessBus::new(8);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let first = Indexer::new(f.index.clone(), f.store.clone(), IndexerConfig::default());
    let running = tokio::spawn(first.run(Some(bus.subscription()), async {
        let _ = stopped.await;
    }));
    let relay = fhirmesh_relay::spawn(f.store.clone(), Arc::new(bus.clone()), std::future::pending());
    let mut ids = write_history(&f.service, 30).await;
    let _ = stop.send(());
    running.await.expect("indexer stops");
    // Written while no indexer runs.
    ids.extend(write_history(&f.service, 30).await);
    assert_ne!(indexed(&f.index).await, live(&f.store, &ids).await, "the index is behind while stopped");

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let second = Indexer::new(f.index.clone(), f.store.clone(), IndexerConfig::default());
    let running = tokio::spawn(second.run(Some(bus.subscription()), async {
        let _ = stopped.await;
    }));
    ids.extend(write_history(&f.service, 10).await);
    let latest = f.store.latest_sequence().await.expect("latest");
    tokio::time::timeout(Duration::from_secs(30), async {
        while f.index.watermark().await.expect("watermark") < latest {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the restarted indexer catches up");
    assert_eq!(indexed(&f.index).await, live(&f.store, &ids).await);
    let _ = stop.send(());
    running.await.expect("indexer stops");
    relay.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_search_right_after_a_write_finds_it_every_time() {
    let server = fhirmesh_testkit::TestServer::start().await;
    for n in 0..50 {
        let (status, created) = server
            .create(&json!({ "resourceType": "Patient", "identifier": [{ "system": "urn:ryw", "value": format!("v{n}") }] }))
            .await;
        assert_eq!(status, 201);
        let (status, bundle) = server.get(&format!("Patient?identifier=urn:ryw|v{n}")).await;
        assert_eq!(status, 200);
        assert_eq!(bundle["entry"][0]["resource"]["id"], created["id"], "search {n} missed the write it follows");
    }
    server.stop().await;
}

/// A search index that records the sequences of every batch it is asked to apply.
struct Recording {
    inner: Arc<SqliteSearchIndex>,
    batches: std::sync::Mutex<Vec<Vec<u64>>>,
}

#[async_trait::async_trait]
impl SearchIndex for Recording {
    async fn apply(
        &self,
        updates: Vec<fhirmesh_core::ports::IndexUpdate>,
    ) -> Result<(), fhirmesh_core::ports::IndexError> {
        self.batches.lock().expect("lock").push(updates.iter().map(|u| u.sequence).collect());
        self.inner.apply(updates).await
    }

    async fn search(
        &self,
        tenant: &TenantId,
        query: &fhirmesh_fhir::search::SearchQuery,
        cursor: Option<&str>,
    ) -> Result<fhirmesh_core::ports::IndexPage, fhirmesh_core::ports::IndexError> {
        self.inner.search(tenant, query, cursor).await
    }

    async fn watermark(&self) -> Result<u64, fhirmesh_core::ports::IndexError> {
        self.inner.watermark().await
    }

    async fn clear(&self) -> Result<(), fhirmesh_core::ports::IndexError> {
        self.inner.clear().await
    }
}

/// Writes one single create, a transaction of `size` creates, and another single create; returns
/// the transaction's sequence range.
async fn single_transaction_single(f: &Fixture, size: usize) -> std::ops::RangeInclusive<u64> {
    let ctx = RequestContext::default();
    let create = |n: usize| CreateRequest {
        resource_type: basic(),
        body: Bytes::from(json!({ "resourceType": "Basic", "code": { "text": format!("item {n}") } }).to_string()),
        if_none_exist: None,
    };
    f.service.create(&ctx, create(0)).await.expect("create");
    let entries: Vec<_> = (0..size)
        .map(|n| {
            json!({"fullUrl": format!("urn:uuid:00000000-0000-4000-8000-{n:012}"),
                   "resource": {"resourceType": "Basic", "code": {"text": format!("tx {n}")}},
                   "request": {"method": "POST", "url": "Basic"}})
        })
        .collect();
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": entries});
    let result = f
        .service
        .bundle(&ctx, fhirmesh_core::service::BundleRequest { body: Bytes::from(bundle.to_string()) })
        .await
        .expect("transaction");
    let end = result.last_sequence.expect("wrote");
    f.service.create(&ctx, create(1)).await.expect("create");
    (end + 1 - size as u64)..=end
}

/// No batch holds part of the transaction: it is either wholly inside one batch or not touched.
fn assert_whole(batches: &[Vec<u64>], transaction: &std::ops::RangeInclusive<u64>) {
    let touching: Vec<&Vec<u64>> = batches.iter().filter(|b| b.iter().any(|s| transaction.contains(s))).collect();
    assert!(!touching.is_empty(), "the transaction was indexed: {batches:?}");
    for batch in touching {
        assert!(transaction.clone().all(|s| batch.contains(&s)), "a batch with part of {transaction:?}: {batch:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_is_indexed_whole_from_the_change_log() {
    let f = fixture();
    let transaction = single_transaction_single(&f, 10).await;
    let recording = Arc::new(Recording { inner: f.index.clone(), batches: Default::default() });
    // Batches of 4 changes: the transaction's 10 must still go in together.
    let config = IndexerConfig { batch_size: 4, ..IndexerConfig::default() };
    let indexer = Indexer::new(recording.clone(), f.store.clone(), config);
    let position = indexer.catch_up().await.expect("catch up");
    assert_eq!(position, f.store.latest_sequence().await.expect("latest"));
    assert_whole(&recording.batches.lock().expect("lock"), &transaction);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_is_indexed_whole_from_live_events() {
    let f = fixture();
    let bus = fhirmesh_bus::InProcessBus::new(64);
    let recording = Arc::new(Recording { inner: f.index.clone(), batches: Default::default() });
    let config = IndexerConfig { batch_size: 4, ..IndexerConfig::default() };
    let indexer = Indexer::new(recording.clone(), f.store.clone(), config);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(indexer.run(Some(bus.subscription()), async {
        let _ = stopped.await;
    }));
    // The relay publishes in rounds of 3: the transaction's events arrive in pieces.
    let relay = fhirmesh_core::relay::Relay::new(
        f.store.clone(),
        Arc::new(bus.clone()),
        fhirmesh_core::relay::RelayConfig { batch_size: 3, ..Default::default() },
    );
    let relay = tokio::spawn(relay.run(std::future::pending()));
    let transaction = single_transaction_single(&f, 10).await;
    let latest = f.store.latest_sequence().await.expect("latest");
    tokio::time::timeout(Duration::from_secs(30), async {
        while f.index.watermark().await.expect("watermark") < latest {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("indexed");
    assert_whole(&recording.batches.lock().expect("lock"), &transaction);
    let _ = stop.send(());
    running.await.expect("indexer stops");
    relay.abort();
}
