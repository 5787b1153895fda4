use serde_json::json;

use super::*;

fn types(names: &[&str]) -> Vec<ResourceType> {
    names.iter().map(|n| ResourceType::parse(n).expect("type")).collect()
}

fn kick(level: ExportLevel, params: &[(&str, &str)]) -> KickOff {
    KickOff {
        level,
        params: params.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        lenient: false,
        request_url: "http://h/$export".into(),
    }
}

fn diagnostics(error: &FhirError) -> Vec<String> {
    error.issues.iter().map(|i| i.diagnostics.clone()).collect()
}

#[test]
fn a_system_export_defaults_to_every_allowed_type() {
    let all = types(&["Patient", "Observation", "Organization"]);
    let request = validate(&kick(ExportLevel::System, &[]), &all, &mut Vec::new()).expect("valid");
    assert_eq!(request.types, ["Patient", "Observation", "Organization"]);
    assert_eq!(request.since, None);
    assert_eq!(request.request_url, "http://h/$export");
}

#[test]
fn types_since_filters_and_formats_are_taken() {
    let all = types(&["Patient", "Observation"]);
    let request = validate(
        &kick(
            ExportLevel::System,
            &[
                ("_outputFormat", "application/fhir+ndjson"),
                ("_type", "Observation, Patient"),
                ("_type", "Observation"),
                ("_since", "2026-01-02T03:04:05Z"),
                ("_typeFilter", "Observation?status=final,Observation?code=a%2Cb"),
                ("_format", "json"),
                ("_elements", "Patient.name, status"),
            ],
        ),
        &all,
        &mut Vec::new(),
    )
    .expect("valid");
    assert_eq!(request.types, ["Observation", "Patient"], "in order, once each");
    assert_eq!(request.since, Some(time::macros::datetime!(2026-01-02 03:04:05 UTC)));
    assert_eq!(request.type_filters, ["Observation?status=final", "Observation?code=a%2Cb"]);
    assert_eq!(request.elements, ["Patient.name", "status"]);
    for format in ["application/ndjson", "ndjson"] {
        validate(&kick(ExportLevel::System, &[("_outputFormat", format)]), &all, &mut Vec::new()).expect(format);
    }
}

#[test]
fn every_bad_parameter_is_named() {
    let all = types(&["Patient", "Observation"]);
    let error = validate(
        &kick(
            ExportLevel::System,
            &[
                ("_outputFormat", "text/csv"),
                ("_since", "yesterday"),
                ("_since", "2026-01-02"),
                ("_type", "Patient,Nope"),
                ("_typeFilter", "Observation?subject.name=x"),
                ("_typeFilter", "Encounter?status=finished"),
                ("patient", "Patient/1"),
                ("includeAssociatedData", "LatestProvenanceResources"),
                ("_elements", "Nope.name,a b"),
            ],
        ),
        &all,
        &mut Vec::new(),
    )
    .expect_err("invalid");
    assert_eq!(error.category, ErrorCategory::Invalid);
    let found = diagnostics(&error);
    for expected in [
        "_outputFormat 'text/csv'",
        "_since 'yesterday'",
        "_since '2026-01-02'",
        "unknown resource type 'Nope'",
        "'subject.name' is a chained parameter",
        "'Encounter?status=finished' is on Encounter",
        "patient applies to Patient and Group exports",
        "the parameter 'includeAssociatedData' is not supported",
        "_elements 'Nope.name' names an unknown resource type",
        "_elements 'a b' is not an element name",
    ] {
        assert!(found.iter().any(|d| d.contains(expected)), "{expected:?} not in {found:#?}");
    }
    assert_eq!(found.len(), 10, "{found:#?}");
}

#[test]
fn lenient_handling_ignores_what_is_not_supported() {
    let all = types(&["Patient"]);
    let mut request = kick(ExportLevel::System, &[("organizeOutputBy", "Patient"), ("includeAssociatedData", "x")]);
    request.lenient = true;
    let mut ignored = Vec::new();
    validate(&request, &all, &mut ignored).expect("lenient");
    assert_eq!(ignored.len(), 2, "{ignored:?}");
    assert!(ignored[0].contains("organizeOutputBy"));
}

#[test]
fn patient_level_exports_keep_to_the_patient_compartment() {
    let all = types(&["Patient", "Observation", "Organization", "Encounter"]);
    let level = ExportLevel::Group { id: "g1".into() };
    let request = validate(&kick(level.clone(), &[("patient", "Patient/p1")]), &all, &mut Vec::new()).expect("ok");
    assert_eq!(request.types, ["Patient", "Observation", "Encounter"], "Organization is not in the compartment");
    assert_eq!(request.patients, ["p1"]);
    let error = validate(&kick(level, &[("_type", "Organization"), ("patient", "Group/x")]), &all, &mut Vec::new())
        .expect_err("invalid");
    let found = diagnostics(&error);
    assert!(found.iter().any(|d| d.contains("Organization is not in the Patient compartment")), "{found:?}");
    assert!(found.iter().any(|d| d.contains("patient 'Group/x'")), "{found:?}");
}

#[test]
fn nothing_to_export_is_refused() {
    let error = validate(&kick(ExportLevel::System, &[]), &[], &mut Vec::new()).expect_err("no types");
    assert!(diagnostics(&error)[0].contains("no resource type"));
}

#[test]
fn post_parameters_become_pairs() {
    let body = json!({"resourceType": "Parameters", "parameter": [
        {"name": "_type", "valueString": "Patient"},
        {"name": "_since", "valueInstant": "2026-01-01T00:00:00Z"},
        {"name": "patient", "valueReference": {"reference": "Patient/p1"}},
    ]});
    assert_eq!(
        parameters_from_body(&body).expect("pairs"),
        [
            ("_type".to_owned(), "Patient".to_owned()),
            ("_since".to_owned(), "2026-01-01T00:00:00Z".to_owned()),
            ("patient".to_owned(), "Patient/p1".to_owned()),
        ]
    );
    let error = parameters_from_body(&json!({"resourceType": "Patient"})).expect_err("not Parameters");
    assert_eq!(error.issues[0].expression.as_deref(), Some("Parameters"));
    let error = parameters_from_body(
        &json!({"resourceType": "Parameters", "parameter": [{"name": "_type", "valueInteger": 1}, {}]}),
    )
    .expect_err("bad values");
    let expressions: Vec<_> = error.issues.iter().filter_map(|i| i.expression.clone()).collect();
    assert_eq!(expressions, ["Parameters.parameter[0]", "Parameters.parameter[1].name"]);
}
