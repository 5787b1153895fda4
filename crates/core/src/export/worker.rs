//! The export worker: leases a chunk (one resource type of one job, or one scan segment over all
//! its types — [`crate::export::ChunkPart`]), reads its snapshot page by page, keeps what the job
//! asks for, and streams each type as NDJSON files into the blob store —
//! `export/{job}/{stem}-{part}.ndjson` (stem `Type`, or `Type-{segment}`), a new part past
//! `max_file_bytes`. The chunk is completed with its files only when all are written; until then
//! its lease is renewed.
//!
//! A worker that dies leaves its lease to expire; another worker takes the chunk and writes it
//! from the start. The snapshot is fixed (the same resources in the same order) and the files
//! are cut at the same places, so it writes the same files under the same names: nothing is
//! missing, nothing is listed twice. A worker
//! that finds it lost its lease (renew or complete answers false) stops; what it wrote is
//! overwritten by the holder.
//!
//! The worker also removes expired jobs: their files and their records, `output_expiry` after
//! they finished.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fhirmesh_fhir::ResourceType;
use fhirmesh_fhir::elements::apply_elements;
use fhirmesh_fhir::search::IndexValue;
use fhirmesh_fhir::search::compartments::compartment_params;
use fhirmesh_fhir::search::criteria::ResourceCriteria;
use fhirmesh_fhir::search::evaluate::Doc;
use fhirmesh_fhir::search::extract::extract;
use futures::StreamExt;
use serde_json::Value;
use time::OffsetDateTime;
use tokio::sync::{Notify, mpsc};

use crate::blob::{BlobKey, BlobPrefix, DynBlobStore, PutBody};
use crate::export::job::{ChunkPart, DynExportSource, DynJobStore, ExportLevel, JobId, LeasedChunk, OutputFile};

/// The content type of export files.
pub const NDJSON: &str = "application/fhir+ndjson";

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Names this worker in leases (unique per process).
    pub worker_id: String,
    /// How long a lease lasts; renewed every third of it while the chunk is worked on.
    pub lease: Duration,
    /// Pause when there is no chunk to work on.
    pub poll_interval: Duration,
    /// Resources read from the snapshot at a time.
    pub page_size: usize,
    /// A file is closed, and the next part started, once it holds this many bytes.
    pub max_file_bytes: u64,
    /// Finished jobs (and their files) are removed this long after they finished.
    pub output_expiry: Duration,
    /// Attempts at one chunk before its job fails (a chunk whose worker died counts too).
    pub max_attempts: u32,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        WorkerSettings {
            worker_id: format!("worker-{}", uuid::Uuid::new_v4()),
            lease: Duration::from_secs(60),
            poll_interval: Duration::from_millis(250),
            page_size: 1_000,
            max_file_bytes: 128 * 1024 * 1024,
            output_expiry: Duration::from_secs(24 * 3600),
            max_attempts: 5,
        }
    }
}

/// The blob path of an export file.
pub fn file_path(job: &JobId, name: &str) -> String {
    format!("export/{job}/{name}")
}

/// The blob prefix of a job's files.
pub fn job_prefix(tenant: &crate::model::TenantId, job: &JobId) -> Option<BlobPrefix> {
    BlobPrefix::new(tenant, &format!("export/{job}/")).ok()
}

/// What the export workers of a process have done, for its metrics (shared by its workers).
#[derive(Debug, Default)]
pub struct ExportCounters {
    /// Resources written to export files (a retried chunk's are written again).
    pub resources: AtomicU64,
    /// Chunks leased and being worked on now.
    pub in_progress: AtomicU64,
    /// Chunks finished, by outcome.
    pub completed: AtomicU64,
    pub retried: AtomicU64,
    pub taken_over: AtomicU64,
    pub failed: AtomicU64,
}

impl ExportCounters {
    /// The counters as OpenMetrics text: `fhirmesh_export_resources_total`,
    /// `fhirmesh_export_chunks_in_progress`, `fhirmesh_export_chunks_total{outcome}`.
    pub fn render(&self, out: &mut String) {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        out.push_str(&format!(
            "# HELP fhirmesh_export_resources Resources written to export files by this process.\n\
             # TYPE fhirmesh_export_resources counter\n\
             fhirmesh_export_resources_total {}\n\
             # HELP fhirmesh_export_chunks_in_progress Export chunks this process is writing now.\n\
             # TYPE fhirmesh_export_chunks_in_progress gauge\n\
             fhirmesh_export_chunks_in_progress {}\n\
             # HELP fhirmesh_export_chunks Export chunks this process finished working on, by outcome.\n\
             # TYPE fhirmesh_export_chunks counter\n",
            get(&self.resources),
            get(&self.in_progress),
        ));
        for (outcome, counter) in [
            ("completed", &self.completed),
            ("retried", &self.retried),
            ("taken_over", &self.taken_over),
            ("failed", &self.failed),
        ] {
            out.push_str(&format!("fhirmesh_export_chunks_total{{outcome=\"{outcome}\"}} {}\n", get(counter)));
        }
    }
}

