//! search (GET /{type}?…, GET /?…, GET /{Compartment}/{id}/{type}?…, POST …/_search): parse the
//! parameters into a backend-neutral query, wait (bounded) until the index has caught up with the
//! caller's writes, run the query on the search index, read the current versions from the store,
//! and resolve `_include` / `_revinclude`.

use std::collections::HashSet;
use std::time::Duration;

use fhirmesh_fhir::elements::SummaryMode;
use fhirmesh_fhir::outcome::{Issue, IssueType, Severity};
use fhirmesh_fhir::search::extract::extract_param;
use fhirmesh_fhir::search::parse::{ParseOptions, parse_search};
use fhirmesh_fhir::search::query::{Criterion, Include, Match, SearchQuery, SearchScope, SearchValue, TotalMode};
use fhirmesh_fhir::search::{IndexValue, ParamType, registry};
use fhirmesh_fhir::{LogicalId, ResourceType};

use super::FhirResources;
use crate::auth::Interaction;
use crate::error::{FhirError, FhirResult};
use crate::model::{ResourceVersion, TenantId};
use crate::ports::{DynSearchIndex, IndexHit, IndexPage};
use crate::service::{RequestContext, SearchPage, SearchRequest};

/// How many `:iterate` rounds `_include`/`_revinclude` follow at most.
const MAX_INCLUDE_DEPTH: usize = 4;
/// Upper bound on resources added by includes to one page.
const MAX_INCLUDED: usize = 1000;

pub(super) async fn search(
    svc: &FhirResources,
    ctx: &RequestContext,
    request: SearchRequest,
) -> FhirResult<SearchPage> {
    let reach = match &request.scope {
        SearchScope::Type(t) | SearchScope::Compartment { member: Some(t), .. } => {
            super::authorize_reach(ctx, Interaction::SearchType, Some(*t))?
        }
        SearchScope::System | SearchScope::Compartment { member: None, .. } => {
            super::authorize_reach(ctx, Interaction::SearchSystem, None)?
        }
    };
    let mut request = request;
    match &reach {
        super::Reach::All => {}
        super::Reach::Patient(patient) => request.scope = patient_compartment_scope(&request.scope, patient)?,
        super::Reach::Filtered { alternatives, patient } => {
            if let Some(patient) = patient {
                request.scope = patient_compartment_scope(&request.scope, patient)?;
            }
            request.params.extend(filter_params(alternatives)?);
        }
    }
    let index = svc.search_index()?;
    let options = ParseOptions {
        strict: request.strict,
        default_count: svc.config.default_search_count,
        max_count: svc.config.max_page_size,
    };
    let mut query = parse_search(&request.scope, &request.params, &options)
        .map_err(|err| FhirError::with_issues(crate::error::ErrorCategory::Invalid, err.issues))?;
    linked_types_allowed(ctx, &query.criteria)?;
    if query.summary == Some(SummaryMode::Count) {
        // Only the total is wanted: no page, no includes.
        query.count = 0;
    }
    let mut warnings: Vec<Issue> = query
        .ignored
        .iter()
        .map(|ignored| warning(format!("parameter '{}' was ignored: {}", ignored.name, ignored.reason)))
        .collect();
    let target = svc.consistency_target(request.consistency_token).await?;
    let (page, stale) = svc.search_at_least(&ctx.tenant, &query, request.page_token.as_deref(), target).await?;
    warnings.extend(stale);
    let entries = current_versions(svc, &ctx.tenant, &page.hits).await?;
    let mut included =
        if query.count == 0 { Vec::new() } else { includes(svc, index, &ctx.tenant, &query, &entries).await? };
    // `_include`/`_revinclude` never reveal what the caller may not read.
    included.retain(|version| {
        super::authorize_reach(ctx, Interaction::Read, Some(version.resource_type))
            .is_ok_and(|reach| reach.covers(version))
    });
    Ok(SearchPage {
        entries,
        included,
        total: page.total,
        next_page_token: page.next,
        previous_page_token: page.previous,
        applied: query.applied,
        warnings,
    })
}

