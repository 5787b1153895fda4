//! A property test any [`SearchIndex`] runs against the reference evaluator
//! (`fhirmesh_fhir::search::evaluate`): random corpora (several versions per resource, deletes,
//! redeliveries, shuffled, a second tenant with the same keys) and random queries over every
//! parameter type, modifier, prefix, chains, `_has`, `AnyOf`, `:missing` and multi-key sorts; the
//! index must return exactly the evaluator's answer, in its order, across all pages forwards and
//! backwards, with the same total. Behind the `testing` feature: for backends' test suites only.

use fhirmesh_fhir::search::evaluate::{Doc, evaluate};
use fhirmesh_fhir::search::query::{
    ChainLink, Criterion, Has, Match, Modifier, Prefix, SearchValue, SortKey, TokenSystem, TotalMode,
};
use fhirmesh_fhir::search::values::{DATE_MAX, DATE_MIN, normalize_string};
use fhirmesh_fhir::search::{IndexEntry, IndexValue, ParamType, SearchQuery};
use fhirmesh_fhir::{LogicalId, ResourceType};
use futures::future::BoxFuture;
use time::macros::datetime;
use time::{Duration, OffsetDateTime};

use crate::model::TenantId;
use crate::ports::{IndexError, IndexPage, IndexUpdate, SearchIndex};

/// The instant every generated query runs at (it anchors the `ap` prefix).
pub fn now() -> OffsetDateTime {
    datetime!(2024-06-01 12:00 UTC)
}

pub fn rt(name: &str) -> ResourceType {
    ResourceType::parse(name).expect("known type")
}

pub fn tenant(name: &str) -> TenantId {
    TenantId::parse(name).expect("valid tenant")
}

pub fn update(
    tenant_name: &str,
    resource_type: &str,
    id: &str,
    version_id: u64,
    sequence: u64,
    entries: Option<Vec<IndexEntry>>,
) -> IndexUpdate {
    IndexUpdate {
        tenant: tenant(tenant_name),
        resource_type: rt(resource_type),
        id: LogicalId::parse(id).expect("valid id"),
        version_id,
        sequence,
        last_updated: now(),
        entries,
    }
}

pub fn query(types: &[&str], criteria: Vec<Criterion>) -> SearchQuery {
    let mut query = SearchQuery::new(types.iter().map(|t| rt(t)).collect(), criteria, 100);
    query.total = TotalMode::Accurate;
    query
}

const TYPES: [&str; 2] = ["Patient", "Observation"];
const WORDS: [&str; 9] = ["ann", "Anna", "Ánne", "bob", "bo  b", "Zoë", "50%_x", "", "a\\b"];
const STRING_QUERIES: [&str; 10] = ["a", "an", "AN", "b", "bo b", "z", "%", "_x", "", "\\"];
const SYSTEMS: [Option<&str>; 3] = [None, Some("s1"), Some("s2")];
const CODES: [Option<&str>; 5] = [None, Some("a"), Some("A"), Some("b"), Some("c")];
const TEXTS: [Option<&str>; 4] = [None, Some("Blood"), Some("blue"), Some("of-type:t|MR|1")];
const NUMBERS: [f64; 8] = [-2.0, 0.0, 0.5, 1.0, 2.5, 10.0, 100.0, 1000.0];
const URIS: [&str; 5] = ["http://a", "http://a/b", "http://a/b/c", "http://b", "http://a/"];
const UCUM: &str = "http://unitsofmeasure.org";
const IDS: usize = 30;

fn base() -> OffsetDateTime {
    datetime!(2024-05-01 0:00 UTC)
}

fn random_type(rng: &mut fastrand::Rng) -> ResourceType {
    let name: &&str = rng.choice(&TYPES).expect("a non-empty choice");
    rt(name)
}

pub fn random_id(rng: &mut fastrand::Rng) -> String {
    format!("i{}", rng.usize(..IDS))
}

