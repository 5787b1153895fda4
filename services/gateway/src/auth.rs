//! Authentication and tenancy at the edge: bearer JWT → [`Principal`] → [`Access`], the tenant
//! from the URL (`/tenant/{id}/…`) checked against the token's claim, and one audit record per
//! request. The decisions themselves (which interaction on which type) are `fhirmesh-core`'s: the
//! [`Access`] travels with the request to the resource service, which checks every interaction —
//! and every entry of a transaction — where it happens.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use fhirmesh_authn::{Claims, Verifier};
use fhirmesh_core::auth::{Access, AccessPolicy, Principal};
use fhirmesh_core::service::CreateRequest;
use fhirmesh_core::{ErrorCategory, FhirError, RequestContext, TenantId};
use fhirmesh_fhir::ResourceType;
use http::{HeaderValue, Method, StatusCode, Uri};

use crate::SharedGateway;
use crate::response::error_response;

const REQUEST_ID: &str = "x-request-id";

/// How the gateway authenticates callers (`auth.mode = "jwt"`).
#[derive(Clone)]
pub struct GatewayAuth {
    pub verifier: Verifier,
    pub policy: AccessPolicy,
    pub claims: ClaimNames,
}

impl std::fmt::Debug for GatewayAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayAuth").field("claims", &self.claims).finish_non_exhaustive()
    }
}

/// Where the principal's attributes are in the token (names or dotted paths).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimNames {
    /// RBAC groups, e.g. `cognito:groups`.
    pub groups: String,
    /// The tenant of a multi-tenant deployment, e.g. `custom:tenantId`.
    pub tenant: String,
}

impl Default for ClaimNames {
    fn default() -> Self {
        ClaimNames { groups: "cognito:groups".to_owned(), tenant: "custom:tenantId".to_owned() }
    }
}

/// The tenant named by the request path (`/tenant/{id}/…`), put in the request's extensions by
/// [`tenant_rewrite`] before routing.
#[derive(Debug, Clone)]
pub(crate) struct PathTenant(pub TenantId);

/// Who made the request and for which tenant, copied into the response's extensions for the
/// audit record.
#[derive(Debug, Clone, Default)]
pub(crate) struct AuditWho {
    subject: Option<String>,
    fhir_user: Option<String>,
    client_id: Option<String>,
    tenant: Option<TenantId>,
}

/// Strips `{base}/tenant/{id}` from the URI of a multi-tenant request, so the FHIR routes match,
/// and records the tenant. A malformed tenant id is answered here; a request without a tenant
/// segment goes on without one (and the FHIR handlers refuse it, see `Prelude`).
pub(crate) fn tenant_rewrite(base_path: &str, mut request: Request) -> Result<Request, Box<Response>> {
    let path = request.uri().path();
    let Some(rest) = path.strip_prefix(base_path).and_then(|rest| rest.strip_prefix("/tenant/")) else {
        return Ok(request);
    };
    let (raw, tail) = rest.split_once('/').map_or((rest, ""), |(id, tail)| (id, tail));
    let Some(tenant) = TenantId::parse(raw) else {
        let error = FhirError::not_found(format!(
            "'{}' is not a tenant id (1-64 of A-Z a-z 0-9 _ -)",
            raw.chars().take(64).collect::<String>()
        ));
        return Err(Box::new(error_response(&error, false)));
    };
    let mut rebuilt = format!("{base_path}/{tail}");
    if let Some(query) = request.uri().query() {
        rebuilt.push('?');
        rebuilt.push_str(query);
    }
    let mut parts = request.uri().clone().into_parts();
    parts.path_and_query = Some(
        rebuilt
            .parse()
            .map_err(|_| error_response(&FhirError::invalid("the request path is not a valid URI path"), false))?,
    );
    *request.uri_mut() = Uri::from_parts(parts)
        .map_err(|_| error_response(&FhirError::invalid("the request path is not a valid URI path"), false))?;
    request.extensions_mut().insert(PathTenant(tenant));
    Ok(request)
}

