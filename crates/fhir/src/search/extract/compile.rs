//! Compiles a parsed FHIRPath [`Ast`] for one resource type into a typed [`Plan`], and evaluates
//! plans over FHIR JSON.
//!
//! Typing is static, from the R4 JSON schema embedded in the crate (`crate::definitions`): every
//! navigation step is resolved at compile time to the JSON keys it reads and the FHIR type of what
//! it finds there. So `Observation.value.as(Quantity)` compiles to "read `valueQuantity`, type
//! `Quantity`", `Observation.effective` to "read `effectiveDateTime`, `effectivePeriod`,
//! `effectiveTiming`, `effectiveInstant`", and in `AllergyIntolerance.code | Condition.code` the part
//! that does not start with the compiled resource type compiles to nothing. Evaluation then does
//! no schema lookups, no string parsing and no allocation beyond the result collections.

use serde_json::{Map, Value};

use crate::ResourceType;
use crate::definitions;
use crate::fhirpath::{Ast, BinaryOp, TypeOp};

/// A FHIR type name: a data type (`HumanName`, `dateTime`), a backbone element definition
/// (`Observation_Component`), a resource type, `ResourceList` (an inline resource, typed at run time
/// by its `resourceType`), or a System type (`Boolean`, `String`, `Decimal`) for computed values.
pub(crate) type Ty = &'static str;

