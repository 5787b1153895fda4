//! Property test over the whole search path: random FHIR resources go through the real extractor
//! into the SQLite search index, random query strings go through the real parser, and every page
//! the index returns, concatenated, must equal the brute-force reference evaluator's answer.

use fhirmesh_core::TenantId;
use fhirmesh_core::ports::{IndexUpdate, SearchIndex};
use fhirmesh_fhir::search::evaluate::{Doc, evaluate};
use fhirmesh_fhir::search::extract::extract;
use fhirmesh_fhir::search::parse::{ParseOptions, parse_search};
use fhirmesh_fhir::search::query::SearchScope;
use fhirmesh_fhir::{LogicalId, ResourceType};
use serde_json::{Value, json};

const CORPORA: usize = 12;
const RESOURCES: usize = 60;
const QUERIES: usize = 40;

const FAMILIES: [&str; 6] = ["Smith", "Smyth", "Jones", "Müller", "Muller", "Johnson"];
const GIVENS: [&str; 4] = ["Ann", "Anna", "Bob", "Élodie"];
const GENDERS: [&str; 3] = ["male", "female", "other"];
const SYSTEMS: [&str; 2] = ["urn:a", "urn:b"];
const CODES: [&str; 4] = ["8867-4", "29463-7", "8480-6", "15074-8"];
const STATUSES: [&str; 3] = ["final", "preliminary", "amended"];
const PREFIXES: [&str; 9] = ["", "eq", "ne", "gt", "lt", "ge", "le", "sa", "eb"];

fn random_date(rng: &mut fastrand::Rng) -> String {
    let year = 1990 + rng.usize(..6);
    match rng.usize(..3) {
        0 => format!("{year}"),
        1 => format!("{year}-{:02}", 1 + rng.usize(..12)),
        _ => format!("{year}-{:02}-{:02}", 1 + rng.usize(..12), 1 + rng.usize(..28)),
    }
}

fn random_patient(rng: &mut fastrand::Rng, n: usize) -> Value {
    let mut patient = json!({ "resourceType": "Patient", "id": format!("p{n}") });
    if rng.usize(..100) < 90 {
        let mut name = json!({ "family": rng.choice(&FAMILIES).expect("a non-empty choice") });
        if rng.usize(..100) < 70 {
            name["given"] = json!([rng.choice(&GIVENS).expect("a non-empty choice")]);
        }
        patient["name"] = json!([name]);
    }
    if rng.usize(..100) < 80 {
        patient["gender"] = json!(rng.choice(&GENDERS).expect("a non-empty choice"));
    }
    if rng.usize(..100) < 80 {
        patient["birthDate"] = json!(random_date(rng));
    }
    if rng.usize(..100) < 70 {
        patient["identifier"] = json!([{ "system": rng.choice(&SYSTEMS).expect("a non-empty choice"), "value": format!("{}", rng.usize(..5)) }]);
    }
    patient
}

fn random_observation(rng: &mut fastrand::Rng, n: usize, patients: usize) -> Value {
    let mut observation = json!({
        "resourceType": "Observation",
        "id": format!("o{n}"),
        "status": rng.choice(&STATUSES).expect("a non-empty choice"),
        "code": { "coding": [{ "system": "http://loinc.org", "code": rng.choice(&CODES).expect("a non-empty choice") }] },
    });
    if rng.usize(..100) < 85 {
        observation["subject"] = json!({ "reference": format!("Patient/p{}", rng.usize(..patients)) });
    }
    if rng.usize(..100) < 75 {
        let (value, code) = if rng.usize(..100) < 50 {
            (rng.usize(..120) as f64, "kg")
        } else {
            ((rng.usize(..120) * 1000) as f64, "g")
        };
        observation["valueQuantity"] = json!({ "value": value, "system": "http://unitsofmeasure.org", "code": code });
    }
    if rng.usize(..100) < 75 {
        observation["effectiveDateTime"] = json!(random_date(rng));
    }
    observation
}

