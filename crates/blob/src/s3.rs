//! The S3 blob store (mesh mode). Multipart protocol and presigning: see `design.md`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::presigning::{PresignedRequest, PresigningConfig};
use aws_sdk_s3::primitives::{ByteStream, DateTime};
use aws_sdk_s3::types::{
    AbortIncompleteMultipartUpload, BucketLifecycleConfiguration, BucketLocationConstraint, ChecksumAlgorithm,
    CompletedMultipartUpload, CompletedPart, CreateBucketConfiguration, Delete, ExpirationStatus, LifecycleRule,
    LifecycleRuleFilter, ObjectIdentifier,
};
use bytes::{Bytes, BytesMut};
use fhirmesh_core::blob::{
    Blob, BlobEntry, BlobError, BlobInfo, BlobKey, BlobPage, BlobPrefix, BlobStore, ByteRange, MAX_LIST_LIMIT,
    PresignMethod, PresignedUrl, PutBody, check_content_type, check_list_cursor, check_presign_expiry,
};
use futures::stream::{self, StreamExt};
use time::OffsetDateTime;

const MIB: u64 = 1024 * 1024;
/// S3's smallest part (every part but the last).
pub const MIN_PART_SIZE: u64 = 5 * MIB;
/// S3's largest part, and largest single PutObject.
pub const MAX_PART_SIZE: u64 = 5 * 1024 * MIB;
/// S3's most parts per upload.
pub const MAX_PARTS: u64 = 10_000;
/// S3's largest object.
pub const MAX_OBJECT_SIZE: u64 = 5 * 1024 * 1024 * MIB;
/// The lifecycle rule [`S3BlobStore::provision`] installs.
pub const ABORT_RULE_ID: &str = "fhirmesh-abort-incomplete-multipart-uploads";

/// Tuning of [`S3BlobStore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Options {
    /// Bodies of at most this many bytes go up in one PutObject; longer ones as a multipart upload.
    pub multipart_threshold: u64,
    /// Size of every part but the last (5 MiB to 5 GiB). One part is buffered at a time.
    pub part_size: u64,
    /// Prepended to every object key: `""` or a path ending in `/` (e.g. `"blobs/"`).
    pub key_prefix: String,
    /// Attempts per request, first one included (the SDK's standard retry with backoff).
    pub max_attempts: u32,
    /// Longest wait to connect.
    pub connect_timeout: Duration,
    /// Longest one attempt of one request may take (a part upload, or a download until its headers;
    /// a stalled body stream is cut by the SDK's stalled-stream protection).
    pub attempt_timeout: Duration,
    /// Longest accepted body; never more than `part_size × 10,000` (S3's part count limit).
    pub max_size: u64,
}

impl Default for S3Options {
    fn default() -> Self {
        S3Options {
            multipart_threshold: 8 * MIB,
            part_size: 8 * MIB,
            key_prefix: String::new(),
            max_attempts: 3,
            connect_timeout: Duration::from_secs(5),
            attempt_timeout: Duration::from_secs(120),
            max_size: MAX_OBJECT_SIZE,
        }
    }
}

impl S3Options {
    fn validate(&self) -> Result<(), BlobError> {
        let invalid = |reason: String| Err(BlobError::Invalid(format!("S3 options: {reason}")));
        if !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&self.part_size) {
            return invalid(format!("part_size must be between {MIN_PART_SIZE} and {MAX_PART_SIZE} bytes"));
        }
        if self.multipart_threshold > MAX_PART_SIZE {
            return invalid(format!("multipart_threshold must be at most {MAX_PART_SIZE} bytes"));
        }
        if self.max_attempts == 0 {
            return invalid("max_attempts must be at least 1".to_owned());
        }
        if self.connect_timeout.is_zero() || self.attempt_timeout.is_zero() {
            return invalid("timeouts must be longer than zero".to_owned());
        }
        let prefix = &self.key_prefix;
        if !prefix.is_empty() {
            let body = prefix.strip_suffix('/').unwrap_or("");
            let segments_ok = body.split('/').all(|s| {
                !s.is_empty()
                    && s != "."
                    && s != ".."
                    && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            });
            if prefix.len() > 256 || body.is_empty() || !segments_ok {
                return invalid(format!(
                    "key_prefix {prefix:?} must be empty or segments of [A-Za-z0-9._-] ending in '/', at most 256 bytes"
                ));
            }
        }
        Ok(())
    }
}

