//! This adapter's errors and their one mapping onto the port's [`StoreError`].

use fhirmesh_core::export::JobError;
use fhirmesh_core::ports::StoreError;
use rusqlite::ErrorCode;

/// Failures inside the adapter; converted to [`StoreError`] at the trait boundary.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    #[error("sqlite: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored row that does not decode (unknown type name, bad id, negative version, ...).
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
    /// Input the contract forbids (e.g. a version that does not follow the current one).
    #[error("invalid input: {0}")]
    Invalid(String),
}

impl From<Error> for StoreError {
    fn from(err: Error) -> Self {
        match err {
            Error::Store(store) => store,
            Error::Sql(sql) => match sql.sqlite_error_code() {
                Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
                    StoreError::Unavailable(format!("sqlite: {sql}"))
                }
                _ => StoreError::Internal(format!("sqlite: {sql}")),
            },
            other @ (Error::Corrupt(_) | Error::Invalid(_)) => StoreError::Internal(other.to_string()),
        }
    }
}

/// The same mapping for the export job store: busy or locked is `Unavailable`, anything else
/// (including stored data that does not decode) `Internal`.
impl From<Error> for JobError {
    fn from(err: Error) -> Self {
        match StoreError::from(err) {
            StoreError::Unavailable(message) => JobError::Unavailable(message),
            StoreError::Internal(message) => JobError::Internal(message),
            other @ (StoreError::Conflict { .. } | StoreError::Unsupported(_)) => JobError::Internal(other.to_string()),
        }
    }
}

pub(crate) type Result<T, E = Error> = std::result::Result<T, E>;
