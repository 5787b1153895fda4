//! `fhirmesh load` against the embedded server: the synthetic data set is deterministic, valid
//! FHIR R4 (the server validates every resource against the official schema) and searchable;
//! NDJSON and Bundle files load, and bad input is counted and named, not fatal.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use fhirmesh_bench::client::BaseUrl;
use fhirmesh_bench::load::{
    LoadConfig, LoadSummary, ORGANIZATIONS, PRACTITIONERS, SYNTHETIC_IDENTIFIER_SYSTEM, Source, SyntheticConfig, run,
    synthetic_directory, synthetic_patient_bundle, synthetic_patient_entries,
};
use fhirmesh_testkit::{TestServer, status_and_json};
use serde_json::{Value, json};

fn config(server: &TestServer, source: Source) -> LoadConfig {
    LoadConfig {
        base: BaseUrl::parse(&server.base).expect("base url"),
        source,
        concurrency: 4,
        bundle_size: 2,
        progress: false,
    }
}

/// GET with the load's consistency token, so the search index has caught up with it; retried
/// for a while in case the server's wait is shorter than the indexer's backlog.
async fn search(server: &TestServer, path: &str, summary: &LoadSummary, expected_total: u64) -> Value {
    let mut body = Value::Null;
    for _ in 0..50 {
        let mut request = server.client.get(server.url(path));
        if let Some(token) = summary.consistency_token {
            request = request.header("x-consistency-token", token.to_string());
        }
        let (status, found) = status_and_json(request.send().await.expect("search sent")).await;
        assert_eq!(status, 200, "{path}: {found}");
        if found["total"] == expected_total {
            return found;
        }
        body = found;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("{path}: expected total {expected_total}, last answer {body}");
}

/// A fresh directory under the system temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let path = std::env::temp_dir().join(format!("fhirmesh-bench-{name}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path).expect("temporary directory");
        TempDir(path)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).expect("temporary file written");
        path
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn entries(bundle: &Value) -> &Vec<Value> {
    bundle["entry"].as_array().expect("a Bundle with entries")
}

#[test]
fn the_generator_is_deterministic() {
    let a = synthetic_patient_bundle(42, 3).to_string();
    assert_eq!(a, synthetic_patient_bundle(42, 3).to_string());
    assert_ne!(a, synthetic_patient_bundle(42, 4).to_string());
    assert_ne!(a, synthetic_patient_bundle(43, 3).to_string());
    assert_eq!(synthetic_directory(42).to_string(), synthetic_directory(42).to_string());
    assert_ne!(synthetic_directory(42).to_string(), synthetic_directory(43).to_string());
    // Order of generation does not matter.
    let later: Vec<String> = (0..5).rev().map(|i| synthetic_patient_bundle(42, i).to_string()).collect();
    assert_eq!(later[1], a);
}

#[test]
fn patient_bundles_have_the_promised_shape() {
    let mut families = BTreeMap::new();
    for index in 0..200 {
        let bundle = synthetic_patient_bundle(1, index);
        assert_eq!(bundle["type"], "transaction");
        let mut counts = BTreeMap::new();
        for entry in entries(&bundle) {
            let resource_type = entry["resource"]["resourceType"].as_str().expect("resourceType");
            *counts.entry(resource_type).or_insert(0) += 1;
            assert_eq!(entry["request"], json!({"method": "POST", "url": resource_type}));
            assert!(entry["fullUrl"].as_str().is_some_and(|u| u.starts_with("urn:uuid:")), "{entry}");
        }
        assert_eq!(counts.get("Patient"), Some(&1));
        assert!((2..=6).contains(&counts["Encounter"]), "{counts:?}");
        assert!((5..=25).contains(&counts["Observation"]), "{counts:?}");
        assert!((1..=5).contains(&counts["Condition"]), "{counts:?}");
        assert!((1..=5).contains(&counts["MedicationRequest"]), "{counts:?}");
        let patient = &entries(&bundle)[0]["resource"];
        assert_eq!(patient["identifier"][0]["system"], SYNTHETIC_IDENTIFIER_SYSTEM);
        assert_eq!(patient["identifier"][0]["value"], format!("1-{index}"));
        *families.entry(patient["name"][0]["family"].as_str().expect("family").to_owned()).or_insert(0) += 1;
    }
    // Names come from small tables: families repeat, so a string search finds several.
    assert!(families.values().any(|&n| n >= 5), "{families:?}");
    let directory = synthetic_directory(1);
    assert_eq!(entries(&directory).len(), ORGANIZATIONS + PRACTITIONERS);
    assert_eq!(entries(&directory)[0]["request"], json!({"method": "PUT", "url": "Organization/synth-org-0"}));
}

