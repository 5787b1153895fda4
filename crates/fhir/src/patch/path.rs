//! The FHIRPath subset FHIRPath Patch paths may use, evaluated over FHIR JSON.
//!
//! Paths are parsed by the crate's one FHIRPath parser (`crate::fhirpath`) and converted into [`Step`]s.
//! Supported: the resource type as root, dotted element names (choice elements by base name: `value` finds
//! `valueQuantity`), `[n]` indexers, `first()`, `last()`, and `where(a.b = literal)` equality filters with
//! string, number and boolean literals. Everything else is reported as unsupported, never guessed at.

use serde_json::Value;

use crate::fhirpath::{self, Ast, BinaryOp};

/// One step of a parsed path.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Step {
    /// `.name`: the element's values (each item of a list).
    Child(String),
    /// `[n]`: the n-th item of the collection so far.
    Index(usize),
    First,
    Last,
    /// `where(a.b = literal)`: items whose sub-path has exactly one value equal to the literal.
    Where(Vec<String>, Literal),
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Literal {
    String(String),
    Number(f64),
    Boolean(bool),
}

impl Literal {
    fn matches(&self, value: &Value) -> bool {
        match (self, value) {
            (Literal::String(literal), Value::String(value)) => literal == value,
            (Literal::Number(literal), Value::Number(value)) => value.as_f64() == Some(*literal),
            (Literal::Boolean(literal), Value::Bool(value)) => literal == value,
            _ => false,
        }
    }
}

/// A segment of a location inside a JSON document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Segment {
    Key(String),
    Index(usize),
}

/// Where a value lives in the document: the keys and array indices from the root.
pub(crate) type Location = Vec<Segment>;

pub(crate) fn get<'a>(document: &'a Value, location: &[Segment]) -> Option<&'a Value> {
    location.iter().try_fold(document, |node, segment| match segment {
        Segment::Key(key) => node.get(key),
        Segment::Index(index) => node.get(index),
    })
}

pub(crate) fn get_mut<'a>(document: &'a mut Value, location: &[Segment]) -> Option<&'a mut Value> {
    location.iter().try_fold(document, |node, segment| match segment {
        Segment::Key(key) => node.get_mut(key),
        Segment::Index(index) => node.get_mut(index),
    })
}

/// Renders a location as FHIRPath (`Patient.name[0].given[1]`).
#[cfg(test)]
pub(crate) fn display(root: &str, location: &[Segment]) -> String {
    let mut out = root.to_owned();
    for segment in location {
        match segment {
            Segment::Key(key) => {
                out.push('.');
                out.push_str(key);
            }
            Segment::Index(index) => out.push_str(&format!("[{index}]")),
        }
    }
    out
}

/// Why a path cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PathError(pub String);

/// Parses `expression` relative to a resource of type `resource_type` (a leading `Patient.` is the root).
pub(crate) fn parse(expression: &str, resource_type: &str) -> Result<Vec<Step>, PathError> {
    let ast = fhirpath::parse(expression).map_err(|error| PathError(error.0))?;
    let mut steps = Vec::new();
    push_steps(&ast, resource_type, &mut steps)?;
    Ok(steps)
}

/// What a patch path may use, for the messages that reject everything else.
const SUBSET: &str = "a patch path may only use the resource type, element names, '[n]', first(), last() and \
                      where(path = literal)";

/// Appends the steps of `ast`, a path in the patch subset, to `steps`.
fn push_steps(ast: &Ast, resource_type: &str, steps: &mut Vec<Step>) -> Result<(), PathError> {
    match ast {
        Ast::Member { input: None, name } if name == resource_type => {}
        Ast::Member { input: None, name } if name.starts_with(|c: char| c.is_ascii_uppercase()) => {
            return Err(PathError(format!("path starts with '{name}' but the resource is a {resource_type}")));
        }
        Ast::Member { input, name } => {
            if let Some(input) = input {
                push_steps(input, resource_type, steps)?;
            }
            steps.push(Step::Child(name.clone()));
        }
        Ast::Index { input, index } => {
            push_steps(input, resource_type, steps)?;
            let index = match index.as_ref() {
                Ast::Number(text) => text.parse().ok(),
                _ => None,
            };
            let index = index.ok_or_else(|| PathError("an indexer must be a non-negative integer".into()))?;
            steps.push(Step::Index(index));
        }
        Ast::Call { input: None, name, .. } => {
            return Err(PathError(format!(
                "function '{name}()' is not supported here: a path starts with an element name"
            )));
        }
        Ast::Call { input: Some(input), name, args } => {
            push_steps(input, resource_type, steps)?;
            steps.push(function(name, args)?);
        }
        Ast::Binary { op, .. } => {
            return Err(PathError(format!("operator '{}' is not supported: {SUBSET}", op.symbol())));
        }
        Ast::TypeOp { op, .. } => {
            return Err(PathError(format!("operator '{}' is not supported: {SUBSET}", op.keyword())));
        }
        Ast::Variable(name) => {
            return Err(PathError(format!("variable '%{name}' is not supported: {SUBSET}")));
        }
        Ast::String(_) | Ast::Boolean(_) | Ast::Number(_) => {
            return Err(PathError("a path must start with an element name, not a literal".into()));
        }
    }
    Ok(())
}

