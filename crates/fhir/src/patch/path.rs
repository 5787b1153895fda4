//! The FHIRPath subset FHIRPath Patch paths may use, parsed and evaluated over FHIR JSON.
//!
//! Supported: the resource type as root, dotted element names (choice elements by base name: `value` finds
//! `valueQuantity`), `[n]` indexers, `first()`, `last()`, and `where(a.b = literal)` equality filters with
//! string, number and boolean literals. Everything else is reported as unsupported, never guessed at.

use serde_json::Value;

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
    let tokens = tokenize(expression)?;
    let mut parser = Parser { tokens, pos: 0 };
    let mut steps = Vec::new();
    let first = parser.identifier().ok_or_else(|| PathError("a path must start with an element name".into()))?;
    if first != resource_type {
        if first.starts_with(|c: char| c.is_ascii_uppercase()) {
            return Err(PathError(format!("path starts with '{first}' but the resource is a {resource_type}")));
        }
        if parser.peek() == Some(&Token::LParen) {
            return Err(PathError(format!("function '{first}()' is not supported here")));
        }
        steps.push(Step::Child(first));
    }
    parser.indexers(&mut steps)?;
    while !parser.done() {
        if parser.next() != Some(Token::Dot) {
            return Err(PathError("only '.', '[n]', first(), last() and where(x = literal) are supported".into()));
        }
        let name = parser.identifier().ok_or_else(|| PathError("expected an element name after '.'".into()))?;
        if parser.peek() == Some(&Token::LParen) {
            parser.next();
            steps.push(parser.function(&name)?);
        } else {
            steps.push(Step::Child(name));
        }
        parser.indexers(&mut steps)?;
    }
    Ok(steps)
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

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Identifier(String),
    String(String),
    Number(f64),
    Integer(usize),
    Dot,
    LBracket,
    RBracket,
    LParen,
    RParen,
    Equals,
}

fn tokenize(expression: &str) -> Result<Vec<Token>, PathError> {
    let mut tokens = Vec::new();
    let mut chars = expression.char_indices().peekable();
    while let Some((start, c)) = chars.next() {
        let token = match c {
            c if c.is_whitespace() => continue,
            '.' => Token::Dot,
            '[' => Token::LBracket,
            ']' => Token::RBracket,
            '(' => Token::LParen,
            ')' => Token::RParen,
            '=' => Token::Equals,
            '\'' => {
                let mut text = String::new();
                loop {
                    match chars.next() {
                        Some((_, '\'')) => break,
                        Some((_, '\\')) => match chars.next() {
                            Some((_, 'n')) => text.push('\n'),
                            Some((_, 't')) => text.push('\t'),
                            Some((_, 'r')) => text.push('\r'),
                            Some((_, other @ ('\'' | '"' | '`' | '\\' | '/'))) => text.push(other),
                            _ => {
                                return Err(PathError("unsupported escape in a string literal".into()));
                            }
                        },
                        Some((_, other)) => text.push(other),
                        None => return Err(PathError("unterminated string literal".into())),
                    }
                }
                Token::String(text)
            }
            '`' => {
                let mut name = String::new();
                loop {
                    match chars.next() {
                        Some((_, '`')) => break,
                        Some((_, other)) => name.push(other),
                        None => return Err(PathError("unterminated delimited identifier".into())),
                    }
                }
                Token::Identifier(name)
            }
            c if c.is_ascii_digit() || c == '-' => {
                let mut end = start + c.len_utf8();
                while let Some(&(index, next)) = chars.peek() {
                    if next.is_ascii_digit()
                        || next == '.' && expression[index + 1..].starts_with(|d: char| d.is_ascii_digit())
                    {
                        end = index + next.len_utf8();
                        chars.next();
                    } else {
                        break;
                    }
                }
                let text = &expression[start..end];
                match text.parse::<usize>() {
                    Ok(integer) => Token::Integer(integer),
                    Err(_) => {
                        Token::Number(text.parse::<f64>().map_err(|_| PathError(format!("invalid number '{text}'")))?)
                    }
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' => {
                let mut end = start + 1;
                while let Some(&(index, next)) = chars.peek() {
                    if next.is_ascii_alphanumeric() || next == '_' {
                        end = index + 1;
                        chars.next();
                    } else {
                        break;
                    }
                }
                Token::Identifier(expression[start..end].to_owned())
            }
            other => return Err(PathError(format!("'{other}' is not supported"))),
        };
        tokens.push(token);
    }
    Ok(tokens)
}

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
}

impl Parser {
    fn done(&self) -> bool {
        self.pos >= self.tokens.len()
    }

    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn next(&mut self) -> Option<Token> {
        let token = self.tokens.get(self.pos).cloned();
        self.pos += 1;
        token
    }

    fn identifier(&mut self) -> Option<String> {
        match self.peek() {
            Some(Token::Identifier(name)) => {
                let name = name.clone();
                self.pos += 1;
                Some(name)
            }
            _ => None,
        }
    }

    fn expect(&mut self, token: &Token, what: &str) -> Result<(), PathError> {
        if self.next().as_ref() == Some(token) { Ok(()) } else { Err(PathError(format!("expected {what}"))) }
    }

    fn indexers(&mut self, steps: &mut Vec<Step>) -> Result<(), PathError> {
        while self.peek() == Some(&Token::LBracket) {
            self.next();
            match self.next() {
                Some(Token::Integer(index)) => steps.push(Step::Index(index)),
                _ => {
                    return Err(PathError("an indexer must be a non-negative integer".into()));
                }
            }
            self.expect(&Token::RBracket, "']'")?;
        }
        Ok(())
    }

    /// The function call after `name(`.
    fn function(&mut self, name: &str) -> Result<Step, PathError> {
        match name {
            "first" | "last" => {
                self.expect(&Token::RParen, &format!("')' after {name}("))?;
                Ok(if name == "first" { Step::First } else { Step::Last })
            }
            "where" => {
                let mut sub_path =
                    vec![self.identifier().ok_or_else(|| PathError("where() must compare an element path".into()))?];
                while self.peek() == Some(&Token::Dot) {
                    self.next();
                    sub_path.push(self.identifier().ok_or_else(|| PathError("expected an element name".into()))?);
                }
                if self.next() != Some(Token::Equals) {
                    return Err(PathError("only where(path = literal) is supported".into()));
                }
                let literal = match self.next() {
                    Some(Token::String(text)) => Literal::String(text),
                    Some(Token::Integer(integer)) => Literal::Number(integer as f64),
                    Some(Token::Number(number)) => Literal::Number(number),
                    Some(Token::Identifier(word)) if word == "true" => Literal::Boolean(true),
                    Some(Token::Identifier(word)) if word == "false" => Literal::Boolean(false),
                    _ => {
                        return Err(PathError("where() must compare with a string, number or boolean literal".into()));
                    }
                };
                self.expect(&Token::RParen, "')' closing where(")?;
                Ok(Step::Where(sub_path, literal))
            }
            other => Err(PathError(format!("function '{other}()' is not supported"))),
        }
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
}
