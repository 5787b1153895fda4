//! The blob store port: tenant-scoped storage of opaque byte content, streamed both ways.
//!
//! Users: the Binary service (raw content of FHIR `Binary` resources, possibly hundreds of MB) and
//! the Bulk Data exporter (NDJSON output files, served for download). Adapters live in
//! `crates/blob` (local filesystem for embedded mode, S3 for the mesh).
//!
//! Contracts every adapter keeps:
//! - every key is a [`BlobKey`]: a tenant plus a validated relative path, so a key can never name
//!   anything outside its tenant's prefix (no `..`, no leading `/`, no empty segments, a small
//!   charset, bounded length);
//! - [`BlobStore::put`] consumes the body as a stream and never holds all of it in memory; a blob
//!   appears under its key only once it is complete (readers see the old content or the new one,
//!   never a mix), and a failed or cancelled put leaves no blob behind;
//! - reads stream ([`Blob::body`]);
//! - [`BlobStore::delete`] is idempotent;
//! - presigning returns `None` when the backend cannot presign (the server streams the blob itself).

use std::fmt;
use std::io;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::stream::{self, BoxStream, StreamExt, TryStreamExt};
use time::OffsetDateTime;

use crate::error::{ErrorCategory, FhirError};
use crate::model::TenantId;

/// The content of a blob being written: chunks in order; an `Err` aborts the write.
pub type PutBody = BoxStream<'static, io::Result<Bytes>>;

/// The content of a blob being read: chunks in order; an `Err` ends the read.
pub type BlobBody = BoxStream<'static, Result<Bytes, BlobError>>;

/// Longest key path (the part after the tenant), in bytes.
pub const MAX_KEY_PATH_LEN: usize = 512;
/// Longest segment of a key path, in bytes (leaves room under a filesystem's 255-byte name limit).
pub const MAX_KEY_SEGMENT_LEN: usize = 200;
/// Most segments in a key path.
pub const MAX_KEY_SEGMENTS: usize = 32;
/// Longest content type, in bytes.
pub const MAX_CONTENT_TYPE_LEN: usize = 255;
/// Longest validity of a presigned URL (S3's limit for SigV4 query signing).
pub const MAX_PRESIGN_EXPIRY: Duration = Duration::from_secs(7 * 24 * 60 * 60);
/// Largest page [`BlobStore::list`] returns.
pub const MAX_LIST_LIMIT: usize = 1000;

/// Blob store failures, as the domain sees them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlobError {
    /// The key (or prefix, or list cursor) breaks the key rules.
    #[error("invalid blob key: {0}")]
    InvalidKey(String),
    /// Another argument is out of bounds: content type, presign expiry, byte range, options.
    #[error("invalid blob request: {0}")]
    Invalid(String),
    /// The requested byte range starts at or beyond the end of the blob.
    #[error("byte range not satisfiable: the blob has {size} bytes")]
    RangeNotSatisfiable { size: u64 },
    /// The body is longer than the backend accepts; nothing was stored.
    #[error("blob too large: the limit is {limit} bytes")]
    TooLarge { limit: u64 },
    /// The caller's body stream failed; nothing was stored.
    #[error("blob body failed: {0}")]
    Body(String),
    #[error("blob store unavailable: {0}")]
    Unavailable(String),
    #[error("blob store failure: {0}")]
    Internal(String),
}

impl From<BlobError> for FhirError {
    fn from(err: BlobError) -> Self {
        match &err {
            BlobError::InvalidKey(_)
            | BlobError::Invalid(_)
            | BlobError::RangeNotSatisfiable { .. }
            | BlobError::Body(_) => FhirError::invalid(err.to_string()),
            BlobError::TooLarge { .. } => FhirError::new(ErrorCategory::TooLarge, err.to_string()),
            BlobError::Unavailable(_) => FhirError::new(ErrorCategory::Unavailable, err.to_string()),
            // Internal details go to the log, not to the client.
            BlobError::Internal(detail) => {
                tracing::error!(error = %detail, "blob store failure");
                FhirError::internal("internal blob store failure")
            }
        }
    }
}

