//! Parameter values: FHIR escaping (`\,` `\$` `\|` `\\`), comparison prefixes and the value syntax
//! of each parameter type. Each parser returns the [`SearchValue`] and its canonical re-encoding
//! (FHIR-escaped, not percent-encoded) for the `applied` list.

use crate::datetime::parse_fhir_datetime;
use crate::id::LogicalId;
use crate::resource_type::ResourceType;
use crate::search::params::{ParamType, SearchParamDef, registry};
use crate::search::query::{Prefix, SearchValue, TokenSystem};

use super::ucum::{UCUM_SYSTEM, ucum_canonical};

/// Splits on `separator` where it is not escaped by a backslash. A backslash escapes whatever
/// character follows it, so `a\,b` is one part and `a\\,b` is two (`a\\` and `b`).
pub(crate) fn split_unescaped(input: &str, separator: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut escaped = false;
    for (index, c) in input.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == separator {
            parts.push(&input[start..index]);
            start = index + c.len_utf8();
        }
    }
    parts.push(&input[start..]);
    parts
}

/// Removes the search escapes `\,` `\$` `\|` `\\`; any other backslash is kept as written.
pub(crate) fn unescape(input: &str) -> String {
    let mut out = String::with_capacity(input.len());
    let mut chars = input.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\'
            && let Some(&next) = chars.peek()
            && matches!(next, ',' | '$' | '|' | '\\')
        {
            out.push(next);
            chars.next();
            continue;
        }
        out.push(c);
    }
    out
}

/// The inverse of [`unescape`]: escapes `\` `,` `$` `|`.
pub(crate) fn escape(input: &str) -> String {
    let mut out = String::with_capacity(input.len());
    for c in input.chars() {
        if matches!(c, '\\' | ',' | '$' | '|') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

pub(crate) fn prefix_str(prefix: Prefix) -> &'static str {
    match prefix {
        Prefix::Eq => "eq",
        Prefix::Ne => "ne",
        Prefix::Gt => "gt",
        Prefix::Lt => "lt",
        Prefix::Ge => "ge",
        Prefix::Le => "le",
        Prefix::Sa => "sa",
        Prefix::Eb => "eb",
        Prefix::Ap => "ap",
    }
}

/// The canonical spelling of a prefix in front of a value (`eq` is the default and is omitted).
fn prefix_canonical(prefix: Prefix) -> &'static str {
    if prefix == Prefix::Eq { "" } else { prefix_str(prefix) }
}

fn parse_prefix_name(name: &str) -> Option<Prefix> {
    [Prefix::Eq, Prefix::Ne, Prefix::Gt, Prefix::Lt, Prefix::Ge, Prefix::Le, Prefix::Sa, Prefix::Eb, Prefix::Ap]
        .into_iter()
        .find(|p| prefix_str(*p) == name)
}

/// Splits a leading comparison prefix off a number, date or quantity value. Values of these types
/// never start with a letter, so a leading letter must begin a valid two-letter prefix.
pub(crate) fn split_prefix(piece: &str) -> Result<(Prefix, &str), String> {
    let mut chars = piece.chars();
    match (chars.next(), chars.next()) {
        (Some(a), Some(b)) if a.is_ascii_alphabetic() && b.is_ascii_alphabetic() => {
            let (name, rest) = piece.split_at(2);
            match parse_prefix_name(name) {
                Some(prefix) => Ok((prefix, rest)),
                None => Err(format!("unknown prefix '{}' (expected eq, ne, gt, lt, ge, le, sa, eb or ap)", clip(name))),
            }
        }
        (Some(a), _) if a.is_alphabetic() => Err(format!("invalid prefix in '{}'", clip(piece))),
        _ => Ok((Prefix::Eq, piece)),
    }
}

