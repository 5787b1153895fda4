//! The operational side of a gRPC server: the standard `grpc.health.v1.Health` service (the
//! named services and the server as a whole, `""`, SERVING until shutdown begins, then
//! NOT_SERVING) and request metrics:
//!
//! | metric | type | meaning |
//! |---|---|---|
//! | `fhirmesh_grpc_server_requests_total{service,method,code}` | counter | calls answered, by gRPC status name (`OK`, `NOT_FOUND`, …) |
//! | `fhirmesh_grpc_server_request_duration_seconds{service,method}` | histogram | call → response headers (for a streamed response, its start) |
//!
//! A call to a method the server does not have counts as `method="unknown"` (label values stay a
//! bounded set whatever clients send). The status of a streamed or successful response travels
//! in its trailers, after the headers this layer sees: those count as `OK`; a call refused
//! before its response (every error of a unary call) carries its status in the headers.

use std::future::Future;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tokio::net::TcpListener;
use tonic::service::Routes;
use tonic_health::ServingStatus;

use crate::Ops;
use crate::requests::RequestMetrics;

/// Buckets of a call's duration, in seconds: 0.5 ms to 30 s.
const DURATION_BUCKETS: [f64; 14] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0];

/// The request metrics of one gRPC server (cheap to clone).
#[derive(Clone)]
pub struct GrpcMetrics(RequestMetrics);

impl Default for GrpcMetrics {
    fn default() -> Self {
        GrpcMetrics::new()
    }
}

impl GrpcMetrics {
    pub fn new() -> GrpcMetrics {
        GrpcMetrics(RequestMetrics::new(
            "fhirmesh_grpc_server",
            "gRPC calls answered, by status",
            "gRPC call to response headers",
            &DURATION_BUCKETS,
        ))
    }

    /// OpenMetrics text without `# EOF`.
    pub fn render(&self, out: &mut String) {
        self.0.render(out);
    }

    fn record(&self, path: &str, code: &'static str, elapsed: Duration) {
        let (service, method) = split_path(path, code);
        self.0.record(&[("service", service), ("method", method)], code.to_owned(), elapsed);
    }
}

/// `("fhirmesh.v1.ResourceService", "Read")` of `/fhirmesh.v1.ResourceService/Read`; a method
/// the server does not have is `unknown` (of a service named `unknown` when that is not one either).
fn split_path(path: &str, code: &str) -> (String, String) {
    let (service, method) = path.trim_start_matches('/').split_once('/').unwrap_or(("unknown", "unknown"));
    if code == "UNIMPLEMENTED" {
        return ("unknown".to_owned(), "unknown".to_owned());
    }
    (service.to_owned(), method.to_owned())
}

/// The name of a `grpc-status` code (the upper-case names of the gRPC specification).
fn code_name(code: &[u8]) -> &'static str {
    match code {
        b"0" => "OK",
        b"1" => "CANCELLED",
        b"2" => "UNKNOWN",
        b"3" => "INVALID_ARGUMENT",
        b"4" => "DEADLINE_EXCEEDED",
        b"5" => "NOT_FOUND",
        b"6" => "ALREADY_EXISTS",
        b"7" => "PERMISSION_DENIED",
        b"8" => "RESOURCE_EXHAUSTED",
        b"9" => "FAILED_PRECONDITION",
        b"10" => "ABORTED",
        b"11" => "OUT_OF_RANGE",
        b"12" => "UNIMPLEMENTED",
        b"13" => "INTERNAL",
        b"14" => "UNAVAILABLE",
        b"15" => "DATA_LOSS",
        b"16" => "UNAUTHENTICATED",
        _ => "UNKNOWN",
    }
}

/// A tower layer recording [`GrpcMetrics`] for every call.
#[derive(Clone)]
pub struct MetricsLayer(GrpcMetrics);

impl<S> tower::Layer<S> for MetricsLayer {
    type Service = Metered<S>;

    fn layer(&self, inner: S) -> Metered<S> {
        Metered { inner, metrics: self.0.clone() }
    }
}

/// The service of [`MetricsLayer`].
#[derive(Clone)]
pub struct Metered<S> {
    inner: S,
    metrics: GrpcMetrics,
}

impl<S, B, R> tower::Service<http::Request<B>> for Metered<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path().to_owned();
        let metrics = self.metrics.clone();
        let started = Instant::now();
        // One span per call, continuing the caller's trace (W3C `traceparent` metadata).
        let span = tracing::info_span!(
            "grpc call",
            otel.name = %path,
            otel.kind = "server",
            rpc.system = "grpc",
            trace_id = tracing::field::Empty,
        );
        let traceparent = request.headers().get("traceparent").and_then(|v| v.to_str().ok());
        crate::trace::set_parent(&span, traceparent);
        let call = span.in_scope(|| self.inner.call(request));
        Box::pin(tracing::Instrument::instrument(
            async move {
                let result = call.await;
                let code = match &result {
                    Ok(response) => {
                        response.headers().get("grpc-status").map_or("OK", |code| code_name(code.as_bytes()))
                    }
                    Err(_) => "UNAVAILABLE",
                };
                metrics.record(&path, code, started.elapsed());
                result
            },
            span,
        ))
    }
}

