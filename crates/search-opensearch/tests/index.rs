//! The OpenSearch index's write side against a real OpenSearch (the single node
//! `tools/testinfra/with-infra.sh` starts). Each test has its own index prefix.

use fhirmesh_core::model::TenantId;
use fhirmesh_core::ports::IndexUpdate;
use fhirmesh_fhir::search::{IndexEntry, IndexValue};
use fhirmesh_fhir::{LogicalId, ResourceType};
use fhirmesh_search_opensearch::{OpenSearchConfig, OpenSearchIndex};
use time::OffsetDateTime;

async fn index() -> OpenSearchIndex {
    let config =
        OpenSearchConfig { url: fhirmesh_testinfra::opensearch_url(), prefix: fhirmesh_testinfra::unique_name("t") };
    OpenSearchIndex::connect(config).await.expect("connect")
}

fn tenant() -> TenantId {
    TenantId::parse("t1").expect("tenant")
}

fn patient(id: &str, version: u64, sequence: u64, family: Option<&str>) -> IndexUpdate {
    IndexUpdate {
        tenant: tenant(),
        resource_type: ResourceType::parse("Patient").expect("type"),
        id: LogicalId::parse(id).expect("id"),
        version_id: version,
        sequence,
        last_updated: OffsetDateTime::from_unix_timestamp(1_700_000_000 + sequence as i64).expect("time"),
        entries: family.map(|family| {
            vec![IndexEntry {
                param: "family".into(),
                value: IndexValue::String { normalized: family.to_lowercase(), exact: family.into() },
            }]
        }),
    }
}

async fn stored(index: &OpenSearchIndex, id: &str) -> Option<(u64, serde_json::Value)> {
    let resource_type = ResourceType::parse("Patient").expect("type");
    index.document(&tenant(), resource_type, &LogicalId::parse(id).expect("id")).await.expect("read")
}

#[tokio::test]
async fn newer_versions_win_whatever_the_order_and_deletes_are_tombstones() {
    let index = index().await;
    assert_eq!(index.watermark().await, Ok(0));
    index.apply(vec![patient("a", 1, 1, Some("Ng")), patient("b", 1, 2, Some("Lee"))]).await.expect("apply");
    assert_eq!(index.watermark().await, Ok(2));

    // Version 3 arrives before version 2 (reordered), and version 2 twice (redelivered).
    index.apply(vec![patient("a", 3, 4, Some("Third"))]).await.expect("apply v3");
    index.apply(vec![patient("a", 2, 3, Some("Second")), patient("a", 2, 3, Some("Second"))]).await.expect("stale");
    let (version, document) = stored(&index, "a").await.expect("a is indexed");
    assert_eq!(version, 3);
    assert_eq!(document["s"][0]["e"], "Third", "{document}");
    // The watermark never moves back, even when a batch's highest sequence is lower.
    assert_eq!(index.watermark().await, Ok(4));

    // A delete keeps the version: an older live version cannot resurrect the resource.
    index.apply(vec![patient("b", 2, 5, None)]).await.expect("delete");
    index.apply(vec![patient("b", 1, 2, Some("Lee"))]).await.expect("stale live version");
    let (version, document) = stored(&index, "b").await.expect("tombstone");
    assert_eq!(version, 2);
    assert_eq!(document["deleted"], true);
    assert!(document.get("s").is_none(), "{document}");
    assert_eq!(index.watermark().await, Ok(5));
    assert_eq!(stored(&index, "never").await, None);
}

#[tokio::test]
async fn clear_empties_the_index_and_any_version_can_be_written_again() {
    let index = index().await;
    index.apply(vec![patient("a", 5, 9, Some("Five"))]).await.expect("apply");
    index.clear().await.expect("clear");
    assert_eq!(index.watermark().await, Ok(0));
    assert_eq!(stored(&index, "a").await, None);
    // A reindex from scratch writes version 1 again: no tombstone of the old index refuses it.
    index.apply(vec![patient("a", 1, 1, Some("One"))]).await.expect("reindex");
    let (version, document) = stored(&index, "a").await.expect("reindexed");
    assert_eq!((version, document["s"][0]["e"].as_str()), (1, Some("One")));
    assert_eq!(index.watermark().await, Ok(1));
}