/// A decimal as written (`100`, `-1.50`, `1e2`, `2.5E-3`) with its implicit-precision range
/// `[low, high)`: half a unit of the last significant digit either side (`100` → [99.5, 100.5),
/// `1e2` → [50, 150)).
pub(crate) fn parse_decimal(text: &str) -> Result<(f64, f64, f64), String> {
    let fail = || format!("invalid number '{}'", clip(text));
    let bytes = text.as_bytes();
    let mut pos = 0;
    if matches!(bytes.first(), Some(b'-' | b'+')) {
        pos += 1;
    }
    let int_start = pos;
    while bytes.get(pos).is_some_and(u8::is_ascii_digit) {
        pos += 1;
    }
    if pos == int_start {
        return Err(fail());
    }
    let mut fraction_digits: i32 = 0;
    if bytes.get(pos) == Some(&b'.') {
        pos += 1;
        let fraction_start = pos;
        while bytes.get(pos).is_some_and(u8::is_ascii_digit) {
            pos += 1;
        }
        if pos == fraction_start {
            return Err(fail());
        }
        fraction_digits = i32::try_from(pos - fraction_start).map_err(|_| fail())?;
    }
    let mut exponent: i32 = 0;
    if matches!(bytes.get(pos), Some(b'e' | b'E')) {
        pos += 1;
        let exponent_text = text.get(pos..).ok_or_else(fail)?;
        let digits = exponent_text.strip_prefix(['+', '-']).unwrap_or(exponent_text);
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || digits.len() > 4 {
            return Err(fail());
        }
        exponent = exponent_text.parse().map_err(|_| fail())?;
        pos = bytes.len();
    }
    if pos != bytes.len() {
        return Err(fail());
    }
    let value: f64 = text.parse().map_err(|_| fail())?;
    let half = 0.5 * 10f64.powi(exponent.saturating_sub(fraction_digits));
    let (low, high) = (value - half, value + half);
    if !value.is_finite() || !low.is_finite() || !high.is_finite() {
        return Err(format!("number out of range '{}'", clip(text)));
    }
    Ok((value, low, high))
}

/// A parsed value and its canonical text.
pub(crate) type Parsed = (SearchValue, String);

pub(crate) fn parse_string(piece: &str) -> Parsed {
    let value = unescape(piece);
    let canonical = escape(&value);
    (SearchValue::String(value), canonical)
}

/// `code`, `|code`, `system|code` or `system|`.
pub(crate) fn parse_token(piece: &str) -> Result<Parsed, String> {
    let parts = split_unescaped(piece, '|');
    let (system, code) = match parts.as_slice() {
        [code] => (TokenSystem::Any, Some(unescape(code))),
        [system, code] => {
            let system = unescape(system);
            let code = unescape(code);
            match (system.is_empty(), code.is_empty()) {
                (true, true) => return Err("a token needs a system or a code".to_owned()),
                (true, false) => (TokenSystem::None, Some(code)),
                (false, true) => (TokenSystem::Is(system), None),
                (false, false) => (TokenSystem::Is(system), Some(code)),
            }
        }
        _ => return Err(format!("too many '|' in token '{}' (escape a literal '|' as '\\|')", clip(piece))),
    };
    let canonical = token_canonical(&system, code.as_deref());
    Ok((SearchValue::Token { system, code }, canonical))
}

fn token_canonical(system: &TokenSystem, code: Option<&str>) -> String {
    let code = code.map(escape).unwrap_or_default();
    match system {
        TokenSystem::Any => code,
        TokenSystem::None => format!("|{code}"),
        TokenSystem::Is(system) => format!("{}|{code}", escape(system)),
    }
}

/// `_id` values: plain logical ids (no system).
pub(crate) fn parse_id(piece: &str) -> Result<Parsed, String> {
    let value = unescape(piece);
    LogicalId::parse(&value).map_err(|e| format!("invalid id '{}': {e}", clip(&value)))?;
    let canonical = escape(&value);
    Ok((SearchValue::Token { system: TokenSystem::Any, code: Some(value) }, canonical))
}

