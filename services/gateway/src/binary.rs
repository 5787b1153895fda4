//! `Binary` content negotiation (R4 http.html#binary): a `Binary` written with a non-FHIR
//! `Content-Type` is its raw content; one read with an `Accept` that names no FHIR format is
//! answered with the raw content in the Binary's own `contentType`. Everything else — FHIR JSON
//! in, FHIR JSON out, `_format` given — is the ordinary interaction.
//!
//! - `POST [base]/Binary`, `PUT [base]/Binary/[id]` with e.g. `Content-Type: image/png`: the type
//!   becomes `Binary.contentType` and `X-Security-Context` (a reference) `Binary.securityContext`.
//!   Content announced (`Content-Length`) up to the inline size is stored in the resource as
//!   base64 `Binary.data`. Larger or unannounced content is streamed to the Binary content
//!   service (the blob store), never held whole in memory, up to its cap (413 beyond, nothing
//!   kept), and the resource points to it (`fhirmesh_core::binary`); if the write then fails,
//!   the content is removed again. Without a content service every Binary is inline, capped at
//!   three quarters of `max_body_bytes` less 1 KiB.
//! - `GET [base]/Binary/[id]` and `…/_history/[vid]` with an `Accept` such as `*/*` or
//!   `image/png`: the content (streamed from the blob store when it is there), `Content-Type` =
//!   `contentType`, with `ETag`, `Last-Modified` and `X-Security-Context`.
//!
//! Done as a middleware between authentication and the handlers, so a raw request is otherwise
//! the ordinary interaction: tenancy, authorization, validation, versioning, errors and headers
//! are the same.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use base64::Engine;
use fhirmesh_core::binary::{CONTENT_EXTENSION, ContentRef};
use fhirmesh_core::blob::put_body;
use fhirmesh_core::{ErrorCategory, FhirError, RequestContext};
use futures::TryStreamExt;
use http::header::{ACCEPT, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use serde_json::{Value, json};

use crate::handlers::{Caller, discard, read_body_up_to};
use crate::negotiate;
use crate::response::error_response;
use crate::{BinaryApi, SharedGateway};

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
        let (mut parts, body) = request.into_parts();
        parts.headers.remove(ACCEPT);
        let ctx = Caller::new(&gw, &parts).ctx;
        return to_raw(&gw, &ctx, next.run(Request::from_parts(parts, body)).await).await;
    }
    let write = (method == Method::POST && segments.len() == 1) || (method == Method::PUT && segments.len() == 2);
    if read {
        let (parts, body) = request.into_parts();
        let caller = Caller::new(&gw, &parts);
        let response = next.run(Request::from_parts(parts, body)).await;
        return with_content_links(&gw, &caller, response).await;
    }
    if let Some((api, expires_in)) = gw.config.binaries.as_ref().and_then(|api| Some((api, api.presign_expiry?)))
        && write
        && !is_raw_body(request.headers())
    {
        return presigned_upload(&gw, api, expires_in, request, next).await;
    }
    if write && is_raw_body(request.headers()) {
        let id = segments.get(1).map(|id| (*id).to_owned());
        let (mut parts, body) = request.into_parts();
        let stream_to = gw.config.binaries.as_ref().filter(|api| !fits_inline(&parts.headers, api.inline_max_bytes));
        let written = match stream_to {
            Some(api) => {
                stored_to_resource(api, Caller::new(&gw, &parts).ctx, &parts.headers, id.as_deref(), body).await
            }
            None => inline_to_resource(&gw, &parts.headers, id.as_deref(), body).await,
        };
        let written = match written {
            Ok(written) => written,
            Err(error) => return error_response(&error, false),
        };
        parts.headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/fhir+json"));
        parts.headers.remove(CONTENT_LENGTH);
        if let Some((content, _)) = &written.stored {
            parts.extensions.insert(Uploaded(content.key.clone()));
        }
        let response = next.run(Request::from_parts(parts, Body::from(written.json))).await;
        if let (Some((content, ctx)), Some(api)) = (written.stored, &gw.config.binaries)
            && !response.status().is_success()
        {
            // No version points to it: remove it (in the background; the answer does not wait).
            let service = api.service.clone();
            tokio::spawn(async move {
                if let Err(error) = service.discard(&ctx, &content).await {
                    tracing::warn!(key = %content.key, ?error, "could not remove the content of a failed Binary write");
                }
            });
        }
        return response;
    }
    next.run(request).await
}

