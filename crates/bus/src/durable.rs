//! A durable consumer seen as a live [`EventSubscription`], for consumers whose own durable
//! position lives elsewhere (the indexer: its watermark, with the store's change log to catch up
//! from). Deliveries are acknowledged once the consumer has taken them all and asks for more, so
//! the bus does not redeliver what was handed out; a failed fetch reads as a lag, which sends the
//! indexer back to the change log.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use fhirmesh_core::ports::{Delivery, DynEventConsumer, EventSubscription, Received};

/// Deliveries fetched per round.
const FETCH_MAX: usize = 256;
/// How long one fetch waits for the first event.
const FETCH_WAIT: Duration = Duration::from_secs(1);
/// Pause after a failed fetch before reporting the lag (no hot loop while the bus is down).
const FAILURE_PAUSE: Duration = Duration::from_millis(500);

/// Turns a durable consumer into a live subscription (see the module docs).
pub fn durable_subscription(consumer: DynEventConsumer) -> Box<dyn EventSubscription> {
    Box::new(DurableSubscription { consumer, ready: VecDeque::new(), handed_out: Vec::new() })
}

struct DurableSubscription {
    consumer: DynEventConsumer,
    ready: VecDeque<Delivery>,
    /// Taken by the caller, acknowledged before the next fetch.
    handed_out: Vec<Delivery>,
}

impl DurableSubscription {
    fn take(&mut self) -> Option<Received> {
        let delivery = self.ready.pop_front()?;
        let event = Arc::clone(&delivery.event);
        self.handed_out.push(delivery);
        Some(Received::Event(event))
    }

    async fn acknowledge_handed_out(&mut self) {
        let acks = self.handed_out.drain(..).collect::<Vec<_>>();
        let results = futures::future::join_all(acks.iter().map(|d| d.ack.ack())).await;
        for result in results {
            if let Err(error) = result {
                // Redelivered later; the consumer is idempotent per version.
                tracing::debug!(%error, "could not acknowledge a delivery");
            }
        }
    }
}

#[async_trait]
impl EventSubscription for DurableSubscription {
    async fn recv(&mut self) -> Received {
        loop {
            if let Some(received) = self.take() {
                return received;
            }
            self.acknowledge_handed_out().await;
            match self.consumer.fetch(FETCH_MAX, FETCH_WAIT).await {
                Ok(deliveries) => self.ready.extend(deliveries),
                Err(error) => {
                    tracing::warn!(%error, "event bus fetch failed; catching up from the change log");
                    tokio::time::sleep(FAILURE_PAUSE).await;
                    return Received::Lagged;
                }
            }
        }
    }

    fn try_recv(&mut self) -> Option<Received> {
        self.take()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use fhirmesh_core::ports::{Acknowledge, BusError, EventConsumer};
    use fhirmesh_core::{Operation, ResourceChanged, TenantId};
    use fhirmesh_fhir::{LogicalId, ResourceType};

    use super::*;

    fn event(sequence: u64) -> ResourceChanged {
        let tenant = TenantId::default_tenant();
        let resource_type = ResourceType::parse("Basic").expect("type");
        let id = LogicalId::parse(&format!("b{sequence}")).expect("id");
        ResourceChanged {
            idempotency_key: ResourceChanged::idempotency_key_for(&tenant, resource_type, &id, 1),
            tenant,
            resource_type,
            id,
            version_id: 1,
            operation: Operation::Create,
            last_updated: time::OffsetDateTime::UNIX_EPOCH,
            sequence,
            commit_end: sequence,
            resource: None,
            traceparent: None,
        }
    }

    struct Counted(Arc<AtomicUsize>);

    #[async_trait]
    impl Acknowledge for Counted {
        async fn ack(&self) -> Result<(), BusError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        async fn nak(&self, _: Option<Duration>) -> Result<(), BusError> {
            Ok(())
        }
        async fn in_progress(&self) -> Result<(), BusError> {
            Ok(())
        }
    }

    /// Hands out scripted fetch results, then empty batches.
    struct Scripted {
        rounds: Mutex<VecDeque<Result<Vec<u64>, BusError>>>,
        acks: Arc<AtomicUsize>,
    }

    #[async_trait]
    impl EventConsumer for Scripted {
        async fn fetch(&self, _: usize, _: Duration) -> Result<Vec<Delivery>, BusError> {
            let round = self.rounds.lock().expect("lock").pop_front().unwrap_or(Ok(Vec::new()));
            Ok(round?
                .into_iter()
                .map(|s| Delivery {
                    event: Arc::new(event(s)),
                    attempt: 1,
                    ack: Box::new(Counted(Arc::clone(&self.acks))),
                })
                .collect())
        }
    }

    #[tokio::test]
    async fn deliveries_come_out_in_order_and_are_acked_before_the_next_fetch() {
        let acks = Arc::new(AtomicUsize::new(0));
        let rounds = VecDeque::from([Ok(vec![1, 2]), Err(BusError::Unavailable("down".into())), Ok(vec![3])]);
        let consumer = Arc::new(Scripted { rounds: Mutex::new(rounds), acks: Arc::clone(&acks) });
        let mut subscription = durable_subscription(consumer);
        assert!(subscription.try_recv().is_none(), "nothing fetched yet");
        assert!(matches!(subscription.recv().await, Received::Event(e) if e.sequence == 1));
        assert!(matches!(subscription.try_recv(), Some(Received::Event(e)) if e.sequence == 2));
        assert_eq!(acks.load(Ordering::SeqCst), 0, "nothing is acked while the caller may still be working");
        // The failed fetch is a lag (back to the change log) — after acking what was taken.
        assert_eq!(subscription.recv().await, Received::Lagged);
        assert_eq!(acks.load(Ordering::SeqCst), 2);
        assert!(matches!(subscription.recv().await, Received::Event(e) if e.sequence == 3));
    }
}
