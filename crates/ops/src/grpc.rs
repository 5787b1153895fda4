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
use std::path::Path;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tokio::net::TcpListener;
use tonic::service::Routes;
pub use tonic::transport::ClientTlsConfig;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
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

/// How long a TLS handshake may take before the connection is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS between the services of one mesh (`[grpc] tls_*`): every gRPC server presents this
/// service's certificate and, with `client_auth` (mTLS), accepts only callers presenting a
/// certificate issued by `ca`; every client checks the server's certificate against `ca` (for the
/// endpoint's host, or `server_name`) and presents this service's certificate. Cheap to clone.
#[derive(Clone)]
pub struct GrpcTls {
    ca: Certificate,
    identity: Identity,
    client_auth: bool,
    server_name: Option<String>,
}

impl std::fmt::Debug for GrpcTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcTls")
            .field("client_auth", &self.client_auth)
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl GrpcTls {
    /// From PEM: the CA certificate(s), this service's certificate (chain) and its private key.
    /// Each is checked now, so that a bad file stops the service at start rather than failing
    /// every call later.
    pub fn from_pem(
        ca: impl AsRef<[u8]>,
        cert: impl AsRef<[u8]>,
        key: impl AsRef<[u8]>,
        client_auth: bool,
        server_name: Option<String>,
    ) -> anyhow::Result<GrpcTls> {
        install_crypto_provider();
        let tls = GrpcTls {
            ca: Certificate::from_pem(ca),
            identity: Identity::from_pem(cert, key),
            client_auth,
            server_name,
        };
        tonic::transport::Server::builder().tls_config(tls.server()).map_err(|error| {
            anyhow::anyhow!("cannot serve with this certificate, key and CA: {}", fhirmesh_core::error::chain(&error))
        })?;
        tonic::transport::Endpoint::from_static("https://localhost").tls_config(tls.client()).map_err(|error| {
            anyhow::anyhow!("cannot call with this certificate, key and CA: {}", fhirmesh_core::error::chain(&error))
        })?;
        Ok(tls)
    }

    /// [`GrpcTls::from_pem`] of the files at these paths.
    pub fn load(
        ca_file: &Path,
        cert_file: &Path,
        key_file: &Path,
        client_auth: bool,
        server_name: Option<String>,
    ) -> anyhow::Result<GrpcTls> {
        let read = |path: &Path, what: &str| {
            std::fs::read(path).map_err(|error| anyhow::anyhow!("cannot read the {what} {}: {error}", path.display()))
        };
        GrpcTls::from_pem(
            read(ca_file, "CA certificate")?,
            read(cert_file, "certificate")?,
            read(key_file, "private key")?,
            client_auth,
            server_name,
        )
    }

    /// The server side: this service's certificate, and the callers' checked against the CA.
    pub fn server(&self) -> ServerTlsConfig {
        let config = ServerTlsConfig::new().identity(self.identity.clone()).timeout(TLS_HANDSHAKE_TIMEOUT);
        if self.client_auth { config.client_ca_root(self.ca.clone()) } else { config }
    }

    /// The client side: the server's certificate checked against the CA, this service's presented.
    pub fn client(&self) -> ClientTlsConfig {
        let config = ClientTlsConfig::new()
            .ca_certificate(self.ca.clone())
            .identity(self.identity.clone())
            .timeout(TLS_HANDSHAKE_TIMEOUT);
        match &self.server_name {
            Some(name) => config.domain_name(name.clone()),
            None => config,
        }
    }
}

/// aws-lc-rs as the process's TLS crypto provider, unless one is installed: rustls cannot choose
/// one itself when, as here, dependencies enable more than one.
fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // A race with another installer is harmless: either provider is in place after it.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    }
}

/// Serves `routes` on `listener` with the health service (each of `services` and the server as
/// a whole SERVING, NOT_SERVING once `ops` drains) and request metrics (registered with `ops`),
/// until `shutdown` resolves; in-flight calls finish first. With `tls`, only over TLS (mTLS when
/// it asks for client certificates).
pub async fn serve(
    listener: TcpListener,
    routes: Routes,
    services: &[&str],
    ops: &Ops,
    tls: Option<&GrpcTls>,
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
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder
            .tls_config(tls.server())
            .map_err(|error| anyhow::anyhow!("gRPC TLS: {}", fhirmesh_core::error::chain(&error)))?;
    }
    builder
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
            let answer = client.check(request).await.map_err(|status| {
                // The cause (refused connection, TLS alert, …) is in the status's sources.
                let cause = std::error::Error::source(&status)
                    .map(|source| format!(": {}", fhirmesh_core::error::chain(source)));
                let cause = cause.unwrap_or_default();
                match status.code() {
                    tonic::Code::Unavailable => format!("unreachable: {}{cause}", status.message()),
                    code => format!("{code:?}: {}{cause}", status.message()),
                }
            })?;
            match answer.into_inner().status() {
                tonic_health::pb::health_check_response::ServingStatus::Serving => Ok(()),
                other => Err(format!("answers {}", other.as_str_name())),
            }
        })
    }
}

