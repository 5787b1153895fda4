use serde_json::{Value, json};

use super::*;

fn patient() -> Value {
    json!({
        "resourceType": "Patient",
        "id": "example",
        "identifier": [{"system": "urn:a", "value": "1"}, {"system": "urn:b", "value": "2"}],
        "active": true,
        "name": [{"use": "official", "family": "Chalmers", "given": ["Peter", "James"]}],
        "birthDate": "1974-12-25",
        "_birthDate": {"extension": [{"url": "http://example.org/time", "valueDateTime": "1974-12-25T14:35:45-05:00"}]},
        "contact": [{"name": {"family": "Du Marché"}}]
    })
}

/// One FHIRPath Patch operation as a parameter; `parts` are (name, value[x] key, value).
fn operation(kind: &str, path: &str, parts: &[(&str, &str, Value)]) -> Value {
    let mut all = vec![json!({"name": "type", "valueCode": kind}), json!({"name": "path", "valueString": path})];
    all.extend(parts.iter().map(|(name, key, value)| {
        let mut part = json!({"name": name});
        part[*key] = value.clone();
        part
    }));
    json!({"name": "operation", "part": all})
}

fn parameters(operations: Vec<Value>) -> Value {
    json!({"resourceType": "Parameters", "parameter": operations})
}

fn fhirpath_patch(target: &Value, operations: Vec<Value>) -> Result<Value, PatchError> {
    let mut patched = target.clone();
    apply_fhirpath_patch(&mut patched, &parameters(operations))?;
    Ok(patched)
}

