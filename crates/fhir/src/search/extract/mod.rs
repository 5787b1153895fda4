//! Search-parameter value extraction: the index values a resource has for every search parameter
//! of its type.
//!
//! Each parameter's FHIRPath `expression` is compiled ONCE per resource type ([`warm_up`], or on
//! first use) into a small typed plan (`compile.rs`, parsed by the crate-wide `fhirpath.rs`): the
//! FHIRPath subset the base R4 definitions use — path navigation, `|`, `where(...)`,
//! `resolve() is Type`, `as`/`ofType`/`is` (operator and function forms), `exists()`, `empty()`,
//! `not()`, `first()`, `[n]`, `extension('url')`, `=`, `!=`, `and`, `or`, string/boolean/number
//! literals and `%resource`. Types come from the embedded R4
//! schema, so choice elements (`Observation.value.as(Quantity)` → `valueQuantity`,
//! `Observation.effective` → every `effective[x]`) and the `Type.` prefixes of multi-type
//! expressions (`AllergyIntolerance.code | Condition.code` on a Condition is `Condition.code`) are
//! resolved at compile time. Expressions outside the subset are reported by
//! [`unsupported_expressions`], never silently dropped.
//!
//! `resolve() is Type` is decided from the reference itself, without resolving it: the type of
//! `Type/id` (relative or absolute), of the `contained` resource a `#id` names, or else
//! `Reference.type`.
//!
//! The selected elements are converted by parameter type (`convert.rs`):
//! - string: string-like primitives; HumanName → family, given, prefix, suffix, text (one value
//!   each); Address → line, city, district, state, postalCode, country, text.
//! - token: Coding (system, code, display); CodeableConcept → one per coding (text = display, else
//!   CodeableConcept.text) plus a text-only one when CodeableConcept.text is not already some
//!   coding's text; Identifier (system, value, type.text) plus, for `identifier:of-type`, a token
//!   with only `text` = `of-type:<type system>|<type code>|<value>` per type coding; ContactPoint →
//!   code = value (no system); code/string/id/uri → code; boolean → `true`/`false`.
//! - reference: `Type/id`, `Type/id/_history/v`, absolute URLs ending so (type + id + version);
//!   `#contained`, `urn:uuid:`/`urn:oid:` and other URLs → url only; `Reference.identifier`; a
//!   Reference with only an identifier has url `""`; canonical/uri elements → url only; an inline
//!   resource (`Bundle.entry[0].resource`) → `Type/id` when its type is a target of the parameter.
//! - date: date/dateTime/instant by precision; Period `[start, end)` with open ends at
//!   `DATE_MIN`/`DATE_MAX`; Timing → each `event` and `repeat.boundsPeriod`.
//! - number: decimals/integers with their implicit precision ([`number_range`]); Range → midpoint,
//!   `[low, high]`.
//! - quantity: Quantity and its profiles (value, system, code, unit, and for UCUM quantities the
//!   canonical form from [`crate::search::parse::ucum_canonical`], the same table search values
//!   use); Money (currency as code, system `urn:iso:std:iso:4217`); Range as for numbers, units
//!   from its low (else high) bound. SampledData adds nothing.
//! - uri: the string.
//! - composite: for each element the composite expression selects, the cartesian product of the
//!   components' values (each component expression evaluated on that element, converted by its
//!   own definition's type); an element missing a component adds nothing.
//!
//! Identical values of one parameter are kept once.
//!
//! `tests/fhirpath-oracle` checks every supported expression against the `octofhir-fhirpath`
//! engine over all spec examples.

mod compile;
pub(crate) mod convert;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::LazyLock;

use serde_json::Value;

use self::compile::{Context, Item, Plan, Ty};
use self::convert::Target;
pub use self::convert::{ISO_4217, number_range};
use crate::ResourceType;
use crate::fhirpath;
use crate::search::params::{ParamType, SearchParamDef, registry};
use crate::search::values::{IndexEntry, IndexValue};

/// One parameter compiled for one resource type, borrowing from its definition.
struct CompiledParam<'d> {
    code: &'d str,
    url: &'d str,
    kind: ParamType,
    targets: &'d [String],
    body: Body,
}

enum Body {
    Simple(Plan),
    Composite { plan: Plan, components: Vec<(ParamType, Plan)> },
}

