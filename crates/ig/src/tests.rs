use serde_json::json;

use crate::testing::{manifest, tgz};
use crate::{IgSet, Package, PackageError};

fn search_parameter(url: &str, code: &str) -> String {
    json!({"resourceType": "SearchParameter", "id": code, "url": url, "name": code, "status": "active",
           "code": code, "base": ["Patient"], "type": "token", "expression": "Patient.extension('x')"})
    .to_string()
}

fn package(name: &str, version: &str, deps: &[(&str, &str)], files: &[(&str, String)]) -> Package {
    let mut all = vec![("package/package.json", manifest(name, version, deps))];
    all.extend(files.iter().cloned());
    Package::from_tgz("test.tgz", &tgz(&all)).expect("a valid package")
}

fn error_of(files: &[(&str, String)]) -> PackageError {
    Package::from_tgz("broken.tgz", &tgz(files)).expect_err("refused")
}

#[test]
fn a_package_is_read_with_its_manifest_resources_and_examples() {
    let profile = json!({"resourceType": "StructureDefinition", "url": "http://example.org/sd/p", "name": "P"});
    let example = json!({"resourceType": "Patient", "id": "ex"});
    let read = package(
        "example.fhir.demo",
        "1.2.0",
        &[("hl7.fhir.r4.core", "4.0.1")],
        &[
            ("package/SearchParameter-b.json", search_parameter("http://example.org/sp/b", "b")),
            ("package/StructureDefinition-p.json", profile.to_string()),
            ("package/example/Patient-ex.json", example.to_string()),
            ("package/.index.json", json!({"index-version": 1, "files": []}).to_string()),
            ("package/other/readme.json", "not even json".to_owned()),
            ("other-root/ignored.json", "{}".to_owned()),
        ],
    );
    assert_eq!(read.id(), "example.fhir.demo#1.2.0");
    assert_eq!(read.fhir_versions, vec!["4.0.1".to_owned()]);
    assert_eq!(read.dependencies.get("hl7.fhir.r4.core").map(String::as_str), Some("4.0.1"));
    let files: Vec<&str> = read.resources.iter().map(|(f, _)| f.as_str()).collect();
    assert_eq!(files, vec!["SearchParameter-b.json", "StructureDefinition-p.json"]);
    assert_eq!(read.examples, vec![("example/Patient-ex.json".to_owned(), example)]);
}

#[test]
fn broken_packages_are_refused_saying_what_and_where() {
    let m = || ("package/package.json", manifest("example.broken", "1.0.0", &[]));
    let cases: Vec<(Vec<(&str, String)>, &str)> = vec![
        (vec![("package/SearchParameter-a.json", "{}".to_owned())], "broken.tgz: no package/package.json"),
        (vec![("package/package.json", "{".to_owned())], "broken.tgz: package/package.json is not valid JSON"),
        (vec![("package/package.json", json!({"version": "1.0.0"}).to_string())], "has no name"),
        (
            vec![("package/package.json", json!({"name": "Bad Name", "version": "1"}).to_string())],
            "not a FHIR package name",
        ),
        (
            vec![(
                "package/package.json",
                json!({"name": "a.b", "version": "1.0.0", "fhirVersions": ["5.0.0"]}).to_string(),
            )],
            "a.b#1.0.0: made for FHIR 5.0.0, not R4",
        ),
        (
            vec![("package/package.json", json!({"name": "a.b", "version": "1.0.0"}).to_string())],
            "names no FHIR version",
        ),
        (vec![m(), ("package/ValueSet-v.json", "[1,".to_owned())], "package/ValueSet-v.json is not valid JSON"),
        (
            vec![m(), ("package/ValueSet-v.json", json!({"resourceType": "ValueSet", "id": "v"}).to_string())],
            "example.broken#1.0.0: package/ValueSet-v.json: a ValueSet without a url",
        ),
    ];
    for (files, expected) in cases {
        let error = error_of(&files).to_string();
        assert!(error.contains(expected), "{error:?} should say {expected:?}");
    }
    let garbage = Package::from_tgz("garbage.tgz", b"not a tarball").expect_err("refused").to_string();
    assert!(garbage.starts_with("garbage.tgz: not a gzipped tar archive"), "{garbage}");
}

