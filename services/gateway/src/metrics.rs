//! `GET /metrics`: the OpenMetrics text exposition. The gateway's metric names are declared here
//! and nowhere else; other services of the process append theirs ([`crate::MetricsSource`]).

use axum::body::Body;
use axum::extract::State;
use axum::response::Response;
use fhirmesh_core::ErrorCategory;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, StatusCode};

use crate::SharedGateway;

/// Changes the store committed that the search index has not applied yet.
pub(crate) const SEARCH_INDEX_LAG: &str = "fhirmesh_search_index_lag_changes";
/// The highest change sequence the store committed.
pub(crate) const STORE_LATEST_SEQUENCE: &str = "fhirmesh_store_latest_sequence";
/// The highest change sequence the search index applied.
pub(crate) const SEARCH_INDEX_WATERMARK: &str = "fhirmesh_search_index_watermark";

/// The content type of the OpenMetrics text format.
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

fn gauge(out: &mut String, name: &str, help: &str, value: u64) {
    out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}\n"));
}

pub(crate) async fn metrics(State(gw): State<SharedGateway>) -> Response {
    let mut out = String::new();
    match gw.service.index_status().await {
        Ok(status) => {
            gauge(&mut out, SEARCH_INDEX_LAG, "Committed changes the search index has not applied yet.", status.lag());
            gauge(
                &mut out,
                STORE_LATEST_SEQUENCE,
                "The highest change sequence the store committed.",
                status.latest_sequence,
            );
            gauge(
                &mut out,
                SEARCH_INDEX_WATERMARK,
                "The highest change sequence the search index applied.",
                status.watermark,
            );
        }
        // A deployment without search has no index metrics; anything else is worth a log line.
        Err(error) if error.category == ErrorCategory::Unsupported => {}
        Err(error) => tracing::warn!(%error, "index status unavailable for /metrics"),
    }
    for source in &gw.config.metrics_sources {
        (source.0)(&mut out);
    }
    out.push_str("# EOF\n");
    let mut response = Response::new(Body::from(out));
    *response.status_mut() = StatusCode::OK;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(OPENMETRICS_CONTENT_TYPE));
    response
}
