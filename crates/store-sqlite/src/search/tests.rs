//! Tests of the SQLite search index: hand-built entries and queries (no extraction, no parsing).

use std::time::{Duration as StdDuration, Instant};

use fhirmesh_core::model::TenantId;
use fhirmesh_core::ports::{IndexError, IndexHit, IndexUpdate, SearchIndex};
use fhirmesh_fhir::LogicalId;
use fhirmesh_fhir::search::query::{
    ChainLink, Criterion, Has, Match, Modifier, Prefix, SearchValue, SortKey, TokenSystem, TotalMode,
};
use fhirmesh_fhir::search::values::normalize_string;
use fhirmesh_fhir::search::{IndexEntry, IndexValue, ParamType, SearchQuery};
use tempfile::TempDir;
use time::OffsetDateTime;
use time::macros::datetime;

use super::{SqliteSearchConfig, SqliteSearchIndex};

// ---------------------------------------------------------------------------------------------
// helpers (also used by the property test)

pub(super) use fhirmesh_core::search_oracle::{now, query, rt, tenant, update};

pub(super) fn open(dir: &TempDir) -> SqliteSearchIndex {
    SqliteSearchIndex::open(SqliteSearchConfig::new(dir.path().join("search.db"))).expect("index opens")
}

pub(super) fn entry(param: &str, value: IndexValue) -> IndexEntry {
    IndexEntry { param: param.to_owned(), value }
}

pub(super) fn string(param: &str, text: &str) -> IndexEntry {
    entry(param, IndexValue::String { normalized: normalize_string(text), exact: text.to_owned() })
}

pub(super) fn token_value(system: Option<&str>, code: Option<&str>, text: Option<&str>) -> IndexValue {
    IndexValue::Token {
        system: system.map(str::to_owned),
        code: code.map(str::to_owned),
        text: text.map(str::to_owned),
    }
}

pub(super) fn reference_value(target: Option<(&str, &str)>, url: &str) -> IndexValue {
    IndexValue::Reference {
        target_type: target.map(|(t, _)| rt(t)),
        id: target.map(|(_, id)| id.to_owned()),
        url: url.to_owned(),
        version: None,
        identifier: None,
    }
}

pub(super) fn reference(param: &str, target_type: &str, id: &str) -> IndexEntry {
    entry(param, reference_value(Some((target_type, id)), &format!("{target_type}/{id}")))
}

pub(super) fn date_value(start: OffsetDateTime, end: OffsetDateTime) -> IndexValue {
    IndexValue::Date { start, end }
}

pub(super) fn number_value(value: f64) -> IndexValue {
    IndexValue::Number { value, low: value, high: value }
}

pub(super) fn matching(
    param: &str,
    kind: ParamType,
    modifier: Option<Modifier>,
    values: Vec<SearchValue>,
) -> Criterion {
    Criterion::Match(Match { chain: Vec::new(), param: param.to_owned(), kind, modifier, values })
}

pub(super) fn s(text: &str) -> SearchValue {
    SearchValue::String(text.to_owned())
}

pub(super) fn tok(system: TokenSystem, code: Option<&str>) -> SearchValue {
    SearchValue::Token { system, code: code.map(str::to_owned) }
}

pub(super) fn sys(system: &str) -> TokenSystem {
    TokenSystem::Is(system.to_owned())
}

pub(super) fn date_search(prefix: Prefix, start: OffsetDateTime, end: OffsetDateTime) -> SearchValue {
    SearchValue::Date { prefix, start, end }
}

pub(super) fn number_search(prefix: Prefix, value: f64) -> SearchValue {
    SearchValue::Number { prefix, value, low: value - 0.5, high: value + 0.5 }
}

/// Every hit of `query`, following `next` cursors; also checks that no page exceeds `count`.
pub(super) async fn all_pages(index: &SqliteSearchIndex, tenant: &TenantId, query: &SearchQuery) -> Vec<IndexHit> {
    let mut hits = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10_000 {
        let page = index.search_at(tenant, query, cursor.as_deref(), now()).await.expect("search");
        assert!(page.hits.len() <= query.count, "page larger than count");
        hits.extend(page.hits);
        match page.next {
            Some(next) => cursor = Some(next),
            None => return hits,
        }
    }
    panic!("paging does not end");
}

/// The `Type/id` of every hit, all pages.
pub(super) async fn found(index: &SqliteSearchIndex, tenant_name: &str, query: &SearchQuery) -> Vec<String> {
    all_pages(index, &tenant(tenant_name), query)
        .await
        .into_iter()
        .map(|hit| format!("{}/{}", hit.resource_type, hit.id.as_str()))
        .collect()
}

async fn apply(index: &SqliteSearchIndex, updates: Vec<IndexUpdate>) {
    index.apply(updates).await.expect("apply");
}

// ---------------------------------------------------------------------------------------------
// apply: idempotency, deletes, watermark

#[tokio::test]
async fn apply_is_idempotent_per_version_and_moves_the_watermark() {
    let dir = TempDir::new().expect("temp dir");
    let index = open(&dir);
    assert_eq!(index.watermark().await, Ok(0));
    let name = |text: &str| Some(vec![string("name", text)]);
    let by_name = |text: &str| query(&["Patient"], vec![matching("name", ParamType::String, None, vec![s(text)])]);

    apply(&index, vec![update("t", "Patient", "a", 1, 1, name("alice"))]).await;
    assert_eq!(found(&index, "t", &by_name("alice")).await, ["Patient/a"]);
    assert_eq!(index.watermark().await, Ok(1));

    // Duplicate delivery: nothing changes.
    apply(&index, vec![update("t", "Patient", "a", 1, 1, name("alice"))]).await;
    assert_eq!(found(&index, "t", &by_name("alice")).await, ["Patient/a"]);

    // Reordered within one batch: v3 then v2 — v3 wins.
    apply(
        &index,
        vec![update("t", "Patient", "a", 3, 3, name("carol")), update("t", "Patient", "a", 2, 2, name("bob"))],
    )
    .await;
    assert_eq!(found(&index, "t", &by_name("carol")).await, ["Patient/a"]);
    assert!(found(&index, "t", &by_name("bob")).await.is_empty());
    assert!(found(&index, "t", &by_name("alice")).await.is_empty(), "the old version's values are gone");
    assert_eq!(index.watermark().await, Ok(3));

    // An older version redelivered later: skipped. The watermark never goes back.
    apply(&index, vec![update("t", "Patient", "a", 2, 2, name("bob"))]).await;
    assert!(found(&index, "t", &by_name("bob")).await.is_empty());
    assert_eq!(index.watermark().await, Ok(3));

    // Delete, then an older update arrives: the tombstone keeps it deleted.
    apply(&index, vec![update("t", "Patient", "a", 4, 4, None)]).await;
    assert!(found(&index, "t", &by_name("carol")).await.is_empty());
    assert!(found(&index, "t", &query(&["Patient"], vec![])).await.is_empty());
    apply(&index, vec![update("t", "Patient", "a", 3, 3, name("carol"))]).await;
    assert!(found(&index, "t", &by_name("carol")).await.is_empty());
    assert_eq!(index.watermark().await, Ok(4));

    // Re-created after the delete with a newer version.
    apply(&index, vec![update("t", "Patient", "a", 5, 9, name("dora"))]).await;
    assert_eq!(found(&index, "t", &by_name("dora")).await, ["Patient/a"]);
    assert_eq!(index.watermark().await, Ok(9));

    // Empty batches are fine.
    apply(&index, Vec::new()).await;

    // Durable: a reopened index sees everything, then clear() drops it all.
    drop(index);
    let index = open(&dir);
    assert_eq!(index.watermark().await, Ok(9));
    assert_eq!(found(&index, "t", &by_name("dora")).await, ["Patient/a"]);
    index.clear().await.expect("clear");
    assert_eq!(index.watermark().await, Ok(0));
    assert!(found(&index, "t", &query(&["Patient"], vec![])).await.is_empty());
    // After a clear the same versions apply again (a reindex).
    apply(&index, vec![update("t", "Patient", "a", 5, 9, name("dora"))]).await;
    assert_eq!(found(&index, "t", &by_name("dora")).await, ["Patient/a"]);
}

