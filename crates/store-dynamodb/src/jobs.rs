//! [`DynamoJobStore`]: the export [`JobStore`] of the mesh — jobs, their chunks and leases in a
//! DynamoDB table of their own (`fhirmesh-jobs` by default, see [`crate::provision_jobs`]), shared
//! by every exporter process. Every state change is a conditional write or a `TransactWriteItems`;
//! reads are strongly consistent. Besides the job and chunk items the table keeps an active-job
//! queue (so a lease never scans), an index of finished jobs (for expiry) and a counter of active
//! jobs per owner (the limit, checked inside the transaction that creates a job). See
//! `design.md`, "Export jobs", for the items and how each race is decided.

use std::collections::HashMap;
use std::ops::Range;

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{
    AttributeValue, CancellationReason, ConditionCheck, Delete, Put, ReturnValuesOnConditionCheckFailure,
    TransactWriteItem, Update,
};
use fhirmesh_core::export::{
    ChunkState, ExportJob, ExportRequest, JobError, JobId, JobStatus, JobStore, JobView, LeasedChunk, OutputFile,
};
use fhirmesh_core::model::TenantId;
use fhirmesh_core::ports::StoreError;
use time::OffsetDateTime;

use crate::commit::{MAX_ATTEMPTS, backoff};
use crate::error::{build_error, is_indeterminate, job_error, sdk_error};
use crate::items::{Item, PK, SK, get_s, get_u64, key, micros, n, s, tenant_of};

/// Sort key of a job item (its partition also holds its chunks).
const JOB_SK: &str = "J";
/// Sort-key prefix of chunk items.
const CHUNK_PREFIX: &str = "C#";
/// Partition of the active-job queue.
const QUEUE_PK: &str = "Q";
/// Partition of the finished-job index.
const FINISHED_PK: &str = "F";
/// Sort key of an owner's active-job counter.
const COUNTER_SK: &str = "O";

// Job item attributes.
const TENANT: &str = "tenant";
const ID: &str = "id";
const OWNER: &str = "owner";
const REQUEST: &str = "request";
const AS_OF: &str = "as_of";
const TRANSACTION_TIME: &str = "transaction_time";
const CREATED_AT: &str = "created_at";
const STATUS: &str = "status";
const ERROR: &str = "error";
const FINISHED_AT: &str = "finished_at";
const CHUNKS: &str = "chunks";
const REMAINING: &str = "remaining";
const DONE_AT: &str = "done_at";
// Chunk item attributes.
const DONE: &str = "done";
const WORKER: &str = "worker";
const LEASE_UNTIL: &str = "lease_until";
const ATTEMPTS: &str = "attempts";
const LAST_ERROR: &str = "last_error";
const OUTPUTS: &str = "outputs";
// Counter item attribute.
const ACTIVE: &str = "active";

/// Items of one `TransactWriteItems`.
const TRANSACTION_MAX: usize = 100;
/// Requests of one `BatchWriteItem`.
/// Queue entries read per page of a lease.
const QUEUE_PAGE: i32 = 100;
/// Longest owner (bytes) kept in a counter's partition key (DynamoDB allows 2,048 bytes).
pub const MAX_OWNER_BYTES: usize = 1024;

/// Export jobs, chunks and leases in DynamoDB. Cheap to clone.
#[derive(Debug, Clone)]
pub struct DynamoJobStore {
    client: Client,
    table: String,
}

impl DynamoJobStore {
    /// A job store on `table`, which must exist (see [`crate::provision_jobs`]).
    pub fn new(client: Client, table: impl Into<String>) -> DynamoJobStore {
        DynamoJobStore { client, table: table.into() }
    }

    /// The table's name.
    pub fn table(&self) -> &str {
        &self.table
    }
}

// ---------------------------------------------------------------------------------------------
// Keys and encoding

fn job_pk(tenant: &TenantId, id: &JobId) -> String {
    format!("J#{tenant}#{id}")
}

fn chunk_sk(index: u32) -> String {
    format!("{CHUNK_PREFIX}{index:010}")
}

/// Microseconds as 20 digits that sort like the numbers, negative ones included.
fn sortable(micros: i64) -> String {
    format!("{:020}", (micros as u64) ^ (1u64 << 63))
}

/// The queue orders like the SQLite store: creation, then job id, then tenant (`#` sorts before
/// every character of either).
fn queue_sk(created_at: i64, tenant: &TenantId, id: &JobId) -> String {
    format!("{}#{id}#{tenant}", sortable(created_at))
}

/// Finished jobs by finish instant, then tenant, then id.
fn finished_sk(finished_at: i64, tenant: &TenantId, id: &JobId) -> String {
    format!("{}#{tenant}#{id}", sortable(finished_at))
}

/// The owner's counter: `N` for no owner, `U#{owner}` for an owner (the tenant has no `#`).
fn counter_pk(tenant: &TenantId, owner: Option<&str>) -> String {
    match owner {
        None => format!("O#{tenant}#N"),
        Some(owner) => format!("O#{tenant}#U#{owner}"),
    }
}

fn bad(detail: impl std::fmt::Display) -> StoreError {
    StoreError::Internal(format!("unexpected item in the export job table: {detail}"))
}

fn encode_error(what: &str, err: impl std::fmt::Display) -> StoreError {
    StoreError::Internal(format!("cannot encode {what}: {err}"))
}

fn get_i64(item: &Item, name: &str) -> Result<i64, StoreError> {
    match item.get(name) {
        Some(AttributeValue::N(value)) => value.parse().map_err(|_| bad(format!("{name} = {value} is not an i64"))),
        other => Err(bad(format!("{name} is {other:?}, expected a number"))),
    }
}

fn opt_i64(item: &Item, name: &str) -> Result<Option<i64>, StoreError> {
    if item.contains_key(name) { get_i64(item, name).map(Some) } else { Ok(None) }
}

