//! The DynamoDB Streams relay: publishes the version items the store inserts as
//! `ResourceChanged` events, at least once, reading the table's stream shard by shard (parents
//! before children) with per-shard leases and checkpoints in a small lease table, so several
//! relay processes can share a stream and take over from one that died.
//!
//! See `design.md` ("The Streams relay") for the delivery semantics and what is not done yet.

mod convert;
mod leases;
mod shards;

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::time::{Duration, Instant};

use aws_sdk_dynamodbstreams::operation::get_records::GetRecordsOutput;
use aws_sdk_dynamodbstreams::operation::get_shard_iterator::GetShardIteratorError;
use aws_sdk_dynamodbstreams::types::ShardIteratorType;
use fhirmesh_core::events::ResourceChanged;
use fhirmesh_core::ports::{BusError, DynEventPublisher, EventPublisher, StoreError};
use tokio::sync::Mutex;

use crate::error::sdk_error;
use crate::streams::convert::{VersionEvent, event_from_record, sequence_number};
use crate::streams::leases::Leases;
pub use crate::streams::leases::provision_leases;
pub use crate::streams::shards::{ShardInfo, ready_shards};
use crate::txn::TxnState;
use crate::{DynamoStore, now_millis};

/// GetRecords returns at most 1,000 records a call.
const MAX_RECORDS_PER_CALL: i32 = 1000;

/// Tunables of [`StreamRelay`].
#[derive(Debug, Clone)]
pub struct StreamRelayConfig {
    /// The stream to follow (`Provisioned::stream_arn`).
    pub stream_arn: String,
    /// The lease/checkpoint table (see [`provision_leases`]); one per stream.
    pub lease_table: String,
    /// This relay's identity in the lease table: unique per running relay, stable across a
    /// restart of the same relay (it then takes its own leases back at once).
    pub worker_id: String,
    /// How long a lease lasts without renewal: how soon another relay takes over from a dead one.
    pub lease_duration: Duration,
    /// Pause between rounds.
    pub poll_interval: Duration,
    /// GetRecords `Limit` (1..=1000).
    pub records_per_call: i32,
    /// How often the shard list is read again (DescribeStream), besides whenever a shard ends.
    pub shard_refresh: Duration,
}

impl StreamRelayConfig {
    /// A configuration with the default timings: lease 10 s, poll 250 ms, 1,000 records a call,
    /// shard list refreshed every 10 s.
    pub fn new(
        stream_arn: impl Into<String>,
        lease_table: impl Into<String>,
        worker_id: impl Into<String>,
    ) -> StreamRelayConfig {
        StreamRelayConfig {
            stream_arn: stream_arn.into(),
            lease_table: lease_table.into(),
            worker_id: worker_id.into(),
            lease_duration: Duration::from_secs(10),
            poll_interval: Duration::from_millis(250),
            records_per_call: MAX_RECORDS_PER_CALL,
            shard_refresh: Duration::from_secs(10),
        }
    }

    fn validate(&self) -> Result<(), StoreError> {
        let invalid = |what: &str| Err(StoreError::Internal(format!("invalid streams relay configuration: {what}")));
        if self.stream_arn.is_empty() {
            return invalid("stream_arn is empty");
        }
        if self.lease_table.is_empty() {
            return invalid("lease_table is empty");
        }
        if self.worker_id.is_empty() {
            return invalid("worker_id is empty");
        }
        if self.lease_duration.is_zero() {
            return invalid("lease_duration is zero");
        }
        Ok(())
    }
}

/// A shard this relay holds the lease of.
#[derive(Debug)]
struct Owned {
    /// Epoch millis until which the lease is confirmed (by the last acquire, renewal or checkpoint).
    expires_at: u64,
    /// The last sequence number published and checkpointed (`None`: start at TRIM_HORIZON).
    checkpoint: Option<String>,
    /// Where the next GetRecords reads; `None`: open a new iterator from the checkpoint.
    iterator: Option<String>,
}

#[derive(Debug, Default)]
struct State {
    /// The last shard listing, in DescribeStream order.
    shards: Vec<ShardInfo>,
    /// When the listing is due again (`None`: now).
    next_refresh: Option<Instant>,
    owned: BTreeMap<String, Owned>,
    /// Shards read to their end (from the lease table, and by this relay).
    finished: HashSet<String>,
}

/// Where a new shard iterator starts.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Position {
    TrimHorizon,
    After(String),
}

