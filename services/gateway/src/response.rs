//! Building HTTP responses: resources with their headers, OperationOutcomes for every error.

use std::any::Any;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use fhirmesh_core::{FhirError, ResourceVersion};
use fhirmesh_fhir::elements::{apply_elements, apply_summary};
use http::header::{CONTENT_TYPE, ETAG, LAST_MODIFIED, LOCATION};
use http::{HeaderValue, StatusCode};
use serde_json::Value;

use crate::negotiate::Presentation;

pub(crate) const FHIR_JSON: &str = "application/fhir+json; charset=utf-8";

/// Serialises JSON, pretty when asked.
pub(crate) fn json_bytes(value: &Value, pretty: bool) -> Bytes {
    json_bytes_of(value, pretty)
}

/// Serialises anything serde can, pretty when asked. The types serialised here have string keys
/// only, so serialisation cannot fail.
pub(crate) fn json_bytes_of<T: serde::Serialize>(value: &T, pretty: bool) -> Bytes {
    let out = if pretty { serde_json::to_vec_pretty(value) } else { serde_json::to_vec(value) };
    Bytes::from(out.unwrap_or_default())
}

/// A JSON body already serialised.
pub(crate) fn bytes_response(status: StatusCode, body: Bytes) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    response
}

pub(crate) fn json_response(status: StatusCode, value: &Value, pretty: bool) -> Response {
    bytes_response(status, json_bytes(value, pretty))
}

/// The OperationOutcome response for an error.
pub(crate) fn error_response(error: &FhirError, pretty: bool) -> Response {
    let status = StatusCode::from_u16(error.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if status.is_server_error() {
        tracing::warn!(error = %error, "request failed");
    }
    let mut response = json_response(status, &error.to_operation_outcome(), pretty);
    let retry_after = match status {
        // A backend outage or overload: safe to retry shortly.
        StatusCode::SERVICE_UNAVAILABLE => Some(RETRY_AFTER_SECONDS),
        // A limit on work in progress (running exports): retry once some has finished.
        StatusCode::TOO_MANY_REQUESTS => Some(RETRY_AFTER_LIMITED_SECONDS),
        _ => None,
    };
    if let Some(seconds) = retry_after {
        response.headers_mut().insert(http::header::RETRY_AFTER, HeaderValue::from_static(seconds));
    }
    response
}

/// What a 503 tells clients to wait before retrying.
const RETRY_AFTER_SECONDS: &str = "2";
/// What a 429 tells clients to wait before retrying.
const RETRY_AFTER_LIMITED_SECONDS: &str = "30";

/// A stored resource shaped by `_summary`/`_elements`/`_pretty`, as bytes.
pub(crate) fn shaped_body(body: &Bytes, presentation: &Presentation) -> Result<Bytes, FhirError> {
    if presentation.is_plain() {
        return Ok(body.clone());
    }
    Ok(json_bytes(&shaped_value(body, presentation)?, presentation.pretty))
}

/// A stored resource parsed and shaped by `_summary`/`_elements`.
pub(crate) fn shaped_value(body: &Bytes, presentation: &Presentation) -> Result<Value, FhirError> {
    let mut value: Value = serde_json::from_slice(body)
        .map_err(|err| FhirError::internal(format!("stored resource is not JSON: {err}")))?;
    if let Some(mode) = presentation.summary {
        value = apply_summary(&value, mode);
    }
    if let Some(elements) = &presentation.elements {
        let names: Vec<&str> = elements.iter().map(String::as_str).collect();
        value = apply_elements(&value, &names);
    }
    Ok(value)
}

/// Sets ETag and Last-Modified for a version.
pub(crate) fn version_headers(response: &mut Response, version: &ResourceVersion) {
    let headers = response.headers_mut();
    if let Ok(etag) = HeaderValue::from_str(&version.etag()) {
        headers.insert(ETAG, etag);
    }
    let modified = httpdate::fmt_http_date(version.last_updated.into());
    if let Ok(modified) = HeaderValue::from_str(&modified) {
        headers.insert(LAST_MODIFIED, modified);
    }
}

pub(crate) fn set_location(response: &mut Response, url: &str) {
    if let Ok(value) = HeaderValue::from_str(url) {
        response.headers_mut().insert(LOCATION, value);
    }
}

/// A resource version as the response body, with its headers.
pub(crate) fn resource_response(
    status: StatusCode,
    version: &ResourceVersion,
    presentation: &Presentation,
) -> Response {
    let Some(body) = &version.body else {
        return error_response(&FhirError::internal("a deleted version has no body"), presentation.pretty);
    };
    match shaped_body(body, presentation) {
        Ok(bytes) => {
            let mut response = Response::new(Body::from(bytes));
            *response.status_mut() = status;
            response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
            version_headers(&mut response, version);
            response
        }
        Err(error) => error_response(&error, presentation.pretty),
    }
}

/// Turns a panic inside a handler into a 500 OperationOutcome (the panic itself is a bug).
pub(crate) fn panic_response(panic: Box<dyn Any + Send + 'static>) -> Response {
    let detail = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic");
    tracing::error!(panic = detail, "handler panicked");
    error_response(&FhirError::internal("the server failed while handling this request"), false).into_response()
}
