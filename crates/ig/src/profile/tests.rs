use fhirmesh_fhir::outcome::{Issue, IssueType, Severity};
use serde_json::{Value, json};

use crate::testing::{EXAMPLE_BASE, profiled_package};
use crate::{IgSet, Package, Validator};

fn validator() -> Validator {
    let package = Package::from_tgz("profiled.tgz", &profiled_package()).expect("package");
    let set = IgSet::resolve(vec![package]).expect("resolves");
    let validator = Validator::new(&set);
    assert_eq!(validator.unusable(), &[] as &[(String, String)]);
    validator
}

fn profile(name: &str) -> String {
    format!("{EXAMPLE_BASE}/StructureDefinition/{name}")
}

fn valid_patient() -> Value {
    json!({
        "resourceType": "Patient",
        "meta": {"profile": [profile("strict-patient")]},
        "extension": [
            {"url": profile("favourite-colour"), "valueCode": "blue"},
            {"url": "http://example.org/unknown-extension", "valueString": "anything"}
        ],
        "identifier": [{"system": "http://example.org/other", "value": "o1"},
                       {"system": "http://example.org/mrn", "value": "12345"}],
        "active": true,
        "name": [{"family": "Chalmers", "given": ["Peter"]}],
        "gender": "female",
        "deceasedBoolean": false,
        "maritalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus", "code": "M"}]}
    })
}

/// (severity, code, expression, diagnostics) of each issue, for exact comparisons.
fn described(issues: &[Issue]) -> Vec<(Severity, IssueType, String, String)> {
    issues
        .iter()
        .map(|i| (i.severity, i.code, i.expression.clone().unwrap_or_default(), i.diagnostics.clone()))
        .collect()
}

fn error(code: IssueType, at: &str, diagnostics: &str, profile_name: &str) -> (Severity, IssueType, String, String) {
    (Severity::Error, code, at.to_owned(), format!("{diagnostics} (profile {})", profile(profile_name)))
}

/// `valid_patient` with `change` applied, validated.
fn patient_with(change: impl FnOnce(&mut Value)) -> Vec<(Severity, IssueType, String, String)> {
    let mut patient = valid_patient();
    change(&mut patient);
    described(&validator().validate(&patient))
}

#[test]
fn a_conforming_resource_has_no_issues() {
    assert_eq!(described(&validator().validate(&valid_patient())), vec![]);
    let observation = json!({
        "resourceType": "Observation", "meta": {"profile": [profile("vitals")]}, "status": "final",
        "code": {"text": "blood pressure"}, "valueQuantity": {"value": 120, "unit": "mmHg"},
        "component": [{"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6", "display": "Systolic"}]},
                       "valueQuantity": {"value": 120}}]
    });
    assert_eq!(described(&validator().validate(&observation)), vec![]);
}

#[test]
fn cardinality_is_checked_on_elements_and_slices() {
    assert_eq!(
        patient_with(|p| {
            p["identifier"] = json!([{"system": "http://example.org/other", "value": "o1"}]);
        }),
        vec![error(
            IssueType::Required,
            "Patient.identifier",
            "slice 'mrn' of Patient.identifier: at least 1 required, found 0",
            "strict-patient"
        )]
    );
    assert_eq!(
        patient_with(|p| {
            p.as_object_mut().expect("object").remove("identifier");
        }),
        vec![
            error(
                IssueType::Required,
                "Patient.identifier",
                "Patient.identifier: at least 1 required, found 0",
                "strict-patient"
            ),
            error(
                IssueType::Required,
                "Patient.identifier",
                "slice 'mrn' of Patient.identifier: at least 1 required, found 0",
                "strict-patient"
            ),
        ]
    );
    assert_eq!(
        patient_with(|p| p["name"] = json!([{"family": "A"}, {"family": "B"}])),
        vec![error(IssueType::Structure, "Patient.name", "Patient.name: at most 1 allowed, found 2", "strict-patient")]
    );
    assert_eq!(
        patient_with(|p| p["name"] = json!([{"given": ["Peter"]}])),
        vec![error(
            IssueType::Required,
            "Patient.name[0].family",
            "Patient.name[0].family: at least 1 required, found 0",
            "strict-patient"
        )]
    );
    // Inside a slice: the mrn identifier must have a value.
    assert_eq!(
        patient_with(|p| p["identifier"][1] = json!({"system": "http://example.org/mrn"})),
        vec![error(
            IssueType::Required,
            "Patient.identifier[1].value",
            "Patient.identifier[1].value: at least 1 required, found 0",
            "strict-patient"
        )]
    );
}