struct Compiled {
    by_type: HashMap<ResourceType, Vec<CompiledParam<'static>>>,
    unsupported: Vec<(&'static str, String)>,
}

static COMPILED: LazyLock<Compiled> = LazyLock::new(compile_registry);

fn compile_registry() -> Compiled {
    let mut by_type = HashMap::new();
    let mut unsupported: Vec<(&'static str, String)> = Vec::new();
    for resource_type in ResourceType::all() {
        let mut params = Vec::new();
        for def in registry().for_type(*resource_type) {
            match compile_param(def, *resource_type) {
                Ok(Some(param)) => params.push(param),
                Ok(None) => {}
                Err(reason) => {
                    if !unsupported.iter().any(|(url, _)| *url == def.url) {
                        unsupported.push((def.url.as_str(), reason));
                    }
                }
            }
        }
        by_type.insert(*resource_type, params);
    }
    unsupported.sort();
    Compiled { by_type, unsupported }
}

/// Compiles `def` for resources of `resource_type`; `Ok(None)` when there is nothing to extract
/// (special parameters, no expression, or no part of the expression applies to the type).
fn compile_param<'d>(
    def: &'d SearchParamDef,
    resource_type: ResourceType,
) -> Result<Option<CompiledParam<'d>>, String> {
    compile_with(def, resource_type, &|url| registry().by_url(url).map(|d| d.kind))
}

/// [`compile_param`] with composite components' types looked up by `component_kind` (their
/// canonical URL → type).
fn compile_with<'d>(
    def: &'d SearchParamDef,
    resource_type: ResourceType,
    component_kind: &dyn Fn(&str) -> Option<ParamType>,
) -> Result<Option<CompiledParam<'d>>, String> {
    let Some(expression) = def.expression.as_deref().filter(|e| !e.trim().is_empty()) else { return Ok(None) };
    if def.kind == ParamType::Special {
        return Ok(None);
    }
    let ast = fhirpath::parse(expression).map_err(|e| format!("parse error: {e}"))?;
    let root: [Ty; 1] = [resource_type.as_str()];
    let (plan, types) = compile::compile(&ast, &root, resource_type)?;
    if matches!(plan, Plan::Empty) {
        return Ok(None);
    }
    let body = if def.kind == ParamType::Composite {
        if def.component.is_empty() {
            return Err("composite parameter without components".into());
        }
        let mut components = Vec::new();
        for component in &def.component {
            let kind = component_kind(&component.definition)
                .ok_or_else(|| format!("unknown component definition {}", component.definition))?;
            let ast = fhirpath::parse(&component.expression).map_err(|e| format!("component parse error: {e}"))?;
            let (component_plan, _) = compile::compile(&ast, &types, resource_type)?;
            components.push((kind, component_plan));
        }
        Body::Composite { plan, components }
    } else {
        Body::Simple(plan)
    };
    Ok(Some(CompiledParam { code: &def.code, url: &def.url, kind: def.kind, targets: &def.target, body }))
}

/// Whether `def` can be extracted from resources of `resource_type`: its expression (and each
/// composite component's) parses and compiles, and the components are known — among the base
/// definitions or `siblings` (the registry itself is not touched: it is built once, after the
/// extensions are installed). A definition that extracts nothing for the type (no part of its
/// expression applies) is an error too: it could never match.
pub(crate) fn check(
    def: &SearchParamDef,
    resource_type: ResourceType,
    siblings: &[SearchParamDef],
) -> Result<(), String> {
    if def.kind == ParamType::Special {
        return Err("special parameters need code of their own".to_owned());
    }
    let component_kind = |url: &str| {
        let base = crate::search::params::base_registry().by_url(url);
        base.or_else(|| siblings.iter().find(|s| s.url == url)).map(|d| d.kind)
    };
    match compile_with(def, resource_type, &component_kind)? {
        Some(_) => Ok(()),
        None => Err("its expression selects nothing in this resource type".to_owned()),
    }
}

/// Forces compilation of every parameter's extractor (otherwise done on first use).
pub fn warm_up() {
    LazyLock::force(&COMPILED);
}

/// The base definitions whose expression the extractor cannot evaluate, as (url, reason). These
/// parameters extract nothing.
pub fn unsupported_expressions() -> Vec<(&'static str, String)> {
    COMPILED.unsupported.clone()
}