/// Serves `routes` on `listener` with the health service (each of `services` and the server as
/// a whole SERVING, NOT_SERVING once `ops` drains) and request metrics (registered with `ops`),
/// until `shutdown` resolves; in-flight calls finish first.
pub async fn serve(
    listener: TcpListener,
    routes: Routes,
    services: &[&str],
    ops: &Ops,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (reporter, health) = tonic_health::server::health_reporter();
    let names: Vec<String> = std::iter::once(String::new()).chain(services.iter().map(|s| (*s).to_owned())).collect();
    for name in &names {
        reporter.set_service_status(name, ServingStatus::Serving).await;
    }
    let draining = ops.draining();
    tokio::spawn(async move {
        draining.await;
        for name in &names {
            reporter.set_service_status(name, ServingStatus::NotServing).await;
        }
    });
    let metrics = GrpcMetrics::new();
    let rendered = metrics.clone();
    ops.metrics(move |out| rendered.render(out));
    // Nagle's algorithm off on every connection (tonic sets it only on listeners it binds
    // itself): a response goes out as several small writes (headers, message, trailers), and with
    // Nagle on the later ones wait for the client's delayed ACK — 40 ms on most calls, measured
    // in `make bench-mesh` (docs/benchmarks.md).
    let incoming = futures::StreamExt::map(tokio_stream::wrappers::TcpListenerStream::new(listener), |accepted| {
        accepted.inspect(|stream| {
            if let Err(error) = stream.set_nodelay(true) {
                tracing::debug!(%error, "cannot set TCP_NODELAY on a gRPC connection");
            }
        })
    });
    tonic::transport::Server::builder()
        .layer(MetricsLayer(metrics))
        .add_routes(routes.add_service(health))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|error| anyhow::anyhow!("gRPC server failed: {error}"))
}

/// The full name of a generated gRPC server's service, e.g. `fhirmesh.v1.ResourceService`.
pub fn name_of<S: tonic::server::NamedService>(_: &S) -> &'static str {
    S::NAME
}

/// A readiness check of an upstream gRPC server: its health service answers SERVING for
/// `service` (`""`: the server as a whole). The channel is lazy: nothing connects until asked.
pub fn health_check(
    channel: tonic::transport::Channel,
    service: &str,
) -> impl Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync + 'static {
    let service = service.to_owned();
    move || {
        let mut client = tonic_health::pb::health_client::HealthClient::new(channel.clone());
        let request = tonic_health::pb::HealthCheckRequest { service: service.clone() };
        Box::pin(async move {
            let answer = client.check(request).await.map_err(|status| match status.code() {
                tonic::Code::Unavailable => format!("unreachable: {}", status.message()),
                code => format!("{code:?}: {}", status.message()),
            })?;
            match answer.into_inner().status() {
                tonic_health::pb::health_check_response::ServingStatus::Serving => Ok(()),
                other => Err(format!("answers {}", other.as_str_name())),
            }
        })
    }
}

/// [`health_check`] of the server at `endpoint` (an `http(s)://` URL), connecting within 2 s.
pub fn health_check_endpoint(
    endpoint: &str,
    service: &str,
) -> Result<impl Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync + 'static, String> {
    let channel = tonic::transport::Endpoint::from_shared(endpoint.to_owned())
        .map_err(|error| format!("invalid endpoint {endpoint}: {error}"))?
        .connect_timeout(Duration::from_secs(2))
        .connect_lazy();
    Ok(health_check(channel, service))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split_into_service_and_method_and_unknown_ones_collapse() {
        assert_eq!(
            split_path("/fhirmesh.v1.ResourceService/Read", "OK"),
            ("fhirmesh.v1.ResourceService".to_owned(), "Read".to_owned())
        );
        assert_eq!(split_path("/anything/Goes", "UNIMPLEMENTED"), ("unknown".to_owned(), "unknown".to_owned()));
        assert_eq!(split_path("garbage", "INTERNAL"), ("unknown".to_owned(), "unknown".to_owned()));
        assert_eq!(code_name(b"5"), "NOT_FOUND");
        assert_eq!(code_name(b"99"), "UNKNOWN");
    }

    #[tokio::test]
    async fn health_follows_draining_and_calls_are_counted() {
        let ops = Ops::new("binary");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        // A server with the health service only: enough to see both sides work.
        let server = tokio::spawn({
            let ops = ops.clone();
            async move {
                serve(listener, Routes::default(), &["fhirmesh.v1.BinaryService"], &ops, async {
                    let _ = stopped.await;
                })
                .await
            }
        });
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{address}")).expect("endpoint").connect_lazy();
        let whole = health_check(channel.clone(), "");
        let named = health_check(channel.clone(), "fhirmesh.v1.BinaryService");
        let other = health_check(channel, "fhirmesh.v1.Nope");
        let mut answer = whole().await;
        for _ in 0..50 {
            if answer.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            answer = whole().await;
        }
        assert_eq!(answer, Ok(()));
        assert_eq!(named().await, Ok(()));
        let refused = other().await.expect_err("a service the server does not have");
        assert!(refused.starts_with("NotFound"), "{refused}");

        ops.drain();
        let mut answer = named().await;
        for _ in 0..50 {
            if answer.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            answer = named().await;
        }
        assert_eq!(answer, Err("answers NOT_SERVING".to_owned()));

        let text = ops.render_metrics().await;
        assert!(
            text.contains(
                "fhirmesh_grpc_server_requests_total{service=\"grpc.health.v1.Health\",method=\"Check\",code=\"OK\"}"
            ),
            "{text}"
        );
        assert!(text.contains("code=\"NOT_FOUND\""), "{text}");
        assert!(text.contains("fhirmesh_grpc_server_request_duration_seconds_bucket{"), "{text}");
        let _ = stop.send(());
        server.await.expect("join").expect("serve");
    }
}
