//! Export scans: a tenant's resources as they were at a change sequence (a snapshot), read in
//! parallel scan segments (see `design.md`, "Export scans"). For the Bulk Data exporter: each
//! worker reads one segment, page by page, and the segments together cover the table once.

use std::collections::HashSet;

use async_trait::async_trait;
use aws_sdk_dynamodb::types::AttributeValue;
use fhirmesh_core::export::{ChunkPart, ExportSource, SnapshotPage};
use fhirmesh_core::model::{ResourceVersion, TenantId};
use fhirmesh_core::ports::StoreError;
use fhirmesh_fhir::ResourceType;
use futures::stream::{self, StreamExt, TryStreamExt};
use time::OffsetDateTime;

use crate::DynamoStore;
use crate::error::sdk_error;
use crate::items::{
    CURRENT_SK, Item, PK, SK, VERSION_PREFIX, corrupt, get_s, get_u64, micros, n, s, version_from_item, version_sk,
};
use crate::txn::txn_of;

/// DynamoDB's largest `TotalSegments`.
pub const MAX_SEGMENTS: u32 = 1_000_000;
/// Most types one scan filters by key prefix (each is a `begins_with` term of the filter
/// expression, which DynamoDB limits to 4 KB). A scan of more types filters on the tenant's
/// prefix and drops the other types itself.
pub const MAX_EXPORT_TYPES: usize = 100;
/// Most items one page scans.
const MAX_PAGE_ITEMS: usize = 1000;
/// The `as_of` of an export of the current versions: no change is after it.
const CURRENT: u64 = u64::MAX;
/// Resources of one page read at once (version queries, blob bodies).
const CONCURRENCY: usize = 16;
/// Version items the first query of a resource's history reads; later rounds read more.
const FIRST_ROUND: i32 = 4;
const NEXT_ROUND: i32 = 50;

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

    /// A cursor from [`ExportCursor::encode`]. Sort keys never hold a line break (partition keys
    /// may: a checkpoint's is its consumer's name), so the text splits at its last one.
    pub fn decode(text: &str) -> Result<ExportCursor, StoreError> {
        match text.rsplit_once('\n') {
            Some((pk, sk)) if !pk.is_empty() && !sk.is_empty() => {
                Ok(ExportCursor { pk: pk.to_owned(), sk: sk.to_owned() })
            }
            _ => Err(StoreError::Internal(format!("not an export cursor: {}", fhirmesh_fhir::outcome::clip(text)))),
        }
    }
}

/// What to export from one segment.
#[derive(Debug, Clone)]
pub struct ExportScan<'a> {
    pub tenant: &'a TenantId,
    /// Only these types (all when empty). Up to [`MAX_EXPORT_TYPES`] are filtered by the scan,
    /// more after it.
    pub types: &'a [ResourceType],
    /// Only resources whose exported version was last updated strictly after this instant
    /// (`_since`).
    pub since: Option<OffsetDateTime>,
    /// This segment, of `segments` (`0 <= segment < segments <= MAX_SEGMENTS`).
    pub segment: u32,
    pub segments: u32,
}

/// One page of a segment.
#[derive(Debug, Clone, Default)]
pub struct ExportPage {
    /// Live versions, in scan order (the same on every read of the segment).
    pub resources: Vec<ResourceVersion>,
    /// Where the segment goes on; `None` once it is read to its end.
    pub next: Option<ExportCursor>,
}

/// How a pointer read by the scan becomes (at most) one resource of the page.
enum Source {
    /// The version the pointer names is the one current at `as_of`: this key.
    Named(String, String),
    /// The newest committed version with `seq <= as_of` among this resource's versions below
    /// `below` (all of them when `None`).
    Lookup { pk: String, below: Option<u64> },
}

impl DynamoStore {
    /// Up to `limit` current, live resources of `scan`'s segment from `cursor` on: the snapshot
    /// at the newest change ([`DynamoStore::export_snapshot_page`]).
    pub async fn export_page(
        &self,
        scan: &ExportScan<'_>,
        cursor: Option<&ExportCursor>,
        limit: usize,
    ) -> Result<ExportPage, StoreError> {
        self.export_snapshot_page(scan, CURRENT, cursor, limit).await
    }

