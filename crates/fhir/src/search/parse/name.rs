//! Search parameters (everything that is not a result parameter like `_count`): the name —
//! `code[:modifier]`, chains `a:Type.b.c`, reverse chains `_has:Type:ref:…` — resolved against the
//! registry for the searched types, and the value parsed by the parameter's type.

use crate::resource_type::ResourceType;
use crate::search::params::{ParamType, SearchParamDef, registry};
use crate::search::query::{ChainLink, Criterion, Has, Match, Modifier};

use super::value::{
    Parsed, clip, parse_composite, parse_date, parse_id, parse_number, parse_of_type, parse_quantity, parse_reference,
    parse_string, parse_token, parse_uri, split_unescaped,
};

/// Why a parameter was not applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Problem {
    /// Malformed: an error in both modes.
    Invalid(String),
    /// Not a known parameter of the searched type(s): ignored (lenient) or an error (strict).
    Unknown(String),
    /// Known but not implemented: ignored (lenient) or an error (strict).
    Unsupported(String),
}

/// Standard parameters this server knows but does not implement.
pub(crate) const UNSUPPORTED_PARAMS: [&str; 7] =
    ["_text", "_content", "_query", "_filter", "_list", "_contained", "_containedType"];

const HAS_SYNTAX: &str = "expected '_has:Type:referenceParameter:parameter' (not chained)";

/// A parsed search parameter: the criterion and its canonical `name=value`.
pub(crate) struct ParsedParam {
    pub criterion: Criterion,
    pub name: String,
    pub value: String,
}

/// A parameter code resolved on a set of resource types: present on all of them with one type.
pub(crate) struct Resolved {
    pub kind: ParamType,
    pub defs: Vec<&'static SearchParamDef>,
}

impl Resolved {
    /// Union of the reference targets of every definition, sorted.
    fn targets(&self) -> Vec<ResourceType> {
        let mut out: Vec<ResourceType> = self.defs.iter().flat_map(|d| d.target_types()).collect();
        out.sort();
        out.dedup();
        out
    }
}

/// Looks `code` up on every type of `types`. `Err` names the types lacking it, or the conflict.
pub(crate) fn resolve(types: &[ResourceType], code: &str) -> Result<Resolved, String> {
    let mut defs = Vec::with_capacity(types.len());
    let mut lacking = Vec::new();
    for t in types {
        match registry().get(*t, code) {
            Some(def) => defs.push(def),
            None => lacking.push(*t),
        }
    }
    let Some(first) = defs.first() else {
        return Err(match types {
            [single] => format!("unknown search parameter '{}' for {single}", clip(code)),
            _ => format!("unknown search parameter '{}' for the searched types", clip(code)),
        });
    };
    if !lacking.is_empty() {
        let names: Vec<&str> = lacking.iter().take(5).map(ResourceType::as_str).collect();
        let more = if lacking.len() > 5 { format!(" and {} more", lacking.len() - 5) } else { String::new() };
        return Err(format!("search parameter '{code}' is not defined for {}{more}", names.join(", ")));
    }
    let kind = first.kind;
    if defs.iter().any(|d| d.kind != kind) {
        return Err(format!("search parameter '{code}' has different types on the searched types"));
    }
    defs.dedup_by(|a, b| a.url == b.url);
    Ok(Resolved { kind, defs })
}

fn code_and_modifier(link: &str) -> (&str, Option<&str>) {
    match link.split_once(':') {
        Some((code, modifier)) => (code, Some(modifier)),
        None => (link, None),
    }
}