/// The JSON keys one navigation step reads from a node of type `parent`, with the child types.
#[derive(Debug, Clone)]
pub(crate) struct StepArm {
    parent: Ty,
    children: Vec<(&'static str, Ty)>,
}

/// A compiled expression. Evaluated against a focus item with [`eval`].
#[derive(Debug, Clone)]
pub(crate) enum Plan {
    Empty,
    /// The focus (the resource for a search parameter, the element for a composite component).
    Focus,
    /// `%resource`.
    Root,
    /// The focus when its run-time type is `Ty` (or derives from it), else nothing.
    FocusIfType(Ty),
    Literal(Literal),
    /// Path navigation: one step per `.name`, each step listing, per possible parent type, the JSON
    /// keys to read.
    Navigate {
        input: Box<Plan>,
        steps: Vec<Vec<StepArm>>,
    },
    /// `as`/`ofType` when the input's type is only known at run time.
    FilterType {
        input: Box<Plan>,
        target: Ty,
    },
    Where {
        input: Box<Plan>,
        condition: Box<Plan>,
    },
    /// `resolve() is Type` on a Reference: true when the reference's target is of `target`.
    ReferenceIs {
        input: Box<Plan>,
        target: Ty,
    },
    Is {
        input: Box<Plan>,
        target: Ty,
    },
    Index {
        input: Box<Plan>,
        index: usize,
    },
    Exists(Box<Plan>),
    IsEmpty(Box<Plan>),
    Not(Box<Plan>),
    Union(Vec<Plan>),
    Equal {
        left: Box<Plan>,
        right: Box<Plan>,
        negate: bool,
    },
    And(Box<Plan>, Box<Plan>),
    Or(Box<Plan>, Box<Plan>),
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Literal {
    String(String),
    Boolean(bool),
    Number(f64),
}

/// A plan with the static types its items can have.
struct Typed {
    plan: Plan,
    types: Vec<Ty>,
}

impl Typed {
    fn empty() -> Typed {
        Typed { plan: Plan::Empty, types: Vec::new() }
    }
}

/// Compiles `ast` for evaluation with a focus of one of `focus_types`, inside resources of type
/// `resource_type` (the type `%resource` has).
pub(crate) fn compile(ast: &Ast, focus_types: &[Ty], resource_type: ResourceType) -> Result<(Plan, Vec<Ty>), String> {
    let compiler = Compiler { resource: resource_type.as_str() };
    let typed = compiler.compile(ast, &Typed { plan: Plan::Focus, types: focus_types.to_vec() })?;
    Ok((typed.plan, typed.types))
}

struct Compiler {
    resource: Ty,
}

impl Compiler {
    fn compile(&self, ast: &Ast, focus: &Typed) -> Result<Typed, String> {
        match ast {
            Ast::Member { input: None, name } => self.focus_member(name, focus),
            Ast::Member { input: Some(input), name } => {
                let input = self.compile(input, focus)?;
                navigate(input, name)
            }
            Ast::Call { input, name, args } => {
                let input = match input {
                    Some(input) => self.compile(input, focus)?,
                    None => Typed { plan: focus.plan.clone(), types: focus.types.clone() },
                };
                self.call(input, name, args)
            }
            Ast::Index { input, index } => {
                let input = self.compile(input, focus)?;
                let Ast::Number(text) = index.as_ref() else {
                    return Err("only number literals are supported as indexes".into());
                };
                let index: usize = text.parse().map_err(|_| format!("invalid index '{text}'"))?;
                if matches!(input.plan, Plan::Empty) {
                    return Ok(Typed::empty());
                }
                Ok(Typed { plan: Plan::Index { input: Box::new(input.plan), index }, types: input.types })
            }
            Ast::Variable(name) => match name.as_str() {
                "resource" | "rootResource" => Ok(Typed { plan: Plan::Root, types: vec![self.resource] }),
                other => Err(format!("variable '%{other}' is not supported")),
            },
            Ast::String(text) => Ok(literal(Literal::String(text.clone()), "String")),
            Ast::Boolean(value) => Ok(literal(Literal::Boolean(*value), "Boolean")),
            Ast::Number(text) => {
                let value: f64 = text.parse().map_err(|_| format!("invalid number '{text}'"))?;
                Ok(literal(Literal::Number(value), "Decimal"))
            }
            Ast::Binary { op: BinaryOp::Union, left, right } => {
                let left = self.compile(left, focus)?;
                let right = self.compile(right, focus)?;
                Ok(union(left, right))
            }
            Ast::Binary { op, left, right } => {
                let left = self.compile(left, focus)?.plan;
                let right = self.compile(right, focus)?.plan;
                let (left, right) = (Box::new(left), Box::new(right));
                let plan = match op {
                    BinaryOp::Equal => Plan::Equal { left, right, negate: false },
                    BinaryOp::NotEqual => Plan::Equal { left, right, negate: true },
                    BinaryOp::And => Plan::And(left, right),
                    BinaryOp::Or => Plan::Or(left, right),
                    BinaryOp::Union => unreachable!("handled above"),
                };
                Ok(Typed { plan, types: vec!["Boolean"] })
            }
            Ast::TypeOp { op: TypeOp::Is, input, type_name } => {
                let target = type_name_of(type_name)?;
                // `resolve() is Type`: a test on the reference, not on a resolved resource.
                if let Ast::Call { input: resolve_input, name, args } = input.as_ref()
                    && name == "resolve"
                {
                    if !args.is_empty() {
                        return Err("resolve() takes no arguments".into());
                    }
                    let input = match resolve_input {
                        Some(input) => self.compile(input, focus)?,
                        None => Typed { plan: focus.plan.clone(), types: focus.types.clone() },
                    };
                    if !input.types.iter().all(|t| *t == "Reference") {
                        return Err("resolve() is only supported on Reference elements".into());
                    }
                    let plan = Plan::ReferenceIs { input: Box::new(input.plan), target };
                    return Ok(Typed { plan, types: vec!["Boolean"] });
                }
                let input = self.compile(input, focus)?;
                Ok(Typed { plan: Plan::Is { input: Box::new(input.plan), target }, types: vec!["Boolean"] })
            }
            Ast::TypeOp { op: TypeOp::As, input, type_name } => {
                let input = self.compile(input, focus)?;
                filter_type(input, type_name_of(type_name)?)
            }
        }
    }

    /// An identifier on the focus: a type name at the start of an expression (`Patient.name`
    /// starts by checking the focus is a Patient), else an element name.
    fn focus_member(&self, name: &str, focus: &Typed) -> Result<Typed, String> {
        let is_type_name = name.starts_with(|c: char| c.is_ascii_uppercase())
            && (ResourceType::parse(name).is_some() || matches!(name, "Resource" | "DomainResource"));
        if !is_type_name {
            return navigate(Typed { plan: focus.plan.clone(), types: focus.types.clone() }, name);
        }
        let target = type_name_of(name)?;
        let matching: Vec<Ty> = focus.types.iter().copied().filter(|t| is_a(t, target)).collect();
        if matching.is_empty() {
            return Ok(Typed::empty());
        }
        if matching.len() == focus.types.len() {
            return Ok(Typed { plan: focus.plan.clone(), types: matching });
        }
        match focus.plan {
            Plan::Focus => Ok(Typed { plan: Plan::FocusIfType(target), types: matching }),
            _ => Ok(Typed { plan: Plan::FilterType { input: Box::new(focus.plan.clone()), target }, types: matching }),
        }
    }

