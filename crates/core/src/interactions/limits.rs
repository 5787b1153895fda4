//! The per-tenant limits of the configured [`WriteRules`] (at most so many active Subscriptions):
//! a commit that adds to the count of a [`TenantLimit`] is judged against how many of the tenant's
//! other resources already count, counted by the search index once it reflects every write
//! committed before the check (the same bounded consistency wait as search).
//!
//! "Adds to the count": a written version that counts replacing one that did not (a create, an
//! update from `off`). Rewriting a version that already counts — an update of an active
//! Subscription at the limit — never trips it, nor does writing one that does not count (`off`).
//!
//! The limit is soft under concurrency: two writers checking at once both see the count before the
//! other's commit, so a tenant can go past it by the number of writes racing; and if the index does
//! not catch up within `consistency_wait`, the count may miss the latest writes (logged). What a
//! tenant can reach is bounded all the same, which is what the limit is for.

use fhirmesh_fhir::search::parse::{ParseOptions, parse_search};
use fhirmesh_fhir::search::query::{SearchScope, TotalMode};
use fhirmesh_fhir::{LogicalId, ResourceType};
use serde_json::Value;
use time::OffsetDateTime;

use super::FhirResources;
use crate::error::{FhirError, FhirResult};
use crate::model::{ResourceVersion, TenantId};
use crate::ports::{TenantLimit, WriteRules};

/// What the writes of one commit do to the tenant limits: gathered (cheaply, from the write
/// rules) before the resources are prepared, checked after they passed validation — so an
/// invalid resource is refused as invalid (400), never as over a limit (422).
#[derive(Debug, Default)]
pub(super) struct LimitedWrites {
    writes: Vec<LimitedWrite>,
    now: Option<OffsetDateTime>,
}

#[derive(Debug)]
struct LimitedWrite {
    /// The caller's index of the write, returned with an error about it.
    index: usize,
    resource_type: ResourceType,
    id: LogicalId,
    /// The limit the written version counts against (`None`: a delete, or it counts against none).
    limit: Option<TenantLimit>,
    /// The version it replaces.
    current: Option<ResourceVersion>,
}

impl LimitedWrites {
    /// Records write `index` of `id`: `new` is the resource written (`None`: a delete), `current`
    /// the version it replaces, `now` when it is written. Without write rules nothing is recorded.
    pub(super) fn record(
        &mut self,
        rules: Option<&dyn WriteRules>,
        index: usize,
        (resource_type, id): (ResourceType, &LogicalId),
        new: Option<&Value>,
        current: Option<&ResourceVersion>,
        now: OffsetDateTime,
    ) {
        let Some(rules) = rules else { return };
        self.now = Some(now);
        self.writes.push(LimitedWrite {
            index,
            resource_type,
            id: id.clone(),
            limit: new.and_then(|resource| rules.tenant_limit(resource_type, resource, now)),
            current: current.cloned(),
        });
    }

    /// Checks every limit the recorded writes add to (see the module documentation); an error
    /// comes with the index of the first write that counts against the limit it is about.
    pub(super) async fn check(self, svc: &FhirResources, tenant: &TenantId) -> Result<(), (usize, FhirError)> {
        let Some(rules) = svc.config.write_rules.as_deref() else { return Ok(()) };
        for increase in self.increases(rules) {
            let Increase { index, resource_type, limit, added, touched } = increase;
            let others = count_others(svc, tenant, resource_type, limit, &touched).await.map_err(|e| (index, e))?;
            rules.check_limit(resource_type, others + added - 1, limit).map_err(|e| (index, e))?;
        }
        Ok(())
    }

    /// The limits whose count the recorded writes raise, one per resource type.
    fn increases(&self, rules: &dyn WriteRules) -> Vec<Increase<'_>> {
        let Some(now) = self.now else { return Vec::new() };
        let mut increases: Vec<Increase<'_>> = Vec::new();
        for first in &self.writes {
            let Some(limit) = &first.limit else { continue };
            let resource_type = first.resource_type;
            if increases.iter().any(|increase| increase.resource_type == resource_type) {
                continue;
            }
            let of_type: Vec<&LimitedWrite> = self.writes.iter().filter(|w| w.resource_type == resource_type).collect();
            let added = of_type.iter().filter(|w| w.limit.is_some()).count();
            let replaced = of_type.iter().filter(|w| counted(rules, w.current.as_ref(), now)).count();
            if added > replaced {
                let touched = of_type.iter().map(|w| &w.id).collect();
                increases.push(Increase { index: first.index, resource_type, limit, added, touched });
            }
        }
        increases
    }
}

/// A limit whose count a commit raises: what to count, and how many the commit adds.
#[derive(Debug)]
struct Increase<'a> {
    /// The first write counting against it.
    index: usize,
    resource_type: ResourceType,
    limit: &'a TenantLimit,
    /// Written versions that count against it.
    added: usize,
    /// Every resource of the type the commit writes: not counted among the others.
    touched: Vec<&'a LogicalId>,
}

/// Whether a stored version (live) counts against a limit of the rules at `now`.
fn counted(rules: &dyn WriteRules, version: Option<&ResourceVersion>, now: OffsetDateTime) -> bool {
    let Some(body) = version.and_then(|version| version.body.as_deref()) else { return false };
    let Some(resource_type) = version.map(|version| version.resource_type) else { return false };
    serde_json::from_slice::<Value>(body)
        .is_ok_and(|resource| rules.tenant_limit(resource_type, &resource, now).is_some())
}