/// `:of-type`: `typeSystem|typeCode|value`, all three present.
pub(crate) fn parse_of_type(piece: &str) -> Result<Parsed, String> {
    let parts = split_unescaped(piece, '|');
    match parts.as_slice() {
        [system, code, value] if !system.is_empty() && !code.is_empty() && !value.is_empty() => {
            let (type_system, type_code, value) = (unescape(system), unescape(code), unescape(value));
            let canonical = format!("{}|{}|{}", escape(&type_system), escape(&type_code), escape(&value));
            Ok((SearchValue::OfType { type_system, type_code, value }, canonical))
        }
        _ => Err(format!("expected 'system|code|value' for :of-type, got '{}'", clip(piece))),
    }
}

/// Prefix and date/time: `ge2024-01`, `2024-03-01T10:00:00Z`.
pub(crate) fn parse_date(piece: &str) -> Result<Parsed, String> {
    let (prefix, rest) = split_prefix(piece)?;
    let text = unescape(rest);
    let range = parse_fhir_datetime(&text).map_err(|e| e.to_string())?;
    let canonical = format!("{}{}", prefix_canonical(prefix), escape(&text));
    Ok((SearchValue::Date { prefix, start: range.start, end: range.end }, canonical))
}

/// Prefix and decimal: `gt5.4`, `1e2`.
pub(crate) fn parse_number(piece: &str) -> Result<Parsed, String> {
    let (prefix, rest) = split_prefix(piece)?;
    let text = unescape(rest);
    let (value, low, high) = parse_decimal(&text)?;
    let canonical = format!("{}{}", prefix_canonical(prefix), text);
    Ok((SearchValue::Number { prefix, value, low, high }, canonical))
}

/// `[prefix]number`, `[prefix]number|system|code` or `[prefix]number||code`. A UCUM unit that is a
/// pure scaling of a base unit also gets its canonical form.
pub(crate) fn parse_quantity(piece: &str) -> Result<Parsed, String> {
    let parts = split_unescaped(piece, '|');
    let (number, system, code) = match parts.as_slice() {
        [number] => (*number, None, None),
        [number, system, code] => {
            let system = Some(unescape(system)).filter(|s| !s.is_empty());
            let code = Some(unescape(code)).filter(|s| !s.is_empty());
            (*number, system, code)
        }
        _ => return Err(format!("expected 'number', 'number|system|code' or 'number||code', got '{}'", clip(piece))),
    };
    let (prefix, rest) = split_prefix(number)?;
    let text = unescape(rest);
    let (value, low, high) = parse_decimal(&text)?;
    let canonical_form = match (&system, &code) {
        (Some(system), Some(code)) if system == UCUM_SYSTEM => ucum_canonical(value, code),
        _ => None,
    };
    let mut canonical = format!("{}{}", prefix_canonical(prefix), text);
    if system.is_some() || code.is_some() {
        canonical.push('|');
        canonical.push_str(&system.as_deref().map(escape).unwrap_or_default());
        canonical.push('|');
        canonical.push_str(&code.as_deref().map(escape).unwrap_or_default());
    }
    Ok((SearchValue::Quantity { prefix, value, low, high, system, code, canonical: canonical_form }, canonical))
}

pub(crate) fn parse_uri(piece: &str) -> Parsed {
    let value = unescape(piece);
    let canonical = escape(&value);
    (SearchValue::Uri(value), canonical)
}

