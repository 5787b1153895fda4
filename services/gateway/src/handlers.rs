//! Route handlers: decode the HTTP request, call the resource service, render the answer.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequestParts, Path, State};
use axum::response::Response;
use bytes::Bytes;
use fhirmesh_core::auth::Access;
use fhirmesh_core::ports::HistoryScope;
use fhirmesh_core::service::{
    BundleRequest, ConditionalDeleteRequest, ConditionalUpdateRequest, CreateRequest, DeleteRequest, HistoryRequest,
    PatchDocument, PatchRequest, SearchRequest, UpdateRequest, ValidateRequest, WriteResult,
};
use fhirmesh_core::{ErrorCategory, FhirError, FhirResult, RequestContext};
use fhirmesh_fhir::outcome::information;
use fhirmesh_fhir::search::query::SearchScope;
use fhirmesh_fhir::{LogicalId, ResourceType};
use futures::StreamExt;
use http::request::Parts;
use http::{HeaderMap, Method, StatusCode, Uri};

use crate::SharedGateway;
use crate::auth::PathTenant;
use crate::bundle::{SearchLinks, bundle_response, history_bundle, search_bundle};
use crate::negotiate::{self, PatchFormat, Presentation, Return};
use crate::response::{
    bytes_response, error_response, json_response, resource_response, set_location, version_headers,
};

/// What every FHIR handler needs from the request before doing its own work.
pub(crate) struct Prelude {
    pub(crate) params: Vec<(String, String)>,
    presentation: Presentation,
    pub(crate) ctx: RequestContext,
    /// Absolute FHIR base URL, no trailing slash.
    pub(crate) base: String,
    pub(crate) pretty: bool,
}

impl Prelude {
    fn new(gw: &SharedGateway, parts: &Parts) -> Result<Prelude, Box<Response>> {
        let headers = &parts.headers;
        let params: Vec<(String, String)> =
            parts.uri.query().map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect()).unwrap_or_default();
        let pretty = params.iter().any(|(k, v)| k == "_pretty" && v == "true");
        let fail = |error: FhirError| Box::new(error_response(&error, pretty));
        let presentation = negotiate::presentation(headers, &params).map_err(fail)?;
        let Caller { ctx, base } = Caller::new(gw, parts);
        Ok(Prelude { base, params, presentation, ctx, pretty })
    }

    pub(crate) fn fail(&self, error: FhirError) -> Response {
        error_response(&error, self.pretty)
    }
}

/// Who calls, for which tenant, at which base URL: what a handler that negotiates no FHIR
/// presentation (an export file download) needs.
pub(crate) struct Caller {
    pub(crate) ctx: RequestContext,
    /// Absolute FHIR base URL (with the tenant segment), no trailing slash.
    pub(crate) base: String,
}

impl Caller {
    pub(crate) fn new(gw: &SharedGateway, parts: &Parts) -> Caller {
        let headers = &parts.headers;
        let request_id = headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        // The request's span when spans are exported (a child of the client's), else the
        // client's own traceparent passed on as it came.
        let traceparent = fhirmesh_ops::trace::current_traceparent()
            .or_else(|| headers.get("traceparent").and_then(|v| v.to_str().ok()).map(str::to_owned));
        let tenant = parts.extensions.get::<PathTenant>().map(|t| t.0.clone());
        // Set by the authentication middleware on every protected route; the public routes
        // (metadata, SMART configuration) run without, and may do nothing with the data.
        let access = match parts.extensions.get::<Arc<Access>>() {
            Some(access) => access.clone(),
            None if gw.config.auth.is_none() => Arc::new(Access::unrestricted()),
            None => Arc::new(Access::anonymous()),
        };
        let mut base = base_url(gw, headers);
        if let Some(tenant) = &tenant {
            base.push_str("/tenant/");
            base.push_str(tenant.as_str());
        }
        // Set by the Binary middleware on a raw write whose content it stored (`binary.rs`).
        let binary_upload = parts.extensions.get::<crate::binary::Uploaded>().map(|uploaded| uploaded.0.clone());
        let ctx = RequestContext {
            tenant: tenant.unwrap_or_default(),
            request_id: Some(request_id),
            traceparent,
            access,
            binary_upload,
        };
        Caller { ctx, base }
    }
}

