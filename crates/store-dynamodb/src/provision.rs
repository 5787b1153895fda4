//! Creates the table the store needs, idempotently (`fhirmesh provision`, and tests).

use std::time::Duration;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::operation::create_table::builders::CreateTableFluentBuilder;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, GlobalSecondaryIndex, KeySchemaElement, KeyType, Projection, ProjectionType,
    ScalarAttributeType, StreamSpecification, StreamViewType, TableDescription, TableStatus,
};
use fhirmesh_core::ports::StoreError;

use crate::error::{build_error, sdk_error};
use crate::items::{BY_TENANT, BY_TYPE, PK, SK};

/// What [`provision`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provisioned {
    /// Whether the table was created by this call (false: it existed).
    pub created: bool,
    /// The ARN of the table's stream, read by the relay.
    pub stream_arn: Option<String>,
}

pub(crate) fn attribute(name: &str, kind: ScalarAttributeType) -> Result<AttributeDefinition, StoreError> {
    AttributeDefinition::builder().attribute_name(name).attribute_type(kind).build().map_err(build_error)
}

pub(crate) fn key_element(name: &str, kind: KeyType) -> Result<KeySchemaElement, StoreError> {
    KeySchemaElement::builder().attribute_name(name).key_type(kind).build().map_err(build_error)
}

fn keys_only_index(name: &str, partition: &str) -> Result<GlobalSecondaryIndex, StoreError> {
    GlobalSecondaryIndex::builder()
        .index_name(name)
        .key_schema(key_element(partition, KeyType::Hash)?)
        .key_schema(key_element("seq", KeyType::Range)?)
        .projection(Projection::builder().projection_type(ProjectionType::KeysOnly).build())
        .build()
        .map_err(build_error)
}

/// Creates `table` (on-demand billing, stream with new images, the two history indexes) unless it
/// exists, then waits until it is active.
pub async fn provision(client: &Client, table: &str) -> Result<Provisioned, StoreError> {
    let create = client
        .create_table()
        .table_name(table)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(attribute(PK, ScalarAttributeType::S)?)
        .attribute_definitions(attribute(SK, ScalarAttributeType::S)?)
        .attribute_definitions(attribute("tpk", ScalarAttributeType::S)?)
        .attribute_definitions(attribute("spk", ScalarAttributeType::S)?)
        .attribute_definitions(attribute("seq", ScalarAttributeType::N)?)
        .key_schema(key_element(PK, KeyType::Hash)?)
        .key_schema(key_element(SK, KeyType::Range)?)
        .global_secondary_indexes(keys_only_index(BY_TYPE, "tpk")?)
        .global_secondary_indexes(keys_only_index(BY_TENANT, "spk")?)
        .stream_specification(
            StreamSpecification::builder()
                .stream_enabled(true)
                .stream_view_type(StreamViewType::NewImage)
                .build()
                .map_err(build_error)?,
        );
    let (created, description) = create_and_await(client, create, table, "table").await?;
    let stream_arn = description.latest_stream_arn().map(str::to_owned);
    if stream_arn.is_none() {
        tracing::warn!(%table, "the table has no stream: the DynamoDB Streams relay cannot follow it");
    }
    Ok(Provisioned { created, stream_arn })
}

/// Creates the export job table `table` (`pk` S + `sk` S, on-demand billing, no index, no stream;
/// see [`crate::DynamoJobStore`]) unless it exists, then waits (at most 60 s) until it is active.
/// Returns whether this call created it.
pub async fn provision_jobs(client: &Client, table: &str) -> Result<bool, StoreError> {
    let create = client
        .create_table()
        .table_name(table)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(attribute(PK, ScalarAttributeType::S)?)
        .attribute_definitions(attribute(SK, ScalarAttributeType::S)?)
        .key_schema(key_element(PK, KeyType::Hash)?)
        .key_schema(key_element(SK, KeyType::Range)?);
    Ok(create_and_await(client, create, table, "export job table").await?.0)
}

/// Sends `create` (a CreateTable of `table`) unless the table exists, then waits (at most 60 s)
/// until it is active. Whether this call created it, and its description. `what` names the table
/// in errors.
pub(crate) async fn create_and_await(
    client: &Client,
    create: CreateTableFluentBuilder,
    table: &str,
    what: &str,
) -> Result<(bool, TableDescription), StoreError> {
    let created = match create.send().await {
        Ok(_) => true,
        Err(err) if err.as_service_error().is_some_and(|e| e.is_resource_in_use_exception()) => false,
        Err(err) => return Err(sdk_error(&format!("create {what} {table}"), err)),
    };
    for _ in 0..120 {
        let described = client
            .describe_table()
            .table_name(table)
            .send()
            .await
            .map_err(|e| sdk_error(&format!("describe {what} {table}"), e))?;
        if let Some(description) = described.table()
            && description.table_status() == Some(&TableStatus::Active)
        {
            return Ok((created, description.clone()));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(StoreError::Unavailable(format!("{what} {table} did not become active within 60 s")))
}

/// The ARN of `table`'s stream, for the Streams relay.
pub async fn stream_arn(client: &Client, table: &str) -> Result<String, StoreError> {
    let described = client
        .describe_table()
        .table_name(table)
        .send()
        .await
        .map_err(|e| sdk_error(&format!("describe table {table}"), e))?;
    described.table().and_then(|t| t.latest_stream_arn()).map(str::to_owned).ok_or_else(|| {
        StoreError::Unavailable(format!(
            "table {table} has no stream: create it with `fhirmesh provision` (streams with new images)"
        ))
    })
}