#[tokio::test]
async fn hits_carry_the_indexed_version() {
    let dir = TempDir::new().expect("temp dir");
    let index = open(&dir);
    apply(&index, vec![update("t", "Patient", "a", 7, 1, Some(vec![]))]).await;
    let page = index.search_at(&tenant("t"), &query(&["Patient"], vec![]), None, now()).await.expect("search");
    assert_eq!(
        page.hits,
        vec![IndexHit { resource_type: rt("Patient"), id: LogicalId::parse("a").expect("id"), version_id: 7 }]
    );
    assert_eq!(page.total, Some(1));
}

#[test]
fn a_foreign_database_is_refused() {
    let dir = TempDir::new().expect("temp dir");
    let path = dir.path().join("other.db");
    let conn = rusqlite::Connection::open(&path).expect("open");
    conn.execute_batch("CREATE TABLE something (x INTEGER)").expect("create");
    drop(conn);
    assert!(matches!(SqliteSearchIndex::open(SqliteSearchConfig::new(&path)), Err(IndexError::Internal(_))));
}

// ---------------------------------------------------------------------------------------------
// value kinds × prefixes × modifiers

#[tokio::test]
async fn strings_prefix_contains_exact() {
    let dir = TempDir::new().expect("temp dir");
    let index = open(&dir);
    apply(
        &index,
        vec![
            update("t", "Patient", "a", 1, 1, Some(vec![string("name", "Müller"), string("name", "Hans")])),
            update("t", "Patient", "b", 1, 2, Some(vec![string("name", "Mueller")])),
            update("t", "Patient", "c", 1, 3, Some(vec![string("name", "50%_off\\x")])),
            update("t", "Patient", "d", 1, 4, Some(vec![string("name", "mu")])),
            update("t", "Patient", "e", 1, 5, Some(vec![])),
        ],
    )
    .await;
    let q = |modifier: Option<Modifier>, values: Vec<&str>| {
        query(&["Patient"], vec![matching("name", ParamType::String, modifier, values.into_iter().map(s).collect())])
    };
    assert_eq!(found(&index, "t", &q(None, vec!["MU"])).await, ["Patient/a", "Patient/b", "Patient/d"]);
    assert_eq!(found(&index, "t", &q(None, vec!["mül"])).await, ["Patient/a"]);
    assert_eq!(found(&index, "t", &q(None, vec!["mue", "ha"])).await, ["Patient/a", "Patient/b"]);
    assert_eq!(found(&index, "t", &q(None, vec!["ller"])).await, Vec::<String>::new());
    assert_eq!(found(&index, "t", &q(None, vec![""])).await, ["Patient/a", "Patient/b", "Patient/c", "Patient/d"]);
    assert_eq!(found(&index, "t", &q(Some(Modifier::Contains), vec!["LLER"])).await, ["Patient/a", "Patient/b"]);
    // LIKE wildcards and the escape character are plain characters.
    assert_eq!(found(&index, "t", &q(Some(Modifier::Contains), vec!["%_"])).await, ["Patient/c"]);
    assert_eq!(found(&index, "t", &q(Some(Modifier::Contains), vec!["_"])).await, ["Patient/c"]);
    assert_eq!(found(&index, "t", &q(None, vec!["50%"])).await, ["Patient/c"]);
    assert_eq!(found(&index, "t", &q(None, vec!["5_"])).await, Vec::<String>::new());
    assert_eq!(found(&index, "t", &q(Some(Modifier::Contains), vec!["\\"])).await, ["Patient/c"]);
    assert_eq!(found(&index, "t", &q(Some(Modifier::Exact), vec!["Müller"])).await, ["Patient/a"]);
    assert_eq!(found(&index, "t", &q(Some(Modifier::Exact), vec!["müller"])).await, Vec::<String>::new());
}

#[tokio::test]
async fn tokens_systems_codes_not_text_of_type() {
    let dir = TempDir::new().expect("temp dir");
    let index = open(&dir);
    let code =
        |system: Option<&str>, code: &str, text: Option<&str>| entry("code", token_value(system, Some(code), text));
    apply(
        &index,
        vec![
            update(
                "t",
                "Observation",
                "a",
                1,
                1,
                Some(vec![code(Some("http://loinc"), "1234", Some("Blood Pressure"))]),
            ),
            update("t", "Observation", "b", 1, 2, Some(vec![code(None, "1234", None)])),
            update("t", "Observation", "c", 1, 3, Some(vec![code(Some("http://other"), "abc", Some("Élan"))])),
            update("t", "Observation", "d", 1, 4, Some(vec![code(Some("http://other"), "ABC", None)])),
            update("t", "Observation", "e", 1, 5, Some(vec![])),
            update(
                "t",
                "Observation",
                "f",
                1,
                6,
                Some(vec![
                    code(Some("urn:ids"), "MRN-1", None),
                    code(None, "x", Some("of-type:http://terminology.hl7.org/CodeSystem/v2-0203|MR|MRN-1")),
                ]),
            ),
        ],
    )
    .await;
    let q = |modifier: Option<Modifier>, values: Vec<SearchValue>| {
        query(&["Observation"], vec![matching("code", ParamType::Token, modifier, values)])
    };
    assert_eq!(
        found(&index, "t", &q(None, vec![tok(TokenSystem::Any, Some("1234"))])).await,
        ["Observation/a", "Observation/b"]
    );
    assert_eq!(found(&index, "t", &q(None, vec![tok(sys("http://loinc"), Some("1234"))])).await, ["Observation/a"]);
    assert_eq!(found(&index, "t", &q(None, vec![tok(TokenSystem::None, Some("1234"))])).await, ["Observation/b"]);
    assert_eq!(
        found(&index, "t", &q(None, vec![tok(sys("http://other"), None)])).await,
        ["Observation/c", "Observation/d"]
    );
    // Codes are case-sensitive.
    assert_eq!(found(&index, "t", &q(None, vec![tok(TokenSystem::Any, Some("abc"))])).await, ["Observation/c"]);
    // :not includes resources without the parameter.
    assert_eq!(
        found(&index, "t", &q(Some(Modifier::Not), vec![tok(TokenSystem::Any, Some("1234"))])).await,
        ["Observation/c", "Observation/d", "Observation/e", "Observation/f"]
    );
    assert_eq!(
        found(
            &index,
            "t",
            &q(Some(Modifier::Not), vec![tok(TokenSystem::Any, Some("1234")), tok(TokenSystem::Any, Some("abc"))])
        )
        .await,
        ["Observation/d", "Observation/e", "Observation/f"]
    );
    assert_eq!(found(&index, "t", &q(Some(Modifier::Text), vec![s("blood p")])).await, ["Observation/a"]);
    assert_eq!(found(&index, "t", &q(Some(Modifier::Text), vec![s("elan")])).await, ["Observation/c"]);
    // The of-type helper entries are not display text.
    assert_eq!(found(&index, "t", &q(Some(Modifier::Text), vec![s("of-type")])).await, Vec::<String>::new());
    let of_type = SearchValue::OfType {
        type_system: "http://terminology.hl7.org/CodeSystem/v2-0203".to_owned(),
        type_code: "MR".to_owned(),
        value: "MRN-1".to_owned(),
    };
    assert_eq!(found(&index, "t", &q(Some(Modifier::OfType), vec![of_type])).await, ["Observation/f"]);
    // `_id` is implicit.
    let by_id =
        query(&["Observation"], vec![matching("_id", ParamType::Token, None, vec![tok(TokenSystem::Any, Some("c"))])]);
    assert_eq!(found(&index, "t", &by_id).await, ["Observation/c"]);
}