/// Chunk workers; see the module documentation.
pub struct ExportWorker {
    jobs: DynJobStore,
    source: DynExportSource,
    blobs: DynBlobStore,
    settings: WorkerSettings,
    /// Rung by a kick-off in the same process: no poll interval between a job and its start.
    wake: Arc<Notify>,
    counters: Arc<ExportCounters>,
}

/// Why a chunk was not finished.
#[derive(Debug)]
enum Stop {
    /// Another worker holds it now (or the job is gone): leave it.
    LeaseLost,
    /// Worth another try (by this or another worker, after the lease ends).
    Transient(String),
    /// The job cannot be done: it fails.
    Fatal(String),
}

impl ExportWorker {
    pub fn new(
        jobs: DynJobStore,
        source: DynExportSource,
        blobs: DynBlobStore,
        settings: WorkerSettings,
    ) -> ExportWorker {
        ExportWorker { jobs, source, blobs, settings, wake: Arc::new(Notify::new()), counters: Arc::default() }
    }

    /// Counts this worker's work in `counters` (shared by the workers of a process).
    pub fn with_counters(mut self, counters: Arc<ExportCounters>) -> ExportWorker {
        self.counters = counters;
        self
    }

    /// Wakes this worker whenever `wake` is notified (the [`crate::export::Exports`] of the same
    /// process notifies it on every kick-off), besides polling.
    pub fn with_wake(mut self, wake: Arc<Notify>) -> ExportWorker {
        self.wake = wake;
        self
    }

