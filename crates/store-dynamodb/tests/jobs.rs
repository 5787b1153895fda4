//! The export job store ([`DynamoJobStore`]) against a real DynamoDB API (moto in server mode,
//! started by `tools/testinfra/with-infra.sh`). Each test has its own table. The cases of the
//! SQLite job store's tests (`crates/store-sqlite/src/export_tests.rs`), plus the bookkeeping and
//! the races only this store has.

use std::collections::HashSet;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::AttributeValue;
use fhirmesh_core::export::{
    ChunkState, ExportJob, ExportLevel, ExportRequest, JobError, JobId, JobStatus, JobStore, JobView, LeasedChunk,
    OutputFile,
};
use fhirmesh_core::model::TenantId;
use fhirmesh_store_dynamodb::{DynamoJobStore, provision_jobs};
use time::OffsetDateTime;

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

fn tenant(name: &str) -> TenantId {
    TenantId::parse(name).expect("tenant")
}

fn t(seconds: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_700_000_000 + seconds).expect("time")
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

/// A job of `segments` chunks, each covering Patient and Observation.
fn segmented(tenant_name: &str, id: &str, owner: Option<&str>, segments: u32, created: i64) -> ExportJob {
    let mut job = job(tenant_name, id, owner, &["Patient", "Observation"], created);
    job.request.segments = segments;
    job
}

fn output(resource_type: &str, part: u32) -> OutputFile {
    OutputFile {
        resource_type: resource_type.to_owned(),
        name: format!("{resource_type}-{part}.ndjson"),
        count: 10 + u64::from(part),
        bytes: 1000 + u64::from(part),
    }
}

async fn view(jobs: &DynamoJobStore, tenant_name: &str, id: &str) -> Option<JobView> {
    jobs.get(&tenant(tenant_name), &job_id(id)).await.expect("get")
}

async fn lease(jobs: &DynamoJobStore, worker: &str, now: i64, until: i64) -> Option<LeasedChunk> {
    jobs.lease(worker, t(now), t(until)).await.expect("lease")
}