#[test]
fn every_generated_resource_is_valid_r4() {
    use fhirmesh_fhir::validate::validate_resource;
    let mut codes = std::collections::BTreeSet::new();
    for seed in [1, 2] {
        for entry in entries(&synthetic_directory(seed)) {
            let issues = validate_resource(&entry["resource"]);
            assert!(issues.is_empty(), "directory {seed}: {issues:?} in {}", entry["resource"]);
        }
        for index in 0..300 {
            for entry in entries(&synthetic_patient_bundle(seed, index)) {
                let resource = &entry["resource"];
                let issues = validate_resource(resource);
                assert!(issues.is_empty(), "patient {seed}-{index}: {issues:?} in {resource}");
                for concept in [&resource["code"], &resource["medicationCodeableConcept"], &resource["class"]] {
                    let coding = concept["coding"][0].as_object().map_or(concept, |_| &concept["coding"][0]);
                    if let Some(code) = coding["code"].as_str() {
                        codes.insert(code.to_owned());
                    }
                }
            }
        }
    }
    // The tables are all used: every condition, medication, lab and vital sign, every class.
    for code in ["44054006", "65363002", "895994", "308182", "777-3", "85354-9", "8302-2", "AMB", "EMER", "IMP"] {
        assert!(codes.contains(code), "{code} never generated");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a test: cargo test -p fhirmesh-bench --test load -- --ignored --nocapture"]
async fn load_throughput() {
    let patients: usize = std::env::var("FHIRMESH_LOAD_PATIENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let sizes: Vec<usize> = (0..patients).map(|i| synthetic_patient_entries(1, i)).collect();
    let (min, max) = (sizes.iter().min().copied().unwrap_or(0), sizes.iter().max().copied().unwrap_or(0));
    let mean = sizes.iter().sum::<usize>() as f64 / patients as f64;
    eprintln!("seed 1, {patients} patients: entries per bundle min {min} mean {mean:.1} max {max}");
    let server = TestServer::start().await;
    let mut config = config(&server, Source::Synthetic(SyntheticConfig { seed: 1, patients }));
    config.concurrency = 8;
    let summary = run(config).await.expect("load runs");
    eprintln!("{summary}");
    eprintln!("{}", summary.to_json());
    assert_eq!(summary.errors, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synthetic_data_loads_without_errors_and_is_searchable() {
    const SEED: u64 = 11;
    const PATIENTS: usize = 30;
    let server = TestServer::start().await;
    let summary = run(config(&server, Source::Synthetic(SyntheticConfig { seed: SEED, patients: PATIENTS })))
        .await
        .expect("load runs");
    assert_eq!(summary.errors, 0, "{summary}");
    let expected: usize = (0..PATIENTS).map(|i| synthetic_patient_entries(SEED, i)).sum::<usize>() + 70;
    assert_eq!(summary.resources, expected as u64, "{summary}");
    assert_eq!(summary.requests, PATIENTS as u64 + 1);
    assert!(summary.consistency_token.is_some());
    eprintln!("{summary}");

    // Every resource is stored: count each type.
    let mut by_type: BTreeMap<String, u64> = BTreeMap::new();
    let mut families: BTreeMap<String, u64> = BTreeMap::new();
    for index in 0..PATIENTS {
        let bundle = synthetic_patient_bundle(SEED, index);
        for entry in entries(&bundle) {
            *by_type.entry(entry["resource"]["resourceType"].as_str().expect("type").to_owned()).or_default() += 1;
        }
        let family = entries(&bundle)[0]["resource"]["name"][0]["family"].as_str().expect("family").to_owned();
        *families.entry(family).or_default() += 1;
    }
    by_type.insert("Organization".into(), ORGANIZATIONS as u64);
    by_type.insert("Practitioner".into(), PRACTITIONERS as u64);
    for (resource_type, count) in &by_type {
        search(&server, &format!("{resource_type}?_summary=count"), &summary, *count).await;
    }

    // The Patient is found by its synthetic identifier, and points at the directory.
    let found =
        search(&server, &format!("Patient?identifier={SYNTHETIC_IDENTIFIER_SYSTEM}|{SEED}-7"), &summary, 1).await;
    let patient = &found["entry"][0]["resource"];
    let bundle = synthetic_patient_bundle(SEED, 7);
    let generated = &entries(&bundle)[0]["resource"];
    assert_eq!(patient["name"], generated["name"]);
    assert_eq!(patient["birthDate"], generated["birthDate"]);
    let gp = patient["generalPractitioner"][0]["reference"].as_str().expect("a general practitioner");
    let (status, practitioner) = server.get(gp).await;
    assert_eq!(status, 200, "{gp}: {practitioner}");

    // Its Observations refer to it (urn:uuid references were rewritten).
    let id = patient["id"].as_str().expect("id");
    let observations = by_type_of(&bundle, "Observation");
    search(&server, &format!("Observation?subject=Patient/{id}&_summary=count"), &summary, observations).await;

    // A family shared by several patients finds all of them.
    let (family, count) = families.iter().max_by_key(|(_, n)| **n).expect("families");
    assert!(*count >= 2, "{families:?}");
    search(&server, &format!("Patient?family={family}&_summary=count"), &summary, *count).await;
    server.stop().await;
}

fn by_type_of(bundle: &Value, resource_type: &str) -> u64 {
    entries(bundle).iter().filter(|e| e["resource"]["resourceType"] == resource_type).count() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ndjson_lines_load_and_a_bad_line_is_named() {
    let server = TestServer::start().await;
    let dir = TempDir::new("ndjson");
    let lines = [
        r#"{"resourceType":"Patient","id":"nd-1","name":[{"family":"Ndjson"}]}"#,
        r#"{"resourceType":"Patient","name":[{"family":"Ndjson"}],"gender":"female"}"#,
        r#"{"resourceType":"Patient","name":[{"family":"Ndjson"}"#,
        "",
        r#"{"resourceType":"Observation","status":"final","code":{"text":"x"},"subject":{"reference":"Patient/nd-1"}}"#,
    ];
    let path = dir.write("data.ndjson", &(lines.join("\n") + "\n"));
    let summary = run(config(&server, Source::Files(vec![path]))).await.expect("load runs");
    assert_eq!((summary.resources, summary.errors), (3, 1), "{summary}");
    assert_eq!(summary.requests, 2, "3 resources in batches of 2: {summary}");
    assert_eq!(summary.first_errors.len(), 1);
    assert!(summary.first_errors[0].contains("data.ndjson:3: not valid JSON"), "{}", summary.first_errors[0]);
    let (status, patient) = server.get("Patient/nd-1").await;
    assert_eq!(status, 200, "{patient}");
    assert_eq!(patient["name"][0]["family"], "Ndjson");
    search(&server, "Patient?family=Ndjson&_summary=count", &summary, 2).await;

    // An entry the server rejects (schema-invalid) is an error naming its line; the rest loads.
    let path = dir.write(
        "invalid.ndjson",
        &[
            r#"{"resourceType":"Patient","id":"nd-2"}"#,
            r#"{"resourceType":"Patient","id":"nd-3","gender":"robot"}"#,
            r#"{"resourceType":"Patient","id":"nd-4","birthDate":"1990-02-30x"}"#,
        ]
        .join("\n"),
    );
    let summary = run(config(&server, Source::Files(vec![path]))).await.expect("load runs");
    assert_eq!((summary.resources, summary.errors), (1, 2), "{summary}");
    let mut errors = summary.first_errors.clone();
    errors.sort();
    assert!(errors[0].contains("invalid.ndjson:2: 400 Bad Request: \"robot\""), "{summary}");
    assert!(errors[1].contains("invalid.ndjson:3: 400 Bad Request: invalid date"), "{summary}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundle_files_and_directories_load() {
    let server = TestServer::start().await;
    let dir = TempDir::new("bundles");
    let bundle = synthetic_patient_bundle(3, 0);
    let patient_entries = entries(&bundle).len() as u64;
    dir.write("a-patient.json", &bundle.to_string());
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": {"resourceType": "Practitioner", "id": "file-pr"}, "request": {"method": "PUT", "url": "Practitioner/file-pr"}},
        {"resource": {"resourceType": "Patient", "gender": "nope"}, "request": {"method": "POST", "url": "Patient"}}
    ]});
    dir.write("b-batch.json", &serde_json::to_string_pretty(&batch).expect("json"));
    dir.write("c-single.json", r#"{"resourceType":"Organization","id":"file-org","name":"From a file"}"#);
    dir.write("d-lines.ndjson", r#"{"resourceType":"Organization","name":"Line"}"#);
    dir.write("e-collection.json", r#"{"resourceType":"Bundle","type":"collection","entry":[]}"#);
    dir.write("ignored.txt", "not loaded");
    let summary = run(config(&server, Source::Files(vec![dir.path().to_path_buf()]))).await.expect("load runs");
    assert_eq!(summary.resources, patient_entries + 3, "{summary}");
    assert_eq!(summary.requests, 4, "{summary}");
    assert_eq!(summary.errors, 2, "{summary}");
    let errors = summary.first_errors.join("\n");
    assert!(errors.contains("b-batch.json entry 1: 400"), "{errors}");
    assert!(errors.contains("e-collection.json: a Bundle of type 'collection'"), "{errors}");
    for path in ["Practitioner/file-pr", "Organization/file-org"] {
        assert_eq!(server.get(path).await.0, 200, "{path}");
    }
    search(&server, &format!("Patient?identifier={SYNTHETIC_IDENTIFIER_SYSTEM}|3-0&_summary=count"), &summary, 1).await;

    // A failing transaction is one error, with the server's diagnostics.
    let mut broken = synthetic_patient_bundle(3, 1);
    broken["entry"][1]["resource"]["status"] = json!("not-a-status");
    let path = dir.write("broken.json", &broken.to_string());
    let summary = run(config(&server, Source::Files(vec![path]))).await.expect("load runs");
    assert_eq!((summary.resources, summary.errors, summary.requests), (0, 1, 1), "{summary}");
    assert!(summary.first_errors[0].contains("broken.json: 400 Bad Request: "), "{summary}");
    assert!(summary.first_errors[0].contains("resources not loaded"), "{summary}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_up_failures_are_errors() {
    let unused = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let base = format!("http://{}", unused.local_addr().expect("address"));
    drop(unused);
    let mut config = LoadConfig::new(
        BaseUrl::parse(&base).expect("base"),
        Source::Synthetic(SyntheticConfig { seed: 1, patients: 1 }),
    );
    assert!(run(config.clone()).await.is_err(), "nothing listens on {base}");
    config.source = Source::Files(vec![PathBuf::from("/nonexistent/fhirmesh-bench.ndjson")]);
    let err = run(config.clone()).await.expect_err("missing file");
    assert!(format!("{err:#}").contains("/nonexistent/fhirmesh-bench.ndjson"), "{err:#}");
    config.concurrency = 0;
    assert!(run(config).await.is_err());
}
