use serde_json::{Value, json};
use time::OffsetDateTime;
use time::macros::datetime;

use super::*;
use crate::search::values::{DATE_MAX, DATE_MIN};

fn rt(name: &str) -> ResourceType {
    ResourceType::parse(name).expect("known type")
}

fn values(resource: &Value, code: &str) -> Vec<IndexValue> {
    let resource_type = rt(resource["resourceType"].as_str().expect("resourceType"));
    let def = registry().get(resource_type, code).unwrap_or_else(|| panic!("{resource_type}.{code}"));
    let from_param = extract_param(resource, def);
    let from_all: Vec<IndexValue> =
        extract(resource).into_iter().filter(|e| e.param == code).map(|e| e.value).collect();
    assert_eq!(from_param, from_all, "extract_param and extract agree on {code}");
    from_param
}

fn string(exact: &str) -> IndexValue {
    IndexValue::String { normalized: normalize_string(exact), exact: exact.to_owned() }
}

fn token(system: Option<&str>, code: Option<&str>, text: Option<&str>) -> IndexValue {
    IndexValue::Token { system: system.map(Into::into), code: code.map(Into::into), text: text.map(Into::into) }
}

fn date(start: OffsetDateTime, end: OffsetDateTime) -> IndexValue {
    IndexValue::Date { start, end }
}

fn reference(target: Option<&str>, id: Option<&str>, url: &str, version: Option<&str>) -> IndexValue {
    IndexValue::Reference {
        target_type: target.map(rt),
        id: id.map(Into::into),
        url: url.into(),
        version: version.map(Into::into),
        identifier: None,
    }
}

fn one(mut values: Vec<IndexValue>) -> IndexValue {
    assert_eq!(values.len(), 1, "{values:?}");
    values.remove(0)
}

fn number(value: &IndexValue) -> (f64, f64, f64) {
    match value {
        IndexValue::Number { value, low, high } | IndexValue::Quantity { value, low, high, .. } => {
            (*value, *low, *high)
        }
        other => panic!("not a number: {other:?}"),
    }
}

fn close(actual: (f64, f64, f64), expected: (f64, f64, f64)) -> bool {
    let near = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs().max(1.0);
    near(actual.0, expected.0) && near(actual.1, expected.1) && near(actual.2, expected.2)
}

use crate::search::values::normalize_string;

#[test]
fn human_name_parts_are_separate_string_values() {
    let patient = json!({"resourceType": "Patient", "name": [
        {"family": "Lovelace", "given": ["Ada", "Augusta"], "prefix": ["Lady"], "suffix": ["Countess"], "text": "Ada Lovelace"},
        {"family": "Müller"}
    ]});
    assert_eq!(
        values(&patient, "name"),
        vec![
            string("Lovelace"),
            string("Ada"),
            string("Augusta"),
            string("Lady"),
            string("Countess"),
            string("Ada Lovelace"),
            string("Müller"),
        ]
    );
    assert_eq!(values(&patient, "family"), vec![string("Lovelace"), string("Müller")]);
    assert_eq!(values(&patient, "given"), vec![string("Ada"), string("Augusta")]);
    let IndexValue::String { normalized, .. } = &values(&patient, "family")[1] else { panic!("string") };
    assert_eq!(normalized, "muller");
}

#[test]
fn address_parts_are_string_values() {
    let patient = json!({"resourceType": "Patient", "address": [
        {"line": ["1 Main St", "Apt 2"], "city": "Springfield", "district": "Greene", "state": "MO",
         "postalCode": "65801", "country": "US", "text": "1 Main St, Springfield"}
    ]});
    assert_eq!(
        values(&patient, "address"),
        ["1 Main St", "Apt 2", "Springfield", "Greene", "MO", "65801", "US", "1 Main St, Springfield"]
            .map(string)
            .to_vec()
    );
    assert_eq!(values(&patient, "address-city"), vec![string("Springfield")]);
    assert_eq!(values(&patient, "address-postalcode"), vec![string("65801")]);
}