/// (job id, chunk index) of a lease.
fn which(chunk: &Option<LeasedChunk>) -> Option<(String, u32)> {
    chunk.as_ref().map(|chunk| (chunk.job.id.to_string(), chunk.index))
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
// The SQLite store's cases

#[tokio::test]
async fn jobs_round_trip_and_persist() {
    let fx = fixture().await;
    let jobs = &fx.jobs;
    let created = job("t1", "job-1", Some("alice"), &["Patient", "Observation"], 1);
    jobs.create(&created, 5).await.expect("create");
    let expected = JobView {
        job: created.clone(),
        chunks: vec![
            ChunkState { index: 0, done: false, outputs: vec![] },
            ChunkState { index: 1, done: false, outputs: vec![] },
        ],
    };
    assert_eq!(view(jobs, "t1", "job-1").await, Some(expected.clone()));
    assert_eq!(view(jobs, "t1", "job-2").await, None);
    assert_eq!(view(jobs, "t2", "job-1").await, None, "jobs are per tenant");

    // Whatever status the caller set, a new job is active; no owner is stored as none.
    let mut anonymous = job("t1", "job-2", None, &["Patient"], 2);
    anonymous.status = JobStatus::Failed;
    anonymous.error = Some("ignored".into());
    anonymous.finished_at = Some(t(3));
    jobs.create(&anonymous, 5).await.expect("create");
    let stored = view(jobs, "t1", "job-2").await.expect("stored");
    assert_eq!(
        (stored.job.status, stored.job.owner, stored.job.error, stored.job.finished_at),
        (JobStatus::Active, None, None, None)
    );

    // The same id twice is an error, not a second job, and the first is untouched.
    let again = jobs.create(&created, 5).await;
    assert!(matches!(again, Err(JobError::Internal(_))), "{again:?}");
    let mut bigger = created.clone();
    bigger.request.types.push("Encounter".into());
    let again = jobs.create(&bigger, 5).await;
    assert!(matches!(again, Err(JobError::Internal(_))), "{again:?}");
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
    let jobs = &fx.jobs;
    jobs.create(&job("t1", "a1", Some("alice"), &["Patient"], 1), 2).await.expect("first");
    jobs.create(&job("t1", "a2", Some("alice"), &["Patient"], 2), 2).await.expect("second");
    let third = jobs.create(&job("t1", "a3", Some("alice"), &["Patient", "Observation"], 3), 2).await;
    assert_eq!(third, Err(JobError::TooMany { active: 2, max: 2 }));
    assert_eq!(view(jobs, "t1", "a3").await, None, "nothing stored");
    assert_eq!(fx.chunk_items("t1", "a3").await, 0);

    // Another owner, no owner, another tenant: each counted on its own.
    jobs.create(&job("t1", "b1", Some("bob"), &["Patient"], 4), 2).await.expect("bob");
    jobs.create(&job("t1", "n1", None, &["Patient"], 5), 2).await.expect("anonymous");
    jobs.create(&job("t1", "n2", None, &["Patient"], 6), 2).await.expect("anonymous again");
    let n3 = jobs.create(&job("t1", "n3", None, &["Patient"], 7), 2).await;
    assert_eq!(n3, Err(JobError::TooMany { active: 2, max: 2 }));
    jobs.create(&job("t2", "a1", Some("alice"), &["Patient"], 8), 2).await.expect("alice elsewhere");
    // An owner spelled like the no-owner counter is still someone else.
    jobs.create(&job("t1", "x1", Some("N"), &["Patient"], 8), 2).await.expect("owner N");

    // Only active jobs count: once one of alice's fails, she may start another.
    jobs.fail(&tenant("t1"), &job_id("a1"), "boom", t(9)).await.expect("fail");
    jobs.create(&job("t1", "a3", Some("alice"), &["Patient"], 10), 2).await.expect("room again");
    assert_eq!(view(jobs, "t1", "a3").await.expect("stored").chunks.len(), 1);
    let zero = jobs.create(&job("t1", "c1", Some("carol"), &["Patient"], 11), 0).await;
    assert_eq!(zero, Err(JobError::TooMany { active: 0, max: 0 }));
    assert_eq!(fx.chunk_items("t1", "c1").await, 0);
    assert_eq!(
        [fx.counter("t1", Some("alice")).await, fx.counter("t1", None).await, fx.counter("t1", Some("carol")).await],
        [2, 2, 0]
    );
}

#[tokio::test]
async fn leases_go_oldest_job_first_and_are_exclusive() {
    let fx = fixture().await;
    let jobs = &fx.jobs;
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
        let leased = lease(jobs, &format!("w{n}"), 10, 20).await;
        assert_eq!(which(&leased), Some(((*id).to_owned(), *index)), "lease {n}");
        let leased = leased.expect("leased");
        let stored = view(jobs, leased.job.tenant.as_str(), id).await.expect("job");
        assert_eq!(leased.job, stored.job, "the lease carries the full job");
        assert_eq!(stored.chunks[*index as usize].index, *index);
        assert_eq!((leased.until, leased.attempt, leased.last_error), (t(20), 1, None));
    }
    assert_eq!(which(&lease(jobs, "w9", 10, 20).await), None, "everything is leased");
    assert_eq!(which(&lease(jobs, "w9", 20, 30).await), None, "a lease ending now is still held");
    // Once the leases have ended, the oldest chunk goes first again.
    let again = lease(jobs, "w9", 21, 30).await;
    assert_eq!(which(&again), Some(("z".to_owned(), 0)));
    assert_eq!(again.expect("leased").attempt, 2);
}

#[tokio::test]
async fn an_expired_lease_passes_to_another_worker() {
    let fx = fixture().await;
    let jobs = &fx.jobs;
    jobs.create(&job("t1", "j", None, &["Patient"], 1), 10).await.expect("create");
    let first = lease(jobs, "w1", 5, 10).await.expect("leased");
    assert!(jobs.renew(&first, "w1", t(15)).await.expect("renew"), "the holder renews");
    assert!(!jobs.renew(&first, "w2", t(15)).await.expect("renew"), "not the holder");
    assert_eq!(which(&lease(jobs, "w2", 14, 20).await), None, "renewed until t(15)");

    let second = lease(jobs, "w2", 16, 30).await.expect("the expired lease is taken over");
    assert_eq!((second.job.id.as_str(), second.index, second.attempt), ("j", 0, 2));
    assert!(!jobs.renew(&first, "w1", t(40)).await.expect("renew"), "w1 lost it");
    assert!(!jobs.complete(&first, "w1", &[output("Patient", 1)], t(17)).await.expect("complete"));
    let chunk = &view(jobs, "t1", "j").await.expect("job").chunks[0];
    assert!(!chunk.done && chunk.outputs.is_empty(), "w1's completion changed nothing");
    assert_eq!(which(&lease(jobs, "w3", 25, 40).await), None, "w1's failed renewal did not extend w2's lease");

    assert!(jobs.renew(&second, "w2", t(50)).await.expect("renew"));
    assert_eq!(which(&lease(jobs, "w3", 40, 60).await), None, "w2 renewed until t(50)");
    assert!(jobs.complete(&second, "w2", &[output("Patient", 1)], t(45)).await.expect("complete"));
    assert_eq!(view(jobs, "t1", "j").await.expect("job").job.status, JobStatus::Completed);
}

