use time::macros::datetime;

use super::*;
use crate::search::query::{ChainLink, Has, Modifier, Prefix};

fn rt(name: &str) -> ResourceType {
    ResourceType::parse(name).unwrap_or_else(|| panic!("{name} is a resource type"))
}

fn pairs(params: &[(&str, &str)]) -> Vec<(String, String)> {
    params.iter().map(|(n, v)| ((*n).to_owned(), (*v).to_owned())).collect()
}

fn run(scope: &SearchScope, params: &[(&str, &str)], strict: bool) -> Result<SearchQuery, SearchError> {
    parse_search(scope, &pairs(params), &ParseOptions { strict, ..ParseOptions::default() })
}

fn ok(resource_type: &str, params: &[(&str, &str)]) -> SearchQuery {
    run(&SearchScope::Type(rt(resource_type)), params, false)
        .unwrap_or_else(|e| panic!("{resource_type}?{params:?} should parse: {e}"))
}

fn strict(resource_type: &str, params: &[(&str, &str)]) -> Result<SearchQuery, SearchError> {
    run(&SearchScope::Type(rt(resource_type)), params, true)
}

/// Asserts the request fails in lenient mode with an issue naming `name`.
fn fails(resource_type: &str, params: &[(&str, &str)], name: &str) -> SearchError {
    let error = run(&SearchScope::Type(rt(resource_type)), params, false)
        .expect_err(&format!("{resource_type}?{params:?} should fail"));
    assert!(
        error.issues.iter().any(|i| i.diagnostics.contains(name) && i.expression.as_deref() == Some(name)),
        "{params:?}: no issue names '{name}': {error:?}"
    );
    error
}

/// The single criterion of a query, as a Match.
fn only_match(query: &SearchQuery) -> &Match {
    match query.criteria.as_slice() {
        [Criterion::Match(m)] => m,
        other => panic!("expected one Match, got {other:?}"),
    }
}

fn values(resource_type: &str, name: &str, value: &str) -> Vec<SearchValue> {
    only_match(&ok(resource_type, &[(name, value)])).values.clone()
}

fn token(system: TokenSystem, code: Option<&str>) -> SearchValue {
    SearchValue::Token { system, code: code.map(str::to_owned) }
}

fn reference(target_type: Option<&str>, id: Option<&str>, url: Option<&str>) -> SearchValue {
    SearchValue::Reference { target_type: target_type.map(rt), id: id.map(str::to_owned), url: url.map(str::to_owned) }
}

fn applied(query: &SearchQuery) -> Vec<(&str, &str)> {
    query.applied.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect()
}

#[test]
fn string_parameters_and_modifiers() {
    let query = ok("Patient", &[("name", "Pet")]);
    let m = only_match(&query);
    assert_eq!((m.param.as_str(), m.kind, &m.modifier), ("name", ParamType::String, &None));
    assert_eq!(m.values, [SearchValue::String("Pet".to_owned())]);
    assert!(m.chain.is_empty());
    assert_eq!(only_match(&ok("Patient", &[("name:exact", "Peter")])).modifier, Some(Modifier::Exact));
    assert_eq!(only_match(&ok("Patient", &[("family:contains", "ete")])).modifier, Some(Modifier::Contains));
    fails("Patient", &[("name:text", "x")], "name:text");
    fails("Patient", &[("name:below", "x")], "name:below");
}

#[test]
fn or_within_a_parameter_and_across_repeats() {
    let query = ok("Patient", &[("name", "a,b"), ("name", "c")]);
    assert_eq!(query.criteria.len(), 2);
    let Criterion::Match(first) = &query.criteria[0] else { panic!("match") };
    assert_eq!(first.values, [SearchValue::String("a".to_owned()), SearchValue::String("b".to_owned())]);
    assert_eq!(applied(&query), [("name", "a,b"), ("name", "c")]);
    fails("Patient", &[("name", "a,,b")], "name");
    fails("Patient", &[("name", "a,")], "name");
}

