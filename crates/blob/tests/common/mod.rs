//! One conformance suite for every `BlobStore` adapter: `tests/local.rs` and `tests/s3.rs` run each
//! check against their backend, so both keep the same contract.

#![allow(dead_code, clippy::unwrap_used)]

use std::future::Future;
use std::io;
use std::time::Duration;

use bytes::Bytes;
use fhirmesh_core::TenantId;
use fhirmesh_core::blob::{BlobError, BlobKey, BlobPrefix, BlobStore, ByteRange, MAX_PRESIGN_EXPIRY, PutBody};
use futures::StreamExt;
use futures::stream;

/// Every test body runs under this bound.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs `test`, failing it if it takes longer than [`TEST_TIMEOUT`].
pub async fn bounded<F: Future>(test: F) -> F::Output {
    match tokio::time::timeout(TEST_TIMEOUT, test).await {
        Ok(output) => output,
        Err(_) => panic!("test did not finish within {TEST_TIMEOUT:?}"),
    }
}

/// Polls `check` every 20 ms until it holds, failing after `within`.
pub async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out after {within:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn tenant(name: &str) -> TenantId {
    TenantId::parse(name).unwrap()
}

pub fn key(tenant_name: &str, path: &str) -> BlobKey {
    BlobKey::new(&tenant(tenant_name), path).unwrap()
}

/// `len` pseudo-random bytes (xorshift), different for each seed, so misplaced chunks show.
pub fn pattern(len: usize, seed: u64) -> Bytes {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    Bytes::from(out)
}

/// `data` as a stream of chunks of varying sizes (1 byte up to about 40 KiB).
pub fn chunked(data: Bytes) -> (PutBody, usize) {
    let mut chunks = Vec::new();
    let mut offset = 0;
    let mut size = 1;
    while offset < data.len() {
        let take = size.min(data.len() - offset);
        chunks.push(Ok(data.slice(offset..offset + take)));
        offset += take;
        size = (size * 7 + 3) % 40_000 + 1;
    }
    let count = chunks.len();
    (stream::iter(chunks).boxed(), count)
}

/// A body that yields `data` and then fails, as a client that disconnects mid-upload.
pub fn failing_after(data: Bytes) -> PutBody {
    stream::iter(vec![Ok(data), Err(io::Error::new(io::ErrorKind::ConnectionReset, "client went away"))]).boxed()
}

/// Reads a whole blob, returning its bytes and how many chunks the stream yielded.
pub async fn read_all(store: &dyn BlobStore, key: &BlobKey) -> Option<(Bytes, usize, Vec<usize>)> {
    let blob = store.get(key).await.unwrap()?;
    let mut body = blob.body;
    let mut out = Vec::new();
    let mut sizes = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.unwrap();
        sizes.push(chunk.len());
        out.extend_from_slice(&chunk);
    }
    let count = sizes.len();
    Some((Bytes::from(out), count, sizes))
}

/// put / head / get of a small blob, and of an empty one; missing keys read as `None`.
pub async fn round_trip(store: &dyn BlobStore) {
    let k = key("acme", "binary/Binary-1");
    let body = Bytes::from_static(b"{\"resourceType\":\"Patient\"}");
    let info = store.put_bytes(&k, "application/fhir+json", body.clone()).await.unwrap();
    assert_eq!(info.key, k);
    assert_eq!(info.size, body.len() as u64);
    assert_eq!(info.content_type, "application/fhir+json");
    assert!(info.etag.as_deref().is_some_and(|e| !e.is_empty() && !e.contains('"')), "{:?}", info.etag);

    let head = store.head(&k).await.unwrap().expect("head finds the blob");
    assert_eq!((head.size, head.content_type.as_str()), (body.len() as u64, "application/fhir+json"));
    assert_eq!(head.etag, info.etag);
    assert!(head.last_modified.is_some());

    let blob = store.get(&k).await.unwrap().expect("get finds the blob");
    assert_eq!(blob.info.size, body.len() as u64);
    assert_eq!(blob.info.content_type, "application/fhir+json");
    assert_eq!(blob.range, 0..body.len() as u64);
    assert_eq!(blob.into_bytes(1 << 20).await.unwrap(), body);

    let empty = key("acme", "binary/empty");
    let info = store.put(&empty, "application/octet-stream", stream::empty().boxed()).await.unwrap();
    assert_eq!(info.size, 0);
    let blob = store.get(&empty).await.unwrap().expect("empty blob exists");
    assert_eq!((blob.info.size, blob.range.clone()), (0, 0..0));
    assert!(blob.into_bytes(10).await.unwrap().is_empty());

    let missing = key("acme", "binary/missing");
    assert!(store.get(&missing).await.unwrap().is_none());
    assert!(store.head(&missing).await.unwrap().is_none());
}