    fn call(&self, input: Typed, name: &str, args: &[Ast]) -> Result<Typed, String> {
        let arity = |n: usize| -> Result<(), String> {
            if args.len() == n { Ok(()) } else { Err(format!("{name}() takes {n} argument(s)")) }
        };
        // On a part of the expression for another resource type (`Person.telecom.where(...)` on a
        // Patient) there is nothing to type the arguments against: the result is empty (and
        // `exists()` false, `empty()` true).
        if matches!(input.plan, Plan::Empty) {
            let plan = match name {
                "exists" => Plan::Literal(Literal::Boolean(false)),
                "empty" => Plan::Literal(Literal::Boolean(true)),
                _ => Plan::Empty,
            };
            return Ok(Typed { plan, types: Vec::new() });
        }
        match name {
            "where" => {
                arity(1)?;
                let item = Typed { plan: Plan::Focus, types: input.types.clone() };
                let condition = self.compile(&args[0], &item)?;
                if matches!(input.plan, Plan::Empty) {
                    return Ok(Typed::empty());
                }
                let plan = Plan::Where { input: Box::new(input.plan), condition: Box::new(condition.plan) };
                Ok(Typed { plan, types: input.types })
            }
            "as" | "ofType" => {
                arity(1)?;
                let Ast::Member { input: None, name: type_name } = &args[0] else {
                    return Err(format!("{name}() expects a type name"));
                };
                filter_type(input, type_name_of(type_name)?)
            }
            "is" => {
                arity(1)?;
                let Ast::Member { input: None, name: type_name } = &args[0] else {
                    return Err("is() expects a type name".into());
                };
                let target = type_name_of(type_name)?;
                Ok(Typed { plan: Plan::Is { input: Box::new(input.plan), target }, types: vec!["Boolean"] })
            }
            "exists" | "empty" => {
                let input = match args {
                    [] => input,
                    [condition] if name == "exists" => self.call(input, "where", std::slice::from_ref(condition))?,
                    _ => return Err(format!("{name}() takes no argument")),
                };
                let plan = if name == "exists" {
                    Plan::Exists(Box::new(input.plan))
                } else {
                    Plan::IsEmpty(Box::new(input.plan))
                };
                Ok(Typed { plan, types: vec!["Boolean"] })
            }
            "not" => {
                arity(0)?;
                Ok(Typed { plan: Plan::Not(Box::new(input.plan)), types: vec!["Boolean"] })
            }
            "first" => {
                arity(0)?;
                if matches!(input.plan, Plan::Empty) {
                    return Ok(Typed::empty());
                }
                Ok(Typed { plan: Plan::Index { input: Box::new(input.plan), index: 0 }, types: input.types })
            }
            "extension" => {
                arity(1)?;
                let Ast::String(url) = &args[0] else {
                    return Err("extension() expects a string literal url".into());
                };
                let extensions = navigate(input, "extension")?;
                let url_is = Plan::Equal {
                    left: Box::new(Plan::Navigate {
                        input: Box::new(Plan::Focus),
                        steps: vec![vec![StepArm { parent: "Extension", children: vec![("url", "uri")] }]],
                    }),
                    right: Box::new(Plan::Literal(Literal::String(url.clone()))),
                    negate: false,
                };
                if matches!(extensions.plan, Plan::Empty) {
                    return Ok(Typed::empty());
                }
                let plan = Plan::Where { input: Box::new(extensions.plan), condition: Box::new(url_is) };
                Ok(Typed { plan, types: extensions.types })
            }
            "resolve" => Err("resolve() is only supported as `resolve() is Type`".into()),
            other => Err(format!("function '{other}()' is not supported")),
        }
    }
}

fn literal(value: Literal, ty: Ty) -> Typed {
    Typed { plan: Plan::Literal(value), types: vec![ty] }
}

fn union(left: Typed, right: Typed) -> Typed {
    let mut types = left.types;
    for t in right.types {
        if !types.contains(&t) {
            types.push(t);
        }
    }
    let mut parts = Vec::new();
    for plan in [left.plan, right.plan] {
        match plan {
            Plan::Empty => {}
            Plan::Union(inner) => parts.extend(inner),
            other => parts.push(other),
        }
    }
    let plan = match parts.len() {
        0 => Plan::Empty,
        1 => parts.pop().unwrap_or(Plan::Empty),
        _ => Plan::Union(parts),
    };
    Typed { plan, types }
}

/// `input.name`: resolved against the schema for every static type of `input`.
fn navigate(input: Typed, name: &str) -> Result<Typed, String> {
    if matches!(input.plan, Plan::Empty) {
        return Ok(Typed::empty());
    }
    let mut arms = Vec::new();
    let mut types = Vec::new();
    for parent in &input.types {
        if *parent == "ResourceList" {
            return Err(format!("navigation into an inline resource ('.{name}') is not supported"));
        }
        let children = element_children(parent, name);
        for (_, ty) in &children {
            if !types.contains(ty) {
                types.push(*ty);
            }
        }
        if !children.is_empty() {
            arms.push(StepArm { parent, children });
        }
    }
    if arms.is_empty() {
        return Err(format!("no element '{name}' on {}", input.types.join("/")));
    }
    let plan = match input.plan {
        Plan::Navigate { input, mut steps } => {
            steps.push(arms);
            Plan::Navigate { input, steps }
        }
        other => Plan::Navigate { input: Box::new(other), steps: vec![arms] },
    };
    Ok(Typed { plan, types })
}

/// `input as target` / `input.ofType(target)`: statically on the last navigation step when
/// possible (so `Observation.value.as(Quantity)` reads only `valueQuantity`), else at run time.
fn filter_type(input: Typed, target: Ty) -> Result<Typed, String> {
    let types: Vec<Ty> = input.types.iter().copied().filter(|t| is_a(t, target) || *t == "ResourceList").collect();
    if types.is_empty() {
        return Ok(Typed::empty());
    }
    match input.plan {
        Plan::Navigate { input: nav_input, mut steps } if !types.contains(&"ResourceList") => {
            if let Some(last) = steps.last_mut() {
                for arm in last.iter_mut() {
                    arm.children.retain(|(_, ty)| is_a(ty, target));
                }
                last.retain(|arm| !arm.children.is_empty());
            }
            Ok(Typed { plan: Plan::Navigate { input: nav_input, steps }, types })
        }
        Plan::Empty => Ok(Typed::empty()),
        other => Ok(Typed { plan: Plan::FilterType { input: Box::new(other), target }, types }),
    }
}

/// A type name in an expression, as a `'static` name: FHIR types from the schema, or the System
/// types FHIRPath defines.
fn type_name_of(name: &str) -> Result<Ty, String> {
    const SYSTEM: [&str; 8] = ["Boolean", "String", "Integer", "Decimal", "Date", "DateTime", "Time", "Quantity"];
    if let Some(system) = SYSTEM.iter().find(|s| **s == name) {
        return Ok(system);
    }
    if let Some(t) = ResourceType::parse(name) {
        return Ok(t.as_str());
    }
    match name {
        "Resource" => return Ok("Resource"),
        "DomainResource" => return Ok("DomainResource"),
        _ => {}
    }
    static_definition_name(name).ok_or_else(|| format!("unknown type '{name}'"))
}

/// `name` as the `'static` key of its schema definition.
fn static_definition_name(name: &str) -> Option<Ty> {
    let definitions = definitions::schema().get("definitions")?.as_object()?;
    definitions.get_key_value(name).map(|(key, _)| key.as_str())
}

fn properties(owner: &str) -> Option<&'static Map<String, Value>> {
    definitions::definition(owner)?.get("properties")?.as_object()
}

/// The JSON keys and types of element `name` of `owner`: the element itself, or for a choice
/// element (`value[x]`) every `name<Type>` key the schema has.
fn element_children(owner: Ty, name: &str) -> Vec<(&'static str, Ty)> {
    let Some(properties) = properties(owner) else { return Vec::new() };
    if let Some((key, schema)) = properties.get_key_value(name) {
        return property_type(schema, None).map(|ty| vec![(key.as_str(), ty)]).unwrap_or_default();
    }
    let mut out = Vec::new();
    for (key, schema) in properties {
        let Some(suffix) = key.strip_prefix(name) else { continue };
        if !suffix.starts_with(|c: char| c.is_ascii_uppercase()) {
            continue;
        }
        if let Some(ty) = choice_type(suffix)
            && let Some(ty) = property_type(schema, Some(ty))
        {
            out.push((key.as_str(), ty));
        }
    }
    out
}

/// The data type a choice suffix names (`Quantity`, `DateTime` → `dateTime`), if it is one.
fn choice_type(suffix: &str) -> Option<Ty> {
    let lower_first = {
        let mut chars = suffix.chars();
        chars.next().map(|c| c.to_ascii_lowercase().to_string() + chars.as_str()).unwrap_or_default()
    };
    [suffix, lower_first.as_str()].into_iter().find_map(|candidate| {
        let ty = static_definition_name(candidate)?;
        let is_data_type = !ty.contains('_') && ty != "ResourceList" && ResourceType::parse(ty).is_none();
        is_data_type.then_some(ty)
    })
}

/// The FHIR type of a schema property (`$ref`, or an inline primitive whose type is its choice
/// suffix, or an enum, which is a `code`).
fn property_type(schema: &'static Value, choice: Option<Ty>) -> Option<Ty> {
    let item = schema.get("items").unwrap_or(schema);
    if let Some(reference) = item.get("$ref").and_then(Value::as_str) {
        return reference.strip_prefix("#/definitions/");
    }
    if let Some(choice) = choice {
        return Some(choice);
    }
    if item.get("enum").is_some() {
        return Some("code");
    }
    match item.get("type").and_then(Value::as_str) {
        Some("string") => Some("string"),
        Some("boolean") => Some("boolean"),
        Some("number") => Some("decimal"),
        _ => None,
    }
}

/// FHIRPath `is`: `ty` is `target` or derives from it (FHIR R4 type hierarchy; System types match
/// the FHIR primitives they correspond to, so `value.as(DateTime)` finds `valueDateTime`).
pub(crate) fn is_a(ty: &str, target: &str) -> bool {
    if ty == target {
        return true;
    }
    match target {
        "Resource" => ResourceType::parse(ty).is_some(),
        "DomainResource" => ResourceType::parse(ty).is_some() && !matches!(ty, "Bundle" | "Binary" | "Parameters"),
        "string" => matches!(ty, "code" | "id" | "markdown"),
        "uri" => matches!(ty, "url" | "canonical" | "oid" | "uuid"),
        "integer" => matches!(ty, "positiveInt" | "unsignedInt"),
        "Quantity" => matches!(ty, "Age" | "Count" | "Distance" | "Duration" | "MoneyQuantity" | "SimpleQuantity"),
        "String" => matches!(
            ty,
            "string" | "code" | "id" | "markdown" | "uri" | "url" | "canonical" | "oid" | "uuid" | "base64Binary"
        ),
        "Boolean" => ty == "boolean",
        "Integer" => matches!(ty, "integer" | "positiveInt" | "unsignedInt"),
        "Decimal" => ty == "decimal",
        "Date" => ty == "date",
        "DateTime" => matches!(ty, "dateTime" | "instant"),
        "Time" => ty == "time",
        _ => false,
    }
}

/// One item of a result collection.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Item<'a> {
    /// A JSON element and its FHIR type.
    Node(&'a Value, Ty),
    Boolean(bool),
    String(&'a str),
    Number(f64),
}

impl<'a> Item<'a> {
    /// The run-time type: inline resources are typed by their `resourceType`.
    pub(crate) fn type_name(&self) -> &'a str {
        match self {
            Item::Node(value, "ResourceList") => value.get("resourceType").and_then(Value::as_str).unwrap_or(""),
            Item::Node(_, ty) => ty,
            Item::Boolean(_) => "Boolean",
            Item::String(_) => "String",
            Item::Number(_) => "Decimal",
        }
    }
}

/// What evaluation needs besides the focus.
#[derive(Clone, Copy)]
pub(crate) struct Context<'a> {
    pub root: &'a Value,
    pub root_type: Ty,
}

