//! The export job store ([`DynamoJobStore`]) against a real DynamoDB API (moto in server mode,
//! started by `tools/testinfra/with-infra.sh`). Each test has its own table. The shared job store
//! cases (`fhirmesh_core::export::job_store_suite`), what this store's items show after them, and
//! the bookkeeping and races only this store has.

use std::collections::HashSet;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::AttributeValue;
use fhirmesh_core::export::job_store_suite::{
    self as suite, job, job_id, lease, output, segmented, t, tenant, view, which,
};
use fhirmesh_core::export::{JobError, JobStatus, JobStore, LeasedChunk};
use fhirmesh_store_dynamodb::{DynamoJobStore, provision_jobs};

/// A job store on a fresh table, and a raw client to look at (and corrupt) its items.
struct Fixture {
    jobs: DynamoJobStore,
    client: Client,
    table: String,
}

async fn fixture() -> Fixture {
    let sdk = fhirmesh_testinfra::aws_config().await;
    let client = Client::new(&sdk);
    let table = fhirmesh_testinfra::unique_name("jobs");
    assert!(provision_jobs(&client, &table).await.expect("provision"), "created");
    Fixture { jobs: DynamoJobStore::new(client.clone(), table.clone()), client, table }
}

impl Fixture {
    /// The sort keys of the items of partition `pk` (`prefix`: of those sort keys only).
    async fn keys(&self, pk: &str, prefix: &str) -> Vec<String> {
        let mut keys = Vec::new();
        let mut start = None;
        loop {
            let query = self
                .client
                .query()
                .table_name(&self.table)
                .consistent_read(true)
                .expression_attribute_values(":pk", AttributeValue::S(pk.to_owned()))
                .set_exclusive_start_key(start.take());
            // DynamoDB refuses an empty `begins_with` prefix.
            let query = if prefix.is_empty() {
                query.key_condition_expression("pk = :pk")
            } else {
                query
                    .key_condition_expression("pk = :pk AND begins_with(sk, :prefix)")
                    .expression_attribute_values(":prefix", AttributeValue::S(prefix.to_owned()))
            };
            let out = query.send().await.expect("query");
            for item in out.items() {
                match item.get("sk") {
                    Some(AttributeValue::S(sk)) => keys.push(sk.clone()),
                    other => panic!("sort key {other:?}"),
                }
            }
            match out.last_evaluated_key() {
                Some(last) if !last.is_empty() => start = Some(last.clone()),
                _ => return keys,
            }
        }
    }

    async fn chunk_items(&self, tenant_name: &str, id: &str) -> usize {
        self.keys(&format!("J#{tenant_name}#{id}"), "C#").await.len()
    }

    /// Entries of the active-job queue and of the finished index.
    async fn queued_and_finished(&self) -> (usize, usize) {
        (self.keys("Q", "").await.len(), self.keys("F", "").await.len())
    }

    /// The owner's active-job counter as stored (0 when there is none).
    async fn counter(&self, tenant_name: &str, owner: Option<&str>) -> i64 {
        let pk = match owner {
            None => format!("O#{tenant_name}#N"),
            Some(owner) => format!("O#{tenant_name}#U#{owner}"),
        };
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("pk", AttributeValue::S(pk))
            .key("sk", AttributeValue::S("O".into()))
            .consistent_read(true)
            .send()
            .await
            .expect("get counter");
        match out.item().and_then(|item| item.get("active")) {
            None => 0,
            Some(AttributeValue::N(active)) => active.parse().expect("a number"),
            Some(other) => panic!("active is {other:?}"),
        }
    }

    /// Sets one attribute of an item, as someone editing the table by hand would.
    async fn set(&self, pk: &str, sk: &str, name: &str, value: AttributeValue) {
        self.client
            .update_item()
            .table_name(&self.table)
            .key("pk", AttributeValue::S(pk.to_owned()))
            .key("sk", AttributeValue::S(sk.to_owned()))
            .update_expression("SET #name = :value")
            .condition_expression("attribute_exists(pk)")
            .expression_attribute_names("#name", name)
            .expression_attribute_values(":value", value)
            .send()
            .await
            .expect("update item");
    }
}