/// A random query string (one or two criteria, sometimes sorted and paged) for Patient or Observation.
fn random_query(rng: &mut fastrand::Rng, patients: usize) -> (ResourceType, Vec<(String, String)>) {
    let patient = rng.usize(..100) < 50;
    let mut params: Vec<(String, String)> = Vec::new();
    for _ in 0..1 + rng.usize(..2) {
        let (name, value) = if patient {
            match rng.usize(..7) {
                0 => {
                    let take = 2 + rng.usize(..3);
                    (
                        "family".to_owned(),
                        rng.choice(&FAMILIES).expect("a non-empty choice").chars().take(take).collect(),
                    )
                }
                1 => ("name".to_owned(), rng.choice(&GIVENS).expect("a non-empty choice").to_lowercase()),
                2 => (
                    "gender".to_owned(),
                    format!(
                        "{},{}",
                        rng.choice(&GENDERS).expect("a non-empty choice"),
                        rng.choice(&GENDERS).expect("a non-empty choice")
                    ),
                ),
                3 => (
                    "birthdate".to_owned(),
                    format!("{}{}", rng.choice(&PREFIXES).expect("a non-empty choice"), random_date(rng)),
                ),
                4 => (
                    "identifier".to_owned(),
                    format!("{}|{}", rng.choice(&SYSTEMS).expect("a non-empty choice"), rng.usize(..5)),
                ),
                5 => (
                    "_has:Observation:subject:code".to_owned(),
                    rng.choice(&CODES).expect("a non-empty choice").to_string(),
                ),
                _ => ("family:missing".to_owned(), if rng.usize(..100) < 50 { "true" } else { "false" }.to_owned()),
            }
        } else {
            match rng.usize(..7) {
                0 => {
                    ("code".to_owned(), format!("http://loinc.org|{}", rng.choice(&CODES).expect("a non-empty choice")))
                }
                1 => ("status:not".to_owned(), rng.choice(&STATUSES).expect("a non-empty choice").to_string()),
                2 => ("subject".to_owned(), format!("Patient/p{}", rng.usize(..patients))),
                3 => (
                    "date".to_owned(),
                    format!("{}{}", rng.choice(&PREFIXES).expect("a non-empty choice"), random_date(rng)),
                ),
                4 => (
                    "value-quantity".to_owned(),
                    format!(
                        "{}{}|http://unitsofmeasure.org|kg",
                        rng.choice(&PREFIXES).expect("a non-empty choice"),
                        rng.usize(..120)
                    ),
                ),
                5 => (
                    "subject:Patient.family".to_owned(),
                    rng.choice(&FAMILIES).expect("a non-empty choice").to_string(),
                ),
                _ => {
                    ("subject:Patient.gender".to_owned(), rng.choice(&GENDERS).expect("a non-empty choice").to_string())
                }
            }
        };
        params.push((name, value));
    }
    if rng.usize(..100) < 40 {
        let keys: &[&str] =
            if patient { &["birthdate", "-birthdate", "family", "-_id"] } else { &["date", "-date", "value-quantity"] };
        params.push(("_sort".to_owned(), rng.choice(keys).expect("a non-empty choice").to_string()));
    }
    params.push(("_count".to_owned(), (1 + rng.usize(..7)).to_string()));
    let resource_type = ResourceType::parse(if patient { "Patient" } else { "Observation" }).expect("type");
    (resource_type, params)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_index_answers_random_queries_like_the_reference_evaluator() {
    let tenant = TenantId::default_tenant();
    let options = ParseOptions { strict: true, default_count: 20, max_count: 100 };
    let mut compared = 0;
    let mut with_hits = 0;
    for corpus_seed in 0..CORPORA {
        let mut rng = fastrand::Rng::with_seed(0x9E37_79B9_7F4A_7C15 ^ (corpus_seed as u64 + 1));
        let dir = tempfile::tempdir().expect("tempdir");
        let index = fhirmesh_resource::open_sqlite_search_index(dir.path()).expect("index");
        let patients = RESOURCES / 2;
        let mut resources: Vec<Value> = (0..patients).map(|n| random_patient(&mut rng, n)).collect();
        resources.extend((0..RESOURCES - patients).map(|n| random_observation(&mut rng, n, patients)));
        let mut docs = Vec::new();
        let mut updates = Vec::new();
        for (sequence, resource) in resources.iter().enumerate() {
            let entries = extract(resource);
            let resource_type = ResourceType::parse(resource["resourceType"].as_str().expect("type")).expect("known");
            let id = resource["id"].as_str().expect("id").to_owned();
            docs.push(Doc { resource_type, id: id.clone(), entries: entries.clone() });
            updates.push(IndexUpdate {
                tenant: tenant.clone(),
                resource_type,
                id: LogicalId::parse(&id).expect("id"),
                version_id: 1,
                sequence: sequence as u64 + 1,
                last_updated: time::OffsetDateTime::UNIX_EPOCH,
                entries: Some(entries),
            });
        }
        index.apply(updates).await.expect("apply");

        for _ in 0..QUERIES {
            let (resource_type, params) = random_query(&mut rng, patients);
            let query = parse_search(&SearchScope::Type(resource_type), &params, &options)
                .unwrap_or_else(|err| panic!("{params:?} does not parse: {:?}", err.issues));
            let expected = evaluate(&query, &docs, time::OffsetDateTime::now_utc());
            let mut got = Vec::new();
            let mut cursor: Option<String> = None;
            for _ in 0..200 {
                let page = index.search(&tenant, &query, cursor.as_deref()).await.expect("search");
                got.extend(page.hits.into_iter().map(|h| (h.resource_type, h.id.as_str().to_owned())));
                match page.next {
                    Some(next) => cursor = Some(next),
                    None => break,
                }
            }
            assert_eq!(got, expected, "corpus {corpus_seed}, query {params:?}");
            compared += 1;
            if !expected.is_empty() {
                with_hits += 1;
            }
        }
    }
    eprintln!("compared {compared} random queries with the reference evaluator, {with_hits} with hits");
    assert_eq!(compared, CORPORA * QUERIES);
    assert!(with_hits * 3 > compared, "the random queries mostly match something ({with_hits} of {compared})");
}
