//! Micro-benchmarks of the per-request CPU hot paths in `fhirmesh-fhir`: JSON parse and R4 schema
//! validation of one resource, search-parameter extraction, search query parsing and patches.
//!
//! Inputs are realistic: the Patient, an Observation with `valueQuantity` and the largest
//! ExplanationOfBenefit of the Synthea fixtures (`tests/e2e/data/synthea`, compact JSON as a client
//! would send it), plus throughput over all 741 spec examples (feature `examples`).
//!
//! `cargo bench -p fhirmesh-fhir --bench hot_paths` (add `-- --quick` for a short run; a filter
//! such as `-- extract/` runs one group).

use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use fhirmesh_fhir::ResourceType;
use fhirmesh_fhir::patch::{apply_fhirpath_patch, apply_json_patch};
use fhirmesh_fhir::search::extract::{self, extract};
use fhirmesh_fhir::search::parse::{ParseOptions, parse_search};
use fhirmesh_fhir::search::query::SearchScope;
use fhirmesh_fhir::validate::{self, validate_resource};
use serde_json::{Value, json};

/// One benchmark input: a name, the resource and its compact JSON as received over HTTP.
struct Sample {
    name: &'static str,
    value: Value,
    bytes: Vec<u8>,
}

impl Sample {
    fn new(name: &'static str, value: Value) -> Sample {
        let bytes = serde_json::to_vec(&value).expect("a JSON value serializes");
        Sample { name, value, bytes }
    }
}

/// The Synthea Patient, the first Observation with a `valueQuantity` and the largest
/// ExplanationOfBenefit of all the Synthea fixture bundles.
fn synthea_samples() -> Vec<Sample> {
    let resources = synthea_resources();
    let patient = resources.iter().find(|r| r["resourceType"] == "Patient").expect("a Synthea Patient").clone();
    let observation = resources
        .iter()
        .find(|r| r["resourceType"] == "Observation" && r.get("valueQuantity").is_some())
        .expect("a Synthea Observation with valueQuantity")
        .clone();
    let eob = resources
        .iter()
        .filter(|r| r["resourceType"] == "ExplanationOfBenefit")
        .max_by_key(|r| serde_json::to_vec(r).map(|b| b.len()).unwrap_or(0))
        .expect("a Synthea ExplanationOfBenefit")
        .clone();
    vec![Sample::new("patient", patient), Sample::new("observation", observation), Sample::new("eob", eob)]
}

/// Every entry resource of every Synthea fixture bundle, in file order.
fn synthea_resources() -> Vec<Value> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/e2e/data/synthea");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no Synthea bundles in {}", dir.display());
    let mut resources = Vec::new();
    for file in files {
        let text = std::fs::read(&file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
        let bundle: Value = serde_json::from_slice(&text).expect("a Synthea bundle is JSON");
        let entries = bundle["entry"].as_array().expect("a bundle has entries");
        resources.extend(entries.iter().map(|entry| entry["resource"].clone()));
    }
    resources
}

/// Parse, validate and parse + validate of one resource (compact JSON bytes → `Value` → issues).
fn bench_validate(c: &mut Criterion) {
    validate::warm_up();
    let samples = synthea_samples();
    let mut group = c.benchmark_group("validate");
    for sample in &samples {
        let issues = validate_resource(&sample.value);
        assert!(issues.is_empty(), "{} is not valid: {issues:?}", sample.name);
        group.throughput(Throughput::Bytes(sample.bytes.len() as u64));
        group.bench_with_input(BenchmarkId::new("parse", sample.name), &sample.bytes, |b, bytes| {
            b.iter(|| serde_json::from_slice::<Value>(black_box(bytes)).expect("valid JSON"))
        });
        group.bench_with_input(BenchmarkId::new("schema", sample.name), &sample.value, |b, value| {
            b.iter(|| validate_resource(black_box(value)))
        });
        group.bench_with_input(BenchmarkId::new("parse_schema", sample.name), &sample.bytes, |b, bytes| {
            b.iter(|| {
                let value: Value = serde_json::from_slice(black_box(bytes)).expect("valid JSON");
                validate_resource(&value)
            })
        });
    }
    group.finish();
}

/// Search-parameter extraction of one resource. Throughput is in index entries produced.
fn bench_extract(c: &mut Criterion) {
    extract::warm_up();
    let samples = synthea_samples();
    let mut group = c.benchmark_group("extract");
    for sample in &samples {
        let entries = extract(&sample.value).len();
        assert!(entries > 0, "{} extracts nothing", sample.name);
        group.throughput(Throughput::Elements(entries as u64));
        group.bench_with_input(BenchmarkId::from_parameter(sample.name), &sample.value, |b, value| {
            b.iter(|| extract(black_box(value)))
        });
    }
    group.finish();
}

