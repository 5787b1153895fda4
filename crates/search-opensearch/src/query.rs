//! Compiles the backend-neutral [`SearchQuery`] to OpenSearch query DSL, with the matching rules of
//! `fhirmesh_fhir::search::query` (the reference evaluator is the oracle the tests hold it to).
//!
//! Every criterion on a resource's own values is a `nested` query on its kind's field, filtered by
//! the parameter code (`p`), so the parts of one value (a coding's system and code, a range's
//! bounds, a composite's components) match together. `:not` and `:missing=true` are `must_not` of
//! that nested query. Chains and `_has` cross documents, which OpenSearch cannot join: they run as
//! staged queries — the inner criterion first, its matches (bounded by [`MAX_STAGED`], refused with
//! an OperationOutcome beyond it, never truncated) then become `terms` filters of the outer query.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;

use serde_json::{Value, json};
use time::OffsetDateTime;

use fhirmesh_core::model::TenantId;
use fhirmesh_core::ports::IndexError;
use fhirmesh_fhir::ResourceType;
use fhirmesh_fhir::search::ParamType;
use fhirmesh_fhir::search::evaluate::approximate_window;
use fhirmesh_fhir::search::parse::ucum_canonical;
use fhirmesh_fhir::search::query::{
    ChainLink, Criterion, Has, Match, Modifier, Prefix, SearchValue, SortKey, TokenSystem,
};
use fhirmesh_fhir::search::values::normalize_string;

use crate::document::MAX_COMPONENTS;

/// The most resources one stage of a chain or `_has` may resolve to (and the most referrers a
/// `_has` may read). Past it the search is refused with a 400 naming the bound — narrow the inner
/// criterion — rather than answered from a truncated set.
pub const MAX_STAGED: usize = 50_000;

/// Prefix of the text of the extra Token entries extraction stores for `:of-type`.
const OF_TYPE_TEXT: &str = "of-type:";

/// Resources of `types` reached by a stage: type → ids.
pub(crate) type Keys = BTreeMap<ResourceType, BTreeSet<String>>;

/// What the compiler needs from the index to run a stage: the live resources of `types` (in the
/// tenant) matching `query`, or — with `references` = `Some(param)` — the targets of their `param`
/// references. Both bounded by [`MAX_STAGED`].
pub(crate) trait Stages: Sync {
    fn matching<'a>(
        &'a self,
        types: &'a [ResourceType],
        query: Value,
        references: Option<&'a str>,
    ) -> Pin<Box<dyn Future<Output = Result<Keys, IndexError>> + Send + 'a>>;
}

type Compiled<'a> = Pin<Box<dyn Future<Output = Result<Value, IndexError>> + Send + 'a>>;

pub(crate) struct Compiler<'a> {
    pub tenant: &'a TenantId,
    pub now: OffsetDateTime,
    pub stages: &'a dyn Stages,
}

fn unsupported(what: impl Into<String>) -> IndexError {
    IndexError::Unsupported(what.into())
}

fn match_none() -> Value {
    json!({"match_none": {}})
}

fn match_all() -> Value {
    json!({"match_all": {}})
}

fn all_of(clauses: Vec<Value>) -> Value {
    json!({"bool": {"filter": clauses}})
}

fn any_of(clauses: Vec<Value>) -> Value {
    if clauses.is_empty() {
        return match_none();
    }
    json!({"bool": {"should": clauses, "minimum_should_match": 1}})
}

fn not(clause: Value) -> Value {
    json!({"bool": {"must_not": [clause]}})
}

fn term(field: &str, value: impl Into<Value>) -> Value {
    json!({"term": {field: value.into()}})
}

fn exists(field: &str) -> Value {
    json!({"exists": {"field": field}})
}

fn range(field: &str, op: &str, value: impl Into<Value>) -> Value {
    json!({"range": {field: {op: value.into()}}})
}

/// `field` starts with `prefix` (every value when the prefix is empty).
fn starts_with(field: &str, prefix: &str) -> Value {
    if prefix.is_empty() { exists(field) } else { json!({"prefix": {field: prefix}}) }
}

/// The nested field of a kind.
fn kind_field(kind: ParamType) -> Result<&'static str, IndexError> {
    Ok(match kind {
        ParamType::String => "s",
        ParamType::Token => "t",
        ParamType::Reference => "r",
        ParamType::Date => "d",
        ParamType::Number => "n",
        ParamType::Quantity => "q",
        ParamType::Uri => "u",
        ParamType::Composite => "k",
        ParamType::Special => return Err(unsupported("special parameters")),
    })
}