/// Finds live resources of `resource_type` matching a query string (conditional create, update
/// and delete), at most `limit`. Unknown parameters are errors here: a condition that is silently
/// widened could overwrite the wrong resource.
pub(super) async fn find(
    svc: &FhirResources,
    tenant: &TenantId,
    resource_type: ResourceType,
    params: &[(String, String)],
    limit: usize,
) -> FhirResult<Vec<ResourceVersion>> {
    let options = ParseOptions { strict: true, default_count: limit, max_count: limit };
    let mut query = parse_search(&SearchScope::Type(resource_type), params, &options)
        .map_err(|err| FhirError::with_issues(crate::error::ErrorCategory::Invalid, err.issues))?;
    if query.criteria.is_empty() {
        return Err(FhirError::invalid("a conditional request needs at least one search criterion"));
    }
    query.count = limit;
    query.total = TotalMode::None;
    query.sort.clear();
    // Conditions must see every committed write.
    let target = svc.consistency_target(None).await?;
    let (page, _) = svc.search_at_least(tenant, &query, None, target).await?;
    current_versions(svc, tenant, &page.hits).await
}

fn warning(diagnostics: String) -> Issue {
    Issue { severity: Severity::Warning, code: IssueType::Informational, diagnostics, expression: None }
}

/// Reads the current version of each hit in one store round trip, skipping resources deleted
/// since the index saw them.
async fn current_versions(
    svc: &FhirResources,
    tenant: &TenantId,
    hits: &[IndexHit],
) -> FhirResult<Vec<ResourceVersion>> {
    let keys: Vec<(ResourceType, LogicalId)> = hits.iter().map(|h| (h.resource_type, h.id.clone())).collect();
    live(svc, tenant, &keys).await
}

/// The live current versions of `keys`, in order.
async fn live(
    svc: &FhirResources,
    tenant: &TenantId,
    keys: &[(ResourceType, LogicalId)],
) -> FhirResult<Vec<ResourceVersion>> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let found = svc.store.read_many(tenant, keys).await?;
    Ok(found.into_iter().flatten().filter(|v| !v.is_deleted()).collect())
}

/// Resolves `_include` (following references out of the page) and `_revinclude` (finding
/// resources that reference the page), repeating `:iterate` directives on what was added.
async fn includes(
    svc: &FhirResources,
    index: &DynSearchIndex,
    tenant: &TenantId,
    query: &SearchQuery,
    matches: &[ResourceVersion],
) -> FhirResult<Vec<ResourceVersion>> {
    if query.includes.is_empty() && query.revincludes.is_empty() {
        return Ok(Vec::new());
    }
    let mut seen: HashSet<(ResourceType, String)> =
        matches.iter().map(|v| (v.resource_type, v.id.as_str().to_owned())).collect();
    let mut included: Vec<ResourceVersion> = Vec::new();
    let mut frontier: Vec<ResourceVersion> = matches.to_vec();
    for depth in 0..MAX_INCLUDE_DEPTH {
        let iterate_only = depth > 0;
        let mut added = Vec::new();
        let mut wanted: Vec<(ResourceType, LogicalId)> = Vec::new();
        for include in query.includes.iter().filter(|i| !iterate_only || i.iterate) {
            for (resource_type, id) in forward_targets(include, &frontier) {
                if included.len() + wanted.len() >= MAX_INCLUDED || !seen.insert((resource_type, id.clone())) {
                    continue;
                }
                if let Ok(logical_id) = LogicalId::parse(&id) {
                    wanted.push((resource_type, logical_id));
                }
            }
        }
        added.extend(live(svc, tenant, &wanted).await?);
        for include in query.revincludes.iter().filter(|i| !iterate_only || i.iterate) {
            let budget = MAX_INCLUDED.saturating_sub(included.len() + added.len());
            if budget == 0 {
                break;
            }
            let Some(rev_query) = reverse_query(include, &frontier, budget) else { continue };
            let page = index.search(tenant, &rev_query, None).await?;
            for version in current_versions(svc, tenant, &page.hits).await? {
                if seen.insert((version.resource_type, version.id.as_str().to_owned())) {
                    added.push(version);
                }
            }
        }
        if added.is_empty() {
            break;
        }
        included.extend(added.iter().cloned());
        frontier = added;
    }
    Ok(included)
}

