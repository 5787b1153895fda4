//! The resource service's [`WriteRules`] for Subscriptions: every Subscription written through
//! the API (create, update, patch, Bundle entries) is validated by [`SubscriptionSpec::parse`]
//! with the server's [`EndpointPolicy`], and counts against the per-tenant limit on active
//! subscriptions while it is deliverable (status not `off`, `end` not passed). Other types pass.
//!
//! The resource service counts the tenant's other active subscriptions with the search
//! `Subscription?status=requested,active,error` (R4 has no `end` search parameter: a subscription
//! past its `end` counts until the notifier has written it `off`) and asks
//! [`check_tenant_limit`] for the verdict.

use fhirmesh_core::FhirError;
use fhirmesh_core::ports::{TenantLimit, WriteRules};
use fhirmesh_fhir::ResourceType;
use fhirmesh_fhir::datetime::parse_fhir_datetime;
use serde_json::Value;
use time::OffsetDateTime;

use crate::endpoint::EndpointPolicy;
use crate::subscription::{SubscriptionSpec, SubscriptionStatus, check_tenant_limit};

/// Validates Subscriptions on write and limits the active ones per tenant.
#[derive(Debug, Clone)]
pub struct SubscriptionWriteRules {
    policy: EndpointPolicy,
    max_active_per_tenant: usize,
}

impl SubscriptionWriteRules {
    /// Endpoints must pass `policy`; a tenant may have at most `max_active_per_tenant`
    /// subscriptions that are not `off`.
    pub fn new(policy: EndpointPolicy, max_active_per_tenant: usize) -> SubscriptionWriteRules {
        SubscriptionWriteRules { policy, max_active_per_tenant }
    }
}

fn is_subscription(resource_type: ResourceType) -> bool {
    resource_type.as_str() == "Subscription"
}

impl WriteRules for SubscriptionWriteRules {
    fn check(&self, resource_type: ResourceType, resource: &Value) -> Result<(), FhirError> {
        if !is_subscription(resource_type) {
            return Ok(());
        }
        SubscriptionSpec::parse(resource, &self.policy).map(drop)
    }

    /// Deliverable at `now`: a status other than `off` and no `end` at or before `now`. Read from
    /// the two elements alone, so a stored version the current policy would refuse (the allow-list
    /// changed since) still counts as what it is.
    fn tenant_limit(&self, resource_type: ResourceType, resource: &Value, now: OffsetDateTime) -> Option<TenantLimit> {
        if !is_subscription(resource_type) {
            return None;
        }
        let delivers = resource
            .get("status")
            .and_then(Value::as_str)
            .and_then(SubscriptionStatus::parse)
            .is_some_and(SubscriptionStatus::delivers);
        let ended = resource
            .get("end")
            .and_then(Value::as_str)
            .and_then(|end| parse_fhir_datetime(end).ok())
            .is_some_and(|end| end.start <= now);
        (delivers && !ended).then(|| TenantLimit {
            counted: vec![("status".to_owned(), "requested,active,error".to_owned())],
            max: self.max_active_per_tenant,
        })
    }

    fn check_limit(&self, _resource_type: ResourceType, others: usize, limit: &TenantLimit) -> Result<(), FhirError> {
        check_tenant_limit(others, limit.max)
    }
}

#[cfg(test)]
mod tests;