/// The step of the function `name(args)` applied to a path.
fn function(name: &str, args: &[Ast]) -> Result<Step, PathError> {
    match (name, args) {
        ("first", []) => Ok(Step::First),
        ("last", []) => Ok(Step::Last),
        ("first" | "last", _) => Err(PathError(format!("{name}() takes no arguments"))),
        ("where", [Ast::Binary { op: BinaryOp::Equal, left, right }]) => {
            let mut sub_path = Vec::new();
            element_path(left, &mut sub_path)?;
            let literal = match right.as_ref() {
                Ast::String(text) => Literal::String(text.clone()),
                Ast::Boolean(value) => Literal::Boolean(*value),
                Ast::Number(text) => {
                    Literal::Number(text.parse().map_err(|_| PathError(format!("invalid number '{text}'")))?)
                }
                _ => return Err(PathError("where() must compare with a string, number or boolean literal".into())),
            };
            Ok(Step::Where(sub_path, literal))
        }
        ("where", _) => Err(PathError("only where(path = literal) is supported".into())),
        _ => Err(PathError(format!("function '{name}()' is not supported"))),
    }
}

/// The element names of `ast`, a dotted path of names (the left side of a `where` comparison).
fn element_path(ast: &Ast, names: &mut Vec<String>) -> Result<(), PathError> {
    let Ast::Member { input, name } = ast else {
        return Err(PathError("where() must compare an element path (names and dots only)".into()));
    };
    if let Some(input) = input {
        element_path(input, names)?;
    }
    names.push(name.clone());
    Ok(())
}

/// Evaluates parsed steps from the document root; returns the locations of all matches in document order.
pub(crate) fn evaluate(document: &Value, steps: &[Step]) -> Vec<Location> {
    evaluate_from(document, vec![Vec::new()], steps)
}

fn evaluate_from(document: &Value, mut nodes: Vec<Location>, steps: &[Step]) -> Vec<Location> {
    for step in steps {
        nodes = match step {
            Step::Child(name) => nodes.iter().flat_map(|location| children(document, location, name)).collect(),
            Step::Index(index) => nodes.into_iter().nth(*index).into_iter().collect(),
            Step::First => nodes.into_iter().next().into_iter().collect(),
            Step::Last => nodes.pop().into_iter().collect(),
            Step::Where(sub_path, literal) => nodes
                .into_iter()
                .filter(|location| {
                    let steps: Vec<Step> = sub_path.iter().cloned().map(Step::Child).collect();
                    let found = evaluate_from(document, vec![location.clone()], &steps);
                    matches!(found.as_slice(), [only] if get(document, only).is_some_and(|v| literal.matches(v)))
                })
                .collect(),
        };
    }
    nodes
}

