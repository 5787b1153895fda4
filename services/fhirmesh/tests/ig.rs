//! `fhirmesh ig install|list|remove` and packages at start, on the real binary.

mod support;

use std::path::{Path, PathBuf};
use std::process::Output;

use fhirmesh_ig::testing::{manifest, tgz};
use serde_json::json;

fn fhirmesh(data: &Path, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_fhirmesh"))
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .env("RUST_LOG", "info")
        .output()
        .expect("fhirmesh runs")
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

fn search_parameter(url: &str, code: &str) -> String {
    json!({"resourceType": "SearchParameter", "url": url, "name": code, "status": "active", "code": code,
           "base": ["Patient"], "type": "token", "expression": "Patient.identifier"})
    .to_string()
}

/// Writes a package to `dir` and returns its path.
fn package(dir: &Path, name: &str, deps: &[(&str, &str)], files: &[(&str, String)]) -> PathBuf {
    let mut all = vec![("package/package.json", manifest(name, "1.0.0", deps))];
    all.extend(files.iter().cloned());
    let path = dir.join(format!("{name}.tgz"));
    std::fs::write(&path, tgz(&all)).expect("write the package");
    path
}

fn installed(data: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(data.join("ig"))
        .map(|entries| entries.map(|e| e.expect("entry").file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn packages_are_installed_listed_and_removed_only_when_what_stays_fits_together() {
    let (work, data) = (tempfile::tempdir().expect("work"), tempfile::tempdir().expect("data"));
    let base = package(
        work.path(),
        "example.base",
        &[],
        &[("package/SearchParameter-a.json", search_parameter("http://x/a", "a"))],
    );
    let guide = package(
        work.path(),
        "example.guide",
        &[("example.base", "1.0.0"), ("hl7.fhir.r4.core", "4.0.1")],
        &[("package/SearchParameter-b.json", search_parameter("http://x/b", "b"))],
    );
    let data = data.path();

    // A guide without its dependency is refused; nothing is installed.
    let refused = fhirmesh(data, &["ig", "install", guide.to_str().expect("path")]);
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("example.guide#1.0.0: depends on example.base#1.0.0, which is not installed"),
        "{}",
        text(&refused)
    );
    assert!(installed(data).is_empty());

    let done = fhirmesh(data, &["ig", "install", guide.to_str().expect("path"), base.to_str().expect("path")]);
    assert!(done.status.success(), "{}", text(&done));
    assert!(
        text(&done).contains("installed example.base#1.0.0 (1 conformance resources, 0 examples)"),
        "{}",
        text(&done)
    );
    assert_eq!(installed(data), vec!["example.base#1.0.0.tgz", "example.guide#1.0.0.tgz"]);
    let list = text(&fhirmesh(data, &["ig", "list"]));
    assert!(list.contains("example.guide#1.0.0  FHIR 4.0.1  1 conformance resources, 0 examples  depends on example.base#1.0.0, hl7.fhir.r4.core#4.0.1"), "{list}");

    // A broken package and a conflicting one are refused, naming the problem.
    let broken = work.path().join("broken.tgz");
    std::fs::write(&broken, b"not a package").expect("write");
    let refused = fhirmesh(data, &["ig", "install", broken.to_str().expect("path")]);
    assert!(!refused.status.success() && text(&refused).contains("not a gzipped tar archive"), "{}", text(&refused));
    let rival = package(
        work.path(),
        "example.rival",
        &[],
        &[("package/SearchParameter-a.json", search_parameter("http://x/a", "other"))],
    );
    let refused = fhirmesh(data, &["ig", "install", rival.to_str().expect("path")]);
    assert!(
        text(&refused).contains("defines http://x/a, which example.base#1.0.0 defines differently"),
        "{}",
        text(&refused)
    );
    assert_eq!(installed(data).len(), 2);

    // The base stays while the guide needs it.
    let refused = fhirmesh(data, &["ig", "remove", "example.base"]);
    assert!(!refused.status.success() && text(&refused).contains("which is not installed"), "{}", text(&refused));
    let removed = fhirmesh(data, &["ig", "remove", "example.guide#1.0.0", "example.base"]);
    assert!(removed.status.success(), "{}", text(&removed));
    assert!(installed(data).is_empty());
    assert!(text(&fhirmesh(data, &["ig", "remove", "example.base"])).contains("example.base is not installed"));
}

#[test]
fn a_server_does_not_start_with_packages_that_do_not_fit_together() {
    let (work, data) = (tempfile::tempdir().expect("work"), tempfile::tempdir().expect("data"));
    let guide = package(work.path(), "example.guide", &[("example.base", "1.0.0")], &[]);
    std::fs::create_dir_all(data.path().join("ig")).expect("ig dir");
    // Put there by hand, around `ig install`'s checks.
    std::fs::copy(&guide, data.path().join("ig").join("example.guide#1.0.0.tgz")).expect("copy");
    let refused = fhirmesh(data.path(), &["serve", "--listen", "127.0.0.1:0"]);
    assert!(!refused.status.success());
    let said = text(&refused);
    assert!(
        said.contains("do not fit together") && said.contains("depends on example.base#1.0.0, which is not installed"),
        "{said}"
    );
}

const EYE_COLOUR: &str = "http://example.org/fhir/StructureDefinition/eye-colour";

fn patient(colour: &str) -> String {
    json!({"resourceType": "Patient", "extension": [{"url": EYE_COLOUR, "valueCode": colour}]}).to_string()
}

async fn create(client: &reqwest::Client, base: &str, body: String) -> String {
    let response = client
        .post(format!("{base}/Patient"))
        .header("content-type", "application/fhir+json")
        .body(body)
        .send()
        .await
        .expect("create");
    assert_eq!(response.status(), 201);
    let created: serde_json::Value = response.json().await.expect("json");
    created["id"].as_str().expect("id").to_owned()
}

async fn found(client: &reqwest::Client, base: &str, query: &str) -> Vec<String> {
    let response = client.get(format!("{base}/{query}")).send().await.expect("search");
    let status = response.status();
    let bundle: serde_json::Value = response.json().await.expect("json");
    assert_eq!(status, 200, "{bundle}");
    let mut ids: Vec<String> = bundle["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| e["resource"]["id"].as_str().expect("id").to_owned())
        .collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ig_search_parameter_is_searchable_for_new_writes_and_after_a_reindex_for_old_ones() {
    let (work, data) = (tempfile::tempdir().expect("work"), tempfile::tempdir().expect("data"));
    let client = reqwest::Client::new();
    // Data written before the guide is installed.
    let server = support::spawn(&["--listen", "127.0.0.1:0"], Some(data.path())).await;
    let before = create(&client, &server.address, patient("green")).await;
    // Indexed (with the base parameters) before the server stops.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while found(&client, &server.address, "Patient?_lastUpdated=gt2000").await != vec![before.clone()] {
        assert!(std::time::Instant::now() < deadline, "the first Patient was never indexed");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    server.kill_9().await;

    let parameter = json!({"resourceType": "SearchParameter", "url": "http://example.org/fhir/SearchParameter/eye-colour",
        "name": "EyeColour", "status": "active", "code": "eye-colour", "base": ["Patient"], "type": "token",
        "expression": format!("Patient.extension.where(url = '{EYE_COLOUR}').value")});
    let guide = package(
        work.path(),
        "example.eyes",
        &[],
        &[("package/SearchParameter-eye-colour.json", parameter.to_string())],
    );
    let installed = fhirmesh(data.path(), &["ig", "install", guide.to_str().expect("path")]);
    assert!(installed.status.success(), "{}", text(&installed));

    let server = support::spawn(&["--listen", "127.0.0.1:0"], Some(data.path())).await;
    let base = server.address.clone();
    let after = create(&client, &base, patient("green")).await;
    create(&client, &base, patient("blue")).await;
    // New writes are indexed; what was written before is not, until a reindex.
    assert_eq!(found(&client, &base, "Patient?eye-colour=green").await, vec![after.clone()]);
    let metadata: serde_json::Value =
        client.get(format!("{base}/metadata")).send().await.expect("metadata").json().await.expect("json");
    let patient_resource = metadata["rest"][0]["resource"]
        .as_array()
        .expect("resources")
        .iter()
        .find(|r| r["type"] == "Patient")
        .expect("Patient")
        .clone();
    let listed =
        patient_resource["searchParam"].as_array().expect("searchParam").iter().any(|p| p["name"] == "eye-colour");
    assert!(listed, "the CapabilityStatement lists eye-colour: {patient_resource}");

    let reindexed = fhirmesh(data.path(), &["reindex"]);
    assert!(reindexed.status.success(), "{}", text(&reindexed));
    let mut both = vec![before, after];
    both.sort();
    assert_eq!(found(&client, &base, "Patient?eye-colour=green").await, both);
    server.kill_9().await;
}

#[test]
fn a_search_parameter_the_server_cannot_evaluate_stops_the_start() {
    let (work, data) = (tempfile::tempdir().expect("work"), tempfile::tempdir().expect("data"));
    let parameter = json!({"resourceType": "SearchParameter", "url": "http://example.org/fhir/SearchParameter/bad",
        "name": "Bad", "status": "active", "code": "bad", "base": ["Patient"], "type": "token",
        "expression": "Patient.name.given.(("});
    let guide =
        package(work.path(), "example.bad", &[], &[("package/SearchParameter-bad.json", parameter.to_string())]);
    let installed = fhirmesh(data.path(), &["ig", "install", guide.to_str().expect("path")]);
    assert!(installed.status.success(), "{}", text(&installed));
    let refused = fhirmesh(data.path(), &["serve", "--listen", "127.0.0.1:0"]);
    assert!(!refused.status.success());
    let said = text(&refused);
    assert!(said.contains("http://example.org/fhir/SearchParameter/bad: on Patient: parse error"), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_claiming_an_ig_profile_are_validated_against_it() {
    let (work, data) = (tempfile::tempdir().expect("work"), tempfile::tempdir().expect("data"));
    let guide = work.path().join("profiled.tgz");
    std::fs::write(&guide, fhirmesh_ig::testing::profiled_package()).expect("write the package");
    let installed = fhirmesh(data.path(), &["ig", "install", guide.to_str().expect("path")]);
    assert!(installed.status.success(), "{}", text(&installed));
    let server = support::spawn(&["--listen", "127.0.0.1:0"], Some(data.path())).await;
    let (client, base) = (reqwest::Client::new(), server.address.clone());
    let profile = format!("{}/StructureDefinition/strict-patient", fhirmesh_ig::testing::EXAMPLE_BASE);
    let patient = |gender: &str| {
        json!({"resourceType": "Patient", "meta": {"profile": [profile]},
               "identifier": [{"system": "http://example.org/mrn", "value": "1"}], "gender": gender})
    };
    let post = |body: serde_json::Value| {
        client
            .post(format!("{base}/Patient"))
            .header("content-type", "application/fhir+json")
            .body(body.to_string())
            .send()
    };

    // The CapabilityStatement lists the profiles each type supports, and $validate.
    let metadata: serde_json::Value =
        client.get(format!("{base}/metadata")).send().await.expect("metadata").json().await.expect("json");
    let of_type = |rt: &str| {
        metadata["rest"][0]["resource"].as_array().expect("resources").iter().find(|r| r["type"] == rt).cloned()
    };
    assert_eq!(of_type("Patient").expect("Patient")["supportedProfile"], json!([profile]));
    assert!(of_type("Encounter").expect("Encounter").get("supportedProfile").is_none());
    assert_eq!(of_type("Patient").expect("Patient")["operation"][0]["name"], "validate");

    let created = post(patient("female")).await.expect("create");
    assert_eq!(created.status(), 201);
    let id = created.json::<serde_json::Value>().await.expect("json")["id"].as_str().expect("id").to_owned();

    // A code outside the profile's value set (but valid for the base specification).
    let refused = post(patient("other")).await.expect("create");
    assert_eq!(refused.status(), 422);
    let outcome: serde_json::Value = refused.json().await.expect("json");
    assert_eq!(outcome["issue"][0]["expression"], json!(["Patient.gender"]), "{outcome}");
    assert!(
        outcome["issue"][0]["diagnostics"].as_str().expect("diagnostics").contains("ValueSet/genders"),
        "{outcome}"
    );

    // An update to the same is refused too, and the stored version stays.
    let mut update = patient("other");
    update["id"] = json!(id);
    let refused = client
        .put(format!("{base}/Patient/{id}"))
        .header("content-type", "application/fhir+json")
        .body(update.to_string())
        .send()
        .await
        .expect("update");
    assert_eq!(refused.status(), 422);
    let current: serde_json::Value =
        client.get(format!("{base}/Patient/{id}")).send().await.expect("read").json().await.expect("json");
    assert_eq!((current["gender"].as_str(), current["meta"]["versionId"].as_str()), (Some("female"), Some("1")));

    // Missing the required mrn identifier: the slice's cardinality.
    let mut no_mrn = patient("male");
    no_mrn["identifier"] = json!([{"system": "http://example.org/other", "value": "2"}]);
    let refused = post(no_mrn).await.expect("create");
    assert_eq!(refused.status(), 422);
    let outcome: serde_json::Value = refused.json().await.expect("json");
    assert!(outcome["issue"][0]["diagnostics"].as_str().expect("diagnostics").contains("slice 'mrn'"), "{outcome}");

    // $validate checks against a profile given as a parameter, and writes nothing.
    let unclaimed_other = json!({"resourceType": "Patient", "gender": "other"});
    let validated: serde_json::Value = client
        .post(format!("{base}/Patient/$validate?profile={profile}"))
        .header("content-type", "application/fhir+json")
        .body(unclaimed_other.to_string())
        .send()
        .await
        .expect("validate")
        .json()
        .await
        .expect("json");
    let mut expressions: Vec<&str> =
        validated["issue"].as_array().expect("issues").iter().filter_map(|i| i["expression"][0].as_str()).collect();
    expressions.sort_unstable();
    assert_eq!(expressions, vec!["Patient.gender", "Patient.identifier", "Patient.identifier"], "{validated}");

    // Resources that claim no profile, or one that is not loaded, are not held to it.
    let unclaimed = json!({"resourceType": "Patient", "gender": "other"});
    assert_eq!(post(unclaimed).await.expect("create").status(), 201);
    let unknown =
        json!({"resourceType": "Patient", "meta": {"profile": ["http://example.org/elsewhere"]}, "gender": "other"});
    assert_eq!(post(unknown).await.expect("create").status(), 201);
    server.kill_9().await;
}
