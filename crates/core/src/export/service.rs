//! The export API behind the gateway: kick-off, status (with the completion manifest), cancel
//! and download, with authorization and the per-owner limit on running jobs.
//!
//! - **Snapshot**: a kick-off takes the store's latest change sequence as the job's snapshot; the
//!   manifest's `transactionTime` is the `lastUpdated` of that change (so every resource modified
//!   up to `transactionTime` is in the export, and none modified after). With no change yet, it
//!   is the kick-off time.
//! - **Access**: a kick-off needs `operation` permission on the base (system), on Patient or on
//!   Group, and type-level search permission without restriction on every type exported: with
//!   `_type`, each named type must be permitted (else 403); without, the export covers the types
//!   the caller may search. A caller limited to one patient's compartment (SMART `patient/`
//!   scopes) exports only at Patient level and only that patient (a `patient` parameter naming
//!   anyone else is a 403), with the types it may search there. A job is visible only to its owner (the token's `client_id`, else its
//!   `sub`): others get 404, as for a job that does not exist.
//! - **Group**: the group's active members as of the kick-off (`inactive` not true, `period`
//!   covering `transactionTime`); only `Patient` members count.
//! - **Downloads**: served by fhirmesh (`[base]/$export-file/…`, the same token), or, with
//!   [`ExportSettings::presign_expiry`] and a blob store that can presign (S3), as presigned URLs
//!   the client fetches from the blob store directly, without a token.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use fhirmesh_fhir::datetime::parse_fhir_datetime;
use fhirmesh_fhir::{LogicalId, ResourceType};
use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::auth::{Interaction, Permit};
use crate::blob::{Blob, BlobKey, DynBlobStore};
use crate::error::{ErrorCategory, FhirError};
use crate::export::job::{DynJobStore, ExportJob, ExportLevel, JobError, JobId, JobStatus, JobView, OutputFile};
use crate::export::request::{KickOff, validate};
use crate::export::worker::{file_path, job_prefix};
use crate::ports::{DynChangeLog, DynResourceStore};
use crate::service::RequestContext;

/// Export settings.
#[derive(Debug, Clone)]
pub struct ExportSettings {
    /// Jobs one owner may have running at once in a tenant; one more is a 429.
    pub max_active_per_owner: usize,
    /// Whether downloads need the same bearer token (the manifest's `requiresAccessToken`).
    pub requires_access_token: bool,
    /// How jobs are split ([`crate::export::ExportRequest::segments`]): 1 for a chunk per type,
    /// more for that many parallel scan segments over every type.
    pub segments: u32,
    /// Manifests name presigned blob-store URLs valid this long instead of fhirmesh's download
    /// URLs (when the blob store can presign; local files cannot).
    pub presign_expiry: Option<Duration>,
}

impl Default for ExportSettings {
    fn default() -> Self {
        ExportSettings { max_active_per_owner: 3, requires_access_token: false, segments: 1, presign_expiry: None }
    }
}

/// Where an export is.
#[derive(Debug, Clone, PartialEq)]
pub enum ExportStatus {
    /// Still running: `progress` for `X-Progress`.
    InProgress {
        progress: String,
    },
    Complete(Manifest),
    /// It failed: the error to answer with.
    Failed(FhirError),
}

/// A completed export's manifest (rendered by [`Manifest::to_json`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    pub job: JobId,
    pub transaction_time: OffsetDateTime,
    pub request: String,
    pub requires_access_token: bool,
    pub output: Vec<OutputFile>,
    /// Presigned download URLs by file name; a file without one is downloaded from fhirmesh.
    pub presigned: BTreeMap<String, String>,
}

impl Manifest {
    /// Whether every file has a presigned URL (so no download goes through fhirmesh).
    pub fn all_presigned(&self) -> bool {
        self.output.iter().all(|file| self.presigned.contains_key(&file.name))
    }

