//! Converts the elements an expression selects into [`IndexValue`]s, by parameter type and
//! element type (R4 search.html, and the matching rules in [`crate::search::query`]).

use serde_json::{Number, Value};

use super::compile::Item;
use crate::search::params::ParamType;
// One UCUM table for indexed and searched quantities, so canonical forms always compare.
use crate::search::parse::{UCUM_SYSTEM, ucum_canonical};
use crate::search::values::{DATE_MAX, DATE_MIN, IndexValue, normalize_string};
use crate::{LogicalId, ResourceType, datetime::parse_fhir_datetime};

/// The system of `Money.currency` codes.
pub const ISO_4217: &str = "urn:iso:std:iso:4217";

/// Options of one conversion.
#[derive(Clone, Copy)]
pub(crate) struct Target<'d> {
    pub kind: ParamType,
    /// `SearchParameter.target` (reference parameters): an inline resource (`Bundle.entry[0].resource`)
    /// is indexed only when its type is one of these.
    pub targets: &'d [String],
    /// Emit the extra `identifier:of-type` tokens (top-level token parameters, not composite parts).
    pub of_type_tokens: bool,
}

/// Appends the index values of `item` for a parameter of kind `target.kind` to `out`. Elements of a
/// type the parameter type cannot represent add nothing.
pub(crate) fn convert(item: Item<'_>, target: Target<'_>, out: &mut Vec<IndexValue>) {
    match target.kind {
        ParamType::String => string_values(item, out),
        ParamType::Token => token_values(item, target.of_type_tokens, out),
        ParamType::Reference => reference_values(item, target.targets, out),
        ParamType::Date => date_values(item, out),
        ParamType::Number => number_values(item, out),
        ParamType::Quantity => quantity_values(item, out),
        ParamType::Uri => {
            if let Some(text) = primitive_string(item) {
                out.push(IndexValue::Uri(text.to_owned()));
            }
        }
        // Composite values are built from their components by the caller; special parameters are
        // not extracted.
        ParamType::Composite | ParamType::Special => {}
    }
}

fn primitive_string<'a>(item: Item<'a>) -> Option<&'a str> {
    match item {
        Item::Node(Value::String(text), _) => Some(text),
        Item::String(text) => Some(text),
        _ => None,
    }
}

fn str_field<'a>(value: &'a Value, key: &str) -> Option<&'a str> {
    value.get(key).and_then(Value::as_str)
}

/// The strings of `value[key]`, whether one or an array.
fn str_fields<'a>(value: &'a Value, key: &str) -> impl Iterator<Item = &'a str> {
    let field = value.get(key);
    let many = field.and_then(Value::as_array).map(|a| a.as_slice()).unwrap_or_default();
    let one = field.filter(|v| v.is_string());
    one.into_iter().chain(many).filter_map(Value::as_str)
}

fn string_value(text: &str) -> IndexValue {
    IndexValue::String { normalized: normalize_string(text), exact: text.to_owned() }
}

fn string_values(item: Item<'_>, out: &mut Vec<IndexValue>) {
    match item {
        Item::Node(value, "HumanName") => {
            for key in ["family", "given", "prefix", "suffix", "text"] {
                out.extend(str_fields(value, key).map(string_value));
            }
        }
        Item::Node(value, "Address") => {
            for key in ["line", "city", "district", "state", "postalCode", "country", "text"] {
                out.extend(str_fields(value, key).map(string_value));
            }
        }
        other => {
            if let Some(text) = primitive_string(other) {
                out.push(string_value(text));
            }
        }
    }
}

fn token(system: Option<&str>, code: Option<&str>, text: Option<&str>) -> IndexValue {
    IndexValue::Token {
        system: system.map(str::to_owned),
        code: code.map(str::to_owned),
        text: text.map(str::to_owned),
    }
}