fn random_date(rng: &mut fastrand::Rng) -> (OffsetDateTime, OffsetDateTime) {
    if rng.usize(..100) < 5 {
        return (DATE_MIN, base() + Duration::days(rng.usize(..40) as i64));
    }
    if rng.usize(..100) < 5 {
        return (base() + Duration::days(rng.usize(..40) as i64), DATE_MAX);
    }
    let far = if rng.usize(..100) < 15 { Duration::days(-9000) } else { Duration::ZERO };
    let start = base() + far + Duration::days(rng.usize(..40) as i64) + Duration::hours(rng.usize(..3) as i64 * 8);
    let length = *rng
        .choice(&[Duration::SECOND, Duration::DAY, Duration::days(30), Duration::milliseconds(1)])
        .expect("a non-empty choice");
    (start, start + length)
}

fn number(rng: &mut fastrand::Rng) -> (f64, f64, f64) {
    let value = *rng.choice(&NUMBERS).expect("a non-empty choice");
    let half = *rng.choice(&[0.5, 0.05]).expect("a non-empty choice");
    (value, value - half, value + half)
}

/// A quantity's (system, code, unit, canonical) from one of a few consistent shapes.
#[allow(clippy::type_complexity)]
fn unit(
    rng: &mut fastrand::Rng,
    value: f64,
) -> (Option<String>, Option<String>, Option<String>, Option<(f64, String)>) {
    match rng.usize(..5) {
        0 => (Some(UCUM.into()), Some("mg".into()), Some("mg".into()), Some((value * 0.001, "g".into()))),
        1 => (Some(UCUM.into()), Some("g".into()), None, Some((value, "g".into()))),
        2 => (None, None, Some("mg".into()), None),
        3 => (Some("urn:o".into()), Some("mg".into()), None, None),
        _ => (None, None, None, None),
    }
}

fn token_value(rng: &mut fastrand::Rng) -> IndexValue {
    IndexValue::Token {
        system: rng.choice(&SYSTEMS).expect("a non-empty choice").map(str::to_owned),
        code: rng.choice(&CODES).expect("a non-empty choice").map(str::to_owned),
        text: rng.choice(&TEXTS).expect("a non-empty choice").map(str::to_owned),
    }
}

fn quantity_value(rng: &mut fastrand::Rng) -> IndexValue {
    let (value, low, high) = number(rng);
    let (system, code, unit, canonical) = unit(rng, value);
    IndexValue::Quantity { value, low, high, system, code, unit, canonical }
}

fn random_entries(rng: &mut fastrand::Rng, id: &str) -> Vec<IndexEntry> {
    let mut entries = Vec::new();
    let mut add = |param: &str, value: IndexValue| entries.push(IndexEntry { param: param.to_owned(), value });
    for _ in 0..rng.usize(..3) {
        let word = *rng.choice(&WORDS).expect("a non-empty choice");
        add("name", IndexValue::String { normalized: normalize_string(word), exact: word.to_owned() });
    }
    for _ in 0..rng.usize(..3) {
        let value = token_value(rng);
        add("code", value);
    }
    for _ in 0..rng.usize(..3) {
        let target_type = random_type(rng);
        let target_id = random_id(rng);
        let identifier = (rng.usize(..100) < 20).then(|| {
            (
                rng.choice(&SYSTEMS).expect("a non-empty choice").map(str::to_owned),
                rng.choice(&["1", "2"]).expect("a non-empty choice").to_string(),
            )
        });
        let value = match rng.usize(..6) {
            0 => IndexValue::Reference {
                target_type: None,
                id: None,
                url: "urn:uuid:1".to_owned(),
                version: None,
                identifier,
            },
            1 => IndexValue::Reference {
                target_type: Some(target_type),
                id: Some(target_id.clone()),
                url: format!("http://x/{target_type}/{target_id}"),
                version: None,
                identifier,
            },
            _ => IndexValue::Reference {
                target_type: Some(target_type),
                id: Some(target_id.clone()),
                url: format!("{target_type}/{target_id}"),
                version: None,
                identifier,
            },
        };
        add("subject", value);
    }
    for _ in 0..rng.usize(..3) {
        let (start, end) = random_date(rng);
        add("date", IndexValue::Date { start, end });
    }
    for _ in 0..rng.usize(..3) {
        let (value, low, high) = number(rng);
        add("value", IndexValue::Number { value, low, high });
    }
    for _ in 0..rng.usize(..3) {
        let value = quantity_value(rng);
        add("qty", value);
    }
    for _ in 0..rng.usize(..3) {
        add("url", IndexValue::Uri(rng.choice(&URIS).expect("a non-empty choice").to_string()));
    }
    for _ in 0..rng.usize(..3) {
        let components =
            if rng.usize(..100) < 15 { vec![token_value(rng)] } else { vec![token_value(rng), quantity_value(rng)] };
        add("combo", IndexValue::Composite(components));
    }
    if rng.usize(..100) < 85 {
        let at = base() + Duration::minutes(rng.usize(..20) as i64);
        let precision = *rng.choice(&[Duration::milliseconds(1), Duration::SECOND]).expect("a non-empty choice");
        add("_lastUpdated", IndexValue::Date { start: at, end: at + precision });
    }
    if rng.usize(..100) < 5 {
        let code = if rng.usize(..100) < 50 { id.to_owned() } else { "other".to_owned() };
        add("_id", IndexValue::Token { system: None, code: Some(code), text: None });
    }
    entries
}