impl Position {
    /// A shard with no checkpoint starts at its oldest record, one with a checkpoint just after it.
    fn resume(checkpoint: Option<&str>) -> Position {
        match checkpoint {
            Some(sequence) => Position::After(sequence.to_owned()),
            None => Position::TrimHorizon,
        }
    }
}

/// The first error of a round (later ones are logged), so one failing shard does not stop the
/// others from being read.
#[derive(Default)]
struct RoundErrors {
    first: Option<StoreError>,
    more: usize,
}

impl RoundErrors {
    fn push(&mut self, error: StoreError) {
        if self.first.is_none() {
            self.first = Some(error);
        } else {
            tracing::warn!(%error, "streams relay: another failure in this round");
            self.more += 1;
        }
    }

    fn finish(self, published: usize) -> Result<usize, StoreError> {
        match self.first {
            None => Ok(published),
            Some(error) if self.more == 0 => Err(error),
            Some(error) => {
                let more = format!(" (and {} more failures this round)", self.more);
                Err(match error {
                    StoreError::Unavailable(m) => StoreError::Unavailable(m + &more),
                    StoreError::Internal(m) => StoreError::Internal(m + &more),
                    StoreError::Unsupported(m) => StoreError::Unsupported(m + &more),
                    other @ StoreError::Conflict { .. } => other,
                })
            }
        }
    }
}

/// The pause after `failures` failed rounds in a row: doubling from the poll interval (at least
/// 100 ms), capped at a third of the lease so renewals still happen in time, with jitter.
fn backoff(poll_interval: Duration, lease_duration: Duration, failures: u32) -> Duration {
    let base = poll_interval.max(Duration::from_millis(100));
    let cap = base.max(lease_duration / 3);
    let exponent = failures.saturating_sub(1).min(16);
    let delay = base.saturating_mul(1u32 << exponent).min(cap);
    let half = delay / 2;
    half + half.mul_f64(fastrand::f64())
}

/// The DynamoDB Streams relay. One per process; several processes share a stream through the
/// lease table.
pub struct StreamRelay {
    /// The table the stream belongs to: staged transactions are looked up there.
    store: DynamoStore,
    streams: aws_sdk_dynamodbstreams::Client,
    leases: Leases,
    config: StreamRelayConfig,
    state: Mutex<State>,
}

impl StreamRelay {
    /// A relay of `store`'s table stream (`config.stream_arn`).
    pub fn new(store: DynamoStore, streams: aws_sdk_dynamodbstreams::Client, config: StreamRelayConfig) -> StreamRelay {
        let leases = Leases::new(store.client().clone(), config.lease_table.clone(), config.worker_id.clone());
        StreamRelay { store, streams, leases, config, state: Mutex::new(State::default()) }
    }

    pub fn config(&self) -> &StreamRelayConfig {
        &self.config
    }

    /// One round: renew this relay's leases, refresh the shard list when due, take every free
    /// shard, then read each owned shard that is ready (its parent finished) once, publish its
    /// version inserts and checkpoint them. Returns how many events were published.
    ///
    /// An error in one shard does not stop the others; the round then returns the first error
    /// (what succeeded stays published and checkpointed, the rest is retried next round).
    pub async fn run_once(&self, publisher: &dyn EventPublisher) -> Result<usize, StoreError> {
        self.config.validate()?;
        let mut state = self.state.lock().await;
        let mut errors = RoundErrors::default();

        self.renew(&mut state, &mut errors).await;
        if state.next_refresh.is_none_or(|due| due <= Instant::now()) {
            match shards::list_shards(&self.streams, &self.config.stream_arn).await {
                Ok(listing) => {
                    state.shards = listing;
                    state.next_refresh = Some(Instant::now() + self.config.shard_refresh);
                    self.forget_unlisted(&mut state).await;
                }
                Err(error) => errors.push(error),
            }
        }
        // Without the lease table no shard is taken, but the owned ones are still read (their
        // checkpoints are conditional writes: they fail if a lease was lost meanwhile).
        if let Err(error) = self.acquire(&mut state).await {
            errors.push(error);
        }

        let ready: Vec<String> = ready_shards(&state.shards, &state.finished)
            .into_iter()
            .filter(|shard| state.owned.contains_key(&shard.shard_id))
            .map(|shard| shard.shard_id.clone())
            .collect();
        let mut published = 0;
        for shard in ready {
            match self.read_shard(&mut state, &shard, publisher).await {
                Ok(count) => published += count,
                Err(error) => errors.push(error),
            }
        }
        errors.finish(published)
    }