#[test]
fn escaping_splits_only_on_unescaped_separators() {
    assert_eq!(values("Patient", "name", r"a\,b"), [SearchValue::String("a,b".to_owned())]);
    assert_eq!(
        values("Patient", "name", r"a\\,b"),
        [SearchValue::String(r"a\".to_owned()), SearchValue::String("b".to_owned())]
    );
    assert_eq!(values("Patient", "name", r"x\$y\|z\q"), [SearchValue::String(r"x$y|z\q".to_owned())]);
    assert_eq!(values("Observation", "code", r"a\|b"), [token(TokenSystem::Any, Some("a|b"))]);
    assert_eq!(values("Observation", "code", r"s\,1|c\|2"), [token(TokenSystem::Is("s,1".to_owned()), Some("c|2"))]);
    // Re-encoded canonically.
    let query = ok("Patient", &[("name", r"a\,b")]);
    assert_eq!(applied(&query), [("name", r"a\,b")]);
}

#[test]
fn token_system_forms() {
    let loinc = "http://loinc.org";
    assert_eq!(values("Observation", "code", "1234-5"), [token(TokenSystem::Any, Some("1234-5"))]);
    assert_eq!(values("Observation", "code", "|1234-5"), [token(TokenSystem::None, Some("1234-5"))]);
    assert_eq!(
        values("Observation", "code", "http://loinc.org|1234-5"),
        [token(TokenSystem::Is(loinc.to_owned()), Some("1234-5"))]
    );
    assert_eq!(values("Observation", "code", "http://loinc.org|"), [token(TokenSystem::Is(loinc.to_owned()), None)]);
    fails("Observation", &[("code", "|")], "code");
    fails("Observation", &[("code", "a|b|c")], "code");
    let query = ok("Observation", &[("code", "http://loinc.org|1,|2")]);
    assert_eq!(applied(&query), [("code", "http://loinc.org|1,|2")]);
}

#[test]
fn token_modifiers() {
    let m = only_match(&ok("Observation", &[("code:text", "blood pressure")])).clone();
    assert_eq!(m.modifier, Some(Modifier::Text));
    assert_eq!(m.kind, ParamType::Token);
    assert_eq!(m.values, [SearchValue::String("blood pressure".to_owned())]);
    let m = only_match(&ok("Patient", &[("gender:not", "male")])).clone();
    assert_eq!(m.modifier, Some(Modifier::Not));
    assert_eq!(m.values, [token(TokenSystem::Any, Some("male"))]);
    let m =
        only_match(&ok("Patient", &[("identifier:of-type", "http://terminology.hl7.org/CodeSystem/v2-0203|MR|42")]))
            .clone();
    assert_eq!(m.modifier, Some(Modifier::OfType));
    assert_eq!(
        m.values,
        [SearchValue::OfType {
            type_system: "http://terminology.hl7.org/CodeSystem/v2-0203".to_owned(),
            type_code: "MR".to_owned(),
            value: "42".to_owned(),
        }]
    );
    fails("Patient", &[("identifier:of-type", "MR|42")], "identifier:of-type");
    fails("Patient", &[("gender:of-type", "a|b|c")], "gender:of-type");
    fails("Patient", &[("gender:exact", "male")], "gender:exact");
    fails("Patient", &[("gender:contains", "male")], "gender:contains");
    for unsupported in ["code:in", "code:not-in", "code:below", "code:above"] {
        let query = ok("Observation", &[(unsupported, "http://x")]);
        assert!(query.criteria.is_empty());
        assert_eq!(query.ignored.len(), 1, "{unsupported}");
        assert_eq!(query.ignored[0].name, unsupported);
        assert!(strict("Observation", &[(unsupported, "http://x")]).is_err());
    }
}

#[test]
fn id_and_common_parameters() {
    assert_eq!(
        values("Patient", "_id", "a-1,b.2"),
        [token(TokenSystem::Any, Some("a-1")), token(TokenSystem::Any, Some("b.2"))]
    );
    fails("Patient", &[("_id", "not an id")], "_id");
    assert_eq!(only_match(&ok("Patient", &[("_lastUpdated", "gt2024")])).kind, ParamType::Date);
    assert_eq!(only_match(&ok("Patient", &[("_tag", "http://s|t")])).kind, ParamType::Token);
    assert_eq!(only_match(&ok("Patient", &[("_security", "R")])).kind, ParamType::Token);
    assert_eq!(only_match(&ok("Patient", &[("_profile", "http://p")])).kind, ParamType::Uri);
    assert_eq!(only_match(&ok("Patient", &[("_source", "http://s")])).kind, ParamType::Uri);
    assert_eq!(only_match(&ok("Patient", &[("_id:not", "x")])).modifier, Some(Modifier::Not));
}

#[test]
fn reference_forms() {
    assert_eq!(values("Observation", "subject", "Patient/1"), [reference(Some("Patient"), Some("1"), None)]);
    assert_eq!(values("Observation", "subject", "1"), [reference(None, Some("1"), None)]);
    assert_eq!(values("Observation", "subject", "Patient/1/_history/3"), [reference(Some("Patient"), Some("1"), None)]);
    assert_eq!(
        values("Observation", "subject", "http://example.org/fhir/Patient/1"),
        [reference(Some("Patient"), Some("1"), Some("http://example.org/fhir/Patient/1"))]
    );
    assert_eq!(
        values("Observation", "subject", "urn:uuid:0c3151bd-1cbf-4d64-b04d-cd9187a4c6e0"),
        [reference(None, None, Some("urn:uuid:0c3151bd-1cbf-4d64-b04d-cd9187a4c6e0"))]
    );
    assert_eq!(
        values("QuestionnaireResponse", "questionnaire", "http://x.org/Questionnaire/q|1.0"),
        [reference(None, None, Some("http://x.org/Questionnaire/q|1.0"))]
    );
    for bad in ["Foo/1", "Patient/", "Patient/1/2", "Patient/1/_history/", "not an id", "a/b/c/d/e"] {
        fails("Observation", &[("subject", bad)], "subject");
    }
}

#[test]
fn reference_modifiers() {
    let m = only_match(&ok("Observation", &[("subject:Patient", "1")])).clone();
    assert_eq!(m.modifier, Some(Modifier::Type(rt("Patient"))));
    assert_eq!(m.values, [reference(Some("Patient"), Some("1"), None)]);
    assert_eq!(values("Observation", "subject:Patient", "Patient/1"), [reference(Some("Patient"), Some("1"), None)]);
    fails("Observation", &[("subject:Patient", "Group/1")], "subject:Patient");
    fails("Observation", &[("subject:Medication", "1")], "subject:Medication");
    fails("Observation", &[("subject:Nonsense", "1")], "subject:Nonsense");
    let m = only_match(&ok("Observation", &[("subject:identifier", "http://hospital|123")])).clone();
    assert_eq!(m.modifier, Some(Modifier::Identifier));
    assert_eq!(m.kind, ParamType::Reference);
    assert_eq!(m.values, [token(TokenSystem::Is("http://hospital".to_owned()), Some("123"))]);
    let query = ok("Observation", &[("subject:above", "Patient/1")]);
    assert_eq!(query.ignored.len(), 1);
    fails("Observation", &[("subject:exact", "Patient/1")], "subject:exact");
}

#[test]
fn date_prefixes_and_precision() {
    let SearchValue::Date { prefix, start, end } = &values("Patient", "birthdate", "2020")[0] else { panic!("date") };
    assert_eq!((*prefix, *start, *end), (Prefix::Eq, datetime!(2020-01-01 0:00 UTC), datetime!(2021-01-01 0:00 UTC)));
    for (text, expected) in [
        ("eq", Prefix::Eq),
        ("ne", Prefix::Ne),
        ("gt", Prefix::Gt),
        ("lt", Prefix::Lt),
        ("ge", Prefix::Ge),
        ("le", Prefix::Le),
        ("sa", Prefix::Sa),
        ("eb", Prefix::Eb),
        ("ap", Prefix::Ap),
    ] {
        let value = format!("{text}2020-03-04T10:00:00+01:00");
        let SearchValue::Date { prefix, start, end } = &values("Patient", "birthdate", &value)[0] else {
            panic!("date")
        };
        assert_eq!(*prefix, expected);
        assert_eq!((*start, *end), (datetime!(2020-03-04 9:00 UTC), datetime!(2020-03-04 9:00:01 UTC)));
    }
    let query = ok("Patient", &[("birthdate", "eq2020-01"), ("birthdate", "lt2021")]);
    assert_eq!(applied(&query), [("birthdate", "2020-01"), ("birthdate", "lt2021")]);
    for bad in ["2020-13", "xx2020", "g2020", "GT2020", "2020-01-01T25:00", "now", "2020/01/01", "gt"] {
        fails("Patient", &[("birthdate", bad)], "birthdate");
    }
    fails("Patient", &[("birthdate:exact", "2020")], "birthdate:exact");
}

#[test]
fn number_precision_and_prefixes() {
    let number = |v: &str| values("RiskAssessment", "probability", v).remove(0);
    assert_eq!(number("100"), SearchValue::Number { prefix: Prefix::Eq, value: 100.0, low: 99.5, high: 100.5 });
    assert_eq!(number("1e2"), SearchValue::Number { prefix: Prefix::Eq, value: 100.0, low: 50.0, high: 150.0 });
    let SearchValue::Number { prefix, value, low, high } = number("gt0.5") else { panic!("number") };
    assert_eq!((prefix, value), (Prefix::Gt, 0.5));
    assert!((low - 0.45).abs() < 1e-12 && (high - 0.55).abs() < 1e-12);
    let SearchValue::Number { prefix, value, low, high } = number("ap-1.50") else { panic!("number") };
    assert_eq!(prefix, Prefix::Ap);
    assert_eq!(value, -1.5);
    assert!((low + 1.505).abs() < 1e-12 && (high + 1.495).abs() < 1e-12);
    for bad in ["1.2.3", "abc", "1,5e", ".5", "5.", "1e", "1e+", "--1", "1e99999", "zz5", "5 "] {
        fails("RiskAssessment", &[("probability", bad)], "probability");
    }
}

#[test]
fn quantity_forms() {
    let quantity = |v: &str| values("Observation", "value-quantity", v).remove(0);
    let SearchValue::Quantity { prefix, value, system, code, canonical, .. } =
        quantity("5.4|http://unitsofmeasure.org|mg")
    else {
        panic!("quantity")
    };
    assert_eq!((prefix, value), (Prefix::Eq, 5.4));
    assert_eq!((system.as_deref(), code.as_deref()), (Some("http://unitsofmeasure.org"), Some("mg")));
    let (canonical_value, canonical_code) = canonical.expect("mg has a canonical form");
    assert!((canonical_value - 0.0054).abs() < 1e-12);
    assert_eq!(canonical_code, "g");
    let SearchValue::Quantity { prefix, value, low, high, system, code, canonical } = quantity("le5.4") else {
        panic!("quantity")
    };
    assert_eq!((prefix, value, system, code, canonical), (Prefix::Le, 5.4, None, None, None));
    assert!((low - 5.35).abs() < 1e-12 && (high - 5.45).abs() < 1e-12);
    let SearchValue::Quantity { system, code, canonical, .. } = quantity("5.4||mg") else { panic!("quantity") };
    assert_eq!((system, code.as_deref(), canonical), (None, Some("mg"), None));
    let query = ok("Observation", &[("value-quantity", "ge5.4||mg")]);
    assert_eq!(applied(&query), [("value-quantity", "ge5.4||mg")]);
    for bad in ["5.4|mg", "abc", "5.4|a|b|c", "xx5|s|c", "|s|c"] {
        fails("Observation", &[("value-quantity", bad)], "value-quantity");
    }
}

#[test]
fn uri_modifiers() {
    assert_eq!(values("ValueSet", "url", "http://x.org/vs"), [SearchValue::Uri("http://x.org/vs".to_owned())]);
    assert_eq!(only_match(&ok("ValueSet", &[("url:below", "http://x.org/")])).modifier, Some(Modifier::Below));
    assert_eq!(only_match(&ok("ValueSet", &[("url:above", "http://x.org/a/b")])).modifier, Some(Modifier::Above));
    fails("ValueSet", &[("url:contains", "x")], "url:contains");
    fails("ValueSet", &[("url:exact", "x")], "url:exact");
}

#[test]
fn composite_values_parse_each_component_by_its_type() {
    let value = r"http://loinc.org|8480-6$gt100|http://unitsofmeasure.org|mm[Hg]";
    let parsed = values("Observation", "code-value-quantity", value);
    let [SearchValue::Composite(parts)] = parsed.as_slice() else { panic!("one composite") };
    assert_eq!(parts[0], token(TokenSystem::Is("http://loinc.org".to_owned()), Some("8480-6")));
    let SearchValue::Quantity { prefix, value: number, code, canonical, .. } = &parts[1] else { panic!("quantity") };
    assert_eq!((*prefix, *number, code.as_deref()), (Prefix::Gt, 100.0, Some("mm[Hg]")));
    assert!(canonical.is_some());
    let query = ok("Observation", &[("code-value-quantity", value)]);
    assert_eq!(applied(&query), [("code-value-quantity", value)]);
    // An escaped `$` stays inside its component; OR across composites.
    let parsed = values("Observation", "code-value-string", r"a\$b$x,c$y");
    let [SearchValue::Composite(parts), SearchValue::Composite(_)] = parsed.as_slice() else {
        panic!("two composites")
    };
    assert_eq!(parts[0], token(TokenSystem::Any, Some("a$b")));
    assert_eq!(parts[1], SearchValue::String("x".to_owned()));
    for bad in ["a", "a$b$c", "a$", "$5", "a$notanumber"] {
        fails("Observation", &[("code-value-quantity", bad)], "code-value-quantity");
    }
    fails("Observation", &[("code-value-quantity:exact", "a$5")], "code-value-quantity:exact");
}

#[test]
fn missing_modifier() {
    let query = ok("Patient", &[("birthdate:missing", "true"), ("name:missing", "false")]);
    assert_eq!(
        query.criteria,
        [
            Criterion::Missing { chain: vec![], param: "birthdate".to_owned(), kind: ParamType::Date, missing: true },
            Criterion::Missing { chain: vec![], param: "name".to_owned(), kind: ParamType::String, missing: false },
        ]
    );
    assert_eq!(applied(&query), [("birthdate:missing", "true"), ("name:missing", "false")]);
    for bad in ["yes", "TRUE", "true,false", "1"] {
        fails("Patient", &[("birthdate:missing", bad)], "birthdate:missing");
    }
}

#[test]
fn chains_one_and_two_deep() {
    let query = ok("Observation", &[("subject:Patient.name", "peter")]);
    let m = only_match(&query);
    assert_eq!(m.chain, [ChainLink { param: "subject".to_owned(), targets: vec![rt("Patient")] }]);
    assert_eq!((m.param.as_str(), m.kind), ("name", ParamType::String));
    assert_eq!(applied(&query), [("subject:Patient.name", "peter")]);

    let query = ok("Observation", &[("subject:Patient.organization.name:exact", "Acme")]);
    let m = only_match(&query);
    assert_eq!(
        m.chain,
        [
            ChainLink { param: "subject".to_owned(), targets: vec![rt("Patient")] },
            ChainLink { param: "organization".to_owned(), targets: vec![rt("Organization")] },
        ]
    );
    assert_eq!((m.param.as_str(), &m.modifier), ("name", &Some(Modifier::Exact)));

    // Without a type: every target of `subject` that defines `name` (Patient and Location, not Device or Group).
    let m = only_match(&ok("Observation", &[("subject.name", "x")])).clone();
    assert_eq!(m.chain[0].targets, [rt("Location"), rt("Patient")]);
    // Chained missing and chained reference values.
    let query = ok("Observation", &[("subject:Patient.birthdate:missing", "true")]);
    assert!(matches!(&query.criteria[0], Criterion::Missing { chain, .. } if chain.len() == 1));
    let m = only_match(&ok("Observation", &[("subject:Patient.general-practitioner", "Practitioner/7")])).clone();
    assert_eq!(m.values, [reference(Some("Practitioner"), Some("7"), None)]);
    // `encounter.subject.name`: the middle link must be a reference parameter on the targets.
    let m = only_match(&ok("Observation", &[("encounter.subject.name", "x")])).clone();
    assert_eq!(m.chain.len(), 2);
    assert_eq!(m.chain[1].targets, [rt("Patient")]);
}

#[test]
fn chain_errors() {
    fails("Observation", &[("subject.nosuch", "x")], "subject.nosuch");
    fails("Observation", &[("code.name", "x")], "code.name");
    fails("Observation", &[("subject:Medication.name", "x")], "subject:Medication.name");
    fails("Observation", &[("subject:Foo.name", "x")], "subject:Foo.name");
    fails("Observation", &[("subject:missing.name", "x")], "subject:missing.name");
    fails("Observation", &[("subject.", "x")], "subject.");
    fails("Observation", &[("subject..name", "x")], "subject..name");
    fails("Observation", &[("subject:Patient.name.family", "x")], "subject:Patient.name.family");
    fails("Observation", &[("subject:Patient.birthdate", "notadate")], "subject:Patient.birthdate");
    // An unknown first link is an unknown parameter (ignored when lenient).
    assert_eq!(ok("Observation", &[("nosuch.name", "x")]).ignored.len(), 1);
}

#[test]
fn reverse_chains_nest() {
    let query = ok("Patient", &[("_has:Observation:patient:code", "1234-5")]);
    let [Criterion::Has(Has { resource_type, reference_param, criterion })] = query.criteria.as_slice() else {
        panic!("has")
    };
    assert_eq!((*resource_type, reference_param.as_str()), (rt("Observation"), "patient"));
    assert!(matches!(criterion.as_ref(), Criterion::Match(m) if m.param == "code"));
    assert_eq!(applied(&query), [("_has:Observation:patient:code", "1234-5")]);

    let name = "_has:Observation:subject:_has:Provenance:target:agent";
    let query = ok("Patient", &[(name, "Practitioner/1")]);
    let [Criterion::Has(outer)] = query.criteria.as_slice() else { panic!("has") };
    let Criterion::Has(inner) = outer.criterion.as_ref() else { panic!("nested has") };
    assert_eq!((inner.resource_type, inner.reference_param.as_str()), (rt("Provenance"), "target"));
    assert!(matches!(inner.criterion.as_ref(), Criterion::Match(m) if m.param == "agent"));
    assert_eq!(applied(&query), [(name, "Practitioner/1")]);

    let query = ok("Patient", &[("_has:Observation:patient:subject:Patient.name:missing", "false")]);
    let [Criterion::Has(has)] = query.criteria.as_slice() else { panic!("has") };
    assert!(matches!(has.criterion.as_ref(), Criterion::Missing { chain, .. } if chain.len() == 1));

    for bad in [
        "_has:Observation:code:code",
        "_has:Foo:patient:code",
        "_has:Observation:patient",
        "_has:Observation",
        "_has",
        "_has:Observation:patient:nosuch",
        "_has:Observation::code",
        "link._has:Observation:patient:code",
    ] {
        fails("Patient", &[(bad, "x")], bad);
    }
    // Observation.patient cannot refer to an Organization.
    fails("Organization", &[("_has:Observation:patient:code", "x")], "_has:Observation:patient:code");
}

#[test]
fn include_and_revinclude_forms() {
    let query = ok(
        "Observation",
        &[
            ("_include", "Observation:subject"),
            ("_include", "Observation:subject:Patient"),
            ("_include:iterate", "Patient:general-practitioner"),
            ("_include:recurse", "Observation:*"),
            ("_revinclude", "Provenance:target"),
            ("_revinclude:iterate", "Observation:has-member:Observation"),
        ],
    );
    let include = |source: &str, param: Option<&str>, target: Option<&str>, iterate| Include {
        source_type: rt(source),
        param: param.map(str::to_owned),
        target_type: target.map(rt),
        iterate,
    };
    assert_eq!(
        query.includes,
        [
            include("Observation", Some("subject"), None, false),
            include("Observation", Some("subject"), Some("Patient"), false),
            include("Patient", Some("general-practitioner"), None, true),
            include("Observation", None, None, true),
        ]
    );
    assert_eq!(
        query.revincludes,
        [
            include("Provenance", Some("target"), None, false),
            include("Observation", Some("has-member"), Some("Observation"), true),
        ]
    );
    assert_eq!(applied(&query)[3], ("_include:iterate", "Observation:*"));
    for (name, bad) in [
        ("_include", "Observation"),
        ("_include", "Observation:code"),
        ("_include", "Observation:subject:Medication"),
        ("_include", "Foo:bar"),
        ("_include", "Observation:subject:Patient:x"),
        ("_include", "*"),
        ("_revinclude", "Provenance:nosuch"),
        ("_include:deep", "Observation:subject"),
    ] {
        fails("Observation", &[(name, bad)], name);
    }
}

#[test]
fn sort_keys() {
    let query = ok("Patient", &[("_sort", "-birthdate,name,_id,-_lastUpdated")]);
    let key = |param: &str, kind, descending| SortKey { param: param.to_owned(), kind, descending };
    assert_eq!(
        query.sort,
        [
            key("birthdate", ParamType::Date, true),
            key("name", ParamType::String, false),
            key("_id", ParamType::Token, false),
            key("_lastUpdated", ParamType::Date, true),
        ]
    );
    assert_eq!(applied(&query), [("_sort", "-birthdate,name,_id,-_lastUpdated")]);
    // Unknown or unsortable keys: ignored when lenient, errors when strict.
    let query = ok("Observation", &[("_sort", "nosuch,date,code-value-quantity")]);
    assert_eq!(query.sort, [key("date", ParamType::Date, false)]);
    assert_eq!(query.ignored.len(), 2);
    assert_eq!(applied(&query), [("_sort", "date")]);
    assert!(strict("Observation", &[("_sort", "nosuch")]).is_err());
    assert!(strict("Observation", &[("_sort", "code-value-quantity")]).is_err());
    assert!(strict("Patient", &[("_sort", "subject.name")]).is_err());
    fails("Patient", &[("_sort", "name,,birthdate")], "_sort");
    fails("Patient", &[("_sort", "-")], "_sort");
}

#[test]
fn count_total_summary_elements() {
    let query = ok("Patient", &[]);
    assert_eq!((query.count, query.total, query.summary, &query.elements), (20, TotalMode::Estimate, None, &None));
    assert_eq!(ok("Patient", &[("_count", "0")]).count, 0);
    assert_eq!(ok("Patient", &[("_count", "50")]).count, 50);
    let capped = ok("Patient", &[("_count", "5000")]);
    assert_eq!(capped.count, 1000);
    assert_eq!(applied(&capped), [("_count", "1000")]);
    assert_eq!(ok("Patient", &[("_count", "99999999999999999999999999")]).count, 1000);
    let options = ParseOptions { strict: false, default_count: 10, max_count: 5 };
    assert_eq!(parse_search(&SearchScope::Type(rt("Patient")), &[], &options).map(|q| q.count), Ok(5));
    for bad in ["-1", "abc", "1.5", "+3", " 3"] {
        fails("Patient", &[("_count", bad)], "_count");
    }
    assert_eq!(ok("Patient", &[("_total", "none")]).total, TotalMode::None);
    assert_eq!(ok("Patient", &[("_total", "estimate")]).total, TotalMode::Estimate);
    assert_eq!(ok("Patient", &[("_total", "accurate")]).total, TotalMode::Accurate);
    fails("Patient", &[("_total", "all")], "_total");
    assert_eq!(ok("Patient", &[("_summary", "count")]).summary, Some(SummaryMode::Count));
    assert_eq!(ok("Patient", &[("_summary", "true")]).summary, Some(SummaryMode::True));
    fails("Patient", &[("_summary", "yes")], "_summary");
    let query = ok("Patient", &[("_elements", "name,birthDate"), ("_elements", "name,gender")]);
    assert_eq!(query.elements, Some(vec!["name".to_owned(), "birthDate".to_owned(), "gender".to_owned()]));
    fails("Patient", &[("_elements", "na me")], "_elements");
    fails("Patient", &[("_elements", "name,")], "_elements");
}

#[test]
fn presentation_and_empty_parameters() {
    let query = ok("Patient", &[("_format", "json"), ("_pretty", "true"), ("name", ""), ("gender", "male")]);
    assert_eq!(applied(&query), [("gender", "male")]);
    assert_eq!(query.ignored, [Ignored { name: "name".to_owned(), reason: "empty value".to_owned() }]);
    assert!(strict("Patient", &[("_format", "xml"), ("_pretty", "false")]).is_ok());
}

#[test]
fn applied_is_canonical_and_in_request_order() {
    let query = ok(
        "Patient",
        &[
            ("birthdate", "eq2020"),
            ("_count", "10"),
            ("name", r"a\,b"),
            ("_format", "json"),
            ("foo", "bar"),
            ("_sort", "name"),
            ("gender:not", "male"),
        ],
    );
    assert_eq!(
        applied(&query),
        [("birthdate", "2020"), ("_count", "10"), ("name", r"a\,b"), ("_sort", "name"), ("gender:not", "male"),]
    );
    // Re-parsing the applied parameters gives the same query.
    let again = ok("Patient", &query.applied.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect::<Vec<_>>());
    assert_eq!(again.criteria, query.criteria);
    assert_eq!(again.applied, query.applied);
}

#[test]
fn strict_and_lenient_unknown_parameters() {
    let query = ok("Patient", &[("foo", "bar"), ("name", "x")]);
    assert_eq!(query.criteria.len(), 1);
    assert_eq!(query.ignored.len(), 1);
    assert_eq!(query.ignored[0].name, "foo");
    assert!(query.ignored[0].reason.contains("unknown"));
    let error = strict("Patient", &[("foo", "bar"), ("name", "x"), ("bar", "1")]).expect_err("strict");
    assert_eq!(error.issues.len(), 2);
    assert_eq!(error.issues[0].code, IssueType::NotSupported);
    assert_eq!(error.issues[0].expression.as_deref(), Some("foo"));
    assert!(error.to_string().contains("foo") && error.to_string().contains("bar"));

    for name in ["_text", "_content", "_query", "_filter", "_list", "_contained", "_containedType", "_text:exact"] {
        let query = ok("Patient", &[(name, "x")]);
        assert_eq!(query.ignored.len(), 1, "{name}");
        assert!(query.criteria.is_empty());
        assert!(strict("Patient", &[(name, "x")]).is_err(), "{name}");
    }
    let query = ok("Location", &[("near", "42.2|-83.6|10|km")]);
    assert_eq!(query.ignored.len(), 1);
    assert!(strict("Location", &[("near", "42.2|-83.6|10|km")]).is_err());
    assert_eq!(ok("Patient", &[("_type", "Patient")]).ignored.len(), 1);
}

#[test]
fn system_scope_resolves_against_every_searched_type() {
    let system = |params: &[(&str, &str)], strict| run(&SearchScope::System, params, strict);
    let query = system(&[("_id", "1")], false).expect("parses");
    assert_eq!(query.types.len(), ResourceType::all().len());
    let query =
        system(&[("_type", "Practitioner,Patient"), ("name", "x"), ("_sort", "family")], false).expect("parses");
    assert_eq!(query.types, [rt("Patient"), rt("Practitioner")]);
    assert_eq!(query.criteria.len(), 1);
    assert_eq!(query.sort.len(), 1, "{:?}", query.ignored);
    assert_eq!(applied(&query)[0], ("_type", "Practitioner,Patient"));
    // `name` is not defined on Observation.
    let query = system(&[("_type", "Patient,Observation"), ("name", "x")], false).expect("parses");
    assert!(query.criteria.is_empty());
    assert_eq!(query.ignored.len(), 1);
    assert!(system(&[("_type", "Patient,Observation"), ("name", "x")], true).is_err());
    // Without _type only the common parameters apply.
    let query = system(&[("_lastUpdated", "gt2020"), ("_tag", "x"), ("name", "x")], false).expect("parses");
    assert_eq!(query.criteria.len(), 2);
    assert_eq!(query.ignored.len(), 1);
    // Repeats intersect.
    let query = system(&[("_type", "Patient,Observation"), ("_type", "Observation,Condition")], false).expect("parses");
    assert_eq!(query.types, [rt("Observation")]);
    let error = system(&[("_type", "Patient,Foo")], false).expect_err("unknown type");
    assert_eq!(error.issues[0].expression.as_deref(), Some("_type"));
}

fn compartment(compartment: &str, id: &str, member: Option<&str>) -> Result<SearchQuery, SearchError> {
    let scope = SearchScope::Compartment { compartment: rt(compartment), id: id.to_owned(), member: member.map(rt) };
    run(&scope, &[("_count", "5")], false)
}

fn alternatives(query: &SearchQuery) -> Vec<(String, SearchValue)> {
    let [Criterion::AnyOf(alternatives)] = query.criteria.as_slice() else { panic!("one AnyOf") };
    alternatives
        .iter()
        .map(|c| match c {
            Criterion::Match(m) => (m.param.clone(), m.values[0].clone()),
            other => panic!("unexpected {other:?}"),
        })
        .collect()
}

#[test]
fn compartment_scope_adds_membership() {
    let patient_1 = reference(Some("Patient"), Some("1"), None);
    let query = compartment("Patient", "1", Some("Observation")).expect("parses");
    assert_eq!(query.types, [rt("Observation")]);
    assert_eq!(
        alternatives(&query),
        [("subject".to_owned(), patient_1.clone()), ("performer".to_owned(), patient_1.clone())]
    );
    assert_eq!(applied(&query), [("_count", "5")]);
    // The owner is in its own compartment.
    let query = compartment("Patient", "1", Some("Patient")).expect("parses");
    assert_eq!(
        alternatives(&query),
        [("link".to_owned(), patient_1.clone()), ("_id".to_owned(), token(TokenSystem::Any, Some("1")))]
    );
    let query = compartment("Encounter", "e1", Some("Encounter")).expect("parses");
    assert_eq!(alternatives(&query), [("_id".to_owned(), token(TokenSystem::Any, Some("e1")))]);
    // `*`: every member type, the union of their parameters, never `_id`.
    let query = compartment("Patient", "1", None).expect("parses");
    assert!(query.types.contains(&rt("Observation")) && query.types.contains(&rt("Condition")));
    assert!(!query.types.contains(&rt("Binary")));
    let names: Vec<String> = alternatives(&query).into_iter().map(|(n, _)| n).collect();
    assert!(names.contains(&"subject".to_owned()) && names.contains(&"patient".to_owned()));
    assert!(!names.contains(&"_id".to_owned()));
    assert!(compartment("Patient", "1", Some("Binary")).is_err());
    assert!(compartment("Observation", "1", Some("Patient")).is_err());
    assert!(compartment("Patient", "not an id", Some("Observation")).is_err());
    // Parameters are resolved against the member type.
    let scope =
        SearchScope::Compartment { compartment: rt("Patient"), id: "1".to_owned(), member: Some(rt("Observation")) };
    let query = run(&scope, &[("code", "x"), ("name", "y")], false).expect("parses");
    assert_eq!(query.criteria.len(), 2);
    assert_eq!(query.ignored.len(), 1);
}

#[test]
fn malformed_inputs_name_their_parameter() {
    let table: &[(&str, &str, &str)] = &[
        ("Patient", "birthdate", "2020-02-30"),
        ("Patient", "birthdate", "zz2020"),
        ("Patient", "_lastUpdated", "yesterday"),
        ("RiskAssessment", "probability", "1/2"),
        ("Observation", "value-quantity", "5|a"),
        ("Observation", "subject", "Patient/a b"),
        ("Observation", "subject:Patient", "Group/1"),
        ("Patient", "gender:foo", "x"),
        ("Patient", "name:missing", "maybe"),
        ("Observation", "subject.nothing", "x"),
        ("Patient", "_count", "-5"),
        ("Patient", "_total", "some"),
        ("Patient", "_summary", "TRUE"),
        ("Patient", "_include", "Patient"),
        ("Patient", "_revinclude", "Observation:code"),
        ("Patient", "_elements", "a b"),
        ("Patient", "_sort", ","),
        ("Patient", "identifier:of-type", "a|b"),
        ("Observation", "code-value-quantity", "a$b$c"),
        ("ValueSet", "url:contains", "x"),
        ("Patient", "_has:Observation:nope:code", "x"),
        ("Patient", "_id", "a/b"),
    ];
    for (resource_type, name, value) in table {
        let error = fails(resource_type, &[(name, value)], name);
        assert!(error.issues.iter().all(|i| i.code == IssueType::Invalid), "{name}: {error:?}");
        // Malformed values are errors in lenient and strict mode alike.
        assert!(strict(resource_type, &[(name, value)]).is_err());
    }
}

#[test]
fn random_garbage_never_panics() {
    let alphabet: Vec<char> = r"abcTZ019.:-_|$,\/+ *éü%&=<>ge".chars().collect();
    let names = [
        "name",
        "birthdate",
        "code",
        "subject",
        "value-quantity",
        "probability",
        "url",
        "code-value-quantity",
        "_has:Observation:patient:code",
        "subject:Patient.name",
        "_sort",
        "_count",
        "_include",
        "_revinclude:iterate",
        "_elements",
        "_type",
        "identifier:of-type",
    ];
    let types = [rt("Patient"), rt("Observation"), rt("RiskAssessment"), rt("ValueSet")];
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for round in 0..3000 {
        let mut garbage = |max: u64| -> String {
            let len = next() % max;
            (0..len).map(|_| alphabet[(next() % alphabet.len() as u64) as usize]).collect()
        };
        let value = garbage(24);
        let name = if round % 3 == 0 { garbage(20) } else { names[round % names.len()].to_owned() };
        let suffix = if round % 5 == 0 { garbage(8) } else { String::new() };
        let params = vec![(format!("{name}{suffix}"), value)];
        let scope = match round % 6 {
            0 => SearchScope::System,
            1 => SearchScope::Compartment { compartment: rt("Patient"), id: "1".to_owned(), member: None },
            _ => SearchScope::Type(types[round % types.len()]),
        };
        for strict in [false, true] {
            let options = ParseOptions { strict, ..ParseOptions::default() };
            if let Err(error) = parse_search(&scope, &params, &options) {
                assert!(!error.issues.is_empty());
                assert!(error.issues.iter().all(|i| i.expression.is_some()), "{params:?}: {error:?}");
            }
        }
    }
}
