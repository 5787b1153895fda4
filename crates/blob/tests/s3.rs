//! `S3BlobStore` against the real moto server started by `tools/testinfra/with-infra.sh`
//! (`FHIRMESH_TEST_AWS_ENDPOINT`): the shared conformance suite, plus multipart uploads, aborts,
//! presigned URLs used by a plain HTTP client, provisioning and outage mapping. Every test has its
//! own bucket.

#![allow(clippy::unwrap_used)]

mod common;

use std::io;
use std::time::Duration;

use aws_sdk_s3::Client;
use bytes::Bytes;
use common::{bounded, eventually, key, pattern, read_all, tenant};
use fhirmesh_blob::s3::{ABORT_RULE_ID, MIN_PART_SIZE};
use fhirmesh_blob::{S3BlobStore, S3Options};
use fhirmesh_core::blob::{BlobError, BlobPrefix, BlobStore, PresignMethod, PutBody};
use futures::StreamExt;
use futures::stream;
use tokio::sync::mpsc;

const MIB: usize = 1024 * 1024;

/// Multipart from 5 MiB on, in 5 MiB parts (S3's smallest), so tests stay small.
fn small_parts() -> S3Options {
    S3Options { multipart_threshold: MIN_PART_SIZE, part_size: MIN_PART_SIZE, ..S3Options::default() }
}

/// A client of the moto server (which `tools/testinfra/moto_serial.py` makes answer multipart
/// requests with S3's XML roots, as the SDK expects).
async fn moto_client() -> Client {
    let config = fhirmesh_testinfra::aws_config().await;
    Client::from_conf(aws_sdk_s3::config::Builder::from(&config).force_path_style(true).build())
}

/// A provisioned store in a fresh bucket, and a raw client to inspect the bucket with.
async fn store_with(options: S3Options) -> (S3BlobStore, Client) {
    let client = moto_client().await;
    let bucket = fhirmesh_testinfra::unique_name("fhirmesh-blobs");
    let store = S3BlobStore::new(client.clone(), bucket, options).unwrap();
    store.provision().await.unwrap();
    (store, client)
}

async fn store() -> (S3BlobStore, Client) {
    store_with(small_parts()).await
}

async fn open_uploads(client: &Client, bucket: &str) -> Vec<String> {
    let uploads = client.list_multipart_uploads().bucket(bucket).send().await.unwrap();
    uploads.uploads().iter().filter_map(|u| u.upload_id().map(str::to_owned)).collect()
}

fn channel_body() -> (mpsc::Sender<io::Result<Bytes>>, PutBody) {
    let (tx, rx) = mpsc::channel(4);
    let body = stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) }).boxed();
    (tx, body)
}

#[tokio::test]
async fn round_trip() {
    let (store, _) = store().await;
    bounded(common::round_trip(&store)).await;
}

#[tokio::test]
async fn streams_a_multi_megabyte_body() {
    let (store, _) = store().await;
    bounded(common::streams_large_body(&store, 3 * MIB + 5)).await;
}

#[tokio::test]
async fn replace() {
    let (store, _) = store().await;
    bounded(common::replace(&store)).await;
}

#[tokio::test]
async fn failed_body_stores_nothing() {
    let (store, _) = store().await;
    bounded(common::failed_body_stores_nothing(&store)).await;
}

#[tokio::test]
async fn ranges() {
    let (store, _) = store().await;
    bounded(common::ranges(&store)).await;
}

#[tokio::test]
async fn tenant_isolation() {
    let (store, _) = store().await;
    bounded(common::tenant_isolation(&store)).await;
}

#[tokio::test]
async fn delete_is_idempotent() {
    let (store, _) = store().await;
    bounded(common::delete_is_idempotent(&store)).await;
}

#[tokio::test]
async fn list_and_delete_prefix() {
    let (store, _) = store().await;
    bounded(common::list_and_delete_prefix(&store)).await;
}

#[tokio::test]
async fn rejects_invalid_arguments() {
    let (store, _) = store().await;
    bounded(common::rejects_invalid_arguments(&store)).await;
}

#[tokio::test]
async fn a_body_over_the_threshold_goes_up_in_parts_and_reads_back_identical() {
    bounded(async {
        let (store, client) = store().await;
        let k = key("acme", "binary/large");
        let data = pattern(12 * MIB + 123, 42);
        let (body, _) = common::chunked(data.clone());
        let info = store.put(&k, "application/octet-stream", body).await.unwrap();
        assert_eq!(info.size, data.len() as u64);
        // A multipart object's etag ends in the part count: 5 + 5 + 2 MiB.
        assert!(info.etag.as_deref().is_some_and(|e| e.ends_with("-3")), "etag {:?}", info.etag);
        let head = store.head(&k).await.unwrap().unwrap();
        assert_eq!((head.size, head.content_type.as_str()), (data.len() as u64, "application/octet-stream"));
        let (read, chunks, _) = read_all(&store, &k).await.unwrap();
        assert!(chunks > 1);
        assert!(read == data, "multipart content differs");
        assert_eq!(open_uploads(&client, store.bucket()).await, Vec::<String>::new());

        // At the threshold exactly: one PutObject (a plain etag).
        let at = key("acme", "binary/at-threshold");
        let info = store.put_bytes(&at, "application/octet-stream", pattern(5 * MIB, 1)).await.unwrap();
        assert!(info.etag.as_deref().is_some_and(|e| !e.contains('-')), "etag {:?}", info.etag);
    })
    .await;
}

