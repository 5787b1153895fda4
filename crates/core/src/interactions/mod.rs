//! The FHIR interactions, one module each, implemented by [`FhirResources`] over a
//! [`ResourceStore`](crate::ports::ResourceStore).

mod body;
mod bundle;
mod conditional;
mod create;
mod delete;
mod history;
mod limits;
mod patch;
mod read;
mod search;
mod update;
mod validate;
mod vread;
mod write;

use std::sync::Arc;

use async_trait::async_trait;
use fhirmesh_fhir::{LogicalId, ResourceType};

use crate::auth::{Interaction, Permit};
use crate::error::{ErrorCategory, FhirError, FhirResult};
use crate::model::ResourceVersion;
use crate::ports::{DynChangeLog, DynResourceStore, DynSearchIndex, DynWriteRules};
use crate::service::{
    BundleRequest, BundleResult, ConditionalDeleteRequest, ConditionalDeleteResult, ConditionalUpdateRequest,
    CreateRequest, DeleteRequest, DeleteResult, HistoryPage, HistoryRequest, IndexStatus, PatchRequest, RequestContext,
    ResourceService, SearchPage, SearchRequest, UpdateRequest, ValidateRequest, WriteResult,
};

/// Behaviour switches of the resource service.
#[derive(Debug, Clone)]
pub struct ResourceConfig {
    /// PUT to an id that does not exist creates it (FHIR "update as create").
    pub update_create: bool,
    /// History/search page size when `_count` is absent.
    pub default_page_size: usize,
    /// Largest page a client may ask for with `_count`.
    pub max_page_size: usize,
    /// How often an unconditional write re-reads and retries after losing a version race.
    pub max_write_retries: usize,
    /// Search page size when `_count` is absent.
    pub default_search_count: usize,
    /// How long a search waits for the index to catch up with the caller's writes.
    pub consistency_wait: std::time::Duration,
    /// A conditional delete matching several resources deletes them all (up to
    /// `max_page_size`) instead of answering 412.
    pub conditional_delete_multiple: bool,
    /// Most entries a transaction or batch Bundle may have (more: 413, nothing written).
    pub max_bundle_entries: usize,
    /// Type-specific rules every write must pass after schema validation, with their per-tenant
    /// limits (e.g. Subscriptions, from `fhirmesh-notify`); `None`: schema validation only.
    pub write_rules: Option<DynWriteRules>,
}

impl Default for ResourceConfig {
    fn default() -> Self {
        ResourceConfig {
            update_create: true,
            default_page_size: 50,
            max_page_size: 1000,
            max_write_retries: 16,
            default_search_count: 20,
            consistency_wait: std::time::Duration::from_secs(1),
            conditional_delete_multiple: false,
            max_bundle_entries: 10_000,
            write_rules: None,
        }
    }
}

/// The resource service: FHIR interactions over a versioned store.
#[derive(Clone)]
pub struct FhirResources {
    store: DynResourceStore,
    /// The search index and the change log its watermark is compared with; `None` disables search
    /// and conditional operations.
    index: Option<DynSearchIndex>,
    changes: Option<DynChangeLog>,
    config: Arc<ResourceConfig>,
}

impl FhirResources {
    pub fn new(store: DynResourceStore, config: ResourceConfig) -> Self {
        FhirResources { store, index: None, changes: None, config: Arc::new(config) }
    }

    /// Enables search (and conditional operations) on `index`, whose watermark follows `changes`.
    pub fn with_search(mut self, index: DynSearchIndex, changes: DynChangeLog) -> Self {
        self.index = Some(index);
        self.changes = Some(changes);
        self
    }

    pub fn config(&self) -> &ResourceConfig {
        &self.config
    }
}

/// How much of a type a granted interaction reaches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reach {
    /// Every resource of the type.
    All,
    /// Only resources in this Patient's compartment (SMART `patient/` scopes).
    Patient(String),
    /// Only resources matching one of these sets of search parameters (SMART v2 fine-grained
    /// scopes such as `user/Observation.rs?category=laboratory`), within a patient's compartment
    /// when `patient` is set.
    Filtered { alternatives: Vec<Vec<(String, String)>>, patient: Option<String> },
}

impl Reach {
    /// Whether `version` (a live version with a body, or a tombstone) is within reach. A tombstone
    /// has no body to place it in a compartment: only `All` reaches it.
    pub(crate) fn covers(&self, version: &ResourceVersion) -> bool {
        match self {
            Reach::All => true,
            _ => version
                .body
                .as_deref()
                .and_then(|body| serde_json::from_slice::<serde_json::Value>(body).ok())
                .is_some_and(|resource| self.covers_json(version.resource_type, &resource)),
        }
    }