impl FromRequestParts<SharedGateway> for Caller {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, gw: &SharedGateway) -> Result<Self, Self::Rejection> {
        Ok(Caller::new(gw, parts))
    }
}

/// Every FHIR handler starts from a [`Prelude`]: a request whose `_format`/`Accept`/`_summary`…
/// cannot be honoured is answered before the handler runs.
impl FromRequestParts<SharedGateway> for Prelude {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, gw: &SharedGateway) -> Result<Self, Self::Rejection> {
        Prelude::new(gw, parts).map_err(|response| *response)
    }
}

fn base_url(gw: &SharedGateway, headers: &HeaderMap) -> String {
    if let Some(url) = &gw.config.public_base_url {
        return url.trim_end_matches('/').to_owned();
    }
    let host = headers.get(http::header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("localhost");
    format!("http://{host}{}", gw.config.base_path)
}

fn resource_type(raw: &str) -> FhirResult<ResourceType> {
    ResourceType::parse(raw)
        .ok_or_else(|| FhirError::not_found(format!("'{raw}' is not a FHIR R4 resource type this server knows")))
}

fn logical_id(raw: &str) -> FhirResult<LogicalId> {
    LogicalId::parse(raw)
        .map_err(|_| FhirError::invalid(format!("'{raw}' is not a valid FHIR id (1-64 of A-Z a-z 0-9 - .)")).at("id"))
}

fn type_and_id(path: Result<Path<(String, String)>, PathRejection>) -> FhirResult<(ResourceType, LogicalId)> {
    let Path((rtype, id)) = path.map_err(|e| FhirError::invalid(format!("bad request path: {e}")))?;
    Ok((resource_type(&rtype)?, logical_id(&id)?))
}

pub(crate) async fn read_body(gw: &SharedGateway, headers: &HeaderMap, body: Body) -> FhirResult<Bytes> {
    read_body_up_to(gw.config.max_body_bytes, headers, body).await
}

pub(crate) async fn read_body_up_to(limit: usize, headers: &HeaderMap, body: Body) -> FhirResult<Bytes> {
    let too_large =
        || FhirError::new(ErrorCategory::TooLarge, format!("request body is larger than the {limit}-byte limit"));
    let declared =
        headers.get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        discard(body).await;
        return Err(too_large());
    }
    let mut stream = body.into_data_stream();
    let mut collected = bytes::BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|err| FhirError::invalid(format!("could not read the request body: {err}")))?;
        if collected.len() + chunk.len() > limit {
            discard_stream(stream).await;
            return Err(too_large());
        }
        collected.extend_from_slice(&chunk);
    }
    Ok(collected.freeze())
}

/// How much of a refused request body is still read, and thrown away, before the refusal is
/// sent. A server that answers and closes while the client is still writing makes the client's
/// TCP stack reset the connection, and the client sees that reset instead of the 413: reading
/// the rest lets an ordinary client get its answer. Past these bounds the connection is closed
/// unread, as it must be for a client streaming gigabytes.
const DISCARD_MAX_BYTES: usize = 8 * 1024 * 1024;
const DISCARD_MAX_TIME: std::time::Duration = std::time::Duration::from_secs(2);

/// Reads and drops what is left of a refused request body, within the discard bounds.
pub(crate) async fn discard(body: Body) {
    discard_stream(body.into_data_stream()).await;
}