/// Whole-corpus throughput: all 741 spec examples (validate, extract) and every resource of the
/// largest Synthea bundle. Throughput is in resources.
fn bench_corpus(c: &mut Criterion) {
    validate::warm_up();
    extract::warm_up();
    let examples: Vec<Value> = fhirmesh_fhir::spec_examples().collect();
    let synthea = synthea_resources();
    let mut group = c.benchmark_group("corpus");
    // One iteration takes tens of milliseconds: few samples of equal size.
    group.sample_size(10).sampling_mode(criterion::SamplingMode::Flat);
    for (name, corpus) in [("spec_examples", &examples), ("synthea", &synthea)] {
        group.throughput(Throughput::Elements(corpus.len() as u64));
        group.bench_with_input(BenchmarkId::new("validate", name), corpus, |b, corpus| {
            b.iter(|| corpus.iter().map(|r| validate_resource(black_box(r)).len()).sum::<usize>())
        });
        group.bench_with_input(BenchmarkId::new("extract", name), corpus, |b, corpus| {
            b.iter(|| corpus.iter().map(|r| extract(black_box(r)).len()).sum::<usize>())
        });
    }
    group.finish();
}

/// A named search request: the resource type searched and its parameters, already percent-decoded.
type Query = (&'static str, &'static str, Vec<(&'static str, &'static str)>);

/// Typical search requests.
fn typical_queries() -> Vec<Query> {
    vec![
        ("token", "Patient", vec![("identifier", "http://hospital.example.org/mrn|12345")]),
        ("string", "Patient", vec![("family", "Erdman"), ("given", "Darrell"), ("_count", "50")]),
        (
            "date_range",
            "Observation",
            vec![("patient", "Patient/123"), ("date", "ge2020-01-01"), ("date", "lt2021-01-01T00:00:00Z")],
        ),
        (
            "token_quantity",
            "Observation",
            vec![("code", "http://loinc.org|8302-2"), ("value-quantity", "gt50|http://unitsofmeasure.org|cm")],
        ),
        ("chain", "Observation", vec![("subject:Patient.name", "Erdman"), ("code", "http://loinc.org|8302-2")]),
        ("include", "Observation", vec![("code", "http://loinc.org|8302-2"), ("_include", "Observation:subject")]),
        // `Provenance:target` may point at any of the 146 resource types.
        ("revinclude", "Observation", vec![("code", "http://loinc.org|8302-2"), ("_revinclude", "Provenance:target")]),
        ("sort", "Observation", vec![("code", "http://loinc.org|8302-2"), ("_sort", "-date,code")]),
        ("has", "Patient", vec![("_has:Observation:patient:code", "http://loinc.org|8302-2")]),
    ]
}

/// `parse_search`: request parameters → `SearchQuery`.
fn bench_search_parse(c: &mut Criterion) {
    let options = ParseOptions::default();
    let mut group = c.benchmark_group("search_parse");
    for (name, resource_type, params) in typical_queries() {
        let scope = SearchScope::Type(ResourceType::parse(resource_type).expect("a resource type"));
        let params: Vec<(String, String)> = params.iter().map(|(n, v)| ((*n).to_owned(), (*v).to_owned())).collect();
        let query = parse_search(&scope, &params, &options).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(query.ignored.is_empty(), "{name}: ignored {:?}", query.ignored);
        group.bench_with_input(BenchmarkId::from_parameter(name), &params, |b, params| {
            b.iter(|| parse_search(black_box(&scope), black_box(params), &options).expect("a valid query"))
        });
    }
    group.finish();
}

/// JSON Patch and FHIRPath Patch of the Synthea Patient (the clone of the target is not measured).
fn bench_patch(c: &mut Criterion) {
    let patient = synthea_samples().into_iter().find(|s| s.name == "patient").expect("the Patient").value;
    let json_patch = json!([
        {"op": "test", "path": "/gender", "value": patient["gender"]},
        {"op": "replace", "path": "/birthDate", "value": "1980-02-29"},
        {"op": "add", "path": "/telecom/-", "value": {"system": "email", "value": "a@example.org", "use": "home"}},
        {"op": "remove", "path": "/name/0/prefix"}
    ]);
    let fhirpath_patch = json!({"resourceType": "Parameters", "parameter": [
        {"name": "operation", "part": [
            {"name": "type", "valueCode": "replace"},
            {"name": "path", "valueString": "Patient.birthDate"},
            {"name": "value", "valueDate": "1980-02-29"}]},
        {"name": "operation", "part": [
            {"name": "type", "valueCode": "add"},
            {"name": "path", "valueString": "Patient"},
            {"name": "name", "valueString": "deceased"},
            {"name": "value", "valueBoolean": false}]},
        {"name": "operation", "part": [
            {"name": "type", "valueCode": "delete"},
            {"name": "path", "valueString": "Patient.name.first().prefix"}]}
    ]});
    apply_json_patch(&mut patient.clone(), &json_patch).expect("the JSON Patch applies");
    apply_fhirpath_patch(&mut patient.clone(), &fhirpath_patch).expect("the FHIRPath Patch applies");

    let mut group = c.benchmark_group("patch");
    group.bench_function("json_patch/patient", |b| {
        b.iter_batched_ref(
            || patient.clone(),
            |target| apply_json_patch(target, black_box(&json_patch)).expect("applies"),
            BatchSize::SmallInput,
        )
    });
    group.bench_function("fhirpath_patch/patient", |b| {
        b.iter_batched_ref(
            || patient.clone(),
            |target| apply_fhirpath_patch(target, black_box(&fhirpath_patch)).expect("applies"),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

/// Criterion's default sample counts with shorter warm-up and measurement, so the whole file runs in
/// about two minutes on two cores (`--warm-up-time` and `--measurement-time` override these).
fn config() -> Criterion {
    Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_validate, bench_extract, bench_corpus, bench_search_parse, bench_patch
}
criterion_main!(benches);