// ---------------------------------------------------------------------------------------------
// The shared cases (`fhirmesh_core::export::job_store_suite`), plus what the items show

/// Each shared case on a fresh table.
macro_rules! job_store_cases {
    ($($case:ident),* $(,)?) => {$(
        #[tokio::test]
        async fn $case() {
            suite::$case(&fixture().await.jobs).await;
        }
    )*};
}

job_store_cases!(
    leases_go_oldest_job_first_and_are_exclusive,
    an_expired_lease_passes_to_another_worker,
    finished_before_lists_finished_jobs_oldest_first,
    a_released_chunk_comes_back_at_its_retry_time,
);

#[tokio::test]
async fn jobs_round_trip_and_persist() {
    let fx = fixture().await;
    let expected = suite::jobs_round_trip(&fx.jobs).await;
    assert_eq!(fx.chunk_items("t1", "job-1").await, 2, "the failed creates left no chunk behind");
    assert_eq!(fx.counter("t1", Some("alice")).await, 1);

    // Another store on the same table (another process) sees the same.
    let sdk = fhirmesh_testinfra::aws_config().await;
    let other = DynamoJobStore::new(Client::new(&sdk), fx.table.clone());
    assert_eq!(other.table(), fx.table);
    assert_eq!(view(&other, "t1", "job-1").await, Some(expected));
    assert!(!provision_jobs(&fx.client, &fx.table).await.expect("provision again"), "existed");
}

#[tokio::test]
async fn the_active_job_limit_is_per_owner_and_tenant() {
    let fx = fixture().await;
    suite::the_active_job_limit_is_per_owner_and_tenant(&fx.jobs).await;
    assert_eq!(fx.chunk_items("t1", "c1").await, 0);
    assert_eq!(
        [fx.counter("t1", Some("alice")).await, fx.counter("t1", None).await, fx.counter("t1", Some("carol")).await],
        [2, 2, 0]
    );
    assert_eq!(fx.counter("t1", Some("N")).await, 1, "owner N has a counter of its own");
}

#[tokio::test]
async fn completing_the_last_chunk_completes_the_job() {
    let fx = fixture().await;
    suite::completing_the_last_chunk_completes_the_job(&fx.jobs).await;
    // t1/j finished; t1/k (alice) queued.
    assert_eq!(fx.queued_and_finished().await, (1, 1));
    assert_eq!(fx.counter("t1", Some("alice")).await, 1);
}

#[tokio::test]
async fn failing_a_job_stops_its_chunks() {
    let fx = fixture().await;
    suite::failing_a_job_stops_its_chunks(&fx.jobs).await;
    assert_eq!(fx.counter("t1", None).await, 0, "each job left the count once");
    assert_eq!(fx.queued_and_finished().await, (0, 2));
}

#[tokio::test]
async fn deleting_a_job_removes_it_and_its_chunks() {
    let fx = fixture().await;
    suite::deleting_a_job_removes_it_and_its_chunks(&fx.jobs).await;
    assert_eq!(fx.chunk_items("t1", "j").await, 0);
    assert_eq!(fx.chunk_items("t2", "j").await, 1);
}