/// [`health_check`] of the server at `endpoint` (an `http://` URL, or `https://` with `tls`),
/// connecting within 2 s.
pub fn health_check_endpoint(
    endpoint: &str,
    service: &str,
    tls: Option<&GrpcTls>,
) -> Result<impl Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync + 'static, String> {
    let mut channel = tonic::transport::Endpoint::from_shared(endpoint.to_owned())
        .map_err(|error| format!("invalid endpoint {endpoint}: {error}"))?
        .connect_timeout(Duration::from_secs(2));
    if let Some(tls) = tls {
        channel = channel
            .tls_config(tls.client())
            .map_err(|error| format!("gRPC TLS: {}", fhirmesh_core::error::chain(&error)))?;
    }
    let channel = channel.connect_lazy();
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
                serve(listener, Routes::default(), &["fhirmesh.v1.BinaryService"], &ops, None, async {
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

    /// A server with `tls` on a free port, and its `https://` address.
    async fn tls_server(tls: GrpcTls) -> (String, tokio::sync::oneshot::Sender<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let ops = Ops::new("resource");
        tokio::spawn(async move {
            serve(listener, Routes::default(), &[], &ops, Some(&tls), async {
                let _ = stopped.await;
            })
            .await
        });
        (format!("https://{address}"), stop)
    }

    fn tls_of(ca: &fhirmesh_testinfra::tls::TestCa, trusted: &fhirmesh_testinfra::tls::TestCa, name: &str) -> GrpcTls {
        let issued = ca.issue(name);
        GrpcTls::from_pem(trusted.pem(), issued.cert, issued.key, true, None).expect("tls")
    }

    /// The first answer of `endpoint`'s health service within 2 s that is not "unreachable"
    /// (the server task may not be accepting yet), or the last failure.
    async fn health_over(endpoint: &str, tls: Option<&GrpcTls>) -> Result<(), String> {
        let check = health_check_endpoint(endpoint, "", tls).expect("endpoint");
        let mut answer = check().await;
        for _ in 0..20 {
            if answer.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            answer = check().await;
        }
        answer
    }

    #[tokio::test]
    async fn mtls_serves_only_callers_with_a_certificate_of_the_mesh_ca() {
        use fhirmesh_testinfra::tls::TestCa;
        let (mesh, other) = (TestCa::new("mesh"), TestCa::new("elsewhere"));
        let (endpoint, _stop) = tls_server(tls_of(&mesh, &mesh, "resource")).await;

        assert_eq!(health_over(&endpoint, Some(&tls_of(&mesh, &mesh, "gateway"))).await, Ok(()));
        // A caller whose certificate another CA issued is refused in the handshake (with TLS 1.3
        // the caller learns it at its first request).
        let stranger = health_over(&endpoint, Some(&tls_of(&other, &mesh, "stranger"))).await;
        assert!(stranger.is_err(), "{stranger:?}");
        // A caller that does not trust the mesh CA refuses the server.
        let distrusting = health_over(&endpoint, Some(&tls_of(&mesh, &other, "gateway"))).await;
        assert!(distrusting.as_ref().is_err_and(|e| e.starts_with("unreachable")), "{distrusting:?}");
        // Plain HTTP/2 gets no answer from a TLS server.
        let plain = health_over(&endpoint.replace("https://", "http://"), None).await;
        assert!(plain.is_err(), "{plain:?}");
        // None of that hurt the server.
        assert_eq!(health_over(&endpoint, Some(&tls_of(&mesh, &mesh, "notifier"))).await, Ok(()));
    }

    #[tokio::test]
    async fn without_client_auth_any_caller_that_trusts_the_server_is_served() {
        use fhirmesh_testinfra::tls::TestCa;
        let (mesh, other) = (TestCa::new("mesh"), TestCa::new("elsewhere"));
        let issued = mesh.issue("resource");
        let server = GrpcTls::from_pem(mesh.pem(), issued.cert, issued.key, false, None).expect("tls");
        let (endpoint, _stop) = tls_server(server).await;
        assert_eq!(health_over(&endpoint, Some(&tls_of(&other, &mesh, "stranger"))).await, Ok(()));
        // The name checked in the server's certificate can be set (it has localhost, not this one).
        let issued = mesh.issue("gateway");
        let misnamed =
            GrpcTls::from_pem(mesh.pem(), issued.cert, issued.key, true, Some("resource.example".to_owned()))
                .expect("tls");
        assert!(health_over(&endpoint, Some(&misnamed)).await.is_err());
        let issued = mesh.issue("gateway");
        let named =
            GrpcTls::from_pem(mesh.pem(), issued.cert, issued.key, true, Some("localhost".to_owned())).expect("tls");
        assert_eq!(health_over(&endpoint, Some(&named)).await, Ok(()));
    }

    #[test]
    fn unusable_certificates_keys_and_cas_are_refused_when_loaded() {
        use fhirmesh_testinfra::tls::TestCa;
        let mesh = TestCa::new("mesh");
        let (one, two) = (mesh.issue("one"), mesh.issue("two"));
        let refused = |ca: &str, cert: &str, key: &str| {
            GrpcTls::from_pem(ca, cert, key, true, None).expect_err("refused").to_string()
        };
        assert!(refused("not a certificate", &one.cert, &one.key).contains("CA"), "CA");
        assert!(refused(&mesh.pem(), "not a certificate", &one.key).contains("certificate"));
        assert!(refused(&mesh.pem(), &one.cert, "not a key").contains("key"));
        // A key that is not the certificate's.
        let mismatched = refused(&mesh.pem(), &one.cert, &two.key);
        assert!(mismatched.contains("cannot"), "{mismatched}");
        let dir = tempfile_dir();
        let missing = GrpcTls::load(&dir.join("ca.pem"), &dir.join("c.pem"), &dir.join("k.pem"), true, None)
            .expect_err("no files")
            .to_string();
        assert!(missing.contains("cannot read the CA certificate") && missing.contains("ca.pem"), "{missing}");
    }

    fn tempfile_dir() -> std::path::PathBuf {
        std::env::temp_dir().join(format!("fhirmesh-ops-tls-{}", std::process::id()))
    }
}
