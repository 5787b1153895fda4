//! The `ResourceChanged` event: one envelope for every change, whatever bus carries it.

use bytes::Bytes;
use fhirmesh_fhir::{LogicalId, ResourceType};
use time::OffsetDateTime;

use crate::model::{Operation, TenantId};
use crate::ports::ChangeRecord;

/// A committed change, as published on the event bus. Consumers are idempotent on
/// (tenant, resource_type, id, version_id) and must never let an older version overwrite a newer one.
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceChanged {
    pub tenant: TenantId,
    pub resource_type: ResourceType,
    pub id: LogicalId,
    pub version_id: u64,
    pub operation: Operation,
    pub last_updated: OffsetDateTime,
    /// Change-log sequence (monotonic per store partition).
    pub sequence: u64,
    /// The last sequence of the commit (transaction) this change belongs to; `sequence` itself for
    /// a single write. The changes `sequence..=commit_end` become visible together or not at all.
    pub commit_end: u64,
    /// The resource JSON: `None` for deletes — and for a live version whose body was too large
    /// for the bus that carried it ([`ResourceChanged::body_omitted`]): consumers read that one
    /// from the store.
    pub resource: Option<Bytes>,
    /// W3C trace context of the write, when known.
    pub traceparent: Option<String>,
    /// Stable id for de-duplication: `{tenant}/{type}/{id}/_history/{version}`.
    pub idempotency_key: String,
}

impl ResourceChanged {
    /// True when this is a live version whose body was left out (too large for the bus): the
    /// consumer must read the version from the store (the indexer: from the change log).
    pub fn body_omitted(&self) -> bool {
        self.resource.is_none() && self.operation != crate::model::Operation::Delete
    }

    /// This event without its body, for a bus that cannot carry it (see [`Self::body_omitted`]).
    pub fn without_body(&self) -> ResourceChanged {
        ResourceChanged { resource: None, ..self.clone() }
    }

    pub fn idempotency_key_for(
        tenant: &TenantId,
        resource_type: ResourceType,
        id: &LogicalId,
        version_id: u64,
    ) -> String {
        format!("{tenant}/{resource_type}/{id}/_history/{version_id}")
    }
}

impl From<ChangeRecord> for ResourceChanged {
    fn from(change: ChangeRecord) -> Self {
        let v = change.version;
        ResourceChanged {
            idempotency_key: ResourceChanged::idempotency_key_for(&change.tenant, v.resource_type, &v.id, v.version_id),
            tenant: change.tenant,
            resource_type: v.resource_type,
            id: v.id,
            version_id: v.version_id,
            operation: v.operation,
            last_updated: v.last_updated,
            sequence: v.sequence,
            commit_end: change.commit_end.max(v.sequence),
            resource: v.body,
            traceparent: change.traceparent,
        }
    }
}
