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

use std::sync::Arc;
use std::time::Duration;

use fhirmesh_core::{DynResourceService, ErrorCategory};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

type RequestLabels = [(&'static str, String); 2];
type InteractionLabels = [(&'static str, String); 1];

/// Buckets of a request's duration, in seconds: 1 ms to 60 s.
const DURATION_BUCKETS: [f64; 14] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0, 60.0];

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

/// The HTTP request metrics (cheap to clone).
#[derive(Clone)]
pub(crate) struct HttpMetrics {
    registry: Arc<Registry>,
    requests: Family<RequestLabels, Counter>,
    durations: Family<InteractionLabels, Histogram>,
}

impl HttpMetrics {
    pub(crate) fn new() -> HttpMetrics {
        let requests = Family::<RequestLabels, Counter>::default();
        let durations =
            Family::<InteractionLabels, Histogram>::new_with_constructor(duration_histogram as fn() -> Histogram);
        let mut registry = Registry::with_prefix("fhirmesh_gateway");
        registry.register("requests", "HTTP requests answered, by FHIR interaction and status", requests.clone());
        registry.register_with_unit(
            "request_duration",
            "HTTP request to response headers, by FHIR interaction",
            Unit::Seconds,
            durations.clone(),
        );
        HttpMetrics { registry: Arc::new(registry), requests, durations }
    }

    pub(crate) fn record(&self, interaction: &'static str, status: u16, elapsed: Duration) {
        self.durations.get_or_create(&[("interaction", interaction.to_owned())]).observe(elapsed.as_secs_f64());
        self.requests.get_or_create(&[("interaction", interaction.to_owned()), ("code", status.to_string())]).inc();
    }

    fn render(&self, out: &mut String) {
        let _ = prometheus_client::encoding::text::encode_registry(out, &self.registry);
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
