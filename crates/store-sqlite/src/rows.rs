//! Conversions between domain values and SQLite columns. Stored data that does not decode is an
//! [`Error::Corrupt`], never a panic.

use bytes::Bytes;
use fhirmesh_core::model::{Operation, ResourceVersion, TenantId};
use fhirmesh_fhir::{LogicalId, ResourceType};
use rusqlite::Row;
use rusqlite::types::ValueRef;
use time::OffsetDateTime;

use crate::error::{Error, Result};

/// The columns [`version_from_row`] decodes, in order, for a `resource_versions` alias `v`.
pub(crate) const VERSION_COLUMNS: &str = "v.sequence, v.type, v.id, v.version, v.last_updated, v.operation, v.body";

/// Decodes the [`VERSION_COLUMNS`] starting at column `first`.
pub(crate) fn version_from_row(row: &Row<'_>, first: usize) -> Result<ResourceVersion> {
    let sequence = to_u64(row.get(first)?, "sequence")?;
    let type_name = text(row, first + 1, "type")?;
    let resource_type =
        ResourceType::parse(type_name).ok_or_else(|| Error::Corrupt(format!("unknown resource type {type_name:?}")))?;
    let id = text(row, first + 2, "id")?;
    let id = LogicalId::parse(id).map_err(|err| Error::Corrupt(format!("bad logical id: {err}")))?;
    let version_id = to_u64(row.get(first + 3)?, "version")?;
    let last_updated = from_micros(row.get(first + 4)?)?;
    let operation = text(row, first + 5, "operation")?;
    let operation =
        Operation::parse(operation).ok_or_else(|| Error::Corrupt(format!("unknown operation {operation:?}")))?;
    let body = match row.get_ref(first + 6)? {
        ValueRef::Null => None,
        ValueRef::Blob(bytes) | ValueRef::Text(bytes) => Some(Bytes::copy_from_slice(bytes)),
        ValueRef::Integer(_) | ValueRef::Real(_) => {
            return Err(Error::Corrupt("body is neither a blob nor NULL".to_owned()));
        }
    };
    Ok(ResourceVersion { resource_type, id, version_id, last_updated, operation, body, sequence })
}

/// Decodes a tenant column.
pub(crate) fn tenant_from_row(row: &Row<'_>, index: usize) -> Result<TenantId> {
    let tenant = text(row, index, "tenant")?;
    TenantId::parse(tenant).ok_or_else(|| Error::Corrupt(format!("bad tenant {tenant:?}")))
}

fn text<'r>(row: &'r Row<'_>, index: usize, what: &str) -> Result<&'r str> {
    match row.get_ref(index)? {
        ValueRef::Text(bytes) => std::str::from_utf8(bytes).map_err(|_| Error::Corrupt(format!("{what} is not UTF-8"))),
        _ => Err(Error::Corrupt(format!("{what} is not text"))),
    }
}

/// A stored non-negative integer as `u64`.
pub(crate) fn to_u64(value: i64, what: &str) -> Result<u64> {
    u64::try_from(value).map_err(|_| Error::Corrupt(format!("negative {what} {value}")))
}

/// A domain `u64` as an SQLite integer.
pub(crate) fn to_i64(value: u64, what: &str) -> Result<i64> {
    i64::try_from(value).map_err(|_| Error::Invalid(format!("{what} {value} exceeds i64")))
}

/// A `u64` bound (cursor, limit) as an SQLite integer, saturating: larger values mean "no bound".
pub(crate) fn saturating_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Microseconds since the Unix epoch, rounded down (sub-microsecond precision is dropped).
pub(crate) fn to_micros(at: OffsetDateTime) -> Result<i64> {
    i64::try_from(at.unix_timestamp_nanos().div_euclid(1000))
        .map_err(|_| Error::Invalid(format!("timestamp {at} out of range")))
}

/// The UTC instant of stored microseconds.
pub(crate) fn from_micros(micros: i64) -> Result<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1000)
        .map_err(|_| Error::Corrupt(format!("timestamp {micros} out of range")))
}
