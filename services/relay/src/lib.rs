//! The relay service as a composition root: runs the core relay loop between a change log and an
//! event publisher. Embedded mode runs it as a task; the mesh runs it as its own process (later
//! issues bring the DynamoDB Streams reader and the NATS/SQS publishers).

use std::future::Future;

use fhirmesh_core::ports::{DynChangeLog, DynEventPublisher};
use fhirmesh_core::relay::{Relay, RelayConfig};
use tokio::task::JoinHandle;

/// Starts the relay on the current runtime; it stops when `shutdown` resolves.
pub fn spawn(
    changes: DynChangeLog,
    publisher: DynEventPublisher,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> JoinHandle<()> {
    tokio::spawn(Relay::new(changes, publisher, RelayConfig::default()).run(shutdown))
}
