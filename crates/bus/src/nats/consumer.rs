//! The durable pull consumer behind [`EventConsumer`], its acknowledgements, and the dead-letter
//! path.

use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::AckKind;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::context::Context;
use async_trait::async_trait;
use fhirmesh_core::ports::{Acknowledge, BusError, Delivery, EventConsumer};
use fhirmesh_proto::decode_resource_changed;
use futures::StreamExt;
use tokio::time::Instant;

use super::config::NatsConfig;
use super::publish::{Outgoing, exponential, publish_all};
use super::wire::{
    DeadLetterOrigin, apply_traceparent_header, attempt_from_delivered, dead_letter_headers, dead_letter_subject,
    is_last_attempt,
};

/// The longest a single [`EventConsumer::fetch`] waits for its first event; longer waits are cut
/// to this (the caller simply fetches again).
const MAX_FETCH_WAIT: Duration = Duration::from_secs(3600);
/// How long after a pull request expires the server's answer may be late before the pull counts
/// as failed. A pull to a consumer that no longer exists is never answered (the server's API
/// import swallows it), so this is how a deleted consumer is noticed. Kept below the client
/// library's own 5 s slack, which would end the pull silently.
const MAX_PULL_GRACE: Duration = Duration::from_secs(3);

/// A durable pull consumer of the change stream. The server keeps its position: every handle
/// opened with the same durable name (in this process or another) shares it, and the events
/// are spread among the handles that fetch.
///
/// Delivery is at least once. A [`Delivery`] not acknowledged within `ack_wait` is delivered
/// again with `attempt` one higher; [`Acknowledge::nak`] on the last allowed attempt
/// (`max_deliver`) moves the event to the dead-letter stream, on subject
/// `{dead_letter_subject_prefix}.{durable_name}`, and the server stops delivering it. An event
/// whose body cannot be decoded is dead-lettered at once and never returned.
pub struct NatsConsumer {
    shared: Arc<Shared>,
    handle: RwLock<Handle>,
}

impl std::fmt::Debug for NatsConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsConsumer")
            .field("stream", &self.shared.config.stream)
            .field("durable_name", &self.shared.durable_name)
            .finish()
    }
}

/// What every delivery of one consumer needs.
struct Shared {
    context: Context,
    config: Arc<NatsConfig>,
    durable_name: String,
    dead_letter_subject: String,
}

/// The server-side consumer as last looked up, with the `max_deliver` it really has (an existing
/// consumer may differ from the configuration).
#[derive(Clone)]
struct Handle {
    consumer: Arc<PullConsumer>,
    max_deliver: i64,
}

impl NatsConsumer {
    pub(crate) async fn open(
        context: Context,
        config: Arc<NatsConfig>,
        durable_name: &str,
    ) -> Result<NatsConsumer, BusError> {
        let shared = Arc::new(Shared {
            dead_letter_subject: dead_letter_subject(&config.dead_letter_subject_prefix, durable_name),
            durable_name: durable_name.to_owned(),
            context,
            config,
        });
        let handle = shared.acquire().await?;
        Ok(NatsConsumer { shared, handle: RwLock::new(handle) })
    }

    /// The durable name this consumer was opened with.
    pub fn durable_name(&self) -> &str {
        &self.shared.durable_name
    }

