//! Binary content kept in the blob store instead of inside the resource.
//!
//! A raw Binary upload (a `POST`/`PUT` with a non-FHIR `Content-Type`) larger than the gateway's
//! inline threshold is streamed into the blob store by a [`BinaryService`], never held whole in
//! memory, under `binary/{uuid}` in the caller's tenant. The Binary resource that is stored then
//! carries no `data` but a pointer to that content: the primitive `data` with only an extension
//! (R4 allows a primitive with extensions and no value), as other servers externalise Binary
//! content:
//!
//! ```json
//! "_data": {"extension": [{"url": "https://fhirmesh.dev/fhir/StructureDefinition/binary-content",
//!   "extension": [{"url": "key", "valueString": "binary/4f1c…"},
//!                 {"url": "size", "valueUnsignedInt": 52428800},
//!                 {"url": "sha256", "valueBase64Binary": "…"}]}]}
//! ```
//!
//! Reading the Binary with a non-FHIR `Accept` streams the content back; the JSON form shows the
//! pointer (size and hash included), to which the gateway adds a `url` part on reads: the
//! version's raw URL, where the content is fetched.
//!
//! **Presigned mode** (S3, as FHIR Works on AWS did): a FHIR JSON create or update of a Binary
//! without content allocates content for the client to upload directly to S3
//! ([`BinaryService::presign_upload`]); its pointer has no size or hash (the server never sees the
//! bytes), and reads hand out presigned download URLs ([`BinaryService::presign_download`]).
//!
//! **Who may point where** ([`check_write`]): a write may carry a pointer only to the content the
//! gateway uploaded for that very request ([`RequestContext::binary_upload`]) or to the content
//! the Binary's current version already points to (an update that changes only `contentType` or
//! `securityContext`, a PATCH). Anything else — a client pointing a Binary at content it could not
//! otherwise read — is refused with 400. Keys are tenant-scoped blob keys, so no pointer can reach
//! another tenant's content.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use fhirmesh_fhir::ResourceType;
use futures::StreamExt;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::auth::Interaction;
use crate::blob::{Blob, BlobError, BlobKey, DynBlobStore, PresignedUrl, PutBody};
use crate::error::{ErrorCategory, FhirError, FhirResult};
use crate::model::ResourceVersion;
use crate::service::RequestContext;

/// The extension on `Binary.data` that points at content in the blob store.
pub const CONTENT_EXTENSION: &str = "https://fhirmesh.dev/fhir/StructureDefinition/binary-content";
/// Largest content a pointer can describe (`size` is an R4 `unsignedInt`).
pub const MAX_CONTENT_BYTES: u64 = i32::MAX as u64;
/// Where content lives under the tenant's blob prefix.
const KEY_PREFIX: &str = "binary/";

/// Where a Binary's content is: a blob key path in the Binary's tenant, its size and SHA-256
/// (unknown for content a client uploads to a presigned URL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContentRef {
    /// `binary/{uuid}`: the blob key path (the tenant is the Binary's).
    pub key: String,
    pub size: Option<u64>,
    /// Base64 SHA-256 of the content.
    pub sha256: Option<String>,
}

impl ContentRef {
    /// The pointer of a Binary resource's JSON, if it has one; a malformed pointer is a 400 naming
    /// where.
    pub fn of(resource: &Value) -> FhirResult<Option<ContentRef>> {
        let Some(extensions) = resource.get("_data").and_then(|data| data.get("extension")) else {
            return Ok(None);
        };
        let Some(extensions) = extensions.as_array() else { return Ok(None) };
        let Some(pointer) = extensions.iter().find(|e| e.get("url").and_then(Value::as_str) == Some(CONTENT_EXTENSION))
        else {
            return Ok(None);
        };
        let at = "Binary.data.extension";
        let malformed = |what: &str| FhirError::invalid(format!("the binary-content extension {what}")).at(at);
        if resource.get("data").is_some() {
            return Err(malformed("points to stored content, so Binary.data must be absent"));
        }
        let part = |name: &str, kind: &str| {
            pointer
                .get("extension")
                .and_then(Value::as_array)
                .and_then(|parts| parts.iter().find(|p| p.get("url").and_then(Value::as_str) == Some(name)))
                .and_then(|p| p.get(kind))
        };
        let key = part("key", "valueString").and_then(Value::as_str).ok_or_else(|| malformed("has no key"))?;
        if !key.starts_with(KEY_PREFIX) || BlobKey::new(&Default::default(), key).is_err() {
            return Err(malformed("has a key that is not a binary content key"));
        }
        let size = match part("size", "valueUnsignedInt") {
            None => None,
            Some(size) => Some(size.as_u64().ok_or_else(|| malformed("has a size that is not a number"))?),
        };
        let sha256 = match part("sha256", "valueBase64Binary") {
            None => None,
            Some(hash) => Some(hash.as_str().ok_or_else(|| malformed("has a sha256 that is not a string"))?.to_owned()),
        };
        Ok(Some(ContentRef { key: key.to_owned(), size, sha256 }))
    }

