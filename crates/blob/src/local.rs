//! The local filesystem blob store (embedded mode). Layout and atomicity: see `design.md`.

use std::io::{self, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use bytes::BytesMut;
use fhirmesh_core::blob::{
    Blob, BlobBody, BlobEntry, BlobError, BlobInfo, BlobKey, BlobPage, BlobPrefix, BlobStore, ByteRange,
    MAX_LIST_LIMIT, PresignedUrl, PutBody, check_content_type, check_list_cursor, check_presign_expiry,
};
use futures::stream::{self, StreamExt};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt, BufWriter};

/// Size of the chunks a read streams, and of the write buffer.
pub const CHUNK_SIZE: usize = 64 * 1024;
/// Default [`LocalBlobStore::with_max_size`]: 10 GiB.
pub const DEFAULT_MAX_SIZE: u64 = 10 * 1024 * 1024 * 1024;

/// Suffix of a complete blob's file (`~` is outside the key charset, so data files, temp files and
/// directories named after key segments never collide).
const DATA_SUFFIX: &str = "~blob";
/// Infix of an in-progress write's temp file: `{name}~tmp-{random}`.
const TEMP_INFIX: &str = "~tmp-";
/// First line of every data file.
const MAGIC: &str = "fhirmesh-blob 1\n";
/// The header (magic, content type, etag, blank line) is never longer than this.
const MAX_HEADER_LEN: usize = 1024;

/// Blobs as files under `root/{tenant}/{path}~blob`, each starting with a small text header that
/// holds the content type and etag, so one atomic rename replaces content and metadata together.
#[derive(Debug, Clone)]
pub struct LocalBlobStore {
    root: PathBuf,
    max_size: u64,
}

/// What a data file's header says.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Header {
    content_type: String,
    etag: String,
    /// Bytes before the content.
    len: u64,
}

fn render_header(content_type: &str, etag: &str) -> String {
    format!("{MAGIC}content-type: {content_type}\netag: {etag}\n\n")
}

fn parse_header(buf: &[u8]) -> Option<Header> {
    let rest = buf.strip_prefix(MAGIC.as_bytes())?;
    let end = rest.windows(2).position(|w| w == b"\n\n")?;
    let text = std::str::from_utf8(&rest[..end]).ok()?;
    let mut content_type = None;
    let mut etag = None;
    for line in text.split('\n') {
        if let Some(value) = line.strip_prefix("content-type: ") {
            content_type = Some(value.to_owned());
        } else if let Some(value) = line.strip_prefix("etag: ") {
            etag = Some(value.to_owned());
        }
    }
    Some(Header { content_type: content_type?, etag: etag?, len: (MAGIC.len() + end + 2) as u64 })
}

fn internal(action: &str, path: &Path, err: io::Error) -> BlobError {
    BlobError::Internal(format!("{action} {}: {err}", path.display()))
}

fn is_missing(err: &io::Error) -> bool {
    matches!(err.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory)
}

fn corrupt(path: &Path) -> BlobError {
    BlobError::Internal(format!("{} is not a blob file (bad header)", path.display()))
}

/// A temp file that is removed when dropped unless renamed into place: a failed or cancelled put
/// leaves nothing behind.
struct TempFile {
    path: PathBuf,
    armed: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if self.armed {
            // Unlinking one file is quick; doing it here also covers a put future dropped mid-way.
            if let Err(err) = std::fs::remove_file(&self.path)
                && !is_missing(&err)
            {
                tracing::warn!(path = %self.path.display(), error = %err, "could not remove blob temp file");
            }
        }
    }
}

/// A data file opened for reading, its header read.
struct OpenBlob {
    file: tokio::fs::File,
    path: PathBuf,
    header: Header,
    /// Content bytes (the file minus the header).
    size: u64,
    modified: Option<OffsetDateTime>,
}

/// Reads a data file's header (the file position is undefined afterwards).
async fn read_header(file: &mut tokio::fs::File, path: &Path) -> Result<Header, BlobError> {
    let mut buf = vec![0u8; MAX_HEADER_LEN];
    let mut filled = 0;
    while filled < buf.len() {
        let n = file.read(&mut buf[filled..]).await.map_err(|e| internal("reading", path, e))?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    parse_header(&buf[..filled]).ok_or_else(|| corrupt(path))
}

/// The synchronous twin of [`read_header`] (for listings, which run on the blocking pool).
fn read_header_sync(path: &Path) -> io::Result<Option<(Header, std::fs::Metadata)>> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    let metadata = file.metadata()?;
    let mut buf = Vec::with_capacity(MAX_HEADER_LEN);
    file.take(MAX_HEADER_LEN as u64).read_to_end(&mut buf)?;
    Ok(parse_header(&buf).map(|header| (header, metadata)))
}