    fn current(&self) -> Handle {
        self.handle.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn replace(&self, handle: Handle) {
        *self.handle.write().unwrap_or_else(PoisonError::into_inner) = handle;
    }

    /// Pulls up to `max` messages, waiting at most `wait` for the first: the pull request asks
    /// the server to answer as soon as it has any (`no_wait` with `expires`), and the server ends
    /// it at the latest when it expires. A pull the server leaves unanswered past that (plus a
    /// grace period) fails.
    async fn pull(&self, handle: &Handle, max: usize, wait: Duration) -> Result<Vec<jetstream::Message>, String> {
        let grace = self.shared.config.request_timeout.min(MAX_PULL_GRACE);
        let now = Instant::now();
        let deadline =
            now.checked_add(wait.saturating_add(grace)).or_else(|| now.checked_add(MAX_FETCH_WAIT)).unwrap_or(now);
        let request = handle.consumer.fetch().max_messages(max).expires(wait).messages();
        let mut batch = match tokio::time::timeout_at(deadline, request).await {
            Ok(Ok(batch)) => batch,
            Ok(Err(err)) => return Err(format!("pull request failed: {err}")),
            Err(_) => return Err("pull request timed out".to_owned()),
        };
        let mut messages = Vec::new();
        loop {
            match tokio::time::timeout_at(deadline, batch.next()).await {
                Ok(Some(Ok(message))) => messages.push(message),
                Ok(None) => break,
                Ok(Some(Err(err))) => {
                    let err = err.to_string();
                    // Keep what already arrived: dropping it would only delay it by `ack_wait`.
                    if !messages.is_empty() || is_backpressure(&err) {
                        tracing::debug!(consumer = %self.shared.durable_name, error = %err, "nats pull ended early");
                        break;
                    }
                    return Err(err);
                }
                Err(_) if messages.is_empty() => {
                    return Err(format!(
                        "the server did not end the pull request within {grace:?} of its expiry \
                         (was the consumer deleted?)"
                    ));
                }
                Err(_) => {
                    tracing::debug!(consumer = %self.shared.durable_name, "nats pull deadline reached");
                    break;
                }
            }
        }
        Ok(messages)
    }

    /// The delivery for `message`, or `None` when it was undecodable (and dead-lettered).
    async fn delivery(&self, message: jetstream::Message, max_deliver: i64) -> Option<Delivery> {
        let (attempt, stream_sequence) = match message.info() {
            Ok(info) => (attempt_from_delivered(info.delivered), Some(info.stream_sequence)),
            Err(err) => {
                tracing::warn!(consumer = %self.shared.durable_name, error = %err, "nats message without delivery metadata");
                (1, None)
            }
        };
        match decode_resource_changed(message.payload.clone()) {
            Ok(mut event) => {
                apply_traceparent_header(&mut event, message.headers.as_ref());
                Some(Delivery {
                    event: Arc::new(event),
                    attempt,
                    ack: Box::new(NatsAcknowledge {
                        shared: Arc::clone(&self.shared),
                        message,
                        attempt,
                        max_deliver,
                        stream_sequence,
                    }),
                })
            }
            Err(err) => {
                tracing::warn!(
                    consumer = %self.shared.durable_name,
                    subject = %message.subject,
                    stream_sequence,
                    error = %err,
                    "undecodable event; moving it to the dead-letter stream"
                );
                let reason = format!("undecodable event: {err}");
                match self.shared.dead_letter(&message, stream_sequence, attempt, &reason).await {
                    Ok(()) => {
                        if let Err(err) = message.double_ack_with(AckKind::Term).await {
                            tracing::warn!(
                                consumer = %self.shared.durable_name,
                                stream_sequence,
                                error = %err,
                                "dead-lettered an undecodable event but could not terminate it; it may be delivered again"
                            );
                        }
                    }
                    Err(err) => {
                        tracing::error!(
                            consumer = %self.shared.durable_name,
                            stream_sequence,
                            error = %err,
                            "cannot dead-letter an undecodable event; it will be delivered again"
                        );
                        let delay = self.shared.default_nak_delay(attempt);
                        if let Err(err) = message.ack_with(AckKind::Nak(Some(delay))).await {
                            tracing::debug!(error = %err, "nak of an undecodable event failed");
                        }
                    }
                }
                None
            }
        }
    }
}

/// Pull errors that only mean "nothing for you right now": too many unacknowledged deliveries or
/// too many waiting pulls. The client library reports them only as text.
fn is_backpressure(error: &str) -> bool {
    error.contains("Exceeded MaxAckPending") || error.contains("Exceeded MaxWaiting")
}

#[async_trait]
impl EventConsumer for NatsConsumer {
    /// Up to `max` deliveries, waiting at most `wait` (at most an hour) for the first. After a
    /// failed pull the consumer is looked up again (it may have been re-created, or the
    /// connection re-established) and the pull retried once before the call fails.
    async fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, BusError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let wait = wait.min(MAX_FETCH_WAIT);
        let handle = self.current();
        let (messages, handle) = match self.pull(&handle, max, wait).await {
            Ok(messages) => (messages, handle),
            Err(first) => {
                tracing::warn!(
                    consumer = %self.shared.durable_name,
                    error = %first,
                    "nats fetch failed; looking the consumer up again"
                );
                let handle = self
                    .shared
                    .acquire()
                    .await
                    .map_err(|err| BusError::Unavailable(format!("{err} (after a failed fetch: {first})")))?;
                self.replace(handle.clone());
                let messages = self.pull(&handle, max, wait).await.map_err(|second| {
                    BusError::Unavailable(format!(
                        "fetching from durable consumer '{}' on stream '{}': {second} (first attempt: {first})",
                        self.shared.durable_name, self.shared.config.stream
                    ))
                })?;
                (messages, handle)
            }
        };
        let mut deliveries = Vec::with_capacity(messages.len());
        for message in messages {
            if let Some(delivery) = self.delivery(message, handle.max_deliver).await {
                deliveries.push(delivery);
            }
        }
        Ok(deliveries)
    }

    /// The consumer's `num_pending` (not delivered yet) plus `num_ack_pending` (delivered, not
    /// acknowledged), as the server counts them now.
    async fn backlog(&self) -> Result<Option<u64>, BusError> {
        let mut consumer = PullConsumer::clone(&self.current().consumer);
        let info = consumer.info().await.map_err(|err| self.shared.unavailable("reading its info", &err))?;
        Ok(Some(info.num_pending.saturating_add(info.num_ack_pending as u64)))
    }
}

impl Shared {
    fn unavailable(&self, action: &str, err: &dyn std::fmt::Display) -> BusError {
        BusError::Unavailable(format!(
            "durable consumer '{}' on stream '{}': {action}: {err}",
            self.durable_name, self.config.stream
        ))
    }

    fn consumer_config(&self) -> pull::Config {
        pull::Config {
            durable_name: Some(self.durable_name.clone()),
            description: Some("fhirmesh change-event consumer".to_owned()),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            ack_wait: self.config.ack_wait,
            max_deliver: self.config.max_deliver,
            max_ack_pending: self.config.max_ack_pending,
            ..pull::Config::default()
        }
    }