    /// Up to `limit` resources of `scan`'s segment from `cursor` on, each in the version that was
    /// current at change sequence `as_of` (left out when that is a delete or the resource did
    /// not exist yet). `as_of` must be a sequence the change log has reached
    /// (`latest_sequence`): every change up to it is final, so later writes never change a page.
    ///
    /// The scan reads pointer items (one per resource, `limit` items per page at most, clamped
    /// to 1..=1000); a page may hold fewer than `limit` resources while `next` is `Some`
    /// (DynamoDB pages by items read, not by matches).
    pub async fn export_snapshot_page(
        &self,
        scan: &ExportScan<'_>,
        as_of: u64,
        cursor: Option<&ExportCursor>,
        limit: usize,
    ) -> Result<ExportPage, StoreError> {
        check_segments(scan.segment, scan.segments)?;
        let limit = i32::try_from(limit.clamp(1, MAX_PAGE_ITEMS)).unwrap_or(1000);
        let tenant_prefix = format!("R#{}#", scan.tenant);
        // Few types: the scan keeps only their pointers. Many: the tenant's, and the types are
        // picked here.
        let (prefixes, keep): (Vec<String>, Option<HashSet<&str>>) = if scan.types.is_empty() {
            (vec![tenant_prefix.clone()], None)
        } else if scan.types.len() <= MAX_EXPORT_TYPES {
            (scan.types.iter().map(|t| format!("{tenant_prefix}{t}#")).collect(), None)
        } else {
            (vec![tenant_prefix.clone()], Some(scan.types.iter().map(|t| t.as_str()).collect()))
        };
        let prefix_terms: Vec<String> = (0..prefixes.len()).map(|i| format!("begins_with(pk, :p{i})")).collect();
        // Pointer items of the tenant that may name a resource at `as_of`: live ones, locked ones
        // (a staged transaction may have created or revived it), and those that moved after
        // `as_of` (deleted now, perhaps live then). A delete at or before `as_of` is left out.
        let moved = if as_of == CURRENT { "" } else { " OR seq > :as_of" };
        let filter =
            format!("sk = :c AND (del = :live OR attribute_exists(lk){moved}) AND ({})", prefix_terms.join(" OR "));
        let mut request = self
            .inner
            .client
            .scan()
            .table_name(&self.inner.config.table)
            .segment(i32::try_from(scan.segment).unwrap_or(i32::MAX))
            .total_segments(i32::try_from(scan.segments).unwrap_or(i32::MAX))
            .limit(limit)
            .consistent_read(true)
            .filter_expression(filter)
            .expression_attribute_values(":c", s(CURRENT_SK))
            .expression_attribute_values(":live", AttributeValue::Bool(false));
        if as_of != CURRENT {
            request = request.expression_attribute_values(":as_of", n(as_of));
        }
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
        let mut sources = Vec::with_capacity(out.items().len());
        for pointer in out.items() {
            if let Some(keep) = &keep {
                let pk = get_s(pointer, PK)?;
                if !keep.contains(type_of_key(pk, &tenant_prefix)?) {
                    continue;
                }
            }
            if let Some(source) = source_of(pointer, as_of)? {
                sources.push(source);
            }
        }
        let resources = self.versions_of(sources, as_of, scan.since).await?;
        Ok(ExportPage { resources, next })
    }

    /// The live versions the sources come to, in their order, filtered by `since`.
    async fn versions_of(
        &self,
        sources: Vec<Source>,
        as_of: u64,
        since: Option<OffsetDateTime>,
    ) -> Result<Vec<ResourceVersion>, StoreError> {
        let named: Vec<(String, String)> = sources
            .iter()
            .filter_map(|source| match source {
                Source::Named(pk, sk) => Some((pk.clone(), sk.clone())),
                Source::Lookup { .. } => None,
            })
            .collect();
        let items = self.batch_get(&named).await?;
        let items = &items;
        let found: Vec<Option<ResourceVersion>> = stream::iter(sources)
            .map(|source| async move {
                let item = match source {
                    Source::Named(pk, sk) => {
                        let item = items.get(&(pk.clone(), sk)).ok_or_else(|| {
                            StoreError::Internal(format!("{pk}: the pointer names a version that is not stored"))
                        })?;
                        return self.exported(item, since).await;
                    }
                    Source::Lookup { pk, below } => self.version_at(&pk, below, as_of).await?,
                };
                match item {
                    Some(item) => self.exported(&item, since).await,
                    None => Ok(None),
                }
            })
            .buffered(CONCURRENCY)
            .try_collect()
            .await?;
        Ok(found.into_iter().flatten().collect())
    }