#[tokio::test]
async fn parts_go_up_while_the_body_is_still_arriving() {
    bounded(async {
        let (store, client) = store().await;
        let k = key("acme", "binary/streamed");
        let (tx, body) = channel_body();
        let writer = {
            let (store, k) = (store.clone(), k.clone());
            tokio::spawn(async move { store.put(&k, "application/octet-stream", body).await })
        };
        let data = pattern(11 * MIB, 9);
        for chunk in data.chunks(256 * 1024) {
            tx.send(Ok(Bytes::copy_from_slice(chunk))).await.unwrap();
        }
        // Two full parts are uploaded before the body ends: the put does not hold the body.
        let bucket = store.bucket().to_owned();
        eventually("two uploaded parts", Duration::from_secs(30), || {
            let (client, bucket, object) = (client.clone(), bucket.clone(), store.object_key(&k));
            async move {
                let uploads = client.list_multipart_uploads().bucket(&bucket).send().await.unwrap();
                let Some(id) = uploads.uploads().first().and_then(|u| u.upload_id()) else { return false };
                let parts = client.list_parts().bucket(&bucket).key(&object).upload_id(id).send().await.unwrap();
                parts.parts().len() >= 2
            }
        })
        .await;
        assert!(store.head(&k).await.unwrap().is_none(), "the object is visible before it is complete");
        drop(tx);
        let info = writer.await.unwrap().unwrap();
        assert_eq!(info.size, data.len() as u64);
        assert!(read_all(&store, &k).await.unwrap().0 == data);
    })
    .await;
}

#[tokio::test]
async fn an_error_mid_stream_aborts_the_multipart_upload() {
    bounded(async {
        let (store, client) = store().await;
        let k = key("acme", "binary/broken");
        let (tx, body) = channel_body();
        let writer = {
            let (store, k) = (store.clone(), k.clone());
            tokio::spawn(async move { store.put(&k, "application/octet-stream", body).await })
        };
        // 6 MiB: the upload starts and its first part goes up...
        tx.send(Ok(pattern(6 * MIB, 3))).await.unwrap();
        let bucket = store.bucket().to_owned();
        eventually("an open multipart upload", Duration::from_secs(30), || {
            let (client, bucket) = (client.clone(), bucket.clone());
            async move { !open_uploads(&client, &bucket).await.is_empty() }
        })
        .await;
        // ...and then the body fails.
        tx.send(Err(io::Error::new(io::ErrorKind::ConnectionReset, "client went away"))).await.unwrap();
        let err = writer.await.unwrap();
        assert!(matches!(err, Err(BlobError::Body(ref m)) if m.contains("client went away")), "{err:?}");
        assert_eq!(open_uploads(&client, store.bucket()).await, Vec::<String>::new());
        assert!(store.head(&k).await.unwrap().is_none());
        let raw = client.list_objects_v2().bucket(store.bucket()).send().await.unwrap();
        assert!(raw.contents().is_empty());
    })
    .await;
}

#[tokio::test]
async fn a_cancelled_put_aborts_its_multipart_upload() {
    bounded(async {
        let (store, client) = store().await;
        let k = key("acme", "binary/cancelled");
        let (tx, body) = channel_body();
        let writer = {
            let (store, k) = (store.clone(), k.clone());
            tokio::spawn(async move { store.put(&k, "application/octet-stream", body).await })
        };
        tx.send(Ok(pattern(6 * MIB, 4))).await.unwrap();
        let bucket = store.bucket().to_owned();
        eventually("an open multipart upload", Duration::from_secs(30), || {
            let (client, bucket) = (client.clone(), bucket.clone());
            async move { !open_uploads(&client, &bucket).await.is_empty() }
        })
        .await;
        // The client goes away: the put future is dropped with the upload open.
        writer.abort();
        assert!(writer.await.unwrap_err().is_cancelled());
        eventually("the upload to be aborted", Duration::from_secs(30), || {
            let (client, bucket) = (client.clone(), bucket.clone());
            async move { open_uploads(&client, &bucket).await.is_empty() }
        })
        .await;
        assert!(store.head(&k).await.unwrap().is_none());
    })
    .await;
}

#[tokio::test]
async fn a_body_over_the_size_limit_is_refused_and_its_upload_aborted() {
    bounded(async {
        let (store, client) = store_with(S3Options { max_size: 6 * MIB as u64, ..small_parts() }).await;
        let k = key("acme", "binary/too-big");
        let (body, _) = common::chunked(pattern(6 * MIB + 1, 5));
        assert_eq!(store.put(&k, "text/plain", body).await.unwrap_err(), BlobError::TooLarge { limit: 6 * MIB as u64 });
        assert_eq!(open_uploads(&client, store.bucket()).await, Vec::<String>::new());
        assert!(store.head(&k).await.unwrap().is_none());
    })
    .await;
}