#[tokio::test]
async fn corrupt_job_items_are_internal_errors_not_panics() {
    let fx = fixture().await;
    let jobs = &fx.jobs;
    for id in ["request", "status", "outputs", "bad-id"] {
        jobs.create(&job("t1", id, None, &["Patient"], 1), 10).await.expect("create");
    }
    jobs.fail(&tenant("t1"), &job_id("bad-id"), "x", t(2)).await.expect("fail");
    fx.set("J#t1#request", "J", "request", AttributeValue::S("{not json".into())).await;
    fx.set("J#t1#status", "J", "status", AttributeValue::S("bogus".into())).await;
    fx.set("J#t1#outputs", "C#0000000000", "outputs", AttributeValue::S("[{\"name\": 1}]".into())).await;
    fx.set("J#t1#outputs", "C#0000000000", "done", AttributeValue::Bool(true)).await;
    let finished = fx.keys("F", "").await;
    assert_eq!(finished.len(), 1);
    fx.set("F", &finished[0], "id", AttributeValue::S("Bad/Id".into())).await;
    for id in ["request", "status", "outputs"] {
        let got = jobs.get(&tenant("t1"), &job_id(id)).await;
        assert!(matches!(got, Err(JobError::Internal(_))), "{id}: {got:?}");
    }
    let listed = jobs.finished_before(t(100), 10).await;
    assert!(matches!(listed, Err(JobError::Internal(_))), "{listed:?}");
    // The lease reaches the first job's (corrupt) request while building the LeasedChunk.
    let leased = jobs.lease("w", t(1), t(5)).await;
    assert!(matches!(leased, Err(JobError::Internal(_))), "{leased:?}");

    // Other kinds of damage: wrong attribute types, a bad chunk key, a bad timestamp.
    jobs.create(&job("t1", "types", None, &["Patient"], 50), 10).await.expect("create");
    fx.set("J#t1#types", "J", "as_of", AttributeValue::S("42".into())).await;
    let got = jobs.get(&tenant("t1"), &job_id("types")).await;
    assert!(matches!(&got, Err(JobError::Internal(message)) if message.contains("as_of")), "{got:?}");
    fx.set("J#t1#types", "J", "as_of", AttributeValue::N("42".into())).await;
    fx.set("J#t1#types", "J", "created_at", AttributeValue::N("99999999999999999999".into())).await;
    let got = jobs.get(&tenant("t1"), &job_id("types")).await;
    assert!(matches!(got, Err(JobError::Internal(_))), "{got:?}");
    fx.set("J#t1#types", "J", "created_at", AttributeValue::N(i64::MAX.to_string())).await;
    let got = jobs.get(&tenant("t1"), &job_id("types")).await;
    assert!(matches!(got, Err(JobError::Internal(_))), "timestamp out of range: {got:?}");
    // Corrupt or not, a job can be deleted.
    assert!(jobs.delete(&tenant("t1"), &job_id("status")).await.expect("delete"));
    assert!(jobs.delete(&tenant("t1"), &job_id("request")).await.expect("delete"));
    assert_eq!(view(jobs, "t1", "status").await, None);
}

// ---------------------------------------------------------------------------------------------
// Bookkeeping and races of this store

#[tokio::test]
async fn deleting_keeps_the_counter_queue_and_finished_index_right() {
    let fx = fixture().await;
    let jobs = &fx.jobs;
    jobs.create(&job("t1", "active", Some("alice"), &["Patient"], 1), 2).await.expect("create");
    jobs.create(&job("t1", "done", Some("alice"), &["Patient"], 2), 2).await.expect("create");
    jobs.create(&job("t1", "failed", Some("bob"), &["Patient"], 3), 2).await.expect("create");
    let chunk = lease(jobs, "w", 5, 100).await.expect("leased");
    assert_eq!(chunk.job.id.as_str(), "active");
    let chunk = lease(jobs, "w", 5, 100).await.expect("leased");
    assert!(jobs.complete(&chunk, "w", &[output("Patient", 1)], t(6)).await.expect("complete"));
    jobs.fail(&tenant("t1"), &job_id("failed"), "boom", t(7)).await.expect("fail");
    assert_eq!(fx.queued_and_finished().await, (1, 2));
    assert_eq!((fx.counter("t1", Some("alice")).await, fx.counter("t1", Some("bob")).await), (1, 0));

    // An active job: out of the queue and the count.
    assert!(jobs.delete(&tenant("t1"), &job_id("active")).await.expect("delete"));
    assert_eq!(fx.queued_and_finished().await, (0, 2));
    assert_eq!(fx.counter("t1", Some("alice")).await, 0);
    // Finished jobs: out of the finished index; the counts stay.
    assert!(jobs.delete(&tenant("t1"), &job_id("done")).await.expect("delete"));
    assert!(jobs.delete(&tenant("t1"), &job_id("failed")).await.expect("delete"));
    assert_eq!(fx.queued_and_finished().await, (0, 0));
    assert_eq!((fx.counter("t1", Some("alice")).await, fx.counter("t1", Some("bob")).await), (0, 0));
    assert_eq!(jobs.finished_before(t(1000), 10).await, Ok(vec![]));
    for id in ["active", "done", "failed"] {
        assert_eq!(fx.chunk_items("t1", id).await, 0, "{id}");
    }
    // Room for two again.
    jobs.create(&job("t1", "a1", Some("alice"), &["Patient"], 10), 2).await.expect("create");
    jobs.create(&job("t1", "a2", Some("alice"), &["Patient"], 11), 2).await.expect("create");
}

