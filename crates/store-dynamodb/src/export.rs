//! Export scans: every current, live resource of a tenant, read in parallel scan segments (see
//! `design.md`, "Export scans"). For the Bulk Data exporter: each worker reads one segment, page
//! by page, and the segments together cover the table once.

use aws_sdk_dynamodb::types::AttributeValue;
use fhirmesh_core::model::{ResourceVersion, TenantId};
use fhirmesh_core::ports::StoreError;
use fhirmesh_fhir::{LogicalId, ResourceType};
use time::OffsetDateTime;

use crate::DynamoStore;
use crate::error::sdk_error;
use crate::items::{CURRENT_SK, Item, PK, SK, get_s, get_u64, micros, s, version_sk};
use crate::txn::txn_of;

/// DynamoDB's largest `TotalSegments`.
pub const MAX_SEGMENTS: u32 = 1_000_000;
/// Most type filters one scan takes (each is a `begins_with` term of the filter expression).
pub const MAX_EXPORT_TYPES: usize = 100;

/// Where a segment's scan goes on: opaque, from [`ExportPage::next`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportCursor {
    pk: String,
    sk: String,
}

impl ExportCursor {
    /// The cursor as text (for a job record).
    pub fn encode(&self) -> String {
        format!("{}\n{}", self.pk, self.sk)
    }

    /// A cursor from [`ExportCursor::encode`].
    pub fn decode(text: &str) -> Result<ExportCursor, StoreError> {
        match text.split_once('\n') {
            Some((pk, sk)) if !pk.is_empty() && !sk.is_empty() && !sk.contains('\n') => {
                Ok(ExportCursor { pk: pk.to_owned(), sk: sk.to_owned() })
            }
            _ => Err(StoreError::Internal(format!("not an export cursor: {text:?}"))),
        }
    }
}

/// What to export from one segment.
#[derive(Debug, Clone)]
pub struct ExportScan<'a> {
    pub tenant: &'a TenantId,
    /// Only these types (all when empty; at most [`MAX_EXPORT_TYPES`]).
    pub types: &'a [ResourceType],
    /// Only resources whose current version was written at or after this instant (`_since`).
    pub since: Option<OffsetDateTime>,
    /// This segment, of `segments` (`0 <= segment < segments <= MAX_SEGMENTS`).
    pub segment: u32,
    pub segments: u32,
}

/// One page of a segment.
#[derive(Debug, Clone, Default)]
pub struct ExportPage {
    /// Current versions, none deleted, in no particular order.
    pub resources: Vec<ResourceVersion>,
    /// Where the segment goes on; `None` once it is read to its end.
    pub next: Option<ExportCursor>,
}

impl DynamoStore {
    /// Up to `limit` resources of `scan`'s segment from `cursor` on. The scan reads pointer items
    /// (one per resource) and then the versions they name; a page may hold fewer than `limit`
    /// resources while `next` is `Some` (DynamoDB pages by items read, not by matches).
    pub async fn export_page(
        &self,
        scan: &ExportScan<'_>,
        cursor: Option<&ExportCursor>,
        limit: usize,
    ) -> Result<ExportPage, StoreError> {
        if scan.segments == 0 || scan.segments > MAX_SEGMENTS || scan.segment >= scan.segments {
            return Err(StoreError::Internal(format!(
                "export segment {} of {} (segments must be 1..={MAX_SEGMENTS})",
                scan.segment, scan.segments
            )));
        }
        if scan.types.len() > MAX_EXPORT_TYPES {
            return Err(StoreError::Unsupported(format!(
                "an export scan filters at most {MAX_EXPORT_TYPES} resource types, not {}",
                scan.types.len()
            )));
        }
        let limit = i32::try_from(limit.clamp(1, 1000)).unwrap_or(1000);
        let prefixes: Vec<String> = if scan.types.is_empty() {
            vec![format!("R#{}#", scan.tenant)]
        } else {
            scan.types.iter().map(|t| format!("R#{}#{t}#", scan.tenant)).collect()
        };
        let prefix_terms: Vec<String> = (0..prefixes.len()).map(|i| format!("begins_with(pk, :p{i})")).collect();
        // Live pointers, and locked ones (a staged transaction may have created or revived it).
        let filter = format!("sk = :c AND (del = :live OR attribute_exists(lk)) AND ({})", prefix_terms.join(" OR "));
        let mut request = self
            .inner
            .client
            .scan()
            .table_name(&self.inner.config.table)
            .segment(scan.segment as i32)
            .total_segments(scan.segments as i32)
            .limit(limit)
            .consistent_read(true)
            .filter_expression(filter)
            .expression_attribute_values(":c", s(CURRENT_SK))
            .expression_attribute_values(":live", AttributeValue::Bool(false));
        for (i, prefix) in prefixes.into_iter().enumerate() {
            request = request.expression_attribute_values(format!(":p{i}"), s(prefix));
        }
        if let Some(cursor) = cursor {
            request =
                request.exclusive_start_key(PK, s(cursor.pk.clone())).exclusive_start_key(SK, s(cursor.sk.clone()));
        }
        let out = request.send().await.map_err(|e| sdk_error("export scan", e))?;
        let next = match out.last_evaluated_key() {
            Some(key) => Some(ExportCursor { pk: get_s(key, PK)?.to_owned(), sk: get_s(key, SK)?.to_owned() }),
            None => None,
        };
        let resources = self.current_of(scan, out.items()).await?;
        Ok(ExportPage { resources, next })
    }