/// Checks a key path (`allow_prefix`: also the empty path and one trailing `/`).
fn check_path(path: &str, allow_prefix: bool) -> Result<(), BlobError> {
    let invalid = |reason: String| Err(BlobError::InvalidKey(reason));
    if path.len() > MAX_KEY_PATH_LEN {
        return invalid(format!("path is {} bytes long, the limit is {MAX_KEY_PATH_LEN}", path.len()));
    }
    let body = match path.strip_suffix('/') {
        Some(rest) if allow_prefix => rest,
        _ => path,
    };
    if body.is_empty() {
        return if allow_prefix && path.is_empty() { Ok(()) } else { invalid(format!("empty path {path:?}")) };
    }
    if body.starts_with('/') {
        return invalid(format!("path {path:?} starts with '/'"));
    }
    let mut count = 0;
    for segment in body.split('/') {
        count += 1;
        if count > MAX_KEY_SEGMENTS {
            return invalid(format!("path {path:?} has more than {MAX_KEY_SEGMENTS} segments"));
        }
        if segment.is_empty() {
            return invalid(format!("path {path:?} has an empty segment"));
        }
        if segment == "." || segment == ".." {
            return invalid(format!("path {path:?} has a {segment:?} segment"));
        }
        if segment.len() > MAX_KEY_SEGMENT_LEN {
            return invalid(format!("path {path:?} has a segment longer than {MAX_KEY_SEGMENT_LEN} bytes"));
        }
        if let Some(bad) = segment.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
            return invalid(format!("path {path:?} has the character {bad:?}; allowed are A-Z a-z 0-9 . _ - and /"));
        }
    }
    Ok(())
}

/// Where a blob lives: a tenant plus a relative path of `/`-separated segments of
/// `[A-Za-z0-9._-]`, none empty, `.` or `..`, at most [`MAX_KEY_PATH_LEN`] bytes. Rendered
/// `{tenant}/{path}`; every adapter stores it under that prefix, so a key can never reach another
/// tenant's blobs or anything outside the store.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobKey {
    tenant: TenantId,
    path: String,
}

impl BlobKey {
    pub fn new(tenant: &TenantId, path: &str) -> Result<BlobKey, BlobError> {
        check_path(path, false)?;
        Ok(BlobKey { tenant: tenant.clone(), path: path.to_owned() })
    }

    /// The inverse of `Display`: `{tenant}/{path}`.
    pub fn parse(full: &str) -> Result<BlobKey, BlobError> {
        let (tenant, path) =
            full.split_once('/').ok_or_else(|| BlobError::InvalidKey(format!("{full:?} has no tenant prefix")))?;
        let tenant = TenantId::parse(tenant)
            .ok_or_else(|| BlobError::InvalidKey(format!("{full:?} does not start with a valid tenant")))?;
        BlobKey::new(&tenant, path)
    }

    pub fn tenant(&self) -> &TenantId {
        &self.tenant
    }

    /// The path inside the tenant (no leading `/`).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The path's segments, in order (at least one).
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.path.split('/')
    }

    /// The last segment.
    pub fn file_name(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or(&self.path)
    }
}

impl fmt::Display for BlobKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.tenant, self.path)
    }
}

/// A set of keys of one tenant whose path starts with `path` (a plain string prefix, as in S3:
/// `exports/job-1` matches `exports/job-1/a.ndjson` and `exports/job-10/b.ndjson`; end it with `/`
/// to match one "directory"). The empty path matches all of the tenant's blobs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BlobPrefix {
    tenant: TenantId,
    path: String,
}

impl BlobPrefix {
    pub fn new(tenant: &TenantId, path: &str) -> Result<BlobPrefix, BlobError> {
        check_path(path, true)?;
        Ok(BlobPrefix { tenant: tenant.clone(), path: path.to_owned() })
    }

    /// Every blob of the tenant.
    pub fn tenant_root(tenant: &TenantId) -> BlobPrefix {
        BlobPrefix { tenant: tenant.clone(), path: String::new() }
    }

    pub fn tenant(&self) -> &TenantId {
        &self.tenant
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn matches(&self, key: &BlobKey) -> bool {
        key.tenant == self.tenant && key.path.starts_with(&self.path)
    }
}

impl fmt::Display for BlobPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.tenant, self.path)
    }
}