    /// The manifest JSON; `file_url(job, name)` is where fhirmesh serves a file that has no
    /// presigned URL.
    pub fn to_json(&self, file_url: impl Fn(&JobId, &str) -> String) -> Value {
        let output: Vec<Value> = self
            .output
            .iter()
            .map(|file| {
                let url = match self.presigned.get(&file.name) {
                    Some(url) => url.clone(),
                    None => file_url(&self.job, &file.name),
                };
                json!({"type": file.resource_type, "url": url, "count": file.count})
            })
            .collect();
        json!({
            "transactionTime": fhirmesh_fhir::datetime::format_instant(self.transaction_time),
            "request": self.request,
            "requiresAccessToken": self.requires_access_token,
            "output": output,
            "error": [],
        })
    }
}

/// The export API (in-process in `fhirmesh serve`).
#[async_trait]
pub trait ExportService: Send + Sync + 'static {
    /// Validates and stores a job; its id for the status URL.
    async fn kick_off(&self, ctx: &RequestContext, kick_off: KickOff) -> Result<JobId, FhirError>;
    async fn status(&self, ctx: &RequestContext, job: &str) -> Result<ExportStatus, FhirError>;
    /// Cancels a running job or removes a finished one, with its files.
    async fn cancel(&self, ctx: &RequestContext, job: &str) -> Result<(), FhirError>;
    /// One file of a completed job.
    async fn download(&self, ctx: &RequestContext, job: &str, file: &str) -> Result<Blob, FhirError>;
}

pub type DynExportService = Arc<dyn ExportService>;

/// [`ExportService`] over the job store, the store's change log (the snapshot point), the store
/// (Group members) and the blob store (the files).
pub struct Exports {
    jobs: DynJobStore,
    changes: DynChangeLog,
    store: DynResourceStore,
    blobs: DynBlobStore,
    settings: ExportSettings,
    /// Notified on every accepted kick-off (wakes the workers of this process).
    wake: Arc<tokio::sync::Notify>,
}

fn job_error(error: JobError) -> FhirError {
    match error {
        JobError::TooMany { active, max } => FhirError::new(
            ErrorCategory::TooManyRequests,
            format!("{active} of your exports are still running (at most {max}); retry when one has finished"),
        ),
        JobError::Unavailable(reason) => FhirError::new(ErrorCategory::Unavailable, reason),
        JobError::Internal(reason) => FhirError::internal(reason),
    }
}

fn owner(ctx: &RequestContext) -> Option<String> {
    ctx.access.principal().map(|p| p.client_id.clone().unwrap_or_else(|| p.subject.clone()))
}

fn not_found(job: &str) -> FhirError {
    FhirError::not_found(format!("there is no export job '{}'", fhirmesh_fhir::outcome::clip(job)))
}

impl Exports {
    pub fn new(
        jobs: DynJobStore,
        changes: DynChangeLog,
        store: DynResourceStore,
        blobs: DynBlobStore,
        settings: ExportSettings,
    ) -> Exports {
        Exports { jobs, changes, store, blobs, settings, wake: Arc::new(tokio::sync::Notify::new()) }
    }

    /// What this service notifies on every accepted kick-off: give it to the workers of the same
    /// process ([`crate::export::ExportWorker::with_wake`]).
    pub fn wake(&self) -> Arc<tokio::sync::Notify> {
        self.wake.clone()
    }

    /// The caller's job `job`, or 404.
    async fn owned(&self, ctx: &RequestContext, job: &str) -> Result<JobView, FhirError> {
        let id = JobId::parse(job).ok_or_else(|| not_found(job))?;
        let view = self.jobs.get(&ctx.tenant, &id).await.map_err(job_error)?.ok_or_else(|| not_found(job))?;
        if view.job.owner != owner(ctx) {
            return Err(not_found(job));
        }
        Ok(view)
    }

    /// The snapshot point: the latest change and its instant.
    async fn snapshot(&self) -> Result<(u64, OffsetDateTime), FhirError> {
        let as_of = self.changes.latest_sequence().await?;
        if as_of == 0 {
            return Ok((0, OffsetDateTime::now_utc()));
        }
        let last = self.changes.changes_after(as_of - 1, 1).await?;
        let at = last.first().map_or_else(OffsetDateTime::now_utc, |c| c.version.last_updated);
        Ok((as_of, at))
    }