/// Evaluates `plan` with `focus`, appending the result items to `out`.
pub(crate) fn eval<'a>(plan: &'a Plan, focus: Item<'a>, cx: Context<'a>, out: &mut Vec<Item<'a>>) {
    match plan {
        Plan::Empty => {}
        Plan::Focus => out.push(focus),
        Plan::Root => out.push(Item::Node(cx.root, cx.root_type)),
        Plan::FocusIfType(target) => {
            if is_a(focus.type_name(), target) {
                out.push(focus);
            }
        }
        Plan::Literal(Literal::String(text)) => out.push(Item::String(text)),
        Plan::Literal(Literal::Boolean(value)) => out.push(Item::Boolean(*value)),
        Plan::Literal(Literal::Number(value)) => out.push(Item::Number(*value)),
        Plan::Navigate { input, steps } => {
            let mut current = Vec::new();
            eval(input, focus, cx, &mut current);
            let last = steps.len().saturating_sub(1);
            for (i, step) in steps.iter().enumerate() {
                if i == last {
                    for item in &current {
                        navigate_item(step, *item, out);
                    }
                } else {
                    let mut next = Vec::new();
                    for item in &current {
                        navigate_item(step, *item, &mut next);
                    }
                    current = next;
                }
            }
        }
        Plan::FilterType { input, target } => {
            let start = out.len();
            eval(input, focus, cx, out);
            let mut i = start;
            while i < out.len() {
                if is_a(out[i].type_name(), target) {
                    i += 1;
                } else {
                    out.remove(i);
                }
            }
        }
        Plan::Where { input, condition } => {
            let mut items = Vec::new();
            eval(input, focus, cx, &mut items);
            let mut scratch = Vec::new();
            for item in items {
                scratch.clear();
                eval(condition, item, cx, &mut scratch);
                if truth(&scratch) == Some(true) {
                    out.push(item);
                }
            }
        }
        Plan::ReferenceIs { input, target } => {
            let mut items = Vec::new();
            eval(input, focus, cx, &mut items);
            if let [Item::Node(reference, _)] = items.as_slice() {
                let target_type = reference_target_type(reference, cx.root);
                out.push(Item::Boolean(target_type.is_some_and(|t| is_a(t, target))));
            }
        }
        Plan::Is { input, target } => {
            let mut items = Vec::new();
            eval(input, focus, cx, &mut items);
            if let [item] = items.as_slice() {
                out.push(Item::Boolean(is_a(item.type_name(), target)));
            }
        }
        Plan::Index { input, index } => {
            let mut items = Vec::new();
            eval(input, focus, cx, &mut items);
            if let Some(item) = items.get(*index) {
                out.push(*item);
            }
        }
        Plan::Exists(input) | Plan::IsEmpty(input) => {
            let mut items = Vec::new();
            eval(input, focus, cx, &mut items);
            out.push(Item::Boolean(items.is_empty() == matches!(plan, Plan::IsEmpty(_))));
        }
        Plan::Not(input) => {
            let mut items = Vec::new();
            eval(input, focus, cx, &mut items);
            if let Some(value) = truth(&items) {
                out.push(Item::Boolean(!value));
            }
        }
        Plan::Union(parts) => {
            for part in parts {
                eval(part, focus, cx, out);
            }
        }
        Plan::Equal { left, right, negate } => {
            let (mut l, mut r) = (Vec::new(), Vec::new());
            eval(left, focus, cx, &mut l);
            eval(right, focus, cx, &mut r);
            if l.is_empty() || r.is_empty() {
                return;
            }
            let equal = l.len() == r.len() && l.iter().zip(&r).all(|(a, b)| items_equal(a, b));
            out.push(Item::Boolean(equal != *negate));
        }
        Plan::And(left, right) | Plan::Or(left, right) => {
            let (mut l, mut r) = (Vec::new(), Vec::new());
            eval(left, focus, cx, &mut l);
            eval(right, focus, cx, &mut r);
            let (l, r) = (truth(&l), truth(&r));
            let result = if matches!(plan, Plan::And(..)) {
                match (l, r) {
                    (Some(false), _) | (_, Some(false)) => Some(false),
                    (Some(true), Some(true)) => Some(true),
                    _ => None,
                }
            } else {
                match (l, r) {
                    (Some(true), _) | (_, Some(true)) => Some(true),
                    (Some(false), Some(false)) => Some(false),
                    _ => None,
                }
            };
            if let Some(value) = result {
                out.push(Item::Boolean(value));
            }
        }
    }
}