fn operation_failure(result: Result<Value, PatchError>) -> String {
    match result {
        Err(PatchError::Operation { reason, .. }) => reason,
        other => panic!("expected an operation failure, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------- JSON Patch

#[test]
fn json_patch_applies_all_operations() {
    let mut target = patient();
    let patch = json!([
        {"op": "test", "path": "/active", "value": true},
        {"op": "replace", "path": "/active", "value": false},
        {"op": "add", "path": "/name/0/given/-", "value": "Jim"},
        {"op": "remove", "path": "/identifier/0"},
        {"op": "copy", "from": "/birthDate", "path": "/deceasedDateTime"},
        {"op": "move", "from": "/contact", "path": "/link"}
    ]);
    apply_json_patch(&mut target, &patch).expect("patch applies");
    assert_eq!(target["active"], false);
    assert_eq!(target["name"][0]["given"], json!(["Peter", "James", "Jim"]));
    assert_eq!(target["identifier"], json!([{"system": "urn:b", "value": "2"}]));
    assert_eq!(target["deceasedDateTime"], "1974-12-25");
    assert!(target.get("contact").is_none() && target.get("link").is_some());
}

#[test]
fn json_patch_failed_test_is_atomic_and_locates_the_element() {
    let mut target = patient();
    let patch = json!([
        {"op": "replace", "path": "/active", "value": false},
        {"op": "test", "path": "/name/0/family", "value": "Smith"}
    ]);
    let error = apply_json_patch(&mut target, &patch).expect_err("test fails");
    assert_eq!(target, patient(), "nothing applied");
    assert!(matches!(&error, PatchError::JsonPatch { index: 1, .. }), "{error:?}");
    assert_eq!(error.to_string(), "json patch operation 1 failed at '/name/0/family': value did not match");
    let issue = error.to_issue();
    assert_eq!(issue.code, IssueType::Processing);
    assert_eq!(issue.expression.as_deref(), Some("Patient.name[0].family"));
}

#[test]
fn json_patch_rejects_malformed_documents() {
    let mut target = patient();
    for patch in [
        json!({"op": "add", "path": "/x", "value": 1}),
        json!([{"op": "frobnicate", "path": "/x"}]),
        json!([{"op": "add", "value": 1}]),
        json!([{"op": "add", "path": "x", "value": 1}]),
    ] {
        let error = apply_json_patch(&mut target, &patch).expect_err("malformed");
        assert!(matches!(error, PatchError::InvalidDocument { .. }), "{patch}: {error:?}");
        assert_eq!(error.to_issue().code, IssueType::Invalid);
    }
    let error = apply_json_patch(&mut target, &json!([{"op": "remove", "path": "/nope"}])).expect_err("bad path");
    assert!(matches!(error, PatchError::JsonPatch { .. }), "{error:?}");
}

// ---------------------------------------------------------------------------------------------- FHIRPath Patch

#[test]
fn add_appends_to_lists_and_sets_single_elements() {
    let patched = fhirpath_patch(
        &patient(),
        vec![
            operation(
                "add",
                "Patient",
                &[
                    ("name", "valueString", json!("identifier")),
                    ("value", "valueIdentifier", json!({"system": "urn:c", "value": "3"})),
                ],
            ),
            operation(
                "add",
                "Patient",
                &[("name", "valueString", json!("gender")), ("value", "valueCode", json!("male"))],
            ),
            operation(
                "add",
                "Patient.name[0]",
                &[("name", "valueString", json!("given")), ("value", "valueString", json!("Jim"))],
            ),
            operation(
                "add",
                "Patient",
                &[
                    ("name", "valueString", json!("telecom")),
                    ("value", "valueContactPoint", json!({"system": "phone", "value": "555"})),
                ],
            ),
        ],
    )
    .expect("patch applies");
    assert_eq!(patched["identifier"][2], json!({"system": "urn:c", "value": "3"}));
    assert_eq!(patched["gender"], "male");
    assert_eq!(patched["name"][0]["given"], json!(["Peter", "James", "Jim"]));
    assert_eq!(patched["telecom"], json!([{"system": "phone", "value": "555"}]), "absent list created as a list");
}

#[test]
fn add_resolves_choice_names_and_builds_complex_values_from_parts() {
    let contact = json!({
        "name": "value",
        "part": [
            {"name": "name", "valueHumanName": {"family": "Smith"}},
            {"name": "relationship", "valueCodeableConcept": {"text": "friend"}},
            {"name": "telecom", "valueContactPoint": {"system": "phone", "value": "1"}},
            {"name": "telecom", "valueContactPoint": {"system": "email", "value": "a@b"}}
        ]
    });
    let mut add_contact = operation("add", "Patient", &[("name", "valueString", json!("contact"))]);
    add_contact["part"].as_array_mut().expect("parts").push(contact);
    let patched = fhirpath_patch(
        &patient(),
        vec![
            add_contact,
            operation(
                "add",
                "Patient",
                &[("name", "valueString", json!("deceased")), ("value", "valueDateTime", json!("2020-01-01"))],
            ),
        ],
    )
    .expect("patch applies");
    assert_eq!(
        patched["contact"][1],
        json!({
            "name": {"family": "Smith"},
            "relationship": [{"text": "friend"}],
            "telecom": [{"system": "phone", "value": "1"}, {"system": "email", "value": "a@b"}]
        })
    );
    assert_eq!(patched["deceasedDateTime"], "2020-01-01");
}

#[test]
fn add_errors() {
    let add = |path: &str, name: &str| {
        fhirpath_patch(
            &patient(),
            vec![operation("add", path, &[("name", "valueString", json!(name)), ("value", "valueString", json!("x"))])],
        )
    };
    assert_eq!(operation_failure(add("Patient", "birthDate")), "'birthDate' already has a value; use replace");
    assert_eq!(operation_failure(add("Patient", "shoeSize")), "'shoeSize' is not an element of Patient");
    assert_eq!(
        operation_failure(add("Patient.identifier", "value")),
        "the path matches 2 elements; it must match exactly one"
    );
    assert_eq!(operation_failure(add("Patient.photo", "title")), "the path matches no element");
}

#[test]
fn insert_places_at_index() {
    let insert = |index: i64| {
        fhirpath_patch(
            &patient(),
            vec![operation(
                "insert",
                "Patient.identifier",
                &[("value", "valueIdentifier", json!({"value": "new"})), ("index", "valueInteger", json!(index))],
            )],
        )
    };
    let values = |patched: &Value| -> Vec<String> {
        patched["identifier"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|i| i["value"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    assert_eq!(values(&insert(0).expect("insert at 0")), ["new", "1", "2"]);
    assert_eq!(values(&insert(1).expect("insert at 1")), ["1", "new", "2"]);
    assert_eq!(values(&insert(2).expect("insert at end")), ["1", "2", "new"]);
    assert_eq!(operation_failure(insert(3)), "index 3 is out of range for a list of 2");
    assert!(matches!(insert(-1), Err(PatchError::InvalidDocument { .. })));

    let first_telecom = fhirpath_patch(
        &patient(),
        vec![operation(
            "insert",
            "Patient.telecom",
            &[("value", "valueContactPoint", json!({"value": "1"})), ("index", "valueInteger", json!(0))],
        )],
    )
    .expect("insert into an absent list");
    assert_eq!(first_telecom["telecom"], json!([{"value": "1"}]));
    let not_a_list = fhirpath_patch(
        &patient(),
        vec![operation(
            "insert",
            "Patient.birthDate",
            &[("value", "valueDate", json!("2000")), ("index", "valueInteger", json!(0))],
        )],
    );
    assert_eq!(operation_failure(not_a_list), "'birthDate' is not a list");
}

#[test]
fn delete_removes_one_element_or_nothing() {
    let patched = fhirpath_patch(
        &patient(),
        vec![
            operation("delete", "Patient.identifier.where(system = 'urn:a')", &[]),
            operation("delete", "Patient.birthDate", &[]),
            operation("delete", "Patient.name.given[1]", &[]),
            operation("delete", "Patient.contact[0]", &[]),
            operation("delete", "Patient.photo", &[]),
        ],
    )
    .expect("patch applies");
    assert_eq!(patched["identifier"], json!([{"system": "urn:b", "value": "2"}]));
    assert!(patched.get("birthDate").is_none() && patched.get("_birthDate").is_none(), "extensions go too");
    assert_eq!(patched["name"][0]["given"], json!(["Peter"]));
    assert!(patched.get("contact").is_none(), "an emptied list disappears");

    let many = fhirpath_patch(&patient(), vec![operation("delete", "Patient.identifier", &[])]);
    assert_eq!(operation_failure(many), "the path matches 2 elements; only one element can be deleted");
    let root = fhirpath_patch(&patient(), vec![operation("delete", "Patient", &[])]);
    assert_eq!(operation_failure(root), "the resource itself cannot be deleted");
}

#[test]
fn replace_sets_exactly_one_element() {
    let patched = fhirpath_patch(
        &patient(),
        vec![
            operation("replace", "Patient.birthDate", &[("value", "valueDate", json!("1975-01-01"))]),
            operation(
                "replace",
                "Patient.identifier.where(system = 'urn:b').value",
                &[("value", "valueString", json!("22"))],
            ),
            operation("replace", "Patient.name.first().given.last()", &[("value", "valueString", json!("Jim"))]),
            operation("replace", "Patient.active", &[("value", "valueBoolean", json!(false))]),
        ],
    )
    .expect("patch applies");
    assert_eq!(patched["birthDate"], "1975-01-01");
    assert!(patched.get("_birthDate").is_some(), "a primitive's extensions survive a value replace");
    assert_eq!(patched["identifier"][1]["value"], "22");
    assert_eq!(patched["name"][0]["given"], json!(["Peter", "Jim"]));
    assert_eq!(patched["active"], false);

    let missing = fhirpath_patch(
        &patient(),
        vec![operation("replace", "Patient.gender", &[("value", "valueCode", json!("male"))])],
    );
    assert_eq!(operation_failure(missing), "the path matches no element");
    let many = fhirpath_patch(
        &patient(),
        vec![operation("replace", "Patient.name.given", &[("value", "valueString", json!("x"))])],
    );
    assert_eq!(operation_failure(many), "the path matches 2 elements; it must match exactly one");
}

#[test]
fn replace_of_a_choice_element_changes_its_type() {
    let observation =
        json!({"resourceType": "Observation", "status": "final", "code": {"text": "c"}, "valueString": "high"});
    let patched = fhirpath_patch(
        &observation,
        vec![operation(
            "replace",
            "Observation.value",
            &[("value", "valueQuantity", json!({"value": 7, "unit": "mg"}))],
        )],
    )
    .expect("patch applies");
    assert_eq!(
        patched,
        json!({"resourceType": "Observation", "status": "final", "code": {"text": "c"}, "valueQuantity": {"value": 7, "unit": "mg"}})
    );
}

#[test]
fn move_reorders_a_list() {
    let moved = |source: i64, destination: i64| {
        fhirpath_patch(
            &patient(),
            vec![operation(
                "move",
                "Patient.name[0].given",
                &[("source", "valueInteger", json!(source)), ("destination", "valueInteger", json!(destination))],
            )],
        )
    };
    assert_eq!(moved(0, 1).expect("move applies")["name"][0]["given"], json!(["James", "Peter"]));
    assert_eq!(moved(1, 1).expect("no-op move")["name"][0]["given"], json!(["Peter", "James"]));
    assert_eq!(operation_failure(moved(0, 2)), "source 0 or destination 2 is out of range for a list of 2");
}

#[test]
fn unsupported_paths_are_errors_not_guesses() {
    let result = fhirpath_patch(&patient(), vec![operation("delete", "Patient.name.where(given.exists())", &[])]);
    let error = result.expect_err("unsupported");
    assert!(matches!(&error, PatchError::UnsupportedPath { .. }), "{error:?}");
    assert!(error.to_string().starts_with("unsupported fhirpath 'Patient.name.where(given.exists())': "), "{error}");
    assert_eq!(error.to_issue().code, IssueType::Invalid);
    let wrong_root = fhirpath_patch(&patient(), vec![operation("delete", "Observation.code", &[])]);
    assert!(matches!(wrong_root, Err(PatchError::UnsupportedPath { .. })));
}

#[test]
fn fhirpath_patch_is_atomic() {
    let mut target = patient();
    let patch = parameters(vec![
        operation("replace", "Patient.active", &[("value", "valueBoolean", json!(false))]),
        operation("replace", "Patient.gender", &[("value", "valueCode", json!("male"))]),
    ]);
    let error = apply_fhirpath_patch(&mut target, &patch).expect_err("second operation fails");
    assert_eq!(target, patient());
    assert_eq!(
        error.to_string(),
        "fhirpath patch operation 1 (replace at 'Patient.gender') failed: the path matches no element"
    );
    let issue = error.to_issue();
    assert_eq!((issue.code, issue.expression.as_deref()), (IssueType::Processing, Some("Patient.gender")));
}

#[test]
fn malformed_parameters_are_invalid_documents() {
    let cases = [
        (json!({"resourceType": "Patient"}), None),
        (json!({"resourceType": "Parameters", "parameter": [{"name": "op"}]}), Some("Parameters.parameter[0]")),
        (
            parameters(vec![json!({"name": "operation", "part": [{"name": "type", "valueCode": "upsert"}]})]),
            Some("Parameters.parameter[0].part[0]"),
        ),
        (
            parameters(vec![operation("add", "Patient", &[("value", "valueString", json!("x"))])]),
            Some("Parameters.parameter[0]"),
        ),
        (
            parameters(vec![operation("insert", "Patient.identifier", &[("value", "valueString", json!("x"))])]),
            Some("Parameters.parameter[0]"),
        ),
        (
            parameters(vec![operation("move", "Patient.identifier", &[("source", "valueInteger", json!(0))])]),
            Some("Parameters.parameter[0]"),
        ),
        (
            parameters(vec![operation("delete", "Patient.x", &[("bogus", "valueString", json!("x"))])]),
            Some("Parameters.parameter[0].part[2]"),
        ),
        (
            parameters(vec![json!({"name": "operation", "part": [{"name": "path", "valueString": "Patient"}]})]),
            Some("Parameters.parameter[0]"),
        ),
    ];
    for (patch, expression) in cases {
        let mut target = patient();
        let error = apply_fhirpath_patch(&mut target, &patch).expect_err("malformed");
        assert!(matches!(error, PatchError::InvalidDocument { .. }), "{patch}: {error:?}");
        let issue = error.to_issue();
        assert_eq!((issue.code, issue.expression.as_deref()), (IssueType::Invalid, expression), "{patch}");
    }
    let mut target = patient();
    apply_fhirpath_patch(&mut target, &json!({"resourceType": "Parameters"})).expect("an empty patch is a no-op");
    assert_eq!(target, patient());
}