    /// The types the caller may export (all of them when `_type` is absent): those it may search
    /// without limit, and, for a caller limited to `patient`'s compartment, those it may search
    /// within it.
    fn permitted_types(ctx: &RequestContext, patient: Option<&str>) -> Vec<ResourceType> {
        ResourceType::all()
            .iter()
            .copied()
            .filter(|t| match ctx.access.check(Interaction::SearchType, Some(*t)) {
                Ok(Permit::All) => true,
                Ok(Permit::PatientCompartment { patient: limit }) => Some(limit.as_str()) == patient,
                _ => false,
            })
            .collect()
    }

    /// The patient a caller's searches are limited to (SMART `patient/` scopes), if any type is.
    fn patient_limit(ctx: &RequestContext) -> Option<String> {
        ResourceType::all().iter().find_map(|t| match ctx.access.check(Interaction::SearchType, Some(*t)) {
            Ok(Permit::PatientCompartment { patient }) => Some(patient),
            _ => None,
        })
    }

    /// The active Patient members of a group at `at`.
    async fn group_members(
        &self,
        ctx: &RequestContext,
        id: &str,
        at: OffsetDateTime,
    ) -> Result<Vec<String>, FhirError> {
        let group_type = ResourceType::parse("Group").expect("Group is an R4 resource type");
        let logical = LogicalId::parse(id).map_err(|_| FhirError::not_found(format!("there is no Group '{id}'")))?;
        let version = self.store.read(&ctx.tenant, group_type, &logical).await?;
        let Some(body) = version.and_then(|v| v.body) else {
            return Err(FhirError::not_found(format!("there is no Group '{id}'")));
        };
        let group: Value =
            serde_json::from_slice(&body).map_err(|e| FhirError::internal(format!("stored Group is not JSON: {e}")))?;
        Ok(active_patient_members(&group, at))
    }
}

/// The `Patient/[id]` members of a Group that are active at `at`.
pub fn active_patient_members(group: &Value, at: OffsetDateTime) -> Vec<String> {
    let members = group.get("member").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    let mut ids = Vec::new();
    for member in members {
        if member.get("inactive").and_then(Value::as_bool) == Some(true) {
            continue;
        }
        if let Some(period) = member.get("period") {
            let bound = |key: &str| period.get(key).and_then(Value::as_str).and_then(|t| parse_fhir_datetime(t).ok());
            if bound("start").is_some_and(|start| start.start > at) || bound("end").is_some_and(|end| end.end <= at) {
                continue;
            }
        }
        let reference = member.get("entity").and_then(|e| e.get("reference")).and_then(Value::as_str);
        if let Some(id) = reference.and_then(|r| r.strip_prefix("Patient/"))
            && LogicalId::parse(id).is_ok()
            && !ids.iter().any(|known| known == id)
        {
            ids.push(id.to_owned());
        }
    }
    ids
}

/// The files of a job: by type in the order of the request, then by chunk, then by part.
impl Exports {
    /// Presigned URLs of a completed job's files, when configured and the blob store can presign
    /// (else none: fhirmesh serves them).
    async fn presign(
        &self,
        tenant: &crate::model::TenantId,
        job: &JobId,
        output: &[OutputFile],
    ) -> Result<BTreeMap<String, String>, FhirError> {
        let mut presigned = BTreeMap::new();
        let Some(expiry) = self.settings.presign_expiry else {
            return Ok(presigned);
        };
        for file in output {
            let key =
                BlobKey::new(tenant, &file_path(job, &file.name)).map_err(|e| FhirError::internal(e.to_string()))?;
            match self.blobs.presign_get(&key, expiry).await {
                Ok(Some(url)) => {
                    presigned.insert(file.name.clone(), url.url);
                }
                Ok(None) => return Ok(BTreeMap::new()),
                Err(error) => return Err(FhirError::new(ErrorCategory::Unavailable, error.to_string())),
            }
        }
        Ok(presigned)
    }
}

