//! The change log: a gap-free prefix of the change items, holes of dead writers voided after a
//! timeout (see `design.md`, "The change log").

use std::collections::HashSet;
use std::time::Instant;

use fhirmesh_core::ports::{ChangeRecord, StoreError};

use crate::DynamoStore;
use crate::error::sdk_error;
use crate::items::{
    CHANGE_BUCKET, Item, VERSION_PREFIX, change_pk, change_sk, get_s, get_u64, key, n, s, tenant_of, version_sk,
};
use crate::txn::{TxnState, txn_of};

/// What the log holds at one sequence.
enum Slot {
    Change(Item),
    Void,
    /// Nothing (yet): a commit in flight, a dead writer's hole, or the end of the log.
    Missing,
    /// A change of a staged transaction that has not committed yet (it is aborted at its
    /// deadline by whoever meets it then).
    Pending,
}

impl DynamoStore {
    pub(crate) async fn read_changes(&self, after: u64, limit: usize) -> Result<Vec<ChangeRecord>, StoreError> {
        let mut found: Vec<Item> = Vec::new();
        let mut next = after.saturating_add(1);
        let mut reserved: Option<u64> = None;
        while found.len() < limit {
            let slots = self.bucket_from(next, limit - found.len()).await?;
            let mut at_hole = slots.is_empty();
            let mut pending = false;
            for (_, slot) in slots {
                match slot {
                    Slot::Change(item) => found.push(item),
                    Slot::Void => {}
                    Slot::Missing => {
                        at_hole = true;
                        break;
                    }
                    Slot::Pending => {
                        pending = true;
                        break;
                    }
                }
                next += 1;
            }
            if pending {
                break;
            }
            if !at_hole {
                // The round ended at its limit or at the end of a bucket: read on from `next`.
                continue;
            }
            // Nothing at `next`: the end of the log, a commit in flight, or a dead writer's hole.
            let last = match reserved {
                Some(last) => last,
                None => *reserved.insert(self.reserved().await?),
            };
            if next > last || !self.hole_expired(next) {
                break;
            }
            if self.void(next).await? {
                tracing::warn!(sequence = next, "voided a change-log hole left by a writer that did not finish");
            }
            // Voided by us or by another reader, or the commit landed after all: read it again.
        }
        self.forget_holes_before(next);
        self.with_versions(found).await
    }