    /// The version item as exported: `None` for a delete or a version not after `since`; the
    /// body read from the blob store only for versions that are exported.
    async fn exported(
        &self,
        item: &Item,
        since: Option<OffsetDateTime>,
    ) -> Result<Option<ResourceVersion>, StoreError> {
        let version = version_from_item(item)?;
        if version.is_deleted() || since.is_some_and(|since| micros(version.last_updated) <= micros(since)) {
            return Ok(None);
        }
        if item.contains_key("blob") { self.decode(item).await.map(Some) } else { Ok(Some(version)) }
    }

    /// The newest committed version item of resource `pk` with `seq <= as_of` (below version
    /// `below` when given): its versions newest first, passing over those of staged
    /// transactions that did not commit.
    async fn version_at(&self, pk: &str, below: Option<u64>, as_of: u64) -> Result<Option<Item>, StoreError> {
        let mut query = self
            .inner
            .client
            .query()
            .table_name(&self.inner.config.table)
            .scan_index_forward(false)
            .consistent_read(true)
            .expression_attribute_values(":pk", s(pk));
        query = match below {
            Some(version) => query
                .key_condition_expression("pk = :pk AND sk BETWEEN :lo AND :hi")
                .expression_attribute_values(":lo", s(VERSION_PREFIX))
                .expression_attribute_values(":hi", s(version_sk(version.saturating_sub(1)))),
            None => query
                .key_condition_expression("pk = :pk AND begins_with(sk, :v)")
                .expression_attribute_values(":v", s(VERSION_PREFIX)),
        };
        if as_of != CURRENT {
            query = query.filter_expression("seq <= :as_of").expression_attribute_values(":as_of", n(as_of));
        }
        let mut start: Option<Item> = None;
        let mut limit = FIRST_ROUND;
        loop {
            let out = query
                .clone()
                .limit(limit)
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| sdk_error("export snapshot read", e))?;
            for item in out.items() {
                if self.visible(item).await? {
                    return Ok(Some(item.clone()));
                }
            }
            match out.last_evaluated_key() {
                Some(next) => start = Some(next.clone()),
                None => return Ok(None),
            }
            limit = NEXT_ROUND;
        }
    }
}

