//! One conformance suite for every [`JobStore`] adapter (feature `testing`): each case drives a
//! fresh, empty store through the contract and asserts only what the port promises. The adapters'
//! tests (`fhirmesh-store-sqlite`, `fhirmesh-store-dynamodb`) run every case on a fresh store and
//! add what only their storage can show (rows, items, counters, races).
//!
//! The helpers below build the jobs the cases use; adapters' own tests use them too.

use time::OffsetDateTime;

use super::{ChunkState, ExportJob, ExportLevel, ExportRequest, JobError, JobId, JobStatus, JobStore, JobView};
use super::{LeasedChunk, OutputFile};
use crate::model::TenantId;

/// `seconds` after a fixed instant (2023-11-14T22:13:20Z).
pub fn t(seconds: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_700_000_000 + seconds).expect("valid timestamp")
}

pub fn tenant(name: &str) -> TenantId {
    TenantId::parse(name).expect("valid tenant")
}

pub fn job_id(text: &str) -> JobId {
    JobId::parse(text).expect("valid job id")
}

/// An export job of `tenant_name` created at `t(created)`, one chunk per type.
pub fn job(tenant_name: &str, id: &str, owner: Option<&str>, types: &[&str], created: i64) -> ExportJob {
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
pub fn segmented(tenant_name: &str, id: &str, owner: Option<&str>, segments: u32, created: i64) -> ExportJob {
    let mut job = job(tenant_name, id, owner, &["Patient", "Observation"], created);
    job.request.segments = segments;
    job
}

pub fn output(resource_type: &str, part: u32) -> OutputFile {
    OutputFile {
        resource_type: resource_type.to_owned(),
        name: format!("{resource_type}-{part}.ndjson"),
        count: 10 + u64::from(part),
        bytes: 1000 + u64::from(part),
    }
}

pub async fn view<S: JobStore + ?Sized>(jobs: &S, tenant_name: &str, id: &str) -> Option<JobView> {
    jobs.get(&tenant(tenant_name), &job_id(id)).await.expect("get")
}

/// A lease taken at `t(now)` until `t(until)`.
pub async fn lease<S: JobStore + ?Sized>(jobs: &S, worker: &str, now: i64, until: i64) -> Option<LeasedChunk> {
    jobs.lease(worker, t(now), t(until)).await.expect("lease")
}

/// (job id, chunk index) of a lease.
pub fn which(chunk: &Option<LeasedChunk>) -> Option<(String, u32)> {
    chunk.as_ref().map(|chunk| (chunk.job.id.to_string(), chunk.index))
}

/// Jobs round-trip per tenant; a new job is active whatever the caller set; an id is created once.
/// Leaves `t1/job-1` (alice, Patient + Observation) and `t1/job-2` (no owner, Patient).
pub async fn jobs_round_trip<S: JobStore + ?Sized>(jobs: &S) -> JobView {
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
    assert_eq!(view(jobs, "t1", "job-1").await, Some(expected.clone()), "the failed creates changed nothing");
    expected
}

/// The active-job limit counts per owner (and no owner) and tenant, active jobs only. Refused
/// jobs leave nothing: `t1/c1` (carol, refused at a limit of 0) does not exist afterwards.
pub async fn the_active_job_limit_is_per_owner_and_tenant<S: JobStore + ?Sized>(jobs: &S) {
    jobs.create(&job("t1", "a1", Some("alice"), &["Patient"], 1), 2).await.expect("first");
    jobs.create(&job("t1", "a2", Some("alice"), &["Patient"], 2), 2).await.expect("second");
    let third = jobs.create(&job("t1", "a3", Some("alice"), &["Patient", "Observation"], 3), 2).await;
    assert_eq!(third, Err(JobError::TooMany { active: 2, max: 2 }));
    assert_eq!(view(jobs, "t1", "a3").await, None, "nothing stored");

    // Another owner, no owner, another tenant: each counted on its own.
    jobs.create(&job("t1", "b1", Some("bob"), &["Patient"], 4), 2).await.expect("bob");
    jobs.create(&job("t1", "n1", None, &["Patient"], 5), 2).await.expect("anonymous");
    jobs.create(&job("t1", "n2", None, &["Patient"], 6), 2).await.expect("anonymous again");
    let n3 = jobs.create(&job("t1", "n3", None, &["Patient"], 7), 2).await;
    assert_eq!(n3, Err(JobError::TooMany { active: 2, max: 2 }));
    jobs.create(&job("t2", "a1", Some("alice"), &["Patient"], 8), 2).await.expect("alice elsewhere");
    // An owner spelled like a storage marker is still just an owner.
    jobs.create(&job("t1", "x1", Some("N"), &["Patient"], 8), 2).await.expect("owner N");

    // Only active jobs count: once one of alice's fails, she may start another.
    jobs.fail(&tenant("t1"), &job_id("a1"), "boom", t(9)).await.expect("fail");
    jobs.create(&job("t1", "a3", Some("alice"), &["Patient"], 10), 2).await.expect("room again");
    assert_eq!(view(jobs, "t1", "a3").await.expect("stored").chunks.len(), 1);
    let zero = jobs.create(&job("t1", "c1", Some("carol"), &["Patient"], 11), 0).await;
    assert_eq!(zero, Err(JobError::TooMany { active: 0, max: 0 }));
    assert_eq!(view(jobs, "t1", "c1").await, None, "nothing stored");
}

/// Leases hand out the oldest active job's chunks first (ties broken by id, then tenant), one
/// holder at a time, each with its attempt count.
pub async fn leases_go_oldest_job_first_and_are_exclusive<S: JobStore + ?Sized>(jobs: &S) {
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

/// Only the holder renews or completes; an ended lease passes to the next worker and the old
/// holder's late calls change nothing.
pub async fn an_expired_lease_passes_to_another_worker<S: JobStore + ?Sized>(jobs: &S) {
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

/// A job completes when its last chunk does, keeping every chunk's outputs; a completed job no
/// longer counts against its owner. Leaves `t1/j` completed and `t1/k` (alice) active.
pub async fn completing_the_last_chunk_completes_the_job<S: JobStore + ?Sized>(jobs: &S) {
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
    // A completed job no longer counts against its owner.
    jobs.create(&job("t1", "k", Some("alice"), &["Patient"], 30), 1).await.expect("room");
}

/// A failed job's chunks are neither leased, renewed nor completed; failing is idempotent, never
/// undoes a completion and ignores missing jobs. Leaves `t1/j` failed and `t1/k` completed.
pub async fn failing_a_job_stops_its_chunks<S: JobStore + ?Sized>(jobs: &S) {
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
}

/// Deleting a job removes it and its chunks, in its tenant only; the holder of one of its chunks
/// can do nothing more with it. Leaves `t2/j` (one chunk, leased).
pub async fn deleting_a_job_removes_it_and_its_chunks<S: JobStore + ?Sized>(jobs: &S) {
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
}

/// `finished_before` lists completed and failed jobs of every tenant, oldest finish first,
/// strictly before the instant, at most `limit`.
pub async fn finished_before_lists_finished_jobs_oldest_first<S: JobStore + ?Sized>(jobs: &S) {
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

/// Only the holder releases a chunk; it comes back at its retry time with the reason and the
/// next attempt number.
pub async fn a_released_chunk_comes_back_at_its_retry_time<S: JobStore + ?Sized>(jobs: &S) {
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
