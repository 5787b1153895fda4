//! OpenTelemetry across processes: with an OTLP collector in this test, a create sent to a
//! gateway with a client's `traceparent` yields spans of one trace — the gateway's request span
//! (a child of the client's span) and the resource service's gRPC span (a child of the
//! gateway's) — exported by each process under its own `service.name`. In the whole mesh the
//! trace goes on through the store's change and the bus: the indexer's span and the notifier's
//! are children of the resource service's, and the rest-hook receiver gets the notifier's span as
//! its `traceparent`.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use serde_json::json;

/// One exported span: the service that sent it, its trace, its id and its parent's, its name.
#[derive(Debug, Clone)]
struct Span {
    service: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    name: String,
}

#[derive(Default, Clone)]
struct Collector(Arc<Mutex<Vec<Span>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
        let mut spans = self.0.lock().expect("spans");
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref())
                .and_then(|v| match &v.value {
                    Some(opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for span in resource_spans.scope_spans.into_iter().flat_map(|s| s.spans) {
                spans.push(Span {
                    service: service.clone(),
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    name: span.name,
                });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

impl Collector {
    /// Serves an OTLP/gRPC collector on 127.0.0.1; returns it with its endpoint.
    async fn start() -> (Collector, String, tokio::task::JoinHandle<Result<(), tonic::transport::Error>>) {
        let collector = Collector::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let otlp = format!("http://{}", listener.local_addr().expect("address"));
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(collector.clone()))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (collector, otlp, server)
    }

    /// The spans of trace `trace_id` received so far.
    fn trace(&self, trace_id: &str) -> Vec<Span> {
        self.0.lock().expect("spans").iter().filter(|s| s.trace_id == trace_id).cloned().collect()
    }
}

/// The span of `service` whose parent is `parent`, or a panic listing the trace.
fn child<'a>(spans: &'a [Span], service: &str, parent: &str) -> &'a Span {
    spans
        .iter()
        .find(|s| s.service == service && s.parent_span_id == parent)
        .unwrap_or_else(|| panic!("no span of {service} under {parent}: {spans:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_is_one_trace_from_the_gateway_through_the_resource_service() {
    let (collector, otlp, server) = Collector::start().await;

    let dir = tempfile::tempdir().expect("tempdir");
    let env = [("FHIRMESH_TELEMETRY__OTLP_ENDPOINT".to_owned(), otlp)];
    let resource =
        support::spawn_with_env(&["--target", "resource", "--grpc-listen", "127.0.0.1:0"], Some(dir.path()), &env)
            .await;
    let endpoint = format!("http://{}", resource.address);
    let gateway_args = ["--target", "gateway", "--listen", "127.0.0.1:0", "--resource-endpoint", endpoint.as_str()];
    let gateway = support::spawn_with_env(&gateway_args, None, &env).await;

    let (trace_id, client_span) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let response = reqwest::Client::new()
        .post(format!("{}/Patient", gateway.address))
        .header("content-type", "application/fhir+json")
        .header("traceparent", format!("00-{trace_id}-{client_span}-01"))
        .body(json!({"resourceType": "Patient", "name": [{"family": "Traced"}]}).to_string())
        .send()
        .await
        .expect("create");
    assert_eq!(response.status(), 201);

    // A graceful stop exports what each process still buffers.
    assert!(gateway.terminate().await.success());
    assert!(resource.terminate().await.success());
    let spans = collector.trace(trace_id);
    let request = child(&spans, "fhirmesh-gateway", client_span);
    assert_eq!(request.name, "POST create");
    let call = child(&spans, "fhirmesh-resource", &request.span_id);
    assert_eq!(call.name, "/fhirmesh.v1.ResourceService/Create");
    server.abort();
}

/// A rest-hook receiver: the `traceparent` of every callback.
async fn receiver() -> (String, Arc<Mutex<Vec<Option<String>>>>) {
    let received: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the receiver");
    let base = format!("http://{}", listener.local_addr().expect("address"));
    let record = {
        let received = received.clone();
        move |headers: axum::http::HeaderMap| {
            let traceparent = headers.get("traceparent").and_then(|v| v.to_str().ok()).map(str::to_owned);
            received.lock().expect("received").push(traceparent);
            async { axum::http::StatusCode::OK }
        }
    };
    let router = axum::Router::new().fallback(record);
    tokio::spawn(async move { axum::serve(listener, router).await });
    (base, received)
}

async fn until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !done().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_is_one_trace_through_the_bus_to_the_indexer_and_the_rest_hook_receiver() {
    let (collector, otlp, server) = Collector::start().await;
    let mut env = support::mesh_env(&support::Shape::NatsFromChangeLog);
    env.extend([
        ("FHIRMESH_TELEMETRY__OTLP_ENDPOINT".to_owned(), otlp),
        ("FHIRMESH_NOTIFIER__ALLOW_ENDPOINTS".to_owned(), "[\"127.0.0.1\"]".to_owned()),
        ("FHIRMESH_NOTIFIER__ALLOW_INSECURE_HTTP".to_owned(), "true".to_owned()),
    ]);
    let dir = tempfile::tempdir().expect("tempdir");
    let resource =
        support::spawn_with_env(&["--target", "resource", "--grpc-listen", "127.0.0.1:0"], Some(dir.path()), &env)
            .await;
    let endpoint = format!("http://{}", resource.address);
    let relay = support::spawn_with_env(&["--target", "relay"], Some(dir.path()), &env).await;
    let indexer = support::spawn_with_env(&["--target", "indexer"], Some(dir.path()), &env).await;
    let gateway_args = ["--target", "gateway", "--listen", "127.0.0.1:0", "--resource-endpoint", endpoint.as_str()];
    let gateway = support::spawn_with_env(&gateway_args, None, &env).await;
    let mut notifier_env = env.clone();
    notifier_env.push(("FHIRMESH_NOTIFIER__RESOURCE_ENDPOINT".to_owned(), endpoint.clone()));
    let notifier = support::spawn_with_env(&["--target", "notifier"], None, &notifier_env).await;
    let (hook, received) = receiver().await;
    let client = reqwest::Client::new();
    let base = gateway.address.clone();

    let subscription = json!({"resourceType": "Subscription", "status": "requested", "reason": "trace test",
        "criteria": "Observation?code=http://loinc.org|1234-5",
        "channel": {"type": "rest-hook", "endpoint": format!("{hook}/hook")}});
    let response = client
        .post(format!("{base}/Subscription"))
        .header("content-type", "application/fhir+json")
        .body(subscription.to_string())
        .send()
        .await
        .expect("subscribe");
    assert_eq!(response.status(), 201);
    let id = response.json::<serde_json::Value>().await.expect("json")["id"].as_str().expect("id").to_owned();
    until("the Subscription to be active", async || {
        let current: serde_json::Value =
            client.get(format!("{base}/Subscription/{id}")).send().await.expect("read").json().await.expect("json");
        current["status"] == "active"
    })
    .await;

    let (trace_id, client_span) = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");
    let observation = json!({"resourceType": "Observation", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "1234-5"}]}});
    let response = client
        .post(format!("{base}/Observation"))
        .header("content-type", "application/fhir+json")
        .header("traceparent", format!("00-{trace_id}-{client_span}-01"))
        .body(observation.to_string())
        .send()
        .await
        .expect("create");
    assert_eq!(response.status(), 201);
    let created = response.json::<serde_json::Value>().await.expect("json")["id"].as_str().expect("id").to_owned();
    until("the notification", async || !received.lock().expect("received").is_empty()).await;
    until("the Observation to be searchable", async || {
        let bundle: serde_json::Value = client
            .get(format!("{base}/Observation?_id={created}"))
            .send()
            .await
            .expect("search")
            .json()
            .await
            .expect("json");
        bundle["entry"].as_array().is_some_and(|entries| entries.len() == 1)
    })
    .await;

    // A graceful stop exports what each process still buffers.
    for process in [gateway, notifier, indexer, relay, resource] {
        assert!(process.terminate().await.success());
    }
    let spans = collector.trace(trace_id);
    let request = child(&spans, "fhirmesh-gateway", client_span);
    let call = child(&spans, "fhirmesh-resource", &request.span_id);
    assert_eq!(call.name, "/fhirmesh.v1.ResourceService/Create");
    let indexed = child(&spans, "fhirmesh-indexer", &call.span_id);
    assert_eq!(indexed.name, "index");
    let notified = child(&spans, "fhirmesh-notifier", &call.span_id);
    assert_eq!(notified.name, "notify");
    let sent = received.lock().expect("received").clone();
    assert_eq!(sent, vec![Some(format!("00-{trace_id}-{}-01", notified.span_id))], "the receiver continues the trace");
    server.abort();
}