/// `Type/id`, `Type/id/_history/v`, `id`, or an absolute URL (`http(s)://…`, `urn:…`). `type_modifier`
/// (`subject:Patient=123`) supplies the type of a plain id and must agree with an explicit one.
/// The `/_history/v` part is dropped: [`SearchValue::Reference`] has no version.
pub(crate) fn parse_reference(piece: &str, type_modifier: Option<ResourceType>) -> Result<Parsed, String> {
    let value = unescape(piece);
    let canonical = escape(&value);
    let (target_type, id, url) = if is_absolute(&value) {
        let (target_type, id) = local_suffix(&value).map_or((None, None), |(t, id)| (Some(t), Some(id)));
        (target_type, id, Some(value.clone()))
    } else if value.contains('/') {
        let segments: Vec<&str> = value.split('/').collect();
        let (type_name, id) = match segments.as_slice() {
            [type_name, id] | [type_name, id, "_history", _] => (*type_name, *id),
            _ => return Err(format!("invalid reference '{}' (expected Type/id, id or an absolute url)", clip(&value))),
        };
        if segments.len() == 4 && segments.last().is_some_and(|v| v.is_empty()) {
            return Err(format!("invalid reference '{}': empty version", clip(&value)));
        }
        let target_type = ResourceType::parse(type_name).ok_or_else(|| {
            format!("invalid reference '{}': unknown resource type '{}'", clip(&value), clip(type_name))
        })?;
        LogicalId::parse(id).map_err(|e| format!("invalid reference '{}': {e}", clip(&value)))?;
        (Some(target_type), Some(id.to_owned()), None)
    } else {
        LogicalId::parse(&value).map_err(|e| format!("invalid reference '{}': {e}", clip(&value)))?;
        (None, Some(value.clone()), None)
    };
    let target_type = match (type_modifier, target_type) {
        (Some(wanted), Some(given)) if wanted != given => {
            return Err(format!("reference '{}' is not a {wanted}", clip(&value)));
        }
        (Some(wanted), _) if url.is_none() => Some(wanted),
        (_, given) => given,
    };
    Ok((SearchValue::Reference { target_type, id, url }, canonical))
}

fn is_absolute(value: &str) -> bool {
    value.contains("://") || value.starts_with("urn:")
}

/// `Type/id` at the end of an absolute URL (optionally followed by `/_history/v`), read the way
/// extraction reads stored references.
fn local_suffix(url: &str) -> Option<(ResourceType, String)> {
    if url.starts_with("urn:") || url.contains('?') {
        return None;
    }
    let (_, path) = url.split_once("://")?.1.split_once('/')?;
    let mut segments: Vec<&str> = path.split('/').collect();
    if segments.len() >= 4 && segments.get(segments.len() - 2) == Some(&"_history") {
        segments.truncate(segments.len() - 2);
    }
    let id = segments.pop()?;
    let target_type = ResourceType::parse(segments.pop()?)?;
    LogicalId::parse(id).ok()?;
    Some((target_type, id.to_owned()))
}

/// One component of a composite value, parsed by the component's own parameter type.
pub(crate) fn parse_component(def: &SearchParamDef, piece: &str) -> Result<Parsed, String> {
    match def.kind {
        ParamType::String => Ok(parse_string(piece)),
        ParamType::Token => parse_token(piece),
        ParamType::Reference => parse_reference(piece, None),
        ParamType::Date => parse_date(piece),
        ParamType::Number => parse_number(piece),
        ParamType::Quantity => parse_quantity(piece),
        ParamType::Uri => Ok(parse_uri(piece)),
        ParamType::Composite | ParamType::Special => {
            Err(format!("component '{}' of type {} is not supported", def.code, def.kind.as_str()))
        }
    }
}

/// `v1$v2…`, one value per component of `def`.
pub(crate) fn parse_composite(def: &SearchParamDef, piece: &str) -> Result<Parsed, String> {
    let parts = split_unescaped(piece, '$');
    if parts.len() != def.component.len() {
        return Err(format!(
            "composite value '{}' has {} part(s), expected {} separated by '$'",
            clip(piece),
            parts.len(),
            def.component.len()
        ));
    }
    let mut values = Vec::with_capacity(parts.len());
    let mut canonical = Vec::with_capacity(parts.len());
    for (component, part) in def.component.iter().zip(parts) {
        let component_def = registry()
            .by_url(&component.definition)
            .ok_or_else(|| format!("unknown component definition '{}'", component.definition))?;
        if part.is_empty() {
            return Err(format!("empty component '{}' in composite value", component_def.code));
        }
        let (value, text) = parse_component(component_def, part)?;
        values.push(value);
        canonical.push(text);
    }
    Ok((SearchValue::Composite(values), canonical.join("$")))
}

pub(crate) use crate::outcome::clip;