/// The kind a composite component value is stored and matched as.
fn component_kind(value: &SearchValue) -> Result<ParamType, IndexError> {
    value.component_kind().ok_or_else(|| unsupported("a composite inside a composite"))
}

/// Microseconds since the epoch of a search bound, rounded down, or up when `ceil` (stored values
/// are whole microseconds, rounded down: `x >= b` ⟺ `x >= ceil(b)`, `x > b` ⟺ `x > floor(b)`,
/// `x <= b` ⟺ `x <= floor(b)`, `x < b` ⟺ `x < ceil(b)`).
fn micros(at: OffsetDateTime, ceil: bool) -> i64 {
    let nanos = at.unix_timestamp_nanos();
    let micros =
        if ceil { nanos.div_euclid(1000) + i128::from(nanos.rem_euclid(1000) != 0) } else { nanos.div_euclid(1000) };
    i64::try_from(micros).unwrap_or(if micros < 0 { i64::MIN } else { i64::MAX })
}

/// The leaf of a (possibly chained) criterion.
enum Leaf<'q> {
    Match(&'q Match),
    Missing { param: &'q str, kind: ParamType, missing: bool },
}

impl<'a> Compiler<'a> {
    /// The filter every searched document passes: this tenant, one of `types`, not a tombstone.
    pub fn scope(&self, types: &[ResourceType]) -> Vec<Value> {
        let names: Vec<&str> = types.iter().map(|t| t.as_str()).collect();
        vec![term("tenant", self.tenant.as_str()), json!({"terms": {"type": names}}), term("deleted", false)]
    }

    /// The query of `criterion` on documents of `types`.
    pub fn criterion<'s>(&'s self, types: &'s [ResourceType], criterion: &'s Criterion) -> Compiled<'s> {
        Box::pin(async move {
            match criterion {
                Criterion::Match(m) => self.chained(types, &m.chain, Leaf::Match(m)).await,
                Criterion::Missing { chain, param, kind, missing } => {
                    self.chained(types, chain, Leaf::Missing { param, kind: *kind, missing: *missing }).await
                }
                Criterion::Has(has) => self.has(types, has).await,
                Criterion::AnyOf(alternatives) => {
                    let mut clauses = Vec::with_capacity(alternatives.len());
                    for alternative in alternatives {
                        clauses.push(self.criterion(types, alternative).await?);
                    }
                    Ok(any_of(clauses))
                }
            }
        })
    }

    /// Follows `chain` (stage by stage, innermost first), then applies `leaf` to the documents
    /// reached.
    fn chained<'s>(&'s self, types: &'s [ResourceType], chain: &'s [ChainLink], leaf: Leaf<'s>) -> Compiled<'s> {
        Box::pin(async move {
            let Some((link, rest)) = chain.split_first() else {
                return self.leaf(&leaf);
            };
            if types.is_empty() || link.targets.is_empty() {
                return Ok(match_none());
            }
            let inner = self.chained(&link.targets, rest, leaf).await?;
            let mut filter = self.scope(&link.targets);
            filter.push(inner);
            let reached = self.stages.matching(&link.targets, all_of(filter), None).await?;
            Ok(references_to(&link.param, &reached))
        })
    }

    /// `_has:Type:param:…`: the targets of `param` references of the live `Type` resources
    /// matching the inner criterion (targets that may be deleted or never existed: the outer
    /// query only finds live ones).
    async fn has(&self, types: &[ResourceType], has: &Has) -> Result<Value, IndexError> {
        if types.is_empty() {
            return Ok(match_none());
        }
        let referrer = [has.resource_type];
        let inner = self.criterion(&referrer, &has.criterion).await?;
        let mut filter = self.scope(&referrer);
        filter.push(inner);
        let targets = self.stages.matching(&referrer, all_of(filter), Some(&has.reference_param)).await?;
        let clauses = targets
            .iter()
            .filter(|(resource_type, _)| types.contains(resource_type))
            .map(|(resource_type, ids)| {
                all_of(vec![term("type", resource_type.as_str()), json!({"terms": {"id": ids}})])
            })
            .collect();
        Ok(any_of(clauses))
    }

    /// A criterion on the document's own values.
    fn leaf(&self, leaf: &Leaf<'_>) -> Result<Value, IndexError> {
        let (param, kind) = match leaf {
            Leaf::Match(m) => (m.param.as_str(), m.kind),
            Leaf::Missing { param, kind, .. } => (*param, *kind),
        };
        let field = kind_field(kind)?;
        let (negated, values) = match leaf {
            Leaf::Match(m) => {
                let negated = m.modifier == Some(Modifier::Not);
                // `:not` negates the set of resources with a plainly matching value.
                let modifier = if negated { &None } else { &m.modifier };
                let mut values = Vec::with_capacity(m.values.len());
                for value in &m.values {
                    values.push(if kind == ParamType::Composite {
                        composite(modifier, value, self.now)?
                    } else {
                        value_query(field, kind, modifier, value, self.now)?
                    });
                }
                (negated, Some(any_of(values)))
            }
            Leaf::Missing { missing, .. } => (*missing, None),
        };
        let mut filter = vec![term(&format!("{field}.p"), param)];
        filter.extend(values);
        let nested = json!({"nested": {"path": field, "query": all_of(filter)}});
        Ok(if negated { not(nested) } else { nested })
    }

    /// The sort clauses of `keys` (then type, then id), each reversed for a backwards walk.
    /// Resources without a value sort last in the walk's own direction, first when reversed.
    pub fn sort(keys: &[SortKey], reversed: bool) -> Result<Vec<Value>, IndexError> {
        let order = |descending: bool| if descending != reversed { "desc" } else { "asc" };
        let mut clauses = Vec::with_capacity(keys.len() + 2);
        for key in keys {
            let kind = kind_field(key.kind)?;
            let value = match (key.kind, key.descending) {
                (ParamType::String, _) => "n",
                (ParamType::Token, _) => "c",
                (ParamType::Reference, _) => "u",
                (ParamType::Date, false) => "s",
                (ParamType::Date, true) => "e",
                (ParamType::Number | ParamType::Quantity | ParamType::Uri, _) => "v",
                (ParamType::Composite | ParamType::Special, _) => {
                    return Err(unsupported(format!("sorting by the {} parameter {}", key.kind.as_str(), key.param)));
                }
            };
            clauses.push(json!({
                format!("{kind}.{value}"): {
                    "order": order(key.descending),
                    "mode": if key.descending { "max" } else { "min" },
                    "missing": if reversed { "_first" } else { "_last" },
                    "nested": {"path": kind, "filter": term(&format!("{kind}.p"), key.param.as_str())},
                }
            }));
        }
        clauses.push(json!({"type": {"order": order(false)}}));
        clauses.push(json!({"id": {"order": order(false)}}));
        Ok(clauses)
    }
}

