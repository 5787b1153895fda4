//! The FHIR interactions, one module each, implemented by [`FhirResources`] over a
//! [`ResourceStore`](crate::ports::ResourceStore).

mod body;
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

use crate::error::FhirResult;
use crate::model::ResourceVersion;
use crate::ports::DynResourceStore;
use crate::service::{
    CreateRequest, DeleteRequest, DeleteResult, HistoryPage, HistoryRequest, PatchRequest, RequestContext,
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
}

impl Default for ResourceConfig {
    fn default() -> Self {
        ResourceConfig { update_create: true, default_page_size: 50, max_page_size: 1000, max_write_retries: 16 }
    }
}

/// The resource service: FHIR interactions over a versioned store.
#[derive(Clone)]
pub struct FhirResources {
    store: DynResourceStore,
    config: Arc<ResourceConfig>,
}

impl FhirResources {
    pub fn new(store: DynResourceStore, config: ResourceConfig) -> Self {
        FhirResources { store, config: Arc::new(config) }
    }

    pub fn config(&self) -> &ResourceConfig {
        &self.config
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

    async fn history(&self, ctx: &RequestContext, request: HistoryRequest) -> FhirResult<HistoryPage> {
        history::history(self, ctx, request).await
    }

    async fn search(&self, ctx: &RequestContext, request: SearchRequest) -> FhirResult<SearchPage> {
        search::search(self, ctx, request).await
    }
}
