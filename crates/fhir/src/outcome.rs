//! OperationOutcome issues: the one shape every problem report takes, inside and on the wire.

use serde_json::{Value, json};

/// `OperationOutcome.issue.severity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Fatal,
    Error,
    Warning,
    Information,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Fatal => "fatal",
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Information => "information",
        }
    }
}

/// A subset of the `IssueType` value set (<http://hl7.org/fhir/issue-type>) used by the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IssueType {
    Invalid,
    Structure,
    Required,
    Value,
    Invariant,
    Security,
    Login,
    Forbidden,
    Processing,
    NotSupported,
    Duplicate,
    NotFound,
    Deleted,
    TooLong,
    Conflict,
    Throttled,
    Transient,
    Exception,
    Informational,
}

impl IssueType {
    pub fn as_str(self) -> &'static str {
        match self {
            IssueType::Invalid => "invalid",
            IssueType::Structure => "structure",
            IssueType::Required => "required",
            IssueType::Value => "value",
            IssueType::Invariant => "invariant",
            IssueType::Security => "security",
            IssueType::Login => "login",
            IssueType::Forbidden => "forbidden",
            IssueType::Processing => "processing",
            IssueType::NotSupported => "not-supported",
            IssueType::Duplicate => "duplicate",
            IssueType::NotFound => "not-found",
            IssueType::Deleted => "deleted",
            IssueType::TooLong => "too-long",
            IssueType::Conflict => "conflict",
            IssueType::Throttled => "throttled",
            IssueType::Transient => "transient",
            IssueType::Exception => "exception",
            IssueType::Informational => "informational",
        }
    }
}

/// One `OperationOutcome.issue`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    pub severity: Severity,
    pub code: IssueType,
    /// Human readable; never contains PHI beyond what the client itself sent.
    pub diagnostics: String,
    /// FHIRPath expression of the offending element, e.g. `Patient.name[0].given[1]`.
    pub expression: Option<String>,
}

impl Issue {
    pub fn error(code: IssueType, diagnostics: impl Into<String>) -> Self {
        Issue { severity: Severity::Error, code, diagnostics: diagnostics.into(), expression: None }
    }

    pub fn at(mut self, expression: impl Into<String>) -> Self {
        self.expression = Some(expression.into());
        self
    }

    pub fn to_json(&self) -> Value {
        let mut issue = json!({
            "severity": self.severity.as_str(),
            "code": self.code.as_str(),
            "diagnostics": self.diagnostics,
        });
        if let Some(expression) = &self.expression {
            issue["expression"] = json!([expression]);
        }
        issue
    }
}

/// Renders issues as an `OperationOutcome` resource.
pub fn operation_outcome(issues: &[Issue]) -> Value {
    json!({
        "resourceType": "OperationOutcome",
        "issue": issues.iter().map(Issue::to_json).collect::<Vec<_>>(),
    })
}

/// An informational OperationOutcome (for `Prefer: return=OperationOutcome`).
pub fn information(diagnostics: impl Into<String>) -> Value {
    operation_outcome(&[Issue {
        severity: Severity::Information,
        code: IssueType::Informational,
        diagnostics: diagnostics.into(),
        expression: None,
    }])
}

impl Severity {
    pub fn parse(s: &str) -> Option<Severity> {
        [Severity::Fatal, Severity::Error, Severity::Warning, Severity::Information]
            .into_iter()
            .find(|v| v.as_str() == s)
    }
}

impl IssueType {
    const ALL: [IssueType; 19] = [
        IssueType::Invalid,
        IssueType::Structure,
        IssueType::Required,
        IssueType::Value,
        IssueType::Invariant,
        IssueType::Security,
        IssueType::Login,
        IssueType::Forbidden,
        IssueType::Processing,
        IssueType::NotSupported,
        IssueType::Duplicate,
        IssueType::NotFound,
        IssueType::Deleted,
        IssueType::TooLong,
        IssueType::Conflict,
        IssueType::Throttled,
        IssueType::Transient,
        IssueType::Exception,
        IssueType::Informational,
    ];

    pub fn parse(s: &str) -> Option<IssueType> {
        IssueType::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

impl Issue {
    /// Parses one `OperationOutcome.issue` JSON object (the inverse of [`Issue::to_json`]).
    pub fn from_json(value: &Value) -> Option<Issue> {
        Some(Issue {
            severity: Severity::parse(value.get("severity")?.as_str()?)?,
            code: IssueType::parse(value.get("code")?.as_str()?)?,
            diagnostics: value.get("diagnostics").and_then(Value::as_str).unwrap_or_default().to_owned(),
            expression: value.get("expression").and_then(|e| e.get(0)).and_then(Value::as_str).map(str::to_owned),
        })
    }
}

/// At most `max_chars` characters of client input (then `…`), for echoing it in diagnostics
/// without letting a huge value through.
pub fn clip_to(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

/// [`clip_to`] 80 characters: the usual echo of a client value in a message.
pub fn clip(text: &str) -> String {
    clip_to(text, 80)
}