    /// Works on chunks until `shutdown`. A chunk in progress at shutdown is left to its lease.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut cleaned = tokio::time::Instant::now() - Duration::from_secs(3600);
        loop {
            if cleaned.elapsed() >= Duration::from_secs(60) {
                self.remove_expired().await;
                cleaned = tokio::time::Instant::now();
            }
            let worked = tokio::select! {
                _ = &mut shutdown => return,
                worked = self.work_once() => worked,
            };
            if !worked {
                tokio::select! {
                    _ = &mut shutdown => return,
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(self.settings.poll_interval) => {}
                }
            }
        }
    }

    /// Leases and works on one chunk; false when there was none (or the store failed).
    pub async fn work_once(&self) -> bool {
        let now = OffsetDateTime::now_utc();
        let chunk = match self.jobs.lease(&self.settings.worker_id, now, now + self.settings.lease).await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => return false,
            Err(error) => {
                tracing::warn!(%error, "export worker cannot lease a chunk");
                return false;
            }
        };
        let job = chunk.job.id.clone();
        self.counters.in_progress.fetch_add(1, Ordering::Relaxed);
        let part = chunk.job.request.chunks().into_iter().nth(chunk.index as usize);
        let outcome = match part {
            None => Err(Stop::Fatal(format!("the job has no chunk {}", chunk.index))),
            Some(part) if chunk.attempt > self.settings.max_attempts.max(1) => {
                let last = chunk.last_error.as_deref().unwrap_or("a worker stopped without saying why");
                Err(Stop::Fatal(format!(
                    "exporting {} failed {} times; the last time: {last}",
                    part_name(&part),
                    chunk.attempt - 1
                )))
            }
            Some(part) => self.export_chunk(&chunk, &part).await,
        };
        self.counters.in_progress.fetch_sub(1, Ordering::Relaxed);
        let finished = match &outcome {
            Ok(()) => &self.counters.completed,
            Err(Stop::LeaseLost) => &self.counters.taken_over,
            Err(Stop::Transient(_)) => &self.counters.retried,
            Err(Stop::Fatal(_)) => &self.counters.failed,
        };
        finished.fetch_add(1, Ordering::Relaxed);
        match outcome {
            Ok(()) => {}
            Err(Stop::LeaseLost) => {
                // Taken over, or the job is gone (cancelled): then what this worker wrote after
                // the cancel's clean-up is removed here.
                if let Ok(None) = self.jobs.get(&chunk.job.tenant, &job).await
                    && let Some(prefix) = job_prefix(&chunk.job.tenant, &job)
                {
                    if let Err(error) = self.blobs.delete_prefix(&prefix).await {
                        tracing::warn!(%job, %error, "cannot remove a cancelled export's files");
                    }
                    tracing::info!(%job, "export job cancelled while a chunk was written");
                } else {
                    tracing::info!(%job, "export chunk taken over by another worker");
                }
            }
            Err(Stop::Transient(reason)) => {
                tracing::warn!(%job, %reason, attempt = chunk.attempt, "export chunk failed; it is retried");
                // Again after 2, 4, 8… seconds (at most a minute), by whichever worker is free.
                let pause = Duration::from_secs(1u64 << chunk.attempt.clamp(1, 6));
                let retry_at = OffsetDateTime::now_utc() + pause;
                let released = self.jobs.release(&chunk, &self.settings.worker_id, &reason, retry_at).await;
                if let Err(error) = released {
                    tracing::warn!(%job, %error, "cannot give an export chunk back; it is retried after its lease");
                }
            }
            Err(Stop::Fatal(reason)) => {
                tracing::error!(%job, %reason, "export job failed");
                let failed = self.jobs.fail(&chunk.job.tenant, &chunk.job.id, &reason, OffsetDateTime::now_utc()).await;
                if let Err(error) = failed {
                    tracing::warn!(%job, %error, "cannot record an export job's failure");
                }
            }
        }
        true
    }

    async fn export_chunk(&self, chunk: &LeasedChunk, part: &ChunkPart) -> Result<(), Stop> {
        let job = &chunk.job;
        // Per type: what is selected, and its files (opened on its first resource).
        let mut outputs: HashMap<ResourceType, (Selection, Files)> = HashMap::new();
        for resource_type in &part.types {
            let selection = Selection::new(*resource_type, &job.request)?;
            let files =
                Files::new(self.blobs.clone(), chunk, part.file_stem(*resource_type), *resource_type, &self.settings);
            outputs.insert(*resource_type, (selection, files));
        }
        let mut cursor: Option<String> = None;
        let mut renewed = tokio::time::Instant::now();
        let now = OffsetDateTime::now_utc();
        loop {
            let page = self
                .source
                .snapshot_page(
                    &job.tenant,
                    part,
                    job.as_of,
                    job.request.since,
                    cursor.as_deref(),
                    self.settings.page_size,
                )
                .await
                .map_err(|e| Stop::Transient(format!("reading the snapshot: {e}")))?;
            for version in page.resources {
                let Some(body) = version.body else { continue };
                let Some((selection, files)) = outputs.get_mut(&version.resource_type) else {
                    return Err(Stop::Fatal(format!(
                        "the snapshot of {} returned a {}",
                        part_name(part),
                        version.resource_type
                    )));
                };
                if let Some(line) = selection.line(version.id.as_str(), &body, now)? {
                    files.push(line).await?;
                    self.counters.resources.fetch_add(1, Ordering::Relaxed);
                }
            }
            if renewed.elapsed() >= self.settings.lease / 3 {
                self.renew(chunk).await?;
                renewed = tokio::time::Instant::now();
            }
            match page.next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        // In the order of the part's types, each type's parts in order.
        let mut written = Vec::new();
        for resource_type in &part.types {
            if let Some((_, files)) = outputs.remove(resource_type) {
                written.extend(files.finish().await?);
            }
        }
        let completed = self
            .jobs
            .complete(chunk, &self.settings.worker_id, &written, OffsetDateTime::now_utc())
            .await
            .map_err(|e| Stop::Transient(format!("completing the chunk: {e}")))?;
        if completed { Ok(()) } else { Err(Stop::LeaseLost) }
    }

    async fn renew(&self, chunk: &LeasedChunk) -> Result<(), Stop> {
        let until = OffsetDateTime::now_utc() + self.settings.lease;
        match self.jobs.renew(chunk, &self.settings.worker_id, until).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(Stop::LeaseLost),
            Err(error) => Err(Stop::Transient(format!("renewing the lease: {error}"))),
        }
    }

    /// Removes the files and records of jobs finished longer than `output_expiry` ago.
    pub async fn remove_expired(&self) {
        let before = OffsetDateTime::now_utc() - self.settings.output_expiry;
        let expired = match self.jobs.finished_before(before, 100).await {
            Ok(expired) => expired,
            Err(error) => return tracing::warn!(%error, "cannot list expired export jobs"),
        };
        for (tenant, id) in expired {
            if let Some(prefix) = job_prefix(&tenant, &id)
                && let Err(error) = self.blobs.delete_prefix(&prefix).await
            {
                tracing::warn!(%id, %error, "cannot remove an expired export's files");
                continue;
            }
            if let Err(error) = self.jobs.delete(&tenant, &id).await {
                tracing::warn!(%id, %error, "cannot remove an expired export job");
            }
        }
    }
}