/// The (type, id) targets of an `_include` directive in `sources`.
fn forward_targets(include: &Include, sources: &[ResourceVersion]) -> Vec<(ResourceType, String)> {
    let registry = registry();
    let mut out = Vec::new();
    for source in sources.iter().filter(|s| s.resource_type == include.source_type) {
        let Some(body) = &source.body else { continue };
        let Ok(resource) = serde_json::from_slice::<serde_json::Value>(body) else { continue };
        let params: Vec<_> = match &include.param {
            Some(code) => registry.get(source.resource_type, code).into_iter().collect(),
            None => registry
                .for_type(source.resource_type)
                .into_iter()
                .filter(|def| def.kind == ParamType::Reference)
                .collect(),
        };
        for def in params {
            for value in extract_param(&resource, def) {
                if let IndexValue::Reference { target_type: Some(target_type), id: Some(id), .. } = value
                    && include.target_type.is_none_or(|t| t == target_type)
                {
                    out.push((target_type, id));
                }
            }
        }
    }
    out
}

/// The query finding `include.source_type` resources whose reference parameter points at any of
/// `targets`.
fn reverse_query(include: &Include, targets: &[ResourceVersion], limit: usize) -> Option<SearchQuery> {
    let registry = registry();
    let params: Vec<String> = match &include.param {
        Some(code) => vec![code.clone()],
        None => registry
            .for_type(include.source_type)
            .into_iter()
            .filter(|def| def.kind == ParamType::Reference)
            .map(|def| def.code.clone())
            .collect(),
    };
    let targets: Vec<&ResourceVersion> =
        targets.iter().filter(|t| include.target_type.is_none_or(|wanted| wanted == t.resource_type)).collect();
    if params.is_empty() || targets.is_empty() {
        return None;
    }
    let values: Vec<SearchValue> = targets
        .iter()
        .map(|t| SearchValue::Reference {
            target_type: Some(t.resource_type),
            id: Some(t.id.as_str().to_owned()),
            url: None,
        })
        .collect();
    let criteria = vec![Criterion::AnyOf(
        params
            .into_iter()
            .map(|param| {
                Criterion::Match(Match {
                    chain: Vec::new(),
                    param,
                    kind: ParamType::Reference,
                    modifier: None,
                    values: values.clone(),
                })
            })
            .collect(),
    )];
    let mut query = SearchQuery::new(vec![include.source_type], criteria, limit);
    query.total = TotalMode::None;
    Some(query)
}

impl FhirResources {
    pub(super) fn search_index(&self) -> FhirResult<&DynSearchIndex> {
        self.index.as_ref().ok_or_else(|| FhirError::unsupported("search is not enabled on this resource service"))
    }

    /// The change-log sequence a search must reflect: the caller's token or, without one,
    /// everything committed when the call started. `None` when nothing is to be waited for.
    pub(super) async fn consistency_target(&self, token: Option<u64>) -> FhirResult<Option<u64>> {
        Ok(match (token, &self.changes) {
            (Some(token), _) => Some(token),
            (None, Some(changes)) => Some(changes.latest_sequence().await?),
            (None, None) => None,
        })
    }

    /// Runs `query` on a snapshot that reflects `target`: optimistically first (the common case,
    /// one round trip), then — when the page's watermark is behind — after waiting, at most
    /// `config.consistency_wait`, for the index to catch up. Returns a warning when it gave up.
    pub(super) async fn search_at_least(
        &self,
        tenant: &TenantId,
        query: &SearchQuery,
        cursor: Option<&str>,
        target: Option<u64>,
    ) -> FhirResult<(IndexPage, Option<Issue>)> {
        let index = self.search_index()?;
        let page = index.search(tenant, query, cursor).await?;
        let Some(target) = target.filter(|target| page.watermark < *target) else {
            return Ok((page, None));
        };
        let deadline = tokio::time::Instant::now() + self.config.consistency_wait;
        let mut pause = Duration::from_micros(250);
        loop {
            if index.watermark().await? >= target {
                return Ok((index.search(tenant, query, cursor).await?, None));
            }
            if tokio::time::Instant::now() >= deadline {
                let stale = warning(format!(
                    "the search index has not caught up with change {target} yet; results may miss the latest writes"
                ));
                return Ok((index.search(tenant, query, cursor).await?, Some(stale)));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(10));
        }
    }
}

