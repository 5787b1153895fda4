//! The write protocol: reserve sequences, one `TransactWriteItems`, resolve every outcome to a
//! definite answer (see `design.md`, "A commit").

use std::collections::HashSet;
use std::time::Duration;

use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{
    AttributeValue, CancellationReason, Put, ReturnValue, ReturnValuesOnConditionCheckFailure, TransactWriteItem,
};
use fhirmesh_core::model::TenantId;
use fhirmesh_core::ports::{CommitReceipt, Expected, StoreError, VersionWrite};

use crate::DynamoStore;
use crate::error::{is_indeterminate, sdk_error};
use crate::items::{CURRENT_SK, Item, VersionItem, change_pk, change_sk, get_u64, key, n, resource_pk, s};
use crate::txn::PointerState;

/// `TransactWriteItems` takes 100 items; a write is three (pointer, version, change). Larger
/// commits go through the staged protocol (`txn.rs`).
pub const MAX_WRITES_PER_TRANSACTION: usize = 33;
/// `TransactWriteItems` takes 4 MB in all; above this many body bytes a commit is staged.
pub const MAX_TRANSACTION_BYTES: usize = 3 * 1024 * 1024;
/// DynamoDB items are limited to 400 KB; this leaves room for the other attributes.
pub const MAX_BODY_BYTES: usize = 350 * 1024;
/// Attempts when the transaction lost a race it can simply retry (not a version conflict).
pub(crate) const MAX_ATTEMPTS: u32 = 8;

/// Jittered exponential back-off before attempt `attempt` (two writers retrying in lock step
/// would collide again).
pub(crate) async fn backoff(attempt: u32) {
    let base = 10u64 << attempt.min(6);
    tokio::time::sleep(Duration::from_millis(base + fastrand::u64(..base))).await;
}

/// How one transaction attempt ended.
enum Outcome {
    Committed,
    /// The current pointer of `writes[index]` did not match: a version conflict, or the lock of
    /// a staged transaction (`old` is the pointer as DynamoDB returned it, when it did).
    PointerFailed {
        index: usize,
        old: Option<Item>,
    },
    /// The version item exists although the pointer matched: a concurrent writer of the same
    /// version won.
    Conflict {
        index: usize,
    },
    /// Our change items were voided by a reader, or another transaction touched the same items:
    /// nothing was written, try again with new sequences.
    Retry(String),
    /// Nothing was written, for a reason a retry will not cure.
    Failed(StoreError),
    /// No answer: the transaction may or may not have applied.
    Unknown(StoreError),
}

impl DynamoStore {
    pub(crate) async fn commit_writes(
        &self,
        tenant: &TenantId,
        writes: Vec<VersionWrite>,
    ) -> Result<CommitReceipt, StoreError> {
        check_writes(&writes)?;
        let blobs = self.offload(tenant, &writes).await?;
        let inline: usize = writes
            .iter()
            .zip(&blobs)
            .filter(|(_, blob)| blob.is_none())
            .filter_map(|(w, _)| w.body.as_ref())
            .map(|b| b.len())
            .sum();
        let result = if writes.len() > MAX_WRITES_PER_TRANSACTION || inline > MAX_TRANSACTION_BYTES {
            self.commit_staged(tenant, &writes, &blobs).await
        } else {
            self.commit_once(tenant, &writes, &blobs).await
        };
        // A definite failure leaves the uploaded bodies unnamed: remove them. `Unavailable` may
        // hide a commit that applied (no answer came back): keep them then.
        if let Err(err) = &result
            && !matches!(err, StoreError::Unavailable(_))
        {
            self.discard(tenant, &blobs).await;
        }
        result
    }

