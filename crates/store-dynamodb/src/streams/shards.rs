//! The shard graph: which shards exist (DescribeStream, paginated) and which may be read now
//! (parents before children).

use std::collections::HashSet;
use std::future::Future;

use aws_sdk_dynamodbstreams::Client;
use aws_sdk_dynamodbstreams::types::Shard;
use fhirmesh_core::ports::StoreError;

use crate::error::sdk_error;

/// Upper bound on DescribeStream pages in one listing (100 shards a page): a stream keeps about
/// a day of shards, far fewer than this; the bound only stops a misbehaving endpoint from looping.
const MAX_PAGES: usize = 10_000;

/// One shard of the stream, as the relay needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardInfo {
    pub shard_id: String,
    /// The shard this one was split from (or, for a chain, the previous generation).
    pub parent_shard_id: Option<String>,
    /// Whether the shard is closed (it has an `EndingSequenceNumber`): no new records will come,
    /// and reading it to the end (no `NextShardIterator`) finishes it.
    pub closed: bool,
}

impl ShardInfo {
    fn from_sdk(shard: &Shard) -> Option<ShardInfo> {
        Some(ShardInfo {
            shard_id: shard.shard_id()?.to_owned(),
            parent_shard_id: shard.parent_shard_id().map(str::to_owned),
            closed: shard.sequence_number_range().and_then(|range| range.ending_sequence_number()).is_some(),
        })
    }
}

/// The shards that may be read now, in listing order: those not finished whose parent is either
/// absent, finished, or no longer listed (trimmed after 24 hours, or an id this listing does not
/// know — nothing left to wait for). A child is never read while its listed parent still has
/// records to deliver, so the records of one item come out in order across a split.
pub fn ready_shards<'a>(shards: &'a [ShardInfo], finished: &HashSet<String>) -> Vec<&'a ShardInfo> {
    let listed: HashSet<&str> = shards.iter().map(|shard| shard.shard_id.as_str()).collect();
    shards
        .iter()
        .filter(|shard| !finished.contains(&shard.shard_id))
        .filter(|shard| match shard.parent_shard_id.as_deref() {
            None => true,
            Some(parent) => finished.contains(parent) || !listed.contains(parent),
        })
        .collect()
}

/// Every shard of `stream_arn` (DescribeStream, following `LastEvaluatedShardId`).
pub(crate) async fn list_shards(client: &Client, stream_arn: &str) -> Result<Vec<ShardInfo>, StoreError> {
    collect_pages(stream_arn, |start| async move {
        let out = client
            .describe_stream()
            .stream_arn(stream_arn)
            .set_exclusive_start_shard_id(start)
            .send()
            .await
            .map_err(|e| sdk_error(&format!("describe stream {stream_arn}"), e))?;
        let Some(description) = out.stream_description() else {
            return Err(StoreError::Internal(format!("describe stream {stream_arn}: no stream description")));
        };
        let mut shards = Vec::with_capacity(description.shards().len());
        for shard in description.shards() {
            match ShardInfo::from_sdk(shard) {
                Some(info) => shards.push(info),
                None => tracing::warn!(stream = %stream_arn, "stream listing has a shard without an id; ignored"),
            }
        }
        Ok((shards, description.last_evaluated_shard_id().map(str::to_owned)))
    })
    .await
}

