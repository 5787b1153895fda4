//! What the index stores for a resource: one [`IndexEntry`] per (parameter, value) extracted from
//! it. Backends store these as rows or documents; their matching semantics live in
//! [`super::query`].

use time::OffsetDateTime;

use crate::ResourceType;

/// A value extracted from a resource for one search parameter.
#[derive(Debug, Clone, PartialEq)]
pub enum IndexValue {
    /// `string` parameters (and the string parts of HumanName/Address). `normalized` is lowercased,
    /// with diacritics removed and whitespace collapsed ([`normalize_string`]): the default search
    /// matches it by prefix, `:contains` by substring. `exact` is the value as written (`:exact`).
    String { normalized: String, exact: String },
    /// `token` parameters: Coding, CodeableConcept (one per coding; `text` from
    /// CodeableConcept.text / Coding.display), Identifier (system + value, `text` from type.text),
    /// ContactPoint (value), code, boolean (`true`/`false`), id, string and uri.
    Token { system: Option<String>, code: Option<String>, text: Option<String> },
    /// `reference` parameters. `url` is the reference as written; for a local reference
    /// (`Patient/123`, `http(s)://<any>/Patient/123`, or `Patient/123/_history/2`)
    /// `target_type` and `id` are set. `identifier` is `Reference.identifier` (system, value).
    Reference {
        target_type: Option<ResourceType>,
        id: Option<String>,
        url: String,
        version: Option<String>,
        identifier: Option<(Option<String>, String)>,
    },
    /// `date` parameters: the instant range the value covers, `[start, end)`, following its
    /// precision (a date `2020-01` is the whole month; a Period spans start..end, open ends are
    /// unbounded: [`DATE_MIN`]/[`DATE_MAX`]).
    Date { start: OffsetDateTime, end: OffsetDateTime },
    /// `number` parameters: the value (the sort key) and the interval `[low, high]` it covers — a
    /// point for a decimal or integer (stored values are taken as exact), the bounds of a Range
    /// (its midpoint as the value; an open side is `f64::MIN`/`f64::MAX`).
    Number { value: f64, low: f64, high: f64 },
    /// `quantity` parameters: as `Number`, plus the unit. `canonical` is the value converted to a
    /// canonical UCUM unit (value, code) where the conversion is a simple scaling.
    Quantity {
        value: f64,
        low: f64,
        high: f64,
        system: Option<String>,
        code: Option<String>,
        unit: Option<String>,
        canonical: Option<(f64, String)>,
    },
    /// `uri` parameters (canonical, uri, url).
    Uri(String),
    /// `composite` parameters: one value per component, in component order, extracted from the
    /// same element (so `code-value-quantity` pairs a code with the value of the same Observation
    /// or component).
    Composite(Vec<IndexValue>),
}

/// Lower bound used for open-ended date ranges.
pub const DATE_MIN: OffsetDateTime = time::macros::datetime!(0001-01-01 0:00 UTC);
/// Upper bound used for open-ended date ranges.
pub const DATE_MAX: OffsetDateTime = time::macros::datetime!(9999-12-31 23:59:59.999 UTC);

/// One extracted (parameter code, value) pair.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexEntry {
    /// The SearchParameter code as used on the resource type, e.g. `name`, `_lastUpdated`.
    pub param: String,
    pub value: IndexValue,
}

/// Normalises a string for search: Unicode NFD with combining marks dropped (so `Müller` matches
/// `muller`), lowercase, whitespace runs collapsed to one space, trimmed. Indexed values and query
/// values both go through this.
pub fn normalize_string(input: &str) -> String {
    use unicode_normalization::UnicodeNormalization;
    use unicode_normalization::char::is_combining_mark;

    let mut out = String::with_capacity(input.len());
    let mut pending_space = false;
    for c in input.nfd().filter(|c| !is_combining_mark(*c)) {
        if c.is_whitespace() {
            pending_space = !out.is_empty();
            continue;
        }
        if pending_space {
            out.push(' ');
            pending_space = false;
        }
        out.extend(c.to_lowercase());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalization_folds_case_accents_and_space() {
        assert_eq!(normalize_string("  Müller-Lüdenscheidt \t Øre Ñu "), "muller-ludenscheidt øre nu");
        assert_eq!(normalize_string("ÉLODIE"), "elodie");
        assert_eq!(normalize_string("日本"), "日本");
        assert_eq!(normalize_string(""), "");
    }
}