/// A FHIR read of a Binary whose content is stored: the pointer gains a `url` part, where the
/// content is fetched (the version's raw URL, with a non-FHIR `Accept`), and in presigned mode the
/// answer gains `presignedGetUrl` (as FHIR Works on AWS answered). Inline Binaries pass untouched.
async fn with_content_links(gw: &SharedGateway, caller: &Caller, response: Response) -> Response {
    if response.status() != StatusCode::OK {
        return response;
    }
    let (parts, body) = response.into_parts();
    let bytes = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(bytes) => bytes,
        Err(e) => return error_response(&FhirError::internal(format!("reading the Binary: {e}")), false),
    };
    let mut resource: Value = match serde_json::from_slice(&bytes) {
        Ok(resource) => resource,
        Err(_) => return Response::from_parts(parts, Body::from(bytes)),
    };
    let linked = async {
        let Some(pointer) = ContentRef::of(&resource)? else { return Ok(None) };
        let id = resource["id"].as_str().unwrap_or_default();
        let version = resource["meta"]["versionId"].as_str().unwrap_or_default();
        let url = format!("{}/Binary/{id}/_history/{version}", caller.base);
        let extensions = resource["_data"]["extension"].as_array_mut().into_iter().flatten();
        if let Some(parts) =
            extensions.filter(|e| e["url"] == CONTENT_EXTENSION).find_map(|e| e["extension"].as_array_mut())
        {
            parts.retain(|part| part["url"] != "url");
            parts.push(json!({"url": "url", "valueUrl": url}));
        }
        if let Some(api) = &gw.config.binaries
            && let Some(expires_in) = api.presign_expiry
            && let Some(url) = api.service.presign_download(&caller.ctx, &pointer, expires_in).await?
        {
            resource["presignedGetUrl"] = json!(url.url);
        }
        to_json(&resource).map(Some)
    }
    .await;
    match linked {
        Ok(Some(json)) => json_answer(parts, json),
        Ok(None) => Response::from_parts(parts, Body::from(bytes)),
        Err(error) => error_response(&error, false),
    }
}

/// Presigned mode, a FHIR JSON create or update of a Binary without content: content is allocated
/// for the client to upload to S3 itself, the Binary points to it, and the answer gains
/// `presignedPutUrl` (send the Binary's `contentType` as `Content-Type` with the upload). Anything
/// else passes as it is.
async fn presigned_upload(
    gw: &SharedGateway,
    api: &BinaryApi,
    expires_in: std::time::Duration,
    request: Request,
    next: Next,
) -> Response {
    let (mut parts, body) = request.into_parts();
    let bytes = match read_body_up_to(gw.config.max_body_bytes, &parts.headers, body).await {
        Ok(bytes) => bytes,
        Err(error) => return error_response(&error, false),
    };
    let parsed: Option<Value> = serde_json::from_slice(&bytes).ok();
    let without_content = parsed.as_ref().is_some_and(|resource| {
        resource["resourceType"] == "Binary" && resource.get("data").is_none() && resource.get("_data").is_none()
    });
    let (Some(mut resource), true) = (parsed, without_content) else {
        return next.run(Request::from_parts(parts, Body::from(bytes))).await;
    };
    let Some(content_type) = resource["contentType"].as_str().map(str::to_owned) else {
        let error = FhirError::invalid("a Binary needs a contentType (the type its content is uploaded with)")
            .at("Binary.contentType");
        return error_response(&error, false);
    };
    let ctx = Caller::new(gw, &parts).ctx;
    let (content, url) = match api.service.presign_upload(&ctx, &content_type, expires_in).await {
        Ok(Some(presigned)) => presigned,
        Ok(None) => return next.run(Request::from_parts(parts, Body::from(bytes))).await,
        Err(error) => return error_response(&error, false),
    };
    content.attach(&mut resource);
    let json = match to_json(&resource) {
        Ok(json) => json,
        Err(error) => return error_response(&error, false),
    };
    parts.headers.remove(CONTENT_LENGTH);
    parts.extensions.insert(Uploaded(content.key.clone()));
    let response = next.run(Request::from_parts(parts, Body::from(json))).await;
    if !response.status().is_success() {
        return response;
    }
    let (parts, body) = response.into_parts();
    let answered =
        axum::body::to_bytes(body, usize::MAX).await.ok().and_then(|b| serde_json::from_slice::<Value>(&b).ok());
    let mut answered = answered.unwrap_or_else(|| json!({}));
    if answered.is_object() {
        answered["presignedPutUrl"] = json!(url.url);
    }
    match to_json(&answered) {
        Ok(json) => json_answer(parts, json),
        Err(error) => error_response(&error, false),
    }
}

/// `parts` of a FHIR JSON answer with `json` as its body.
fn json_answer(mut parts: http::response::Parts, json: Vec<u8>) -> Response {
    parts.headers.remove(CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(json))
}

/// Marks a raw write whose content the middleware stored: the request context carries its key,
/// the one content pointer the write may set.
#[derive(Debug, Clone)]
pub(crate) struct Uploaded(pub(crate) String);