async fn discard_stream(mut stream: axum::body::BodyDataStream) {
    let drain = async {
        let mut seen = 0;
        while let Some(Ok(chunk)) = stream.next().await {
            seen += chunk.len();
            if seen > DISCARD_MAX_BYTES {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(DISCARD_MAX_TIME, drain).await;
}

/// `X-Consistency-Token`: the change sequence of a write; sent back on a search, it makes the search
/// wait until the index has applied that write.
fn set_consistency_token(response: &mut Response, sequence: u64) {
    response.headers_mut().insert(negotiate::CONSISTENCY_TOKEN, http::HeaderValue::from(sequence));
}

fn self_link(base: &str, path_and_query: &str) -> String {
    format!("{base}{path_and_query}")
}

/// The response to create, update and patch: 201 when the write created the resource, else 200.
fn written(result: FhirResult<WriteResult>, headers: &HeaderMap, prelude: &Prelude) -> Response {
    match result {
        Ok(result) => {
            let status = if result.created { StatusCode::CREATED } else { StatusCode::OK };
            write_response(&result, headers, prelude, status)
        }
        Err(error) => prelude.fail(error),
    }
}

/// Renders create/update/patch results according to `Prefer: return`.
fn write_response(result: &WriteResult, headers: &HeaderMap, prelude: &Prelude, status: StatusCode) -> Response {
    let version = &result.version;
    let mut response = match negotiate::prefer_return(headers) {
        Return::Representation => resource_response(status, version, &prelude.presentation),
        Return::Minimal => {
            let mut response = Response::new(Body::empty());
            *response.status_mut() = status;
            version_headers(&mut response, version);
            response
        }
        Return::OperationOutcome => {
            let verb = if !result.written {
                "matched existing"
            } else if result.created {
                "created"
            } else {
                "updated"
            };
            let message = format!("{verb} {}/{} version {}", version.resource_type, version.id, version.version_id);
            let mut response = json_response(status, &information(message), prelude.pretty);
            version_headers(&mut response, version);
            response
        }
    };
    set_consistency_token(&mut response, version.sequence);
    if result.created || status == StatusCode::CREATED {
        let location =
            format!("{}/{}/{}/_history/{}", prelude.base, version.resource_type, version.id, version.version_id);
        set_location(&mut response, &location);
    }
    response
}

pub(crate) async fn metadata(State(gw): State<SharedGateway>, prelude: Prelude) -> Response {
    let mut caps = gw.config.capabilities.clone();
    // The configured public base or the request's, with the tenant's path when multi-tenant.
    caps.base_url = Some(prelude.base.clone());
    let statement = fhirmesh_core::capabilities::capability_statement(&caps, &gw.started);
    json_response(StatusCode::OK, &statement, prelude.pretty)
}

/// `/.well-known/smart-configuration` (SMART App Launch 2.0): public, and only when the server
/// authorizes with SMART scopes.
pub(crate) async fn smart_configuration(State(gw): State<SharedGateway>, prelude: Prelude) -> Response {
    match &gw.config.smart_configuration {
        Some(document) => json_response(StatusCode::OK, document, prelude.pretty),
        None => prelude.fail(FhirError::not_found("this server does not use SMART on FHIR authorization")),
    }
}

pub(crate) async fn create(
    State(gw): State<SharedGateway>,
    Path(rtype): Path<String>,
    prelude: Prelude,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let resource_type = resource_type(&rtype)?;
        negotiate::check_json_body(&headers)?;
        let body = read_body(&gw, &headers, body).await?;
        let if_none_exist = negotiate::if_none_exist(&headers)?;
        gw.service.create(&prelude.ctx, CreateRequest { resource_type, body, if_none_exist }).await
    }
    .await;
    written(result, &headers, &prelude)
}

/// The search criteria of a conditional update/delete: the query string minus presentation
/// parameters.
fn criteria(prelude: &Prelude) -> Vec<(String, String)> {
    prelude.params.iter().filter(|(k, _)| !matches!(k.as_str(), "_format" | "_pretty")).cloned().collect()
}

pub(crate) async fn conditional_update(
    State(gw): State<SharedGateway>,
    Path(rtype): Path<String>,
    prelude: Prelude,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let resource_type = resource_type(&rtype)?;
        negotiate::check_json_body(&headers)?;
        let if_match = negotiate::if_match(&headers)?;
        let body = read_body(&gw, &headers, body).await?;
        let request = ConditionalUpdateRequest { resource_type, criteria: criteria(&prelude), body, if_match };
        gw.service.conditional_update(&prelude.ctx, request).await
    }
    .await;
    written(result, &headers, &prelude)
}

pub(crate) async fn conditional_delete(
    State(gw): State<SharedGateway>,
    Path(rtype): Path<String>,
    prelude: Prelude,
    headers: HeaderMap,
) -> Response {
    let result = async {
        let resource_type = resource_type(&rtype)?;
        let request = ConditionalDeleteRequest { resource_type, criteria: criteria(&prelude) };
        gw.service.conditional_delete(&prelude.ctx, request).await
    }
    .await;
    match result {
        Ok(result) => {
            let mut response = match negotiate::prefer_return(&headers) {
                Return::OperationOutcome => {
                    let ids: Vec<String> =
                        result.deleted.iter().map(|(id, v)| format!("{rtype}/{id} (version {v})")).collect();
                    let message = if ids.is_empty() {
                        "nothing matched the criteria; nothing was deleted".to_owned()
                    } else {
                        format!("deleted {}", ids.join(", "))
                    };
                    json_response(StatusCode::OK, &information(message), prelude.pretty)
                }
                _ => {
                    let mut response = Response::new(Body::empty());
                    *response.status_mut() = StatusCode::NO_CONTENT;
                    response
                }
            };
            if let Some(sequence) = result.sequence {
                set_consistency_token(&mut response, sequence);
            }
            response
        }
        Err(error) => prelude.fail(error),
    }
}

pub(crate) async fn read(
    State(gw): State<SharedGateway>,
    path: Result<Path<(String, String)>, PathRejection>,
    prelude: Prelude,
) -> Response {
    let result = async {
        let (resource_type, id) = type_and_id(path)?;
        gw.service.read(&prelude.ctx, resource_type, id).await
    }
    .await;
    match result {
        Ok(version) => resource_response(StatusCode::OK, &version, &prelude.presentation),
        Err(error) => prelude.fail(error),
    }
}

pub(crate) async fn vread(
    State(gw): State<SharedGateway>,
    path: Result<Path<(String, String, String)>, PathRejection>,
    prelude: Prelude,
) -> Response {
    let result = async {
        let Path((rtype, id, vid)) = path.map_err(|e| FhirError::invalid(format!("bad request path: {e}")))?;
        let (resource_type, id) = (resource_type(&rtype)?, logical_id(&id)?);
        let version_id: u64 = vid
            .parse()
            .map_err(|_| FhirError::not_found(format!("'{vid}' is not a version of {resource_type}/{id}")))?;
        gw.service.vread(&prelude.ctx, resource_type, id, version_id).await
    }
    .await;
    match result {
        Ok(version) => resource_response(StatusCode::OK, &version, &prelude.presentation),
        Err(error) => prelude.fail(error),
    }
}

pub(crate) async fn update(
    State(gw): State<SharedGateway>,
    path: Result<Path<(String, String)>, PathRejection>,
    prelude: Prelude,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let (resource_type, id) = type_and_id(path)?;
        negotiate::check_json_body(&headers)?;
        let if_match = negotiate::if_match(&headers)?;
        let body = read_body(&gw, &headers, body).await?;
        gw.service.update(&prelude.ctx, UpdateRequest { resource_type, id, body, if_match }).await
    }
    .await;
    written(result, &headers, &prelude)
}