/// Checks a content type: 1 to [`MAX_CONTENT_TYPE_LEN`] bytes of printable ASCII, with a `/`,
/// without leading or trailing spaces (it is stored in headers and file headers verbatim).
pub fn check_content_type(content_type: &str) -> Result<(), BlobError> {
    let ok = !content_type.is_empty()
        && content_type.len() <= MAX_CONTENT_TYPE_LEN
        && content_type.contains('/')
        && content_type.bytes().all(|b| (0x20..0x7f).contains(&b))
        && content_type.trim() == content_type;
    if ok {
        Ok(())
    } else {
        Err(BlobError::Invalid(format!(
            "content type must be 1 to {MAX_CONTENT_TYPE_LEN} bytes of printable ASCII like \"text/plain\""
        )))
    }
}

/// Checks how long a presigned URL may be valid: more than zero, at most [`MAX_PRESIGN_EXPIRY`].
pub fn check_presign_expiry(expires_in: Duration) -> Result<(), BlobError> {
    if expires_in.is_zero() || expires_in > MAX_PRESIGN_EXPIRY {
        Err(BlobError::Invalid(format!(
            "presigned URL expiry must be between 1 second and {} seconds, not {} seconds",
            MAX_PRESIGN_EXPIRY.as_secs(),
            expires_in.as_secs_f64()
        )))
    } else {
        Ok(())
    }
}

/// Checks a [`BlobPage::next`] cursor handed back by a caller: a key path as a listing returned it
/// (a plain position in the tenant's key order, never a location, so it is only bounded in length
/// and charset).
pub fn check_list_cursor(cursor: &str) -> Result<(), BlobError> {
    let ok = cursor.len() <= MAX_KEY_PATH_LEN && cursor.bytes().all(|b| (0x21..0x7f).contains(&b));
    if ok { Ok(()) } else { Err(BlobError::InvalidKey("invalid listing cursor".to_owned())) }
}

/// A stored blob's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobInfo {
    pub key: BlobKey,
    /// Size of the whole blob in bytes.
    pub size: u64,
    pub content_type: String,
    /// An opaque validator that changes whenever the content is replaced (without quotes).
    pub etag: Option<String>,
    pub last_modified: Option<OffsetDateTime>,
}

/// One entry of a listing (listings do not carry content types: S3 does not return them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobEntry {
    pub key: BlobKey,
    pub size: u64,
    pub etag: Option<String>,
    pub last_modified: Option<OffsetDateTime>,
}

/// One page of a listing, in ascending byte order of the key path.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BlobPage {
    pub entries: Vec<BlobEntry>,
    /// The cursor of the next page (pass it as `after`), `None` on the last page.
    pub next: Option<String>,
}

/// A byte range to read: `start..end` (end exclusive), or from `start` to the end of the blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    start: u64,
    end: Option<u64>,
}

impl ByteRange {
    /// `start..end`, end exclusive; `end` must be greater than `start`.
    pub fn new(start: u64, end: Option<u64>) -> Result<ByteRange, BlobError> {
        match end {
            Some(end) if end <= start => {
                Err(BlobError::Invalid(format!("byte range {start}..{end} is empty or reversed")))
            }
            _ => Ok(ByteRange { start, end }),
        }
    }

    /// From `start` to the end of the blob.
    pub fn from_start(start: u64) -> ByteRange {
        ByteRange { start, end: None }
    }

    pub fn start(&self) -> u64 {
        self.start
    }

    pub fn end(&self) -> Option<u64> {
        self.end
    }

    /// The bytes this range selects from a blob of `size` bytes (the end is clipped to the size);
    /// [`BlobError::RangeNotSatisfiable`] when it starts at or after the end.
    pub fn resolve(&self, size: u64) -> Result<Range<u64>, BlobError> {
        if self.start >= size {
            return Err(BlobError::RangeNotSatisfiable { size });
        }
        Ok(self.start..self.end.map_or(size, |end| end.min(size)))
    }
}

/// A blob being read.
pub struct Blob {
    /// Metadata of the whole blob (`size` is the whole size even for a range read).
    pub info: BlobInfo,
    /// Which bytes `body` carries: `0..size` unless a range was asked for.
    pub range: Range<u64>,
    pub body: BlobBody,
}

