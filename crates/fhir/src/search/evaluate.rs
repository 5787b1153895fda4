//! The reference search evaluator: a brute-force, obviously-correct implementation of the matching
//! semantics documented in [`super::query`], over in-memory documents. Backends (SQLite, OpenSearch)
//! are tested against it; it is not meant to be fast.
//!
//! Choices the AST leaves open, made here (and to be followed by the backends):
//! - A chain reaches the corpus documents of the link's target types that a `Reference` entry of the
//!   link's parameter points at (by type and id); the criterion holds when it holds on at least one
//!   reached document. So `subject:Patient.gender:missing=true` needs a Patient subject without a
//!   gender, and `:not` through a chain needs a reached document with no matching value.
//! - `:not` (unchained) holds when no value of the parameter matches, including when there is none.
//! - A document without an `_id` entry has its id as an implicit `_id` token (no system).
//! - Quantities compare canonical values when both sides have a canonical form (the search range
//!   scaled by the same factor as the value), else raw values plus the unit rule.

use std::borrow::Cow;
use std::cmp::Ordering;

use time::{Duration, OffsetDateTime};

use crate::ResourceType;
use crate::search::parse::ucum_canonical;
use crate::search::query::{Criterion, Match, Modifier, Prefix, SearchQuery, SearchValue, SortKey, TokenSystem};
use crate::search::values::{DATE_MAX, DATE_MIN, IndexEntry, IndexValue, normalize_string};

/// One indexed resource.
#[derive(Debug, Clone, PartialEq)]
pub struct Doc {
    pub resource_type: ResourceType,
    pub id: String,
    pub entries: Vec<IndexEntry>,
}

/// Every document of `query.types` matching all criteria, ordered by `query.sort`, then by type
/// name and id. Paging, includes and totals are the caller's business.
pub fn evaluate(query: &SearchQuery, corpus: &[Doc], now: OffsetDateTime) -> Vec<(ResourceType, String)> {
    let mut hits: Vec<&Doc> = corpus
        .iter()
        .filter(|doc| query.types.contains(&doc.resource_type))
        .filter(|doc| query.criteria.iter().all(|c| matches(c, doc, corpus, now)))
        .collect();
    hits.sort_by(|a, b| compare_docs(&query.sort, a, b));
    hits.into_iter().map(|doc| (doc.resource_type, doc.id.clone())).collect()
}

/// Whether `doc` satisfies `criterion` (`corpus` resolves chains and `_has`).
pub fn matches(criterion: &Criterion, doc: &Doc, corpus: &[Doc], now: OffsetDateTime) -> bool {
    match criterion {
        Criterion::Match(m) => reached(&m.chain, doc, corpus).into_iter().any(|d| match_values(m, d, now)),
        Criterion::Missing { chain, param, missing, .. } => {
            reached(chain, doc, corpus).into_iter().any(|d| values_of(d, param).is_empty() == *missing)
        }
        Criterion::Has(has) => corpus.iter().any(|referrer| {
            referrer.resource_type == has.resource_type
                && points_at(referrer, &has.reference_param, doc)
                && matches(&has.criterion, referrer, corpus, now)
        }),
        Criterion::AnyOf(alternatives) => alternatives.iter().any(|c| matches(c, doc, corpus, now)),
    }
}

/// The documents a chain reaches from `doc` (just `doc` for an empty chain).
fn reached<'a>(chain: &[crate::search::query::ChainLink], doc: &'a Doc, corpus: &'a [Doc]) -> Vec<&'a Doc> {
    let mut current = vec![doc];
    for link in chain {
        current = corpus
            .iter()
            .filter(|target| link.targets.contains(&target.resource_type))
            .filter(|target| current.iter().any(|source| points_at(source, &link.param, target)))
            .collect();
    }
    current
}

/// Whether a `Reference` entry of `param` in `source` refers to `target` (by type and id).
fn points_at(source: &Doc, param: &str, target: &Doc) -> bool {
    source.entries.iter().any(|entry| {
        entry.param == param
            && matches!(&entry.value, IndexValue::Reference { target_type: Some(t), id: Some(id), .. }
                if *t == target.resource_type && *id == target.id)
    })
}

/// The values of `param` in `doc`; `_id` defaults to the document's id.
fn values_of<'a>(doc: &'a Doc, param: &str) -> Vec<Cow<'a, IndexValue>> {
    let mut values: Vec<Cow<'a, IndexValue>> =
        doc.entries.iter().filter(|e| e.param == param).map(|e| Cow::Borrowed(&e.value)).collect();
    if param == "_id" && values.is_empty() {
        values.push(Cow::Owned(IndexValue::Token { system: None, code: Some(doc.id.clone()), text: None }));
    }
    values
}

fn match_values(m: &Match, doc: &Doc, now: OffsetDateTime) -> bool {
    let stored = values_of(doc, &m.param);
    if m.modifier == Some(Modifier::Not) {
        return !stored.iter().any(|t| m.values.iter().any(|s| value_matches(s, None, t, now)));
    }
    stored.iter().any(|t| m.values.iter().any(|s| value_matches(s, m.modifier.as_ref(), t, now)))
}

