//! Request metrics, the same shape for every server: `{prefix}_requests_total{labels…,code}` (a
//! counter) and `{prefix}_request_duration_seconds{labels…}` (a histogram), labels naming what was
//! asked (a FHIR interaction, a gRPC service and method).

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

type Labels = Vec<(&'static str, String)>;

/// Makes the duration histograms of a label set.
#[derive(Clone)]
struct Buckets(&'static [f64]);

impl MetricConstructor<Histogram> for Buckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(self.0.iter().copied())
    }
}

/// Request counts and durations of one server (cheap to clone).
#[derive(Clone)]
pub struct RequestMetrics {
    registry: Arc<Registry>,
    requests: Family<Labels, Counter>,
    durations: Family<Labels, Histogram, Buckets>,
}

impl RequestMetrics {
    /// `prefix` e.g. `fhirmesh_gateway`; the help texts of the counter and the histogram; the
    /// histogram's `buckets` in seconds.
    pub fn new(prefix: &str, requests_help: &str, duration_help: &str, buckets: &'static [f64]) -> RequestMetrics {
        let requests = Family::<Labels, Counter>::default();
        let durations = Family::new_with_constructor(Buckets(buckets));
        let mut registry = Registry::with_prefix(prefix);
        registry.register("requests", requests_help, requests.clone());
        registry.register_with_unit("request_duration", duration_help, Unit::Seconds, durations.clone());
        RequestMetrics { registry: Arc::new(registry), requests, durations }
    }

    /// One request answered with `code` after `elapsed`.
    pub fn record(&self, labels: &[(&'static str, String)], code: String, elapsed: Duration) {
        let mut labels = labels.to_vec();
        self.durations.get_or_create(&labels).observe(elapsed.as_secs_f64());
        labels.push(("code", code));
        self.requests.get_or_create(&labels).inc();
    }

    /// OpenMetrics text without `# EOF`.
    pub fn render(&self, out: &mut String) {
        let _ = prometheus_client::encoding::text::encode_registry(out, &self.registry);
    }
}
