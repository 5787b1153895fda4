//! The one FHIRPath parser of this crate, for the subset it needs: path navigation, indexers,
//! function invocations, `|`, `is`/`as`, `=`/`!=`, `and`/`or`, string/boolean/number literals
//! (negative numbers included), parentheses and `%resource`-style variables. Produces an untyped
//! [`Ast`]; its users decide what they accept:
//! - search-parameter extraction compiles it into a typed plan (`search::extract::compile`);
//! - FHIRPath Patch converts it into the path steps it evaluates (`patch::path`).
//!
//! Expressions are bounded ([`MAX_TOKENS`] tokens, [`MAX_NESTING`] nested sub-expressions) so that
//! untrusted input (FHIRPath Patch paths arrive over HTTP) cannot exhaust the stack.

use std::fmt;

/// A parsed FHIRPath expression.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Ast {
    /// An identifier at the start of an expression or after `.`: element name or type name.
    Member { input: Option<Box<Ast>>, name: String },
    /// `input.name(args)`, or `name(args)` on the focus when `input` is `None`.
    Call { input: Option<Box<Ast>>, name: String, args: Vec<Ast> },
    /// `input[index]`.
    Index { input: Box<Ast>, index: Box<Ast> },
    /// `%name`.
    Variable(String),
    /// `'text'`.
    String(String),
    /// `true` / `false`.
    Boolean(bool),
    /// A number literal, as written.
    Number(String),
    /// `left op right`.
    Binary { op: BinaryOp, left: Box<Ast>, right: Box<Ast> },
    /// `input is Type` / `input as Type` (the operator forms; the function forms are `Call`s).
    TypeOp { op: TypeOp, input: Box<Ast>, type_name: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BinaryOp {
    Union,
    Equal,
    NotEqual,
    And,
    Or,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TypeOp {
    Is,
    As,
}

impl BinaryOp {
    /// The operator as written in FHIRPath.
    pub(crate) fn symbol(self) -> &'static str {
        match self {
            BinaryOp::Union => "|",
            BinaryOp::Equal => "=",
            BinaryOp::NotEqual => "!=",
            BinaryOp::And => "and",
            BinaryOp::Or => "or",
        }
    }
}

impl TypeOp {
    /// The operator as written in FHIRPath.
    pub(crate) fn keyword(self) -> &'static str {
        match self {
            TypeOp::Is => "is",
            TypeOp::As => "as",
        }
    }
}

/// The most tokens an expression may have (the longest base R4 search expression has about 330).
const MAX_TOKENS: usize = 1_000;

/// The deepest nesting of parenthesised expressions, function arguments and indexers.
const MAX_NESTING: usize = 32;

/// Why an expression does not parse (or uses syntax outside the subset).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ParseError(pub String);

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Identifier(String),
    /// A `` `delimited` `` identifier: a name, never a keyword or literal (`` `true` `` is an element).
    Delimited(String),
    String(String),
    Number(String),
    Variable(String),
    Symbol(&'static str),
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Token::Identifier(name) => write!(f, "identifier '{name}'"),
            Token::Delimited(name) => write!(f, "identifier `{name}`"),
            Token::String(text) => write!(f, "string '{text}'"),
            Token::Number(text) => write!(f, "number {text}"),
            Token::Variable(name) => write!(f, "variable '%{name}'"),
            Token::Symbol(symbol) => write!(f, "'{symbol}'"),
        }
    }
}