#[test]
fn codeable_concepts_yield_one_token_per_coding_and_keep_their_text() {
    let observation = json!({"resourceType": "Observation", "status": "final",
        "code": {"coding": [
            {"system": "http://loinc.org", "code": "29463-7", "display": "Body Weight"},
            {"system": "http://snomed.info/sct", "code": "27113001"}
        ], "text": "Weight"},
        "category": [{"text": "Vital signs, free text"}],
        "interpretation": [{"coding": [{"system": "http://x", "code": "H", "display": "High"}], "text": "High"}]
    });
    assert_eq!(
        values(&observation, "code"),
        vec![
            token(Some("http://loinc.org"), Some("29463-7"), Some("Body Weight")),
            token(Some("http://snomed.info/sct"), Some("27113001"), Some("Weight")),
        ]
    );
    assert_eq!(values(&observation, "category"), vec![token(None, None, Some("Vital signs, free text"))]);
    assert_eq!(values(&observation, "status"), vec![token(None, Some("final"), None)]);
    // With a display on every coding, the text gets its own text-only token.
    let with_displays = json!({"resourceType": "Condition", "subject": {"reference": "Patient/1"},
        "code": {"coding": [{"system": "http://s", "code": "1", "display": "One"}], "text": "Uno"}});
    assert_eq!(
        values(&with_displays, "code"),
        vec![token(Some("http://s"), Some("1"), Some("One")), token(None, None, Some("Uno"))]
    );
}

#[test]
fn identifiers_carry_type_text_and_of_type_tokens() {
    let patient = json!({"resourceType": "Patient", "identifier": [
        {"system": "urn:oid:1.2.36.146.595.217.0.1", "value": "12345",
         "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}], "text": "Medical record"}},
        {"value": "no-system"},
        {"system": "http://only-system"}
    ]});
    assert_eq!(
        values(&patient, "identifier"),
        vec![
            token(Some("urn:oid:1.2.36.146.595.217.0.1"), Some("12345"), Some("Medical record")),
            token(None, None, Some("of-type:http://terminology.hl7.org/CodeSystem/v2-0203|MR|12345")),
            token(None, Some("no-system"), None),
            token(Some("http://only-system"), None, None),
        ]
    );
}

#[test]
fn contact_points_booleans_and_where_filters() {
    let patient = json!({"resourceType": "Patient", "active": false, "telecom": [
        {"system": "phone", "value": "+1 555 0100"},
        {"system": "email", "value": "ada@example.org"}
    ]});
    assert_eq!(values(&patient, "telecom").len(), 2);
    assert_eq!(values(&patient, "email"), vec![token(None, Some("ada@example.org"), None)]);
    assert_eq!(values(&patient, "phone"), vec![token(None, Some("+1 555 0100"), None)]);
    assert_eq!(values(&patient, "active"), vec![token(None, Some("false"), None)]);
}

#[test]
fn deceased_is_a_computed_boolean() {
    let alive = json!({"resourceType": "Patient"});
    assert_eq!(values(&alive, "deceased"), vec![token(None, Some("false"), None)]);
    let not_deceased = json!({"resourceType": "Patient", "deceasedBoolean": false});
    assert_eq!(values(&not_deceased, "deceased"), vec![token(None, Some("false"), None)]);
    let dead = json!({"resourceType": "Patient", "deceasedDateTime": "2015-02-14T13:42:00+10:00"});
    assert_eq!(values(&dead, "deceased"), vec![token(None, Some("true"), None)]);
    assert_eq!(
        values(&dead, "death-date"),
        vec![date(datetime!(2015-02-14 03:42 UTC), datetime!(2015-02-14 03:42:01 UTC))]
    );
}

#[test]
fn references_of_every_form() {
    let observation = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
        "subject": {"reference": "Patient/123"},
        "performer": [
            {"reference": "Practitioner/p1/_history/2"},
            {"reference": "https://fhir.example.org/base/Organization/o-1/_history/7"},
            {"reference": "http://example.org/fhir/NotAType/1"},
            {"reference": "#contained-1"},
            {"reference": "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a"},
            {"identifier": {"system": "http://npi", "value": "99"}},
            {"display": "display only: nothing to index"}
        ]
    });
    assert_eq!(values(&observation, "subject"), vec![reference(Some("Patient"), Some("123"), "Patient/123", None)]);
    assert_eq!(values(&observation, "patient"), vec![reference(Some("Patient"), Some("123"), "Patient/123", None)]);
    assert_eq!(
        values(&observation, "performer"),
        vec![
            reference(Some("Practitioner"), Some("p1"), "Practitioner/p1/_history/2", Some("2")),
            reference(
                Some("Organization"),
                Some("o-1"),
                "https://fhir.example.org/base/Organization/o-1/_history/7",
                Some("7")
            ),
            reference(None, None, "http://example.org/fhir/NotAType/1", None),
            reference(None, None, "#contained-1", None),
            reference(None, None, "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a", None),
            IndexValue::Reference {
                target_type: None,
                id: None,
                url: String::new(),
                version: None,
                identifier: Some((Some("http://npi".into()), "99".into())),
            },
        ]
    );
}