/// Route middleware of the protected FHIR routes: authenticates the bearer token (when auth is
/// on), resolves the tenant, and puts the request's [`Access`] and tenant in its extensions.
pub(crate) async fn authenticate(State(gw): State<SharedGateway>, mut request: Request, next: Next) -> Response {
    let path_tenant = request.extensions().get::<PathTenant>().map(|t| t.0.clone());
    if gw.config.multi_tenant && path_tenant.is_none() {
        let error = FhirError::not_found(format!(
            "this server is multi-tenant: FHIR requests go to {}/tenant/{{tenantId}}/…",
            gw.config.base_path
        ));
        return error_response(&error, false);
    }
    let Some(auth) = &gw.config.auth else {
        request.extensions_mut().insert(Arc::new(Access::unrestricted()));
        let mut response = next.run(request).await;
        response.extensions_mut().insert(AuditWho { tenant: path_tenant, ..AuditWho::default() });
        return response;
    };
    let token = match bearer(&request) {
        Ok(token) => token.to_owned(),
        Err(response) => return *response,
    };
    let claims = match auth.verifier.verify(&token).await {
        Ok(claims) => claims,
        Err(error) if error.is_token_error() => return unauthorized(Some(&error.description())),
        // The token may be fine: the server cannot get the keys to check it.
        Err(error) => {
            tracing::warn!(error = %error.description(), "no signing keys to verify a bearer token");
            let outcome = FhirError::new(
                ErrorCategory::Unavailable,
                "the server cannot verify tokens right now (its signing keys are unavailable); retry later",
            );
            return error_response(&outcome, false);
        }
    };
    let principal = principal(&claims, &auth.claims);
    if gw.config.multi_tenant {
        match principal.tenant.as_deref() {
            Some(claimed) if Some(claimed) == path_tenant.as_ref().map(TenantId::as_str) => {}
            Some(_) => return forbidden("the token is not valid for this tenant"),
            None => return forbidden("the token names no tenant; this server is multi-tenant"),
        }
    }
    let access = match Access::for_principal(&auth.policy, &principal) {
        Ok(access) => access,
        Err(error) => return error_response(&error, false),
    };
    let who = AuditWho {
        subject: Some(principal.subject.clone()),
        fhir_user: principal.fhir_user.clone(),
        client_id: principal.client_id.clone(),
        tenant: path_tenant,
    };
    request.extensions_mut().insert(Arc::new(access));
    let mut response = next.run(request).await;
    response.extensions_mut().insert(who);
    response
}

fn bearer(request: &Request) -> Result<&str, Box<Response>> {
    let Some(value) = request.headers().get(http::header::AUTHORIZATION) else {
        return Err(Box::new(unauthorized(None)));
    };
    let value = value.to_str().map_err(|_| Box::new(unauthorized(Some("the Authorization header is not ASCII"))))?;
    match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() => Ok(token.trim()),
        _ => Err(Box::new(unauthorized(Some("the Authorization header must be 'Bearer <token>'")))),
    }
}

/// The principal a verified token describes.
pub(crate) fn principal(claims: &Claims, names: &ClaimNames) -> Principal {
    let text = |path: &str| claims.get(path).and_then(|v| v.as_str()).map(str::to_owned);
    let mut scopes = claims.strings("scope");
    scopes.extend(claims.strings("scp"));
    Principal {
        subject: claims.subject.clone(),
        fhir_user: text("fhirUser"),
        client_id: text("client_id").or_else(|| text("azp")),
        groups: claims.strings(&names.groups),
        scopes,
        patient: text("patient").or_else(|| text("launch_response_patient")),
        tenant: text(&names.tenant),
    }
}

