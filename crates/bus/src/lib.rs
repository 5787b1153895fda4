//! Event bus adapters behind [`fhirmesh_core::ports::EventPublisher`] and
//! [`fhirmesh_core::ports::EventConsumer`].
//!
//! What it is: the in-process bus used by embedded mode (`in_process`), NATS JetStream (`nats`)
//! and SNS + SQS (`sns_sqs`), each module the same shape: a publisher, a durable consumer, and
//! `provision` for what it needs on the server. What it is not: the relay loop or any consumer
//! logic (those are domain code in `fhirmesh-core`).

pub mod durable;
pub mod in_process;
pub mod nats;
pub mod sns_sqs;

pub use durable::durable_subscription;
pub use in_process::InProcessBus;
pub use nats::{NatsBus, NatsConfig};
pub use sns_sqs::{SnsSqsBus, SnsSqsConfig};
