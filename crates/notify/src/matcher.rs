//! Which subscriptions a change notifies: the deliverable subscriptions of the change's tenant
//! and resource type whose criteria the changed resource matches.
//!
//! Matching has the SAME semantics as search because it is search: the resource's values are
//! extracted by the indexer's extractor ([`fhirmesh_fhir::search::extract::extract`]) and each
//! criterion is evaluated by the reference evaluator the search backends are tested against
//! ([`fhirmesh_fhir::search::evaluate::matches`]), over a corpus of that one resource. Chains and
//! `_has` were refused at validation, so the one-resource corpus loses nothing.
//!
//! Tenant isolation is structural: subscriptions are indexed by tenant, then by criteria
//! resource type, and a change only ever looks at its own tenant's bucket for its type.
//!
//! Creates and updates match on the new version: a version that no longer matches notifies no
//! one (R4 notifies when a resource matching the criteria is created or updated). Deletes carry
//! no body; R4 defines no delete notification, so:
//! - with the deleted resource's last live version (the caller reads it from the store), a
//!   delete notifies the subscriptions that version matches — "this resource you were told
//!   about is gone";
//! - without it, only subscriptions whose criteria need no body (none, or `_id` only) match.
//!
//! Date criteria (`ap`, relative comparisons) are evaluated at the `now` the caller passes.
//! Versions: an upsert older than the version already seen (live or removed) is ignored, so a
//! redelivered or reordered Subscription event never resurrects or rolls back a subscription.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use fhirmesh_core::ResourceChanged;
use fhirmesh_core::model::{Operation, TenantId};
use fhirmesh_fhir::ResourceType;
use fhirmesh_fhir::search::IndexEntry;
use fhirmesh_fhir::search::evaluate::{Doc, matches};
use fhirmesh_fhir::search::extract::extract;
use serde_json::Value;
use time::OffsetDateTime;

use crate::subscription::{ActiveSubscription, SubscriptionId, SubscriptionStatus};

/// The subscriptions the notifier holds, indexed for matching.
#[derive(Debug, Default)]
pub struct Matcher {
    tenants: HashMap<TenantId, TenantSubscriptions>,
}

#[derive(Debug, Default)]
struct TenantSubscriptions {
    /// Held subscriptions by criteria resource type, in id order.
    by_type: HashMap<ResourceType, BTreeMap<SubscriptionId, Arc<ActiveSubscription>>>,
    /// The criteria type of each held subscription (to move it when its criteria change).
    types: HashMap<SubscriptionId, ResourceType>,
    /// The newest version seen of every subscription, held or removed.
    versions: HashMap<SubscriptionId, u64>,
}

/// What [`Matcher::upsert`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upserted {
    /// Now held, new.
    Added,
    /// Now held, replacing a held version.
    Replaced,
    /// Not held: its status is `off` (a held older version was dropped).
    Removed,
    /// Ignored: a newer version was already seen.
    Stale,
}

/// Why a change cannot be matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MatchError {
    /// A create or update without its resource (the event's body was omitted: read the version
    /// from the store).
    BodyRequired,
    /// The resource passed is not the changed one.
    WrongResource { expected: String, found: String },
}

impl fmt::Display for MatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MatchError::BodyRequired => f.write_str("a create or update is matched on its resource, which is missing"),
            MatchError::WrongResource { expected, found } => {
                write!(f, "the resource passed is {found}, not the changed {expected}")
            }
        }
    }
}

impl std::error::Error for MatchError {}

impl Matcher {
    pub fn new() -> Matcher {
        Matcher::default()
    }

    /// Adds or replaces a subscription (by tenant and id), unless a newer version was seen. A
    /// subscription whose status is `off` is not held. One whose `end` has passed is held until
    /// [`Matcher::expired`] reports it, but matches nothing.
    pub fn upsert(&mut self, subscription: ActiveSubscription) -> Upserted {
        let tenant = self.tenants.entry(subscription.tenant().clone()).or_default();
        let id = subscription.id().clone();
        let version = subscription.version_id();
        if tenant.versions.get(&id).is_some_and(|seen| *seen > version) {
            return Upserted::Stale;
        }
        tenant.versions.insert(id.clone(), version);
        let held = tenant.take(&id).is_some();
        if subscription.status() == SubscriptionStatus::Off {
            return Upserted::Removed;
        }
        let resource_type = subscription.criteria().resource_type();
        tenant.types.insert(id.clone(), resource_type);
        tenant.by_type.entry(resource_type).or_default().insert(id, Arc::new(subscription));
        if held { Upserted::Replaced } else { Upserted::Added }
    }

    /// Removes a subscription (its resource was deleted at `version_id`): later upserts of older
    /// versions are ignored. Returns what was held.
    pub fn remove(
        &mut self,
        tenant: &TenantId,
        id: &SubscriptionId,
        version_id: u64,
    ) -> Option<Arc<ActiveSubscription>> {
        let subscriptions = self.tenants.entry(tenant.clone()).or_default();
        let seen = subscriptions.versions.entry(id.clone()).or_insert(version_id);
        if *seen > version_id {
            return None;
        }
        *seen = version_id;
        subscriptions.take(id)
    }

    /// Drops `tenant`'s held subscriptions not in `keep` (no longer found by a reload: deleted or
    /// `off`); returns their ids. Their versions stay seen, so an older event cannot bring one back.
    pub fn retain(
        &mut self,
        tenant: &TenantId,
        keep: &std::collections::HashSet<SubscriptionId>,
    ) -> Vec<SubscriptionId> {
        let Some(subscriptions) = self.tenants.get_mut(tenant) else { return Vec::new() };
        let mut dropped: Vec<SubscriptionId> =
            subscriptions.types.keys().filter(|id| !keep.contains(*id)).cloned().collect();
        dropped.sort();
        for id in &dropped {
            subscriptions.take(id);
        }
        dropped
    }