/// Every value of every search parameter of the resource's type (from `resourceType`; an unknown
/// or missing type yields nothing). Special parameters and those without an expression (`_text`,
/// `_content`, `_query`) are skipped.
pub fn extract(resource: &Value) -> Vec<IndexEntry> {
    let Some(resource_type) = resource.get("resourceType").and_then(Value::as_str).and_then(ResourceType::parse) else {
        return Vec::new();
    };
    let Some(params) = COMPILED.by_type.get(&resource_type) else { return Vec::new() };
    let mut entries = Vec::new();
    let mut values = Vec::new();
    for param in params {
        values.clear();
        evaluate(param.kind, param.targets, &param.body, resource, resource_type, &mut values);
        entries.extend(values.drain(..).map(|value| IndexEntry { param: param.code.to_owned(), value }));
    }
    entries
}

/// The values of one parameter for `resource` (nothing when the parameter does not apply to the
/// resource's type or its expression is unsupported).
pub fn extract_param(resource: &Value, def: &SearchParamDef) -> Vec<IndexValue> {
    let Some(resource_type) = resource.get("resourceType").and_then(Value::as_str).and_then(ResourceType::parse) else {
        return Vec::new();
    };
    let mut values = Vec::new();
    let precompiled = COMPILED
        .by_type
        .get(&resource_type)
        .and_then(|params| params.iter().find(|p| p.url == def.url && p.code == def.code && p.kind == def.kind));
    match precompiled {
        Some(param) => evaluate(param.kind, param.targets, &param.body, resource, resource_type, &mut values),
        // Not a base definition of this type (or a custom one): compile it now.
        None => {
            if let Ok(Some(param)) = compile_param(def, resource_type) {
                evaluate(param.kind, param.targets, &param.body, resource, resource_type, &mut values);
            }
        }
    }
    values
}

/// Appends the distinct values of one compiled parameter to `out` (expected empty).
fn evaluate(
    kind: ParamType,
    targets: &[String],
    body: &Body,
    resource: &Value,
    resource_type: ResourceType,
    out: &mut Vec<IndexValue>,
) {
    let cx = Context { root: resource, root_type: resource_type.as_str() };
    let focus = Item::Node(resource, resource_type.as_str());
    let mut items = Vec::new();
    let mut converted = Vec::new();
    match body {
        Body::Simple(plan) => {
            compile::eval(plan, focus, cx, &mut items);
            let target = Target { kind, targets, of_type_tokens: true };
            for item in items {
                convert::convert(item, target, &mut converted);
            }
            push_all_distinct(out, converted);
        }
        Body::Composite { plan, components } => {
            compile::eval(plan, focus, cx, &mut items);
            let mut scratch = Vec::new();
            let mut composites = Vec::new();
            for item in items {
                let mut parts: Vec<Vec<IndexValue>> = Vec::with_capacity(components.len());
                for (component_kind, component_plan) in components {
                    scratch.clear();
                    compile::eval(component_plan, item, cx, &mut scratch);
                    let target = Target { kind: *component_kind, targets: &[], of_type_tokens: false };
                    let mut values = Vec::new();
                    for part in &scratch {
                        convert::convert(*part, target, &mut values);
                    }
                    parts.push(values);
                }
                composites.extend(cartesian(&parts).into_iter().map(IndexValue::Composite));
            }
            push_all_distinct(out, composites);
        }
    }
}

/// Appends `values` to `out` (empty) without repeats: pairwise for the usual handful of values, by
/// their `Debug` form (exact for every field, floats included) for long lists such as a
/// CodeSystem's codes.
fn push_all_distinct(out: &mut Vec<IndexValue>, values: Vec<IndexValue>) {
    if values.len() <= 32 {
        for value in values {
            if !out.contains(&value) {
                out.push(value);
            }
        }
        return;
    }
    let mut seen = std::collections::HashSet::with_capacity(values.len());
    out.extend(values.into_iter().filter(|value| seen.insert(format!("{value:?}"))));
}

/// Every combination taking one value from each part (none when a part is empty).
fn cartesian(parts: &[Vec<IndexValue>]) -> Vec<Vec<IndexValue>> {
    let mut combinations: Vec<Vec<IndexValue>> = vec![Vec::with_capacity(parts.len())];
    for part in parts {
        let mut next = Vec::with_capacity(combinations.len() * part.len());
        for combination in &combinations {
            for value in part {
                let mut extended = combination.clone();
                extended.push(value.clone());
                next.push(extended);
            }
        }
        combinations = next;
    }
    combinations
}