fn token_search(rng: &mut fastrand::Rng) -> SearchValue {
    let system = match rng.usize(..4) {
        0 => TokenSystem::None,
        1 => TokenSystem::Is("s1".to_owned()),
        2 => TokenSystem::Is("s2".to_owned()),
        _ => TokenSystem::Any,
    };
    let code = match system {
        TokenSystem::Any => Some(rng.choice(&["a", "A", "b", "c", "i3"]).expect("a non-empty choice").to_string()),
        _ if rng.usize(..100) < 25 => None,
        _ => Some(rng.choice(&["a", "A", "b", "c"]).expect("a non-empty choice").to_string()),
    };
    SearchValue::Token { system, code }
}

fn quantity_search(rng: &mut fastrand::Rng) -> SearchValue {
    let (value, low, high) = number(rng);
    let (system, code, _, canonical) = unit(rng, value);
    SearchValue::Quantity { prefix: random_prefix(rng), value, low, high, system, code, canonical }
}

fn random_prefix(rng: &mut fastrand::Rng) -> Prefix {
    *rng.choice(&[
        Prefix::Eq,
        Prefix::Ne,
        Prefix::Gt,
        Prefix::Lt,
        Prefix::Ge,
        Prefix::Le,
        Prefix::Sa,
        Prefix::Eb,
        Prefix::Ap,
    ])
    .expect("a non-empty choice")
}

fn values<F: FnMut(&mut fastrand::Rng) -> SearchValue>(rng: &mut fastrand::Rng, mut one: F) -> Vec<SearchValue> {
    (0..1 + rng.usize(..2)).map(|_| one(rng)).collect()
}