fn manifest_output(view: &JobView) -> Vec<OutputFile> {
    let position = |name: &str| view.job.request.types.iter().position(|t| t == name).unwrap_or(usize::MAX);
    let mut chunks: Vec<_> = view.chunks.iter().collect();
    chunks.sort_by_key(|c| c.index);
    let mut files: Vec<OutputFile> = chunks.into_iter().flat_map(|c| c.outputs.iter().cloned()).collect();
    // Stable: within a type, chunk order and part order stay.
    files.sort_by_key(|file| position(&file.resource_type));
    files
}

#[async_trait]
impl ExportService for Exports {
    async fn kick_off(&self, ctx: &RequestContext, kick_off: KickOff) -> Result<JobId, FhirError> {
        let on = match &kick_off.level {
            ExportLevel::System => None,
            ExportLevel::Patient => ResourceType::parse("Patient"),
            ExportLevel::Group { .. } => ResourceType::parse("Group"),
        };
        ctx.access.check(Interaction::Operation, on)?;
        let patient_limit = Exports::patient_limit(ctx);
        if patient_limit.is_some() && kick_off.level != ExportLevel::Patient {
            return Err(FhirError::forbidden(
                "the access token is limited to one patient: export that patient's compartment with \
                 [base]/Patient/$export",
            ));
        }
        let permitted = Exports::permitted_types(ctx, patient_limit.as_deref());
        let mut ignored = Vec::new();
        let mut request = validate(&kick_off, &permitted, &mut ignored)?;
        if let Some(patient) = patient_limit {
            if let Some(other) = request.patients.iter().find(|p| **p != patient) {
                return Err(FhirError::forbidden(format!(
                    "the access token is limited to Patient/{patient}; it cannot export Patient/{}",
                    fhirmesh_fhir::outcome::clip(other)
                )));
            }
            request.patients = vec![patient];
        }
        for name in &request.types {
            let resource_type = ResourceType::parse(name).ok_or_else(|| FhirError::internal("validated type"))?;
            if !permitted.contains(&resource_type) {
                return Err(FhirError::forbidden(format!("the access token does not permit exporting {name}")));
            }
        }
        for note in &ignored {
            tracing::info!(note, "export kick-off: lenient handling");
        }
        let (as_of, transaction_time) = self.snapshot().await?;
        if let ExportLevel::Group { id } = &request.level {
            ctx.access.check(Interaction::Read, ResourceType::parse("Group"))?;
            let members = self.group_members(ctx, id, transaction_time).await?;
            request.patients = if request.patients.is_empty() {
                members
            } else {
                request.patients.iter().filter(|p| members.contains(p)).cloned().collect()
            };
        }
        request.segments = self.settings.segments.max(1);
        let job = ExportJob {
            id: JobId::generate(),
            tenant: ctx.tenant.clone(),
            owner: owner(ctx),
            request,
            as_of,
            transaction_time,
            created_at: OffsetDateTime::now_utc(),
            status: JobStatus::Active,
            error: None,
            finished_at: None,
        };
        self.jobs.create(&job, self.settings.max_active_per_owner).await.map_err(job_error)?;
        self.wake.notify_waiters();
        tracing::info!(job = %job.id, types = job.request.types.len(), as_of, "export job accepted");
        Ok(job.id)
    }

    async fn status(&self, ctx: &RequestContext, job: &str) -> Result<ExportStatus, FhirError> {
        let view = self.owned(ctx, job).await?;
        Ok(match view.job.status {
            JobStatus::Active => {
                let done = view.chunks.iter().filter(|c| c.done).count();
                let unit = if view.job.request.segments > 1 { "segments" } else { "resource types" };
                ExportStatus::InProgress { progress: format!("{done} of {} {unit} exported", view.chunks.len()) }
            }
            JobStatus::Failed => ExportStatus::Failed(FhirError::internal(format!(
                "the export failed: {}",
                view.job.error.as_deref().unwrap_or("no reason recorded")
            ))),
            JobStatus::Completed => {
                let output = manifest_output(&view);
                let presigned = self.presign(&ctx.tenant, &view.job.id, &output).await?;
                ExportStatus::Complete(Manifest {
                    job: view.job.id.clone(),
                    transaction_time: view.job.transaction_time,
                    request: view.job.request.request_url.clone(),
                    requires_access_token: self.settings.requires_access_token,
                    output,
                    presigned,
                })
            }
        })
    }