    /// The current, live versions the pointers name, filtered by `since`.
    async fn current_of(&self, scan: &ExportScan<'_>, pointers: &[Item]) -> Result<Vec<ResourceVersion>, StoreError> {
        let mut plain = Vec::new();
        let mut locked = Vec::new();
        for pointer in pointers {
            let pk = get_s(pointer, PK)?;
            if txn_of(pointer, "lk").is_some() {
                locked.push(pk.to_owned());
            } else {
                plain.push((pk.to_owned(), version_sk(get_u64(pointer, "ver")?)));
            }
        }
        let mut found = Vec::with_capacity(pointers.len());
        let items = self.batch_get(&plain).await?;
        for key in &plain {
            let item = items.get(key).ok_or_else(|| {
                StoreError::Internal(format!("{}: the pointer names a version that is not stored", key.0))
            })?;
            found.push(self.decode(item).await?);
        }
        // The pointer may be behind its transaction: the version items tell.
        for pk in locked {
            let (resource_type, id) = resource_of(&pk, scan.tenant)?;
            if let Some(version) = self.read_current(scan.tenant, resource_type, &id).await? {
                found.push(version);
            }
        }
        found.retain(|version| {
            !version.is_deleted() && scan.since.is_none_or(|since| micros(version.last_updated) >= micros(since))
        });
        Ok(found)
    }
}

/// The type and id of a resource key `R#{tenant}#{type}#{id}` of `tenant`.
fn resource_of(pk: &str, tenant: &TenantId) -> Result<(ResourceType, LogicalId), StoreError> {
    let bad = || crate::items::corrupt(format!("resource key {pk:?}"));
    let rest = pk.strip_prefix(&format!("R#{tenant}#")).ok_or_else(bad)?;
    let (type_name, id) = rest.split_once('#').ok_or_else(bad)?;
    let resource_type = ResourceType::parse(type_name).ok_or_else(bad)?;
    let id = LogicalId::parse(id).map_err(|_| bad())?;
    Ok((resource_type, id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let cursor = ExportCursor { pk: "R#t#Patient#a".into(), sk: "C".into() };
        assert_eq!(ExportCursor::decode(&cursor.encode()), Ok(cursor));
        for bad in ["", "R#t#Patient#a", "\nC", "R#a\n", "R#a\nC\nD"] {
            assert!(ExportCursor::decode(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn resource_keys_decode_for_their_tenant_only() {
        let tenant = TenantId::parse("t1").expect("tenant");
        let (resource_type, id) = resource_of("R#t1#Patient#p-1", &tenant).expect("decodes");
        assert_eq!((resource_type.as_str(), id.as_str()), ("Patient", "p-1"));
        for bad in ["R#t2#Patient#p", "R#t1#Nope#p", "R#t1#Patient", "X#t1#Patient#p"] {
            assert!(resource_of(bad, &tenant).is_err(), "{bad:?}");
        }
    }
}