    /// A write by a caller with this reach: the current version (when live) and the new resource
    /// (when there is one) must both be within it — nothing is changed from outside, or moved out.
    pub(crate) fn check_write(
        &self,
        resource_type: ResourceType,
        id: &LogicalId,
        current: Option<&ResourceVersion>,
        new: Option<&serde_json::Value>,
    ) -> FhirResult<()> {
        if *self == Reach::All {
            return Ok(());
        }
        if current.filter(|c| !c.is_deleted()).is_some_and(|c| !self.covers(c)) {
            return Err(out_of_reach(resource_type, id));
        }
        if new.is_some_and(|resource| !self.covers_json(resource_type, resource)) {
            return Err(outside_reach(resource_type));
        }
        Ok(())
    }

    /// Whether the resource JSON `resource` of `resource_type` is within reach.
    pub(crate) fn covers_json(&self, resource_type: ResourceType, resource: &serde_json::Value) -> bool {
        match self {
            Reach::All => true,
            Reach::Patient(patient) => in_patient_compartment(resource_type, resource, patient),
            Reach::Filtered { alternatives, patient } => {
                patient.as_deref().is_none_or(|patient| in_patient_compartment(resource_type, resource, patient))
                    && alternatives.iter().any(|params| matches_params(resource_type, resource, params))
            }
        }
    }
}

/// Whether `resource` matches every one of `params`, with the same semantics as a search.
fn matches_params(resource_type: ResourceType, resource: &serde_json::Value, params: &[(String, String)]) -> bool {
    use fhirmesh_fhir::search::evaluate::{Doc, matches};
    use fhirmesh_fhir::search::parse::{ParseOptions, parse_search};
    use fhirmesh_fhir::search::query::SearchScope;
    let options = ParseOptions { strict: true, default_count: 1, max_count: 1 };
    let Ok(query) = parse_search(&SearchScope::Type(resource_type), params, &options) else { return false };
    let id = resource.get("id").and_then(serde_json::Value::as_str).unwrap_or_default().to_owned();
    let doc = Doc { resource_type, id, entries: fhirmesh_fhir::search::extract::extract(resource) };
    let now = time::OffsetDateTime::now_utc();
    query.criteria.iter().all(|criterion| matches(criterion, &doc, std::slice::from_ref(&doc), now))
}

/// Is `resource` in Patient `patient`'s compartment (R4 CompartmentDefinition `patient`): the
/// Patient itself, or a resource whose compartment parameters reference `Patient/{patient}`? A
/// Binary, in no compartment, counts as in it when its `securityContext` (the resource standing
/// in for its sensitivity) is that Patient; other proxies are resolved by
/// [`covers_through_security_context`].
pub(crate) fn in_patient_compartment(resource_type: ResourceType, resource: &serde_json::Value, patient: &str) -> bool {
    use fhirmesh_fhir::search::compartments::compartment_params;
    use fhirmesh_fhir::search::extract::extract_param;
    use fhirmesh_fhir::search::{IndexValue, registry};
    if resource_type.as_str() == "Binary" {
        return security_context(resource).is_some_and(|(kind, id)| kind == "Patient" && id == patient);
    }
    let patient_type = ResourceType::parse("Patient");
    if Some(resource_type) == patient_type && resource.get("id").and_then(serde_json::Value::as_str) == Some(patient) {
        return true;
    }
    let Some(patient_type) = patient_type else { return false };
    compartment_params(patient_type, resource_type)
        .iter()
        .filter_map(|code| registry().get(resource_type, code))
        .flat_map(|def| extract_param(resource, def))
        .any(|value| {
            matches!(value, IndexValue::Reference { target_type: Some(t), id: Some(id), .. }
                if t == patient_type && id == patient)
        })
}

/// The `Type/id` a Binary's `securityContext` references (relative, or the last two segments of
/// an absolute URL).
fn security_context(resource: &serde_json::Value) -> Option<(String, String)> {
    let reference = resource.get("securityContext")?.get("reference")?.as_str()?;
    let reference = reference.split(['?', '#']).next().unwrap_or_default();
    let mut segments = reference.rsplit('/');
    let id = segments.next()?;
    let kind = segments.next()?;
    (!id.is_empty() && ResourceType::parse(kind).is_some()).then(|| (kind.to_owned(), id.to_owned()))
}

/// Whether a Binary a patient-limited `reach` does not cover directly is within it through its
/// `securityContext`: the referenced resource (read from the store, current version) is in the
/// patient's compartment (R4 Binary.securityContext: access to the Binary follows the resource
/// that stands in for it). Only for reads of one Binary (read, vread).
pub(crate) async fn covers_through_security_context(
    svc: &FhirResources,
    ctx: &RequestContext,
    reach: &Reach,
    version: &ResourceVersion,
) -> FhirResult<bool> {
    if reach.covers(version) {
        return Ok(true);
    }
    if !matches!(reach, Reach::Patient(_)) || version.resource_type.as_str() != "Binary" {
        return Ok(false);
    }
    let proxy = version
        .body
        .as_deref()
        .and_then(|body| serde_json::from_slice::<serde_json::Value>(body).ok())
        .and_then(|resource| security_context(&resource));
    let Some((kind, id)) = proxy else { return Ok(false) };
    let (Some(kind), Ok(id)) = (ResourceType::parse(&kind), LogicalId::parse(&id)) else { return Ok(false) };
    if kind.as_str() == "Binary" {
        return Ok(false);
    }
    let Some(proxy) = svc.store.read(&ctx.tenant, kind, &id).await? else { return Ok(false) };
    Ok(!proxy.is_deleted() && reach.covers(&proxy))
}