fn modified(metadata: &std::fs::Metadata) -> Option<OffsetDateTime> {
    metadata.modified().ok().map(OffsetDateTime::from)
}

/// Streams `len` bytes from the file's current position in chunks of up to [`CHUNK_SIZE`].
fn file_body(file: tokio::fs::File, len: u64, path: PathBuf) -> BlobBody {
    stream::try_unfold((file, len, path), |(mut file, remaining, path)| async move {
        if remaining == 0 {
            return Ok(None);
        }
        let want = remaining.min(CHUNK_SIZE as u64) as usize;
        let mut buf = BytesMut::zeroed(want);
        let n = file.read(&mut buf).await.map_err(|e| internal("reading", &path, e))?;
        if n == 0 {
            return Err(BlobError::Internal(format!("{} ended {remaining} bytes early", path.display())));
        }
        buf.truncate(n);
        Ok(Some((buf.freeze(), (file, remaining - n as u64, path))))
    })
    .boxed()
}

impl LocalBlobStore {
    /// Opens (creating it if needed) a store rooted at `root`.
    pub async fn open(root: impl Into<PathBuf>) -> Result<LocalBlobStore, BlobError> {
        let root = root.into();
        tokio::fs::create_dir_all(&root).await.map_err(|e| internal("creating the blob root", &root, e))?;
        let root = tokio::fs::canonicalize(&root).await.map_err(|e| internal("resolving the blob root", &root, e))?;
        Ok(LocalBlobStore { root, max_size: DEFAULT_MAX_SIZE })
    }

    /// Rejects bodies longer than `max_size` bytes with [`BlobError::TooLarge`].
    pub fn with_max_size(mut self, max_size: u64) -> LocalBlobStore {
        self.max_size = max_size;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory holding the key's file.
    fn dir_of(&self, key: &BlobKey) -> PathBuf {
        let mut dir = self.root.join(key.tenant().as_str());
        let segments: Vec<&str> = key.segments().collect();
        for segment in &segments[..segments.len().saturating_sub(1)] {
            dir.push(segment);
        }
        dir
    }

    /// The file holding the key's blob.
    pub fn data_path(&self, key: &BlobKey) -> PathBuf {
        self.dir_of(key).join(format!("{}{DATA_SUFFIX}", key.file_name()))
    }

    /// Creates a fresh temp file beside the key's data file (creating directories; retried because a
    /// concurrent `delete_prefix` may remove an empty directory in between).
    async fn create_temp(&self, key: &BlobKey) -> Result<(tokio::fs::File, TempFile), BlobError> {
        let dir = self.dir_of(key);
        let mut attempts = 0;
        loop {
            attempts += 1;
            tokio::fs::create_dir_all(&dir).await.map_err(|e| internal("creating directory", &dir, e))?;
            let path = dir.join(format!("{}{TEMP_INFIX}{:016x}", key.file_name(), fastrand::u64(..)));
            match tokio::fs::OpenOptions::new().write(true).create_new(true).open(&path).await {
                Ok(file) => return Ok((file, TempFile { path, armed: true })),
                Err(err)
                    if attempts < 3 && matches!(err.kind(), io::ErrorKind::NotFound | io::ErrorKind::AlreadyExists) =>
                {
                    continue;
                }
                Err(err) => return Err(internal("creating", &path, err)),
            }
        }
    }

    /// Opens a key's data file and reads its header; `None` if there is no blob.
    async fn open_blob(&self, key: &BlobKey) -> Result<Option<OpenBlob>, BlobError> {
        let path = self.data_path(key);
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(file) => file,
            Err(err) if is_missing(&err) => return Ok(None),
            Err(err) => return Err(internal("opening", &path, err)),
        };
        let header = read_header(&mut file, &path).await?;
        let metadata = file.metadata().await.map_err(|e| internal("reading metadata of", &path, e))?;
        let size = metadata.len().checked_sub(header.len).ok_or_else(|| corrupt(&path))?;
        Ok(Some(OpenBlob { file, path, header, size, modified: modified(&metadata) }))
    }

    fn info(key: &BlobKey, header: Header, size: u64, modified: Option<OffsetDateTime>) -> BlobInfo {
        BlobInfo {
            key: key.clone(),
            size,
            content_type: header.content_type,
            etag: Some(header.etag),
            last_modified: modified,
        }
    }

