use serde_json::json;

use super::*;
use crate::export::job::ExportRequest;

const NOW: OffsetDateTime = time::macros::datetime!(2026-06-01 00:00 UTC);

fn request(level: ExportLevel, filters: &[&str], patients: &[&str], elements: &[&str]) -> ExportRequest {
    ExportRequest {
        level,
        types: vec!["Patient".into(), "Observation".into()],
        since: None,
        type_filters: filters.iter().map(|f| (*f).to_owned()).collect(),
        elements: elements.iter().map(|e| (*e).to_owned()).collect(),
        patients: patients.iter().map(|p| (*p).to_owned()).collect(),
        request_url: "http://h/$export".into(),
        segments: 1,
    }
}

fn selection(type_name: &str, request: &ExportRequest) -> Selection {
    let resource_type = ResourceType::parse(type_name).expect("type");
    Selection::new(resource_type, request).expect("selection")
}

fn line(selection: &Selection, resource: &Value) -> Option<Value> {
    let body = Bytes::from(resource.to_string());
    let id = resource["id"].as_str().expect("id");
    selection.line(id, &body, NOW).expect("no error").map(|line| {
        assert_eq!(line.last(), Some(&b'\n'), "a line ends with a newline");
        assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1, "one line per resource");
        serde_json::from_slice(&line).expect("JSON line")
    })
}

fn observation(id: &str, patient: &str, status: &str) -> Value {
    json!({"resourceType": "Observation", "id": id, "status": status, "code": {"text": "x"},
           "subject": {"reference": format!("Patient/{patient}")}})
}

#[test]
fn a_system_export_writes_every_resource_as_stored() {
    let request = request(ExportLevel::System, &[], &[], &[]);
    let resource = observation("o1", "p1", "final");
    assert_eq!(line(&selection("Observation", &request), &resource), Some(resource));
}

#[test]
fn a_pretty_printed_body_still_becomes_one_line() {
    let request = request(ExportLevel::System, &[], &[], &[]);
    let resource = observation("o1", "p1", "final");
    let body = Bytes::from(serde_json::to_string_pretty(&resource).expect("pretty"));
    let out = selection("Observation", &request).line("o1", &body, NOW).expect("ok").expect("selected");
    assert_eq!(out.iter().filter(|b| **b == b'\n').count(), 1);
}

#[test]
fn type_filters_keep_resources_matching_any_of_them() {
    let request = request(ExportLevel::System, &["Observation?status=final", "Observation?status=amended"], &[], &[]);
    let observations = selection("Observation", &request);
    assert!(line(&observations, &observation("o1", "p1", "final")).is_some());
    assert!(line(&observations, &observation("o2", "p1", "amended")).is_some());
    assert!(line(&observations, &observation("o3", "p1", "preliminary")).is_none());
    // Filters on another type leave this one whole.
    let patients = selection("Patient", &request);
    assert!(line(&patients, &json!({"resourceType": "Patient", "id": "p1"})).is_some());
}

#[test]
fn group_exports_keep_to_the_members_compartments() {
    let request = request(ExportLevel::Group { id: "g".into() }, &[], &["p1", "p2"], &[]);
    let observations = selection("Observation", &request);
    assert!(line(&observations, &observation("o1", "p1", "final")).is_some());
    assert!(line(&observations, &observation("o2", "p3", "final")).is_none());
    let no_subject = json!({"resourceType": "Observation", "id": "o3", "status": "final", "code": {"text": "x"}});
    assert!(line(&observations, &no_subject).is_none());
    let patients = selection("Patient", &request);
    assert!(line(&patients, &json!({"resourceType": "Patient", "id": "p2"})).is_some());
    assert!(line(&patients, &json!({"resourceType": "Patient", "id": "p3"})).is_none());
}

#[test]
fn an_empty_group_exports_nothing() {
    let request = request(ExportLevel::Group { id: "g".into() }, &[], &[], &[]);
    assert!(line(&selection("Patient", &request), &json!({"resourceType": "Patient", "id": "p1"})).is_none());
    assert!(line(&selection("Observation", &request), &observation("o1", "p1", "final")).is_none());
}