#[tokio::test]
async fn references_by_type_id_url_and_identifier() {
    let dir = TempDir::new().expect("temp dir");
    let index = open(&dir);
    let with_identifier = IndexValue::Reference {
        target_type: None,
        id: None,
        url: String::new(),
        version: None,
        identifier: Some((Some("urn:mrn".to_owned()), "42".to_owned())),
    };
    apply(
        &index,
        vec![
            update("t", "Observation", "a", 1, 1, Some(vec![reference("subject", "Patient", "1")])),
            update("t", "Observation", "b", 1, 2, Some(vec![reference("subject", "Group", "1")])),
            update(
                "t",
                "Observation",
                "c",
                1,
                3,
                Some(vec![entry("subject", reference_value(None, "http://elsewhere/fhir/Patient/9"))]),
            ),
            update("t", "Observation", "d", 1, 4, Some(vec![entry("subject", with_identifier)])),
        ],
    )
    .await;
    let reference_search = |target_type: Option<&str>, id: Option<&str>, url: Option<&str>| SearchValue::Reference {
        target_type: target_type.map(rt),
        id: id.map(str::to_owned),
        url: url.map(str::to_owned),
    };
    let q = |modifier: Option<Modifier>, value: SearchValue| {
        query(&["Observation"], vec![matching("subject", ParamType::Reference, modifier, vec![value])])
    };
    assert_eq!(
        found(&index, "t", &q(None, reference_search(Some("Patient"), Some("1"), None))).await,
        ["Observation/a"]
    );
    assert_eq!(
        found(&index, "t", &q(None, reference_search(None, Some("1"), None))).await,
        ["Observation/a", "Observation/b"]
    );
    assert_eq!(
        found(&index, "t", &q(Some(Modifier::Type(rt("Group"))), reference_search(Some("Group"), Some("1"), None)))
            .await,
        ["Observation/b"]
    );
    assert_eq!(
        found(&index, "t", &q(None, reference_search(None, None, Some("http://elsewhere/fhir/Patient/9")))).await,
        ["Observation/c"]
    );
    // An absolute url of this server also matches by type and id.
    assert_eq!(
        found(&index, "t", &q(None, reference_search(Some("Patient"), Some("1"), Some("http://me/fhir/Patient/1"))))
            .await,
        ["Observation/a"]
    );
    assert_eq!(
        found(&index, "t", &q(Some(Modifier::Identifier), tok(sys("urn:mrn"), Some("42")))).await,
        ["Observation/d"]
    );
    assert_eq!(
        found(&index, "t", &q(Some(Modifier::Identifier), tok(sys("urn:x"), Some("42")))).await,
        Vec::<String>::new()
    );
}

#[tokio::test]
async fn dates_with_every_prefix() {
    let dir = TempDir::new().expect("temp dir");
    let index = open(&dir);
    // a: all of 2020-01; b: 2020-01-15 (a day); c: 2019-12-31 .. 2020-02-01 (open-ish period);
    // d: 2021-06-01 (a day).
    let day = |y: i32, m: u8, d: u8| {
        time::Date::from_calendar_date(y, time::Month::try_from(m).expect("month"), d)
            .expect("date")
            .midnight()
            .assume_utc()
    };
    let span = |start, end| Some(vec![entry("date", date_value(start, end))]);
    apply(
        &index,
        vec![
            update("t", "Observation", "a", 1, 1, span(day(2020, 1, 1), day(2020, 2, 1))),
            update("t", "Observation", "b", 1, 2, span(day(2020, 1, 15), day(2020, 1, 16))),
            update("t", "Observation", "c", 1, 3, span(day(2019, 12, 31), day(2020, 2, 2))),
            update("t", "Observation", "d", 1, 4, span(day(2021, 6, 1), day(2021, 6, 2))),
        ],
    )
    .await;
    let q = |prefix, start, end| {
        query(&["Observation"], vec![matching("date", ParamType::Date, None, vec![date_search(prefix, start, end)])])
    };
    let jan = (day(2020, 1, 1), day(2020, 2, 1));
    let ids = |list: &[&str]| list.iter().map(|id| format!("Observation/{id}")).collect::<Vec<_>>();
    assert_eq!(found(&index, "t", &q(Prefix::Eq, jan.0, jan.1)).await, ids(&["a", "b"]));
    assert_eq!(found(&index, "t", &q(Prefix::Ne, jan.0, jan.1)).await, ids(&["c", "d"]));
    assert_eq!(found(&index, "t", &q(Prefix::Gt, jan.0, jan.1)).await, ids(&["c", "d"]));
    assert_eq!(found(&index, "t", &q(Prefix::Lt, jan.0, jan.1)).await, ids(&["c"]));
    assert_eq!(found(&index, "t", &q(Prefix::Ge, jan.0, jan.1)).await, ids(&["a", "b", "c", "d"]));
    assert_eq!(found(&index, "t", &q(Prefix::Le, jan.0, jan.1)).await, ids(&["a", "b", "c"]));
    assert_eq!(found(&index, "t", &q(Prefix::Sa, jan.0, jan.1)).await, ids(&["d"]));
    assert_eq!(found(&index, "t", &q(Prefix::Eb, day(2020, 1, 15), day(2020, 1, 16))).await, Vec::<String>::new());
    assert_eq!(found(&index, "t", &q(Prefix::Eb, day(2021, 1, 1), day(2021, 1, 2))).await, ids(&["a", "b", "c"]));
    // ap: now is 2024-06-01; 2021-06-10 is ~3 years away → widened by ~109 days: reaches d only.
    assert_eq!(found(&index, "t", &q(Prefix::Ap, day(2021, 6, 10), day(2021, 6, 11))).await, ids(&["d"]));
    // Close to now the window is at least one day on each side.
    assert_eq!(found(&index, "t", &q(Prefix::Ap, day(2021, 6, 3), day(2021, 6, 4))).await, ids(&["d"]));
    assert_eq!(found(&index, "t", &q(Prefix::Ap, day(2020, 1, 17), day(2020, 1, 18))).await, ids(&["a", "b", "c"]));
}

#[tokio::test]
async fn numbers_with_every_prefix() {
    let dir = TempDir::new().expect("temp dir");
    let index = open(&dir);
    let ids = |list: &[&str]| list.iter().map(|id| format!("RiskAssessment/{id}")).collect::<Vec<_>>();
    let values = [("a", 1.0), ("b", 99.6), ("c", 100.0), ("d", 100.4), ("e", 100.5), ("f", 110.0), ("g", -5.0)];
    apply(
        &index,
        values
            .iter()
            .enumerate()
            .map(|(i, (id, v))| {
                update("t", "RiskAssessment", id, 1, i as u64 + 1, Some(vec![entry("probability", number_value(*v))]))
            })
            .collect(),
    )
    .await;
    let q = |prefix| {
        query(
            &["RiskAssessment"],
            vec![matching("probability", ParamType::Number, None, vec![number_search(prefix, 100.0)])],
        )
    };
    assert_eq!(found(&index, "t", &q(Prefix::Eq)).await, ids(&["b", "c", "d"]));
    assert_eq!(found(&index, "t", &q(Prefix::Ne)).await, ids(&["a", "e", "f", "g"]));
    assert_eq!(found(&index, "t", &q(Prefix::Gt)).await, ids(&["d", "e", "f"]));
    // Wholly above / below the search range [99.5, 100.5).
    assert_eq!(found(&index, "t", &q(Prefix::Sa)).await, ids(&["e", "f"]));
    assert_eq!(found(&index, "t", &q(Prefix::Lt)).await, ids(&["a", "b", "g"]));
    assert_eq!(found(&index, "t", &q(Prefix::Eb)).await, ids(&["a", "g"]));
    assert_eq!(found(&index, "t", &q(Prefix::Ge)).await, ids(&["b", "c", "d", "e", "f"]));
    assert_eq!(found(&index, "t", &q(Prefix::Le)).await, ids(&["a", "b", "c", "d", "g"]));
    assert_eq!(found(&index, "t", &q(Prefix::Ap)).await, ids(&["b", "c", "d", "e", "f"]));
}

