//! Export jobs as stored: the job, its work chunks and their outputs, and the two ports the
//! exporter needs from storage — [`JobStore`] (jobs, chunks, leases) and [`ExportSource`] (a
//! consistent read of the resources as they were at the job's snapshot).

use std::sync::Arc;

use async_trait::async_trait;
use fhirmesh_fhir::ResourceType;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::model::{ResourceVersion, TenantId};
use crate::ports::StoreError;

/// A job's id: lowercase hex and `-` (a UUID), 1 to 64 characters — safe in URLs and blob paths.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(String);

impl JobId {
    /// A new random id.
    pub fn generate() -> JobId {
        JobId(uuid::Uuid::new_v4().to_string())
    }

    /// `None` unless `text` is 1 to 64 of `[0-9a-z-]`.
    pub fn parse(text: &str) -> Option<JobId> {
        let ok = !text.is_empty()
            && text.len() <= 64
            && text.bytes().all(|b| b.is_ascii_digit() || b.is_ascii_lowercase() || b == b'-');
        ok.then(|| JobId(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for JobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which resources an export covers (Bulk Data IG kick-off endpoints).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "level", rename_all = "lowercase")]
pub enum ExportLevel {
    /// `[base]/$export`: every resource of the exported types.
    System,
    /// `[base]/Patient/$export`: the Patient compartments of all patients (or of `patients`).
    Patient,
    /// `[base]/Group/[id]/$export`: the Patient compartments of the group's members.
    Group { id: String },
}

/// What was asked for, validated (see [`crate::export::request`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportRequest {
    pub level: ExportLevel,
    /// The types exported, in order: each one chunk, each its own files.
    pub types: Vec<String>,
    /// `_since`: only resources last updated after it.
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub since: Option<OffsetDateTime>,
    /// `_typeFilter` criteria as written (`Type?params`); a resource of a type with filters is
    /// exported when any of them matches.
    #[serde(default)]
    pub type_filters: Vec<String>,
    /// `_elements`: `name` (every type) or `Type.name` entries; empty for whole resources.
    #[serde(default)]
    pub elements: Vec<String>,
    /// `patient` (POST, Patient and Group level): only these patients' compartments (ids); for a
    /// Group export, the group's active members (intersected with `patient` when given).
    #[serde(default)]
    pub patients: Vec<String>,
    /// The kick-off request URL, for the manifest's `request`.
    pub request_url: String,
    /// How the job is split into chunks (see [`ExportRequest::chunks`]): 1 for a chunk per type
    /// (a store that reads a type by itself cheaply: SQLite), more for that many scan segments
    /// each covering every type (a store read by parallel scans: DynamoDB).
    #[serde(default = "one_segment")]
    pub segments: u32,
}

fn one_segment() -> u32 {
    1
}

/// The part of a job one chunk covers: these types, in this scan segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkPart {
    pub types: Vec<ResourceType>,
    /// `0..segments`.
    pub segment: u32,
    pub segments: u32,
}

impl ChunkPart {
    /// The prefix of the part's file names for `resource_type`: the type, and the segment when
    /// there are several (`Observation`, `Observation-3`).
    pub fn file_stem(&self, resource_type: ResourceType) -> String {
        if self.segments > 1 { format!("{resource_type}-{}", self.segment) } else { resource_type.to_string() }
    }
}

impl ExportRequest {
    /// The chunks of the job, by index: one per type when `segments` is 1, else `segments`
    /// chunks each covering every type. Unknown type names (none after validation) are skipped.
    pub fn chunks(&self) -> Vec<ChunkPart> {
        let types: Vec<ResourceType> = self.types.iter().filter_map(|name| ResourceType::parse(name)).collect();
        if self.segments <= 1 {
            types.into_iter().map(|t| ChunkPart { types: vec![t], segment: 0, segments: 1 }).collect()
        } else {
            (0..self.segments)
                .map(|segment| ChunkPart { types: types.clone(), segment, segments: self.segments })
                .collect()
        }
    }
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Accepted, chunks being worked on.
    Active,
    Completed,
    Failed,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Active => "active",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
        }
    }

    pub fn parse(text: &str) -> Option<JobStatus> {
        match text {
            "active" => Some(JobStatus::Active),
            "completed" => Some(JobStatus::Completed),
            "failed" => Some(JobStatus::Failed),
            _ => None,
        }
    }
}

