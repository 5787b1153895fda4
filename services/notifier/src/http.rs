//! The notifier's own HTTP endpoints when it runs alone (`--target notifier`): `/healthz` (the
//! process is up), `/readyz` (its last read of changes succeeded) and `/metrics` (OpenMetrics).

use std::future::Future;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use fhirmesh_notify::NotifierMetrics;
use tokio::net::TcpListener;

/// The content type of the OpenMetrics text format.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub fn router(metrics: NotifierMetrics) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render))
        .with_state(metrics)
}

async fn readyz(State(metrics): State<NotifierMetrics>) -> impl IntoResponse {
    if metrics.is_ready() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: the notifier cannot read changes")
    }
}

async fn render(State(metrics): State<NotifierMetrics>) -> impl IntoResponse {
    let mut out = String::new();
    metrics.render(&mut out);
    out.push_str("# EOF\n");
    ([(header::CONTENT_TYPE, OPENMETRICS)], out)
}

/// Serves [`router`] on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    metrics: NotifierMetrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(metrics)).with_graceful_shutdown(shutdown).await
}