#[tokio::test]
async fn quantities_with_units_and_canonical_forms() {
    let dir = TempDir::new().expect("temp dir");
    let index = open(&dir);
    let quantity =
        |value: f64, system: Option<&str>, code: Option<&str>, unit: Option<&str>, canonical: Option<(f64, &str)>| {
            entry(
                "value-quantity",
                IndexValue::Quantity {
                    value,
                    low: value - 0.5,
                    high: value + 0.5,
                    system: system.map(str::to_owned),
                    code: code.map(str::to_owned),
                    unit: unit.map(str::to_owned),
                    canonical: canonical.map(|(v, c)| (v, c.to_owned())),
                },
            )
        };
    const UCUM: &str = "http://unitsofmeasure.org";
    apply(
        &index,
        vec![
            update(
                "t",
                "Observation",
                "a",
                1,
                1,
                Some(vec![quantity(5.0, Some(UCUM), Some("mg"), Some("mg"), Some((0.005, "g")))]),
            ),
            update("t", "Observation", "b", 1, 2, Some(vec![quantity(5.0, None, None, Some("mg"), None)])),
            update("t", "Observation", "c", 1, 3, Some(vec![quantity(5.0, Some("urn:other"), Some("mg"), None, None)])),
            update(
                "t",
                "Observation",
                "d",
                1,
                4,
                Some(vec![quantity(0.005, Some(UCUM), Some("g"), Some("g"), Some((0.005, "g")))]),
            ),
            update(
                "t",
                "Observation",
                "e",
                1,
                5,
                Some(vec![quantity(7.0, Some(UCUM), Some("mg"), None, Some((0.007, "g")))]),
            ),
        ],
    )
    .await;
    let search = |prefix, value: f64, system: Option<&str>, code: Option<&str>, canonical: Option<(f64, &str)>| {
        SearchValue::Quantity {
            prefix,
            value,
            low: value - 0.5,
            high: value + 0.5,
            system: system.map(str::to_owned),
            code: code.map(str::to_owned),
            canonical: canonical.map(|(v, c)| (v, c.to_owned())),
        }
    };
    let q = |value| query(&["Observation"], vec![matching("value-quantity", ParamType::Quantity, None, vec![value])]);
    let ids = |list: &[&str]| list.iter().map(|id| format!("Observation/{id}")).collect::<Vec<_>>();
    // Number only.
    assert_eq!(found(&index, "t", &q(search(Prefix::Eq, 5.0, None, None, None))).await, ids(&["a", "b", "c"]));
    // A code without system: code or unit.
    assert_eq!(found(&index, "t", &q(search(Prefix::Eq, 5.0, None, Some("mg"), None))).await, ids(&["a", "b", "c"]));
    // System and code.
    assert_eq!(found(&index, "t", &q(search(Prefix::Eq, 5.0, Some("urn:other"), Some("mg"), None))).await, ids(&["c"]));
    assert_eq!(found(&index, "t", &q(search(Prefix::Eq, 5.0, Some("urn:other"), None, None))).await, ids(&["c"]));
    // Canonical on both sides: 5 mg finds 0.005 g too, and not 7 mg.
    assert_eq!(
        found(&index, "t", &q(search(Prefix::Eq, 5.0, Some(UCUM), Some("mg"), Some((0.005, "g"))))).await,
        ids(&["a", "d"])
    );
    assert_eq!(
        found(&index, "t", &q(search(Prefix::Gt, 5.0, Some(UCUM), Some("mg"), Some((0.005, "g"))))).await,
        ids(&["e"])
    );
}

#[tokio::test]
async fn uris_equal_above_below() {
    let dir = TempDir::new().expect("temp dir");
    let index = open(&dir);
    let uri = |id: &str, seq: u64, value: &str| {
        update("t", "ValueSet", id, 1, seq, Some(vec![entry("url", IndexValue::Uri(value.to_owned()))]))
    };
    apply(
        &index,
        vec![
            uri("a", 1, "http://acme.org/fhir"),
            uri("b", 2, "http://acme.org/fhir/ValueSet/x"),
            uri("c", 3, "http://acme.org/fhir/ValueSet/x/y"),
            uri("d", 4, "http://other.org/fhir"),
        ],
    )
    .await;
    let q = |modifier, value: &str| {
        query(&["ValueSet"], vec![matching("url", ParamType::Uri, modifier, vec![SearchValue::Uri(value.to_owned())])])
    };
    let ids = |list: &[&str]| list.iter().map(|id| format!("ValueSet/{id}")).collect::<Vec<_>>();
    assert_eq!(found(&index, "t", &q(None, "http://acme.org/fhir/ValueSet/x")).await, ids(&["b"]));
    assert_eq!(found(&index, "t", &q(Some(Modifier::Below), "http://acme.org/fhir/ValueSet")).await, ids(&["b", "c"]));
    assert_eq!(
        found(&index, "t", &q(Some(Modifier::Above), "http://acme.org/fhir/ValueSet/x")).await,
        ids(&["a", "b"])
    );
}

#[tokio::test]
async fn missing_true_and_false() {
    let dir = TempDir::new().expect("temp dir");
    let index = open(&dir);
    apply(
        &index,
        vec![
            update("t", "Patient", "a", 1, 1, Some(vec![string("name", "x")])),
            update("t", "Patient", "b", 1, 2, Some(vec![])),
        ],
    )
    .await;
    let q = |missing| {
        query(
            &["Patient"],
            vec![Criterion::Missing { chain: vec![], param: "name".to_owned(), kind: ParamType::String, missing }],
        )
    };
    assert_eq!(found(&index, "t", &q(true)).await, ["Patient/b"]);
    assert_eq!(found(&index, "t", &q(false)).await, ["Patient/a"]);
}

// ---------------------------------------------------------------------------------------------
// chains, _has, AnyOf, composites

/// Observation → subject Patient → organization Organization (name), and Encounters.
async fn graph(index: &SqliteSearchIndex) {
    apply(
        index,
        vec![
            update("t", "Organization", "acme", 1, 1, Some(vec![string("name", "Acme Health")])),
            update("t", "Organization", "zen", 1, 2, Some(vec![string("name", "Zen Care")])),
            update(
                "t",
                "Patient",
                "p1",
                1,
                3,
                Some(vec![string("name", "Ann"), reference("organization", "Organization", "acme")]),
            ),
            update(
                "t",
                "Patient",
                "p2",
                1,
                4,
                Some(vec![string("name", "Bob"), reference("organization", "Organization", "zen")]),
            ),
            update("t", "Patient", "p3", 1, 5, Some(vec![string("name", "Cid")])),
            update(
                "t",
                "Observation",
                "o1",
                1,
                6,
                Some(vec![
                    reference("subject", "Patient", "p1"),
                    entry("code", token_value(Some("http://loinc"), Some("bp"), None)),
                ]),
            ),
            update(
                "t",
                "Observation",
                "o2",
                1,
                7,
                Some(vec![
                    reference("subject", "Patient", "p2"),
                    entry("code", token_value(Some("http://loinc"), Some("hr"), None)),
                ]),
            ),
            update("t", "Observation", "o3", 1, 8, Some(vec![reference("subject", "Patient", "p3")])),
            update("t", "Observation", "o4", 1, 9, Some(vec![reference("subject", "Group", "p1")])),
            update("t", "Encounter", "e1", 1, 10, Some(vec![reference("subject", "Patient", "p1")])),
            update("t", "DiagnosticReport", "r1", 1, 11, Some(vec![reference("result", "Observation", "o2")])),
        ],
    )
    .await;
}

fn link(param: &str, targets: &[&str]) -> ChainLink {
    ChainLink { param: param.to_owned(), targets: targets.iter().map(|t| rt(t)).collect() }
}

