//! The resource store the configuration names, behind the ports: SQLite under the data directory
//! or DynamoDB (with the AWS SDK configured from `[aws]` and the standard AWS chain).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use fhirmesh_core::blob::DynBlobStore;
use fhirmesh_core::export::{DynExportSource, DynJobStore};
use fhirmesh_core::ports::{ChangeLog, DynChangeLog, DynResourceStore, DynSearchIndex, ResourceStore};
use fhirmesh_search_opensearch::{OpenSearchConfig, OpenSearchIndex};
use fhirmesh_store_dynamodb::{DynamoConfig, DynamoStore, StreamRelay, StreamRelayConfig};

use crate::config::{AwsConfig, BlobBackend, Config, SearchBackend, StorageBackend};

/// One store, seen through its ports.
#[derive(Clone)]
pub struct Stores {
    pub store: DynResourceStore,
    pub changes: DynChangeLog,
    /// The snapshot reads of Bulk Data export.
    pub export: Option<DynExportSource>,
}

impl Stores {
    fn of<S: ResourceStore + ChangeLog>(store: Arc<S>) -> Stores {
        Stores { store: store.clone(), changes: store, export: None }
    }
}

/// The AWS SDK configuration of `[aws]`, loaded once, on first use: every AWS adapter of a process
/// shares it (region and credential resolution may do I/O).
pub struct Aws {
    settings: AwsConfig,
    loaded: tokio::sync::OnceCell<aws_config::SdkConfig>,
}

impl Aws {
    pub fn new(settings: &AwsConfig) -> Aws {
        Aws { settings: settings.clone(), loaded: tokio::sync::OnceCell::new() }
    }

    pub async fn sdk(&self) -> &aws_config::SdkConfig {
        self.loaded.get_or_init(|| aws_sdk_config(&self.settings)).await
    }
}

/// Opens the configured search index. OpenSearch being down at start-up is not fatal: searches
/// answer 503 and the indexer retries until it is back.
pub async fn open_index(config: &Config) -> anyhow::Result<DynSearchIndex> {
    Ok(match config.search.backend {
        SearchBackend::Sqlite => fhirmesh_resource::open_sqlite_search_index(&config.storage.data_dir)?,
        SearchBackend::Opensearch => {
            let settings =
                OpenSearchConfig { url: config.opensearch.url.clone(), prefix: config.opensearch.prefix.clone() };
            Arc::new(
                OpenSearchIndex::connect(settings)
                    .await
                    .with_context(|| format!("cannot use OpenSearch at {}", config.opensearch.url))?,
            )
        }
    })
}

/// Opens the configured store.
pub async fn open(config: &Config, aws: &Aws) -> anyhow::Result<Stores> {
    match config.storage.backend {
        StorageBackend::Sqlite => {
            let store = fhirmesh_resource::open_sqlite_store(&config.storage.data_dir, config.storage.durable)?;
            let export: DynExportSource = store.clone();
            Ok(Stores { export: Some(export), ..Stores::of(store) })
        }
        StorageBackend::Dynamodb => {
            let sdk = aws.sdk().await;
            let dynamo = dynamo_config(config);
            // Resources too large for a DynamoDB item live in the blob store.
            let blobs = open_blobs(config, aws).await?;
            let store = fhirmesh_resource::open_dynamodb_store(
                aws_sdk_dynamodb::Client::new(sdk),
                dynamo,
                Some(blobs),
                config.dynamodb.create_table,
            )
            .await?;
            let export: DynExportSource = store.clone();
            Ok(Stores { export: Some(export), ..Stores::of(store) })
        }
    }
}

/// Opens the export job store of the configured store: `{data_dir}/jobs.db` beside SQLite, the
/// `export.job_table` DynamoDB table beside DynamoDB (created first when
/// `dynamodb.create_table`).
pub async fn open_jobs(config: &Config, aws: &Aws) -> anyhow::Result<DynJobStore> {
    match config.storage.backend {
        StorageBackend::Sqlite => {
            let path = config.storage.data_dir.join("jobs.db");
            let jobs = fhirmesh_store_sqlite::SqliteJobStore::open(&path)
                .map_err(|err| anyhow::anyhow!("cannot open the export job store {}: {err}", path.display()))?;
            Ok(Arc::new(jobs))
        }
        StorageBackend::Dynamodb => {
            let client = aws_sdk_dynamodb::Client::new(aws.sdk().await);
            let table = config.export_job_table();
            if config.dynamodb.create_table {
                fhirmesh_store_dynamodb::provision_jobs(&client, &table)
                    .await
                    .map_err(|err| anyhow::anyhow!("cannot create the export job table {table}: {err}"))?;
            }
            Ok(Arc::new(fhirmesh_store_dynamodb::DynamoJobStore::new(client, table)))
        }
    }
}