pub(crate) async fn patch(
    State(gw): State<SharedGateway>,
    path: Result<Path<(String, String)>, PathRejection>,
    prelude: Prelude,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let (resource_type, id) = type_and_id(path)?;
        let format = negotiate::patch_format(&headers)?;
        let if_match = negotiate::if_match(&headers)?;
        let body = read_body(&gw, &headers, body).await?;
        let patch = match format {
            PatchFormat::Json => PatchDocument::JsonPatch(body),
            PatchFormat::FhirPath => PatchDocument::FhirPathPatch(body),
        };
        gw.service.patch(&prelude.ctx, PatchRequest { resource_type, id, patch, if_match }).await
    }
    .await;
    written(result, &headers, &prelude)
}

pub(crate) async fn delete(
    State(gw): State<SharedGateway>,
    path: Result<Path<(String, String)>, PathRejection>,
    prelude: Prelude,
    headers: HeaderMap,
) -> Response {
    let result = async {
        let (resource_type, id) = type_and_id(path)?;
        let if_match = negotiate::if_match(&headers)?;
        gw.service.delete(&prelude.ctx, DeleteRequest { resource_type, id, if_match }).await
    }
    .await;
    match result {
        Ok(deleted) => {
            let mut response = match negotiate::prefer_return(&headers) {
                Return::OperationOutcome => {
                    let message = match deleted.version_id {
                        Some(v) => format!("deleted (tombstone version {v})"),
                        None => "nothing to delete: the resource does not exist or was already deleted".to_owned(),
                    };
                    json_response(StatusCode::OK, &information(message), prelude.pretty)
                }
                _ => {
                    let mut response = Response::new(Body::empty());
                    *response.status_mut() = StatusCode::NO_CONTENT;
                    response
                }
            };
            if let Some(v) = deleted.version_id
                && let Ok(etag) = http::HeaderValue::from_str(&format!("W/\"{v}\""))
            {
                response.headers_mut().insert(http::header::ETAG, etag);
            }
            if let Some(sequence) = deleted.sequence {
                set_consistency_token(&mut response, sequence);
            }
            response
        }
        Err(error) => prelude.fail(error),
    }
}