/// Checks that the caller may perform `interaction` on `resource_type` (`None`: system level) and
/// says how far the grant reaches. A refusal never says whether the resource exists.
pub(crate) fn authorize_reach(
    ctx: &RequestContext,
    interaction: Interaction,
    resource_type: Option<ResourceType>,
) -> FhirResult<Reach> {
    Ok(match ctx.access.check(interaction, resource_type)? {
        Permit::All => Reach::All,
        Permit::PatientCompartment { patient } => Reach::Patient(patient),
        Permit::Filtered { alternatives, patient } => Reach::Filtered { alternatives, patient },
    })
}

/// [`authorize_reach`] for interactions that cannot be limited to part of a type (yet): anything
/// short of the whole type is refused with a 403 that says so.
pub(crate) fn authorize(
    ctx: &RequestContext,
    interaction: Interaction,
    resource_type: Option<ResourceType>,
) -> FhirResult<()> {
    match authorize_reach(ctx, interaction, resource_type)? {
        Reach::All => Ok(()),
        Reach::Patient(_) | Reach::Filtered { .. } => Err(FhirError::new(
            ErrorCategory::Forbidden,
            format!(
                "{interaction} on {} is granted only for part of the data (a patient's compartment or a \
                 fine-grained scope), which this interaction cannot be limited to",
                resource_type.map_or("the system", |t| t.as_str())
            ),
        )),
    }
}

/// The error for a resource outside the caller's reach: the same as for a missing one.
pub(crate) fn out_of_reach(resource_type: ResourceType, id: &LogicalId) -> FhirError {
    read::not_found(resource_type, id)
}

/// A caller with a partial grant wrote a resource that would be outside it.
pub(crate) fn outside_reach(resource_type: ResourceType) -> FhirError {
    FhirError::new(
        ErrorCategory::Forbidden,
        format!(
            "this {resource_type} would be outside what the access token is limited to (a patient's compartment or a fine-grained scope)"
        ),
    )
}

#[async_trait]
impl ResourceService for FhirResources {
    async fn create(&self, ctx: &RequestContext, request: CreateRequest) -> FhirResult<WriteResult> {
        create::create(self, ctx, request).await
    }

    async fn read(
        &self,
        ctx: &RequestContext,
        resource_type: ResourceType,
        id: LogicalId,
    ) -> FhirResult<ResourceVersion> {
        read::read(self, ctx, resource_type, id).await
    }

    async fn vread(
        &self,
        ctx: &RequestContext,
        resource_type: ResourceType,
        id: LogicalId,
        version_id: u64,
    ) -> FhirResult<ResourceVersion> {
        vread::vread(self, ctx, resource_type, id, version_id).await
    }

    async fn update(&self, ctx: &RequestContext, request: UpdateRequest) -> FhirResult<WriteResult> {
        update::update(self, ctx, request).await
    }

    async fn patch(&self, ctx: &RequestContext, request: PatchRequest) -> FhirResult<WriteResult> {
        patch::patch(self, ctx, request).await
    }

    async fn validate(
        &self,
        ctx: &RequestContext,
        request: ValidateRequest,
    ) -> FhirResult<Vec<fhirmesh_fhir::outcome::Issue>> {
        validate::validate(self, ctx, request).await
    }

    async fn delete(&self, ctx: &RequestContext, request: DeleteRequest) -> FhirResult<DeleteResult> {
        delete::delete(self, ctx, request).await
    }

    async fn bundle(&self, ctx: &RequestContext, request: BundleRequest) -> FhirResult<BundleResult> {
        bundle::bundle(self, ctx, request).await
    }

    async fn conditional_update(
        &self,
        ctx: &RequestContext,
        request: ConditionalUpdateRequest,
    ) -> FhirResult<WriteResult> {
        conditional::update(self, ctx, request).await
    }

    async fn conditional_delete(
        &self,
        ctx: &RequestContext,
        request: ConditionalDeleteRequest,
    ) -> FhirResult<ConditionalDeleteResult> {
        conditional::delete(self, ctx, request).await
    }

    async fn history(&self, ctx: &RequestContext, request: HistoryRequest) -> FhirResult<HistoryPage> {
        history::history(self, ctx, request).await
    }

    async fn search(&self, ctx: &RequestContext, request: SearchRequest) -> FhirResult<SearchPage> {
        search::search(self, ctx, request).await
    }

    async fn index_status(&self) -> FhirResult<IndexStatus> {
        let (Some(index), Some(changes)) = (&self.index, &self.changes) else {
            return Err(FhirError::unsupported("search is not enabled on this resource service"));
        };
        Ok(IndexStatus { latest_sequence: changes.latest_sequence().await?, watermark: index.watermark().await? })
    }
}
