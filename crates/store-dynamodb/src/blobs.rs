//! Bodies too large for a DynamoDB item (over [`MAX_BODY_BYTES`]) live in the blob store (S3 in
//! the mesh); the version item keeps their key (`blob`) and length (`blen`). See `design.md`,
//! "Large resources".

use aws_sdk_dynamodb::types::AttributeValue;
use bytes::Bytes;
use fhirmesh_core::blob::{BlobError, BlobKey};
use fhirmesh_core::model::{ResourceVersion, TenantId};
use fhirmesh_core::ports::{StoreError, VersionWrite};

use crate::DynamoStore;
use crate::commit::MAX_BODY_BYTES;
use crate::items::{Item, corrupt, get_u64, tenant_of, version_from_item};

const CONTENT_TYPE: &str = "application/fhir+json";

fn blob_error(what: &str, err: BlobError) -> StoreError {
    match err {
        BlobError::Unavailable(detail) => StoreError::Unavailable(format!("blob store {what}: {detail}")),
        other => StoreError::Internal(format!("blob store {what}: {other}")),
    }
}

impl DynamoStore {
    /// Stores every body too large for an item in the blob store; returns each write's blob path
    /// (`None`: the body stays in the item). Without a blob store such bodies are refused.
    pub(crate) async fn offload(
        &self,
        tenant: &TenantId,
        writes: &[VersionWrite],
    ) -> Result<Vec<Option<String>>, StoreError> {
        let mut paths = Vec::with_capacity(writes.len());
        for write in writes {
            let Some(body) = write.body.as_ref().filter(|body| body.len() > MAX_BODY_BYTES) else {
                paths.push(None);
                continue;
            };
            let Some(blobs) = &self.inner.blobs else {
                self.discard(tenant, &paths).await;
                return Err(StoreError::Unsupported(format!(
                    "{}/{} is {} bytes; without a blob store the DynamoDB store holds resources up to {} KB \
                     (configure [blob] to store larger ones)",
                    write.resource_type,
                    write.id,
                    body.len(),
                    MAX_BODY_BYTES / 1024
                )));
            };
            // A fresh name per attempt: a failed commit's blob can never be mistaken for a
            // committed one.
            let path = format!(
                "resources/{}/{}/{}-{:016x}.json",
                write.resource_type,
                write.id,
                write.version_id,
                fastrand::u64(..)
            );
            let stored = match BlobKey::new(tenant, &path) {
                Ok(key) => blobs.put_bytes(&key, CONTENT_TYPE, body.clone()).await.map(|_| ()),
                Err(err) => Err(err),
            };
            if let Err(err) = stored {
                self.discard(tenant, &paths).await;
                return Err(blob_error("write", err));
            }
            paths.push(Some(path));
        }
        Ok(paths)
    }

    /// Removes the blobs of a commit that did not apply (best effort: an orphan costs storage,
    /// never correctness — no version item names it).
    pub(crate) async fn discard(&self, tenant: &TenantId, paths: &[Option<String>]) {
        let Some(blobs) = &self.inner.blobs else { return };
        for path in paths.iter().flatten() {
            let deleted = match BlobKey::new(tenant, path) {
                Ok(key) => blobs.delete(&key).await,
                Err(err) => Err(err),
            };
            if let Err(error) = deleted {
                tracing::warn!(%path, %error, "could not remove the blob of a commit that did not apply");
            }
        }
    }

    /// Decodes a version item, reading its body from the blob store when it lives there.
    pub(crate) async fn decode(&self, item: &Item) -> Result<ResourceVersion, StoreError> {
        let mut version = version_from_item(item)?;
        if let Some(AttributeValue::S(path)) = item.get("blob") {
            version.body = Some(self.fetch(item, path).await?);
        }
        Ok(version)
    }

    async fn fetch(&self, item: &Item, path: &str) -> Result<Bytes, StoreError> {
        let blobs = self.inner.blobs.as_ref().ok_or_else(|| {
            StoreError::Unavailable(format!(
                "a resource body lives in the blob store ({path}), which is not configured"
            ))
        })?;
        let key = BlobKey::new(&tenant_of(item)?, path).map_err(|e| corrupt(format!("blob path {path:?}: {e}")))?;
        let length = get_u64(item, "blen")?;
        let blob = blobs.get(&key).await.map_err(|e| blob_error("read", e))?.ok_or_else(|| {
            StoreError::Internal(format!("the body of a stored version is missing from the blob store: {key}"))
        })?;
        let bytes = blob.into_bytes(length).await.map_err(|e| blob_error("read", e))?;
        if bytes.len() as u64 != length {
            return Err(StoreError::Internal(format!(
                "blob {key} has {} bytes, the version item says {length}",
                bytes.len()
            )));
        }
        Ok(bytes)
    }
}