/// The search a patient-scoped caller may run instead of `scope`: the same search inside its
/// patient's compartment. Types outside the Patient compartment, and other compartments, are
/// refused.
fn patient_compartment_scope(scope: &SearchScope, patient: &str) -> FhirResult<SearchScope> {
    use fhirmesh_fhir::search::compartments::compartment_params;
    let patient_type =
        ResourceType::parse("Patient").ok_or_else(|| FhirError::internal("Patient is a resource type"))?;
    let refuse = |what: String| {
        FhirError::new(
            crate::error::ErrorCategory::Forbidden,
            format!("{what}: the access token is limited to one patient's compartment"),
        )
    };
    match scope {
        SearchScope::Type(t) if *t == patient_type || !compartment_params(patient_type, *t).is_empty() => {
            Ok(SearchScope::Compartment { compartment: patient_type, id: patient.to_owned(), member: Some(*t) })
        }
        SearchScope::Type(t) => Err(refuse(format!("{t} is not in the Patient compartment"))),
        SearchScope::System => {
            Ok(SearchScope::Compartment { compartment: patient_type, id: patient.to_owned(), member: None })
        }
        SearchScope::Compartment { compartment, id, .. } if *compartment == patient_type && id == patient => {
            Ok(scope.clone())
        }
        SearchScope::Compartment { compartment, .. } => {
            Err(refuse(format!("a search in another {compartment} compartment")))
        }
    }
}

/// The search parameters that limit a search to what fine-grained scopes grant: one set of
/// parameters is added as is (AND); several sets of one and the same parameter become one
/// parameter with the values ORed (`category=a,b`). Other combinations cannot be expressed as one
/// FHIR search and are refused.
fn filter_params(alternatives: &[Vec<(String, String)>]) -> FhirResult<Vec<(String, String)>> {
    match alternatives {
        [only] => Ok(only.clone()),
        [first, ..] if alternatives.iter().all(|a| a.len() == 1 && first.len() == 1 && a[0].0 == first[0].0) => {
            // A comma inside one value is escaped (R4 search, "Escaping Search Parameters").
            let values: Vec<String> = alternatives.iter().map(|a| a[0].1.replace(',', "\\,")).collect();
            Ok(vec![(first[0].0.clone(), values.join(","))])
        }
        _ => Err(FhirError::new(
            crate::error::ErrorCategory::Forbidden,
            "the access token's fine-grained scopes for this type cannot be combined into one search; \
             search with one of them at a time",
        )),
    }
}

/// A chain (`subject:Patient.name=…`) or `_has` filters by another type's data: the caller must be
/// allowed to search that type too, or the filter would answer questions about data it may not see.
/// (A partial grant on the linked type is enough; the filter is not narrowed by it.)
fn linked_types_allowed(ctx: &RequestContext, criteria: &[Criterion]) -> FhirResult<()> {
    let chain_allowed = |chain: &[fhirmesh_fhir::search::query::ChainLink]| -> FhirResult<()> {
        for link in chain {
            for target in &link.targets {
                super::authorize_reach(ctx, Interaction::SearchType, Some(*target))?;
            }
        }
        Ok(())
    };
    for criterion in criteria {
        match criterion {
            Criterion::Match(m) => chain_allowed(&m.chain)?,
            Criterion::Missing { chain, .. } => chain_allowed(chain)?,
            Criterion::Has(has) => {
                super::authorize_reach(ctx, Interaction::SearchType, Some(has.resource_type))?;
                linked_types_allowed(ctx, std::slice::from_ref(&*has.criterion))?;
            }
            Criterion::AnyOf(inner) => linked_types_allowed(ctx, inner)?,
        }
    }
    Ok(())
}