#[test]
fn resolve_is_type_filters_on_the_target_type() {
    let device = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
        "subject": {"reference": "Device/d1"}});
    assert_eq!(values(&device, "patient"), vec![]);
    assert_eq!(values(&device, "subject"), vec![reference(Some("Device"), Some("d1"), "Device/d1", None)]);
    // A contained target is typed through `contained`; an identifier-only one through `type`.
    let contained = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
        "contained": [{"resourceType": "Patient", "id": "p"}], "subject": {"reference": "#p"}});
    assert_eq!(values(&contained, "patient"), vec![reference(None, None, "#p", None)]);
    let typed = json!({"resourceType": "Encounter", "status": "planned", "class": {"code": "AMB"},
        "subject": {"type": "Patient", "identifier": {"value": "mrn-1"}}});
    assert_eq!(
        values(&typed, "patient"),
        vec![IndexValue::Reference {
            target_type: Some(rt("Patient")),
            id: None,
            url: String::new(),
            version: None,
            identifier: Some((None, "mrn-1".into())),
        }]
    );
}

#[test]
fn canonical_and_uri_elements_are_reference_urls_and_uris() {
    let questionnaire_response = json!({"resourceType": "QuestionnaireResponse", "status": "completed",
        "questionnaire": "http://example.org/Questionnaire/q|1.0"});
    assert_eq!(
        values(&questionnaire_response, "questionnaire"),
        vec![reference(None, None, "http://example.org/Questionnaire/q|1.0", None)]
    );
    let value_set = json!({"resourceType": "ValueSet", "status": "draft", "url": "http://example.org/vs"});
    assert_eq!(values(&value_set, "url"), vec![IndexValue::Uri("http://example.org/vs".into())]);
}

#[test]
fn dates_follow_precision_and_periods_have_open_ends() {
    let observation = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
        "effectivePeriod": {"start": "2013-04-02T09:30:10+01:00"}, "issued": "2013-04-03T15:30:10.123Z"});
    assert_eq!(values(&observation, "date"), vec![date(datetime!(2013-04-02 08:30:10 UTC), DATE_MAX)]);
    let encounter = json!({"resourceType": "Encounter", "status": "finished", "class": {"code": "AMB"},
        "period": {"end": "2020-02"}});
    assert_eq!(values(&encounter, "date"), vec![date(DATE_MIN, datetime!(2020-03-01 0:00 UTC))]);
    let condition = json!({"resourceType": "Condition", "subject": {"reference": "Patient/1"},
        "onsetDateTime": "2021", "recordedDate": "2021-05-06"});
    assert_eq!(
        values(&condition, "onset-date"),
        vec![date(datetime!(2021-01-01 0:00 UTC), datetime!(2022-01-01 0:00 UTC))]
    );
    assert_eq!(
        values(&condition, "recorded-date"),
        vec![date(datetime!(2021-05-06 0:00 UTC), datetime!(2021-05-07 0:00 UTC))]
    );
    let timing = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
        "effectiveTiming": {"event": ["2020-01-01"], "repeat": {"boundsPeriod": {"start": "2020-02-01", "end": "2020-03-01"}}}});
    assert_eq!(
        values(&timing, "date"),
        vec![
            date(datetime!(2020-01-01 0:00 UTC), datetime!(2020-01-02 0:00 UTC)),
            date(datetime!(2020-02-01 0:00 UTC), datetime!(2020-03-02 0:00 UTC)),
        ]
    );
    let instant = &values(&observation, "_lastUpdated");
    assert!(instant.is_empty());
}

