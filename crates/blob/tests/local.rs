//! `LocalBlobStore` against a real temporary directory: the shared conformance suite, plus what only
//! the filesystem can show (on-disk layout, temp-file-and-rename atomicity, cleanup).

#![allow(clippy::unwrap_used)]

mod common;

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use common::{bounded, eventually, key, pattern, read_all, tenant};
use fhirmesh_blob::LocalBlobStore;
use fhirmesh_blob::local::CHUNK_SIZE;
use fhirmesh_core::blob::{BlobError, BlobPrefix, BlobStore, PutBody};
use futures::StreamExt;
use futures::stream;
use tokio::sync::mpsc;

async fn store() -> (LocalBlobStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalBlobStore::open(dir.path().join("blobs")).await.unwrap();
    (store, dir)
}

/// Every file (not directory) under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            if entry.file_type().unwrap().is_dir() {
                pending.push(entry.path());
            } else {
                out.push(entry.path());
            }
        }
    }
    out.sort();
    out
}

/// A body fed through a channel, so a test controls when each chunk arrives and when it ends.
fn channel_body() -> (mpsc::Sender<io::Result<Bytes>>, PutBody) {
    let (tx, rx) = mpsc::channel(4);
    let body = stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) }).boxed();
    (tx, body)
}

fn temp_files(dir: &Path) -> Vec<PathBuf> {
    files_under(dir).into_iter().filter(|p| p.to_string_lossy().contains("~tmp-")).collect()
}

#[tokio::test]
async fn round_trip() {
    let (store, _dir) = store().await;
    bounded(common::round_trip(&store)).await;
}

#[tokio::test]
async fn streams_a_multi_megabyte_body_in_chunks_of_at_most_64_kib() {
    let (store, _dir) = store().await;
    let sizes = bounded(common::streams_large_body(&store, 6 * 1024 * 1024 + 17)).await;
    assert!(sizes.iter().all(|&s| s <= CHUNK_SIZE), "a read chunk exceeded {CHUNK_SIZE} bytes");
    assert!(sizes.len() >= 6 * 16, "only {} chunks for 6 MiB", sizes.len());
}

#[tokio::test]
async fn replace() {
    let (store, _dir) = store().await;
    bounded(common::replace(&store)).await;
}

#[tokio::test]
async fn failed_body_stores_nothing_and_leaves_no_temp_file() {
    let (store, dir) = store().await;
    bounded(common::failed_body_stores_nothing(&store)).await;
    assert_eq!(temp_files(dir.path()), Vec::<PathBuf>::new());
}

#[tokio::test]
async fn ranges() {
    let (store, _dir) = store().await;
    bounded(common::ranges(&store)).await;
}

#[tokio::test]
async fn tenant_isolation() {
    let (store, _dir) = store().await;
    bounded(common::tenant_isolation(&store)).await;
}

#[tokio::test]
async fn delete_is_idempotent() {
    let (store, _dir) = store().await;
    bounded(common::delete_is_idempotent(&store)).await;
}

#[tokio::test]
async fn list_and_delete_prefix() {
    let (store, _dir) = store().await;
    bounded(common::list_and_delete_prefix(&store)).await;
}

#[tokio::test]
async fn rejects_invalid_arguments() {
    let (store, _dir) = store().await;
    bounded(common::rejects_invalid_arguments(&store)).await;
}

#[tokio::test]
async fn files_live_under_root_tenant_path_and_nowhere_else() {
    bounded(async {
        let (store, dir) = store().await;
        store.put_bytes(&key("acme", "binary/b1"), "text/plain", Bytes::from_static(b"one")).await.unwrap();
        store.put_bytes(&key("other", "exports/j/P.ndjson"), "text/plain", Bytes::from_static(b"two")).await.unwrap();
        let root = store.root().to_path_buf();
        assert_eq!(files_under(dir.path()).len(), 2);
        assert_eq!(
            files_under(&root),
            vec![root.join("acme/binary/b1~blob"), root.join("other/exports/j/P.ndjson~blob")]
        );
        assert_eq!(store.data_path(&key("acme", "binary/b1")), root.join("acme/binary/b1~blob"));
        // The content follows a small header holding the content type.
        let raw = std::fs::read(root.join("acme/binary/b1~blob")).unwrap();
        assert!(raw.ends_with(b"\n\none"));
        assert!(String::from_utf8_lossy(&raw).contains("content-type: text/plain\n"));
    })
    .await;
}

