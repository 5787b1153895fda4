//! The one closed set of error categories, mapped once to an HTTP status, a gRPC code and an
//! OperationOutcome issue type. Adapters and services translate *from* their own errors into
//! [`FhirError`]; nothing else decides a status code.

use std::fmt;

use fhirmesh_fhir::outcome::{self, Issue, IssueType};

/// Every way a request can fail, as seen by a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCategory {
    /// The request or resource is malformed or breaks a FHIR rule.
    Invalid,
    /// The request is well-formed but breaks a business rule (422).
    Unprocessable,
    NotFound,
    /// The resource existed and was deleted.
    Gone,
    Conflict,
    PreconditionFailed,
    Unauthorized,
    Forbidden,
    /// The interaction, parameter or feature is not supported.
    Unsupported,
    MethodNotAllowed,
    NotAcceptable,
    UnsupportedMediaType,
    TooLarge,
    TooManyRequests,
    Unavailable,
    Internal,
}

impl ErrorCategory {
    pub const ALL: [ErrorCategory; 16] = [
        ErrorCategory::Invalid,
        ErrorCategory::Unprocessable,
        ErrorCategory::NotFound,
        ErrorCategory::Gone,
        ErrorCategory::Conflict,
        ErrorCategory::PreconditionFailed,
        ErrorCategory::Unauthorized,
        ErrorCategory::Forbidden,
        ErrorCategory::Unsupported,
        ErrorCategory::MethodNotAllowed,
        ErrorCategory::NotAcceptable,
        ErrorCategory::UnsupportedMediaType,
        ErrorCategory::TooLarge,
        ErrorCategory::TooManyRequests,
        ErrorCategory::Unavailable,
        ErrorCategory::Internal,
    ];

    /// HTTP status code.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCategory::Invalid => 400,
            ErrorCategory::Unprocessable => 422,
            ErrorCategory::NotFound => 404,
            ErrorCategory::Gone => 410,
            ErrorCategory::Conflict => 409,
            ErrorCategory::PreconditionFailed => 412,
            ErrorCategory::Unauthorized => 401,
            ErrorCategory::Forbidden => 403,
            ErrorCategory::Unsupported => 400,
            ErrorCategory::MethodNotAllowed => 405,
            ErrorCategory::NotAcceptable => 406,
            ErrorCategory::UnsupportedMediaType => 415,
            ErrorCategory::TooLarge => 413,
            ErrorCategory::TooManyRequests => 429,
            ErrorCategory::Unavailable => 503,
            ErrorCategory::Internal => 500,
        }
    }

    /// gRPC status code number (google.rpc.Code).
    pub fn grpc_code(self) -> i32 {
        match self {
            ErrorCategory::Invalid
            | ErrorCategory::Unprocessable
            | ErrorCategory::NotAcceptable
            | ErrorCategory::UnsupportedMediaType => 3, // INVALID_ARGUMENT
            ErrorCategory::NotFound | ErrorCategory::Gone => 5, // NOT_FOUND
            ErrorCategory::Conflict => 10,                      // ABORTED
            ErrorCategory::PreconditionFailed => 9,             // FAILED_PRECONDITION
            ErrorCategory::Unauthorized => 16,                  // UNAUTHENTICATED
            ErrorCategory::Forbidden => 7,                      // PERMISSION_DENIED
            ErrorCategory::Unsupported | ErrorCategory::MethodNotAllowed => 12, // UNIMPLEMENTED
            ErrorCategory::TooLarge | ErrorCategory::TooManyRequests => 8, // RESOURCE_EXHAUSTED
            ErrorCategory::Unavailable => 14,                   // UNAVAILABLE
            ErrorCategory::Internal => 13,                      // INTERNAL
        }
    }

    /// Default OperationOutcome issue type for this category.
    pub fn issue_type(self) -> IssueType {
        match self {
            ErrorCategory::Invalid => IssueType::Invalid,
            ErrorCategory::Unprocessable => IssueType::Processing,
            ErrorCategory::NotFound => IssueType::NotFound,
            ErrorCategory::Gone => IssueType::Deleted,
            ErrorCategory::Conflict => IssueType::Conflict,
            ErrorCategory::PreconditionFailed => IssueType::Conflict,
            ErrorCategory::Unauthorized => IssueType::Login,
            ErrorCategory::Forbidden => IssueType::Forbidden,
            ErrorCategory::Unsupported
            | ErrorCategory::MethodNotAllowed
            | ErrorCategory::NotAcceptable
            | ErrorCategory::UnsupportedMediaType => IssueType::NotSupported,
            ErrorCategory::TooLarge => IssueType::TooLong,
            ErrorCategory::TooManyRequests => IssueType::Throttled,
            ErrorCategory::Unavailable => IssueType::Transient,
            ErrorCategory::Internal => IssueType::Exception,
        }
    }

    /// Stable name, used to carry the category across process boundaries (gRPC metadata).
    pub fn name(self) -> &'static str {
        match self {
            ErrorCategory::Invalid => "invalid",
            ErrorCategory::Unprocessable => "unprocessable",
            ErrorCategory::NotFound => "not-found",
            ErrorCategory::Gone => "gone",
            ErrorCategory::Conflict => "conflict",
            ErrorCategory::PreconditionFailed => "precondition-failed",
            ErrorCategory::Unauthorized => "unauthorized",
            ErrorCategory::Forbidden => "forbidden",
            ErrorCategory::Unsupported => "unsupported",
            ErrorCategory::MethodNotAllowed => "method-not-allowed",
            ErrorCategory::NotAcceptable => "not-acceptable",
            ErrorCategory::UnsupportedMediaType => "unsupported-media-type",
            ErrorCategory::TooLarge => "too-large",
            ErrorCategory::TooManyRequests => "too-many-requests",
            ErrorCategory::Unavailable => "unavailable",
            ErrorCategory::Internal => "internal",
        }
    }

    pub fn from_name(name: &str) -> Option<ErrorCategory> {
        ErrorCategory::ALL.into_iter().find(|c| c.name() == name)
    }
}

