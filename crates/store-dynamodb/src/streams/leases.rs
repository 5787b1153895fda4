//! The lease/checkpoint table: one item per shard (`shard` S), holding who reads it (`owner`,
//! `expires_at` in epoch milliseconds), how far it was published (`checkpoint`, a stream
//! sequence number) and whether it was read to its end (`finished`). Every write that depends on
//! ownership is conditional, so two relays never both believe they own a shard past a write.

use std::collections::HashMap;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::operation::update_item::{UpdateItemError, UpdateItemOutput};
use aws_sdk_dynamodb::types::{
    AttributeValue, BillingMode, KeyType, ReturnValue, ScalarAttributeType, TimeToLiveSpecification, TimeToLiveStatus,
};
use fhirmesh_core::ports::StoreError;

use crate::error::sdk_error;
use crate::items::Item;
use crate::provision::{attribute, create_and_await, key_element};

const SHARD: &str = "shard";
/// The TTL attribute (epoch seconds): set on finished shards, whose items DynamoDB then deletes.
const TTL: &str = "ttl";
/// How long a finished shard's item is kept: past the stream's 24-hour retention, so no listing
/// still names the shard when its item goes.
const FINISHED_KEPT_SECONDS: u64 = 2 * 24 * 3600;
/// Scan pages read in one pass over the lease table (each up to 1 MB of tiny items).
const MAX_SCAN_PAGES: usize = 1_000;

/// Creates the lease/checkpoint table of the Streams relay (key `shard` S, on-demand billing)
/// unless it exists, waits (at most 60 s) until it is active, and enables TTL on `ttl` (items of
/// finished shards expire two days after they finished). Returns whether this call created the
/// table. One lease table serves one stream: its items are keyed by shard id alone.
pub async fn provision_leases(client: &Client, lease_table: &str) -> Result<bool, StoreError> {
    let create = client
        .create_table()
        .table_name(lease_table)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(attribute(SHARD, ScalarAttributeType::S)?)
        .key_schema(key_element(SHARD, KeyType::Hash)?);
    let (created, _) = create_and_await(client, create, lease_table, "lease table").await?;
    enable_ttl(client, lease_table).await?;
    Ok(created)
}

/// Turns TTL on unless it is on (or turning on) already: enabling it twice is an error.
async fn enable_ttl(client: &Client, lease_table: &str) -> Result<(), StoreError> {
    let described = client
        .describe_time_to_live()
        .table_name(lease_table)
        .send()
        .await
        .map_err(|e| sdk_error(&format!("describe the TTL of lease table {lease_table}"), e))?;
    let status = described.time_to_live_description().and_then(|d| d.time_to_live_status());
    if matches!(status, Some(TimeToLiveStatus::Enabled | TimeToLiveStatus::Enabling)) {
        return Ok(());
    }
    let specification = TimeToLiveSpecification::builder().enabled(true).attribute_name(TTL).build().map_err(|e| {
        StoreError::Internal(format!("cannot build the TTL specification of lease table {lease_table}: {e}"))
    })?;
    client
        .update_time_to_live()
        .table_name(lease_table)
        .time_to_live_specification(specification)
        .send()
        .await
        .map_err(|e| sdk_error(&format!("enable TTL on lease table {lease_table}"), e))?;
    Ok(())
}

/// One shard's lease item.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Lease {
    pub owner: Option<String>,
    /// Epoch milliseconds; meaningless without an owner.
    pub expires_at: u64,
    /// The last sequence number whose batch was published.
    pub checkpoint: Option<String>,
    pub finished: bool,
}

impl Lease {
    /// Whether `worker` may take this lease at `now`.
    pub(crate) fn is_free_for(&self, worker: &str, now: u64) -> bool {
        !self.finished
            && match self.owner.as_deref() {
                None => true,
                Some(owner) => owner == worker || self.expires_at < now,
            }
    }