async fn history(gw: SharedGateway, scope: FhirResult<HistoryScope>, prelude: Prelude, uri: &Uri) -> Response {
    let result = async {
        let scope = scope?;
        let param = |name: &str| prelude.params.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        for (name, _) in &prelude.params {
            if !matches!(
                name.as_str(),
                "_count" | "_since" | "_at" | "_page_token" | "_format" | "_pretty" | "_summary" | "_elements"
            ) {
                return Err(FhirError::invalid(format!("history does not take the parameter '{name}'")));
            }
        }
        let request = HistoryRequest {
            scope,
            count: param("_count"),
            since: param("_since"),
            at: param("_at"),
            page_token: param("_page_token"),
        };
        let page = gw.service.history(&prelude.ctx, request).await?;
        let path = uri.path().strip_prefix(gw.config.base_path.as_str()).unwrap_or(uri.path());
        let self_url = self_link(
            &prelude.base,
            uri.path_and_query()
                .map_or(path, |pq| pq.as_str())
                .strip_prefix(gw.config.base_path.as_str())
                .unwrap_or(path),
        );
        let next = page.next_page_token.as_ref().map(|token| {
            let mut query = form_urlencoded::Serializer::new(String::new());
            for (k, v) in prelude.params.iter().filter(|(k, _)| k != "_page_token") {
                query.append_pair(k, v);
            }
            query.append_pair("_page_token", token);
            format!("{}{path}?{}", prelude.base, query.finish())
        });
        history_bundle(&prelude.base, &self_url, next.as_deref(), &page, &prelude.presentation)
    }
    .await;
    match result {
        Ok(bundle) => bytes_response(StatusCode::OK, bundle),
        Err(error) => prelude.fail(error),
    }
}

pub(crate) async fn history_system(State(gw): State<SharedGateway>, prelude: Prelude, uri: Uri) -> Response {
    history(gw, Ok(HistoryScope::System), prelude, &uri).await
}

pub(crate) async fn history_type(
    State(gw): State<SharedGateway>,
    Path(rtype): Path<String>,
    prelude: Prelude,
    uri: Uri,
) -> Response {
    let scope = resource_type(&rtype).map(HistoryScope::Type);
    history(gw, scope, prelude, &uri).await
}

pub(crate) async fn history_instance(
    State(gw): State<SharedGateway>,
    path: Result<Path<(String, String)>, PathRejection>,
    prelude: Prelude,
    uri: Uri,
) -> Response {
    let scope = type_and_id(path).map(|(rt, id)| HistoryScope::Instance(rt, id));
    history(gw, scope, prelude, &uri).await
}

/// What a search request asks for, before the prelude is built.
struct SearchCall {
    scope: FhirResult<SearchScope>,
    /// Form-encoded body parameters of `POST …/_search`.
    form: Vec<(String, String)>,
    /// Path of the search endpoint relative to the FHIR base, e.g. `Patient` or `Patient/1/Observation`.
    path: String,
}

