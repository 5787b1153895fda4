//! The connection: connect, provision the streams, publish events, open durable consumers.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::context::{Context, ContextBuilder, GetStreamErrorKind};
use async_nats::jetstream::stream::{Config as StreamConfig, StorageType};
use async_nats::{Client, ConnectOptions, Event};
use async_trait::async_trait;
use fhirmesh_core::ResourceChanged;
use fhirmesh_core::ports::{BusError, EventPublisher};
use fhirmesh_proto::encode_resource_changed;

use super::config::{NatsConfig, check_name};
use super::consumer::NatsConsumer;
use super::publish::{Outgoing, backoff_with_jitter, publish_all};
use super::wire::{change_subject, event_headers, redact_url};

/// Bytes of a message's `max_payload` kept for headers (ids, traceparent) and framing.
const PAYLOAD_MARGIN: usize = 4096;

const FIRST_CONNECT_DELAY: Duration = Duration::from_millis(200);
const MAX_CONNECT_DELAY: Duration = Duration::from_secs(5);

/// The NATS JetStream event bus: publishes [`ResourceChanged`] events to the change stream and
/// opens durable consumers on it. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct NatsBus {
    client: Client,
    context: Context,
    config: Arc<NatsConfig>,
}

impl std::fmt::Debug for NatsBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsBus")
            .field("url", &redact_url(&self.config.url))
            .field("stream", &self.config.stream)
            .field("state", &self.client.connection_state())
            .finish()
    }
}

impl NatsBus {
    /// Validates `config` and connects, trying `config.connect_attempts` times with back-off,
    /// each attempt bounded by `config.connect_timeout`. Once connected, the client reconnects on
    /// its own after a lost connection, without limit. Fails with [`BusError::Unavailable`] naming
    /// the URL (credentials redacted).
    pub async fn connect(config: NatsConfig) -> Result<NatsBus, BusError> {
        config.validate().map_err(|err| BusError::Unavailable(err.to_string()))?;
        let url = redact_url(&config.url);
        let attempts = config.connect_attempts.max(1);
        let mut last_error = String::new();
        for attempt in 1..=attempts {
            match connect_once(&config).await {
                Ok(client) => {
                    tracing::info!(url = %url, attempt, "connected to nats");
                    let context = ContextBuilder::new().timeout(config.request_timeout).build(client.clone());
                    return Ok(NatsBus { client, context, config: Arc::new(config) });
                }
                Err(error) => {
                    tracing::warn!(url = %url, attempt, attempts, error = %error, "nats connection attempt failed");
                    last_error = error;
                    if attempt < attempts {
                        tokio::time::sleep(backoff_with_jitter(attempt, FIRST_CONNECT_DELAY, MAX_CONNECT_DELAY)).await;
                    }
                }
            }
        }
        Err(BusError::Unavailable(format!("cannot connect to NATS at {url} after {attempts} attempt(s): {last_error}")))
    }

    /// The configuration this bus was connected with.
    pub fn config(&self) -> &NatsConfig {
        &self.config
    }

    /// Creates the change stream and the dead-letter stream, or brings the settings this adapter
    /// owns (subjects, duplicate window) up to date on existing ones; other settings an operator
    /// tuned (limits, replicas) are kept. Safe to call any number of times, from any instance.
    pub async fn provision(&self) -> Result<(), BusError> {
        let config = &self.config;
        self.ensure_stream(&config.stream, config.stream_subjects()).await?;
        self.ensure_stream(&config.dead_letter_stream, config.dead_letter_stream_subjects()).await
    }

    async fn ensure_stream(&self, name: &str, subjects: String) -> Result<(), BusError> {
        let wanted = StreamConfig {
            name: name.to_owned(),
            subjects: vec![subjects],
            storage: StorageType::File,
            duplicate_window: self.config.duplicate_window,
            ..StreamConfig::default()
        };
        let failed = |action: &str, err: &dyn std::fmt::Display| {
            BusError::Unavailable(format!("provisioning stream '{name}': {action}: {err}"))
        };
        match self.context.get_stream(name).await {
            Ok(stream) => {
                if let Some(updated) = reconcile(&stream.cached_info().config, &wanted) {
                    self.context.update_stream(&updated).await.map_err(|err| failed("updating it", &err))?;
                    tracing::info!(stream = name, "nats stream updated");
                }
                Ok(())
            }
            Err(err) if is_stream_not_found(&err.kind()) => {
                self.context.create_stream(wanted).await.map_err(|err| failed("creating it", &err))?;
                tracing::info!(stream = name, "nats stream created");
                Ok(())
            }
            Err(err) => Err(failed("looking it up", &err)),
        }
    }

    /// The durable pull consumer `durable_name` on the change stream, created if it does not
    /// exist (explicit ack, `ack_wait`, `max_deliver`, deliver all). Every handle opened with the
    /// same name shares one position on the server. The stream must have been provisioned.
    pub async fn consumer(&self, durable_name: &str) -> Result<NatsConsumer, BusError> {
        check_name(durable_name).map_err(|reason| {
            BusError::Unavailable(format!("invalid durable consumer name '{durable_name}': {reason}"))
        })?;
        NatsConsumer::open(self.context.clone(), Arc::clone(&self.config), durable_name).await
    }

