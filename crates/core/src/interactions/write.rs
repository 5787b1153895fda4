//! The read–decide–commit loop every write to an existing id goes through (update, patch, delete):
//! optimistic concurrency against the store, `If-Match` checks, and retries for unconditional
//! writes that lose a race.

use fhirmesh_fhir::{LogicalId, ResourceType};
use serde_json::Value;

use super::FhirResources;
use super::body::{self, IdRule, Stamp};
use super::limits::LimitedWrites;
use crate::error::{ErrorCategory, FhirError, FhirResult};
use crate::model::{Operation, ResourceVersion};
use crate::ports::{Expected, StoreError, VersionWrite};
use crate::service::{RequestContext, WriteResult};

/// What a write decides to do, given the current version.
pub(super) enum Attempt {
    /// Write this resource (of about `size` JSON bytes) as the next version.
    Write { resource: Value, size: usize },
    /// Write a delete tombstone.
    Delete,
    /// Write nothing.
    Skip,
}

/// Runs `decide` against the current version and commits what it returns, re-reading and
/// retrying when another writer got there first — unless the client pinned a version with
/// `If-Match`, in which case losing the race is a 412. `reach` is what the caller's grant for the
/// interaction reaches: the write must stay within it.
pub(super) async fn with_retries(
    svc: &FhirResources,
    ctx: &RequestContext,
    resource_type: ResourceType,
    id: &LogicalId,
    if_match: Option<u64>,
    reach: &super::Reach,
    mut decide: impl FnMut(Option<&ResourceVersion>) -> FhirResult<Attempt>,
) -> FhirResult<Option<WriteResult>> {
    for _ in 0..=svc.config.max_write_retries {
        let current = svc.store.read(&ctx.tenant, resource_type, id).await?;
        if let Some(expected) = if_match {
            check_if_match(resource_type, id, expected, current.as_ref())?;
        }
        let (operation, body) = match decide(current.as_ref())? {
            Attempt::Skip => return Ok(None),
            Attempt::Delete => (Operation::Delete, None),
            Attempt::Write { resource, size } => (Operation::Update, Some((resource, size))),
        };
        reach.check_write(resource_type, id, current.as_ref(), body.as_ref().map(|(resource, _)| resource))?;
        crate::binary::check_write(ctx, resource_type, body.as_ref().map(|(resource, _)| resource), current.as_ref())?;
        let version_id = current.as_ref().map_or(1, |c| c.version_id + 1);
        let last_updated = body::now();
        let rules = &svc.config.write_rules;
        let mut limited = LimitedWrites::default();
        let new = body.as_ref().map(|(resource, _)| resource);
        limited.record(rules.as_deref(), 0, (resource_type, id), new, current.as_ref(), last_updated);
        let body = match body {
            Some((resource, size)) => {
                let stamp = Stamp { id: id.clone(), id_rule: IdRule::MustMatch, version_id, last_updated };
                Some(body::prepare(resource, size, resource_type, &stamp, rules.as_ref()).await?)
            }
            None => None,
        };
        limited.check(svc, &ctx.tenant).await.map_err(|(_, err)| err)?;
        let created = operation == Operation::Update && current.as_ref().is_none_or(ResourceVersion::is_deleted);
        let write = VersionWrite {
            resource_type,
            id: id.clone(),
            expected: current.as_ref().map_or(Expected::Absent, |c| Expected::Version(c.version_id)),
            version_id,
            last_updated,
            operation,
            body: body.clone(),
            traceparent: ctx.traceparent.clone(),
        };
        match svc.store.commit(&ctx.tenant, vec![write]).await {
            Ok(receipt) => {
                let version = ResourceVersion {
                    resource_type,
                    id: id.clone(),
                    version_id,
                    last_updated,
                    operation,
                    body,
                    sequence: receipt.first_sequence,
                };
                tracing::debug!(resource_type = %resource_type, version_id, operation = operation.as_str(), "resource written");
                return Ok(Some(WriteResult { version, created, written: true }));
            }
            Err(StoreError::Conflict { actual, .. }) if if_match.is_some() => {
                return Err(FhirError::new(
                    ErrorCategory::PreconditionFailed,
                    format!(
                        "{resource_type}/{id} changed concurrently (now version {}); If-Match W/\"{}\" no longer holds",
                        actual.unwrap_or(0),
                        if_match.unwrap_or(0)
                    ),
                ));
            }
            Err(StoreError::Conflict { .. }) => continue,
            Err(err) => return Err(err.into()),
        }
    }
    Err(FhirError::new(
        ErrorCategory::Conflict,
        format!("{resource_type}/{id} is being changed by too many writers at once; retry the request"),
    ))
}

fn check_if_match(
    resource_type: ResourceType,
    id: &LogicalId,
    expected: u64,
    current: Option<&ResourceVersion>,
) -> FhirResult<()> {
    match current {
        None => Err(FhirError::new(
            ErrorCategory::PreconditionFailed,
            format!("{resource_type}/{id} does not exist, so If-Match W/\"{expected}\" cannot hold"),
        )),
        Some(current) if current.version_id != expected => Err(FhirError::new(
            ErrorCategory::PreconditionFailed,
            format!(
                "{resource_type}/{id} is at version {}, not the version {expected} named in If-Match",
                current.version_id
            ),
        )),
        Some(_) => Ok(()),
    }
}