    /// Every blob path (relative to the tenant) matching `prefix` and sorting after `after`, the
    /// smallest `limit + 1` of them, sorted. Runs on the blocking pool.
    fn scan(root: &Path, prefix: &BlobPrefix, after: Option<&str>, limit: usize) -> Result<Vec<String>, BlobError> {
        let tenant_dir = root.join(prefix.tenant().as_str());
        // Start at the deepest directory the prefix names completely.
        let start_rel = match prefix.path().rfind('/') {
            Some(i) => &prefix.path()[..=i],
            None => "",
        };
        let mut found = std::collections::BTreeSet::new();
        let mut pending = vec![(tenant_dir.join(start_rel), start_rel.to_owned())];
        while let Some((dir, rel)) = pending.pop() {
            let entries = match std::fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(err) if is_missing(&err) => continue,
                Err(err) => return Err(internal("listing", &dir, err)),
            };
            for entry in entries {
                let entry = match entry {
                    Ok(entry) => entry,
                    Err(err) if is_missing(&err) => continue,
                    Err(err) => return Err(internal("listing", &dir, err)),
                };
                let Ok(name) = entry.file_name().into_string() else { continue };
                let Ok(file_type) = entry.file_type() else { continue };
                if file_type.is_dir() {
                    let child = format!("{rel}{name}/");
                    if child.starts_with(prefix.path()) || prefix.path().starts_with(&child) {
                        pending.push((entry.path(), child));
                    }
                } else if file_type.is_file()
                    && let Some(stem) = name.strip_suffix(DATA_SUFFIX)
                {
                    let path = format!("{rel}{stem}");
                    let wanted = path.starts_with(prefix.path())
                        && after.is_none_or(|after| path.as_str() > after)
                        && BlobKey::new(prefix.tenant(), &path).is_ok();
                    if wanted {
                        found.insert(path);
                        if found.len() > limit + 1 {
                            found.pop_last();
                        }
                    }
                }
            }
        }
        Ok(found.into_iter().collect())
    }

    /// Removes empty directories on the way to and under the prefix (best effort; a concurrent put
    /// recreates what it needs, see `create_temp`).
    fn prune(root: &Path, prefix: &BlobPrefix) {
        let tenant_dir = root.join(prefix.tenant().as_str());
        fn walk(dir: &Path, rel: &str, prefix: &str, depth: usize) {
            if depth > fhirmesh_core::blob::MAX_KEY_SEGMENTS {
                return;
            }
            let Ok(entries) = std::fs::read_dir(dir) else { return };
            for entry in entries.flatten() {
                let Ok(name) = entry.file_name().into_string() else { continue };
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    let child = format!("{rel}{name}/");
                    if child.starts_with(prefix) || prefix.starts_with(&child) {
                        walk(&entry.path(), &child, prefix, depth + 1);
                        // Fails (harmlessly) unless empty.
                        let _ = std::fs::remove_dir(entry.path());
                    }
                }
            }
        }
        walk(&tenant_dir, "", prefix.path(), 0);
    }
}