#[test]
fn numbers_carry_their_implicit_precision() {
    let parse = |text: &str| -> (f64, f64, f64) {
        let value: Value = serde_json::from_str(text).expect("number");
        number_range(value.as_number().expect("number")).expect("range")
    };
    assert!(close(parse("100"), (100.0, 99.5, 100.5)));
    assert!(close(parse("100.0"), (100.0, 99.95, 100.05)));
    assert!(close(parse("0.25"), (0.25, 0.245, 0.255)));
    assert!(close(parse("-3"), (-3.0, -3.5, -2.5)));
    assert!(close(parse("1e-7"), (1e-7, 0.5e-7, 1.5e-7)));
    let risk = json!({"resourceType": "RiskAssessment", "status": "final", "subject": {"reference": "Patient/1"},
        "prediction": [{"probabilityDecimal": 0.25}, {"probabilityRange": {"low": {"value": 10}, "high": {"value": 20}}}]});
    let probability = values(&risk, "probability");
    assert_eq!(probability.len(), 2);
    // A stored decimal is a point; a Range covers its bounds.
    assert!(close(number(&probability[0]), (0.25, 0.25, 0.25)));
    assert!(close(number(&probability[1]), (15.0, 10.0, 20.0)));
}

#[test]
fn exponent_numbers_use_the_exponent_place() {
    // serde_json without `arbitrary_precision` reads `1e2` as 100.0 (so ±0.05); what
    // `number_range` does with an exponent in the text it sees:
    let value: Value = serde_json::from_str("1.5e300").expect("number");
    let (v, low, high) = number_range(value.as_number().expect("number")).expect("range");
    assert!(close((v, low, high), (1.5e300, 1.45e300, 1.55e300)));
}

#[test]
fn quantities_with_canonical_units() {
    let observation = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
        "valueQuantity": {"value": 185, "unit": "lbs", "system": "http://unitsofmeasure.org", "code": "[lb_av]"}});
    let IndexValue::Quantity { value, low, high, system, code, unit, canonical } =
        one(values(&observation, "value-quantity"))
    else {
        panic!("quantity")
    };
    assert!(close((value, low, high), (185.0, 184.5, 185.5)));
    assert_eq!(
        (system.as_deref(), code.as_deref(), unit.as_deref()),
        (Some(crate::search::parse::UCUM_SYSTEM), Some("[lb_av]"), Some("lbs"))
    );
    let (canonical_value, canonical_code) = canonical.expect("lb converts to g");
    assert!((canonical_value - 83_914.588_45).abs() < 1e-6);
    assert_eq!(canonical_code, "g");
    let milligrams = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
        "valueQuantity": {"value": 250, "system": "http://unitsofmeasure.org", "code": "mg"}});
    let IndexValue::Quantity { canonical, .. } = &values(&milligrams, "value-quantity")[0] else { panic!("quantity") };
    assert!(canonical.as_ref().is_some_and(|(v, c)| (v - 0.25).abs() < 1e-12 && c == "g"), "{canonical:?}");

    // Not UCUM: no canonical form. Money: currency as the code.
    let other = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
        "valueQuantity": {"value": 1.5, "system": "http://other", "code": "kg"}});
    assert!(matches!(&values(&other, "value-quantity")[0], IndexValue::Quantity { canonical: None, .. }));
    let charge_item = json!({"resourceType": "ChargeItem", "status": "billed", "code": {"text": "x"},
        "subject": {"reference": "Patient/1"}, "priceOverride": {"value": 40.5, "currency": "EUR"}});
    let IndexValue::Quantity { system, code, value, .. } = one(values(&charge_item, "price-override")) else {
        panic!("quantity")
    };
    assert_eq!((value, system.as_deref(), code.as_deref()), (40.5, Some(ISO_4217), Some("EUR")));
}