    fn from_item(table: &str, item: &Item) -> Result<(String, Lease), StoreError> {
        let bad = |what: &str| StoreError::Internal(format!("lease table {table}: {what}"));
        let shard = match item.get(SHARD) {
            Some(AttributeValue::S(shard)) => shard.clone(),
            _ => return Err(bad("an item without a string `shard` key")),
        };
        let owner = match item.get("owner") {
            None | Some(AttributeValue::Null(_)) => None,
            Some(AttributeValue::S(owner)) => Some(owner.clone()),
            Some(_) => return Err(bad(&format!("shard {shard}: `owner` is not a string"))),
        };
        let expires_at = match item.get("expires_at") {
            None => 0,
            Some(AttributeValue::N(n)) => {
                n.parse().map_err(|_| bad(&format!("shard {shard}: `expires_at` = {n} is not epoch millis")))?
            }
            Some(_) => return Err(bad(&format!("shard {shard}: `expires_at` is not a number"))),
        };
        let checkpoint = match item.get("checkpoint") {
            None => None,
            Some(AttributeValue::S(seq)) => Some(seq.clone()),
            Some(_) => return Err(bad(&format!("shard {shard}: `checkpoint` is not a string"))),
        };
        let finished = match item.get("finished") {
            None => false,
            Some(AttributeValue::Bool(finished)) => *finished,
            Some(_) => return Err(bad(&format!("shard {shard}: `finished` is not a boolean"))),
        };
        Ok((shard, Lease { owner, expires_at, checkpoint, finished }))
    }
}

/// The lease table, seen from one worker.
#[derive(Debug, Clone)]
pub(crate) struct Leases {
    client: Client,
    table: String,
    worker: String,
}

fn s(value: impl Into<String>) -> AttributeValue {
    AttributeValue::S(value.into())
}

fn n(value: u64) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

fn now_seconds() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn is_condition_failure(err: &SdkError<UpdateItemError, aws_sdk_dynamodb::config::http::HttpResponse>) -> bool {
    err.as_service_error().is_some_and(UpdateItemError::is_conditional_check_failed_exception)
}

impl Leases {
    pub(crate) fn new(client: Client, table: String, worker: String) -> Leases {
        Leases { client, table, worker }
    }

    pub(crate) fn table(&self) -> &str {
        &self.table
    }