#[tokio::test]
async fn every_kind_of_value_is_accepted_by_the_mapping() {
    let index = index().await;
    let t = OffsetDateTime::from_unix_timestamp(1_600_000_000).expect("time");
    let entries = vec![
        IndexEntry {
            param: "name".into(),
            value: IndexValue::String { normalized: "ann".into(), exact: "Ann".into() },
        },
        IndexEntry {
            param: "identifier".into(),
            value: IndexValue::Token { system: Some("urn:s".into()), code: Some("1".into()), text: Some("MRN".into()) },
        },
        IndexEntry {
            param: "general-practitioner".into(),
            value: IndexValue::Reference {
                target_type: ResourceType::parse("Practitioner"),
                id: Some("p1".into()),
                url: "Practitioner/p1".into(),
                version: None,
                identifier: Some((Some("urn:npi".into()), "9".into())),
            },
        },
        IndexEntry {
            param: "birthdate".into(),
            value: IndexValue::Date {
                start: fhirmesh_fhir::search::values::DATE_MIN,
                end: fhirmesh_fhir::search::values::DATE_MAX,
            },
        },
        IndexEntry { param: "n".into(), value: IndexValue::Number { value: 1.5, low: f64::MIN, high: f64::MAX } },
        IndexEntry {
            param: "q".into(),
            value: IndexValue::Quantity {
                value: 5.0,
                low: 4.95,
                high: 5.05,
                system: Some("http://unitsofmeasure.org".into()),
                code: Some("mg".into()),
                unit: Some("mg".into()),
                canonical: Some((0.005, "g".into())),
            },
        },
        IndexEntry { param: "url".into(), value: IndexValue::Uri("http://example.org/x".into()) },
        IndexEntry {
            param: "combo".into(),
            value: IndexValue::Composite(vec![
                IndexValue::Token { system: None, code: Some("c".into()), text: None },
                IndexValue::Date { start: t, end: t },
            ]),
        },
    ];
    let update = IndexUpdate { entries: Some(entries), ..patient("all", 1, 1, None) };
    index.apply(vec![update]).await.expect("every kind indexes (strict mapping)");
    let (_, document) = stored(&index, "all").await.expect("indexed");
    for kind in ["s", "t", "r", "d", "n", "q", "u", "k"] {
        assert!(document.get(kind).is_some(), "{kind} missing: {document}");
    }
}

#[tokio::test]
async fn an_unreachable_opensearch_is_unavailable() {
    let config = OpenSearchConfig { url: "http://127.0.0.1:9".into(), prefix: "x".into() };
    let failed = OpenSearchIndex::connect_now(config.clone()).await.err().expect("no server");
    assert!(matches!(failed, fhirmesh_core::ports::IndexError::Unavailable(_)), "{failed:?}");
    // A server may start before OpenSearch: it connects, and every call says unavailable.
    let index = OpenSearchIndex::connect(config).await.expect("connects lazily");
    assert!(matches!(index.watermark().await, Err(fhirmesh_core::ports::IndexError::Unavailable(_))));
    let query =
        fhirmesh_fhir::search::SearchQuery::new(vec![ResourceType::parse("Patient").expect("type")], vec![], 10);
    let searched = index.search_at(&tenant(), &query, None, OffsetDateTime::now_utc()).await;
    assert!(matches!(searched, Err(fhirmesh_core::ports::IndexError::Unavailable(_))), "{searched:?}");
    let applied = index.apply(vec![patient("a", 1, 1, Some("Ng"))]).await;
    assert!(matches!(applied, Err(fhirmesh_core::ports::IndexError::Unavailable(_))), "{applied:?}");
}

/// The shared search property test (`fhirmesh_core::search_oracle`) on OpenSearch: every answer,
/// its order, paging both ways and totals equal the reference evaluator's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_agrees_with_the_reference_evaluator() {
    use fhirmesh_core::search_oracle::{Scale, agrees_with_the_reference_evaluator};
    use futures::FutureExt;

    let index = std::sync::Arc::new(index().await);
    let searcher = index.clone();
    let search = move |tenant, query, cursor: Option<String>, now| {
        let index = searcher.clone();
        async move { index.search_at(&tenant, &query, cursor.as_deref(), now).await }.boxed()
    };
    let scale = Scale { cases: 30, docs: 50, queries_per_corpus: 20 };
    agrees_with_the_reference_evaluator(index.as_ref(), &search, scale).await;
}

