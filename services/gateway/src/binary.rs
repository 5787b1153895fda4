//! `Binary` content negotiation (R4 http.html#binary): a `Binary` written with a non-FHIR
//! `Content-Type` is its raw content; one read with an `Accept` that names no FHIR format is
//! answered with the raw content in the Binary's own `contentType`. Everything else — FHIR JSON
//! in, FHIR JSON out, `_format` given — is the ordinary interaction.
//!
//! - `POST [base]/Binary`, `PUT [base]/Binary/[id]` with e.g. `Content-Type: image/png`: the body
//!   becomes `Binary.data` (base64) and the type `Binary.contentType`; `X-Security-Context`
//!   (a reference) becomes `Binary.securityContext`. The content is capped at three quarters of
//!   `max_body_bytes` less 1 KiB (it is stored base64-encoded inside the resource): 413 beyond.
//! - `GET [base]/Binary/[id]` and `…/_history/[vid]` with an `Accept` such as `*/*` or
//!   `image/png`: the decoded bytes, `Content-Type` = `contentType`, with `ETag`,
//!   `Last-Modified` and `X-Security-Context`.
//!
//! Done as a middleware around routing, so a raw request is otherwise the ordinary interaction:
//! authentication, tenancy, validation, versioning, errors and headers are the same. The content
//! is stored inline in the resource (the resource store holds it base64-encoded).

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use base64::Engine;
use fhirmesh_core::FhirError;
use http::header::{ACCEPT, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use serde_json::{Value, json};

use crate::SharedGateway;
use crate::handlers::read_body_up_to;
use crate::negotiate;
use crate::response::error_response;

const SECURITY_CONTEXT: &str = "x-security-context";

/// Whether a read asks for the raw content: an `Accept` header naming no FHIR format, and no
/// `_format` parameter.
fn wants_raw(headers: &HeaderMap, query: Option<&str>) -> bool {
    let format_given = query.is_some_and(|q| form_urlencoded::parse(q.as_bytes()).any(|(k, _)| k == "_format"));
    let Some(accept) = headers.get(ACCEPT).and_then(|v| v.to_str().ok()) else { return false };
    let media: Vec<String> = accept
        .split(',')
        .map(|item| item.split(';').next().unwrap_or_default().trim().to_ascii_lowercase())
        .filter(|media| !media.is_empty())
        .collect();
    // An empty Accept is no Accept.
    !format_given && !media.is_empty() && !media.iter().any(|media| negotiate::is_fhir_media(media))
}

/// Whether a write carries raw content: a `Content-Type` that is not a FHIR format.
fn is_raw_body(headers: &HeaderMap) -> bool {
    let Some(content_type) = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()) else { return false };
    let media = content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    !media.is_empty() && !negotiate::is_fhir_media(&media)
}

/// The middleware: turns raw Binary writes into FHIR ones before routing, and FHIR answers into
/// raw ones for reads that asked for raw content; everything else passes untouched.
pub(crate) async fn negotiate(State(gw): State<SharedGateway>, request: Request, next: Next) -> Response {
    let path = request.uri().path().trim_start_matches('/').to_owned();
    let segments: Vec<&str> = path.split('/').collect();
    if segments.first() != Some(&"Binary") {
        return next.run(request).await;
    }
    let method = request.method().clone();
    let read = method == Method::GET && (segments.len() == 2 || (segments.len() == 4 && segments[2] == "_history"));
    if read && wants_raw(request.headers(), request.uri().query()) {
        // The FHIR answer, then its content: auth, tenancy, errors and headers stay the read's.
        let mut request = request;
        request.headers_mut().remove(ACCEPT);
        return to_raw(next.run(request).await).await;
    }
    let write = (method == Method::POST && segments.len() == 1) || (method == Method::PUT && segments.len() == 2);
    if write && is_raw_body(request.headers()) {
        let id = segments.get(1).map(|id| (*id).to_owned());
        let (mut parts, body) = request.into_parts();
        return match raw_to_resource(&gw, &parts.headers, id.as_deref(), body).await {
            Ok(json) => {
                parts.headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/fhir+json"));
                parts.headers.remove(CONTENT_LENGTH);
                next.run(Request::from_parts(parts, Body::from(json))).await
            }
            Err(error) => error_response(&error, false),
        };
    }
    next.run(request).await
}

