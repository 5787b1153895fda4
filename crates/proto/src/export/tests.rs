//! The export API through a real gRPC server on 127.0.0.1: every answer of the service arrives
//! as it left, a download streams byte for byte, errors keep their category.

use std::sync::Mutex;

use bytes::Bytes;
use futures::StreamExt;

use fhirmesh_core::ErrorCategory;
use fhirmesh_core::auth::{Access, AccessPolicy, Principal};
use fhirmesh_core::blob::BlobInfo;
use fhirmesh_core::model::TenantId;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;

use super::*;

/// Records what it was asked and answers from a script.
#[derive(Default)]
struct Scripted {
    kick_offs: Mutex<Vec<(RequestContext, KickOff)>>,
    cancelled: Mutex<Vec<String>>,
}

const FILE_BYTES: usize = 3 * 1024 * 1024 + 17;

fn file_content() -> Vec<u8> {
    (0..FILE_BYTES).map(|n| (n % 251) as u8).collect()
}

fn manifest() -> Manifest {
    Manifest {
        job: JobId::parse("done").expect("id"),
        transaction_time: time::macros::datetime!(2026-06-01 01:02:03.456 UTC),
        request: "http://h/$export?_type=Patient".into(),
        requires_access_token: true,
        output: vec![
            OutputFile { resource_type: "Patient".into(), name: "Patient-1.ndjson".into(), count: 3, bytes: 30 },
            OutputFile { resource_type: "Patient".into(), name: "Patient-2.ndjson".into(), count: 1, bytes: 9 },
        ],
        presigned: [("Patient-2.ndjson".to_owned(), "http://127.0.0.1:9/b/k?X-Amz-Signature=ab".to_owned())]
            .into_iter()
            .collect(),
    }
}

#[async_trait]
impl ExportService for Scripted {
    async fn kick_off(&self, ctx: &RequestContext, kick_off: KickOff) -> Result<JobId, FhirError> {
        if kick_off.params.iter().any(|(name, _)| name == "_bogus") {
            return Err(FhirError::invalid("unknown parameter _bogus").at("_bogus"));
        }
        self.kick_offs.lock().expect("lock").push((ctx.clone(), kick_off));
        Ok(JobId::parse("job-1").expect("id"))
    }

    async fn status(&self, _: &RequestContext, job: &str) -> Result<ExportStatus, FhirError> {
        match job {
            "running" => Ok(ExportStatus::InProgress { progress: "1 of 3 resource types exported".into() }),
            "done" => Ok(ExportStatus::Complete(manifest())),
            "broken" => Ok(ExportStatus::Failed(FhirError::internal("the export failed: disk on fire"))),
            _ => Err(FhirError::not_found(format!("there is no export job '{job}'"))),
        }
    }

    async fn cancel(&self, _: &RequestContext, job: &str) -> Result<(), FhirError> {
        self.cancelled.lock().expect("lock").push(job.to_owned());
        Ok(())
    }

    async fn download(&self, ctx: &RequestContext, job: &str, file: &str) -> Result<Blob, FhirError> {
        if file != "Patient-1.ndjson" {
            return Err(FhirError::new(ErrorCategory::Gone, format!("export file '{file}' has expired")));
        }
        let content = Bytes::from(file_content());
        // Uneven pieces, one bigger than a download message.
        let pieces = vec![content.slice(..10), content.slice(10..2_500_000), content.slice(2_500_000..)];
        let key = BlobKey::new(&ctx.tenant, &format!("export/{job}/{file}")).expect("key");
        let info = BlobInfo {
            key,
            size: FILE_BYTES as u64,
            content_type: "application/fhir+ndjson".into(),
            etag: Some("e1".into()),
            last_modified: Some(time::macros::datetime!(2026-06-01 00:00 UTC)),
        };
        let body = futures::stream::iter(pieces.into_iter().map(Ok)).boxed();
        Ok(Blob { info, range: 0..FILE_BYTES as u64, body })
    }
}

async fn serve(service: Arc<Scripted>) -> (GrpcExportClient, tokio::sync::oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let router = Server::builder().add_service(export_service_server(service));
    tokio::spawn(router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
        let _ = stopped.await;
    }));
    (GrpcExportClient::connect(addr.to_string()).expect("endpoint"), stop)
}

