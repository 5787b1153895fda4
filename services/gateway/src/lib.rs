//! The gateway: the FHIR R4 REST API over HTTP.
//!
//! What it is: routing, content negotiation, headers (ETag, Last-Modified, Location, Prefer),
//! body limits, `_summary`/`_elements`/`_pretty`, Bundle and OperationOutcome rendering. It calls
//! an `Arc<dyn ResourceService>` — in-process in embedded mode, the gRPC client in the mesh.
//! What it is not: storage, validation or any FHIR interaction logic (that is `fhirmesh-core`).

mod auth;
mod binary;
mod bundle;
mod export;
mod handlers;
mod metrics;
mod negotiate;
mod response;

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::Request;
use axum::routing::{get, post};
use fhirmesh_core::DynResourceService;
use fhirmesh_core::capabilities::Capabilities;
use tokio::net::TcpListener;
use tower::ServiceExt;

pub use crate::auth::{ClaimNames, GatewayAuth};
pub use fhirmesh_ops::OPENMETRICS_CONTENT_TYPE;

/// Gateway settings, built by the composition root from validated configuration.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Path prefix of the FHIR base, `""` for the server root, or e.g. `/fhir`.
    pub base_path: String,
    /// Absolute base URL clients reach the server at (for Location, fullUrl and links). When
    /// `None`, it is derived from the request's Host header.
    pub public_base_url: Option<String>,
    /// Largest request body accepted; larger bodies get 413.
    pub max_body_bytes: usize,
    /// Largest transaction or batch Bundle accepted (`POST /`); larger ones get 413.
    pub max_bundle_bytes: usize,
    pub capabilities: Capabilities,
    /// Bearer-token authentication; `None` is `auth.mode = "none"` (every caller may do anything).
    pub auth: Option<GatewayAuth>,
    /// The SMART configuration document served at `/.well-known/smart-configuration` (SMART
    /// authorization only).
    pub smart_configuration: Option<serde_json::Value>,
    /// Every FHIR route lives under `/tenant/{tenantId}/`.
    pub multi_tenant: bool,
    /// Store an AuditEvent resource per request (besides the `fhirmesh::audit` log record).
    pub audit_events: bool,
    /// `/healthz`, `/readyz` (the process's readiness checks) and `/metrics` (every metrics
    /// source of the process; the gateway adds its own).
    pub ops: fhirmesh_ops::Ops,
    /// Bulk Data `$export` (absent: the kick-off answers that export is not available here).
    pub exports: Option<ExportApi>,
    /// Where raw Binary content above the inline size goes (absent: every Binary is stored
    /// inline, within the request body limit).
    pub binaries: Option<BinaryApi>,
}

/// The Binary content service the gateway streams large raw content to.
#[derive(Clone)]
pub struct BinaryApi {
    pub service: fhirmesh_core::binary::DynBinaryService,
    /// Raw content up to this size (declared by `Content-Length`) stays inline in the resource;
    /// larger or unannounced content is streamed to `service`.
    pub inline_max_bytes: u64,
    /// Largest raw content accepted (413 beyond).
    pub max_bytes: u64,
    /// Presigned mode (S3): a FHIR JSON write of a Binary without content answers a
    /// `presignedPutUrl` to upload it to, reads answer a `presignedGetUrl`; valid this long.
    pub presign_expiry: Option<std::time::Duration>,
}

impl std::fmt::Debug for BinaryApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BinaryApi")
            .field("inline_max_bytes", &self.inline_max_bytes)
            .field("max_bytes", &self.max_bytes)
            .field("presign_expiry", &self.presign_expiry)
            .finish_non_exhaustive()
    }
}

/// The export service the gateway calls.
#[derive(Clone)]
pub struct ExportApi(pub fhirmesh_core::export::DynExportService);

impl std::fmt::Debug for ExportApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExportApi")
    }
}

pub(crate) struct Gateway {
    pub service: DynResourceService,
    pub exports: Option<fhirmesh_core::export::DynExportService>,
    pub config: GatewayConfig,
    pub http_metrics: metrics::HttpMetrics,
    /// When this gateway started (CapabilityStatement.date).
    pub started: String,
}