#[tokio::test]
async fn jobs_of_more_chunks_than_one_transaction_holds() {
    let fx = fixture().await;
    let jobs = &fx.jobs;
    let big = segmented("t1", "big", Some("alice"), 250, 1);
    jobs.create(&big, 1).await.expect("create");
    let stored = view(jobs, "t1", "big").await.expect("stored");
    assert_eq!(stored.chunks.len(), 250);
    assert!(stored.chunks.iter().enumerate().all(|(n, c)| c.index as usize == n && !c.done));
    let refused = jobs.create(&segmented("t1", "big2", Some("alice"), 250, 2), 1).await;
    assert_eq!(refused, Err(JobError::TooMany { active: 1, max: 1 }));
    assert_eq!(fx.chunk_items("t1", "big2").await, 0);
    // Chunks of the same id cannot be written over: a second create of it fails untouched.
    let again = jobs.create(&big, 5).await;
    assert!(matches!(again, Err(JobError::Internal(_))), "{again:?}");
    assert_eq!(fx.chunk_items("t1", "big").await, 250);

    for index in 0..3 {
        let chunk = lease(jobs, "w", 5, 100).await.expect("leased");
        assert_eq!(chunk.index, index);
    }
    assert!(jobs.delete(&tenant("t1"), &job_id("big")).await.expect("delete"));
    assert_eq!(fx.chunk_items("t1", "big").await, 0);
    assert_eq!(fx.counter("t1", Some("alice")).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_creates_respect_the_limit() {
    let fx = fixture().await;
    let tasks: Vec<_> = (0..6)
        .map(|n| {
            let jobs = fx.jobs.clone();
            tokio::spawn(async move {
                let job = job("t1", &format!("j{n}"), Some("alice"), &["Patient", "Observation"], n);
                jobs.create(&job, 2).await
            })
        })
        .collect();
    let mut created = Vec::new();
    for (n, task) in tasks.into_iter().enumerate() {
        match task.await.expect("task") {
            Ok(()) => created.push(format!("j{n}")),
            Err(JobError::TooMany { active, max: 2 }) => assert!(active >= 2, "{active}"),
            Err(other) => panic!("j{n}: {other:?}"),
        }
    }
    assert_eq!(created.len(), 2, "{created:?}");
    assert_eq!(fx.counter("t1", Some("alice")).await, 2);
    for n in 0..6 {
        let id = format!("j{n}");
        let expected = if created.contains(&id) { 2 } else { 0 };
        assert_eq!(fx.chunk_items("t1", &id).await, expected, "{id}");
        assert_eq!(view(&fx.jobs, "t1", &id).await.is_some(), expected > 0, "{id}");
    }
    assert_eq!(fx.queued_and_finished().await, (2, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_leases_hand_out_each_chunk_once() {
    let fx = fixture().await;
    fx.jobs.create(&segmented("t1", "a", None, 7, 1), 10).await.expect("create");
    fx.jobs.create(&segmented("t1", "b", None, 5, 2), 10).await.expect("create");
    let workers: Vec<_> = (0..6)
        .map(|n| {
            let jobs = fx.jobs.clone();
            tokio::spawn(async move {
                let worker = format!("w{n}");
                let mut mine = Vec::new();
                while let Some(chunk) = lease(&jobs, &worker, 10, 100).await {
                    assert_eq!(chunk.attempt, 1);
                    mine.push((chunk.job.id.to_string(), chunk.index));
                }
                mine
            })
        })
        .collect();
    let mut all = Vec::new();
    for worker in workers {
        all.extend(worker.await.expect("worker"));
    }
    let distinct: HashSet<_> = all.iter().cloned().collect();
    assert_eq!((all.len(), distinct.len()), (12, 12), "{all:?}");
}

/// Two workers complete a job's last two chunks at once (and a `fail` races with them): the job
/// leaves the queue once, lands in the finished index once and its owner's count drops once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_completions_finish_the_job_exactly_once() {
    let fx = fixture().await;
    let rounds = 4;
    for round in 0..rounds {
        let id = format!("j{round}");
        fx.jobs.create(&job("t1", &id, Some("alice"), &["Patient", "Observation"], round), 10).await.expect("create");
        let first = lease(&fx.jobs, "w1", 1000, 2000).await.expect("chunk 0");
        let second = lease(&fx.jobs, "w2", 1000, 2000).await.expect("chunk 1");
        let complete = |chunk: LeasedChunk, worker: &'static str, at: i64| {
            let jobs = fx.jobs.clone();
            tokio::spawn(async move { jobs.complete(&chunk, worker, &[output("Patient", 1)], t(at)).await })
        };
        let (a, b) = (complete(first, "w1", 50), complete(second, "w2", 60));
        let failing = (round % 2 == 1).then(|| {
            let jobs = fx.jobs.clone();
            let id = job_id(&id);
            tokio::spawn(async move { jobs.fail(&tenant("t1"), &id, "raced", t(70)).await })
        });
        let (a, b) = (a.await.expect("task").expect("complete"), b.await.expect("task").expect("complete"));
        if let Some(failing) = failing {
            failing.await.expect("task").expect("fail");
        }
        let stored = view(&fx.jobs, "t1", &id).await.expect("job").job;
        match stored.status {
            JobStatus::Completed => {
                assert!(a && b, "both chunks completed");
                assert!(matches!(stored.finished_at, Some(at) if at == t(50) || at == t(60)), "{stored:?}");
            }
            JobStatus::Failed => assert_eq!(stored.finished_at, Some(t(70))),
            JobStatus::Active => panic!("round {round}: the job did not finish: {stored:?}"),
        }
    }
    assert_eq!(fx.counter("t1", Some("alice")).await, 0);
    assert_eq!(fx.queued_and_finished().await, (0, rounds as usize));
    assert_eq!(fx.jobs.finished_before(t(1000), 100).await.expect("list").len(), rounds as usize);
}

/// A completion that died after marking the last chunk done but before finishing the job: the
/// next lease that meets the job finishes it, at the instant its last chunk was completed.
#[tokio::test]
async fn a_job_left_active_with_nothing_remaining_is_completed_by_the_next_lease() {
    let fx = fixture().await;
    let jobs = &fx.jobs;
    jobs.create(&job("t1", "j", Some("alice"), &["Patient"], 1), 10).await.expect("create");
    jobs.create(&job("t1", "k", Some("alice"), &["Patient"], 2), 10).await.expect("create");
    // What the chunk transaction of `complete` writes, without what follows it.
    fx.set("J#t1#j", "C#0000000000", "done", AttributeValue::Bool(true)).await;
    fx.set("J#t1#j", "C#0000000000", "outputs", AttributeValue::S("[]".into())).await;
    fx.set("J#t1#j", "J", "remaining", AttributeValue::N("0".into())).await;
    fx.set("J#t1#j", "J", "done_at", AttributeValue::N((t(9).unix_timestamp() * 1_000_000).to_string())).await;
    assert_eq!(view(jobs, "t1", "j").await.expect("job").job.status, JobStatus::Active);

    let next = lease(jobs, "w", 20, 100).await.expect("leased");
    assert_eq!(which(&Some(next)), Some(("k".to_owned(), 0)), "the finished job's turn is skipped");
    let finished = view(jobs, "t1", "j").await.expect("job").job;
    assert_eq!((finished.status, finished.finished_at), (JobStatus::Completed, Some(t(9))));
    assert_eq!(fx.counter("t1", Some("alice")).await, 1, "only k is active");
    assert_eq!(fx.queued_and_finished().await, (1, 1));
    assert_eq!(jobs.finished_before(t(10), 10).await.expect("list"), [(tenant("t1"), job_id("j"))]);
}