fn token_values(item: Item<'_>, of_type_tokens: bool, out: &mut Vec<IndexValue>) {
    match item {
        Item::Node(coding, "Coding") => coding_token(coding, None, out),
        Item::Node(concept, "CodeableConcept") => {
            let text = str_field(concept, "text");
            let codings = concept.get("coding").and_then(Value::as_array).map(|a| a.as_slice()).unwrap_or_default();
            let mut text_indexed = false;
            for coding in codings {
                coding_token(coding, text, out);
                text_indexed |= text.is_some() && str_field(coding, "display").is_none_or(|d| Some(d) == text);
            }
            // CodeableConcept.text must stay searchable with `:text` even when every coding has
            // its own display.
            if let Some(text) = text
                && !text_indexed
            {
                out.push(token(None, None, Some(text)));
            }
        }
        Item::Node(identifier, "Identifier") => {
            let system = str_field(identifier, "system");
            let value = str_field(identifier, "value");
            let type_text = identifier.get("type").and_then(|t| str_field(t, "text"));
            if system.is_some() || value.is_some() {
                out.push(token(system, value, type_text));
            }
            if of_type_tokens && let Some(value) = value {
                let codings = identifier.get("type").and_then(|t| t.get("coding")).and_then(Value::as_array);
                for coding in codings.map(|a| a.as_slice()).unwrap_or_default() {
                    let (Some(system), Some(code)) = (str_field(coding, "system"), str_field(coding, "code")) else {
                        continue;
                    };
                    out.push(token(None, None, Some(&format!("of-type:{system}|{code}|{value}"))));
                }
            }
        }
        // ContactPoint.system is a kind (`phone`, `email`), not a URI: the value alone is the code.
        Item::Node(contact, "ContactPoint") => {
            if let Some(value) = str_field(contact, "value") {
                out.push(token(None, Some(value), None));
            }
        }
        Item::Node(Value::Bool(value), _) => out.push(token(None, Some(if *value { "true" } else { "false" }), None)),
        Item::Boolean(value) => out.push(token(None, Some(if value { "true" } else { "false" }), None)),
        other => {
            if let Some(code) = primitive_string(other) {
                out.push(token(None, Some(code), None));
            }
        }
    }
}

fn coding_token(coding: &Value, fallback_text: Option<&str>, out: &mut Vec<IndexValue>) {
    let system = str_field(coding, "system");
    let code = str_field(coding, "code");
    let text = str_field(coding, "display").or(fallback_text);
    if system.is_some() || code.is_some() || text.is_some() {
        out.push(token(system, code, text));
    }
}

/// A parsed `Reference.reference`: the target type and id when it ends in `Type/id` (relative or
/// absolute, optionally followed by `/_history/version`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct ParsedReference {
    pub target_type: Option<ResourceType>,
    pub id: Option<String>,
    pub version: Option<String>,
}

/// Parses a reference string. `#contained`, `urn:uuid:…`/`urn:oid:…` and anything not ending in a
/// known type and a valid id yield no type/id (the caller keeps the text as the url).
pub(crate) fn parse_reference(text: &str) -> Option<ParsedReference> {
    if text.starts_with('#') || text.starts_with("urn:") || text.contains('?') {
        return None;
    }
    let path = text.split_once("://").map_or(text, |(_, rest)| rest.split_once('/').map_or("", |(_, path)| path));
    let mut segments: Vec<&str> = path.split('/').collect();
    let mut version = None;
    if segments.len() >= 4 && segments[segments.len() - 2] == "_history" {
        version = segments.pop().map(str::to_owned);
        segments.pop();
    }
    let [.., type_name, id] = segments.as_slice() else { return None };
    let target_type = ResourceType::parse(type_name)?;
    LogicalId::parse(id).ok()?;
    Some(ParsedReference { target_type: Some(target_type), id: Some((*id).to_owned()), version })
}