/// 401 with `WWW-Authenticate` (RFC 6750) and an OperationOutcome.
fn unauthorized(description: Option<&str>) -> Response {
    let message = match description {
        Some(description) => format!("the bearer token was refused: {description}"),
        None => "authentication required: send 'Authorization: Bearer <token>'".to_owned(),
    };
    let mut response = error_response(&FhirError::new(ErrorCategory::Unauthorized, message), false);
    let challenge = match description {
        Some(description) => format!(
            "Bearer realm=\"fhirmesh\", error=\"invalid_token\", error_description=\"{}\"",
            description.replace(['"', '\\'], "'")
        ),
        None => "Bearer realm=\"fhirmesh\"".to_owned(),
    };
    if let Ok(value) = HeaderValue::from_str(&challenge) {
        response.headers_mut().insert(http::header::WWW_AUTHENTICATE, value);
    }
    *response.status_mut() = StatusCode::UNAUTHORIZED;
    response
}

fn forbidden(message: &str) -> Response {
    error_response(&FhirError::new(ErrorCategory::Forbidden, message.to_owned()), false)
}

/// Outermost middleware: one structured record per request on the `fhirmesh::audit` target — who,
/// what (method and path, never the query or body: they may hold PHI), where from, the request id,
/// the outcome and the duration — and, when configured, an AuditEvent resource.
pub(crate) async fn audit(State(gw): State<SharedGateway>, mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    if matches!(path.as_str(), "/healthz" | "/readyz" | "/metrics") {
        return next.run(request).await;
    }
    let source = request.extensions().get::<ConnectInfo<SocketAddr>>().map(|info| info.0.ip().to_string());
    // The request id the handlers log and pass on: the client's, or a new one.
    let request_id = match request.headers().get(REQUEST_ID).and_then(|v| v.to_str().ok()) {
        Some(id) => id.to_owned(),
        None => {
            let id = uuid::Uuid::new_v4().to_string();
            if let Ok(value) = HeaderValue::from_str(&id) {
                request.headers_mut().insert(REQUEST_ID, value);
            }
            id
        }
    };
    let (interaction, action) = interaction(&gw.config.base_path, &method, &path);
    // The request's span: a child of the client's trace when it sent a `traceparent`.
    let span = tracing::info_span!(
        "http request",
        otel.name = %format!("{method} {interaction}"),
        otel.kind = "server",
        http.request.method = %method,
        fhir.interaction = interaction,
        trace_id = tracing::field::Empty,
    );
    let traceparent = request.headers().get("traceparent").and_then(|v| v.to_str().ok());
    fhirmesh_ops::trace::set_parent(&span, traceparent);
    let response = tracing::Instrument::instrument(next.run(request), span.clone()).await;
    let _in_request = span.enter();
    let who = response.extensions().get::<AuditWho>().cloned().unwrap_or_default();
    let status = response.status().as_u16();
    gw.http_metrics.record(interaction, status, started.elapsed());
    tracing::info!(
        target: "fhirmesh::audit",
        method = %method,
        path = %path,
        status,
        subject = who.subject.as_deref(),
        fhir_user = who.fhir_user.as_deref(),
        client_id = who.client_id.as_deref(),
        source = source.as_deref(),
        request_id = %request_id,
        duration_ms = started.elapsed().as_secs_f64() * 1000.0,
        "request"
    );
    if gw.config.audit_events {
        let event = audit_event(&gw.config.base_path, (interaction, action), &path, status, &who, source.as_deref());
        let ctx = RequestContext {
            tenant: who.tenant.clone().unwrap_or_default(),
            request_id: Some(request_id),
            ..RequestContext::default()
        };
        let service = gw.service.clone();
        // Off the request's path: the answer does not wait for its audit trail.
        tokio::spawn(async move {
            let Some(resource_type) = ResourceType::parse("AuditEvent") else { return };
            let create = CreateRequest { resource_type, body: event.to_string().into(), if_none_exist: None };
            if let Err(error) = service.create(&ctx, create).await {
                tracing::warn!(target: "fhirmesh::audit", error = %error, "could not store the AuditEvent");
            }
        });
    }
    response
}

