//! Synthea-shaped transaction bundles (fixtures in `tests/e2e/data/synthea/`, see its
//! PROVENANCE.md): each patient record loads as ONE transaction, and afterwards every reference
//! in what was written names a stored resource. A second test reshapes a record the way Synthea's
//! hospital/practitioner exports are used — Organizations and Practitioners loaded first with
//! conditional creates, the patient bundle referring to them with conditional references.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::Instant;

use fhirmesh_testkit::{TestServer, status_and_json};
use serde_json::{Value, json};

fn fixtures() -> Vec<(String, Value)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/synthea");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("fixture dir")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "Synthea fixtures in {}", dir.display());
    files
        .into_iter()
        .map(|path| {
            let name = path.file_name().expect("name").to_string_lossy().into_owned();
            let bundle = serde_json::from_slice(&std::fs::read(&path).expect("read fixture")).expect("fixture JSON");
            (name, bundle)
        })
        .collect()
}

async fn post_transaction(server: &TestServer, bundle: &Value) -> (u16, Value) {
    let response = server
        .client
        .post(server.url(""))
        .header("content-type", "application/fhir+json")
        .header("prefer", "return=minimal")
        .body(bundle.to_string())
        .send()
        .await
        .expect("sent");
    status_and_json(response).await
}

fn written(response: &Value) -> Vec<String> {
    response["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|entry| {
            let location = entry["response"]["location"].as_str().expect("location");
            location.split("/_history").next().expect("path").to_owned()
        })
        .collect()
}

fn references_of(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                match (key.as_str(), child) {
                    ("reference", Value::String(reference)) => out.push(reference.clone()),
                    _ => references_of(child, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| references_of(item, out)),
        _ => {}
    }
}

/// Every resource in `paths` is stored, and every reference in it names a stored resource.
async fn assert_references_resolve(server: &TestServer, paths: &[String], stored: &HashSet<String>) {
    for path in paths {
        let (status, resource) = server.get(path).await;
        assert_eq!(status, 200, "{path}");
        let mut references = Vec::new();
        references_of(&resource, &mut references);
        for reference in references {
            assert!(stored.contains(&reference), "{path} refers to {reference}, which the transaction did not store");
        }
    }
}

#[tokio::test]
async fn each_synthea_record_loads_as_one_transaction() {
    let server = TestServer::start().await;
    let mut stored = HashSet::new();
    for (name, bundle) in fixtures() {
        let entries = bundle["entry"].as_array().expect("entries").len();
        let started = Instant::now();
        let (status, response) = post_transaction(&server, &bundle).await;
        eprintln!("{name}: {entries} entries in {:?} (debug build; figures in docs/benchmarks.md)", started.elapsed());
        assert_eq!(status, 200, "{name}: {response}");
        let paths = written(&response);
        assert_eq!(paths.len(), entries, "{name}");
        assert!(
            response["entry"].as_array().expect("entries").iter().all(|e| e["response"]["status"] == "201 Created"),
            "{name}"
        );
        stored.extend(paths.iter().cloned());
        assert_references_resolve(&server, &paths, &stored).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn synthea_conditional_creates_and_references() {
    let server = TestServer::start().await;
    let (_, bundle) = fixtures().into_iter().next().expect("a fixture");
    let entries = bundle["entry"].as_array().expect("entries").clone();
    // Split the record: Organizations and Practitioners become an "information" transaction of
    // conditional creates; references to them become conditional references.
    let mut information = Vec::new();
    let mut conditional: HashMap<String, String> = HashMap::new();
    let mut patient_entries = Vec::new();
    for entry in entries {
        let resource = &entry["resource"];
        let kind = resource["resourceType"].as_str().expect("type").to_owned();
        let identifier = &resource["identifier"][0];
        if matches!(kind.as_str(), "Organization" | "Practitioner") && identifier["value"].is_string() {
            let query = format!(
                "identifier={}|{}",
                identifier["system"].as_str().expect("system"),
                identifier["value"].as_str().expect("value")
            );
            conditional.insert(entry["fullUrl"].as_str().expect("fullUrl").to_owned(), format!("{kind}?{query}"));
            let mut entry = entry.clone();
            entry["request"] = json!({"method": "POST", "url": kind, "ifNoneExist": query});
            information.push(entry);
        } else {
            patient_entries.push(entry);
        }
    }
    assert!(information.len() >= 3, "the record has Organizations and Practitioners");
    let information = json!({"resourceType": "Bundle", "type": "transaction", "entry": information});
    let (status, first) = post_transaction(&server, &information).await;
    assert_eq!(status, 200, "{first}");
    // Loading the same information again creates nothing: every conditional create matches.
    let (status, again) = post_transaction(&server, &information).await;
    assert_eq!(status, 200, "{again}");
    assert!(again["entry"].as_array().expect("entries").iter().all(|e| e["response"]["status"] == "200 OK"), "{again}");
    assert_eq!(written(&again), written(&first), "the same resources, not duplicates");

    let mut patient_bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": patient_entries});
    let text = patient_bundle.to_string();
    let mut rewritten = text.clone();
    for (full_url, reference) in &conditional {
        rewritten = rewritten.replace(&format!("\"{full_url}\""), &format!("\"{reference}\""));
    }
    assert_ne!(rewritten, text, "the record refers to its Organizations and Practitioners");
    patient_bundle = serde_json::from_str(&rewritten).expect("rewritten bundle");
    let (status, response) = post_transaction(&server, &patient_bundle).await;
    assert_eq!(status, 200, "{response}");
    let mut stored: HashSet<String> = written(&first).into_iter().collect();
    let paths = written(&response);
    stored.extend(paths.iter().cloned());
    assert_references_resolve(&server, &paths, &stored).await;
    server.stop().await;
}