fn navigate_item<'a>(step: &'a [StepArm], item: Item<'a>, out: &mut Vec<Item<'a>>) {
    let Item::Node(value, ty) = item else { return };
    let Some(object) = value.as_object() else { return };
    let arm = match step {
        [only] if only.parent == ty => only,
        _ => match step.iter().find(|arm| arm.parent == ty) {
            Some(arm) => arm,
            None => return,
        },
    };
    for (key, child_type) in &arm.children {
        match object.get(*key) {
            Some(Value::Array(items)) => {
                out.extend(items.iter().filter(|v| !v.is_null()).map(|v| Item::Node(v, child_type)));
            }
            Some(Value::Null) | None => {}
            Some(child) => out.push(Item::Node(child, child_type)),
        }
    }
}

/// FHIRPath singleton evaluation to a boolean: empty is unknown, one boolean is itself, any other
/// single item is true.
fn truth(items: &[Item<'_>]) -> Option<bool> {
    match items {
        [Item::Boolean(value)] | [Item::Node(Value::Bool(value), _)] => Some(*value),
        [_] => Some(true),
        _ => None,
    }
}

fn items_equal(a: &Item<'_>, b: &Item<'_>) -> bool {
    /// An item's primitive value, or the JSON of a complex one.
    #[derive(PartialEq)]
    enum Primitive<'v> {
        String(&'v str),
        Boolean(bool),
        Number(Option<f64>),
        Complex(&'v Value),
    }
    fn primitive<'v>(item: &Item<'v>) -> Primitive<'v> {
        match item {
            Item::String(s) => Primitive::String(s),
            Item::Boolean(b) => Primitive::Boolean(*b),
            Item::Number(n) => Primitive::Number(Some(*n)),
            Item::Node(Value::String(s), _) => Primitive::String(s),
            Item::Node(Value::Bool(b), _) => Primitive::Boolean(*b),
            Item::Node(Value::Number(n), _) => Primitive::Number(n.as_f64()),
            Item::Node(other, _) => Primitive::Complex(other),
        }
    }
    primitive(a) == primitive(b)
}