fn opt_s<'a>(item: &'a Item, name: &str) -> Result<Option<&'a str>, StoreError> {
    match item.get(name) {
        None => Ok(None),
        Some(AttributeValue::S(value)) => Ok(Some(value)),
        Some(other) => Err(bad(format!("{name} is {other:?}, expected a string"))),
    }
}

fn get_bool(item: &Item, name: &str) -> Result<bool, StoreError> {
    match item.get(name) {
        Some(AttributeValue::Bool(value)) => Ok(*value),
        other => Err(bad(format!("{name} is {other:?}, expected a boolean"))),
    }
}

fn from_micros(micros: i64) -> Result<OffsetDateTime, StoreError> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1000)
        .map_err(|e| bad(format!("timestamp {micros} out of range: {e}")))
}

fn job_id_of(item: &Item) -> Result<JobId, StoreError> {
    let id = get_s(item, ID)?;
    JobId::parse(id).ok_or_else(|| bad(format!("job id {id:?}")))
}

fn status_of(item: &Item) -> Result<JobStatus, StoreError> {
    let status = get_s(item, STATUS)?;
    JobStatus::parse(status).ok_or_else(|| bad(format!("job status {status:?}")))
}

/// `ExpressionAttributeNames` (`None` when empty: DynamoDB refuses an empty map).
fn names<const N: usize>(pairs: [(&str, &str); N]) -> Option<HashMap<String, String>> {
    (N > 0).then(|| pairs.into_iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect())
}