fn tokenize(input: &str) -> Result<Vec<Token>, ParseError> {
    let chars: Vec<char> = input.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while let Some(&c) = chars.get(i) {
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        if c.is_ascii_alphabetic() || c == '_' {
            let start = i;
            while chars.get(i).is_some_and(|c| c.is_ascii_alphanumeric() || *c == '_') {
                i += 1;
            }
            tokens.push(Token::Identifier(chars[start..i].iter().collect()));
            continue;
        }
        if c == '`' {
            let end = chars[i + 1..]
                .iter()
                .position(|c| *c == '`')
                .ok_or_else(|| ParseError("unterminated `identifier`".into()))?;
            tokens.push(Token::Delimited(chars[i + 1..i + 1 + end].iter().collect()));
            i += end + 2;
            continue;
        }
        // `digits('.' digits)?`, with a leading `-` for negative numbers (there is no arithmetic here).
        if c.is_ascii_digit() || c == '-' && chars.get(i + 1).is_some_and(char::is_ascii_digit) {
            let start = i;
            i += 1;
            while chars.get(i).is_some_and(char::is_ascii_digit) {
                i += 1;
            }
            if chars.get(i) == Some(&'.') && chars.get(i + 1).is_some_and(char::is_ascii_digit) {
                i += 1;
                while chars.get(i).is_some_and(char::is_ascii_digit) {
                    i += 1;
                }
            }
            tokens.push(Token::Number(chars[start..i].iter().collect()));
            continue;
        }
        if c == '%' {
            i += 1;
            let start = i;
            while chars.get(i).is_some_and(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-') {
                i += 1;
            }
            if start == i {
                return Err(ParseError("expected a variable name after '%'".into()));
            }
            tokens.push(Token::Variable(chars[start..i].iter().collect()));
            continue;
        }
        if c == '\'' {
            i += 1;
            tokens.push(Token::String(string_literal(&chars, &mut i)?));
            continue;
        }
        let two: String = chars[i..chars.len().min(i + 2)].iter().collect();
        let symbol = match two.as_str() {
            "!=" => Some("!="),
            "<=" | ">=" | "!~" => return Err(ParseError(format!("operator '{two}' is not supported"))),
            _ => None,
        };
        if let Some(symbol) = symbol {
            tokens.push(Token::Symbol(symbol));
            i += 2;
            continue;
        }
        let symbol = match c {
            '.' => ".",
            '(' => "(",
            ')' => ")",
            '[' => "[",
            ']' => "]",
            ',' => ",",
            '|' => "|",
            '=' => "=",
            other => return Err(ParseError(format!("unexpected character '{other}'"))),
        };
        tokens.push(Token::Symbol(symbol));
        i += 1;
    }
    if tokens.len() > MAX_TOKENS {
        return Err(ParseError(format!("the expression is too long (more than {MAX_TOKENS} tokens)")));
    }
    Ok(tokens)
}

/// The rest of a `'string'` literal from `chars[*i]` (after the opening quote), escapes resolved; advances `i` past
/// the closing quote.
fn string_literal(chars: &[char], i: &mut usize) -> Result<String, ParseError> {
    let unterminated = || ParseError("unterminated string literal".into());
    let mut text = String::new();
    loop {
        let c = *chars.get(*i).ok_or_else(unterminated)?;
        *i += 1;
        match c {
            '\'' => return Ok(text),
            '\\' => {
                let escaped = *chars.get(*i).ok_or_else(unterminated)?;
                *i += 1;
                text.push(match escaped {
                    'n' => '\n',
                    't' => '\t',
                    'r' => '\r',
                    'f' => '\u{c}',
                    '\'' | '"' | '`' | '\\' | '/' => escaped,
                    'u' => {
                        let hex: String = chars[*i..].iter().take(4).take_while(|c| c.is_ascii_hexdigit()).collect();
                        *i += hex.len();
                        Some(&hex)
                            .filter(|hex| hex.len() == 4)
                            .and_then(|hex| u32::from_str_radix(hex, 16).ok())
                            .and_then(char::from_u32)
                            .ok_or_else(|| ParseError(format!("invalid escape '\\u{hex}' in a string literal")))?
                    }
                    other => return Err(ParseError(format!("unsupported escape '\\{other}' in a string literal"))),
                });
            }
            other => text.push(other),
        }
    }
}