/// A body of `len` bytes in hundreds of uneven chunks comes back byte-identical, as a stream of
/// several chunks. Returns the chunk sizes the read yielded.
pub async fn streams_large_body(store: &dyn BlobStore, len: usize) -> Vec<usize> {
    let k = key("acme", "export/job-1/Patient.ndjson");
    let data = pattern(len, 7);
    let (body, chunks) = chunked(data.clone());
    assert!(chunks > 100, "the body should be sent in many chunks, not {chunks}");
    let info = store.put(&k, "application/fhir+ndjson", body).await.unwrap();
    assert_eq!(info.size, len as u64);
    assert_eq!(store.head(&k).await.unwrap().map(|h| h.size), Some(len as u64));
    let (read, count, sizes) = read_all(store, &k).await.unwrap();
    assert!(count > 1, "a {len}-byte blob should stream in several chunks");
    assert_eq!(read.len(), data.len());
    assert!(read == data, "content differs");
    sizes
}

/// A second put replaces content, content type and etag.
pub async fn replace(store: &dyn BlobStore) {
    let k = key("acme", "binary/replaced");
    let first = store.put_bytes(&k, "text/plain", Bytes::from_static(b"first version")).await.unwrap();
    let second = store.put_bytes(&k, "application/pdf", Bytes::from_static(b"second")).await.unwrap();
    assert_ne!(first.etag, second.etag, "the etag must change with the content");
    let blob = store.get(&k).await.unwrap().unwrap();
    assert_eq!(blob.info.content_type, "application/pdf");
    assert_eq!(blob.info.etag, second.etag);
    assert_eq!(blob.into_bytes(100).await.unwrap(), Bytes::from_static(b"second"));
}

/// A body that fails mid-way stores nothing: a new key stays absent, an existing blob unchanged.
pub async fn failed_body_stores_nothing(store: &dyn BlobStore) {
    let fresh = key("acme", "binary/never");
    let err = store.put(&fresh, "text/plain", failing_after(pattern(100_000, 1))).await.unwrap_err();
    assert!(matches!(err, BlobError::Body(ref m) if m.contains("client went away")), "{err:?}");
    assert!(store.head(&fresh).await.unwrap().is_none());

    let kept = key("acme", "binary/kept");
    store.put_bytes(&kept, "text/plain", Bytes::from_static(b"original")).await.unwrap();
    let err = store.put(&kept, "application/pdf", failing_after(pattern(100_000, 2))).await.unwrap_err();
    assert!(matches!(err, BlobError::Body(_)), "{err:?}");
    let blob = store.get(&kept).await.unwrap().unwrap();
    assert_eq!(blob.info.content_type, "text/plain");
    assert_eq!(blob.into_bytes(100).await.unwrap(), Bytes::from_static(b"original"));
    assert_eq!(
        store.list(&BlobPrefix::new(&tenant("acme"), "binary/").unwrap(), None, 100).await.unwrap().entries.len(),
        1
    );
}

