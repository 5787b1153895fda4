//! Request parameters → [`SearchQuery`] (R4 search.html).
//!
//! Input is the already percent-decoded `(name, value)` pairs in request order. Every parameter is
//! either applied (a criterion or a result setting, echoed canonically in `applied`), ignored with a
//! reason (unknown or unsupported, lenient mode only), skipped silently (`_format`, `_pretty`: the
//! gateway's business) or an error. Malformed values are errors in both modes; a parameter with an
//! empty value is ignored in both (R4 search.html). `applied` values are FHIR-escaped (`\,` …) but
//! not percent-encoded; `_count` shows the effective (capped) page size.
//!
//! Supported: every parameter of the R4 registry of type string, token, reference, date, number,
//! quantity, uri and composite; OR (`,`), AND (repeats); escapes `\,` `\$` `\|` `\\`; prefixes
//! eq ne gt lt ge le sa eb ap; modifiers `:missing`, `:exact`, `:contains` (string), `:text`,
//! `:not`, `:of-type` (token), `:above`, `:below` (uri), `:identifier`, `:[Type]` (reference);
//! chains to any depth and `_has` nested to any depth; `_id`, `_lastUpdated`, `_tag`, `_security`,
//! `_profile`, `_source`; `_type` (system level), `_sort`, `_count`, `_total`, `_summary`,
//! `_elements`, `_include` / `_revinclude` (`:iterate`, `:recurse`, `*`).
//!
//! Not supported (ignored in lenient mode, an error in strict mode): `_text`, `_content`, `_query`,
//! `_filter`, `_list`, `_contained`, `_containedType`, special parameters (`near`), the token
//! modifiers `:in`, `:not-in`, `:above`, `:below` and the reference modifiers `:above`, `:below`.
//!
//! Compartment search (`/Patient/1/Observation`) adds one [`Criterion::AnyOf`]: a reference match
//! `param = Patient/1` for every parameter that links the member type into the compartment
//! (`compartment_params`). The compartment owner's own type (`/Patient/1/Patient`, or a `{def}`
//! entry like Encounter in the Encounter compartment) also matches on `_id = 1`. For `*` (every
//! member type) the AST cannot restrict a criterion to one type, so the alternatives are the union
//! of every member's parameters (a resource that refers to the owner through a parameter listed
//! only for another member type also matches), and the owner itself is not included (an `_id`
//! match would also match other types with that id).

mod name;
#[cfg(test)]
mod tests;
mod ucum;
mod value;

use crate::elements::SummaryMode;
use crate::id::LogicalId;
use crate::outcome::{Issue, IssueType};
use crate::resource_type::ResourceType;
use crate::search::compartments::{compartment_params, compartment_types};
use crate::search::params::{ParamType, registry};
use crate::search::query::{
    Criterion, Ignored, Include, Match, SearchQuery, SearchScope, SearchValue, SortKey, TokenSystem, TotalMode,
};

use name::{Problem, parse_param, resolve};
use value::clip;

pub use ucum::{UCUM_SYSTEM, ucum_canonical};

/// How to parse: `Prefer: handling=strict|lenient` and the page size bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseOptions {
    /// `Prefer: handling=strict`: unknown and unsupported parameters are errors instead of ignored.
    pub strict: bool,
    /// `_count` when the request has none.
    pub default_count: usize,
    /// The largest `_count` honoured; larger values are capped.
    pub max_count: usize,
}

impl Default for ParseOptions {
    fn default() -> Self {
        ParseOptions { strict: false, default_count: 20, max_count: 1000 }
    }
}

/// Why a search request cannot be run: one issue per offending parameter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid search: {}", describe(.issues))]
pub struct SearchError {
    pub issues: Vec<Issue>,
}

fn describe(issues: &[Issue]) -> String {
    issues.iter().map(|i| i.diagnostics.as_str()).collect::<Vec<_>>().join("; ")
}

