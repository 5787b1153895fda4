//! The exporter service (`fhirmesh serve --target exporter`): the Bulk Data export API
//! ([`fhirmesh_core::export::Exports`]) served over gRPC for the gateways, and the chunk workers
//! ([`fhirmesh_core::export::ExportWorker`]) beside it. Any number of exporters share one job
//! store (DynamoDB in the mesh): each kick-off is stored there, every exporter's workers lease
//! its chunks, and any exporter answers status and downloads.

use std::future::Future;

use anyhow::Context;
use fhirmesh_core::export::DynExportService;
use tokio::net::TcpListener;

/// Serves `service` as gRPC `fhirmesh.v1.ExportService` on `listener` until `shutdown`.
pub async fn serve_grpc(
    listener: TcpListener,
    service: DynExportService,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    tonic::transport::Server::builder()
        .add_service(fhirmesh_proto::export_service_server(service))
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), shutdown)
        .await
        .context("export gRPC server failed")
}
