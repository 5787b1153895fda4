//! Reads: current version, several at once, one version, history pages, batched item fetches.

use std::collections::HashMap;

use aws_sdk_dynamodb::operation::query::builders::QueryFluentBuilder;
use aws_sdk_dynamodb::types::KeysAndAttributes;
use fhirmesh_core::model::{ResourceVersion, TenantId};
use fhirmesh_core::ports::{HistoryQuery, HistoryScope, StoreError};
use fhirmesh_fhir::{LogicalId, ResourceType};

use crate::DynamoStore;
use crate::error::sdk_error;
use crate::items::{
    BY_TENANT, BY_TYPE, CURRENT_SK, Item, PK, SK, VERSION_PREFIX, get_s, get_u64, key, micros, n, resource_pk, s,
    type_pk, version_sk,
};
use crate::txn::txn_of;

/// `BatchGetItem` takes 100 keys per call.
const BATCH_GET_MAX: usize = 100;
/// Versions read per query round while walking history.
const HISTORY_ROUND: i32 = 100;

impl DynamoStore {
    pub(crate) async fn read_current(
        &self,
        tenant: &TenantId,
        resource_type: ResourceType,
        id: &LogicalId,
    ) -> Result<Option<ResourceVersion>, StoreError> {
        // The newest committed version item IS the current version. Newer ones of a staged
        // transaction still pending (or aborted, not cleaned up yet) are passed over.
        let mut start: Option<Item> = None;
        let mut limit = 1;
        loop {
            let out = self
                .inner
                .client
                .query()
                .table_name(&self.inner.config.table)
                .key_condition_expression("pk = :pk AND begins_with(sk, :v)")
                .expression_attribute_values(":pk", s(resource_pk(tenant, resource_type, id)))
                .expression_attribute_values(":v", s(VERSION_PREFIX))
                .scan_index_forward(false)
                .limit(limit)
                .consistent_read(true)
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| sdk_error("read", e))?;
            for item in out.items() {
                if self.visible(item).await? {
                    return self.decode(item).await.map(Some);
                }
            }
            match out.last_evaluated_key() {
                Some(next) => start = Some(next.clone()),
                None => return Ok(None),
            }
            limit = 10;
        }
    }

    pub(crate) async fn read_version(
        &self,
        tenant: &TenantId,
        resource_type: ResourceType,
        id: &LogicalId,
        version_id: u64,
    ) -> Result<Option<ResourceVersion>, StoreError> {
        let pk = resource_pk(tenant, resource_type, id);
        match self.get(&pk, &version_sk(version_id), "vread").await? {
            Some(item) if self.visible(&item).await? => self.decode(&item).await.map(Some),
            _ => Ok(None),
        }
    }

    /// One item by key, strongly consistent (`what` names the read in errors).
    pub(crate) async fn get(&self, pk: &str, sk: &str, what: &str) -> Result<Option<Item>, StoreError> {
        let out = self
            .inner
            .client
            .get_item()
            .table_name(&self.inner.config.table)
            .set_key(Some(key(pk.to_owned(), sk.to_owned())))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| sdk_error(what, e))?;
        Ok(out.item().cloned())
    }

    pub(crate) async fn read_current_many(
        &self,
        tenant: &TenantId,
        keys: &[(ResourceType, LogicalId)],
    ) -> Result<Vec<Option<ResourceVersion>>, StoreError> {
        let pointer_keys: Vec<(String, String)> =
            keys.iter().map(|(t, id)| (resource_pk(tenant, *t, id), CURRENT_SK.to_owned())).collect();
        let pointers = self.batch_get(&pointer_keys).await?;
        let mut version_keys = Vec::new();
        for (pk, sk) in &pointer_keys {
            if let Some(pointer) = pointers.get(&(pk.clone(), sk.clone()))
                && txn_of(pointer, "lk").is_none()
            {
                version_keys.push((pk.clone(), version_sk(get_u64(pointer, "ver")?)));
            }
        }
        let versions = self.batch_get(&version_keys).await?;
        let mut out = Vec::with_capacity(keys.len());
        for ((pk, sk), (resource_type, id)) in pointer_keys.iter().zip(keys) {
            let version = match pointers.get(&(pk.clone(), sk.clone())) {
                None => None,
                // Locked by a staged transaction: its pointer may be behind; the version items
                // tell.
                Some(pointer) if txn_of(pointer, "lk").is_some() => {
                    self.read_current(tenant, *resource_type, id).await?
                }
                Some(pointer) => {
                    let version_key = (pk.clone(), version_sk(get_u64(pointer, "ver")?));
                    let item = versions.get(&version_key).ok_or_else(|| {
                        StoreError::Internal(format!("{pk}: the pointer names a version that is not stored"))
                    })?;
                    Some(self.decode(item).await?)
                }
            };
            out.push(version);
        }
        Ok(out)
    }

    /// Every item `query` finds, following its pages (strongly consistent).
    pub(crate) async fn query_all(&self, query: QueryFluentBuilder, what: &str) -> Result<Vec<Item>, StoreError> {
        let mut found = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let out = query
                .clone()
                .consistent_read(true)
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| sdk_error(what, e))?;
            found.extend(out.items().iter().cloned());
            match out.last_evaluated_key() {
                Some(next) => start = Some(next.clone()),
                None => return Ok(found),
            }
        }
    }

    /// Items by `(pk, sk)`, strongly consistent, in as few `BatchGetItem` calls as possible;
    /// missing items are absent from the map.
    pub(crate) async fn batch_get(
        &self,
        keys: &[(String, String)],
    ) -> Result<HashMap<(String, String), Item>, StoreError> {
        let mut found = HashMap::with_capacity(keys.len());
        for chunk in keys.chunks(BATCH_GET_MAX) {
            // BatchGetItem refuses duplicate keys.
            let unique: std::collections::HashSet<&(String, String)> = chunk.iter().collect();
            let mut pending: Vec<Item> = unique.into_iter().map(|(pk, sk)| key(pk.clone(), sk.clone())).collect();
            let mut round = 0u32;
            while !pending.is_empty() {
                let request = KeysAndAttributes::builder()
                    .set_keys(Some(std::mem::take(&mut pending)))
                    .consistent_read(true)
                    .build()
                    .map_err(|e| StoreError::Internal(format!("cannot build a batch get: {e}")))?;
                let out = self
                    .inner
                    .client
                    .batch_get_item()
                    .request_items(&self.inner.config.table, request)
                    .send()
                    .await
                    .map_err(|e| sdk_error("batch read", e))?;
                for item in out.responses().and_then(|r| r.get(&self.inner.config.table)).into_iter().flatten() {
                    found.insert((get_s(item, PK)?.to_owned(), get_s(item, SK)?.to_owned()), item.clone());
                }
                if let Some(unprocessed) = out.unprocessed_keys().and_then(|u| u.get(&self.inner.config.table)) {
                    pending = unprocessed.keys().to_vec();
                    if !pending.is_empty() {
                        round += 1;
                        if round > 8 {
                            return Err(StoreError::Unavailable(
                                "DynamoDB kept keys of a batch read unprocessed".into(),
                            ));
                        }
                        crate::commit::backoff(round).await;
                    }
                }
            }
        }
        Ok(found)
    }

    pub(crate) async fn read_history(
        &self,
        tenant: &TenantId,
        query: HistoryQuery,
    ) -> Result<Vec<ResourceVersion>, StoreError> {
        if query.limit == 0 {
            return Ok(Vec::new());
        }
        let mut page = Vec::new();
        let mut start_key: Option<Item> = None;
        loop {
            let (candidates, next) = self.history_round(tenant, &query.scope, query.before_sequence, start_key).await?;
            for version in candidates {
                if self.history_matches(tenant, &query, &version).await? {
                    page.push(version);
                    if page.len() == query.limit {
                        return Ok(page);
                    }
                }
            }
            match next {
                Some(key) => start_key = Some(key),
                None => return Ok(page),
            }
        }
    }

    /// One round of candidates, newest first, and where the next round starts.
    async fn history_round(
        &self,
        tenant: &TenantId,
        scope: &HistoryScope,
        before: Option<u64>,
        start_key: Option<Item>,
    ) -> Result<(Vec<ResourceVersion>, Option<Item>), StoreError> {
        let client = &self.inner.client;
        let query = client
            .query()
            .table_name(&self.inner.config.table)
            .scan_index_forward(false)
            .limit(HISTORY_ROUND)
            .set_exclusive_start_key(start_key);
        let (index_pk, partition) = match scope {
            HistoryScope::Instance(resource_type, id) => {
                let out = query
                    .key_condition_expression("pk = :pk AND begins_with(sk, :v)")
                    .expression_attribute_values(":pk", s(resource_pk(tenant, *resource_type, id)))
                    .expression_attribute_values(":v", s(VERSION_PREFIX))
                    .consistent_read(true)
                    .send()
                    .await
                    .map_err(|e| sdk_error("instance history", e))?;
                let mut versions = Vec::new();
                for item in out.items() {
                    if !self.visible(item).await? {
                        continue;
                    }
                    let version = self.decode(item).await?;
                    if before.is_none_or(|b| version.sequence < b) {
                        versions.push(version);
                    }
                }
                return Ok((versions, out.last_evaluated_key().cloned()));
            }
            HistoryScope::Type(resource_type) => (BY_TYPE, ("tpk", type_pk(tenant, *resource_type))),
            HistoryScope::System => (BY_TENANT, ("spk", tenant.as_str().to_owned())),
        };
        let condition = if before.is_some() {
            format!("{} = :p AND seq < :before", partition.0)
        } else {
            format!("{} = :p", partition.0)
        };
        let mut query = query
            .index_name(index_pk)
            .key_condition_expression(condition)
            .expression_attribute_values(":p", s(partition.1));
        if let Some(before) = before {
            query = query.expression_attribute_values(":before", n(before));
        }
        let out = query.send().await.map_err(|e| sdk_error("history", e))?;
        let keys: Vec<(String, String)> = out
            .items()
            .iter()
            .map(|item| Ok((get_s(item, PK)?.to_owned(), get_s(item, SK)?.to_owned())))
            .collect::<Result<_, StoreError>>()?;
        let mut items = self.batch_get(&keys).await?;
        let mut versions = Vec::with_capacity(keys.len());
        for k in &keys {
            // A key the index has but the table not: a staged version of an aborted transaction,
            // deleted since.
            if let Some(item) = items.remove(k)
                && self.visible(&item).await?
            {
                versions.push(self.decode(&item).await?);
            }
        }
        Ok((versions, out.last_evaluated_key().cloned()))
    }

    async fn history_matches(
        &self,
        tenant: &TenantId,
        query: &HistoryQuery,
        version: &ResourceVersion,
    ) -> Result<bool, StoreError> {
        if let Some(since) = query.since
            && micros(version.last_updated) < micros(since)
        {
            return Ok(false);
        }
        if let Some((start, end)) = query.at {
            // Current at some point in [start, end): began before `end`, and its successor (if
            // any) began after `start`.
            if micros(version.last_updated) >= micros(end) {
                return Ok(false);
            }
            let successor =
                self.read_version(tenant, version.resource_type, &version.id, version.version_id + 1).await?;
            if successor.is_some_and(|next| micros(next.last_updated) <= micros(start)) {
                return Ok(false);
            }
        }
        Ok(true)
    }
}
