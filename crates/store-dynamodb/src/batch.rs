//! `BatchWriteItem` in rounds of 25, retrying what DynamoDB hands back unprocessed with back-off:
//! the bulk writes that need no atomicity (staged transaction versions, export chunk deletes).

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::{DeleteRequest, PutRequest, WriteRequest};
use fhirmesh_core::ports::StoreError;

use crate::commit::{MAX_ATTEMPTS, backoff};
use crate::error::{build_error, sdk_error};
use crate::items::Item;

/// What one `BatchWriteItem` takes.
const BATCH_WRITE_MAX: usize = 25;

/// Puts every item of `items` into `table`.
pub(crate) async fn put_all(client: &Client, table: &str, items: Vec<Item>, what: &str) -> Result<(), StoreError> {
    let requests = items
        .into_iter()
        .map(|item| {
            PutRequest::builder()
                .set_item(Some(item))
                .build()
                .map(|put| WriteRequest::builder().put_request(put).build())
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(build_error)?;
    write_all(client, table, requests, what).await
}

/// Deletes the items of `keys` from `table`.
pub(crate) async fn delete_all(client: &Client, table: &str, keys: Vec<Item>, what: &str) -> Result<(), StoreError> {
    let requests = keys
        .into_iter()
        .map(|key| {
            DeleteRequest::builder()
                .set_key(Some(key))
                .build()
                .map(|delete| WriteRequest::builder().delete_request(delete).build())
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(build_error)?;
    write_all(client, table, requests, what).await
}

async fn write_all(
    client: &Client,
    table: &str,
    mut requests: Vec<WriteRequest>,
    what: &str,
) -> Result<(), StoreError> {
    while !requests.is_empty() {
        let rest = requests.split_off(requests.len().min(BATCH_WRITE_MAX));
        let mut pending = std::mem::replace(&mut requests, rest);
        let mut round = 0u32;
        while !pending.is_empty() {
            let out =
                client.batch_write_item().request_items(table, pending).send().await.map_err(|e| sdk_error(what, e))?;
            pending = out.unprocessed_items().and_then(|u| u.get(table)).cloned().unwrap_or_default();
            if !pending.is_empty() {
                round += 1;
                if round > MAX_ATTEMPTS {
                    return Err(StoreError::Unavailable(format!("DynamoDB {what}: kept items unprocessed")));
                }
                backoff(round).await;
            }
        }
    }
    Ok(())
}
