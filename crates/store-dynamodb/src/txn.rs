//! Commits too large for one `TransactWriteItems` (more than 33 writes, or more bytes than a
//! transaction takes): a commit record, pointer locks and staged versions (see `design.md`,
//! "Large commits"). Also what every other path needs to respect them: the state of a
//! transaction (cached once final), waiting for a lock, aborting a transaction whose writer died,
//! rolling a committed one forward.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{
    AttributeValue, Delete, Put, ReturnValuesOnConditionCheckFailure, TransactWriteItem, Update,
};
use fhirmesh_core::model::TenantId;
use fhirmesh_core::ports::{CommitReceipt, Expected, StoreError, VersionWrite};
use futures::stream::{self, TryStreamExt};

use crate::DynamoStore;
use crate::commit::{change_item, conflict, version_item};
use crate::error::{build_error, sdk_error};
use crate::items::{CURRENT_SK, Item, corrupt, get_s, get_u64, key, n, resource_pk, s, version_sk};

/// Partition-key prefix of a transaction's items: its record (`sk = X`) and manifest (`W#…`).
const TXN_PREFIX: &str = "X#";
const RECORD_SK: &str = "X";
const MANIFEST_PREFIX: &str = "W#";
/// Writes per manifest item (about 60 bytes each: well below the 400 KB item limit).
const MANIFEST_CHUNK: usize = 2000;
/// `TransactWriteItems` takes 100 items.
const TRANSACT_MAX_ITEMS: usize = 100;
/// `BatchWriteItem` takes 25 items (and 16 MB: 25 items of at most 400 KB fit).
/// Item writes a transaction has in flight at once while moving or releasing its pointers.
const CONCURRENCY: usize = 16;
/// Version items written between two renewals of a staged transaction's deadline.
const VERSIONS_PER_RENEWAL: usize = 250;
/// Final states remembered; past that the cache starts over (a miss costs one read).
const CACHE_LIMIT: usize = 100_000;
/// Attempts at one lock chunk that keeps meeting other transactions' races.
const LOCK_ATTEMPTS: u32 = 20;

const PENDING: &str = "pending";
const COMMITTED: &str = "committed";
const ABORTED: &str = "aborted";

/// Where a transaction stands. `Committed` and `Aborted` never change again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TxnState {
    /// Being staged; anyone may abort it once `deadline_ms` (epoch milliseconds) has passed.
    Pending {
        deadline_ms: u64,
    },
    Committed,
    Aborted,
}

/// One write of a transaction, as its manifest records it: enough to move or release its pointer
/// and to find its staged version item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ManifestEntry {
    pub pk: String,
    pub version: u64,
    pub sequence: u64,
    pub deleted: bool,
    /// The lock created the pointer (the resource did not exist): releasing it deletes it.
    pub created: bool,
}

impl ManifestEntry {
    fn encode(&self) -> String {
        format!("{}|{}|{}|{}|{}", self.version, self.sequence, u8::from(self.deleted), u8::from(self.created), self.pk)
    }

    fn decode(text: &str) -> Result<ManifestEntry, StoreError> {
        let bad = || corrupt(format!("manifest entry {text:?}"));
        let mut parts = text.splitn(5, '|');
        let mut next = || parts.next().ok_or_else(bad);
        let version = next()?.parse().map_err(|_| bad())?;
        let sequence = next()?.parse().map_err(|_| bad())?;
        let flag = |text: &str| match text {
            "0" => Ok(false),
            "1" => Ok(true),
            _ => Err(bad()),
        };
        let deleted = flag(next()?)?;
        let created = flag(next()?)?;
        let pk = next()?.to_owned();
        if !pk.starts_with("R#") {
            return Err(bad());
        }
        Ok(ManifestEntry { pk, version, sequence, deleted, created })
    }
}

/// Why staging stopped before the commit point (the transaction is then aborted).
enum Staging {
    /// A reader voided one of our sequences, or we were aborted at our deadline: try again.
    Retry(String),
    Conflict {
        index: usize,
        actual: Option<u64>,
    },
    Failed(StoreError),
}

impl From<StoreError> for Staging {
    fn from(err: StoreError) -> Self {
        Staging::Failed(err)
    }
}

fn txn_pk(txn: &str) -> String {
    format!("{TXN_PREFIX}{txn}")
}

fn new_txn_id() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}

fn conditional_failed<E: aws_sdk_dynamodb::error::ProvideErrorMetadata>(
    err: &SdkError<E, impl std::fmt::Debug>,
) -> bool {
    err.as_service_error().and_then(|e| e.code()) == Some("ConditionalCheckFailedException")
}

/// The transaction holding `item` (a version, change or pointer item), if any.
pub(crate) fn txn_of<'a>(item: &'a Item, attribute: &str) -> Option<&'a str> {
    match item.get(attribute) {
        Some(AttributeValue::S(txn)) => Some(txn),
        _ => None,
    }
}

impl DynamoStore {
    /// A commit through the staged protocol. Same contract as the one-transaction path: all or
    /// nothing, `Conflict` when an expected version does not hold, a definite answer.
    pub(crate) async fn commit_staged(
        &self,
        tenant: &TenantId,
        writes: &[VersionWrite],
        blobs: &[Option<String>],
    ) -> Result<CommitReceipt, StoreError> {
        let mut last_reason = String::new();
        for attempt in 0..crate::commit::MAX_ATTEMPTS {
            if attempt > 0 {
                crate::commit::backoff(attempt).await;
            }
            let last = self.reserve(writes.len() as u64).await?;
            let first = last + 1 - writes.len() as u64;
            let txn = new_txn_id();
            let receipt = CommitReceipt { first_sequence: first, last_sequence: last };
            let staged = match self.stage(tenant, writes, blobs, first, last, &txn).await {
                Ok(()) => self.commit_point(&txn).await,
                Err(failure) => Err(failure),
            };
            let failure = match staged {
                Ok(()) => {
                    self.signal_commit();
                    return Ok(receipt);
                }
                Err(failure) => failure,
            };
            // Abort decides: if the commit point was passed after all (an unanswered request),
            // the abort finds the transaction committed.
            match self.abort_txn(&txn, None).await {
                Ok(TxnState::Committed) => {
                    self.finish_committed(&txn).await;
                    self.signal_commit();
                    return Ok(receipt);
                }
                Ok(_) => {}
                Err(err) => {
                    tracing::warn!(%txn, error = %err, "could not abort a staged transaction; its deadline will");
                    return Err(match failure {
                        Staging::Failed(cause) => cause,
                        _ => err,
                    });
                }
            }
            match failure {
                Staging::Retry(reason) => {
                    tracing::debug!(%reason, attempt, "staged DynamoDB commit retried");
                    last_reason = reason;
                }
                Staging::Conflict { index, actual } => {
                    let write = &writes[index];
                    return Err(conflict(write, actual));
                }
                Staging::Failed(err) => return Err(err),
            }
        }
        Err(StoreError::Unavailable(format!("commit kept losing races after several attempts: {last_reason}")))
    }