/// `ExpressionAttributeValues` (`None` when empty).
fn values<const N: usize>(pairs: [(&str, AttributeValue); N]) -> Option<HashMap<String, AttributeValue>> {
    (N > 0).then(|| pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
}

/// The job item of a new job: active, with every chunk remaining.
fn job_item(job: &ExportJob, chunks: u32) -> Result<Item, StoreError> {
    let request = serde_json::to_string(&job.request).map_err(|e| encode_error("the export request", e))?;
    let mut item = key(job_pk(&job.tenant, &job.id), JOB_SK.to_owned());
    item.insert(TENANT.into(), s(job.tenant.as_str()));
    item.insert(ID.into(), s(job.id.as_str()));
    if let Some(owner) = &job.owner {
        item.insert(OWNER.into(), s(owner));
    }
    item.insert(REQUEST.into(), s(request));
    item.insert(AS_OF.into(), n(job.as_of));
    item.insert(TRANSACTION_TIME.into(), n(micros(job.transaction_time)));
    item.insert(CREATED_AT.into(), n(micros(job.created_at)));
    item.insert(STATUS.into(), s(JobStatus::Active.as_str()));
    item.insert(CHUNKS.into(), n(chunks));
    item.insert(REMAINING.into(), n(chunks));
    Ok(item)
}

fn job_from_item(item: &Item) -> Result<ExportJob, StoreError> {
    let tenant = tenant_of(item).map_err(|_| bad(format!("job item without a valid tenant: {:?}", item.get(PK))))?;
    let id = job_id_of(item)?;
    let request = serde_json::from_str::<ExportRequest>(get_s(item, REQUEST)?)
        .map_err(|e| bad(format!("export request of job {tenant}/{id}: {e}")))?;
    Ok(ExportJob {
        owner: opt_s(item, OWNER)?.map(str::to_owned),
        request,
        as_of: get_u64(item, AS_OF)?,
        transaction_time: from_micros(get_i64(item, TRANSACTION_TIME)?)?,
        created_at: from_micros(get_i64(item, CREATED_AT)?)?,
        status: status_of(item)?,
        error: opt_s(item, ERROR)?.map(str::to_owned),
        finished_at: opt_i64(item, FINISHED_AT)?.map(from_micros).transpose()?,
        tenant,
        id,
    })
}

/// A chunk item as read (outputs still encoded).
#[derive(Debug)]
struct Chunk {
    index: u32,
    done: bool,
    worker: Option<String>,
    lease_until: Option<i64>,
    attempts: u64,
    last_error: Option<String>,
    outputs: Option<String>,
}

impl Chunk {
    fn from_item(item: &Item) -> Result<Chunk, StoreError> {
        let sk = get_s(item, SK)?;
        let index = sk
            .strip_prefix(CHUNK_PREFIX)
            .and_then(|digits| digits.parse::<u32>().ok())
            .ok_or_else(|| bad(format!("chunk sort key {sk:?}")))?;
        Ok(Chunk {
            index,
            done: get_bool(item, DONE)?,
            worker: opt_s(item, WORKER)?.map(str::to_owned),
            lease_until: opt_i64(item, LEASE_UNTIL)?,
            attempts: get_u64(item, ATTEMPTS)?,
            last_error: opt_s(item, LAST_ERROR)?.map(str::to_owned),
            outputs: opt_s(item, OUTPUTS)?.map(str::to_owned),
        })
    }

    fn is_free(&self, now: i64) -> bool {
        !self.done && self.lease_until.is_none_or(|until| until < now)
    }
}

// ---------------------------------------------------------------------------------------------
// Requests

/// How a `TransactWriteItems` ended.
enum Outcome {
    Applied,
    /// A condition failed: nothing was written (the reasons are in item order).
    Cancelled(Vec<CancellationReason>),
    /// No answer: it may or may not have applied.
    Unknown(StoreError),
}

/// Whether the item at `position` of a cancelled transaction failed its condition.
fn failed_at(reasons: &[CancellationReason], position: usize) -> bool {
    reasons.get(position).and_then(|r| r.code()) == Some("ConditionalCheckFailed")
}

/// Cancellation codes a new attempt may cure.
const RETRY_CODES: &[&str] = &["TransactionConflict", "ThrottlingError", "ProvisionedThroughputExceeded"];

fn put(table: &str, item: Item, condition: Option<&str>) -> Result<TransactWriteItem, StoreError> {
    let put = Put::builder()
        .table_name(table)
        .set_item(Some(item))
        .set_condition_expression(condition.map(str::to_owned))
        .build()
        .map_err(build_error)?;
    Ok(TransactWriteItem::builder().put(put).build())
}

fn delete(table: &str, pk: String, sk: String) -> Result<TransactWriteItem, StoreError> {
    let delete = Delete::builder().table_name(table).set_key(Some(key(pk, sk))).build().map_err(build_error)?;
    Ok(TransactWriteItem::builder().delete(delete).build())
}

/// `ADD active :delta` on an owner's counter.
fn count(table: &str, counter: String, delta: i64) -> Result<TransactWriteItem, StoreError> {
    let update = Update::builder()
        .table_name(table)
        .set_key(Some(key(counter, COUNTER_SK.to_owned())))
        .update_expression("ADD #active :delta")
        .set_expression_attribute_names(names([("#active", ACTIVE)]))
        .set_expression_attribute_values(values([(":delta", n(delta))]))
        .build()
        .map_err(build_error)?;
    Ok(TransactWriteItem::builder().update(update).build())
}

/// The condition that `job` is there and active.
fn job_is_active(table: &str, tenant: &TenantId, id: &JobId) -> Result<TransactWriteItem, StoreError> {
    let check = ConditionCheck::builder()
        .table_name(table)
        .set_key(Some(key(job_pk(tenant, id), JOB_SK.to_owned())))
        .condition_expression("#status = :active")
        .set_expression_attribute_names(names([("#status", STATUS)]))
        .set_expression_attribute_values(values([(":active", s(JobStatus::Active.as_str()))]))
        .build()
        .map_err(build_error)?;
    Ok(TransactWriteItem::builder().condition_check(check).build())
}

/// The chunk's condition "held by `worker`, not done".
const HELD: &str = "#worker = :worker AND #done = :false";

impl DynamoJobStore {
    async fn get_item(&self, pk: String, sk: &str, what: &str) -> Result<Option<Item>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(key(pk, sk.to_owned())))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| sdk_error(what, e))?;
        Ok(out.item().cloned())
    }

    async fn job_item(&self, tenant: &TenantId, id: &JobId) -> Result<Option<Item>, StoreError> {
        self.get_item(job_pk(tenant, id), JOB_SK, "read an export job").await
    }

    /// One `TransactWriteItems`, tried again (bounded, with back-off) while it only loses races.
    async fn transact(&self, what: &str, items: Vec<TransactWriteItem>) -> Result<Outcome, StoreError> {
        let mut last_reason = String::new();
        for attempt in 0..MAX_ATTEMPTS {
            if attempt > 0 {
                backoff(attempt).await;
            }
            let sent = self.client.transact_write_items().set_transact_items(Some(items.clone())).send().await;
            let err = match sent {
                Ok(_) => return Ok(Outcome::Applied),
                Err(err) if is_indeterminate(&err) => return Ok(Outcome::Unknown(sdk_error(what, err))),
                Err(err) => err,
            };
            match err.as_service_error() {
                Some(TransactWriteItemsError::TransactionCanceledException(cancelled)) => {
                    let reasons = cancelled.cancellation_reasons().to_vec();
                    if reasons.iter().any(|r| r.code() == Some("ConditionalCheckFailed")) {
                        return Ok(Outcome::Cancelled(reasons));
                    }
                    let codes: Vec<&str> =
                        reasons.iter().filter_map(|r| r.code()).filter(|code| *code != "None").collect();
                    if codes.is_empty() || codes.iter().any(|code| !RETRY_CODES.contains(code)) {
                        let detail: Vec<String> = reasons
                            .iter()
                            .map(|r| format!("{} {}", r.code().unwrap_or("?"), r.message().unwrap_or("")))
                            .collect();
                        return Err(StoreError::Internal(format!("DynamoDB {what}: cancelled: {}", detail.join("; "))));
                    }
                    last_reason = codes.join(", ");
                }
                Some(TransactWriteItemsError::TransactionInProgressException(e)) => last_reason = e.to_string(),
                _ => return Err(sdk_error(what, err)),
            }
            tracing::debug!(what, attempt, reason = %last_reason, "export job transaction retried");
        }
        Err(StoreError::Unavailable(format!(
            "DynamoDB {what}: kept losing races ({MAX_ATTEMPTS} attempts): {last_reason}"
        )))
    }

    /// The job's chunk items, in index order (strongly consistent). `lease_view`: only what a
    /// lease needs (no outputs).
    async fn chunks(&self, tenant: &TenantId, id: &JobId, lease_view: bool) -> Result<Vec<Chunk>, StoreError> {
        let mut chunks = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let mut query = self
                .client
                .query()
                .table_name(&self.table)
                .consistent_read(true)
                .key_condition_expression("#pk = :pk AND begins_with(#sk, :prefix)")
                .expression_attribute_values(":pk", s(job_pk(tenant, id)))
                .expression_attribute_values(":prefix", s(CHUNK_PREFIX))
                .set_exclusive_start_key(start.take());
            query = if lease_view {
                query
                    .projection_expression("#sk, #done, #worker, #lease, #attempts, #error")
                    .set_expression_attribute_names(names([
                        ("#pk", PK),
                        ("#sk", SK),
                        ("#done", DONE),
                        ("#worker", WORKER),
                        ("#lease", LEASE_UNTIL),
                        ("#attempts", ATTEMPTS),
                        ("#error", LAST_ERROR),
                    ]))
            } else {
                query.set_expression_attribute_names(names([("#pk", PK), ("#sk", SK)]))
            };
            let out = query.send().await.map_err(|e| sdk_error("read the chunks of an export job", e))?;
            for item in out.items() {
                chunks.push(Chunk::from_item(item).map_err(|e| job_error_context(e, tenant, id))?);
            }
            match out.last_evaluated_key() {
                Some(last) if !last.is_empty() => start = Some(last.clone()),
                _ => return Ok(chunks),
            }
        }
    }

    /// Deletes the chunk items of `indexes` (best effort is the caller's call).
    async fn delete_chunk_keys(&self, tenant: &TenantId, id: &JobId, indexes: Range<u32>) -> Result<(), StoreError> {
        let pk = job_pk(tenant, id);
        let keys: Vec<Item> = indexes.map(|index| key(pk.clone(), chunk_sk(index))).collect();
        self.batch_delete(keys).await
    }

    /// Deletes every chunk item of the job.
    async fn delete_chunks(&self, tenant: &TenantId, id: &JobId) -> Result<(), StoreError> {
        let pk = job_pk(tenant, id);
        let keys: Vec<Item> =
            self.chunks(tenant, id, true).await?.iter().map(|chunk| key(pk.clone(), chunk_sk(chunk.index))).collect();
        self.batch_delete(keys).await
    }

    /// Deletes the items of `keys` (no atomicity needed).
    async fn batch_delete(&self, keys: Vec<Item>) -> Result<(), StoreError> {
        crate::batch::delete_all(&self.client, &self.table, keys, "delete export chunks").await
    }

    /// The owner's active jobs as counted.
    async fn active_count(&self, counter: &str) -> Result<u64, StoreError> {
        match self.get_item(counter.to_owned(), COUNTER_SK, "read an export job counter").await? {
            Some(item) if item.contains_key(ACTIVE) => get_u64(&item, ACTIVE),
            _ => Ok(0),
        }
    }

    /// The writes that take an active job out of the queue: the job (status, `finished_at`,
    /// `error`) if still active (and, for a completion, with no chunk remaining), the queue entry,
    /// the finished-index entry, the owner's counter.
    fn leave_active(
        &self,
        job: &Item,
        status: JobStatus,
        error: Option<&str>,
        at: i64,
    ) -> Result<Vec<TransactWriteItem>, StoreError> {
        let tenant = tenant_of(job)?;
        let id = job_id_of(job)?;
        let created_at = get_i64(job, CREATED_AT)?;
        let owner = opt_s(job, OWNER)?;
        let mut update = Update::builder()
            .table_name(&self.table)
            .set_key(Some(key(job_pk(&tenant, &id), JOB_SK.to_owned())))
            .expression_attribute_names("#status", STATUS)
            .expression_attribute_names("#finished", FINISHED_AT)
            .expression_attribute_values(":active", s(JobStatus::Active.as_str()))
            .expression_attribute_values(":status", s(status.as_str()))
            .expression_attribute_values(":at", n(at));
        update = match error {
            Some(error) => update
                .update_expression("SET #status = :status, #finished = :at, #error = :error")
                .condition_expression("#status = :active")
                .expression_attribute_names("#error", ERROR)
                .expression_attribute_values(":error", s(error)),
            None => update
                .update_expression("SET #status = :status, #finished = :at")
                .condition_expression("#status = :active AND #remaining = :zero")
                .expression_attribute_names("#remaining", REMAINING)
                .expression_attribute_values(":zero", n(0)),
        };
        let update = update.build().map_err(build_error)?;
        let mut finished = key(FINISHED_PK.to_owned(), finished_sk(at, &tenant, &id));
        finished.insert(TENANT.into(), s(tenant.as_str()));
        finished.insert(ID.into(), s(id.as_str()));
        Ok(vec![
            TransactWriteItem::builder().update(update).build(),
            delete(&self.table, QUEUE_PK.to_owned(), queue_sk(created_at, &tenant, &id))?,
            put(&self.table, finished, None)?,
            count(&self.table, counter_pk(&tenant, owner), -1)?,
        ])
    }

    /// Completes the job if it is active with no chunk remaining, at the instant its last chunk
    /// was completed; true when this call completed it. Idempotent: of several callers, exactly
    /// one transaction passes its condition.
    async fn finish_if_done(&self, tenant: &TenantId, id: &JobId) -> Result<bool, StoreError> {
        let Some(job) = self.job_item(tenant, id).await? else { return Ok(false) };
        if status_of(&job)? != JobStatus::Active || get_u64(&job, REMAINING)? != 0 {
            return Ok(false);
        }
        let at = match opt_i64(&job, DONE_AT)? {
            Some(at) => at,
            None => get_i64(&job, CREATED_AT)?,
        };
        let items = self.leave_active(&job, JobStatus::Completed, None, at)?;
        match self.transact("complete an export job", items).await? {
            Outcome::Applied => Ok(true),
            Outcome::Cancelled(_) => Ok(false),
            Outcome::Unknown(err) => Err(err),
        }
    }

    // -----------------------------------------------------------------------------------------
    // The operations

    /// `Ok(Err(TooMany))` when the owner is at the limit: nothing is left written.
    async fn create_job(&self, job: &ExportJob, max_active: usize) -> Result<Result<(), JobError>, StoreError> {
        let chunk_count = u32::try_from(job.request.chunks().len())
            .map_err(|_| StoreError::Internal("too many chunks in one export".to_owned()))?;
        if job.owner.as_ref().is_some_and(|owner| owner.len() > MAX_OWNER_BYTES) {
            return Err(StoreError::Internal(format!("export job owners are limited to {MAX_OWNER_BYTES} bytes")));
        }
        let (tenant, id) = (&job.tenant, &job.id);
        let counter = counter_pk(tenant, job.owner.as_deref());
        let job_item = job_item(job, chunk_count)?;
        let too_many =
            |active: u64| JobError::TooMany { active: usize::try_from(active).unwrap_or(usize::MAX), max: max_active };

        // At the limit already: refuse before writing anything (the transaction below decides
        // when creates race).
        let active = self.active_count(&counter).await?;
        if active >= max_active as u64 {
            return Ok(Err(too_many(active)));
        }

        // The chunks first, each only where none is: a job item is never there without them.
        let mut written = 0u32;
        while written < chunk_count {
            let end = written.saturating_add(TRANSACTION_MAX as u32).min(chunk_count);
            let mut items = Vec::with_capacity((end - written) as usize);
            for index in written..end {
                let mut chunk = key(job_pk(tenant, id), chunk_sk(index));
                chunk.insert(DONE.into(), AttributeValue::Bool(false));
                chunk.insert(ATTEMPTS.into(), n(0));
                items.push(put(&self.table, chunk, Some("attribute_not_exists(pk)"))?);
            }
            let failure = match self.transact("store export chunks", items).await {
                Ok(Outcome::Applied) => {
                    written = end;
                    continue;
                }
                Ok(Outcome::Cancelled(_)) => StoreError::Internal(format!("export job {tenant}/{id} exists already")),
                Ok(Outcome::Unknown(err)) | Err(err) => err,
            };
            self.discard_chunks(tenant, id, written).await;
            return Err(failure);
        }

        let mut queued = key(QUEUE_PK.to_owned(), queue_sk(micros(job.created_at), tenant, id));
        queued.insert(TENANT.into(), s(tenant.as_str()));
        queued.insert(ID.into(), s(id.as_str()));
        let counted = Update::builder()
            .table_name(&self.table)
            .set_key(Some(key(counter.clone(), COUNTER_SK.to_owned())))
            .update_expression("SET #active = if_not_exists(#active, :zero) + :one")
            .condition_expression("attribute_not_exists(#active) OR #active < :max")
            .set_expression_attribute_names(names([("#active", ACTIVE)]))
            .set_expression_attribute_values(values([(":zero", n(0)), (":one", n(1)), (":max", n(max_active))]))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .build()
            .map_err(build_error)?;
        let items = vec![
            put(&self.table, job_item, Some("attribute_not_exists(pk)"))?,
            put(&self.table, queued, None)?,
            TransactWriteItem::builder().update(counted).build(),
        ];
        match self.transact("create an export job", items).await {
            Ok(Outcome::Applied) => Ok(Ok(())),
            Ok(Outcome::Cancelled(reasons)) => {
                self.discard_chunks(tenant, id, chunk_count).await;
                if failed_at(&reasons, 0) {
                    return Err(StoreError::Internal(format!("export job {tenant}/{id} exists already")));
                }
                let old = reasons.get(2).and_then(|r| r.item());
                let active = match old.and_then(|item| get_u64(item, ACTIVE).ok()) {
                    Some(active) => active,
                    None => self.active_count(&counter).await?,
                };
                Ok(Err(too_many(active)))
            }
            // No answer: the job item tells whether the transaction applied. If it did not, its
            // chunks stay (orphans cost storage only; deleting them could race the transaction).
            Ok(Outcome::Unknown(err)) => match self.job_item(tenant, id).await {
                Ok(Some(_)) => Ok(Ok(())),
                _ => Err(err),
            },
            Err(err) => {
                self.discard_chunks(tenant, id, chunk_count).await;
                Err(err)
            }
        }
    }

    /// Best effort: removes the chunks `0..written` a failed create wrote.
    async fn discard_chunks(&self, tenant: &TenantId, id: &JobId, written: u32) {
        if written == 0 {
            return;
        }
        if let Err(error) = self.delete_chunk_keys(tenant, id, 0..written).await {
            tracing::warn!(%error, %tenant, job = %id, "could not remove the chunks of an export job not created");
        }
    }

    async fn get_job(&self, tenant: &TenantId, id: &JobId) -> Result<Option<JobView>, StoreError> {
        // The job first, then its chunks: a completed job always shows every chunk done.
        let Some(item) = self.job_item(tenant, id).await? else { return Ok(None) };
        let job = job_from_item(&item)?;
        let mut chunks = Vec::new();
        for chunk in self.chunks(tenant, id, false).await? {
            let outputs = match &chunk.outputs {
                None => Vec::new(),
                Some(json) => serde_json::from_str::<Vec<OutputFile>>(json)
                    .map_err(|e| bad(format!("outputs of chunk {} of job {tenant}/{id}: {e}", chunk.index)))?,
            };
            chunks.push(ChunkState { index: chunk.index, done: chunk.done, outputs });
        }
        Ok(Some(JobView { job, chunks }))
    }

    /// Walks the queue, oldest job first, for a free chunk.
    async fn lease_chunk(
        &self,
        worker: &str,
        now: OffsetDateTime,
        until: OffsetDateTime,
    ) -> Result<Option<LeasedChunk>, StoreError> {
        let mut start: Option<Item> = None;
        loop {
            let out = self
                .client
                .query()
                .table_name(&self.table)
                .consistent_read(true)
                .key_condition_expression("#pk = :queue")
                .expression_attribute_names("#pk", PK)
                .expression_attribute_values(":queue", s(QUEUE_PK))
                .limit(QUEUE_PAGE)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| sdk_error("read the export job queue", e))?;
            for entry in out.items() {
                let tenant = tenant_of(entry).map_err(|_| bad(format!("queue entry {:?}", entry.get(SK))))?;
                let id = job_id_of(entry)?;
                if let Some(leased) = self.lease_in_job(&tenant, &id, worker, now, until).await? {
                    return Ok(Some(leased));
                }
            }
            match out.last_evaluated_key() {
                Some(last) if !last.is_empty() => start = Some(last.clone()),
                _ => return Ok(None),
            }
        }
    }

    /// Leases the first free chunk of the job, if any.
    async fn lease_in_job(
        &self,
        tenant: &TenantId,
        id: &JobId,
        worker: &str,
        now: OffsetDateTime,
        until: OffsetDateTime,
    ) -> Result<Option<LeasedChunk>, StoreError> {
        let now_us = micros(now);
        let chunks = self.chunks(tenant, id, true).await?;
        if chunks.iter().all(|chunk| chunk.done) {
            // Every chunk done, the job still queued: the completion that emptied it did not get
            // to finish the job (it died, or lost its connection). Finish it now.
            if self.finish_if_done(tenant, id).await? {
                tracing::info!(%tenant, job = %id, "completed an export job whose last completion did not");
            }
            return Ok(None);
        }
        let mut job: Option<ExportJob> = None;
        for chunk in chunks.iter().filter(|chunk| chunk.is_free(now_us)) {
            let job = match &job {
                Some(job) => job.clone(),
                None => {
                    let Some(item) = self.job_item(tenant, id).await? else { return Ok(None) };
                    let decoded = job_from_item(&item)?;
                    if decoded.status != JobStatus::Active {
                        return Ok(None);
                    }
                    job.insert(decoded).clone()
                }
            };
            // Exactly the chunk as read: free, not done, the same attempts and last error (so
            // the lease reports them right), and its job still active.
            let mut condition = "#done = :false AND (attribute_not_exists(#lease) OR #lease < :now) \
                                 AND #attempts = :attempts"
                .to_owned();
            let mut update = Update::builder()
                .table_name(&self.table)
                .set_key(Some(key(job_pk(tenant, id), chunk_sk(chunk.index))))
                .update_expression("SET #worker = :worker, #lease = :until, #attempts = #attempts + :one")
                .expression_attribute_names("#done", DONE)
                .expression_attribute_names("#lease", LEASE_UNTIL)
                .expression_attribute_names("#attempts", ATTEMPTS)
                .expression_attribute_names("#worker", WORKER)
                .expression_attribute_names("#error", LAST_ERROR)
                .expression_attribute_values(":false", AttributeValue::Bool(false))
                .expression_attribute_values(":now", n(now_us))
                .expression_attribute_values(":attempts", n(chunk.attempts))
                .expression_attribute_values(":worker", s(worker))
                .expression_attribute_values(":until", n(micros(until)))
                .expression_attribute_values(":one", n(1));
            match &chunk.last_error {
                None => condition.push_str(" AND attribute_not_exists(#error)"),
                Some(error) => {
                    condition.push_str(" AND #error = :error");
                    update = update.expression_attribute_values(":error", s(error));
                }
            }
            let update = update.condition_expression(condition).build().map_err(build_error)?;
            let items =
                vec![job_is_active(&self.table, tenant, id)?, TransactWriteItem::builder().update(update).build()];
            match self.transact("lease an export chunk", items).await? {
                Outcome::Applied => {
                    return Ok(Some(LeasedChunk {
                        job,
                        index: chunk.index,
                        until,
                        attempt: u32::try_from(chunk.attempts.saturating_add(1)).unwrap_or(u32::MAX),
                        last_error: chunk.last_error.clone(),
                    }));
                }
                // The job is no longer active.
                Outcome::Cancelled(reasons) if failed_at(&reasons, 0) => return Ok(None),
                // Another worker took the chunk (or it changed) since it was read: the next one.
                Outcome::Cancelled(_) => {}
                Outcome::Unknown(err) => return Err(err),
            }
        }
        Ok(None)
    }

    async fn renew_chunk(&self, chunk: &LeasedChunk, worker: &str, until: OffsetDateTime) -> Result<bool, StoreError> {
        let (tenant, id) = (&chunk.job.tenant, &chunk.job.id);
        let update = Update::builder()
            .table_name(&self.table)
            .set_key(Some(key(job_pk(tenant, id), chunk_sk(chunk.index))))
            .update_expression("SET #lease = :until")
            .condition_expression(HELD)
            .set_expression_attribute_names(names([("#lease", LEASE_UNTIL), ("#worker", WORKER), ("#done", DONE)]))
            .set_expression_attribute_values(values([
                (":until", n(micros(until))),
                (":worker", s(worker)),
                (":false", AttributeValue::Bool(false)),
            ]))
            .build()
            .map_err(build_error)?;
        let items = vec![job_is_active(&self.table, tenant, id)?, TransactWriteItem::builder().update(update).build()];
        match self.transact("renew an export chunk lease", items).await? {
            Outcome::Applied => Ok(true),
            Outcome::Cancelled(_) => Ok(false),
            Outcome::Unknown(err) => Err(err),
        }
    }

    async fn release_chunk(
        &self,
        chunk: &LeasedChunk,
        worker: &str,
        error: &str,
        retry_at: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let (tenant, id) = (&chunk.job.tenant, &chunk.job.id);
        let released = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(job_pk(tenant, id), chunk_sk(chunk.index))))
            .update_expression("SET #lease = :retry, #error = :error")
            .condition_expression(HELD)
            .set_expression_attribute_names(names([
                ("#lease", LEASE_UNTIL),
                ("#error", LAST_ERROR),
                ("#worker", WORKER),
                ("#done", DONE),
            ]))
            .set_expression_attribute_values(values([
                (":retry", n(micros(retry_at))),
                (":error", s(error)),
                (":worker", s(worker)),
                (":false", AttributeValue::Bool(false)),
            ]))
            .send()
            .await;
        match released {
            Ok(_) => Ok(true),
            Err(err) if err.as_service_error().is_some_and(|e| e.is_conditional_check_failed_exception()) => Ok(false),
            Err(err) => Err(sdk_error("release an export chunk", err)),
        }
    }

    async fn complete_chunk(
        &self,
        chunk: &LeasedChunk,
        worker: &str,
        outputs: &[OutputFile],
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let (tenant, id) = (&chunk.job.tenant, &chunk.job.id);
        let outputs = serde_json::to_string(outputs).map_err(|e| encode_error("the chunk's outputs", e))?;
        let done = Update::builder()
            .table_name(&self.table)
            .set_key(Some(key(job_pk(tenant, id), chunk_sk(chunk.index))))
            .update_expression("SET #done = :true, #outputs = :outputs REMOVE #lease")
            .condition_expression(HELD)
            .set_expression_attribute_names(names([
                ("#done", DONE),
                ("#outputs", OUTPUTS),
                ("#lease", LEASE_UNTIL),
                ("#worker", WORKER),
            ]))
            .set_expression_attribute_values(values([
                (":true", AttributeValue::Bool(true)),
                (":false", AttributeValue::Bool(false)),
                (":outputs", s(outputs)),
                (":worker", s(worker)),
            ]))
            .build()
            .map_err(build_error)?;
        let counted = Update::builder()
            .table_name(&self.table)
            .set_key(Some(key(job_pk(tenant, id), JOB_SK.to_owned())))
            .update_expression("SET #remaining = #remaining - :one, #done_at = :now")
            .condition_expression("#status = :active")
            .set_expression_attribute_names(names([
                ("#remaining", REMAINING),
                ("#done_at", DONE_AT),
                ("#status", STATUS),
            ]))
            .set_expression_attribute_values(values([
                (":one", n(1)),
                (":now", n(micros(now))),
                (":active", s(JobStatus::Active.as_str())),
            ]))
            .build()
            .map_err(build_error)?;
        let items = vec![
            TransactWriteItem::builder().update(done).build(),
            TransactWriteItem::builder().update(counted).build(),
        ];
        match self.transact("complete an export chunk", items).await? {
            Outcome::Applied => {}
            Outcome::Cancelled(_) => return Ok(false),
            // No answer: the chunk tells. Done and still naming this worker means this call did it
            // (no one else completes a chunk it holds).
            Outcome::Unknown(err) => {
                let item = self.get_item(job_pk(tenant, id), &chunk_sk(chunk.index), "read an export chunk").await;
                let applied = match item {
                    Ok(Some(item)) => Chunk::from_item(&item)
                        .is_ok_and(|stored| stored.done && stored.worker.as_deref() == Some(worker)),
                    _ => false,
                };
                if !applied {
                    return Err(err);
                }
            }
        }
        // The chunk is done whatever happens next; a job left active with nothing remaining is
        // completed by the next lease that meets it.
        if let Err(error) = self.finish_if_done(tenant, id).await {
            tracing::warn!(%error, %tenant, job = %id, "could not complete an export job; the next lease will");
        }
        Ok(true)
    }

    async fn fail_job(
        &self,
        tenant: &TenantId,
        id: &JobId,
        reason: &str,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let Some(job) = self.job_item(tenant, id).await? else { return Ok(()) };
        if status_of(&job)? != JobStatus::Active {
            return Ok(());
        }
        let items = self.leave_active(&job, JobStatus::Failed, Some(reason), micros(now))?;
        match self.transact("fail an export job", items).await? {
            // Cancelled: no longer active (completed, failed or deleted meanwhile).
            Outcome::Applied | Outcome::Cancelled(_) => Ok(()),
            Outcome::Unknown(err) => Err(err),
        }
    }

    async fn delete_job(&self, tenant: &TenantId, id: &JobId) -> Result<bool, StoreError> {
        for attempt in 0..MAX_ATTEMPTS {
            if attempt > 0 {
                backoff(attempt).await;
            }
            let Some(job) = self.job_item(tenant, id).await? else {
                // Gone — but a delete that failed half-way may have left chunks.
                self.delete_chunks(tenant, id).await?;
                return Ok(false);
            };
            // Whatever state the job is in (even a corrupt one), as long as it stays in it.
            let status = match job.get(STATUS) {
                Some(AttributeValue::S(status)) => Some(status.clone()),
                _ => None,
            };
            let mut removed = Delete::builder()
                .table_name(&self.table)
                .set_key(Some(key(job_pk(tenant, id), JOB_SK.to_owned())))
                .expression_attribute_names("#status", STATUS);
            removed = match &status {
                Some(status) => {
                    removed.condition_expression("#status = :seen").expression_attribute_values(":seen", s(status))
                }
                None => removed.condition_expression("attribute_exists(pk) AND attribute_not_exists(#status)"),
            };
            let mut items = vec![TransactWriteItem::builder().delete(removed.build().map_err(build_error)?).build()];
            if let Ok(created_at) = get_i64(&job, CREATED_AT) {
                items.push(delete(&self.table, QUEUE_PK.to_owned(), queue_sk(created_at, tenant, id))?);
            }
            if status.as_deref() == Some(JobStatus::Active.as_str()) {
                items.push(count(&self.table, counter_pk(tenant, opt_s(&job, OWNER)?), -1)?);
            }
            if let Ok(Some(finished_at)) = opt_i64(&job, FINISHED_AT) {
                items.push(delete(&self.table, FINISHED_PK.to_owned(), finished_sk(finished_at, tenant, id))?);
            }
            match self.transact("delete an export job", items).await? {
                Outcome::Applied => {
                    self.delete_chunks(tenant, id).await?;
                    return Ok(true);
                }
                // It changed state meanwhile: read it again.
                Outcome::Cancelled(_) => {}
                Outcome::Unknown(err) => return Err(err),
            }
        }
        Err(StoreError::Unavailable(format!("export job {tenant}/{id} kept changing while being deleted")))
    }

    async fn list_finished(&self, before: OffsetDateTime, limit: usize) -> Result<Vec<(TenantId, JobId)>, StoreError> {
        let mut jobs = Vec::new();
        let mut start: Option<Item> = None;
        while jobs.len() < limit {
            let page = i32::try_from(limit - jobs.len()).unwrap_or(i32::MAX).min(1000);
            let out = self
                .client
                .query()
                .table_name(&self.table)
                .consistent_read(true)
                .key_condition_expression("#pk = :finished AND #sk < :before")
                .set_expression_attribute_names(names([("#pk", PK), ("#sk", SK)]))
                .set_expression_attribute_values(values([
                    (":finished", s(FINISHED_PK)),
                    (":before", s(sortable(micros(before)))),
                ]))
                .limit(page)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| sdk_error("list finished export jobs", e))?;
            for item in out.items() {
                let tenant = tenant_of(item).map_err(|_| bad(format!("finished entry {:?}", item.get(SK))))?;
                jobs.push((tenant, job_id_of(item)?));
            }
            match out.last_evaluated_key() {
                Some(last) if !last.is_empty() => start = Some(last.clone()),
                _ => break,
            }
        }
        jobs.truncate(limit);
        Ok(jobs)
    }
}