/// Parses a search request (see the module documentation for what is supported).
pub fn parse_search(
    scope: &SearchScope,
    params: &[(String, String)],
    options: &ParseOptions,
) -> Result<SearchQuery, SearchError> {
    let mut parser = Parser::new(options);
    let system = matches!(scope, SearchScope::System);
    let types = match scope {
        SearchScope::Type(t) => vec![*t],
        SearchScope::System => parser.system_types(params),
        SearchScope::Compartment { compartment, id, member } => {
            match compartment_criterion(*compartment, id, *member) {
                Ok((types, criterion)) => {
                    parser.query.criteria.push(criterion);
                    types
                }
                Err(issue) => return Err(SearchError { issues: vec![issue] }),
            }
        }
    };
    parser.query.types = types;
    for (name, value) in params {
        parser.parameter(name, value, system);
    }
    if parser.issues.is_empty() { Ok(parser.query) } else { Err(SearchError { issues: parser.issues }) }
}

struct Parser<'a> {
    options: &'a ParseOptions,
    query: SearchQuery,
    issues: Vec<Issue>,
}

const SORTABLE: [ParamType; 7] = [
    ParamType::String,
    ParamType::Token,
    ParamType::Reference,
    ParamType::Date,
    ParamType::Number,
    ParamType::Quantity,
    ParamType::Uri,
];

impl<'a> Parser<'a> {
    fn new(options: &'a ParseOptions) -> Self {
        let query = SearchQuery::new(Vec::new(), Vec::new(), options.default_count.min(options.max_count));
        Parser { options, query, issues: Vec::new() }
    }

    fn invalid(&mut self, name: &str, reason: impl AsRef<str>) {
        let name = clip(name);
        let diagnostics = format!("invalid search parameter '{name}': {}", reason.as_ref());
        self.issues.push(Issue::error(IssueType::Invalid, diagnostics).at(name));
    }

    /// Records a parameter that is not applied: an error in strict mode, ignored otherwise.
    fn not_applied(&mut self, name: &str, reason: String) {
        if self.options.strict {
            let name = clip(name);
            let diagnostics = format!("search parameter '{name}' cannot be applied: {reason}");
            self.issues.push(Issue::error(IssueType::NotSupported, diagnostics).at(name));
        } else {
            self.query.ignored.push(Ignored { name: name.to_owned(), reason });
        }
    }

    fn problem(&mut self, name: &str, problem: Problem) {
        match problem {
            Problem::Invalid(reason) => self.invalid(name, reason),
            Problem::Unknown(reason) | Problem::Unsupported(reason) => self.not_applied(name, reason),
        }
    }

    fn apply(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.query.applied.push((name.into(), value.into()));
    }

    /// System level: every type, narrowed by each `_type` (repeats intersect).
    fn system_types(&mut self, params: &[(String, String)]) -> Vec<ResourceType> {
        let mut types = ResourceType::all().to_vec();
        for (name, value) in params {
            if name != "_type" || value.is_empty() {
                continue;
            }
            match parse_types(value) {
                Ok(listed) => types.retain(|t| listed.contains(t)),
                Err(reason) => self.invalid(name, reason),
            }
        }
        types
    }

