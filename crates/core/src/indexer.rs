//! The indexer: keeps the search index equal to the store. It applies changes in sequence order —
//! first catching up from the change log after its watermark, then from live bus events — and goes
//! back to the change log whenever it sees a gap (a lagged subscription, a missed sequence). The
//! index's watermark is its durable position, so a restart resumes exactly where it stopped;
//! `SearchIndex::apply` is idempotent per version, so redelivered or reordered events are harmless.

use std::future::Future;
use std::time::Duration;

use fhirmesh_fhir::search::extract::extract;

use crate::events::ResourceChanged;
use crate::ports::{DynChangeLog, DynSearchIndex, EventSubscription, IndexUpdate, Received};

#[derive(Debug, Clone)]
pub struct IndexerConfig {
    /// Changes applied per index transaction.
    pub batch_size: usize,
    /// Poll interval of the change log when no events arrive (or there is no bus).
    pub poll_interval: Duration,
    /// Back-off after a failed batch.
    pub retry_delay: Duration,
}

impl Default for IndexerConfig {
    fn default() -> Self {
        IndexerConfig {
            batch_size: 1024,
            poll_interval: Duration::from_millis(200),
            retry_delay: Duration::from_millis(500),
        }
    }
}

pub struct Indexer {
    index: DynSearchIndex,
    changes: DynChangeLog,
    config: IndexerConfig,
}

impl Indexer {
    pub fn new(index: DynSearchIndex, changes: DynChangeLog, config: IndexerConfig) -> Self {
        Indexer { index, changes, config }
    }

    /// Applies everything in the change log after the watermark; returns the new watermark.
    pub async fn catch_up(&self) -> Result<u64, String> {
        self.catch_up_reporting(|_| {}).await
    }

    /// [`Indexer::catch_up`], calling `progress` with the position after each batch. Pipelined:
    /// the next batch is read and its values extracted while the current one is written, so the
    /// two halves (JSON + FHIRPath, SQLite B-trees) run on different cores.
    pub async fn catch_up_reporting(&self, progress: impl FnMut(u64)) -> Result<u64, String> {
        self.catch_up_with(false, progress).await
    }

    /// [`Indexer::catch_up_reporting`]; `traced`: each change a traced request wrote gets its
    /// span, open until the change is in the index (the live indexer; not a rebuild).
    async fn catch_up_with(&self, traced: bool, mut progress: impl FnMut(u64)) -> Result<u64, String> {
        let mut position = self.index.watermark().await.map_err(|e| e.to_string())?;
        let mut next = self.prepare(position, traced).await?;
        while let Some(batch) = next {
            let (applied, prepared) = tokio::join!(self.index.apply(batch.updates), self.prepare(batch.last, traced));
            applied.map_err(|e| e.to_string())?;
            drop(batch.spans);
            position = batch.last;
            progress(position);
            next = prepared?;
        }
        Ok(position)
    }

    /// Reads the batch of changes after `position` — extended to the end of the last commit it
    /// reaches, so a transaction is applied whole and the index never shows part of one — and
    /// extracts its index updates; `None` when there are none. Returns the batch's last sequence
    /// with the updates.
    async fn prepare(&self, position: u64, traced: bool) -> Result<Option<Prepared>, String> {
        let mut batch =
            self.changes.changes_after(position, self.config.batch_size).await.map_err(|e| e.to_string())?;
        while let Some(last) = batch.last()
            && last.commit_end > last.version.sequence
        {
            let missing = usize::try_from(last.commit_end - last.version.sequence).unwrap_or(usize::MAX);
            let rest = self.changes.changes_after(last.version.sequence, missing).await.map_err(|e| e.to_string())?;
            if rest.is_empty() {
                break;
            }
            batch.extend(rest);
        }
        let Some(last) = batch.last().map(|c| c.version.sequence) else { return Ok(None) };
        let events: Vec<ResourceChanged> = batch.into_iter().map(ResourceChanged::from).collect();
        let spans = if traced { change_spans(&events) } else { Vec::new() };
        Ok(Some(Prepared { last, updates: extract_updates(events).await?, spans }))
    }

    /// Turns events into index updates (extracting search values off the async executor) and
    /// applies them in one index transaction.
    pub async fn apply(&self, events: Vec<ResourceChanged>) -> Result<(), String> {
        if events.is_empty() {
            return Ok(());
        }
        let spans = change_spans(&events);
        let updates = extract_updates(events).await?;
        let applied = self.index.apply(updates).await.map_err(|e| e.to_string());
        drop(spans);
        applied
    }

