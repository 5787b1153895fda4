//! gRPC contracts and the thin adapters between them and the core service traits.
//!
//! What it is:
//! - [`pb`]: the code generated at build time from `proto/fhirmesh/v1/*.proto` (messages, tonic
//!   clients and servers), compiled with a vendored `protoc`.
//! - [`GrpcResourceAdapter`] / [`resource_service_server`]: serve any
//!   [`fhirmesh_core::ResourceService`] over gRPC.
//! - [`GrpcResourceClient`]: a [`fhirmesh_core::ResourceService`] that calls a remote one over gRPC,
//!   so the gateway cannot tell an in-process service from a remote one.
//! - [`GrpcExportAdapter`] / [`GrpcExportClient`]: the same pair for the Bulk Data
//!   [`fhirmesh_core::export::ExportService`] (the exporter and the mesh gateway).
//! - Conversions of the [`fhirmesh_core::ResourceChanged`] event to and from its protobuf envelope
//!   ([`encode_resource_changed`], [`decode_resource_changed`]), for the buses that carry bytes.
//!
//! What it is not: domain logic. Adapters only convert; every decision stays in `fhirmesh-core`.
//!
//! How things travel:
//! - The request context (tenant, request id, traceparent) is field 1 of every request message.
//! - Errors are gRPC statuses: code from [`fhirmesh_core::ErrorCategory::grpc_code`], message the
//!   first issue's diagnostics, ASCII metadata [`CATEGORY_METADATA_KEY`] with the category name and
//!   binary metadata [`OUTCOME_METADATA_KEY`] with the OperationOutcome JSON, so a `FhirError`
//!   arrives with its category (`not-found` vs `gone`) and issues (expressions) intact.
//! - A Bundle's per-entry errors are data, not statuses: each travels inside the response as an
//!   `ErrorOutcome` (the same category name and OperationOutcome JSON, unclipped). A Bundle that
//!   fails as a whole is a status like any other failed RPC.
//! - Malformed wire input is rejected as [`fhirmesh_core::ErrorCategory::Invalid`] by the server;
//!   a malformed response is an [`fhirmesh_core::ErrorCategory::Internal`] error for the client.
//!   Nothing here panics on wire data.

mod binary;
mod blob_stream;
mod client;
mod convert;
mod events;
mod export;
mod server;
mod status;

#[cfg(test)]
mod tests;

/// Code generated from `proto/fhirmesh/v1/*.proto` (package `fhirmesh.v1`).
#[allow(clippy::all, clippy::pedantic, missing_docs, unreachable_pub)]
pub mod pb {
    tonic::include_proto!("fhirmesh.v1");
}

pub use binary::{GrpcBinaryAdapter, GrpcBinaryClient, binary_service_server};
pub use client::{CallPolicy, GrpcResourceClient};
pub use convert::WireError;
pub use events::{decode_resource_changed, encode_resource_changed};
pub use export::{GrpcExportAdapter, GrpcExportClient, export_service_server};
pub use server::{GrpcResourceAdapter, resource_service_server, resource_service_server_with_limit};
pub use status::{CATEGORY_METADATA_KEY, OUTCOME_METADATA_KEY, fhir_error_to_status, status_to_fhir_error};

/// Default cap on one gRPC message, both directions: 64 MiB (large bundles and history pages).
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 64 * 1024 * 1024;
