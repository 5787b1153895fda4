//! Bulk Data `$export` over HTTP (Bulk Data Access IG 2.0.0): the kick-off endpoints, the status
//! URL (`GET` for progress or the manifest, `DELETE` to cancel) and the file downloads. The work
//! itself is the [`fhirmesh_core::export::ExportService`]'s.
//!
//! - `GET|POST [base]/$export`, `[base]/Patient/$export`, `[base]/Group/[id]/$export` with
//!   `Prefer: respond-async` → 202 with `Content-Location: [base]/$export-status/[job]`.
//! - `GET [base]/$export-status/[job]` → 202 with `X-Progress` and `Retry-After` while running,
//!   200 with the manifest (`application/json`) when complete, 500 with an OperationOutcome when
//!   it failed; `DELETE` → 202 (cancelled, files removed).
//! - `GET [base]/$export-file/[job]/[file]` → the NDJSON file, streamed, with the caller's token
//!   checked like any request (`requiresAccessToken`).

use axum::body::Body;
use axum::extract::{Path, State};
use axum::response::Response;
use fhirmesh_core::FhirError;
use fhirmesh_core::export::{DynExportService, ExportLevel, ExportStatus, KickOff, request::parameters_from_body};
use fhirmesh_fhir::outcome::information;
use futures::StreamExt;
use http::header::{CONTENT_LOCATION, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};

use crate::SharedGateway;
use crate::handlers::{Caller, Prelude, read_body};
use crate::negotiate;
use crate::response::{error_response, json_response};

/// How long clients are told to wait between status polls.
const POLL_SECONDS: &str = "2";

pub(crate) async fn kick_off_system(
    State(gw): State<SharedGateway>,
    prelude: Prelude,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    kick_off(gw, ExportLevel::System, "$export", prelude, &method, &uri, &headers, body).await
}

pub(crate) async fn kick_off_patient(
    State(gw): State<SharedGateway>,
    prelude: Prelude,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    kick_off(gw, ExportLevel::Patient, "Patient/$export", prelude, &method, &uri, &headers, body).await
}

pub(crate) async fn kick_off_group(
    State(gw): State<SharedGateway>,
    Path(id): Path<String>,
    prelude: Prelude,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let path = format!("Group/{id}/$export");
    kick_off(gw, ExportLevel::Group { id }, &path, prelude, &method, &uri, &headers, body).await
}

#[allow(clippy::too_many_arguments)]
async fn kick_off(
    gw: SharedGateway,
    level: ExportLevel,
    path: &str,
    prelude: Prelude,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let exports = export_service(&gw)?;
        if !negotiate::prefers(headers, "respond-async") {
            return Err(FhirError::invalid(
                "$export runs asynchronously: send the header Prefer: respond-async, then poll the status URL",
            ));
        }
        let mut params = prelude.params.clone();
        if method == Method::POST {
            negotiate::check_json_body(headers)?;
            let bytes = read_body(&gw, headers, body).await?;
            let parameters: serde_json::Value = serde_json::from_slice(&bytes)
                .map_err(|e| FhirError::invalid(format!("the request body is not JSON: {e}")))?;
            params.extend(parameters_from_body(&parameters)?);
        }
        let request_url = match uri.query() {
            Some(query) => format!("{}/{path}?{query}", prelude.base),
            None => format!("{}/{path}", prelude.base),
        };
        let lenient = negotiate::prefers(headers, "handling=lenient");
        exports.kick_off(&prelude.ctx, KickOff { level, params, lenient, request_url }).await
    }
    .await;
    match result {
        Ok(job) => {
            let status_url = format!("{}/$export-status/{job}", prelude.base);
            let outcome = information(format!("export job {job} accepted; poll {status_url}"));
            let mut response = json_response(StatusCode::ACCEPTED, &outcome, prelude.pretty);
            if let Ok(value) = HeaderValue::from_str(&status_url) {
                response.headers_mut().insert(CONTENT_LOCATION, value);
            }
            response
        }
        Err(error) => prelude.fail(error),
    }
}

/// The export service, or why there is none.
fn export_service(gw: &SharedGateway) -> Result<DynExportService, FhirError> {
    gw.exports.clone().ok_or_else(|| FhirError::unsupported("$export is not available on this server"))
}

pub(crate) async fn status(State(gw): State<SharedGateway>, Path(job): Path<String>, prelude: Prelude) -> Response {
    let exports = match export_service(&gw) {
        Ok(exports) => exports,
        Err(error) => return prelude.fail(error),
    };
    match exports.status(&prelude.ctx, &job).await {
        Ok(ExportStatus::InProgress { progress }) => {
            let mut response = Response::new(Body::empty());
            *response.status_mut() = StatusCode::ACCEPTED;
            let headers = response.headers_mut();
            headers.insert(RETRY_AFTER, HeaderValue::from_static(POLL_SECONDS));
            if let Ok(value) = HeaderValue::from_str(&progress) {
                headers.insert("x-progress", value);
            }
            response
        }
        Ok(ExportStatus::Complete(mut manifest)) => {
            // This gateway serves the downloads: whether they need the token is its call (in
            // the mesh the exporter's own auth settings may differ). Presigned URLs carry their
            // own authorization; S3 refuses a request that also sends a bearer token.
            let presigned = !manifest.presigned.is_empty() && manifest.all_presigned();
            manifest.requires_access_token = gw.config.auth.is_some() && !presigned;
            let base = prelude.base.clone();
            let json = manifest.to_json(|job, name| format!("{base}/$export-file/{job}/{name}"));
            let mut response = json_response(StatusCode::OK, &json, prelude.pretty);
            response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
        Ok(ExportStatus::Failed(error)) => prelude.fail(error),
        Err(error) => prelude.fail(error),
    }
}

pub(crate) async fn cancel(State(gw): State<SharedGateway>, Path(job): Path<String>, prelude: Prelude) -> Response {
    let exports = match export_service(&gw) {
        Ok(exports) => exports,
        Err(error) => return prelude.fail(error),
    };
    match exports.cancel(&prelude.ctx, &job).await {
        Ok(()) => json_response(
            StatusCode::ACCEPTED,
            &information(format!("export job {job} cancelled; its files are removed")),
            prelude.pretty,
        ),
        Err(error) => prelude.fail(error),
    }
}

pub(crate) async fn download(
    State(gw): State<SharedGateway>,
    Path((job, file)): Path<(String, String)>,
    caller: Caller,
) -> Response {
    let exports = match export_service(&gw) {
        Ok(exports) => exports,
        Err(error) => return error_response(&error, false),
    };
    match exports.download(&caller.ctx, &job, &file).await {
        Ok(blob) => {
            let size = blob.info.size;
            let body = Body::from_stream(blob.body.map(|chunk| chunk.map_err(std::io::Error::other)));
            let mut response = Response::new(body);
            let headers = response.headers_mut();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static(fhirmesh_core::export::worker::NDJSON));
            headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(size));
            response
        }
        Err(error) => error_response(&error, false),
    }
}