#[async_trait]
impl BlobStore for LocalBlobStore {
    async fn put(&self, key: &BlobKey, content_type: &str, mut body: PutBody) -> Result<BlobInfo, BlobError> {
        check_content_type(content_type)?;
        let (file, mut temp) = self.create_temp(key).await?;
        let temp_path = temp.path.clone();
        let etag = format!("{:016x}", fastrand::u64(..));
        let mut writer = BufWriter::with_capacity(CHUNK_SIZE, file);
        writer
            .write_all(render_header(content_type, &etag).as_bytes())
            .await
            .map_err(|e| internal("writing", &temp_path, e))?;
        let mut size: u64 = 0;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| BlobError::Body(e.to_string()))?;
            size += chunk.len() as u64;
            if size > self.max_size {
                return Err(BlobError::TooLarge { limit: self.max_size });
            }
            writer.write_all(&chunk).await.map_err(|e| internal("writing", &temp_path, e))?;
        }
        writer.flush().await.map_err(|e| internal("writing", &temp_path, e))?;
        let file = writer.into_inner();
        file.sync_all().await.map_err(|e| internal("syncing", &temp_path, e))?;
        drop(file);
        let path = self.data_path(key);
        tokio::fs::rename(&temp_path, &path).await.map_err(|e| internal("renaming into", &path, e))?;
        temp.armed = false;
        // Make the rename itself durable. The blob is already visible, so a failure here is logged
        // rather than reported as a failed put.
        let dir = self.dir_of(key);
        let synced = async { tokio::fs::File::open(&dir).await?.sync_all().await }.await;
        if let Err(err) = synced {
            tracing::warn!(dir = %dir.display(), error = %err, "could not sync blob directory");
        }
        tracing::debug!(key = %key, size, "blob stored");
        Ok(BlobInfo {
            key: key.clone(),
            size,
            content_type: content_type.to_owned(),
            etag: Some(etag),
            last_modified: Some(OffsetDateTime::now_utc()),
        })
    }

    async fn get_range(&self, key: &BlobKey, range: Option<ByteRange>) -> Result<Option<Blob>, BlobError> {
        let Some(OpenBlob { mut file, path, header, size, modified }) = self.open_blob(key).await? else {
            return Ok(None);
        };
        let range = match range {
            Some(range) => range.resolve(size)?,
            None => 0..size,
        };
        file.seek(SeekFrom::Start(header.len + range.start)).await.map_err(|e| internal("seeking in", &path, e))?;
        let body = file_body(file, range.end - range.start, path);
        Ok(Some(Blob { info: Self::info(key, header, size, modified), range, body }))
    }

    async fn head(&self, key: &BlobKey) -> Result<Option<BlobInfo>, BlobError> {
        let Some(blob) = self.open_blob(key).await? else { return Ok(None) };
        Ok(Some(Self::info(key, blob.header, blob.size, blob.modified)))
    }

    async fn delete(&self, key: &BlobKey) -> Result<(), BlobError> {
        let path = self.data_path(key);
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(err) if is_missing(&err) => Ok(()),
            Err(err) => Err(internal("removing", &path, err)),
        }
    }

    async fn list(&self, prefix: &BlobPrefix, after: Option<&str>, limit: usize) -> Result<BlobPage, BlobError> {
        if let Some(after) = after {
            check_list_cursor(after)?;
        }
        let limit = limit.clamp(1, MAX_LIST_LIMIT);
        let root = self.root.clone();
        let prefix = prefix.clone();
        let after = after.map(str::to_owned);
        let store = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut paths = Self::scan(&root, &prefix, after.as_deref(), limit)?;
            let more = paths.len() > limit;
            paths.truncate(limit);
            let mut entries = Vec::with_capacity(paths.len());
            for path in &paths {
                let key = BlobKey::new(prefix.tenant(), path)?;
                let file = store.data_path(&key);
                match read_header_sync(&file) {
                    Ok(Some((header, metadata))) => entries.push(BlobEntry {
                        size: metadata.len().saturating_sub(header.len),
                        etag: Some(header.etag),
                        last_modified: modified(&metadata),
                        key,
                    }),
                    // Deleted since the scan, or not one of ours: not listed.
                    Ok(None) => tracing::warn!(path = %file.display(), "skipping a file with a bad blob header"),
                    Err(err) if is_missing(&err) => {}
                    Err(err) => return Err(internal("reading", &file, err)),
                }
            }
            let next = if more { paths.last().cloned() } else { None };
            Ok(BlobPage { entries, next })
        })
        .await
        .map_err(|e| BlobError::Internal(format!("blob listing task failed: {e}")))?
    }

    async fn delete_prefix(&self, prefix: &BlobPrefix) -> Result<u64, BlobError> {
        let removed = fhirmesh_core::blob::delete_listed(self, prefix).await?;
        let root = self.root.clone();
        let prefix = prefix.clone();
        tokio::task::spawn_blocking(move || Self::prune(&root, &prefix))
            .await
            .map_err(|e| BlobError::Internal(format!("blob directory cleanup task failed: {e}")))?;
        Ok(removed)
    }

    /// Local files cannot be presigned: the server streams them itself.
    async fn presign_get(&self, _key: &BlobKey, expires_in: Duration) -> Result<Option<PresignedUrl>, BlobError> {
        check_presign_expiry(expires_in)?;
        Ok(None)
    }

    /// Local files cannot be presigned: the server receives the upload itself.
    async fn presign_put(
        &self,
        _key: &BlobKey,
        content_type: &str,
        expires_in: Duration,
    ) -> Result<Option<PresignedUrl>, BlobError> {
        check_content_type(content_type)?;
        check_presign_expiry(expires_in)?;
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip() {
        let text = render_header("application/fhir+json; charset=utf-8", "00ff");
        let mut file = text.clone().into_bytes();
        file.extend_from_slice(b"content\n\nmore");
        let header = parse_header(&file).expect("parses");
        assert_eq!(header.content_type, "application/fhir+json; charset=utf-8");
        assert_eq!(header.etag, "00ff");
        assert_eq!(header.len, text.len() as u64);
        assert_eq!(&file[header.len as usize..], b"content\n\nmore");
    }

    #[test]
    fn malformed_headers_are_rejected_not_panicked_on() {
        for bad in
            [&b""[..], b"fhirmesh-blob 1\n", b"other\n\n", b"fhirmesh-blob 1\ncontent-type: a/b\n\n", b"\xff\xfe"]
        {
            assert_eq!(parse_header(bad), None, "{bad:?}");
        }
        let long = format!("{MAGIC}content-type: a/{}\netag: x\n", "b".repeat(MAX_HEADER_LEN));
        assert_eq!(parse_header(&long.as_bytes()[..MAX_HEADER_LEN]), None);
    }

    #[test]
    fn the_longest_header_fits_the_header_limit() {
        let content_type = format!("a/{}", "b".repeat(fhirmesh_core::blob::MAX_CONTENT_TYPE_LEN - 2));
        assert!(render_header(&content_type, &format!("{:016x}", u64::MAX)).len() <= MAX_HEADER_LEN);
    }
}