/// One export job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportJob {
    pub id: JobId,
    pub tenant: TenantId,
    /// Who asked (the token's subject; `None` without authentication): the concurrency limit is
    /// per owner, and only the owner may see, cancel or download the job.
    pub owner: Option<String>,
    pub request: ExportRequest,
    /// The snapshot: every change up to this sequence is in it, none after.
    pub as_of: u64,
    /// The manifest's `transactionTime`: the instant of the snapshot.
    pub transaction_time: OffsetDateTime,
    pub created_at: OffsetDateTime,
    pub status: JobStatus,
    /// Why it failed (status `failed`).
    pub error: Option<String>,
    /// When it completed or failed.
    pub finished_at: Option<OffsetDateTime>,
}

/// One output file of a chunk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputFile {
    pub resource_type: String,
    /// The file's name in the job's output directory (`{Type}-{part}.ndjson`).
    pub name: String,
    /// Resources in the file.
    pub count: u64,
    pub bytes: u64,
}

/// A chunk of a job as stored (what it covers: `job.request.chunks()[index]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkState {
    /// 0-based, in the order of [`ExportRequest::chunks`].
    pub index: u32,
    pub done: bool,
    /// Its files (once done).
    pub outputs: Vec<OutputFile>,
}

/// A job with its chunks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobView {
    pub job: ExportJob,
    pub chunks: Vec<ChunkState>,
}

/// A chunk leased to a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeasedChunk {
    pub job: ExportJob,
    /// What it covers: `job.request.chunks()[index]`.
    pub index: u32,
    /// The lease ends then unless renewed; afterwards another worker may take the chunk.
    pub until: OffsetDateTime,
    /// How many times the chunk has been leased, this lease included (1 on the first).
    pub attempt: u32,
    /// Why the previous attempt gave the chunk back ([`JobStore::release`]), if it said.
    pub last_error: Option<String>,
}

/// Why a job store operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    /// The owner already has `max` active jobs.
    #[error("{active} export jobs are already running (at most {max})")]
    TooMany { active: usize, max: usize },
    #[error("job store unavailable: {0}")]
    Unavailable(String),
    #[error("job store failure: {0}")]
    Internal(String),
}

/// Export jobs, their chunks and leases (SQLite beside the embedded store; DynamoDB in the mesh).
/// Every operation is atomic; several workers (in one process or many) share the chunks through
/// leases.
#[async_trait]
pub trait JobStore: Send + Sync + 'static {
    /// Stores `job` (status `active`) with its pending chunks (`job.request.chunks()`), unless its
    /// owner (the same `owner` value, `None` included) already has `max_active` active jobs in
    /// the tenant: then [`JobError::TooMany`] and nothing is stored.
    async fn create(&self, job: &ExportJob, max_active: usize) -> Result<(), JobError>;

    /// The job with its chunks, or `None`.
    async fn get(&self, tenant: &TenantId, id: &JobId) -> Result<Option<JobView>, JobError>;

    /// Leases to `worker`, until `until`, a chunk of an active job that is not done and not leased
    /// (or whose lease ended before `now`), oldest job first, counting the attempt; `None` when
    /// there is none.
    async fn lease(
        &self,
        worker: &str,
        now: OffsetDateTime,
        until: OffsetDateTime,
    ) -> Result<Option<LeasedChunk>, JobError>;

    /// Extends `worker`'s lease of the chunk to `until`; false when the worker no longer holds it
    /// (its lease was taken over, or the job is gone).
    async fn renew(&self, chunk: &LeasedChunk, worker: &str, until: OffsetDateTime) -> Result<bool, JobError>;

    /// Marks the chunk done with its `outputs` when `worker` still holds it; when it was the
    /// job's last chunk, the job becomes `completed` at `now`. False when the worker no longer
    /// holds it (nothing changes).
    async fn complete(
        &self,
        chunk: &LeasedChunk,
        worker: &str,
        outputs: &[OutputFile],
        now: OffsetDateTime,
    ) -> Result<bool, JobError>;

    /// Gives a chunk back because `error` stopped `worker`: any worker may lease it again from
    /// `retry_at` on (its lease ends then), and the next lease carries `error` as its
    /// `last_error`. False when the worker no longer held it.
    async fn release(
        &self,
        chunk: &LeasedChunk,
        worker: &str,
        error: &str,
        retry_at: OffsetDateTime,
    ) -> Result<bool, JobError>;

    /// Marks an active job `failed` with `reason` at `now`.
    async fn fail(&self, tenant: &TenantId, id: &JobId, reason: &str, now: OffsetDateTime) -> Result<(), JobError>;

    /// Removes the job and its chunks (cancel, expiry); true when it existed.
    async fn delete(&self, tenant: &TenantId, id: &JobId) -> Result<bool, JobError>;

    /// Up to `limit` jobs that finished (completed or failed) before `before`, oldest first.
    async fn finished_before(&self, before: OffsetDateTime, limit: usize) -> Result<Vec<(TenantId, JobId)>, JobError>;
}