impl Blob {
    /// Collects the body into memory, failing with [`BlobError::TooLarge`] past `limit` bytes
    /// (for small blobs and tests; stream big ones).
    pub async fn into_bytes(self, limit: u64) -> Result<Bytes, BlobError> {
        let mut body = self.body;
        let mut out = BytesMut::new();
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            if out.len() as u64 + chunk.len() as u64 > limit {
                return Err(BlobError::TooLarge { limit });
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out.freeze())
    }
}

impl fmt::Debug for Blob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Blob").field("info", &self.info).field("range", &self.range).finish_non_exhaustive()
    }
}

/// The HTTP method a presigned URL is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresignMethod {
    Get,
    Put,
}

impl PresignMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            PresignMethod::Get => "GET",
            PresignMethod::Put => "PUT",
        }
    }
}

/// A URL a client can use directly against the backend, without the server in the data path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresignedUrl {
    pub url: String,
    pub method: PresignMethod,
    /// When the URL stops working (earlier if the signing credentials expire first).
    pub expires_at: OffsetDateTime,
    /// Headers the client must send with the request, exactly (e.g. `content-type` for a PUT).
    pub headers: Vec<(String, String)>,
}

/// A body of one chunk.
pub fn body_from_bytes(bytes: Bytes) -> PutBody {
    stream::once(async move { Ok(bytes) }).boxed()
}

/// Tenant-scoped blob storage. Every key carries its tenant.
#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// Stores `body` under `key`, replacing any blob there, reading the body chunk by chunk. The
    /// blob becomes visible only once complete; on any error (including a failing body) nothing is
    /// stored and an earlier blob under the key stays as it was.
    async fn put(&self, key: &BlobKey, content_type: &str, body: PutBody) -> Result<BlobInfo, BlobError>;

    /// [`BlobStore::put`] of content already in memory.
    async fn put_bytes(&self, key: &BlobKey, content_type: &str, bytes: Bytes) -> Result<BlobInfo, BlobError> {
        self.put(key, content_type, body_from_bytes(bytes)).await
    }

    /// The blob, or `None` if there is none.
    async fn get(&self, key: &BlobKey) -> Result<Option<Blob>, BlobError> {
        self.get_range(key, None).await
    }

    /// The blob's bytes in `range` (all of them for `None`), or `None` if there is no blob.
    async fn get_range(&self, key: &BlobKey, range: Option<ByteRange>) -> Result<Option<Blob>, BlobError>;

    /// The blob's metadata, or `None` if there is none.
    async fn head(&self, key: &BlobKey) -> Result<Option<BlobInfo>, BlobError>;

    /// Removes the blob; succeeds whether or not it existed.
    async fn delete(&self, key: &BlobKey) -> Result<(), BlobError>;

    /// Up to `limit` (clamped to 1..=[`MAX_LIST_LIMIT`]) blobs matching `prefix` whose path sorts
    /// after `after` (a [`BlobPage::next`] cursor), in ascending byte order of the path.
    async fn list(&self, prefix: &BlobPrefix, after: Option<&str>, limit: usize) -> Result<BlobPage, BlobError>;

    /// Removes every blob matching `prefix`; returns how many were removed (export cleanup).
    async fn delete_prefix(&self, prefix: &BlobPrefix) -> Result<u64, BlobError> {
        delete_listed(self, prefix).await
    }

    /// A URL to download the blob directly, valid for `expires_in` (at most
    /// [`MAX_PRESIGN_EXPIRY`]); `None` when the backend cannot presign. Does not check that the
    /// blob exists.
    async fn presign_get(&self, key: &BlobKey, expires_in: Duration) -> Result<Option<PresignedUrl>, BlobError>;

    /// A URL to upload the blob directly with `content_type`, valid for `expires_in` (at most
    /// [`MAX_PRESIGN_EXPIRY`]); `None` when the backend cannot presign.
    async fn presign_put(
        &self,
        key: &BlobKey,
        content_type: &str,
        expires_in: Duration,
    ) -> Result<Option<PresignedUrl>, BlobError>;
}

pub type DynBlobStore = Arc<dyn BlobStore>;

/// Turns a stream of byte chunks with any error type into a [`PutBody`].
pub fn put_body<S, E>(body: S) -> PutBody
where
    S: futures::Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: Into<Box<dyn std::error::Error + Send + Sync>> + 'static,
{
    body.map_err(io::Error::other).boxed()
}