/// A change log in memory: the rebuild tests' source of truth.
#[derive(Default)]
struct MemoryLog {
    records: std::sync::Mutex<Vec<fhirmesh_core::ports::ChangeRecord>>,
}

impl MemoryLog {
    /// Appends a create of Patient `id`; returns its sequence.
    fn create(&self, id: &str) -> u64 {
        let mut records = self.records.lock().expect("log");
        let sequence = records.len() as u64 + 1;
        let body = serde_json::json!({"resourceType": "Patient", "id": id, "name": [{"family": "Generation"}]});
        records.push(fhirmesh_core::ports::ChangeRecord {
            tenant: tenant(),
            version: fhirmesh_core::model::ResourceVersion {
                resource_type: ResourceType::parse("Patient").expect("type"),
                id: LogicalId::parse(id).expect("id"),
                version_id: 1,
                last_updated: OffsetDateTime::from_unix_timestamp(1_700_000_000 + sequence as i64).expect("time"),
                operation: fhirmesh_core::model::Operation::Create,
                body: Some(serde_json::to_vec(&body).expect("json").into()),
                sequence,
            },
            commit_end: sequence,
            traceparent: None,
        });
        sequence
    }
}

#[async_trait::async_trait]
impl fhirmesh_core::ports::ChangeLog for MemoryLog {
    async fn changes_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<fhirmesh_core::ports::ChangeRecord>, fhirmesh_core::ports::StoreError> {
        let records = self.records.lock().expect("log");
        Ok(records.iter().filter(|r| r.version.sequence > after).take(limit).cloned().collect())
    }
    async fn latest_sequence(&self) -> Result<u64, fhirmesh_core::ports::StoreError> {
        Ok(self.records.lock().expect("log").len() as u64)
    }
    async fn checkpoint(&self, _consumer: &str) -> Result<u64, fhirmesh_core::ports::StoreError> {
        Ok(0)
    }
    async fn save_checkpoint(&self, _consumer: &str, _sequence: u64) -> Result<(), fhirmesh_core::ports::StoreError> {
        Ok(())
    }
    async fn wait_for_changes(&self) {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Every Patient, with an exact total and the watermark of the answer.
async fn all_patients(index: &OpenSearchIndex) -> (u64, u64) {
    let query = fhirmesh_core::search_oracle::query(&["Patient"], vec![]);
    let page = fhirmesh_core::ports::SearchIndex::search(index, &tenant(), &query, None).await.expect("search");
    (page.total.expect("an accurate total"), page.watermark)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_switches_generation_while_searches_and_writes_go_on() {
    use fhirmesh_core::indexer::{Indexer, IndexerConfig, RebuildEvent, RebuildOptions, rebuild};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let index = index().await;
    let log = Arc::new(MemoryLog::default());
    for n in 0..300 {
        log.create(&format!("before-{n}"));
    }
    let live = Arc::new(Indexer::new(Arc::new(index.clone()), log.clone(), IndexerConfig::default()));
    assert_eq!(live.catch_up().await, Ok(300));
    assert_eq!(index.served_generation().await, Ok(1));
    assert_eq!(all_patients(&index).await, (300, 300));

    let done = Arc::new(AtomicBool::new(false));
    // The server meanwhile: new patients, each indexed by the live indexer at once.
    let writer = tokio::spawn({
        let (log, live, done) = (log.clone(), live.clone(), done.clone());
        async move {
            let mut n = 0;
            while !done.load(Ordering::Acquire) && n < 400 {
                log.create(&format!("during-{n}"));
                live.catch_up().await.expect("live indexing");
                n += 1;
            }
        }
    });
    // Searches meanwhile: never fewer results than their watermark promises (each sequence is one
    // new patient), whatever generation answers.
    let searcher = tokio::spawn({
        let (index, done) = (index.clone(), done.clone());
        async move {
            let mut searches = 0;
            while !done.load(Ordering::Acquire) {
                let (total, watermark) = all_patients(&index).await;
                assert!(total >= watermark, "a search saw {total} patients at watermark {watermark}");
                assert!(watermark >= 300, "the watermark went back to {watermark}");
                searches += 1;
            }
            searches
        }
    });

    let mut events = Vec::new();
    let options = RebuildOptions { batch_size: 64, retire_after: std::time::Duration::from_millis(300) };
    let reached =
        rebuild(Arc::new(index.clone()), log.clone(), options, |event| events.push(event)).await.expect("rebuild");
    done.store(true, Ordering::Release);
    writer.await.expect("writer");
    let searches = searcher.await.expect("searcher");
    assert!(searches > 0);

    assert!(reached >= 300);
    assert!(events.contains(&RebuildEvent::Promoted { generation: 2 }), "{events:?}");
    assert_eq!(index.served_generation().await, Ok(2));
    assert_eq!(index.stored_generations().await, Ok(vec![2]), "the old generation is dropped");
    // Every write, before and during the rebuild, is in the new generation.
    let latest = log.records.lock().expect("log").len() as u64;
    live.catch_up().await.expect("live indexing");
    assert_eq!(all_patients(&index).await, (latest, latest));
    // And later writes go there too.
    log.create("after");
    live.catch_up().await.expect("live indexing");
    assert_eq!(all_patients(&index).await, (latest + 1, latest + 1));
}

#[tokio::test]
async fn a_new_rebuild_abandons_an_unfinished_one() {
    let index = index().await;
    index.apply(vec![patient("a", 1, 1, Some("Ng"))]).await.expect("apply");
    let generations = fhirmesh_core::ports::SearchIndex::generations(&index).expect("generations");
    let first = generations.begin().await.expect("begin");
    first.building.apply(vec![patient("a", 1, 1, Some("Ng"))]).await.expect("apply to the first rebuild");
    assert_eq!(index.stored_generations().await, Ok(vec![1, first.generation]));

    let second = generations.begin().await.expect("begin again");
    assert_eq!(second.generation, first.generation + 1);
    assert_eq!(index.stored_generations().await, Ok(vec![1]), "the abandoned generation is dropped");
    let refused = generations.promote(first.generation).await.expect_err("the first rebuild cannot finish");
    assert!(refused.to_string().contains("no longer being built"), "{refused}");
    assert_eq!(index.served_generation().await, Ok(1));
    // Live writes go to both the served generation and the second rebuild's.
    index.apply(vec![patient("b", 1, 2, Some("Lee"))]).await.expect("apply");
    assert_eq!(second.building.watermark().await, Ok(0), "a rebuild's watermark is its own");
    assert_eq!(index.watermark().await, Ok(2));
    assert_eq!(index.stored_generations().await, Ok(vec![1, second.generation]));
}

/// The interleaving CI once hit: a resource created after the rebuild filled the new generation,
/// and before the live indexer got to it, reaches the served generation through the rebuild's
/// catch-up. Promoted, the new generation must hold it too, or its watermark over-promises.
#[tokio::test]
async fn the_catch_up_before_a_promote_reaches_the_new_generation_too() {
    use fhirmesh_core::indexer::{Indexer, IndexerConfig};
    use std::sync::Arc;

    let index = index().await;
    let log = Arc::new(MemoryLog::default());
    log.create("first");
    let live = Indexer::new(Arc::new(index.clone()), log.clone(), IndexerConfig::default());
    assert_eq!(live.catch_up().await, Ok(1));

    let generations = fhirmesh_core::ports::SearchIndex::generations(&index).expect("generations");
    let new = generations.begin().await.expect("begin");
    let filled = Indexer::new(new.building, log.clone(), IndexerConfig::default()).catch_up().await;
    assert_eq!(filled, Ok(1));
    log.create("late"); // the live indexer has not seen it yet
    let caught_up = Indexer::new(new.live, log.clone(), IndexerConfig::default()).catch_up().await;
    assert_eq!(caught_up, Ok(2));
    generations.promote(new.generation).await.expect("promote");

    assert_eq!(index.served_generation().await, Ok(new.generation));
    assert_eq!(all_patients(&index).await, (2, 2), "the promoted generation holds what its watermark says");
}
