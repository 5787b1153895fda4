//! Binary content through a real gRPC server on 127.0.0.1, in front of the real content service
//! on a temporary `LocalBlobStore`: uploads and downloads stream byte for byte, caps and
//! failures keep their category and store nothing, the tenant travels with each call.

use fhirmesh_blob::LocalBlobStore;
use fhirmesh_core::ErrorCategory;
use fhirmesh_core::binary::Binaries;
use fhirmesh_core::blob::{BlobPrefix, BlobStore};
use fhirmesh_core::model::TenantId;
use futures::TryStreamExt;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;

use super::*;

struct Fixture {
    client: GrpcBinaryClient,
    blobs: Arc<LocalBlobStore>,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn serve() -> Fixture {
    let dir = tempfile::tempdir().expect("temp dir");
    let blobs = Arc::new(LocalBlobStore::open(dir.path().join("blobs")).await.expect("blob store"));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let router = Server::builder().add_service(binary_service_server(Arc::new(Binaries::new(blobs.clone()))));
    tokio::spawn(router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
        let _ = stopped.await;
    }));
    let client = GrpcBinaryClient::connect(addr.to_string()).expect("endpoint");
    Fixture { client, blobs, _dir: dir, _stop: stop }
}

fn ctx(tenant: &str) -> RequestContext {
    RequestContext { tenant: TenantId::parse(tenant).expect("tenant"), ..RequestContext::default() }
}

fn content(len: usize) -> Vec<u8> {
    (0..len).map(|n| (n % 249) as u8).collect()
}

/// `bytes` as an upload body in pieces of `piece` bytes, failing after them when `fail`.
fn body(bytes: &[u8], piece: usize, fail: bool) -> PutBody {
    let mut pieces: Vec<io::Result<Bytes>> = bytes.chunks(piece).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
    if fail {
        pieces.push(Err(io::Error::new(io::ErrorKind::ConnectionReset, "client went away")));
    }
    futures::stream::iter(pieces).boxed()
}

impl Fixture {
    async fn stored(&self, tenant: &str) -> usize {
        let prefix = BlobPrefix::new(&TenantId::parse(tenant).expect("tenant"), "binary/").expect("prefix");
        self.blobs.list(&prefix, None, 100).await.expect("list").entries.len()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_streams_up_and_down_byte_for_byte() {
    let fx = serve().await;
    // Pieces larger than a message: the client cuts them.
    let bytes = content(5 * 1024 * 1024 + 11);
    let stored = fx.client.upload(&ctx("t1"), "application/pdf", body(&bytes, 3 * 1024 * 1024, false), 10 << 20).await;
    let stored = stored.expect("uploaded");
    assert_eq!(stored.size, Some(bytes.len() as u64));
    assert!(stored.key.starts_with("binary/") && stored.sha256.is_some(), "{stored:?}");
    assert_eq!(fx.stored("t1").await, 1);

    let blob = fx.client.download(&ctx("t1"), &stored).await.expect("download");
    assert_eq!((blob.info.size, blob.info.content_type.as_str()), (bytes.len() as u64, "application/pdf"));
    let pieces: Vec<Bytes> = blob.body.try_collect().await.expect("body");
    assert!(pieces.concat() == bytes, "byte-identical");

    // The tenant travels with the call: another tenant has no such content.
    let elsewhere = fx.client.download(&ctx("t2"), &stored).await.expect_err("other tenant");
    assert_eq!(elsewhere.category, ErrorCategory::Gone);

    fx.client.discard(&ctx("t1"), &stored).await.expect("discard");
    assert_eq!(fx.stored("t1").await, 0);
    let gone = fx.client.download(&ctx("t1"), &stored).await.expect_err("discarded");
    assert_eq!(gone.category, ErrorCategory::Gone);

    // Empty content is content too.
    let empty = fx.client.upload(&ctx("t1"), "text/plain", body(&[], 1, false), 10).await.expect("empty");
    assert_eq!(empty.size, Some(0));

    // Local files cannot be presigned: no URL, over the wire too.
    let expiry = Duration::from_secs(60);
    assert_eq!(fx.client.presign_upload(&ctx("t1"), "application/pdf", expiry).await, Ok(None));
    assert_eq!(fx.client.presign_download(&ctx("t1"), &stored, expiry).await, Ok(None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caps_and_broken_uploads_store_nothing() {
    let fx = serve().await;
    let too_large = fx.client.upload(&ctx("t1"), "application/pdf", body(&content(4097), 1000, false), 4096).await;
    let error = too_large.expect_err("past the cap");
    assert_eq!(error.category, ErrorCategory::TooLarge);
    assert!(error.issues[0].diagnostics.contains("4096-byte limit"), "{error:?}");

    // The caller's body fails midway: the upload ends without its last message.
    let broken = fx.client.upload(&ctx("t1"), "application/pdf", body(&content(3000), 1000, true), 4096).await;
    let error = broken.expect_err("broken body");
    assert_eq!(error.category, ErrorCategory::Invalid, "{error:?}");
    assert_eq!(fx.stored("t1").await, 0);

    // A request without its context is refused, not guessed.
    let request = pb::BinaryContentRequest { context: None, content: Some(pb::BinaryContent::default()) };
    let status = fx.client.client.clone().download(request).await.expect_err("no context");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
}