/// The path's segments after the base path and any `/tenant/{id}`.
fn fhir_segments<'a>(base_path: &str, path: &'a str) -> Vec<&'a str> {
    let rest = path.strip_prefix(base_path).unwrap_or(path);
    let rest = match rest.strip_prefix("/tenant/") {
        Some(tail) => tail.split_once('/').map_or("", |(_, tail)| tail),
        None => rest.trim_start_matches('/'),
    };
    rest.split('/').filter(|s| !s.is_empty()).collect()
}

/// The FHIR restful interaction of a request (a code of `http://hl7.org/fhir/restful-interaction`,
/// or `operation` for `$` operations and anything else) and its AuditEvent action.
pub(crate) fn interaction(base_path: &str, method: &Method, path: &str) -> (&'static str, &'static str) {
    let segments = fhir_segments(base_path, path);
    if segments.iter().any(|segment| segment.starts_with('$')) {
        return ("operation", "E");
    }
    match (method.as_str(), segments.as_slice()) {
        ("GET", [] | ["_history"]) => ("search-system", "E"),
        ("GET", ["metadata"]) => ("capabilities", "E"),
        ("GET", [_, "_history"]) => ("history-type", "R"),
        ("GET", [_]) => ("search-type", "E"),
        ("GET", [_, _]) => ("read", "R"),
        ("GET", [_, _, "_history"]) => ("history-instance", "R"),
        ("GET", [_, _, "_history", _]) => ("vread", "R"),
        ("GET", [_, _, _]) => ("search-type", "E"),
        ("POST", []) => ("transaction", "E"),
        ("POST", [_, "_search"]) => ("search-type", "E"),
        ("POST", [_]) => ("create", "C"),
        ("PUT", _) => ("update", "U"),
        ("PATCH", _) => ("patch", "U"),
        ("DELETE", _) => ("delete", "D"),
        _ => ("operation", "E"),
    }
}

/// The AuditEvent (R4, `rest` type) of one request.
fn audit_event(
    base_path: &str,
    (interaction, action): (&'static str, &'static str),
    path: &str,
    status: u16,
    who: &AuditWho,
    source: Option<&str>,
) -> serde_json::Value {
    let segments = fhir_segments(base_path, path);
    let outcome = match status {
        0..400 => "0",
        400..500 => "4",
        _ => "8",
    };
    let mut agent = serde_json::json!({"requestor": true});
    match (&who.fhir_user, &who.subject) {
        (Some(fhir_user), _) => agent["who"] = serde_json::json!({"reference": fhir_user}),
        (None, Some(subject)) => agent["who"] = serde_json::json!({"identifier": {"value": subject}}),
        (None, None) => agent["who"] = serde_json::json!({"display": "anonymous (auth.mode = none)"}),
    }
    if let Some(client) = &who.client_id {
        agent["altId"] = serde_json::json!(client);
    }
    if let Some(address) = source {
        agent["network"] = serde_json::json!({"address": address, "type": "2"});
    }
    let mut event = serde_json::json!({
        "resourceType": "AuditEvent",
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest",
                 "display": "RESTful Operation"},
        "subtype": [{"system": "http://hl7.org/fhir/restful-interaction", "code": interaction}],
        "action": action,
        "recorded": fhirmesh_fhir::datetime::format_instant(time::OffsetDateTime::now_utc()),
        "outcome": outcome,
        "agent": [agent],
        "source": {"observer": {"display": "fhirmesh"}, "type": [{
            "system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "3",
            "display": "Web Server"}]}
    });
    if let [resource_type, id, ..] = segments.as_slice()
        && ResourceType::parse(resource_type).is_some()
        && !id.starts_with('_')
    {
        event["entity"] = serde_json::json!([{"what": {"reference": format!("{resource_type}/{id}")}}]);
    } else if let [resource_type] = segments.as_slice()
        && ResourceType::parse(resource_type).is_some()
    {
        event["entity"] = serde_json::json!([{"what": {"display": resource_type}}]);
    }
    event
}
