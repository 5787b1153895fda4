//! Item keys and attribute encoding (the table layout is in `design.md`).

use std::collections::HashMap;

use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::AttributeValue;
use bytes::Bytes;
use fhirmesh_core::model::{Operation, ResourceVersion, TenantId};
use fhirmesh_core::ports::{ChangeRecord, StoreError};
use fhirmesh_fhir::{LogicalId, ResourceType};
use time::OffsetDateTime;

pub(crate) type Item = HashMap<String, AttributeValue>;

pub(crate) const PK: &str = "pk";
pub(crate) const SK: &str = "sk";
/// Sort key of a resource's current-version pointer.
pub(crate) const CURRENT_SK: &str = "C";
/// Sort-key prefix of version items.
pub(crate) const VERSION_PREFIX: &str = "V#";
/// Change items per partition (bucket) of the change log.
pub(crate) const CHANGE_BUCKET: u64 = 4096;
pub(crate) const BY_TYPE: &str = "by_type";
pub(crate) const BY_TENANT: &str = "by_tenant";

pub(crate) fn resource_pk(tenant: &TenantId, resource_type: ResourceType, id: &LogicalId) -> String {
    format!("R#{tenant}#{resource_type}#{id}")
}

pub(crate) fn version_sk(version: u64) -> String {
    format!("{VERSION_PREFIX}{version:020}")
}

pub(crate) fn change_pk(sequence: u64) -> String {
    format!("L#{}", sequence / CHANGE_BUCKET)
}

pub(crate) fn change_sk(sequence: u64) -> String {
    format!("{sequence:020}")
}

pub(crate) fn type_pk(tenant: &TenantId, resource_type: ResourceType) -> String {
    format!("{tenant}#{resource_type}")
}

pub(crate) fn checkpoint_pk(consumer: &str) -> String {
    format!("K#{consumer}")
}

pub(crate) fn s(value: impl Into<String>) -> AttributeValue {
    AttributeValue::S(value.into())
}

pub(crate) fn n(value: impl ToString) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

pub(crate) fn key(pk: String, sk: String) -> Item {
    HashMap::from([(PK.to_owned(), s(pk)), (SK.to_owned(), s(sk))])
}

pub(crate) fn micros(at: OffsetDateTime) -> i64 {
    i64::try_from(at.unix_timestamp_nanos().div_euclid(1000)).unwrap_or(i64::MAX)
}

fn from_micros(micros: i64) -> Result<OffsetDateTime, StoreError> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1000)
        .map_err(|e| corrupt(format!("timestamp {micros} out of range: {e}")))
}

pub(crate) fn corrupt(detail: impl std::fmt::Display) -> StoreError {
    StoreError::Internal(format!("unexpected item in the DynamoDB table: {detail}"))
}

/// What a version item holds, as written by a commit.
pub(crate) struct VersionItem<'a> {
    pub tenant: &'a TenantId,
    pub resource_type: ResourceType,
    pub id: &'a LogicalId,
    pub version_id: u64,
    pub sequence: u64,
    pub commit_end: u64,
    pub last_updated: OffsetDateTime,
    pub operation: Operation,
    pub body: Option<&'a Bytes>,
    /// Where the body lives when it is too large for the item (then it is not in the item).
    pub blob: Option<&'a str>,
    /// The W3C trace context of the write, for the change's consumers.
    pub traceparent: Option<&'a str>,
}

impl VersionItem<'_> {
    pub(crate) fn to_item(&self) -> Item {
        let mut item = key(resource_pk(self.tenant, self.resource_type, self.id), version_sk(self.version_id));
        item.insert("tenant".into(), s(self.tenant.as_str()));
        item.insert("type".into(), s(self.resource_type.as_str()));
        item.insert("id".into(), s(self.id.as_str()));
        item.insert("ver".into(), n(self.version_id));
        item.insert("seq".into(), n(self.sequence));
        item.insert("cend".into(), n(self.commit_end));
        item.insert("lu".into(), n(micros(self.last_updated)));
        item.insert("op".into(), s(self.operation.as_str()));
        if let Some(traceparent) = self.traceparent {
            item.insert("tp".into(), s(traceparent));
        }
        match (self.blob, self.body) {
            (Some(path), Some(body)) => {
                item.insert("blob".into(), s(path));
                item.insert("blen".into(), n(body.len()));
            }
            (_, Some(body)) => {
                item.insert("body".into(), AttributeValue::B(Blob::new(body.to_vec())));
            }
            (_, None) => {}
        }
        item.insert("tpk".into(), s(type_pk(self.tenant, self.resource_type)));
        item.insert("spk".into(), s(self.tenant.as_str()));
        item
    }
}

pub(crate) fn get_s<'a>(item: &'a Item, name: &str) -> Result<&'a str, StoreError> {
    match item.get(name) {
        Some(AttributeValue::S(value)) => Ok(value),
        other => Err(corrupt(format!("attribute {name} is {other:?}, expected a string"))),
    }
}