/// Parses one search parameter `name=value` on resources of `context` (the searched types).
pub(crate) fn parse_param(context: &[ResourceType], name: &str, value: &str) -> Result<ParsedParam, Problem> {
    if let Some(rest) = name.strip_prefix("_has:") {
        return parse_has(context, rest, value);
    }
    let links: Vec<&str> = name.split('.').collect();
    let mut types = context.to_vec();
    let mut chain = Vec::new();
    let mut canonical_name = String::new();
    for (index, link) in links.iter().enumerate() {
        let (code, modifier) = code_and_modifier(link);
        if code.is_empty() {
            return Err(Problem::Invalid("empty parameter name in chain".to_owned()));
        }
        if code == "_has" {
            return Err(Problem::Invalid(HAS_SYNTAX.to_owned()));
        }
        if UNSUPPORTED_PARAMS.contains(&code) {
            return Err(Problem::Unsupported(format!("parameter '{code}' is not supported")));
        }
        let resolved = resolve(&types, code).map_err(|reason| {
            if index == 0 { Problem::Unknown(reason) } else { Problem::Invalid(format!("chained {reason}")) }
        })?;
        if resolved.kind == ParamType::Special {
            return Err(Problem::Unsupported(format!("special parameter '{code}' is not supported")));
        }
        let Some(next) = links.get(index + 1) else {
            let parsed = parse_final(chain, code, modifier, &resolved, value)?;
            canonical_name.push_str(&parsed.name);
            return Ok(ParsedParam { name: canonical_name, ..parsed });
        };
        // An intermediate link: a reference parameter, optionally restricted to one target type.
        if resolved.kind != ParamType::Reference {
            return Err(Problem::Invalid(format!(
                "'{code}' is a {} parameter, only reference parameters can be chained",
                resolved.kind.as_str()
            )));
        }
        let all_targets = resolved.targets();
        let candidates = match modifier {
            None => all_targets,
            Some(type_name) => {
                let Some(target) = ResourceType::parse(type_name) else {
                    return Err(Problem::Invalid(format!(
                        "'{}' is not a resource type (only a target type may qualify a chained parameter)",
                        clip(type_name)
                    )));
                };
                if !all_targets.contains(&target) {
                    return Err(Problem::Invalid(format!("{target} is not a target type of '{code}'")));
                }
                vec![target]
            }
        };
        let (next_code, _) = code_and_modifier(next);
        let next_is_link = index + 2 < links.len();
        let targets: Vec<ResourceType> = candidates
            .into_iter()
            .filter(|t| {
                registry().get(*t, next_code).is_some_and(|def| !next_is_link || def.kind == ParamType::Reference)
            })
            .collect();
        if targets.is_empty() {
            let what = if next_is_link { "reference parameter" } else { "parameter" };
            return Err(Problem::Invalid(format!("no target type of '{code}' has a {what} '{}'", clip(next_code))));
        }
        canonical_name.push_str(link);
        canonical_name.push('.');
        chain.push(ChainLink { param: code.to_owned(), targets: targets.clone() });
        types = targets;
    }
    Err(Problem::Invalid("empty parameter name".to_owned()))
}

/// `_has:Type:refParam:rest` where `rest` is a parameter of `Type` (possibly another `_has`).
fn parse_has(context: &[ResourceType], rest: &str, value: &str) -> Result<ParsedParam, Problem> {
    let expected = HAS_SYNTAX;
    let mut parts = rest.splitn(3, ':');
    let (Some(type_name), Some(reference), Some(inner)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(Problem::Invalid(expected.to_owned()));
    };
    if type_name.is_empty() || reference.is_empty() || inner.is_empty() {
        return Err(Problem::Invalid(expected.to_owned()));
    }
    let resource_type = ResourceType::parse(type_name)
        .ok_or_else(|| Problem::Invalid(format!("_has: unknown resource type '{}'", clip(type_name))))?;
    let def = registry().get(resource_type, reference).filter(|d| d.kind == ParamType::Reference).ok_or_else(|| {
        Problem::Invalid(format!("_has: '{}' is not a reference parameter of {resource_type}", clip(reference)))
    })?;
    let targets = def.target_types();
    if !context.iter().any(|t| targets.contains(t)) {
        return Err(Problem::Invalid(format!(
            "_has: {resource_type}.{reference} cannot refer to the searched resource type"
        )));
    }
    let inner = parse_param(&[resource_type], inner, value).map_err(|problem| match problem {
        // Inside a reverse chain the type is explicit: an unknown parameter is a malformed query.
        Problem::Unknown(reason) => Problem::Invalid(format!("_has: {reason}")),
        other => other,
    })?;
    Ok(ParsedParam {
        criterion: Criterion::Has(Has {
            resource_type,
            reference_param: reference.to_owned(),
            criterion: Box::new(inner.criterion),
        }),
        name: format!("_has:{resource_type}:{reference}:{}", inner.name),
        value: inner.value,
    })
}

/// What a modifier means for a parameter.
enum Modified {
    Missing,
    Plain(Option<Modifier>),
}