/// A chunk part in messages: its type, or its segment.
fn part_name(part: &ChunkPart) -> String {
    match part.types.as_slice() {
        [one] if part.segments <= 1 => one.to_string(),
        _ => format!("segment {} of {}", part.segment + 1, part.segments),
    }
}

/// Which resources of a chunk's type go out, and in what shape.
struct Selection {
    resource_type: ResourceType,
    /// `_typeFilter` criteria on this type: a resource matching any of them goes out.
    filters: Vec<ResourceCriteria>,
    /// Patient and Group level: the compartment test (`None`: system level, no test).
    compartment: Option<Compartment>,
    /// `_elements` for this type (empty: whole resources).
    elements: Vec<String>,
}

/// Membership in the Patient compartment of some patients.
struct Compartment {
    /// The compartment's search parameters on this type (`None` for Patient itself).
    params: Option<&'static [String]>,
    /// The patients (`None`: any patient).
    patients: Option<HashSet<String>>,
}

impl Selection {
    fn new(resource_type: ResourceType, request: &crate::export::job::ExportRequest) -> Result<Selection, Stop> {
        let mut filters = Vec::new();
        for text in &request.type_filters {
            let criteria = ResourceCriteria::parse(text, "_typeFilter")
                .map_err(|_| Stop::Fatal(format!("the stored _typeFilter {text:?} no longer parses")))?;
            if criteria.resource_type() == resource_type {
                filters.push(criteria);
            }
        }
        let level = &request.level;
        let compartment = match level {
            ExportLevel::System => None,
            ExportLevel::Patient | ExportLevel::Group { .. } => {
                let patient = ResourceType::parse("Patient").expect("Patient is an R4 resource type");
                let params = (resource_type != patient).then(|| compartment_params(patient, resource_type));
                let restricted = matches!(level, ExportLevel::Group { .. }) || !request.patients.is_empty();
                let patients = restricted.then(|| request.patients.iter().cloned().collect());
                Some(Compartment { params, patients })
            }
        };
        let elements = request
            .elements
            .iter()
            .filter_map(|entry| match entry.split_once('.') {
                Some((t, name)) if t == resource_type.as_str() => Some(name.to_owned()),
                Some(_) => None,
                None => Some(entry.clone()),
            })
            .collect();
        Ok(Selection { resource_type, filters, compartment, elements })
    }

    /// The NDJSON line for a resource, or `None` when it is not selected.
    fn line(&self, id: &str, body: &Bytes, now: OffsetDateTime) -> Result<Option<Bytes>, Stop> {
        let plain = self.filters.is_empty() && self.compartment.is_none() && self.elements.is_empty();
        if plain && !body.contains(&b'\n') {
            return Ok(Some(with_newline(body)));
        }
        let resource: Value = serde_json::from_slice(body)
            .map_err(|e| Stop::Fatal(format!("a stored {} is not JSON: {e}", self.resource_type)))?;
        let needs_values = !self.filters.is_empty() || self.compartment.as_ref().is_some_and(|c| c.params.is_some());
        if needs_values {
            let doc = Doc { resource_type: self.resource_type, id: id.to_owned(), entries: extract(&resource) };
            if !self.filters.is_empty() && !self.filters.iter().any(|f| f.matches_doc(&doc, now)) {
                return Ok(None);
            }
            if let Some(compartment) = &self.compartment
                && !compartment.contains_doc(&doc)
            {
                return Ok(None);
            }
        } else if let Some(compartment) = &self.compartment
            && !compartment.contains_patient(id)
        {
            return Ok(None);
        }
        let shaped = if self.elements.is_empty() {
            resource
        } else {
            let names: Vec<&str> = self.elements.iter().map(String::as_str).collect();
            apply_elements(&resource, &names)
        };
        let mut line = serde_json::to_vec(&shaped).map_err(|e| Stop::Fatal(e.to_string()))?;
        line.push(b'\n');
        Ok(Some(Bytes::from(line)))
    }
}

fn with_newline(body: &Bytes) -> Bytes {
    let mut line = BytesMut::with_capacity(body.len() + 1);
    line.extend_from_slice(body);
    line.extend_from_slice(b"\n");
    line.freeze()
}

