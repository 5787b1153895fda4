//! `FhirError` ⇄ `tonic::Status`: the one place errors cross the gRPC boundary.
//!
//! A status carries the category name in [`CATEGORY_METADATA_KEY`] and the OperationOutcome JSON
//! in [`OUTCOME_METADATA_KEY`]. Both travel in HTTP/2 trailers, which peers cap (16 KiB by default),
//! so the outcome is bounded: long diagnostics are clipped and surplus issues are summarised.

use fhirmesh_core::{ErrorCategory, FhirError};
use fhirmesh_fhir::outcome::{Issue, IssueType, Severity};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Status};

use crate::convert::clip;

/// ASCII metadata key holding [`ErrorCategory::name`].
pub const CATEGORY_METADATA_KEY: &str = "fhirmesh-category";
/// Binary metadata key holding the OperationOutcome JSON.
pub const OUTCOME_METADATA_KEY: &str = "fhirmesh-outcome-bin";

/// Budget for the encoded OperationOutcome (before base64).
const MAX_OUTCOME_BYTES: usize = 6 * 1024;
/// Longest `grpc-message` (it is percent-encoded, so up to three times this on the wire).
const MAX_MESSAGE_CHARS: usize = 512;
const MAX_DIAGNOSTICS_CHARS: usize = 2048;
const MAX_EXPRESSION_CHARS: usize = 512;

/// The status a server answers for `err`.
pub fn fhir_error_to_status(err: &FhirError) -> Status {
    let code = Code::from_i32(err.category.grpc_code());
    let message = err
        .issues
        .first()
        .map(|issue| clip(&issue.diagnostics, MAX_MESSAGE_CHARS))
        .unwrap_or_else(|| err.category.name().to_owned());
    let mut metadata = MetadataMap::new();
    metadata.insert(CATEGORY_METADATA_KEY, MetadataValue::from_static(err.category.name()));
    let outcome = bounded_outcome(err);
    metadata.insert_bin(OUTCOME_METADATA_KEY, MetadataValue::from_bytes(outcome.as_bytes()));
    Status::with_metadata(code, message, metadata)
}

/// The OperationOutcome JSON of `err`, within [`MAX_OUTCOME_BYTES`].
fn bounded_outcome(err: &FhirError) -> String {
    let full = err.to_operation_outcome().to_string();
    if full.len() <= MAX_OUTCOME_BYTES {
        return full;
    }
    // Keep the leading issues (clipped) that fit, leaving room for the summary issue.
    let mut kept = Vec::new();
    let mut used = 256;
    for issue in &err.issues {
        let issue = Issue {
            diagnostics: clip(&issue.diagnostics, MAX_DIAGNOSTICS_CHARS),
            expression: issue.expression.as_deref().map(|e| clip(e, MAX_EXPRESSION_CHARS)),
            ..issue.clone()
        };
        let size = issue.to_json().to_string().len() + 1;
        if used + size > MAX_OUTCOME_BYTES {
            break;
        }
        used += size;
        kept.push(issue);
    }
    let omitted = err.issues.len() - kept.len();
    if omitted > 0 {
        kept.push(Issue {
            severity: Severity::Information,
            code: IssueType::TooLong,
            diagnostics: format!("{omitted} more issues omitted"),
            expression: None,
        });
    }
    FhirError { category: err.category, issues: kept }.to_operation_outcome().to_string()
}