    /// Steps 1–4 of a staged commit: record, change items, locks, versions (see `design.md`).
    async fn stage(
        &self,
        tenant: &TenantId,
        writes: &[VersionWrite],
        blobs: &[Option<String>],
        first: u64,
        last: u64,
        txn: &str,
    ) -> Result<(), Staging> {
        // Lock order: sorted partition keys, so two large transactions never wait on each other
        // in a cycle.
        let mut order: Vec<usize> = (0..writes.len()).collect();
        let pks: Vec<String> = writes.iter().map(|w| resource_pk(tenant, w.resource_type, &w.id)).collect();
        order.sort_by(|&a, &b| pks[a].cmp(&pks[b]));
        let manifest: Vec<ManifestEntry> = order
            .iter()
            .map(|&i| ManifestEntry {
                pk: pks[i].clone(),
                version: writes[i].version_id,
                sequence: first + i as u64,
                deleted: writes[i].body.is_none(),
                created: writes[i].expected == Expected::Absent,
            })
            .collect();

        // 1. The record and manifest: from here on anyone can finish or abort the transaction.
        //    Its deadline is renewed as staging goes on (`keep_alive` before each request).
        let mut deadline_ms = self.inner.clock.now_millis() + self.inner.config.txn_timeout.as_millis() as u64;
        self.write_record(txn, deadline_ms, first, last, &manifest).await?;

        // 2. The change items, marked with the transaction: the change log shows them once it
        //    commits, treats them as voids if it aborts, and waits while it is pending.
        let changes: Vec<Item> = writes
            .iter()
            .enumerate()
            .map(|(i, write)| {
                let mut item = change_item(tenant, write, first + i as u64, last);
                item.insert("txn".into(), s(txn));
                item
            })
            .collect();
        for chunk in changes.chunks(TRANSACT_MAX_ITEMS) {
            self.keep_alive(txn, &mut deadline_ms).await?;
            let items = chunk
                .iter()
                .map(|item| put_if_absent(&self.inner.config.table, item.clone()))
                .collect::<Result<Vec<_>, _>>()?;
            match self.inner.client.transact_write_items().set_transact_items(Some(items)).send().await {
                Ok(_) => {}
                Err(SdkError::ServiceError(service)) => match service.into_err() {
                    TransactWriteItemsError::TransactionCanceledException(e) => {
                        return Err(Staging::Retry(format!("staging change items: {e}")));
                    }
                    other => return Err(Staging::Failed(StoreError::Internal(format!("DynamoDB stage: {other}")))),
                },
                Err(err) => return Err(Staging::Failed(sdk_error("stage change items", err))),
            }
        }

        // 3. Lock every pointer, checking the expected versions.
        for chunk in order.chunks(TRANSACT_MAX_ITEMS) {
            self.keep_alive(txn, &mut deadline_ms).await?;
            self.lock_chunk(txn, writes, &pks, chunk).await?;
        }

        // 4. Stage the version items (we hold every pointer: no one else writes these keys).
        let versions: Vec<Item> = writes
            .iter()
            .zip(blobs)
            .enumerate()
            .map(|(i, (write, blob))| {
                let mut item = version_item(tenant, write, blob.as_deref(), first + i as u64, last);
                item.insert("txn".into(), s(txn));
                item
            })
            .collect::<Vec<_>>();
        for chunk in versions.chunks(VERSIONS_PER_RENEWAL) {
            self.keep_alive(txn, &mut deadline_ms).await?;
            self.batch_put(chunk.to_vec()).await?;
        }
        // The commit point must land before the deadline too.
        self.keep_alive(txn, &mut deadline_ms).await?;
        Ok(())
    }

    /// Renews `txn`'s deadline (to `txn_timeout` from now) once less than half of it is left: a
    /// writer still staging is alive, however long a large transaction takes on a slow or
    /// throttled backend, while one that died is aborted `txn_timeout` after its last sign of
    /// life. Retry when a reader aborted it at its deadline meanwhile.
    async fn keep_alive(&self, txn: &str, deadline_ms: &mut u64) -> Result<(), Staging> {
        let timeout = self.inner.config.txn_timeout.as_millis() as u64;
        let now = self.inner.clock.now_millis();
        if now + timeout / 2 < *deadline_ms {
            return Ok(());
        }
        let renewed = now + timeout;
        let update = self
            .inner
            .client
            .update_item()
            .table_name(&self.inner.config.table)
            .set_key(Some(key(txn_pk(txn), RECORD_SK.into())))
            .update_expression("SET #deadline = :renewed")
            // Unless a reader aborted it: its abort is conditioned on the deadline it saw.
            .condition_expression("#state = :pending AND #deadline = :deadline")
            .expression_attribute_names("#state", "state")
            .expression_attribute_names("#deadline", "deadline")
            .expression_attribute_values(":renewed", n(renewed))
            .expression_attribute_values(":pending", s(PENDING))
            .expression_attribute_values(":deadline", n(*deadline_ms))
            .send()
            .await;
        match update {
            Ok(_) => {
                *deadline_ms = renewed;
                Ok(())
            }
            Err(err) if conditional_failed(&err) => {
                Err(Staging::Retry("aborted at its deadline while it was staged".into()))
            }
            Err(err) => Err(Staging::Failed(sdk_error("renew a staged transaction", err))),
        }
    }

