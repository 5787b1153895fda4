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
    pub async fn catch_up_reporting(&self, mut progress: impl FnMut(u64)) -> Result<u64, String> {
        let mut position = self.index.watermark().await.map_err(|e| e.to_string())?;
        let mut next = self.prepare(position).await?;
        while let Some((last, updates)) = next {
            let (applied, prepared) = tokio::join!(self.index.apply(updates), self.prepare(last));
            applied.map_err(|e| e.to_string())?;
            position = last;
            progress(position);
            next = prepared?;
        }
        Ok(position)
    }

    /// Reads the batch of changes after `position` and extracts its index updates; `None` when
    /// there are none. Returns the batch's last sequence with the updates.
    async fn prepare(&self, position: u64) -> Result<Option<(u64, Vec<IndexUpdate>)>, String> {
        let batch = self.changes.changes_after(position, self.config.batch_size).await.map_err(|e| e.to_string())?;
        let Some(last) = batch.last().map(|c| c.version.sequence) else { return Ok(None) };
        let events: Vec<ResourceChanged> = batch.into_iter().map(ResourceChanged::from).collect();
        Ok(Some((last, extract_updates(events).await?)))
    }

    /// Turns events into index updates (extracting search values off the async executor) and
    /// applies them in one index transaction.
    pub async fn apply(&self, events: Vec<ResourceChanged>) -> Result<(), String> {
        if events.is_empty() {
            return Ok(());
        }
        let updates = extract_updates(events).await?;
        self.index.apply(updates).await.map_err(|e| e.to_string())
    }

    /// Runs until `shutdown`: catch up, then follow `events` (when given), back to the change log
    /// on any gap; without a subscription, polls the change log.
    pub async fn run(self, mut events: Option<Box<dyn EventSubscription>>, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            let position = match self.catch_up().await {
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
            let mut next = Some(first);
            while let Some(received) = next.take() {
                match received {
                    Received::Event(event) if event.sequence <= position => {}
                    Received::Event(event) if event.sequence == position + 1 => {
                        position = event.sequence;
                        batch.push(ResourceChanged::clone(&event));
                    }
                    // A gap: the change log has what we missed.
                    Received::Event(_) | Received::Lagged => {
                        let _ = self.apply(batch).await;
                        return true;
                    }
                    Received::Closed => {
                        let _ = self.apply(batch).await;
                        return false;
                    }
                }
                if batch.len() < self.config.batch_size {
                    next = subscription.try_recv();
                }
            }
            if let Err(error) = self.apply(batch).await {
                tracing::warn!(%error, "indexer batch failed; catching up from the change log");
                return true;
            }
        }
    }
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
