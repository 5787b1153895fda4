//! The fhirmesh domain.
//!
//! What it is: the FHIR interactions (one module each), the [`ResourceService`] contract they
//! implement, the port traits adapters implement ([`ports`]), the change event envelope and the one
//! error model. What it is not: HTTP, gRPC, SQL or any SDK — those live in adapters and services,
//! and depend on this crate, never the other way round.

pub mod auth;
pub mod blob;
pub mod error;
pub mod events;
pub mod export;
pub mod model;
pub mod ports;
pub mod service;
pub mod trace;

pub use error::{ErrorCategory, FhirError, FhirResult};
pub use events::ResourceChanged;
pub use model::{Operation, ResourceVersion, TenantId};
pub use service::{DynResourceService, RequestContext, ResourceService};
pub mod binary;
pub mod capabilities;
pub mod interactions;

pub use interactions::{FhirResources, ResourceConfig};
pub mod indexer;
pub mod relay;
#[cfg(feature = "testing")]
pub mod search_oracle;
