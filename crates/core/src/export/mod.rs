//! Bulk Data `$export` (HL7 Bulk Data Access IG 2.0.0) as a job system: kick-off parameters
//! validated into an [`ExportRequest`], a job with one work chunk per resource type in a
//! [`JobStore`], workers that lease chunks and stream the snapshot ([`ExportSource`]) as NDJSON
//! files into the blob store, and the status answer with the completion manifest.

pub mod job;
#[cfg(feature = "testing")]
pub mod job_store_suite;
pub mod request;
pub mod service;
pub mod worker;

pub use job::{
    ChunkPart, ChunkState, DynExportSource, DynJobStore, ExportJob, ExportLevel, ExportRequest, ExportSource, JobError,
    JobId, JobStatus, JobStore, JobView, LeasedChunk, OutputFile, SnapshotPage,
};
pub use request::KickOff;
pub use service::{DynExportService, ExportService, ExportSettings, ExportStatus, Exports, Manifest};
pub use worker::{ExportCounters, ExportWorker, WorkerSettings};
