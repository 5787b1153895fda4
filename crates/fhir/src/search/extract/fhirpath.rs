//! Parser for the FHIRPath subset that SearchParameter expressions use: path navigation, indexers,
//! function invocations, `|`, `is`/`as`, `=`/`!=`, `and`/`or`, string/boolean/number literals,
//! parentheses and `%resource`-style variables. Produces an untyped [`Ast`]; typing and
//! compilation happen in [`super::compile`].

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
    String(String),
    Number(String),
    Variable(String),
    Symbol(&'static str),
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
            tokens.push(Token::Identifier(chars[i + 1..i + 1 + end].iter().collect()));
            i += end + 2;
            continue;
        }
        if c.is_ascii_digit() {
            let start = i;
            while chars.get(i).is_some_and(|c| c.is_ascii_digit() || *c == '.') {
                i += 1;
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
            let mut text = String::new();
            i += 1;
            loop {
                match chars.get(i) {
                    None => return Err(ParseError("unterminated string literal".into())),
                    Some('\'') => {
                        i += 1;
                        break;
                    }
                    Some('\\') => {
                        let escaped = chars.get(i + 1).ok_or_else(|| ParseError("dangling escape".into()))?;
                        text.push(match escaped {
                            'n' => '\n',
                            't' => '\t',
                            'r' => '\r',
                            'f' => '\u{c}',
                            other => *other,
                        });
                        i += 2;
                    }
                    Some(other) => {
                        text.push(*other);
                        i += 1;
                    }
                }
            }
            tokens.push(Token::String(text));
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
    Ok(tokens)
}

/// Parses `input` into an [`Ast`].
pub(crate) fn parse(input: &str) -> Result<Ast, ParseError> {
    let tokens = tokenize(input)?;
    let mut parser = Parser { tokens, pos: 0 };
    let ast = parser.expression()?;
    if let Some(token) = parser.peek() {
        return Err(ParseError(format!("unexpected {token:?} after the expression")));
    }
    Ok(ast)
}

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
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

    /// Lowest precedence: `or`, then `and`, equality, union, type operators, invocation chains.
    fn expression(&mut self) -> Result<Ast, ParseError> {
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
        let Some(Token::Identifier(mut name)) = self.next() else {
            return Err(ParseError("expected a type name".into()));
        };
        if self.eat_symbol(".") {
            let Some(Token::Identifier(qualified)) = self.next() else {
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
                let Some(Token::Identifier(name)) = self.next() else {
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
            Some(Token::String(text)) => Ok(Ast::String(text)),
            Some(Token::Number(text)) => Ok(Ast::Number(text)),
            Some(Token::Variable(name)) => Ok(Ast::Variable(name)),
            Some(Token::Symbol("(")) => {
                let inner = self.expression()?;
                self.expect_symbol(")")?;
                Ok(inner)
            }
            Some(other) => Err(ParseError(format!("unexpected {other:?}"))),
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
}
