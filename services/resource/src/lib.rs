//! The resource service as a composition root: opens the store adapter, builds the core
//! interactions over it, and serves them over gRPC. No domain logic lives here.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use fhirmesh_core::blob::DynBlobStore;
use fhirmesh_core::ports::{DynChangeLog, DynResourceStore, DynSearchIndex};
use fhirmesh_core::{DynResourceService, FhirResources, ResourceConfig};
use fhirmesh_store_dynamodb::{DynamoConfig, DynamoStore};
use fhirmesh_store_sqlite::{SqliteConfig, SqliteSearchConfig, SqliteSearchIndex, SqliteStore};
use tokio::net::TcpListener;

/// File name of the embedded database inside the data directory.
pub const DATABASE_FILE: &str = "fhirmesh.db";

/// Opens (creating if needed) the embedded SQLite store under `data_dir`.
pub fn open_sqlite_store(data_dir: &Path, durable: bool) -> anyhow::Result<Arc<SqliteStore>> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create the data directory {}", data_dir.display()))?;
    let mut config = SqliteConfig::new(data_dir.join(DATABASE_FILE));
    config.synchronous_full = durable;
    let store = SqliteStore::open(config)
        .map_err(|err| anyhow::anyhow!("cannot open the store in {}: {err}", data_dir.display()))?;
    Ok(Arc::new(store))
}

/// File name of the embedded search index inside the data directory (separate from the store, so
/// a reindex can start from an empty file).
pub const SEARCH_INDEX_FILE: &str = "search.db";

/// Opens (creating if needed) the embedded SQLite search index under `data_dir`. It commits without
/// fsync: after a crash its watermark may step back, and the indexer re-applies from the change log.
pub fn open_sqlite_search_index(data_dir: &Path) -> anyhow::Result<Arc<SqliteSearchIndex>> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create the data directory {}", data_dir.display()))?;
    let config = SqliteSearchConfig::new(data_dir.join(SEARCH_INDEX_FILE));
    let index = SqliteSearchIndex::open(config)
        .map_err(|err| anyhow::anyhow!("cannot open the search index in {}: {err}", data_dir.display()))?;
    Ok(Arc::new(index))
}

/// Opens the DynamoDB store on `config.table` (bodies too large for an item in `blobs`), creating
/// the table first when `create_table`.
pub async fn open_dynamodb_store(
    client: aws_sdk_dynamodb::Client,
    config: DynamoConfig,
    blobs: Option<DynBlobStore>,
    create_table: bool,
) -> anyhow::Result<Arc<DynamoStore>> {
    if create_table {
        fhirmesh_store_dynamodb::provision(&client, &config.table)
            .await
            .map_err(|err| anyhow::anyhow!("cannot create the DynamoDB table {}: {err}", config.table))?;
    }
    Ok(Arc::new(match blobs {
        Some(blobs) => DynamoStore::with_blob_store(client, config, blobs),
        None => DynamoStore::new(client, config),
    }))
}

/// The resource service over a store and its change log, searching `index`.
pub fn resource_service(
    store: DynResourceStore,
    changes: DynChangeLog,
    index: DynSearchIndex,
    config: ResourceConfig,
) -> Arc<FhirResources> {
    Arc::new(FhirResources::new(store, config).with_search(index, changes))
}

/// Serves `service` as gRPC `fhirmesh.v1.ResourceService` on `listener` until `shutdown`, with the gRPC health
/// service and request metrics ([`fhirmesh_ops::grpc`]), over TLS with `tls`.
pub async fn serve_grpc(
    listener: TcpListener,
    service: DynResourceService,
    ops: &fhirmesh_ops::Ops,
    tls: Option<&fhirmesh_ops::grpc::GrpcTls>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let server = fhirmesh_proto::resource_service_server(service);
    let name = fhirmesh_ops::grpc::name_of(&server);
    fhirmesh_ops::grpc::serve(listener, tonic::service::Routes::new(server), &[name], ops, tls, shutdown)
        .await
        .context("resource gRPC server failed")
}