    fn outgoing(&self, event: &ResourceChanged) -> Result<Outgoing, BusError> {
        let headers = event_headers(event).map_err(|reason| {
            BusError::Unavailable(format!(
                "cannot publish the {} event at sequence {}: {reason}",
                event.resource_type, event.sequence
            ))
        })?;
        let mut payload = encode_resource_changed(event);
        // Leave room for the headers and protocol framing within the server's max_payload.
        let limit = self.client.server_info().max_payload.saturating_sub(PAYLOAD_MARGIN);
        if payload.len() > limit && event.resource.is_some() {
            tracing::debug!(key = %event.idempotency_key, size = payload.len(), "event body too large for NATS; sent without it");
            payload = encode_resource_changed(&event.without_body());
        }
        Ok(Outgoing { subject: change_subject(&self.config.subject_prefix, event), headers, payload })
    }
}

/// Publishes each event to `{subject_prefix}.{tenant}.{resource_type}`, with its protobuf
/// encoding as body, `Nats-Msg-Id` set to its idempotency key and `traceparent` when it has one.
/// The batch is pipelined and stored in order; the call returns once the stream acknowledged
/// every event. Transient failures are retried (`publish_attempts` in all); the stream's
/// de-duplication makes that safe.
#[async_trait]
impl EventPublisher for NatsBus {
    async fn publish(&self, events: &[ResourceChanged]) -> Result<(), BusError> {
        let messages = events.iter().map(|event| self.outgoing(event)).collect::<Result<Vec<_>, _>>()?;
        publish_all(&self.context, &messages, self.config.publish_attempts).await
    }
}

async fn connect_once(config: &NatsConfig) -> Result<Client, String> {
    let servers: Vec<&str> = config.url.split(',').map(str::trim).filter(|url| !url.is_empty()).collect();
    let url = redact_url(&config.url);
    let options = ConnectOptions::new()
        .name(&config.connection_name)
        .connection_timeout(config.connect_timeout)
        .request_timeout(Some(config.request_timeout))
        .max_reconnects(None)
        .event_callback(move |event| {
            let url = url.clone();
            async move { log_connection_event(&url, event) }
        });
    // The connect timeout bounds each handshake; this also bounds name resolution and retries
    // over several servers.
    let bound = config.connect_timeout.saturating_mul(u32::try_from(servers.len()).unwrap_or(u32::MAX).max(1));
    match tokio::time::timeout(bound.saturating_add(Duration::from_secs(1)), options.connect(servers)).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!("timed out after {bound:?}")),
    }
}

fn log_connection_event(url: &str, event: Event) {
    match event {
        Event::Connected => tracing::info!(url, "nats connection (re)established"),
        Event::Disconnected => tracing::warn!(url, "nats connection lost; reconnecting"),
        Event::LameDuckMode => tracing::warn!(url, "nats server entering lame duck mode"),
        Event::Closed => tracing::warn!(url, "nats connection closed"),
        other => tracing::warn!(url, event = %other, "nats connection event"),
    }
}

fn is_stream_not_found(kind: &GetStreamErrorKind) -> bool {
    matches!(kind, GetStreamErrorKind::JetStream(err) if err.error_code() == ErrorCode::STREAM_NOT_FOUND)
}

/// The configuration to update `current` to, or `None` when what this adapter owns already
/// matches. Storage cannot be changed on a live stream: a mismatch is logged, not fought.
pub(crate) fn reconcile(current: &StreamConfig, wanted: &StreamConfig) -> Option<StreamConfig> {
    if current.storage != wanted.storage {
        tracing::warn!(
            stream = %current.name,
            current = ?current.storage,
            wanted = ?wanted.storage,
            "nats stream storage differs from the configured one; it cannot be changed in place"
        );
    }
    if current.subjects == wanted.subjects && current.duplicate_window == wanted.duplicate_window {
        return None;
    }
    Some(StreamConfig {
        subjects: wanted.subjects.clone(),
        duplicate_window: wanted.duplicate_window,
        ..current.clone()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wanted() -> StreamConfig {
        StreamConfig {
            name: "S".to_owned(),
            subjects: vec!["p.>".to_owned()],
            storage: StorageType::File,
            duplicate_window: Duration::from_secs(120),
            ..StreamConfig::default()
        }
    }

    #[test]
    fn a_matching_stream_is_left_alone() {
        let current = StreamConfig { max_age: Duration::from_secs(3600), ..wanted() };
        assert_eq!(reconcile(&current, &wanted()), None);
    }

    #[test]
    fn owned_settings_are_updated_and_operator_settings_kept() {
        let current = StreamConfig {
            subjects: vec!["old.>".to_owned()],
            duplicate_window: Duration::from_secs(1),
            max_age: Duration::from_secs(3600),
            num_replicas: 3,
            ..wanted()
        };
        let updated = reconcile(&current, &wanted()).expect("an update");
        assert_eq!(updated.subjects, vec!["p.>".to_owned()]);
        assert_eq!(updated.duplicate_window, Duration::from_secs(120));
        assert_eq!(updated.max_age, Duration::from_secs(3600));
        assert_eq!(updated.num_replicas, 3);
    }
}