    /// Runs until `shutdown`: catch up, then follow `events` (when given), back to the change log
    /// on any gap; without a subscription, polls the change log.
    pub async fn run(self, mut events: Option<Box<dyn EventSubscription>>, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            let position = match self.catch_up_with(true, |_| {}).await {
                Ok(position) => position,
                Err(error) => {
                    tracing::warn!(%error, "indexer catch-up failed; retrying");
                    tokio::select! {
                        _ = &mut shutdown => return,
                        _ = tokio::time::sleep(self.config.retry_delay) => continue,
                    }
                }
            };
            let follow = async {
                match events.as_mut() {
                    Some(subscription) => self.follow(subscription.as_mut(), position).await,
                    None => {
                        tokio::select! {
                            _ = self.changes.wait_for_changes() => {}
                            _ = tokio::time::sleep(self.config.poll_interval) => {}
                        }
                        true
                    }
                }
            };
            tokio::select! {
                _ = &mut shutdown => return,
                keep_going = follow => if !keep_going { events = None },
            }
        }
    }

    /// Applies live events while they continue the sequence from `position`; returns on a gap
    /// (true: catch up, then follow again) or when the bus closed (false).
    async fn follow(&self, subscription: &mut dyn EventSubscription, mut position: u64) -> bool {
        loop {
            let first = match tokio::time::timeout(self.config.poll_interval * 5, subscription.recv()).await {
                // Quiet for a while: re-check the change log, in case an event was lost in between.
                Err(_) => return true,
                Ok(received) => received,
            };
            let mut batch = Vec::new();
            // The end of the commit the batch is in: a transaction is applied whole.
            let mut commit_end = position;
            let mut next = Some(first);
            while let Some(received) = next.take() {
                match received {
                    Received::Event(event) if event.sequence <= position => {}
                    // Its body was too large for the bus: the change log has it.
                    Received::Event(event) if event.body_omitted() => {
                        let _ = self.apply(complete_commits(batch)).await;
                        return true;
                    }
                    Received::Event(event) if event.sequence == position + 1 => {
                        position = event.sequence;
                        commit_end = commit_end.max(event.commit_end);
                        batch.push(ResourceChanged::clone(&event));
                    }
                    // A gap: the change log has what we missed.
                    Received::Event(_) | Received::Lagged => {
                        let _ = self.apply(complete_commits(batch)).await;
                        return true;
                    }
                    Received::Closed => {
                        let _ = self.apply(complete_commits(batch)).await;
                        return false;
                    }
                }
                if batch.len() < self.config.batch_size {
                    next = subscription.try_recv();
                }
                if next.is_none() && position < commit_end {
                    // The rest of the transaction is on its way (the relay publishes in rounds);
                    // without it in time, the change log has it.
                    match tokio::time::timeout(self.config.poll_interval, subscription.recv()).await {
                        Ok(received) => next = Some(received),
                        Err(_) => {
                            let _ = self.apply(complete_commits(batch)).await;
                            return true;
                        }
                    }
                }
            }
            if let Err(error) = self.apply(batch).await {
                tracing::warn!(%error, "indexer batch failed; catching up from the change log");
                return true;
            }
        }
    }
}

/// What [`rebuild`] reports as it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RebuildEvent {
    /// The rebuilt index reflects the change log up to this sequence.
    Applied(u64),
    /// Searches now read the new generation (zero-downtime rebuilds only).
    Promoted { generation: u32 },
    /// The previous generation will be dropped after this pause (zero-downtime rebuilds only).
    Retiring(Duration),
}

/// How [`rebuild`] runs.
#[derive(Debug, Clone)]
pub struct RebuildOptions {
    /// Changes applied per index transaction.
    pub batch_size: usize,
    /// How long the previous generation outlives the switch, so that searches and points in time
    /// already on it finish.
    pub retire_after: Duration,
}