pub type DynJobStore = Arc<dyn JobStore>;

/// A consistent read of a tenant's resources as they were at a change sequence: the snapshot an
/// export job reads, however long it runs and whatever is written meanwhile.
#[async_trait]
pub trait ExportSource: Send + Sync + 'static {
    /// The next page of `part`: up to `limit` resources of its types in its segment, each in the
    /// version that was current at change sequence `as_of` (left out when that version is a
    /// delete, or when the resource did not exist yet), last updated strictly after `since` when
    /// given, from `cursor` (a previous page's [`SnapshotPage::next`]; `None` to start). Reading
    /// a part to its end from the start yields the same resources in the same order every time,
    /// each once. A page may hold fewer than `limit` resources (even none) while `next` is set.
    async fn snapshot_page(
        &self,
        tenant: &TenantId,
        part: &ChunkPart,
        as_of: u64,
        since: Option<OffsetDateTime>,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<SnapshotPage, StoreError>;
}

/// One page of a [`ChunkPart`]'s snapshot.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SnapshotPage {
    pub resources: Vec<ResourceVersion>,
    /// Where the part goes on; `None` once it is read to its end.
    pub next: Option<String>,
}

pub type DynExportSource = Arc<dyn ExportSource>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_are_url_and_path_safe() {
        let id = JobId::generate();
        assert_eq!(JobId::parse(id.as_str()), Some(id));
        for bad in ["", "UPPER", "a/b", "a.b", &"a".repeat(65), "a b"] {
            assert_eq!(JobId::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn requests_round_trip_through_json() {
        let request = ExportRequest {
            level: ExportLevel::Group { id: "g1".into() },
            types: vec!["Patient".into(), "Observation".into()],
            since: Some(time::macros::datetime!(2026-01-02 03:04:05 UTC)),
            type_filters: vec!["Observation?status=final".into()],
            elements: vec!["Patient.name".into(), "status".into()],
            patients: vec!["p1".into()],
            request_url: "http://h/Group/g1/$export".into(),
            segments: 1,
        };
        let text = serde_json::to_string(&request).expect("json");
        assert!(text.contains("\"level\":\"group\""), "{text}");
        assert_eq!(serde_json::from_str::<ExportRequest>(&text).expect("back"), request);
        // Jobs stored before `segments` existed read as one chunk per type.
        let older = text.replace(",\"segments\":1", "");
        assert_ne!(older, text);
        assert_eq!(serde_json::from_str::<ExportRequest>(&older).expect("older").segments, 1);
    }

    #[test]
    fn chunks_are_one_per_type_or_one_per_segment_over_every_type() {
        let t = |name: &str| ResourceType::parse(name).expect("type");
        let mut request = ExportRequest {
            level: ExportLevel::System,
            types: vec!["Patient".into(), "Observation".into()],
            since: None,
            type_filters: vec![],
            elements: vec![],
            patients: vec![],
            request_url: "http://h/$export".into(),
            segments: 1,
        };
        let chunks = request.chunks();
        assert_eq!(chunks.len(), 2);
        assert_eq!((chunks[1].types.clone(), chunks[1].segment, chunks[1].segments), (vec![t("Observation")], 0, 1));
        assert_eq!(chunks[1].file_stem(t("Observation")), "Observation");
        request.segments = 3;
        let chunks = request.chunks();
        assert_eq!(chunks.len(), 3);
        assert!(chunks.iter().all(|c| c.types == [t("Patient"), t("Observation")] && c.segments == 3));
        assert_eq!(chunks.iter().map(|c| c.segment).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(chunks[2].file_stem(t("Patient")), "Patient-2");
    }
}