#[test]
fn a_patient_export_without_patients_takes_every_patients_compartment() {
    let request = request(ExportLevel::Patient, &[], &[], &[]);
    let observations = selection("Observation", &request);
    assert!(line(&observations, &observation("o1", "anyone", "final")).is_some());
    let group_subject = json!({"resourceType": "Observation", "id": "o2", "status": "final", "code": {"text": "x"},
                               "subject": {"reference": "Group/g"}});
    assert!(line(&observations, &group_subject).is_none(), "in no Patient's compartment");
    assert!(line(&selection("Patient", &request), &json!({"resourceType": "Patient", "id": "p9"})).is_some());
}

#[test]
fn elements_shape_each_type_by_its_own_entries() {
    let request = request(ExportLevel::System, &[], &[], &["Observation.subject", "Patient.gender"]);
    let shaped = line(&selection("Observation", &request), &observation("o1", "p1", "final")).expect("selected");
    assert!(shaped.get("subject").is_some(), "{shaped}");
    assert!(shaped.get("status").is_some(), "mandatory elements stay: {shaped}");
    assert!(shaped.get("code").is_some(), "mandatory elements stay: {shaped}");
    let patient = json!({"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "2000-01-01"});
    let shaped = line(&selection("Patient", &request), &patient).expect("selected");
    assert_eq!(shaped["gender"], "female");
    assert!(shaped.get("birthDate").is_none(), "{shaped}");
    assert_eq!(shaped["meta"]["tag"][0]["code"], "SUBSETTED", "{shaped}");
}

/// A job store holding one job of one chunk, for the worker's failure path.
#[derive(Default)]
struct OneChunk {
    state: std::sync::Mutex<OneChunkState>,
}

#[derive(Default)]
struct OneChunkState {
    attempts: u32,
    last_error: Option<String>,
    failed: Option<String>,
}

fn one_job() -> crate::export::job::ExportJob {
    crate::export::job::ExportJob {
        id: JobId::parse("job-1").expect("id"),
        tenant: crate::model::TenantId::default(),
        owner: None,
        request: request(ExportLevel::System, &[], &[], &[]),
        as_of: 1,
        transaction_time: NOW,
        created_at: NOW,
        status: crate::export::job::JobStatus::Active,
        error: None,
        finished_at: None,
    }
}

#[async_trait::async_trait]
impl crate::export::job::JobStore for OneChunk {
    async fn create(&self, _: &crate::export::job::ExportJob, _: usize) -> Result<(), crate::export::JobError> {
        Ok(())
    }
    async fn get(
        &self,
        _: &crate::model::TenantId,
        _: &JobId,
    ) -> Result<Option<crate::export::JobView>, crate::export::JobError> {
        Ok(None)
    }
    async fn lease(
        &self,
        _: &str,
        _: OffsetDateTime,
        until: OffsetDateTime,
    ) -> Result<Option<LeasedChunk>, crate::export::JobError> {
        let mut state = self.state.lock().expect("state");
        if state.failed.is_some() {
            return Ok(None);
        }
        state.attempts += 1;
        Ok(Some(LeasedChunk {
            job: one_job(),
            index: 0,
            until,
            attempt: state.attempts,
            last_error: state.last_error.clone(),
        }))
    }
    async fn renew(&self, _: &LeasedChunk, _: &str, _: OffsetDateTime) -> Result<bool, crate::export::JobError> {
        Ok(true)
    }
    async fn release(
        &self,
        _: &LeasedChunk,
        _: &str,
        error: &str,
        _: OffsetDateTime,
    ) -> Result<bool, crate::export::JobError> {
        self.state.lock().expect("state").last_error = Some(error.to_owned());
        Ok(true)
    }
    async fn complete(
        &self,
        _: &LeasedChunk,
        _: &str,
        _: &[OutputFile],
        _: OffsetDateTime,
    ) -> Result<bool, crate::export::JobError> {
        panic!("a chunk whose snapshot cannot be read never completes")
    }
    async fn fail(
        &self,
        _: &crate::model::TenantId,
        _: &JobId,
        reason: &str,
        _: OffsetDateTime,
    ) -> Result<(), crate::export::JobError> {
        self.state.lock().expect("state").failed = Some(reason.to_owned());
        Ok(())
    }
    async fn delete(&self, _: &crate::model::TenantId, _: &JobId) -> Result<bool, crate::export::JobError> {
        Ok(false)
    }
    async fn finished_before(
        &self,
        _: OffsetDateTime,
        _: usize,
    ) -> Result<Vec<(crate::model::TenantId, JobId)>, crate::export::JobError> {
        Ok(Vec::new())
    }
}

/// A snapshot that cannot be read.
struct Unreadable;

#[async_trait::async_trait]
impl crate::export::job::ExportSource for Unreadable {
    async fn snapshot_page(
        &self,
        _: &crate::model::TenantId,
        _: &ChunkPart,
        _: u64,
        _: Option<OffsetDateTime>,
        _: Option<&str>,
        _: usize,
    ) -> Result<crate::export::SnapshotPage, crate::ports::StoreError> {
        Err(crate::ports::StoreError::Unavailable("disk on fire".into()))
    }
}

/// A blob store the failing chunk never reaches.
struct NoBlobs;

#[async_trait::async_trait]
impl crate::blob::BlobStore for NoBlobs {
    async fn put(&self, _: &BlobKey, _: &str, _: PutBody) -> Result<crate::blob::BlobInfo, crate::blob::BlobError> {
        panic!("nothing is written")
    }
    async fn get_range(
        &self,
        _: &BlobKey,
        _: Option<crate::blob::ByteRange>,
    ) -> Result<Option<crate::blob::Blob>, crate::blob::BlobError> {
        Ok(None)
    }
    async fn head(&self, _: &BlobKey) -> Result<Option<crate::blob::BlobInfo>, crate::blob::BlobError> {
        Ok(None)
    }
    async fn delete(&self, _: &BlobKey) -> Result<(), crate::blob::BlobError> {
        Ok(())
    }
    async fn list(
        &self,
        _: &BlobPrefix,
        _: Option<&str>,
        _: usize,
    ) -> Result<crate::blob::BlobPage, crate::blob::BlobError> {
        Ok(crate::blob::BlobPage { entries: Vec::new(), next: None })
    }
    async fn presign_get(
        &self,
        _: &BlobKey,
        _: Duration,
    ) -> Result<Option<crate::blob::PresignedUrl>, crate::blob::BlobError> {
        Ok(None)
    }
    async fn presign_put(
        &self,
        _: &BlobKey,
        _: &str,
        _: Duration,
    ) -> Result<Option<crate::blob::PresignedUrl>, crate::blob::BlobError> {
        Ok(None)
    }
}

#[tokio::test]
async fn a_chunk_that_keeps_failing_fails_its_job_with_the_last_reason() {
    let jobs = std::sync::Arc::new(OneChunk::default());
    let settings = WorkerSettings { max_attempts: 3, ..WorkerSettings::default() };
    let counters = std::sync::Arc::new(ExportCounters::default());
    let worker =
        ExportWorker::new(jobs.clone(), std::sync::Arc::new(Unreadable), std::sync::Arc::new(NoBlobs), settings)
            .with_counters(counters.clone());
    for attempt in 1..=3 {
        assert!(worker.work_once().await, "attempt {attempt} leased the chunk");
        let state = jobs.state.lock().expect("state");
        assert!(state.failed.is_none(), "not failed after attempt {attempt}");
        assert!(state.last_error.as_deref().is_some_and(|e| e.contains("disk on fire")), "released with its reason");
    }
    // The fourth lease is past the limit: the job fails, naming what went wrong.
    assert!(worker.work_once().await);
    let failed = jobs.state.lock().expect("state").failed.clone().expect("the job failed");
    assert!(failed.contains("exporting Patient failed 3 times"), "{failed}");
    assert!(failed.contains("disk on fire"), "{failed}");
    assert!(!worker.work_once().await, "nothing left to lease");
    // Three tries given back, then the failure; nothing written, nothing in progress.
    let mut text = String::new();
    counters.render(&mut text);
    for line in [
        "fhirmesh_export_resources_total 0\n",
        "fhirmesh_export_chunks_in_progress 0\n",
        "fhirmesh_export_chunks_total{outcome=\"retried\"} 3\n",
        "fhirmesh_export_chunks_total{outcome=\"failed\"} 1\n",
        "fhirmesh_export_chunks_total{outcome=\"completed\"} 0\n",
    ] {
        assert!(text.contains(line), "{line} missing from:\n{text}");
    }
}