    /// A commit of at most [`MAX_WRITES_PER_TRANSACTION`] writes: one `TransactWriteItems`.
    async fn commit_once(
        &self,
        tenant: &TenantId,
        writes: &[VersionWrite],
        blobs: &[Option<String>],
    ) -> Result<CommitReceipt, StoreError> {
        let mut last_reason = String::new();
        for attempt in 0..MAX_ATTEMPTS {
            if attempt > 0 {
                backoff(attempt).await;
            }
            let last = self.reserve(writes.len() as u64).await?;
            let first = last + 1 - writes.len() as u64;
            match self.transact(tenant, writes, blobs, first, last).await {
                Outcome::Committed => {
                    self.signal_commit();
                    return Ok(CommitReceipt { first_sequence: first, last_sequence: last });
                }
                Outcome::PointerFailed { index, old } => {
                    self.void_range(first, last).await;
                    let write = &writes[index];
                    let pk = resource_pk(tenant, write.resource_type, &write.id);
                    match self.pointer_after_failure(&pk, old.as_ref()).await? {
                        PointerState::LockedBy(txn) => {
                            // A staged transaction holds the resource: wait for it to end, then
                            // try again against what it left.
                            self.clear_lock(&pk, &txn).await?;
                            last_reason = format!("{pk} was locked by transaction {txn}");
                        }
                        PointerState::Version(actual) => {
                            return Err(conflict(write, actual));
                        }
                    }
                }
                Outcome::Conflict { index } => {
                    self.void_range(first, last).await;
                    let write = &writes[index];
                    return Err(conflict(write, None));
                }
                Outcome::Retry(reason) => {
                    self.void_range(first, last).await;
                    tracing::debug!(%reason, attempt, "DynamoDB commit retried");
                    last_reason = reason;
                }
                Outcome::Failed(err) => {
                    self.void_range(first, last).await;
                    return Err(err);
                }
                Outcome::Unknown(err) => return self.resolve_unknown(first, last, err).await,
            }
        }
        Err(StoreError::Unavailable(format!("commit kept losing races after {MAX_ATTEMPTS} attempts: {last_reason}")))
    }

    /// Hands out `count` sequences; returns the last one.
    pub(crate) async fn reserve(&self, count: u64) -> Result<u64, StoreError> {
        let out = self
            .inner
            .client
            .update_item()
            .table_name(&self.inner.config.table)
            .set_key(Some(key("S".into(), "S".into())))
            .update_expression("ADD #last :count")
            .expression_attribute_names("#last", "last")
            .expression_attribute_values(":count", n(count))
            .return_values(ReturnValue::UpdatedNew)
            .send()
            .await
            .map_err(|e| sdk_error("reserve sequences", e))?;
        let attributes = out.attributes().cloned().unwrap_or_default();
        get_u64(&attributes, "last")
    }

    async fn transact(
        &self,
        tenant: &TenantId,
        writes: &[VersionWrite],
        blobs: &[Option<String>],
        first: u64,
        last: u64,
    ) -> Outcome {
        let items = match transaction_items(&self.inner.config.table, tenant, writes, blobs, first, last) {
            Ok(items) => items,
            Err(err) => return Outcome::Failed(err),
        };
        let sent = self.inner.client.transact_write_items().set_transact_items(Some(items)).send().await;
        match sent {
            Ok(_) => Outcome::Committed,
            Err(err) if is_indeterminate(&err) => Outcome::Unknown(sdk_error("commit", err)),
            Err(SdkError::ServiceError(service)) => match service.into_err() {
                TransactWriteItemsError::TransactionCanceledException(cancelled) => {
                    classify_cancellation(cancelled.cancellation_reasons())
                }
                TransactWriteItemsError::TransactionInProgressException(e) => Outcome::Retry(e.to_string()),
                other => Outcome::Failed(StoreError::Internal(format!("DynamoDB commit: {other}"))),
            },
            Err(err) => Outcome::Failed(sdk_error("commit", err)),
        }
    }