/// Pages through a listing: `fetch(start)` returns a page and the id to continue after.
async fn collect_pages<F, Fut>(stream_arn: &str, mut fetch: F) -> Result<Vec<ShardInfo>, StoreError>
where
    F: FnMut(Option<String>) -> Fut,
    Fut: Future<Output = Result<(Vec<ShardInfo>, Option<String>), StoreError>>,
{
    let mut shards = Vec::new();
    let mut start: Option<String> = None;
    for _ in 0..MAX_PAGES {
        let (page, last) = fetch(start.clone()).await?;
        shards.extend(page);
        match last {
            None => return Ok(shards),
            Some(last) if start.as_deref() == Some(last.as_str()) => {
                return Err(StoreError::Internal(format!(
                    "describe stream {stream_arn}: the listing repeats LastEvaluatedShardId {last}"
                )));
            }
            Some(last) => start = Some(last),
        }
    }
    Err(StoreError::Internal(format!("describe stream {stream_arn}: more than {MAX_PAGES} pages of shards")))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn shard(id: &str, parent: Option<&str>, closed: bool) -> ShardInfo {
        ShardInfo { shard_id: id.to_owned(), parent_shard_id: parent.map(str::to_owned), closed }
    }

    fn ids(ready: Vec<&ShardInfo>) -> Vec<&str> {
        ready.into_iter().map(|shard| shard.shard_id.as_str()).collect()
    }

    fn set(ids: &[&str]) -> HashSet<String> {
        ids.iter().map(|id| (*id).to_owned()).collect()
    }

    #[test]
    fn a_split_reads_the_parent_then_both_children() {
        let shards = vec![shard("p", None, true), shard("c1", Some("p"), false), shard("c2", Some("p"), false)];
        assert_eq!(ids(ready_shards(&shards, &set(&[]))), ["p"]);
        assert_eq!(ids(ready_shards(&shards, &set(&["p"]))), ["c1", "c2"]);
        assert_eq!(ids(ready_shards(&shards, &set(&["p", "c1"]))), ["c2"]);
        assert!(ready_shards(&shards, &set(&["p", "c1", "c2"])).is_empty());
    }

    #[test]
    fn a_chain_of_three_generations_goes_one_at_a_time() {
        // Listing order need not be generation order.
        let shards = vec![shard("g3", Some("g2"), false), shard("g1", None, true), shard("g2", Some("g1"), true)];
        assert_eq!(ids(ready_shards(&shards, &set(&[]))), ["g1"]);
        assert_eq!(ids(ready_shards(&shards, &set(&["g1"]))), ["g2"]);
        assert_eq!(ids(ready_shards(&shards, &set(&["g1", "g2"]))), ["g3"]);
        assert!(ready_shards(&shards, &set(&["g1", "g2", "g3"])).is_empty());
    }

    #[test]
    fn a_parent_trimmed_from_the_listing_does_not_block() {
        let shards = vec![shard("c1", Some("trimmed"), true), shard("c2", Some("c1"), false)];
        assert_eq!(ids(ready_shards(&shards, &set(&[]))), ["c1"]);
        // The finished set may still name the trimmed parent: no difference.
        assert_eq!(ids(ready_shards(&shards, &set(&["trimmed"]))), ["c1"]);
    }

    #[test]
    fn an_unknown_parent_id_does_not_block() {
        let shards = vec![shard("a", Some("shardId-never-seen"), false), shard("b", None, false)];
        assert_eq!(ids(ready_shards(&shards, &set(&[]))), ["a", "b"]);
        assert!(ready_shards(&[], &set(&["a"])).is_empty());
    }

    #[test]
    fn sdk_shards_convert() {
        use aws_sdk_dynamodbstreams::types::SequenceNumberRange;
        let open = Shard::builder()
            .shard_id("s1")
            .sequence_number_range(SequenceNumberRange::builder().starting_sequence_number("1").build())
            .build();
        let closed = Shard::builder()
            .shard_id("s2")
            .parent_shard_id("s1")
            .sequence_number_range(
                SequenceNumberRange::builder().starting_sequence_number("1").ending_sequence_number("9").build(),
            )
            .build();
        assert_eq!(ShardInfo::from_sdk(&open), Some(shard("s1", None, false)));
        assert_eq!(ShardInfo::from_sdk(&closed), Some(shard("s2", Some("s1"), true)));
        assert_eq!(ShardInfo::from_sdk(&Shard::builder().build()), None);
    }

    #[tokio::test]
    async fn pagination_follows_the_last_evaluated_shard_id() {
        let pages: HashMap<Option<String>, (Vec<ShardInfo>, Option<String>)> = HashMap::from([
            (None, (vec![shard("a", None, true), shard("b", None, true)], Some("b".to_owned()))),
            (Some("b".to_owned()), (vec![shard("c", Some("a"), false)], Some("c".to_owned()))),
            (Some("c".to_owned()), (vec![shard("d", Some("b"), false)], None)),
        ]);
        let mut asked = Vec::new();
        let listed = collect_pages("arn", |start| {
            asked.push(start.clone());
            let page = pages.get(&start).cloned();
            async move { page.ok_or_else(|| StoreError::Internal("unexpected start".into())) }
        })
        .await
        .expect("listing");
        let listed: Vec<&str> = listed.iter().map(|s| s.shard_id.as_str()).collect();
        assert_eq!(listed, ["a", "b", "c", "d"]);
        assert_eq!(asked, [None, Some("b".to_owned()), Some("c".to_owned())]);
    }

    #[tokio::test]
    async fn a_listing_that_repeats_itself_is_an_error_not_a_loop() {
        let err = collect_pages("arn", |_| async { Ok((vec![shard("a", None, false)], Some("a".to_owned()))) })
            .await
            .expect_err("repeats");
        assert!(err.to_string().contains("arn") && err.to_string().contains("repeats"), "{err}");
    }
}