    async fn cancel(&self, ctx: &RequestContext, job: &str) -> Result<(), FhirError> {
        let view = self.owned(ctx, job).await?;
        if !self.jobs.delete(&ctx.tenant, &view.job.id).await.map_err(job_error)? {
            return Err(not_found(job));
        }
        // A worker still writing a chunk finds its lease gone when it renews or completes, and
        // then removes the job's files again (what it wrote after this clean-up).
        if let Some(prefix) = job_prefix(&ctx.tenant, &view.job.id) {
            self.blobs
                .delete_prefix(&prefix)
                .await
                .map_err(|e| FhirError::new(ErrorCategory::Unavailable, e.to_string()))?;
        }
        Ok(())
    }

    async fn download(&self, ctx: &RequestContext, job: &str, file: &str) -> Result<Blob, FhirError> {
        let view = self.owned(ctx, job).await?;
        let listed = view.chunks.iter().flat_map(|c| c.outputs.iter()).any(|o| o.name == file);
        if view.job.status != JobStatus::Completed || !listed {
            return Err(FhirError::not_found(format!(
                "export job '{job}' has no file '{}'",
                fhirmesh_fhir::outcome::clip(file)
            )));
        }
        let key = BlobKey::new(&ctx.tenant, &file_path(&view.job.id, file))
            .map_err(|e| FhirError::internal(e.to_string()))?;
        match self.blobs.get(&key).await {
            Ok(Some(blob)) => Ok(blob),
            Ok(None) => Err(FhirError::new(ErrorCategory::Gone, format!("export file '{file}' has expired"))),
            Err(error) => Err(FhirError::new(ErrorCategory::Unavailable, error.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_members_are_the_active_patients_at_the_instant() {
        let group = json!({"resourceType": "Group", "member": [
            {"entity": {"reference": "Patient/a"}},
            {"entity": {"reference": "Patient/b"}, "inactive": true},
            {"entity": {"reference": "Patient/c"}, "period": {"start": "2030-01-01"}},
            {"entity": {"reference": "Patient/d"}, "period": {"end": "2020-01-01"}},
            {"entity": {"reference": "Patient/e"}, "period": {"start": "2020-01-01", "end": "2030-01-01"}},
            {"entity": {"reference": "Practitioner/f"}},
            {"entity": {"reference": "Patient/a"}},
            {"entity": {"display": "no reference"}},
        ]});
        let at = time::macros::datetime!(2026-06-01 00:00 UTC);
        assert_eq!(active_patient_members(&group, at), ["a", "e"]);
        assert!(active_patient_members(&json!({"resourceType": "Group"}), at).is_empty());
    }

    #[test]
    fn the_manifest_names_each_file_with_its_url_and_count() {
        let manifest = Manifest {
            job: JobId::parse("j1").expect("id"),
            transaction_time: time::macros::datetime!(2026-06-01 00:00 UTC),
            request: "http://h/$export".into(),
            requires_access_token: true,
            output: vec![OutputFile {
                resource_type: "Patient".into(),
                name: "Patient-1.ndjson".into(),
                count: 3,
                bytes: 9,
            }],
            presigned: BTreeMap::new(),
        };
        let url = |job: &JobId, name: &str| format!("http://h/$export-file/{job}/{name}");
        let json = manifest.to_json(url);
        assert_eq!(json["transactionTime"], "2026-06-01T00:00:00.000Z");
        assert_eq!(json["requiresAccessToken"], true);
        assert_eq!(
            json["output"][0],
            json!({"type": "Patient", "url": "http://h/$export-file/j1/Patient-1.ndjson", "count": 3})
        );
        assert_eq!(json["error"], json!([]));
        assert!(!manifest.all_presigned());

        let mut presigned = manifest.clone();
        presigned.presigned.insert("Patient-1.ndjson".into(), "https://s3/b/k?X-Amz-Signature=1".into());
        presigned.presigned.insert("Other.ndjson".into(), "https://s3/b/other".into());
        assert!(presigned.all_presigned());
        assert_eq!(presigned.to_json(url)["output"][0]["url"], "https://s3/b/k?X-Amz-Signature=1");
    }
}