    fn parameter(&mut self, name: &str, value: &str, system: bool) {
        if name == "_format" || name == "_pretty" {
            return;
        }
        if value.is_empty() {
            self.query.ignored.push(Ignored { name: name.to_owned(), reason: "empty value".to_owned() });
            return;
        }
        match name {
            "_type" if system => {
                if let Ok(types) = parse_types(value) {
                    let names: Vec<&str> = types.iter().map(ResourceType::as_str).collect();
                    self.apply(name, names.join(","));
                }
            }
            "_type" => self.not_applied(name, "_type applies to system-level search only".to_owned()),
            "_count" => self.count(value),
            "_sort" => self.sort(value),
            "_total" => match value {
                "none" => self.total(TotalMode::None, value),
                "estimate" => self.total(TotalMode::Estimate, value),
                "accurate" => self.total(TotalMode::Accurate, value),
                _ => self.invalid(name, format!("expected none, estimate or accurate, not '{}'", clip(value))),
            },
            "_summary" => match SummaryMode::parse(value) {
                Some(mode) => {
                    self.query.summary = Some(mode);
                    self.apply(name, mode.as_str());
                }
                None => self.invalid(name, format!("expected true, text, data, count or false, not '{}'", clip(value))),
            },
            "_elements" => self.elements(value),
            "_include" | "_include:iterate" | "_include:recurse" => self.include(name, value, false),
            "_revinclude" | "_revinclude:iterate" | "_revinclude:recurse" => self.include(name, value, true),
            _ if name.starts_with("_include:") || name.starts_with("_revinclude:") => {
                self.invalid(name, "the only modifiers are ':iterate' and ':recurse'");
            }
            _ => {
                let types = self.query.types.clone();
                match parse_param(&types, name, value) {
                    Ok(parsed) => {
                        self.query.criteria.push(parsed.criterion);
                        self.apply(parsed.name, parsed.value);
                    }
                    Err(problem) => self.problem(name, problem),
                }
            }
        }
    }

    fn count(&mut self, value: &str) {
        if !value.bytes().all(|b| b.is_ascii_digit()) {
            self.invalid("_count", format!("expected a non-negative integer, not '{}'", clip(value)));
            return;
        }
        // All digits: only overflow can fail, and anything that large is capped anyway.
        let count = value.parse::<usize>().unwrap_or(usize::MAX).min(self.options.max_count);
        self.query.count = count;
        self.apply("_count", count.to_string());
    }

    fn total(&mut self, mode: TotalMode, value: &str) {
        self.query.total = mode;
        self.apply("_total", value);
    }

    fn sort(&mut self, value: &str) {
        let mut kept = Vec::new();
        for item in value.split(',') {
            let (descending, code) = match item.strip_prefix('-') {
                Some(code) => (true, code),
                None => (false, item),
            };
            if code.is_empty() {
                self.invalid("_sort", "empty sort key");
                continue;
            }
            let types = self.query.types.clone();
            match resolve(&types, code) {
                Ok(resolved) if SORTABLE.contains(&resolved.kind) => {
                    self.query.sort.push(SortKey { param: code.to_owned(), kind: resolved.kind, descending });
                    kept.push(item);
                }
                Ok(resolved) => self.not_applied(
                    "_sort",
                    format!("cannot sort by the {} parameter '{}'", resolved.kind.as_str(), clip(code)),
                ),
                Err(reason) => self.not_applied("_sort", format!("cannot sort: {reason}")),
            }
        }
        if !kept.is_empty() {
            self.apply("_sort", kept.join(","));
        }
    }

    fn elements(&mut self, value: &str) {
        let mut elements = self.query.elements.take().unwrap_or_default();
        let mut valid = true;
        for element in value.split(',') {
            let well_formed = element.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
                && element.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
            if !well_formed {
                self.invalid("_elements", format!("invalid element name '{}'", clip(element)));
                valid = false;
            } else if !elements.iter().any(|e| e == element) {
                elements.push(element.to_owned());
            }
        }
        if valid {
            self.apply("_elements", value);
        }
        self.query.elements = Some(elements);
    }

    fn include(&mut self, name: &str, value: &str, reverse: bool) {
        let iterate = name.contains(':');
        let mut canonical = Vec::new();
        for item in value.split(',') {
            match parse_include(item, iterate) {
                Ok(include) => {
                    let mut text = format!("{}:{}", include.source_type, include.param.as_deref().unwrap_or("*"));
                    if let Some(target) = include.target_type {
                        text.push(':');
                        text.push_str(target.as_str());
                    }
                    canonical.push(text);
                    if reverse {
                        self.query.revincludes.push(include);
                    } else {
                        self.query.includes.push(include);
                    }
                }
                Err(reason) => self.invalid(name, reason),
            }
        }
        if !canonical.is_empty() {
            let base = if reverse { "_revinclude" } else { "_include" };
            let name = if iterate { format!("{base}:iterate") } else { base.to_owned() };
            self.apply(name, canonical.join(","));
        }
    }
}