/// A failed request: a category plus the issues that explain it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FhirError {
    pub category: ErrorCategory,
    pub issues: Vec<Issue>,
}

impl FhirError {
    pub fn new(category: ErrorCategory, diagnostics: impl Into<String>) -> Self {
        FhirError { category, issues: vec![Issue::error(category.issue_type(), diagnostics)] }
    }

    pub fn with_issues(category: ErrorCategory, issues: Vec<Issue>) -> Self {
        debug_assert!(!issues.is_empty());
        FhirError { category, issues }
    }

    /// Sets the FHIRPath expression of the first issue.
    pub fn at(mut self, expression: impl Into<String>) -> Self {
        if let Some(first) = self.issues.first_mut() {
            first.expression = Some(expression.into());
        }
        self
    }

    pub fn invalid(diagnostics: impl Into<String>) -> Self {
        Self::new(ErrorCategory::Invalid, diagnostics)
    }

    pub fn not_found(diagnostics: impl Into<String>) -> Self {
        Self::new(ErrorCategory::NotFound, diagnostics)
    }

    /// 403: the caller is known but may not do this. Never name PHI in `diagnostics`.
    pub fn forbidden(diagnostics: impl Into<String>) -> Self {
        Self::new(ErrorCategory::Forbidden, diagnostics)
    }

    pub fn unsupported(diagnostics: impl Into<String>) -> Self {
        Self::new(ErrorCategory::Unsupported, diagnostics)
    }

    pub fn internal(diagnostics: impl Into<String>) -> Self {
        Self::new(ErrorCategory::Internal, diagnostics)
    }

    pub fn http_status(&self) -> u16 {
        self.category.http_status()
    }

    /// The `OperationOutcome` a client receives.
    pub fn to_operation_outcome(&self) -> serde_json::Value {
        outcome::operation_outcome(&self.issues)
    }

    /// Rebuilds an error from a category and an OperationOutcome (the inverse of
    /// [`FhirError::to_operation_outcome`]), used where an error crossed a process boundary.
    pub fn from_operation_outcome(category: ErrorCategory, outcome: &serde_json::Value) -> Self {
        let issues: Vec<Issue> = outcome
            .get("issue")
            .and_then(|i| i.as_array())
            .map(|issues| issues.iter().filter_map(outcome::Issue::from_json).collect())
            .unwrap_or_default();
        if issues.is_empty() {
            return FhirError::new(category, "remote service failed without details");
        }
        FhirError { category, issues }
    }
}

impl fmt::Display for FhirError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.category.name())?;
        if let Some(issue) = self.issues.first() {
            write!(f, ": {}", issue.diagnostics)?;
        }
        Ok(())
    }
}

impl std::error::Error for FhirError {}

pub type FhirResult<T> = Result<T, FhirError>;

/// `error` and each of its sources, `: `-separated — the whole story of a failure from a library
/// whose top-level messages say little (a transport error, a dispatch failure).
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn category_names_round_trip_and_are_unique() {
        for category in ErrorCategory::ALL {
            assert_eq!(ErrorCategory::from_name(category.name()), Some(category));
        }
        let mut names: Vec<_> = ErrorCategory::ALL.iter().map(|c| c.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), ErrorCategory::ALL.len());
    }

    #[test]
    fn every_client_error_is_4xx_and_server_error_5xx() {
        for category in ErrorCategory::ALL {
            let status = category.http_status();
            let server_side = matches!(category, ErrorCategory::Unavailable | ErrorCategory::Internal);
            assert_eq!(status >= 500, server_side, "{category:?} -> {status}");
        }
    }

    #[test]
    fn outcome_round_trips_issues() {
        let err = FhirError::invalid("bad element").at("Patient.name[0]");
        let back = FhirError::from_operation_outcome(err.category, &err.to_operation_outcome());
        assert_eq!(back, err);
    }

    #[test]
    fn a_chain_names_every_cause() {
        let outer = Wrapped(std::io::Error::other("connection reset"));
        assert_eq!(chain(&outer), "dispatch failure: connection reset");
    }

    #[derive(Debug)]
    struct Wrapped(std::io::Error);

    impl fmt::Display for Wrapped {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("dispatch failure")
        }
    }

    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }
}