    /// The commit point of a staged transaction, then the pointers move (not needed for the
    /// answer: whoever meets a lock finishes it).
    async fn commit_point(&self, txn: &str) -> Result<(), Staging> {
        self.mark_committed(txn).await?;
        self.finish_committed(txn).await;
        Ok(())
    }

    /// The commit point: one conditional write.
    async fn mark_committed(&self, txn: &str) -> Result<(), Staging> {
        let committed = self
            .inner
            .client
            .update_item()
            .table_name(&self.inner.config.table)
            .set_key(Some(key(txn_pk(txn), RECORD_SK.into())))
            .update_expression("SET #state = :committed")
            .condition_expression("#state = :pending")
            .expression_attribute_names("#state", "state")
            .expression_attribute_values(":committed", s(COMMITTED))
            .expression_attribute_values(":pending", s(PENDING))
            .send()
            .await;
        match committed {
            Ok(_) => {}
            Err(err) if conditional_failed(&err) => {
                return Err(Staging::Retry("aborted at its deadline before it committed".into()));
            }
            Err(err) => return Err(Staging::Failed(sdk_error("commit a staged transaction", err))),
        }
        self.remember(txn, TxnState::Committed);
        Ok(())
    }

    async fn write_record(
        &self,
        txn: &str,
        deadline_ms: u64,
        first: u64,
        last: u64,
        manifest: &[ManifestEntry],
    ) -> Result<(), StoreError> {
        let mut items = Vec::new();
        for (chunk_index, chunk) in manifest.chunks(MANIFEST_CHUNK).enumerate() {
            let mut item = key(txn_pk(txn), format!("{MANIFEST_PREFIX}{chunk_index:06}"));
            item.insert("w".into(), AttributeValue::L(chunk.iter().map(|e| s(e.encode())).collect()));
            items.push(item);
        }
        // The manifest first: a record is never without it.
        self.batch_put(items).await?;
        let mut record = key(txn_pk(txn), RECORD_SK.into());
        record.insert("state".into(), s(PENDING));
        record.insert("deadline".into(), n(deadline_ms));
        record.insert("first".into(), n(first));
        record.insert("last".into(), n(last));
        self.inner
            .client
            .put_item()
            .table_name(&self.inner.config.table)
            .set_item(Some(record))
            .condition_expression("attribute_not_exists(pk)")
            .send()
            .await
            .map_err(|e| sdk_error("write a transaction record", e))?;
        Ok(())
    }

    /// Locks the pointers of `chunk` (indexes into `writes`) in one `TransactWriteItems`, waiting
    /// for other transactions' locks to clear.
    async fn lock_chunk(
        &self,
        txn: &str,
        writes: &[VersionWrite],
        pks: &[String],
        chunk: &[usize],
    ) -> Result<(), Staging> {
        for attempt in 0..LOCK_ATTEMPTS {
            let items = chunk
                .iter()
                .map(|&i| lock_update(&self.inner.config.table, &pks[i], writes[i].expected, txn))
                .collect::<Result<Vec<_>, _>>()?;
            let reasons = match self.inner.client.transact_write_items().set_transact_items(Some(items)).send().await {
                Ok(_) => return Ok(()),
                Err(SdkError::ServiceError(service)) => match service.into_err() {
                    TransactWriteItemsError::TransactionCanceledException(e) => e.cancellation_reasons().to_vec(),
                    TransactWriteItemsError::TransactionInProgressException(_) => Vec::new(),
                    other => return Err(Staging::Failed(StoreError::Internal(format!("DynamoDB lock: {other}")))),
                },
                Err(err) => return Err(Staging::Failed(sdk_error("lock pointers", err))),
            };
            for (position, reason) in reasons.iter().enumerate() {
                if reason.code() != Some("ConditionalCheckFailed") {
                    continue;
                }
                let index = chunk[position];
                match self.pointer_after_failure(&pks[index], reason.item()).await? {
                    PointerState::LockedBy(other) if other != txn => {
                        self.clear_lock(&pks[index], &other).await?;
                    }
                    PointerState::LockedBy(_) => {}
                    PointerState::Version(actual) => return Err(Staging::Conflict { index, actual }),
                }
            }
            // Lost a race (locks cleared, TransactionConflict, throttling): again.
            crate::commit::backoff(attempt.min(4) + 1).await;
        }
        Err(Staging::Retry("pointers stayed locked by other transactions".into()))
    }

    /// What a failed pointer condition met: from the returned old item, else read again.
    pub(crate) async fn pointer_after_failure(&self, pk: &str, old: Option<&Item>) -> Result<PointerState, StoreError> {
        let pointer = match old {
            Some(old) => Some(old.clone()),
            None => self.get(pk, CURRENT_SK, "read a pointer").await?,
        };
        Ok(match pointer {
            None => PointerState::Version(None),
            Some(pointer) => match txn_of(&pointer, "lk") {
                Some(other) => PointerState::LockedBy(other.to_owned()),
                None => PointerState::Version(get_u64(&pointer, "ver").ok()),
            },
        })
    }

    /// Puts `items` (no atomicity needed: staged versions are invisible until the commit).
    async fn batch_put(&self, items: Vec<Item>) -> Result<(), StoreError> {
        crate::batch::put_all(&self.inner.client, &self.inner.config.table, items, "batch write").await
    }

    /// The state of `txn`: from the cache when final, else read (strongly consistent).
    pub(crate) async fn txn_state(&self, txn: &str) -> Result<TxnState, StoreError> {
        if let Some(state) = self.cached(txn) {
            return Ok(state);
        }
        let record = self
            .get(&txn_pk(txn), RECORD_SK, "read a transaction record")
            .await?
            .ok_or_else(|| corrupt(format!("transaction {txn} has no record")))?;
        let state = match get_s(&record, "state")? {
            PENDING => TxnState::Pending { deadline_ms: get_u64(&record, "deadline")? },
            COMMITTED => TxnState::Committed,
            ABORTED => TxnState::Aborted,
            other => return Err(corrupt(format!("transaction {txn} is in state {other:?}"))),
        };
        self.remember(txn, state);
        Ok(state)
    }

