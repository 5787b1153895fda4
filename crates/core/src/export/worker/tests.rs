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
    }
}

fn selection(type_name: &str, request: &ExportRequest) -> Selection {
    let resource_type = ResourceType::parse(type_name).expect("type");
    Selection::new(request.level.clone(), resource_type, request).expect("selection")
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