fn reference_values(item: Item<'_>, targets: &[String], out: &mut Vec<IndexValue>) {
    match item {
        Item::Node(reference, "Reference") => {
            let text = str_field(reference, "reference");
            let identifier = reference.get("identifier").and_then(|identifier| {
                let value = str_field(identifier, "value")?;
                Some((str_field(identifier, "system").map(str::to_owned), value.to_owned()))
            });
            if text.is_none() && identifier.is_none() {
                return;
            }
            let parsed = text.and_then(parse_reference).unwrap_or_default();
            let target_type = parsed.target_type.or_else(|| {
                // No resolvable reference (identifier-only, `#contained`): the declared type, if any.
                let declared = str_field(reference, "type")?;
                ResourceType::parse(
                    declared.strip_prefix("http://hl7.org/fhir/StructureDefinition/").unwrap_or(declared),
                )
            });
            out.push(IndexValue::Reference {
                target_type,
                id: parsed.id,
                url: text.unwrap_or_default().to_owned(),
                version: parsed.version,
                identifier,
            });
        }
        // An inline resource (`Bundle.entry[0].resource`): a reference to its type and id.
        Item::Node(resource, "ResourceList") => {
            let Some(target_type) = str_field(resource, "resourceType").and_then(ResourceType::parse) else { return };
            let allowed = targets.is_empty() || targets.iter().any(|t| t == "Resource" || t == target_type.as_str());
            let Some(id) = str_field(resource, "id") else { return };
            if allowed {
                out.push(IndexValue::Reference {
                    target_type: Some(target_type),
                    id: Some(id.to_owned()),
                    url: format!("{target_type}/{id}"),
                    version: None,
                    identifier: None,
                });
            }
        }
        // canonical / uri elements: the url as written.
        other => {
            if let Some(url) = primitive_string(other) {
                out.push(IndexValue::Reference {
                    target_type: None,
                    id: None,
                    url: url.to_owned(),
                    version: None,
                    identifier: None,
                });
            }
        }
    }
}

fn date_values(item: Item<'_>, out: &mut Vec<IndexValue>) {
    match item {
        Item::Node(period, "Period") => period_value(period, out),
        Item::Node(timing, "Timing") => {
            for event in str_fields(timing, "event") {
                date_value(event, out);
            }
            if let Some(bounds) = timing.get("repeat").and_then(|r| r.get("boundsPeriod")) {
                period_value(bounds, out);
            }
        }
        other => {
            if let Some(text) = primitive_string(other) {
                date_value(text, out);
            }
        }
    }
}

fn date_value(text: &str, out: &mut Vec<IndexValue>) {
    if let Ok(range) = parse_fhir_datetime(text) {
        out.push(IndexValue::Date { start: range.start, end: range.end });
    }
}

/// `[start.start, end.end)`; a missing end is open (`DATE_MIN` / `DATE_MAX`). A Period with neither
/// (or only unparseable bounds) adds nothing.
fn period_value(period: &Value, out: &mut Vec<IndexValue>) {
    let start = str_field(period, "start").and_then(|s| parse_fhir_datetime(s).ok());
    let end = str_field(period, "end").and_then(|s| parse_fhir_datetime(s).ok());
    if start.is_none() && end.is_none() {
        return;
    }
    out.push(IndexValue::Date { start: start.map_or(DATE_MIN, |r| r.start), end: end.map_or(DATE_MAX, |r| r.end) });
}

/// A JSON number with its implicit precision range `[value - ½ unit, value + ½ unit)`, the unit being
/// the last written digit's place (`100` → ±0.5, `100.0` → ±0.05, `1e2` → ±50).
///
/// Limit: without serde_json's `arbitrary_precision` the text is the number's shortest round-trip
/// form, so trailing zeros beyond the first decimal (`1.50`) and exponent forms of decimals
/// (`1.0e2`, read as `100.0`) are lost: the precision then is that of the shortest form. Integers
/// written without a point keep theirs.
pub fn number_range(number: &Number) -> Option<(f64, f64, f64)> {
    let value = number.as_f64()?;
    let text = number.to_string();
    let (mantissa, exponent) = match text.split_once(['e', 'E']) {
        Some((mantissa, exponent)) => (mantissa, exponent.parse::<i32>().ok()?),
        None => (text.as_str(), 0),
    };
    let fraction_digits = mantissa.split_once('.').map_or(0, |(_, f)| f.len());
    let half = 0.5 * 10f64.powi(exponent - i32::try_from(fraction_digits).ok()?);
    Some((value, value - half, value + half))
}