/// The resource type a Reference points at: from `reference` (`Type/id`, an absolute URL ending
/// in `Type/id[/_history/v]`, or `#id` looked up in the resource's `contained`), else `type`.
pub(crate) fn reference_target_type<'a>(reference: &'a Value, root: &'a Value) -> Option<&'a str> {
    if let Some(text) = reference.get("reference").and_then(Value::as_str) {
        if let Some(local) = text.strip_prefix('#') {
            let contained = root.get("contained")?.as_array()?;
            return contained
                .iter()
                .find(|r| r.get("id").and_then(Value::as_str) == Some(local))
                .and_then(|r| r.get("resourceType"))
                .and_then(Value::as_str);
        }
        if let Some(parsed) = super::convert::parse_reference(text) {
            return parsed.target_type.map(|t| t.as_str());
        }
    }
    let declared = reference.get("type").and_then(Value::as_str)?;
    let name = declared.strip_prefix("http://hl7.org/fhir/StructureDefinition/").unwrap_or(declared);
    ResourceType::parse(name).map(|t| t.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhirpath::parse;

    fn types(expression: &str, resource: &str) -> Result<Vec<Ty>, String> {
        let rt = ResourceType::parse(resource).expect("type");
        let ast = parse(expression).map_err(|e| e.0)?;
        compile(&ast, &[rt.as_str()], rt).map(|(_, t)| t)
    }

    #[test]
    fn choice_elements_expand_from_the_schema() {
        let effective = types("Observation.effective", "Observation").expect("compiles");
        for ty in ["dateTime", "Period", "Timing", "instant"] {
            assert!(effective.contains(&ty), "{ty} in {effective:?}");
        }
        assert_eq!(types("Observation.value.as(Quantity)", "Observation"), Ok(vec!["Quantity"]));
        assert_eq!(types("(Observation.value as string)", "Observation"), Ok(vec!["string"]));
        assert_eq!(types("Observation.value.as(DateTime)", "Observation"), Ok(vec!["dateTime"]));
        assert_eq!(types("Patient.gender", "Patient"), Ok(vec!["code"]));
        assert_eq!(types("Observation.component.code", "Observation"), Ok(vec!["CodeableConcept"]));
    }

    #[test]
    fn other_types_parts_compile_to_nothing_and_typos_fail() {
        assert_eq!(types("Condition.code | Observation.code", "Observation"), Ok(vec!["CodeableConcept"]));
        assert_eq!(types("Condition.code", "Observation"), Ok(vec![]));
        assert!(types("Observation.nope", "Observation").is_err());
        assert!(types("Observation.code.resolve()", "Observation").is_err());
        assert!(types("Observation.code.matches('x')", "Observation").is_err());
    }
}
