//! The exporter service (`fhirmesh serve --target exporter`): the Bulk Data export API
//! ([`fhirmesh_core::export::Exports`]) served over gRPC for the gateways, and the chunk workers
//! ([`fhirmesh_core::export::ExportWorker`]) beside it. Any number of exporters share one job
//! store (DynamoDB in the mesh): each kick-off is stored there, every exporter's workers lease
//! its chunks, and any exporter answers status and downloads.

use std::future::Future;

use anyhow::Context;
use fhirmesh_core::export::DynExportService;
use tokio::net::TcpListener;

/// Serves `service` as gRPC `fhirmesh.v1.ExportService` on `listener` until `shutdown`, with the gRPC health
/// service and request metrics ([`fhirmesh_ops::grpc`]), over TLS with `tls`.
pub async fn serve_grpc(
    listener: TcpListener,
    service: DynExportService,
    ops: &fhirmesh_ops::Ops,
    tls: Option<&fhirmesh_ops::grpc::GrpcTls>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let server = fhirmesh_proto::export_service_server(service);
    let name = fhirmesh_ops::grpc::name_of(&server);
    fhirmesh_ops::grpc::serve(listener, tonic::service::Routes::new(server), &[name], ops, tls, shutdown)
        .await
        .context("export gRPC server failed")
}