/// Opens the configured blob store: local files under `data_dir/blobs`, or the S3 bucket.
pub async fn open_blobs(config: &Config, aws: &Aws) -> anyhow::Result<DynBlobStore> {
    match config.blob.backend {
        BlobBackend::Local => {
            let root = config.storage.data_dir.join("blobs");
            let store = fhirmesh_blob::LocalBlobStore::open(&root)
                .await
                .map_err(|err| anyhow::anyhow!("cannot open the blob directory {}: {err}", root.display()))?;
            Ok(Arc::new(store))
        }
        BlobBackend::S3 => Ok(Arc::new(s3_blobs(config, aws).await?)),
    }
}

/// The S3 blob store of `[blob]` (bucket, key prefix).
pub async fn s3_blobs(config: &Config, aws: &Aws) -> anyhow::Result<fhirmesh_blob::S3BlobStore> {
    let options = fhirmesh_blob::S3Options { key_prefix: config.blob.key_prefix.clone(), ..Default::default() };
    fhirmesh_blob::S3BlobStore::new(aws_sdk_s3::Client::new(aws.sdk().await), &config.blob.bucket, options)
        .map_err(|err| anyhow::anyhow!("S3 bucket {}: {err}", config.blob.bucket))
}

/// The lease table of the Streams relay.
pub fn lease_table(config: &Config) -> String {
    config.relay.lease_table.clone().unwrap_or_else(|| format!("{}-leases", config.dynamodb.table))
}

/// The DynamoDB Streams relay of the configured table (creating its lease table first when
/// `dynamodb.create_table`).
pub async fn stream_relay(config: &Config, aws: &Aws) -> anyhow::Result<StreamRelay> {
    let sdk = aws.sdk().await;
    let dynamodb = aws_sdk_dynamodb::Client::new(sdk);
    let leases = lease_table(config);
    if config.dynamodb.create_table {
        fhirmesh_store_dynamodb::provision_leases(&dynamodb, &leases)
            .await
            .map_err(|err| anyhow::anyhow!("cannot create the lease table {leases}: {err}"))?;
    }
    let stream_arn = fhirmesh_store_dynamodb::stream_arn(&dynamodb, &config.dynamodb.table)
        .await
        .map_err(|err| anyhow::anyhow!("{err}"))
        .context("the Streams relay needs the table's stream")?;
    let worker_id = config.relay.worker_id.clone().unwrap_or_else(|| {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "relay".to_owned());
        format!("{host}-{}", std::process::id())
    });
    let relay_config = StreamRelayConfig::new(stream_arn, leases, worker_id);
    // The relay looks staged transactions up in the table; it never reads bodies.
    let table = DynamoStore::new(dynamodb, dynamo_config(config));
    Ok(StreamRelay::new(table, aws_sdk_dynamodbstreams::Client::new(sdk), relay_config))
}

/// The `[dynamodb]` section as the store's tunables.
fn dynamo_config(config: &Config) -> DynamoConfig {
    DynamoConfig {
        table: config.dynamodb.table.clone(),
        hole_timeout: Duration::from_millis(config.dynamodb.hole_timeout_ms),
        ..DynamoConfig::default()
    }
}

/// The AWS SDK configuration: `[aws]` overrides on top of the standard chain (environment,
/// profile, web identity, instance metadata).
async fn aws_sdk_config(aws: &AwsConfig) -> aws_config::SdkConfig {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if let Some(region) = &aws.region {
        loader = loader.region(aws_config::Region::new(region.clone()));
    }
    if let Some(endpoint) = &aws.endpoint_url {
        loader = loader.endpoint_url(endpoint);
    }
    loader.load().await
}