/// Documents with a `param` reference to one of `reached`.
fn references_to(param: &str, reached: &Keys) -> Value {
    let targets: Vec<Value> = reached
        .iter()
        .map(|(resource_type, ids)| all_of(vec![term("r.tt", resource_type.as_str()), json!({"terms": {"r.id": ids}})]))
        .collect();
    if targets.is_empty() {
        return match_none();
    }
    json!({"nested": {"path": "r", "query": all_of(vec![term("r.p", param), any_of(targets)])}})
}

/// Every component of `value` matches the same composite entry (`k`), which has exactly as many
/// components.
fn composite(modifier: &Option<Modifier>, value: &SearchValue, now: OffsetDateTime) -> Result<Value, IndexError> {
    let SearchValue::Composite(components) = value else {
        return Err(unsupported(format!("a composite parameter with the value {value:?}")));
    };
    if modifier.is_some() {
        return Err(unsupported("modifiers on composite parameters"));
    }
    if components.len() > MAX_COMPONENTS {
        return Err(unsupported(format!("composite parameters of more than {MAX_COMPONENTS} components")));
    }
    let mut clauses = vec![term("k.m", components.len())];
    for (index, component) in components.iter().enumerate() {
        let kind = component_kind(component)?;
        let field = format!("k.c{index}.{}", kind_field(kind)?);
        // Entries have `kind` fields only for the component's own kind: an entry whose component
        // is of another kind has none, and fails every clause but a bare "exists".
        clauses.push(value_query(&field, kind, &None, component, now)?);
    }
    Ok(all_of(clauses))
}

