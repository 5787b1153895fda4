//! The binary service (`fhirmesh serve --target binary`): the content of Binary resources
//! ([`fhirmesh_core::binary::Binaries`] on the blob store, S3 in the mesh) served over gRPC for
//! the gateways, which stream raw uploads to it and raw reads from it. It is stateless: any
//! number of replicas serve the same bucket.

use std::future::Future;

use anyhow::Context;
use fhirmesh_core::binary::DynBinaryService;
use tokio::net::TcpListener;

/// Serves `service` as gRPC `fhirmesh.v1.BinaryService` on `listener` until `shutdown`, with the gRPC health
/// service and request metrics ([`fhirmesh_ops::grpc`]), over TLS with `tls`.
pub async fn serve_grpc(
    listener: TcpListener,
    service: DynBinaryService,
    ops: &fhirmesh_ops::Ops,
    tls: Option<&fhirmesh_ops::grpc::GrpcTls>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let server = fhirmesh_proto::binary_service_server(service);
    let name = fhirmesh_ops::grpc::name_of(&server);
    fhirmesh_ops::grpc::serve(listener, tonic::service::Routes::new(server), &[name], ops, tls, shutdown)
        .await
        .context("binary gRPC server failed")
}