fn number_values(item: Item<'_>, out: &mut Vec<IndexValue>) {
    match item {
        // A stored decimal is taken as exact (its written precision is not kept): a point.
        Item::Node(Value::Number(number), _) => {
            if let Some(value) = number.as_f64() {
                out.push(IndexValue::Number { value, low: value, high: value });
            }
        }
        Item::Number(value) => out.push(IndexValue::Number { value, low: value, high: value }),
        Item::Node(range, "Range") => {
            let bound = |key: &str| range.get(key).and_then(|q| q.get("value")).and_then(Value::as_f64);
            if let Some((value, low, high)) = range_bounds(bound("low"), bound("high")) {
                out.push(IndexValue::Number { value, low, high });
            }
        }
        _ => {}
    }
}

/// A Range as one value: its midpoint (or its only bound) with `[low, high]` as the range; an open
/// side is `f64::MIN`/`f64::MAX` (not infinities, which JSON cannot carry).
fn range_bounds(low: Option<f64>, high: Option<f64>) -> Option<(f64, f64, f64)> {
    match (low, high) {
        (Some(low), Some(high)) => Some((low + (high - low) / 2.0, low, high)),
        (Some(low), None) => Some((low, low, f64::MAX)),
        (None, Some(high)) => Some((high, f64::MIN, high)),
        (None, None) => None,
    }
}

const QUANTITY_TYPES: [&str; 7] =
    ["Quantity", "Age", "Count", "Distance", "Duration", "SimpleQuantity", "MoneyQuantity"];

fn quantity_values(item: Item<'_>, out: &mut Vec<IndexValue>) {
    match item {
        Item::Node(quantity, ty) if QUANTITY_TYPES.contains(&ty) => {
            let Some((value, low, high)) = quantity.get("value").and_then(Value::as_number).and_then(number_range)
            else {
                return;
            };
            let system = str_field(quantity, "system");
            let code = str_field(quantity, "code");
            let canonical = match (system, code) {
                (Some(UCUM_SYSTEM), Some(code)) => ucum_canonical(value, code),
                _ => None,
            };
            out.push(IndexValue::Quantity {
                value,
                low,
                high,
                system: system.map(str::to_owned),
                code: code.map(str::to_owned),
                unit: str_field(quantity, "unit").map(str::to_owned),
                canonical,
            });
        }
        Item::Node(money, "Money") => {
            let Some((value, low, high)) = money.get("value").and_then(Value::as_number).and_then(number_range) else {
                return;
            };
            let currency = str_field(money, "currency");
            out.push(IndexValue::Quantity {
                value,
                low,
                high,
                system: currency.map(|_| ISO_4217.to_owned()),
                code: currency.map(str::to_owned),
                unit: None,
                canonical: None,
            });
        }
        Item::Node(range, "Range") => {
            let low = range.get("low");
            let high = range.get("high");
            let bound = |q: Option<&Value>| q.and_then(|q| q.get("value")).and_then(Value::as_f64);
            let Some((value, low_value, high_value)) = range_bounds(bound(low), bound(high)) else { return };
            let unit_source = low.filter(|q| q.get("value").is_some()).or(high).unwrap_or(&Value::Null);
            let system = str_field(unit_source, "system");
            let code = str_field(unit_source, "code");
            let canonical = match (system, code) {
                (Some(UCUM_SYSTEM), Some(code)) => ucum_canonical(value, code),
                _ => None,
            };
            out.push(IndexValue::Quantity {
                value,
                low: low_value,
                high: high_value,
                system: system.map(str::to_owned),
                code: code.map(str::to_owned),
                unit: str_field(unit_source, "unit").map(str::to_owned),
                canonical,
            });
        }
        Item::Node(Value::Number(number), _) => {
            if let Some((value, low, high)) = number_range(number) {
                out.push(IndexValue::Quantity {
                    value,
                    low,
                    high,
                    system: None,
                    code: None,
                    unit: None,
                    canonical: None,
                });
            }
        }
        // SampledData (in `value-quantity`) has no single value to index.
        _ => {}
    }
}
