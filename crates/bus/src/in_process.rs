//! The in-process bus: a bounded broadcast channel. A subscriber that falls more than `capacity`
//! events behind is told how many it missed (`RecvError::Lagged`) and must catch up from the
//! store's change log by sequence — events carry the sequence for exactly that.

use std::sync::Arc;

use async_trait::async_trait;
use fhirmesh_core::ResourceChanged;
use fhirmesh_core::ports::{BusError, EventPublisher, EventSubscription, Received};
use tokio::sync::broadcast;

#[derive(Clone)]
pub struct InProcessBus {
    sender: broadcast::Sender<Arc<ResourceChanged>>,
}

impl InProcessBus {
    pub fn new(capacity: usize) -> Self {
        let (sender, _) = broadcast::channel(capacity.max(1));
        InProcessBus { sender }
    }

    /// A new subscriber sees every event published after this call.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<ResourceChanged>> {
        self.sender.subscribe()
    }

    /// The same, behind the [`EventSubscription`] port.
    pub fn subscription(&self) -> Box<dyn EventSubscription> {
        Box::new(InProcessSubscription(self.sender.subscribe()))
    }
}

struct InProcessSubscription(broadcast::Receiver<Arc<ResourceChanged>>);

fn received(result: Result<Arc<ResourceChanged>, broadcast::error::RecvError>) -> Received {
    match result {
        Ok(event) => Received::Event(event),
        Err(broadcast::error::RecvError::Lagged(_)) => Received::Lagged,
        Err(broadcast::error::RecvError::Closed) => Received::Closed,
    }
}

#[async_trait]
impl EventSubscription for InProcessSubscription {
    async fn recv(&mut self) -> Received {
        received(self.0.recv().await)
    }

    fn try_recv(&mut self) -> Option<Received> {
        match self.0.try_recv() {
            Ok(event) => Some(Received::Event(event)),
            Err(broadcast::error::TryRecvError::Empty) => None,
            Err(broadcast::error::TryRecvError::Lagged(_)) => Some(Received::Lagged),
            Err(broadcast::error::TryRecvError::Closed) => Some(Received::Closed),
        }
    }
}

#[async_trait]
impl EventPublisher for InProcessBus {
    async fn publish(&self, events: &[ResourceChanged]) -> Result<(), BusError> {
        for event in events {
            // No subscriber is not an error: the change log stays the source of truth.
            let _ = self.sender.send(Arc::new(event.clone()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use fhirmesh_core::{Operation, TenantId};
    use fhirmesh_fhir::{LogicalId, ResourceType};

    use super::*;

    fn event(sequence: u64) -> ResourceChanged {
        let tenant = TenantId::default_tenant();
        let resource_type = ResourceType::parse("Patient").expect("Patient is a resource type");
        let id = LogicalId::parse("p1").expect("valid id");
        ResourceChanged {
            idempotency_key: ResourceChanged::idempotency_key_for(&tenant, resource_type, &id, sequence),
            tenant,
            resource_type,
            id,
            version_id: sequence,
            operation: Operation::Update,
            last_updated: time::OffsetDateTime::UNIX_EPOCH,
            sequence,
            commit_end: sequence,
            resource: None,
            traceparent: None,
        }
    }

    #[tokio::test]
    async fn every_subscriber_sees_events_in_order() {
        let bus = InProcessBus::new(16);
        let mut a = bus.subscribe();
        let mut b = bus.subscribe();
        bus.publish(&[event(1), event(2)]).await.expect("publish");
        for rx in [&mut a, &mut b] {
            assert_eq!(rx.recv().await.expect("first").sequence, 1);
            assert_eq!(rx.recv().await.expect("second").sequence, 2);
        }
    }

    #[tokio::test]
    async fn the_port_subscription_reports_events_lag_and_close() {
        let bus = InProcessBus::new(2);
        let mut sub = bus.subscription();
        assert!(sub.try_recv().is_none());
        bus.publish(&[event(1)]).await.expect("publish");
        assert!(matches!(sub.recv().await, Received::Event(e) if e.sequence == 1));
        bus.publish(&[event(2), event(3), event(4)]).await.expect("publish");
        assert_eq!(sub.recv().await, Received::Lagged);
        drop(bus);
        assert!(matches!(sub.recv().await, Received::Event(e) if e.sequence == 3));
        assert!(matches!(sub.recv().await, Received::Event(e) if e.sequence == 4));
        assert_eq!(sub.recv().await, Received::Closed);
    }

    #[tokio::test]
    async fn publishing_without_subscribers_succeeds() {
        let bus = InProcessBus::new(4);
        bus.publish(&[event(1)]).await.expect("publish with no subscriber");
    }

    #[tokio::test]
    async fn a_lagging_subscriber_learns_how_much_it_missed() {
        let bus = InProcessBus::new(2);
        let mut rx = bus.subscribe();
        bus.publish(&[event(1), event(2), event(3)]).await.expect("publish");
        match rx.recv().await {
            Err(broadcast::error::RecvError::Lagged(missed)) => assert_eq!(missed, 1),
            other => panic!("expected a lag report, got {other:?}"),
        }
        assert_eq!(rx.recv().await.expect("next").sequence, 2);
    }
}