/// Names the job in a decoding error.
fn job_error_context(err: StoreError, tenant: &TenantId, id: &JobId) -> StoreError {
    match err {
        StoreError::Internal(message) => StoreError::Internal(format!("{message} (export job {tenant}/{id})")),
        other => other,
    }
}

#[async_trait]
impl JobStore for DynamoJobStore {
    async fn create(&self, job: &ExportJob, max_active: usize) -> Result<(), JobError> {
        self.create_job(job, max_active).await.map_err(job_error)?
    }

    async fn get(&self, tenant: &TenantId, id: &JobId) -> Result<Option<JobView>, JobError> {
        self.get_job(tenant, id).await.map_err(job_error)
    }

    async fn lease(
        &self,
        worker: &str,
        now: OffsetDateTime,
        until: OffsetDateTime,
    ) -> Result<Option<LeasedChunk>, JobError> {
        self.lease_chunk(worker, now, until).await.map_err(job_error)
    }

    async fn renew(&self, chunk: &LeasedChunk, worker: &str, until: OffsetDateTime) -> Result<bool, JobError> {
        self.renew_chunk(chunk, worker, until).await.map_err(job_error)
    }

    async fn complete(
        &self,
        chunk: &LeasedChunk,
        worker: &str,
        outputs: &[OutputFile],
        now: OffsetDateTime,
    ) -> Result<bool, JobError> {
        self.complete_chunk(chunk, worker, outputs, now).await.map_err(job_error)
    }