    /// The slots from `from` on within `from`'s bucket, in order, at most `limit` live ones.
    async fn bucket_from(&self, from: u64, limit: usize) -> Result<Vec<(u64, Slot)>, StoreError> {
        let limit = i32::try_from(limit.clamp(1, 1000)).unwrap_or(1000);
        let out = self
            .inner
            .client
            .query()
            .table_name(&self.inner.config.table)
            .key_condition_expression("pk = :pk AND sk >= :from")
            .expression_attribute_values(":pk", s(change_pk(from)))
            .expression_attribute_values(":from", s(change_sk(from)))
            .limit(limit)
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| sdk_error("read the change log", e))?;
        let mut slots = Vec::with_capacity(out.items().len());
        for (expected, item) in (from..).zip(out.items()) {
            let sequence: u64 = get_s(item, "sk")?
                .parse()
                .map_err(|_| crate::items::corrupt("a change item's sort key is not a sequence"))?;
            if sequence != expected {
                slots.push((expected, Slot::Missing));
                break;
            }
            let slot = if item.contains_key("void") {
                Slot::Void
            } else if let Some(txn) = txn_of(item, "txn") {
                match self.settle(txn).await? {
                    TxnState::Committed => Slot::Change(item.clone()),
                    TxnState::Aborted => Slot::Void,
                    TxnState::Pending { .. } => Slot::Pending,
                }
            } else {
                Slot::Change(item.clone())
            };
            let stop = matches!(slot, Slot::Pending);
            slots.push((sequence, slot));
            if stop {
                break;
            }
        }
        Ok(slots)
    }

    /// The last committed change such that every sequence before it is committed or void: what
    /// a reader that saw every acknowledged commit must reflect. Walks forward from where the
    /// last call stopped (one query when nothing new was committed); stops at a hole (a commit in
    /// flight, not acknowledged yet). Voids after the last change are passed but do not count,
    /// so a failed write never leaves searches waiting for a change that will not come.
    pub(crate) async fn latest_committed(&self) -> Result<u64, StoreError> {
        let (mut position, mut latest) = *self.inner.frontier.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        loop {
            let slots = self.bucket_from(position + 1, 1000).await?;
            let mut at_hole = slots.is_empty();
            for (sequence, slot) in slots {
                match slot {
                    Slot::Change(_) => latest = sequence,
                    Slot::Void => {}
                    Slot::Missing | Slot::Pending => {
                        at_hole = true;
                        break;
                    }
                }
                position = sequence;
            }
            if at_hole {
                break;
            }
        }
        let mut frontier = self.inner.frontier.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if position > frontier.0 {
            *frontier = (position, latest);
        }
        Ok(frontier.1)
    }

    /// The sequences of `first..=last` that have a change item (a change or a void).
    pub(crate) async fn sequences_present(&self, first: u64, last: u64) -> Result<HashSet<u64>, StoreError> {
        let mut present = HashSet::new();
        let mut from = first;
        while from <= last {
            let bucket_end = (from / CHANGE_BUCKET + 1) * CHANGE_BUCKET - 1;
            let to = bucket_end.min(last);
            let query = self
                .inner
                .client
                .query()
                .table_name(&self.inner.config.table)
                .key_condition_expression("pk = :pk AND sk BETWEEN :from AND :to")
                .expression_attribute_values(":pk", s(change_pk(from)))
                .expression_attribute_values(":from", s(change_sk(from)))
                .expression_attribute_values(":to", s(change_sk(to)))
                .projection_expression("sk");
            for item in self.query_all(query, "read the change log").await? {
                if let Ok(sequence) = get_s(&item, "sk")?.parse::<u64>() {
                    present.insert(sequence);
                }
            }
            from = to + 1;
        }
        Ok(present)
    }

    /// The last sequence handed out (0 before the first commit).
    pub(crate) async fn reserved(&self) -> Result<u64, StoreError> {
        match self.get("S", "S", "read the sequence counter").await? {
            Some(item) => get_u64(&item, "last"),
            None => Ok(0),
        }
    }

    /// True once a hole has been seen open for longer than `hole_timeout`.
    fn hole_expired(&self, sequence: u64) -> bool {
        let mut holes = self.inner.holes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let first_seen = *holes.entry(sequence).or_insert_with(Instant::now);
        first_seen.elapsed() >= self.inner.config.hole_timeout
    }

    fn forget_holes_before(&self, sequence: u64) {
        let mut holes = self.inner.holes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        holes.retain(|&hole, _| hole >= sequence);
    }

    /// The change records of `changes` (change items, in order), with their versions.
    async fn with_versions(&self, changes: Vec<Item>) -> Result<Vec<ChangeRecord>, StoreError> {
        let keys: Vec<(String, String)> = changes
            .iter()
            .map(|change| {
                let (tenant, type_name, id) = (get_s(change, "tenant")?, get_s(change, "type")?, get_s(change, "id")?);
                Ok((format!("R#{tenant}#{type_name}#{id}"), version_sk(get_u64(change, "ver")?)))
            })
            .collect::<Result<_, StoreError>>()?;
        let mut versions = self.batch_get(&keys).await?;
        let mut records = Vec::with_capacity(keys.len());
        for k in &keys {
            let item = versions.remove(k).ok_or_else(|| {
                StoreError::Internal(format!("the change log names {}/{} which is not stored", k.0, k.1))
            })?;
            debug_assert!(k.1.starts_with(VERSION_PREFIX));
            records.push(ChangeRecord {
                tenant: tenant_of(&item)?,
                version: self.decode(&item).await?,
                commit_end: get_u64(&item, "cend")?,
                traceparent: crate::items::traceparent_of(&item),
            });
        }
        Ok(records)
    }

    pub(crate) async fn read_checkpoint(&self, consumer: &str) -> Result<u64, StoreError> {
        match self.get(&crate::items::checkpoint_pk(consumer), "K", "read a checkpoint").await? {
            Some(item) => get_u64(&item, "seq"),
            None => Ok(0),
        }
    }

    pub(crate) async fn write_checkpoint(&self, consumer: &str, sequence: u64) -> Result<(), StoreError> {
        let mut item = key(crate::items::checkpoint_pk(consumer), "K".into());
        item.insert("seq".into(), n(sequence));
        self.inner
            .client
            .put_item()
            .table_name(&self.inner.config.table)
            .set_item(Some(item))
            .send()
            .await
            .map_err(|e| sdk_error("save a checkpoint", e))?;
        Ok(())
    }
}