#[tokio::test]
async fn chains_two_deep() {
    let dir = TempDir::new().expect("temp dir");
    let index = open(&dir);
    graph(&index).await;
    let chained = |chain: Vec<ChainLink>, param: &str, value: &str| {
        Criterion::Match(Match {
            chain,
            param: param.to_owned(),
            kind: ParamType::String,
            modifier: None,
            values: vec![s(value)],
        })
    };
    // subject:Patient.name=ann
    let one = query(&["Observation"], vec![chained(vec![link("subject", &["Patient"])], "name", "ann")]);
    assert_eq!(found(&index, "t", &one).await, ["Observation/o1"]);
    // subject:Patient.organization.name=zen
    let two = query(
        &["Observation"],
        vec![chained(vec![link("subject", &["Patient"]), link("organization", &["Organization"])], "name", "zen")],
    );
    assert_eq!(found(&index, "t", &two).await, ["Observation/o2"]);
    // subject.organization:missing=true — reaches p3 (no organization) only.
    let missing = query(
        &["Observation"],
        vec![Criterion::Missing {
            chain: vec![link("subject", &["Patient"])],
            param: "organization".to_owned(),
            kind: ParamType::Reference,
            missing: true,
        }],
    );
    assert_eq!(found(&index, "t", &missing).await, ["Observation/o3"]);
    // A chain reaching a deleted resource finds nothing.
    apply(&index, vec![update("t", "Organization", "zen", 2, 12, None)]).await;
    assert!(found(&index, "t", &two).await.is_empty());
}

#[tokio::test]
async fn has_nested_and_any_of() {
    let dir = TempDir::new().expect("temp dir");
    let index = open(&dir);
    graph(&index).await;
    let code = |c: &str| matching("code", ParamType::Token, None, vec![tok(TokenSystem::Any, Some(c))]);
    // Patient?_has:Observation:subject:code=bp
    let has = |criterion| {
        Criterion::Has(Has {
            resource_type: rt("Observation"),
            reference_param: "subject".to_owned(),
            criterion: Box::new(criterion),
        })
    };
    assert_eq!(found(&index, "t", &query(&["Patient"], vec![has(code("bp"))])).await, ["Patient/p1"]);
    // Patient?_has:Observation:subject:_has:DiagnosticReport:result:_id=r1
    let inner = Criterion::Has(Has {
        resource_type: rt("DiagnosticReport"),
        reference_param: "result".to_owned(),
        criterion: Box::new(matching("_id", ParamType::Token, None, vec![tok(TokenSystem::Any, Some("r1"))])),
    });
    assert_eq!(found(&index, "t", &query(&["Patient"], vec![has(inner)])).await, ["Patient/p2"]);
    // AnyOf (compartment-like): subject = Patient/p1 OR code = hr, over two types.
    let subject_p1 = matching(
        "subject",
        ParamType::Reference,
        None,
        vec![SearchValue::Reference { target_type: Some(rt("Patient")), id: Some("p1".to_owned()), url: None }],
    );
    let any = query(&["Encounter", "Observation"], vec![Criterion::AnyOf(vec![subject_p1, code("hr")])]);
    assert_eq!(found(&index, "t", &any).await, ["Encounter/e1", "Observation/o1", "Observation/o2"]);
    assert!(found(&index, "t", &query(&["Observation"], vec![Criterion::AnyOf(vec![])])).await.is_empty());
}

#[tokio::test]
async fn composites_pair_components_of_the_same_entry() {
    let dir = TempDir::new().expect("temp dir");
    let index = open(&dir);
    let pair = |code: &str, value: f64| {
        entry(
            "code-value-quantity",
            IndexValue::Composite(vec![token_value(Some("http://loinc"), Some(code), None), quantity(value)]),
        )
    };
    fn quantity(value: f64) -> IndexValue {
        IndexValue::Quantity {
            value,
            low: value - 0.5,
            high: value + 0.5,
            system: None,
            code: None,
            unit: None,
            canonical: None,
        }
    }
    apply(
        &index,
        vec![
            // a: (bp, 120) and (hr, 60)
            update("t", "Observation", "a", 1, 1, Some(vec![pair("bp", 120.0), pair("hr", 60.0)])),
            // b: (bp, 60)
            update("t", "Observation", "b", 1, 2, Some(vec![pair("bp", 60.0)])),
        ],
    )
    .await;
    let search = |code: &str, prefix, value: f64| {
        SearchValue::Composite(vec![
            tok(TokenSystem::Any, Some(code)),
            SearchValue::Quantity {
                prefix,
                value,
                low: value - 0.5,
                high: value + 0.5,
                system: None,
                code: None,
                canonical: None,
            },
        ])
    };
    let q = |values| query(&["Observation"], vec![matching("code-value-quantity", ParamType::Composite, None, values)]);
    assert_eq!(
        found(&index, "t", &q(vec![search("bp", Prefix::Eq, 60.0)])).await,
        ["Observation/b"],
        "bp of a is 120, 60 is hr's"
    );
    assert_eq!(found(&index, "t", &q(vec![search("bp", Prefix::Gt, 100.0)])).await, ["Observation/a"]);
    assert_eq!(found(&index, "t", &q(vec![search("hr", Prefix::Eq, 60.0)])).await, ["Observation/a"]);
    assert_eq!(found(&index, "t", &q(vec![search("hr", Prefix::Eq, 120.0)])).await, Vec::<String>::new());
    assert_eq!(
        found(&index, "t", &q(vec![search("hr", Prefix::Eq, 120.0), search("bp", Prefix::Eq, 60.0)])).await,
        ["Observation/b"]
    );
    // A search with another number of components matches nothing.
    let short = SearchValue::Composite(vec![tok(TokenSystem::Any, Some("bp"))]);
    assert_eq!(found(&index, "t", &q(vec![short])).await, Vec::<String>::new());
    let missing = query(
        &["Observation"],
        vec![Criterion::Missing {
            chain: vec![],
            param: "code-value-quantity".to_owned(),
            kind: ParamType::Composite,
            missing: false,
        }],
    );
    assert_eq!(found(&index, "t", &missing).await, ["Observation/a", "Observation/b"]);
}

// ---------------------------------------------------------------------------------------------
// sorting and paging

fn sort(param: &str, kind: ParamType, descending: bool) -> SortKey {
    SortKey { param: param.to_owned(), kind, descending }
}

#[tokio::test]
async fn sorts_multi_key_with_missing_values_last() {
    let dir = TempDir::new().expect("temp dir");
    let index = open(&dir);
    let person = |id: &str, seq: u64, family: Option<&[&str]>, birth: Option<f64>| {
        let mut entries = Vec::new();
        for name in family.unwrap_or_default() {
            entries.push(string("family", name));
        }
        if let Some(b) = birth {
            entries.push(entry("rank", number_value(b)));
        }
        update("t", "Patient", id, 1, seq, Some(entries))
    };
    apply(
        &index,
        vec![
            person("a", 1, Some(&["Smith", "Adams"]), Some(2.0)),
            person("b", 2, Some(&["Brown"]), Some(1.0)),
            person("c", 3, Some(&["Brown"]), None),
            person("d", 4, None, Some(3.0)),
            person("e", 5, Some(&["Zed"]), Some(1.0)),
            person("f", 6, None, None),
        ],
    )
    .await;
    let sorted = |keys: Vec<SortKey>| {
        let mut q = query(&["Patient"], vec![]);
        q.sort = keys;
        q
    };
    let ids = |list: &str| list.chars().map(|id| format!("Patient/{id}")).collect::<Vec<_>>();
    // Ascending: the lowest value (a sorts as "adams").
    assert_eq!(found(&index, "t", &sorted(vec![sort("family", ParamType::String, false)])).await, ids("abcedf"));
    // Descending: the highest value (a sorts as "smith"); missing still last.
    assert_eq!(found(&index, "t", &sorted(vec![sort("family", ParamType::String, true)])).await, ids("eabcdf"));
    // Two keys: family asc, then rank desc (b and c tie on brown: b has rank 1, c none → c after b).
    assert_eq!(
        found(
            &index,
            "t",
            &sorted(vec![sort("family", ParamType::String, false), sort("rank", ParamType::Number, true)])
        )
        .await,
        ids("abcedf")
    );
    assert_eq!(
        found(
            &index,
            "t",
            &sorted(vec![sort("rank", ParamType::Number, false), sort("family", ParamType::String, true)])
        )
        .await,
        ids("ebadcf")
    );
    // Paged one by one, forwards and backwards, the order holds.
    let mut q = sorted(vec![sort("rank", ParamType::Number, true), sort("family", ParamType::String, false)]);
    let expected = ids("dabecf");
    assert_eq!(found(&index, "t", &q).await, expected);
    q.count = 1;
    assert_eq!(found(&index, "t", &q).await, expected);
    let backwards = walk_back(&index, &tenant("t"), &q).await;
    assert_eq!(backwards, expected);
}

