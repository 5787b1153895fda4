//! SDK failures → [`StoreError`]: the transport, throttling and server-side failures a retry may
//! cure are `Unavailable` (503 with Retry-After at the API); the rest is `Internal`.

use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use fhirmesh_core::export::JobError;
use fhirmesh_core::ports::StoreError;

/// Service error codes that mean "try again later", not "this request is wrong".
const TRANSIENT_CODES: &[&str] = &[
    "ProvisionedThroughputExceededException",
    "ThrottlingException",
    "RequestLimitExceeded",
    "InternalServerError",
    "ServiceUnavailable",
    "LimitExceededException",
];

/// A request the SDK's builder refused (a missing required field): a bug, not the caller's.
pub(crate) fn build_error(err: impl std::fmt::Display) -> StoreError {
    StoreError::Internal(format!("cannot build a DynamoDB request: {err}"))
}

pub(crate) fn sdk_error<E, R>(what: &str, err: SdkError<E, R>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    match &err {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            StoreError::Unavailable(format!("DynamoDB {what}: {}", fhirmesh_core::error::chain(&err)))
        }
        SdkError::ServiceError(service) => {
            let code = service.err().code().unwrap_or("unknown");
            let message = service.err().message().unwrap_or("");
            if TRANSIENT_CODES.contains(&code) {
                StoreError::Unavailable(format!("DynamoDB {what}: {code} {message}"))
            } else {
                StoreError::Internal(format!("DynamoDB {what}: {code} {message}"))
            }
        }
        _ => StoreError::Internal(format!("DynamoDB {what}: {}", fhirmesh_core::error::chain(&err))),
    }
}

/// The same mapping for the export job store: what a retry may cure is `Unavailable`, anything
/// else (including items that do not decode) `Internal`.
pub(crate) fn job_error(err: StoreError) -> JobError {
    match err {
        StoreError::Unavailable(message) => JobError::Unavailable(message),
        StoreError::Internal(message) => JobError::Internal(message),
        other @ (StoreError::Conflict { .. } | StoreError::Unsupported(_)) => JobError::Internal(other.to_string()),
    }
}

/// Whether the request may have reached DynamoDB and been applied although no answer came back.
pub(crate) fn is_indeterminate<E, R>(err: &SdkError<E, R>) -> bool {
    matches!(err, SdkError::TimeoutError(_) | SdkError::ResponseError(_) | SdkError::DispatchFailure(_))
}