#[tokio::test]
async fn a_key_and_a_longer_key_through_it_coexist() {
    // `a/b` is a file and `a/b/c` needs `a/b` as a directory: the `~blob` suffix keeps them apart.
    bounded(async {
        let (store, _dir) = store().await;
        store.put_bytes(&key("acme", "a/b"), "text/plain", Bytes::from_static(b"file")).await.unwrap();
        store.put_bytes(&key("acme", "a/b/c"), "text/plain", Bytes::from_static(b"nested")).await.unwrap();
        assert_eq!(read_all(&store, &key("acme", "a/b")).await.unwrap().0, Bytes::from_static(b"file"));
        assert_eq!(read_all(&store, &key("acme", "a/b/c")).await.unwrap().0, Bytes::from_static(b"nested"));
        let page = store.list(&BlobPrefix::new(&tenant("acme"), "a/").unwrap(), None, 10).await.unwrap();
        assert_eq!(page.entries.iter().map(|e| e.key.path()).collect::<Vec<_>>(), ["a/b", "a/b/c"]);
    })
    .await;
}

#[tokio::test]
async fn a_put_streams_to_a_temp_file_and_appears_only_when_complete() {
    bounded(async {
        let (store, dir) = store().await;
        let k = key("acme", "binary/big");
        store.put_bytes(&k, "text/plain", Bytes::from_static(b"old content")).await.unwrap();

        let (tx, body) = channel_body();
        let writer = {
            let (store, k) = (store.clone(), k.clone());
            tokio::spawn(async move { store.put(&k, "application/octet-stream", body).await })
        };
        let data = pattern(3 * 1024 * 1024, 11);
        for chunk in data.chunks(64 * 1024) {
            tx.send(Ok(Bytes::copy_from_slice(chunk))).await.unwrap();
        }
        // The first 3 MiB reach the disk while the body is still open: the put streams.
        eventually("3 MiB in the temp file", Duration::from_secs(10), || {
            let temps = temp_files(dir.path());
            async move {
                temps.first().and_then(|t| std::fs::metadata(t).ok()).is_some_and(|m| m.len() >= 3 * 1024 * 1024)
            }
        })
        .await;
        // Meanwhile readers see the old blob, whole, and listings do not show the temp file.
        let (old, _, _) = read_all(&store, &k).await.unwrap();
        assert_eq!(old, Bytes::from_static(b"old content"));
        let listed = store.list(&BlobPrefix::tenant_root(&tenant("acme")), None, 10).await.unwrap();
        assert_eq!(listed.entries.len(), 1);

        tx.send(Ok(Bytes::from_static(b"tail"))).await.unwrap();
        drop(tx);
        let info = writer.await.unwrap().unwrap();
        assert_eq!(info.size, data.len() as u64 + 4);
        let (new, _, _) = read_all(&store, &k).await.unwrap();
        assert_eq!(&new[..data.len()], &data[..]);
        assert_eq!(&new[data.len()..], b"tail");
        assert_eq!(temp_files(dir.path()), Vec::<PathBuf>::new());
    })
    .await;
}

#[tokio::test]
async fn a_reader_keeps_reading_the_version_it_opened_while_it_is_replaced() {
    bounded(async {
        let (store, _dir) = store().await;
        let k = key("acme", "binary/replaced-under-reader");
        let old = pattern(1024 * 1024, 1);
        let new = pattern(512 * 1024, 2);
        store.put_bytes(&k, "application/octet-stream", old.clone()).await.unwrap();
        let mut reading = store.get(&k).await.unwrap().unwrap();
        let first = reading.body.next().await.unwrap().unwrap();
        store.put_bytes(&k, "application/octet-stream", new.clone()).await.unwrap();
        let mut rest = first.to_vec();
        while let Some(chunk) = reading.body.next().await {
            rest.extend_from_slice(&chunk.unwrap());
        }
        assert!(rest == old[..], "the open reader saw a mix of versions");
        assert!(read_all(&store, &k).await.unwrap().0 == new);
    })
    .await;
}