async fn search(gw: SharedGateway, call: SearchCall, prelude: Prelude, headers: HeaderMap) -> Response {
    let result = async {
        let scope = call.scope?;
        let mut params = prelude.params.clone();
        params.extend(call.form);
        let page_token = params.iter().rev().find(|(k, _)| k == "_page_token").map(|(_, v)| v.clone());
        params.retain(|(k, _)| k != "_page_token");
        let request = SearchRequest {
            scope,
            params,
            strict: negotiate::prefer_strict(&headers),
            page_token,
            consistency_token: negotiate::consistency_token(&headers)?,
        };
        let page = gw.service.search(&prelude.ctx, request).await?;
        let link = |token: Option<&str>| {
            let mut query = form_urlencoded::Serializer::new(String::new());
            for (k, v) in &page.applied {
                query.append_pair(k, v);
            }
            if let Some(token) = token {
                query.append_pair("_page_token", token);
            }
            let query = query.finish();
            let separator = if query.is_empty() { "" } else { "?" };
            format!("{}/{}{separator}{query}", prelude.base, call.path)
        };
        let links = SearchLinks {
            self_link: link(None),
            next: page.next_page_token.as_deref().map(|t| link(Some(t))),
            previous: page.previous_page_token.as_deref().map(|t| link(Some(t))),
        };
        search_bundle(&prelude.base, &links, &page, &prelude.presentation)
    }
    .await;
    match result {
        Ok(bundle) => bytes_response(StatusCode::OK, bundle),
        Err(error) => prelude.fail(error),
    }
}

pub(crate) async fn search_type(
    State(gw): State<SharedGateway>,
    Path(rtype): Path<String>,
    prelude: Prelude,
    headers: HeaderMap,
) -> Response {
    let call = SearchCall { scope: resource_type(&rtype).map(SearchScope::Type), form: Vec::new(), path: rtype };
    search(gw, call, prelude, headers).await
}

pub(crate) async fn search_type_post(
    State(gw): State<SharedGateway>,
    Path(rtype): Path<String>,
    prelude: Prelude,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let form = match read_body(&gw, &headers, body).await {
        Ok(bytes) => form_urlencoded::parse(&bytes).into_owned().collect(),
        Err(error) => return error_response(&error, false),
    };
    let call = SearchCall { scope: resource_type(&rtype).map(SearchScope::Type), form, path: rtype };
    search(gw, call, prelude, headers).await
}

pub(crate) async fn search_system(State(gw): State<SharedGateway>, prelude: Prelude, headers: HeaderMap) -> Response {
    let call = SearchCall { scope: Ok(SearchScope::System), form: Vec::new(), path: String::new() };
    search(gw, call, prelude, headers).await
}

pub(crate) async fn search_compartment(
    State(gw): State<SharedGateway>,
    path: Result<Path<(String, String, String)>, PathRejection>,
    prelude: Prelude,
    headers: HeaderMap,
) -> Response {
    let (scope, path) = match path {
        Ok(Path((compartment, id, member))) => {
            let scope = (|| {
                let compartment = resource_type(&compartment)?;
                let id = logical_id(&id)?;
                let member = if member == "*" { None } else { Some(resource_type(&member)?) };
                Ok(SearchScope::Compartment { compartment, id: id.as_str().to_owned(), member })
            })();
            (scope, format!("{compartment}/{id}/{member}"))
        }
        Err(e) => (Err(FhirError::invalid(format!("bad request path: {e}"))), String::new()),
    };
    search(gw, SearchCall { scope, form: Vec::new(), path }, prelude, headers).await
}

/// `POST /` with a `transaction` or `batch` Bundle: a `transaction-response` / `batch-response`,
/// entries rendered per `Prefer: return`.
pub(crate) async fn bundle(
    State(gw): State<SharedGateway>,
    prelude: Prelude,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        negotiate::check_json_body(&headers)?;
        let body = read_body_up_to(gw.config.max_bundle_bytes, &headers, body).await?;
        let result = gw.service.bundle(&prelude.ctx, BundleRequest { body }).await?;
        let rendered =
            bundle_response(&prelude.base, &result, negotiate::prefer_return(&headers), &prelude.presentation)?;
        Ok::<_, FhirError>((rendered, result.last_sequence))
    }
    .await;
    match result {
        Ok((rendered, last_sequence)) => {
            let mut response = bytes_response(StatusCode::OK, rendered);
            if let Some(sequence) = last_sequence {
                set_consistency_token(&mut response, sequence);
            }
            response
        }
        Err(error) => prelude.fail(error),
    }
}

pub(crate) async fn no_route(method: Method, uri: Uri) -> Response {
    error_response(&FhirError::not_found(format!("no FHIR endpoint at {method} {}", uri.path())), false)
}

pub(crate) async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    error_response(
        &FhirError::new(ErrorCategory::MethodNotAllowed, format!("{method} is not allowed on {}", uri.path())),
        false,
    )
}