/// Parses `input` into an [`Ast`].
pub(crate) fn parse(input: &str) -> Result<Ast, ParseError> {
    let tokens = tokenize(input)?;
    let mut parser = Parser { tokens, pos: 0, depth: 0 };
    let ast = parser.expression()?;
    if let Some(token) = parser.peek() {
        return Err(ParseError(format!("unexpected {token} after the expression")));
    }
    Ok(ast)
}

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
    /// How many `expression`s are being parsed, one inside the other.
    depth: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn next(&mut self) -> Option<Token> {
        let token = self.tokens.get(self.pos).cloned();
        self.pos += 1;
        token
    }

    /// The next token if it is an identifier, plain or delimited.
    fn name(&mut self) -> Option<String> {
        match self.next() {
            Some(Token::Identifier(name) | Token::Delimited(name)) => Some(name),
            _ => None,
        }
    }

    fn eat_symbol(&mut self, symbol: &str) -> bool {
        if matches!(self.peek(), Some(Token::Symbol(s)) if *s == symbol) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn eat_keyword(&mut self, keyword: &str) -> bool {
        if matches!(self.peek(), Some(Token::Identifier(s)) if s == keyword) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect_symbol(&mut self, symbol: &str) -> Result<(), ParseError> {
        if self.eat_symbol(symbol) { Ok(()) } else { Err(ParseError(format!("expected '{symbol}'"))) }
    }

    /// A whole (sub-)expression, at most [`MAX_NESTING`] deep.
    fn expression(&mut self) -> Result<Ast, ParseError> {
        if self.depth == MAX_NESTING {
            return Err(ParseError(format!("the expression nests more than {MAX_NESTING} levels deep")));
        }
        self.depth += 1;
        let ast = self.or();
        self.depth -= 1;
        ast
    }

    /// Lowest precedence: `or`, then `and`, equality, union, type operators, invocation chains.
    fn or(&mut self) -> Result<Ast, ParseError> {
        let mut left = self.and()?;
        loop {
            if self.eat_keyword("or") {
                let right = self.and()?;
                left = binary(BinaryOp::Or, left, right);
            } else if matches!(self.peek(), Some(Token::Identifier(k)) if k == "xor" || k == "implies") {
                return Err(ParseError("'xor'/'implies' are not supported".into()));
            } else {
                return Ok(left);
            }
        }
    }

    fn and(&mut self) -> Result<Ast, ParseError> {
        let mut left = self.equality()?;
        while self.eat_keyword("and") {
            let right = self.equality()?;
            left = binary(BinaryOp::And, left, right);
        }
        Ok(left)
    }

    fn equality(&mut self) -> Result<Ast, ParseError> {
        let mut left = self.union()?;
        loop {
            let op = if self.eat_symbol("=") {
                BinaryOp::Equal
            } else if self.eat_symbol("!=") {
                BinaryOp::NotEqual
            } else {
                return Ok(left);
            };
            let right = self.union()?;
            left = binary(op, left, right);
        }
    }

    fn union(&mut self) -> Result<Ast, ParseError> {
        let mut left = self.type_expression()?;
        while self.eat_symbol("|") {
            let right = self.type_expression()?;
            left = binary(BinaryOp::Union, left, right);
        }
        Ok(left)
    }

    fn type_expression(&mut self) -> Result<Ast, ParseError> {
        let mut input = self.invocation_chain()?;
        loop {
            let op = if self.eat_keyword("is") {
                TypeOp::Is
            } else if self.eat_keyword("as") {
                TypeOp::As
            } else {
                return Ok(input);
            };
            let type_name = self.type_specifier()?;
            input = Ast::TypeOp { op, input: Box::new(input), type_name };
        }
    }

    /// `Name` or `Namespace.Name`; the namespace (`FHIR`, `System`) is dropped.
    fn type_specifier(&mut self) -> Result<String, ParseError> {
        let Some(mut name) = self.name() else {
            return Err(ParseError("expected a type name".into()));
        };
        if self.eat_symbol(".") {
            let Some(qualified) = self.name() else {
                return Err(ParseError("expected a type name after the namespace".into()));
            };
            name = qualified;
        }
        Ok(name)
    }

    fn invocation_chain(&mut self) -> Result<Ast, ParseError> {
        let mut ast = self.term()?;
        loop {
            if self.eat_symbol(".") {
                let Some(name) = self.name() else {
                    return Err(ParseError("expected a name after '.'".into()));
                };
                ast = self.member_or_call(Some(Box::new(ast)), name)?;
            } else if self.eat_symbol("[") {
                let index = self.expression()?;
                self.expect_symbol("]")?;
                ast = Ast::Index { input: Box::new(ast), index: Box::new(index) };
            } else {
                return Ok(ast);
            }
        }
    }

    fn member_or_call(&mut self, input: Option<Box<Ast>>, name: String) -> Result<Ast, ParseError> {
        if !self.eat_symbol("(") {
            return Ok(Ast::Member { input, name });
        }
        let mut args = Vec::new();
        if !self.eat_symbol(")") {
            loop {
                args.push(self.expression()?);
                if self.eat_symbol(")") {
                    break;
                }
                self.expect_symbol(",")?;
            }
        }
        Ok(Ast::Call { input, name, args })
    }

    fn term(&mut self) -> Result<Ast, ParseError> {
        match self.next() {
            Some(Token::Identifier(name)) => match name.as_str() {
                "true" => Ok(Ast::Boolean(true)),
                "false" => Ok(Ast::Boolean(false)),
                _ => self.member_or_call(None, name),
            },
            Some(Token::Delimited(name)) => self.member_or_call(None, name),
            Some(Token::String(text)) => Ok(Ast::String(text)),
            Some(Token::Number(text)) => Ok(Ast::Number(text)),
            Some(Token::Variable(name)) => Ok(Ast::Variable(name)),
            Some(Token::Symbol("(")) => {
                let inner = self.expression()?;
                self.expect_symbol(")")?;
                Ok(inner)
            }
            Some(other) => Err(ParseError(format!("unexpected {other}"))),
            None => Err(ParseError("unexpected end of expression".into())),
        }
    }
}

fn binary(op: BinaryOp, left: Ast, right: Ast) -> Ast {
    Ast::Binary { op, left: Box::new(left), right: Box::new(right) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(input: Option<Ast>, name: &str) -> Ast {
        Ast::Member { input: input.map(Box::new), name: name.into() }
    }

    #[test]
    fn parses_paths_unions_and_type_operators() {
        let ast = parse("(Observation.value as Quantity) | Observation.code").expect("parses");
        let value = member(Some(member(None, "Observation")), "value");
        let cast = Ast::TypeOp { op: TypeOp::As, input: Box::new(value), type_name: "Quantity".into() };
        let code = member(Some(member(None, "Observation")), "code");
        assert_eq!(ast, binary(BinaryOp::Union, cast, code));
    }

    #[test]
    fn precedence_puts_and_below_equality_and_union() {
        let ast = parse("Patient.deceased.exists() and Patient.deceased != false").expect("parses");
        let Ast::Binary { op: BinaryOp::And, right, .. } = ast else { panic!("and at the top: {ast:?}") };
        assert!(matches!(*right, Ast::Binary { op: BinaryOp::NotEqual, .. }));
    }

    #[test]
    fn parses_calls_indexers_strings_and_variables() {
        let ast = parse("a.where(resolve() is FHIR.Patient).b[0] | %resource.x | c.where(url='x\\'y')").expect("ok");
        let text = format!("{ast:?}");
        assert!(text.contains("\"Patient\"") && text.contains("Variable(\"resource\")") && text.contains("x'y"));
        assert!(parse("a.b(").is_err());
        assert!(parse("a ~ b").is_err());
        assert!(parse("a <= b").is_err());
        assert!(parse("'open").is_err());
    }

    #[test]
    fn parses_negative_numbers_and_decimals() {
        let equal = |right: &str| binary(BinaryOp::Equal, member(None, "a"), Ast::Number(right.into()));
        assert_eq!(parse("a = -2"), Ok(equal("-2")));
        assert_eq!(parse("a=-2.50"), Ok(equal("-2.50")));
        // A '.' belongs to a number only when digits follow: `1.2.3` is not one number.
        let index = Ast::Index { input: Box::new(member(None, "a")), index: Box::new(Ast::Number("0".into())) };
        assert_eq!(parse("a[0].b"), Ok(member(Some(index), "b")));
        assert!(parse("a = 1.2.3").is_err());
        assert!(parse("a - 1").is_err(), "no arithmetic");
        assert_eq!(parse("a - b"), Err(ParseError("unexpected character '-'".into())));
    }

    #[test]
    fn delimited_identifiers_are_never_keywords_or_literals() {
        assert_eq!(parse("`true`.`and`"), Ok(member(Some(member(None, "true")), "and")));
        assert_eq!(parse("true"), Ok(Ast::Boolean(true)));
        assert!(parse("a `and` b").is_err());
        let cast = Ast::TypeOp { op: TypeOp::Is, input: Box::new(member(None, "a")), type_name: "div".into() };
        assert_eq!(parse("a is FHIR.`div`"), Ok(cast));
    }

    #[test]
    fn string_escapes_follow_the_specification() {
        let text = |source: &str| match parse(source) {
            Ok(Ast::String(text)) => Ok(text),
            other => Err(format!("{other:?}")),
        };
        assert_eq!(
            text(r#"'it\'s \"q\" \`b\` \\ \/ \n\t\r\f \u00e9'"#),
            Ok("it's \"q\" `b` \\ / \n\t\r\u{c} é".into())
        );
        assert_eq!(parse(r"'\x'"), Err(ParseError(r"unsupported escape '\x' in a string literal".into())));
        assert_eq!(parse(r"'\u12'"), Err(ParseError(r"invalid escape '\u12' in a string literal".into())));
        assert!(parse(r"'\ud800'").is_err(), "a lone surrogate is no character");
        assert_eq!(parse(r"'\"), Err(ParseError("unterminated string literal".into())));
    }

    #[test]
    fn bounds_length_and_nesting() {
        let chain = format!("a{}", ".b".repeat(MAX_TOKENS / 2 - 1));
        assert!(parse(&chain).is_ok());
        assert!(parse(&format!("{chain}.c")).expect_err("too long").0.contains("too long"));
        let nested = |depth: usize| format!("{}a{}", "(".repeat(depth), ")".repeat(depth));
        assert!(parse(&nested(MAX_NESTING - 1)).is_ok());
        assert!(parse(&nested(MAX_NESTING)).expect_err("too deep").0.contains("nests more than"));
        assert!(parse(&format!("{}a{}", "f(".repeat(MAX_NESTING), ")".repeat(MAX_NESTING))).is_err());
        assert!(parse(&"(".repeat(100_000)).is_err(), "hostile input is an error, not a stack overflow");
    }
}