    async fn release(
        &self,
        chunk: &LeasedChunk,
        worker: &str,
        error: &str,
        retry_at: OffsetDateTime,
    ) -> Result<bool, JobError> {
        self.release_chunk(chunk, worker, error, retry_at).await.map_err(job_error)
    }

    async fn fail(&self, tenant: &TenantId, id: &JobId, reason: &str, now: OffsetDateTime) -> Result<(), JobError> {
        self.fail_job(tenant, id, reason, now).await.map_err(job_error)
    }

    async fn delete(&self, tenant: &TenantId, id: &JobId) -> Result<bool, JobError> {
        self.delete_job(tenant, id).await.map_err(job_error)
    }

    async fn finished_before(&self, before: OffsetDateTime, limit: usize) -> Result<Vec<(TenantId, JobId)>, JobError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.list_finished(before, limit).await.map_err(job_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(name: &str) -> TenantId {
        TenantId::parse(name).expect("tenant")
    }

    fn job_id(text: &str) -> JobId {
        JobId::parse(text).expect("job id")
    }

    #[test]
    fn sort_keys_order_like_the_sqlite_queries() {
        // Timestamps, negative ones included, sort numerically.
        let instants = [i64::MIN, -1_000_000, -1, 0, 1, 999, 1_000, 1_700_000_000_000_000, i64::MAX];
        for pair in instants.windows(2) {
            assert!(sortable(pair[0]) < sortable(pair[1]), "{pair:?}");
            assert_eq!(sortable(pair[0]).len(), 20);
        }
        // Queue: created, then id, then tenant; `#` sorts before every id and tenant character.
        let (t1, t2) = (tenant("t1"), tenant("t2"));
        assert!(queue_sk(5, &t2, &job_id("b")) < queue_sk(5, &t1, &job_id("b-1")));
        assert!(queue_sk(5, &t1, &job_id("j")) < queue_sk(5, &t2, &job_id("j")));
        assert!(queue_sk(5, &t2, &job_id("z")) < queue_sk(6, &t1, &job_id("a")));
        // Finished: instant, then tenant, then id; `before` is a strict bound.
        assert!(finished_sk(5, &t1, &job_id("z")) < finished_sk(5, &t2, &job_id("a")));
        assert!(sortable(5) < finished_sk(5, &t1, &job_id("a")));
        assert!(finished_sk(4, &t2, &job_id("z")) < sortable(5));
        assert!(chunk_sk(9) < chunk_sk(10));
        assert_eq!(chunk_sk(u32::MAX), "C#4294967295");
    }

    #[test]
    fn owners_and_no_owner_have_separate_counters() {
        let t1 = tenant("t1");
        assert_ne!(counter_pk(&t1, None), counter_pk(&t1, Some("N")));
        assert_ne!(counter_pk(&t1, Some("")), counter_pk(&t1, None));
        assert_ne!(counter_pk(&t1, Some("a")), counter_pk(&tenant("t1-U"), Some("a")));
        assert_eq!(counter_pk(&t1, Some("alice#1")), "O#t1#U#alice#1");
    }

    #[test]
    fn malformed_chunks_are_errors_not_panics() {
        let mut item = key("J#t#j".into(), "C#x".into());
        item.insert(DONE.into(), AttributeValue::Bool(false));
        assert!(Chunk::from_item(&item).is_err(), "bad index");
        item.insert(SK.into(), s(chunk_sk(3)));
        assert!(Chunk::from_item(&item).is_err(), "no attempts");
        item.insert(ATTEMPTS.into(), n(0));
        assert_eq!(Chunk::from_item(&item).expect("chunk").index, 3);
        item.insert(DONE.into(), s("no"));
        assert!(Chunk::from_item(&item).is_err(), "done must be a boolean");
        item.insert(DONE.into(), AttributeValue::Bool(true));
        item.insert(ATTEMPTS.into(), n(-1));
        assert!(Chunk::from_item(&item).is_err(), "attempts must be a u64");
    }
}