    /// Every lease item (strongly consistent).
    pub(crate) async fn scan(&self) -> Result<HashMap<String, Lease>, StoreError> {
        let mut leases = HashMap::new();
        let mut start: Option<Item> = None;
        for _ in 0..MAX_SCAN_PAGES {
            let out = self
                .client
                .scan()
                .table_name(&self.table)
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| sdk_error(&format!("scan lease table {}", self.table), e))?;
            for item in out.items() {
                let (shard, lease) = Lease::from_item(&self.table, item)?;
                leases.insert(shard, lease);
            }
            match out.last_evaluated_key() {
                Some(key) if !key.is_empty() => start = Some(key.clone()),
                _ => return Ok(leases),
            }
        }
        Err(StoreError::Internal(format!("lease table {}: more than {MAX_SCAN_PAGES} scan pages", self.table)))
    }

    /// Takes `shard` if it has no owner, its lease expired, or this worker already owns it (and
    /// it is not finished). `Ok(None)`: another worker holds it (or it is finished).
    pub(crate) async fn acquire(&self, shard: &str, now: u64, expires_at: u64) -> Result<Option<Lease>, StoreError> {
        let out = self
            .update(shard)
            .update_expression("SET #owner = :me, #exp = :exp")
            .condition_expression(
                "(attribute_not_exists(#owner) OR #owner = :me OR #exp < :now) \
                 AND (attribute_not_exists(#fin) OR #fin = :no)",
            )
            .expression_attribute_names("#fin", "finished")
            .expression_attribute_values(":exp", n(expires_at))
            .expression_attribute_values(":now", n(now))
            .expression_attribute_values(":no", AttributeValue::Bool(false))
            .return_values(ReturnValue::AllNew)
            .send()
            .await;
        match self.conditional(out, "take the lease of", shard)? {
            Some(out) => match out.attributes() {
                Some(item) => Ok(Some(Lease::from_item(&self.table, item)?.1)),
                None => Err(StoreError::Internal(format!(
                    "lease table {}: taking shard {shard} returned no item",
                    self.table
                ))),
            },
            None => Ok(None),
        }
    }

    /// Extends this worker's lease of `shard`; `Ok(false)`: the lease was lost to another worker.
    pub(crate) async fn renew(&self, shard: &str, expires_at: u64) -> Result<bool, StoreError> {
        let out = self
            .update(shard)
            .update_expression("SET #exp = :exp")
            .condition_expression("#owner = :me")
            .expression_attribute_values(":exp", n(expires_at))
            .send()
            .await;
        Ok(self.conditional(out, "renew the lease of", shard)?.is_some())
    }

    /// Records that everything up to `sequence` was published (and, when `finished`, that the
    /// shard was read to its end: the lease is released with it and the item gets its TTL).
    /// Conditional on still owning the lease; `Ok(false)`: it was lost, nothing was written.
    pub(crate) async fn checkpoint(
        &self,
        shard: &str,
        sequence: Option<&str>,
        finished: bool,
        expires_at: u64,
    ) -> Result<bool, StoreError> {
        let mut set = vec!["#fin = :fin"];
        let mut update = self
            .update(shard)
            .condition_expression("#owner = :me")
            .expression_attribute_names("#fin", "finished")
            .expression_attribute_values(":fin", AttributeValue::Bool(finished));
        if let Some(sequence) = sequence {
            set.push("#cp = :cp");
            update =
                update.expression_attribute_names("#cp", "checkpoint").expression_attribute_values(":cp", s(sequence));
        }
        if finished {
            set.push("#exp = :zero");
            set.push("#ttl = :ttl");
            let ttl = now_seconds().saturating_add(FINISHED_KEPT_SECONDS);
            update = update
                .expression_attribute_values(":zero", n(0))
                .expression_attribute_names("#ttl", TTL)
                .expression_attribute_values(":ttl", n(ttl));
        } else {
            set.push("#exp = :exp");
            update = update.expression_attribute_values(":exp", n(expires_at));
        }
        let mut expression = format!("SET {}", set.join(", "));
        if finished {
            expression.push_str(" REMOVE #owner");
        }
        let out = update.update_expression(expression).send().await;
        Ok(self.conditional(out, "checkpoint", shard)?.is_some())
    }

    /// Gives `shard` up so another worker can take it at once; `Ok(false)`: it was not ours.
    pub(crate) async fn release(&self, shard: &str) -> Result<bool, StoreError> {
        let out = self
            .update(shard)
            .update_expression("SET #exp = :zero REMOVE #owner")
            .condition_expression("#owner = :me")
            .expression_attribute_values(":zero", n(0))
            .send()
            .await;
        Ok(self.conditional(out, "release the lease of", shard)?.is_some())
    }

    /// An UpdateItem of `shard`'s lease item with `#owner`, `#exp` and `:me` bound.
    fn update(&self, shard: &str) -> aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder {
        self.client
            .update_item()
            .table_name(&self.table)
            .key(SHARD, s(shard))
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_names("#exp", "expires_at")
            .expression_attribute_values(":me", s(&self.worker))
    }

    /// A conditional update's outcome: `Some` when applied, `None` when its condition failed.
    fn conditional(
        &self,
        out: Result<UpdateItemOutput, SdkError<UpdateItemError, aws_sdk_dynamodb::config::http::HttpResponse>>,
        what: &str,
        shard: &str,
    ) -> Result<Option<UpdateItemOutput>, StoreError> {
        match out {
            Ok(out) => Ok(Some(out)),
            Err(err) if is_condition_failure(&err) => Ok(None),
            Err(err) => Err(sdk_error(&format!("{what} shard {shard} in lease table {}", self.table), err)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn who_may_take_a_lease() {
        let free = Lease::default();
        assert!(free.is_free_for("a", 10));
        let held = Lease { owner: Some("b".into()), expires_at: 100, ..Lease::default() };
        assert!(!held.is_free_for("a", 100), "expires at 100: still held at 100");
        assert!(held.is_free_for("a", 101), "expired");
        assert!(held.is_free_for("b", 50), "its own owner may take it back (a restarted worker)");
        let finished = Lease { finished: true, ..Lease::default() };
        assert!(!finished.is_free_for("a", 10), "finished shards are never taken");
    }

    #[test]
    fn lease_items_decode_or_fail_with_the_table_and_shard() {
        let item: Item = HashMap::from([
            ("shard".to_owned(), s("s1")),
            ("owner".to_owned(), s("w1")),
            ("expires_at".to_owned(), n(42)),
            ("checkpoint".to_owned(), s("1100000000017454423009")),
            ("finished".to_owned(), AttributeValue::Bool(false)),
        ]);
        let (shard, lease) = Lease::from_item("leases", &item).expect("decodes");
        assert_eq!(shard, "s1");
        assert_eq!(
            lease,
            Lease {
                owner: Some("w1".into()),
                expires_at: 42,
                checkpoint: Some("1100000000017454423009".into()),
                finished: false
            }
        );
        let mut bad = item.clone();
        bad.insert("expires_at".to_owned(), s("soon"));
        let err = Lease::from_item("leases", &bad).expect_err("bad expiry");
        assert!(err.to_string().contains("leases") && err.to_string().contains("s1"), "{err}");
        assert!(Lease::from_item("leases", &HashMap::new()).is_err());
    }
}
