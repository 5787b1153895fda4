//! The FHIR interactions, one module each, implemented by [`FhirResources`] over a
//! [`ResourceStore`](crate::ports::ResourceStore).

mod body;
mod bundle;
mod conditional;
mod create;
mod delete;
mod history;
mod patch;
mod read;
mod search;
mod update;
mod vread;
mod write;

use std::sync::Arc;

use async_trait::async_trait;
use fhirmesh_fhir::{LogicalId, ResourceType};

use crate::auth::{Interaction, Permit};
use crate::error::{ErrorCategory, FhirError, FhirResult};
use crate::model::ResourceVersion;
use crate::ports::{DynChangeLog, DynResourceStore, DynSearchIndex};
use crate::service::{
    BundleRequest, BundleResult, ConditionalDeleteRequest, ConditionalDeleteResult, ConditionalUpdateRequest,
    CreateRequest, DeleteRequest, DeleteResult, HistoryPage, HistoryRequest, IndexStatus, PatchRequest, RequestContext,
    ResourceService, SearchPage, SearchRequest, UpdateRequest, WriteResult,
};

/// Behaviour switches of the resource service.
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// Checks that the caller may perform `interaction` on `resource_type` (`None`: system level).
///
/// Grants that reach only part of a type — a SMART `patient/` scope (the patient's compartment) or
/// a v2 fine-grained scope (`?category=…`) — are refused for now with a 403 that says so: honouring
/// them needs compartment-filtered searches and membership checks on reads and writes, which are
/// not built yet. A refusal never says whether the resource exists.
pub(crate) fn authorize(
    ctx: &RequestContext,
    interaction: Interaction,
    resource_type: Option<ResourceType>,
) -> FhirResult<()> {
    match ctx.access.check(interaction, resource_type)? {
        Permit::All => Ok(()),
        Permit::PatientCompartment { .. } | Permit::Filtered { .. } => Err(FhirError::new(
            ErrorCategory::Forbidden,
            format!(
                "{interaction} on {} is granted only for part of the data (a patient compartment or a \
                 fine-grained scope), which this server does not enforce yet; ask for a user/ or system/ scope",
                resource_type.map_or("the system", |t| t.as_str())
            ),
        )),
    }
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
