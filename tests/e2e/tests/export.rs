//! Bulk Data `$export` end to end against the embedded server: kick-off, status, manifest,
//! downloads; what is exported is exactly the snapshot at `transactionTime` (writes after the
//! kick-off never show), narrowed by `_type`, `_since`, `_typeFilter`, `_elements`, and by the
//! Patient compartment at Patient and Group level; cancel, the per-client limit, bad parameters,
//! and a worker that dies holding a chunk.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use fhirmesh_testkit::{TestServer, status_and_json};
use serde_json::{Value, json};

/// Kicks off an export (GET, or POST with `parameters`); returns (status, Content-Location, body).
async fn kick_off(server: &TestServer, path: &str, parameters: Option<Value>) -> (u16, Option<String>, Value) {
    let request = match parameters {
        Some(body) => {
            server.client.post(server.url(path)).header("content-type", "application/fhir+json").body(body.to_string())
        }
        None => server.client.get(server.url(path)),
    };
    let response = request.header("prefer", "respond-async").send().await.expect("kick-off sent");
    let location = response.headers().get("content-location").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let (status, body) = status_and_json(response).await;
    (status, location, body)
}

/// Polls the status URL until the manifest (at most 30 s); returns it.
async fn manifest(server: &TestServer, status_url: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let response = server.client.get(status_url).send().await.expect("status sent");
        match response.status().as_u16() {
            200 => {
                let content_type = response.headers().get("content-type").and_then(|v| v.to_str().ok());
                assert_eq!(content_type, Some("application/json"));
                return response.json().await.expect("manifest JSON");
            }
            202 => {
                assert!(response.headers().get("x-progress").is_some(), "202 carries X-Progress");
                assert!(response.headers().get("retry-after").is_some(), "202 carries Retry-After");
            }
            other => panic!("status answered {other}: {}", response.text().await.unwrap_or_default()),
        }
        assert!(Instant::now() < deadline, "the export did not complete in 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every exported resource by type, from the manifest's files (checking each file's count).
async fn exported(server: &TestServer, manifest: &Value) -> BTreeMap<String, Vec<Value>> {
    let mut by_type: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for output in manifest["output"].as_array().expect("output") {
        let url = output["url"].as_str().expect("url");
        let response = server.client.get(url).header("accept", "application/fhir+ndjson").send().await.expect("get");
        assert_eq!(response.status(), 200, "{url}");
        let content_type = response.headers().get("content-type").and_then(|v| v.to_str().ok()).map(str::to_owned);
        assert_eq!(content_type.as_deref(), Some("application/fhir+ndjson"));
        let text = response.text().await.expect("body");
        let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).expect("one resource per line")).collect();
        assert_eq!(output["count"], lines.len(), "{url}");
        for line in &lines {
            assert_eq!(line["resourceType"], output["type"], "{url}");
        }
        by_type.entry(output["type"].as_str().expect("type").to_owned()).or_default().extend(lines);
    }
    by_type
}

fn ids(resources: &[Value]) -> BTreeSet<String> {
    resources.iter().map(|r| r["id"].as_str().expect("id").to_owned()).collect()
}

async fn create(server: &TestServer, resource: Value) -> Value {
    let (status, created) = server.create(&resource).await;
    assert_eq!(status, 201, "{created}");
    created
}

async fn send(server: &TestServer, method: reqwest::Method, path: &str, body: Option<&Value>) -> (u16, Value) {
    let mut request = server.client.request(method, server.url(path));
    if let Some(body) = body {
        request = request.header("content-type", "application/fhir+json").body(body.to_string());
    }
    status_and_json(request.send().await.expect("sent")).await
}