    /// Runs rounds every `poll_interval` (backing off after failures) until `shutdown` resolves,
    /// then releases this relay's leases so another relay can take the shards at once.
    pub async fn run(self, publisher: DynEventPublisher, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut failures = 0u32;
        loop {
            let round = tokio::select! {
                biased;
                _ = &mut shutdown => break,
                round = self.run_once(publisher.as_ref()) => round,
            };
            let delay = match round {
                Ok(published) => {
                    failures = 0;
                    if published > 0 {
                        tracing::debug!(events = published, "streams relay published changes");
                    }
                    self.config.poll_interval
                }
                Err(error) => {
                    failures = failures.saturating_add(1);
                    let delay = backoff(self.config.poll_interval, self.config.lease_duration, failures);
                    tracing::warn!(%error, failures, retry_in_ms = delay.as_millis(), "streams relay round failed");
                    delay
                }
            };
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        if let Err(error) = self.release().await {
            tracing::warn!(%error, "streams relay could not release its leases; they expire instead");
        }
    }

    /// Gives up every lease this relay holds (another relay may take the shards at once) and
    /// forgets its iterators. A later round takes free shards again.
    pub async fn release(&self) -> Result<(), StoreError> {
        let mut state = self.state.lock().await;
        let mut errors = RoundErrors::default();
        for shard in std::mem::take(&mut state.owned).into_keys() {
            match self.leases.release(&shard).await {
                Ok(true) => tracing::info!(%shard, "streams relay released its lease"),
                Ok(false) => tracing::debug!(%shard, "streams relay lease was already lost"),
                Err(error) => errors.push(error),
            }
        }
        errors.finish(0).map(|_| ())
    }

    fn lease_millis(&self) -> u64 {
        u64::try_from(self.config.lease_duration.as_millis()).unwrap_or(u64::MAX)
    }

    /// Renews every lease held; a lost one is dropped at once (its shard is not read again).
    async fn renew(&self, state: &mut State, errors: &mut RoundErrors) {
        let shards: Vec<String> = state.owned.keys().cloned().collect();
        for shard in shards {
            let expires_at = now_millis().saturating_add(self.lease_millis());
            match self.leases.renew(&shard, expires_at).await {
                Ok(true) => {
                    if let Some(owned) = state.owned.get_mut(&shard) {
                        owned.expires_at = expires_at;
                    }
                }
                Ok(false) => {
                    tracing::warn!(%shard, table = %self.leases.table(), "streams relay lost its lease; stops reading");
                    state.owned.remove(&shard);
                }
                // Keeps the shard: it is read while the last confirmed expiry lies ahead.
                Err(error) => errors.push(error),
            }
        }
    }

    /// After a listing: leases of shards no longer listed (trimmed) are given up.
    async fn forget_unlisted(&self, state: &mut State) {
        let listed: HashSet<&str> = state.shards.iter().map(|shard| shard.shard_id.as_str()).collect();
        let gone: Vec<String> = state.owned.keys().filter(|shard| !listed.contains(shard.as_str())).cloned().collect();
        for shard in gone {
            state.owned.remove(&shard);
            tracing::error!(
                %shard,
                stream = %self.config.stream_arn,
                "shard left the stream listing before it was read to its end: its unread records are lost"
            );
            if let Err(error) = self.leases.release(&shard).await {
                tracing::warn!(%error, "streams relay could not release the lease of a vanished shard");
            }
        }
    }

    /// Reads the lease table and takes every listed, unfinished shard whose lease is free.
    async fn acquire(&self, state: &mut State) -> Result<(), StoreError> {
        let leases = self.leases.scan().await?;
        let listed: HashSet<&str> = state.shards.iter().map(|shard| shard.shard_id.as_str()).collect();
        // Finished shards that left the listing no longer matter to `ready_shards`.
        state.finished.retain(|shard| listed.contains(shard.as_str()));
        for (shard, lease) in &leases {
            if lease.finished {
                if listed.contains(shard.as_str()) {
                    state.finished.insert(shard.clone());
                }
                state.owned.remove(shard);
            } else if state.owned.contains_key(shard) && lease.owner.as_deref() != Some(&self.config.worker_id) {
                tracing::warn!(%shard, table = %self.leases.table(), "streams relay lease taken by another relay");
                state.owned.remove(shard);
            }
        }
        let candidates: Vec<String> = state
            .shards
            .iter()
            .map(|shard| &shard.shard_id)
            .filter(|shard| !state.owned.contains_key(*shard) && !state.finished.contains(*shard))
            .cloned()
            .collect();
        let mut first_error = None;
        for shard in candidates {
            let now = now_millis();
            let free = leases.get(&shard).is_none_or(|lease| lease.is_free_for(&self.config.worker_id, now));
            if !free {
                continue;
            }
            let expires_at = now.saturating_add(self.lease_millis());
            match self.leases.acquire(&shard, now, expires_at).await {
                Ok(Some(lease)) => {
                    tracing::info!(%shard, checkpoint = ?lease.checkpoint, "streams relay took a shard");
                    state.owned.insert(shard, Owned { expires_at, checkpoint: lease.checkpoint, iterator: None });
                }
                Ok(None) => tracing::debug!(%shard, "another relay took the shard first"),
                Err(error) => {
                    tracing::warn!(%error, "streams relay could not take a shard");
                    first_error.get_or_insert(error);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Reads one batch of `shard`, publishes its events and checkpoints it.
    async fn read_shard(
        &self,
        state: &mut State,
        shard: &str,
        publisher: &dyn EventPublisher,
    ) -> Result<usize, StoreError> {
        let Some(owned) = state.owned.get_mut(shard) else { return Ok(0) };
        if owned.expires_at <= now_millis() {
            // Not renewed in time (the lease table was unreachable): another relay may own it.
            return Ok(0);
        }
        let fetched = match self.fetch(shard, owned).await {
            Ok(fetched) => fetched,
            Err(error) => {
                if matches!(error, Fetch::Gone(_)) {
                    state.next_refresh = None;
                }
                return Err(error.into_store_error());
            }
        };
        let (records, next) = match fetched {
            Some(out) => (out.records.unwrap_or_default(), out.next_shard_iterator),
            // No iterator at all: the end of a closed shard. An open one must have an iterator.
            None if state.shards.iter().any(|s| s.shard_id == shard && s.closed) => (Vec::new(), None),
            None => {
                state.next_refresh = None;
                return Err(StoreError::Unavailable(format!(
                    "get a shard iterator for shard {shard} ({}): no iterator for a shard listed as open",
                    self.config.stream_arn
                )));
            }
        };
        let mut events: Vec<ResourceChanged> = Vec::new();
        let mut last_sequence: Option<&str> = None;
        // A version of a staged transaction still pending stops the batch before it: what came
        // before is published and checkpointed, the rest is read again next round.
        let mut blocked = false;
        for record in &records {
            match event_from_record(record) {
                Ok(Some(written)) => match self.outcome(&written).await {
                    Ok(TxnState::Committed) => events.push(written.event),
                    Ok(TxnState::Aborted) => {}
                    Ok(TxnState::Pending { .. }) => {
                        blocked = true;
                        break;
                    }
                    // Publish what came before; this record is read again next round.
                    Err(error) if last_sequence.is_some() => {
                        tracing::warn!(%shard, %error, "streams relay stops at a transaction it cannot look up");
                        blocked = true;
                        break;
                    }
                    Err(error) => {
                        owned.iterator = None;
                        return Err(error);
                    }
                },
                Ok(None) => {}
                Err(error) => tracing::error!(
                    %shard,
                    sequence = sequence_number(record).unwrap_or("?"),
                    %error,
                    "undecodable version item in the stream: skipped, no event published for it"
                ),
            }
            if let Some(sequence) = sequence_number(record) {
                last_sequence = Some(sequence);
            } else {
                tracing::warn!(%shard, "stream record without a sequence number");
            }
        }
        if blocked && last_sequence.is_none() {
            // Nothing before the pending version: reopen after the checkpoint next round.
            owned.iterator = None;
            return Ok(0);
        }
        if !events.is_empty()
            && let Err(error) = publisher.publish(&events).await
        {
            // Read the batch again from the checkpoint next round.
            owned.iterator = None;
            return Err(bus_error(shard, events.len(), error));
        }
        // A blocked batch ends early: the shard is not finished, whatever its iterator says.
        let finished = next.is_none() && !blocked;
        if last_sequence.is_none() && !finished {
            owned.iterator = next;
            return Ok(events.len());
        }
        let expires_at = now_millis().saturating_add(self.lease_millis());
        match self.leases.checkpoint(shard, last_sequence, finished, expires_at).await {
            Ok(true) if finished => {
                tracing::info!(%shard, "streams relay finished a closed shard");
                state.owned.remove(shard);
                state.finished.insert(shard.to_owned());
                // Its children appear in the listing.
                state.next_refresh = None;
            }
            Ok(true) => {
                owned.expires_at = expires_at;
                if let Some(sequence) = last_sequence {
                    owned.checkpoint = Some(sequence.to_owned());
                }
                owned.iterator = if blocked { None } else { next };
            }
            Ok(false) => {
                tracing::warn!(
                    %shard,
                    table = %self.leases.table(),
                    "streams relay lost its lease before the checkpoint: the new owner publishes the batch again"
                );
                state.owned.remove(shard);
            }
            Err(error) => {
                owned.iterator = None;
                return Err(error);
            }
        }
        Ok(events.len())
    }

    /// Where the transaction that wrote a version stands (a plain commit is committed): published
    /// once committed, never if aborted, not yet while pending (aborted by whoever meets it after
    /// its deadline, this relay included).
    async fn outcome(&self, written: &VersionEvent) -> Result<TxnState, StoreError> {
        match &written.txn {
            None => Ok(TxnState::Committed),
            Some(txn) => self.store.settle(txn).await,
        }
    }

    /// One GetRecords on `shard`, opening (or renewing) the iterator as needed. `Ok(None)`: the
    /// shard has no more records and never will (it is closed and read to its end).
    async fn fetch(&self, shard: &str, owned: &mut Owned) -> Result<Option<GetRecordsOutput>, Fetch> {
        let iterator = match owned.iterator.take() {
            Some(iterator) => iterator,
            None => match self.open(shard, Position::resume(owned.checkpoint.as_deref())).await? {
                Some(iterator) => iterator,
                None => return Ok(None),
            },
        };
        let records = self.get_records(shard, &iterator).await;
        let restart = match records {
            Ok(out) => return Ok(Some(out)),
            Err(GetRecords::Expired) => {
                tracing::debug!(%shard, "shard iterator expired; renewing it from the checkpoint");
                Position::resume(owned.checkpoint.as_deref())
            }
            Err(GetRecords::Trimmed) => {
                tracing::error!(
                    %shard,
                    checkpoint = ?owned.checkpoint,
                    "the stream trimmed records this relay had not published: events were lost; restarting at TRIM_HORIZON"
                );
                Position::TrimHorizon
            }
            Err(GetRecords::Failed(error)) => {
                if matches!(error, Fetch::Failed(_)) {
                    // A transient failure: the iterator is still good for a retry next round.
                    owned.iterator = Some(iterator);
                }
                return Err(error);
            }
        };
        let Some(iterator) = self.open(shard, restart).await? else { return Ok(None) };
        match self.get_records(shard, &iterator).await {
            Ok(out) => Ok(Some(out)),
            Err(GetRecords::Failed(error)) => Err(error),
            Err(GetRecords::Expired | GetRecords::Trimmed) => Err(Fetch::Failed(StoreError::Unavailable(format!(
                "get records of shard {shard} ({}): a fresh iterator was refused",
                self.config.stream_arn
            )))),
        }
    }

    /// GetShardIterator at `position`; `Ok(None)` when the service has no iterator for a closed
    /// shard read to its end.
    async fn open(&self, shard: &str, position: Position) -> Result<Option<String>, Fetch> {
        let stream = &self.config.stream_arn;
        let request = |position: &Position| {
            let request = self.streams.get_shard_iterator().stream_arn(stream).shard_id(shard);
            match position {
                Position::TrimHorizon => request.shard_iterator_type(ShardIteratorType::TrimHorizon),
                Position::After(sequence) => {
                    request.shard_iterator_type(ShardIteratorType::AfterSequenceNumber).sequence_number(sequence)
                }
            }
        };
        let out = match request(&position).send().await {
            Ok(out) => out,
            Err(err) if err.as_service_error().is_some_and(GetShardIteratorError::is_trimmed_data_access_exception) => {
                tracing::error!(
                    %shard,
                    ?position,
                    "the stream trimmed records after the checkpoint that this relay had not published: events were lost; restarting at TRIM_HORIZON"
                );
                request(&Position::TrimHorizon)
                    .send()
                    .await
                    .map_err(|e| Fetch::from_iterator_error(shard, stream, e))?
            }
            Err(err) => return Err(Fetch::from_iterator_error(shard, stream, err)),
        };
        match out.shard_iterator() {
            Some(iterator) => Ok(Some(iterator.to_owned())),
            None => Ok(None),
        }
    }

    async fn get_records(&self, shard: &str, iterator: &str) -> Result<GetRecordsOutput, GetRecords> {
        let limit = self.config.records_per_call.clamp(1, MAX_RECORDS_PER_CALL);
        match self.streams.get_records().shard_iterator(iterator).limit(limit).send().await {
            Ok(out) => Ok(out),
            Err(err) => match err.as_service_error() {
                Some(e) if e.is_expired_iterator_exception() => Err(GetRecords::Expired),
                Some(e) if e.is_trimmed_data_access_exception() => Err(GetRecords::Trimmed),
                Some(e) if e.is_resource_not_found_exception() => Err(GetRecords::Failed(Fetch::Gone(sdk_error(
                    &format!("get records of shard {shard} ({})", self.config.stream_arn),
                    err,
                )))),
                _ => Err(GetRecords::Failed(Fetch::Failed(sdk_error(
                    &format!("get records of shard {shard} ({})", self.config.stream_arn),
                    err,
                )))),
            },
        }
    }
}

/// How a GetRecords call failed, as far as the relay cares.
enum GetRecords {
    /// The iterator is older than 15 minutes: open a new one at the checkpoint.
    Expired,
    /// The iterator points before the trim horizon: records were lost.
    Trimmed,
    Failed(Fetch),
}

/// A failed read of a shard.
#[derive(Debug)]
enum Fetch {
    /// The service does not know the shard (or the stream) any more: list the shards again.
    Gone(StoreError),
    Failed(StoreError),
}

impl Fetch {
    fn from_iterator_error(
        shard: &str,
        stream: &str,
        err: aws_sdk_dynamodbstreams::error::SdkError<
            GetShardIteratorError,
            aws_sdk_dynamodbstreams::config::http::HttpResponse,
        >,
    ) -> Fetch {
        let gone = err.as_service_error().is_some_and(GetShardIteratorError::is_resource_not_found_exception);
        let error = sdk_error(&format!("get a shard iterator for shard {shard} ({stream})"), err);
        if gone { Fetch::Gone(error) } else { Fetch::Failed(error) }
    }

    fn into_store_error(self) -> StoreError {
        match self {
            Fetch::Gone(error) | Fetch::Failed(error) => error,
        }
    }
}

fn bus_error(shard: &str, count: usize, error: BusError) -> StoreError {
    StoreError::Unavailable(format!("publish {count} events of stream shard {shard}: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shard_resumes_after_its_checkpoint_or_at_the_trim_horizon() {
        assert_eq!(Position::resume(None), Position::TrimHorizon);
        assert_eq!(Position::resume(Some("1100")), Position::After("1100".into()));
    }

    #[test]
    fn backoff_grows_and_stays_below_a_third_of_the_lease() {
        let poll = Duration::from_millis(250);
        let lease = Duration::from_secs(10);
        for failures in 1..40 {
            let delay = backoff(poll, lease, failures);
            assert!(delay <= lease / 3, "{failures}: {delay:?}");
            assert!(delay >= Duration::from_millis(125).min(lease / 6), "{failures}: {delay:?}");
        }
        // Late failures wait longer than the first one's maximum.
        assert!(backoff(poll, lease, 10) > Duration::from_millis(250));
        // A zero poll interval never turns into a hot loop.
        assert!(backoff(Duration::ZERO, lease, 1) >= Duration::from_millis(50));
    }

    #[test]
    fn configuration_is_validated() {
        let good = StreamRelayConfig::new("arn", "leases", "w1");
        assert!(good.validate().is_ok());
        assert_eq!(good.lease_duration, Duration::from_secs(10));
        assert_eq!(good.poll_interval, Duration::from_millis(250));
        assert_eq!((good.records_per_call, good.shard_refresh), (1000, Duration::from_secs(10)));
        let no_worker = StreamRelayConfig { worker_id: String::new(), ..good.clone() };
        assert!(no_worker.validate().is_err());
        let no_lease = StreamRelayConfig { lease_duration: Duration::ZERO, ..good };
        assert!(no_lease.validate().is_err());
    }

    #[test]
    fn round_errors_keep_the_first_and_count_the_rest() {
        assert_eq!(RoundErrors::default().finish(3), Ok(3));
        let mut errors = RoundErrors::default();
        errors.push(StoreError::Unavailable("shard a".into()));
        errors.push(StoreError::Internal("shard b".into()));
        let err = errors.finish(1).expect_err("failed");
        assert_eq!(err, StoreError::Unavailable("shard a (and 1 more failures this round)".into()));
    }
}