/// Walks forward to the last page, then back with `previous` cursors to the first; returns the
/// rows seen going back, in query order.
async fn walk_back(index: &SqliteSearchIndex, tenant: &TenantId, query: &SearchQuery) -> Vec<String> {
    let mut page = index.search_at(tenant, query, None, now()).await.expect("search");
    while let Some(next) = page.next.clone() {
        page = index.search_at(tenant, query, Some(&next), now()).await.expect("search");
    }
    let mut pages = vec![page.hits.clone()];
    while let Some(previous) = page.previous.clone() {
        page = index.search_at(tenant, query, Some(&previous), now()).await.expect("search");
        assert!(page.next.is_some(), "a page reached backwards has a next page");
        pages.push(page.hits.clone());
    }
    pages.reverse();
    pages.concat().into_iter().map(|hit| format!("{}/{}", hit.resource_type, hit.id.as_str())).collect()
}

#[tokio::test]
async fn keyset_paging_survives_concurrent_writes() {
    let dir = TempDir::new().expect("temp dir");
    let index = open(&dir);
    let t = tenant("t");
    let lu = |minute: i64| {
        let at = datetime!(2024-01-01 0:00 UTC) + time::Duration::minutes(minute);
        entry("_lastUpdated", date_value(at, at + time::Duration::milliseconds(1)))
    };
    let mut updates = Vec::new();
    for i in 0..50_u64 {
        // Pairs share a timestamp so ties are broken by id.
        updates.push(update(
            "t",
            "Patient",
            &format!("p{i:02}"),
            1,
            i + 1,
            Some(vec![lu((i / 2) as i64), string("name", "match")]),
        ));
    }
    apply(&index, updates).await;
    for descending in [false, true] {
        let mut q = query(&["Patient"], vec![matching("name", ParamType::String, None, vec![s("match")])]);
        q.sort = vec![sort("_lastUpdated", ParamType::Date, descending)];
        q.count = 7;
        let mut expected: Vec<String> = (0..50).map(|i| format!("Patient/p{i:02}")).collect();
        if descending {
            // Timestamps descending, ids ascending within a timestamp.
            expected.sort_by(|a, b| {
                b[9..]
                    .parse::<u32>()
                    .map(|x| x / 2)
                    .unwrap_or(0)
                    .cmp(&a[9..].parse::<u32>().map(|x| x / 2).unwrap_or(0))
                    .then(a.cmp(b))
            });
        }
        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        let mut sequence = 1000;
        loop {
            let page = index.search_at(&t, &q, cursor.as_deref(), now()).await.expect("search");
            assert_eq!(page.total, Some(50), "the total counts matches, not the page");
            seen.extend(page.hits.iter().map(|hit| format!("{}/{}", hit.resource_type, hit.id.as_str())));
            // Between pages: unrelated resources (no match) in every position of the order, and a
            // resource of another type.
            for minute in [-5, 3, 12, 40] {
                sequence += 1;
                let id = format!("x{sequence}");
                index
                    .apply(vec![
                        update("t", "Patient", &id, 1, sequence, Some(vec![lu(minute), string("name", "other")])),
                        update("t", "Observation", &id, 1, sequence, Some(vec![lu(minute), string("name", "match")])),
                    ])
                    .await
                    .expect("apply");
            }
            match page.next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        assert_eq!(seen, expected, "descending {descending}");
        let back = walk_back(&index, &t, &q).await;
        assert_eq!(back, expected, "backwards, descending {descending}");
    }
}

#[tokio::test]
async fn totals_and_count_zero() {
    let dir = TempDir::new().expect("temp dir");
    let index = open(&dir);
    apply(&index, (0..5).map(|i| update("t", "Patient", &format!("p{i}"), 1, i + 1, Some(vec![]))).collect()).await;
    let t = tenant("t");
    let mut q = query(&["Patient"], vec![]);
    q.count = 2;
    let page = index.search_at(&t, &q, None, now()).await.expect("search");
    assert_eq!((page.hits.len(), page.total, page.next.is_some(), page.previous.is_some()), (2, Some(5), true, false));
    q.total = TotalMode::Estimate;
    assert_eq!(index.search_at(&t, &q, None, now()).await.expect("search").total, Some(5));
    q.total = TotalMode::None;
    assert_eq!(index.search_at(&t, &q, None, now()).await.expect("search").total, None);
    q.total = TotalMode::Accurate;
    q.count = 0;
    let page = index.search_at(&t, &q, None, now()).await.expect("search");
    assert_eq!((page.hits.len(), page.total, page.next, page.previous), (0, Some(5), None, None));
    q.count = 5;
    let page = index.search_at(&t, &q, None, now()).await.expect("search");
    assert_eq!((page.hits.len(), page.next), (5, None), "no next page when the last row is on this one");
}

#[tokio::test]
async fn estimate_totals_are_exact_up_to_the_cap_and_absent_beyond() {
    let dir = TempDir::new().expect("temp dir");
    let index = open(&dir);
    let cap = super::compile::ESTIMATE_EXACT_UP_TO;
    let updates = (0..=cap).map(|i| {
        update(
            "t",
            "Patient",
            &format!("p{i}"),
            1,
            i + 1,
            Some(vec![entry("gender", token_value(None, Some("female"), None))]),
        )
    });
    apply(&index, updates.collect()).await;
    let t = tenant("t");
    let female = || matching("gender", ParamType::Token, None, vec![tok(TokenSystem::Any, Some("female"))]);
    for (criteria, matches) in [(vec![female()], cap + 1), (vec![], cap + 1)] {
        let mut q = query(&["Patient"], criteria);
        q.count = 3;
        q.total = TotalMode::Estimate;
        let page = index.search_at(&t, &q, None, now()).await.expect("search");
        assert_eq!((page.hits.len(), page.total), (3, None), "more than the cap: no total");
        q.total = TotalMode::Accurate;
        assert_eq!(index.search_at(&t, &q, None, now()).await.expect("search").total, Some(matches));
    }
    // At the cap an estimate is exact.
    let deleted = update("t", "Patient", "p0", 2, cap + 2, None);
    apply(&index, vec![deleted]).await;
    let mut q = query(&["Patient"], vec![female()]);
    q.total = TotalMode::Estimate;
    assert_eq!(index.search_at(&t, &q, None, now()).await.expect("search").total, Some(cap));
}

#[test]
fn an_older_schema_is_dropped_and_rebuilt_from_watermark_zero() {
    let dir = TempDir::new().expect("temp dir");
    let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    let index = open(&dir);
    runtime.block_on(apply(&index, vec![update("t", "Patient", "a", 1, 5, Some(vec![string("name", "x")]))]));
    drop(index);
    let conn = rusqlite::Connection::open(dir.path().join("search.db")).expect("open");
    conn.pragma_update(None, "user_version", 1).expect("downgrade");
    drop(conn);
    let index = open(&dir);
    let t = tenant("t");
    let q = query(&["Patient"], vec![]);
    let page = runtime.block_on(index.search_at(&t, &q, None, now())).expect("search");
    assert_eq!((page.hits.len(), page.watermark), (0, 0), "an empty index the indexer refills from the change log");
    drop(index);
    let conn = rusqlite::Connection::open(dir.path().join("search.db")).expect("open");
    let version: i64 = conn.query_row("PRAGMA user_version", [], |row| row.get(0)).expect("version");
    assert_eq!(version, super::schema::SCHEMA_VERSION);
    // A newer schema than this build reads is refused, not dropped.
    conn.pragma_update(None, "user_version", version + 1).expect("upgrade");
    drop(conn);
    assert!(matches!(
        SqliteSearchIndex::open(SqliteSearchConfig::new(dir.path().join("search.db"))),
        Err(IndexError::Internal(_))
    ));
}

#[tokio::test]
async fn tenants_are_isolated() {
    let dir = TempDir::new().expect("temp dir");
    let index = open(&dir);
    apply(
        &index,
        vec![
            update(
                "one",
                "Patient",
                "p",
                1,
                1,
                Some(vec![string("name", "alpha"), reference("organization", "Organization", "o")]),
            ),
            update("two", "Patient", "p", 3, 2, Some(vec![string("name", "beta")])),
            update("two", "Organization", "o", 1, 3, Some(vec![string("name", "org")])),
        ],
    )
    .await;
    let by_name = |n: &str| query(&["Patient"], vec![matching("name", ParamType::String, None, vec![s(n)])]);
    assert_eq!(found(&index, "one", &by_name("alpha")).await, ["Patient/p"]);
    assert!(found(&index, "two", &by_name("alpha")).await.is_empty());
    assert_eq!(found(&index, "two", &by_name("beta")).await, ["Patient/p"]);
    // Deleting in one tenant leaves the other alone.
    apply(&index, vec![update("one", "Patient", "p", 2, 4, None)]).await;
    assert_eq!(found(&index, "two", &by_name("beta")).await, ["Patient/p"]);
    assert!(found(&index, "one", &query(&["Patient"], vec![])).await.is_empty());
    // Chains never cross tenants: tenant one's (deleted) patient pointed at an Organization/o that
    // exists only in tenant two.
    apply(
        &index,
        vec![update("one", "Patient", "q", 1, 5, Some(vec![reference("organization", "Organization", "o")]))],
    )
    .await;
    let chained = Criterion::Match(Match {
        chain: vec![link("organization", &["Organization"])],
        param: "name".to_owned(),
        kind: ParamType::String,
        modifier: None,
        values: vec![s("org")],
    });
    assert!(found(&index, "one", &query(&["Patient"], vec![chained])).await.is_empty());
    // A cursor of one tenant is refused in another.
    let mut q = query(&["Patient"], vec![]);
    q.count = 1;
    apply(&index, vec![update("two", "Patient", "r", 1, 6, Some(vec![]))]).await;
    let next = index.search_at(&tenant("two"), &q, None, now()).await.expect("search").next.expect("next page");
    assert!(matches!(index.search_at(&tenant("one"), &q, Some(&next), now()).await, Err(IndexError::InvalidCursor(_))));
}

#[tokio::test]
async fn malformed_and_foreign_cursors_are_rejected() {
    let dir = TempDir::new().expect("temp dir");
    let index = open(&dir);
    apply(
        &index,
        (0..3).map(|i| update("t", "Patient", &format!("p{i}"), 1, i + 1, Some(vec![string("name", "n")]))).collect(),
    )
    .await;
    let t = tenant("t");
    let mut q = query(&["Patient"], vec![]);
    q.count = 1;
    let next = index.search_at(&t, &q, None, now()).await.expect("search").next.expect("next");
    for bad in
        ["", "garbage", "k1.n.zzzz", &next[..next.len() - 1], &format!("{next}.z"), &next.replacen("k1.n", "k1.x", 1)]
    {
        assert!(
            matches!(index.search_at(&t, &q, Some(bad), now()).await, Err(IndexError::InvalidCursor(_))),
            "{bad:?}"
        );
    }
    // The same cursor with another query (criteria or sort changed) is foreign.
    let mut other = q.clone();
    other.criteria = vec![matching("name", ParamType::String, None, vec![s("n")])];
    assert!(matches!(index.search_at(&t, &other, Some(&next), now()).await, Err(IndexError::InvalidCursor(_))));
    other = q.clone();
    other.sort = vec![sort("name", ParamType::String, false)];
    assert!(matches!(index.search_at(&t, &other, Some(&next), now()).await, Err(IndexError::InvalidCursor(_))));
    // A changed page size is fine.
    let mut bigger = q.clone();
    bigger.count = 10;
    let page = index.search_at(&t, &bigger, Some(&next), now()).await.expect("search");
    assert_eq!(page.hits.len(), 2);
}

#[tokio::test]
async fn unsupported_features_are_reported() {
    let dir = TempDir::new().expect("temp dir");
    let index = open(&dir);
    let t = tenant("t");
    let special = query(&["Patient"], vec![matching("near", ParamType::Special, None, vec![s("x")])]);
    assert!(matches!(index.search_at(&t, &special, None, now()).await, Err(IndexError::Unsupported(_))));
    let mut by_composite = query(&["Observation"], vec![]);
    by_composite.sort = vec![sort("code-value-quantity", ParamType::Composite, false)];
    assert!(matches!(index.search_at(&t, &by_composite, None, now()).await, Err(IndexError::Unsupported(_))));
    let wrong = query(&["Patient"], vec![matching("name", ParamType::String, Some(Modifier::Below), vec![s("x")])]);
    assert!(matches!(index.search_at(&t, &wrong, None, now()).await, Err(IndexError::Unsupported(_))));
}

// ---------------------------------------------------------------------------------------------
// plans and timing

/// The common shapes are index-driven: no full scan of a value table, and `_lastUpdated` sort is
/// an ordered index walk.
#[tokio::test]
async fn common_shapes_use_indexes() {
    let dir = TempDir::new().expect("temp dir");
    let index = open(&dir);
    drop(index);
    let conn = rusqlite::Connection::open(dir.path().join("search.db")).expect("open");
    let t = tenant("t");
    let plan = |q: &SearchQuery| -> Vec<String> {
        let compiled = super::compile::compile(&t, q, None, now()).expect("compile");
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {}", compiled.page.text)).expect("explain");
        let rows = stmt
            .query_map(rusqlite::params_from_iter(compiled.page.params.iter()), |row| row.get::<_, String>(3))
            .expect("plan");
        rows.collect::<Result<Vec<_>, _>>().expect("plan rows")
    };
    let count_plan = |q: &SearchQuery| -> Vec<String> {
        let compiled = super::compile::compile(&t, q, None, now()).expect("compile");
        let count = compiled.count.expect("a total is wanted");
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {}", count.text)).expect("explain");
        let rows = stmt
            .query_map(rusqlite::params_from_iter(count.params.iter()), |row| row.get::<_, String>(3))
            .expect("plan");
        rows.collect::<Result<Vec<_>, _>>().expect("plan rows")
    };
    let no_scans = |plan: &[String]| plan.iter().all(|step| !step.starts_with("SCAN"));
    let shapes = [
        (
            "token eq",
            query(
                &["Patient"],
                vec![matching("identifier", ParamType::Token, None, vec![tok(sys("urn:mrn"), Some("1"))])],
            ),
            "token_values_code",
        ),
        (
            "string prefix",
            query(&["Patient"], vec![matching("name", ParamType::String, None, vec![s("smi")])]),
            "string_values_normalized",
        ),
        (
            // Without `exact` in the index, SQLite scanned the primary key for this one.
            "string exact",
            query(&["Patient"], vec![matching("name", ParamType::String, Some(Modifier::Exact), vec![s("Smith")])]),
            "string_values_normalized",
        ),
        (
            "reference eq",
            query(
                &["Observation"],
                vec![matching(
                    "subject",
                    ParamType::Reference,
                    None,
                    vec![SearchValue::Reference {
                        target_type: Some(rt("Patient")),
                        id: Some("1".to_owned()),
                        url: None,
                    }],
                )],
            ),
            "reference_values_",
        ),
        (
            "date range",
            query(
                &["Observation"],
                vec![matching(
                    "date",
                    ParamType::Date,
                    None,
                    vec![date_search(Prefix::Eq, datetime!(2020-01-01 0:00 UTC), datetime!(2020-02-01 0:00 UTC))],
                )],
            ),
            "date_values_start",
        ),
    ];
    for (name, q, index_name) in shapes {
        let plan = plan(&q);
        assert!(no_scans(&plan), "{name}: {plan:?}");
        assert!(plan.iter().any(|step| step.contains(index_name)), "{name} uses {index_name}: {plan:?}");
        assert!(plan.iter().any(|step| step.contains("r USING PRIMARY KEY")), "{name} seeks resources: {plan:?}");
        eprintln!("{name}: {plan:?}");
        // The total is counted on the value index alone: no seek into `resources` per match.
        let count = count_plan(&q);
        assert!(count.iter().any(|step| step.contains(index_name)), "{name} count uses {index_name}: {count:?}");
        assert!(!count.iter().any(|step| step.contains("PRIMARY KEY")), "{name} count seeks resources: {count:?}");
        eprintln!("{name} count: {count:?}");
    }
    // One code (or an exact string, a typed reference, a uri) in the default order: the page
    // streams from the value index in id order and stops after `count` rows — no sort of every
    // match however broad the code (`gender=female`).
    let streamed = [
        query(
            &["Patient"],
            vec![matching("gender", ParamType::Token, None, vec![tok(TokenSystem::Any, Some("female"))])],
        ),
        query(&["Patient"], vec![matching("family", ParamType::String, Some(Modifier::Exact), vec![s("Smith")])]),
        query(
            &["Observation"],
            vec![matching(
                "subject",
                ParamType::Reference,
                None,
                vec![SearchValue::Reference { target_type: Some(rt("Patient")), id: Some("1".to_owned()), url: None }],
            )],
        ),
    ];
    for q in streamed {
        let steps = plan(&q);
        assert!(no_scans(&steps), "{steps:?}");
        assert!(!steps.iter().any(|step| step.contains("FOR ORDER BY")), "streams in id order: {steps:?}");
    }
    for descending in [false, true] {
        let mut q = query(&["Patient"], vec![]);
        q.sort = vec![sort("_lastUpdated", ParamType::Date, descending)];
        let walk = plan(&q);
        let expected = if descending { "resources_lu_desc" } else { "resources_lu_asc" };
        assert!(no_scans(&walk) && walk.iter().any(|s| s.contains(expected)), "{walk:?}");
        assert!(!walk.iter().any(|s| s == "USE TEMP B-TREE FOR ORDER BY"), "no full sort: {walk:?}");
        // With a cursor the walk starts at the cursor (a range on the index).
        let page = super::cursor::Cursor {
            direction: super::cursor::Direction::Next,
            fingerprint: 0,
            keys: vec![rusqlite::types::Value::Integer(5), "Patient".to_owned().into(), "p1".to_owned().into()],
        };
        let compiled = super::compile::compile(&t, &q, Some(&page), now()).expect("compile");
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {}", compiled.page.text)).expect("explain");
        let steps: Vec<String> = stmt
            .query_map(rusqlite::params_from_iter(compiled.page.params.iter()), |row| row.get::<_, String>(3))
            .expect("plan")
            .collect::<Result<_, _>>()
            .expect("rows");
        assert!(
            steps.iter().any(|s| s.contains(expected) && (s.contains("lu_asc>") || s.contains("lu_desc<"))),
            "{steps:?}"
        );
        eprintln!("_lastUpdated sort (descending {descending}) from a cursor: {steps:?}");
    }
}

/// 100k indexed resources: first-page timings of the common shapes. Reports, does not assert.
/// `cargo test -p fhirmesh-store-sqlite --release -- --ignored --nocapture search_timing_100k`
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a benchmark: run by hand"]
async fn search_timing_100k() {
    let dir = TempDir::new().expect("temp dir");
    let index = open(&dir);
    let families = ["smith", "jones", "brown", "taylor", "wilson", "davies", "evans", "thomas", "roberts", "walker"];
    let started = Instant::now();
    for batch in 0..100_u64 {
        let updates = (0..1000_u64)
            .map(|i| {
                let n = batch * 1000 + i;
                let at = datetime!(2024-01-01 0:00 UTC) + time::Duration::seconds(n as i64);
                update(
                    "t",
                    "Patient",
                    &format!("p{n:06}"),
                    1,
                    n + 1,
                    Some(vec![
                        string("name", &format!("{}{n}", families[(n % 10) as usize])),
                        entry("identifier", token_value(Some("urn:mrn"), Some(&format!("MRN{n}")), None)),
                        entry(
                            "gender",
                            token_value(
                                Some("http://hl7.org/fhir/administrative-gender"),
                                Some(["male", "female"][(n % 2) as usize]),
                                None,
                            ),
                        ),
                        reference("organization", "Organization", &format!("o{}", n % 100)),
                        entry("birthdate", date_value(at, at + time::Duration::DAY)),
                        entry("_lastUpdated", date_value(at, at + time::Duration::milliseconds(1))),
                    ]),
                )
            })
            .collect();
        index.apply(updates).await.expect("apply");
    }
    eprintln!("indexed 100k resources in {:?}", started.elapsed());
    let t = tenant("t");
    let mut shapes: Vec<(&str, SearchQuery)> = vec![
        (
            "token eq (identifier, 1 hit)",
            query(
                &["Patient"],
                vec![matching("identifier", ParamType::Token, None, vec![tok(sys("urn:mrn"), Some("MRN4242"))])],
            ),
        ),
        (
            "token eq (gender, 50k hits)",
            query(
                &["Patient"],
                vec![matching("gender", ParamType::Token, None, vec![tok(TokenSystem::Any, Some("female"))])],
            ),
        ),
        (
            "string prefix (smith4242…, 1 hit)",
            query(&["Patient"], vec![matching("name", ParamType::String, None, vec![s("smith4242")])]),
        ),
        (
            "string prefix (smith, 10k hits)",
            query(&["Patient"], vec![matching("name", ParamType::String, None, vec![s("smith")])]),
        ),
        (
            "reference eq (1k hits)",
            query(
                &["Patient"],
                vec![matching(
                    "organization",
                    ParamType::Reference,
                    None,
                    vec![SearchValue::Reference {
                        target_type: Some(rt("Organization")),
                        id: Some("o7".to_owned()),
                        url: None,
                    }],
                )],
            ),
        ),
        (
            "date eq range (3.6k hits)",
            query(
                &["Patient"],
                vec![matching(
                    "birthdate",
                    ParamType::Date,
                    None,
                    vec![date_search(Prefix::Eq, datetime!(2024-01-01 1:00 UTC), datetime!(2024-01-02 2:00 UTC))],
                )],
            ),
        ),
    ];
    let mut by_date = query(&["Patient"], vec![]);
    by_date.sort = vec![sort("_lastUpdated", ParamType::Date, true)];
    shapes.push(("_lastUpdated desc, all", by_date));
    for (name, mut q) in shapes {
        q.count = 20;
        for total in [TotalMode::None, TotalMode::Accurate] {
            q.total = total;
            let mut best = StdDuration::MAX;
            let mut hits = 0;
            for _ in 0..20 {
                let started = Instant::now();
                let page = index.search_at(&t, &q, None, now()).await.expect("search");
                best = best.min(started.elapsed());
                hits = page.hits.len();
            }
            eprintln!("{name}, total {total:?}: {hits} hits, best of 20: {best:?}");
        }
    }
}
