//! What every fhirmesh service serves for the people who run it, the same way in every target:
//!
//! - `GET /healthz`: liveness — 200 while the process serves HTTP at all.
//! - `GET /readyz`: readiness — every dependency the service registered with [`Ops::check`]
//!   (its store, index, blob store, job store, upstream gRPC services…) asked at once, each
//!   within [`CHECK_TIMEOUT`]; 200 when all answer, 503 naming the failing ones otherwise, and
//!   503 `draining` once shutdown began (so a load balancer stops sending before the listener
//!   closes). The body is JSON: `{"status": …, "checks": {name: {"ok": bool, "error"?: …}}}`.
//! - `GET /metrics`: the OpenMetrics text exposition of every source registered with
//!   [`Ops::metrics`] / [`Ops::metrics_async`], plus `fhirmesh_build_info` and
//!   `fhirmesh_ready` (1 while not draining).
//!
//! The gateway serves these on its FHIR port; every other target on `ops.listen` ([`serve`]).
//! [`grpc`] adds the standard gRPC health service and request metrics to a gRPC server.

pub mod grpc;
mod requests;
pub mod trace;

pub use requests::RequestMetrics;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::future::BoxFuture;
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// How long one readiness check may take before it counts as failed.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// The content type of the OpenMetrics text format.
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Probe = Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;
type Source = Arc<dyn Fn() -> BoxFuture<'static, String> + Send + Sync>;

/// A service's health, readiness and metrics (cheap to clone: every clone is the same).
#[derive(Clone)]
pub struct Ops {
    inner: Arc<Inner>,
}

struct Inner {
    /// The target this process runs (`fhirmesh_build_info{target}`).
    target: String,
    checks: Mutex<Vec<(String, Probe)>>,
    sources: Mutex<Vec<Source>>,
    draining: watch::Sender<bool>,
}

impl std::fmt::Debug for Ops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ops").field("target", &self.inner.target).finish_non_exhaustive()
    }
}

/// The answer of [`Ops::readiness`].
#[derive(Debug, Clone, PartialEq)]
pub struct Readiness {
    pub ready: bool,
    pub draining: bool,
    /// Each check by name: `Ok` or why it failed.
    pub checks: Vec<(String, Result<(), String>)>,
}

impl Readiness {
    fn to_json(&self) -> Value {
        let status = if self.draining {
            "draining"
        } else if self.ready {
            "ready"
        } else {
            "not_ready"
        };
        let mut checks = Map::new();
        for (name, result) in &self.checks {
            let entry = match result {
                Ok(()) => json!({"ok": true}),
                Err(error) => json!({"ok": false, "error": error}),
            };
            checks.insert(name.clone(), entry);
        }
        json!({"status": status, "checks": checks})
    }
}

impl Ops {
    /// `target` names the service (`gateway`, `resource`, … or `all`).
    pub fn new(target: &str) -> Ops {
        let (draining, _) = watch::channel(false);
        Ops {
            inner: Arc::new(Inner {
                target: target.to_owned(),
                checks: Mutex::new(Vec::new()),
                sources: Mutex::new(Vec::new()),
                draining,
            }),
        }
    }

    /// Registers a readiness check: the service is ready only while `probe` answers `Ok`.
    pub fn check<F, Fut>(&self, name: &str, probe: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        let probe: Probe = Arc::new(move || Box::pin(probe()));
        lock(&self.inner.checks).push((name.to_owned(), probe));
    }

    /// Registers metrics rendered synchronously (OpenMetrics text without `# EOF`).
    pub fn metrics<F>(&self, render: F)
    where
        F: Fn(&mut String) + Send + Sync + 'static,
    {
        let render = Arc::new(render);
        let source: Source = Arc::new(move || {
            let render = render.clone();
            Box::pin(async move {
                let mut out = String::new();
                render(&mut out);
                out
            })
        });
        lock(&self.inner.sources).push(source);
    }

    /// Registers metrics that need an await to render (e.g. a lag read from the store).
    pub fn metrics_async<F, Fut>(&self, render: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = String> + Send + 'static,
    {
        let source: Source = Arc::new(move || Box::pin(render()));
        lock(&self.inner.sources).push(source);
    }

    /// Shutdown began: `/readyz` answers 503 `draining` from now on, and [`Ops::draining`]
    /// resolves.
    pub fn drain(&self) {
        self.inner.draining.send_replace(true);
    }

    pub fn is_draining(&self) -> bool {
        *self.inner.draining.borrow()
    }

    /// Resolves once [`Ops::drain`] was called.
    pub fn draining(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.inner.draining.subscribe();
        async move {
            let _ = rx.wait_for(|draining| *draining).await;
        }
    }

    /// Asks every check at once, each within [`CHECK_TIMEOUT`].
    pub async fn readiness(&self) -> Readiness {
        let checks: Vec<(String, Probe)> = lock(&self.inner.checks).clone();
        let answers = futures::future::join_all(checks.into_iter().map(|(name, probe)| async move {
            let result = match tokio::time::timeout(CHECK_TIMEOUT, probe()).await {
                Ok(result) => result,
                Err(_) => Err(format!("no answer within {} ms", CHECK_TIMEOUT.as_millis())),
            };
            (name, result)
        }))
        .await;
        let draining = self.is_draining();
        let ready = !draining && answers.iter().all(|(_, result)| result.is_ok());
        Readiness { ready, draining, checks: answers }
    }

    /// Every registered source, then the process's own metrics, then `# EOF`.
    pub async fn render_metrics(&self) -> String {
        let sources: Vec<Source> = lock(&self.inner.sources).clone();
        let mut out = String::new();
        for text in futures::future::join_all(sources.iter().map(|source| source())).await {
            out.push_str(&text);
        }
        let version = env!("CARGO_PKG_VERSION");
        out.push_str(&format!(
            "# HELP fhirmesh_build_info The fhirmesh version and the target this process runs.\n\
             # TYPE fhirmesh_build_info gauge\n\
             fhirmesh_build_info{{version=\"{version}\",target=\"{}\"}} 1\n\
             # HELP fhirmesh_ready 1 until shutdown began (readiness checks aside).\n\
             # TYPE fhirmesh_ready gauge\n\
             fhirmesh_ready {}\n",
            self.inner.target,
            u8::from(!self.is_draining()),
        ));
        out.push_str("# EOF\n");
        out
    }

    /// `/healthz`, `/readyz` and `/metrics`.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics))
            .with_state(self.clone())
    }
}

