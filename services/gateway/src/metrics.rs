//! The gateway's metrics, declared here and nowhere else; served with every other source of the
//! process by [`fhirmesh_ops::Ops`] on `/metrics`.
//!
//! | metric | type | meaning |
//! |---|---|---|
//! | `fhirmesh_gateway_requests_total{interaction,code}` | counter | HTTP requests answered, by FHIR interaction (`read`, `vread`, `create`, `update`, `patch`, `delete`, `search-type`, `search-system`, `history-*`, `transaction`, `capabilities`, `operation`) and status code |
//! | `fhirmesh_gateway_request_duration_seconds{interaction}` | histogram | request → response headers |
//! | `fhirmesh_search_index_lag_changes` | gauge | committed changes the search index has not applied yet |
//! | `fhirmesh_store_latest_sequence` | gauge | the highest change sequence the store committed |
//! | `fhirmesh_search_index_watermark` | gauge | the highest change sequence the search index applied |

use std::time::Duration;

use fhirmesh_core::{DynResourceService, ErrorCategory};
use fhirmesh_ops::RequestMetrics;

/// Buckets of a request's duration, in seconds: 1 ms to 60 s.
const DURATION_BUCKETS: [f64; 14] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0, 60.0];

/// The HTTP request metrics (cheap to clone).
#[derive(Clone)]
pub(crate) struct HttpMetrics(RequestMetrics);

impl HttpMetrics {
    pub(crate) fn new() -> HttpMetrics {
        HttpMetrics(RequestMetrics::new(
            "fhirmesh_gateway",
            "HTTP requests answered, by FHIR interaction and status",
            "HTTP request to response headers, by FHIR interaction",
            &DURATION_BUCKETS,
        ))
    }

    pub(crate) fn record(&self, interaction: &'static str, status: u16, elapsed: Duration) {
        self.0.record(&[("interaction", interaction.to_owned())], status.to_string(), elapsed);
    }

    fn render(&self, out: &mut String) {
        self.0.render(out);
    }
}

/// The search index's position against the store's, as the resource service reports it.
async fn index_status(service: DynResourceService) -> String {
    let mut out = String::new();
    match service.index_status().await {
        Ok(status) => fhirmesh_ops::search_index_gauges(&mut out, status.latest_sequence, status.watermark),
        // A deployment without search has no index metrics; anything else is worth a log line.
        Err(error) if error.category == ErrorCategory::Unsupported => {}
        Err(error) => tracing::warn!(%error, "index status unavailable for /metrics"),
    }
    out
}

/// Registers the gateway's metrics with `ops`.
pub(crate) fn register(ops: &fhirmesh_ops::Ops, http: &HttpMetrics, service: &DynResourceService) {
    let http = http.clone();
    ops.metrics(move |out| http.render(out));
    let service = service.clone();
    ops.metrics_async(move || index_status(service.clone()));
}