/// A read's FHIR answer turned into the Binary's raw content (errors pass as they are).
async fn to_raw(gw: &SharedGateway, ctx: &RequestContext, response: Response) -> Response {
    if response.status() != StatusCode::OK {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let raw = async {
        let bytes = axum::body::to_bytes(body, usize::MAX)
            .await
            .map_err(|e| FhirError::internal(format!("reading the Binary: {e}")))?;
        let resource: Value = serde_json::from_slice(&bytes)
            .map_err(|e| FhirError::internal(format!("stored Binary is not JSON: {e}")))?;
        let content = match ContentRef::of(&resource)? {
            Some(pointer) => {
                let api = gw.config.binaries.as_ref().ok_or_else(|| {
                    FhirError::new(
                        ErrorCategory::Unavailable,
                        "this Binary's content is in the blob store, and this gateway has no Binary content service",
                    )
                })?;
                let blob = api.service.download(ctx, &pointer).await?;
                let stream = blob.body.map_err(std::io::Error::other);
                (Some(blob.info.size), Body::from_stream(stream))
            }
            None => (None, Body::from(inline_data(&resource)?)),
        };
        Ok::<_, FhirError>((resource, content))
    }
    .await;
    let (resource, (size, body)) = match raw {
        Ok(raw) => raw,
        Err(error) => return error_response(&error, false),
    };
    let content_type = resource["contentType"].as_str().unwrap_or("application/octet-stream");
    let content_type =
        HeaderValue::from_str(content_type).unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream"));
    parts.headers.insert(CONTENT_TYPE, content_type);
    parts.headers.remove(CONTENT_LENGTH);
    if let Some(size) = size {
        parts.headers.insert(CONTENT_LENGTH, HeaderValue::from(size));
    }
    let security_context = resource["securityContext"]["reference"].as_str();
    if let Some(reference) = security_context.and_then(|r| HeaderValue::from_str(r).ok()) {
        parts.headers.insert(SECURITY_CONTEXT, reference);
    }
    Response::from_parts(parts, body)
}

/// The decoded inline `Binary.data` (empty without).
fn inline_data(resource: &Value) -> Result<Vec<u8>, FhirError> {
    match resource["data"].as_str() {
        Some(text) => base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|e| FhirError::internal(format!("stored Binary.data is not base64: {e}"))),
        None => Ok(Vec::new()),
    }
}

/// `type/subtype` (with optional parameters), both RFC 7230 tokens.
fn is_media_type(value: &str) -> bool {
    let essence = value.split(';').next().unwrap_or_default().trim();
    let token = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b));
    matches!(essence.split_once('/'), Some((kind, sub)) if token(kind) && token(sub))
}

/// Whether a raw write's `Content-Length` announces at most `inline_max_bytes` (no length, as
/// with a chunked upload, does not).
fn fits_inline(headers: &HeaderMap, inline_max_bytes: u64) -> bool {
    let declared = headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
    declared.is_some_and(|length| length <= inline_max_bytes)
}

/// The Binary resource (JSON) a raw write stands for, and the content stored for it (with the
/// context it was stored in) when it is not inline.
struct Written {
    json: Vec<u8>,
    stored: Option<(ContentRef, RequestContext)>,
}

/// A raw write's Binary without its content: `contentType`, `id`, `securityContext`.
fn binary_shell(headers: &HeaderMap, id: Option<&str>) -> Result<Value, FhirError> {
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
    let mut resource = json!({"resourceType": "Binary", "contentType": content_type});
    if let Some(id) = id {
        resource["id"] = json!(id);
    }
    if let Some(reference) = headers.get(SECURITY_CONTEXT) {
        let reference = reference.to_str().map_err(|_| FhirError::invalid("X-Security-Context is not ASCII"))?;
        resource["securityContext"] = json!({ "reference": reference.trim() });
    }
    Ok(resource)
}

fn to_json(resource: &Value) -> Result<Vec<u8>, FhirError> {
    serde_json::to_vec(resource).map_err(|e| FhirError::internal(e.to_string()))
}

/// A raw write with its content inline, base64 in `Binary.data`: the resource must fit the
/// request limit itself.
async fn inline_to_resource(
    gw: &SharedGateway,
    headers: &HeaderMap,
    id: Option<&str>,
    body: Body,
) -> Result<Written, FhirError> {
    let mut resource = binary_shell(headers, id)?;
    let limit = (gw.config.max_body_bytes / 4 * 3).saturating_sub(1024);
    let bytes = read_body_up_to(limit, headers, body).await?;
    resource["data"] = json!(base64::engine::general_purpose::STANDARD.encode(&bytes));
    Ok(Written { json: to_json(&resource)?, stored: None })
}

/// A raw write whose content is streamed to the Binary content service; the resource points to
/// it.
async fn stored_to_resource(
    api: &BinaryApi,
    ctx: RequestContext,
    headers: &HeaderMap,
    id: Option<&str>,
    body: Body,
) -> Result<Written, FhirError> {
    let mut resource = binary_shell(headers, id)?;
    let announced =
        headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
    if let Some(length) = announced.filter(|length| *length > api.max_bytes) {
        discard(body).await;
        return Err(FhirError::new(
            ErrorCategory::TooLarge,
            format!("the Binary content ({length} bytes) is larger than the {}-byte limit", api.max_bytes),
        ));
    }
    let content_type = resource["contentType"].as_str().unwrap_or_default().to_owned();
    let stream = put_body(body.into_data_stream());
    let content = api.service.upload(&ctx, &content_type, stream, api.max_bytes).await?;
    content.attach(&mut resource);
    Ok(Written { json: to_json(&resource)?, stored: Some((content, ctx)) })
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