#[tokio::test]
async fn a_cancelled_put_leaves_the_old_blob_and_no_temp_file() {
    bounded(async {
        let (store, dir) = store().await;
        let k = key("acme", "binary/cancelled");
        store.put_bytes(&k, "text/plain", Bytes::from_static(b"keep me")).await.unwrap();
        let (tx, body) = channel_body();
        let writer = {
            let (store, k) = (store.clone(), k.clone());
            tokio::spawn(async move { store.put(&k, "text/plain", body).await })
        };
        tx.send(Ok(pattern(256 * 1024, 5))).await.unwrap();
        eventually("a temp file", Duration::from_secs(10), || {
            let found = !temp_files(dir.path()).is_empty();
            async move { found }
        })
        .await;
        // The client goes away: the put future is dropped mid-body.
        writer.abort();
        assert!(writer.await.unwrap_err().is_cancelled());
        assert_eq!(temp_files(dir.path()), Vec::<PathBuf>::new());
        assert_eq!(read_all(&store, &k).await.unwrap().0, Bytes::from_static(b"keep me"));
    })
    .await;
}

#[tokio::test]
async fn bodies_over_the_size_limit_are_refused_and_not_stored() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBlobStore::open(dir.path()).await.unwrap().with_max_size(1000);
        let k = key("acme", "binary/limited");
        store.put_bytes(&k, "text/plain", pattern(1000, 1)).await.unwrap();
        let (body, _) = common::chunked(pattern(1001, 2));
        assert_eq!(store.put(&k, "text/plain", body).await.unwrap_err(), BlobError::TooLarge { limit: 1000 });
        assert_eq!(read_all(&store, &k).await.unwrap().0, pattern(1000, 1));
        assert_eq!(temp_files(dir.path()), Vec::<PathBuf>::new());
    })
    .await;
}

#[tokio::test]
async fn cannot_presign_so_returns_none() {
    bounded(async {
        let (store, _dir) = store().await;
        let k = key("acme", "binary/x");
        assert_eq!(store.presign_get(&k, Duration::from_secs(60)).await, Ok(None));
        assert_eq!(store.presign_put(&k, "text/plain", Duration::from_secs(60)).await, Ok(None));
    })
    .await;
}

#[tokio::test]
async fn a_damaged_file_is_an_internal_error_not_a_panic() {
    bounded(async {
        let (store, _dir) = store().await;
        let k = key("acme", "binary/damaged");
        let path = store.data_path(&k);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"not a blob header at all").unwrap();
        assert!(matches!(store.get(&k).await, Err(BlobError::Internal(_))));
        assert!(matches!(store.head(&k).await, Err(BlobError::Internal(_))));
        // Listing skips it rather than failing, and delete still removes it.
        let page = store.list(&BlobPrefix::tenant_root(&tenant("acme")), None, 10).await.unwrap();
        assert!(page.entries.is_empty());
        store.delete(&k).await.unwrap();
        assert!(!path.exists());
    })
    .await;
}

#[tokio::test]
async fn delete_prefix_removes_emptied_directories() {
    bounded(async {
        let (store, _dir) = store().await;
        for name in ["a", "b", "c"] {
            store.put_bytes(&key("acme", &format!("exports/job-7/{name}")), "text/plain", Bytes::new()).await.unwrap();
        }
        store.put_bytes(&key("acme", "exports/job-8/a"), "text/plain", Bytes::new()).await.unwrap();
        let job7 = BlobPrefix::new(&tenant("acme"), "exports/job-7/").unwrap();
        assert_eq!(store.delete_prefix(&job7).await.unwrap(), 3);
        let exports = store.root().join("acme/exports");
        assert!(!exports.join("job-7").exists(), "the emptied job directory stayed");
        assert!(exports.join("job-8/a~blob").exists());
        // A later put into the removed directory recreates it.
        store.put_bytes(&key("acme", "exports/job-7/again"), "text/plain", Bytes::from_static(b"x")).await.unwrap();
        assert!(exports.join("job-7/again~blob").exists());
    })
    .await;
}

#[tokio::test]
async fn reopening_the_root_sees_the_blobs() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let k = key("acme", "binary/durable");
        {
            let store = LocalBlobStore::open(dir.path()).await.unwrap();
            store.put_bytes(&k, "image/png", Bytes::from_static(b"png")).await.unwrap();
        }
        let store = LocalBlobStore::open(dir.path()).await.unwrap();
        let info = store.head(&k).await.unwrap().unwrap();
        assert_eq!((info.size, info.content_type.as_str()), (3, "image/png"));
    })
    .await;
}