/// Deletes every blob `store.list` shows under `prefix`, page by page; returns how many. The
/// default [`BlobStore::delete_prefix`], for adapters to build on.
pub async fn delete_listed<S: BlobStore + ?Sized>(store: &S, prefix: &BlobPrefix) -> Result<u64, BlobError> {
    let mut removed = 0;
    let mut after: Option<String> = None;
    loop {
        let page = store.list(prefix, after.as_deref(), MAX_LIST_LIMIT).await?;
        for entry in &page.entries {
            store.delete(&entry.key).await?;
            removed += 1;
        }
        match page.next {
            Some(next) => after = Some(next),
            None => return Ok(removed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(name: &str) -> TenantId {
        TenantId::parse(name).expect("valid tenant")
    }

    #[test]
    fn keys_accept_ordinary_paths_and_render_with_the_tenant() {
        let key = BlobKey::new(&tenant("acme"), "binary/Binary-1.v2_x").expect("valid");
        assert_eq!(key.to_string(), "acme/binary/Binary-1.v2_x");
        assert_eq!(key.segments().collect::<Vec<_>>(), ["binary", "Binary-1.v2_x"]);
        assert_eq!(key.file_name(), "Binary-1.v2_x");
        assert_eq!(BlobKey::parse("acme/binary/Binary-1.v2_x"), Ok(key));
        assert!(BlobKey::new(&tenant("t"), &"a".repeat(MAX_KEY_SEGMENT_LEN)).is_ok());
    }

    #[test]
    fn keys_reject_anything_that_could_escape_the_tenant() {
        let t = tenant("acme");
        for bad in [
            "",
            "/etc/passwd",
            "..",
            "../other/x",
            "a/../../x",
            "a/./b",
            ".",
            "a//b",
            "a/",
            "a\\..\\b",
            "a b",
            "a%2e%2e",
            "a\0b",
            "ä",
            "a:b",
        ] {
            assert!(matches!(BlobKey::new(&t, bad), Err(BlobError::InvalidKey(_))), "accepted {bad:?}");
        }
        assert!(BlobKey::new(&t, &"a".repeat(MAX_KEY_SEGMENT_LEN + 1)).is_err());
        let long = vec!["ab"; MAX_KEY_SEGMENTS + 1].join("/");
        assert!(BlobKey::new(&t, &long).is_err());
        let too_long = vec!["a".repeat(100); 6].join("/");
        assert!(too_long.len() > MAX_KEY_PATH_LEN);
        assert!(BlobKey::new(&t, &too_long).is_err());
        for bad in ["acme", "/acme/x", "ac me/x", "acme//x", "../x"] {
            assert!(BlobKey::parse(bad).is_err(), "parsed {bad:?}");
        }
    }

    #[test]
    fn prefixes_are_string_prefixes_within_one_tenant() {
        let a = tenant("a");
        let prefix = BlobPrefix::new(&a, "exports/job-1").expect("valid");
        let key = |t: &TenantId, p: &str| BlobKey::new(t, p).expect("valid");
        assert!(prefix.matches(&key(&a, "exports/job-1/x.ndjson")));
        assert!(prefix.matches(&key(&a, "exports/job-10")));
        assert!(!prefix.matches(&key(&a, "exports/job-2/x.ndjson")));
        assert!(!prefix.matches(&key(&tenant("b"), "exports/job-1/x.ndjson")));
        assert!(BlobPrefix::tenant_root(&a).matches(&key(&a, "anything")));
        assert!(BlobPrefix::new(&a, "").is_ok());
        assert!(BlobPrefix::new(&a, "exports/").is_ok());
        for bad in ["/", "exports//", "../", "/x", "a/../"] {
            assert!(BlobPrefix::new(&a, bad).is_err(), "accepted prefix {bad:?}");
        }
    }

    #[test]
    fn byte_ranges_resolve_against_the_size() {
        assert_eq!(ByteRange::new(2, Some(5)).and_then(|r| r.resolve(10)), Ok(2..5));
        assert_eq!(ByteRange::new(2, Some(50)).and_then(|r| r.resolve(10)), Ok(2..10));
        assert_eq!(ByteRange::from_start(9).resolve(10), Ok(9..10));
        assert_eq!(ByteRange::from_start(10).resolve(10), Err(BlobError::RangeNotSatisfiable { size: 10 }));
        assert_eq!(ByteRange::from_start(0).resolve(0), Err(BlobError::RangeNotSatisfiable { size: 0 }));
        assert!(ByteRange::new(5, Some(5)).is_err());
        assert!(ByteRange::new(5, Some(4)).is_err());
    }

    #[test]
    fn presign_expiry_is_bounded() {
        assert!(check_presign_expiry(Duration::from_secs(1)).is_ok());
        assert!(check_presign_expiry(MAX_PRESIGN_EXPIRY).is_ok());
        assert!(matches!(check_presign_expiry(Duration::ZERO), Err(BlobError::Invalid(_))));
        assert!(matches!(
            check_presign_expiry(MAX_PRESIGN_EXPIRY + Duration::from_secs(1)),
            Err(BlobError::Invalid(_))
        ));
    }

    #[test]
    fn content_types_are_header_safe() {
        for ok in ["application/octet-stream", "application/fhir+json; charset=utf-8", "text/plain"] {
            assert!(check_content_type(ok).is_ok(), "{ok}");
        }
        let too_long = format!("text/{}", "x".repeat(MAX_CONTENT_TYPE_LEN));
        for bad in ["", "plain", "text/plain\r\nx-injected: 1", " text/plain", "text/plain\n", "téxt/plain", &too_long]
        {
            assert!(check_content_type(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn errors_map_to_fhir_categories() {
        let category = |e: BlobError| FhirError::from(e).category;
        assert_eq!(category(BlobError::InvalidKey("x".into())), ErrorCategory::Invalid);
        assert_eq!(category(BlobError::Invalid("x".into())), ErrorCategory::Invalid);
        assert_eq!(category(BlobError::RangeNotSatisfiable { size: 1 }), ErrorCategory::Invalid);
        assert_eq!(category(BlobError::Body("reset".into())), ErrorCategory::Invalid);
        assert_eq!(category(BlobError::TooLarge { limit: 1 }), ErrorCategory::TooLarge);
        assert_eq!(category(BlobError::Unavailable("down".into())), ErrorCategory::Unavailable);
        let internal = FhirError::from(BlobError::Internal("disk /secret/path full".into()));
        assert_eq!(internal.category, ErrorCategory::Internal);
        assert!(!internal.to_string().contains("/secret/path"), "internal detail leaked: {internal}");
    }

    #[tokio::test]
    async fn put_body_keeps_chunks_and_carries_errors_as_io_errors() {
        let source = stream::iter(vec![Ok(Bytes::from_static(b"a")), Err("connection reset")]);
        let items: Vec<_> = put_body(source).collect().await;
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].as_ref().ok(), Some(&Bytes::from_static(b"a")));
        assert_eq!(items[1].as_ref().err().map(|e| e.to_string()).as_deref(), Some("connection reset"));
        let one: Vec<_> = body_from_bytes(Bytes::from_static(b"xyz")).collect().await;
        assert_eq!(one.len(), 1);
    }

    #[test]
    fn list_cursors_are_bounded() {
        assert!(check_list_cursor("exports/job-1/Patient.ndjson").is_ok());
        assert!(check_list_cursor(&"a".repeat(MAX_KEY_PATH_LEN)).is_ok());
        for bad in ["a".repeat(MAX_KEY_PATH_LEN + 1), "line\nbreak".to_owned(), "with space".to_owned()] {
            assert_eq!(check_list_cursor(&bad), Err(BlobError::InvalidKey("invalid listing cursor".to_owned())));
        }
    }

    #[tokio::test]
    async fn into_bytes_collects_and_enforces_its_limit() {
        let blob = |chunks: Vec<&'static [u8]>| Blob {
            info: BlobInfo {
                key: BlobKey::new(&tenant("t"), "k").expect("valid"),
                size: 6,
                content_type: "text/plain".into(),
                etag: None,
                last_modified: None,
            },
            range: 0..6,
            body: stream::iter(chunks.into_iter().map(|c| Ok(Bytes::from_static(c)))).boxed(),
        };
        assert_eq!(blob(vec![b"abc", b"def"]).into_bytes(6).await, Ok(Bytes::from_static(b"abcdef")));
        assert_eq!(blob(vec![b"abc", b"def"]).into_bytes(5).await, Err(BlobError::TooLarge { limit: 5 }));
    }
}