/// The error a client reports for a status received from the `service` service at `endpoint`.
///
/// A status from a fhirmesh server keeps its category and issues. Any other status (a proxy, a
/// transport failure, tonic's own limits) is mapped from its gRPC code.
pub fn status_to_fhir_error(status: &Status, service: &str, endpoint: &str) -> FhirError {
    if let Some(category) = status
        .metadata()
        .get(CATEGORY_METADATA_KEY)
        .and_then(|value| value.to_str().ok())
        .and_then(ErrorCategory::from_name)
    {
        let outcome = status
            .metadata()
            .get_bin(OUTCOME_METADATA_KEY)
            .and_then(|value| value.to_bytes().ok())
            .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok());
        return match outcome {
            Some(outcome) => FhirError::from_operation_outcome(category, &outcome),
            None if status.message().is_empty() => {
                FhirError::new(category, format!("the {service} service failed without details"))
            }
            None => FhirError::new(category, status.message()),
        };
    }

    let message = clip(status.message(), MAX_MESSAGE_CHARS);
    match status.code() {
        Code::Unavailable => FhirError::new(
            ErrorCategory::Unavailable,
            format!("{service} service unreachable at {endpoint}: {message}"),
        ),
        Code::DeadlineExceeded | Code::Cancelled => FhirError::new(
            ErrorCategory::Unavailable,
            format!("{service} service at {endpoint} did not answer in time: {message}"),
        ),
        Code::InvalidArgument => FhirError::new(ErrorCategory::Invalid, message),
        // tonic answers OUT_OF_RANGE when a message exceeds the size limit.
        Code::OutOfRange => FhirError::new(ErrorCategory::TooLarge, message),
        Code::NotFound => FhirError::new(ErrorCategory::NotFound, message),
        Code::AlreadyExists | Code::Aborted => FhirError::new(ErrorCategory::Conflict, message),
        Code::FailedPrecondition => FhirError::new(ErrorCategory::PreconditionFailed, message),
        Code::Unauthenticated => FhirError::new(ErrorCategory::Unauthorized, message),
        Code::PermissionDenied => FhirError::new(ErrorCategory::Forbidden, message),
        Code::Unimplemented => FhirError::new(ErrorCategory::Unsupported, message),
        Code::ResourceExhausted => FhirError::new(ErrorCategory::TooManyRequests, message),
        Code::Ok | Code::Unknown | Code::Internal | Code::DataLoss => {
            // The detail may come from anywhere: log it, do not hand it to the client.
            tracing::warn!(service, endpoint, code = ?status.code(), message = %message, "grpc call failed");
            FhirError::internal(format!("the {service} service failed ({})", status.code().description()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(err: &FhirError) -> FhirError {
        status_to_fhir_error(&fhir_error_to_status(err), "resource", "http://test")
    }

    #[test]
    fn every_category_survives_a_status() {
        for category in ErrorCategory::ALL {
            let err = FhirError::new(category, format!("{} happened", category.name())).at("Patient.name[0]");
            let status = fhir_error_to_status(&err);
            assert_eq!(status.code(), Code::from_i32(category.grpc_code()));
            assert_eq!(status.message(), format!("{} happened", category.name()));
            assert_eq!(round_trip(&err), err);
        }
    }

    #[test]
    fn huge_outcomes_are_bounded_and_summarised() {
        let issues = (0..5000)
            .map(|i| Issue::error(IssueType::Invalid, format!("problem number {i}")).at(format!("Bundle.entry[{i}]")))
            .collect();
        let err = FhirError::with_issues(ErrorCategory::Invalid, issues);
        let status = fhir_error_to_status(&err);
        let bytes = status.metadata().get_bin(OUTCOME_METADATA_KEY).expect("outcome").to_bytes().expect("base64");
        assert!(bytes.len() <= MAX_OUTCOME_BYTES, "{} bytes", bytes.len());
        let back = status_to_fhir_error(&status, "resource", "http://test");
        assert_eq!(back.category, ErrorCategory::Invalid);
        assert_eq!(back.issues[0], err.issues[0]);
        let last = back.issues.last().expect("summary issue");
        assert!(last.diagnostics.ends_with("more issues omitted"), "{}", last.diagnostics);

        let long = FhirError::invalid("d".repeat(100_000));
        let status = fhir_error_to_status(&long);
        assert!(status.message().len() <= MAX_MESSAGE_CHARS + 3);
        let back = status_to_fhir_error(&status, "resource", "http://test");
        assert!(back.issues[0].diagnostics.len() < 3000);
    }

    #[test]
    fn foreign_statuses_map_by_code() {
        let cases = [
            (Code::Unavailable, ErrorCategory::Unavailable),
            (Code::DeadlineExceeded, ErrorCategory::Unavailable),
            (Code::InvalidArgument, ErrorCategory::Invalid),
            (Code::OutOfRange, ErrorCategory::TooLarge),
            (Code::NotFound, ErrorCategory::NotFound),
            (Code::Aborted, ErrorCategory::Conflict),
            (Code::FailedPrecondition, ErrorCategory::PreconditionFailed),
            (Code::Unauthenticated, ErrorCategory::Unauthorized),
            (Code::PermissionDenied, ErrorCategory::Forbidden),
            (Code::Unimplemented, ErrorCategory::Unsupported),
            (Code::ResourceExhausted, ErrorCategory::TooManyRequests),
            (Code::Internal, ErrorCategory::Internal),
            (Code::Unknown, ErrorCategory::Internal),
        ];
        for (code, category) in cases {
            let err = status_to_fhir_error(&Status::new(code, "boom"), "resource", "http://test");
            assert_eq!(err.category, category, "{code:?}");
        }
        let err = status_to_fhir_error(&Status::unavailable("tcp connect error"), "resource", "http://x:1");
        assert_eq!(err.issues[0].diagnostics, "resource service unreachable at http://x:1: tcp connect error");
        let err = status_to_fhir_error(&Status::internal("secret stack trace"), "resource", "http://x:1");
        assert!(!err.issues[0].diagnostics.contains("secret"));
    }

    #[test]
    fn garbage_metadata_falls_back_without_panicking() {
        let mut metadata = MetadataMap::new();
        metadata.insert(CATEGORY_METADATA_KEY, MetadataValue::from_static("gone"));
        metadata.insert_bin(OUTCOME_METADATA_KEY, MetadataValue::from_bytes(b"not json"));
        let status = Status::with_metadata(Code::NotFound, "Patient/x was deleted", metadata);
        let err = status_to_fhir_error(&status, "resource", "http://test");
        assert_eq!(err, FhirError::new(ErrorCategory::Gone, "Patient/x was deleted"));

        let mut metadata = MetadataMap::new();
        metadata.insert(CATEGORY_METADATA_KEY, MetadataValue::from_static("no-such-category"));
        let status = Status::with_metadata(Code::NotFound, "missing", metadata);
        assert_eq!(status_to_fhir_error(&status, "resource", "http://test").category, ErrorCategory::NotFound);
    }
}
