//! OpenTelemetry across processes: with an OTLP collector in this test, a create sent to a
//! gateway with a client's `traceparent` yields spans of one trace — the gateway's request span
//! (a child of the client's span) and the resource service's gRPC span (a child of the
//! gateway's) — exported by each process under its own `service.name`.

mod support;

use std::sync::{Arc, Mutex};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_is_one_trace_from_the_gateway_through_the_resource_service() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let otlp = format!("http://{}", listener.local_addr().expect("address"));
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

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
    let spans: Vec<Span> =
        collector.0.lock().expect("spans").iter().filter(|s| s.trace_id == trace_id).cloned().collect();

    let request = spans
        .iter()
        .find(|s| s.service == "fhirmesh-gateway" && s.parent_span_id == client_span)
        .unwrap_or_else(|| panic!("no gateway span continuing the client's: {spans:#?}"));
    assert_eq!(request.name, "POST create");
    let call = spans
        .iter()
        .find(|s| s.service == "fhirmesh-resource" && s.parent_span_id == request.span_id)
        .unwrap_or_else(|| panic!("no resource service span under the gateway's: {spans:#?}"));
    assert_eq!(call.name, "/fhirmesh.v1.ResourceService/Create");
    server.abort();
}