#[test]
fn fixed_pattern_and_type_constraints_are_checked() {
    assert_eq!(
        patient_with(|p| p["active"] = json!(false)),
        vec![error(IssueType::Value, "Patient.active", "must be exactly true", "strict-patient")]
    );
    assert_eq!(
        patient_with(
            |p| p["maritalStatus"] = json!({"coding": [{"system": "http://snomed.info/sct", "code": "87915002"}]})
        ),
        vec![error(
            IssueType::Value,
            "Patient.maritalStatus",
            "must match the pattern {\"coding\":[{\"system\":\"http://terminology.hl7.org/CodeSystem/v3-MaritalStatus\"}]}",
            "strict-patient"
        )]
    );
    assert_eq!(
        patient_with(|p| {
            p.as_object_mut().expect("object").remove("deceasedBoolean");
            p["deceasedDateTime"] = json!("2020-01-01");
        }),
        vec![error(
            IssueType::Structure,
            "Patient.deceasedDateTime",
            "type dateTime is not allowed here; allowed: boolean",
            "strict-patient"
        )]
    );
}

#[test]
fn required_bindings_are_checked_against_loaded_value_sets() {
    assert_eq!(
        patient_with(|p| p["gender"] = json!("other")),
        vec![error(
            IssueType::Value,
            "Patient.gender",
            &format!(
                "code 'other' is not in the value set {EXAMPLE_BASE}/ValueSet/genders, which the binding requires"
            ),
            "strict-patient"
        )]
    );
    // A code system included whole: nested concepts count, others do not.
    assert_eq!(patient_with(|p| p["extension"][0]["valueCode"] = json!("green")), vec![]);
    assert_eq!(
        patient_with(|p| p["extension"][0]["valueCode"] = json!("purple")),
        vec![error(
            IssueType::Value,
            "Patient.extension[0].valueCode",
            &format!(
                "code 'purple' is not in the value set {EXAMPLE_BASE}/ValueSet/colours, which the binding requires"
            ),
            "favourite-colour"
        )]
    );
}

#[test]
fn extensions_are_checked_against_their_definitions() {
    // The wrong value type, and a second one where the profile allows one.
    assert_eq!(
        patient_with(|p| p["extension"][0] = json!({"url": profile("favourite-colour"), "valueString": "blue"})),
        vec![error(
            IssueType::Structure,
            "Patient.extension[0].valueString",
            "type string is not allowed here; allowed: code",
            "favourite-colour"
        ),]
    );
    assert_eq!(
        patient_with(|p| p["extension"][0] = json!({"url": profile("favourite-colour")})),
        vec![error(
            IssueType::Required,
            "Patient.extension[0].value",
            "Patient.extension[0].value: at least 1 required, found 0",
            "favourite-colour"
        )]
    );
    assert_eq!(
        patient_with(|p| {
            let colour = p["extension"][0].clone();
            p["extension"].as_array_mut().expect("array").push(colour);
        }),
        vec![error(
            IssueType::Structure,
            "Patient.extension",
            "slice 'colour' of Patient.extension: at most 1 allowed, found 2",
            "strict-patient"
        )]
    );
}

#[test]
fn closed_slicing_refuses_values_no_slice_matches() {
    let observation = json!({
        "resourceType": "Observation", "meta": {"profile": [profile("vitals")]}, "status": "final",
        "code": {"text": "blood pressure"},
        "component": [
            {"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]}, "valueQuantity": {"value": 120}},
            {"code": {"coding": [{"system": "http://loinc.org", "code": "8462-4"}]}, "valueQuantity": {"value": 80}}
        ],
        "valueString": "120/80"
    });
    assert_eq!(
        described(&validator().validate(&observation)),
        vec![
            error(
                IssueType::Structure,
                "Observation.valueString",
                "type string is not allowed here; allowed: Quantity",
                "vitals"
            ),
            error(
                IssueType::Structure,
                "Observation.component[1]",
                "matches none of the slices (systolic) and the slicing is closed",
                "vitals"
            ),
        ]
    );
}

#[test]
fn profiles_are_matched_to_their_type_and_unknown_ones_are_a_warning() {
    let validator = validator();
    let observation = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}});
    let issues = validator.validate_against(&observation, &profile("strict-patient")).expect("loaded");
    assert_eq!(
        described(&issues),
        vec![(
            Severity::Error,
            IssueType::Invalid,
            "resourceType".to_owned(),
            format!("profile {} constrains Patient, not Observation", profile("strict-patient"))
        )]
    );
    let claims_unknown = json!({"resourceType": "Patient", "meta": {"profile": ["http://example.org/nowhere"]}});
    let issues = validator.validate(&claims_unknown);
    assert_eq!(issues.len(), 1);
    assert_eq!((issues[0].severity, issues[0].expression.as_deref()), (Severity::Warning, Some("meta.profile[0]")));
    assert!(validator.validate_against(&claims_unknown, "http://example.org/nowhere").is_err());
    let by_type = validator.profiles_by_type();
    assert_eq!(by_type.get("Patient"), Some(&vec![profile("strict-patient")]));
    assert_eq!(by_type.get("Observation"), Some(&vec![profile("vitals")]));
    assert_eq!(by_type.get("Extension"), Some(&vec![profile("favourite-colour")]));
    // A versioned canonical finds the loaded version.
    assert!(validator.has_profile(&format!("{}|1.0.0", profile("vitals"))));
}

