//! The event bus the configuration names: publishers for the relay, durable consumers for the
//! services that follow changes (NATS JetStream or SNS + SQS; the in-process bus is wired
//! directly by `serve`).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use fhirmesh_bus::{NatsBus, NatsConfig, SnsSqsBus, SnsSqsConfig};
use fhirmesh_core::ports::{DynEventConsumer, DynEventPublisher};

use crate::config::{BusBackend, Config};

/// The consuming services, each with its own durable consumer (queue) on the bus.
pub const CONSUMERS: &[&str] = &["indexer", "notifier"];

/// A connected external bus.
#[derive(Clone)]
pub enum Bus {
    Nats(Box<NatsBus>),
    SnsSqs(SnsSqsBus),
}

impl Bus {
    pub fn publisher(&self) -> DynEventPublisher {
        match self {
            Bus::Nats(bus) => Arc::new(NatsBus::clone(bus)),
            Bus::SnsSqs(bus) => Arc::new(bus.clone()),
        }
    }

    /// The durable consumer of service `name`.
    pub async fn consumer(&self, name: &str) -> anyhow::Result<DynEventConsumer> {
        Ok(match self {
            Bus::Nats(bus) => Arc::new(bus.consumer(name).await.with_context(|| format!("NATS consumer {name}"))?),
            Bus::SnsSqs(bus) => Arc::new(bus.consumer(name)),
        })
    }

    /// Creates what the bus needs (streams, or topic + queues + dead-letter queues), idempotently.
    pub async fn provision(&self) -> anyhow::Result<()> {
        match self {
            Bus::Nats(bus) => bus.provision().await.context("cannot provision the NATS streams")?,
            Bus::SnsSqs(bus) => {
                bus.provision(CONSUMERS).await.context("cannot provision the SNS topic and SQS queues")?;
            }
        }
        Ok(())
    }
}

/// Connects to the configured external bus; `None` for the in-process bus. Provisions it first
/// when `bus.provision` is set.
pub async fn open(config: &Config, aws: &crate::stores::Aws) -> anyhow::Result<Option<Bus>> {
    let bus = match config.bus.backend {
        BusBackend::InProcess => return Ok(None),
        BusBackend::Nats => {
            let nats = &config.nats;
            let settings = NatsConfig {
                url: nats.url.clone(),
                stream: nats.stream.clone(),
                subject_prefix: nats.subject_prefix.clone(),
                dead_letter_stream: nats.dead_letter_stream.clone(),
                dead_letter_subject_prefix: nats.dead_letter_subject_prefix.clone(),
                ack_wait: Duration::from_secs(nats.ack_wait_seconds),
                max_deliver: nats.max_deliver,
                ..NatsConfig::default()
            };
            Bus::Nats(Box::new(NatsBus::connect(settings).await.context("cannot connect to NATS")?))
        }
        BusBackend::SnsSqs => {
            let sdk = aws.sdk().await;
            let sns_sqs = &config.sns_sqs;
            let settings = SnsSqsConfig {
                topic_name: sns_sqs.topic_name.clone(),
                queue_prefix: sns_sqs.queue_prefix.clone(),
                visibility_timeout: Duration::from_secs(sns_sqs.visibility_timeout_seconds),
                max_receive_count: sns_sqs.max_receive_count,
                ..SnsSqsConfig::default()
            };
            settings.validate().context("invalid [sns_sqs] configuration")?;
            Bus::SnsSqs(SnsSqsBus::new(sdk, settings))
        }
    };
    if config.bus.provision {
        bus.provision().await?;
    }
    Ok(Some(bus))
}