    /// Puts the pointer on a Binary resource (replacing any `data`).
    pub fn attach(&self, resource: &mut Value) {
        if let Value::Object(map) = resource {
            map.remove("data");
            let mut parts = vec![json!({"url": "key", "valueString": self.key})];
            if let Some(size) = self.size {
                parts.push(json!({"url": "size", "valueUnsignedInt": size}));
            }
            if let Some(sha256) = &self.sha256 {
                parts.push(json!({"url": "sha256", "valueBase64Binary": sha256}));
            }
            map.insert("_data".into(), json!({"extension": [{"url": CONTENT_EXTENSION, "extension": parts}]}));
        }
    }

    fn blob_key(&self, ctx: &RequestContext) -> FhirResult<BlobKey> {
        BlobKey::new(&ctx.tenant, &self.key).map_err(|e| FhirError::internal(e.to_string()))
    }
}

/// Refuses a write of `new` (a `resource_type` resource replacing `current`) whose content
/// pointer is neither this request's upload nor the one `current` already has (module docs).
pub fn check_write(
    ctx: &RequestContext,
    resource_type: ResourceType,
    new: Option<&Value>,
    current: Option<&ResourceVersion>,
) -> FhirResult<()> {
    if resource_type.as_str() != "Binary" {
        return Ok(());
    }
    let Some(pointer) = new.map(ContentRef::of).transpose()?.flatten() else { return Ok(()) };
    if ctx.binary_upload.as_deref() == Some(pointer.key.as_str()) {
        return Ok(());
    }
    let kept = current
        .and_then(|version| version.body.as_ref())
        .and_then(|body| serde_json::from_slice::<Value>(body).ok())
        .and_then(|resource| ContentRef::of(&resource).ok().flatten());
    if kept.as_ref() == Some(&pointer) {
        return Ok(());
    }
    Err(FhirError::invalid(
        "the binary-content extension is set by the server: upload the content raw (a non-FHIR Content-Type) \
         instead, or keep the pointer the current version has",
    )
    .at("Binary.data.extension"))
}

/// The content store behind raw Binary reads and writes (in-process in `fhirmesh serve`).
#[async_trait]
pub trait BinaryService: Send + Sync + 'static {
    /// Streams `body` into new content, at most `max_bytes` (413 beyond, nothing kept). The
    /// caller must be allowed to create or update Binary resources.
    async fn upload(
        &self,
        ctx: &RequestContext,
        content_type: &str,
        body: PutBody,
        max_bytes: u64,
    ) -> FhirResult<ContentRef>;
    /// The content a pointer names (410 when it is gone).
    async fn download(&self, ctx: &RequestContext, content: &ContentRef) -> FhirResult<Blob>;
    /// Removes content no resource points to (an upload whose write failed).
    async fn discard(&self, ctx: &RequestContext, content: &ContentRef) -> FhirResult<()>;
    /// New content the caller uploads itself, with `content_type`, to the returned URL (valid
    /// `expires_in`); `None` when the blob store cannot presign. Same permission as
    /// [`BinaryService::upload`].
    async fn presign_upload(
        &self,
        ctx: &RequestContext,
        content_type: &str,
        expires_in: Duration,
    ) -> FhirResult<Option<(ContentRef, PresignedUrl)>>;
    /// A URL to download the content directly, valid `expires_in`; `None` when the blob store
    /// cannot presign.
    async fn presign_download(
        &self,
        ctx: &RequestContext,
        content: &ContentRef,
        expires_in: Duration,
    ) -> FhirResult<Option<PresignedUrl>>;
}