    /// Whether an item written by `txn` (if any) belongs to the committed data.
    pub(crate) async fn visible(&self, item: &Item) -> Result<bool, StoreError> {
        match txn_of(item, "txn") {
            None => Ok(true),
            Some(txn) => Ok(self.txn_state(txn).await? == TxnState::Committed),
        }
    }

    /// `txn_state`, aborting a pending transaction whose deadline has passed: what readers that
    /// must not wait forever (the change log, the stream relay) call.
    pub(crate) async fn settle(&self, txn: &str) -> Result<TxnState, StoreError> {
        match self.txn_state(txn).await? {
            TxnState::Pending { deadline_ms } if self.inner.clock.now_millis() > deadline_ms => {
                tracing::warn!(%txn, "aborting a staged transaction that passed its deadline (its writer stopped)");
                self.abort_txn(txn, Some(deadline_ms)).await
            }
            state => Ok(state),
        }
    }

    /// Aborts `txn` unless it committed — or, for a reader that found it past its deadline
    /// (`expired`: the deadline it saw), unless its writer renewed that deadline since; returns
    /// its state then (pending when renewed). The caller that aborts it cleans up (releases its
    /// locks, deletes its staged versions, voids its unstaged sequences).
    pub(crate) async fn abort_txn(&self, txn: &str, expired: Option<u64>) -> Result<TxnState, StoreError> {
        let mut abort = self
            .inner
            .client
            .update_item()
            .table_name(&self.inner.config.table)
            .set_key(Some(key(txn_pk(txn), RECORD_SK.into())))
            .update_expression("SET #state = :aborted")
            .expression_attribute_names("#state", "state")
            .expression_attribute_values(":aborted", s(ABORTED))
            .expression_attribute_values(":pending", s(PENDING));
        abort = match expired {
            None => abort.condition_expression("#state = :pending"),
            Some(deadline) => abort
                .condition_expression("#state = :pending AND #deadline = :deadline")
                .expression_attribute_names("#deadline", "deadline")
                .expression_attribute_values(":deadline", n(deadline)),
        };
        let aborted = abort.send().await;
        match aborted {
            Ok(_) => {
                self.remember(txn, TxnState::Aborted);
                if let Err(error) = self.clean_aborted(txn).await {
                    tracing::debug!(%txn, %error, "cleanup of an aborted transaction left for later readers");
                }
                Ok(TxnState::Aborted)
            }
            Err(err) if conditional_failed(&err) => {
                // Final already, or renewed (or the record is missing, which `txn_state` reports).
                self.txn_state(txn).await
            }
            Err(err) => Err(sdk_error("abort a staged transaction", err)),
        }
    }

    /// Waits until `txn` is final (aborting it at its deadline) and returns that state.
    async fn await_txn(&self, txn: &str) -> Result<TxnState, StoreError> {
        let mut delay = 20u64;
        loop {
            match self.settle(txn).await? {
                TxnState::Pending { .. } => {
                    tokio::time::sleep(Duration::from_millis(delay + fastrand::u64(..delay))).await;
                    delay = (delay * 2).min(500);
                }
                state => return Ok(state),
            }
        }
    }

    /// Frees the pointer `pk` from `txn`'s lock: waits for the transaction to end, then rolls it
    /// forward (committed) or releases the pointer (aborted).
    pub(crate) async fn clear_lock(&self, pk: &str, txn: &str) -> Result<(), StoreError> {
        match self.await_txn(txn).await? {
            TxnState::Committed => self.roll_forward(txn).await,
            _ => self.release_pointer(pk, txn).await,
        }
    }

    async fn finish_committed(&self, txn: &str) {
        if let Err(error) = self.roll_forward(txn).await {
            tracing::debug!(%txn, %error, "pointers of a committed transaction left for the next writer to move");
        }
    }