/// A leaf criterion (no chain) on one of the parameters.
fn leaf(rng: &mut fastrand::Rng) -> (String, ParamType, Option<Modifier>, Vec<SearchValue>) {
    let string = |rng: &mut fastrand::Rng| {
        SearchValue::String(rng.choice(&STRING_QUERIES).expect("a non-empty choice").to_string())
    };
    match rng.usize(..11) {
        0 => {
            let modifier = rng
                .choice(&[None, Some(Modifier::Contains), Some(Modifier::Exact)])
                .expect("a non-empty choice")
                .clone();
            let values = if modifier == Some(Modifier::Exact) {
                values(rng, |rng| SearchValue::String(rng.choice(&WORDS).expect("a non-empty choice").to_string()))
            } else {
                values(rng, string)
            };
            ("name".into(), ParamType::String, modifier, values)
        }
        1 => ("code".into(), ParamType::Token, None, values(rng, token_search)),
        2 => match rng.usize(..3) {
            0 => ("code".into(), ParamType::Token, Some(Modifier::Not), values(rng, token_search)),
            1 => (
                "code".into(),
                ParamType::Token,
                Some(Modifier::Text),
                values(rng, |rng| {
                    SearchValue::String(
                        rng.choice(&["bl", "BLOOD", "of", "b", "blu"]).expect("a non-empty choice").to_string(),
                    )
                }),
            ),
            _ => {
                let value = SearchValue::OfType {
                    type_system: "t".to_owned(),
                    type_code: "MR".to_owned(),
                    value: rng.choice(&["1", "2"]).expect("a non-empty choice").to_string(),
                };
                ("code".into(), ParamType::Token, Some(Modifier::OfType), vec![value])
            }
        },
        3 => {
            if rng.usize(..100) < 20 {
                return ("subject".into(), ParamType::Reference, Some(Modifier::Identifier), values(rng, token_search));
            }
            let reference = |rng: &mut fastrand::Rng| {
                let target_type = random_type(rng);
                let id = random_id(rng);
                match rng.usize(..5) {
                    0 => SearchValue::Reference { target_type: None, id: Some(id), url: None },
                    1 => SearchValue::Reference { target_type: None, id: None, url: Some("urn:uuid:1".to_owned()) },
                    2 => SearchValue::Reference {
                        target_type: Some(target_type),
                        id: Some(id.clone()),
                        url: Some(format!("http://x/{target_type}/{id}")),
                    },
                    _ => SearchValue::Reference { target_type: Some(target_type), id: Some(id), url: None },
                }
            };
            ("subject".into(), ParamType::Reference, None, values(rng, reference))
        }
        4 => {
            let date = |rng: &mut fastrand::Rng| {
                let (start, end) = random_date(rng);
                SearchValue::Date { prefix: random_prefix(rng), start, end }
            };
            let param = if rng.usize(..100) < 20 { "_lastUpdated" } else { "date" };
            (param.into(), ParamType::Date, None, values(rng, date))
        }
        5 => {
            let number = |rng: &mut fastrand::Rng| {
                let (value, low, high) = number(rng);
                SearchValue::Number { prefix: random_prefix(rng), value, low, high }
            };
            ("value".into(), ParamType::Number, None, values(rng, number))
        }
        6 => ("qty".into(), ParamType::Quantity, None, values(rng, quantity_search)),
        7 => {
            let modifier =
                rng.choice(&[None, Some(Modifier::Above), Some(Modifier::Below)]).expect("a non-empty choice").clone();
            let uri =
                |rng: &mut fastrand::Rng| SearchValue::Uri(rng.choice(&URIS).expect("a non-empty choice").to_string());
            ("url".into(), ParamType::Uri, modifier, values(rng, uri))
        }
        8 => {
            let composite = |rng: &mut fastrand::Rng| {
                let token = token_search(rng);
                if rng.usize(..100) < 10 {
                    SearchValue::Composite(vec![token])
                } else {
                    SearchValue::Composite(vec![token, quantity_search(rng)])
                }
            };
            ("combo".into(), ParamType::Composite, None, values(rng, composite))
        }
        9 => (
            "_id".into(),
            ParamType::Token,
            None,
            values(rng, |rng| SearchValue::Token { system: TokenSystem::Any, code: Some(random_id(rng)) }),
        ),
        _ => ("name".into(), ParamType::String, None, values(rng, string)),
    }
}

const PARAMS: [(&str, ParamType); 10] = [
    ("name", ParamType::String),
    ("code", ParamType::Token),
    ("subject", ParamType::Reference),
    ("date", ParamType::Date),
    ("value", ParamType::Number),
    ("qty", ParamType::Quantity),
    ("url", ParamType::Uri),
    ("combo", ParamType::Composite),
    ("_lastUpdated", ParamType::Date),
    ("_id", ParamType::Token),
];

fn random_targets(rng: &mut fastrand::Rng) -> Vec<ResourceType> {
    match rng.usize(..4) {
        0 => vec![rt("Patient"), rt("Observation")],
        1 => vec![rt("Observation")],
        _ => vec![rt("Patient")],
    }
}