/// The search index's position against the store's, as gauges (shared by the gateway, which asks
/// the resource service, and the indexer, which reads both itself):
/// `fhirmesh_search_index_lag_changes`, `fhirmesh_store_latest_sequence`,
/// `fhirmesh_search_index_watermark`.
pub fn search_index_gauges(out: &mut String, latest_sequence: u64, watermark: u64) {
    let gauges = [
        (
            "fhirmesh_search_index_lag_changes",
            "Committed changes the search index has not applied yet.",
            latest_sequence.saturating_sub(watermark),
        ),
        ("fhirmesh_store_latest_sequence", "The highest change sequence the store committed.", latest_sequence),
        ("fhirmesh_search_index_watermark", "The highest change sequence the search index applied.", watermark),
    ];
    for (name, help, value) in gauges {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}\n"));
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn readyz(State(ops): State<Ops>) -> Response {
    let readiness = ops.readiness().await;
    let status = if readiness.ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, [(header::CONTENT_TYPE, "application/json")], readiness.to_json().to_string()).into_response()
}

async fn metrics(State(ops): State<Ops>) -> Response {
    ([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], ops.render_metrics().await).into_response()
}

/// Serves [`Ops::router`] on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    ops: Ops,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, ops.router()).with_graceful_shutdown(shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn readiness_names_what_fails_and_turns_off_when_draining() {
        let ops = Ops::new("resource");
        ops.check("store", || async { Ok(()) });
        let index_up = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let up = index_up.clone();
        ops.check("index", move || {
            let up = up.load(std::sync::atomic::Ordering::SeqCst);
            async move { if up { Ok(()) } else { Err("connection refused".to_owned()) } }
        });

        let answer = ops.readiness().await;
        assert!(!answer.ready);
        assert_eq!(
            answer.to_json(),
            json!({"status": "not_ready", "checks": {"store": {"ok": true},
                   "index": {"ok": false, "error": "connection refused"}}})
        );

        index_up.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(ops.readiness().await.ready);

        ops.drain();
        let answer = ops.readiness().await;
        assert!(!answer.ready && answer.draining);
        assert_eq!(answer.to_json()["status"], "draining");
    }

    #[tokio::test]
    async fn a_check_that_hangs_fails_after_the_timeout() {
        let ops = Ops::new("binary");
        ops.check("blob store", std::future::pending);
        let answer = ops.readiness().await;
        assert!(!answer.ready);
        assert_eq!(answer.checks[0].1, Err("no answer within 2000 ms".to_owned()));
    }

    #[tokio::test]
    async fn metrics_render_every_source_then_the_process_s_own() {
        let ops = Ops::new("indexer");
        ops.metrics(|out| out.push_str("# TYPE a gauge\na 1\n"));
        ops.metrics_async(|| async { "# TYPE b gauge\nb 2\n".to_owned() });
        let text = ops.render_metrics().await;
        assert!(text.starts_with("# TYPE a gauge\na 1\n# TYPE b gauge\nb 2\n"), "{text}");
        assert!(text.contains("fhirmesh_build_info{version=\""), "{text}");
        assert!(text.contains(",target=\"indexer\"} 1\n"), "{text}");
        assert!(text.contains("\nfhirmesh_ready 1\n"), "{text}");
        assert!(text.ends_with("# EOF\n"));
        ops.drain();
        assert!(ops.render_metrics().await.contains("\nfhirmesh_ready 0\n"));
    }

    #[tokio::test]
    async fn the_endpoints_answer_over_http() {
        let ops = Ops::new("exporter");
        ops.check("jobs", || async { Err("table missing".to_owned()) });
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, ops.clone(), async {
            let _ = stopped.await;
        }));
        let client = reqwest::Client::new();
        let get = |path: &str| client.get(format!("http://{address}{path}")).send();

        let health = get("/healthz").await.expect("healthz");
        assert_eq!(health.status(), 200);
        let ready = get("/readyz").await.expect("readyz");
        assert_eq!(ready.status(), 503);
        let body: Value = ready.json().await.expect("json");
        assert_eq!(body["checks"]["jobs"]["error"], "table missing");
        let metrics = get("/metrics").await.expect("metrics");
        assert_eq!(metrics.headers()[header::CONTENT_TYPE], OPENMETRICS_CONTENT_TYPE);
        assert!(metrics.text().await.expect("text").ends_with("# EOF\n"));

        let _ = stop.send(());
        server.await.expect("join").expect("serve");
    }
}
