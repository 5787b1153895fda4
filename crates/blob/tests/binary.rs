//! The Binary content service (`fhirmesh_core::binary::Binaries`) on a real `LocalBlobStore`:
//! streamed uploads with their size and SHA-256, the size cap (nothing kept past it), downloads,
//! tenancy and authorization.

#![allow(clippy::unwrap_used)]

use std::io;
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use fhirmesh_blob::LocalBlobStore;
use fhirmesh_core::auth::{Access, AccessPolicy, Principal, RbacRules};
use fhirmesh_core::binary::{Binaries, BinaryService, ContentRef};
use fhirmesh_core::blob::{BlobPrefix, BlobStore, PutBody};
use fhirmesh_core::model::TenantId;
use fhirmesh_core::{ErrorCategory, RequestContext};
use futures::{StreamExt, TryStreamExt, stream};
use sha2::{Digest, Sha256};

const CHUNK: usize = 64 * 1024;

async fn binaries() -> (Binaries, Arc<LocalBlobStore>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let blobs = Arc::new(LocalBlobStore::open(dir.path().join("blobs")).await.unwrap());
    (Binaries::new(blobs.clone()), blobs, dir)
}

fn ctx(tenant: &str) -> RequestContext {
    RequestContext { tenant: TenantId::parse(tenant).unwrap(), ..RequestContext::default() }
}

/// `len` bytes of a pattern, in chunks of [`CHUNK`].
fn body(len: usize) -> (Vec<u8>, PutBody) {
    let content: Vec<u8> = (0..len).map(|n| (n % 253) as u8).collect();
    let chunks: Vec<io::Result<Bytes>> = content.chunks(CHUNK).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
    (content, stream::iter(chunks).boxed())
}

async fn stored_under(blobs: &LocalBlobStore, tenant: &str) -> usize {
    let prefix = BlobPrefix::new(&TenantId::parse(tenant).unwrap(), "binary/").unwrap();
    blobs.list(&prefix, None, 100).await.unwrap().entries.len()
}

#[tokio::test]
async fn uploads_stream_in_and_back_with_size_and_hash() {
    let (binaries, blobs, _dir) = binaries().await;
    let (content, upload) = body(3 * 1024 * 1024 + 7);
    let stored = binaries.upload(&ctx("t1"), "application/pdf", upload, 8 * 1024 * 1024).await.unwrap();
    assert!(stored.key.starts_with("binary/") && stored.key.len() > 20, "{}", stored.key);
    assert_eq!(stored.size, Some(content.len() as u64));
    let expected_hash = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(&content));
    assert_eq!(stored.sha256, Some(expected_hash));

    let blob = binaries.download(&ctx("t1"), &stored).await.unwrap();
    assert_eq!(blob.info.content_type, "application/pdf");
    let chunks: Vec<Bytes> = blob.body.try_collect().await.unwrap();
    assert_eq!(chunks.concat(), content, "byte-identical");

    // Another upload is other content under another key.
    let (_, again) = body(10);
    let other = binaries.upload(&ctx("t1"), "text/plain", again, 100).await.unwrap();
    assert_ne!(other.key, stored.key);
    assert_eq!(stored_under(&blobs, "t1").await, 2);

    // The same key in another tenant is nothing: keys are tenant-scoped.
    let elsewhere = binaries.download(&ctx("t2"), &stored).await.expect_err("other tenant");
    assert_eq!(elsewhere.category, ErrorCategory::Gone);

    binaries.discard(&ctx("t1"), &stored).await.unwrap();
    let gone = binaries.download(&ctx("t1"), &stored).await.expect_err("discarded");
    assert_eq!(gone.category, ErrorCategory::Gone);
    binaries.discard(&ctx("t1"), &stored).await.expect("discarding twice is no error");
}

#[tokio::test]
async fn content_past_the_cap_is_refused_and_nothing_is_kept() {
    let (binaries, blobs, _dir) = binaries().await;
    let (_, upload) = body(1024 * 1024 + 1);
    let error = binaries.upload(&ctx("t1"), "application/pdf", upload, 1024 * 1024).await.expect_err("too large");
    assert_eq!(error.category, ErrorCategory::TooLarge);
    assert!(error.issues[0].diagnostics.contains("1048576-byte limit"), "{error:?}");
    assert_eq!(stored_under(&blobs, "t1").await, 0);

    // Exactly at the cap is fine.
    let (_, upload) = body(1024 * 1024);
    binaries.upload(&ctx("t1"), "application/pdf", upload, 1024 * 1024).await.unwrap();

    // A body that fails midway (a client that went away) keeps nothing either.
    let failing: PutBody = stream::iter(vec![
        Ok(Bytes::from_static(b"first part")),
        Err(io::Error::new(io::ErrorKind::ConnectionReset, "client went away")),
    ])
    .boxed();
    let error = binaries.upload(&ctx("t2"), "application/pdf", failing, 1024).await.expect_err("failed body");
    assert_eq!(error.category, ErrorCategory::Invalid);
    assert_eq!(stored_under(&blobs, "t2").await, 0);
}

#[tokio::test]
async fn only_callers_that_may_write_binaries_upload() {
    let (binaries, blobs, _dir) = binaries().await;
    let policy = AccessPolicy::Rbac(RbacRules::fhir_works_defaults());
    let auditor = Principal { subject: "u-1".into(), groups: vec!["auditor".into()], ..Default::default() };
    let ctx = RequestContext { access: Arc::new(Access::for_principal(&policy, &auditor).unwrap()), ..ctx("t1") };
    let (_, upload) = body(100);
    let error = binaries.upload(&ctx, "application/pdf", upload, 1024).await.expect_err("read-only caller");
    assert_eq!(error.category, ErrorCategory::Forbidden);
    assert_eq!(stored_under(&blobs, "t1").await, 0);

    let pointer = ContentRef { key: "binary/nothing-here".into(), size: None, sha256: None };
    let missing = binaries.download(&ctx, &pointer).await.expect_err("no such content");
    assert_eq!(missing.category, ErrorCategory::Gone);
    let presign = binaries.presign_upload(&ctx, "application/pdf", std::time::Duration::from_secs(60)).await;
    assert_eq!(presign.expect_err("read-only caller").category, ErrorCategory::Forbidden);
}

#[tokio::test]
async fn local_files_cannot_be_presigned() {
    let (binaries, _blobs, _dir) = binaries().await;
    let expiry = std::time::Duration::from_secs(60);
    assert_eq!(binaries.presign_upload(&ctx("t1"), "application/pdf", expiry).await, Ok(None));
    let pointer = ContentRef { key: "binary/abc".into(), size: None, sha256: None };
    assert_eq!(binaries.presign_download(&ctx("t1"), &pointer, expiry).await, Ok(None));
}
