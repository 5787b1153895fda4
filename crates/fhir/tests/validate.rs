//! Schema validation: specific invalid inputs give the expected issue, and the spec's examples validate.

use fhirmesh_fhir::outcome::{Issue, IssueType, Severity};
use fhirmesh_fhir::validate::{MAX_ISSUES, validate_resource};
use serde_json::{Value, json};

/// (code, diagnostics, expression) of each issue.
fn issues(resource: &Value) -> Vec<(IssueType, String, Option<String>)> {
    validate_resource(resource)
        .into_iter()
        .map(|Issue { severity, code, diagnostics, expression }| {
            assert_eq!(severity, Severity::Error);
            (code, diagnostics, expression)
        })
        .collect()
}

fn one(resource: Value) -> (IssueType, String, String) {
    match issues(&resource).as_slice() {
        [(code, diagnostics, Some(expression))] => (*code, diagnostics.clone(), expression.clone()),
        other => panic!("expected one located issue for {resource}, got {other:?}"),
    }
}

#[test]
fn valid_resources_have_no_issues() {
    let patient = json!({
        "resourceType": "Patient", "id": "p1", "active": true,
        "name": [{"family": "Chalmers", "given": ["Peter", "James"]}],
        "birthDate": "1974-12-25", "_birthDate": {"extension": [{"url": "http://x", "valueString": "y"}]},
        "deceasedDateTime": "2015-02-14T13:42:00+10:00",
        "contained": [{"resourceType": "Organization", "id": "o", "name": "Acme"}]
    });
    assert_eq!(issues(&patient), []);
    assert_eq!(issues(&json!({"resourceType": "Basic", "code": {"text": "x"}})), []);
}

#[test]
fn unknown_elements_are_rejected_where_they_occur() {
    assert_eq!(
        one(json!({"resourceType": "Patient", "shoeSize": 42})),
        (IssueType::Structure, "unknown element 'shoeSize'".into(), "Patient.shoeSize".into())
    );
    assert_eq!(
        one(json!({"resourceType": "Patient", "name": [{"family": "x"}, {"given": ["a"], "nick": "b"}]})).2,
        "Patient.name[1].nick"
    );
    assert_eq!(
        one(json!({"resourceType": "Patient", "contained": [{"resourceType": "Organization", "colour": "red"}]})).2,
        "Patient.contained[0].colour"
    );
    let bundle = json!({
        "resourceType": "Bundle", "type": "collection",
        "entry": [{"resource": {"resourceType": "Observation", "code": {"text": "c"}, "valu": 1}}]
    });
    assert_eq!(one(bundle).2, "Bundle.entry[0].resource.valu");
    // Extensions of a primitive that does not exist are unknown too.
    assert_eq!(one(json!({"resourceType": "Patient", "_shoeSize": {"id": "x"}})).2, "Patient.shoeSize");
}

#[test]
fn wrong_json_types_are_structure_issues() {
    let (code, diagnostics, expression) = one(json!({"resourceType": "Patient", "name": [{"given": "Peter"}]}));
    assert_eq!(code, IssueType::Structure);
    assert_eq!(expression, "Patient.name[0].given");
    assert_eq!(diagnostics, "expected an array but found string \"Peter\"");
    let (_, diagnostics, expression) = one(json!({"resourceType": "Patient", "active": "yes"}));
    assert_eq!(
        (diagnostics.as_str(), expression.as_str()),
        ("expected a boolean but found string \"yes\"", "Patient.active")
    );
}

#[test]
fn bad_resource_types_are_invalid() {
    for (resource, diagnostics) in [
        (json!({"resourceType": "Patients"}), "unknown resource type \"Patients\""),
        (json!({"resourceType": "DomainResource"}), "unknown resource type \"DomainResource\""),
        (json!({"resourceType": 7}), "resourceType must be a string"),
        (json!({"id": "x"}), "missing resourceType"),
    ] {
        assert_eq!(one(resource), (IssueType::Invalid, diagnostics.to_owned(), "resourceType".to_owned()));
    }
    assert_eq!(
        issues(&json!(["Patient"])),
        [(IssueType::Invalid, "a resource must be a JSON object".to_owned(), None)]
    );
    let contained = json!({"resourceType": "Patient", "contained": [{"resourceType": "Nope"}]});
    assert_eq!(
        one(contained),
        (IssueType::Value, "unknown resource type \"Nope\"".into(), "Patient.contained[0].resourceType".into())
    );
}

#[test]
fn primitive_formats_are_value_issues() {
    assert_eq!(
        one(json!({"resourceType": "Patient", "birthDate": "1974-13-01"})),
        (IssueType::Value, "invalid date value \"1974-13-01\"".into(), "Patient.birthDate".into())
    );
    let (code, diagnostics, expression) =
        one(json!({"resourceType": "Observation", "code": {"text": "c"}, "effectiveDateTime": "2020-01-01T10:00"}));
    assert_eq!((code, expression.as_str()), (IssueType::Value, "Observation.effectiveDateTime"));
    assert_eq!(diagnostics, "invalid dateTime value \"2020-01-01T10:00\"");
    assert_eq!(one(json!({"resourceType": "Patient", "id": "a b"})).1, "invalid id value \"a b\"");
    let (code, diagnostics, _) = one(json!({"resourceType": "Patient", "gender": "m"}));
    assert_eq!(code, IssueType::Value);
    assert_eq!(diagnostics, "\"m\" is not one of [male, female, other, unknown]");
}

#[test]
fn missing_required_elements_are_required_issues() {
    assert_eq!(
        one(json!({"resourceType": "Observation", "status": "final"})),
        (IssueType::Required, "missing required element 'code'".into(), "Observation.code".into())
    );
    assert_eq!(one(json!({"resourceType": "Patient", "link": [{"type": "seealso"}]})).2, "Patient.link[0].other");
}

#[test]
fn echoed_values_are_truncated_and_issues_capped() {
    let long = "x".repeat(10_000);
    let (_, diagnostics, _) = one(json!({"resourceType": "Patient", "birthDate": long}));
    assert!(diagnostics.chars().count() < 140, "{diagnostics}");
    let many: serde_json::Map<String, Value> = (0..500).map(|i| (format!("e{i}"), json!(1))).collect();
    let mut resource = Value::Object(many);
    resource["resourceType"] = json!("Basic");
    assert_eq!(validate_resource(&resource).len(), MAX_ISSUES);
}

#[cfg(feature = "examples")]
mod examples {
    use super::*;
    use fhirmesh_fhir::examples::{SCHEMA_REJECTS, spec_examples};

    #[test]
    fn every_spec_example_validates_except_documented_schema_rejects() {
        let mut failures = Vec::new();
        let mut rejected = Vec::new();
        let mut count = 0;
        for example in spec_examples() {
            count += 1;
            let key = (
                example["resourceType"].as_str().unwrap_or_default().to_owned(),
                example["id"].as_str().unwrap_or_default().to_owned(),
            );
            let issues = issues(&example);
            let name = format!("{}/{}", key.0, key.1);
            match SCHEMA_REJECTS.iter().find(|(example, _)| *example == name) {
                Some((_, expression)) => {
                    assert!(
                        issues.iter().any(|(_, _, e)| e.as_deref() == Some(*expression)),
                        "{key:?} no longer rejected at {expression}: {issues:?}"
                    );
                    rejected.push(key);
                }
                None if !issues.is_empty() => failures.push((key, issues)),
                None => {}
            }
        }
        assert_eq!(count, 741);
        assert_eq!(failures, [], "examples with issues");
        assert_eq!(rejected.len(), SCHEMA_REJECTS.len());
    }
}