pub type DynBinaryService = Arc<dyn BinaryService>;

/// [`BinaryService`] on a blob store.
pub struct Binaries {
    blobs: DynBlobStore,
}

impl Binaries {
    pub fn new(blobs: DynBlobStore) -> Binaries {
        Binaries { blobs }
    }
}

#[async_trait]
impl BinaryService for Binaries {
    async fn upload(
        &self,
        ctx: &RequestContext,
        content_type: &str,
        body: PutBody,
        max_bytes: u64,
    ) -> FhirResult<ContentRef> {
        may_write(ctx)?;
        let (key, blob_key) = new_key(ctx)?;
        let counted = Arc::new(AtomicU64::new(0));
        let over = Arc::new(AtomicBool::new(false));
        let hasher = Arc::new(Mutex::new(Sha256::new()));
        let body: PutBody = {
            let (counted, over, hasher) = (counted.clone(), over.clone(), hasher.clone());
            body.map(move |chunk| {
                let chunk = chunk?;
                let total = counted.fetch_add(chunk.len() as u64, Ordering::Relaxed) + chunk.len() as u64;
                if total > max_bytes {
                    over.store(true, Ordering::Relaxed);
                    return Err(std::io::Error::other("over the Binary size limit"));
                }
                hasher.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).update(&chunk);
                Ok(chunk)
            })
            .boxed()
        };
        match self.blobs.put(&blob_key, content_type, body).await {
            Ok(info) => {
                let digest = std::mem::take(&mut *hasher.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
                let sha256 = base64::engine::general_purpose::STANDARD.encode(digest.finalize());
                Ok(ContentRef { key, size: Some(info.size), sha256: Some(sha256) })
            }
            Err(_) if over.load(Ordering::Relaxed) => Err(FhirError::new(
                ErrorCategory::TooLarge,
                format!("the Binary content is larger than the {max_bytes}-byte limit"),
            )),
            Err(BlobError::Body(reason)) => Err(FhirError::invalid(format!("reading the Binary content: {reason}"))),
            Err(error) => Err(error.into()),
        }
    }

    async fn download(&self, ctx: &RequestContext, content: &ContentRef) -> FhirResult<Blob> {
        match self.blobs.get(&content.blob_key(ctx)?).await? {
            Some(blob) => Ok(blob),
            None => Err(FhirError::new(
                ErrorCategory::Gone,
                "the Binary's content is not stored (removed, or never uploaded to its presigned URL)",
            )),
        }
    }

    async fn discard(&self, ctx: &RequestContext, content: &ContentRef) -> FhirResult<()> {
        Ok(self.blobs.delete(&content.blob_key(ctx)?).await?)
    }

    async fn presign_upload(
        &self,
        ctx: &RequestContext,
        content_type: &str,
        expires_in: Duration,
    ) -> FhirResult<Option<(ContentRef, PresignedUrl)>> {
        may_write(ctx)?;
        let (key, blob_key) = new_key(ctx)?;
        let url = self.blobs.presign_put(&blob_key, content_type, expires_in).await?;
        Ok(url.map(|url| (ContentRef { key, size: None, sha256: None }, url)))
    }

    async fn presign_download(
        &self,
        ctx: &RequestContext,
        content: &ContentRef,
        expires_in: Duration,
    ) -> FhirResult<Option<PresignedUrl>> {
        Ok(self.blobs.presign_get(&content.blob_key(ctx)?, expires_in).await?)
    }
}

/// Refuses a caller that may neither create nor update Binaries (before any content is taken).
fn may_write(ctx: &RequestContext) -> FhirResult<()> {
    let binary = ResourceType::parse("Binary");
    if ctx.access.check(Interaction::Create, binary).is_err() {
        ctx.access.check(Interaction::Update, binary)?;
    }
    Ok(())
}

/// A fresh content key path and its blob key in the caller's tenant.
fn new_key(ctx: &RequestContext) -> FhirResult<(String, BlobKey)> {
    let key = format!("{KEY_PREFIX}{}", uuid::Uuid::new_v4().simple());
    let blob_key = BlobKey::new(&ctx.tenant, &key).map_err(|e| FhirError::internal(e.to_string()))?;
    Ok((key, blob_key))
}

#[cfg(test)]
mod tests;