/// Prefix of the text of the extra Token entries extraction stores for `:of-type`.
const OF_TYPE_TEXT: &str = "of-type:";

/// One search value against one stored value, per the rules in [`super::query::SearchValue`].
fn value_matches(search: &SearchValue, modifier: Option<&Modifier>, stored: &IndexValue, now: OffsetDateTime) -> bool {
    match (search, stored) {
        (SearchValue::String(v), IndexValue::String { normalized, exact }) => match modifier {
            Some(Modifier::Exact) => exact == v,
            Some(Modifier::Contains) => normalized.contains(&normalize_string(v)),
            _ => normalized.starts_with(&normalize_string(v)),
        },
        (SearchValue::String(v), IndexValue::Token { text: Some(text), .. }) if modifier == Some(&Modifier::Text) => {
            !text.starts_with(OF_TYPE_TEXT) && normalize_string(text).starts_with(&normalize_string(v))
        }
        (SearchValue::Token { system, code }, IndexValue::Reference { identifier: Some((s, value)), .. })
            if modifier == Some(&Modifier::Identifier) =>
        {
            token_matches(system, code.as_deref(), s.as_deref(), Some(value))
        }
        (SearchValue::Token { system, code }, IndexValue::Token { system: s, code: c, .. }) => {
            token_matches(system, code.as_deref(), s.as_deref(), c.as_deref())
        }
        (SearchValue::OfType { type_system, type_code, value }, IndexValue::Token { text: Some(text), .. }) => {
            *text == format!("{OF_TYPE_TEXT}{type_system}|{type_code}|{value}")
        }
        (
            SearchValue::Reference { target_type, id, url },
            IndexValue::Reference { target_type: stored_type, id: stored_id, url: stored_url, .. },
        ) if modifier != Some(&Modifier::Identifier) => {
            let same_target = || match (target_type, id) {
                (Some(t), Some(i)) => *stored_type == Some(*t) && stored_id.as_ref() == Some(i),
                (None, Some(i)) => stored_id.as_ref() == Some(i),
                _ => false,
            };
            match url {
                Some(url) => stored_url == url || same_target(),
                None => same_target(),
            }
        }
        (SearchValue::Date { prefix, start, end }, IndexValue::Date { start: t_start, end: t_end }) => {
            date_matches(*prefix, *t_start, *t_end, *start, *end, now)
        }
        (SearchValue::Number { prefix, value, low, high }, IndexValue::Number { low: t_low, high: t_high, .. }) => {
            number_matches(*prefix, *t_low, *t_high, *low, *high, *value)
        }
        (
            SearchValue::Quantity { prefix, value, low, high, system, code, canonical },
            IndexValue::Quantity {
                value: t, system: t_system, code: t_code, unit: t_unit, canonical: t_canonical, ..
            },
        ) => {
            if let (Some((s_value, s_unit)), Some((t_value, t_unit))) = (canonical, t_canonical) {
                let scale = if *value != 0.0 {
                    s_value / value
                } else {
                    code.as_deref().and_then(|c| ucum_canonical(1.0, c)).map_or(1.0, |(factor, _)| factor)
                };
                return s_unit == t_unit
                    && number_matches(*prefix, *t_value, *t_value, low * scale, high * scale, *s_value);
            }
            let unit_matches = match (system, code) {
                (Some(system), Some(code)) => t_system.as_ref() == Some(system) && t_code.as_ref() == Some(code),
                (None, Some(code)) => t_code.as_ref() == Some(code) || t_unit.as_ref() == Some(code),
                (Some(system), None) => t_system.as_ref() == Some(system),
                (None, None) => true,
            };
            unit_matches && number_matches(*prefix, *t, *t, *low, *high, *value)
        }
        (SearchValue::Uri(v), IndexValue::Uri(u)) => match modifier {
            Some(Modifier::Above) => v.starts_with(u.as_str()),
            Some(Modifier::Below) => u.starts_with(v.as_str()),
            _ => u == v,
        },
        (SearchValue::Composite(values), IndexValue::Composite(parts)) => {
            values.len() == parts.len() && values.iter().zip(parts).all(|(v, t)| value_matches(v, None, t, now))
        }
        _ => false,
    }
}

fn token_matches(
    system: &TokenSystem,
    code: Option<&str>,
    stored_system: Option<&str>,
    stored_code: Option<&str>,
) -> bool {
    let system_matches = match system {
        TokenSystem::Any => true,
        TokenSystem::None => stored_system.is_none(),
        TokenSystem::Is(s) => stored_system == Some(s.as_str()),
    };
    system_matches && code.is_none_or(|c| stored_code == Some(c))
}

