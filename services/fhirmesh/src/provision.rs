//! `fhirmesh provision`: creates what the configured backends need, idempotently, and says what
//! it found or made. The permissions it needs (broader than the services') are in docs/iam.md.

use anyhow::Context;

use crate::config::{BlobBackend, BusBackend, Config, StorageBackend};

pub fn run(config: &Config) -> anyhow::Result<()> {
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the runtime")?;
    runtime.block_on(async {
        for line in provision(config).await? {
            println!("fhirmesh: {line}");
        }
        Ok(())
    })
}

/// Provisions every configured backend; returns one line per thing checked or created.
pub async fn provision(config: &Config) -> anyhow::Result<Vec<String>> {
    let mut done = Vec::new();
    let aws = crate::stores::Aws::new(&config.aws);

    if config.storage.backend == StorageBackend::Dynamodb {
        let client = aws_sdk_dynamodb::Client::new(aws.sdk().await);
        let table = &config.dynamodb.table;
        let provisioned = fhirmesh_store_dynamodb::provision(&client, table)
            .await
            .map_err(|err| anyhow::anyhow!("DynamoDB table {table}: {err}"))?;
        done.push(format!(
            "DynamoDB table {table}: {} (stream {})",
            if provisioned.created { "created" } else { "exists" },
            provisioned.stream_arn.as_deref().unwrap_or("MISSING")
        ));
        let leases = crate::stores::lease_table(config);
        let created = fhirmesh_store_dynamodb::provision_leases(&client, &leases)
            .await
            .map_err(|err| anyhow::anyhow!("DynamoDB lease table {leases}: {err}"))?;
        done.push(format!(
            "DynamoDB lease table {leases} (Streams relay): {}",
            if created { "created" } else { "exists" }
        ));
        let jobs = config.export_job_table();
        let created = fhirmesh_store_dynamodb::provision_jobs(&client, &jobs)
            .await
            .map_err(|err| anyhow::anyhow!("DynamoDB export job table {jobs}: {err}"))?;
        done.push(format!("DynamoDB export job table {jobs}: {}", if created { "created" } else { "exists" }));
    } else {
        done.push(format!("resources: SQLite under {}", config.storage.data_dir.display()));
    }

    match crate::buses::open(config, &aws).await? {
        Some(bus) => {
            bus.provision().await?;
            done.push(match config.bus.backend {
                BusBackend::Nats => {
                    format!("NATS streams {} and {}: ready", config.nats.stream, config.nats.dead_letter_stream)
                }
                _ => format!(
                    "SNS topic {} and SQS queues {} (+ dead-letter queues): ready",
                    config.sns_sqs.topic_name,
                    crate::buses::CONSUMERS
                        .iter()
                        .map(|c| format!("{}-{c}", config.sns_sqs.queue_prefix))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
        None => done.push("event bus: in-process (nothing to create)".into()),
    }

    if config.blob.backend == BlobBackend::S3 {
        let store = crate::stores::s3_blobs(config, &aws).await?;
        store.provision().await.map_err(|err| anyhow::anyhow!("S3 bucket {}: {err}", config.blob.bucket))?;
        done.push(format!("S3 bucket {}: ready", config.blob.bucket));
    } else {
        done.push("blobs: local files".into());
    }
    Ok(done)
}