/// How many of the tenant's resources of `resource_type` other than `touched` match the limit's
/// search, exactly up to `limit.max` (beyond it, at least as many as the index's total says).
async fn count_others(
    svc: &FhirResources,
    tenant: &TenantId,
    resource_type: ResourceType,
    limit: &TenantLimit,
    touched: &[&LogicalId],
) -> FhirResult<usize> {
    if svc.index.is_none() {
        return Err(FhirError::unsupported(format!(
            "the per-tenant limit on {resource_type} is counted with search, which is not enabled on this resource service"
        )));
    }
    let page = limit.max.saturating_add(touched.len()).saturating_add(1).min(svc.config.max_page_size.max(1));
    let options = ParseOptions { strict: true, default_count: page, max_count: page };
    let mut query = parse_search(&SearchScope::Type(resource_type), &limit.counted, &options).map_err(|err| {
        let detail: Vec<String> = err.issues.into_iter().map(|issue| issue.diagnostics).collect();
        FhirError::internal(format!(
            "the per-tenant limit on {resource_type} has an invalid search: {}",
            detail.join("; ")
        ))
    })?;
    query.count = page;
    query.total = TotalMode::Accurate;
    query.sort.clear();
    // Every write committed before this one is counted (read-your-writes, as search).
    let target = svc.consistency_target(None).await?;
    let (found, stale) = svc.search_at_least(tenant, &query, None, target).await?;
    if stale.is_some() {
        tracing::warn!(
            resource_type = %resource_type,
            "search index behind: the per-tenant limit is checked on a count that may miss the latest writes"
        );
    }
    let on_page = found.hits.iter().filter(|hit| !touched.contains(&&hit.id)).count();
    let beyond =
        found.total.map_or(0, |total| usize::try_from(total).unwrap_or(usize::MAX).saturating_sub(touched.len()));
    Ok(on_page.max(beyond))
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use serde_json::json;

    use super::*;
    use crate::model::Operation;

    /// Subscriptions count unless `off`; other types never do.
    #[derive(Debug)]
    struct CountNotOff;

    impl WriteRules for CountNotOff {
        fn check(&self, _: ResourceType, _: &Value) -> FhirResult<()> {
            Ok(())
        }

        fn tenant_limit(
            &self,
            resource_type: ResourceType,
            resource: &Value,
            _: OffsetDateTime,
        ) -> Option<TenantLimit> {
            (resource_type == subscription() && resource["status"] != "off")
                .then(|| TenantLimit { counted: vec![("status".into(), "active".into())], max: 2 })
        }
    }

    fn subscription() -> ResourceType {
        ResourceType::parse("Subscription").expect("a type")
    }

    fn id(value: &str) -> LogicalId {
        LogicalId::parse(value).expect("an id")
    }

    fn resource(status: &str) -> Value {
        json!({"resourceType": "Subscription", "status": status})
    }

    fn stored(name: &str, status: &str) -> ResourceVersion {
        ResourceVersion {
            resource_type: subscription(),
            id: id(name),
            version_id: 1,
            last_updated: OffsetDateTime::UNIX_EPOCH,
            operation: Operation::Create,
            body: Some(Bytes::from(resource(status).to_string())),
            sequence: 1,
        }
    }

    /// (first write index, added, touched ids) of each increase.
    fn increases(writes: &[(&str, Option<&str>, Option<&str>)]) -> Vec<(usize, usize, Vec<String>)> {
        let rules = CountNotOff;
        let mut limited = LimitedWrites::default();
        for (index, (name, new, current)) in writes.iter().enumerate() {
            let new = new.map(resource);
            let current = current.map(|status| stored(name, status));
            let target = (subscription(), &id(name));
            limited.record(Some(&rules), index, target, new.as_ref(), current.as_ref(), OffsetDateTime::UNIX_EPOCH);
        }
        limited
            .increases(&rules)
            .into_iter()
            .map(|i| (i.index, i.added, i.touched.iter().map(|id| id.as_str().to_owned()).collect()))
            .collect()
    }

    #[test]
    fn without_rules_nothing_is_recorded() {
        let mut limited = LimitedWrites::default();
        let new = resource("active");
        limited.record(None, 0, (subscription(), &id("a")), Some(&new), None, OffsetDateTime::UNIX_EPOCH);
        assert!(limited.writes.is_empty());
        assert!(limited.increases(&CountNotOff).is_empty());
    }

    #[test]
    fn only_writes_that_raise_the_count_are_counted() {
        // A create that counts: one more, the written id not among the others.
        assert_eq!(increases(&[("a", Some("active"), None)]), vec![(0, 1, vec!["a".to_owned()])]);
        // Turning one on again counts; rewriting one that already counts, or writing one off, does not.
        assert_eq!(increases(&[("a", Some("requested"), Some("off"))]), vec![(0, 1, vec!["a".to_owned()])]);
        assert!(increases(&[("a", Some("active"), Some("requested"))]).is_empty());
        assert!(increases(&[("a", Some("off"), None)]).is_empty());
        assert!(increases(&[("a", Some("off"), Some("active"))]).is_empty());
        assert!(increases(&[("a", None, Some("active"))]).is_empty(), "a delete");
    }

    #[test]
    fn a_transaction_is_judged_as_a_whole() {
        // Two new ones and one deleted: the count grows by one, reported at the first that counts.
        let writes = [("gone", None, Some("active")), ("b", Some("active"), None), ("c", Some("error"), None)];
        assert_eq!(increases(&writes), vec![(1, 2, vec!["gone".to_owned(), "b".to_owned(), "c".to_owned()])]);
        // One turned off and one created: no growth.
        assert!(increases(&[("a", Some("off"), Some("active")), ("b", Some("active"), None)]).is_empty());
    }
}