/// The condition one stored value (fields under `f`) of `kind` must meet to match `value`.
fn value_query(
    f: &str,
    kind: ParamType,
    modifier: &Option<Modifier>,
    value: &SearchValue,
    now: OffsetDateTime,
) -> Result<Value, IndexError> {
    let field = |name: &str| format!("{f}.{name}");
    Ok(match (kind, modifier, value) {
        (ParamType::String, None, SearchValue::String(s)) => starts_with(&field("n"), &normalize_string(s)),
        (ParamType::String, Some(Modifier::Contains), SearchValue::String(s)) => {
            let needle = normalize_string(s);
            if needle.is_empty() {
                exists(&field("n"))
            } else {
                json!({"wildcard": {field("n"): {"value": format!("*{}*", escape_wildcard(&needle))}}})
            }
        }
        (ParamType::String, Some(Modifier::Exact), SearchValue::String(s)) => term(&field("e"), s.as_str()),
        (ParamType::Token, None, SearchValue::Token { system, code }) => {
            token(&field("s"), &field("c"), system, code.as_deref())
        }
        (ParamType::Token, Some(Modifier::Text), SearchValue::String(s)) => all_of(vec![
            starts_with(&field("xn"), &normalize_string(s)),
            // The extra `of-type:` entries of identifiers are not display text.
            not(json!({"prefix": {field("x"): OF_TYPE_TEXT}})),
        ]),
        (ParamType::Token, Some(Modifier::OfType), SearchValue::OfType { type_system, type_code, value }) => {
            term(&field("x"), format!("{OF_TYPE_TEXT}{type_system}|{type_code}|{value}"))
        }
        // `:Type` is folded into `target_type` by the parser (an absolute url keeps its own).
        (ParamType::Reference, None | Some(Modifier::Type(_)), SearchValue::Reference { target_type, id, url }) => {
            let by_id = |id: &str| {
                let mut clauses = vec![term(&field("id"), id)];
                if let Some(target_type) = target_type {
                    clauses.push(term(&field("tt"), target_type.as_str()));
                }
                all_of(clauses)
            };
            match (url, id) {
                (Some(url), Some(id)) => any_of(vec![term(&field("u"), url.as_str()), by_id(id)]),
                (Some(url), None) => term(&field("u"), url.as_str()),
                (None, Some(id)) => by_id(id),
                (None, None) => match_none(),
            }
        }
        (ParamType::Reference, Some(Modifier::Identifier), SearchValue::Token { system, code }) => {
            all_of(vec![exists(&field("iv")), token(&field("is"), &field("iv"), system, code.as_deref())])
        }
        (ParamType::Date, None, SearchValue::Date { prefix, start, end }) => {
            let (start_f, end_f) = (field("s"), field("e"));
            let (s_floor, s_ceil) = (micros(*start, false), micros(*start, true));
            let (e_floor, e_ceil) = (micros(*end, false), micros(*end, true));
            let eq = || all_of(vec![range(&start_f, "gte", s_ceil), range(&end_f, "lte", e_floor)]);
            match prefix {
                Prefix::Eq => eq(),
                Prefix::Ne => not(eq()),
                Prefix::Gt => range(&end_f, "gt", e_floor),
                Prefix::Lt => range(&start_f, "lt", s_ceil),
                Prefix::Ge => any_of(vec![range(&end_f, "gt", e_floor), eq()]),
                Prefix::Le => any_of(vec![range(&start_f, "lt", s_ceil), eq()]),
                Prefix::Sa => range(&start_f, "gte", e_ceil),
                Prefix::Eb => range(&end_f, "lte", s_floor),
                Prefix::Ap => {
                    let (low, high) = approximate_window(*start, *end, now);
                    all_of(vec![range(&start_f, "lt", micros(high, true)), range(&end_f, "gt", micros(low, false))])
                }
            }
        }
        (ParamType::Number, None, SearchValue::Number { prefix, value, low, high }) => {
            number((&field("lo"), &field("hi")), *prefix, *value, *low, *high)
        }
        (ParamType::Quantity, None, SearchValue::Quantity { prefix, value, low, high, system, code, canonical }) => {
            let stored = field("v");
            let mut plain = vec![number((&stored, &stored), *prefix, *value, *low, *high)];
            match (system, code) {
                (Some(system), Some(code)) => {
                    plain.push(term(&field("s"), system.as_str()));
                    plain.push(term(&field("c"), code.as_str()));
                }
                (None, Some(code)) => {
                    plain.push(any_of(vec![term(&field("c"), code.as_str()), term(&field("un"), code.as_str())]));
                }
                (Some(system), None) => plain.push(term(&field("s"), system.as_str())),
                (None, None) => {}
            }
            match canonical {
                Some((canonical_value, canonical_code)) => {
                    // The precision range scales with the value (by the unit's factor for 0).
                    let factor = if *value != 0.0 {
                        canonical_value / value
                    } else {
                        code.as_deref().and_then(|c| ucum_canonical(1.0, c)).map_or(1.0, |(factor, _)| factor)
                    };
                    let stored = field("cv");
                    let by_canonical = all_of(vec![
                        number((&stored, &stored), *prefix, *canonical_value, low * factor, high * factor),
                        term(&field("cc"), canonical_code.as_str()),
                    ]);
                    any_of(vec![by_canonical, all_of(vec![not(exists(&field("cc"))), all_of(plain)])])
                }
                None => all_of(plain),
            }
        }
        (ParamType::Uri, None, SearchValue::Uri(uri)) => term(&field("v"), uri.as_str()),
        (ParamType::Uri, Some(Modifier::Below), SearchValue::Uri(uri)) => starts_with(&field("v"), uri),
        (ParamType::Uri, Some(Modifier::Above), SearchValue::Uri(uri)) => {
            // The stored uri is a prefix of the search uri: one of its prefixes, the empty one too.
            let prefixes: Vec<&str> =
                uri.char_indices().map(|(at, _)| &uri[..at]).chain(std::iter::once(uri.as_str())).collect();
            json!({"terms": {field("v"): prefixes}})
        }
        (kind, modifier, value) => {
            return Err(unsupported(format!("a {} value {value:?} with modifier {modifier:?}", kind.as_str())));
        }
    })
}

