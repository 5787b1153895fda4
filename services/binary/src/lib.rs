//! The binary service (`fhirmesh serve --target binary`): the content of Binary resources
//! ([`fhirmesh_core::binary::Binaries`] on the blob store, S3 in the mesh) served over gRPC for
//! the gateways, which stream raw uploads to it and raw reads from it. It is stateless: any
//! number of replicas serve the same bucket.

use std::future::Future;

use anyhow::Context;
use fhirmesh_core::binary::DynBinaryService;
use tokio::net::TcpListener;

/// Serves `service` as gRPC `fhirmesh.v1.BinaryService` on `listener` until `shutdown`.
pub async fn serve_grpc(
    listener: TcpListener,
    service: DynBinaryService,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    tonic::transport::Server::builder()
        .add_service(fhirmesh_proto::binary_service_server(service))
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), shutdown)
        .await
        .context("binary gRPC server failed")
}