impl Compartment {
    /// A Patient resource: is it one of the patients?
    fn contains_patient(&self, id: &str) -> bool {
        self.patients.as_ref().is_none_or(|patients| patients.contains(id))
    }

    /// A resource of a compartment type: does one of the compartment's parameters reference one
    /// of the patients? (For Patient itself, its id.)
    fn contains_doc(&self, doc: &Doc) -> bool {
        let Some(params) = self.params else { return self.contains_patient(&doc.id) };
        doc.entries.iter().any(|entry| {
            params.contains(&entry.param)
                && match &entry.value {
                    IndexValue::Reference { target_type: Some(target), id: Some(id), .. } => {
                        target.as_str() == "Patient" && self.contains_patient(id)
                    }
                    _ => false,
                }
        })
    }
}

/// The files of one type of one chunk, written as a stream into the blob store.
struct Files {
    blobs: DynBlobStore,
    tenant: crate::model::TenantId,
    job: JobId,
    /// File names are `{stem}-{part}.ndjson`.
    stem: String,
    resource_type: ResourceType,
    max_bytes: u64,
    done: Vec<OutputFile>,
    open: Option<OpenFile>,
}

/// A file being written: its body feeds a `put` running beside the worker.
struct OpenFile {
    name: String,
    count: u64,
    bytes: u64,
    buffer: BytesMut,
    sender: mpsc::Sender<io::Result<Bytes>>,
    upload: tokio::task::JoinHandle<Result<(), String>>,
}

/// Bytes gathered before they are handed to the upload.
const WRITE_BUFFER: usize = 256 * 1024;

impl Files {
    fn new(
        blobs: DynBlobStore,
        chunk: &LeasedChunk,
        stem: String,
        resource_type: ResourceType,
        settings: &WorkerSettings,
    ) -> Files {
        Files {
            blobs,
            tenant: chunk.job.tenant.clone(),
            job: chunk.job.id.clone(),
            stem,
            resource_type,
            max_bytes: settings.max_file_bytes.max(1),
            done: Vec::new(),
            open: None,
        }
    }

    async fn push(&mut self, line: Bytes) -> Result<(), Stop> {
        if self.open.is_none() {
            self.open = Some(self.start()?);
        }
        let file = self.open.as_mut().expect("opened above");
        file.count += 1;
        file.bytes += line.len() as u64;
        file.buffer.extend_from_slice(&line);
        if file.buffer.len() >= WRITE_BUFFER {
            let chunk = file.buffer.split().freeze();
            if file.sender.send(Ok(chunk)).await.is_err() {
                // The upload ended early: its error is reported when the file is closed.
                return self.close().await;
            }
        }
        if file.bytes >= self.max_bytes {
            self.close().await?;
        }
        Ok(())
    }

    fn start(&self) -> Result<OpenFile, Stop> {
        let name = format!("{}-{}.ndjson", self.stem, self.done.len() + 1);
        let key = BlobKey::new(&self.tenant, &file_path(&self.job, &name))
            .map_err(|e| Stop::Fatal(format!("export file key: {e}")))?;
        let (sender, receiver) = mpsc::channel::<io::Result<Bytes>>(4);
        let body: PutBody =
            futures::stream::unfold(receiver, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) }).boxed();
        let blobs = self.blobs.clone();
        let upload =
            tokio::spawn(async move { blobs.put(&key, NDJSON, body).await.map(drop).map_err(|e| e.to_string()) });
        Ok(OpenFile { name, count: 0, bytes: 0, buffer: BytesMut::new(), sender, upload })
    }

    async fn close(&mut self) -> Result<(), Stop> {
        let Some(mut file) = self.open.take() else { return Ok(()) };
        if !file.buffer.is_empty() {
            let _ = file.sender.send(Ok(file.buffer.split().freeze())).await;
        }
        drop(file.sender);
        match file.upload.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => return Err(Stop::Transient(format!("writing {}: {error}", file.name))),
            Err(error) => return Err(Stop::Transient(format!("writing {}: {error}", file.name))),
        }
        self.done.push(OutputFile {
            resource_type: self.resource_type.to_string(),
            name: file.name,
            count: file.count,
            bytes: file.bytes,
        });
        Ok(())
    }

    async fn finish(mut self) -> Result<Vec<OutputFile>, Stop> {
        self.close().await?;
        Ok(self.done)
    }
}

#[cfg(test)]
mod tests;