#[test]
fn composites_pair_values_of_the_same_element() {
    let observation = json!({"resourceType": "Observation", "status": "final",
    "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9"}]},
    "component": [
        {"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
         "valueQuantity": {"value": 107, "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}},
        {"code": {"coding": [{"system": "http://loinc.org", "code": "8462-4"}]},
         "valueQuantity": {"value": 60, "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}},
        {"code": {"coding": [{"system": "http://loinc.org", "code": "no-value"}]}}
    ]});
    let pairs: Vec<(String, f64)> = values(&observation, "component-code-value-quantity")
        .into_iter()
        .map(|value| match value {
            IndexValue::Composite(parts) => match parts.as_slice() {
                [IndexValue::Token { code: Some(code), .. }, IndexValue::Quantity { value, .. }] => {
                    (code.clone(), *value)
                }
                other => panic!("unexpected parts {other:?}"),
            },
            other => panic!("not composite: {other:?}"),
        })
        .collect();
    assert_eq!(pairs, vec![("8480-6".to_owned(), 107.0), ("8462-4".to_owned(), 60.0)]);
    // The Observation itself has no value: `code-value-quantity` has nothing; `combo-…` has the components.
    assert_eq!(values(&observation, "code-value-quantity"), vec![]);
    assert_eq!(values(&observation, "combo-code-value-quantity").len(), 2);

    // Cartesian product: two codings × one value.
    let two_codings = json!({"resourceType": "Observation", "status": "final",
        "code": {"coding": [{"system": "http://a", "code": "1"}, {"system": "http://b", "code": "2"}]},
        "valueString": "positive"});
    let composites = values(&two_codings, "code-value-string");
    assert_eq!(composites.len(), 2);
    assert!(composites.iter().all(|c| matches!(c, IndexValue::Composite(p) if p[1] == string("positive"))));
}

#[test]
fn composites_read_the_root_resource_through_percent_resource() {
    let sequence = json!({"resourceType": "MolecularSequence", "coordinateSystem": 0,
        "referenceSeq": {"chromosome": {"coding": [{"system": "http://chr", "code": "1"}]}},
        "variant": [{"start": 10, "end": 20}]});
    let composites = values(&sequence, "chromosome-variant-coordinate");
    let [IndexValue::Composite(parts)] = composites.as_slice() else { panic!("one composite: {composites:?}") };
    assert_eq!(parts[0], token(Some("http://chr"), Some("1"), None));
    assert!(close(number(&parts[1]), (10.0, 10.0, 10.0)));
    assert!(close(number(&parts[2]), (20.0, 20.0, 20.0)));
}

#[test]
fn multi_type_expressions_use_only_the_resource_types_part() {
    let condition = json!({"resourceType": "Condition", "subject": {"reference": "Patient/1"},
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "39065001"}]}});
    let def = registry().get(rt("Condition"), "code").expect("clinical-code");
    assert!(def.expression.as_deref().is_some_and(|e| e.starts_with("AllergyIntolerance.code |")));
    assert_eq!(values(&condition, "code"), vec![token(Some("http://snomed.info/sct"), Some("39065001"), None)]);
    // The same definition on a resource of a type it does not cover extracts nothing.
    let patient = json!({"resourceType": "Patient", "code": {"coding": [{"code": "x"}]}});
    assert_eq!(extract_param(&patient, def), vec![]);
}

#[test]
fn resource_level_parameters_apply_to_every_type() {
    let bundle = json!({"resourceType": "Bundle", "id": "b1", "type": "document",
        "meta": {"lastUpdated": "2024-01-02T03:04:05.678Z", "tag": [{"system": "http://t", "code": "x"}],
                 "profile": ["http://p"], "source": "http://src"},
        "entry": [{"resource": {"resourceType": "Composition", "id": "c1"}}]});
    assert_eq!(values(&bundle, "_id"), vec![token(None, Some("b1"), None)]);
    assert_eq!(
        values(&bundle, "_lastUpdated"),
        vec![date(datetime!(2024-01-02 03:04:05.678 UTC), datetime!(2024-01-02 03:04:05.679 UTC))]
    );
    assert_eq!(values(&bundle, "_tag"), vec![token(Some("http://t"), Some("x"), None)]);
    assert_eq!(values(&bundle, "_profile"), vec![IndexValue::Uri("http://p".into())]);
    assert_eq!(values(&bundle, "_source"), vec![IndexValue::Uri("http://src".into())]);
    // `Bundle.entry[0].resource`: an inline resource of a target type.
    assert_eq!(
        values(&bundle, "composition"),
        vec![reference(Some("Composition"), Some("c1"), "Composition/c1", None)]
    );
    assert_eq!(values(&bundle, "message"), vec![]);
}