    /// After an unanswered commit: voiding its first sequence decides. The void succeeds only if
    /// the transaction did not apply — and then it never can, its change item being taken.
    async fn resolve_unknown(&self, first: u64, last: u64, cause: StoreError) -> Result<CommitReceipt, StoreError> {
        for _ in 0..3 {
            match self.void(first).await {
                Ok(true) => {
                    self.void_range(first + 1, last).await;
                    return Err(StoreError::Unavailable(format!("commit not applied: {cause}")));
                }
                Ok(false) => {
                    // Taken: either our transaction applied, or (far-fetched) another reader voided
                    // it first after `hole_timeout`. The change item tells which.
                    return match self.change_item(first).await? {
                        Some(item) if !item.contains_key("void") => {
                            self.signal_commit();
                            Ok(CommitReceipt { first_sequence: first, last_sequence: last })
                        }
                        _ => Err(StoreError::Unavailable(format!("commit not applied: {cause}"))),
                    };
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        // Still no answer: the hole will be voided by the change-log readers, or the commit stands.
        Err(cause)
    }

    /// Voids every sequence of `first..=last`, best effort (a reader voids what is left later).
    async fn void_range(&self, first: u64, last: u64) {
        for sequence in first..=last {
            if let Err(error) = self.void(sequence).await {
                tracing::debug!(%error, sequence, "could not void a reserved sequence; readers will");
                return;
            }
        }
    }

    /// Puts a void change item at `sequence` unless one exists; true when this call voided it.
    pub(crate) async fn void(&self, sequence: u64) -> Result<bool, StoreError> {
        let mut item = key(change_pk(sequence), change_sk(sequence));
        item.insert("void".into(), AttributeValue::Bool(true));
        let put = self
            .inner
            .client
            .put_item()
            .table_name(&self.inner.config.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(pk)")
            .send()
            .await;
        match put {
            Ok(_) => Ok(true),
            Err(err) if err.as_service_error().is_some_and(|e| e.is_conditional_check_failed_exception()) => Ok(false),
            Err(err) => Err(sdk_error("void a sequence", err)),
        }
    }

    pub(crate) async fn change_item(&self, sequence: u64) -> Result<Option<Item>, StoreError> {
        self.get(&change_pk(sequence), &change_sk(sequence), "read a change").await
    }
}

/// Refuses what the table cannot hold before anything is reserved.
fn check_writes(writes: &[VersionWrite]) -> Result<(), StoreError> {
    if writes.is_empty() {
        return Err(StoreError::Internal("a commit needs at least one write".into()));
    }
    let mut seen = HashSet::new();
    for write in writes {
        if !seen.insert((write.resource_type, write.id.as_str())) {
            return Err(StoreError::Internal(format!("a commit writes {}/{} twice", write.resource_type, write.id)));
        }
        let floor = match write.expected {
            Expected::Absent => 0,
            Expected::Version(v) => v,
        };
        if write.version_id <= floor {
            return Err(StoreError::Internal(format!(
                "version {} of {}/{} does not follow {:?}",
                write.version_id, write.resource_type, write.id, write.expected
            )));
        }
    }
    Ok(())
}

fn put(table: &str, item: Item, condition: &str, values: Option<(&str, AttributeValue)>) -> Result<Put, StoreError> {
    let mut builder = Put::builder().table_name(table).set_item(Some(item)).condition_expression(condition);
    if let Some((name, value)) = values {
        builder = builder.expression_attribute_values(name, value);
    }
    builder
        .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
        .build()
        .map_err(|e| StoreError::Internal(format!("cannot build a DynamoDB put: {e}")))
}

/// Three puts per write, in write order: pointer, version, change.
fn transaction_items(
    table: &str,
    tenant: &TenantId,
    writes: &[VersionWrite],
    blobs: &[Option<String>],
    first: u64,
    last: u64,
) -> Result<Vec<TransactWriteItem>, StoreError> {
    let mut items = Vec::with_capacity(writes.len() * 3);
    for (offset, (write, blob)) in writes.iter().zip(blobs).enumerate() {
        let sequence = first + offset as u64;
        let pk = resource_pk(tenant, write.resource_type, &write.id);

        let mut pointer = key(pk.clone(), CURRENT_SK.into());
        pointer.insert("ver".into(), n(write.version_id));
        pointer.insert("seq".into(), n(sequence));
        pointer.insert("del".into(), AttributeValue::Bool(write.body.is_none()));
        let pointer = match write.expected {
            Expected::Absent => put(table, pointer, "attribute_not_exists(pk)", None)?,
            // A pointer locked by a staged transaction is not ours to replace.
            Expected::Version(v) => {
                put(table, pointer, "ver = :expected AND attribute_not_exists(lk)", Some((":expected", n(v))))?
            }
        };

        let version = version_item(tenant, write, blob.as_deref(), sequence, last);
        // A version item that carries a transaction while the pointer is below it is what an
        // aborted staged transaction left behind: it may be replaced.
        let version = put(table, version, "attribute_not_exists(pk) OR attribute_exists(txn)", None)?;

        let change = put(table, change_item(tenant, write, sequence, last), "attribute_not_exists(pk)", None)?;

        for put in [pointer, version, change] {
            items.push(TransactWriteItem::builder().put(put).build());
        }
    }
    Ok(items)
}

/// The answer to a write whose expected version did not hold (`actual`: what is there, when known).
pub(crate) fn conflict(write: &VersionWrite, actual: Option<u64>) -> StoreError {
    StoreError::Conflict { resource_type: write.resource_type, id: write.id.clone(), expected: write.expected, actual }
}

/// The version item of `write` at `sequence`, in a commit ending at `last` (its body in the blob
/// store at `blob`, when there).
pub(crate) fn version_item(
    tenant: &TenantId,
    write: &VersionWrite,
    blob: Option<&str>,
    sequence: u64,
    last: u64,
) -> Item {
    VersionItem {
        tenant,
        resource_type: write.resource_type,
        id: &write.id,
        version_id: write.version_id,
        sequence,
        commit_end: last,
        last_updated: write.last_updated,
        operation: write.operation,
        body: write.body.as_ref(),
        blob,
        traceparent: write.traceparent.as_deref(),
    }
    .to_item()
}

/// The change-log item of `write` at `sequence`, in a commit ending at `last`.
pub(crate) fn change_item(tenant: &TenantId, write: &VersionWrite, sequence: u64, last: u64) -> Item {
    let mut change = key(change_pk(sequence), change_sk(sequence));
    change.insert("tenant".into(), s(tenant.as_str()));
    change.insert("type".into(), s(write.resource_type.as_str()));
    change.insert("id".into(), s(write.id.as_str()));
    change.insert("ver".into(), n(write.version_id));
    change.insert("cend".into(), n(last));
    change
}

/// Reads DynamoDB's per-item cancellation reasons (in item order: pointer, version, change per
/// write).
fn classify_cancellation(reasons: &[CancellationReason]) -> Outcome {
    for (position, reason) in reasons.iter().enumerate() {
        let code = reason.code().unwrap_or("None");
        let (index, part) = (position / 3, position % 3);
        match (code, part) {
            ("None", _) => {}
            ("ConditionalCheckFailed", 0) => return Outcome::PointerFailed { index, old: reason.item().cloned() },
            // The version item exists although the pointer matched: only a concurrent writer of
            // the same version can cause that — a conflict too (the pointer moved under us).
            ("ConditionalCheckFailed", 1) => return Outcome::Conflict { index },
            ("ConditionalCheckFailed", _) => return Outcome::Retry("a reserved sequence was voided".into()),
            ("TransactionConflict", _) => return Outcome::Retry("transaction conflict".into()),
            ("ThrottlingError" | "ProvisionedThroughputExceeded", _) => {
                return Outcome::Retry(format!("throttled ({code})"));
            }
            (other, _) => {
                let message = reason.message().unwrap_or("");
                return Outcome::Failed(StoreError::Internal(format!("DynamoDB commit cancelled: {other} {message}")));
            }
        }
    }
    Outcome::Failed(StoreError::Internal("DynamoDB cancelled the commit without a reason".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use fhirmesh_core::model::Operation;
    use fhirmesh_fhir::{LogicalId, ResourceType};

    fn write(id: &str, expected: Expected, version_id: u64, body: Option<usize>) -> VersionWrite {
        VersionWrite {
            resource_type: ResourceType::parse("Patient").expect("type"),
            id: LogicalId::parse(id).expect("id"),
            expected,
            version_id,
            last_updated: time::OffsetDateTime::UNIX_EPOCH,
            operation: if body.is_some() { Operation::Update } else { Operation::Delete },
            body: body.map(|len| Bytes::from(vec![b' '; len])),
            traceparent: None,
        }
    }

    fn reason(code: &str) -> CancellationReason {
        CancellationReason::builder().code(code).build()
    }

    #[test]
    fn writes_the_table_cannot_hold_are_refused_up_front() {
        assert!(check_writes(&[write("a", Expected::Absent, 1, Some(10))]).is_ok());
        assert!(matches!(check_writes(&[]), Err(StoreError::Internal(_))));
        let many: Vec<_> = (0..34).map(|i| write(&format!("p{i}"), Expected::Absent, 1, Some(2))).collect();
        assert!(check_writes(&many).is_ok(), "large commits are staged, not refused");
        let twice = [write("a", Expected::Absent, 1, Some(2)), write("a", Expected::Version(1), 2, Some(2))];
        assert!(matches!(check_writes(&twice), Err(StoreError::Internal(_))));
        assert!(check_writes(&[write("a", Expected::Version(3), 3, None)]).is_err(), "versions must increase");
    }

    #[test]
    fn cancellation_reasons_map_to_outcomes() {
        let ok = reason("None");
        let pointer = classify_cancellation(&[ok.clone(), ok.clone(), ok.clone(), reason("ConditionalCheckFailed")]);
        assert!(matches!(pointer, Outcome::PointerFailed { index: 1, old: None }));
        let version =
            classify_cancellation(&[ok.clone(), ok.clone(), ok.clone(), ok.clone(), reason("ConditionalCheckFailed")]);
        assert!(matches!(version, Outcome::Conflict { index: 1 }));
        let mut old = Item::new();
        old.insert("ver".into(), n(4));
        let with_item = CancellationReason::builder().code("ConditionalCheckFailed").set_item(Some(old)).build();
        assert!(matches!(
            classify_cancellation(&[with_item]),
            Outcome::PointerFailed { index: 0, old: Some(item) } if item.get("ver") == Some(&n(4))
        ));
        let voided = classify_cancellation(&[ok.clone(), ok.clone(), reason("ConditionalCheckFailed")]);
        assert!(matches!(voided, Outcome::Retry(_)));
        assert!(matches!(classify_cancellation(&[reason("TransactionConflict")]), Outcome::Retry(_)));
        assert!(matches!(classify_cancellation(&[reason("ValidationError")]), Outcome::Failed(_)));
        assert!(matches!(classify_cancellation(&[]), Outcome::Failed(_)));
    }
}