fn random_criterion(rng: &mut fastrand::Rng, depth: usize) -> Criterion {
    let chain: Vec<ChainLink> = if rng.usize(..100) < 25 {
        (0..1 + rng.usize(..2))
            .map(|_| ChainLink { param: "subject".to_owned(), targets: random_targets(rng) })
            .collect()
    } else {
        Vec::new()
    };
    match rng.usize(..10) {
        0 => {
            let (param, kind) = *rng.choice(&PARAMS).expect("a non-empty choice");
            Criterion::Missing { chain, param: param.to_owned(), kind, missing: rng.usize(..100) < 50 }
        }
        1 if depth < 2 => Criterion::Has(Has {
            resource_type: random_type(rng),
            reference_param: "subject".to_owned(),
            criterion: Box::new(random_criterion(rng, depth + 1)),
        }),
        2 if depth < 2 => Criterion::AnyOf((0..rng.usize(..3) + 1).map(|_| random_criterion(rng, depth + 1)).collect()),
        _ => {
            let (param, kind, modifier, values) = leaf(rng);
            Criterion::Match(Match { chain, param, kind, modifier, values })
        }
    }
}

pub fn random_query(rng: &mut fastrand::Rng) -> SearchQuery {
    let types: Vec<&str> = match rng.usize(..3) {
        0 => vec!["Patient", "Observation"],
        1 => vec!["Observation"],
        _ => vec!["Patient"],
    };
    let criteria = (0..rng.usize(..3)).map(|_| random_criterion(rng, 0)).collect();
    let mut q = query(&types, criteria);
    let sortable: Vec<(&str, ParamType)> =
        PARAMS.iter().copied().filter(|(_, kind)| *kind != ParamType::Composite).collect();
    q.sort = (0..rng.usize(..3))
        .map(|_| {
            let (param, kind) = *rng.choice(&sortable).expect("a non-empty choice");
            SortKey { param: param.to_owned(), kind, descending: rng.usize(..100) < 50 }
        })
        .collect();
    q.count = 1 + rng.usize(..8);
    q.total = TotalMode::Accurate;
    q
}

/// Random versions of `docs` for one tenant: older versions, deletes and redeliveries, shuffled.
pub fn updates_for(
    rng: &mut fastrand::Rng,
    tenant_name: &str,
    docs: &[(String, String, bool)],
    live: &mut Vec<Doc>,
    seq: &mut u64,
) -> Vec<IndexUpdate> {
    let mut updates = Vec::new();
    for (resource_type, id, deleted) in docs {
        let final_entries = random_entries(rng, id);
        let versions = 1 + rng.usize(..2) as u64;
        for version in 1..versions {
            *seq += 1;
            updates.push(update(tenant_name, resource_type, id, version, *seq, Some(random_entries(rng, id))));
        }
        *seq += 1;
        updates.push(update(tenant_name, resource_type, id, versions, *seq, Some(final_entries.clone())));
        if *deleted {
            *seq += 1;
            updates.push(update(tenant_name, resource_type, id, versions + 1, *seq, None));
        } else {
            live.push(Doc { resource_type: rt(resource_type), id: id.clone(), entries: final_entries });
        }
        if rng.usize(..100) < 20 {
            // A redelivery of an older version.
            let again = updates[rng.usize(..updates.len())].clone();
            updates.push(again);
        }
    }
    // Shuffle (Fisher–Yates).
    for i in (1..updates.len()).rev() {
        let j = rng.usize(..i + 1);
        updates.swap(i, j);
    }
    updates
}

/// How a backend searches at a given instant: `(tenant, query, cursor, now)`.
pub type SearchAt<'a> = &'a (
        dyn Fn(
    TenantId,
    SearchQuery,
    Option<String>,
    OffsetDateTime,
) -> BoxFuture<'static, Result<IndexPage, IndexError>>
            + Sync
    );

/// How big the property test is.
#[derive(Debug, Clone, Copy)]
pub struct Scale {
    /// Corpora (each a fresh, cleared index).
    pub cases: u64,
    /// Resources per corpus and tenant.
    pub docs: usize,
    pub queries_per_corpus: usize,
}