#[test]
fn definitions_that_cannot_be_validated_against_are_reported() {
    let broken = json!({"resourceType": "StructureDefinition", "url": "http://example.org/sd/no-snapshot",
                        "kind": "resource", "type": "Patient",
                        "differential": {"element": [{"id": "Patient.name", "path": "Patient.name", "min": 1}]}});
    let orphan = json!({"resourceType": "StructureDefinition", "url": "http://example.org/sd/orphan",
                        "kind": "resource", "type": "Patient",
                        "snapshot": {"element": [{"id": "Patient", "path": "Patient"},
                                                 {"id": "Patient.name.family", "path": "Patient.name.family"}]}});
    let package = crate::testing::tgz(&[
        ("package/package.json", crate::testing::manifest("example.broken", "1.0.0", &[])),
        ("package/StructureDefinition-a.json", broken.to_string()),
        ("package/StructureDefinition-b.json", orphan.to_string()),
    ]);
    let set = IgSet::resolve(vec![Package::from_tgz("b.tgz", &package).expect("package")]).expect("set");
    let validator = Validator::new(&set);
    let unusable: Vec<(&str, &str)> = validator.unusable().iter().map(|(u, w)| (u.as_str(), w.as_str())).collect();
    assert_eq!(
        unusable,
        vec![
            ("http://example.org/sd/no-snapshot", "it has no snapshot (a differential alone is not validated against)"),
            (
                "http://example.org/sd/orphan",
                "snapshot element Patient.name.family comes before (or without) its parent Patient.name"
            ),
        ]
    );
}

#[test]
fn value_sets_expand_from_listed_concepts_whole_code_systems_and_other_value_sets() {
    let b = EXAMPLE_BASE;
    let nested = json!({"resourceType": "ValueSet", "url": format!("{b}/ValueSet/warm"),
                        "compose": {"include": [{"valueSet": [format!("{b}/ValueSet/colours")]}],
                                    "exclude": [{"system": format!("{b}/CodeSystem/colours"), "concept": [{"code": "blue"}]}]}});
    let filtered = json!({"resourceType": "ValueSet", "url": format!("{b}/ValueSet/filtered"),
                          "compose": {"include": [{"system": "http://snomed.info/sct",
                                                   "filter": [{"property": "concept", "op": "is-a", "value": "1"}]}]}});
    let package = Package::from_tgz("profiled.tgz", &profiled_package()).expect("package");
    let extra = crate::testing::tgz(&[
        ("package/package.json", crate::testing::manifest("example.extra", "1.0.0", &[])),
        ("package/ValueSet-warm.json", nested.to_string()),
        ("package/ValueSet-filtered.json", filtered.to_string()),
    ]);
    let set = IgSet::resolve(vec![package, Package::from_tgz("extra.tgz", &extra).expect("extra")]).expect("set");
    let terminology = crate::terminology::Terminology::new(&set);
    let codes = |url: &str| -> Vec<String> {
        terminology.expansion(url).expect("expands").concepts().iter().map(|c| c.code.clone()).collect()
    };
    assert_eq!(codes(&format!("{b}/ValueSet/colours")), vec!["blue", "green", "red"]);
    assert_eq!(codes(&format!("{b}/ValueSet/warm")), vec!["green", "red"]);
    assert_eq!(codes(&format!("{b}/ValueSet/genders|1.0")), vec!["female", "male"]);
    assert!(terminology.expansion(&format!("{b}/ValueSet/filtered")).expect_err("filter").contains("filter"));
    assert!(terminology.expansion("http://example.org/none").expect_err("unknown").contains("not loaded"));
}

#[test]
fn a_sibling_named_like_a_choice_element_is_not_one_of_its_types() {
    // As in R4 ResearchElementDefinition: participantEffective[x] beside participantEffectiveDescription.
    let element =
        |id: &str, max: &str, code: &str| json!({"id": id, "path": id, "min": 0, "max": max, "type": [{"code": code}]});
    let definition = json!({"resourceType": "StructureDefinition", "url": "http://example.org/sd/effective",
        "kind": "resource", "type": "Basic", "snapshot": {"element": [
            {"id": "Basic", "path": "Basic", "min": 0, "max": "*"},
            element("Basic.effective[x]", "1", "dateTime"),
            element("Basic.effectiveDescription", "1", "string")]}});
    let package = crate::testing::tgz(&[
        ("package/package.json", crate::testing::manifest("example.effective", "1.0.0", &[])),
        ("package/StructureDefinition-effective.json", definition.to_string()),
    ]);
    let set = IgSet::resolve(vec![Package::from_tgz("e.tgz", &package).expect("package")]).expect("set");
    let validator = Validator::new(&set);
    let url = "http://example.org/sd/effective";
    let both = json!({"resourceType": "Basic", "effectiveDateTime": "2020", "effectiveDescription": "in 2020"});
    assert_eq!(described(&validator.validate_against(&both, url).expect("loaded")), vec![]);
    let wrong = json!({"resourceType": "Basic", "effectiveString": "2020"});
    let issues = validator.validate_against(&wrong, url).expect("loaded");
    assert_eq!(issues.len(), 1, "{issues:?}");
    assert_eq!(issues[0].expression.as_deref(), Some("Basic.effectiveString"));
}