/// `name` of the object at `location`: each list item, or the single value; a choice element by base name.
fn children(document: &Value, location: &Location, name: &str) -> Vec<Location> {
    let Some(Value::Object(object)) = get(document, location) else {
        return Vec::new();
    };
    let key = if object.contains_key(name) {
        Some(name.to_owned())
    } else {
        object
            .keys()
            .find(|key| key.strip_prefix(name).is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_uppercase())))
            .cloned()
    };
    let Some(key) = key else { return Vec::new() };
    let mut child = location.clone();
    child.push(Segment::Key(key.clone()));
    match object.get(&key) {
        Some(Value::Array(items)) => (0..items.len())
            .map(|index| {
                let mut item = child.clone();
                item.push(Segment::Index(index));
                item
            })
            .collect(),
        Some(Value::Null) | None => Vec::new(),
        Some(_) => vec![child],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn paths(document: &Value, expression: &str) -> Result<Vec<String>, PathError> {
        let steps = parse(expression, "Patient")?;
        Ok(evaluate(document, &steps).iter().map(|l| display("Patient", l)).collect())
    }

    fn patient() -> Value {
        json!({
            "resourceType": "Patient",
            "identifier": [{"system": "urn:a", "value": "1"}, {"system": "urn:b", "value": "2", "type": {"text": "t"}}],
            "name": [{"given": ["Jim", "Pete"]}, {"given": ["Jimmy"], "use": "nickname"}],
            "deceasedBoolean": false,
            "active": true,
            "multipleBirthInteger": 2
        })
    }

    #[test]
    fn evaluates_the_subset() {
        let p = patient();
        let ok = |expression: &str| paths(&p, expression).unwrap_or_else(|e| panic!("{expression}: {e:?}"));
        assert_eq!(ok("Patient"), ["Patient"]);
        assert_eq!(ok("Patient.identifier"), ["Patient.identifier[0]", "Patient.identifier[1]"]);
        assert_eq!(
            ok("Patient.name.given"),
            ["Patient.name[0].given[0]", "Patient.name[0].given[1]", "Patient.name[1].given[0]"]
        );
        assert_eq!(ok("Patient.name.given[2]"), ["Patient.name[1].given[0]"]);
        assert_eq!(ok("Patient.name[0].given.last()"), ["Patient.name[0].given[1]"]);
        assert_eq!(ok("Patient.identifier.first()"), ["Patient.identifier[0]"]);
        assert_eq!(ok("name.given[5]"), Vec::<String>::new());
        assert_eq!(ok("Patient.identifier.where(system = 'urn:b').value"), ["Patient.identifier[1].value"]);
        assert_eq!(ok("Patient.identifier.where(type.text = 't')"), ["Patient.identifier[1]"]);
        assert_eq!(ok("Patient.name.where(use='nickname')"), ["Patient.name[1]"]);
        assert_eq!(ok("Patient.name.where(given = 'Jim')"), Vec::<String>::new(), "two givens are not equal to one");
        assert_eq!(ok("Patient.deceased"), ["Patient.deceasedBoolean"]);
        assert_eq!(ok("Patient.multipleBirth.where(`value` = 2)"), Vec::<String>::new());
        assert_eq!(ok("Patient.where(active = true)"), ["Patient"]);
        assert_eq!(ok("Patient.where(multipleBirthInteger = 2.0)"), ["Patient"]);
        assert_eq!(ok(r"Patient.identifier.where(value = 'it\'s')"), Vec::<String>::new());
    }

    #[test]
    fn rejects_everything_else() {
        let p = patient();
        for expression in [
            "Patient.name | Patient.identifier",
            "Patient.name.exists()",
            "Patient.name.where(given.exists())",
            "Patient.name.where(use != 'official')",
            "Patient.name.where(use = 'a' and given = 'b')",
            "Patient.name[-1]",
            "Patient.name[x]",
            "Observation.code",
            "Patient..name",
            "Patient.name.",
            "Patient.identifier.where(value = 'unterminated)",
            "first()",
            "",
            "Patient.name.given + 'x'",
            "%resource.name",
        ] {
            assert!(paths(&p, expression).is_err(), "{expression} should be rejected");
        }
    }

    #[test]
    fn converts_the_general_ast_into_steps() {
        let steps =
            parse("Patient.identifier.where(type.text = 'it\\'s').value[1].first()", "Patient").expect("parses");
        assert_eq!(
            steps,
            [
                Step::Child("identifier".into()),
                Step::Where(vec!["type".into(), "text".into()], Literal::String("it's".into())),
                Step::Child("value".into()),
                Step::Index(1),
                Step::First,
            ]
        );
        assert_eq!(
            parse("name.last().where(`use` = -2.5)", "Patient"),
            Ok(vec![Step::Child("name".into()), Step::Last, Step::Where(vec!["use".into()], Literal::Number(-2.5)),])
        );
        assert_eq!(parse(" Patient [0] . active . where ( x = true ) ", "Patient").expect("spaces").len(), 3);
    }

    #[test]
    fn rejects_shapes_outside_the_subset_with_precise_messages() {
        let error = |expression: &str| parse(expression, "Patient").expect_err(expression).0;
        assert_eq!(error("Patient.name.exists()"), "function 'exists()' is not supported");
        assert_eq!(
            error("Patient.name | Patient.identifier"),
            "operator '|' is not supported: a patch path may only use the resource type, element names, '[n]', \
             first(), last() and where(path = literal)"
        );
        assert!(error("Patient.name is HumanName").starts_with("operator 'is' is not supported: "));
        assert!(error("%resource.name").starts_with("variable '%resource' is not supported: "));
        assert_eq!(error("first()"), "function 'first()' is not supported here: a path starts with an element name");
        assert_eq!(error("Observation.code"), "path starts with 'Observation' but the resource is a Patient");
        assert_eq!(error("Patient.name[-1]"), "an indexer must be a non-negative integer");
        assert_eq!(error("Patient.name.first(1)"), "first() takes no arguments");
        assert_eq!(error("Patient.name.where(use != 'x')"), "only where(path = literal) is supported");
        assert_eq!(
            error("Patient.name.where(use = given)"),
            "where() must compare with a string, number or boolean literal"
        );
        assert_eq!(
            error("Patient.name.where(given[0] = 'x')"),
            "where() must compare an element path (names and dots only)"
        );
        assert_eq!(error("'Patient'.name"), "a path must start with an element name, not a literal");
        assert_eq!(error("Patient.name."), "expected a name after '.'");
        assert_eq!(error("Patient.name)"), "unexpected ')' after the expression");
    }
}