pub(crate) fn get_u64(item: &Item, name: &str) -> Result<u64, StoreError> {
    match item.get(name) {
        Some(AttributeValue::N(value)) => {
            value.parse().map_err(|_| corrupt(format!("attribute {name} = {value} is not a u64")))
        }
        other => Err(corrupt(format!("attribute {name} is {other:?}, expected a number"))),
    }
}

fn get_i64(item: &Item, name: &str) -> Result<i64, StoreError> {
    match item.get(name) {
        Some(AttributeValue::N(value)) => {
            value.parse().map_err(|_| corrupt(format!("attribute {name} = {value} is not an i64")))
        }
        other => Err(corrupt(format!("attribute {name} is {other:?}, expected a number"))),
    }
}

pub(crate) fn tenant_of(item: &Item) -> Result<TenantId, StoreError> {
    let tenant = get_s(item, "tenant")?;
    TenantId::parse(tenant).ok_or_else(|| corrupt(format!("tenant {tenant:?}")))
}

/// Decodes a version item.
pub(crate) fn version_from_item(item: &Item) -> Result<ResourceVersion, StoreError> {
    let type_name = get_s(item, "type")?;
    let resource_type = ResourceType::parse(type_name).ok_or_else(|| corrupt(format!("type {type_name:?}")))?;
    let id = get_s(item, "id")?;
    let id = LogicalId::parse(id).map_err(|_| corrupt(format!("id {id:?}")))?;
    let op = get_s(item, "op")?;
    let operation = Operation::parse(op).ok_or_else(|| corrupt(format!("operation {op:?}")))?;
    let body = match item.get("body") {
        Some(AttributeValue::B(blob)) => Some(Bytes::copy_from_slice(blob.as_ref())),
        None => None,
        Some(other) => return Err(corrupt(format!("body is {other:?}"))),
    };
    Ok(ResourceVersion {
        resource_type,
        id,
        version_id: get_u64(item, "ver")?,
        last_updated: from_micros(get_i64(item, "lu")?)?,
        operation,
        body,
        sequence: get_u64(item, "seq")?,
    })
}

/// Decodes a version item into a change record.
pub(crate) fn change_from_version_item(item: &Item) -> Result<ChangeRecord, StoreError> {
    Ok(ChangeRecord {
        tenant: tenant_of(item)?,
        version: version_from_item(item)?,
        commit_end: get_u64(item, "cend")?,
        traceparent: traceparent_of(item),
    })
}

/// The W3C trace context a version item was written with, when it has one.
pub(crate) fn traceparent_of(item: &Item) -> Option<String> {
    match item.get("tp") {
        Some(AttributeValue::S(value)) => Some(value.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_items_round_trip() {
        let tenant = TenantId::parse("t-1").expect("tenant");
        let resource_type = ResourceType::parse("Patient").expect("type");
        let id = LogicalId::parse("p.1").expect("id");
        let body = Bytes::from_static(b"{\"resourceType\":\"Patient\"}");
        let at = OffsetDateTime::from_unix_timestamp_nanos(1_700_000_000_123_456_000).expect("time");
        let written = VersionItem {
            tenant: &tenant,
            resource_type,
            id: &id,
            version_id: 3,
            sequence: 77,
            commit_end: 79,
            last_updated: at,
            operation: Operation::Update,
            body: Some(&body),
            blob: None,
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        }
        .to_item();
        assert_eq!(written.get(PK), Some(&s("R#t-1#Patient#p.1")));
        assert_eq!(written.get(SK), Some(&s("V#00000000000000000003")));
        let change = change_from_version_item(&written).expect("decodes");
        assert_eq!(change.tenant, tenant);
        assert_eq!(change.commit_end, 79);
        assert_eq!(change.traceparent.as_deref(), Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        let v = change.version;
        assert_eq!((v.version_id, v.sequence, v.last_updated, v.operation), (3, 77, at, Operation::Update));
        assert_eq!(v.body.as_ref(), Some(&body));
    }

    #[test]
    fn sort_keys_order_numerically() {
        assert!(version_sk(9) < version_sk(10));
        assert!(change_sk(4095) < change_sk(4096));
        assert_eq!(change_pk(4095), "L#0");
        assert_eq!(change_pk(4096), "L#1");
        // The pointer sorts before every version: a descending query meets the newest version first.
        assert!(CURRENT_SK < version_sk(0).as_str());
    }

    #[test]
    fn malformed_items_are_errors_not_panics() {
        let mut item = key("R#x".into(), version_sk(1));
        assert!(version_from_item(&item).is_err());
        item.insert("type".into(), s("NoSuchType"));
        item.insert("id".into(), s("a"));
        assert!(version_from_item(&item).is_err());
        item.insert("type".into(), s("Patient"));
        item.insert("op".into(), s("create"));
        item.insert("ver".into(), s("1"));
        assert!(version_from_item(&item).is_err(), "ver must be a number");
    }
}
