//! Decision matrices, written out by hand: every cell is an expectation, not a computation.

use super::*;
use crate::error::ErrorCategory;

const LAB: &str = "http://terminology.hl7.org/CodeSystem/observation-category|laboratory";
const VITALS: &str = "http://terminology.hl7.org/CodeSystem/observation-category|vital-signs";
const PATIENT_ID: &str = "p1";

fn ty(name: &str) -> Option<ResourceType> {
    Some(ResourceType::parse(name).expect("a resource type"))
}

/// Parses a hand-written table: one row per interaction, `name mark mark …`, one mark per column.
fn table(text: &str, columns: usize) -> Vec<(Interaction, Vec<char>)> {
    let rows: Vec<(Interaction, Vec<char>)> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(|line| {
            let mut words = line.split_whitespace();
            let name = words.next().unwrap_or_default();
            let interaction = Interaction::parse(name).unwrap_or_else(|| panic!("table row {name:?}"));
            let marks: Vec<char> = words.flat_map(str::chars).collect();
            assert_eq!(marks.len(), columns, "row {name:?}");
            (interaction, marks)
        })
        .collect();
    let listed: Vec<Interaction> = rows.iter().map(|(interaction, _)| *interaction).collect();
    assert_eq!(listed, Interaction::ALL, "a table lists every interaction once, in order");
    rows
}