pub(crate) type SharedGateway = Arc<Gateway>;

/// The HTTP router: the FHIR API under `base_path` (and under `base_path/tenant/{id}` when
/// multi-tenant), plus `/healthz`, `/readyz` and `/metrics` at the root. `/metadata` and
/// `/.well-known/smart-configuration` are public; every other FHIR route authenticates first.
pub fn router(service: DynResourceService, config: GatewayConfig) -> Router {
    let base_path = config.base_path.clone();
    let multi_tenant = config.multi_tenant;
    let http_metrics = metrics::HttpMetrics::new();
    metrics::register(&config.ops, &http_metrics, &service);
    let ops = config.ops.router();
    let gateway = Arc::new(Gateway {
        service,
        exports: config.exports.as_ref().map(|api| api.0.clone()),
        config,
        http_metrics,
        started: fhirmesh_fhir::datetime::format_instant(time::OffsetDateTime::now_utc()),
    });
    let audit_state = gateway.clone();
    let public = Router::new()
        .route("/metadata", get(handlers::metadata))
        .route("/.well-known/smart-configuration", get(handlers::smart_configuration));
    let protected = Router::new()
        .route("/", get(handlers::search_system).post(handlers::bundle))
        .route("/$export", get(export::kick_off_system).post(export::kick_off_system))
        .route("/Patient/$export", get(export::kick_off_patient).post(export::kick_off_patient))
        .route("/Group/{id}/$export", get(export::kick_off_group).post(export::kick_off_group))
        .route("/$export-status/{job}", get(export::status).delete(export::cancel))
        .route("/$export-file/{job}/{file}", get(export::download))
        .route("/_history", get(handlers::history_system))
        .route(
            "/{rtype}",
            get(handlers::search_type)
                .post(handlers::create)
                .put(handlers::conditional_update)
                .delete(handlers::conditional_delete),
        )
        .route("/{rtype}/$validate", post(handlers::validate_type))
        .route("/{rtype}/{id}/$validate", post(handlers::validate_instance))
        .route("/{rtype}/_search", post(handlers::search_type_post))
        .route("/{rtype}/_history", get(handlers::history_type))
        .route(
            "/{rtype}/{id}",
            get(handlers::read).put(handlers::update).patch(handlers::patch).delete(handlers::delete),
        )
        .route("/{rtype}/{id}/_history", get(handlers::history_instance))
        .route("/{rtype}/{id}/{member}", get(handlers::search_compartment))
        .route("/{rtype}/{id}/_history/{vid}", get(handlers::vread))
        // Innermost first: a raw Binary is negotiated once the caller is authenticated (its
        // content is only stored for a caller who may write Binaries).
        .route_layer(axum::middleware::from_fn_with_state(gateway.clone(), binary::negotiate))
        .route_layer(axum::middleware::from_fn_with_state(gateway.clone(), auth::authenticate));
    let fhir = public
        .merge(protected)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .fallback(handlers::no_route)
        .with_state(gateway);
    let fhir =
        if base_path.is_empty() { fhir } else { Router::new().nest(&base_path, fhir).fallback(handlers::no_route) };
    // A multi-tenant request's `/tenant/{id}` is taken off its path before routing.
    let fhir = tower::service_fn(move |request: Request| {
        let (fhir, base_path) = (fhir.clone(), base_path.clone());
        async move {
            let request = if multi_tenant {
                match auth::tenant_rewrite(&base_path, request) {
                    Ok(request) => request,
                    Err(response) => return Ok(*response),
                }
            } else {
                request
            };
            fhir.oneshot(request).await
        }
    });
    ops.fallback_service(fhir)
        .layer(axum::middleware::from_fn_with_state(audit_state, auth::audit))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(response::panic_response))
}

/// Serves `router` on `listener` until `shutdown` resolves, then drains in-flight requests.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let service = router.into_make_service_with_connect_info::<std::net::SocketAddr>();
    axum::serve(listener, service).with_graceful_shutdown(shutdown).await
}