    /// Whether `tenant` holds any subscription on `resource_type` (a change of another type needs
    /// no body read and no matching).
    pub fn has_subscriptions_for(&self, tenant: &TenantId, resource_type: ResourceType) -> bool {
        self.tenants.get(tenant).is_some_and(|t| t.by_type.get(&resource_type).is_some_and(|b| !b.is_empty()))
    }

    /// The held subscription `id` of `tenant`.
    pub fn get(&self, tenant: &TenantId, id: &SubscriptionId) -> Option<Arc<ActiveSubscription>> {
        let subscriptions = self.tenants.get(tenant)?;
        let resource_type = subscriptions.types.get(id)?;
        subscriptions.by_type.get(resource_type)?.get(id).cloned()
    }

    /// How many subscriptions are held, all tenants together.
    pub fn len(&self) -> usize {
        self.tenants.values().map(|t| t.types.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many of `tenant`'s held subscriptions are deliverable at `now` (for the tenant limit).
    pub fn deliverable_count(&self, tenant: &TenantId, now: OffsetDateTime) -> usize {
        self.tenants.get(tenant).map_or(0, |t| t.all().filter(|s| s.is_deliverable(now)).count())
    }

    /// Held subscriptions whose `end` has passed at `now`, as (tenant, id): the notifier writes
    /// them `off` ([`ActiveSubscription::activation`]) and the write's event removes them.
    pub fn expired(&self, now: OffsetDateTime) -> Vec<(TenantId, SubscriptionId)> {
        let mut expired: Vec<(TenantId, SubscriptionId)> = self
            .tenants
            .iter()
            .flat_map(|(tenant, subscriptions)| {
                subscriptions.all().filter(|s| !s.is_deliverable(now)).map(move |s| (tenant.clone(), s.id().clone()))
            })
            .collect();
        expired.sort();
        expired
    }

    /// The ids of the subscriptions `change` notifies, in id order (see [`Matcher::matching`]).
    pub fn matches(
        &self,
        change: &ResourceChanged,
        resource: Option<&Value>,
        now: OffsetDateTime,
    ) -> Result<Vec<SubscriptionId>, MatchError> {
        Ok(self.matching(change, resource, now)?.into_iter().map(|s| s.id().clone()).collect())
    }

    /// The subscriptions `change` notifies, in id order. `resource` is the changed version's JSON
    /// for a create or update (required), and for a delete the last live version's JSON when the
    /// caller has it (module documentation).
    pub fn matching(
        &self,
        change: &ResourceChanged,
        resource: Option<&Value>,
        now: OffsetDateTime,
    ) -> Result<Vec<Arc<ActiveSubscription>>, MatchError> {
        if let Some(resource) = resource {
            check_identity(change, resource)?;
        } else if change.operation != Operation::Delete {
            return Err(MatchError::BodyRequired);
        }
        let entries = resource.map(extract);
        Ok(self.matching_extracted(change, entries, now))
    }

    /// As [`Matcher::matching`], with the resource's values already extracted (by
    /// [`fhirmesh_fhir::search::extract::extract`]); `None` when there is no body (a delete whose
    /// last version is unknown, or a live version — which then matches nothing).
    pub fn matching_extracted(
        &self,
        change: &ResourceChanged,
        entries: Option<Vec<IndexEntry>>,
        now: OffsetDateTime,
    ) -> Vec<Arc<ActiveSubscription>> {
        let Some(candidates) = self.tenants.get(&change.tenant).and_then(|t| t.by_type.get(&change.resource_type))
        else {
            return Vec::new();
        };
        let identity_only = entries.is_none();
        if identity_only && change.operation != Operation::Delete {
            return Vec::new();
        }
        let doc = Doc {
            resource_type: change.resource_type,
            id: change.id.as_str().to_owned(),
            entries: entries.unwrap_or_default(),
        };
        let corpus = std::slice::from_ref(&doc);
        candidates
            .values()
            .filter(|s| s.is_deliverable(now))
            .filter(|s| !identity_only || s.criteria().decidable_without_body())
            .filter(|s| s.criteria().query().criteria.iter().all(|c| matches(c, &doc, corpus, now)))
            .cloned()
            .collect()
    }
}

impl TenantSubscriptions {
    fn take(&mut self, id: &SubscriptionId) -> Option<Arc<ActiveSubscription>> {
        let resource_type = self.types.remove(id)?;
        let bucket = self.by_type.get_mut(&resource_type)?;
        let taken = bucket.remove(id);
        if bucket.is_empty() {
            self.by_type.remove(&resource_type);
        }
        taken
    }

    fn all(&self) -> impl Iterator<Item = &Arc<ActiveSubscription>> {
        self.by_type.values().flat_map(BTreeMap::values)
    }
}

/// The resource passed must be the changed one (type and id).
fn check_identity(change: &ResourceChanged, resource: &Value) -> Result<(), MatchError> {
    let found_type = resource.get("resourceType").and_then(Value::as_str).unwrap_or_default();
    let found_id = resource.get("id").and_then(Value::as_str).unwrap_or_default();
    if found_type != change.resource_type.as_str() || found_id != change.id.as_str() {
        return Err(MatchError::WrongResource {
            expected: format!("{}/{}", change.resource_type, change.id),
            found: format!("{found_type}/{found_id}"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