/// A stored date range `[stored_start, stored_end)` against a search range with a prefix:
/// eq `t ⊆ s`; ne not eq; gt `t.end > s.end`; lt `t.start < s.start`; ge gt or eq; le lt or eq;
/// sa `t.start >= s.end`; eb `t.end <= s.start`; ap `t` overlaps `s` widened on each side by 10 % of
/// the distance from `now` to `s` (zero when `now` is inside `s`), at least one day.
pub fn date_matches(
    prefix: Prefix,
    stored_start: OffsetDateTime,
    stored_end: OffsetDateTime,
    search_start: OffsetDateTime,
    search_end: OffsetDateTime,
    now: OffsetDateTime,
) -> bool {
    let eq = stored_start >= search_start && stored_end <= search_end;
    let gt = stored_end > search_end;
    let lt = stored_start < search_start;
    match prefix {
        Prefix::Eq => eq,
        Prefix::Ne => !eq,
        Prefix::Gt => gt,
        Prefix::Lt => lt,
        Prefix::Ge => gt || eq,
        Prefix::Le => lt || eq,
        Prefix::Sa => stored_start >= search_end,
        Prefix::Eb => stored_end <= search_start,
        Prefix::Ap => {
            let (start, end) = approximate_window(search_start, search_end, now);
            stored_start < end && start < stored_end
        }
    }
}

/// The `ap` window around the search range `[start, end)`: widened on each side by 10 % of the
/// distance between it and `now` (zero when `now` is inside it), and at least one day.
pub fn approximate_window(
    start: OffsetDateTime,
    end: OffsetDateTime,
    now: OffsetDateTime,
) -> (OffsetDateTime, OffsetDateTime) {
    let gap = if now < start {
        start - now
    } else if now >= end {
        now - end
    } else {
        Duration::ZERO
    };
    let widen = (gap / 10_i32).max(Duration::DAY);
    (start.checked_sub(widen).unwrap_or(DATE_MIN), end.checked_add(widen).unwrap_or(DATE_MAX))
}

/// Whether a stored number covering `[t_low, t_high]` (a point for a decimal, the bounds of a
/// Range) matches the search `prefix` + `value` whose implicit-precision range is `[low, high)`,
/// per the R4 prefix table: `eq` — the search range contains the stored one; `gt`/`lt` — the
/// stored range reaches above/below the value; `ge`/`le` — either; `sa`/`eb` — the stored range
/// lies wholly above/below the search range; `ap` — within 10 % of the value.
pub fn number_matches(prefix: Prefix, t_low: f64, t_high: f64, low: f64, high: f64, value: f64) -> bool {
    let eq = t_low >= low && t_high < high;
    match prefix {
        Prefix::Eq => eq,
        Prefix::Ne => !eq,
        Prefix::Gt => t_high > value,
        Prefix::Lt => t_low < value,
        Prefix::Ge => t_high > value || eq,
        Prefix::Le => t_low < value || eq,
        Prefix::Sa => t_low >= high,
        Prefix::Eb => t_high < low,
        Prefix::Ap => {
            let tolerance = 0.1 * value.abs();
            t_low <= value + tolerance && t_high >= value - tolerance
        }
    }
}

/// A value a document sorts by.
#[derive(Debug, Clone, PartialEq)]
enum SortValue {
    Text(String),
    Number(f64),
    Instant(OffsetDateTime),
}

fn compare_sort_values(a: &SortValue, b: &SortValue) -> Ordering {
    match (a, b) {
        (SortValue::Text(a), SortValue::Text(b)) => a.cmp(b),
        (SortValue::Number(a), SortValue::Number(b)) => a.total_cmp(b),
        (SortValue::Instant(a), SortValue::Instant(b)) => a.cmp(b),
        // Mixed kinds cannot come from one well-formed parameter; order them by kind.
        _ => rank(a).cmp(&rank(b)),
    }
}

fn rank(value: &SortValue) -> u8 {
    match value {
        SortValue::Text(_) => 0,
        SortValue::Number(_) => 1,
        SortValue::Instant(_) => 2,
    }
}

/// The sort value of one stored value: string by normalized form, token by code, reference by url,
/// date by start (ascending) or end (descending), number and quantity by value, uri by itself.
fn sort_value(value: &IndexValue, descending: bool) -> Option<SortValue> {
    match value {
        IndexValue::String { normalized, .. } => Some(SortValue::Text(normalized.clone())),
        IndexValue::Token { code, .. } => code.clone().map(SortValue::Text),
        IndexValue::Reference { url, .. } => Some(SortValue::Text(url.clone())),
        IndexValue::Date { start, end } => Some(SortValue::Instant(if descending { *end } else { *start })),
        IndexValue::Number { value, .. } | IndexValue::Quantity { value, .. } => Some(SortValue::Number(*value)),
        IndexValue::Uri(uri) => Some(SortValue::Text(uri.clone())),
        IndexValue::Composite(_) => None,
    }
}

/// A document's key for one sort parameter: its lowest value ascending, its highest descending.
fn sort_key(doc: &Doc, key: &SortKey) -> Option<SortValue> {
    let values = values_of(doc, &key.param).into_iter().filter_map(|v| sort_value(&v, key.descending));
    if key.descending { values.max_by(compare_sort_values) } else { values.min_by(compare_sort_values) }
}

