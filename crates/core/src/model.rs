//! Domain values shared by the service trait, the ports and the adapters.

use std::fmt;

use bytes::Bytes;
use fhirmesh_fhir::{LogicalId, ResourceType};
use time::OffsetDateTime;

/// The tenant every key is scoped by. Single-tenant deployments use [`TenantId::default_tenant`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(String);

impl TenantId {
    pub const DEFAULT: &'static str = "default";

    /// `[A-Za-z0-9_-]{1,64}`: safe inside store keys, index names, bus subjects and blob prefixes.
    pub fn parse(value: &str) -> Option<TenantId> {
        let ok = !value.is_empty()
            && value.len() <= 64
            && value.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        ok.then(|| TenantId(value.to_owned()))
    }

    pub fn default_tenant() -> TenantId {
        TenantId(Self::DEFAULT.to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for TenantId {
    fn default() -> Self {
        TenantId::default_tenant()
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a version did to its resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    Create,
    Update,
    Delete,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Create => "create",
            Operation::Update => "update",
            Operation::Delete => "delete",
        }
    }

    pub fn parse(value: &str) -> Option<Operation> {
        match value {
            "create" => Some(Operation::Create),
            "update" => Some(Operation::Update),
            "delete" => Some(Operation::Delete),
            _ => None,
        }
    }

    /// The `Bundle.entry.request.method` of a history entry.
    pub fn http_method(self) -> &'static str {
        match self {
            Operation::Create => "POST",
            Operation::Update => "PUT",
            Operation::Delete => "DELETE",
        }
    }
}

/// One stored version of a resource: a live body or a delete tombstone.
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceVersion {
    pub resource_type: ResourceType,
    pub id: LogicalId,
    /// 1-based, increasing by one per write of this resource.
    pub version_id: u64,
    pub last_updated: OffsetDateTime,
    pub operation: Operation,
    /// The resource JSON with `meta.versionId` and `meta.lastUpdated` stamped; `None` for a delete.
    pub body: Option<Bytes>,
    /// Position of this version in the store's change log (the consistency token).
    pub sequence: u64,
}

impl ResourceVersion {
    pub fn is_deleted(&self) -> bool {
        self.operation == Operation::Delete
    }

    /// The weak ETag value `W/"n"`.
    pub fn etag(&self) -> String {
        format!("W/\"{}\"", self.version_id)
    }
}