/// Byte ranges: bounded, open-ended, clipped at the end, and past the end.
pub async fn ranges(store: &dyn BlobStore) {
    let k = key("acme", "binary/ranged");
    let data = pattern(1000, 3);
    store.put_bytes(&k, "application/octet-stream", data.clone()).await.unwrap();
    let k = &k;
    let read = |range: ByteRange| async move {
        let blob = store.get_range(k, Some(range)).await?.expect("exists");
        let (info, served) = (blob.info.clone(), blob.range.clone());
        Ok::<_, BlobError>((info.size, served, blob.into_bytes(10_000).await?))
    };
    let (size, served, bytes) = read(ByteRange::new(10, Some(20)).unwrap()).await.unwrap();
    assert_eq!((size, served, bytes), (1000, 10..20, data.slice(10..20)));
    let (_, served, bytes) = read(ByteRange::from_start(990)).await.unwrap();
    assert_eq!((served, bytes), (990..1000, data.slice(990..)));
    let (_, served, bytes) = read(ByteRange::new(995, Some(5000)).unwrap()).await.unwrap();
    assert_eq!((served, bytes), (995..1000, data.slice(995..)));
    assert_eq!(read(ByteRange::from_start(1000)).await.unwrap_err(), BlobError::RangeNotSatisfiable { size: 1000 });
    let missing = key("acme", "binary/no-such");
    assert!(store.get_range(&missing, Some(ByteRange::from_start(0))).await.unwrap().is_none());
}

/// The same path in two tenants is two blobs; listing, deleting and prefix deletion stay inside one.
pub async fn tenant_isolation(store: &dyn BlobStore) {
    let (a, b) = (key("tenant-a", "binary/shared-id"), key("tenant-b", "binary/shared-id"));
    store.put_bytes(&a, "text/plain", Bytes::from_static(b"of a")).await.unwrap();
    store.put_bytes(&b, "text/plain", Bytes::from_static(b"of b")).await.unwrap();
    assert_eq!(store.get(&a).await.unwrap().unwrap().into_bytes(10).await.unwrap(), Bytes::from_static(b"of a"));
    assert_eq!(store.get(&b).await.unwrap().unwrap().into_bytes(10).await.unwrap(), Bytes::from_static(b"of b"));

    let listed = store.list(&BlobPrefix::tenant_root(&tenant("tenant-a")), None, 100).await.unwrap();
    assert_eq!(listed.entries.iter().map(|e| e.key.clone()).collect::<Vec<_>>(), vec![a.clone()]);

    store.delete(&a).await.unwrap();
    assert!(store.head(&a).await.unwrap().is_none());
    assert!(store.head(&b).await.unwrap().is_some(), "deleting in tenant-a removed tenant-b's blob");

    store.put_bytes(&a, "text/plain", Bytes::from_static(b"again")).await.unwrap();
    assert_eq!(store.delete_prefix(&BlobPrefix::tenant_root(&tenant("tenant-a"))).await.unwrap(), 1);
    assert!(store.head(&b).await.unwrap().is_some(), "tenant-a's prefix deletion reached tenant-b");
    // A tenant whose name is a prefix of another's does not see the other's blobs.
    let c = key("tenant", "binary/shared-id");
    assert!(store.head(&c).await.unwrap().is_none());
    assert!(store.list(&BlobPrefix::tenant_root(&tenant("tenant")), None, 100).await.unwrap().entries.is_empty());
}

/// Deleting is idempotent.
pub async fn delete_is_idempotent(store: &dyn BlobStore) {
    let k = key("acme", "binary/deleted");
    store.delete(&k).await.unwrap();
    store.put_bytes(&k, "text/plain", Bytes::from_static(b"x")).await.unwrap();
    store.delete(&k).await.unwrap();
    assert!(store.get(&k).await.unwrap().is_none());
    store.delete(&k).await.unwrap();
    assert!(store.head(&k).await.unwrap().is_none());
}