/// Token system/code matching (codes case-sensitive).
fn token(system_field: &str, code_field: &str, system: &TokenSystem, code: Option<&str>) -> Value {
    let mut clauses = Vec::new();
    if let Some(code) = code {
        clauses.push(term(code_field, code));
    }
    match system {
        TokenSystem::Any => {}
        TokenSystem::None => clauses.push(not(exists(system_field))),
        TokenSystem::Is(system) => clauses.push(term(system_field, system.as_str())),
    }
    if clauses.is_empty() { match_all() } else { all_of(clauses) }
}

/// A stored interval `[t_low, t_high]` (the same field for a point) against a search `prefix` +
/// `value` with implicit-precision range `[low, high)` — `evaluate::number_matches`.
fn number((t_low, t_high): (&str, &str), prefix: Prefix, value: f64, low: f64, high: f64) -> Value {
    let eq = || all_of(vec![range(t_low, "gte", low), range(t_high, "lt", high)]);
    match prefix {
        Prefix::Eq => eq(),
        Prefix::Ne => not(eq()),
        Prefix::Gt => range(t_high, "gt", value),
        Prefix::Lt => range(t_low, "lt", value),
        Prefix::Ge => any_of(vec![range(t_high, "gt", value), eq()]),
        Prefix::Le => any_of(vec![range(t_low, "lt", value), eq()]),
        Prefix::Sa => range(t_low, "gte", high),
        Prefix::Eb => range(t_high, "lt", low),
        Prefix::Ap => {
            let tolerance = 0.1 * value.abs();
            all_of(vec![range(t_low, "lte", value + tolerance), range(t_high, "gte", value - tolerance)])
        }
    }
}

/// Escapes the wildcard syntax (`*`, `?`, `\`) in a literal.
fn escape_wildcard(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn search_bounds_round_to_stored_microseconds() {
        let at = datetime!(2024-01-01 0:00:00.000_000_5 UTC);
        assert_eq!(micros(at, true) - micros(at, false), 1);
        let whole = datetime!(2024-01-01 0:00 UTC);
        assert_eq!(micros(whole, true), micros(whole, false));
        let before_epoch = datetime!(1969-12-31 23:59:59.999_999_5 UTC);
        assert_eq!(micros(before_epoch, false), -1);
        assert_eq!(micros(before_epoch, true), 0);
    }

    #[test]
    fn wildcard_literals_are_escaped() {
        assert_eq!(escape_wildcard(r"a*b?c\d"), r"a\*b\?c\\d");
    }

    #[test]
    fn uri_above_matches_every_prefix_of_the_search_uri() {
        let query = value_query(
            "u",
            ParamType::Uri,
            &Some(Modifier::Above),
            &SearchValue::Uri("ab".into()),
            OffsetDateTime::UNIX_EPOCH,
        )
        .expect("compiles");
        assert_eq!(query, json!({"terms": {"u.v": ["", "a", "ab"]}}));
    }

    #[test]
    fn sorting_by_a_composite_is_refused() {
        let key = SortKey { param: "combo".into(), kind: ParamType::Composite, descending: false };
        assert!(matches!(Compiler::sort(&[key], false), Err(IndexError::Unsupported(_))));
    }
}
