//! Event bus adapters behind [`fhirmesh_core::ports::EventPublisher`].
//!
//! What it is: the in-process bus used by embedded mode (`in_process`). The NATS JetStream and
//! SNS/SQS adapters join here with the same shape. What it is not: the relay loop or any consumer
//! logic (those are domain code in `fhirmesh-core`).

pub mod in_process;

pub use in_process::InProcessBus;
