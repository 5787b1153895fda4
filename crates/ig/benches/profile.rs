//! What profile validation costs beside the schema validation every write does: one Patient
//! claiming `strict-patient` of the test IG (cardinality, slices by value, a fixed value, a
//! pattern, two required bindings, an extension checked against its definition).

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use fhirmesh_ig::testing::{EXAMPLE_BASE, profiled_package};
use fhirmesh_ig::{IgSet, Package, Validator};
use serde_json::json;

fn profile_validation(c: &mut Criterion) {
    let package = Package::from_tgz("profiled.tgz", &profiled_package()).expect("package");
    let validator = Validator::new(&IgSet::resolve(vec![package]).expect("set"));
    let patient = json!({
        "resourceType": "Patient",
        "meta": {"profile": [format!("{EXAMPLE_BASE}/StructureDefinition/strict-patient")]},
        "extension": [{"url": format!("{EXAMPLE_BASE}/StructureDefinition/favourite-colour"), "valueCode": "blue"}],
        "identifier": [{"system": "http://example.org/other", "value": "o1"},
                       {"system": "http://example.org/mrn", "value": "12345"}],
        "active": true,
        "name": [{"family": "Chalmers", "given": ["Peter", "James"]}],
        "gender": "male",
        "birthDate": "1974-12-25",
        "deceasedBoolean": false,
        "maritalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus", "code": "M"}]}
    });
    assert!(validator.validate(&patient).is_empty(), "the benchmark's Patient conforms");
    fhirmesh_fhir::validate::warm_up();
    assert!(fhirmesh_fhir::validate::validate_resource(&patient).is_empty());

    let mut group = c.benchmark_group("validate/patient");
    group.bench_function("schema", |b| b.iter(|| fhirmesh_fhir::validate::validate_resource(black_box(&patient))));
    group.bench_function("profile", |b| b.iter(|| validator.validate(black_box(&patient))));
    group.bench_function("schema+profile", |b| {
        b.iter(|| {
            let issues = fhirmesh_fhir::validate::validate_resource(black_box(&patient));
            (issues, validator.validate(black_box(&patient)))
        })
    });
    group.finish();
}

criterion_group!(benches, profile_validation);
criterion_main!(benches);