/// `POST /{type}/$validate`: 200 with an OperationOutcome of every issue found (one
/// `information` issue when there is none); an error status only when validation could not run.
pub(crate) async fn validate_type(
    State(gw): State<SharedGateway>,
    Path(rtype): Path<String>,
    prelude: Prelude,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async { validate_call(&gw, resource_type(&rtype)?, None, &prelude, &headers, body).await }.await;
    validated(result, &prelude)
}

/// `POST /{type}/{id}/$validate` (modes `update` and `delete` validate against this instance).
pub(crate) async fn validate_instance(
    State(gw): State<SharedGateway>,
    path: Result<Path<(String, String)>, PathRejection>,
    prelude: Prelude,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let (resource_type, id) = type_and_id(path)?;
        validate_call(&gw, resource_type, Some(id), &prelude, &headers, body).await
    }
    .await;
    validated(result, &prelude)
}

async fn validate_call(
    gw: &SharedGateway,
    resource_type: ResourceType,
    id: Option<LogicalId>,
    prelude: &Prelude,
    headers: &HeaderMap,
    body: Body,
) -> FhirResult<Vec<fhirmesh_fhir::outcome::Issue>> {
    let body = read_body(gw, headers, body).await?;
    if !body.is_empty() {
        negotiate::check_json_body(headers)?;
    }
    let request = ValidateRequest::from_http(resource_type, id, &body, &criteria(prelude))?;
    gw.service.validate(&prelude.ctx, request).await
}

fn validated(result: FhirResult<Vec<fhirmesh_fhir::outcome::Issue>>, prelude: &Prelude) -> Response {
    match result {
        Ok(issues) if issues.is_empty() => {
            json_response(StatusCode::OK, &information("no issues found: the resource is valid"), prelude.pretty)
        }
        Ok(issues) => {
            json_response(StatusCode::OK, &fhirmesh_fhir::outcome::operation_outcome(&issues), prelude.pretty)
        }
        Err(error) => prelude.fail(error),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A body of `chunks` chunks of `size` bytes that counts how many of them were read.
    fn counted_body(chunks: usize, size: usize) -> (Body, Arc<AtomicUsize>) {
        let read = Arc::new(AtomicUsize::new(0));
        let counter = read.clone();
        let stream = futures::stream::iter(0..chunks).map(move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>(Bytes::from(vec![b'x'; size]))
        });
        (Body::from_stream(stream), read)
    }

    fn content_length(length: usize) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::CONTENT_LENGTH, length.into());
        headers
    }

    #[tokio::test]
    async fn a_body_within_the_limit_is_read_whole() {
        let (body, _) = counted_body(4, 100);
        let bytes = read_body_up_to(400, &HeaderMap::new(), body).await.expect("within the limit");
        assert_eq!(bytes.len(), 400);
    }

    #[tokio::test]
    async fn a_refused_body_is_still_read_to_its_end_so_the_client_gets_the_413() {
        // Announced too large: refused before reading, then read out.
        let (body, read) = counted_body(10, 1000);
        let error = read_body_up_to(5000, &content_length(10_000), body).await.expect_err("announced too large");
        assert_eq!(error.category, ErrorCategory::TooLarge);
        assert!(error.issues[0].diagnostics.contains("5000-byte limit"), "{error:?}");
        assert_eq!(read.load(Ordering::SeqCst), 10);
        // Not announced (chunked): found too large while reading, the rest read out.
        let (body, read) = counted_body(10, 1000);
        let error = read_body_up_to(5000, &HeaderMap::new(), body).await.expect_err("too large");
        assert_eq!(error.category, ErrorCategory::TooLarge);
        assert_eq!(read.load(Ordering::SeqCst), 10);
    }

    #[tokio::test]
    async fn a_huge_refused_body_is_not_read_past_the_discard_bound() {
        let chunk = 1024 * 1024;
        let (body, read) = counted_body(100, chunk);
        read_body_up_to(1024, &content_length(100 * chunk), body).await.expect_err("too large");
        let read = read.load(Ordering::SeqCst);
        assert!(read <= DISCARD_MAX_BYTES / chunk + 1, "{read} chunks read");
        assert!(read > 1, "{read} chunks read");
    }
}
