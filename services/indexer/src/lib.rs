//! The indexer service as a composition root: runs the core indexer loop between a search index,
//! the store's change log and (in embedded mode) a live event subscription. No domain logic here.

use std::future::Future;

use fhirmesh_core::indexer::{Indexer, IndexerConfig};
use fhirmesh_core::ports::{DynChangeLog, DynSearchIndex, EventSubscription};
use tokio::task::JoinHandle;

/// Starts the indexer on the current runtime; it stops when `shutdown` resolves.
pub fn spawn(
    index: DynSearchIndex,
    changes: DynChangeLog,
    events: Option<Box<dyn EventSubscription>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> JoinHandle<()> {
    tokio::spawn(Indexer::new(index, changes, IndexerConfig::default()).run(events, shutdown))
}