async fn all_pages(search: SearchAt<'_>, tenant: &TenantId, query: &SearchQuery) -> Vec<(ResourceType, String)> {
    let mut hits = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10_000 {
        let page = search(tenant.clone(), query.clone(), cursor.clone(), now()).await.expect("search");
        assert!(page.hits.len() <= query.count, "page larger than count");
        hits.extend(page.hits.into_iter().map(|hit| (hit.resource_type, hit.id.as_str().to_owned())));
        match page.next {
            Some(next) => cursor = Some(next),
            None => return hits,
        }
    }
    panic!("paging does not end");
}

/// Runs the property test on `index` (cleared before every corpus), searching through `search`.
pub async fn agrees_with_the_reference_evaluator(index: &dyn SearchIndex, search: SearchAt<'_>, scale: Scale) {
    let t = tenant("t");
    let mut compared = 0;
    let mut nonempty = 0;
    for case in 0..scale.cases {
        let seed = 0x9e37_79b9_7f4a_7c15 ^ (case + 1).wrapping_mul(0x0100_0000_01b3);
        let mut rng = fastrand::Rng::with_seed(seed);
        index.clear().await.expect("clear");
        // Distinct (type, id) pairs; the same id may exist under both types.
        let mut docs: Vec<(String, String, bool)> = Vec::new();
        while docs.len() < scale.docs {
            let resource_type = rng.choice(&TYPES).expect("a non-empty choice").to_string();
            let id = random_id(&mut rng);
            if !docs.iter().any(|(t, i, _)| *t == resource_type && *i == id) {
                docs.push((resource_type, id, rng.usize(..100) < 10));
            }
        }
        let mut live = Vec::new();
        let mut sequence = 0;
        let mut updates = updates_for(&mut rng, "t", &docs, &mut live, &mut sequence);
        // The same keys in another tenant, with other values: must never leak into tenant t.
        let mut elsewhere = Vec::new();
        updates.extend(updates_for(&mut rng, "other", &docs, &mut elsewhere, &mut sequence));
        let split = rng.usize(..updates.len());
        let rest = updates.split_off(split);
        index.apply(updates).await.expect("apply");
        index.apply(rest).await.expect("apply");
        assert_eq!(index.watermark().await, Ok(sequence), "seed {seed:#x}");

        for query_no in 0..scale.queries_per_corpus {
            let q = random_query(&mut rng);
            let expected = evaluate(&q, &live, now());
            let actual = all_pages(search, &t, &q).await;
            assert_eq!(actual, expected, "seed {seed:#x}, query {query_no}: {q:#?}");
            let first = search(t.clone(), q.clone(), None, now()).await.expect("search");
            assert_eq!(first.total, Some(expected.len() as u64), "seed {seed:#x}, query {query_no}: total");
            if query_no % 3 == 0 && !expected.is_empty() {
                // Backwards from the last page.
                let mut page = first;
                while let Some(next) = page.next.clone() {
                    page = search(t.clone(), q.clone(), Some(next), now()).await.expect("search");
                }
                let mut pages = vec![page.hits.clone()];
                while let Some(previous) = page.previous.clone() {
                    page = search(t.clone(), q.clone(), Some(previous), now()).await.expect("search");
                    pages.push(page.hits.clone());
                }
                pages.reverse();
                let back: Vec<(ResourceType, String)> =
                    pages.concat().iter().map(|hit| (hit.resource_type, hit.id.as_str().to_owned())).collect();
                assert_eq!(back, expected, "seed {seed:#x}, query {query_no}: backwards");
            }
            compared += 1;
            nonempty += usize::from(!expected.is_empty());
        }
    }
    eprintln!(
        "{compared} queries compared over {} corpora of {} documents; {nonempty} with hits",
        scale.cases, scale.docs
    );
    assert!(nonempty * 4 > compared, "the generator should produce mostly non-empty results: {nonempty}/{compared}");
}