/// Blobs as objects `{key_prefix}{tenant}/{path}` in one bucket.
#[derive(Debug, Clone)]
pub struct S3BlobStore {
    client: Client,
    bucket: String,
    options: S3Options,
    /// `options.max_size` bounded by the part count limit.
    max_size: u64,
}

/// Maps an SDK failure: network trouble, throttling and 5xx are [`BlobError::Unavailable`] (after the
/// SDK's own retries); anything else is [`BlobError::Internal`].
fn sdk_error<E>(action: &str, object: &str, err: SdkError<E, aws_sdk_s3::config::http::HttpResponse>) -> BlobError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let transient = match &err {
        SdkError::TimeoutError(_) | SdkError::ResponseError(_) => true,
        SdkError::DispatchFailure(failure) => !failure.is_user(),
        SdkError::ServiceError(service) => {
            let status = service.raw().status().as_u16();
            status >= 500
                || status == 429
                || matches!(err.code(), Some("SlowDown" | "ServiceUnavailable" | "InternalError" | "RequestTimeout"))
        }
        _ => false,
    };
    let detail = format!("{action} {object}: {}", DisplayErrorContext(&err));
    if transient { BlobError::Unavailable(detail) } else { BlobError::Internal(detail) }
}

fn body_error(err: std::io::Error) -> BlobError {
    BlobError::Body(err.to_string())
}

/// `"abc"` → `abc` (S3 returns etags quoted).
fn unquote(etag: Option<&str>) -> Option<String> {
    etag.map(|e| e.trim_matches('"').to_owned())
}

fn to_offset(time: Option<&DateTime>) -> Option<OffsetDateTime> {
    let time = time?;
    let nanos = i128::from(time.secs()) * 1_000_000_000 + i128::from(time.subsec_nanos());
    OffsetDateTime::from_unix_timestamp_nanos(nanos).ok()
}

/// `bytes 0-9/100` → (0..10, 100).
fn parse_content_range(value: &str) -> Option<(std::ops::Range<u64>, u64)> {
    let rest = value.strip_prefix("bytes ")?;
    let (span, total) = rest.split_once('/')?;
    let (first, last) = span.split_once('-')?;
    let first: u64 = first.parse().ok()?;
    let last: u64 = last.parse().ok()?;
    let total: u64 = total.parse().ok()?;
    (first <= last && last < total).then_some((first..last + 1, total))
}

/// Aborts a multipart upload when dropped while still armed: covers a `put` future dropped mid-way
/// (client disconnect). Errors take the explicit, awaited path instead.
struct AbortOnDrop {
    client: Client,
    bucket: String,
    object: String,
    upload_id: Option<String>,
}

impl AbortOnDrop {
    fn disarm(&mut self) -> Option<String> {
        self.upload_id.take()
    }

    async fn abort(&mut self) {
        if let Some(upload_id) = self.disarm() {
            abort_upload(&self.client, &self.bucket, &self.object, &upload_id).await;
        }
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        let Some(upload_id) = self.upload_id.take() else { return };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let (client, bucket, object) = (self.client.clone(), self.bucket.clone(), self.object.clone());
                runtime.spawn(async move { abort_upload(&client, &bucket, &object, &upload_id).await });
            }
            Err(_) => tracing::warn!(
                object = %self.object,
                upload_id = %upload_id,
                "multipart upload left behind (no runtime to abort it); the bucket lifecycle rule removes it"
            ),
        }
    }
}

async fn abort_upload(client: &Client, bucket: &str, object: &str, upload_id: &str) {
    let result = client.abort_multipart_upload().bucket(bucket).key(object).upload_id(upload_id).send().await;
    match result {
        Ok(_) => tracing::debug!(object = %object, upload_id = %upload_id, "multipart upload aborted"),
        Err(err) => tracing::warn!(
            object = %object,
            upload_id = %upload_id,
            error = %DisplayErrorContext(&err),
            "could not abort multipart upload; the bucket lifecycle rule removes it"
        ),
    }
}

