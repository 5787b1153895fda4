//! The gateway: the FHIR R4 REST API over HTTP.
//!
//! What it is: routing, content negotiation, headers (ETag, Last-Modified, Location, Prefer),
//! body limits, `_summary`/`_elements`/`_pretty`, Bundle and OperationOutcome rendering. It calls
//! an `Arc<dyn ResourceService>` — in-process in embedded mode, the gRPC client in the mesh.
//! What it is not: storage, validation or any FHIR interaction logic (that is `fhirmesh-core`).

mod bundle;
mod handlers;
mod metrics;
mod negotiate;
mod response;

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post};
use fhirmesh_core::DynResourceService;
use fhirmesh_core::capabilities::Capabilities;
use tokio::net::TcpListener;

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
}

pub(crate) struct Gateway {
    pub service: DynResourceService,
    pub config: GatewayConfig,
    /// When this gateway started (CapabilityStatement.date).
    pub started: String,
}

pub(crate) type SharedGateway = Arc<Gateway>;

/// The HTTP router: the FHIR API under `base_path`, plus `/healthz` and `/metrics` at the root.
pub fn router(service: DynResourceService, config: GatewayConfig) -> Router {
    let base_path = config.base_path.clone();
    let gateway = Arc::new(Gateway {
        service,
        config,
        started: fhirmesh_fhir::datetime::format_instant(time::OffsetDateTime::now_utc()),
    });
    let metrics_state = gateway.clone();
    let fhir = Router::new()
        .route("/metadata", get(handlers::metadata))
        .route("/", get(handlers::search_system).post(handlers::bundle))
        .route("/_history", get(handlers::history_system))
        .route(
            "/{rtype}",
            get(handlers::search_type)
                .post(handlers::create)
                .put(handlers::conditional_update)
                .delete(handlers::conditional_delete),
        )
        .route("/{rtype}/_search", post(handlers::search_type_post))
        .route("/{rtype}/_history", get(handlers::history_type))
        .route(
            "/{rtype}/{id}",
            get(handlers::read).put(handlers::update).patch(handlers::patch).delete(handlers::delete),
        )
        .route("/{rtype}/{id}/_history", get(handlers::history_instance))
        .route("/{rtype}/{id}/{member}", get(handlers::search_compartment))
        .route("/{rtype}/{id}/_history/{vid}", get(handlers::vread))
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .with_state(gateway);
    let app = if base_path.is_empty() { fhir } else { Router::new().nest(&base_path, fhir) };
    app.route("/healthz", get(handlers::healthz))
        .route("/metrics", get(metrics::metrics).with_state(metrics_state))
        .fallback(handlers::no_route)
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(response::panic_response))
}

/// Serves `router` on `listener` until `shutdown` resolves, then drains in-flight requests.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await
}