/// A read's FHIR answer turned into the Binary's raw content (errors pass as they are).
async fn to_raw(response: Response) -> Response {
    if response.status() != StatusCode::OK {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let decoded = async {
        let bytes = axum::body::to_bytes(body, usize::MAX)
            .await
            .map_err(|e| FhirError::internal(format!("reading the Binary: {e}")))?;
        decode(&bytes)
    }
    .await;
    let (content_type, data, security_context) = match decoded {
        Ok(decoded) => decoded,
        Err(error) => return error_response(&error, false),
    };
    let content_type =
        HeaderValue::from_str(&content_type).unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream"));
    parts.headers.insert(CONTENT_TYPE, content_type);
    parts.headers.remove(CONTENT_LENGTH);
    if let Some(reference) = security_context.and_then(|r| HeaderValue::from_str(&r).ok()) {
        parts.headers.insert(SECURITY_CONTEXT, reference);
    }
    Response::from_parts(parts, Body::from(data))
}

/// (contentType, decoded data, securityContext reference) of a Binary's JSON.
fn decode(body: &[u8]) -> Result<(String, Vec<u8>, Option<String>), FhirError> {
    let resource: Value =
        serde_json::from_slice(body).map_err(|e| FhirError::internal(format!("stored Binary is not JSON: {e}")))?;
    let content_type = resource["contentType"].as_str().unwrap_or("application/octet-stream").to_owned();
    let data = match resource["data"].as_str() {
        Some(text) => base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|e| FhirError::internal(format!("stored Binary.data is not base64: {e}")))?,
        None => Vec::new(),
    };
    let security_context = resource["securityContext"]["reference"].as_str().map(str::to_owned);
    Ok((content_type, data, security_context))
}

/// `type/subtype` (with optional parameters), both RFC 7230 tokens.
fn is_media_type(value: &str) -> bool {
    let essence = value.split(';').next().unwrap_or_default().trim();
    let token = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b));
    matches!(essence.split_once('/'), Some((kind, sub)) if token(kind) && token(sub))
}

/// The Binary resource (JSON) a raw write stands for.
async fn raw_to_resource(
    gw: &SharedGateway,
    headers: &HeaderMap,
    id: Option<&str>,
    body: Body,
) -> Result<Vec<u8>, FhirError> {
    let content_type = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .ok_or_else(|| FhirError::invalid("a raw Binary needs a Content-Type"))?
        .to_owned();
    if !is_media_type(&content_type) {
        return Err(FhirError::invalid(format!(
            "Content-Type '{}' is not a media type such as application/pdf",
            fhirmesh_fhir::outcome::clip(&content_type)
        )));
    }
    // Stored base64-encoded inside the resource, which must fit the request limit itself.
    let limit = (gw.config.max_body_bytes / 4 * 3).saturating_sub(1024);
    let bytes = read_body_up_to(limit, headers, body).await?;
    let mut resource = json!({
        "resourceType": "Binary",
        "contentType": content_type,
        "data": base64::engine::general_purpose::STANDARD.encode(&bytes),
    });
    if let Some(id) = id {
        resource["id"] = json!(id);
    }
    if let Some(reference) = headers.get(SECURITY_CONTEXT) {
        let reference = reference.to_str().map_err(|_| FhirError::invalid("X-Security-Context is not ASCII"))?;
        resource["securityContext"] = json!({ "reference": reference.trim() });
    }
    serde_json::to_vec(&resource).map_err(|e| FhirError::internal(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn reads_are_raw_unless_a_fhir_format_is_asked_for() {
        assert!(wants_raw(&headers(&[("accept", "image/png")]), None));
        assert!(wants_raw(&headers(&[("accept", "*/*")]), None));
        assert!(wants_raw(&headers(&[("accept", "text/html,application/xhtml+xml,*/*;q=0.8")]), None));
        assert!(!wants_raw(&headers(&[]), None), "no Accept: the FHIR resource");
        assert!(!wants_raw(&headers(&[("accept", "")]), None), "an empty Accept is none");
        assert!(!wants_raw(&headers(&[("accept", "application/fhir+json")]), None));
        assert!(!wants_raw(&headers(&[("accept", "application/json, */*")]), None));
        assert!(!wants_raw(&headers(&[("accept", "application/fhir+xml")]), None), "XML is FHIR: 406 later");
        assert!(!wants_raw(&headers(&[("accept", "*/*")]), Some("_format=json")));
    }

    #[test]
    fn media_types_are_type_slash_subtype() {
        assert!(is_media_type("application/pdf"));
        assert!(is_media_type("text/plain; charset=utf-8"));
        assert!(is_media_type("application/vnd.ms-excel"));
        for bad in ["not a media type", "text", "/plain", "text/", "a/b/c", "te xt/plain"] {
            assert!(!is_media_type(bad), "{bad}");
        }
    }

    #[test]
    fn writes_are_raw_unless_their_content_type_is_fhir() {
        assert!(is_raw_body(&headers(&[("content-type", "application/pdf")])));
        assert!(is_raw_body(&headers(&[("content-type", "text/plain; charset=utf-8")])));
        assert!(!is_raw_body(&headers(&[("content-type", "application/fhir+json; fhirVersion=4.0")])));
        assert!(!is_raw_body(&headers(&[("content-type", "application/json")])));
        assert!(!is_raw_body(&headers(&[])));
    }
}