impl S3BlobStore {
    /// A store in `bucket`. The client's retry and timeout settings are replaced by `options`'.
    pub fn new(client: Client, bucket: impl Into<String>, options: S3Options) -> Result<S3BlobStore, BlobError> {
        options.validate()?;
        let bucket = bucket.into();
        if bucket.is_empty() {
            return Err(BlobError::Invalid("S3 bucket name is empty".to_owned()));
        }
        let config = client
            .config()
            .to_builder()
            .retry_config(RetryConfig::standard().with_max_attempts(options.max_attempts))
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(options.connect_timeout)
                    .operation_attempt_timeout(options.attempt_timeout)
                    .build(),
            )
            .build();
        let max_size = options.max_size.min(options.part_size.saturating_mul(MAX_PARTS)).min(MAX_OBJECT_SIZE);
        Ok(S3BlobStore { client: Client::from_conf(config), bucket, options, max_size })
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The client, with the retry and timeout settings applied.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The object key of a blob: `{key_prefix}{tenant}/{path}`.
    pub fn object_key(&self, key: &BlobKey) -> String {
        format!("{}{key}", self.options.key_prefix)
    }

    fn object_prefix(&self, prefix: &BlobPrefix) -> String {
        format!("{}{prefix}", self.options.key_prefix)
    }

    /// Creates the bucket unless it exists, and, when the bucket has no lifecycle configuration yet,
    /// installs one rule that aborts multipart uploads left incomplete for a day (uploads orphaned by
    /// a crash). Idempotent; an existing lifecycle configuration is left alone.
    pub async fn provision(&self) -> Result<(), BlobError> {
        let mut create = self.client.create_bucket().bucket(&self.bucket);
        if let Some(region) = self.client.config().region().map(|r| r.as_ref().to_owned())
            && region != "us-east-1"
        {
            create = create.create_bucket_configuration(
                CreateBucketConfiguration::builder()
                    .location_constraint(BucketLocationConstraint::from(region.as_str()))
                    .build(),
            );
        }
        match create.send().await {
            Ok(_) => tracing::info!(bucket = %self.bucket, "blob bucket created"),
            Err(err) if err.as_service_error().is_some_and(|e| e.is_bucket_already_owned_by_you()) => {}
            Err(err) => return Err(sdk_error("creating bucket", &self.bucket, err)),
        }

        let current = self.client.get_bucket_lifecycle_configuration().bucket(&self.bucket).send().await;
        match current {
            Ok(config) => {
                if !config.rules().iter().any(|r| r.abort_incomplete_multipart_upload().is_some()) {
                    tracing::warn!(
                        bucket = %self.bucket,
                        "the bucket has lifecycle rules but none aborts incomplete multipart uploads"
                    );
                }
                Ok(())
            }
            Err(err) if err.code() == Some("NoSuchLifecycleConfiguration") => {
                let rule = LifecycleRule::builder()
                    .id(ABORT_RULE_ID)
                    .status(ExpirationStatus::Enabled)
                    .filter(LifecycleRuleFilter::builder().prefix(self.options.key_prefix.clone()).build())
                    .abort_incomplete_multipart_upload(
                        AbortIncompleteMultipartUpload::builder().days_after_initiation(1).build(),
                    )
                    .build()
                    .map_err(|e| BlobError::Internal(format!("building the lifecycle rule: {e}")))?;
                let config = BucketLifecycleConfiguration::builder()
                    .rules(rule)
                    .build()
                    .map_err(|e| BlobError::Internal(format!("building the lifecycle configuration: {e}")))?;
                self.client
                    .put_bucket_lifecycle_configuration()
                    .bucket(&self.bucket)
                    .lifecycle_configuration(config)
                    .send()
                    .await
                    .map_err(|e| sdk_error("setting the lifecycle of bucket", &self.bucket, e))?;
                Ok(())
            }
            Err(err) => Err(sdk_error("reading the lifecycle of bucket", &self.bucket, err)),
        }
    }