#[test]
fn older_manifests_name_their_fhir_version_differently() {
    for manifest in [
        json!({"name": "a.b", "version": "1.0.0", "fhir-version-list": ["4.0.1"]}),
        json!({"name": "a.b", "version": "1.0.0", "fhirVersion": "4.0.0"}),
    ] {
        let read = Package::from_tgz("old.tgz", &tgz(&[("package/package.json", manifest.to_string())]));
        assert!(read.is_ok(), "{read:?}");
    }
}

#[test]
fn a_set_resolves_dependencies_and_canonical_urls() {
    let base = package(
        "example.base",
        "2.0.1",
        &[],
        &[("package/SearchParameter-a.json", search_parameter("http://x/a", "a"))],
    );
    let guide = package(
        "example.guide",
        "1.0.0",
        &[("example.base", "2.0.x"), ("hl7.fhir.r4.core", "4.0.1")],
        // A copy of the base's definition (a different narrative) is not a conflict.
        &[
            ("package/SearchParameter-b.json", search_parameter("http://x/b", "b")),
            ("package/SearchParameter-a-copy.json", {
                let mut copy: serde_json::Value =
                    serde_json::from_str(&search_parameter("http://x/a", "a")).expect("json");
                copy["text"] = json!({"status": "generated", "div": "<div>copy</div>"});
                copy.to_string()
            }),
        ],
    );
    let set = IgSet::resolve(vec![guide, base]).expect("resolves");
    let ids: Vec<String> = set.packages().iter().map(Package::id).collect();
    assert_eq!(ids, vec!["example.base#2.0.1", "example.guide#1.0.0"]);
    assert_eq!(set.resource("http://x/b").map(|r| r["code"].clone()), Some(json!("b")));
    assert!(set.resource("http://x/nope").is_none());
    let codes: Vec<&str> = set.of_type("SearchParameter").filter_map(|r| r["code"].as_str()).collect();
    assert_eq!(codes, vec!["a", "b"]);
}

#[test]
fn a_set_that_cannot_work_is_refused_with_every_reason() {
    let a1 =
        package("example.a", "1.0.0", &[], &[("package/SearchParameter-x.json", search_parameter("http://x/x", "x"))]);
    let a2 = package("example.a", "2.0.0", &[], &[]);
    let needs = package(
        "example.needs",
        "1.0.0",
        &[("example.missing", "1.0.0"), ("example.a", "3.0.0"), ("hl7.fhir.r4.core", "5.0.0")],
        // The same URL as example.a's, defined differently.
        &[("package/SearchParameter-y.json", search_parameter("http://x/x", "y"))],
    );
    let errors: Vec<String> =
        IgSet::resolve(vec![a1, a2, needs]).expect_err("refused").iter().map(ToString::to_string).collect();
    let expected = [
        "example.a: installed in 2 versions (1.0.0, 2.0.0)",
        "example.needs#1.0.0: depends on example.a#3.0.0, but example.a#1.0.0, 2.0.0 is installed",
        "example.needs#1.0.0: depends on example.missing#1.0.0, which is not installed",
        "example.needs#1.0.0: depends on hl7.fhir.r4.core#5.0.0, not the R4 core",
        "example.needs#1.0.0: package/SearchParameter-y.json defines http://x/x, which example.a#1.0.0 defines differently",
    ];
    for line in expected {
        assert!(errors.iter().any(|e| e.starts_with(line)), "missing {line:?} in {errors:#?}");
    }
    assert_eq!(errors.len(), expected.len(), "{errors:#?}");
}