fn observation(patient: &str, status: &str) -> Value {
    json!({"resourceType": "Observation", "status": status, "code": {"text": "pulse"},
           "subject": {"reference": format!("Patient/{patient}")}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_system_export_is_the_snapshot_at_its_transaction_time() {
    // No workers until the later writes are in: the export reads after them, whatever the timing.
    let server = TestServer::start_with(|config| config.export.workers = 0).await;
    let mut patients = BTreeMap::new();
    for n in 0..5 {
        let created = create(&server, json!({"resourceType": "Patient", "name": [{"family": format!("P{n}")}]})).await;
        patients.insert(created["id"].as_str().expect("id").to_owned(), created);
    }
    let first = patients.keys().next().cloned().expect("a patient");
    let mut observations = BTreeMap::new();
    for id in patients.keys() {
        let created = create(&server, observation(id, "final")).await;
        observations.insert(created["id"].as_str().expect("id").to_owned(), created);
    }
    // Deleted before the kick-off: not exported.
    let gone = observations.keys().next().cloned().expect("an observation");
    let (status, _) = send(&server, reqwest::Method::DELETE, &format!("Observation/{gone}"), None).await;
    assert_eq!(status, 204);
    observations.remove(&gone);

    let (status, location, body) = kick_off(&server, "$export?_type=Patient,Observation", None).await;
    assert_eq!(status, 202, "{body}");
    let location = location.expect("Content-Location");
    assert!(location.starts_with(&format!("{}/$export-status/", server.base)), "{location}");

    // Written after the kick-off: never exported, whenever the worker reads.
    let mut changed = patients[&first].clone();
    changed["name"][0]["family"] = json!("Changed");
    let (status, _) = send(&server, reqwest::Method::PUT, &format!("Patient/{first}"), Some(&changed)).await;
    assert_eq!(status, 200);
    create(&server, json!({"resourceType": "Patient", "name": [{"family": "Later"}]})).await;
    let last = patients.keys().last().cloned().expect("a patient");
    let (status, _) = send(&server, reqwest::Method::DELETE, &format!("Patient/{last}"), None).await;
    assert_eq!(status, 204);

    let mut server = server;
    server.config.export.workers = 2;
    let old_base = server.base.clone();
    let server = server.restart().await;
    let location = location.replace(&old_base, &server.base);
    let manifest = manifest(&server, &location).await;
    assert_eq!(manifest["request"], format!("{old_base}/$export?_type=Patient,Observation"));
    assert_eq!(manifest["requiresAccessToken"], false);
    assert_eq!(manifest["error"], json!([]));
    let transaction_time = manifest["transactionTime"].as_str().expect("transactionTime");
    let exported = exported(&server, &manifest).await;
    assert_eq!(exported.keys().collect::<Vec<_>>(), ["Observation", "Patient"]);
    // Every resource exactly as it was stored at the snapshot: the versions written before it.
    let by_id = |resources: &[Value]| -> BTreeMap<String, Value> {
        resources.iter().map(|r| (r["id"].as_str().expect("id").to_owned(), r.clone())).collect()
    };
    assert_eq!(by_id(&exported["Patient"]), patients, "Patients at the snapshot");
    assert_eq!(by_id(&exported["Observation"]), observations, "Observations at the snapshot");
    for resource in exported.values().flatten() {
        let updated = resource["meta"]["lastUpdated"].as_str().expect("lastUpdated");
        assert!(updated <= transaction_time, "{updated} after transactionTime {transaction_time}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn type_since_type_filter_and_elements_narrow_the_export() {
    let server = TestServer::start().await;
    let early =
        create(&server, json!({"resourceType": "Patient", "gender": "female", "birthDate": "1990-01-01"})).await;
    let early_id = early["id"].as_str().expect("id").to_owned();
    let final_obs = create(&server, observation(&early_id, "final")).await;
    create(&server, observation(&early_id, "preliminary")).await;
    let organization = create(&server, json!({"resourceType": "Organization", "name": "Org"})).await;
    let since = organization["meta"]["lastUpdated"].as_str().expect("lastUpdated").to_owned();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let late = create(&server, json!({"resourceType": "Patient", "gender": "male"})).await;

    // _type: only the named types.
    let (_, location, _) = kick_off(&server, "$export?_type=Organization", None).await;
    let only = exported(&server, &manifest(&server, &location.expect("location")).await).await;
    assert_eq!(only.keys().collect::<Vec<_>>(), ["Organization"]);

    // _since: only what changed after it (all types).
    let (_, location, _) = kick_off(&server, &format!("$export?_since={}", since.replace('+', "%2B")), None).await;
    let recent = exported(&server, &manifest(&server, &location.expect("location")).await).await;
    assert_eq!(recent.keys().collect::<Vec<_>>(), ["Patient"], "{recent:?}");
    assert_eq!(ids(&recent["Patient"]), BTreeSet::from([late["id"].as_str().expect("id").to_owned()]));

    // _typeFilter: Observations matching it; the other types whole. _elements shapes the Patients.
    let filter = "Observation%3Fstatus%3Dfinal";
    let (status, location, body) = kick_off(
        &server,
        &format!("$export?_type=Observation,Patient&_typeFilter={filter}&_elements=Patient.gender"),
        None,
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let filtered = exported(&server, &manifest(&server, &location.expect("location")).await).await;
    assert_eq!(ids(&filtered["Observation"]), BTreeSet::from([final_obs["id"].as_str().expect("id").to_owned()]));
    assert_eq!(filtered["Patient"].len(), 2);
    for patient in &filtered["Patient"] {
        assert!(patient.get("gender").is_some() && patient.get("birthDate").is_none(), "{patient}");
        // Tagged when something was left out (the early one had a birthDate).
        let subsetted = patient["meta"]["tag"][0]["code"] == "SUBSETTED";
        assert_eq!(subsetted, patient["id"] == early["id"], "{patient}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patient_and_group_exports_keep_to_the_patient_compartments() {
    let server = TestServer::start().await;
    let mut patient_ids = Vec::new();
    for family in ["A", "B", "C"] {
        let created = create(&server, json!({"resourceType": "Patient", "name": [{"family": family}]})).await;
        patient_ids.push(created["id"].as_str().expect("id").to_owned());
    }
    let mut observation_of = BTreeMap::new();
    for id in &patient_ids {
        let created = create(&server, observation(id, "final")).await;
        observation_of.insert(id.clone(), created["id"].as_str().expect("id").to_owned());
    }
    create(&server, json!({"resourceType": "Organization", "name": "not in any compartment"})).await;
    let group = create(
        &server,
        json!({"resourceType": "Group", "type": "person", "actual": true, "member": [
            {"entity": {"reference": format!("Patient/{}", patient_ids[0])}},
            {"entity": {"reference": format!("Patient/{}", patient_ids[1])}, "inactive": true},
            {"entity": {"reference": format!("Patient/{}", patient_ids[2])}},
        ]}),
    )
    .await;
    let group_id = group["id"].as_str().expect("id");

    let (status, location, body) = kick_off(&server, &format!("Group/{group_id}/$export"), None).await;
    assert_eq!(status, 202, "{body}");
    let members = exported(&server, &manifest(&server, &location.expect("location")).await).await;
    let expected: BTreeSet<String> = [patient_ids[0].clone(), patient_ids[2].clone()].into();
    assert_eq!(ids(&members["Patient"]), expected, "active members only");
    let expected_obs: BTreeSet<String> = expected.iter().map(|p| observation_of[p].clone()).collect();
    assert_eq!(ids(&members["Observation"]), expected_obs);
    assert!(!members.contains_key("Organization"), "not in the Patient compartment: {:?}", members.keys());
    // Group is in the Patient compartment (by `member`): the group itself references its members.
    assert_eq!(ids(&members["Group"]), BTreeSet::from([group_id.to_owned()]));

    // Patient level: every patient's compartment; POST with `patient` narrows it.
    let (_, location, _) = kick_off(&server, "Patient/$export", None).await;
    let all = exported(&server, &manifest(&server, &location.expect("location")).await).await;
    assert_eq!(ids(&all["Patient"]).len(), 3);
    assert_eq!(ids(&all["Observation"]).len(), 3);
    let parameters = json!({"resourceType": "Parameters", "parameter": [
        {"name": "patient", "valueReference": {"reference": format!("Patient/{}", patient_ids[1])}},
        {"name": "_type", "valueString": "Observation"},
    ]});
    let (status, location, body) = kick_off(&server, "Patient/$export", Some(parameters)).await;
    assert_eq!(status, 202, "{body}");
    let one = exported(&server, &manifest(&server, &location.expect("location")).await).await;
    assert_eq!(one.keys().collect::<Vec<_>>(), ["Observation"]);
    assert_eq!(ids(&one["Observation"]), BTreeSet::from([observation_of[&patient_ids[1]].clone()]));

    let (status, _, body) = kick_off(&server, "Group/nothere/$export", None).await;
    assert_eq!(status, 404, "{body}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_kick_offs_are_refused_with_what_is_wrong() {
    let server = TestServer::start().await;
    let (_, metadata) = server.get("metadata").await;
    assert_eq!(metadata["instantiates"][0], "http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data");
    assert_eq!(metadata["rest"][0]["operation"][0]["name"], "export", "{}", metadata["rest"][0]["operation"]);
    let group = metadata["rest"][0]["resource"].as_array().expect("resources").iter().find(|r| r["type"] == "Group");
    let operations: Vec<(&str, &str)> = group.expect("Group")["operation"]
        .as_array()
        .expect("operations")
        .iter()
        .map(|o| (o["name"].as_str().unwrap_or_default(), o["definition"].as_str().unwrap_or_default()))
        .collect();
    assert_eq!(
        operations,
        vec![
            ("validate", "http://hl7.org/fhir/OperationDefinition/Resource-validate"),
            ("export", "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export")
        ]
    );
    let response = server.client.get(server.url("$export")).send().await.expect("sent");
    let (status, body) = status_and_json(response).await;
    assert_eq!(status, 400, "no Prefer: respond-async");
    assert!(body["issue"][0]["diagnostics"].as_str().is_some_and(|d| d.contains("respond-async")), "{body}");
    for (query, expected) in [
        ("_outputFormat=text/csv", "_outputFormat 'text/csv'"),
        ("_type=Nope", "unknown resource type 'Nope'"),
        ("_since=yesterday", "_since 'yesterday'"),
        ("_typeFilter=Patient%3F_has%3AObservation%3Asubject%3Acode%3Dx", "_has"),
        ("includeAssociatedData=LatestProvenanceResources", "includeAssociatedData"),
    ] {
        let (status, location, body) = kick_off(&server, &format!("$export?{query}"), None).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert!(location.is_none());
        assert_eq!(body["resourceType"], "OperationOutcome");
        let text = body["issue"][0]["diagnostics"].as_str().unwrap_or_default();
        assert!(text.contains(expected), "{query}: {body}");
    }
    let (status, _, body) = kick_off(&server, "Patient/$export?_type=Organization", None).await;
    assert_eq!(status, 400, "{body}");
    let (status, _, body) = kick_off(&server, "$export", Some(json!({"resourceType": "Patient"}))).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["issue"][0]["expression"][0], "Parameters");
    let (status, body) = server.get("$export-status/not-a-job").await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = server.get("$export-file/not-a-job/Patient-1.ndjson").await;
    assert_eq!(status, 404, "{body}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_exports_are_limited_per_client_and_can_be_cancelled() {
    // No workers: jobs stay running (in the mesh, exporters elsewhere do the work).
    let server = TestServer::start_with(|config| {
        config.export.workers = 0;
        config.export.max_active_per_owner = 1;
    })
    .await;
    create(&server, json!({"resourceType": "Patient"})).await;
    let (status, location, _) = kick_off(&server, "$export?_type=Patient", None).await;
    assert_eq!(status, 202);
    let location = location.expect("location");
    let response = server.client.get(&location).send().await.expect("status");
    assert_eq!(response.status(), 202);
    assert_eq!(
        response.headers().get("x-progress").and_then(|v| v.to_str().ok()),
        Some("0 of 1 resource types exported")
    );

    let response =
        server.client.get(server.url("$export")).header("prefer", "respond-async").send().await.expect("sent");
    assert_eq!(response.status(), 429);
    assert!(response.headers().get("retry-after").is_some());

    let response = server.client.delete(&location).send().await.expect("cancel");
    assert_eq!(response.status(), 202);
    let response = server.client.get(&location).send().await.expect("status");
    assert_eq!(response.status(), 404, "a cancelled job is gone");
    let (status, _, _) = kick_off(&server, "$export?_type=Patient", None).await;
    assert_eq!(status, 202, "the cancelled job no longer counts");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_held_by_a_dead_worker_is_taken_over_and_exported_once() {
    let server = TestServer::start_with(|config| config.export.workers = 0).await;
    let mut written = BTreeSet::new();
    for n in 0..30 {
        let created = create(&server, json!({"resourceType": "Patient", "name": [{"family": format!("W{n}")}]})).await;
        written.insert(created["id"].as_str().expect("id").to_owned());
    }
    let (status, location, _) = kick_off(&server, "$export?_type=Patient", None).await;
    assert_eq!(status, 202);
    let location = location.expect("location");
    // A worker that leases the chunk and dies: its lease runs for one second.
    let jobs = fhirmesh_store_sqlite::SqliteJobStore::open(&server.data_dir().join("jobs.db")).expect("jobs.db");
    let now = time::OffsetDateTime::now_utc();
    let leased = fhirmesh_core::export::JobStore::lease(&jobs, "dead-worker", now, now + Duration::from_secs(1))
        .await
        .expect("lease")
        .expect("a chunk to lease");
    let part = &leased.job.request.chunks()[leased.index as usize];
    assert_eq!(part.types.iter().map(|t| t.as_str()).collect::<Vec<_>>(), ["Patient"]);

    // A server with workers, on the same data: it takes the chunk once the lease has ended.
    let mut server = server;
    server.config.export.workers = 2;
    let server = server.restart().await;
    let manifest = manifest(
        &server,
        &location.replace(&location[..location.find("/$export-status").expect("path")], &server.base),
    )
    .await;
    let exported = exported(&server, &manifest).await;
    let exported_ids: Vec<String> =
        exported["Patient"].iter().map(|p| p["id"].as_str().expect("id").to_owned()).collect();
    assert_eq!(exported_ids.len(), written.len(), "nothing exported twice");
    assert_eq!(exported_ids.into_iter().collect::<BTreeSet<_>>(), written, "nothing missing");
    // The dead worker's lease is gone: it can neither renew nor complete.
    let later = time::OffsetDateTime::now_utc();
    assert!(!fhirmesh_core::export::JobStore::renew(&jobs, &leased, "dead-worker", later).await.expect("renew"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_export_client_downloads_every_file_with_the_manifest() {
    use fhirmesh_bench::export::{ExportOptions, ExportTarget, run};
    let server = TestServer::start_with(|config| config.export.max_file_bytes = 2048).await;
    let mut written = BTreeSet::new();
    for n in 0..40 {
        let created =
            create(&server, json!({"resourceType": "Patient", "name": [{"family": format!("Client{n}")}]})).await;
        written.insert(created["id"].as_str().expect("id").to_owned());
    }
    let out = tempfile::tempdir().expect("output directory");
    let options = ExportOptions {
        base_url: server.base.clone(),
        level: ExportTarget::System,
        types: vec!["Patient".into()],
        since: None,
        type_filters: Vec::new(),
        elements: Vec::new(),
        token: None,
        out: out.path().to_path_buf(),
        poll_interval: Duration::from_millis(20),
        timeout: Duration::from_secs(30),
        progress: false,
    };
    let summary = run(&options).await.expect("the export runs");
    assert_eq!(summary.resources, 40);
    assert!(summary.files > 1, "2 KiB files: the 40 Patients span several ({})", summary.files);
    let mut exported = BTreeSet::new();
    for path in &summary.paths {
        let text = std::fs::read_to_string(path).expect("a downloaded file");
        for line in text.lines() {
            let patient: Value = serde_json::from_str(line).expect("a resource per line");
            assert!(exported.insert(patient["id"].as_str().expect("id").to_owned()), "exported twice: {patient}");
        }
    }
    assert_eq!(exported, written);
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(out.path().join("manifest.json")).expect("manifest.json")).expect("JSON");
    assert_eq!(manifest["output"].as_array().map(Vec::len), Some(summary.files));

    // A refused kick-off is an error naming the reason.
    let mut bad = options.clone();
    bad.types = vec!["Nope".into()];
    let error = run(&bad).await.expect_err("refused");
    assert!(format!("{error:#}").contains("unknown resource type 'Nope'"), "{error:#}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_export_holds_its_own_data_and_its_job_is_its_own() {
    let server = TestServer::start_with(|config| config.tenancy.enabled = true).await;
    for (tenant, family) in [("a", "Alpha"), ("b", "Beta")] {
        let patient = json!({"resourceType": "Patient", "name": [{"family": family}]});
        let (status, body) =
            send(&server, reqwest::Method::POST, &format!("tenant/{tenant}/Patient"), Some(&patient)).await;
        assert_eq!(status, 201, "{body}");
    }
    let (status, location, body) = kick_off(&server, "tenant/a/$export?_type=Patient", None).await;
    assert_eq!(status, 202, "{body}");
    let location = location.expect("location");
    assert!(location.contains("/tenant/a/$export-status/"), "{location}");
    let exported = exported(&server, &manifest(&server, &location).await).await;
    let families: Vec<&str> = exported["Patient"].iter().filter_map(|p| p["name"][0]["family"].as_str()).collect();
    assert_eq!(families, ["Alpha"], "only tenant a's data");
    // Tenant b cannot see, download or cancel tenant a's job.
    let foreign = location.replace("/tenant/a/", "/tenant/b/");
    let (status, _) = status_and_json(server.client.get(&foreign).send().await.expect("status")).await;
    assert_eq!(status, 404);
    let (status, _) = status_and_json(server.client.delete(&foreign).send().await.expect("cancel")).await;
    assert_eq!(status, 404);
    let response = server.client.get(&location).send().await.expect("status");
    assert_eq!(response.status(), 200, "still there for its owner");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_exports_expire_with_their_files() {
    let server = TestServer::start().await;
    create(&server, json!({"resourceType": "Patient"})).await;
    let (_, location, _) = kick_off(&server, "$export?_type=Patient", None).await;
    let location = location.expect("location");
    let manifest = manifest(&server, &location).await;
    let blobs_dir = server.data_dir().join("blobs");
    let files_on_disk = || walk(&blobs_dir).into_iter().filter(|p| p.to_string_lossy().contains("/export/")).count();
    assert!(files_on_disk() >= 1, "the export's file is on disk");

    // A worker whose expiry has passed removes the job and its files.
    let data = server.data_dir().to_path_buf();
    let jobs: fhirmesh_core::export::DynJobStore =
        std::sync::Arc::new(fhirmesh_store_sqlite::SqliteJobStore::open(&data.join("jobs.db")).expect("jobs.db"));
    let store = fhirmesh_resource::open_sqlite_store(&data, false).expect("store");
    let blobs: fhirmesh_core::blob::DynBlobStore =
        std::sync::Arc::new(fhirmesh_blob::LocalBlobStore::open(&blobs_dir).await.expect("blobs"));
    let settings = fhirmesh_core::export::WorkerSettings { output_expiry: Duration::ZERO, ..Default::default() };
    fhirmesh_core::export::ExportWorker::new(jobs, store, blobs, settings).remove_expired().await;
    assert_eq!(files_on_disk(), 0, "the files are removed");
    let response = server.client.get(&location).send().await.expect("status");
    assert_eq!(response.status(), 404, "the job is removed");
    let url = manifest["output"][0]["url"].as_str().expect("url");
    let response = server.client.get(url).send().await.expect("download");
    assert_eq!(response.status(), 404, "its files are no longer served");
    server.stop().await;
}

/// Every file under `dir`, recursively.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(walk(&path));
        } else {
            found.push(path);
        }
    }
    found
}