/// Listing: string-prefix semantics, byte order, sizes, paging with a cursor; prefix deletion.
pub async fn list_and_delete_prefix(store: &dyn BlobStore) {
    let t = tenant("acme");
    let paths = [
        "exports/job-1/Observation.ndjson",
        "exports/job-1/Patient.ndjson",
        "exports/job-1/Encounter.ndjson",
        "exports/job-10/Patient.ndjson",
        "exports/job-2/Patient.ndjson",
        "binary/unrelated",
    ];
    for (i, path) in paths.iter().enumerate() {
        store.put_bytes(&key("acme", path), "application/fhir+ndjson", pattern(10 + i, i as u64)).await.unwrap();
    }
    let names =
        |page: &fhirmesh_core::blob::BlobPage| page.entries.iter().map(|e| e.key.path().to_owned()).collect::<Vec<_>>();

    let job1 = store.list(&BlobPrefix::new(&t, "exports/job-1/").unwrap(), None, 100).await.unwrap();
    assert_eq!(
        names(&job1),
        ["exports/job-1/Encounter.ndjson", "exports/job-1/Observation.ndjson", "exports/job-1/Patient.ndjson"]
    );
    assert_eq!(job1.next, None);
    assert_eq!(job1.entries.iter().map(|e| e.size).collect::<Vec<_>>(), [12, 10, 11]);
    assert!(job1.entries.iter().all(|e| e.etag.is_some()));

    let loose = store.list(&BlobPrefix::new(&t, "exports/job-1").unwrap(), None, 100).await.unwrap();
    assert_eq!(names(&loose).len(), 4, "a prefix without '/' also matches job-10: {:?}", names(&loose));

    // Pages of two, following the cursor, cover everything exactly once, in order.
    let all = BlobPrefix::new(&t, "exports/").unwrap();
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..10 {
        let page = store.list(&all, after.as_deref(), 2).await.unwrap();
        assert!(page.entries.len() <= 2);
        seen.extend(names(&page));
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    let mut expected: Vec<String> = paths[..5].iter().map(|p| p.to_string()).collect();
    expected.sort();
    assert_eq!(seen, expected);

    assert!(matches!(store.list(&all, Some("bad cursor\n"), 2).await, Err(BlobError::InvalidKey(_))));

    assert_eq!(store.delete_prefix(&BlobPrefix::new(&t, "exports/job-1/").unwrap()).await.unwrap(), 3);
    assert_eq!(
        names(&store.list(&all, None, 100).await.unwrap()),
        ["exports/job-10/Patient.ndjson", "exports/job-2/Patient.ndjson"]
    );
    assert_eq!(store.delete_prefix(&all).await.unwrap(), 2);
    assert!(store.list(&all, None, 100).await.unwrap().entries.is_empty());
    assert_eq!(store.delete_prefix(&all).await.unwrap(), 0);
    assert!(store.head(&key("acme", "binary/unrelated")).await.unwrap().is_some());
}

/// Bad arguments fail with `Invalid`, the same on every backend.
pub async fn rejects_invalid_arguments(store: &dyn BlobStore) {
    let k = key("acme", "binary/x");
    for content_type in ["", "no-slash", "text/plain\r\nx-evil: 1"] {
        let err = store.put_bytes(&k, content_type, Bytes::from_static(b"x")).await.unwrap_err();
        assert!(matches!(err, BlobError::Invalid(_)), "{content_type:?}: {err:?}");
    }
    assert!(store.head(&k).await.unwrap().is_none());
    for expiry in [Duration::ZERO, MAX_PRESIGN_EXPIRY + Duration::from_secs(1)] {
        assert!(matches!(store.presign_get(&k, expiry).await, Err(BlobError::Invalid(_))));
        assert!(matches!(store.presign_put(&k, "text/plain", expiry).await, Err(BlobError::Invalid(_))));
    }
    // A key cannot even be built to escape its tenant.
    for bad in ["../tenant-b/binary/x", "/etc/passwd", "binary/../../x", "binary//x"] {
        assert!(matches!(BlobKey::new(&tenant("acme"), bad), Err(BlobError::InvalidKey(_))), "{bad}");
    }
    assert!(matches!(BlobPrefix::new(&tenant("acme"), "../"), Err(BlobError::InvalidKey(_))));
}
