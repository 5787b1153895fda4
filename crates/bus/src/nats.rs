//! NATS JetStream: publisher, durable pull consumer, provisioning.
//!
//! What it is: [`NatsBus`] connects ([`NatsBus::connect`]), creates the streams it needs
//! ([`NatsBus::provision`]), publishes [`fhirmesh_core::ResourceChanged`] events
//! ([`fhirmesh_core::ports::EventPublisher`]) and opens durable consumers ([`NatsBus::consumer`],
//! a [`NatsConsumer`] behind [`fhirmesh_core::ports::EventConsumer`]). What it is not: the relay
//! loop or any consumer logic.
//!
//! Layout on the server (names from [`NatsConfig`]):
//! - change stream `FHIRMESH_CHANGES`, file storage, subjects `fhirmesh.changes.>`; each event on
//!   `fhirmesh.changes.{tenant}.{resource_type}`, its body the protobuf envelope
//!   (`fhirmesh_proto::encode_resource_changed`), headers `Nats-Msg-Id` (the idempotency key, for
//!   de-duplication within `duplicate_window`) and `traceparent`;
//! - dead-letter stream `FHIRMESH_DLQ`, subjects `fhirmesh.dlq.>`; a consumer's dead letters on
//!   `fhirmesh.dlq.{durable_name}`, with the original body and headers plus `Fhirmesh-*` headers
//!   saying where they came from and why;
//! - one durable pull consumer per service on the change stream (explicit ack).
//!
//! Delivery semantics are described in `nats/design.md`.

mod client;
mod config;
mod consumer;
mod publish;
mod wire;

pub use client::NatsBus;
pub use config::{InvalidNatsConfig, NatsConfig};
pub use consumer::NatsConsumer;