#[tokio::test]
async fn presigned_urls_round_trip_through_a_plain_http_client() {
    bounded(async {
        let (store, _) = store().await;
        let k = key("acme", "binary/presigned");
        let data = pattern(300_000, 8);
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();

        let put = store.presign_put(&k, "application/pdf", Duration::from_secs(300)).await.unwrap().unwrap();
        assert_eq!(put.method, PresignMethod::Put);
        assert!(put.url.contains("/acme/binary/presigned?"), "{}", put.url);
        let mut request = http.put(&put.url).body(data.clone());
        for (name, value) in &put.headers {
            request = request.header(name, value);
        }
        let response = request.send().await.unwrap();
        assert!(response.status().is_success(), "presigned PUT: {}", response.status());
        let head = store.head(&k).await.unwrap().expect("uploaded through the URL");
        assert_eq!((head.size, head.content_type.as_str()), (data.len() as u64, "application/pdf"));

        let get = store.presign_get(&k, Duration::from_secs(300)).await.unwrap().unwrap();
        assert_eq!(get.method, PresignMethod::Get);
        assert!(get.headers.is_empty(), "{:?}", get.headers);
        let response = http.get(&get.url).send().await.unwrap();
        assert!(response.status().is_success(), "presigned GET: {}", response.status());
        assert_eq!(response.bytes().await.unwrap(), data);
    })
    .await;
}

#[tokio::test]
async fn objects_carry_the_key_prefix_and_the_tenant() {
    bounded(async {
        let (store, client) = store_with(S3Options { key_prefix: "fhir/blobs/".into(), ..small_parts() }).await;
        store.put_bytes(&key("acme", "binary/b1"), "text/plain", Bytes::from_static(b"x")).await.unwrap();
        let raw = client.list_objects_v2().bucket(store.bucket()).send().await.unwrap();
        let keys: Vec<_> = raw.contents().iter().filter_map(|o| o.key()).collect();
        assert_eq!(keys, ["fhir/blobs/acme/binary/b1"]);
        let page = store.list(&BlobPrefix::tenant_root(&tenant("acme")), None, 10).await.unwrap();
        assert_eq!(page.entries.iter().map(|e| e.key.to_string()).collect::<Vec<_>>(), ["acme/binary/b1"]);
    })
    .await;
}

#[tokio::test]
async fn provisioning_is_idempotent_and_installs_the_abort_rule() {
    bounded(async {
        let (store, client) = store().await;
        store.put_bytes(&key("acme", "binary/kept"), "text/plain", Bytes::from_static(b"x")).await.unwrap();
        store.provision().await.unwrap();
        store.provision().await.unwrap();
        assert!(store.head(&key("acme", "binary/kept")).await.unwrap().is_some());
        let lifecycle = client.get_bucket_lifecycle_configuration().bucket(store.bucket()).send().await.unwrap();
        let rule = lifecycle.rules().iter().find(|r| r.id() == Some(ABORT_RULE_ID)).expect("abort rule");
        assert_eq!(rule.abort_incomplete_multipart_upload().and_then(|a| a.days_after_initiation()), Some(1));
    })
    .await;
}

#[tokio::test]
async fn an_unreachable_s3_is_unavailable() {
    bounded(async {
        // A port nothing listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let config = aws_sdk_s3::Config::builder()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .region(aws_sdk_s3::config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_s3::config::Credentials::new("testing", "testing", None, None, "test"))
            .endpoint_url(format!("http://127.0.0.1:{port}"))
            .force_path_style(true)
            .build();
        let options = S3Options { max_attempts: 2, connect_timeout: Duration::from_secs(1), ..small_parts() };
        let store = S3BlobStore::new(Client::from_conf(config), "nowhere", options).unwrap();
        let k = key("acme", "binary/x");
        assert!(matches!(store.head(&k).await, Err(BlobError::Unavailable(_))));
        assert!(matches!(store.get(&k).await, Err(BlobError::Unavailable(_))));
        let err = store.put_bytes(&k, "text/plain", Bytes::from_static(b"x")).await.unwrap_err();
        assert!(matches!(err, BlobError::Unavailable(ref m) if m.contains("acme/binary/x")), "{err:?}");
        assert!(matches!(store.provision().await, Err(BlobError::Unavailable(_))));
    })
    .await;
}

#[tokio::test]
async fn a_missing_bucket_is_an_internal_error() {
    bounded(async {
        let store =
            S3BlobStore::new(moto_client().await, fhirmesh_testinfra::unique_name("absent"), small_parts()).unwrap();
        let err = store.put_bytes(&key("acme", "x"), "text/plain", Bytes::from_static(b"x")).await.unwrap_err();
        assert!(matches!(err, BlobError::Internal(ref m) if m.contains("NoSuchBucket")), "{err:?}");
    })
    .await;
}