#[async_trait]
impl ExportSource for DynamoStore {
    async fn snapshot_page(
        &self,
        tenant: &TenantId,
        part: &ChunkPart,
        as_of: u64,
        since: Option<OffsetDateTime>,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<SnapshotPage, StoreError> {
        check_segments(part.segment, part.segments)?;
        let cursor = cursor.map(ExportCursor::decode).transpose()?;
        if part.types.is_empty() {
            // A part of no types holds nothing (an `ExportScan` without types means all).
            return Ok(SnapshotPage::default());
        }
        let scan = ExportScan { tenant, types: &part.types, since, segment: part.segment, segments: part.segments };
        let page = self.export_snapshot_page(&scan, as_of, cursor.as_ref(), limit).await?;
        Ok(SnapshotPage { resources: page.resources, next: page.next.map(|cursor| cursor.encode()) })
    }
}

fn check_segments(segment: u32, segments: u32) -> Result<(), StoreError> {
    if segments == 0 || segments > MAX_SEGMENTS || segment >= segments {
        return Err(StoreError::Internal(format!(
            "export segment {segment} of {segments} (segments must be 1..={MAX_SEGMENTS})"
        )));
    }
    Ok(())
}

/// What to read for a pointer at `as_of`; `None` when the resource is not in the snapshot.
fn source_of(pointer: &Item, as_of: u64) -> Result<Option<Source>, StoreError> {
    let pk = get_s(pointer, PK)?.to_owned();
    if txn_of(pointer, "lk").is_some() {
        // Locked by a staged transaction: the pointer may be behind (committed, not rolled
        // forward) or may not name a version at all (the lock created it); the version items
        // tell, those of uncommitted transactions passed over.
        return Ok(Some(Source::Lookup { pk, below: None }));
    }
    let version = get_u64(pointer, "ver")?;
    if get_u64(pointer, "seq")? <= as_of {
        // Its version is the newest, and was current at `as_of` already.
        return Ok((!deleted(pointer)?).then(|| Source::Named(pk, version_sk(version))));
    }
    // Moved after `as_of`: an earlier version may have been current then. Version ids start at
    // 1, so a pointer at version 1 has none earlier: created after `as_of`.
    Ok((version > 1).then_some(Source::Lookup { pk, below: Some(version) }))
}

fn deleted(pointer: &Item) -> Result<bool, StoreError> {
    match pointer.get("del") {
        Some(AttributeValue::Bool(deleted)) => Ok(*deleted),
        other => Err(corrupt(format!("pointer attribute del is {other:?}, expected a boolean"))),
    }
}

/// The type name of a resource key `{tenant_prefix}{type}#{id}`.
fn type_of_key<'a>(pk: &'a str, tenant_prefix: &str) -> Result<&'a str, StoreError> {
    pk.strip_prefix(tenant_prefix)
        .and_then(|rest| rest.split_once('#'))
        .map(|(type_name, _)| type_name)
        .ok_or_else(|| corrupt(format!("resource key {pk:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        for (pk, sk) in [("R#t#Patient#a", "C"), ("K#odd\nconsumer", "K"), ("L#3", "00000000000000012345")] {
            let cursor = ExportCursor { pk: pk.into(), sk: sk.into() };
            assert_eq!(ExportCursor::decode(&cursor.encode()), Ok(cursor));
        }
        for bad in ["", "R#t#Patient#a", "\nC", "R#a\n", "\n"] {
            assert!(matches!(ExportCursor::decode(bad), Err(StoreError::Internal(_))), "{bad:?}");
        }
    }

    #[test]
    fn segments_must_be_in_range() {
        for (segment, segments) in [(0, 1), (2, 3), (999_999, MAX_SEGMENTS)] {
            assert_eq!(check_segments(segment, segments), Ok(()));
        }
        for (segment, segments) in [(0, 0), (3, 3), (0, MAX_SEGMENTS + 1), (u32::MAX, u32::MAX)] {
            assert!(matches!(check_segments(segment, segments), Err(StoreError::Internal(_))), "{segment}/{segments}");
        }
    }

    fn pointer(version: u64, sequence: u64, deleted: bool, lock: Option<&str>) -> Item {
        let mut item = crate::items::key("R#t#Patient#p".into(), CURRENT_SK.into());
        item.insert("ver".into(), n(version));
        item.insert("seq".into(), n(sequence));
        item.insert("del".into(), AttributeValue::Bool(deleted));
        if let Some(txn) = lock {
            item.insert("lk".into(), s(txn));
        }
        item
    }

    fn describe(source: Option<Source>) -> Option<(String, Option<u64>)> {
        source.map(|source| match source {
            Source::Named(_, sk) => (sk, None),
            Source::Lookup { below, .. } => ("lookup".to_owned(), below),
        })
    }

    #[test]
    fn pointers_become_the_snapshot_version_or_a_lookup() {
        let at = |item: Item, as_of| describe(source_of(&item, as_of).expect("decodes"));
        assert_eq!(at(pointer(3, 10, false, None), 10), Some((version_sk(3), None)), "unchanged since");
        assert_eq!(at(pointer(3, 10, true, None), 12), None, "deleted before as_of");
        assert_eq!(at(pointer(3, 10, false, None), 9), Some(("lookup".into(), Some(3))), "updated after");
        assert_eq!(at(pointer(3, 10, true, None), 9), Some(("lookup".into(), Some(3))), "deleted after");
        assert_eq!(at(pointer(1, 10, false, None), 9), None, "created after");
        assert_eq!(at(pointer(1, 10, false, Some("x")), 20), Some(("lookup".into(), None)), "locked");
        // A pointer a lock created has no version yet.
        let mut created = crate::items::key("R#t#Patient#p".into(), CURRENT_SK.into());
        created.insert("lk".into(), s("x"));
        assert_eq!(at(created.clone(), 20), Some(("lookup".into(), None)));
        created.remove("lk");
        assert!(source_of(&created, 20).is_err(), "no version, no lock: corrupt, not a panic");
        let mut bad = pointer(2, 10, false, None);
        bad.insert("del".into(), s("no"));
        assert!(source_of(&bad, 20).is_err());
    }

    #[test]
    fn type_names_come_from_resource_keys_of_the_tenant() {
        assert_eq!(type_of_key("R#t1#Patient#p-1", "R#t1#"), Ok("Patient"));
        for bad in ["R#t2#Patient#p", "R#t1#Patient", "X#t1#Patient#p"] {
            assert!(type_of_key(bad, "R#t1#").is_err(), "{bad:?}");
        }
    }
}
