//! The relay: turns the store's change log into `ResourceChanged` events on the bus, at least once,
//! in sequence order, resuming from a durable checkpoint after a restart.

use std::future::Future;
use std::time::Duration;

use crate::events::ResourceChanged;
use crate::ports::{DynChangeLog, DynEventPublisher};

/// Checkpoint name the relay saves its progress under.
pub const RELAY_CONSUMER: &str = "relay";

#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Changes read and published per round.
    pub batch_size: usize,
    /// Poll interval when no commit signal arrives (commits signal the relay directly in-process).
    pub poll_interval: Duration,
    /// Back-off after a failed round.
    pub retry_delay: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            batch_size: 512,
            poll_interval: Duration::from_millis(250),
            retry_delay: Duration::from_millis(500),
        }
    }
}

pub struct Relay {
    changes: DynChangeLog,
    publisher: DynEventPublisher,
    config: RelayConfig,
}

impl Relay {
    pub fn new(changes: DynChangeLog, publisher: DynEventPublisher, config: RelayConfig) -> Self {
        Relay { changes, publisher, config }
    }

    /// Publishes every change after the saved checkpoint; returns how many it published.
    pub async fn run_once(&self) -> Result<usize, String> {
        let mut published = 0;
        let mut checkpoint = self.changes.checkpoint(RELAY_CONSUMER).await.map_err(|e| e.to_string())?;
        loop {
            let batch =
                self.changes.changes_after(checkpoint, self.config.batch_size).await.map_err(|e| e.to_string())?;
            let Some(last) = batch.last().map(|c| c.version.sequence) else { return Ok(published) };
            let events: Vec<ResourceChanged> = batch.into_iter().map(ResourceChanged::from).collect();
            self.publisher.publish(&events).await.map_err(|e| e.to_string())?;
            self.changes.save_checkpoint(RELAY_CONSUMER, last).await.map_err(|e| e.to_string())?;
            published += events.len();
            checkpoint = last;
        }
    }

    /// Runs until `shutdown` resolves.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            let delay = match self.run_once().await {
                Ok(n) => {
                    if n > 0 {
                        tracing::debug!(events = n, "relay published changes");
                    }
                    self.config.poll_interval
                }
                Err(error) => {
                    tracing::warn!(%error, "relay round failed; retrying");
                    self.config.retry_delay
                }
            };
            tokio::select! {
                _ = &mut shutdown => return,
                _ = self.changes.wait_for_changes() => {}
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }
}