/// Sort keys in order (documents without a value last, either direction), then type name, then id.
fn compare_docs(keys: &[SortKey], a: &Doc, b: &Doc) -> Ordering {
    for key in keys {
        let ordering = match (sort_key(a, key), sort_key(b, key)) {
            (Some(x), Some(y)) => {
                let ordering = compare_sort_values(&x, &y);
                if key.descending { ordering.reverse() } else { ordering }
            }
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (None, None) => Ordering::Equal,
        };
        if ordering != Ordering::Equal {
            return ordering;
        }
    }
    a.resource_type.as_str().cmp(b.resource_type.as_str()).then_with(|| a.id.cmp(&b.id))
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;
    use crate::datetime::parse_fhir_datetime;
    use crate::search::params::ParamType;
    use crate::search::parse::{ParseOptions, UCUM_SYSTEM, parse_search};
    use crate::search::query::SearchScope;

    const NOW: OffsetDateTime = datetime!(2024-06-15 12:00 UTC);
    const LOINC: &str = "http://loinc.org";

    fn rt(name: &str) -> ResourceType {
        ResourceType::parse(name).unwrap_or_else(|| panic!("{name} is a resource type"))
    }

    fn doc(resource_type: &str, id: &str, entries: Vec<(&str, IndexValue)>) -> Doc {
        Doc {
            resource_type: rt(resource_type),
            id: id.to_owned(),
            entries: entries.into_iter().map(|(param, value)| IndexEntry { param: param.to_owned(), value }).collect(),
        }
    }

    fn string(text: &str) -> IndexValue {
        IndexValue::String { normalized: normalize_string(text), exact: text.to_owned() }
    }

    fn token(system: Option<&str>, code: Option<&str>, text: Option<&str>) -> IndexValue {
        IndexValue::Token {
            system: system.map(str::to_owned),
            code: code.map(str::to_owned),
            text: text.map(str::to_owned),
        }
    }

    /// A reference as extraction stores it: type and id when the text ends in `Type/id`.
    fn reference(url: &str) -> IndexValue {
        let segments: Vec<&str> = url.rsplitn(3, '/').collect();
        let local = match segments.as_slice() {
            [id, type_name, ..] if !url.starts_with("urn:") => ResourceType::parse(type_name).map(|t| (t, *id)),
            _ => None,
        };
        IndexValue::Reference {
            target_type: local.map(|(t, _)| t),
            id: local.map(|(_, id)| id.to_owned()),
            url: url.to_owned(),
            version: None,
            identifier: None,
        }
    }

    fn identifier_reference(system: &str, value: &str) -> IndexValue {
        IndexValue::Reference {
            target_type: None,
            id: None,
            url: String::new(),
            version: None,
            identifier: Some((Some(system.to_owned()), value.to_owned())),
        }
    }

    fn date(text: &str) -> IndexValue {
        let range = parse_fhir_datetime(text).unwrap_or_else(|e| panic!("{e}"));
        IndexValue::Date { start: range.start, end: range.end }
    }

    fn open_period(start: &str) -> IndexValue {
        let range = parse_fhir_datetime(start).unwrap_or_else(|e| panic!("{e}"));
        IndexValue::Date { start: range.start, end: DATE_MAX }
    }

    fn number(value: f64) -> IndexValue {
        IndexValue::Number { value, low: value, high: value }
    }

    fn quantity(value: f64, system: Option<&str>, code: Option<&str>, unit: Option<&str>) -> IndexValue {
        let canonical = match (system, code) {
            (Some(UCUM_SYSTEM), Some(code)) => ucum_canonical(value, code),
            _ => None,
        };
        IndexValue::Quantity {
            value,
            low: value - 0.05,
            high: value + 0.05,
            system: system.map(str::to_owned),
            code: code.map(str::to_owned),
            unit: unit.map(str::to_owned),
            canonical,
        }
    }

    fn run(scope: SearchScope, params: &[(&str, &str)], corpus: &[Doc]) -> Vec<String> {
        let params: Vec<(String, String)> = params.iter().map(|(n, v)| ((*n).to_owned(), (*v).to_owned())).collect();
        let options = ParseOptions { strict: true, ..ParseOptions::default() };
        let query = parse_search(&scope, &params, &options).unwrap_or_else(|e| panic!("{params:?}: {e}"));
        evaluate(&query, corpus, NOW).into_iter().map(|(_, id)| id).collect()
    }

    /// Ids matching `Type?name=value` (strict parse), in result order.
    fn search(resource_type: &str, name: &str, value: &str, corpus: &[Doc]) -> Vec<String> {
        run(SearchScope::Type(rt(resource_type)), &[(name, value)], corpus)
    }

    fn check(resource_type: &str, corpus: &[Doc], cases: &[(&str, &str, &[&str])]) {
        for (name, value, expected) in cases {
            assert_eq!(search(resource_type, name, value, corpus), *expected, "{resource_type}?{name}={value}");
        }
    }

    #[test]
    fn date_prefixes_and_partial_precision() {
        let corpus = [
            doc("Patient", "day", vec![("birthdate", date("2020-01-01"))]),
            doc("Patient", "year", vec![("birthdate", date("2020"))]),
            doc("Patient", "prev", vec![("birthdate", date("2019-12-31"))]),
            doc("Patient", "later", vec![("birthdate", date("2021-06-01"))]),
            doc("Patient", "open", vec![("birthdate", open_period("2019-06-01"))]),
            doc("Patient", "minute", vec![("birthdate", date("2020-01-01T10:00+02:00"))]),
            doc("Patient", "none", vec![]),
        ];
        check(
            "Patient",
            &corpus,
            &[
                ("birthdate", "2020", &["day", "minute", "year"]),
                ("birthdate", "eq2020-01-01", &["day", "minute"]),
                ("birthdate", "2020-01-01T08:00Z", &["minute"]),
                ("birthdate", "ne2020", &["later", "open", "prev"]),
                ("birthdate", "gt2020", &["later", "open"]),
                ("birthdate", "lt2020", &["open", "prev"]),
                ("birthdate", "ge2020", &["day", "later", "minute", "open", "year"]),
                ("birthdate", "le2020", &["day", "minute", "open", "prev", "year"]),
                ("birthdate", "sa2020", &["later"]),
                ("birthdate", "eb2020", &["prev"]),
                ("birthdate", "sa2019-12-31", &["day", "later", "minute", "year"]),
                // ~4.5 years from now: widened by ~162 days each side.
                ("birthdate", "ap2020-01-01", &["day", "minute", "open", "prev", "year"]),
                ("birthdate", "ap2020-01-01,2021-06-01", &["day", "later", "minute", "open", "prev", "year"]),
            ],
        );
    }

    #[test]
    fn date_approximation_is_at_least_a_day() {
        let day = |text: &str| parse_fhir_datetime(text).map(|r| (r.start, r.end)).unwrap_or_else(|e| panic!("{e}"));
        let (s_start, s_end) = day("2024-06-15");
        let stored = |text| {
            let (t_start, t_end) = day(text);
            date_matches(Prefix::Ap, t_start, t_end, s_start, s_end, NOW)
        };
        assert!(stored("2024-06-14") && stored("2024-06-16"));
        assert!(!stored("2024-06-13") && !stored("2024-06-17"));
        // Ten years out, 10 % is about a year.
        let (s_start, s_end) = day("2034-06-15");
        let (t_start, t_end) = day("2035-05-01");
        assert!(date_matches(Prefix::Ap, t_start, t_end, s_start, s_end, NOW));
        let (t_start, t_end) = day("2035-08-01");
        assert!(!date_matches(Prefix::Ap, t_start, t_end, s_start, s_end, NOW));
        // Saturates at the ends of time instead of overflowing.
        assert!(date_matches(Prefix::Ap, DATE_MIN, DATE_MAX, DATE_MIN, DATE_MAX, NOW));
    }

    #[test]
    fn number_implicit_precision_and_prefixes() {
        let corpus = [
            doc("RiskAssessment", "a", vec![("probability", number(99.5))]),
            doc("RiskAssessment", "b", vec![("probability", number(100.49))]),
            doc("RiskAssessment", "c", vec![("probability", number(100.5))]),
            doc("RiskAssessment", "d", vec![("probability", number(60.0))]),
            doc("RiskAssessment", "e", vec![("probability", number(151.0))]),
        ];
        check(
            "RiskAssessment",
            &corpus,
            &[
                ("probability", "100", &["a", "b"]),
                ("probability", "100.0", &[]),
                ("probability", "1e2", &["a", "b", "c", "d"]),
                ("probability", "ne100", &["c", "d", "e"]),
                ("probability", "gt100", &["b", "c", "e"]),
                // Wholly above / below the search range [99.5, 100.5), not just the value.
                ("probability", "sa100", &["c", "e"]),
                ("probability", "lt100", &["a", "d"]),
                ("probability", "eb100", &["d"]),
                ("probability", "ge100", &["a", "b", "c", "e"]),
                ("probability", "le100", &["a", "b", "d"]),
                ("probability", "ap100", &["a", "b", "c"]),
                ("probability", "60,151", &["d", "e"]),
            ],
        );
        assert!(number_matches(Prefix::Ap, 0.0, 0.0, -0.5, 0.5, 0.0));
        assert!(!number_matches(Prefix::Ap, 0.1, 0.1, -0.5, 0.5, 0.0));
    }

    #[test]
    fn number_ranges_match_as_intervals() {
        // A Range [10, 30] (midpoint 20) and an open-ended one [40, ∞).
        let range = |low: f64, high: f64| IndexValue::Number { value: low + (high - low) / 2.0, low, high };
        let corpus = [
            doc("RiskAssessment", "closed", vec![("probability", range(10.0, 30.0))]),
            doc("RiskAssessment", "open", vec![("probability", range(40.0, f64::MAX))]),
        ];
        check(
            "RiskAssessment",
            &corpus,
            &[
                // [19.5, 20.5) cannot contain [10, 30]: not its midpoint.
                ("probability", "20", &[]),
                ("probability", "1e2", &[]),
                ("probability", "gt25", &["closed", "open"]),
                ("probability", "lt15", &["closed"]),
                ("probability", "sa5", &["closed", "open"]),
                ("probability", "sa35", &["open"]),
                ("probability", "eb35", &["closed"]),
                ("probability", "ge29", &["closed", "open"]),
                ("probability", "ge30", &["open"]),
                ("probability", "le10", &[]),
                ("probability", "ap20", &["closed"]),
                ("probability", "ne20", &["closed", "open"]),
            ],
        );
    }

    #[test]
    fn quantity_units_and_canonical_forms() {
        let corpus = [
            doc(
                "Observation",
                "mg",
                vec![("value-quantity", quantity(5.4, Some(UCUM_SYSTEM), Some("mg"), Some("mg")))],
            ),
            doc("Observation", "unit", vec![("value-quantity", quantity(5.4, None, None, Some("mg")))]),
            doc("Observation", "g", vec![("value-quantity", quantity(0.0054, Some(UCUM_SYSTEM), Some("g"), None))]),
            doc("Observation", "other", vec![("value-quantity", quantity(5.4, Some("http://x"), Some("mg"), None))]),
        ];
        check(
            "Observation",
            &corpus,
            &[
                ("value-quantity", "5.4", &["mg", "other", "unit"]),
                ("value-quantity", "5.4|http://unitsofmeasure.org|mg", &["g", "mg"]),
                ("value-quantity", "5400|http://unitsofmeasure.org|ug", &["g", "mg"]),
                ("value-quantity", "gt5|http://unitsofmeasure.org|ug", &["g", "mg"]),
                ("value-quantity", "lt5|http://unitsofmeasure.org|ug", &[]),
                ("value-quantity", "5.4||mg", &["mg", "other", "unit"]),
                ("value-quantity", "gt5|http://x|mg", &["other"]),
                ("value-quantity", "5.4|http://x|", &["other"]),
                ("value-quantity", "5.4|http://unitsofmeasure.org|Cel", &[]),
            ],
        );
    }

    #[test]
    fn string_default_exact_contains() {
        let corpus = [
            doc("Patient", "muller", vec![("name", string("Müller"))]),
            doc("Patient", "mueller", vec![("name", string("Mueller"))]),
            doc("Patient", "smith", vec![("name", string("Smith-Jones")), ("name", string("Anna"))]),
        ];
        check(
            "Patient",
            &corpus,
            &[
                ("name", "mül", &["muller"]),
                ("name", "MU", &["mueller", "muller"]),
                ("name", "anna", &["smith"]),
                ("name", "jones", &[]),
                ("name:contains", "LL", &["mueller", "muller"]),
                ("name:contains", "ELL", &["mueller"]),
                ("name:contains", "jon", &["smith"]),
                ("name:exact", "Müller", &["muller"]),
                ("name:exact", "müller", &[]),
                ("name:exact", "Mü", &[]),
            ],
        );
    }

    #[test]
    fn token_forms_text_not_and_of_type() {
        let corpus = [
            doc("Observation", "a", vec![("code", token(Some(LOINC), Some("1234"), Some("Blood pressure")))]),
            doc("Observation", "b", vec![("code", token(None, Some("1234"), None))]),
            doc(
                "Observation",
                "c",
                vec![("code", token(Some("http://snomed.info/sct"), Some("999"), Some("Heart rate")))],
            ),
            doc("Observation", "d", vec![]),
        ];
        check(
            "Observation",
            &corpus,
            &[
                ("code", "1234", &["a", "b"]),
                ("code", "|1234", &["b"]),
                ("code", "http://loinc.org|1234", &["a"]),
                ("code", "http://loinc.org|", &["a"]),
                ("code", "http://loinc.org|999", &[]),
                ("code", "1234,999", &["a", "b", "c"]),
                ("code:text", "blood", &["a"]),
                ("code:text", "HEART r", &["c"]),
                ("code:text", "pressure", &[]),
                ("code:not", "1234", &["c", "d"]),
                ("code:not", "http://loinc.org|1234", &["b", "c", "d"]),
                ("code:not", "1234,999", &["d"]),
            ],
        );
        let mr = "http://terminology.hl7.org/CodeSystem/v2-0203";
        let corpus = [
            doc(
                "Patient",
                "p1",
                vec![
                    ("identifier", token(Some("http://hospital"), Some("42"), None)),
                    ("identifier", token(None, None, Some(&format!("of-type:{mr}|MR|42")))),
                ],
            ),
            doc("Patient", "p2", vec![("identifier", token(Some("http://hospital"), Some("42"), None))]),
        ];
        check(
            "Patient",
            &corpus,
            &[
                ("identifier:of-type", &format!("{mr}|MR|42"), &["p1"]),
                ("identifier:of-type", &format!("{mr}|MR|43"), &[]),
                ("identifier", "http://hospital|42", &["p1", "p2"]),
                ("identifier:text", "of-type", &[]),
            ],
        );
    }

    #[test]
    fn reference_forms_identifier_and_type() {
        let corpus = [
            doc("Observation", "o1", vec![("subject", reference("Patient/1"))]),
            doc("Observation", "o2", vec![("subject", reference("Group/1"))]),
            doc("Observation", "o3", vec![("subject", reference("http://other.org/fhir/Patient/1"))]),
            doc("Observation", "o4", vec![("subject", reference("urn:uuid:abc"))]),
            doc("Observation", "o5", vec![("subject", identifier_reference("http://hospital", "123"))]),
        ];
        check(
            "Observation",
            &corpus,
            &[
                ("subject", "Patient/1", &["o1", "o3"]),
                ("subject", "Patient/1/_history/4", &["o1", "o3"]),
                ("subject", "1", &["o1", "o2", "o3"]),
                ("subject:Patient", "1", &["o1", "o3"]),
                ("subject:Group", "1", &["o2"]),
                ("subject", "http://other.org/fhir/Patient/1", &["o1", "o3"]),
                ("subject", "urn:uuid:abc", &["o4"]),
                ("subject", "urn:uuid:abd", &[]),
                ("subject:identifier", "http://hospital|123", &["o5"]),
                ("subject:identifier", "123", &["o5"]),
                ("subject:identifier", "http://other|123", &[]),
                ("subject:missing", "true", &[]),
            ],
        );
    }

    #[test]
    fn uri_equality_above_below() {
        let corpus = [
            doc("ValueSet", "u1", vec![("url", IndexValue::Uri("http://x.org/fhir/ValueSet/a".to_owned()))]),
            doc("ValueSet", "u2", vec![("url", IndexValue::Uri("http://x.org/fhir".to_owned()))]),
            doc("ValueSet", "u3", vec![("url", IndexValue::Uri("http://y.org".to_owned()))]),
        ];
        check(
            "ValueSet",
            &corpus,
            &[
                ("url", "http://x.org/fhir", &["u2"]),
                ("url", "http://x.org/fhir/", &[]),
                ("url:below", "http://x.org/fhir", &["u1", "u2"]),
                ("url:above", "http://x.org/fhir/ValueSet/a/b", &["u1", "u2"]),
                ("url:above", "http://y.org", &["u3"]),
            ],
        );
    }

    #[test]
    fn composite_components_pair_within_one_entry() {
        let pair = |code: &str, value: f64| {
            IndexValue::Composite(vec![
                token(Some(LOINC), Some(code), None),
                quantity(value, Some(UCUM_SYSTEM), Some("mm[Hg]"), None),
            ])
        };
        let corpus = [
            doc(
                "Observation",
                "split",
                vec![("code-value-quantity", pair("A", 10.0)), ("code-value-quantity", pair("B", 200.0))],
            ),
            doc("Observation", "one", vec![("code-value-quantity", pair("A", 200.0))]),
        ];
        check(
            "Observation",
            &corpus,
            &[
                ("code-value-quantity", "http://loinc.org|A$gt100", &["one"]),
                ("code-value-quantity", "http://loinc.org|B$gt100", &["split"]),
                ("code-value-quantity", "A$10|http://unitsofmeasure.org|mm[Hg]", &["split"]),
                ("code-value-quantity", "A$lt100,B$lt100", &["split"]),
            ],
        );
    }

    fn chain_corpus() -> Vec<Doc> {
        vec![
            doc("Patient", "p1", vec![("name", string("Peter")), ("organization", reference("Organization/o1"))]),
            doc("Patient", "p2", vec![("name", string("Anna")), ("birthdate", date("2000"))]),
            doc("Organization", "o1", vec![("name", string("Acme"))]),
            doc("Group", "g1", vec![]),
            doc(
                "Observation",
                "ob1",
                vec![("subject", reference("Patient/p1")), ("code", token(None, Some("1234"), None))],
            ),
            doc(
                "Observation",
                "ob2",
                vec![("subject", reference("Patient/p2")), ("code", token(None, Some("9"), None))],
            ),
            doc("Observation", "ob3", vec![("subject", reference("Group/g1"))]),
            doc("Observation", "ob4", vec![("subject", reference("Patient/gone"))]),
            doc(
                "Provenance",
                "pr1",
                vec![("target", reference("Observation/ob1")), ("agent", reference("Practitioner/9"))],
            ),
        ]
    }

    #[test]
    fn chains_follow_references_in_the_corpus() {
        let corpus = chain_corpus();
        check(
            "Observation",
            &corpus,
            &[
                ("subject:Patient.name", "pet", &["ob1"]),
                ("subject.name", "anna", &["ob2"]),
                ("subject.name", "a", &["ob2"]),
                ("subject:Patient.organization.name", "acme", &["ob1"]),
                ("subject:Patient.organization.name", "other", &[]),
                ("subject:Patient.birthdate:missing", "true", &["ob1"]),
                ("subject:Patient.birthdate:missing", "false", &["ob2"]),
                ("subject:Patient.organization", "Organization/o1", &["ob1"]),
            ],
        );
    }

    #[test]
    fn reverse_chains_and_nesting() {
        let corpus = chain_corpus();
        check(
            "Patient",
            &corpus,
            &[
                ("_has:Observation:subject:code", "1234", &["p1"]),
                ("_has:Observation:subject:code", "1234,9", &["p1", "p2"]),
                ("_has:Observation:subject:code", "5", &[]),
                ("_has:Observation:subject:_has:Provenance:target:agent", "Practitioner/9", &["p1"]),
                ("_has:Observation:subject:_has:Provenance:target:agent", "Practitioner/8", &[]),
            ],
        );
        check("Organization", &corpus, &[("_has:Patient:organization:name", "peter", &["o1"])]);
    }

    #[test]
    fn missing_values() {
        let corpus = chain_corpus();
        check(
            "Patient",
            &corpus,
            &[
                ("birthdate:missing", "true", &["p1"]),
                ("birthdate:missing", "false", &["p2"]),
                ("organization:missing", "true", &["p2"]),
            ],
        );
    }

    #[test]
    fn compartments_match_any_linking_parameter() {
        let corpus = [
            doc("Observation", "o1", vec![("subject", reference("Patient/1"))]),
            doc("Observation", "o2", vec![("performer", reference("Patient/1")), ("subject", reference("Patient/2"))]),
            doc("Observation", "o3", vec![("subject", reference("Patient/2"))]),
            doc("Condition", "c1", vec![("patient", reference("Patient/1"))]),
            doc("Patient", "1", vec![]),
            doc("Patient", "2", vec![("link", reference("Patient/1"))]),
            doc("Patient", "3", vec![]),
        ];
        let scope = |member: Option<&str>| SearchScope::Compartment {
            compartment: rt("Patient"),
            id: "1".to_owned(),
            member: member.map(rt),
        };
        assert_eq!(run(scope(Some("Observation")), &[], &corpus), ["o1", "o2"]);
        assert_eq!(run(scope(Some("Patient")), &[], &corpus), ["1", "2"]);
        assert_eq!(run(scope(None), &[], &corpus), ["c1", "o1", "o2", "2"]);
        assert_eq!(run(scope(Some("Observation")), &[("subject", "Patient/2")], &corpus), ["o2"]);
    }

    #[test]
    fn sorting_puts_missing_values_last_and_breaks_ties_by_type_then_id() {
        let corpus = [
            doc(
                "Patient",
                "b",
                vec![("birthdate", date("2021")), ("name", string("Zed")), ("gender", token(None, Some("male"), None))],
            ),
            doc("Patient", "a", vec![("birthdate", date("2020")), ("name", string("émile"))]),
            doc("Patient", "c", vec![("name", string("Bob")), ("gender", token(None, Some("female"), None))]),
            doc("Patient", "d", vec![("birthdate", date("2020")), ("name", string("Anne"))]),
            doc(
                "Patient",
                "e",
                vec![("birthdate", date("2019")), ("birthdate", date("2022")), ("name", string("Carl"))],
            ),
        ];
        let sorted = |sort: &str| run(SearchScope::Type(rt("Patient")), &[("_sort", sort)], &corpus);
        assert_eq!(sorted("birthdate"), ["e", "a", "d", "b", "c"]);
        assert_eq!(sorted("-birthdate"), ["e", "b", "a", "d", "c"]);
        assert_eq!(sorted("name"), ["d", "c", "e", "a", "b"]);
        assert_eq!(sorted("-name"), ["b", "a", "e", "c", "d"]);
        assert_eq!(sorted("gender"), ["c", "b", "a", "d", "e"]);
        assert_eq!(sorted("-gender"), ["b", "c", "a", "d", "e"]);
        assert_eq!(sorted("birthdate,-name"), ["e", "a", "d", "b", "c"]);
        assert_eq!(sorted("_id"), ["a", "b", "c", "d", "e"]);
        assert_eq!(sorted("-_id"), ["e", "d", "c", "b", "a"]);

        // Without sort keys: type name, then id; only the query's types.
        let mixed = [
            doc("Patient", "a", vec![]),
            doc("Observation", "b", vec![]),
            doc("Observation", "a", vec![]),
            doc("Condition", "z", vec![]),
        ];
        let mut query = SearchQuery::new(vec![rt("Patient"), rt("Observation")], vec![], 10);
        query.sort = vec![SortKey { param: "value-quantity".to_owned(), kind: ParamType::Quantity, descending: false }];
        let hits = evaluate(&query, &mixed, NOW);
        assert_eq!(
            hits,
            [(rt("Observation"), "a".to_owned()), (rt("Observation"), "b".to_owned()), (rt("Patient"), "a".to_owned())]
        );
    }

    #[test]
    fn sorting_numbers_quantities_references_and_uris() {
        let corpus = [
            doc(
                "Observation",
                "x",
                vec![("value-quantity", quantity(10.0, None, None, None)), ("subject", reference("Patient/b"))],
            ),
            doc(
                "Observation",
                "y",
                vec![("value-quantity", quantity(2.0, None, None, None)), ("subject", reference("Patient/a"))],
            ),
            doc("Observation", "z", vec![("value-quantity", quantity(-3.0, None, None, None))]),
        ];
        let sorted = |sort: &str| run(SearchScope::Type(rt("Observation")), &[("_sort", sort)], &corpus);
        assert_eq!(sorted("value-quantity"), ["z", "y", "x"]);
        assert_eq!(sorted("-value-quantity"), ["x", "y", "z"]);
        assert_eq!(sorted("subject"), ["y", "x", "z"]);
        assert_eq!(sorted("-subject"), ["x", "y", "z"]);
        let corpus = [
            doc("ValueSet", "1", vec![("url", IndexValue::Uri("http://b".to_owned()))]),
            doc("ValueSet", "2", vec![("url", IndexValue::Uri("http://a".to_owned()))]),
        ];
        let sorted = run(SearchScope::Type(rt("ValueSet")), &[("_sort", "url")], &corpus);
        assert_eq!(sorted, ["2", "1"]);
    }
}