fn parse_types(value: &str) -> Result<Vec<ResourceType>, String> {
    let mut types = Vec::new();
    for name in value.split(',') {
        let t = ResourceType::parse(name).ok_or_else(|| format!("unknown resource type '{}'", clip(name)))?;
        if !types.contains(&t) {
            types.push(t);
        }
    }
    Ok(types)
}

/// `Type:param`, `Type:param:Target` or `Type:*`.
fn parse_include(item: &str, iterate: bool) -> Result<Include, String> {
    let parts: Vec<&str> = item.split(':').collect();
    let (type_name, param, target) = match parts.as_slice() {
        [t, p] => (*t, *p, None),
        [t, p, target] => (*t, *p, Some(*target)),
        _ => return Err(format!("expected 'Type:parameter[:TargetType]' or 'Type:*', not '{}'", clip(item))),
    };
    let source_type =
        ResourceType::parse(type_name).ok_or_else(|| format!("unknown resource type '{}'", clip(type_name)))?;
    let (param, targets) = if param == "*" {
        (None, ResourceType::all().to_vec())
    } else {
        let def = registry()
            .get(source_type, param)
            .filter(|d| d.kind == ParamType::Reference)
            .ok_or_else(|| format!("'{}' is not a reference parameter of {source_type}", clip(param)))?;
        (Some(param.to_owned()), def.target_types())
    };
    let target_type = match target {
        None => None,
        Some(name) => {
            let t = ResourceType::parse(name).ok_or_else(|| format!("unknown resource type '{}'", clip(name)))?;
            if !targets.contains(&t) {
                return Err(format!("{t} is not a target type of {source_type}:{}", param.as_deref().unwrap_or("*")));
            }
            Some(t)
        }
    };
    Ok(Include { source_type, param, target_type, iterate })
}

/// The member types and the membership criterion of a compartment search (module docs).
fn compartment_criterion(
    compartment: ResourceType,
    id: &str,
    member: Option<ResourceType>,
) -> Result<(Vec<ResourceType>, Criterion), Issue> {
    let invalid = |reason: String| Issue::error(IssueType::Invalid, reason).at(compartment.as_str());
    if !compartment_types().contains(&compartment) {
        return Err(invalid(format!("{compartment} is not a compartment type")));
    }
    LogicalId::parse(id).map_err(|e| invalid(format!("invalid compartment id '{}': {e}", clip(id))))?;
    let linking = |t: ResourceType| -> Vec<&'static str> {
        compartment_params(compartment, t).iter().map(String::as_str).filter(|p| *p != "{def}").collect()
    };
    let types = match member {
        Some(t) if t == compartment || !compartment_params(compartment, t).is_empty() => vec![t],
        Some(t) => return Err(invalid(format!("{t} is not in the {compartment} compartment"))),
        None => ResourceType::all().iter().copied().filter(|t| !linking(*t).is_empty()).collect(),
    };
    let mut names: Vec<&str> = Vec::new();
    for t in &types {
        for name in linking(*t) {
            let is_reference = registry().get(*t, name).is_some_and(|d| d.kind == ParamType::Reference);
            if is_reference && !names.contains(&name) {
                names.push(name);
            }
        }
    }
    let reference = SearchValue::Reference { target_type: Some(compartment), id: Some(id.to_owned()), url: None };
    let mut alternatives: Vec<Criterion> = names
        .into_iter()
        .map(|name| {
            Criterion::Match(Match {
                chain: Vec::new(),
                param: name.to_owned(),
                kind: ParamType::Reference,
                modifier: None,
                values: vec![reference.clone()],
            })
        })
        .collect();
    if member == Some(compartment) {
        alternatives.push(Criterion::Match(Match {
            chain: Vec::new(),
            param: "_id".to_owned(),
            kind: ParamType::Token,
            modifier: None,
            values: vec![SearchValue::Token { system: TokenSystem::Any, code: Some(id.to_owned()) }],
        }));
    }
    Ok((types, Criterion::AnyOf(alternatives)))
}