    /// Gets the durable consumer, or creates it. When an existing one has other redelivery
    /// settings, they are updated if the server allows it; otherwise the server's are used.
    async fn acquire(&self) -> Result<Handle, BusError> {
        let stream = self
            .context
            .get_stream(&self.config.stream)
            .await
            .map_err(|err| self.unavailable("looking up the stream (was it provisioned?)", &err))?;
        let wanted = self.consumer_config();
        let mut consumer: PullConsumer = stream
            .get_or_create_consumer(&self.durable_name, wanted.clone())
            .await
            .map_err(|err| self.unavailable("getting or creating it", &err))?;
        let current = &consumer.cached_info().config;
        if (current.ack_wait, current.max_deliver, current.max_ack_pending)
            != (wanted.ack_wait, wanted.max_deliver, wanted.max_ack_pending)
        {
            match stream.create_consumer(wanted).await {
                Ok(updated) => {
                    tracing::info!(consumer = %self.durable_name, "nats consumer settings updated");
                    consumer = updated;
                }
                Err(err) => tracing::warn!(
                    consumer = %self.durable_name,
                    error = %err,
                    "cannot update the nats consumer's settings; using the server's"
                ),
            }
        }
        let max_deliver = consumer.cached_info().config.max_deliver;
        Ok(Handle { consumer: Arc::new(consumer), max_deliver })
    }

    fn default_nak_delay(&self, attempt: u32) -> Duration {
        exponential(attempt, self.config.nak_delay, self.config.max_nak_delay)
    }

    /// Publishes `message` (payload and headers) to this consumer's dead-letter subject and
    /// waits for the stream to store it.
    async fn dead_letter(
        &self,
        message: &jetstream::Message,
        stream_sequence: Option<u64>,
        attempt: u32,
        reason: &str,
    ) -> Result<(), BusError> {
        let origin = DeadLetterOrigin {
            durable_name: &self.durable_name,
            stream: &self.config.stream,
            stream_sequence,
            subject: message.subject.as_str(),
            attempts: i64::from(attempt),
            reason,
        };
        let outgoing = Outgoing {
            subject: self.dead_letter_subject.clone(),
            headers: dead_letter_headers(message.headers.as_ref(), &origin),
            payload: message.payload.clone(),
        };
        publish_all(&self.context, std::slice::from_ref(&outgoing), self.config.publish_attempts)
            .await
            .map_err(|err| self.unavailable("dead-lettering an event", &err))
    }
}

/// Settles one delivery with the server.
struct NatsAcknowledge {
    shared: Arc<Shared>,
    message: jetstream::Message,
    attempt: u32,
    max_deliver: i64,
    stream_sequence: Option<u64>,
}

#[async_trait]
impl Acknowledge for NatsAcknowledge {
    /// Acknowledges and waits for the server to confirm it, so a successful return means the
    /// event will not come back. Acknowledging twice is harmless.
    async fn ack(&self) -> Result<(), BusError> {
        self.message.double_ack().await.map_err(|err| self.shared.unavailable("acknowledging an event", &err))
    }

    /// Asks for redelivery after `delay` (`None`: `nak_delay` doubled per attempt, at most
    /// `max_nak_delay`). On the last allowed attempt the event is dead-lettered and terminated
    /// instead; the server then never delivers it again.
    async fn nak(&self, delay: Option<Duration>) -> Result<(), BusError> {
        if is_last_attempt(self.attempt, self.max_deliver) {
            let reason = format!("not processed after {} delivery attempts", self.attempt);
            self.shared.dead_letter(&self.message, self.stream_sequence, self.attempt, &reason).await?;
            self.message
                .double_ack_with(AckKind::Term)
                .await
                .map_err(|err| self.shared.unavailable("terminating a dead-lettered event", &err))?;
            tracing::warn!(
                consumer = %self.shared.durable_name,
                stream_sequence = self.stream_sequence,
                attempt = self.attempt,
                "event moved to the dead-letter stream"
            );
            return Ok(());
        }
        let delay = delay.unwrap_or_else(|| self.shared.default_nak_delay(self.attempt));
        self.message
            .ack_with(AckKind::Nak(Some(delay)))
            .await
            .map_err(|err| self.shared.unavailable("rejecting an event", &err))
    }

    /// Resets the server's `ack_wait` timer for this delivery.
    async fn in_progress(&self) -> Result<(), BusError> {
        self.message
            .ack_with(AckKind::Progress)
            .await
            .map_err(|err| self.shared.unavailable("extending an event's deadline", &err))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backpressure_statuses_are_told_apart_from_failures() {
        assert!(is_backpressure(
            "error while processing messages from the stream: 409, Some(\"Exceeded MaxAckPending\")"
        ));
        assert!(is_backpressure("409, Some(\"Exceeded MaxWaiting\")"));
        assert!(!is_backpressure("409, Some(\"Consumer Deleted\")"));
        assert!(!is_backpressure("pull request failed: timed out"));
    }
}