    /// Moves every pointer `txn` still locks to its new version.
    async fn roll_forward(&self, txn: &str) -> Result<(), StoreError> {
        let table = &self.inner.config.table;
        let manifest = self.read_manifest(txn).await?;
        let moves = manifest
            .iter()
            .map(|entry| {
                let update = Update::builder()
                    .table_name(table)
                    .set_key(Some(key(entry.pk.clone(), CURRENT_SK.into())))
                    .update_expression("SET ver = :ver, seq = :seq, del = :del REMOVE lk")
                    .condition_expression("lk = :txn")
                    .expression_attribute_values(":ver", n(entry.version))
                    .expression_attribute_values(":seq", n(entry.sequence))
                    .expression_attribute_values(":del", AttributeValue::Bool(entry.deleted))
                    .expression_attribute_values(":txn", s(txn))
                    .build()
                    .map_err(build_error)?;
                Ok(TransactWriteItem::builder().update(update).build())
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        self.apply_where_held(moves, "move pointers").await
    }

    /// Releases `txn`'s lock on `pk` (a single pointer met by a writer).
    async fn release_pointer(&self, pk: &str, txn: &str) -> Result<(), StoreError> {
        // Whether the lock created the pointer is in the manifest; without reading it, try the
        // delete of a created pointer first, then the removal of the lock.
        let created = ManifestEntry { pk: pk.to_owned(), version: 0, sequence: 0, deleted: false, created: true };
        let existing = ManifestEntry { created: false, ..created.clone() };
        let items = vec![release_item(&self.inner.config.table, &created, txn)?];
        self.apply_where_held(items, "release a pointer").await?;
        let items = vec![release_item(&self.inner.config.table, &existing, txn)?];
        self.apply_where_held(items, "release a pointer").await
    }

    /// After an abort: delete the staged versions, release the locks, void the sequences whose
    /// change items were never staged (so the change log need not wait `hole_timeout`).
    async fn clean_aborted(&self, txn: &str) -> Result<(), StoreError> {
        let table = &self.inner.config.table;
        let manifest = self.read_manifest(txn).await?;
        let mut items = Vec::with_capacity(manifest.len() * 2);
        for entry in &manifest {
            let delete = Delete::builder()
                .table_name(table)
                .set_key(Some(key(entry.pk.clone(), version_sk(entry.version))))
                .condition_expression("txn = :txn")
                .expression_attribute_values(":txn", s(txn))
                .build()
                .map_err(build_error)?;
            items.push(TransactWriteItem::builder().delete(delete).build());
        }
        self.apply_where_held(items, "delete staged versions").await?;
        let releases =
            manifest.iter().map(|entry| release_item(table, entry, txn)).collect::<Result<Vec<_>, StoreError>>()?;
        self.apply_where_held(releases, "release pointers").await?;

        let record = self
            .get(&txn_pk(txn), RECORD_SK, "read a transaction record")
            .await?
            .ok_or_else(|| corrupt("a transaction without record"))?;
        let (first, last) = (get_u64(&record, "first")?, get_u64(&record, "last")?);
        let present = self.sequences_present(first, last).await?;
        let missing: Vec<u64> = (first..=last).filter(|seq| !present.contains(seq)).collect();
        stream::iter(missing.into_iter().map(Ok))
            .try_for_each_concurrent(CONCURRENCY, |sequence| async move { self.void(sequence).await.map(|_| ()) })
            .await
    }

    /// Applies conditional writes whose condition says "`txn` still holds this", in transactions
    /// of 100: items whose condition fails were done by someone else (or never held) and are
    /// dropped; the rest of a cancelled transaction is tried again.
    async fn apply_where_held(&self, items: Vec<TransactWriteItem>, what: &str) -> Result<(), StoreError> {
        for chunk in items.chunks(TRANSACT_MAX_ITEMS) {
            let mut pending = chunk.to_vec();
            let mut attempt = 0;
            while !pending.is_empty() {
                let sent =
                    self.inner.client.transact_write_items().set_transact_items(Some(pending.clone())).send().await;
                let reasons = match sent {
                    Ok(_) => break,
                    Err(SdkError::ServiceError(service)) => match service.into_err() {
                        TransactWriteItemsError::TransactionCanceledException(e) => e.cancellation_reasons().to_vec(),
                        TransactWriteItemsError::TransactionInProgressException(_) => Vec::new(),
                        other => return Err(StoreError::Internal(format!("DynamoDB {what}: {other}"))),
                    },
                    Err(err) => return Err(sdk_error(what, err)),
                };
                if reasons.len() == pending.len() {
                    pending = pending
                        .into_iter()
                        .zip(&reasons)
                        .filter(|(_, reason)| reason.code() != Some("ConditionalCheckFailed"))
                        .map(|(item, _)| item)
                        .collect();
                }
                attempt += 1;
                if attempt > LOCK_ATTEMPTS {
                    return Err(StoreError::Unavailable(format!("DynamoDB {what}: kept losing races")));
                }
                if !pending.is_empty() {
                    crate::commit::backoff(attempt.min(4)).await;
                }
            }
        }
        Ok(())
    }

    async fn read_manifest(&self, txn: &str) -> Result<Vec<ManifestEntry>, StoreError> {
        let query = self
            .inner
            .client
            .query()
            .table_name(&self.inner.config.table)
            .key_condition_expression("pk = :pk AND begins_with(sk, :w)")
            .expression_attribute_values(":pk", s(txn_pk(txn)))
            .expression_attribute_values(":w", s(MANIFEST_PREFIX));
        let mut entries = Vec::new();
        for item in self.query_all(query, "read a transaction manifest").await? {
            let Some(AttributeValue::L(list)) = item.get("w") else {
                return Err(corrupt(format!("manifest of transaction {txn} without entries")));
            };
            for value in list {
                let AttributeValue::S(text) = value else {
                    return Err(corrupt(format!("manifest of transaction {txn}: {value:?}")));
                };
                entries.push(ManifestEntry::decode(text)?);
            }
        }
        Ok(entries)
    }

    fn cached(&self, txn: &str) -> Option<TxnState> {
        let cache = self.inner.txns.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        cache.get(txn).map(|&committed| if committed { TxnState::Committed } else { TxnState::Aborted })
    }

    fn remember(&self, txn: &str, state: TxnState) {
        let committed = match state {
            TxnState::Committed => true,
            TxnState::Aborted => false,
            TxnState::Pending { .. } => return,
        };
        let mut cache = self.inner.txns.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if cache.len() >= CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(txn.to_owned(), committed);
    }
}

/// What a pointer whose condition failed holds.
pub(crate) enum PointerState {
    LockedBy(String),
    Version(Option<u64>),
}

fn put_if_absent(table: &str, item: Item) -> Result<TransactWriteItem, StoreError> {
    let put = Put::builder()
        .table_name(table)
        .set_item(Some(item))
        .condition_expression("attribute_not_exists(pk)")
        .build()
        .map_err(build_error)?;
    Ok(TransactWriteItem::builder().put(put).build())
}

/// Releasing `txn`'s lock on a pointer: delete it if the lock created it, else remove the lock.
fn release_item(table: &str, entry: &ManifestEntry, txn: &str) -> Result<TransactWriteItem, StoreError> {
    let key = key(entry.pk.clone(), CURRENT_SK.into());
    Ok(if entry.created {
        let delete = Delete::builder()
            .table_name(table)
            .set_key(Some(key))
            .condition_expression("lk = :txn AND attribute_not_exists(ver)")
            .expression_attribute_values(":txn", s(txn))
            .build()
            .map_err(build_error)?;
        TransactWriteItem::builder().delete(delete).build()
    } else {
        let update = Update::builder()
            .table_name(table)
            .set_key(Some(key))
            .update_expression("REMOVE lk")
            .condition_expression("lk = :txn")
            .expression_attribute_values(":txn", s(txn))
            .build()
            .map_err(build_error)?;
        TransactWriteItem::builder().update(update).build()
    })
}

/// The lock on one pointer: the expected version must hold and no other transaction may hold it
/// (or it is ours already: a repeated request is harmless).
fn lock_update(table: &str, pk: &str, expected: Expected, txn: &str) -> Result<TransactWriteItem, StoreError> {
    let mut values: HashMap<String, AttributeValue> = HashMap::from([(":txn".to_owned(), s(txn))]);
    let condition = match expected {
        Expected::Absent => "attribute_not_exists(pk) OR lk = :txn",
        Expected::Version(v) => {
            values.insert(":expected".to_owned(), n(v));
            "(ver = :expected AND attribute_not_exists(lk)) OR lk = :txn"
        }
    };
    let update = Update::builder()
        .table_name(table)
        .set_key(Some(key(pk.to_owned(), CURRENT_SK.into())))
        .update_expression("SET lk = :txn")
        .condition_expression(condition)
        .set_expression_attribute_values(Some(values))
        .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
        .build()
        .map_err(build_error)?;
    Ok(TransactWriteItem::builder().update(update).build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_entries_round_trip_and_reject_garbage() {
        let entry =
            ManifestEntry { pk: "R#t#Patient#a|b".into(), version: 3, sequence: 99, deleted: true, created: false };
        assert_eq!(ManifestEntry::decode(&entry.encode()), Ok(entry));
        for bad in ["", "1|2|0|0", "x|2|0|0|R#a", "1|2|2|0|R#a", "1|2|0|0|X#a", "1|-2|0|0|R#a", "1|2|0|R#a"] {
            assert!(ManifestEntry::decode(bad).is_err(), "{bad:?}");
        }
    }

    use bytes::Bytes;
    use fhirmesh_core::model::Operation;
    use fhirmesh_core::ports::{ChangeLog, ResourceStore};
    use fhirmesh_fhir::{LogicalId, ResourceType};

    use crate::{Clock, DynamoConfig, provision};

    async fn moto_store(txn_timeout: Duration) -> DynamoStore {
        moto_store_on(txn_timeout, Clock::default()).await
    }

    /// A store whose transaction deadlines run on a manual clock: time passes for them only
    /// when the test advances it, however slow the machine is.
    async fn moto_store_on(txn_timeout: Duration, clock: Clock) -> DynamoStore {
        let sdk = fhirmesh_testinfra::aws_config().await;
        let client = aws_sdk_dynamodb::Client::new(&sdk);
        let table = fhirmesh_testinfra::unique_name("txn");
        provision(&client, &table).await.expect("provision");
        let config =
            DynamoConfig { table, txn_timeout, hole_timeout: Duration::from_millis(300), ..DynamoConfig::default() };
        DynamoStore::with_clock(client, config, clock)
    }

    fn manual_clock() -> Clock {
        Clock::manual(crate::now_millis())
    }

    fn tenant() -> TenantId {
        TenantId::parse("t1").expect("tenant")
    }

    fn write(id: &str, expected: Expected, version_id: u64, tag: &str) -> VersionWrite {
        VersionWrite {
            resource_type: ResourceType::parse("Basic").expect("type"),
            id: LogicalId::parse(id).expect("id"),
            expected,
            version_id,
            last_updated: time::OffsetDateTime::UNIX_EPOCH,
            operation: if version_id == 1 { Operation::Create } else { Operation::Update },
            body: Some(Bytes::from(format!("{{\"resourceType\":\"Basic\",\"id\":\"{id}\",\"tag\":\"{tag}\"}}"))),
            traceparent: None,
        }
    }

    fn tag_of(version: &fhirmesh_core::ResourceVersion) -> String {
        let body: serde_json::Value = serde_json::from_slice(version.body.as_deref().expect("body")).expect("json");
        body["tag"].as_str().expect("tag").to_owned()
    }

    fn key_of(id: &str) -> (ResourceType, LogicalId) {
        (ResourceType::parse("Basic").expect("type"), LogicalId::parse(id).expect("id"))
    }

    /// Seeds a@1 and b@1, then stages (a@2, b@2, c@1) as a writer that dies before or after its
    /// commit point would leave them. Returns the transaction id.
    async fn abandoned(store: &DynamoStore, committed: bool) -> String {
        let t = tenant();
        let seed = vec![write("a", Expected::Absent, 1, "seed"), write("b", Expected::Absent, 1, "seed")];
        store.commit(&t, seed).await.expect("seed");
        let writes = vec![
            write("a", Expected::Version(1), 2, "staged"),
            write("b", Expected::Version(1), 2, "staged"),
            write("c", Expected::Absent, 1, "staged"),
        ];
        let last = store.reserve(3).await.expect("reserve");
        let txn = new_txn_id();
        let staged = store.stage(&t, &writes, &[None, None, None], last - 2, last, &txn).await;
        assert!(staged.is_ok(), "staging failed");
        if committed {
            assert!(store.mark_committed(&txn).await.is_ok(), "commit point");
        }
        txn
    }

    #[tokio::test]
    async fn a_transaction_abandoned_before_its_commit_point_is_invisible_then_aborted() {
        let timeout = Duration::from_secs(3);
        let clock = manual_clock();
        let store = moto_store_on(timeout, clock.clone()).await;
        let t = tenant();
        let txn = abandoned(&store, false).await;
        assert!(matches!(store.txn_state(&txn).await, Ok(TxnState::Pending { .. })));

        // Nothing of it is visible: reads, versions, history, the change log.
        let a = store.read(&t, key_of("a").0, &key_of("a").1).await.expect("read").expect("a");
        assert_eq!((a.version_id, tag_of(&a).as_str()), (1, "seed"));
        assert_eq!(store.vread(&t, key_of("b").0, &key_of("b").1, 2).await, Ok(None));
        let many = store.read_many(&t, &[key_of("a"), key_of("b"), key_of("c")]).await.expect("read many");
        let versions: Vec<Option<u64>> = many.iter().map(|v| v.as_ref().map(|v| v.version_id)).collect();
        assert_eq!(versions, vec![Some(1), Some(1), None]);
        let history = store
            .history(
                &t,
                fhirmesh_core::ports::HistoryQuery {
                    scope: fhirmesh_core::ports::HistoryScope::System,
                    since: None,
                    at: None,
                    before_sequence: None,
                    limit: 100,
                },
            )
            .await
            .expect("history");
        assert_eq!(history.len(), 2, "only the seed");
        assert_eq!(store.changes_after(2, 100).await, Ok(vec![]), "the log waits at the pending transaction");
        assert_eq!(store.latest_sequence().await, Ok(2));
        assert!(matches!(store.txn_state(&txn).await, Ok(TxnState::Pending { .. })));

        // Past the deadline, a writer of a locked resource aborts the transaction and wins.
        clock.advance(timeout + Duration::from_millis(1));
        let receipt = store.commit(&t, vec![write("a", Expected::Version(1), 2, "after")]).await.expect("write");
        assert_eq!(store.txn_state(&txn).await, Ok(TxnState::Aborted));
        let a = store.read(&t, key_of("a").0, &key_of("a").1).await.expect("read").expect("a");
        assert_eq!((a.version_id, tag_of(&a).as_str()), (2, "after"));
        // The aborted transaction's sequences are voids; the new write follows them.
        let changes = store.changes_after(2, 100).await.expect("changes");
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].version.sequence, receipt.first_sequence);
        assert_eq!(store.latest_sequence().await, Ok(receipt.first_sequence));
        // Its locks and staged versions are gone: c can be created, b updated to version 2.
        assert_eq!(store.read(&t, key_of("c").0, &key_of("c").1).await, Ok(None));
        store.commit(&t, vec![write("c", Expected::Absent, 1, "new")]).await.expect("create c");
        store.commit(&t, vec![write("b", Expected::Version(1), 2, "new")]).await.expect("update b");
    }

    #[tokio::test]
    async fn a_transaction_abandoned_after_its_commit_point_is_visible_and_rolled_forward() {
        let store = moto_store(Duration::from_secs(30)).await;
        let t = tenant();
        let txn = abandoned(&store, true).await;
        assert_eq!(store.txn_state(&txn).await, Ok(TxnState::Committed));

        let a = store.read(&t, key_of("a").0, &key_of("a").1).await.expect("read").expect("a");
        assert_eq!((a.version_id, tag_of(&a).as_str()), (2, "staged"));
        let many = store.read_many(&t, &[key_of("a"), key_of("b"), key_of("c")]).await.expect("read many");
        let versions: Vec<Option<u64>> = many.iter().map(|v| v.as_ref().map(|v| v.version_id)).collect();
        assert_eq!(versions, vec![Some(2), Some(2), Some(1)], "pointers behind, versions tell");
        let changes = store.changes_after(2, 100).await.expect("changes");
        assert_eq!(changes.iter().map(|c| c.version.sequence).collect::<Vec<_>>(), vec![3, 4, 5]);
        assert!(changes.iter().all(|c| c.commit_end == 5));
        // An export reads through the locks too (c's pointer exists only as a lock).
        let scan = crate::ExportScan { tenant: &t, types: &[], since: None, segment: 0, segments: 1 };
        let page = store.export_page(&scan, None, 100).await.expect("export");
        let mut exported: Vec<(String, u64)> =
            page.resources.iter().map(|v| (v.id.to_string(), v.version_id)).collect();
        exported.sort();
        assert_eq!(exported, vec![("a".to_owned(), 2), ("b".to_owned(), 2), ("c".to_owned(), 1)]);

        // The next writer meets a lock of a committed transaction: it rolls it forward, then its
        // expectations are checked against the moved pointers.
        store.commit(&t, vec![write("a", Expected::Version(2), 3, "next")]).await.expect("update a");
        let stale = store.commit(&t, vec![write("c", Expected::Absent, 1, "again")]).await;
        assert!(matches!(stale, Err(StoreError::Conflict { actual: Some(1), .. })), "{stale:?}");
        let stale = store.commit(&t, vec![write("b", Expected::Version(1), 2, "stale")]).await;
        assert!(matches!(stale, Err(StoreError::Conflict { actual: Some(2), .. })), "{stale:?}");
    }

    /// The deadline a pending `txn` has now.
    async fn deadline_of(store: &DynamoStore, txn: &str) -> u64 {
        match store.txn_state(txn).await.expect("state") {
            TxnState::Pending { deadline_ms } => deadline_ms,
            other => panic!("{txn} is {other:?}, not pending"),
        }
    }

    #[tokio::test]
    async fn a_writer_renews_its_deadline_and_a_reader_that_saw_the_old_one_cannot_abort() {
        let timeout = Duration::from_secs(2);
        let clock = manual_clock();
        let store = moto_store_on(timeout, clock.clone()).await;
        let txn = abandoned(&store, false).await;
        let first = deadline_of(&store, &txn).await;
        assert_eq!(first, clock.now_millis() + 2_000);

        // More than half the timeout left: nothing to renew.
        let mut deadline = first;
        clock.advance(Duration::from_millis(900));
        assert!(store.keep_alive(&txn, &mut deadline).await.is_ok());
        assert_eq!((deadline, deadline_of(&store, &txn).await), (first, first));

        // Less than half left: renewed to a full timeout from now.
        clock.advance(Duration::from_millis(200));
        assert!(store.keep_alive(&txn, &mut deadline).await.is_ok());
        assert_eq!(deadline, clock.now_millis() + 2_000, "renewed to a full timeout");
        assert_eq!(deadline_of(&store, &txn).await, deadline);

        // A reader that saw the first deadline pass cannot abort it: the renewal won.
        clock.advance(Duration::from_millis(901));
        assert!(clock.now_millis() > first);
        assert_eq!(store.abort_txn(&txn, Some(first)).await, Ok(TxnState::Pending { deadline_ms: deadline }));
        assert_eq!(store.settle(&txn).await, Ok(TxnState::Pending { deadline_ms: deadline }));

        // Past the renewed deadline a reader aborts it, and the writer learns it at its next
        // renewal: it starts again.
        clock.advance(Duration::from_millis(1_100));
        assert!(clock.now_millis() > deadline);
        assert_eq!(store.settle(&txn).await, Ok(TxnState::Aborted));
        assert!(matches!(store.keep_alive(&txn, &mut deadline).await, Err(Staging::Retry(_))));
    }

    #[tokio::test]
    async fn a_large_commit_lands_while_readers_poll_the_change_log() {
        // Staging 400 writes takes 11 renewal points; readers meanwhile settle every pending
        // transaction they meet, aborting those past their deadline. Time on the deadlines'
        // clock passes with the readers' polls (25 ms each, a poll reading up to 1,000 change
        // items), so the test races requests against requests, not requests against a wall
        // clock a loaded machine stretches. (The renewal itself, and a reader that saw an old
        // deadline, are checked step by step in the test above.)
        let timeout = Duration::from_secs(2);
        let clock = manual_clock();
        let store = moto_store_on(timeout, clock.clone()).await;
        let t = tenant();
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = tokio::spawn({
            let (store, done, clock) = (store.clone(), done.clone(), clock.clone());
            async move {
                while !done.load(std::sync::atomic::Ordering::Acquire) {
                    clock.advance(Duration::from_millis(25));
                    let _ = store.changes_after(0, 1_000).await;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        });
        let writes: Vec<VersionWrite> = (0..400).map(|i| write(&format!("w{i}"), Expected::Absent, 1, "big")).collect();
        let receipt = store.commit(&t, writes).await.expect("the commit lands");
        done.store(true, std::sync::atomic::Ordering::Release);
        reader.await.expect("reader");
        assert_eq!(receipt.last_sequence - receipt.first_sequence + 1, 400);
        let changes = store.changes_after(0, 1_000).await.expect("changes");
        assert_eq!(changes.len(), 400, "every write of the commit, once");
    }

    /// Records what a relay publishes.
    #[derive(Default)]
    struct Recorder(std::sync::Mutex<Vec<fhirmesh_core::events::ResourceChanged>>);

    #[async_trait::async_trait]
    impl fhirmesh_core::ports::EventPublisher for Recorder {
        async fn publish(
            &self,
            events: &[fhirmesh_core::events::ResourceChanged],
        ) -> Result<(), fhirmesh_core::ports::BusError> {
            self.0.lock().expect("recorder").extend_from_slice(events);
            Ok(())
        }
    }

    impl Recorder {
        /// (id, version, body tag) of each event, in publication order.
        fn published(&self) -> Vec<(String, u64, String)> {
            let events = self.0.lock().expect("recorder");
            events
                .iter()
                .map(|e| {
                    let body: serde_json::Value =
                        serde_json::from_slice(e.resource.as_deref().expect("body")).expect("json");
                    (e.id.to_string(), e.version_id, body["tag"].as_str().expect("tag").to_owned())
                })
                .collect()
        }
    }

    async fn relay_of(store: &DynamoStore) -> crate::StreamRelay {
        let sdk = fhirmesh_testinfra::aws_config().await;
        let arn = crate::stream_arn(store.client(), store.table()).await.expect("stream");
        let leases = fhirmesh_testinfra::unique_name("leases");
        crate::provision_leases(store.client(), &leases).await.expect("lease table");
        let config = crate::StreamRelayConfig::new(arn, leases, "w1");
        crate::StreamRelay::new(store.clone(), aws_sdk_dynamodbstreams::Client::new(&sdk), config)
    }

    /// Relay rounds until `count` events are out (bounded: 10 s).
    async fn relay_until(relay: &crate::StreamRelay, recorder: &Recorder, count: usize) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while recorder.published().len() < count {
            assert!(std::time::Instant::now() < deadline, "only {:?} published", recorder.published());
            relay.run_once(recorder).await.expect("relay round");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn owned(list: &[(&str, u64, &str)]) -> Vec<(String, u64, String)> {
        list.iter().map(|(id, v, tag)| ((*id).to_owned(), *v, (*tag).to_owned())).collect()
    }

    #[tokio::test]
    async fn the_stream_relay_waits_at_a_pending_transaction_and_never_publishes_it_once_aborted() {
        let clock = manual_clock();
        let store = moto_store_on(Duration::from_millis(800), clock.clone()).await;
        let relay = relay_of(&store).await;
        let txn = abandoned(&store, false).await;
        let recorder = Recorder::default();
        relay_until(&relay, &recorder, 2).await;
        // Pending: the relay stops before the staged versions, round after round.
        for _ in 0..3 {
            relay.run_once(&recorder).await.expect("relay round");
        }
        assert_eq!(recorder.published(), owned(&[("a", 1, "seed"), ("b", 1, "seed")]));
        assert!(matches!(store.txn_state(&txn).await, Ok(TxnState::Pending { .. })));

        // Past the deadline the relay aborts it itself, skips it, and later writes flow.
        clock.advance(Duration::from_millis(801));
        relay.run_once(&recorder).await.expect("relay round");
        assert_eq!(store.txn_state(&txn).await, Ok(TxnState::Aborted));
        store.commit(&tenant(), vec![write("a", Expected::Version(1), 2, "after")]).await.expect("write");
        relay_until(&relay, &recorder, 3).await;
        relay.run_once(&recorder).await.expect("relay round");
        assert_eq!(recorder.published(), owned(&[("a", 1, "seed"), ("b", 1, "seed"), ("a", 2, "after")]));
    }

    #[tokio::test]
    async fn the_stream_relay_publishes_a_transaction_committed_by_a_writer_that_died() {
        let store = moto_store(Duration::from_secs(30)).await;
        let relay = relay_of(&store).await;
        abandoned(&store, true).await;
        let recorder = Recorder::default();
        relay_until(&relay, &recorder, 5).await;
        relay.run_once(&recorder).await.expect("relay round");
        assert_eq!(
            recorder.published(),
            owned(&[("a", 1, "seed"), ("b", 1, "seed"), ("a", 2, "staged"), ("b", 2, "staged"), ("c", 1, "staged")])
        );
    }

    #[test]
    fn lock_conditions_accept_our_own_lock_again() {
        let update = lock_update("t", "R#a", Expected::Version(2), "tx1").expect("builds");
        let condition = update.update().and_then(|u| u.condition_expression()).expect("condition");
        assert!(condition.contains("attribute_not_exists(lk)") && condition.contains("lk = :txn"));
        let update = lock_update("t", "R#a", Expected::Absent, "tx1").expect("builds");
        let condition = update.update().and_then(|u| u.condition_expression()).expect("condition");
        assert!(condition.starts_with("attribute_not_exists(pk)"));
    }
}