/// Rebuilds `index` from the whole change log; returns the position reached.
///
/// An index with generations ([`crate::ports::IndexGenerations`]) is rebuilt with no downtime: a
/// new generation is started (live writes go to both from then on), filled from the change log,
/// the served generation is caught up to at least the same position (so the switch never moves
/// the watermark searches see backwards), searches switch to the new one, and the old one is
/// dropped after `retire_after`. Otherwise the index is cleared and refilled in place: searches
/// see a partial index until it is done.
pub async fn rebuild(
    index: DynSearchIndex,
    changes: DynChangeLog,
    options: RebuildOptions,
    mut report: impl FnMut(RebuildEvent),
) -> Result<u64, String> {
    let config = IndexerConfig { batch_size: options.batch_size, ..IndexerConfig::default() };
    let Some(generations) = index.generations() else {
        index.clear().await.map_err(|e| e.to_string())?;
        return Indexer::new(index.clone(), changes, config)
            .catch_up_reporting(|position| report(RebuildEvent::Applied(position)))
            .await;
    };
    let new = generations.begin().await.map_err(|e| e.to_string())?;
    let position = Indexer::new(new.building, changes.clone(), config.clone())
        .catch_up_reporting(|position| report(RebuildEvent::Applied(position)))
        .await?;
    Indexer::new(new.live, changes, config).catch_up().await?;
    generations.promote(new.generation).await.map_err(|e| e.to_string())?;
    report(RebuildEvent::Promoted { generation: new.generation });
    report(RebuildEvent::Retiring(options.retire_after));
    tokio::time::sleep(options.retire_after).await;
    generations.retire().await.map_err(|e| e.to_string())?;
    Ok(position)
}

/// A batch read from the change log, ready to apply.
struct Prepared {
    /// The sequence of its last change.
    last: u64,
    updates: Vec<IndexUpdate>,
    /// The spans of its traced changes, closed once the batch is applied.
    spans: Vec<tracing::Span>,
}

/// A span per change a traced request wrote, a child of that request's trace: from the moment the
/// indexer took it to the moment it is searchable.
fn change_spans(events: &[ResourceChanged]) -> Vec<tracing::Span> {
    events.iter().filter_map(|event| crate::trace::change_span("index", event)).collect()
}

/// The longest prefix of `batch` that ends at the end of a commit: the part that can be applied
/// without exposing part of a transaction (the rest is read again from the change log).
fn complete_commits(mut batch: Vec<ResourceChanged>) -> Vec<ResourceChanged> {
    let complete = batch.iter().rposition(|event| event.sequence >= event.commit_end).map_or(0, |last| last + 1);
    batch.truncate(complete);
    batch
}

/// Extracts the index updates of `events` on the blocking pool (CPU-bound: JSON and FHIRPath).
async fn extract_updates(events: Vec<ResourceChanged>) -> Result<Vec<IndexUpdate>, String> {
    tokio::task::spawn_blocking(move || events.into_iter().map(to_update).collect::<Vec<_>>())
        .await
        .map_err(|e| format!("extraction task failed: {e}"))
}

fn to_update(event: ResourceChanged) -> IndexUpdate {
    let entries = event.resource.as_ref().map(|body| match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(resource) => extract(&resource),
        Err(error) => {
            // The store only holds validated JSON; this is a bug, not bad input.
            tracing::error!(%error, resource_type = %event.resource_type, "stored resource is not JSON; indexing it without values");
            Vec::new()
        }
    });
    IndexUpdate {
        tenant: event.tenant,
        resource_type: event.resource_type,
        id: event.id,
        version_id: event.version_id,
        sequence: event.sequence,
        last_updated: event.last_updated,
        entries,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Operation, TenantId};

    fn event(sequence: u64, commit_end: u64) -> ResourceChanged {
        let tenant = TenantId::default_tenant();
        let resource_type = fhirmesh_fhir::ResourceType::parse("Basic").expect("type");
        let id = fhirmesh_fhir::LogicalId::parse(&format!("b{sequence}")).expect("id");
        ResourceChanged {
            idempotency_key: ResourceChanged::idempotency_key_for(&tenant, resource_type, &id, 1),
            tenant,
            resource_type,
            id,
            version_id: 1,
            operation: Operation::Create,
            last_updated: time::OffsetDateTime::UNIX_EPOCH,
            sequence,
            commit_end,
            resource: None,
            traceparent: None,
        }
    }

    fn sequences(events: Vec<ResourceChanged>) -> Vec<u64> {
        events.into_iter().map(|e| e.sequence).collect()
    }

    #[test]
    fn only_complete_commits_are_applied_from_a_cut_batch() {
        // 1 alone, 2..=4 a transaction, 5 alone, 6..=9 a transaction cut after 7.
        let batch = vec![event(1, 1), event(2, 4), event(3, 4), event(4, 4), event(5, 5), event(6, 9), event(7, 9)];
        assert_eq!(sequences(complete_commits(batch)), vec![1, 2, 3, 4, 5]);
        assert_eq!(sequences(complete_commits(vec![event(2, 4), event(3, 4)])), Vec::<u64>::new());
        assert_eq!(sequences(complete_commits(Vec::new())), Vec::<u64>::new());
    }
}
