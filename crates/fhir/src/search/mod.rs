//! FHIR search knowledge, backend-neutral: the base SearchParameter registry ([`params`]), the
//! values extracted from resources for indexing ([`values`], [`extract`]), and the parsed query
//! ([`query`], [`parse`]). Backends (SQLite, OpenSearch) compile a [`query::SearchQuery`] into their
//! own query language; nothing here knows about any backend.

pub mod compartments;
pub mod criteria;
pub mod evaluate;
pub mod extract;
pub mod params;
pub mod parse;
pub mod query;
pub mod values;

pub use params::{ParamType, SearchParamDef, registry};
pub use query::SearchQuery;
pub use values::{IndexEntry, IndexValue};