    async fn put_single(
        &self,
        key: &BlobKey,
        object: &str,
        content_type: &str,
        body: Bytes,
    ) -> Result<BlobInfo, BlobError> {
        let size = body.len() as u64;
        let output = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(object)
            .content_type(content_type)
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| sdk_error("putting", object, e))?;
        tracing::debug!(key = %key, size, "blob stored");
        Ok(BlobInfo {
            key: key.clone(),
            size,
            content_type: content_type.to_owned(),
            etag: unquote(output.e_tag()),
            last_modified: Some(OffsetDateTime::now_utc()),
        })
    }

    /// Uploads `buffered` and the rest of `body` as a multipart upload, aborting it on any error.
    async fn put_multipart(
        &self,
        key: &BlobKey,
        object: &str,
        content_type: &str,
        buffered: BytesMut,
        size: u64,
        body: PutBody,
    ) -> Result<BlobInfo, BlobError> {
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(object)
            .content_type(content_type)
            .checksum_algorithm(ChecksumAlgorithm::Crc32)
            .send()
            .await
            .map_err(|e| sdk_error("starting multipart upload of", object, e))?;
        let upload_id = created
            .upload_id()
            .ok_or_else(|| BlobError::Internal(format!("S3 returned no upload id for {object}")))?
            .to_owned();
        let mut guard = AbortOnDrop {
            client: self.client.clone(),
            bucket: self.bucket.clone(),
            object: object.to_owned(),
            upload_id: Some(upload_id.clone()),
        };
        match self.upload_parts(object, &upload_id, buffered, size, body).await {
            Ok((size, etag)) => {
                guard.disarm();
                tracing::debug!(key = %key, size, "blob stored (multipart)");
                Ok(BlobInfo {
                    key: key.clone(),
                    size,
                    content_type: content_type.to_owned(),
                    etag,
                    last_modified: Some(OffsetDateTime::now_utc()),
                })
            }
            Err(err) => {
                guard.abort().await;
                Err(err)
            }
        }
    }

    /// The parts and the completion of an upload; returns the size and the object's etag.
    async fn upload_parts(
        &self,
        object: &str,
        upload_id: &str,
        mut buffer: BytesMut,
        mut size: u64,
        mut body: PutBody,
    ) -> Result<(u64, Option<String>), BlobError> {
        let part_size = self.options.part_size as usize;
        let mut parts = Vec::new();
        let mut finished = false;
        while !finished {
            while buffer.len() < part_size {
                match body.next().await {
                    Some(chunk) => {
                        let chunk = chunk.map_err(body_error)?;
                        size += chunk.len() as u64;
                        if size > self.max_size {
                            return Err(BlobError::TooLarge { limit: self.max_size });
                        }
                        buffer.extend_from_slice(&chunk);
                    }
                    None => {
                        finished = true;
                        break;
                    }
                }
            }
            // Full parts while the buffer holds them; the remainder is the last part at the end.
            while buffer.len() >= part_size || (finished && !buffer.is_empty()) {
                let take = part_size.min(buffer.len());
                let part = buffer.split_to(take).freeze();
                parts.push(self.upload_part(object, upload_id, parts.len() + 1, part).await?);
            }
        }
        let output = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(object)
            .upload_id(upload_id)
            .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
            .send()
            .await
            .map_err(|e| sdk_error("completing multipart upload of", object, e))?;
        Ok((size, unquote(output.e_tag())))
    }

    async fn upload_part(
        &self,
        object: &str,
        upload_id: &str,
        number: usize,
        part: Bytes,
    ) -> Result<CompletedPart, BlobError> {
        let number = i32::try_from(number)
            .ok()
            .filter(|n| u64::try_from(*n).is_ok_and(|n| n <= MAX_PARTS))
            .ok_or(BlobError::TooLarge { limit: self.max_size })?;
        let output = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(object)
            .upload_id(upload_id)
            .part_number(number)
            .checksum_algorithm(ChecksumAlgorithm::Crc32)
            .body(ByteStream::from(part))
            .send()
            .await
            .map_err(|e| sdk_error(&format!("uploading part {number} of"), object, e))?;
        Ok(CompletedPart::builder()
            .part_number(number)
            .set_e_tag(output.e_tag().map(str::to_owned))
            .set_checksum_crc32(output.checksum_crc32().map(str::to_owned))
            .build())
    }

    fn presigning_config(
        expires_in: Duration,
        start: SystemTime,
    ) -> Result<(PresigningConfig, OffsetDateTime), BlobError> {
        check_presign_expiry(expires_in)?;
        // Whole seconds, as the signature's X-Amz-Date has them.
        let secs =
            start.duration_since(UNIX_EPOCH).map_err(|_| BlobError::Invalid("clock before 1970".into()))?.as_secs();
        let start = UNIX_EPOCH + Duration::from_secs(secs);
        let config = PresigningConfig::builder()
            .start_time(start)
            .expires_in(expires_in)
            .build()
            .map_err(|e| BlobError::Invalid(format!("presigning: {e}")))?;
        Ok((config, OffsetDateTime::from(start + expires_in)))
    }

    fn presigned(request: PresignedRequest, method: PresignMethod, expires_at: OffsetDateTime) -> PresignedUrl {
        PresignedUrl {
            url: request.uri().to_owned(),
            method,
            expires_at,
            headers: request.headers().map(|(name, value)| (name.to_owned(), value.to_owned())).collect(),
        }
    }

    /// [`BlobStore::presign_get`] as of `start` (tests pin the clock).
    pub async fn presign_get_at(
        &self,
        key: &BlobKey,
        expires_in: Duration,
        start: SystemTime,
    ) -> Result<PresignedUrl, BlobError> {
        let (config, expires_at) = Self::presigning_config(expires_in, start)?;
        let object = self.object_key(key);
        let request = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&object)
            .presigned(config)
            .await
            .map_err(|e| sdk_error("presigning a download of", &object, e))?;
        Ok(Self::presigned(request, PresignMethod::Get, expires_at))
    }

    /// [`BlobStore::presign_put`] as of `start` (tests pin the clock).
    pub async fn presign_put_at(
        &self,
        key: &BlobKey,
        content_type: &str,
        expires_in: Duration,
        start: SystemTime,
    ) -> Result<PresignedUrl, BlobError> {
        check_content_type(content_type)?;
        let (config, expires_at) = Self::presigning_config(expires_in, start)?;
        let object = self.object_key(key);
        let request = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(&object)
            .content_type(content_type)
            .presigned(config)
            .await
            .map_err(|e| sdk_error("presigning an upload of", &object, e))?;
        Ok(Self::presigned(request, PresignMethod::Put, expires_at))
    }

    /// Reads the size of a blob whose range read S3 refused.
    async fn range_not_satisfiable(&self, key: &BlobKey) -> Result<Option<Blob>, BlobError> {
        match self.head(key).await? {
            Some(info) => Err(BlobError::RangeNotSatisfiable { size: info.size }),
            None => Ok(None),
        }
    }
}