fn parse_modifier(code: &str, resolved: &Resolved, modifier: Option<&str>) -> Result<Modified, Problem> {
    let Some(modifier) = modifier else {
        return Ok(Modified::Plain(None));
    };
    if modifier == "missing" {
        return Ok(Modified::Missing);
    }
    let unknown = || {
        Problem::Invalid(format!(
            "unknown modifier ':{}' for {} parameter '{code}'",
            clip(modifier),
            resolved.kind.as_str()
        ))
    };
    let unsupported = || Problem::Unsupported(format!("modifier ':{modifier}' is not supported"));
    let plain = |m| Ok(Modified::Plain(Some(m)));
    match (resolved.kind, modifier) {
        (ParamType::String, "exact") => plain(Modifier::Exact),
        (ParamType::String, "contains") => plain(Modifier::Contains),
        (ParamType::Token, "text") => plain(Modifier::Text),
        (ParamType::Token, "not") => plain(Modifier::Not),
        (ParamType::Token, "of-type") => {
            let on_identifier =
                resolved.defs.iter().all(|d| d.expression.as_deref().is_some_and(|e| e.contains("identifier")));
            if on_identifier {
                plain(Modifier::OfType)
            } else {
                Err(Problem::Invalid(format!("':of-type' applies to identifier parameters only, not '{code}'")))
            }
        }
        (ParamType::Token, "in" | "not-in" | "above" | "below") => Err(unsupported()),
        (ParamType::Uri, "above") => plain(Modifier::Above),
        (ParamType::Uri, "below") => plain(Modifier::Below),
        (ParamType::Reference, "identifier") => plain(Modifier::Identifier),
        (ParamType::Reference, "above" | "below") => Err(unsupported()),
        (ParamType::Reference, type_name) => {
            let target = ResourceType::parse(type_name).ok_or_else(unknown)?;
            if !resolved.targets().contains(&target) {
                return Err(Problem::Invalid(format!("{target} is not a target type of '{code}'")));
            }
            plain(Modifier::Type(target))
        }
        _ => Err(unknown()),
    }
}

/// The last parameter of a (possibly chained) name: modifier and values.
fn parse_final(
    chain: Vec<ChainLink>,
    code: &str,
    modifier: Option<&str>,
    resolved: &Resolved,
    value: &str,
) -> Result<ParsedParam, Problem> {
    let kind = resolved.kind;
    match parse_modifier(code, resolved, modifier)? {
        Modified::Missing => {
            let missing = match value {
                "true" => true,
                "false" => false,
                _ => return Err(Problem::Invalid(format!("':missing' takes true or false, not '{}'", clip(value)))),
            };
            Ok(ParsedParam {
                criterion: Criterion::Missing { chain, param: code.to_owned(), kind, missing },
                name: format!("{code}:missing"),
                value: value.to_owned(),
            })
        }
        Modified::Plain(modifier) => {
            let mut values = Vec::new();
            let mut canonical = Vec::new();
            for piece in split_unescaped(value, ',') {
                if piece.is_empty() {
                    return Err(Problem::Invalid("empty value in a comma-separated list".to_owned()));
                }
                let (value, text) = parse_one(code, resolved, modifier.as_ref(), piece).map_err(Problem::Invalid)?;
                values.push(value);
                canonical.push(text);
            }
            let name = match modifier {
                None => code.to_owned(),
                Some(_) => format!("{code}:{}", modifier_name(modifier.as_ref())),
            };
            Ok(ParsedParam {
                criterion: Criterion::Match(Match { chain, param: code.to_owned(), kind, modifier, values }),
                name,
                value: canonical.join(","),
            })
        }
    }
}

fn modifier_name(modifier: Option<&Modifier>) -> String {
    match modifier {
        None => String::new(),
        Some(Modifier::Exact) => "exact".to_owned(),
        Some(Modifier::Contains) => "contains".to_owned(),
        Some(Modifier::Text) => "text".to_owned(),
        Some(Modifier::Not) => "not".to_owned(),
        Some(Modifier::Above) => "above".to_owned(),
        Some(Modifier::Below) => "below".to_owned(),
        Some(Modifier::Identifier) => "identifier".to_owned(),
        Some(Modifier::Type(t)) => t.as_str().to_owned(),
        Some(Modifier::OfType) => "of-type".to_owned(),
    }
}

fn parse_one(code: &str, resolved: &Resolved, modifier: Option<&Modifier>, piece: &str) -> Result<Parsed, String> {
    match (resolved.kind, modifier) {
        (ParamType::Token, Some(Modifier::Text)) => Ok(parse_string(piece)),
        (ParamType::Token, Some(Modifier::OfType)) => parse_of_type(piece),
        (ParamType::Token, _) if code == "_id" => parse_id(piece),
        (ParamType::Token, _) => parse_token(piece),
        (ParamType::Reference, Some(Modifier::Identifier)) => parse_token(piece),
        (ParamType::Reference, Some(Modifier::Type(t))) => parse_reference(piece, Some(*t)),
        (ParamType::Reference, _) => parse_reference(piece, None),
        (ParamType::String, _) => Ok(parse_string(piece)),
        (ParamType::Date, _) => parse_date(piece),
        (ParamType::Number, _) => parse_number(piece),
        (ParamType::Quantity, _) => parse_quantity(piece),
        (ParamType::Uri, _) => Ok(parse_uri(piece)),
        (ParamType::Composite, _) => {
            let def = resolved.defs.first().ok_or_else(|| format!("no definition for '{code}'"))?;
            if resolved.defs.iter().any(|d| d.component != def.component) {
                return Err(format!("composite '{code}' differs between the searched types"));
            }
            parse_composite(def, piece)
        }
        (ParamType::Special, _) => Err(format!("special parameter '{code}' is not supported")),
    }
}