/// Checks every cell; reports all mismatches at once.
fn assert_table(
    label: &str,
    access: &Access,
    columns: &[Option<ResourceType>],
    text: &str,
    expected: impl Fn(char) -> Option<Permit>,
) {
    let mut mismatches = Vec::new();
    for (interaction, marks) in table(text, columns.len()) {
        for (resource_type, mark) in columns.iter().zip(marks) {
            let actual = access.check(interaction, *resource_type);
            let ok = match (expected(mark), &actual) {
                (Some(permit), Ok(actual)) => &permit == actual,
                (None, Err(error)) => error.category == ErrorCategory::Forbidden,
                _ => false,
            };
            if !ok {
                let expected = expected(mark);
                mismatches.push(format!("{interaction} on {resource_type:?}: expected {expected:?}, got {actual:?}"));
            }
        }
    }
    assert!(mismatches.is_empty(), "{label}:\n{}", mismatches.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// RBAC

const RBAC_COLUMNS: [&str; 7] =
    ["Patient", "Observation", "Claim", "Coverage", "ExplanationOfBenefit", "Practitioner", "-"];

//                  Patient Observation Claim Coverage ExplanationOfBenefit Practitioner (none)
const PRACTITIONER: &str = "
    read              Y Y Y Y Y Y .
    vread             Y Y Y Y Y Y .
    history-instance  Y Y Y Y Y Y .
    history-type      Y Y Y Y Y Y .
    history-system    Y Y Y Y Y Y Y
    search-type       Y Y Y Y Y Y .
    search-system     Y Y Y Y Y Y Y
    create            Y Y Y Y Y Y .
    update            Y Y Y Y Y Y .
    patch             Y Y Y Y Y Y .
    delete            Y Y Y Y Y Y .
    transaction       Y Y Y Y Y Y Y
    batch             Y Y Y Y Y Y Y
    operation         Y Y Y Y Y Y Y
";

const NON_PRACTITIONER: &str = "
    read              . . Y Y Y . .
    vread             . . Y Y Y . .
    history-instance  . . Y Y Y . .
    history-type      . . . . . . .
    history-system    . . . . . . .
    search-type       . . Y Y Y . .
    search-system     . . . . . . .
    create            . . . . . . .
    update            . . . . . . .
    patch             . . . . . . .
    delete            . . . . . . .
    transaction       Y Y Y Y Y Y Y
    batch             Y Y Y Y Y Y Y
    operation         . . . . . . .
";

const AUDITOR: &str = "
    read              Y . . . . . .
    vread             Y . . . . . .
    history-instance  . . . . . . .
    history-type      . . . . . . .
    history-system    . . . . . . .
    search-type       Y . . . . . .
    search-system     . . . . . . .
    create            . . . . . . .
    update            . . . . . . .
    patch             . . . . . . .
    delete            . . . . . . .
    transaction       Y Y Y Y Y Y Y
    batch             Y Y Y Y Y Y Y
    operation         . . . . . . .
";

fn rbac_columns() -> Vec<Option<ResourceType>> {
    RBAC_COLUMNS.iter().map(|name| if *name == "-" { None } else { ty(name) }).collect()
}

fn member_of(groups: &[&str]) -> Principal {
    Principal {
        subject: "user-1".to_owned(),
        groups: groups.iter().map(|g| (*g).to_owned()).collect(),
        ..Principal::default()
    }
}

fn rbac_access(groups: &[&str]) -> Result<Access, FhirError> {
    Access::for_principal(&AccessPolicy::Rbac(RbacRules::fhir_works_defaults()), &member_of(groups))
}

fn yes_all(mark: char) -> Option<Permit> {
    match mark {
        'Y' => Some(Permit::All),
        '.' => None,
        other => panic!("mark {other:?}"),
    }
}

#[test]
fn rbac_default_groups_matrix() {
    for (group, expected) in
        [("practitioner", PRACTITIONER), ("non-practitioner", NON_PRACTITIONER), ("auditor", AUDITOR)]
    {
        let access = rbac_access(&[group]).expect("a known group");
        assert!(!access.is_unrestricted());
        assert_table(group, &access, &rbac_columns(), expected, yes_all);
    }
}

#[test]
fn rbac_several_groups_get_the_union() {
    let access = rbac_access(&["auditor", "non-practitioner", "unknown-group"]).expect("known groups");
    let union = "
        read              Y . Y Y Y . .
        vread             Y . Y Y Y . .
        history-instance  . . Y Y Y . .
        history-type      . . . . . . .
        history-system    . . . . . . .
        search-type       Y . Y Y Y . .
        search-system     . . . . . . .
        create            . . . . . . .
        update            . . . . . . .
        patch             . . . . . . .
        delete            . . . . . . .
        transaction       Y Y Y Y Y Y Y
        batch             Y Y Y Y Y Y Y
        operation         . . . . . . .
    ";
    assert_table("auditor + non-practitioner", &access, &rbac_columns(), union, yes_all);
}

#[test]
fn rbac_without_a_matching_group_is_forbidden() {
    for groups in [&[][..], &["Practitioner"], &["admin", "nurse"]] {
        let error = rbac_access(groups).expect_err("no group with rules");
        assert_eq!(error.category, ErrorCategory::Forbidden, "{groups:?}");
        assert_eq!(error.http_status(), 403);
    }
    // SMART scopes mean nothing to group rules.
    let principal = Principal { scopes: vec!["system/*.*".to_owned()], ..member_of(&[]) };
    let policy = AccessPolicy::Rbac(RbacRules::fhir_works_defaults());
    assert!(Access::for_principal(&policy, &principal).is_err());
}

#[test]
fn rbac_system_level_needs_a_wildcard_type_grant() {
    let rules: RbacRules = toml::from_str(
        r#"
        [groups.searcher]
        interactions = ["search-type", "search-system", "history-system", "operation"]
        resource_types = ["Patient", "Observation"]

        [groups.historian]
        interactions = ["history-system"]
        resource_types = ["*"]
        "#,
    )
    .expect("parses");
    assert_eq!(rules.validate(), Ok(()));
    let policy = AccessPolicy::Rbac(rules);
    let searcher = Access::for_principal(&policy, &member_of(&["searcher"])).expect("a group");
    assert_eq!(searcher.check(Interaction::SearchType, ty("Patient")), Ok(Permit::All));
    assert_eq!(searcher.check(Interaction::Operation, ty("Observation")), Ok(Permit::All));
    assert!(searcher.check(Interaction::SearchSystem, None).is_err());
    assert!(searcher.check(Interaction::HistorySystem, None).is_err());
    assert!(searcher.check(Interaction::Operation, None).is_err());
    assert_eq!(searcher.check(Interaction::Transaction, None), Ok(Permit::All));
    let historian = Access::for_principal(&policy, &member_of(&["historian"])).expect("a group");
    assert_eq!(historian.check(Interaction::HistorySystem, None), Ok(Permit::All));
    assert!(historian.check(Interaction::SearchSystem, None).is_err());
    assert!(historian.check(Interaction::Read, ty("Patient")).is_err());
}

// ---------------------------------------------------------------------------------------------
// SMART

const SMART_COLUMNS: [&str; 4] = ["Patient", "Observation", "Condition", "-"];

/// `patient/Observation.read` (v1) and `patient/Observation.rs` (v2) alike.
const PATIENT_OBSERVATION_READ: &str = "
    read              . C . .
    vread             . C . .
    history-instance  . C . .
    history-type      . C . .
    history-system    . . . .
    search-type       . C . .
    search-system     . . . .
    create            . . . .
    update            . . . .
    patch             . . . .
    delete            . . . .
    transaction       A A A A
    batch             A A A A
    operation         . C . .
";

const USER_ALL_WRITE: &str = "
    read              . . . .
    vread             . . . .
    history-instance  . . . .
    history-type      . . . .
    history-system    . . . .
    search-type       . . . .
    search-system     . . . .
    create            A A A .
    update            A A A .
    patch             A A A .
    delete            A A A .
    transaction       A A A A
    batch             A A A A
    operation         A A A A
";

const SYSTEM_ALL: &str = "
    read              A A A .
    vread             A A A .
    history-instance  A A A .
    history-type      A A A .
    history-system    A A A A
    search-type       A A A .
    search-system     A A A A
    create            A A A .
    update            A A A .
    patch             A A A .
    delete            A A A .
    transaction       A A A A
    batch             A A A A
    operation         A A A A
";

const PATIENT_ALL_READ: &str = "
    read              C C C .
    vread             C C C .
    history-instance  C C C .
    history-type      C C C .
    history-system    C C C C
    search-type       C C C .
    search-system     C C C C
    create            . . . .
    update            . . . .
    patch             . . . .
    delete            . . . .
    transaction       A A A A
    batch             A A A A
    operation         C C C C
";

const USER_PATIENT_CRUDS: &str = "
    read              A . . .
    vread             A . . .
    history-instance  A . . .
    history-type      A . . .
    history-system    . . . .
    search-type       A . . .
    search-system     . . . .
    create            A . . .
    update            A . . .
    patch             A . . .
    delete            A . . .
    transaction       A A A A
    batch             A A A A
    operation         A . . .
";

const PATIENT_OBSERVATION_LAB: &str = "
    read              . F . .
    vread             . F . .
    history-instance  . F . .
    history-type      . F . .
    history-system    . . . .
    search-type       . F . .
    search-system     . . . .
    create            . . . .
    update            . . . .
    patch             . . . .
    delete            . . . .
    transaction       A A A A
    batch             A A A A
    operation         . F . .
";

/// `patient/*.rs user/Observation.r patient/Observation.rs?category=lab`: a user grant beats the
/// compartment, which beats the filter.
const MIXED_BROADEST: &str = "
    read              C A C .
    vread             C A C .
    history-instance  C A C .
    history-type      C C C .
    history-system    C C C C
    search-type       C C C .
    search-system     C C C C
    create            . . . .
    update            . . . .
    patch             . . . .
    delete            . . . .
    transaction       A A A A
    batch             A A A A
    operation         C A C C
";

/// Two filtered scopes (unioned) and an unfiltered create.
const TWO_FILTERS_AND_CREATE: &str = "
    read              . F . .
    vread             . F . .
    history-instance  . F . .
    history-type      . F . .
    history-system    . . . .
    search-type       . F . .
    search-system     . . . .
    create            . C . .
    update            . . . .
    patch             . . . .
    delete            . . . .
    transaction       A A A A
    batch             A A A A
    operation         . C . .
";

/// `user/Observation.rs?category=lab patient/Observation.s patient/Observation.r?category=vitals`:
/// the compartment beats the user filter (search); the user filter beats the patient filter (read).
const USER_FILTER_AND_PATIENT: &str = "
    read              . F . .
    vread             . F . .
    history-instance  . F . .
    history-type      . C . .
    history-system    . . . .
    search-type       . C . .
    search-system     . . . .
    create            . . . .
    update            . . . .
    patch             . . . .
    delete            . . . .
    transaction       A A A A
    batch             A A A A
    operation         . C . .
";

/// Only `user/Patient.r` of `patient/Observation.xyz patient/Nope.read patient/Observation.sr user/Patient.r`.
const MALFORMED_IGNORED: &str = "
    read              A . . .
    vread             A . . .
    history-instance  A . . .
    history-type      . . . .
    history-system    . . . .
    search-type       . . . .
    search-system     . . . .
    create            . . . .
    update            . . . .
    patch             . . . .
    delete            . . . .
    transaction       A A A A
    batch             A A A A
    operation         A . . .
";

/// Only `patient/Condition.s` among the identity and launch scopes.
const NON_RESOURCE_IGNORED: &str = "
    read              . . . .
    vread             . . . .
    history-instance  . . . .
    history-type      . . C .
    history-system    . . . .
    search-type       . . C .
    search-system     . . . .
    create            . . . .
    update            . . . .
    patch             . . . .
    delete            . . . .
    transaction       A A A A
    batch             A A A A
    operation         . . C .
";

fn smart_principal(scopes: &str) -> Principal {
    Principal {
        subject: "alice".to_owned(),
        fhir_user: Some("https://ehr.example.org/fhir/Practitioner/pr1".to_owned()),
        client_id: Some("app".to_owned()),
        scopes: scopes.split_whitespace().map(str::to_owned).collect(),
        patient: Some(PATIENT_ID.to_owned()),
        ..Principal::default()
    }
}

fn smart_access(principal: &Principal) -> Result<Access, FhirError> {
    Access::for_principal(&AccessPolicy::Smart(SmartOptions::default()), principal)
}

fn filter(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(name, value)| ((*name).to_owned(), (*value).to_owned())).collect()
}

#[test]
fn smart_scope_matrix() {
    let lab = format!("category={LAB}");
    let vitals = format!("category={VITALS}");
    let cases: Vec<(String, &str, Option<Permit>)> = vec![
        ("patient/Observation.read".to_owned(), PATIENT_OBSERVATION_READ, None),
        ("patient/Observation.rs".to_owned(), PATIENT_OBSERVATION_READ, None),
        ("patient/Observation.r patient/Observation.s".to_owned(), PATIENT_OBSERVATION_READ, None),
        ("user/*.write".to_owned(), USER_ALL_WRITE, None),
        ("user/*.cud".to_owned(), USER_ALL_WRITE, None),
        ("system/*.*".to_owned(), SYSTEM_ALL, None),
        ("system/*.cruds".to_owned(), SYSTEM_ALL, None),
        ("patient/*.read".to_owned(), PATIENT_ALL_READ, None),
        ("user/Patient.cruds".to_owned(), USER_PATIENT_CRUDS, None),
        ("user/Patient.*".to_owned(), USER_PATIENT_CRUDS, None),
        (
            format!("patient/Observation.rs?{lab}"),
            PATIENT_OBSERVATION_LAB,
            Some(Permit::Filtered { alternatives: vec![filter(&[("category", LAB)])], patient: Some("p1".to_owned()) }),
        ),
        (format!("patient/*.rs user/Observation.r patient/Observation.rs?{lab}"), MIXED_BROADEST, None),
        (
            format!("patient/Observation.rs?{lab} patient/Observation.rs?{vitals} patient/Observation.c"),
            TWO_FILTERS_AND_CREATE,
            Some(Permit::Filtered {
                alternatives: vec![filter(&[("category", LAB)]), filter(&[("category", VITALS)])],
                patient: Some("p1".to_owned()),
            }),
        ),
        (
            format!("user/Observation.rs?{lab} patient/Observation.s patient/Observation.r?{vitals}"),
            USER_FILTER_AND_PATIENT,
            Some(Permit::Filtered { alternatives: vec![filter(&[("category", LAB)])], patient: None }),
        ),
        (
            "patient/Observation.xyz patient/Nope.read patient/Observation.sr user/Patient.r".to_owned(),
            MALFORMED_IGNORED,
            None,
        ),
        (
            "openid fhirUser profile launch launch/patient offline_access online_access patient/Condition.s".to_owned(),
            NON_RESOURCE_IGNORED,
            None,
        ),
    ];
    let columns: Vec<Option<ResourceType>> =
        SMART_COLUMNS.iter().map(|name| if *name == "-" { None } else { ty(name) }).collect();
    for (scopes, expected, filtered) in cases {
        let access = smart_access(&smart_principal(&scopes)).unwrap_or_else(|e| panic!("{scopes}: {e}"));
        assert_table(&scopes, &access, &columns, expected, |mark| match mark {
            'A' => Some(Permit::All),
            'C' => Some(Permit::PatientCompartment { patient: PATIENT_ID.to_owned() }),
            'F' => Some(filtered.clone().expect("the case names its filtered permit")),
            '.' => None,
            other => panic!("mark {other:?}"),
        });
    }
}

#[test]
fn smart_tokens_that_cannot_be_used_are_forbidden() {
    let no_patient = Principal { patient: None, ..smart_principal("patient/Observation.read user/Patient.read") };
    let no_fhir_user = Principal { fhir_user: None, ..smart_principal("user/Patient.read patient/Observation.rs") };
    let empty_patient = Principal { patient: Some(String::new()), ..smart_principal("patient/Observation.rs") };
    let cases = [
        (no_patient, "patient launch context"),
        (no_fhir_user, "fhirUser"),
        (empty_patient, "patient launch context"),
        (smart_principal(""), "no usable resource scope"),
        (smart_principal("openid fhirUser launch/patient offline_access"), "no usable resource scope"),
        (smart_principal("patient/Observation.xyz"), "no usable resource scope"),
        (smart_principal("patient/Nope.read"), "no usable resource scope"),
        (smart_principal("patient/Observation.sr"), "no usable resource scope"),
    ];
    for (principal, message) in cases {
        let error = smart_access(&principal).expect_err("unusable token");
        assert_eq!(error.category, ErrorCategory::Forbidden, "{:?}", principal.scopes);
        assert!(error.to_string().contains(message), "{:?}: {error}", principal.scopes);
    }
    // system/ scopes need neither claim.
    let backend = Principal { patient: None, fhir_user: None, ..smart_principal("system/Patient.rs") };
    let access = smart_access(&backend).expect("a backend token");
    assert_eq!(access.check(Interaction::Read, ty("Patient")), Ok(Permit::All));
}

#[test]
fn smart_options_relax_the_claim_requirements() {
    let relaxed =
        AccessPolicy::Smart(SmartOptions { user_scopes_need_fhir_user: false, patient_scopes_need_patient: false });
    let principal =
        Principal { patient: None, fhir_user: None, ..smart_principal("patient/Observation.rs user/Patient.r") };
    let access = Access::for_principal(&relaxed, &principal).expect("relaxed");
    assert_eq!(access.check(Interaction::Read, ty("Patient")), Ok(Permit::All));
    // Without a patient there is no compartment: the patient/ scope grants nothing.
    assert!(access.check(Interaction::Read, ty("Observation")).is_err());
    let only_patient_scopes = Principal { patient: None, ..smart_principal("patient/Observation.rs") };
    let error = Access::for_principal(&relaxed, &only_patient_scopes).expect_err("nothing usable");
    assert!(error.to_string().contains("no usable resource scope"), "{error}");
}

#[test]
fn smart_scopes_in_one_space_separated_entry_are_split() {
    let separate = smart_principal("patient/Observation.rs user/Patient.cruds");
    let joined =
        Principal { scopes: vec!["patient/Observation.rs  user/Patient.cruds".to_owned()], ..separate.clone() };
    assert_eq!(
        smart_access(&joined).expect("usable"),
        Access { principal: Some(joined.clone()), ..smart_access(&separate).expect("usable") }
    );
}

#[test]
fn denials_name_the_interaction_and_type_and_nothing_else() {
    let principal = Principal {
        subject: "secret-subject".to_owned(),
        patient: Some("secret-patient-42".to_owned()),
        ..smart_principal("patient/Observation.rs")
    };
    let access = smart_access(&principal).expect("usable");
    let error = access.check(Interaction::Delete, ty("Observation")).expect_err("no d");
    assert_eq!(error.category, ErrorCategory::Forbidden);
    assert_eq!(error.to_string(), "forbidden: the access token does not permit delete on Observation");
    let error = access.check(Interaction::SearchSystem, None).expect_err("no wildcard");
    assert_eq!(error.to_string(), "forbidden: the access token does not permit search-system");
    for error in [
        smart_access(&Principal { patient: None, ..principal.clone() }).expect_err("no patient"),
        access.check(Interaction::Read, ty("Patient")).expect_err("not granted"),
    ] {
        let text = format!("{error} {:?}", error.to_operation_outcome());
        assert!(!text.contains("secret"), "{text}");
    }
}

// ---------------------------------------------------------------------------------------------
// Open policy, unrestricted access, serde

#[test]
fn open_policy_and_unrestricted_permit_everything() {
    let principal = smart_principal("");
    let open = Access::for_principal(&AccessPolicy::Open, &principal).expect("open");
    assert!(open.is_unrestricted());
    assert_eq!(open.principal(), Some(&principal));
    let internal = Access::unrestricted();
    assert!(internal.is_unrestricted());
    assert_eq!(internal.principal(), None);
    for access in [open, internal] {
        for interaction in Interaction::ALL {
            for resource_type in [ty("Patient"), ty("Claim"), None] {
                assert_eq!(access.check(interaction, resource_type), Ok(Permit::All));
            }
        }
    }
    let restricted = rbac_access(&["auditor"]).expect("a group");
    assert!(!restricted.is_unrestricted());
    assert_eq!(restricted.principal().map(|p| p.subject.as_str()), Some("user-1"));
}

#[test]
fn principal_round_trips_through_json() {
    let principal = Principal {
        subject: "alice".to_owned(),
        fhir_user: Some("Practitioner/pr1".to_owned()),
        client_id: Some("app".to_owned()),
        groups: vec!["practitioner".to_owned()],
        scopes: vec!["openid".to_owned(), "user/*.rs".to_owned()],
        patient: Some("p1".to_owned()),
        tenant: Some("acme".to_owned()),
    };
    let json = serde_json::to_string(&principal).expect("serializes");
    assert_eq!(serde_json::from_str::<Principal>(&json).expect("deserializes"), principal);
    let minimal: Principal = serde_json::from_str(r#"{"subject":"bob"}"#).expect("missing fields default");
    assert_eq!(minimal, Principal { subject: "bob".to_owned(), ..Principal::default() });
}

#[test]
fn access_round_trips_through_json() {
    let lab = format!("patient/Observation.rs?category={LAB}");
    let accesses = [
        Access::unrestricted(),
        Access::for_principal(&AccessPolicy::Open, &smart_principal("")).expect("open"),
        rbac_access(&["non-practitioner", "auditor"]).expect("groups"),
        rbac_access(&["practitioner"]).expect("groups"),
        smart_access(&smart_principal(&format!("{lab} patient/*.rs user/Observation.r system/Claim.cud")))
            .expect("usable"),
    ];
    for access in accesses {
        let json = serde_json::to_string(&access).expect("serializes");
        let back: Access = serde_json::from_str(&json).expect("deserializes");
        assert_eq!(back, access, "{json}");
        for interaction in Interaction::ALL {
            for resource_type in [ty("Observation"), ty("Claim"), ty("Patient"), None] {
                assert_eq!(back.check(interaction, resource_type), access.check(interaction, resource_type));
            }
        }
    }
}

#[test]
fn access_json_is_explicit_and_never_defaults_to_unrestricted() {
    let principal = Principal { scopes: vec![format!("patient/Observation.rs?category={LAB}")], ..smart_principal("") };
    let access = smart_access(&principal).expect("usable");
    let json = serde_json::to_value(&access).expect("serializes");
    assert_eq!(
        json["grants"],
        serde_json::json!({"listed": [{
            "type": "Observation",
            "interactions": ["read", "vread", "history-instance", "history-type", "search-type", "operation"],
            "patient": "p1",
            "filter": [["category", LAB]],
        }]})
    );
    assert_eq!(
        serde_json::to_value(Access::unrestricted()).expect("serializes"),
        serde_json::json!({"grants": "unrestricted"})
    );
    let wildcard = serde_json::to_value(rbac_access(&["practitioner"]).expect("group")).expect("serializes");
    assert_eq!(wildcard["grants"]["listed"][0]["type"], "*");

    assert!(serde_json::from_str::<Access>("{}").is_err(), "no grants must not mean unrestricted");
    assert!(
        serde_json::from_value::<Access>(
            serde_json::json!({"grants": {"listed": [{"type": "Nope", "interactions": []}]}})
        )
        .is_err()
    );
    let nothing: Access = serde_json::from_value(serde_json::json!({"grants": {"listed": []}})).expect("deserializes");
    for interaction in Interaction::ALL {
        assert!(nothing.check(interaction, None).is_err());
        assert!(nothing.check(interaction, ty("Patient")).is_err());
    }
}

#[test]
fn interaction_names_match_serde() {
    for interaction in Interaction::ALL {
        let json = serde_json::to_value(interaction).expect("serializes");
        assert_eq!(json, serde_json::json!(interaction.as_str()));
        assert_eq!(Interaction::parse(interaction.as_str()), Some(interaction));
        assert_eq!(serde_json::from_value::<Interaction>(json).expect("deserializes"), interaction);
    }
    assert_eq!(Interaction::parse("search"), None);
}

#[test]
fn smart_options_deserialize_with_defaults() {
    let options: SmartOptions = toml::from_str("").expect("parses");
    assert_eq!(options, SmartOptions::default());
    assert!(options.user_scopes_need_fhir_user && options.patient_scopes_need_patient);
    let options: SmartOptions = serde_json::from_str(r#"{"user_scopes_need_fhir_user": false}"#).expect("parses");
    assert!(!options.user_scopes_need_fhir_user && options.patient_scopes_need_patient);
}