fn ctx() -> RequestContext {
    let principal = Principal { subject: "alice".into(), client_id: Some("app-1".into()), ..Principal::default() };
    RequestContext {
        tenant: TenantId::parse("acme").expect("tenant"),
        access: Arc::new(Access::for_principal(&AccessPolicy::Open, &principal).expect("open policy")),
        ..RequestContext::default()
    }
}

#[tokio::test]
async fn kick_offs_arrive_whole_with_their_caller() {
    let service = Arc::new(Scripted::default());
    let (client, _stop) = serve(service.clone()).await;
    let kick_off = KickOff {
        level: ExportLevel::Group { id: "g1".into() },
        params: vec![("_type".into(), "Patient".into()), ("_type".into(), "Observation".into())],
        lenient: true,
        request_url: "http://h/Group/g1/$export?_type=Patient".into(),
    };
    assert_eq!(client.kick_off(&ctx(), kick_off.clone()).await, Ok(JobId::parse("job-1").expect("id")));
    let seen = service.kick_offs.lock().expect("lock").clone();
    let (seen_ctx, seen_kick_off) = &seen[0];
    assert_eq!(seen_ctx.tenant.as_str(), "acme");
    assert_eq!(seen_ctx.access.principal().map(|p| p.subject.as_str()), Some("alice"), "the owner travels");
    assert_eq!(seen_kick_off.level, kick_off.level);
    assert_eq!(seen_kick_off.params, kick_off.params);
    assert!(seen_kick_off.lenient);
    assert_eq!(seen_kick_off.request_url, kick_off.request_url);

    let bad = KickOff { params: vec![("_bogus".into(), "1".into())], ..kick_off };
    let error = client.kick_off(&ctx(), bad).await.expect_err("refused");
    assert_eq!(error.category, ErrorCategory::Invalid);
    assert_eq!(error.issues[0].expression, Some("_bogus".to_owned()), "the location travels");
}

#[tokio::test]
async fn every_status_arrives_as_it_left() {
    let (client, _stop) = serve(Arc::new(Scripted::default())).await;
    assert_eq!(
        client.status(&ctx(), "running").await,
        Ok(ExportStatus::InProgress { progress: "1 of 3 resource types exported".into() })
    );
    assert_eq!(client.status(&ctx(), "done").await, Ok(ExportStatus::Complete(manifest())));
    match client.status(&ctx(), "broken").await {
        Ok(ExportStatus::Failed(error)) => {
            assert_eq!(error.category, ErrorCategory::Internal);
            assert!(error.to_string().contains("disk on fire"), "{error}");
        }
        other => panic!("expected a failed job, got {other:?}"),
    }
    let missing = client.status(&ctx(), "nope").await.expect_err("not found");
    assert_eq!(missing.category, ErrorCategory::NotFound);
}

#[tokio::test]
async fn downloads_stream_byte_for_byte_and_cancels_arrive() {
    let service = Arc::new(Scripted::default());
    let (client, _stop) = serve(service.clone()).await;
    let blob = client.download(&ctx(), "done", "Patient-1.ndjson").await.expect("download");
    assert_eq!(blob.info.size, FILE_BYTES as u64);
    assert_eq!(blob.info.content_type, "application/fhir+ndjson");
    assert_eq!(blob.info.etag.as_deref(), Some("e1"));
    assert_eq!(blob.info.key.to_string(), "acme/export/done/Patient-1.ndjson");
    let bytes = blob.into_bytes(u64::MAX).await.expect("body");
    assert!(bytes.as_ref() == file_content().as_slice(), "byte-identical");

    let gone = client.download(&ctx(), "done", "Patient-9.ndjson").await.expect_err("expired");
    assert_eq!(gone.category, ErrorCategory::Gone);

    client.cancel(&ctx(), "running").await.expect("cancel");
    assert_eq!(*service.cancelled.lock().expect("lock"), ["running"]);
}

#[tokio::test]
async fn requests_without_a_context_or_with_an_unknown_level_are_invalid() {
    let (client, _stop) = serve(Arc::new(Scripted::default())).await;
    let mut raw = client.client.clone();
    let status = raw
        .kick_off(pb::ExportKickOffRequest { context: None, level: 1, ..Default::default() })
        .await
        .expect_err("no context");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let status = raw
        .kick_off(pb::ExportKickOffRequest { context: Some(context_to_wire(&ctx())), level: 42, ..Default::default() })
        .await
        .expect_err("bad level");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("unknown export level 42"), "{}", status.message());
}