#[tokio::test]
async fn completing_the_last_chunk_completes_the_job() {
    let fx = fixture().await;
    let jobs = &fx.jobs;
    jobs.create(&job("t1", "j", Some("alice"), &["Patient", "Observation"], 1), 10).await.expect("create");
    let patients = lease(jobs, "w1", 2, 100).await.expect("chunk 0");
    let observations = lease(jobs, "w2", 2, 100).await.expect("chunk 1");
    assert_eq!((patients.index, observations.index), (0, 1));

    let obs_outputs = vec![output("Observation", 1), output("Observation", 2)];
    assert!(jobs.complete(&observations, "w2", &obs_outputs, t(10)).await.expect("complete"));
    let partial = view(jobs, "t1", "j").await.expect("job");
    assert_eq!((partial.job.status, partial.job.finished_at), (JobStatus::Active, None));
    assert_eq!(
        partial.chunks.iter().map(|c| (c.done, c.outputs.clone())).collect::<Vec<_>>(),
        [(false, vec![]), (true, obs_outputs.clone())]
    );
    assert!(!jobs.complete(&observations, "w2", &[], t(11)).await.expect("again"), "already done");
    assert!(!jobs.renew(&observations, "w2", t(200)).await.expect("renew"), "done chunks are not held");
    assert!(!jobs.release(&observations, "w2", "x", t(200)).await.expect("release"), "nor released");

    assert!(jobs.complete(&patients, "w1", &[output("Patient", 1)], t(20)).await.expect("complete"));
    let done = view(jobs, "t1", "j").await.expect("job");
    assert_eq!(
        (done.job.status, done.job.finished_at, done.job.error.clone()),
        (JobStatus::Completed, Some(t(20)), None)
    );
    assert_eq!(done.chunks[0].outputs, [output("Patient", 1)]);
    assert_eq!(done.chunks[1].outputs, obs_outputs, "earlier outputs unchanged");
    assert!(done.chunks.iter().all(|c| c.done));
    assert_eq!(which(&lease(jobs, "w3", 500, 600).await), None, "nothing left to do");
    assert_eq!(fx.queued_and_finished().await, (0, 1));
    assert_eq!(fx.counter("t1", Some("alice")).await, 0);
    // A completed job no longer counts against its owner.
    jobs.create(&job("t1", "k", Some("alice"), &["Patient"], 30), 1).await.expect("room");
}

#[tokio::test]
async fn failing_a_job_stops_its_chunks() {
    let fx = fixture().await;
    let jobs = &fx.jobs;
    jobs.create(&job("t1", "j", None, &["Patient", "Observation"], 1), 10).await.expect("create");
    let held = lease(jobs, "w1", 2, 100).await.expect("leased");
    jobs.fail(&tenant("t1"), &job_id("j"), "blob store is down", t(7)).await.expect("fail");
    let failed = view(jobs, "t1", "j").await.expect("job");
    assert_eq!(
        (failed.job.status, failed.job.error.as_deref(), failed.job.finished_at),
        (JobStatus::Failed, Some("blob store is down"), Some(t(7)))
    );
    assert_eq!(which(&lease(jobs, "w2", 3, 100).await), None, "the other chunk of a failed job is not leased");
    assert!(!jobs.renew(&held, "w1", t(200)).await.expect("renew"));
    assert!(!jobs.complete(&held, "w1", &[output("Patient", 1)], t(8)).await.expect("complete"));
    assert!(view(jobs, "t1", "j").await.expect("job").chunks.iter().all(|c| !c.done));
    assert_eq!(fx.counter("t1", None).await, 0);

    // Failing again, or failing a completed job, changes nothing; failing a missing job is no error.
    jobs.fail(&tenant("t1"), &job_id("j"), "other", t(9)).await.expect("fail again");
    let still = view(jobs, "t1", "j").await.expect("job").job;
    assert_eq!((still.error.as_deref(), still.finished_at), (Some("blob store is down"), Some(t(7))));
    jobs.create(&job("t1", "k", None, &["Patient"], 1), 10).await.expect("create");
    let chunk = lease(jobs, "w1", 2, 100).await.expect("leased");
    assert!(jobs.complete(&chunk, "w1", &[], t(3)).await.expect("complete"));
    jobs.fail(&tenant("t1"), &job_id("k"), "late", t(4)).await.expect("fail");
    assert_eq!(view(jobs, "t1", "k").await.expect("job").job.status, JobStatus::Completed);
    jobs.fail(&tenant("t1"), &job_id("missing"), "x", t(4)).await.expect("no such job");
    assert_eq!(fx.counter("t1", None).await, 0, "each job left the count once");
    assert_eq!(fx.queued_and_finished().await, (0, 2));
}

