//! The `ResourceChanged` event ⇄ its protobuf envelope, for buses that carry bytes (NATS, SQS).

use bytes::{Buf, Bytes};
use fhirmesh_core::ResourceChanged;
use prost::Message;

use crate::convert::{
    WireError, id_from_wire, operation_from_wire, operation_to_wire, resource_type_from_wire, tenant_from_wire,
    timestamp_from_wire, timestamp_to_wire,
};
use crate::pb;

impl From<ResourceChanged> for pb::ResourceChanged {
    fn from(event: ResourceChanged) -> Self {
        pb::ResourceChanged {
            tenant: event.tenant.as_str().to_owned(),
            resource_type: event.resource_type.as_str().to_owned(),
            id: event.id.into_string(),
            version_id: event.version_id,
            operation: operation_to_wire(event.operation).into(),
            last_updated: Some(timestamp_to_wire(event.last_updated)),
            sequence: event.sequence,
            resource: event.resource,
            traceparent: event.traceparent,
            idempotency_key: event.idempotency_key,
            commit_end: event.commit_end,
        }
    }
}

impl From<&ResourceChanged> for pb::ResourceChanged {
    fn from(event: &ResourceChanged) -> Self {
        event.clone().into()
    }
}

impl TryFrom<pb::ResourceChanged> for ResourceChanged {
    type Error = WireError;

    /// Validates every field; an empty idempotency key is derived from the others.
    fn try_from(event: pb::ResourceChanged) -> Result<Self, WireError> {
        let tenant = tenant_from_wire(&event.tenant)?;
        let resource_type = resource_type_from_wire(&event.resource_type)?;
        let id = id_from_wire(&event.id)?;
        let idempotency_key = if event.idempotency_key.is_empty() {
            ResourceChanged::idempotency_key_for(&tenant, resource_type, &id, event.version_id)
        } else {
            event.idempotency_key
        };
        Ok(ResourceChanged {
            tenant,
            resource_type,
            id,
            version_id: event.version_id,
            operation: operation_from_wire(event.operation)?,
            last_updated: timestamp_from_wire(event.last_updated, "last_updated")?,
            sequence: event.sequence,
            commit_end: event.commit_end.max(event.sequence),
            resource: event.resource,
            traceparent: event.traceparent,
            idempotency_key,
        })
    }
}

/// The protobuf encoding of `event`, as published on a bus.
pub fn encode_resource_changed(event: &ResourceChanged) -> Bytes {
    pb::ResourceChanged::from(event).encode_to_vec().into()
}

/// Decodes and validates an event published with [`encode_resource_changed`]. Pass a [`Bytes`] to
/// share the resource body with the buffer instead of copying it.
pub fn decode_resource_changed(buf: impl Buf) -> Result<ResourceChanged, WireError> {
    pb::ResourceChanged::decode(buf)?.try_into()
}
