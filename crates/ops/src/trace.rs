//! Logs and OpenTelemetry traces of a process.
//!
//! [`install`] sets the process's `tracing` subscriber: log lines (text or JSON) and, when an
//! OTLP endpoint is configured, every span exported over OTLP/gRPC (batched) with the W3C trace
//! context propagator. Spans cross process boundaries as the W3C `traceparent`: the gateway
//! continues a client's, gRPC calls carry it as metadata (see [`crate::grpc`]), and
//! [`traceparent_of`] / [`set_parent`] turn a span into one and back.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Where spans go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Otlp {
    /// The collector's OTLP/gRPC endpoint, e.g. `http://otel-collector:4317`.
    pub endpoint: String,
    /// `service.name` of every span of this process.
    pub service_name: String,
}

/// The installed telemetry; [`Telemetry::shutdown`] exports what is still buffered.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the spans still buffered (a process calls it on its way out).
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(error) = provider.shutdown()
        {
            eprintln!("fhirmesh: could not export the last spans: {error}");
        }
    }
}

/// Installs the process's subscriber: log lines on stderr filtered by `filter` (JSON objects
/// with the current span's fields when `json`), and fhirmesh's spans (info and above, whatever
/// `filter` says) to `otlp` when given. Must run inside
/// a Tokio runtime (the exporter batches on it). A second call leaves the first in place.
pub fn install(filter: tracing_subscriber::EnvFilter, json: bool, otlp: Option<Otlp>) -> Result<Telemetry, String> {
    let provider = match otlp {
        None => None,
        Some(otlp) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(otlp.endpoint.clone())
                .build()
                .map_err(|e| format!("telemetry.otlp_endpoint {}: {e}", otlp.endpoint))?;
            let resource = opentelemetry_sdk::Resource::builder().with_service_name(otlp.service_name).build();
            Some(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build())
        }
    };
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    // Spans are exported whatever the log level: fhirmesh's own, at info and above (libraries'
    // spans would only add noise and volume).
    let spans = provider.as_ref().map(|p| {
        let only_ours = tracing_subscriber::filter::Targets::new()
            .with_target("fhirmesh", tracing_subscriber::filter::LevelFilter::INFO);
        tracing_opentelemetry::layer().with_tracer(p.tracer("fhirmesh")).with_filter(only_ours)
    });
    let lines = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let lines = if json {
        lines.json().flatten_event(true).with_current_span(true).with_span_list(false).with_filter(filter).boxed()
    } else {
        lines.with_filter(filter).boxed()
    };
    // Already installed (tests start several services in one process): keep that one.
    let _ = tracing_subscriber::registry().with(lines).with(spans).try_init();
    Ok(Telemetry { provider })
}

/// The W3C `traceparent` of `span` (`None` when spans are not exported: no trace to continue).
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.remove("traceparent")
}

/// The current span's `traceparent` (see [`traceparent_of`]).
pub fn current_traceparent() -> Option<String> {
    traceparent_of(&tracing::Span::current())
}

/// Makes `span` a child of the remote span `traceparent` names (ignored when malformed), and
/// records its trace id in the span's `trace_id` field when it has one (JSON log lines then
/// carry it).
pub fn set_parent(span: &tracing::Span, traceparent: Option<&str>) {
    if let Some(traceparent) = traceparent {
        let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
        let parent = TraceContextPropagator::new().extract(&carrier);
        if parent.span().span_context().is_valid() {
            let _ = span.set_parent(parent);
        }
    }
    let trace_id = span.context().span().span_context().trace_id();
    if trace_id != opentelemetry::trace::TraceId::INVALID {
        span.record("trace_id", tracing::field::display(trace_id));
    }
}