#[async_trait]
impl BlobStore for S3BlobStore {
    async fn put(&self, key: &BlobKey, content_type: &str, mut body: PutBody) -> Result<BlobInfo, BlobError> {
        check_content_type(content_type)?;
        let object = self.object_key(key);
        let threshold = self.options.multipart_threshold;
        let mut buffer = BytesMut::new();
        let mut size: u64 = 0;
        // Buffer up to the threshold: a body that ends there goes up in one request.
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(body_error)?;
            size += chunk.len() as u64;
            if size > self.max_size {
                return Err(BlobError::TooLarge { limit: self.max_size });
            }
            buffer.extend_from_slice(&chunk);
            if size > threshold {
                return self.put_multipart(key, &object, content_type, buffer, size, body).await;
            }
        }
        self.put_single(key, &object, content_type, buffer.freeze()).await
    }

    async fn get_range(&self, key: &BlobKey, range: Option<ByteRange>) -> Result<Option<Blob>, BlobError> {
        let object = self.object_key(key);
        let mut request = self.client.get_object().bucket(&self.bucket).key(&object);
        if let Some(range) = range {
            request = request.range(match range.end() {
                Some(end) => format!("bytes={}-{}", range.start(), end - 1),
                None => format!("bytes={}-", range.start()),
            });
        }
        let output = match request.send().await {
            Ok(output) => output,
            Err(err) if err.as_service_error().is_some_and(|e| e.is_no_such_key()) => return Ok(None),
            Err(err) if err.code() == Some("InvalidRange") => return self.range_not_satisfiable(key).await,
            Err(err) => return Err(sdk_error("getting", &object, err)),
        };
        let length = output.content_length().and_then(|l| u64::try_from(l).ok()).unwrap_or(0);
        let (served, size) = match (range, output.content_range().and_then(parse_content_range)) {
            (Some(_), Some((served, total))) => (served, total),
            // A whole-object answer (no range asked, or S3 ignored it).
            _ => (0..length, length),
        };
        let info = BlobInfo {
            key: key.clone(),
            size,
            content_type: output.content_type().unwrap_or("application/octet-stream").to_owned(),
            etag: unquote(output.e_tag()),
            last_modified: to_offset(output.last_modified()),
        };
        let body = stream::try_unfold((output.body, object), |(mut bytes, object)| async move {
            match bytes.next().await {
                Some(Ok(chunk)) => Ok(Some((chunk, (bytes, object)))),
                Some(Err(err)) => {
                    Err(BlobError::Unavailable(format!("reading {object}: {}", DisplayErrorContext(&err))))
                }
                None => Ok(None),
            }
        })
        .boxed();
        Ok(Some(Blob { info, range: served, body }))
    }

    async fn head(&self, key: &BlobKey) -> Result<Option<BlobInfo>, BlobError> {
        let object = self.object_key(key);
        match self.client.head_object().bucket(&self.bucket).key(&object).send().await {
            Ok(output) => Ok(Some(BlobInfo {
                key: key.clone(),
                size: output.content_length().and_then(|l| u64::try_from(l).ok()).unwrap_or(0),
                content_type: output.content_type().unwrap_or("application/octet-stream").to_owned(),
                etag: unquote(output.e_tag()),
                last_modified: to_offset(output.last_modified()),
            })),
            Err(err) if err.as_service_error().is_some_and(|e| e.is_not_found()) => Ok(None),
            Err(err) => Err(sdk_error("reading metadata of", &object, err)),
        }
    }

    async fn delete(&self, key: &BlobKey) -> Result<(), BlobError> {
        let object = self.object_key(key);
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(&object)
            .send()
            .await
            .map_err(|e| sdk_error("deleting", &object, e))?;
        Ok(())
    }

    async fn list(&self, prefix: &BlobPrefix, after: Option<&str>, limit: usize) -> Result<BlobPage, BlobError> {
        if let Some(after) = after {
            check_list_cursor(after)?;
        }
        let limit = limit.clamp(1, MAX_LIST_LIMIT);
        let object_prefix = self.object_prefix(prefix);
        // Object keys of this tenant start with `{key_prefix}{tenant}/`.
        let tenant_prefix = format!("{}{}/", self.options.key_prefix, prefix.tenant());
        let mut request = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&object_prefix)
            .max_keys(i32::try_from(limit).unwrap_or(1000));
        if let Some(after) = after {
            request = request.start_after(format!("{tenant_prefix}{after}"));
        }
        let output = request.send().await.map_err(|e| sdk_error("listing", &object_prefix, e))?;
        let mut entries = Vec::new();
        let mut last = None;
        for object in output.contents() {
            let Some(path) = object.key().and_then(|k| k.strip_prefix(&tenant_prefix)) else { continue };
            last = Some(path.to_owned());
            match BlobKey::new(prefix.tenant(), path) {
                Ok(key) => entries.push(BlobEntry {
                    key,
                    size: object.size().and_then(|s| u64::try_from(s).ok()).unwrap_or(0),
                    etag: unquote(object.e_tag()),
                    last_modified: to_offset(object.last_modified()),
                }),
                Err(_) => tracing::warn!(bucket = %self.bucket, "skipping an object whose key is not a blob key"),
            }
        }
        let next = if output.is_truncated().unwrap_or(false) { last } else { None };
        Ok(BlobPage { entries, next })
    }

    /// Deletes a page of up to 1,000 objects per request (DeleteObjects), foreign objects under the
    /// tenant's prefix included.
    async fn delete_prefix(&self, prefix: &BlobPrefix) -> Result<u64, BlobError> {
        let object_prefix = self.object_prefix(prefix);
        let mut removed = 0;
        let mut token: Option<String> = None;
        loop {
            let output = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(&object_prefix)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| sdk_error("listing", &object_prefix, e))?;
            let objects = output
                .contents()
                .iter()
                .filter_map(|o| o.key())
                .map(|k| ObjectIdentifier::builder().key(k).build())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| BlobError::Internal(format!("building a delete request: {e}")))?;
            if !objects.is_empty() {
                let count = objects.len() as u64;
                let delete = Delete::builder()
                    .set_objects(Some(objects))
                    .quiet(true)
                    .build()
                    .map_err(|e| BlobError::Internal(format!("building a delete request: {e}")))?;
                let result = self
                    .client
                    .delete_objects()
                    .bucket(&self.bucket)
                    .delete(delete)
                    .send()
                    .await
                    .map_err(|e| sdk_error("deleting objects under", &object_prefix, e))?;
                if let Some(failed) = result.errors().first() {
                    return Err(BlobError::Internal(format!(
                        "deleting {} objects under {object_prefix} failed, e.g. {:?}: {:?}",
                        result.errors().len(),
                        failed.key(),
                        failed.message()
                    )));
                }
                removed += count;
            }
            match output.next_continuation_token() {
                Some(next) if output.is_truncated().unwrap_or(false) => token = Some(next.to_owned()),
                _ => return Ok(removed),
            }
        }
    }

    async fn presign_get(&self, key: &BlobKey, expires_in: Duration) -> Result<Option<PresignedUrl>, BlobError> {
        self.presign_get_at(key, expires_in, SystemTime::now()).await.map(Some)
    }

    async fn presign_put(
        &self,
        key: &BlobKey,
        content_type: &str,
        expires_in: Duration,
    ) -> Result<Option<PresignedUrl>, BlobError> {
        self.presign_put_at(key, content_type, expires_in, SystemTime::now()).await.map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
    use fhirmesh_core::TenantId;
    use fhirmesh_core::blob::MAX_PRESIGN_EXPIRY;

    /// A store whose client never connects anywhere: presigning is pure computation.
    fn store(prefix: &str) -> S3BlobStore {
        let config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new("AKIDEXAMPLE", "secret", None, None, "unit-test"))
            .endpoint_url("http://127.0.0.1:9")
            .force_path_style(true)
            .build();
        let options = S3Options { key_prefix: prefix.to_owned(), ..S3Options::default() };
        S3BlobStore::new(Client::from_conf(config), "blobs", options).expect("valid options")
    }

    fn key(tenant: &str, path: &str) -> BlobKey {
        BlobKey::new(&TenantId::parse(tenant).expect("tenant"), path).expect("key")
    }

    fn query(url: &str, name: &str) -> Option<String> {
        let (_, query) = url.split_once('?')?;
        query.split('&').find_map(|pair| pair.strip_prefix(&format!("{name}=")).map(str::to_owned))
    }

    /// 2024-01-02T03:04:05Z.
    fn start() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_704_164_645)
    }

    #[tokio::test]
    async fn presigned_get_names_the_tenant_key_and_carries_expiry_and_signature() {
        let store = store("fm/");
        let url = store
            .presign_get_at(&key("acme", "binary/b1"), Duration::from_secs(900), start())
            .await
            .expect("presigned");
        assert_eq!(url.method, PresignMethod::Get);
        assert!(url.url.starts_with("http://127.0.0.1:9/blobs/fm/acme/binary/b1?"), "{}", url.url);
        assert_eq!(query(&url.url, "X-Amz-Expires").as_deref(), Some("900"));
        assert_eq!(query(&url.url, "X-Amz-Algorithm").as_deref(), Some("AWS4-HMAC-SHA256"));
        assert_eq!(query(&url.url, "X-Amz-Date").as_deref(), Some("20240102T030405Z"));
        assert!(
            query(&url.url, "X-Amz-Credential")
                .is_some_and(|c| c.starts_with("AKIDEXAMPLE%2F20240102%2Fus-east-1%2Fs3"))
        );
        let signature = query(&url.url, "X-Amz-Signature").expect("signature");
        assert_eq!(signature.len(), 64);
        assert!(signature.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(url.expires_at, OffsetDateTime::from(start() + Duration::from_secs(900)));
        assert!(!url.url.contains("secret"), "the secret key leaked into the URL");
    }

    #[tokio::test]
    async fn presigned_put_requires_its_content_type_header() {
        let store = store("");
        let url = store
            .presign_put_at(&key("acme", "upload/x"), "application/pdf", Duration::from_secs(60), start())
            .await
            .expect("presigned");
        assert_eq!(url.method, PresignMethod::Put);
        assert!(url.url.starts_with("http://127.0.0.1:9/blobs/acme/upload/x?"), "{}", url.url);
        assert!(
            url.headers.iter().any(|(n, v)| n.eq_ignore_ascii_case("content-type") && v == "application/pdf"),
            "{:?}",
            url.headers
        );
        let signed = query(&url.url, "X-Amz-SignedHeaders").expect("signed headers");
        assert!(signed.contains("content-type"), "content type not signed: {signed}");
        // No checksum of an empty body sneaks into the URL (it would reject the real upload).
        assert!(!url.url.to_ascii_lowercase().contains("x-amz-checksum"), "{}", url.url);
    }

    #[tokio::test]
    async fn signatures_are_deterministic_and_bound_to_key_method_expiry_and_time() {
        let store = store("");
        let get = |k: BlobKey, secs: u64, at: SystemTime| {
            let store = store.clone();
            async move {
                let url = store.presign_get_at(&k, Duration::from_secs(secs), at).await.expect("presigned");
                query(&url.url, "X-Amz-Signature").expect("signature")
            }
        };
        let base = get(key("acme", "a"), 60, start()).await;
        assert_eq!(base, get(key("acme", "a"), 60, start()).await, "same inputs, same signature");
        assert_ne!(base, get(key("other", "a"), 60, start()).await, "tenant not signed");
        assert_ne!(base, get(key("acme", "b"), 60, start()).await, "path not signed");
        assert_ne!(base, get(key("acme", "a"), 61, start()).await, "expiry not signed");
        assert_ne!(base, get(key("acme", "a"), 60, start() + Duration::from_secs(1)).await, "time not signed");
        let put = store.presign_put_at(&key("acme", "a"), "text/plain", Duration::from_secs(60), start()).await;
        assert_ne!(Some(base), put.ok().and_then(|u| query(&u.url, "X-Amz-Signature")), "method not signed");
    }

    #[tokio::test]
    async fn expiry_is_bounded_to_seven_days() {
        let store = store("");
        let k = key("acme", "a");
        let longest = store.presign_get_at(&k, MAX_PRESIGN_EXPIRY, start()).await.expect("7 days is allowed");
        assert_eq!(query(&longest.url, "X-Amz-Expires").as_deref(), Some("604800"));
        for bad in [Duration::ZERO, MAX_PRESIGN_EXPIRY + Duration::from_secs(1), Duration::from_secs(30 * 86_400)] {
            assert!(matches!(store.presign_get(&k, bad).await, Err(BlobError::Invalid(_))), "{bad:?}");
            assert!(matches!(store.presign_put(&k, "text/plain", bad).await, Err(BlobError::Invalid(_))), "{bad:?}");
        }
        assert!(matches!(
            store.presign_put(&k, "bad\ncontent-type", Duration::from_secs(60)).await,
            Err(BlobError::Invalid(_))
        ));
    }

    #[tokio::test]
    async fn presigning_now_expires_from_now() {
        let store = store("");
        let before = OffsetDateTime::now_utc();
        let url = store.presign_get(&key("acme", "a"), Duration::from_secs(300)).await.expect("ok").expect("some");
        let lead = url.expires_at - before;
        assert!(lead <= time::Duration::seconds(300) && lead >= time::Duration::seconds(298), "{lead}");
    }

    #[test]
    fn options_are_validated() {
        let ok = S3Options::default();
        assert_eq!(ok.validate(), Ok(()));
        let bad = [
            S3Options { part_size: MIN_PART_SIZE - 1, ..S3Options::default() },
            S3Options { part_size: MAX_PART_SIZE + 1, ..S3Options::default() },
            S3Options { multipart_threshold: MAX_PART_SIZE + 1, ..S3Options::default() },
            S3Options { max_attempts: 0, ..S3Options::default() },
            S3Options { key_prefix: "blobs".into(), ..S3Options::default() },
            S3Options { key_prefix: "/".into(), ..S3Options::default() },
            S3Options { key_prefix: "../".into(), ..S3Options::default() },
            S3Options { key_prefix: "a//".into(), ..S3Options::default() },
            S3Options { attempt_timeout: Duration::ZERO, ..S3Options::default() },
        ];
        for options in bad {
            assert!(options.validate().is_err(), "{options:?}");
        }
        assert_eq!(S3Options { key_prefix: "fhir/blobs/".into(), ..S3Options::default() }.validate(), Ok(()));
    }

    #[test]
    fn max_size_respects_the_part_count_limit() {
        let store = store("");
        assert_eq!(store.max_size, 8 * MIB * MAX_PARTS);
    }

    #[test]
    fn content_ranges_parse() {
        assert_eq!(parse_content_range("bytes 0-9/100"), Some((0..10, 100)));
        assert_eq!(parse_content_range("bytes 5-5/6"), Some((5..6, 6)));
        for bad in ["bytes 9-0/100", "bytes 0-100/100", "bytes */100", "0-9/100", "bytes 0-9/x", ""] {
            assert_eq!(parse_content_range(bad), None, "{bad}");
        }
    }

    #[test]
    fn etags_lose_their_quotes() {
        assert_eq!(unquote(Some("\"abc-2\"")), Some("abc-2".to_owned()));
        assert_eq!(unquote(None), None);
    }
}