#[test]
fn duplicates_are_removed_and_unknown_types_yield_nothing() {
    let patient = json!({"resourceType": "Patient", "name": [{"family": "Same"}, {"family": "Same"}]});
    assert_eq!(values(&patient, "family"), vec![string("Same")]);
    // Long lists (here 100 names, 50 distinct) go through the hashed path.
    let names: Vec<Value> = (0..100).map(|i| json!({"family": format!("F{}", i % 50)})).collect();
    let many = json!({"resourceType": "Patient", "name": names});
    let family = values(&many, "family");
    assert_eq!(family.len(), 50);
    assert_eq!(family[49], string("F49"));
    assert!(extract(&json!({"resourceType": "NoSuchType", "id": "1"})).is_empty());
    assert!(extract(&json!({"id": "1"})).is_empty());
    assert!(extract(&json!("not an object")).is_empty());
}

#[test]
fn custom_definitions_compile_on_demand() {
    let def = SearchParamDef {
        url: "http://example.org/SearchParameter/patient-birth-place".into(),
        code: "birth-place".into(),
        base: vec!["Patient".into()],
        kind: ParamType::String,
        expression: Some(
            "Patient.extension('http://hl7.org/fhir/StructureDefinition/patient-birthPlace').value.as(Address).city"
                .into(),
        ),
        target: vec![],
        component: vec![],
        modifier: vec![],
        comparator: vec![],
    };
    let patient = json!({"resourceType": "Patient", "extension": [
        {"url": "http://hl7.org/fhir/StructureDefinition/patient-birthPlace", "valueAddress": {"city": "London"}},
        {"url": "http://other", "valueAddress": {"city": "Paris"}}
    ]});
    assert_eq!(extract_param(&patient, &def), vec![string("London")]);
    let where_form = SearchParamDef {
        expression: Some("Patient.extension.where(url = 'http://other').value.ofType(Address).city.first()".into()),
        ..def
    };
    assert_eq!(extract_param(&patient, &where_form), vec![string("Paris")]);
}

#[test]
fn unsupported_expressions_are_listed_exactly() {
    let unsupported = unsupported_expressions();
    let expected: Vec<(&str, String)> = vec![];
    assert_eq!(unsupported, expected, "unsupported: {unsupported:#?}");
}

#[cfg(feature = "examples")]
/// Coverage over the spec examples: no panic, and most examples yield entries beyond the ubiquitous
/// `_id`.
#[test]
fn every_spec_example_extracts() {
    let mut examples = 0;
    let mut with_entries = 0;
    let mut entries = 0;
    for example in crate::spec_examples() {
        let extracted = extract(&example);
        examples += 1;
        entries += extracted.len();
        if extracted.iter().any(|e| e.param != "_id") {
            with_entries += 1;
        }
    }
    eprintln!("{with_entries}/{examples} spec examples have entries besides _id; {entries} entries in all");
    assert_eq!(examples, 741);
    assert!(with_entries * 100 >= examples * 95, "{with_entries}/{examples}");
}

/// Extraction speed over every spec example and over a typical Observation. Meaningful only in
/// release: `cargo test --release -p fhirmesh-fhir --all-features -- --ignored extraction_speed --nocapture`.
#[cfg(feature = "examples")]
#[test]
#[ignore = "timing; run in release"]
fn extraction_speed() {
    use std::time::Instant;
    let started = Instant::now();
    warm_up();
    eprintln!("warm_up (schema + every extractor compiled): {:?}", started.elapsed());
    let examples: Vec<Value> = crate::spec_examples().collect();
    let rounds = 20;
    let started = Instant::now();
    let mut entries = 0;
    for _ in 0..rounds {
        for example in &examples {
            entries += extract(example).len();
        }
    }
    let per_resource = started.elapsed() / (rounds * examples.len()) as u32;
    let observation =
        examples.iter().find(|e| e["resourceType"] == "Observation" && e["id"] == "blood-pressure").expect("example");
    let started = Instant::now();
    for _ in 0..2000 {
        entries += extract(observation).len();
    }
    let per_observation = started.elapsed() / 2000;
    eprintln!(
        "extract: {per_resource:?} per spec example (mean of {}), {per_observation:?} per Observation/blood-pressure \
         ({} entries); {entries} entries in all",
        examples.len(),
        extract(observation).len()
    );
}