#[tokio::test]
async fn deleting_a_job_removes_it_and_its_chunks() {
    let fx = fixture().await;
    let jobs = &fx.jobs;
    jobs.create(&job("t1", "j", None, &["Patient", "Observation"], 1), 10).await.expect("create");
    jobs.create(&job("t2", "j", None, &["Patient"], 1), 10).await.expect("same id, other tenant");
    let held = lease(jobs, "w1", 2, 100).await.expect("leased");
    assert_eq!(held.job.tenant, tenant("t1"), "t1/j and t2/j tie on created_at and id; tenant breaks it");

    assert!(jobs.delete(&tenant("t1"), &job_id("j")).await.expect("delete"));
    assert_eq!(view(jobs, "t1", "j").await, None);
    assert!(!jobs.delete(&tenant("t1"), &job_id("j")).await.expect("delete again"));
    assert!(!jobs.renew(&held, "w1", t(200)).await.expect("renew"));
    assert!(!jobs.complete(&held, "w1", &[], t(3)).await.expect("complete"));
    assert!(!jobs.release(&held, "w1", "x", t(3)).await.expect("release"));
    // t1's other chunk is gone; t2's job is untouched and leased next.
    assert_eq!(which(&lease(jobs, "w2", 3, 100).await), Some(("j".to_owned(), 0)));
    assert_eq!(which(&lease(jobs, "w3", 3, 100).await), None);
    assert!(view(jobs, "t2", "j").await.is_some());
    assert_eq!(fx.chunk_items("t1", "j").await, 0);
    assert_eq!(fx.chunk_items("t2", "j").await, 1);
}

#[tokio::test]
async fn finished_before_lists_finished_jobs_oldest_first() {
    let fx = fixture().await;
    let jobs = &fx.jobs;
    for (tenant_name, id) in [("t1", "done-late"), ("t2", "failed"), ("t1", "done-early"), ("t1", "running")] {
        jobs.create(&job(tenant_name, id, None, &["Patient"], 1), 10).await.expect("create");
    }
    let complete = |id: &'static str, at: i64| async move {
        let chunk = lease(jobs, "w", 1, 1000).await.expect("leased");
        assert_eq!(chunk.job.id.as_str(), id);
        assert!(jobs.complete(&chunk, "w", &[], t(at)).await.expect("complete"));
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
    assert_eq!(names(finished(1000, 2).await.expect("list")), all[..2]);
    assert_eq!(finished(10, 10).await, Ok(vec![]));
    assert_eq!(finished(1000, 0).await, Ok(vec![]));
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

#[tokio::test]
async fn a_released_chunk_comes_back_at_its_retry_time_with_its_reason_and_count() {
    let fx = fixture().await;
    let jobs = &fx.jobs;
    jobs.create(&job("t1", "j", None, &["Patient"], 1), 10).await.expect("create");
    let first = lease(jobs, "w1", 5, 100).await.expect("leased");
    assert_eq!((first.attempt, first.last_error.as_deref()), (1, None));
    assert!(!jobs.release(&first, "w2", "not mine", t(20)).await.expect("release"), "only the holder releases");
    assert!(jobs.release(&first, "w1", "blob store unavailable", t(20)).await.expect("release"));
    assert_eq!(which(&lease(jobs, "w2", 19, 200).await), None, "not before its retry time");
    let second = lease(jobs, "w2", 21, 200).await.expect("leased again after the retry time");
    assert_eq!((second.attempt, second.last_error.as_deref()), (2, Some("blob store unavailable")));
    assert!(jobs.complete(&second, "w2", &[output("Patient", 1)], t(30)).await.expect("complete"));
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
